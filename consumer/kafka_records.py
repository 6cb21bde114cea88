"""Kafka record batches that no record's bytes can stop: whatever a broker accepted reaches the decode step.

aiokafka parses fetched record batches inside ``getmany``, and a parse error there is raised to the caller
every time the partition is fetched again: one record stops its partition, and the consumer crash-loops the
whole group. Two such records are known, both written by librdkafka-based producers and accepted by brokers:

* a header whose *name* is not UTF-8 (the protocol calls it a string; only the value is bytes):
  aiokafka decodes it strictly and raises ``UnicodeDecodeError``;
* a batch compressed with a codec whose library is not installed (snappy, lz4 and zstd need ``cramjam``):
  ``UnsupportedCodecError``.

:func:`install` makes aiokafka's fetcher read batches through :class:`SafeMemoryRecords`. A batch is read by
aiokafka's own parser (the C extension) as before; only when that raises is the rest of the batch read again
by :class:`_LenientBatch`, which decodes header names with ``surrogateescape`` (so that the original bytes
are kept: ``name.encode("utf-8", "surrogateescape")``), and the record reaches the decode step, which
dead-letters it as ``invalid_header`` (:func:`invalid_header_name`). A batch that cannot be read even so is
handed on as one record at the batch's last offset whose value is the whole batch as the broker sent it and
whose only header is :data:`UNDECODABLE_BATCH`; the decode step dead-letters it as ``undecodable_batch``, and
the offsets move past it. Nothing is skipped silently and nothing is raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiokafka.consumer import fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
from aiokafka.record.memory_records import _MemoryRecordsPy
from aiokafka.record.util import decode_varint

# The header name of a record that stands for a batch that could not be read, with the reason as its value.
# It starts with a high surrogate, which no header read from Kafka can contain: a strict UTF-8 decode gives
# none, and surrogateescape gives only U+DC80..U+DCFF. So no producer can forge it.
UNDECODABLE_BATCH = "\ud800evaljoin.undecodable_batch"
_DETAIL_LIMIT = 500


def install() -> None:
    """Make aiokafka's fetcher read record batches through :class:`SafeMemoryRecords` (idempotent)."""
    fetcher.MemoryRecords = SafeMemoryRecords


def invalid_header_name(name: str) -> bytes | None:
    """The original bytes of a header name that is not UTF-8 (read with surrogateescape), else None."""
    if name.isascii():
        return None
    try:
        str.encode(name, "utf-8")
    except UnicodeEncodeError:
        try:
            return str.encode(name, "utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no decoder gave: not from Kafka
            return str.encode(name, "utf-8", "surrogatepass")
    return None


class SafeMemoryRecords(_MemoryRecordsPy):  # type: ignore[misc]
    """aiokafka's ``MemoryRecords`` (the framing of a fetch response into batches), each v2 batch wrapped."""

    def next_batch(self, *args: Any) -> Any:
        raw = self._next_slice
        batch = super().next_batch(*args)
        if batch is None or raw is None or raw[self.MAGIC_OFFSET] < 2:
            return batch
        return SafeBatch(batch, raw)


class SafeBatch:
    """A record batch read by aiokafka's parser; from the record it fails on, by :class:`_LenientBatch`."""

    def __init__(self, native: Any, raw: memoryview) -> None:
        self._native = native
        self._raw = raw
        self._records: Iterator[Any] | None = None
        self._last_offset = -1

    def __getattr__(self, name: str) -> Any:  # base_offset, next_offset, is_control_batch, validate_crc, ...
        return getattr(self._native, name)

    def __iter__(self) -> SafeBatch:
        return self

    def __next__(self) -> Any:
        try:
            if self._records is None:
                self._records = iter(self._native)
            record = next(self._records)
        except StopIteration:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the rest is read leniently
            self._records = self._lenient(exc)
            record = next(self._records)
        self._last_offset = record.offset
        return record

    def _lenient(self, error: Exception) -> Iterator[Any]:
        """The records after the last one returned, read by :class:`_LenientBatch`; if that fails too, the rest
        of the batch as one record (:data:`UNDECODABLE_BATCH`)."""
        yielded = self._last_offset
        try:
            for record in _LenientBatch(self._raw):
                if record.offset > yielded:
                    yielded = record.offset
                    yield record
        except Exception as exc:  # noqa: BLE001 - the batch cannot be read: hand it on whole, to be dead-lettered
            last = self._native.base_offset + self._native.last_offset_delta
            if last > yielded:
                detail = (f"{type(error).__name__}: {error}; then {type(exc).__name__}: {exc}; offsets "
                          f"{max(yielded + 1, self._native.base_offset)}..{last} of a batch of "
                          f"{self._native.base_offset}..{last}, codec {self._native.compression_type}")
                yield _DefaultRecordPy(last, self._native.max_timestamp, self._native.timestamp_type, None,
                                       bytes(self._raw), [(UNDECODABLE_BATCH, detail[:_DETAIL_LIMIT].encode())])


class _LenientBatch(_DefaultRecordBatchPy):  # type: ignore[misc]
    """aiokafka's pure-Python batch parser, except that a header name that is not UTF-8 is read with
    surrogateescape instead of raising.

    A record (KIP-98): length, attributes, timestamp delta, offset delta, key, value, then the headers, each a
    name (a string) and a value (nullable bytes); every integer a zigzag varint.
    """

    def _read_msg(self, decode_varint: Any = decode_varint) -> Any:
        buffer: bytearray = self._buffer
        start_of_record: int = self._pos  # type: ignore[has-type]
        length, pos = decode_varint(buffer, start_of_record)
        start = pos
        _attributes, pos = decode_varint(buffer, pos)
        timestamp_delta, pos = decode_varint(buffer, pos)
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _nullable_bytes(buffer, pos)
        value, pos = _nullable_bytes(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        if count < 0:
            raise ValueError(f"a record with {count} headers")
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(count):
            name, pos = _nullable_bytes(buffer, pos)
            if name is None:
                raise ValueError("a header without a name")
            data, pos = _nullable_bytes(buffer, pos)
            headers.append((name.decode("utf-8", "surrogateescape"), data))
        if pos - start != length:
            raise ValueError(f"a record of {length} bytes read as {pos - start}")
        self._pos = pos
        timestamp = self.max_timestamp if self.timestamp_type == self.LOG_APPEND_TIME else (
            self.first_timestamp + timestamp_delta)
        return _DefaultRecordPy(self.base_offset + offset_delta, timestamp, self.timestamp_type, key, value, headers)


def _nullable_bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buffer):
        raise ValueError(f"{size} bytes past the end of the batch")
    return bytes(buffer[pos:pos + size]), pos + size
