from __future__ import annotations

import math
import pathlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_raptor.core.budget import RetryBudget
from otel_raptor.errors import ConfigError


def drain(budget: RetryBudget, now: float) -> int:
    """Withdraw until refused; how many were granted."""
    granted = 0
    while budget.try_withdraw(now):
        granted += 1
    return granted


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"ratio": -0.1}, "retry_budget.ratio"),
        ({"ratio": math.nan}, "retry_budget.ratio"),
        ({"ratio": True}, "retry_budget.ratio"),
        ({"min_retries_per_second": -1.0}, "retry_budget.min_retries_per_second"),
        ({"min_retries_per_second": math.inf}, "retry_budget.min_retries_per_second"),
        ({"ttl": 0.0}, "retry_budget.ttl"),
        ({"ttl": "10"}, "retry_budget.ttl"),
        ({"now": math.nan}, "retry_budget.now"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RetryBudget(**kwargs)  # type: ignore[arg-type]
    assert caught.value.key == key


def test_defaults_and_a_fresh_budget_holds_one_second_of_the_floor() -> None:
    budget = RetryBudget(now=0.0)
    assert (budget.ratio, budget.min_retries_per_second, budget.ttl) == (0.2, 10.0, 10.0)
    assert budget.tokens(0.0) == 10.0
    assert drain(budget, 0.0) == 10


def test_zero_ratio_and_floor_never_allow_a_retry() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0, now=0.0)
    for _ in range(100):
        budget.record_call()
    assert not budget.try_withdraw(50.0)


def test_each_call_deposits_ratio_of_a_token() -> None:
    budget = RetryBudget(ratio=0.25, min_retries_per_second=0.0, now=0.0)
    for _ in range(8):
        budget.record_call()
    assert budget.tokens(0.0) == pytest.approx(2.0)
    assert drain(budget, 0.0) == 2
    assert budget.tokens(0.0) == pytest.approx(0.0)


def test_tokens_is_a_pure_read() -> None:
    budget = RetryBudget(now=0.0)
    for _ in range(50):
        budget.record_call()
    assert budget.tokens(1.0) == budget.tokens(1.0)
    assert budget.tokens(0.0) == pytest.approx(20.0)
    assert drain(budget, 0.0) == 20  # the reads above consumed nothing


def test_the_floor_refills_at_min_retries_per_second() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=10.0, now=0.0)
    assert drain(budget, 0.0) == 10
    # refilled at 10/s, minus a leak of at most 1 - (1 - e^-0.1)/0.1 ≈ 5 %
    assert drain(budget, 1.0) == 9
    assert budget.tokens(1.0) == pytest.approx(0.516, abs=1e-3)


def test_a_retry_storm_is_bounded() -> None:
    # 1000 calls in one second, every one failing and asking for a retry
    budget = RetryBudget(now=0.0)
    granted = 0
    for i in range(1000):
        now = i / 1000
        budget.record_call()
        granted += budget.try_withdraw(now)
    # 0.2 * 1000 from the calls, 10 from the floor's second, 10 held at the start
    assert 200 <= granted <= 0.2 * 1000 + 10 + 10
    assert budget.tokens(1.0) < 1.5


def test_a_storm_after_a_long_quiet_spell_gets_no_more_than_the_cap() -> None:
    # 100 successful calls per second for an hour, then a storm: the bank holds about
    # ratio * calls_in_ttl + floor * ttl = 0.2 * 1000 + 10 * 10 = 300, not 0.2 * 360_000.
    budget = RetryBudget(now=0.0)
    for _ in range(360_000):
        budget.record_call()
    assert budget.tokens(3600.0) == pytest.approx(300.0)
    assert drain(budget, 3600.0) == 300


def test_banked_tokens_leak_with_time_constant_ttl() -> None:
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, now=0.0)
    for _ in range(100):
        budget.record_call()
    assert budget.try_withdraw(0.0)  # folds the 100 deposits at t=0, leaves 99
    assert budget.tokens(10.0) == pytest.approx(99 * math.exp(-1))
    assert budget.tokens(100.0) < 0.01


def test_low_traffic_still_gets_its_retries() -> None:
    # one call a second, every one failing and retried three times: the floor pays for it
    budget = RetryBudget(now=0.0)
    granted = 0
    for second in range(600):
        budget.record_call()
        for retry in range(3):
            granted += budget.try_withdraw(second + 0.1 * (retry + 1))
    assert granted == 1800


def test_without_a_start_time_early_calls_are_credited_when_the_clock_starts() -> None:
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0.0)
    for _ in range(100):
        budget.record_call()
    assert drain(budget, 1234.0) == 10
    assert budget.tokens(1234.0 + 10.0) == pytest.approx(0.0)


def test_a_clock_that_goes_back_does_not_refill() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=10.0, now=100.0)
    assert drain(budget, 100.0) == 10
    assert not budget.try_withdraw(50.0)
    assert budget.tokens(100.0) == 0.0


def test_repr_mentions_the_settings() -> None:
    assert "ratio=0.2" in repr(RetryBudget())


steps = st.lists(
    st.one_of(
        st.tuples(st.just("calls"), st.integers(1, 500)),
        st.tuples(st.just("withdraw"), st.integers(1, 50)),
        st.tuples(st.just("wait"), st.floats(0.0, 30.0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.floats(0.0, 2.0),
    floor=st.floats(0.0, 20.0),
    ttl=st.floats(0.5, 60.0),
    steps=steps,
)
def test_retries_never_exceed_ratio_times_calls_plus_the_floor(
    ratio: float, floor: float, ttl: float, steps: list[tuple[str, float]]
) -> None:
    budget = RetryBudget(ratio=ratio, min_retries_per_second=floor, ttl=ttl, now=0.0)
    initial = budget.tokens(0.0)
    now = 0.0
    calls = 0
    granted = 0
    for kind, amount in steps:
        if kind == "calls":
            for _ in range(int(amount)):
                budget.record_call()
            calls += int(amount)
        elif kind == "withdraw":
            for _ in range(int(amount)):
                granted += budget.try_withdraw(now)
        else:
            now += amount
        balance = budget.tokens(now)
        assert balance >= 0.0
        assert granted <= ratio * calls + floor * now + initial + 1e-9
        # idle time banks at most ttl seconds of the floor, however long it lasts
        assert balance <= ratio * calls + max(initial, floor * ttl) + 1e-9


def test_the_worked_example_of_the_docs_is_what_the_budget_does() -> None:
    """docs/retries.md's worked example, recomputed with ``RetryBudget`` as the docs say it
    was: 50 calls/s after a healthy spell (the balance settled at 200), then an outage where
    every call, recorded, asks for four retries at its instant (all four, granted or not:
    "retries wanted"); the balance read at the end of each second. "3 onwards" is checked
    over a minute."""
    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "retries.md"
    section = doc.read_text().split("**Worked example.**", 1)[1].split("\n\n", 2)[1]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ][1:]
    assert [row[0] for row in rows] == ["1", "2", "3 onwards"]

    per_second, retries, healthy_s = 50, 4, 100

    def outage(*, stop_at_refusal: bool) -> list[tuple[int, int, float]]:
        budget = RetryBudget(now=0.0)
        for _ in range(per_second * healthy_s):
            budget.record_call()
        assert budget.tokens(float(healthy_s)) == pytest.approx(200, abs=0.1)
        seconds = []
        for second in range(60):
            start = healthy_s + second
            wanted = granted = 0
            for i in range(per_second):
                budget.record_call()
                for _ in range(retries):
                    wanted += 1
                    if budget.try_withdraw(start + i / per_second):
                        granted += 1
                    elif stop_at_refusal:
                        break
            seconds.append((wanted, granted, budget.tokens(start + 1.0)))
        return seconds

    seconds = outage(stop_at_refusal=False)
    stopping = outage(stop_at_refusal=True)
    assert [s[1] for s in stopping] == [s[1] for s in seconds]

    for row, (wanted, granted, balance) in zip(rows[:2], seconds[:2], strict=True):
        assert (int(row[1]), int(row[2])) == (wanted, granted), row
        assert float(row[3]) == pytest.approx(balance, abs=0.05), row
    # "20, 19 one second in N" and "between LOW and HIGH", from the third second on.
    later = seconds[2:]
    granted_cell = re.fullmatch(r"(\d+), (\d+) one second in (\d+)", rows[2][2])
    balance_cell = re.fullmatch(r"between (\S+) and (\S+)", rows[2][3])
    assert granted_cell is not None, rows[2]
    assert balance_cell is not None, rows[2]
    usual, rarely, one_in = map(int, granted_cell.groups())
    low, high = map(float, balance_cell.groups())
    assert all(wanted == int(rows[2][1]) for wanted, _, _ in later)
    assert {granted for _, granted, _ in later} == {usual, rarely}
    rare = sum(granted == rarely for _, granted, _ in later)
    assert round(len(later) / rare) == one_in
    assert all(low <= round(balance, 1) <= high for _, _, balance in later)
