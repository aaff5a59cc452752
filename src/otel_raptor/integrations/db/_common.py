"""What every database integration shares: servers, targets, plans, hooks and refusals.

A *server* (:class:`Server`) is what one breaker covers: the database system
(``db.system.name``), the server's address and port, and the database (``db.namespace``).
Its service name is ``system://host:port/database`` (``postgresql://10.0.0.5:5432/orders``;
``sqlite:/var/lib/app.db``): never a user name, a password or any other part of a DSN.

A :class:`DbTarget` is one server as an installed integration sees it: the kit's
:class:`~otel_raptor.integrations._kit.Target` (service name folded by the runtime, the shared
breaker, the semantic-convention attributes telemetry adds to its metric points) and three
call plans, chosen per call by the driver module:

- ``connect``: opening a connection; always replay safe (nothing was executed);
- ``statement``: one statement (or Redis command) outside any transaction; replay safety is
  judged *per failure* by :class:`StatementHooks` with the pure rule of
  :func:`otel_raptor.core.db.replay_safe_after`;
- ``locked``: a statement inside a transaction, or a batch (``executemany``, a pipeline that
  writes): never replayed. The breaker still counts it;
- ``reads``: a statement that opens a transaction implicitly when it writes (sqlite3's legacy
  transaction control): replayed only when it is read-only, as ``statement`` judges;
- ``cluster``: as ``locked``, for a client that reconnects where raptor cannot see it (a
  Redis cluster client rereads its slot table from every node): a lost connection counts at
  once, since no reconnect of ours would ever confirm it (see :func:`lost_connection`).

A database's breaker never counts a conflict (``concurrency``: serialization failures,
deadlocks, lock wait timeouts, SQLite busy, Redis ``WatchError``) against the server's
health: it is a healthy server answering "not now". A statement that lost its connection
counts only once a failed reconnect confirms the server is gone (:func:`lost_connection`).
Its other rules are the configured ones.

Refusals: an open breaker raises the driver's own error class mixed with
:class:`~otel_raptor.errors.CircuitOpenError` (:func:`refusal_factory`), so existing
``except psycopg.OperationalError`` (or ``redis.ConnectionError``, ...) clauses keep working.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, NoReturn

from otel_raptor.config import DownstreamPolicy
from otel_raptor.core.attempts import LoopSpec, Refusal
from otel_raptor.core.breaker import CircuitBreakerConfig
from otel_raptor.core.classification import Classification, ErrorCategory, Severity
from otel_raptor.core.db import FailurePoint, Operation, replay_safe_after
from otel_raptor.core.replay import (
    sql_ends_transaction,
    sql_may_commit_partway,
    sql_replay_safe,
)
from otel_raptor.core.retry import RetryPolicy
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import (
    MAX_TARGETS,
    HookedIntegration,
    Target,
    library_error,
)
from otel_raptor.integrations._wrapping import HookSet
from otel_raptor.runtime.clock import Clock
from otel_raptor.runtime.drive import CallHooks, CallPlan, resume_sync
from otel_raptor.runtime.forksafe import LockBox, register_lock
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.telemetry.instruments import (
    ATTR_DB_NAMESPACE,
    ATTR_DB_SYSTEM_NAME,
    ATTR_SERVER_ADDRESS,
    ATTR_SERVER_PORT,
)

__all__ = [
    "GUARDED_ATTRIBUTE",
    "LOST_BEFORE_SENDING_ATTRIBUTE",
    "NOT_SENT_ATTRIBUTE",
    "OPENED_ATTRIBUTE",
    "DbHooks",
    "DbIntegration",
    "DbState",
    "DbTarget",
    "GuardedConnectionClasses",
    "HookSet",
    "PointOf",
    "ReadOnlyOf",
    "Server",
    "StatementHooks",
    "callers_limit",
    "failed_midway",
    "is_failed_reconnect",
    "is_not_sent",
    "lost_connection",
    "mark_not_sent",
    "mark_opened",
    "not_the_servers",
    "method_commits_partway",
    "method_read_only",
    "method_unguarded",
    "opened_at",
    "policy_timeout_ms",
    "refusal_factory",
    "sql_commits_partway",
    "sql_read_only",
    "sql_unguarded",
]

#: When (the runtime clock's monotonic seconds) raptor saw a connection open: set on the
#: connection by :func:`mark_opened`, read back by :func:`opened_at`.
OPENED_ATTRIBUTE: Final = "_otel_raptor_opened"

#: Marks an exception raised before anything reached the server (set by the hooks that see
#: the connection being opened, e.g. redis-py reconnecting for a command).
NOT_SENT_ATTRIBUTE: Final = "_otel_raptor_not_sent"
#: Marks a not-sent exception met on a connection that was already open (see
#: :func:`mark_not_sent`).
LOST_BEFORE_SENDING_ATTRIBUTE: Final = "_otel_raptor_lost_before_sending"

_STATEMENT: Final = Operation.STATEMENT
_BATCH: Final = Operation.BATCH
_ROLLED_BACK: Final = FailurePoint.ROLLED_BACK
_CONNECTION: Final = ErrorCategory.CONNECTION
#: ``Classification.code`` of failures that mean the server cannot be reached at all: never
#: a connection the server closed.
_UNREACHABLE_CODES: Final = frozenset(
    {"ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "EHOSTDOWN", "ENETDOWN"}
)

#: ``(failure, classification) -> (failure point, can the client send again)``.
PointOf = Callable[[BaseException, Classification], tuple[FailurePoint, bool]]
#: ``positional args of the call -> is it free of side effects``.
ReadOnlyOf = Callable[[tuple[Any, ...]], bool]


def callers_limit(classification: Classification, rule: str) -> Classification:
    """``classification`` of a timeout that is the caller's own limit (a statement timeout, a
    blocking command's wait), not a sign of the server's health: ``cancelled``, never counted
    against the breaker nor retried; ``rule`` says which."""
    return not_the_servers(classification, ErrorCategory.CANCELLED, rule)


def not_the_servers(
    classification: Classification, category: ErrorCategory, rule: str
) -> Classification:
    """``classification`` of a failure the integration knows is the call's own doing, not the
    server's state: ``category`` (one the breaker ignores), low severity, never retried;
    ``rule`` says which."""
    return replace(
        classification, category=category, severity=Severity.LOW, retryable=False, rule=rule
    )


def ended_by_server(classification: Classification, rule: str) -> Classification:
    """``classification`` of a statement that found its session ended by the server (an
    administrator's ``pg_terminate_backend``, a reaper of idle connections, a shutdown):
    ``unconfirmed`` (see :func:`lost_connection`). ``rule`` says which."""
    return replace(classification, unconfirmed=True, rule=rule)


def lost_connection(
    refine: Callable[[BaseException, Classification], Classification] | None,
) -> Callable[[BaseException, Classification], Classification]:
    """The ``refine`` hook of statements: ``refine`` (the driver's), then a statement that
    lost its connection after it was opened is ``unconfirmed``
    (:attr:`~otel_raptor.core.classification.Classification.unconfirmed`). On its own it
    cannot tell a server that went down from one that reaped the pool's idle sessions
    (``idle_session_timeout``, MySQL's ``wait_timeout``, a DBA's ``pg_terminate_backend``,
    Redis's ``timeout``), which serves every new connection: counted, the first burst after a
    quiet spell opened a healthy server's breaker. The reconnect that follows tells them
    apart: refused, it counts, and the lost connections with it; opened, they are dropped.
    A failure raised while opening a connection before anything was sent (Redis
    reconnecting inside a command: :func:`is_failed_reconnect`; not a health check's
    ``PING`` on a connection that was open), and one that says the server cannot be reached
    (``ECONNREFUSED``, an unreachable host or network: a client reconnecting inside the
    call, as a Redis cluster does), is that reconnect, and counts as it is."""

    def refined(failure: BaseException, classification: Classification) -> Classification:
        if refine is not None:
            classification = refine(failure, classification)
        if (
            classification.category is _CONNECTION
            and classification.code not in _UNREACHABLE_CODES
            and not classification.unconfirmed
            and not classification.live_refusal
            and not is_failed_reconnect(failure)
        ):
            return replace(classification, unconfirmed=True)
        return classification

    return refined


def _never_sent_again(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("a call that failed midway is never sent again")


def failed_midway(plan: CallPlan, failure: Exception, args: tuple[Any, ...]) -> NoReturn:
    """Judge ``failure``, met partway through a call whose start ``plan`` (a plan that never
    replays: ``locked``) already admitted, such as a row of a stream or the end of a
    ``COPY``, then raise it: classified, counted against the breaker once (its lost
    connections unconfirmed, as for any statement) and published, as the first failed
    attempt of a call; never sent again, never refused. ``args`` are the call's positional
    arguments, for the hooks. Sync and async callers alike: no attempt, so no sleep."""
    try:
        resume_sync(plan, _never_sent_again, args, {}, plan.monotonic(), failure)
    except Exception as raised:  # noqa: BLE001 - the failure itself, or our bug
        if raised is not failure:  # our bug: the app gets its own error, as without us
            report_internal_error("db.failed_midway", raised)
    raise failure


def mark_opened(conn: Any, plan: CallPlan | Clock) -> None:
    """Stamp ``conn``, just opened, with the time (``plan``'s clock, or a clock) it opened at: a
    statement sent on it within a second that loses its link confirms an outage (see
    :data:`~otel_raptor.core.breaker.FRESH_CONNECTION_S`). Connections that refuse
    attributes are left unstamped."""
    try:
        setattr(conn, OPENED_ATTRIBUTE, plan.monotonic())
    except Exception:  # noqa: BLE001 - unknown, as for a connection opened before us
        return


def opened_at(conn: Any) -> float | None:
    """When ``conn`` was opened (:func:`mark_opened`), or ``None``: unknown."""
    value = getattr(conn, OPENED_ATTRIBUTE, None)
    return value if isinstance(value, float) else None


def mark_not_sent(error: BaseException, *, on_open_connection: bool = False) -> None:
    """Record that ``error`` was raised before anything of the call reached the server.
    ``on_open_connection``: on a connection that was already open, which was found lost
    (redis-py's health-check ``PING`` on an idle connection the server closed): the call
    may be sent again as any unsent one, yet the failure is a lost connection, held
    unconfirmed (:func:`lost_connection`), not a failed reconnect, which counts as it is.
    A later mark without it (the failure turns out to be raised while opening the
    connection) makes it a failed reconnect."""
    try:
        setattr(error, NOT_SENT_ATTRIBUTE, True)
        setattr(error, LOST_BEFORE_SENDING_ATTRIBUTE, on_open_connection)
    except Exception:  # noqa: BLE001 - an exception refusing attributes: simply unmarked
        return


def is_not_sent(error: BaseException) -> bool:
    """Whether ``error`` was marked by :func:`mark_not_sent`."""
    return getattr(error, NOT_SENT_ATTRIBUTE, False) is True


def is_failed_reconnect(error: BaseException) -> bool:
    """Whether ``error`` was marked by :func:`mark_not_sent` as raised while a connection
    was being opened (not ``on_open_connection``)."""
    return (
        getattr(error, NOT_SENT_ATTRIBUTE, False) is True
        and getattr(error, LOST_BEFORE_SENDING_ATTRIBUTE, False) is not True
    )


def sql_read_only(args: tuple[Any, ...]) -> bool:
    """Whether the statement in ``args[0]`` (``str`` or ``bytes``; anything else, such as a
    composed query object, counts as unknown) is a single read-only statement
    (:func:`~otel_raptor.core.replay.sql_replay_safe` outside a transaction)."""
    statement = args[0] if args else None
    if not isinstance(statement, (str, bytes)):
        return False
    return sql_replay_safe(statement, in_transaction=False)


def method_read_only(args: tuple[Any, ...]) -> bool:
    """:func:`sql_read_only` for the arguments of an unbound method call
    (``(cursor, statement, ...)``): the statement is ``args[1]``."""
    return sql_read_only(args[1:])


def sql_commits_partway(args: tuple[Any, ...]) -> bool:
    """Whether the statement in ``args[0]`` may have committed part of its work when it
    failed (a ``CALL``, a ``DO`` block, or a statement that cannot be read:
    :func:`~otel_raptor.core.replay.sql_may_commit_partway`): a batch, never replayed."""
    return sql_may_commit_partway(args[0] if args else None)


def method_commits_partway(args: tuple[Any, ...]) -> bool:
    """:func:`sql_commits_partway` for the arguments of an unbound method call
    (``(cursor, statement, ...)``): the statement is ``args[1]``."""
    return sql_commits_partway(args[1:])


def sql_unguarded(args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> bool:
    """``CallHooks.unguarded`` of SQL statements: the statement in ``args[0]`` ends a
    transaction (:func:`~otel_raptor.core.replay.sql_ends_transaction`) or is empty, so a
    breaker that is not closed lets it through unrefused and uncounted, as without raptor.
    Refused, a ``ROLLBACK`` or ``COMMIT`` would leave the connection inside its transaction,
    and the empty statement with which a pool checks that a connection is alive (psycopg_pool's
    ``check_connection``) would make the pool throw a healthy connection away."""
    if not args:
        return False
    statement = args[0]
    if isinstance(statement, (str, bytes)) and not statement:
        return True
    return sql_ends_transaction(statement)


def method_unguarded(args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> bool:
    """:func:`sql_unguarded` for the arguments of an unbound method call
    (``(cursor, statement, ...)``): the statement is ``args[1]``. ``kwargs`` (the call's
    keyword arguments, as ``CallHooks.unguarded`` is given them) are not read."""
    return sql_unguarded(args[1:])


@dataclass(frozen=True, slots=True)
class Server:
    """One database server (and database) as a breaker sees it.

    ``system`` is the semantic-convention ``db.system.name`` (``postgresql``, ``mysql``,
    ``redis``, ``sqlite``); ``host`` a host name, an IP address or a Unix socket path (empty
    for SQLite); ``port`` ``None`` for sockets and SQLite; ``database`` the database name, the
    Redis database number, or the SQLite file.
    """

    system: str
    host: str
    port: int | None
    database: str | None

    @property
    def name(self) -> str:
        """The service (and breaker) name: ``system://host:port/database``."""
        if not self.host:
            return f"{self.system}:{self.database or ''}"
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("/") else self.host
        authority = host if self.port is None else f"{host}:{self.port}"
        return f"{self.system}://{authority}/{self.database or ''}"

    @property
    def attributes(self) -> dict[str, str | int]:
        """The semantic-convention attributes of this server."""
        attributes: dict[str, str | int] = {ATTR_DB_SYSTEM_NAME: self.system}
        if self.host:
            attributes[ATTR_SERVER_ADDRESS] = self.host
        if self.port is not None:
            attributes[ATTR_SERVER_PORT] = self.port
        if self.database:
            attributes[ATTR_DB_NAMESPACE] = self.database
        return attributes


def refusal_factory(
    library: type[BaseException],
    name: str,
    module: str,
    *,
    args: Callable[[str], tuple[Any, ...]] | None = None,
) -> Callable[[Refusal], BaseException]:
    """A function building the fail-fast error of a driver: both
    :class:`~otel_raptor.errors.CircuitOpenError` and ``library`` (class ``name`` in
    ``module``). ``args``, given the message, returns the ``args`` the driver's own errors
    carry (PyMySQL: ``(2003, message)``)."""
    error_type = library_error(CircuitOpenError, library, name, module)

    def build(refusal: Refusal) -> BaseException:
        error: BaseException = error_type(refusal.name, refusal.retry_after)
        if args is not None:
            error.args = args(str(error))
        return error

    return build


class DbHooks(CallHooks):
    """A database call's hooks: refusals are the driver's fail-fast error, and the retry
    policy's ``attempt_timeout`` is not applied (the statement timeout bounds a statement,
    sync or async alike; a blocking command such as ``BLPOP`` waits as long as it was told).
    ``sleeps_on_event_loop`` is ``False`` (see :class:`CallHooks`), unless the driver has
    retries of its own that raptor turns off (redis-py): those would have slept on the loop
    too, and a call that ended unslept would fail where without raptor it was retried."""

    __slots__ = ("_error", "opened", "refine", "sleeps_on_event_loop", "unguarded", "unjudged")

    wait_for_attempts = False

    def __init__(
        self,
        error: Callable[[Refusal], BaseException],
        refine: Callable[[BaseException, Classification], Classification] | None = None,
        unjudged: Callable[[Exception, tuple[Any, ...]], bool] | None = None,
        unguarded: Callable[[tuple[Any, ...], dict[str, Any]], bool] | None = None,
        opened: Callable[[BaseException, tuple[Any, ...]], float | None] | None = None,
    ) -> None:
        self.sleeps_on_event_loop = False
        self._error = error
        self.refine = refine
        self.unjudged = unjudged
        self.unguarded = unguarded
        self.opened = opened

    def refusal(self, refusal: Refusal) -> BaseException:
        return self._error(refusal)


class StatementHooks(DbHooks):
    """The hooks of a statement outside any transaction: replay safety is judged per failure
    (see the module docstring). ``point`` tells how far the failed call got; ``read_only``
    whether it was free of side effects (asked only when that matters). With
    ``writes_in_transaction`` a statement that is not read-only counts as inside a
    transaction (sqlite3's legacy mode opens one implicitly before a write). ``partway``
    tells a statement that may have committed part of its work before failing (a
    ``CALL``; ``None``: none does): a batch, never replayed."""

    __slots__ = ("_partway", "_point", "_read_only", "_writes_in_transaction")

    def __init__(
        self,
        error: Callable[[Refusal], BaseException],
        point: PointOf,
        read_only: ReadOnlyOf,
        *,
        partway: ReadOnlyOf | None = None,
        writes_in_transaction: bool = False,
        refine: Callable[[BaseException, Classification], Classification] | None = None,
        unjudged: Callable[[Exception, tuple[Any, ...]], bool] | None = None,
        unguarded: Callable[[tuple[Any, ...], dict[str, Any]], bool] | None = None,
        opened: Callable[[BaseException, tuple[Any, ...]], float | None] | None = None,
    ) -> None:
        super().__init__(error, refine, unjudged, unguarded, opened)
        self._point = point
        self._read_only = read_only
        self._partway = partway
        self._writes_in_transaction = writes_in_transaction

    def replay_after(
        self, failure: BaseException, classification: Classification, args: tuple[Any, ...]
    ) -> bool:
        if self._writes_in_transaction and not self._read_only(args):
            return False
        point, can_send = self._point(failure, classification)
        read_only = point in (FailurePoint.FAILED, FailurePoint.UNKNOWN) and self._read_only(args)
        partway = self._partway
        operation = (
            _BATCH
            if point is _ROLLED_BACK and partway is not None and partway(args)
            else _STATEMENT
        )
        return replay_safe_after(
            operation, point, in_transaction=False, read_only=read_only, can_send=can_send
        )


@dataclass(frozen=True, slots=True)
class _Policy:
    retry: RetryPolicy
    breaker: CircuitBreakerConfig


#: What a database failure must be to count against its server's breaker: evidence that the
#: server cannot be reached or cannot serve (refused, lost, timed out, shutting down, out of
#: connections). Anything else the server answers with (a bad statement, a conflict, a
#: cancelled or timed-out statement, an internal error) and anything the client refused by
#: itself (a closed cursor, a bad argument: ``unknown``) says the server is up: an app that
#: makes the same mistake five times must not shut every caller out of a healthy server.
DB_HEALTH_CATEGORIES: Final = frozenset(
    {
        ErrorCategory.CONNECTION,
        ErrorCategory.DNS,
        ErrorCategory.TLS,
        ErrorCategory.TIMEOUT,
        ErrorCategory.UNAVAILABLE,
        ErrorCategory.RESOURCE_EXHAUSTED,
    }
)
_NOT_DB_HEALTH: Final = frozenset(ErrorCategory) - DB_HEALTH_CATEGORIES


def _db_breaker(config: CircuitBreakerConfig) -> CircuitBreakerConfig:
    if config.ignored_categories >= _NOT_DB_HEALTH:
        return config
    return replace(config, ignored_categories=config.ignored_categories | _NOT_DB_HEALTH)


class DbTarget:
    """One server of an installed database integration (see the module docstring).

    ``enabled`` is false when the server's policy says ``enabled = false``: its calls are left
    alone. ``statement_timeout`` is the policy's, in seconds (0: none). ``owner`` is the
    :class:`DbState` that built it, so a target cached on a connection by an earlier
    installation is recognised as stale.

    The *fast lane*: the per-statement hooks (psycopg's ``execute``, PyMySQL's, asyncpg's
    statements, redis-py's ``execute_command``) copy ``drive.run_sync``'s (``run_async``'s)
    fast path inline instead of calling it, and hand anything but a success through a closed
    breaker to ``resume_sync``/``resume_async``. That copy leaves out what no plan here needs:
    ``failure_of`` (every plan's hooks are :class:`DbHooks`, whose results never fail) and the
    first attempt's timeout (``first_kwargs`` and ``wait_for`` are false: :class:`DbHooks`
    neither applies an attempt timeout nor lets the async driver bound one). A plan that ever
    needs them must leave the lane; ``tests/integrations/db/test_fast_lane.py`` checks that
    each hook keeps the fast path's promises.
    """

    __slots__ = (
        "cluster",
        "connect",
        "enabled",
        "locked",
        "owner",
        "policy",
        "reads",
        "server",
        "service",
        "statement",
        "statement_timeout",
    )

    def __init__(self, owner: DbState, server: Server, policy: DownstreamPolicy) -> None:
        self.owner = owner
        self.server = server
        self.policy = policy
        self.enabled = policy.enabled
        self.statement_timeout = policy.statement_timeout
        runtime = owner.runtime
        target = Target(
            server.name,
            _Policy(policy.retry, _db_breaker(policy.breaker)),
            runtime,
            owner.connect_hooks,
            server.attributes,
        )
        self.service = target.service
        self.connect = target.plan(replay_safe=True)
        never = LoopSpec.of(policy.retry, replay_safe=False)
        self.locked = CallPlan(
            target.route, never, runtime=runtime, clock=runtime.clock, hooks=owner.locked_hooks
        )
        self.cluster = CallPlan(
            target.route, never, runtime=runtime, clock=runtime.clock, hooks=owner.cluster_hooks
        )
        spec = LoopSpec.of(policy.retry, replay_safe=True)
        self.statement = CallPlan(
            target.route, spec, runtime=runtime, clock=runtime.clock, hooks=owner.statement_hooks
        )
        self.reads = CallPlan(
            target.route, spec, runtime=runtime, clock=runtime.clock, hooks=owner.reads_hooks
        )


class DbState:
    """The state of one installed database integration: settings, hooks and targets.

    ``error`` builds the driver's fail-fast error from a refusal; ``point``, ``read_only`` and
    ``partway`` feed the per-failure replay judgement (:class:`StatementHooks`); ``refine`` and
    ``unjudged`` (and ``unguarded``, by default :func:`sql_unguarded`) are the statements'
    :class:`~otel_raptor.runtime.drive.CallHooks` hooks; so is ``opened`` (when the
    connection of a call's arguments was opened, stamped by :func:`mark_opened`).
    Targets are kept per :class:`Server` (at most
    :data:`~otel_raptor.integrations._kit.MAX_TARGETS`, then the table starts over; breakers
    and budgets live in the runtime, so nothing is lost).
    """

    __slots__ = (
        "__weakref__",
        "_lock",
        "_targets",
        "cluster_hooks",
        "config",
        "connect_hooks",
        "locked_hooks",
        "reads_hooks",
        "runtime",
        "settings",
        "statement_hooks",
    )

    def __init__(
        self,
        settings: IntegrationSettings,
        *,
        error: Callable[[Refusal], BaseException],
        point: PointOf,
        read_only: ReadOnlyOf = sql_read_only,
        partway: ReadOnlyOf | None = None,
        refine: Callable[[BaseException, Classification], Classification] | None = None,
        unjudged: Callable[[Exception, tuple[Any, ...]], bool] | None = None,
        unguarded: Callable[[tuple[Any, ...], dict[str, Any]], bool] | None = sql_unguarded,
        opened: Callable[[BaseException, tuple[Any, ...]], float | None] | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = settings.runtime
        self.config = settings.config
        self.connect_hooks = DbHooks(error)
        # Statements, in a transaction or not, get ``refine`` and ``unjudged``; connecting
        # never does: a refused connect is the evidence that confirms lost connections.
        self.cluster_hooks = DbHooks(error, refine, unjudged, unguarded)
        refine = lost_connection(refine)
        self.locked_hooks = DbHooks(error, refine, unjudged, unguarded, opened)
        self.statement_hooks = StatementHooks(
            error,
            point,
            read_only,
            partway=partway,
            refine=refine,
            unjudged=unjudged,
            unguarded=unguarded,
            opened=opened,
        )
        self.reads_hooks = StatementHooks(
            error,
            point,
            read_only,
            partway=partway,
            writes_in_transaction=True,
            refine=refine,
            unjudged=unjudged,
            unguarded=unguarded,
            opened=opened,
        )
        self._targets: dict[Server, DbTarget] = {}
        self._lock = threading.Lock()
        register_lock(self, "_lock")

    def target(self, server: Server) -> DbTarget:
        """The target of ``server`` (built on first use; lock-free afterwards)."""
        found = self._targets.get(server)
        if found is not None:
            return found
        policy = self.config.policy_for(server.host or server.system, server.port, server.system)
        built = DbTarget(self, server, policy)
        with self._lock:
            targets = self._targets
            found = targets.get(server)
            if found is not None:
                return found
            if len(targets) >= MAX_TARGETS:
                targets.clear()
            targets[server] = built
        return built


def policy_timeout_ms(target: DbTarget) -> int:
    """The target's statement timeout in whole milliseconds (0: none)."""
    seconds = target.statement_timeout
    return 0 if seconds <= 0 else max(1, round(seconds * 1000))


class DbIntegration(HookedIntegration[DbState]):
    """A database integration: a subclass names its ``library``, builds its
    :class:`DbState` (:meth:`new_state`) and says what to hook (:meth:`hooks`); installing
    and uninstalling are :class:`~otel_raptor.integrations._kit.HookedIntegration`'s."""


#: Set on every class raptor builds to guard a driver's connections or cursors.
GUARDED_ATTRIBUTE: Final = "_otel_raptor_guarded"


class GuardedConnectionClasses:
    """Subclasses of a driver's connection class (psycopg2, sqlite3) whose statements are
    guarded by ``mixin()`` (built once, on first use: the driver is imported lazily), one per
    application class, kept as long as that class lives.

    The mixin comes *after* the application's class: its own ``cursor()`` (which may pick a
    default cursor class, as psycopg2's ``RealDictConnection`` or an app's sqlite3 subclass
    does) runs first, then the mixin guards what it chose. Each is built under the name and
    module of the class it stands for, so ``type(conn).__name__`` stays ``connection``,
    ``RealDictConnection``, ..."""

    __slots__ = ("_box", "_built", "_make_mixin", "_mixin")

    def __init__(self, make_mixin: Callable[[], type]) -> None:
        self._make_mixin = make_mixin
        self._mixin: type | None = None
        self._built: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()
        self._box = LockBox()

    def of(self, factory: Any, base: type) -> Any:
        """The guarded subclass of ``factory`` (``None``: ``base``, the driver's own class);
        anything that is not a subclass of ``base`` is returned unchanged."""
        if factory is None:
            factory = base
        if not (isinstance(factory, type) and issubclass(factory, base)):
            return factory
        if getattr(factory, GUARDED_ATTRIBUTE, False):
            return factory
        found = self._built.get(factory)
        if found is not None:
            return found
        if self._mixin is None:
            self._mixin = self._make_mixin()
        bases = (self._mixin,) if factory is base else (factory, self._mixin)
        built = type(
            factory.__name__,
            bases,
            {"__module__": factory.__module__, "__doc__": factory.__doc__, GUARDED_ATTRIBUTE: True},
        )
        with self._box.lock:
            return self._built.setdefault(factory, built)
