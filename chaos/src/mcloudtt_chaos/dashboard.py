"""The dashboard of `mcloudtt up`: one page on 127.0.0.1, live over server-sent events.

- `Sampler` reads every broker's /metrics and /readyz, the adapter's /metrics and each process's
  CPU and memory from /proc once a second, and turns the differences into rates and events
  (broker left or joined, Redis link lost or back, sessions adopted, readiness changes).
- `Canary` publishes a QoS 1 message with a sequence number every second, through each broker
  in turn, and subscribes on every broker: publish-to-delivery latency, and the count of
  acknowledged messages that never arrived (which must stay 0).
- `retained_scan` subscribes to `#` and `$SYS/#` on one broker and keeps what arrives with the RETAIN flag:
  the topic tree's retained messages. The adapter's `/analytics` (DuckDB) adds how many
  messages each topic stored, and the charts (rollups, per-device series, anomalies, stale
  devices); `lookup` asks every broker's `/clients` which one holds a ClientId.
- `DashboardServer` serves the page (its script and SVG charts are in this module: nothing is
  fetched from anywhere), `/state` (the last snapshot, JSON), `/events` (the snapshot every
  second, SSE), `/analytics`, `/topics`, `/client?id=` (or `?prefix=`) and
  `POST /action/<target>/<verb>` (faults, queued for the main thread, which started the
  processes: see `Process.die_with_parent`).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .procs import Metrics, Process, http_get, http_status, scrape

HISTORY = 120  # points kept per chart (seconds)
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

# ------------------------------------------------------------------------------ /proc


def proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds used, resident bytes) of a process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return cpu, int(statm.split()[1]) * _PAGE


# ------------------------------------------------------------------------------ canary


class Canary:
    """QoS 1 probes across the brokers; counts acknowledged messages never delivered."""

    TOPIC = "mcloudtt/canary"

    def __init__(self, ports: list[int], grace: float = 20.0) -> None:
        self.ports = ports
        self.grace = grace  # an acknowledged message not delivered after this long is lost
        self.lock = threading.Lock()
        self.seq = 0
        self.sent_at: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self.delivered: set[int] = set()
        self.acked_seqs: set[int] = set()
        self.latencies: deque[tuple[float, float]] = deque(maxlen=600)  # (when, seconds)
        self.lost: set[int] = set()
        self.mids: dict[tuple[int, int], int] = {}  # (publisher, mid) -> seq
        self.subscribers = [self._client(f"canary-sub-{i}", port) for i, port in enumerate(ports)]
        self.publishers = [self._client(f"canary-pub-{i}", port) for i, port in enumerate(ports)]
        for sub in self.subscribers:
            sub.on_connect = self._subscribe
            sub.on_message = self._delivered
        for index, pub in enumerate(self.publishers):
            pub.on_publish = self._acked(index)
        self._turn = 0

    def _client(self, name: str, port: int) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
        client.reconnect_delay_set(1, 2)
        client.connect_async("127.0.0.1", port, keepalive=5)
        return client

    def start(self) -> None:
        for client in (*self.subscribers, *self.publishers):
            client.loop_start()

    def stop(self) -> None:
        for client in (*self.subscribers, *self.publishers):
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_stop()

    def _subscribe(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self.TOPIC, qos=1)

    def _delivered(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        try:
            probe = json.loads(message.payload)
            seq, sent = int(probe["seq"]), float(probe["sent"])
        except (ValueError, TypeError, KeyError):
            return
        with self.lock:
            if seq in self.delivered:
                return  # one subscriber per broker: every copy after the first
            self.delivered.add(seq)
            self.lost.discard(seq)
            self.latencies.append((now, now - sent))

    def _acked(self, index: int) -> Callable[..., None]:
        def on_publish(client: mqtt.Client, userdata: Any, mid: int, *_: Any) -> None:
            with self.lock:
                seq = self.mids.pop((index, mid), None)
                if seq is not None:
                    self.acked[seq] = time.time()
                    self.acked_seqs.add(seq)

        return on_publish

    def tick(self) -> None:
        """Publish the next probe through the next connected broker; judge the old ones."""
        now = time.time()
        for _ in range(len(self.publishers)):
            index = self._turn % len(self.publishers)
            self._turn += 1
            pub = self.publishers[index]
            if pub.is_connected():
                with self.lock:
                    self.seq += 1
                    seq = self.seq
                    # The simulator's metadata names: the adapter takes `sent` as the event time
                    # and `seq` as an attribute, and charts nothing of it.
                    probe = json.dumps({"seq": seq, "sent": now})
                    info = pub.publish(self.TOPIC, probe, qos=1)
                    self.mids[(index, info.mid)] = seq
                    self.sent_at[seq] = now
                break
        with self.lock:
            for seq, when in list(self.acked.items()):
                if seq in self.delivered:
                    del self.acked[seq]
                elif now - when > self.grace:
                    self.lost.add(seq)

    def figures(self) -> dict[str, Any]:
        now = time.time()
        with self.lock:
            recent = sorted(s for when, s in self.latencies if now - when <= 30)
            return {
                "published": self.seq,
                "acknowledged": len(self.acked_seqs),
                # acknowledged, not delivered yet, not yet judged lost
                "outstanding": len(self.acked_seqs - self.delivered - self.lost),
                "delivered": len(self.delivered),
                "lost": len(self.lost),
                "p50_ms": _quantile(recent, 0.5) * 1000 if recent else None,
                "p99_ms": _quantile(recent, 0.99) * 1000 if recent else None,
                "connected": sum(1 for s in self.subscribers if s.is_connected()),
                "clients": sum(
                    1 for c in (*self.subscribers, *self.publishers) if c.is_connected()
                ),
            }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------------ topics, clients

_scans = 0


def retained_scan(
    port: int, host: str = "127.0.0.1", *, quiet: float = 0.5, timeout: float = 5.0
) -> dict[str, dict[str, Any]] | None:
    """The retained messages a new subscriber to `#` and `$SYS/#` receives, by topic; None
    when the broker does not answer. A retained message sent for a new subscription carries
    RETAIN 1, a live one RETAIN 0 (MQTT-3.3.1-8, MQTT-3.3.1-9), so live traffic is told apart;
    `#` alone would leave out `$SYS/...` (MQTT-4.7.2-1). Done once the retained ones stop
    coming for `quiet` seconds."""
    global _scans
    _scans += 1
    found: dict[str, dict[str, Any]] = {}
    subscribed = threading.Event()
    last = [time.monotonic()]
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"dashboard-topics-{os.getpid()}-{_scans}"
    )

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe([("#", 0), ("$SYS/#", 0)])

    def on_subscribe(*_: Any) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            last[0] = time.monotonic()
            found[message.topic] = {
                "payload": message.payload[:200].decode(errors="replace"),
                "bytes": len(message.payload),
                "qos": message.qos,
            }

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=10)
    except OSError:
        return None
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        if not subscribed.wait(timeout):
            return None
        while time.monotonic() - last[0] < quiet and time.monotonic() < deadline:
            time.sleep(0.05)
        return dict(found)
    finally:
        client.disconnect()
        client.loop_stop()


def topic_table(
    retained: dict[str, dict[str, Any]], stored: list[list[Any]]
) -> list[dict[str, Any]]:
    """One row per topic: its retained message (if any) and the messages DuckDB stored."""
    counts = {str(topic): int(n) for topic, n in stored}
    rows = []
    for topic in sorted(set(retained) | set(counts)):
        row: dict[str, Any] = {"topic": topic, "stored": counts.get(topic, 0)}
        if topic in retained:
            row["retained"] = retained[topic]
        rows.append(row)
    return rows


def lookup(brokers: list[tuple[str, int]], client_id: str) -> dict[str, Any]:
    """Ask every broker's `/clients?id=`: which one holds the ClientId (connected there), and
    its session as that broker has it."""
    answers = []
    for name, http_port in brokers:
        try:
            status, body = http_get(http_port, f"/clients?id={quote(client_id)}", timeout=1.0)
        except OSError:
            answers.append({"broker": name, "reachable": False})
            continue
        if status == 200:
            answers.append({**json.loads(body), "broker": name, "reachable": True})
    holders = [a for a in answers if a.get("connected")]
    found = [a for a in answers if a.get("found")]
    best = holders[0] if holders else found[0] if found else None
    return {
        "client_id": client_id,
        "holder": best["broker"] if best is not None else None,
        "connected": bool(holders),
        "session": best,
        "brokers": answers,
    }


def client_ids(brokers: list[tuple[str, int]], prefix: str) -> list[list[str]]:
    """[ClientId, broker] for the ClientIds starting with `prefix`, from every broker."""
    out: list[list[str]] = []
    for name, http_port in brokers:
        with contextlib.suppress(OSError, ValueError):
            status, body = http_get(http_port, f"/clients?prefix={quote(prefix)}", timeout=1.0)
            if status == 200:
                out += [[c, name] for c in json.loads(body)["clients"]]
    return sorted(out)[:50]


# ------------------------------------------------------------------------------ sampler


def adapter_figures(metrics: Metrics) -> dict[str, float]:
    """The adapter's headline numbers (the dashboard's and the terminal's). Lag is its own
    gauge (now minus the newest committed event time), not a sum over the commit-latency
    histogram's series."""
    return {
        "rows_out_total": metrics.total("mcloudtt_adapter_rows_out_total"),
        "pending": metrics.value("mcloudtt_adapter_pending"),
        "lag_seconds": metrics.value("mcloudtt_adapter_event_lag_seconds"),
        "sink_errors_total": metrics.total("mcloudtt_adapter_sink_errors_total"),
    }


class Watched(Protocol):
    """What the sampler watches: a `LocalCluster`, or `upkind.KindTargets`."""

    services: list[Any]
    redis_port: int


@dataclass
class Sampler:
    """Snapshots of the whole system, once a second, and the events between them."""

    cluster: Watched
    adapter_http: int | None = None
    fleet: Process | None = None
    canary: Canary | None = None
    redis_state: str = "running"  # set by the fault actions: running, stopped, frozen
    snapshot: dict[str, Any] = field(default_factory=dict)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))
    history: dict[str, deque[Any]] = field(default_factory=dict)
    _before: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    analytics: dict[str, Any] | None = None  # the adapter's /analytics, refreshed every 5 s
    topics: dict[str, Any] | None = None  # the last topic tree ({"t", "broker", "rows"})
    host: str = "127.0.0.1"  # where the brokers and the adapter are reached

    def broker_http(self) -> list[tuple[str, int]]:
        return [(s.name, s.http_port) for s in self.brokers() if s.http_port is not None]

    def refresh_analytics(self) -> dict[str, Any] | None:
        if self.adapter_http is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            status, body = http_get(self.adapter_http, "/analytics", timeout=10.0, host=self.host)
            if status == 200:
                self.analytics = {"t": time.time(), **json.loads(body)}
        return self.analytics

    def refresh_topics(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The retained messages as the first ready broker has them, beside DuckDB's counts;
        `timeout` bounds the whole scan, whichever brokers fail to answer."""
        deadline = time.monotonic() + timeout
        stored = (self.analytics or {}).get("topics", [])
        for service in self.brokers():
            snapshot = next(
                (b for b in self.snapshot.get("brokers", []) if b["name"] == service.name), None
            )
            if service.port is None or (snapshot is not None and not snapshot["ready"]):
                continue
            left = deadline - time.monotonic()
            if left <= 0.5:
                break
            retained = retained_scan(service.port, self.host, timeout=left)
            if retained is not None:
                self.topics = {
                    "t": time.time(),
                    "broker": service.name,
                    "retained": len(retained),
                    "rows": topic_table(retained, stored),
                }
                break
        return self.topics

    def event(self, text: str, level: str = "info") -> None:
        self.events.appendleft({"t": time.time(), "text": text, "level": level})

    def _keep(self, name: str, value: Any) -> None:
        self.history.setdefault(name, deque(maxlen=HISTORY)).append(value)

    def brokers(self) -> list[Process]:
        return [s for s in self.cluster.services if s.name.startswith("broker-")]

    def sample(self) -> dict[str, Any]:
        now = time.time()
        brokers = [self._broker(service, now) for service in self.brokers()]
        adapter = self._adapter(now) if self.adapter_http is not None else None
        canary = self.canary.figures() if self.canary is not None else None
        if canary is not None:
            self._keep("canary", [now, canary["p50_ms"], canary["p99_ms"]])
        self._keep("rates", [now, *[b["in_rate"] for b in brokers]])
        if adapter is not None:
            self._keep("adapter", [now, adapter["rows_rate"], adapter["lag_s"]])
        redis = next((s for s in self.cluster.services if s.name == "redis"), None)
        self.snapshot = {
            "t": now,
            "elapsed": now - self.started,
            "brokers": brokers,
            "redis": {
                "port": self.cluster.redis_port,
                "where": getattr(
                    self.cluster, "redis_where", f"127.0.0.1:{self.cluster.redis_port}"
                ),
                "state": self.redis_state if redis is not None and redis.alive() else "stopped",
            },
            "adapter": adapter,
            "adapter_http": self.adapter_http,
            "fleet": {
                "running": self.fleet is not None and self.fleet.alive(),
                "connections": sum(b["connections"] for b in brokers),
                # every connection but the canary's own clients
                "devices": max(
                    0, sum(b["connections"] for b in brokers) - (canary or {}).get("clients", 0)
                ),
                "kinds": (self.analytics or {}).get("kinds", []),
                "in_rate": sum(b["in_rate"] for b in brokers),
            },
            "canary": canary,
            "events": list(self.events)[:50],
            "history": {name: list(values) for name, values in self.history.items()},
        }
        return self.snapshot

    def _broker(self, service: Process, now: float) -> dict[str, Any]:
        name = service.name
        before = self._before.get(name, {})
        alive = service.alive()
        metrics: Metrics | None = None
        if alive and service.http_port is not None:
            with contextlib.suppress(OSError):
                metrics = scrape(service.http_port, timeout=0.5)
        ready = (
            alive
            and service.http_port is not None
            and http_status(service.http_port, "/readyz", timeout=0.5) == 200
        )
        out: dict[str, Any] = {
            "name": name,
            "mqtt": f"127.0.0.1:{service.port}",
            "http": service.http_port,
            "up": metrics is not None,
            "ready": ready,
            "state": "ready" if ready else "up" if metrics is not None else "down",
        }
        m = metrics or Metrics()
        counters = {
            "in": m.total("mcloudtt_messages_received_total"),
            "out": m.total("mcloudtt_messages_sent_total"),
            "adopted": m.value("mcloudtt_cluster_sessions_adopted_total"),
            "restored": m.value("mcloudtt_cluster_sessions_restored_total"),
            "handovers": m.value("mcloudtt_cluster_handovers_total"),
            "link_losses": m.value("mcloudtt_cluster_link_losses_total"),
            "connects": m.value("mcloudtt_cluster_connects_total"),
        }
        seconds = now - float(before.get("t", now))
        usage = proc_usage(service.pid) if alive else None

        def rate(key: str) -> float:
            if metrics is None or key not in before or seconds <= 0:
                return 0.0
            return max(0.0, (counters[key] - float(before[key])) / seconds)

        cpu = 0.0
        if usage is not None and "cpu" in before and seconds > 0:
            cpu = max(0.0, (usage[0] - before["cpu"]) / seconds * 100)
        link = m.get(("mcloudtt_cluster_link_up", ())) if metrics is not None else None
        drops = {
            dict(labels).get("reason", "?"): value
            for (n, labels), value in m.items()
            if n in ("mcloudtt_messages_dropped_total", "mcloudtt_cluster_dropped_total")
        }
        out.update(
            connections=m.value("mcloudtt_connections"),
            sessions=m.value("mcloudtt_sessions"),
            subscriptions=m.value("mcloudtt_subscriptions"),
            retained=m.value("mcloudtt_retained_messages"),
            queued=m.value("mcloudtt_queued_messages"),
            inflight=m.value("mcloudtt_inflight_messages"),
            peers=m.value("mcloudtt_cluster_peers"),
            in_rate=rate("in"),
            out_rate=rate("out"),
            drops={reason: value for reason, value in drops.items() if value},
            redis_link="up" if link == 1 else "down" if link == 0 else "?",
            redis_reconnects=counters["link_losses"],
            adopted=counters["adopted"],
            handovers=counters["handovers"],
            cpu_pct=cpu,
            rss_mb=usage[1] / 2**20 if usage is not None else 0.0,
        )
        self._events(name, before, out, counters)
        if metrics is not None:
            self._before[name] = {**counters, "t": now, "state": out["state"], "link": link}
        else:
            self._before[name] = {"t": now, "state": out["state"], "link": link}
        if usage is not None:
            self._before[name]["cpu"] = usage[0]
        return out

    def _events(
        self, name: str, before: dict[str, Any], out: dict[str, Any], counters: dict[str, float]
    ) -> None:
        was = before.get("state")
        state = out["state"]
        if was is None:
            return
        if was == "down" and state != "down":
            self.event(f"{name} joined (serving /metrics again)", "good")
        elif was != "down" and state == "down":
            self.event(f"{name} left (no answer)", "bad")
        if was != state and "down" not in (was, state):
            good = state == "ready"
            self.event(f"{name} {'ready' if good else 'not ready'}", "good" if good else "bad")
        link = out["redis_link"]
        old_link = before.get("link")
        if old_link == 1 and link == "down":
            self.event(f"{name}: Redis link down", "bad")
        elif old_link == 0 and link == "up":
            self.event(f"{name}: Redis link up again", "good")
        if "adopted" in before and counters["adopted"] > before["adopted"]:
            n = counters["adopted"] - before["adopted"]
            self.event(f"{name} adopted {n:.0f} session(s) from a lost broker")
        if "handovers" in before and counters["handovers"] > before["handovers"]:
            n = counters["handovers"] - before["handovers"]
            self.event(f"{name} took over {n:.0f} session(s) from the broker its client left")
        if "restored" in before and counters["restored"] > before["restored"]:
            n = counters["restored"] - before["restored"]
            self.event(f"{name} restored {n:.0f} persistent session(s) from Redis")

    def _adapter(self, now: float) -> dict[str, Any]:
        assert self.adapter_http is not None
        metrics = None
        with contextlib.suppress(OSError):
            metrics = scrape(self.adapter_http, timeout=0.5)
        figures = adapter_figures(metrics or Metrics())
        before = self._before.get("adapter")
        rows = figures["rows_out_total"]
        rate = 0.0
        if before is not None and now > before["t"] and metrics is not None:
            rate = max(0.0, (rows - before["rows"]) / (now - before["t"]))
        if metrics is not None:
            self._before["adapter"] = {"t": now, "rows": rows}
        return {
            "up": metrics is not None,
            "rows": rows,
            "rows_rate": rate,
            "pending": figures["pending"],
            "lag_s": figures["lag_seconds"],
            "sink_errors": figures["sink_errors_total"],
        }


# ------------------------------------------------------------------------------ HTTP

Action = tuple[str, str]  # (target, verb): ("broker-2", "kill"), ("redis", "freeze")
VERBS = {"broker": ("kill", "restart", "stop"), "redis": ("stop", "start", "freeze", "thaw")}


class DashboardServer:
    """The page, its data and its buttons, served from a thread."""

    def __init__(self, sampler: Sampler, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.sampler = sampler
        self.actions: queue.Queue[Action] = queue.Queue()
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # the terminal shows the live table

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _json(self, value: Any) -> None:
                self._send(200, json.dumps(value).encode(), "application/json")

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = dict(parse_qsl(url.query))
                sampler = server.sampler
                if url.path == "/":
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif url.path == "/state":
                    self._json(sampler.snapshot)
                elif url.path == "/analytics":
                    self._json(sampler.analytics)
                elif url.path == "/topics":
                    # A fresh scan when asked to, or when the last is older than 5 s.
                    last = sampler.topics
                    if "fresh" in query or last is None or time.time() - last["t"] > 5:
                        last = sampler.refresh_topics()
                    self._json(last)
                elif url.path == "/client" and "id" in query:
                    self._json(lookup(sampler.broker_http(), query["id"]))
                elif url.path == "/client":
                    self._json(client_ids(sampler.broker_http(), query.get("prefix", "")))
                elif url.path == "/favicon.ico":
                    self._send(204, b"", "image/x-icon")
                elif url.path == "/events":
                    self._events()
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _events(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                last = 0.0
                with contextlib.suppress(OSError):
                    while not server.stopping.is_set():
                        snapshot = server.sampler.snapshot
                        if snapshot and snapshot["t"] != last:
                            last = snapshot["t"]
                            self.wfile.write(f"data: {json.dumps(snapshot)}\n\n".encode())
                            self.wfile.flush()
                        time.sleep(0.2)

            def do_POST(self) -> None:
                parts = self.path.strip("/").split("/")
                if len(parts) == 3 and parts[0] == "action":
                    target, verb = parts[1], parts[2]
                    kind = "broker" if target.startswith("broker-") else target
                    if verb in VERBS.get(kind, ()):
                        server.actions.put((target, verb))
                        self._send(202, b"queued\n", "text/plain")
                        return
                self._send(404, b"no such action\n", "text/plain")

        return Handler


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MCloudTT</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;background:#f6f7f9;color:#222}
h1{font-size:20px;margin:0 0 8px} h2{font-size:15px;margin:16px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:3px solid #ccc;border-radius:8px;padding:8px 12px;min-width:220px}
.card.ready{border-color:#2a9d3a}.card.up{border-color:#e0a000}.card.down{border-color:#d62828;background:#fde8e8}
.card h3{margin:0 0 4px;font-size:15px} .kv{display:grid;grid-template-columns:auto auto;gap:0 12px}
.kv span:nth-child(even){text-align:right;font-variant-numeric:tabular-nums}
button{margin:4px 4px 0 0} .bad{color:#d62828}.good{color:#2a9d3a}
#lost.zero{color:#2a9d3a} #lost{font-size:22px;font-weight:bold;color:#d62828}
#log{background:#fff;border:1px solid #ccc;height:180px;overflow:auto;padding:4px 8px;font:12px monospace}
svg{background:#fff;border:1px solid #ccc}
table.t{border-collapse:collapse;background:#fff;font-size:12px} table.t td,table.t th{border:1px solid #ddd;padding:2px 6px;text-align:left}
#topics{background:#fff;border:1px solid #ccc;max-height:360px;overflow:auto;padding:4px 8px;font:12px monospace}
#topics details{margin-left:14px} #topics .leaf{margin-left:14px} .ret{color:#1f5fa8}
.small{font-size:12px;color:#555}
</style></head><body>
<h1>MCloudTT on this machine <small id="elapsed"></small></h1>
<div id="status">connecting…</div>
<h2>Cluster</h2><div class="cards" id="brokers"></div>
<h2>Redis</h2><div class="cards"><div class="card" id="redis"></div></div>
<h2>Canary (QoS 1, every second, across brokers)</h2>
<div class="cards"><div class="card"><div class="kv" id="canary"></div>
<div>acknowledged messages lost: <span id="lost">?</span></div></div>
<svg id="latency" width="520" height="160"></svg></div>
<h2>Traffic</h2><svg id="rates" width="520" height="160"></svg>
<h2>Adapter → DuckDB</h2><div class="cards"><div class="card"><div class="kv" id="adapter"></div></div>
<svg id="adapterchart" width="520" height="160"></svg></div>
<h2>Fleet</h2><div class="cards"><div class="card"><div class="kv" id="fleet"></div></div></div>
<h2>Events</h2><div id="log"></div>
<h2>Analytics <small>(DuckDB through the adapter, the last 10 minutes of event time)</small> <small id="an-asof"></small></h2>
<div class="cards"><div class="card"><div class="kv" id="an-overview"></div></div>
<div><div class="small">stored messages/s, by event time</div><svg id="an-rate" width="520" height="160"></svg></div></div>
<h3>Rollups per minute, all devices (mean; band: min to max)</h3><div class="cards" id="an-rollups"></div>
<h3>Per-device measurements (the busiest devices) <small class="an-recent"></small></h3><div class="cards" id="an-series"></div>
<h3>Anomalies (<span id="an-anomaly-count">0</span>) <small class="an-recent"></small></h3><table class="t" id="an-anomalies"></table>
<h3>Stale devices (<span id="an-stale-count">0</span>)</h3><table class="t" id="an-stale"></table>
<h2>Topics <button id="topics-refresh">refresh</button> <small id="topics-meta"></small></h2>
<div id="topics"></div>
<h2>Client lookup</h2>
<input id="client-id" list="client-ids" placeholder="ClientId (type its start)" size="40"><datalist id="client-ids"></datalist>
<button id="client-find">find</button><div id="client-result"></div>
<script>
"use strict";
const COLORS=["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b"];
function fmt(v,d){if(v===null||v===undefined)return"-";return Number(v).toLocaleString(undefined,{maximumFractionDigits:d||0});}
function kv(el,pairs){el.innerHTML=pairs.map(p=>`<span>${p[0]}</span><span>${p[1]}</span>`).join("");}
function act(target,verb){fetch(`/action/${target}/${verb}`,{method:"POST"});}
// A line chart in SVG: rows are [t, y1, y2, ...]; nothing to load from anywhere.
function chart(id,rows,names){
  const svg=document.getElementById(id),W=+svg.getAttribute("width"),H=+svg.getAttribute("height");
  const L=50,B=18,R=8,T=8;let s="";
  if(!rows||rows.length<2){svg.innerHTML="";return;}
  const t0=rows[0][0],t1=rows[rows.length-1][0];let ymax=0;
  rows.forEach(r=>r.slice(1).forEach(v=>{if(v!==null&&v>ymax)ymax=v;}));ymax=ymax||1;
  const x=t=>L+(W-L-R)*(t-t0)/((t1-t0)||1),y=v=>H-B-(H-B-T)*v/ymax;
  s+=`<text x="4" y="${T+8}" font-size="10">${fmt(ymax,1)}</text><text x="4" y="${H-B}" font-size="10">0</text>`;
  s+=`<line x1="${L}" y1="${H-B}" x2="${W-R}" y2="${H-B}" stroke="#999"/>`;
  for(let k=1;k<rows[0].length;k++){
    const pts=rows.filter(r=>r[k]!==null).map(r=>`${x(r[0]).toFixed(1)},${y(r[k]).toFixed(1)}`).join(" ");
    s+=`<polyline fill="none" stroke="${COLORS[(k-1)%6]}" stroke-width="1.5" points="${pts}"/>`;
    s+=`<text x="${L+6+90*(k-1)}" y="${H-4}" font-size="10" fill="${COLORS[(k-1)%6]}">${names[k-1]||""}</text>`;
  }
  svg.innerHTML=s;
}
function render(d){
  document.getElementById("status").textContent="live";
  document.getElementById("elapsed").textContent=`— ${fmt(d.elapsed)} s`;
  document.getElementById("brokers").innerHTML=d.brokers.map(b=>{
    const drops=Object.entries(b.drops).map(e=>`${e[0]} ${fmt(e[1])}`).join(", ")||"none";
    return `<div class="card ${b.state}" id="card-${b.name}" data-state="${b.state}"><h3>${b.name} <small>${b.mqtt}</small> — <span class="state">${b.state}</span></h3><div class="kv">`+
    [["connections",fmt(b.connections)],["sessions",fmt(b.sessions)],["subscriptions",fmt(b.subscriptions)],
     ["in msg/s",fmt(b.in_rate,1)],["out msg/s",fmt(b.out_rate,1)],["queued / inflight",`${fmt(b.queued)} / ${fmt(b.inflight)}`],
     ["drops",drops],["peers",fmt(b.peers)],["Redis link",b.redis_link],["Redis reconnects",fmt(b.redis_reconnects)],
     ["sessions adopted",fmt(b.adopted)],["takeovers",fmt(b.handovers)],["CPU %",fmt(b.cpu_pct,1)],["memory MB",fmt(b.rss_mb,1)]]
    .map(p=>`<span>${p[0]}</span><span>${p[1]}</span>`).join("")+
    `</div><button id="kill-${b.name}" onclick="act('${b.name}','kill')">kill</button>`+
    `<button id="restart-${b.name}" onclick="act('${b.name}','restart')">restart</button></div>`;}).join("");
  const r=document.getElementById("redis");r.className="card "+(d.redis.state==="running"?"ready":d.redis.state==="frozen"?"up":"down");
  r.innerHTML=`<h3>redis <small>${esc(d.redis.where||"")}</small> — <span id="redis-state">${d.redis.state}</span></h3>`+
    ["stop","start","freeze","thaw"].map(v=>`<button id="redis-${v}" onclick="act('redis','${v}')">${v}</button>`).join("");
  if(d.canary){kv(document.getElementById("canary"),[["published",fmt(d.canary.published)],["acknowledged",fmt(d.canary.acknowledged)],["delivered",fmt(d.canary.delivered)],
    ["p50 ms",fmt(d.canary.p50_ms,1)],["p99 ms",fmt(d.canary.p99_ms,1)],["subscribers connected",fmt(d.canary.connected)]]);
    const l=document.getElementById("lost");l.textContent=d.canary.lost;l.className=d.canary.lost===0?"zero":"";}
  if(d.adapter){kv(document.getElementById("adapter"),[["state",d.adapter.up?"up":"down"],["rows stored",fmt(d.adapter.rows)],
    ["rows/s",fmt(d.adapter.rows_rate,1)],["pending",fmt(d.adapter.pending)],["lag s",fmt(d.adapter.lag_s,3)],["sink errors",fmt(d.adapter.sink_errors)]]);}
  kv(document.getElementById("fleet"),[["simulator",d.fleet.running?"running":"stopped"],["devices connected",fmt(d.fleet.devices)],
    ["connections (all brokers)",fmt(d.fleet.connections)],["msg/s into the cluster",fmt(d.fleet.in_rate,1)],
    ...d.fleet.kinds.map(k=>[`stored "${esc(k[0])}" messages (10 min)`,fmt(k[1])])]);
  chart("latency",d.history.canary,["p50 ms","p99 ms"]);
  chart("rates",d.history.rates,d.brokers.map(b=>b.name+" in/s"));
  chart("adapterchart",d.history.adapter,["rows/s","lag s"]);
  document.getElementById("log").innerHTML=d.events.map(e=>`<div class="${e.level}">${new Date(e.t*1000).toLocaleTimeString()} ${e.text}</div>`).join("");
}

function esc(t){return String(t).replace(/[&<>"']/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"})[c]);}
function hms(t){return t?new Date(t*1000).toLocaleTimeString():"-";}
// Lines (and min-max bands) over time in SVG. series: [{name, pts:[[t,y]], band:[[t,lo,hi]]}].
function lines(svg,series,unit){
  const W=+svg.getAttribute("width"),H=+svg.getAttribute("height"),L=58,B=20,R=8,T=10;
  const ts=[],ys=[];
  series.forEach(s=>{(s.pts||[]).forEach(p=>{if(p[1]!==null){ts.push(p[0]);ys.push(p[1]);}});
    (s.band||[]).forEach(p=>{ts.push(p[0]);ys.push(p[1],p[2]);});});
  if(!ts.length){svg.innerHTML='<text x="10" y="20" font-size="12">no data yet</text>';return;}
  let t0=Math.min(...ts),t1=Math.max(...ts),y0=Math.min(...ys),y1=Math.max(...ys);
  if(y1===y0){y0-=1;y1+=1;}const pad=(y1-y0)*0.05;y0-=pad;y1+=pad;
  const x=t=>L+(W-L-R)*(t-t0)/((t1-t0)||1),y=v=>H-B-(H-B-T)*(v-y0)/(y1-y0);
  let s=`<text x="2" y="${T+8}" font-size="10">${fmt(y1,2)}</text><text x="2" y="${H-B}" font-size="10">${fmt(y0,2)}</text>`;
  s+=`<text x="2" y="${(H-B+T)/2}" font-size="10">${esc(unit||"")}</text>`;
  s+=`<text x="${L}" y="${H-6}" font-size="10">${hms(t0)}</text><text x="${W-R-50}" y="${H-6}" font-size="10">${hms(t1)}</text>`;
  s+=`<line x1="${L}" y1="${H-B}" x2="${W-R}" y2="${H-B}" stroke="#999"/>`;
  series.forEach((ser,k)=>{const c=COLORS[k%6];
    if(ser.band&&ser.band.length){const up=ser.band.map(p=>`${x(p[0]).toFixed(1)},${y(p[2]).toFixed(1)}`);
      const down=ser.band.slice().reverse().map(p=>`${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
      s+=`<polygon class="band" fill="${c}" fill-opacity="0.15" stroke="none" points="${up.concat(down).join(" ")}"/>`;}
    const pts=(ser.pts||[]).filter(p=>p[1]!==null);
    if(pts.length===1)s+=`<circle cx="${x(pts[0][0])}" cy="${y(pts[0][1])}" r="3" fill="${c}"/>`;
    s+=`<polyline class="line" data-name="${esc(ser.name)}" data-points="${pts.length}" fill="none" stroke="${c}" stroke-width="1.5" points="${pts.map(p=>`${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}"/>`;
    s+=`<text x="${L+6+110*k}" y="${T+8}" font-size="10" fill="${c}">${esc(ser.name)}</text>`;});
  svg.innerHTML=s;
}
function chartCard(kind,metric,title,series,unit){
  const div=document.createElement("div");
  div.innerHTML=`<div class="small">${esc(title)}</div><svg class="chart" data-kind="${kind}" data-metric="${esc(metric)}" width="440" height="170"></svg>`;
  lines(div.querySelector("svg"),series,unit);return div;
}
function table(el,head,rows){el.innerHTML="<tr>"+head.map(h=>`<th>${esc(h)}</th>`).join("")+"</tr>"+
  rows.map(r=>"<tr>"+r.map(v=>`<td>${esc(v)}</td>`).join("")+"</tr>").join("");}
function renderAnalytics(a){
  if(!a)return;const ov=a.overview,units=a.units||{},u=m=>units[m]||"";
  document.getElementById("an-asof").textContent=`updated ${hms(a.t)}`;
  kv(document.getElementById("an-overview"),[["messages stored (all)",fmt(a.total_messages)],["in the window",fmt(ov.messages)],
    ["devices",fmt(ov.devices)],["topics",fmt(ov.topics)],["newest event",hms(ov.last_event)],["anomalies",fmt(a.anomaly_count)],["stale devices",fmt(a.stale.length)]]);
  lines(document.getElementById("an-rate"),[{name:"messages/s",pts:a.rate}],"msg/s");
  const roll=document.getElementById("an-rollups");roll.innerHTML="";
  Object.entries(a.rollups).forEach(([m,rows])=>roll.appendChild(chartCard("rollup",m,`${m}${u(m)?" ("+u(m)+")":""}`,
    [{name:`${m} mean`,pts:rows.map(r=>[r[0],r[1]]),band:rows.map(r=>[r[0],r[2],r[3]])}],u(m))));
  const ser=document.getElementById("an-series");ser.innerHTML="";
  Object.entries(a.series).forEach(([m,per])=>ser.appendChild(chartCard("series",m,`${m}${u(m)?" ("+u(m)+")":""} per device`,
    Object.entries(per).map(([d,pts])=>({name:d,pts:pts})),u(m))));
  document.getElementById("an-anomaly-count").textContent=a.anomaly_count;
  document.querySelectorAll(".an-recent").forEach(e=>e.textContent=a.recent_since?`events since ${hms(a.recent_since)} (the newest 50,000 at most)`:"");
  table(document.getElementById("an-anomalies"),["time","device","metric","value","kind","score"],
    a.anomalies.slice().reverse().slice(0,20).map(r=>[hms(r.t),r.device_id,r.metric,`${fmt(r.value,2)} ${u(r.metric)}`,r.kind,fmt(r.score,2)]));
  document.getElementById("an-stale-count").textContent=a.stale.length;
  table(document.getElementById("an-stale"),["device","silent s","last seen","messages"],
    a.stale.slice(0,20).map(r=>[r.device_id,fmt(r.silent_s,1),hms(r.last_seen),fmt(r.messages)]));
}
// The topic tree: levels as nested <details>, each topic a leaf with its stored count and
// retained message.
function renderTopics(d){
  const el=document.getElementById("topics");if(!d){el.textContent="no broker answered";return;}
  document.getElementById("topics-meta").textContent=`${d.rows.length} topics, ${d.retained} retained (as ${d.broker} has them, ${hms(d.t)})`;
  const root={kids:{},rows:[]};
  d.rows.forEach(r=>{let n=root;r.topic.split("/").forEach(p=>{n=n.kids[p]=n.kids[p]||{kids:{},rows:[]};n.rows.push(r);});n.leaf=r;});
  const open=new Set([...el.querySelectorAll("details[open]")].map(e=>e.dataset.path));
  function node(name,n,path,depth){
    const kids=Object.keys(n.kids).sort();let out="";
    if(n.leaf){const r=n.leaf;out+=`<div class="leaf${r.retained?" retained":""}" data-topic="${esc(r.topic)}">${esc(name)} · stored ${fmt(r.stored)}`+
      (r.retained?` · <span class="ret">retained: ${esc(r.retained.payload)}</span>`:"")+"</div>";}
    if(!kids.length)return out;
    const ret=n.rows.filter(r=>r.retained).length,isOpen=depth<1||open.has(path);
    return out+`<details data-path="${esc(path)}"${isOpen?" open":""}><summary>${esc(name)}/ <span class="small">${n.rows.length} topics, ${ret} retained</span></summary>`+
      kids.map(k=>node(k,n.kids[k],path+"/"+k,depth+1)).join("")+"</details>";
  }
  el.innerHTML=Object.keys(root.kids).sort().map(k=>node(k,root.kids[k],k,0)).join("");
}
function loadTopics(fresh){fetch("/topics"+(fresh?"?fresh=1":"")).then(r=>r.json()).then(renderTopics);}
function renderClient(c){
  const el=document.getElementById("client-result");
  if(!c.session){el.innerHTML=`<p id="client-holder" data-holder="">${esc(c.client_id)}: no session on any broker</p>`;return;}
  const s=c.session;
  el.innerHTML=`<p id="client-holder" data-holder="${esc(c.holder)}">${esc(c.client_id)} is ${c.connected?"connected to":"kept (offline) by"} <b>${esc(c.holder)}</b></p>`+
    `<table class="t" id="client-session"><tr><th>protocol</th><th>session expiry s</th><th>inflight</th><th>queued</th><th>awaiting PUBREL</th></tr>`+
    `<tr><td>${esc(s.protocol)}</td><td>${fmt(s.expiry_interval)}</td><td id="client-inflight">${fmt(s.inflight)}</td><td>${fmt(s.queued)}</td><td>${fmt(s.awaiting_release)}</td></tr></table>`+
    `<div class="small">subscriptions</div><table class="t" id="client-subs"><tr><th>filter</th><th>QoS</th></tr>`+
    s.subscriptions.map(x=>`<tr><td>${esc(x.filter)}</td><td>${x.qos}</td></tr>`).join("")+"</table>"+
    `<div class="small">asked: ${c.brokers.map(b=>`${esc(b.broker)} ${b.reachable===false?"(down)":b.found?"has it":"-"}`).join(", ")}</div>`;
}
function findClient(){const id=document.getElementById("client-id").value;if(!id)return;
  fetch("/client?id="+encodeURIComponent(id)).then(r=>r.json()).then(renderClient);}
document.getElementById("client-find").onclick=findClient;
document.getElementById("client-id").addEventListener("keydown",e=>{if(e.key==="Enter")findClient();});
document.getElementById("client-id").addEventListener("input",e=>{
  fetch("/client?prefix="+encodeURIComponent(e.target.value)).then(r=>r.json()).then(ids=>{
    document.getElementById("client-ids").innerHTML=ids.map(p=>`<option value="${esc(p[0])}">${esc(p[1])}</option>`).join("");});});
document.getElementById("topics-refresh").onclick=()=>loadTopics(true);
const FINAL=null;
if(FINAL){render(FINAL);renderAnalytics(FINAL.analytics);renderTopics(FINAL.topics);
  document.getElementById("status").textContent="final state (saved at the end of the run)";
  document.querySelectorAll("button,input").forEach(b=>b.disabled=true);}
else{const source=new EventSource("/events");
source.onmessage=m=>render(JSON.parse(m.data));
source.onerror=()=>{document.getElementById("status").textContent="disconnected (mcloudtt up stopped?)";};
const analytics=()=>fetch("/analytics").then(r=>r.json()).then(renderAnalytics).catch(()=>{});
analytics();setInterval(analytics,5000);loadTopics(false);setInterval(()=>loadTopics(false),15000);}
</script></body></html>
"""


def final_page(snapshot: dict[str, Any]) -> str:
    """The page frozen at `snapshot`: the dashboard's last state, kept beside the report."""
    data = json.dumps(snapshot).replace("</", "<\\/")  # no "</script>" inside the script
    return PAGE.replace("const FINAL=null;", f"const FINAL={data};", 1)
