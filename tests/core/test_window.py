from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_raptor.core.window import (
    CallOutcome,
    CountWindow,
    SlidingWindow,
    TimeWindow,
    outcome_of,
)
from otel_raptor.errors import ConfigError

S, F, SS, SF = (
    CallOutcome.SUCCESS,
    CallOutcome.FAILURE,
    CallOutcome.SLOW_SUCCESS,
    CallOutcome.SLOW_FAILURE,
)
FAILED = {S: 0, F: 1, SS: 0, SF: 1}
SLOW = {S: 0, F: 0, SS: 1, SF: 1}

outcomes = st.sampled_from([S, F, SS, SF])


def totals(window: SlidingWindow, now: float) -> tuple[int, int, int]:
    return window.calls(now), window.failures(now), window.slow_calls(now)


def model_totals(items: list[CallOutcome]) -> tuple[int, int, int]:
    return (
        len(items),
        sum(FAILED[o] for o in items),
        sum(SLOW[o] for o in items),
    )


def absorbs(window: CountWindow) -> bool:
    return window.absorbs_success  # a call, so that mypy does not narrow it between reads


# --- CountWindow -----------------------------------------------------------------------------


def test_outcome_of() -> None:
    assert outcome_of(failed=False, slow=False) is S
    assert outcome_of(failed=True, slow=False) is F
    assert outcome_of(failed=False, slow=True) is SS
    assert outcome_of(failed=True, slow=True) is SF


def test_count_window_evicts_the_oldest() -> None:
    w = CountWindow(3)
    assert (w.calls(), w.failures(), w.slow_calls()) == (0, 0, 0)
    assert w.failure_rate() == 0.0
    assert w.slow_call_rate() == 0.0
    w.record(F)
    w.record(SS)
    w.record(S)
    assert (w.calls(), w.failures(), w.slow_calls()) == (3, 1, 1)
    assert w.failure_rate() == pytest.approx(1 / 3)
    w.record(S)  # evicts F
    assert (w.calls(), w.failures(), w.slow_calls()) == (3, 0, 1)
    w.record(SF)  # evicts SS
    assert (w.calls(), w.failures(), w.slow_calls()) == (3, 1, 1)
    assert w.slow_call_rate() == pytest.approx(1 / 3)
    w.reset()
    assert (w.calls(), w.failures(), w.slow_calls()) == (0, 0, 0)


def test_count_window_absorbs_success_only_when_full_of_successes() -> None:
    w = CountWindow(2)
    assert not absorbs(w)
    w.record(S)
    assert not absorbs(w)
    w.record(S)
    assert absorbs(w)
    w.record(F)
    assert not absorbs(w)
    assert (w.calls(), w.failures()) == (2, 1)
    w.record(S)
    w.record(S)
    assert absorbs(w)
    w.reset()
    assert not absorbs(w)


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "3"])
def test_count_window_rejects_bad_size(size: object) -> None:
    with pytest.raises(ConfigError) as info:
        CountWindow(size)  # type: ignore[arg-type]
    assert info.value.key == "window.size"


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=12),
    ops=st.lists(st.one_of(outcomes, st.just("reset")), max_size=80),
)
def test_count_window_matches_naive_model(size: int, ops: list[CallOutcome | str]) -> None:
    w = CountWindow(size)
    model: list[CallOutcome] = []
    for op in ops:
        if op == "reset":
            w.reset()
            model.clear()
        else:
            assert isinstance(op, CallOutcome)
            w.record(op)
            model = [*model, op][-size:]
        assert totals(w, 0.0) == model_totals(model)
        calls, failures, slow = model_totals(model)
        assert w.failure_rate() == (failures / calls if calls else 0.0)
        assert w.slow_call_rate() == (slow / calls if calls else 0.0)
        assert w.absorbs_success == (len(model) == size and all(o is S for o in model))


# --- TimeWindow ------------------------------------------------------------------------------


def test_time_window_forgets_after_its_span() -> None:
    w = TimeWindow(10.0, buckets=10)  # 1-second slices
    w.record(F, 100.2)
    w.record(S, 100.9)
    w.record(SS, 105.0)
    assert totals(w, 105.5) == (3, 1, 1)
    # At 109.99 the slice of 100.x is still the oldest of the 10.
    assert totals(w, 109.99) == (3, 1, 1)
    # At 110.0 the slice 100 falls out; 105 stays until 115.
    assert totals(w, 110.0) == (1, 0, 1)
    assert w.slow_call_rate(110.0) == 1.0
    assert totals(w, 115.0) == (0, 0, 0)
    assert w.failure_rate(115.0) == 0.0


def test_time_window_long_jump_clears_everything() -> None:
    w = TimeWindow(5.0, buckets=5)
    for i in range(20):
        w.record(F, 1000.0 + i * 0.25)
    assert w.calls(1004.9) == 20
    assert w.failure_rate(1004.9) == 1.0
    assert totals(w, 1_000_000.0) == (0, 0, 0)
    w.record(S, 1_000_000.5)
    assert totals(w, 1_000_000.5) == (1, 0, 0)


def test_time_window_treats_the_past_as_now() -> None:
    w = TimeWindow(2.0, buckets=2)
    w.record(S, 50.0)
    w.record(F, 10.0)  # earlier than seen: lands in the current slice
    assert totals(w, 50.0) == (2, 1, 0)
    assert totals(w, 52.0) == (0, 0, 0)


def test_time_window_reset() -> None:
    w = TimeWindow(3.0, buckets=3)
    w.record(SF, 1.0)
    w.reset()
    assert totals(w, 1.0) == (0, 0, 0)
    w.record(S, 1.5)
    assert totals(w, 1.5) == (1, 0, 0)
    assert w.absorbs_success is False


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"seconds": 0}, "window.seconds"),
        ({"seconds": -1.0}, "window.seconds"),
        ({"seconds": float("inf")}, "window.seconds"),
        ({"seconds": float("nan")}, "window.seconds"),
        ({"seconds": True}, "window.seconds"),
        ({"seconds": 1.0, "buckets": 0}, "window.buckets"),
        ({"seconds": 1.0, "buckets": 2.0}, "window.buckets"),
    ],
)
def test_time_window_rejects_bad_arguments(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        TimeWindow(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


# Steps: record an outcome after a time gap, or query after a gap. Gaps mix tiny steps, slice
# scale steps, jumps longer than the whole window, and (rarely) going back in time.
gaps = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=0.3),
    st.floats(min_value=0.0, max_value=3.0),
    st.floats(min_value=5.0, max_value=1e4),
    st.floats(min_value=-2.0, max_value=0.0),
)
steps = st.lists(
    st.tuples(st.sampled_from(["record", "query", "reset"]), gaps, outcomes), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(
    seconds=st.sampled_from([1.0, 2.5, 3.0, 10.0]),
    buckets=st.integers(min_value=1, max_value=8),
    start=st.floats(min_value=0.0, max_value=1e6),
    script=steps,
)
def test_time_window_matches_naive_model(
    seconds: float,
    buckets: int,
    start: float,
    script: list[tuple[str, float, CallOutcome]],
) -> None:
    w = TimeWindow(seconds, buckets=buckets)
    width = seconds / buckets
    # The naive model: every (slice number, outcome) ever recorded; a call counts while its
    # slice is among the newest ``buckets`` slices. A time earlier than the newest one seen
    # counts as the newest (documented behaviour for a clock that went back).
    model: list[tuple[float, CallOutcome]] = []
    newest = float("-inf")
    now = start
    for action, gap, outcome in script:
        now += gap
        newest = max(newest, now // width)
        if action == "record":
            w.record(outcome, now)
            model.append((newest, outcome))
        elif action == "reset":
            w.reset()
            model.clear()
        live = [o for (epoch, o) in model if epoch > newest - buckets]
        assert totals(w, now) == model_totals(live)
        calls, failures, slow = model_totals(live)
        assert w.failure_rate(now) == (failures / calls if calls else 0.0)
        assert w.slow_call_rate(now) == (slow / calls if calls else 0.0)
