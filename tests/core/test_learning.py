from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otel_raptor import ConfigError, Strategy
from otel_raptor.core.learning import LearnerOptions, StrategyLearner

RETRY = Strategy.RETRY_WITH_BACKOFF
ADJUST = Strategy.TIMEOUT_ADJUST


def learner(**options: float) -> StrategyLearner:
    return StrategyLearner(LearnerOptions(**options))  # type: ignore[arg-type]


def test_unknown_combinations_are_worth_retrying() -> None:
    assert learner().should_retry("s", "timeout", RETRY, now=0.0)


def test_a_category_that_never_recovers_stops_getting_retries_but_is_probed() -> None:
    lrn = learner(min_samples=5, probe_every=3, probe_after_s=1e9)
    for _ in range(5):
        lrn.record("s", "connection", RETRY, recovered=False, now=0.0)
    answers = [lrn.should_retry("s", "connection", RETRY, now=0.0) for _ in range(9)]
    assert answers == [False, False, True] * 3


def test_one_recovery_is_not_enough_but_a_few_lift_the_verdict() -> None:
    lrn = learner(min_samples=5, futile_below=0.2, probe_after_s=1e9)
    for _ in range(8):
        lrn.record("s", "connection", RETRY, recovered=False, now=0.0)
    assert not lrn.should_retry("s", "connection", RETRY, now=0.0)
    for _ in range(3):
        lrn.record("s", "connection", RETRY, recovered=True, now=0.0)
    assert lrn.should_retry("s", "connection", RETRY, now=0.0)


def test_an_idle_period_brings_a_probe() -> None:
    lrn = learner(min_samples=2, probe_every=1000, probe_after_s=60.0)
    for _ in range(5):
        lrn.record("s", "timeout", RETRY, recovered=False, now=0.0)
    assert not lrn.should_retry("s", "timeout", RETRY, now=30.0)
    assert lrn.should_retry("s", "timeout", RETRY, now=61.0)


def test_outcomes_decay_with_the_half_life() -> None:
    lrn = learner(half_life_s=100.0)
    lrn.record("s", "timeout", RETRY, recovered=True, now=0.0)
    lrn.record("s", "timeout", RETRY, recovered=True, now=0.0)
    stats = lrn.stats("s", "timeout", RETRY, now=100.0)
    assert stats.attempts == pytest.approx(1.0)
    assert stats.successes == pytest.approx(1.0)
    assert lrn.stats("s", "timeout", RETRY, now=300.0).attempts == pytest.approx(0.25)


def test_best_strategy_needs_evidence_to_leave_the_default() -> None:
    lrn = learner(min_samples=3)
    assert lrn.best_strategy("s", "timeout", (ADJUST, RETRY), now=0.0) is ADJUST
    for _ in range(2):
        lrn.record("s", "timeout", RETRY, recovered=True, now=0.0)
    assert lrn.best_strategy("s", "timeout", (ADJUST, RETRY), now=0.0) is ADJUST
    lrn.record("s", "timeout", RETRY, recovered=True, now=0.0)
    assert lrn.best_strategy("s", "timeout", (ADJUST, RETRY), now=0.0) is RETRY
    for _ in range(10):
        lrn.record("s", "timeout", ADJUST, recovered=True, now=0.0)
    assert lrn.best_strategy("s", "timeout", (ADJUST, RETRY), now=0.0) is ADJUST


@given(st.lists(st.tuples(st.text(max_size=3), st.booleans()), max_size=200))
def test_the_table_stays_bounded(records: list[tuple[str, bool]]) -> None:
    lrn = learner(max_entries=8)
    for i, (service, ok) in enumerate(records):
        lrn.record(service, "timeout", RETRY, recovered=ok, now=float(i))
    assert len(lrn) <= 8


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("half_life_s", 0),
        ("min_samples", 0.5),
        ("futile_below", 1.0),
        ("probe_every", 0),
        ("probe_after_s", -1),
        ("max_entries", 0),
        # Wrong types: a bare TypeError, or (True, 2.5) accepted without a word.
        ("half_life_s", "600"),
        ("min_samples", None),
        ("min_samples", True),
        ("futile_below", "0.1"),
        ("probe_every", 2.5),
        ("probe_after_s", None),
        ("max_entries", True),
    ],
)
def test_invalid_options_name_the_key(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"learning\.{field}=") as caught:
        LearnerOptions(**{field: value})  # type: ignore[arg-type]
    assert caught.value.value == value
