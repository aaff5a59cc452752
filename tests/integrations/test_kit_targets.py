"""What every integration's targets share (``integrations._kit.Target``), through requests and
httpx against real loopback servers: the app's own errors never count against a downstream's
breaker, and downstreams past the runtime's cap never share a breaker or a cooldown."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests

from otel_raptor import CircuitOpenError
from otel_raptor.config import RaptorConfig
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.integrations.requests import RequestsIntegration
from otel_raptor.runtime.state import OTHER_SERVICE, Runtime
from tests.support.faulty_http import FaultyHTTPServer, closed_port, status


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    """requests and httpx installed on a runtime that tracks two downstreams at most."""
    settings = IntegrationSettings(
        runtime=Runtime(max_services=2),
        config=RaptorConfig(
            retry=RetryPolicy(max_retries=1, base_delay=0.0, max_delay=0.01),
            breaker=CircuitBreakerConfig(failure_threshold=3, recovery_timeout=60),
            request_timeout=2.0,
        ),
    )
    integrations = [RequestsIntegration(), HttpxIntegration()]
    for integration in integrations:
        integration.install(settings)
    yield settings.runtime
    for integration in integrations:
        integration.uninstall()


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


def test_the_apps_own_errors_never_open_a_healthy_origins_breaker(
    runtime: Runtime, server: FaultyHTTPServer
) -> None:
    unserialisable = {"at": datetime.datetime.now()}

    def failing_auth(request: Any) -> Any:
        raise RuntimeError("the app's token store is down")

    with requests.Session() as session, httpx.Client() as client:
        for _ in range(6):
            with pytest.raises(TypeError):
                session.post(server.url("/a"), json=unserialisable)
            with pytest.raises(TypeError):
                client.post(server.url("/a"), json=unserialisable)
            with pytest.raises(RuntimeError):
                session.get(server.url("/a"), auth=failing_auth)
        assert server.count("POST", "/a") == 0  # the server never saw one of them
        assert session.get(server.url("/b")).status_code == 200
        assert client.get(server.url("/b")).status_code == 200
    [(_, breaker)] = runtime.breakers.items()
    assert breaker.state is CircuitState.CLOSED


def test_downstreams_past_the_cap_never_share_a_breaker_or_a_cooldown(
    runtime: Runtime, server: FaultyHTTPServer
) -> None:
    with FaultyHTTPServer() as throttling, FaultyHTTPServer() as healthy:
        dead = f"http://127.0.0.1:{closed_port()}/x"
        with requests.Session() as session:
            assert session.get(server.url("/first")).status_code == 200  # tracked
            assert session.get(f"http://localhost:{server.port}/x").status_code == 200  # tracked
            for _ in range(8):  # past the cap: a dead host, failing again and again
                with pytest.raises(requests.ConnectionError) as raised:
                    session.get(dead)
                assert not isinstance(raised.value, CircuitOpenError)
            # Another host past the cap says "wait a minute" to everything.
            throttling.default = status(429, {"Retry-After": "60"})
            for _ in range(4):
                assert session.get(throttling.url("/t")).status_code == 429
            # A third, healthy one is neither refused nor made to wait.
            for _ in range(5):
                assert session.get(healthy.url("/h")).status_code == 200
        assert healthy.count("GET", "/h") == 5
    assert OTHER_SERVICE not in {name for name, _ in runtime.breakers.items()}
