"""Record batches that aiokafka's own parser stops on: read on, or handed on whole to be dead-lettered."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder, _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords

from consumer.decode import decode_span
from consumer.dlq import RAW_HEADER_NAME, _kept
from consumer.errors import InvalidMessage
from consumer.kafka_records import UNDECODABLE_BATCH, SafeMemoryRecords, invalid_header_name
from tests.hostile import RawName

pytestmark = pytest.mark.unit

SPAN = b'{"schema_version": 1, "join_key": "q", "trace_id": "ab", "span_id": "1"}'
CODEC_GZIP, CODEC_ZSTD = 1, 4
ATTRIBUTES_AT = 21  # base offset 8, length 4, leader epoch 4, magic 1, crc 4


def batch(records: list[tuple[bytes, list[tuple[str, bytes | None]]]], *, base_offset: int = 0,
          codec: int = 0) -> bytes:
    """A v2 record batch as a broker stores it (aiokafka's pure-Python builder writes any header name bytes)."""
    builder = _DefaultRecordBatchBuilderPy(2, codec, is_transactional=0, producer_id=-1, producer_epoch=-1,
                                           base_sequence=0, batch_size=1 << 20)
    for i, (value, headers) in enumerate(records):
        builder.append(i, 1_700_000_000_000 + i, None, value, headers)
    raw = bytearray(builder.build())
    struct.pack_into(">q", raw, 0, base_offset)  # the broker assigns it; the CRC does not cover it
    return bytes(raw)


def read_all(data: bytes) -> list[Any]:
    records = SafeMemoryRecords(data)
    out: list[Any] = []
    while records.has_next():
        out.extend(records.next_batch())
    return out


def test_aiokafka_alone_stops_at_a_header_name_that_is_not_utf8() -> None:
    """The defect this module exists for: aiokafka's parser raises on the record, every time it is fetched."""
    data = batch([(b"a", []), (b"b", [(RawName(b"\xff\xfe"), b"v")])])
    records = MemoryRecords(data)
    with pytest.raises(UnicodeDecodeError):
        list(records.next_batch())


def test_a_header_name_that_is_not_utf8_is_read_with_its_bytes_kept_and_the_batch_read_on() -> None:
    """The records before and after it come out in order; the name gives back its original bytes."""
    name = b"tr\xc3\x28ce\xff"
    data = batch([(b"a", [("ok", b"1")]), (b"b", [(RawName(name), b"\x00\xff"), ("x", None)]), (b"c", [])],
                 base_offset=40) + batch([(b"d", [])], base_offset=43)
    records = read_all(data)
    assert [(r.offset, r.value) for r in records] == [(40, b"a"), (41, b"b"), (42, b"c"), (43, b"d")]
    assert records[0].headers == [("ok", b"1")]
    (bad_name, bad_value), rest = records[1].headers
    assert invalid_header_name(bad_name) == name and bad_value == b"\x00\xff" and rest == ("x", None)
    assert records[1].timestamp == 1_700_000_000_001


def test_a_batch_in_a_codec_without_its_library_is_one_record_holding_the_whole_batch() -> None:
    """A batch that cannot be read at all is handed on at its last offset, as the broker sent it, with the reason."""
    gzip = bytearray(batch([(b"a", []), (b"b", [])], base_offset=7, codec=CODEC_GZIP))
    struct.pack_into(">h", gzip, ATTRIBUTES_AT, CODEC_ZSTD)  # zstd bits over gzip bytes: unreadable either way
    data = bytes(gzip) + batch([(b"after", [])], base_offset=9)
    first, after = read_all(data)
    assert (first.offset, first.key, first.value) == (8, None, bytes(gzip))
    ((name, detail),) = first.headers
    assert name == UNDECODABLE_BATCH and b"offsets 7..8" in detail
    assert (after.offset, after.value) == (9, b"after")


def test_a_good_batch_is_read_by_aiokafkas_parser_unchanged() -> None:
    """What aiokafka reads, the wrapper returns the same: offsets, values, headers, timestamps."""
    builder = DefaultRecordBatchBuilder(2, CODEC_GZIP, 0, -1, -1, 0, 1 << 20)
    for i in range(5):
        builder.append(i, 1_000 + i, b"k", b"v%d" % i, [("h", b"%d" % i)])
    data = bytes(builder.build())
    native = MemoryRecords(data)
    expected = [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in native.next_batch()]
    assert [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in read_all(data)] == expected


def test_the_decode_step_dead_letters_both_with_their_reasons() -> None:
    """``invalid_header`` for the name, ``undecodable_batch`` for the batch; neither is anything else."""
    options: dict[str, Any] = {"join_key": "question_id", "default_ml_app": "app", "max_bytes": 1 << 20}
    (record,) = [r for r in read_all(batch([(SPAN, [(RawName(b"\xff"), b"v")])])) if r.value == SPAN]
    with pytest.raises(InvalidMessage) as raised:
        decode_span(record.value, record.headers, **options)
    assert raised.value.reason == "invalid_header" and "b'\\xff'" in raised.value.detail
    with pytest.raises(InvalidMessage) as raised:
        decode_span(b"\x00" * 40, [(UNDECODABLE_BATCH, b"UnsupportedCodecError: zstd")], **options)
    assert raised.value.reason == "undecodable_batch" and "zstd" in raised.value.detail


def test_the_dead_letter_copy_spells_a_name_that_is_not_utf8_in_hex_and_keeps_its_value() -> None:
    """Every header a Kafka client can write survives; the bytes of the name can be recovered exactly."""
    (record,) = read_all(batch([(SPAN, [("ml_app", b"a"), (RawName(b"\xc3\x28"), b"\xff"),
                                        ("evaljoin.error", b"old")])]))
    kept = _kept([*record.headers, (UNDECODABLE_BATCH, b"x")])
    assert kept == [("ml_app", b"a"), (RAW_HEADER_NAME + "c328", b"\xff")]
    assert bytes.fromhex(kept[1][0].removeprefix(RAW_HEADER_NAME)) == b"\xc3\x28"
