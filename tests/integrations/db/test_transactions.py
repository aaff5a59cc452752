"""``run_transaction`` / ``run_transaction_async`` on the real servers: conflicts rolled back
and run again (concurrent SERIALIZABLE increments on PostgreSQL, deadlocks on MariaDB) with no
lost update; every other error rolled back and raised unchanged."""

from __future__ import annotations

import gc
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import psycopg2
import pymysql
import pytest
from psycopg import IsolationLevel

from otel_raptor.core.events import RecoveryFinished, RetryScheduled
from otel_raptor.core.recovery import Outcome
from otel_raptor.db import TransactionInProgressError, run_transaction, run_transaction_async
from otel_raptor.errors import ConfigError
from otel_raptor.integrations.db.psycopg import PsycopgIntegration
from otel_raptor.runtime.state import Runtime
from tests.integrations.db.conftest import (
    MYSQL_KWARGS,
    PG_DSN,
    PG_URL,
    Install,
    create_pg_flaky,
    drop_pg_flaky,
)
from tests.support.clock import FakeClock
from tests.support.runtime import process_runtime
from tests.support.services import MYSQL, POSTGRES, require_service

NEEDS_AUTOCOMMIT = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="sqlite3 autocommit= is 3.12+"
)


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    """A fresh process-wide runtime (what run_transaction uses without an integration)."""
    with process_runtime() as fresh:
        yield fresh


@pytest.fixture
def fake_runtime() -> Iterator[Runtime]:
    """:func:`runtime` on a fake clock: the backoffs take no time."""
    with process_runtime(clock=FakeClock()) as fresh:
        yield fresh


@pytest.fixture
def pg_table(unique_name: str) -> Iterator[str]:
    require_service("PostgreSQL", POSTGRES)
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        create_pg_flaky(admin.execute, unique_name)
        admin.execute(f"CREATE TABLE {unique_name}_counter (id int PRIMARY KEY, n int)")
        admin.execute(f"INSERT INTO {unique_name}_counter VALUES (1, 0)")
    yield unique_name
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        drop_pg_flaky(admin.execute, unique_name)
        admin.execute(f"DROP TABLE IF EXISTS {unique_name}_counter")


def pg_scalar(sql: str) -> Any:
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        return admin.execute(sql).fetchone()[0]


# --- PostgreSQL ---------------------------------------------------------------------------------


def test_concurrent_serializable_increments_lose_no_update(install: Install, pg_table: str) -> None:
    installed = install(PsycopgIntegration)
    counter = f"{pg_table}_counter"
    acks: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def increment(conn: Any) -> int:
        n = conn.execute(f"SELECT n FROM {counter} WHERE id = 1").fetchone()[0]
        time.sleep(0.002)  # widen the window in which the transactions overlap
        conn.execute(f"UPDATE {counter} SET n = %s WHERE id = 1", (n + 1,))
        return int(n + 1)

    def worker() -> None:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.isolation_level = IsolationLevel.SERIALIZABLE
            for _ in range(15):
                try:
                    value = run_transaction(conn, increment, max_retries=30)
                except psycopg.errors.SerializationFailure as error:
                    with lock:
                        errors.append(error)
                else:
                    with lock:
                        acks.append(value)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert pg_scalar(f"SELECT n FROM {counter}") == len(acks)
    assert sorted(acks) == list(range(1, len(acks) + 1))  # each ack saw its own increment
    assert len(acks) + len(errors) == 60
    assert installed.of(RetryScheduled), "no conflict happened: the test proved nothing"


def test_a_conflict_reruns_the_whole_function(runtime: Runtime, pg_table: str) -> None:
    events: list[Any] = []
    runtime.bus.subscribe(events.append)
    runs = []

    def work(conn: Any) -> str:
        runs.append(1)
        conn.execute(f"INSERT INTO {pg_table} VALUES (1)")
        conn.execute(f"INSERT INTO {pg_table} SELECT {pg_table}_flaky(2, '40P01')")
        return "done"

    with psycopg.connect(PG_DSN) as conn:  # not autocommit: psycopg's own transaction block
        assert run_transaction(conn, work) == "done"
    assert len(runs) == 3
    assert pg_scalar(f"SELECT count(*) FROM {pg_table}") == 2  # the first two runs rolled back
    [finished] = [e for e in events if isinstance(e, RecoveryFinished)]
    assert finished.service == f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"
    assert (finished.outcome, finished.attempts) == (Outcome.RECOVERED, 3)


def test_any_other_error_rolls_back_and_propagates_unchanged(
    runtime: Runtime, pg_table: str
) -> None:
    mine = ValueError("the application's own")
    runs = []

    def work(conn: Any) -> None:
        runs.append(1)
        conn.execute(f"INSERT INTO {pg_table} VALUES (1)")
        raise mine

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        with pytest.raises(ValueError) as raised:
            run_transaction(conn, work)
        assert raised.value is mine
        with pytest.raises(psycopg.errors.DivisionByZero):
            run_transaction(conn, lambda c: c.execute("SELECT 1/0"))  # no conflict: at once
    assert runs == [1]
    assert pg_scalar(f"SELECT count(*) FROM {pg_table}") == 0


def test_the_retries_end_with_the_last_conflict(runtime: Runtime, pg_table: str) -> None:
    with psycopg.connect(PG_DSN) as conn, pytest.raises(psycopg.errors.SerializationFailure):
        run_transaction(
            conn, lambda c: c.execute(f"SELECT {pg_table}_flaky(10, '40001')"), max_retries=2
        )
    with psycopg.connect(PG_DSN) as admin:
        value, _ = admin.execute(f"SELECT last_value, is_called FROM {pg_table}_seq").fetchone()
    assert value == 3


def test_a_connection_inside_a_transaction_is_refused(runtime: Runtime, pg_table: str) -> None:
    with psycopg.connect(PG_DSN) as conn:
        conn.execute("SELECT 1")  # psycopg opened a transaction
        with pytest.raises(TransactionInProgressError):
            run_transaction(conn, lambda c: None)
    with pytest.raises(TypeError):
        run_transaction(object(), lambda c: None)


def test_psycopg2(runtime: Runtime, pg_table: str) -> None:
    conn = psycopg2.connect(PG_DSN)
    try:

        def work(c: Any) -> int:
            with c.cursor() as cur:
                cur.execute(f"INSERT INTO {pg_table} SELECT {pg_table}_flaky(1, '40001')")
                return int(cur.rowcount)

        assert run_transaction(conn, work) == 1
        conn.autocommit = True  # psycopg2 >= 2.9 still opens a transaction for `with conn`
        assert run_transaction(conn, work) == 1
    finally:
        conn.close()
    assert pg_scalar(f"SELECT count(*) FROM {pg_table}") == 2


async def test_async_psycopg_and_asyncpg(runtime: Runtime, pg_table: str) -> None:
    async def work_psycopg(conn: Any) -> int:
        await conn.execute(f"INSERT INTO {pg_table} SELECT {pg_table}_flaky(1, '40001')")
        return 1

    async with await psycopg.AsyncConnection.connect(PG_DSN) as conn:
        assert await run_transaction_async(conn, work_psycopg) == 1

    async def work_asyncpg(conn: Any) -> int:
        await conn.execute(f"INSERT INTO {pg_table} SELECT {pg_table}_flaky(3, '40001')")
        return 2

    con = await asyncpg.connect(PG_URL)
    try:
        assert await run_transaction_async(con, work_asyncpg) == 2
    finally:
        await con.close()
    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1)
    try:
        async with pool.acquire() as proxy:
            assert await run_transaction_async(proxy, work_asyncpg) == 2
    finally:
        await pool.close()
    assert pg_scalar(f"SELECT count(*) FROM {pg_table}") == 3
    with pytest.raises(TypeError):
        await run_transaction_async(object(), work_asyncpg)


# --- MariaDB --------------------------------------------------------------------------------------


@pytest.fixture
def my_table(unique_name: str) -> Iterator[str]:
    require_service("MariaDB", MYSQL)
    conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {unique_name} (id INT PRIMARY KEY, n INT) ENGINE=InnoDB")
        cur.execute(f"INSERT INTO {unique_name} VALUES (1, 0), (2, 0)")
    yield unique_name
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {unique_name}")
    conn.close()


def test_mariadb_deadlocks_lose_no_update(runtime: Runtime, my_table: str) -> None:
    events: list[Any] = []
    runtime.bus.subscribe(events.append)
    acks: list[int] = []
    lock = threading.Lock()

    def transfer(first: int, second: int) -> Any:
        def work(conn: Any) -> None:
            with conn.cursor() as cur:
                cur.execute(f"UPDATE {my_table} SET n = n + 1 WHERE id = %s", (first,))
                time.sleep(0.01)  # both hold their first row: one of them deadlocks
                cur.execute(f"UPDATE {my_table} SET n = n + 1 WHERE id = %s", (second,))

        return work

    def worker(first: int, second: int) -> None:
        conn = pymysql.connect(**MYSQL_KWARGS, ssl_disabled=True)
        try:
            for _ in range(10):
                try:
                    run_transaction(conn, transfer(first, second), max_retries=30)
                except pymysql.err.OperationalError:
                    continue  # retries (or the retry budget) ran out: not acknowledged
                with lock:
                    acks.append(1)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=order) for order in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    conn = pymysql.connect(**MYSQL_KWARGS)
    with conn.cursor() as cur:
        cur.execute(f"SELECT n FROM {my_table} ORDER BY id")
        assert [row[0] for row in cur.fetchall()] == [len(acks), len(acks)]
    conn.close()
    assert len(acks) >= 15
    conflicts = [e for e in events if isinstance(e, RetryScheduled)]
    assert conflicts, "no deadlock happened: the test proved nothing"
    assert {e.classification.code for e in conflicts} <= {"1213", "1205"}


def test_pymysql_other_errors_roll_back(runtime: Runtime, my_table: str) -> None:
    conn = pymysql.connect(**MYSQL_KWARGS)
    try:

        def work(c: Any) -> None:
            with c.cursor() as cur:
                cur.execute(f"UPDATE {my_table} SET n = 99 WHERE id = 1")
                cur.execute(f"INSERT INTO {my_table} VALUES (1, 0)")  # duplicate key

        with pytest.raises(pymysql.err.IntegrityError):
            run_transaction(conn, work)
        with conn.cursor() as cur:
            cur.execute(f"SELECT n FROM {my_table} WHERE id = 1")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()


# --- SQLite ---------------------------------------------------------------------------------------


def test_sqlite_busy_is_rerun(runtime: Runtime, tmp_path: Path) -> None:
    # A budget that never runs dry: what is tested is the rerun, not the budget (three
    # threads fighting over one file need more retries than 20 % of calls + 10/s, and how
    # many more depends on the machine's speed).
    runtime.configure(budget_ratio=10.0, budget_min_retries_per_second=10_000.0)
    finished: list[RecoveryFinished] = []
    runtime.bus.subscribe(
        lambda event: finished.append(event) if isinstance(event, RecoveryFinished) else None
    )
    path = tmp_path / "tx.db"
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t (n INTEGER)")
    setup.execute("INSERT INTO t VALUES (0)")
    setup.commit()
    setup.close()
    acks: list[int] = []
    lock = threading.Lock()

    def increment(conn: Any) -> None:
        (n,) = conn.execute("SELECT n FROM t").fetchone()
        time.sleep(0.002)
        conn.execute("UPDATE t SET n = ?", (n + 1,))

    def worker(isolation: str | None) -> None:
        conn = sqlite3.connect(path, timeout=0.001, isolation_level=isolation)
        try:
            for _ in range(15):
                try:
                    run_transaction(conn, increment, max_retries=100, max_delay=0.05)
                except sqlite3.OperationalError:
                    continue  # retries (or the retry budget) ran out: not acknowledged
                with lock:
                    acks.append(1)
        finally:
            conn.close()

    threads = [
        threading.Thread(target=worker, args=(mode,)) for mode in (None, "DEFERRED", "IMMEDIATE")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    check = sqlite3.connect(path)
    assert check.execute("SELECT n FROM t").fetchone() == (len(acks),)  # no lost update
    check.close()
    assert len(acks) >= 40
    assert any(f.outcome is Outcome.RECOVERED and f.attempts >= 2 for f in finished)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("max_retries", True), ("max_retries", 1.0), ("base_delay", False), ("max_delay", 1e10)],
)
def test_bad_arguments_are_refused_even_after_a_good_call_like_them(
    runtime: Runtime, tmp_path: Path, argument: str, value: object
) -> None:
    # True == 1 == 1.0 and False == 0: a cache keyed by value alone let them through.
    conn = sqlite3.connect(tmp_path / "args.db")
    try:
        good = {"max_retries": 1, "base_delay": 0, "max_delay": 1.0}
        assert run_transaction(conn, lambda c: "ran", **good) == "ran"
        with pytest.raises(ConfigError) as caught:
            run_transaction(conn, lambda c: "ran", **{**good, argument: value})
        assert caught.value.key == argument  # the keyword the caller used
        assert caught.value.value is value
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "tx.db"
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t (x TEXT)")
    setup.commit()
    setup.close()
    return path


def rows(path: Path) -> list[str]:
    check = sqlite3.connect(path)
    try:
        return [x for (x,) in check.execute("SELECT x FROM t ORDER BY rowid")]
    finally:
        check.close()


def lock_holder(path: Path) -> sqlite3.Connection:
    """Another connection holding the write lock until it commits."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


@NEEDS_AUTOCOMMIT
def test_sqlite_autocommit_true_commits_and_rolls_back_by_sql(
    fake_runtime: Runtime, db_path: Path
) -> None:
    # commit() and rollback() do nothing in autocommit=True: the transaction stayed open,
    # and a conflict's retry failed to BEGIN inside it.
    conn = sqlite3.connect(db_path, timeout=0, autocommit=True)  # type: ignore[call-overload]
    try:
        run_transaction(conn, lambda c: c.execute("INSERT INTO t VALUES ('first')"))
        assert not conn.in_transaction
        assert rows(db_path) == ["first"]

        holder = lock_holder(db_path)
        runs: list[int] = []

        def insert(c: Any) -> None:
            runs.append(1)
            if len(runs) == 2:
                holder.execute("COMMIT")  # the lock is free for the rerun
            c.execute("INSERT INTO t VALUES ('after a conflict')")

        run_transaction(conn, insert)
        assert len(runs) == 2
        assert not conn.in_transaction
        assert rows(db_path) == ["first", "after a conflict"]

        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                run_transaction(
                    conn, lambda c: c.execute("INSERT INTO t VALUES ('never')"), max_retries=2
                )
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert not conn.in_transaction
        assert rows(db_path) == ["first", "after a conflict"]
    finally:
        conn.close()


class _SQLiteSubclass(sqlite3.Connection):
    """A connection class that takes attributes (like the integration's)."""


@NEEDS_AUTOCOMMIT
@pytest.mark.parametrize("factory", [sqlite3.Connection, _SQLiteSubclass])
def test_sqlite_autocommit_false_refuses_rows_it_cannot_know_committed(
    fake_runtime: Runtime, db_path: Path, factory: type
) -> None:
    # autocommit=False is always in a transaction: the app's uncommitted write was rolled
    # back with a conflict's retry, and run_transaction returned success.
    conn = sqlite3.connect(  # type: ignore[call-overload]
        db_path, timeout=0, autocommit=False, factory=factory
    )
    holder = lock_holder(db_path)
    runs: list[int] = []

    def insert(c: Any) -> None:
        runs.append(1)
        if len(runs) == 2:
            holder.execute("COMMIT")
        c.execute("INSERT INTO t VALUES ('run_transaction')")

    try:
        run_transaction(conn, insert)  # no row changed since it was opened: idle
        assert len(runs) == 2
        run_transaction(conn, lambda c: c.execute("INSERT INTO t VALUES ('again')"))
        assert rows(db_path) == ["run_transaction", "again"]

        conn.execute("INSERT INTO t VALUES ('the app, not committed')")
        with pytest.raises(TransactionInProgressError, match="autocommit=False"):
            run_transaction(conn, insert)
        assert len(runs) == 2  # fn did not run
        conn.commit()  # the app's write is still there to commit
        assert rows(db_path) == ["run_transaction", "again", "the app, not committed"]
        with pytest.raises(TransactionInProgressError):
            run_transaction(conn, insert)  # its commit() cannot be seen (documented)
    finally:
        conn.close()
        holder.close()


def test_an_async_fn_is_refused_before_any_transaction(runtime: Runtime, db_path: Path) -> None:
    # It was called for its coroutine, an empty transaction committed, and the coroutine
    # returned as the result.
    ran: list[int] = []

    async def transfer(c: Any) -> str:
        ran.append(1)
        return "done"

    class AsyncCallable:
        async def __call__(self, c: Any) -> str:
            ran.append(1)
            return "done"

    conn = sqlite3.connect(db_path)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        for fn in (transfer, AsyncCallable()):
            with pytest.raises(ConfigError) as caught:
                run_transaction(conn, fn)  # type: ignore[unused-coroutine]
            assert (caught.value.key, caught.value.value) == ("fn", fn)
            assert "run_transaction_async" in caught.value.allowed
        assert statements == []  # not even a BEGIN

        def returns_a_coroutine(c: Any) -> Any:
            c.execute("INSERT INTO t VALUES ('rolled back')")
            return transfer(c)

        with warnings.catch_warnings(record=True) as caught_warnings:
            warnings.simplefilter("always")
            with pytest.raises(ConfigError):
                run_transaction(conn, returns_a_coroutine)
            gc.collect()
        assert not [w for w in caught_warnings if "never awaited" in str(w.message)]
        assert not conn.in_transaction
        assert ran == []
        assert rows(db_path) == []
        assert run_transaction(conn, lambda c: "still usable") == "still usable"
    finally:
        conn.close()


def test_psycopg_rolls_back_an_fn_that_returns_an_awaitable(
    runtime: Runtime, pg_table: str
) -> None:
    async def later() -> None:
        pass

    def work(conn: Any) -> Any:
        conn.execute(f"INSERT INTO {pg_table} VALUES (1)")
        return later()

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        with pytest.raises(ConfigError):
            run_transaction(conn, work)
        assert conn.info.transaction_status == 0  # idle
    assert pg_scalar(f"SELECT count(*) FROM {pg_table}") == 0


async def test_async_fn_must_return_an_awaitable(runtime: Runtime, pg_table: str) -> None:
    # A plain result used to fail in ``await`` with a bare TypeError.
    def plain(conn: Any) -> int:
        return 1

    async with await psycopg.AsyncConnection.connect(PG_DSN) as conn:
        with pytest.raises(ConfigError) as caught:
            await run_transaction_async(conn, plain)  # type: ignore[arg-type]
        assert (caught.value.key, caught.value.value) == ("fn", plain)
        # A plain function returning an awaitable is fine.
        await run_transaction_async(conn, lambda c: c.execute(f"INSERT INTO {pg_table} VALUES (1)"))
    con = await asyncpg.connect(PG_URL)
    try:
        with pytest.raises(ConfigError):
            await run_transaction_async(con, plain)  # type: ignore[arg-type]
        assert not con.is_in_transaction()
    finally:
        await con.close()
    assert pg_scalar(f"SELECT count(*) FROM {pg_table}") == 1
