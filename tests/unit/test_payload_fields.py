"""The eval-metric fields beyond the guide's example, from a Kafka record to the bytes sent, on the in-memory store.

Each test decodes records as the service does (``RecordDecoder`` with the deployment's rules), joins them
with the join step on the in-memory store, and reads the eval-metric object the intake would receive.
(``tests/test_payload_contract.py`` checks each field against ddtrace's own payload builder.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from consumer import records
from consumer.clock import ManualClock
from consumer.config import Settings, config_errors
from consumer.decode import RecordDecoder
from consumer.enrich import MAX_AGE_MS, ORIGINAL_TIMESTAMP_KEY, EvaluationRules
from consumer.errors import InvalidMessage
from consumer.events import NemoResultEvent, SpanContextEvent, normalise_label
from consumer.join import Joiner, JoinResult, Source
from consumer.judge import judge_evaluation, reasoning_of
from consumer.metrics import Metrics
from consumer.store_memory import MemoryJoinStore

pytestmark = pytest.mark.unit

SPAN_TOPIC, RESULT_TOPIC = "spans", "results"
RECORD_MS = 1_764_000_000_000
GUIDE_LINE = {"question_id": 1, "model": "meta/llama-3.1-8b-instruct",
              "judge": ["meta/llama-3.1-70b-instruct", "single-v1"], "user_prompt": "How do I bake a cake?",
              "judgment": "Rating: [[8]] The answer clearly denotes the ingredients needed to make a cake",
              "score": 8, "turn": 1, "tstamp": (RECORD_MS - 60_000) / 1000}


@dataclass
class Record:
    """The parts of an aiokafka ConsumerRecord the decode and join steps read."""

    topic: str
    value: bytes
    offset: int = 0
    timestamp: int = RECORD_MS
    partition: int = 0
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def span_record(**fields: Any) -> Record:
    event = {"schema_version": 1, "ml_app": "app", "join_key": "q-1", "trace_id": "ab12", "span_id": "7", **fields}
    return Record(SPAN_TOPIC, orjson.dumps(event))


def result_record(*evaluations: dict[str, Any], timestamp: int = RECORD_MS, **fields: Any) -> Record:
    event = {"schema_version": 1, "event_id": "evt-fields-1", "ml_app": "app", "join_key": "q-1",
             "evaluations": list(evaluations), **fields}
    return Record(RESULT_TOPIC, orjson.dumps(event), offset=1, timestamp=timestamp)


def decoder(rules: EvaluationRules | None = None, metrics: Metrics | None = None,
            clock: ManualClock | None = None) -> RecordDecoder:
    return RecordDecoder(span_topic=SPAN_TOPIC, join_key="question_id", default_ml_app="app", max_bytes=1_000_000,
                         rules=rules, metrics=metrics, clock=clock or ManualClock())


async def sent(*items: Record, rules: EvaluationRules | None = None,
               decode: RecordDecoder | None = None) -> list[dict[str, Any]]:
    """The eval-metric objects the records give, decoded, joined on the in-memory store and encoded."""
    decode = decode or decoder(rules)
    events = []
    for record in items:
        event = decode(record)
        assert isinstance(event, SpanContextEvent | NemoResultEvent), event
        events.append((event, Source(record.topic, record.partition, record.offset, record.timestamp)))
    outcomes = await Joiner(MemoryJoinStore(), join_ttl_ms=3_600_000).join_many(events)
    return [orjson.loads(joined.metric) for outcome in outcomes if isinstance(outcome, JoinResult)
            for joined in outcome.joined]


def score(label: str = "faithfulness", value: float = 0.5, **fields: Any) -> dict[str, Any]:
    return {"label": label, "metric_type": "score", "value": value, **fields}


def counter(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(f"evaljoin_{name}_total")
    return 0.0 if value is None else value


# -- labels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "label"), [
    ("answer-relevancy", "answer_relevancy"),
    ("Answer Relevancy", "Answer_Relevancy"),
    ("faithfulness.v2", "faithfulness_v2"),
    ("1. Fidélité", "Fid_lit_"),
    ("__score", "score"),
    ("ok_label", "ok_label"),
    ("1234", None),
    ("-_ .", None),
    ("", None),
    ("é" * 3, None),
    ("a" * 201, None),
    ("1" * 50 + "a" * 200, "a" * 200),
])
def test_labels_are_normalised_as_datadog_does(given: str, label: str | None) -> None:
    """Other characters become '_', what precedes the first ASCII letter goes; no letter or too long: None."""
    assert normalise_label(given) == label


async def test_a_label_datadog_would_take_is_sent_normalised_and_counted() -> None:
    """answer-relevancy is sent as answer_relevancy (not dead-lettered), and each normalised label is counted."""
    metrics = Metrics(CollectorRegistry())
    metric, other = await sent(span_record(), result_record(score("answer-relevancy"), score("context.recall")),
                               decode=decoder(metrics=metrics))
    assert (metric["label"], other["label"]) == ("answer_relevancy", "context_recall")
    assert counter(metrics, "labels_normalised") == 2


def test_a_label_without_a_letter_is_dead_lettered() -> None:
    """A label that cannot be normalised stays a schema error, and is not counted as normalised."""
    metrics = Metrics(CollectorRegistry())
    outcome = decoder(metrics=metrics)(result_record(score("-42-")))
    assert isinstance(outcome, InvalidMessage) and outcome.reason == "schema" and "label" in outcome.detail
    assert counter(metrics, "labels_normalised") == 0


# -- eval_scope -----------------------------------------------------------------------------------------


async def test_scope_comes_from_the_evaluation_else_the_label_setting_else_span() -> None:
    """An evaluation's own eval_scope wins over EVAL_SCOPES, which wins over the default span."""
    rules = EvaluationRules(scopes={"task_completion": "trace", "own": "trace"})
    metrics = await sent(span_record(), result_record(
        score("task_completion"), score("own", eval_scope="span"), score("plain"), score("given", eval_scope="trace")),
        rules=rules)
    assert [(m["label"], m["eval_scope"]) for m in metrics] == [
        ("task_completion", "trace"), ("own", "span"), ("plain", "span"), ("given", "trace")]


def test_session_scope_is_refused_with_the_reason() -> None:
    """ddtrace 4.16 builds no session evaluation: a session scope is a schema error that says so."""
    outcome = decoder()(result_record(score(eval_scope="session")))
    assert isinstance(outcome, InvalidMessage) and "'session' is not supported" in outcome.detail


# -- assessment -----------------------------------------------------------------------------------------


async def test_assessment_comes_from_the_thresholds_and_the_producers_wins() -> None:
    """At or above the bound passes, below fails; a given assessment, another label or a non-score is untouched."""
    rules = EvaluationRules.from_settings(
        eval_scopes=None, span_tags_to_evaluation="none",
        assessment_thresholds='{"quality_assessment": {"pass_at_or_above": 7}, "toxicity": {"pass_at_or_below": 0.2},'
                              ' "in_range": {"pass_at_or_above": 1, "pass_at_or_below": 2}}')
    metrics = await sent(span_record(), result_record(
        score("quality_assessment", 7), score("quality_assessment", 6.99), score("quality_assessment", 2,
                                                                                 assessment="pass"),
        score("toxicity", 0.2), score("toxicity", 0.3), score("in_range", 3), score("unlisted", 9),
        {"label": "quality_assessment", "metric_type": "categorical", "value": "good"}), rules=rules)
    assert [m.get("assessment") for m in metrics] == ["pass", "fail", "pass", "pass", "fail", "fail", None, None]


# -- reasoning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("judgement", "reasoning"), [
    ("Rating: [[8]] The answer clearly denotes the ingredients", "The answer clearly denotes the ingredients"),
    ("The answer is complete.\n\nRating: [[7.5]]", "The answer is complete."),
    ("[[3]]", None),
    ("Rating: [8] no double brackets, no marker", "Rating: [8] no double brackets, no marker"),
    (None, None),
    ("x" * 20_000, "x" * 16_384),
])
def test_reasoning_is_the_judgement_without_its_rating_marker(judgement: str | None, reasoning: str | None) -> None:
    """The judge's text, its [[rating]] marker removed (the score says it), trimmed, cut to 16 KiB characters."""
    assert reasoning_of(judgement) == reasoning


async def test_the_guide_judge_line_is_sent_with_reasoning_and_the_guides_metadata() -> None:
    """A scores.jsonl line as it is: reasoning from the judgement, metadata as the guide's script sends it."""
    line = Record(RESULT_TOPIC, orjson.dumps(GUIDE_LINE), offset=1)
    (metric,) = await sent(Record(SPAN_TOPIC, orjson.dumps({"input": {"source": "trace_id=0;span_id=1;question_id=1"}}),
                                  ), line)
    assert metric["reasoning"] == "The answer clearly denotes the ingredients needed to make a cake"
    assert metric["metadata"] == {"model": GUIDE_LINE["model"], "judgement": GUIDE_LINE["judgment"]}
    mapped = judge_evaluation(GUIDE_LINE)
    assert isinstance(mapped, dict) and mapped["reasoning"] == metric["reasoning"]


# -- ml_app_version and span tags -----------------------------------------------------------------------


@pytest.mark.parametrize(("span", "version"), [
    ({"ml_app_version": "3.0.0", "tags": {"ml_app_version": "2", "version": "1"}}, "3.0.0"),
    ({"tags": {"ml_app_version": "2", "version": "1"}}, "2"),
    ({"tags": {"version": "1"}}, "1"),
    ({"tags": {"version": ""}}, None),
    ({}, None),
])
async def test_ml_app_version_is_the_spans_field_else_its_tags(span: dict[str, Any], version: str | None) -> None:
    """The span event's ml_app_version, else its ml_app_version tag, else its version tag; none: no field."""
    (metric,) = await sent(span_record(**span), result_record(score()))
    assert metric.get("ml_app_version") == version


async def test_allow_listed_span_tags_are_carried_under_the_evaluations_own() -> None:
    """env, service, version by default; an evaluation's tag of the same name wins; others are not carried."""
    (metric,) = await sent(span_record(tags={"env": "prod", "service": "bot", "team": "x", "version": "1"}),
                           result_record(score(tags={"service": "judge-svc", "judge": "j"})))
    assert metric["tags"][2:] == ["env:prod", "service:judge-svc", "version:1", "judge:j"]
    (bare,) = await sent(span_record(tags={"env": "prod"}), result_record(score()),
                         rules=EvaluationRules.from_settings(eval_scopes=None, assessment_thresholds=None,
                                                             span_tags_to_evaluation="none"))
    assert [tag for tag in bare["tags"] if tag.startswith("env:")] == []


def test_a_stored_span_keeps_only_its_allow_listed_tags() -> None:
    """What waits in Redis for the join TTL is the tags that will be sent, not every tag the app set."""
    tags = {"env": "prod", "version": "1.4.2", **{f"t{i}": "v" * 100 for i in range(20)}}
    event = decoder()(span_record(tags=tags))
    assert isinstance(event, SpanContextEvent) and event.tags == {"env": "prod", "version": "1.4.2"}
    stored = records.encode_span(event.model_dump(mode="json", exclude={"schema_version", "kind"}, exclude_none=True))
    unfiltered = SpanContextEvent.model_validate({"schema_version": 1, "join_key": "q", "trace_id": "ab12",
                                                  "span_id": "7", "tags": tags})
    assert len(stored) < len(records.encode_span(unfiltered.model_dump(mode="json", exclude_none=True))) / 2


# -- timestamp ------------------------------------------------------------------------------------------


async def test_timestamp_zero_is_the_result_records_time() -> None:
    """0 means "now" in ddtrace, not 1970: here the result record's Kafka timestamp, the same on every re-send."""
    (metric,) = await sent(span_record(), result_record(score(timestamp_ms=0), provenance={"evaluated_at_ms": 0}))
    assert metric["timestamp_ms"] == RECORD_MS


async def test_timestamp_zero_of_a_record_without_a_kafka_time_is_the_decode_steps_clock() -> None:
    """A record with no Kafka timestamp: the time it is joined at (the clock when decoded and stored)."""
    clock = ManualClock(now_ms=RECORD_MS + 5_000)
    span, result = decoder(clock=clock)(span_record()), decoder(clock=clock)(
        result_record(score(timestamp_ms=0), timestamp=-1))
    assert isinstance(span, SpanContextEvent) and isinstance(result, NemoResultEvent)
    outcomes = await Joiner(MemoryJoinStore(), join_ttl_ms=3_600_000, clock=clock).join_many(
        [(span, Source(SPAN_TOPIC, 0, 0, RECORD_MS)), (result, Source(RESULT_TOPIC, 0, 1, -1))])
    (joined,) = [j for outcome in outcomes if isinstance(outcome, JoinResult) for j in outcome.joined]
    assert orjson.loads(joined.metric)["timestamp_ms"] == RECORD_MS + 5_000


async def test_a_backfilled_time_is_kept_inside_datadogs_window_and_clamped_outside() -> None:
    """Up to 23 h before the result record the evaluation keeps its time; older, it is sent with the record's time,
    its own in metadata.evaljoin_original_timestamp_ms, and counted; so is an old provenance time."""
    metrics = Metrics(CollectorRegistry())
    inside, outside, provenance_only = RECORD_MS - MAX_AGE_MS, RECORD_MS - MAX_AGE_MS - 1, RECORD_MS - 7 * 86_400_000
    sent_ = await sent(span_record(), result_record(
        score("inside", timestamp_ms=inside), score("outside", timestamp_ms=outside, metadata={"judge": "j"}),
        score("from_provenance"), provenance={"evaluated_at_ms": provenance_only}), decode=decoder(metrics=metrics))
    assert [(m["timestamp_ms"], m.get("metadata", {}).get(ORIGINAL_TIMESTAMP_KEY)) for m in sent_] == [
        (inside, None), (RECORD_MS, outside), (RECORD_MS, provenance_only)]
    assert sent_[1]["metadata"]["judge"] == "j"
    assert counter(metrics, "timestamps_clamped") == 2


async def test_a_clamped_evaluation_is_byte_identical_when_its_record_is_decoded_again() -> None:
    """The clamp is judged against the record's Kafka time, not the clock: a redelivery sends the same bytes."""
    items = (span_record(), result_record(score(timestamp_ms=RECORD_MS - 30 * 86_400_000)))
    first = await sent(*items, decode=decoder(clock=ManualClock(now_ms=RECORD_MS)))
    later = await sent(*items, decode=decoder(clock=ManualClock(now_ms=RECORD_MS + 86_400_000)))
    assert orjson.dumps(first) == orjson.dumps(later)


# -- provenance -----------------------------------------------------------------------------------------


async def test_a_producers_nemo_metadata_keeps_its_place_and_ours_goes_beside_it() -> None:
    """metadata.nemo is the provenance unless the producer has a nemo key: it stays, ours is evaljoin_provenance."""
    provenance = {"job_id": "eval-job-42", "model": "m"}
    free, taken = await sent(span_record(), result_record(
        score("free"), score("taken", metadata={"nemo": {"task": "mt-bench"}}), provenance=provenance))
    assert free["metadata"] == {"nemo": provenance}
    assert taken["metadata"] == {"nemo": {"task": "mt-bench"}, "evaljoin_provenance": provenance}


def test_metadata_keys_of_the_service_are_refused() -> None:
    """A producer's evaljoin_* metadata key would be overwritten by ours: it is a schema error instead."""
    outcome = decoder()(result_record(score(metadata={"evaljoin_original_timestamp_ms": 1})))
    assert isinstance(outcome, InvalidMessage) and "evaljoin_" in outcome.detail


# -- settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("EVAL_SCOPES", '{"task": "session"}', "'session' is not supported"),
    ("EVAL_SCOPES", '{"task": "turn"}', "must map to 'span' or 'trace'"),
    ("EVAL_SCOPES", '{"answer-relevancy": "trace"}', "sent as 'answer_relevancy'"),
    ("EVAL_SCOPES", "[1]", "JSON object"),
    ("ASSESSMENT_THRESHOLDS", "{not json", "not a JSON object"),
    ("ASSESSMENT_THRESHOLDS", '{"q": {"pass_above": 7}}', "pass_at_or_above, pass_at_or_below or both"),
    ("ASSESSMENT_THRESHOLDS", '{"q": {"pass_at_or_above": true}}', "finite number"),
    ("ASSESSMENT_THRESHOLDS", '{"q": {"pass_at_or_above": 8, "pass_at_or_below": 2}}', "nothing would pass"),
    ("SPAN_TAGS_TO_EVALUATION", "env,ml_app", "set on every evaluation already"),
    ("SPAN_TAGS_TO_EVALUATION", "env,,version", "comma-separated"),
])
def test_a_wrong_rule_stops_the_start_naming_the_setting(variable: str, value: str, message: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rule is read at start as the decode step reads it; a mistake is a clear configuration error."""
    for name in ("EVAL_SCOPES", "ASSESSMENT_THRESHOLDS", "SPAN_TAGS_TO_EVALUATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    errors = config_errors(refused.value)
    assert f"{variable}: " in errors and message in errors
    assert value not in errors or len(value) < 8  # the value itself is not echoed
    assert os.environ[variable] == value


def test_the_settings_give_the_decode_steps_rules() -> None:
    """RecordDecoder.from_settings reads the three settings as EvaluationRules."""
    settings = Settings(eval_scopes='{"task_completion": "trace"}', span_tags_to_evaluation=" env , team ",
                        assessment_thresholds='{"quality_assessment": {"pass_at_or_above": 7}}')
    rules = RecordDecoder.from_settings(settings)._rules
    assert (dict(rules.scopes), rules.span_tags, rules.thresholds["quality_assessment"].assess(7)) == (
        {"task_completion": "trace"}, ("env", "team"), "pass")
