"""Redis runs out of memory (``maxmemory``) while the spans wait for their results.

Every span is published first, then every result, so that the buffered spans fill a dedicated
redis-server whose ``maxmemory`` leaves room for a fraction of them:

* ``noeviction`` (what the service asks for): Redis refuses writes; the service holds the stream
  (``redis_out_of_memory`` logged, ``/readyz`` 503) until the limit is lifted, then everything is
  delivered. Nothing may be lost or dead-lettered.
* ``allkeys-lru`` (what managed Redis services often default to, run here with
  ``REDIS_ALLOW_EVICTION=true``): Redis evicts buffered spans and ledger entries; the loss and the
  re-sends are measured, not asserted.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from localenv.ports import free_port
from localenv.redis import RedisServer
from tests.reliability.harness import (
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

HEADROOM_BYTES = 512 * 1024  # maxmemory: what an empty Redis uses, plus this (a fraction of what the spans take)


async def _unready(port: int) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except httpx.TransportError:  # not serving yet
        return False
    return response.status_code == 503 and "redis is out of memory" in response.text


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru"])
@pytest.mark.timeout(timeout_for(300))
async def test_redis_full(policy: str, make_settings: Callable[..., Settings], topics: Topics,
                          producer: AIOKafkaProducer, intake: FakeIntake, kafka: KafkaBroker, tmp_path: Path) -> None:
    """noeviction: held while full, nothing lost once memory frees. allkeys-lru: the loss, measured."""
    seed = int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))
    pairs = make_pairs(scaled(600), run=f"oom-{policy}", labels=("faithfulness",))
    everything = {key for pair in pairs for key in pair.eval_keys}
    port = free_port()
    with RedisServer(data_dir=tmp_path / "redis") as redis:
        admin = Redis.from_url(redis.url)
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory-policy", policy)
        await admin.config_set("maxmemory", str(used + HEADROOM_BYTES))
        settings = make_settings(redis_url=redis.url, redis_cluster=False, kafka_max_batch=100,
                                 redis_allow_eviction=policy != "noeviction", health_port=port,
                                 health_host="127.0.0.1")
        service = ServiceProcess(settings, tmp_path / "service.log")
        try:
            service.start()
            await publish(producer, [pair.messages(topics.span, topics.result)[0] for pair in pairs])
            full_s: float | None = None
            stalled = False
            if policy == "noeviction":
                await wait_for(lambda: _unready(port), within=timeout_for(60), what="/readyz to say Redis is full",
                               alive=[service])
                started_full = time.monotonic()
            await publish(producer, [pair.messages(topics.span, topics.result)[1] for pair in pairs])
            if policy == "noeviction":
                await asyncio.sleep(5)  # held: retried with backoff, never given up on
                await wait_for(lambda: _unready(port), within=5, what="still held", alive=[service])
                held = len(delivered_keys(intake) & everything)
                full_s = time.monotonic() - started_full
                await admin.config_set("maxmemory", "0")  # memory frees (an operator raises the limit)
                freed = time.monotonic()
                await wait_for(lambda: len(delivered_keys(intake) & everything), expect=len(everything),
                               within=timeout_for(120), what=f"every evaluation once memory freed (seed {seed})",
                               alive=[service])
            else:
                freed = time.monotonic()
                # Evicting is no promise of room: with nothing left worth evicting Redis answers OOM too, and the
                # stream is held. Then the limit is lifted, as in the other case, and that is noted.
                try:
                    await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=30,
                                   what="the group's lag to reach 0 with eviction", alive=[service])
                except AssertionError:
                    stalled = True
                    await admin.config_set("maxmemory", "0")
            await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=timeout_for(120),
                           what="the group's lag to reach 0", alive=[service])
            recover_s = time.monotonic() - freed
            evicted = int((await admin.info("stats"))["evicted_keys"])
            assert await service.terminate() == 0, service.tail()
        finally:
            service.kill_if_running()
            await admin.aclose()
    name = "noeviction, held until memory frees" if policy == "noeviction" else \
        "allkeys-lru (REDIS_ALLOW_EVICTION)"
    notes: dict[str, Any] = {"seed": seed, "maxmemory": f"{(used + HEADROOM_BYTES) / 1024:.0f} KiB",
                             "evicted_keys": evicted, "oom_logged": service.log_events("redis_out_of_memory"),
                             "batch_retries": service.log_events("join_retry"), "stalled_on_oom": stalled}
    if full_s is not None:
        notes.update(delivered_while_full=held, full_s=round(full_s, 1))
    outcome = account(f"h. Redis full, {name}", expected=everything, intake=intake,
                      dlq=await drain_topic(kafka.bootstrap_servers, topics.dlq),
                      unmatched=await drain_topic(kafka.bootstrap_servers, topics.unmatched),
                      recover_s=recover_s if policy == "noeviction" else None, **notes)
    report(outcome)
    assert outcome.dead_lettered == 0
    if policy == "noeviction":
        assert_guarantees(outcome)
        assert evicted == 0 and outcome.notes["oom_logged"] >= 1
    else:
        assert_guarantees(outcome, allow_loss=True)
        assert evicted > 0, "the test did not fill Redis: nothing was evicted"
