"""Head to head of clusters on one Redis: MCloudTT with 1, 2, 3 brokers against Aedes with 1, 2, 3
nodes (`mqemitter-redis` + `aedes-persistence-redis`), with the same generator.

Each figure is a fan-in (4 publishers, 100-byte payloads, one `sensors/+/temp` subscriber,
publishers paused above 2,000 in flight) with the publishers on the first node and the
subscriber on the last one, so from 2 nodes on every message crosses Redis. A fresh Redis and
fresh nodes for each system and size; QoS 0 then QoS 1 on the same cluster.

Aedes is installed with npm into a cache folder (`~/.cache/mcloudtt/aedes`) on first use, when
Node.js and npm are present; without them it is skipped with a line saying so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import io
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mcloudtt_chaos.procs import Process, RedisServer, free_port, scrape

from .brokers import BrokerUnavailable
from .cluster_bench import cluster, fanin

AEDES_PACKAGES = {"aedes": "1.2.0", "mqemitter-redis": "7.2.1", "aedes-persistence-redis": "11.2.2"}
NODE_SCRIPT = Path(__file__).resolve().parents[2] / "aedes" / "node.mjs"
SYSTEMS = ("mcloudtt", "aedes")
# The target: cross-broker QoS 1 fan-in at least 3x Aedes's, at 2 and 3 nodes.
QOS1_TARGET = 3.0


def aedes_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mcloudtt" / "aedes"


def _installed_version(modules: Path, package: str) -> str | None:
    try:
        return str(json.loads((modules / package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def prepare_aedes(cache: Path | None = None) -> tuple[Path, dict[str, str]]:
    """The node_modules folder holding the pinned Aedes packages (installed if missing) and the
    versions (Node.js included); BrokerUnavailable with the reason when it cannot be had."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise BrokerUnavailable(
            "Node.js and npm are not installed (Debian: apt-get install -y nodejs npm)"
        )
    if not NODE_SCRIPT.is_file():
        raise BrokerUnavailable(f"the Aedes node script is missing: {NODE_SCRIPT}")
    cache = cache or aedes_cache_dir()
    modules = cache / "node_modules"
    if any(_installed_version(modules, p) != v for p, v in AEDES_PACKAGES.items()):
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund"]
        cmd += ["--loglevel=error", *(f"{p}@{v}" for p, v in AEDES_PACKAGES.items())]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as e:
            raise BrokerUnavailable("npm install of Aedes timed out") from e
        if done.returncode != 0:
            raise BrokerUnavailable(f"npm install of Aedes failed: {done.stderr.strip()[-500:]}")
    node_version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    versions = {p: _installed_version(modules, p) or "?" for p in AEDES_PACKAGES}
    versions["node"] = node_version.strip()
    return modules, versions


class AedesNode(Process):
    def __init__(self, modules: Path, redis_port: int, node_id: str) -> None:
        port = free_port()
        node = shutil.which("node") or "node"
        cmd = [node, str(NODE_SCRIPT), "--modules", str(modules), "--port", str(port)]
        cmd += ["--redis-port", str(redis_port), "--id", node_id]
        super().__init__(cmd, name=node_id, port=port)
        self.port: int = port


@contextlib.contextmanager
def aedes_cluster(modules: Path, size: int) -> Iterator[list[AedesNode]]:
    redis = RedisServer()
    redis.start(timeout=20)
    nodes: list[AedesNode] = []
    try:
        for index in range(size):
            nodes.append(AedesNode(modules, redis.port, f"bench-aedes-{index}").start())
        for node in nodes:
            node.wait_log("ready", timeout=30)
        yield nodes
    finally:
        for node in nodes:
            node.close()
        redis.close()


def _measure(
    pub_port: int,
    sub_port: int,
    pids: list[int],
    warmup: float,
    duration: float,
    wait_table: int | None,
) -> dict[str, float]:
    out: dict[str, float] = {}
    for qos in (0, 1):
        r = asyncio.run(fanin(pub_port, sub_port, pids, qos, warmup, duration, wait_table))
        out[f"qos{qos}_msg_per_s"] = r["msg_per_s"]
        out[f"qos{qos}_generator_cpu"] = r["generator_cpu"]
    return out


def _settle_subscription(seconds: float = 0.5) -> None:
    # Aedes has no metric that says the remote subscription arrived; mqemitter-redis subscribes
    # to Redis channels when the node starts, so the subscriber's filter needs no propagation,
    # but give Redis Pub/Sub a moment anyway.
    time.sleep(seconds)


def run_system(
    system: str, size: int, warmup: float, duration: float, modules: Path | None
) -> dict[str, float]:
    if system == "mcloudtt":
        with cluster("routed", size) as brokers:
            a, b = brokers[0], brokers[-1]
            out = _measure(
                a.port,
                b.port,
                [p.pid for p in brokers],
                warmup,
                duration,
                a.http_port if size > 1 else None,
            )
            if size > 1:
                # The layout, checked on the brokers themselves: the publishers' node delivered
                # nothing to a client and the subscriber's node got no PUBLISH from one.
                out["pub_node_deliveries"] = scrape(a.http_port).total(
                    "mcloudtt_messages_sent_total"
                )
                out["sub_node_client_publishes"] = scrape(b.http_port).total(
                    "mcloudtt_messages_received_total"
                )
            return out
    assert modules is not None
    with aedes_cluster(modules, size) as nodes:
        _settle_subscription()
        return _measure(
            nodes[0].port, nodes[-1].port, [n.pid for n in nodes], warmup, duration, None
        )


def run_clusters(
    sizes: Sequence[int],
    *,
    runs: int,
    warmup: float,
    duration: float,
    log: Callable[[str], None],
    aedes_cache: Path | None = None,
) -> dict[str, Any]:
    """Every system at every size, `runs` times (interleaved); medians and MCloudTT/Aedes ratios."""
    versions: dict[str, Any] = {}
    modules: Path | None = None
    systems = list(SYSTEMS)
    skipped: dict[str, str] = {}
    try:
        modules, versions["aedes"] = prepare_aedes(aedes_cache)
    except BrokerUnavailable as e:
        systems.remove("aedes")
        skipped["aedes"] = str(e)
        log(f"skipping Aedes: {e}")
    samples: dict[str, dict[str, list[dict[str, float]]]] = {s: {} for s in systems}
    errors: list[str] = []
    for run in range(runs):
        for size in sizes:
            for system in systems:
                try:
                    r = run_system(system, size, warmup, duration, modules)
                except Exception as e:  # one failed figure must not lose the others
                    errors.append(f"{system} x{size} run {run + 1}: {e!r}")
                    log(f"{system} with {size} node(s) failed: {e!r}")
                    continue
                samples[system].setdefault(str(size), []).append(r)
                log(
                    f"{system} x{size}: QoS 0 {r['qos0_msg_per_s']:,.0f} msg/s, "
                    f"QoS 1 {r['qos1_msg_per_s']:,.0f} msg/s"
                )
    medians = {
        system: {
            size: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for size, rs in per.items()
        }
        for system, per in samples.items()
    }
    ratios: dict[str, dict[str, float]] = {}
    if "aedes" in medians:
        for nodes, m in medians["mcloudtt"].items():
            a = medians["aedes"].get(nodes)
            if a is None:
                continue
            ratios[nodes] = {
                f"qos{q}": m[f"qos{q}_msg_per_s"] / a[f"qos{q}_msg_per_s"]
                for q in (0, 1)
                if a[f"qos{q}_msg_per_s"] > 0
            }
    targets = [
        {
            "metric": f"cross-broker QoS 1 MCloudTT/Aedes at {size} nodes",
            "target": f">= {QOS1_TARGET:g}x",
            "value": ratios.get(str(size), {}).get("qos1"),
            "pass": (
                None
                if ratios.get(str(size), {}).get("qos1") is None
                else ratios[str(size)]["qos1"] >= QOS1_TARGET
            ),
        }
        for size in sizes
        if size >= 2
    ]
    return {
        "sizes": list(sizes),
        "runs": runs,
        "layout": "publishers on the first node, the subscriber on the last",
        # Node numbers (1-based) per size: from 2 nodes on, every message crosses Redis.
        "nodes": {str(size): {"publishers": 1, "subscriber": size} for size in sizes},
        "targets": targets,
        "versions": versions,
        "skipped": skipped,
        "errors": errors,
        "samples": samples,
        "median": medians,
        "ratios": ratios,
    }


def cluster_table(result: Mapping[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        title="clusters on one Redis: fan-in msg/s (publishers node 1, subscriber node N)"
    )
    table.add_column("nodes", justify="right")
    for q in (0, 1):
        table.add_column(f"MCloudTT QoS {q}", justify="right")
        table.add_column(f"Aedes QoS {q}", justify="right")
        table.add_column(f"ratio QoS {q}", justify="right")
    med = result["median"]
    for size in (str(s) for s in result["sizes"]):
        row = [size]
        for q in (0, 1):
            m = med.get("mcloudtt", {}).get(size, {}).get(f"qos{q}_msg_per_s")
            a = med.get("aedes", {}).get(size, {}).get(f"qos{q}_msg_per_s")
            r = result["ratios"].get(size, {}).get(f"qos{q}")
            row += [
                f"{m:,.0f}" if m is not None else "—",
                f"{a:,.0f}" if a is not None else "—",
                f"{r:.2f}\u00d7" if r is not None else "—",
            ]
        table.add_row(*row)
    return table


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def cluster_chart(result: Mapping[str, Any]) -> str | None:
    """A base64 PNG: msg/s per node count, MCloudTT and Aedes side by side, QoS 0 and 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [str(s) for s in result["sizes"]]
    med = result["median"]
    if not med.get("mcloudtt"):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for q, ax in zip((0, 1), axes, strict=True):
        for k, system in enumerate(SYSTEMS):
            values = [med.get(system, {}).get(s, {}).get(f"qos{q}_msg_per_s", 0.0) for s in sizes]
            ax.bar([i + (k - 0.5) * width for i in range(len(sizes))], values, width, label=system)
        ax.set_xticks(range(len(sizes)), [f"{s} node(s)" for s in sizes])
        ax.set_title(f"QoS {q} fan-in across nodes (msg/s)")
        ax.legend()
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def write_html(doc: Mapping[str, Any], path: Path, ratio_chart: Path | None = None) -> None:
    """One self-contained HTML page: meta, single-node ratios, cluster table and charts."""
    meta = doc.get("meta", {})
    parts = [
        "<!doctype html><meta charset='utf-8'><title>mcloudtt-bench</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:right}</style>",
        "<h1>mcloudtt-bench</h1>",
        f"<p>{html.escape(json.dumps(meta.get('machine', {})))}<br>"
        f"commit {html.escape(str(meta.get('commit')))}, created {html.escape(str(meta.get('created')))}"
        f"<br>brokers: {html.escape(json.dumps(meta.get('brokers', {})))}</p>",
    ]
    ratios = doc.get("ratios") or {}
    if ratios:
        parts.append("<h2>Single node: ratios of the subject to each peer</h2><table>")
        for peer, per in ratios.items():
            for metric, value in per.items():
                if isinstance(value, (int, float)):
                    parts.append(
                        f"<tr><td>{html.escape(peer)}</td><td>{html.escape(metric)}</td>"
                        f"<td>{value:.2f}\u00d7</td></tr>"
                    )
        parts.append("</table>")
    if ratio_chart is not None and ratio_chart.is_file():
        data = base64.b64encode(ratio_chart.read_bytes()).decode()
        parts.append(f"<img alt='ratios' src='data:image/png;base64,{data}'>")
    clusters = doc.get("clusters")
    if clusters:
        parts.append(f"<h2>Clusters on one Redis</h2><p>{html.escape(clusters['layout'])}</p>")
        parts.append("<table><tr><th>nodes</th><th>system</th><th>QoS 0 msg/s</th>")
        parts.append("<th>QoS 1 msg/s</th><th>ratio QoS 0</th><th>ratio QoS 1</th></tr>")
        for size in (str(s) for s in clusters["sizes"]):
            for system in SYSTEMS:
                m = clusters["median"].get(system, {}).get(size)
                if m is None:
                    continue
                r = clusters["ratios"].get(size, {}) if system == "mcloudtt" else {}
                parts.append(
                    f"<tr><td>{size}</td><td>{system}</td><td>{m['qos0_msg_per_s']:,.0f}</td>"
                    f"<td>{m['qos1_msg_per_s']:,.0f}</td>"
                    f"<td>{_fmt_ratio(r.get('qos0'))}</td><td>{_fmt_ratio(r.get('qos1'))}</td></tr>"
                )
        parts.append("</table>")
        for t in clusters.get("targets", []):
            verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["pass"]]
            value = "" if t["value"] is None else f" (got {t['value']:.2f}\u00d7)"
            parts.append(
                f"<p>target: {html.escape(t['metric'])} {html.escape(t['target'])}: "
                f"<b>{verdict}</b>{value}</p>"
            )
        for system, why in clusters.get("skipped", {}).items():
            parts.append(f"<p>{html.escape(system)} skipped: {html.escape(why)}</p>")
        chart = cluster_chart(clusters)
        if chart is not None:
            parts.append(f"<img alt='clusters' src='data:image/png;base64,{chart}'>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


def _fmt_ratio(r: float | None) -> str:
    return "" if r is None else f"{r:.2f}\u00d7"


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
