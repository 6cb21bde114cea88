"""A replicated Kafka cluster loses brokers while traffic flows; the consumer must ride through every failover.

Production runs Kafka as a cluster: here three KRaft nodes, each broker and controller
(:class:`localenv.kafka_cluster.KafkaCluster`), topics with replication factor 3 and
``min.insync.replicas=2``, the consumer bootstrapped with all three addresses. A stream of pairs flows
the whole time (a steady rate, about one record in 16 pairs not JSON, so dead-lettering, a produce with
``acks=all``, meets the faults too) while one kind of fault strikes:

* **leaders**: SIGKILL the broker leading the most input partitions, and next time the group
  coordinator's (the leader of the group's offsets partition), restart it after a few seconds, wait
  until every replica is back in sync;
* **controller**: SIGKILL the active controller (the KRaft quorum leader, from DescribeQuorum), which
  also leads partitions, the same way;
* **rolling**: restart all three nodes one after the other with SIGTERM (a controlled shutdown),
  waiting for every replica to be in sync before the next, as an operator's rolling restart does;
* **down**: SIGKILL the busiest leader and keep it down while a long stretch of traffic is delivered
  and committed on two brokers, then bring it back.

Recovery time, per fault: the longest any evaluation waited after the fault struck, from the fault or
from its own publication, whichever is later, to its acceptance by the intake (the consumer's stall,
the normal end-to-end delay included). After the last fault the stream stops, every evaluation must
arrive, the group's lag reach 0 and the service exit 0 on SIGTERM; then the account, pair by pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import acreate_topics
from localenv.kafka_cluster import KafkaCluster
from localenv.redis import RedisServer
from tests.reliability.harness import (
    SCALE,
    Pair,
    ServiceProcess,
    account,
    assert_guarantees,
    drain_topic,
    header,
    lag_or_none,
    make_pairs,
    metric_key,
    report,
    scaled,
    timeout_for,
    wait_for,
)
from tests.support import FAST_TIMINGS

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

RATE = 40  # pairs a second, two evaluations each
NOT_JSON_EVERY = 16  # one record that is not JSON after every 16th pair


def _seed() -> int:
    return int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    with KafkaCluster(size=3, min_insync_replicas=2, heap="256m") as started:
        yield started


@dataclass
class Fault:
    """One fault: when it struck, when it was over (the node back and every replica in sync), what it hit."""

    kind: str
    target: int
    struck: float
    over: float = 0.0
    worst_delay_s: float = 0.0
    at: str = field(default_factory=lambda: datetime.now(UTC).strftime("%H:%M:%S.%f")[:-4])  # to find it in logs

    def __str__(self) -> str:
        return f"{self.kind}@{self.target} {self.at}: {self.worst_delay_s:.1f}s"


@dataclass
class Stream:
    """Pairs published at a steady rate, each one's acknowledgement time; the intake's first acceptance of each."""

    producer: AIOKafkaProducer
    intake: FakeIntake
    settings: Settings
    rng: random.Random
    run: str
    published: dict[int, float] = field(default_factory=dict)  # pair index -> both sides acknowledged at
    pairs: list[Pair] = field(default_factory=list)
    not_json: list[bytes] = field(default_factory=list)
    delivered_at: dict[tuple[str, str], float] = field(default_factory=dict)
    send_retries: int = 0
    _seen_requests: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish_forever(self) -> None:
        """RATE pairs a second, in bursts every 0.1 s, until :meth:`stop`; a send that fails is sent again."""
        pending: set[asyncio.Task[None]] = set()
        next_burst = time.monotonic()
        while not self._stop.is_set():
            start = len(self.pairs)  # a run name per burst: make_pairs numbers its join keys from 0
            self.pairs.extend(make_pairs(RATE // 10, run=f"{self.run}-{start}", labels=("faithfulness", "relevance"),
                                         span_base=10_000_000 + start))
            for pair in self.pairs[start:]:
                task = asyncio.create_task(self._publish_pair(pair, start))
                pending.add(task)
                task.add_done_callback(pending.discard)
            next_burst += 0.1
            await asyncio.sleep(max(0.0, next_burst - time.monotonic()))
        await asyncio.gather(*pending)

    async def _publish_pair(self, pair: Pair, base: int) -> None:
        messages = pair.messages(self.settings.span_topic, self.settings.result_topic)
        self.rng.shuffle(messages)
        index = base + pair.index
        if index % NOT_JSON_EVERY == NOT_JSON_EVERY - 1:
            bad = f"not json {self.run} {index}".encode()
            self.not_json.append(bad)
            messages.append((self.settings.span_topic, None, bad, []))
        for topic, key, value, _headers in messages:
            await self._send(topic, key, value)
        self.published[index] = time.monotonic()

    async def _send(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        while True:
            try:
                await (await self.producer.send(topic, value, key=key))
                return
            except KafkaError:
                self.send_retries += 1
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()

    def observe(self) -> set[tuple[str, str]]:
        """Note the time of every evaluation the intake accepted since the last call (first copies only); returns
        every evaluation delivered so far."""
        now = time.monotonic()
        new = self.intake.requests[self._seen_requests:]
        self._seen_requests += len(new)
        for request in new:
            if 200 <= request.status < 300:
                for metric in request.metrics:
                    self.delivered_at.setdefault(metric_key(metric), now)
        return set(self.delivered_at)

    def expected(self) -> set[tuple[str, str]]:
        return {key for index in self.published for key in self.pairs[index].eval_keys}

    def worst_delay(self, struck: float, until: float) -> float:
        """The longest an evaluation waited after ``struck``: those published before ``until`` and not delivered
        by ``struck``, from ``struck`` (or their publication, if later) to their delivery."""
        worst = 0.0
        for index, acked in self.published.items():
            if acked > until:
                continue
            for key in self.pairs[index].eval_keys:
                delivered = self.delivered_at.get(key)
                if delivered is None:
                    return float("inf")
                if delivered >= struck:
                    worst = max(worst, delivered - max(acked, struck))
        return worst


@contextlib.asynccontextmanager
async def streaming(cluster: KafkaCluster, settings: Settings, intake: FakeIntake, rng: random.Random,
                    run: str) -> AsyncIterator[Stream]:
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap_servers, acks="all", enable_idempotence=True,
                                request_timeout_ms=30_000, linger_ms=5)
    await producer.start()
    stream = Stream(producer, intake, settings, rng, run)
    publisher = asyncio.create_task(stream.publish_forever())

    async def observe_forever() -> None:
        while True:
            stream.observe()
            await asyncio.sleep(0.1)

    observer = asyncio.create_task(observe_forever())
    try:
        yield stream
    finally:
        stream.stop()
        try:
            await asyncio.wait_for(publisher, 120)
        finally:
            observer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await observer
            await producer.stop()
            stream.observe()


def _settings(cluster: KafkaCluster, redis_server: RedisServer, intake: FakeIntake, run: str) -> Settings:
    return Settings(
        kafka_bootstrap_servers=cluster.bootstrap_servers, kafka_group_id=f"g-{run}",
        span_topic=f"{run}.spans", result_topic=f"{run}.results", dlq_topic=f"{run}.dlq",
        unmatched_topic=f"{run}.unmatched", redis_url=redis_server.url, redis_cluster=False,
        redis_key_prefix=f"t{run}", redis_deadline_shards=4, default_ml_app="nemos-demo",
        dd_llmobs_override_origin=intake.origin, dd_api_key="test-api-key-0123456789",
        kafka_max_batch=32, intake_batch_max_evals=8, **FAST_TIMINGS)


async def _coordinator(cluster: KafkaCluster, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers, request_timeout_ms=5000)
    await admin.start()
    try:
        return int(await admin.find_coordinator(group))
    finally:
        await admin.close()


async def _all_up(cluster: KafkaCluster, topics: list[str]) -> None:
    """Every node running and every replica in sync: where each scenario starts (a failed one may leave less)."""
    for node in cluster.nodes:
        if not node.running:
            await asyncio.to_thread(node.restart)
    await cluster.await_in_sync(topics)


async def _run_scenario(kind: str, cluster: KafkaCluster, redis_server: RedisServer, intake: FakeIntake,
                        tmp_path: Path, strike: Callable[[KafkaCluster, Settings, Stream, random.Random],
                                                         Any]) -> None:
    """Topics and a service of its own; the stream; ``strike`` (the faults, returning them); then the account."""
    seed = _seed()
    rng = random.Random(seed)
    run = f"{kind}-{uuid.uuid4().hex[:8]}"
    settings = _settings(cluster, redis_server, intake, run)
    inputs = [settings.span_topic, settings.result_topic]
    await acreate_topics(cluster.bootstrap_servers, {settings.span_topic: 6, settings.result_topic: 6,
                                                     settings.dlq_topic: 1, settings.unmatched_topic: 1},
                         replication_factor=3)
    await _all_up(cluster, [*inputs, settings.dlq_topic])
    intake.delay(0.01)
    service = ServiceProcess(settings, tmp_path / "service.log")
    try:
        service.start()
        async with streaming(cluster, settings, intake, rng, run) as stream:
            # Before the first fault: the service started, its group formed, the stream flowing through it.
            await asyncio.sleep(2.0)
            await _caught_up(stream, within=timeout_for(60), alive=service)
            faults: list[Fault] = await strike(cluster, settings, stream, rng)
            await asyncio.sleep(2.0)  # traffic after the last fault
        everything = stream.expected()
        try:
            await wait_for(lambda: len(everything - stream.observe()), expect=0, within=timeout_for(120),
                           what=f"every evaluation at the intake (seed {seed})", alive=[service], interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await _explain_missing(cluster, settings, stream, everything)}") from None
        await wait_for(lambda: lag_or_none(cluster.bootstrap_servers, settings), expect=0, within=timeout_for(90),
                       what="the group's lag to reach 0", alive=[service])
        for fault in faults:
            fault.worst_delay_s = stream.worst_delay(fault.struck, fault.over)
        assert await service.terminate() == 0, service.tail()
        dlq = await drain_topic(cluster.bootstrap_servers, settings.dlq_topic)
        unmatched = await drain_topic(cluster.bootstrap_servers, settings.unmatched_topic)
    finally:
        service.kill_if_running()
    label = {"leaders": f"partition leaders SIGKILL x{len(faults)}",
             "controller": f"active controller SIGKILL x{len(faults)}",
             "rolling": f"rolling restart of all 3 nodes x{len(faults) // 3}",
             "down": f"one broker down {faults[0].over - faults[0].struck:.0f} s" if faults else "one broker down",
             }[kind]
    outcome = account(f"j. Kafka cluster: {label}", expected=everything, intake=intake, dlq=dlq,
                      unmatched=unmatched, recover_s=max(f.worst_delay_s for f in faults), seed=seed,
                      faults=", ".join(map(str, faults)),
                      not_json=len(stream.not_json), test_producer_retries=stream.send_retries,
                      join_retries=service.log_events("join_retry"))
    report(outcome)
    assert_guarantees(outcome)
    reasons = {header(record, "evaljoin.error") for record in dlq}
    assert reasons <= {b"invalid_json"}, f"only the records that are not JSON belong on the DLQ: {reasons}"
    assert set(stream.not_json) <= {bytes(record.value) for record in dlq}, "a record that is not JSON was lost"
    assert outcome.unmatched == 0
    assert all(f.worst_delay_s < float("inf") for f in faults)


async def _caught_up(stream: Stream, *, within: float, alive: ServiceProcess | None = None) -> None:
    """Until every evaluation published so far has been delivered."""
    published = {key for index in list(stream.published) for key in stream.pairs[index].eval_keys}
    await wait_for(lambda: len(published - stream.observe()), expect=0, within=within,
                   what="the evaluations published so far at the intake", alive=[alive] if alive else [])


async def _committed_past_now(cluster: KafkaCluster, settings: Settings, *, within: float) -> None:
    """Until the group has committed every input partition up to where it ends now (traffic flows on meanwhile)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=cluster.bootstrap_servers, group_id=None)
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap_servers)
    await consumer.start()
    await admin.start()
    try:
        partitions = [TopicPartition(topic, p) for topic in (settings.span_topic, settings.result_topic)
                      for p in range(6)]
        ends = await consumer.end_offsets(partitions)

        async def behind() -> int:
            committed = await admin.list_consumer_group_offsets(settings.kafka_group_id)
            return sum(max(0, end - (committed[tp].offset if tp in committed else 0)) for tp, end in ends.items())

        await wait_for(behind, expect=0, within=within, what="the group's commits past the input's current end")
    finally:
        await admin.close()
        await consumer.stop()


async def _explain_missing(cluster: KafkaCluster, settings: Settings, stream: Stream,
                           everything: set[tuple[str, str]]) -> str:
    """For a failure message: where the first missing pairs' records are in Kafka, and the group's lag."""
    missing = sorted({span_id for span_id, _label in everything - stream.delivered_at.keys()})
    by_span = {pair.span_id: pair for pair in stream.pairs}
    records = [*await drain_topic(cluster.bootstrap_servers, settings.span_topic),
               *await drain_topic(cluster.bootstrap_servers, settings.result_topic)]
    lines = [f"{len(missing)} pairs missing; lag {await lag_or_none(cluster.bootstrap_servers, settings)}"]
    for span_id in missing[:8]:
        key = by_span[span_id].join_key.encode()
        found = [f"{r.topic}:{r.partition}@{r.offset}" for r in records if r.key == key]
        lines.append(f"  {by_span[span_id].join_key}: records {found}")
    return "\n".join(lines)


async def _kill_and_restart(cluster: KafkaCluster, kind: str, target: int, topics: list[str],
                            rng: random.Random) -> Fault:
    node = cluster.node(target)
    fault = Fault(kind, target, time.monotonic())
    node.kill()
    await asyncio.sleep(rng.uniform(2.0, 5.0))
    await asyncio.to_thread(node.restart)
    await cluster.await_in_sync(topics)
    fault.over = time.monotonic()
    return fault


@pytest.mark.timeout(timeout_for(420))
async def test_partition_leaders_sigkilled(cluster: KafkaCluster, redis_server: RedisServer, intake: FakeIntake,
                                           tmp_path: Path) -> None:
    """The broker leading most input partitions, then the group coordinator's, SIGKILLed mid-stream: 0 lost."""

    async def strike(cluster: KafkaCluster, settings: Settings, stream: Stream, rng: random.Random) -> list[Fault]:
        inputs = [settings.span_topic, settings.result_topic]
        faults = []
        for i in range(scaled(1)):
            if i % 2 == 0:
                kind, target = "leader", await cluster.abusiest_leader(inputs)
            else:
                kind, target = "coordinator", await _coordinator(cluster, settings.kafka_group_id)
            faults.append(await _kill_and_restart(cluster, kind, target, [*inputs, settings.dlq_topic], rng))
            await asyncio.sleep(rng.uniform(1.0, 3.0))
        return faults

    await _run_scenario("leaders", cluster, redis_server, intake, tmp_path, strike)


@pytest.mark.timeout(timeout_for(420))
async def test_active_controller_sigkilled(cluster: KafkaCluster, redis_server: RedisServer, intake: FakeIntake,
                                           tmp_path: Path) -> None:
    """The active KRaft controller (a broker too) SIGKILLed mid-stream; another is elected: 0 lost."""

    async def strike(cluster: KafkaCluster, settings: Settings, stream: Stream, rng: random.Random) -> list[Fault]:
        topics = [settings.span_topic, settings.result_topic, settings.dlq_topic]
        faults = []
        for _ in range(scaled(1)):
            before = await cluster.aquorum()
            fault = await _kill_and_restart(cluster, "controller", before.leader_id, topics, rng)
            after = await cluster.aquorum()
            assert after.leader_epoch > before.leader_epoch, f"no new controller elected: {before} -> {after}"
            faults.append(fault)
            await asyncio.sleep(rng.uniform(1.0, 3.0))
        return faults

    await _run_scenario("controller", cluster, redis_server, intake, tmp_path, strike)


@pytest.mark.timeout(timeout_for(420))
async def test_rolling_restart(cluster: KafkaCluster, redis_server: RedisServer, intake: FakeIntake,
                               tmp_path: Path) -> None:
    """Every node restarted in turn with SIGTERM, each back in sync before the next: 0 lost."""

    async def strike(cluster: KafkaCluster, settings: Settings, stream: Stream, rng: random.Random) -> list[Fault]:
        topics = [settings.span_topic, settings.result_topic, settings.dlq_topic]
        faults = []
        for _ in range(max(1, round(SCALE * 0.4))):  # 1 round at CI size, 2 at full size
            for node in cluster.nodes:
                fault = Fault("sigterm", node.node_id, time.monotonic())
                await asyncio.to_thread(node.restart)
                await cluster.await_in_sync(topics)
                fault.over = time.monotonic()
                faults.append(fault)
                await asyncio.sleep(rng.uniform(1.0, 2.0))
        return faults

    await _run_scenario("rolling", cluster, redis_server, intake, tmp_path, strike)


@pytest.mark.timeout(timeout_for(420))
async def test_one_broker_kept_down(cluster: KafkaCluster, redis_server: RedisServer, intake: FakeIntake,
                                    tmp_path: Path) -> None:
    """The busiest leader SIGKILLed and kept down while traffic is delivered and committed on two brokers."""

    async def strike(cluster: KafkaCluster, settings: Settings, stream: Stream, rng: random.Random) -> list[Fault]:
        inputs = [settings.span_topic, settings.result_topic]
        target = await cluster.abusiest_leader(inputs)
        node = cluster.node(target)
        fault = Fault("down", target, time.monotonic())
        node.kill()
        await asyncio.sleep(scaled(10))
        # Still down: what was published so far is delivered without it, and committed.
        await _caught_up(stream, within=60)
        await _committed_past_now(cluster, settings, within=60)
        assert not node.running
        fault.over = time.monotonic()
        await asyncio.to_thread(node.restart)
        await cluster.await_in_sync([*inputs, settings.dlq_topic])
        return [fault]

    await _run_scenario("down", cluster, redis_server, intake, tmp_path, strike)
