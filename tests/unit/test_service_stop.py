"""A stop while the group rebalances: the consume loop does not wait for a fetch that its timeout does not bound."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumer.config import Settings
from consumer.metrics import Metrics
from consumer.service import Service
from consumer.store_memory import MemoryJoinStore
from tests.unit.fakes import FakeProducer, FakeSink

pytestmark = pytest.mark.unit


class RebalancingConsumer:
    """A consumer whose group never finishes rebalancing: aiokafka's getmany then waits for the assignment, past
    its ``timeout_ms`` (a group coordinator that stays unreachable)."""

    def __init__(self) -> None:
        self.fetching = asyncio.Event()
        self.fetch_cancelled = False

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    async def getmany(self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        self.fetching.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.fetch_cancelled = True
            raise
        return {}

    def assignment(self) -> set[Any]:
        return set()

    def pause(self, *partitions: Any) -> None:
        pass

    def resume(self, *partitions: Any) -> None:
        pass

    async def commit(self, offsets: Any = None) -> None:
        pass


async def test_a_stop_ends_the_loop_while_a_fetch_waits_on_a_rebalance() -> None:
    consumer = RebalancingConsumer()
    store = MemoryJoinStore()
    service = Service(consumer=consumer, producer=FakeProducer(), store=store, deadlines=store,
                      sink=FakeSink(), settings=Settings(), metrics=Metrics())
    run = asyncio.create_task(service.run())
    await asyncio.wait_for(consumer.fetching.wait(), timeout=5)
    service.stop()
    try:
        await asyncio.wait_for(run, timeout=5)  # before: run() waited for the fetch for as long as the rebalance lasted
    finally:
        service.stop_guard.disarm()  # stop() armed the process's exit deadline; the process's close disarms it
    assert consumer.fetch_cancelled
