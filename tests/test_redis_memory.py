"""Redis out of memory, against a real redis-server with a small maxmemory.

With ``noeviction`` a full Redis refuses every write: the service holds the stream (nothing dead-lettered,
nothing committed), says so on ``/readyz``, in a log line and a metric, and delivers every pair once memory
frees. An evicting policy, which would drop buffered sides without a word, is refused at start unless
``REDIS_ALLOW_EVICTION`` says to run anyway; a Redis that will not tell its policy is warned about.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import orjson
import pytest
import structlog
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import OutOfMemoryError

from consumer.config import Settings
from consumer.errors import Misconfigured
from consumer.ops.check import run_checks
from consumer.service import Service
from consumer.store_redis import connect
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from localenv.ports import free_port
from localenv.redis import RedisCluster, RedisServer, RedisUser
from tests.support import Topics, eventually, group_lag, running_service, topic_size

pytestmark = pytest.mark.timeout(240)

PAIRS = 200
LIMITED = RedisUser("limited", "limited-pass-1", "~* +@all -info -config")  # as managed Redis may be


@pytest.fixture(scope="module")
def small_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=False, users=[LIMITED], password="default-pass-1") as server:
        yield server


@pytest.fixture
async def admin(small_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(small_redis.url)
    await client.flushall()
    await client.config_set("maxmemory", "0")
    await client.config_set("maxmemory-policy", "noeviction")
    try:
        yield client
    finally:
        await client.config_set("maxmemory", "0")
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()


async def fill(client: Redis, *, headroom: int = 2 << 20) -> int:
    """Set maxmemory a little above what is used, then write junk until Redis answers OOM; the junk keys' count."""
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", str(used + headroom))
    written = 0
    try:
        while True:
            await client.set(f"junk:{written}", b"x" * 16_384)
            written += 1
    except OutOfMemoryError:
        return written


async def readyz(port: int) -> tuple[int, dict[str, object]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    return response.status_code, response.json()


async def unready_for_memory(port: int) -> bool:
    status, body = await readyz(port)
    return status == 503 and body["redis"] is True and "redis is out of memory" in str(body.get("refused"))


async def metric(port: int, name: str) -> float | None:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    found = re.search(rf"^{name} (\S+)$", text, flags=re.MULTILINE)
    return float(found[1]) if found else None


async def test_a_full_redis_holds_the_stream_and_every_pair_is_delivered_once_memory_frees(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker, small_redis: RedisServer, admin: Redis) -> None:
    """Full: /readyz 503 naming Redis's memory, the gauge at 1, nothing delivered, dead-lettered or committed.
    Freed: every pair delivered once, ready again, the gauge at 0, the group's lag 0."""
    port = free_port()
    settings = make_settings(redis_url=small_redis.url, health_port=port, health_host="127.0.0.1")
    junk = await fill(admin)
    for i in range(PAIRS):
        key = f"oom-{i}"
        await producer.send(topics.span, orjson.dumps({"schema_version": 1, "join_key": key,
                                                       "trace_id": f"{i:032x}", "span_id": str(10_000 + i)}))
        await producer.send(topics.result, orjson.dumps({
            "schema_version": 1, "event_id": f"oom-event-{i:06d}", "join_key": key,
            "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 0.5}]}))
    await producer.flush()
    with structlog.testing.capture_logs() as logs:
        async with running_service(settings):
            await eventually(lambda: unready_for_memory(port), what="/readyz to say Redis is out of memory")
            assert await metric(port, "evaljoin_redis_out_of_memory") == 1
            await asyncio.sleep(3)  # held: retried, never given up on
            assert intake.accepted_metrics() == []
            assert await topic_size(kafka.bootstrap_servers, topics.dlq) == 0
            assert await group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                   [topics.span, topics.result]) == 2 * PAIRS
            await admin.delete(*(f"junk:{i}" for i in range(junk)))
            await eventually(lambda: len(intake.accepted_metrics()), expect=PAIRS, within=60,
                             what="every pair once memory is free")
            await eventually(lambda: readyz(port), expect=(200, {"status": "ok", "in_group": True, "redis": True}),
                             what="ready again")
            assert await metric(port, "evaljoin_redis_out_of_memory") == 0
            assert (await metric(port, "evaljoin_redis_oom_refusals_total") or 0) >= 1
            await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                               [topics.span, topics.result]), expect=0, what="the lag to reach 0")
    spans = sorted(m["join_on"]["span"]["span_id"] for m in intake.accepted_metrics())
    assert spans == sorted(str(10_000 + i) for i in range(PAIRS))  # each once
    assert await topic_size(kafka.bootstrap_servers, topics.dlq) == 0
    events = [entry["event"] for entry in logs]
    assert events.count("redis_out_of_memory") == 1 and events.count("redis_memory_available_again") == 1


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
async def test_an_evicting_policy_is_refused_at_start_and_by_check(
        policy: str, make_settings: Callable[..., Settings], small_redis: RedisServer, admin: Redis) -> None:
    """The start fails with Misconfigured naming the policy and REDIS_ALLOW_EVICTION; ``check`` fails saying why."""
    await admin.config_set("maxmemory-policy", policy)
    settings = make_settings(redis_url=small_redis.url)
    with pytest.raises(Misconfigured) as refused:
        async with Service.open(settings):
            pass
    assert refused.value.setting == "REDIS_ALLOW_EVICTION" and policy in str(refused.value)
    findings = [f for f in await run_checks(settings) if f.component == "redis" and "maxmemory-policy" in f.message]
    assert [(f.ok, policy in f.message, "refuses to start" in f.message) for f in findings] == [(False, True, True)]


async def test_an_evicting_policy_allowed_explicitly_starts_with_a_loud_warning(
        make_settings: Callable[..., Settings], small_redis: RedisServer, admin: Redis) -> None:
    """REDIS_ALLOW_EVICTION=true: the service runs, logs redis_evicts_keys at error level, check warns."""
    await admin.config_set("maxmemory-policy", "allkeys-lfu")
    settings = make_settings(redis_url=small_redis.url, redis_allow_eviction=True)
    with structlog.testing.capture_logs() as logs:
        async with running_service(settings):
            pass
    (warning,) = [entry for entry in logs if entry["event"] == "redis_evicts_keys"]
    assert warning["log_level"] == "error" and warning["policy"] == ["allkeys-lfu"]
    (finding,) = [f for f in await run_checks(settings) if "maxmemory-policy" in f.message]
    assert finding.ok and finding.warning and "REDIS_ALLOW_EVICTION" in finding.message


async def test_a_redis_that_will_not_tell_its_policy_is_warned_about_not_refused(
        make_settings: Callable[..., Settings], small_redis: RedisServer, admin: Redis) -> None:
    """A user that may run neither INFO nor CONFIG (as on some managed services): a warning, and the service runs."""
    await admin.config_set("maxmemory-policy", "allkeys-lru")
    url = small_redis.base_url.replace("://", f"://{LIMITED.name}:{LIMITED.password}@", 1)
    settings = make_settings(redis_url=url)
    with structlog.testing.capture_logs() as logs:
        async with running_service(settings):
            pass
    (warning,) = [entry for entry in logs if entry["event"] == "redis_eviction_policy_unknown"]
    assert "INFO memory" in warning["why"] and "CONFIG GET" in warning["why"]


async def test_one_evicting_primary_of_a_cluster_is_enough_to_refuse_the_start(
        make_settings: Callable[..., Settings], redis_cluster: RedisCluster) -> None:
    """Each primary of a Redis Cluster is asked: one with volatile-lru refuses the start, naming it."""
    client = await connect(redis_cluster.url, cluster=True)
    assert isinstance(client, AsyncRedisCluster)
    primary = client.get_primaries()[-1]
    await client.config_set("maxmemory-policy", "volatile-lru", target_nodes=primary)
    try:
        with pytest.raises(Misconfigured, match="volatile-lru"):
            async with Service.open(make_settings(redis_url=redis_cluster.url, redis_cluster=True)):
                pass
    finally:
        await client.config_set("maxmemory-policy", "noeviction", target_nodes=primary)
        await client.aclose()
