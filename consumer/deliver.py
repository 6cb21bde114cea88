"""The delivery step: joined evaluations -> the intake, exactly once in effect.

For each evaluation the delivery ledger in the join store is consulted first: one already
delivered or dead-lettered is skipped; one another consumer is sending right now (a live claim) is
waited for. The rest are claimed, sent through the sink, and recorded as delivered as soon as the
intake answered their request 2xx (each request on its own, before its slot sends another), or as
dead-lettered once the intake refused them and the dead-letter topic acknowledged them. A return
from :meth:`Deliverer.deliver` means every evaluation given is finished.

A duplicate can only come from a crash after the intake answered a request 2xx and before the ledger
recorded that request; the re-sent payload is then byte-identical. A ledger write that fails (the
store is unavailable) does not re-send: the evaluations the intake accepted are kept in memory, and
the batch's next try records them instead of sending them again.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.dlq import DeadLetters
from consumer.errors import DependencyError
from consumer.join import Batch, Joined, JoinedBatch
from consumer.metrics import Metrics
from consumer.sink import EvaluationSink
from consumer.store import JoinStore, Namespace, Settle
from consumer.tracing import span

log = structlog.get_logger(__name__)

BUSY_POLL_S = 0.5  # how often evaluations another consumer is sending (a live claim) are looked at again


@dataclass
class DeliveryReport:
    delivered: int = 0
    already_done: int = 0
    dead_lettered: int = 0


class Deliverer:
    def __init__(self, store: JoinStore, sink: EvaluationSink, dead_letters: DeadLetters, *, owner: str,
                 lease_ms: int, metrics: Metrics, busy_poll_s: float = BUSY_POLL_S,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._store = store
        self._sink = sink
        self._dead_letters = dead_letters
        self._owner = owner
        self._lease_ms = lease_ms
        self._busy_poll_s = busy_poll_s
        self._metrics = metrics
        self._clock = clock
        # Evaluations of the delivery in flight that the intake accepted but whose ledger record failed, by id.
        # One delivery runs at a time (the delivery stage holds one batch), so this holds one batch at most.
        self._unrecorded: dict[str, Joined] = {}

    async def deliver_batch(self, joined: JoinedBatch) -> Batch:
        """The delivery stage's work: every evaluation a batch completed, delivered or dead-lettered.

        Returns the batch, for the commit step. Idempotent: a batch delivered again finds its evaluations
        in the ledger (``already_done``) and sends nothing twice.
        """
        if joined.evaluations:
            with span("evaljoin.deliver", evaluations=len(joined.evaluations)):
                report = await self.deliver(joined.evaluations)
            log.info("batch_delivered", delivered=report.delivered, already_done=report.already_done,
                     dead_lettered=report.dead_lettered)
        return joined.batch

    async def deliver(self, joined: Sequence[Joined]) -> DeliveryReport:
        report = DeliveryReport()
        everything = _unique(joined)
        ids = {item.eval_id for item in everything}  # a batch given up on (revoked) is not remembered
        self._unrecorded = {eval_id: item for eval_id, item in self._unrecorded.items() if eval_id in ids}
        # The buffered copies of these results may go once every evaluation is finished (by us or by
        # another consumer); not earlier, or a crash would lose the rest of a result.
        buffered = [item for item in everything if item.buffered]
        waiting = everything
        while waiting:
            claimed, busy = await self._claim(waiting, report)
            last = not busy
            accepted_before = [item for item in claimed if item.eval_id in self._unrecorded]
            if accepted_before:  # the intake accepted these on an earlier try; only their record failed
                claimed = [item for item in claimed if item.eval_id not in self._unrecorded]
                log.info("delivery_recorded_without_resend", evaluations=len(accepted_before))
                await self._record_delivered(accepted_before, report)
            if claimed:
                await self._send(claimed, report, drop_from=buffered if last else ())
            elif last:
                await self._settle([], [], drop_from=buffered)
            if busy:
                log.info("delivery_waits_for_other_consumer", evaluations=len(busy))
                await asyncio.sleep(self._busy_poll_s)
            waiting = busy
        self._unrecorded.clear()  # every evaluation is finished: what was remembered is recorded, or done
        self._metrics.evaluations.labels(outcome="delivered").inc(report.delivered)
        self._metrics.evaluations.labels(outcome="already_delivered").inc(report.already_done)
        self._metrics.evaluations.labels(outcome="rejected").inc(report.dead_lettered)
        return report

    async def _claim(self, items: list[Joined], report: DeliveryReport) -> tuple[list[Joined], list[Joined]]:
        by_ns: dict[Namespace, list[Joined]] = defaultdict(list)
        for item in items:
            by_ns[item.namespace].append(item)
        now_ms = self._clock.now_ms()
        verdicts = await self._store.claim_many([(ns, [i.eval_id for i in group]) for ns, group in by_ns.items()],
                                                owner=self._owner, now_ms=now_ms, lease_ms=self._lease_ms)
        claimed: list[Joined] = []
        busy: list[Joined] = []
        for group, group_verdicts in zip(by_ns.values(), verdicts, strict=True):
            for item, verdict in zip(group, group_verdicts, strict=True):
                if verdict == "new":
                    claimed.append(item)
                elif verdict == "busy":
                    busy.append(item)
                else:
                    report.already_done += 1
        return claimed, busy

    async def _send(self, items: list[Joined], report: DeliveryReport, *, drop_from: Sequence[Joined]) -> None:
        unrecorded: list[DependencyError] = []
        reported: set[int] = set()

        async def accepted(indexes: Sequence[int]) -> None:
            """One request answered 2xx: record its evaluations now, so a crash later does not send them again."""
            reported.update(indexes)
            done = [items[i] for i in indexes]
            now_ms = self._clock.now_ms()
            for item in done:
                self._metrics.join_latency_seconds.observe(max(0.0, (now_ms - item.first_seen_ms) / 1000))
                self._unrecorded[item.eval_id] = item
            try:
                await self._record_delivered(done, report)
            except DependencyError as exc:  # kept in memory; the other requests in flight go on
                unrecorded.append(exc)

        rejections = {r.index: r for r in await self._sink.send([item.metric for item in items], accepted=accepted)}
        await asyncio.gather(*(
            self._dead_letters.rejected(key=_key(items[i]), metric=items[i].metric, source=items[i].source,
                                        status=r.status, body=r.body)
            for i, r in rejections.items()
        ))
        for i, r in rejections.items():
            source = items[i].source
            log.warning("evaluation_dead_lettered", topic=source.get("topic"), partition=source.get("partition"),
                        offset=source.get("offset"), ml_app=items[i].namespace.ml_app,
                        join_key=items[i].namespace.join_key, label=items[i].label, status=r.status)
        if unrecorded:  # the batch is done again; no result is dropped before its evaluations are recorded
            raise unrecorded[0]
        # A sink that reports no request (a return means all but the rejections were accepted) is recorded here.
        unreported = [i for i in range(len(items)) if i not in rejections and i not in reported]
        if unreported:
            await accepted(unreported)
            if unrecorded:
                raise unrecorded[0]
        dead = [items[i] for i in rejections]
        app = self._metrics.app
        for item in dead:
            self._metrics.app_dead_letters.labels(ml_app=app(item.namespace.ml_app), reason="intake_rejected").inc()
        await self._settle([], dead, drop_from=drop_from)
        report.dead_lettered += len(dead)

    async def _record_delivered(self, items: list[Joined], report: DeliveryReport) -> None:
        await self._settle(items, [], drop_from=())
        for item in items:
            self._unrecorded.pop(item.eval_id, None)
        # One labelled increment per app, not per evaluation: this runs for every intake request.
        for ml_app, count in Counter(self._metrics.app(item.namespace.ml_app) for item in items).items():
            self._metrics.app_evaluations_delivered.labels(ml_app=ml_app).inc(count)
        report.delivered += len(items)

    async def _settle(self, delivered: list[Joined], dead: list[Joined], *, drop_from: Sequence[Joined]) -> None:
        """Record finished evaluations and drop finished results: one store call."""
        delivered_ids: dict[Namespace, list[str]] = defaultdict(list)
        dead_ids: dict[Namespace, list[str]] = defaultdict(list)
        drops: dict[Namespace, dict[str, None]] = defaultdict(dict)  # ordered, without repeats
        for item in delivered:
            delivered_ids[item.namespace].append(item.eval_id)
        for item in dead:
            dead_ids[item.namespace].append(item.eval_id)
        for item in drop_from:
            drops[item.namespace][item.event_id] = None
        namespaces = dict.fromkeys([*delivered_ids, *dead_ids, *drops])
        if namespaces:
            await self._store.settle_many([Settle(ns, delivered_ids.get(ns, []), dead_ids.get(ns, []),
                                                  list(drops.get(ns, {}))) for ns in namespaces])


def _key(item: Joined) -> bytes:
    return f"{item.namespace.ml_app}:{item.namespace.join_key}".encode()


def _unique(joined: Sequence[Joined]) -> list[Joined]:
    """Each evaluation once, buffered if any copy is: a result joined directly and released by its span in one
    batch (a redelivery) is still dropped from the buffer once delivered, instead of waiting there for its deadline."""
    out: dict[str, Joined] = {}
    for item in joined:
        first = out.setdefault(item.eval_id, item)
        if item.buffered and not first.buffered:
            out[item.eval_id] = first._replace(buffered=True)
    return list(out.values())
