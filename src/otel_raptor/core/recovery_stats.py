"""What the monitor counts per service (and strategy and category), and what it concludes.

A *row* is a fixed array of numbers (``ROW_FIELDS`` of them) that events add to: recoveries by
outcome, attempts, recovery times (a sum and the ``DURATION_BUCKETS`` histogram), failed
attempts, retries, retry-budget refusals, breaker trips and rejections, and resilience4j's four
kinds of result. ``summarize(row, window_s)`` turns a row into the numbers people read.

Definitions (the Prometheus recording rules in ``collector/rules/`` compute the same):

* **success rate** — recoveries that ended ``recovered`` or ``fallback``, over the *judged*
  ones: every recovery except those ``rejected`` by an open breaker (the breaker's own alert
  covers those; counting them would fire two alerts for one cause) and those ``failed``
  because the error is not retryable (``give_up_reason`` ``not_retryable``: a duplicate key, a
  bad statement, a refused login, which nothing could have recovered; an app that catches
  duplicate keys on purpose would otherwise page about a healthy database). ``None`` without
  judged recoveries.
* **recovery time** — ``RecoveryFinished.duration_s`` of every recovery but the rejected
  ones (rejections take no time and would drag the percentiles to 0; ``raptor.recovery.duration``
  has no give-up reason to leave the others out by); p50 and p95 are estimated from the
  histogram with PromQL's ``histogram_quantile``, the mean is exact.
* **error frequency** — failed attempts (``ErrorClassified``) per minute over the window.
* **the four kinds** (resilience4j's ``Retry`` metrics), over the logical calls that needed
  recovery — the success path records nothing, so a call that succeeded at once is not seen:
  ``succeeded_without_retry`` (a fallback answered after the first failure, or a refusal),
  ``succeeded_with_retry`` (a retry succeeded, or the fallback answered after retries),
  ``failed_with_retry`` and ``failed_without_retry`` (given up after a single attempt, or
  refused by the breaker).

Pure: standard library only.
"""

from __future__ import annotations

import enum
import math
from collections.abc import MutableSequence, Sequence
from dataclasses import asdict, dataclass
from typing import Final

from otel_raptor.core.timeseries import DURATION_BUCKETS, bucket_index, histogram_quantile

__all__ = [
    "F_ATTEMPTS",
    "F_BREAKER_OPENS",
    "F_BUCKETS",
    "F_BUDGET_REFUSALS",
    "F_DURATION_SUM",
    "F_ERRORS",
    "F_LEARNED_FUTILE",
    "F_NOT_RETRYABLE",
    "F_OUTCOMES",
    "F_RECOVERIES",
    "F_REJECTIONS",
    "F_RESULTS",
    "F_RETRIES",
    "F_TIMED",
    "NOT_RETRYABLE",
    "OUTCOMES",
    "ROW_FIELDS",
    "RecoverySummary",
    "ResultKind",
    "add_recovery",
    "judged",
    "result_kind",
    "summarize",
]

#: ``Outcome`` values, in row order.
OUTCOMES: Final = ("recovered", "fallback", "failed", "rejected", "budget_exhausted")
_SUCCESSES: Final = frozenset({"recovered", "fallback"})
#: The give-up reason of a recovery that nothing could have made succeed.
NOT_RETRYABLE: Final = "not_retryable"


class ResultKind(str, enum.Enum):
    """resilience4j's four kinds of result, for a call that needed recovery."""

    SUCCEEDED_WITHOUT_RETRY = "succeeded_without_retry"
    SUCCEEDED_WITH_RETRY = "succeeded_with_retry"
    FAILED_WITH_RETRY = "failed_with_retry"
    FAILED_WITHOUT_RETRY = "failed_without_retry"

    def __str__(self) -> str:
        return self.value


_KINDS: Final = tuple(ResultKind)

F_RECOVERIES: Final = 0
#: Index of each outcome's count.
F_OUTCOMES: Final = {outcome: 1 + index for index, outcome in enumerate(OUTCOMES)}
F_ATTEMPTS: Final = 6
F_TIMED: Final = 7
F_DURATION_SUM: Final = 8
F_ERRORS: Final = 9
F_RETRIES: Final = 10
F_BUDGET_REFUSALS: Final = 11
F_BREAKER_OPENS: Final = 12
F_REJECTIONS: Final = 13
#: Index of each result kind's count.
F_RESULTS: Final = {kind: 14 + index for index, kind in enumerate(_KINDS)}
F_LEARNED_FUTILE: Final = 18
#: ``failed`` recoveries given up because the error is not retryable (not judged).
F_NOT_RETRYABLE: Final = 19
#: First of the ``len(DURATION_BUCKETS) + 1`` bucket counts (the last is ``+Inf``).
F_BUCKETS: Final = 20
ROW_FIELDS: Final = F_BUCKETS + len(DURATION_BUCKETS) + 1


def result_kind(outcome: str, attempts: int) -> ResultKind:
    """The kind of a finished recovery: success is ``recovered`` or ``fallback``, and a retry
    was made when there were at least two attempts."""
    retried = attempts >= 2
    if outcome in _SUCCESSES:
        return ResultKind.SUCCEEDED_WITH_RETRY if retried else ResultKind.SUCCEEDED_WITHOUT_RETRY
    return ResultKind.FAILED_WITH_RETRY if retried else ResultKind.FAILED_WITHOUT_RETRY


def add_recovery(
    row: MutableSequence[float],
    outcome: str,
    attempts: int,
    duration_s: float,
    *,
    learned_futile: bool = False,
    give_up_reason: str = "",
) -> None:
    """Add one finished recovery to ``row`` (a mutable sequence of ``ROW_FIELDS`` numbers)."""
    index = F_OUTCOMES.get(outcome)
    if index is None:
        return
    row[F_RECOVERIES] += 1
    row[index] += 1
    row[F_ATTEMPTS] += attempts
    row[F_RESULTS[result_kind(outcome, attempts)]] += 1
    if learned_futile:
        row[F_LEARNED_FUTILE] += 1
    if outcome == "failed" and give_up_reason == NOT_RETRYABLE:
        row[F_NOT_RETRYABLE] += 1
    if outcome != "rejected":
        duration = duration_s if math.isfinite(duration_s) and duration_s > 0 else 0.0
        row[F_TIMED] += 1
        row[F_DURATION_SUM] += duration
        row[F_BUCKETS + bucket_index(duration)] += 1


def judged(row: Sequence[float]) -> float:
    """The recoveries of ``row`` that count towards the success rate: all but the
    ``rejected`` ones and the ``failed`` ones whose error is not retryable."""
    return row[F_RECOVERIES] - row[F_OUTCOMES["rejected"]] - row[F_NOT_RETRYABLE]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoverySummary:
    """The numbers of one row over a window of ``window_s`` seconds (see the module docstring
    for the definitions). Times are seconds; rates are in [0, 1]; ``None`` where there is
    nothing to measure."""

    recoveries: int
    recovered: int
    fallback: int
    failed: int
    rejected: int
    budget_exhausted: int
    not_retryable: int
    success_rate: float | None
    recovery_time_p50_s: float | None
    recovery_time_p95_s: float | None
    recovery_time_mean_s: float | None
    errors: int
    error_frequency_per_min: float
    attempts: int
    attempts_mean: float | None
    retries: int
    budget_refusals: int
    breaker_trips: int
    rejections: int
    learned_futile: int
    succeeded_without_retry: int
    succeeded_with_retry: int
    failed_with_retry: int
    failed_without_retry: int

    @property
    def judged(self) -> int:
        """Recoveries that count towards the success rate (all but the ``rejected`` ones and
        the ``not_retryable`` failures)."""
        return self.recoveries - self.rejected - self.not_retryable

    @property
    def timed(self) -> int:
        """Recoveries whose times the percentiles are over (all but the ``rejected`` ones):
        the volume behind the recovery-time figures."""
        return self.recoveries - self.rejected

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def summarize(row: Sequence[float], window_s: float) -> RecoverySummary:
    """The summary of ``row`` accumulated over ``window_s`` seconds (> 0)."""

    def count(index: int) -> int:
        return round(row[index])

    recoveries = count(F_RECOVERIES)
    rejected = count(F_OUTCOMES["rejected"])
    not_retryable = count(F_NOT_RETRYABLE)
    judged = recoveries - rejected - not_retryable
    successes = count(F_OUTCOMES["recovered"]) + count(F_OUTCOMES["fallback"])
    timed = row[F_TIMED]
    buckets = row[F_BUCKETS : F_BUCKETS + len(DURATION_BUCKETS) + 1]
    attempts = count(F_ATTEMPTS)
    minutes = window_s / 60.0 if window_s > 0 else 1.0
    return RecoverySummary(
        recoveries=recoveries,
        recovered=count(F_OUTCOMES["recovered"]),
        fallback=count(F_OUTCOMES["fallback"]),
        failed=count(F_OUTCOMES["failed"]),
        rejected=rejected,
        budget_exhausted=count(F_OUTCOMES["budget_exhausted"]),
        not_retryable=not_retryable,
        success_rate=successes / judged if judged > 0 else None,
        recovery_time_p50_s=histogram_quantile(0.5, buckets) if timed > 0 else None,
        recovery_time_p95_s=histogram_quantile(0.95, buckets) if timed > 0 else None,
        recovery_time_mean_s=row[F_DURATION_SUM] / timed if timed > 0 else None,
        errors=count(F_ERRORS),
        error_frequency_per_min=row[F_ERRORS] / minutes,
        attempts=attempts,
        attempts_mean=attempts / recoveries if recoveries > 0 else None,
        retries=count(F_RETRIES),
        budget_refusals=count(F_BUDGET_REFUSALS),
        breaker_trips=count(F_BREAKER_OPENS),
        rejections=count(F_REJECTIONS),
        learned_futile=count(F_LEARNED_FUTILE),
        succeeded_without_retry=count(F_RESULTS[ResultKind.SUCCEEDED_WITHOUT_RETRY]),
        succeeded_with_retry=count(F_RESULTS[ResultKind.SUCCEEDED_WITH_RETRY]),
        failed_with_retry=count(F_RESULTS[ResultKind.FAILED_WITH_RETRY]),
        failed_without_retry=count(F_RESULTS[ResultKind.FAILED_WITHOUT_RETRY]),
    )
