"""psycopg 3's streams, copies and named-cursor fetches against the real PostgreSQL, sync and
async: guarded under the ``locked`` plan (refused while the breaker is open, never sent
again), a failure partway through counted once, results unchanged.

Faults come from the server: ``<table>_flaky(n, sqlstate)`` raises ``sqlstate`` the first
``n`` times it runs, counted by a sequence that no rollback undoes, so ``calls`` tells how
many times a query was really run. ``57P03`` (cannot connect now) is evidence of an outage:
the breaker counts it as ``unavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Iterable, Iterator
from typing import Any

import psycopg
import psycopg2
import pytest

from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.events import ErrorClassified, RecoveryFinished, RetryScheduled
from otel_raptor.integrations.db import psycopg as integration
from otel_raptor.integrations.db.psycopg import PsycopgIntegration, circuit_open_error_type
from otel_raptor.runtime.safety import _reset_for_tests
from tests.integrations.db.conftest import PG_DSN, Install, create_pg_flaky, drop_pg_flaky
from tests.support.services import POSTGRES
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.usefixtures("postgres")

SERVICE = f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"
HOOKED = [
    (psycopg.Cursor, "stream"),
    (psycopg.Cursor, "copy"),
    (psycopg.AsyncCursor, "stream"),
    (psycopg.AsyncCursor, "copy"),
    *[
        (cls, name)
        for cls in (psycopg.ServerCursor, psycopg.AsyncServerCursor)
        for name in ("fetchone", "fetchmany", "fetchall", "scroll")
    ],
    (psycopg.ServerCursor, "__next__"),
    (psycopg.AsyncServerCursor, "__anext__"),
]
ORIGINALS = {(cls, name): cls.__dict__[name] for cls, name in HOOKED}


class Admin:
    """An unguarded psycopg2 connection (psycopg2's integration is not installed here): it
    still answers while a test holds the server's breaker open."""

    def __init__(self) -> None:
        self.conn = psycopg2.connect(PG_DSN)
        self.conn.autocommit = True

    def execute(self, sql: str) -> Any:
        cur = self.conn.cursor()
        cur.execute(sql)
        return cur


@pytest.fixture
def admin() -> Iterator[Admin]:
    admin = Admin()
    yield admin
    admin.conn.close()


@pytest.fixture
def table(admin: Any, unique_name: str) -> Iterator[str]:
    create_pg_flaky(admin.execute, unique_name)
    yield unique_name
    drop_pg_flaky(admin.execute, unique_name)
    admin.execute(f"DROP FUNCTION IF EXISTS {unique_name}_trigger() CASCADE")


def calls(admin: Any, table: str) -> int:
    """How many times the flaky function ran."""
    value, called = admin.execute(f"SELECT last_value, is_called FROM {table}_seq").fetchone()
    return int(value) if called else 0


def rows(admin: Any, table: str) -> int:
    return int(admin.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def failing_at_3(table: str, last: int = 5) -> str:
    """Rows 1..``last``; the third runs ``<table>_flaky(1, '57P03')``: fails the first time."""
    return (
        f"SELECT CASE WHEN g = 3 THEN {table}_flaky(1, '57P03') ELSE g END "
        f"FROM generate_series(1, {last}) AS g"
    )


def collect(rows: Iterable[Any], into: list[Any]) -> None:
    into.extend(rows)


async def collect_async(rows: AsyncIterable[Any], into: list[Any]) -> None:
    async for row in rows:
        into.append(row)


def unavailable(installed: Any) -> int:
    """How many ``unavailable`` failures the server's breaker has counted."""
    counts = installed.runtime.breakers.get(SERVICE).snapshot().failure_counts
    return int(counts.get(ErrorCategory.UNAVAILABLE, 0))


def assert_refused(error: BaseException) -> None:
    assert isinstance(error, psycopg.OperationalError)
    assert isinstance(error, circuit_open_error_type())


def add_failing_trigger(admin: Any, table: str) -> None:
    """Inserting ``v = 3`` into ``table`` runs ``<table>_flaky(1, '57P03')``."""
    admin.execute(
        f"""CREATE FUNCTION {table}_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.v = 3 THEN PERFORM {table}_flaky(1, '57P03'); END IF;
            RETURN NEW;
        END $$"""
    )
    admin.execute(
        f"CREATE TRIGGER {table}_t BEFORE INSERT ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {table}_trigger()"
    )


# --- hooks ---------------------------------------------------------------------------------------


def test_uninstall_restores_every_cursor_method(install: Install) -> None:
    installed = install(PsycopgIntegration)
    for (cls, name), original in ORIGINALS.items():
        assert cls.__dict__[name] is not original, (cls, name)
        assert cls.__dict__[name].__wrapped__ is original, (cls, name)
    installed.integration.uninstall()
    for (cls, name), original in ORIGINALS.items():
        assert cls.__dict__[name] is original, (cls, name)


# --- results unchanged ---------------------------------------------------------------------------


def test_streams_copies_and_fetches_answer_as_without_raptor(install: Install, table: str) -> None:
    installed = install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.cursor()
        assert list(cur.stream("SELECT generate_series(1, 5)")) == [(i,) for i in range(1, 6)]
        assert list(cur.stream("SELECT 1 WHERE false")) == []
        with cur.copy(f"COPY {table} (v) FROM STDIN") as copy:
            for v in range(10):
                copy.write_row((v,))
        assert cur.rowcount == 10
        with cur.copy(f"COPY (SELECT v FROM {table} ORDER BY v) TO STDOUT") as copy:
            assert [int(row[0]) for row in copy.rows()] == list(range(10))
        with conn.transaction():
            named = conn.cursor(name="c", scrollable=True)
            named.itersize = 3
            named.execute("SELECT generate_series(1, 10)")
            assert named.fetchone() == (1,)
            assert named.fetchmany(2) == [(2,), (3,)]
            named.scroll(2)
            assert list(named) == [(i,) for i in range(6, 11)]  # two pages and a short one
            named.scroll(0, mode="absolute")
            assert named.fetchall() == [(i,) for i in range(1, 11)]
            named.close()
    assert not installed.of(ErrorClassified)


async def test_async_streams_copies_and_fetches_answer_as_without_raptor(
    install: Install, table: str
) -> None:
    installed = install(PsycopgIntegration)
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.cursor()
        streamed = [row async for row in cur.stream("SELECT generate_series(1, 5)")]
        assert streamed == [(i,) for i in range(1, 6)]
        async with cur.copy(f"COPY {table} (v) FROM STDIN") as copy:
            for v in range(4):
                await copy.write_row((v,))
        assert cur.rowcount == 4
        async with conn.transaction():
            named = conn.cursor(name="c", scrollable=True)
            named.itersize = 2
            await named.execute("SELECT generate_series(1, 7)")
            assert await named.fetchone() == (1,)
            assert await named.fetchmany(2) == [(2,), (3,)]
            await named.scroll(1)
            assert [row async for row in named] == [(5,), (6,), (7,)]
            await named.scroll(0, mode="absolute")
            assert await named.fetchall() == [(i,) for i in range(1, 8)]
            await named.close()
    assert not installed.of(ErrorClassified)


# --- an open breaker fails fast ------------------------------------------------------------------


def test_while_the_breaker_is_open_each_one_fails_fast_sending_nothing(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.cursor()
        conn.execute("BEGIN")
        named = conn.cursor(name="c", scrollable=True)
        named.execute(f"SELECT {table}_flaky(0, '57P03') FROM generate_series(1, 3)")
        installed.runtime.breakers.get(SERVICE).force_open()
        stream = cur.stream(f"SELECT {table}_flaky(0, '57P03')")
        try:
            with pytest.raises(psycopg.OperationalError) as refused:
                next(stream)
        finally:
            stream.close()  # unrefused, it would hold the connection's lock
        assert_refused(refused.value)
        with (
            pytest.raises(psycopg.OperationalError) as refused,
            cur.copy(f"COPY (SELECT {table}_flaky(0, '57P03')) TO STDOUT"),
        ):
            pass
        assert_refused(refused.value)
        for fetch in (
            named.fetchone,
            lambda: named.fetchmany(2),
            named.fetchall,
            lambda: named.scroll(1),
            lambda: next(iter(named)),
        ):
            with pytest.raises(psycopg.OperationalError) as refused:
                fetch()
            assert_refused(refused.value)
        assert calls(admin, table) == 0  # nothing reached the server
        conn.execute("ROLLBACK")  # never refused: the transaction ends
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        named.close()  # the ROLLBACK ended it on the server: this only marks it closed
    assert unavailable(installed) == 0


async def test_while_the_breaker_is_open_each_async_one_fails_fast_sending_nothing(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.cursor()
        await conn.execute("BEGIN")
        named = conn.cursor(name="c", scrollable=True)
        await named.execute(f"SELECT {table}_flaky(0, '57P03') FROM generate_series(1, 3)")
        installed.runtime.breakers.get(SERVICE).force_open()
        stream = cur.stream(f"SELECT {table}_flaky(0, '57P03')")
        try:
            with pytest.raises(psycopg.OperationalError) as refused:
                await anext(stream)
        finally:
            await stream.aclose()  # unrefused, it would hold the connection's lock
        assert_refused(refused.value)
        with pytest.raises(psycopg.OperationalError) as refused:
            async with cur.copy(f"COPY (SELECT {table}_flaky(0, '57P03')) TO STDOUT"):
                pass
        assert_refused(refused.value)
        for fetch in (
            named.fetchone,
            lambda: named.fetchmany(2),
            named.fetchall,
            lambda: named.scroll(1),
            lambda: anext(aiter(named)),
        ):
            with pytest.raises(psycopg.OperationalError) as refused:
                await fetch()
            assert_refused(refused.value)
        assert calls(admin, table) == 0
        await conn.execute("ROLLBACK")
        await named.close()  # the ROLLBACK ended it on the server: this only marks it closed
    assert unavailable(installed) == 0


# --- a failure partway: counted once, never sent again -------------------------------------------


def test_a_failure_mid_stream_is_counted_once_and_never_sent_again(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        got: list[Any] = []
        with pytest.raises(psycopg.errors.CannotConnectNow):
            collect(conn.cursor().stream(failing_at_3(table)), got)
        assert got == [(1,), (2,)]
        assert calls(admin, table) == 1  # its query ran once
        assert unavailable(installed) == 1
        [finished] = installed.of(RecoveryFinished, SERVICE)
        assert finished.attempts == 1
        # The connection is usable, and the next stream runs (flaky now answers).
        assert list(conn.cursor().stream(failing_at_3(table))) == [(1,), (2,), (1,), (4,), (5,)]
    assert calls(admin, table) == 2
    assert unavailable(installed) == 1


def test_a_connection_lost_mid_stream_counts_once_a_refused_reconnect_confirms_it(
    install: Install,
) -> None:
    installed = install(PsycopgIntegration, max_retries=0)
    with FaultProxy(POSTGRES) as proxy:
        dsn = f"host=127.0.0.1 port={proxy.port} dbname=test user=postgres"
        breaker = installed.runtime.breakers.get(f"postgresql://127.0.0.1:{proxy.port}/test")
        with psycopg.connect(dsn, autocommit=True) as conn:
            stream = conn.cursor().stream("SELECT generate_series(1, 100000000)")
            assert next(stream) == (1,)
            proxy.refuse()  # the server is gone: the open connection is cut, none is accepted
            with pytest.raises(psycopg.OperationalError):
                collect(stream, [])
            assert not installed.of(RetryScheduled)
            [finished] = installed.of(RecoveryFinished)
            assert finished.attempts == 1
            # A lost connection alone is unconfirmed (a reaped idle session looks the same)...
            assert breaker.snapshot().window_failures == 0
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(dsn)
        # ...until a refused reconnect confirms it: both count.
        assert breaker.snapshot().window_failures == 2


def test_a_stream_left_early_is_cancelled_as_without_raptor(install: Install) -> None:
    install(PsycopgIntegration)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        stream = conn.cursor().stream("SELECT generate_series(1, 100000)")
        assert next(stream) == (1,)
        stream.close()
        assert conn.execute("SELECT 42").fetchone() == (42,)


async def test_a_failure_mid_async_stream_is_counted_once_and_never_sent_again(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        got: list[Any] = []
        with pytest.raises(psycopg.errors.CannotConnectNow):
            await collect_async(conn.cursor().stream(failing_at_3(table)), got)
        assert got == [(1,), (2,)]
        assert calls(admin, table) == 1
        assert unavailable(installed) == 1
        [finished] = installed.of(RecoveryFinished, SERVICE)
        assert finished.attempts == 1


def test_a_failure_mid_copy_is_counted_once_and_nothing_is_written_twice(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    add_failing_trigger(admin, table)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cur = conn.cursor()
        with (  # noqa: PT012 - the failure may come from any row or from the end of the COPY
            pytest.raises(psycopg.errors.CannotConnectNow),
            cur.copy(f"COPY {table} (v) FROM STDIN") as copy,
        ):
            for v in range(1, 6):
                copy.write_row((v,))
        assert calls(admin, table) == 1  # the third row's trigger ran once
        assert rows(admin, table) == 0  # the COPY was rolled back, and never sent again
        assert unavailable(installed) == 1
        [finished] = installed.of(RecoveryFinished, SERVICE)
        assert finished.attempts == 1
        # The app's own error inside the block is not the server's: not counted.
        installed.events.clear()
        copy_in = f"COPY {table} (v) FROM STDIN"
        with pytest.raises(ZeroDivisionError), cur.copy(copy_in) as copy:  # noqa: PT012
            copy.write_row((1,))
            _ = 1 / 0
        assert not installed.of(ErrorClassified)
        assert rows(admin, table) == 0
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert unavailable(installed) == 1


async def test_a_failure_mid_async_copy_is_counted_once(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    add_failing_trigger(admin, table)
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CannotConnectNow):  # noqa: PT012 - any row, or the end
            async with conn.cursor().copy(f"COPY {table} (v) FROM STDIN") as copy:
                for v in range(1, 6):
                    await copy.write_row((v,))
    assert calls(admin, table) == 1
    assert rows(admin, table) == 0
    assert unavailable(installed) == 1


def test_a_failing_fetch_in_a_transaction_is_counted_once_and_never_sent_again(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    with psycopg.connect(PG_DSN) as conn:
        named = conn.cursor(name="c")
        named.itersize = 2
        named.execute(failing_at_3(table))
        got: list[Any] = []
        with pytest.raises(psycopg.errors.CannotConnectNow):
            collect(named, got)  # the second page's FETCH fails
        assert got == [(1,), (2,)]
        assert calls(admin, table) == 1  # a FETCH sent again would have skipped rows
        assert unavailable(installed) == 1
        [finished] = installed.of(RecoveryFinished, SERVICE)
        assert finished.attempts == 1
        conn.rollback()
        named.close()


async def test_a_failing_async_fetch_is_counted_once_and_never_sent_again(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(PsycopgIntegration)
    async with await psycopg.AsyncConnection.connect(PG_DSN) as conn:
        named = conn.cursor(name="c")
        await named.execute(failing_at_3(table))
        assert await named.fetchmany(2) == [(1,), (2,)]
        with pytest.raises(psycopg.errors.CannotConnectNow):
            await named.fetchone()
        assert calls(admin, table) == 1
        assert unavailable(installed) == 1
        await conn.rollback()
        await named.close()


# --- never break the host app -------------------------------------------------------------------


def test_our_bug_is_reported_and_streams_copies_and_fetches_run(
    install: Install, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    _reset_for_tests()
    install(PsycopgIntegration)
    with caplog.at_level(logging.WARNING, logger="otel_raptor"), psycopg.connect(PG_DSN) as conn:
        setattr(conn, integration.TARGET_ATTRIBUTE, object())  # as if our state were corrupt
        cur = conn.cursor()
        assert list(cur.stream("SELECT generate_series(1, 3)")) == [(1,), (2,), (3,)]
        with cur.copy(f"COPY {table} (v) FROM STDIN") as copy:
            copy.write_row((1,))
        named = conn.cursor(name="c")
        named.execute("SELECT generate_series(1, 3)")
        assert named.fetchone() == (1,)
        assert list(named) == [(2,), (3,)]
        conn.rollback()
        named.close()
    assert "psycopg.describe" in caplog.text
