"""The sqlite3 integration: real ``sqlite3.Connection`` subclasses (``backup`` accepts them),
the application's factory honoured, and busy/locked handling per transaction mode."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from otel_raptor import CircuitOpenError
from otel_raptor.core.events import ErrorClassified, RecoveryFinished
from otel_raptor.core.recovery import Outcome
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations.db import sqlite3 as integration
from otel_raptor.integrations.db.sqlite3 import SQLiteIntegration
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.state import Runtime
from tests.integrations.db.conftest import Install, fast_config

ORIGINAL_CONNECT = sqlite3.connect


def writer_holds_the_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection takes the write lock for ``seconds``, then commits."""
    ready = threading.Event()

    def hold() -> None:
        other = ORIGINAL_CONNECT(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t VALUES (0)")
        ready.set()
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(5)
    return thread


@pytest.fixture
def path(tmp_path: Path) -> Path:
    database = tmp_path / "raptor.db"
    setup = ORIGINAL_CONNECT(database)
    setup.execute("CREATE TABLE t (v INTEGER)")
    setup.commit()
    setup.close()
    return database


def test_a_second_installation_owns_the_hooks_until_it_uninstalls(install: Install) -> None:
    first = install(SQLiteIntegration).integration
    second = install(SQLiteIntegration).integration
    assert second.installed
    assert not first.installed
    hooked = sqlite3.connect
    first.uninstall()  # not the owner any more: a no-op
    assert sqlite3.connect is hooked
    assert integration._installed is not None
    second.uninstall()
    assert sqlite3.connect is ORIGINAL_CONNECT
    assert integration._installed is None


def test_a_failed_installation_leaves_things_as_they_were(
    install: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(library: object) -> object:
        return [(library, "connect", integration._connect_wrapper), (library, "nowhere", None)], ()

    settings = IntegrationSettings(runtime=Runtime(), config=fast_config())
    hook = SQLiteIntegration()
    monkeypatch.setattr(hook, "hooks", broken)
    with pytest.raises(AttributeError):
        hook.install(settings)
    assert not hook.installed
    assert integration._installed is None
    assert sqlite3.connect is ORIGINAL_CONNECT  # the first hook was rolled back
    # Over a working installation, a failed one leaves that one in charge.
    owner = install(SQLiteIntegration).integration
    with pytest.raises(AttributeError):
        hook.install(settings)
    assert owner.installed
    assert sqlite3.connect is not ORIGINAL_CONNECT


def test_uninstall_puts_connect_back(install: Install) -> None:
    installed = install(SQLiteIntegration)
    assert sqlite3.connect is not ORIGINAL_CONNECT
    installed.integration.uninstall()
    assert sqlite3.connect is ORIGINAL_CONNECT
    assert sqlite3.dbapi2.connect is ORIGINAL_CONNECT


def test_connections_are_real_and_backup_accepts_them(install: Install, path: Path) -> None:
    install(SQLiteIntegration)

    class Mine(sqlite3.Connection):
        pass

    conn = sqlite3.connect(path, factory=Mine)
    try:
        assert isinstance(conn, Mine)
        assert getattr(conn, integration.TARGET_ATTRIBUTE).service == f"sqlite:{path}"
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        copy = sqlite3.connect(":memory:")
        conn.backup(copy)  # a C function that refuses anything but a real Connection
        assert copy.execute("SELECT count(*) FROM t").fetchone() == (1,)
        cursor = conn.cursor()
        assert isinstance(cursor, sqlite3.Cursor)
        assert cursor.execute("SELECT v FROM t").fetchall() == [(1,)]
    finally:
        conn.close()


class DictCursor(sqlite3.Cursor):
    """Rows as dicts."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        super().__init__(connection)
        self.row_factory = lambda cursor, row: {
            column[0]: value for column, value in zip(cursor.description, row, strict=True)
        }


class DictConnection(sqlite3.Connection):
    """A connection whose ``cursor()`` picks its own default cursor class."""

    def cursor(self, factory: Any = DictCursor) -> Any:
        return super().cursor(factory)


def test_the_applications_default_cursor_class_is_kept_and_guarded(
    install: Install, path: Path
) -> None:
    installed = install(SQLiteIntegration, max_retries=50, failure_threshold=100)
    conn = sqlite3.connect(path, timeout=0.01, isolation_level=None, factory=DictConnection)
    try:
        assert type(conn).__name__ == "DictConnection"
        cursor = conn.cursor()  # the application's default: a DictCursor, not sqlite3.Cursor
        assert isinstance(cursor, DictCursor)
        holder = writer_holds_the_lock(path, 0.2)
        try:
            cursor.execute("INSERT INTO t VALUES (1)")  # locked, then retried until the lock goes
        finally:
            holder.join()
        assert cursor.execute("SELECT v FROM t ORDER BY v").fetchall() == [{"v": 0}, {"v": 1}]
    finally:
        conn.close()
    [finished] = installed.of(RecoveryFinished)
    assert (finished.outcome, finished.attempts > 1) == (Outcome.RECOVERED, True)


def test_a_busy_database_is_retried_in_autocommit(install: Install, path: Path) -> None:
    installed = install(SQLiteIntegration, max_retries=50, failure_threshold=100)
    conn = sqlite3.connect(path, timeout=0.01, isolation_level=None)
    holder = writer_holds_the_lock(path, 0.2)
    try:
        conn.execute("INSERT INTO t VALUES (1)")  # locked, then retried until the lock goes
    finally:
        holder.join()
        conn.close()
    check = ORIGINAL_CONNECT(path)
    assert check.execute("SELECT v FROM t ORDER BY v").fetchall() == [(0,), (1,)]
    check.close()
    [finished] = installed.of(RecoveryFinished)
    assert finished.outcome is Outcome.RECOVERED


def test_a_write_in_the_legacy_transaction_mode_is_not_retried(
    install: Install, path: Path
) -> None:
    installed = install(SQLiteIntegration, max_retries=50)
    conn = sqlite3.connect(path, timeout=0.01)  # the default: a write opens a transaction
    holder = writer_holds_the_lock(path, 0.3)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            conn.execute("INSERT INTO t VALUES (1)")
        assert conn.in_transaction  # sqlite3 opened one before the INSERT
        conn.rollback()
    finally:
        holder.join()
        conn.close()
    [finished] = installed.of(RecoveryFinished)
    assert (finished.attempts, finished.give_up_reason) == (1, "not_replay_safe")


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sqlite3 autocommit= is 3.12+")
def test_pep_249_autocommit_false_is_always_in_a_transaction(install: Install, path: Path) -> None:
    installed = install(SQLiteIntegration, max_retries=50)
    conn = sqlite3.connect(path, timeout=0.01, autocommit=False)  # type: ignore[call-arg]
    holder = writer_holds_the_lock(path, 0.3)
    try:
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("INSERT INTO t VALUES (1)")
    finally:
        holder.join()
        conn.close()
    [finished] = installed.of(RecoveryFinished)
    assert finished.attempts == 1


def test_an_unopenable_database_opens_the_breaker(install: Install, tmp_path: Path) -> None:
    installed = install(SQLiteIntegration, max_retries=0)
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    for _ in range(3):
        with pytest.raises(sqlite3.OperationalError):
            sqlite3.connect(missing)
    with pytest.raises(sqlite3.OperationalError) as refused:
        sqlite3.connect(missing)
    assert isinstance(refused.value, CircuitOpenError)
    assert len(installed.of(ErrorClassified)) == 3


def test_the_refusal_carries_a_sqlite_result_code(install: Install, tmp_path: Path) -> None:
    # Every error sqlite3 raises has sqlite_errorcode/sqlite_errorname (3.11+); an except
    # clause reading them failed with AttributeError on a refusal.
    install(SQLiteIntegration, max_retries=0)
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    for _ in range(3):
        with pytest.raises(sqlite3.OperationalError) as real:
            sqlite3.connect(missing)
    with pytest.raises(sqlite3.OperationalError) as refused:
        sqlite3.connect(missing)
    assert isinstance(refused.value, CircuitOpenError)
    assert refused.value.sqlite_errorcode == real.value.sqlite_errorcode == sqlite3.SQLITE_CANTOPEN
    assert refused.value.sqlite_errorname == real.value.sqlite_errorname == "SQLITE_CANTOPEN"
    assert classify(refused.value).rule == "circuit_open"  # still raptor's refusal
