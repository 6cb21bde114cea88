"""The consumer process dies: SIGKILL at random moments, rolling SIGTERM restarts of replicas in one group."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker, acreate_topics
from tests.reliability.harness import (
    SCALE,
    ServiceProcess,
    account,
    assert_guarantees,
    delivered_keys,
    drain_topic,
    interleave,
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

LABELS = ("faithfulness", "relevance")


def _seed() -> int:
    return int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))


@pytest.mark.timeout(timeout_for(240))
async def test_sigkill_at_random_moments(make_settings: Callable[..., Settings], topics: Topics,
                                         producer: AIOKafkaProducer, intake: FakeIntake, kafka: KafkaBroker,
                                         tmp_path: Path) -> None:
    """SIGKILLed at 20 or more random moments and restarted each time, nothing is lost and re-sends are identical."""
    seed = _seed()
    rng = random.Random(seed)
    kills = max(20, round(20 * SCALE ** 0.5))
    per_incarnation = scaled(15)
    # Static membership (KAFKA_GROUP_INSTANCE_ID, as a StatefulSet pod would have): a restarted
    # process takes its partitions back at once instead of waiting out the dead member's session.
    # A batch (up to 16 evaluations) is up to four requests of 4, two in flight at a time: a kill lands
    # between requests of one batch as well as mid-request.
    settings = make_settings(kafka_max_batch=16, intake_batch_max_evals=4, intake_max_in_flight=2,
                             kafka_group_instance_id=f"reliability-{uuid.uuid4().hex[:6]}")
    pairs = make_pairs(per_incarnation * (kills + 1), run="kill", labels=LABELS)
    intake.delay(0.03)
    service = ServiceProcess(settings, tmp_path / "service.log")
    lived: list[float] = []
    try:
        for incarnation in range(kills + 1):
            # New traffic while the consumer is down: every incarnation has work when it is killed.
            chunk = pairs[incarnation * per_incarnation:(incarnation + 1) * per_incarnation]
            await publish(producer, interleave(chunk, topics.span, topics.result, rng))
            service.start()
            if incarnation == kills:
                break
            # Anywhere from start-up (before the group is joined) to mid-delivery.
            moment = rng.uniform(0.3, 4.0)
            await asyncio.sleep(moment)
            service.ensure_running()
            await service.kill()
            lived.append(moment)
        restarted = time.monotonic()
        everything = {key for pair in pairs for key in pair.eval_keys}
        await wait_for(lambda: len(delivered_keys(intake) & everything), expect=len(everything),
                       within=timeout_for(90), what=f"all evaluations after the last restart (seed {seed})",
                       alive=[service])
        await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=60,
                       what="the group's lag to reach 0", alive=[service])
        recover_s = time.monotonic() - restarted
        assert await service.terminate() == 0, service.tail()
    finally:
        service.kill_if_running()
    outcome = account(f"a. consumer SIGKILL x{kills}", expected=everything, intake=intake,
                      dlq=await drain_topic(kafka.bootstrap_servers, topics.dlq),
                      unmatched=await drain_topic(kafka.bootstrap_servers, topics.unmatched),
                      recover_s=recover_s, seed=seed, kills=kills, restarts=service.starts - 1,
                      mean_life_s=round(sum(lived) / len(lived), 2))
    report(outcome)
    assert_guarantees(outcome)
    assert outcome.dead_lettered == 0 and outcome.unmatched == 0


@pytest.mark.timeout(timeout_for(300))
async def test_replicas_with_rolling_restarts_and_a_killed_member(
        make_settings: Callable[..., Settings], producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker, tmp_path: Path) -> None:
    """Three replicas in one group survive rolling SIGTERM restarts and a SIGKILLed member that held partitions."""
    seed = _seed()
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    span_topic, result_topic = f"{run}.spans", f"{run}.results"
    await acreate_topics(kafka.bootstrap_servers, {span_topic: 6, result_topic: 6})
    settings = make_settings(span_topic=span_topic, result_topic=result_topic, kafka_max_batch=32,
                             intake_batch_max_evals=8)
    pairs = make_pairs(scaled(600), run="roll", labels=LABELS)
    waves = [pairs[i::6] for i in range(6)]
    intake.delay(0.02)
    replicas = [ServiceProcess(settings, tmp_path / f"replica-{i}.log") for i in range(3)]

    async def feed(wave: int) -> None:
        await publish(producer, interleave(waves[wave], span_topic, result_topic, rng))

    try:
        await feed(0)
        for replica in replicas:
            replica.start()
        await wait_for(lambda: sum(r.log_events("partitions_assigned") > 0 for r in replicas), expect=3,
                       within=90, what="three replicas in the group", alive=replicas)
        for wave, replica in enumerate(replicas, start=1):  # a rolling restart, as a Deployment rollout does it
            await feed(wave)  # traffic in flight while the group rebalances
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            code = await replica.terminate()
            assert code == 0, f"SIGTERM during the rollout: exit {code}\n{replica.tail()}"
            replica.start()
            await asyncio.sleep(rng.uniform(1.0, 3.0))
        await wait_for(lambda: all(r.log_events("partitions_assigned") >= 2 for r in replicas), within=90,
                       what="every restarted replica to get partitions", alive=replicas)
        await feed(4)
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        victim = replicas[rng.randrange(3)]
        await victim.kill()  # it holds partitions: its batch in flight dies uncommitted
        killed = time.monotonic()
        survivors = [r for r in replicas if r is not victim]
        await feed(5)
        everything = {key for pair in pairs for key in pair.eval_keys}
        await wait_for(lambda: len(delivered_keys(intake) & everything), expect=len(everything),
                       within=timeout_for(120), what=f"all evaluations after the kill (seed {seed})", alive=survivors)
        await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=90,
                       what="the group's lag to reach 0", alive=survivors)
        recover_s = time.monotonic() - killed
        for replica in survivors:
            assert await replica.terminate() == 0, replica.tail()
    finally:
        for replica in replicas:
            replica.kill_if_running()
    rebalances = sum(r.log_events("partitions_revoked") for r in replicas)
    outcome = account("b. 3 replicas: rolling SIGTERM + SIGKILL", expected=everything, intake=intake,
                      dlq=await drain_topic(kafka.bootstrap_servers, settings.dlq_topic),
                      unmatched=await drain_topic(kafka.bootstrap_servers, settings.unmatched_topic),
                      recover_s=recover_s, seed=seed, revocations=rebalances)
    report(outcome)
    assert_guarantees(outcome)
    assert outcome.dead_lettered == 0 and outcome.unmatched == 0
