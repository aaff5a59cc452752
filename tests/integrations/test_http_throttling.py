"""Throttling over real HTTP: a 429's Retry-After holds back the call that got it, and once the
origin throttles most calls, every call to it; a call that cannot wait gets a 429 of raptor's
own, never sent, as the server itself would have answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import requests

from otel_raptor import CircuitBreakerConfig, RetryPolicy
from otel_raptor.config import RaptorConfig
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._http import THROTTLED_HEADER
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.integrations.requests import RequestsIntegration
from otel_raptor.runtime.state import Runtime
from tests.support.faulty_http import Action, FaultyHTTPServer, ok, status

CLIENTS = ["requests", "httpx", "httpx-async"]


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


@pytest.fixture
def install() -> Iterator[Callable[[RetryPolicy], Runtime]]:
    hooks: list[Any] = []

    def run(policy: RetryPolicy) -> Runtime:
        runtime = Runtime()
        settings = IntegrationSettings(
            runtime=runtime, config=RaptorConfig(retry=policy, breaker=CircuitBreakerConfig())
        )
        for hook in (RequestsIntegration(), HttpxIntegration()):
            hook.install(settings)
            hooks.append(hook)
        return runtime

    yield run
    for hook in hooks:
        hook.uninstall()


def get(client: str, url: str) -> Any:
    if client == "requests":
        return requests.get(url, timeout=5)
    if client == "httpx":
        with httpx.Client(timeout=5) as sync_client:
            return sync_client.get(url)

    async def send() -> Any:
        async with httpx.AsyncClient(timeout=5) as async_client:
            return await async_client.get(url)

    return asyncio.run(send())


@pytest.mark.parametrize("client", CLIENTS)
def test_pervasive_throttling_answers_a_429_of_our_own_without_sending(
    client: str, install: Callable[[RetryPolicy], Runtime], server: FaultyHTTPServer
) -> None:
    install(RetryPolicy(max_retries=0, max_delay=1.0))
    server.default = status(429, {"Retry-After": "30"})
    for _ in range(10):  # every call throttled: pervasive, once there are enough calls
        assert get(client, server.url("/limited")).status_code == 429
    sent = server.count("GET", "/limited")
    answer = get(client, server.url("/limited"))
    assert server.count("GET", "/limited") == sent  # never sent: the origin is paused
    assert answer.status_code == 429
    assert answer.headers[THROTTLED_HEADER] == "1"
    assert 29 <= int(answer.headers["Retry-After"]) <= 30


@pytest.mark.parametrize("client", CLIENTS)
def test_a_few_throttled_calls_wait_and_the_others_go_on(
    client: str, install: Callable[[RetryPolicy], Runtime], server: FaultyHTTPServer
) -> None:
    install(RetryPolicy(max_retries=2, base_delay=0.0, max_delay=1.0))
    server.push(status(429, {"Retry-After": "0.3"}), ok("after the pause"))
    answer = get(client, server.url("/once"))  # waits out the 0.3 s, then succeeds
    assert answer.status_code == 200
    [first, retry] = [r.arrived_at for r in server.requests if r.path == "/once"]
    assert retry - first >= 0.29  # Retry-After was honoured
    # One throttle among few calls is not pervasive: another call goes straight out.
    assert get(client, server.url("/other")).status_code == 200
    assert server.count("GET", "/other") == 1


def http_date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, tz=UTC), usegmt=True)


def skewed_throttle(skew: float, wait: int) -> Action:
    """A 429 from a server whose clock is ``skew`` seconds off ours, asking for ``wait`` s as
    an HTTP-date, with the ``Date`` header every origin server sends (RFC 9110 §6.6.1)."""
    server_now = int(time.time() + skew)
    headers = {"Retry-After": http_date(server_now + wait), "Date": http_date(server_now)}
    return status(429, headers)


@pytest.mark.parametrize("skew", [-600.0, 600.0], ids=["server-behind", "server-ahead"])
@pytest.mark.parametrize("client", CLIENTS)
def test_a_retry_after_date_is_read_on_the_servers_clock(
    client: str, skew: float, install: Callable[[RetryPolicy], Runtime], server: FaultyHTTPServer
) -> None:
    # Ten minutes of skew between client and server (a container's or a VM's clock): read
    # against our clock, "in 1 s" was either long past (a retry at once, into the same 429)
    # or ten minutes away (no retry: the wait is beyond max_retry_after).
    install(RetryPolicy(max_retries=2, base_delay=0.0, max_delay=1.0, max_retry_after=5.0))
    server.push(skewed_throttle(skew, 1), ok("after the pause"))
    answer = get(client, server.url("/dated"))
    assert answer.status_code == 200
    [first, retry] = [r.arrived_at for r in server.requests if r.path == "/dated"]
    assert 0.9 <= retry - first < 3.0  # the second the server asked for, no more


@pytest.mark.parametrize("skew", [-600.0, 600.0], ids=["server-behind", "server-ahead"])
@pytest.mark.parametrize("client", CLIENTS)
def test_a_cooldown_from_a_retry_after_date_lasts_what_the_server_asked(
    client: str, skew: float, install: Callable[[RetryPolicy], Runtime], server: FaultyHTTPServer
) -> None:
    install(RetryPolicy(max_retries=0, max_delay=1.0))
    server.default = skewed_throttle(skew, 30)
    for _ in range(10):  # every call throttled: pervasive, once there are enough calls
        assert get(client, server.url("/limited")).status_code == 429
    sent = server.count("GET", "/limited")
    answer = get(client, server.url("/limited"))
    # Read against our clock, the pause was none at all (the call went out) or 10.5 minutes.
    assert server.count("GET", "/limited") == sent
    assert answer.status_code == 429
    assert answer.headers[THROTTLED_HEADER] == "1"
    assert 28 <= int(answer.headers["Retry-After"]) <= 30
