"""Requests answered by a mocking library (responses, requests-mock, respx).

A test suite's mocked ``503`` is the code under test, not a downstream: retrying it changes
what the test sees (call counts, one-shot mocks consumed) and counting it opens the origin's
breaker, so that every later test's request there is refused. Apps often instrument at import
time, so raptor is active in their test suites. Real network I/O (a loopback server, a mock's
pass-through) stays guarded, as does a library merely imported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
import requests_mock
import responses
import respx

from otel_raptor import CircuitOpenError
from otel_raptor.config import RaptorConfig
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.events import Event, RecoveryFinished
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.integrations.requests import RequestsIntegration
from otel_raptor.runtime.state import Runtime
from tests.support.faulty_http import FaultyHTTPServer, ok, status

URL = "http://api.example.test/items"

Install = Callable[..., Runtime]


@pytest.fixture
def install() -> Iterator[Install]:
    """Installs both HTTP integrations (3 retries, a breaker that opens at the second counted
    failure and stays open) and records the runtime's events."""
    installed: list[RequestsIntegration | HttpxIntegration] = []
    events: list[Event] = []

    def run() -> Runtime:
        settings = IntegrationSettings(
            runtime=Runtime(),
            config=RaptorConfig(
                retry=RetryPolicy(max_retries=3, base_delay=0.01, max_delay=0.02),
                breaker=CircuitBreakerConfig(
                    failure_threshold=2, recovery_timeout=3600, recovery_jitter=0.0
                ),
            ),
        )
        settings.runtime.bus.subscribe(events.append)
        for hook in (RequestsIntegration(), HttpxIntegration()):
            hook.install(settings)
            installed.append(hook)
        run.events = events  # type: ignore[attr-defined]
        return settings.runtime

    yield run
    for hook in installed:
        hook.uninstall()


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


def closed(runtime: Runtime) -> bool:
    return all(breaker.state is CircuitState.CLOSED for _, breaker in runtime.breakers.items())


def recoveries(install: Install) -> list[Event]:
    events: list[Event] = install.events  # type: ignore[attr-defined]
    return [e for e in events if isinstance(e, RecoveryFinished)]


# --- requests: responses -----------------------------------------------------------------------


def test_a_503_mocked_by_responses_is_sent_once_and_never_counted(install: Install) -> None:
    runtime = install()
    with responses.RequestsMock() as mocked:
        mocked.get(URL, status=503)
        for _ in range(3):  # as three tests would: none is refused by a breaker
            assert requests.get(URL).status_code == 503
        assert len(mocked.calls) == 3
    assert closed(runtime)
    assert recoveries(install) == []


def test_an_error_raised_by_responses_is_raised_once_and_never_counted(install: Install) -> None:
    runtime = install()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.get(URL, body=requests.exceptions.ConnectionError("mocked"))
        for _ in range(2):
            with pytest.raises(requests.exceptions.ConnectionError, match="mocked"):
                requests.get(URL)
        with pytest.raises(requests.exceptions.ConnectionError, match="Connection refused by"):
            requests.get(URL + "/unregistered")  # responses' own answer to an unknown URL
        assert len(mocked.calls) == 3
    assert closed(runtime)


def test_a_real_503_passed_through_by_responses_is_still_retried(
    install: Install, server: FaultyHTTPServer
) -> None:
    install()
    server.push(status(503), ok("fine"))
    with responses.RequestsMock() as mocked:
        mocked.add_passthru(server.url("/"))
        assert requests.get(server.url("/p")).text == "fine"
    assert server.count() == 2


# --- requests: requests-mock -------------------------------------------------------------------


def test_a_503_mocked_by_requests_mock_is_sent_once_and_never_counted(install: Install) -> None:
    runtime = install()
    with requests_mock.Mocker() as mocked:
        mocked.get(URL, status_code=503)
        for _ in range(3):
            assert requests.get(URL).status_code == 503
        assert mocked.call_count == 3
        with pytest.raises(requests_mock.NoMockAddress):
            requests.get(URL + "/unregistered")
        mocked.get(URL + "/timeout", exc=requests.exceptions.ConnectTimeout)
        with pytest.raises(requests.exceptions.ConnectTimeout):
            requests.get(URL + "/timeout")
        assert mocked.call_count == 5
    assert closed(runtime)
    assert recoveries(install) == []


def test_a_real_503_requests_mock_lets_through_is_still_retried(
    install: Install, server: FaultyHTTPServer
) -> None:
    install()
    server.push(status(503), ok("fine"))
    with requests_mock.Mocker(real_http=True) as mocked:
        mocked.get(URL, status_code=503)
        assert requests.get(server.url("/p")).text == "fine"
    assert server.count() == 2


@pytest.mark.parametrize("library", ["responses", "requests-mock"])
def test_a_mocked_request_goes_through_a_breaker_that_is_open(
    install: Install, library: str
) -> None:
    # Opened by real failures earlier: the mock still answers, as without raptor.
    runtime = install()
    mocker: Any = responses.RequestsMock() if library == "responses" else requests_mock.Mocker()
    with mocker as mocked:
        mocked.get(URL)
        assert requests.get(URL).status_code == 200  # makes the origin's breaker
        ((_, breaker),) = runtime.breakers.items()
        breaker.force_open()
        assert requests.get(URL).status_code == 200
        assert breaker.state is CircuitState.OPEN
    assert recoveries(install) == []


# --- requests: passed through, through a breaker that is not closed ------------------------------


def _open_by_passed_through_503s(runtime: Runtime, server: FaultyHTTPServer) -> int:
    """Opens the loopback origin's breaker with real ``503`` answers to requests the active
    mock passes through (each retried, each counted); returns how many the server got."""
    server.default = status(503)
    for _ in range(2):
        assert requests.get(server.url("/down")).status_code == 503
    ((_, breaker),) = runtime.breakers.items()
    assert breaker.state is CircuitState.OPEN
    assert server.count() > 2  # retried too
    return server.count()


def test_a_request_responses_passes_through_is_still_refused_by_a_breaker_that_is_open(
    install: Install, server: FaultyHTTPServer
) -> None:
    # As respx's pass_through(): a passed-through request goes to a real downstream, so an
    # open breaker refuses it; a request responses answers still goes through.
    runtime = install()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.add_passthru(server.url("/"))
        mocked.get(server.url("/mocked"), body="mocked")  # registered: answered, not passed
        sent = _open_by_passed_through_503s(runtime, server)
        with pytest.raises(CircuitOpenError):
            requests.get(server.url("/p"))
        with pytest.raises(requests.exceptions.ConnectionError):  # and as requests' own
            requests.post(server.url("/p"), data=b"x")
        assert requests.get(server.url("/mocked")).text == "mocked"
        # A response registered with passthrough=True passes through too; a mocked response
        # that matches only on its query parameters (params=) is still answered.
        mocked.add(responses.PassthroughResponse(responses.GET, server.url("/pt")))
        mocked.get(
            server.url("/q"),
            body="by query",
            match=[responses.matchers.query_param_matcher({"a": "1"})],
        )
        with pytest.raises(CircuitOpenError):
            requests.get(server.url("/pt"))
        assert requests.get(server.url("/q"), params={"a": "1"}).text == "by query"
        with pytest.raises(CircuitOpenError):  # no match: to the passthru prefix
            requests.get(server.url("/q"), params={"a": "2"})
    assert server.count() == sent  # nothing sent since the breaker opened


def test_a_request_requests_mock_passes_through_is_still_refused_by_a_breaker_that_is_open(
    install: Install, server: FaultyHTTPServer
) -> None:
    runtime = install()
    with requests_mock.Mocker(real_http=True) as mocked:
        mocked.get(server.url("/mocked"), text="mocked")
        mocked.get(server.url("/h"), text="by header", request_headers={"X-Test": "1"})
        sent = _open_by_passed_through_503s(runtime, server)
        with pytest.raises(CircuitOpenError):  # no matcher: real_http sends it
            requests.get(server.url("/p"))
        assert requests.get(server.url("/mocked")).text == "mocked"
        assert requests.get(server.url("/h"), headers={"X-Test": "1"}).text == "by header"
        with pytest.raises(CircuitOpenError):  # the header matcher does not match
            requests.get(server.url("/h"), headers={"X-Test": "2"})
        # A matcher function of the app's own cannot be read without running it: the
        # request goes through as without raptor (here the mock answers it).
        mocked.get(server.url("/f"), text="by function", additional_matcher=lambda r: True)
        assert requests.get(server.url("/f")).text == "by function"
    with requests_mock.Mocker() as mocked:  # real_http on one matcher only
        mocked.get(server.url("/pt"), real_http=True)
        mocked.get(server.url("/mocked"), text="mocked")
        with pytest.raises(CircuitOpenError):
            requests.get(server.url("/pt"))
        assert requests.get(server.url("/mocked")).text == "mocked"
        with pytest.raises(requests_mock.NoMockAddress):  # requests-mock's own answer
            requests.get(server.url("/unregistered"))
    assert server.count() == sent  # nothing sent since the breaker opened


# --- httpx: respx ------------------------------------------------------------------------------


@pytest.mark.parametrize("using", ["httpcore", "httpx"])
def test_a_503_mocked_by_respx_is_sent_once_and_never_counted(install: Install, using: str) -> None:
    runtime = install()
    with respx.mock(using=using) as mocked:
        route = mocked.get(URL).respond(503)
        failing = mocked.get(URL + "/down").mock(side_effect=httpx.ConnectError)
        with httpx.Client() as client:
            for _ in range(3):
                assert client.get(URL).status_code == 503
            with pytest.raises(httpx.ConnectError):
                client.get(URL + "/down")

        async def send() -> int:
            async with httpx.AsyncClient() as async_client:
                return (await async_client.get(URL)).status_code

        assert asyncio.run(send()) == 503
        assert route.call_count == 4
        assert failing.call_count == 1
    assert closed(runtime)
    assert recoveries(install) == []


def test_a_real_503_passed_through_by_respx_is_still_retried(
    install: Install, server: FaultyHTTPServer
) -> None:
    install()
    server.push(status(503), ok("fine"))
    with respx.mock() as mocked:
        mocked.route(host="127.0.0.1").pass_through()
        with httpx.Client() as client:
            assert client.get(server.url("/p")).text == "fine"
    assert server.count() == 2


# --- imported, not active ----------------------------------------------------------------------


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_a_real_503_is_still_retried_and_counted_with_the_libraries_imported(
    install: Install, server: FaultyHTTPServer, library: str
) -> None:
    runtime = install()
    assert all((responses, requests_mock, respx))  # imported, none started
    server.push(status(503), ok("fine"))
    get: Any = requests.get if library == "requests" else httpx.get
    assert get(server.url("/a")).text == "fine"
    assert server.count() == 2
    server.default = status(503)
    for _ in range(2):
        assert get(server.url("/b")).status_code == 503
    assert not closed(runtime)  # a real downstream's failures count


# --- an adapter or transport of the app's own --------------------------------------------------


class _CachingAdapter(requests.adapters.HTTPAdapter):
    """An app's adapter that answers from its own store (a cache, say): not a mock's."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.sent += 1
        response = requests.Response()
        response.status_code = 503
        response._content = b"stale"
        response.request = request
        response.url = request.url or ""
        response.connection = self
        return response


def test_an_adapter_of_the_app_own_is_still_guarded_while_responses_is_active(
    install: Install,
) -> None:
    install()
    adapter = _CachingAdapter()
    with responses.RequestsMock(assert_all_requests_are_fired=False), requests.Session() as s:
        s.mount("http://", adapter)
        assert s.get(URL).status_code == 503
    assert adapter.sent == 4  # retried, as before: its send is the app's, not responses'


class _AppTransport(httpx.HTTPTransport):
    """An app's subclass of httpx's transport that answers from its own store."""

    sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        type(self).sent += 1
        return httpx.Response(503, request=request)


def test_a_transport_of_the_app_own_is_still_guarded_while_mocks_are_active(
    install: Install,
) -> None:
    install()
    with respx.mock(assert_all_called=False), httpx.Client(transport=_AppTransport()) as client:
        assert client.get(URL).status_code == 503
    assert _AppTransport.sent == 4  # its handle_request is the app's, not the mocks'


# --- httpx: through a breaker that is not closed -----------------------------------------------


def _send(is_async: bool, url: str, transport: Any = None, method: str = "GET") -> httpx.Response:
    """One request through a new ``httpx.Client`` or ``httpx.AsyncClient``."""
    if not is_async:
        with httpx.Client(transport=transport) as client:
            return client.request(method, url)

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.request(method, url)

    return asyncio.run(send())


def _open_breaker(runtime: Runtime) -> Any:
    ((_, breaker),) = runtime.breakers.items()
    breaker.force_open()
    return breaker


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("using", ["httpcore", "httpx"])
def test_a_request_mocked_by_respx_goes_through_a_breaker_that_is_open(
    install: Install, using: str, is_async: bool
) -> None:
    # An app's test suite whose earlier test opened the breaker: respx still answers each
    # later test's request, as without raptor (and as requests' mocking libraries do).
    runtime = install()
    with respx.mock(using=using) as mocked:
        route = mocked.get(URL).respond(200, text="mocked")
        failing = mocked.get(URL + "/down").respond(503)
        assert _send(is_async, URL).text == "mocked"  # makes the origin's breaker
        breaker = _open_breaker(runtime)
        assert _send(is_async, URL).text == "mocked"
        assert _send(is_async, URL + "/down").status_code == 503
        assert breaker.state is CircuitState.OPEN
        assert (route.call_count, failing.call_count) == (2, 1)
    assert recoveries(install) == []


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_respx_answer_to_an_unmatched_request_goes_through_a_breaker_that_is_open(
    install: Install, is_async: bool
) -> None:
    # respx refuses a request no route matches with its own error (its ``assert_all_mocked``),
    # or answers 200 without it: either way nothing leaves the process.
    runtime = install()
    with respx.mock(assert_all_called=False) as mocked:
        mocked.get(URL)
        _send(is_async, URL)
        _open_breaker(runtime)
        with pytest.raises(respx.models.AllMockedAssertionError):
            _send(is_async, URL + "/unregistered")
    with respx.mock(assert_all_mocked=False):
        assert _send(is_async, URL + "/unregistered").status_code == 200
    assert recoveries(install) == []


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("using", ["httpcore", "httpx"])
def test_a_request_respx_passes_through_is_still_refused_by_a_breaker_that_is_open(
    install: Install, server: FaultyHTTPServer, using: str, is_async: bool
) -> None:
    runtime = install()
    with respx.mock(using=using, assert_all_called=False) as mocked:
        mocked.get(server.url("/mocked")).respond(200)  # a route before it that does not match
        mocked.route(host="127.0.0.1").pass_through()
        assert _send(is_async, server.url("/p")).status_code == 200
        _open_breaker(runtime)
        with pytest.raises(CircuitOpenError):
            _send(is_async, server.url("/p"))
        assert _send(is_async, server.url("/mocked")).status_code == 200  # respx's own answer
    assert server.count() == 1


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_request_to_a_mock_transport_goes_through_a_breaker_that_is_open(
    install: Install, is_async: bool
) -> None:
    runtime = install()
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(503 if request.url.path.endswith("/down") else 200)

    transport = httpx.MockTransport(handler)
    assert _send(is_async, URL, transport).status_code == 200
    breaker = _open_breaker(runtime)
    assert _send(is_async, URL, transport).status_code == 200
    assert _send(is_async, URL + "/down", transport).status_code == 503
    assert breaker.state is CircuitState.OPEN
    assert calls == ["/items", "/items", "/items/down"]
    assert recoveries(install) == []


def test_an_app_network_transport_is_still_refused_by_a_breaker_that_is_open_under_respx(
    install: Install,
) -> None:
    # respx active, and answering this very URL, changes nothing for a transport of the
    # app's own: its handle_request is the app's, not respx's.
    runtime = install()
    with respx.mock(assert_all_called=False) as mocked:
        mocked.get(URL).respond(200)
        assert _send(False, URL).status_code == 200  # makes the origin's breaker
        _open_breaker(runtime)
        before = _AppTransport.sent
        with pytest.raises(CircuitOpenError):
            _send(False, URL, _AppTransport())
        assert _AppTransport.sent == before


class _Logging(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """An app's logging wrapper around httpx's own transport, which it names ``transport``."""

    def __init__(self, is_async: bool) -> None:
        self.transport: Any = httpx.AsyncHTTPTransport() if is_async else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response: httpx.Response = self.transport.handle_request(request)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response: httpx.Response = await self.transport.handle_async_request(request)
        return response

    # As a wrapper must, so that closing the client closes the inner transport's connections.
    def close(self) -> None:
        self.transport.close()

    async def aclose(self) -> None:
        await self.transport.aclose()


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_503_respx_mocks_behind_a_wrapper_is_sent_once_and_goes_through_an_open_breaker(
    install: Install, is_async: bool
) -> None:
    runtime = install()
    with respx.mock() as mocked:
        route = mocked.get(URL).respond(503)
        assert _send(is_async, URL, _Logging(is_async)).status_code == 503
        assert route.call_count == 1  # not retried
        assert closed(runtime)
        _open_breaker(runtime)
        assert _send(is_async, URL, _Logging(is_async)).status_code == 503
        assert route.call_count == 2
    assert recoveries(install) == []


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_request_respx_passes_through_behind_a_wrapper_is_still_guarded(
    install: Install, server: FaultyHTTPServer, is_async: bool
) -> None:
    runtime = install()
    server.push(status(503), ok("fine"))
    with respx.mock() as mocked:
        mocked.route(host="127.0.0.1").pass_through()
        assert _send(is_async, server.url("/p"), _Logging(is_async)).text == "fine"
        assert server.count() == 2  # retried
        _open_breaker(runtime)
        with pytest.raises(CircuitOpenError):
            _send(is_async, server.url("/p"), _Logging(is_async))
    assert server.count() == 2


def test_a_slow_answer_respx_mocks_is_not_cut_off_at_the_attempt_timeout() -> None:
    # As an app served in the process: the mock answers when it answers, as without raptor;
    # raptor's attempt timeout is for downstreams.
    settings = IntegrationSettings(
        runtime=Runtime(),
        config=RaptorConfig(retry=RetryPolicy(max_retries=3, attempt_timeout=0.05)),
    )
    hook = HttpxIntegration()
    hook.install(settings)

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return httpx.Response(200, text="slow")

    try:
        with respx.mock() as mocked:
            route = mocked.get(URL).mock(side_effect=slow)
            assert _send(True, URL).text == "slow"
            assert route.call_count == 1
    finally:
        hook.uninstall()
