"""The requests integration against a real loopback server with scripted faults."""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_raptor import CircuitOpenError
from otel_raptor.config import DownstreamOverride, RaptorConfig
from otel_raptor.core.attempts import AttemptLoop
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.events import Event, RecoveryFinished
from otel_raptor.core.recovery import Outcome, Strategy
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations import _wrapping
from otel_raptor.integrations import requests as integration
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import STALE_HEADER, OriginTable
from otel_raptor.integrations.requests import RequestsIntegration, circuit_open_error_type
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

ORIGINAL_REQUEST = requests.Session.request

Install = Callable[..., Runtime]


def make_settings(
    *,
    max_retries: int = 3,
    failure_threshold: int = 5,
    timeout: float = 5.0,
    downstreams: tuple[DownstreamOverride, ...] = (),
    **config: Any,
) -> IntegrationSettings:
    return IntegrationSettings(
        runtime=Runtime(),
        config=RaptorConfig(
            # Backoff stays short; a server's Retry-After of up to 5 s is still waited out.
            retry=RetryPolicy(
                max_retries=max_retries, base_delay=0.01, max_delay=0.05, max_retry_after=5.0
            ),
            breaker=CircuitBreakerConfig(
                failure_threshold=failure_threshold,
                recovery_timeout=0.3,
                recovery_jitter=0.0,
            ),
            request_timeout=timeout,
            downstreams=downstreams,
            **config,
        ),
    )


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


@pytest.fixture
def install() -> Iterator[Install]:
    """Installs the integration with the given settings and records the runtime's events."""
    installed: list[RequestsIntegration] = []
    events: list[Event] = []

    def run(**options: Any) -> Runtime:
        settings = make_settings(**options)
        settings.runtime.bus.subscribe(events.append)
        hook = RequestsIntegration()
        hook.install(settings)
        installed.append(hook)
        run.events = events  # type: ignore[attr-defined]
        return settings.runtime

    run.installed = installed  # type: ignore[attr-defined]
    yield run
    for hook in installed:
        hook.uninstall()
    assert requests.Session.request is ORIGINAL_REQUEST


def state_of(breaker: CircuitBreaker) -> CircuitState:
    return breaker.state  # a call, so that mypy does not narrow it between requests


def finished(events: list[Event]) -> list[RecoveryFinished]:
    return [e for e in events if isinstance(e, RecoveryFinished)]


# --- retries ------------------------------------------------------------------------------------


def test_transient_503s_are_retried_until_success(
    install: Install, server: FaultyHTTPServer
) -> None:
    install()
    server.push(status(503), status(503), ok("fine"))
    response = requests.get(server.url("/a"))
    assert response.status_code == 200
    assert response.text == "fine"
    assert server.count("GET", "/a") == 3


def test_a_connection_reset_is_retried(install: Install, server: FaultyHTTPServer) -> None:
    install()
    server.push(reset(), ok("after reset"))
    assert requests.get(server.url("/r")).text == "after reset"
    assert server.count("GET", "/r") == 2


def test_a_post_without_idempotency_key_is_sent_exactly_once(
    install: Install, server: FaultyHTTPServer
) -> None:
    install()
    server.push(status(503))  # a retry would get the default 200
    response = requests.post(server.url("/pay"), json={"amount": 1})
    assert response.status_code == 503
    assert server.count("POST", "/pay") == 1
    server.push(reset())
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(server.url("/pay2"), data=b"x")
    assert server.count("POST", "/pay2") == 1


def test_a_post_with_an_idempotency_key_is_retried(
    install: Install, server: FaultyHTTPServer
) -> None:
    install()
    server.push(status(503), ok("done"))
    response = requests.post(
        server.url("/pay"), json={"amount": 1}, headers={"Idempotency-Key": "k-1"}
    )
    assert response.text == "done"
    assert server.count("POST", "/pay") == 2
    assert [r.body for r in server.requests] == [b'{"amount": 1}'] * 2


def test_an_idempotency_key_on_the_session_counts_too(
    install: Install, server: FaultyHTTPServer
) -> None:
    install()
    server.push(status(503), ok("done"))
    with requests.Session() as session:
        session.headers["idempotency-key"] = "k-2"
        assert session.post(server.url("/s"), data="x").text == "done"
    assert server.count("POST", "/s") == 2


@pytest.mark.parametrize("removed", [None, ""])
def test_a_session_key_the_request_removes_does_not_count(
    install: Install, server: FaultyHTTPServer, removed: str | None
) -> None:
    # requests drops a session header the request sets to None (and sends "" as it is): the
    # POST goes out without a key, so it must go out once.
    install()
    server.push(reset())
    with requests.Session() as session:
        session.headers["Idempotency-Key"] = "k-3"
        with pytest.raises(requests.exceptions.ConnectionError):
            session.post(server.url("/s"), data="x", headers={"idempotency-key": removed})
    assert server.count("POST", "/s") == 1


def test_retry_non_idempotent_opts_posts_in(install: Install, server: FaultyHTTPServer) -> None:
    install(retry_non_idempotent=True)
    server.push(status(502), ok("done"))
    assert requests.post(server.url("/p"), data=b"body").text == "done"
    assert server.count("POST", "/p") == 2


def test_retry_after_is_never_violated(install: Install, server: FaultyHTTPServer) -> None:
    install()
    server.push(status(429, {"Retry-After": "1"}), ok("late"))
    assert requests.get(server.url("/limited")).text == "late"
    first, second = server.arrivals
    assert second - first >= 1.0


def test_a_retry_after_longer_than_the_policy_allows_is_the_answer_at_once(
    install: Install, server: FaultyHTTPServer
) -> None:
    # Without raptor the caller gets the 429 at once; waiting an hour for it would be worse.
    install()
    server.push(status(429, {"Retry-After": "3600"}))
    started = time.monotonic()
    response = requests.get(server.url("/limited"))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3600"
    assert time.monotonic() - started < 1.0
    assert server.count("GET", "/limited") == 1


def test_streamed_bodies_are_never_retried(install: Install, server: FaultyHTTPServer) -> None:
    install()

    def chunks() -> Iterator[bytes]:
        yield b"a"
        yield b"b"

    server.push(status(503))  # a retry would get the default 200
    response = requests.put(server.url("/gen"), data=chunks())
    assert response.status_code == 503
    assert server.count("PUT", "/gen") == 1
    server.push(status(503))
    response = requests.put(server.url("/file"), data=io.BytesIO(b"file body"))
    assert response.status_code == 503
    assert server.count("PUT", "/file") == 1
    server.push(status(503))
    response = requests.put(server.url("/upload"), files={"f": io.BytesIO(b"upload")})
    assert response.status_code == 503
    assert server.count("PUT", "/upload") == 1


def test_in_memory_bodies_are_replayed_whole(install: Install, server: FaultyHTTPServer) -> None:
    install()
    server.push(status(503), ok())
    requests.put(server.url("/form"), data={"a": "1"}, files={"f": ("f.txt", b"content")})
    first, second = server.requests
    # Encoded again for the retry (a new multipart boundary), with the same parts.
    for sent in (first, second):
        assert b'name="f"; filename="f.txt"\r\n\r\ncontent\r\n' in sent.body
        assert b'name="a"\r\n\r\n1\r\n' in sent.body


def test_positional_arguments_are_understood(install: Install, server: FaultyHTTPServer) -> None:
    install()
    server.push(status(503), ok("pos"))
    with requests.Session() as session:
        response = session.request("GET", server.url("/pos"), {"q": "1"}, None, {"X-A": "b"})
    assert response.text == "pos"
    assert [r.path for r in server.requests] == ["/pos?q=1", "/pos?q=1"]
    assert server.requests[1].headers["x-a"] == "b"


# --- what the caller sees -----------------------------------------------------------------------


def test_the_last_failing_response_is_returned_as_a_response(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(max_retries=2)
    server.push(status(503), status(500), status(503, body="third"), ok())
    response = requests.get(server.url("/down"))
    assert isinstance(response, requests.Response)
    assert response.status_code == 503
    assert response.text == "third"
    assert server.count("GET", "/down") == 3
    with pytest.raises(requests.exceptions.HTTPError):
        response.raise_for_status()


def test_a_streamed_failing_response_is_returned_open(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(max_retries=1)
    server.push(status(503, body="first"), status(503, body="last"))
    with requests.get(server.url("/st"), stream=True) as response:
        assert response.status_code == 503
        assert response.raw.read() == b"last"


class RaisingAdapter(requests.adapters.HTTPAdapter):
    """Fails every send with a fresh ConnectionError and remembers each one."""

    def __init__(self) -> None:
        super().__init__()
        self.raised: list[BaseException] = []

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        error = requests.exceptions.ConnectionError(f"refused #{len(self.raised)}")
        self.raised.append(error)
        raise error


def test_the_last_exception_is_raised_as_itself(install: Install) -> None:
    install(max_retries=2)
    adapter = RaisingAdapter()
    with requests.Session() as session:
        session.mount("http://", adapter)
        with pytest.raises(requests.exceptions.ConnectionError) as caught:
            session.get("http://downstream.test/x")
    assert len(adapter.raised) == 3
    assert caught.value is adapter.raised[-1]
    assert not isinstance(caught.value, CircuitOpenError)


def test_a_refused_connection_surfaces_as_requests_own_error(install: Install) -> None:
    install(max_retries=1)
    with pytest.raises(requests.exceptions.ConnectionError) as caught:
        requests.get(f"http://127.0.0.1:{closed_port()}/")
    assert not isinstance(caught.value, CircuitOpenError)


# --- the breaker --------------------------------------------------------------------------------


def test_the_breaker_opens_fails_fast_half_opens_and_closes(
    install: Install, server: FaultyHTTPServer
) -> None:
    runtime = install(max_retries=0, failure_threshold=3)
    server.push(status(503), status(503), status(503))
    for _ in range(3):
        assert requests.get(server.url("/b")).status_code == 503
    breaker = runtime.breakers.get(f"http://127.0.0.1:{server.port}")
    assert state_of(breaker) is CircuitState.OPEN

    with pytest.raises(requests.exceptions.ConnectionError) as caught:
        requests.get(server.url("/b"))
    assert server.count() == 3  # failed fast: nothing reached the server
    error = caught.value
    assert isinstance(error, CircuitOpenError)
    assert isinstance(error, circuit_open_error_type())
    assert isinstance(error, requests.exceptions.RequestException)
    assert error.breaker == f"http://127.0.0.1:{server.port}"
    assert error.retry_after is not None
    assert 0.0 < error.retry_after <= 0.3
    assert error.request is not None
    assert error.request.url == server.url("/b")

    time.sleep(0.35)
    assert requests.get(server.url("/b")).status_code == 200  # the probe
    assert state_of(breaker) is CircuitState.HALF_OPEN
    assert requests.get(server.url("/b")).status_code == 200
    assert state_of(breaker) is CircuitState.CLOSED
    assert server.count() == 5


def test_an_except_clause_for_connection_errors_catches_the_refusal(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(max_retries=0, failure_threshold=1)
    server.push(status(500))
    requests.get(server.url("/"))
    outcome = "not caught"
    try:
        requests.get(server.url("/"))
    except requests.ConnectionError as error:
        outcome = type(error).__name__
    assert outcome == "RequestsCircuitOpen"
    assert integration.RequestsCircuitOpen is circuit_open_error_type()


def test_a_method_the_server_does_not_implement_never_opens_the_breaker(
    install: Install, server: FaultyHTTPServer
) -> None:
    # 501 (and 505) say the server does not support what this request asks for, as a 405
    # would: a client probing an unsupported method must not cut off the healthy endpoints.
    runtime = install(max_retries=0, failure_threshold=3)
    for _ in range(5):
        server.push(status(501))
        assert requests.request("PROPFIND", server.url("/dav")).status_code == 501
    server.push(status(505))
    assert requests.get(server.url("/v")).status_code == 505
    assert requests.get(server.url("/healthy")).status_code == 200
    breaker = runtime.breakers.get(f"http://{server.authority}")
    assert state_of(breaker) is CircuitState.CLOSED


def test_breakers_are_per_origin(install: Install, server: FaultyHTTPServer) -> None:
    install(max_retries=0, failure_threshold=1)
    with FaultyHTTPServer() as other:
        server.push(status(503))
        requests.get(server.url("/"))
        with pytest.raises(CircuitOpenError):
            requests.get(server.url("/"))
        assert requests.get(other.url("/")).status_code == 200


def test_a_failing_redirect_hop_to_another_origin_never_opens_the_first_origins_breaker(
    install: Install, server: FaultyHTTPServer
) -> None:
    # The first origin answers every call (a redirect); the hop it leads to fails. Its
    # breaker opening would refuse the origin's other calls, which succeed without raptor.
    install(max_retries=1, failure_threshold=2)
    dead = f"http://127.0.0.1:{closed_port()}/gone"
    with FaultyHTTPServer(default=status(503)) as broken:
        server.default = status(302, {"Location": dead})
        for _ in range(3):
            with pytest.raises(requests.ConnectionError) as raised:
                requests.get(server.url("/moved"))
            assert not isinstance(raised.value, CircuitOpenError)
        server.default = status(302, {"Location": broken.url("/x")})
        for _ in range(2):
            assert requests.get(server.url("/moved")).status_code == 503
        assert server.count("GET", "/moved") == 10  # each call still retried once
        server.default = ok("fine")
        assert requests.get(server.url("/other")).text == "fine"


def test_an_unreachable_proxy_never_opens_the_origins_breaker(
    install: Install, server: FaultyHTTPServer
) -> None:
    # The proxy is down, the origin is fine: calls that reach it directly (another session,
    # or once the proxy is back) must not be refused.
    install(max_retries=1, failure_threshold=2)
    dead = {"http": f"http://127.0.0.1:{closed_port()}"}
    for _ in range(4):
        with pytest.raises(requests.exceptions.ProxyError):
            requests.get(server.url("/a"), proxies=dead)
    assert requests.get(server.url("/a")).status_code == 200


def test_a_proxy_refusing_our_credentials_never_opens_the_origins_breaker(
    install: Install,
) -> None:
    install(max_retries=0, failure_threshold=1)
    refusing = status(407, {"Proxy-Authenticate": 'Basic realm="proxy"'})
    with FaultyHTTPServer(default=refusing) as proxy:
        proxies = {"https": proxy.url()}
        for sent in range(1, 4):
            with pytest.raises(requests.exceptions.ProxyError) as raised:
                requests.get("https://origin.test:8443/", proxies=proxies)
            assert not isinstance(raised.value, CircuitOpenError)
            assert proxy.count("CONNECT") == sent


def test_an_origin_failing_behind_a_live_proxy_opens_its_breaker(install: Install) -> None:
    install(max_retries=0, failure_threshold=1)
    with FaultyHTTPServer(default=status(502)) as proxy:  # the origin behind it is down
        proxies = {"http": proxy.url()}
        assert requests.get("http://origin.test:8081/", proxies=proxies).status_code == 502
        with pytest.raises(CircuitOpenError):
            requests.get("http://origin.test:8081/", proxies=proxies)
        assert proxy.count() == 1


def test_a_failure_after_a_redirect_within_the_origin_still_counts(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(max_retries=0, failure_threshold=1)
    server.push(status(302, {"Location": "/there"}), status(503))
    assert requests.get(server.url("/here")).status_code == 503
    with pytest.raises(CircuitOpenError):
        requests.get(server.url("/here"))


def test_breaker_key_host_shares_one_breaker_per_host(
    install: Install, server: FaultyHTTPServer
) -> None:
    runtime = install(max_retries=0, failure_threshold=1, breaker_key="host")
    with FaultyHTTPServer() as other:
        server.push(status(503))
        requests.get(server.url("/"))
        with pytest.raises(CircuitOpenError) as caught:
            requests.get(other.url("/"))
    assert caught.value.breaker == "127.0.0.1"
    assert runtime.breakers.get("127.0.0.1").state is CircuitState.OPEN


# --- timeouts -----------------------------------------------------------------------------------


def test_a_default_timeout_applies_when_the_caller_gave_none(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(max_retries=0, timeout=0.2)
    server.push(hang(5.0))
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(server.url("/slow"))
    assert time.monotonic() - started < 2.0


def test_the_callers_timeout_wins(install: Install, server: FaultyHTTPServer) -> None:
    install(max_retries=0, timeout=0.2)
    server.push(hang(0.6))
    started = time.monotonic()
    # The server gives up first and closes: a connection error, not our 0.2 s read timeout.
    with pytest.raises(requests.exceptions.ConnectionError) as caught:
        requests.get(server.url("/slow"), timeout=3.0)
    assert not isinstance(caught.value, requests.exceptions.Timeout)
    assert time.monotonic() - started >= 0.5


def test_a_timed_out_get_is_retried(install: Install, server: FaultyHTTPServer) -> None:
    install(timeout=0.2)
    server.push(hang(2.0), ok("second try"))
    assert requests.get(server.url("/t")).text == "second try"
    assert server.count("GET", "/t") == 2


# --- fallbacks ----------------------------------------------------------------------------------


def test_a_fallback_function_gets_the_failing_response(
    install: Install, server: FaultyHTTPServer
) -> None:
    seen: list[Any] = []

    def fallback(failure: Any) -> str:
        seen.append(failure)
        return "from the fallback"

    install(
        max_retries=1, downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=fallback),)
    )
    server.default = status(503)
    result: Any = requests.get(server.url("/f"))  # whatever the fallback returns
    assert result == "from the fallback"
    (failure,) = seen
    assert isinstance(failure, requests.Response)
    assert failure.status_code == 503
    (done,) = finished(install.events)  # type: ignore[attr-defined]
    assert (done.strategy, done.outcome) == (Strategy.FAILOVER, Outcome.FALLBACK)


def test_a_fallback_function_gets_the_exception_and_the_refusal(install: Install) -> None:
    seen: list[Any] = []

    def fallback(failure: Any) -> str:
        seen.append(failure)
        return "fallback"

    install(
        max_retries=0,
        failure_threshold=1,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=fallback),),
    )
    url = f"http://127.0.0.1:{closed_port()}/"
    results: list[Any] = [requests.get(url), requests.get(url)]  # the fallback's value
    assert results == ["fallback", "fallback"]
    refused, rejected = seen
    assert isinstance(refused, requests.exceptions.ConnectionError)
    assert not isinstance(refused, CircuitOpenError)
    assert isinstance(rejected, circuit_open_error_type())


def test_failover_sends_the_same_path_to_the_next_base_url(
    install: Install, server: FaultyHTTPServer
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
        response = requests.get(server.url("/items?id=7"))
        assert response.status_code == 200
        assert response.text == "from the backup"
        assert server.count() == 2
        assert [r.path for r in backup.requests] == ["/items?id=7"]
        assert backup.requests[0].headers["host"] == backup.authority


@pytest.mark.parametrize("timed", ["primary", "backup"])
def test_a_failover_request_gets_the_timeout_of_the_origin_it_goes_to(
    install: Install, server: FaultyHTTPServer, timed: str
) -> None:
    # The caller gave no timeout: each origin's own rule applies (its attempt timeout, or
    # else its request timeout), never the other origin's, and never none at all.
    with FaultyHTTPServer() as backup:
        quick = RetryPolicy(max_retries=0, attempt_timeout=0.3)
        install(
            max_retries=0,
            timeout=0.3 if timed == "primary" else 30.0,
            downstreams=(
                DownstreamOverride(
                    pattern=f"127.0.0.1:{server.port}",
                    retry=quick if timed == "primary" else None,
                    failover_urls=(backup.url(),),
                ),
                DownstreamOverride(
                    pattern=f"127.0.0.1:{backup.port}",
                    retry=quick if timed == "backup" else None,
                ),
            ),
        )
        server.default = status(503)
        backup.push(hang(10.0))
        started = time.monotonic()
        assert requests.get(server.url("/slow")).status_code == 503  # the primary's answer
        assert time.monotonic() - started < 5.0
        assert backup.count("GET", "/slow") == 1


def test_failover_when_the_breaker_is_open_even_for_a_post(
    install: Install, server: FaultyHTTPServer
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
        assert requests.post(server.url("/p"), data=b"x").status_code == 503  # not replay safe
        assert backup.count() == 0
        # The breaker is open: the primary never sees this one, so the backup may.
        assert requests.post(server.url("/p"), data=b"y").status_code == 200
        assert server.count() == 1
        assert [r.body for r in backup.requests] == [b"y"]


def test_without_a_working_fallback_the_caller_gets_the_primary_outcome(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(
        max_retries=0,
        downstreams=(
            DownstreamOverride(
                pattern="127.0.0.1", failover_urls=(f"http://127.0.0.1:{closed_port()}",)
            ),
        ),
    )
    server.push(status(503, body="primary"))
    response = requests.get(server.url("/x"))
    assert response.status_code == 503
    assert response.text == "primary"


def test_stale_if_error_serves_the_last_good_response(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(
        max_retries=1,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    server.push(ok("fresh", headers={"ETag": '"v1"'}))
    assert requests.get(server.url("/doc")).text == "fresh"
    server.default = status(503)
    response = requests.get(server.url("/doc"))
    assert response.status_code == 200
    assert response.text == "fresh"
    assert response.headers[STALE_HEADER] == "1"
    assert response.headers["ETag"] == '"v1"'
    assert int(response.headers["Age"]) >= 0
    (done,) = finished(install.events)  # type: ignore[attr-defined]
    assert done.outcome is Outcome.FALLBACK
    # Another URL, or the same URL with other credentials: nothing stale to serve.
    assert requests.get(server.url("/other")).status_code == 503
    other_user = requests.get(server.url("/doc"), headers={"Authorization": "Bearer other"})
    assert other_user.status_code == 503


def test_stale_entries_expire(install: Install, server: FaultyHTTPServer) -> None:
    install(
        max_retries=0,
        downstreams=(
            DownstreamOverride(pattern="127.0.0.1", stale_if_error=True, stale_max_age=0.1),
        ),
    )
    server.push(ok("fresh"))
    requests.get(server.url("/doc"))
    time.sleep(0.15)
    server.default = status(503)
    assert requests.get(server.url("/doc")).status_code == 503


def test_serving_a_stale_copy_does_not_make_it_fresh(server: FaultyHTTPServer) -> None:
    # A stale copy served is not a new good answer: keeping it again would restart its age,
    # and an outage with steady traffic would be served the same copy for ever, aged 0.
    clock = FakeClock()
    settings = make_settings(
        max_retries=0,
        downstreams=(
            DownstreamOverride(pattern="127.0.0.1", stale_if_error=True, stale_max_age=10.0),
        ),
    )
    hook = RequestsIntegration()
    hook.install(dataclasses.replace(settings, runtime=Runtime(clock=clock)))
    try:
        server.push(ok("fresh"))
        assert requests.get(server.url("/doc")).text == "fresh"
        server.default = status(503)
        for age in (4, 8):
            clock.advance(4.0)
            stale = requests.get(server.url("/doc"))
            assert (stale.text, stale.headers["Age"]) == ("fresh", str(age))
        clock.advance(4.0)  # 12 s after the good answer: past stale_max_age
        assert requests.get(server.url("/doc")).status_code == 503
    finally:
        hook.uninstall()


def test_stale_if_error_keys_on_the_request_as_sent(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    alice, bob = requests.Session(), requests.Session()
    alice.params = {"tenant": "alice"}
    bob.params = {"tenant": "bob"}
    keyed = {"X-API-Key": "key-A", "traceparent": f"00-{'1' * 32}-{'1' * 16}-01"}
    server.push(ok("alice's data"), ok("key A's data"), ok("search a"))
    assert alice.get(server.url("/account")).text == "alice's data"
    assert requests.get(server.url("/me"), headers=keyed).text == "key A's data"
    assert requests.get(server.url("/search"), json={"q": "a"}).text == "search a"
    server.default = status(503)
    # The session's params are part of the URL sent: bob's request is another request.
    assert bob.get(server.url("/account")).status_code == 503
    assert server.requests[-1].path == "/account?tenant=bob"
    assert alice.get(server.url("/account")).text == "alice's data"
    # Any header may select what the answer is, or for whom; a trace context does not.
    assert requests.get(server.url("/me"), headers={"X-API-Key": "key-B"}).status_code == 503
    served = requests.get(
        server.url("/me"),
        headers={**keyed, "traceparent": f"00-{'2' * 32}-{'2' * 16}-01"},
    )
    assert (served.text, served.headers[STALE_HEADER]) == ("key A's data", "1")
    # So does the body of a GET.
    assert requests.get(server.url("/search"), json={"q": "b"}).status_code == 503
    assert requests.get(server.url("/search"), json={"q": "a"}).text == "search a"


def test_a_stale_copy_looks_like_a_received_response(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    server.push(ok("fresh"))
    fresh = requests.get(server.url("/doc?v=1"))
    server.default = status(503)
    stale = requests.get(server.url("/doc?v=1"))
    assert stale.headers[STALE_HEADER] == "1"
    assert (stale.request.method, stale.request.url) == ("GET", fresh.url)
    assert (stale.url, stale.reason) == (fresh.url, fresh.reason)
    assert stale.elapsed == datetime.timedelta(0)
    assert stale.history == []
    stale.close()


def test_a_stale_copy_of_a_compressed_response_describes_the_body_it_holds(
    install: Install, server: FaultyHTTPServer
) -> None:
    # The copy kept is the decoded body: the gzip coding and the wire length no longer apply
    # (code that relays the response's headers and content would send a broken message).
    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    server.push(ok(gzip.compress(b"fresh " * 50), headers={"Content-Encoding": "gzip"}))
    assert requests.get(server.url("/zipped")).content == b"fresh " * 50
    server.default = status(503)
    stale = requests.get(server.url("/zipped"))
    assert stale.headers[STALE_HEADER] == "1"
    assert stale.content == b"fresh " * 50
    assert "Content-Encoding" not in stale.headers
    assert stale.headers["Content-Length"] == str(len(stale.content))
    assert stale.headers["Content-Type"] == "text/plain"


def test_a_request_that_does_not_follow_redirects_is_not_served_a_redirected_copy(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(
        max_retries=0,
        downstreams=(DownstreamOverride(pattern="127.0.0.1", stale_if_error=True),),
    )
    server.push(status(302, {"Location": "/final"}), ok("the final page"))
    assert requests.get(server.url("/start")).text == "the final page"
    server.default = status(503)
    # Its answer would have been the 302 itself, not the page it leads to.
    assert requests.get(server.url("/start"), allow_redirects=False).status_code == 503
    served = requests.get(server.url("/start"), allow_redirects=True)
    assert (served.text, served.headers[STALE_HEADER]) == ("the final page", "1")


def failover_to(primary: FaultyHTTPServer, *backups: FaultyHTTPServer) -> DownstreamOverride:
    return DownstreamOverride(
        pattern=f"127.0.0.1:{primary.port}",
        failover_urls=tuple(backup.url() for backup in backups),
    )


@pytest.mark.parametrize("answer", [hang(1.0), status(503)], ids=["timeout", "503"])
def test_a_post_that_reached_a_failover_url_goes_to_no_other(
    install: Install, server: FaultyHTTPServer, answer: Any
) -> None:
    with FaultyHTTPServer() as backup, FaultyHTTPServer() as spare:
        install(
            max_retries=0,
            failure_threshold=1,
            timeout=0.3,
            downstreams=(failover_to(server, backup, spare),),
        )
        server.default = status(503)
        # A POST that fails is not failed over; the primary's breaker opens.
        assert requests.post(server.url("/warm-up")).status_code == 503
        backup.push(answer)
        # Refused by the primary's breaker: the backup may have it, but it may have acted on
        # it too, so the spare must not get it. The caller gets the backup's answer: the
        # primary's "circuit open" would say the POST was never sent.
        if answer.kind == "respond":
            assert requests.post(server.url("/pay"), json={"amount": 1}).status_code == 503
        else:
            with pytest.raises(requests.Timeout) as raised:
                requests.post(server.url("/pay"), json={"amount": 1})
            assert not isinstance(raised.value, CircuitOpenError)
            # requests' own context, as without raptor: nothing of ours in the way.
            assert "FallbackDeclined" not in repr(raised.value.__context__)
        assert [each.count("POST", "/pay") for each in (server, backup, spare)] == [0, 1, 0]
        # The primary call is reported as it ended (refused), never as a served fallback.
        primary = [f for f in finished(install.events) if f.service == f"http://{server.authority}"]
        assert primary[-1].outcome is Outcome.REJECTED


def test_a_post_refused_by_a_failover_urls_own_breaker_goes_on_to_the_next(
    install: Install, server: FaultyHTTPServer
) -> None:
    with FaultyHTTPServer() as backup, FaultyHTTPServer() as spare:
        install(
            max_retries=0,
            failure_threshold=1,
            downstreams=(failover_to(server, backup, spare),),
        )
        server.default = backup.default = status(503)
        assert requests.post(server.url("/warm-up")).status_code == 503
        assert requests.get(backup.url("/warm-up")).status_code == 503  # both breakers open
        spare.push(ok("paid"))
        assert requests.post(server.url("/pay"), json={"amount": 1}).text == "paid"
        assert [each.count("POST", "/pay") for each in (server, backup, spare)] == [0, 0, 1]


def test_a_fallback_function_that_raises_releases_the_streamed_primary(
    install: Install, server: FaultyHTTPServer
) -> None:
    class Unavailable(Exception):
        pass

    raised = Unavailable("try later")

    def fallback(failure: Any) -> Any:
        raise raised

    install(
        max_retries=0, downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=fallback),)
    )
    session = requests.Session()
    # One connection, and waiting for it blocks: an unreleased response would hold it.
    session.mount(
        "http://",
        requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1, pool_block=True),
    )
    server.push(status(503))
    with pytest.raises(Unavailable) as caught:
        session.get(server.url("/a"), stream=True)
    assert caught.value is raised
    answers: list[int] = []
    second = threading.Thread(
        target=lambda: answers.append(session.get(server.url("/b")).status_code), daemon=True
    )
    second.start()
    second.join(5.0)
    assert answers == [200]


def test_an_async_fallback_function_is_passed_over_by_sync_calls(
    install: Install, server: FaultyHTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def cached_answer(failure: Any) -> str:
        return "from the cache"

    def wrapped(failure: Any) -> Any:  # async, though it does not look it
        return cached_answer(failure)

    for fallback in (cached_answer, wrapped):
        install(
            max_retries=0,
            downstreams=(DownstreamOverride(pattern="127.0.0.1", fallback=fallback),),
        )
        server.default = status(503)
        with caplog.at_level(logging.WARNING, logger="otel_raptor"):
            first = requests.get(server.url("/a"))
            second = requests.get(server.url("/a"))
        assert (first.status_code, second.status_code) == (503, 503)  # as without a fallback
        (warning,) = [r for r in caplog.records if fallback.__qualname__ in r.getMessage()]
        assert "async" in warning.getMessage()
        assert not any(
            done.outcome is Outcome.FALLBACK
            for done in finished(install.events)  # type: ignore[attr-defined]
        )
        caplog.clear()


# --- staying out of the way ---------------------------------------------------------------------


def test_suppressed_requests_pass_through_untouched(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(failure_threshold=1)
    server.push(status(503), ok())
    with suppress_instrumentation():
        assert requests.get(server.url("/export")).status_code == 503
        assert requests.get(server.url("/export")).status_code == 200
    assert server.count() == 2
    assert install.events == []  # type: ignore[attr-defined]


def test_a_disabled_downstream_is_left_alone(install: Install, server: FaultyHTTPServer) -> None:
    install(downstreams=(DownstreamOverride(pattern="127.0.0.1", enabled=False),))
    server.push(status(503))
    assert requests.get(server.url("/")).status_code == 503
    assert server.count() == 1


def test_our_own_failure_never_reaches_the_app(
    install: Install,
    server: FaultyHTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    install()
    _reset_for_tests()

    def broken(self: OriginTable, prefix: str) -> None:
        raise RuntimeError("bug in otel_raptor")

    monkeypatch.setattr(OriginTable, "for_prefix", broken)
    server.push(status(503))
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        assert requests.get(server.url("/")).status_code == 503
    assert server.count() == 1
    assert "requests.describe" in caplog.text


def test_our_own_failure_after_a_failing_response_hands_the_response_back(
    install: Install,
    server: FaultyHTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The attempt loop fails on the 503: the call ends as it would without raptor, with
    # the response itself, never raptor's internal FailingResponse.
    install()
    _reset_for_tests()

    def broken(self: AttemptLoop, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug in otel_raptor")

    monkeypatch.setattr(AttemptLoop, "failed", broken)
    server.push(status(503))
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        response = requests.get(server.url("/"))
    assert (response.status_code, response.text) == (503, "Service Unavailable")
    assert server.count() == 1
    assert "drive.failed" in caplog.text


def test_non_http_urls_are_left_to_requests(install: Install) -> None:
    install()
    with pytest.raises(requests.exceptions.InvalidSchema):
        requests.get("ftp://example.test/file")
    with pytest.raises(requests.exceptions.MissingSchema):
        requests.get("no-scheme")


# --- installing ---------------------------------------------------------------------------------


def test_install_twice_never_wraps_twice_and_uninstall_restores_the_original() -> None:
    first, second = RequestsIntegration(), RequestsIntegration()
    first.install(make_settings())
    wrapped = vars(requests.Session)["request"]
    second.install(make_settings())
    assert vars(requests.Session)["request"] is wrapped
    assert wrapped.__wrapped__ is ORIGINAL_REQUEST
    assert second.installed
    assert not first.installed
    first.uninstall()  # not the current installation: leaves the hook to `second`
    assert vars(requests.Session)["request"] is wrapped
    second.uninstall()
    assert requests.Session.request is ORIGINAL_REQUEST
    second.uninstall()
    assert requests.Session.request is ORIGINAL_REQUEST


def test_instrument_uninstrument_instrument(server: FaultyHTTPServer) -> None:
    hook = RequestsIntegration()
    for _ in range(2):
        hook.install(make_settings())
        server.push(status(503), ok())
        assert requests.get(server.url("/")).status_code == 200
        hook.uninstall()
        assert requests.Session.request is ORIGINAL_REQUEST
    server.push(status(503))
    assert requests.get(server.url("/")).status_code == 503


def test_a_hook_wrapped_over_by_someone_else_passes_through_after_uninstall(
    server: FaultyHTTPServer,
) -> None:
    def other(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    hook = RequestsIntegration()
    hook.install(make_settings())
    _wrapping.wrap(requests.Session, "request", other)
    try:
        hook.uninstall()
        assert _wrapping.is_wrapped(requests.Session, "request", other)
        server.push(status(503))
        assert requests.get(server.url("/")).status_code == 503  # ours passes through
        hook.install(make_settings())  # finds its layer: no second one
        layers = vars(requests.Session)["request"]
        assert layers.__wrapped__.__wrapped__ is ORIGINAL_REQUEST
        server.push(status(503), ok())
        assert requests.get(server.url("/")).status_code == 200
        hook.uninstall()
    finally:
        assert _wrapping.unwrap(requests.Session, "request", other)
        _wrapping.unwrap(requests.Session, "request", integration._request_hook)
    assert requests.Session.request is ORIGINAL_REQUEST


def test_the_error_class_is_built_once_and_importable() -> None:
    cls = circuit_open_error_type()
    assert cls is circuit_open_error_type()
    assert cls.__name__ == "RequestsCircuitOpen"
    assert cls.__module__ == "otel_raptor.integrations.requests"
    from otel_raptor.integrations.requests import RequestsCircuitOpen

    assert RequestsCircuitOpen is cls
    error = cls("http://a:80", 1.5, request=None)
    assert str(error) == "circuit breaker 'http://a:80' is open; next probe in 1.5s"
    assert isinstance(error, requests.exceptions.ConnectionError)
    with pytest.raises(AttributeError):
        _ = integration.NoSuchThing


# --- the fast lane ------------------------------------------------------------------------------


def _hook_name() -> str:
    return str(vars(requests.Session)["request"].__code__.co_qualname)


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
    with requests.Session() as session:
        for method in ("GET", "GET", "GET", "HEAD", "GET", "POST", "GET", "GET", "GET"):
            try:
                # No timeout given: the origin's default applies, in the lane too.
                response = session.request(method, server.url("/"))
                seen.append((response.status_code, response.text))
            except requests.RequestException as error:
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
            monkeypatch.setattr(integration, "suppression_keys", lambda: None)
        with FaultyHTTPServer() as server:
            runtime = install(max_retries=1, failure_threshold=2)
            expected = "_general_request_hook" if general else "_fast_request_hook"
            assert _hook_name().startswith(expected)  # the hook this pass means to test
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
    assert fast[-3:-1] == ["RequestsCircuitOpen", (10, "open")]
    assert fast[-1] == 6  # a deposit per call that reached the server, none per refusal


def test_the_fast_lane_gives_a_call_without_a_timeout_the_origins(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(timeout=0.3, max_retries=0)
    server.push(ok("first"), hang(5))
    with requests.Session() as session:
        assert session.get(server.url("/")).text == "first"  # opens the lane
        assert _hook_name().startswith("_fast_request_hook")
        started = time.monotonic()
        with pytest.raises(requests.exceptions.Timeout):
            session.get(server.url("/"))
    assert time.monotonic() - started < 3


def test_suppressed_requests_pass_the_fast_lane_untouched(
    install: Install, server: FaultyHTTPServer
) -> None:
    install(failure_threshold=1)
    server.push(ok(), status(503), ok())
    with requests.Session() as session:
        assert session.get(server.url("/export")).status_code == 200  # opens the lane
        with suppress_instrumentation():
            assert session.get(server.url("/export")).status_code == 503
            assert session.get(server.url("/export")).status_code == 200
    assert server.count() == 3
    assert install.events == []  # type: ignore[attr-defined]


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
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        response = requests.get(server.url("/"))
    assert response.text == "guarded"  # retried: describe and the loop took it
    assert server.count() == 2
    assert "requests.fast_lane" in caplog.text


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
    with caplog.at_level(logging.WARNING, logger="otel_raptor"), requests.Session() as session:
        # The origin's first request is described (the general hook): it opens the lane.
        assert session.get(server.url("/")).text == "zeroth"
        monkeypatch.setattr(CircuitBreaker, "record_success_since", broken)
        assert [session.get(server.url("/")).text for _ in range(2)] == ["first", "second"]
    assert server.count() == 3
    assert caplog.text.count("requests.fast_lane_success") == 1  # reported once
    [(_, breaker)] = runtime.breakers.items()
    # It would count failures only: it stops judging.
    assert not breaker.judging


def test_the_fast_lane_keeps_alternating_origins_apart(install: Install) -> None:
    # The lane remembers the last origin it found (OriginTable.recent): a request to another
    # one must never be judged by, or refused for, the remembered one.
    runtime = install(failure_threshold=2, max_retries=0)
    with FaultyHTTPServer() as failing, FaultyHTTPServer() as healthy:
        failing.push(ok(), status(500), status(500))
        seen = []
        with requests.Session() as session:
            for _ in range(4):
                for server in (failing, healthy):
                    try:
                        seen.append(session.get(server.url("/"), timeout=5).status_code)
                    except requests.ConnectionError as error:
                        seen.append(type(error).__name__)
        assert seen == [200, 200, 500, 200, 500, 200, "RequestsCircuitOpen", 200]
        assert (failing.count(), healthy.count()) == (3, 4)
    states = sorted(state_of(breaker).value for _, breaker in runtime.breakers.items())
    assert states == ["closed", "open"]
