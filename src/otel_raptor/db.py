"""Whole transactions, run again when the database says so: ``run_transaction``.

A statement inside a transaction can never be retried on its own: after a serialization
failure or a deadlock the server has rolled the whole transaction back, and only running the
whole transaction again can succeed. These helpers do that::

    from otel_raptor.db import run_transaction, run_transaction_async

    def transfer(conn):
        conn.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
        conn.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2")
        return "done"

    run_transaction(conn, transfer)                       # psycopg, psycopg2, PyMySQL, sqlite3
    await run_transaction_async(conn, transfer_async)     # psycopg AsyncConnection, asyncpg

``run_transaction(conn, fn)`` opens a transaction with the driver's own API, runs
``fn(conn)``, commits, and returns what ``fn`` returned. When the transaction fails with a
*conflict* (serialization failure ``40001``, deadlock ``40P01`` or MySQL ``1213``, MySQL lock
wait timeout ``1205``, a busy or locked SQLite database; see
:func:`otel_raptor.core.db.is_transaction_conflict`), it is rolled back and run again after a
jittered exponential backoff (from ``base_delay``, at most ``max_delay``), up to
``max_retries`` times; the last conflict is then raised. Any other error rolls the transaction
back and propagates unchanged, at once. ``fn`` may therefore run several times: keep its
side effects inside the transaction.

The connection must not be inside a transaction already (a psycopg or psycopg2 connection in
non-autocommit mode that ran a statement since its last commit, say): a transaction cannot be
redone from its middle, so that raises :class:`TransactionInProgressError` without running
``fn``. A sqlite3 connection opened with ``autocommit=False`` (3.12+) is always inside a
transaction, and SQLite cannot say whether that transaction holds writes: it counts as idle
while no row has changed on it (``total_changes``) since it was opened or since
``run_transaction`` last committed or rolled back on it, since a rollback would otherwise
discard the application's own uncommitted writes. The writes the application commits itself
on such a connection make it refuse too (its ``commit()`` cannot be seen), and schema changes,
which SQLite does not count, go unseen.

``fn`` must be a plain function for ``run_transaction`` and return an awaitable for
``run_transaction_async``; anything else raises :class:`~otel_raptor.errors.ConfigError`
(``run_transaction`` checks an ``async def`` before it opens the transaction, and rolls back
when ``fn`` returns an awaitable all the same).

Retries come out of the server's retry budget and are published as events (``raptor.retries``,
``raptor.recoveries`` with the server's ``db.*`` attributes) like every other retry. The
decision is the attempt loop's, with ``retry_on = {concurrency}`` and the pure rule
:func:`~otel_raptor.core.db.is_transaction_conflict` as the replay judgement. The server's
circuit breaker guards the statements ``fn`` runs (when the driver's integration is
installed), not the transaction itself, so nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from otel_raptor.core.attempts import LoopSpec
from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.db import is_transaction_conflict
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import ConfigError
from otel_raptor.integrations.db._common import DbTarget, Server
from otel_raptor.integrations.db.psycopg2 import IN_WITH_BLOCK
from otel_raptor.runtime.classifying import classify
from otel_raptor.runtime.downstream import Route
from otel_raptor.runtime.drive import CallHooks, CallPlan, is_async_callable, run_async, run_sync
from otel_raptor.runtime.forksafe import LockBox
from otel_raptor.runtime.state import Runtime, get_runtime

__all__ = [
    "TransactionInProgressError",
    "run_transaction",
    "run_transaction_async",
]

T = TypeVar("T")

_CONCURRENCY: Final = frozenset({ErrorCategory.CONCURRENCY})
_IDLE: Final = 0  # libpq's PQTRANS_IDLE, psycopg2's TRANSACTION_STATUS_IDLE
_MYSQL_IN_TRANSACTION: Final = 1  # SERVER_STATUS_IN_TRANS
_MAX_PLANS: Final = 256
_TARGET: Final = "_otel_raptor_db"
# sqlite3 with ``autocommit=False``: ``total_changes`` when the connection was last known to
# hold no uncommitted rows. On the connection when it takes attributes (a subclass, such as
# the integration's), else by ``id``: a plain ``sqlite3.Connection`` takes neither
# attributes nor weak references.
_CLEAN_CHANGES: Final = "_otel_raptor_clean_changes"
_MAX_CLEAN_MARKS: Final = 4096
_clean_changes: dict[int, int] = {}


class TransactionInProgressError(ValueError):
    """``run_transaction`` was given a connection that is inside a transaction already."""


class _TransactionHooks(CallHooks):
    """A failed transaction may run again only after a conflict (it was rolled back whole)."""

    __slots__ = ()

    def replay_after(
        self, failure: BaseException, classification: Classification, args: tuple[Any, ...]
    ) -> bool:
        return is_transaction_conflict(classification)


_HOOKS: Final = _TransactionHooks()
_plans: dict[tuple[object, ...], CallPlan] = {}
_plans_box = LockBox()


def _plan(
    runtime: Runtime, server: Server, max_retries: int, base_delay: float, max_delay: float
) -> CallPlan:
    service = runtime.service(server.name)
    # The types are part of the key: True == 1 == 1.0 hash alike, and only the first of the
    # three is validated when its plan is made.
    key = (
        id(runtime),
        service,
        (type(max_retries), max_retries),
        (type(base_delay), base_delay),
        (type(max_delay), max_delay),
    )
    plan = _plans.get(key)
    if plan is not None and plan.route.downstream is runtime.downstream(service):
        return plan
    try:
        policy = RetryPolicy(
            max_retries=max_retries,
            base_delay=base_delay,
            max_delay=max_delay,
            retry_on=_CONCURRENCY,
        )
    except ConfigError as error:  # named as the caller named it: max_retries=, not retry.
        raise ConfigError(error.key.removeprefix("retry."), error.value, error.allowed) from None
    runtime.describe(service, server.attributes)
    # No breaker: the statements inside the transaction already pass the server's breaker.
    route = Route(runtime.downstream(service), None, runtime, classify)
    plan = CallPlan(
        route,
        LoopSpec.of(policy, replay_safe=True),
        runtime=runtime,
        clock=runtime.clock,
        hooks=_HOOKS,
    )
    with _plans_box.lock:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
    return plan


def _installed_runtime(module: str) -> Runtime:
    """The runtime of the driver's installed integration, else the process-wide one."""
    integration = sys.modules.get(f"otel_raptor.integrations.db.{module}")
    state = getattr(integration, "_installed", None)
    runtime = getattr(state, "runtime", None)
    return runtime if isinstance(runtime, Runtime) else get_runtime()


def _known_server(conn: Any) -> Server | None:
    target = getattr(conn, _TARGET, None)
    return target.server if isinstance(target, DbTarget) else None


# --- one adapter per driver ----------------------------------------------------------------------


class _Adapter:
    """How one driver opens, commits and rolls back a transaction."""

    module = ""

    def server(self, conn: Any) -> Server:
        raise NotImplementedError

    def check_idle(self, conn: Any) -> None:
        raise NotImplementedError

    def attempt(self, conn: Any, fn: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    async def attempt_async(self, conn: Any, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        raise NotImplementedError


def _in_progress(conn: Any) -> TransactionInProgressError:
    return TransactionInProgressError(
        f"{type(conn).__name__} is inside a transaction already: commit or roll it back "
        "before run_transaction() (a transaction cannot be run again from its middle)"
    )


def _call(fn: Callable[[Any], T], conn: Any) -> T:
    """``fn(conn)`` for a sync transaction, inside it: an awaitable result rolls it back."""
    result = fn(conn)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never started: no "never awaited" warning
        raise _not_plain(fn)
    return result


async def _await(fn: Callable[[Any], Awaitable[T]], conn: Any) -> T:
    """``await fn(conn)`` for an async transaction, inside it: a plain result rolls it back."""
    result = fn(conn)
    if not inspect.isawaitable(result):
        raise ConfigError(
            "fn",
            fn,
            "a function returning an awaitable for run_transaction_async (use run_transaction "
            f"for a plain one; it returned {type(result).__name__})",
        )
    return await result


def _not_plain(fn: object) -> ConfigError:
    # Its coroutine would be committed as an empty transaction and returned as the result.
    return ConfigError("fn", fn, "a plain function for run_transaction (use run_transaction_async)")


class _Psycopg(_Adapter):
    module = "psycopg"

    def server(self, conn: Any) -> Server:
        from otel_raptor.integrations.db._postgres import server  # noqa: PLC0415

        known = _known_server(conn)
        if known is not None:
            return known
        info = conn.info
        return server(info.host, info.port, info.dbname)

    def check_idle(self, conn: Any) -> None:
        if conn.info.transaction_status != _IDLE:
            raise _in_progress(conn)

    def attempt(self, conn: Any, fn: Callable[[Any], Any]) -> Any:
        with conn.transaction():
            return _call(fn, conn)

    async def attempt_async(self, conn: Any, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        async with conn.transaction():
            return await _await(fn, conn)


class _Psycopg2(_Adapter):
    module = "psycopg2"

    def server(self, conn: Any) -> Server:
        from otel_raptor.integrations.db._postgres import server  # noqa: PLC0415

        known = _known_server(conn)
        if known is not None:
            return known
        info = conn.info
        return server(info.host, info.port, info.dbname)

    def check_idle(self, conn: Any) -> None:
        # Inside the app's own ``with conn`` the status stays idle until the first statement.
        if conn.get_transaction_status() != _IDLE or getattr(conn, IN_WITH_BLOCK, False):
            raise _in_progress(conn)

    def attempt(self, conn: Any, fn: Callable[[Any], Any]) -> Any:
        # ``with conn`` begins a transaction even in autocommit mode (psycopg2 >= 2.9), and
        # commits or rolls back at its end.
        with conn:
            return _call(fn, conn)


class _PyMySQL(_Adapter):
    module = "pymysql"

    def server(self, conn: Any) -> Server:
        from otel_raptor.integrations.db.pymysql import _server  # noqa: PLC0415

        return _known_server(conn) or _server(conn)

    def check_idle(self, conn: Any) -> None:
        if (conn.server_status or 0) & _MYSQL_IN_TRANSACTION:
            raise _in_progress(conn)

    def attempt(self, conn: Any, fn: Callable[[Any], Any]) -> Any:
        conn.begin()
        try:
            result = _call(fn, conn)
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # a dead connection: the error that killed it
                conn.rollback()
            raise
        return result


class _SQLite(_Adapter):
    module = "sqlite3"

    def server(self, conn: Any) -> Server:
        from otel_raptor.integrations.db.sqlite3 import server_of  # noqa: PLC0415

        known = _known_server(conn)
        if known is not None:
            return known
        try:
            rows = conn.execute("PRAGMA database_list").fetchall()
            path = next((row[2] for row in rows if row[1] == "main"), "") or ":memory:"
        except Exception:  # noqa: BLE001 - only the service name depends on it
            path = ":memory:"
        return server_of(path)

    def check_idle(self, conn: Any) -> None:
        if getattr(conn, "autocommit", None) is not False:
            if conn.in_transaction:
                raise _in_progress(conn)
            return
        # ``autocommit=False`` (3.12+): always in a transaction, and SQLite does not say
        # whether it holds writes. Rows changed since the last commit or rollback seen here
        # may be uncommitted, and a retry's rollback would discard them.
        changes = conn.total_changes
        if changes and changes != _clean_mark(conn):
            raise TransactionInProgressError(
                f"{type(conn).__name__} (autocommit=False) has changed rows since "
                "run_transaction() last ended on it, which a retry could roll back: SQLite "
                "cannot say whether they are committed. Give run_transaction() a connection "
                "of its own, or use autocommit=True or the default transaction control"
            )

    def attempt(self, conn: Any, fn: Callable[[Any], Any]) -> Any:
        autocommit = getattr(conn, "autocommit", None)
        if autocommit is not False:
            # Legacy transaction control or autocommit: open the transaction ourselves, with
            # the isolation the connection asks for (IMMEDIATE/EXCLUSIVE take the write lock
            # at once, which avoids upgrade deadlocks).
            level = conn.isolation_level
            mode = level.upper() if isinstance(level, str) else ""
            conn.execute("BEGIN " + mode if mode in ("IMMEDIATE", "EXCLUSIVE") else "BEGIN")
        # With ``autocommit=False`` (3.12+) a transaction is always open. With
        # ``autocommit=True`` commit() and rollback() do nothing: ours ends by SQL.
        try:
            result = _call(fn, conn)
            if autocommit is True:
                conn.execute("COMMIT")
            else:
                conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                if autocommit is not True:
                    conn.rollback()
                elif conn.in_transaction:  # SQLite may have rolled it back already
                    conn.execute("ROLLBACK")
                if autocommit is False:
                    _mark_clean(conn)
            raise
        if autocommit is False:
            _mark_clean(conn)
        return result


def _clean_mark(conn: Any) -> int | None:
    mark = getattr(conn, _CLEAN_CHANGES, None)
    return mark if isinstance(mark, int) else _clean_changes.get(id(conn))


def _mark_clean(conn: Any) -> None:
    """Remember that ``conn`` holds no uncommitted row now (it was just committed or rolled
    back)."""
    changes = conn.total_changes
    try:
        setattr(conn, _CLEAN_CHANGES, changes)
    except (AttributeError, TypeError):
        with _plans_box.lock:
            # By id: another connection may come to have it, but its own changes would
            # have to reach this count exactly for the mark to let it through.
            _clean_changes.pop(id(conn), None)
            if len(_clean_changes) >= _MAX_CLEAN_MARKS:
                del _clean_changes[next(iter(_clean_changes))]
            _clean_changes[id(conn)] = changes


class _Asyncpg(_Adapter):
    module = "asyncpg"

    def server(self, conn: Any) -> Server:
        from otel_raptor.integrations.db._postgres import server  # noqa: PLC0415

        con = getattr(conn, "_con", None) or conn  # a pool's connection proxy
        address = con._addr
        database = con._params.database
        if isinstance(address, tuple):
            return server(str(address[0]), address[1], database)
        return server(str(address), None, database)

    def check_idle(self, conn: Any) -> None:
        if conn.is_in_transaction():
            raise _in_progress(conn)

    async def attempt_async(self, conn: Any, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        async with conn.transaction():
            return await _await(fn, conn)


def _adapter(conn: Any, *, asynchronous: bool) -> _Adapter:
    modules = sys.modules
    if asynchronous:
        psycopg = modules.get("psycopg")
        if psycopg is not None and isinstance(conn, psycopg.AsyncConnection):
            return _Psycopg()
        asyncpg = modules.get("asyncpg")
        if asyncpg is not None:
            from asyncpg.pool import PoolConnectionProxy  # noqa: PLC0415

            if isinstance(conn, (asyncpg.Connection, PoolConnectionProxy)):
                return _Asyncpg()
        raise TypeError(
            f"run_transaction_async() takes a psycopg AsyncConnection or an asyncpg "
            f"Connection, not {type(conn).__qualname__}"
        )
    psycopg = modules.get("psycopg")
    if psycopg is not None and isinstance(conn, psycopg.Connection):
        return _Psycopg()
    psycopg2 = modules.get("psycopg2.extensions")
    if psycopg2 is not None and isinstance(conn, psycopg2.connection):
        return _Psycopg2()
    pymysql = modules.get("pymysql.connections")
    if pymysql is not None and isinstance(conn, pymysql.Connection):
        return _PyMySQL()
    sqlite3 = modules.get("sqlite3")
    if sqlite3 is not None and isinstance(conn, sqlite3.Connection):
        return _SQLite()
    raise TypeError(
        "run_transaction() takes a psycopg, psycopg2, PyMySQL or sqlite3 connection, not "
        f"{type(conn).__qualname__}"
    )


def run_transaction(
    conn: Any,
    fn: Callable[[Any], T],
    *,
    max_retries: int = 5,
    base_delay: float = 0.01,
    max_delay: float = 1.0,
) -> T:
    """Run ``fn(conn)`` in a transaction and commit it; after a conflict, roll back, back off
    and run it again (see the module docstring).

    ``max_retries`` (integer >= 0, default 5) bounds the runs after the first;
    ``base_delay`` (seconds >= 0, default 0.01) and ``max_delay`` (seconds >= base_delay,
    default 1.0) shape the full-jitter exponential backoff between runs. Bad values raise
    :class:`~otel_raptor.errors.ConfigError`, and so does an ``async def`` ``fn`` (before
    any transaction is opened). Returns ``fn``'s result; raises ``fn``'s (or the commit's)
    error unchanged, :class:`TransactionInProgressError` when ``conn`` is in a transaction
    already, ``TypeError`` for a connection of another driver.
    """
    if is_async_callable(fn):
        raise _not_plain(fn)
    adapter = _adapter(conn, asynchronous=False)
    adapter.check_idle(conn)
    plan = _plan(
        _installed_runtime(adapter.module),
        adapter.server(conn),
        max_retries,
        base_delay,
        max_delay,
    )
    result: T = run_sync(plan, adapter.attempt, (conn, fn), {})
    return result


async def run_transaction_async(
    conn: Any,
    fn: Callable[[Any], Awaitable[T]],
    *,
    max_retries: int = 5,
    base_delay: float = 0.01,
    max_delay: float = 1.0,
) -> T:
    """:func:`run_transaction` for a psycopg ``AsyncConnection`` or an asyncpg ``Connection``
    (or a pool's connection): ``fn(conn)`` is awaited, and so are the backoffs. When it
    returns no awaitable, the transaction is rolled back and
    :class:`~otel_raptor.errors.ConfigError` raised."""
    adapter = _adapter(conn, asynchronous=True)
    adapter.check_idle(conn)
    plan = _plan(
        _installed_runtime(adapter.module),
        adapter.server(conn),
        max_retries,
        base_delay,
        max_delay,
    )
    result: T = await run_async(plan, adapter.attempt_async, (conn, fn), {})
    return result
