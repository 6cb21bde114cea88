"""A judge line -> one evaluation, by one rule, on every path a line can take.

A judge line is a line of MT-bench's single-answer grading output as NeMo Evaluator's LLM-as-a-judge
and FastChat's ``gen_judgment.py`` write it (the ``scores.jsonl`` of Datadog's guide)::

    {"question_id": 1, "model": "meta/llama-3.1-8b-instruct", "judge": ["<judge model>", "single-v1"],
     "user_prompt": "...", "judgment": "Rating: [[8]] ...", "score": 8, "turn": 1, "tstamp": 1740429821.1}

It reaches Datadog on two paths: published as it is to the result topic (the service decodes it,
:mod:`consumer.decode`), or mapped by the NeMo publisher (``producer_examples/nemo/mapping.py``).
Both call :func:`judge_evaluation`, so the same line gives the same evaluation:

* **label**: the judge label (``quality_assessment``, the guide's) for turn 1 or a line without a
  turn; ``<label>_turn<N>`` for turn N >= 2, so that the answers to the follow-up question of a
  multi-turn question are their own metric.
* **value**: ``score``, as a ``score`` metric. ``-1`` (what the judge writes when it could not parse
  a rating), ``null`` and ``NaN`` are not ratings: the line gives no evaluation, :class:`Unrated`
  with the cause, which every path counts and reports instead of sending.
* **tags**: ``judge:<judge model>``, ``judge_prompt:<prompt name>`` and ``model:<judged model>``,
  those the line has: several judges or judged models of one question stay apart in Datadog.
* **metadata**: ``model`` and ``judgement``, as the guide maps them (the judgement is the judge's text).
* **reasoning**: the judgement without its rating marker (``Rating: [[8]]``, ``[[8]]``: the score says it),
  trimmed, at most 16 KiB characters (:data:`consumer.events.MAX_TEXT_CHARS`): Datadog shows an
  evaluation's ``reasoning`` beside its score. None when nothing is left.
* **timestamp_ms**: from ``tstamp`` (seconds).
* **judged model**: given one (the app's model), a line about another model gives no evaluation
  (:class:`OtherModel`): a judgement file holds the answers of several models to the same questions,
  and only the app's own answers are its spans'.

What a path adds beyond the line is its own context: the NeMo publisher's ``task:<task>`` tag and
the job's provenance (``metadata.nemo``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from consumer.events import MAX_TEXT_CHARS

JUDGE_LABEL: Final = "quality_assessment"  # Datadog's guide's label for a judge's score
UNPARSED_RATING: Final = -1  # MT-bench / FastChat: the judge's "[[rating]]" could not be parsed
MAX_TURN: Final = 1000
MAX_TAG_CHARS: Final = 200  # events.TagValue
_MAX_UNIX_SECONDS: Final = 253402300800  # year 10000: events.TimestampMs ends in year 9999
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# MT-bench's rating marker, as its judge prompts ask for it ("Rating: [[5]]") and FastChat parses it.
_RATING_MARKER = re.compile(r"(?:\bRating:[ \t]*)?\[\[[ \t]*-?\d+(?:\.\d+)?[ \t]*\]\]")

UnratedCause = Literal["unparsed_rating", "missing", "nan"]
UNRATED_CAUSES: Final[tuple[UnratedCause, ...]] = ("unparsed_rating", "missing", "nan")


@dataclass(frozen=True)
class Unrated:
    """The judge gave no rating: ``-1`` (``unparsed_rating``), ``null`` (``missing``) or ``NaN`` (``nan``)."""

    label: str
    cause: UnratedCause

    def describe(self) -> str:
        return {"unparsed_rating": "score -1: the judge's rating could not be parsed",
                "missing": "score null: the judge gave no rating",
                "nan": "score NaN: the judge gave no rating"}[self.cause]


@dataclass(frozen=True)
class OtherModel:
    """The line judges another model's answer than the app's."""

    model: str
    judged_model: str


class JudgeLineError(ValueError):
    """The line cannot be mapped: a score that is not a number, a turn or time that is not one."""


def _text(value: Any) -> str | None:
    """A name for a tag: control characters become spaces, at most 200 characters; None if empty."""
    if not isinstance(value, str):
        return None
    value = _CONTROL.sub(" ", value).strip()[:MAX_TAG_CHARS]
    return value or None


def judge_names(line: dict[str, Any]) -> tuple[str | None, str | None]:
    """(judge model, prompt name) of a line: MT-bench writes ``judge`` as ``[model, prompt]``, some as one name."""
    judge = line.get("judge")
    if isinstance(judge, list):
        return (_text(judge[0]) if judge else None), (_text(judge[1]) if len(judge) > 1 else None)
    return _text(judge), None


def turn_of(line: dict[str, Any]) -> int:
    """The line's turn: 1 when it has none; an integer from 1 to :data:`MAX_TURN`."""
    turn = line.get("turn")
    if turn is None:
        return 1
    if isinstance(turn, bool) or not isinstance(turn, int) or not 1 <= turn <= MAX_TURN:
        raise JudgeLineError(f"turn must be an integer from 1 to {MAX_TURN}")
    return turn


def label_for_turn(label: str, turn: int) -> str:
    """The label of a judgement of ``turn``: ``label`` for turn 1, ``<label>_turn<N>`` after."""
    return label if turn == 1 else f"{label}_turn{turn}"


def reasoning_of(judgement: Any) -> str | None:
    """The ``reasoning`` of a judgement: its text without the rating marker, trimmed and cut; None if none is left."""
    if not isinstance(judgement, str):
        return None
    text = _RATING_MARKER.sub("", judgement).strip()[:MAX_TEXT_CHARS]
    return text or None


def judge_evaluation(line: dict[str, Any], *, label: str = JUDGE_LABEL,
                     judged_model: str | None = None) -> dict[str, Any] | Unrated | OtherModel:
    """The evaluation of one judge line (the fields of :class:`consumer.events.Evaluation`), or why there is none.

    Raises :class:`JudgeLineError` for a line that cannot be mapped. The caller validates the result
    as an ``Evaluation`` (a label cut to length, for instance, is its business).
    """
    model = line.get("model")
    if judged_model is not None and isinstance(model, str) and model != judged_model:
        return OtherModel(model, judged_model)
    turned = label_for_turn(label, turn_of(line))
    score = line.get("score")
    if score is None:
        return Unrated(turned, "missing")
    if isinstance(score, bool) or not isinstance(score, int | float) or math.isinf(score):
        raise JudgeLineError("score must be a finite number (or null or NaN: not rated)")
    if math.isnan(score):
        return Unrated(turned, "nan")
    if score == UNPARSED_RATING:
        return Unrated(turned, "unparsed_rating")
    tstamp = line.get("tstamp")
    if tstamp is not None and (
        isinstance(tstamp, bool) or not isinstance(tstamp, int | float) or not 0 <= tstamp < _MAX_UNIX_SECONDS
    ):
        raise JudgeLineError("tstamp must be a Unix time in seconds")
    judge, prompt = judge_names(line)
    tags = {name: value for name, value in (("judge", judge), ("judge_prompt", prompt), ("model", _text(model)))
            if value is not None}
    metadata = {name: value for name, value in (("model", model), ("judgement", line.get("judgment")))
                if value is not None}
    evaluation: dict[str, Any] = {"label": turned, "metric_type": "score", "value": score}
    reasoning = reasoning_of(line.get("judgment"))
    if reasoning is not None:
        evaluation["reasoning"] = reasoning
    if metadata:
        evaluation["metadata"] = metadata
    if tags:
        evaluation["tags"] = tags
    if tstamp is not None:
        evaluation["timestamp_ms"] = int(tstamp * 1000)
    return evaluation
