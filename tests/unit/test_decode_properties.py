"""Decoding, property-based: hostile records fail with a right reason only, valid events decode as modelled."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.decode import decode_result, decode_span, record_bytes
from consumer.errors import InvalidMessage
from consumer.events import NemoResultEvent, SpanContextEvent
from tests.hostile import MAX_BYTES, Hostile, hostile, no_controls, odd_headers

pytestmark = pytest.mark.unit

PROPERTY = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])

Headers = list[tuple[str, bytes | None]]
Event = TypeVar("Event", SpanContextEvent, NemoResultEvent)
DEFAULT_APP = "fallback"
OPTIONS: dict[str, Any] = {"join_key": "question_id", "default_ml_app": DEFAULT_APP, "max_bytes": MAX_BYTES}

names = st.text(no_controls, min_size=1, max_size=40)
tag_maps = st.dictionaries(names, st.text(no_controls, max_size=40), max_size=3)
timestamps = st.integers(0, 253402300799999)
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_objects = st.dictionaries(st.text(max_size=10), st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6), max_size=3)
labels = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,30}", fullmatch=True)


join_keys = st.text(no_controls, min_size=1, max_size=80)

# Events the models accept, each optional field sometimes present.
valid_span = st.fixed_dictionaries({
    "schema_version": st.just(1),
    "join_key": join_keys,
    "trace_id": st.from_regex(r"[0-9a-fA-F]{1,32}", fullmatch=True),
    "span_id": st.from_regex(r"[0-9]{1,20}", fullmatch=True),
}, optional={"kind": st.just("span_context"), "ml_app": names, "tags": tag_maps, "emitted_at_ms": timestamps})

typed_values = st.one_of(  # a metric type and a value of that type
    st.tuples(st.just("score"), st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)),
    st.tuples(st.just("categorical"), st.text(min_size=1, max_size=50)),
    st.tuples(st.just("boolean"), st.booleans()),
    st.tuples(st.just("json"), json_objects),
)
valid_evaluation = st.builds(
    lambda typed, rest: {"metric_type": typed[0], "value": typed[1], **rest}, typed_values,
    st.fixed_dictionaries({"label": labels}, optional={
        "reasoning": st.text(max_size=80), "assessment": st.sampled_from(["pass", "fail"]), "metadata": json_objects,
        "tags": tag_maps, "timestamp_ms": timestamps}))

valid_result = st.fixed_dictionaries({
    "schema_version": st.just(1),
    "event_id": st.from_regex(r"[A-Za-z0-9_.:-]{8,40}", fullmatch=True),
    "join_key": join_keys,
    "evaluations": st.lists(valid_evaluation, min_size=1, max_size=3),
}, optional={"kind": st.just("nemo_result"), "ml_app": names, "provenance": st.fixed_dictionaries({}, optional={
    "job_id": names, "model": names, "judge": names | st.lists(names, max_size=3), "evaluated_at_ms": timestamps})})


@st.composite
def record_headers(draw: st.DrawFn) -> Headers:
    """Odd headers, sometimes with an ml_app header."""
    headers: Headers = list(draw(odd_headers))
    if draw(st.booleans()):
        headers.append(("ml_app", draw(names).encode()))
    return headers


def modelled(model: type[Event], event: dict[str, Any], headers: Headers) -> Event:
    """What decoding ``event`` must give: its model, ml_app from the event, else the header, else the default."""
    from_header = next((value.decode() for name, value in headers if name == "ml_app" and value), None)
    return model.model_validate(event).model_copy(update={"ml_app": event.get("ml_app") or from_header or DEFAULT_APP})


@PROPERTY
@given(hostile())
def test_every_hostile_record_is_invalid_with_an_allowed_reason(record: Hostile) -> None:
    """A malformed record raises InvalidMessage with one of the reasons right for it, and never another exception."""
    decode = decode_span if record.span_topic else decode_result
    allowed = frozenset({"oversize"}) if record_bytes(None, record.value, record.headers) > MAX_BYTES else (
        record.reasons)
    with pytest.raises(InvalidMessage) as raised:
        decode(record.value, record.headers, **OPTIONS)
    assert raised.value.reason in allowed, (record.category, raised.value.detail)
    assert raised.value.detail


@settings(PROPERTY, max_examples=100)
@given(valid_span, record_headers())
def test_a_valid_span_event_decodes_to_its_model(event: dict[str, Any], headers: Headers) -> None:
    """Any span-context event the model accepts decodes to that model, its ml_app from event, header or default."""
    assert decode_span(orjson.dumps(event), headers, **OPTIONS) == modelled(SpanContextEvent, event, headers)


@settings(PROPERTY, max_examples=60)
@given(valid_result, record_headers())
def test_a_valid_result_event_decodes_to_its_model(event: dict[str, Any], headers: Headers) -> None:
    """Any NeMo result event the model accepts decodes to that model, values and types unchanged by the JSON trip."""
    decoded = decode_result(orjson.dumps(event), headers, **OPTIONS)
    assert decoded == modelled(NemoResultEvent, event, headers)
    assert [type(e.value) for e in decoded.evaluations] == [type(e["value"]) for e in event["evaluations"]]


@settings(PROPERTY, max_examples=80)
@given(st.fixed_dictionaries({
    "question_id": st.text(no_controls, min_size=1, max_size=40) | st.integers(0, 2**31),
    "score": (st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)).filter(
        lambda score: score != -1),  # -1 is the judge's "no rating": not a score (test_decode.py)
    "judgment": st.text(max_size=80),
    "model": st.text(max_size=40),
    "tstamp": st.floats(0, 253402300799, allow_nan=False),
    "turn": st.integers(1, 5),
}), st.randoms(use_true_random=False))
def test_a_judge_line_maps_to_one_score_and_a_stable_event_id(line: dict[str, Any], rng: Any) -> None:
    """A scores.jsonl line becomes one quality_assessment score (of its turn); its event id ignores key order and
    spacing."""
    decoded = decode_result(orjson.dumps(line), [], **OPTIONS)
    (evaluation,) = decoded.evaluations
    label = "quality_assessment" if line["turn"] == 1 else f"quality_assessment_turn{line['turn']}"
    assert (decoded.join_key, evaluation.label, evaluation.metric_type, evaluation.value) == (
        str(line["question_id"]), label, "score", line["score"])
    assert evaluation.metadata == {"model": line["model"], "judgement": line["judgment"]}
    assert evaluation.timestamp_ms == int(line["tstamp"] * 1000)
    shuffled = list(line.items())
    rng.shuffle(shuffled)
    again = orjson.dumps(dict(shuffled), option=orjson.OPT_INDENT_2)
    assert decode_result(again, [], **OPTIONS).event_id == decoded.event_id
