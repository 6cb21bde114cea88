"""Decoding: both seed formats verbatim, the native events, and a clear reason for every bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.decode import decode_result, decode_span
from consumer.errors import InvalidMessage

pytestmark = pytest.mark.unit  # no server: part of the seconds-long tier

SEED = Path(__file__).parent.parent / "producer_examples" / "seed"
OUTPUT_RECORD = json.loads((SEED / "outputs.json").read_text())[0]
JUDGE_LINE = (SEED / "scores.jsonl").read_text().splitlines()[0].encode()


def span(value: Any, headers: list[tuple[str, bytes | None]] | None = None, default: str = "app") -> Any:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return decode_span(raw, headers or [], join_key="question_id", default_ml_app=default, max_bytes=10_000)


def result(value: Any, headers: list[tuple[str, bytes | None]] | None = None, default: str = "app") -> Any:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return decode_result(raw, headers or [], join_key="question_id", default_ml_app=default, max_bytes=10_000)


def native_result(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1, "event_id": "evt-00000001", "join_key": "q-1",
        "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 0.87}],
    }
    event.update(changes)
    return event


def reason_of(call: Any, *args: Any) -> str:
    with pytest.raises(InvalidMessage) as info:
        call(*args)
    return info.value.reason


def test_outputs_record_gives_span_context() -> None:
    """The guide's outputs.json record yields trace_id, span_id and question_id from input.source."""
    event = span(OUTPUT_RECORD)
    assert (event.trace_id, event.span_id, event.join_key, event.ml_app) == ("0", "1", "1", "app")


def test_judge_line_maps_as_the_guide_does() -> None:
    """A scores.jsonl line becomes quality_assessment/score with model and judgement metadata."""
    event = result(JUDGE_LINE)
    (evaluation,) = event.evaluations
    assert event.join_key == "1"
    assert (evaluation.label, evaluation.metric_type, evaluation.value) == ("quality_assessment", "score", 8)
    assert evaluation.metadata == {
        "model": "meta/llama-3.1-8b-instruct",
        "judgement": "Rating: [[8]] The answer clearly denotes the ingredients needed to make a cake",
    }
    assert evaluation.timestamp_ms == 1740429821107


def test_judge_line_event_id_is_deterministic() -> None:
    """The same judge line re-serialised differently gets the same event id, a different line another."""
    again = json.dumps(json.loads(JUDGE_LINE), indent=2, sort_keys=True).encode()
    changed = json.loads(JUDGE_LINE) | {"turn": 2}
    assert result(JUDGE_LINE).event_id == result(again).event_id != result(changed).event_id


def test_ml_app_precedence() -> None:
    """The event's ml_app wins over the ml_app header, which wins over the default."""
    headers: list[tuple[str, bytes | None]] = [("ml_app", b"from-header")]
    assert result(native_result(ml_app="from-event"), headers).ml_app == "from-event"
    assert result(native_result(), headers).ml_app == "from-header"
    assert result(native_result()).ml_app == "app"


def test_judge_line_without_the_join_key_says_so() -> None:
    """A judge line lacking the configured join key is refused with a message naming the key."""
    line = json.loads(JUDGE_LINE)
    with pytest.raises(InvalidMessage, match="without the join key 'item_id'"):
        decode_result(orjson.dumps(line), [], join_key="item_id", default_ml_app="a", max_bytes=100_000)


def test_no_namespace_is_invalid() -> None:
    """Without an ml_app anywhere and no default, the event is refused with reason no_ml_app."""
    assert reason_of(span, OUTPUT_RECORD, [], "") == "no_ml_app"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty"),
        (b"{not json", "invalid_json"),
        (b'{"a": "\xff"}', "invalid_json"),
        (b'{"score": NaN}', "invalid_json"),
        (b"[1, 2]", "schema"),
        (b"x" * 10_001, "oversize"),
        (orjson.dumps(native_result(schema_version=2)), "unsupported_schema_version"),
        (orjson.dumps(native_result(kind="span_context")), "wrong_topic"),
        (orjson.dumps(native_result(evaluations=[])), "schema"),
        (orjson.dumps(native_result(unexpected=1)), "schema"),
        (orjson.dumps({"question_id": 1, "score": True, "judgment": "x"}), "schema"),
        (orjson.dumps({"question_id": 1.5, "score": 3, "judgment": "x"}), "schema"),
    ],
)
def test_bad_result_records_have_a_reason(value: bytes, reason: str) -> None:
    """Each kind of malformed result record is refused with its own stable reason code."""
    assert reason_of(result, value) == reason


@pytest.mark.parametrize(
    "evaluation",
    [
        {"label": "1starts_with_digit", "metric_type": "score", "value": 1},
        {"label": "has.dot", "metric_type": "score", "value": 1},
        {"label": "x" * 201, "metric_type": "score", "value": 1},
        {"label": "ok", "metric_type": "score", "value": True},
        {"label": "ok", "metric_type": "score", "value": "7"},
        {"label": "ok", "metric_type": "boolean", "value": 1},
        {"label": "ok", "metric_type": "categorical", "value": ""},
        {"label": "ok", "metric_type": "json", "value": [1]},
        {"label": "ok", "metric_type": "gauge", "value": 1},
        {"label": "ok", "metric_type": "score", "value": 1, "assessment": "maybe"},
        {"label": "ok", "metric_type": "score", "value": 1, "metadata": {"big": "x" * 70_000}},
    ],
)
def test_evaluations_the_intake_would_refuse_are_invalid(evaluation: dict[str, Any]) -> None:
    """Labels, value types and sizes follow the intake's rules; a bool is not a score."""
    raw = orjson.dumps(native_result(evaluations=[evaluation]))
    with pytest.raises(InvalidMessage) as info:
        decode_result(raw, [], join_key="question_id", default_ml_app="a", max_bytes=1_000_000)
    assert info.value.reason == "schema"


def test_every_metric_type_is_accepted() -> None:
    """score (int and float), categorical, boolean and json values all decode."""
    evaluations = [
        {"label": "s_int", "metric_type": "score", "value": 8},
        {"label": "s_float", "metric_type": "score", "value": 0.5, "assessment": "pass", "reasoning": "ok"},
        {"label": "cat", "metric_type": "categorical", "value": "good"},
        {"label": "flag", "metric_type": "boolean", "value": False},
        {"label": "blob", "metric_type": "json", "value": {"a": [1, 2]}},
    ]
    event = result(native_result(evaluations=evaluations))
    assert [e.value for e in event.evaluations] == [8, 0.5, "good", False, {"a": [1, 2]}]


@pytest.mark.parametrize(
    "record",
    [
        {"input": {"source": "trace_id=0;span_id=1"}},
        {"input": {"source": "trace_id=zz;span_id=1;question_id=1"}},
        {"input": {"source": "garbage"}},
        {"input": {"source": 5}},
        {"schema_version": 1, "join_key": "q", "trace_id": "ab", "span_id": "not-decimal"},
        {"schema_version": 1, "join_key": "q\n", "trace_id": "ab", "span_id": "1"},
    ],
)
def test_bad_span_records_are_schema_errors(record: dict[str, Any]) -> None:
    """A span record without a usable trace_id, span_id or join key is refused."""
    assert reason_of(span, record) == "schema"


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_a_version_equal_to_one_but_not_the_integer_is_unsupported(version: Any) -> None:
    """schema_version true or 1.0 is not version 1: both event kinds dead-letter it as unsupported_schema_version."""
    assert reason_of(span, {"schema_version": version, "join_key": "q", "trace_id": "ab", "span_id": "1"}) == (
        "unsupported_schema_version")
    assert reason_of(result, orjson.dumps(native_result(schema_version=version))) == "unsupported_schema_version"
