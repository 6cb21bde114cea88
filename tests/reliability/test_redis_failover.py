"""Redis failover: the primary SIGKILLed mid-stream and a replica promoted, without and with replica acknowledgement.

Redis replicates asynchronously: the primary acknowledges a write before its replicas have it. If the
primary's host dies then, the promoted replica never had the write: a buffered side whose offset was
committed is gone (a join that never happens), a ledger entry is gone (an evaluation that may go
twice). Each scenario runs once without ``REDIS_WAIT_REPLICAS`` (the loss measured, not asserted) and
once with it (0 lost asserted), evaluation by evaluation, with the primary SIGKILLed once per unit of
``RELIABILITY_SCALE`` while pairs flow, and the killed node brought back as a replica after each failover.

* **Sentinel**: a primary, two replicas and three sentinels. The replicas' links to the primary go
  through a fault proxy that delays what the primary sends by ``REPLICATION_LAG_S`` (a slow link or a
  busy replica; on one machine replication is otherwise instant, and SIGKILL alone would lose only what
  is still in redis-server's own buffers); the kill resets those links, as the host's death would.
  With one replica acknowledging (``REDIS_WAIT_REPLICAS=1``) and both replicas equally behind, the
  sentinels promote the replica with the most data, which has every acknowledged write. Sentinels rank
  replicas by ``replica-priority`` first, and by the replication offset each replica last reported (read
  every second at best), so they can promote the replica that did not acknowledge: the two cases
  "the lagging replica promoted" delay only one replica and give it the first priority. With
  ``REDIS_WAIT_REPLICAS=1`` the loss is measured; with ``2`` (every replica) 0 lost is asserted.
* **Redis Cluster**: three primaries with a replica each; the primary serving the traffic's first key
  is SIGKILLed mid-stream, its replica takes its slots over, and the killed node comes back as that
  replica's replica (with ``REDIS_WAIT_REPLICAS=1`` the slots' writes wait for it meanwhile). The
  replication links are not delayed here (the cluster's nodes find each other by the addresses they
  announce): this row shows the failover's recovery with and without acknowledgement, and what a
  SIGKILL of the process alone loses on one host.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import DEFAULT_REDIS_URL, Settings
from consumer.store import Namespace
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from localenv.redis import RedisCluster, RedisSentinelSet
from tests.reliability.harness import (
    SCALE,
    Message,
    Pair,
    ServiceProcess,
    account,
    assert_guarantees,
    delivered_keys,
    drain_topic,
    lag_or_none,
    make_pairs,
    publish,
    report,
    scaled,
    timeout_for,
    wait_for,
)
from tests.support import Topics

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPLICATION_LAG_S = 0.2
CHUNK_PAIRS = 10  # published every CHUNK_INTERVAL_S: a steady stream, so that writes are in flight at the kill
CHUNK_INTERVAL_S = 0.1
RESULTS_BEHIND = 3  # a chunk's results follow its spans by this many chunks: most spans wait buffered a while


@pytest.fixture
def redis_url() -> tuple[str, bool]:
    """The scenarios bring their own Redis: REDIS_URL keeps its default unless a scenario sets it."""
    return DEFAULT_REDIS_URL, False


def _seed() -> int:
    return int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))


def _chunk_messages(chunks: list[list[Pair]], i: int, topics: Topics) -> list[Message]:
    """The spans of chunk i and the results of chunk i - RESULTS_BEHIND."""
    spans = [pair.messages(topics.span, topics.result)[0] for pair in chunks[i]] if i < len(chunks) else []
    j = i - RESULTS_BEHIND
    results = [pair.messages(topics.span, topics.result)[1] for pair in chunks[j]] if 0 <= j < len(chunks) else []
    return spans + results


async def _quiet(intake: FakeIntake, service: ServiceProcess, quiet_s: float) -> None:
    """Until nothing new reached the intake for ``quiet_s``."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet_s:
        service.ensure_running()
        if len(intake.requests) != last:
            last, since = len(intake.requests), time.monotonic()
        await asyncio.sleep(0.5)


async def _run(scenario: str, *, guaranteed: bool, settings: Settings, topics: Topics, producer: AIOKafkaProducer,
               intake: FakeIntake, kafka: KafkaBroker, tmp_path: Path, pairs: list[Pair], rng: random.Random,
               kill: Callable[[], int], failover: Callable[[int], int], rejoin: Callable[[int], None],
               seed: int) -> None:
    """Publish the pairs as a steady stream, SIGKILL the primary ``RELIABILITY_SCALE`` times (at least once) while
    it flows, each after the previous failover is over and the node back, and account for every pair."""
    chunks = [pairs[i:i + CHUNK_PAIRS] for i in range(0, len(pairs), CHUNK_PAIRS)]
    # The kills: spread over the stream's middle, each once the previous failover is over (and the node back).
    kills = max(1, round(SCALE))
    everything = {key for pair in pairs for key in pair.eval_keys}
    service = ServiceProcess(settings, tmp_path / "service.log")
    failovers: list[float] = []
    failed_over = 0.0

    async def faults() -> None:
        nonlocal failed_over
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.5, 1.5))  # while the stream flows
            old = await asyncio.to_thread(kill)
            killed = time.monotonic()
            await asyncio.to_thread(failover, old)
            failed_over = time.monotonic()
            failovers.append(failed_over - killed)
            await asyncio.to_thread(rejoin, old)

    try:
        service.start()
        await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=60,
                       what="the service to join its group", alive=[service])
        faulting: asyncio.Task[None] | None = None
        for i in range(len(chunks) + RESULTS_BEHIND):
            await publish(producer, _chunk_messages(chunks, i, topics))
            if i == len(chunks) // 4:
                faulting = asyncio.create_task(faults())
            await asyncio.sleep(CHUNK_INTERVAL_S)
        assert faulting is not None
        await faulting
        service.ensure_running()
        if guaranteed:
            await wait_for(lambda: len(delivered_keys(intake) & everything), expect=len(everything),
                           within=timeout_for(150), what=f"all evaluations (seed {seed})", alive=[service])
        await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=timeout_for(150),
                       what="the group's lag to reach 0", alive=[service])
        recover_s = time.monotonic() - failed_over
        await _quiet(intake, service, 5)
        assert await service.terminate() == 0, service.tail()
    finally:
        service.kill_if_running()
    outcome = account(scenario, expected=everything, intake=intake,
                      dlq=await drain_topic(kafka.bootstrap_servers, topics.dlq),
                      unmatched=await drain_topic(kafka.bootstrap_servers, topics.unmatched),
                      recover_s=recover_s, seed=seed, kills=kills,
                      failover_s="/".join(f"{seconds:.1f}" for seconds in failovers),
                      batch_retries=service.log_events("join_retry") + service.log_events("delivery_retry"))
    report(outcome)
    # Without enough acknowledgement the loss is what this measures (README: Delivery guarantees); with it, none.
    assert_guarantees(outcome, allow_loss=not guaranteed)
    assert outcome.dead_lettered == 0


@pytest.mark.parametrize(("wait_replicas", "lagging_promoted"), [
    pytest.param(0, False, id="wait0"), pytest.param(1, False, id="wait1"),
    pytest.param(1, True, id="wait1-lagging-promoted"), pytest.param(2, True, id="wait2-lagging-promoted")])
@pytest.mark.timeout(timeout_for(300))
async def test_sentinel_primary_sigkilled_mid_stream(wait_replicas: int, lagging_promoted: bool,
                                                     make_settings: Callable[..., Settings], topics: Topics,
                                                     producer: AIOKafkaProducer, intake: FakeIntake,
                                                     kafka: KafkaBroker, tmp_path: Path) -> None:
    """Sentinel promotes a replica after the primary's SIGKILL: nothing is lost once every replica that may be
    promoted acknowledged (REDIS_WAIT_REPLICAS=1 with equal replicas, 2 when the lagging one is promoted)."""
    seed = _seed()
    rng = random.Random(seed)
    pairs = make_pairs(scaled(300), run=f"sentinel-w{wait_replicas}{'-lagging' if lagging_promoted else ''}")
    intake.delay(0.02)
    # failover_timeout: the sentinels leave the delayed links alone for that long (see delay_replication)
    with RedisSentinelSet(replicas=2, failover_timeout_ms=600_000) as redis:

        def lag() -> None:
            """Every replica's link delayed, or only the one the next failover will promote."""
            if lagging_promoted:
                lagging = redis.replica_ports()[0]
                redis.prefer_replica(lagging)
                redis.delay_replication(REPLICATION_LAG_S, ports=[lagging])
            else:
                redis.delay_replication(REPLICATION_LAG_S)

        def rejoin(old: int) -> None:
            """The killed node back as a replica, and the links delayed again for the next kill."""
            redis.restart_node(old)
            redis.wait_for_replicas(2)
            lag()

        lag()

        settings = make_settings(redis_sentinels=redis.sentinels_setting, redis_sentinel_master=redis.master_name,
                                 kafka_max_batch=32, intake_batch_max_evals=8, redis_wait_replicas=wait_replicas,
                                 redis_wait_timeout_ms=2000)
        promoted = ", the lagging replica promoted" if lagging_promoted else ""
        await _run(f"i. Redis Sentinel failover, WAIT {wait_replicas}{promoted}",
                   guaranteed=wait_replicas >= (2 if lagging_promoted else 1), settings=settings, topics=topics,
                   producer=producer, intake=intake, kafka=kafka, tmp_path=tmp_path, pairs=pairs, rng=rng,
                   kill=redis.kill_primary, failover=lambda old: redis.wait_for_failover(old), rejoin=rejoin, seed=seed)


@pytest.mark.cluster
@pytest.mark.parametrize("wait_replicas", [0, 1])
@pytest.mark.timeout(timeout_for(300))
async def test_cluster_primary_sigkilled_mid_stream(wait_replicas: int, make_settings: Callable[..., Settings],
                                                    topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
                                                    kafka: KafkaBroker, tmp_path: Path) -> None:
    """A Redis Cluster replica takes over a SIGKILLed primary's slots: with REDIS_WAIT_REPLICAS=1 nothing is lost."""
    seed = _seed()
    rng = random.Random(seed)
    pairs = make_pairs(scaled(300), run=f"cluster-w{wait_replicas}")
    intake.delay(0.02)
    with RedisCluster(replicas=1, node_timeout_ms=1000) as redis:
        settings = make_settings(redis_url=redis.url, redis_cluster=True, kafka_max_batch=32,
                                 intake_batch_max_evals=8, redis_wait_replicas=wait_replicas,
                                 redis_wait_timeout_ms=2000)
        # The primary of the first pair's keys: the traffic's keys spread over all three primaries.
        first = f"{settings.redis_key_prefix}:{{{Namespace(settings.default_ml_app or '', pairs[0].join_key).tag}}}:s"

        def rejoin(old: int) -> None:
            """The killed node back, as the replica of its successor, in sync before the next kill."""
            redis.restart_node(old)
            redis.wait_for_replicas(first, 1)

        await _run(f"i. Redis Cluster failover, WAIT {wait_replicas}", guaranteed=wait_replicas > 0,
                   settings=settings, topics=topics, producer=producer, intake=intake, kafka=kafka,
                   tmp_path=tmp_path, pairs=pairs, rng=rng, kill=lambda: redis.kill_primary(first),
                   failover=lambda old: redis.wait_for_failover(first, old), rejoin=rejoin, seed=seed)
