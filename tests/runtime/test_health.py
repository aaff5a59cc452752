"""Active health checks close an open breaker without waiting for user traffic."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator

import pytest
import requests

from otel_raptor import CircuitBreakerConfig, Guard, RaptorInstrumentor, RetryPolicy
from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.states import CircuitState, TransitionReason
from otel_raptor.errors import ConfigError
from otel_raptor.integrations._http import http_health_check
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.health import HealthChecker
from otel_raptor.runtime.state import Runtime, get_runtime
from tests.support.clock import FakeClock
from tests.support.faulty_http import FaultyHTTPServer, close, ok, status

OPEN, CLOSED = CircuitState.OPEN, CircuitState.CLOSED


def breaker(clock: FakeClock, **options: object) -> CircuitBreaker:
    config = CircuitBreakerConfig(
        failure_threshold=1,
        recovery_timeout=600.0,
        recovery_jitter=0.0,
        success_threshold=2,
        health_check_interval=10.0,
        **options,  # type: ignore[arg-type]
    )
    return CircuitBreaker("svc", config, clock=clock)


def trip(target: CircuitBreaker) -> None:
    target.record_failure(target.acquire(), 0.1, __import__("otel_raptor").ErrorCategory.TIMEOUT)
    assert target.state is OPEN


class Scripted:
    def __init__(self, *answers: bool | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_passing_checks_close_an_open_breaker_long_before_its_timeout(clock: FakeClock) -> None:
    target = breaker(clock)
    checker = HealthChecker(clock=clock)
    check = Scripted(False, RuntimeError("refused"), True, True)
    assert checker.register(target, check)
    checker.stop()  # driven by hand below
    assert checker.run_due() == 0  # closed: never checked
    assert check.calls == 0
    trip(target)
    assert checker.run_due() == 1  # fails
    assert checker.run_due() == 0  # not due again before the interval
    clock.advance(10.0)
    assert checker.run_due() == 1  # raises: unhealthy
    clock.advance(10.0)
    checker.run_due()  # passes once: still open (success_threshold is 2)
    assert target.state is OPEN
    clock.advance(10.0)
    checker.run_due()
    assert target.state is CLOSED  # 30 s into a 600 s open duration
    assert check.calls == 4


def test_a_failing_check_starts_the_count_again(clock: FakeClock) -> None:
    target = breaker(clock)
    checker = HealthChecker(clock=clock)
    checker.register(target, Scripted(True, False, True, True))
    checker.stop()
    trip(target)
    for _ in range(3):
        checker.run_due()
        clock.advance(10.0)
    assert target.state is OPEN  # pass, fail, pass: never two in a row
    checker.run_due()
    assert target.state is CLOSED


def test_a_breaker_held_open_by_hand_stays_open(clock: FakeClock) -> None:
    target = breaker(clock)
    checker = HealthChecker(clock=clock)
    checker.register(target, lambda: True)
    checker.stop()
    target.force_open()
    for _ in range(3):
        checker.run_due()
        clock.advance(10.0)
    assert target.state is OPEN


def test_a_breaker_held_open_by_hand_is_not_checked(clock: FakeClock) -> None:
    # Its check used to run every interval (requests to a downstream taken out of traffic,
    # for maintenance), only for the verdict to be ignored.
    target = breaker(clock)
    checker = HealthChecker(clock=clock)
    checks: list[float] = []
    checker.register(target, lambda: checks.append(clock.monotonic()) is None)
    checker.stop()
    target.force_open()
    for _ in range(3):
        assert checker.run_due() == 0
        clock.advance(10.0)
    assert checks == []
    target.force_close()
    trip(target)
    assert checker.run_due() == 1  # an automatically opened breaker is checked again


def test_the_checker_is_bounded(clock: FakeClock) -> None:
    checker = HealthChecker(clock=clock, max_checks=1)
    assert checker.register(CircuitBreaker("a", clock=clock), lambda: True)
    assert not checker.register(CircuitBreaker("b", clock=clock), lambda: True)
    assert checker.register(CircuitBreaker("a", clock=clock), lambda: False)  # replaces
    assert len(checker) == 1
    checker.stop()


def test_a_guard_registers_its_check(clock: FakeClock) -> None:
    runtime = Runtime(clock=clock)
    guard = Guard(
        "svc",
        retry=0,
        breaker=CircuitBreakerConfig(failure_threshold=1, success_threshold=1),
        runtime=runtime,
        health_check=lambda: True,
    )
    runtime.health.stop()
    assert guard.breaker is not None
    with pytest.raises(TimeoutError):
        guard.call(_timeout)
    assert guard.breaker.state is OPEN
    runtime.health.run_due()
    assert guard.breaker.state is CLOSED
    with pytest.raises(ConfigError, match="health_check"):
        Guard("svc", runtime=runtime, health_check="/health")  # type: ignore[arg-type]
    # Without a breaker the check would never run: it was accepted without a word.
    with pytest.raises(ConfigError, match="breaker=False"):
        Guard("other-svc", runtime=runtime, breaker=False, health_check=lambda: True)


async def _async_ping() -> bool:
    return False


def test_an_async_check_is_refused_not_taken_for_a_pass(clock: FakeClock) -> None:
    # Its coroutine is truthy: every check "passed", and closed the breaker of a downstream
    # that was still down.
    runtime = Runtime(clock=clock)
    with pytest.raises(ConfigError, match=r"health_check.*not async"):
        Guard("svc", runtime=runtime, health_check=_async_ping)
    assert len(runtime.health) == 0


def test_a_check_that_returns_an_awaitable_fails(clock: FakeClock) -> None:
    checker = HealthChecker(clock=clock)
    breaker = CircuitBreaker(
        "svc", CircuitBreakerConfig(failure_threshold=1, success_threshold=1), clock=clock
    )
    checker.register(breaker, _async_ping)  # type: ignore[arg-type]
    checker.stop()
    breaker.record_failure(breaker.acquire(), 0.1, ErrorCategory.CONNECTION)
    assert breaker.state is OPEN
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine is closed, never left unawaited
        assert checker.run_due() == 1
    assert breaker.state is OPEN


def _timeout() -> None:
    raise TimeoutError("slow")


# --- HTTP, for real ------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


def test_the_http_check_reads_the_status(server: FaultyHTTPServer) -> None:
    check = http_health_check(server.url("/health"), timeout=2.0)
    server.push(ok("up"), status(503), status(404), close())
    assert check() is True
    assert check() is False
    assert check() is False  # a 404 health path is not a healthy downstream
    assert check() is False  # no answer at all
    assert server.count("GET", "/health") == 4


def test_an_open_origin_is_closed_by_its_health_check_without_user_traffic(
    server: FaultyHTTPServer,
) -> None:
    instrumentor = RaptorInstrumentor()
    instrumentor.instrument(
        retry=RetryPolicy(max_retries=0),
        breaker=CircuitBreakerConfig(
            failure_threshold=2,
            recovery_timeout=3600.0,  # without the check, an hour of refusals
            success_threshold=2,
            health_check_interval=0.2,
        ),
        health_check_path="/health",
        memory=False,
    )
    try:
        server.default = status(503)
        for _ in range(2):
            requests.get(server.url("/work"), timeout=2)
        [(name, target)] = [
            (name, b)
            for name, b in get_runtime().breakers.items()
            if name.endswith(f":{server.url().rsplit(':', 1)[1].rstrip('/')}")
        ]
        assert target.state is OPEN, name
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(server.url("/work"), timeout=2)  # refused: the breaker is open
        server.default = ok("healthy again")
        deadline = time.monotonic() + 10.0
        while target.state is not CLOSED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.state is CLOSED
        assert server.count("GET", "/health") >= 2
        assert requests.get(server.url("/work"), timeout=2).status_code == 200
    finally:
        instrumentor.uninstrument()
        get_runtime().health.stop()


def test_the_transition_says_why(clock: FakeClock) -> None:
    runtime = Runtime(clock=clock)
    seen: list[object] = []
    runtime.bus.subscribe(seen.append)
    target = runtime.breakers.get(
        "svc", CircuitBreakerConfig(failure_threshold=1, success_threshold=1)
    )
    runtime.health.register(target, lambda: True)
    runtime.health.stop()
    trip(target)
    runtime.health.run_due()
    reasons = [getattr(e, "reason", None) for e in seen]
    assert TransitionReason.HEALTH_CHECK_PASSED in reasons


def test_a_health_check_the_full_checker_cannot_take_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = Runtime(clock=FakeClock(), max_services=1)
    Guard("first", runtime=runtime, health_check=lambda: True)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        Guard("second", runtime=runtime, health_check=lambda: True)
    assert "health check of 'second' is not registered" in caplog.text
