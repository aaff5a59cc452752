"""The asyncpg integration: a breaker per server, safe retries, a default command timeout.

What it hooks (asyncpg's connection and prepared-statement classes are pure Python; the
application keeps its real ``asyncpg.Connection`` objects):

- ``asyncpg.connect`` and ``asyncpg.connection.connect`` (which a pool created after
  instrumentation calls for each new connection): the ``connect`` plan, always replay safe.
  Where the caller gave no ``command_timeout``, the new connection gets the default
  statement timeout as psycopg's do: PostgreSQL's own ``statement_timeout``, set by one query
  that leaves alone a timeout chosen anywhere else (``server_settings``, the role, the
  database, the server's configuration), enforced by the server per statement (each
  statement of an ``executemany`` batch included). Not asyncpg's ``command_timeout``: that
  is a client-side timer armed for every statement, which measured 2.2 µs a statement
  (``benchmarks/bench_db.py --mode paired``: 3.4 % of a loopback ``SELECT 1``, more than
  all of raptor's hook), and it bounds a batch as a whole. A pool's reset query on release
  (``RESET ALL``) would drop the timeout: ``Connection.get_reset_query`` sets it again in the
  same round trip.
- ``Connection.execute``/``fetch``/``fetchval``/``fetchrow`` and ``PreparedStatement.fetch``/
  ``fetchval``/``fetchrow`` (and so ``Pool.execute``/``fetch``/..., which acquire a connection
  and call these): the ``statement`` plan outside a transaction (``con.transaction()``), the
  ``locked`` plan inside one;
- ``Connection.executemany``/``fetchmany``, ``PreparedStatement.executemany``/``fetchmany``
  and ``Connection.copy_from_table``/``copy_from_query``/``copy_to_table``/
  ``copy_records_to_table``: the ``locked`` plan (never replayed).
- Cursors (``Connection.cursor`` and ``PreparedStatement.cursor`` hand out a
  ``CursorFactory``, which sends nothing itself): awaiting the factory (its ``Bind``),
  ``Cursor.fetch``/``fetchrow``/``forward``, and each step of ``async for`` over the factory
  that goes to the server (the first, which sends the query, and each next page of
  ``prefetch`` rows; a row already fetched is handed out untouched): the ``locked`` plan,
  refused while the breaker is open and never sent again (a cursor lives in a transaction,
  and a fetch sent again would skip rows). Closing the portal at the end is never refused.

The contrib asyncpg instrumentation wraps the same ``Connection`` methods: whichever is
installed last is the outer layer, so with raptor installed after it each attempt is its own
span, and with raptor installed first the retries happen inside one span. Nothing is doubled
either way. See ``docs/databases.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import types
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.db import FailurePoint
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import MAX_TARGETS, call_async, in_asyncio, library_error
from otel_raptor.integrations.db._common import (
    DbIntegration,
    DbState,
    DbTarget,
    HookSet,
    Server,
    callers_limit,
    failed_midway,
    method_commits_partway,
    method_read_only,
    method_unguarded,
    refusal_factory,
)
from otel_raptor.integrations.db._postgres import failure_point as postgres_failure_point
from otel_raptor.integrations.db._postgres import (
    server,
    server_of_params,
    statement_timeout_query,
)
from otel_raptor.runtime.drive import CLOSED, CallPlan, count_success, resume_async
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import asyncpg as _asyncpg

    class AsyncpgCircuitOpen(CircuitOpenError, _asyncpg.PostgresConnectionError):  # type: ignore[misc]
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = ["AsyncpgCircuitOpen", "AsyncpgIntegration", "circuit_open_error_type"]

_STATEMENTS: Final = ("execute", "fetch", "fetchval", "fetchrow")
_BATCHES: Final = ("executemany", "fetchmany")
# COPY in either direction: the rows sent or the output written would be doubled by a replay.
_COPIES: Final = ("copy_from_table", "copy_from_query", "copy_to_table", "copy_records_to_table")
_PREPARED_STATEMENTS: Final = ("fetch", "fetchval", "fetchrow")
_PREPARED_BATCHES: Final = ("executemany", "fetchmany")
# An open cursor's commands: Execute on its portal (fetch, fetchrow) or MOVE (forward).
_CURSOR_FETCHES: Final = ("fetch", "fetchrow", "forward")
#: What a guarded cursor step returns at the end of the rows: ``StopAsyncIteration`` raised
#: through the driver would be judged as a failure.
_END: Final = object()


_unreachable: type[BaseException] | None = None


def _unreachable_type(asyncpg: Any) -> type[BaseException]:
    """``asyncpg.PostgresConnectionError`` and ``ConnectionRefusedError`` at once: a server
    that is down makes asyncpg raise the socket's own ``OSError`` (connecting) or its
    connection errors (a statement), so the refusal must be caught by either kind of
    ``except``. One class, made once, so the refusal's class is the same every time."""
    global _unreachable  # noqa: PLW0603 - a cache of one class
    if _unreachable is None:
        _unreachable = type(
            "PostgresUnreachable",
            (asyncpg.PostgresConnectionError, ConnectionRefusedError),
            {"__module__": __name__, "__doc__": "A connection error that is also an OSError."},
        )
    return _unreachable


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when a PostgreSQL server's breaker is open: at once
    :class:`~otel_raptor.errors.CircuitOpenError`, ``asyncpg.PostgresConnectionError``
    (SQLSTATE ``08000``, the base of asyncpg's connection errors) and
    ``ConnectionRefusedError`` (so ``except OSError`` catches it, as it catches asyncpg's
    failure to connect to a server that is down)."""
    import asyncpg  # noqa: PLC0415 - the library is imported only when needed

    return library_error(
        CircuitOpenError, _unreachable_type(asyncpg), "AsyncpgCircuitOpen", __name__
    )


def __getattr__(name: str) -> Any:
    if name == "AsyncpgCircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def failure_point(
    error: BaseException, classification: Classification
) -> tuple[FailurePoint, bool]:
    """As for every PostgreSQL driver, except that asyncpg's own timeout (``timeout=``,
    ``command_timeout``) cancels the statement on the server and keeps the connection: it is
    the caller's statement timeout, never replayed, like ``57014`` (raptor's default one)."""
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return FailurePoint.TIMED_OUT, True
    return postgres_failure_point(error, classification)


def statement_timed_out(failure: BaseException, classification: Classification) -> Classification:
    """asyncpg's own timeout on a statement (``timeout=``, ``command_timeout``: the caller's
    statement timeout) arrives as a bare ``TimeoutError``: it is what
    SQLSTATE ``57014`` is to the other drivers, ``cancelled`` (the caller's own limit), so it
    never counts against the server's breaker on asyncpg either. Connecting is not refined:
    a connect timeout is the server out of reach."""
    if (
        isinstance(failure, (asyncio.TimeoutError, TimeoutError))
        and classification.category is ErrorCategory.TIMEOUT
    ):
        return callers_limit(classification, "asyncpg.statement_timeout")
    return classification


def _unguarded(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``CallHooks.unguarded``: a statement ending a transaction (asyncpg's ``Transaction``
    sends ``COMMIT``/``ROLLBACK`` through ``Connection.execute``) or the reset query a pool
    sends on release is never refused. Refused, the first leaves the connection inside its
    transaction for good; the second makes the pool discard a healthy connection and raise
    out of an ``acquire()`` block whose statements all succeeded."""
    if method_unguarded(args, kwargs):
        return True
    reset = getattr(args[0], "_reset_query", None) if len(args) > 1 else None
    # asyncpg may put ``ROLLBACK;`` before it, and raptor its statement timeout after it.
    return isinstance(reset, str) and bool(reset) and isinstance(args[1], str) and reset in args[1]


class _State(DbState):
    """Targets are also kept by a connection's address and database (asyncpg connections
    take no attributes)."""

    __slots__ = ("by_address", "default_timeout", "opened")

    def __init__(self, settings: IntegrationSettings, **options: Any) -> None:
        super().__init__(settings, **options)
        self.by_address: dict[object, dict[str | None, DbTarget]] = {}
        #: The connections raptor set the default statement timeout on, with the query that
        #: did (run again after the reset query's ``RESET ALL``).
        self.default_timeout: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        #: When each connection opened (``Connection`` has ``__slots__``: no attribute of
        #: ours), for the ``opened`` hook; weak keys, so it holds the live connections only.
        self.opened: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    def remember(self, con: Any, target: DbTarget) -> None:
        by_address = self.by_address
        if len(by_address) >= MAX_TARGETS:
            by_address.clear()
        by_address.setdefault(con._addr, {})[con._params.database] = target

    def of_connection(self, con: Any) -> DbTarget:
        by_database = self.by_address.get(con._addr)
        if by_database is not None:
            target = by_database.get(con._params.database)
            if target is not None:
                return target
        address = con._addr
        database = con._params.database
        if isinstance(address, tuple):
            found = self.target(server(str(address[0]), address[1], database))
        else:
            found = self.target(server(str(address), None, database))
        self.remember(con, found)
        return found


_installed: _State | None = None


def _hosts_of_dsn(hosts: str) -> tuple[str | None, str | None]:
    """The hosts (``a,b``) and first port of a DSN's several ``host[:port]`` (``[v6]:port``)."""
    names: list[str] = []
    ports: list[str] = []
    for item in hosts.split(","):
        if item.startswith("["):
            name, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            name, _, port = item.partition(":")
        names.append(name)
        ports.append(port)
    return ",".join(name for name in names if name) or None, ports[0] or None


def _server_of_connect(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Server:
    dsn = args[0] if args else kwargs.get("dsn")
    host = kwargs.get("host")
    port = kwargs.get("port")
    database = kwargs.get("database")
    user = kwargs.get("user")
    if dsn:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        hosts = parts.netloc.rpartition("@")[2]
        if "," in hosts:  # postgresql://a:5433,b:5432/db: urlsplit cannot read it
            dsn_host, dsn_port = _hosts_of_dsn(hosts)
        else:
            dsn_host, dsn_port = parts.hostname, parts.port
        host = host or dsn_host or (query.get("host") or [None])[0]
        port = port or dsn_port or (query.get("port") or [None])[0]
        database = database or parts.path.lstrip("/") or (query.get("dbname") or [None])[0]
        user = user or parts.username or (query.get("user") or [None])[0]
    if isinstance(host, (list, tuple)):
        # Several hosts, tried in turn: one breaker for the set, named as libpq's
        # ``host=a,b`` (the first port), never the first host's own, which a connection
        # that reached the second one would otherwise be refused by when the first is down.
        host = ",".join(str(h) for h in host) if host else None
    if isinstance(port, (list, tuple)):
        port = port[0] if port else None
    params = {"host": host, "port": port, "dbname": database, "user": user}
    return server_of_params({k: v for k, v in params.items() if v})


def _several_hosts(target: DbTarget) -> bool:
    """Whether ``target`` is the connect target of several hosts (``host=a,b``)."""
    return "," in target.server.host


def _connect_wrapper(
    wrapped: Callable[..., Awaitable[Any]],
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Awaitable[Any]:
    """The hook on ``asyncpg.connect`` and ``asyncpg.connection.connect``."""
    state = _installed
    if state is None or not in_asyncio():
        return wrapped(*args, **kwargs)
    try:
        target = state.target(_server_of_connect(args, kwargs))
        defaulted = (
            target.enabled
            and kwargs.get("command_timeout") is None
            and bool(target.statement_timeout)
        )
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("asyncpg.describe_connect", bug)
        return wrapped(*args, **kwargs)
    if not target.enabled:
        return wrapped(*args, **kwargs)
    return _connect(state, target, wrapped, args, kwargs, defaulted=defaulted)


async def _connect(
    state: _State,
    target: DbTarget,
    wrapped: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    defaulted: bool,
) -> Any:
    timeout_query: list[str] = []

    async def connect(*args: Any, **kwargs: Any) -> Any:
        # The statement-timeout query is part of the connect, as for psycopg: a link lost
        # there fails this attempt, and the connect plan judges it and connects again.
        con = await wrapped(*args, **kwargs)
        if defaulted:
            query = await _set_statement_timeout(con, target)
            if query is not None:
                timeout_query.append(query)
        return con

    con = await call_async(target.connect, connect, args, kwargs)
    try:
        state.opened[con] = target.connect.monotonic()
        # The statements of a connection to one of several hosts go to the server it reached
        # (``of_connection``, by its address), as psycopg's and psycopg2's do.
        if not _several_hosts(target):
            state.remember(con, target)
        if timeout_query:
            state.default_timeout[con] = timeout_query[-1]
    except Exception as bug:  # noqa: BLE001
        report_internal_error("asyncpg.remember_target", bug)
    return con


async def _set_statement_timeout(con: Any, target: DbTarget) -> str | None:
    """Run the statement-timeout query on ``con``, just opened: the query, or ``None`` when
    none was due or it failed. A failure that lost the link is raised (the connect failed);
    any other driver error is judged once as a statement of the connection's (behind a pooler
    whose server is dead, this is where the outage shows); anything else is our bug. The
    connection is the app's either way."""
    try:
        encoded = statement_timeout_query(target)
        if encoded is None:
            return None
        query = encoded.decode("ascii")
        # The protocol's simple query, as ``Connection.execute`` without arguments sends it:
        # the hooked method would count it as one of the app's statements.
        await con._protocol.query(query, None)
    except Exception as failure:
        state = _installed
        driver_error = getattr(sys.modules.get("asyncpg"), "PostgresError", None)
        interface_error = getattr(sys.modules.get("asyncpg"), "InterfaceError", None)
        known = tuple(t for t in (driver_error, interface_error, OSError) if isinstance(t, type))
        if not isinstance(failure, known) or state is None:
            report_internal_error("asyncpg.statement_timeout", failure)
            return None
        if con.is_closed():
            raise
        with contextlib.suppress(Exception):
            failed_midway(target.locked, failure, (con,))
        return None
    return query


def _reset_query_hook(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The hook on ``Connection.get_reset_query`` (``_get_reset_query`` before asyncpg 0.30):
    a pool sends it on each release, and its ``RESET ALL`` drops the session's statement
    timeout; the query that set raptor's default is appended (same round trip)."""

    def get_reset_query(self: Any) -> Any:
        query = original(self)
        state = _installed
        if state is None:
            return query
        try:
            timeout_query = state.default_timeout.get(self)
            if timeout_query is not None and isinstance(query, str) and "RESET ALL" in query:
                return f"{query}\n{timeout_query};"
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("asyncpg.reset_query", bug)
        return query

    return get_reset_query


def _opened(failure: BaseException, args: tuple[Any, ...]) -> float | None:
    """The ``opened`` hook: when the connection of ``args[0]`` (a connection, or a prepared
    statement, cursor or cursor factory of one) opened."""
    state = _installed
    if state is None:
        return None
    owner = args[0]
    return state.opened.get(getattr(owner, "_connection", owner))


def _plan(state: _State, con: Any, *, batch: bool) -> CallPlan | None:
    protocol = con._protocol
    if protocol is None:
        return None  # a closed connection: asyncpg refuses the call without sending anything
    target = state.of_connection(con)
    if not target.enabled:
        return None
    if batch or protocol.is_in_transaction():
        return target.locked
    return target.statement


def _run_prepared(
    statement: Any,
    query: str,
    original: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    **kwargs: Any,
) -> Awaitable[Any]:
    # The statement's text is the second argument, where the replay judgement reads it;
    # the caller's keywords (timeout=, column=, record_class=) go to asyncpg as they came.
    return original(statement, *args, **kwargs)


def _hook(original: Callable[..., Awaitable[Any]], *, batch: bool, prepared: bool) -> Any:

    async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return await original(self, *args, **kwargs)
        try:
            con = self._connection if prepared else self
            plan = _plan(state, con, batch=batch)
            # The statement's text (asyncpg's private attribute), for the replay judgement.
            query = self._query if prepared and not batch and plan is not None else None
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("asyncpg.describe", bug)
            plan = None
        if plan is None:
            return await original(self, *args, **kwargs)
        if prepared and not batch:
            return await call_async(plan, _run_prepared, (self, query, original, args), kwargs)
        return await call_async(plan, original, (self, *args), kwargs)

    return run


def _statement_hook(original: Callable[..., Awaitable[Any]]) -> Any:
    """The hook on ``Connection.execute``/``fetch``/``fetchval``/``fetchrow``: :func:`_hook`
    with ``_plan``, ``of_connection`` and the loop's fast path (``drive.run_async``) inlined,
    since this runs for every statement (see DbTarget)."""

    async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return await original(self, *args, **kwargs)
        try:
            protocol = self._protocol
            if protocol is None:
                plan = None  # a closed connection: asyncpg refuses it without sending anything
            else:
                by_database = state.by_address.get(self._addr)
                target = None if by_database is None else by_database.get(self._params.database)
                if target is None:
                    target = state.of_connection(self)
                if not target.enabled:
                    plan = None
                elif protocol.is_in_transaction():
                    plan = target.locked
                else:
                    plan = target.statement
                if plan is not None:
                    core = plan.core
                    start = plan.monotonic()
                    fast = (core is None or core._state is CLOSED) and (
                        start >= plan.downstream.cooldown_until
                    )
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("asyncpg.describe", bug)
            plan = None
        if plan is None:
            return await original(self, *args, **kwargs)
        if not fast:  # the loop's entry refuses, probes or waits
            return await call_async(plan, original, (self, *args), kwargs)
        try:
            result = await original(self, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure = exc
        else:
            # count_success inlined where the deposit is all it does (a quiet breaker); it cannot
            # raise: slots set at construction, and ``start`` compared in the try block above.
            if core is not None and core.quiet and start < core._next_check:
                plan.budget._calls += 1
            else:
                count_success(plan, core, start, "asyncpg.record_success")
            return result
        # Cancellation from outside is the loop's to tell apart (never counted), as in run_async.
        return await resume_async(plan, original, (self, *args), kwargs, start, failure)

    return run


def _batch_hook(original: Callable[..., Awaitable[Any]]) -> Any:
    """The hook on ``Connection.executemany``/``fetchmany``: never replayed."""
    return _hook(original, batch=True, prepared=False)


def _copy_hook(original: Callable[..., Awaitable[Any]]) -> Any:
    """The hook on ``Connection.copy_*``: never replayed; one statement."""
    return _hook(original, batch=True, prepared=False)


def _prepared_hook(original: Callable[..., Awaitable[Any]]) -> Any:
    """The hook on ``PreparedStatement.fetch``/``fetchval``/``fetchrow``."""
    return _hook(original, batch=False, prepared=True)


def _prepared_batch_hook(original: Callable[..., Awaitable[Any]]) -> Any:
    """The hook on ``PreparedStatement.executemany``/``fetchmany``: never replayed."""
    return _hook(original, batch=True, prepared=True)


def _cursor_hook(original: Callable[..., Awaitable[Any]]) -> Any:
    """The hook on ``Cursor.fetch``/``fetchrow``/``forward``: never replayed."""
    return _hook(original, batch=True, prepared=True)


def _cursor_plan(resource: Any) -> CallPlan | None:
    """The ``locked`` plan of a cursor's (or cursor factory's) connection; ``None``: not
    installed, disabled, closed, or our bug (reported): the call runs as without us."""
    state = _installed
    if state is None:
        return None
    try:
        return _plan(state, resource._connection, batch=True)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("asyncpg.describe", bug)
        return None


@types.coroutine
def _awaited(step: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """Awaits the iterator an ``__await__`` returned."""
    return (yield from step)


async def _open_cursor(factory: Any, query: Any, original: Callable[[Any], Any]) -> Any:
    """Prepares (when needed) and binds the cursor: what awaiting the factory sends."""
    return await _awaited(original(factory))


def _factory_await_hook(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The hook on ``CursorFactory.__await__`` (``await con.cursor(...)``): opening the cursor
    under the ``locked`` plan; the app gets asyncpg's own ``Cursor``."""

    def __await__(self: Any) -> Any:
        plan = _cursor_plan(self)
        if plan is None:
            return original(self)
        return call_async(plan, _open_cursor, (self, self._query, original), {}).__await__()

    return __await__


async def _next_row(iterator: Any, query: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    """The cursor's next row, from the server (``_END``: none left)."""
    try:
        return await original(iterator)
    except StopAsyncIteration:
        return _END


def _iterator_next_hook(original: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Any]:
    """The hook on ``CursorIterator.__anext__`` (``async for`` over a cursor factory): a step
    that sends (the query, then each page) goes through the ``locked`` plan; a row already
    fetched, and the closing of the portal at the end, as without us."""

    async def __anext__(self: Any) -> Any:
        if _installed is None:
            return await original(self)
        try:
            # asyncpg's own test: no portal yet, or an empty buffer of a cursor not exhausted.
            sends = not self._exhausted and (not self._portal_name or not self._buffer)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("asyncpg.describe", bug)
            sends = False
        plan = _cursor_plan(self) if sends else None
        if plan is None:
            return await original(self)
        row = await call_async(plan, _next_row, (self, self._query, original), {})
        if row is _END:
            raise StopAsyncIteration
        return row

    return __anext__


def _wrapped(asyncpg: Any) -> list[tuple[object, str, Any]]:
    from asyncpg import connection  # noqa: PLC0415 - imported by install()

    return [(asyncpg, "connect", _connect_wrapper), (connection, "connect", _connect_wrapper)]


def _patched(asyncpg: Any) -> list[tuple[type, str, Any]]:
    from asyncpg import connection, cursor, prepared_stmt  # noqa: PLC0415 - imported by install()

    con = connection.Connection
    statement = prepared_stmt.PreparedStatement
    return [
        *[(con, name, _statement_hook) for name in _STATEMENTS],
        *[(con, name, _batch_hook) for name in _BATCHES],
        *[(con, name, _copy_hook) for name in _COPIES],
        *[(statement, name, _prepared_hook) for name in _PREPARED_STATEMENTS],
        *[(statement, name, _prepared_batch_hook) for name in _PREPARED_BATCHES],
        (cursor.CursorFactory, "__await__", _factory_await_hook),
        (cursor.CursorIterator, "__anext__", _iterator_next_hook),
        *[(cursor.Cursor, name, _cursor_hook) for name in _CURSOR_FETCHES],
        *[
            (con, name, _reset_query_hook)
            for name in ("get_reset_query", "_get_reset_query")
            if name in vars(con)
        ][:1],
    ]


class AsyncpgIntegration(DbIntegration):
    """Guards asyncpg connections and statements (see the module docstring and
    ``docs/databases.md``)."""

    name = "asyncpg"
    library = "asyncpg"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _State:
        error = refusal_factory(_unreachable_type(library), "AsyncpgCircuitOpen", __name__)
        return _State(
            settings,
            error=error,
            point=failure_point,
            read_only=method_read_only,
            partway=method_commits_partway,
            refine=statement_timed_out,
            unguarded=_unguarded,
            opened=_opened,
        )

    def hooks(self, library: Any) -> HookSet:
        return _wrapped(library), _patched(library)
