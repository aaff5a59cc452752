"""The psycopg2 integration: a breaker per server, safe retries, a default statement timeout.

psycopg2's connections and cursors are C types, and psycopg2 checks them: ``register_type``
and ``register_default_jsonb`` (which Django calls) refuse anything that is not a real
connection or cursor, so a proxy object is out of the question. Instead the hook goes through
psycopg2's own factory parameters:

- ``psycopg2.connect`` (the module function every caller, SQLAlchemy included, goes through)
  is wrapped: connecting runs under the ``connect`` plan, and ``connection_factory`` becomes a
  subclass of the one the application chose (``psycopg2.extensions.connection`` by default,
  or ``RealDictConnection``, Django's, ...). A factory that is not a class is left as it is:
  the connect is still guarded, its statements are not.
- That subclass's ``cursor()`` wraps whichever cursor factory would have been used (the
  ``cursor_factory`` argument, the connection's ``cursor_factory``, or the class's own
  default, e.g. ``RealDictCursor``) in a subclass whose ``execute``/``executemany``/
  ``callproc`` run under the server's plans. The cursor is still a ``psycopg2.extensions.cursor``
  of the expected class (``isinstance`` holds), so every type check accepts it.

Because the guarded cursor subclasses the factory the contrib psycopg2 instrumentation
installs, each attempt of a retried statement is its own client span, whichever of the two
is installed first. Connections opened before instrumentation, and asynchronous connections
(``async_=True``), are left alone. See ``docs/databases.md``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

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
    failed_midway,
    mark_opened,
    method_commits_partway,
    method_read_only,
    method_unguarded,
    opened_at,
    refusal_factory,
)
from otel_raptor.integrations.db._postgres import (
    failure_point,
    server,
    server_of_params,
    statement_timeout_query,
)
from otel_raptor.runtime.drive import CallPlan
from otel_raptor.runtime.forksafe import LockBox
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import psycopg2 as _psycopg2

    class Psycopg2CircuitOpen(CircuitOpenError, _psycopg2.OperationalError):  # type: ignore[misc]
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = [
    "Psycopg2CircuitOpen",
    "Psycopg2Integration",
    "circuit_open_error_type",
    "guarded_connection_factory",
    "guarded_cursor_factory",
]

#: The attribute under which a connection keeps its target.
TARGET_ATTRIBUTE: Final = "_otel_raptor_db"
_IDLE: Final = 0  # psycopg2.extensions.TRANSACTION_STATUS_IDLE
#: Marks the classes this module builds.
_GUARDED: Final = GUARDED_ATTRIBUTE


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when a PostgreSQL server's breaker is open: both
    :class:`~otel_raptor.errors.CircuitOpenError` and ``psycopg2.OperationalError``."""
    import psycopg2  # noqa: PLC0415 - the library is imported only when needed

    return library_error(
        CircuitOpenError, psycopg2.OperationalError, "Psycopg2CircuitOpen", __name__
    )


def __getattr__(name: str) -> Any:
    if name == "Psycopg2CircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _State(DbState):
    __slots__ = ()


_installed: _State | None = None

# Subclasses built per factory class, held weakly (an application's classes may come and go).
_cursor_classes: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()
_classes = LockBox()
#: Set on a connection while it is inside the app's ``with conn`` block (``otel_raptor.db``
#: reads it too).
IN_WITH_BLOCK: Final = "_otel_raptor_in_with_block"


def _plan(cursor: Any, *, batch: bool) -> CallPlan | None:
    state = _installed
    if state is None:
        return None
    conn = cursor.connection
    target: DbTarget | None = getattr(conn, TARGET_ATTRIBUTE, None)
    if target is None or target.owner is not state:
        info = conn.info
        target = state.target(server(info.host, info.port, info.dbname))
        setattr(conn, TARGET_ATTRIBUTE, target)
    if not target.enabled:
        return None
    if (
        batch
        or not conn.autocommit
        or conn.get_transaction_status() != _IDLE
        # ``with conn`` opens a transaction even in autocommit mode (psycopg2 >= 2.9), and
        # BEGIN goes out with its first statement: the status still says idle.
        or getattr(conn, IN_WITH_BLOCK, False)
    ):
        return target.locked
    return target.statement


def _opened(failure: BaseException, args: tuple[Any, ...]) -> float | None:
    """The ``opened`` hook: when the connection of the cursor in ``args[0]`` (or the
    connection itself, for the statement-timeout query) opened."""
    owner = args[0]
    return opened_at(getattr(owner, "connection", owner))


def _guarded_execute(
    cursor: Any, method: Callable[..., Any], args: tuple[Any, ...], *, batch: bool
) -> Any:
    try:
        plan = _plan(cursor, batch=batch)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("psycopg2.describe", bug)
        return method(*args)
    if plan is None:
        return method(*args)
    return call(plan, method, args, {})


def guarded_cursor_factory(factory: type) -> type:
    """A subclass of the cursor class ``factory`` whose ``execute``, ``executemany`` and
    ``callproc`` are guarded (the same class for the same factory; ``factory`` itself if it
    is one already)."""
    if getattr(factory, _GUARDED, False):
        return factory
    found = _cursor_classes.get(factory)
    if found is not None:
        return found

    parent: Any = factory  # a class known at run time, with the cursor's methods

    class Guarded(factory):  # type: ignore[misc]  # a class known at run time
        # The parent's methods, unbound: the cursor is the first argument, where the
        # ``opened`` hook finds its connection (and no bound method is built per call).
        def execute(self, query: Any, vars: Any = None) -> Any:
            return _guarded_execute(self, parent.execute, (self, query, vars), batch=False)

        def executemany(self, query: Any, vars_list: Any) -> Any:
            return _guarded_execute(self, parent.executemany, (self, query, vars_list), batch=True)

        def callproc(self, procname: Any, parameters: Any = None) -> Any:
            return _guarded_execute(self, parent.callproc, (self, procname, parameters), batch=True)

    Guarded.__name__ = Guarded.__qualname__ = factory.__name__
    Guarded.__module__ = factory.__module__
    Guarded.__doc__ = factory.__doc__
    setattr(Guarded, _GUARDED, True)
    with _classes.lock:
        return _cursor_classes.setdefault(factory, Guarded)


def _connection_mixin() -> type:
    import psycopg2.extensions  # noqa: PLC0415 - imported by install()

    base: type = psycopg2.extensions.connection
    cursor_type: type = psycopg2.extensions.cursor

    class GuardedConnection(base):  # type: ignore[misc]
        """Hands out guarded cursors of the factory it would have used, and marks the time it
        spends in a ``with`` block (a transaction, autocommit or not)."""

        def __enter__(self) -> Any:
            entered = super().__enter__()
            setattr(self, IN_WITH_BLOCK, True)  # psycopg2 refuses to nest them
            return entered

        def __exit__(self, *exc_info: Any) -> Any:
            try:
                return super().__exit__(*exc_info)
            finally:
                setattr(self, IN_WITH_BLOCK, False)

        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            try:
                factory = args[1] if len(args) > 1 else kwargs.get("cursor_factory")
                chosen = factory or self.cursor_factory or cursor_type
                if isinstance(chosen, type) and issubclass(chosen, cursor_type):
                    chosen = guarded_cursor_factory(chosen)
            except Exception as bug:  # noqa: BLE001 - the app's own factory, unguarded
                report_internal_error("psycopg2.cursor", bug)
                return super().cursor(*args, **kwargs)
            if len(args) > 1:
                # ``cursor(name, cursor_factory, withhold, scrollable)``: the factory goes by
                # keyword below, so what followed it must too, or it would shift into its place.
                rest = args[2:]
                kwargs.update(zip(("withhold", "scrollable"), rest, strict=False))
                args = (args[0], *rest[2:])
            kwargs["cursor_factory"] = chosen
            return super().cursor(*args, **kwargs)

    setattr(GuardedConnection, _GUARDED, True)
    return GuardedConnection


_guarded_classes = GuardedConnectionClasses(_connection_mixin)


def guarded_connection_factory(factory: Any) -> Any:
    """A subclass of the connection class ``factory`` (``None``: psycopg2's own) whose cursors
    are guarded; anything that is not a connection class is returned unchanged."""
    import psycopg2.extensions  # noqa: PLC0415 - imported by install()

    return _guarded_classes.of(factory, psycopg2.extensions.connection)


def _lost_while_connecting(conn: Any, failure: Exception) -> bool:
    """Whether the statement-timeout query's ``failure`` lost the connection it was sent on
    (psycopg2 marks it closed): the connect did not deliver a usable connection, and is
    failed (and retried as any failed connect) rather than handing the app a closed one,
    whose first statement would fail for a query the app never sent."""
    import psycopg2  # noqa: PLC0415 - imported by install()

    try:
        return isinstance(failure, psycopg2.Error) and bool(conn.closed)
    except Exception:  # noqa: BLE001 - unknown: the connection is the app's, as before
        return False


def _set_statement_timeout(conn: Any, target: DbTarget) -> None:
    """Run the statement-timeout query on ``conn``, just opened; raise the driver's error
    when it lost the connection (:func:`_lost_while_connecting`)."""
    import psycopg2.extensions  # noqa: PLC0415 - imported by install()

    try:
        query = statement_timeout_query(target)
        if query is None:
            return
        # A plain cursor: no factory, so neither our guard nor a tracing cursor sees it.
        with psycopg2.extensions.cursor(conn) as cursor:
            cursor.execute(query)
        if not conn.autocommit:
            conn.commit()  # psycopg2 opened a transaction for it
    except Exception as failure:
        if _lost_while_connecting(conn, failure):
            raise  # the driver's own error: the connect plan judges it and connects again
        if isinstance(failure, psycopg2.Error):
            # The server's (or a pooler's) answer, the connection kept: judged and counted
            # once as a statement of this connection.
            with contextlib.suppress(Exception):
                failed_midway(target.locked, failure, (conn,))
        else:
            report_internal_error("psycopg2.statement_timeout", failure)
        try:
            if not conn.closed and not conn.autocommit:
                conn.rollback()
        except Exception as undo:  # noqa: BLE001
            report_internal_error("psycopg2.statement_timeout", undo)


def _adopt(conn: Any, target: DbTarget) -> bool:
    """Stamp ``conn``, just opened, and remember its server on it; false when it refuses
    the attribute (a factory whose connections take none: reported): it is then the app's
    as it is, with no timeout set."""
    mark_opened(conn, target.connect)
    try:
        setattr(conn, TARGET_ATTRIBUTE, target)
    except Exception as bug:  # noqa: BLE001
        report_internal_error("psycopg2.remember_target", bug)
        return False
    return True


# ``psycopg2.connect``'s own keywords, which it takes out before building the DSN from the
# rest (``async_=False`` in the DSN made it invalid: the connection went unguarded).
_NOT_DSN: Final = frozenset({"dsn", "connection_factory", "cursor_factory", "async", "async_"})


def _describe(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[DbTarget, tuple[Any, ...], dict[str, Any]] | None:
    """The target of a ``psycopg2.connect`` call and its arguments with our connection
    factory, or ``None`` to leave it alone."""
    state = _installed
    if state is None or kwargs.get("async") or kwargs.get("async_"):
        return None
    import psycopg2.extensions  # noqa: PLC0415 - imported by install()

    dsn = args[0] if args else kwargs.get("dsn")
    params = {k: v for k, v in kwargs.items() if k not in _NOT_DSN}
    parsed = psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn(dsn, **params))
    target = state.target(server_of_params(parsed))
    if not target.enabled:
        return None
    if len(args) > 1:
        factory = guarded_connection_factory(args[1])
        args = (args[0], factory, *args[2:])
    else:
        kwargs = {
            **kwargs,
            "connection_factory": guarded_connection_factory(kwargs.get("connection_factory")),
        }
    return target, args, kwargs


def _connect_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The hook on ``psycopg2.connect``."""
    if _installed is None:
        return wrapped(*args, **kwargs)
    try:
        described = _describe(args, kwargs)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("psycopg2.describe_connect", bug)
        return wrapped(*args, **kwargs)
    if described is None:
        return wrapped(*args, **kwargs)
    target, args, kwargs = described

    def connect(*args: Any, **kwargs: Any) -> Any:
        # The statement-timeout query is part of the connect: a link lost there fails this
        # attempt, which the connect plan counts and sends again (nothing of the app's ran).
        conn = wrapped(*args, **kwargs)
        if _adopt(conn, target):
            _set_statement_timeout(conn, target)
        return conn

    conn = call(target.connect, connect, args, kwargs)
    # Stamped again once the connect's success is recorded: a lost link on this fresh
    # connection takes that success back only if it opened at or after it (core/breaker.py).
    mark_opened(conn, target.connect)
    return conn


class Psycopg2Integration(DbIntegration):
    """Guards psycopg2 connections and statements: hooks ``psycopg2.connect`` (see
    the module docstring and ``docs/databases.md``)."""

    name = "psycopg2"
    library = "psycopg2"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _State:
        error = refusal_factory(library.OperationalError, "Psycopg2CircuitOpen", __name__)
        return _State(
            settings,
            error=error,
            point=failure_point,
            read_only=method_read_only,
            partway=method_commits_partway,
            unguarded=method_unguarded,
            opened=_opened,
        )

    def hooks(self, library: Any) -> HookSet:
        return [(library, "connect", _connect_wrapper)], ()
