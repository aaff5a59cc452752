"""asyncpg's cursors against the real PostgreSQL: ``Connection.cursor`` and
``PreparedStatement.cursor`` (awaited, or iterated with ``async for``) and ``Cursor.fetch``/
``fetchrow``/``forward``, guarded under the ``locked`` plan (refused while the breaker is open,
never sent again), a failing fetch counted once, results unchanged.

``<table>_flaky(n, sqlstate)`` raises ``sqlstate`` the first ``n`` times it runs, counted by a
sequence that no rollback undoes, so ``calls`` tells how many times a query really ran.
``57P03`` (cannot connect now) is evidence of an outage, counted as ``unavailable``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterator
from typing import Any

import asyncpg
import asyncpg.cursor
import psycopg
import pytest

from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.events import ErrorClassified, RecoveryFinished
from otel_raptor.integrations.db.asyncpg import AsyncpgIntegration, circuit_open_error_type
from tests.integrations.db.conftest import PG_DSN, PG_URL, Install, create_pg_flaky, drop_pg_flaky
from tests.support.services import POSTGRES

pytestmark = pytest.mark.usefixtures("postgres")

SERVICE = f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"
HOOKED = [
    (asyncpg.cursor.CursorFactory, "__await__"),
    (asyncpg.cursor.CursorIterator, "__anext__"),
    (asyncpg.cursor.Cursor, "fetch"),
    (asyncpg.cursor.Cursor, "fetchrow"),
    (asyncpg.cursor.Cursor, "forward"),
]
ORIGINALS = {(cls, name): cls.__dict__[name] for cls, name in HOOKED}


@pytest.fixture
def admin() -> Iterator[Any]:
    """psycopg (whose integration is not installed here): it answers while a test holds the
    server's breaker open."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(admin: Any, unique_name: str) -> Iterator[str]:
    create_pg_flaky(admin.execute, unique_name)
    yield unique_name
    drop_pg_flaky(admin.execute, unique_name)


def calls(admin: Any, table: str) -> int:
    value, called = admin.execute(f"SELECT last_value, is_called FROM {table}_seq").fetchone()
    return int(value) if called else 0


def failing_at_3(table: str, last: int = 5) -> str:
    """Rows 1..``last``; the third runs ``<table>_flaky(1, '57P03')``: fails the first time."""
    return (
        f"SELECT CASE WHEN g = 3 THEN {table}_flaky(1, '57P03') ELSE g END AS v "
        f"FROM generate_series(1, {last}) AS g"
    )


def unavailable(installed: Any) -> int:
    counts = installed.runtime.breakers.get(SERVICE).snapshot().failure_counts
    return int(counts.get(ErrorCategory.UNAVAILABLE, 0))


def assert_refused(error: BaseException) -> None:
    assert isinstance(error, asyncpg.PostgresConnectionError)
    assert isinstance(error, circuit_open_error_type())


async def collect(rows: AsyncIterable[Any], into: list[Any]) -> None:
    async for row in rows:
        into.append(row[0])


def test_uninstall_restores_every_cursor_method(install: Install) -> None:
    installed = install(AsyncpgIntegration)
    for (cls, name), original in ORIGINALS.items():
        assert cls.__dict__[name] is not original, (cls, name)
        assert cls.__dict__[name].__wrapped__ is original, (cls, name)
    installed.integration.uninstall()
    for (cls, name), original in ORIGINALS.items():
        assert cls.__dict__[name] is original, (cls, name)


async def test_cursors_answer_as_without_raptor(install: Install) -> None:
    installed = install(AsyncpgIntegration)
    con = await asyncpg.connect(PG_URL)
    try:
        async with con.transaction():
            query = "SELECT generate_series(1, 120) AS v"
            got: list[int] = []
            await collect(con.cursor(query, prefetch=50), got)  # three pages
            assert got == list(range(1, 121))
            cursor = await con.cursor(query)
            assert type(cursor) is asyncpg.cursor.Cursor
            assert [r["v"] for r in await cursor.fetch(3)] == [1, 2, 3]
            assert (await cursor.fetchrow())["v"] == 4
            assert await cursor.forward(100) == 100
            assert [r["v"] for r in await cursor.fetch(50)] == list(range(105, 121))
            assert await cursor.fetchrow() is None
            statement = await con.prepare("SELECT generate_series(1, $1::int) AS v")
            got = []
            await collect(statement.cursor(7, prefetch=3), got)
            assert got == list(range(1, 8))
            prepared = await statement.cursor(4)
            assert [r["v"] for r in await prepared.fetch(10)] == [1, 2, 3, 4]
    finally:
        await con.close()
    assert not installed.of(ErrorClassified)


async def test_while_the_breaker_is_open_each_cursor_call_fails_fast_sending_nothing(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(AsyncpgIntegration)
    con = await asyncpg.connect(PG_URL)
    try:
        transaction = con.transaction()
        await transaction.start()
        query = f"SELECT {table}_flaky(0, '57P03') AS v FROM generate_series(1, 3)"
        opened = await con.cursor(query)
        statement = await con.prepare(query)
        installed.runtime.breakers.get(SERVICE).force_open()
        for step in (
            lambda: con.cursor(query),
            statement.cursor,
            lambda: anext(aiter(con.cursor(query))),
            lambda: anext(aiter(statement.cursor())),
            lambda: opened.fetch(2),
            opened.fetchrow,
            lambda: opened.forward(1),
        ):
            with pytest.raises(asyncpg.PostgresConnectionError) as refused:
                await step()
            assert_refused(refused.value)
        assert calls(admin, table) == 0  # nothing reached the server
        await transaction.rollback()  # never refused: the transaction ends
        assert not con.is_in_transaction()
    finally:
        await con.close()
    assert unavailable(installed) == 0


async def test_a_failing_page_of_an_iterated_cursor_is_counted_once_and_never_sent_again(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(AsyncpgIntegration)
    con = await asyncpg.connect(PG_URL)
    try:
        got: list[int] = []
        with pytest.raises(asyncpg.CannotConnectNowError):
            async with con.transaction():
                await collect(con.cursor(failing_at_3(table), prefetch=2), got)
        assert got == [1, 2]
        assert calls(admin, table) == 1  # a page fetched again would have skipped rows
        assert unavailable(installed) == 1
        [finished] = installed.of(RecoveryFinished, SERVICE)
        assert finished.attempts == 1
    finally:
        await con.close()


async def test_a_failing_fetch_of_an_open_cursor_is_counted_once_and_never_sent_again(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(AsyncpgIntegration)
    con = await asyncpg.connect(PG_URL)
    try:
        async with con.transaction():
            cursor = await con.cursor(failing_at_3(table))
            assert [r["v"] for r in await cursor.fetch(2)] == [1, 2]
            with pytest.raises(asyncpg.CannotConnectNowError):
                await cursor.fetch(2)
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await con.execute("SELECT 1")  # the app's own misuse: not counted
        assert calls(admin, table) == 1
        assert unavailable(installed) == 1
        assert len(installed.of(ErrorClassified, SERVICE)) == 2
    finally:
        await con.close()
