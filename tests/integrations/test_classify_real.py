"""Real exceptions from the real libraries under real faults, through ``classify``.

HTTP faults come from a scripted loopback server (tests/support/faulty_http.py); DNS failures
use the reserved ``.invalid`` TLD, which fails locally without any network; databases are the
shared loopback PostgreSQL, MariaDB and Redis (skipped when absent, failed under
``RAPTOR_REQUIRE_SERVICES=1``). Everything a test creates (tables, roles, users, keys) has a
unique name and is removed again; no server setting outlives its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.integrations.db._common import lost_connection
from otel_raptor.runtime.classifying import classify
from tests.support.faulty_http import (
    Action,
    FaultyHTTPServer,
    close,
    closed_port,
    hang,
    ok,
    reset,
    status,
    truncate,
)
from tests.support.services import MYSQL, POSTGRES, REDIS, require_module, require_service

C = ErrorCategory
DNS_CODES = {"EAI_NONAME", "EAI_AGAIN", "EAI_NODATA", "EAI_FAIL"}
CLIENT_TIMEOUT_S = 0.3
UNRESOLVABLE = "raptor-test.invalid"  # RFC 6761: never resolves, answered locally


def lib(name: str) -> Any:
    """Import ``name`` (a dotted module path) or skip the test when it is not installed."""
    require_module(name.split(".", maxsplit=1)[0])
    return importlib.import_module(name)


def caught(call: Callable[[], object]) -> BaseException:
    """The exception ``call`` raises (the test fails if it raises nothing)."""
    try:
        call()
    except BaseException as exc:
        return exc
    pytest.fail("expected an exception")


def run(coro_fn: Callable[[], Coroutine[Any, Any, object]]) -> Callable[[], object]:
    return lambda: asyncio.run(coro_fn())


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def check(
    exc: BaseException,
    category: ErrorCategory,
    *,
    retryable: bool | None = None,
    code: str | None = None,
) -> Classification:
    result = classify(exc)
    detail = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc!r} -> {result}"
    assert result.category is category, detail
    if retryable is not None:
        assert result.retryable is retryable, detail
    if code is not None:
        assert result.code == code, detail
    return result


# -- HTTP clients ---------------------------------------------------------------------------------

Fetch = Callable[[str, float], object]


def fetch_requests(url: str, timeout: float) -> object:
    requests = lib("requests")
    response = requests.get(url, timeout=timeout)
    response.raise_for_status()
    return response


def fetch_httpx(url: str, timeout: float) -> object:
    httpx = lib("httpx")
    return httpx.get(url, timeout=timeout).raise_for_status()


def fetch_httpx_async(url: str, timeout: float) -> object:
    httpx = lib("httpx")

    async def go() -> object:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return (await client.get(url)).raise_for_status()

    return asyncio.run(go())


def fetch_aiohttp(url: str, timeout: float) -> object:
    aiohttp = lib("aiohttp")

    async def go() -> object:
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with (
            aiohttp.ClientSession(timeout=client_timeout, raise_for_status=True) as session,
            session.get(url) as response,
        ):
            return await response.read()

    return asyncio.run(go())


def fetch_urllib3(url: str, timeout: float) -> object:
    urllib3 = lib("urllib3")
    return urllib3.PoolManager(retries=False).request("GET", url, timeout=timeout)


HTTP_CLIENTS: dict[str, Fetch] = {
    "requests": fetch_requests,
    "httpx": fetch_httpx,
    "httpx_async": fetch_httpx_async,
    "aiohttp": fetch_aiohttp,
    "urllib3": fetch_urllib3,
}
# urllib3 returns error responses instead of raising; see test_urllib3_status_responses.
RAISING_CLIENTS = [name for name in HTTP_CLIENTS if name != "urllib3"]


@pytest.fixture(params=list(HTTP_CLIENTS))
def client(request: pytest.FixtureRequest) -> Fetch:
    return HTTP_CLIENTS[request.param]


def fault(client: Fetch, *script: Action, path: str = "/") -> BaseException:
    # Two copies of each fault: aiohttp silently retries an idempotent request once.
    with FaultyHTTPServer([*script, *script]) as server:
        return caught(lambda: client(server.url(path), CLIENT_TIMEOUT_S))


class TestHTTP:
    def test_refused(self, client: Fetch) -> None:
        port = closed_port()
        exc = caught(lambda: client(f"http://127.0.0.1:{port}/", 2.0))
        check(exc, C.CONNECTION, retryable=True, code="ECONNREFUSED")

    def test_hang_is_a_timeout(self, client: Fetch) -> None:
        started = time.monotonic()
        exc = fault(client, hang(5.0))
        assert time.monotonic() - started < 3.0
        check(exc, C.TIMEOUT, retryable=True)

    def test_close_without_response(self, client: Fetch) -> None:
        check(fault(client, close()), C.CONNECTION, retryable=True)

    def test_reset(self, client: Fetch) -> None:
        check(fault(client, reset()), C.CONNECTION, retryable=True)

    def test_closed_mid_response(self, client: Fetch) -> None:
        check(fault(client, truncate(b"partial", 1000)), C.CONNECTION, retryable=True)

    def test_dns_failure(self, client: Fetch) -> None:
        started = time.monotonic()
        exc = caught(lambda: client(f"http://{UNRESOLVABLE}/", 2.0))
        assert time.monotonic() - started < 5.0, "resolving .invalid must not hang"
        result = check(exc, C.DNS)
        assert result.code in DNS_CODES
        assert result.retryable is (result.code == "EAI_AGAIN")

    def test_tls_to_a_plain_http_server(self, client: Fetch) -> None:
        with FaultyHTTPServer() as server:
            url = server.url("/").replace("http://", "https://")
            exc = caught(lambda: client(url, 2.0))
        check(exc, C.TLS, retryable=False)

    def test_tls_certificate_not_trusted(self, client: Fetch, self_signed: ssl.SSLContext) -> None:
        with FaultyHTTPServer(ssl_context=self_signed) as server:
            exc = caught(lambda: client(server.url("/"), 2.0))
        check(exc, C.TLS, retryable=False)


@pytest.mark.parametrize("name", RAISING_CLIENTS)
class TestHTTPStatus:
    def test_429_with_retry_after(self, name: str) -> None:
        exc = fault(HTTP_CLIENTS[name], status(429, {"Retry-After": "3"}))
        result = check(exc, C.RATE_LIMIT, retryable=True)
        assert (result.status_code, result.error_type) == (429, "429")
        assert result.retry_after == 3.0

    def test_429_with_an_http_date(self, name: str) -> None:
        from email.utils import formatdate

        when = formatdate(time.time() + 30, usegmt=True)
        result = check(fault(HTTP_CLIENTS[name], status(429, {"Retry-After": when})), C.RATE_LIMIT)
        assert result.retry_after is not None
        assert 25.0 <= result.retry_after <= 31.0

    def test_503(self, name: str) -> None:
        result = check(fault(HTTP_CLIENTS[name], status(503)), C.UNAVAILABLE, retryable=True)
        assert (result.status_code, result.retry_after) == (503, None)

    def test_404(self, name: str) -> None:
        check(fault(HTTP_CLIENTS[name], status(404)), C.CLIENT_ERROR, retryable=False)


def test_urllib3_status_responses() -> None:
    from otel_raptor.core.classify import classify_status

    with FaultyHTTPServer([status(429, {"retry-after": "2"}), status(503)]) as server:
        limited = fetch_urllib3(server.url("/"), 2.0)
        down = fetch_urllib3(server.url("/"), 2.0)
    limited_result = classify_status(limited.status, limited.headers, now_wall=time.time())  # type: ignore[attr-defined]
    down_result = classify_status(down.status, down.headers, now_wall=time.time())  # type: ignore[attr-defined]
    assert limited_result is not None
    assert down_result is not None
    assert (limited_result.category, limited_result.retry_after) == (C.RATE_LIMIT, 2.0)
    assert down_result.category is C.UNAVAILABLE


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate (needs the openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# -- sockets and asyncio --------------------------------------------------------------------------


class TestSocketsAndAsyncio:
    def test_socket_refused(self) -> None:
        port = closed_port()
        exc = caught(lambda: socket.create_connection(("127.0.0.1", port), timeout=2))
        check(exc, C.CONNECTION, code="ECONNREFUSED")

    def test_socket_read_timeout(self) -> None:
        with (
            FaultyHTTPServer([hang(5.0)]) as server,
            socket.create_connection(("127.0.0.1", server.port), timeout=0.2) as sock,
        ):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            exc = caught(lambda: sock.recv(10))
        check(exc, C.TIMEOUT, retryable=True)

    def test_getaddrinfo(self) -> None:
        exc = caught(lambda: socket.getaddrinfo(UNRESOLVABLE, 80))
        result = check(exc, C.DNS)
        assert result.code in DNS_CODES

    def test_ssl_handshake_with_a_plain_server(self) -> None:
        context = ssl.create_default_context()
        with FaultyHTTPServer() as server:
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=2)
            exc = caught(lambda: context.wrap_socket(raw, server_hostname="localhost"))
            raw.close()
        check(exc, C.TLS, retryable=False)

    def test_asyncio_refused(self) -> None:
        port = closed_port()
        exc = caught(run(lambda: asyncio.open_connection("127.0.0.1", port)))
        check(exc, C.CONNECTION, code="ECONNREFUSED")

    def test_wait_for_timeout(self) -> None:
        exc = caught(run(lambda: asyncio.wait_for(asyncio.sleep(5), 0.01)))
        check(exc, C.TIMEOUT, retryable=True)

    def test_cancelled(self) -> None:
        async def cancel_a_task() -> None:
            task = asyncio.create_task(asyncio.sleep(5))
            await asyncio.sleep(0)
            task.cancel()
            await task

        exc = caught(run(cancel_a_task))
        assert isinstance(exc, asyncio.CancelledError)
        check(exc, C.CANCELLED, retryable=False)

    def test_memory_error(self) -> None:
        exc = caught(lambda: bytearray(1 << 62))
        check(exc, C.RESOURCE_EXHAUSTED, retryable=False)


# -- sqlite3 --------------------------------------------------------------------------------------


class TestSqlite:
    def test_locked(self, tmp_path: Path) -> None:
        import sqlite3

        path = tmp_path / "locked.db"
        holder = sqlite3.connect(path, timeout=0, isolation_level=None)
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            holder.execute("CREATE TABLE t (x)")
            holder.execute("BEGIN IMMEDIATE")
            holder.execute("INSERT INTO t VALUES (1)")
            exc = caught(lambda: other.execute("INSERT INTO t VALUES (2)"))
        finally:
            holder.close()
            other.close()
        check(exc, C.CONCURRENCY, retryable=True)

    def test_integrity(self) -> None:
        import sqlite3

        db = sqlite3.connect(":memory:")
        db.execute("CREATE TABLE t (x PRIMARY KEY)")
        db.execute("INSERT INTO t VALUES (1)")
        check(caught(lambda: db.execute("INSERT INTO t VALUES (1)")), C.INTEGRITY)

    def test_syntax_error(self) -> None:
        import sqlite3

        db = sqlite3.connect(":memory:")
        check(caught(lambda: db.execute("SELEC 1")), C.QUERY, retryable=False)
        check(caught(lambda: db.execute("SELECT * FROM missing")), C.QUERY)


# -- PostgreSQL: psycopg 3, psycopg2 and asyncpg behind one small interface -----------------------


class PgSession(Protocol):
    def run(self, sql: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class SyncSession:
    conn: Any
    module: str

    def run(self, sql: str) -> None:
        with self.conn.cursor() as cursor:
            cursor.execute(sql)

    def close(self) -> None:
        self.conn.close()


@dataclass
class AsyncpgSession:
    """An asyncpg connection on its own loop, driven synchronously (usable from one thread)."""

    conn: Any
    loop: asyncio.AbstractEventLoop

    def run(self, sql: str) -> None:
        self.loop.run_until_complete(self.conn.execute(sql))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close(timeout=2))
        finally:
            self.loop.close()


def pg_open(driver: str, *, user: str = "postgres", port: int | None = None) -> PgSession:
    host, default_port = POSTGRES
    port = default_port if port is None else port
    if driver == "psycopg":
        psycopg = lib("psycopg")
        dsn = f"host={host} port={port} dbname=test user={user} connect_timeout=3"
        return SyncSession(psycopg.connect(dsn, autocommit=True), driver)
    if driver == "psycopg2":
        psycopg2 = lib("psycopg2")
        conn = psycopg2.connect(host=host, port=port, dbname="test", user=user, connect_timeout=3)
        conn.autocommit = True
        return SyncSession(conn, driver)
    asyncpg = lib("asyncpg")
    loop = asyncio.new_event_loop()
    try:
        conn = loop.run_until_complete(
            asyncpg.connect(host=host, port=port, database="test", user=user, timeout=3)
        )
    except BaseException:
        loop.close()
        raise
    return AsyncpgSession(conn, loop)


@pytest.fixture(params=["psycopg", "psycopg2", "asyncpg"])
def pg(request: pytest.FixtureRequest) -> str:
    require_service("PostgreSQL", POSTGRES)
    lib(request.param)
    return str(request.param)


@contextlib.contextmanager
def pg_session(driver: str) -> Iterator[PgSession]:
    session = pg_open(driver)
    try:
        yield session
    finally:
        session.close()


@contextlib.contextmanager
def pg_table(session: PgSession, columns: str, rows: str = "") -> Iterator[str]:
    table = unique("raptor_t")
    session.run(f"CREATE TABLE {table} ({columns})")
    try:
        if rows:
            session.run(f"INSERT INTO {table} VALUES {rows}")
        yield table
    finally:
        session.run(f"DROP TABLE IF EXISTS {table}")


class TestPostgres:
    def test_unique_violation(self, pg: str) -> None:
        with pg_session(pg) as s, pg_table(s, "id int PRIMARY KEY", "(1)") as table:
            exc = caught(lambda: s.run(f"INSERT INTO {table} VALUES (1)"))
        check(exc, C.INTEGRITY, retryable=False, code="23505")

    def test_syntax_error(self, pg: str) -> None:
        with pg_session(pg) as s:
            check(caught(lambda: s.run("SELEC 1")), C.QUERY, code="42601")

    def test_undefined_table(self, pg: str) -> None:
        with pg_session(pg) as s:
            exc = caught(lambda: s.run(f"SELECT * FROM {unique('raptor_missing')}"))
        check(exc, C.QUERY, code="42P01")

    def test_unknown_role_is_authentication(self, pg: str) -> None:
        # The shared server trusts loopback, so a wrong password (28P01) cannot be provoked;
        # an unknown role is refused with 28000 (asyncpg) or only a message (psycopg, psycopg2).
        exc = caught(lambda: pg_open(pg, user=unique("raptor_nobody")))
        result = check(exc, C.AUTHENTICATION, retryable=False)
        assert result.code in (None, "28000")

    def test_insufficient_privilege(self, pg: str) -> None:
        role = unique("raptor_np")
        with pg_session(pg) as s, pg_table(s, "id int", "(1)") as table:
            s.run(f"CREATE ROLE {role} NOLOGIN")
            try:
                s.run(f"SET ROLE {role}")
                exc = caught(lambda: s.run(f"SELECT * FROM {table}"))
                s.run("RESET ROLE")
            finally:
                s.run(f"DROP ROLE IF EXISTS {role}")
        check(exc, C.AUTHORIZATION, retryable=False, code="42501")

    def test_statement_timeout(self, pg: str) -> None:
        with pg_session(pg) as s:
            s.run("SET statement_timeout = 50")
            exc = caught(lambda: s.run("SELECT pg_sleep(1)"))
        check(exc, C.CANCELLED, retryable=False, code="57014")  # the caller's own limit

    def test_deadlock(self, pg: str) -> None:
        with (
            pg_session(pg) as setup,
            pg_table(setup, "id int PRIMARY KEY, v int", "(1,0),(2,0)") as t,
        ):
            errors = deadlock(
                lambda: pg_open(pg),
                first_sql=["SET deadlock_timeout = '100ms'", "BEGIN"],
                lock=lambda mine: f"UPDATE {t} SET v = v + 1 WHERE id = {mine}",
                end_sql="ROLLBACK",
            )
        assert len(errors) == 1, errors
        check(errors[0], C.CONCURRENCY, retryable=True, code="40P01")

    def test_refused(self, pg: str) -> None:
        exc = caught(lambda: pg_open(pg, port=closed_port()))
        check(exc, C.CONNECTION, retryable=True)

    def test_a_role_at_its_connection_limit_is_too_many_connections(self, pg: str) -> None:
        # 53300, though psycopg and psycopg2 carry no SQLSTATE for a failed connection: as a
        # plain connection failure, one connect's retries alone could open the breaker.
        role = unique("raptor_lim")
        with pg_session(pg) as s:
            s.run(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
            try:
                held = pg_open(pg, user=role)
                try:
                    exc = caught(lambda: pg_open(pg, user=role))
                finally:
                    held.close()
            finally:
                s.run(f"DROP ROLE IF EXISTS {role}")
        result = check(exc, C.RESOURCE_EXHAUSTED, retryable=True)
        assert result.code in (None, "53300")

    @pytest.mark.parametrize(
        ("sqlstate", "live_refusal"), [("53200", False), ("53100", True), ("53000", False)]
    )
    def test_insufficient_resources_are_not_retried(
        self, pg: str, sqlstate: str, live_refusal: bool
    ) -> None:
        # Out of memory, disk full: sent again at once the statement meets the same shortage
        # (and an out-of-memory query retried may bring the OOM killer onto the whole server).
        with pg_session(pg) as s:
            exc = caught(
                lambda: s.run(
                    f"DO $$ BEGIN RAISE EXCEPTION 'short' USING ERRCODE = '{sqlstate}'; END $$"
                )
            )
        result = check(exc, C.RESOURCE_EXHAUSTED, retryable=False, code=sqlstate)
        assert result.severity.value == "critical"
        assert result.live_refusal is live_refusal


def deadlock(
    open_session: Callable[[], PgSession],
    *,
    first_sql: list[str],
    lock: Callable[[int], str],
    end_sql: str,
) -> list[BaseException]:
    """Two sessions lock rows 1 and 2, then each other's; returns what they raised."""
    errors: list[BaseException] = []
    both_hold_a_row = threading.Barrier(2, timeout=10)

    def worker(mine: int, theirs: int) -> None:
        session = open_session()
        try:
            for sql in first_sql:
                session.run(sql)
            session.run(lock(mine))
            both_hold_a_row.wait()
            try:
                session.run(lock(theirs))
            except Exception as exc:
                errors.append(exc)
            with contextlib.suppress(Exception):
                session.run(end_sql)
        finally:
            session.close()

    threads = [threading.Thread(target=worker, args=pair) for pair in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    return errors


# -- MariaDB / MySQL via PyMySQL ------------------------------------------------------------------


@dataclass
class MySQLSession:
    conn: Any

    def run(self, sql: str) -> None:
        with self.conn.cursor() as cursor:
            cursor.execute(sql)

    def close(self) -> None:
        self.conn.close()


def mysql_open(*, user: str = "root", password: str = "", port: int | None = None) -> MySQLSession:
    pymysql = lib("pymysql")
    host, default_port = MYSQL
    conn = pymysql.connect(
        host=host,
        port=default_port if port is None else port,
        user=user,
        password=password,
        database="test" if user == "root" else None,
        connect_timeout=3,
        autocommit=True,
    )
    return MySQLSession(conn)


@pytest.fixture
def mysql() -> Iterator[MySQLSession]:
    require_service("MariaDB", MYSQL)
    session = mysql_open()
    try:
        yield session
    finally:
        session.close()


@contextlib.contextmanager
def mysql_table(session: MySQLSession, columns: str, rows: str = "") -> Iterator[str]:
    table = unique("raptor_t")
    session.run(f"CREATE TABLE {table} ({columns}) ENGINE=InnoDB")
    try:
        if rows:
            session.run(f"INSERT INTO {table} VALUES {rows}")
        yield table
    finally:
        session.run(f"DROP TABLE IF EXISTS {table}")


class TestMariaDB:
    def test_duplicate_entry(self, mysql: MySQLSession) -> None:
        with mysql_table(mysql, "id int PRIMARY KEY", "(1)") as table:
            exc = caught(lambda: mysql.run(f"INSERT INTO {table} VALUES (1)"))
        check(exc, C.INTEGRITY, retryable=False, code="1062")

    def test_syntax_error(self, mysql: MySQLSession) -> None:
        check(caught(lambda: mysql.run("SELEC 1")), C.QUERY, code="1064")

    def test_no_such_table(self, mysql: MySQLSession) -> None:
        exc = caught(lambda: mysql.run(f"SELECT * FROM {unique('raptor_missing')}"))
        check(exc, C.QUERY, code="1146")

    def test_bad_password(self, mysql: MySQLSession) -> None:
        exc = caught(lambda: mysql_open(password="definitely-wrong"))
        check(exc, C.AUTHENTICATION, retryable=False, code="1045")

    def test_table_access_denied(self, mysql: MySQLSession) -> None:
        user = unique("raptor_np")
        with mysql_table(mysql, "id int", "(1)") as table:
            mysql.run(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'pw'")
            try:
                limited = mysql_open(user=user, password="pw")
                try:
                    exc = caught(lambda: limited.run(f"SELECT * FROM test.{table}"))
                finally:
                    limited.close()
            finally:
                mysql.run(f"DROP USER IF EXISTS '{user}'@'127.0.0.1'")
        check(exc, C.AUTHORIZATION, retryable=False, code="1142")

    def test_deadlock(self, mysql: MySQLSession) -> None:
        with mysql_table(mysql, "id int PRIMARY KEY, v int", "(1,0),(2,0)") as table:
            errors = deadlock(
                mysql_open,
                first_sql=["SET SESSION innodb_lock_wait_timeout = 5", "BEGIN"],
                lock=lambda mine: f"UPDATE {table} SET v = v + 1 WHERE id = {mine}",
                end_sql="ROLLBACK",
            )
        assert len(errors) == 1, errors
        check(errors[0], C.CONCURRENCY, retryable=True, code="1213")

    def test_lock_wait_timeout(self, mysql: MySQLSession) -> None:
        with mysql_table(mysql, "id int PRIMARY KEY, v int", "(1,0)") as table:
            holder = mysql_open()
            waiter = mysql_open()
            try:
                holder.run("BEGIN")
                holder.run(f"UPDATE {table} SET v = 1 WHERE id = 1")
                waiter.run("SET SESSION innodb_lock_wait_timeout = 1")
                waiter.run("BEGIN")
                exc = caught(lambda: waiter.run(f"UPDATE {table} SET v = 2 WHERE id = 1"))
                holder.run("ROLLBACK")
                waiter.run("ROLLBACK")
            finally:
                holder.close()
                waiter.close()
        check(exc, C.CONCURRENCY, retryable=True, code="1205")

    def test_refused(self) -> None:
        exc = caught(lambda: mysql_open(port=closed_port()))
        check(exc, C.CONNECTION, retryable=True, code="ECONNREFUSED")


def test_mysql_8_disconnect_for_inactivity_is_an_unconfirmed_lost_connection() -> None:
    """MySQL 8.0.24+ tells a client it reaped for ``wait_timeout`` why, with error 4031
    (``ER_CLIENT_INTERACTION_TIMEOUT``) before closing: a lost session on a server that is up,
    as PyMySQL's 2006/2013. MariaDB never sends it, so the error is built by PyMySQL's own
    code from the server's error packet, as PyMySQL raises it: ``0xFF``, the number
    (little-endian), ``#`` and the SQLSTATE, then the message."""
    pymysql = lib("pymysql")
    message = (
        "The client was disconnected by the server because of inactivity. "
        "See wait_timeout and interactive_timeout for configuring this behavior."
    )
    packet = b"\xff" + (4031).to_bytes(2, "little") + b"#HY000" + message.encode()
    exc = caught(lambda: pymysql.err.raise_mysql_exception(packet))
    assert type(exc) is pymysql.err.OperationalError
    assert exc.args == (4031, message)
    result = check(exc, C.CONNECTION, retryable=True, code="4031")
    # ...and, met by a statement, held unconfirmed until a reconnect decides, as 2006/2013 are.
    assert lost_connection(None)(exc, result).unconfirmed
    for gone in (2006, 2013):
        lost = pymysql.err.OperationalError(gone, "MySQL server has gone away")
        assert lost_connection(None)(lost, classify(lost)).unconfirmed


# -- Redis ----------------------------------------------------------------------------------------


def redis_client(**kwargs: Any) -> Any:
    redis = lib("redis")
    retry = lib("redis.retry").Retry(lib("redis.backoff").NoBackoff(), 0)
    host, port = REDIS
    options: dict[str, Any] = {"host": host, "port": port, "socket_connect_timeout": 2}
    options.update(kwargs)
    return redis.Redis(retry=retry, **options)


@pytest.fixture
def redis_db() -> Iterator[Any]:
    require_service("Redis", REDIS)
    client = redis_client()
    try:
        yield client
    finally:
        client.close()


class TestRedis:
    def test_refused(self) -> None:
        client = redis_client(port=closed_port())
        check(caught(client.ping), C.CONNECTION, retryable=True, code="ECONNREFUSED")

    def test_wrongtype(self, redis_db: Any) -> None:
        key = unique("raptor:str")
        redis_db.set(key, "x", ex=30)
        try:
            exc = caught(lambda: redis_db.lpush(key, "y"))
        finally:
            redis_db.delete(key)
        check(exc, C.QUERY, retryable=False)

    def test_unknown_command(self, redis_db: Any) -> None:
        check(caught(lambda: redis_db.execute_command("RAPTORNOSUCHCMD")), C.QUERY)

    def test_noperm(self, redis_db: Any) -> None:
        user = unique("raptor_np")
        redis_db.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "-@all", "+ping")
        try:
            limited = redis_client(username=user, password="pw")
            try:
                exc = caught(lambda: limited.get("raptor:anything"))
            finally:
                limited.close()
        finally:
            redis_db.execute_command("ACL", "DELUSER", user)
        check(exc, C.AUTHORIZATION, retryable=False)

    def test_auth_failure(self, redis_db: Any) -> None:
        client = redis_client(username=unique("raptor_nobody"), password="wrong")
        check(caught(client.ping), C.AUTHENTICATION, retryable=False)

    def test_timeout(self, redis_db: Any) -> None:
        client = redis_client(socket_timeout=0.2)
        try:
            exc = caught(lambda: client.blpop([unique("raptor:empty")], timeout=2))
        finally:
            client.close()
        check(exc, C.TIMEOUT, retryable=True)


# -- the fault server itself (other integration tests rely on its bookkeeping) --------------------


class TestFaultyServer:
    def test_script_counts_and_records(self) -> None:
        requests = lib("requests")
        script = [status(503, {"Retry-After": "1"}), ok("first")]
        with FaultyHTTPServer(script) as server, requests.Session() as session:
            assert server.pending == 2
            assert session.get(server.url("/a")).status_code == 503
            assert session.get(server.url("/a")).text == "first"
            assert session.post(server.url("/b"), data=b"payload").text == "ok"  # the default
            chunks = iter([b"chu", b"nked"])
            session.post(server.url("/b"), data=chunks)
            assert server.pending == 0
            assert (server.count(), server.count("GET"), server.count("POST", "/b")) == (4, 2, 2)
            assert server.count(path="/a") == 2
            bodies = [r.body for r in server.requests]
            assert bodies == [b"", b"", b"payload", b"chunked"]
            arrivals = server.arrivals
            assert arrivals == sorted(arrivals)
            assert server.connections == 1  # keep-alive: one pooled connection

    def test_tls_client_gets_a_400_and_is_counted(self) -> None:
        with FaultyHTTPServer() as server:
            url = server.url("/").replace("http://", "https://")
            caught(lambda: fetch_httpx(url, 2.0))
            assert (server.bad_requests, server.count()) == (1, 0)

    def test_stop_ends_a_hang_at_once(self) -> None:
        server = FaultyHTTPServer([hang(30.0)]).start()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while server.count() == 0:
            time.sleep(0.01)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
        assert sock.recv(10) == b""
        sock.close()


# -- the public functions (runtime/classifying.py) -----------------------------------------------


class TestPublicFunctions:
    def test_register_rule_reaches_the_default_classifier(self) -> None:
        from otel_raptor.core.classify import DEFAULT_CLASSIFIER, Rule
        from otel_raptor.runtime.classifying import register_rule

        rule = Rule(name="test.teapot", category=C.UNAVAILABLE, message=r"^raptor teapot$")
        register_rule(rule)
        try:
            assert classify(RuntimeError("raptor teapot")).rule == "test.teapot"
        finally:
            assert DEFAULT_CLASSIFIER.remove_rule(rule)
        assert classify(RuntimeError("raptor teapot")).category is C.UNKNOWN

    def test_an_internal_failure_is_reported_not_raised(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        from otel_raptor.runtime import classifying, safety

        class Broken:
            def classify(self, *args: object, **kwargs: object) -> Classification:
                raise RuntimeError("classifier bug")

        safety._reset_for_tests()
        monkeypatch.setattr(classifying, "DEFAULT_CLASSIFIER", Broken())
        result = classify(ConnectionResetError(), context={"critical": True})
        assert (result.category, result.error_type, result.severity.value) == (
            C.UNKNOWN,
            "ConnectionResetError",
            "high",
        )
        assert "classify" in caplog.text

    def test_a_bad_context_is_the_callers_error(self) -> None:
        from otel_raptor.errors import ConfigError

        with pytest.raises(ConfigError):
            classify(TimeoutError(), context={"critcal": True})
