"""Insights: typed, backed by numbers, one recommendation each; deduplicated and rate-limited."""

from __future__ import annotations

import math

import pytest

from otel_raptor.core.insights import (
    Insight,
    InsightBook,
    InsightKind,
    error_spike,
    futile_retries,
    recovery_slowing,
)
from otel_raptor.core.recovery_stats import (
    F_BUCKETS,
    ROW_FIELDS,
    ResultKind,
    add_recovery,
    result_kind,
    summarize,
)
from otel_raptor.errors import ConfigError


def _spike(service: str = "api", now: float = 0.0) -> Insight:
    return error_spike(
        service=service,
        category="timeout",
        per_minute=52.0,
        baseline_per_minute=13.0,
        ratio=4.0,
        score=9.1,
        window_s=600.0,
        recovery_p95_s=8.2,
        now=now,
    )


def test_a_spike_says_what_with_numbers_and_one_thing_to_do() -> None:
    insight = _spike()
    assert insight.kind is InsightKind.ERROR_SPIKE
    assert insight.summary == (
        "timeout errors at api rose 4.0x in 10 min (52.0/min against a baseline of"
        " 13.0/min); p95 recovery 8.2 s"
    )
    assert insight.recommendation == (
        "raise the attempt timeout or lower max_retries (each retry waits for it)"
    )
    assert dict(insight.evidence) == {
        "errors_per_minute": 52.0,
        "baseline_per_minute": 13.0,
        "ratio": 4.0,
        "score": 9.1,
        "recovery_p95_s": 8.2,
    }


def test_futile_retries_on_a_conflict() -> None:
    insight = futile_retries(
        service="orders:443",
        category="concurrency",
        strategy="retry_with_backoff",
        error_type="409",
        retried=37,
        succeeded=0,
        window_s=300,
        now=0,
    )
    assert insight.summary.startswith("retries on 409 (concurrency) at orders:443 never succeed")
    assert insight.recommendation.startswith("stop retrying concurrency")


def test_a_slowdown_dominated_by_timeouts_says_so() -> None:
    insight = recovery_slowing(
        service="db", mean_s=6.0, reference_s=2.0, ratio=3.0, p95_s=9.0, timeout_share=0.8, now=0
    )
    assert "80% of its failures are timeouts" in insight.recommendation


def test_the_book_announces_once_then_after_the_repeat_interval() -> None:
    book = InsightBook(ttl_s=3600, repeat_after_s=600, max_per_minute=10)
    assert book.add(_spike(now=0), 0) is not None
    assert book.add(_spike(now=60), 60) is None
    [held] = book.current(60)
    assert held.count == 2
    assert book.add(_spike(now=600), 600) is not None


def test_the_book_is_rate_limited_and_bounded() -> None:
    book = InsightBook(max_per_minute=3, max_insights=5)
    announced = [book.add(_spike(service=f"s{i}"), 0) for i in range(8)]
    assert sum(a is not None for a in announced) == 3
    assert book.suppressed == 5
    assert len(book) == 5  # the oldest were dropped
    # The bucket refills at 3 a minute.
    assert book.add(_spike(service="late"), 20.0) is not None


def test_insights_expire() -> None:
    book = InsightBook(ttl_s=100)
    book.add(_spike(), 0)
    assert len(book.current(100)) == 1
    assert book.current(101) == []


@pytest.mark.parametrize(
    ("key", "value"),
    [("ttl_s", 0), ("repeat_after_s", -1), ("max_per_minute", 0), ("max_insights", 1.5)],
)
def test_book_options_are_validated(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=r"monitor\."):
        InsightBook(**{key: value})


# --------------------------------------------------------------- recovery_stats


@pytest.mark.parametrize(
    ("outcome", "attempts", "kind"),
    [
        ("recovered", 2, ResultKind.SUCCEEDED_WITH_RETRY),
        ("fallback", 1, ResultKind.SUCCEEDED_WITHOUT_RETRY),
        ("fallback", 0, ResultKind.SUCCEEDED_WITHOUT_RETRY),
        ("fallback", 3, ResultKind.SUCCEEDED_WITH_RETRY),
        ("failed", 4, ResultKind.FAILED_WITH_RETRY),
        ("failed", 1, ResultKind.FAILED_WITHOUT_RETRY),
        ("rejected", 0, ResultKind.FAILED_WITHOUT_RETRY),
        ("budget_exhausted", 1, ResultKind.FAILED_WITHOUT_RETRY),
    ],
)
def test_the_four_kinds(outcome: str, attempts: int, kind: ResultKind) -> None:
    assert result_kind(outcome, attempts) is kind


def test_a_summary_leaves_rejections_out_of_the_rates_and_times() -> None:
    row = [0.0] * ROW_FIELDS
    for _ in range(8):
        add_recovery(row, "recovered", 2, 0.4)
    add_recovery(row, "failed", 4, 3.0)
    add_recovery(row, "failed", 4, 3.0)
    for _ in range(5):
        add_recovery(row, "rejected", 0, 0.0)
    summary = summarize(row, 60.0)
    assert summary.recoveries == 15
    assert summary.judged == 10
    assert summary.success_rate == pytest.approx(0.8)
    assert summary.recovery_time_mean_s == pytest.approx((8 * 0.4 + 6.0) / 10)
    # p50 falls in (0.25, 0.5]: PromQL's interpolation, 5th of 8 in that bucket.
    assert summary.recovery_time_p50_s == pytest.approx(0.25 + 0.25 * 5 / 8)
    assert summary.attempts_mean == pytest.approx((16 + 8) / 15)
    assert summary.failed_without_retry == 5
    assert sum(row[F_BUCKETS:]) == 10


def test_a_summary_leaves_errors_nothing_could_recover_out_of_the_rates_and_times() -> None:
    row = [0.0] * ROW_FIELDS
    add_recovery(row, "recovered", 2, 0.4)
    for _ in range(3):
        add_recovery(row, "failed", 1, 0.001, give_up_reason="not_retryable")
    add_recovery(row, "failed", 1, 0.001, give_up_reason="not_replay_safe")
    summary = summarize(row, 60.0)
    assert (summary.recoveries, summary.failed, summary.not_retryable) == (5, 4, 3)
    assert summary.judged == 2
    assert summary.success_rate == pytest.approx(0.5)
    assert summary.recovery_time_mean_s == pytest.approx((0.4 + 4 * 0.001) / 5)
    assert summary.failed_without_retry == 4


def test_an_empty_summary_has_no_rates() -> None:
    summary = summarize([0.0] * ROW_FIELDS, 60.0)
    assert summary.success_rate is None
    assert summary.recovery_time_p95_s is None
    assert summary.attempts_mean is None
    assert summary.error_frequency_per_min == 0.0


def test_a_nonsense_duration_counts_as_zero() -> None:
    row = [0.0] * ROW_FIELDS
    add_recovery(row, "recovered", 2, math.nan)
    add_recovery(row, "recovered", 2, -1.0)
    assert summarize(row, 60).recovery_time_mean_s == 0.0
