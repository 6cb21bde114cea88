"""The commit step against a consumer in memory: which offsets it commits, and what it keeps when a commit fails."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from consumer.commit import OffsetCommitter
from consumer.metrics import Metrics

pytestmark = pytest.mark.unit

SPANS, RESULTS = TopicPartition("spans", 0), TopicPartition("results", 1)


class FakeConsumer:
    """Records each commit; fails the next ``failures`` of them, and holds a commit while ``hold`` is set."""

    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.failures = 0
        self.hold: asyncio.Event | None = None

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("coordinator went away")
        self.commits.append(dict(offsets))


def committer(consumer: FakeConsumer, metrics: Metrics | None = None, *, timeout_s: float = 5.0) -> OffsetCommitter:
    return OffsetCommitter(consumer, metrics or Metrics(), timeout_s=timeout_s)


async def test_only_finished_offsets_are_committed_once() -> None:
    """Each partition commits the highest offset marked finished; a later commit with nothing new sends nothing."""
    consumer = FakeConsumer()
    commits = committer(consumer)
    commits.finished(SPANS, 5)
    commits.finished(SPANS, 3)  # an older batch finishing late never moves an offset back
    commits.finished(RESULTS, 7)
    assert await commits.commit() is True
    assert await commits.commit() is True
    assert consumer.commits == [{SPANS: 5, RESULTS: 7}]


async def test_nothing_finished_commits_nothing() -> None:
    """Without a finished message there is no commit request at all."""
    consumer = FakeConsumer()
    assert await committer(consumer).commit() is True
    assert consumer.commits == []


async def test_a_failed_commit_keeps_its_offsets_for_the_next() -> None:
    """A commit the broker refuses returns False and is counted; the same offsets go with the next commit."""
    consumer, metrics = FakeConsumer(), Metrics()
    consumer.failures = 1
    commits = committer(consumer, metrics)
    commits.finished(SPANS, 5)
    assert await commits.commit() is False
    assert await commits.commit() is True
    assert consumer.commits == [{SPANS: 5}]
    assert metrics.registry.get_sample_value("evaljoin_commits_total", {"outcome": "failed"}) == 1


async def test_a_commit_that_hangs_fails_after_its_timeout() -> None:
    """A commit that does not return within timeout_s gives up with False and keeps its offsets."""
    consumer = FakeConsumer()
    consumer.hold = asyncio.Event()
    commits = committer(consumer, timeout_s=0.01)
    commits.finished(SPANS, 5)
    assert await commits.commit() is False
    consumer.hold = None
    assert await commits.commit() is True
    assert consumer.commits == [{SPANS: 5}]


async def test_an_offset_finished_during_a_commit_waits_for_the_next() -> None:
    """A partition that moves on while its commit is in flight is not forgotten when that commit succeeds."""
    consumer = FakeConsumer()
    consumer.hold = asyncio.Event()
    commits = committer(consumer)
    commits.finished(SPANS, 5)
    commits.finished(RESULTS, 2)
    in_flight = asyncio.create_task(commits.commit())
    await asyncio.sleep(0)
    commits.finished(SPANS, 9)
    consumer.hold.set()
    assert await in_flight is True
    consumer.hold = None
    assert await commits.commit() is True
    assert consumer.commits == [{SPANS: 5, RESULTS: 2}, {SPANS: 9}]


async def test_forgotten_partitions_are_not_committed() -> None:
    """Offsets of revoked partitions are dropped: their new owner commits them."""
    consumer = FakeConsumer()
    commits = committer(consumer)
    commits.finished(SPANS, 5)
    commits.finished(RESULTS, 7)
    commits.forget({SPANS})
    assert await commits.commit() is True
    assert consumer.commits == [{RESULTS: 7}]


async def test_on_a_stop_the_commits_left_share_one_budget() -> None:
    """After end_commits_by, commits that hang (a coordinator that does not answer) end by that deadline together,
    not after timeout_s each: the stop's close must fit within its exit deadline. Past it, nothing is sent."""
    consumer = FakeConsumer()
    consumer.hold = asyncio.Event()
    commits = committer(consumer, timeout_s=30.0)
    commits.finished(SPANS, 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    commits.end_commits_by(time.monotonic() + 0.3)
    assert await commits.commit() is False
    assert await commits.commit() is False
    assert loop.time() - started < 2.0  # before: 30 s per commit
    consumer.hold = None
    assert await commits.commit() is False  # the budget is spent: offsets are left for the next owner
    assert consumer.commits == []
