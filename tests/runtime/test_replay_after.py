"""The per-failure replay verdict (``CallHooks.replay_after``): it narrows the plan's replay
safety for one failure, never widens it, sees the call's arguments, and a bug in it ends the
call as it would have ended without us."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from otel_raptor.core.attempts import LoopSpec
from otel_raptor.core.classification import Classification
from otel_raptor.core.events import RecoveryFinished
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.downstream import Route
from otel_raptor.runtime.drive import CallHooks, CallPlan, run_async, run_sync
from otel_raptor.runtime.safety import _reset_for_tests
from otel_raptor.runtime.state import Runtime


class Judge(CallHooks):
    def __init__(self, verdicts: list[bool] | None = None, *, broken: bool = False) -> None:
        self.verdicts = verdicts or []
        self.broken = broken
        self.seen: list[tuple[type, tuple[Any, ...]]] = []

    def replay_after(
        self, failure: BaseException, classification: Classification, args: tuple[Any, ...]
    ) -> bool:
        self.seen.append((type(failure), args))
        if self.broken:
            raise RuntimeError("a bug in the judge")
        return self.verdicts.pop(0)


def plan(hooks: CallHooks, *, replay_safe: bool = True) -> tuple[CallPlan, list[Any]]:
    runtime = Runtime()
    events: list[Any] = []
    runtime.bus.subscribe(events.append)
    route = Route(runtime.downstream("svc"), runtime.breakers.get("svc"), runtime, classify)
    spec = LoopSpec.of(RetryPolicy(max_retries=3, base_delay=0.0), replay_safe=replay_safe)
    return CallPlan(route, spec, runtime=runtime, clock=runtime.clock, hooks=hooks), events


def flaky(failures: int) -> Any:
    calls: list[int] = []

    def fn(*args: Any) -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionResetError("reset")
        return "ok"

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_a_false_verdict_stops_the_retries() -> None:
    judge = Judge([True, False])
    call_plan, events = plan(judge)
    fn = flaky(5)
    with pytest.raises(ConnectionResetError):
        run_sync(call_plan, fn, ("SELECT 1", 7), {})
    assert len(fn.calls) == 2
    assert judge.seen == [(ConnectionResetError, ("SELECT 1", 7))] * 2
    [finished] = [e for e in events if isinstance(e, RecoveryFinished)]
    assert finished.give_up_reason == "not_replay_safe"


def test_a_true_verdict_cannot_make_an_unsafe_plan_safe() -> None:
    judge = Judge([True, True])
    call_plan, _ = plan(judge, replay_safe=False)
    fn = flaky(1)
    with pytest.raises(ConnectionResetError):
        run_sync(call_plan, fn, (), {})
    assert len(fn.calls) == 1
    assert judge.seen == []  # not even asked


async def test_async_retries_while_the_verdict_allows() -> None:
    judge = Judge([True, True])
    call_plan, _ = plan(judge)
    fn = flaky(2)

    async def attempt(*args: Any) -> str:
        return str(fn(*args))

    assert await run_async(call_plan, attempt, ("x",), {}) == "ok"
    assert len(fn.calls) == 3


def test_a_broken_judge_is_reported_and_the_error_is_the_applications(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _reset_for_tests()
    call_plan, _ = plan(Judge(broken=True))
    fn = flaky(5)
    with (
        caplog.at_level(logging.WARNING, logger="otel_raptor"),
        pytest.raises(ConnectionResetError),
    ):
        run_sync(call_plan, fn, (), {})
    assert len(fn.calls) == 1
    assert "drive.failed" in caplog.text
