"""The redis-py integration against the real Redis (and a one-node cluster of our own):
redis-py's own retries turned off while raptor drives, writes never replayed when their
outcome is unknown, reads and never-sent commands retried, WatchError left alone."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.backoff
import redis.cluster
import redis.retry
from redis.cluster import RedisCluster

from otel_raptor import CircuitOpenError
from otel_raptor.config import DownstreamOverride
from otel_raptor.core.events import BreakerTransitioned, ErrorClassified, RecoveryFinished
from otel_raptor.core.recovery import Outcome
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations.db.redis import RedisIntegration, circuit_open_error_type
from tests.integrations.db.conftest import Install
from tests.support.dbservers import PrivateRedis, free_port
from tests.support.services import REDIS
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.usefixtures("redis_server")

OPEN = CircuitState.OPEN

ORIGINAL_EXECUTE = redis.Redis.execute_command
ORIGINAL_CALL_WITH_RETRY = redis.retry.Retry.call_with_retry
SERVICE = f"redis://{REDIS[0]}:{REDIS[1]}/0"


@pytest.fixture
def key(unique_name: str) -> Iterator[str]:
    yield unique_name
    redis.Redis(host=REDIS[0], port=REDIS[1]).delete(unique_name)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(REDIS) as started:
        yield started


def length(key: str) -> int:
    return int(redis.Redis(host=REDIS[0], port=REDIS[1]).llen(key))


def test_uninstall_restores_the_methods(install: Install) -> None:
    installed = install(RedisIntegration)
    assert redis.Redis.execute_command is not ORIGINAL_EXECUTE
    installed.integration.uninstall()
    assert redis.Redis.execute_command is ORIGINAL_EXECUTE
    assert redis.retry.Retry.call_with_retry is ORIGINAL_CALL_WITH_RETRY


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((), {}, [("fail",)]),  # redis-py 5: do and fail only
        ((None, True), {}, [("fail", 1)]),
        ((), {"with_failure_count": True}, [("fail", 1)]),
        ((), {"is_retryable": lambda error: False}, []),
        ((lambda error: True,), {"with_failure_count": False}, [("fail",)]),
    ],
)
@pytest.mark.parametrize("hook", ["same signature", "any signature"])
def test_while_raptor_drives_redis_py_makes_one_attempt_whatever_the_call_shape(
    install: Install,
    monkeypatch: pytest.MonkeyPatch,
    hook: str,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    expected: list[tuple],
) -> None:
    from otel_raptor.integrations.db.redis import _driving, _retry_hook

    install(RedisIntegration)
    installed = redis.retry.Retry.call_with_retry
    kinds = {p.kind for p in inspect.signature(installed).parameters.values()}
    # This redis-py's signature is the known one: the hook takes its parameters as they are.
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    if hook == "any signature":  # another redis-py's: the hook takes *args and **kwargs

        def other(self: object, do: object, fail: object, *a: object, **k: object) -> object:
            return installed(self, do, fail, *a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(redis.retry.Retry, "call_with_retry", _retry_hook(other))
    retry = redis.retry.Retry(redis.backoff.NoBackoff(), retries=5)
    attempts: list[int] = []
    failures: list[tuple] = []

    def do() -> None:
        attempts.append(1)
        raise redis.ConnectionError("down")

    def fail(error: Exception, *count: int) -> None:
        failures.append(("fail", *count))

    token = _driving.set(True)
    try:
        with pytest.raises(redis.ConnectionError):
            retry.call_with_retry(do, fail, *args, **kwargs)
        # do and fail by keyword as well
        assert retry.call_with_retry(do=lambda: "ok", fail=fail) == "ok"
    finally:
        _driving.reset(token)
    assert (len(attempts), failures) == (1, expected)
    # Outside raptor's loop, redis-py's own retries are untouched.
    attempts.clear()
    with pytest.raises(redis.ConnectionError):
        retry.call_with_retry(do, lambda error: None)
    assert len(attempts) == 6


def test_plain_redis_py_doubles_a_write_whose_answer_was_lost(proxy: FaultProxy, key: str) -> None:
    """The problem: without raptor, redis-py's own retry sends the RPUSH again."""
    client = redis.Redis(host="127.0.0.1", port=proxy.port)  # redis-py's default retry
    client.ping()
    proxy.cut_responses_after(0, once=True)
    assert client.rpush(key, "once") == 2  # the second RPUSH's own answer
    assert length(key) == 2


def test_a_write_whose_answer_was_lost_is_sent_once(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration)
    client = redis.Redis(host="127.0.0.1", port=proxy.port)  # redis-py's default: 10 retries
    client.ping()
    proxy.cut_responses_after(0, once=True)
    with pytest.raises(redis.ConnectionError):
        client.rpush(key, "once")
    assert length(key) == 1
    [finished] = installed.of(RecoveryFinished)
    assert (finished.attempts, finished.give_up_reason) == (1, "not_replay_safe")


def test_a_read_whose_answer_was_lost_on_an_event_loops_thread_is_retried(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    """A sync client called from a coroutine: without raptor, redis-py's own retry reads
    again (sleeping its backoff on the loop); raptor, which turned that retry off, must retry
    in its place rather than hand the app a failure it would not have seen."""
    installed = install(RedisIntegration)
    redis.Redis(host=REDIS[0], port=REDIS[1]).set(key, "v")
    client = redis.Redis(host="127.0.0.1", port=proxy.port)
    client.ping()
    proxy.cut_responses_after(0, once=True)

    async def reads() -> bytes | None:
        return client.get(key)  # type: ignore[return-value]

    assert asyncio.run(reads()) == b"v"
    [finished] = installed.of(RecoveryFinished)
    assert (finished.attempts, finished.outcome) == (2, Outcome.RECOVERED.value)


def test_a_read_whose_answer_was_lost_is_retried_by_raptor_alone(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration)
    redis.Redis(host=REDIS[0], port=REDIS[1]).rpush(key, "a", "b")
    client = redis.Redis(host="127.0.0.1", port=proxy.port)
    client.ping()
    proxy.cut_responses_after(0, once=True)
    assert client.lrange(key, 0, -1) == [b"a", b"b"]
    assert proxy.cuts == 1
    [finished] = installed.of(RecoveryFinished)
    assert (finished.outcome, finished.attempts) == (Outcome.RECOVERED, 2)


def test_a_write_that_was_never_sent_is_retried(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, max_retries=40, failure_threshold=100)
    client = redis.Redis(host="127.0.0.1", port=proxy.port)
    proxy.refuse()
    healer = threading.Timer(0.03, proxy.heal)
    healer.start()
    try:
        assert client.incr(key) == 1
    finally:
        healer.join()
    [finished] = installed.of(RecoveryFinished)
    assert finished.outcome is Outcome.RECOVERED
    assert finished.attempts >= 2
    redis.Redis(host=REDIS[0], port=REDIS[1]).delete(key)


async def test_an_asyncio_write_that_was_never_sent_is_retried(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, max_retries=40, failure_threshold=100)
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    proxy.refuse()
    healer = threading.Timer(0.03, proxy.heal)
    healer.start()
    try:
        assert await client.incr(key) == 1
        pipe = client.pipeline()  # MULTI/EXEC: all or nothing, so replayed when unsent
        pipe.incr(key)
        proxy.refuse()
        healer = threading.Timer(0.03, proxy.heal)
        healer.start()
        await client.connection_pool.disconnect()
        assert await pipe.execute() == [2]
    finally:
        healer.join()
        await client.aclose()
    assert [f.outcome for f in installed.of(RecoveryFinished)] == [Outcome.RECOVERED] * 2
    redis.Redis(host=REDIS[0], port=REDIS[1]).delete(key)


def test_pipelines(install: Install, proxy: FaultProxy, key: str) -> None:
    installed = install(RedisIntegration)
    client = redis.Redis(host="127.0.0.1", port=proxy.port)
    client.rpush(key, "x")
    # A read-only pipeline is retried, with its commands intact.
    proxy.cut_responses_after(0, once=True)
    pipe = client.pipeline()
    pipe.llen(key).lrange(key, 0, -1)
    assert pipe.execute() == [1, [b"x"]]
    # A transaction that writes, whose answer was lost: sent once.
    proxy.cut_responses_after(0, once=True)
    pipe = client.pipeline()
    pipe.rpush(key, "y").llen(key)
    with pytest.raises(redis.ConnectionError):
        pipe.execute()
    assert length(key) == 2
    attempts = [f.attempts for f in installed.of(RecoveryFinished)]
    assert attempts == [2, 1]


def test_a_watch_error_is_a_conflict_not_a_failure(install: Install, key: str) -> None:
    installed = install(RedisIntegration, failure_threshold=1)
    client = redis.Redis(host=REDIS[0], port=REDIS[1])
    for _ in range(3):
        with client.pipeline() as pipe:
            pipe.watch(key)
            pipe.multi()
            pipe.incr(key)
            client.incr(key)  # someone else changes the watched key
            with pytest.raises(redis.WatchError):
                pipe.execute()
    assert not installed.of(ErrorClassified)
    assert not installed.of(BreakerTransitioned)
    assert client.get(key) == b"3"


def test_an_open_breaker_fails_fast_as_a_redis_connection_error(install: Install) -> None:
    install(RedisIntegration, max_retries=0)
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            client.get("x")
    started = time.perf_counter()
    with pytest.raises(redis.ConnectionError) as refused:
        client.get("x")
    assert time.perf_counter() - started < 0.05
    assert isinstance(refused.value, CircuitOpenError)
    assert isinstance(refused.value, circuit_open_error_type())


async def test_asyncio_commands_and_pipelines(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration)
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    try:
        await client.ping()
        proxy.cut_responses_after(0)
        with pytest.raises(redis.ConnectionError):
            await client.rpush(key, "once")
        proxy.heal()
        assert length(key) == 1
        proxy.cut_responses_after(0, once=True)
        pipe = client.pipeline()
        pipe.llen(key)
        assert await pipe.execute() == [1]
    finally:
        await client.aclose()
    attempts = [f.attempts for f in installed.of(RecoveryFinished)]
    assert attempts == [1, 2]


def test_a_cluster_gets_a_breaker_and_keeps_its_own_retries(
    install: Install, unique_name: str
) -> None:
    server = PrivateRedis(cluster=True)
    try:
        server.start()
        installed = install(RedisIntegration, max_retries=0, failure_threshold=2)
        cluster = RedisCluster(host="127.0.0.1", port=server.port)
        cluster.set(unique_name, "1")
        assert cluster.get(unique_name) == b"1"
        pipe = cluster.pipeline()
        pipe.set(unique_name, "2").get(unique_name)
        assert pipe.execute() == [True, b"2"]
        assert not installed.of(RecoveryFinished)
        server.close()
        for _ in range(2):
            with pytest.raises((redis.RedisError, redis.exceptions.RedisClusterException)):
                cluster.get(unique_name)
        with pytest.raises(CircuitOpenError):
            cluster.get(unique_name)
        # The cluster's own breaker opened; the node client the cluster client refreshes its
        # slot table with (a plain Redis client it made, without retries) is left alone.
        opened = {t.breaker for t in installed.of(BreakerTransitioned) if t.to_state is OPEN}
        assert opened == {f"redis://127.0.0.1:{server.port}/"}
    finally:
        server.close()


#: redis-py's cluster errors are not ``RedisError``s.
ANY_REDIS_ERROR = (redis.RedisError, redis.exceptions.RedisClusterException)
UNREACHABLE_AS_REDIS_PY = pytest.mark.skipif(
    not hasattr(redis.cluster, "_error_to_raise"),
    reason="redis-py before 8.2 raises a cluster's connection errors as they are",
)


@UNREACHABLE_AS_REDIS_PY
def test_a_refusal_by_a_cluster_no_node_answers_is_redis_pys_unreachable_error(
    install: Install, unique_name: str
) -> None:
    """redis-py 8.2 ends a call on a connection error, once a slot-table reread reached no
    node, with a ``RedisClusterUnreachableError`` (not a ``RedisError``). A node's refusal
    stands for that connection error: it is raised as one that is both, so that
    ``except RedisClusterException`` catches it as it did without raptor, and so do the
    clauses a refusal met before (``ConnectionError``, ``RedisError``); it still fails
    fast."""
    server = PrivateRedis(cluster=True)
    try:
        server.start()
        install(RedisIntegration, max_retries=0, failure_threshold=2, recovery_timeout=60)
        cluster = RedisCluster(host="127.0.0.1", port=server.port)
        cluster.set(unique_name, "1")
        server.close()
        deadline = time.monotonic() + 10
        while True:
            started = time.monotonic()
            with pytest.raises(ANY_REDIS_ERROR) as raised:
                cluster.get(unique_name)
            if isinstance(raised.value, CircuitOpenError) and isinstance(
                raised.value, redis.exceptions.RedisClusterException
            ):
                break
            assert time.monotonic() < deadline, "no refusal was raised as unreachable"
            time.sleep(0.2)  # until the breaker is open and a reread has reached no node
        assert isinstance(raised.value, redis.exceptions.RedisClusterUnreachableError)
        assert isinstance(raised.value, redis.exceptions.ConnectionError)
        assert time.monotonic() - started < 0.5
        cluster.close()
    finally:
        server.close()


@UNREACHABLE_AS_REDIS_PY
async def test_an_asyncio_clusters_refusal_no_node_answers_is_redis_pys_unreachable_error(
    install: Install, unique_name: str
) -> None:
    import redis.asyncio.cluster

    server = PrivateRedis(cluster=True)
    try:
        server.start()
        install(RedisIntegration, max_retries=0, failure_threshold=2, recovery_timeout=60)
        cluster = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=server.port)
        try:
            await cluster.set(unique_name, "1")
            server.close()
            deadline = time.monotonic() + 10
            while True:
                started = time.monotonic()
                with pytest.raises(ANY_REDIS_ERROR) as raised:
                    await cluster.get(unique_name)
                if isinstance(raised.value, CircuitOpenError) and isinstance(
                    raised.value, redis.exceptions.RedisClusterException
                ):
                    break
                assert time.monotonic() < deadline, "no refusal was raised as unreachable"
                await asyncio.sleep(0.2)
            assert isinstance(raised.value, redis.exceptions.RedisClusterUnreachableError)
            assert time.monotonic() - started < 0.5
        finally:
            await cluster.aclose()
    finally:
        server.close()


async def test_an_asyncio_cluster_is_guarded(install: Install, unique_name: str) -> None:
    import redis.asyncio.cluster

    server = PrivateRedis(cluster=True)
    try:
        server.start()
        # One failure opens the node's breaker: after it, the asyncio cluster client fails
        # rereading its slot table (every node is down) before it sends to a node again.
        installed = install(RedisIntegration, max_retries=0, failure_threshold=1)
        cluster = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=server.port)
        try:
            await cluster.set(unique_name, "1")
            assert await cluster.get(unique_name) == b"1"
            server.close()
            for _ in range(3):
                with pytest.raises((redis.RedisError, redis.exceptions.RedisClusterException)):
                    await cluster.get(unique_name)
        finally:
            await cluster.aclose()
        opened = {t.breaker for t in installed.of(BreakerTransitioned) if t.to_state is OPEN}
        assert f"redis://127.0.0.1:{server.port}/" in opened
    finally:
        server.close()


# --- who drives: redis-py's own retries on and off --------------------------------------------

#: The retries redis-py's loop made (each backoff it computed), across the deep copies of
#: a ``Retry`` that every connection gets.
BACKED_OFF: list[int] = []


class CountingBackoff(redis.backoff.NoBackoff):
    def compute(self, failures: int) -> float:
        BACKED_OFF.append(failures)
        return 0


def _users_retry() -> redis.retry.Retry:
    return redis.retry.Retry(CountingBackoff(), 3)


def _retries_of(run: Callable[[], object]) -> list[int]:
    BACKED_OFF.clear()
    with pytest.raises(redis.ConnectionError):
        run()
    return list(BACKED_OFF)


def test_a_command_raptor_drives_gets_one_redis_py_try_per_attempt(install: Install) -> None:
    """On the fast lane nothing marks the command as driven: the retry hook asks the call
    stack when a try fails. The unsent command is retried by raptor's loop, never by both."""
    client = redis.Redis(port=free_port(), retry=_users_retry(), socket_connect_timeout=1)
    assert _retries_of(lambda: client.get("k")) == [1, 2, 3]  # without raptor
    installed = install(RedisIntegration, max_retries=2)
    assert _retries_of(lambda: client.get("k")) == []
    [finished] = installed.of(RecoveryFinished)
    assert finished.attempts == 3


@pytest.mark.parametrize("left_alone", ["disabled server", "pubsub"])
def test_what_raptor_does_not_drive_keeps_the_users_retry(
    install: Install, left_alone: str
) -> None:
    """A server whose policy is disabled, and a ``PubSub`` (which raptor does not hook) on a
    guarded pool: redis-py's own loop runs the user's ``Retry``, as without raptor, after the
    retry hook's first try failed."""
    port = free_port()
    client = redis.Redis(port=port, retry=_users_retry(), socket_connect_timeout=1)

    def run() -> object:
        if left_alone == "pubsub":
            return client.pubsub().subscribe("raptor-channel")
        return client.get("k")

    without = _retries_of(run)
    assert without  # the user's Retry retries
    options: dict[str, Any] = {}
    if left_alone == "disabled server":
        options["downstreams"] = (DownstreamOverride(pattern=f"localhost:{port}", enabled=False),)
    install(RedisIntegration, max_retries=2, **options)
    assert _retries_of(run) == without


async def _async_retries_of(run: Callable[[], Any]) -> list[int]:
    BACKED_OFF.clear()
    with pytest.raises(redis.ConnectionError):
        await run()
    return list(BACKED_OFF)


async def test_asyncio_who_drives_decides_redis_pys_retries(install: Install) -> None:
    """:func:`test_a_command_raptor_drives_gets_one_redis_py_try_per_attempt` and the disabled
    server of the test after it, for ``redis.asyncio``: its chain of awaits is the stack."""
    import redis.asyncio.retry

    def users_retry() -> redis.asyncio.retry.Retry:
        return redis.asyncio.retry.Retry(CountingBackoff(), 3)

    driven_port, left_port = free_port(), free_port()
    driven = redis.asyncio.Redis(port=driven_port, retry=users_retry(), socket_connect_timeout=1)
    left = redis.asyncio.Redis(port=left_port, retry=users_retry(), socket_connect_timeout=1)
    try:
        assert await _async_retries_of(lambda: driven.get("k")) == [1, 2, 3]
        without = await _async_retries_of(lambda: left.get("k"))
        assert without
        override = DownstreamOverride(pattern=f"localhost:{left_port}", enabled=False)
        installed = install(RedisIntegration, max_retries=2, downstreams=(override,))
        assert await _async_retries_of(lambda: driven.get("k")) == []
        [finished] = installed.of(RecoveryFinished)
        assert finished.attempts == 3
        assert await _async_retries_of(lambda: left.get("k")) == without
    finally:
        await driven.aclose()
        await left.aclose()
