"""Virtual hosts behind one address: a request whose ``Host`` header names another host than
its URL's is judged on that host's downstream (its own breaker), so one dead virtual host
behind an ingress never gets its healthy neighbours at the same ``IP:port`` refused.

Over real sockets: one loopback server answers per ``Host`` header (``a.example`` dead, with
a ``503`` or a connection reset; ``b.example`` healthy), reached as ``http://127.0.0.1:port``
by requests and httpx (sync and async), with the Host set per request and per session or
client. Then the bounds: a flood of distinct ``Host`` values keeps every table bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
from requests.structures import CaseInsensitiveDict

from otel_raptor import CircuitBreakerConfig, RetryPolicy
from otel_raptor.config import RaptorConfig
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations import httpx as raptor_httpx
from otel_raptor.integrations import requests as raptor_requests
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import downstream_of, virtual_host
from otel_raptor.integrations._kit import MAX_TARGETS
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.integrations.requests import RequestsIntegration
from otel_raptor.runtime.drive import CallPlan
from otel_raptor.runtime.state import OTHER_SERVICE, Runtime
from tests.support.faulty_http import Action, FaultyHTTPServer, RecordedRequest, ok, reset, status

DEAD = "a.example"
HEALTHY = "b.example"


@dataclass(eq=False)
class VirtualHostServer(FaultyHTTPServer):
    """One address, several virtual hosts: each request is answered by the action of the host
    its ``Host`` header names (port left out), else by the script as usual."""

    by_host: dict[str, Action] = field(default_factory=dict)

    def _next_action(self, record: RecordedRequest) -> Action:
        action = super()._next_action(record)
        return self.by_host.get(record.headers.get("host", "").partition(":")[0], action)

    def count_host(self, host: str) -> int:
        return sum(1 for r in self.requests if r.headers.get("host", "").partition(":")[0] == host)


@pytest.fixture(params=["503", "reset"])
def server(request: pytest.FixtureRequest) -> Iterator[VirtualHostServer]:
    dead = status(503) if request.param == "503" else reset()
    with VirtualHostServer(by_host={DEAD: dead, HEALTHY: ok("b")}) as started:
        yield started


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    runtime = Runtime()
    settings = IntegrationSettings(
        runtime=runtime,
        config=RaptorConfig(
            retry=RetryPolicy(max_retries=0),
            breaker=CircuitBreakerConfig(
                failure_threshold=3, recovery_timeout=60.0, recovery_jitter=0.0
            ),
        ),
    )
    hooks = [RequestsIntegration(), HttpxIntegration()]
    for hook in hooks:
        hook.install(settings)
    yield runtime
    for hook in hooks:
        hook.uninstall()


def _requests_client(level: str, closing: ExitStack) -> Callable[[str, str], Any]:
    sessions: dict[str, requests.Session] = {}
    closing.callback(lambda: [session.close() for session in sessions.values()])

    def get(url: str, host: str) -> Any:
        if level == "request":
            session = sessions.setdefault("", requests.Session())
            return session.get(url, headers={"Host": host}, timeout=5)
        session = sessions.get(host)
        if session is None:
            session = sessions[host] = requests.Session()
            session.headers["host"] = host  # lower case: any spelling is the Host
        return session.get(url, timeout=5)

    return get


def _httpx_client(level: str, closing: ExitStack) -> Callable[[str, str], Any]:
    clients: dict[str, httpx.Client] = {}
    closing.callback(lambda: [client.close() for client in clients.values()])

    def get(url: str, host: str) -> Any:
        if level == "request":
            return clients.setdefault("", httpx.Client(timeout=5)).get(url, headers={"Host": host})
        client = clients.get(host)
        if client is None:
            client = clients[host] = httpx.Client(timeout=5, headers={"Host": host})
        return client.get(url)

    return get


def _httpx_async_client(level: str, closing: ExitStack) -> Callable[[str, str], Any]:
    def get(url: str, host: str) -> Any:
        async def send() -> Any:
            if level == "request":
                async with httpx.AsyncClient(timeout=5) as client:
                    return await client.get(url, headers={"Host": host})
            async with httpx.AsyncClient(timeout=5, headers={"Host": host}) as client:
                return await client.get(url)

        return asyncio.run(send())

    return get


CLIENTS = {
    "requests": _requests_client,
    "httpx": _httpx_client,
    "httpx-async": _httpx_async_client,
}


def _outcome(get: Callable[[str, str], Any], url: str, host: str) -> str:
    """``refused`` (raptor's fail-fast error), ``failed`` (the library's error) or the
    status code."""
    try:
        return str(get(url, host).status_code)
    except CircuitOpenError:
        return "refused"
    except (requests.RequestException, httpx.HTTPError):
        return "failed"


@pytest.mark.parametrize("level", ["request", "session"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_a_dead_virtual_host_never_gets_its_neighbour_at_the_same_address_refused(
    client: str, level: str, runtime: Runtime, server: VirtualHostServer
) -> None:
    with ExitStack() as closing:
        _judged_apart(CLIENTS[client](level, closing), runtime, server)


def _judged_apart(
    get: Callable[[str, str], Any], runtime: Runtime, server: VirtualHostServer
) -> None:
    url = server.url("/orders")
    dead = [_outcome(get, url, DEAD) for _ in range(6)]
    # A's own breaker opened on A's failures: the later calls never reached the server.
    assert dead[-1] == "refused", dead
    sent_to_dead = server.count_host(DEAD)
    assert sent_to_dead < 6
    # B, at the same 127.0.0.1:port, is judged on its own: never refused while A's is open.
    assert [_outcome(get, url, HEALTHY) for _ in range(10)] == ["200"] * 10
    assert server.count_host(HEALTHY) == 10
    assert runtime.breakers.get(f"http://{DEAD}:{server.port}").state.value == "open"
    assert _outcome(get, url, DEAD) == "refused"
    assert server.count_host(DEAD) == sent_to_dead
    # A call without a Host of its own is the address's, whose breaker A never touched.
    with requests.Session() as plain:
        assert plain.get(url, timeout=5).status_code == 200


def test_the_virtual_host_names_the_downstream_and_its_server_address(
    runtime: Runtime, server: VirtualHostServer
) -> None:
    with requests.Session() as session:
        session.get(server.url("/"), headers={"HOST": f"{HEALTHY}:{server.port}"}, timeout=5)
    service = f"http://{HEALTHY}:{server.port}"
    assert runtime.description(service) == {
        "server.address": HEALTHY,
        "server.port": server.port,
    }


def test_a_calls_host_set_to_none_drops_the_sessions_and_is_the_urls(
    runtime: Runtime, server: VirtualHostServer
) -> None:
    server.by_host.pop(HEALTHY)
    with requests.Session() as session:
        session.headers["Host"] = DEAD
        for _ in range(4):  # the session's Host: A's failures open A's breaker
            _outcome(lambda url, host: session.get(url, timeout=5), server.url("/"), DEAD)
        assert _outcome(lambda url, host: session.get(url, timeout=5), server.url("/"), "") == (
            "refused"
        )
        # requests drops the session's Host for a call whose own is None: sent to the URL's.
        answer = session.get(server.url("/"), headers={"host": None}, timeout=5)
        assert answer.status_code == 200


def test_a_sessions_host_under_a_bytes_name_is_its_virtual_host_on_the_fast_lane(
    runtime: Runtime, server: VirtualHostServer
) -> None:
    url = server.url("/orders")
    with requests.Session() as session:
        session.headers[b"Host"] = DEAD  # type: ignore[index]  # requests sends it as "Host"
        dead = [
            _outcome(lambda url, host: session.get(url, timeout=5), url, DEAD) for _ in "123456"
        ]
    assert dead[-1] == "refused", dead
    assert runtime.breakers.get(f"http://{DEAD}:{server.port}").state.value == "open"
    # The URL's own downstream never saw A's failures: a call without a Host is served.
    with requests.Session() as plain:
        assert plain.get(url, timeout=5).status_code == 200


# --- bounds -------------------------------------------------------------------------------------


def _flooded_runtime() -> tuple[Runtime, IntegrationSettings]:
    runtime = Runtime(max_services=64)
    return runtime, IntegrationSettings(runtime=runtime, config=RaptorConfig())


def _assert_bounded(runtime: Runtime, table: Any) -> None:
    assert len(table._by_host) <= MAX_TARGETS
    assert len(table._by_origin) <= MAX_TARGETS
    assert len(table._by_prefix) <= MAX_TARGETS
    assert len(runtime._services) <= 64
    assert len(runtime._downstreams) <= 64
    assert len(runtime._descriptions) <= 64


def test_ten_thousand_host_values_keep_requests_tables_bounded() -> None:
    runtime, settings = _flooded_runtime()
    installed = raptor_requests._Installed(settings)
    with requests.Session() as session:
        last = None
        for i in range(10_000):
            kwargs: dict[str, Any] = {"headers": {"Host": f"tenant-{i}.example"}}
            last = installed.describe(
                requests.Session.request, session, ("GET", "http://127.0.0.1:8080/"), kwargs
            )
    _assert_bounded(runtime, installed.table)
    # Past max_services a new virtual host is folded into ``other``, with no breaker.
    assert isinstance(last, CallPlan)
    assert last.route.downstream.service == OTHER_SERVICE
    installed.unmanage()


def test_ten_thousand_host_values_keep_httpx_tables_bounded() -> None:
    runtime, settings = _flooded_runtime()
    installed = raptor_httpx._Installed(settings)
    with httpx.Client() as client:
        for i in range(10_000):
            request = client.build_request(
                "GET", "http://127.0.0.1:8080/", headers={"Host": f"tenant-{i}.example"}
            )
            installed.describe(installed.sync_table, httpx.Client.send, client, request, {})
    _assert_bounded(runtime, installed.sync_table)
    installed.unmanage()


def test_a_long_host_value_is_never_kept() -> None:
    _, settings = _flooded_runtime()
    installed = raptor_requests._Installed(settings)
    with requests.Session() as session:
        padded = "x.example" + " " * 100_000
        installed.describe(
            requests.Session.request,
            session,
            ("GET", "http://127.0.0.1:8080/"),
            {"headers": {"Host": padded}},
        )
    assert all(len(str(key)) < 1000 for key in installed.table._by_host)
    installed.unmanage()


# --- what a Host header names --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("api.example", "api.example"),
        ("API.Example:8443", "api.example"),
        (b"api.example", "api.example"),
        ("[0:0::1]:80", "::1"),
        (" api.example ", "api.example"),
        ("", None),
        ("api example", None),
        ("user@api.example", None),
        ("api.example/path", None),
        ("[::1", None),
        ("a" * 300, None),
        (None, None),
        (42, None),
    ],
)
def test_what_a_host_value_names(value: object, host: str | None) -> None:
    assert virtual_host(value) == host


def test_a_host_header_puts_its_host_in_the_urls_downstream() -> None:
    url = "http://10.0.0.7:8080/x"
    assert downstream_of(url, by_host=False) == ("http", "10.0.0.7", 8080)
    assert downstream_of(url, by_host=False, host_header="api.example:9") == (
        "http",
        "api.example",
        8080,
    )
    assert downstream_of(url, by_host=True, host_header="api.example") == "api.example"
    assert downstream_of(url, by_host=True, host_header="bad value") == "10.0.0.7"


@pytest.mark.parametrize("spelling", ["Host", "host", "HOST", "hOsT", b"Host"])
def test_every_spelling_of_host_in_a_calls_or_sessions_headers_counts(
    spelling: str | bytes,
) -> None:
    host_header = raptor_requests._host_header
    assert host_header({spelling: "x", "Accept": "*/*"}, None) == "x"
    assert host_header({"Accept": "*/*"}, {spelling: "y"}) == "y"
    assert host_header(CaseInsensitiveDict({spelling: "x"}), None) == "x"
    assert host_header(None, CaseInsensitiveDict({spelling: "y"})) == "y"
    assert host_header({spelling: None}, {"Host": "y"}) is None  # requests drops the session's
    assert host_header({"Hostname": "x", "X-Host": "y"}, CaseInsensitiveDict()) is None


def test_an_httpx_redirect_hop_is_judged_on_the_host_it_was_sent_with() -> None:
    def sent(url: str, **headers: str) -> httpx.Request:
        return httpx.Request("GET", url, headers=headers)

    first = sent("http://10.0.0.7:8080/a", Host=DEAD)
    assert raptor_httpx._downstream(first, False) == ("http", DEAD, 8080)
    # httpx keeps the caller's Host at a hop to the same origin: the same virtual host.
    assert raptor_httpx._downstream(sent("http://10.0.0.7:8080/b", Host=DEAD), False) == (
        raptor_httpx._downstream(first, False)
    )
    # At a hop to another origin httpx sends that origin's Host: another downstream.
    assert raptor_httpx._downstream(sent("http://10.0.0.8:8080/b"), False) == (
        "http",
        "10.0.0.8",
        8080,
    )
    assert raptor_httpx._downstream(first, True) == DEAD
