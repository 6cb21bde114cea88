"""What the tests share besides fixtures: topic names, service timings, and the ways to wait on Kafka.

Tests import these by name (``from tests.support import ...``); pytest's fixtures stay in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError

from consumer.config import Settings
from consumer.service import Service


@dataclass
class Topics:
    span: str
    result: str
    dlq: str
    unmatched: str


# What every test service shares: agentless delivery to the intake stand-in, and timings short enough
# for tests (a stand-in answers at once, and a test waits on retries, sweeps and shutdowns).
FAST_TIMINGS: dict[str, Any] = {
    "dd_llmobs_agentless_enabled": True,
    "intake_timeout_seconds": 2.0,
    "claim_lease_seconds": 5.0,
    "intake_retry_initial_seconds": 0.05,
    "intake_retry_max_seconds": 0.5,
    "sweep_interval_seconds": 0.5,
    "shutdown_timeout_seconds": 5.0,
    "health_port": 0,
}


@asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """Run the service in this event loop until the block ends, then stop it cleanly."""
    async with Service.open(settings) as service:
        task = asyncio.create_task(service.run())
        try:
            yield service
        finally:
            service.stop()
            await asyncio.wait_for(task, timeout=30)


async def send_json(producer: AIOKafkaProducer, topic: str, value: Any, *, key: str | None = None,
                    headers: list[tuple[str, bytes]] | None = None) -> None:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    await producer.send_and_wait(topic, raw, key=key.encode() if key else None, headers=headers)


async def eventually(check: Callable[[], Any], *, expect: Any = True, within: float = 30.0,
                     what: str = "condition") -> None:
    """Poll ``check`` (sync or async) until it returns ``expect``, without blocking the service's loop."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        outcome = check()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome == expect:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def read_topic(bootstrap: str, topic: str, count: int, *, within: float = 30.0) -> list[Any]:
    """Read the first ``count`` records of ``topic`` (fails if fewer arrive in time)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + within
        while len(records) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{topic}: {len(records)} of {count} records after {within}s")
            batch = await consumer.getmany(timeout_ms=200)
            for partition_records in batch.values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


async def topic_size(bootstrap: str, topic: str) -> int:
    """Records ever written to ``topic`` (0 for a topic that does not exist yet)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
        return sum((await consumer.end_offsets(partitions)).values()) if partitions else 0
    finally:
        await consumer.stop()


async def group_lag(bootstrap: str, group: str, topic_names: list[str]) -> int:
    """Records of ``topic_names`` not yet committed by consumer group ``group`` (-1: ask again)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        try:
            committed = await admin.list_consumer_group_offsets(group)
        except GroupCoordinatorNotAvailableError:  # a new broker creates its offsets topic on first use
            return -1
        partitions = [TopicPartition(t, p) for t in topic_names for p in await _partitions(consumer, t)]
        ends = await consumer.end_offsets(partitions)
        return sum(end - (committed[tp].offset if tp in committed else 0) for tp, end in ends.items())
    finally:
        await consumer.stop()
        await admin.close()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    partitions = consumer.partitions_for_topic(topic)
    if partitions is None:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
    return set(partitions or ())
