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
  cursor), and the ``FETCH``/``MOVE`` commands that follow it: ``fetchone``, ``fetchmany``,
  ``fetchall``, ``scroll`` and the iteration's ``__next__``/``__anext__`` when it fetches
  its next page (``itersize`` rows; a row already fetched is handed out untouched): the
  ``locked`` plan, each command once, refused while the breaker is open. A ``FETCH``
  moves the cursor: sent again, it would skip rows. Its ``CLOSE`` is never refused.
- ``Cursor.stream`` and ``AsyncCursor.stream``: the query is sent and its first row read
  under the ``locked`` plan (refused while the breaker is open). The rows after it belong to
  the same answer: nothing is refused or sent again mid-stream, and a failure met there is
  judged and counted once (:func:`~otel_raptor.integrations.db._common.failed_midway`).
- ``Cursor.copy`` and ``AsyncCursor.copy``: entering the block (the ``COPY`` statement) under
  the ``locked`` plan; a driver error met inside the block or when it ends (the rows written,
  the end of the copy) is judged and counted once, never sent again. The application's own
  error inside the block is not counted.

With psycopg_pool installed, also ``ConnectionPool`` and ``AsyncConnectionPool``:
``getconn`` (and so ``connection()``) fails at once, with an error that is both
:class:`~otel_raptor.errors.CircuitOpenError` and ``psycopg_pool.PoolTimeout``
(:func:`pool_circuit_open_error_type`), when the pool has no idle connection and the breaker
of its server is open (before its open time has elapsed): without it, the caller waited the
pool's ``timeout`` for a connection that the pool's background connects, each refused by the
open breaker, could not make. An idle connection is still handed out; a half-open breaker
(or one whose open time has elapsed) lets the caller wait as before, for the pool's own
connect that is the probe. The refusal is decided in ``_get_ready_connection``, under the
pool's lock, where psycopg_pool itself raises ``TooManyRequests``: before the caller joins
the queue of waiting clients and before the pool grows, so nothing of the pool's
bookkeeping is left behind.

A connection's target is found once (from the connect arguments, or from ``conn.info`` for a
connection opened before instrumentation) and kept on the connection; a pool's, from its
``conninfo`` and ``kwargs`` (or, when either is a callable, which raptor never calls, from
the latest connection it opened), and kept on the pool. See ``docs/databases.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, Final, NoReturn

from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import call, call_async, in_asyncio, library_error
from otel_raptor.integrations._wrapping import same_parameters
from otel_raptor.integrations.db._common import (
    DbHooks,
    DbIntegration,
    DbState,
    DbTarget,
    HookSet,
    Server,
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
    refine_statement_failure,
    server,
    server_of_params,
    statement_timeout_query,
)
from otel_raptor.runtime.drive import (
    CLOSED,
    CallPlan,
    count_success,
    resume_async,
    resume_sync,
)
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import psycopg as _psycopg
    import psycopg_pool as _psycopg_pool

    class PsycopgCircuitOpen(CircuitOpenError, _psycopg.OperationalError):
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""

    class PsycopgPoolCircuitOpen(CircuitOpenError, _psycopg_pool.PoolTimeout):
        """A pool's refusal by an open breaker; see :func:`pool_circuit_open_error_type`."""


__all__ = [
    "PsycopgCircuitOpen",
    "PsycopgIntegration",
    "PsycopgPoolCircuitOpen",
    "circuit_open_error_type",
    "pool_circuit_open_error_type",
]

#: The attribute under which a connection keeps its target.
TARGET_ATTRIBUTE: Final = "_otel_raptor_db"
_IDLE: Final = 0  # libpq PQTRANS_IDLE
#: A named cursor's commands after its ``DECLARE``: ``FETCH`` (and ``MOVE`` for ``scroll``).
_FETCHES: Final = ("fetchone", "fetchmany", "fetchall", "scroll")
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


def pool_circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error ``ConnectionPool.getconn`` (``connection()``, and the async
    pool's) raises when it would wait for a new connection while the breaker of the pool's
    server is open: both :class:`~otel_raptor.errors.CircuitOpenError` and
    ``psycopg_pool.PoolTimeout`` (so also ``psycopg.OperationalError``). The same class every
    time (also importable as ``PsycopgPoolCircuitOpen`` from this module). Needs
    psycopg_pool."""
    import psycopg_pool  # noqa: PLC0415 - the library is imported only when needed

    return library_error(
        CircuitOpenError, psycopg_pool.PoolTimeout, "PsycopgPoolCircuitOpen", __name__
    )


def __getattr__(name: str) -> Any:
    if name == "PsycopgCircuitOpen":
        return circuit_open_error_type()
    if name == "PsycopgPoolCircuitOpen":
        return pool_circuit_open_error_type()
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
    """``driver_error``: ``psycopg.Error``, the base of the driver's own errors;
    ``pool_hooks``: the hooks of a psycopg_pool pool's refusals (``None``: no psycopg_pool)."""

    __slots__ = ("driver_error", "pool_hooks")

    def __init__(
        self,
        settings: IntegrationSettings,
        driver_error: type[BaseException],
        pool_hooks: DbHooks | None = None,
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        self.driver_error = driver_error
        self.pool_hooks = pool_hooks


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


def _opened(failure: BaseException, args: tuple[Any, ...]) -> float | None:
    """The ``opened`` hook: when the connection of a cursor (or the connection itself, for
    the statement-timeout query) in ``args[0]`` opened."""
    owner = args[0]
    return opened_at(getattr(owner, "_conn", owner))


def _judge_timeout_failure(conn: Any, target: DbTarget, failure: Exception) -> None:
    """The statement-timeout query failed. A driver error is the server's (or a pooler's)
    answer, judged and counted once as a statement of the connection's (behind PgBouncer
    whose server is dead, the connect succeeds and this, its first statement, is where the
    outage shows); anything else is our bug. The connection is the app's either way."""
    state = _installed
    if state is None or not isinstance(failure, state.driver_error):
        report_internal_error("psycopg.statement_timeout", failure)
        return
    with contextlib.suppress(Exception):
        failed_midway(target.locked, failure, (conn,))


def _lost_while_connecting(conn: Any, failure: Exception) -> bool:
    """Whether the statement-timeout query's ``failure`` lost the connection it was sent on:
    the connect did not deliver a usable connection, and is failed (and retried as any
    failed connect) rather than handing the app a closed one, whose first statement would
    fail for a query the app never sent."""
    state = _installed
    try:
        return state is not None and isinstance(failure, state.driver_error) and conn.closed
    except Exception:  # noqa: BLE001 - unknown: the connection is the app's, as before
        return False


def _set_statement_timeout(conn: Any, target: DbTarget) -> None:
    """Run the statement-timeout query on ``conn``, just opened; raise the driver's error
    when it lost the connection (:func:`_lost_while_connecting`)."""
    try:
        query = statement_timeout_query(target)
        if query is None:
            return
        with conn.lock:
            conn.wait(conn._exec_command(query))
    except Exception as failure:
        if _lost_while_connecting(conn, failure):
            raise  # the driver's own error: the connect plan judges it and connects again
        _judge_timeout_failure(conn, target, failure)


async def _set_statement_timeout_async(conn: Any, target: DbTarget) -> None:
    try:
        query = statement_timeout_query(target)
        if query is None:
            return
        async with conn.lock:
            await conn.wait(conn._exec_command(query))
    except Exception as failure:
        if _lost_while_connecting(conn, failure):
            raise
        _judge_timeout_failure(conn, target, failure)


def _adopt(conn: Any, target: DbTarget) -> bool:
    """Stamp ``conn``, just opened, and remember its server on it; false when it refuses
    the attribute (our bug, reported): it is then the app's as it is, with no timeout set."""
    mark_opened(conn, target.connect)
    try:
        setattr(conn, TARGET_ATTRIBUTE, target)
    except Exception as bug:  # noqa: BLE001
        report_internal_error("psycopg.remember_target", bug)
        return False
    return True


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

    async def connect(*args: Any, **kwargs: Any) -> Any:
        # As the sync connect: the statement-timeout query is part of it.
        conn = await wrapped(*args, **kwargs)
        if _adopt(conn, target):
            await _set_statement_timeout_async(conn, target)
        return conn

    conn = await call_async(target.connect, connect, args, kwargs)
    mark_opened(conn, target.connect)  # as the sync connect: after its success is recorded
    return conn


def _execute_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Cursor.execute``."""

    def execute(
        self: Any, query: Any, params: Any = None, *, prepare: Any = None, binary: Any = None
    ) -> Any:
        state = _installed
        if state is None:
            return original(self, query, params, prepare=prepare, binary=binary)
        try:
            # _plan() inlined: this runs for every statement.
            conn = self._conn
            try:  # TARGET_ATTRIBUTE read as an attribute: a getattr() call costs more
                target = conn._otel_raptor_db
            except AttributeError:
                target = None
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
            if plan is not None:
                # The loop's fast path (``drive.run_sync``), inlined: see DbTarget.
                core = plan.core
                start = plan.monotonic()
                fast = (core is None or core._state is CLOSED) and (
                    start >= plan.downstream.cooldown_until
                )
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("psycopg.describe", bug)
            plan = None
        if plan is None:
            return original(self, query, params, prepare=prepare, binary=binary)
        if not fast:  # the loop's entry refuses, probes or waits
            keywords = {"prepare": prepare, "binary": binary}
            return call(plan, original, (self, query, params), keywords)
        try:
            result = original(self, query, params, prepare=prepare, binary=binary)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure = exc
        else:
            # count_success inlined where the deposit is all it does (a quiet breaker); it cannot
            # raise: slots set at construction, and ``start`` compared in the try block above.
            if core is not None and core.quiet and start < core._next_check:
                plan.budget._calls += 1
            else:
                count_success(plan, core, start, "psycopg.record_success")
            return result
        return resume_sync(
            plan,
            original,
            (self, query, params),
            {"prepare": prepare, "binary": binary},
            start,
            failure,
        )

    # psycopg's own parameters, not ``*args, **kwargs``: see ``same_parameters``.
    return execute if same_parameters(original, execute) else _hook(original, batch=False)


def _executemany_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Cursor.executemany``, ``ServerCursor.execute`` (a ``DECLARE``, in a
    transaction or ``WITH HOLD``) and the ``ServerCursor`` fetches: never replayed."""
    return _hook(original, batch=True)


def _hook(original: Callable[..., Any], *, batch: bool) -> Callable[..., Any]:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return original(self, *args, **kwargs)
        try:
            plan = _plan(state, self, batch=batch)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("psycopg.describe", bug)
            plan = None
        if plan is None:
            return original(self, *args, **kwargs)
        return call(plan, original, (self, *args), kwargs)

    return run


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
    """The hook on ``AsyncCursor.execute``: ``_plan()`` and the loop's fast path
    (``drive.run_async``) inlined, as in the sync hook (see DbTarget)."""

    async def execute(
        self: Any, query: Any, params: Any = None, *, prepare: Any = None, binary: Any = None
    ) -> Any:
        state = _installed
        if state is None:
            return await original(self, query, params, prepare=prepare, binary=binary)
        try:
            conn = self._conn
            try:  # TARGET_ATTRIBUTE read as an attribute: a getattr() call costs more
                target = conn._otel_raptor_db
            except AttributeError:
                target = None
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
            if plan is not None:
                core = plan.core
                start = plan.monotonic()
                fast = (core is None or core._state is CLOSED) and (
                    start >= plan.downstream.cooldown_until
                )
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("psycopg.describe", bug)
            plan = None
        if plan is None:
            return await original(self, query, params, prepare=prepare, binary=binary)
        if not fast:  # the loop's entry refuses, probes or waits
            return await call_async(
                plan, original, (self, query, params), {"prepare": prepare, "binary": binary}
            )
        try:
            result = await original(self, query, params, prepare=prepare, binary=binary)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure = exc
        else:
            # count_success inlined where the deposit is all it does (a quiet breaker); it cannot
            # raise: slots set at construction, and ``start`` compared in the try block above.
            if core is not None and core.quiet and start < core._next_check:
                plan.budget._calls += 1
            else:
                count_success(plan, core, start, "psycopg.record_success")
            return result
        # Cancellation from outside is the loop's to tell apart (never counted), as in run_async.
        return await resume_async(
            plan,
            original,
            (self, query, params),
            {"prepare": prepare, "binary": binary},
            start,
            failure,
        )

    return execute if same_parameters(original, execute) else _async_hook(original, batch=False)


def _async_executemany_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``AsyncCursor.executemany`` and ``AsyncServerCursor.execute``: never
    replayed."""
    return _async_hook(original, batch=True)


#: What the guarded first step of a stream or a cursor's iteration returns at the end of the
#: rows: ``StopIteration`` raised through the driver would be judged as a failure.
_END: Final = object()


def _locked_plan(cursor: Any) -> CallPlan | None:
    """The ``locked`` plan of ``cursor``'s server (``None``: not installed, disabled, or our
    bug, reported: the call then runs as without us)."""
    state = _installed
    if state is None:
        return None
    try:
        return _plan(state, cursor, batch=True)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("psycopg.describe", bug)
        return None


def _query(args: tuple[Any, ...], kwargs: dict[str, Any], key: str) -> Any:
    """The statement of a call (its first positional argument, or keyword ``key``), for the
    hooks that read it (a ``COMMIT`` is never refused)."""
    return args[0] if args else kwargs.get(key)


def _first_row(cursor: Any, query: Any, rows: Iterator[Any]) -> Any:
    """Sends the stream's query and reads its first row (``_END``: there is none)."""
    return next(rows, _END)


async def _first_row_async(cursor: Any, query: Any, rows: AsyncIterator[Any]) -> Any:
    return await anext(rows, _END)


def _stream_hook(
    original: Callable[..., Generator[Any, None, None]],
) -> Callable[..., Generator[Any, None, None]]:
    """The hook on ``Cursor.stream`` (a generator, as the original is): the query and its
    first row under the ``locked`` plan; the rest of the answer as it comes, a failure in it
    counted once (see the module docstring)."""

    def stream(self: Any, *args: Any, **kwargs: Any) -> Generator[Any, None, None]:
        plan = _locked_plan(self)
        rows = original(self, *args, **kwargs)
        if plan is None:
            return (yield from rows)
        try:
            first = call(plan, _first_row, (self, _query(args, kwargs, "query"), rows), {})
            if first is _END:
                return None
            yield first
            try:
                yield from rows
            except Exception as failure:  # noqa: BLE001 - judged, then raised unchanged
                failed_midway(plan, failure, (self, _query(args, kwargs, "query")))
        finally:
            rows.close()  # the app stopped early: psycopg cancels the query, as without us

    return stream


def _async_stream_hook(
    original: Callable[..., AsyncGenerator[Any, None]],
) -> Callable[..., AsyncGenerator[Any, None]]:
    """The hook on ``AsyncCursor.stream`` (an async generator, as the original is)."""

    async def stream(self: Any, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        plan = _locked_plan(self)
        rows = original(self, *args, **kwargs)
        try:
            if plan is None:
                async for row in rows:
                    yield row
                return
            query = _query(args, kwargs, "query")
            first = await call_async(plan, _first_row_async, (self, query, rows), {})
            if first is _END:
                return
            yield first
            while True:
                try:
                    row = await anext(rows)
                except StopAsyncIteration:
                    return
                except Exception as failure:  # noqa: BLE001 - judged, then raised unchanged
                    failed_midway(plan, failure, (self, query))
                yield row
        finally:
            await rows.aclose()

    return stream


def _enter_copy(cursor: Any, statement: Any, manager: Any) -> Any:
    """Sends the ``COPY`` statement: the driver's block entered."""
    return manager.__enter__()


async def _enter_copy_async(cursor: Any, statement: Any, manager: Any) -> Any:
    return await manager.__aenter__()


def _copy_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Cursor.copy`` (a context manager, as the original is): entering it under
    the ``locked`` plan, hands out the driver's own ``Copy``; a driver error inside the block
    or at its end is counted once, never sent again."""

    @contextlib.contextmanager
    def copy(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        plan = _locked_plan(self)
        manager = original(self, *args, **kwargs)
        if plan is None:
            with manager as driver_copy:
                yield driver_copy
            return
        statement = _query(args, kwargs, "statement")
        driver_copy = call(plan, _enter_copy, (self, statement, manager), {})
        try:
            yield driver_copy
        except BaseException as raised:
            try:
                suppressed = manager.__exit__(type(raised), raised, raised.__traceback__)
            except Exception as failure:
                _judge_copy_failure(plan, failure, (self, statement))
                raise
            if suppressed:
                return
            if isinstance(raised, Exception):
                _judge_copy_failure(plan, raised, (self, statement))
            raise
        else:
            try:
                manager.__exit__(None, None, None)
            except Exception as failure:  # noqa: BLE001 - judged, then raised unchanged
                failed_midway(plan, failure, (self, statement))

    return copy


def _async_copy_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``AsyncCursor.copy``: :func:`_copy_hook` for ``async with``."""

    @contextlib.asynccontextmanager
    async def copy(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        plan = _locked_plan(self)
        manager = original(self, *args, **kwargs)
        if plan is None:
            async with manager as driver_copy:
                yield driver_copy
            return
        statement = _query(args, kwargs, "statement")
        driver_copy = await call_async(plan, _enter_copy_async, (self, statement, manager), {})
        try:
            yield driver_copy
        except BaseException as raised:
            try:
                suppressed = await manager.__aexit__(type(raised), raised, raised.__traceback__)
            except Exception as failure:
                _judge_copy_failure(plan, failure, (self, statement))
                raise
            if suppressed:
                return
            if isinstance(raised, Exception):
                _judge_copy_failure(plan, raised, (self, statement))
            raise
        else:
            try:
                await manager.__aexit__(None, None, None)
            except Exception as failure:  # noqa: BLE001 - judged, then raised unchanged
                failed_midway(plan, failure, (self, statement))

    return copy


def _judge_copy_failure(plan: CallPlan, failure: Exception, args: tuple[Any, ...]) -> None:
    """``failure`` ended a ``COPY`` block: judged and raised when it is the driver's own error
    (a row that could not be written, the end of the copy); the application's own error from
    inside the block, which the driver passes through, returns, to be raised unjudged."""
    state = _installed
    try:
        ours = state is not None and isinstance(failure, state.driver_error)
    except Exception as bug:  # noqa: BLE001 - unjudged, as without us
        report_internal_error("psycopg.copy", bug)
        return
    if ours:
        failed_midway(plan, failure, args)


def _next_row(cursor: Any, original: Callable[[Any], Any]) -> Any:
    """A named cursor's next row, fetching its next page (``_END``: none left)."""
    try:
        return original(cursor)
    except StopIteration:
        return _END


async def _next_row_async(cursor: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    try:
        return await original(cursor)
    except StopAsyncIteration:
        return _END


def _fetches_a_page(cursor: Any) -> bool:
    """Whether a named cursor's ``__next__`` sends a ``FETCH`` (psycopg's own test): it has
    no page yet, or it is at the end of a full one."""
    page = cursor._iter_rows
    return page is None or cursor._page_pos >= len(page) >= cursor.itersize


def _server_next_hook(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The hook on ``ServerCursor.__next__``: a row of the page already fetched is handed out
    untouched; fetching the next page goes through the ``locked`` plan."""

    def __next__(self: Any) -> Any:
        if _installed is None:
            return original(self)
        try:
            plan = _locked_plan(self) if _fetches_a_page(self) else None
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("psycopg.describe", bug)
            plan = None
        if plan is None:
            return original(self)
        row = call(plan, _next_row, (self, original), {})
        if row is _END:
            raise StopIteration
        return row

    return __next__


def _async_server_next_hook(
    original: Callable[[Any], Awaitable[Any]],
) -> Callable[[Any], Awaitable[Any]]:
    """The hook on ``AsyncServerCursor.__anext__``: :func:`_server_next_hook` for
    ``async for``."""

    async def __anext__(self: Any) -> Any:
        if _installed is None:
            return await original(self)
        try:
            plan = _locked_plan(self) if _fetches_a_page(self) else None
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("psycopg.describe", bug)
            plan = None
        if plan is None:
            return await original(self)
        row = await call_async(plan, _next_row_async, (self, original), {})
        if row is _END:
            raise StopAsyncIteration
        return row

    return __anext__


# -- psycopg_pool -----------------------------------------------------------------------------

#: The attribute under which a psycopg_pool pool keeps its :class:`_PoolGuard`.
POOL_ATTRIBUTE: Final = "_otel_raptor_pool"


class _PoolGuard:
    """What a pool's refusal needs, found once and kept on the pool: the target of the
    server its connections go to, and the plan its refusals go through (the ``connect``
    plan's route and spec, with the pool's error: :func:`pool_circuit_open_error_type`).
    ``conninfo`` and ``kwargs`` are the pool's attributes it was found from (or, when either
    is a callable, learned with), compared by identity."""

    __slots__ = ("conninfo", "kwargs", "plan", "target")

    def __init__(
        self, state: _State, hooks: DbHooks, target: DbTarget, conninfo: Any, kwargs: Any
    ) -> None:
        self.target = target
        self.conninfo = conninfo
        self.kwargs = kwargs
        connect = target.connect
        runtime = state.runtime
        self.plan = CallPlan(
            connect.route, connect.spec, runtime=runtime, clock=runtime.clock, hooks=hooks
        )

    def serves(self, state: _State, conninfo: Any, kwargs: Any) -> bool:
        """Whether this guard is the current installation's, for these pool attributes."""
        return self.target.owner is state and self.conninfo is conninfo and self.kwargs is kwargs


def _pool_guard(state: _State, hooks: DbHooks, pool: Any) -> _PoolGuard | None:
    """The guard of ``pool`` (``None``: its server is unknown yet, its ``conninfo`` or
    ``kwargs`` being a callable, which raptor never calls, and no connection opened since)."""
    conninfo = pool.conninfo
    kwargs = pool.kwargs
    guard: _PoolGuard | None = getattr(pool, POOL_ATTRIBUTE, None)
    if guard is not None and guard.serves(state, conninfo, kwargs):
        return guard
    if callable(conninfo) or callable(kwargs):
        return None
    target = _connect_target(state, (conninfo or "",), dict(kwargs or {}))
    guard = _PoolGuard(state, hooks, target, conninfo, kwargs)
    setattr(pool, POOL_ATTRIBUTE, guard)
    return guard


def _learn_pool_target(pool: Any, conn: Any) -> None:
    """``pool`` opened ``conn``: a pool whose ``conninfo`` or ``kwargs`` is a callable learns
    its server from it (the callable may point the next one elsewhere: the latest wins)."""
    state = _installed
    if state is None or state.pool_hooks is None:
        return
    try:
        conninfo = pool.conninfo
        kwargs = pool.kwargs
        if not (callable(conninfo) or callable(kwargs)):
            return  # found from them when needed
        target: DbTarget | None = getattr(conn, TARGET_ATTRIBUTE, None)
        if target is None or target.owner is not state:
            return
        guard: _PoolGuard | None = getattr(pool, POOL_ATTRIBUTE, None)
        if guard is None or guard.target is not target or not guard.serves(state, conninfo, kwargs):
            guard = _PoolGuard(state, state.pool_hooks, target, conninfo, kwargs)
            setattr(pool, POOL_ATTRIBUTE, guard)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("psycopg_pool.learn_target", bug)


class _Admitted(BaseException):
    """Raised by :func:`_admitted`: the breaker admitted a pool's caller after all (its open
    time elapsed since it was read). A ``BaseException``, so that the attempt loop takes it
    for no verdict: the probe slot is given back, for the pool's own connect to take."""


def _admitted(pool: Any) -> NoReturn:
    raise _Admitted


def _refuse_waiting(pool: Any) -> None:
    """``pool`` has no idle connection for a ``getconn``, which would wait for a new one
    (run under the pool's lock, before the caller joins the queue). Raises the pool's
    refusal (:func:`pool_circuit_open_error_type`) when the breaker of the pool's server is
    open and its open time has not elapsed (or it is held open by hand); returns otherwise:
    the caller waits, as without raptor."""
    state = _installed
    if state is None:
        return
    hooks = state.pool_hooks
    if hooks is None:
        return
    try:
        guard = _pool_guard(state, hooks, pool)
        if guard is None or not guard.target.enabled:
            return
        plan = guard.plan
        core = plan.core
        if core is None or core._state is CLOSED:
            return
        # Read without the breaker's lock: the attempt loop below decides under it.
        wait = core.retry_after(plan.monotonic())
        if wait is not None and wait <= 0.0:
            return  # half-open, or time for a probe: the pool's connect is the probe
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("psycopg_pool.describe", bug)
        return
    # The refusal goes through the attempt loop, as every refusal does (CallRejected, and a
    # RecoveryFinished that says "rejected"); if the breaker admits the call after all,
    # ``_admitted`` gives the slot back and the caller waits.
    try:
        call(plan, _admitted, (pool,), {})
    except _Admitted:
        return
    except CircuitOpenError:
        with contextlib.suppress(Exception):  # the pool's own count, as for TooManyRequests
            pool._stats[pool._REQUESTS_ERRORS] += 1
        raise


def _refusal_behind(error: BaseException) -> BaseException | None:
    """The pool's refusal that ``getconn`` replaced with a plain ``PoolTimeout`` (it
    re-raises every ``PoolTimeout`` as its own, "couldn't get a connection after ... sec",
    whose context is the one raised), or ``None``."""
    context = error.__context__
    if isinstance(context, CircuitOpenError) and isinstance(context, type(error)):
        return context
    return None


def _ready_connection_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``ConnectionPool._get_ready_connection``: an idle connection is handed
    out untouched; none, the caller may be refused (:func:`_refuse_waiting`)."""

    def _get_ready_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = original(self, *args, **kwargs)
        if conn is None and _installed is not None:
            _refuse_waiting(self)
        return conn

    return _get_ready_connection


def _async_ready_connection_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``AsyncConnectionPool._get_ready_connection``."""

    async def _get_ready_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = await original(self, *args, **kwargs)
        if conn is None and _installed is not None:
            _refuse_waiting(self)
        return conn

    return _get_ready_connection


def _getconn_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``ConnectionPool.getconn``: the pool's refusal reaches the caller as it
    was raised, not replaced by the pool's own ``PoolTimeout``."""

    def getconn(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except Exception as error:
            refused = _refusal_behind(error)
            if refused is None:
                raise
        raise refused  # outside the except block: not chained to the pool's own

    return getconn


def _async_getconn_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``AsyncConnectionPool.getconn``."""

    async def getconn(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except Exception as error:
            refused = _refusal_behind(error)
            if refused is None:
                raise
        raise refused

    return getconn


def _pool_connect_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``ConnectionPool._connect`` (a new connection, not a per-call path): see
    :func:`_learn_pool_target`."""

    def _connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = original(self, *args, **kwargs)
        _learn_pool_target(self, conn)
        return conn

    return _connect


def _async_pool_connect_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``AsyncConnectionPool._connect``."""

    async def _connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        conn = await original(self, *args, **kwargs)
        _learn_pool_target(self, conn)
        return conn

    return _connect


def _pool_module() -> Any:
    """psycopg_pool, or ``None`` when it is not installed."""
    try:
        import psycopg_pool  # noqa: PLC0415 - optional: hooked only when installed
    except ImportError:
        return None
    return psycopg_pool


def _pool_patched(pool_module: Any) -> list[tuple[type, str, Any]]:
    """psycopg_pool's methods (none, when it is absent or changed shape: reported, and the
    rest of the integration installs as usual)."""
    if pool_module is None:
        return []
    sync = pool_module.ConnectionPool
    aio = pool_module.AsyncConnectionPool
    patched = [
        (sync, "getconn", _getconn_hook),
        (sync, "_get_ready_connection", _ready_connection_hook),
        (sync, "_connect", _pool_connect_hook),
        (aio, "getconn", _async_getconn_hook),
        (aio, "_get_ready_connection", _async_ready_connection_hook),
        (aio, "_connect", _async_pool_connect_hook),
    ]
    missing = [f"{cls.__name__}.{name}" for cls, name, _ in patched if name not in vars(cls)]
    if missing:
        report_internal_error(
            "psycopg_pool.hooks", AttributeError(f"psycopg_pool has no {', '.join(missing)}")
        )
        return []
    return patched


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
        # The FETCH/MOVE commands of a named cursor: one each, never sent again.
        *[(psycopg.ServerCursor, name, _executemany_hook) for name in _FETCHES],
        *[(psycopg.AsyncServerCursor, name, _async_executemany_hook) for name in _FETCHES],
        (psycopg.ServerCursor, "__next__", _server_next_hook),
        (psycopg.AsyncServerCursor, "__anext__", _async_server_next_hook),
        (psycopg.Cursor, "stream", _stream_hook),
        (psycopg.AsyncCursor, "stream", _async_stream_hook),
        (psycopg.Cursor, "copy", _copy_hook),
        (psycopg.AsyncCursor, "copy", _async_copy_hook),
    ]


class PsycopgIntegration(DbIntegration):
    """Guards psycopg 3 connections and statements (see the module docstring and
    ``docs/databases.md``)."""

    name = "psycopg"
    library = "psycopg"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _State:
        error = refusal_factory(library.OperationalError, "PsycopgCircuitOpen", __name__)
        pool_module = _pool_module()
        pool_hooks = (
            None
            if pool_module is None
            else DbHooks(
                refusal_factory(pool_module.PoolTimeout, "PsycopgPoolCircuitOpen", __name__)
            )
        )
        return _State(
            settings,
            library.Error,
            pool_hooks,
            error=error,
            point=failure_point,
            read_only=method_read_only,
            partway=method_commits_partway,
            refine=refine_statement_failure,
            unguarded=method_unguarded,
            opened=_opened,
        )

    def hooks(self, library: Any) -> HookSet:
        return _wrapped(library), [*_patched(library), *_pool_patched(_pool_module())]
