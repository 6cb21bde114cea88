"""Crash safety of the real process: SIGKILL mid-batch and SIGTERM during an intake outage.

The service runs as ``python -m consumer`` in a child process configured only through its
environment, exactly as it is deployed. Its stderr (JSON logs) goes to a file under ``tmp_path``
whose tail is part of every failure message.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from tests.reliability.harness import ServiceProcess, delivered_keys, lag_or_none, metric_key, raw_metrics
from tests.support import Topics
from tests.test_service import result_event, span_event

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

LABELS = ("faithfulness", "relevance", "toxicity")
SPAN_BASE = 700_000


async def publish(producer: AIOKafkaProducer, messages: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Send (topic, key, value) in order without waiting for each acknowledgement, then wait for all."""
    pending: list[Awaitable[Any]] = []
    for topic, key, value in messages:
        pending.append(await producer.send(topic, orjson.dumps(value), key=key.encode()))
    await asyncio.gather(*pending)


async def test_sigkill_mid_batch_and_restart_loses_nothing(make_settings: Callable[..., Settings], topics: Topics,
                                                           producer: AIOKafkaProducer, intake: FakeIntake,
                                                           kafka: KafkaBroker, tmp_path: Path) -> None:
    """SIGKILLed repeatedly mid-batch and restarted, the service delivers every evaluation; only a kill repeats one."""
    n, min_kills = 300, 5
    seed = int(os.environ.get("EVALJOIN_CRASH_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    # Small Kafka batches and small intake requests against a slow intake: a batch is almost always
    # in flight, part of it already answered 2xx and not yet recorded in the ledger. One request at a
    # time, so that the workload outlasts the kills.
    settings = make_settings(kafka_max_batch=16, intake_batch_max_evals=3, intake_max_in_flight=1)
    expected: set[tuple[str, str]] = set()
    messages: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(n):
        join_key, span_id, label = f"crash-{i:04d}", str(SPAN_BASE + i), LABELS[i % len(LABELS)]
        expected.add((span_id, label))
        pair = [(topics.span, join_key, span_event(join_key, span=span_id)),
                (topics.result, join_key, result_event(join_key, f"evt-crash-{i:04d}", label))]
        rng.shuffle(pair)
        messages.extend(pair)
    intake.delay(0.05)
    await publish(producer, messages)

    service = ServiceProcess(settings, tmp_path / "service.log")
    loop = asyncio.get_running_loop()
    marks: list[int] = []  # len(intake.requests) when each incarnation started: its first request index
    kills: list[tuple[float, int]] = []  # (seconds the incarnation ran after its first request, delivered so far)
    try:
        while len(kills) < min_kills:
            marks.append(len(intake.requests))
            service.start()
            def reached(first: int = marks[-1]) -> bool:
                return len(intake.requests) > first

            await service.until(reached, within=45,
                                what=f"incarnation {service.starts} to reach the intake (seed {seed})")
            lived = rng.uniform(0.5, 1.5)
            await asyncio.sleep(lived)
            delivered = len(delivered_keys(intake))
            assert delivered < n, (f"everything was delivered before kill {len(kills) + 1}; the workload is too "
                                   f"small to kill it mid-batch (seed {seed})\n{service.tail()}")
            service.signal(signal.SIGKILL)
            assert await service.wait_exit(10) == -signal.SIGKILL
            kills.append((lived, delivered))
            # Let the intake finish answering what the dead process had sent, so that every request
            # recorded from here on belongs to the next incarnation. (The restart waits for the group
            # to drop the dead member anyway.)
            await asyncio.sleep(1.0)

        marks.append(len(intake.requests))
        restarted = loop.time()
        service.start()
        await service.until(lambda: len(intake.requests) > marks[-1], within=45,
                            what=f"the last incarnation to reach the intake (seed {seed})")
        rejoined_s = loop.time() - restarted
        await service.until(lambda: len(delivered_keys(intake)), expect=n, within=60,
                            what=f"all {n} evaluations after the last restart (seed {seed})")
        await service.until(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=30,
                            what=f"the group's lag to reach 0 (seed {seed})")
        recovered_s = loop.time() - restarted
        service.signal(signal.SIGTERM)
        code = await service.wait_exit(settings.shutdown_timeout_seconds + 5)
        assert code == 0, f"SIGTERM after recovery: exit {code}\n{service.tail()}"
    finally:
        service.kill_if_running()

    # Every copy of every metric the intake accepted, with the incarnation that sent it.
    copies: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for index, request in enumerate(intake.requests):
        if not 200 <= request.status < 300:
            continue
        raw = raw_metrics(request.body)
        assert [json.loads(text) for text in raw] == request.metrics
        incarnation = bisect_right(marks, index) - 1
        for text, metric in zip(raw, request.metrics, strict=True):
            copies[metric_key(metric)].append((incarnation, text))
    lost = expected - copies.keys()
    unexpected = copies.keys() - expected
    duplicates = sum(len(sent) - 1 for sent in copies.values())
    print(f"\ncrash test (seed {seed}): expected={len(expected)} delivered={len(copies)} lost={len(lost)} "
          f"duplicates={duplicates} kills={len(kills)} restarts={service.starts - 1} "
          f"recovered {recovered_s:.1f}s after the last restart (first request after {rejoined_s:.1f}s)")
    print("kills (s after the incarnation's first request, evaluations delivered by then): "
          + ", ".join(f"{lived:.2f}s/{delivered}" for lived, delivered in kills))
    assert not lost, f"{len(lost)} evaluations never reached the intake, e.g. {sorted(lost)[:5]} (seed {seed})"
    assert not unexpected, f"metrics nobody published: {sorted(unexpected)[:5]}"
    for key, sent in copies.items():
        first_text = sent[0][1]
        for _, text in sent[1:]:
            assert text == first_text, f"{key}: a re-sent copy differs from the first\n{first_text}\n{text}"
        # A repeat needs a kill between the 2xx and the ledger's record, so one incarnation never repeats.
        per_incarnation = Counter(incarnation for incarnation, _ in sent)
        assert max(per_incarnation.values()) == 1, f"{key} accepted twice by one process: {per_incarnation}"
    assert duplicates <= len(kills) * settings.kafka_max_batch


async def test_sigterm_during_intake_outage_commits_nothing_unfinished(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker, tmp_path: Path) -> None:
    """SIGTERM during an intake outage exits 0, idle, within the shutdown timeout and commits no unfinished batch."""
    m = 24
    settings = make_settings()
    spans = [(topics.span, f"out-{i:03d}", span_event(f"out-{i:03d}", span=str(SPAN_BASE + i))) for i in range(m)]
    results = [(topics.result, f"out-{i:03d}", result_event(f"out-{i:03d}", f"evt-outage-{i:03d}", "faithfulness"))
               for i in range(m)]
    service = ServiceProcess(settings, tmp_path / "service.log")
    loop = asyncio.get_running_loop()
    try:
        await publish(producer, spans)
        service.start()
        # Spans alone complete nothing, so their batches finish and are committed.
        await service.until(lambda: lag_or_none(kafka.bootstrap_servers, settings),
                            expect=0, within=45, what="the spans to be committed")
        intake.fail_next(10_000, 503)
        await publish(producer, results)
        await service.until(lambda: sum(r.status == 503 for r in intake.requests) >= 5, within=30,
                            what="the service to retry against the failing intake")
        assert await lag_or_none(kafka.bootstrap_servers, settings) == m

        cpu_before = service.cpu_seconds()
        service.signal(signal.SIGTERM)
        asked = loop.time()
        code = await service.wait_exit(settings.shutdown_timeout_seconds + 5)
        took = loop.time() - asked
        assert code == 0, f"SIGTERM during the outage: exit {code} after {took:.1f}s\n{service.tail()}"
        cpu = None if cpu_before is None or service.cpu_seen is None else service.cpu_seen - cpu_before
        cpu_text = "n/a" if cpu is None else f"{cpu:.2f}s"
        print(f"\noutage test: SIGTERM to exit {took:.1f}s (shutdown timeout "
              f"{settings.shutdown_timeout_seconds:.0f}s), CPU meanwhile {cpu_text}, failed requests "
              f"{len(intake.requests)}")
        # Waiting for the stuck batch is a wait, not a busy loop.
        assert cpu is None or cpu < 0.5 * took, f"{cpu:.1f}s of CPU in {took:.1f}s of shutdown\n{service.tail()}"
        assert intake.accepted_metrics() == []
        assert await lag_or_none(kafka.bootstrap_servers, settings) == m, service.tail()

        intake.reset_faults()
        service.start()
        await service.until(lambda: len(delivered_keys(intake)), expect=m, within=45,
                            what="the outage's evaluations after the restart")
        await service.until(lambda: lag_or_none(kafka.bootstrap_servers, settings),
                            expect=0, within=30, what="the group's lag to reach 0")
        service.signal(signal.SIGTERM)
        assert await service.wait_exit(settings.shutdown_timeout_seconds + 5) == 0, service.tail()
    finally:
        service.kill_if_running()
    delivered = Counter(metric_key(metric) for metric in intake.accepted_metrics())
    assert delivered == {(str(SPAN_BASE + i), "faithfulness"): 1 for i in range(m)}
