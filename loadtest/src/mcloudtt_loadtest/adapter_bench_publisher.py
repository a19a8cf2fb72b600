"""Load generator for `mcloudtt-adapter-bench`: raw MQTT 5.0 PUBLISHes over asyncio.

Runs in its own process (`python -m mcloudtt_loadtest.adapter_bench_publisher ...`) so that the
adapter's CPU time is measured alone. QoS 1 with a sliding window of unacknowledged messages; an
optional rate limit; JSON payloads carrying the publish time in `ts` (seconds, microsecond digits), so the
adapter's event time is the publish time and commit time minus event time is the end-to-end delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import mcloudtt_mqttclient as mqtt


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = mqtt.Reader()
        self.transport: asyncio.Transport | None = None
        self.connack = asyncio.get_running_loop().create_future()
        self.acked = 0
        self.progress = asyncio.Event()
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        for ptype, _flags, _body in self.reader.frames(data):
            if ptype == mqtt.PUBACK:
                self.acked += 1
            elif ptype == mqtt.CONNACK and not self.connack.done():
                self.connack.set_result(True)
        self.progress.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed"))
        self.progress.set()


async def publish(
    host: str,
    port: int,
    *,
    count: int,
    rate: float = 0.0,
    qos: int = 1,
    window: int = 2000,
    devices: int = 100,
    client_id: str = "",
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_Client, host, port)
    assert client.transport is not None
    cid = client_id or f"bench-pub-{os.getpid()}"
    client.transport.write(mqtt.connect(cid, version=mqtt.MQTT_5, keepalive=0))
    await asyncio.wait_for(client.connack, 10)
    topics = [f"devices/d{i:03d}/env".encode() for i in range(devices)]
    start = time.monotonic()
    cpu0 = time.process_time()
    sent = 0
    chunk = 64
    while sent < count:
        if rate:
            due = start + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        while qos and sent - client.acked >= window:
            client.progress.clear()
            await client.progress.wait()
        await client.can_write.wait()
        n = min(chunk if not rate else max(1, int(rate / 1000)), count - sent)
        if qos:
            n = min(n, window - (sent - client.acked))
        parts = []
        now = time.time()
        for i in range(sent, sent + n):
            payload = b'{"ts":%.6f,"temp":%.2f,"hum":%d,"seq":%d}' % (
                now,
                20 + (i % 97) / 10,
                40 + i % 20,
                i,
            )
            parts.append(
                mqtt.publish(topics[i % devices], payload, qos=qos, packet_id=(i % 65535) + 1)
            )
        client.transport.write(b"".join(parts))
        sent += n
    while qos and client.acked < count:
        client.progress.clear()
        await asyncio.wait_for(client.progress.wait(), 30)
    elapsed = time.monotonic() - start
    client.transport.write(mqtt.DISCONNECT_BYTES)
    client.transport.close()
    return {
        "sent": sent,
        "seconds": elapsed,
        "rate": sent / elapsed if elapsed else 0.0,
        "cpu_seconds": time.process_time() - cpu0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mcloudtt_loadtest.adapter_bench_publisher")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="messages/s (0: as fast as acks allow)"
    )
    parser.add_argument("--qos", type=int, default=1)
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(
        publish(
            args.host,
            args.port,
            count=args.count,
            rate=args.rate,
            qos=args.qos,
            window=args.window,
            devices=args.devices,
        )
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
