"""What counts against a database server's breaker: only evidence that the server is out.

An application that makes the same mistake again and again (a PL/pgSQL ``RAISE``, a MySQL
``SIGNAL``, statements its own statement timeout stops, a closed cursor, a bad argument) gets
its errors as always, and every other caller of the same healthy server goes on working:
the breaker stays closed (``failure_threshold`` is 3 here, so six mistakes would trip it if
they counted)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg2
import pymysql
import pytest

from otel_raptor import CircuitOpenError
from otel_raptor.core.events import BreakerTransitioned, RecoveryFinished
from otel_raptor.integrations.db.asyncpg import AsyncpgIntegration
from otel_raptor.integrations.db.psycopg import PsycopgIntegration
from otel_raptor.integrations.db.psycopg2 import Psycopg2Integration
from otel_raptor.integrations.db.pymysql import PyMySQLIntegration
from otel_raptor.integrations.db.sqlite3 import SQLiteIntegration
from tests.integrations.db.conftest import (
    MYSQL_KWARGS,
    PG_DSN,
    PG_URL,
    Install,
    cancel_acknowledged,
)

MISTAKES = 6


def make_mistakes(mistake: Callable[[], object], expected: type[BaseException]) -> None:
    for _ in range(MISTAKES):
        with pytest.raises(expected):
            mistake()


def raise_in_plpgsql(cur: Any) -> None:
    cur.execute("DO $$ BEGIN RAISE EXCEPTION 'insufficient funds'; END $$")


@pytest.mark.usefixtures("postgres")
def test_psycopg_app_errors_leave_the_breaker_closed(install: Install) -> None:
    installed = install(PsycopgIntegration, failure_threshold=3)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        make_mistakes(lambda: raise_in_plpgsql(conn.cursor()), psycopg.errors.RaiseException)
        conn.execute("SET statement_timeout = '10ms'")
        make_mistakes(lambda: conn.execute("SELECT pg_sleep(0.2)"), psycopg.errors.QueryCanceled)
        closed = conn.cursor()
        closed.close()
        make_mistakes(lambda: closed.execute("SELECT 1"), psycopg.InterfaceError)
        make_mistakes(lambda: conn.execute("SELECT %s", (1, 2)), psycopg.ProgrammingError)
    with psycopg.connect(PG_DSN) as other:  # another caller of the same server
        assert other.execute("SELECT 1").fetchone() == (1,)
    assert installed.of(BreakerTransitioned) == []


@pytest.mark.usefixtures("postgres")
def test_a_closed_psycopg_connection_reused_leaves_the_breaker_closed(install: Install) -> None:
    # psycopg says "the connection is closed" (an OperationalError, from its own check in the
    # client) to a connection the app closed, or lost earlier (that loss counted when it
    # happened). Counted as a lost connection, a worker looping on its dead connection kept
    # every other caller of the healthy server out, and failed the half-open probes too.
    installed = install(PsycopgIntegration, failure_threshold=3)
    dead = psycopg.connect(PG_DSN, autocommit=True)
    cursor = dead.cursor()  # a worker's cursor, kept across calls
    dead.close()
    make_mistakes(lambda: cursor.execute("SELECT 1"), psycopg.OperationalError)
    with psycopg.connect(PG_DSN) as other:
        assert other.execute("SELECT 1").fetchone() == (1,)
    assert installed.of(BreakerTransitioned) == []


def wait_until_ended(pids: list[int], timeout: float = 10.0) -> None:
    """Until the server has ended the sessions of ``pids`` (their idle limit reaped them):
    a fixed sleep past the limit was not always enough on a loaded runner."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "the server never ended the idle sessions"
            time.sleep(0.05)


@pytest.mark.usefixtures("postgres")
def test_idle_session_timeouts_leave_the_breaker_closed(install: Install) -> None:
    # 57P05: the server ended a session idle past idle_session_timeout (a DBA's reaper of
    # idle connections), which its next statement learns. The session's own limit, as 25P03
    # is: counted as a lost connection, a burst on a pool's stale connections after a quiet
    # spell shut every caller out of a healthy server.
    installed = install(PsycopgIntegration, failure_threshold=3)
    idle = [psycopg.connect(PG_DSN, autocommit=True) for _ in range(MISTAKES)]
    try:
        for conn in idle:
            conn.execute("SET idle_session_timeout = '50ms'")
        cursors = [conn.cursor() for conn in idle]
        wait_until_ended([conn.info.backend_pid for conn in idle])
        for cursor in cursors:
            with pytest.raises(psycopg.errors.IdleSessionTimeout):
                cursor.execute("SELECT 1")
    finally:
        for conn in idle:
            conn.close()
    with psycopg.connect(PG_DSN) as other:
        assert other.execute("SELECT 1").fetchone() == (1,)
    assert installed.of(BreakerTransitioned) == []


IDLE_TIMEOUTS = [
    ("idle_in_transaction_session_timeout", True),  # 25P03: the open transaction is gone
    ("idle_session_timeout", False),  # 57P05
]


def _idle_timed_out(module: Any, setting: str, in_transaction: bool) -> Any:
    """A connection whose server session will end for ``setting`` while it idles (after an
    ``INSERT`` that an open transaction, when ``in_transaction``, holds uncommitted)."""
    conn = module.connect(f"{PG_DSN} options='-c {setting}=50ms'")
    conn.autocommit = not in_transaction
    if in_transaction:
        conn.cursor().execute("INSERT INTO raptor_idle_rows VALUES (1)")
    return conn


@pytest.fixture
def idle_rows() -> Iterator[Callable[[], int]]:
    admin = psycopg.connect(PG_DSN, autocommit=True)
    admin.execute("CREATE TABLE IF NOT EXISTS raptor_idle_rows (v int)")
    admin.execute("DELETE FROM raptor_idle_rows")
    yield lambda: int(admin.execute("SELECT count(*) FROM raptor_idle_rows").fetchone()[0])
    admin.execute("DROP TABLE IF EXISTS raptor_idle_rows")
    admin.close()


@pytest.mark.usefixtures("postgres")
@pytest.mark.parametrize(("setting", "in_transaction"), IDLE_TIMEOUTS)
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_idle_timeouts_reach_the_app_as_they_are_and_are_never_replayed(
    install: Install,
    idle_rows: Callable[[], int],
    driver: str,
    setting: str,
    in_transaction: bool,
) -> None:
    """The server ended sessions idle past their limit; their next statement fails. Nothing
    is sent again (the transaction is gone; the connection too), the app gets the driver's
    own error, and a pool's stale connections meeting it after a quiet spell do not shut the
    other callers out of a healthy server. psycopg (57P05, 25P03) says which limit it was;
    psycopg2 gets no SQLSTATE, only "server closed the connection unexpectedly", which a
    server that went down also says: it counts only if a reconnect fails too, and here the
    next connect succeeds."""
    module: Any = psycopg if driver == "psycopg" else psycopg2
    integration = PsycopgIntegration if driver == "psycopg" else Psycopg2Integration
    installed = install(integration, failure_threshold=3)
    idle = [_idle_timed_out(module, setting, in_transaction) for _ in range(MISTAKES)]
    try:
        cursors = [conn.cursor() for conn in idle]
        pids = [
            conn.info.backend_pid if driver == "psycopg" else conn.get_backend_pid()
            for conn in idle
        ]
        wait_until_ended(pids)
        for cursor in cursors:
            with pytest.raises(module.Error) as raised:
                cursor.execute("INSERT INTO raptor_idle_rows VALUES (2)")
            assert not isinstance(raised.value, CircuitOpenError)
    finally:
        for conn in idle:
            conn.close()
    assert idle_rows() == 0
    assert [f.attempts for f in installed.of(RecoveryFinished)] == [1] * MISTAKES
    other = module.connect(PG_DSN)
    try:
        cursor = other.cursor()
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    finally:
        other.close()
    assert installed.of(BreakerTransitioned) == []


@pytest.mark.usefixtures("postgres")
def test_idle_sessions_an_admin_terminated_open_no_breaker(install: Install) -> None:
    """``pg_terminate_backend`` on idle sessions (a reaper of idle connections): their next
    statement fails with 57P01. The server is up and serves every other caller."""
    module: Any = psycopg
    installed = install(PsycopgIntegration, failure_threshold=3)
    idle = [module.connect(PG_DSN) for _ in range(MISTAKES)]
    try:
        for conn in idle:
            conn.autocommit = True
        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            for conn in idle:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        time.sleep(0.2)
        for conn in idle:
            with pytest.raises(module.OperationalError) as raised:
                conn.cursor().execute("SELECT 1")
            assert not isinstance(raised.value, CircuitOpenError)
    finally:
        for conn in idle:
            conn.close()
    assert installed.of(BreakerTransitioned) == []


@pytest.mark.usefixtures("postgres")
async def test_asyncpg_statement_timeouts_leave_the_breaker_closed(install: Install) -> None:
    # asyncpg's own timeout is its statement timeout: a bare TimeoutError, which must count no
    # more than the other drivers' 57014 (in a transaction or not).
    installed = install(AsyncpgIntegration, failure_threshold=3)
    con = await asyncpg.connect(PG_URL)
    try:
        for _ in range(MISTAKES):  # in a row: no statement in between could end the run
            await cancel_acknowledged(con)
            with pytest.raises(asyncio.TimeoutError):
                await con.fetchval("SELECT pg_sleep(0.2)", timeout=0.02)
        for _ in range(MISTAKES):
            with pytest.raises(asyncio.TimeoutError):
                async with con.transaction():
                    await con.fetchval("SELECT pg_sleep(0.2)", timeout=0.02)
        assert await con.fetchval("SELECT 1") == 1
    finally:
        await con.close()
    assert installed.of(BreakerTransitioned) == []


async def test_asyncpg_default_statement_timeouts_leave_the_breaker_closed(
    install: Install,
) -> None:
    # raptor's default statement timeout on asyncpg is the server's: SQLSTATE 57014.
    installed = install(AsyncpgIntegration, failure_threshold=3, statement_timeout=0.02)
    con = await asyncpg.connect(PG_URL)
    try:
        for _ in range(MISTAKES):
            with pytest.raises(asyncpg.exceptions.QueryCanceledError):
                await con.fetchval("SELECT pg_sleep(0.2)")
        assert await con.fetchval("SELECT 1") == 1
    finally:
        await con.close()
    assert installed.of(BreakerTransitioned) == []


@pytest.mark.usefixtures("postgres")
def test_psycopg2_app_errors_leave_the_breaker_closed(install: Install) -> None:
    installed = install(Psycopg2Integration, failure_threshold=3)
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    try:
        make_mistakes(lambda: raise_in_plpgsql(conn.cursor()), psycopg2.errors.RaiseException)
        make_mistakes(lambda: conn.cursor().execute("SELECT %s", (1, 2)), TypeError)
        closed = conn.cursor()
        closed.close()
        make_mistakes(lambda: closed.execute("SELECT 1"), psycopg2.InterfaceError)
    finally:
        conn.close()
    other = psycopg2.connect(PG_DSN)
    try:
        cur = other.cursor()
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    finally:
        other.close()
    assert installed.of(BreakerTransitioned) == []


@pytest.mark.usefixtures("postgres")
def test_a_query_past_its_configured_limit_leaves_the_breaker_closed(install: Install) -> None:
    # 53400 configuration_limit_exceeded: a heavy report query spilling past temp_file_limit
    # (set by many managed services) is that query's doing; as insufficient_resources it
    # counted, and a report rerun a few times shut every caller out of a healthy server.
    installed = install(Psycopg2Integration, failure_threshold=3)
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    try:
        cur = conn.cursor()
        cur.execute("SET work_mem = '64kB'")
        cur.execute("SET temp_file_limit = '100kB'")
        make_mistakes(
            lambda: cur.execute("SELECT g FROM generate_series(1, 200000) g ORDER BY g DESC"),
            psycopg2.errors.ConfigurationLimitExceeded,
        )
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    finally:
        conn.close()
    assert installed.of(BreakerTransitioned) == []


@pytest.mark.usefixtures("mysql")
def test_pymysql_app_errors_leave_the_breaker_closed(install: Install) -> None:
    installed = install(PyMySQLIntegration, failure_threshold=3)
    conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    try:
        cur = conn.cursor()
        make_mistakes(
            lambda: cur.execute("SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'no'"),
            pymysql.err.OperationalError,
        )
        make_mistakes(
            lambda: cur.execute("SELECT (SELECT 1 UNION SELECT 2)"),
            pymysql.err.OperationalError,
        )
        cur.execute("SET SESSION max_statement_time = 0.01")
        make_mistakes(lambda: cur.execute("SELECT SLEEP(0.2)"), pymysql.err.OperationalError)
    finally:
        conn.close()
    make_mistakes(lambda: conn.cursor().execute("SELECT 1"), pymysql.err.Error)  # closed
    other = pymysql.connect(**MYSQL_KWARGS)
    try:
        with other.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        other.close()
    assert installed.of(BreakerTransitioned) == []


@pytest.mark.usefixtures("mysql")
def test_a_full_table_leaves_the_breaker_closed(install: Install) -> None:
    # 1114 "The table is full": a MEMORY table (or an in-memory temporary table) at its size
    # limit is that table's, and 1038 (out of sort memory) that query's: as out_of_resources
    # they counted, and an app filling one table shut every caller out of a healthy server.
    installed = install(PyMySQLIntegration, failure_threshold=3)
    conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute("SET SESSION max_heap_table_size = 16384")
        cur.execute("CREATE TEMPORARY TABLE full_table (v CHAR(200)) ENGINE=MEMORY")
        make_mistakes(
            lambda: cur.execute("INSERT INTO full_table SELECT REPEAT('x', 200) FROM seq_1_to_500"),
            pymysql.err.OperationalError,
        )
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    finally:
        conn.close()
    assert installed.of(BreakerTransitioned) == []


def test_sqlite3_app_errors_leave_the_breaker_closed(install: Install, tmp_path: Path) -> None:
    installed = install(SQLiteIntegration, failure_threshold=3)
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    try:
        make_mistakes(
            lambda: conn.execute("SELECT json_extract('{not json', '$.a')"),
            sqlite3.OperationalError,
        )
    finally:
        conn.close()
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT 1").fetchone() == (1,)
    finally:
        other.close()
    assert installed.of(BreakerTransitioned) == []


@pytest.mark.usefixtures("mysql")
@pytest.mark.parametrize("in_transaction", [False, True])
def test_pymysql_sessions_ended_for_wait_timeout_are_never_replayed(
    install: Install, unique_name: str, in_transaction: bool
) -> None:
    """The server ended sessions idle past ``wait_timeout`` (8 hours by default: a pool's
    connections after a quiet night); their next statement fails with "MySQL server has gone
    away" or "Lost connection". Nothing is sent again (the connection is gone; an open
    transaction with it), the app gets PyMySQL's own error, and the breaker stays closed:
    a lost connection counts only if the reconnect after it fails too."""
    admin = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {unique_name} (v INT)")
    try:
        installed = install(PyMySQLIntegration, failure_threshold=3)
        idle = [pymysql.connect(**MYSQL_KWARGS, autocommit=not in_transaction) for _ in range(4)]
        try:
            for conn in idle:
                with conn.cursor() as cur:
                    cur.execute("SET SESSION wait_timeout = 1")
                    if in_transaction:
                        cur.execute(f"INSERT INTO {unique_name} VALUES (1)")
            time.sleep(2.5)  # the server checks wait_timeout in whole seconds
            for conn in idle:
                with pytest.raises(pymysql.err.OperationalError) as raised:
                    conn.cursor().execute(f"INSERT INTO {unique_name} VALUES (2)")
                assert not isinstance(raised.value, CircuitOpenError)
        finally:
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.close()
        assert [f.attempts for f in installed.of(RecoveryFinished)] == [1] * len(idle)
        with admin.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {unique_name}")
            assert cur.fetchone() == (0,)
        pymysql.connect(**MYSQL_KWARGS).close()  # the pool's reconnect
        assert installed.of(BreakerTransitioned) == []
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {unique_name}")
        admin.close()
