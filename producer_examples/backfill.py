"""Backfill from files: publish the guide's ``outputs.json`` and ``scores.jsonl`` to the service's topics.

::

    python -m producer_examples.backfill --outputs outputs.json --scores scores.jsonl \\
        [--ml-app nemos-demo] [--bootstrap host:9092] [--state backfill.state.json] [--dry-run]

Each record is published verbatim (outputs records to the span topic, scores lines to the result
topic): the service reads both formats as they are, joins them by ``question_id`` and delivers each
evaluation once. Records are checked first with the service's own decoders
(:func:`consumer.decode.decode_span` / :func:`consumer.decode.decode_result`); a record they would
dead-letter is skipped and reported with a reason instead of being published.

* **Streaming.** Either file may be JSON Lines or one JSON array (told apart by its first byte);
  both are read one record at a time (:mod:`producer_examples.jsonstream`), and every
  ``--checkpoint-every`` records the run waits for the broker's acknowledgements (with or without
  ``--state``), so memory does not grow with the file.
* **One run.** The records of a backfill are one run of the evaluation (the ``run_id`` header, which
  the service reads when a record does not name its own run): ``--run-id`` names it; by default,
  when both files are given, it is ``backfill-`` and the first 16 hex digits of the SHA-256 of the
  outputs file, so the answers and judgements of one backfill join each other and never those of
  another backfill of the same questions. With one file only there is no default (the other file's
  run is not known here; give the ``--run-id`` the summary of the first backfill printed), nor with
  ``--no-run-id``. A ``--state`` file keeps the run it started with.
* **Judge lines that give no score** are not published, and counted and named like skipped
  records: a line without a rating (``-1``, ``null``, ``NaN``: ``unrated``), and, with
  ``--judged-model``, a line about another model (``other_model``). They are not errors: the exit
  code stays 0.
* **Idempotent.** Publishing the same files again publishes the same records again, which the
  service recognises (a scores line's event id is a hash of the line's content; an outputs record
  names the same span for the same key), so nothing reaches Datadog twice.
* **Resumable.** With ``--state FILE`` the progress through each input is checkpointed: every
  ``--checkpoint-every`` records the publisher waits until the broker acknowledged everything sent
  (``acks=all``), then FILE is replaced atomically with, per input, the byte offset, record index
  and line just past the last acknowledged record and a SHA-256 of the file up to there. A run
  with the same FILE continues after that point if the file's bytes up to it are unchanged, and
  reads the file from the start otherwise. Records sent after the last checkpoint of an
  interrupted run are published again, which is harmless (see above). SIGINT/SIGTERM stop the
  run after the record in hand, with a final checkpoint.

Exit codes: 0 everything published (or, with ``--dry-run``, valid); 1 records were skipped (0 with
``--allow-skips``); 2 bad arguments, an unreadable input, or a JSON array that is malformed past
some point (the records before it are published); 3 the broker did not acknowledge records; 130
interrupted (run again with the same ``--state`` to continue).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO

import orjson
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter, ValidationError
from tqdm import tqdm  # type: ignore[import-untyped]

from consumer.config import Settings
from consumer.decode import decode_result, decode_span, parse_source, record_bytes
from consumer.errors import InvalidMessage, NotSent
from consumer.events import Name
from producer_examples.jsonstream import (
    Format,
    MalformedFile,
    Position,
    RawRecord,
    RecordReader,
    detect_format,
    open_at,
)
from producer_examples.publisher import (
    MAX_MESSAGE_BYTES,
    DeliveryError,
    EventPublisher,
    add_kafka_arguments,
    kafka_settings,
    raw_headers,
)

Role = Literal["outputs", "scores"]

STATE_VERSION = 1
JOIN_KEY: str = Settings.model_fields["join_key"].default  # the service's default JOIN_KEY
DEFAULT_CHECKPOINT_EVERY = 1000  # records between checkpoints (--checkpoint-every)
MAX_REPORTED_SKIPS = 100  # skipped records named on stderr; the rest are counted
MAX_SKIP_DETAIL_CHARS = 300  # of the decoder's reason, in a skipped record's report
DEFAULT_RUN_PREFIX = "backfill-"  # the default run: this and the start of the SHA-256 of the outputs file
DEFAULT_RUN_HEX_CHARS = 16
_HASH_CHUNK = 1 << 16  # bytes read at a time to hash the outputs file: memory stays bounded
YIELD_EVERY = 64  # records between yields to the event loop, so that a signal handler runs
EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, EXIT_DELIVERY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_NAME: TypeAdapter[str] = TypeAdapter(Name)  # what the service takes as a run, checked before the first record
# Decoding needs a namespace; without --ml-app the service's DEFAULT_ML_APP applies, unknown here.
_SERVICE_DEFAULT_APP = "<DEFAULT_ML_APP>"


@dataclass
class Options:
    """What to publish and how; the command line fills it."""

    outputs: Path | None = None
    scores: Path | None = None
    ml_app: str | None = None
    bootstrap: str | None = None
    span_topic: str | None = None
    result_topic: str | None = None
    join_key: str = JOIN_KEY
    max_message_bytes: int = MAX_MESSAGE_BYTES
    run_id: str | None = None
    """The run of the records; None: the default run (see :func:`default_run_id`) unless ``no_run_id``."""
    no_run_id: bool = False
    judged_model: str | None = None
    state: Path | None = None
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    dry_run: bool = False
    progress: bool = False
    stop_after: int | None = None
    """Stop as if interrupted after this many records of this run (for tests of resuming)."""


@dataclass
class InputSummary:
    """Counts for one input file, over every run recorded in the state file."""

    role: Role
    path: Path
    topic: str
    format: Format | None = None
    read: int = 0
    published: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    not_sent: Counter[str] = field(default_factory=Counter)  # valid judge lines that give no score, by reason
    published_this_run: int = 0
    resumed_at: int | None = None
    complete: bool = False
    error: str | None = None

    def counts(self) -> dict[str, Any]:
        return {"read": self.read, "published": self.published, "skipped": dict(self.skipped),
                "not_sent": dict(self.not_sent)}


@dataclass
class Result:
    """What a run did; :meth:`exit_code` is what the command exits with."""

    inputs: list[InputSummary]
    dry_run: bool
    run_id: str | None = None
    run_id_default: bool = False  # the run is the default one, made of the outputs file
    interrupted: bool = False
    delivery_error: str | None = None

    @property
    def skipped(self) -> int:
        return sum(sum(item.skipped.values()) for item in self.inputs)

    def exit_code(self, *, allow_skips: bool = False) -> int:
        if self.delivery_error:
            return EXIT_DELIVERY
        if self.interrupted:
            return EXIT_INTERRUPTED
        if any(item.error for item in self.inputs):
            return EXIT_USAGE
        if self.skipped and not allow_skips:
            return EXIT_SKIPPED
        return EXIT_OK


class Verdict:
    """A record's fate: published under ``key``, skipped for ``reason``, or not sent (``not_sent``: a valid
    judge line that gives no score)."""

    __slots__ = ("detail", "key", "not_sent", "reason")

    def __init__(self, *, key: str | None = None, reason: str | None = None, detail: str = "",
                 not_sent: bool = False) -> None:
        self.key, self.reason, self.detail, self.not_sent = key, reason, detail, not_sent


def check_record(role: Role, value: bytes | None, *, join_key: str, ml_app: str | None, max_bytes: int,
                 run_id: str | None = None, judged_model: str | None = None) -> Verdict:
    """Decode a record as the service will and say whether to publish it, under which Kafka key.

    The key is ``ml_app:join_key``, as :class:`EventPublisher` keys events, so both sides of a
    question (and any re-publication) land in the same partition number, in order.
    """
    if value is None:
        return Verdict(reason="oversize", detail=f"the record is larger than {max_bytes} bytes")
    headers = list(raw_headers(ml_app=ml_app, run_id=run_id))
    decode = decode_span if role == "outputs" else decode_result
    try:
        event = decode(value, headers, join_key=join_key, default_ml_app=_SERVICE_DEFAULT_APP, max_bytes=max_bytes,
                       judged_model=judged_model)
    except InvalidMessage as exc:
        return Verdict(reason=_refined_reason(role, value, join_key, exc.reason), detail=exc.detail)
    except NotSent as exc:
        return Verdict(reason=exc.reason, detail=exc.detail, not_sent=True)
    app = "" if event.ml_app == _SERVICE_DEFAULT_APP else event.ml_app
    key = f"{app}:{event.join_key}"
    size = record_bytes(key.encode(), value, headers)  # the service counts the key too, known only now
    if size > max_bytes:
        return Verdict(reason="oversize", detail=f"the record is {size} bytes with its key, the limit is {max_bytes}")
    return Verdict(key=key)


def _refined_reason(role: Role, value: bytes, join_key: str, reason: str) -> str:
    """Name what is missing where the decoder only says ``schema``."""
    if reason != "schema":
        return reason
    obj = orjson.loads(value)  # it parsed once already
    if not isinstance(obj, dict):
        return "not_an_object"
    if "schema_version" in obj:
        return "schema"
    if role == "outputs":
        source = obj["input"].get("source") if isinstance(obj.get("input"), dict) else None
        if not isinstance(source, str):
            return "missing_source"
        try:
            parts = parse_source(source)
        except InvalidMessage:  # a part that is not key=value: the decoder's detail says which
            return "schema"
        for name in (join_key, "trace_id", "span_id"):
            if not parts.get(name):
                return f"missing_{name}"
        return "schema"
    if join_key not in obj:
        return f"missing_{join_key}"
    if "score" not in obj:
        return "missing_score"
    return "schema"


# -- state file -------------------------------------------------------------------

class StateFile:
    """Per-input progress, and the run the backfill publishes under, saved atomically (write a temporary file,
    fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.run: dict[str, Any] = {}  # {"run_id": str | None, "default": bool} once chosen
        if not path.parent.is_dir():
            raise ValueError(f"the state file's directory {path.parent} does not exist")
        if path.exists():
            doc = orjson.loads(path.read_bytes())
            if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
                raise ValueError(f"{path} is not a backfill state file of version {STATE_VERSION}")
            self.entries = dict(doc.get("inputs") or {})
            run = doc.get("run")
            if isinstance(run, dict) and (run.get("run_id") is None or isinstance(run.get("run_id"), str)):
                self.run = run

    def save(self, role: Role, entry: dict[str, Any]) -> None:
        self.entries[role] = entry
        body = orjson.dumps({"version": STATE_VERSION, "run": self.run, "inputs": self.entries},
                            option=orjson.OPT_INDENT_2)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)


# -- the run ------------------------------------------------------------------------

class _Input:
    """One input file being read: its reader, summary and checkpointing."""

    def __init__(self, summary: InputSummary, stream: BinaryIO, reader: RecordReader, bootstrap: str) -> None:
        self.summary, self.stream, self.reader, self.bootstrap = summary, stream, reader, bootstrap

    def entry(self) -> dict[str, Any]:
        position = self.reader.position
        return {
            "path": str(self.summary.path), "format": self.reader.format, "topic": self.summary.topic,
            "bootstrap": self.bootstrap, "offset": position.offset, "records": position.index,
            "line": position.line, "array_state": position.array_state,
            "prefix_sha256": self.reader.prefix_digest(), "complete": self.summary.complete,
            **self.summary.counts(),
        }


def _open_input(summary: InputSummary, state: StateFile | None, options: Options, bootstrap: str,
                note: Callable[[str], None]) -> _Input:
    stream = open(summary.path, "rb")  # noqa: SIM115 - closed by the caller
    fmt = detect_format(stream)
    summary.format = fmt
    entry = state.entries.get(summary.role) if state else None
    if entry and (entry.get("topic"), entry.get("bootstrap"), entry.get("format")) == (summary.topic, bootstrap, fmt):
        try:
            position = Position(int(entry["offset"]), int(entry["records"]), int(entry["line"]),
                                entry["array_state"])
            counts = (int(entry["read"]), int(entry["published"]),
                      Counter({str(k): int(v) for k, v in dict(entry["skipped"]).items()}),
                      Counter({str(k): int(v) for k, v in dict(entry.get("not_sent") or {}).items()}))
            digest = str(entry["prefix_sha256"])
        except (KeyError, TypeError, ValueError):
            note(f"{summary.path}: the state file's checkpoint is incomplete; reading the file from the start")
        else:
            reader = open_at(stream, fmt, position, digest, max_record_bytes=options.max_message_bytes)
            if reader is not None:
                summary.read, summary.published, summary.skipped, summary.not_sent = counts
                summary.resumed_at = position.index
                return _Input(summary, stream, reader, bootstrap)
            note(f"{summary.path}: changed since the state file's checkpoint; reading it from the start")
        stream.seek(0)
    elif entry:
        note(f"{summary.path}: the state file's checkpoint is for another topic, broker or format; "
             "reading it from the start")
    return _Input(summary, stream, RecordReader(stream, fmt, max_record_bytes=options.max_message_bytes),
                  bootstrap)


async def run(options: Options, *, stop: asyncio.Event | None = None, err: TextIO | None = None) -> Result:
    """Publish (or, with ``dry_run``, only check) the inputs; returns the counts. Never raises for bad records.

    Raises :class:`~producer_examples.publisher.KafkaConfigError` (a ``ValueError``) for invalid Kafka variables.
    """
    err = err or sys.stderr
    stop = stop or asyncio.Event()
    kafka = kafka_settings(bootstrap_servers=options.bootstrap, span_topic=options.span_topic,
                           result_topic=options.result_topic)
    bootstrap = kafka.kafka_bootstrap_servers
    plan: list[InputSummary] = []
    if options.outputs:
        plan.append(InputSummary("outputs", options.outputs, kafka.span_topic))
    if options.scores:
        plan.append(InputSummary("scores", options.scores, kafka.result_topic))
    result = Result(plan, dry_run=options.dry_run)
    reporter = _Reporter(err)
    state = StateFile(options.state) if options.state and not options.dry_run else None
    result.run_id, result.run_id_default = _run_of(options, state)
    options = replace(options, run_id=result.run_id)

    budget = options.stop_after
    try:
        async with contextlib.AsyncExitStack() as stack:
            publisher = None
            if not options.dry_run:
                publisher = await stack.enter_async_context(EventPublisher(kafka=kafka))
            budget = await _publish_all(plan, options, publisher, state, stop, reporter, result, bootstrap)
    except DeliveryError as exc:  # from the flush when leaving the publisher
        result.delivery_error = result.delivery_error or str(exc)
    if budget == 0 or stop.is_set():
        result.interrupted = not all(item.complete or item.error for item in plan)
    return result


def default_run_id(outputs: Path) -> str:
    """The default run of a backfill: ``backfill-`` and the start of the SHA-256 of its outputs file."""
    digest = hashlib.sha256()
    with open(outputs, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return DEFAULT_RUN_PREFIX + digest.hexdigest()[:DEFAULT_RUN_HEX_CHARS]


def _run_of(options: Options, state: StateFile | None) -> tuple[str | None, bool]:
    """(the run of this backfill, whether it is the default one): the one given; else the one the state file
    started with; else, with both files, the default. The state file keeps it for the runs that resume."""
    chosen: tuple[str | None, bool] = (None, False)
    if options.run_id or options.no_run_id:
        chosen = (options.run_id or None, False)
    elif state is not None and "run_id" in state.run:
        chosen = (state.run["run_id"], bool(state.run.get("default")))
    elif options.outputs is not None and options.scores is not None:
        with contextlib.suppress(OSError):  # an outputs file that cannot be read is reported when it is opened
            chosen = (default_run_id(options.outputs), True)
    if state is not None:
        state.run = {"run_id": chosen[0], "default": chosen[1]}
    return chosen


async def _publish_all(plan: list[InputSummary], options: Options, publisher: EventPublisher | None,
                       state: StateFile | None, stop: asyncio.Event, reporter: _Reporter, result: Result,
                       bootstrap: str) -> int | None:
    budget = options.stop_after
    for summary in plan:
        if stop.is_set() or result.delivery_error or budget == 0:
            break
        try:
            current = _open_input(summary, state, options, bootstrap, reporter.note)
        except OSError as exc:
            summary.error = f"cannot read {summary.path}: {exc.strerror or exc}"
            reporter.note(summary.error)
            continue
        with current.stream:
            budget = await _publish_input(current, options, publisher, state, stop, reporter, result, budget)
    return budget


async def _publish_input(current: _Input, options: Options, publisher: EventPublisher | None, state: StateFile | None,
                         stop: asyncio.Event, reporter: _Reporter, result: Result, budget: int | None) -> int | None:
    summary = current.summary
    topic = summary.topic
    since_checkpoint = 0
    bar = reporter.bar(summary, current.reader.consumed, enabled=options.progress)

    async def checkpoint() -> bool:
        if publisher is None:
            return True
        try:
            await publisher.flush()
        except DeliveryError as exc:
            result.delivery_error = str(exc)
            reporter.note(f"{summary.path}: the broker did not acknowledge {exc.failed} record(s): {exc.first!r}; "
                          "the state file keeps the last acknowledged position")
            return False
        if state is not None:
            state.save(summary.role, current.entry())
        return True

    try:
        records: Iterator[RawRecord] = iter(current.reader)
        for record in records:
            verdict = check_record(summary.role, record.value, join_key=options.join_key, ml_app=options.ml_app,
                                   max_bytes=options.max_message_bytes, run_id=options.run_id,
                                   judged_model=options.judged_model)
            summary.read += 1
            if verdict.not_sent:
                summary.not_sent[verdict.reason or "not_sent"] += 1
                reporter.skip(summary, record, verdict.reason or "not_sent", verdict.detail, not_sent=True)
            elif verdict.key is None:
                reason = verdict.reason or "invalid"
                summary.skipped[reason] += 1
                reporter.skip(summary, record, reason, verdict.detail)
            else:
                if publisher is not None:
                    assert record.value is not None
                    await publisher.publish_raw(topic, record.value, key=verdict.key, ml_app=options.ml_app,
                                                run_id=options.run_id)
                summary.published += 1
                summary.published_this_run += 1
            bar.update(current.reader.consumed - bar.n)
            since_checkpoint += 1
            if since_checkpoint % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let signal handlers run even when nothing else waits
            if budget is not None:
                budget -= 1
            if budget == 0 or stop.is_set():
                await checkpoint()
                return budget
            if since_checkpoint >= options.checkpoint_every:
                since_checkpoint = 0
                if not await checkpoint():
                    return budget
        summary.complete = True
    except MalformedFile as exc:
        summary.error = f"{summary.path}: {exc}"
        reporter.note(f"{summary.error}; the records before it were {'checked' if options.dry_run else 'published'}")
    finally:
        bar.update(current.reader.consumed - bar.n)
        bar.close()
    await checkpoint()
    return budget


class _Reporter:
    """Skip reports and notes on stderr (above the progress bar when there is one)."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.reported = 0

    def note(self, message: str) -> None:
        tqdm.write(message, file=self.err)

    def skip(self, summary: InputSummary, record: RawRecord, reason: str, detail: str, *,
             not_sent: bool = False) -> None:
        self.reported += 1
        if self.reported <= MAX_REPORTED_SKIPS:
            what = "not sent" if not_sent else "skipped"
            self.note(f"{summary.path}:{record.line}: record {record.index} {what} ({reason}): "
                      f"{detail[:MAX_SKIP_DETAIL_CHARS]}")
        elif self.reported == MAX_REPORTED_SKIPS + 1:
            self.note(f"more than {MAX_REPORTED_SKIPS} records skipped; the rest are counted, not listed")

    def bar(self, summary: InputSummary, initial: int, *, enabled: bool) -> Any:
        total = summary.path.stat().st_size
        return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, file=self.err,
                    desc=summary.path.name, disable=not enabled, leave=False)


def format_summary(result: Result, *, allow_skips: bool = False) -> str:
    """The closing report: per input and in total, read / published / skipped with reasons."""
    verb = "valid" if result.dry_run else "published"
    lines = []
    if result.run_id:
        how = "the default, made of the outputs file" if result.run_id_default else "given"
        lines.append(f"run_id: {result.run_id} ({how}; publish more of this run with --run-id {result.run_id})")
    for item in result.inputs:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(item.skipped.items()))
        line = (f"{item.role} {item.path} ({item.format or '?'} -> {item.topic}): {item.read} read, "
                f"{item.published} {verb}, {sum(item.skipped.values())} skipped" + (f" ({reasons})" if reasons else ""))
        if item.not_sent:
            line += f", {sum(item.not_sent.values())} not sent (" + ", ".join(
                f"{reason} {count}" for reason, count in sorted(item.not_sent.items())) + ")"
        if item.resumed_at is not None:
            line += f"; resumed at record {item.resumed_at}, {item.published_this_run} {verb} in this run"
        if item.error:
            line += f"; stopped: {item.error}"
        elif item.format is None:
            line += "; not started"
        elif not item.complete:
            line += "; not finished"
        lines.append(line)
    total_read = sum(item.read for item in result.inputs)
    total_published = sum(item.published for item in result.inputs)
    lines.append(f"total: {total_read} read, {total_published} {verb}, {result.skipped} skipped")
    if result.dry_run:
        lines.append("dry run: nothing was published")
    if result.delivery_error:
        lines.append(f"delivery failed: {result.delivery_error}")
    if result.interrupted:
        lines.append("interrupted: run again with the same --state to continue")
    if result.skipped and allow_skips:
        lines.append("skipped records allowed (--allow-skips)")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer_examples.backfill",
        description="Publish the guide's outputs.json and scores.jsonl (JSON arrays or JSON Lines) to the "
                    "span-context and NeMo result topics, verbatim, so the service joins them.")
    parser.add_argument("--outputs", type=Path, help="outputs.json: records whose input.source names the span")
    parser.add_argument("--scores", type=Path, help="scores.jsonl: NeMo LLM-as-a-judge lines")
    parser.add_argument("--ml-app", help="ml_app header for the records (else the service's DEFAULT_ML_APP applies)")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--run-id", help="run_id header for the records: the run of these answers and judgements "
                                       f"(default, with both files: {DEFAULT_RUN_PREFIX}<start of the outputs file's "
                                       "SHA-256>; with one: none)")
    runs.add_argument("--no-run-id", action="store_true", help="publish without a run_id, even with both files")
    parser.add_argument("--judged-model", default=os.environ.get("JUDGED_MODEL"),
                        help="publish only the judge lines about this model, the app's (default: $JUDGED_MODEL)")
    add_kafka_arguments(parser, topics=("span", "result"))
    parser.add_argument("--join-key", default=os.environ.get("JOIN_KEY", JOIN_KEY),
                        help=f"the service's JOIN_KEY (default: $JOIN_KEY or {JOIN_KEY})")
    parser.add_argument("--max-message-bytes", type=int,
                        default=int(os.environ.get("MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES)),
                        help="the service's MAX_MESSAGE_BYTES; larger records are skipped "
                             f"(default: {MAX_MESSAGE_BYTES})")
    parser.add_argument("--state", type=Path, help="checkpoint file: a run with the same file continues where the "
                                                   "last one stopped")
    parser.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY, metavar="N",
                        help=f"records between checkpoints (default: {DEFAULT_CHECKPOINT_EVERY})")
    parser.add_argument("--dry-run", action="store_true", help="check every record with the service's decoders; "
                                                              "publish nothing; --state is neither read nor written")
    parser.add_argument("--allow-skips", action="store_true", help="exit 0 even if records were skipped")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> tuple[Options, bool]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.outputs and not args.scores:
        parser.error("give --outputs, --scores or both")
    if args.checkpoint_every < 1:
        parser.error("--checkpoint-every must be at least 1")
    try:
        if args.run_id is not None:
            _NAME.validate_python(args.run_id)
    except ValidationError:
        parser.error("--run-id must be 1 to 200 characters without control characters")
    options = Options(outputs=args.outputs, scores=args.scores, ml_app=args.ml_app, run_id=args.run_id or None,
                      no_run_id=args.no_run_id, judged_model=args.judged_model or None, bootstrap=args.bootstrap,
                      span_topic=args.span_topic, result_topic=args.result_topic, join_key=args.join_key,
                      max_message_bytes=args.max_message_bytes, state=args.state,
                      checkpoint_every=args.checkpoint_every, dry_run=args.dry_run,
                      progress=not args.quiet and sys.stderr.isatty())
    return options, bool(args.allow_skips)


async def run_cli(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None,
                  stop: asyncio.Event | None = None) -> int:
    """The command: run, print the summary on ``out``, return the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    options, allow_skips = parse_options(argv)
    if options.ml_app is None:
        print("note: no --ml-app: the service files these records under its DEFAULT_ML_APP", file=err)
    try:
        result = await run(options, stop=stop, err=err)
    except ValueError as exc:  # a state file that is not one, or invalid Kafka variables
        print(f"backfill: {exc}", file=err)
        return EXIT_USAGE
    except OSError as exc:  # the state file cannot be read or written
        print(f"backfill: state file: {exc}", file=err)
        return EXIT_USAGE
    except KafkaError as exc:  # the broker cannot be reached, or refused a record outright
        print(f"backfill: Kafka: {exc!r}; the state file keeps the last acknowledged position", file=err)
        return EXIT_DELIVERY
    print(format_summary(result, allow_skips=allow_skips), file=out, flush=True)
    return result.exit_code(allow_skips=allow_skips)


async def _main(argv: Sequence[str] | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return await run_cli(argv, stop=stop)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(_main(argv))


if __name__ == "__main__":
    sys.exit(main())
