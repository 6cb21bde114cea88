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
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

SCHEMA_VERSION: Final = 1

MAX_EVALUATIONS_PER_EVENT = 100
MAX_METADATA_BYTES = 64 * 1024
MAX_TEXT_CHARS = 16 * 1024
MAX_TAGS = 50
# Nesting of a metadata or json value. The whole event nests a few levels deeper, and orjson refuses to
# encode past 254 levels: an unbounded depth would fail later, at the join, on every retry.
MAX_JSON_DEPTH = 32

# The intake's rule for labels: starts with a letter, ASCII letters, digits and underscores, <= 200.
Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,199}$")]
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


class Evaluation(_Strict):
    """One evaluation metric for one span, as the intake takes it."""

    label: Label
    metric_type: MetricType
    value: Any
    reasoning: Text | None = None
    assessment: Literal["pass", "fail"] | None = None
    metadata: dict[str, Any] | None = None
    tags: dict[Name, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    timestamp_ms: TimestampMs | None = None

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

