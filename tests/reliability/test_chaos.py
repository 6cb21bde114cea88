"""A chaos run: three replicas under a steady live load while faults of every kind strike, overlapping.

The deployment: a three-node Kafka cluster (KRaft, replication factor 3, ``min.insync.replicas=2``),
Redis Sentinel (a primary, two replicas, three sentinels) with ``REDIS_WAIT_REPLICAS=2`` (every replica: with
1, a failover can promote the replica that had not acknowledged the last writes; scenario i shows it), the intake
stand-in, and three ``python -m consumer`` replicas in one group with static membership
(``KAFKA_GROUP_INSTANCE_ID``). Each replica reaches the intake through a fault proxy of its own; every
replica's Kafka connections cross one fault proxy per node (each node advertises its proxy's address on
an extra listener); the test's producer and checks connect directly. Redis links are not proxied (a
Sentinel client connects to the address the sentinels name).

1. **Load**: the maximum is measured first: pairs are preloaded, one replica drains them, pairs/s from
   its first to its last delivery. ``RELIABILITY_CHAOS_RATE`` (``--chaos-rate``) gives the rate instead.
2. **Chaos**: the three replicas run while a producer publishes half that maximum, steadily, with one
   hostile record (``tests/hostile.py``: broken JSON, invalid UTF-8, oversize, non-UTF-8 header names,
   ...) per :data:`HOSTILE_EVERY` pairs, and :class:`tests.reliability.schedule.Schedule` draws
   overlapping faults for ``RELIABILITY_CHAOS_SECONDS`` (60 in the suite; ``python -m tests.reliability
   --chaos SECONDS``): replica SIGKILLs and SIGTERM restarts (one, or rolling through all three), Kafka
   partition-leader and active-controller SIGKILLs and rolling restarts, Redis primary SIGKILLs
   (a Sentinel failover, the old primary back as a replica), intake 429/500 windows and hangs past the
   timeout, and cuts, latency and blackholes on a replica's intake link or on a node's Kafka proxy (a
   Kafka blackhole lasts 12 to 15 s, past the group session and request timeouts). ``RELIABILITY_SEED`` repeats
   the draw (which faults, in what order, how long; when each strikes also depends on how long the
   previous ones took).
3. **The account**: the faults end, the producer stops, every evaluation must arrive and the group's
   lag reach 0 (bounded waits); every replica must exit 0 on SIGTERM. Then 0 lost, every duplicate
   byte-identical, every hostile record on the DLQ with a right reason and nothing else there, no
   unmatched report, no replica exited on its own. The row and the fault tally are printed. If evaluations
   never arrive, the failure says, for a sample of them, what Redis holds of their pairs and what the intake
   answered the requests that carried them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer.config import Settings
from consumer.store import Namespace
from localenv.intake import FakeIntake
from localenv.kafka import acreate_topics
from localenv.kafka_cluster import KafkaCluster
from localenv.netfault import NetFault
from localenv.redis import RedisSentinelSet
from tests.hostile import ID_HEADER, MAX_BYTES, Hostile, generate, hostile, reasons_for
from tests.reliability.harness import (
    EvalKey,
    Message,
    Pair,
    ServiceProcess,
    account,
    assert_guarantees,
    dead_letter_problems,
    drain_topic,
    interleave,
    lag_or_none,
    make_pairs,
    metric_key,
    publish,
    report,
    scaled,
    timeout_for,
    wait_for,
)
from tests.reliability.schedule import KINDS, Schedule, Targets, tally_table
from tests.support import FAST_TIMINGS

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SECONDS_ENV, RATE_ENV = "RELIABILITY_CHAOS_SECONDS", "RELIABILITY_CHAOS_RATE"
CHAOS_S = float(os.environ.get(SECONDS_ENV) or 60)
LABELS = ("faithfulness", "relevance")
HOSTILE_EVERY = 20  # one hostile record per this many pairs
HOSTILE_POOL = 400  # distinct hostile examples drawn, sent in turn (each copy with an id of its own)
TICK_S = 0.1
INTAKE_TIMEOUT_S = 2.0
WARM_BASE, LIVE_BASE = 20_000_000, 30_000_000  # span ids of the measuring pairs and of the live stream


def _seed() -> int:
    return int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))


class Arrivals:
    """Every evaluation the intake accepted so far, read incrementally (a long run has many requests)."""

    def __init__(self, intake: FakeIntake) -> None:
        self._intake, self._seen, self.keys = intake, 0, set[EvalKey]()
        self.last_change = time.monotonic()

    def update(self) -> set[EvalKey]:
        new = self._intake.requests[self._seen:]
        self._seen += len(new)
        if new:
            self.last_change = time.monotonic()
        self.keys.update(metric_key(m) for r in new if 200 <= r.status < 300 for m in r.metrics)
        return self.keys

    def quiet_for(self, seconds: float) -> bool:
        """True once no request reached the intake for ``seconds``."""
        self.update()
        return time.monotonic() - self.last_change >= seconds


@dataclass
class Traffic:
    """Pairs at a steady rate with hostile records among them; a send that fails is sent again (a copy may land)."""

    producer: AIOKafkaProducer
    settings: Settings
    rng: random.Random
    run: str
    pool: Sequence[Hostile]
    pairs: list[Pair] = field(default_factory=list)
    sent: dict[str, tuple[Hostile, frozenset[str]]] = field(default_factory=dict)  # hostile id -> example, reasons
    send_retries: int = 0

    async def flow(self, rate: float, stop: asyncio.Event) -> None:
        """``rate`` pairs a second, a burst every TICK_S, until ``stop``; then wait until every burst is sent."""
        pending: set[asyncio.Task[None]] = set()
        owed, next_tick = 0.0, time.monotonic()
        try:
            while not stop.is_set():
                owed += rate * TICK_S
                if (count := int(owed)) > 0:
                    owed -= count
                    task = asyncio.create_task(self._send(self._burst(count)))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                next_tick += TICK_S
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            await asyncio.gather(*pending)
        finally:
            for task in pending:  # cancelled (a failed run): no send outlives it
                task.cancel()

    def _burst(self, count: int) -> list[Message]:
        start = len(self.pairs)
        pairs = make_pairs(count, run=f"{self.run}-{start}", labels=LABELS, span_base=LIVE_BASE + start)
        self.pairs.extend(pairs)
        messages = interleave(pairs, self.settings.span_topic, self.settings.result_topic, self.rng)
        for _ in range((start + count) // HOSTILE_EVERY - start // HOSTILE_EVERY):
            record_id = f"bad-{len(self.sent)}"
            example = self.pool[len(self.sent) % len(self.pool)]
            key = self.rng.randbytes(self.rng.randrange(0, 40)) or (None if example.value is not None else b"\x00")
            headers = [*example.headers, (ID_HEADER, record_id.encode())]
            self.sent[record_id] = example, reasons_for(example, key, headers)
            topic = self.settings.span_topic if example.span_topic else self.settings.result_topic
            messages.insert(self.rng.randrange(len(messages) + 1), (topic, key, example.value, headers))
        return messages

    async def _send(self, messages: list[Message]) -> None:
        while True:
            try:
                await publish(self.producer, messages)
                return
            except KafkaError:
                self.send_retries += 1
                await asyncio.sleep(0.5)


def _settings(cluster: KafkaCluster, redis: RedisSentinelSet, link: NetFault, run: str, instance: int) -> Settings:
    return Settings(
        kafka_bootstrap_servers=cluster.proxied_bootstrap_servers, kafka_group_id=f"g-{run}",
        kafka_group_instance_id=f"chaos-{run}-{instance}",
        span_topic=f"{run}.spans", result_topic=f"{run}.results", dlq_topic=f"{run}.dlq",
        unmatched_topic=f"{run}.unmatched",
        redis_sentinels=redis.sentinels_setting, redis_sentinel_master=redis.master_name, redis_wait_replicas=2,
        redis_wait_timeout_ms=2000, redis_key_prefix=f"t{run}", redis_deadline_shards=4,
        default_ml_app="nemos-demo", dd_llmobs_override_origin=f"http://{link.address}",
        dd_api_key="test-api-key-0123456789", kafka_max_batch=100, intake_batch_max_evals=32,
        dlq_max_invalid_ratio=0, dlq_max_consecutive_invalid=0, max_message_bytes=MAX_BYTES,
        **{**FAST_TIMINGS, "intake_timeout_seconds": INTAKE_TIMEOUT_S})


async def _measure_rate(producer: AIOKafkaProducer, settings: Settings, replica: ServiceProcess,
                        arrivals: Arrivals, warm: list[Pair], rng: random.Random) -> float:
    """The pairs/s one replica delivers a preloaded backlog at, from its first delivery to its last."""
    await publish(producer, interleave(warm, settings.span_topic, settings.result_topic, rng))
    keys = {key for pair in warm for key in pair.eval_keys}
    replica.start()
    await wait_for(lambda: bool(arrivals.update() & keys), within=timeout_for(120),
                   what="the first delivery of the measuring pairs", alive=[replica], interval=0.05)
    first = time.monotonic()
    await wait_for(lambda: len(keys - arrivals.update()), expect=0, within=timeout_for(180),
                   what="every measuring pair", alive=[replica], interval=0.05)
    return len(warm) / max(time.monotonic() - first, 0.1)


async def _where_they_are(redis: RedisSentinelSet, settings: Settings, intake: FakeIntake, pairs: Sequence[Pair],
                          sample: int = 20) -> str:
    """What Redis holds of pairs whose evaluations never arrived, and what the intake answered about them.

    Tells the causes apart: a span (``s``) or result (``r``) missing while the other waits is a buffered write
    lost; a ledger (``d``) saying ``d`` for an evaluation the intake never accepted is a delivery recorded
    without reaching it; nothing at all with no request is a side never consumed.
    """
    wanted = {pair.join_key: pair for pair in pairs}
    held: dict[str, dict[str, object]] = defaultdict(dict)
    client = aioredis.Redis(port=redis.primary_port, decode_responses=True)
    try:
        async for raw in client.scan_iter(match=f"{settings.redis_key_prefix}:{{*", count=5000):
            key = str(raw)
            tag, _, kind = key.partition("{")[2].rpartition("}")
            join_key = Namespace.from_tag(tag).join_key
            if join_key not in wanted:
                continue
            kind = kind.lstrip(":")
            if kind == "d":
                held[join_key][kind] = dict(await client.hgetall(key))
            elif kind == "r":
                held[join_key][kind] = len(await client.hkeys(key))
            else:
                held[join_key][kind] = await client.strlen(key)
    finally:
        await client.aclose()
    answered: dict[EvalKey, Counter[int]] = defaultdict(Counter)
    keys = {key for pair in pairs for key in pair.eval_keys}
    for request in intake.requests:
        for metric in request.metrics:
            if (eval_key := metric_key(metric)) in keys:
                answered[eval_key][request.status] += 1
    shapes = Counter(",".join(sorted(held.get(pair.join_key, {}))) or "nothing" for pair in pairs)
    lines = [f"{len(pairs)} pairs with evaluations missing; Redis holds, per pair: "
             + ", ".join(f"{shape}: {count}" for shape, count in shapes.most_common())]
    for pair in pairs[:sample]:
        statuses = {label: dict(answered.get((pair.span_id, label), {})) for label in pair.labels}
        lines.append(f"  pair {pair.index} {pair.join_key}: redis {dict(held.get(pair.join_key, {}))}; "
                     f"intake answered {statuses}")
    return "\n".join(lines)


@pytest.mark.timeout(int(CHAOS_S * 1.5) + timeout_for(600))
async def test_chaos(intake: FakeIntake, tmp_path: Path) -> None:
    """Overlapping faults of every kind under live load: 0 lost, duplicates identical, every SIGTERM exit 0."""
    seed = _seed()
    rng = random.Random(seed)
    print(f"\nchaos: seed {seed}, {CHAOS_S:.0f} s of faults")
    run = f"chaos-{uuid.uuid4().hex[:8]}"
    pool = await asyncio.to_thread(generate, hostile(), HOSTILE_POOL, seed)
    intake.delay(0.01)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(KafkaCluster(size=3, min_insync_replicas=2, heap="256m", proxied=True))
        kafka_links = [stack.enter_context(NetFault("127.0.0.1", node.proxied_listener_port, port=node.proxied_port,
                                                    seed=seed + 10 + i)) for i, node in enumerate(cluster.nodes)]
        redis = stack.enter_context(RedisSentinelSet(replicas=2))
        intake_links = [stack.enter_context(NetFault("127.0.0.1", intake.port, seed=seed + i)) for i in range(3)]
        replicas = [ServiceProcess(_settings(cluster, redis, intake_links[i], run, i), tmp_path / f"replica-{i}.log")
                    for i in range(3)]
        settings = replicas[0].settings
        topics = [settings.span_topic, settings.result_topic, settings.dlq_topic, settings.unmatched_topic]
        await acreate_topics(cluster.bootstrap_servers, dict(zip(topics, (6, 6, 1, 1), strict=True)),
                             replication_factor=3)
        await cluster.await_in_sync(topics, include_offsets=False)
        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap_servers, acks="all",
                                    request_timeout_ms=30_000, linger_ms=5)
        await producer.start()
        arrivals = Arrivals(intake)
        traffic = Traffic(producer, settings, rng, run, pool)
        schedule = Schedule(Targets(cluster, redis, intake, replicas, intake_links, kafka_links, topics,
                                    INTAKE_TIMEOUT_S), rng)
        stop = asyncio.Event()
        flowing: asyncio.Task[None] | None = None
        try:
            warm = make_pairs(scaled(1500), run=f"{run}-warm", labels=LABELS, span_base=WARM_BASE)
            measured = await _measure_rate(producer, settings, replicas[0], arrivals, warm, rng)
            rate = float(os.environ.get(RATE_ENV) or 0) or max(5.0, measured / 2)
            print(f"chaos: one replica drained {len(warm)} pairs at {measured:.0f} pairs/s; live load {rate:.0f}")
            for replica in replicas[1:]:
                replica.start()
            await wait_for(lambda: all(r.log_events("partitions_assigned") for r in replicas), within=90,
                           what="three replicas in the group", alive=replicas)
            flowing = asyncio.create_task(traffic.flow(rate, stop))
            await asyncio.sleep(3.0)  # live traffic through the group before the first fault
            await schedule.run(CHAOS_S)
            faults_over = time.monotonic()
            await asyncio.sleep(2.0)  # traffic after the last fault
            stop.set()
            await asyncio.wait_for(flowing, timeout_for(180))
            everything = {key for pair in [*warm, *traffic.pairs] for key in pair.eval_keys}
            try:
                await wait_for(lambda: len(everything - arrivals.update()), expect=0,
                               within=timeout_for(180) + CHAOS_S / 4, what=f"every evaluation (seed {seed})",
                               alive=replicas, interval=1.0)
            except AssertionError as failed:
                never = everything - arrivals.update()
                pairs = [pair for pair in [*warm, *traffic.pairs] if set(pair.eval_keys) & never]
                raise AssertionError(f"{failed}\n{await _where_they_are(redis, settings, intake, pairs)}") from None
            await wait_for(lambda: lag_or_none(cluster.bootstrap_servers, settings), expect=0,
                           within=timeout_for(120), what="the group's lag to reach 0", alive=replicas)
            recover_s = time.monotonic() - faults_over
            # Late copies of requests the intake held or answered late are counted too.
            await wait_for(lambda: arrivals.quiet_for(3.0), within=60, what="the intake to go quiet", alive=replicas)
            for i, replica in enumerate(replicas):
                code = await replica.terminate()
                assert code == 0, f"replica-{i}: SIGTERM at the end: exit {code}\n{replica.tail()}"
        finally:
            stop.set()
            if flowing is not None and not flowing.done():  # the run failed: no more sends
                flowing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flowing
            (tmp_path / "faults.txt").write_text("".join(f"{event}\n" for event in schedule.events))
            for replica in replicas:
                replica.kill_if_running()
            await producer.stop()
        dlq = await drain_topic(cluster.bootstrap_servers, settings.dlq_topic, within=timeout_for(120))
        unmatched = await drain_topic(cluster.bootstrap_servers, settings.unmatched_topic)
    outcome = account(f"m. chaos {CHAOS_S:.0f} s, 3 replicas, {rate:.0f} pairs/s", expected=everything,
                      intake=intake, dlq=dlq, unmatched=unmatched, recover_s=recover_s, seed=seed,
                      measured_max_pairs_s=round(measured), pairs=len(warm) + len(traffic.pairs),
                      hostile=len(traffic.sent), faults=sum(schedule.tally.values()),
                      max_overlap=schedule.max_overlap, tally=dict(sorted(schedule.tally.items())),
                      test_producer_retries=traffic.send_retries,
                      restarts=sum(replica.starts - 1 for replica in replicas),
                      unplanned_exits=schedule.unplanned_exits)
    report(outcome)
    print(tally_table(schedule.tally))
    assert_guarantees(outcome)
    problems = dead_letter_problems(dlq, traffic.sent)
    assert not problems, f"{len(problems)} DLQ problems (seed {seed}), e.g.:\n" + "\n".join(problems[:15])
    assert outcome.unmatched == 0
    assert not schedule.unplanned_exits, f"replicas exited with no fault on them: {schedule.unplanned_exits}"
    if CHAOS_S >= 300:  # a short run may end before every kind had its turn (Kafka faults wait for one another)
        missing = [name for name in KINDS if not schedule.tally[name]]
        assert not missing, f"fault kinds that never struck: {missing}"
