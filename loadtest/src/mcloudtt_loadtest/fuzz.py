"""`mcloudtt-fuzz codec|core|live`: mutation fuzzing of the broker's codec, its sans-IO connection
state machine and a running broker over TCP.

Two engines. `--engine mutation` (the default): seeded random mutation of valid packet
sequences, no coverage feedback. The seeds are built with the independent client codec
`mcloudtt_mqttclient` (never the broker's own encoder), then mutated: bit flips, byte edits,
truncation, remaining-length fields that lie, packet-type swaps, duplicated, dropped and
reordered packets, splices of other seeds, and plain random bytes; the result is fed in
random chunks.
`--engine atheris`: coverage-guided (libFuzzer) over the same codec and core targets and
oracles, with the same seeds and the same mutations mixed into libFuzzer's, in a subprocess
(`fuzz_atheris`); memory bounded by libFuzzer's RSS limit.

Oracles. codec: feeding the decoder anything raises nothing but the codec's `ProtocolError`s,
and every packet it accepts encodes and decodes back to itself.
core: no exception escapes `ServerConnection.receive_data` (protocol errors are answered with
a reason code and the connection closes: the documented path), what it writes parses with the
client codec, and a closed connection asked its shell to close. live: after each batch the
broker process is alive and a well-behaved paho client still connects, subscribes, publishes and
receives its message.

A crashing input is saved as `CRASHERS/<target>-<sha1>.bin` (the whole byte stream; for live, the
batch's streams with 4-byte length prefixes); `tests/fuzz/test_fuzz.py` replays every one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import re
import shlex
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mcloudtt_mqttclient as mc
from mcloudtt_broker.core.broker import Broker, BrokerSettings
from mcloudtt_broker.core.connection import CLOSED, ServerConnection
from mcloudtt_broker.core.memory_bus import MemoryHub
from mcloudtt_broker.mqtt.codec import (
    MQTT_5,
    MQTT_311,
    Decoder,
    decode_publish_header,
    encode,
)
from mcloudtt_broker.mqtt.errors import ProtocolError
from mcloudtt_broker.mqtt.packets import Connect, Packet

DEFAULT_CRASHERS = Path("tests/fuzz/crashers")

# ------------------------------------------------------------------------------------- seeds


def _packets(version: int, rng: random.Random) -> list[bytes]:
    """One valid session of packets for `version` (CONNECT first), from the client codec."""
    v5 = version == MQTT_5
    pid = rng.randrange(1, 65_536)
    topic = rng.choice(["a/b", "s/+/t", "x", "$SYS/x", "a/" * 20 + "z", "ü/ñ", ""])
    props5: mc.Properties = (
        [(mc.USER_PROPERTY, ("k", "v")), (mc.MESSAGE_EXPIRY, 5), (mc.TOPIC_ALIAS, 1)] if v5 else []
    )
    with_user = rng.random() < 0.3
    will = mc.Will(topic="w/t", payload=b"bye", qos=rng.randrange(3), retain=rng.random() < 0.3)
    packets = [
        mc.connect(
            f"fz{rng.randrange(50)}",
            version=version,
            clean=rng.random() < 0.7,
            keepalive=rng.choice([0, 1, 60, 65535]),
            props=[(mc.SESSION_EXPIRY, rng.choice([0, 10, 0xFFFFFFFF])), (mc.RECEIVE_MAXIMUM, 2)]
            if v5
            else None,
            will=will if rng.random() < 0.5 else None,
            # (3.1.1 refuses a password without a user name, MQTT-3.1.2-22)
            username="u" if with_user else None,
            password=b"p" if with_user and rng.random() < 0.5 else None,
        ),
        mc.subscribe(pid, [("a/#", 2), ("$share/g/s/+", 1), ("+/b", 0)], version=version),
        mc.publish(topic or "a/b", b"payload", version=version, qos=0),
        mc.publish("a/b", b"q1", version=version, qos=1, packet_id=pid, retain=True),
        mc.publish(
            "a/b", b"q2" * 30, version=version, qos=2, packet_id=pid ^ 1, props=props5 or None
        ),
        mc.ack(mc.PUBREL, pid ^ 1, version=version),
        mc.unsubscribe(pid, ["a/#", "nope"], version=version),
        mc.pingreq(),
    ]
    if v5:
        packets.append(mc.publish("", b"by alias", version=version, props=[(mc.TOPIC_ALIAS, 1)]))
    # Acks for flows of ours (the deliveries' ids are 1, 2, ...) and AUTH end a connection
    # when they match nothing: rarely, so most sessions go deep.
    if rng.random() < 0.3:
        kind = rng.choice([mc.PUBACK, mc.PUBREC, mc.PUBCOMP])
        packets.append(mc.ack(kind, rng.randrange(1, 4), version=version))
    if v5 and rng.random() < 0.1:
        packets.append(mc.auth(0x18, [(mc.AUTH_METHOD, "SCRAM-SHA-256")]))
    packets.append(mc.disconnect(rng.choice([0, 4]), version=version))
    return packets


def seed_corpus(rng: random.Random) -> list[list[bytes]]:
    return [_packets(version, rng) for version in (3, 4, 5) for _ in range(8)]


# ----------------------------------------------------------------------------------- mutation


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mutate_packet(packet: bytes, rng: random.Random) -> bytes:
    data = bytearray(packet)
    kind = rng.randrange(9)
    if kind == 0 and data:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and data:  # a byte set to an interesting value
        data[rng.randrange(len(data))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == 2 and len(data) > 1:  # truncation
        del data[rng.randrange(1, len(data)) :]
    elif kind == 3 and len(data) > 1:  # the remaining length lies
        body = data[2:] if data[1] < 0x80 else data[3:]
        lie = rng.choice([0, 1, len(body) + rng.randint(1, 10), max(0, len(body) - 1), 2**21])
        data = bytearray(data[:1] + _varint(lie) + body)
        if rng.random() < 0.1:
            data[1:1] = b"\xff\xff\xff\xff"  # a five-byte varint
    elif kind == 4 and data:  # another packet type, same flags
        data[0] = (rng.randrange(16) << 4) | (data[0] & 0x0F)
    elif kind == 5 and data:  # other flags (QoS 3, DUP on QoS 0, reserved bits)
        data[0] = (data[0] & 0xF0) | rng.randrange(16)
    elif kind == 6:  # inserted random bytes
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randint(1, 8))
    elif kind == 7 and len(data) > 2:  # deleted bytes
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 4)]
    elif kind == 8 and len(data) > 4:  # a length field inside the body grows
        i = rng.randrange(2, len(data) - 1)
        data[i] = 0xFF
    return bytes(data)


def split_packets(data: bytes) -> list[bytes]:
    """`data` cut where its fixed headers say packets end (the rest, if any, as the last piece):
    how the atheris mutator turns one input back into a packet sequence for `mutate`."""
    out, i = [], 0
    while i + 2 <= len(data):
        length, shift, j = 0, 0, i + 1
        while j < len(data) and j < i + 5:
            length |= (data[j] & 0x7F) << shift
            shift += 7
            j += 1
            if data[j - 1] < 0x80:
                break
        else:
            break
        if j + length > len(data):
            break
        out.append(data[i : j + length])
        i = j + length
    if i < len(data) or not out:
        out.append(data[i:])
    return out


def mutate(corpus: Sequence[Sequence[bytes]], rng: random.Random) -> bytes:
    """One byte stream: a seed session, mutated per packet and as a sequence."""
    roll = rng.random()
    if roll < 0.03:
        return rng.randbytes(rng.randint(0, 64))
    packets = list(rng.choice(corpus))
    if roll < 0.08:
        return rng.randbytes(rng.randint(0, 32)).join(packets)  # garbage between packets
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        i = rng.randrange(len(packets))
        if kind <= 2:
            packets[i] = _mutate_packet(packets[i], rng)
        elif kind == 3:
            packets.insert(i, packets[rng.randrange(len(packets))])  # duplicated
        elif kind == 4 and len(packets) > 2:
            j = rng.randrange(len(packets))
            packets[i], packets[j] = packets[j], packets[i]  # reordered
        elif kind == 5 and len(packets) > 1:
            del packets[i]  # dropped
    if rng.random() < 0.1:
        other = rng.choice(corpus)
        packets[rng.randrange(len(packets)) :] = other[rng.randrange(len(other)) :]  # splice
    return b"".join(packets)


def chunks(data: bytes, rng: random.Random) -> Iterator[bytes]:
    """`data` whole, byte by byte, or in random pieces."""
    roll = rng.random()
    if roll < 0.4:
        yield data
        return
    if roll < 0.5:
        for i in range(len(data)):
            yield data[i : i + 1]
        return
    i = 0
    while i < len(data):
        n = rng.randint(1, 64)
        yield data[i : i + n]
        i += n


# ------------------------------------------------------------------------------------- targets


class CodecMismatch(AssertionError):
    """A decoded packet, encoded again, did not decode to itself."""


def _round_trip(packet: Packet, version: int) -> None:
    wire = bytearray()
    encode(packet, version, wire)
    again = Decoder(version=None if isinstance(packet, Connect) else version)
    again.feed(bytes(wire))
    if again.next_packet() != packet:
        raise CodecMismatch(f"{packet!r} does not survive encode/decode (version {version})")


def run_codec(data: bytes, rng: random.Random | None = None) -> None:
    """Decode `data` as a stream; only the codec's protocol errors may come out, and what the
    first decoder (no version yet, as a server's) accepts survives encoding and decoding."""
    rng = rng or random.Random(0)
    for version in (None, MQTT_311, MQTT_5):
        decoder = Decoder(version=version, max_packet_size=rng.choice([1 << 20, 64, 256]))
        try:
            for piece in chunks(data, rng):
                decoder.feed(piece)
                while True:
                    frame = decoder.next_frame()
                    if frame is None:
                        break
                    packet_type, flags, buffer, start, stop = frame
                    if packet_type == 3:
                        decode_publish_header(
                            flags, buffer, start, stop, decoder.version or MQTT_311
                        )
                    else:
                        packet = decoder.decode_frame(*frame)
                        if version is None:
                            _round_trip(packet, decoder.version or MQTT_311)
        except ProtocolError:
            pass


class _Link:
    __slots__ = ("closed", "conn")

    def __init__(self) -> None:
        self.closed = False
        self.conn: ServerConnection | None = None

    def kick(self) -> None:
        if self.conn is not None:
            self.conn.take_output()

    def close(self) -> None:
        self.closed = True


class CoreCrash(AssertionError):
    """The core broke its contract on an input."""


def check_output(wire: bytes | bytearray, version: int) -> None:
    """What the core wrote is whole packets that the independent client codec parses."""
    reader = mc.Reader(max_size=1 << 28)
    reader.feed(wire)
    try:
        while (frame := reader.next_frame()) is not None:
            mc.parse(*frame, version)
    except mc.MalformedPacket as error:
        raise CoreCrash(f"the core wrote a malformed packet: {error}") from error
    if reader.buffered:
        raise CoreCrash(f"the core's output ends in {reader.buffered} bytes of a partial packet")


# Small limits, so the fuzzer reaches the paths where they are hit; the second enables all the
# limits of the core (topic length and levels, subscriptions, publish rate and bandwidth).
CORE_SETTINGS = (
    BrokerSettings(max_packet_size=1 << 16, receive_maximum=4, max_inflight=4, sys_interval=0),
    BrokerSettings(
        max_packet_size=1 << 12,
        receive_maximum=2,
        max_inflight=2,
        max_queued_messages=3,
        topic_alias_maximum=2,
        max_keepalive=5,
        max_session_expiry=5,
        sys_interval=1,
        max_subscriptions=2,
        max_topic_length=12,
        max_topic_levels=3,
        publish_rate=5.0,
        bandwidth=500,
    ),
)


@dataclass
class CoreTarget:
    """One broker core kept across inputs (sessions and retained messages pile up, as in a real
    broker); a fresh one every `renew` inputs so a crash stays reproducible from few inputs."""

    renew: int = 500
    settings: Sequence[BrokerSettings] = CORE_SETTINGS
    now: float = 1000.0
    count: int = 0
    broker: Broker | None = None
    # cluster: two cores on an in-memory bus (sessions located and taken over between them,
    # forwarded publishes); each input goes to one of them.
    cluster: bool = False
    cores: list[Broker] = field(default_factory=list)
    hub: MemoryHub | None = None

    def _renew(self) -> None:
        settings = self.settings[(self.count // self.renew) % len(self.settings)]
        if not self.cluster:
            self.broker = Broker(settings, clock=lambda: self.now)
            self.cores = [self.broker]
            return
        self.hub = MemoryHub(clock=lambda: self.now)
        self.cores = []
        for broker_id in ("a", "b"):
            bus = self.hub.bus(broker_id)
            core = Broker(
                dataclasses.replace(
                    settings, broker_id=broker_id, sys_root=f"$SYS/brokers/{broker_id}"
                ),
                clock=lambda: self.now,
                bus=bus,
            )
            bus.attach(core)
            self.cores.append(core)
        self.broker = self.cores[0]

    def run(self, data: bytes, rng: random.Random | None = None) -> None:
        rng = rng or random.Random(0)
        if self.broker is None or self.count % self.renew == 0:
            self._renew()
        self.count += 1
        broker = rng.choice(self.cores)
        hub = self.hub
        link = _Link()
        conn = broker.connect(link, self.now)
        link.conn = conn
        for piece in chunks(data, rng):
            self.now += rng.choice([0.0, 0.001, 0.5])
            conn.receive_data(piece, self.now)  # anything raised here is a crash
            if hub is not None:
                hub.pump()
            if conn.state == CLOSED and not link.closed:
                raise CoreCrash("the connection closed without asking its shell to close")
            check_output(conn.take_output(), conn.version)
        if rng.random() < 0.3:
            self.now += 100.0
            broker.tick(self.now)  # keepalive, expiry, wills
        conn.connection_lost(self.now)
        if conn.state != CLOSED:
            raise CoreCrash("connection_lost left the connection open")
        for core in self.cores:
            core.tick(self.now)
        if hub is not None:
            hub.pump()


def run_core(data: bytes, rng: random.Random | None = None) -> None:
    """`data` against a fresh core (what a saved crasher replays)."""
    CoreTarget().run(data, rng)


def run_cluster(data: bytes, rng: random.Random | None = None) -> None:
    """`data` against a fresh pair of cores on an in-memory bus."""
    CoreTarget(cluster=True).run(data, rng)


# ---------------------------------------------------------------------------------------- live


def paho_check(port: int, timeout: float = 10.0) -> None:
    """A well-behaved paho 5.0 client connects, subscribes, publishes and gets its message."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got = threading.Event()
    subscribed = threading.Event()
    topic = f"fuzz/check/{random.randrange(1 << 30)}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1) if rc == 0 else None
    client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
    client.on_message = lambda c, u, msg: got.set()
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    try:
        if not subscribed.wait(timeout):
            raise AssertionError("paho: no CONNACK/SUBACK")
        client.publish(topic, b"ok", 1)
        if not got.wait(timeout):
            raise AssertionError("paho: its own message did not come back")
    finally:
        client.disconnect()
        client.loop_stop()


def send_streams(port: int, streams: Sequence[bytes], rng: random.Random) -> None:
    """Each stream on its own TCP connection, in pieces; whatever comes back is read and
    dropped; the connection is closed (or reset) at a random point."""
    socks = []
    for data in streams:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.setblocking(False)
        socks.append((s, list(chunks(data, rng))))
    while socks:
        for entry in list(socks):
            s, pieces = entry
            try:
                if pieces:
                    s.send(pieces.pop(0))
                with_data = True
                while with_data:
                    with_data = bool(s.recv(65_536))
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pieces.clear()
            if not pieces:
                if rng.random() < 0.3:  # reset instead of a clean close
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                socks.remove(entry)
        time.sleep(0.0005)


def pack_streams(streams: Sequence[bytes]) -> bytes:
    return b"".join(len(s).to_bytes(4, "big") + s for s in streams)


def unpack_streams(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 4 <= len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        out.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    return out


# ------------------------------------------------------------------------------------- driver


@dataclass
class Result:
    target: str
    inputs: int = 0
    crashes: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    # atheris: libFuzzer's coverage counters at the end (edges, features) and its final stats.
    coverage: int = 0
    features: int = 0
    corpus: int = 0
    peak_rss_mb: int = 0


def save_crasher(directory: Path, target: str, data: bytes, why: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{target}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(why)
    return path


def load_corpus(corpus: Path | None, rng: random.Random) -> list[list[bytes]]:
    """The seeds, plus every file of `corpus` (one stream per file, as one 'packet')."""
    seeds = seed_corpus(rng)
    if corpus is not None and corpus.is_dir():
        seeds += [[p.read_bytes()] for p in sorted(corpus.iterdir()) if p.suffix == ".bin"]
    return seeds


def fuzz_in_process(
    target: str,
    inputs: int,
    seed: int,
    crashers: Path,
    corpus: Path | None = None,
    progress: Callable[[int], None] | None = None,
    run: Callable[[bytes, random.Random], None] | None = None,
) -> Result:
    """`inputs` mutated streams through the codec or a core (or `run`, a target of one's own)."""
    rng = random.Random(seed)
    seeds = load_corpus(corpus, rng)
    core = CoreTarget(cluster=target == "cluster")
    if run is None:
        run = run_codec if target == "codec" else core.run
    result = Result(target)
    started = time.monotonic()
    for i in range(inputs):
        data = mutate(seeds, rng)
        # The chunking of each input is seeded by the input itself, so a replay is identical.
        try:
            run(data, random.Random(data))
        except Exception as error:  # anything else than the documented path is a crash
            why = "".join(traceback.format_exception(error))
            result.crashes.append(save_crasher(crashers, target, data, why))
            core.broker = None
        result.inputs = i + 1
        if progress is not None and i % 1000 == 0:
            progress(i)
    result.seconds = time.monotonic() - started
    return result


_DONE = re.compile(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.M)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)


def fuzz_atheris(
    target: str,
    inputs: int,
    seed: int,
    crashers: Path,
    corpus: Path | None = None,
    max_len: int = 4096,
    rss_limit_mb: int = 1024,
    timeout: int = 10,
    work: Path | None = None,
    run: str = "-",
) -> Result:
    """`inputs` coverage-guided inputs through the codec or a core, in an atheris subprocess.

    The seeds are those of the mutation engine (each session's packets as one stream) plus the
    `corpus` files and the saved crashers of `target`; libFuzzer's new inputs go to `work`
    (kept for the next run when given, else a temporary folder). Memory is bounded by
    libFuzzer's `-rss_limit_mb`, time per input by `-timeout`: an input that breaks either is
    saved as a crasher too. `run` (`module:function`) replaces the target's own function."""
    import subprocess
    import tempfile

    if target not in ("codec", "core", "cluster") and run == "-":
        raise ValueError(f"atheris runs codec, core or cluster, not {target}")
    crashers.mkdir(parents=True, exist_ok=True)
    before = set(crashers.glob("*.bin"))
    with tempfile.TemporaryDirectory(prefix="mcloudtt-atheris-") as tmp:
        seeds_dir = Path(tmp) / "seeds"
        seeds_dir.mkdir()
        seeds = [b"".join(s) for s in seed_corpus(random.Random(seed))]
        seeds += [p.read_bytes() for p in sorted(crashers.glob(f"{target}-*.bin"))]
        if corpus is not None and corpus.is_dir():
            seeds += [p.read_bytes() for p in sorted(corpus.glob("*.bin"))]
        for i, data in enumerate(seeds):
            (seeds_dir / f"{i:04d}").write_bytes(data)
        work = work or Path(tmp) / "corpus"
        work.mkdir(parents=True, exist_ok=True)
        artifacts = Path(tmp) / "artifacts"
        artifacts.mkdir()
        command = [
            sys.executable,
            "-m",
            "mcloudtt_loadtest.fuzz_atheris",
            target,
            str(crashers),
            run,
            f"-runs={inputs}",
            f"-seed={seed + 1}",  # libFuzzer takes 0 as 'a random seed'
            f"-max_len={max_len}",
            f"-rss_limit_mb={rss_limit_mb}",
            f"-timeout={timeout}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            str(work),
            str(seeds_dir),
        ]
        started = time.monotonic()
        proc = subprocess.run(command, capture_output=True, text=True, errors="replace")
        seconds = time.monotonic() - started
        log = proc.stderr + proc.stdout
        result = Result(target, seconds=seconds)
        stats = {k: int(v) for k, v in _STAT.findall(log)}
        result.inputs = stats.get("number_of_executed_units", 0)
        result.peak_rss_mb = stats.get("peak_rss_mb", 0)
        done = _DONE.findall(log)
        if done:
            result.coverage, result.features, result.corpus = (int(x) for x in done[-1][1:])
        result.crashes = sorted(set(crashers.glob("*.bin")) - before)
        if proc.returncode != 0 and not result.crashes:
            # A timeout, an out-of-memory or a crash outside Python: libFuzzer's own artifact.
            found = sorted(artifacts.iterdir()) if artifacts.is_dir() else []
            data = found[0].read_bytes() if found else b""
            why = f"libFuzzer exited with {proc.returncode}\n{log[-4000:]}"
            result.crashes.append(save_crasher(crashers, target, data, why))
    return result


def fuzz_live(
    inputs: int,
    seed: int,
    crashers: Path,
    corpus: Path | None = None,
    port: int | None = None,
    batch: int = 50,
    progress: Callable[[int], None] | None = None,
    broker_args: Sequence[str] = (),
) -> Result:
    """Batches of `batch` mutated streams to a broker (started here unless `port` is given)."""
    from mcloudtt_chaos.procs import Process, console_script, free_port

    rng = random.Random(seed)
    seeds = load_corpus(corpus, rng)
    broker = None
    if port is None:
        port = free_port()
        broker = Process(
            [
                *console_script("mcloudtt-broker", "mcloudtt_broker"),
                "--bind",
                f"127.0.0.1:{port}",
                "--connect-timeout",
                "2",
                "--sys-interval",
                "1",
                *broker_args,
            ],
            name="fuzzed-broker",
            port=port,
        ).start()
        broker.wait_port(timeout=20)
    result = Result("live")
    started = time.monotonic()
    try:
        done = 0
        while done < inputs:
            streams = [mutate(seeds, rng) for _ in range(min(batch, inputs - done))]
            why = ""
            try:
                send_streams(port, streams, rng)
                if broker is not None and not broker.alive():
                    why = f"broker exited with {broker.returncode}\n{broker.log_tail(40)}"
                else:
                    paho_check(port)
            except Exception as error:
                why = "".join(traceback.format_exception(error))
                if broker is not None:
                    why += "\n" + broker.log_tail(40)
            if why:
                result.crashes.append(save_crasher(crashers, "live", pack_streams(streams), why))
                if broker is not None and not broker.alive():
                    broker.start()
                    broker.wait_port(timeout=20)
            done += len(streams)
            result.inputs = done
            if progress is not None:
                progress(done)
        if broker is not None:
            log = broker.log_text()
            if "Traceback" in log:  # an exception the broker survived is still a bug
                result.crashes.append(
                    save_crasher(crashers, "live-log", pack_streams([]), log[-4000:])
                )
    finally:
        if broker is not None:
            broker.stop()
            broker.close()
    result.seconds = time.monotonic() - started
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mcloudtt-fuzz",
        description="Fuzzing of the codec, the connection state machine (core, cluster), or a "
        "live broker over TCP: seeded mutation, or coverage-guided with --engine atheris.",
    )
    parser.add_argument("target", choices=["codec", "core", "cluster", "live"])
    parser.add_argument(
        "--engine",
        choices=["mutation", "atheris"],
        default="mutation",
        help="atheris: coverage-guided (libFuzzer) in a subprocess; codec, core and cluster only",
    )
    parser.add_argument("--max-len", type=int, default=4096, help="atheris: longest input")
    parser.add_argument(
        "--rss-limit-mb", type=int, default=1024, help="atheris: memory bound (a crash above it)"
    )
    parser.add_argument(
        "--work-corpus", type=Path, help="atheris: keep libFuzzer's corpus here between runs"
    )
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, help="extra seed inputs (*.bin files)")
    parser.add_argument("--crashers", type=Path, default=DEFAULT_CRASHERS)
    parser.add_argument("--port", type=int, help="live: fuzz this broker instead of starting one")
    parser.add_argument(
        "--broker-args",
        default="",
        help="live: more options for the broker started, e.g. '--publish-rate 50'",
    )
    args = parser.parse_args(argv)
    if args.engine == "atheris":
        if args.target == "live":
            parser.error("--engine atheris fuzzes codec, core or cluster in process")
        result = fuzz_atheris(
            args.target,
            args.inputs,
            args.seed,
            args.crashers,
            args.corpus,
            max_len=args.max_len,
            rss_limit_mb=args.rss_limit_mb,
            work=args.work_corpus,
        )
        rate = result.inputs / result.seconds if result.seconds else 0.0
        print(
            f"{result.target} (atheris): {result.inputs} inputs in {result.seconds:.1f} s "
            f"({rate:,.0f}/s), cov {result.coverage}, ft {result.features}, "
            f"corpus {result.corpus}, peak RSS {result.peak_rss_mb} MB, "
            f"{len(result.crashes)} crashing"
        )
        for path in result.crashes:
            print(f"  saved {path}")
        return 1 if result.crashes else 0
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"fuzz {args.target}", total=args.inputs)

        def progress(done: int) -> None:
            bar.update(task, completed=done)

        if args.target == "live":
            result = fuzz_live(
                args.inputs,
                args.seed,
                args.crashers,
                args.corpus,
                args.port,
                progress=progress,
                broker_args=shlex.split(args.broker_args),
            )
        else:
            result = fuzz_in_process(
                args.target, args.inputs, args.seed, args.crashers, args.corpus, progress
            )
    rate = result.inputs / result.seconds if result.seconds else 0.0
    print(
        f"{result.target}: {result.inputs} inputs in {result.seconds:.1f} s "
        f"({rate:,.0f}/s), {len(result.crashes)} crashing"
    )
    for path in result.crashes:
        print(f"  saved {path}")
    return 1 if result.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
