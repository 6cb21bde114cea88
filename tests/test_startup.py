"""Starting while a dependency is away: the service waits for it instead of exiting."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker, acreate_topics
from tests.reliability.harness import (
    ServiceProcess,
    delivered_keys,
    interleave,
    make_pairs,
    publish,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def test_a_service_started_while_kafka_is_down_waits_for_it_and_delivers(
        make_settings: Callable[..., Settings], intake: FakeIntake, tmp_path: Path) -> None:
    """With the broker down at start the process retries (startup_retry) instead of exiting 1; once the broker is
    back it joins the group and delivers every pair, and it still exits 0 on SIGTERM."""
    broker = KafkaBroker(data_dir=tmp_path / "kafka", startup_timeout=120)
    await asyncio.to_thread(broker.start)
    service: ServiceProcess | None = None
    try:
        run = uuid.uuid4().hex[:8]
        names = {"span_topic": f"{run}.spans", "result_topic": f"{run}.results", "dlq_topic": f"{run}.dlq",
                 "unmatched_topic": f"{run}.unmatched"}
        await acreate_topics(broker.bootstrap_servers, {names["span_topic"]: 2, names["result_topic"]: 2,
                                                        names["dlq_topic"]: 1, names["unmatched_topic"]: 1})
        settings = make_settings(kafka_bootstrap_servers=broker.bootstrap_servers, **names)
        broker.kill()
        service = ServiceProcess(settings, tmp_path / "service.log")
        service.start()
        await wait_for(lambda: service.log_events("startup_retry") >= 2, expect=True, within=60,
                       what="the service retrying its start", alive=[service])
        await asyncio.to_thread(broker.restart)
        pairs = make_pairs(20, run="startup")
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        await producer.start()
        try:
            await publish(producer, interleave(pairs, settings.span_topic, settings.result_topic, random.Random(7)))
        finally:
            await producer.stop()
        everything = {key for pair in pairs for key in pair.eval_keys}
        await wait_for(lambda: everything <= delivered_keys(intake), expect=True, within=120,
                       what="every pair once the broker is back", alive=[service])
        assert await service.terminate() == 0, service.tail()
    finally:
        if service is not None:
            await service.terminate()
        broker.stop()
