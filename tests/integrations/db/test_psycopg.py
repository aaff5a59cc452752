"""The psycopg (3) integration against the real PostgreSQL, sync and async.

Faults come from the server itself (a PL/pgSQL function that raises a chosen SQLSTATE the
first N times it runs, counted by a sequence, which no rollback undoes), from a
fault-injecting TCP proxy (a response lost after the statement ran, a blackhole, refused
connections), and from ports where nothing listens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg2
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from otel_raptor import CircuitOpenError
from otel_raptor.config import DownstreamOverride
from otel_raptor.core.events import (
    BreakerTransitioned,
    ErrorClassified,
    RecoveryFinished,
    RetryScheduled,
)
from otel_raptor.core.recovery import Outcome
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations.db import psycopg as integration
from otel_raptor.integrations.db.psycopg import PsycopgIntegration, circuit_open_error_type
from otel_raptor.runtime.safety import _reset_for_tests
from tests.integrations.db.conftest import PG_DSN, Install
from tests.support.dbservers import PrivatePostgres, free_port
from tests.support.services import POSTGRES
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.usefixtures("postgres")

ORIGINAL_EXECUTE = psycopg.Cursor.execute
ORIGINAL_CONNECT = psycopg.Connection.__dict__["connect"]
ORIGINAL_MODULE_CONNECT = psycopg.connect
SERVICE = f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"


@pytest.fixture
def admin() -> Iterator[Any]:
    """An unguarded psycopg2 connection (psycopg2's integration is not installed here)."""
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def table(admin: Any, unique_name: str) -> Iterator[str]:
    """A table ``(v int)``, a sequence, and ``<table>_flaky(n, sqlstate)``: raises
    ``sqlstate`` the first ``n`` times it is called, then returns 1."""
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {unique_name} (v int)")
        cur.execute(f"CREATE SEQUENCE {unique_name}_seq")
        cur.execute(
            f"""CREATE FUNCTION {unique_name}_flaky(times int, code text) RETURNS int
            LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('{unique_name}_seq') <= times THEN
                    RAISE EXCEPTION 'injected %', code USING ERRCODE = code;
                END IF;
                RETURN 1;
            END $$"""
        )
    yield unique_name
    with admin.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {unique_name}")
        cur.execute(f"DROP FUNCTION IF EXISTS {unique_name}_planned()")
        cur.execute(f"DROP FUNCTION IF EXISTS {unique_name}_flaky(int, text)")
        cur.execute(f"DROP SEQUENCE IF EXISTS {unique_name}_seq")


def rows(admin: Any, table: str) -> int:
    with admin.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return int(cur.fetchone()[0])


def calls(admin: Any, table: str) -> int:
    """How many times the flaky function ran."""
    with admin.cursor() as cur:
        cur.execute(f"SELECT last_value, is_called FROM {table}_seq")
        value, called = cur.fetchone()
        return int(value) if called else 0


# --- hooks ---------------------------------------------------------------------------------------


def test_install_and_uninstall_restore_the_very_same_objects(install: Install) -> None:
    installed = install(PsycopgIntegration)
    assert psycopg.Cursor.execute is not ORIGINAL_EXECUTE
    installed.integration.install(installed.integration._state.settings)  # again: no 2nd layer
    assert psycopg.Cursor.execute.__wrapped__ is ORIGINAL_EXECUTE
    installed.integration.uninstall()
    assert psycopg.Cursor.execute is ORIGINAL_EXECUTE
    assert psycopg.Connection.__dict__["connect"] is ORIGINAL_CONNECT
    assert psycopg.connect is ORIGINAL_MODULE_CONNECT


def test_subclasses_still_build_their_own_class(install: Install) -> None:
    class Mine(psycopg.Connection):  # type: ignore[type-arg]
        pass

    installed = install(PsycopgIntegration)
    with Mine.connect(PG_DSN) as conn:
        assert type(conn) is Mine
        assert conn.execute("SELECT 1").fetchone() == (1,)
    installed.integration.uninstall()
    with Mine.connect(PG_DSN) as conn:  # after uninstall: the classmethod is whole again
        assert type(conn) is Mine


def test_a_connection_is_a_real_psycopg_connection_with_a_server_target(
    install: Install,
) -> None:
    install(PsycopgIntegration)
    with psycopg.connect(PG_DSN) as conn:
        assert type(conn) is psycopg.Connection
        target = getattr(conn, integration.TARGET_ATTRIBUTE)
        assert target.service == SERVICE
        assert target.server.attributes == {
            "db.system.name": "postgresql",
            "server.address": POSTGRES[0],
            "server.port": POSTGRES[1],
            "db.namespace": "test",
        }


# --- the default statement timeout -------------------------------------------------------------


def statement_timeout(conn: Any) -> str:
    return str(conn.execute("SHOW statement_timeout").fetchone()[0])


def test_the_default_statement_timeout_is_set_where_none_is(install: Install) -> None:
    install(PsycopgIntegration, statement_timeout=12.5)
    with psycopg.connect(PG_DSN) as conn:
        # Set outside psycopg's transaction handling: nothing is left open.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert statement_timeout(conn) == "12500ms"
    with psycopg.connect(PG_DSN, options="-c statement_timeout=4s") as conn:
        assert statement_timeout(conn) == "4s"  # the application's own wins


def test_a_session_that_chose_no_statement_timeout_keeps_none(
    install: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(PsycopgIntegration, statement_timeout=12.5)
    # ``0`` on purpose reads the same as no setting at all: pg_settings' source tells them apart.
    with psycopg.connect(PG_DSN, options="-c statement_timeout=0") as conn:
        assert statement_timeout(conn) == "0"
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=0")
    with psycopg.connect(PG_DSN) as conn:
        assert statement_timeout(conn) == "0"
    monkeypatch.delenv("PGOPTIONS")
    with psycopg.connect(PG_DSN) as conn:
        assert statement_timeout(conn) == "12500ms"


def _cut_first_simple_query() -> Any:
    """A ``cut_commands`` matcher: the first simple-protocol ``Query`` message (``Q``), which
    is raptor's statement-timeout query (psycopg sends the app's statements as ``Parse``)."""
    cut: list[bytes] = []

    def matches(data: bytes) -> bool:
        if data[:1] == b"Q" and not cut:
            cut.append(data)
            return True
        return False

    return matches


def test_a_link_lost_by_the_timeout_query_fails_the_connect_not_the_apps_statement(
    install: Install,
) -> None:
    # Found by benchmarks/bench_db_chaos.py: on a flaky network, the statement-timeout query
    # raptor sends after each connect lost its link now and then, and the connect handed the
    # app (a pool) a closed connection, whose first statement failed: an app under raptor
    # failed more statements than one without it. The connect is retried instead.
    installed = install(PsycopgIntegration, statement_timeout=12.5)
    with FaultProxy(POSTGRES) as proxy:
        proxy.cut_commands(_cut_first_simple_query())
        dsn = f"host=127.0.0.1 port={proxy.port} dbname=test user=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert statement_timeout(conn) == "12500ms"
        assert proxy.cuts == 1
        assert proxy.accepted == 2  # connected again
    assert [e.outcome for e in installed.of(RecoveryFinished)] == [Outcome.RECOVERED]


async def test_an_async_link_lost_by_the_timeout_query_fails_the_connect(
    install: Install,
) -> None:
    install(PsycopgIntegration, statement_timeout=12.5)
    with FaultProxy(POSTGRES) as proxy:
        proxy.cut_commands(_cut_first_simple_query())
        dsn = f"host=127.0.0.1 port={proxy.port} dbname=test user=postgres"
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cursor = await conn.execute("SELECT 1")
            assert await cursor.fetchone() == (1,)
        assert proxy.cuts == 1
        assert proxy.accepted == 2


async def test_an_async_session_that_chose_no_statement_timeout_keeps_none(
    install: Install,
) -> None:
    install(PsycopgIntegration, statement_timeout=12.5)
    async with await psycopg.AsyncConnection.connect(
        PG_DSN, options="-c statement_timeout=0"
    ) as conn:
        cur = await conn.execute("SHOW statement_timeout")
        assert await cur.fetchone() == ("0",)


def test_a_role_database_or_server_that_chose_no_statement_timeout_keeps_none(
    install: Install,
) -> None:
    # ALTER ROLE/DATABASE/SYSTEM are for a private server: the shared one is left as it is.
    server = PrivatePostgres()
    try:
        server.start()
        with psycopg.connect(server.dsn, autocommit=True) as admin:  # not guarded yet
            admin.execute("CREATE ROLE raptor_zero LOGIN")
            admin.execute("ALTER ROLE raptor_zero SET statement_timeout = 0")
            admin.execute("CREATE ROLE raptor_plain LOGIN")
            admin.execute("CREATE DATABASE raptor_zero")
            admin.execute("ALTER DATABASE raptor_zero SET statement_timeout = 0")
        install(PsycopgIntegration, statement_timeout=12.5)
        dsn = f"host=127.0.0.1 port={server.port}"
        for user, database, expected in (
            ("raptor_plain", "postgres", "12500ms"),  # nothing chose one: the default
            ("raptor_zero", "postgres", "0"),  # the role's
            ("raptor_plain", "raptor_zero", "0"),  # the database's
        ):
            with psycopg.connect(f"{dsn} user={user} dbname={database}") as conn:
                assert (user, database, statement_timeout(conn)) == (user, database, expected)
        with psycopg.connect(server.dsn, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET statement_timeout = 0")  # postgresql.auto.conf
            admin.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while True:  # the postmaster rereads its configuration asynchronously
            with psycopg.connect(f"{dsn} user=raptor_plain dbname=postgres") as conn:
                source = conn.execute(
                    "SELECT source FROM pg_settings WHERE name = 'statement_timeout'"
                ).fetchone()
                if source == ("configuration file",) or time.monotonic() > deadline:
                    assert source == ("configuration file",)
                    assert statement_timeout(conn) == "0"
                    break
            time.sleep(0.05)
    finally:
        server.close()


def test_a_statement_timeout_of_zero_sets_none(install: Install) -> None:
    install(
        PsycopgIntegration,
        statement_timeout=5.0,
        downstreams=(
            DownstreamOverride(pattern=f"{POSTGRES[0]}:{POSTGRES[1]}", statement_timeout=0),
        ),
    )
    with psycopg.connect(PG_DSN) as conn:
        assert statement_timeout(conn) == "0"


# --- replay safety, per failure ------------------------------------------------------------------


def test_a_serialization_failure_in_autocommit_is_retried_and_written_once(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} SELECT {table}_flaky(2, '40001')")
    assert rows(admin, table) == 1
    assert calls(admin, table) == 3
    [finished] = installed.of(RecoveryFinished, SERVICE)
    assert finished.outcome is Outcome.RECOVERED
    assert finished.attempts == 3


def test_a_deadlock_in_autocommit_is_retried(install: Install, admin: Any, table: str) -> None:
    install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        assert conn.execute(f"SELECT {table}_flaky(1, '40P01')").fetchone() == (1,)
    assert calls(admin, table) == 2


def test_nothing_inside_a_transaction_is_retried(install: Install, admin: Any, table: str) -> None:
    installed = install(PsycopgIntegration)
    with (
        psycopg.connect(PG_DSN, autocommit=True) as conn,
        pytest.raises(psycopg.errors.SerializationFailure),
        conn.transaction(),
    ):
        conn.execute(f"INSERT INTO {table} SELECT {table}_flaky(2, '40001')")
    with (
        psycopg.connect(PG_DSN) as conn,  # not autocommit: an implicit transaction
        pytest.raises(psycopg.errors.SerializationFailure),
    ):
        conn.execute(f"INSERT INTO {table} SELECT {table}_flaky(2, '40001')")
    assert rows(admin, table) == 0
    assert calls(admin, table) == 2  # one attempt each
    reasons = [f.give_up_reason for f in installed.of(RecoveryFinished, SERVICE)]
    assert reasons == ["not_replay_safe", "not_replay_safe"]


def test_executemany_is_never_retried(install: Install, admin: Any, table: str) -> None:
    install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.SerializationFailure):
            cur.executemany(f"INSERT INTO {table} SELECT {table}_flaky(%s, '40001')", [(1,), (1,)])
    assert calls(admin, table) == 1


def test_a_role_at_its_connection_limit_is_waited_for_without_opening_the_breaker(
    install: Install, admin: Any, unique_name: str
) -> None:
    """53300 while connecting: nothing ran, so connecting is tried again with backoff until a
    slot frees up; one caller's attempts are no outage, so the breaker stays closed."""
    role = unique_name
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
    dsn = PG_DSN.replace("user=postgres", f"user={role}")
    try:
        held = psycopg.connect(dsn)
        installed = install(PsycopgIntegration, max_retries=200, failure_threshold=3)
        installed.runtime.configure(budget_min_retries_per_second=1000.0)
        release = threading.Timer(0.3, held.close)
        release.start()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        release.join()
        assert not installed.of(BreakerTransitioned)
        finished = installed.of(RecoveryFinished)
        assert [f.outcome for f in finished] == [Outcome.RECOVERED]
        assert finished[0].category == "resource_exhausted"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            cur.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.parametrize("sqlstate", ["53200", "53100"])
def test_out_of_memory_or_disk_is_not_sent_again(
    install: Install, admin: Any, table: str, sqlstate: str
) -> None:
    """Resources the server ran out of: a read or a write is not sent again (it would meet the
    same shortage at once, and a query that ran the server out of memory, retried, may bring
    the kernel's OOM killer onto every session)."""
    installed = install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError, match="injected 53"):
            conn.execute(f"SELECT {table}_flaky(1, '{sqlstate}')")
        with pytest.raises(psycopg.OperationalError, match="injected 53"):
            conn.execute(f"INSERT INTO {table} SELECT {table}_flaky(2, '{sqlstate}')")
    assert calls(admin, table) == 2
    assert rows(admin, table) == 0
    assert [f.attempts for f in installed.of(RecoveryFinished)] == [1, 1]


def test_a_failing_read_is_retried_but_a_failing_write_is_not(
    install: Install, admin: Any, table: str
) -> None:
    # too_many_connections (transient): the server answered, the connection lives on.
    install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        assert conn.execute(f"SELECT {table}_flaky(1, '53300')").fetchone() == (1,)
        assert calls(admin, table) == 2
        with pytest.raises(psycopg.errors.TooManyConnections):
            conn.execute(f"INSERT INTO {table} SELECT {table}_flaky(3, '53300')")
        assert calls(admin, table) == 3
    assert rows(admin, table) == 0


def test_a_statement_cancelled_for_its_time_is_not_run_again(
    install: Install, admin: Any, table: str
) -> None:
    # query_canceled (a statement timeout): the same read would most likely run as long again.
    install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"SELECT {table}_flaky(1, '57014')")
        assert calls(admin, table) == 1


def test_a_write_whose_answer_was_lost_is_not_replayed(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    with FaultProxy(POSTGRES) as proxy:
        conn = psycopg.connect(
            f"host=127.0.0.1 port={proxy.port} dbname=test user=postgres", autocommit=True
        )
        proxy.cut_responses_after(0)  # the INSERT reaches the server; its answer does not
        with pytest.raises(psycopg.OperationalError):
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        conn.close()
    assert rows(admin, table) == 1  # executed once: not lost, not doubled
    [finished] = [f for f in installed.of(RecoveryFinished) if f.service.startswith("postgresql")]
    assert finished.attempts == 1


def planned_flaky(admin: Any, table: str) -> str:
    """A query that calls the flaky function while it is planned (an immutable function of
    constants is folded then), so a named cursor's ``DECLARE`` fails, not its ``FETCH``."""
    with admin.cursor() as cur:
        cur.execute(
            f"""CREATE FUNCTION {table}_planned() RETURNS int IMMUTABLE LANGUAGE plpgsql
            AS $$ BEGIN RETURN {table}_flaky(1, '40001'); END $$"""
        )
    return f"SELECT {table}_planned()"


def test_a_server_side_cursor_is_guarded_and_never_replayed(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    declared = planned_flaky(admin, table)
    with psycopg.connect(PG_DSN) as conn:
        with (
            pytest.raises(psycopg.errors.SerializationFailure),
            conn.transaction(),
            conn.cursor(name="c") as named,
        ):
            named.execute(declared)
        assert calls(admin, table) == 1  # its DECLARE ran once
        [failed] = installed.of(ErrorClassified, SERVICE)
        assert isinstance(failed.error, psycopg.errors.SerializationFailure)
        with conn.transaction(), conn.cursor(name="c") as cur:
            cur.execute("SELECT generate_series(1, 3)")
            assert cur.fetchall() == [(1,), (2,), (3,)]
        installed.runtime.breakers.get(SERVICE).force_open()
        with (
            pytest.raises(psycopg.OperationalError) as refused,
            conn.transaction(),
            conn.cursor(name="d") as refused_cursor,
        ):
            refused_cursor.execute("SELECT 1")
        assert isinstance(refused.value, circuit_open_error_type())


async def test_an_async_server_side_cursor_is_guarded(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    declared = planned_flaky(admin, table)
    async with await psycopg.AsyncConnection.connect(PG_DSN) as conn:
        with pytest.raises(psycopg.errors.SerializationFailure):
            async with conn.transaction(), conn.cursor(name="c") as named:
                await named.execute(declared)
        assert calls(admin, table) == 1
        installed.runtime.breakers.get(SERVICE).force_open()
        with pytest.raises(psycopg.OperationalError) as refused:
            async with conn.transaction(), conn.cursor(name="d") as refused_cursor:
                await refused_cursor.execute("SELECT 1")
        assert isinstance(refused.value, circuit_open_error_type())


# --- the breaker --------------------------------------------------------------------------------


def test_refused_connects_open_the_breaker_and_then_fail_fast(install: Install) -> None:
    installed = install(PsycopgIntegration, max_retries=1)
    port = free_port()
    dsn = f"host=127.0.0.1 port={port} dbname=test user=postgres connect_timeout=2"
    for _ in range(2):  # 2 calls x 2 attempts: the breaker opens on the 3rd failure
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn)
    started = time.perf_counter()
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(dsn)
    elapsed = time.perf_counter() - started
    assert isinstance(refused.value, CircuitOpenError)
    assert isinstance(refused.value, circuit_open_error_type())
    assert refused.value.breaker == f"postgresql://127.0.0.1:{port}/test"
    assert elapsed < 0.05
    [opened] = installed.of(BreakerTransitioned)
    assert opened.to_state is CircuitState.OPEN


def test_a_blackholed_server_fails_fast_well_under_the_connect_timeout(
    install: Install,
) -> None:
    # One failure opens the breaker: a failure waits out the connect timeout (2 s, libpq's
    # least: three took 6 s), and what is tested is the call after it.
    install(PsycopgIntegration, max_retries=0, failure_threshold=1)
    with FaultProxy(POSTGRES) as proxy:
        proxy.blackhole()
        dsn = f"host=127.0.0.1 port={proxy.port} dbname=test user=postgres connect_timeout=1"
        started = time.perf_counter()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn)
        assert time.perf_counter() - started >= 0.9  # it waited for the timeout
        started = time.perf_counter()
        with pytest.raises(CircuitOpenError):
            psycopg.connect(dsn)
        assert time.perf_counter() - started < 0.05


def test_a_conflict_never_counts_against_the_breaker(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration, max_retries=0)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for _ in range(6):
            with pytest.raises(psycopg.errors.SerializationFailure):
                conn.execute(f"SELECT {table}_flaky(100, '40001')")
        assert not installed.of(BreakerTransitioned)
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- async ----------------------------------------------------------------------------------------


async def test_async_connections_and_statements_are_guarded(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        assert getattr(conn, integration.TARGET_ATTRIBUTE).service == SERVICE
        cur = await conn.execute("SHOW statement_timeout")
        assert await cur.fetchone() == ("30s",)
        await conn.execute(f"INSERT INTO {table} SELECT {table}_flaky(1, '40001')")
        with pytest.raises(psycopg.errors.SerializationFailure):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} SELECT {table}_flaky(3, '40001')")
    assert rows(admin, table) == 1
    assert len(installed.of(RetryScheduled, SERVICE)) == 1


async def test_an_async_pool_gets_guarded_connections(install: Install) -> None:
    install(PsycopgIntegration)
    async with AsyncConnectionPool(PG_DSN, min_size=1, max_size=2, open=False) as pool:
        await pool.open(wait=True)
        async with pool.connection() as conn:
            assert getattr(conn, integration.TARGET_ATTRIBUTE).service == SERVICE
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)


def test_a_pool_gets_guarded_connections(install: Install) -> None:
    install(PsycopgIntegration)
    with ConnectionPool(PG_DSN, min_size=1, max_size=2) as pool, pool.connection() as conn:
        assert getattr(conn, integration.TARGET_ATTRIBUTE).service == SERVICE


# --- never break the host app -------------------------------------------------------------------


def test_our_bug_is_reported_and_the_statement_runs(
    install: Install, caplog: pytest.LogCaptureFixture
) -> None:
    _reset_for_tests()
    install(PsycopgIntegration)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"), psycopg.connect(PG_DSN) as conn:
        setattr(conn, integration.TARGET_ATTRIBUTE, object())  # as if our state were corrupt
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    assert "psycopg.describe" in caplog.text


def test_a_disabled_server_is_left_alone(install: Install, admin: Any, table: str) -> None:
    installed = install(
        PsycopgIntegration,
        downstreams=(DownstreamOverride(pattern=POSTGRES[0], enabled=False),),
    )
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        assert statement_timeout(conn) == "0"
        with pytest.raises(psycopg.errors.SerializationFailure):
            conn.execute(f"SELECT {table}_flaky(1, '40001')")
    assert not installed.of(ErrorClassified)
