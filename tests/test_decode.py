"""Decoding: both seed formats verbatim, the native events, and a clear reason for every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.decode import decode_result, decode_span
from consumer.errors import InvalidMessage, NotSent

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
        {"label": "1234", "metric_type": "score", "value": 1},
        {"label": "-._ 42", "metric_type": "score", "value": 1},
        {"label": "", "metric_type": "score", "value": 1},
        {"label": "x" * 201, "metric_type": "score", "value": 1},
        {"label": "ok", "metric_type": "score", "value": 1, "eval_scope": "session"},
        {"label": "ok", "metric_type": "score", "value": 1, "metadata": {"evaljoin_provenance": {}}},
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
    """Labels without a letter, value types and sizes follow the intake's rules; a bool is not a score; no session
    scope, no metadata key of the service's own."""
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


# -- judge lines: one rule (consumer.judge), shared with the NeMo publisher ------------------------------

LINE = json.loads(JUDGE_LINE)


def not_sent(value: Any, headers: list[tuple[str, bytes | None]] | None = None, judged_model: str | None = None) -> Any:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    with pytest.raises(NotSent) as info:
        decode_result(raw, headers or [], join_key="question_id", default_ml_app="app", max_bytes=10_000,
                      judged_model=judged_model)
    return info.value


@pytest.mark.parametrize(("score", "cause"), [(-1, "unparsed_rating"), (-1.0, "unparsed_rating"), (None, "missing")])
def test_a_judge_line_without_a_rating_is_not_sent(score: Any, cause: str) -> None:
    """Score -1 (the judge's rating could not be parsed) and null are "unrated", with their cause, never a score."""
    error = not_sent(LINE | {"score": score})
    assert (error.reason, error.cause, error.reported) == ("unrated", cause, True)
    assert "question_id '1', quality_assessment:" in error.detail


def test_a_nan_score_is_unrated_but_nan_elsewhere_stays_invalid_json() -> None:
    """NaN, as Python's json writes an unrated score, is read in a judge line's score only."""
    with_nan = json.dumps(LINE | {"score": math.nan}).encode()
    assert b'"score": NaN' in with_nan
    assert not_sent(with_nan).cause == "nan"
    for bad in (json.dumps(LINE | {"score": math.inf}), json.dumps(LINE | {"score": math.nan, "tstamp": math.nan}),
                json.dumps(LINE | {"score": math.nan}).replace('"turn": 1', '"turn": 1e400'),
                json.dumps(native_result(evaluations=[{"label": "x", "metric_type": "score", "value": math.nan}]))):
        assert reason_of(result, bad.encode()) == "invalid_json", bad[-80:]


def test_turns_judges_and_judged_models_stay_apart() -> None:
    """Turn 2 has its own label; the judge, its prompt and the judged model are tags; metadata stays the guide's."""
    (first,) = result(JUDGE_LINE).evaluations
    assert (first.label, first.tags) == ("quality_assessment", {
        "judge": "meta/llama-3.1-8b-instruct", "judge_prompt": "single-v1", "model": "meta/llama-3.1-8b-instruct"})
    (second,) = result(LINE | {"turn": 2, "judge": "gpt-4", "model": "vicuna-13b"}).evaluations
    assert (second.label, second.tags) == ("quality_assessment_turn2", {"judge": "gpt-4", "model": "vicuna-13b"})
    assert second.metadata == {"model": "vicuna-13b", "judgement": LINE["judgment"]}
    assert reason_of(result, LINE | {"turn": "2"}) == "schema"


def test_only_the_judged_model_is_kept_and_the_header_wins() -> None:
    """With a judged model (the setting, or the record's judged_model header) other models' lines are not sent."""
    other = LINE | {"model": "vicuna-13b"}
    error = not_sent(other, judged_model="meta/llama-3.1-8b-instruct")
    assert (error.reason, error.reported) == ("other_model", False) and "vicuna-13b" in error.detail
    assert decode_result(orjson.dumps(other), [("judged_model", b"vicuna-13b")], join_key="question_id",
                         default_ml_app="a", max_bytes=10_000, judged_model="meta/llama-3.1-8b-instruct").evaluations
    assert not_sent(LINE, [("judged_model", b"vicuna-13b")]).reason == "other_model"
    unknown = {key: value for key, value in LINE.items() if key != "model"}
    assert result(unknown).evaluations  # a line that names no model cannot be told apart: it is kept
    assert reason_of(result, LINE, [("judged_model", b"\xff")]) == "invalid_header"


# -- runs ----------------------------------------------------------------------------------------------

def test_the_run_comes_from_the_event_else_the_header() -> None:
    """run_id: the native field, the source's run_id key, the judge line's field; else the run_id header."""
    header: list[tuple[str, bytes | None]] = [("run_id", b"from-header")]
    assert result(native_result(run_id="nightly-1"), header).run_id == "nightly-1"
    assert result(native_result(), header).run_id == "from-header"
    assert result(native_result()).run_id is None
    outputs = OUTPUT_RECORD | {"input": OUTPUT_RECORD["input"] | {"source": "trace_id=0;span_id=1;question_id=1;"
                                                                             "run_id=2026-01-05"}}
    assert span(outputs, header).run_id == "2026-01-05"
    assert span(OUTPUT_RECORD, header).run_id == "from-header"
    assert result(LINE | {"run_id": 20260105}).run_id == "20260105"
    assert result(JUDGE_LINE, header).run_id == "from-header"


@pytest.mark.parametrize(("event", "headers", "reason"), [
    (native_result(run_id=""), [], "schema"),
    (native_result(run_id="x" * 201), [], "schema"),
    (native_result(run_id="a\nb"), [], "schema"),
    (native_result(), [("run_id", b"\xff")], "invalid_header"),
    (native_result(), [("run_id", b"x" * 201)], "schema"),
    (LINE | {"run_id": ["a"]}, [], "schema"),
])
def test_a_run_is_a_bounded_name(event: dict[str, Any], headers: list[tuple[str, bytes | None]], reason: str) -> None:
    """A run is 1 to 200 characters without control characters, like ml_app; a header that is not UTF-8 is named."""
    assert reason_of(result, event, headers) == reason
