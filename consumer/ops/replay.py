"""``replay-dlq``: re-publish dead-lettered records to the topic they came from, after a fix.

The replayer reads the dead-letter topic in its own consumer group (``<KAFKA_GROUP_ID>-dlq-replay``)
and commits as it goes, so running it again continues where it stopped instead of replaying
twice; a record replayed twice anyway is recognised by the service (same span, same result event
id). Each replayed record keeps its original key and headers and gains ``evaljoin.replayed_from``;
a record that fails again comes back to the DLQ with that header and is skipped by later replays
unless ``include_replayed`` is set, so a replay can never loop. Evaluations refused by the intake
(``intake_rejected``) are not input records and are not replayed: re-publish their result event.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer.config import Settings
from consumer.dlq import DLQ_HEADERS
from consumer.ops.check import topic_partitions

REPLAYED_FROM = "evaljoin.replayed_from"


@dataclass
class ReplayFilter:
    reasons: set[str] = field(default_factory=set)  # empty: every reason
    since_ms: int | None = None
    until_ms: int | None = None
    key_contains: str | None = None
    include_replayed: bool = False


@dataclass
class ReplayReport:
    read: int = 0
    replayed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def _skip_reason(record: Any, headers: dict[str, bytes], settings: Settings, flt: ReplayFilter) -> str | None:
    reason = headers.get("evaljoin.error", b"").decode()
    source = headers.get("evaljoin.source.topic", b"").decode()
    if reason == "intake_rejected":
        return "intake_rejected (not an input record)"
    if source not in (settings.span_topic, settings.result_topic):
        return "source topic is not an input topic"
    if REPLAYED_FROM in headers and not flt.include_replayed:
        return "already replayed once"
    if flt.reasons and reason not in flt.reasons:
        return "filtered by reason"
    if flt.since_ms is not None and record.timestamp < flt.since_ms:
        return "filtered by time"
    if flt.until_ms is not None and record.timestamp > flt.until_ms:
        return "filtered by time"
    if flt.key_contains is not None and flt.key_contains not in (record.key or b"").decode("utf-8", "replace"):
        return "filtered by key"
    return None


async def replay_dlq(settings: Settings, flt: ReplayFilter, *, dry_run: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> ReplayReport:
    """Replay the DLQ up to its end offsets at the start of the call."""
    options = settings.kafka_client_options()
    consumer = AIOKafkaConsumer(group_id=f"{settings.kafka_group_id}-dlq-replay", enable_auto_commit=False,
                                auto_offset_reset="earliest", **options)
    producer = AIOKafkaProducer(acks="all", enable_idempotence=settings.kafka_enable_idempotence, **options)
    report = ReplayReport()
    await consumer.start()
    await producer.start()
    try:
        partitions = [TopicPartition(settings.dlq_topic, p)
                      for p in sorted(await _partitions(settings, settings.dlq_topic))]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        committed = {tp: (await consumer.committed(tp)) or 0 for tp in partitions}
        total = sum(max(0, ends[tp] - committed[tp]) for tp in partitions)
        remaining = {tp for tp in partitions if committed[tp] < ends[tp]}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            offsets: dict[TopicPartition, int] = {}
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        remaining.discard(tp)
                        break
                    report.read += 1
                    headers = {k: v for k, v in record.headers or () if v is not None}
                    skip = _skip_reason(record, headers, settings, flt)
                    if skip:
                        report.skipped[skip] += 1
                    elif not dry_run:
                        out = [(k, v) for k, v in record.headers or () if k not in DLQ_HEADERS and v is not None]
                        out.append((REPLAYED_FROM, f"{record.topic}:{record.partition}:{record.offset}".encode()))
                        await producer.send_and_wait(headers["evaljoin.source.topic"].decode(), record.value,
                                                     key=record.key, headers=out)
                        report.replayed += 1
                    else:
                        report.replayed += 1
                    offsets[tp] = record.offset + 1
                if offsets.get(tp, 0) >= ends[tp]:
                    remaining.discard(tp)
            if offsets and not dry_run:
                await consumer.commit(offsets)
            if progress:
                progress(report.read, total)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await producer.stop()
        await consumer.stop()
    return report


async def _partitions(settings: Settings, topic: str) -> set[int]:
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        count = (await topic_partitions(admin)).get(topic)
    finally:
        await admin.close()
    if not count:
        raise RuntimeError(f"DLQ topic {topic!r} does not exist")
    return set(range(count))


def progress_bar(done: int, total: int) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    filled = width if total == 0 else min(width, done * width // total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stderr.flush()
