"""The plan's summary (rates, peaks, per-topic table, sizing) and its plots."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import sizing
from .device import DeviceModel, Recorder
from .fleet import Fleet
from .payloads import encode_message, make_generator
from .plan import PlanRun, expected_rates
from .scenario import filter_matches, topic_filter

__all__ = ["StreamInfo", "plot_plan", "stream_infos", "summarize"]

SENT_EXAMPLE = 1_767_225_600.123456  # a realistic epoch for sizing the "sent" field
STATUS_PAYLOAD_BYTES = len(b'{"state":"offline","ts":1767225600.123}')


def publish_wire_bytes(topic_len: float, payload_len: float, qos: int) -> float:
    """Bytes of an MQTT 3.1.1 PUBLISH on the wire."""
    remaining = 2 + topic_len + (2 if qos else 0) + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2**21 else 4
    return 1 + varint + remaining


@dataclass(frozen=True)
class StreamInfo:
    key: str  # CLASS/STREAM
    cls: int
    filter: str
    qos: int
    retain: bool
    topics: int
    topic_bytes: float
    payload_bytes: float
    wire_bytes: float
    fanout: int  # deliveries per message to backend consumers


@dataclass(frozen=True)
class StatusInfo:
    cls: int
    filter: str | None
    topic_bytes: float
    wire_bytes: float
    fanout: int


def _sample_indices(fleet: Fleet, c: int, k: int) -> list[int]:
    n = fleet.class_counts[c]
    if n == 0:
        return []
    return sorted({fleet.class_offsets[c] + (i * n) // k for i in range(min(k, n))})


def _fanout(fleet: Fleet, topic: str) -> int:
    return sum(con.count for con in fleet.scenario.consumers if filter_matches(con.filter, topic))


def stream_infos(
    fleet: Fleet, samples: int = 16, messages: int = 8
) -> tuple[list[StreamInfo], list[StatusInfo]]:
    """Topic and payload sizes measured on sample devices of each class (real generators)."""
    infos: list[StreamInfo] = []
    status: list[StatusInfo] = []
    for c, cls in enumerate(fleet.classes):
        idx = _sample_indices(fleet, c, samples)
        models = [DeviceModel(fleet, i) for i in idx]
        for s, stream in enumerate(cls.streams):
            topic_lens, payload_lens = [], []
            for m in models:
                ident = m.identity
                topic_lens.append(len(ident.topics[s].encode()))
                rng = random.Random(f"{fleet.scenario.seed}/{cls.name}/{ident.n}/payload/{s}")
                gen = make_generator(stream.payload, rng, fleet.scenario.regions[ident.region])
                rate = stream.schedule.base_rate()
                seq = int(rate * fleet.horizon / 2)
                for j in range(messages):
                    t = j / max(rate, 1e-9)
                    body = encode_message(
                        ident.client_id,
                        seq + j,
                        SENT_EXAMPLE + t,
                        SENT_EXAMPLE + t,
                        gen.fields(t),
                        gen.pad_to,
                    )
                    payload_lens.append(len(body))
            tb = float(np.mean(topic_lens)) if topic_lens else 0.0
            pb = float(np.mean(payload_lens)) if payload_lens else 0.0
            sample_topic = models[0].identity.topics[s] if models else stream.topic
            infos.append(
                StreamInfo(
                    key=f"{cls.name}/{stream.name}",
                    cls=c,
                    filter=topic_filter(stream.topic),
                    qos=stream.qos,
                    retain=stream.retain,
                    topics=fleet.class_counts[c],
                    topic_bytes=tb,
                    payload_bytes=pb,
                    wire_bytes=publish_wire_bytes(tb, pb, stream.qos),
                    fanout=_fanout(fleet, sample_topic),
                )
            )
        if cls.status_topic and models:
            lens = [len((m.identity.status_topic or "").encode()) for m in models]
            tb = float(np.mean(lens))
            status.append(
                StatusInfo(
                    c,
                    topic_filter(cls.status_topic),
                    tb,
                    publish_wire_bytes(tb, STATUS_PAYLOAD_BYTES, 1),
                    _fanout(fleet, models[0].identity.status_topic or ""),
                )
            )
        else:
            status.append(StatusInfo(c, None, 0.0, 0.0, 0))
    return infos, status


def _window_max(x: np.ndarray, w: int) -> tuple[float, int]:
    """Largest mean of `x` over `w` consecutive steps, and where that window starts."""
    if len(x) == 0:
        return 0.0, 0
    w = max(1, min(w, len(x)))
    c = np.concatenate(([0.0], np.cumsum(x, dtype=float)))
    means = (c[w:] - c[:-w]) / w
    i = int(np.argmax(means))
    return float(means[i]), i


def _clock(fleet: Fleet, t: float) -> str:
    a = (fleet.start_tod + t) % 86400.0
    day = int((fleet.start_tod + t) // 86400.0)
    hh, rem = divmod(int(a), 3600)
    mm, ss = divmod(rem, 60)
    return f"{f'd+{day} ' if day else ''}{hh:02d}:{mm:02d}:{ss:02d}"


@dataclass
class Series:
    """Per-step totals derived from a recorder."""

    t: np.ndarray
    data: np.ndarray  # per stream
    status: np.ndarray  # per class
    in_msgs: np.ndarray
    bytes: np.ndarray
    deliveries: np.ndarray
    qos_msgs: np.ndarray
    retained: np.ndarray
    connections: np.ndarray  # devices online
    held: np.ndarray  # connections the brokers hold: online + dead ones not yet noticed
    connects: np.ndarray
    disconnects: np.ndarray
    load: np.ndarray  # in benchmark messages


def series(rec: Recorder, infos: Sequence[StreamInfo], status: Sequence[StatusInfo]) -> Series:
    dt = rec.dt
    data = rec.msgs.astype(float) / dt
    st = rec.status.astype(float) / dt
    wire = np.array([i.wire_bytes for i in infos])[:, None]
    fan = np.array([i.fanout for i in infos], dtype=float)[:, None]
    qos = np.array([i.qos > 0 for i in infos], dtype=float)[:, None]
    ret = np.array([i.retain for i in infos], dtype=float)[:, None]
    swire = np.array([s.wire_bytes for s in status])[:, None]
    sfan = np.array([s.fanout for s in status], dtype=float)[:, None]
    in_msgs = data.sum(axis=0) + st.sum(axis=0)
    deliveries = (data * fan).sum(axis=0) + (st * sfan).sum(axis=0)
    return Series(
        t=np.arange(rec.steps) * dt,
        data=data,
        status=st,
        in_msgs=in_msgs,
        bytes=(data * wire).sum(axis=0) + (st * swire).sum(axis=0),
        deliveries=deliveries,
        qos_msgs=(data * qos).sum(axis=0) + st.sum(axis=0),
        retained=(data * ret).sum(axis=0) + st.sum(axis=0),
        connections=rec.connections.sum(axis=0).astype(float),
        held=(rec.connections + rec.zombies).sum(axis=0).astype(float),
        connects=rec.connects.sum(axis=0).astype(float) / dt,
        disconnects=(rec.disconnects + rec.drops).sum(axis=0).astype(float) / dt,
        load=(in_msgs + deliveries) / 2.0,
    )


def summarize(
    run: PlanRun,
    *,
    capacity_msg_s: float = sizing.BROKER_CAPACITY_MSG_S,
    headroom: float = sizing.HEADROOM,
    spare: int = sizing.SPARE_PODS,
    max_connections: int = sizing.MAX_CONNECTIONS_PER_BROKER,
    connect_rate: float = sizing.CONNECT_RATE_PER_BROKER,
    cluster_overhead: float = sizing.CLUSTER_OVERHEAD,
    peak_window_s: float = sizing.PEAK_WINDOW_S,
) -> tuple[dict[str, Any], Series]:
    fleet, rec = run.fleet, run.rec
    infos, status = stream_infos(fleet)
    ser = series(rec, infos, status)
    dt = rec.dt
    duration = rec.steps * dt
    w = max(1, round(peak_window_s / dt))

    def peak_of(x: np.ndarray) -> float:
        return _window_max(x, w)[0]

    peak_1s = float(ser.in_msgs.max()) if rec.steps else 0.0
    peak_at = int(np.argmax(ser.in_msgs)) if rec.steps else 0
    peak_w, peak_w_at = _window_max(ser.in_msgs, w)

    def rates(pick: Any) -> sizing.Rates:
        return sizing.Rates(
            in_msg_s=pick(ser.in_msgs),
            deliveries_s=pick(ser.deliveries),
            qos_msg_s=pick(ser.qos_msgs),
            retained_s=pick(ser.retained),
            connects_s=pick(ser.connects),
            disconnects_s=pick(ser.disconnects),
        )

    peak_rates = rates(peak_of)
    mean_rates = rates(lambda x: float(x.mean()))
    retained_topics = 0
    retained_bytes = 0.0
    for info in infos:
        if info.retain:
            retained_topics += info.topics
            retained_bytes += info.topics * (info.topic_bytes + info.payload_bytes)
    for st in status:
        if st.filter is not None:
            n = fleet.class_counts[st.cls]
            retained_topics += n
            retained_bytes += n * (st.topic_bytes + STATUS_PAYLOAD_BYTES)
    sessions = 0
    subs = 0.0
    sub_bytes: list[float] = []
    for c, cls in enumerate(fleet.classes):
        if not cls.clean_session:
            sessions += fleet.class_counts[c]
            subs += fleet.class_counts[c] * len(cls.subscriptions)
            sub_bytes.extend(len(f) + 8 for f in cls.subscriptions)
    total_in = float(ser.in_msgs.sum() * dt)
    inputs = sizing.SizingInputs(
        peak=peak_rates,
        mean=mean_rates,
        peak_connections=int(ser.held.max()) if rec.steps else 0,
        retained_topics=retained_topics,
        retained_bytes=retained_bytes,
        sessions=sessions,
        subscriptions_per_session=subs / sessions if sessions else 0.0,
        subscription_filter_bytes=float(np.mean(sub_bytes)) if sub_bytes else 0.0,
        mean_message_bytes=float(ser.bytes.sum() / ser.in_msgs.sum()) if total_in else 0.0,
    )
    brokers = sizing.size_brokers(
        inputs,
        capacity_msg_s=capacity_msg_s,
        headroom=headroom,
        spare=spare,
        max_connections=max_connections,
        connect_rate=connect_rate,
        cluster_overhead=cluster_overhead,
    )
    # Every pod shares the peak (the spare too): the per-pod rate decides how much the brokers
    # batch their Redis commands (more pods, smaller batches, more commands).
    redis = sizing.size_redis(inputs, headroom=headroom, brokers=brokers.brokers_recommended)
    expected = expected_rates(fleet)
    topics = []
    for k, info in enumerate(infos):
        x = ser.data[k]
        total = float(x.sum() * dt)
        topics.append(
            {
                "stream": info.key,
                "filter": info.filter,
                "qos": info.qos,
                "retain": info.retain,
                "topics": info.topics,
                "messages": round(total),
                "mean_msg_s": round(total / duration, 3),
                "peak_msg_s": round(float(x.max()), 3),
                "expected_msg_s": round(expected[info.key], 3),
                "per_topic_interval_s": round(duration * info.topics / total, 2) if total else None,
                "payload_bytes": round(info.payload_bytes, 1),
                "fanout": info.fanout,
            }
        )
    status_total = int(rec.status.sum())
    summary: dict[str, Any] = {
        "scenario": fleet.scenario.name,
        "seed": fleet.scenario.seed,
        "devices": fleet.devices,
        "hours": round(duration / 3600.0, 4),
        "start_time": _clock(fleet, 0.0),
        "resolution_s": dt,
        "model": run.model,
        "runtime_s": round(run.runtime_s, 3),
        "messages_total": int(rec.msgs.sum()) + status_total,
        "data_messages_total": int(rec.msgs.sum()),
        "status_messages_total": status_total,
        "wills_total": int(rec.wills.sum()),
        "mean_msg_s": round(total_in / duration, 3),
        "expected_mean_msg_s": round(sum(v for k, v in expected.items() if k != "connects"), 3),
        "peak_msg_s": round(peak_1s, 3),
        "peak_time": _clock(fleet, peak_at * dt),
        "peak_window_s": w * dt,
        "peak_msg_s_window": round(peak_w, 3),
        "peak_window_time": _clock(fleet, peak_w_at * dt),
        "mean_bytes_s": round(float(ser.bytes.mean()), 1),
        "peak_bytes_s": round(float(ser.bytes.max()), 1),
        "deliveries_total": round(float(ser.deliveries.sum() * dt)),
        "mean_deliveries_s": round(float(ser.deliveries.mean()), 3),
        "peak_deliveries_s": round(float(ser.deliveries.max()), 3),
        "connections_mean": round(float(ser.connections.mean()), 1),
        "connections_min": int(ser.connections.min()),
        "connections_max": int(ser.connections.max()),
        "broker_connections_max": int(ser.held.max()),
        "connects_total": int(rec.connects.sum()),
        "peak_connects_s": round(float(ser.connects.max()), 3),
        "retained_topics": retained_topics,
        "persistent_sessions": sessions,
        "topics": topics,
        "outages": [
            {
                "region": fleet.scenario.regions[o.region].name,
                "start": _clock(fleet, o.start),
                "minutes": round((o.end - o.start) / 60.0, 1),
            }
            for o in fleet.outages
        ],
        "brokers_recommended": brokers.brokers_recommended,
        "brokers": brokers.as_dict(),
        "redis": redis.as_dict(),
    }
    return summary, ser


def _downsample(
    t: np.ndarray, x: np.ndarray, points: int, how: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[-1]
    b = max(1, math.ceil(n / points))
    m = n // b * b
    if m == 0:
        return t, x
    xs = x[..., :m].reshape(*x.shape[:-1], m // b, b)
    return t[:m:b], (xs.max(axis=-1) if how == "max" else xs.mean(axis=-1))


def plot_plan(summary: dict[str, Any], ser: Series, run: PlanRun, path: Path) -> Path:
    """A PNG with the load over time: messages by class, broker load against pod capacity,
    bytes, and connections with the connect rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fleet = run.fleet
    hours = (fleet.start_tod + ser.t) / 3600.0
    points = 1500
    fig, axes = plt.subplots(4, 1, figsize=(12, 13), sharex=True)
    fig.suptitle(
        f"{fleet.scenario.name}: {fleet.devices:,} devices over {summary['hours']:g} h "
        f"(model {run.model}, seed {fleet.scenario.seed})",
        fontsize=13,
    )
    # 1: inbound messages by class (bin means, stacked) and the per-bin max of the total
    by_class = np.zeros((len(fleet.classes), len(ser.t)))
    k = 0
    for c, cls in enumerate(fleet.classes):
        for _ in cls.streams:
            by_class[c] += ser.data[k]
            k += 1
        by_class[c] += ser.status[c]
    th, stacked = _downsample(hours, by_class, points)
    ax = axes[0]
    ax.stackplot(th, stacked, labels=[c.name for c in fleet.classes], alpha=0.8)
    _, tmax = _downsample(hours, ser.in_msgs, points, "max")
    ax.plot(th, tmax, color="black", lw=0.6, label="1 s peak in bin")
    ax.set_ylabel("publishes in, msg/s")
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    ax.grid(alpha=0.3)
    # 2: broker utilisation with one pod fewer than recommended (the spare lost)
    ax = axes[1]
    b = summary["brokers"]
    serving = max(1, b["brokers_recommended"] - b["spare"])
    cap = b["capacity_msg_s"] * serving / (1.0 + sizing.CLUSTER_OVERHEAD) / 100.0
    _, lmean = _downsample(hours, ser.load, points)
    _, lmax = _downsample(hours, ser.load, points, "max")
    ax.plot(th, lmean / cap, label="bin mean")
    ax.plot(th, lmax / cap, lw=0.6, alpha=0.7, label="1 s peak in bin")
    ax.axhline(
        b["headroom"] * 100, color="red", lw=0.8, ls="--", label=f"headroom {b['headroom']:.0%}"
    )
    ax.set_ylabel(f"broker CPU, % of {serving} pod(s)")
    ax.set_title(
        f"{b['brokers_recommended']} pods recommended (bound by {b['binding']}); utilisation with "
        f"{serving} serving, {b['capacity_msg_s']:,.0f} msg/s each",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    # 3: bytes
    ax = axes[2]
    _, bmean = _downsample(hours, ser.bytes, points)
    ax.plot(th, bmean / 1e6, color="tab:green")
    ax.set_ylabel("publish bytes in, MB/s")
    ax.grid(alpha=0.3)
    # 4: connections and connects
    ax = axes[3]
    _, cmean = _downsample(hours, ser.connections, points)
    ax.plot(th, cmean, color="tab:blue", label="devices online")
    _, hmean = _downsample(hours, ser.held, points)
    ax.plot(th, hmean, color="tab:purple", lw=0.7, ls="--", label="connections held by brokers")
    ax.set_ylabel("connections")
    ax2 = ax.twinx()
    _, cmax = _downsample(hours, ser.connects, points, "max")
    ax2.plot(th, cmax, color="tab:orange", lw=0.7, label="connects/s (bin max)")
    ax2.set_ylabel("connects/s")
    for o in fleet.outages:
        ax.axvspan(
            (fleet.start_tod + o.start) / 3600.0,
            (fleet.start_tod + o.end) / 3600.0,
            color="grey",
            alpha=0.2,
        )
    ax.set_xlabel("hour of day (grey: regional outages)")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def dump_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=False)
