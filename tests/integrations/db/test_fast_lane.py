"""The statement hooks' inlined copy of the loop's fast path (the "fast lane").

psycopg's ``Cursor.execute`` (and ``AsyncCursor.execute``), PyMySQL's ``Cursor.execute``,
redis-py's ``execute_command`` (sync and asyncio) and asyncpg's ``Connection.execute`` and
``fetch*`` run ``drive.run_sync``'s (``run_async``'s) fast path inline instead of calling it.
Whatever differs between the copy and the original would go unnoticed on the success path,
so each driver is checked here against what the fast path promises: a success is counted
(budget and breaker), our own bug while counting never costs the caller its result and makes
the breaker stop judging, a failed first attempt goes to the loop (classified, judged,
published), and a breaker that is not closed sends the call to the loop's entry (refused).
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pymysql
import pytest
import redis
import redis.asyncio

from otel_raptor import CircuitOpenError
from otel_raptor.core.events import RecoveryFinished
from otel_raptor.integrations.db._common import Server
from otel_raptor.integrations.db.asyncpg import AsyncpgIntegration
from otel_raptor.integrations.db.psycopg import PsycopgIntegration
from otel_raptor.integrations.db.pymysql import PyMySQLIntegration
from otel_raptor.integrations.db.redis import RedisIntegration
from otel_raptor.runtime.breaker import CircuitBreaker
from otel_raptor.runtime.drive import count_success
from otel_raptor.runtime.safety import internal_error_counts
from tests.integrations.db.conftest import MYSQL_KWARGS, PG_DSN, PG_URL, Install, Installed
from tests.support.services import MYSQL, POSTGRES, REDIS, require_service


@dataclass
class Driver:
    """One driver's statement hook: how to open a session, a statement that succeeds (and its
    answer), one the server rejects, and the service its breaker is named after."""

    name: str
    integration: type
    service: str
    server: tuple[str, str, int]
    open: Callable[[], tuple[Callable[[str], Any], Callable[[], None]]]
    good: str
    answer: Any
    bad: str
    error: type[BaseException]
    #: Where our bug counting a success is reported (default: ``name``).
    site: str = ""


def _psycopg() -> tuple[Callable[[str], Any], Callable[[], None]]:
    conn = psycopg.connect(PG_DSN, autocommit=True)
    cursor = conn.cursor()

    def run(sql: str) -> Any:
        cursor.execute(sql)
        return cursor.fetchone()

    return run, conn.close


def _psycopg_async() -> tuple[Callable[[str], Any], Callable[[], None]]:
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(psycopg.AsyncConnection.connect(PG_DSN, autocommit=True))
    cursor = conn.cursor()

    async def fetch(sql: str) -> Any:
        await cursor.execute(sql)
        return await cursor.fetchone()

    def run(sql: str) -> Any:
        return loop.run_until_complete(fetch(sql))

    def close() -> None:
        loop.run_until_complete(conn.close())
        loop.close()

    return run, close


def _pymysql() -> tuple[Callable[[str], Any], Callable[[], None]]:
    conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    cursor = conn.cursor()

    def run(sql: str) -> Any:
        cursor.execute(sql)
        return cursor.fetchone()

    return run, conn.close


def _redis() -> tuple[Callable[[str], Any], Callable[[], None]]:
    client = redis.Redis(host=REDIS[0], port=REDIS[1])

    def run(command: str) -> Any:
        return client.execute_command(*command.split())

    return run, client.close


def _redis_async() -> tuple[Callable[[str], Any], Callable[[], None]]:
    loop = asyncio.new_event_loop()
    client = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1])

    def run(command: str) -> Any:
        return loop.run_until_complete(client.execute_command(*command.split()))

    def close() -> None:
        loop.run_until_complete(client.aclose())
        loop.close()

    return run, close


def _asyncpg() -> tuple[Callable[[str], Any], Callable[[], None]]:
    loop = asyncio.new_event_loop()
    con = loop.run_until_complete(asyncpg.connect(PG_URL))

    def run(sql: str) -> Any:
        return loop.run_until_complete(con.fetchval(sql))

    def close() -> None:
        loop.run_until_complete(con.close())
        loop.close()

    return run, close


PG_SERVICE = f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"
DRIVERS = [
    Driver(
        "psycopg", PsycopgIntegration, PG_SERVICE, ("PostgreSQL", *POSTGRES), _psycopg,
        "SELECT 7", (7,), "SELECT * FROM raptor_no_such_table", psycopg.errors.UndefinedTable,
    ),
    Driver(
        "psycopg-async", PsycopgIntegration, PG_SERVICE, ("PostgreSQL", *POSTGRES),
        _psycopg_async, "SELECT 7", (7,), "SELECT * FROM raptor_no_such_table",
        psycopg.errors.UndefinedTable, site="psycopg",
    ),
    Driver(
        "pymysql", PyMySQLIntegration, f"mysql://{MYSQL[0]}:{MYSQL[1]}/test",
        ("MariaDB", *MYSQL), _pymysql, "SELECT 7", (7,), "SELECT * FROM raptor_no_such_table",
        pymysql.err.ProgrammingError,
    ),
    Driver(
        "redis", RedisIntegration, f"redis://{REDIS[0]}:{REDIS[1]}/0", ("Redis", *REDIS),
        _redis, "ECHO seven", b"seven", "RAPTOR_NO_SUCH_COMMAND", redis.exceptions.ResponseError,
    ),
    Driver(
        "redis-async", RedisIntegration, f"redis://{REDIS[0]}:{REDIS[1]}/0", ("Redis", *REDIS),
        _redis_async, "ECHO seven", b"seven", "RAPTOR_NO_SUCH_COMMAND",
        redis.exceptions.ResponseError, site="redis",
    ),
    Driver(
        "asyncpg", AsyncpgIntegration, PG_SERVICE, ("PostgreSQL", *POSTGRES), _asyncpg,
        "SELECT 7", 7, "SELECT * FROM raptor_no_such_table",
        asyncpg.exceptions.UndefinedTableError,
    ),
]  # fmt: skip


@pytest.fixture(params=DRIVERS, ids=[d.name for d in DRIVERS])
def driver(request: pytest.FixtureRequest) -> Driver:
    chosen: Driver = request.param
    require_service(chosen.server[0], chosen.server[1:])
    return chosen


@pytest.fixture
def session(driver: Driver, install: Install) -> Iterator[tuple[Installed, Callable[[str], Any]]]:
    installed = install(driver.integration, max_retries=2)
    run, close = driver.open()
    try:
        yield installed, run
    finally:
        close()


def test_a_success_is_counted(
    driver: Driver, session: tuple[Installed, Callable[[str], Any]]
) -> None:
    installed, run = session
    assert run(driver.good) == driver.answer  # the first statement builds the breaker
    breaker = installed.runtime.breakers.get(driver.service)
    budget = installed.runtime.downstream(driver.service).budget
    calls, window = budget._calls, breaker.snapshot().window_calls
    for _ in range(5):
        assert run(driver.good) == driver.answer
    assert budget._calls == calls + 5
    assert breaker.snapshot().window_calls == window + 5
    assert installed.of(RecoveryFinished) == []


def test_our_bug_counting_a_success_keeps_the_result_and_stops_judging(
    driver: Driver,
    session: tuple[Installed, Callable[[str], Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed, run = session
    assert run(driver.good) == driver.answer
    breaker = installed.runtime.breakers.get(driver.service)

    def broken(self: CircuitBreaker, permit: Any, start: float) -> None:
        raise RuntimeError("raptor's bug")

    monkeypatch.setattr(CircuitBreaker, "record_success_since", broken)
    site = f"{driver.site or driver.name}.record_success"
    before = internal_error_counts().get(site, 0)
    assert run(driver.good) == driver.answer
    assert internal_error_counts().get(site, 0) == before + 1
    assert not breaker._core.judging


def test_a_failed_first_attempt_goes_to_the_loop(
    driver: Driver, session: tuple[Installed, Callable[[str], Any]]
) -> None:
    installed, run = session
    with pytest.raises(driver.error) as raised:
        run(driver.bad)
    assert raised.value.__context__ is None  # raised as the driver raised it, unchained
    [finished] = installed.of(RecoveryFinished, driver.service)
    assert finished.attempts == 1
    assert run(driver.good) == driver.answer  # the session still works


def test_a_breaker_that_is_not_closed_sends_the_call_to_the_loop(
    driver: Driver, session: tuple[Installed, Callable[[str], Any]]
) -> None:
    installed, run = session
    assert run(driver.good) == driver.answer
    breaker = installed.runtime.breakers.get(driver.service)
    breaker.force_open()
    with pytest.raises(CircuitOpenError):
        run(driver.good)
    breaker.reset()
    assert run(driver.good) == driver.answer


def test_every_database_plan_fits_the_lane(driver: Driver, install: Install) -> None:
    """What the lane leaves out of ``run_sync``'s fast path is never needed by a database
    plan: a result that fails, an attempt timeout applied by the loop (even with one set)."""
    installed = install(driver.integration, attempt_timeout=0.5)
    state = installed.integration._state
    target = state.target(Server("postgresql", "127.0.0.1", 1, "lane"))
    for plan in (target.connect, target.statement, target.locked, target.reads, target.cluster):
        assert plan.failure_of is None
        assert not plan.first_kwargs
        assert not plan.wait_for


@pytest.mark.parametrize("due", [False, True], ids=["quiet", "health-check-due"])
def test_a_quiet_breaker_counts_as_count_success_does(
    driver: Driver,
    session: tuple[Installed, Callable[[str], Any]],
    monkeypatch: pytest.MonkeyPatch,
    due: bool,
) -> None:
    """The lanes deposit into the budget themselves when the breaker is quiet (``count_success``
    then does nothing else) and call ``count_success`` otherwise: the same counts, whichever
    does the counting, as ``count_success`` itself gives for the same state."""
    installed, run = session
    assert run(driver.good) == driver.answer
    breaker = installed.runtime.breakers.get(driver.service)
    budget = installed.runtime.downstream(driver.service).budget
    core = breaker._core
    recorded: list[float] = []
    monkeypatch.setattr(
        CircuitBreaker, "record_success_since", lambda self, permit, start: recorded.append(start)
    )
    core.quiet = True
    core._next_check = 0.0 if due else math.inf

    def counted(count: Callable[[], Any]) -> tuple[int, int]:
        calls, records = budget._calls, len(recorded)
        for _ in range(3):
            count()
        return budget._calls - calls, len(recorded) - records

    [target] = [
        t for t in installed.integration._state._targets.values() if t.service == driver.service
    ]
    plan = target.statement
    assert plan.core is core
    by_count_success = counted(lambda: count_success(plan, core, 1.0, "test"))
    by_lane = counted(lambda: run(driver.good))
    assert by_lane == by_count_success == (3, 3 if due else 0)
    assert internal_error_counts().get("test", 0) == 0


def test_a_statement_finds_its_connections_target_without_looking_it_up(
    driver: Driver,
    session: tuple[Installed, Callable[[str], Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hooks read the target cached on the connection (or pool) as a plain attribute, not
    with ``getattr(..., TARGET_ATTRIBUTE)``: the name they read must be that constant."""
    if driver.name == "asyncpg":
        pytest.skip("asyncpg connections take no attributes: targets are kept by address")
    _, run = session
    assert run(driver.good) == driver.answer
    module = sys.modules[driver.integration.__module__]

    def looked_up(*args: Any) -> Any:
        raise AssertionError("the cached target was not found")

    monkeypatch.setattr(module, "_target", looked_up)
    site = f"{driver.site or driver.name}.describe"
    before = internal_error_counts().get(site, 0)
    assert run(driver.good) == driver.answer
    assert internal_error_counts().get(site, 0) == before
