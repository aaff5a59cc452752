"""The httpx integration, sync and async clients, against a real loopback server with faults.

Most tests run twice through :class:`Driver`: with ``httpx.Client`` and with
``httpx.AsyncClient`` (each async call in its own ``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_raptor import CircuitOpenError
from otel_raptor.config import DownstreamOverride, RaptorConfig
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.events import Event, RecoveryFinished
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations import httpx as integration
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import STALE_HEADER, THROTTLED_HEADER, OriginTable, StaleCache
from otel_raptor.integrations.httpx import HttpxIntegration, circuit_open_error_type
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.safety import _reset_for_tests
from otel_raptor.runtime.state import Runtime
from tests.support.clock import FakeClock
from tests.support.faulty_http import (
    FaultyHTTPServer,
    closed_port,
    hang,
    ok,
    reset,
    status,
)

ORIGINAL_SEND = httpx.Client.send
ORIGINAL_ASYNC_SEND = httpx.AsyncClient.send

Install = Callable[..., Runtime]


def make_settings(
    *,
    max_retries: int = 3,
    failure_threshold: int = 5,
    attempt_timeout: float | None = None,
    # Long enough that a breaker opened by a test is still open at its next call however loaded
    # the machine (0.3 s was not: a client built per call took longer, and a probe went through).
    recovery_timeout: float = 5.0,
    downstreams: tuple[DownstreamOverride, ...] = (),
    **config: Any,
) -> IntegrationSettings:
    return IntegrationSettings(
        runtime=Runtime(),
        config=RaptorConfig(
            retry=RetryPolicy(
                max_retries=max_retries,
                base_delay=0.01,
                max_delay=0.05,
                max_retry_after=5.0,  # backoff stays short; a Retry-After of 1 s is waited out
                attempt_timeout=attempt_timeout,
            ),
            breaker=CircuitBreakerConfig(
                failure_threshold=failure_threshold,
                recovery_timeout=recovery_timeout,
                recovery_jitter=0.0,
            ),
            downstreams=downstreams,
            **config,
        ),
    )


class Driver:
    """Sends requests through ``httpx.Client`` or ``httpx.AsyncClient``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.is_async = mode == "async"

    def request(
        self, method: str, url: str, *, client: dict[str, Any] | None = None, **kwargs: Any
    ) -> httpx.Response:
        options = client or {}
        if not self.is_async:
            with httpx.Client(**options) as sync_client:
                return sync_client.request(method, url, **kwargs)

        async def send() -> httpx.Response:
            async with httpx.AsyncClient(**options) as async_client:
                return await async_client.request(method, url, **kwargs)

        return asyncio.run(send())

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def chunks(self) -> Any:
        """A streamed request body of this driver's flavour."""

        def sync_chunks() -> Iterator[bytes]:
            yield b"a"
            yield b"b"

        async def async_chunks() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"

        return async_chunks() if self.is_async else sync_chunks()


@pytest.fixture(params=["sync", "sync-general", "async"])
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Driver:
    """``sync``: ``httpx.Client`` through the hook httpx's own ``send`` signature gets, whose
    fast lane takes replay-safe requests to origins without fallbacks; ``sync-general``: the
    same through the hook any other signature gets (every request through ``describe`` and
    the loop's entry), so both stay covered by every test."""
    if request.param == "sync-general":
        monkeypatch.setattr(integration, "_send_keywords", lambda original: None)
    return Driver(request.param)


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


@pytest.fixture
def install() -> Iterator[Install]:
    installed: list[HttpxIntegration] = []
    events: list[Event] = []

    def run(**options: Any) -> Runtime:
        settings = make_settings(**options)
        settings.runtime.bus.subscribe(events.append)
        hook = HttpxIntegration()
        hook.install(settings)
        installed.append(hook)
        run.events = events  # type: ignore[attr-defined]
        return settings.runtime

    run.installed = installed  # type: ignore[attr-defined]

    yield run
    for hook in installed:
        hook.uninstall()
    assert httpx.Client.send is ORIGINAL_SEND
    assert httpx.AsyncClient.send is ORIGINAL_ASYNC_SEND


def state_of(breaker: CircuitBreaker) -> CircuitState:
    return breaker.state  # a call, so that mypy does not narrow it between requests


def finished(events: list[Event]) -> list[RecoveryFinished]:
    return [e for e in events if isinstance(e, RecoveryFinished)]


# --- retries ------------------------------------------------------------------------------------


def test_transient_503s_are_retried_until_success(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install()
    server.push(status(503), status(503), ok("fine"))
    response = driver.get(server.url("/a"))
    assert response.status_code == 200
    assert response.text == "fine"
    assert server.count("GET", "/a") == 3


def test_a_connection_reset_is_retried(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install()
    server.push(reset(), ok("after reset"))
    assert driver.get(server.url("/r")).text == "after reset"
    assert server.count("GET", "/r") == 2


def test_a_post_without_idempotency_key_is_sent_exactly_once(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install()
    server.push(status(503))  # a retry would get the default 200
    assert driver.post(server.url("/pay"), json={"amount": 1}).status_code == 503
    assert server.count("POST", "/pay") == 1
    server.push(reset())
    with pytest.raises(httpx.TransportError):  # ReadError: the connection was reset
        driver.post(server.url("/pay2"), content=b"x")
    assert server.count("POST", "/pay2") == 1


def test_a_post_with_an_idempotency_key_is_retried(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install()
    server.push(status(503), ok("done"))
    response = driver.post(
        server.url("/pay"), json={"amount": 1}, headers={"Idempotency-Key": "k-1"}
    )
    assert response.text == "done"
    assert server.count("POST", "/pay") == 2
    assert [r.body for r in server.requests] == [b'{"amount":1}'] * 2


def test_retry_after_is_never_violated(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install()
    server.push(status(429, {"Retry-After": "1"}), ok("late"))
    assert driver.get(server.url("/limited")).text == "late"
    first, second = server.arrivals
    assert second - first >= 1.0


def test_streamed_bodies_are_never_retried(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install()
    server.push(status(503))
    assert driver.put(server.url("/gen"), content=driver.chunks()).status_code == 503
    assert server.count("PUT", "/gen") == 1


def test_the_last_failing_response_is_returned_as_a_response(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install(max_retries=2)
    server.push(status(503), status(500), status(503, body="third"), ok())
    response = driver.get(server.url("/down"))
    assert isinstance(response, httpx.Response)
    assert response.status_code == 503
    assert response.text == "third"
    assert server.count("GET", "/down") == 3
    with pytest.raises(httpx.HTTPStatusError):
        response.raise_for_status()


def test_a_refused_connection_surfaces_as_httpx_own_error(install: Install, driver: Driver) -> None:
    install(max_retries=1)
    with pytest.raises(httpx.ConnectError) as caught:
        driver.get(f"http://127.0.0.1:{closed_port()}/")
    assert not isinstance(caught.value, CircuitOpenError)


class RaisingTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Fails every request with a fresh ConnectError and remembers each one."""

    def __init__(self) -> None:
        self.raised: list[BaseException] = []

    def _fail(self, request: httpx.Request) -> httpx.Response:
        error = httpx.ConnectError(f"refused #{len(self.raised)}", request=request)
        self.raised.append(error)
        raise error

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._fail(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self._fail(request)


def test_the_last_exception_is_raised_as_itself(install: Install, driver: Driver) -> None:
    install(max_retries=2)
    transport = RaisingTransport()
    with pytest.raises(httpx.ConnectError) as caught:
        driver.get("http://downstream.test/x", client={"transport": transport})
    assert len(transport.raised) == 3
    assert caught.value is transport.raised[-1]


# --- streaming ----------------------------------------------------------------------------------


def test_streamed_failing_responses_are_closed_before_a_retry(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(max_retries=2)
    server.push(status(503, body="first"), status(503, body="second"), status(503, body="last"))
    seen: list[httpx.Response] = []
    with (
        httpx.Client(event_hooks={"response": [seen.append]}) as client,
        client.stream("GET", server.url("/st")) as response,
    ):
        assert response.status_code == 503
        assert response.read() == b"last"
    assert len(seen) == 3
    assert seen[0].is_closed
    assert seen[1].is_closed


async def test_async_streamed_failing_responses_are_closed_before_a_retry(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(max_retries=1)
    server.push(status(503, body="first"), ok("streamed"))
    seen: list[httpx.Response] = []

    async def hook(response: httpx.Response) -> None:
        seen.append(response)

    async with (
        httpx.AsyncClient(event_hooks={"response": [hook]}) as client,
        client.stream("GET", server.url("/st")) as response,
    ):
        assert response.status_code == 200
        assert await response.aread() == b"streamed"
    first, last = seen
    assert (first.status_code, last.status_code) == (503, 200)
    assert first.is_closed


async def test_a_call_cancelled_during_failover_releases_the_streamed_primary(
    install: Install, server: FaultyHTTPServer
) -> None:
    # Cancelled while a failover URL is being tried: nobody else will close the primary's
    # open response, and its pooled connection would be lost to the client for ever.
    with FaultyHTTPServer() as backup:
        install(max_retries=0, downstreams=(failover_to(server, backup),))
        server.default = status(503, body="x" * 100_000)
        backup.default = hang(5.0)
        async with httpx.AsyncClient() as client:
            seen: list[httpx.Response] = []

            async def hook(response: httpx.Response) -> None:
                seen.append(response)

            client.event_hooks = {"response": [hook]}
            request = client.build_request("GET", server.url("/st"))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.send(request, stream=True), 0.3)
            (primary,) = (r for r in seen if r.request.url.port == server.port)
            assert primary.status_code == 503
            assert primary.is_closed


# --- the breaker --------------------------------------------------------------------------------


def test_the_breaker_opens_fails_fast_half_opens_and_closes(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    # The one test here that waits the breaker out: 1 s, so that on a loaded machine it is
    # still open when refused (every other test keeps the default 5 s open).
    runtime = install(max_retries=0, failure_threshold=3, recovery_timeout=1.0)
    server.push(status(503), status(503), status(503))
    for _ in range(3):
        assert driver.get(server.url("/b")).status_code == 503
    breaker = runtime.breakers.get(f"http://127.0.0.1:{server.port}")
    assert state_of(breaker) is CircuitState.OPEN

    with pytest.raises(httpx.ConnectError) as caught:
        driver.get(server.url("/b"))
    assert server.count() == 3  # failed fast: nothing reached the server
    error = caught.value
    assert isinstance(error, CircuitOpenError)
    assert isinstance(error, circuit_open_error_type())
    assert isinstance(error, httpx.TransportError)
    assert error.breaker == f"http://127.0.0.1:{server.port}"
    assert error.retry_after is not None
    assert 0.0 < error.retry_after <= 1.0
    assert error.request.url == server.url("/b")

    time.sleep(1.05)
    assert driver.get(server.url("/b")).status_code == 200  # the probe
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert driver.get(server.url("/b")).status_code == 200
    assert state_of(breaker) is CircuitState.CLOSED
    assert server.count() == 5


def test_a_failing_redirect_hop_to_another_origin_never_opens_the_first_origins_breaker(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    # The first origin answers every call (a redirect); the hop it leads to fails. Its
    # breaker opening would refuse the origin's other calls, which succeed without raptor.
    install(max_retries=1, failure_threshold=2)
    dead = f"http://127.0.0.1:{closed_port()}/gone"
    follow = {"follow_redirects": True}
    with FaultyHTTPServer(default=status(503)) as broken:
        server.default = status(302, {"Location": dead})
        for _ in range(3):
            with pytest.raises(httpx.ConnectError) as raised:
                driver.get(server.url("/moved"), client=follow)
            assert not isinstance(raised.value, CircuitOpenError)
        server.default = status(302, {"Location": broken.url("/x")})
        for _ in range(2):
            assert driver.get(server.url("/moved"), client=follow).status_code == 503
        assert server.count("GET", "/moved") == 10  # each call still retried once
        server.default = ok("fine")
        assert driver.get(server.url("/other"), client=follow).text == "fine"


def test_an_unreachable_proxy_never_opens_the_origins_breaker(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    # The proxy is down, the origin is fine: calls that reach it directly (another client,
    # or once the proxy is back) must not be refused.
    install(max_retries=1, failure_threshold=2)
    dead = {"proxy": f"http://127.0.0.1:{closed_port()}"}
    for _ in range(4):
        with pytest.raises(httpx.ConnectError) as raised:
            driver.get(server.url("/a"), client=dead)
        assert not isinstance(raised.value, CircuitOpenError)
    assert driver.get(server.url("/a")).status_code == 200


def test_a_proxy_refusing_our_credentials_never_opens_the_origins_breaker(
    install: Install, driver: Driver
) -> None:
    install(max_retries=0, failure_threshold=1)
    refusing = status(407, {"Proxy-Authenticate": 'Basic realm="proxy"'})
    with FaultyHTTPServer(default=refusing) as proxy:
        via = {"proxy": proxy.url()}
        for sent in range(1, 4):
            with pytest.raises(httpx.ProxyError):
                driver.get("https://origin.test:8443/", client=via)
            assert proxy.count("CONNECT") == sent


def test_an_origin_failing_behind_a_live_proxy_opens_its_breaker(
    install: Install, driver: Driver
) -> None:
    install(max_retries=0, failure_threshold=1)
    with FaultyHTTPServer(default=status(502)) as proxy:  # the origin behind it is down
        via = {"proxy": proxy.url()}
        assert driver.get("http://origin.test:8081/", client=via).status_code == 502
        with pytest.raises(CircuitOpenError):
            driver.get("http://origin.test:8081/", client=via)
        assert proxy.count() == 1


def test_a_failure_after_a_redirect_within_the_origin_still_counts(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install(max_retries=0, failure_threshold=1)
    server.push(status(302, {"Location": "/there"}), status(503))
    follow = {"follow_redirects": True}
    assert driver.get(server.url("/here"), client=follow).status_code == 503
    with pytest.raises(CircuitOpenError):
        driver.get(server.url("/here"), client=follow)


def test_except_clauses_for_httpx_errors_catch_the_refusal(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    # Open for longer than four refusals take on a loaded machine (a client is built per call).
    install(max_retries=0, failure_threshold=1, recovery_timeout=60.0)
    server.push(status(500))
    driver.get(server.url("/"))
    caught = []
    for clause in (httpx.ConnectError, httpx.TransportError, httpx.RequestError, httpx.HTTPError):
        try:
            driver.get(server.url("/"))
        except clause as error:
            caught.append(type(error).__name__)
    assert caught == ["HttpxCircuitOpen"] * 4
    assert integration.HttpxCircuitOpen is circuit_open_error_type()


# --- timeouts -----------------------------------------------------------------------------------


def test_httpx_keeps_its_own_timeout_and_a_timed_out_get_is_retried(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install()
    server.push(hang(2.0), ok("second try"))
    assert driver.get(server.url("/t"), client={"timeout": 0.2}).text == "second try"
    assert server.count("GET", "/t") == 2


def test_the_clients_timeout_is_not_replaced(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install(max_retries=0)  # the downstream timeout is 30 s: not used for httpx
    server.push(hang(5.0))
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        driver.get(server.url("/slow"), client={"timeout": 0.2})
    assert time.monotonic() - started < 2.0


async def test_an_attempt_timeout_bounds_async_attempts(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(attempt_timeout=0.2)
    server.push(hang(2.0), ok("in time"))
    async with httpx.AsyncClient() as client:
        response = await client.get(server.url("/t"))
    assert response.text == "in time"
    assert server.count() == 2


class AuditTimeout(TimeoutError):
    """An app's own timeout, raised by its response hook."""


async def test_a_timeout_error_the_call_raises_itself_reaches_the_caller_unchanged(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(attempt_timeout=5.0, max_retries=0)

    async def audit(response: httpx.Response) -> None:
        raise AuditTimeout("the audit log timed out")

    async with httpx.AsyncClient(event_hooks={"response": [audit]}) as client:
        with pytest.raises(AuditTimeout) as raised:
            await client.get(server.url("/t"))
    assert type(raised.value) is AuditTimeout


async def test_a_fallback_is_handed_the_attempt_timeout_as_httpx_shows_it(
    install: Install, server: FaultyHTTPServer
) -> None:
    seen: list[BaseException] = []

    def fallback(error: BaseException) -> httpx.Response:
        seen.append(error)
        return httpx.Response(200, text="cached")

    install(
        attempt_timeout=0.2,
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=fallback),),
    )
    server.push(hang(2.0))
    async with httpx.AsyncClient() as client:
        assert (await client.get(server.url("/t"))).text == "cached"
    [error] = seen
    assert isinstance(error, httpx.TimeoutException)
    assert error.__cause__ is not error


async def test_an_attempt_out_of_time_is_an_httpx_timeout_and_a_timeout_error(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(attempt_timeout=0.2, max_retries=1)
    server.push(hang(2.0), hang(2.0))
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.TimeoutException) as raised:  # what `except` clauses expect
            await client.get(server.url("/t"))
    assert isinstance(raised.value, TimeoutError)
    assert isinstance(raised.value, integration.attempt_timeout_error_type())
    assert raised.value.request.url == server.url("/t")


# --- fallbacks ----------------------------------------------------------------------------------


def test_a_fallback_function_gets_the_failing_response(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    seen: list[Any] = []

    def fallback(failure: Any) -> httpx.Response:
        seen.append(failure)
        return httpx.Response(203, text="from the fallback")

    install(
        max_retries=1, downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=fallback),)
    )
    server.default = status(503)
    response = driver.get(server.url("/f"))
    assert (response.status_code, response.text) == (203, "from the fallback")
    (failure,) = seen
    assert isinstance(failure, httpx.Response)
    assert failure.status_code == 503
    (done,) = finished(install.events)  # type: ignore[attr-defined]
    assert (done.strategy, done.outcome) == (Strategy.FAILOVER, Outcome.FALLBACK)


async def test_an_async_fallback_function_is_awaited(
    install: Install, server: FaultyHTTPServer
) -> None:
    async def fallback(failure: Any) -> str:
        await asyncio.sleep(0)
        return "awaited"

    install(
        max_retries=0, downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=fallback),)
    )
    server.push(status(503))
    async with httpx.AsyncClient() as client:
        result: Any = await client.get(server.url("/"))  # whatever the fallback returns
    assert result == "awaited"


def test_failover_sends_the_same_path_to_the_next_base_url(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    with FaultyHTTPServer() as backup:
        install(
            max_retries=1,
            downstreams=(
                DownstreamOverride(
                    pattern=f"127.0.0.1:{server.port}",
                    failover_urls=(f"http://127.0.0.1:{closed_port()}", backup.url("/")),
                ),
            ),
        )
        server.default = status(503)
        backup.push(ok("from the backup"))
        response = driver.get(server.url("/items?id=7"))
        assert (response.status_code, response.text) == (200, "from the backup")
        assert server.count() == 2
        assert [r.path for r in backup.requests] == ["/items?id=7"]
        assert backup.requests[0].headers["host"] == backup.authority


def test_failover_when_the_breaker_is_open_even_for_a_post(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    with FaultyHTTPServer() as backup:
        install(
            max_retries=0,
            failure_threshold=1,
            downstreams=(
                DownstreamOverride(
                    pattern=f"127.0.0.1:{server.port}", failover_urls=(backup.url(),)
                ),
            ),
        )
        server.default = status(503)
        assert driver.post(server.url("/p"), content=b"x").status_code == 503
        assert backup.count() == 0
        assert driver.post(server.url("/p"), content=b"y").status_code == 200
        assert server.count() == 1
        assert [r.body for r in backup.requests] == [b"y"]


def test_stale_if_error_serves_the_last_good_response(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install(
        max_retries=1,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    server.push(ok("fresh", headers={"ETag": '"v1"'}))
    assert driver.get(server.url("/doc")).text == "fresh"
    server.default = status(503)
    response = driver.get(server.url("/doc"))
    assert response.status_code == 200
    assert response.text == "fresh"
    assert response.headers[STALE_HEADER] == "1"
    assert response.headers["ETag"] == '"v1"'
    assert response.headers["Content-Length"] == "5"
    (done,) = finished(install.events)  # type: ignore[attr-defined]
    assert done.outcome is Outcome.FALLBACK
    assert driver.get(server.url("/other")).status_code == 503
    other_user = driver.get(server.url("/doc"), headers={"Authorization": "Bearer other"})
    assert other_user.status_code == 503


def test_a_bug_looking_up_a_stale_copy_leaves_the_call_guarded(
    install: Install,
    server: FaultyHTTPServer,
    driver: Driver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The lookup ran inside the describe step: a bug there left every stale-eligible GET
    # unguarded (no retry, its successes uncounted while other calls' failures counted).
    runtime = install(
        max_retries=2,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in the stale lookup")

    monkeypatch.setattr(StaleCache, "get", broken)
    server.push(status(503))
    server.default = ok("fine")
    response = driver.get(server.url("/doc"))
    assert (response.status_code, response.text) == (200, "fine")  # retried: guarded
    assert server.count() == 2
    (done,) = finished(install.events)  # type: ignore[attr-defined]
    assert done.outcome is Outcome.RECOVERED
    assert runtime.breakers.items()  # the origin's breaker saw the call


def test_stale_if_error_keys_on_the_request_as_sent(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    trace = {"traceparent": f"00-{'1' * 32}-{'1' * 16}-01"}
    key_a = {"headers": {"X-API-Key": "key-A"}}
    server.push(ok("key A's data"), ok("search a"), ok("alice's data"))
    assert driver.get(server.url("/me"), client=key_a, headers=trace).text == "key A's data"
    assert driver.request("GET", server.url("/search"), content=b"a").text == "search a"
    assert driver.get(server.url("/account"), client={"params": {"tenant": "alice"}}).is_success
    server.default = status(503)
    # Any header may select what the answer is, or for whom; a trace context does not.
    key_b = {"headers": {"X-API-Key": "key-B"}}
    assert driver.get(server.url("/me"), client=key_b, headers=trace).status_code == 503
    served = driver.get(
        server.url("/me"), client=key_a, headers={"traceparent": f"00-{'2' * 32}-{'2' * 16}-01"}
    )
    assert (served.text, served.headers[STALE_HEADER]) == ("key A's data", "1")
    # So do the body of a GET and the client's params.
    assert driver.request("GET", server.url("/search"), content=b"b").status_code == 503
    assert driver.request("GET", server.url("/search"), content=b"a").text == "search a"
    assert (
        driver.get(server.url("/account"), client={"params": {"tenant": "bob"}}).status_code == 503
    )


def test_a_client_with_request_hooks_is_never_served_stale(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    # A request event hook runs inside send, after the stale key is made: one that sets the
    # current user's token must not let another user's request find the first one's answer.
    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )

    def signed_in(token: str) -> dict[str, Any]:
        def sign(request: httpx.Request) -> None:
            request.headers["Authorization"] = f"Bearer {token}"

        async def sign_async(request: httpx.Request) -> None:
            sign(request)

        return {"event_hooks": {"request": [sign_async if driver.is_async else sign]}}

    server.push(ok("alice's account"))
    assert driver.get(server.url("/me"), client=signed_in("alice")).text == "alice's account"
    server.default = status(503)
    answer = driver.get(server.url("/me"), client=signed_in("bob"))
    assert answer.status_code == 503
    assert STALE_HEADER not in answer.headers
    assert [r.headers["authorization"] for r in server.requests] == [
        "Bearer alice",
        "Bearer bob",
    ]


def test_a_request_that_does_not_follow_redirects_is_not_served_a_redirected_copy(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    server.push(status(302, {"Location": "/final"}), ok("the final page"))
    following = {"follow_redirects": True}
    assert driver.get(server.url("/start"), client=following).text == "the final page"
    server.default = status(503)
    # Its answer would have been the 302 itself, not the page it leads to.
    assert driver.get(server.url("/start")).status_code == 503
    assert driver.get(server.url("/start"), follow_redirects=False).status_code == 503
    served = driver.get(server.url("/start"), follow_redirects=True)
    assert (served.text, served.headers[STALE_HEADER]) == ("the final page", "1")
    served = driver.get(server.url("/start"), client=following)
    assert (served.text, served.headers[STALE_HEADER]) == ("the final page", "1")


def test_serving_a_stale_copy_does_not_make_it_fresh(
    server: FaultyHTTPServer, driver: Driver
) -> None:
    # A stale copy served is not a new good answer: keeping it again would restart its age,
    # and an outage with steady traffic would be served the same copy for ever, aged 0.
    clock = FakeClock()
    settings = make_settings(
        max_retries=0,
        downstreams=(
            DownstreamOverride(pattern="127.0.0.1", stale_if_error=True, stale_max_age=10.0),
        ),
    )
    hook = HttpxIntegration()
    hook.install(dataclasses.replace(settings, runtime=Runtime(clock=clock)))
    try:
        server.push(ok("fresh"))
        assert driver.get(server.url("/doc")).text == "fresh"
        server.default = status(503)
        for age in (4, 8):
            clock.advance(4.0)
            stale = driver.get(server.url("/doc"))
            assert (stale.text, stale.headers["Age"]) == ("fresh", str(age))
        clock.advance(4.0)  # 12 s after the good answer: past stale_max_age
        assert driver.get(server.url("/doc")).status_code == 503
    finally:
        hook.uninstall()


def test_the_responses_raptor_builds_have_an_elapsed_time(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    server.push(ok("fresh"))
    driver.get(server.url("/doc"))
    server.default = status(503)
    stale = driver.get(server.url("/doc"))
    assert stale.headers[STALE_HEADER] == "1"
    assert stale.elapsed == datetime.timedelta(0)
    server.default = status(429, {"Retry-After": "30"})
    for _ in range(10):  # every call throttled: the origin cools down
        driver.get(server.url("/limited"))
    throttled = driver.get(server.url("/limited"))
    assert throttled.headers[THROTTLED_HEADER] == "1"
    assert throttled.elapsed == datetime.timedelta(0)


def failover_to(primary: FaultyHTTPServer, *backups: FaultyHTTPServer) -> DownstreamOverride:
    return DownstreamOverride(
        pattern=f"127.0.0.1:{primary.port}",
        failover_urls=tuple(backup.url() for backup in backups),
    )


@pytest.mark.parametrize("answer", [hang(1.0), status(503)], ids=["timeout", "503"])
def test_a_post_that_reached_a_failover_url_goes_to_no_other(
    install: Install, server: FaultyHTTPServer, driver: Driver, answer: Any
) -> None:
    with FaultyHTTPServer() as backup, FaultyHTTPServer() as spare:
        install(
            max_retries=0, failure_threshold=1, downstreams=(failover_to(server, backup, spare),)
        )
        server.default = status(503)
        # A POST that fails is not failed over; the primary's breaker opens.
        assert driver.post(server.url("/warm-up")).status_code == 503
        backup.push(answer)
        # Refused by the primary's breaker: the backup may have it, but it may have acted on
        # it too, so the spare must not get it. The caller gets the backup's answer: the
        # primary's "circuit open" would say the POST was never sent.
        if answer.kind == "respond":
            response = driver.post(server.url("/pay"), content=b"1", timeout=0.3)
            assert response.status_code == 503
        else:
            with pytest.raises(httpx.TimeoutException) as raised:
                driver.post(server.url("/pay"), content=b"1", timeout=0.3)
            assert not isinstance(raised.value, CircuitOpenError)
            # On a loaded machine the backup's thread may read the request only after the
            # client gave up on it: wait for that read before counting.
            deadline = time.monotonic() + 5.0
            while not backup.count("POST", "/pay") and time.monotonic() < deadline:
                time.sleep(0.01)
        assert [each.count("POST", "/pay") for each in (server, backup, spare)] == [0, 1, 0]


def test_a_post_refused_by_a_failover_urls_own_breaker_goes_on_to_the_next(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    with FaultyHTTPServer() as backup, FaultyHTTPServer() as spare:
        install(
            max_retries=0, failure_threshold=1, downstreams=(failover_to(server, backup, spare),)
        )
        server.default = backup.default = status(503)
        assert driver.post(server.url("/warm-up")).status_code == 503
        assert driver.get(backup.url("/warm-up")).status_code == 503  # both breakers open
        spare.push(ok("paid"))
        assert driver.post(server.url("/pay"), content=b"1").text == "paid"
        assert [each.count("POST", "/pay") for each in (server, backup, spare)] == [0, 0, 1]


def test_a_fallback_function_that_raises_releases_the_streamed_primary(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    class Unavailable(Exception):
        pass

    raised = Unavailable("try later")

    def fallback(failure: Any) -> Any:
        raise raised

    install(
        max_retries=0, downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=fallback),)
    )
    # One connection, and a short wait for it: an unreleased response would hold it.
    options: dict[str, Any] = {
        "limits": httpx.Limits(max_connections=1),
        "timeout": httpx.Timeout(5.0, pool=0.5),
    }
    server.push(status(503))
    if not driver.is_async:
        with httpx.Client(**options) as client:
            with pytest.raises(Unavailable) as caught:
                client.send(client.build_request("GET", server.url("/a")), stream=True)
            assert caught.value is raised
            assert client.get(server.url("/b")).status_code == 200
        return

    async def run() -> None:
        async with httpx.AsyncClient(**options) as client:
            with pytest.raises(Unavailable) as caught:
                await client.send(client.build_request("GET", server.url("/a")), stream=True)
            assert caught.value is raised
            assert (await client.get(server.url("/b"))).status_code == 200

    asyncio.run(run())


def test_an_async_fallback_function_serves_async_clients_only(
    install: Install, server: FaultyHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def cached_answer(failure: Any) -> httpx.Response:
        return httpx.Response(200, text="from the cache")

    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=cached_answer),),
    )
    server.default = status(503)
    assert Driver("async").get(server.url("/a")).text == "from the cache"
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        answers = [Driver("sync").get(server.url("/a")).status_code for _ in range(2)]
    assert answers == [503, 503]  # as without a fallback
    (warning,) = caplog.records
    assert "cached_answer" in warning.getMessage()
    assert "async calls" in warning.getMessage()


# --- staying out of the way ---------------------------------------------------------------------


def test_suppressed_requests_pass_through_untouched(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install(failure_threshold=1)
    server.push(status(503), ok())
    with suppress_instrumentation():
        assert driver.get(server.url("/export")).status_code == 503
        assert driver.get(server.url("/export")).status_code == 200
    assert server.count() == 2
    assert install.events == []  # type: ignore[attr-defined]


def test_our_own_failure_never_reaches_the_app(
    install: Install,
    server: FaultyHTTPServer,
    driver: Driver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    install()
    _reset_for_tests()

    def broken(self: OriginTable, *parts: object) -> None:
        raise RuntimeError("bug in otel_raptor")

    monkeypatch.setattr(OriginTable, "for_parts", broken)
    server.push(status(503))
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        assert driver.get(server.url("/")).status_code == 503
    assert server.count() == 1
    assert "httpx.describe" in caplog.text


def test_a_hand_built_request_is_guarded_too(install: Install, server: FaultyHTTPServer) -> None:
    install()
    server.push(status(503), ok("built"))
    with httpx.Client() as client:
        response = client.send(httpx.Request("GET", server.url("/h")))
    assert response.text == "built"
    assert server.count() == 2


def test_send_is_guarded_whether_the_request_comes_by_position_or_by_keyword(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    install()
    server.push(status(503), ok("positional"), status(503), ok("keyword"))
    request = httpx.Request("GET", server.url("/k"))
    if driver.is_async:

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient() as client:
                return [await client.send(request), await client.send(request=request)]

        responses = asyncio.run(both())
    else:
        with httpx.Client() as client:
            responses = [client.send(request), client.send(request=request)]
    assert [r.text for r in responses] == ["positional", "keyword"]
    assert server.count() == 4


def test_a_send_call_httpx_rejects_is_rejected_by_httpx_as_before(install: Install) -> None:
    install()
    request = httpx.Request("GET", "http://127.0.0.1:9/")
    with httpx.Client() as client:
        with pytest.raises(TypeError) as ours:
            client.send(request, True)  # type: ignore[misc]  # send takes no 2nd positional
        with pytest.raises(TypeError):
            client.send()  # type: ignore[call-arg]
    with pytest.raises(TypeError) as theirs:
        ORIGINAL_SEND(httpx.Client(), request, True)
    assert str(ours.value) == str(theirs.value)


# --- the fast lane ------------------------------------------------------------------------------


def test_only_httpx_own_send_signature_gets_the_fast_lane() -> None:
    assert integration._send_keywords(ORIGINAL_SEND) == (
        False,
        httpx.USE_CLIENT_DEFAULT,
        httpx.USE_CLIENT_DEFAULT,
    )

    def any_arguments(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any: ...

    def one_more_keyword(
        self: Any,
        request: Any,
        *,
        stream: Any = 0,
        auth: Any = 0,
        follow_redirects: Any = 0,
        extensions: Any = None,
    ) -> Any: ...

    def no_default(
        self: Any, request: Any, *, stream: Any, auth: Any = 0, follow_redirects: Any = 0
    ) -> Any: ...

    for other in (any_arguments, one_more_keyword, no_default):
        assert integration._send_keywords(other) is None


def test_a_layer_below_ours_that_shows_httpx_signature_keeps_its_own(
    install: Install, server: FaultyHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another library's layer on Client.send made with functools.wraps (as sentry-sdk's is)
    # shows httpx's signature through __wrapped__, but its own is what callers get without
    # raptor: a keyword only it takes must reach it, as through the general hook.
    tags: list[object] = []

    @functools.wraps(ORIGINAL_SEND)
    def layer(self: httpx.Client, request: httpx.Request, *, tag: object = None, **kwargs: Any):
        tags.append(tag)
        return ORIGINAL_SEND(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", layer)
    install()
    server.push(status(503), ok("tagged"))
    try:
        with httpx.Client() as client:
            response = client.send(httpx.Request("GET", server.url("/t")), tag="mine")
        assert response.text == "tagged"  # guarded: retried
        assert tags == ["mine", "mine"]
    finally:
        for hook in install.installed:  # type: ignore[attr-defined]
            hook.uninstall()
        assert httpx.Client.send is layer
        monkeypatch.undo()


def _trace_of_a_mixed_workload(server: FaultyHTTPServer, runtime: Runtime) -> list[object]:
    """What an app and its downstream see of one scripted workload: each answer (status and
    body, or the error's class), the requests the server received, and the breaker's state."""
    server.push(
        ok("a"),
        status(503),
        ok("b"),
        reset(),
        ok("c"),
        status(429, {"Retry-After": "0"}),
        ok("d"),
        status(503),
        status(500),
        status(500),
        status(500),
        status(500),
        status(500),
    )
    seen: list[object] = []
    with httpx.Client(timeout=5) as client:
        for method in ("GET", "GET", "GET", "HEAD", "GET", "POST", "GET", "GET", "GET"):
            try:
                response = client.request(method, server.url("/"))
                seen.append((response.status_code, response.text))
            except httpx.HTTPError as error:
                seen.append(type(error).__name__)
            ((name, breaker),) = runtime.breakers.items()
            seen.append((server.count(), state_of(breaker).value))
    seen.append(runtime.budget(name)._calls)  # calls deposit into the retry budget
    return seen


def test_the_fast_lane_and_the_general_hook_answer_and_count_alike(
    install: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    traces = []
    for general in (False, True):
        if general:
            monkeypatch.setattr(integration, "_send_keywords", lambda original: None)
        with FaultyHTTPServer() as server:
            runtime = install(max_retries=1, failure_threshold=2, recovery_timeout=30)
            keywords = vars(httpx.Client)["send"].__code__.co_kwonlyargcount
            assert keywords == (0 if general else 3)  # the hook this pass means to test
            traces.append(_trace_of_a_mixed_workload(server, runtime))
        for hook in list(install.installed):  # type: ignore[attr-defined]
            hook.uninstall()
        install.installed.clear()  # type: ignore[attr-defined]
    fast, general_hook = traces
    assert fast == general_hook
    # Retried (503, reset, 429), failed (500s), counted to open, refused: every path was met.
    assert fast[:8] == [
        (200, "a"),
        (1, "closed"),
        (200, "b"),
        (3, "closed"),
        (200, "c"),
        (5, "closed"),
        (200, ""),
        (7, "closed"),
    ]
    assert fast[-3:-1] == ["HttpxCircuitOpen", (10, "open")]
    assert fast[-1] == 6  # a deposit per call that reached the server, none per refusal


def test_a_bug_in_the_fast_lane_leaves_the_request_to_the_general_hook(
    install: Install,
    server: FaultyHTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_context() -> object:
        raise RuntimeError("bug in otel_raptor")

    found = integration.suppression_keys()
    assert found is not None
    monkeypatch.setattr(integration, "suppression_keys", lambda: (broken_context, *found[1:]))
    install()
    _reset_for_tests()
    server.push(status(503), ok("guarded"))
    with caplog.at_level(logging.WARNING, logger="otel_raptor"), httpx.Client() as client:
        response = client.get(server.url("/"))
    assert response.text == "guarded"  # retried: describe and the loop took it
    assert server.count() == 2
    assert "httpx.fast_lane" in caplog.text


def test_a_bug_recording_a_fast_lane_success_never_loses_the_response(
    install: Install,
    server: FaultyHTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = install()
    _reset_for_tests()

    def broken(self: CircuitBreaker, *args: object) -> None:
        raise RuntimeError("bug in otel_raptor")

    server.push(ok("zeroth"), ok("first"), ok("second"))
    with caplog.at_level(logging.WARNING, logger="otel_raptor"), httpx.Client() as client:
        # The origin's first request is described (the general hook): it opens the lane.
        assert client.get(server.url("/")).text == "zeroth"
        monkeypatch.setattr(CircuitBreaker, "record_success_since", broken)
        assert [client.get(server.url("/")).text for _ in range(2)] == ["first", "second"]
    assert server.count() == 3
    assert caplog.text.count("httpx.fast_lane_success") == 1  # reported once
    [(_, breaker)] = runtime.breakers.items()
    # It would count failures only: it stops judging (and is quiet: the second success did
    # not meet the bug).
    assert not breaker.judging


# --- apps served in the process ------------------------------------------------------------


def _wsgi_app(calls: list[str]) -> Callable[..., Any]:
    """A WSGI app that answers ``500`` on ``/boom`` and ``200`` elsewhere, recording calls."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        calls.append(environ["PATH_INFO"])
        failing = environ["PATH_INFO"] == "/boom"
        start_response("500 Internal Server Error" if failing else "200 OK", [])
        return [b"boom" if failing else b"fine"]

    return app


class _TestClientTransport(httpx.BaseTransport):
    """Named as Starlette's and FastAPI's test client transport is, which is not httpx's."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.inner = httpx.WSGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("kind", ["wsgi", "mock", "test-client"])
def test_an_app_served_in_the_process_is_never_retried_nor_counted(
    install: Install, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A test suite's app answering 500 is the code under test: a retry would run its handler
    # again, and a breaker opened by one test would refuse the next tests' requests.
    runtime = install(failure_threshold=1, recovery_timeout=3600)
    calls: list[str] = []
    app = _wsgi_app(calls)
    transport: httpx.BaseTransport
    if kind == "wsgi":
        transport = httpx.WSGITransport(app=app)
    elif kind == "mock":
        transport = httpx.MockTransport(
            lambda request: (calls.append(request.url.path), httpx.Response(500))[1]
        )
    else:
        transport = _TestClientTransport(app)
    with httpx.Client(transport=transport, base_url="http://testserver") as client:
        for _ in range(5):
            assert client.get("/boom").status_code == 500
        if kind != "mock":
            assert client.get("/ok").text == "fine"
    assert calls[:5] == ["/boom"] * 5  # one handler run per request
    assert [state_of(b) for _, b in runtime.breakers.items()] == [CircuitState.CLOSED]
    assert finished(install.events) == []  # type: ignore[attr-defined]


async def test_an_asgi_app_served_in_the_process_is_never_retried(install: Install) -> None:
    runtime = install(failure_threshold=1, recovery_timeout=3600)
    calls: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"down"})

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        statuses = [(await client.get("/x")).status_code for _ in range(3)]
    assert statuses == [503, 503, 503]
    assert calls == ["/x"] * 3
    assert [state_of(b) for _, b in runtime.breakers.items()] == [CircuitState.CLOSED]


def test_an_app_served_in_the_process_behind_a_redirect_is_never_run_again(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    # A network origin redirects to an app mounted in the process (a login callback, say):
    # a replay of the request would run the app's handler again.
    runtime = install(failure_threshold=1, recovery_timeout=3600)
    calls: list[str] = []

    async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"boom"})

    server.default = status(302, {"Location": "http://testserver/boom"})
    app: httpx.BaseTransport | httpx.AsyncBaseTransport = (
        httpx.ASGITransport(app=asgi_app)
        if driver.is_async
        else httpx.WSGITransport(app=_wsgi_app(calls))
    )
    mounts = {"http://testserver": app}
    response = driver.get(server.url("/login"), client={"mounts": mounts, "follow_redirects": True})
    assert (response.status_code, response.text) == (500, "boom")
    assert calls == ["/boom"]  # the handler ran once, as without raptor
    assert server.count() == 1
    assert {state_of(b) for _, b in runtime.breakers.items()} == {CircuitState.CLOSED}
    assert finished(install.events) == []  # type: ignore[attr-defined]


async def test_an_asgi_app_served_in_the_process_is_not_cut_off_at_the_attempt_timeout(
    install: Install,
) -> None:
    # As without raptor, and as through a breaker that is not closed: the app under test
    # answers when it answers; raptor's attempt timeout is for downstreams.
    runtime = install(attempt_timeout=0.05, failure_threshold=1, recovery_timeout=3600)
    calls: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await asyncio.sleep(0.2)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"slow"})

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/slow")).text == "slow"
        ((_, breaker),) = runtime.breakers.items()
        breaker.force_open()
        assert (await client.get("/slow")).text == "slow"  # the same through an open breaker
    assert calls == ["/slow"] * 2
    assert finished(install.events) == []  # type: ignore[attr-defined]


def test_a_network_transport_of_the_app_own_is_still_guarded(
    install: Install, server: FaultyHTTPServer
) -> None:
    # A transport of the app's own that goes to the network (a wrapper, say) keeps its guard.
    install()

    class Wrapping(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()  # its pooled connection, else left to the garbage collector

    server.push(status(503), ok("retried"))
    with httpx.Client(transport=Wrapping()) as client:
        assert client.get(server.url("/w")).text == "retried"
    assert server.count() == 2


class _Delegating(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A transport of the app's own (a logging or retrying wrapper, say) that hands every
    request to the transport it keeps under ``attribute``."""

    def __init__(self, inner: Any, attribute: str = "_transport") -> None:
        setattr(self, attribute, inner)
        self.attribute = attribute

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        inner: httpx.BaseTransport = getattr(self, self.attribute)
        return inner.handle_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        inner: httpx.AsyncBaseTransport = getattr(self, self.attribute)
        return await inner.handle_async_request(request)

    # As a wrapper must, so that closing the client closes the inner transport's connections
    # (once: a test chains two wrappers into a loop).
    def close(self) -> None:
        inner = self._unclosed()
        if isinstance(inner, httpx.BaseTransport):
            inner.close()

    async def aclose(self) -> None:
        inner = self._unclosed()
        if isinstance(inner, httpx.AsyncBaseTransport):
            await inner.aclose()

    def _unclosed(self) -> object:
        if vars(self).get("closed"):
            return None
        self.closed = True
        return getattr(self, self.attribute)


def _failing_app(calls: list[str]) -> httpx.MockTransport:
    """An app in the process that answers every request ``503``, recording its path."""
    return httpx.MockTransport(
        lambda request: (calls.append(request.url.path), httpx.Response(503))[1]
    )


@pytest.mark.parametrize("attribute", ["_transport", "transport"])
def test_an_app_served_in_the_process_behind_a_wrapper_is_never_retried_nor_refused(
    install: Install, driver: Driver, attribute: str
) -> None:
    # The wrapper names the transport it delegates to: raptor follows it to the app.
    runtime = install(failure_threshold=1, recovery_timeout=3600)
    calls: list[str] = []
    app = _failing_app(calls)
    wrapped = _Delegating(_Delegating(app, attribute), attribute)
    client = {"transport": wrapped, "base_url": "http://testserver"}
    for _ in range(3):
        assert driver.get("/boom", client=client).status_code == 503
    assert calls == ["/boom"] * 3  # one handler run per request
    ((_, breaker),) = runtime.breakers.items()
    assert state_of(breaker) is CircuitState.CLOSED
    breaker.force_open()
    assert driver.get("/boom", client=client).status_code == 503  # let through
    assert calls == ["/boom"] * 4
    assert finished(install.events) == []  # type: ignore[attr-defined]


def test_wrappers_are_followed_a_bounded_number_of_times(install: Install) -> None:
    # Four wrappers deep the app is still found; five deep (or a wrapper that names itself
    # through another) the transport is taken for the app's own, and guarded.
    install(recovery_timeout=3600)
    for depth, sends in ((4, 1), (5, 4)):
        calls: list[str] = []
        transport: Any = _failing_app(calls)
        for _ in range(depth):
            transport = _Delegating(transport)
        with httpx.Client(transport=transport, base_url="http://testserver") as client:
            assert client.get(f"/{depth}").status_code == 503
        assert len(calls) == sends, depth
    first = _Delegating(None)
    second = _Delegating(first)
    first._transport = second  # type: ignore[attr-defined]
    in_process, _ = integration._in_process_check()
    with httpx.Client(transport=first) as client:
        assert in_process((client, client.build_request("GET", "http://testserver/x")), {}) is False


def test_a_network_transport_behind_a_wrapper_is_still_guarded(
    install: Install, server: FaultyHTTPServer, driver: Driver
) -> None:
    runtime = install(recovery_timeout=3600)

    def wrapper() -> _Delegating:
        network = httpx.AsyncHTTPTransport() if driver.is_async else httpx.HTTPTransport()
        return _Delegating(network)

    server.push(status(503), ok("retried"))
    assert driver.get(server.url("/w"), client={"transport": wrapper()}).text == "retried"
    assert server.count() == 2
    ((_, breaker),) = runtime.breakers.items()
    breaker.force_open()
    with pytest.raises(CircuitOpenError):
        driver.get(server.url("/w"), client={"transport": wrapper()})
    assert server.count() == 2


# --- installing ---------------------------------------------------------------------------------


def test_install_twice_never_wraps_twice_and_uninstall_restores_the_originals() -> None:
    first, second = HttpxIntegration(), HttpxIntegration()
    first.install(make_settings())
    wrapped = vars(httpx.Client)["send"], vars(httpx.AsyncClient)["send"]
    second.install(make_settings())
    assert (vars(httpx.Client)["send"], vars(httpx.AsyncClient)["send"]) == wrapped
    assert wrapped[0].__wrapped__ is ORIGINAL_SEND
    assert wrapped[1].__wrapped__ is ORIGINAL_ASYNC_SEND
    first.uninstall()
    assert vars(httpx.Client)["send"] is wrapped[0]
    second.uninstall()
    assert httpx.Client.send is ORIGINAL_SEND
    assert httpx.AsyncClient.send is ORIGINAL_ASYNC_SEND


def test_instrument_uninstrument_instrument(server: FaultyHTTPServer, driver: Driver) -> None:
    hook = HttpxIntegration()
    for _ in range(2):
        hook.install(make_settings())
        server.push(status(503), ok())
        assert driver.get(server.url("/")).status_code == 200
        hook.uninstall()
    server.push(status(503))
    assert driver.get(server.url("/")).status_code == 503


def test_the_error_class_is_built_once_and_importable() -> None:
    cls = circuit_open_error_type()
    assert cls is circuit_open_error_type()
    assert (cls.__name__, cls.__module__) == ("HttpxCircuitOpen", "otel_raptor.integrations.httpx")
    from otel_raptor.integrations.httpx import HttpxCircuitOpen

    assert HttpxCircuitOpen is cls
    request = httpx.Request("GET", "http://a.test/")
    error = cls("http://a.test:80", None, request=request)
    assert error.request is request
    assert str(error) == "circuit breaker 'http://a.test:80' is open"


def test_the_hooked_methods_look_like_the_originals(install: Install) -> None:
    # Code that inspects send (mock autospec, frameworks choosing sync or async) sees no change.
    install()
    assert httpx.Client.send is not ORIGINAL_SEND
    assert inspect.iscoroutinefunction(httpx.AsyncClient.send)
    assert not inspect.iscoroutinefunction(httpx.Client.send)
    assert inspect.signature(httpx.Client.send) == inspect.signature(ORIGINAL_SEND)
    assert httpx.AsyncClient.send.__qualname__ == ORIGINAL_ASYNC_SEND.__qualname__


def test_the_fast_lane_keeps_alternating_origins_apart(install: Install) -> None:
    # Origins a lane alternates between: neither is judged by, or refused for, the other.
    runtime = install(failure_threshold=2, max_retries=0)
    with FaultyHTTPServer() as failing, FaultyHTTPServer() as healthy:
        failing.push(ok(), status(500), status(500))
        seen = []
        with httpx.Client(timeout=5) as client:
            for _ in range(4):
                for server in (failing, healthy):
                    try:
                        seen.append(client.get(server.url("/")).status_code)
                    except httpx.HTTPError as error:
                        seen.append(type(error).__name__)
        assert seen == [200, 200, 500, 200, 500, 200, "HttpxCircuitOpen", 200]
        assert (failing.count(), healthy.count()) == (3, 4)
    states = sorted(state_of(breaker).value for _, breaker in runtime.breakers.items())
    assert states == ["closed", "open"]
