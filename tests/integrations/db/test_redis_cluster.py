"""The redis-py integration against real multi-node clusters of our own: a breaker per node,
so one master's outage never refuses the keys the other masters serve, and a replica
promoted in a dead master's place is used at once."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio.cluster
import redis.asyncio.retry
from redis.backoff import ConstantBackoff, NoBackoff
from redis.cluster import LoadBalancingStrategy, RedisCluster
from redis.retry import Retry

from otel_raptor.core.events import BreakerTransitioned
from otel_raptor.core.states import CircuitState
from otel_raptor.errors import CircuitOpenError
from otel_raptor.integrations.db.redis import RedisIntegration
from tests.integrations.db.conftest import Install, Installed
from tests.support.dbservers import PrivateRedisCluster

OPEN = CircuitState.OPEN


@pytest.fixture
def three_masters() -> Iterator[PrivateRedisCluster]:
    cluster = PrivateRedisCluster(3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def opened(installed: Installed) -> set[str]:
    return {t.breaker for t in installed.of(BreakerTransitioned) if t.to_state is OPEN}


def keys_by_owner(client: RedisCluster, victim: int) -> tuple[list[str], list[str]]:
    """Keys of the live masters, and twice as many of the master on port ``victim``."""
    keys = [f"{{raptor{i}}}" for i in range(300)]
    live = [k for k in keys if client.get_node_from_key(k).port != victim][:5]
    dead = [k for k in keys if client.get_node_from_key(k).port == victim][:10]
    return live, dead


def test_one_dead_master_never_refuses_the_keys_of_the_others(
    install: Install, three_masters: PrivateRedisCluster
) -> None:
    installed = install(RedisIntegration, failure_threshold=3, recovery_timeout=0.5)
    seed = three_masters.nodes[0].port
    client = RedisCluster(host="127.0.0.1", port=seed, socket_timeout=2)
    try:
        victim = three_masters.nodes[1].port
        live, dead = keys_by_owner(client, victim)
        acknowledged = dict.fromkeys(live + dead, 0)
        three_masters.node(victim).shutdown_nosave()
        for _ in range(20):
            for key in live:  # without raptor, every one succeeds
                client.incr(key)
                acknowledged[key] += 1
            for key in dead:  # refused, or unserved once the cluster saw it fail
                with pytest.raises(redis.RedisError):
                    client.incr(key)
        # Only the dead master's breaker opened.
        assert opened(installed) == {f"redis://127.0.0.1:{victim}/"}
        three_masters.node(victim).start()
        three_masters.wait_ok()
        deadline = time.monotonic() + 20
        while True:
            try:
                for key in dead:
                    client.incr(key)
                    acknowledged[key] += 1
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "the dead master's keys never came back"
                time.sleep(0.1)
        # Nothing acknowledged was lost or applied twice.
        assert {key: int(client.get(key) or 0) for key in acknowledged} == acknowledged
    finally:
        client.close()


def second_masters_keys(
    masters: PrivateRedisCluster,
) -> tuple[int, int, list[str], list[str]]:
    """For the asyncio tests, read with a sync client: the seed's port, the second master's
    (the victim's) and :func:`keys_by_owner`'s keys."""
    seed, victim = masters.nodes[0].port, masters.nodes[1].port
    sync = RedisCluster(host="127.0.0.1", port=seed)
    try:
        return seed, victim, *keys_by_owner(sync, victim)
    finally:
        sync.close()


async def test_an_asyncio_cluster_keeps_serving_the_live_masters(
    install: Install, three_masters: PrivateRedisCluster
) -> None:
    installed = install(RedisIntegration, failure_threshold=3, recovery_timeout=0.5)
    seed, victim, live, dead = second_masters_keys(three_masters)
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=seed, socket_timeout=2)
    try:
        await client.initialize()
        three_masters.node(victim).shutdown_nosave()
        for _ in range(20):
            for key in live:
                assert await client.set(key, "1")
            for key in dead:
                with pytest.raises(redis.RedisError):
                    await client.set(key, "1")
        assert opened(installed) == {f"redis://127.0.0.1:{victim}/"}
    finally:
        await client.aclose()


def test_a_promoted_replica_serves_at_once_though_the_dead_masters_breaker_is_open(
    install: Install,
) -> None:
    cluster = PrivateRedisCluster(3, replicas=1, node_timeout_ms=1000)
    try:
        cluster.start()
        # A breaker that stays open for a minute: the promoted replica must not wait for it.
        installed = install(RedisIntegration, failure_threshold=3, recovery_timeout=60)
        client = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, socket_timeout=2)
        try:
            key = "{raptor_failover}"
            victim = client.get_node_from_key(key).port
            client.set(key, "0")
            cluster.node(victim).shutdown_nosave()
            acknowledged = 0
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.incr(key)
                    acknowledged += 1
                    break
                except redis.RedisError:
                    assert time.monotonic() < deadline, "the promoted replica was never used"
                    time.sleep(0.05)
            assert f"redis://127.0.0.1:{victim}/" in opened(installed)
            assert client.get_node_from_key(key).port != victim
            assert int(client.get(key) or 0) == acknowledged
        finally:
            client.close()
    finally:
        cluster.close()


def test_clusterdown_never_opens_the_breakers_of_the_live_masters(install: Install) -> None:
    # Full coverage required (the default): once the cluster sees a master fail, every node
    # answers CLUSTERDOWN until it is back, and the cluster client retries that itself.
    cluster = PrivateRedisCluster(3, node_timeout_ms=1000, full_coverage=True)
    try:
        cluster.start()
        installed = install(RedisIntegration, failure_threshold=3, recovery_timeout=60)
        # One retry of its own per call, not ten: each retry of CLUSTERDOWN sleeps 0.25 s and
        # rereads the slot table, so that a call failed after 2.8 s. Three failed calls are
        # still six CLUSTERDOWN answers of the live masters, twice the failure threshold.
        client = RedisCluster(
            host="127.0.0.1",
            port=cluster.nodes[0].port,
            socket_timeout=2,
            retry=Retry(NoBackoff(), 1),
        )
        try:
            victim = cluster.nodes[1].port
            keys = [f"{{raptor{i}}}" for i in range(300)]
            live = [k for k in keys if client.get_node_from_key(k).port != victim][:4]
            cluster.node(victim).shutdown_nosave()
            failures: list[type] = []
            deadline = time.monotonic() + 30
            while len(failures) < 3:
                assert time.monotonic() < deadline, "the cluster never went down"
                for key in live:
                    try:
                        client.incr(key)
                    except redis.RedisError as error:
                        failures.append(type(error))
            # Without raptor these calls fail with CLUSTERDOWN; raptor refuses none of them.
            assert set(failures) == {redis.exceptions.ClusterDownError}
            cluster.node(victim).start()
            cluster.wait_ok()
            # The cluster is whole again: without raptor the live masters answer at once.
            for key in live:
                client.incr(key)
            assert opened(installed) <= {f"redis://127.0.0.1:{victim}/"}
        finally:
            client.close()
    finally:
        cluster.close()


def test_reads_balanced_onto_a_dead_replica_go_on_to_another_copy(install: Install) -> None:
    # (Reads balanced over the primary and its replica, as read_from_replicas=True does.)
    # The cluster client retries a connection error on the node its reread slot table names,
    # but only by exact type: a refusal by the dead replica's breaker (a subclass) ended the
    # read, where without raptor the next attempt read from the master or another replica.
    cluster = PrivateRedisCluster(3, replicas=1, node_timeout_ms=1000)
    try:
        cluster.start()
        installed = install(RedisIntegration, failure_threshold=1, recovery_timeout=60)
        client = RedisCluster(
            host="127.0.0.1",
            port=cluster.nodes[0].port,
            socket_timeout=2,
            load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN,  # primary and replica
        )
        try:
            key = "{raptor_replica_reads}"
            client.set(key, "v")
            deadline = time.monotonic() + 20
            while len(client.nodes_manager.slots_cache[client.keyslot(key)]) < 2:
                assert time.monotonic() < deadline, "the replica never showed in the slot table"
                time.sleep(0.2)
                client.nodes_manager.initialize()
            replica = client.nodes_manager.slots_cache[client.keyslot(key)][1]
            cluster.node(replica.port).shutdown_nosave()
            failures = 0
            for _ in range(60):
                try:
                    assert client.get(key) == b"v"
                except redis.RedisError:
                    failures += 1
            assert failures == 0
            assert f"redis://127.0.0.1:{replica.port}/" in opened(installed)
        finally:
            client.close()
    finally:
        cluster.close()


def test_the_cluster_clients_retry_refusals_only_while_installed() -> None:
    from otel_raptor.integrations._base import IntegrationSettings
    from otel_raptor.integrations.db.redis import circuit_open_error_type
    from otel_raptor.runtime.state import Runtime
    from tests.integrations.db.conftest import fast_config

    before = RedisCluster.ERRORS_ALLOW_RETRY
    integration = RedisIntegration()
    integration.install(IntegrationSettings(runtime=Runtime(), config=fast_config()))
    try:
        assert circuit_open_error_type() in RedisCluster.ERRORS_ALLOW_RETRY
        assert circuit_open_error_type() in redis.asyncio.cluster.RedisCluster.ERRORS_ALLOW_RETRY
    finally:
        integration.uninstall()
    assert before == RedisCluster.ERRORS_ALLOW_RETRY


def test_a_refusal_rereads_the_slot_table_from_the_live_nodes_first(install: Install) -> None:
    """A refusal has the cluster client reread its slot table; like redis-py after a
    connection error, it must ask the node that failed last, not at random first: a master
    that went silent (a host gone, its packets dropped) held each refused call, meant to fail
    at once, for the client's socket timeout."""
    cluster = PrivateRedisCluster(3, node_timeout_ms=60_000)
    silent = socket.socket()
    try:
        cluster.start()
        installed = install(RedisIntegration, failure_threshold=1, recovery_timeout=60)
        seed = cluster.nodes[0].port
        client = RedisCluster(
            host="127.0.0.1", port=seed, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            victim = cluster.nodes[1].port
            _, dead = keys_by_owner(client, victim)
            client.get(dead[0])
            cluster.node(victim).shutdown_nosave()
            # The victim's port accepts connections and never answers.
            silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            silent.bind(("127.0.0.1", victim))
            silent.listen(128)
            with pytest.raises(redis.RedisError):
                client.get(dead[0])
            assert f"redis://127.0.0.1:{victim}/" in opened(installed)
            slowest = 0.0
            for _ in range(12):
                time.sleep(0.3)  # a reread is due again
                started = time.monotonic()
                with pytest.raises(redis.RedisError):
                    client.get(dead[0])
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 0.5
        finally:
            client.close()
    finally:
        silent.close()
        cluster.close()


async def test_an_asyncio_clusters_refusal_rereads_from_the_live_nodes_first(
    install: Install,
) -> None:
    """The asyncio cluster client's reread after a refusal asks the refusing node last too."""
    cluster = PrivateRedisCluster(3, node_timeout_ms=60_000)
    silent = socket.socket()
    try:
        cluster.start()
        installed = install(RedisIntegration, failure_threshold=1, recovery_timeout=60)
        victim = cluster.nodes[0].port  # the startup node, asked first by default
        sync = RedisCluster(host="127.0.0.1", port=victim)
        _, dead = keys_by_owner(sync, victim)
        sync.close()
        client = redis.asyncio.cluster.RedisCluster(
            host="127.0.0.1", port=victim, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            await client.get(dead[0])
            cluster.node(victim).shutdown_nosave()
            silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            silent.bind(("127.0.0.1", victim))
            silent.listen(128)
            with pytest.raises((redis.RedisError, redis.exceptions.RedisClusterException)):
                await client.get(dead[0])
            assert f"redis://127.0.0.1:{victim}/" in opened(installed)
            slowest = 0.0
            for _ in range(6):
                await asyncio.sleep(0.3)  # a reread is due again
                started = time.monotonic()
                with pytest.raises((redis.RedisError, redis.exceptions.RedisClusterException)):
                    await client.get(dead[0])
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 0.5
        finally:
            await client.aclose()
    finally:
        silent.close()
        cluster.close()


# --- redis-py 8.2's retry loop: backoff between attempts, rereads asked for and paced ----------

#: redis-py 8.2 and later paces the slot-table rereads that errors ask for
#: (``topology_refresh_min_interval``, 1 s by default) and sleeps its retry backoff between
#: the attempts of a cluster call; before 8.2 it did neither.
PACED_REREADS = "topology_refresh_min_interval" in inspect.signature(RedisCluster).parameters


def dead_key_and_open_breaker(
    cluster: PrivateRedisCluster, client: RedisCluster, installed: Installed
) -> tuple[str, str]:
    """Stop one master, open its breaker with one call, and return a live key and a dead one."""
    victim = cluster.nodes[1].port
    live, dead = keys_by_owner(client, victim)
    cluster.node(victim).shutdown_nosave()
    with pytest.raises(redis.RedisError):
        client.get(dead[0])
    assert opened(installed) == {f"redis://127.0.0.1:{victim}/"}
    return live[0], dead[0]


def test_a_refused_call_sleeps_none_of_the_cluster_clients_backoff(
    install: Install, three_masters: PrivateRedisCluster
) -> None:
    """redis-py 8.2 sleeps its retry backoff between the attempts of a cluster call. A refusal
    (never sent) is retried at once: slept, each refused call took the whole backoff (here
    10 x 0.2 s; with the default backoff, seconds) where it should fail at once."""
    installed = install(RedisIntegration, failure_threshold=1, recovery_timeout=60)
    client = RedisCluster(
        host="127.0.0.1",
        port=three_masters.nodes[0].port,
        socket_timeout=2,
        retry=Retry(ConstantBackoff(0.2), 10),
    )
    try:
        live, dead = dead_key_and_open_breaker(three_masters, client, installed)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(CircuitOpenError):
                client.get(dead)
            assert time.monotonic() - started < 0.5
            assert client.set(live, "1")
    finally:
        client.close()


async def test_an_asyncio_refused_call_sleeps_none_of_the_backoff(
    install: Install, three_masters: PrivateRedisCluster
) -> None:
    """:func:`test_a_refused_call_sleeps_none_of_the_cluster_clients_backoff`, asyncio."""
    installed = install(RedisIntegration, failure_threshold=1, recovery_timeout=60)
    seed, victim, live, dead = second_masters_keys(three_masters)
    client = redis.asyncio.cluster.RedisCluster(
        host="127.0.0.1",
        port=seed,
        socket_timeout=2,
        retry=redis.asyncio.retry.Retry(ConstantBackoff(0.2), 10),
    )
    try:
        await client.initialize()
        three_masters.node(victim).shutdown_nosave()
        with pytest.raises(redis.RedisError):
            await client.get(dead[0])
        assert opened(installed) == {f"redis://127.0.0.1:{victim}/"}
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(CircuitOpenError):
                await client.get(dead[0])
            assert time.monotonic() - started < 0.5
            assert await client.set(live[0], "1")
    finally:
        await client.aclose()


def counting_rereads(monkeypatch: pytest.MonkeyPatch, manager: object) -> list[float]:
    """Count the slot-table rereads of ``manager`` (a ``NodesManager``, sync or asyncio: the
    latter has slots, so its class is patched)."""
    rereads: list[float] = []
    kind = type(manager)
    original = kind.initialize  # type: ignore[attr-defined]
    if inspect.iscoroutinefunction(original):

        async def initialize_async(self: object, *args: object, **kwargs: object) -> object:
            if self is manager:
                rereads.append(time.monotonic())
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(kind, "initialize", initialize_async)
    else:

        def initialize(self: object, *args: object, **kwargs: object) -> object:
            if self is manager:
                rereads.append(time.monotonic())
            return original(self, *args, **kwargs)

        monkeypatch.setattr(kind, "initialize", initialize)
    return rereads


@pytest.mark.skipif(not PACED_REREADS, reason="redis-py before 8.2 rereads at once")
def test_refusals_reread_the_slot_table_at_the_clients_own_pace(
    install: Install, three_masters: PrivateRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py 8.2 only asks for a reread after a connection error, and runs it once due
    (``topology_refresh_min_interval``, here 30 s). A refusal asks the same way: rereading
    on its own (four times a second before), it overrode the user's pace, and with every
    client refusing, the live nodes answered a storm of ``CLUSTER SLOTS``."""
    installed = install(RedisIntegration, failure_threshold=1, recovery_timeout=60)
    client = RedisCluster(
        host="127.0.0.1",
        port=three_masters.nodes[0].port,
        socket_timeout=2,
        topology_refresh_min_interval=30,
    )
    try:
        live, dead = dead_key_and_open_breaker(three_masters, client, installed)
        rereads = counting_rereads(monkeypatch, client.nodes_manager)
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            with pytest.raises(CircuitOpenError):
                client.get(dead)
            assert client.set(live, "1")
            time.sleep(0.05)
        assert rereads == []
        # The reread is asked for all the same, the refusing node to be asked last.
        assert client.nodes_manager._refresh_requested
        assert client.nodes_manager._requested_last_failed_node_name == (
            f"127.0.0.1:{three_masters.nodes[1].port}"
        )
    finally:
        client.close()


@pytest.mark.skipif(not PACED_REREADS, reason="redis-py before 8.2 rereads at once")
async def test_an_asyncio_clusters_refusals_reread_at_its_own_pace(
    install: Install, three_masters: PrivateRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """:func:`test_refusals_reread_the_slot_table_at_the_clients_own_pace`, asyncio."""
    installed = install(RedisIntegration, failure_threshold=1, recovery_timeout=60)
    seed, victim, live, dead = second_masters_keys(three_masters)
    client = redis.asyncio.cluster.RedisCluster(
        host="127.0.0.1", port=seed, socket_timeout=2, topology_refresh_min_interval=30
    )
    try:
        await client.initialize()
        three_masters.node(victim).shutdown_nosave()
        with pytest.raises(redis.RedisError):
            await client.get(dead[0])
        assert opened(installed) == {f"redis://127.0.0.1:{victim}/"}
        rereads = counting_rereads(monkeypatch, client.nodes_manager)
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            with pytest.raises(CircuitOpenError):
                await client.get(dead[0])
            assert await client.set(live[0], "1")
            await asyncio.sleep(0.05)
        assert rereads == []
        assert client._initialize
        assert client.nodes_manager._requested_last_failed_node_name == f"127.0.0.1:{victim}"
    finally:
        await client.aclose()
