"""The attempt loop, pure: driven step by step with a fake downstream and a made-up clock."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_raptor.core.attempts import AttemptLoop, LoopSpec, Refusal, RefusalKind, Step
from otel_raptor.core.breaker import BreakerCore, CircuitBreakerConfig, Permit
from otel_raptor.core.budget import RetryBudget
from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.events import (
    ErrorClassified,
    Event,
    RecoveryFinished,
    RetryBudgetExhausted,
    RetryScheduled,
)
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.retry import RetryPolicy

CATEGORIES = list(ErrorCategory)


def failure(
    category: ErrorCategory = ErrorCategory.UNAVAILABLE,
    *,
    retryable: bool = True,
    retry_after: float | None = None,
) -> Classification:
    return Classification(
        category=category,
        severity=Severity.MEDIUM,
        retryable=retryable,
        error_type="E",
        retry_after=retry_after,
    )


@dataclass
class FakePort:
    """A downstream with a real breaker core and budget, and no locks or clock."""

    service: str = "svc"
    cooldown_until: float = -math.inf
    breaker: BreakerCore = field(
        default_factory=lambda: BreakerCore(
            CircuitBreakerConfig(failure_threshold=1000, minimum_calls=1000, recovery_jitter=0.0),
            now=0.0,
            rnd=lambda: 0.5,
        )
    )
    budget: RetryBudget = field(default_factory=lambda: RetryBudget(1.0, 1000.0, now=0.0))
    futile: bool = False
    events: list[Event] = field(default_factory=list)
    calls_recorded: int = 0
    refunds: int = 0
    withdrawals: int = 0
    outcomes: list[bool] = field(default_factory=list)  # what the learner was taught

    @property
    def breaker_open(self) -> bool:
        return self.breaker.state.value != "closed"

    def record_call(self) -> None:
        self.calls_recorded += 1
        self.budget.record_call()

    def acquire(self, now: float) -> Permit:
        return self.breaker.acquire(now)[0]

    def reject(self, now: float) -> Refusal:
        return Refusal(RefusalKind.CIRCUIT_OPEN, self.service, self.breaker.retry_after(now))

    def record_success(self, permit: Permit, now: float, duration: float) -> None:
        self.breaker.on_success(permit, now, duration)

    def record_failure(
        self,
        permit: Permit,
        now: float,
        duration: float,
        category: ErrorCategory,
        *,
        retry: bool = False,
        live_refusal: bool = False,
        unconfirmed: bool = False,
        opened_at: float | None = None,
    ) -> None:
        self.breaker.on_failure(
            permit,
            now,
            duration,
            category,
            retry=retry,
            live_refusal=live_refusal,
            unconfirmed=unconfirmed,
            opened_at=opened_at,
        )

    def release(self, permit: Permit) -> None:
        self.breaker.release(permit)

    def withdraw(self, now: float) -> bool:
        ok = self.budget.try_withdraw(now)
        self.withdrawals += ok
        return ok

    def refund(self) -> None:
        self.refunds += 1
        self.budget.refund()

    def cool_down(self, until: float) -> None:
        self.cooldown_until = max(self.cooldown_until, until)

    throttle_share: float = 1.0

    def throttled(self, now: float) -> float:
        return self.throttle_share

    def should_retry(self, category: str, strategy: Strategy, now: float) -> bool:
        return not self.futile

    def record_outcome(
        self, category: str, strategy: Strategy, *, recovered: bool, now: float
    ) -> None:
        self.outcomes.append(recovered)

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


def loop(port: FakePort, policy: RetryPolicy | None = None, **spec: object) -> AttemptLoop:
    return AttemptLoop(
        LoopSpec.of(policy or RetryPolicy(base_delay=1.0, max_delay=10.0), **spec),  # type: ignore[arg-type]
        port,
        started=0.0,
        rnd=lambda: 0.5,
    )


# --- examples --------------------------------------------------------------------------------


def test_a_failure_then_a_success_is_a_recovery_that_refunds_its_retry() -> None:
    port = FakePort()
    run = loop(port)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.SLEEP
    assert run.delay == 0.5  # full jitter of 1.0 with rnd = 0.5
    assert run.slept(0.6) is Step.ATTEMPT
    assert run.succeeded(0.7) is Step.DONE
    assert port.withdrawals == port.refunds == 1
    assert port.calls_recorded == 1  # one logical call, whatever the attempts
    [finished] = port.of(RecoveryFinished)
    assert isinstance(finished, RecoveryFinished)
    assert (finished.outcome, finished.attempts) == (Outcome.RECOVERED, 2)
    assert [type(e) for e in port.events] == [ErrorClassified, RetryScheduled, RecoveryFinished]


def test_a_call_that_may_not_be_replayed_is_never_retried() -> None:
    port = FakePort()
    run = loop(port, replay_safe=False)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.GIVE_UP
    assert run.give_up_reason == "not_replay_safe"
    assert port.withdrawals == 0


def test_a_rate_limit_on_a_few_calls_pauses_only_those_calls() -> None:
    port = FakePort(throttle_share=0.25)
    run = loop(port)
    limited = failure(ErrorCategory.RATE_LIMIT, retry_after=2.0)
    assert run.first_failed(Permit.CALL, 0.0, limited, 0.0) is Step.SLEEP
    assert run.delay == 2.0  # this call waits out the server's pause...
    assert port.cooldown_until == -math.inf  # ...the others do not


def test_every_throttle_counts_towards_the_share_even_without_a_retry_after() -> None:
    class CountingPort(FakePort):
        throttles: int = 0

        def throttled(self, now: float) -> float:
            self.throttles += 1
            return self.throttle_share

    port = CountingPort(throttle_share=0.9)
    run = loop(port)
    assert run.first_failed(Permit.CALL, 0.0, failure(ErrorCategory.RATE_LIMIT), 0.0) is Step.SLEEP
    assert port.throttles == 1  # so a later 429 that names a pause sees the true share...
    assert port.cooldown_until == -math.inf  # ...but with no pause named, nobody else waits


def test_pervasive_rate_limits_start_a_cooldown_that_new_calls_honour() -> None:
    port = FakePort(throttle_share=0.6)
    run = loop(port)
    limited = failure(ErrorCategory.RATE_LIMIT, retry_after=2.0)
    assert run.first_failed(Permit.CALL, 0.0, limited, 0.0) is Step.SLEEP
    assert run.delay == 2.0  # never below Retry-After
    assert port.cooldown_until == 2.0
    assert port.breaker.snapshot(0.0).window_failures == 0  # throttling is not failing
    # A new call meanwhile waits out the rest of the pause...
    other = AttemptLoop(LoopSpec.of(RetryPolicy()), port, started=0.5, rnd=lambda: 0.5)
    assert other.admit(0.5) is Step.SLEEP
    assert other.delay == 1.5
    assert other.slept(2.0) is Step.ATTEMPT
    # ...unless the pause does not fit its policy: then it is refused at once.
    port.cool_down(100.0)
    short = AttemptLoop(
        LoopSpec.of(RetryPolicy(base_delay=0.1, max_delay=5.0)),
        port,
        started=3.0,
        rnd=random.random,
    )
    assert short.admit(3.0) is Step.REFUSE
    assert short.refusal == Refusal(RefusalKind.THROTTLED, "svc", 97.0)
    assert port.of(RecoveryFinished)[-1].give_up_reason == "throttled"  # type: ignore[union-attr]


def test_a_policy_that_ignores_retry_after_starts_no_cooldown() -> None:
    # It used to: "the header is ignored" by the retry, yet the call's 429 paused the
    # downstream, and the guard's next calls waited for it or were refused (ThrottledError).
    port = FakePort(throttle_share=1.0)
    run = loop(port, RetryPolicy(base_delay=1.0, max_delay=10.0, respect_retry_after=False))
    limited = failure(ErrorCategory.RATE_LIMIT, retry_after=60.0)
    assert run.first_failed(Permit.CALL, 0.0, limited, 0.0) is Step.SLEEP
    assert run.delay == 0.5  # the backoff only
    assert port.cooldown_until == -math.inf


def test_a_wait_the_driver_may_not_make_ends_the_call_unslept() -> None:
    # A sync call on an event loop's thread: sleeping would stall the loop (see drive.py).
    port = FakePort()
    run = loop(port)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.SLEEP
    assert run.cannot_wait(0.1) is Step.GIVE_UP  # with the failure, as without the retry
    assert port.withdrawals == port.refunds == 1  # no retry was made: its token goes back
    assert port.outcomes == []  # says nothing of the strategy
    [finished] = port.of(RecoveryFinished)
    assert isinstance(finished, RecoveryFinished)
    assert (finished.outcome, finished.attempts) == (Outcome.FAILED, 1)
    assert finished.give_up_reason == "event_loop"
    # Before any attempt (a cooldown to wait out) it is refused, as a longer wait is.
    port.cool_down(5.0)
    waiting = loop(port)
    assert waiting.admit(1.0) is Step.SLEEP
    assert waiting.cannot_wait(1.0) is Step.REFUSE
    assert waiting.refusal == Refusal(RefusalKind.THROTTLED, "svc", 4.0)


def test_an_open_breaker_refuses_and_a_fallback_gets_the_refusal() -> None:
    port = FakePort()
    port.breaker.force_open(0.0)
    plain = loop(port)
    assert plain.admit(1.0) is Step.REFUSE
    assert plain.refusal is not None
    assert plain.refusal.kind is RefusalKind.CIRCUIT_OPEN
    with_fallback = loop(port, has_fallback=True)
    assert with_fallback.admit(1.0) is Step.FALLBACK
    with_fallback.fallback_finished(ok=True, now=1.0)
    finished = port.of(RecoveryFinished)
    assert [(f.outcome, f.strategy) for f in finished] == [  # type: ignore[union-attr]
        (Outcome.REJECTED, Strategy.FAIL_FAST),
        (Outcome.FALLBACK, Strategy.FAILOVER),
    ]


def test_a_fallback_that_declines_reports_the_call_as_it_ended() -> None:
    port = FakePort()
    run = loop(port, RetryPolicy(max_retries=0), has_fallback=True)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.FALLBACK
    assert run.fallback_declined(0.2) is Step.GIVE_UP
    [finished] = port.of(RecoveryFinished)
    assert (finished.outcome, finished.strategy, finished.give_up_reason) == (  # type: ignore[union-attr]
        Outcome.FAILED,
        Strategy.FAIL_FAST,
        "attempts_exhausted",
    )


def test_an_empty_budget_ends_the_call_and_says_so() -> None:
    port = FakePort(budget=RetryBudget(0.0, 0.0, now=0.0))
    run = loop(port)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.GIVE_UP
    assert run.outcome is Outcome.BUDGET_EXHAUSTED
    assert len(port.of(RetryBudgetExhausted)) == 1


def test_learned_futility_ends_the_call() -> None:
    port = FakePort(futile=True)
    run = loop(port)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.GIVE_UP
    assert run.give_up_reason == "learned_futile"


@pytest.mark.parametrize(
    ("second", "throttle_share", "futile", "reason"),
    [
        (failure(retry_after=500.0), 0.0, False, "retry_after_too_long"),
        (failure(ErrorCategory.RATE_LIMIT, retry_after=500.0), 1.0, False, "retry_after_too_long"),
        (failure(), 0.0, True, "learned_futile"),
    ],
)
def test_a_retry_cut_short_by_the_policy_teaches_the_learner_nothing(
    second: Classification, throttle_share: float, futile: bool, reason: str
) -> None:
    port = FakePort(throttle_share=throttle_share)
    run = loop(port)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.SLEEP
    assert run.slept(0.6) is Step.ATTEMPT
    port.futile = futile
    assert run.failed(second, 0.7) is Step.GIVE_UP
    assert (run.give_up_reason, run.outcome) == (reason, Outcome.FAILED)
    assert port.outcomes == []


def test_a_retry_that_ran_its_course_teaches_the_learner() -> None:
    port = FakePort()
    run = loop(port, RetryPolicy(max_retries=1, base_delay=1.0))
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.SLEEP
    assert run.slept(0.6) is Step.ATTEMPT
    assert run.failed(failure(), 0.7) is Step.GIVE_UP
    assert run.give_up_reason == "attempts_exhausted"
    assert port.outcomes == [False]


def test_a_throttled_retry_teaches_the_learner_nothing() -> None:
    port = FakePort()
    run = loop(port)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.SLEEP
    port.cooldown_until = 100.0  # another call's 429 paused the downstream meanwhile
    assert run.slept(0.6) is Step.GIVE_UP
    assert run.give_up_reason == "throttled"
    assert port.outcomes == []


def test_a_breaker_that_opens_between_retries_ends_the_call_with_its_last_error() -> None:
    port = FakePort()
    run = loop(port)
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.SLEEP
    port.breaker.force_open(0.2)
    assert run.slept(0.6) is Step.GIVE_UP  # no refusal: the app's own last error
    assert run.refusal is None
    assert run.outcome is Outcome.REJECTED


def test_cancellation_publishes_nothing_and_frees_a_probe() -> None:
    port = FakePort()
    port.breaker.force_open(0.0)
    port.breaker.force_close(0.0)
    run = loop(port)
    assert run.admit(0.0) is Step.ATTEMPT
    assert run.cancelled() is Step.GIVE_UP
    assert port.events == []


def test_auth_refresh_retries_a_failure_that_is_not_retryable_once() -> None:
    port = FakePort()
    spec = {"fixed_strategy": Strategy.AUTH_REFRESH, "force_retryable": True}
    run = loop(port, RetryPolicy(max_retries=1, base_delay=0.0), **spec)
    denied = failure(ErrorCategory.AUTHENTICATION, retryable=False)
    assert run.first_failed(Permit.CALL, 0.0, denied, 0.0) is Step.SLEEP
    assert run.slept(0.0) is Step.ATTEMPT
    assert run.failed(denied, 0.1) is Step.GIVE_UP  # only the first is forced


# --- properties ------------------------------------------------------------------------------

outcomes = st.lists(
    st.one_of(
        st.just("ok"),
        st.just("cancel"),
        st.builds(
            failure,
            st.sampled_from(CATEGORIES),
            retryable=st.booleans(),
            retry_after=st.one_of(st.none(), st.floats(0.0, 30.0)),
        ),
    ),
    min_size=1,
    max_size=12,
)
policies = st.builds(
    RetryPolicy,
    max_retries=st.integers(0, 5),
    base_delay=st.floats(0.0, 2.0),
    max_delay=st.just(10.0),
    deadline=st.one_of(st.none(), st.floats(0.5, 20.0)),
)


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    replay_safe=st.booleans(),
    has_fallback=st.booleans(),
    script=outcomes,
    seed=st.integers(0, 2**16),
)
def test_every_outcome_sequence_ends_within_the_policy(
    policy: RetryPolicy, replay_safe: bool, has_fallback: bool, script: list[object], seed: int
) -> None:
    port = FakePort()
    rng = random.Random(seed)
    run = AttemptLoop(
        LoopSpec.of(policy, replay_safe=replay_safe, has_fallback=has_fallback),
        port,
        started=0.0,
        rnd=rng.random,
    )
    now = 0.0
    step = run.admit(now)
    outcomes_left = list(script)
    attempts = 0
    cancelled = False
    for _ in range(200):  # far more than any policy allows: the loop must end long before
        if step is Step.ATTEMPT:
            attempts += 1
            outcome = outcomes_left.pop(0) if outcomes_left else "ok"
            now += 0.01
            if outcome == "ok":
                step = run.succeeded(now)
            elif outcome == "cancel":
                cancelled = True
                step = run.cancelled()
            else:
                assert isinstance(outcome, Classification)
                step = run.failed(outcome, now)
        elif step is Step.SLEEP:
            assert run.delay >= 0.0
            if policy.deadline is not None and attempts:
                # A retry never sleeps past the deadline.
                assert now + run.delay < policy.deadline
            now += run.delay
            step = run.slept(now)
        elif step is Step.FALLBACK:
            run.fallback_finished(ok=rng.random() < 0.5, now=now)
            break
        else:
            break
    else:
        raise AssertionError("the loop never ended")
    assert step in (Step.DONE, Step.GIVE_UP, Step.REFUSE, Step.FALLBACK)
    assert attempts <= policy.max_retries + 1
    if not replay_safe:
        assert attempts <= 1  # a call that may not be replayed is sent once at most
    assert port.withdrawals == len(port.of(RetryScheduled))  # no retry without a token
    finished = port.of(RecoveryFinished)
    assert len(finished) <= 1
    failed_once = any(isinstance(e, ErrorClassified) for e in port.events)
    if step is Step.DONE and not failed_once:
        assert finished == []  # a plain success publishes nothing
    if cancelled:
        assert finished == []  # abandoned, not failed
    elif failed_once:
        assert len(finished) == 1


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    overruns=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_no_retry_starts_at_or_after_the_deadline_however_late_the_sleep_ends(
    policy: RetryPolicy, overruns: list[float], seed: int
) -> None:
    # A sleep can end late (a busy event loop, a stalled process): the retry after it used to
    # start anyway, past the deadline, with a 1 ms timeout or none at all.
    port = FakePort()
    rng = random.Random(seed)
    run = AttemptLoop(LoopSpec.of(policy), port, started=0.0, rnd=rng.random)
    now = 0.0
    step = run.admit(now)
    for index in range(50):
        if step is Step.ATTEMPT:
            if run.attempts and policy.deadline is not None:
                assert now < policy.deadline
            now += 0.01
            step = run.failed(failure(), now)
        elif step is Step.SLEEP:
            now += run.delay + overruns[index % len(overruns)]
            step = run.slept(now)
        else:
            break
    assert step is Step.GIVE_UP
    if policy.deadline is not None and now >= policy.deadline:
        assert run.give_up_reason == "deadline"


def test_a_retry_whose_sleep_overran_the_deadline_gives_up() -> None:
    port = FakePort()
    run = loop(port, RetryPolicy(base_delay=0.3, jitter="none", deadline=1.0))
    assert run.first_failed(Permit.CALL, 0.0, failure(), 0.1) is Step.SLEEP
    assert run.slept(1.2) is Step.GIVE_UP
    assert (run.attempts, run.give_up_reason) == (1, "deadline")
    [finished] = port.of(RecoveryFinished)
    assert isinstance(finished, RecoveryFinished)
    assert finished.give_up_reason == "deadline"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=60))
def test_productive_retries_keep_the_budget_and_futile_ones_drain_it(script: list[bool]) -> None:
    # One failure, then a retry that succeeds or fails, call after call.
    port = FakePort(budget=RetryBudget(0.0, 0.0, now=0.0))
    port.budget._tokens = 5.0
    for retry_succeeds in script:
        run = loop(port, RetryPolicy(max_retries=1, base_delay=0.0))
        step = run.first_failed(Permit.CALL, 0.0, failure(), 0.0)
        if step is not Step.SLEEP:
            continue  # out of tokens
        run.slept(0.0)
        if retry_succeeds:
            run.succeeded(0.0)
        else:
            run.failed(failure(), 0.0)
    futile = sum(1 for s in script if not s)
    # Each futile retry costs a token; a productive one gives it back; an empty budget stops
    # retrying (so nothing changes any more).
    assert port.budget.tokens(0.0) == max(0.0, 5.0 - futile)
