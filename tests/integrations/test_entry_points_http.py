"""The HTTP integrations as entry points onto the attempt loop, each on its own: requests,
httpx ``Client`` and httpx ``AsyncClient``. Refusal while open (the library's own error),
fallback on refusal, and KeyboardInterrupt / cancellation (never retried, counted or
swallowed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests

from otel_raptor import CircuitBreakerConfig, CircuitOpenError, RetryPolicy
from otel_raptor.config import DownstreamOverride, RaptorConfig
from otel_raptor.core.events import Event, RecoveryFinished
from otel_raptor.core.recovery import Outcome
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.integrations.requests import RequestsIntegration
from otel_raptor.runtime.state import Runtime
from tests.support.faulty_http import FaultyHTTPServer, hang

CLIENTS = ["requests", "httpx", "httpx-async"]


class Installed:
    def __init__(self, runtime: Runtime, events: list[Event]) -> None:
        self.runtime = runtime
        self.events = events

    def open_breakers(self) -> None:
        for _, breaker in self.runtime.breakers.items():
            breaker.force_open()


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


@pytest.fixture
def install() -> Iterator[Callable[..., Installed]]:
    hooks: list[Any] = []

    def run(fallback: Callable[[Any], Any] | None = None) -> Installed:
        runtime = Runtime()
        events: list[Event] = []
        runtime.bus.subscribe(events.append)
        overrides = (
            () if fallback is None else (DownstreamOverride(pattern="*", fallback=fallback),)
        )
        settings = IntegrationSettings(
            runtime=runtime,
            config=RaptorConfig(
                retry=RetryPolicy(max_retries=3, base_delay=0.0),
                breaker=CircuitBreakerConfig(failure_threshold=1, recovery_timeout=3600.0),
                downstreams=overrides,
            ),
        )
        for hook in (RequestsIntegration(), HttpxIntegration()):
            hook.install(settings)
            hooks.append(hook)
        return Installed(runtime, events)

    yield run
    for hook in hooks:
        hook.uninstall()


def get(client: str, url: str, **transport: Any) -> Any:
    """GET ``url`` with ``client``; ``transport`` (``handler=``) replaces the network."""
    handler = transport.get("handler")
    if client == "requests":
        session = requests.Session()
        if handler is not None:
            session.mount("http://", _Adapter(handler))
        return session.get(url, timeout=5)
    if client == "httpx":
        options = {"transport": httpx.MockTransport(handler)} if handler else {}
        with httpx.Client(timeout=5, **options) as sync_client:  # type: ignore[arg-type]
            return sync_client.get(url)

    async def send() -> Any:
        options = {"transport": httpx.MockTransport(handler)} if handler else {}
        async with httpx.AsyncClient(timeout=5, **options) as async_client:  # type: ignore[arg-type]
            return await async_client.get(url)

    return asyncio.run(send())


class _Adapter(requests.adapters.HTTPAdapter):
    def __init__(self, handler: Callable[[Any], Any]) -> None:
        super().__init__()
        self.handler = handler

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self.handler(request)


@pytest.mark.parametrize("client", CLIENTS)
def test_an_open_breaker_refuses_with_the_librarys_own_error(
    client: str, install: Callable[..., Installed], server: FaultyHTTPServer
) -> None:
    installed = install()
    assert get(client, server.url("/warm")).status_code == 200
    installed.open_breakers()
    library_error = requests.ConnectionError if client == "requests" else httpx.ConnectError
    with pytest.raises(library_error) as raised:
        get(client, server.url("/refused"))
    assert isinstance(raised.value, CircuitOpenError)
    assert server.count("GET", "/refused") == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_a_refusal_goes_to_the_fallback(
    client: str, install: Callable[..., Installed], server: FaultyHTTPServer
) -> None:
    installed = install(fallback=lambda error: ("fallback", isinstance(error, CircuitOpenError)))
    get(client, server.url("/warm"))
    installed.open_breakers()
    assert get(client, server.url("/refused")) == ("fallback", True)
    assert server.count("GET", "/refused") == 0
    outcomes = [e.outcome for e in installed.events if isinstance(e, RecoveryFinished)]
    assert outcomes == [Outcome.FALLBACK]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_keyboard_interrupt_is_never_retried_counted_or_swallowed(
    client: str, install: Callable[..., Installed]
) -> None:
    installed = install()
    calls = 0

    def interrupted(request: Any) -> Any:
        nonlocal calls
        calls += 1
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        get(client, "http://interrupt.test/", handler=interrupted)
    assert calls == 1
    assert installed.events == []


def test_cancelling_an_async_request_propagates_at_once(
    install: Callable[..., Installed], server: FaultyHTTPServer
) -> None:
    installed = install()
    server.push(hang(5.0))

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            task = asyncio.ensure_future(client.get(server.url("/slow")))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert server.count("GET", "/slow") == 1  # never retried
    assert installed.events == []
