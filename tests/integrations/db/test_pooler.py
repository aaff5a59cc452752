"""A pooler or proxy in front of a database server that died: the breaker must open.

Behind PgBouncer every connect succeeds while the server is down (PgBouncer answers the login
itself), and every statement fails with ``08P01`` and a closed connection: at once ("server
conn crashed?", "server login has been failing"), or after waiting for a server connection
until PgBouncer's ``query_wait_timeout``. A lost connection is
unconfirmed (a reaper of idle sessions looks the same), and each connect's success dropped
it: 200 calls out of 200 failed, each after the full wait, and the breaker never opened.
A statement sent on a connection that just opened cannot have found it reaped for idleness:
its lost link confirms the outage (docs/databases.md, "Behind a pooler").

Real PgBouncer (Debian's ``pgbouncer``) in front of a private PostgreSQL that the test kills
and starts again; never the shared server. Skipped without ``pgbouncer`` unless
``RAPTOR_REQUIRE_SERVICES=1``.

The same for PyMySQL and redis-py: no MySQL proxy is packaged, so the fault-injecting proxy
(``tests/support/tcp_proxy.py``) plays ProxySQL whose server is dead (the login answered,
every statement's link cut) in front of a private MariaDB, and a Redis proxy that cuts the
link in front of a private Redis. ProxySQL can also keep the link and answer each statement
with its own error 9001 ("Max connect timeout reached while reaching hostgroup N"): the
fault-injecting proxy plays that too. Real twemproxy (Debian's ``nutcracker``, skipped
without it unless ``RAPTOR_REQUIRE_SERVICES=1``) does not cut the link: it answers each
command with ``-ERR Connection refused`` at once (annotated by redis-py in a pipeline),
which counts as its refused reconnect; a script's own reply of the same text does not.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import psycopg2
import pymysql
import pytest
import redis
import redis.asyncio
import redis.asyncio.client

from otel_raptor import CircuitOpenError
from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.events import BreakerTransitioned, ErrorClassified, RetryScheduled
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations.db.asyncpg import AsyncpgIntegration
from otel_raptor.integrations.db.psycopg import PsycopgIntegration
from otel_raptor.integrations.db.psycopg2 import Psycopg2Integration
from otel_raptor.integrations.db.pymysql import PyMySQLIntegration
from otel_raptor.integrations.db.redis import RedisIntegration
from tests.integrations.db.conftest import Install, Installed
from tests.support.dbservers import (
    PrivateMariaDB,
    PrivatePgBouncer,
    PrivatePostgres,
    PrivateRedis,
    PrivateTwemproxy,
)
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.timeout(120)

#: PgBouncer's ``query_wait_timeout``: how long a statement waits for the dead server.
QUERY_WAIT = 1.0
#: Calls the breaker may take to open (``failure_threshold`` is 3: one lost connection held,
#: then a run of three). Without the fix it never opens.
OPEN_WITHIN = 6
#: Calls made while the server is down, at most.
DOWN_CALLS = 12


@pytest.fixture(scope="module")
def module_bouncer() -> Iterator[PrivatePgBouncer]:
    """One server and one PgBouncer for the module: each test kills the server and starts it
    again, and ends with calls through PgBouncer succeeding (the breaker is per test)."""
    server = PrivatePostgres()
    bouncer = None
    try:
        server.start()
        bouncer = PrivatePgBouncer(server, query_wait=QUERY_WAIT)
        bouncer.start()
        yield bouncer
    finally:
        if bouncer is not None:
            bouncer.close()
        server.close()


@pytest.fixture
def bouncer(module_bouncer: PrivatePgBouncer) -> PrivatePgBouncer:
    if not _listening(module_bouncer.server.port):  # a test before this one failed midway
        module_bouncer.server.start()
    return module_bouncer


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


def opened(installed: Installed) -> list[BreakerTransitioned]:
    return [e for e in installed.of(BreakerTransitioned) if e.to_state is CircuitState.OPEN]


def play_outage(
    bouncer: PrivatePgBouncer, installed: Installed, call: Callable[[], object]
) -> None:
    """Warm up, kill the server, call until the breaker refuses; start it again, call until
    a call succeeds. Asserts the breaker opened within ``OPEN_WITHIN`` calls, refused fast,
    and closed once the server was back."""
    play(installed, call, bouncer.server.kill, bouncer.server.start)


def play(
    installed: Installed,
    call: Callable[[], object],
    down: Callable[[], object],
    up: Callable[[], object],
) -> list[Exception]:
    """:func:`play_outage` with the outage's start (``down``) and end (``up``) given.
    Returns the failures the calls met while the server was down."""
    for _ in range(3):
        call()
    down()
    failures = 0
    seen: list[Exception] = []
    refused_in: float | None = None
    for _ in range(DOWN_CALLS):
        started = time.monotonic()
        try:
            call()
        except CircuitOpenError:
            refused_in = time.monotonic() - started
            break
        except Exception as failure:  # the outage, as the app sees it
            failures += 1
            seen.append(failure)
        else:
            pytest.fail("a call succeeded while the server was down")
    assert opened(installed), f"the breaker never opened in {failures} failed calls"
    assert failures <= OPEN_WITHIN
    assert refused_in is not None
    assert refused_in < QUERY_WAIT / 2  # refused at once, not after PgBouncer's wait
    up()
    deadline = time.monotonic() + 30
    while True:
        try:
            call()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    for _ in range(3):
        call()
    closed = installed.of(BreakerTransitioned)[-1]
    assert closed.to_state is CircuitState.CLOSED
    return seen


@pytest.mark.parametrize("statement_timeout", [30.0, 0.0], ids=["timeout-query", "no-timeout"])
def test_psycopg_behind_pgbouncer_opens_on_a_dead_server(
    bouncer: PrivatePgBouncer, install: Install, statement_timeout: float
) -> None:
    # With a statement timeout, raptor's own query after the connect is the first to wait.
    installed = install(PsycopgIntegration, statement_timeout=statement_timeout, max_retries=0)

    def call() -> object:
        with psycopg.connect(bouncer.dsn, autocommit=True, connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone()

    play_outage(bouncer, installed, call)


def test_psycopg2_behind_pgbouncer_opens_on_a_dead_server(
    bouncer: PrivatePgBouncer, install: Install
) -> None:
    installed = install(Psycopg2Integration, statement_timeout=0.0, max_retries=0)

    def call() -> object:
        conn = psycopg2.connect(bouncer.dsn, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone()
        finally:
            conn.close()

    play_outage(bouncer, installed, call)


@pytest.mark.parametrize("statement_timeout", [30.0, 0.0], ids=["timeout-query", "no-timeout"])
def test_asyncpg_behind_pgbouncer_opens_on_a_dead_server(
    bouncer: PrivatePgBouncer, install: Install, statement_timeout: float
) -> None:
    # As psycopg's: with a statement timeout, raptor's own query after the connect is first.
    installed = install(AsyncpgIntegration, statement_timeout=statement_timeout, max_retries=0)

    async def once() -> object:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=bouncer.port,
            user="postgres",
            database="postgres",
            statement_cache_size=0,  # PgBouncer: no prepared statements across clients
            timeout=5,
        )
        try:
            return await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    loop = asyncio.new_event_loop()
    try:
        play_outage(bouncer, installed, lambda: loop.run_until_complete(once()))
    finally:
        loop.close()


@pytest.mark.parametrize("min_size", [1, 2])
def test_psycopg_pool_behind_pgbouncer_opens_on_a_dead_server(
    bouncer: PrivatePgBouncer, install: Install, min_size: int
) -> None:
    # The pool's connections die with the server (PgBouncer closes its clients' sessions);
    # the pool reconnects through PgBouncer in the background.
    from psycopg_pool import ConnectionPool

    installed = install(PsycopgIntegration, statement_timeout=0.0, max_retries=0)
    pool = ConnectionPool(
        bouncer.dsn,
        min_size=min_size,
        max_size=min_size,
        kwargs={"autocommit": True},
        timeout=5,
        reconnect_timeout=60,
        open=True,
    )
    try:

        def call() -> object:
            with pool.connection() as conn:
                return conn.execute("SELECT 1").fetchone()

        # With one connection, the pool's reconnect is what the open breaker refuses; the
        # app, with no idle connection to get, is refused at once by the pool's getconn.
        play_outage(bouncer, installed, call)
    finally:
        pool.close()


# --- PyMySQL behind a proxy whose server is dead (ProxySQL) -------------------------------------


#: What ProxySQL answers a statement once ``mysql-connect_timeout_server_max`` passed without
#: a connection to a server of the statement's hostgroup (MySQL_Session.cpp, error 9001).
PROXYSQL_9001 = "Max connect timeout reached while reaching hostgroup 0 after 10000ms"


def pymysql_call(proxy: FaultProxy, statement: str = "SELECT 1") -> Callable[[], object]:
    def call() -> object:
        conn = pymysql.connect(
            host="127.0.0.1",
            port=proxy.port,
            user="root",
            autocommit=True,
            connect_timeout=5,
            read_timeout=5,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchone()
        finally:
            if conn.open:
                conn.close()

    return call


@pytest.fixture
def mysql_proxy() -> Iterator[FaultProxy]:
    """The fault-injecting proxy in front of a private MariaDB. No MySQL proxy is packaged:
    ``cut_mysql_commands`` plays ProxySQL whose server is dead (the login goes through, every
    first statement loses its link); the server itself stays up, so ``heal`` brings it back."""
    server = PrivateMariaDB()
    proxy = None
    try:
        server.start()
        proxy = FaultProxy(("127.0.0.1", server.port))
        yield proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.close()


@pytest.mark.parametrize("statement_timeout", [30.0, 0.0], ids=["timeout-query", "no-timeout"])
def test_pymysql_behind_a_proxy_opens_on_a_dead_server(
    mysql_proxy: FaultProxy, install: Install, statement_timeout: float
) -> None:
    # With a statement timeout, raptor's own query after the connect is the first cut.
    installed = install(PyMySQLIntegration, statement_timeout=statement_timeout, max_retries=0)

    play(installed, pymysql_call(mysql_proxy), mysql_proxy.cut_mysql_commands, mysql_proxy.heal)
    assert mysql_proxy.cuts >= 2  # the statements did lose their links


@pytest.mark.parametrize(
    ("per_call", "statement_timeout"),
    [(False, 0.0), (True, 0.0), (True, 30.0)],
    ids=["one-connection", "per-call", "per-call-timeout-query"],
)
def test_pymysql_behind_proxysql_opens_on_its_max_connect_timeout(
    mysql_proxy: FaultProxy, install: Install, per_call: bool, statement_timeout: float
) -> None:
    # ProxySQL keeps the link and answers each statement with 9001. Read by its message as a
    # timeout, it counted, but with a connection per call each connect's success (ProxySQL
    # answers the login) ended the run: the breaker never opened. With a statement timeout,
    # raptor's own query after the connect is the first answered so.
    installed = install(PyMySQLIntegration, statement_timeout=statement_timeout, max_retries=0)
    kept = pymysql.connect(
        host="127.0.0.1", port=mysql_proxy.port, user="root", autocommit=True, read_timeout=5
    )

    def on_kept() -> object:
        with kept.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone()

    try:
        seen = play(
            installed,
            pymysql_call(mysql_proxy) if per_call else on_kept,
            lambda: mysql_proxy.answer_mysql_commands(9001, PROXYSQL_9001),
            mysql_proxy.heal,
        )
    finally:
        kept.close()
    assert {(type(e), e.args) for e in seen} == {
        (pymysql.err.OperationalError, (9001, PROXYSQL_9001))
    }
    assert mysql_proxy.answered >= 2


def test_a_write_proxysql_could_not_send_is_sent_once(
    mysql_proxy: FaultProxy, install: Install
) -> None:
    # The INSERT never reached a server: sent again, it is applied once, not lost.
    pymysql_call(mysql_proxy, "CREATE DATABASE IF NOT EXISTS test")()
    pymysql_call(mysql_proxy, "CREATE TABLE IF NOT EXISTS test.proxied (id INT)")()
    installed = install(PyMySQLIntegration, statement_timeout=0.0, max_retries=1)
    conn = pymysql.connect(
        host="127.0.0.1", port=mysql_proxy.port, user="root", autocommit=True, read_timeout=5
    )
    try:
        mysql_proxy.answer_mysql_commands(9001, PROXYSQL_9001, times=1)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO test.proxied VALUES (1)")
            cur.execute("SELECT COUNT(*) FROM test.proxied")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    assert mysql_proxy.answered == 1
    assert len(installed.of(RetryScheduled)) == 1


# --- redis-py behind a proxy whose server is dead (a proxy that cuts the link) ----------------


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    """The fault-injecting proxy in front of a private Redis: ``cut_redis_commands`` plays a
    proxy whose server is dead and that cuts the link (the connect's ``HELLO`` and ``CLIENT
    SETINFO`` answered, every command losing its link); ``heal`` brings the server back."""
    server = PrivateRedis()
    proxy = None
    try:
        server.start()
        proxy = FaultProxy(("127.0.0.1", server.port))
        yield proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.close()


def test_redis_behind_a_proxy_opens_on_a_dead_server(
    redis_proxy: FaultProxy, install: Install
) -> None:
    installed = install(RedisIntegration, max_retries=0)
    client = redis.Redis(port=redis_proxy.port, socket_timeout=5, socket_connect_timeout=5)
    try:
        play(installed, lambda: client.get("key"), redis_proxy.cut_redis_commands, redis_proxy.heal)
    finally:
        client.close()
    assert redis_proxy.cuts >= 2  # the commands did lose their links


def test_redis_asyncio_behind_a_proxy_opens_on_a_dead_server(
    redis_proxy: FaultProxy, install: Install
) -> None:
    installed = install(RedisIntegration, max_retries=0)
    loop = asyncio.new_event_loop()
    client = redis.asyncio.Redis(port=redis_proxy.port, socket_timeout=5, socket_connect_timeout=5)
    try:
        play(
            installed,
            lambda: loop.run_until_complete(client.get("key")),
            redis_proxy.cut_redis_commands,
            redis_proxy.heal,
        )
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
    assert redis_proxy.cuts >= 2


# --- redis-py behind twemproxy whose server is dead ----------------------------------------------


@pytest.fixture
def twemproxy() -> Iterator[PrivateTwemproxy]:
    server = PrivateRedis()
    proxy = None
    try:
        server.start()
        proxy = PrivateTwemproxy(server)
        proxy.start()
        yield proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.close()


def twemproxy_client(proxy: PrivateTwemproxy) -> dict[str, object]:
    """What a redis-py client needs to talk to twemproxy: no ``HELLO``, no ``CLIENT``."""
    return {
        "port": proxy.port,
        "protocol": 2,
        "driver_info": None,
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
    }


def test_redis_behind_twemproxy_opens_on_a_dead_server(
    twemproxy: PrivateTwemproxy, install: Install
) -> None:
    # twemproxy answers "-ERR Connection refused" at once, keeping the link: read as any
    # error reply (a client error), it never opened the breaker.
    installed = install(RedisIntegration, max_retries=0)
    client = redis.Redis(**twemproxy_client(twemproxy))  # type: ignore[arg-type]
    try:
        seen = play(
            installed, lambda: client.get("key"), twemproxy.server.kill, twemproxy.server.start
        )
    finally:
        client.close()
    assert {(type(e), str(e)) for e in seen} == {(redis.ResponseError, "Connection refused")}


def test_redis_asyncio_behind_twemproxy_opens_on_a_dead_server(
    twemproxy: PrivateTwemproxy, install: Install
) -> None:
    installed = install(RedisIntegration, max_retries=0)
    loop = asyncio.new_event_loop()
    client = redis.asyncio.Redis(**twemproxy_client(twemproxy))  # type: ignore[arg-type]
    try:
        seen = play(
            installed,
            lambda: loop.run_until_complete(client.get("key")),
            twemproxy.server.kill,
            twemproxy.server.start,
        )
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
    assert {(type(e), str(e)) for e in seen} == {(redis.ResponseError, "Connection refused")}


def test_a_write_twemproxy_refused_is_sent_again(
    twemproxy: PrivateTwemproxy, install: Install
) -> None:
    # twemproxy never forwarded it: an INCR it refused may be sent again, as one whose
    # connection could not be opened; the retry finds the server back.
    installed = install(RedisIntegration, max_retries=1)
    client = redis.Redis(**twemproxy_client(twemproxy))  # type: ignore[arg-type]
    try:
        assert client.incr("counter") == 1
        twemproxy.server.kill()
        with pytest.raises(redis.ResponseError, match=r"^Connection refused$"):
            client.incr("counter")
        assert len(installed.of(RetryScheduled)) == 1
    finally:
        client.close()


def test_a_pipeline_behind_twemproxy_opens_on_a_dead_server(
    twemproxy: PrivateTwemproxy, install: Install
) -> None:
    # twemproxy answers every command of the pipeline with "-ERR Connection refused";
    # redis-py raises the first, annotated: unmatched, it was a client error, and the
    # breaker never opened. (twemproxy supports no MULTI: no transaction here.)
    installed = install(RedisIntegration, max_retries=0)
    client = redis.Redis(**twemproxy_client(twemproxy))  # type: ignore[arg-type]

    def call() -> object:
        pipe = client.pipeline(transaction=False)
        pipe.get("key")
        pipe.incr("counter")
        return pipe.execute()

    try:
        seen = play(installed, call, twemproxy.server.kill, twemproxy.server.start)
    finally:
        client.close()
    assert {(type(e), str(e)) for e in seen} == {
        (
            redis.ResponseError,
            "Command # 1 (GET key) of pipeline caused error: Connection refused",
        )
    }
    assert {e.classification.code for e in installed.of(ErrorClassified)} == {"ECONNREFUSED"}


def test_an_asyncio_pipeline_behind_twemproxy_opens_on_a_dead_server(
    twemproxy: PrivateTwemproxy, install: Install
) -> None:
    # redis.asyncio before 8.2 quotes the reply in its annotation ("...caused error:
    # ('Connection refused',)"), 8.2 no longer does ("...caused error: Connection refused"):
    # the rule matches both, and the error expected is the one redis-py itself annotates.
    installed = install(RedisIntegration, max_retries=0)
    loop = asyncio.new_event_loop()
    client = redis.asyncio.Redis(**twemproxy_client(twemproxy))  # type: ignore[arg-type]

    async def once() -> object:
        pipe = client.pipeline(transaction=False)
        pipe.get("key")
        pipe.incr("counter")
        return await pipe.execute()

    try:
        seen = play(
            installed,
            lambda: loop.run_until_complete(once()),
            twemproxy.server.kill,
            twemproxy.server.start,
        )
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
    annotated = redis.ResponseError("Connection refused")
    redis.asyncio.client.Pipeline.annotate_exception(
        client.pipeline(), annotated, 1, ("GET", "key")
    )
    assert str(annotated).startswith("Command # 1 (GET key) of pipeline caused error: ")
    assert {(type(e), str(e)) for e in seen} == {(redis.ResponseError, str(annotated))}
    assert {e.classification.code for e in installed.of(ErrorClassified)} == {"ECONNREFUSED"}


def test_a_read_pipeline_twemproxy_refused_is_sent_again(
    twemproxy: PrivateTwemproxy, install: Install
) -> None:
    # A pipeline of reads may be sent again whatever happened to it: the retry, made once
    # the server is back, succeeds.
    installed = install(RedisIntegration, max_retries=1)
    client = redis.Redis(**twemproxy_client(twemproxy))  # type: ignore[arg-type]
    try:
        client.set("key", "value")
        twemproxy.server.kill()
        pipe = client.pipeline(transaction=False)
        pipe.get("key")
        pipe.get("other")
        with pytest.raises(redis.ResponseError, match=r"^Command # 1 \(GET key\) of pipeline"):
            pipe.execute()
        assert len(installed.of(RetryScheduled)) == 1
    finally:
        client.close()


# --- a script whose own error reads as a proxy's (the shared Redis) ------------------------------

#: A script replying with the very text twemproxy replies with when its server is dead.
REFUSING_SCRIPT = "return redis.error_reply('Connection refused')"


@pytest.mark.usefixtures("redis_server")
def test_a_scripts_connection_refused_is_an_ordinary_error_reply(install: Install) -> None:
    # EVAL's own "-Connection refused" was taken for twemproxy's: counted as an outage (the
    # breaker of a live server opened) and, marked unsent, the script was run again.
    installed = install(RedisIntegration, max_retries=1)
    client = redis.Redis(socket_timeout=5)
    try:
        sha = client.script_load(REFUSING_SCRIPT)
        for _ in range(OPEN_WITHIN):
            with pytest.raises(redis.ResponseError, match=r"^Connection refused$"):
                client.eval(REFUSING_SCRIPT, 0)
            with pytest.raises(redis.ResponseError, match=r"^Connection refused$"):
                client.evalsha(sha, 0)
            with pytest.raises(redis.ResponseError, match=r"^Connection refused$"):
                client.eval_ro(REFUSING_SCRIPT, 0)
            pipe = client.pipeline(transaction=False)
            pipe.get("key")
            pipe.eval(REFUSING_SCRIPT, 0)
            with pytest.raises(redis.ResponseError, match=r"\(EVAL .*caused error: Connection"):
                pipe.execute()
        assert client.ping()
    finally:
        client.close()
    rules = {e.classification.rule for e in installed.of(ErrorClassified)}
    assert rules == {"redis.script_reply"}
    assert {e.classification.category for e in installed.of(ErrorClassified)} == {
        ErrorCategory.QUERY
    }
    assert not installed.of(RetryScheduled)
    assert not installed.of(BreakerTransitioned)
