"""Connections that die silently cost the join store one socket timeout, not one per pooled connection.

A half-open connection (a NAT or firewall that lost its state, a Redis that dropped it during a
partition) is found dead only when a command waits out the socket timeout on it. redis-py's pool is a
stack of idle connections, and every one opened before the fault is dead the same way: as the work
after a stall grows (batches retried while other stages wait), each call that reaches one more of them
waits its own timeout. The store drops the idle connections once one command times out, so they
connect afresh. Against a real redis-server behind a fault proxy, and a real Sentinel-monitored primary.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from consumer.errors import Unavailable
from consumer.store_redis import SOCKET_TIMEOUTS, RedisClient, RedisJoinStore, ReplicaAck, SentinelTarget, connect
from localenv.netfault import NetFault
from localenv.redis import RedisCluster as LocalCluster
from localenv.redis import RedisSentinelSet, RedisServer

pytestmark = pytest.mark.timeout(180)

POOLED = 4  # connections the pool holds when the fault strikes
TIMEOUT_S = SOCKET_TIMEOUTS["socket_timeout"]  # the service's own socket timeout (5 s)


def new_store(client: RedisClient) -> RedisJoinStore:
    return RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000)


async def fill_pool(store: RedisJoinStore, count: int) -> None:
    """``count`` commands at once, so the pool opens (and then holds) ``count`` connections."""
    await asyncio.gather(*(store.ping() for _ in range(count)))


@pytest.fixture
def proxied_redis() -> Iterator[NetFault]:
    with RedisServer(appendonly=False) as server, NetFault("127.0.0.1", server.port) as proxy:
        yield proxy


async def test_half_open_connections_cost_one_socket_timeout(proxied_redis: NetFault) -> None:
    """Every pooled connection goes half-open; the work then grows by one concurrent call per attempt.

    Before the fix each attempt reached one more dead connection (POOLED x 5 s, measured 20.0 s);
    now the first timeout drops the other idle connections and the next attempt succeeds (5 s).
    """
    proxy = proxied_redis
    client = await connect(f"redis://127.0.0.1:{proxy.port}/0")
    try:
        store = new_store(client)
        await fill_pool(store, POOLED)
        assert proxy.stats.accepted == POOLED, "the pool should hold one connection per concurrent command"
        assert proxy.half_open() == POOLED

        started = time.monotonic()
        failed_attempts = 0
        for concurrent in range(1, 2 * POOLED + 2):
            try:
                await asyncio.gather(*(store.ping() for _ in range(concurrent)))
                break
            except Unavailable:
                failed_attempts += 1
        else:
            pytest.fail("the store never recovered from half-open connections")
        recovered_s = time.monotonic() - started
        print(f"recovered after {recovered_s:.1f} s, {failed_attempts} failed attempt(s), "
              f"{proxy.stats.accepted - POOLED} new connection(s)")

        assert failed_attempts == 1, f"{failed_attempts} attempts met a dead connection in turn ({recovered_s:.1f} s)"
        assert recovered_s < 1.5 * TIMEOUT_S, f"recovery took {recovered_s:.1f} s, more than one socket timeout"
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def sentinels() -> Iterator[RedisSentinelSet]:
    """A primary that stays primary while it is paused: the sentinels wait a minute before declaring it down."""
    with RedisSentinelSet(down_after_ms=60_000, failover_timeout_ms=120_000) as started:
        yield started


async def test_a_timeout_drops_the_idle_connections_of_a_sentinel_monitored_primary(
        sentinels: RedisSentinelSet) -> None:
    """The primary stops answering (SIGSTOP): one command times out, and the pool's other idle connections are
    closed with it (before the fix they stayed open); once the primary answers again, the store works at once."""
    client = await connect(SentinelTarget(tuple(sentinels.sentinel_addresses), sentinels.master_name),
                           socket_timeout=1.0)
    primary = sentinels.primary_port
    try:
        store = new_store(client)
        await fill_pool(store, POOLED)
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert sum(c.is_connected for c in pool._available_connections) == POOLED

        sentinels.pause_node(primary)
        try:
            with pytest.raises(Unavailable, match="Timeout"):
                await store.ping()
            open_after = sum(c.is_connected for c in pool._available_connections)
        finally:
            sentinels.resume_node(primary)
        assert open_after == 0, f"{open_after} idle connection(s) opened before the timeout were kept"
        assert await store.ping()
    finally:
        await client.aclose()


@pytest.mark.cluster
async def test_a_cluster_node_that_times_out_loses_only_its_own_idle_connections(redis_cluster: LocalCluster) -> None:
    """The replica acknowledgement goes to each primary directly, past redis-py's cluster client: when it times out
    on a paused primary, that node's idle connections are closed, and every other node's stay open."""
    client = await connect(redis_cluster.url, cluster=True, socket_timeout=1.0)
    assert isinstance(client, RedisCluster)
    store = RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000,
                           replica_ack=ReplicaAck(replicas=1, timeout_ms=100))
    keys: dict[str, str] = {}  # one key per primary
    for n in range(1000):
        node = client.get_node_from_key(f"k{n}")
        assert node is not None
        keys.setdefault(node.name, f"k{n}")
    try:
        for key in keys.values():
            await asyncio.gather(*(store._bounded(client.get(key)) for _ in range(POOLED)))
        paused_key = next(iter(keys.values()))
        paused = client.get_node_from_key(paused_key)
        assert paused is not None

        def open_idle() -> dict[str, int]:
            return {node.name: sum(c.is_connected for c in node._free) for node in client.get_primaries()}

        assert all(count >= POOLED for count in open_idle().values())

        redis_cluster.pause_node(int(paused.port))
        try:
            with pytest.raises(Unavailable, match="Timeout"):
                await store._acknowledge_cluster([paused_key])
            after = open_idle()
        finally:
            redis_cluster.resume_node(int(paused.port))
        assert after.pop(paused.name) == 0, "the paused node's idle connections were kept"
        assert all(count >= POOLED for count in after.values()), f"another node's were closed: {after}"
        # The next command reads the slots again (and only then does aclose() close the connections again).
        assert await store.ping()
    finally:
        await client.aclose()
