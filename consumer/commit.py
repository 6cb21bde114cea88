"""The commit step, always last: offsets move only past finished messages.

A message is finished when its side is buffered in the join store, every evaluation it completed is
delivered or dead-lettered, or it was itself dead-lettered (each acknowledged). The processing step
records finished offsets here; they are committed after each batch and when partitions are revoked.
A failed commit is not an error of the message: it is redelivered and recognised as a duplicate.

When nothing is in flight and a fetch found nothing, :meth:`OffsetCommitter.catch_up` commits the consumer's
position where it passed records that were never handed out (transaction markers), so that a partition whose
last record is a marker reaches lag 0 instead of staying one short until its next record.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiokafka import TopicPartition

from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.errors import DependencyError, kafka_errors
from consumer.join import Batch
from consumer.metrics import Metrics

log = structlog.get_logger(__name__)


COMMIT_TIMEOUT_S = 15.0  # aiokafka retries a commit while the group coordinator is unavailable; not forever
CATCH_UP_TIMEOUT_S = 2.0  # catching up is optional: an idle loop must not wait on a broker that does not answer


class OffsetCommitter:
    def __init__(self, consumer: Any, metrics: Metrics, *, timeout_s: float = COMMIT_TIMEOUT_S,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._consumer = consumer
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._clock = clock
        self._commit_by: float | None = None  # on a stop: every commit ends by then (monotonic)
        self._finished: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}  # what this member committed, or found committed

    def finished(self, tp: TopicPartition, next_offset: int) -> None:
        """Record that every message of ``tp`` before ``next_offset`` is finished."""
        if next_offset > self._finished.get(tp, -1):
            self._finished[tp] = next_offset

    def finished_batch(self, batch: Batch) -> None:
        """Record a delivered batch as finished, for the partitions still assigned (a revoked one's new owner
        does the batch again, idempotently), and update their lag."""
        assigned = self._consumer.assignment()
        for tp, records in batch.items():
            if tp not in assigned:
                continue
            self.finished(tp, records[-1].offset + 1)
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                self._metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, highwater - records[-1].offset - 1))

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions revoked: their offsets are committed; their lag is the new owner's to report."""
        for tp in partitions:
            self._finished.pop(tp, None)
            self._committed.pop(tp, None)
            with contextlib.suppress(KeyError):  # KeyError: never reported by this member
                self._metrics.lag.remove(tp.topic, str(tp.partition))

    def end_commits_by(self, deadline: float) -> None:
        """A stop: the commits left (each batch that finishes, the last one) share what is left until ``deadline``
        (monotonic) instead of ``timeout_s`` each, so that a coordinator that does not answer cannot hold the stop
        past its exit deadline. What is not committed by then is consumed again by the next owner, and finds its
        evaluations in the ledger."""
        self._commit_by = deadline

    async def commit(self) -> bool:
        """Commit what is finished; returns False (and keeps it) if the broker refused or did not answer in time."""
        if not self._finished:
            return True
        offsets = dict(self._finished)
        timeout_s = self._timeout_s
        if self._commit_by is not None:
            timeout_s = min(timeout_s, self._commit_by - self._clock.monotonic())
            if timeout_s <= 0:
                log.warning("commit_skipped_at_stop", partitions=len(offsets))
                return False
        try:
            with self._metrics.commit_seconds.time(), kafka_errors():
                await asyncio.wait_for(self._consumer.commit(offsets), timeout=timeout_s)
        except DependencyError as exc:
            log.warning("commit_failed", error=str(exc), retriable=exc.retriable, partitions=len(offsets))
            self._metrics.commits.labels(outcome="failed").inc()
            return False
        self._metrics.commits.labels(outcome="ok").inc()
        for tp, offset in offsets.items():
            self._committed[tp] = offset
            if self._finished.get(tp) == offset:
                del self._finished[tp]
        return True

    async def catch_up(self) -> None:
        """Nothing is in flight and the last fetch returned nothing: every record handed out is finished, so the
        consumer's position is too. Commit it where it is past what was committed: it passed records that were
        never handed out (a commit or abort marker ends a transaction's records). Cheap when there is nothing to
        do: a position is local, and a partition's committed offset is asked once, after its assignment."""
        try:
            with kafka_errors():
                for tp in self._consumer.assignment():
                    position = await asyncio.wait_for(self._consumer.position(tp), timeout=CATCH_UP_TIMEOUT_S)
                    if tp not in self._committed:
                        committed = await asyncio.wait_for(self._consumer.committed(tp), timeout=CATCH_UP_TIMEOUT_S)
                        self._committed[tp] = -1 if committed is None else committed
                    if position > self._committed[tp]:
                        self.finished(tp, position)
                        highwater = self._consumer.highwater(tp)
                        if highwater is not None:
                            self._metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                                max(0, highwater - position))
        except (DependencyError, TimeoutError) as exc:
            log.debug("catch_up_skipped", error=str(exc))  # the next idle fetch tries again
            return
        await self.commit()
