"""psycopg_pool while the breaker of its server is open: ``getconn`` fails fast.

Without raptor's pool hooks, a ``getconn`` (or ``connection()``) on a pool with no idle
connection waited the pool's ``timeout`` (30 s by default) while the pool's background
connects, each refused at once by the open breaker, backed off, then got a plain
``PoolTimeout``. Now it fails at once with an error that is both ``CircuitOpenError`` and
``psycopg_pool.PoolTimeout``, counted as a refusal; an idle connection is still handed out,
and a breaker whose open time has elapsed (or half-open) lets the caller wait for the pool's
own connect, the probe (docs/databases.md, "psycopg_pool").

The breaker's states are set up on the shared PostgreSQL (the breaker fed with failures by
hand, the server untouched); the outage end to end runs on a private PostgreSQL that the
test kills (``pg_ctl stop -m immediate``) and starts again.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import psycopg
import pytest

from otel_raptor import CircuitOpenError
from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.events import BreakerTransitioned, CallRejected, RecoveryFinished
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.db import psycopg as raptor_psycopg
from otel_raptor.integrations.db.psycopg import (
    POOL_ATTRIBUTE,
    PsycopgIntegration,
    pool_circuit_open_error_type,
)
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.state import Runtime
from tests.integrations.db.conftest import PG_DSN, Install, Installed, fast_config
from tests.support.dbservers import PrivatePostgres
from tests.support.services import POSTGRES

psycopg_pool: Any = pytest.importorskip("psycopg_pool", reason="psycopg_pool is absent")

pytestmark = pytest.mark.timeout(120)

#: The pool's wait for a connection: what a refusal must not take.
POOL_TIMEOUT = 10.0
#: A refusal takes less than this (the brief's bound; it is about a millisecond).
FAST = 0.5
SHARED_SERVICE = f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"


def breaker_of(installed: Installed, service: str) -> CircuitBreaker:
    """The breaker of ``service``: ask once a connection made it, or this makes one with the
    default settings."""
    return installed.runtime.breakers.get(service)


def trip(breaker: CircuitBreaker) -> None:
    """Open ``breaker`` with counted connection failures, as refused connects would."""
    for _ in range(50):
        if breaker.state is CircuitState.OPEN:
            return
        breaker.record_failure(breaker.acquire(), 0.001, ErrorCategory.CONNECTION)
    raise AssertionError(f"{breaker!r} did not open")


def shared_pool(**options: Any) -> Any:
    options.setdefault("kwargs", {"autocommit": True})
    options.setdefault("timeout", POOL_TIMEOUT)
    pool = psycopg_pool.ConnectionPool(PG_DSN, open=False, **options)
    pool.open(wait=True, timeout=10)
    return pool


def timed(call: Any) -> tuple[float, BaseException | None]:
    began = time.monotonic()
    try:
        call()
    except Exception as error:  # the application's view
        return time.monotonic() - began, error
    return time.monotonic() - began, None


def assert_pool_refusal(error: BaseException | None, took: float) -> None:
    assert isinstance(error, CircuitOpenError), repr(error)
    assert isinstance(error, psycopg_pool.PoolTimeout)
    assert isinstance(error, psycopg.OperationalError)
    assert type(error) is pool_circuit_open_error_type()
    assert took < FAST, took


def assert_no_waiter(pool: Any) -> None:
    """No waiting client left behind, no slot taken beyond the pool's size."""
    stats = pool.get_stats()
    assert stats.get("requests_waiting", 0) == 0, stats
    assert stats["pool_size"] <= pool.max_size, stats
    assert not pool._waiting


# -- the breaker's states, on the shared server ------------------------------------------------


def test_getconn_fails_fast_while_the_breaker_is_open(postgres: None, install: Install) -> None:
    installed = install(PsycopgIntegration, recovery_timeout=60.0)
    pool = shared_pool(min_size=1, max_size=2)
    try:
        with pool.connection() as conn:  # the breaker's target is the pool's server
            conn.execute("SELECT 1")
        breaker = breaker_of(installed, SHARED_SERVICE)
        held = pool.getconn()  # the only idle connection: the next getconn must wait
        trip(breaker)
        before = pool.get_stats()
        results = [timed(lambda: pool.connection().__enter__()) for _ in range(3)]
        results.append(timed(pool.getconn))
        for took, error in results:
            assert_pool_refusal(error, took)
        assert isinstance(error, CircuitOpenError)
        assert error.breaker == breaker.name
        assert error.retry_after is not None
        assert error.retry_after > 30
        # Counted as a refusal, as every refusal is.
        rejected = installed.of(CallRejected, breaker.name)
        assert len(rejected) == 4
        assert all(e.state is CircuitState.OPEN for e in rejected)
        finished = [e for e in installed.of(RecoveryFinished) if e.service == breaker.name]
        assert [e.outcome.value for e in finished] == ["rejected"] * 4
        # The pool's bookkeeping: requests counted, as errors; no waiter, no new connection.
        after = pool.get_stats()
        assert after["requests_num"] == before["requests_num"] + 4
        assert after.get("requests_errors", 0) == before.get("requests_errors", 0) + 4
        assert after.get("connections_num", 0) == before.get("connections_num", 0)
        assert_no_waiter(pool)
        # The connection the app held goes back, and is handed out again: idle, not refused.
        pool.putconn(held)
        conn = pool.getconn()
        assert conn is held
        pool.putconn(conn)
    finally:
        pool.close()


def test_an_idle_connection_is_still_handed_out(postgres: None, install: Install) -> None:
    """The pool has idle connections: they are handed out (the app's statement then meets
    the breaker as usual); only a getconn that would wait is refused."""
    installed = install(PsycopgIntegration)
    pool = shared_pool(min_size=2, max_size=2)
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        breaker = breaker_of(installed, SHARED_SERVICE)
        breaker.force_open()  # held open by hand: never time for a probe
        first, second = pool.getconn(), pool.getconn()
        with pytest.raises(raptor_psycopg.PsycopgCircuitOpen):
            first.execute("SELECT 1")  # the statement meets the breaker
        took, error = timed(pool.getconn)
        assert_pool_refusal(error, took)
        pool.putconn(first)
        pool.putconn(second)
        assert_no_waiter(pool)
        breaker.force_close()
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()


def test_the_caller_waits_for_the_probe_once_the_open_time_elapsed(
    postgres: None, install: Install
) -> None:
    """Open, with its open time elapsed: the caller waits as before, the pool's connect is
    the probe, and it closes the breaker (the server is up)."""
    installed = install(PsycopgIntegration, recovery_timeout=0.3)
    pool = shared_pool(min_size=1, max_size=2)
    try:
        breaker = breaker_of(installed, SHARED_SERVICE)
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        held = pool.getconn()
        trip(breaker)
        time.sleep(0.4)
        assert breaker.state is CircuitState.OPEN  # until a call asks
        _, error = timed(lambda: pool.putconn(pool.getconn()))
        assert error is None, repr(error)
        assert breaker.state is CircuitState.CLOSED
        assert installed.of(CallRejected, breaker.name) == []
        pool.putconn(held)
        assert_no_waiter(pool)
    finally:
        pool.close()


def test_a_half_open_breaker_lets_the_caller_wait(postgres: None, install: Install) -> None:
    """Half-open with its probe slot taken (a probe in flight elsewhere): the caller waits
    for a connection, which comes back to the pool meanwhile, rather than being refused."""
    installed = install(PsycopgIntegration, recovery_timeout=0.1)
    pool = shared_pool(min_size=1, max_size=1)
    try:
        breaker = breaker_of(installed, SHARED_SERVICE)
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        held = pool.getconn()
        trip(breaker)
        time.sleep(0.2)
        probe = breaker.acquire()  # the probe in flight: half-open, its slot taken
        assert breaker.state is CircuitState.HALF_OPEN
        timer = threading.Timer(0.3, pool.putconn, (held,))
        timer.start()
        try:
            took, error = timed(lambda: pool.putconn(pool.getconn()))
        finally:
            timer.join()
        assert error is None, repr(error)
        assert took >= 0.2
        breaker.release(probe)
        assert installed.of(CallRejected, breaker.name) == []
        assert_no_waiter(pool)
    finally:
        pool.close()


class JumpingClock:
    """The system's clock, which jumps ``by`` seconds ahead right after the ``after``-th
    reading from when it is armed: a breaker's open time that elapses between two
    readings."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.readings: int | None = None
        self.by = 0.0

    def arm(self, *, after: int, by: float) -> None:
        self.readings, self.by = after, by

    def monotonic(self) -> float:
        now = time.monotonic() + self.offset
        if self.readings is not None:
            self.readings -= 1
            if self.readings <= 0:
                self.offset += self.by
                self.readings = None
        return now

    def wall(self) -> float:
        return time.time() + self.offset

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def sleep_async(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def test_a_breaker_that_admits_after_all_lets_the_caller_wait(postgres: None) -> None:
    """The open time elapses between raptor's reading of the breaker and the attempt loop's
    admission: the loop admits the caller as the probe, which gives the slot back at once,
    and the caller waits for the pool's own connect, which is the probe (and closes the
    breaker: the server is up). Never a refusal."""
    clock = JumpingClock()
    runtime = Runtime(clock=clock)
    integration = PsycopgIntegration()
    integration.install(
        IntegrationSettings(runtime=runtime, config=fast_config(recovery_timeout=60.0))
    )
    installed = Installed(runtime, integration)
    try:
        pool = shared_pool(min_size=1, max_size=2)
        try:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
            breaker = breaker_of(installed, SHARED_SERVICE)
            held = pool.getconn()
            trip(breaker)
            clock.arm(after=1, by=120.0)  # after raptor's own reading, before the loop's
            _, error = timed(lambda: pool.putconn(pool.getconn()))
            assert error is None, repr(error)
            assert installed.of(CallRejected) == []
            states = [e.to_state for e in installed.of(BreakerTransitioned)]
            assert states[-2:] == [CircuitState.HALF_OPEN, CircuitState.CLOSED], states
            pool.putconn(held)
            assert_no_waiter(pool)
        finally:
            pool.close()
    finally:
        integration.uninstall()


def _raptor_calls(action: Any) -> list[str]:
    """The functions of otel_raptor that run during ``action()``."""
    seen: list[str] = []
    root = raptor_psycopg.__file__.rsplit("/integrations/", 1)[0]

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(root):
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return seen


def test_the_fast_path_is_unaffected_while_the_breaker_is_closed(
    postgres: None, install: Install
) -> None:
    """An idle connection is handed out by the hooks alone: no target looked up, nothing
    else of ours runs. A pool that must grow, breaker closed, waits and connects as before."""
    install(PsycopgIntegration)
    pool = shared_pool(min_size=1, max_size=2)
    try:
        conn = pool.getconn()
        pool.putconn(conn)
        calls = _raptor_calls(lambda: pool.putconn(pool.getconn()))
        assert calls == ["getconn", "_get_ready_connection"], calls
        assert not hasattr(pool, POOL_ATTRIBUTE)  # the server was never looked up
        # Growing, breaker closed: the pool's server is looked up once, then the caller
        # waits for the new connection as before.
        held = pool.getconn()
        other = pool.getconn()
        assert other is not held
        assert hasattr(pool, POOL_ATTRIBUTE)
        pool.putconn(other)
        pool.putconn(held)
        assert_no_waiter(pool)
    finally:
        pool.close()


def test_a_pool_with_a_callable_conninfo_learns_its_server_from_its_connections(
    postgres: None, install: Install
) -> None:
    """raptor never calls the pool's conninfo callable: the server is learned from the
    connections the pool opened."""
    installed = install(PsycopgIntegration)
    calls: list[int] = []

    def conninfo() -> str:
        calls.append(1)
        return PG_DSN

    pool = psycopg_pool.ConnectionPool(
        conninfo, min_size=1, max_size=1, timeout=POOL_TIMEOUT, open=False
    )
    pool.open(wait=True, timeout=10)
    try:
        held = pool.getconn()
        assert len(calls) == 1
        breaker_of(installed, SHARED_SERVICE).force_open()
        took, error = timed(pool.getconn)
        assert_pool_refusal(error, took)
        assert len(calls) == 1
        pool.putconn(held)
    finally:
        pool.close()


def test_uninstall_restores_the_pool(install: Install) -> None:
    originals = {
        (cls, name): vars(cls)[name]
        for cls in (psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool)
        for name in ("getconn", "_get_ready_connection", "_connect")
    }
    installed = install(PsycopgIntegration)
    for (cls, name), original in originals.items():
        assert vars(cls)[name] is not original
        assert vars(cls)[name].__wrapped__ is original
    assert asyncio.iscoroutinefunction(psycopg_pool.AsyncConnectionPool.getconn)
    installed.integration.uninstall()
    for (cls, name), original in originals.items():
        assert vars(cls)[name] is original


async def test_async_getconn_fails_fast_while_the_breaker_is_open(
    postgres: None, install: Install
) -> None:
    installed = install(PsycopgIntegration, recovery_timeout=60.0)
    pool = psycopg_pool.AsyncConnectionPool(
        PG_DSN, min_size=1, max_size=2, timeout=POOL_TIMEOUT, open=False
    )
    await pool.open(wait=True, timeout=10)
    try:
        breaker = breaker_of(installed, SHARED_SERVICE)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        held = await pool.getconn()
        trip(breaker)
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(psycopg_pool.PoolTimeout) as raised:
                async with pool.connection():
                    pass
            assert_pool_refusal(raised.value, time.monotonic() - began)
        assert len(installed.of(CallRejected, breaker.name)) == 3
        assert_no_waiter(pool)
        await pool.putconn(held)
        conn = await pool.getconn()  # idle: handed out
        assert conn is held
        await pool.putconn(conn)
    finally:
        await pool.close()


# -- the outage, end to end: a private server killed and started again -------------------------


@pytest.fixture
def pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


#: The breaker's open time: long enough to see refusals, short enough to recover.
RECOVERY_TIMEOUT = 2.0
#: Beyond the recovery timeout: the server's readiness, the pool's reconnect backoff (1 s,
#: 2 s, ...), a loaded machine.
SLACK_S = 6.0


def outage_settings() -> dict[str, Any]:
    return {"max_retries": 0, "failure_threshold": 3, "recovery_timeout": RECOVERY_TIMEOUT}


def wait_open(breaker: CircuitBreaker, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while breaker.state is not CircuitState.OPEN:
        assert time.monotonic() < deadline, f"the breaker never opened: {breaker!r}"
        time.sleep(0.02)


def test_pool_outage_fails_fast_then_recovers(pg: PrivatePostgres, install: Install) -> None:
    installed = install(PsycopgIntegration, **outage_settings())
    pool = psycopg_pool.ConnectionPool(
        f"{pg.dsn} connect_timeout=2",
        min_size=1,
        max_size=2,
        kwargs={"autocommit": True},
        timeout=POOL_TIMEOUT,
        open=False,
    )
    pool.open(wait=True, timeout=10)
    # Once the pool connected: the breaker is the integration's, with its settings.
    breaker = breaker_of(installed, f"postgresql://127.0.0.1:{pg.port}/postgres")

    def call() -> None:
        with pool.connection() as conn:
            conn.execute("SELECT 1").fetchone()

    try:
        for _ in range(3):
            call()
        pg.kill()
        took, error = timed(call)  # the idle connection, dead: the statement fails
        assert error is not None
        # The pool reconnects in the background; refused by the server, then by the breaker.
        wait_open(breaker, POOL_TIMEOUT)
        for _ in range(5):
            took, error = timed(call)
            assert_pool_refusal(error, took)
        assert_no_waiter(pool)
        pg.start()
        up = time.monotonic()
        while True:
            took, error = timed(call)
            if error is None:
                break
            assert time.monotonic() < up + RECOVERY_TIMEOUT + SLACK_S, repr(error)
            time.sleep(0.05)
        print(f"\nrecovered {time.monotonic() - up:.2f} s after the restart")
        for _ in range(5):
            call()
        assert breaker.state is CircuitState.CLOSED
        # Every slot usable: the pool's two connections at once, none waiting.
        first = pool.getconn(timeout=5)
        second = pool.getconn(timeout=5)
        pool.putconn(first)
        pool.putconn(second)
        assert_no_waiter(pool)
    finally:
        pool.close()


async def test_async_pool_outage_fails_fast_then_recovers(
    pg: PrivatePostgres, install: Install
) -> None:
    installed = install(PsycopgIntegration, **outage_settings())
    pool = psycopg_pool.AsyncConnectionPool(
        f"{pg.dsn} connect_timeout=2",
        min_size=1,
        max_size=2,
        kwargs={"autocommit": True},
        timeout=POOL_TIMEOUT,
        open=False,
    )
    await pool.open(wait=True, timeout=10)
    breaker = breaker_of(installed, f"postgresql://127.0.0.1:{pg.port}/postgres")

    async def call() -> None:
        async with pool.connection() as conn:
            await (await conn.execute("SELECT 1")).fetchone()

    async def timed_async() -> tuple[float, BaseException | None]:
        began = time.monotonic()
        try:
            await call()
        except Exception as error:  # the application's view
            return time.monotonic() - began, error
        return time.monotonic() - began, None

    try:
        for _ in range(3):
            await call()
        await asyncio.to_thread(pg.kill)
        took, error = await timed_async()
        assert error is not None
        deadline = time.monotonic() + POOL_TIMEOUT
        while breaker.state is not CircuitState.OPEN:
            assert time.monotonic() < deadline, f"the breaker never opened: {breaker!r}"
            await asyncio.sleep(0.02)
        for _ in range(5):
            took, error = await timed_async()
            assert_pool_refusal(error, took)
        assert_no_waiter(pool)
        await asyncio.to_thread(pg.start)
        up = time.monotonic()
        while True:
            took, error = await timed_async()
            if error is None:
                break
            assert time.monotonic() < up + RECOVERY_TIMEOUT + SLACK_S, repr(error)
            await asyncio.sleep(0.05)
        print(f"\nrecovered {time.monotonic() - up:.2f} s after the restart")
        for _ in range(5):
            await call()
        assert breaker.state is CircuitState.CLOSED
        first = await pool.getconn(timeout=5)
        second = await pool.getconn(timeout=5)
        await pool.putconn(first)
        await pool.putconn(second)
        assert_no_waiter(pool)
    finally:
        await pool.close()


def test_hooks_pass_on_whatever_arguments_they_get() -> None:
    """The hooks take any signature, as a later psycopg_pool might have."""
    seen: list[tuple[Any, ...]] = []

    def getconn(self: Any, timeout: float | None = None, *, wait: bool = True) -> str:
        seen.append((timeout, wait))
        return "conn"

    def ready(self: Any, timeout: float | None, extra: int) -> str:
        seen.append((timeout, extra))
        return "conn"

    assert raptor_psycopg._getconn_hook(getconn)(object(), 1.0, wait=False) == "conn"
    assert raptor_psycopg._ready_connection_hook(ready)(object(), 2.0, extra=3) == "conn"
    assert seen == [(1.0, False), (2.0, 3)]


def test_a_null_pool_fails_fast_as_its_connect_does(postgres: None, install: Install) -> None:
    """``NullConnectionPool`` connects in the caller: the breaker refuses that connect at
    once (the driver's fail-fast error), with nothing of the pool's left behind."""
    installed = install(PsycopgIntegration)
    pool = psycopg_pool.NullConnectionPool(PG_DSN, max_size=2, timeout=POOL_TIMEOUT, open=True)
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        breaker_of(installed, SHARED_SERVICE).force_open()
        took, error = timed(pool.getconn)
        assert isinstance(error, raptor_psycopg.PsycopgCircuitOpen), repr(error)
        assert took < FAST
        assert pool.get_stats()["pool_size"] == 0
        assert_no_waiter(pool)
    finally:
        pool.close()
