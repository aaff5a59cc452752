"""The sqlite3 integration: a breaker per database file, and busy/locked handling.

sqlite3's connections and cursors are C types, and sqlite3 checks them (``backup`` refuses
anything that is not a real ``sqlite3.Connection``), so no proxy: ``sqlite3.connect`` (and
``sqlite3.dbapi2.connect``) is wrapped to pass ``factory=``, a subclass of the connection
class the application chose (``sqlite3.Connection`` by default). Its ``execute``,
``executemany`` and ``executescript`` run under the database's plans, and its ``cursor()``
hands out a subclass of the requested cursor class that does the same. Connecting runs under
the ``connect`` plan.

Which statements may be replayed (see ``docs/databases.md``):

- in autocommit (``isolation_level=None``, or ``autocommit=True`` on Python 3.12+) with no
  transaction open: the ``statement`` plan; a ``database is locked``/``busy`` error means the
  statement did nothing, so it may be sent again, and a read-only statement may be sent again
  after any transient error;
- in the legacy transaction control (the default ``isolation_level``), sqlite3 opens a
  transaction before every ``INSERT``/``UPDATE``/``DELETE``/``REPLACE``: only read-only
  statements may be replayed there (the ``reads`` plan), and none once a transaction is open;
- ``executemany``, ``executescript`` and ``autocommit=False`` (always in a transaction): never.

SQLite has no statement timeout to set (its ``timeout`` is the busy timeout, which sqlite3
already defaults to 5 s). Connections opened before instrumentation are left alone.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from otel_raptor.core.classification import Classification
from otel_raptor.core.db import FailurePoint, conflict_code
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import call, library_error
from otel_raptor.integrations.db._common import (
    GUARDED_ATTRIBUTE,
    DbIntegration,
    DbState,
    DbTarget,
    GuardedConnectionClasses,
    HookSet,
    Server,
    is_not_sent,
    refusal_factory,
)
from otel_raptor.runtime.drive import CallPlan
from otel_raptor.runtime.forksafe import LockBox
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import sqlite3 as _sqlite3

    class SQLiteCircuitOpen(CircuitOpenError, _sqlite3.OperationalError):
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = [
    "SQLiteCircuitOpen",
    "SQLiteIntegration",
    "circuit_open_error_type",
    "guarded_connection_factory",
]

SYSTEM: Final = "sqlite"
#: The attribute under which a connection keeps its target.
TARGET_ATTRIBUTE: Final = "_otel_raptor_db"
_GUARDED: Final = GUARDED_ATTRIBUTE
# ``Connection.autocommit`` (3.12+) when the legacy transaction control is in force.
_LEGACY: Final = getattr(sys.modules.get("sqlite3"), "LEGACY_TRANSACTION_CONTROL", -1)


#: ``SQLITE_CANTOPEN``: what sqlite3 says when a database cannot be opened; the fail-fast
#: error carries it too, for code that reads ``error.sqlite_errorcode``/``sqlite_errorname``.
CANTOPEN: Final = 14
CANTOPEN_NAME: Final = "SQLITE_CANTOPEN"


def _error_type(sqlite3: Any) -> type[CircuitOpenError]:
    error_type: type[CircuitOpenError] = library_error(
        CircuitOpenError, sqlite3.OperationalError, "SQLiteCircuitOpen", __name__
    )
    # Every error sqlite3 raises has these (3.11+), and an ``except`` clause may read them:
    # missing, they raised AttributeError there. Class attributes: the refusal's own.
    error_type.sqlite_errorcode = CANTOPEN  # type: ignore[attr-defined]
    error_type.sqlite_errorname = CANTOPEN_NAME  # type: ignore[attr-defined]
    return error_type


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when a database's breaker is open: both
    :class:`~otel_raptor.errors.CircuitOpenError` and ``sqlite3.OperationalError``, with
    ``sqlite_errorcode`` ``14`` and ``sqlite_errorname`` ``"SQLITE_CANTOPEN"``."""
    import sqlite3  # noqa: PLC0415 - the library is imported only when needed

    return _error_type(sqlite3)


def __getattr__(name: str) -> Any:
    if name == "SQLiteCircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def failure_point(
    error: BaseException, classification: Classification
) -> tuple[FailurePoint, bool]:
    """A busy or locked database did nothing (``ROLLED_BACK``); any other error is the
    library's answer, and the connection (a file) is still there."""
    if is_not_sent(error):
        return FailurePoint.NOT_SENT, True
    if conflict_code(classification) is not None:
        return FailurePoint.ROLLED_BACK, True
    return FailurePoint.FAILED, True


class _State(DbState):
    __slots__ = ()


_installed: _State | None = None
_cursor_classes: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()
_classes = LockBox()


def server_of(database: object) -> Server:
    """The server (a file) of a ``sqlite3.connect`` ``database`` argument: an absolute path,
    ``:memory:``, or a ``file:`` URI without its query."""
    if isinstance(database, bytes):
        database = os.fsdecode(database)
    elif isinstance(database, os.PathLike):
        database = os.fspath(database)
    text = str(database)
    if text.startswith("file:"):
        text = text.partition("?")[0]
    elif text != ":memory:" and text:
        text = os.path.abspath(text)
    return Server(SYSTEM, "", None, text or ":memory:")


def _plan(conn: Any, *, batch: bool) -> CallPlan | None:
    state = _installed
    if state is None:
        return None
    target: DbTarget | None = getattr(conn, TARGET_ATTRIBUTE, None)
    if target is None or target.owner is not state or not target.enabled:
        return None
    if batch or conn.in_transaction:
        return target.locked
    autocommit = getattr(conn, "autocommit", _LEGACY)
    if autocommit is True or (autocommit == _LEGACY and conn.isolation_level is None):
        return target.statement
    if autocommit is False:
        return target.locked
    return target.reads  # legacy control: a write opens a transaction first


def _guard(
    conn: Any,
    method: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: bool,
) -> Any:
    try:
        plan = _plan(conn, batch=batch)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("sqlite3.describe", bug)
        return method(*args, **kwargs)
    if plan is None:
        return method(*args, **kwargs)
    return call(plan, method, args, kwargs)


def _guarded_cursor(factory: type) -> type:
    if getattr(factory, _GUARDED, False):
        return factory
    found = _cursor_classes.get(factory)
    if found is not None:
        return found

    class Guarded(factory):  # type: ignore[misc]  # a class known at run time
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            return _guard(self.connection, super().execute, args, kwargs, False)

        def executemany(self, *args: Any, **kwargs: Any) -> Any:
            return _guard(self.connection, super().executemany, args, kwargs, True)

        def executescript(self, *args: Any, **kwargs: Any) -> Any:
            return _guard(self.connection, super().executescript, args, kwargs, True)

    Guarded.__name__ = Guarded.__qualname__ = factory.__name__
    Guarded.__module__ = factory.__module__
    setattr(Guarded, _GUARDED, True)
    with _classes.lock:
        return _cursor_classes.setdefault(factory, Guarded)


def _connection_mixin() -> type:
    import sqlite3  # noqa: PLC0415 - imported by install()

    cursor_type = sqlite3.Cursor

    class GuardedConnection(sqlite3.Connection):
        """Guards the connection's own statements, and hands out guarded cursors of the class
        it would have used."""

        def execute(self, *args: Any, **kwargs: Any) -> Any:
            return _guard(self, super().execute, args, kwargs, False)

        def executemany(self, *args: Any, **kwargs: Any) -> Any:
            return _guard(self, super().executemany, args, kwargs, True)

        def executescript(self, *args: Any, **kwargs: Any) -> Any:
            return _guard(self, super().executescript, args, kwargs, True)

        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            try:
                chosen = args[0] if args else kwargs.get("factory", cursor_type)
                if isinstance(chosen, type) and issubclass(chosen, cursor_type):
                    chosen = _guarded_cursor(chosen)
            except Exception as bug:  # noqa: BLE001 - the app's own factory, unguarded
                report_internal_error("sqlite3.cursor", bug)
                return super().cursor(*args, **kwargs)
            if args:
                args = args[1:]
            kwargs["factory"] = chosen
            return super().cursor(*args, **kwargs)

    setattr(GuardedConnection, _GUARDED, True)
    return GuardedConnection


_guarded_classes = GuardedConnectionClasses(_connection_mixin)


def guarded_connection_factory(factory: Any) -> Any:
    """A subclass of the connection class ``factory`` (``None``: ``sqlite3.Connection``) whose
    statements are guarded; anything that is not a ``sqlite3.Connection`` class is returned
    unchanged."""
    import sqlite3  # noqa: PLC0415 - imported by install()

    return _guarded_classes.of(factory, sqlite3.Connection)


# ``sqlite3.connect``'s parameters, in order, for arguments given by position.
_PARAMETERS: Final = (
    "database",
    "timeout",
    "detect_types",
    "isolation_level",
    "check_same_thread",
    "factory",
    "cached_statements",
    "uri",
)


def _connect_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The hook on ``sqlite3.connect`` and ``sqlite3.dbapi2.connect``."""
    state = _installed
    if state is None:
        return wrapped(*args, **kwargs)
    try:
        if len(args) > 1:  # move everything after ``database`` into keywords
            kwargs = {**kwargs, **dict(zip(_PARAMETERS[1:], args[1:], strict=False))}
            args = args[:1]
        database = args[0] if args else kwargs.get("database")
        target = state.target(server_of(database))
        if not target.enabled:
            return wrapped(*args, **kwargs)
        kwargs = {**kwargs, "factory": guarded_connection_factory(kwargs.get("factory"))}
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("sqlite3.describe_connect", bug)
        return wrapped(*args, **kwargs)
    conn = call(target.connect, wrapped, args, kwargs)
    try:
        setattr(conn, TARGET_ATTRIBUTE, target)
    except Exception as bug:  # noqa: BLE001 - a factory whose objects take no attributes
        report_internal_error("sqlite3.remember_target", bug)
    return conn


def _hooks(sqlite3: Any) -> list[tuple[object, str, Any]]:
    from sqlite3 import dbapi2  # noqa: PLC0415 - imported by install()

    return [(sqlite3, "connect", _connect_wrapper), (dbapi2, "connect", _connect_wrapper)]


class SQLiteIntegration(DbIntegration):
    """Guards sqlite3 connections and statements: hooks ``connect`` (see the module
    docstring and ``docs/databases.md``)."""

    name = "sqlite3"
    library = "sqlite3"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _State:
        _error_type(library)  # the same class refusal_factory builds, with its result code
        error = refusal_factory(library.OperationalError, "SQLiteCircuitOpen", __name__)
        return _State(settings, error=error, point=failure_point)

    def hooks(self, library: Any) -> HookSet:
        return _hooks(library), ()
