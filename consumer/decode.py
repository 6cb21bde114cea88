"""Kafka record -> validated event, or :class:`InvalidMessage` with a reason.

Each topic accepts two shapes:

* the span topic: a :class:`SpanContextEvent`, or a record of the Datadog guide's ``outputs.json``
  whose ``input.source`` is ``trace_id=..;span_id=..;question_id=..``;
* the result topic: a :class:`NemoResultEvent`, or a line of NeMo's LLM-as-a-judge ``scores.jsonl``
  (``question_id, model, judge, user_prompt, judgment, score, turn, tstamp``), mapped exactly as the
  guide maps it: label ``quality_assessment``, metric_type ``score``, value ``score``, metadata
  ``model`` and ``judgement``, ``timestamp_ms`` from ``tstamp``.

The namespace of an event is its ``ml_app`` field, else the record's ``ml_app`` header, else the
configured default. Decoding is pure: no I/O, so it is safe to call on anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError

from consumer.errors import InvalidMessage
from consumer.events import SCHEMA_VERSION, NemoResultEvent, SpanContextEvent

Headers = Sequence[tuple[str, bytes | None]]
_E = TypeVar("_E", SpanContextEvent, NemoResultEvent)

SEED_LABEL = "quality_assessment"
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


def _join_key_value(raw: Any, name: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise InvalidMessage("schema", f"{name} must be a string or an integer")
    return str(raw)


def _ml_app_header(headers: Headers) -> str | None:
    for key, value in headers:
        if key == "ml_app" and value:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidMessage("invalid_header", "the ml_app header is not UTF-8") from exc
    return None


def _resolve_ml_app(event_app: str | None, headers: Headers, default: str) -> str:
    return event_app or _ml_app_header(headers) or default


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
    return {
        "schema_version": SCHEMA_VERSION,
        "join_key": meta[join_key],
        "trace_id": meta["trace_id"],
        "span_id": meta["span_id"],
    }


def _result_from_judge_line(obj: dict[str, Any], join_key: str) -> dict[str, Any]:
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise InvalidMessage("schema", "score must be a finite number")
    tstamp = obj.get("tstamp")
    if tstamp is not None and (
        isinstance(tstamp, bool) or not isinstance(tstamp, int | float) or not 0 <= tstamp < 253402300800
    ):
        raise InvalidMessage("schema", "tstamp must be a Unix time in seconds")
    try:
        canonical = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:  # nested deeper than orjson encodes (it decodes deeper than it encodes)
        raise InvalidMessage("schema", f"the judge line cannot be encoded again: {exc}") from exc
    evaluation: dict[str, Any] = {
        "label": SEED_LABEL,
        "metric_type": "score",
        "value": score,
        "metadata": {"model": obj.get("model"), "judgement": obj.get("judgment")},
    }
    if tstamp is not None:
        evaluation["timestamp_ms"] = int(tstamp * 1000)
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": "judge-" + hashlib.sha256(canonical).hexdigest()[:40],
        "join_key": _join_key_value(obj.get(join_key), join_key),
        "evaluations": [evaluation],
    }


def decode_span(value: bytes | None, headers: Headers, *, join_key: str, default_ml_app: str,
                max_bytes: int, key: bytes | None = None) -> SpanContextEvent:
    """Decode a record of the span topic. Raises :class:`InvalidMessage`; never anything else."""
    obj = _json_object(key, value, headers, max_bytes, "a span-context event")
    seed = isinstance(obj.get("input"), dict) and "schema_version" not in obj
    fields = _span_from_outputs_record(obj, join_key) if seed else _native(
        obj, "span_context", "span", "neither a span-context event nor an outputs.json record")
    return _validated(SpanContextEvent, fields, headers, default_ml_app)


def decode_result(value: bytes | None, headers: Headers, *, join_key: str, default_ml_app: str,
                  max_bytes: int, key: bytes | None = None) -> NemoResultEvent:
    """Decode a record of the result topic. Raises :class:`InvalidMessage`; never anything else."""
    obj = _json_object(key, value, headers, max_bytes, "a NeMo result event")
    seed = "schema_version" not in obj and "score" in obj and ("judgment" in obj or join_key in obj)
    if seed and join_key not in obj:
        raise InvalidMessage("schema", f"a scores.jsonl judge line without the join key {join_key!r}")
    fields = _result_from_judge_line(obj, join_key) if seed else _native(
        obj, "nemo_result", "result", "neither a NeMo result event nor a scores.jsonl judge line")
    return _validated(NemoResultEvent, fields, headers, default_ml_app)


def _json_object(key: bytes | None, value: bytes | None, headers: Headers, max_bytes: int,
                 what: str) -> dict[str, Any]:
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
    try:
        event = model.model_validate(fields)
    except ValidationError as exc:
        raise _schema_error(exc) from exc
    return event.model_copy(update={"ml_app": _checked_app(_resolve_ml_app(event.ml_app, headers, default_ml_app))})


def _checked_app(ml_app: str) -> str:
    if not ml_app:
        raise InvalidMessage("no_ml_app", "no ml_app field, no ml_app header, and DEFAULT_ML_APP is not set")
    if not 0 < len(ml_app) <= 200 or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in ml_app):
        raise InvalidMessage("schema", "ml_app must be 1 to 200 characters without control characters")
    return ml_app



Event = SpanContextEvent | NemoResultEvent


class RecordDecoder:
    """The decode step: a record of either input topic -> its event, or the :class:`InvalidMessage` saying why not.

    Pure, like the functions it applies: the record's topic chooses :func:`decode_span` or :func:`decode_result`.
    """

    def __init__(self, *, span_topic: str, join_key: str, default_ml_app: str, max_bytes: int) -> None:
        self._span_topic = span_topic
        self._join_key = join_key
        self._default_ml_app = default_ml_app
        self._max_bytes = max_bytes

    def is_span(self, record: Any) -> bool:
        return bool(record.topic == self._span_topic)

    def __call__(self, record: Any) -> Event | InvalidMessage:
        decode = decode_span if self.is_span(record) else decode_result
        try:
            return decode(record.value, list(record.headers or ()), join_key=self._join_key,
                          default_ml_app=self._default_ml_app, max_bytes=self._max_bytes, key=record.key)
        except InvalidMessage as error:
            return error
