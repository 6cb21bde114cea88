"""Kafka record -> validated event, or :class:`InvalidMessage` with a reason (:class:`NotSent`: nothing to send).

Each topic accepts two shapes:

* the span topic: a :class:`SpanContextEvent`, or a record of the Datadog guide's ``outputs.json``
  whose ``input.source`` is ``trace_id=..;span_id=..;question_id=..`` (and, optionally, ``;run_id=..``);
* the result topic: a :class:`NemoResultEvent`, or a line of NeMo's LLM-as-a-judge ``scores.jsonl``
  (``question_id, model, judge, user_prompt, judgment, score, turn, tstamp``), mapped by
  :func:`consumer.judge.judge_evaluation`, the rule the NeMo publisher maps the same lines by: for turn 1
  what the guide gives (label ``quality_assessment``, metric_type ``score``, value ``score``, metadata
  ``model`` and ``judgement``, ``timestamp_ms`` from ``tstamp``), with the judge and the judged model
  as tags. A line without a rating (``-1``, ``null``, ``NaN``) is :class:`NotSent` (``unrated``), and
  so is a line about another model than the judged model (``other_model``) when one is given (the
  record's ``judged_model`` header, else ``JUDGED_MODEL``).

The namespace of an event is its ``ml_app`` field, else the record's ``ml_app`` header, else the
configured default; and its run, if any: its ``run_id`` field (a ``run_id`` key of an ``outputs.json``
source, a ``run_id`` field of a judge line), else the record's ``run_id`` header. Decoding is pure:
no I/O, so it is safe to call on anything.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from pydantic import ValidationError

from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.enrich import EvaluationRules
from consumer.errors import InvalidMessage, NotSent
from consumer.events import SCHEMA_VERSION, NemoResultEvent, SpanContextEvent
from consumer.judge import JUDGE_LABEL, JudgeLineError, OtherModel, Unrated, judge_evaluation
from consumer.kafka_records import UNDECODABLE_BATCH, invalid_header_name

if TYPE_CHECKING:
    from consumer.config import Settings
    from consumer.metrics import Metrics

Headers = Sequence[tuple[str, bytes | None]]
_E = TypeVar("_E", SpanContextEvent, NemoResultEvent)

SEED_LABEL = JUDGE_LABEL
RUN_ID = "run_id"  # the run's name everywhere: the event field, the source key, the judge line field, the header
JUDGED_MODEL_HEADER = "judged_model"
_DETAIL_LIMIT = 1000


def record_bytes(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """The size ``MAX_MESSAGE_BYTES`` limits: the key, the value, and each header's name and value.

    Headers and key count because the consumer holds them in memory with the value and a dead-lettered
    copy carries them: a record with a small value and a megabyte of headers is just as large.
    """
    header_bytes = sum(len(name.encode("utf-8", "surrogatepass")) + len(data or b"") for name, data in headers)
    return len(key or b"") + len(value or b"") + header_bytes


def _check_size(key: bytes | None, value: bytes | None, headers: Headers, max_bytes: int) -> None:
    size = record_bytes(key, value, headers)
    if size > max_bytes:
        raise InvalidMessage("oversize", f"the record is {size} bytes (value {len(value or b'')}, key and headers "
                                         f"{size - len(value or b'')}), the limit is {max_bytes}")


def _parse_json(value: bytes | None) -> Any:
    if value is None or not value:
        raise InvalidMessage("empty", "the record has no value")
    try:
        # orjson rejects invalid UTF-8, NaN/Infinity literals, out-of-range numbers and deep nesting.
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("invalid_json", str(exc)[:_DETAIL_LIMIT]) from exc


def _schema_error(exc: ValidationError) -> InvalidMessage:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return InvalidMessage("schema", "; ".join(parts)[:_DETAIL_LIMIT])


def _brief(value: Any) -> str:
    """A value for an error detail, short. A container only by its type: str() of a deeply nested one
    (JSON allows 1024 levels) exhausts Python's stack, and the error would escape decoding."""
    return type(value).__name__ if isinstance(value, dict | list) else str(value)[:40]


def _check_version(obj: dict[str, Any]) -> None:
    version = obj.get("schema_version")
    # An integer, not just something equal to one: true and 1.0 compare equal to 1 (and pass Literal[1]).
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidMessage(
            "unsupported_schema_version",
            f"schema_version {_brief(version)!r} is not supported (this consumer reads {SCHEMA_VERSION})",
        )


def _judge_line_with_nan_score(value: bytes, join_key: str) -> dict[str, Any] | None:
    """A judge line whose score is ``NaN`` (Python's ``json.dumps`` writes an unrated score so), else None.

    Only there is NaN read: anywhere else, and any other number JSON has no room for, stays ``invalid_json``.
    """
    if b"NaN" not in value:
        return None
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return math.nan

    try:
        obj = json.loads(value.decode("utf-8"), parse_constant=constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(obj, dict) or "schema_version" in obj or constants != ["NaN"] or (
            "judgment" not in obj and join_key not in obj):
        return None
    score = obj.get("score")
    if not isinstance(score, float) or not math.isnan(score):
        return None
    # The reader turns 1e400 into infinity, where orjson refuses it.
    return obj if all(math.isfinite(n) for n in _floats(obj, skip="score")) else None


def _floats(obj: dict[str, Any], *, skip: str) -> list[float]:
    """Every float in ``obj`` but its member ``skip``; iterative, so that no nesting exhausts the stack."""
    found: list[float] = []
    stack: list[Any] = [item for name, item in obj.items() if name != skip]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _join_key_value(raw: Any, name: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise InvalidMessage("schema", f"{name} must be a string or an integer")
    return str(raw)


def _header(headers: Headers, name: str) -> str | None:
    """The first non-empty header ``name``, decoded; ``invalid_header`` if it is not UTF-8."""
    for key, value in headers:
        if key == name and value:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidMessage("invalid_header", f"the {name} header is not UTF-8") from exc
    return None


def _resolve_ml_app(event_app: str | None, headers: Headers, default: str) -> str:
    return event_app or _header(headers, "ml_app") or default


def parse_source(source: str) -> dict[str, str]:
    """The guide's ``input.source`` (``trace_id=..;span_id=..;question_id=..``) as a dict; a part that is not
    ``key=value`` raises :class:`InvalidMessage`."""
    meta: dict[str, str] = {}
    for part in source.split(";"):
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidMessage("schema", f"input.source part {part[:80]!r} is not key=value")
        meta[key.strip()] = value.strip()
    return meta


def _span_from_outputs_record(obj: dict[str, Any], join_key: str) -> dict[str, Any]:
    source = obj["input"].get("source")
    if not isinstance(source, str):
        raise InvalidMessage("schema", "input.source must be a string trace_id=..;span_id=..;<join key>=..")
    meta = parse_source(source)
    missing = [name for name in ("trace_id", "span_id", join_key) if not meta.get(name)]
    if missing:
        raise InvalidMessage("schema", f"input.source lacks {', '.join(missing)}")
    fields = {
        "schema_version": SCHEMA_VERSION,
        "join_key": meta[join_key],
        "trace_id": meta["trace_id"],
        "span_id": meta["span_id"],
    }
    if meta.get(RUN_ID):
        fields[RUN_ID] = meta[RUN_ID]
    return fields


def _result_from_judge_line(obj: dict[str, Any], join_key: str, judged_model: str | None) -> dict[str, Any]:
    key = _join_key_value(obj.get(join_key), join_key)
    run = obj.get(RUN_ID)
    if run is not None and (isinstance(run, bool) or not isinstance(run, str | int)):
        raise InvalidMessage("schema", f"{RUN_ID} must be a string or an integer")
    try:
        mapped = judge_evaluation(obj, label=SEED_LABEL, judged_model=judged_model)
    except JudgeLineError as exc:
        raise InvalidMessage("schema", str(exc)) from exc
    if isinstance(mapped, OtherModel):
        raise NotSent("other_model", f"{join_key} {key[:80]!r}: a judgement of model {mapped.model[:100]!r}, "
                                     f"not of the judged model {mapped.judged_model[:100]!r}")
    if isinstance(mapped, Unrated):
        raise NotSent("unrated", f"{join_key} {key[:80]!r}, {mapped.label}: {mapped.describe()}", cause=mapped.cause)
    try:
        canonical = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:  # nested deeper than orjson encodes (it decodes deeper than it encodes)
        raise InvalidMessage("schema", f"the judge line cannot be encoded again: {exc}") from exc
    fields = {
        "schema_version": SCHEMA_VERSION,
        "event_id": "judge-" + hashlib.sha256(canonical).hexdigest()[:40],
        "join_key": key,
        "evaluations": [mapped],
    }
    if run is not None and run != "":
        fields[RUN_ID] = str(run)
    return fields


def decode_span(value: bytes | None, headers: Headers, *, join_key: str, default_ml_app: str,
                max_bytes: int, key: bytes | None = None, judged_model: str | None = None) -> SpanContextEvent:
    """Decode a record of the span topic. Raises :class:`InvalidMessage`; never anything else.

    ``judged_model`` is the result topic's; it is taken here only so that both decoders are called alike.
    """
    obj = _json_object(key, value, headers, max_bytes, "a span-context event")
    seed = isinstance(obj.get("input"), dict) and "schema_version" not in obj
    fields = _span_from_outputs_record(obj, join_key) if seed else _native(
        obj, "span_context", "span", "neither a span-context event nor an outputs.json record")
    return _validated(SpanContextEvent, fields, headers, default_ml_app)


def decode_result(value: bytes | None, headers: Headers, *, join_key: str, default_ml_app: str,
                  max_bytes: int, key: bytes | None = None, judged_model: str | None = None) -> NemoResultEvent:
    """Decode a record of the result topic. Raises :class:`InvalidMessage` or :class:`NotSent`; never anything else.

    ``judged_model`` (``JUDGED_MODEL``; the record's ``judged_model`` header wins) keeps only the judge
    lines about that model. A label Datadog would take after normalising it (``answer-relevancy``) is
    normalised (:func:`consumer.events.normalise_label`); one without an ASCII letter is ``schema``.
    """
    return _decode_result(value, headers, join_key=join_key, default_ml_app=default_ml_app, max_bytes=max_bytes,
                          key=key, judged_model=judged_model)[0]


def _decode_result(value: bytes | None, headers: Headers, *, join_key: str, default_ml_app: str,
                   max_bytes: int, key: bytes | None, judged_model: str | None) -> tuple[NemoResultEvent, int]:
    """The event of a result record, and how many of its labels were normalised."""
    try:
        obj = _json_object(key, value, headers, max_bytes, "a NeMo result event")
    except InvalidMessage as error:
        found = _judge_line_with_nan_score(value, join_key) if error.reason == "invalid_json" and value else None
        if found is None:
            raise
        obj = found
    seed = "schema_version" not in obj and "score" in obj and ("judgment" in obj or join_key in obj)
    if seed and join_key not in obj:
        raise InvalidMessage("schema", f"a scores.jsonl judge line without the join key {join_key!r}")
    if seed:
        fields = _result_from_judge_line(obj, join_key, _header(headers, JUDGED_MODEL_HEADER) or judged_model)
    else:
        fields = _native(obj, "nemo_result", "result", "neither a NeMo result event nor a scores.jsonl judge line")
    event = _validated(NemoResultEvent, fields, headers, default_ml_app)
    given = [evaluation.get("label") if isinstance(evaluation, dict) else None
             for evaluation in fields.get("evaluations") or ()]
    return event, sum(raw != evaluation.label for raw, evaluation in zip(given, event.evaluations, strict=False))


def _check_header_names(headers: Headers) -> None:
    """``undecodable_batch`` for the record that stands for a batch aiokafka could not read, ``invalid_header``
    for a header name that is not UTF-8 (:mod:`consumer.kafka_records` reads both without raising)."""
    for name, data in headers:
        if name == UNDECODABLE_BATCH:
            raise InvalidMessage("undecodable_batch", (data or b"").decode("utf-8", "replace")[:_DETAIL_LIMIT])
        raw = invalid_header_name(name)
        if raw is not None:
            raise InvalidMessage("invalid_header", f"the header name {raw[:100]!r} is not UTF-8")


def _json_object(key: bytes | None, value: bytes | None, headers: Headers, max_bytes: int,
                 what: str) -> dict[str, Any]:
    _check_header_names(headers)
    _check_size(key, value, headers, max_bytes)
    obj = _parse_json(value)
    if not isinstance(obj, dict):
        raise InvalidMessage("schema", f"{what} must be a JSON object")
    return obj


def _native(obj: dict[str, Any], kind: str, topic: str, neither: str) -> dict[str, Any]:
    """A native event's fields, once its version and kind fit this topic (``neither``: what to say otherwise)."""
    if "schema_version" not in obj:
        raise InvalidMessage("schema", neither)
    _check_version(obj)
    if obj.get("kind", kind) != kind:
        raise InvalidMessage("wrong_topic", f"a {_brief(obj.get('kind'))!r} event on the {topic} topic")
    return obj


def _validated(model: type[_E], fields: dict[str, Any], headers: Headers, default_ml_app: str) -> _E:
    if fields.get(RUN_ID) is None:
        run = _header(headers, RUN_ID)
        if run is not None:
            fields = {**fields, RUN_ID: run}
    try:
        event = model.model_validate(fields)
    except ValidationError as exc:
        raise _schema_error(exc) from exc
    if event.ml_app:  # the event's own, already held to _checked_app's rule by the model (Name): no copy to make
        return event
    return event.model_copy(update={"ml_app": _checked_app(_resolve_ml_app(event.ml_app, headers, default_ml_app))})


def _checked_app(ml_app: str) -> str:
    if not ml_app:
        raise InvalidMessage("no_ml_app", "no ml_app field, no ml_app header, and DEFAULT_ML_APP is not set")
    if not 0 < len(ml_app) <= 200 or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in ml_app):
        raise InvalidMessage("schema", "ml_app must be 1 to 200 characters without control characters")
    return ml_app



Event = SpanContextEvent | NemoResultEvent


class RecordDecoder:
    """The decode step: a record of either input topic -> its event, or the :class:`InvalidMessage` saying why not
    (or the :class:`NotSent` saying why it gives nothing to send).

    The record's topic chooses :func:`decode_span` or :func:`decode_result`; then the deployment's
    :class:`~consumer.enrich.EvaluationRules` give the event as it is stored. Pure but for the clock, read
    only for a record without a Kafka timestamp (an evaluation's time is judged against the record's).
    Counts the labels normalised and the times clamped, when given ``metrics``.
    """

    def __init__(self, *, span_topic: str, join_key: str, default_ml_app: str, max_bytes: int,
                 judged_model: str | None = None, rules: EvaluationRules | None = None,
                 metrics: Metrics | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._span_topic = span_topic
        self._join_key = join_key
        self._default_ml_app = default_ml_app
        self._max_bytes = max_bytes
        self._judged_model = judged_model
        self._rules = rules or EvaluationRules()
        self._metrics = metrics
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics: Metrics | None = None,
                      clock: Clock = SYSTEM_CLOCK) -> RecordDecoder:
        return cls(span_topic=settings.span_topic, join_key=settings.join_key,
                   default_ml_app=settings.default_ml_app or "", max_bytes=settings.max_message_bytes,
                   judged_model=settings.judged_model, rules=EvaluationRules.from_settings(
                       eval_scopes=settings.eval_scopes, assessment_thresholds=settings.assessment_thresholds,
                       span_tags_to_evaluation=settings.span_tags_to_evaluation),
                   metrics=metrics, clock=clock)

    def is_span(self, record: Any) -> bool:
        return bool(record.topic == self._span_topic)

    def __call__(self, record: Any) -> Event | InvalidMessage | NotSent:
        headers = list(record.headers or ())
        try:
            if self.is_span(record):
                return self._rules.span(decode_span(
                    record.value, headers, join_key=self._join_key, default_ml_app=self._default_ml_app,
                    max_bytes=self._max_bytes, key=record.key))
            event, normalised = _decode_result(
                record.value, headers, join_key=self._join_key, default_ml_app=self._default_ml_app,
                max_bytes=self._max_bytes, key=record.key, judged_model=self._judged_model)
        except (InvalidMessage, NotSent) as error:
            return error
        applied = self._rules.result(event, record.timestamp if record.timestamp > 0 else self._clock.now_ms())
        if self._metrics is not None:
            if normalised:
                self._metrics.labels_normalised.inc(normalised)
            if applied.timestamps_clamped:
                self._metrics.timestamps_clamped.inc(applied.timestamps_clamped)
        return applied.event
