"""The intake misbehaves: 429 and 500 for a while, hangs past the timeout, slow answers, 400 for some labels."""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from tests.reliability.harness import (
    EvalKey,
    ServiceProcess,
    account,
    assert_guarantees,
    delivered_keys,
    drain_topic,
    header,
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

REFUSED = "refused_by_intake"


def _count_delivered(intake: FakeIntake, keys: set[EvalKey]) -> int:
    return len(delivered_keys(intake) & keys)


@pytest.mark.timeout(timeout_for(240))
async def test_intake_outages_hangs_slowness_and_refusals(make_settings: Callable[..., Settings], topics: Topics,
                                                          producer: AIOKafkaProducer, intake: FakeIntake,
                                                          kafka: KafkaBroker, tmp_path: Path) -> None:
    """429s, 500s, hangs past the timeout and slow answers only delay delivery; refused evaluations alone are DLQ'd."""
    seed = int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    settings = make_settings(kafka_max_batch=32, intake_batch_max_evals=8, intake_timeout_seconds=2.0,
                             claim_lease_seconds=5.0)
    n = scaled(300)
    accepted = make_pairs(n, run="intake", labels=("faithfulness", "relevance"))
    # Every tenth pair also carries an evaluation the intake answers 400 for: it alone goes to the DLQ.
    mixed = make_pairs(max(1, n // 10), run="intake-mixed", labels=("faithfulness", REFUSED), span_base=20_000_000)
    pairs = accepted + mixed
    rng.shuffle(pairs)
    refused = {(pair.span_id, REFUSED) for pair in mixed}
    everything = {key for pair in pairs for key in pair.eval_keys} - refused
    phases = ["429 with Retry-After", "500", "hang past the timeout", "slow answers"]
    waves = [pairs[i::len(phases)] for i in range(len(phases))]
    intake.reject_labels({REFUSED})
    service = ServiceProcess(settings, tmp_path / "service.log")
    timings: dict[str, float] = {}
    recovered: dict[str, float] = {}  # seconds from the end of each fault to its wave delivered
    try:
        service.start()
        for phase, wave in zip(phases, waves, strict=True):
            if phase.startswith("429"):
                intake.fail_next(10_000, 429, retry_after=0.3)
            elif phase == "500":
                intake.fail_next(10_000, 500)
            elif phase.startswith("hang"):
                intake.hang_next(3, settings.intake_timeout_seconds + 1.5)
            else:
                intake.delay(settings.intake_timeout_seconds * 0.6)
            started = time.monotonic()
            await publish(producer, interleave(wave, topics.span, topics.result, rng))
            await asyncio.sleep(rng.uniform(2.0, 4.0))
            intake.fail_next(0)
            intake.delay(0)
            wave_keys = {key for pair in wave for key in pair.eval_keys} - refused
            recovered[phase] = await wait_for(functools.partial(_count_delivered, intake, wave_keys),
                                              expect=len(wave_keys), within=timeout_for(60),
                                              what=f"the {phase} wave", alive=[service])
            timings[phase] = round(time.monotonic() - started, 1)
        await wait_for(lambda: len(delivered_keys(intake) & everything), expect=len(everything),
                       within=timeout_for(60), what=f"all evaluations (seed {seed})", alive=[service])
        await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=60,
                       what="the group's lag to reach 0", alive=[service])
        assert await service.terminate() == 0, service.tail()
    finally:
        service.kill_if_running()
    dlq = await drain_topic(kafka.bootstrap_servers, topics.dlq)
    statuses = [r.status for r in intake.requests]
    outcome = account("e. intake 429/500/hang/slow/400", expected=everything, refused=refused, intake=intake,
                      dlq=dlq, unmatched=await drain_topic(kafka.bootstrap_servers, topics.unmatched),
                      recover_s=max(recovered.values()), seed=seed, answered_429=statuses.count(429),
                      answered_500=statuses.count(500), answered_400=statuses.count(400), wave_s=timings)
    report(outcome)
    assert_guarantees(outcome)
    assert statuses.count(429) > 0 and statuses.count(500) > 0
    # Nothing but the refused evaluations is dead-lettered, each once, with the intake's answer.
    assert outcome.dead_lettered == len(refused), [header(r, "evaljoin.error") for r in dlq]
    for record in dlq:
        assert header(record, "evaljoin.error") == b"intake_rejected"
        assert (header(record, "evaljoin.error.detail") or b"").startswith(b"HTTP 400")
