"""Stale pooled connections, end to end: the pools real applications use, on private servers
that reap idle sessions, restart, or die.

A statement that finds its pooled connection closed counts against the server's breaker only
when a failed reconnect confirms it (docs/databases.md, "A lost connection counts only when a
reconnect confirms it"). For each pool:

- **reaped**: the server closes the pool's idle connections (``pg_terminate_backend``,
  MariaDB's ``wait_timeout``, Redis's ``timeout``) and the application goes on: the breaker
  never opens, and the application's calls succeed as often as they do without raptor (the
  same scenario, run first without it);
- **restarted**: the server stops while the pool holds connections and starts again: the
  application is back to full success within the recovery timeout (plus the server's and the
  pool's own pacing) after the server is up, the half-open probes that meet the pool's stale
  connections notwithstanding;
- **killed**: the server dies and stays down: the breaker opens within a handful of calls and
  the calls it refuses fail fast, well under the connect timeout.

One private server of each kind serves the whole module (a test that leaves it down starts it
again for the next). Every call is made by one application thread, so a run is repeatable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pymysql
import pytest
import redis
import redis.asyncio

from otel_raptor import CircuitOpenError
from otel_raptor.core.events import BreakerTransitioned, ErrorClassified
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations.db.asyncpg import AsyncpgIntegration
from otel_raptor.integrations.db.psycopg import PsycopgIntegration
from otel_raptor.integrations.db.psycopg2 import Psycopg2Integration
from otel_raptor.integrations.db.pymysql import PyMySQLIntegration
from otel_raptor.integrations.db.redis import RedisIntegration
from tests.integrations.db.conftest import Install, Installed
from tests.support.dbservers import PrivateMariaDB, PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.timeout(120)

CONNECT_TIMEOUT = 2.0
RECOVERY_TIMEOUT = 0.5
#: Connections each pool holds when the server reaps or restarts.
POOL_SIZE = 4
#: Calls after a reaping: every stale connection met, then fresh ones.
CALLS = 2 * POOL_SIZE
#: The server is down this long in a restart.
DOWN_S = 0.8
#: Beyond the recovery timeout: the server's own readiness, a pool's first reconnect delay,
#: and a loaded machine shared with other tests.
SLACK_S = 1.5
#: A killed server's breaker opens within this many calls. Before the kill the window holds
#: more than ``minimum_calls`` (20) calls, so the breaker trips on the failure rate or on a
#: run of 20 counted failures: the pool's lost connections (held, then confirmed), then
#: reconnects of three attempts each (PyMySQL: 4 lost, then 6 refused connects), and the one
#: call in flight at the kill. Each lost connection counting at once would save no call.
HANDFUL = POOL_SIZE + 7


def settings() -> dict[str, Any]:
    return {"max_retries": 2, "failure_threshold": 3, "recovery_timeout": RECOVERY_TIMEOUT}


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Call:
    """One application call: when it began (monotonic), how long it took, how it ended."""

    began: float
    took: float
    ok: bool
    refused: bool  # an open breaker's CircuitOpenError
    error: str = ""


def _refused(error: BaseException) -> bool:
    # SQLAlchemy wraps the driver's error (raptor's refusal included) in its own.
    return isinstance(error, CircuitOpenError) or isinstance(
        getattr(error, "orig", None), CircuitOpenError
    )


def call_once(call: Callable[[], object]) -> Call:
    began = time.monotonic()
    try:
        call()
    except Exception as error:  # the application's view: any failure
        return Call(began, time.monotonic() - began, False, _refused(error), repr(error))
    return Call(began, time.monotonic() - began, True, False)


async def call_once_async(call: Callable[[], Awaitable[object]]) -> Call:
    began = time.monotonic()
    try:
        await call()
    except Exception as error:  # the application's view: any failure
        return Call(began, time.monotonic() - began, False, _refused(error), repr(error))
    return Call(began, time.monotonic() - began, True, False)


class Opened:
    """When the breaker opened (monotonic), as the bus publishes it."""

    def __init__(self, installed: Installed) -> None:
        self.times: list[float] = []
        self.reasons: list[Any] = []

        def seen(event: object) -> None:
            if isinstance(event, BreakerTransitioned) and event.to_state is CircuitState.OPEN:
                self.times.append(time.monotonic())
                self.reasons.append(event.reason)

        installed.runtime.bus.subscribe(seen)


# -- the three scenarios, for any application ------------------------------------------------


class App:
    """An application over one pool: ``warm`` makes the pool hold ``POOL_SIZE`` idle
    connections, ``call`` does one unit of work (raising what the pool or driver raises)."""

    def warm(self) -> None:
        raise NotImplementedError

    def call(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def reaped(app: App, reap: Callable[[], None]) -> list[Call]:
    try:
        app.warm()
        reap()
        calls = []
        for _ in range(CALLS):
            calls.append(call_once(app.call))
            time.sleep(0.02)
        return calls
    finally:
        app.close()


def check_reaped(
    baseline: list[Call], calls: list[Call], installed: Installed, *, lost: int = 0
) -> None:
    """As often as without raptor: no call refused, and no more failures than one per reaped
    connection or than without raptor (how many calls meet a stale connection before the
    pool replaces it varies by one or two from run to run, so the two runs' counts are not
    compared exactly); and the breaker never opened. ``lost``: at least this many calls met a
    stale connection (the held failures the breaker must not count)."""
    print(  # shown with pytest -s
        f"\nwithout raptor {sum(c.ok for c in baseline)}/{len(baseline)},"
        f" with {sum(c.ok for c in calls)}/{len(calls)}:"
        f" {[c.error[:60] for c in calls if not c.ok]}"
    )
    assert installed.of(BreakerTransitioned) == []
    assert not any(c.refused for c in calls)
    failed = len(calls) - sum(c.ok for c in calls)
    assert failed <= max(POOL_SIZE, len(baseline) - sum(c.ok for c in baseline))
    assert failed >= lost
    assert calls[-1].ok  # fresh connections at the end


@contextlib.contextmanager
def calling(app: App) -> Iterator[list[Call]]:
    """One application thread calls ``app`` 20 ms apart until the block ends (then the app is
    closed); yields the calls made so far."""
    calls: list[Call] = []
    done = threading.Event()

    def worker() -> None:
        while not done.is_set():
            calls.append(call_once(app.call))
            time.sleep(0.02)

    app.warm()
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        yield calls
    finally:
        done.set()
        thread.join(30)
        app.close()


def restarted(
    app: App, stop: Callable[[], None], start: Callable[[], None]
) -> tuple[list[Call], float]:
    """The server stops while the app calls, stays down ``DOWN_S`` and starts again. Returns
    the calls and when the server was up again."""
    with calling(app) as calls:
        time.sleep(0.3)
        stop()
        time.sleep(DOWN_S)
        start()
        up = time.monotonic()
        time.sleep(RECOVERY_TIMEOUT + SLACK_S + 0.5)
    return calls, up


def check_restarted(calls: list[Call], up: float) -> None:
    after = [c for c in calls if c.began > up]
    back = next((c.began for c in after if c.ok), None)
    settled = [c for c in after if c.began > up + RECOVERY_TIMEOUT + SLACK_S]
    print(
        f"\n{len(calls)} calls, {sum(not c.ok for c in calls)} failed"
        f" ({sum(c.refused for c in calls)} refused); first success"
        f" {None if back is None else round(back - up, 2)} s after the restart;"
        f" failures after it: {[(round(c.began - up, 2), c.error[:50]) for c in after if not c.ok]}"
    )
    assert back is not None, "the application never recovered"
    assert settled, "no call after the recovery window"
    assert all(c.ok for c in settled), [c.error for c in settled if not c.ok]


def killed(app: App, kill: Callable[[], None]) -> tuple[list[Call], float]:
    """The server is killed while the app calls, and stays down for the rest of the run.
    Returns the calls made from the kill on and when it began."""
    with calling(app) as calls:
        time.sleep(0.3)
        down = time.monotonic()
        kill()
        time.sleep(1.5)
    return [c for c in calls if c.began > down], down


def check_killed(calls: list[Call], opened: Opened, down: float) -> None:
    """The breaker opened within ``HANDFUL`` calls of the kill, and the calls it refused
    failed fast."""
    print(
        f"\n{len(calls)} calls after the kill: "
        f"{[('refused' if c.refused else c.error[:40], round(c.took, 3)) for c in calls[:12]]}"
    )
    assert opened.times, "the breaker never opened"
    assert opened.times[0] > down
    before = [c for c in calls if c.began < opened.times[0]]
    assert len(before) <= HANDFUL, f"{len(before)} calls before the breaker opened"
    assert not any(c.ok for c in calls if c.began > opened.times[0])
    refused = [c.took for c in calls if c.refused]
    assert refused, "no call failed fast"
    assert statistics.median(refused) < 0.01
    assert max(refused) < CONNECT_TIMEOUT / 4


# -- private servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def pg(pg_server: PrivatePostgres) -> PrivatePostgres:
    if not _listening(pg_server.port):  # a test before this one killed it
        pg_server.start()
    return pg_server


def terminate_others(server: PrivatePostgres) -> None:
    """A DBA's (or a pooler's) reaper: ``pg_terminate_backend`` of every other session, and
    wait until they are gone (a pool may open new ones meanwhile: those are left alone)."""
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        pids = [
            row[0]
            for row in admin.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
        ]
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "sessions survived pg_terminate_backend"
            time.sleep(0.02)


def pg_restart(server: PrivatePostgres) -> tuple[Callable[[], None], Callable[[], None]]:
    return server.stop, server.start  # pg_ctl stop -m fast, then start


@pytest.fixture(scope="module")
def mariadb_server() -> Iterator[PrivateMariaDB]:
    server = PrivateMariaDB()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def mariadb(mariadb_server: PrivateMariaDB) -> PrivateMariaDB:
    if not _listening(mariadb_server.port):
        mariadb_server.start()
    return mariadb_server


@pytest.fixture(scope="module")
def redis_timeout_server() -> Iterator[PrivateRedis]:
    server = PrivateRedis(options=("--timeout", "1"))  # idle clients closed after 1 s
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_timeout(redis_timeout_server: PrivateRedis) -> PrivateRedis:
    if not _listening(redis_timeout_server.port):
        redis_timeout_server.start()
    return redis_timeout_server


# -- psycopg + psycopg_pool --------------------------------------------------------------------


class PsycopgPoolApp(App):
    def __init__(self, server: PrivatePostgres, *, check: bool) -> None:
        pool_module: Any = pytest.importorskip("psycopg_pool", reason="psycopg_pool is absent")
        self.pool = pool_module.ConnectionPool(
            f"{server.dsn} connect_timeout={int(CONNECT_TIMEOUT)}",
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True},
            # The application's wait for a connection while the pool has none (30 s by
            # default): the pool's, not raptor's, so kept short here.
            timeout=1.0,
            check=pool_module.ConnectionPool.check_connection if check else None,
            open=False,
        )

    def warm(self) -> None:
        self.pool.open(wait=True, timeout=10)

    def call(self) -> None:
        with self.pool.connection() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        self.pool.close()


@pytest.mark.parametrize("check", [False, True], ids=["check=None", "check_connection"])
def test_psycopg_pool_reaped(
    pg: PrivatePostgres, install: Install, check: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a failed check the pool sleeps 1 s, 2 s, ... before the next (with or without
    # raptor): shorter here, so that every call gets a connection within the pool's timeout
    # and the two runs can be compared call for call.
    base: Any = pytest.importorskip("psycopg_pool.base", reason="psycopg_pool is absent")
    monkeypatch.setattr(base.AttemptWithBackoff, "INITIAL_DELAY", 0.02)
    baseline = reaped(PsycopgPoolApp(pg, check=check), lambda: terminate_others(pg))
    installed = install(PsycopgIntegration, **settings())
    calls = reaped(PsycopgPoolApp(pg, check=check), lambda: terminate_others(pg))
    # Without a check, each stale connection fails the statement that meets it (57P01).
    check_reaped(baseline, calls, installed, lost=0 if check else POOL_SIZE)


@pytest.mark.parametrize("check", [False, True], ids=["check=None", "check_connection"])
def test_psycopg_pool_restarted(
    pg: PrivatePostgres, install: Install, check: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool's own reconnects back off 1 s, 2 s, 4 s, ... while the server is down (with or
    # without raptor), so its first one after the restart may come seconds later: shorter
    # here, so that what is measured is the breaker's recovery.
    base: Any = pytest.importorskip("psycopg_pool.base", reason="psycopg_pool is absent")
    monkeypatch.setattr(base.AttemptWithBackoff, "INITIAL_DELAY", 0.1)
    install(PsycopgIntegration, **settings())
    calls, up = restarted(PsycopgPoolApp(pg, check=check), *pg_restart(pg))
    check_restarted(calls, up)


def test_psycopg_pool_killed(pg: PrivatePostgres, install: Install) -> None:
    # An open time longer than the pool's 1 s timeout: with 0.5 s, a caller that began
    # waiting just before the breaker opened came back after its open time had elapsed, and
    # the next caller waited too, as the probe (under load, no call was left to refuse).
    installed = install(PsycopgIntegration, **{**settings(), "recovery_timeout": 2.0})
    opened = Opened(installed)
    calls, down = killed(PsycopgPoolApp(pg, check=False), pg.kill)
    # The pool's stale connections fail (and are discarded) as the server dies; its
    # reconnects in the background, refused, confirm them and open the breaker, which then
    # refuses the reconnects that follow, and the callers' getconn, with no idle connection
    # to get (before the breaker opened, a caller waited for the pool's timeout).
    check_killed(calls, opened, down)
    assert max(c.took for c in calls) < 1.0 + 0.5


def test_psycopg_pool_check_keeps_healthy_connections_while_the_breaker_is_open(
    pg: PrivatePostgres, install: Install
) -> None:
    """``check_connection`` sends an empty statement to see that a connection is alive. An
    open breaker refused it, so the pool threw every healthy connection away as it checked
    it, and its reconnects, refused too, backed off for a second and more: after the breaker
    closed, the application waited for a connection (the pool's timeout) where it would have
    had one at once. The check now runs as without raptor while the breaker is not closed;
    the application's own statement is refused, fast, on a connection the pool keeps."""
    installed = install(PsycopgIntegration, **settings())
    app = PsycopgPoolApp(pg, check=True)
    app.warm()
    try:
        assert call_once(app.call).ok
        breaker = installed.runtime.breakers.get(f"postgresql://127.0.0.1:{pg.port}/postgres")
        breaker.force_open()  # as after a blip: the server is fine
        during = [call_once(app.call) for _ in range(POOL_SIZE + 1)]
        breaker.force_close()
        after = call_once(app.call)
        assert all(c.refused and c.took < 0.1 for c in during), during
        assert after.ok, after
        assert after.took < 0.1, after
        assert app.pool.get_stats().get("connections_lost", 0) == 0
    finally:
        app.close()


async def psycopg_async_pool_reaped(server: PrivatePostgres, *, check: bool) -> list[Call]:
    pool_module: Any = pytest.importorskip("psycopg_pool", reason="psycopg_pool is absent")
    pool = pool_module.AsyncConnectionPool(
        server.dsn,
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        kwargs={"autocommit": True},
        timeout=5.0,
        check=pool_module.AsyncConnectionPool.check_connection if check else None,
        open=False,
    )
    await pool.open(wait=True, timeout=10)

    async def call() -> None:
        async with pool.connection() as conn:
            await (await conn.execute("SELECT 1")).fetchone()

    try:
        await asyncio.to_thread(terminate_others, server)
        calls = []
        for _ in range(CALLS):
            calls.append(await call_once_async(call))
            await asyncio.sleep(0.02)
        return calls
    finally:
        await pool.close()


@pytest.mark.parametrize("check", [False, True], ids=["check=None", "check_connection"])
async def test_psycopg_async_pool_reaped(
    pg: PrivatePostgres, install: Install, check: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    base: Any = pytest.importorskip("psycopg_pool.base", reason="psycopg_pool is absent")
    monkeypatch.setattr(base.AttemptWithBackoff, "INITIAL_DELAY", 0.02)  # as above
    baseline = await psycopg_async_pool_reaped(pg, check=check)
    installed = install(PsycopgIntegration, **settings())
    calls = await psycopg_async_pool_reaped(pg, check=check)
    check_reaped(baseline, calls, installed, lost=0 if check else POOL_SIZE)


# -- SQLAlchemy over psycopg2 ------------------------------------------------------------------


class SqlAlchemyApp(App):
    def __init__(self, server: PrivatePostgres, *, pre_ping: bool) -> None:
        self.sa: Any = pytest.importorskip("sqlalchemy", reason="SQLAlchemy is absent")
        self.engine = self.sa.create_engine(
            f"postgresql+psycopg2://postgres@127.0.0.1:{server.port}/postgres",
            pool_size=POOL_SIZE,
            max_overflow=0,
            pool_timeout=1.0,
            pool_pre_ping=pre_ping,
            connect_args={"connect_timeout": int(CONNECT_TIMEOUT)},
        )

    def warm(self) -> None:
        held = [self.engine.connect() for _ in range(POOL_SIZE)]
        for conn in held:
            conn.execute(self.sa.text("SELECT 1"))
        for conn in held:
            conn.close()

    def call(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(self.sa.text("SELECT 1")).scalar()

    def close(self) -> None:
        self.engine.dispose()


PRE_PING = pytest.mark.parametrize("pre_ping", [False, True], ids=["no_pre_ping", "pre_ping"])


@PRE_PING
def test_sqlalchemy_psycopg2_reaped(pg: PrivatePostgres, install: Install, pre_ping: bool) -> None:
    baseline = reaped(SqlAlchemyApp(pg, pre_ping=pre_ping), lambda: terminate_others(pg))
    installed = install(Psycopg2Integration, **settings())
    calls = reaped(SqlAlchemyApp(pg, pre_ping=pre_ping), lambda: terminate_others(pg))
    # Without pre-ping the first call fails ("server closed the connection unexpectedly")
    # and SQLAlchemy invalidates the whole pool; with it, every ping on a stale connection
    # fails (held by the breaker), and SQLAlchemy reconnects.
    check_reaped(baseline, calls, installed, lost=0 if pre_ping else 1)


@PRE_PING
def test_sqlalchemy_psycopg2_restarted(
    pg: PrivatePostgres, install: Install, pre_ping: bool
) -> None:
    install(Psycopg2Integration, **settings())
    calls, up = restarted(SqlAlchemyApp(pg, pre_ping=pre_ping), *pg_restart(pg))
    check_restarted(calls, up)


@PRE_PING
def test_sqlalchemy_psycopg2_killed(pg: PrivatePostgres, install: Install, pre_ping: bool) -> None:
    installed = install(Psycopg2Integration, **settings())
    opened = Opened(installed)
    calls, down = killed(SqlAlchemyApp(pg, pre_ping=pre_ping), pg.kill)
    check_killed(calls, opened, down)


# -- asyncpg.create_pool -----------------------------------------------------------------------


async def asyncpg_pool(server: PrivatePostgres) -> Any:
    return await asyncpg.create_pool(
        host="127.0.0.1",
        port=server.port,
        user="postgres",
        database="postgres",
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        timeout=CONNECT_TIMEOUT,
    )


async def asyncpg_reaped(server: PrivatePostgres) -> list[Call]:
    pool = await asyncpg_pool(server)
    try:
        await asyncio.to_thread(terminate_others, server)
        calls = []
        for _ in range(CALLS):
            calls.append(await call_once_async(lambda: pool.fetchval("SELECT 1")))
            await asyncio.sleep(0.02)
        return calls
    finally:
        await pool.close()


async def test_asyncpg_pool_reaped(pg: PrivatePostgres, install: Install) -> None:
    baseline = await asyncpg_reaped(pg)
    installed = install(AsyncpgIntegration, **settings())
    calls = await asyncpg_reaped(pg)
    check_reaped(baseline, calls, installed)


async def asyncpg_workload(
    server: PrivatePostgres, outage: Callable[[], None], restore: Callable[[], None] | None
) -> tuple[list[Call], float, float]:
    pool = await asyncpg_pool(server)
    calls: list[Call] = []
    done = asyncio.Event()

    async def worker() -> None:
        while not done.is_set():
            calls.append(await call_once_async(lambda: pool.fetchval("SELECT 1")))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(worker())
    try:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(outage)
        down = time.monotonic()
        if restore is None:
            await asyncio.sleep(1.5)
            return calls, down, down
        await asyncio.sleep(DOWN_S)
        await asyncio.to_thread(restore)
        up = time.monotonic()
        await asyncio.sleep(RECOVERY_TIMEOUT + SLACK_S + 0.5)
        return calls, down, up
    finally:
        done.set()
        await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 5)


async def test_asyncpg_pool_restarted(pg: PrivatePostgres, install: Install) -> None:
    install(AsyncpgIntegration, **settings())
    calls, _, up = await asyncpg_workload(pg, *pg_restart(pg))
    check_restarted(calls, up)


async def test_asyncpg_pool_killed(pg: PrivatePostgres, install: Install) -> None:
    installed = install(AsyncpgIntegration, **settings())
    opened = Opened(installed)
    calls, down, _ = await asyncpg_workload(pg, pg.kill, None)
    check_killed([c for c in calls if c.began > down], opened, down)


# -- PyMySQL, reconnecting on error ------------------------------------------------------------


class PyMySQLApp(App):
    """A hand-made pool of ``POOL_SIZE`` PyMySQL connections, used in turn; a call that fails
    drops its connection, and the next call in its place connects again."""

    def __init__(self, server: PrivateMariaDB) -> None:
        self.port = server.port
        self.conns: list[Any] = []
        self.turn = 0

    def _connect(self) -> Any:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user="root",
            autocommit=True,
            connect_timeout=int(CONNECT_TIMEOUT),
            ssl_disabled=True,
        )

    def warm(self) -> None:
        self.conns = [self._connect() for _ in range(POOL_SIZE)]

    def call(self) -> None:
        slot = self.turn % POOL_SIZE
        self.turn += 1
        conn = self.conns[slot]
        if conn is None:
            conn = self.conns[slot] = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
        except pymysql.err.MySQLError:
            self.conns[slot] = None
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


def mariadb_wait_timeout(server: PrivateMariaDB, seconds: int) -> None:
    conn = pymysql.connect(host="127.0.0.1", port=server.port, user="root", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET GLOBAL wait_timeout = {seconds}")
    finally:
        conn.close()


def mariadb_reaped(server: PrivateMariaDB) -> None:
    """Wait until the server has ended every session but the one asking (``wait_timeout``)."""
    deadline = time.monotonic() + 15
    while True:
        conn = pymysql.connect(host="127.0.0.1", port=server.port, user="root", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM information_schema.PROCESSLIST"
                    " WHERE ID <> CONNECTION_ID() AND COMMAND <> 'Daemon'"
                )
                (others,) = cur.fetchone()
        finally:
            conn.close()
        if others == 0:
            return
        assert time.monotonic() < deadline, f"{others} sessions outlived wait_timeout"
        time.sleep(0.05)


def test_pymysql_reaped_by_wait_timeout(mariadb: PrivateMariaDB, install: Install) -> None:
    mariadb_wait_timeout(mariadb, 1)  # private server: new sessions get 1 s
    try:

        def reap() -> None:
            mariadb_reaped(mariadb)

        baseline = reaped(PyMySQLApp(mariadb), reap)
        installed = install(PyMySQLIntegration, **settings())
        calls = reaped(PyMySQLApp(mariadb), reap)
    finally:
        mariadb_wait_timeout(mariadb, 28800)
    check_reaped(baseline, calls, installed, lost=POOL_SIZE)


def test_pymysql_restarted(mariadb: PrivateMariaDB, install: Install) -> None:
    install(PyMySQLIntegration, **settings())
    calls, up = restarted(PyMySQLApp(mariadb), mariadb.shutdown, mariadb.start)
    check_restarted(calls, up)


def test_pymysql_killed(mariadb: PrivateMariaDB, install: Install) -> None:
    installed = install(PyMySQLIntegration, **settings())
    opened = Opened(installed)
    calls, down = killed(PyMySQLApp(mariadb), mariadb.kill)
    check_killed(calls, opened, down)


# -- redis-py's pool, on a server with ``timeout 1`` -------------------------------------------


def redis_reaped(server: PrivateRedis) -> None:
    """Wait until the server (``timeout 1``) has closed every idle client: it does so within
    a second or two of their last command, as its cron goes by."""
    deadline = time.monotonic() + 15
    while (clients := server._command(b"CLIENT", b"LIST").count(b"id=")) != 1:  # the asker
        assert time.monotonic() < deadline, f"{clients - 1} idle clients were never closed"
        time.sleep(0.05)


class RedisApp(App):
    def __init__(self, server: PrivateRedis) -> None:
        self.client = redis.Redis(
            host="127.0.0.1", port=server.port, socket_connect_timeout=CONNECT_TIMEOUT
        )

    def warm(self) -> None:
        pool = self.client.connection_pool
        held = [pool.get_connection() for _ in range(POOL_SIZE)]
        for conn in held:
            conn.send_command("PING")
            assert conn.read_response() == b"PONG"
        for conn in held:
            pool.release(conn)

    def call(self) -> None:
        self.client.incr("calls")

    def close(self) -> None:
        self.client.close()


def test_redis_reaped_by_timeout(redis_timeout: PrivateRedis, install: Install) -> None:
    def reap() -> None:
        redis_reaped(redis_timeout)

    baseline = reaped(RedisApp(redis_timeout), reap)
    installed = install(RedisIntegration, **settings())
    calls = reaped(RedisApp(redis_timeout), reap)
    check_reaped(baseline, calls, installed)


def test_redis_restarted(redis_timeout: PrivateRedis, install: Install) -> None:
    install(RedisIntegration, **settings())
    calls, up = restarted(
        RedisApp(redis_timeout), redis_timeout.shutdown_nosave, redis_timeout.start
    )
    check_restarted(calls, up)


def test_redis_killed(redis_timeout: PrivateRedis, install: Install) -> None:
    installed = install(RedisIntegration, **settings())
    opened = Opened(installed)
    calls, down = killed(RedisApp(redis_timeout), redis_timeout.shutdown_nosave)
    check_killed(calls, opened, down)


# -- redis-py's health check, on a server with ``timeout 1`` -----------------------------------


class RedisHealthCheckApp(App):
    """``POOL_SIZE`` clients of one connection each (``single_connection_client``: the client
    keeps its connection, where the pool's ``can_read`` check would replace a reaped one
    before the command), with redis-py's health check: after a quiet spell, each client's
    next command first sends ``PING`` on the connection, which the server closed."""

    def __init__(self, server: PrivateRedis) -> None:
        self.clients = [
            redis.Redis(
                host="127.0.0.1",
                port=server.port,
                socket_connect_timeout=CONNECT_TIMEOUT,
                single_connection_client=True,
                health_check_interval=1,
            )
            for _ in range(POOL_SIZE)
        ]
        self.turn = 0

    def warm(self) -> None:
        for client in self.clients:
            assert client.ping()

    def call(self) -> None:
        client = self.clients[self.turn % POOL_SIZE]
        self.turn += 1
        client.incr("calls")

    def close(self) -> None:
        for client in self.clients:
            client.close()


def test_redis_health_check_reaped_by_timeout(
    redis_timeout: PrivateRedis, install: Install
) -> None:
    """The health check's failed ``PING`` on each reaped connection is a lost connection,
    held unconfirmed and dropped by the reconnect that serves the command: counted at once,
    the four of them opened the breaker of a server serving every new connection."""

    def reap() -> None:
        redis_reaped(redis_timeout)

    baseline = reaped(RedisHealthCheckApp(redis_timeout), reap)
    installed = install(RedisIntegration, **settings())
    calls = reaped(RedisHealthCheckApp(redis_timeout), reap)
    check_reaped(baseline, calls, installed)
    # The PINGs failed, and were sent again as commands never sent: every call served, and
    # the lost connections were dropped by the reconnects, counted nowhere (each counted, a
    # success between them, would not trip the consecutive rule, but fills the window).
    assert all(c.ok for c in calls), [c.error for c in calls if not c.ok]
    breaker = installed.runtime.breakers.get(f"redis://127.0.0.1:{redis_timeout.port}/0")
    assert len(installed.of(ErrorClassified)) >= POOL_SIZE  # the PINGs did fail
    assert breaker.snapshot().window_failures == 0


def test_redis_asyncio_health_check_reaped_by_timeout(
    redis_timeout: PrivateRedis, install: Install
) -> None:
    """As above, with ``redis.asyncio`` (its health check fails the same way)."""
    installed = install(RedisIntegration, **settings())

    async def run() -> None:
        clients = [
            redis.asyncio.Redis(
                host="127.0.0.1",
                port=redis_timeout.port,
                socket_connect_timeout=CONNECT_TIMEOUT,
                single_connection_client=True,
                health_check_interval=1,
            )
            for _ in range(POOL_SIZE)
        ]
        try:
            for client in clients:
                assert await client.ping()
            await asyncio.to_thread(redis_reaped, redis_timeout)
            for client in clients:
                await client.incr("calls")  # served: the PING failed, the command was resent
        finally:
            for client in clients:
                await client.aclose()

    asyncio.run(run())
    assert len(installed.of(ErrorClassified)) >= POOL_SIZE
    assert installed.of(BreakerTransitioned) == []
    breaker = installed.runtime.breakers.get(f"redis://127.0.0.1:{redis_timeout.port}/0")
    assert breaker.snapshot().window_failures == 0


def test_redis_health_check_killed(redis_timeout: PrivateRedis, install: Install) -> None:
    """A server that dies during a quiet spell: each client's health-check ``PING`` fails
    (held unconfirmed), and the reconnect that follows is refused, which counts, and the
    lost connections with it: the breaker opens as fast as before."""
    installed = install(RedisIntegration, **settings())
    opened = Opened(installed)
    app = RedisHealthCheckApp(redis_timeout)
    try:
        app.warm()
        time.sleep(1.2)  # every client's health check is due
        down = time.monotonic()
        redis_timeout.shutdown_nosave()
        calls = []
        for _ in range(3 * POOL_SIZE):
            calls.append(call_once(app.call))
            time.sleep(0.02)
    finally:
        app.close()
    check_killed(calls, opened, down)
