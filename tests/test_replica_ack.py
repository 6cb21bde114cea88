"""REDIS_WAIT_REPLICAS against real redis-server replicas: a Sentinel-monitored primary and a Redis Cluster.

The join store's contract holds with replica acknowledgement on; a write returns only once a replica
has it; a replica that stops acknowledging makes every buffered write and ledger record fail as
retryable (also when the same batch is done again and changes nothing, which WAIT alone would pass),
and the store goes on once the replica is back. ``check`` compares the setting with the replicas each
primary has connected.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import redis

from consumer.cli import cmd_check
from consumer.config import DEFAULT_REDIS_URL, Settings
from consumer.errors import Unavailable
from consumer.ops.check import Finding, run_checks
from consumer.store import Namespace, ResultOp, Settle, SpanOp
from consumer.store_redis import RedisClient, RedisJoinStore, ReplicaAck, connect
from localenv.redis import RedisCluster, RedisSentinelSet, RedisServer
from tests.support import eventually
from tests.test_join_store import (  # noqa: F401 - collected by pytest, with this module's ``store``
    Store,
    test_a_batch_larger_than_one_call_keeps_each_keys_order,
    test_claims_exclude_other_owners_until_lease_ends,
    test_concurrent_sides_always_meet,
    test_redelivered_span_returns_pending_until_settled,
    test_result_first_waits_and_is_released_by_span,
    test_span_first_then_result_joins,
)
from tests.test_sentinel import sentinel_settings

pytestmark = pytest.mark.timeout(180)

ACK = ReplicaAck(replicas=1, timeout_ms=300)
NS = Namespace("app", "q-ack")
RESULT = ResultOp(NS, "e1", b"RESULT", ["v1"], 10_000)


@pytest.fixture(scope="module")
def sentinels() -> Iterator[RedisSentinelSet]:
    with RedisSentinelSet(replicas=1) as started:
        yield started


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[RedisCluster]:
    with RedisCluster(replicas=1, node_timeout_ms=60_000) as started:  # a paused node is not failed over
        yield started


async def new_client(request: pytest.FixtureRequest) -> RedisClient:
    if "sentinel" in request.node.callspec.id:
        sentinels: RedisSentinelSet = request.getfixturevalue("sentinels")
        return await connect(Settings(**sentinel_settings(sentinels)).redis_target())
    return await connect(request.getfixturevalue("replicated_cluster").url, cluster=True)


@pytest.fixture(params=["sentinel", pytest.param("cluster", marks=pytest.mark.cluster)])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    made = await new_client(request)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
def store(client: RedisClient) -> Store:
    """The contract tests imported above run on this store: replica acknowledgement on."""
    return RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000,
                          replica_ack=ACK)


@asynccontextmanager
async def replica_paused(request: pytest.FixtureRequest, store: RedisJoinStore) -> AsyncIterator[None]:
    """The replica of the primary that serves NS's keys stops answering (SIGSTOP) for the block."""
    key = store._key(NS, "s")
    if "sentinel" in request.node.callspec.id:
        sentinels: RedisSentinelSet = request.getfixturevalue("sentinels")
        primary = sentinels.primary_port
        (replica,) = [port for port in sentinels.node_ports if port != primary]
        pause, resume = sentinels.pause_node, sentinels.resume_node
    else:
        cluster: RedisCluster = request.getfixturevalue("replicated_cluster")
        (replica,) = cluster.replicas_of(cluster.primary_of(key))
        pause, resume = cluster.pause_node, cluster.resume_node
    pause(replica)
    try:
        yield
    finally:
        resume(replica)


def replica_value(request: pytest.FixtureRequest, store: RedisJoinStore, key: str) -> bytes | None:
    """What the primary's replica holds under ``key`` (read on the replica itself)."""
    if "sentinel" in request.node.callspec.id:
        sentinels: RedisSentinelSet = request.getfixturevalue("sentinels")
        port = next(port for port in sentinels.node_ports if port != sentinels.primary_port)
        readonly = False
    else:
        cluster: RedisCluster = request.getfixturevalue("replicated_cluster")
        (port,) = cluster.replicas_of(cluster.primary_of(key))
        readonly = True
    replica = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    try:
        if readonly:
            replica.execute_command("READONLY")  # type: ignore[no-untyped-call]
        value = replica.get(key)
        assert value is None or isinstance(value, bytes)
        return value
    finally:
        replica.close()


async def test_a_buffered_side_is_on_the_replica_when_put_returns(request: pytest.FixtureRequest,
                                                                  client: RedisClient) -> None:
    """With replica acknowledgement, the replica holds a side as soon as put_many returns, without waiting."""
    store = RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000,
                           replica_ack=ACK)
    for i in range(20):
        ns = Namespace("app", f"q-{i}")
        await store.put_many([SpanOp(ns, "t:1", b"SPAN", 10_000)])
        assert replica_value(request, store, store._key(ns, "s")) is not None, f"side {i} not on the replica"


async def test_a_replica_that_does_not_acknowledge_fails_writes_as_retryable(request: pytest.FixtureRequest,
                                                                            client: RedisClient) -> None:
    """Puts and settles fail as Unavailable while the replica is stopped, a batch done again included; then pass."""
    store = RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000,
                           replica_ack=ACK)
    async with replica_paused(request, store):
        with pytest.raises(Unavailable, match="WAIT: 0 of 1 replicas"):
            await store.put_many([RESULT])
        with pytest.raises(Unavailable, match="WAIT: 0 of 1 replicas"):
            await store.settle_many([Settle(NS, delivered=["v1"])])
        # Done again on other connections, as by a consumer that took the partition over: the result is
        # buffered already and the script changes nothing, but its first write is still not on the replica,
        # so this fails too.
        other = await new_client(request)
        try:
            again = RedisJoinStore(other, prefix=store._prefix, shards=4, ledger_retention_ms=600_000,
                                   replica_ack=ACK)
            with pytest.raises(Unavailable, match="WAIT: 0 of 1 replicas"):
                await again.put_many([RESULT])
        finally:
            await other.aclose()
    (put,) = await store.put_many([RESULT])
    assert put.status == "duplicate"
    await store.settle_many([Settle(NS, delivered=["v1"])])
    assert await store.delivery_state(NS, "v1") == "d"


async def test_without_acknowledgement_a_write_passes_while_the_replica_is_stopped(
        request: pytest.FixtureRequest, client: RedisClient) -> None:
    """The control: without the setting the same write returns at once, before any replica has it."""
    store = RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000)
    async with replica_paused(request, store):
        (put,) = await asyncio.wait_for(store.put_many([SpanOp(NS, "t:1", b"SPAN", 10_000)]), 2)
        assert put.status == "stored"


async def replica_findings(settings: Settings) -> list[Finding]:
    """What ``check`` says about REDIS_WAIT_REPLICAS and the replicas."""
    return [f for f in await run_checks(settings) if "REDIS_WAIT_REPLICAS" in f.message]


def cluster_primaries(cluster: RedisCluster) -> list[int]:
    return [port for port in cluster.ports if cluster.replicas_of(port)]


@pytest.mark.parametrize("setup", ["sentinel", pytest.param("cluster", marks=pytest.mark.cluster)])
async def test_check_compares_wait_replicas_with_each_primarys_replicas(
        setup: str, request: pytest.FixtureRequest, make_settings: Callable[..., Settings],
        capsys: pytest.CaptureFixture[str]) -> None:
    """One replica per primary: `check` passes REDIS_WAIT_REPLICAS=1, fails 2 (writes would stop), warns at 0."""
    if setup == "sentinel":
        sentinels: RedisSentinelSet = request.getfixturevalue("sentinels")
        await asyncio.to_thread(sentinels.wait_for_replicas, 1)
        where = {**sentinel_settings(sentinels), "redis_url": DEFAULT_REDIS_URL}
        counts = ["the primary has 1"]
    else:
        cluster: RedisCluster = request.getfixturevalue("replicated_cluster")
        where = {"redis_url": cluster.url, "redis_cluster": True}
        counts = [f"primary 127.0.0.1:{port} has 1" for port in cluster_primaries(cluster)]
        assert len(counts) == 3
    (enough,) = await replica_findings(make_settings(**where, redis_wait_replicas=1))
    assert enough.ok and not enough.warning and all(count in enough.message for count in counts), enough

    assert await cmd_check(make_settings(**where, redis_wait_replicas=2)) == 1
    out = capsys.readouterr().out
    assert "FAIL redis   REDIS_WAIT_REPLICAS=2, more replicas than are connected" in out
    assert all(count in out for count in counts) and "writes stop" in out

    assert await cmd_check(make_settings(**where, redis_wait_replicas=0)) == 0
    out = capsys.readouterr().out
    assert "warn redis   REDIS_WAIT_REPLICAS=0 while replicas are connected" in out and "Delivery guarantees" in out


async def test_check_on_a_redis_without_replicas(redis_server: RedisServer,
                                                 make_settings: Callable[..., Settings]) -> None:
    """A lone Redis: REDIS_WAIT_REPLICAS=0 passes without a warning, 1 fails (no write would be acknowledged)."""
    (alone,) = await replica_findings(make_settings(redis_url=redis_server.url))
    assert alone.ok and not alone.warning and "no replicas connected (the primary has 0)" in alone.message
    (waits,) = await replica_findings(make_settings(redis_url=redis_server.url, redis_wait_replicas=1))
    assert not waits.ok and "the primary has 0" in waits.message


@pytest.mark.cluster
async def test_check_names_the_cluster_primary_whose_replica_is_gone(
        replicated_cluster: RedisCluster, make_settings: Callable[..., Settings]) -> None:
    """One primary's replica disconnected (stopped, its link cut): REDIS_WAIT_REPLICAS=1 fails naming that primary."""
    cluster = replicated_cluster
    key = "check-replicas"
    primary = cluster.primary_of(key)
    (replica,) = cluster.replicas_of(primary)
    admin = redis.Redis(host="127.0.0.1", port=primary, socket_timeout=2)
    cluster.pause_node(replica)
    try:
        admin.client_kill_filter(_type="replica")  # the stopped replica cannot connect again

        def connected() -> int:
            return int(admin.info("replication")["connected_slaves"])

        await eventually(connected, expect=0, what="the primary without its replica")
        (finding,) = await replica_findings(make_settings(redis_url=cluster.url, redis_cluster=True,
                                                          redis_wait_replicas=1))
    finally:
        cluster.resume_node(replica)
        admin.close()
    await asyncio.to_thread(cluster.wait_for_replicas, key, 1)
    assert not finding.ok and f"(primary 127.0.0.1:{primary} has 0)" in finding.message, finding
