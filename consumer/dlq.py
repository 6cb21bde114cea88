"""The dead-letter path: what cannot be processed is published with its reason, never dropped.

Invalid input, evaluations the intake refused and judge lines without a rating go to the dead-letter
topic with headers that say why and where they came from; the partition keeps flowing.
:class:`DlqLimit` (after arroyo's) halts the consumer when so much is invalid that a deploy is
probably broken: better to stop than to dead-letter a whole topic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from consumer.errors import DlqLimitExceeded, InvalidMessage, NotSent, kafka_errors
from consumer.kafka_records import UNDECODABLE_BATCH, invalid_header_name
from consumer.metrics import Metrics

_DETAIL_LIMIT = 1000
_VARINT_SLACK = 4  # a length prefix grows from 1 byte (empty) to at most 5
# The headers this module adds; a record dead-lettered again gets fresh ones (other headers are kept,
# among them the marks of a copy cut to fit, below).
DLQ_HEADERS = frozenset({"evaljoin.error", "evaljoin.error.detail", "evaljoin.source.topic",
                         "evaljoin.source.partition", "evaljoin.source.offset"})
TRUNCATED_FROM = "evaljoin.truncated_from"  # the value was cut; its original length
HEADERS_DROPPED = "evaljoin.headers_dropped"  # the record's own headers were dropped; how many
KEY_TRUNCATED_FROM = "evaljoin.key_truncated_from"  # the key was cut; its original length
# A header whose name is not UTF-8 (reason invalid_header) is kept as this prefix plus the name's bytes in hex,
# with its value unchanged: Kafka clients write header names as strings, and the bytes stay recoverable.
RAW_HEADER_NAME = "evaljoin.raw_header_name."

Header = tuple[str, bytes]


class Producer(Protocol):
    async def send_and_wait(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                            headers: Sequence[tuple[str, bytes]] | None = None) -> Any: ...


class DlqLimit:
    """Raise :class:`DlqLimitExceeded` when invalid messages pass a ratio or a consecutive count.

    ``max_invalid_ratio`` is checked over the last ``window`` messages once a tenth of the window has
    been seen; 0 disables either check. A message given with its ``position`` (topic, partition,
    offset) counts once: a batch joined again after a transient failure, or fetched again after a
    rebalance, does not count its records twice.
    """

    def __init__(self, *, max_invalid_ratio: float, window: int, max_consecutive: int) -> None:
        self._ratio = max_invalid_ratio
        self._window: deque[bool] = deque(maxlen=window)
        self._invalid_in_window = 0
        self._max_consecutive = max_consecutive
        self._consecutive = 0
        self._counted_up_to: dict[tuple[str, int], int] = {}  # (topic, partition) -> highest offset counted

    def record(self, *, valid: bool, position: tuple[str, int, int] | None = None) -> None:
        if position is not None:
            topic, partition, offset = position
            if offset <= self._counted_up_to.get((topic, partition), -1):
                return
            self._counted_up_to[(topic, partition)] = offset
        if len(self._window) == self._window.maxlen and not self._window[0]:
            self._invalid_in_window -= 1
        self._window.append(valid)
        if valid:
            self._consecutive = 0
            return
        self._invalid_in_window += 1
        self._consecutive += 1
        if self._max_consecutive and self._consecutive > self._max_consecutive:
            raise DlqLimitExceeded(f"{self._consecutive} invalid messages in a row")
        seen = len(self._window)
        minimum = max(10, (self._window.maxlen or 0) // 10)
        if self._ratio and seen >= minimum and self._invalid_in_window / seen > self._ratio:
            raise DlqLimitExceeded(
                f"{self._invalid_in_window} of the last {seen} messages were invalid "
                f"(limit {self._ratio:.0%})"
            )


class DeadLetters:
    """Publishes to the dead-letter topic; each call returns once the broker acknowledged it."""

    def __init__(self, producer: Producer, *, topic: str, limit: DlqLimit, metrics: Metrics,
                 max_record_bytes: int | None = None) -> None:
        self._producer = producer
        self._metrics = metrics
        self._topic = topic
        self._limit = limit
        self._max_record_bytes = max_record_bytes

    def record_valid(self, position: tuple[str, int, int] | None = None) -> None:
        self._limit.record(valid=True, position=position)

    async def invalid(self, *, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]],
                      source: dict[str, Any], error: InvalidMessage) -> None:
        """Dead-letter an invalid record as it was, unless the DlqLimit says to halt first."""
        self._limit.record(valid=False, position=_position(source))
        await self._publish(key, value, headers, source, error.reason, error.detail)

    async def not_sent(self, *, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]],
                       source: dict[str, Any], reason: NotSent) -> None:
        """Report a valid record that gives nothing to send (an unrated judge line) as it was.

        It is not bad input: it counts as valid towards the DlqLimit.
        """
        self._limit.record(valid=True, position=_position(source))
        await self._publish(key, value, headers, source, reason.reason, reason.detail)

    async def rejected(self, *, key: bytes | None, metric: bytes, source: dict[str, Any], status: int,
                       body: str) -> None:
        """Dead-letter one evaluation the intake refused, with the intake's answer."""
        await self._publish(key, metric, [], source, "intake_rejected", f"HTTP {status}: {body}")

    async def _publish(self, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]],
                       source: dict[str, Any], reason: str, detail: str) -> None:
        kept = _kept(headers)
        own = [
            ("evaljoin.error", reason.encode()),
            ("evaljoin.error.detail", detail[:_DETAIL_LIMIT].encode("utf-8", "replace")),
            ("evaljoin.source.topic", str(source.get("topic", "")).encode()),
            ("evaljoin.source.partition", str(source.get("partition", "")).encode()),
            ("evaljoin.source.offset", str(source.get("offset", "")).encode()),
        ]
        out = [*kept, *own]
        if self._max_record_bytes is not None:
            key, value, out = fit_record(key, value, kept, own, self._max_record_bytes)
        with kafka_errors():
            await self._producer.send_and_wait(self._topic, value=value, key=key, headers=out)
        self._metrics.dead_letters.labels(reason=reason).inc()


def _kept(headers: Sequence[tuple[str, bytes | None]]) -> list[Header]:
    """The record's own headers on its dead-letter copy: all but the null-valued and the DLQ's own, a name that
    is not UTF-8 spelt as :data:`RAW_HEADER_NAME` plus its bytes in hex."""
    kept: list[Header] = []
    for name, data in headers:
        if data is None or name in DLQ_HEADERS or name == UNDECODABLE_BATCH:
            continue
        raw = invalid_header_name(name)
        kept.append((name if raw is None else RAW_HEADER_NAME + raw.hex(), data))
    return kept


def _position(source: dict[str, Any]) -> tuple[str, int, int] | None:
    """A record's (topic, partition, offset), when its source says."""
    topic, partition, offset = source.get("topic"), source.get("partition"), source.get("offset")
    if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
        return topic, partition, offset
    return None


def kafka_size(key: bytes | None, value: bytes | None, headers: Sequence[Header]) -> int:
    """An upper bound of a record's size on the broker, as a batch of one: what ``max.message.bytes`` limits."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
    return size


def fit_record(key: bytes | None, value: bytes | None, kept: Sequence[Header], own: Sequence[Header],
               limit: int) -> tuple[bytes | None, bytes | None, list[Header]]:
    """Cut a dead-letter copy to at most ``limit`` bytes on the broker, marking what was cut.

    A copy the producer or the broker refuses as too large fails on every retry and stalls its partition
    for good, so it is cut instead: first the value (``evaljoin.truncated_from``: its original length); if
    the key and the record's headers (``kept``) alone do not fit, those headers are dropped
    (``evaljoin.headers_dropped``: how many), then the key is cut (``evaljoin.key_truncated_from``).
    The dead-letter headers (``own``) always stay.
    """
    if kafka_size(key, value, [*kept, *own]) <= limit:
        return key, value, [*kept, *own]
    value_mark: list[Header] = [(TRUNCATED_FROM, str(len(value)).encode())] if value else []
    marks: list[Header] = []  # room for value_mark is kept while deciding what else has to go
    if kafka_size(key, b"", [*kept, *own, *value_mark]) + _VARINT_SLACK > limit:
        marks.append((HEADERS_DROPPED, str(len(kept)).encode()))
        kept = []
    if kafka_size(key, b"", [*own, *value_mark, *marks]) + _VARINT_SLACK > limit:
        marks.append((KEY_TRUNCATED_FROM, str(len(key or b"")).encode()))
        key = (key or b"")[:max(0, limit - kafka_size(b"", b"", [*own, *value_mark, *marks]) - 2 * _VARINT_SLACK)]
    out = [*kept, *own, *marks]
    if value is not None and kafka_size(key, value, out) > limit:
        out += value_mark
        value = value[:max(0, limit - kafka_size(key, b"", out) - _VARINT_SLACK)]
    return key, value, out
