"""Insights: what the analytics found, the numbers behind it, and one thing to do about it.

An ``Insight`` is a typed record: its ``kind`` (a bounded enum), the ``service`` and error
``category`` it is about, a one-sentence ``summary`` with the numbers in it, the ``evidence``
(the same numbers, by name, for machines), and one concrete ``recommendation``. The builders
below write them from what the detectors and counters measured, so every sentence is backed by
a measurement.

``InsightBook`` keeps the current insights and decides which ones to *announce* (as a
``raptor.insight`` log event): an insight is identified by ``(kind, service, category)``; a new
one is announced at once, a repeat only once ``repeat_after_s`` has passed, and never more than
``max_per_minute`` announcements a minute in all (the rest are kept, just not announced). An
insight not confirmed for ``ttl_s`` expires. At most ``max_insights`` are kept (the oldest go).

Pure: time is a parameter; not thread-safe.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from otel_raptor.errors import ConfigError

__all__ = [
    "Insight",
    "InsightBook",
    "InsightKind",
    "breaker_flapping",
    "budget_exhausted",
    "error_rise",
    "error_spike",
    "futile_retries",
    "recovery_slowing",
    "strategy_abandoned",
    "success_declining",
]


class InsightKind(str, enum.Enum):
    """What an insight is about. The values are metric attribute values (bounded)."""

    ERROR_SPIKE = "error_spike"
    ERROR_RISE = "error_rise"
    RECOVERY_SLOWING = "recovery_slowing"
    SUCCESS_DECLINING = "success_declining"
    FUTILE_RETRIES = "futile_retries"
    STRATEGY_ABANDONED = "strategy_abandoned"
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
    BREAKER_FLAPPING = "breaker_flapping"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class Insight:
    """One finding. ``detected_at`` is monotonic seconds (the runtime's clock), ``count`` how
    many times it has been found since it first was."""

    kind: InsightKind
    service: str
    category: str
    summary: str
    evidence: Mapping[str, float]
    recommendation: str
    detected_at: float
    count: int = 1

    @property
    def key(self) -> tuple[InsightKind, str, str]:
        return (self.kind, self.service, self.category)

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "service": self.service,
            "category": self.category,
            "summary": self.summary,
            "evidence": dict(self.evidence),
            "recommendation": self.recommendation,
            "count": self.count,
        }


def _evidence(**numbers: float | None) -> Mapping[str, float]:
    return MappingProxyType(
        {key: float(value) for key, value in numbers.items() if value is not None}
    )


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 1.0:
        return f"{value * 1000:.0f} ms"
    return f"{value:.1f} s"


def _times(ratio: float) -> str:
    return "from none" if math.isinf(ratio) else f"{ratio:.1f}x"


# What to do about more errors of one category: the category says where to look.
_ERROR_ADVICE: Mapping[str, str] = MappingProxyType(
    {
        "timeout": "raise the attempt timeout or lower max_retries (each retry waits for it)",
        "rate_limit": "send fewer requests to {service} (or spread them): it is throttling",
        "connection": "check that {service} is up and reachable; its breaker fails fast meanwhile",
        "dns": "check the DNS name of {service} and the resolver",
        "tls": "check the certificates of {service} (expiry, chain, host name)",
        "authentication": "refresh the credentials used for {service}"
        " (register_auth_refresher for automatic refreshes)",
        "authorization": "check the permissions of the credentials used for {service}",
        "unavailable": "look at {service}'s health and recent deploys; add a fallback for"
        " its callers",
        "server_error": "look at {service}'s own errors and recent deploys",
        "resource_exhausted": "raise {service}'s pool or quota, or send it less work",
        "concurrency": "reduce contention on {service} (smaller transactions, retry with"
        " jitter) or stop retrying conflicts that cannot succeed",
    }
)
_DEFAULT_ADVICE = "look at {service}'s recent changes and the top error patterns of the report"


def _advice(category: str, service: str) -> str:
    return _ERROR_ADVICE.get(category, _DEFAULT_ADVICE).format(service=service)


def error_spike(
    *,
    service: str,
    category: str,
    per_minute: float,
    baseline_per_minute: float,
    ratio: float,
    score: float,
    window_s: float,
    recovery_p95_s: float | None,
    now: float,
) -> Insight:
    """Errors of ``category`` at ``service`` jumped within one interval."""
    minutes = window_s / 60.0
    summary = (
        f"{category} errors at {service} rose {_times(ratio)} in {minutes:.0f} min"
        f" ({per_minute:.1f}/min against a baseline of {baseline_per_minute:.1f}/min)"
    )
    if recovery_p95_s is not None:
        summary += f"; p95 recovery {_seconds(recovery_p95_s)}"
    return Insight(
        kind=InsightKind.ERROR_SPIKE,
        service=service,
        category=category,
        summary=summary,
        evidence=_evidence(
            errors_per_minute=per_minute,
            baseline_per_minute=baseline_per_minute,
            ratio=ratio if math.isfinite(ratio) else None,
            score=score,
            recovery_p95_s=recovery_p95_s,
        ),
        recommendation=_advice(category, service),
        detected_at=now,
    )


def error_rise(
    *,
    service: str,
    category: str,
    per_minute: float,
    baseline_per_minute: float,
    ratio: float,
    minutes: float,
    now: float,
) -> Insight:
    """Errors of ``category`` at ``service`` have stayed above their baseline."""
    return Insight(
        kind=InsightKind.ERROR_RISE,
        service=service,
        category=category,
        summary=(
            f"{category} errors at {service} have run {_times(ratio)} their baseline for"
            f" {minutes:.0f} min ({per_minute:.1f}/min against {baseline_per_minute:.1f}/min)"
        ),
        evidence=_evidence(
            errors_per_minute=per_minute,
            baseline_per_minute=baseline_per_minute,
            ratio=ratio if math.isfinite(ratio) else None,
            minutes=minutes,
        ),
        recommendation=_advice(category, service),
        detected_at=now,
    )


def recovery_slowing(
    *,
    service: str,
    mean_s: float,
    reference_s: float,
    ratio: float,
    p95_s: float | None,
    timeout_share: float,
    now: float,
) -> Insight:
    """Recoveries at ``service`` have been getting slower."""
    summary = (
        f"recoveries at {service} are slowing down: mean {_seconds(mean_s)} against"
        f" {_seconds(reference_s)} over the last hours ({_times(ratio)})"
    )
    if p95_s is not None:
        summary += f", p95 {_seconds(p95_s)}"
    if timeout_share >= 0.5:
        advice = (
            f"{timeout_share:.0%} of its failures are timeouts: shorten the attempt timeout"
            " so that a retry starts sooner, or lower max_retries"
        )
    else:
        advice = (
            f"check what {service} waits on (pool, dependency, GC); lower max_retries or"
            " max_delay if the callers cannot wait that long"
        )
    return Insight(
        kind=InsightKind.RECOVERY_SLOWING,
        service=service,
        category="",
        summary=summary,
        evidence=_evidence(
            recovery_mean_s=mean_s,
            reference_mean_s=reference_s,
            ratio=ratio if math.isfinite(ratio) else None,
            recovery_p95_s=p95_s,
            timeout_share=timeout_share,
        ),
        recommendation=advice,
        detected_at=now,
    )


def success_declining(
    *,
    service: str,
    failure_ratio: float,
    reference_ratio: float,
    top_category: str,
    now: float,
) -> Insight:
    """The share of recoveries at ``service`` that fail has been growing."""
    return Insight(
        kind=InsightKind.SUCCESS_DECLINING,
        service=service,
        category=top_category,
        summary=(
            f"recovery success at {service} is declining: {1 - failure_ratio:.0%} of"
            f" recoveries succeed, against {1 - reference_ratio:.0%} over the last hours"
        ),
        evidence=_evidence(
            success_rate=1 - failure_ratio,
            reference_success_rate=1 - reference_ratio,
        ),
        recommendation=_advice(top_category, service)
        if top_category
        else f"look at the give-up reasons of {service}'s recoveries",
        detected_at=now,
    )


def futile_retries(
    *,
    service: str,
    category: str,
    strategy: str,
    error_type: str,
    retried: int,
    succeeded: int,
    window_s: float,
    now: float,
) -> Insight:
    """Retries of ``category`` failures at ``service`` never (or almost never) succeed."""
    what = f"{error_type} ({category})" if error_type and error_type != category else category
    never = "never succeed" if succeeded == 0 else f"succeed {succeeded / retried:.0%} of the time"
    return Insight(
        kind=InsightKind.FUTILE_RETRIES,
        service=service,
        category=category,
        summary=(
            f"retries on {what} at {service} {never}: {succeeded} of {retried} retried calls"
            f" recovered in {window_s / 60:.0f} min ({strategy})"
        ),
        evidence=_evidence(retried=retried, succeeded=succeeded, window_s=window_s),
        recommendation=(
            f"stop retrying {category}: make it non-retryable (register_rule) or fix the"
            " cause; each retry only adds load and latency"
        ),
        detected_at=now,
    )


def strategy_abandoned(
    *,
    service: str,
    category: str,
    strategy: str,
    refused: int,
    succeeded: int,
    retried: int,
    now: float,
) -> Insight:
    """The learner stopped spending retries on ``strategy`` for ``category`` at ``service``."""
    return Insight(
        kind=InsightKind.STRATEGY_ABANDONED,
        service=service,
        category=category,
        summary=(
            f"the learner stopped retrying {category} at {service} with {strategy}:"
            f" {succeeded} of {retried} retried calls recovered, so {refused} calls were"
            " given up without a retry (a probe still gets through now and then)"
        ),
        evidence=_evidence(refused=refused, succeeded=succeeded, retried=retried),
        recommendation=(
            f"treat {category} at {service} as not retryable, or fix its cause; the learner"
            " retries again by itself once a probe recovers"
        ),
        detected_at=now,
    )


def budget_exhausted(
    *, service: str, refused: int, retries: int, window_s: float, now: float
) -> Insight:
    """The retry budget of ``service`` refused retries."""
    return Insight(
        kind=InsightKind.RETRY_BUDGET_EXHAUSTED,
        service=service,
        category="",
        summary=(
            f"the retry budget of {service} refused {refused} retries in"
            f" {window_s / 60:.0f} min ({retries} were allowed)"
        ),
        evidence=_evidence(refused=refused, retries=retries, window_s=window_s),
        recommendation=(
            f"{service} fails more often than the budget allows retries: fix the downstream;"
            " raise OTEL_PYTHON_RAPTOR_RETRY_BUDGET_RATIO only if it can take the extra load"
        ),
        detected_at=now,
    )


def breaker_flapping(*, service: str, trips: int, window_s: float, now: float) -> Insight:
    """The breaker of ``service`` keeps opening and closing."""
    return Insight(
        kind=InsightKind.BREAKER_FLAPPING,
        service=service,
        category="",
        summary=f"the breaker of {service} opened {trips} times in {window_s / 60:.0f} min",
        evidence=_evidence(trips=trips, window_s=window_s),
        recommendation=(
            "the downstream fails on and off: fix it, or raise the breaker's success_threshold"
            " so it closes only once the downstream is back (a longer recovery_timeout would"
            " refuse its up phases too)"
        ),
        detected_at=now,
    )


@dataclass(slots=True)
class _Held:
    insight: Insight
    last_seen: float
    last_announced: float = -math.inf


@dataclass(slots=True)
class InsightBook:
    """Current insights, deduplicated and rate-limited (see the module docstring).

    ``ttl_s`` (default 1 h) > 0, ``repeat_after_s`` (1 h) >= 0, ``max_per_minute`` (10) >= 1,
    ``max_insights`` (64) >= 1.
    """

    ttl_s: float = 3600.0
    repeat_after_s: float = 3600.0
    max_per_minute: int = 10
    max_insights: int = 64
    _held: dict[tuple[InsightKind, str, str], _Held] = field(default_factory=dict)
    _tokens: float = -1.0
    _refilled: float = 0.0
    #: Insights found but not announced because of the rate limit.
    suppressed: int = 0

    def __post_init__(self) -> None:
        ttl: object = self.ttl_s  # typed float, but callers pass anything
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < math.inf:
            raise ConfigError("monitor.insight_ttl", ttl, "a number of seconds > 0")
        repeat: object = self.repeat_after_s
        if (
            isinstance(repeat, bool)
            or not isinstance(repeat, (int, float))
            or not 0 <= repeat < math.inf
        ):
            raise ConfigError("monitor.insight_repeat_after", repeat, "a number of seconds >= 0")
        counts: tuple[tuple[str, object], ...] = (
            ("monitor.insights_per_minute", self.max_per_minute),
            ("monitor.max_insights", self.max_insights),
        )
        for key, value in counts:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(key, value, "an integer >= 1")

    def add(self, insight: Insight, now: float) -> Insight | None:
        """Record ``insight``; return it (counted) when it should be announced now."""
        self.expire(now)
        held = self._held.get(insight.key)
        if held is None:
            if len(self._held) >= self.max_insights:
                oldest = min(self._held, key=lambda key: self._held[key].last_seen)
                del self._held[oldest]
            held = self._held[insight.key] = _Held(insight, now)
        else:
            held.insight = replace(insight, count=held.insight.count + 1)
            held.last_seen = now
        if now - held.last_announced < self.repeat_after_s:
            return None
        if not self._take_token(now):
            self.suppressed += 1
            return None
        held.last_announced = now
        return held.insight

    def _take_token(self, now: float) -> bool:
        rate = self.max_per_minute / 60.0
        if self._tokens < 0:
            self._tokens, self._refilled = float(self.max_per_minute), now
        self._tokens = min(float(self.max_per_minute), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def expire(self, now: float) -> None:
        stale = [key for key, held in self._held.items() if now - held.last_seen > self.ttl_s]
        for key in stale:
            del self._held[key]

    def current(self, now: float) -> list[Insight]:
        """The insights found within ``ttl_s``, newest first."""
        self.expire(now)
        held = sorted(self._held.values(), key=lambda h: h.last_seen, reverse=True)
        return [h.insight for h in held]

    def __len__(self) -> int:
        return len(self._held)
