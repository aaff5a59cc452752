"""The asyncpg integration against the real PostgreSQL: connections, statements, prepared
statements and pools; replay safety per failure; the default command timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import asyncpg.connection
import psycopg
import pytest

from otel_raptor import CircuitOpenError
from otel_raptor.core.events import BreakerTransitioned, RecoveryFinished
from otel_raptor.core.recovery import Outcome
from otel_raptor.integrations.db.asyncpg import AsyncpgIntegration, circuit_open_error_type
from tests.integrations.db.conftest import (
    PG_DSN,
    PG_URL,
    Install,
    cancel_acknowledged,
    create_pg_flaky,
    drop_pg_flaky,
)
from tests.support.dbservers import free_port
from tests.support.services import POSTGRES
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.usefixtures("postgres")

ORIGINAL_FETCH = asyncpg.connection.Connection.fetch
ORIGINAL_CONNECT = asyncpg.connect
SERVICE = f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"


@pytest.fixture
def admin() -> Iterator[Any]:
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


def test_uninstall_restores_everything(install: Install) -> None:
    installed = install(AsyncpgIntegration)
    assert asyncpg.connection.Connection.fetch is not ORIGINAL_FETCH
    installed.integration.uninstall()
    assert asyncpg.connection.Connection.fetch is ORIGINAL_FETCH
    assert asyncpg.connect is ORIGINAL_CONNECT
    assert asyncpg.connection.connect is ORIGINAL_CONNECT


async def test_statements_prepared_statements_and_pools(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(AsyncpgIntegration)
    con = await asyncpg.connect(PG_URL)
    try:
        # The default statement timeout: the server's, not asyncpg's client-side timer.
        assert await con.fetchval("SHOW statement_timeout") == "30s"
        assert con._config.command_timeout is None
        # The sequence behind the flaky function counts every call: each statement below
        # fails once (its first call), then succeeds.
        assert await con.fetchval(f"SELECT {table}_flaky(1, '40001')") == 1
        statement = await con.prepare(f"SELECT {table}_flaky(3, '40P01') + $1::int")
        assert await statement.fetchval(1) == 2
        with pytest.raises(asyncpg.exceptions.SerializationError):
            async with con.transaction():
                await con.execute(f"INSERT INTO {table} SELECT {table}_flaky(5, '40001')")
    finally:
        await con.close()
    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=2)
    try:
        assert await pool.fetchval(f"SELECT {table}_flaky(6, '40001')") == 1
    finally:
        await pool.close()
    assert calls(admin, table) == 7  # 2 + 2 + 1 (in a transaction: once) + 2
    outcomes = [(f.outcome, f.attempts) for f in installed.of(RecoveryFinished, SERVICE)]
    assert outcomes == [
        (Outcome.RECOVERED, 2),
        (Outcome.RECOVERED, 2),
        (Outcome.FAILED, 1),
        (Outcome.RECOVERED, 2),
    ]


async def test_prepared_statements_take_their_keyword_arguments(install: Install) -> None:
    install(AsyncpgIntegration)
    con = await asyncpg.connect(PG_URL)
    try:
        statement = await con.prepare("SELECT $1::int AS a, 2 AS b")
        assert (await statement.fetch(1, timeout=5))[0]["a"] == 1
        assert (await statement.fetchrow(1, timeout=5))["b"] == 2
        assert await statement.fetchval(1, column=1) == 2
        assert await statement.fetchval(1, column=0, timeout=5) == 1
    finally:
        await con.close()


async def test_the_apps_misuse_of_a_connection_never_opens_the_servers_breaker(
    install: Install,
) -> None:
    # Ten tasks sharing one connection: asyncpg refuses all but one ("another operation is in
    # progress") in the client. That is the app's bug, not the server's health: the server
    # stays open to every other connection, as it does without raptor.
    installed = install(AsyncpgIntegration, failure_threshold=3)
    shared = await asyncpg.connect(PG_URL)
    good = await asyncpg.connect(PG_URL)
    refused = 0

    async def misuse() -> None:
        nonlocal refused
        try:
            await shared.fetchval("SELECT pg_sleep(0.02)::text")
        except asyncpg.InterfaceError:
            refused += 1

    try:
        for _ in range(3):
            await asyncio.gather(*[misuse() for _ in range(10)])
        assert refused == 27
        assert await good.fetchval("SELECT 1") == 1
        await (await asyncpg.connect(PG_URL)).close()
        assert installed.of(BreakerTransitioned) == []
    finally:
        await shared.close()
        await good.close()


async def test_the_retry_policys_attempt_timeout_never_cuts_a_statement_off(
    install: Install,
) -> None:
    # attempt_timeout (set for HTTP, say) would cancel async statements only, never sync ones:
    # a database call is bounded by its statement timeout, sync or async alike.
    install(AsyncpgIntegration, attempt_timeout=0.2)
    con = await asyncpg.connect(PG_URL)
    try:
        started = time.monotonic()
        assert await con.fetchval("SELECT pg_sleep(0.5)::text") == ""
        assert 0.5 <= time.monotonic() - started < 0.9  # run once, to its end
    finally:
        await con.close()


async def test_an_applications_command_timeout_is_kept(install: Install) -> None:
    install(AsyncpgIntegration)
    con = await asyncpg.connect(PG_URL, command_timeout=3)
    try:
        assert con._config.command_timeout == 3
        assert await con.fetchval("SHOW statement_timeout") == "0"  # none of ours on top
    finally:
        await con.close()


async def test_a_statement_timeout_chosen_elsewhere_is_kept(install: Install) -> None:
    install(AsyncpgIntegration)
    con = await asyncpg.connect(PG_URL, server_settings={"statement_timeout": "5s"})
    try:
        assert await con.fetchval("SHOW statement_timeout") == "5s"
        assert con._config.command_timeout is None
    finally:
        await con.close()


async def test_a_link_lost_by_the_timeout_query_fails_the_connect(install: Install) -> None:
    """As psycopg's: the statement-timeout query is part of the connect, so a link it loses
    fails that attempt and the connect is retried, rather than the app being handed a closed
    connection (its first statement would fail for a query it never sent)."""
    installed = install(AsyncpgIntegration, statement_timeout=12.5)
    cut: list[bytes] = []

    def first_simple_query(data: bytes) -> bool:  # asyncpg's statements are Parse messages
        if data[:1] == b"Q" and not cut:
            cut.append(data)
            return True
        return False

    with FaultProxy(POSTGRES) as proxy:
        proxy.cut_commands(first_simple_query)
        con = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{proxy.port}/test")
        try:
            assert await con.fetchval("SELECT 1") == 1
            assert await con.fetchval("SHOW statement_timeout") == "12500ms"
        finally:
            await con.close()
        assert proxy.cuts == 1
        assert proxy.accepted == 2  # connected again
    assert [e.outcome for e in installed.of(RecoveryFinished)] == [Outcome.RECOVERED]


async def test_a_pools_reset_on_release_keeps_the_default_statement_timeout(
    install: Install,
) -> None:
    """A pool sends ``RESET ALL`` on each release, which drops a session's settings: raptor's
    default statement timeout is set again in the same query, and a timeout chosen with
    ``server_settings`` (a session default ``RESET ALL`` returns to) is left as it is."""
    installed = install(AsyncpgIntegration, max_retries=0)
    async with asyncpg.create_pool(PG_URL, min_size=1, max_size=1) as pool:
        for _ in range(3):
            async with pool.acquire() as con:
                assert await con.fetchval("SHOW statement_timeout") == "30s"
                await con.execute("SET statement_timeout = 0")  # the app's, for this checkout
                assert await con.fetchval("SHOW statement_timeout") == "0"
    async with asyncpg.create_pool(
        PG_URL, min_size=1, max_size=1, server_settings={"statement_timeout": "7s"}
    ) as pool:
        for _ in range(2):
            async with pool.acquire() as con:
                assert await con.fetchval("SHOW statement_timeout") == "7s"
                await con.execute("SET statement_timeout = 0")
    assert not installed.of(RecoveryFinished)  # nothing failed, nothing was retried


async def test_the_default_statement_timeout_bounds_each_statement_of_a_batch_not_the_batch(
    install: Install,
) -> None:
    install(AsyncpgIntegration, statement_timeout=0.2)
    con = await asyncpg.connect(PG_URL)
    try:
        await con.execute("CREATE TEMP TABLE batch (x int)")
        insert = "INSERT INTO batch SELECT $1 FROM pg_sleep(0.002)"  # each well within 0.2 s
        rows = [(i,) for i in range(150)]  # ~0.3 s in all, past the default
        await con.executemany(insert, rows)
        await con.executemany(insert, iter(rows))
        await (await con.prepare(insert)).executemany(rows)
        select = "SELECT $1::int FROM pg_sleep(0.002)"
        assert len(await con.fetchmany(select, rows)) == 150
        assert len(await (await con.prepare(select)).fetchmany(rows)) == 150
        assert await con.fetchval("SELECT count(*) FROM batch") == 450
        # The caller's own timeout on a batch, and the default on one statement, still hold.
        with pytest.raises(asyncio.TimeoutError):
            await con.executemany(insert, rows, timeout=0.1)
        await cancel_acknowledged(con)  # else the wait for it could be what times out below
        with pytest.raises(asyncpg.exceptions.QueryCanceledError):  # the server's timeout
            await con.execute("SELECT pg_sleep(0.5)")
        assert await con.fetchval("SELECT 1", timeout=30) == 1  # con was not terminated
    finally:
        await con.close()


async def test_a_statement_that_ran_out_of_its_time_is_never_run_again(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(AsyncpgIntegration, max_retries=1)
    # asyncpg's own timeout cancels the statement on the server and keeps the connection: it
    # is the statement timeout, and a read run again would most likely take as long again
    # (SQLSTATE 57014 is not replayed either).
    with FaultProxy(POSTGRES) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
        for statement, attempts in (("SELECT 1", 1), (f"INSERT INTO {table} VALUES (1)", 1)):
            con = await asyncpg.connect(url)
            proxy.latency(0.3)
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await con.execute(statement, timeout=0.1)
            finally:
                proxy.heal()
                con.terminate()
            [finished] = installed.of(RecoveryFinished)
            assert finished.attempts == attempts
            installed.events.clear()


async def test_copies_are_guarded_and_never_replayed(install: Install, admin: Any) -> None:
    installed = install(AsyncpgIntegration)
    name = f"copies_{time.monotonic_ns()}"
    admin.execute(f"CREATE TABLE {name} (v int PRIMARY KEY)")
    try:
        con = await asyncpg.connect(PG_URL)
        try:
            await con.copy_records_to_table(name, records=[(1,), (2,)])
            with pytest.raises(asyncpg.UniqueViolationError):  # once: a replay would say so too
                await con.copy_records_to_table(name, records=[(3,), (1,)])
            [failed] = [
                f for f in installed.of(RecoveryFinished, SERVICE) if f.outcome is Outcome.FAILED
            ]
            assert failed.attempts == 1
            installed.runtime.breakers.get(SERVICE).force_open()
            with pytest.raises(asyncpg.PostgresConnectionError) as refused:
                await con.copy_from_query("SELECT 1", output=lambda data: None)
            assert isinstance(refused.value, circuit_open_error_type())
        finally:
            await con.close()
        assert admin.execute(f"SELECT count(*) FROM {name}").fetchone() == (2,)
    finally:
        admin.execute(f"DROP TABLE {name}")


async def test_an_open_breaker_fails_fast_as_an_asyncpg_connection_error(
    install: Install,
) -> None:
    install(AsyncpgIntegration, max_retries=0)
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    for _ in range(3):
        with pytest.raises(OSError):
            await asyncpg.connect(url)
    started = time.perf_counter()
    with pytest.raises(asyncpg.PostgresConnectionError) as refused:
        await asyncpg.connect(url)
    assert time.perf_counter() - started < 0.05
    assert isinstance(refused.value, CircuitOpenError)
    assert isinstance(refused.value, circuit_open_error_type())
    # What the app caught while the server refused connections still catches the refusal.
    with pytest.raises(OSError) as caught:
        await asyncpg.connect(url)
    assert isinstance(caught.value, ConnectionRefusedError)
    assert isinstance(caught.value, asyncpg.PostgresConnectionError)


async def test_a_transaction_refused_midway_is_still_rolled_back(install: Install) -> None:
    # asyncpg's Transaction sends ROLLBACK through Connection.execute: refused as well, it
    # left the connection inside the transaction for good (every later statement joined it,
    # never committed, and con.transaction() raised InterfaceError).
    installed = install(AsyncpgIntegration)
    breaker = installed.runtime.breakers.get(SERVICE)
    con = await asyncpg.connect(PG_URL)
    try:

        async def refused_midway() -> None:
            async with con.transaction():
                await con.execute("SELECT 1")
                breaker.force_open()
                await con.execute("SELECT 2")

        with pytest.raises(asyncpg.PostgresConnectionError):
            await refused_midway()
        assert not con.is_in_transaction()
        breaker.force_close()
        await con.execute("CREATE TEMP TABLE refused_midway (v int)")
        async with con.transaction():  # a COMMIT passes the open breaker too
            await con.execute("INSERT INTO refused_midway VALUES (1)")
            breaker.force_open()
        assert not con.is_in_transaction()
        breaker.force_close()
        assert await con.fetchval("SELECT count(*) FROM refused_midway") == 1
    finally:
        breaker.force_close()
        await con.close()


async def test_a_pool_releases_its_connection_past_an_open_breaker(install: Install) -> None:
    # The pool's reset query on release was refused: the acquire() block raised although its
    # statements had succeeded, and the pool dropped a healthy connection.
    installed = install(AsyncpgIntegration)
    breaker = installed.runtime.breakers.get(SERVICE)
    pool = await asyncpg.create_pool(PG_URL, min_size=1, max_size=1)
    try:
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
            breaker.force_open()  # other callers' failures open it meanwhile
        async with pool.acquire() as con:
            with pytest.raises(asyncpg.PostgresConnectionError):
                await con.fetchval("SELECT 1")
        assert pool.get_size() == 1
        assert pool.get_idle_size() == 1
    finally:
        breaker.force_close()
        await pool.close()


# --- several hosts: the set's breaker, and the reached server's for its statements -----------


async def test_a_dead_first_host_never_refuses_connecting_to_the_live_second_one(
    install: Install,
) -> None:
    installed = install(AsyncpgIntegration, failure_threshold=2, recovery_timeout=60)
    dead = free_port()
    alone = f"postgresql://127.0.0.1:{dead}/test"
    # The first host is down: connecting to it alone opens its breaker.
    for _ in range(2):
        with pytest.raises(OSError):
            await asyncpg.connect(host="127.0.0.1", port=dead, user="postgres", database="test")
    assert {t.breaker for t in installed.of(BreakerTransitioned)} == {alone}
    # Without raptor asyncpg skips it and reaches the second host: so does it with raptor.
    con = await asyncpg.connect(
        host=["127.0.0.1", POSTGRES[0]], port=[dead, POSTGRES[1]], user="postgres", database="test"
    )
    try:
        assert await con.fetchval("SELECT 1") == 1
        # Its statements are the server's it reached, not the first host's.
        with pytest.raises(asyncpg.DivisionByZeroError):
            await con.fetchval("SELECT 1 / 0")
    finally:
        await con.close()
    assert installed.of(RecoveryFinished)[-1].service == SERVICE


async def test_a_dsn_with_several_hosts_is_guarded_as_their_set(
    install: Install, caplog: pytest.LogCaptureFixture
) -> None:
    installed = install(AsyncpgIntegration, max_retries=0, failure_threshold=2)
    first, second = free_port(), free_port()
    dsn = f"postgresql://postgres@127.0.0.1:{first},127.0.0.1:{second}/test"
    for _ in range(2):
        with pytest.raises(OSError):
            await asyncpg.connect(dsn)
    with pytest.raises(CircuitOpenError):
        await asyncpg.connect(dsn)
    opened = {t.breaker for t in installed.of(BreakerTransitioned)}
    assert opened == {f"postgresql://127.0.0.1,127.0.0.1:{first}/test"}
    assert "internal error" not in caplog.text
