from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from otel_raptor.core.breaker import (
    ADAPTIVE_ALPHA,
    FRESH_CONNECTION_S,
    MAX_UNCONFIRMED_HELD,
    UNCONFIRMED_HELD_S,
    BreakerCore,
    CircuitBreakerConfig,
    Permit,
    adaptive_failure_rate_threshold,
    confident_failure_rate,
)
from otel_raptor.core.classification import NON_HEALTH_CATEGORIES, ErrorCategory
from otel_raptor.core.states import CircuitState, Transition, TransitionReason
from otel_raptor.errors import ConfigError

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
CALL, PROBE, REJECTED = Permit.CALL, Permit.PROBE, Permit.REJECTED
TIMEOUT = ErrorCategory.TIMEOUT
R = TransitionReason


def no_jitter() -> float:
    return 0.5  # 2 * 0.5 - 1 == 0: the open duration is exactly the base


def make(rnd: Any = no_jitter, now: float = 0.0, **options: Any) -> BreakerCore:
    options.setdefault("adaptive_threshold", False)
    # The trip tests read the open duration in their transitions: pinned, not the default.
    options.setdefault("recovery_timeout", 60.0)
    return BreakerCore(CircuitBreakerConfig(**options), now=now, rnd=rnd)


def fail(core: BreakerCore, now: float, duration: float = 0.01) -> Transition | None:
    permit, transition = core.acquire(now)
    assert transition is None
    assert permit is CALL
    return core.on_failure(permit, now, duration, TIMEOUT)


def succeed(core: BreakerCore, now: float, duration: float = 0.01) -> Transition | None:
    permit, transition = core.acquire(now)
    assert transition is None
    assert permit is CALL
    return core.on_success(permit, now, duration)


def run(core: BreakerCore, pattern: str, now: float, step: float = 0.0) -> list[Transition]:
    """Drive CLOSED calls: ``F`` fails, ``S`` succeeds; time advances by ``step`` per call.

    Stops at the first transition (the breaker is then OPEN) and returns it, else ``[]``.
    """
    for mark in pattern:
        transition = fail(core, now) if mark == "F" else succeed(core, now)
        if transition is not None:
            return [transition]
        now += step
    return []


def baseline(core: BreakerCore) -> float | None:
    return core.baseline_failure_rate  # a call, so that mypy does not narrow it between reads


def forced(core: BreakerCore) -> bool:
    return core.forced_open


def trip(core: BreakerCore, now: float) -> Transition:
    """Open a breaker configured with failure_threshold=1."""
    transition = fail(core, now)
    assert transition is not None
    assert transition.to_state is OPEN
    return transition


# --- CLOSED → OPEN ---------------------------------------------------------------------------


def test_trips_on_consecutive_failures() -> None:
    core = make(failure_threshold=3, minimum_calls=100)
    assert fail(core, 1.0) is None
    assert fail(core, 2.0) is None
    assert core.consecutive_failures == 2
    assert succeed(core, 3.0) is None  # a success breaks the streak
    assert core.consecutive_failures == 0
    assert fail(core, 4.0) is None
    assert fail(core, 5.0) is None
    transition = fail(core, 6.0)
    assert transition == Transition(CLOSED, OPEN, R.CONSECUTIVE_FAILURES, 6.0, 60.0)
    assert core.state is OPEN
    assert core.open_until == 66.0
    assert core.open_for == 60.0
    assert core.acquire(7.0) == (REJECTED, None)
    assert core.retry_after(16.0) == 50.0


def retry_fails(core: BreakerCore, now: float, category: ErrorCategory = TIMEOUT) -> Any:
    permit, _ = core.acquire(now)
    return core.on_failure(permit, now, 0.01, category, retry=True)


def test_one_calls_retries_alone_do_not_trip_the_consecutive_rule() -> None:
    # One request that times out five times (an attempt and four retries) is one slow
    # request, not an outage: the downstream may answer every other request.
    core = make(failure_threshold=3, minimum_calls=100)
    assert fail(core, 1.0) is None
    for at in (2.0, 3.0, 4.0, 5.0):
        assert retry_fails(core, at) is None
    assert core.consecutive_failures == 5
    assert core.state is CLOSED
    # A second call failing too makes the run evidence: it trips at once.
    transition = fail(core, 6.0)
    assert transition is not None
    assert transition.reason is R.CONSECUTIVE_FAILURES
    # A success starts a new run: its calls are counted afresh.
    core = make(failure_threshold=3, minimum_calls=100)
    assert fail(core, 1.0) is None
    assert succeed(core, 2.0) is None
    for at in (3.0, 4.0, 5.0):
        assert retry_fails(core, at) is None  # the first call's retries, after the success
    assert core.state is CLOSED


def test_retries_refused_by_the_downstream_trip_on_their_own() -> None:
    # A refused connection is about the downstream, not one request.
    core = make(failure_threshold=3, minimum_calls=100)
    permit, _ = core.acquire(1.0)
    assert core.on_failure(permit, 1.0, 0.01, ErrorCategory.CONNECTION) is None
    assert retry_fails(core, 2.0, ErrorCategory.CONNECTION) is None
    transition = retry_fails(core, 3.0, ErrorCategory.CONNECTION)
    assert transition is not None
    assert transition.reason is R.CONSECUTIVE_FAILURES


def test_one_calls_503s_alone_do_not_trip_the_consecutive_rule() -> None:
    # A 503 is an answer: one route of a live origin may give it to every attempt (its
    # backend is down) while every other route answers.
    core = make(failure_threshold=3, minimum_calls=100)
    permit, _ = core.acquire(1.0)
    assert core.on_failure(permit, 1.0, 0.01, ErrorCategory.UNAVAILABLE) is None
    for at in (2.0, 3.0, 4.0, 5.0):
        assert retry_fails(core, at, ErrorCategory.UNAVAILABLE) is None
    assert core.state is CLOSED
    permit, _ = core.acquire(6.0)  # a second call answered 503 as well: evidence
    transition = core.on_failure(permit, 6.0, 0.01, ErrorCategory.UNAVAILABLE)
    assert transition is not None
    assert transition.reason is R.CONSECUTIVE_FAILURES


def test_trips_on_failure_rate_only_with_minimum_calls() -> None:
    core = make(failure_threshold=100, window_size=10, minimum_calls=10)
    # 9 failures in 9 calls: 100 % failures but below minimum_calls.
    assert run(core, "FFFFFFFFF", 1.0) == []
    assert core.state is CLOSED
    assert run(core, "F", 2.0) == [Transition(CLOSED, OPEN, R.FAILURE_RATE, 2.0, 60.0)]


def test_failure_rate_trips_only_when_the_window_shows_it_with_confidence() -> None:
    # 100 calls at 50 %: the lower 95 % bound of 59/100 is 0.508, of 58/100 0.498.
    assert confident_failure_rate(59, 100) >= 0.5 > confident_failure_rate(58, 100)
    core = make(failure_threshold=1000, window_size=100, minimum_calls=20)
    assert run(core, "S" * 42, 1.0) == []
    assert run(core, "F" * 58, 2.0) == []  # 58 %: could be bad luck at 50 %
    assert core.state is CLOSED
    assert run(core, "F", 3.0) == [Transition(CLOSED, OPEN, R.FAILURE_RATE, 3.0, 60.0)]


def test_a_degraded_downstream_never_trips_a_dead_one_does() -> None:
    # 40 % failures in every window, never more than two in a row: degraded, not down.
    core = make(window_size=100, minimum_calls=20)
    assert run(core, "FSFSS" * 200, 1.0) == []
    assert core.state is CLOSED
    # A dead downstream: a run of minimum_calls failures trips at any volume.
    transitions = run(core, "F" * 20, 2.0)
    assert [t.reason for t in transitions] == [R.CONSECUTIVE_FAILURES]


def test_the_consecutive_rule_alone_applies_at_low_volume_only() -> None:
    core = make(failure_threshold=5, window_size=100, minimum_calls=20)
    assert run(core, "S" * 30, 1.0) == []
    # 30 calls of history: five in a row is not enough evidence any more ...
    assert run(core, "FFFFF", 2.0) == []
    assert core.consecutive_failures == 5
    # ... a run of minimum_calls is.
    assert run(core, "F" * 14, 3.0) == []
    assert run(core, "F", 4.0) == [Transition(CLOSED, OPEN, R.CONSECUTIVE_FAILURES, 4.0, 60.0)]


def test_confident_failure_rate_values() -> None:
    assert confident_failure_rate(0, 0) == 0.0
    assert confident_failure_rate(0, 10) == 0.0
    assert confident_failure_rate(20, 20) == pytest.approx(0.881, abs=1e-3)
    assert confident_failure_rate(14, 20) >= 0.5 > confident_failure_rate(13, 20)
    # Always below the raw rate, and closer to it with more calls.
    assert confident_failure_rate(600, 1000) > confident_failure_rate(60, 100) > 0.5


def test_minimum_calls_above_count_window_acts_as_window_size() -> None:
    core = make(failure_threshold=100, window_size=5, minimum_calls=20)
    assert run(core, "SSSS", 1.0) == []
    assert run(core, "F", 1.0) == []  # 1/5
    assert core.snapshot(1.0).window_calls == 5  # minimum reached: the rate rule applies
    assert run(core, "FFFF", 1.0) == [Transition(CLOSED, OPEN, R.FAILURE_RATE, 1.0, 60.0)]


def test_trips_on_slow_call_rate() -> None:
    core = make(
        failure_threshold=100,
        window_size=4,
        minimum_calls=4,
        slow_call_duration=1.0,
        slow_call_rate_threshold=0.5,
    )
    assert succeed(core, 1.0, duration=0.5) is None
    assert succeed(core, 2.0, duration=1.0) is None  # slow: duration >= slow_call_duration
    assert succeed(core, 3.0, duration=0.2) is None
    assert core.snapshot(3.0).window_slow_calls == 1
    transition = succeed(core, 4.0, duration=3.0)
    assert transition == Transition(CLOSED, OPEN, R.SLOW_CALL_RATE, 4.0, 60.0)


def test_slow_failures_count_for_both_rates() -> None:
    core = make(
        failure_threshold=100,
        window_size=4,
        minimum_calls=4,
        failure_rate_threshold=1.0,
        slow_call_duration=1.0,
        slow_call_rate_threshold=0.75,
    )
    assert run(core, "SSS", 1.0) == []
    # Slow failures: the failure rate stays below 1.0, the slow rate reaches 0.75.
    assert fail(core, 2.0, duration=5.0) is None
    assert fail(core, 2.0, duration=5.0) is None
    snapshot = core.snapshot(2.0)
    assert (snapshot.window_calls, snapshot.window_failures, snapshot.window_slow_calls) == (
        4,
        2,
        2,
    )
    transition = fail(core, 3.0, duration=5.0)
    assert transition == Transition(CLOSED, OPEN, R.SLOW_CALL_RATE, 3.0, 60.0)


def test_slow_calls_are_off_by_default() -> None:
    core = make(failure_threshold=100, window_size=4, minimum_calls=4)
    for i in range(10):
        assert succeed(core, float(i), duration=1e6) is None
    assert core.snapshot(10.0).window_slow_calls == 0


def test_ignored_categories_never_trip_and_count_as_neither() -> None:
    core = make(failure_threshold=1, window_size=10, minimum_calls=1)
    for i in range(20):
        permit, _ = core.acquire(float(i))
        assert core.on_failure(permit, float(i), 0.01, ErrorCategory.CLIENT_ERROR) is None
    assert core.state is CLOSED
    assert core.consecutive_failures == 0
    assert core.snapshot(20.0).window_calls == 0
    assert core.failure_counts == {ErrorCategory.CLIENT_ERROR: 20}
    assert ErrorCategory.CLIENT_ERROR in NON_HEALTH_CATEGORIES
    # A counted failure still trips, and shows up in the counts.
    assert fail(core, 21.0) is not None
    assert core.failure_counts == {ErrorCategory.CLIENT_ERROR: 20, TIMEOUT: 1}


def test_live_refusals_never_trip_whatever_their_category() -> None:
    core = make(failure_threshold=1, window_size=10, minimum_calls=1)
    for i in range(20):
        permit, _ = core.acquire(float(i))
        category = ErrorCategory.RESOURCE_EXHAUSTED  # a Redis at maxmemory: OOM
        assert category not in NON_HEALTH_CATEGORIES
        assert core.on_failure(permit, float(i), 0.01, category, live_refusal=True) is None
    assert core.state is CLOSED
    assert core.snapshot(20.0).window_calls == 0
    assert core.failure_counts == {ErrorCategory.RESOURCE_EXHAUSTED: 20}
    # A probe that meets one gives its slot back, as an ignored category does.
    trip(core, 21.0)
    permit, _ = core.acquire(100.0)
    assert permit is PROBE
    category = ErrorCategory.UNAVAILABLE  # a read-only replica: READONLY
    assert core.on_failure(permit, 100.0, 0.0, category, live_refusal=True) is None
    assert (core.state, core.probes_in_flight) == (HALF_OPEN, 0)


def test_ignored_categories_are_configurable() -> None:
    core = make(failure_threshold=1, ignored_categories=frozenset({TIMEOUT}))
    assert fail(core, 1.0) is None  # TIMEOUT ignored now
    permit, _ = core.acquire(2.0)
    transition = core.on_failure(permit, 2.0, 0.0, ErrorCategory.CLIENT_ERROR)
    assert transition is not None
    assert transition.reason is R.CONSECUTIVE_FAILURES


def test_ignored_category_between_failures_does_not_break_the_streak() -> None:
    core = make(failure_threshold=2)
    assert fail(core, 1.0) is None
    permit, _ = core.acquire(1.5)
    assert core.on_failure(permit, 1.5, 0.0, ErrorCategory.QUERY) is None
    assert fail(core, 2.0) is not None


# --- OPEN → HALF_OPEN → CLOSED / OPEN --------------------------------------------------------


def test_open_moves_to_half_open_after_the_timeout() -> None:
    core = make(failure_threshold=1, recovery_timeout=10.0)
    trip(core, 100.0)
    assert core.acquire(109.999) == (REJECTED, None)
    assert core.retry_after(105.0) == 5.0
    assert core.retry_after(200.0) == 0.0
    assert core.state is OPEN  # nothing moves until a call is asked for
    permit, transition = core.acquire(110.0)
    assert permit is PROBE
    assert transition == Transition(OPEN, HALF_OPEN, R.RECOVERY_TIMEOUT_ELAPSED, 110.0)
    assert core.state is HALF_OPEN
    assert core.open_until is None
    assert core.retry_after(110.0) == 0.0


def test_half_open_admits_at_most_half_open_max_calls() -> None:
    core = make(failure_threshold=1, recovery_timeout=1.0, half_open_max_calls=2)
    trip(core, 0.0)
    first, transition = core.acquire(1.0)
    assert (first, transition is not None) == (PROBE, True)
    assert core.acquire(1.0) == (PROBE, None)
    assert core.probes_in_flight == 2
    assert core.acquire(1.0) == (REJECTED, None)
    core.release(first)  # cancelled: the slot comes back, nothing counted
    assert core.probes_in_flight == 1
    assert core.state is HALF_OPEN
    assert core.acquire(1.0) == (PROBE, None)
    assert core.acquire(1.0) == (REJECTED, None)


def test_success_threshold_probe_successes_close() -> None:
    core = make(failure_threshold=1, recovery_timeout=1.0, success_threshold=3)
    trip(core, 0.0)
    for i in range(2):
        permit, _ = core.acquire(1.0 + i)
        assert permit is PROBE
        assert core.on_success(permit, 1.0 + i, 0.01) is None
        assert core.state is HALF_OPEN
    permit, _ = core.acquire(3.0)
    transition = core.on_success(permit, 3.0, 0.01)
    assert transition == Transition(HALF_OPEN, CLOSED, R.PROBES_SUCCEEDED, 3.0)
    assert core.state is CLOSED
    assert core.probes_in_flight == 0
    # Closing starts from an empty window and no streak.
    snapshot = core.snapshot(3.0)
    assert (snapshot.window_calls, snapshot.consecutive_failures) == (0, 0)
    assert core.acquire(3.0) == (CALL, None)


def test_ignored_probe_failure_frees_the_slot_only() -> None:
    core = make(failure_threshold=1, recovery_timeout=1.0, success_threshold=2)
    trip(core, 0.0)
    permit, _ = core.acquire(1.0)
    assert core.on_success(permit, 1.0, 0.0) is None
    permit, _ = core.acquire(2.0)
    assert core.on_failure(permit, 2.0, 0.0, ErrorCategory.AUTHORIZATION) is None
    assert core.state is HALF_OPEN
    assert core.probes_in_flight == 0
    permit, _ = core.acquire(3.0)
    transition = core.on_success(permit, 3.0, 0.0)  # the streak of probe successes survived
    assert transition is not None
    assert transition.to_state is CLOSED


def test_a_stuck_probe_holds_its_slot_for_one_lease_only() -> None:
    # A probe that never ends (no timeout, blackholed downstream) must not keep the breaker
    # half-open, refusing everything, after the downstream is back.
    core = make(failure_threshold=1, recovery_timeout=10.0, success_threshold=2)
    trip(core, 0.0)
    stuck, _ = core.acquire(10.0)
    assert stuck is PROBE
    assert core.acquire(19.9) == (REJECTED, None)  # the lease (recovery_timeout) still runs
    first, _ = core.acquire(20.0)
    assert first is PROBE
    assert (core.probes_in_flight, core.probes_presumed_stuck) == (2, 1)
    assert core.acquire(20.0) == (REJECTED, None)  # the cap holds for live probes
    assert core.on_success(first, 20.1, 0.1) is None
    # The stuck probe does not make the healed downstream wait another lease per probe.
    second, _ = core.acquire(20.2)
    assert second is PROBE
    transition = core.on_success(second, 20.3, 0.1)
    assert transition is not None
    assert transition.to_state is CLOSED
    # When the stuck probe ends at last, its slot comes back and nothing else changes.
    assert core.on_failure(stuck, 500.0, 490.0, TIMEOUT) is None
    assert (core.state, core.probes_in_flight, core.probes_presumed_stuck) == (CLOSED, 0, 0)


def test_the_probe_lease_is_at_least_one_second() -> None:
    core = make(failure_threshold=1, recovery_timeout=0.0)
    trip(core, 0.0)
    assert core.acquire(0.0)[0] is PROBE
    assert core.acquire(0.999) == (REJECTED, None)
    assert core.acquire(1.0) == (PROBE, None)


def test_a_presumed_stuck_probe_that_ends_frees_a_slot() -> None:
    # Which probe ended cannot be told apart: counting stays exact, and at most one probe
    # too many runs while a live one is taken for the stuck one.
    core = make(failure_threshold=1, recovery_timeout=5.0, success_threshold=3)
    trip(core, 0.0)
    stuck, _ = core.acquire(5.0)
    live, _ = core.acquire(10.0)
    assert live is PROBE
    assert core.on_success(stuck, 11.0, 6.0) is None  # late, but a real answer: it counts
    assert (core.probes_in_flight, core.probes_presumed_stuck) == (1, 1)
    extra, _ = core.acquire(11.0)
    assert extra is PROBE
    assert (core.probes_in_flight, core.probes_presumed_stuck) == (2, 1)
    assert core.acquire(11.0) == (REJECTED, None)
    core.release(live)
    assert (core.probes_in_flight, core.probes_presumed_stuck) == (1, 1)
    core.forget_probes()
    assert (core.probes_in_flight, core.probes_presumed_stuck) == (0, 0)


def episode_two_with_a_late_probe_from_episode_one(
    **options: Any,
) -> tuple[BreakerCore, Permit, Permit]:
    """Half-open #1 admits P1, which hangs; its lease runs out, P2 is admitted and fails; the
    breaker reopens, and half-open #2 admits P3. Returns the core, P1 and P3."""
    core = make(failure_threshold=1, recovery_timeout=10.0, half_open_max_calls=1, **options)
    trip(core, 0.0)
    p1, _ = core.acquire(10.0)
    p2, _ = core.acquire(20.0)  # P1's lease ran out: presumed stuck
    assert p1 == p2 == PROBE
    reopened = core.on_failure(p2, 20.5, 0.5, TIMEOUT)
    assert reopened is not None
    assert reopened.to_state is OPEN
    p3, half_open = core.acquire(30.5)
    assert p3 == PROBE
    assert half_open is not None
    assert core.state is HALF_OPEN
    return core, p1, p3


@pytest.mark.parametrize("success_threshold", [1, 2])
def test_a_late_probe_of_an_earlier_half_open_episode_closes_nothing(
    success_threshold: int,
) -> None:
    core, p1, p3 = episode_two_with_a_late_probe_from_episode_one(
        success_threshold=success_threshold
    )
    # P1's answer is 21 s old news, from before the breaker last reopened.
    assert core.on_success(p1, 31.0, 21.0) is None
    assert (core.state, core.probes_in_flight, core.probes_presumed_stuck) == (HALF_OPEN, 1, 0)
    assert core.acquire(31.0) == (REJECTED, None)  # P3 still holds the only slot
    if success_threshold == 2:  # and P1 did not count toward closing either
        assert core.on_success(p3, 31.5, 1.0) is None
        assert core.state is HALF_OPEN
        p4, _ = core.acquire(31.5)
        closed = core.on_success(p4, 31.6, 0.1)
    else:
        closed = core.on_success(p3, 31.5, 1.0)
    assert closed is not None
    assert closed.to_state is CLOSED


def test_a_late_probe_of_an_earlier_half_open_episode_reopens_nothing() -> None:
    core, p1, p3 = episode_two_with_a_late_probe_from_episode_one(success_threshold=1)
    assert core.on_failure(p1, 31.0, 21.0, TIMEOUT) is None
    assert (core.state, core.probes_in_flight) == (HALF_OPEN, 1)
    core.release(p1)  # nor does giving it back free P3's slot
    assert (core.state, core.probes_in_flight) == (HALF_OPEN, 1)
    assert core.acquire(31.0) == (REJECTED, None)
    assert core.failure_counts == {TIMEOUT: 3}  # still tallied, as every failure is
    closed = core.on_success(p3, 31.5, 1.0)
    assert closed is not None
    assert closed.to_state is CLOSED


def test_a_probe_of_an_earlier_episode_holds_no_slot_in_a_later_one() -> None:
    # A new half-open episode starts with every slot free: P1 belongs to an episode whose
    # verdict (P2's failure) is in.
    core = make(failure_threshold=1, recovery_timeout=10.0, half_open_max_calls=2)
    trip(core, 0.0)
    p1, _ = core.acquire(10.0)
    p2, _ = core.acquire(10.0)
    assert core.on_failure(p2, 11.0, 1.0, TIMEOUT) is not None
    assert core.acquire(21.0)[0] == PROBE
    assert core.acquire(21.0)[0] == PROBE
    assert (core.probes_in_flight, core.probes_presumed_stuck) == (2, 0)
    assert core.acquire(21.0) == (REJECTED, None)
    assert core.on_success(p1, 22.0, 12.0) is None
    assert (core.state, core.probes_in_flight) == (HALF_OPEN, 2)


def test_a_probe_in_flight_at_reset_counts_in_no_later_episode() -> None:
    core = make(failure_threshold=1, recovery_timeout=10.0, success_threshold=1)
    trip(core, 0.0)
    p1, _ = core.acquire(10.0)
    assert core.reset(11.0) is not None
    trip(core, 12.0)
    p2, _ = core.acquire(22.0)
    assert core.on_success(p1, 23.0, 13.0) is None
    assert (core.state, core.probes_in_flight) == (HALF_OPEN, 1)
    closed = core.on_success(p2, 23.0, 1.0)
    assert closed is not None
    assert closed.to_state is CLOSED


def test_a_forgotten_probe_that_ends_after_all_counts_nothing_and_frees_nothing() -> None:
    core = make(failure_threshold=1, recovery_timeout=10.0, success_threshold=1)
    trip(core, 0.0)
    p1, _ = core.acquire(10.0)
    core.forget_probes()
    p2, _ = core.acquire(10.5)
    assert p2 == PROBE
    assert core.on_success(p1, 11.0, 1.0) is None
    assert core.on_failure(p1, 11.0, 1.0, TIMEOUT) is None
    core.release(p1)
    assert (core.state, core.probes_in_flight) == (HALF_OPEN, 1)
    assert core.acquire(11.0) == (REJECTED, None)
    closed = core.on_success(p2, 11.5, 1.0)
    assert closed is not None
    assert closed.to_state is CLOSED


def test_a_probe_permit_equals_probe() -> None:
    # Whatever tells episodes apart, a probe permit reads as PROBE: truthy, == PROBE, named so.
    _, p1, p3 = episode_two_with_a_late_probe_from_episode_one()
    for permit in (p1, p3):
        assert permit == PROBE == int(permit)
        assert permit
        assert (permit.name, permit.value, repr(permit)) == ("PROBE", 2, "<Permit.PROBE: 2>")
        assert isinstance(permit, Permit)
        assert Permit(int(permit)) is PROBE


class Sequence:
    """An ``rnd`` that returns the given values in order."""

    def __init__(self, values: Iterable[float]) -> None:
        self._values: Iterator[float] = iter(values)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return next(self._values)


def probe_fails(core: BreakerCore, now: float) -> Transition:
    permit, _ = core.acquire(now)
    assert permit is PROBE
    transition = core.on_failure(permit, now, 0.0, TIMEOUT)
    assert transition is not None
    return transition


def test_failed_probes_reopen_with_growing_capped_jittered_duration() -> None:
    rnd = Sequence([0.5, 0.75, 0.99, 0.0, 0.5, 0.25])
    core = make(
        rnd=rnd,
        failure_threshold=1,
        recovery_timeout=10.0,
        recovery_backoff_multiplier=2.0,
        max_recovery_timeout=35.0,
        recovery_jitter=0.1,
        success_threshold=1,
    )
    first = trip(core, 0.0)
    assert first.open_for == 10.0  # base 10, rnd 0.5: no jitter
    t = probe_fails(core, 10.0)
    assert t.reason is R.PROBE_FAILED
    assert (t.from_state, t.to_state) == (HALF_OPEN, OPEN)
    assert t.open_for == pytest.approx(21.0)  # base 20, +5 % (rnd 0.75)
    assert core.open_until == pytest.approx(31.0)
    t = probe_fails(core, 31.0)
    assert t.open_for == 35.0  # base min(35, 40) = 35, +9.8 % is capped at the maximum
    t = probe_fails(core, 66.0)
    assert t.open_for == pytest.approx(31.5)  # base stays 35, -10 % (rnd 0.0)
    # Closing resets the growth.
    permit, _ = core.acquire(97.5)
    assert core.on_success(permit, 97.5, 0.0) is not None
    assert core.state is CLOSED
    again = trip(core, 100.0)
    assert again.open_for == 10.0
    t = probe_fails(core, 110.0)
    assert t.open_for == pytest.approx(19.0)  # base 20, -5 % (rnd 0.25)
    assert rnd.calls == 6


def test_open_duration_never_exceeds_the_maximum_with_full_jitter() -> None:
    core = make(
        rnd=lambda: 0.999999,
        failure_threshold=1,
        recovery_timeout=10.0,
        max_recovery_timeout=10.0,
        recovery_jitter=1.0,
    )
    assert trip(core, 0.0).open_for == 10.0
    now = 10.0
    for _ in range(50):  # growth is capped: no overflow however many probes fail
        t = probe_fails(core, now)
        assert t.open_for is not None
        assert t.open_for <= 10.0
        now += t.open_for


def test_late_results_do_not_count_in_another_state() -> None:
    core = make(failure_threshold=1, recovery_timeout=1.0, half_open_max_calls=2)
    late_call, _ = core.acquire(0.0)
    trip(core, 0.0)
    # A call admitted while CLOSED ends after the trip: ignored.
    assert core.on_failure(late_call, 0.5, 0.0, TIMEOUT) is None
    assert core.on_success(late_call, 0.5, 0.0) is None
    probe, _ = core.acquire(1.0)
    other_probe, _ = core.acquire(1.0)
    assert core.on_failure(probe, 1.1, 0.0, TIMEOUT) is not None  # reopens
    # The other probe ends while OPEN: it frees its slot, nothing else.
    assert core.on_success(other_probe, 1.2, 0.0) is None
    assert core.state is OPEN
    assert core.probes_in_flight == 0


def test_release_of_a_call_counts_nothing() -> None:
    core = make(failure_threshold=1)
    permit, _ = core.acquire(0.0)
    core.release(permit)
    assert core.snapshot(0.0).window_calls == 0
    assert core.state is CLOSED


# --- manual control --------------------------------------------------------------------------


def test_force_open_holds_until_force_close() -> None:
    core = make()
    transition = core.force_open(5.0)
    assert transition == Transition(CLOSED, OPEN, R.MANUAL_OPEN, 5.0, None)
    assert forced(core)
    assert core.force_open(6.0) is None
    assert core.acquire(1e12) == (REJECTED, None)
    assert core.retry_after(7.0) is None
    assert core.open_until is None
    assert core.open_for is None
    assert core.health_score(7.0) == 0
    assert core.force_close(8.0) == Transition(OPEN, CLOSED, R.MANUAL_CLOSE, 8.0)
    assert not forced(core)
    assert core.force_close(9.0) is None
    assert core.acquire(9.0) == (CALL, None)


def test_force_open_over_an_automatic_open_and_from_half_open() -> None:
    core = make(failure_threshold=1, recovery_timeout=1.0)
    trip(core, 0.0)
    assert core.force_open(0.5) == Transition(OPEN, OPEN, R.MANUAL_OPEN, 0.5, None)
    assert core.acquire(100.0) == (REJECTED, None)
    core.force_close(100.0)
    trip(core, 100.0)
    core.acquire(101.0)
    assert core.state is HALF_OPEN
    assert core.force_open(101.5) == Transition(HALF_OPEN, OPEN, R.MANUAL_OPEN, 101.5, None)


def test_reset_forgets_everything_learned() -> None:
    core = make(
        adaptive_threshold=True,
        health_check_interval=1.0,
        window_size=10,
        minimum_calls=10,
        failure_threshold=1,
    )
    run(core, "S" * 11, 0.0, step=0.5)  # the check at t = 5.0 sees 11 calls
    assert baseline(core) == 0.0
    assert run(core, "F" * 10, 10.0)[0].to_state is OPEN
    assert core.reset(11.0) == Transition(OPEN, CLOSED, R.MANUAL_CLOSE, 11.0)
    assert baseline(core) is None
    assert core.effective_failure_rate_threshold == 0.5
    assert core.failure_counts == {}
    assert core.snapshot(11.0).window_calls == 0
    assert core.reset(12.0) is None  # already closed


def test_force_close_keeps_the_baseline() -> None:
    core = make(
        adaptive_threshold=True,
        health_check_interval=1.0,
        window_size=10,
        minimum_calls=10,
        failure_threshold=1,
    )
    run(core, "S" * 11, 0.0, step=0.5)
    # The check at t = 10 folds in the first failure (1 in 10 calls); 8 in 10 trip.
    assert run(core, "F" * 10, 10.0)[0].reason is R.FAILURE_RATE
    assert baseline(core) == pytest.approx(ADAPTIVE_ALPHA * 0.1)
    core.force_close(11.0)
    assert baseline(core) == pytest.approx(ADAPTIVE_ALPHA * 0.1)
    assert core.failure_counts == {TIMEOUT: 8}


# --- health score and snapshot ---------------------------------------------------------------


def test_health_score_values() -> None:
    core = make(failure_threshold=100, window_size=10, minimum_calls=100)
    assert core.health_score(0.0) == 100  # empty window
    run(core, "SSFSSSSFSS", 0.0)
    assert core.health_score(0.0) == 80

    slow = make(failure_threshold=100, window_size=10, minimum_calls=100, slow_call_duration=1.0)
    run(slow, "FFSS", 0.0)
    for _ in range(4):
        succeed(slow, 0.0, duration=2.0)
    run(slow, "SS", 0.0)
    # failure rate 0.2, slow rate 0.4: 100 * 0.8 * (1 - 0.2) = 64
    assert slow.health_score(0.0) == 64


def test_health_score_in_half_open_is_capped_and_open_is_zero() -> None:
    core = make(failure_threshold=2, recovery_timeout=1.0, window_size=100, minimum_calls=100)
    run(core, "S" * 18, 0.0)
    assert run(core, "FF", 0.0)[0].to_state is OPEN
    assert core.health_score(0.5) == 0
    core.acquire(1.0)
    assert core.state is HALF_OPEN
    # The window (2 failures in 20 calls) says 90; half-open caps it at 50.
    assert core.health_score(1.0) == 50


def test_snapshot() -> None:
    core = make(failure_threshold=3, recovery_timeout=10.0, window_size=10, minimum_calls=10)
    run(core, "SFF", 1.0)
    snap = core.snapshot(1.0)
    assert snap.state is CLOSED
    assert not snap.forced_open
    assert snap.health_score == 33
    assert snap.effective_failure_rate_threshold == 0.5
    assert snap.baseline_failure_rate is None
    assert (snap.window_calls, snap.window_failures, snap.window_slow_calls) == (3, 2, 0)
    assert snap.consecutive_failures == 2
    assert snap.probes_in_flight == 0
    assert dict(snap.failure_counts) == {TIMEOUT: 2}
    assert snap.open_for is None
    assert snap.retry_after == 0.0
    run(core, "F", 2.0)
    snap = core.snapshot(4.0)
    assert (snap.state, snap.open_for, snap.retry_after, snap.health_score) == (OPEN, 10.0, 8.0, 0)
    with pytest.raises(TypeError):
        snap.failure_counts[TIMEOUT] = 0  # type: ignore[index]


# --- time window -----------------------------------------------------------------------------


def test_time_window_failures_age_out() -> None:
    core = make(failure_threshold=100, window="time", window_size=10, minimum_calls=4)
    run(core, "FFF", 0.0)  # 3 calls: below minimum
    assert core.state is CLOSED
    # 20 s later the three failures are gone: one more failure is 1 call, still below minimum.
    run(core, "SSS", 20.0)
    assert run(core, "F", 20.0) == []
    assert core.snapshot(20.0).window_calls == 4
    # 8 failures in 11 calls: not confident of 50 % yet; 9 in 12 is.
    assert run(core, "F" * 7, 21.0) == []
    assert run(core, "F", 21.5) == [Transition(CLOSED, OPEN, R.FAILURE_RATE, 21.5, 60.0)]


# --- adaptive threshold ----------------------------------------------------------------------


def test_adaptive_rule_values() -> None:
    rule = adaptive_failure_rate_threshold
    assert rule(0.5, None, 0.1, 0.9) == 0.5
    assert rule(0.5, 0.0, 0.1, 0.9) == 0.5  # clean: never stricter than configured
    assert rule(0.5, 0.1, 0.1, 0.9) == 0.5
    assert rule(0.5, 0.3, 0.1, 0.9) == pytest.approx(0.7)  # noisy: headroom
    assert rule(0.5, 0.45, 0.1, 0.9) == 0.9  # capped
    assert rule(0.1, 0.0, 0.15, 0.9) == 0.15  # floor
    assert rule(1.0, 0.0, 0.1, 0.9) == 1.0


def adaptive(**options: Any) -> BreakerCore:
    options.setdefault("adaptive_threshold", True)
    return make(
        failure_threshold=1000,
        window_size=20,
        minimum_calls=20,
        health_check_interval=10.0,
        **options,
    )


def test_adaptive_does_not_flap_a_service_that_normally_fails_often() -> None:
    normal = "FSFSFSFSFSFSFSFSFSSS" * 3  # 9 failures in every 20 consecutive calls (45 %)
    worse = "FFFSFFFSFFFSFFFSFFSF" * 2  # 15 in 20 (75 %)

    learned = adaptive()
    assert run(learned, normal * 2, 1.0, step=1.0) == []
    assert baseline(learned) == pytest.approx(0.45)
    assert learned.effective_failure_rate_threshold == 0.9
    assert run(learned, worse, 200.0, step=1.0) == []
    assert learned.state is CLOSED

    fixed = adaptive(adaptive_threshold=False)
    assert run(fixed, normal * 2, 1.0, step=1.0) == []
    assert fixed.effective_failure_rate_threshold == 0.5
    transitions = run(fixed, worse, 200.0, step=1.0)
    assert [t.reason for t in transitions] == [R.FAILURE_RATE]


def test_adaptive_never_makes_a_normally_clean_service_stricter() -> None:
    burst = "FSSFSSSFSS" * 4  # 30 % failures, never two in a row: degraded, not down

    learned = adaptive()
    assert run(learned, "S" * 60, 1.0, step=1.0) == []
    assert baseline(learned) == 0.0
    assert learned.effective_failure_rate_threshold == 0.5
    assert run(learned, burst, 100.0, step=1.0) == []
    assert learned.state is CLOSED


def test_adaptive_baseline_is_an_ewma_updated_lazily_each_interval() -> None:
    core = adaptive()
    run(core, "S" * 20, 0.0, step=0.1)  # t = 0 .. 1.9: no check before t = 10
    assert baseline(core) is None
    run(core, "S", 10.0)
    assert baseline(core) == 0.0
    run(core, "SSSSSSSSSF" * 2, 11.0, step=0.1)  # 10 % failures, all before t = 20
    assert baseline(core) == 0.0
    run(core, "S", 20.5)  # check: the window holds 2 failures in 20
    first = ADAPTIVE_ALPHA * 0.1
    assert baseline(core) == pytest.approx(first)
    run(core, "S", 25.0)  # no check before t = 30.5
    assert baseline(core) == pytest.approx(first)
    run(core, "F", 30.5)  # check, after recording this call: 3 failures in 20
    second = first + ADAPTIVE_ALPHA * (0.15 - first)
    assert baseline(core) == pytest.approx(second)
    assert core.effective_failure_rate_threshold == adaptive_failure_rate_threshold(
        0.5, baseline(core), 0.1, 0.9
    )


def test_adaptive_needs_minimum_calls_and_closed_state() -> None:
    core = adaptive()
    run(core, "S" * 5, 20.0)
    assert baseline(core) is None  # 5 < minimum_calls


# --- config ----------------------------------------------------------------------------------


def test_defaults_match_the_seed_but_the_open_time() -> None:
    # recovery_timeout is 2 s, not the seed's 60 s: benchmarks/bench_opentime.py measured the
    # open time against a long outage, repeated outages and a flapping server (see
    # benchmarks/README.md), and 60 s kept the app refused for up to a minute after a heal.
    config = CircuitBreakerConfig()
    assert (
        config.failure_threshold,
        config.recovery_timeout,
        config.success_threshold,
        config.timeout,
        config.adaptive_threshold,
        config.health_check_interval,
    ) == (5, 2.0, 2, 30.0, True, 30.0)
    assert (config.recovery_backoff_multiplier, config.max_recovery_timeout) == (1.0, 600.0)
    assert config.slow_call_duration is None
    assert config.ignored_categories == NON_HEALTH_CATEGORIES
    assert config.window == "count"
    assert (config.window_size, config.minimum_calls, config.half_open_max_calls) == (100, 20, 1)


BAD_VALUES: list[tuple[str, object, str]] = [
    ("failure_threshold", 0, "an integer >= 1"),
    ("failure_threshold", 2.0, "an integer >= 1"),
    ("failure_threshold", True, "an integer >= 1"),
    ("recovery_timeout", -1.0, "a number of seconds >= 0 and <= 10000000"),
    ("recovery_timeout", float("nan"), "a number of seconds >= 0"),
    ("recovery_timeout", 1e10, "a number of seconds >= 0 and <= 10000000"),
    ("recovery_timeout", 10**400, "a number of seconds >= 0"),
    ("recovery_timeout", "60", "a number of seconds >= 0"),
    ("success_threshold", 0, "an integer >= 1"),
    ("timeout", 0.0, "a number of seconds > 0 and <= 10000000"),
    ("timeout", float("inf"), "a number of seconds > 0"),
    ("timeout", 1e10, "a number of seconds > 0"),
    ("timeout", True, "a number of seconds > 0"),
    ("adaptive_threshold", 1, "True or False"),
    ("health_check_interval", 0, "a number of seconds > 0"),
    ("health_check_interval", 1e10, "a number of seconds > 0"),
    ("failure_rate_threshold", 0.0, "a number in (0, 1]"),
    ("failure_rate_threshold", 1.5, "a number in (0, 1]"),
    ("window", "sliding", "'count' or 'time'"),
    ("window_size", 0, "an integer in [1, 1000000]"),
    ("window_size", 1_000_001, "an integer in [1, 1000000]"),
    ("minimum_calls", 0, "an integer >= 1"),
    ("slow_call_duration", 0.0, "None (off) or a number of seconds > 0"),
    ("slow_call_duration", -2, "None (off) or a number of seconds > 0"),
    ("slow_call_rate_threshold", 0.0, "a number in (0, 1]"),
    ("slow_call_rate_threshold", 1.01, "a number in (0, 1]"),
    ("half_open_max_calls", 0, "an integer >= 1"),
    ("max_recovery_timeout", 1.9, "a number of seconds >= recovery_timeout (2.0)"),
    ("max_recovery_timeout", 1e10, "a number of seconds >= recovery_timeout (2.0)"),
    ("recovery_backoff_multiplier", 10**400, "a finite number >= 1"),
    ("recovery_backoff_multiplier", 0.5, "a finite number >= 1"),
    ("recovery_jitter", -0.1, "a number in [0, 1]"),
    ("recovery_jitter", 1.1, "a number in [0, 1]"),
    ("adaptive_min_threshold", 0.0, "a number in (0, 1]"),
    ("adaptive_max_threshold", 0.05, "a number in [adaptive_min_threshold (0.1), 1]"),
    ("adaptive_max_threshold", 1.5, "a number in [adaptive_min_threshold (0.1), 1]"),
    ("ignored_categories", {"client_error"}, "a frozenset of ErrorCategory"),
    ("ignored_categories", frozenset({"client_error"}), "a frozenset of ErrorCategory"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_VALUES)
def test_config_validation_names_key_value_and_allowed(
    field: str, value: object, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        CircuitBreakerConfig(**{field: value})  # type: ignore[arg-type]
    error = info.value
    assert error.key == f"breaker.{field}"
    assert error.value is value
    assert allowed in error.allowed
    assert f"breaker.{field}=" in str(error)


def test_every_field_has_a_validation_case() -> None:
    validated = {field for field, _, _ in BAD_VALUES}
    assert validated == set(CircuitBreakerConfig.__dataclass_fields__)


def test_config_accepts_edges() -> None:
    config = CircuitBreakerConfig(
        recovery_timeout=0,
        max_recovery_timeout=0,
        failure_rate_threshold=1,
        recovery_jitter=0,
        recovery_backoff_multiplier=1,
        adaptive_min_threshold=0.5,
        adaptive_max_threshold=0.5,
        slow_call_duration=0.001,
        ignored_categories=frozenset(),
        window="time",
    )
    assert config.window == "time"


def test_from_mapping_accepts_the_seed_shape() -> None:
    config = CircuitBreakerConfig.from_mapping(
        {
            "failure_threshold": 3,
            "recovery_timeout": 30,
            "success_threshold": 1,
            "timeout": 5.0,
            "adaptive_threshold": False,
            "health_check_interval": 10.0,
            "ignored_categories": ["client_error", ErrorCategory.QUERY],
        }
    )
    assert config.failure_threshold == 3
    assert config.recovery_timeout == 30
    assert config.adaptive_threshold is False
    assert config.ignored_categories == frozenset({ErrorCategory.CLIENT_ERROR, ErrorCategory.QUERY})
    assert CircuitBreakerConfig.from_mapping({}) == CircuitBreakerConfig()


def test_from_mapping_rejects_unknown_keys_listing_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        CircuitBreakerConfig.from_mapping({"failure_treshold": 3})
    assert info.value.key == "breaker.failure_treshold"
    assert info.value.value == 3
    assert "failure_threshold" in info.value.allowed
    assert "recovery_timeout" in info.value.allowed
    assert "ignored_categories" in info.value.allowed


@pytest.mark.parametrize("value", [["no_such_category"], "client_error", 3])
def test_from_mapping_rejects_bad_categories(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        CircuitBreakerConfig.from_mapping({"ignored_categories": value})
    assert info.value.key == "breaker.ignored_categories"


def test_from_mapping_validates_values() -> None:
    with pytest.raises(ConfigError) as info:
        CircuitBreakerConfig.from_mapping({"failure_threshold": "5"})
    assert info.value.key == "breaker.failure_threshold"


def test_a_window_full_of_successes_makes_the_breaker_quiet_until_a_failure() -> None:
    core = make(window_size=5, minimum_calls=5)
    run(core, "SSSS", 1.0)
    assert not core.quiet  # not full yet
    run(core, "S", 1.0)
    assert core.quiet
    assert core.succeeded_quietly(1.0)
    fail(core, 2.0)
    assert not core.quiet
    assert not core.succeeded_quietly(2.0)
    run(core, "SSSSS", 3.0)
    assert core.quiet
    slow = make(window_size=5, minimum_calls=5, slow_call_duration=1.0)
    run(slow, "SSSSS", 1.0)
    assert not slow.quiet  # a success's duration matters: never skipped
    timed = make(window="time", window_size=5, minimum_calls=5)
    run(timed, "SSSSSSSS", 1.0)
    assert not timed.quiet  # a time window always moves


# --- a breaker that stopped judging ------------------------------------------------------------


def test_a_breaker_that_stopped_judging_stays_closed_whatever_fails() -> None:
    core = make(failure_threshold=2, window_size=10, minimum_calls=5, slow_call_duration=1.0)
    fail(core, 0.0)
    assert core.judging
    assert core.stop_judging(1.0) is None  # closed already: no transition
    assert not core.judging
    assert core.quiet
    assert core.succeeded_quietly(1e9)  # callers skip recording successes, for good
    assert core.consecutive_failures == 0
    assert run(core, "F" * 50, 2.0) == []  # no run, no rate trips it
    assert run(core, "S" * 50, 3.0) == []
    for now in (4.0, 5.0):
        permit, transition = core.acquire(now)
        assert (permit, transition) == (CALL, None)
        assert core.on_success(permit, now, 5.0) is None  # slow calls trip nothing either
    assert core.state is CLOSED
    assert core.consecutive_failures == 0
    assert core.failure_counts == {TIMEOUT: 51}  # still tallied, for the gauges


def test_a_half_open_or_open_breaker_that_stops_judging_closes_and_frees_its_probes() -> None:
    core = make(failure_threshold=1, recovery_timeout=1.0, half_open_max_calls=1)
    trip(core, 0.0)
    half_open = Transition(OPEN, HALF_OPEN, R.RECOVERY_TIMEOUT_ELAPSED, 1.0)
    assert core.acquire(1.0) == (PROBE, half_open)
    assert core.acquire(1.0) == (REJECTED, None)  # the probe slot is taken
    # The probe succeeded, but recording it failed: the caller stops the breaker judging.
    assert core.stop_judging(1.5) == Transition(HALF_OPEN, CLOSED, R.BOOKKEEPING_FAILED, 1.5)
    assert core.probes_in_flight == 0
    assert core.acquire(1.5) == (CALL, None)
    assert core.on_success(PROBE, 1.6, 0.1) is None  # the late probe's outcome: nothing
    assert core.retry_after(1.6) == 0.0
    assert core.stop_judging(1.7) is None  # again: idempotent, and quiet again
    assert core.quiet
    assert not core.judging
    other = make(failure_threshold=1, recovery_timeout=10.0)
    trip(other, 0.0)
    assert other.stop_judging(2.0) == Transition(OPEN, CLOSED, R.BOOKKEEPING_FAILED, 2.0)
    assert other.open_until is None
    assert other.acquire(2.0) == (CALL, None)


def test_reset_and_force_open_give_the_breaker_its_judgement_back() -> None:
    core = make(failure_threshold=1, recovery_timeout=1.0)
    core.stop_judging(0.0)
    assert core.reset(1.0) is None
    assert core.judging
    assert not core.quiet
    assert trip(core, 2.0).reason is R.CONSECUTIVE_FAILURES
    core.stop_judging(3.0)
    assert core.force_close(4.0) is None  # closed already: it still does not judge
    assert not core.judging
    assert core.force_open(5.0) == Transition(CLOSED, OPEN, R.MANUAL_OPEN, 5.0, None)
    assert core.judging
    assert core.force_close(6.0) == Transition(OPEN, CLOSED, R.MANUAL_CLOSE, 6.0)
    assert trip(core, 7.0).reason is R.CONSECUTIVE_FAILURES


def test_a_breaker_held_open_by_hand_is_left_held() -> None:
    core = make()
    core.force_open(0.0)
    assert core.stop_judging(1.0) is None
    assert core.judging
    assert core.acquire(2.0) == (REJECTED, None)


# --- unconfirmed failures (a statement that found its pooled connection closed) -------------

CONNECTION = ErrorCategory.CONNECTION


def lose_connection(core: BreakerCore, now: float, *, retry: bool = False) -> Transition | None:
    permit, _ = core.acquire(now)
    return core.on_failure(permit, now, 0.001, CONNECTION, retry=retry, unconfirmed=True)


def refused(core: BreakerCore, now: float) -> Transition | None:
    permit, _ = core.acquire(now)
    return core.on_failure(permit, now, 0.001, CONNECTION)


def test_lost_connections_that_a_reconnect_disproves_never_count() -> None:
    # A reaper closed a pool's ten idle sessions; the server serves every new one.
    core = make(failure_threshold=3)
    for i in range(10):
        assert lose_connection(core, float(i)) is None
    assert (core.state, core.consecutive_failures) == (CLOSED, 0)
    assert core.snapshot(10.0).window_calls == 0
    assert core.failure_counts == {CONNECTION: 10}  # tallied all the same
    assert not core.quiet  # the success that drops them must be recorded
    assert succeed(core, 10.0) is None  # the reconnect
    # Dropped: the next run starts from nothing.
    assert refused(core, 11.0) is None
    assert refused(core, 11.0) is None
    assert core.state is CLOSED
    assert refused(core, 11.0) is not None


def test_a_failed_reconnect_counts_the_lost_connections_before_it() -> None:
    # The server went down: statements lose their connections, then the reconnect is refused.
    core = make(failure_threshold=3)
    assert lose_connection(core, 0.0) is None
    assert lose_connection(core, 0.1) is None
    transition = refused(core, 0.2)
    assert transition is not None
    assert (transition.to_state, transition.reason) == (OPEN, R.CONSECUTIVE_FAILURES)


def test_held_failures_join_the_window_when_confirmed() -> None:
    core = make(failure_threshold=100, minimum_calls=100, window_size=100)
    for _ in range(4):
        lose_connection(core, 0.0)
    lose_connection(core, 0.0, retry=True)
    refused(core, 1.0)
    snap = core.snapshot(1.0)
    assert (snap.window_calls, snap.window_failures, snap.consecutive_failures) == (6, 6, 6)


def test_a_lost_connection_that_continues_a_run_counts_at_once() -> None:
    core = make(failure_threshold=3)
    assert refused(core, 0.0) is None
    assert lose_connection(core, 0.1) is None
    assert core.consecutive_failures == 2
    assert lose_connection(core, 0.2) is not None


def test_held_failures_expire() -> None:
    later = UNCONFIRMED_HELD_S + 1.0
    core = make(failure_threshold=3)
    lose_connection(core, 0.0)
    lose_connection(core, 0.0)
    assert refused(core, later) is None
    assert core.consecutive_failures == 1
    # One held since long ago does not come back with a new one held.
    core = make(failure_threshold=3)
    lose_connection(core, 0.0)
    lose_connection(core, later)
    assert refused(core, later) is None
    assert core.consecutive_failures == 2


def test_at_most_max_unconfirmed_held() -> None:
    core = make(failure_threshold=10_000, minimum_calls=10_000, window_size=10_000)
    for _ in range(MAX_UNCONFIRMED_HELD * 3):
        lose_connection(core, 0.0)
    refused(core, 0.0)
    assert core.consecutive_failures == MAX_UNCONFIRMED_HELD + 1


def test_a_probe_that_lost_its_connection_is_no_verdict() -> None:
    # After a restart the pool's connections are all stale: a probe that meets one must not
    # reopen the breaker of a server that is back.
    core = make(failure_threshold=1, recovery_timeout=10.0)
    trip(core, 0.0)
    permit, transition = core.acquire(10.0)
    assert permit is PROBE
    assert transition is not None
    assert core.on_failure(permit, 10.0, 0.001, CONNECTION, unconfirmed=True) is None
    assert (core.state, core.probes_in_flight) == (HALF_OPEN, 0)
    permit, _ = core.acquire(10.1)
    assert permit is PROBE
    assert core.on_success(permit, 10.1, 0.001) is None


def test_leaving_closed_drops_what_is_held() -> None:
    core = make(failure_threshold=3)
    lose_connection(core, 0.0)
    lose_connection(core, 0.0)
    core.force_open(1.0)
    core.force_close(2.0)
    assert refused(core, 3.0) is None
    assert core.consecutive_failures == 1


# --- a fresh connection's lost link (a pooler in front of a dead server) ---------------------


def connect(core: BreakerCore, now: float) -> float:
    """A connect that succeeds at ``now`` (a pooler answers it): the connection's open time."""
    assert succeed(core, now) is None
    return now


def lose_fresh(
    core: BreakerCore, opened: float, now: float, duration: float = 0.001
) -> Transition | None:
    """A statement on the connection opened at ``opened``, sent at ``now - duration``, that
    lost its link at ``now``."""
    permit, _ = core.acquire(now)
    return core.on_failure(permit, now, duration, CONNECTION, unconfirmed=True, opened_at=opened)


def test_behind_a_pooler_of_a_dead_server_the_breaker_opens() -> None:
    # PgBouncer answers every connect; every statement then loses its link (08P01). Each
    # connect's success used to drop what was held: the breaker never opened.
    core = make(failure_threshold=3)
    assert lose_connection(core, 0.0) is None  # a pooled connection from before: held
    now = 1.0
    transitions = []
    for _ in range(2):
        opened = connect(core, now)
        # The statement waits out the pooler's query_wait_timeout (5 s) before failing: it
        # was sent at once, so the connection never idled.
        transitions.append(lose_fresh(core, opened, now + 5.0, duration=5.0))
        now += 6.0
    # The held loss and the first fresh one, then the second: a run of three.
    assert transitions[0] is None
    assert transitions[1] is not None
    assert (transitions[1].to_state, transitions[1].reason) == (OPEN, R.CONSECUTIVE_FAILURES)


def test_a_fresh_connection_confirms_even_with_nothing_held() -> None:
    # A new connection per call, and nothing held at first: the first loss is held, the
    # next connection's takes its connect's success back.
    core = make(failure_threshold=2)
    opened = connect(core, 0.0)
    assert lose_fresh(core, opened, 0.01) is None
    assert core.consecutive_failures == 0  # held: one fresh loss alone may be a restart
    opened = connect(core, 0.1)
    transition = lose_fresh(core, opened, 0.11)
    assert transition is not None
    assert transition.to_state is OPEN


def test_a_connection_opened_after_the_oldest_held_loss_confirms() -> None:
    core = make(failure_threshold=3)
    lose_connection(core, 0.0)
    lose_connection(core, 0.1)
    assert lose_fresh(core, 0.2, 0.3) is not None  # opened at 0.2, no success since


def test_a_reaped_idle_connection_confirms_nothing() -> None:
    # The reaper ends sessions idle for its timeout: a connection used more than
    # FRESH_CONNECTION_S after it opened may have been reaped. Held, as before.
    core = make(failure_threshold=2)
    lose_connection(core, 0.0)
    opened = connect(core, 1.0)
    assert lose_fresh(core, opened, opened + FRESH_CONNECTION_S + 0.5) is None
    assert core.consecutive_failures == 0
    opened = connect(core, 10.0)
    assert lose_fresh(core, opened, opened + FRESH_CONNECTION_S + 0.5) is None
    assert core.state is CLOSED
    assert succeed(core, 20.0) is None  # the server answers: everything held is dropped
    assert refused(core, 21.0) is None


def refused_fresh(core: BreakerCore, opened: float, now: float) -> Transition | None:
    """A statement on the connection opened at ``opened`` that a proxy answered at ``now``
    with its own failed connect (ProxySQL's 9001): a counted connection failure."""
    permit, _ = core.acquire(now)
    return core.on_failure(permit, now, 0.001, CONNECTION, opened_at=opened)


def test_behind_a_proxy_that_says_it_cannot_reach_the_server_the_breaker_opens() -> None:
    # A connection per call: ProxySQL answers each connect, then the statement with 9001.
    # Each connect's success ended the run of counted failures: the breaker never opened.
    core = make(failure_threshold=3)
    transitions = []
    for second in range(3):
        opened = connect(core, float(second))
        transitions.append(refused_fresh(core, opened, second + 0.01))
    assert transitions[:2] == [None, None]
    assert transitions[2] is not None
    assert (transitions[2].to_state, transitions[2].reason) == (OPEN, R.CONSECUTIVE_FAILURES)


def test_a_counted_failure_on_an_old_connection_takes_nothing_back() -> None:
    core = make(failure_threshold=2)
    opened = connect(core, 0.0)
    assert refused_fresh(core, opened, 0.01) is None
    opened = connect(core, 1.0)
    assert refused_fresh(core, opened, opened + FRESH_CONNECTION_S + 0.5) is None
    assert core.consecutive_failures == 1  # the connect's success ended the first run


def test_a_connection_from_before_the_success_confirms_nothing() -> None:
    # Opened before the success that dropped the held losses (a pool's connection from
    # before a restart): its loss is the restart's, not news.
    core = make(failure_threshold=2)
    lose_connection(core, 1.0)
    assert succeed(core, 2.0) is None
    assert lose_fresh(core, 1.5, 2.1) is None
    assert core.consecutive_failures == 0
    # Nor one opened long after that success: the success was not its connect.
    core = make(failure_threshold=2)
    lose_connection(core, 1.0)
    assert succeed(core, 2.0) is None
    assert lose_fresh(core, 2.0 + FRESH_CONNECTION_S + 0.1, 2.0 + FRESH_CONNECTION_S + 0.2) is None
    assert core.consecutive_failures == 0


def test_a_success_that_ends_nothing_does_not_hide_the_connect_it_follows() -> None:
    # A pool opens several connections at once: the first connect's success ends the run,
    # the others' end nothing; a statement on the first one then takes its success back.
    core = make(failure_threshold=3)
    refused(core, 0.0)
    refused(core, 0.0)
    opened = connect(core, 1.0)
    connect(core, 1.001)
    connect(core, 1.002)
    transition = lose_fresh(core, opened, 1.01)
    assert transition is not None
    assert core.state is OPEN


def test_a_fresh_loss_after_a_success_that_ended_a_later_run_confirms_nothing() -> None:
    # A success after the connection opened that ended something (the server answered a
    # statement that followed a counted failure) is evidence: the fresh loss is held.
    core = make(failure_threshold=2)
    lose_connection(core, 0.0)
    opened = connect(core, 1.0)  # suspends the held loss
    refused(core, 1.001)
    assert succeed(core, 1.002) is None  # ends the refused run: the server answers
    assert lose_fresh(core, opened, 1.01) is None
    assert core.consecutive_failures == 0


def test_fresh_losses_of_expired_held_failures_count_only_themselves() -> None:
    core = make(failure_threshold=3)
    lose_connection(core, 0.0)
    later = UNCONFIRMED_HELD_S + 5.0
    opened = connect(core, later)
    assert lose_fresh(core, opened, later + 0.01) is None
    assert core.consecutive_failures == 0  # held: nothing to take back
    opened = connect(core, later + 1.0)
    assert lose_fresh(core, opened, later + 1.01) is None
    assert core.consecutive_failures == 2  # the held fresh loss and this one


def test_a_probe_that_loses_a_fresh_connection_reopens_the_breaker() -> None:
    core = make(failure_threshold=1, recovery_timeout=10.0, success_threshold=2)
    trip(core, 0.0)
    permit, _ = core.acquire(10.0)  # the connect, through the pooler
    assert core.on_success(permit, 10.0, 0.001) is None
    transition = lose_fresh(core, 10.0, 10.01)
    assert transition is not None
    assert (transition.to_state, transition.reason) == (OPEN, R.PROBE_FAILED)


def test_a_probe_that_loses_a_stale_connection_is_still_no_verdict() -> None:
    core = make(failure_threshold=1, recovery_timeout=10.0)
    trip(core, 0.0)
    # Opened before the breaker went half-open (a pool's connection from before): stale.
    assert lose_fresh(core, 9.9, 10.0) is None
    assert (core.state, core.probes_in_flight) == (HALF_OPEN, 0)
    # Opened since, but idle too long before its statement.
    assert lose_fresh(core, 10.0, 20.0, duration=0.001) is None
    assert core.state is HALF_OPEN


def test_leaving_closed_forgets_the_suspended_run() -> None:
    core = make(failure_threshold=2)
    lose_connection(core, 0.0)
    opened = connect(core, 1.0)
    core.force_open(1.001)
    core.force_close(1.002)
    assert lose_fresh(core, opened, 1.01) is None
    assert core.consecutive_failures == 0


def test_the_docs_configuration_table_lists_every_field_with_its_default() -> None:
    # docs/circuit-breaker.md's table is where users look defaults up: every field of
    # CircuitBreakerConfig, in order, with the default a config built with no arguments has.
    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "circuit-breaker.md"
    section = doc.read_text(encoding="utf-8").split("\n## Configuration\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    documented = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[0]):
            documented[cells[0].strip("`")] = cells[1]
    fields = [field.name for field in dataclasses.fields(CircuitBreakerConfig)]
    assert list(documented) == fields
    config = CircuitBreakerConfig()
    for name, cell in documented.items():
        value = getattr(config, name)
        if name == "ignored_categories":
            assert cell == "`NON_HEALTH_CATEGORIES`"
            assert value == NON_HEALTH_CATEGORIES
        elif name == "max_recovery_timeout":  # `None`: `max(600.0, recovery_timeout)`
            assert value == max(600.0, config.recovery_timeout)
        else:
            first = re.match(r"`([^`]+)`", cell)
            assert first is not None, (name, cell)
            assert ast.literal_eval(first.group(1)) == value, (name, cell, value)
