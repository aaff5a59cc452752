"""The psycopg (3) integration, sync and async: a breaker per server, safe retries, a default
statement timeout.

What it hooks (psycopg is pure Python, so its classes are patched; the application keeps
getting real ``psycopg.Connection`` and cursor objects, which every type check accepts):

- ``psycopg.connect``, ``Connection.connect`` and ``AsyncConnection.connect`` (the class
  methods psycopg_pool calls, and subclasses inherit): the ``connect`` plan, always replay
  safe. After a connection opens, its server's default statement timeout is set where
  nothing chose one, not even ``0`` (``pg_settings`` reports PostgreSQL's built-in default),
  in one round trip that bypasses cursors (so no tracing instrumentation sees it).
- ``Cursor.execute``/``executemany`` and ``AsyncCursor.execute``/``executemany`` (and so
  ``Connection.execute``, ``ClientCursor``, ``RawCursor``): ``execute`` on an autocommit
  connection with no transaction open and no pipeline runs under the ``statement`` plan
  (replay judged per failure); anything else under the ``locked`` plan (never replayed).
- ``ServerCursor.execute`` and ``AsyncServerCursor.execute`` (the ``DECLARE`` of a named
  cursor): the ``locked`` plan. The ``FETCH`` commands that follow it, ``Cursor.stream``
  and ``copy`` are not guarded.

A connection's target is found once (from the connect arguments, or from ``conn.info`` for a
connection opened before instrumentation) and kept on the connection. See
``docs/databases.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import call, call_async, in_asyncio, library_error
from otel_raptor.integrations.db._common import (
    DbIntegration,
    DbState,
    DbTarget,
    HookSet,
    Server,
    method_commits_partway,
    method_read_only,
    method_unguarded,
    refusal_factory,
)
from otel_raptor.integrations.db._postgres import (
    failure_point,
    refine_statement_failure,
    server,
    server_of_params,
    statement_timeout_query,
)
from otel_raptor.runtime.drive import CallPlan
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import psycopg as _psycopg

    class PsycopgCircuitOpen(CircuitOpenError, _psycopg.OperationalError):
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = ["PsycopgCircuitOpen", "PsycopgIntegration", "circuit_open_error_type"]

#: The attribute under which a connection keeps its target.
TARGET_ATTRIBUTE: Final = "_otel_raptor_db"
_IDLE: Final = 0  # libpq PQTRANS_IDLE
# Keyword arguments of ``Connection.connect`` that are not libpq connection parameters.
_CONNECT_OPTIONS: Final = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when a PostgreSQL server's breaker is open: both
    :class:`~otel_raptor.errors.CircuitOpenError` and ``psycopg.OperationalError``. The same
    class every time (also importable as ``PsycopgCircuitOpen`` from this module)."""
    import psycopg  # noqa: PLC0415 - the library is imported only when needed

    return library_error(CircuitOpenError, psycopg.OperationalError, "PsycopgCircuitOpen", __name__)


def __getattr__(name: str) -> Any:
    if name == "PsycopgCircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _server_of_connect(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Server:
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415 - imported by install()

    conninfo = args[0] if args else kwargs.get("conninfo", "")
    params = {k: v for k, v in kwargs.items() if k not in _CONNECT_OPTIONS and k != "conninfo"}
    return server_of_params(conninfo_to_dict(conninfo, **params))


def _server_of_connection(conn: Any) -> Server:
    info = conn.info
    return server(info.host, info.port, info.dbname)


class _State(DbState):
    __slots__ = ()


_installed: _State | None = None


def _target(state: _State, conn: Any) -> DbTarget:
    target: DbTarget | None = getattr(conn, TARGET_ATTRIBUTE, None)
    if target is None or target.owner is not state:
        target = state.target(_server_of_connection(conn))
        setattr(conn, TARGET_ATTRIBUTE, target)
    return target


def _plan(state: _State, cursor: Any, *, batch: bool) -> CallPlan | None:
    conn = cursor._conn
    target = _target(state, conn)
    if not target.enabled:
        return None
    if (
        batch
        or not conn._autocommit
        or conn.pgconn.transaction_status != _IDLE
        or conn._pipeline is not None
    ):
        return target.locked
    return target.statement


def _set_statement_timeout(conn: Any, target: DbTarget) -> None:
    try:
        query = statement_timeout_query(target)
        if query is None:
            return
        with conn.lock:
            conn.wait(conn._exec_command(query))
    except Exception as bug:  # noqa: BLE001 - the connection is the app's either way
        report_internal_error("psycopg.statement_timeout", bug)


async def _set_statement_timeout_async(conn: Any, target: DbTarget) -> None:
    try:
        query = statement_timeout_query(target)
        if query is None:
            return
        async with conn.lock:
            await conn.wait(conn._exec_command(query))
    except Exception as bug:  # noqa: BLE001
        report_internal_error("psycopg.statement_timeout", bug)


def _connect_target(state: _State, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DbTarget:
    return state.target(_server_of_connect(args, kwargs))


def _connect_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The hook on ``psycopg.connect`` and ``Connection.connect``."""
    state = _installed
    if state is None:
        return wrapped(*args, **kwargs)
    try:
        target = _connect_target(state, args, kwargs)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("psycopg.describe_connect", bug)
        return wrapped(*args, **kwargs)
    if not target.enabled:
        return wrapped(*args, **kwargs)
    conn = call(target.connect, wrapped, args, kwargs)
    try:
        setattr(conn, TARGET_ATTRIBUTE, target)
    except Exception as bug:  # noqa: BLE001
        report_internal_error("psycopg.remember_target", bug)
        return conn
    _set_statement_timeout(conn, target)
    return conn


def _async_connect_wrapper(
    wrapped: Callable[..., Awaitable[Any]],
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Awaitable[Any]:
    """The hook on ``AsyncConnection.connect``: returns the awaitable the caller awaits."""
    state = _installed
    if state is None or not in_asyncio():
        return wrapped(*args, **kwargs)
    try:
        target = _connect_target(state, args, kwargs)
    except Exception as bug:  # noqa: BLE001
        report_internal_error("psycopg.describe_connect", bug)
        return wrapped(*args, **kwargs)
    if not target.enabled:
        return wrapped(*args, **kwargs)
    return _connect_async(target, wrapped, args, kwargs)


async def _connect_async(
    target: DbTarget,
    wrapped: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    conn = await call_async(target.connect, wrapped, args, kwargs)
    try:
        setattr(conn, TARGET_ATTRIBUTE, target)
    except Exception as bug:  # noqa: BLE001
        report_internal_error("psycopg.remember_target", bug)
        return conn
    await _set_statement_timeout_async(conn, target)
    return conn


def _execute_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Cursor.execute``."""

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return original(self, *args, **kwargs)
        try:
            # _plan() inlined: this runs for every statement.
            conn = self._conn
            target = getattr(conn, TARGET_ATTRIBUTE, None)
            if target is None or target.owner is not state:
                target = _target(state, conn)
            if not target.enabled:
                plan = None
            elif (
                conn._autocommit
                and conn.pgconn.transaction_status == _IDLE
                and conn._pipeline is None
            ):
                plan = target.statement
            else:
                plan = target.locked
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("psycopg.describe", bug)
            plan = None
        if plan is None:
            return original(self, *args, **kwargs)
        return call(plan, original, (self, *args), kwargs)

    return execute


def _executemany_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Cursor.executemany`` and ``ServerCursor.execute`` (a ``DECLARE``, in a
    transaction or ``WITH HOLD``): never replayed."""

    def executemany(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return original(self, *args, **kwargs)
        try:
            plan = _plan(state, self, batch=True)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("psycopg.describe", bug)
            plan = None
        if plan is None:
            return original(self, *args, **kwargs)
        return call(plan, original, (self, *args), kwargs)

    return executemany


def _async_hook(original: Callable[..., Awaitable[Any]], *, batch: bool) -> Callable[..., Any]:
    async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return await original(self, *args, **kwargs)
        try:
            plan = _plan(state, self, batch=batch)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("psycopg.describe", bug)
            plan = None
        if plan is None:
            return await original(self, *args, **kwargs)
        return await call_async(plan, original, (self, *args), kwargs)

    return run


def _async_execute_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``AsyncCursor.execute``."""
    return _async_hook(original, batch=False)


def _async_executemany_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``AsyncCursor.executemany`` and ``AsyncServerCursor.execute``: never
    replayed."""
    return _async_hook(original, batch=True)


def _wrapped(psycopg: Any) -> list[tuple[object, str, Any]]:
    """The connect functions: wrapt wrappers (one is a class method)."""
    return [
        (psycopg, "connect", _connect_wrapper),
        (psycopg.Connection, "connect", _connect_wrapper),
        (psycopg.AsyncConnection, "connect", _async_connect_wrapper),
    ]


def _patched(psycopg: Any) -> list[tuple[type, str, Any]]:
    """The per-statement methods: plain functions (see ``_wrapping.patch``)."""
    return [
        (psycopg.Cursor, "execute", _execute_hook),
        (psycopg.Cursor, "executemany", _executemany_hook),
        (psycopg.AsyncCursor, "execute", _async_execute_hook),
        (psycopg.AsyncCursor, "executemany", _async_executemany_hook),
        # A server-side cursor's own execute (it does not call Cursor.execute).
        (psycopg.ServerCursor, "execute", _executemany_hook),
        (psycopg.AsyncServerCursor, "execute", _async_executemany_hook),
    ]


class PsycopgIntegration(DbIntegration):
    """Guards psycopg 3 connections and statements (see the module docstring and
    ``docs/databases.md``)."""

    name = "psycopg"
    library = "psycopg"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _State:
        error = refusal_factory(library.OperationalError, "PsycopgCircuitOpen", __name__)
        return _State(
            settings,
            error=error,
            point=failure_point,
            read_only=method_read_only,
            partway=method_commits_partway,
            refine=refine_statement_failure,
            unguarded=method_unguarded,
        )

    def hooks(self, library: Any) -> HookSet:
        return _wrapped(library), _patched(library)
