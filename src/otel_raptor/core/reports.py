"""The records the monitor and the analytics hand out: patterns, effectiveness, reports.

Plain frozen values with an ``as_dict()`` that gives JSON-ready data (the ``raptor.report``
event's body, ``otel-raptor report --format json``). Times are seconds; ``*_at`` fields are
seconds since the Unix epoch (wall clock), so a report means something outside the process.

Pure: standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from otel_raptor.core.alerts import Alert
from otel_raptor.core.insights import Insight
from otel_raptor.core.recovery_stats import RecoverySummary

__all__ = [
    "AbandonedStrategy",
    "ErrorPattern",
    "MonitorReport",
    "ServiceReport",
    "StrategyEffectiveness",
    "alert_as_dict",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorPattern:
    """One error pattern of a service: its ``fingerprint`` (16 hex digits), the
    ``error_type`` and ``category``, the normalised message ``template``, and how often it was
    seen: ``count`` is an upper bound and ``count - error`` a lower bound of the true count
    (the space-saving sketch's guarantee; ``error`` is 0 while the sketch has room).
    ``share`` is ``count`` over the service's failed attempts in the same period."""

    fingerprint: str
    error_type: str
    category: str
    template: str
    count: int
    error: int
    share: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "error_type": self.error_type,
            "category": self.category,
            "template": self.template,
            "count": self.count,
            "error": self.error,
            "share": round(self.share, 4),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyEffectiveness:
    """How well one strategy recovered one category of failure at one service: resilience4j's
    four kinds, the mean attempts per call and the mean time to recover (seconds, over the
    calls that succeeded after a retry; ``None`` without any)."""

    service: str
    strategy: str
    category: str
    recoveries: int
    succeeded_without_retry: int
    succeeded_with_retry: int
    failed_with_retry: int
    failed_without_retry: int
    attempts_mean: float | None
    recovery_time_mean_s: float | None

    @property
    def success_rate(self) -> float | None:
        """Calls that succeeded, over all of them."""
        if self.recoveries == 0:
            return None
        return (self.succeeded_with_retry + self.succeeded_without_retry) / self.recoveries

    @property
    def retry_success_rate(self) -> float | None:
        """Of the calls that were retried, the share that then succeeded."""
        retried = self.succeeded_with_retry + self.failed_with_retry
        return self.succeeded_with_retry / retried if retried else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "strategy": self.strategy,
            "category": self.category,
            "recoveries": self.recoveries,
            "succeeded_without_retry": self.succeeded_without_retry,
            "succeeded_with_retry": self.succeeded_with_retry,
            "failed_with_retry": self.failed_with_retry,
            "failed_without_retry": self.failed_without_retry,
            "attempts_mean": self.attempts_mean,
            "recovery_time_mean_s": self.recovery_time_mean_s,
            "success_rate": self.success_rate,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AbandonedStrategy:
    """A strategy the learner stopped using for a category at a service, and why: of the
    ``retried`` calls it retried in the period, ``succeeded`` recovered (below the learner's
    futility rate), so ``refused`` calls were given up without a retry (``learned_futile``
    at their first attempt; a probe the learner let retry before giving it up counts among
    the ``retried``, not the ``refused``)."""

    service: str
    category: str
    strategy: str
    refused: int
    retried: int
    succeeded: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "category": self.category,
            "strategy": self.strategy,
            "refused": self.refused,
            "retried": self.retried,
            "succeeded": self.succeeded,
            "reason": "learned_futile",
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceReport:
    """One service over a period: its ``summary`` and its ``top_patterns``."""

    service: str
    summary: RecoverySummary
    top_patterns: Sequence[ErrorPattern] = ()
    errors_by_category: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            **_rounded(self.summary.as_dict()),
            "errors_by_category": dict(self.errors_by_category),
            "top_patterns": [p.as_dict() for p in self.top_patterns],
        }


def alert_as_dict(alert: Alert) -> dict[str, Any]:
    return {
        "name": alert.name,
        "severity": alert.severity,
        "service": alert.service,
        "state": alert.state.value,
        "value": alert.value,
        "threshold": alert.threshold,
        "message": alert.message,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorReport:
    """A report over ``[started_at, ended_at]`` (wall-clock seconds): per service and
    overall numbers, effectiveness by strategy, the strategies the learner abandoned, the
    alerts that fired (``alerts_fired``: firing notifications sent) and are active now, and
    the current insights. ``source`` is ``process`` (one process's monitor) or
    ``prometheus`` (a fleet, from ``otel-raptor report``)."""

    started_at: float
    ended_at: float
    overall: RecoverySummary
    services: Mapping[str, ServiceReport]
    effectiveness: Sequence[StrategyEffectiveness] = ()
    abandoned: Sequence[AbandonedStrategy] = ()
    alerts_fired: Mapping[str, int] = field(default_factory=dict)
    active_alerts: Sequence[Alert] = ()
    insights: Sequence[Insight] = ()
    source: str = "process"

    @property
    def duration_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "overall": _rounded(self.overall.as_dict()),
            "services": {name: s.as_dict() for name, s in sorted(self.services.items())},
            "effectiveness": [e.as_dict() for e in self.effectiveness],
            "abandoned_strategies": [a.as_dict() for a in self.abandoned],
            "alerts_fired": dict(self.alerts_fired),
            "active_alerts": [alert_as_dict(a) for a in self.active_alerts],
            "insights": [i.as_dict() for i in self.insights],
        }


def _rounded(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: round(value, 6) if isinstance(value, float) else value for key, value in values.items()
    }
