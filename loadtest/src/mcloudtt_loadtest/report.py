"""Medians, ratios, the issue's targets, the results table and the ratio chart."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

TIMES = "\u00d7"  # the multiplication sign of ratios


@dataclass(frozen=True)
class Metric:
    key: str  # "<scenario>.<field>"
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 0

    @property
    def scenario(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.key.split(".", 1)[1]


METRICS: tuple[Metric, ...] = (
    Metric("qos0.msg_per_s", "QoS 0 fan-in", "msg/s", True),
    Metric("qos0.broker_cpu_us_per_msg", "QoS 0 broker CPU per message", "µs", False, 1),
    Metric("qos1.msg_per_s", "QoS 1 fan-in", "msg/s", True),
    Metric("qos1.broker_cpu_us_per_msg", "QoS 1 broker CPU per message", "µs", False, 1),
    Metric("latency.p50_ms", "latency p50 at 1k msg/s", "ms", False, 2),
    Metric("latency.p99_ms", "latency p99 at 1k msg/s", "ms", False, 2),
    Metric("memory.kb_per_conn", "memory per idle connection", "KB", False, 2),
    Metric("connect.connect_per_s", "connect rate", "/s", True),
    Metric("loaded.loaded_msg_per_s", "loaded QoS 0 fan-in", "msg/s", True),
    Metric("loaded.ratio", "loaded / plain QoS 0 fan-in", TIMES, True, 2),
    Metric("loaded.connsub_cpu_ms", "broker CPU per CONNECT+SUBSCRIBE", "ms", False, 3),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}


@dataclass(frozen=True)
class Target:
    """A goal from the issue. `against` names the broker of a ratio target; None means the
    subject's own figure is compared with the threshold."""

    metric: str
    op: str  # ">=", "<=", "<"
    threshold: float
    against: str | None = None

    def describe(self) -> str:
        unit = METRIC_BY_KEY[self.metric].unit
        op = {">=": "≥", "<=": "≤"}.get(self.op, self.op)
        if self.against:
            return f"{op} {self.threshold:g}{TIMES} {self.against}"
        if unit == TIMES:
            return f"{op} {self.threshold:g}{TIMES}"
        return f"{op} {self.threshold:g} {unit}"

    def check(self, value: float | None) -> bool | None:
        if value is None or math.isnan(value):
            return None
        if self.op == ">=":
            return value >= self.threshold
        if self.op == "<=":
            return value <= self.threshold
        return value < self.threshold


TARGETS: tuple[Target, ...] = (
    Target("qos0.msg_per_s", ">=", 0.75, "mosquitto"),
    Target("qos0.msg_per_s", ">=", 15, "amqtt"),
    Target("qos1.msg_per_s", ">=", 0.6, "mosquitto"),
    Target("qos1.msg_per_s", ">=", 15, "amqtt"),
    Target("latency.p99_ms", "<=", 2.0),
    Target("memory.kb_per_conn", "<=", 4.0),
    Target("loaded.ratio", ">=", 0.9),
    Target("loaded.connsub_cpu_ms", "<", 1.0),
)
TARGET_SUBJECT = "mcloudtt"  # the targets are the goals for our broker


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return None if math.isnan(v) else float(v)


def median_of_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Field-wise median over the runs that succeeded (NaN and missing values left out)."""
    fields: dict[str, list[float]] = {}
    for run in runs:
        if "error" in run:
            continue
        for k, v in run.items():
            x = _num(v)
            if x is not None:
                fields.setdefault(k, []).append(x)
    return {k: statistics.median(v) for k, v in fields.items()}


def paired_ratio(
    subject_runs: Sequence[Mapping[str, Any]], other_runs: Sequence[Mapping[str, Any]], field: str
) -> float | None:
    """Median over runs of subject/other, pairing run i with run i: the two were measured
    back to back, so they share the machine's mood of that moment."""
    ratios = []
    for a_run, b_run in zip(subject_runs, other_runs, strict=False):
        a, b = _num(a_run.get(field)), _num(b_run.get(field))
        if a is not None and b:
            ratios.append(a / b)
    return statistics.median(ratios) if ratios else None


def summarize(
    medians: Mapping[str, Mapping[str, Mapping[str, float]]],
    brokers: Sequence[str],
    runs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]] | None = None,
) -> dict[str, Any]:
    """Per metric the median of each broker; ratios of the first broker (the subject) to each
    other one (the median of per-run ratios when `runs` are given, else the ratio of medians);
    the targets, judged when the subject is mcloudtt."""
    subject = brokers[0] if brokers else None
    summary: dict[str, dict[str, float | None]] = {}
    for m in METRICS:
        summary[m.key] = {b: medians.get(b, {}).get(m.scenario, {}).get(m.field) for b in brokers}
    ratios: dict[str, dict[str, float | None]] = {}
    if subject is not None:
        for other in brokers[1:]:
            key = f"{subject}/{other}"
            ratios[key] = {}
            for m in METRICS:
                r = None
                if runs is not None:
                    r = paired_ratio(
                        runs.get(subject, {}).get(m.scenario, ()),
                        runs.get(other, {}).get(m.scenario, ()),
                        m.field,
                    )
                a, b = summary[m.key][subject], summary[m.key][other]
                if r is None and a is not None and b:
                    r = a / b
                ratios[key][m.key] = r
    targets = []
    for t in TARGETS:
        if t.against:
            value = ratios.get(f"{subject}/{t.against}", {}).get(t.metric)
        else:
            value = summary[t.metric].get(subject) if subject else None
        judged = subject == TARGET_SUBJECT
        targets.append(
            {
                "metric": t.metric,
                "target": t.describe(),
                "against": t.against,
                "op": t.op,
                "threshold": t.threshold,
                "value": value,
                "pass": t.check(value) if judged else None,
            }
        )
    return {"subject": subject, "summary": summary, "ratios": ratios, "targets": targets}


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "—"
    if digits == 0 and abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.{max(digits, 2) if abs(v) < 10 else digits}f}"


def _ratio_text(r: float | None, higher_is_better: bool) -> Text:
    if r is None:
        return Text("—", style="dim")
    better = r > 1 if higher_is_better else r < 1
    return Text(f"{r:.2f}{TIMES}", style="green" if better else "red" if r != 1 else "")


def _status(passed: bool | None) -> Text:
    if passed is None:
        return Text("n/a", style="dim")
    return Text("PASS", style="bold green") if passed else Text("FAIL", style="bold red")


def results_table(
    report: Mapping[str, Any], brokers: Sequence[str], versions: Mapping[str, str]
) -> Table:
    subject = report["subject"]
    table = Table(
        title="Head-to-head: medians of the runs; ratios are medians of per-run ratios "
        "(brokers measured back to back in each run)"
    )
    table.add_column("metric")
    table.add_column("unit", style="dim")
    for b in brokers:
        table.add_column(f"{b}\n{versions.get(b, '')}", justify="right")
    ratio_keys = list(report["ratios"])
    for key in ratio_keys:
        table.add_column(key.replace("/", "/\n"), justify="right")
    table.add_column("target", style="cyan")
    table.add_column("status")
    # Scenarios some broker could not complete (the loaded state within its budget) get a mark.
    notes: list[str] = report.get("notes", [])
    partial = {n.split(":", 1)[0]: " *" for n in notes}
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for t in report["targets"]:
        by_metric.setdefault(t["metric"], []).append(t)
    for m in METRICS:
        values = report["summary"][m.key]
        if all(values.get(b) is None for b in brokers):
            continue
        row: list[Any] = [m.label + partial.get(m.scenario, ""), m.unit]
        row += [_fmt(values.get(b), m.digits) for b in brokers]
        row += [_ratio_text(report["ratios"][k].get(m.key), m.higher_is_better) for k in ratio_keys]
        ts = by_metric.get(m.key, [])
        row.append("\n".join(t["target"] for t in ts))
        status = Text()
        for i, t in enumerate(ts):
            if i:
                status.append("\n")
            status.append_text(_status(t["pass"]))
        row.append(status)
        table.add_row(*row)
    caption = [f"* {n}" for n in notes]
    if subject != TARGET_SUBJECT:
        caption.append(f"targets are judged for {TARGET_SUBJECT} only (subject here: {subject})")
    if caption:
        table.caption = "\n".join(caption)
        table.caption_justify = "left"
    return table


def generator_table(
    generator: Mapping[str, Mapping[str, float | None]],
    others: Mapping[str, Mapping[str, float | None]],
    scenarios: Sequence[str],
) -> Table:
    """Per broker and scenario: the generator's CPU, and everything else on the machine (not the
    broker, not the generator), each the highest of the runs as a share of one core."""
    table = Table(
        title="CPU beside the broker: generator / other processes (highest of the runs, share of one core)"
    )
    table.add_column("broker")
    for s in scenarios:
        table.add_column(s, justify="right")
    for broker, row in generator.items():
        cells: list[Any] = [broker]
        for s in scenarios:
            g = row.get(s)
            o = others.get(broker, {}).get(s)
            cell = Text()
            cell.append("—" if g is None else f"{g:.0%}", style="bold red" if g and g > 0.9 else "")
            cell.append(" / ")
            cell.append(
                "—" if o is None else f"{o:.0%}", style="bold yellow" if o and o > 0.25 else "dim"
            )
            cells.append(cell)
        table.add_row(*cells)
    return table


def _ratio_label(r: float) -> str:
    if r >= 10:
        return f"{r:.0f}{TIMES}"
    if r >= 0.1:
        return f"{r:.2f}{TIMES}"
    return f"{r:.2g}{TIMES}"


def plot_ratios(report: Mapping[str, Any], path: Path, *, title: str = "") -> None:
    """Bar chart of subject/other ratios per metric, log scale, with the ratio targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio_keys = list(report["ratios"])
    if not ratio_keys:
        raise ValueError("a ratio chart needs at least two brokers")
    metrics = [
        m for m in METRICS if any(report["ratios"][k].get(m.key) is not None for k in ratio_keys)
    ]
    if not metrics:
        raise ValueError("no metric was measured for two brokers")
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(metrics) + 3), 5.5), dpi=110)
    width = 0.8 / len(ratio_keys)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    for j, key in enumerate(ratio_keys):
        xs, ys = [], []
        for i, m in enumerate(metrics):
            r = report["ratios"][key].get(m.key)
            if r is not None and r > 0:
                xs.append(i + (j - (len(ratio_keys) - 1) / 2) * width)
                ys.append(r)
        # Bars grow from 1 (parity): up where the subject's figure is larger, down where smaller.
        ax.bar(
            xs,
            [y - 1 for y in ys],
            bottom=1,
            width=width * 0.95,
            label=key,
            color=colors[j % len(colors)],
        )
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(
                _ratio_label(y),
                (x, y),
                ha="center",
                va="bottom" if y >= 1 else "top",
                fontsize=7,
                xytext=(0, 2 if y >= 1 else -2),
                textcoords="offset points",
            )
        other = key.split("/", 1)[1]
        for t in report["targets"]:
            if report["subject"] != TARGET_SUBJECT or t["against"] != other:
                continue
            try:
                i = [m.key for m in metrics].index(t["metric"])
            except ValueError:
                continue
            x = i + (j - (len(ratio_keys) - 1) / 2) * width
            ax.hlines(
                t["threshold"],
                x - width / 2,
                x + width / 2,
                colors="black",
                linestyles="--",
                linewidth=1.5,
            )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(
        [f"{m.label.strip()}\n({'↑' if m.higher_is_better else '↓'} better)" for m in metrics],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    subject = report["subject"]
    ax.set_ylabel(f"{subject} / other (log scale)")
    marks = " (dashes: targets)" if subject == TARGET_SUBJECT else ""
    ax.set_title(title or f"{subject} relative to the other brokers{marks}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def print_report(
    console: Console, report: Mapping[str, Any], brokers: Sequence[str], versions: Mapping[str, str]
) -> None:
    console.print(results_table(report, brokers, versions))
