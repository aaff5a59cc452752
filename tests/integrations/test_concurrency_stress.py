"""Stress: many threads and several event loops (each in a thread of its own, each started
afresh by ``asyncio.run`` several times) hammering one downstream over loopback sockets,
with faults. Each test asserts invariants (every worker stopped, no probe slot left held),
never timings, and runs for a few seconds at most.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from otel_raptor.config import RaptorConfig
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.httpx import HttpxIntegration
from otel_raptor.runtime.state import Runtime
from tests.support.faulty_http import FaultyHTTPServer, ok, status

LOOP_THREADS = 3
RUNS_PER_THREAD = 2
WORKERS_PER_RUN = 20


@pytest.fixture
def server() -> Iterator[FaultyHTTPServer]:
    with FaultyHTTPServer() as started:
        yield started


def install_httpx(retry: RetryPolicy, **breaker: Any) -> Iterator[Runtime]:
    settings = IntegrationSettings(
        runtime=Runtime(),
        config=RaptorConfig(
            retry=retry,
            breaker=CircuitBreakerConfig(recovery_timeout=0.1, recovery_jitter=0.0, **breaker),
        ),
    )
    hook = HttpxIntegration()
    hook.install(settings)
    try:
        yield settings.runtime
    finally:
        hook.uninstall()


def in_loop_threads(main: Callable[[], Any]) -> None:
    """Run ``asyncio.run(main())`` ``RUNS_PER_THREAD`` times in each of ``LOOP_THREADS``
    threads at once; re-raise the first failure."""
    failures: list[BaseException] = []

    def thread() -> None:
        try:
            for _ in range(RUNS_PER_THREAD):
                asyncio.run(main())
        except BaseException as failure:  # handed to the test thread
            failures.append(failure)

    threads = [threading.Thread(target=thread) for _ in range(LOOP_THREADS)]
    for started in threads:
        started.start()
    for started in threads:
        started.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a loop thread never finished"
    if failures:
        raise failures[0]


async def stop_for_good(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` until they end (each cancel may be dropped), so a test never hangs."""
    while tasks:
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=0.5)
        tasks = list(pending)


def test_async_workers_stop_on_their_first_cancel_under_attempt_timeouts(
    server: FaultyHTTPServer,
) -> None:
    # With an attempt timeout, each attempt ran under asyncio.wait_for, which on Python 3.11
    # drops a cancel that reaches the caller as the attempt's own task finishes: a few
    # workers in every run went on sending requests after task.cancel().
    server.push(*[status(503), ok(), ok()] * 300)  # retries (and their backoff) too
    ignored: list[int] = []
    for _ in install_httpx(RetryPolicy(max_retries=2, base_delay=0.001, attempt_timeout=2.0)):

        async def main() -> None:
            async with httpx.AsyncClient() as client:

                async def worker() -> None:
                    while True:
                        await client.get(server.url("/w"))

                workers = [asyncio.ensure_future(worker()) for _ in range(WORKERS_PER_RUN)]
                for task in workers:
                    await asyncio.sleep(random.random() * 0.01)
                    task.cancel()
                _, pending = await asyncio.wait(workers, timeout=1.0)
                ignored.append(len(pending))
                await stop_for_good(list(pending))

        in_loop_threads(main)
    assert sum(ignored) == 0, f"{sum(ignored)} workers went on after task.cancel()"


def test_sync_calls_made_on_event_loops_never_sleep_there(server: FaultyHTTPServer) -> None:
    # A sync client called from a coroutine runs on the loop's thread: raptor's backoff and
    # Retry-After sleeps (time.sleep) there froze every task of the loop (for seconds with a
    # Retry-After). On a loop's thread such a call is not retried: it gets the server's
    # answer, as without raptor. In a plain thread it still is.
    server.default = status(503)
    lock = threading.Lock()
    made_on_loops = 0
    answers: set[int] = set()
    retry = RetryPolicy(max_retries=3, base_delay=0.2, max_delay=0.2)
    for runtime in install_httpx(retry, failure_threshold=1000, minimum_calls=1000):

        async def main() -> None:
            nonlocal made_on_loops
            with httpx.Client() as client:
                for _ in range(5):
                    answer = client.get(server.url("/on-loop"))  # blocking, on the loop
                    with lock:
                        made_on_loops += 1
                        answers.add(answer.status_code)
                    await asyncio.sleep(0)

        in_loop_threads(main)
        # Every call reached the server once and got its 503: no retry, so no sleep.
        assert server.count("GET", "/on-loop") == made_on_loops == LOOP_THREADS * 5 * 2
        assert answers == {503}
        # The same call from a thread without a loop is retried.
        server.push(status(503))
        server.default = ok()
        with httpx.Client() as client:
            assert client.get(server.url("/off-loop")).status_code == 200
        assert server.count("GET", "/off-loop") == 2
        assert runtime.budget_tokens()
