"""The redis-py integration, sync and ``redis.asyncio``: a breaker per server, and retries
that never replay a write whose outcome is unknown.

redis-py retries by itself: since 6.0 every client carries a ``Retry`` (in 8.x, 10 retries
with exponential backoff from 10 ms to 1 s) on ``ConnectionError`` and ``TimeoutError``, for
every command, ``INCR`` after a read timeout included. Stacking raptor's retries on top would
multiply them, and leaving redis-py's in place would replay writes that may already have been
applied. So while raptor runs a command, redis-py's ``Retry.call_with_retry`` makes a single
attempt (it still runs its failure callback, which disconnects the broken connection), and
raptor's loop decides what to retry, with the server's breaker, retry budget and telemetry:

- a command whose connection could not be opened (refused, timed out, failed ``AUTH``) never
  reached the server: it may be sent again, write or not;
- a reply saying the command was not executed (``LOADING``, ``TRYAGAIN``, ``MASTERDOWN``,
  ``CLUSTERDOWN``): sent again;
- a connection lost or timed out after sending: only a read-only command
  (:data:`~otel_raptor.core.db.REDIS_READ_ONLY_COMMANDS`) is sent again; ``INCR``, ``SET``,
  ``LPUSH``, ... are not.

Pipelines: one that only reads is a read-only command; a transaction (``MULTI``/``EXEC``,
the default) that writes may be sent again only when it was never sent or was rejected whole;
a non-transactional pipeline that writes, or one that is ``WATCH``ing, is never sent again.
A ``WatchError`` is a conflict, not a fault: it reaches the application as always (its
optimistic-locking loop retries), and counts neither as a failure nor against the breaker.

``RedisCluster`` runs its own retry loop (redirections, slot-table refreshes, and retries of
connection errors that include writes): raptor adds no retries on top, and puts a breaker per
cluster (named after its first startup node) around each call.

What it hooks: ``Redis.execute_command``, ``Pipeline.execute`` (sync and asyncio),
``RedisCluster.execute_command`` and ``ClusterPipeline.execute``, plus ``Retry.call_with_retry``
and ``AbstractConnection.connect_check_health`` (``connect`` before redis-py 6), to turn
retries off and to mark failures to connect. See ``docs/databases.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from otel_raptor.core.classification import Classification
from otel_raptor.core.db import REDIS_NOT_EXECUTED, FailurePoint, redis_read_only
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations._base import IntegrationSettings
from otel_raptor.integrations._kit import call, call_async, library_error
from otel_raptor.integrations.db._common import (
    DbIntegration,
    DbState,
    DbTarget,
    HookSet,
    PointOf,
    Server,
    is_not_sent,
    mark_not_sent,
    refusal_factory,
)
from otel_raptor.runtime.drive import CallPlan
from otel_raptor.runtime.safety import report_internal_error

if TYPE_CHECKING:
    import redis as _redis

    class RedisCircuitOpen(CircuitOpenError, _redis.exceptions.ConnectionError):
        """A refusal by an open breaker; see :func:`circuit_open_error_type`."""


__all__ = ["RedisCircuitOpen", "RedisIntegration", "circuit_open_error_type"]

SYSTEM: Final = "redis"
#: The attribute under which a connection pool (or a cluster client) keeps its target.
TARGET_ATTRIBUTE: Final = "_otel_raptor_db"

# Set while raptor runs a command: redis-py's Retry then makes one attempt.
_driving: ContextVar[bool] = ContextVar("otel_raptor_redis_driving", default=False)


class _Marker:
    """What a pipeline is, for the replay judgement (which reads the call's first argument)."""

    __slots__ = ("read_only",)

    def __init__(self, *, read_only: bool) -> None:
        self.read_only = read_only


_READS: Final = _Marker(read_only=True)
_WRITES: Final = _Marker(read_only=False)


def _read_only(args: tuple[Any, ...]) -> bool:
    first = args[0] if args else None
    if isinstance(first, _Marker):
        return first.read_only
    return len(args) > 1 and redis_read_only(args[1])


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

    def failure_point(
        error: BaseException, classification: Classification
    ) -> tuple[FailurePoint, bool]:
        if is_not_sent(error):
            return FailurePoint.NOT_SENT, True
        if isinstance(error, not_executed):
            return FailurePoint.ROLLED_BACK, True
        if isinstance(error, transport):
            return FailurePoint.UNKNOWN, True  # the pool reconnects for the next attempt
        return FailurePoint.FAILED, True  # the server answered

    return failure_point


class _State(DbState):
    __slots__ = ("watch_error",)

    def __init__(
        self, settings: IntegrationSettings, watch_error: type[BaseException], **options: Any
    ) -> None:
        super().__init__(settings, **options)
        self.watch_error = watch_error


_installed: _State | None = None


def _server_of_pool(pool: Any) -> Server:
    kwargs = pool.connection_kwargs
    database = str(kwargs.get("db", 0))
    path = kwargs.get("path")
    if path:
        return Server(SYSTEM, str(path), None, database)
    return Server(
        SYSTEM,
        str(kwargs.get("host", "localhost")).lower(),
        int(kwargs.get("port", 6379)),
        database,
    )


def _target(state: _State, pool: Any) -> DbTarget:
    target: DbTarget | None = getattr(pool, TARGET_ATTRIBUTE, None)
    if target is None or target.owner is not state:
        target = state.target(_server_of_pool(pool))
        setattr(pool, TARGET_ATTRIBUTE, target)
    return target


def _cluster_target(state: _State, cluster: Any) -> DbTarget:
    target: DbTarget | None = getattr(cluster, TARGET_ATTRIBUTE, None)
    if target is None or target.owner is not state:
        nodes = list(cluster.nodes_manager.startup_nodes.values())
        first = nodes[0] if nodes else cluster.get_default_node()
        target = state.target(Server(SYSTEM, str(first.host).lower(), int(first.port), None))
        setattr(cluster, TARGET_ATTRIBUTE, target)
    return target


# --- turning redis-py's own retries off while raptor drives -----------------------------------


def _failure_handling(
    is_retryable: Callable[[Exception], bool] | None = None,
    with_failure_count: bool = False,
) -> tuple[Callable[[Exception], bool] | None, bool]:
    """``call_with_retry``'s arguments after ``do`` and ``fail`` (redis-py 5 has none)."""
    return is_retryable, with_failure_count


def _retry_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``redis.retry.Retry.call_with_retry``: one attempt while raptor drives.
    ``do`` and ``fail`` are named as in redis-py, so a success reads nothing else."""

    def call_with_retry(self: Any, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        if not _driving.get():
            return original(self, do, fail, *args, **kwargs)
        try:
            return do()
        except self._supported_errors as error:
            is_retryable, with_failure_count = _failure_handling(*args, **kwargs)
            if is_retryable is None or is_retryable(error):
                if with_failure_count:
                    fail(error, 1)
                else:
                    fail(error)
            raise

    return call_with_retry


def _async_retry_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``redis.asyncio.retry.Retry.call_with_retry``."""

    async def call_with_retry(self: Any, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        if not _driving.get():
            return await original(self, do, fail, *args, **kwargs)
        try:
            return await do()
        except self._supported_errors as error:
            is_retryable, with_failure_count = _failure_handling(*args, **kwargs)
            if is_retryable is None or is_retryable(error):
                if with_failure_count:
                    await fail(error, 1)
                else:
                    await fail(error)
            raise

    return call_with_retry


def _connect_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``AbstractConnection.connect_check_health``: a failure there happened
    before any command was sent."""

    def connect_check_health(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except Exception as error:
            mark_not_sent(error)
            raise

    return connect_check_health


def _async_connect_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``redis.asyncio`` ``AbstractConnection.connect_check_health``."""

    async def connect_check_health(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except Exception as error:
            mark_not_sent(error)
            raise

    return connect_check_health


# --- commands ---------------------------------------------------------------------------------


def _command_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Redis.execute_command``."""

    def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        state = _installed
        if state is None:
            return original(self, *args, **options)
        try:
            # _target() inlined: this runs for every command.
            target = getattr(self.connection_pool, TARGET_ATTRIBUTE, None)
            if target is None or target.owner is not state:
                target = _target(state, self.connection_pool)
            plan = target.statement if target.enabled else None
        except Exception as bug:  # noqa: BLE001 - never break the host app
            report_internal_error("redis.describe", bug)
            plan = None
        if plan is None:
            return original(self, *args, **options)
        token = _driving.set(True)
        try:
            return call(plan, original, (self, *args), options)
        finally:
            _driving.reset(token)

    return execute_command


def _async_command_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``redis.asyncio`` ``Redis.execute_command``."""

    async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        state = _installed
        if state is None:
            return await original(self, *args, **options)
        try:
            target = getattr(self.connection_pool, TARGET_ATTRIBUTE, None)
            if target is None or target.owner is not state:
                target = _target(state, self.connection_pool)
            plan = target.statement if target.enabled else None
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe", bug)
            plan = None
        if plan is None:
            return await original(self, *args, **options)
        token = _driving.set(True)
        try:
            return await call_async(plan, original, (self, *args), options)
        finally:
            _driving.reset(token)

    return execute_command


def _pipeline_plan(target: DbTarget, pipe: Any) -> tuple[CallPlan, _Marker]:
    stack = pipe.command_stack
    if all(redis_read_only(args[0]) for args, _ in stack if args):
        return target.statement, _READS
    if pipe.watching or not (pipe.transaction or pipe.explicit_transaction):
        return target.locked, _WRITES
    return target.statement, _WRITES


class _PipelineRun:
    """One ``Pipeline.execute`` as the loop runs it: each attempt after the first puts back
    what the previous one's ``reset()`` cleared (the commands, the scripts, ``MULTI``)."""

    __slots__ = ("explicit", "original", "pipe", "scripts", "stack", "started", "watch_error")

    def __init__(
        self, original: Callable[..., Any], pipe: Any, watch_error: type[BaseException]
    ) -> None:
        self.original = original
        self.pipe = pipe
        self.stack = list(pipe.command_stack)
        self.scripts = set(pipe.scripts)
        self.explicit = pipe.explicit_transaction
        self.started = False
        self.watch_error = watch_error

    def restore(self) -> None:
        if self.started:
            pipe = self.pipe
            pipe.command_stack = list(self.stack)
            pipe.scripts = set(self.scripts)
            pipe.explicit_transaction = self.explicit
        self.started = True

    def __call__(self, marker: _Marker, *args: Any, **kwargs: Any) -> Any:
        self.restore()
        try:
            return self.original(self.pipe, *args, **kwargs)
        except self.watch_error as conflict:
            return _Conflict(conflict)


class _AsyncPipelineRun(_PipelineRun):
    __slots__ = ()

    async def __call__(self, marker: _Marker, *args: Any, **kwargs: Any) -> Any:
        self.restore()
        try:
            return await self.original(self.pipe, *args, **kwargs)
        except self.watch_error as conflict:
            return _Conflict(conflict)


def _settled(result: Any) -> Any:
    if type(result) is _Conflict:
        raise result.error
    return result


def _pipeline_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``Pipeline.execute``."""

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None or not self.command_stack:
            return original(self, *args, **kwargs)
        try:
            target = _target(state, self.connection_pool)
            if not target.enabled:
                return original(self, *args, **kwargs)
            plan, marker = _pipeline_plan(target, self)
            run = _PipelineRun(original, self, state.watch_error)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe_pipeline", bug)
            return original(self, *args, **kwargs)
        token = _driving.set(True)
        try:
            return _settled(call(plan, run, (marker, *args), kwargs))
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
            if not target.enabled:
                return await original(self, *args, **kwargs)
            plan, marker = _pipeline_plan(target, self)
            run = _AsyncPipelineRun(original, self, state.watch_error)
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe_pipeline", bug)
            return await original(self, *args, **kwargs)
        token = _driving.set(True)
        try:
            return _settled(await call_async(plan, run, (marker, *args), kwargs))
        finally:
            _driving.reset(token)

    return execute


def _cluster_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """The hook on ``RedisCluster.execute_command`` and ``ClusterPipeline.execute``: a breaker,
    no retries of ours (the cluster client runs its own)."""

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return original(self, *args, **kwargs)
        try:
            target = _cluster_target(state, self)
            plan = target.locked if target.enabled else None
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe_cluster", bug)
            plan = None
        if plan is None:
            return original(self, *args, **kwargs)
        return call(plan, original, (self, *args), kwargs)

    return execute


def _async_cluster_hook(original: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hook on ``redis.asyncio`` ``RedisCluster.execute_command``."""

    async def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _installed
        if state is None:
            return await original(self, *args, **kwargs)
        try:
            target = _cluster_target(state, self)
            plan = target.locked if target.enabled else None
        except Exception as bug:  # noqa: BLE001
            report_internal_error("redis.describe_cluster", bug)
            plan = None
        if plan is None:
            return await original(self, *args, **kwargs)
        return await call_async(plan, original, (self, *args), kwargs)

    return execute


def _opening(connection_class: type) -> str:
    return "connect_check_health" if "connect_check_health" in vars(connection_class) else "connect"


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
    sync_connection = redis.connection.AbstractConnection
    async_connection = aio.connection.AbstractConnection
    return [
        (redis.retry.Retry, "call_with_retry", _retry_hook),
        (aio.retry.Retry, "call_with_retry", _async_retry_hook),
        # Where a connection is opened: connect_check_health since redis-py 6, connect before.
        (sync_connection, _opening(sync_connection), _connect_hook),
        (async_connection, _opening(async_connection), _async_connect_hook),
        (redis.client.Redis, "execute_command", _command_hook),
        (redis.client.Pipeline, "execute", _pipeline_hook),
        (aio.client.Redis, "execute_command", _async_command_hook),
        (aio.client.Pipeline, "execute", _async_pipeline_hook),
        (redis.cluster.RedisCluster, "execute_command", _cluster_hook),
        (redis.cluster.ClusterPipeline, "execute", _cluster_hook),
        (aio.cluster.RedisCluster, "execute_command", _async_cluster_hook),
    ]


class RedisIntegration(DbIntegration):
    """Guards redis-py commands and pipelines, sync and asyncio (see the module
    docstring and ``docs/databases.md``)."""

    name = "redis"
    library = "redis"

    def new_state(self, settings: IntegrationSettings, library: Any) -> _State:
        error = refusal_factory(library.exceptions.ConnectionError, "RedisCircuitOpen", __name__)
        return _State(
            settings,
            library.exceptions.WatchError,
            error=error,
            point=failure_point_for(library),
            read_only=_read_only,
        )

    def hooks(self, library: Any) -> HookSet:
        return (), _patched(library)
