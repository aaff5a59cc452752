"""The redis-py integration, sync and ``redis.asyncio``: a breaker per server, and retries
that never replay a write whose outcome is unknown.

redis-py retries by itself: since 6.0 every client carries a ``Retry`` (in 8.x, 10 retries
with exponential backoff from 10 ms to 1 s) on ``ConnectionError`` and ``TimeoutError``, for
every command, ``INCR`` after a read timeout included. Stacking raptor's retries on top would
multiply them, and leaving redis-py's in place would replay writes that may already have been
applied. So while raptor runs a command, redis-py's ``Retry.call_with_retry`` makes a single
attempt (it still runs its failure callback, which disconnects the broken connection), and
raptor's loop decides what to retry, with the server's breaker, retry budget and telemetry:

- a command whose connection could not be opened (refused, timed out, failed ``AUTH``), or
  whose connection failed its health check (``health_check_interval``'s ``PING``, sent before
  the command), never reached the server: it may be sent again, write or not;
- a reply saying the command was not executed (``LOADING``, ``BUSY``, ``TRYAGAIN``,
  ``MASTERDOWN``, ``CLUSTERDOWN``) to a command that runs no code of its own: sent again.
  Not after ``EVAL``, ``EVALSHA``, ``FCALL`` (and their ``_RO`` forms) or a module command
  (``JSON.SET``, ...): a script, a function or a module may write and then reply with any
  error;
- a connection lost or timed out after sending: only a read-only command
  (:data:`~otel_raptor.core.db.REDIS_READ_ONLY_COMMANDS`) is sent again; ``INCR``, ``SET``,
  ``LPUSH``, ... are not.

Pipelines: one that only reads is a read-only command; a transaction (``MULTI``/``EXEC``,
the default) that writes may be sent again only when it was never sent or was rejected whole
(at ``MULTI``, while queueing, which makes ``EXEC`` abort, or by ``EXEC`` itself, unless
``MULTI`` was refused and a command after it answered: it ran alone), never after an error
taken from ``EXEC``'s results (``EXEC`` ran); a non-transactional pipeline that
writes, or one that is ``WATCH``ing, is never sent again. A ``WatchError`` is a conflict, not
a fault: it reaches the application as always (its optimistic-locking loop retries), and
counts neither as a failure nor against the breaker.

The connection pool's own refusals (``MaxConnectionsError``, ``BlockingConnectionPool``'s
"No connection available.") say nothing about the server: they reach the application as they
would without raptor, neither counted by the breaker nor retried.

``RedisCluster`` runs its own retry loop (redirections, slot-table refreshes, and retries of
connection errors that include writes): raptor adds no retries on top, and puts a breaker per
node (``redis://host:port/``) around each command the cluster client sends to a node, so a
master that is down never makes raptor refuse the keys the others serve. A refusal has the
cluster client reread its slot table, as a connection error would (from redis-py 8.2, it asks
for the reread, which the client runs at its own pace), so a replica promoted in the dead
master's place is used at once. The cluster client's loop retries a refusal, and from 8.2
does so at once, without sleeping its retry backoff. The node clients the cluster client
creates for itself (which refresh its slot table) are left alone, and so is
``ClusterPipeline`` (its commands go to several nodes at once).

Servers: ``redis://host:port/db`` (``redis:///path/to/socket/db``); a Sentinel-managed pool
is named after its sentinels and service, ``redis-sentinel://sentinel:port/service/db`` for
the master and ``.../service/db/replicas`` for the replicas, wherever Sentinel says they are.
A pool whose server cannot be told is left alone.

What it hooks: ``Redis.execute_command``, ``Pipeline.execute`` (sync and asyncio),
``RedisCluster._execute_command`` (sync and asyncio), plus ``Retry.call_with_retry``,
to turn retries off, ``NodesManager.create_redis_node``, to know the cluster's node clients,
``AbstractRedisCluster._retry_backoff_delay`` (redis-py 8.2 and later), for refusals not to
sleep the cluster client's backoff, the cluster modules' ``_error_to_raise`` (8.2 and
later), for a refusal ending a call on an unreachable cluster to be redis-py's
``RedisClusterUnreachableError`` too, and ``AbstractConnection.on_connect_check_health``
(``on_connect`` before redis-py 6; sync and asyncio), which runs only when a socket was just
opened, to stamp the connection with the time it opened: a command sent within a second of it
that loses its link confirms an outage (behind a proxy whose server is dead, every reconnect
succeeds).
A failure raised through ``AbstractConnection.connect_check_health`` (``connect`` before
redis-py 6) happened before the command was sent: that is read from its traceback (unless
it was ``execute_command``'s reconnect after the command, for a ``MOVING`` notification). See
``docs/databases.md``.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from otel_raptor.core.classification import Classification, ErrorCategory
from otel_raptor.core.db import REDIS_NOT_EXECUTED, FailurePoint, redis_read_only
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import MAX_TARGETS, call, call_async, library_error
from otel_raptor.integrations.db._common import (
    DbIntegration,
    DbState,
    DbTarget,
    HookSet,
    PointOf,
    Server,
    callers_limit,
    is_not_sent,
    mark_not_sent,
    mark_opened,
    not_the_servers,
    opened_at,
    refusal_factory,
)
from otel_raptor.runtime.drive import (
    CLOSED,
    CallPlan,
    count_success,
    resume_async,
    resume_sync,
)
from otel_raptor.runtime.safety import report_internal_error
from otel_raptor.telemetry.instruments import ATTR_DB_NAMESPACE, ATTR_DB_SYSTEM_NAME

if TYPE_CHECKING:
    import redis as _redis

    class RedisCircuitOpen(CircuitOpenError, _redis.exceptions.ConnectionError):
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = ["RedisCircuitOpen", "RedisIntegration", "circuit_open_error_type"]

SYSTEM: Final = "redis"
#: The attribute under which a connection pool keeps its target.
TARGET_ATTRIBUTE: Final = "_otel_raptor_db"
#: Set on the connection pool of a node client that ``RedisCluster`` created for itself.
CLUSTER_NODE_ATTRIBUTE: Final = "_otel_raptor_cluster_node"
#: Set on a "not executed" reply (``LOADING``, ``BUSY``, ``TRYAGAIN``, ...) that stands for
#: the whole call: a command that runs no code of its own, or a transaction rejected before
#: ``EXEC`` ran.
REFUSED_WHOLE_ATTRIBUTE: Final = "_otel_raptor_refused_whole"

# Set while raptor runs a command off the fast lane (its loop's entry, a pipeline):
# redis-py's Retry then makes one attempt. The fast lane sets nothing (see ``_driven``).
_driving: ContextVar[bool] = ContextVar("otel_raptor_redis_driving", default=False)

# Commands that run code of their own (a script, a function, a trigger), which may write
# before replying with any error. Module commands are named ``MODULE.COMMAND``.
_CODE_COMMANDS: Final = frozenset(
    {"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO", "TFCALL", "TFCALLASYNC"}
)
# Where a connection pool hands out a connection; an error raised there itself (not by the
# connection it opens, which is marked not sent) is the pool's own refusal.
_POOL_FUNCTIONS: Final = frozenset(
    {"get_connection", "make_connection", "get_available_connection"}
)
# The frame that raises the first error of a pipeline's results (EXEC's, for a transaction).
_RESULT_ERROR_FUNCTION: Final = "raise_first_error"
# Commands the server holds until their own timeout (``XREAD``/``XREADGROUP`` with ``BLOCK``):
# a socket timeout during one is the client giving up on a wait it asked for.
_BLOCKING_COMMANDS: Final = frozenset(
    {
        "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
        "WAIT", "WAITAOF",
    }
)  # fmt: skip
_BLOCK_OPTION_COMMANDS: Final = frozenset({"XREAD", "XREADGROUP"})
#: Set on a socket timeout that ended a blocking command's wait (see ``_waited_too_long``).
WAITED_ATTRIBUTE: Final = "_otel_raptor_waited"
# The prefix redis-py puts on the error of one of a pipeline's commands.
_ANNOTATION: Final = "Command # "
# redis-py's function (sync and asyncio) that sends a transaction and reads its answers, and
# the option marking a command it does not send (its answer is known without asking).
_TRANSACTION_FUNCTION: Final = "_execute_transaction"
_EMPTY_RESPONSE: Final = "EMPTY_RESPONSE"
# redis-py's health check (``check_health``) sends ``PING`` with this function.
_HEALTH_CHECK_PING: Final = "_send_ping"
# The client functions that run a command (sync, asyncio), in the modules defining them, and
# the connection method they call to reconnect after it (see ``_reconnect_after_command``).
_COMMAND_FUNCTIONS: Final = frozenset({"_execute_command", "execute_command"})
_CLIENT_MODULES: Final = frozenset({"redis.client", "redis.asyncio.client"})
_CONNECT_FUNCTION: Final = "connect"
# The built-in rule for a reply saying the command was not executed, raised by redis-py as a
# plain ``ResponseError`` (``BUSY``, in a pipeline or not; older redis-py: every one of them).
_NOT_EXECUTED_RULE: Final = "redis.LOADING"
# The built-in rule for a proxy's reply that it cannot reach the server (twemproxy's
# ``-ERR Connection refused``).
_PROXY_UNREACHABLE_RULE: Final = "redis.proxy_unreachable"
#: The errno each of that rule's replies names (the proxy's own connect failed so): the
#: codes of a server out of reach, which count at once (``_common.lost_connection``).
_PROXY_ERRNOS: Final = {
    "connection refused": "ECONNREFUSED",
    "no route to host": "EHOSTUNREACH",
    "host is unreachable": "EHOSTUNREACH",
    "network is unreachable": "ENETUNREACH",
    "network is down": "ENETDOWN",
    "host is down": "EHOSTDOWN",
}
#: The rule reported for a script's (or module command's) own error reply that reads as a
#: proxy's: an ordinary error reply, never the proxy's.
_SCRIPT_REPLY_RULE: Final = "redis.script_reply"


class _Marker:
    """What a pipeline is, for the replay judgement (which reads the call's first argument)."""

    __slots__ = ("read_only",)

    def __init__(self, *, read_only: bool) -> None:
        self.read_only = read_only


_READS: Final = _Marker(read_only=True)
_WRITES: Final = _Marker(read_only=False)


def _read_only(args: tuple[Any, ...]) -> bool:
    """``args``: a pipeline's ``(marker, ...)``, or a command's ``(client, name, ...)``."""
    first = args[0] if args else None
    if isinstance(first, _Marker):
        return first.read_only
    return len(args) > 1 and redis_read_only(args[1])


def _runs_code(command: object) -> bool:
    """Whether the command named ``command`` may run code of its own (a script, a function,
    a module command): unknown counts as yes."""
    if isinstance(command, bytes):
        command = command.decode("latin-1")
    if not isinstance(command, str):
        return True
    name = command.partition(" ")[0].upper()
    return name in _CODE_COMMANDS or "." in name


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.upper() if isinstance(value, str) else None


def _blocks(args: tuple[Any, ...]) -> bool:
    """Whether the command of ``args`` (a command's ``(client, name, ...)``) is one the server
    holds until its own timeout: ``BLPOP``, ``BZPOPMIN``, ``WAIT``, ``XREAD ... BLOCK``, ..."""
    name = _text(args[1]) if len(args) > 1 else None
    if name is None:
        return False
    name = name.partition(" ")[0]
    if name in _BLOCKING_COMMANDS:
        return True
    return name in _BLOCK_OPTION_COMMANDS and any(_text(arg) == "BLOCK" for arg in args[2:])


def _unguarded(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``CallHooks.unguarded``: a blocking command meeting a breaker that is not closed runs
    as without raptor. Admitted as the half-open probe, ``BLPOP queue 0`` would hold the only
    probe slot until an item arrives, while the producers' commands, refused meanwhile, never
    push one; refused, a consumer alone would never let the breaker close.

    As without raptor includes redis-py's own retries: the loop's entry
    (``_command_loop``) turned them off before the loop asked this, so a command let through
    turns them back on for its one run (``_command_loop``'s ``_driving.reset`` restores the
    caller's value afterwards). Otherwise a consumer
    would fail at the first refused connection of a server still restarting."""
    if not args or isinstance(args[0], _Marker) or not _blocks(args):
        return False
    if _driving.get():
        _driving.set(False)
    return True


def _refine(failure: BaseException, classification: Classification) -> Classification:
    """The ``refine`` hook: a proxy's "cannot reach the server" reply
    (:func:`_proxy_unreachable`), then a blocking command's wait (:func:`_waited_too_long`)."""
    if classification.rule == _PROXY_UNREACHABLE_RULE:
        return _proxy_unreachable(failure, classification)
    return _waited_too_long(failure, classification)


def _proxy_unreachable(failure: BaseException, classification: Classification) -> Classification:
    """twemproxy in front of a dead server keeps every client link and answers each command
    with the error of its own connect (``-ERR Connection refused``, at once): the proxy's
    refused reconnect, as a failed reconnect of ours, counts at once (its errno becomes the
    ``code``, see :func:`~._common.lost_connection`). Read as any other error reply, a
    client error the breaker ignores, it never opened.

    A command that runs no code of its own (``_unjudged`` marks its failure as standing for
    the whole command) was never forwarded: sent again as any unsent one. In a pipeline
    every command gets the reply and redis-py raises the first, annotated: the pipeline
    counts, but is not marked unsent (commands before it may have run; a pipeline that
    writes is never sent again). A script or function (``EVAL``, ``FCALL``, ``_RO`` forms, a
    module command) may reply with any error of its own, ``redis.error_reply("Connection
    refused")`` included, which nothing tells from the proxy's: it is never taken for the
    proxy's, and stays an ordinary error reply (not counted, not sent again)."""
    message = str(failure)
    reason = message
    if message.startswith(_ANNOTATION):
        # redis.asyncio quotes the reply as a tuple: ``('Connection refused',)``.
        reason = message.rpartition(": ")[2].strip("(',)")
        command = message[len(_ANNOTATION) :].partition("(")[2].partition(")")[0]
        if _runs_code(command):
            return _script_reply(classification)
    elif getattr(failure, REFUSED_WHOLE_ATTRIBUTE, False) is True:
        mark_not_sent(failure)
    else:
        return _script_reply(classification)
    return replace(classification, code=_PROXY_ERRNOS.get(reason.lower(), classification.code))


def _script_reply(classification: Classification) -> Classification:
    """``classification`` of a script's own error reply: a query error, as any error reply."""
    return not_the_servers(classification, ErrorCategory.QUERY, _SCRIPT_REPLY_RULE)


def _waited_too_long(failure: BaseException, classification: Classification) -> Classification:
    """A socket timeout that ended a blocking command's wait (``BLPOP key 30`` on a client
    with ``socket_timeout=5``) is the caller's own limit, not a sign of the server's health:
    ``cancelled``, as a statement timeout is to SQL drivers, so it never counts against the
    breaker (the command is a write or a stream read: it is never sent again either)."""
    if (
        getattr(failure, WAITED_ATTRIBUTE, False) is True
        and classification.category is ErrorCategory.TIMEOUT
    ):
        return callers_limit(classification, "redis.blocking_timeout")
    return classification


class _Conflict:
    """A ``WatchError`` handed through the loop as a result: a conflict is not a failure."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def circuit_open_error_type() -> type[CircuitOpenError]:
    """The class of the error raised when a Redis server's breaker is open: both
    :class:`~otel_raptor.errors.CircuitOpenError` and ``redis.exceptions.ConnectionError``."""
    import redis  # noqa: PLC0415 - the library is imported only when needed

    return library_error(
        CircuitOpenError, redis.exceptions.ConnectionError, "RedisCircuitOpen", __name__
    )


def __getattr__(name: str) -> Any:
    if name == "RedisCircuitOpen":
        return circuit_open_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def failure_point_for(redis: Any) -> PointOf:
    """The failure-point function for redis-py's exceptions (see the module docstring)."""
    exceptions = redis.exceptions
    not_executed = tuple(
        getattr(exceptions, name.rpartition(".")[2])
        for name in sorted(REDIS_NOT_EXECUTED)
        if hasattr(exceptions, name.rpartition(".")[2])
    )
    transport = (exceptions.ConnectionError, exceptions.TimeoutError, OSError)
    demoted = _demoted_master_check(redis)

    def failure_point(
        error: BaseException, classification: Classification
    ) -> tuple[FailurePoint, bool]:
        if is_not_sent(error):
            return FailurePoint.NOT_SENT, True
        if getattr(error, REFUSED_WHOLE_ATTRIBUTE, False) is True and demoted(error):
            return FailurePoint.ROLLED_BACK, True
        # The classifier tells the replies redis-py raises as a plain ``ResponseError``
        # (``BUSY``, annotated in a pipeline or not): a user rule overriding it leaves them
        # judged as answered, the safe side.
        if isinstance(error, not_executed) or classification.rule == _NOT_EXECUTED_RULE:
            if getattr(error, REFUSED_WHOLE_ATTRIBUTE, False) is True:
                return FailurePoint.ROLLED_BACK, True
            return FailurePoint.FAILED, True  # a script, a module or EXEC may have written
        if isinstance(error, transport):
            return FailurePoint.UNKNOWN, True  # the pool reconnects for the next attempt
        return FailurePoint.FAILED, True  # the server answered

    return failure_point


def _demoted_master_check(redis: Any) -> Callable[[BaseException], bool]:
    """Whether an error is a Sentinel-managed connection's "the previous master is now a
    slave": redis-py raises it as a ``ConnectionError`` (so that its own retry asks Sentinel
    for the new master) from the ``READONLY`` reply of a demoted master, or from the
    ``UNBLOCKED`` reply that ends a blocking command when its server turns into a replica.
    Either reply means the command did nothing: judged as a lost link, a write was never sent
    to the new master, where redis-py's own retries (when the client has some) send it."""
    exceptions = redis.exceptions
    read_only = getattr(exceptions, "ReadOnlyError", None)
    sentinel = getattr(redis, "sentinel", None)
    unblocked = getattr(sentinel, "DEMOTED_MASTER_UNBLOCKED_ERROR", None)
    connection_error = exceptions.ConnectionError
    response_error = exceptions.ResponseError

    def demoted(error: BaseException) -> bool:
        if type(error) is not connection_error:
            return False
        cause = error.__context__
        if read_only is not None and isinstance(cause, read_only):
            return True
        return (
            isinstance(unblocked, str)
            and isinstance(cause, response_error)
            and str(cause).startswith(unblocked)
        )

    return demoted


def _mark(error: BaseException, attribute: str) -> None:
    try:
        setattr(error, attribute, True)
    except Exception:  # noqa: BLE001 - an exception refusing attributes: simply unmarked
        return


def _innermost_frame(error: BaseException) -> Any:
    tb = error.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame


def _raised_in(error: BaseException, function: str) -> bool:
    """Whether a redis-py function named ``function`` is on ``error``'s traceback."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def _refused_by_pool(error: BaseException, max_connections: tuple[type, ...]) -> bool:
    """Whether ``error`` is the connection pool's own refusal, raised before any connection
    was opened: ``MaxConnectionsError``, or an error raised by the pool's code itself."""
    try:
        if is_not_sent(error):
            return False  # opening the connection failed: that is the server's doing
        if isinstance(error, max_connections):
            return True
        frame = _innermost_frame(error)
        return (
            frame is not None
            and frame.f_code.co_name in _POOL_FUNCTIONS
            and str(frame.f_globals.get("__name__", "")).startswith("redis.")
        )
    except Exception as bug:  # noqa: BLE001 - never break the host app
        report_internal_error("redis.pool_refusal", bug)
        return False


def _transaction_refused_whole(error: BaseException, exec_abort: type[BaseException]) -> bool:
    """Whether a transaction's error means none of it ran: rejected at ``MULTI`` or while
    queueing (``EXEC`` then aborts: the error comes with an ``ExecAbortError`` as its cause or
    context), or by ``EXEC`` itself. An error taken from ``EXEC``'s results means it ran."""
    if isinstance(error.__cause__, exec_abort) or isinstance(error.__context__, exec_abort):
        return True
    if _raised_in(error, _RESULT_ERROR_FUNCTION):
        return False
    message = error.args[0] if error.args else ""
    if isinstance(message, str) and message.startswith(_ANNOTATION):
        return False
    return not _ran_outside_multi(error)


def _ran_outside_multi(error: BaseException) -> bool:
    """Whether ``MULTI`` was refused and a command sent after it got an answer that is not an
    error: with no transaction open, that command ran on its own (a script holding the
    server ended between the two), so ``EXEC``'s own refusal does not mean none of it ran.
    Read from the locals of redis-py's ``_execute_transaction`` on the traceback (sync and
    asyncio): ``errors`` holds ``MULTI``'s error first, unannotated, then one annotated error
    per refused command, and ``commands`` what was queued. Unknown: assume it ran."""
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == _TRANSACTION_FUNCTION:
            found = frame.f_locals
            errors, commands = found.get("errors"), found.get("commands")
            if not isinstance(errors, list) or commands is None:
                return True
            refused = [e for _, e in errors if isinstance(e, Exception)]
            first = refused[0].args[0] if refused and refused[0].args else None
            if not (isinstance(first, str) and not first.startswith(_ANNOTATION)):
                return False  # MULTI was accepted: the commands were only queued
            sent = sum(1 for _, options in commands if _EMPTY_RESPONSE not in options)
            return len(refused) - 1 < sent
        tb = tb.tb_next
    return False  # not raised while reading a transaction's answers


class _State(DbState):
    __slots__ = (
        "cluster_down",
        "cluster_nodes",
        "clusters",
        "exec_abort",
        "max_connections",
        "opening",
        "timeout_error",
        "watch_error",
    )

    def __init__(
        self,
        settings: IntegrationSettings,
        watch_error: type[BaseException],
        exec_abort: type[BaseException],
        max_connections: tuple[type[BaseException], ...],
        opening: frozenset[Any],
        timeout_error: type[BaseException],
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        self.watch_error = watch_error
        self.exec_abort = exec_abort
        self.max_connections = max_connections
        self.timeout_error = timeout_error
        #: The code of the methods that open a connection (see :func:`_opening_code`).
        self.opening = opening
        #: The targets of cluster nodes by node name (``host:port``; see ``_node_target``).
        self.cluster_nodes: dict[str, DbTarget] = {}
        #: The cluster client classes (sync, asyncio), and ``ClusterDownError``: see
        #: ``_unjudged``.
        self.clusters: tuple[type, ...] = ()
        self.cluster_down: tuple[type[BaseException], ...] = ()


def _opening_code(connection_class: type) -> Any:
    """The code of the method where ``connection_class`` opens a connection (see
    :func:`_opening`), under any wrappers: a failure raised through it happened before the
    command was sent. Read from the traceback on the failure path, instead of a hook on the
    method, which would cost every command a call: redis-py enters it before each one."""
    method = inspect.unwrap(vars(connection_class)[_opening(connection_class)])
    return method.__code__


def _reconnect_after_command(caller: Any, frame: Any) -> bool:
    """Whether ``frame`` is ``connect`` called by ``caller``, a client's command function
    itself: redis-py's ``execute_command`` reconnects, in its ``finally``, a connection
    marked for it (a maintenance ``MOVING`` notification) after the command was sent."""
    return (
        caller is not None
        and frame.f_code.co_name == _CONNECT_FUNCTION
        and caller.f_code.co_name in _COMMAND_FUNCTIONS
        and str(caller.f_globals.get("__name__", "")) in _CLIENT_MODULES
    )


def _opened_in(error: BaseException, opening: frozenset[Any]) -> bool:
    """Whether ``error`` was raised while a connection was being opened before the command
    was sent (not by the reconnect after it: :func:`_reconnect_after_command`)."""
    tb = error.__traceback__
    caller = None
    while tb is not None:
        frame = tb.tb_frame
        if _reconnect_after_command(caller, frame):
            return False
        if frame.f_code in opening:
            return True
        caller = frame
        tb = tb.tb_next
    return False


_installed: _State | None = None


def _unjudged(error: Exception, args: tuple[Any, ...]) -> bool:
    """The loop's first look at a failed attempt (``CallHooks.unjudged``; ``args``: a
    command's ``(client, name, ...)``, a cluster node's ``(cluster, name, ...)``, a
    pipeline's ``(marker, ...)``): whether it is a connection pool's own refusal, which ends
    the call uncounted (redis-py's cluster client does not count it against a node either). A "not
    executed" reply to a command that runs no code of its own is marked as standing for the
    whole command (a pipeline's run marks its own), and a socket timeout that ended a blocking
    command's wait (sent: not one connecting) as the caller's limit (``_waited_too_long``).

    A cluster node's ``CLUSTERDOWN`` (or ``MASTERDOWN``) reply is not counted either: the node
    answered, and says the cluster is reshaping itself (a master failed and its replica is not
    promoted yet); the cluster client retries it and heals by itself. Counted once per attempt
    of its retry loop, it opened the breakers of the live nodes during a failover's moment of
    ``CLUSTERDOWN``, and they refused calls for the breaker's open time after it."""
    state = _installed
    if state is None:
        return False
    if isinstance(error, state.cluster_down) and args and isinstance(args[0], state.clusters):
        return True
    try:
        if _opened_in(error, state.opening):
            mark_not_sent(error)
    except Exception as bug:  # noqa: BLE001 - unmarked: judged as sent, the safe side
        report_internal_error("redis.judge_failure", bug)
    if _refused_by_pool(error, state.max_connections):
        return True
    try:
        if len(args) > 1 and not isinstance(args[0], _Marker):
            if not _runs_code(args[1]):
                _mark(error, REFUSED_WHOLE_ATTRIBUTE)
            if isinstance(error, state.timeout_error) and not is_not_sent(error) and _blocks(args):
                _mark(error, WAITED_ATTRIBUTE)
    except Exception as bug:  # noqa: BLE001 - unmarked: never replayed, the safe side
        report_internal_error("redis.judge_failure", bug)
    return False


@dataclass(frozen=True, slots=True)
class _SentinelService(Server):
    """A Sentinel-managed Redis service as a breaker sees it: its master (or, with
    ``replicas``, its replicas) wherever Sentinel says it is now. ``host`` is the service
    name; ``port`` is ``None``; ``sentinel`` the first (in sorted order) of the sentinels
    asked, ``host:port``: service names are unique within one set of sentinels only, and two
    deployments both called ``mymaster`` are two services with a breaker each."""

    replicas: bool = False
    sentinel: str = ""

    @property
    def name(self) -> str:
        """``redis-sentinel://sentinel:port/service/db``, ``.../db/replicas`` for the
        replicas (``redis-sentinel://service/db`` when the sentinels are unknown)."""
        role = "/replicas" if self.replicas else ""
        where = f"{self.sentinel}/" if self.sentinel else ""
        return f"{self.system}-sentinel://{where}{self.host}/{self.database or ''}{role}"

    @property
    def attributes(self) -> dict[str, str | int]:
        """``db.system.name`` and ``db.namespace``: the address changes with failovers."""
        attributes: dict[str, str | int] = {ATTR_DB_SYSTEM_NAME: self.system}
        if self.database:
            attributes[ATTR_DB_NAMESPACE] = self.database
        return attributes


def _default_address(connection_class: Any) -> tuple[str, int] | None:
    """The host and port a connection class uses when given none (``localhost:6379`` for
    redis-py's ``Connection``), or ``None`` when its ``__init__`` declares no default (one
    taking ``**kwargs`` may set its own: Sentinel's does)."""
    for klass in getattr(connection_class, "__mro__", ()):
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            parameters = inspect.signature(init).parameters
        except (TypeError, ValueError):  # not introspectable: no default to rely on
            return None
        host, port = parameters.get("host"), parameters.get("port")
        if host is None or port is None:
            return None
        if isinstance(host.default, str) and isinstance(port.default, int):
            return host.default, port.default
        return None
    return None


def _first_sentinel(pool: Any) -> str:
    """The first, in sorted order, of the sentinels a Sentinel-managed pool asks
    (``host:port``), or ``""`` when they cannot be told."""
    addresses = []
    for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", None) or ():
        kwargs = getattr(getattr(sentinel, "connection_pool", None), "connection_kwargs", {})
        host, port = kwargs.get("host"), kwargs.get("port")
        if host is not None:
            host = str(host).lower()
            addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return min(addresses, default="")


def _server_of_pool(pool: Any) -> Server | None:
    """The server of a connection pool, or ``None`` when it cannot be told."""
    kwargs = pool.connection_kwargs
    database = str(kwargs.get("db", 0))
    service = getattr(pool, "service_name", None)
    if service is not None and hasattr(pool, "is_master"):
        return _SentinelService(
            SYSTEM,
            str(service),
            None,
            database,
            replicas=not pool.is_master,
            sentinel=_first_sentinel(pool),
        )
    path = kwargs.get("path")
    if path:
        return Server(SYSTEM, str(path), None, database)
    host = kwargs.get("host")
    port = kwargs.get("port")
    if host is None:
        default = _default_address(getattr(pool, "connection_class", None))
        if default is None:
            return None
        host, port = default[0], port or default[1]
    return Server(SYSTEM, str(host).lower(), int(port or 6379), database)


class _Untouched:
    """The target of a pool whose calls raptor leaves alone: a node client ``RedisCluster``
    made (the cluster client's own calls are guarded), or a pool whose server is unknown."""

    __slots__ = ("owner",)

    enabled: Final = False
    statement: Final = None

    def __init__(self, owner: _State) -> None:
        self.owner = owner


def _target(state: _State, pool: Any) -> DbTarget | _Untouched:
    target: DbTarget | _Untouched | None = getattr(pool, TARGET_ATTRIBUTE, None)
    if target is None or target.owner is not state:
        server = None if getattr(pool, CLUSTER_NODE_ATTRIBUTE, False) else _server_of_pool(pool)
        target = _Untouched(state) if server is None else state.target(server)
        setattr(pool, TARGET_ATTRIBUTE, target)
    return target


# --- turning redis-py's own retries off while raptor drives -----------------------------------


def _failure_handling(
    is_retryable: Callable[[Exception], bool] | None = None,
    with_failure_count: bool = False,
) -> tuple[Callable[[Exception], bool] | None, bool]:
    """``call_with_retry``'s arguments after ``do`` and ``fail`` (redis-py 5 has none)."""
    return is_retryable, with_failure_count


#: ``Retry.call_with_retry``'s parameters in the redis-py versions this was written against
#: (sync and asyncio alike). A hook with exactly these takes them as they come; one with
#: ``*args, **kwargs`` would pack them into a new tuple and dict twice per command.
_RETRY_PARAMETERS: Final = (
    ("self", inspect.Parameter.empty),
    ("do", inspect.Parameter.empty),
    ("fail", inspect.Parameter.empty),
    ("is_retryable", None),
    ("with_failure_count", False),
)


def _takes_retry_parameters(original: Callable[..., Any]) -> bool:
    """Whether ``original`` has exactly the parameters of :data:`_RETRY_PARAMETERS`."""
    try:
        parameters = tuple(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return False
    return (
        all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)
        and tuple((p.name, p.default) for p in parameters) == _RETRY_PARAMETERS
    )


def _is_health_check(do: Any) -> bool:
    """Whether ``do`` is redis-py's health-check ``PING`` (``check_health`` runs it before the
    command is written: a failure there leaves the command unsent). On a connection that was
    open, a failed ``PING`` is a lost connection (most often one the server closed for
    idleness, Redis's ``timeout``), held unconfirmed as any: the reconnect that follows
    decides. The ``PING`` redis-py sends while opening a connection is marked again as a
    failed reconnect by ``_unjudged``, which reads the traceback afterwards."""
    return getattr(do, "__name__", None) == _HEALTH_CHECK_PING


def _failed_once(
    retry: Any,
    do: Any,
    fail: Any,
    error: Exception,
    is_retryable: Callable[[Exception], bool] | None,
    with_failure_count: bool,
) -> Any:
    """What redis-py's retry loop does after a failed try, without the retry: ``fail`` is
    called for an error it would have retried (it disconnects, so the next attempt
    reconnects). Returns what ``fail`` returned (an awaitable under asyncio), or ``None``.
    Our judgement never raises: it runs while the caller's ``error`` propagates (a bug of
    ours, or a redis-py whose ``Retry`` reads differently, is reported, and ``fail`` skipped)."""
    try:
        if _is_health_check(do):
            mark_not_sent(error, on_open_connection=True)
        supported = isinstance(error, retry._supported_errors)
    except Exception as bug:  # noqa: BLE001 - the caller's error must reach the caller
        report_internal_error("redis.retry_step", bug)
        return None
    if not supported:
        return None
    if is_retryable is not None and not is_retryable(error):
        return None
    return fail(error, 1) if with_failure_count else fail(error)


def _failed_once_any(
    retry: Any,
    do: Any,
    fail: Any,
    error: Exception,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """:func:`_failed_once` with ``call_with_retry``'s other arguments as they came: a
    redis-py whose ``Retry`` takes arguments we cannot read gets no ``fail`` (reported),
    and the command's error goes on to the caller."""
    try:
        is_retryable, with_failure_count = _failure_handling(*args, **kwargs)
    except Exception as bug:  # noqa: BLE001 - the caller's error must reach the caller
        report_internal_error("redis.retry_step", bug)
        return None
    return _failed_once(retry, do, fail, error, is_retryable, with_failure_count)


def _replaying(failure: Exception, do: Callable[[], Any]) -> Callable[[], Any]:
    """``do`` for redis-py's own loop after the hook's first try failed with ``failure``: its
    first call raises ``failure`` (so the loop handles it as its first try's), the next ones
    call ``do``."""
    pending = [failure]

    def again() -> Any:
        if pending:
            raise pending.pop()
        return do()

    return again


def _replaying_async(
    failure: Exception, do: Callable[[], Awaitable[Any]]
) -> Callable[[], Awaitable[Any]]:
    """:func:`_replaying` for ``redis.asyncio``."""
    pending = [failure]

    async def again() -> Any:
        if pending:
            raise pending.pop()
        return await do()

    return again


def _driven() -> bool:
    """Whether raptor drives the command in whose ``call_with_retry`` a try just failed: asked
    on the failure path only, from the call stack (this thread's, or this task's chain of
    awaits), so that a command's success sets and reads nothing. The nearest of these frames
    decides (see ``_STACK_MARKS``): a command hook's fast lane (driven); a hook's call made as
    without raptor (not driven); a hook that says so in :data:`_driving` (a command's loop
    entered off the fast lane, a pipeline: that variable, which ``_unguarded`` turns off for
    a blocking command it lets through). No such frame: :data:`_driving` (``False`` unless
    a caller set it). Never raises (on our bug: :data:`_driving`)."""
    try:
        frame: FrameType | None = sys._getframe(2)  # the caller of call_with_retry
        marks = _STACK_MARKS
        while frame is not None:
            mark = marks.get(frame.f_code, _UNMARKED)
            if mark is not _UNMARKED:
                return _driving.get() if mark is None else mark  # type: ignore[return-value]
            frame = frame.f_back
    except Exception as bug:  # noqa: BLE001 - the caller's error must reach the caller
        report_internal_error("redis.driven", bug)
    return _driving.get()


def _retry_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``redis.retry.Retry.call_with_retry``: one attempt while raptor drives.
    ``do`` and ``fail`` are named as in redis-py, so a success reads nothing else.

    The first try is made here, whoever calls: whether raptor drives is asked only when it
    fails (:func:`_driven`), so a success costs no question at all. Not driven, the failure
    goes to redis-py's own loop as its first try's (:func:`_replaying`): ``fail``, the
    backoff, the next tries, exactly as without raptor."""
    if _takes_retry_parameters(original):

        def call_with_retry(
            self: Any,
            do: Any,
            fail: Any,
            is_retryable: Callable[[Exception], bool] | None = None,
            with_failure_count: bool = False,
        ) -> Any:
            try:
                return do()
            except Exception as error:
                if _driven():
                    _failed_once(self, do, fail, error, is_retryable, with_failure_count)
                    raise
                failure = error
            # Outside the ``except`` block: a later try's error is not chained onto this one.
            return original(self, _replaying(failure, do), fail, is_retryable, with_failure_count)

        return call_with_retry

    def call_with_retry_any(self: Any, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return do()
        except Exception as error:
            if _driven():
                _failed_once_any(self, do, fail, error, args, kwargs)
                raise
            failure = error
        return original(self, _replaying(failure, do), fail, *args, **kwargs)

    return call_with_retry_any


def _async_retry_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``redis.asyncio.retry.Retry.call_with_retry`` (see :func:`_retry_hook`)."""
    if _takes_retry_parameters(original):

        async def call_with_retry(
            self: Any,
            do: Any,
            fail: Any,
            is_retryable: Callable[[Exception], bool] | None = None,
            with_failure_count: bool = False,
        ) -> Any:
            try:
                return await do()
            except Exception as error:
                if _driven():
                    failing = _failed_once(self, do, fail, error, is_retryable, with_failure_count)
                    if failing is not None:
                        await failing
                    raise
                failure = error
            return await original(
                self, _replaying_async(failure, do), fail, is_retryable, with_failure_count
            )

        return call_with_retry

    async def call_with_retry_any(self: Any, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await do()
        except Exception as error:
            if _driven():
                failing = _failed_once_any(self, do, fail, error, args, kwargs)
                if failing is not None:
                    await failing
                raise
            failure = error
        return await original(self, _replaying_async(failure, do), fail, *args, **kwargs)

    return call_with_retry_any


def _node_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``NodesManager.create_redis_node``: the node clients ``RedisCluster``
    creates for itself (built with ``retries=0``: the cluster client retries) are left alone."""

    def create_redis_node(self: Any, *args: Any, **kwargs: Any) -> Any:
        node = original(self, *args, **kwargs)
        try:
            setattr(node.connection_pool, CLUSTER_NODE_ATTRIBUTE, True)
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("redis.cluster_node", bug)
        return node

    return create_redis_node


# --- commands ---------------------------------------------------------------------------------
#
# The loop calls the library's own function; a failure is sorted out by ``_unjudged`` (the
# plans' ``CallHooks.unjudged``) before the loop judges it, so a success runs no code of ours
# beyond the hook itself.


def _command_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Redis.execute_command``. Its own frame is what tells the retry hook that
    raptor drives (:func:`_driven`): it calls ``original`` itself only on the fast lane, and
    through :func:`_command_as_without_us` or :func:`_command_loop` otherwise."""

    def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        state = _installed
        if state is None:
            return _command_as_without_us(original, self, args, options)
        try:
            # _target() inlined: this runs for every command.
            try:  # TARGET_ATTRIBUTE read as an attribute: a getattr() call costs more
                target = self.connection_pool._otel_raptor_db
            except AttributeError:
                target = None
            if target is None or target.owner is not state:
                target = _target(state, self.connection_pool)
            plan = target.statement if target.enabled else None
            if plan is not None:
                # The loop's fast path (``drive.run_sync``), inlined: see DbTarget.
                core = plan.core
                start = plan.monotonic()
                fast = (core is None or core._state is CLOSED) and (
                    start >= plan.downstream.cooldown_until
                )
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("redis.describe", bug)
            plan = None
        if plan is None:
            return _command_as_without_us(original, self, args, options)
        if not fast:  # the loop's entry refuses, probes or waits
            return _command_loop(plan, original, self, args, options)
        try:
            result = original(self, *args, **options)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure = exc
        else:
            # count_success inlined where the deposit is all it does (a quiet breaker); it cannot
            # raise: slots set at construction, and ``start`` compared in the try block above.
            if core is not None and core.quiet and start < core._next_check:
                plan.budget._calls += 1
            else:
                count_success(plan, core, start, "redis.record_success")
            return result
        # The next attempts run under this frame too: raptor still drives them.
        return resume_sync(plan, original, (self, *args), options, start, failure)

    return execute_command


def _command_as_without_us(
    original: Callable[..., Any], client: Any, args: tuple[Any, ...], options: dict[str, Any]
) -> Any:
    """A command raptor does not drive (not installed, a pool left alone, our bug): its own
    frame tells the retry hook so (:func:`_driven`), and redis-py retries as it always does."""
    return original(client, *args, **options)


def _command_loop(
    plan: CallPlan,
    original: Callable[..., Any],
    client: Any,
    args: tuple[Any, ...],
    options: dict[str, Any],
) -> Any:
    """A command that meets a breaker that is not closed, or a cooldown: the loop's entry, with
    :data:`_driving` set (which ``_unguarded`` turns off for a blocking command it lets
    through, as without raptor)."""
    token = _driving.set(True)
    try:
        return call(plan, original, (client, *args), options)
    finally:
        _driving.reset(token)


def _async_command_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``redis.asyncio`` ``Redis.execute_command``: :func:`_command_hook` for
    coroutines (the chain of awaits is the stack :func:`_driven` reads)."""

    async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        state = _installed
        if state is None:
            return await _async_command_as_without_us(original, self, args, options)
        try:
            try:  # TARGET_ATTRIBUTE read as an attribute: a getattr() call costs more
                target = self.connection_pool._otel_raptor_db
            except AttributeError:
                target = None
            if target is None or target.owner is not state:
                target = _target(state, self.connection_pool)
            plan = target.statement if target.enabled else None
            if plan is not None:
                # The loop's fast path (``drive.run_async``), inlined: see DbTarget.
                core = plan.core
                start = plan.monotonic()
                fast = (core is None or core._state is CLOSED) and (
                    start >= plan.downstream.cooldown_until
                )
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe", bug)
            plan = None
        if plan is None:
            return await _async_command_as_without_us(original, self, args, options)
        if not fast:  # the loop's entry refuses, probes or waits
            return await _async_command_loop(plan, original, self, args, options)
        try:
            result = await original(self, *args, **options)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, below (unchained)
            failure = exc
        else:
            # count_success inlined where the deposit is all it does (a quiet breaker); it cannot
            # raise: slots set at construction, and ``start`` compared in the try block above.
            if core is not None and core.quiet and start < core._next_check:
                plan.budget._calls += 1
            else:
                count_success(plan, core, start, "redis.record_success")
            return result
        # Cancellation from outside is the loop's to tell apart (never counted), as in run_async.
        return await resume_async(plan, original, (self, *args), options, start, failure)

    return execute_command


async def _async_command_as_without_us(
    original: Callable[..., Awaitable[Any]],
    client: Any,
    args: tuple[Any, ...],
    options: dict[str, Any],
) -> Any:
    """:func:`_command_as_without_us` for ``redis.asyncio``."""
    return await original(client, *args, **options)


async def _async_command_loop(
    plan: CallPlan,
    original: Callable[..., Awaitable[Any]],
    client: Any,
    args: tuple[Any, ...],
    options: dict[str, Any],
) -> Any:
    """:func:`_command_loop` for ``redis.asyncio``."""
    token = _driving.set(True)
    try:
        return await call_async(plan, original, (client, *args), options)
    finally:
        _driving.reset(token)


def _unused(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("never called: the hooks below are built for their code only")


_UNMARKED: Final = object()
#: The frames :func:`_driven` looks for, by code (every hook built by a factory shares its
#: code): ``True``, raptor drives; ``False``, it does not; ``None``, :data:`_driving` says.
_STACK_MARKS: Final[dict[Any, bool | None]] = {
    _command_hook(_unused).__code__: True,
    _command_as_without_us.__code__: False,
    _command_loop.__code__: None,
    _async_command_hook(_unused).__code__: True,
    _async_command_as_without_us.__code__: False,
    _async_command_loop.__code__: None,
}


def _is_transaction(pipe: Any) -> bool:
    """Whether ``pipe`` runs in ``MULTI``/``EXEC``. ``redis.asyncio`` keeps the flag in
    ``is_transaction`` (its ``transaction`` is a method); redis-py in ``transaction``."""
    flag = getattr(pipe, "is_transaction", None)
    if not isinstance(flag, bool):
        flag = pipe.transaction
    return flag is True or bool(pipe.explicit_transaction)


def _pipeline_plan(target: DbTarget, pipe: Any, transaction: bool) -> tuple[CallPlan, _Marker]:
    stack = pipe.command_stack
    if all(redis_read_only(args[0]) for args, _ in stack if args):
        return target.statement, _READS
    if pipe.watching or not transaction:
        return target.locked, _WRITES
    return target.statement, _WRITES


class _PipelineRun:
    """One ``Pipeline.execute`` as the loop runs it: each attempt after the first puts back
    what the previous one's ``reset()`` cleared (the commands, the scripts, ``MULTI``)."""

    __slots__ = (
        "explicit",
        "failure",
        "original",
        "pipe",
        "scripts",
        "stack",
        "started",
        "state",
        "transaction",
    )

    def __init__(
        self, original: Callable[..., Any], pipe: Any, state: _State, *, transaction: bool
    ) -> None:
        self.original = original
        self.pipe = pipe
        self.stack = list(pipe.command_stack)
        self.scripts = set(pipe.scripts)
        self.explicit = pipe.explicit_transaction
        self.started = False
        self.state = state
        self.transaction = transaction
        #: The last attempt's failure (``None`` before one failed).
        self.failure: Exception | None = None

    def restore(self) -> None:
        if self.started:
            pipe = self.pipe
            pipe.command_stack = list(self.stack)
            pipe.scripts = set(self.scripts)
            pipe.explicit_transaction = self.explicit
        self.started = True

    def prepare(self) -> None:
        """Before each attempt (:meth:`restore`). Our code runs inside the app's call here:
        should it fail (reported), the first attempt goes ahead (nothing was cleared yet) and
        a retry is not made, the previous attempt's failure standing as this one's (a
        pipeline that was not put back would run empty, and look successful)."""
        try:
            self.restore()
            return
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("redis.pipeline_restore", bug)
        failure = self.failure
        if failure is None:
            self.started = True
            return
        raise failure  # outside the ``except`` block: the app's error keeps its context

    def judge(self, error: Exception) -> None:
        """Mark a failed attempt (see ``_unjudged``, which then sorts out a pool's refusal): a
        "not executed" reply stands for the whole pipeline only when it is a transaction
        rejected before ``EXEC`` ran. A pipeline without ``MULTI`` may have run every command
        before the one refused."""
        try:
            if self.transaction and _transaction_refused_whole(error, self.state.exec_abort):
                _mark(error, REFUSED_WHOLE_ATTRIBUTE)
        except Exception as bug:  # noqa: BLE001 - unmarked: never replayed, the safe side
            report_internal_error("redis.judge_pipeline_failure", bug)

    def __call__(self, marker: _Marker, *args: Any, **kwargs: Any) -> Any:
        self.prepare()
        try:
            return self.original(self.pipe, *args, **kwargs)
        except self.state.watch_error as conflict:
            return _Conflict(conflict)
        except Exception as error:
            self.failure = error
            self.judge(error)
            raise


class _AsyncPipelineRun(_PipelineRun):
    __slots__ = ()

    async def __call__(self, marker: _Marker, *args: Any, **kwargs: Any) -> Any:
        self.prepare()
        try:
            return await self.original(self.pipe, *args, **kwargs)
        except self.state.watch_error as conflict:
            return _Conflict(conflict)
        except Exception as error:
            self.failure = error
            self.judge(error)
            raise


def _settled(result: Any) -> Any:
    if type(result) is _Conflict:
        raise result.error
    return result


def _reset_unsent(pipe: Any) -> None:
    """Empty a pipeline whose ``execute()`` was refused before it ran (an open breaker), as
    redis-py's own ``execute()`` does in its ``finally`` whatever it ended with: kept, the
    refused commands would be sent with the next ``execute()``, twice over when the app
    queues its failed batch again. A failing reset (its ``UNWATCH``) leaves the refusal to be
    raised."""
    try:
        pipe.reset()
    except Exception:  # noqa: BLE001 - the server's failure, not ours: the refusal is raised
        return


async def _async_reset_unsent(pipe: Any) -> None:
    """:func:`_reset_unsent` for a ``redis.asyncio`` pipeline."""
    try:
        await pipe.reset()
    except Exception:  # noqa: BLE001
        return


def _pipeline_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Pipeline.execute``."""

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None or not self.command_stack:
            return original(self, *args, **kwargs)
        try:
            target = _target(state, self.connection_pool)
            if not isinstance(target, DbTarget) or not target.enabled:
                return original(self, *args, **kwargs)
            transaction = _is_transaction(self)
            plan, marker = _pipeline_plan(target, self, transaction)
            run = _PipelineRun(original, self, state, transaction=transaction)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe_pipeline", bug)
            return original(self, *args, **kwargs)
        token = _driving.set(True)
        try:
            return _settled(call(plan, run, (marker, *args), kwargs))
        except BaseException:
            if not run.started:  # refused before any attempt: reset, as redis-py always does
                _reset_unsent(self)
            raise
        finally:
            _driving.reset(token)

    return execute


def _async_pipeline_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``redis.asyncio`` ``Pipeline.execute``."""

    async def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None or not self.command_stack:
            return await original(self, *args, **kwargs)
        try:
            target = _target(state, self.connection_pool)
            if not isinstance(target, DbTarget) or not target.enabled:
                return await original(self, *args, **kwargs)
            transaction = _is_transaction(self)
            plan, marker = _pipeline_plan(target, self, transaction)
            run = _AsyncPipelineRun(original, self, state, transaction=transaction)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe_pipeline", bug)
            return await original(self, *args, **kwargs)
        token = _driving.set(True)
        try:
            return _settled(await call_async(plan, run, (marker, *args), kwargs))
        except BaseException:
            if not run.started:  # refused before any attempt: reset, as redis-py always does
                await _async_reset_unsent(self)
            raise
        finally:
            _driving.reset(token)

    return execute


#: The keyword a cluster call's node travels under through the loop (see ``_cluster_node_hook``),
#: so that the loop's hooks see the command where a command's are: ``(cluster, name, ...)``.
_NODE_KEYWORD: Final = "_otel_raptor_node"


def _node_target(state: _State, node: Any) -> DbTarget:
    """The target of one cluster node (its ``host:port``): a breaker per node, not per
    cluster, so that one master's outage never refuses the keys the other masters serve."""
    name = node.name
    found = state.cluster_nodes.get(name)
    if found is None:
        found = state.target(Server(SYSTEM, str(node.host).lower(), int(node.port), None))
        nodes = state.cluster_nodes
        if len(nodes) >= MAX_TARGETS:
            nodes.clear()
        nodes[name] = found
    return found


#: The least time between two slot-table rereads that refusals cause (see ``_refresh_due``).
SLOTS_REFRESH_INTERVAL: Final = 0.25
#: Where a cluster client keeps the time of its last refusal-caused reread.
_REFRESHED_ATTRIBUTE: Final = "_otel_raptor_slots_refreshed"


def _refresh_due(cluster: Any) -> bool:
    """Whether a refusal by a node's breaker should have ``cluster`` reread its slot table
    now: at most once per :data:`SLOTS_REFRESH_INTERVAL`, so that refusals stay cheap."""
    now = time.monotonic()
    last = getattr(cluster, _REFRESHED_ATTRIBUTE, None)
    if isinstance(last, float) and now - last < SLOTS_REFRESH_INTERVAL:
        return False
    try:
        setattr(cluster, _REFRESHED_ATTRIBUTE, now)
    except Exception:  # noqa: BLE001 - a client refusing attributes: reread every time
        return True
    return True


def _refresh_slots(cluster: Any, node: Any) -> None:
    """After ``node``'s breaker refused a call, have the cluster client reread its slot table,
    as redis-py does after a connection error to a node: if a replica took the node's slots
    over, the next call goes to it instead of waiting for the dead node's breaker. As redis-py
    does, ``node`` is asked last (a silent one would hold the refused call for a timeout).

    redis-py 8.2 and later only *ask* for a reread after a connection error
    (``NodesManager._request_refresh``): the next attempt, of any command, runs it once due
    (at most once a second, later after rereads that failed), still asking the failed node
    last. A refusal asks the same way, so it shares redis-py's pacing instead of rereading on
    its own. Before 8.2 redis-py rereads at once, and so does a refusal, at most once per
    :data:`SLOTS_REFRESH_INTERVAL`."""
    try:
        manager = cluster.nodes_manager
        request = getattr(manager, "_request_refresh", None)
        if request is not None:
            request(last_failed_node_name=node.name)
        elif _refresh_due(cluster):
            try:
                manager.initialize(last_failed_node_name=node.name)
            except TypeError:  # a redis-py before the argument: asked in any order
                manager.initialize()
        if cluster.get_default_node().name == node.name:
            cluster.replace_default_node()
    except Exception:  # noqa: BLE001 - no node answers: the table stays, the refusal is raised
        return


async def _refresh_slots_async(cluster: Any, node: Any) -> None:
    """:func:`_refresh_slots` for ``redis.asyncio``. Before 8.2 done at once rather than left
    to the client's next ``initialize()``: redis-py passed the failed node's name to that
    reread only while its own loop retried the call, so a refusal that ended a call (its
    retries spent) left a reread that asked the nodes in a random order, the silent node
    holding the next call for its ``socket_timeout``. From 8.2 the client keeps the name until
    a reread succeeds (``RedisCluster._request_refresh``), and a refusal asks through it."""
    try:
        request = getattr(cluster, "_request_refresh", None)
        if request is not None:
            request(last_failed_node_name=node.name)
        elif _refresh_due(cluster):
            manager = cluster.nodes_manager
            try:
                await manager.initialize(last_failed_node_name=node.name)
            except TypeError:  # a redis-py before the argument: asked in any order
                await manager.initialize()
        if cluster.get_default_node().name == node.name:
            cluster.replace_default_node()
    except Exception:  # noqa: BLE001 - no node answers: the table stays, the refusal is raised
        return


def _refusal_backoff(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The wrapper on ``AbstractRedisCluster._retry_backoff_delay(retry, failures)`` (redis-py
    8.2 and later), the delay the cluster clients' retry loops (commands and pipelines, sync
    and asyncio) sleep before their next attempt, called while they handle the failed
    attempt's error: none after a node's refusal. A refused command was never sent, and its
    node's breaker says it is out: sleeping the backoff (10 retries, up to 1 s each) made
    every refused call take seconds, and a dead master's keys stalled a loop over the others'.
    The loop still tries again at once, on the node its slot table names then (another copy
    of a read, a promoted replica), and any other error sleeps as without raptor."""
    delay = wrapped(*args, **kwargs)
    if _installed is not None and isinstance(sys.exception(), CircuitOpenError):
        return 0
    return delay


def _refusal_unreachable(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The wrapper on ``_error_to_raise(unreachable_args, error)`` (redis-py 8.2 and later, in
    the sync and the asyncio cluster modules): while the last slot-table reread reached no
    node, the cluster clients end a call on a connection error, and raise it, as a
    ``RedisClusterUnreachableError`` (a ``RedisClusterException``, not a ``RedisError``).
    They convert the exact types only, so a node's refusal, standing for that connection
    error, went on as it was: an application catching ``RedisClusterException`` for "the
    cluster is gone", which caught it without raptor, let the refusal through. The refusal
    is raised as one that is both (see :func:`_unreachable_refusal`)."""
    raised = wrapped(*args, **kwargs)
    try:
        unreachable_args, error = args[0], args[1]
        if (
            _installed is not None
            and raised is error
            and isinstance(error, CircuitOpenError)
            and isinstance(unreachable_args, tuple)
        ):
            return _unreachable_refusal(error)
    except Exception as bug:  # noqa: BLE001 - never break the host app: redis-py's choice
        report_internal_error("redis.cluster_unreachable", bug)
    return raised


def _unreachable_refusal(refusal: CircuitOpenError) -> CircuitOpenError:
    """``refusal`` as an error that is also redis-py's ``RedisClusterUnreachableError``: the
    ``except`` clauses written for either keep catching it (``CircuitOpenError``,
    ``ConnectionError``, ``RedisError``, ``RedisClusterException``)."""
    import redis.exceptions  # noqa: PLC0415 - imported by install()

    kind = library_error(
        type(refusal),
        redis.exceptions.RedisClusterUnreachableError,
        "RedisClusterCircuitOpen",
        __name__,
    )
    outage: CircuitOpenError = kind(refusal.breaker, refusal.retry_after)
    outage.__cause__ = refusal.__cause__
    outage.__suppress_context__ = True
    return outage


def _cluster_retries(clusters: tuple[type, ...], refusal: type, *, allow: bool) -> None:
    """Add ``refusal`` to (``allow``), or take it out of, the errors the cluster clients'
    own loop retries. That loop retries by exact type (``type(e) in ERRORS_ALLOW_RETRY``),
    so a node's refusal, a subclass of the ``ConnectionError`` it stands for, ended the call
    where the connection error would have been retried on the node the reread slot table
    names: a read balanced onto a dead replica failed, where without us the next attempt
    went to another copy. A refused command was never sent, so trying again is safe."""
    for cluster in clusters:
        owner = next((c for c in cluster.__mro__ if "ERRORS_ALLOW_RETRY" in vars(c)), None)
        if owner is None:
            continue
        current: tuple[type, ...] = tuple(vars(owner)["ERRORS_ALLOW_RETRY"])
        if allow and refusal not in current:
            setattr(owner, "ERRORS_ALLOW_RETRY", (*current, refusal))  # noqa: B010 - untyped
        elif not allow and refusal in current:
            kept = tuple(kind for kind in current if kind is not refusal)
            setattr(owner, "ERRORS_ALLOW_RETRY", kept)  # noqa: B010


def _cluster_node_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``RedisCluster._execute_command(node, *args)``, one command sent to one
    node (the cluster client's retry loop calls it again for each of its attempts): the node's
    breaker, no retries of ours (the cluster client runs its own)."""

    def on_node(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, kwargs.pop(_NODE_KEYWORD), *args, **kwargs)

    def _execute_command(self: Any, node: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return original(self, node, *args, **kwargs)
        try:
            target = _node_target(state, node)
            plan = target.cluster if target.enabled else None
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe_cluster", bug)
            plan = None
        if plan is None:
            return original(self, node, *args, **kwargs)
        kwargs[_NODE_KEYWORD] = node
        try:
            return call(plan, on_node, (self, *args), kwargs)
        except CircuitOpenError:
            _refresh_slots(self, node)
            raise

    return _execute_command


def _async_cluster_node_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``redis.asyncio`` ``RedisCluster._execute_command``."""

    async def on_node(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await original(self, kwargs.pop(_NODE_KEYWORD), *args, **kwargs)

    async def _execute_command(self: Any, node: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return await original(self, node, *args, **kwargs)
        try:
            target = _node_target(state, node)
            plan = target.cluster if target.enabled else None
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe_cluster", bug)
            plan = None
        if plan is None:
            return await original(self, node, *args, **kwargs)
        kwargs[_NODE_KEYWORD] = node
        try:
            return await call_async(plan, on_node, (self, *args), kwargs)
        except CircuitOpenError:
            await _refresh_slots_async(self, node)
            raise

    return _execute_command


def _opened(failure: BaseException, args: tuple[Any, ...]) -> float | None:
    """The ``opened`` hook: when the connection that lost its link opened. The client in
    ``args`` does not say which of its pool's connections the command had (it is back in
    the pool by now): the innermost frame of ``failure``'s traceback whose ``self`` carries
    the stamp of :func:`_stamp_hook` does (redis-py's connection reading the reply)."""
    found = None
    tb = failure.__traceback__
    while tb is not None:
        stamp = opened_at(tb.tb_frame.f_locals.get("self"))
        if stamp is not None:
            found = stamp
        tb = tb.tb_next
    return found


def _stamp_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``AbstractConnection.on_connect_check_health`` (``on_connect`` before
    redis-py 6), which redis-py runs once a socket is opened, never for a command on an open
    connection: stamps the connection with the time it opened (see :func:`_opened`)."""

    def on_connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is not None:
            mark_opened(self, state.runtime.clock)
        return original(self, *args, **kwargs)

    return on_connect


def _async_stamp_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`_stamp_hook` for ``redis.asyncio``."""

    async def on_connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is not None:
            mark_opened(self, state.runtime.clock)
        return await original(self, *args, **kwargs)

    return on_connect


def _on_connect(connection_class: type) -> str:
    return (
        "on_connect_check_health"
        if "on_connect_check_health" in vars(connection_class)
        else "on_connect"
    )


def _opening(connection_class: type) -> str:
    return "connect_check_health" if "connect_check_health" in vars(connection_class) else "connect"


def _wrapped(redis: Any) -> list[tuple[object, str, Any]]:
    """wrapt wrappers, for what a plain-function patch would bind as a method or cannot
    reach: the staticmethod ``AbstractRedisCluster._retry_backoff_delay`` and the module
    function ``_error_to_raise`` of both cluster modules (redis-py 8.2 and later; failure
    paths only, so wrapt's cost per call does not matter)."""
    import redis.asyncio.cluster  # noqa: PLC0415 - imported by install()
    import redis.cluster  # noqa: PLC0415

    wrappers: list[tuple[object, str, Any]] = []
    abstract = getattr(redis.cluster, "AbstractRedisCluster", None)
    if abstract is not None and "_retry_backoff_delay" in vars(abstract):
        wrappers.append((abstract, "_retry_backoff_delay", _refusal_backoff))
    for module in (redis.cluster, redis.asyncio.cluster):
        if callable(vars(module).get("_error_to_raise")):
            wrappers.append((module, "_error_to_raise", _refusal_unreachable))
    return wrappers


def _patched(redis: Any) -> list[tuple[type, str, Any]]:
    import redis.asyncio.client  # noqa: PLC0415 - imported by install()
    import redis.asyncio.cluster  # noqa: PLC0415
    import redis.asyncio.connection  # noqa: PLC0415
    import redis.asyncio.retry  # noqa: PLC0415
    import redis.client  # noqa: PLC0415
    import redis.cluster  # noqa: PLC0415
    import redis.connection  # noqa: PLC0415
    import redis.retry  # noqa: PLC0415

    aio = redis.asyncio
    return [
        (redis.retry.Retry, "call_with_retry", _retry_hook),
        (aio.retry.Retry, "call_with_retry", _async_retry_hook),
        (redis.client.Redis, "execute_command", _command_hook),
        (redis.client.Pipeline, "execute", _pipeline_hook),
        (aio.client.Redis, "execute_command", _async_command_hook),
        (aio.client.Pipeline, "execute", _async_pipeline_hook),
        (redis.cluster.RedisCluster, "_execute_command", _cluster_node_hook),
        (redis.cluster.NodesManager, "create_redis_node", _node_hook),
        (aio.cluster.RedisCluster, "_execute_command", _async_cluster_node_hook),
        (
            redis.connection.AbstractConnection,
            _on_connect(redis.connection.AbstractConnection),
            _stamp_hook,
        ),
        (
            aio.connection.AbstractConnection,
            _on_connect(aio.connection.AbstractConnection),
            _async_stamp_hook,
        ),
    ]


class RedisIntegration(DbIntegration):
    """Guards redis-py commands and pipelines, sync and asyncio (see the module
    docstring and ``docs/databases.md``)."""

    name = "redis"
    library = "redis"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _State:
        import redis.asyncio.cluster  # noqa: PLC0415 - imported by install()
        import redis.asyncio.connection  # noqa: PLC0415
        import redis.cluster  # noqa: PLC0415
        import redis.connection  # noqa: PLC0415

        error = refusal_factory(library.exceptions.ConnectionError, "RedisCircuitOpen", __name__)
        exceptions = library.exceptions
        max_connections = getattr(exceptions, "MaxConnectionsError", None)
        state = _State(
            settings,
            exceptions.WatchError,
            exceptions.ExecAbortError,
            () if max_connections is None else (max_connections,),
            frozenset(
                _opening_code(connection.AbstractConnection)
                for connection in (redis.connection, redis.asyncio.connection)
            ),
            exceptions.TimeoutError,
            error=error,
            point=failure_point_for(library),
            read_only=_read_only,
            refine=_refine,
            unjudged=_unjudged,
            unguarded=_unguarded,
            opened=_opened,
        )
        # redis-py retries a failed command itself, sleeping its backoff even on an event
        # loop's thread; raptor turns that off while it drives, so it retries in its place
        # there too, or a call made from a coroutine would lose the retry it had without us.
        hooks = (
            state.connect_hooks,
            state.locked_hooks,
            state.statement_hooks,
            state.reads_hooks,
            state.cluster_hooks,
        )
        for each in hooks:
            each.sleeps_on_event_loop = True
        state.clusters = (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
        state.cluster_down = (exceptions.ClusterDownError,)
        _cluster_retries(state.clusters, circuit_open_error_type(), allow=True)
        return state

    def release(self, state: DbState) -> None:
        if isinstance(state, _State):
            _cluster_retries(state.clusters, circuit_open_error_type(), allow=False)

    def hooks(self, library: Any) -> HookSet:
        return _wrapped(library), _patched(library)
