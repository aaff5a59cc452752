"""Failures that are no verdict (``CallHooks.unjudged``): a client connection pool refusing to
hand out a connection says nothing about the downstream, so the call ends at once, as a
cancelled one does: the error is raised unchanged, nothing is counted, retried or published,
and a probe's slot is given back."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from otel_raptor.core.attempts import LoopSpec
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.classification import Classification
from otel_raptor.core.events import RecoveryFinished
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.downstream import Route
from otel_raptor.runtime.drive import CallHooks, CallPlan, run_async, run_sync
from otel_raptor.runtime.safety import _reset_for_tests
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock


class PoolExhausted(ConnectionError):
    """What a client pool raises when it has no connection to hand out."""


class Hooks(CallHooks):
    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken
        self.asked: list[tuple[type, tuple[Any, ...]]] = []
        self.judged: list[bool] = []

    def unjudged(self, failure: Exception, args: tuple[Any, ...]) -> bool:
        self.asked.append((type(failure), args))
        if self.broken:
            raise RuntimeError("a bug in the hook")
        failure.marked = True  # type: ignore[attr-defined]
        return isinstance(failure, PoolExhausted)

    def replay_after(
        self, failure: BaseException, classification: Classification, args: tuple[Any, ...]
    ) -> bool:
        self.judged.append(getattr(failure, "marked", False))
        return True


def plan(hooks: CallHooks, clock: FakeClock | None = None) -> tuple[CallPlan, Runtime, list[Any]]:
    clock = clock or FakeClock()
    runtime = Runtime(clock=clock)
    events: list[Any] = []
    runtime.bus.subscribe(events.append)
    config = CircuitBreakerConfig(failure_threshold=2, recovery_timeout=10, recovery_jitter=0)
    route = Route(runtime.downstream("svc"), runtime.breakers.get("svc", config), runtime, classify)
    spec = LoopSpec.of(RetryPolicy(max_retries=3, base_delay=0.01), replay_safe=True)
    call_plan = CallPlan(route, spec, runtime=runtime, clock=clock, hooks=hooks)
    return call_plan, runtime, events


def failing(*errors: BaseException) -> Any:
    queue = list(errors)
    calls: list[tuple[Any, ...]] = []

    def fn(*args: Any) -> str:
        calls.append(args)
        if queue:
            raise queue.pop(0)
        return "ok"

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def recoveries(events: list[Any]) -> list[RecoveryFinished]:
    return [e for e in events if isinstance(e, RecoveryFinished)]


def test_a_first_attempt_refused_by_the_pool_ends_the_call_unchanged_and_uncounted() -> None:
    hooks = Hooks()
    call_plan, runtime, events = plan(hooks)
    refusals = [PoolExhausted("pool exhausted") for _ in range(5)]
    fn = failing(*refusals)
    for refusal in refusals:
        with pytest.raises(PoolExhausted) as raised:
            run_sync(call_plan, fn, ("GET", "k"), {})
        assert raised.value is refusal
        assert raised.value.__context__ is None
    assert len(fn.calls) == 5  # never retried
    assert hooks.asked == [(PoolExhausted, ("GET", "k"))] * 5
    assert hooks.judged == []
    assert runtime.breakers.get("svc").state is CircuitState.CLOSED  # threshold 2, five refusals
    assert recoveries(events) == []
    assert run_sync(call_plan, fn, (), {}) == "ok"


def test_a_refusal_on_a_retry_ends_the_call_with_it_unpublished() -> None:
    hooks = Hooks()
    call_plan, _, events = plan(hooks)
    lost, refused = ConnectionResetError("reset"), PoolExhausted("pool exhausted")
    fn = failing(lost, refused)
    with pytest.raises(PoolExhausted) as raised:
        run_sync(call_plan, fn, (), {})
    assert raised.value is refused
    assert len(fn.calls) == 2
    assert hooks.judged == [True]  # the hook ran before the replay judgement, and marked it
    assert recoveries(events) == []


def test_a_probe_refused_by_the_pool_gives_its_slot_back() -> None:
    clock = FakeClock()
    call_plan, runtime, _ = plan(Hooks(), clock)
    breaker = runtime.breakers.get("svc")
    no_retries = CallPlan(
        call_plan.route,
        LoopSpec.of(RetryPolicy(max_retries=0), replay_safe=True),
        runtime=runtime,
        clock=clock,
        hooks=call_plan.hooks,
    )
    for _ in range(2):
        with pytest.raises(ConnectionResetError):
            run_sync(no_retries, failing(ConnectionResetError("reset")), (), {})
    assert breaker.state is CircuitState.OPEN
    clock.advance(11)
    with pytest.raises(PoolExhausted):
        run_sync(no_retries, failing(PoolExhausted("pool exhausted")), (), {})
    assert breaker.state is CircuitState.HALF_OPEN
    assert run_sync(no_retries, failing(), (), {}) == "ok"  # the slot was given back


async def test_async_calls_end_the_same_way() -> None:
    hooks = Hooks()
    call_plan, runtime, events = plan(hooks)
    refused = PoolExhausted("pool exhausted")
    fn = failing(ConnectionResetError("reset"), refused)

    async def attempt(*args: Any) -> str:
        return str(fn(*args))

    with pytest.raises(PoolExhausted) as raised:
        await run_async(call_plan, attempt, ("x",), {})
    assert raised.value is refused
    assert len(fn.calls) == 2
    assert recoveries(events) == []
    assert runtime.breakers.get("svc").state is CircuitState.CLOSED


def test_a_broken_hook_is_reported_and_the_failure_judged_as_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _reset_for_tests()
    call_plan, _, events = plan(Hooks(broken=True))
    fn = failing(PoolExhausted("pool exhausted"))
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        assert run_sync(call_plan, fn, (), {}) == "ok"  # judged: retried like any failure
    assert len(fn.calls) == 2
    assert "drive.unjudged" in caplog.text
    assert [e.outcome.value for e in recoveries(events)] == ["recovered"]
