"""Reports of a chaos run: one JSON document and one self-contained HTML page.

The JSON has one entry per scenario with the checker's verdict as `checker.Report.to_json()`
gives it (`passed`, each invariant, `lost`, `duplicates`, `recovery_s`, ...) plus the scenario's
name, its timeline and anything the caller adds (`extra`: backend, counters, ...).

The HTML page shows, per scenario, a timeline computed from the history in 0.5 s bins: publish
and delivery rates (messages per second) and the unacknowledged backlog (QoS 1/2 messages sent
and not yet PUBACKed/PUBCOMPed), with each fault window as a shaded band; below it the verdict
table. The plots are matplotlib SVG inlined in the page, so the file stands alone.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checker import Report, check
from .history import Acked, Delivered, FaultEnd, FaultStart, Record, Sent

BIN_S = 0.5


@dataclass
class ScenarioResult:
    """One scenario's outcome: its history and the checker's report on it."""

    name: str
    records: list[Record]
    report: Report
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_history(
        cls, name: str, records: Iterable[Record], *, skip: Collection[str] = (), **extra: Any
    ) -> ScenarioResult:
        """Check the history (invariants in `skip` counted, not judged) and keep both."""
        records = list(records)
        return cls(name=name, records=records, report=check(records, skip=skip), extra=extra)


@dataclass
class Timeline:
    """Rates and backlog in fixed bins; times are seconds from the first record."""

    bin_s: float
    t: list[float]
    publish_rate: list[float]
    delivery_rate: list[float]
    backlog: list[int]  # peak outstanding QoS 1/2 messages in the bin
    faults: list[dict[str, Any]]  # {"fault", "target", "start", "end"} (end None: never ended)
    lost: list[int] = field(default_factory=list)  # lost QoS 1/2 messages, by when they were sent

    def to_json(self) -> dict[str, Any]:
        return {
            "bin_s": self.bin_s,
            "t": self.t,
            "publish_rate": self.publish_rate,
            "delivery_rate": self.delivery_rate,
            "backlog": self.backlog,
            "faults": self.faults,
            "lost": self.lost,
        }


def timeline(
    records: Sequence[Record], bin_s: float = BIN_S, report: Report | None = None
) -> Timeline:
    """Publish rate (first sends), delivery rate (every delivery) and the unacknowledged
    backlog (the most QoS 1/2 messages outstanding at once in each bin)."""
    if not records:
        return Timeline(bin_s, [], [], [], [], [])
    origin = min(r.t for r in records)
    end = max(r.t for r in records)
    bins = max(1, math.ceil((end - origin) / bin_s + 1e-9))
    published = [0] * bins
    delivered = [0] * bins
    change: list[list[int]] = [[] for _ in range(bins)]  # backlog steps, in order
    seen: set[tuple[str, int]] = set()
    acked: set[tuple[str, int]] = set()
    qos_of: dict[tuple[str, int], int] = {}

    def index(t: float) -> int:
        return min(bins - 1, int((t - origin) / bin_s))

    faults: list[dict[str, Any]] = []
    open_faults: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r.t):
        if isinstance(r, Sent):
            key = (r.publisher, r.seq)
            if key in seen:
                continue
            seen.add(key)
            qos_of[key] = r.qos
            published[index(r.t)] += 1
            if r.qos > 0:
                change[index(r.t)].append(1)
        elif isinstance(r, Acked):
            key = (r.publisher, r.seq)
            if key in seen and key not in acked and qos_of.get(key, 0) > 0:
                acked.add(key)
                change[index(r.t)].append(-1)
        elif isinstance(r, Delivered):
            delivered[index(r.t)] += 1
        elif isinstance(r, FaultStart):
            window: dict[str, Any] = {
                "fault": r.fault,
                "target": r.target,
                "start": r.t - origin,
                "end": None,
            }
            open_faults[(r.fault, r.target)] = window
            faults.append(window)
        elif isinstance(r, FaultEnd):
            started = open_faults.pop((r.fault, r.target), None)
            if started is None:  # an end without a start: a band from the beginning
                started = {"fault": r.fault, "target": r.target, "start": 0.0, "end": None}
                faults.append(started)
            started["end"] = r.t - origin
    backlog = [0] * bins
    level = 0
    for i, steps in enumerate(change):
        peak = level  # what was outstanding as the bin began
        for delta in steps:
            level += delta
            peak = max(peak, level)
        backlog[i] = peak
    return Timeline(
        bin_s=bin_s,
        t=[round(i * bin_s, 6) for i in range(bins)],
        publish_rate=[n / bin_s for n in published],
        delivery_rate=[n / bin_s for n in delivered],
        backlog=backlog,
        faults=faults,
        lost=_lost_by_bin(records, report, origin, bin_s, bins),
    )


def _lost_by_bin(
    records: Sequence[Record], report: Report | None, origin: float, bin_s: float, bins: int
) -> list[int]:
    out = [0] * bins
    if report is None or not report.lost:
        return out
    sent: dict[tuple[str, int], float] = {}
    for r in records:
        if isinstance(r, Sent):
            sent.setdefault((r.publisher, r.seq), r.t)
    for x in report.lost:
        t = sent.get((x.publisher, x.seq))
        if t is not None:
            out[min(bins - 1, int((t - origin) / bin_s))] += 1
    return out


def scenario_json(result: ScenarioResult, *, with_timeline: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {"scenario": result.name, **result.report.to_json()}
    data.update(result.extra)
    if with_timeline:
        data["timeline"] = timeline(result.records, report=result.report).to_json()
    return data


def report_json(results: Sequence[ScenarioResult], **meta: Any) -> dict[str, Any]:
    return {
        "passed": all(r.report.passed for r in results),
        **meta,
        "scenarios": [scenario_json(r) for r in results],
    }


def write_json(path: str | Path, results: Sequence[ScenarioResult], **meta: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report_json(results, **meta), indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.pass { color: #fff; background: #2e7d32; padding: 0 .5em; border-radius: 4px; }
.fail { color: #fff; background: #c62828; padding: 0 .5em; border-radius: 4px; }
.skip { color: #555; background: #ddd; padding: 0 .5em; border-radius: 4px; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: .85em; } .plot svg { width: 100%; height: auto; }
"""


def _plot_svg(line: Timeline, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (rates, backlog) = plt.subplots(
        2, 1, figsize=(10, 4.2), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    try:
        # Each bin drawn over its whole width: one more edge at the end, the last value held.
        x = [*line.t, line.t[-1] + line.bin_s] if line.t else [0.0]

        def held(values: Sequence[float]) -> list[float]:
            return [*values, values[-1]] if values else [0.0]

        rates.step(x, held(line.publish_rate), where="post", label="published /s", color="#1565c0")
        rates.step(x, held(line.delivery_rate), where="post", label="delivered /s", color="#2e7d32")
        backlog.step(x, held(line.backlog), where="post", label="unacknowledged", color="#c62828")
        backlog.yaxis.set_major_locator(MaxNLocator(integer=True))
        backlog.set_ylim(0, max(1, *line.backlog) * 1.15 if line.backlog else 1)
        if any(line.lost):
            rates.step(
                x,
                held(line.lost),
                where="post",
                label="lost (by send time)",
                color="#000000",
                lw=1.2,
            )
        end = x[-1] if x else 1.0
        narrowest = (x[-1] - x[0]) / 250 if len(x) > 1 else 0.01  # an instant stays visible
        for axis in (rates, backlog):
            for i, f in enumerate(line.faults):
                stop = f["end"] if f["end"] is not None else end
                axis.axvline(f["start"], color="#e65100", lw=0.8, alpha=0.8)
                axis.axvspan(
                    f["start"],
                    max(stop, f["start"] + narrowest),
                    color="#ff9800",
                    alpha=0.25,
                    lw=0,
                    label="fault" if i == 0 and axis is rates else None,
                )
            axis.grid(alpha=0.3)
        for f in line.faults:
            label = f["fault"] + (f" ({f['target']})" if f["target"] else "")
            rates.annotate(
                label,
                (f["start"], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -12),
                textcoords="offset points",
                fontsize=8,
                color="#e65100",
            )
        rates.set_ylabel("messages / s")
        backlog.set_ylabel("backlog")
        backlog.set_xlabel(f"seconds since the first record ({line.bin_s:g} s bins)")
        rates.legend(loc="upper right", fontsize=8)
        rates.set_title(title, fontsize=10)
        rates.set_ylim(bottom=0)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})  # the same run, the same page
    finally:
        plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]  # drop the XML prolog and doctype: inline in HTML


def _badge(passed: bool, judged: bool = True) -> str:
    if not judged:
        return '<span class="skip">counted</span>'
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _scenario_html(result: ScenarioResult) -> str:
    report = result.report
    line = timeline(result.records, report=result.report)
    parts = [
        f'<h2 id="{html.escape(result.name)}">{html.escape(result.name)} '
        f"{_badge(report.passed)}</h2>",
        "<table><tr><th>lost (QoS 1/2)</th><th>duplicates</th><th>QoS 0 lost</th>"
        "<th>recovery (s)</th><th>records</th></tr>",
        f'<tr><td class="num">{len(report.lost)}</td><td class="num">{report.duplicates}</td>'
        f'<td class="num">{report.qos0_lost}</td><td class="num">{_fmt(report.recovery_s)}</td>'
        f'<td class="num">{len(result.records)}</td></tr></table>',
        f'<div class="plot">{_plot_svg(line, result.name)}</div>',
        "<table><tr><th>invariant</th><th>verdict</th><th>checked</th><th>failures</th>"
        "<th>counts</th><th>first examples</th></tr>",
    ]
    for name, v in report.invariants.items():
        counts = ", ".join(f"{k}={n}" for k, n in sorted(v.counts.items())) or ""
        examples = "<br>".join(
            html.escape(json.dumps(e, separators=(",", ":"))) for e in v.examples[:3]
        )
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{_badge(v.passed, v.judged)}</td>"
            f'<td class="num">{v.checked}</td><td class="num">{v.failures}</td>'
            f"<td>{html.escape(counts)}</td><td><code>{examples}</code></td></tr>"
        )
    parts.append("</table>")
    if report.lost:
        lost = report.to_json()["lost_messages"]
        rows = "".join(
            f"<tr><td>{html.escape(x['subscriber'])}</td><td>{html.escape(x['publisher'])}</td>"
            f"<td><code>{html.escape(_ranges(x['seqs']))}</code></td></tr>"
            for x in lost
        )
        parts.append(
            f"<table><tr><th>subscriber</th><th>publisher</th><th>lost seqs</th></tr>{rows}</table>"
        )
    if report.recoveries:
        rows = "".join(
            f"<tr><td>{html.escape(r['fault'])}</td><td>{html.escape(r['target'] or '')}</td>"
            f'<td class="num">{_fmt(r["recovery_s"])}</td>'
            f'<td class="num">{_fmt(r["first_delivery_s"])}</td>'
            f"<td>{html.escape(str(r['slowest'] or ''))}</td></tr>"
            for r in report.recoveries
        )
        parts.append(
            "<table><tr><th>fault</th><th>target</th><th>recovery (s)</th>"
            f"<th>first delivery (s)</th><th>slowest</th></tr>{rows}</table>"
        )
    return "\n".join(parts)


def _ranges(seqs: Sequence[int]) -> str:
    """1,2,3,7 -> '1-3, 7'."""
    runs: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if runs and runs[-1][1] == seq - 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def render_html(results: Sequence[ScenarioResult], *, title: str = "MCloudTT chaos run") -> str:
    passed = all(r.report.passed for r in results)
    summary = "".join(
        f'<tr><td><a href="#{html.escape(r.name)}">{html.escape(r.name)}</a></td>'
        f'<td>{_badge(r.report.passed)}</td><td class="num">{len(r.report.lost)}</td>'
        f'<td class="num">{r.report.duplicates}</td>'
        f'<td class="num">{_fmt(r.report.recovery_s)}</td>'
        f"<td>{html.escape(', '.join(r.report.failed()))}</td></tr>"
        for r in results
    )
    body = "\n".join(_scenario_html(r) for r in results)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)} {_badge(passed)}</h1>"
        "<table><tr><th>scenario</th><th>verdict</th><th>lost</th><th>duplicates</th>"
        f"<th>recovery (s)</th><th>failed invariants</th></tr>{summary}</table>"
        f"{body}</body></html>\n"
    )


def write_html(
    path: str | Path, results: Sequence[ScenarioResult], *, title: str = "MCloudTT chaos run"
) -> Path:
    path = Path(path)
    path.write_text(render_html(results, title=title), encoding="utf-8")
    return path
