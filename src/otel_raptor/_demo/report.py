"""The demo's numbers: one summary per run, the side-by-side table, the telemetry digest.

Every number comes from a measurement of the run it describes: client-side call records and
connection attempts (``workload``), server-side request records (``server``), the breaker
transitions the runtime published, and what the OpenTelemetry SDK collected.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from otel_raptor._demo.server import OUTAGE_PHASES, Phase, Schedule, ServerLog
from otel_raptor._demo.workload import WorkloadResult

__all__ = [
    "BreakerChange",
    "RunSummary",
    "percentile",
    "render_phases",
    "render_table",
    "render_telemetry",
    "render_transitions",
    "summarize",
]


@dataclass(frozen=True, slots=True)
class BreakerChange:
    """A breaker transition seen during a run: ``at`` seconds since the run started."""

    at: float
    breaker: str
    from_state: str
    to_state: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """The measured results of one run. Latencies are seconds.

    ``transitions`` is ``None`` when the run had no breaker at all (the plain run).
    """

    label: str
    calls: int
    ok: int
    p50: float | None
    p99: float | None
    outage_reads: int
    outage_refused: int
    early: int
    transitions: int | None
    server_requests: int
    #: phase -> (calls started in that phase, of which ok)
    by_phase: Mapping[Phase, tuple[int, int]]
    #: failure label (``503``, ``ReadTimeout``, ``RequestsCircuitOpen``, ...) -> calls
    failures: Mapping[str, int]

    @property
    def success_rate(self) -> float | None:
        """Share of calls that succeeded, in [0, 1]; ``None`` without calls."""
        return self.ok / self.calls if self.calls else None

    @property
    def outage_hits(self) -> int:
        """Requests read during the outage plus connection attempts refused during it."""
        return self.outage_reads + self.outage_refused


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (``q`` in (0, 100]) of ``values``; ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(
    label: str,
    workload: WorkloadResult,
    server: ServerLog,
    schedule: Schedule,
    transitions: Sequence[BreakerChange] | None,
) -> RunSummary:
    """Fold one run's measurements into a :class:`RunSummary`."""
    durations = [c.duration for c in workload.calls]
    phase_calls: Counter[Phase] = Counter()
    phase_ok: Counter[Phase] = Counter()
    for call in workload.calls:
        phase = schedule.phase_at(call.started)
        phase_calls[phase] += 1
        phase_ok[phase] += call.ok
    by_phase = {p.phase: (phase_calls[p.phase], phase_ok[p.phase]) for p in schedule.spans()}
    ok = sum(1 for c in workload.calls if c.ok)
    return RunSummary(
        label=label,
        calls=len(workload.calls),
        ok=ok,
        p50=percentile(durations, 50),
        p99=percentile(durations, 99),
        outage_reads=sum(1 for _ in server.in_phase(*OUTAGE_PHASES)),
        # Only a closed listening socket refuses a loopback connection: that is the outage.
        outage_refused=sum(1 for a in workload.connects if a.refused),
        early=server.early,
        transitions=None if transitions is None else len(transitions),
        server_requests=len(server.requests),
        by_phase=by_phase,
        failures=dict(Counter(c.kind for c in workload.calls if not c.ok).most_common()),
    )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f} %"


def _millis(value: float | None) -> str:
    if value is None:
        return "-"
    ms = value * 1000.0
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


#: (label, how to read it) for each row of the table, in order.
ROWS: tuple[tuple[str, str], ...] = (
    ("calls made", "logical calls made by the workers (GET /orders/<n>)"),
    ("success rate", "calls that got a 2xx response in the end, as the app saw them"),
    ("latency p50", "median duration of a call, retries and waits included"),
    ("latency p99", "99th percentile of the same: the tail users feel"),
    ("outage: requests read by the server", "requests the hung server read, never answered"),
    ("outage: connections refused", "TCP connects refused while the port was closed"),
    ("requests before Retry-After expired", "sent before the client's Retry-After ran out"),
    ("breaker transitions", "circuit-breaker state changes (plain has no breaker)"),
)


def _cells(summary: RunSummary) -> tuple[str, ...]:
    return (
        str(summary.calls),
        _percent(summary.success_rate),
        _millis(summary.p50),
        _millis(summary.p99),
        str(summary.outage_reads),
        str(summary.outage_refused),
        str(summary.early),
        _count(summary.transitions),
    )


def render_table(plain: RunSummary, raptor: RunSummary) -> str:
    """The side-by-side table, then one line per row on how to read it."""
    width = max(len(label) for label, _ in ROWS) + 2
    lines = [f"{'':<{width}}{plain.label:>12}{raptor.label:>12}"]
    lines += [
        f"{label:<{width}}{left:>12}{right:>12}"
        for (label, _), left, right in zip(ROWS, _cells(plain), _cells(raptor), strict=True)
    ]
    lines.append("")
    lines += [f"  {label:<{width}}{meaning}" for label, meaning in ROWS]
    return "\n".join(lines)


def render_phases(plain: RunSummary, raptor: RunSummary, schedule: Schedule) -> str:
    """Success rate per phase (by the phase each call started in), with call counts."""

    def cell(summary: RunSummary, phase: Phase) -> str:
        calls, ok = summary.by_phase.get(phase, (0, 0))
        rate = f"{100.0 * ok / calls:.0f} %" if calls else "-"
        return f"{rate} of {calls}"

    names = [f"{s.phase.value} ({s.start:g}-{s.end:g} s)" for s in schedule.spans()]
    width = max(len(n) for n in names) + 2
    lines = [f"{'success by phase':<{width}}{plain.label:>14}{raptor.label:>14}"]
    for name, span in zip(names, schedule.spans(), strict=True):
        lines.append(f"{name:<{width}}{cell(plain, span.phase):>14}{cell(raptor, span.phase):>14}")
    for summary in (plain, raptor):
        kinds = ", ".join(f"{kind} x{n}" for kind, n in summary.failures.items()) or "none"
        lines.append(f"{summary.label} failures: {kinds}")
    return "\n".join(lines)


def render_transitions(changes: Sequence[BreakerChange], schedule: Schedule) -> str:
    """The breaker's state changes, one line each, with the phase they happened in."""
    if not changes:
        return "breaker: no state change"
    lines: list[str] = []
    for breaker in dict.fromkeys(c.breaker for c in changes):
        lines.append(f"breaker {breaker}:")
        lines += [
            f"  {c.at:6.2f} s  {c.from_state} -> {c.to_state}  ({c.reason}, during"
            f" {schedule.phase_at(c.at).value})"
            for c in changes
            if c.breaker == breaker
        ]
    return "\n".join(lines)


# -- telemetry ---------------------------------------------------------------------------------

# For each counter, the attributes whose values make the most useful breakdown.
_BREAKDOWN: Mapping[str, tuple[str, ...]] = {
    "raptor.errors": ("raptor.error.category",),
    "raptor.retries": ("raptor.error.category",),
    "raptor.recoveries": ("raptor.recovery.outcome",),
    "raptor.recovery.duration": ("raptor.recovery.outcome",),
    "raptor.circuit_breaker.transitions": (
        "raptor.circuit_breaker.from_state",
        "raptor.circuit_breaker.to_state",
    ),
    "raptor.circuit_breaker.rejections": ("raptor.circuit_breaker.state",),
    "raptor.circuit_breaker.state": ("raptor.circuit_breaker.state",),
    "raptor.recovery.results": ("raptor.recovery.result",),
    "raptor.recovery.attempts_made": ("raptor.recovery.outcome",),
    "raptor.alerts.active": ("raptor.alert.name", "raptor.alert.severity"),
}


def _label(name: str, attributes: Mapping[str, object] | None) -> str:
    keys = _BREAKDOWN.get(name, ())
    values = [str((attributes or {}).get(key, "?")) for key in keys]
    return "->".join(values)


def _breakdown(parts: Iterable[tuple[str, float]]) -> str:
    merged: dict[str, float] = {}
    for label, value in parts:
        merged[label] = merged.get(label, 0.0) + value
    ordered = sorted(merged.items(), key=lambda item: -item[1])
    return ", ".join(f"{label} {_number(value)}" for label, value in ordered if label)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def render_telemetry(metrics: MetricsData | None, spans: Sequence[ReadableSpan]) -> str:
    """A short digest of the ``raptor.*`` metrics and spans the SDK collected in memory."""
    lines: list[str] = []
    for resource_metrics in metrics.resource_metrics if metrics is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if not metric.name.startswith("raptor."):
                    continue
                data = metric.data
                name = metric.name
                if isinstance(data, Sum):
                    number_points = list(data.data_points)
                    total = sum(p.value for p in number_points)
                    detail = _breakdown(
                        (_label(name, p.attributes), p.value) for p in number_points
                    )
                    lines.append(f"  {name:<44}{_number(total):>8}  {detail}")
                elif isinstance(data, Histogram):
                    buckets = list(data.data_points)
                    count = sum(p.count for p in buckets)
                    seconds = sum(p.sum for p in buckets)
                    mean = f"mean {seconds / count:.3f} s; " if count else ""
                    detail = _breakdown((_label(name, p.attributes), p.count) for p in buckets)
                    lines.append(f"  {name:<44}{count:>8}  {mean}{detail}")
                elif isinstance(data, Gauge):
                    number_points = list(data.data_points)
                    if not number_points:
                        continue
                    if name in ("raptor.circuit_breaker.state", "raptor.alerts.active"):
                        # One point per state (or alert): show the ones that are on.
                        current = [_label(name, p.attributes) for p in number_points if p.value]
                        lines.append(f"  {name:<44}{'':>8}  now {', '.join(current) or '-'}")
                    else:
                        values = ", ".join(_number(p.value) for p in number_points)
                        lines.append(f"  {name:<44}{'':>8}  now {values}")
    recoveries = [s for s in spans if s.name == "raptor.recovery"]
    if spans:
        failed = sum(1 for s in recoveries if s.status.status_code is StatusCode.ERROR)
        events: Counter[str] = Counter(e.name for s in recoveries for e in s.events)
        lines.append(
            f"  spans: {len(recoveries)} raptor.recovery ({failed} with status ERROR),"
            f" {len(spans) - len(recoveries)} other"
        )
        if events:
            shown = ", ".join(f"{name} x{n}" for name, n in events.most_common())
            lines.append(f"  span events on raptor.recovery: {shown}")
    if not lines:
        return "  (no raptor telemetry was recorded)"
    return "\n".join(lines)
