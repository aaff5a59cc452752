"""``instrument()`` → ``uninstrument()`` → ``instrument()``: what the instrumentor made goes, what
the app made stays, and bad keywords raise before anything changes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from otel_raptor import (
    CircuitBreakerConfig,
    ConfigError,
    ErrorCategory,
    Guard,
    RaptorInstrumentor,
    SimpleMemoryController,
)
from otel_raptor import environment_variables as ev
from otel_raptor import instrumentor as instrumentor_module
from otel_raptor.errors import CircuitOpenError
from otel_raptor.runtime import memory as memory_module
from otel_raptor.runtime.breaker import OTHER_BREAKER, BreakerRegistry, CircuitBreaker
from otel_raptor.runtime.health import HealthChecker
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock
from tests.support.faulty_http import FaultyHTTPServer, ok, status
from tests.support.runtime import process_runtime

#: Neither the memory controller nor the monitor: threads these tests do not look at.
QUIET: dict[str, Any] = {"memory": False, "monitor": False}


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    with process_runtime() as fresh:
        yield fresh


@pytest.fixture
def instrumentor(monkeypatch: pytest.MonkeyPatch, runtime: Runtime) -> Iterator[RaptorInstrumentor]:
    for name in list(os.environ):
        if name.startswith("OTEL_PYTHON_RAPTOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(instrumentor_module, "_reported", set())
    subject = RaptorInstrumentor()
    yield subject
    if subject.is_instrumented_by_opentelemetry:
        subject.uninstrument()


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


def names(runtime: Runtime) -> set[str]:
    return {name for name, _ in runtime.breakers.items()}


# --- breakers -----------------------------------------------------------------------------------


def test_uninstrument_forgets_the_integrations_breakers_so_new_settings_apply(
    instrumentor: RaptorInstrumentor, runtime: Runtime, server: FaultyHTTPServer
) -> None:
    made_before = Guard("made-before")  # the app's guards: their breakers are the app's
    instrumentor.instrument(
        integrations=["requests"],
        retry={"max_retries": 0},
        breaker={"failure_threshold": 1, "recovery_timeout": 3600.0},
        **QUIET,
    )
    made_during = Guard("made-during")
    server.default = status(503)
    assert requests.get(server.url(), timeout=5).status_code == 503
    with pytest.raises(CircuitOpenError):  # open for an hour
        requests.get(server.url(), timeout=5)
    [origin] = names(runtime) - {"made-before", "made-during"}
    instrumentor.uninstrument()
    assert names(runtime) == {"made-before", "made-during"}
    assert runtime.breakers.get("made-before") is made_before.breaker
    assert runtime.breakers.get("made-during") is made_during.breaker
    server.default = ok()
    instrumentor.instrument(integrations=["requests"], **QUIET)  # the defaults
    assert requests.get(server.url(), timeout=5).status_code == 200
    fresh = dict(runtime.breakers.items())[origin]
    assert fresh.config.recovery_timeout == CircuitBreakerConfig().recovery_timeout
    assert fresh.config.failure_threshold == CircuitBreakerConfig().failure_threshold


def test_forget_lets_the_next_get_create_the_breaker_with_its_config(clock: FakeClock) -> None:
    registry = BreakerRegistry(max_breakers=2, clock=clock)
    old = registry.get("a", CircuitBreakerConfig(recovery_timeout=3600.0))
    assert not registry.forget(CircuitBreaker("a", clock=clock))  # not the registry's "a"
    assert registry.forget(old)
    assert not registry.forget(old)
    new = registry.get("a", CircuitBreakerConfig(recovery_timeout=5.0))
    assert new is not old
    assert new.config.recovery_timeout == 5.0
    # A full registry folds new names into "other"; forgetting one makes room again.
    b = registry.get("b")
    assert registry.get("c").name == OTHER_BREAKER
    assert registry.forget(b)
    assert registry.get("c").name == "c"


def test_forget_never_drops_the_shared_other_breaker(clock: FakeClock) -> None:
    # Those who hold "other" keep sharing it (and seeing it in the gauges) after room is made.
    registry = BreakerRegistry(max_breakers=2, clock=clock)
    a = registry.get("a")
    registry.get("b")
    other = registry.get("c")
    assert other.name == OTHER_BREAKER
    other.force_open()
    assert not registry.forget(other)
    assert registry.forget(a)
    assert registry.get("d").name == "d"  # room again: a new name gets its own
    assert registry.get(OTHER_BREAKER) is other  # a name folded by the runtime: the same one
    assert (OTHER_BREAKER, other) in registry.items()


# --- health checks ------------------------------------------------------------------------------


def test_uninstrument_unregisters_the_integrations_health_checks_and_stops_their_thread(
    instrumentor: RaptorInstrumentor, runtime: Runtime, server: FaultyHTTPServer
) -> None:
    instrumentor.instrument(
        integrations=["requests"],
        retry={"max_retries": 0},
        breaker={"failure_threshold": 1, "health_check_interval": 0.2},
        health_check_path="/health",
        **QUIET,
    )
    server.default = status(503)
    assert requests.get(server.url(), timeout=5).status_code == 503  # opens the breaker
    assert len(runtime.health) == 1
    thread = runtime.health._thread
    assert thread is not None
    assert thread.is_alive()
    instrumentor.uninstrument()
    assert len(runtime.health) == 0
    assert not runtime.health.running
    thread.join(timeout=2.0)  # ends at its next wake (every 0.5 s)
    assert not thread.is_alive()
    probes = server.count("GET", "/health")
    assert runtime.health.run_due() == 0  # nothing left that could probe the origin
    assert server.count("GET", "/health") == probes


def test_uninstrument_keeps_the_health_checks_of_the_apps_guards(
    instrumentor: RaptorInstrumentor, runtime: Runtime, server: FaultyHTTPServer
) -> None:
    instrumentor.instrument(integrations=["requests"], health_check_path="/health", **QUIET)
    requests.get(server.url(), timeout=5)  # the origin's breaker, with its check

    def ping() -> bool:
        return True

    guard = Guard("inventory", health_check=ping)
    assert len(runtime.health) == 2
    instrumentor.uninstrument()
    assert runtime.health.items() == [(guard.breaker, ping)]
    assert runtime.health.running


def test_uninstrument_keeps_an_app_guards_check_under_an_integrations_name(
    instrumentor: RaptorInstrumentor, runtime: Runtime, server: FaultyHTTPServer
) -> None:
    # With breaker_key="host" an origin's breaker is named after the host, as the app's own
    # guard for that host may be: its check is the app's, whatever the name.
    instrumentor.instrument(integrations=["requests"], breaker_key="host", **QUIET)
    assert requests.get(server.url(), timeout=5).status_code == 200

    def ping() -> bool:
        return True

    guard = Guard(server.host, health_check=ping)
    assert guard.breaker is dict(runtime.breakers.items())[server.host]
    instrumentor.uninstrument()
    assert [(breaker.name, check) for breaker, check in runtime.health.items()] == [
        (server.host, ping)
    ]


def test_unregister_takes_only_that_check_and_the_last_one_stops_the_thread(
    clock: FakeClock,
) -> None:
    checker = HealthChecker(clock=clock)
    target = CircuitBreaker("svc", clock=clock)

    def check() -> bool:
        return True

    assert checker.register(target, check)
    try:
        assert not checker.unregister(CircuitBreaker("svc", clock=clock))  # same name only
        assert not checker.unregister(target, lambda: True)  # another check
        assert checker.running
        assert checker.unregister(target, check)
        assert len(checker) == 0
        assert not checker.running
        assert checker.register(target, check)  # and it starts again
        assert checker.running
    finally:
        checker.stop()


def test_a_check_unregistered_during_a_round_is_not_run(clock: FakeClock) -> None:
    checker = HealthChecker(clock=clock)
    config = CircuitBreakerConfig(failure_threshold=1)
    first, second = (CircuitBreaker(name, config, clock=clock) for name in ("a", "b"))
    ran: list[str] = []

    def check_first() -> bool:
        ran.append("a")
        checker.unregister(second)  # uninstrument() in another thread, say
        return False

    def check_second() -> bool:
        ran.append("b")
        return False

    for target, check in ((first, check_first), (second, check_second)):
        target.record_failure(target.acquire(), 0.1, ErrorCategory.TIMEOUT)
        checker.register(target, check)
    checker.stop()  # driven by hand
    assert checker.run_due() == 1
    assert ran == ["a"]


# --- bad keywords -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("config_file", 123, "a path"),
        ("config_file", b"/etc/raptor.toml", "a path"),
        ("config_file", "/nonexistent/raptor.toml", "the path of an existing TOML file"),
        ("config_file", Path(__file__).parent, "the path of an existing TOML file"),
        ("tracer_provider", "tp", "get_tracer()"),
        ("meter_provider", 42, "get_meter()"),
        ("logger_provider", object(), "get_logger()"),
    ],
)
def test_a_bad_file_or_provider_keyword_raises_and_changes_nothing(
    instrumentor: RaptorInstrumentor, runtime: Runtime, key: str, value: object, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        instrumentor.instrument(**{key: value}, integrations=[], **QUIET)
    assert (caught.value.key, caught.value.value) == (key, value)
    assert allowed in caught.value.allowed
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert not runtime.bus.has_subscribers


def test_a_missing_file_in_the_environment_is_reported_and_the_rest_loads(
    instrumentor: RaptorInstrumentor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv(ev.OTEL_PYTHON_RAPTOR_CONFIG, str(tmp_path / "missing.toml"))
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument(integrations=[], max_services=7, **QUIET)
    assert instrumentor.config is not None
    assert instrumentor.config.max_services == 7
    [warning] = [r.getMessage() for r in caplog.records if "configuration" in r.getMessage()]
    assert f"invalid {ev.OTEL_PYTHON_RAPTOR_CONFIG}=" in warning


def test_the_file_given_in_code_is_read_and_its_problems_are_named_after_the_keyword(
    instrumentor: RaptorInstrumentor, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    path = tmp_path / "raptor.toml"
    path.write_text("max_services = 9\n", encoding="utf-8")
    instrumentor.instrument(config_file=path, integrations=[], **QUIET)
    assert instrumentor.config is not None
    assert instrumentor.config.max_services == 9
    instrumentor.uninstrument()
    path.write_text("[retry\n", encoding="utf-8")  # not TOML: the file as a whole
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        instrumentor.instrument(config_file=str(path), integrations=[], **QUIET)
    [warning] = [r.getMessage() for r in caplog.records if "configuration" in r.getMessage()]
    assert warning.startswith(f"otel_raptor configuration: invalid config_file='{path}'")
    assert warning.endswith("(the environment and the defaults apply)")
    assert ev.OTEL_PYTHON_RAPTOR_CONFIG not in warning  # that variable is not set


# --- the memory controller ----------------------------------------------------------------------


@pytest.mark.parametrize("given", ["as memory=", "as the process-wide controller"])
def test_uninstrument_leaves_a_memory_controller_the_app_started_running(
    instrumentor: RaptorInstrumentor, given: str
) -> None:
    controller = SimpleMemoryController(check_interval=60)
    controller.start()
    memory_module.set_memory_controller(controller)
    try:
        spec: object = controller if given == "as memory=" else True
        instrumentor.instrument(memory=spec, integrations=[], monitor=False)
        assert instrumentor.memory_controller is controller
        instrumentor.uninstrument()
        assert controller.running
    finally:
        controller.stop()
        memory_module.set_memory_controller(None)
