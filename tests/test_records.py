"""The stored form of buffered sides: compact, and read back exactly as written."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from consumer import records
from consumer.store import Namespace

pytestmark = pytest.mark.unit  # no server: part of the seconds-long tier

NS = Namespace("support-bot", "q-17")
SPAN: dict[str, Any] = {
    "ml_app": "support-bot", "join_key": "q-17", "trace_id": "a38fd547923a736994e3bf911a61dbe2",
    "span_id": "3434761080576430277", "tags": {"env": "prod", "version": "1.4.2"}, "emitted_at_ms": 1763900000001,
    "source": {"topic": "llmobs.span-context", "partition": 1, "offset": 12345, "timestamp_ms": 1763900001234},
}
RESULT: dict[str, Any] = {
    "ml_app": "support-bot", "join_key": "q-17", "event_id": "job-1:q-17",
    "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 0.91, "assessment": "pass",
                     "reasoning": "the answer names the ingredients and the steps in order",
                     "metadata": {"judge": {"raw": None}}, "tags": {"evaluator": "nemo"},
                     "timestamp_ms": 1763900060001}],
    "provenance": {"job_id": "job-1", "model": "meta/llama-3.1-8b-instruct"},
    "source": {"topic": "nemo.eval-results", "partition": 1, "offset": 99, "timestamp_ms": 1763900061000},
    "received_ts_ms": 1763900061000,
}


def test_a_result_reads_back_as_written() -> None:
    """Nulls inside metadata and values survive: they are the user's data, not absent fields."""
    assert records.decode(records.encode(RESULT), NS) == RESULT


def test_a_span_reads_back_with_its_identity() -> None:
    """The store keeps identity, newline, body; trace and span id come back from the identity."""
    identity = records.span_identity(SPAN["trace_id"], SPAN["span_id"])
    stored = identity.encode() + b"\n" + records.encode_span(SPAN)
    assert records.decode_span(stored, NS) == SPAN


def test_absent_fields_are_left_out() -> None:
    """Null top-level fields and empty objects are not stored; readers use .get()."""
    sparse = {**SPAN, "tags": {}, "emitted_at_ms": None}
    back = records.decode(records.encode(sparse), NS)
    assert "tags" not in back and "emitted_at_ms" not in back


def test_stored_records_are_much_smaller_than_the_events() -> None:
    """What the key says is left out and the rest deflated: about a third of the JSON here."""
    assert len(records.encode_span(SPAN)) < len(orjson.dumps(SPAN)) / 3
    assert len(records.encode(RESULT)) < len(orjson.dumps(RESULT)) / 2


def test_plain_json_records_written_before_the_compact_format_still_read() -> None:
    assert records.decode(orjson.dumps(RESULT), NS) == RESULT
    legacy_span = b"a38fd547923a736994e3bf911a61dbe2:3434761080576430277\n" + orjson.dumps(SPAN)
    assert records.decode_span(legacy_span, NS) == SPAN


# RESULT and SPAN as encode() stored them before it deflated with less memory (zlib memLevel 8, level 6).
WRITTEN_BY_MEMLEVEL_8 = (
    "0143f1163059e91a5a15ea029d8cdb83a405b1a5a10e29a10c4aa3c50a2001a054516a4a265053315032052c565c925a500c94"
    "51c82f4a492d82580ecff7d0c45bad549458ae6495579a93530b4a2a24242333634b030303332036ac8dd5c195e5c081843b13"
    "5924e966e6150373747209c80e92a3de1011f7969638dd6808246a75b0a435647900",
    "01ab26148d867a267a46a040c7884e33634b030830d421c76a43842f0d8d8c4d4c31bd0ab501245b5b0b00",
)


def test_records_deflated_with_more_memory_still_read() -> None:
    """The memory level is the compressor's own: records already in Redis read as before, and no larger."""
    result, span = (bytes.fromhex(hexed) for hexed in WRITTEN_BY_MEMLEVEL_8)
    assert records.decode(result, NS) == RESULT
    identity = records.span_identity(SPAN["trace_id"], SPAN["span_id"]).encode()
    assert records.decode_span(identity + b"\n" + span, NS) == SPAN
    assert len(records.encode(RESULT)) <= len(result) + 2 and len(records.encode_span(SPAN)) <= len(span) + 2
