"""Every entry point onto the attempt loop, each on its own: refusal while open, fallback on
refusal, and KeyboardInterrupt / cancellation (never retried, counted or swallowed).

Entry points: ``@resilient`` (sync and async), ``Guard.call`` / ``call_async`` / ``bind``,
``CircuitBreaker.call_sync`` / ``call``, and the recovery engine. The HTTP integrations have
theirs in tests/integrations/test_entry_points_http.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from otel_raptor import (
    CircuitBreakerConfig,
    CircuitOpenError,
    ErrorRecoveryEngine,
    Guard,
    RetryPolicy,
    resilient,
)
from otel_raptor.core.events import Event, RecoveryFinished
from otel_raptor.core.recovery import Outcome
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock

OPEN_FOR_AN_HOUR = CircuitBreakerConfig(
    failure_threshold=1, recovery_timeout=3600.0, recovery_jitter=0.0
)


class Counting:
    """A function that records each call and does what it is told."""

    def __init__(self, result: Any = "ok", error: BaseException | None = None) -> None:
        self.calls = 0
        self.result = result
        self.error = error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.result


class CountingAsync(Counting):
    async def __call__(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().__call__(*args, **kwargs)


SyncCall = Callable[[Callable[..., Any]], Any]


def entry_points(
    runtime: Runtime, fallback: Callable[[BaseException], Any] | None = None
) -> dict[str, Callable[[Counting], Any]]:
    """name -> run(fn) under that entry point, every one with its own open-for-an-hour breaker
    and up to 3 retries; async ones return the coroutine (see :func:`complete`)."""
    policy = RetryPolicy(max_retries=3, base_delay=0.0)

    def guard(name: str) -> Guard:
        return Guard(
            name, retry=policy, breaker=OPEN_FOR_AN_HOUR, fallback=fallback, runtime=runtime
        )

    def decorated_sync(fn: Counting) -> Any:
        @resilient(
            service="dec-sync",
            retry=policy,
            breaker=OPEN_FOR_AN_HOUR,
            fallback=fallback,
            runtime=runtime,
        )
        def wrapped() -> Any:
            return fn()

        return wrapped()

    def decorated_async(fn: Counting) -> Any:
        @resilient(
            service="dec-async",
            retry=policy,
            breaker=OPEN_FOR_AN_HOUR,
            fallback=fallback,
            runtime=runtime,
        )
        async def wrapped() -> Any:
            return await _maybe(fn())

        return wrapped()

    call_guard, async_guard, bound_guard = guard("call"), guard("call-async"), guard("bind")
    points: dict[str, Callable[[Counting], Any]] = {
        "resilient-sync": decorated_sync,
        "resilient-async": decorated_async,
        "Guard.call": call_guard.call,
        "Guard.call_async": lambda fn: async_guard.call_async(_as_async(fn)),
        "Guard.bind": lambda fn: bound_guard.bind(fn)(),
    }
    if fallback is None:
        sync_breaker = runtime.breakers.get("breaker-sync", OPEN_FOR_AN_HOUR)
        async_breaker = runtime.breakers.get("breaker-async", OPEN_FOR_AN_HOUR)
        points["CircuitBreaker.call_sync"] = sync_breaker.call_sync
        points["CircuitBreaker.call"] = async_breaker.call
    return points


def complete(value: Any) -> Any:
    """The result of an entry point: an async one's coroutine runs on a fresh loop."""
    if asyncio.iscoroutine(value):
        return asyncio.run(value)
    return value


async def _maybe(value: Any) -> Any:
    if isinstance(value, Awaitable):
        return await value
    return value


def _as_async(fn: Counting) -> Callable[[], Awaitable[Any]]:
    async def run() -> Any:
        return await _maybe(fn())

    return run


NAMES = list(entry_points(Runtime(clock=FakeClock())))
WITH_FALLBACK = list(entry_points(Runtime(clock=FakeClock()), fallback=lambda e: e))


def open_everything(runtime: Runtime) -> None:
    for _, breaker in runtime.breakers.items():
        breaker.force_open()


@pytest.mark.parametrize("name", NAMES)
def test_an_open_breaker_refuses_without_calling(name: str) -> None:
    runtime = Runtime(clock=FakeClock())
    run = entry_points(runtime)[name]
    complete(run(Counting()))  # creates the breaker (closed: the call runs)
    open_everything(runtime)
    fn = Counting()
    with pytest.raises(CircuitOpenError):
        complete(run(fn))
    assert fn.calls == 0


@pytest.mark.parametrize("name", WITH_FALLBACK)
def test_a_refusal_goes_to_the_fallback(name: str) -> None:
    runtime = Runtime(clock=FakeClock())
    events: list[Event] = []
    runtime.bus.subscribe(events.append)
    run = entry_points(runtime, fallback=lambda error: ("fallback", type(error).__name__))[name]
    complete(run(Counting()))
    open_everything(runtime)
    fn = Counting()
    assert complete(run(fn)) == ("fallback", "CircuitOpenError")
    assert fn.calls == 0
    finished = [e for e in events if isinstance(e, RecoveryFinished)]
    assert [f.outcome for f in finished] == [Outcome.FALLBACK]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "interrupt", [KeyboardInterrupt(), SystemExit(3)], ids=["KeyboardInterrupt", "SystemExit"]
)
def test_an_interrupt_is_never_retried_counted_or_swallowed(
    name: str, interrupt: BaseException
) -> None:
    runtime = Runtime(clock=FakeClock())
    events: list[Event] = []
    runtime.bus.subscribe(events.append)
    run = entry_points(runtime)[name]
    fn = Counting(error=interrupt)
    with pytest.raises(type(interrupt)) as raised:
        complete(run(fn))
    assert raised.value is interrupt
    assert fn.calls == 1
    assert events == []  # nothing classified, nothing finished
    for _, breaker in runtime.breakers.items():
        assert breaker.snapshot().window_failures == 0


ASYNC_NAMES = ["resilient-async", "Guard.call_async", "CircuitBreaker.call"]


@pytest.mark.parametrize("name", ASYNC_NAMES)
def test_cancellation_from_outside_propagates_at_once(name: str) -> None:
    runtime = Runtime()
    events: list[Event] = []
    runtime.bus.subscribe(events.append)
    run = entry_points(runtime)[name]
    calls = 0

    class Sleeper(Counting):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.ensure_future(run(Sleeper()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert calls == 1
    assert events == []


# --- the recovery engine ----------------------------------------------------------------------


def test_the_engine_never_recovers_from_an_interrupt() -> None:
    engine = ErrorRecoveryEngine(runtime=Runtime(clock=FakeClock()))
    with pytest.raises(KeyboardInterrupt):
        engine.handle_error_sync(KeyboardInterrupt(), {"retry_func": Counting()})
    retry = Counting(error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        engine.handle_error_sync(ConnectionResetError(104, "reset"), {"retry_func": retry})
    assert retry.calls == 1


def test_the_engine_never_recovers_from_cancellation() -> None:
    engine = ErrorRecoveryEngine(runtime=Runtime(clock=FakeClock()))

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await engine.handle_error(asyncio.CancelledError(), {"retry_func": Counting()})
        retry = CountingAsync(error=asyncio.CancelledError())
        with pytest.raises(asyncio.CancelledError):
            await engine.handle_error(ConnectionResetError(104, "reset"), {"retry_func": retry})
        assert retry.calls == 1

    asyncio.run(main())


def test_the_engine_falls_back_when_retries_are_not_possible() -> None:
    engine = ErrorRecoveryEngine(runtime=Runtime(clock=FakeClock()))
    result = engine.handle_error_sync(
        ValueError("bad input"), {"fallback_func": lambda: "cached page"}
    )
    assert (result.success, result.value, result.strategy.value) == (
        True,
        "cached page",
        "failover",
    )


@pytest.mark.parametrize("name", NAMES)
def test_a_bug_in_success_bookkeeping_never_loses_the_result(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from otel_raptor.runtime import safety
    from otel_raptor.runtime.breaker import CircuitBreaker

    safety._reset_for_tests()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("our bug while recording a success")

    monkeypatch.setattr(CircuitBreaker, "record_success_since", broken)
    monkeypatch.setattr(CircuitBreaker, "record_success", broken)
    runtime = Runtime(clock=FakeClock())
    run = entry_points(runtime)[name]
    result = object()
    assert complete(run(Counting(result=result))) is result
    # And after a failure, the recovering path's bookkeeping is just as safe.
    failures = [ConnectionResetError(104, "reset")]

    def once_then_ok() -> Any:
        if failures:
            raise failures.pop()
        return result

    guard = Guard("recovering", retry=RetryPolicy(max_retries=2, base_delay=0.0), runtime=runtime)
    assert guard.call(once_then_ok) is result
