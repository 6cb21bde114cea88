"""The join step: a decoded event goes into the join store; what it completes comes out.

A span-context event is buffered (it stays for ``join_ttl`` so that later results still join) and
releases every result that waited for it; a result event joins its span at once if the span is
buffered, else waits. A namespace is the event's ml_app, join key and run; without a run, the
store's repeated-key rule (:meth:`consumer.store.JoinStore.put_many`) keeps a key answered again
from getting another answer's evaluations, by the slots (label and tags) of each result's
evaluations. The output is a list of :class:`Joined` evaluations for the delivery step.

An ml_app over its buffer quota (:class:`consumer.store.AppQuotas`) gets its sides that would wait without
joining anything refused (``quota``): each such record is dead-lettered as it is, with reason
``app_quota_exceeded``, counted as valid input (it does not move the DLQ's halt limits), and the batch goes on:
the other apps' records in it are joined as if the app were quiet. ``replay-dlq --reason app_quota_exceeded``
publishes them again once the app's buffer has room.

An ml_app that joins by span tag (:class:`TagJoin`, from ``JOIN_BY_TAG``) tags its spans with the join
key, so a result of it needs no span-context event: one whose span is not buffered is delivered at
once, joined on the span tag, instead of waiting. Its spans, when it publishes them, are buffered and
joined as any app's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from consumer import records
from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.config import Settings, parse_join_by_tag
from consumer.decode import Event, RecordDecoder
from consumer.dlq import DeadLetters
from consumer.errors import InvalidMessage, NotSent
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.metrics import Metrics
from consumer.payload import build_metric, encode_metric, evaluation_id
from consumer.store import JoinStore, Namespace, ResultOp, ResultPut, SpanOp, SpanPut, evaluation_slot
from consumer.tracing import span

log = structlog.get_logger(__name__)

Batch = dict[Any, list[Any]]  # one getmany(): TopicPartition -> its records, in offset order


# Source, Joined and JoinResult are built per record or per evaluation: NamedTuples (see consumer.store's SpanOp).
class Source(NamedTuple):
    """Where a record came from: for dead-letter headers, deadlines and logs."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "timestamp_ms": self.timestamp_ms}


class Joined(NamedTuple):
    """One evaluation, joined to its span and encoded for the intake."""

    namespace: Namespace
    eval_id: str
    event_id: str
    label: str
    metric: bytes
    source: dict[str, Any]  # the result record's origin
    buffered: bool  # the result waited in the store and must be dropped from it once delivered
    first_seen_ms: int  # when the earlier of the two sides was produced (for the join latency)


@dataclass(frozen=True)
class JoinedBatch:
    """A batch whose every record is buffered, joined or dead-lettered: what the delivery stage takes."""

    batch: Batch
    evaluations: list[Joined]


class JoinResult(NamedTuple):
    status: str  # stored | replaced | duplicate | joined | buffered | waiting | tagged
    joined: list[Joined]


QUOTA_REASON = "app_quota_exceeded"
# Results go to the store without their record (encoded only if they are to be stored) while fewer than this share
# of recent results were stored: a record put again costs a second look-up in Redis, encoding one costs more.
DEFER_BELOW_STORED_SHARE = 0.75
STORED_SHARE_WEIGHT = 0.2  # the moving average's weight of each batch


@dataclass(frozen=True)
class OverQuota:
    """A side refused by its ml_app's buffer quota: reported on the DLQ with its reason, not bad input."""

    detail: str


def default_tag_value(join_key: str, run: str | None = None) -> str:
    """The tag value a result joins on when ``JOIN_TAG_VALUE`` is unset: the join key, or ``<run>:<join_key>`` in a
    run (a bare join key names the answer of every run over the dataset). Apps tag their spans with it."""
    return f"{run}:{join_key}" if run else join_key


_PLACEHOLDER = re.compile(r"\{(join_key|run_id|ml_app)\}")


@dataclass(frozen=True)
class TagJoin:
    """Which ml_apps join by span tag, and the tag (``join_on.tag``) a result of theirs is joined on.

    The key is the app's own (``JOIN_BY_TAG=app=key``), else ``JOIN_TAG_KEY``, else the join key's name. The
    value is ``JOIN_TAG_VALUE`` with ``{join_key}``, ``{run_id}`` and ``{ml_app}`` filled in; unset, it is the
    join key, or ``<run_id>:<join_key>`` for a result with a run, so that the tag names one answer of one run.
    """

    apps: Mapping[str, str]  # ml_app -> its tag key
    every_app: str | None  # the tag key of every other ml_app ("*"); None: only those named join by tag
    value_template: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TagJoin | None:
        """The tag join ``JOIN_BY_TAG`` asks for, or None when it is unset (every ml_app joins by span ids)."""
        if settings.join_by_tag is None:
            return None
        default_key = settings.join_tag_key or settings.join_key
        apps = {app: key or default_key for app, key in parse_join_by_tag(settings.join_by_tag).items()}
        return cls(apps={app: key for app, key in apps.items() if app != "*"}, every_app=apps.get("*"),
                   value_template=settings.join_tag_value)

    def key_for(self, ml_app: str) -> str | None:
        """The tag key ``ml_app``'s results join on, or None if it joins by span ids only."""
        return self.apps.get(ml_app, self.every_app)

    def value_for(self, ns: Namespace) -> str | None:
        """The tag value of a result in ``ns``; None if the template names a run and the result has none."""
        if self.value_template is None:
            return default_tag_value(ns.join_key, ns.run)
        if not ns.run and "{run_id}" in self.value_template:
            return None
        fields = {"join_key": ns.join_key, "run_id": ns.run, "ml_app": ns.ml_app}
        return _PLACEHOLDER.sub(lambda found: fields[found.group(1)], self.value_template)

    def tag_of(self, ns: Namespace) -> tuple[str, str] | None:
        """(key, value) a result in ``ns`` joins on when its span is not here, or None: it waits for its span."""
        key = self.key_for(ns.ml_app)
        if key is None:
            return None
        value = self.value_for(ns)
        return None if value is None else (key, value)


class Joiner:
    def __init__(self, store: JoinStore, *, join_ttl_ms: int, clock: Clock = SYSTEM_CLOCK,
                 tag_join: TagJoin | None = None) -> None:
        self._store = store
        self._ttl_ms = join_ttl_ms
        self._clock = clock
        self._tag_join = tag_join
        self._stored_share = 0.0  # moving average of the share of results stored (not joined at once)

    def _produced_ms(self, source: Source) -> int:
        """When the record was produced (its Kafka timestamp; now, for a record without one)."""
        return source.timestamp_ms if source.timestamp_ms > 0 else self._clock.now_ms()

    def _deadline(self, source: Source) -> int:
        # Counted from the Kafka record's timestamp, so a redelivered record keeps its deadline.
        return self._produced_ms(source) + self._ttl_ms

    async def join_many(self, items: Sequence[tuple[SpanContextEvent | NemoResultEvent, Source]],
                        ) -> list[JoinResult | InvalidMessage | OverQuota]:
        """Join a batch of events with one store call; per event, its result or why it is invalid.

        Events of one join key are stored in the order given, so a batch joins as its events one by one.
        """
        ops: list[SpanOp | ResultOp] = []
        fields_of: list[dict[str, Any]] = []
        tags: list[tuple[str, str] | None] = []  # per op: the span tag a result joins on without its span
        tag_join = self._tag_join
        # A result is encoded only if it is to be stored: one that is its key's only event in the batch goes
        # first without its record ("later" if its span is not here, then again with it), while most results
        # find their span. Order within a key is kept: a key with other events in the batch is encoded at once.
        defer = self._stored_share < DEFER_BELOW_STORED_SHARE
        keys = collections.Counter((e.ml_app, e.join_key, e.run_id) for e, _ in items) if defer else None
        for event, source in items:
            assert event.ml_app is not None  # resolved by decode
            ns = Namespace(event.ml_app, event.join_key, event.run_id or "")
            fields = {**event.model_dump(mode="json", exclude={"schema_version", "kind"}, exclude_none=True),
                      "source": source.as_dict()}
            tag = None if tag_join is None else tag_join.tag_of(ns)
            tags.append(tag)
            if isinstance(event, SpanContextEvent):
                ops.append(SpanOp(ns, records.span_identity(event.trace_id, event.span_id), records.encode_span(fields),
                                  self._deadline(source), by_tag=tag is not None))
            else:
                fields["received_ts_ms"] = self._produced_ms(source)
                eval_ids = [evaluation_id(ns.ml_app, ns.join_key, event.event_id, i, ns.run)
                            for i in range(len(event.evaluations))]
                # A run names the answer; without one, the slots say which evaluations an answer has.
                origin = None if event.provenance is None else event.provenance.model_dump(
                    exclude={"job_id", "evaluated_at_ms"}, exclude_none=True)
                slots = () if ns.run else sorted({evaluation_slot(e.label, e.tags, origin) for e in event.evaluations})
                deferred = keys is not None and keys[event.ml_app, event.join_key, event.run_id] == 1
                ops.append(ResultOp(ns, event.event_id, b"" if deferred else records.encode(fields), eval_ids,
                                    self._deadline(source), slots, by_tag=tag is not None))
            fields_of.append(fields)
        puts = await self._store.put_many(ops) if ops else []
        later = [i for i, put in enumerate(puts) if put.status == "later"]
        if later:  # their spans are not here: put them again, encoded
            again = [ops[i]._replace(record=records.encode(fields_of[i])) for i in later]
            for i, op, put in zip(later, again, await self._store.put_many(again), strict=True):
                ops[i], puts[i] = op, put
        results = [put.status for put in puts if isinstance(put, ResultPut)]
        if results:  # how many results are stored rather than joined, recently: whether deferring pays
            stored = sum(status in ("buffered", "waiting") for status in results) / len(results)
            self._stored_share += (stored - self._stored_share) * STORED_SHARE_WEIGHT
        return [_outcome(op, put, record, tag)
                for op, put, record, tag in zip(ops, puts, fields_of, tags, strict=True)]


def _outcome(op: SpanOp | ResultOp, put: SpanPut | ResultPut, record: dict[str, Any],
             tag: tuple[str, str] | None = None) -> JoinResult | InvalidMessage | OverQuota:
    ns = op.ns
    if put.status == "quota":
        side = "span" if isinstance(put, SpanPut) else "result"
        return OverQuota(f"ml_app {ns.ml_app!r} holds its buffer quota (APP_QUOTA_SIDES, APP_QUOTA_BYTES, "
                         f"APP_QUOTAS): this {side} of {_name(ns)} would wait without joining anything; replay "
                         "this record once the app's buffer has room")
    if isinstance(put, SpanPut):
        if put.status == "conflict":
            existing = records.decode_span(put.existing, ns) if put.existing else {}
            bound = (f"{_name(ns)} is already bound to span {existing.get('span_id')} of trace "
                     f"{existing.get('trace_id')}")
            if ns.run:
                return InvalidMessage("join_key_conflict", f"{bound}; a join key names one span in a run")
            return InvalidMessage(
                "join_key_conflict",
                f"{bound}, which has no evaluation yet (or the answer it replaced has evaluations still being "
                "delivered): which answer a later result is for cannot be told. Give the events a run_id, or "
                "replay this record once that span has its evaluations",
            )
        # On "duplicate" the stored span has the same identity, so this record joins the same way.
        joined: list[Joined] = []
        for _event_id, result_record in sorted(put.pending.items()):
            joined.extend(_joined(ns, record, records.decode(result_record, ns), buffered=True))
        return JoinResult(put.status, joined)
    assert isinstance(op, ResultOp)
    if put.status == "full":
        return InvalidMessage(
            "too_many_pending_results",
            f"{_name(ns)} already has MAX_PENDING_RESULTS_PER_KEY results waiting for its span; "
            "replay this record once the span has arrived",
        )
    if put.status == "tagged":
        assert tag is not None
        # "buffered": a copy of it may have waited here from before (it is then dropped once delivered).
        return JoinResult("tagged", _joined(ns, tagged_span(ns, *tag), record, buffered=True, eval_ids=op.eval_ids))
    if put.status != "joined":
        return JoinResult(put.status, [])
    assert put.span is not None
    return JoinResult("joined", _joined(ns, records.decode_span(put.span, ns), record, buffered=False,
                                        eval_ids=op.eval_ids))


def tagged_span(ns: Namespace, key: str, value: str) -> dict[str, Any]:
    """What stands for the span of a result joined by span tag: the ml_app and the tag (see payload.join_on)."""
    return {"ml_app": ns.ml_app, "join_tag": {"key": key, "value": value}}


def _name(ns: Namespace) -> str:
    """A namespace for a message: ``ml_app/join_key``, and ``(run <run>)`` with a run."""
    return f"{ns.ml_app}/{ns.join_key}" + (f" (run {ns.run})" if ns.run else "")


def _joined(ns: Namespace, span: dict[str, Any], result: dict[str, Any], *, buffered: bool,
            eval_ids: Sequence[str] = ()) -> list[Joined]:
    """The result's evaluations joined to the span; ``eval_ids``, if the caller has them, are their ids."""
    ids = eval_ids or [evaluation_id(ns.ml_app, ns.join_key, result["event_id"], index, ns.run)
                       for index in range(len(result["evaluations"]))]
    return [
        Joined(
            namespace=ns,
            eval_id=ids[index],
            event_id=result["event_id"],
            label=evaluation["label"],
            metric=encode_metric(build_metric(span, result, index)),
            source=result["source"],
            buffered=buffered,
            first_seen_ms=min(result["received_ts_ms"], span.get("source", {}).get("timestamp_ms") or 2**62),
        )
        for index, evaluation in enumerate(result["evaluations"])
    ]


class BatchJoin:
    """The join stage's work: decode every record of a batch, join the valid ones in one store call, dead-letter
    the rest; each record's outcome (dead letter, the DLQ limit, metrics) taken in record order, as if one by one.

    Idempotent: a batch joined again after a failure finds its sides already stored (``duplicate``).
    """

    def __init__(self, joiner: Joiner, decoder: RecordDecoder, dead_letters: DeadLetters, metrics: Metrics) -> None:
        self._joiner = joiner
        self._decode = decoder
        self._dead_letters = dead_letters
        self._metrics = metrics

    async def __call__(self, batch: Batch) -> JoinedBatch:
        records_ = [record for partition_records in batch.values() for record in partition_records]
        with span("evaljoin.batch", records=len(records_), partitions=len(batch)):
            return JoinedBatch(batch, await self._join(records_))

    async def _join(self, records_: Sequence[Any]) -> list[Joined]:
        # Metrics are counted per batch: a labelled increment per record cost about as much as decoding a span.
        for topic, count in collections.Counter(record.topic for record in records_).items():
            self._metrics.messages_consumed.labels(topic=topic).inc(count)
        decoded: list[Event | InvalidMessage | NotSent] = [self._decode(record) for record in records_]
        valid = [(event, source_of(record)) for record, event in zip(records_, decoded, strict=True)
                 if not isinstance(event, InvalidMessage | NotSent)]
        outcomes = iter(await self._joiner.join_many(valid) if valid else [])
        joined: list[Joined] = []
        over_quota: list[tuple[Any, Event, OverQuota]] = []
        debug = log.is_enabled_for(logging.DEBUG)  # the per-record context costs more than the join itself
        app = self._metrics.app
        # Counted once per batch (a batch that fails before the end is counted when done again).
        counted: collections.Counter[tuple[str, str, str]] = collections.Counter()  # (ml_app, kind, status)
        matched: collections.Counter[str] = collections.Counter()  # ml_app -> results matched
        for record, event in zip(records_, decoded, strict=True):
            if isinstance(event, NotSent):
                await self._not_sent(record, event)
                continue
            outcome = event if isinstance(event, InvalidMessage) else next(outcomes)
            kind = "span" if self._decode.is_span(record) else "result"
            if isinstance(outcome, InvalidMessage):
                with structlog.contextvars.bound_contextvars(**record_context(record, event)):
                    await self._dead_letter(record, kind, outcome,
                                            None if isinstance(event, InvalidMessage) else event.ml_app)
                continue
            assert not isinstance(event, InvalidMessage)
            self._dead_letters.record_valid((record.topic, record.partition, record.offset))
            ml_app = app(event.ml_app)
            if isinstance(outcome, OverQuota):
                counted[ml_app, kind, QUOTA_REASON] += 1
                over_quota.append((record, event, outcome))
                continue
            counted[ml_app, kind, outcome.status] += 1
            matched[ml_app] += (len({item.event_id for item in outcome.joined}) if kind == "span" and
                                outcome.status in ("stored", "replaced") else
                                int(kind == "result" and outcome.status in ("joined", "tagged")))
            if debug:
                log.debug("message_joined", status=outcome.status, evaluations=len(outcome.joined),
                          **record_context(record, event))
            joined.extend(outcome.joined)
        events: collections.Counter[tuple[str, str]] = collections.Counter()
        for (ml_app, kind, status), count in counted.items():
            events[kind, status] += count
            self._metrics.app_events.labels(ml_app=ml_app, kind=kind, outcome=status).inc(count)
        for (kind, status), count in events.items():
            self._metrics.events.labels(kind=kind, outcome=status).inc(count)
        for ml_app, count in matched.items():
            if count:
                self._metrics.app_matched_results.labels(ml_app=ml_app).inc(count)
        if over_quota:
            await self._report_over_quota(over_quota)
        return joined

    async def _report_over_quota(self, refused: Sequence[tuple[Any, Event, OverQuota]]) -> None:
        """Dead-letter the sides a quota refused, all at once: a flooding app costs the batch one round trip to
        the broker, not one per record, so the other apps' records in it are not held up behind it."""
        counts: dict[str, int] = {}
        for _, event, _ in refused:
            counts[str(event.ml_app)] = counts.get(str(event.ml_app), 0) + 1
        for ml_app, count in counts.items():
            log.warning("app_quota_exceeded", ml_app=ml_app, records=count)
        await asyncio.gather(*(
            self._dead_letters.not_sent(key=record.key, value=record.value, headers=list(record.headers or ()),
                                        source=source_of(record).as_dict(), reason=NotSent(QUOTA_REASON, over.detail))
            for record, _, over in refused))
        for _, event, _ in refused:
            self._metrics.app_dead_letters.labels(ml_app=self._metrics.app(event.ml_app), reason=QUOTA_REASON).inc()

    async def _not_sent(self, record: Any, reason: NotSent) -> None:
        """A judge line that gives no evaluation: an unrated one is counted and reported on the DLQ (someone may
        judge it again), one about another model is counted only."""
        self._metrics.events.labels(kind="result", outcome=reason.reason).inc()
        context = record_context(record, reason)
        if not reason.reported:
            self._dead_letters.record_valid((record.topic, record.partition, record.offset))
            log.debug("judgement_not_sent", reason=reason.reason, detail=reason.detail, **context)
            return
        self._metrics.unrated.labels(cause=reason.cause).inc()
        with structlog.contextvars.bound_contextvars(**context):
            log.info("judgement_unrated", cause=reason.cause, detail=reason.detail)
            await self._dead_letters.not_sent(key=record.key, value=record.value, headers=list(record.headers or ()),
                                              source=source_of(record).as_dict(), reason=reason)

    async def _dead_letter(self, record: Any, kind: str, error: InvalidMessage, ml_app: str | None = None) -> None:
        log.warning("message_dead_lettered", reason=error.reason, detail=error.detail)
        self._metrics.events.labels(kind=kind, outcome="invalid").inc()
        self._metrics.app_dead_letters.labels(ml_app=self._metrics.app(ml_app), reason=error.reason).inc()
        # DeadLetters cuts a copy that would not fit in MAX_MESSAGE_BYTES (an oversize record, or one near the
        # limit plus the dead-letter headers), so that the DLQ topic always takes it.
        await self._dead_letters.invalid(key=record.key, value=record.value, headers=list(record.headers or ()),
                                         source=source_of(record).as_dict(), error=error)


def record_context(record: Any, event: Event | InvalidMessage | NotSent) -> dict[str, Any]:
    """What a log line about one record says about it: where it came from and, once decoded, its join key and run."""
    context: dict[str, Any] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
    if not isinstance(event, InvalidMessage | NotSent):
        context.update(ml_app=event.ml_app, join_key=event.join_key)
        if event.run_id:
            context["run_id"] = event.run_id
    return context


def source_of(record: Any) -> Source:
    return Source(record.topic, record.partition, record.offset, record.timestamp)
