"""The redis-py integration at its edges, against real servers: Sentinel-managed services,
connection pools that run out, the cluster client's own node clients, health checks, "not
executed" replies after a script ran, and asyncio pipelines without ``MULTI``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.cluster
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from otel_raptor import CircuitOpenError
from otel_raptor.core.classification import ErrorCategory
from otel_raptor.core.events import (
    BreakerTransitioned,
    ErrorClassified,
    RecoveryFinished,
    RetryScheduled,
)
from otel_raptor.core.recovery import Outcome
from otel_raptor.core.states import CircuitState
from otel_raptor.integrations.db.redis import TARGET_ATTRIBUTE, RedisIntegration
from tests.integrations.db.conftest import Install, Installed
from tests.support.dbservers import PrivateRedis, find_binary, free_port
from tests.support.resp_server import ScriptedRedis
from tests.support.services import REDIS
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.usefixtures("redis_server")

OPEN = CircuitState.OPEN
SERVICE = f"redis://{REDIS[0]}:{REDIS[1]}/0"
# A script that writes, then answers with a "try again" error reply.
INCR_THEN_TRYAGAIN = "redis.call('INCR', KEYS[1]); return redis.error_reply('TRYAGAIN later')"
TRYAGAIN = "return redis.error_reply('TRYAGAIN later')"


def shared() -> redis.Redis:
    return redis.Redis(host=REDIS[0], port=REDIS[1])


@pytest.fixture
def key(unique_name: str) -> Iterator[str]:
    yield unique_name
    shared().delete(unique_name)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy(REDIS) as started:
        yield started


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.close()


def opened(installed: Installed) -> set[str]:
    return {t.breaker for t in installed.of(BreakerTransitioned) if t.to_state is OPEN}


def attempts(installed: Installed) -> list[int]:
    return [f.attempts for f in installed.of(RecoveryFinished)]


# --- Sentinel: a breaker per service, never localhost's --------------------------------------


class PrivateSentinel:
    """A Sentinel of our own watching ``masters`` (service name -> port on 127.0.0.1); it
    never fails over during a test (a master is down only after 60 s)."""

    def __init__(self, root: Path, masters: dict[str, int]) -> None:
        binary = find_binary("redis-server")
        self.port = free_port()
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {root}", "protected-mode no"]
        for name, port in masters.items():
            lines.append(f"sentinel monitor {name} 127.0.0.1 {port} 1")
            lines.append(f"sentinel down-after-milliseconds {name} 60000")
        config = root / "sentinel.conf"
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [binary, str(config), "--sentinel", "--logfile", str(root / "sentinel.log")]
        )
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the sentinel never listened")
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(Exception):
                self.process.wait(timeout=30)


def test_sentinel_services_have_breakers_of_their_own(install: Install, tmp_path: Path) -> None:
    one, two = PrivateRedis(), PrivateRedis()
    sentinel_server: PrivateSentinel | None = None
    try:
        one.start()
        two.start()
        sentinel_server = PrivateSentinel(tmp_path, {"svc_one": one.port, "svc_two": two.port})
        installed = install(RedisIntegration, max_retries=0, failure_threshold=3)
        sentinel = Sentinel([("127.0.0.1", sentinel_server.port)], socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:  # until the sentinel has looked at both masters
            try:
                sentinel.discover_master("svc_one")
                sentinel.discover_master("svc_two")
                break
            except redis.sentinel.MasterNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        first = sentinel.master_for("svc_one", socket_timeout=2)
        second = sentinel.master_for("svc_two", socket_timeout=2)
        replicas = sentinel.slave_for("svc_one", socket_timeout=2)
        local = redis.Redis()  # localhost:6379, the name a Sentinel pool used to get
        assert [first.ping(), second.ping(), replicas.ping()] == [True, True, True]
        names = [
            getattr(client.connection_pool, TARGET_ATTRIBUTE).service
            for client in (first, second, replicas)
        ]
        sentinels = f"redis-sentinel://127.0.0.1:{sentinel_server.port}"
        assert names == [
            f"{sentinels}/svc_one/0",
            f"{sentinels}/svc_two/0",
            f"{sentinels}/svc_one/0/replicas",
        ]
        one.shutdown_nosave()  # svc_one's master is gone; the sentinel does not know yet
        for _ in range(3):
            with pytest.raises(redis.ConnectionError):
                first.get("x")
        with pytest.raises(CircuitOpenError):
            first.get("x")
        # The other service, and a plain client of localhost, are not shut out.
        assert second.get("x") is None
        with contextlib.suppress(redis.ConnectionError):  # absent when REDIS is elsewhere
            assert local.get("x") is None
        assert opened(installed) == {f"{sentinels}/svc_one/0"}
    finally:
        if sentinel_server is not None:
            sentinel_server.close()
        one.close()
        two.close()


# --- Sentinel: a failover demotes the master a pool is connected to ---------------------------


class Service:
    """Sentinel service ``svc``: master ``old``, its replica ``new``, the sentinel's port."""

    def __init__(self, old: PrivateRedis, new: PrivateRedis, sentinel_port: int) -> None:
        self.old, self.new, self.sentinel_port = old, new, sentinel_port
        self.sentinel = Sentinel([("127.0.0.1", sentinel_port)], socket_timeout=2)


@contextlib.contextmanager
def service_with_a_replica(tmp_path: Path) -> Iterator[Service]:
    """``svc``: a master, its replica and a Sentinel that knows both (not failed over yet)."""
    # No wait before a diskless full sync (5 s by default, for more replicas to join).
    old = PrivateRedis(options=("--repl-diskless-sync-delay", "0"))
    new = PrivateRedis()
    sentinel_server: PrivateSentinel | None = None
    try:
        old.start()
        new.start()
        replica = redis.Redis(port=new.port)
        replica.replicaof("127.0.0.1", old.port)
        sentinel_server = PrivateSentinel(tmp_path, {"svc": old.port})
        service = Service(old, new, sentinel_server.port)
        deadline = time.monotonic() + 30
        while (link := replica.info("replication")).get("master_link_status") != "up":
            if time.monotonic() > deadline:  # say why: CI saw this once, never locally
                logs = {
                    server.port: (server.root / "log").read_text()[-3000:] for server in (old, new)
                }
                raise AssertionError(f"the replica never synchronised: {link}, {logs}")
            time.sleep(0.1)
        replica.close()
        while not service.sentinel.discover_slaves("svc"):  # learnt from the master's INFO
            assert time.monotonic() < deadline, "the sentinel never saw the replica"
            time.sleep(0.1)
        yield service
    finally:
        if sentinel_server is not None:
            sentinel_server.close()
        old.close()
        new.close()


def demote(service: Service) -> None:
    """The replica becomes the master and the old master its replica, Sentinel naming the new
    one, with the application's connections to the old master left open: a failover as the
    connections that miss Sentinel's ``CLIENT KILL`` see it (one opened during the failover,
    or an operator's ``REPLICAOF`` that Sentinel follows)."""
    old = redis.Redis(port=service.old.port, socket_timeout=30)
    new = redis.Redis(port=service.new.port)
    assert old.wait(1, 10_000) == 1  # the replica has every write
    new.replicaof("NO", "ONE")
    old.replicaof("127.0.0.1", service.new.port)
    sentinel = service.sentinel.sentinels[0]
    sentinel.execute_command("SENTINEL REMOVE", "svc")
    sentinel.execute_command("SENTINEL MONITOR", "svc", "127.0.0.1", service.new.port, 1)
    assert service.sentinel.discover_master("svc")[1] == service.new.port
    old.close()
    new.close()


def test_a_write_a_demoted_master_refused_goes_to_the_new_master(
    install: Install, tmp_path: Path, key: str
) -> None:
    """redis-py turns a demoted master's ``READONLY`` into a ``ConnectionError``, so that a
    retry asks Sentinel for the new master. The write did nothing: raptor, which runs the
    retries in redis-py's place, sends it again, once (judged as a lost link, it was failed to
    the application, even one whose client was built with redis-py retries)."""
    installed = install(RedisIntegration)
    with service_with_a_replica(tmp_path) as service:
        client = service.sentinel.master_for("svc", socket_timeout=2)
        try:
            assert client.incr(key) == 1  # the pool keeps this connection to the old master
            demote(service)
            assert client.incr(key) == 2
            assert redis.Redis(port=service.new.port).get(key) == b"2"
            assert attempts(installed) == [2]
        finally:
            client.close()


async def test_an_asyncio_write_a_demoted_master_refused_goes_to_the_new_master(
    install: Install, tmp_path: Path, key: str
) -> None:
    import redis.asyncio.sentinel

    installed = install(RedisIntegration)
    with service_with_a_replica(tmp_path) as service:
        sentinel = redis.asyncio.sentinel.Sentinel(
            [("127.0.0.1", service.sentinel_port)], socket_timeout=2
        )
        client = sentinel.master_for("svc", socket_timeout=2)
        try:
            assert await client.incr(key) == 1
            demote(service)
            assert await client.incr(key) == 2
            assert redis.Redis(port=service.new.port).get(key) == b"2"
            assert attempts(installed) == [2]
        finally:
            await client.aclose()
            for one in sentinel.sentinels:
                await one.aclose()


def wait_for_master(sentinel: Sentinel, service: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            sentinel.discover_master(service)
            return
        except redis.sentinel.MasterNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_two_deployments_with_one_service_name_have_a_breaker_each(
    install: Install, tmp_path: Path
) -> None:
    # Two Sentinel deployments, each calling its master "mymaster" (the usual default).
    one, two = PrivateRedis(), PrivateRedis()
    watchers: list[PrivateSentinel] = []
    try:
        one.start()
        two.start()
        for name, server in (("one", one), ("two", two)):
            (tmp_path / name).mkdir()
            watchers.append(PrivateSentinel(tmp_path / name, {"mymaster": server.port}))
        installed = install(RedisIntegration, max_retries=0, failure_threshold=3)
        sentinels = [Sentinel([("127.0.0.1", w.port)], socket_timeout=2) for w in watchers]
        for sentinel in sentinels:
            wait_for_master(sentinel, "mymaster")
        first, second = (s.master_for("mymaster", socket_timeout=2) for s in sentinels)
        assert first.set("x", "1")
        assert second.set("x", "2")
        one.shutdown_nosave()  # the first deployment's master is gone
        for _ in range(3):
            with pytest.raises(redis.ConnectionError):
                first.get("x")
        with pytest.raises(CircuitOpenError):
            first.get("x")
        # The second deployment answers: without raptor its calls succeed, so they do with it.
        assert second.get("x") == b"2"
        assert opened(installed) == {f"redis-sentinel://127.0.0.1:{watchers[0].port}/mymaster/0"}
    finally:
        for watcher in watchers:
            watcher.close()
        one.close()
        two.close()


def test_a_pool_whose_server_is_unknown_is_left_alone(install: Install, key: str) -> None:
    class Anywhere(redis.Connection):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**{"host": REDIS[0], "port": REDIS[1], **kwargs})

    install(RedisIntegration)
    client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=Anywhere))
    assert client.incr(key) == 1
    assert getattr(client.connection_pool, TARGET_ATTRIBUTE).enabled is False
    # redis-py's own Connection, given no host, goes to its default: localhost:6379.
    default = redis.Redis(connection_pool=redis.ConnectionPool())
    with contextlib.suppress(redis.ConnectionError):  # absent when REDIS is elsewhere
        default.ping()
    assert getattr(default.connection_pool, TARGET_ATTRIBUTE).service == (
        "redis://localhost:6379/0"
    )


# --- a pool that runs out is the application's business, not the server's ----------------------


def assert_untouched(installed: Installed) -> None:
    """Nothing counted, retried or published: as if raptor were not there."""
    assert not installed.of(ErrorClassified)
    assert not installed.of(RetryScheduled)
    assert not installed.of(RecoveryFinished)
    assert not installed.of(BreakerTransitioned)


def test_a_blocking_pool_that_runs_out_opens_no_breaker(install: Install, key: str) -> None:
    installed = install(RedisIntegration, failure_threshold=3)
    pool = redis.BlockingConnectionPool(
        host=REDIS[0], port=REDIS[1], max_connections=1, timeout=0.01
    )
    client = redis.Redis(connection_pool=pool)
    held = pool.get_connection()
    try:
        for _ in range(5):
            with pytest.raises(redis.ConnectionError, match="No connection available") as raised:
                client.incr(key)
            assert not isinstance(raised.value, CircuitOpenError)
        with pytest.raises(redis.ConnectionError, match="No connection available"):
            client.pipeline().incr(key).execute()
    finally:
        pool.release(held)
    assert client.incr(key) == 1
    assert_untouched(installed)


def test_a_pool_at_max_connections_opens_no_breaker(install: Install, key: str) -> None:
    installed = install(RedisIntegration, failure_threshold=3)
    pool = redis.ConnectionPool(host=REDIS[0], port=REDIS[1], max_connections=1)
    client = redis.Redis(connection_pool=pool)
    held = pool.get_connection()
    try:
        for _ in range(5):
            with pytest.raises(redis.exceptions.MaxConnectionsError):
                client.get(key)
    finally:
        pool.release(held)
    assert client.incr(key) == 1
    assert_untouched(installed)


async def test_asyncio_pools_that_run_out_open_no_breaker(install: Install, key: str) -> None:
    installed = install(RedisIntegration, failure_threshold=3)
    plain = redis.asyncio.ConnectionPool(host=REDIS[0], port=REDIS[1], max_connections=1)
    blocking = redis.asyncio.BlockingConnectionPool(
        host=REDIS[0], port=REDIS[1], max_connections=1, timeout=0.01
    )
    for pool, error in (
        (plain, redis.exceptions.MaxConnectionsError),
        (blocking, redis.ConnectionError),
    ):
        client = redis.asyncio.Redis(connection_pool=pool)
        held = await pool.get_connection()
        try:
            for _ in range(4):
                with pytest.raises(error) as raised:
                    await client.incr(key)
                assert not isinstance(raised.value, CircuitOpenError)
            with pytest.raises(error):
                await client.pipeline().incr(key).execute()
        finally:
            await pool.release(held)
        await client.incr(key)
        await client.aclose()
        await pool.disconnect()  # a pool passed in is the caller's to close
    assert int(shared().get(key) or 0) == 2
    assert_untouched(installed)


# --- a server refusing writes while it serves reads is degraded, not out -------------------------


def _refusing_writes(server: PrivateRedis, how: str) -> PrivateRedis | None:
    """Make ``server`` refuse writes: at ``maxmemory`` with ``noeviction`` (``OOM``), or as the
    read-only replica of a second private server (``READONLY``), which is returned."""
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    if how == "oom":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        return None
    master = PrivateRedis()
    master.start()
    admin.replicaof("127.0.0.1", master.port)
    return master


@pytest.mark.parametrize(
    ("how", "refusal"),
    [("oom", redis.exceptions.OutOfMemoryError), ("readonly", redis.exceptions.ReadOnlyError)],
)
def test_a_server_refusing_writes_keeps_serving_reads(
    install: Install, private_redis: PrivateRedis, how: str, refusal: type[Exception]
) -> None:
    client = redis.Redis(host="127.0.0.1", port=private_redis.port)
    client.set("present", "yes")
    master = _refusing_writes(private_redis, how)
    try:
        installed = install(RedisIntegration, max_retries=0, failure_threshold=3)
        for _ in range(30):  # a burst of writes, every one refused
            with pytest.raises(refusal):
                client.set("new", "x")
        # Without raptor the reads go on: they must under raptor too.
        # (a replica drops its data for its master's, which may not have arrived yet)
        assert client.get("present") in ((b"yes",) if how == "oom" else (b"yes", None))
        assert not installed.of(BreakerTransitioned)
        assert {e.classification.live_refusal for e in installed.of(ErrorClassified)} == {True}
    finally:
        if master is not None:
            master.close()


# --- the cluster client's node clients are the cluster client's business -------------------------


def test_a_dead_startup_node_costs_the_cluster_client_no_retries_of_ours(
    install: Install, monkeypatch: pytest.MonkeyPatch, unique_name: str
) -> None:
    server = PrivateRedis(cluster=True)
    try:
        server.start()
        installed = install(RedisIntegration, max_retries=3)
        # redis-py shuffles the startup nodes: keep the dead one first.
        monkeypatch.setattr(redis.cluster.random, "shuffle", lambda nodes: None)
        dead = free_port()
        cluster = RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", dead), ClusterNode("127.0.0.1", server.port)]
        )
        try:
            cluster.set(unique_name, "1")
            assert cluster.get(unique_name) == b"1"
        finally:
            cluster.close()
        # The node client asking the dead node for the slot table was left alone: no
        # retries, no breaker, nothing counted (the cluster client moved on at once).
        assert not [e for e in installed.events if f":{dead}/" in str(e)]
        assert not installed.of(RetryScheduled)
    finally:
        server.close()


# --- a failed health check leaves the command unsent ---------------------------------------------


def test_a_command_whose_health_check_failed_is_sent_on_a_new_connection(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=100)
    client = redis.Redis(
        host="127.0.0.1", port=proxy.port, health_check_interval=0.05, socket_timeout=0.3
    )
    assert client.incr(key) == 1
    time.sleep(0.1)  # the next command's connection gets a health check (PING) first
    proxy.latency(2.0)  # that PING's answer comes too late: the connection looks dead
    healer = threading.Timer(0.1, proxy.latency, (0.0,))  # new connections are fine
    healer.start()
    try:
        assert client.incr(key) == 2  # plain redis-py reconnects and sends it too
    finally:
        healer.join()
    assert shared().get(key) == b"2"
    [finished] = installed.of(RecoveryFinished)
    assert (finished.outcome, finished.attempts) == (Outcome.RECOVERED, 2)


async def test_an_asyncio_command_whose_health_check_failed_is_sent_again(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=100)
    client = redis.asyncio.Redis(
        host="127.0.0.1", port=proxy.port, health_check_interval=0.05, socket_timeout=0.3
    )
    try:
        assert await client.incr(key) == 1
        time.sleep(0.1)
        proxy.latency(2.0)
        healer = threading.Timer(0.1, proxy.latency, (0.0,))
        healer.start()
        try:
            assert await client.incr(key) == 2
        finally:
            healer.join()
    finally:
        await client.aclose()
    assert shared().get(key) == b"2"
    [finished] = installed.of(RecoveryFinished)
    assert (finished.outcome, finished.attempts) == (Outcome.RECOVERED, 2)


# --- "not executed" replies: only when nothing of the call ran -----------------------------------


def test_a_script_that_wrote_then_asked_to_try_again_is_not_sent_again(
    install: Install, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=100)
    client = shared()
    with pytest.raises(redis.exceptions.TryAgainError):
        client.eval(INCR_THEN_TRYAGAIN, 1, key)
    sha = client.script_load(INCR_THEN_TRYAGAIN)
    with pytest.raises(redis.exceptions.TryAgainError):
        client.evalsha(sha, 1, key)
    assert client.get(key) == b"2"  # once each
    assert attempts(installed) == [1, 1]


def test_a_transaction_with_an_error_in_exec_results_is_not_sent_again(
    install: Install, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=100)
    client = shared()
    pipe = client.pipeline()  # MULTI/EXEC: EXEC ran the INCR, then the script's error
    pipe.incr(key).eval(TRYAGAIN, 0)
    with pytest.raises(redis.exceptions.TryAgainError):
        pipe.execute()
    assert client.get(key) == b"1"
    assert attempts(installed) == [1]


async def test_an_asyncio_transaction_with_an_error_in_exec_results_is_not_sent_again(
    install: Install, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=100)
    client = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1])
    try:
        pipe = client.pipeline()
        pipe.incr(key).eval(TRYAGAIN, 0)
        with pytest.raises(redis.exceptions.TryAgainError):
            await pipe.execute()
    finally:
        await client.aclose()
    assert shared().get(key) == b"1"
    assert attempts(installed) == [1]


def test_not_executed_replies_are_retried_only_when_nothing_ran(
    install: Install, private_redis: PrivateRedis
) -> None:
    admin = redis.Redis(host="127.0.0.1", port=private_redis.port)
    admin.function_load(
        "#!lua name=raptor_edges\n"
        "redis.register_function('incr_then_tryagain', function(keys, args)\n"
        "  redis.call('INCR', keys[1]); return redis.error_reply('TRYAGAIN later') end)"
    )
    installed = install(RedisIntegration, max_retries=2, failure_threshold=100)
    client = redis.Redis(host="127.0.0.1", port=private_redis.port)
    # A function that wrote: never sent again (FCALL runs code of its own).
    with pytest.raises(redis.exceptions.TryAgainError):
        client.fcall("incr_then_tryagain", 1, "counter")
    assert admin.get("counter") == b"1"
    # A replica whose primary is gone refuses every command with MASTERDOWN: a plain
    # command, and a transaction rejected while queueing (EXEC aborts), ran nowhere and are
    # sent again; a script is not (it might have run: it is not told apart).
    admin.config_set("replica-serve-stale-data", "no")
    admin.config_set("replica-read-only", "no")
    admin.replicaof("127.0.0.1", free_port())
    with pytest.raises(redis.exceptions.MasterDownError):
        client.incr("counter")
    with pytest.raises(redis.exceptions.MasterDownError):
        client.pipeline().incr("counter").execute()
    with pytest.raises(redis.exceptions.MasterDownError):
        client.eval("return 1", 0)
    assert attempts(installed) == [1, 3, 3, 1]


# --- BUSY: a script holding the server -----------------------------------------------------------

# Spins for ``ARGV[1]`` seconds of the server's clock, writing nothing: every other client's
# command meanwhile gets ``BUSY`` (past ``busy-reply-threshold``) and is not executed.
SPIN = (
    "local function now() local t = redis.call('TIME') return t[1] + t[2] / 1e6 end "
    "local stop = now() + tonumber(ARGV[1]) while now() < stop do end return 1"
)


@pytest.fixture
def busy_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis(options=("--busy-reply-threshold", "50"))  # BUSY after 50 ms
    try:
        server.start()
        yield server
    finally:
        server.close()


def _busy_for(server: PrivateRedis, seconds: float) -> threading.Thread:
    """Start a script that holds ``server`` for ``seconds``; returns once it answers ``BUSY``."""
    spinner = redis.Redis(host="127.0.0.1", port=server.port)
    thread = threading.Thread(target=spinner.eval, args=(SPIN, 0, seconds), daemon=True)
    thread.start()
    probe = socket.create_connection(("127.0.0.1", server.port), 5)
    with probe:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            probe.sendall(b"*1\r\n$4\r\nPING\r\n")
            if probe.recv(200).startswith(b"-BUSY "):
                return thread
            time.sleep(0.01)
    raise TimeoutError("the script never made the server busy")


def test_a_write_refused_with_busy_is_sent_again_and_applied_once(
    install: Install, busy_redis: PrivateRedis
) -> None:
    """A ``BUSY`` reply is a refusal: the command was not executed, so a write is sent again
    (with backoff, until the script ends) and applied exactly once; one call's attempts during
    one busy spell do not open the breaker (the run holds one call only)."""
    # minimum_calls: the failure-rate rule counts attempts, and this call's (10-50 ms apart,
    # up to 100 of them) may reach the default 20 within the spell; in use (3 retries) a rate
    # needs five calls' failures. The rule under test is the run's.
    installed = install(RedisIntegration, max_retries=100, failure_threshold=3, minimum_calls=1000)
    # The retries' backoff is 10-50 ms here: let the budget pay for a whole 0.6 s spell.
    installed.runtime.configure(budget_min_retries_per_second=1000.0)
    client = redis.Redis(host="127.0.0.1", port=busy_redis.port)
    spinner = _busy_for(busy_redis, 0.6)
    assert client.incr("counter") == 1
    spinner.join(10)
    assert redis.Redis(host="127.0.0.1", port=busy_redis.port).get("counter") == b"1"
    finished = installed.of(RecoveryFinished)
    assert [f.outcome for f in finished] == [Outcome.RECOVERED]
    assert finished[0].attempts > 1
    assert not opened(installed)


def test_a_transaction_refused_with_busy_is_sent_again_and_applied_once(
    install: Install, busy_redis: PrivateRedis
) -> None:
    installed = install(
        RedisIntegration, max_retries=100, failure_threshold=100, minimum_calls=1000
    )
    installed.runtime.configure(budget_min_retries_per_second=1000.0)
    client = redis.Redis(host="127.0.0.1", port=busy_redis.port)
    spinner = _busy_for(busy_redis, 0.4)
    assert client.pipeline().incr("counter").incr("counter").execute() == [1, 2]
    spinner.join(10)
    assert redis.Redis(host="127.0.0.1", port=busy_redis.port).get("counter") == b"2"
    [finished] = installed.of(RecoveryFinished)
    assert (finished.outcome, finished.attempts > 1) == (Outcome.RECOVERED, True)


async def test_an_asyncio_write_refused_with_busy_is_sent_again_and_applied_once(
    install: Install, busy_redis: PrivateRedis
) -> None:
    installed = install(
        RedisIntegration, max_retries=100, failure_threshold=100, minimum_calls=1000
    )
    installed.runtime.configure(budget_min_retries_per_second=1000.0)
    client = redis.asyncio.Redis(host="127.0.0.1", port=busy_redis.port)
    try:
        spinner = await asyncio.to_thread(_busy_for, busy_redis, 0.4)
        assert await client.incr("counter") == 1
        await asyncio.to_thread(spinner.join, 10)
    finally:
        await client.aclose()
    assert redis.Redis(host="127.0.0.1", port=busy_redis.port).get("counter") == b"1"
    [finished] = installed.of(RecoveryFinished)
    assert (finished.outcome, finished.attempts > 1) == (Outcome.RECOVERED, True)


def test_a_script_refused_with_busy_is_not_sent_again(
    install: Install, busy_redis: PrivateRedis
) -> None:
    """``EVAL`` is not told apart from a script that wrote and then replied ``BUSY`` itself."""
    installed = install(RedisIntegration, max_retries=5, failure_threshold=100)
    client = redis.Redis(host="127.0.0.1", port=busy_redis.port)
    spinner = _busy_for(busy_redis, 0.3)
    with pytest.raises(redis.exceptions.ResponseError, match=r"^BUSY "):
        client.eval("return redis.call('INCR', KEYS[1])", 1, "counter")
    spinner.join(10)
    assert attempts(installed) == [1]


class _BusyAtMultiAndExec:
    """The narrow race a real server cannot be made to show on cue: a script holds the server
    when ``MULTI`` arrives (``BUSY``) and, with ``ends_between``, ends then, so the ``INCR``
    sent after it runs on its own, outside any transaction; a second script holds the server
    when ``EXEC`` arrives (``BUSY`` again). Without ``ends_between`` the one script refuses
    all three. Later transactions are served normally."""

    BUSY = b"-BUSY Redis is busy running a script.\r\n"

    def __init__(self, *, ends_between: bool) -> None:
        self.ends_between = ends_between
        self.transactions = 0
        self.applied = 0  # INCRs that changed the counter

    def __call__(self, command: list[bytes]) -> bytes:
        name = command[0].upper()
        first = self.transactions == 0
        if name == b"MULTI":
            return self.BUSY if first else b"+OK\r\n"
        if name in (b"INCR", b"INCRBY"):
            if not first:
                return b"+QUEUED\r\n"
            if not self.ends_between:
                return self.BUSY
            self.applied += 1
            return b":1\r\n"
        if name == b"EXEC":
            self.transactions += 1
            if first:
                return self.BUSY
            self.applied += 1
            return b"*1\r\n:%d\r\n" % self.applied
        return b"-ERR unexpected\r\n"


@pytest.mark.parametrize("ends_between", [True, False], ids=["ran-alone", "refused-whole"])
def test_a_transaction_refused_at_multi_is_sent_again_only_if_nothing_ran(
    install: Install, ends_between: bool
) -> None:
    """``BUSY`` at ``EXEC`` means nothing ran only when ``MULTI`` was accepted, or when every
    command after a refused ``MULTI`` was refused too: a command that got an answer that is
    not an error ran on its own, and sending the transaction again would apply it twice."""
    installed = install(RedisIntegration, max_retries=5, failure_threshold=100)
    script = _BusyAtMultiAndExec(ends_between=ends_between)
    server = ScriptedRedis(script)
    try:
        client = redis.Redis(host="127.0.0.1", port=server.port, protocol=2, driver_info=None)
        if ends_between:
            with pytest.raises(redis.exceptions.ResponseError, match=r"^BUSY "):
                client.pipeline().incr("counter").execute()
        else:
            assert client.pipeline().incr("counter").execute() == [1]
    finally:
        server.close()
    assert script.applied == 1
    assert attempts(installed) == [1 if ends_between else 2]


@pytest.mark.parametrize("ends_between", [True, False], ids=["ran-alone", "refused-whole"])
async def test_an_asyncio_transaction_refused_at_multi_is_sent_again_only_if_nothing_ran(
    install: Install, ends_between: bool
) -> None:
    installed = install(RedisIntegration, max_retries=5, failure_threshold=100)
    script = _BusyAtMultiAndExec(ends_between=ends_between)
    server = ScriptedRedis(script)
    client = redis.asyncio.Redis(host="127.0.0.1", port=server.port, protocol=2, driver_info=None)
    try:
        if ends_between:
            with pytest.raises(redis.exceptions.ResponseError, match=r"^BUSY "):
                await client.pipeline().incr("counter").execute()
        else:
            assert await client.pipeline().incr("counter").execute() == [1]
    finally:
        await client.aclose()
        server.close()
    assert script.applied == 1
    assert attempts(installed) == [1 if ends_between else 2]


class _BusyOnce:
    """A server a script holds for one command only: the first command of the test's
    (``INCR`` queued in a transaction, or a pipeline's ``GET``) gets ``BUSY`` and is not
    executed; a transaction with a refused command is discarded at ``EXEC``
    (``EXECABORT``), as Redis does. redis-py raises the refused command's error, annotated
    with its place in the pipeline, which redis.asyncio quotes as a tuple."""

    BUSY = b"-BUSY Redis is busy running a script.\r\n"

    def __init__(self) -> None:
        self.refused = False
        self.dirty = False
        self.applied = 0

    def __call__(self, command: list[bytes]) -> bytes:
        name = command[0].upper()
        if name == b"MULTI":
            return b"+OK\r\n"
        if name == b"EXEC":
            if self.dirty:
                self.dirty = False
                return b"-EXECABORT Transaction discarded because of previous errors.\r\n"
            self.applied += 1
            return b"*1\r\n:%d\r\n" % self.applied
        if not self.refused:
            self.refused = True
            self.dirty = name in (b"INCR", b"INCRBY")
            return self.BUSY
        if name in (b"INCR", b"INCRBY"):
            return b"+QUEUED\r\n"
        return b"$5\r\nvalue\r\n"  # GET


@pytest.mark.parametrize("transaction", [True, False], ids=["queued-incr", "plain-get"])
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_busy_inside_a_pipeline_is_a_refusal_in_sync_and_asyncio_alike(
    install: Install, flavour: str, transaction: bool
) -> None:
    """``BUSY`` to a command inside a pipeline comes annotated (``Command # 1 (INCR k) of
    pipeline caused error: ...``), and quoted as a tuple by redis.asyncio (``...: ('BUSY
    ...',)``). Either way it is the server's "not executed" (it counts against its health):
    a transaction discarded for it, or a pipeline that only reads, is sent again."""
    installed = install(RedisIntegration, max_retries=3, failure_threshold=100)
    script = _BusyOnce()
    server = ScriptedRedis(script)

    async def run_async() -> Any:
        client = redis.asyncio.Redis(
            host="127.0.0.1", port=server.port, protocol=2, driver_info=None
        )
        try:
            pipe = client.pipeline(transaction=transaction)
            (pipe.incr("counter") if transaction else pipe.get("counter"))
            return await pipe.execute()
        finally:
            await client.aclose()

    try:
        if flavour == "asyncio":
            result = asyncio.run(run_async())
        else:
            client = redis.Redis(host="127.0.0.1", port=server.port, protocol=2, driver_info=None)
            pipe = client.pipeline(transaction=transaction)
            (pipe.incr("counter") if transaction else pipe.get("counter"))
            result = pipe.execute()
    finally:
        server.close()
    assert result == ([1] if transaction else [b"value"])
    assert script.applied == (1 if transaction else 0)
    [classified] = installed.of(ErrorClassified)
    assert (classified.classification.rule, classified.classification.category) == (
        "redis.LOADING",
        ErrorCategory.UNAVAILABLE,
    )
    assert attempts(installed) == [2]


# --- asyncio pipelines without MULTI -------------------------------------------------------------


async def test_an_asyncio_pipeline_without_multi_that_writes_is_never_sent_again(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=100)
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    try:
        proxy.refuse()  # never sent: a transaction may go again, a plain pipeline may not
        for transaction in (True, False):
            pipe = client.pipeline(transaction=transaction)
            pipe.incr(key)
            with pytest.raises(redis.ConnectionError):
                await pipe.execute()
    finally:
        await client.aclose()
    finished = installed.of(RecoveryFinished)
    assert [(f.attempts, f.give_up_reason) for f in finished] == [
        (4, finished[0].give_up_reason),
        (1, "not_replay_safe"),
    ]


# --- blocking commands: a socket timeout while the server is told to wait ----------------------


def test_a_blocking_command_outwaiting_the_socket_timeout_opens_no_breaker(
    install: Install, key: str
) -> None:
    """``BLPOP key 1`` on a client whose socket timeout is 0.1 s: the server is healthy and
    waits as it was told; the client's timeout says nothing about the server, and must not
    shut the other commands out (without raptor they succeed)."""
    installed = install(RedisIntegration, failure_threshold=3)
    client = redis.Redis(host=REDIS[0], port=REDIS[1], socket_timeout=0.1)
    for _ in range(5):
        with pytest.raises(redis.TimeoutError) as raised:
            client.blpop([key], timeout=1)
        assert not isinstance(raised.value, CircuitOpenError)
    with pytest.raises(redis.TimeoutError):
        client.execute_command("XREAD", "BLOCK", 1000, "STREAMS", key, "$")
    assert client.get(key) is None
    assert not opened(installed)
    assert attempts(installed) == [1] * 6  # never sent again
    [classified, *_] = installed.of(ErrorClassified)
    assert classified.classification.category.value == "cancelled"


async def test_an_asyncio_blocking_command_outwaiting_the_socket_timeout_opens_no_breaker(
    install: Install, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=3)
    client = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1], socket_timeout=0.1)
    try:
        for _ in range(5):
            with pytest.raises(redis.TimeoutError):
                await client.brpop([key], timeout=1)
        assert await client.get(key) is None
    finally:
        await client.aclose()
    assert not opened(installed)


def test_a_blocking_command_whose_server_is_unreachable_still_counts(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    """Only the wait counts as the caller's: a timeout connecting is the server's doing."""
    installed = install(RedisIntegration, failure_threshold=3, max_retries=0)
    client = redis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=0.1)
    proxy.refuse()
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            client.blpop([key], timeout=1)
    assert opened(installed) == {f"redis://127.0.0.1:{proxy.port}/0"}


def test_a_blocking_command_never_holds_the_half_open_probe(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    """After a heal, a worker's ``BLPOP queue 0`` must not become the breaker's only probe:
    it would hold the probe slot until an item arrives, and the producer's ``RPUSH`` (refused
    while the slot is held) never pushes one. Without raptor both recover at once."""
    installed = install(RedisIntegration, failure_threshold=2, max_retries=0)
    client = redis.Redis(host="127.0.0.1", port=proxy.port)
    proxy.refuse()
    for _ in range(2):
        with pytest.raises(redis.ConnectionError):
            client.get(key)
    assert opened(installed)
    proxy.heal()
    time.sleep(0.6)  # past the open duration: the next call would be the probe
    popped: list[object] = []
    consumer = threading.Thread(target=lambda: popped.append(client.blpop([key], timeout=0)))
    consumer.start()
    try:
        time.sleep(0.2)  # the consumer waits inside BLPOP
        assert client.rpush(key, "job") >= 0  # the producer is let through
        consumer.join(5)
        assert popped == [(key.encode(), b"job")]
    finally:
        if consumer.is_alive():
            shared().rpush(key, "wake")
            consumer.join(5)
    assert client.get(key) is None


async def test_an_asyncio_blocking_command_never_holds_the_half_open_probe(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=2, max_retries=0)
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    producer = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    try:
        proxy.refuse()
        for _ in range(2):
            with pytest.raises(redis.ConnectionError):
                await client.get(key)
        assert opened(installed)
        proxy.heal()
        await asyncio.sleep(0.6)
        waiting = asyncio.ensure_future(client.blpop([key], timeout=0))
        await asyncio.sleep(0.2)
        try:
            await producer.rpush(key, "job")
            assert tuple(await asyncio.wait_for(waiting, 5)) == (key.encode(), b"job")
        finally:
            if not waiting.done():
                shared().rpush(key, "wake")
                await asyncio.wait_for(waiting, 5)
    finally:
        await client.aclose()
        await producer.aclose()


def test_a_blocking_command_let_through_an_open_breaker_keeps_redis_py_retries(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    """A blocking command meeting an open breaker runs as without raptor, redis-py's own
    retries included: a consumer's ``BLPOP`` rides out a server that is still restarting
    (refusing connections for a moment) as it would without raptor, instead of failing at
    its first refused connection."""
    installed = install(RedisIntegration, failure_threshold=1, max_retries=0)
    client = redis.Redis(host="127.0.0.1", port=proxy.port)  # redis-py's default retry
    proxy.refuse()
    with pytest.raises(redis.ConnectionError):
        client.get(key)
    assert opened(installed)
    shared().rpush(key, "job")
    healer = threading.Timer(0.05, proxy.heal)
    healer.start()
    try:
        assert client.blpop([key], timeout=1) == (key.encode(), b"job")
    finally:
        healer.join()


async def test_an_asyncio_blocking_command_let_through_an_open_breaker_keeps_redis_py_retries(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=1, max_retries=0)
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    try:
        proxy.refuse()
        with pytest.raises(redis.ConnectionError):
            await client.get(key)
        assert opened(installed)
        shared().rpush(key, "job")
        healer = threading.Timer(0.05, proxy.heal)
        healer.start()
        try:
            assert await client.blpop([key], timeout=1) == (key.encode(), b"job")
        finally:
            healer.join()
    finally:
        await client.aclose()


def test_a_pipeline_refused_by_an_open_breaker_is_emptied_as_after_any_failure(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    """redis-py empties a pipeline whatever ``execute()`` ended with; one refused by an open
    breaker kept its commands, so an app that queues its batch again after a failure (or
    simply goes on using the pipeline) sent the refused commands too: the item twice."""
    installed = install(RedisIntegration, failure_threshold=1, max_retries=0)
    client = redis.Redis(host="127.0.0.1", port=proxy.port)
    proxy.refuse()
    with pytest.raises(redis.ConnectionError):
        client.get(key)
    assert opened(installed)
    proxy.heal()
    pipe = client.pipeline()
    pipe.rpush(key, "job")
    with pytest.raises(CircuitOpenError):
        pipe.execute()
    assert len(pipe) == 0
    time.sleep(0.6)  # the breaker lets a probe through
    pipe.rpush(key, "job")  # the app's own retry of its batch
    assert pipe.execute() == [1]
    assert shared().lrange(key, 0, -1) == [b"job"]


async def test_an_asyncio_pipeline_refused_by_an_open_breaker_is_emptied(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, failure_threshold=1, max_retries=0)
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)
    try:
        proxy.refuse()
        with pytest.raises(redis.ConnectionError):
            await client.get(key)
        assert opened(installed)
        proxy.heal()
        pipe = client.pipeline()
        pipe.rpush(key, "job")
        with pytest.raises(CircuitOpenError):
            await pipe.execute()
        assert len(pipe) == 0
        await asyncio.sleep(0.6)
        pipe.rpush(key, "job")
        assert await pipe.execute() == [1]
        assert shared().lrange(key, 0, -1) == [b"job"]
    finally:
        await client.aclose()


def test_a_write_whose_reconnect_afterwards_failed_is_not_sent_again(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    """redis-py reconnects a connection marked for it (a maintenance ``MOVING`` notification)
    in ``execute_command``'s ``finally``, after the command ran: a failure there is raised
    through the connection's opening, but the ``INCR`` was sent and applied. Taken for a
    command never sent, it was sent again: the counter went up twice."""
    installed = install(RedisIntegration, max_retries=100, failure_threshold=1000)
    client = redis.Redis(host="127.0.0.1", port=proxy.port, single_connection_client=True)
    client.ping()
    conn = client.connection
    assert conn is not None
    proxy.latency(0.2)

    def moving() -> None:  # what the pool does on a MOVING notification, mid-command
        conn.mark_for_reconnect()
        proxy.stop_accepting()

    mover = threading.Timer(0.05, moving)
    healer = threading.Timer(0.6, proxy.heal)
    mover.start()
    healer.start()
    try:
        with pytest.raises(redis.ConnectionError):
            client.incr(key)
    finally:
        mover.join()
        healer.join()
    assert shared().get(key) == b"1"
    [finished] = installed.of(RecoveryFinished)
    assert finished.attempts == 1


async def test_an_asyncio_write_whose_reconnect_afterwards_failed_is_not_sent_again(
    install: Install, proxy: FaultProxy, key: str
) -> None:
    installed = install(RedisIntegration, max_retries=100, failure_threshold=1000)
    client = redis.asyncio.Redis(host="127.0.0.1", port=proxy.port, single_connection_client=True)
    try:
        await client.ping()
        conn = client.connection
        assert conn is not None
        proxy.latency(0.2)

        def moving() -> None:
            conn.mark_for_reconnect()
            proxy.stop_accepting()

        mover = threading.Timer(0.05, moving)
        healer = threading.Timer(0.6, proxy.heal)
        mover.start()
        healer.start()
        try:
            with pytest.raises(redis.ConnectionError):
                await client.incr(key)
        finally:
            mover.join()
            healer.join()
        assert shared().get(key) == b"1"
        [finished] = installed.of(RecoveryFinished)
        assert finished.attempts == 1
    finally:
        await client.aclose()
