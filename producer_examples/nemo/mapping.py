"""Per-item NeMo Evaluator results -> NeMo result events, by explicit rules.

For every record of a per-item file (see ``readers.py``):

* **The item id is the join key**, read from a configured id column (``question_id``,
  ``metadata.question_id``, ``_id``; a dotted name walks into objects). Never from row position:
  ``problem_idx``, ``sample_id``, ``doc_id`` and ``row_index`` are refused as id columns. A record
  without the column is an error, and so is a true duplicate: a second record of the same run,
  task, group, id and variant (turn, repeat, filter; a judge line's judge and judged model).
* **Tasks and groups** (:func:`task_of`, :func:`group_of`): every evaluation carries ``task:`` and
  ``group:`` tags; a label that two tasks give to the same item gets the task in front
  (``<task>_<label>``) for the whole run, so one span never holds two values of one series.
* **A judge line** (LLM-as-a-judge / MT-bench) maps by :func:`consumer.judge.judge_evaluation`,
  the rule the service maps the same line by when it is published as it is: the same line gives
  the same evaluation on both paths (label ``quality_assessment``, ``_turn<N>`` from turn 2; the
  judge, its prompt and the judged model as tags; metadata ``model`` and ``judgement``). A line
  without a rating (``-1``, ``null``, ``NaN``) is not sent, and counted as ``unrated``; with a
  judged model, a line about another model is not sent, and counted as ``other_model``. The
  publisher adds only its context: the ``task:<task>`` tag and the job's provenance.
* **Each other score becomes one evaluation** whose type follows its value, bool checked before
  int: ``bool`` -> ``boolean``; ``int``/``float`` -> ``score``; ``str`` -> ``categorical``. NaN,
  infinities, ``None``, error objects and values of other types are not sent: they are counted,
  with their reason, in the :class:`MappingReport`. So is an item that failed as a whole (a BYOB
  sample that was not ``scored``).
* **Labels are stable names** derived from the metric and score names only (``reward``,
  ``exact_match``, ``ndcg_cut_10``, the judge's ``quality_assessment``), sanitised to the intake's
  rule ``^[A-Za-z][A-Za-z0-9_]{0,199}$``; a second turn or repeat adds ``_turn2`` / ``_repeat1``.
  No job id ever goes into a label.
* **Provenance** (job id, config, target type and name, model, judge, time) goes into the event's
  ``provenance``, which the service puts into each evaluation's ``metadata.nemo``; tags are
  low-cardinality only: ``evaluator:nemo``, ``task:<task>`` and ``group:<group>`` (a judge line's: its
  judge and model too).
* **The run** of an event is the one given (``RunContext.run_id``), else a judge line's own
  ``run_id`` field; without either the event has none.
* **Event ids are deterministic**: a hash of the source (job id or run name), the item's key, its
  run and the evaluations' content, so a re-published result is recognised by the service and
  delivered once.

Nothing is published unless the whole run maps: errors are raised before any event is returned.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, get_args

import orjson
from pydantic import StringConstraints, ValidationError

from consumer.events import (
    MAX_EVALUATIONS_PER_EVENT,
    MAX_TEXT_CHARS,
    Evaluation,
    JoinKeyValue,
    Label,
    MetricType,
    Name,
    NemoResultEvent,
    Provenance,
    TagValue,
)
from consumer.judge import (
    JUDGE_LABEL,
    JudgeLineError,
    OtherModel,
    Unrated,
    judge_evaluation,
    judge_names,
    label_for_turn,
    turn_of,
)
from producer_examples.nemo.errors import MappingError
from producer_examples.nemo.readers import DEFAULT_ID_COLUMN, RAGAS_SAMPLE_FIELDS, Record, ResultFile


def _constraints(text_type: Any) -> StringConstraints:
    """The constraints of one of ``consumer.events``' string types, so that its limits are stated there only."""
    return next(meta for meta in get_args(text_type)[1:] if isinstance(meta, StringConstraints))


def _max_chars(text_type: Any) -> int:
    limit = _constraints(text_type).max_length
    assert limit is not None, f"{text_type} has no max_length"
    return limit


LABEL_RULE = re.compile(str(_constraints(Label).pattern))
POSITION_COLUMNS = frozenset({"problem_idx", "sample_id", "doc_id", "row_index"})
MAX_JOIN_KEY_CHARS = _max_chars(JoinKeyValue)
_MAX_NAME_CHARS = _max_chars(Name)  # provenance names, and labels (LABEL_RULE allows as many)
_TAG_CHARS = _max_chars(TagValue)
# Evaluation's validator checks these two without naming them in consumer/events.py.
MAX_CATEGORICAL_CHARS = 1000  # a categorical value's characters
_MAX_EXACT_INT = 2**53  # a score that a double holds exactly
_MAX_UNIX_SECONDS = 253402300800  # year 10000: events.TimestampMs ends in year 9999
_LABEL_DIGEST_CHARS = 8  # hex of the hash that ends a label cut to length
_EVENT_ID_HEX_CHARS = 40  # hex of the hash that makes an event id
_MAX_FAILURE_CHARS = 100  # of a failed item's status, kept as the reason
_MAX_INVALID_CHARS = 80  # of the validation message of a score not sent, kept as the reason
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # what Name, JoinKeyValue and TagValue refuse
# BEIR lines with scores at the top level: these are the query, not a score.
_BEIR_TEXT_FIELDS = frozenset({"_id", "text", "title", "query", "question", "answer", "metadata"})


def label_for(name: str) -> str:
    """A stable label for a metric or score name, valid under the intake's rule.

    Runs of characters other than ASCII letters and digits become one ``_``; a label that would
    not start with a letter gets ``m_`` in front; one longer than 200 characters is cut and ends
    with a hash of the full name, so that two long names stay apart.
    """
    label = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "metric"
    if not label[0].isalpha():
        label = "m_" + label
    if len(label) > _MAX_NAME_CHARS:
        digest = hashlib.sha256(name.encode()).hexdigest()[:_LABEL_DIGEST_CHARS]
        label = f"{label[: _MAX_NAME_CHARS - len(digest) - 1]}_{digest}"
    return label


@dataclass(frozen=True)
class Dropped:
    """Why a value is not sent."""

    reason: str


def classify(value: Any) -> tuple[MetricType, Any] | Dropped:
    """(metric_type, value) for a score value, or why it is not sent. A bool is checked before int."""
    if value is None:
        return Dropped("missing")
    if isinstance(value, bool):
        return "boolean", value
    if isinstance(value, int):
        return ("score", value) if abs(value) <= _MAX_EXACT_INT else Dropped("out_of_range")
    if isinstance(value, float):
        if math.isnan(value):
            return Dropped("nan")
        if math.isinf(value):
            return Dropped("infinite")
        return "score", value
    if isinstance(value, str):
        if not value.strip():
            return Dropped("empty")
        if len(value) > MAX_CATEGORICAL_CHARS:
            return Dropped("too_long")
        return "categorical", value
    if isinstance(value, dict) and ("error" in value or "exception" in value):
        return Dropped("error")
    return Dropped("unsupported_type")


@dataclass(frozen=True)
class Item:
    """One evaluated item of a run, read from one record, before the rules are applied."""

    where: str
    item_id: str
    variant: str  # "" or "turn2", "repeat1": part of the item's key and of its labels
    scores: list[tuple[str, Any]]  # (metric or score name, raw value), in file order
    failed: str | None = None  # the whole item failed: the reason
    reasoning: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    timestamp_ms: int | None = None
    model: str | None = None
    judge: str | None = None
    task: str | None = None
    group: str | None = None  # the task's group path in the config, "outer/inner" for nested groups
    run: str | None = None  # the item's own run (a judge line's run_id field)
    prepared: tuple[dict[str, Any], ...] = ()  # evaluations a shared rule mapped already (judge lines)
    not_sent: tuple[tuple[str, str], ...] = ()  # (label, reason) the shared rule gave no evaluation for


@dataclass
class MappingReport:
    """What a run gave: items, events, evaluations, and what was not sent and why."""

    items: int = 0
    events: int = 0
    evaluations: int = 0
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)  # (label, reason) -> count
    failed_items: Counter[str] = field(default_factory=Counter)  # reason -> count
    items_without_evaluations: int = 0
    qualified_labels: dict[str, list[str]] = field(default_factory=dict)  # label -> the labels it became
    notes: list[str] = field(default_factory=list)  # output without per-item scores (aggregate only), and why

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "events": self.events,
            "evaluations": self.evaluations,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(sorted(Counter(reason for (_, reason) in self.dropped.elements()).items())),
            "dropped_by_label": {f"{label}:{reason}": n for (label, reason), n in sorted(self.dropped.items())},
            "failed_items": dict(sorted(self.failed_items.items())),
            "items_without_evaluations": self.items_without_evaluations,
            "qualified_labels": dict(sorted(self.qualified_labels.items())),
            "aggregate_only": list(self.notes),
        }

    def summary(self) -> str:
        """Lines for a person: totals, then each reason something was not sent."""
        lines = [
            f"items: {self.items}, events: {self.events}, evaluations: {self.evaluations}, "
            f"not sent: {sum(self.dropped.values())} scores, {sum(self.failed_items.values())} failed items, "
            f"{self.items_without_evaluations} items without any sendable score"
        ]
        lines += [f"  not sent: {label} ({reason}) x{n}" for (label, reason), n in sorted(self.dropped.items())]
        lines += [f"  failed item: {reason} x{n}" for reason, n in sorted(self.failed_items.items())]
        lines += [f"  label {label} is given by several tasks to the same items: sent as {', '.join(labels)}"
                  for label, labels in sorted(self.qualified_labels.items())]
        lines += [f"  aggregate only, not attached to spans: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class MappingResult:
    events: list[NemoResultEvent]
    report: MappingReport


@dataclass(frozen=True)
class RunContext:
    """What is known about the run as a whole: where results came from and how to name them."""

    ml_app: str | None
    source_id: str  # job id, or the run's name: part of every event id
    id_column: str | None = None  # None: the format's default (DEFAULT_ID_COLUMN)
    task: str | None = None  # None: the config's task whose name is in the file's path, or its only task
    tasks: tuple[str, ...] = ()  # the task names of the run's config
    group: str | None = None  # None: the group of the item's task in the config (task_groups), if any
    task_groups: tuple[tuple[str, str], ...] = ()  # (task, group path) from the config's (nested) groups
    label_prefix: str = ""
    judge_label: str = JUDGE_LABEL
    run_id: str | None = None  # the run of the answers: every event's run_id (else a judge line's own)
    judged_model: str | None = None  # keep only the judge lines about this model
    job_id: str | None = None
    config: str | None = None
    target_type: str | None = None
    target_name: str | None = None
    model: str | None = None
    judge: str | None = None
    evaluated_at_ms: int | None = None


# --- reading items out of records ---------------------------------------------------------------


def lookup(fields: dict[str, Any], column: str) -> Any:
    """The value of ``column`` in a record: the key itself, else a dotted path into objects."""
    if column in fields:
        return fields[column]
    value: Any = fields
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def check_id_column(column: str) -> None:
    """Refuse id columns that are row positions: they are not stable across runs."""
    if not column or column.rsplit(".", 1)[-1] in POSITION_COLUMNS:
        raise MappingError(
            f"id column {column!r} is a row position, not a stable id: name a dataset column "
            "such as metadata.question_id"
        )


def item_id(record: Record, column: str) -> str:
    value = lookup(record.fields, column)
    if value is None:
        raise MappingError(f"{record.where}: no value for the id column {column!r}")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(f"{record.where}: the id column {column!r} must hold a string or an integer")
    text = str(value)
    if not text or len(text) > MAX_JOIN_KEY_CHARS or _CONTROL.search(text):
        raise MappingError(
            f"{record.where}: the id in {column!r} must be 1 to {MAX_JOIN_KEY_CHARS} characters "
            "without control characters"
        )
    return text


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _variant(kind: str, number: int | None, first: int) -> str:
    return f"{kind}{number}" if number is not None and number != first else ""


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT_CHARS] if isinstance(value, str) and value else None


def _name(value: Any) -> str | None:
    """A provenance name: 1 to 200 characters without control characters, else None."""
    if not isinstance(value, str):
        return None
    value = _CONTROL.sub(" ", value).strip()[:_MAX_NAME_CHARS]
    return value or None


def _judge_item(record: Record, ctx: RunContext, id_column: str) -> Item:
    """A judge line, mapped by the rule the service maps it by (consumer.judge); the publisher adds its context."""
    fields = record.fields
    key = item_id(record, id_column)
    base = f"{ctx.label_prefix}{ctx.judge_label}"
    judge, _ = judge_names(fields)
    model = fields.get("model")
    turn = fields.get("turn")
    variant = ";".join(part for part in (
        f"turn{turn}" if isinstance(turn, int) and not isinstance(turn, bool) and turn != 1 else "",
        f"judge={judge}" if judge else "", f"model={model}" if isinstance(model, str) and model else "") if part)
    run = fields.get("run_id")
    item = Item(where=record.where, item_id=key, variant=variant, scores=[],
                run=str(run) if isinstance(run, str | int) and not isinstance(run, bool) and run != "" else None)
    try:
        mapped = judge_evaluation(fields, label=base, judged_model=ctx.judged_model)
    except JudgeLineError as exc:
        return replace(item, not_sent=((label_for(base), f"invalid: {exc}"[:_MAX_INVALID_CHARS]),))
    if isinstance(mapped, OtherModel):
        try:
            label = label_for_turn(base, turn_of(fields))
        except JudgeLineError:
            label = base
        return replace(item, not_sent=((label_for(label), "other_model"),))
    if isinstance(mapped, Unrated):
        return replace(item, not_sent=((label_for(mapped.label), "unrated"),))
    return replace(item, prepared=(mapped,))


def _launcher_item(record: Record, ctx: RunContext, id_column: str) -> Item:
    fields = record.fields
    scores: list[tuple[str, Any]] = []
    if "reward" in fields:
        scores.append(("reward", fields["reward"]))
    scorer_rewards = fields.get("scorer_rewards")
    if isinstance(scorer_rewards, dict):
        scores += [(str(name), value) for name, value in scorer_rewards.items()]
    elif scorer_rewards is not None:
        scores.append(("scorer_rewards", scorer_rewards))
    repeat = _int(fields.get("repeat"))
    metadata = {"problem_idx": fields.get("problem_idx"), "repeat": repeat}
    return Item(
        where=record.where,
        item_id=item_id(record, id_column),
        variant=_variant("repeat", repeat, 0),
        scores=scores,
        metadata={k: v for k, v in metadata.items() if v is not None},
    )


def _byob_item(record: Record, ctx: RunContext, id_column: str) -> Item:
    fields = record.fields
    raw_metadata = fields.get("metadata")
    metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
    repeat = _int(metadata.get("_repeat"))
    status = fields.get("status", "scored")
    scores = fields.get("scores")
    failed = None
    if status != "scored":
        failed = str(status)[:_MAX_FAILURE_CHARS] or "not_scored"
    elif not isinstance(scores, dict):
        failed = "no_scores"
    extra = {"sample_id": fields.get("sample_id"), "repeat": repeat}
    return Item(
        where=record.where,
        item_id=item_id(record, id_column),
        variant=_variant("repeat", repeat, 0),
        scores=[(str(k), v) for k, v in scores.items()] if isinstance(scores, dict) and failed is None else [],
        failed=failed,
        metadata={k: v for k, v in extra.items() if v is not None},
    )


def _beir_item(record: Record, ctx: RunContext, id_column: str) -> Item:
    fields = record.fields
    nested = next((fields[key] for key in ("scores", "metrics") if isinstance(fields.get(key), dict)), None)
    if nested is not None:
        scores = [(str(k), v) for k, v in nested.items()]
    else:
        top = id_column.split(".", 1)[0]
        scores = [(k, v) for k, v in fields.items()
                  if k not in _BEIR_TEXT_FIELDS and k != top and not isinstance(v, str | dict | list)]
    return Item(where=record.where, item_id=item_id(record, id_column), variant="", scores=scores)


def _rows_item(record: Record, ctx: RunContext, id_column: str) -> Item:
    """A NeMo Evaluator row score: one evaluation per (metric, score); a metric's error is reported, not sent."""
    fields = record.fields
    metrics = fields.get("metrics")
    errors = fields.get("metric_errors")
    errors = errors if isinstance(errors, dict) else {}
    scores: list[tuple[str, Any]] = []
    for metric, entries in (metrics.items() if isinstance(metrics, dict) else ()):
        for entry in entries if isinstance(entries, list) else [entries]:
            if not isinstance(entry, dict):
                scores.append((str(metric), Dropped("unsupported_type")))
                continue
            name = str(entry.get("name") or metric)
            value = entry.get("value")
            if metric in errors:  # the metric failed on this row: its error text is the reason, not its value
                value = Dropped("error")
            elif isinstance(value, str) and value.strip().lower() == "nan":  # the row scores' JSON form of NaN
                value = Dropped("nan")
            scores.append((str(metric) if name == str(metric) else f"{metric}_{name}", value))
    scored = {str(metric) for metric, entries in (metrics.items() if isinstance(metrics, dict) else ()) if entries}
    scores += [(str(metric), Dropped("error")) for metric in errors if str(metric) not in scored]
    row_index = _int(fields.get("row_index"))
    return Item(where=record.where, item_id=item_id(record, id_column), variant="", scores=scores,
                metadata={"row_index": row_index} if row_index is not None else {})


def _lm_eval_item(record: Record, ctx: RunContext, id_column: str) -> Item:
    """An lm-evaluation-harness sample: one evaluation per metric it names; a filter but ``none`` is a variant."""
    fields = record.fields
    names = fields.get("metrics")
    scores = [(str(name), fields.get(name)) for name in names] if isinstance(names, list) else []
    filter_name = fields.get("filter")
    variant = label_for(filter_name) if isinstance(filter_name, str) and filter_name not in ("", "none") else ""
    extra = {"doc_id": fields.get("doc_id"), "filter": filter_name if variant else None}
    return Item(where=record.where, item_id=item_id(record, id_column), variant=variant, scores=scores,
                metadata={k: v for k, v in extra.items() if v is not None})


def _bfcl_item(record: Record, ctx: RunContext, id_column: str) -> Item:
    """A BFCL entry: ``valid`` as a boolean; a failed one carries its error type and, as reasoning, its errors.

    A failed AST entry has ``error: [messages]`` and ``error_type`` beside it; a failed multi-turn or agentic entry
    has them nested, ``error: {error_message, error_type, details}`` (BFCL's ``eval_checker/eval_runner.py``).
    """
    fields = record.fields
    error = fields.get("error")
    error_type = fields.get("error_type")
    if isinstance(error, dict):  # multi-turn and agentic entries nest {error_message, error_type, details}
        error_type = error_type or error.get("error_type")
        error = error.get("error_message")
    reasoning = "; ".join(str(e) for e in error) if isinstance(error, list) else _text(error)
    extra = {"test_category": fields.get("test_category"), "error_type": error_type}
    return Item(where=record.where, item_id=item_id(record, id_column), variant="",
                scores=[("valid", fields.get("valid"))], reasoning=_text(reasoning),
                metadata={k: v for k, v in extra.items() if isinstance(v, str) and v})


def _ragas_item(record: Record, ctx: RunContext, id_column: str) -> Item:
    """A RAGAS result row: one evaluation per metric column (a number or null), the sample's fields left out."""
    fields = record.fields
    top = id_column.split(".", 1)[0]
    scores = [(key, value) for key, value in fields.items()
              if key not in RAGAS_SAMPLE_FIELDS and key != top and (value is None or isinstance(value, int | float))]
    return Item(where=record.where, item_id=item_id(record, id_column), variant="", scores=scores)


_READERS = {"judge": _judge_item, "rows": _rows_item, "launcher": _launcher_item, "byob": _byob_item,
            "lm_eval": _lm_eval_item, "bfcl": _bfcl_item, "beir": _beir_item, "ragas": _ragas_item}


def task_of(result_file: ResultFile, ctx: RunContext, directories: int = 1) -> str | None:
    """The task a file belongs to, by the first rule that gives one.

    The task given (``--task``); the task the file names itself (lm-evaluation-harness samples); the
    config's task named in its path; the config's only task; and, when the run's per-item files lie
    in more than one directory, the name of the file's directory (so that two tasks over the same
    items stay apart even when nothing names them).
    """
    if ctx.task:
        return ctx.task
    if result_file.task:
        return result_file.task
    path = PurePosixPath(result_file.path)
    named = [task for task in ctx.tasks if task in path.parts]
    if len(named) == 1:
        return named[0]
    if len(ctx.tasks) == 1:
        return ctx.tasks[0]
    if directories > 1 and path.parent.name:
        return path.parent.name
    return None


def group_of(task: str | None, path: str, ctx: RunContext) -> str | None:
    """The group a task belongs to: the one given, else its group path in the config (``outer/inner``).

    A task in several groups: the one whose names all appear in the file's path, else all, ``,``-joined.
    """
    if ctx.group:
        return ctx.group
    chains = sorted({group for name, group in ctx.task_groups if name == task})
    if len(chains) > 1:
        parts = set(PurePosixPath(path).parts)
        in_path = [chain for chain in chains if set(chain.split("/")) <= parts]
        chains = in_path if len(in_path) == 1 else chains
    return ",".join(chains) or None


def config_groups(groups: Any, outer: str = "") -> list[tuple[str, str]]:
    """(task, group path) for every task of a config's ``groups``, nested groups included (``outer/inner``)."""
    found: list[tuple[str, str]] = []
    for name, group in (groups or {}).items() if isinstance(groups, dict) else ():
        path = f"{outer}/{name}" if outer else str(name)
        body = group.model_dump() if hasattr(group, "model_dump") else group
        if not isinstance(body, dict):
            continue
        found += [(str(task), path) for task in body.get("tasks") or []]
        found += config_groups(body.get("groups"), path)
    return found


def items_of(files: Iterable[ResultFile], ctx: RunContext) -> Iterator[Item]:
    """The items of per-item files, each with its id read from the id column, its task and its group."""
    files = list(files)
    directories = len({PurePosixPath(f.path).parent for f in files})
    for result_file in files:
        id_column = ctx.id_column or DEFAULT_ID_COLUMN[result_file.format]
        check_id_column(id_column)
        read = _READERS[result_file.format]
        task = task_of(result_file, ctx, directories)
        group = group_of(task, result_file.path, ctx)
        for record in result_file.records:
            yield replace(read(record, ctx, id_column), task=task, group=group)


# --- items -> events ----------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _event_id(ctx: RunContext, item: Item, evaluations: list[Evaluation], chunk: int, run: str | None) -> str:
    content = {
        "source": ctx.source_id,
        "ml_app": ctx.ml_app,
        "item": item.item_id,
        "variant": item.variant,
        "chunk": chunk,
        # Times are left out: a job's timestamps may be touched later; the result is the same.
        "evaluations": [e.model_dump(mode="json", exclude_none=True, exclude={"timestamp_ms"}) for e in evaluations],
    }
    if run:
        content["run"] = run
    return "nemo-" + hashlib.sha256(_canonical(content)).hexdigest()[:_EVENT_ID_HEX_CHARS]


def _tags(item: Item) -> dict[str, str]:
    tags = {"evaluator": "nemo"}
    if item.task:
        tags["task"] = _CONTROL.sub(" ", item.task)[:_TAG_CHARS]
    if item.group:
        tags["group"] = _CONTROL.sub(" ", item.group)[:_TAG_CHARS]
    return tags


def _provenance(ctx: RunContext, item: Item) -> Provenance:
    return Provenance(
        job_id=_name(ctx.job_id),
        config=_name(ctx.config),
        target_type=_name(ctx.target_type),
        target_name=_name(ctx.target_name),
        model=item.model or _name(ctx.model),
        judge=item.judge or _name(ctx.judge),
        evaluated_at_ms=ctx.evaluated_at_ms,
    )


def _prepared(item: Item, ctx: RunContext, report: MappingReport) -> list[Evaluation]:
    """The evaluations a shared rule mapped (a judge line's), with the publisher's context: the task tag."""
    for label, reason in item.not_sent:
        report.dropped[(label, reason)] += 1
    out = []
    for prepared in item.prepared:
        label = label_for(prepared["label"])
        tags = {**prepared.get("tags", {}), **{k: v for k, v in _tags(item).items() if k in ("task", "group")}}
        try:
            out.append(Evaluation(**{**prepared, "label": label, "tags": tags,
                                     "timestamp_ms": prepared.get("timestamp_ms") or ctx.evaluated_at_ms}))
        except ValidationError as exc:
            reason = exc.errors(include_url=False, include_input=False)[0]["msg"].removeprefix("Value error, ")
            report.dropped[(label, f"invalid: {reason[:_MAX_INVALID_CHARS]}")] += 1
    return out


def _evaluations(item: Item, ctx: RunContext, report: MappingReport) -> list[Evaluation]:
    if item.prepared or item.not_sent:
        return _prepared(item, ctx, report)
    tags = _tags(item)
    suffix = f"_{item.variant}" if item.variant else ""
    by_label: dict[str, Evaluation] = {}
    names: dict[str, str] = {}
    for name, raw in item.scores:
        label = label_for(f"{ctx.label_prefix}{name}{suffix}")
        if label in names:
            raise MappingError(
                f"{item.where}: scores {names[label]!r} and {name!r} both give the label {label!r} "
                "after sanitising; rename one of them"
            )
        names[label] = name
        outcome = raw if isinstance(raw, Dropped) else classify(raw)
        if isinstance(outcome, Dropped):
            report.dropped[(label, outcome.reason)] += 1
            continue
        metric_type, value = outcome
        try:
            by_label[label] = Evaluation(
                label=label, metric_type=metric_type, value=value, reasoning=item.reasoning,
                metadata=item.metadata or None, tags=tags, timestamp_ms=item.timestamp_ms or ctx.evaluated_at_ms,
            )
        except ValidationError as exc:
            reason = exc.errors(include_url=False, include_input=False)[0]["msg"].removeprefix("Value error, ")
            report.dropped[(label, f"invalid: {reason[:_MAX_INVALID_CHARS]}")] += 1
    return [by_label[label] for label in sorted(by_label)]


def _scope(item: Item) -> tuple[str, str]:
    return (item.group or "", item.task or "")


def _qualified(label: str, item: Item, ctx: RunContext) -> str:
    """``label`` with the item's task (else its group) in front, after the label prefix: ``[prefix]<task>_<rest>``."""
    scope = item.task or item.group or "untasked"
    prefix = re.sub(r"[^A-Za-z0-9]+", "_", ctx.label_prefix)  # as label_for leaves it in front of a label
    if prefix and label.startswith(prefix):
        return label_for(f"{prefix}{scope}_{label[len(prefix):]}")
    return label_for(f"{scope}_{label}")


def map_items(items: Iterable[Item], ctx: RunContext) -> MappingResult:
    """Apply the rules to every item; raise :class:`MappingError` before returning anything if one breaks them.

    An item is a duplicate only of an item of the same run, task, group, id and variant (turn,
    repeat, filter; for a judge line its judge and judged model). A label that two tasks (or
    groups) of the run give to the same item would put two values of one series on one span: every
    evaluation of that label in the run then carries its task in front (:func:`_qualified`).
    """
    report = MappingReport()
    mapped: list[tuple[Item, str | None, list[Evaluation]]] = []
    seen: dict[tuple[str, str, str, str, str], str] = {}
    scopes: dict[tuple[str, str, str], set[tuple[str, str]]] = {}  # (run, item, label) -> the scopes giving it
    for item in items:
        report.items += 1
        run = ctx.run_id or item.run
        key = (run or "", *_scope(item), item.item_id, item.variant)
        if key in seen:
            what = "".join((f"id {item.item_id!r}", f" ({item.variant})" if item.variant else "",
                            f" of task {item.task!r}" if item.task else "",
                            f" in group {item.group!r}" if item.group else "", f" in run {run!r}" if run else ""))
            raise MappingError(f"{item.where}: {what} already appeared at {seen[key]}; ids must be unique in a task")
        seen[key] = item.where
        if item.failed is not None:
            report.failed_items[item.failed] += 1
            continue
        evaluations = _evaluations(item, ctx, report)
        if not evaluations:
            report.items_without_evaluations += 1
            continue
        for evaluation in evaluations:
            scopes.setdefault((run or "", item.item_id, evaluation.label), set()).add(_scope(item))
        mapped.append((item, run, evaluations))
    shared = {label for (_, _, label), given_by in scopes.items() if len(given_by) > 1}
    events: list[NemoResultEvent] = []
    for item, run, evaluations in mapped:
        if shared & {e.label for e in evaluations}:
            renamed = []
            for evaluation in evaluations:
                if evaluation.label in shared:
                    label = _qualified(evaluation.label, item, ctx)
                    labels = report.qualified_labels.setdefault(evaluation.label, [])
                    if label not in labels:
                        labels.append(label)
                    evaluation = evaluation.model_copy(update={"label": label})
                renamed.append(evaluation)
            evaluations = sorted(renamed, key=lambda e: e.label) if not item.prepared else renamed
        provenance = _provenance(ctx, item)
        for chunk, start in enumerate(range(0, len(evaluations), MAX_EVALUATIONS_PER_EVENT)):
            part = evaluations[start:start + MAX_EVALUATIONS_PER_EVENT]
            events.append(NemoResultEvent(
                schema_version=1, event_id=_event_id(ctx, item, part, chunk, run), ml_app=ctx.ml_app, run_id=run,
                join_key=item.item_id, evaluations=part, provenance=provenance,
            ))
            report.evaluations += len(part)
    report.events = len(events)
    for labels in report.qualified_labels.values():
        labels.sort()
    return MappingResult(events, report)


def map_files(files: Iterable[ResultFile], ctx: RunContext, notes: Iterable[str] = ()) -> MappingResult:
    """Read the items of per-item files and map them (see :func:`map_items`); ``notes`` go into the report."""
    result = map_items(items_of(files, ctx), ctx)
    result.report.notes.extend(notes)
    return result
