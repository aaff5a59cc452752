"""The PyMySQL integration against the real MariaDB: connects, statements, the default
statement timeout, replay safety per failure, the breaker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pymysql.cursors
import pytest

from otel_raptor import CircuitOpenError
from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.events import ErrorClassified, RecoveryFinished
from otel_raptor.core.recovery import Outcome
from otel_raptor.integrations.db import pymysql as integration
from otel_raptor.integrations.db.pymysql import PyMySQLIntegration
from tests.integrations.db.conftest import MYSQL_KWARGS, Install
from tests.support.dbservers import free_port
from tests.support.services import MYSQL
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.usefixtures("mysql")

ORIGINAL_EXECUTE = pymysql.cursors.Cursor.execute
SERVICE = f"mysql://{MYSQL[0]}:{MYSQL[1]}/test"


@pytest.fixture
def table(unique_name: str) -> Iterator[str]:
    """A table, a sequence (not transactional) and two functions that fail the first times
    the sequence is drawn: ``<t>_deadlock(n)`` with error 1213, ``<t>_busy(n)`` with 1040
    (too many connections), ``<t>_timeout(n)`` with 1969 (MariaDB's statement timeout)."""
    conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {unique_name} (v INT)")
        cur.execute(f"CREATE SEQUENCE {unique_name}_seq")
        for function, errno in (("deadlock", 1213), ("busy", 1040), ("timeout", 1969)):
            cur.execute(
                f"""CREATE FUNCTION {unique_name}_{function}(times INT) RETURNS INT
                NOT DETERMINISTIC
                BEGIN
                    IF NEXTVAL({unique_name}_seq) <= times THEN
                        SIGNAL SQLSTATE 'HY000' SET MYSQL_ERRNO = {errno},
                            MESSAGE_TEXT = 'injected';
                    END IF;
                    RETURN 1;
                END"""
            )
    yield unique_name
    with conn.cursor() as cur:
        for function in ("deadlock", "busy", "timeout"):
            cur.execute(f"DROP FUNCTION IF EXISTS {unique_name}_{function}")
        cur.execute(f"DROP SEQUENCE IF EXISTS {unique_name}_seq")
        cur.execute(f"DROP TABLE IF EXISTS {unique_name}")
    conn.close()


def scalar(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def test_uninstall_restores_the_methods(install: Install) -> None:
    installed = install(PyMySQLIntegration)
    assert pymysql.cursors.Cursor.execute is not ORIGINAL_EXECUTE
    installed.integration.uninstall()
    assert pymysql.cursors.Cursor.execute is ORIGINAL_EXECUTE


def test_the_default_statement_timeout_where_the_session_has_none(install: Install) -> None:
    install(PyMySQLIntegration, statement_timeout=2.5)
    conn = pymysql.connect(**MYSQL_KWARGS)
    try:
        assert getattr(conn, integration.TARGET_ATTRIBUTE).service == SERVICE
        assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 2.5
    finally:
        conn.close()
    conn = pymysql.connect(**MYSQL_KWARGS, init_command="SET max_statement_time = 9")
    try:
        assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 9.0
    finally:
        conn.close()


def test_an_init_command_that_chose_no_statement_timeout_keeps_none(install: Install) -> None:
    install(PyMySQLIntegration, statement_timeout=2.5)
    # ``0`` on purpose reads the same as no setting at all: the init_command tells them apart.
    for command in ("SET max_statement_time = 0", "SET SESSION MAX_STATEMENT_TIME=0"):
        conn = pymysql.connect(**MYSQL_KWARGS, init_command=command)
        try:
            assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 0.0
        finally:
            conn.close()
    # Reconnecting (what ``ping(reconnect=True)`` calls) honours it as well.
    conn = pymysql.connect(**MYSQL_KWARGS, init_command="SET max_statement_time = 0")
    try:
        conn.close()
        conn.connect()
        assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 0.0
    finally:
        conn.close()
    # An init_command about something else: the default still applies.
    conn = pymysql.connect(**MYSQL_KWARGS, init_command="SET @raptor_unrelated = 1")
    try:
        assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 2.5
    finally:
        conn.close()


def _cut_the_timeout_query() -> Any:
    """A ``cut_commands`` matcher: the first time raptor's statement-timeout query goes out
    (a ``COM_QUERY`` packet)."""
    cut: list[bytes] = []

    def matches(data: bytes) -> bool:
        if data[3:5] == b"\x00\x03" and b"max_statement_time" in data and not cut:
            cut.append(data)
            return True
        return False

    return matches


def proxied(proxy: FaultProxy, **kwargs: Any) -> Any:
    return pymysql.connect(**{**MYSQL_KWARGS, "host": "127.0.0.1", "port": proxy.port, **kwargs})


def test_a_link_lost_by_the_timeout_query_fails_the_connect_not_the_apps_statement(
    install: Install,
) -> None:
    # As psycopg's (test_psycopg.py): the closed connection went to the app, whose first
    # statement failed ("(0, '')" from a socket-less connection) for a query it never sent.
    installed = install(PyMySQLIntegration, statement_timeout=2.5)
    with FaultProxy(MYSQL) as proxy:
        proxy.cut_commands(_cut_the_timeout_query())
        conn = proxied(proxy)
        try:
            assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 2.5
        finally:
            conn.close()
        assert proxy.cuts == 1
        assert proxy.accepted == 2  # connected again
    assert [e.outcome for e in installed.of(RecoveryFinished)] == [Outcome.RECOVERED]
    # Counted once, as the connect that failed, not also as a statement of the connection.
    assert [e.classification.category for e in installed.of(ErrorClassified)] == [
        ErrorCategory.CONNECTION
    ]


@pytest.mark.filterwarnings("ignore:The 'reconnect' argument is deprecated:DeprecationWarning")
def test_ping_reconnects_through_the_same_connect(install: Install) -> None:
    # ``ping(reconnect=True)`` calls ``Connection.connect``: a link lost by the timeout query
    # of that reconnect is connected again too, instead of ping raising "Already closed".
    installed = install(PyMySQLIntegration, statement_timeout=2.5)
    with FaultProxy(MYSQL) as proxy:
        conn = proxied(proxy, autocommit=True)
        try:
            proxy.cut_commands(_cut_the_timeout_query())
            proxy.reset_all()  # the server (or a proxy) ended the idle session
            conn.ping(reconnect=True)
            assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 2.5
        finally:
            conn.close()
        assert proxy.cuts == 1
        assert proxy.accepted == 3  # the first connect, the reconnect cut, the one that held
    assert [e.outcome for e in installed.of(RecoveryFinished)] == [Outcome.RECOVERED]


def test_a_session_the_server_ends_at_the_timeout_query_fails_the_connect(
    install: Install,
) -> None:
    # A server shutting down answers 1053 and closes the link: PyMySQL learns it only at the
    # app's first statement. The session is gone (as for a lost link): connected again.
    installed = install(PyMySQLIntegration, statement_timeout=2.5)
    with FaultProxy(MYSQL) as proxy:
        proxy.answer_mysql_commands(1053, "Server shutdown in progress", times=1)
        conn = proxied(proxy, autocommit=True)
        try:
            assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 2.5
        finally:
            conn.close()
        assert (proxy.answered, proxy.accepted) == (1, 2)
    assert [e.outcome for e in installed.of(RecoveryFinished)] == [Outcome.RECOVERED]
    assert len(installed.of(ErrorClassified)) == 1


def test_an_sql_error_of_the_timeout_query_leaves_the_connection_to_the_app(
    install: Install,
) -> None:
    # A server that does not know the variable answers with an error and keeps the link: the
    # connection is the app's, with no timeout set, the error judged once as its statement.
    installed = install(PyMySQLIntegration, statement_timeout=2.5)
    with FaultProxy(MYSQL) as proxy:
        proxy.answer_mysql_commands(1193, "Unknown system variable 'max_statement_time'", times=1)
        conn = proxied(proxy, autocommit=True)  # no SET AUTOCOMMIT: the query is the first
        try:
            assert conn.open
            assert float(scalar(conn, "SELECT @@SESSION.max_statement_time")) == 0.0
        finally:
            conn.close()
        assert (proxy.answered, proxy.accepted) == (1, 1)
    classified = installed.of(ErrorClassified)
    assert [e.classification.code for e in classified] == ["1193"]
    finished = installed.of(RecoveryFinished)
    assert [(e.outcome, e.attempts) for e in finished] == [(Outcome.FAILED, 1)]  # not retried


def test_replay_in_autocommit_only_and_never_for_executemany(install: Install, table: str) -> None:
    installed = install(PyMySQLIntegration)
    conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    try:
        with conn.cursor() as cur:
            # Each statement below makes the sequence fail its first call, then succeed.
            cur.execute(f"INSERT INTO {table} SELECT {table}_deadlock(1)")  # retried
            cur.execute(f"SELECT {table}_busy(3)")  # a read: retried
            with pytest.raises(pymysql.err.OperationalError):
                cur.execute(f"INSERT INTO {table} SELECT {table}_busy(5)")  # a write: not
            with pytest.raises(pymysql.err.OperationalError):
                cur.execute(f"SELECT {table}_timeout(6)")  # timed out: not even a read
            with pytest.raises(pymysql.err.OperationalError):
                cur.executemany(f"INSERT INTO {table} SELECT {table}_deadlock(%s)", [(7,), (7,)])
        conn.autocommit(False)
        with conn.cursor() as cur, pytest.raises(pymysql.err.OperationalError):
            cur.execute(f"INSERT INTO {table} SELECT {table}_deadlock(8)")  # a transaction
        conn.rollback()
        assert scalar(conn, f"SELECT count(*) FROM {table}") == 1
    finally:
        conn.close()
    outcomes = [
        (f.outcome, f.attempts, f.give_up_reason) for f in installed.of(RecoveryFinished, SERVICE)
    ]
    assert outcomes == [
        (Outcome.RECOVERED, 2, ""),
        (Outcome.RECOVERED, 2, ""),
        (Outcome.FAILED, 1, "not_replay_safe"),  # the write
        (Outcome.FAILED, 1, "cancelled"),  # the statement timeout: the caller's limit
        (Outcome.FAILED, 1, "not_replay_safe"),  # executemany
        (Outcome.FAILED, 1, "not_replay_safe"),  # inside a transaction
    ]


def test_a_write_whose_answer_was_lost_is_not_replayed(install: Install, table: str) -> None:
    installed = install(PyMySQLIntegration)
    with FaultProxy(MYSQL) as proxy:
        conn = pymysql.connect(**{**MYSQL_KWARGS, "port": proxy.port}, autocommit=True)
        proxy.cut_responses_after(0)
        with conn.cursor() as cur, pytest.raises(pymysql.err.OperationalError):
            cur.execute(f"INSERT INTO {table} VALUES (1)")
    check = pymysql.connect(**MYSQL_KWARGS)
    try:
        assert scalar(check, f"SELECT count(*) FROM {table}") == 1
    finally:
        check.close()
    [finished] = [f for f in installed.of(RecoveryFinished) if f.service != SERVICE]
    assert finished.attempts == 1


def test_a_write_past_its_read_timeout_is_not_replayed(install: Install, table: str) -> None:
    """PyMySQL's ``read_timeout`` gave up on the answer; the server went on and applied the
    write: its outcome was unknown, so it was never sent again. PyMySQL closed the connection,
    so the read that timed out cannot be sent again on it either."""
    installed = install(PyMySQLIntegration, failure_threshold=100)
    for sql in ("SELECT SLEEP(0.6)", f"INSERT INTO {table} SELECT SLEEP(0.6)"):
        conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True, read_timeout=0.2)
        try:
            with conn.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as raised:
                cur.execute(sql)
            assert raised.value.args[0] == 2013  # lost connection during query (timed out)
        finally:
            conn.close()
    check = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    try:
        deadline = time.monotonic() + 10
        while scalar(check, f"SELECT count(*) FROM {table}") == 0:
            assert time.monotonic() < deadline, "the server never finished the INSERT"
            time.sleep(0.05)
        assert scalar(check, f"SELECT count(*) FROM {table}") == 1
    finally:
        check.close()
    finished = installed.of(RecoveryFinished, SERVICE)
    assert [(f.attempts, f.category, f.give_up_reason) for f in finished] == [
        (1, "timeout", "not_replay_safe"),
        (1, "timeout", "not_replay_safe"),
    ]


def test_an_open_breaker_fails_fast_with_pymysqls_connect_error(install: Install) -> None:
    install(PyMySQLIntegration, max_retries=0)
    # ssl_disabled: PyMySQL 1.2 builds an SSL context (loading the system's CA store, 50 ms
    # and more on a slow machine) in Connection.__init__, before the hooked connect().
    kwargs = {**MYSQL_KWARGS, "port": free_port(), "connect_timeout": 2, "ssl_disabled": True}
    for _ in range(3):
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(**kwargs)
    started = time.perf_counter()
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(**kwargs)
    assert time.perf_counter() - started < 0.05
    assert isinstance(refused.value, CircuitOpenError)
    assert refused.value.args[0] == integration.CONNECT_ERROR


def test_a_procedure_that_deadlocks_partway_is_not_replayed(install: Install, table: str) -> None:
    # In autocommit each statement of a procedure commits on its own: the INSERT before the
    # deadlock stays, and replaying the CALL inserted it a second time.
    installed = install(PyMySQLIntegration)
    conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"""CREATE PROCEDURE {table}_p()
                BEGIN
                    INSERT INTO {table} VALUES (1);
                    SELECT {table}_deadlock(1) INTO @ignored;
                END"""
            )
            try:
                with pytest.raises(pymysql.err.OperationalError) as raised:
                    cur.execute(f"CALL {table}_p()")
                assert raised.value.args[0] == 1213
            finally:
                cur.execute(f"DROP PROCEDURE {table}_p")
        assert scalar(conn, f"SELECT count(*) FROM {table}") == 1
    finally:
        conn.close()
    [finished] = installed.of(RecoveryFinished, SERVICE)
    assert (finished.attempts, finished.give_up_reason) == (1, "not_replay_safe")


def test_the_statements_of_a_guarded_batch_pass_through(install: Install) -> None:
    """``executemany`` of a ``SELECT`` runs ``execute`` once per row: those statements are the
    batch's, guarded (and counted) once with it; ``execute`` skips reading the mark only while
    no guarded batch or connect is in flight anywhere (``_marks``)."""
    installed = install(PyMySQLIntegration)
    conn = pymysql.connect(**MYSQL_KWARGS, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            budget = installed.runtime.downstream(SERVICE).budget
            calls = budget._calls
            cur.executemany("SELECT %s", [(1,), (2,), (3,)])
            assert budget._calls == calls + 1
            assert integration._marks == 0
            cur.execute("SELECT 1")
            assert budget._calls == calls + 2
    finally:
        conn.close()
