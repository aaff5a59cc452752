"""The PyMySQL integration: a breaker per server, safe retries, a default statement timeout.

What it hooks (PyMySQL is pure Python: its classes are patched, and the application keeps its
real ``pymysql.connections.Connection`` and cursor objects):

- ``Connection.connect`` (which ``pymysql.connect(...)`` calls while building the connection,
  and ``ping(reconnect=True)`` calls to reconnect): the ``connect`` plan, always replay safe.
  After connecting, the server's default statement timeout is set where the session has none
  (MariaDB ``max_statement_time``, MySQL ``max_execution_time``, which MySQL applies to
  ``SELECT`` only) and the application's ``init_command`` chose none, ``0`` included. That
  query is part of the connect: a link it loses fails the attempt, which is connected again.
- ``Cursor.execute`` (every cursor class derives from it): the ``statement`` plan in
  autocommit mode with no transaction open, else the ``locked`` plan. PyMySQL's default is
  ``autocommit=False``, where every statement is inside a transaction: then nothing is
  replayed (use :func:`otel_raptor.db.run_transaction` for whole transactions).
  The connect hook stamps the connection with the time it opened (a reconnect by
  ``ping(reconnect=True)`` stamps it again): a statement sent within a second of it that
  loses its link confirms an outage (behind ProxySQL whose server is dead, every connect
  succeeds and every first statement fails), read on the failure path only.
- ``Cursor.executemany`` and ``Cursor.callproc``: the ``locked`` plan (never replayed).
  Statements a guarded call runs itself (``executemany``'s own ``execute`` calls,
  ``init_command`` while connecting) pass straight through.

The contrib pymysql instrumentation hands out proxy objects around the real connection and
cursors; their calls reach the patched classes, so retries happen inside its span. See
``docs/databases.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Final

from otel_raptor.core.classification import Classification
from otel_raptor.core.db import FailurePoint, conflict_code
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import call, library_error
from otel_raptor.integrations._wrapping import same_parameters
from otel_raptor.integrations.db._common import (
    DbIntegration,
    DbState,
    DbTarget,
    HookSet,
    Server,
    failed_midway,
    is_not_sent,
    mark_not_sent,
    mark_opened,
    method_commits_partway,
    method_read_only,
    method_unguarded,
    opened_at,
    refusal_factory,
)
from otel_raptor.runtime.drive import CLOSED, CallPlan, count_success, resume_sync
from otel_raptor.runtime.forksafe import LockBox
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import pymysql as _pymysql

    class PyMySQLCircuitOpen(CircuitOpenError, _pymysql.err.OperationalError):  # type: ignore[misc]
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = ["PyMySQLCircuitOpen", "PyMySQLIntegration", "circuit_open_error_type"]

#: The semantic-convention ``db.system.name`` (MariaDB included: the service name must not
#: depend on what the server turns out to be once connected).
SYSTEM: Final = "mysql"
#: The attribute under which a connection keeps its target.
TARGET_ATTRIBUTE: Final = "_otel_raptor_db"
#: ``CR_CONN_HOST_ERROR``: what PyMySQL raises when it cannot connect; the fail-fast error
#: carries it too, for code that reads ``error.args[0]``.
CONNECT_ERROR: Final = 2003
_IN_TRANSACTION: Final = 1  # SERVER_STATUS_IN_TRANS
# Server errors after which the session is gone: shutdown in progress, connection killed,
# disconnected for inactivity.
_GONE: Final = frozenset({1053, 1927, 4031})
#: The built-in rule for ProxySQL's reply that it could not reach a server of the statement's
#: hostgroup (9001, 9002).
_PROXY_UNREACHABLE_RULE: Final = "mysql.proxy_unreachable"

# Set while a guarded call runs: statements it makes itself pass straight through.
_inside: ContextVar[bool] = ContextVar("otel_raptor_pymysql_inside", default=False)
# How many guarded calls (in any thread) have ``_inside`` set now: while none has, no running
# context has it set, and ``execute`` (every statement) skips reading it. Changed under the
# lock only (``_mark``/``_unmark``: connects and batches, never a plain statement), read
# without it: a thread always sees its own increments, and another thread's marks are in
# another context. (A context copied inside a guarded batch and entered after it ended is
# the one difference: its statements are guarded, not passed through as if still inside.)
_marks = 0
_marks_box = LockBox()


def _mark() -> Token[bool]:
    """Set ``_inside`` in this context, counted in ``_marks``; undone by :func:`_unmark`."""
    global _marks  # noqa: PLW0603 - a count shared by every thread
    with _marks_box.lock:
        _marks += 1
    return _inside.set(True)


def _unmark(token: Token[bool]) -> None:
    global _marks  # noqa: PLW0603
    _inside.reset(token)
    with _marks_box.lock:
        _marks -= 1


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when a MySQL server's breaker is open: both
    :class:`~otel_raptor.errors.CircuitOpenError` and ``pymysql.err.OperationalError``
    (``args[0]`` is ``2003``, as for any connection failure)."""
    import pymysql  # noqa: PLC0415 - the library is imported only when needed

    return library_error(
        CircuitOpenError, pymysql.err.OperationalError, "PyMySQLCircuitOpen", __name__
    )


def __getattr__(name: str) -> Any:
    if name == "PyMySQLCircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def failure_point(
    error: BaseException, classification: Classification
) -> tuple[FailurePoint, bool]:
    """How far a failed PyMySQL call got, and whether its connection can still send."""
    if is_not_sent(error):
        return FailurePoint.NOT_SENT, True
    if conflict_code(classification) is not None:
        return FailurePoint.ROLLED_BACK, True
    args = getattr(error, "args", ())
    number = args[0] if args else None
    if type(number) is int and (1000 <= number < 2000 or number >= 3000):
        # A server error: the connection survived, unless the server ended the session.
        return (FailurePoint.UNKNOWN, False) if number in _GONE else (FailurePoint.FAILED, True)
    # Client errors (2000-2999: lost connection, server gone away, ...), PyMySQL's
    # "connection already closed" (0) and anything else: the answer never arrived.
    return FailurePoint.UNKNOWN, False


def _refine(failure: BaseException, classification: Classification) -> Classification:
    """The ``refine`` hook: ProxySQL in front of dead servers answers the login itself, then
    each statement, once its connect timeout passes, with error 9001 (or 9002 when its
    connect retries ran out), keeping the client's link. The statement never reached a
    server: it may be sent again as any unsent one, and the proxy's failed connect counts at
    once, as a refused reconnect of ours (:func:`~._common.lost_connection`). Unclassified,
    it never opened the breaker; read as a lost connection, each successful connect through
    the proxy would have dropped it."""
    if classification.rule == _PROXY_UNREACHABLE_RULE:
        mark_not_sent(failure)
    return classification


class _State(DbState):
    __slots__ = ()


_installed: _State | None = None


def _server(conn: Any) -> Server:
    database = conn.db
    if isinstance(database, bytes):
        database = database.decode(getattr(conn, "encoding", None) or "utf-8", "replace")
    socket_path = getattr(conn, "unix_socket", None)
    if socket_path:
        return Server(SYSTEM, str(socket_path), None, database or None)
    return Server(SYSTEM, str(conn.host).lower(), int(conn.port), database or None)


def _target(state: _State, conn: Any) -> DbTarget:
    target: DbTarget | None = getattr(conn, TARGET_ATTRIBUTE, None)
    if target is None or target.owner is not state:
        target = state.target(_server(conn))
        setattr(conn, TARGET_ATTRIBUTE, target)
    return target


# The session variables that bound a statement's time: MariaDB's, MySQL's.
_TIMEOUT_VARIABLES: Final = ("max_statement_time", "max_execution_time")


def _chose_a_timeout(conn: Any) -> bool:
    """Whether the application's ``init_command`` sets a statement timeout, ``0`` included:
    the session's value alone cannot tell an explicit ``0`` ("none", on purpose) from none."""
    command = getattr(conn, "init_command", None)
    if isinstance(command, bytes):
        command = command.decode("utf-8", "replace")
    if not isinstance(command, str):
        return False
    command = command.lower()
    return any(name in command for name in _TIMEOUT_VARIABLES)


def _statement_timeout_query(conn: Any, target: DbTarget) -> str | None:
    seconds = target.statement_timeout
    if seconds <= 0 or _chose_a_timeout(conn):
        return None
    # Only where both the session and the server's global value are 0: a session at 0 under a
    # non-zero global was set so on purpose (the server's ``init_connect``, say). A global 0
    # set in the server's configuration reads the same as the built-in default, though.
    if "mariadb" in str(conn.get_server_info()).lower():
        return (
            "SET @@SESSION.max_statement_time = IF(@@SESSION.max_statement_time = 0 "
            f"AND @@GLOBAL.max_statement_time = 0, {seconds:.6f}, @@SESSION.max_statement_time)"
        )
    ms = max(1, round(seconds * 1000))
    return (
        "SET @@SESSION.max_execution_time = IF(@@SESSION.max_execution_time = 0 "
        f"AND @@GLOBAL.max_execution_time = 0, {ms}, @@SESSION.max_execution_time)"
    )


def _lost_while_connecting(conn: Any, failure: Exception) -> bool:
    """Whether the statement-timeout query's ``failure`` lost the connection it was sent on
    (PyMySQL dropped its socket: ``open`` is false), or the server ended the session
    (``_GONE``: a shutdown in progress, which closes the link after its answer): the connect
    did not deliver a usable connection, and is failed (and retried as any failed connect)
    rather than handing the app a closed one, whose first statement would fail for a query
    the app never sent. A session ended so is closed here, its socket released."""
    import pymysql  # noqa: PLC0415 - imported by install()

    try:
        if not isinstance(failure, pymysql.err.Error):
            return False
        if not conn.open:
            return True
        args = failure.args
        if not (args and args[0] in _GONE):
            return False
    except Exception:  # noqa: BLE001 - unknown: the connection is the app's, as before
        return False
    with contextlib.suppress(Exception):
        conn.close()  # PyMySQL's own COM_QUIT, best effort; its next connect reopens it
    return True


def _set_statement_timeout(conn: Any, target: DbTarget) -> None:
    """Run the statement-timeout query on ``conn``, just opened; raise the driver's error
    when it lost the connection (:func:`_lost_while_connecting`)."""
    import pymysql  # noqa: PLC0415 - imported by install()

    try:
        query = _statement_timeout_query(conn, target)
        if query is not None:
            conn.query(query)  # not through a cursor: neither our hook nor tracing sees it
    except Exception as failure:
        if _lost_while_connecting(conn, failure):
            raise  # the driver's own error: the connect plan judges it and connects again
        if isinstance(failure, pymysql.err.Error):
            # The server's (or a proxy's) answer, the link kept (ProxySQL's 9001, a server
            # that does not know the variable): judged and counted once as a statement of
            # this connection, which is the app's.
            with contextlib.suppress(Exception):
                failed_midway(target.locked, failure, (conn,))
        else:
            report_internal_error("pymysql.statement_timeout", failure)


def _opened(failure: BaseException, args: tuple[Any, ...]) -> float | None:
    """The ``opened`` hook: when the connection of the cursor in ``args[0]`` (or the
    connection itself, for the statement-timeout query) opened."""
    owner = args[0]
    return opened_at(getattr(owner, "connection", owner))


def _connect_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The hook on ``Connection.connect``."""
    state = _installed
    if state is None or _inside.get() or args or kwargs.get("sock") is not None:
        return wrapped(*args, **kwargs)  # a socket given by the caller cannot be reused
    try:
        target = _target(state, instance)
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("pymysql.describe_connect", bug)
        return wrapped(*args, **kwargs)
    if not target.enabled:
        return wrapped(*args, **kwargs)

    def connect(*args: Any, **kwargs: Any) -> Any:
        # The statement-timeout query is part of the connect: a link lost there fails this
        # attempt, which the connect plan counts and sends again (nothing of the app's ran).
        result = wrapped(*args, **kwargs)
        mark_opened(instance, target.connect)
        _set_statement_timeout(instance, target)
        return result

    token = _mark()
    try:
        result = call(target.connect, connect, args, kwargs)
    finally:
        _unmark(token)
    # Stamped again once the connect's success is recorded: a lost link on this fresh
    # connection takes that success back only if it opened at or after it (core/breaker.py).
    mark_opened(instance, target.connect)
    return result


def _plan(state: _State, cursor: Any, *, batch: bool) -> CallPlan | None:
    conn = cursor.connection
    target = _target(state, conn)
    if not target.enabled:
        return None
    if batch or not conn.autocommit_mode or (conn.server_status or 0) & _IN_TRANSACTION:
        return target.locked
    return target.statement


def _execute_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Cursor.execute``."""

    def execute(self: Any, query: Any, args: Any = None) -> Any:
        state = _installed
        if state is None or (_marks and _inside.get()):
            return original(self, query, args)
        try:
            # _plan() inlined: this runs for every statement. Nothing that ``execute`` runs
            # calls ``execute`` again, so unlike the batches it needs no ``_inside`` mark.
            conn = self.connection
            try:  # TARGET_ATTRIBUTE read as an attribute: a getattr() call costs more
                target = conn._otel_raptor_db
            except AttributeError:
                target = None
            if target is None or target.owner is not state:
                target = _target(state, conn)
            if not target.enabled:
                plan = None
            elif conn.autocommit_mode and not (conn.server_status or 0) & _IN_TRANSACTION:
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
            report_internal_error("pymysql.describe", bug)
            plan = None
        if plan is None:
            return original(self, query, args)
        if not fast:  # the loop's entry refuses, probes or waits
            return call(plan, original, (self, query, args), {})
        try:
            result = original(self, query, args)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure = exc
        else:
            # count_success inlined where the deposit is all it does (a quiet breaker); it cannot
            # raise: slots set at construction, and ``start`` compared in the try block above.
            if core is not None and core.quiet and start < core._next_check:
                plan.budget._calls += 1
            else:
                count_success(plan, core, start, "pymysql.record_success")
            return result
        return resume_sync(plan, original, (self, query, args), {}, start, failure)

    # PyMySQL's own parameters, not ``*args, **kwargs``: see ``same_parameters``.
    return execute if same_parameters(original, execute) else _hook(original, batch=False)


def _hook(original: Callable[..., Any], *, batch: bool) -> Callable[..., Any]:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None or _inside.get():
            return original(self, *args, **kwargs)
        try:
            plan = _plan(state, self, batch=batch)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("pymysql.describe", bug)
            plan = None
        if plan is None:
            return original(self, *args, **kwargs)
        token = _mark()
        try:
            return call(plan, original, (self, *args), kwargs)
        finally:
            _unmark(token)

    return run


def _batch_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Cursor.executemany`` and ``Cursor.callproc``: never replayed."""
    return _hook(original, batch=True)


def _wrapped(pymysql: Any) -> list[tuple[object, str, Any]]:
    from pymysql import connections  # noqa: PLC0415 - imported by install()

    return [(connections.Connection, "connect", _connect_wrapper)]


def _patched(pymysql: Any) -> list[tuple[type, str, Any]]:
    from pymysql import cursors  # noqa: PLC0415 - imported by install()

    return [
        (cursors.Cursor, "execute", _execute_hook),
        (cursors.Cursor, "executemany", _batch_hook),
        (cursors.Cursor, "callproc", _batch_hook),
    ]


class PyMySQLIntegration(DbIntegration):
    """Guards PyMySQL connections and statements (see the module docstring and
    ``docs/databases.md``)."""

    name = "pymysql"
    library = "pymysql"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _State:
        error = refusal_factory(
            library.err.OperationalError,
            "PyMySQLCircuitOpen",
            __name__,
            args=lambda message: (CONNECT_ERROR, message),
        )
        return _State(
            settings,
            error=error,
            point=failure_point,
            refine=_refine,
            read_only=method_read_only,
            partway=method_commits_partway,
            unguarded=method_unguarded,
            opened=_opened,
        )

    def hooks(self, library: Any) -> HookSet:
        return _wrapped(library), _patched(library)
