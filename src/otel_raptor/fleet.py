"""``otel-raptor report --prometheus URL``: the monitor's report for a whole fleet, from Prometheus.

Many processes' telemetry meets in Prometheus (through the collector, or scraped directly);
this module builds the same :class:`~otel_raptor.core.reports.MonitorReport` that one process's
``monitor.report()`` gives, from the series documented in ``docs/monitoring.md``, with the
standard library only (``urllib``).

How a counter's increase over the range ``[end - range, end]`` is computed: the last value of
each series in the range (``last_over_time``, so a process that ended during the range, whose
series is stale at ``end``, still counts) minus its value at ``end - range`` (two instant
queries of Prometheus' HTTP API), a series absent at the start counting from 0 (it was
created, at its first increment, during the range). This is exact, where PromQL's
``increase()`` extrapolates to the range's edges and ignores a series' first increment; it
assumes no counter reset inside the range (a restarted process is a new series:
``service.instance.id`` changes). The sums per service are then put into the same rows as
the in-process monitor keeps (``core.recovery_stats``), so the success rate, the
recovery-time percentiles (``histogram_quantile`` over the same buckets) and the means are
computed by the same code, and agree with the processes' own reports.

What a fleet report cannot have: error *patterns* (normalised messages are deliberately not
metric labels: unbounded); their place is taken by the top ``error.type`` values of
``raptor_errors_total`` per service (with the fingerprint an in-process pattern of that type
without a message would have), and the full patterns are in the ``raptor.report`` log events.
Nor insights' sentences: their counts by kind are (``raptor_insights_total``).
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from otel_raptor.core.alerts import Alert, AlertState
from otel_raptor.core.fingerprint import fingerprint
from otel_raptor.core.recovery_stats import (
    F_ATTEMPTS,
    F_BREAKER_OPENS,
    F_BUCKETS,
    F_BUDGET_REFUSALS,
    F_DURATION_SUM,
    F_ERRORS,
    F_LEARNED_FUTILE,
    F_NOT_RETRYABLE,
    F_OUTCOMES,
    F_RECOVERIES,
    F_REJECTIONS,
    F_RESULTS,
    F_RETRIES,
    F_TIMED,
    NOT_RETRYABLE,
    ROW_FIELDS,
    ResultKind,
    summarize,
)
from otel_raptor.core.reports import (
    AbandonedStrategy,
    ErrorPattern,
    MonitorReport,
    ServiceReport,
    StrategyEffectiveness,
)
from otel_raptor.core.timeseries import DURATION_BUCKETS

__all__ = [
    "FleetReportError",
    "PrometheusClient",
    "fleet_report",
    "parse_range",
    "render_report",
    "report_json",
]

_SERVICE: Final = "raptor_service"
_BREAKER: Final = "raptor_circuit_breaker_name"
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_TOP_ERROR_TYPES: Final = 10


class FleetReportError(Exception):
    """Prometheus could not be asked (unreachable, an error answer, an unexpected shape)."""


def parse_range(text: str) -> float:
    """A Prometheus duration (``90s``, ``5m``, ``1h30m``, ``2d``) in seconds; ``ValueError``
    for anything else or a range that is not positive."""
    stripped = text.strip()
    position, seconds = 0, 0.0
    for match in _DURATION.finditer(stripped):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(stripped) or not stripped or seconds <= 0:
        raise ValueError(f"expected a duration such as 90s, 15m, 1h or 1h30m, got {text!r}")
    return seconds


Sample = tuple[dict[str, str], float]


class PrometheusClient:
    """The instant-query part of Prometheus' HTTP API (``/api/v1/query``), nothing more.

    ``url`` is the server's base URL (``http://localhost:9090``); ``timeout`` is seconds per
    request. ``opener`` is for tests and proxies (``urllib.request.urlopen`` by default)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        opener: Callable[..., Any] = urllib.request.urlopen,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"expected an http(s) URL of a Prometheus server, got {url!r}")
        self._base = url.rstrip("/")
        self._timeout = timeout
        self._open = opener

    def query(self, promql: str, at: float) -> list[Sample]:
        """The instant vector of ``promql`` at ``at`` (seconds since the epoch)."""
        params = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
        url = f"{self._base}/api/v1/query?{params}"
        try:
            with self._open(url, timeout=self._timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            with error:  # it holds the answer's socket
                detail = error.read().decode("utf-8", "replace")[:300]
            message = f"Prometheus answered {error.code} to {promql!r}: {detail}"
            raise FleetReportError(message) from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise FleetReportError(f"cannot query Prometheus at {self._base}: {error}") from None
        if not isinstance(answer, dict) or answer.get("status") != "success":
            raise FleetReportError(f"Prometheus refused {promql!r}: {answer!r}"[:400])
        data = answer.get("data") or {}
        if data.get("resultType") != "vector":
            raise FleetReportError(f"expected a vector for {promql!r}, got {data!r}"[:400])
        samples: list[Sample] = []
        for item in data.get("result", []):
            try:
                value = float(item["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            samples.append((dict(item.get("metric", {})), value))
        return samples


def _selector(metric: str, service: str | None, label: str = _SERVICE, extra: str = "") -> str:
    matchers = [extra] if extra else []
    if service is not None:
        matchers.append(f"{label}={json.dumps(service)}")
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


@dataclass(frozen=True, slots=True)
class _Window:
    client: PrometheusClient
    start: float
    end: float

    def increase(self, promql: str) -> list[Sample]:
        """Per series: its last value in the range minus its value at ``start`` (0 when
        absent then). The last value, not the value at ``end``: a series whose process ended
        during the range (a deploy, a scale-in) is stale at ``end``, and an instant query
        there would drop everything it counted."""
        before = {_key(labels): value for labels, value in self.client.query(promql, self.start)}
        # Whole milliseconds: a Prometheus duration takes no fractions.
        span = max(1, round((self.end - self.start) * 1000))
        last = f"last_over_time({promql}[{span}ms])"
        result: list[Sample] = []
        for labels, value in self.client.query(last, self.end):
            delta = value - before.get(_key(labels), 0.0)
            if delta < 0:  # a reset the instance label did not reveal: count from 0
                delta = value
            if delta > 0:
                result.append((labels, delta))
        return result


def _row(rows: dict[str, array[float]], service: str) -> array[float]:
    row = rows.get(service)
    if row is None:
        row = rows[service] = array("d", bytes(8 * ROW_FIELDS))
    return row


_OUTCOME_FIELDS: Final = dict(F_OUTCOMES)
_RESULT_FIELDS: Final = {kind.value: index for kind, index in F_RESULTS.items()}


def fleet_report(
    client: PrometheusClient,
    *,
    range_s: float = 3600.0,
    service: str | None = None,
    end: float | None = None,
) -> MonitorReport:
    """The report of every service (or of ``service``) over the last ``range_s`` seconds up
    to ``end`` (default: now), from the Prometheus that ``client`` asks."""
    end = time.time() if end is None else end
    window = _Window(client, end - range_s, end)
    rows: dict[str, array[float]] = {}
    by_key: dict[tuple[str, str, str], array[float]] = {}

    def key_row(labels: Mapping[str, str]) -> array[float]:
        key = (
            labels.get(_SERVICE, ""),
            labels.get("raptor_recovery_strategy", ""),
            labels.get("raptor_error_category", ""),
        )
        row = by_key.get(key)
        if row is None:
            row = by_key[key] = array("d", bytes(8 * ROW_FIELDS))
        return row

    for labels, count in window.increase(_selector("raptor_recoveries_total", service)):
        name = labels.get(_SERVICE, "")
        outcome = labels.get("raptor_recovery_outcome", "")
        index = _OUTCOME_FIELDS.get(outcome)
        for row in (_row(rows, name), key_row(labels)):
            row[F_RECOVERIES] += count
            if index is not None:
                row[index] += count
            reason = labels.get("raptor_recovery_give_up_reason")
            if reason == "learned_futile":
                row[F_LEARNED_FUTILE] += count
            elif reason == NOT_RETRYABLE and outcome == "failed":
                row[F_NOT_RETRYABLE] += count
    not_rejected = 'raptor_recovery_outcome!="rejected"'
    buckets: dict[str, dict[float, float]] = {}
    bucket_metric = _selector(
        "raptor_recovery_duration_seconds_bucket", service, extra=not_rejected
    )
    for labels, count in window.increase(bucket_metric):
        bound = float(labels.get("le", "nan"))
        per_service = buckets.setdefault(labels.get(_SERVICE, ""), {})
        per_service[bound] = per_service.get(bound, 0.0) + count
    for name, cumulative in buckets.items():
        _put_buckets(_row(rows, name), cumulative)
    sum_metric = _selector("raptor_recovery_duration_seconds_sum", service, extra=not_rejected)
    for labels, total in window.increase(sum_metric):
        _row(rows, labels.get(_SERVICE, ""))[F_DURATION_SUM] += total
    count_metric = _selector("raptor_recovery_duration_seconds_count", service, extra=not_rejected)
    for labels, count in window.increase(count_metric):
        _row(rows, labels.get(_SERVICE, ""))[F_TIMED] += count
    error_types: dict[str, dict[tuple[str, str], float]] = {}
    categories: dict[str, dict[str, int]] = {}
    for labels, count in window.increase(_selector("raptor_errors_total", service)):
        name = labels.get(_SERVICE, "")
        _row(rows, name)[F_ERRORS] += count
        category = labels.get("raptor_error_category", "")
        kind = (labels.get("error_type", ""), category)
        per_type = error_types.setdefault(name, {})
        per_type[kind] = per_type.get(kind, 0.0) + count
        per_category = categories.setdefault(name, {})
        per_category[category] = per_category.get(category, 0) + round(count)
    for metric, field in (
        ("raptor_retries_total", F_RETRIES),
        ("raptor_retry_budget_exhausted_total", F_BUDGET_REFUSALS),
    ):
        for labels, count in window.increase(_selector(metric, service)):
            _row(rows, labels.get(_SERVICE, ""))[field] += count
    trips = _selector(
        "raptor_circuit_breaker_transitions_total",
        service,
        label=_BREAKER,
        extra='raptor_circuit_breaker_to_state="open"',
    )
    for labels, count in window.increase(trips):
        _row(rows, labels.get(_BREAKER, ""))[F_BREAKER_OPENS] += count
    rejections = _selector("raptor_circuit_breaker_rejections_total", service, label=_BREAKER)
    for labels, count in window.increase(rejections):
        _row(rows, labels.get(_BREAKER, ""))[F_REJECTIONS] += count
    for labels, count in window.increase(_selector("raptor_recovery_results_total", service)):
        index = _RESULT_FIELDS.get(labels.get("raptor_recovery_result", ""))
        if index is None:
            continue
        _row(rows, labels.get(_SERVICE, ""))[index] += count
        key_row(labels)[index] += count
    attempts_metric = _selector("raptor_recovery_attempts_made_total", service)
    for labels, count in window.increase(attempts_metric):
        _row(rows, labels.get(_SERVICE, ""))[F_ATTEMPTS] += count
    alerts_fired: dict[str, int] = {}
    fired = _selector(
        "raptor_alert_notifications_total", service, extra='raptor_alert_state="firing"'
    )
    for labels, count in window.increase(fired):
        name = labels.get("raptor_alert_name", "")
        alerts_fired[name] = alerts_fired.get(name, 0) + round(count)
    overall = array("d", bytes(8 * ROW_FIELDS))
    for row in rows.values():
        for index in range(ROW_FIELDS):
            overall[index] += row[index]
    services = {
        name: ServiceReport(
            service=name,
            summary=summarize(row, range_s),
            top_patterns=_top_types(error_types.get(name, {}), row[F_ERRORS]),
            errors_by_category=categories.get(name, {}),
        )
        for name, row in sorted(rows.items())
        if name
    }
    return MonitorReport(
        started_at=end - range_s,
        ended_at=end,
        overall=summarize(overall, range_s),
        services=services,
        effectiveness=_effectiveness(by_key, range_s),
        abandoned=_abandoned(by_key),
        alerts_fired=alerts_fired,
        active_alerts=_active_alerts(client, end, service),
        insights=(),
        source="prometheus",
    )


def _put_buckets(row: array[float], cumulative: Mapping[float, float]) -> None:
    """Cumulative ``le`` counts (any subset of our bounds, plus ``+Inf``) into per-bucket
    counts at ``F_BUCKETS``."""
    bounds = [*DURATION_BUCKETS, math.inf]
    previous = 0.0
    for index, bound in enumerate(bounds):
        total = cumulative.get(bound)
        if total is None:  # a bucket this histogram does not have: nothing new in it
            continue
        row[F_BUCKETS + index] += max(0.0, total - previous)
        previous = total


def _top_types(counts: Mapping[tuple[str, str], float], errors: float) -> tuple[ErrorPattern, ...]:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:_TOP_ERROR_TYPES]
    return tuple(
        ErrorPattern(
            fingerprint=fingerprint(error_type, category, ""),
            error_type=error_type,
            category=category,
            template="",
            count=round(count),
            error=0,
            share=count / errors if errors else 0.0,
        )
        for (error_type, category), count in ranked
    )


def _effectiveness(
    by_key: Mapping[tuple[str, str, str], array[float]], range_s: float
) -> tuple[StrategyEffectiveness, ...]:
    found: list[StrategyEffectiveness] = []
    for (service, strategy, category), row in sorted(by_key.items()):
        if not strategy or not row[F_RECOVERIES]:
            continue
        summary = summarize(row, range_s)
        found.append(
            StrategyEffectiveness(
                service=service,
                strategy=strategy,
                category=category,
                recoveries=summary.recoveries,
                succeeded_without_retry=summary.succeeded_without_retry,
                succeeded_with_retry=summary.succeeded_with_retry,
                failed_with_retry=summary.failed_with_retry,
                failed_without_retry=summary.failed_without_retry,
                attempts_mean=None,  # attempts are not counted by category
                recovery_time_mean_s=None,  # nor are durations
            )
        )
    return tuple(found)


def _abandoned(
    by_key: Mapping[tuple[str, str, str], array[float]],
) -> tuple[AbandonedStrategy, ...]:
    found: list[AbandonedStrategy] = []
    for (service, strategy, category), row in sorted(by_key.items()):
        if strategy and row[F_LEARNED_FUTILE]:
            ok = row[F_RESULTS[ResultKind.SUCCEEDED_WITH_RETRY]]
            failed = row[F_RESULTS[ResultKind.FAILED_WITH_RETRY]]
            found.append(
                AbandonedStrategy(
                    service=service,
                    category=category,
                    strategy=strategy,
                    refused=round(row[F_LEARNED_FUTILE]),
                    retried=round(ok + failed),
                    succeeded=round(ok),
                )
            )
    return tuple(found)


def _active_alerts(client: PrometheusClient, at: float, service: str | None) -> tuple[Alert, ...]:
    """Alerts firing at ``at``: Prometheus' own (``ALERTS``, from ``collector/rules/``, whose
    names all start with ``Raptor``: a shared Prometheus fires other teams' alerts too) and
    those the processes' monitors report (``raptor_alerts_active``)."""
    alerts: list[Alert] = []
    for labels, _ in client.query('ALERTS{alertstate="firing", alertname=~"Raptor.+"}', at):
        name = labels.get("raptor_service") or labels.get(_BREAKER) or ""
        if service is not None and name != service:
            continue
        alerts.append(_alert(labels.get("alertname", ""), labels.get("severity", ""), name, at))
    for labels, count in client.query(
        "sum by (raptor_alert_name, raptor_alert_severity) (raptor_alerts_active) > 0", at
    ):
        if service is not None:
            continue  # the in-process gauge has no service label
        alert = _alert(
            labels.get("raptor_alert_name", ""), labels.get("raptor_alert_severity", ""), "", at
        )
        alerts.append(
            Alert(
                name=alert.name,
                severity=alert.severity,
                service="",
                state=AlertState.FIRING,
                value=count,
                threshold=0.0,
                since=at,
                active_since=at,
                message=f"{count:g} process monitor(s) report {alert.name} firing",
            )
        )
    return tuple(alerts)


def _alert(name: str, severity: str, service: str, at: float) -> Alert:
    return Alert(
        name=name,
        severity=severity,
        service=service,
        state=AlertState.FIRING,
        value=0.0,
        threshold=0.0,
        since=at,
        active_since=at,
        message=f"{name} firing" + (f" for {service}" if service else ""),
    )


# --- text ----------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def render_report(report: MonitorReport) -> str:
    """The report as a few plain-text tables."""
    lines: list[str] = []
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(report.started_at))
    stop = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(report.ended_at))
    lines.append(f"otel-raptor report ({report.source}) {start} - {stop} UTC")
    lines.append("")
    header = (
        f"{'service':<32} {'recov':>6} {'success':>8} {'p50':>8} {'p95':>8} {'mean':>8}"
        f" {'errors':>7} {'err/min':>8} {'trips':>5}"
    )
    lines.append(header)
    lines.append("-" * len(header))

    def line(name: str, summary: Any) -> str:
        return (
            f"{name[:32]:<32} {summary.recoveries:>6} {_pct(summary.success_rate):>8}"
            f" {_secs(summary.recovery_time_p50_s):>8} {_secs(summary.recovery_time_p95_s):>8}"
            f" {_secs(summary.recovery_time_mean_s):>8} {summary.errors:>7}"
            f" {summary.error_frequency_per_min:>8.2f} {summary.breaker_trips:>5}"
        )

    for name, service in report.services.items():
        lines.append(line(name, service.summary))
    lines.append(line("(all)", report.overall))
    patterns = [(n, p) for n, s in report.services.items() for p in s.top_patterns[:3]]
    if patterns:
        lines += ["", "top errors"]
        for name, pattern in patterns:
            what = pattern.template or pattern.error_type
            lines.append(f"  {name[:32]:<32} {pattern.count:>6}  {pattern.category:<14} {what}")
    if report.effectiveness:
        lines += ["", "effectiveness by strategy (ok/retry ok/retry failed/failed)"]
        for row in report.effectiveness:
            lines.append(
                f"  {row.service[:28]:<28} {row.strategy:<18} {row.category:<14}"
                f" {row.succeeded_without_retry}/{row.succeeded_with_retry}"
                f"/{row.failed_with_retry}/{row.failed_without_retry}"
            )
    for item in report.abandoned:
        lines.append(
            f"  abandoned: {item.strategy} for {item.category} at {item.service}"
            f" ({item.succeeded} of {item.retried} retried calls recovered)"
        )
    if report.alerts_fired:
        fired = ", ".join(f"{name} x{count}" for name, count in sorted(report.alerts_fired.items()))
        lines += ["", f"alerts fired: {fired}"]
    if report.active_alerts:
        lines += ["", "alerts firing now"]
        lines += [f"  {a.severity:<8} {a.name} {a.service}".rstrip() for a in report.active_alerts]
    if report.insights:
        lines += ["", "insights"]
        lines += [f"  {i.summary}; {i.recommendation}" for i in report.insights]
    return "\n".join(lines) + "\n"


def report_json(report: MonitorReport) -> str:
    """The report as indented JSON (the shape of ``MonitorReport.as_dict()``)."""
    return json.dumps(report.as_dict(), indent=2, sort_keys=True, default=str)
