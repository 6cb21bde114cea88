"""Per-app buffer quotas on a real redis-server and a real Redis Cluster, and through the service.

The store: the per-app counts equal what Redis holds after every step of random work (stores, joins,
replaced spans, deliveries, expiry), on both, and the memory store counts exactly as Redis does. The
service: ten apps share one group and one Redis, one of them flooding results nobody joins at 100 times
its quota; the other nine lose nothing and stay on time, and every flooded record is accounted for (held
in the buffer, or dead-lettered as ``app_quota_exceeded``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer import store_redis
from consumer.config import Settings
from consumer.join import QUOTA_REASON
from consumer.store import AppQuotas, AppUsage, DeadlineIndex, JoinStore, Namespace, ResultOp, Settle, SpanOp
from consumer.store_memory import MemoryJoinStore
from consumer.store_redis import RedisClient, RedisJoinStore, connect
from localenv.intake import FakeIntake
from tests.support import Topics, eventually, read_topic, running_service

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    server = request.getfixturevalue("redis_cluster" if request.param == "cluster" else "redis_server")
    client = await connect(server.url, cluster=request.param == "cluster")
    try:
        yield client
    finally:
        await client.aclose()


def new_store(client: RedisClient, **options: Any) -> RedisJoinStore:
    return RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000, **options)


async def held_in_redis(client: RedisClient, prefix: str) -> dict[str, AppUsage]:
    """What each app holds, read from the keys themselves: spans (s, o) and pending results (r), with their bytes."""
    sides: dict[str, int] = {}
    size: dict[str, int] = {}
    async for raw in client.scan_iter(match=f"{prefix}:{{*}}:[sor]", count=1000):
        key = raw.decode()
        app = Namespace.from_tag(key[key.index("{") + 1:key.rindex("}")]).ml_app
        if key.endswith(":r"):
            values = list((await client.hgetall(key)).values())
            sides[app] = sides.get(app, 0) + len(values)
            size[app] = size.get(app, 0) + sum(len(value) for value in values)
        else:
            sides[app] = sides.get(app, 0) + 1
            size[app] = size.get(app, 0) + int(await client.strlen(key))
    return {app: AppUsage(count, size[app]) for app, count in sides.items() if count}


# -- random work, applied alike to any store -----------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: str  # span | result | settle | sweep
    ns: Namespace
    name: str = ""  # a span's identity, a result's event id
    record: bytes = b""
    slots: tuple[str, ...] = ()
    now_ms: int = 0


def random_work(seed: int, steps: int) -> list[Step]:
    """Spans and results of three apps over a few keys, with and without runs, repeated slots (waiting results,
    replaced spans), deliveries of what joined, and sweeps as time passes."""
    rnd = random.Random(seed)
    work: list[Step] = []
    for i in range(steps):
        ns = Namespace(rnd.choice(["a", "b", "c:{x}"]), f"k{rnd.randrange(6)}", rnd.choice(["", "", "run1"]))
        roll = rnd.random()
        record = bytes(rnd.randrange(97, 123) for _ in range(rnd.randrange(1, 60)))
        if roll < 0.3:
            work.append(Step("span", ns, f"t:{rnd.randrange(3)}", record))
        elif roll < 0.75:
            slots = () if ns.run else tuple(sorted({rnd.choice(["aaaaaaaa", "bbbbbbbb", "cccccccc"])}))
            work.append(Step("result", ns, f"evt-{rnd.randrange(8)}", record, slots))
        elif roll < 0.9:
            work.append(Step("settle", ns, f"evt-{rnd.randrange(8)}"))
        else:
            work.append(Step("sweep", ns, now_ms=i * 100))
    return work


async def apply(store: JoinStore | DeadlineIndex, step: Step) -> None:
    assert isinstance(store, RedisJoinStore | MemoryJoinStore)
    deadline = 1_000 + len(step.record) * 100  # some sides fall due at each sweep, others wait
    if step.kind == "span":
        await store.put_many([SpanOp(step.ns, step.name, step.record, deadline)])
    elif step.kind == "result":
        await store.put_many([ResultOp(step.ns, step.name, step.record, [f"{step.name}/0"], deadline, step.slots)])
    elif step.kind == "settle":
        await store.settle_many([Settle(step.ns, delivered=[f"{step.name}/0"], drop_event_ids=[step.name])])
    else:
        for shard in range(store.shards):
            for side in await store.due(shard, step.now_ms, 100):
                outcome = await store.expire(side)
                if outcome.verdict == "busy":
                    await store.postpone(side, step.now_ms + 500)
                else:
                    await store.forget(side)


async def test_counts_are_what_redis_holds(redis_client: RedisClient) -> None:
    """After every step of random work the per-app counts (sides and bytes) equal what the keys hold; once
    everything has expired they are all gone."""
    store = new_store(redis_client)
    for step in random_work(seed=14, steps=300):
        await apply(store, step)
        assert await store.app_usage() == await held_in_redis(redis_client, store._prefix), step
    await apply(store, Step("sweep", Namespace("a", "k"), now_ms=2**40))
    await apply(store, Step("sweep", Namespace("a", "k"), now_ms=2**41))  # what was postponed
    assert await store.app_usage() == {} == await held_in_redis(redis_client, store._prefix)


async def test_memory_store_counts_as_redis_does(redis_server: Any) -> None:
    """The same random work on the memory store and a redis-server gives the same counts, and the same oldest
    waiting side per app, at every step."""
    client = await connect(redis_server.url)
    try:
        redis_store, memory_store = new_store(client), MemoryJoinStore(shards=4)
        for step in random_work(seed=8, steps=300):
            await apply(redis_store, step)
            await apply(memory_store, step)
            assert await memory_store.app_usage() == await redis_store.app_usage(), step
            assert await memory_store.oldest_pending(100) == await redis_store.oldest_pending(100), step
    finally:
        await client.aclose()


async def test_quota_on_redis(redis_client: RedisClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quota rules of the memory store, on Redis: waiting sides refused at the quota, a span that takes a
    waiting result still stored, room back after delivery. (On a cluster, with the totals read before each call.)"""
    monkeypatch.setattr(store_redis, "QUOTA_REFRESH_S", 0.0)
    store = new_store(redis_client, quotas=AppQuotas(sides=2, per_app={"free": (0, 0)}))

    async def put(op: SpanOp | ResultOp) -> str:
        return (await store.put_many([op]))[0].status

    def result(key: str, app: str = "a") -> ResultOp:
        return ResultOp(Namespace(app, key, "r"), "evt-1", b"R", [f"{key}/0"], 10_000)

    assert [await put(result(key)) for key in ("k1", "k2", "k3")] == ["buffered", "buffered", "quota"]
    assert await put(SpanOp(Namespace("a", "k9", "r"), "t:1", b"S", 10_000)) == "quota"
    assert await put(SpanOp(Namespace("a", "k1", "r"), "t:1", b"S", 10_000)) == "stored"
    assert {await put(result(f"k{i}", "free")) for i in range(20)} == {"buffered"}
    await store.settle_many([Settle(Namespace("a", "k1", "r"), delivered=["k1/0"], drop_event_ids=["evt-1"]),
                             Settle(Namespace("a", "k2", "r"), delivered=["k2/0"], drop_event_ids=["evt-1"])])
    assert (await store.app_usage())["a"] == AppUsage(1, len(b"0t:1\nS"))
    assert await put(result("k3")) == "buffered"


@pytest.mark.cluster
async def test_cluster_refusal_lags_by_at_most_the_refresh(redis_cluster: Any) -> None:
    """On a cluster an app's total is read at most every QUOTA_REFRESH_S: what it writes in between goes
    through, counted exactly, and its next waiting side after a refresh is refused."""
    client = await connect(redis_cluster.url, cluster=True)
    try:
        store = new_store(client, quotas=AppQuotas(sides=3))
        ops = [ResultOp(Namespace("a", f"k{i}", "r"), "evt-1", b"R", ["v"], 10_000) for i in range(10)]
        assert {put.status for put in await store.put_many(ops)} == {"buffered"}  # read before: nothing held
        assert (await store.app_usage())["a"].sides == 10
        await asyncio.sleep(store_redis.QUOTA_REFRESH_S)
        late = await store.put_many([ResultOp(Namespace("a", "k10", "r"), "evt-1", b"R", ["v"], 10_000)])
        assert late[0].status == "quota"
    finally:
        await client.aclose()


# -- through the service ----------------------------------------------------------------------------------


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
def redis_url(request: pytest.FixtureRequest) -> tuple[str, bool]:
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster").url, True
    return request.getfixturevalue("redis_server").url, False


APPS = [f"app{i}" for i in range(9)]
PAIRS = 30  # per quiet app
FLOOD_QUOTA = 20
FLOOD = 100 * FLOOD_QUOTA  # results nobody joins
ON_TIME_S = 5.0  # the longest a quiet app's evaluation may take from its second side to the intake


def flood_record(producer: AIOKafkaProducer, topics: Topics, number: int) -> Any:
    """The flooder's record ``number``: a result nobody's span joins, or (every third) a span nobody evaluates."""
    if number % 3 == 2:
        return producer.send(topics.span, orjson.dumps({
            "schema_version": 1, "ml_app": "flood", "join_key": f"nobody-{number}", "trace_id": "ff",
            "span_id": str(number)}))
    return producer.send(topics.result, orjson.dumps({
        "schema_version": 1, "ml_app": "flood", "event_id": f"flood-{number:06d}", "join_key": f"nobody-{number}",
        "evaluations": [{"label": "noise", "metric_type": "score", "value": 1}]}))


async def test_a_flooding_app_neither_stalls_nor_costs_the_other_nine(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        redis_url: tuple[str, bool]) -> None:
    """Ten apps in one group on one Redis; one floods 100x its quota with results nobody joins and spans nobody
    evaluates, in bursts while
    the nine send pairs. Each of the nine's 270 evaluations reaches the intake once, within ON_TIME_S of its
    second side; none of their records is dead-lettered or reported; the flooder holds at most its quota on a
    single Redis, and every one of its records is either held or dead-lettered as app_quota_exceeded."""
    settings = make_settings(app_quota_sides=500, app_quotas=orjson.dumps({"flood": {"sides": FLOOD_QUOTA}}).decode())
    sent_at: dict[str, float] = {}  # span id -> when the pair's second side was acknowledged
    seen_at: dict[str, float] = {}

    async def watch_intake() -> None:
        while True:
            for metric in intake.accepted_metrics():
                seen_at.setdefault(metric["join_on"]["span"]["span_id"], time.monotonic())
            await asyncio.sleep(0.05)

    async with running_service(settings) as service:
        # Timed from when the service holds its partitions: the group's first join is not the join's latency.
        assigned = service.metrics.registry.get_sample_value
        await eventually(lambda: service.in_group and assigned("evaljoin_assigned_partitions") == 4,
                         what="the partitions assigned")
        watcher = asyncio.create_task(watch_intake())
        try:
            flood_sent = 0
            for burst in range(PAIRS):
                flood = [flood_record(producer, topics, flood_sent + i)
                         for i in range(FLOOD // PAIRS + (1 if burst < FLOOD % PAIRS else 0))]
                flood_sent += len(flood)
                pairs = []
                for number, app in enumerate(APPS):
                    span_id = str(1000 * (number + 1) + burst)
                    span = {"schema_version": 1, "ml_app": app, "join_key": f"q{burst}", "trace_id": "ab12",
                            "span_id": span_id}
                    result = {"schema_version": 1, "ml_app": app, "event_id": f"evt-{app}-{burst:04d}",
                              "join_key": f"q{burst}",
                              "evaluations": [{"label": "quality", "metric_type": "score", "value": burst}]}
                    first, second = (span, result) if burst % 2 else (result, span)
                    pairs.append((span_id, first, second))
                for _, first, _ in pairs:
                    await producer.send(topics.span if "span_id" in first else topics.result, orjson.dumps(first))
                await asyncio.gather(*flood)
                acks = [(span_id, await producer.send(topics.span if "span_id" in second else topics.result,
                                                      orjson.dumps(second))) for span_id, _, second in pairs]
                for span_id, ack in acks:
                    await ack
                    sent_at[span_id] = time.monotonic()
                await asyncio.sleep(0.1)
            assert flood_sent == FLOOD
            await eventually(lambda: len(seen_at) >= len(APPS) * PAIRS, within=60, what="the nine apps' evaluations")
            # Every flooded record is held or dead-lettered; the sweeper's gauges say how many are held.
            dlq = await read_topic(settings.kafka_bootstrap_servers, topics.dlq, 1, within=30)
            assert dlq
            metric = service.metrics.registry.get_sample_value

            def accounted() -> bool:
                held = metric("evaljoin_app_buffered_sides", {"ml_app": "flood"}) or 0
                refused = metric("evaljoin_app_dead_letters_total", {"ml_app": "flood", "reason": QUOTA_REASON})
                return held + (refused or 0) == FLOOD

            await eventually(accounted, within=30, what="every flooded record held or dead-lettered")
        finally:
            watcher.cancel()
    latencies = sorted(seen_at[span_id] - sent_at[span_id] for span_id in sent_at)
    print(f"quiet apps: {len(latencies)} evaluations, median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"slowest {latencies[-1] * 1000:.0f} ms")
    delivered = intake.accepted_metrics()
    assert len(delivered) == len(APPS) * PAIRS  # once each: none lost, none twice
    assert {m["ml_app"] for m in delivered} == set(APPS)
    assert latencies[-1] < ON_TIME_S, f"slowest {latencies[-1]:.2f} s, median {latencies[len(latencies) // 2]:.2f} s"
    dead = await read_topic(settings.kafka_bootstrap_servers, topics.dlq, FLOOD - FLOOD_QUOTA if not redis_url[1]
                            else 1, within=30)
    reasons = {dict(record.headers)["evaljoin.error"].decode() for record in dead}
    assert reasons == {QUOTA_REASON}
    assert all(orjson.loads(record.value)["ml_app"] == "flood" for record in dead)
    held = metric("evaljoin_app_buffered_sides", {"ml_app": "flood"})
    refused = metric("evaljoin_app_dead_letters_total", {"ml_app": "flood", "reason": QUOTA_REASON})
    if not redis_url[1]:  # a single Redis checks the quota in the script that stores: exact
        assert (held, refused) == (FLOOD_QUOTA, FLOOD - FLOOD_QUOTA)
    else:  # a cluster refuses once its totals, read every second, show the quota used up
        assert refused and held and held + refused == FLOOD
    for app in APPS:
        assert metric("evaljoin_app_evaluations_delivered_total", {"ml_app": app}) == PAIRS
        assert metric("evaljoin_app_dead_letters_total", {"ml_app": app, "reason": QUOTA_REASON}) is None
    assert metric("evaljoin_unmatched_reported_total", {"reason": "result_without_span"}) is None
