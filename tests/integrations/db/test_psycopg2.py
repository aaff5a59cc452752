"""The psycopg2 integration against the real PostgreSQL: real C types through psycopg2's own
factory parameters (``register_type`` and friends accept them), the application's factories
honoured, replay safety and the breaker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest

from otel_raptor import CircuitOpenError
from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.events import ErrorClassified, RecoveryFinished
from otel_raptor.core.recovery import Outcome
from otel_raptor.db import TransactionInProgressError, run_transaction
from otel_raptor.integrations.db import psycopg2 as integration
from otel_raptor.integrations.db.psycopg2 import Psycopg2Integration
from tests.integrations.db.conftest import PG_DSN, Install, create_pg_flaky, drop_pg_flaky
from tests.support.dbservers import free_port
from tests.support.services import POSTGRES
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.usefixtures("postgres")

ORIGINAL_CONNECT = psycopg2.connect
SERVICE = f"postgresql://{POSTGRES[0]}:{POSTGRES[1]}/test"


@pytest.fixture
def admin() -> Iterator[Any]:
    """An unguarded psycopg (3) connection (psycopg's integration is not installed here)."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(admin: Any, unique_name: str) -> Iterator[str]:
    create_pg_flaky(admin.execute, unique_name)
    yield unique_name
    drop_pg_flaky(admin.execute, unique_name)


def count(admin: Any, sql: str) -> int:
    return int(admin.execute(sql).fetchone()[0])


def test_uninstall_puts_connect_back(install: Install) -> None:
    installed = install(Psycopg2Integration)
    assert psycopg2.connect is not ORIGINAL_CONNECT
    installed.integration.uninstall()
    assert psycopg2.connect is ORIGINAL_CONNECT


def test_connections_and_cursors_are_real_and_register_type_accepts_them(
    install: Install,
) -> None:
    install(Psycopg2Integration)
    conn = psycopg2.connect(PG_DSN)
    try:
        assert isinstance(conn, psycopg2.extensions.connection)
        # Named as the class it stands for, as without raptor.
        assert (type(conn).__module__, type(conn).__name__) == ("psycopg2.extensions", "connection")
        cursor = conn.cursor()
        assert isinstance(cursor, psycopg2.extensions.cursor)
        # What Django and SQLAlchemy call: C functions that refuse proxies.
        psycopg2.extras.register_default_jsonb(conn)
        psycopg2.extras.register_default_json(cursor)
        psycopg2.extras.register_uuid(None, conn)
        psycopg2.extensions.register_type(psycopg2.extensions.UNICODE, cursor)
        cursor.execute("""SELECT '{"a": 1}'::jsonb""")
        assert cursor.fetchone() == ({"a": 1},)
        assert getattr(conn, integration.TARGET_ATTRIBUTE).service == SERVICE
    finally:
        conn.close()


def test_the_applications_factories_are_honoured(install: Install) -> None:
    install(Psycopg2Integration)
    conn = psycopg2.connect(PG_DSN, connection_factory=psycopg2.extras.RealDictConnection)
    try:
        assert isinstance(conn, psycopg2.extras.RealDictConnection)
        assert type(conn).__name__ == "RealDictConnection"
        cursor = conn.cursor()  # RealDictConnection's own default cursor class
        assert isinstance(cursor, psycopg2.extras.RealDictCursor)
        cursor.execute("SELECT 1 AS x")
        assert cursor.fetchone() == {"x": 1}
        named = conn.cursor("raptor_named", cursor_factory=psycopg2.extras.DictCursor)
        assert isinstance(named, psycopg2.extras.DictCursor)
        named.execute("SELECT 2 AS y")
        assert named.fetchone()["y"] == 2
        named.close()
    finally:
        conn.close()
    conn = psycopg2.connect(PG_DSN, cursor_factory=psycopg2.extras.NamedTupleCursor)
    try:
        cursor = conn.cursor()
        assert isinstance(cursor, psycopg2.extras.NamedTupleCursor)
        cursor.execute("SELECT 3 AS z")
        assert cursor.fetchone().z == 3
    finally:
        conn.close()


def test_cursor_arguments_given_by_position_keep_their_places(install: Install) -> None:
    # cursor(name, cursor_factory, withhold, scrollable): with the factory moved to a keyword,
    # a positional withhold slid into the factory's place and psycopg2 raised TypeError.
    install(Psycopg2Integration)
    conn = psycopg2.connect(PG_DSN)
    try:
        held = conn.cursor("raptor_held", None, True)
        assert (held.withhold, held.scrollable) == (True, None)
        scrolling = conn.cursor("raptor_scrolling", psycopg2.extras.DictCursor, False, True)
        assert isinstance(scrolling, psycopg2.extras.DictCursor)
        assert (scrolling.withhold, scrolling.scrollable) == (False, True)
        scrolling.execute("SELECT 1 AS x")
        assert scrolling.fetchone()["x"] == 1
    finally:
        conn.close()


def test_a_connection_asked_not_to_be_async_is_guarded(install: Install) -> None:
    # psycopg2.connect(..., async_=False): the flag went into the DSN raptor parsed, which
    # was then invalid: an internal error was logged and the connection went unguarded.
    install(Psycopg2Integration)
    conn = psycopg2.connect(PG_DSN, async_=False)
    try:
        assert getattr(type(conn), "_otel_raptor_guarded", False) is True
        assert getattr(type(conn.cursor()), "_otel_raptor_guarded", False) is True
    finally:
        conn.close()


def test_a_factory_that_is_not_a_class_keeps_the_connect_guarded(install: Install) -> None:
    install(Psycopg2Integration, max_retries=0, failure_threshold=2)

    def factory(dsn: str, **kwargs: Any) -> Any:
        return psycopg2.extensions.connection(dsn, **kwargs)

    conn = psycopg2.connect(PG_DSN, connection_factory=factory)
    assert type(conn) is psycopg2.extensions.connection
    conn.close()
    dsn = f"host=127.0.0.1 port={free_port()} dbname=test user=postgres"
    for _ in range(2):
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(dsn, connection_factory=factory)
    with pytest.raises(CircuitOpenError):
        psycopg2.connect(dsn, connection_factory=factory)


def test_the_default_statement_timeout_leaves_no_transaction_open(install: Install) -> None:
    install(Psycopg2Integration, statement_timeout=7)
    conn = psycopg2.connect(PG_DSN)
    try:
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        cursor = conn.cursor()
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone() == ("7s",)
    finally:
        conn.close()


def show_statement_timeout(conn: Any) -> str:
    with conn.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        return str(cursor.fetchone()[0])


def test_a_session_that_chose_its_statement_timeout_keeps_it(
    install: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(Psycopg2Integration, statement_timeout=7)
    # ``0`` on purpose reads the same as no setting at all: pg_settings' source tells them apart.
    for options, expected in (("-c statement_timeout=0", "0"), ("-c statement_timeout=4s", "4s")):
        conn = psycopg2.connect(PG_DSN, options=options)
        try:
            assert show_statement_timeout(conn) == expected
        finally:
            conn.close()
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=0")
    conn = psycopg2.connect(PG_DSN)
    try:
        assert show_statement_timeout(conn) == "0"
    finally:
        conn.close()
    monkeypatch.delenv("PGOPTIONS")
    conn = psycopg2.connect(PG_DSN)
    try:
        assert show_statement_timeout(conn) == "7s"
    finally:
        conn.close()


def _cut_the_timeout_query() -> Any:
    """A ``cut_commands`` matcher: the first time raptor's statement-timeout query goes out."""
    cut: list[bytes] = []

    def matches(data: bytes) -> bool:
        if data[:1] == b"Q" and b"set_config('statement_timeout'" in data and not cut:
            cut.append(data)
            return True
        return False

    return matches


def test_a_link_lost_by_the_timeout_query_fails_the_connect_not_the_apps_statement(
    install: Install,
) -> None:
    # As psycopg's (test_psycopg.py): the closed connection went to the app, whose first
    # statement failed ("connection already closed") for a query it never sent.
    installed = install(Psycopg2Integration, statement_timeout=12.5)
    with FaultProxy(POSTGRES) as proxy:
        proxy.cut_commands(_cut_the_timeout_query())
        conn = psycopg2.connect(f"host=127.0.0.1 port={proxy.port} dbname=test user=postgres")
        try:
            assert show_statement_timeout(conn) == "12500ms"
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        finally:
            conn.close()
        assert proxy.cuts == 1
        assert proxy.accepted == 2  # connected again
    assert [e.outcome for e in installed.of(RecoveryFinished)] == [Outcome.RECOVERED]
    # Counted once, as the connect that failed, not also as a statement of the connection.
    assert [e.classification.category for e in installed.of(ErrorClassified)] == [
        ErrorCategory.CONNECTION
    ]


def test_an_sql_error_of_the_timeout_query_leaves_the_connection_to_the_app(
    install: Install, admin: Any, unique_name: str
) -> None:
    # A server that cannot run the query (here a ``pg_settings`` of the app's own, found
    # first on its search_path) answers with an error and keeps the link: the connection is
    # the app's, with no timeout set, the error judged once as its statement.
    admin.execute(f"CREATE SCHEMA {unique_name}")
    try:
        admin.execute(f"CREATE TABLE {unique_name}.pg_settings (other INT)")
        installed = install(Psycopg2Integration, statement_timeout=12.5)
        conn = psycopg2.connect(PG_DSN, options=f"-c search_path={unique_name},pg_catalog")
        try:
            assert conn.closed == 0
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
            assert show_statement_timeout(conn) == "0"
        finally:
            conn.close()
        classified = installed.of(ErrorClassified)
        assert [e.classification.code for e in classified] == ["42703"]  # undefined column
        finished = installed.of(RecoveryFinished)
        assert [(e.outcome, e.attempts) for e in finished] == [(Outcome.FAILED, 1)]  # not retried
    finally:
        admin.execute(f"DROP SCHEMA {unique_name} CASCADE")


def test_autocommit_conflicts_are_retried_and_transactions_are_not(
    install: Install, admin: Any, table: str
) -> None:
    installed = install(Psycopg2Integration)
    conn = psycopg2.connect(PG_DSN)
    try:
        conn.autocommit = True
        conn.cursor().execute(f"INSERT INTO {table} SELECT {table}_flaky(2, '40001')")
        assert count(admin, f"SELECT count(*) FROM {table}") == 1
        conn.autocommit = False
        with pytest.raises(psycopg2.errors.SerializationFailure):
            conn.cursor().execute(f"INSERT INTO {table} SELECT {table}_flaky(5, '40001')")
        conn.rollback()
    finally:
        conn.close()
    outcomes = [(f.outcome, f.attempts) for f in installed.of(RecoveryFinished, SERVICE)]
    assert outcomes == [(Outcome.RECOVERED, 3), (Outcome.FAILED, 1)]


def test_a_with_block_is_a_transaction_even_in_autocommit(
    install: Install, admin: Any, table: str
) -> None:
    # psycopg2 >= 2.9 begins a transaction in `with conn` whatever autocommit says, and sends
    # BEGIN with the first statement: replaying that statement would run it in an aborted
    # transaction (25P02) and hide the 40001 the caller (and run_transaction) must see.
    installed = install(Psycopg2Integration)
    conn = psycopg2.connect(PG_DSN)
    try:
        conn.autocommit = True
        with pytest.raises(psycopg2.errors.SerializationFailure), conn:
            conn.cursor().execute(f"INSERT INTO {table} SELECT {table}_flaky(1, '40001')")
        # Out of the block, the same conflict is retried (the sequence is at 1: fails once).
        conn.cursor().execute(f"INSERT INTO {table} SELECT {table}_flaky(2, '40001')")
        with pytest.raises(TransactionInProgressError), conn:
            run_transaction(conn, lambda c: None)
    finally:
        conn.close()
    assert count(admin, f"SELECT count(*) FROM {table}") == 1  # the autocommit one, retried
    outcomes = [(f.outcome, f.attempts) for f in installed.of(RecoveryFinished, SERVICE)]
    assert outcomes == [(Outcome.FAILED, 1), (Outcome.RECOVERED, 2)]


def test_an_open_breaker_fails_fast_as_a_psycopg2_operational_error(install: Install) -> None:
    install(Psycopg2Integration, max_retries=0)
    dsn = f"host=127.0.0.1 port={free_port()} dbname=test user=postgres"
    for _ in range(3):
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(dsn)
    started = time.perf_counter()
    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect(dsn)
    assert time.perf_counter() - started < 0.05
    assert isinstance(refused.value, CircuitOpenError)
    assert isinstance(refused.value, integration.circuit_open_error_type())


def test_async_connections_and_earlier_connections_are_left_alone(install: Install) -> None:
    before = psycopg2.connect(PG_DSN)
    installed = install(Psycopg2Integration)
    try:
        cursor = before.cursor()
        with pytest.raises(psycopg2.errors.DivisionByZero):
            cursor.execute("SELECT 1/0")
        assert not installed.of(ErrorClassified)
        assert type(before) is psycopg2.extensions.connection
    finally:
        before.close()
    conn = psycopg2.connect(PG_DSN, async_=True)
    try:
        assert type(conn) is psycopg2.extensions.connection
    finally:
        conn.close()


def test_a_procedure_that_committed_partway_is_not_replayed(
    install: Install, admin: Any, table: str
) -> None:
    # A CALL in autocommit may COMMIT inside: a serialization failure after that rolls back
    # only what followed, and replaying the CALL did the committed part twice.
    admin.execute(
        f"""CREATE PROCEDURE {table}_p() LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {table} VALUES (1);
            COMMIT;
            PERFORM {table}_flaky(1, '40001');
        END $$"""
    )
    installed = install(Psycopg2Integration)
    conn = psycopg2.connect(PG_DSN)
    try:
        conn.autocommit = True
        with pytest.raises(psycopg2.errors.SerializationFailure):
            conn.cursor().execute(f"CALL {table}_p()")
    finally:
        conn.close()
        admin.execute(f"DROP PROCEDURE {table}_p()")
    assert count(admin, f"SELECT count(*) FROM {table}") == 1
    outcomes = [(f.outcome, f.attempts) for f in installed.of(RecoveryFinished, SERVICE)]
    assert outcomes == [(Outcome.FAILED, 1)]
