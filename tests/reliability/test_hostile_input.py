"""Hostile input, property-based: every malformed record is dead-lettered with a reason, valid traffic flows.

Hypothesis generates the corpus (broken JSON, wrong types, huge strings and nesting, invalid UTF-8,
NaN/Infinity, labels the intake would reject, missing keys, unknown schema versions, odd header
bytes, records on the wrong topic, empty records, random bytes) and adversarial but valid pairs
(any Unicode join key and ml_app, odd headers). All of it goes through one real consumer process
with the DLQ halt circuit disabled; the property is checked record by record.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from localenv.ports import free_port
from tests.hostile import ID_HEADER, MAX_BYTES, Hostile, adversarial_pair, generate, hostile, reasons_for
from tests.reliability.harness import (
    Message,
    ServiceProcess,
    account,
    assert_guarantees,
    dead_letter_problems,
    delivered_keys,
    drain_topic,
    lag_or_none,
    publish,
    report,
    scaled,
    timeout_for,
    wait_for,
)
from tests.support import Topics

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@pytest.mark.timeout(timeout_for(240))
async def test_hostile_input_is_dead_lettered_and_valid_traffic_flows(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker, tmp_path: Path) -> None:
    """Every malformed record is dead-lettered with a right reason, every valid pair delivered, the consumer up."""
    seed = int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    n_bad, n_valid = scaled(2_000), scaled(150)
    generated = time.monotonic()
    bad = generate(hostile(), n_bad, seed)
    odd = generate(adversarial_pair(), n_valid, seed)
    generate_s = time.monotonic() - generated
    run = uuid.uuid4().hex[:6]
    messages: list[tuple[str, Message]] = []
    sent: dict[str, tuple[Hostile, frozenset[str]]] = {}
    for i, example in enumerate(bad):
        topic = topics.span if example.span_topic else topics.result
        key = rng.randbytes(rng.randrange(0, 40)) or (None if example.value is not None else b"\x00")
        headers = [*example.headers, (ID_HEADER, f"bad-{i}".encode())]
        sent[f"bad-{i}"] = example, reasons_for(example, key, headers)
        messages.append((f"bad-{i}", (topic, key, example.value, headers)))
    expected = set()
    for i, pair in enumerate(odd):
        join_key, span_id = f"{pair['join_key']}\u00b7{run}-{i}", str(30_000_000 + i)
        span: dict[str, Any] = {"schema_version": 1, "join_key": join_key, "trace_id": f"{i:x}", "span_id": span_id}
        result: dict[str, Any] = {"schema_version": 1, "event_id": f"{run}-odd-{i:06d}", "join_key": join_key,
                                  "evaluations": [{"label": pair["label"], "metric_type": "score",
                                                   "value": pair["value"]}]}
        if pair["ml_app"] is not None:
            span["ml_app"] = result["ml_app"] = pair["ml_app"]
        expected.add((span_id, pair["label"]))
        sides = [(topics.span, span), (topics.result, result)]
        rng.shuffle(sides)
        for side, (topic, event) in enumerate(sides):
            messages.append((f"ok-{i}-{side}", (topic, join_key.encode(), orjson.dumps(event),
                                                [*pair["headers"], (ID_HEADER, f"ok-{i}-{side}".encode())])))
    # Interleave valid traffic with the hostile records, keeping each pair's own order.
    rng.shuffle(messages)
    settings = make_settings(dlq_max_invalid_ratio=0, dlq_max_consecutive_invalid=0, max_message_bytes=MAX_BYTES,
                             kafka_max_batch=200, health_port=free_port(), health_host="127.0.0.1")
    service = ServiceProcess(settings, tmp_path / "service.log")
    try:
        service.start()
        published = time.monotonic()
        await publish(producer, [message for _, message in messages], chunk=500)
        await wait_for(lambda: len(delivered_keys(intake) & expected), expect=len(expected),
                       within=timeout_for(120), what=f"every valid pair (seed {seed})", alive=[service])
        await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=timeout_for(120),
                       what="the group's lag to reach 0", alive=[service])
        took_s = time.monotonic() - published
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{settings.health_port}/healthz", timeout=10)
        assert health.status_code == 200, health.text
        assert await service.terminate() == 0, service.tail()
    finally:
        service.kill_if_running()
    assert service.starts == 1 and service.exit_codes == [0]
    dlq = await drain_topic(kafka.bootstrap_servers, topics.dlq)
    problems = dead_letter_problems(dlq, sent)
    outcome = account("f. hostile input (hypothesis)", expected=expected, intake=intake, dlq=dlq,
                      unmatched=await drain_topic(kafka.bootstrap_servers, topics.unmatched), recover_s=None,
                      seed=seed, hostile=len(bad), valid_pairs=len(odd), generate_s=round(generate_s, 1),
                      consume_s=round(took_s, 1))
    report(outcome)
    categories = Counter(example.category for example in bad)
    print("  hostile records by category: "
          + ", ".join(f"{name}={count}" for name, count in sorted(categories.items())))
    assert not problems, f"{len(problems)} problems (seed {seed}), e.g.:\n" + "\n".join(problems[:15])
    assert_guarantees(outcome)
    assert outcome.dead_lettered == len(bad) and outcome.duplicates == 0
