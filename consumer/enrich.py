"""What the service adds to a decoded event before it is stored: the deployment's evaluation rules.

The decode step applies them (:class:`consumer.decode.RecordDecoder`), once per record, so the records
in the join store already carry what they decide, and :func:`consumer.payload.build_metric` stays a pure
function of the two stored records: a re-sent evaluation is byte-identical even after the rules change.

* **Scope** (``EVAL_SCOPES``, label -> ``span`` | ``trace``): the ``eval_scope`` of an evaluation that
  gives none. ``trace`` evaluates the span's whole trace (the span should be the trace's root).
* **Assessment** (``ASSESSMENT_THRESHOLDS``, label -> bounds): ``pass`` or ``fail`` for a score
  evaluation that gives none; an assessment the producer gave always wins.
* **Time**: an evaluation's time (its ``timestamp_ms``, else the provenance's ``evaluated_at_ms``; ``0``
  is "not given", as in ddtrace) is kept while it is at most :data:`MAX_AGE_MS` older than the result
  record (its Kafka timestamp). Datadog's HTTP API takes data at most 24 hours old; an older time is
  replaced by the record's, the original kept in ``metadata.evaljoin_original_timestamp_ms``.
* **Span tags** (``SPAN_TAGS_TO_EVALUATION``): only these tags of a span-context event are kept (and
  so stored); each evaluation joined to the span carries them. ``ml_app_version`` is the event's field,
  else its ``ml_app_version`` tag, else its ``version`` tag.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from consumer.events import LABEL_PATTERN, EvalScope, NemoResultEvent, SpanContextEvent, normalise_label

HOUR_MS: Final = 3_600_000
# Datadog's HTTP API reference: "The API accepts spans with timestamps no more than 24 hours old". The hour
# kept back is for the way from the result record to the intake (consumer lag, a span that comes a little later).
MAX_AGE_MS: Final = 23 * HOUR_MS
ORIGINAL_TIMESTAMP_KEY: Final = "evaljoin_original_timestamp_ms"
DEFAULT_SPAN_TAGS: Final = ("env", "service", "version")
NO_SPAN_TAGS: Final = "none"  # SPAN_TAGS_TO_EVALUATION=none: carry no span tag (an empty variable is the default)
RESERVED_TAGS: Final = frozenset({"ml_app", "ddtrace.version"})  # what every evaluation's tags begin with
MAX_SPAN_TAGS: Final = 50
_TAG_NAME = re.compile(r"^[^\x00-\x1f\x7f,]{1,200}$")
_BOUNDS: Final = ("pass_at_or_above", "pass_at_or_below")


@dataclass(frozen=True)
class Threshold:
    """Bounds a score passes within: at or above ``pass_at_or_above`` and at or below ``pass_at_or_below``."""

    pass_at_or_above: float | None = None
    pass_at_or_below: float | None = None

    def assess(self, value: float) -> Literal["pass", "fail"]:
        low, high = self.pass_at_or_above, self.pass_at_or_below
        return "pass" if (low is None or value >= low) and (high is None or value <= high) else "fail"


@dataclass(frozen=True)
class Applied:
    """What the rules changed in one result event: counted by the decode step."""

    event: NemoResultEvent
    timestamps_clamped: int = 0


@dataclass(frozen=True)
class EvaluationRules:
    """The deployment's rules; the defaults (no scope, no threshold, env/service/version carried) are the service's."""

    scopes: Mapping[str, EvalScope] = field(default_factory=dict)
    thresholds: Mapping[str, Threshold] = field(default_factory=dict)
    span_tags: tuple[str, ...] = DEFAULT_SPAN_TAGS

    @classmethod
    def from_settings(cls, *, eval_scopes: str | None, assessment_thresholds: str | None,
                      span_tags_to_evaluation: str) -> EvaluationRules:
        return cls(scopes=parse_scopes(eval_scopes), thresholds=parse_thresholds(assessment_thresholds),
                   span_tags=parse_span_tags(span_tags_to_evaluation))

    def span(self, event: SpanContextEvent) -> SpanContextEvent:
        """The event as it is stored: its allow-listed tags only, and its ``ml_app_version`` resolved."""
        version = event.ml_app_version or event.tags.get("ml_app_version") or event.tags.get("version") or None
        tags = {name: value for name, value in event.tags.items() if name in self.span_tags}
        return event.model_copy(update={"tags": tags, "ml_app_version": version})

    def result(self, event: NemoResultEvent, record_ms: int) -> Applied:
        """The event as it is stored: scopes, assessments and times decided. ``record_ms``: the record's time."""
        evaluated_at = event.provenance.evaluated_at_ms if event.provenance else None
        clamped = changed = 0
        evaluations = []
        for evaluation in event.evaluations:
            update: dict[str, Any] = {}
            if evaluation.eval_scope is None and evaluation.label in self.scopes:
                update["eval_scope"] = self.scopes[evaluation.label]
            threshold = self.thresholds.get(evaluation.label)
            if evaluation.assessment is None and threshold is not None and evaluation.metric_type == "score":
                update["assessment"] = threshold.assess(evaluation.value)
            when = evaluation.timestamp_ms or evaluated_at
            if when and when < record_ms - MAX_AGE_MS:
                update["timestamp_ms"] = record_ms
                update["metadata"] = {**(evaluation.metadata or {}), ORIGINAL_TIMESTAMP_KEY: when}
                clamped += 1
            changed += bool(update)
            evaluations.append(evaluation.model_copy(update=update) if update else evaluation)
        if not changed:
            return Applied(event)
        return Applied(event.model_copy(update={"evaluations": evaluations}), clamped)


def _json_object(raw: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object whose keys are labels")
    return value


def _label_key(label: str) -> str:
    if not re.match(LABEL_PATTERN, label):
        normalised = normalise_label(label)
        hint = f" (evaluations labelled {label!r} are sent as {normalised!r}: name that)" if normalised else ""
        raise ValueError(f"{label[:80]!r} is not a label as Datadog takes it{hint}")
    return label


def parse_scopes(raw: str | None) -> dict[str, EvalScope]:
    """``EVAL_SCOPES``: ``{"<label>": "span" | "trace"}``."""
    if raw is None:
        return {}
    scopes: dict[str, EvalScope] = {}
    for label, scope in _json_object(raw).items():
        _label_key(label)
        if scope == "session":
            raise ValueError(f"{label!r}: 'session' is not supported (ddtrace 4.16 builds span and "
                             "trace evaluations only, and a session evaluation joins on a session id, not a span)")
        if scope not in ("span", "trace"):
            raise ValueError(f"{label!r} must map to 'span' or 'trace'")
        scopes[label] = scope
    return scopes


def parse_thresholds(raw: str | None) -> dict[str, Threshold]:
    """``ASSESSMENT_THRESHOLDS``: ``{"<label>": {"pass_at_or_above": 7}}`` (or ``pass_at_or_below``, or both)."""
    if raw is None:
        return {}
    thresholds: dict[str, Threshold] = {}
    for label, bounds in _json_object(raw).items():
        _label_key(label)
        if not isinstance(bounds, dict) or not bounds or set(bounds) - set(_BOUNDS):
            raise ValueError(f"{label!r} must be an object with pass_at_or_above, "
                             "pass_at_or_below or both")
        for bound, value in bounds.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{label!r}: {bound} must be a finite number")
        low, high = bounds.get("pass_at_or_above"), bounds.get("pass_at_or_below")
        if low is not None and high is not None and low > high:
            raise ValueError(f"{label!r}: pass_at_or_above is above pass_at_or_below, "
                             "so nothing would pass")
        thresholds[label] = Threshold(low, high)
    return thresholds


def parse_span_tags(raw: str) -> tuple[str, ...]:
    """``SPAN_TAGS_TO_EVALUATION``: tag names, comma-separated; ``none`` for no tag."""
    if raw.strip().lower() == NO_SPAN_TAGS:
        return ()
    names = tuple(dict.fromkeys(name.strip() for name in raw.split(",")))
    for name in names:
        if not _TAG_NAME.match(name):
            raise ValueError("must be tag names (1 to 200 characters, no control "
                             f"characters), comma-separated, or {NO_SPAN_TAGS!r}")
        if name in RESERVED_TAGS:
            raise ValueError(f"{name!r} is set on every evaluation already, from the "
                             "span's ml_app and the ddtrace version")
    if len(names) > MAX_SPAN_TAGS:
        raise ValueError(f"names more than {MAX_SPAN_TAGS} tags")
    return names
