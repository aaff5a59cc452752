"""Rules 0 and 1 when recording a success keeps failing (a bug of ours) while failures are
still counted.

Such a breaker would see a downstream's failures without the successes between them, open
on a downstream that answers most calls, and refuse calls that would have succeeded: worse
than no plugin. Instead it stops judging (``CircuitBreaker.stop_judging``): closed, it admits
every call and counts nothing until reset. Each workload here runs against the real loopback
server (mostly successes, a third of the calls meeting a 503 or a reset connection) through
requests, httpx (sync and async), ``Guard.call``/``call_async`` and ``@resilient``, once
without raptor and once under it with the success bookkeeping broken in the breaker's
wrapper, or in its core: nothing is ever refused, and as many calls succeed as without us.
A probe whose success cannot be recorded must not leave the breaker half-open either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests

from otel_raptor.config import RaptorConfig
from otel_raptor.core.attempts import AttemptLoop
from otel_raptor.core.breaker import BreakerCore, CircuitBreakerConfig
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.core.states import CircuitState
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.integrations.requests import RequestsIntegration
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.decorator import resilient
from otel_raptor.runtime.guard import Guard
from otel_raptor.runtime.safety import _reset_for_tests
from otel_raptor.runtime.state import Runtime
from tests.support.faulty_http import FaultyHTTPServer, reset, status

#: Where recording a success may fail for good: the breaker's runtime wrapper (both of its
#: entries), its core (a corrupted window, say), or the attempt loop's success step (the slow
#: path: a retry's or a probe's success).
FAULTS: dict[str, list[tuple[object, str]]] = {
    "wrapper": [(CircuitBreaker, "record_success_since"), (CircuitBreaker, "record_success")],
    "core": [(BreakerCore, "on_success")],
    "loop": [(AttemptLoop, "succeeded")],
}

CALLS = 60
RETRY = RetryPolicy(max_retries=2, base_delay=0.001, max_delay=0.002)
#: Opens after three failures in a row and stays open for the rest of a workload.
BREAKER = CircuitBreakerConfig(failure_threshold=3, recovery_timeout=60.0, recovery_jitter=0.0)


class InjectedBug(RuntimeError):
    """The bug planted in raptor's success bookkeeping."""


def break_bookkeeping(monkeypatch: pytest.MonkeyPatch, fault: str) -> list[str]:
    met: list[str] = []
    for owner, name in FAULTS[fault]:

        def raising(*args: Any, _name: str = name, **kwargs: Any) -> Any:
            met.append(_name)
            raise InjectedBug("a bug in otel_raptor's success bookkeeping")

        monkeypatch.setattr(owner, name, raising)
    return met


@pytest.fixture(autouse=True)
def _fresh_reports() -> Iterator[None]:
    _reset_for_tests()
    yield
    _reset_for_tests()


@dataclass
class Tally:
    """How a workload's calls ended, and the requests the server saw."""

    outcomes: Counter[str] = field(default_factory=Counter)
    hits: dict[str, int] = field(default_factory=dict)

    def ended(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            answer = call(*args, **kwargs)
        except CircuitOpenError:
            self.outcomes["refused"] += 1
        except Exception as error:
            self.outcomes[type(error).__name__] += 1
        else:
            self.outcomes[_kind(answer)] += 1

    async def ended_async(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            answer = await call(*args, **kwargs)
        except CircuitOpenError:
            self.outcomes["refused"] += 1
        except Exception as error:
            self.outcomes[type(error).__name__] += 1
        else:
            self.outcomes[_kind(answer)] += 1


def _kind(answer: Any) -> str:
    code = answer if isinstance(answer, int) else getattr(answer, "status_code", None)
    return "ok" if code == 200 else f"answered {code}"


def script(server: FaultyHTTPServer, i: int) -> tuple[str, str]:
    """Call ``i``'s method and path, with its fault pushed: two calls in six fail once (a
    503 on a POST, a reset connection on a GET, both retried by raptor when they may be)
    and one in six fails for good (a POST whose connection is reset)."""
    kind = i % 6
    if kind == 1:
        server.push(status(503))
    elif kind in (3, 5):
        server.push(reset())
    method = "POST" if kind in (1, 4, 5) else "GET"
    return method, server.url(f"/{method.lower()}")


def hits(server: FaultyHTTPServer) -> dict[str, int]:
    return {"GET": server.count("GET"), "POST": server.count("POST")}


# --- the workloads --------------------------------------------------------------------------------


def http_config() -> RaptorConfig:
    return RaptorConfig(retry=RETRY, breaker=BREAKER)


@contextlib.contextmanager
def installed(integration_type: type | None) -> Iterator[Runtime | None]:
    if integration_type is None:
        yield None
        return
    runtime = Runtime()
    integration = integration_type()
    integration.install(IntegrationSettings(runtime=runtime, config=http_config()))
    try:
        yield runtime
    finally:
        integration.uninstall()
        runtime.health.stop()


def run_requests(raptor: bool) -> Tally:
    tally = Tally()
    with (
        installed(RequestsIntegration if raptor else None),
        FaultyHTTPServer() as server,
        requests.Session() as session,
    ):
        for i in range(CALLS):
            method, url = script(server, i)
            tally.ended(session.request, method, url, data=b"x", timeout=5)
        tally.hits = hits(server)
    return tally


def run_httpx(raptor: bool) -> Tally:
    tally = Tally()
    with (
        installed(HttpxIntegration if raptor else None),
        FaultyHTTPServer() as server,
        httpx.Client(timeout=5) as client,
    ):
        for i in range(CALLS):
            method, url = script(server, i)
            tally.ended(client.request, method, url, content=b"x")
        tally.hits = hits(server)
    return tally


def run_httpx_async(raptor: bool) -> Tally:
    tally = Tally()

    async def workload(server: FaultyHTTPServer) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            for i in range(CALLS):
                method, url = script(server, i)
                await tally.ended_async(client.request, method, url, content=b"x")

    with installed(HttpxIntegration if raptor else None), FaultyHTTPServer() as server:
        asyncio.run(workload(server))
        tally.hits = hits(server)
    return tally


def _send(session: requests.Session, method: str, url: str) -> int:
    """The guarded function: one request, a 503 raised as the HTTP error it is."""
    response = session.request(method, url, data=b"x", timeout=5)
    response.raise_for_status()
    return response.status_code


def run_guard_call(raptor: bool) -> Tally:
    tally = Tally()
    runtime = Runtime()
    guards = {
        # What may be repeated is retried; a POST never is.
        method: Guard(
            "bookkeeping",
            retry=RETRY,
            breaker=BREAKER,
            replay_safe=method == "GET",
            runtime=runtime,
        )
        for method in ("GET", "POST")
    }
    try:
        with FaultyHTTPServer() as server, requests.Session() as session:
            for i in range(CALLS):
                method, url = script(server, i)
                if raptor:
                    tally.ended(guards[method].call, _send, session, method, url)
                else:
                    tally.ended(_send, session, method, url)
            tally.hits = hits(server)
    finally:
        runtime.health.stop()
    return tally


def run_guard_call_async(raptor: bool) -> Tally:
    tally = Tally()
    runtime = Runtime()
    guards = {
        method: Guard(
            "bookkeeping-async",
            retry=RETRY,
            breaker=BREAKER,
            replay_safe=method == "GET",
            runtime=runtime,
        )
        for method in ("GET", "POST")
    }

    async def send(client: httpx.AsyncClient, method: str, url: str) -> int:
        response = await client.request(method, url, content=b"x")
        response.raise_for_status()
        return response.status_code

    async def workload(server: FaultyHTTPServer) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            for i in range(CALLS):
                method, url = script(server, i)
                if raptor:
                    guard = guards[method]
                    await tally.ended_async(guard.call_async, send, client, method, url)
                else:
                    await tally.ended_async(send, client, method, url)

    try:
        with FaultyHTTPServer() as server:
            asyncio.run(workload(server))
            tally.hits = hits(server)
    finally:
        runtime.health.stop()
    return tally


def run_resilient(raptor: bool) -> Tally:
    tally = Tally()
    runtime = Runtime()
    sends: dict[str, Callable[..., int]] = {"GET": _send, "POST": _send}
    if raptor:
        sends = {
            method: resilient(
                service="bookkeeping-resilient",
                retry=RETRY,
                breaker=BREAKER,
                replay_safe=method == "GET",
                runtime=runtime,
            )(_send)
            for method in ("GET", "POST")
        }
    try:
        with FaultyHTTPServer() as server, requests.Session() as session:
            for i in range(CALLS):
                method, url = script(server, i)
                tally.ended(sends[method], session, method, url)
            tally.hits = hits(server)
    finally:
        runtime.health.stop()
    return tally


WORKLOADS: dict[str, Callable[[bool], Tally]] = {
    "requests": run_requests,
    "httpx": run_httpx,
    "httpx-async": run_httpx_async,
    "guard-call": run_guard_call,
    "guard-call-async": run_guard_call_async,
    "resilient": run_resilient,
}


@pytest.mark.parametrize("fault", ["wrapper", "core"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_a_breaker_that_cannot_record_successes_never_refuses_an_answering_downstream(
    workload: str,
    fault: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = WORKLOADS[workload](False)
    met = break_bookkeeping(monkeypatch, fault)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"):
        seen = WORKLOADS[workload](True)
    assert met, "the bug was never met"
    assert seen.outcomes["refused"] == 0, seen.outcomes
    # As many calls succeed as without raptor (more: its retries of the GETs recover them),
    # and nothing is sent that may not be: the POSTs reach the server as often as plain.
    assert seen.outcomes["ok"] >= plain.outcomes["ok"] == CALLS * 3 // 6, (seen, plain)
    assert seen.hits["POST"] == plain.hits["POST"], (seen.hits, plain.hits)
    # Met once: then the breaker stops judging, is quiet (the fast path records nothing) and
    # the loop records nothing either.
    assert len(met) == 1, met
    stopped = [r for r in caplog.records if "stops judging" in r.getMessage()]
    assert len(stopped) == 1, [r.getMessage() for r in caplog.records]


# --- a probe whose success cannot be recorded -----------------------------------------------------


def test_a_probe_success_that_cannot_be_recorded_closes_the_breaker_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real outage opens the breaker; when the downstream is back, the probe succeeds but its
    # success cannot be recorded (the loop's success step fails, for good). Left half-open,
    # the breaker would let one call through at a time for ever and refuse the others.
    config = RaptorConfig(
        retry=RetryPolicy(max_retries=0),
        breaker=CircuitBreakerConfig(
            failure_threshold=2, recovery_timeout=0.2, recovery_jitter=0.0, success_threshold=1
        ),
    )
    runtime = Runtime()
    integration = RequestsIntegration()
    integration.install(IntegrationSettings(runtime=runtime, config=config))
    try:
        with FaultyHTTPServer() as server, requests.Session() as session:
            server.push(reset(), reset())
            for _ in range(2):
                with pytest.raises(requests.ConnectionError):
                    session.get(server.url("/"), timeout=5)
            [(_, breaker)] = runtime.breakers.items()
            assert breaker.state is CircuitState.OPEN
            met = break_bookkeeping(monkeypatch, "loop")
            time.sleep(0.25)
            assert session.get(server.url("/"), timeout=5).status_code == 200  # the probe
            assert met
            assert breaker.state is CircuitState.CLOSED
            assert not breaker.judging
            for _ in range(5):
                assert session.get(server.url("/"), timeout=5).status_code == 200
    finally:
        integration.uninstall()
        runtime.health.stop()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_probe_success_that_cannot_be_recorded_never_leaves_concurrent_calls_refused(
    fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = Runtime()
    guard = Guard(
        "bookkeeping-probe",
        retry=RetryPolicy(max_retries=0),
        breaker=CircuitBreakerConfig(
            failure_threshold=1, recovery_timeout=0.1, recovery_jitter=0.0, success_threshold=1
        ),
        runtime=runtime,
    )

    def down() -> None:
        raise ConnectionRefusedError("down")

    try:
        with pytest.raises(ConnectionRefusedError):
            guard.call(down)  # the outage opens it
        met = break_bookkeeping(monkeypatch, fault)
        time.sleep(0.15)
        assert guard.call(lambda: "probe") == "probe"
        assert met
        # A call in flight while another arrives: both must run, as without raptor.
        entered, leave = threading.Event(), threading.Event()
        results: list[Any] = []

        def slow() -> str:
            entered.set()
            leave.wait(5)
            return "slow"

        worker = threading.Thread(target=lambda: results.append(guard.call(slow)))
        worker.start()
        try:
            assert entered.wait(5)
            assert guard.call(lambda: "fast") == "fast"
        finally:
            leave.set()
            worker.join(5)
        assert results == ["slow"]
    finally:
        runtime.health.stop()


@pytest.mark.parametrize("fault", ["wrapper", "core"])
def test_httpx_fast_lane_that_cannot_record_successes_never_refuses(
    fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GETs only, never retried: every success is the fast lane's (``Client.send``'s own hook),
    # and only it can stop the breaker judging before the failures open it.
    config = RaptorConfig(retry=RetryPolicy(max_retries=0), breaker=BREAKER)
    runtime = Runtime()
    integration = HttpxIntegration()
    integration.install(IntegrationSettings(runtime=runtime, config=config))
    tally = Tally()
    try:
        with FaultyHTTPServer() as server, httpx.Client(timeout=5) as client:
            # The origin's first request is described (the general hook): it opens the lane.
            assert client.get(server.url("/")).status_code == 200
            met = break_bookkeeping(monkeypatch, fault)
            for i in range(CALLS):
                if i % 6 in (1, 3):
                    server.push(status(503))
                tally.ended(lambda: client.get(server.url("/")))
    finally:
        integration.uninstall()
        runtime.health.stop()
    assert tally.outcomes == {"ok": CALLS * 4 // 6, "answered 503": CALLS * 2 // 6}
    assert met == ["record_success_since" if fault == "wrapper" else "on_success"]
