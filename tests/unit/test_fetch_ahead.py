"""Fetching ahead: while the join stage works, the loop takes what Kafka fetched meanwhile (at most one batch).

aiokafka fetches a partition again only once its fetched records are taken, so without this a record produced
while a batch is joined waits for the batch after next. These tests drive the consume loop with a scripted
consumer (records handed out as aiokafka's ``getmany`` would) and a join store that can be held mid-join.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.config import Settings
from consumer.metrics import Metrics
from consumer.service import Service
from consumer.store import ResultOp, ResultPut, SpanOp, SpanPut
from consumer.store_memory import MemoryJoinStore
from tests.unit.fakes import FakeProducer, FakeSink

pytestmark = pytest.mark.unit

SPANS = TopicPartition("llmobs.span-context", 0)
RESULTS = TopicPartition("nemo.results", 0)
JUDGED_MS = int(time.time() * 1000) - 3_600_000


def span_value(key: str) -> bytes:
    return orjson.dumps({"schema_version": 1, "join_key": key, "trace_id": f"abc{key}", "span_id": f"100{key}",
                         "ml_app": "app"})


def result_value(key: str) -> bytes:
    return orjson.dumps({"schema_version": 1, "event_id": f"result-{key:0>4}", "join_key": key, "ml_app": "app",
                         "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 0.5,
                                          "timestamp_ms": JUDGED_MS}],
                         "provenance": {"job_id": "job", "target_type": "model"}})


class ScriptedConsumer:
    """Hands out the records added to it in order, up to ``max_records`` per ``getmany``, as aiokafka does."""

    def __init__(self) -> None:
        self._queued: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {SPANS: [], RESULTS: []}
        self._next_offset = dict.fromkeys(self._queued, 0)
        self._arrived = asyncio.Event()
        self.assigned = {SPANS, RESULTS}
        self.paused: set[TopicPartition] = set()  # hand out nothing, as aiokafka's paused partitions do
        self.handed_out: list[tuple[int, int]] = []  # (records handed out, max_records asked) of each getmany
        self.commits: dict[TopicPartition, int] = {}
        self.listener: Any = None

    def add(self, tp: TopicPartition, values: Sequence[bytes]) -> None:
        for value in values:
            offset = self._next_offset[tp]
            self._next_offset[tp] += 1
            self._queued[tp].append(ConsumerRecord(tp.topic, tp.partition, offset, int(time.time() * 1000), 0,
                                                   b"k", value, None, len(b"k"), len(value), []))
        self._arrived.set()

    @property
    def waiting(self) -> int:
        return sum(len(records) for records in self._queued.values())

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    async def getmany(self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        limit = max_records or 10**9
        if not any(self._queued[tp] for tp in self.assigned - self.paused) and timeout_ms:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout_ms / 1000)
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for tp in sorted(self.assigned - self.paused):
            taken, self._queued[tp] = self._queued[tp][:limit], self._queued[tp][limit:]
            if taken:
                out[tp] = taken
                limit -= len(taken)
        self.handed_out.append((sum(len(r) for r in out.values()), max_records or 0))
        return out

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused.difference_update(partitions)

    def highwater(self, tp: TopicPartition) -> int | None:
        return None

    async def position(self, tp: TopicPartition) -> int:
        return self._next_offset[tp] - len(self._queued[tp])

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.commits.get(tp)

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        self.commits.update(offsets or {})


class HeldStore(MemoryJoinStore):
    """A memory join store whose joins wait while ``open`` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.open.set()
        self.joining = asyncio.Event()

    async def put_many(self, ops: Sequence[SpanOp | ResultOp]) -> list[SpanPut | ResultPut]:
        self.joining.set()
        await self.open.wait()
        return await super().put_many(ops)


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def delivered_keys(sink: FakeSink) -> list[str]:
    return sorted(orjson.loads(metric)["join_on"]["span"]["span_id"][3:] for metric in sink.sent)


async def start(store: HeldStore, sink: FakeSink, *, max_batch: int = 500) -> tuple[Service, ScriptedConsumer,
                                                                                   asyncio.Task[None]]:
    consumer = ScriptedConsumer()
    settings = Settings(kafka_max_batch=max_batch, shutdown_timeout_seconds=1)
    service = Service(consumer=consumer, producer=FakeProducer(), store=store, deadlines=store, sink=sink,
                      settings=settings, metrics=Metrics())
    return service, consumer, asyncio.create_task(service.run())


async def stop(service: Service, run: asyncio.Task[None]) -> None:
    service.stop()
    try:
        await asyncio.wait_for(run, timeout=10)
    finally:
        service.stop_guard.disarm()


async def test_records_arriving_during_a_join_are_taken_during_it_and_joined_next_once() -> None:
    store, sink = HeldStore(), FakeSink()
    service, consumer, run = await start(store, sink)
    try:
        store.open.clear()
        consumer.add(SPANS, [span_value(k) for k in ("1", "2", "3")])
        await until(store.joining.is_set)  # the first batch (the spans) is being joined, and is held there
        consumer.add(RESULTS, [result_value(k) for k in ("1", "2", "3")])
        # Before: the loop took nothing while the join worked, so these waited in the consumer for the join's end.
        await until(lambda: consumer.waiting == 0)
        assert not sink.sent
        store.open.set()
        await until(lambda: len(sink.sent) == 3)
        await until(lambda: consumer.commits == {SPANS: 3, RESULTS: 3})
    finally:
        await stop(service, run)
    assert delivered_keys(sink) == ["1", "2", "3"]


async def test_at_most_one_batch_is_taken_ahead() -> None:
    store, sink = HeldStore(), FakeSink()
    service, consumer, run = await start(store, sink, max_batch=4)
    try:
        store.open.clear()
        consumer.add(SPANS, [span_value(str(k)) for k in range(4)])
        await until(store.joining.is_set)
        consumer.add(RESULTS, [result_value(str(k)) for k in range(10)])
        await until(lambda: consumer.waiting == 6)  # four of the ten are held ahead, the rest stay in Kafka
        await asyncio.sleep(0.2)
        assert consumer.waiting == 6
        assert all(asked <= 4 for _, asked in consumer.handed_out)
        store.open.set()
        await until(lambda: consumer.commits == {SPANS: 4, RESULTS: 10})
    finally:
        await stop(service, run)
    assert delivered_keys(sink) == ["0", "1", "2", "3"]


async def test_a_joined_batch_waiting_for_the_delivery_does_not_spin_the_loop() -> None:
    """While a joined batch waits for the delivery in flight, fetching ahead waits for records, not in a loop."""
    store, sink = HeldStore(), FakeSink(stall_at=0)
    service, consumer, run = await start(store, sink)
    try:
        consumer.add(SPANS, [span_value("1")])
        consumer.add(RESULTS, [result_value("1")])
        await until(sink.stalled.is_set)  # the first batch's delivery never ends
        consumer.add(SPANS, [span_value("2")])
        await until(lambda: consumer.waiting == 0)
        consumer.add(RESULTS, [result_value("2")])  # joined while the first batch is still delivered
        await until(lambda: consumer.waiting == 0)
        calls = len(consumer.handed_out)
        await asyncio.sleep(0.3)
        assert len(consumer.handed_out) - calls <= 2  # a getmany waits up to its timeout (0.5 s) for records
    finally:
        await stop(service, run)


async def test_a_revoke_drops_what_was_taken_ahead_from_the_revoked_partitions() -> None:
    store, sink = HeldStore(), FakeSink()
    service, consumer, run = await start(store, sink)
    try:
        store.open.clear()
        consumer.add(SPANS, [span_value("1")])
        await until(store.joining.is_set)
        consumer.add(RESULTS, [result_value("1")])
        await until(lambda: consumer.waiting == 0)  # the result is held ahead
        consumer.assigned = {SPANS}
        revoke = asyncio.create_task(consumer.listener.on_partitions_revoked({RESULTS}))
        store.open.set()
        await asyncio.wait_for(revoke, timeout=5)
        await until(lambda: consumer.commits.get(SPANS) == 1)
        await asyncio.sleep(0.2)
    finally:
        await stop(service, run)
    assert not sink.sent  # the result went with its partition; its next owner joins it
    assert RESULTS not in consumer.commits
