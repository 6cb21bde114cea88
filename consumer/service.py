"""The consume loop: Kafka batch -> decode -> join stage -> delivery stage -> commit.

Each ``getmany`` batch goes through two stages (:mod:`consumer.stage`), one batch per stage at a time:
the join stage decodes every record and joins it in the store (or dead-letters it), the delivery stage
sends what the batch completed; then the commit step records its offsets and commits. So at most two
batches are in flight, and while one batch is delivered the next is fetched and joined; a joined
batch waits for the delivery in flight, so one owner's deliveries never race and offsets are committed
in order. While a stage is full the assigned partitions are paused and the loop keeps polling, so
memory stays bounded and the group does not evict a consumer that waits on a slow intake.

On SIGTERM the loop stops fetching, lets the batches in flight finish (until ``SHUTDOWN_TIMEOUT_SECONDS``
after the signal; an unfinished batch is not committed), commits, and leaves the group. A revoke does the
same for the batches in flight, then commits, before the partitions go. Every step of the close is
bounded; should the process still not have closed ``STOP_DEADLINE_MARGIN_S`` after that timeout (a
blocking call, a task that ignores cancellation), :class:`StopDeadline` logs what every thread and task
was doing and exits at once with ``EXIT_STUCK``, committing nothing more, as a SIGKILL would.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
import threading
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from consumer.aio import Backoff, cancel_and_wait, stop_within
from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.commit import OffsetCommitter
from consumer.config import Settings
from consumer.decode import RecordDecoder
from consumer.deliver import Deliverer
from consumer.dlq import DeadLetters, DlqLimit
from consumer.errors import (
    DependencyError,
    ServiceRefused,
    Unavailable,
    kafka_errors,
    kafka_errors_logged,
    kafka_refusal,
    producer_start_errors,
    redis_errors,
)
from consumer.expiry import Sweeper
from consumer.health import HealthServer
from consumer.intake_route import RoutedSink, RouteSettings
from consumer.join import Batch, BatchJoin, JoinedBatch, Joiner, TagJoin
from consumer.kafka_records import install as read_any_record
from consumer.metrics import Metrics
from consumer.sink import EvaluationSink, HttpIntakeSink
from consumer.stage import RETRY_CAP_S, RETRY_FIRST_S, Refusals, Stage
from consumer.store import DeadlineIndex, JoinStore
from consumer.store_redis import (
    MemoryAlarm,
    RedisClient,
    RedisJoinStore,
    ReplicaAck,
    check_eviction,
    check_usable,
    connect,
    eviction_policy,
)
from consumer.store_redis import close as close_redis

log = structlog.get_logger(__name__)

FETCH_TIMEOUT_MS = 500  # how long one getmany waits for records when nothing is in flight
HOLD_CHECK_S = 1.0  # while a stage is full, how often the loop polls (keeping its group membership)
# The close after SHUTDOWN_TIMEOUT_SECONDS, step by step, stays within STOP_DEADLINE_MARGIN_S even when Kafka does
# not answer at all: the commits left share STOP_COMMIT_S, then the consumer and the producer stop, then Redis and
# the intake's client close (a dead TLS connection's close: up to its 5 s socket timeout).
STOP_COMMIT_S = 5.0
CONSUMER_STOP_TIMEOUT_S = 7.0  # leaving the group may wait on a rebalance; offsets are committed by then
PRODUCER_STOP_TIMEOUT_S = 6.0  # every dead letter and report was acknowledged before its offset was recorded
# A stop that has not closed the process this long after SHUTDOWN_TIMEOUT_SECONDS is stuck (below the Helm chart's
# shutdownMarginSeconds, 30 s by default, so that the log says what was stuck before the kubelet's SIGKILL).
STOP_DEADLINE_MARGIN_S = 25.0
EXIT_STUCK = 4  # the exit code when the stop deadline passed
RECORD_OVERHEAD_BYTES = 65_536  # a record's batch framing and headers beyond MAX_MESSAGE_BYTES
FETCH_MAX_BYTES = 52_428_800  # one fetch across partitions (Kafka's default), at least two records' worth
REVOKE_MARGIN_MS = 5_000  # a revoke's commit after its batches finish
PRODUCER_LINGER_MS = 5
# A Kafka connection idle this long is closed and opened anew on its next use, so that a connection that died
# silently while idle (half-open: the producer's, between dead letters) is never waited on for a request
# timeout. Busy connections (fetch, the coordinator's heartbeats every few seconds) are never idle this long.
CONNECTIONS_MAX_IDLE_MS = 5_000
STARTUP_RETRY_FIRST_S = 0.5  # a broker or cluster not reachable at start is tried again after this, doubling
STARTUP_RETRY_CAP_S = 15.0  # up to this  # dead letters and reports of one batch go out together
# The cyclic garbage collector while the loop runs. With Python's thresholds (700, 10, 10) it took a fifth of the
# process's CPU in the throughput benchmark (1.17 of 6.07 s for 20,000 pairs: 2,084 young, 189 middle and 17 full
# collections, each full one walking every object the start made: imported modules, clients, models). Those are
# frozen once the loop runs, and a young collection waits for GC_YOUNG_THRESHOLD more container objects allocated
# than freed (0.29 s of 5.39 s in the same drain, peak RSS unchanged); cycles (a task's exception and its
# traceback) are still collected.
GC_YOUNG_THRESHOLD = 10_000
GC_OLDER_THRESHOLDS = (10, 10)  # Python's: larger ones let cyclic garbage pile up (+20 MB peak RSS)


class Service:
    """One consumer process. Use ``async with Service.open(settings) as service: await service.run()``."""

    def __init__(self, *, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, store: JoinStore,
                 deadlines: DeadlineIndex, sink: EvaluationSink, settings: Settings, metrics: Metrics,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._consumer = consumer
        self._store = store
        self._topics = [settings.span_topic, settings.result_topic]
        self._max_batch = settings.kafka_max_batch
        self._shutdown_timeout = settings.shutdown_timeout_seconds
        self._clock = clock
        owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}".replace("|", "_")
        self.metrics = metrics
        self.refusals = Refusals(metrics)
        dead_letters = DeadLetters(producer, topic=settings.dlq_topic, metrics=metrics, limit=DlqLimit(
            max_invalid_ratio=settings.dlq_max_invalid_ratio, window=settings.dlq_window,
            max_consecutive=settings.dlq_max_consecutive_invalid), max_record_bytes=settings.max_message_bytes)
        decoder = RecordDecoder.from_settings(settings, metrics=metrics, clock=clock)
        join = BatchJoin(Joiner(store, join_ttl_ms=settings.join_ttl_seconds * 1000, clock=clock,
                                tag_join=TagJoin.from_settings(settings)), decoder, dead_letters, metrics)
        deliverer = Deliverer(store, sink, dead_letters, owner=owner, metrics=metrics, clock=clock,
                              lease_ms=int(settings.claim_lease_seconds * 1000))
        stopping = self._stopping = asyncio.Event()
        self._join: Stage[Batch, JoinedBatch] = Stage("join", join, metrics=metrics, refusals=self.refusals,
                                                      stopping=stopping.is_set, clock=clock)
        self._deliver: Stage[JoinedBatch, Batch] = Stage("delivery", deliverer.deliver_batch, metrics=metrics,
                                                         refusals=self.refusals, stopping=stopping.is_set,
                                                         clock=clock)
        self._committer = OffsetCommitter(consumer, metrics, clock=clock)
        self.sweeper = Sweeper(deadlines, producer, topic=settings.unmatched_topic,
                               interval_s=settings.sweep_interval_seconds, batch=settings.sweep_batch,
                               retry_later_ms=int(settings.claim_lease_seconds * 1000), metrics=metrics,
                               join_ttl_ms=settings.join_ttl_seconds * 1000, clock=clock)
        self._stop_deadline = float("inf")
        self.stop_guard = StopDeadline(settings.shutdown_timeout_seconds + STOP_DEADLINE_MARGIN_S)
        self._paused: set[TopicPartition] = set()
        self.batches_done = 0
        self.last_progress = clock.now_s()
        self.in_group = False

    @classmethod
    def open(cls, settings: Settings) -> _ServiceContext:
        return _ServiceContext(settings)

    def stop(self) -> None:
        """Ask the loop to finish the batches in flight, commit and return."""
        if not self._stopping.is_set():
            self._stop_deadline = self._clock.monotonic() + self._shutdown_timeout
            self._committer.end_commits_by(self._stop_deadline + STOP_COMMIT_S)
            self.stop_guard.arm()
            log.info("stop_requested", shutdown_timeout_s=self._shutdown_timeout,
                     exit_deadline_s=self.stop_guard.within_s)
        self._stopping.set()

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop`. Raises :class:`DlqLimitExceeded` to halt, and what no stage can wait out."""
        with _collector_tuned():
            await self._run()

    async def _run(self) -> None:
        self._consumer.subscribe(self._topics, listener=_Rebalance(self))
        sweeper = asyncio.create_task(self.sweeper.run(), name="evaljoin-sweeper")
        carry: Batch = {}
        fetch_backoff = Backoff(RETRY_FIRST_S, RETRY_CAP_S)
        try:
            while not self._stopping.is_set():
                await self._advance()
                if not self._join.has_room:
                    carry = _merge(carry, await self._hold())
                    continue
                self._resume()
                batch, carry = carry or await self._fetch(fetch_backoff), {}
                if batch:
                    self._join.submit(batch, records=_count(batch))
                elif self._idle():
                    await self._committer.catch_up()
            await self._finish_in_flight(self._stop_deadline)
        finally:
            await cancel_and_wait(sweeper)
            await self._join.close()
            await self._deliver.close()
            await self._committer.commit()

    async def _advance(self) -> None:
        """Move finished work one step on, last step first: delivered -> commit, joined -> delivery."""
        delivered = self._deliver.poll()
        if delivered is not None:
            self._committer.finished_batch(delivered)
            await self._committer.commit()
        self._join.check()  # a halt (the DLQ limit) need not wait for the delivery in flight
        if self._deliver.has_room:
            joined = self._join.poll()
            if joined is not None:
                self.batches_done += 1
                self.metrics.batches.inc()
                self._deliver.submit(joined, evaluations=len(joined.evaluations))

    async def _fetch(self, backoff: Backoff) -> Batch:
        """One ``getmany``; a broker that refuses this consumer (ACLs) makes it unready, not crash or spin."""
        fetch = asyncio.ensure_future(self._consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=self._max_batch))
        stop_waiter = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                # A delivery that ends while the fetch waits is committed now, not when the fetch returns.
                delivering = self._deliver.in_flight
                await asyncio.wait({fetch, stop_waiter} if delivering is None else {fetch, stop_waiter, delivering},
                                   return_when=asyncio.FIRST_COMPLETED)
                if fetch.done():
                    break
                if stop_waiter.done():
                    # getmany's timeout does not bound it while the group rebalances (aiokafka waits for the new
                    # assignment first), which lasts as long as the coordinator is unreachable: a stop must not
                    # wait for it. Nothing fetched is lost: a getmany cancelled mid-wait has handed out nothing.
                    await cancel_and_wait(fetch)
                    return {}
                await self._advance()
            with kafka_errors():
                batch: Batch = fetch.result()
        except DependencyError as exc:
            if not exc.retriable and not isinstance(exc, ServiceRefused):
                raise
            if isinstance(exc, ServiceRefused):
                self.refusals.refused("fetch", exc)
            delay = backoff.next()
            log.warning("fetch_retry", error=str(exc), retry_in_s=round(delay, 2))
            stop_waiter = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({stop_waiter}, timeout=delay)
            stop_waiter.cancel()
            return {}
        finally:
            stop_waiter.cancel()
            if not fetch.done():  # only when _advance raised (a halt): the loop is ending
                fetch.cancel()
        self.refusals.cleared("fetch")
        backoff.reset()
        self._progressed()
        return batch

    async def _hold(self) -> Batch:
        """While the join stage is full: wait for a stage to finish, polling paused partitions to stay in the group.

        The assigned partitions stay paused until the join stage has room again (:meth:`_resume`). Returns what a
        partition assigned meanwhile yielded (paused ones yield nothing: aiokafka drops what it prefetched for them
        and fetches it again after resume), at most a batch of it.
        """
        in_flight = {task for task in (self._join.in_flight, self._deliver.in_flight) if task is not None}
        stop_waiter = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({*in_flight, stop_waiter}, timeout=HOLD_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_waiter.cancel()
        if self._stopping.is_set() or any(task.done() for task in in_flight):
            return {}
        assignment = set(self._consumer.assignment())
        self._consumer.pause(*assignment)
        self._paused |= assignment
        self.metrics.paused.set(1)
        fetched: Batch = await self._consumer.getmany(timeout_ms=0, max_records=self._max_batch)
        self._progressed()
        return fetched

    def _resume(self) -> None:
        """Fetch again from the partitions :meth:`_hold` paused (those still assigned)."""
        if self._paused:
            still_assigned = self._paused & set(self._consumer.assignment())
            if still_assigned:
                self._consumer.resume(*still_assigned)
            self._paused = set()
            self.metrics.paused.set(0)

    async def _finish_in_flight(self, deadline: float) -> None:
        """Let the batches in flight finish, passing each on to the commit step; cancel what outlasts ``deadline``.

        A joined batch is handed to the delivery stage as the one before it ends, so this waits until nothing is
        left in either stage: a delivery left running would finish after a revoke, for partitions no longer ours.
        """
        while True:
            await self._advance()
            in_flight = {task for task in (self._join.in_flight, self._deliver.in_flight) if task is not None}
            if not in_flight and self._join.has_room and self._deliver.has_room:
                return
            if self._clock.monotonic() >= deadline:
                await self._join.join(deadline)  # cancels: past the deadline
                await self._deliver.join(deadline)
                await self._advance()
                return
            if in_flight:
                await asyncio.wait(in_flight, timeout=max(0.0, deadline - self._clock.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)

    def _idle(self) -> bool:
        """No batch in either stage: every record fetched so far is finished."""
        return self._join.has_room and self._deliver.has_room and not self._stopping.is_set()

    def _progressed(self) -> None:
        self.last_progress = self._clock.now_s()
        self.metrics.last_progress.set(self.last_progress)

    # -- rebalance ------------------------------------------------------------------------------

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.in_group = True
        self.metrics.assigned_partitions.set(len(assigned))
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        # in_group stays true: every member is revoked in every rebalance, and a whole workload turning
        # unready at once would stall rollouts and node drains for what is a normal, short pause.
        self.metrics.rebalances.inc()
        self.metrics.assigned_partitions.set(0)
        await self._finish_in_flight(min(self._stop_deadline, self._clock.monotonic() + self._shutdown_timeout))
        await self._committer.commit()
        self._committer.forget(revoked)
        log.info("partitions_revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))

    # -- health ---------------------------------------------------------------------------------

    async def ping_redis(self) -> bool:
        return await self._store.ping()

    def not_ready_because(self) -> str | None:
        """Why the service should not be ready, besides group membership and Redis: a dependency refusing it."""
        return self.refusals.reason()


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
        self._service: Service | None = None

    async def __aenter__(self) -> Service:
        try:
            self._service = await self._open(self._settings, self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        return self._service

    @staticmethod
    async def _open(s: Settings, stack: AsyncExitStack) -> Service:
        kafka_common = s.kafka_client_options()
        read_any_record()  # a record aiokafka cannot parse reaches the decode step instead of stopping getmany
        producer = AIOKafkaProducer(acks="all", enable_idempotence=s.kafka_enable_idempotence,
                                    linger_ms=PRODUCER_LINGER_MS, request_timeout_ms=s.kafka_request_timeout_ms,
                                    connections_max_idle_ms=CONNECTIONS_MAX_IDLE_MS,
                                    max_request_size=s.max_message_bytes + RECORD_OVERHEAD_BYTES, **kafka_common)
        # Before start: a start cut short (a signal) closes what it opened.
        stack.push_async_callback(stop_within, producer.stop, PRODUCER_STOP_TIMEOUT_S, "kafka producer")
        await _started(producer.start, "kafka producer", idempotent=s.kafka_enable_idempotence)
        consumer = AIOKafkaConsumer(group_id=s.kafka_group_id, group_instance_id=s.kafka_group_instance_id,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    max_poll_interval_ms=s.kafka_max_poll_interval_ms,
                                    fetch_max_bytes=max(FETCH_MAX_BYTES, s.max_message_bytes * 2),
                                    max_partition_fetch_bytes=s.max_message_bytes + RECORD_OVERHEAD_BYTES,
                                    fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,
                                    fetch_min_bytes=s.kafka_fetch_min_bytes,
                                    session_timeout_ms=s.kafka_session_timeout_ms,
                                    # A revoke waits for the batches in flight for up to SHUTDOWN_TIMEOUT_SECONDS: the
                                    # group must wait as long before it drops this member (aiokafka's default is the
                                    # session timeout, 10 s, which would evict a member finishing a slow delivery).
                                    rebalance_timeout_ms=max(s.kafka_session_timeout_ms,
                                                             int(s.shutdown_timeout_seconds * 1000) + REVOKE_MARGIN_MS),
                                    heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
                                    request_timeout_ms=s.kafka_request_timeout_ms,
                                    connections_max_idle_ms=CONNECTIONS_MAX_IDLE_MS, **kafka_common)
        stack.push_async_callback(stop_within, consumer.stop, CONSUMER_STOP_TIMEOUT_S, "kafka consumer")
        await _started(consumer.start, "kafka consumer")
        target = s.redis_target()
        client = await _connected(lambda: connect(target, cluster=s.redis_cluster, **s.redis_client_options()))
        stack.push_async_callback(close_redis, client)  # a dead TLS connection must not fail the stop
        # A certificate that does not verify, or REDIS_URL leading to a replica: refused (exit 2), naming the setting.
        await check_usable(client, target)
        # An evicting Redis drops buffered sides without an error: refused (exit 2) unless REDIS_ALLOW_EVICTION.
        check_eviction(await eviction_policy(client), allow=s.redis_allow_eviction)
        metrics = Metrics(app_labels=s.app_metric_labels())
        memory = MemoryAlarm(metrics)  # a full Redis (noeviction) holds the stream; /readyz says so
        store = RedisJoinStore(client, prefix=s.redis_key_prefix, shards=s.redis_deadline_shards,
                               ledger_retention_ms=(s.join_ttl_seconds + s.ledger_grace_seconds) * 1000,
                               max_pending_results=s.max_pending_results_per_key, memory=memory,
                               replica_ack=ReplicaAck(s.redis_wait_replicas, s.redis_wait_timeout_ms),
                               quotas=s.app_quotas_limits())
        sink = RoutedSink(RouteSettings.from_settings(s), open_sink=lambda route: HttpIntakeSink(
            url=route.url, headers=route.headers, transport=route.transport(), timeout_s=s.intake_timeout_seconds,
            metrics=metrics, max_batch=s.intake_batch_max_evals, max_body_bytes=s.intake_max_body_bytes,
            retry_initial_s=s.intake_retry_initial_seconds, retry_max_s=s.intake_retry_max_seconds,
            max_in_flight=s.intake_max_in_flight))
        stack.push_async_callback(sink.aclose)
        service = Service(consumer=consumer, producer=producer, store=store, deadlines=store, sink=sink,
                          settings=s, metrics=metrics)
        await sink.start(service.refusals)  # agentless or the Agent, as ddtrace decides; no route: not ready
        if s.health_port:
            await stack.enter_async_context(HealthServer(
                host=s.health_host, port=s.health_port, metrics=metrics,
                liveness_timeout_s=s.liveness_timeout_seconds, last_progress=lambda: service.last_progress,
                in_group=lambda: service.in_group, redis_ping=service.ping_redis,
                not_ready_because=lambda: service.not_ready_because() or memory.reason()))
        return service

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._stack.aclose()
        finally:
            if self._service is not None:
                self._service.stop_guard.disarm()  # closed: what remains is the caller's


class StopDeadline:
    """The last resort of a stop: past ``within_s`` from :meth:`arm`, log every thread's and task's stack and exit.

    It runs in a thread of its own, so an event loop blocked by a call that never returns cannot keep it from
    firing. Exiting at once (``os._exit``) commits nothing more, as a SIGKILL would: every batch whose offsets
    were not committed yet is delivered again, and what of it was delivered is recognised in the ledger.
    """

    def __init__(self, within_s: float, *, exit_process: Callable[[int], object] = os._exit) -> None:
        self.within_s = within_s
        self._exit = exit_process
        self._disarmed = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self) -> None:
        """Start counting (from the event loop's thread); arming again changes nothing."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._watch, name="evaljoin-stop-deadline", daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        self._disarmed.set()

    def _watch(self) -> None:
        if self._disarmed.wait(self.within_s):
            return
        try:
            log.error("stop_deadline_passed", within_s=self.within_s, exit_code=EXIT_STUCK,
                      tasks=_task_stacks(self._loop), threads=_thread_stacks())
        finally:
            sys.stderr.flush()
            self._exit(EXIT_STUCK)


def _thread_stacks() -> dict[str, str]:
    """Every thread's stack but the watcher's, innermost call last."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return {f"{names.get(ident, '?')} ({ident})": "".join(traceback.format_stack(frame, limit=25))
            for ident, frame in sys._current_frames().items() if ident != threading.get_ident()}


def _task_stacks(loop: asyncio.AbstractEventLoop | None) -> dict[str, list[str]] | str:
    """Where each asyncio task of ``loop`` waits (its chain of awaits, outermost first), read from another thread:
    best effort, as the loop may run on meanwhile."""
    if loop is None:
        return {}
    try:
        return {task.get_name(): _awaits(task.get_coro()) for task in asyncio.all_tasks(loop)}
    except Exception as exc:  # noqa: BLE001 - the loop changed under us; the threads' stacks still tell
        return f"unavailable: {exc!r}"


def _awaits(coro: object) -> list[str]:
    chain: list[str] = []
    while coro is not None and len(chain) < 50:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return chain


async def _started(start: Callable[[], Awaitable[None]], component: str, *, idempotent: bool = False) -> None:
    """Start a Kafka client, waiting out a broker that cannot be reached yet (a pod starting while Kafka restarts):
    retried with backoff and logged, until it answers or a signal cancels the start. Anything else is raised."""
    backoff = Backoff(STARTUP_RETRY_FIRST_S, STARTUP_RETRY_CAP_S)
    while True:
        try:
            with kafka_errors_logged() as reasons, kafka_errors(), producer_start_errors(idempotent=idempotent):
                await start()
            return
        except Unavailable as exc:
            refused = kafka_refusal(reasons)  # the brokers answered and refused us: waiting will not help
            if refused is not None:
                raise refused from exc
            delay = backoff.next()
            log.warning("startup_retry", component=component, error=str(exc), retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)


async def _connected(connect_: Callable[[], Awaitable[RedisClient]]) -> RedisClient:
    """:func:`connect`, waiting out a Redis Cluster that cannot be reached yet, as :func:`_started` does for Kafka."""
    backoff = Backoff(STARTUP_RETRY_FIRST_S, STARTUP_RETRY_CAP_S)
    while True:
        try:
            with redis_errors():
                return await connect_()
        except Unavailable as exc:
            delay = backoff.next()
            log.warning("startup_retry", component="redis", error=str(exc), retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)


@contextmanager
def _collector_tuned() -> Iterator[None]:
    """The garbage collector as the consume loop wants it (see GC_YOUNG_THRESHOLD); as it was, afterwards."""
    before = gc.get_threshold()
    gc.freeze()  # what the start made stays: never walked by a collection
    gc.set_threshold(GC_YOUNG_THRESHOLD, *GC_OLDER_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _merge(a: Batch, b: Batch) -> Batch:
    if not b:
        return a
    out = {tp: list(records) for tp, records in a.items()}
    for tp, records in b.items():
        out.setdefault(tp, []).extend(records)
    return out


def _count(batch: Batch) -> int:
    return sum(len(records) for records in batch.values())
