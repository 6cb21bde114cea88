"""The expiry path: a side whose deadline passed without a match is reported, never dropped.

The sweeper walks the deadline-index shards (one replica per shard at a time, under a lock), takes
each due side out of the join, publishes it to the unmatched topic with its reason
(``span_without_result`` or ``result_without_span``), waits for the broker's acknowledgement, and
only then forgets it. A crash in between reports it again: reports are at-least-once and carry the
side's identity, so a reader can tell a repeat.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import orjson
import structlog

from consumer import records
from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.dlq import Producer
from consumer.errors import DependencyError, kafka_errors
from consumer.metrics import Metrics
from consumer.store import DeadlineIndex, DueSide

log = structlog.get_logger(__name__)

SHARD_LOCK_MS = 60_000  # a sweeper's hold on a shard; a replica that died lets go after this
OLDEST_PER_SHARD = 200  # deadline-index entries per shard looked at for each app's oldest waiting side


@dataclass
class SweepReport:
    reported: int = 0
    dropped: int = 0
    postponed: int = 0


class Sweeper:
    def __init__(self, store: DeadlineIndex, producer: Producer, *, topic: str, interval_s: float,
                 batch: int, retry_later_ms: int, metrics: Metrics, join_ttl_ms: int = 0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._store = store
        self._producer = producer
        self._topic = topic
        self._interval_s = interval_s
        self._batch = batch
        self._retry_later_ms = retry_later_ms
        self._token = uuid.uuid4().hex
        self._metrics = metrics
        self._join_ttl_ms = join_ttl_ms

    async def run(self) -> None:
        """Sweep forever, every ``interval_s``; cancel to stop."""
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except DependencyError as exc:  # Kafka or Redis away: the next sweep tries again
                log.warning("sweep_failed", error=str(exc), retriable=exc.retriable)
            except Exception:
                log.exception("sweep_failed")
            await asyncio.sleep(self._interval_s)

    async def sweep_once(self, now_ms: int | None = None) -> SweepReport:
        report = SweepReport()
        for shard in range(self._store.shards):
            if not await self._store.try_lock(shard, self._token, ttl_ms=SHARD_LOCK_MS):
                continue
            try:
                while True:
                    now = now_ms if now_ms is not None else self._clock.now_ms()
                    sides = await self._store.due(shard, now, self._batch)
                    for side in sides:
                        await self._expire(side, now, report)
                    if len(sides) < self._batch:
                        break
            finally:
                await self._store.unlock(shard, self._token)
        size, earliest = await self._store.index_size()
        self._metrics.buffered_sides.set(size)
        if earliest is not None and self._join_ttl_ms:
            age_ms = (now_ms or self._clock.now_ms()) - (earliest - self._join_ttl_ms)
            self._metrics.oldest_buffered_age.set(max(0, age_ms) / 1000)
        else:
            self._metrics.oldest_buffered_age.set(0)
        await self._app_gauges(now_ms or self._clock.now_ms())
        return report

    async def _app_gauges(self, now_ms: int) -> None:
        """Per ml_app: what it holds in the buffer, and how long its oldest side has waited for the other."""
        metrics, label = self._metrics, self._metrics.app
        held: dict[str, list[int]] = {}
        for ml_app, usage in (await self._store.app_usage()).items():
            total = held.setdefault(label(ml_app), [0, 0])
            total[0] += usage.sides
            total[1] += usage.bytes
        oldest: dict[str, int] = {}
        for ml_app, deadline_ms in (await self._store.oldest_pending(OLDEST_PER_SHARD)).items():
            name = label(ml_app)
            oldest[name] = min(deadline_ms, oldest.get(name, deadline_ms))
        # Apps that hold nothing any more leave the gauges (no await from here on: a scrape sees all or none).
        for gauge in (metrics.app_buffered_sides, metrics.app_buffered_bytes, metrics.app_oldest_pending_age):
            gauge.clear()
        for name, (sides, size) in held.items():
            metrics.app_buffered_sides.labels(ml_app=name).set(sides)
            metrics.app_buffered_bytes.labels(ml_app=name).set(size)
        for name, deadline_ms in oldest.items():
            age_ms = now_ms - (deadline_ms - self._join_ttl_ms) if self._join_ttl_ms else 0
            metrics.app_oldest_pending_age.labels(ml_app=name).set(max(0, age_ms) / 1000)

    async def _expire(self, side: DueSide, now_ms: int, report: SweepReport) -> None:
        outcome = await self._store.expire(side)
        if outcome.verdict == "busy":
            await self._store.postpone(side, now_ms + self._retry_later_ms)
            report.postponed += 1
            return
        if outcome.verdict == "report" and outcome.body is not None:
            reason = "span_without_result" if side.event_id is None else "result_without_span"
            decode = records.decode_span if side.event_id is None else records.decode
            message = {
                "reason": reason,
                "ml_app": side.namespace.ml_app,
                "join_key": side.namespace.join_key,
                **({"run_id": side.namespace.run} if side.namespace.run else {}),
                "deadline_ms": side.deadline_ms,
                "reported_at_ms": now_ms,
                "side": decode(outcome.body, side.namespace),
            }
            with kafka_errors():
                await self._producer.send_and_wait(
                    self._topic,
                    value=orjson.dumps(message),
                    key=f"{side.namespace.ml_app}:{side.namespace.join_key}".encode(),
                    headers=[("evaljoin.reason", reason.encode())],
                )
            source = message["side"].get("source", {}) if isinstance(message["side"], dict) else {}
            log.warning("unmatched_reported", reason=reason, topic=source.get("topic"),
                        partition=source.get("partition"), offset=source.get("offset"), ml_app=side.namespace.ml_app,
                        join_key=side.namespace.join_key, deadline_ms=side.deadline_ms)
            self._metrics.unmatched.labels(reason=reason).inc()
            self._metrics.app_unmatched.labels(ml_app=self._metrics.app(side.namespace.ml_app), reason=reason).inc()
            report.reported += 1
        else:
            report.dropped += 1
        await self._store.forget(side)
