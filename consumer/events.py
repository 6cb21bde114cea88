"""The two event kinds the service consumes, as versioned pydantic models.

A *span-context event* says which LLM Observability span answered a question; a *NeMo result event*
carries one or more evaluations of that answer. Both name the same join key (``question_id`` by
default) inside one ``ml_app``. The JSON Schemas under ``docs/schemas/`` are exported from these
models (``python -m consumer schemas docs/schemas``).

Limits are explicit so that a hostile producer cannot exhaust memory and so that nothing is sent
that the intake would refuse: labels follow the intake's rule, numbers are finite, a bool is not a
score, sizes are capped.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema, model_validator

SCHEMA_VERSION: Final = 1

MAX_EVALUATIONS_PER_EVENT = 100
MAX_METADATA_BYTES = 64 * 1024
MAX_TEXT_CHARS = 16 * 1024
MAX_TAGS = 50
# Nesting of a metadata or json value. The whole event nests a few levels deeper, and orjson refuses to
# encode past 254 levels: an unbounded depth would fail later, at the join, on every retry.
MAX_JSON_DEPTH = 32

# The intake's rule for labels: starts with a letter, ASCII letters, digits and underscores, <= 200.
LABEL_PATTERN: Final = r"^[A-Za-z][A-Za-z0-9_]{0,199}$"
Label = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]
MAX_LABEL_CHARS: Final = 200
_NOT_IN_LABEL = re.compile(r"[^A-Za-z0-9_]")
_FIRST_LETTER = re.compile(r"[A-Za-z]")
# Metadata keys the service writes itself (next to ``nemo``): a producer's key of this prefix is refused.
RESERVED_METADATA_PREFIX: Final = "evaljoin_"


def normalise_label(raw: str) -> str | None:
    """``raw`` as Datadog takes it, or None when it cannot be made a label.

    Datadog's rule for evaluation labels ("External Evaluations"): a letter first, then ASCII letters,
    digits and underscores, at most 200 characters; "other characters, including spaces, are converted to
    underscores", Unicode is not supported. So each other character (``-``, ``.``, a space, ``é``) becomes
    ``_``, and what comes before the first ASCII letter is dropped (``1-answer relevancy`` ->
    ``answer_relevancy``). None for a label without an ASCII letter, or longer than 200 characters once
    normalised (cutting it could merge two labels).
    """
    first = _FIRST_LETTER.search(raw)
    if first is None:
        return None
    label = _NOT_IN_LABEL.sub("_", raw[first.start():])
    return label if len(label) <= MAX_LABEL_CHARS else None


def _normalised_label(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # the str type refuses it
    label = normalise_label(value)
    if label is None:
        raise ValueError("a label needs an ASCII letter, and at most 200 characters from the first one on")
    return label


# A label as producers may give it: normalised to the intake's rule (:func:`normalise_label`) on the way in.
LabelInput = Annotated[str, BeforeValidator(_normalised_label), StringConstraints(pattern=LABEL_PATTERN),
                       WithJsonSchema({"type": "string", "minLength": 1, "pattern": "[A-Za-z]",
                                       "description": "Normalised to Datadog's rule: each character other than an "
                                       "ASCII letter, digit or underscore becomes an underscore, and what comes "
                                       "before the first ASCII letter is dropped; at most 200 characters after "
                                       "that."})]
EvalScope = Literal["span", "trace"]
# No control characters: these strings become Redis key parts, Kafka keys and log fields.
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
JoinKeyValue = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")]
# LLMObs.export_span() gives a 128-bit hex trace id and a decimal 64-bit span id.
TraceId = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{1,32}$")]
SpanId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")]
TagValue = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
TimestampMs = Annotated[int, Field(ge=0, le=253402300799999)]  # up to year 9999

MetricType = Literal["score", "categorical", "boolean", "json"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


def _check_finite(value: Any, path: str) -> None:
    """Reject NaN and infinities anywhere in a JSON value: they are not valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} must be a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, f"{path}[{index}]")


def _check_depth(value: Any, path: str, limit: int) -> None:
    """Reject JSON nested deeper than ``limit``; iterative, so that no depth can exhaust the stack."""
    level: list[Any] = [value]
    depth = 0
    while containers := [node for node in level if isinstance(node, dict | list)]:
        depth += 1
        if depth > limit:
            raise ValueError(f"{path} is nested more than {limit} levels deep")
        level = [item for node in containers for item in (node.values() if isinstance(node, dict) else node)]


def _check_json_size(value: Any, path: str, limit: int) -> None:
    _check_depth(value, path, MAX_JSON_DEPTH)
    _check_finite(value, path)
    size = len(orjson.dumps(value))
    if size > limit:
        raise ValueError(f"{path} is {size} bytes, more than the limit of {limit}")


def _scope(value: Any) -> Any:
    if value == "session":
        raise ValueError("eval_scope 'session' is not supported: ddtrace 4.16 builds span and trace evaluations "
                         "only, and a session evaluation joins on a session id, not on a span")
    return value


class Evaluation(_Strict):
    """One evaluation metric for one span, as the intake takes it.

    ``timestamp_ms`` 0 means "not given", as ddtrace reads it (its "now" is the result record's time here).
    ``eval_scope`` ``trace`` makes it an evaluation of the span's whole trace (the span should be its root).
    """

    label: LabelInput
    metric_type: MetricType
    value: Any
    reasoning: Text | None = None
    assessment: Literal["pass", "fail"] | None = None
    metadata: dict[str, Any] | None = None
    tags: dict[Name, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    timestamp_ms: TimestampMs | None = None
    eval_scope: Annotated[EvalScope, BeforeValidator(_scope)] | None = None

    @model_validator(mode="after")
    def _value_matches_type(self) -> Evaluation:
        value = self.value
        if self.metric_type == "score":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("a score value must be a number (a bool is not a score)")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("a score value must be finite")
            if isinstance(value, int) and abs(value) > 2**53:
                raise ValueError("a score value must fit a double exactly")
        elif self.metric_type == "categorical":
            if not isinstance(value, str) or not value or len(value) > 1000:
                raise ValueError("a categorical value must be a non-empty string of at most 1000 characters")
        elif self.metric_type == "boolean":
            if not isinstance(value, bool):
                raise ValueError("a boolean value must be true or false")
        elif not isinstance(value, dict):
            raise ValueError("a json value must be an object")
        else:
            _check_json_size(value, "value", MAX_METADATA_BYTES)
        if self.metadata is not None:
            _check_json_size(self.metadata, "metadata", MAX_METADATA_BYTES)
            reserved = sorted(key for key in self.metadata if key.startswith(RESERVED_METADATA_PREFIX))
            if reserved:
                raise ValueError(f"metadata keys starting with {RESERVED_METADATA_PREFIX!r} are the service's own: "
                                 f"{', '.join(reserved)[:200]}")
        return self


class Provenance(_Strict):
    """Where a result came from. Goes into the evaluation's metadata, never into its label."""

    job_id: Name | None = None
    config: Name | None = None
    target_type: Name | None = None
    target_name: Name | None = None
    model: Name | None = None
    judge: Annotated[list[Name], Field(max_length=10)] | Name | None = None
    evaluated_at_ms: TimestampMs | None = None


class SpanContextEvent(_Strict):
    """An application's statement: span ``span_id`` of trace ``trace_id`` answered ``join_key``.

    ``run_id`` names the run (say, one nightly evaluation over a dataset) the answer belongs to: the
    same join key in another run is another answer, and only results of the same run join it.
    ``ml_app_version`` is the app's version (else its ``ml_app_version`` or ``version`` tag gives it); the
    evaluations of the span carry it.
    """

    schema_version: Literal[1]
    kind: Literal["span_context"] = "span_context"
    ml_app: Name | None = None
    run_id: Name | None = None
    join_key: JoinKeyValue
    trace_id: TraceId
    span_id: SpanId
    tags: dict[Name, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    emitted_at_ms: TimestampMs | None = None
    ml_app_version: Name | None = None


class NemoResultEvent(_Strict):
    """NeMo Evaluator's evaluations of the answer to ``join_key``.

    ``event_id`` is stable: the same result published twice carries the same id, so the second
    copy is recognised and nothing is delivered twice. ``run_id``, when given, is the run of the
    answer it evaluates (see :class:`SpanContextEvent`).
    """

    schema_version: Literal[1]
    kind: Literal["nemo_result"] = "nemo_result"
    event_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{8,128}$")]
    ml_app: Name | None = None
    run_id: Name | None = None
    join_key: JoinKeyValue
    evaluations: Annotated[list[Evaluation], Field(min_length=1, max_length=MAX_EVALUATIONS_PER_EVENT)]
    provenance: Provenance | None = None

