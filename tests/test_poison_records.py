"""Records a broker accepts but aiokafka cannot parse, on a real broker: dead-lettered, and the partition flows.

Each test writes the poison record between good ones on one partition, below the client's string API where
it has to (:func:`tests.hostile.send_raw`), and checks that the good ones are delivered, the poison one is
dead-lettered with its reason and its bytes, and the group's offsets move past it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.codec import has_zstd

from consumer.config import Settings
from consumer.dlq import RAW_HEADER_NAME
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from tests.hostile import RawName, send_raw
from tests.reliability.harness import drain_topic, header
from tests.support import Topics, eventually, group_lag, running_service

pytestmark = pytest.mark.timeout(180)


def span(key: str, span_id: int) -> bytes:
    return orjson.dumps({"schema_version": 1, "join_key": key, "trace_id": f"{span_id:032x}", "span_id": str(span_id)})


def result(key: str) -> bytes:
    return orjson.dumps({"schema_version": 1, "event_id": f"poison-test-{key}", "join_key": key,
                         "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 0.5}]})


def delivered(intake: FakeIntake) -> set[str]:
    return {m["join_on"]["span"]["span_id"] for m in intake.accepted_metrics()}


async def lag(kafka: KafkaBroker, settings: Settings) -> int:
    return await group_lag(kafka.bootstrap_servers, settings.kafka_group_id, [settings.span_topic,
                                                                             settings.result_topic])


async def test_a_header_name_that_is_not_utf8_is_dead_lettered_between_good_records(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """The records around it are delivered, it is dead-lettered as invalid_header with its name's bytes and its
    value, and the committed offset of its partition moves past it."""
    settings = make_settings()
    name, poison = b"trace\xff\xfeid", span("poison", 99)
    for i, key in enumerate(["a", "b"]):
        await producer.send_and_wait(topics.span, span(key, i + 1), partition=0)
    await (await send_raw(producer, topics.span, poison, key=b"k", partition=0,
                          headers=[("ml_app", b"poisoned"), (RawName(name), b"\x00value\xff")]))
    for i, key in enumerate(["c", "d"]):
        await producer.send_and_wait(topics.span, span(key, i + 3), partition=0)
    for key in "abcd":
        await producer.send_and_wait(topics.result, result(key), partition=0)
    async with running_service(settings):
        await eventually(lambda: delivered(intake), expect={"1", "2", "3", "4"}, what="the four good pairs")
        await eventually(lambda: lag(kafka, settings), expect=0, what="the offsets to move past every record")
    (dead,) = await drain_topic(kafka.bootstrap_servers, topics.dlq)
    assert header(dead, "evaljoin.error") == b"invalid_header"
    assert b"\\xff\\xfe" in (header(dead, "evaljoin.error.detail") or b"")
    assert (header(dead, "evaljoin.source.partition"), header(dead, "evaljoin.source.offset")) == (b"0", b"2")
    assert (dead.key, dead.value) == (b"k", poison)
    assert header(dead, RAW_HEADER_NAME + name.hex()) == b"\x00value\xff"
    assert header(dead, "ml_app") == b"poisoned"


async def test_a_batch_in_a_codec_this_consumer_cannot_read_is_dead_lettered_whole(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """A topic the broker compresses with zstd: read when the codec's library is installed, else each batch is
    dead-lettered as undecodable_batch with its bytes; either way the partition flows and later pairs join."""
    zstd_topic = f"{uuid.uuid4().hex[:10]}.results-zstd"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(zstd_topic, 1, 1, topic_configs={"compression.type": "zstd"})])
    finally:
        await admin.close()
    settings = make_settings(result_topic=zstd_topic)
    await producer.send_and_wait(topics.span, span("z", 7), partition=0)
    await producer.send_and_wait(zstd_topic, result("z"))
    async with running_service(settings):
        if has_zstd():
            await eventually(lambda: delivered(intake), expect={"7"}, what="the pair through the zstd topic")
        else:
            await eventually(lambda: lag(kafka, settings), expect=0, what="the offsets to move past the batch")
            (dead,) = await drain_topic(kafka.bootstrap_servers, topics.dlq)
            assert header(dead, "evaljoin.error") == b"undecodable_batch"
            assert b"zstd" in (header(dead, "evaljoin.error.detail") or b"")
            assert dead.value is not None and result("z") not in dead.value  # the batch, compressed as stored
            assert delivered(intake) == set()
        # The service reads on: a pair on the span topic and a result written after the poison batch.
        await producer.send_and_wait(topics.span, span("after", 8), partition=1)
        await producer.send_and_wait(topics.result, result("after"))
        await eventually(lambda: lag(kafka, settings), expect=0, what="the offsets to move past every record")


async def test_transaction_markers_and_aborted_records_never_stop_a_partition(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """Control records (commit and abort markers) between good records: the good ones are delivered and the
    committed offset moves past the markers."""
    settings = make_settings()
    async with _transactional(kafka) as transactional:
        async with transactional.transaction():
            await transactional.send_and_wait(topics.span, span("t1", 11), partition=0)
        await transactional.begin_transaction()
        await transactional.send_and_wait(topics.span, span("t2", 12), partition=0)
        await transactional.abort_transaction()
    # The broker answers EndTxn before it writes the markers: wait for the abort marker, so that t3 follows it
    # (a marker that is a partition's last record is another case: the next test).
    await eventually(lambda: _end_offset(kafka, topics.span), expect=4, what="the abort marker to be written")
    await producer.send_and_wait(topics.span, span("t3", 13), partition=0)
    for key in ("t1", "t3"):
        await producer.send_and_wait(topics.result, result(key), partition=0)
    async with running_service(settings) as service:
        await eventually(lambda: delivered(intake) >= {"11", "13"}, what="the pairs around the markers")
        await eventually(lambda: lag(kafka, settings), expect=0, what="the offsets to move past the markers")
        assert service.metrics.dead_letters.labels(reason="undecodable_batch")._value.get() == 0
    offsets: dict[Any, Any] = await _committed(kafka, settings)
    assert offsets[TopicPartition(topics.span, 0)] == 5  # t1, its commit marker, t2, its abort marker, t3


async def test_a_transaction_marker_as_a_partitions_last_record_is_committed_past(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """A transaction's commit marker is the partition's last record: once nothing is in flight, the committed
    offset moves past it, so the group's lag reaches 0 (a lag alert clears) without waiting for a next record."""
    settings = make_settings()
    await producer.send_and_wait(topics.result, result("m1"), partition=0)
    async with _transactional(kafka) as transactional, transactional.transaction():
        await transactional.send_and_wait(topics.span, span("m1", 21), partition=0)
    await eventually(lambda: _end_offset(kafka, topics.span), expect=2, what="the commit marker to be written")
    async with running_service(settings):
        await eventually(lambda: delivered(intake) >= {"21"}, what="the pair before the marker")
        await eventually(lambda: lag(kafka, settings), expect=0, what="the offsets to move past the last marker")
    offsets: dict[Any, Any] = await _committed(kafka, settings)
    assert offsets[TopicPartition(topics.span, 0)] == 2  # m1 and its commit marker


@contextlib.asynccontextmanager
async def _transactional(kafka: KafkaBroker) -> AsyncIterator[AIOKafkaProducer]:
    """A transactional producer of its own, stopped on leaving."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers,
                                transactional_id=f"poison-{uuid.uuid4().hex[:8]}")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def _end_offset(kafka: KafkaBroker, topic: str) -> int:
    """Partition 0's end offset (its high watermark: markers count)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([partition]))[partition])
    finally:
        await consumer.stop()


async def _committed(kafka: KafkaBroker, settings: Settings) -> dict[Any, Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        return {tp: meta.offset for tp, meta in (await admin.list_consumer_group_offsets(
            settings.kafka_group_id)).items()}
    finally:
        await admin.close()
