from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from otel_raptor import (
    BreakerTransitioned,
    CallRejected,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    Classification,
    ConfigError,
    ErrorCategory,
    ErrorClassified,
    Event,
    Guard,
    Outcome,
    RecoveryFinished,
    RetryBudgetExhausted,
    RetryPolicy,
    RetryScheduled,
    Runtime,
    Severity,
    Strategy,
    resilient,
)
from otel_raptor.core.breaker import Permit
from otel_raptor.core.learning import LearnerOptions
from otel_raptor.core.states import TransitionReason
from otel_raptor.runtime import safety
from otel_raptor.runtime.classifying import classify
from tests.support.clock import FakeClock


@pytest.fixture
def runtime(clock: FakeClock) -> Runtime:
    return Runtime(clock=clock)


@pytest.fixture
def events(runtime: Runtime) -> list[Event]:
    seen: list[Event] = []
    runtime.bus.subscribe(seen.append)
    return seen


class Flaky:
    """Fails with the given errors, in order, then returns ``value``."""

    def __init__(self, *errors: BaseException, value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0
        self.kwargs: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> object:
        self.calls += 1
        self.kwargs.append(kwargs)
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def of(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def test_success_returns_the_same_object_and_publishes_nothing(
    runtime: Runtime, events: list[Event]
) -> None:
    value = object()
    guard = Guard("svc", runtime=runtime)
    assert guard.call(lambda: value) is value
    assert events == []


def test_transient_connection_errors_are_retried_with_backoff(
    runtime: Runtime, events: list[Event], clock: FakeClock
) -> None:
    flaky = Flaky(ConnectionRefusedError(111, "refused"), ConnectionResetError(104, "reset"))
    guard = Guard("svc", runtime=runtime, rnd=lambda: 1.0)
    assert guard.call(flaky) == "ok"
    assert flaky.calls == 3
    # full jitter with rnd=1.0 gives the whole exponential delay: 1 s, then 2 s
    assert clock.sleeps == [1.0, 2.0]
    scheduled = of(events, RetryScheduled)
    assert [(e.attempt, e.delay_s) for e in scheduled] == [(1, 1.0), (2, 2.0)]
    assert all(e.classification.category is ErrorCategory.CONNECTION for e in scheduled)
    (finished,) = of(events, RecoveryFinished)
    assert finished.outcome is Outcome.RECOVERED
    assert finished.strategy is Strategy.RECONNECT
    assert finished.attempts == 3
    assert finished.duration_s == pytest.approx(3.0)


def test_exhausted_retries_reraise_the_last_error_unchained(
    runtime: Runtime, events: list[Event]
) -> None:
    errors = [TimeoutError(f"t{i}") for i in range(4)]
    flaky = Flaky(*errors)
    guard = Guard("svc", retry=RetryPolicy(max_retries=3, base_delay=0.1), runtime=runtime)
    with pytest.raises(TimeoutError) as caught:
        guard.call(flaky)
    assert caught.value is errors[-1]
    assert caught.value.__context__ is None  # the earlier attempts are not chained onto it
    assert flaky.calls == 4
    (finished,) = of(events, RecoveryFinished)
    assert (finished.outcome, finished.give_up_reason) == (Outcome.FAILED, "attempts_exhausted")
    assert len(of(events, ErrorClassified)) == 4


def test_non_retryable_errors_fail_fast(runtime: Runtime, events: list[Event]) -> None:
    error = ValueError("bad input")
    flaky = Flaky(error)
    with pytest.raises(ValueError, match="bad input") as caught:
        Guard("svc", runtime=runtime).call(flaky)
    assert caught.value is error
    assert flaky.calls == 1
    (finished,) = of(events, RecoveryFinished)
    assert finished.strategy is Strategy.FAIL_FAST
    assert finished.give_up_reason == "not_retryable"


def test_operations_that_are_not_replay_safe_are_never_repeated(
    runtime: Runtime, events: list[Event]
) -> None:
    flaky = Flaky(ConnectionResetError(104, "reset"))
    with pytest.raises(ConnectionResetError):
        Guard("svc", replay_safe=False, runtime=runtime).call(flaky)
    assert flaky.calls == 1
    assert of(events, RecoveryFinished)[0].give_up_reason == "not_replay_safe"


def rate_limited(exc: BaseException, *, context: Any = None) -> Classification:
    return Classification(
        category=ErrorCategory.RATE_LIMIT,
        severity=Severity.MEDIUM,
        retryable=True,
        error_type="429",
        retry_after=7.0,
    )


def test_retry_after_is_never_violated(runtime: Runtime, clock: FakeClock) -> None:
    flaky = Flaky(RuntimeError("429"))
    guard = Guard("svc", runtime=runtime, classifier=rate_limited, rnd=lambda: 0.0)
    assert guard.call(flaky) == "ok"
    assert clock.sleeps == [7.0]


def test_retry_after_beyond_the_deadline_gives_up_at_once(
    runtime: Runtime, clock: FakeClock, events: list[Event]
) -> None:
    flaky = Flaky(RuntimeError("429"))
    guard = Guard(
        "svc",
        retry=RetryPolicy(deadline=5.0),
        runtime=runtime,
        classifier=rate_limited,
    )
    with pytest.raises(RuntimeError):
        guard.call(flaky)
    assert clock.sleeps == []
    assert of(events, RecoveryFinished)[0].give_up_reason == "retry_after_beyond_deadline"


def test_the_retry_budget_stops_a_retry_storm(clock: FakeClock) -> None:
    runtime = Runtime(
        clock=clock,
        budget_ratio=0.1,
        budget_min_retries_per_second=0.0001,
        learner=LearnerOptions(min_samples=1e6),  # keep the learner out of this test
    )
    seen: list[Event] = []
    runtime.bus.subscribe(seen.append)
    guard = Guard(
        "storm", retry=RetryPolicy(max_retries=1, base_delay=0.0), breaker=False, runtime=runtime
    )
    for _ in range(100):
        guard.call(lambda: None)  # 100 calls deposit 10 retry tokens
    failures = 0
    for _ in range(50):
        with pytest.raises(ConnectionResetError):
            guard.call(Flaky(*[ConnectionResetError(104, "x")] * 2))
        failures += 1
    retries = len(of(seen, RetryScheduled))
    exhausted = len(of(seen, RetryBudgetExhausted))
    assert retries + exhausted == failures
    # 150 logical calls at 10 % earn 15 retries; time stands still, so the floor adds none
    assert 13 <= retries <= 15
    budget_outcomes = [
        e for e in of(seen, RecoveryFinished) if e.outcome is Outcome.BUDGET_EXHAUSTED
    ]
    assert len(budget_outcomes) == exhausted


def test_the_breaker_opens_fails_fast_and_closes_again(
    runtime: Runtime, events: list[Event], clock: FakeClock
) -> None:
    config = CircuitBreakerConfig(
        failure_threshold=3, recovery_timeout=10.0, success_threshold=1, recovery_jitter=0.0
    )
    guard = Guard("db", retry=False, breaker=config, runtime=runtime)
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            guard.call(Flaky(ConnectionRefusedError(111, "refused")))
    assert guard.breaker is not None
    assert guard.breaker.state is CircuitState.OPEN
    never = Flaky()
    with pytest.raises(CircuitOpenError) as caught:
        guard.call(never)
    assert never.calls == 0
    assert caught.value.breaker == "db"
    assert caught.value.retry_after == pytest.approx(10.0)
    assert len(of(events, CallRejected)) == 1
    clock.advance(10.0)
    assert guard.call(lambda: "probe") == "probe"
    assert guard.breaker.state is CircuitState.CLOSED
    moves = [(e.from_state, e.to_state) for e in of(events, BreakerTransitioned)]
    assert moves == [
        (CircuitState.CLOSED, CircuitState.OPEN),
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]


def test_a_fallback_answers_for_an_open_breaker_and_for_exhausted_retries(
    runtime: Runtime, events: list[Event]
) -> None:
    seen: list[BaseException] = []

    def fallback(error: BaseException) -> str:
        seen.append(error)
        return "cached"

    guard = Guard(
        "api",
        retry=False,
        fallback=fallback,
        runtime=runtime,
        breaker=CircuitBreakerConfig(failure_threshold=1),
    )
    assert guard.call(Flaky(ConnectionResetError(104, "x"))) == "cached"
    assert guard.call(Flaky()) == "cached"  # now rejected by the open breaker
    assert isinstance(seen[0], ConnectionResetError)
    assert isinstance(seen[1], CircuitOpenError)
    outcomes = [(e.strategy, e.outcome) for e in of(events, RecoveryFinished)]
    assert outcomes == [(Strategy.FAILOVER, Outcome.FALLBACK)] * 2


def test_a_breaker_that_opens_during_retries_surfaces_the_apps_error(
    runtime: Runtime, events: list[Event]
) -> None:
    error = ConnectionRefusedError(111, "refused")
    guard = Guard(
        "svc",
        retry=RetryPolicy(max_retries=4, base_delay=0.0),
        runtime=runtime,
        breaker=CircuitBreakerConfig(failure_threshold=2),
    )
    breaker = guard.breaker
    assert breaker is not None
    calls = 0

    def failing() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            # Meanwhile, other calls fail: two failed calls in a row open the breaker.
            for _ in range(2):
                breaker.record_failure(Permit.CALL, 0.01, ErrorCategory.CONNECTION)
        raise error

    with pytest.raises(ConnectionRefusedError) as caught:
        guard.call(failing)
    assert caught.value is error
    assert calls == 2
    (finished,) = of(events, RecoveryFinished)
    assert (finished.outcome, finished.give_up_reason) == (Outcome.REJECTED, "breaker_rejected")


def test_one_calls_retries_never_open_the_breaker_by_themselves(
    runtime: Runtime, events: list[Event]
) -> None:
    # Five attempts of one slow request are one failed call, not a run of five: the next
    # calls to a downstream that answers them must go through (a healthy /fast behind a
    # /slow that times out).
    error = TimeoutError("read timed out")
    guard = Guard(
        "svc",
        retry=RetryPolicy(max_retries=4, base_delay=0.0),
        runtime=runtime,
        breaker=CircuitBreakerConfig(failure_threshold=5),
    )
    flaky = Flaky(*[error] * 5)
    with pytest.raises(TimeoutError):
        guard.call(flaky)
    assert flaky.calls == 5
    assert guard.call(lambda: "fast") == "fast"
    assert not of(events, BreakerTransitioned)
    # ...while two failed calls in a row are a run the rule may act on.
    for _ in range(2):
        with pytest.raises(TimeoutError):
            guard.call(Flaky(*[error] * 5))
    assert [t.reason for t in of(events, BreakerTransitioned)] == [
        TransitionReason.CONSECUTIVE_FAILURES
    ]


def test_a_bug_in_our_code_never_changes_the_apps_error(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    safety._reset_for_tests()

    def broken(exc: BaseException, *, context: Any = None) -> Classification:
        raise KeyError("our bug")

    error = ConnectionResetError(104, "reset")
    flaky = Flaky(error)
    with (
        caplog.at_level(logging.WARNING, logger="otel_raptor"),
        pytest.raises(ConnectionResetError) as caught,
    ):
        Guard("svc", runtime=runtime, classifier=broken).call(flaky)
    assert caught.value is error
    assert flaky.calls == 1
    assert "drive.failed" in caplog.text


class _Odd(Exception):
    pass


def _classifier_with_a_bug(exc: BaseException, *, context: Any = None) -> Classification:
    if isinstance(exc, _Odd):
        raise KeyError("our bug")
    return classify(exc, context=context)


def _raise_odd() -> None:
    raise _Odd


async def _raise_odd_async() -> None:
    raise _Odd


@pytest.mark.parametrize("is_async", [False, True])
def test_a_bug_during_a_probe_gives_the_probe_slot_back(
    runtime: Runtime, clock: FakeClock, is_async: bool
) -> None:
    # A probe whose failure our code failed to judge used to keep its half-open slot for
    # ever: the breaker then refused every call, however healthy the downstream.
    safety._reset_for_tests()
    guard = Guard(
        "svc",
        runtime=runtime,
        retry=0,
        classifier=_classifier_with_a_bug,
        breaker=CircuitBreakerConfig(failure_threshold=1, recovery_timeout=1, recovery_jitter=0),
    )
    breaker = guard.breaker
    assert breaker is not None
    with pytest.raises(ConnectionRefusedError):
        guard.call(Flaky(ConnectionRefusedError(111, "refused")))
    assert breaker.state is CircuitState.OPEN
    clock.advance(2)

    def probe() -> object:
        if is_async:
            return asyncio.run(guard.call_async(_raise_odd_async))
        return guard.call(_raise_odd)

    with pytest.raises(_Odd):  # the probe: its error reaches the app unchanged
        probe()
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.snapshot().probes_in_flight == 0
    assert guard.call(lambda: "ok") == "ok"  # the next probe is admitted


def test_keyboard_interrupt_is_neither_retried_nor_counted(runtime: Runtime) -> None:
    guard = Guard("svc", runtime=runtime, breaker=CircuitBreakerConfig(failure_threshold=1))
    flaky = Flaky(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        guard.call(flaky)
    assert flaky.calls == 1
    assert guard.breaker is not None
    assert guard.breaker.state is CircuitState.CLOSED


def test_learning_stops_spending_retries_on_a_category_that_never_recovers(
    clock: FakeClock,
) -> None:
    runtime = Runtime(
        clock=clock, learner=LearnerOptions(min_samples=5, probe_every=4, probe_after_s=1e9)
    )
    seen: list[Event] = []
    runtime.bus.subscribe(seen.append)
    guard = Guard(
        "dead", retry=RetryPolicy(max_retries=1, base_delay=0.0), breaker=False, runtime=runtime
    )
    calls = []
    for _ in range(17):
        flaky = Flaky(*[ConnectionResetError(104, "x")] * 2)
        with pytest.raises(ConnectionResetError):
            guard.call(flaky)
        calls.append(flaky.calls)
    # five real tries teach it; then three refusals and a probe, repeated
    assert calls[:5] == [2] * 5
    assert calls[5:] == [1, 1, 1, 2] * 3
    reasons = [e.give_up_reason for e in of(seen, RecoveryFinished)]
    assert reasons.count("learned_futile") == 9


def test_timeout_kwarg_is_filled_and_lengthened_after_a_timeout(runtime: Runtime) -> None:
    flaky = Flaky(TimeoutError("slow"), TimeoutError("slow"))
    guard = Guard(
        "svc",
        retry=RetryPolicy(attempt_timeout=2.0, base_delay=0.0),
        timeout_kwarg="timeout",
        runtime=runtime,
    )
    assert guard.call(flaky) == "ok"
    timeouts = [kw["timeout"] for kw in flaky.kwargs]
    assert timeouts[0] == 2.0
    assert timeouts[0] < timeouts[1] < timeouts[2]


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ConfigError, match="service"):
        Guard("")
    with pytest.raises(ConfigError, match="service"):
        Guard("  ")  # a name nobody could read in a dashboard
    with pytest.raises(ConfigError, match=r"retry\.max_retries"):
        Guard("svc", retry=-1)
    with pytest.raises(ConfigError, match=r"breaker\.failure_threshold"):
        Guard("svc", breaker={"failure_threshold": 0})
    with pytest.raises(ConfigError, match="fallback"):
        Guard("svc", fallback="not callable")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        # A truthy string would make a non-replayable call replayable: three runs, not one.
        ("replay_safe", "false"),
        ("replay_safe", 0),
        ("critical", "no"),
        ("classifier", 5),
        ("rnd", 5),
        ("runtime", 5),
    ],
)
def test_every_argument_is_checked_when_the_guard_is_made(argument: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        Guard("svc", **{argument: value})  # type: ignore[arg-type]
    assert caught.value.key == argument
    assert caught.value.value is value
    if argument in ("replay_safe", "critical", "runtime"):  # the decorator's own arguments
        with pytest.raises(ConfigError) as caught:
            resilient(service="svc", **{argument: value})(lambda: None)  # type: ignore[call-overload]
        assert caught.value.key == argument


# --------------------------------------------------------------------- async


async def test_async_calls_retry_without_blocking_and_return_the_value(
    runtime: Runtime, clock: FakeClock
) -> None:
    attempts = 0

    async def fetch() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionResetError(104, "reset")
        return "body"

    guard = Guard("svc", runtime=runtime, rnd=lambda: 0.5)
    assert await guard.call_async(fetch) == "body"
    assert clock.sleeps == [0.5, 1.0]


async def test_call_given_a_coroutine_function_guards_its_attempts(
    runtime: Runtime, clock: FakeClock
) -> None:
    attempts = 0

    class Client:
        async def fetch(self, suffix: str) -> str:
            nonlocal attempts
            attempts += 1
            if attempts % 3:
                raise ConnectionResetError(104, "reset")
            return "body" + suffix

    async def fetch(suffix: str) -> str:
        return await Client.fetch(Client(), suffix)

    guard = Guard("svc", runtime=runtime, rnd=lambda: 0.5)
    # Awaited as the bare call would be; a plain function and a bound method alike.
    assert await guard.call(fetch, "!") == "body!"
    assert await guard.call(Client().fetch, suffix="?") == "body?"
    assert attempts == 6
    assert clock.sleeps == [0.5, 1.0, 0.5, 1.0]
    # In a partial, or as an object's async ``__call__``: these have no ``__code__`` of their
    # own, and were run as sync calls that guarded only the coroutine's creation.
    assert await guard.call(functools.partial(fetch, "+")) == "body+"
    fetch_object = _AsyncFetch()
    assert await guard.call(fetch_object) == "ok"
    assert fetch_object.calls == 2
    assert attempts == 9


async def test_cancellation_propagates_at_once_and_is_not_a_failure(
    runtime: Runtime, events: list[Event]
) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    guard = Guard("svc", runtime=runtime, breaker=CircuitBreakerConfig(failure_threshold=1))
    task = asyncio.ensure_future(guard.call_async(slow))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert guard.breaker is not None
    assert guard.breaker.state is CircuitState.CLOSED
    assert of(events, RetryScheduled) == []
    assert of(events, RecoveryFinished) == []


async def test_async_per_attempt_timeout_is_retried_as_a_timeout() -> None:
    runtime = Runtime()  # real clock: wait_for needs real time to pass
    attempts = 0

    async def sometimes_hangs() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(5)
        return "fast"

    guard = Guard("svc", retry=RetryPolicy(attempt_timeout=0.05, base_delay=0.0), runtime=runtime)
    assert await guard.call_async(sometimes_hangs) == "fast"
    assert attempts == 2


async def test_a_cancel_that_lands_as_a_timed_attempt_ends_stops_the_caller() -> None:
    # asyncio.wait_for (Python 3.11) ran each timed attempt in a task of its own, and a cancel
    # that reached the caller as that task finished was dropped (its result returned
    # instead): a worker looping over guarded calls kept going after task.cancel().
    guard = Guard("svc", retry=RetryPolicy(attempt_timeout=5.0), runtime=Runtime())
    rounds = 0
    worker: asyncio.Future[None] | None = None

    async def attempt() -> str:
        await asyncio.sleep(0)
        if rounds == 3:
            assert worker is not None
            asyncio.get_running_loop().call_soon(worker.cancel)  # lands as this one ends
        return "ok"

    async def work() -> None:
        nonlocal rounds
        while rounds < 50:
            rounds += 1
            assert await guard.call_async(attempt) == "ok"

    worker = asyncio.ensure_future(work())
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert rounds == 4  # stopped at its next await, as it would without the guard


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
async def test_guarded_calls_run_as_eager_tasks() -> None:
    # With asyncio.eager_task_factory a task's coroutine starts inside create_task(), before
    # the loop has scheduled it: the attempt timeout (asyncio.timeout on the current task),
    # a call that never suspends, and a cancel that lands as an attempt ends still behave.
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
    guard = Guard("svc", retry=RetryPolicy(attempt_timeout=0.05, base_delay=0.0), runtime=Runtime())
    attempts = 0

    async def sometimes_hangs() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(5)
        return "fast"

    async def never_suspends() -> str:
        return "done"

    hanging = asyncio.create_task(guard.call_async(sometimes_hangs))
    assert not hanging.done()  # suspended in its first attempt
    assert await hanging == "fast"
    assert attempts == 2
    at_once = asyncio.create_task(guard.call_async(never_suspends))
    assert at_once.done()  # ran to the end inside create_task()
    assert at_once.result() == "done"

    rounds = 0
    worker: asyncio.Task[None] | None = None

    async def attempt() -> str:
        await asyncio.sleep(0)
        if rounds == 3:
            assert worker is not None
            asyncio.get_running_loop().call_soon(worker.cancel)  # lands as this one ends
        return "ok"

    async def work() -> None:
        nonlocal rounds
        while rounds < 50:
            rounds += 1
            assert await guard.call_async(attempt) == "ok"

    worker = asyncio.create_task(work())
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert rounds == 4


# ----------------------------------------------------------------- decorator


def test_resilient_decorates_sync_functions(runtime: Runtime, clock: FakeClock) -> None:
    flaky = Flaky(ConnectionResetError(104, "reset"), value=41)

    @resilient(service="inventory", runtime=runtime)
    def lookup(item: str) -> int:
        return int(flaky()) + len(item)  # type: ignore[call-overload]

    assert lookup("a") == 42
    assert lookup.__name__ == "lookup"
    assert lookup.guard.service == "inventory"  # type: ignore[attr-defined]
    assert len(clock.sleeps) == 1


async def test_resilient_decorates_coroutine_functions(runtime: Runtime) -> None:
    calls = 0

    @resilient(runtime=runtime, retry=2)
    async def fetch() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError(104, "reset")
        return "ok"

    assert asyncio.iscoroutinefunction(fetch)
    assert await fetch() == "ok"
    assert fetch.guard.service.endswith("fetch")  # type: ignore[attr-defined]


def test_resilient_rejects_bad_config_when_decorating() -> None:
    with pytest.raises(ConfigError, match=r"retry\.base_delay"):

        @resilient(retry={"base_delay": -1})
        def never() -> None: ...


def test_resilient_refuses_what_is_not_a_function(runtime: Runtime) -> None:
    # These used to fail with "'str' object has no attribute '__module__'", or (a class)
    # to replace the class with a function.
    with pytest.raises(ConfigError, match=r"service=\.\.\."):
        resilient("inventory")  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="function"):
        resilient(5)  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="not a class"):

        @resilient(service="svc", runtime=runtime)
        class Client: ...


def _items() -> Iterator[int]:
    yield 1
    raise ConnectionResetError(104, "reset")


async def _items_async() -> AsyncIterator[int]:
    yield 1
    raise ConnectionResetError(104, "reset")


@pytest.mark.parametrize("generator", [_items, _items_async])
def test_resilient_refuses_generator_functions(runtime: Runtime, generator: Any) -> None:
    # Calling one returns at once: the guard counted a success and the failure came later,
    # while iterating, unretried and unseen by the breaker.
    with pytest.raises(ConfigError, match="not a generator function"):
        resilient(service="svc", runtime=runtime)(generator)


def test_a_breaker_config_the_services_breaker_does_not_have_is_refused(
    runtime: Runtime,
) -> None:
    # The breaker is the service's, shared: a second config used to be dropped without a
    # word, so failure_threshold=1 silently meant 5.
    first = Guard("inventory", runtime=runtime)
    same = Guard("inventory", runtime=runtime, breaker=CircuitBreakerConfig())
    assert same.breaker is first.breaker
    with pytest.raises(ConfigError, match=r"failure_threshold=5.*another service") as caught:
        Guard("inventory", runtime=runtime, breaker={"failure_threshold": 1})
    assert caught.value.value == {"failure_threshold": 1}
    with pytest.raises(ConfigError, match="recovery_timeout=2"):

        @resilient(
            service="inventory", runtime=runtime, breaker=CircuitBreakerConfig(recovery_timeout=5)
        )
        def fetch() -> None: ...

    # Past max_services the name shares the "other" breaker: that is no conflict.
    small = Runtime(max_services=1)
    Guard("a", runtime=small)
    folded = Guard("b", runtime=small, breaker=CircuitBreakerConfig(failure_threshold=1))
    assert folded.service == "other"


def test_repeated_failures_raise_the_severity(runtime: Runtime, events: list[Event]) -> None:
    guard = Guard("svc", retry=False, breaker=False, runtime=runtime)
    for _ in range(6):
        with pytest.raises(ConnectionResetError):
            guard.call(Flaky(ConnectionResetError(104, "x")))
    severities = [e.classification.severity for e in of(events, ErrorClassified)]
    assert severities[0] is Severity.MEDIUM
    assert severities[3] is Severity.MEDIUM  # the fourth in a minute is still routine
    assert severities[4] is Severity.HIGH  # the fifth is a pattern
    assert severities[5] is Severity.HIGH


def test_the_repeat_window_forgets(runtime: Runtime, clock: FakeClock) -> None:
    for _ in range(10):
        runtime.note_failure("svc", "timeout")
    assert runtime.note_failure("svc", "timeout") == 11
    clock.advance(90.0)  # half of the previous minute still overlaps the window
    assert runtime.note_failure("svc", "timeout") in (6, 7)
    clock.advance(200.0)
    assert runtime.note_failure("svc", "timeout") == 1
    assert runtime.note_failure("svc", "connection") == 1


def test_a_fallback_that_raises_is_reported_as_a_failure(
    runtime: Runtime, events: list[Event]
) -> None:
    def fallback(error: BaseException) -> str:
        raise LookupError("no cached copy")

    guard = Guard("api", retry=False, fallback=fallback, runtime=runtime)
    with pytest.raises(LookupError) as raised:
        guard.call(Flaky(ConnectionResetError(104, "x")))
    (finished,) = of(events, RecoveryFinished)
    assert (finished.strategy, finished.outcome) == (Strategy.FAILOVER, Outcome.FAILED)
    assert finished.give_up_reason == "fallback_failed"
    # As ``except: fallback()`` would show it: the failure the fallback answered for.
    assert isinstance(raised.value.__context__, ConnectionResetError)


def test_an_async_fallback_on_a_sync_call_is_refused_never_returned(
    runtime: Runtime, recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    async def fallback(error: BaseException) -> str:
        return "cached"

    with pytest.raises(ConfigError, match="fallback"):

        @resilient(retry=False, fallback=fallback, runtime=runtime)
        def fetch() -> str:
            raise ConnectionResetError(104, "x")

    # A Guard serves call() and call_async() alike: the sync call finds out when it falls
    # back, and ends as it would without the fallback (the app's own error), saying so once.
    guard = Guard("api", retry=False, fallback=fallback, runtime=runtime)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        for _ in range(2):
            with pytest.raises(ConnectionResetError):
                guard.call(Flaky(ConnectionResetError(104, "x")))
    assert len([r for r in caplog.records if "is an async function" in r.getMessage()]) == 1
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
    assert asyncio.run(guard.call_async(_failing_async)) == "cached"


async def _failing_async() -> str:
    raise ConnectionResetError(104, "x")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, asyncio.CancelledError])
def test_a_fallback_cut_short_is_not_reported_as_a_failed_recovery(
    runtime: Runtime, events: list[Event], interrupt: type[BaseException]
) -> None:
    def fallback(error: BaseException) -> str:
        raise interrupt

    guard = Guard("api", retry=False, fallback=fallback, runtime=runtime)
    with pytest.raises(interrupt):
        guard.call(Flaky(ConnectionResetError(104, "x")))
    with pytest.raises(interrupt):
        asyncio.run(guard.call_async(_failing_async))
    assert of(events, RecoveryFinished) == []


def test_a_failing_fallback_for_an_open_breaker_is_reported_as_a_failure(
    runtime: Runtime, events: list[Event]
) -> None:
    def fallback(error: BaseException) -> str:
        raise LookupError("no cached copy")

    guard = Guard(
        "api",
        retry=False,
        fallback=fallback,
        runtime=runtime,
        breaker=CircuitBreakerConfig(failure_threshold=1),
    )
    with pytest.raises(LookupError):
        guard.call(Flaky(ConnectionResetError(104, "x")))  # opens the breaker
    with pytest.raises(LookupError):
        guard.call(Flaky())  # refused; the fallback fails too
    outcomes = [(e.strategy, e.outcome) for e in of(events, RecoveryFinished)]
    assert outcomes == [(Strategy.FAILOVER, Outcome.FAILED)] * 2


def test_a_declined_fallback_leaves_the_callers_error_as_it_was(runtime: Runtime) -> None:
    from otel_raptor.runtime.drive import FallbackDeclined

    def nothing_to_offer(error: BaseException) -> str:
        raise FallbackDeclined

    guard = Guard("api", retry=False, fallback=nothing_to_offer, runtime=runtime)
    with pytest.raises(ConnectionResetError) as raised:
        guard.call(Flaky(ConnectionResetError(104, "x")))
    assert not isinstance(raised.value.__context__, FallbackDeclined)
    with pytest.raises(ConnectionResetError) as raised:
        asyncio.run(guard.call_async(_failing_async))
    assert not isinstance(raised.value.__context__, FallbackDeclined)


def test_resilient_refuses_an_empty_service_name() -> None:
    with pytest.raises(ConfigError, match="service"):

        @resilient(service="")
        def job() -> None:
            return None


class _Lookup:
    """A callable object (no ``__qualname__`` of its own)."""

    def __call__(self, item: str) -> str:
        return item


def _reserve(shop: str, item: str) -> str:
    return f"{shop}:{item}"


def test_resilient_names_the_service_of_a_partial_or_a_callable_object(
    runtime: Runtime,
) -> None:
    # Both used to raise AttributeError ('functools.partial' object has no attribute
    # '__qualname__') when decorating.
    reserve = resilient(runtime=runtime)(functools.partial(_reserve, "north"))
    assert reserve("pen") == "north:pen"
    assert reserve.guard.service == f"{__name__}._reserve"  # type: ignore[attr-defined]
    lookup = resilient(runtime=runtime)(_Lookup())
    assert lookup("pen") == "pen"
    assert lookup.guard.service == f"{__name__}._Lookup"  # type: ignore[attr-defined]


class _AsyncFetch:
    """A callable object whose ``__call__`` is a coroutine function; fails once."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionResetError(104, "reset")
        return "ok"


async def test_resilient_guards_an_object_whose_call_is_async(runtime: Runtime) -> None:
    # It used to be wrapped as a plain function: the guard "succeeded" on building the
    # coroutine, and the awaited failure reached the caller unretried.
    fetch = _AsyncFetch()
    guarded = resilient(runtime=runtime, retry=2)(fetch)
    assert asyncio.iscoroutinefunction(guarded)
    assert await guarded() == "ok"
    assert fetch.calls == 2


def test_resilient_keeps_a_static_or_class_method(runtime: Runtime) -> None:
    # Above @staticmethod the guard (a plain function) bound the instance as ``self`` and an
    # async static method was wrapped as sync (unguarded); above @classmethod: ConfigError.
    class Client:
        @resilient(service="svc", runtime=runtime)  # type: ignore[arg-type]
        @staticmethod
        def double(x: int) -> int:
            return 2 * x

        @resilient(service="svc", runtime=runtime)  # type: ignore[arg-type]
        @staticmethod
        async def fetch() -> str:
            return "ok"

        @resilient(service="svc", runtime=runtime)  # type: ignore[arg-type]
        @classmethod
        def make(cls) -> type:
            return cls

    assert Client().double(2) == Client.double(2) == 4
    assert asyncio.iscoroutinefunction(Client().fetch)
    assert asyncio.run(Client.fetch()) == "ok"
    assert Client().make() is Client.make() is Client


class _Awaitable:
    """An awaitable that is neither a coroutine nor a future (aiohttp's request manager)."""

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        return "cached"


async def test_an_awaitable_a_fallback_returns_is_awaited(runtime: Runtime) -> None:
    # Only coroutines and futures used to be awaited: this one reached the caller as is.
    @resilient(runtime=runtime, retry=False, fallback=lambda error: _Awaitable())
    async def fetch() -> str:
        raise ConnectionRefusedError(111, "refused")

    assert await fetch() == "cached"


async def test_bind_guards_a_coroutine_function(runtime: Runtime) -> None:
    # bind() used to return a plain function: it "succeeded" on building the coroutine, and
    # the awaited failure reached the caller unretried.
    calls = 0

    async def fetch(item: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError(104, "reset")
        return item

    guarded = Guard("svc", retry=2, runtime=runtime).bind(fetch)
    assert asyncio.iscoroutinefunction(guarded)
    assert await guarded("pen") == "pen"
    assert calls == 2


def test_resilient_refuses_a_timeout_kwarg_the_function_does_not_take(runtime: Runtime) -> None:
    # It used to be accepted: with an attempt timeout every call then failed with
    # "f() got an unexpected keyword argument 'timeout'".
    with pytest.raises(ConfigError, match=r"timeout_kwarg.*no such parameter"):

        @resilient(runtime=runtime, timeout_kwarg="timeout", retry={"attempt_timeout": 2})
        def fetch(item: str) -> str:
            return item

    @resilient(runtime=runtime, timeout_kwarg="timeout", retry={"attempt_timeout": 2})
    def fetch_any(item: str, **options: Any) -> Any:
        return options["timeout"]

    assert fetch_any("pen") == 2
