"""A bug in an integration's hooks on the fast path (judging a result, applying the first
attempt's timeout) never changes a successful call: the result comes back as the callee gave
it, the call is made with the caller's arguments, and the bug is reported."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from otel_raptor.core.attempts import LoopSpec
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.downstream import Route
from otel_raptor.runtime.drive import CallHooks, CallPlan, run_async, run_sync
from otel_raptor.runtime.safety import _reset_for_tests
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock


def _broken_failure_of(result: Any) -> Exception | None:
    raise RuntimeError("a bug in failure_of")


class BrokenHooks(CallHooks):
    """Hooks whose fast-path pieces fail."""

    failure_of = staticmethod(_broken_failure_of)
    applies_timeouts = True

    def attempt_kwargs(
        self, kwargs: dict[str, Any], timeout: float | None, attempt: int
    ) -> dict[str, Any]:
        raise RuntimeError("a bug in attempt_kwargs")


def _plan() -> CallPlan:
    clock = FakeClock()
    runtime = Runtime(clock=clock)
    route = Route(runtime.downstream("svc"), runtime.breakers.get("svc"), runtime, classify)
    spec = LoopSpec.of(RetryPolicy(max_retries=2, attempt_timeout=5.0), replay_safe=True)
    return CallPlan(route, spec, runtime=runtime, clock=clock, hooks=BrokenHooks())


@pytest.fixture(autouse=True)
def _fresh_reports() -> None:
    _reset_for_tests()


def test_a_sync_call_survives_broken_hooks(caplog: pytest.LogCaptureFixture) -> None:
    plan = _plan()
    assert plan.first_kwargs  # the timeout goes through the hooks
    seen: list[dict[str, Any]] = []

    def fn(**kwargs: Any) -> str:
        seen.append(kwargs)
        return "result"

    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        assert run_sync(plan, fn, (), {"mine": 1}) == "result"
    assert seen == [{"mine": 1}]
    assert "drive.attempt_kwargs" in caplog.text
    assert "drive.failure_of" in caplog.text


async def test_an_async_call_survives_broken_hooks(caplog: pytest.LogCaptureFixture) -> None:
    plan = _plan()
    seen: list[dict[str, Any]] = []

    async def fn(**kwargs: Any) -> str:
        seen.append(kwargs)
        return "result"

    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        assert await run_async(plan, fn, (), {"mine": 1}) == "result"
    assert seen == [{"mine": 1}]
    assert "drive.attempt_kwargs" in caplog.text
    assert "drive.failure_of" in caplog.text
