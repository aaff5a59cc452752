"""A call interrupted while it waits to retry (an ``asyncio`` cancellation, a
``KeyboardInterrupt``) releases what its failed attempt left: the failing result the next
attempt would have released (an HTTP response holding a pooled connection)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from otel_raptor.core.attempts import LoopSpec
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.downstream import Route
from otel_raptor.runtime.drive import CallHooks, CallPlan, run_async, run_sync
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock


class Failing(ConnectionError):
    def __init__(self, result: Any) -> None:
        super().__init__("failing result")
        self.result = result


class Released(CallHooks):
    """Results named ``"bad"`` fail; discarding a failure records its result."""

    def __init__(self) -> None:
        self.released: list[Any] = []

    @staticmethod
    def failure_of(result: Any) -> Exception | None:  # type: ignore[override]
        return Failing(result) if result == "bad" else None

    def give_up(self, failure: BaseException) -> Any:
        if isinstance(failure, Failing):
            return failure.result
        raise failure

    def discard(self, failure: BaseException) -> None:
        if isinstance(failure, Failing):
            self.released.append(failure.result)


class InterruptedClock(FakeClock):
    def sleep(self, seconds: float) -> None:
        raise KeyboardInterrupt

    async def sleep_async(self, seconds: float) -> None:
        await asyncio.sleep(60)


def plan(hooks: CallHooks) -> CallPlan:
    clock = InterruptedClock()
    runtime = Runtime(clock=clock)
    route = Route(runtime.downstream("svc"), runtime.breakers.get("svc"), runtime, classify)
    spec = LoopSpec.of(RetryPolicy(max_retries=3, base_delay=1.0), replay_safe=True)
    return CallPlan(route, spec, runtime=runtime, clock=clock, hooks=hooks)


def test_an_interrupted_backoff_releases_the_failing_result() -> None:
    hooks = Released()
    with pytest.raises(KeyboardInterrupt):
        run_sync(plan(hooks), lambda: "bad", (), {})
    assert hooks.released == ["bad"]


async def test_a_cancelled_backoff_releases_the_failing_result() -> None:
    hooks = Released()

    async def attempt() -> str:
        return "bad"

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_async(plan(hooks), attempt, (), {}), 0.05)
    assert hooks.released == ["bad"]


def test_a_failing_result_handed_back_is_not_released() -> None:
    hooks = Released()
    no_retries = plan(hooks)
    no_retries.spec = LoopSpec.of(RetryPolicy(max_retries=0), replay_safe=True)
    assert run_sync(no_retries, lambda: "bad", (), {}) == "bad"
    assert hooks.released == []


class SlowRelease(Released):
    """Releasing a failing result takes a while (an async response's close waiting on its
    connection pool)."""

    def discard(self, failure: BaseException) -> Any:
        super().discard(failure)
        return asyncio.sleep(60)


async def test_a_call_cancelled_while_releasing_gives_back_its_probe_slot() -> None:
    # The retry was admitted as the half-open breaker's probe, then cancelled while the
    # last failing result was being released, before its attempt began: the probe slot must
    # be given back, or the breaker refuses every call for ever.
    clock = FakeClock()
    runtime = Runtime(clock=clock)
    breaker = runtime.breakers.get(
        "svc", CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.0, recovery_jitter=0.0)
    )
    route = Route(runtime.downstream("svc"), breaker, runtime, classify)
    spec = LoopSpec.of(RetryPolicy(max_retries=3, base_delay=1.0), replay_safe=True)
    hooks = SlowRelease()
    call_plan = CallPlan(route, spec, runtime=runtime, clock=clock, hooks=hooks)

    async def attempt() -> str:
        return "bad"

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_async(call_plan, attempt, (), {}), 0.05)
    assert hooks.released == ["bad"]
    assert breaker._core.probes_in_flight == 0

    async def good() -> str:
        return "good"

    assert await run_async(call_plan, good, (), {}) == "good"  # the next call may probe
