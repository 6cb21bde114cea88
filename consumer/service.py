"""The consume loop: decode -> join -> deliver -> commit, batch by batch.

Each batch from ``getmany`` is processed as a whole: every record is decoded (or dead-lettered),
joined in the store, and every evaluation it completed is delivered; only then are its offsets
committed. Two stages overlap: while one batch's evaluations are delivered, the next batch is
fetched and joined; its delivery starts only when the previous one has finished (one owner's
deliveries never race for the same evaluation), and offsets are committed in order. So at most two
batches are in flight. Both stages are idempotent: a join that fails on a transient error (Redis or
Kafka unreachable) is done again after a backoff, and so is a delivery. While the next batch waits for the
delivery in flight, the assigned partitions are paused and the consumer keeps polling, so memory
stays bounded and the group does not evict a consumer that is waiting on a slow intake.

On SIGTERM the loop stops fetching, finishes the batches in flight (bounded by the shutdown
timeout), commits, and leaves the group. On revoke it waits for the batches in flight, then commits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from consumer.aio import Backoff, cancel_and_wait, stop_within
from consumer.commit import OffsetCommitter
from consumer.config import Settings
from consumer.decode import decode_result, decode_span
from consumer.deliver import Deliverer
from consumer.dlq import DeadLetters, DlqLimit
from consumer.errors import DlqLimitExceeded, InvalidMessage
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.expiry import Sweeper
from consumer.health import HealthServer
from consumer.join import Joined, Joiner, Source
from consumer.metrics import Metrics
from consumer.sink import EvaluationSink, HttpIntakeSink
from consumer.store import RedisJoinStore, connect
from consumer.tracing import span

log = structlog.get_logger(__name__)

Batch = dict[TopicPartition, list[Any]]
TRANSIENT = (RedisError, KafkaError, OSError, asyncio.TimeoutError)
STAGE_RETRY_FIRST_S = 0.2  # a stage that failed transiently is done again after this, doubling
STAGE_RETRY_CAP_S = 10.0  # up to this


class Service:
    """One consumer process. Use ``async with Service.open(settings) as service: await service.run()``."""

    def __init__(self, *, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, store: RedisJoinStore,
                 sink: EvaluationSink, settings: Settings, metrics: Metrics) -> None:
        self._consumer = consumer
        self._store = store
        self._span_topic = settings.span_topic
        self._result_topic = settings.result_topic
        self._join_key = settings.join_key
        self._default_ml_app = settings.default_ml_app or ""
        self._max_bytes = settings.max_message_bytes
        self._max_batch = settings.kafka_max_batch
        self._shutdown_timeout = settings.shutdown_timeout_seconds
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}".replace("|", "_")
        self.metrics = metrics
        self._dead_letters = DeadLetters(producer, topic=settings.dlq_topic, metrics=metrics, limit=DlqLimit(
            max_invalid_ratio=settings.dlq_max_invalid_ratio, window=settings.dlq_window,
            max_consecutive=settings.dlq_max_consecutive_invalid), max_record_bytes=settings.max_message_bytes)
        self._joiner = Joiner(store, join_ttl_ms=settings.join_ttl_seconds * 1000)
        self._deliverer = Deliverer(store, sink, self._dead_letters, owner=self._owner, metrics=metrics,
                                    lease_ms=int(settings.claim_lease_seconds * 1000))
        self.sweeper = Sweeper(store, producer, topic=settings.unmatched_topic,
                               interval_s=settings.sweep_interval_seconds, batch=settings.sweep_batch,
                               retry_later_ms=int(settings.claim_lease_seconds * 1000), metrics=metrics,
                               join_ttl_ms=settings.join_ttl_seconds * 1000)
        self._committer = OffsetCommitter(consumer, metrics)
        self._stopping = asyncio.Event()
        self._stop_requested_at = 0.0
        self._work: asyncio.Task[None] | None = None  # the batch being joined (and waiting to deliver)
        self._delivering: asyncio.Task[None] | None = None  # the previous batch's delivery
        self.batches_done = 0
        self.last_progress = time.time()
        self.in_group = False

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: Settings) -> _ServiceContext:
        return _ServiceContext(settings)

    def stop(self) -> None:
        """Ask the loop to finish the batches in flight, commit and return."""
        if not self._stopping.is_set():
            self._stop_requested_at = time.monotonic()
        self._stopping.set()

    async def run(self) -> None:
        """Consume until :meth:`stop`. Raises :class:`DlqLimitExceeded` to halt."""
        self._consumer.subscribe([self._span_topic, self._result_topic], listener=_Rebalance(self))
        sweeper = asyncio.create_task(self.sweeper.run(), name="evaljoin-sweeper")
        carry: Batch = {}
        try:
            while not self._stopping.is_set():
                batch = carry or await self._consumer.getmany(timeout_ms=500, max_records=self._max_batch)
                self._progressed()
                self._raise_if_delivery_failed()
                carry = {}
                if batch:
                    carry = await self._process_until_done(batch)  # the delivery stage commits
            await self._wait_for_delivery(self._stop_deadline - time.monotonic())
        finally:
            await cancel_and_wait(sweeper)
            if self._delivering is not None and not self._delivering.done():
                await cancel_and_wait(self._delivering)  # leaving on an error: its offsets stay uncommitted
            await self._committer.commit()

    # -- one batch ------------------------------------------------------------------------------

    async def _process_until_done(self, batch: Batch) -> Batch:
        """Process a batch, retrying it whole after transient failures; returns records fetched meanwhile."""
        carry: Batch = {}
        backoff = Backoff(STAGE_RETRY_FIRST_S, STAGE_RETRY_CAP_S)
        while True:
            self._work = asyncio.create_task(self._process(batch), name="evaljoin-batch")
            carry = _merge(carry, await self._keep_polling_while(self._work))
            try:
                self._work.result()
                self.batches_done += 1
                self.metrics.batches.inc()
                return carry
            except asyncio.CancelledError:
                log.warning("batch_abandoned", records=_count(batch))  # revoked or shutting down
                return {}
            except DlqLimitExceeded:
                raise
            except TRANSIENT as exc:
                if not await self._retry_later("batch", exc, backoff, records=_count(batch)):
                    return {}
            finally:
                self._work = None

    async def _retry_later(self, stage: str, exc: BaseException, backoff: Backoff, **context: Any) -> bool:
        """After a transient failure of a stage: wait and say True (do it again), or False when shutting down."""
        if self._stopping.is_set():
            log.warning(f"{stage}_abandoned_on_shutdown", error=repr(exc), **context)
            return False
        delay = backoff.next()
        log.warning(f"{stage}_retry", error=repr(exc), retry_in_s=round(delay, 2), **context)
        self.metrics.batch_retries.inc()
        await asyncio.sleep(delay)
        return True

    @property
    def _stop_deadline(self) -> float:
        """When a stop gives up on the work in flight (``time.monotonic()``, the event loop's clock)."""
        return self._stop_requested_at + self._shutdown_timeout

    async def _keep_polling_while(self, work: asyncio.Task[None]) -> Batch:
        fetched: Batch = {}
        paused: set[TopicPartition] = set()
        stop_waiter = asyncio.create_task(self._stopping.wait())
        try:
            while not work.done():
                # Once stopping, the stop waiter stays done: wait on the work alone, until the deadline,
                # or this loop would spin at full CPU for the whole shutdown timeout.
                waiters, timeout = {work, stop_waiter}, 1.0
                if self._stopping.is_set():
                    waiters = {work}
                    timeout = min(timeout, max(0.0, self._stop_deadline - time.monotonic()))
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if work.done():
                    break
                if self._stopping.is_set() and time.monotonic() >= self._stop_deadline:
                    await cancel_and_wait(work)
                    break
                # Keep the group membership alive without fetching more for the partitions we hold.
                assignment = set(self._consumer.assignment())
                self._consumer.pause(*assignment)
                self.metrics.paused.set(1)
                paused |= assignment
                # Paused partitions yield nothing (aiokafka drops what it prefetched for them and fetches it
                # again after resume); only a partition assigned meanwhile can, and at most a batch of it.
                fetched = _merge(fetched, await self._consumer.getmany(timeout_ms=0, max_records=self._max_batch))
                self._progressed()
        finally:
            stop_waiter.cancel()
            still_assigned = paused & set(self._consumer.assignment())
            if still_assigned:
                self._consumer.resume(*still_assigned)
            self.metrics.paused.set(0)
        return fetched

    async def _process(self, batch: Batch) -> None:
        """Join a batch, then hand it to the delivery stage once the previous batch is delivered."""
        with span("evaljoin.batch", records=_count(batch), partitions=len(batch)):
            joined = await self._join_records([record for records in batch.values() for record in records])
            previous = self._delivering
            if previous is not None:
                await previous  # its failure (the DLQ limit) is this batch's too; a cancel abandons both
            self._delivering = asyncio.create_task(self._deliver_until_done(batch, joined), name="evaljoin-deliver")

    async def _wait_for_delivery(self, timeout_s: float) -> None:
        """Let the delivery in flight finish (it retries on its own); cancel it after ``timeout_s``."""
        delivering = self._delivering
        if delivering is not None and not delivering.done():
            done, _ = await asyncio.wait({delivering}, timeout=max(0.0, timeout_s))
            if not done:
                log.warning("delivery_abandoned", timeout_s=round(timeout_s, 1))
                await cancel_and_wait(delivering)
        self._raise_if_delivery_failed()

    def _raise_if_delivery_failed(self) -> None:
        """A delivery's failure (the DLQ limit, or a defect) stops the service even when no batch follows."""
        delivering = self._delivering
        if delivering is not None and delivering.done() and not delivering.cancelled():
            error = delivering.exception()
            if error is not None:
                self._delivering = None
                raise error

    async def _deliver_until_done(self, batch: Batch, joined: list[Joined]) -> None:
        """Deliver a joined batch, retrying after transient failures; then its offsets may be committed."""
        backoff = Backoff(STAGE_RETRY_FIRST_S, STAGE_RETRY_CAP_S)
        while joined:
            try:
                with span("evaljoin.deliver", evaluations=len(joined)):
                    report = await self._deliverer.deliver(joined)
            except TRANSIENT as exc:
                if not await self._retry_later("delivery", exc, backoff, evaluations=len(joined)):
                    return
                continue
            log.info("batch_delivered", delivered=report.delivered, already_done=report.already_done,
                     dead_lettered=report.dead_lettered)
            break
        assigned = self._consumer.assignment()
        for tp, records in batch.items():
            if tp not in assigned:  # revoked meanwhile: its new owner redoes the batch, idempotently
                continue
            self._committer.finished(tp, records[-1].offset + 1)
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                self.metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, highwater - records[-1].offset - 1))
        await self._committer.commit()

    async def _join_records(self, records: Sequence[Any]) -> list[Joined]:
        """Decode every record, join the valid ones in one store call, then finish each in record order.

        The store keeps the order of one join key's events (a partition's order), and the outcomes
        (dead letters, the DLQ limit, metrics) are taken in record order, as if one by one.
        """
        decoded: list[SpanContextEvent | NemoResultEvent | InvalidMessage] = []
        for record in records:
            self.metrics.messages_consumed.labels(topic=record.topic).inc()
            decoded.append(self._decode(record))
        valid = [(event, _source(record)) for record, event in zip(records, decoded, strict=True)
                 if not isinstance(event, InvalidMessage)]
        outcomes = iter(await self._joiner.join_many(valid) if valid else [])
        joined: list[Joined] = []
        debug = log.is_enabled_for(logging.DEBUG)  # the per-record context costs more than the join itself
        for record, event in zip(records, decoded, strict=True):
            outcome = event if isinstance(event, InvalidMessage) else next(outcomes)
            kind = "span" if record.topic == self._span_topic else "result"
            if isinstance(outcome, InvalidMessage):
                with structlog.contextvars.bound_contextvars(**_context(record, event)):
                    await self._dead_letter(record, kind, outcome)
                continue
            self._dead_letters.record_valid()
            self.metrics.events.labels(kind=kind, outcome=outcome.status).inc()
            if debug:
                log.debug("message_joined", status=outcome.status, evaluations=len(outcome.joined),
                          **_context(record, event))
            joined.extend(outcome.joined)
        return joined

    def _decode(self, record: Any) -> SpanContextEvent | NemoResultEvent | InvalidMessage:
        headers = list(record.headers or ())
        decode = decode_span if record.topic == self._span_topic else decode_result
        try:
            return decode(record.value, headers, join_key=self._join_key, default_ml_app=self._default_ml_app,
                          max_bytes=self._max_bytes, key=record.key)
        except InvalidMessage as error:
            return error

    async def _dead_letter(self, record: Any, kind: str, error: InvalidMessage) -> None:
        log.warning("message_dead_lettered", reason=error.reason, detail=error.detail)
        self.metrics.events.labels(kind=kind, outcome="invalid").inc()
        # DeadLetters cuts a copy that would not fit in MAX_MESSAGE_BYTES (an oversize record, or one near the
        # limit plus the dead-letter headers), so that the DLQ topic always takes it.
        await self._dead_letters.invalid(key=record.key, value=record.value, headers=list(record.headers or ()),
                                         source=_source(record).as_dict(), error=error)

    # -- rebalance ------------------------------------------------------------------------------

    def _progressed(self) -> None:
        self.last_progress = time.time()
        self.metrics.last_progress.set(self.last_progress)

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.in_group = True
        self.metrics.assigned_partitions.set(len(assigned))
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

    async def ping_redis(self) -> bool:
        return await self._store.ping()

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        # in_group stays true: every member is revoked in every rebalance, and a whole workload turning
        # unready at once would stall rollouts and node drains for what is a normal, short pause.
        self.metrics.rebalances.inc()
        self.metrics.assigned_partitions.set(0)
        await self._finish_in_flight(revoked)
        await self._committer.commit()
        self._committer.forget(revoked)
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))


    async def _finish_in_flight(self, revoked: set[TopicPartition]) -> None:
        """Wait for the batch being joined and the delivery in flight; cancel what outlasts the timeout.

        A join that finishes hands its batch to a new delivery, so this waits again until nothing is
        in flight: a delivery left running would finish after the revoke, for partitions no longer ours.
        """
        deadline = time.monotonic() + self._shutdown_timeout
        while in_flight := {task for task in (self._work, self._delivering) if task is not None and not task.done()}:
            _, late = await asyncio.wait(in_flight, timeout=max(0.0, deadline - time.monotonic()))
            if late:
                log.warning("revoke_cancels_batch", partitions=len(revoked))
                for task in late:
                    await cancel_and_wait(task)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: Service) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._service.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._service.on_assigned(set(assigned))


class _ServiceContext:
    """Builds every client from the settings, and closes each one it opened, in reverse order."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Service:
        s = self._settings
        stack = self._stack
        try:
            kafka_common = s.kafka_client_options()
            producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=5,
                                        max_request_size=s.max_message_bytes + 65_536, **kafka_common)
            await producer.start()
            stack.push_async_callback(producer.stop)
            consumer = AIOKafkaConsumer(group_id=s.kafka_group_id, group_instance_id=s.kafka_group_instance_id,
                                        enable_auto_commit=False,
                                        auto_offset_reset="earliest",
                                        max_poll_interval_ms=s.kafka_max_poll_interval_ms,
                                        fetch_max_bytes=max(52_428_800, s.max_message_bytes * 2),
                                        max_partition_fetch_bytes=s.max_message_bytes + 65_536,
                                        fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,
                                        **kafka_common)
            await consumer.start()
            # Leaving the group can wait on a rebalance for as long as other members take to rejoin
            # (up to max.poll.interval); offsets are committed by then, so a shutdown does not wait on it.
            stack.push_async_callback(stop_within, consumer.stop, 10.0, "kafka consumer")
            client = await connect(s.redis_url.get_secret_value(), cluster=s.redis_cluster, **s.redis_client_options())
            stack.push_async_callback(client.aclose)
            store = RedisJoinStore(client, prefix=s.redis_key_prefix, shards=s.redis_deadline_shards,
                                   ledger_retention_ms=(s.join_ttl_seconds + s.ledger_grace_seconds) * 1000,
                                   max_pending_results=s.max_pending_results_per_key)
            metrics = Metrics()
            sink = HttpIntakeSink(url=s.intake_url, headers=s.intake_headers(), timeout_s=s.intake_timeout_seconds,
                                  metrics=metrics,
                                  max_batch=s.intake_batch_max_evals, max_body_bytes=s.intake_max_body_bytes,
                                  retry_initial_s=s.intake_retry_initial_seconds,
                                  retry_max_s=s.intake_retry_max_seconds, max_in_flight=s.intake_max_in_flight)
            stack.push_async_callback(sink.aclose)
        except BaseException:
            await stack.aclose()
            raise
        service = Service(consumer=consumer, producer=producer, store=store, sink=sink, settings=s, metrics=metrics)
        if s.health_port:
            try:
                await stack.enter_async_context(HealthServer(
                    host=s.health_host, port=s.health_port, metrics=metrics,
                    liveness_timeout_s=s.liveness_timeout_seconds, last_progress=lambda: service.last_progress,
                    in_group=lambda: service.in_group, redis_ping=service.ping_redis))
            except BaseException:
                await stack.aclose()
                raise
        return service

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


def _merge(a: Batch, b: Batch) -> Batch:
    if not b:
        return a
    out = {tp: list(records) for tp, records in a.items()}
    for tp, records in b.items():
        out.setdefault(tp, []).extend(records)
    return out


def _context(record: Any, event: SpanContextEvent | NemoResultEvent | InvalidMessage) -> dict[str, Any]:
    """What a log line about one record says about it."""
    context: dict[str, Any] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
    if not isinstance(event, InvalidMessage):
        context.update(ml_app=event.ml_app, join_key=event.join_key)
    return context


def _source(record: Any) -> Source:
    return Source(record.topic, record.partition, record.offset, record.timestamp)


def _count(batch: Batch) -> int:
    return sum(len(records) for records in batch.values())
