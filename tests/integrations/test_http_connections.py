"""No connection, socket or file descriptor leaks through raptor's recovery paths (HTTP).

For ``requests.Session``, ``httpx.Client`` and ``httpx.AsyncClient``, a few hundred calls go
through ``RaptorInstrumentor().instrument(...)`` to loopback servers scripted with a mix of
``503``/``500`` (with bodies larger than a socket buffer), ``429`` with a short
``Retry-After``, ``200``, streamed bodies, resets, closes and truncated bodies; to an origin
that is down (retries give up, its breaker opens and refuses) with failover, stale-if-error
and a fallback function; to one with no fallbacks (the app gets the refusal); and to one
throttling with a long ``Retry-After`` (its 429s handed back, then raptor's own). The app
closes everything it is given, so whatever stays open is raptor's. Then, measured on the
real process and servers:

- while the client is idle, its pool holds no checked-out connection (requests: every urllib3
  pool's queue is full again; httpx: no request in the pool, every connection idle), and the
  process holds at most ``POOL`` connections to each server;
- no server ever had more than ``POOL`` connections open at once (the calls are made one
  after another, so a client needs one per origin; ``POOL`` = 2 leaves room for a connection
  the client dropped whose end the server has not read yet);
- once the client is closed, no TCP connection to or from a server is left in the process,
  and its file descriptors are back to the baseline (within ``FD_SLACK``).

A connection leaked per failure fails them all: hundreds of failures, a bound of 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx
import psutil
import pytest
import requests
from requests.adapters import HTTPAdapter

from otel_raptor import CircuitOpenError, RaptorInstrumentor
from otel_raptor.config import DownstreamOverride
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.retry import RetryPolicy
from tests.support.faulty_http import (
    Action,
    FaultyHTTPServer,
    close,
    ok,
    reset,
    status,
    truncate,
)
from tests.support.runtime import process_runtime

#: Connections a client may hold to one server (requests' ``pool_maxsize``).
POOL = 2
#: File descriptors the process may hold above its baseline once the client is closed.
FD_SLACK = 2
#: Calls per client.
CALLS = 300
SEED = 20_240_611

#: Larger than a loopback socket's buffers: an unread one keeps its connection busy.
BIG = b"x" * 256 * 1024
FALLBACK = "fallback"


def flaky_script(rng: random.Random, length: int) -> list[Action]:
    """One action per request: about half fail, in every way the servers can."""
    kinds: list[tuple[float, Callable[[], Action]]] = [
        (0.40, lambda: ok(b"ok")),
        (0.10, lambda: ok(BIG)),
        (0.12, lambda: status(503, body=BIG)),
        (0.06, lambda: status(500)),
        (0.10, lambda: status(429, {"Retry-After": "0.01"})),
        (0.08, reset),
        (0.07, close),
        (0.07, lambda: truncate(b"partial", 5000)),
    ]
    weights = [weight for weight, _ in kinds]
    return [rng.choices(kinds, weights)[0][1]() for _ in range(length)]


@dataclass(frozen=True, slots=True)
class Call:
    server: str
    method: str
    stream: bool


def plan(rng: random.Random) -> list[Call]:
    """The app's calls: mostly to the flaky server, some to the others, in random order; the
    first two keep a copy of the down server's answer for stale-if-error."""
    calls = [Call("down", "GET", stream=False)] * 2
    for _ in range(CALLS - len(calls)):
        server = rng.choices(
            ["flaky", "down", "dead", "outage", "throttled"], [0.5, 0.15, 0.15, 0.12, 0.08]
        )[0]
        method = rng.choices(["GET", "HEAD", "PUT", "POST"], [0.7, 0.1, 0.1, 0.1])[0]
        stream = method == "GET" and rng.random() < 0.5
        calls.append(Call(server, method, stream))
    return calls


@dataclass
class Setup:
    servers: dict[str, FaultyHTTPServer]
    calls: list[Call]
    instrumentor: RaptorInstrumentor

    def url(self, call: Call, index: int) -> str:
        # One path on "down": a stale copy is kept per URL.
        path = "/down/item" if call.server == "down" else f"/{call.server}/{index}"
        return self.servers[call.server].url(path)

    @property
    def ports(self) -> set[int]:
        return {server.port for server in self.servers.values()}


def fallback(failure: Any) -> str:
    return FALLBACK


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    for name in list(os.environ):
        if name.startswith("OTEL_PYTHON_RAPTOR_"):
            monkeypatch.delenv(name)
    rng = random.Random(SEED)
    calls = plan(rng)
    with contextlib.ExitStack() as stack:
        servers = {
            # Every way to fail, retried.
            "flaky": FaultyHTTPServer(flaky_script(rng, 4 * CALLS)),
            # Answers a few GETs (kept for stale-if-error), then 503 for ever: retries give up,
            # the breaker opens; failover to "backup", else a stale copy.
            "down": FaultyHTTPServer([ok("fresh")] * 6, default=status(503, body=BIG)),
            # Fails two requests in three: a failover often fails too, and a stale copy is
            # served.
            "backup": FaultyHTTPServer(
                [rng.choice([ok("backup"), status(503), reset()]) for _ in range(4 * CALLS)]
            ),
            # Resets or 503s: the fallback function answers.
            "dead": FaultyHTTPServer(
                [rng.choice([reset(), status(503, body=BIG)]) for _ in range(CALLS)],
                default=reset(),
            ),
            # 503s, no fallbacks: the app gets the failing response, or the breaker's refusal.
            "outage": FaultyHTTPServer(default=status(503, body=BIG)),
            # 429s with a Retry-After too long to wait: handed back, then the downstream
            # cools down and raptor answers 429s of its own.
            "throttled": FaultyHTTPServer(default=status(429, {"Retry-After": "30"}, body=BIG)),
        }
        for server in servers.values():
            stack.enter_context(server)
        down = CircuitBreakerConfig(failure_threshold=3, recovery_timeout=0.05, recovery_jitter=0.0)
        with process_runtime():
            instrumentor = RaptorInstrumentor()
            instrumentor.instrument(
                integrations=["requests", "httpx"],
                monitor=False,
                memory=False,
                retry=RetryPolicy(max_retries=3, base_delay=0.002, max_delay=0.01),
                # The flaky server's breaker stays closed, and its retries are never short of
                # budget, so that its mix of failures is retried whatever the machine's speed.
                breaker=CircuitBreakerConfig(
                    failure_threshold=50,
                    failure_rate_threshold=0.95,
                    adaptive_threshold=False,
                    recovery_timeout=0.02,
                    recovery_jitter=0.0,
                ),
                retry_budget_ratio=1.0,
                retry_budget_min_retries_per_second=10_000.0,
                downstreams=[
                    DownstreamOverride(
                        pattern=servers["down"].authority,
                        breaker=down,
                        failover_urls=(servers["backup"].url(""),),
                        stale_if_error=True,
                    ),
                    DownstreamOverride(
                        pattern=servers["dead"].authority, breaker=down, fallback=fallback
                    ),
                    DownstreamOverride(pattern=servers["outage"].authority, breaker=down),
                    DownstreamOverride(
                        pattern=servers["throttled"].authority,
                        retry=RetryPolicy(max_retries=3, base_delay=0.002, max_retry_after=0.5),
                    ),
                ],
            )
            try:
                assert set(instrumentor.installed_integrations) == {"requests", "httpx"}
                yield Setup(servers, calls, instrumentor)
            finally:
                instrumentor.uninstrument()


# --- measuring the process -----------------------------------------------------------------------


def connections(ports: set[int]) -> tuple[Counter[int], Counter[int]]:
    """This process' TCP connections to each port in ``ports`` (client side) and from it
    (server side), listening sockets left out."""
    clients: Counter[int] = Counter()
    servers: Counter[int] = Counter()
    for conn in psutil.Process().net_connections(kind="tcp4"):
        if conn.status == psutil.CONN_LISTEN:
            continue
        if conn.raddr and conn.raddr.port in ports:  # type: ignore[redundant-expr]  # () when none
            clients[conn.raddr.port] += 1
        if conn.laddr.port in ports:
            servers[conn.laddr.port] += 1
    return clients, servers


def settled(setup: Setup, baseline: int) -> tuple[Counter[int], Counter[int], int]:
    """Connections and fds once the servers have seen every client close (2 s at most).

    A garbage collection first: urllib3 2 no longer closes the pools of a cleared
    ``PoolManager`` (``Session.close()``), it leaves their connections to a finalizer run when
    each pool is collected, and the tracebacks of failed calls keep pools in reference cycles
    until a collection (without raptor too). What is still open after it is held by a live
    reference: a leak."""
    gc.collect()
    deadline = time.monotonic() + 2.0
    while True:
        clients, servers = connections(setup.ports)
        fds = psutil.Process().num_fds()
        if (not clients and not servers and fds <= baseline + FD_SLACK) or (
            time.monotonic() > deadline
        ):
            return clients, servers, fds
        time.sleep(0.02)


def idle_and_bounded(setup: Setup) -> list[str]:
    """What is wrong with the connections of an idle client (nothing: ``[]``)."""
    problems = []
    clients, _ = connections(setup.ports)
    for name, server in setup.servers.items():
        if clients[server.port] > POOL:
            problems.append(f"the client holds {clients[server.port]} connections to {name}")
        if server.peak_connections > POOL:
            problems.append(f"{name} had {server.peak_connections} connections open at once")
    return problems


def named(setup: Setup, counts: Counter[int]) -> dict[str, int]:
    return {name: counts[s.port] for name, s in setup.servers.items() if counts[s.port]}


def closed(setup: Setup, baseline: int) -> list[str]:
    """What is left open once the client is closed (nothing: ``[]``)."""
    clients, servers, fds = settled(setup, baseline)
    problems = []
    if clients:
        problems.append(f"client connections left open: {named(setup, clients)}")
    if servers:
        problems.append(f"server connections left open: {named(setup, servers)}")
    if fds > baseline + FD_SLACK:
        problems.append(f"{fds} fds open, {baseline} before the client")
    return problems


def assert_exercised(setup: Setup, outcomes: Counter[str]) -> None:
    """The paths under test were taken (else the test proves nothing)."""
    assert outcomes["ok"] >= 80
    assert outcomes["failing"] >= 10  # failing responses handed to the app after giving up
    assert outcomes["error"] >= 5  # transport errors after giving up (or not replayed)
    assert outcomes["refused"] >= 10  # the outage's open breaker
    assert outcomes["fallback"] >= 10  # the fallback function
    assert outcomes["failover"] + outcomes["stale"] >= 10
    assert outcomes["stale"] >= 1
    assert outcomes["throttled"] >= 5  # raptor's own 429s
    flaky = setup.servers["flaky"]
    assert flaky.count() > sum(1 for call in setup.calls if call.server == "flaky")  # retried
    assert flaky.connections > 20  # resets and closes made it reconnect
    assert setup.servers["backup"].count() >= 10


def baseline_fds() -> int:
    return psutil.Process().num_fds()


# --- requests ------------------------------------------------------------------------------------


def requests_call(session: requests.Session, setup: Setup, index: int, call: Call) -> str:
    url = setup.url(call, index)
    body = b"payload" if call.method in ("PUT", "POST") else None
    try:
        response: Any = session.request(call.method, url, data=body, stream=call.stream, timeout=5)
    except CircuitOpenError:
        return "refused"
    except requests.RequestException:
        return "error"
    if not isinstance(response, requests.Response):
        assert response == FALLBACK
        return "fallback"
    with response:
        try:
            for _ in response.iter_content(65536):
                pass
        except requests.RequestException:
            return "error"  # a truncated body, read by the app
    return kind_of(response.status_code, response.headers)


def kind_of(code: int, headers: Any) -> str:
    if headers.get("X-Raptor-Stale") == "1":
        return "stale"
    if headers.get("X-Raptor-Throttled") == "1":
        return "throttled"
    if code < 400:
        return "failover" if headers.get("Content-Length") == "6" else "ok"  # "backup"
    return "failing"


def requests_pools_idle(session: requests.Session) -> list[str]:
    adapter = session.get_adapter("http://127.0.0.1/")
    assert isinstance(adapter, HTTPAdapter)
    manager = adapter.poolmanager  # a RecentlyUsedContainer refuses to be iterated: keys()
    pools = [manager.pools[key] for key in manager.pools.keys()]  # noqa: SIM118
    assert len(pools) == 6  # one per server
    problems = []
    for pool in pools:
        queue = pool.pool
        assert queue is not None
        # Every connection taken out of the pool was put back (urllib3 keeps ``maxsize``
        # slots, a connection or None; a connection never released takes one for ever).
        if queue.qsize() != POOL:
            problems.append(f"{pool.port}: {POOL - queue.qsize()} connections checked out")
    return problems


def test_requests_session_leaks_nothing(setup: Setup) -> None:
    outcomes: Counter[str] = Counter()
    baseline = baseline_fds()
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=8, pool_maxsize=POOL, max_retries=0)
    session.mount("http://", adapter)
    with session:
        for index, call in enumerate(setup.calls):
            outcomes[requests_call(session, setup, index, call)] += 1
        problems = requests_pools_idle(session) + idle_and_bounded(setup)
    problems += closed(setup, baseline)
    assert not problems, "\n".join(problems)
    assert_exercised(setup, outcomes)


# --- httpx ---------------------------------------------------------------------------------------

HTTPX_ERRORS = (httpx.HTTPError, httpx.StreamError)


def httpx_client_options() -> dict[str, Any]:
    # One connection per origin suffices: calls are made one after another. A pool of 12
    # that waits 1 s for a connection: leaked connections exhaust it, and the test says so.
    return {
        "limits": httpx.Limits(max_connections=6 * POOL, max_keepalive_connections=6 * POOL),
        "timeout": httpx.Timeout(5.0, pool=1.0),
    }


def exhausted() -> NoReturn:
    pytest.fail("the client's pool is exhausted: its connections leaked", pytrace=False)


def httpx_call(client: httpx.Client, setup: Setup, index: int, call: Call) -> str:
    request = client.build_request(
        call.method,
        setup.url(call, index),
        content=b"payload" if call.method in ("PUT", "POST") else None,
    )
    try:
        response: Any = client.send(request, stream=call.stream)
    except CircuitOpenError:
        return "refused"
    except httpx.PoolTimeout:
        exhausted()
    except HTTPX_ERRORS:
        return "error"
    if not isinstance(response, httpx.Response):
        assert response == FALLBACK
        return "fallback"
    try:
        response.read()
    except HTTPX_ERRORS:
        return "error"
    finally:
        response.close()
    return kind_of(response.status_code, response.headers)


async def httpx_call_async(client: httpx.AsyncClient, setup: Setup, index: int, call: Call) -> str:
    request = client.build_request(
        call.method,
        setup.url(call, index),
        content=b"payload" if call.method in ("PUT", "POST") else None,
    )
    try:
        response: Any = await client.send(request, stream=call.stream)
    except CircuitOpenError:
        return "refused"
    except httpx.PoolTimeout:
        exhausted()
    except HTTPX_ERRORS:
        return "error"
    if not isinstance(response, httpx.Response):
        assert response == FALLBACK
        return "fallback"
    try:
        await response.aread()
    except HTTPX_ERRORS:
        return "error"
    finally:
        await response.aclose()
    return kind_of(response.status_code, response.headers)


def httpx_pool_idle(transport: Any) -> list[str]:
    pool = transport._pool  # httpcore's pool behind httpx's HTTP(Async)Transport
    problems = []
    if pool._requests:
        problems.append(f"{len(pool._requests)} requests still hold the pool")
    held = [conn for conn in pool.connections if not (conn.is_idle() or conn.is_closed())]
    if held:
        problems.append(f"connections still checked out: {held}")
    return problems


def test_httpx_client_leaks_nothing(setup: Setup) -> None:
    outcomes: Counter[str] = Counter()
    baseline = baseline_fds()
    with httpx.Client(**httpx_client_options()) as client:
        for index, call in enumerate(setup.calls):
            outcomes[httpx_call(client, setup, index, call)] += 1
        problems = httpx_pool_idle(client._transport) + idle_and_bounded(setup)
    problems += closed(setup, baseline)
    assert not problems, "\n".join(problems)
    assert_exercised(setup, outcomes)


def test_httpx_async_client_leaks_nothing(setup: Setup) -> None:
    outcomes: Counter[str] = Counter()
    baseline = baseline_fds()

    async def main() -> list[str]:
        async with httpx.AsyncClient(**httpx_client_options()) as client:
            for index, call in enumerate(setup.calls):
                outcomes[await httpx_call_async(client, setup, index, call)] += 1
            return httpx_pool_idle(client._transport) + idle_and_bounded(setup)

    problems = asyncio.run(main())
    problems += closed(setup, baseline)
    assert not problems, "\n".join(problems)
    assert_exercised(setup, outcomes)
