"""The breaker state machine driven by hypothesis: random calls, outcomes, time and manual
control, checked against invariants after every step.

Permits are ended in any order and at any time, so a probe often outlives its half-open
episode (its lease ran out, or the breaker reopened, closed, was reset or forgot its probes):
its outcome must then change nothing of a later episode."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from otel_raptor.core.breaker import (
    FRESH_CONNECTION_S,
    MAX_UNCONFIRMED_HELD,
    BreakerCore,
    CircuitBreakerConfig,
    Permit,
)
from otel_raptor.core.classification import NON_HEALTH_CATEGORIES, ErrorCategory
from otel_raptor.core.states import CircuitState, Transition, TransitionReason

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
R = TransitionReason

configs = st.builds(
    lambda rt, grow, **kw: CircuitBreakerConfig(
        recovery_timeout=rt, max_recovery_timeout=rt * grow, **kw
    ),
    rt=st.sampled_from([0.0, 1.0, 5.0, 10.0]),
    grow=st.sampled_from([1.0, 2.0, 5.0]),
    failure_threshold=st.integers(1, 4),
    success_threshold=st.integers(1, 3),
    half_open_max_calls=st.integers(1, 3),
    window=st.sampled_from(["count", "time"]),
    window_size=st.integers(1, 10),
    minimum_calls=st.integers(1, 10),
    failure_rate_threshold=st.sampled_from([0.3, 0.5, 1.0]),
    slow_call_duration=st.sampled_from([None, 1.0]),
    slow_call_rate_threshold=st.sampled_from([0.5, 1.0]),
    recovery_backoff_multiplier=st.sampled_from([1.0, 2.0, 3.0]),
    recovery_jitter=st.sampled_from([0.0, 0.1, 1.0]),
    adaptive_threshold=st.booleans(),
    health_check_interval=st.sampled_from([1.0, 5.0]),
)
categories = st.sampled_from(
    [ErrorCategory.TIMEOUT, ErrorCategory.SERVER_ERROR, ErrorCategory.CLIENT_ERROR]
)


class BreakerMachine(RuleBasedStateMachine):
    core: BreakerCore
    config: CircuitBreakerConfig

    @initialize(config=configs, seed=st.integers(0, 2**32 - 1))
    def start(self, config: CircuitBreakerConfig, seed: int) -> None:
        self.config = config
        self.now = 0.0
        self.core = BreakerCore(config, now=self.now, rnd=random.Random(seed).random)
        # Each permit with the probe episode it was admitted in: a new episode starts when
        # the breaker goes half-open, and when it forgets its probes.
        self.outstanding: list[tuple[Permit, int]] = []
        self.episode = 0
        self.probe_successes = 0  # successes of probes while HALF_OPEN since entering it
        self.lease = max(config.recovery_timeout, 1.0)
        self.last_probe_at = -float("inf")  # when the latest probe was admitted

    def new_episode(self) -> None:
        self.episode += 1
        self.last_probe_at = -float("inf")

    def take(self, data: st.DataObject) -> tuple[Permit, bool]:
        """An outstanding permit, and whether it is a probe of an earlier episode."""
        return self.pop(data.draw(st.integers(0, len(self.outstanding) - 1)))

    def pop(self, index: int) -> tuple[Permit, bool]:
        permit, episode = self.outstanding.pop(index)
        return permit, permit == Permit.PROBE and episode < self.episode

    def everything(self) -> dict[str, Any]:
        """All a late outcome could change, but the failure tally."""
        core = self.core
        snap = core.snapshot(self.now)
        return {
            **{f: getattr(snap, f) for f in snap.__slots__ if f != "failure_counts"},
            "open_until": core.open_until,
            "probes_presumed_stuck": core.probes_presumed_stuck,
            "probe_successes": core._probe_successes,
            "judging": core.judging,
            "quiet": core.quiet,
        }

    def check_transition(
        self, transition: Transition | None, before: CircuitState, before_forced: bool
    ) -> None:
        after = self.core.state
        if transition is None:
            assert after is before
            assert self.core.forced_open == before_forced
            return
        assert transition.from_state is before
        assert transition.to_state is after
        assert transition.at == self.now
        if after is HALF_OPEN:
            self.probe_successes = 0
            self.new_episode()
        if after is OPEN and transition.reason is not R.MANUAL_OPEN:
            assert transition.open_for is not None
            assert 0.0 <= transition.open_for <= self.config.max_recovery_timeout
        else:
            assert transition.open_for is None

    # --- rules --------------------------------------------------------------------------

    @rule()
    def acquire(self) -> None:
        core = self.core
        before, forced = core.state, core.forced_open
        open_until = core.open_until
        in_flight = core.probes_in_flight
        live = in_flight - core.probes_presumed_stuck
        cap = self.config.half_open_max_calls
        lease_over = self.now >= self.last_probe_at + self.lease
        permit, transition = core.acquire(self.now)
        self.check_transition(transition, before, forced)
        if transition is not None:
            assert before is OPEN
            assert transition.reason is R.RECOVERY_TIMEOUT_ELAPSED
            # A new episode: the probes of earlier ones hold no slot in it.
            in_flight = live = 0
            lease_over = True
        if permit is Permit.REJECTED:
            # Rejected only when open (and not yet due) or half-open with every slot taken by
            # a probe whose lease still runs.
            due = before is OPEN and not forced and open_until is not None
            due = due and self.now >= open_until  # type: ignore[operator]
            assert (before is OPEN and not due) or (live >= cap and not lease_over)
            assert core.state is not CLOSED
        elif permit == Permit.PROBE:
            assert core.state is HALF_OPEN
            assert live < cap or lease_over
            if live >= cap:  # every probe in flight is now presumed stuck
                assert core.probes_presumed_stuck == in_flight
            self.last_probe_at = self.now
            self.outstanding.append((permit, self.episode))
        else:
            assert permit is Permit.CALL
            assert before is CLOSED
            self.outstanding.append((permit, self.episode))

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), duration=st.sampled_from([0.0, 0.5, 2.0]))
    def succeed(self, data: st.DataObject, duration: float) -> None:
        permit, stale = self.take(data)
        before, forced = self.core.state, self.core.forced_open
        everything = self.everything()
        transition = self.core.on_success(permit, self.now, duration)
        self.check_transition(transition, before, forced)
        if stale:
            assert transition is None
            assert self.everything() == everything
        elif permit == Permit.PROBE and before is HALF_OPEN:
            self.probe_successes += 1
            if self.probe_successes >= self.config.success_threshold:
                assert transition is not None
                assert transition.reason is R.PROBES_SUCCEEDED
                assert self.core.state is CLOSED
            else:
                assert self.core.state is HALF_OPEN
        elif transition is not None:
            assert before is CLOSED
            assert permit is Permit.CALL
            assert transition.reason is R.SLOW_CALL_RATE
            assert duration >= 1.0

    @precondition(lambda self: self.outstanding)
    @rule(
        data=st.data(),
        duration=st.sampled_from([0.0, 2.0]),
        category=categories,
        unconfirmed=st.booleans(),
        # When the lost connection opened, before the statement was sent (None: unknown).
        opened_before=st.sampled_from([None, 0.0, 0.5, 5.0]),
    )
    def fail(
        self,
        data: st.DataObject,
        duration: float,
        category: ErrorCategory,
        unconfirmed: bool,
        opened_before: float | None,
    ) -> None:
        permit, stale = self.take(data)
        before, forced = self.core.state, self.core.forced_open
        run_before = self.core.consecutive_failures
        everything = self.everything()
        tally = self.core.failure_counts
        sent = self.now - duration
        opened_at = None if opened_before is None else sent - opened_before
        fresh = opened_before is not None and opened_before <= FRESH_CONNECTION_S
        transition = self.core.on_failure(
            permit, self.now, duration, category, unconfirmed=unconfirmed, opened_at=opened_at
        )
        self.check_transition(transition, before, forced)
        tally[category] = tally.get(category, 0) + 1
        assert self.core.failure_counts == tally  # every failure is tallied, late or not
        if stale:
            assert transition is None
            assert self.everything() == everything
        elif category in NON_HEALTH_CATEGORIES:
            assert transition is None
        elif unconfirmed and not fresh and (run_before == 0 or permit == Permit.PROBE):
            # Held until another failure confirms it (or a probe's: no verdict).
            assert transition is None
            assert self.core.consecutive_failures == run_before
        elif unconfirmed and permit == Permit.PROBE:
            # A fresh connection's lost link: a verdict if it opened during the episode.
            assert transition is None or transition.reason is R.PROBE_FAILED
        elif unconfirmed and run_before == 0 and transition is None and before is CLOSED:
            # A fresh connection's lost link: held, or counted with what it takes back.
            core = self.core
            held = core.consecutive_failures == 0 and core._unconfirmed > 0
            counted = core.consecutive_failures >= 1 and core._unconfirmed == 0
            assert held or counted
        elif permit == Permit.PROBE and before is HALF_OPEN:
            assert transition is not None
            assert transition.reason is R.PROBE_FAILED
        elif transition is not None:
            assert before is CLOSED
            assert permit is Permit.CALL
            assert transition.reason in (
                R.CONSECUTIVE_FAILURES,
                R.FAILURE_RATE,
                R.SLOW_CALL_RATE,
            )

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        permit, stale = self.take(data)
        before = self.core.state
        everything = self.everything()
        self.core.release(permit)
        assert self.core.state is before
        if stale:
            assert self.everything() == everything

    @rule()
    def forget_probes(self) -> None:
        before = self.everything()
        self.core.forget_probes()
        self.new_episode()
        assert self.core.probes_in_flight == self.core.probes_presumed_stuck == 0
        after = self.everything()
        for slots in ("probes_in_flight", "probes_presumed_stuck"):
            del before[slots], after[slots]
        assert after == before  # only the probe slots changed

    @rule(dt=st.sampled_from([0.0, 0.3, 1.0, 4.0, 30.0, 1000.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(passed=st.booleans())
    def health_check(self, passed: bool) -> None:
        before, forced = self.core.state, self.core.forced_open
        transition = self.core.on_health_check(passed=passed, now=self.now)
        self.check_transition(transition, before, forced)
        if transition is not None:
            assert passed
            assert before is OPEN
            assert not forced
            assert transition.reason is R.HEALTH_CHECK_PASSED
            assert self.core.state is CLOSED

    @rule()
    def force_open(self) -> None:
        before, forced = self.core.state, self.core.forced_open
        transition = self.core.force_open(self.now)
        self.check_transition(transition, before, forced)
        assert (transition is None) == forced
        assert self.core.state is OPEN
        assert self.core.retry_after(self.now) is None

    @rule()
    def force_close(self) -> None:
        before, forced = self.core.state, self.core.forced_open
        transition = self.core.force_close(self.now)
        self.check_transition(transition, before, forced)
        assert self.core.state is CLOSED

    @rule()
    def reset(self) -> None:
        before, forced = self.core.state, self.core.forced_open
        transition = self.core.reset(self.now)
        self.check_transition(transition, before, forced)
        assert self.core.state is CLOSED
        assert self.core.failure_counts == {}

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def probes_are_capped_and_exact(self) -> None:
        in_flight = self.core.probes_in_flight
        stuck = self.core.probes_presumed_stuck
        assert 0 <= stuck <= in_flight
        assert in_flight - stuck <= self.config.half_open_max_calls
        # Exact for the latest episode; earlier episodes' probes are no longer tracked.
        assert in_flight == sum(
            1 for p, e in self.outstanding if p == Permit.PROBE and e == self.episode
        )

    @invariant()
    def state_is_legal(self) -> None:
        core = self.core
        assert core.state in (CLOSED, OPEN, HALF_OPEN)
        if core.forced_open:
            assert core.state is OPEN
        if core.state is CLOSED:
            # A run this long trips at any volume (shorter runs only at low volume).
            config = self.config
            minimum = config.minimum_calls
            if config.window == "count":
                minimum = min(minimum, config.window_size)
            assert core.consecutive_failures < max(config.failure_threshold, minimum)

    @invariant()
    def quiet_means_a_success_changes_nothing(self) -> None:
        core = self.core
        if not core.quiet:
            return
        assert core.state is CLOSED
        assert core.consecutive_failures == 0
        assert self.config.slow_call_duration is None
        before = core.snapshot(self.now)
        core._window.record(1, self.now)  # a plain success, recorded anyway
        assert core.snapshot(self.now) == before

    @invariant()
    def unconfirmed_failures_are_held_in_closed_only_and_never_quietly(self) -> None:
        core = self.core
        if core._unconfirmed:
            assert core.state is CLOSED
            assert core.consecutive_failures == 0
            assert not core.quiet  # a success must come through and drop them
            assert core._unconfirmed_calls <= core._unconfirmed
        assert core._unconfirmed <= MAX_UNCONFIRMED_HELD

    @invariant()
    def a_suspended_run_lives_in_closed_only(self) -> None:
        core = self.core
        if core._suspended_at != float("-inf"):
            assert core.state is CLOSED
            assert core.consecutive_failures == 0 or core._suspended_at <= self.now
            assert core._suspended_held <= MAX_UNCONFIRMED_HELD
            assert core._suspended_held_calls <= core._suspended_held
            assert core._suspended_run > 0 or core._suspended_held > 0

    @invariant()
    def health_is_bounded(self) -> None:
        health = self.core.health_score(self.now)
        assert 0 <= health <= 100
        if self.core.state is OPEN:
            assert health == 0
        elif self.core.state is HALF_OPEN:
            assert health <= 50

    @invariant()
    def open_duration_is_bounded(self) -> None:
        core = self.core
        open_for = core.open_for
        if core.state is OPEN and not core.forced_open:
            assert open_for is not None
            assert 0.0 <= open_for <= self.config.max_recovery_timeout
            retry_after = core.retry_after(self.now)
            assert retry_after is not None
            assert 0.0 <= retry_after <= open_for
        else:
            assert open_for is None

    @invariant()
    def threshold_is_bounded(self) -> None:
        threshold = self.core.effective_failure_rate_threshold
        config = self.config
        if self.core.baseline_failure_rate is None:
            assert threshold == config.failure_rate_threshold
        else:
            assert config.adaptive_threshold
            # Learning only ever raises the configured threshold, up to the adaptive cap.
            assert threshold >= config.failure_rate_threshold
            assert threshold <= max(config.failure_rate_threshold, config.adaptive_max_threshold)

    @invariant()
    def snapshot_agrees(self) -> None:
        snap = self.core.snapshot(self.now)
        assert snap.state is self.core.state
        assert snap.probes_in_flight == self.core.probes_in_flight
        assert 0 <= snap.window_failures <= snap.window_calls
        assert 0 <= snap.window_slow_calls <= snap.window_calls
        if self.config.window == "count":
            assert snap.window_calls <= self.config.window_size


# Configs that reach half-open often: one counted failure trips, short open durations.
probe_configs = st.builds(
    CircuitBreakerConfig,
    failure_threshold=st.just(1),
    recovery_timeout=st.sampled_from([0.0, 1.0, 5.0]),
    success_threshold=st.integers(1, 3),
    half_open_max_calls=st.integers(1, 3),
    window_size=st.integers(1, 10),
    minimum_calls=st.integers(1, 10),
    recovery_backoff_multiplier=st.sampled_from([1.0, 2.0]),
    recovery_jitter=st.sampled_from([0.0, 1.0]),
    adaptive_threshold=st.booleans(),
)


class LateProbeMachine(BreakerMachine):
    """The same machine on breakers that go half-open often, so that probes outlive their
    episode (a lease that runs out, another probe failing, a reset or ``forget_probes``) and
    end in a later one: the checks of ``succeed``, ``fail`` and ``release`` then assert that
    their outcomes change nothing."""

    @initialize(config=probe_configs, seed=st.integers(0, 2**32 - 1))
    def start(self, config: CircuitBreakerConfig, seed: int) -> None:
        super().start(config, seed)

    def take(self, data: st.DataObject) -> tuple[Permit, bool]:
        # Calls outnumber probes by far: end a probe, when there is one, every other time.
        probes = [i for i, (p, _) in enumerate(self.outstanding) if p == Permit.PROBE]
        if probes and data.draw(st.booleans()):
            return self.pop(data.draw(st.sampled_from(probes)))
        return super().take(data)

    @rule()
    def acquire_more(self) -> None:  # rules are drawn evenly: this makes admissions likelier
        self.acquire()

    # Not rules here (a method of the same name without @rule hides the parent's): holding the
    # breaker open or closing it by hand would keep most runs away from half-open.
    def force_open(self) -> None:
        raise NotImplementedError

    def force_close(self) -> None:
        raise NotImplementedError

    def health_check(self, passed: bool) -> None:
        raise NotImplementedError


MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
BreakerMachine.TestCase.settings = MACHINE_SETTINGS
TestBreakerMachine = BreakerMachine.TestCase
LateProbeMachine.TestCase.settings = MACHINE_SETTINGS
TestLateProbeMachine = LateProbeMachine.TestCase
