"""The app side: step 1 of the guide, streaming. Each answer's span context is published as it happens.

In an application (library use)::

    async with SpanContextReporter(ml_app="support-bot") as reporter:
        ...
        with LLMObs.workflow(name="handle_user_input"):
            response = await client.chat.completions.create(...)
            await reporter.report(question_id)

:meth:`SpanContextReporter.report` takes ``LLMObs.export_span()`` (the active LLM Observability
span, or the one passed) and publishes a span-context event with the app's join key (the
``question_id`` the evaluation dataset will use), its ``ml_app`` and optional tags. Evaluations
of that answer that come later, from NeMo Evaluator, are attached to that span by the service.
Leaving the ``async with`` block waits until the broker acknowledged every event.

As a program it is the guide's example app: it enables LLM Observability, answers each question
with an OpenAI-compatible endpoint (OpenAI, a NIM, any ``--base-url``) inside
``LLMObs.workflow(...)``, publishes the span context and prints one JSON line per answer::

    python -m producer_examples.app_side --ml-app nemos-demo --base-url http://localhost:8000/v1 \\
        --model meta/llama-3.1-8b-instruct --question 1 "What are the ingredients in cake?"

Questions come from ``--question ID TEXT`` (repeatable) and/or ``--questions FILE`` (JSON Lines or
a JSON array of objects with ``question_id`` and ``question`` or ``prompt``), read one at a time.
Exit codes: 0 every question answered and its span context acknowledged by the broker; 1 some LLM
calls failed (the others were reported); 2 bad arguments or a bad question record; 3 Kafka failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import orjson
from aiokafka.errors import KafkaError
from ddtrace.llmobs import LLMObs
from openai import AsyncOpenAI, OpenAIError

from consumer.events import SpanContextEvent
from consumer.join import default_tag_value
from producer_examples.jsonstream import RecordReader, detect_format
from producer_examples.publisher import DeliveryError, EventPublisher, add_kafka_arguments, kafka_settings_from

DEFAULT_SYSTEM_PROMPT = "You are a helpful cooking assistant. Please reject any non-food related questions."
MAX_QUESTION_BYTES = 1 << 20  # a larger question record is refused, so that reading one stays bounded
CONCURRENCY = 4  # questions answered at once (--concurrency)
LLM_MAX_RETRIES = 2  # the OpenAI client's retries of a call that failed transiently


class SpanContextError(RuntimeError):
    """There is no LLM Observability span to report (not enabled, or no active span)."""


def span_context_event(exported: Mapping[str, Any], *, join_key: str | int, ml_app: str,
                       tags: Mapping[str, str] | None = None, emitted_at_ms: int | None = None,
                       run_id: str | None = None) -> SpanContextEvent:
    """The span-context event for what ``LLMObs.export_span()`` returned; validated, so a bad value raises here."""
    return SpanContextEvent(
        schema_version=1, ml_app=ml_app, run_id=run_id, join_key=str(join_key),
        trace_id=str(exported["trace_id"]), span_id=str(exported["span_id"]), tags=dict(tags or {}),
        emitted_at_ms=int(time.time() * 1000) if emitted_at_ms is None else emitted_at_ms,
    )


def join_tag_value(join_key: str | int, run_id: str | None = None) -> str:
    """The value to tag an answer's span with for evaljoin's tag join (``JOIN_BY_TAG``) under its default rule
    (:func:`consumer.join.default_tag_value`); a deployment with ``JOIN_TAG_VALUE`` set tags by that template."""
    return default_tag_value(str(join_key), run_id)


class SpanContextReporter:
    """Publishes the span context of LLM Observability spans to the span-context topic.

    Use it as an async context manager: entering starts its :class:`EventPublisher` (unless one
    that the caller manages is passed), leaving flushes and stops it, raising
    :class:`~producer_examples.publisher.DeliveryError` if the broker did not acknowledge an event.
    ``tags`` are added to every event (per-call tags win); ``run_id`` names the run the answers belong
    to (an evaluation run over a dataset: its results must carry the same). Extra keyword arguments go to the
    :class:`EventPublisher` (``kafka``, or ``bootstrap_servers`` and ``span_topic``; aiokafka options).
    """

    def __init__(self, *, ml_app: str, tags: Mapping[str, str] | None = None, run_id: str | None = None,
                 publisher: EventPublisher | None = None, **publisher_options: Any) -> None:
        self.ml_app = ml_app
        self.tags = dict(tags or {})
        self.run_id = run_id
        self._owns_publisher = publisher is None
        self.publisher = publisher or EventPublisher(**publisher_options)
        self.reported = 0

    async def __aenter__(self) -> SpanContextReporter:
        if self._owns_publisher:
            await self.publisher.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._owns_publisher:
            await self.publisher.__aexit__(exc_type, exc, tb)
        else:
            await self.publisher.flush()

    async def report(self, join_key: str | int, *, span: Any = None,
                     tags: Mapping[str, str] | None = None) -> SpanContextEvent:
        """Publish the context of ``span`` (default: the active LLM Observability span) for ``join_key``.

        Call it inside the span, e.g. inside ``with LLMObs.workflow(...)``, from the task or thread
        that opened it. Returns the event once it is queued for sending; :meth:`flush` (or leaving
        the ``async with`` block) waits until the broker acknowledged it. Raises
        :class:`SpanContextError` when LLM Observability is not enabled or no span is active.
        """
        try:
            exported = LLMObs.export_span(span)
        except Exception as exc:  # ddtrace's LLMObsExportSpanError is not public
            raise SpanContextError(str(exc)) from exc
        if exported is None:
            raise SpanContextError("LLM Observability is not enabled: call LLMObs.enable(...) first")
        event = span_context_event(exported, join_key=join_key, ml_app=self.ml_app, tags={**self.tags, **(tags or {})},
                                   run_id=self.run_id)
        await self.publisher.publish_span(event)
        self.reported += 1
        return event

    async def flush(self) -> None:
        """Wait until every event reported so far is acknowledged by the broker."""
        await self.publisher.flush()


# -- the example app --------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    question_id: str
    text: str


def read_questions(path: Path, *, id_field: str = "question_id",
                   text_fields: Sequence[str] = ("question", "prompt")) -> Iterator[Question]:
    """Questions from a JSON Lines file or a JSON array, one record at a time. Raises ValueError on a bad record."""
    with open(path, "rb") as stream:
        for record in RecordReader(stream, detect_format(stream), max_record_bytes=MAX_QUESTION_BYTES):
            where = f"{path}:{record.line}"
            if record.value is None:
                raise ValueError(f"{where}: the record is larger than {MAX_QUESTION_BYTES} bytes")
            try:
                obj = orjson.loads(record.value)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: a question must be a JSON object")
            question_id = obj.get(id_field)
            text = next((obj[name] for name in text_fields if isinstance(obj.get(name), str)), None)
            if isinstance(question_id, bool) or not isinstance(question_id, str | int) or text is None:
                raise ValueError(f"{where}: needs {id_field!r} (a string or integer) and one of {list(text_fields)}")
            yield Question(str(question_id), text)


async def answer(question: Question, *, client: AsyncOpenAI, model: str, system_prompt: str,
                 reporter: SpanContextReporter) -> dict[str, Any]:
    """Answer one question inside an LLM Observability workflow span and report that span's context."""
    with LLMObs.workflow(name="handle_user_input"):
        response = await client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": system_prompt}, {"role": "user", "content": question.text}],
        )
        content = response.choices[0].message.content or ""
        # The join key as a span tag too, so a deployment that joins this app by tag (JOIN_BY_TAG) finds the span.
        LLMObs.annotate(input_data=question.text, output_data=content,
                        tags={"question_id": join_tag_value(question.question_id, reporter.run_id)})
        event = await reporter.report(question.question_id)
    return {"question_id": question.question_id, "trace_id": event.trace_id, "span_id": event.span_id,
            "answer": content}


async def answer_all(questions: Iterator[Question], *, client: AsyncOpenAI, model: str,
                     system_prompt: str, reporter: SpanContextReporter, concurrency: int, out: TextIO,
                     err: TextIO) -> tuple[int, int]:
    """Answer with ``concurrency`` workers, printing a JSON line per answer; returns (answered, failed)."""
    queue: asyncio.Queue[Question | None] = asyncio.Queue(maxsize=concurrency)
    counts = {"answered": 0, "failed": 0}

    async def worker() -> None:
        while (question := await queue.get()) is not None:
            try:
                line = await answer(question, client=client, model=model, system_prompt=system_prompt,
                                    reporter=reporter)
            except OpenAIError as exc:
                counts["failed"] += 1
                print(f"question {question.question_id}: the LLM call failed: {exc}", file=err, flush=True)
                continue
            counts["answered"] += 1
            out.write(orjson.dumps(line).decode() + "\n")
            out.flush()

    async def feed() -> None:
        for question in questions:
            await queue.put(question)
        for _ in range(concurrency):
            await queue.put(None)

    # One failure other than the LLM's (Kafka, a bad question record) stops everything.
    tasks = [asyncio.create_task(feed()), *(asyncio.create_task(worker()) for _ in range(concurrency))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return counts["answered"], counts["failed"]


def _tag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a tag is name:value, not {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer_examples.app_side",
        description="Answer questions with an OpenAI-compatible endpoint under LLM Observability and publish "
                    "each answer's span context (trace_id, span_id, question_id) to the span-context topic.")
    parser.add_argument("--ml-app", required=True, help="the app's ml_app (LLM Observability and the events)")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                        help="OpenAI-compatible API base, e.g. http://localhost:8000/v1 for a NIM "
                             "(default: $OPENAI_BASE_URL, else OpenAI's)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="API key (default: $OPENAI_API_KEY; endpoints that need none get a placeholder)")
    parser.add_argument("--model", required=True, help="model name, e.g. meta/llama-3.1-8b-instruct")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--question", nargs=2, action="append", default=[], metavar=("ID", "TEXT"),
                        help="a question and its id (repeatable)")
    parser.add_argument("--questions", type=Path, metavar="FILE",
                        help="JSON Lines or JSON array of objects with question_id and question (or prompt)")
    parser.add_argument("--id-field", default="question_id", help="the id field in --questions (default: question_id)")
    parser.add_argument("--tag", type=_tag, action="append", default=[], metavar="NAME:VALUE",
                        help="a tag on every span-context event (repeatable)")
    parser.add_argument("--run-id", help="the run these answers belong to, e.g. tonight's evaluation over the "
                                         "dataset; its judgements must be published with the same run id")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY,
                        help="questions answered at once (default: %(default)s)")
    add_kafka_arguments(parser, topics=("span",))
    return parser


async def run(args: argparse.Namespace, *, out: TextIO, err: TextIO) -> int:
    def questions() -> Iterator[Question]:
        for question_id, text in args.question:
            yield Question(question_id, text)
        if args.questions:
            yield from read_questions(args.questions, id_field=args.id_field)

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "unused", max_retries=LLM_MAX_RETRIES)
    async with client, SpanContextReporter(ml_app=args.ml_app, tags=dict(args.tag), run_id=args.run_id or None,
                                           kafka=kafka_settings_from(args)) as reporter:
        answered, failed = await answer_all(questions(), client=client, model=args.model,
                                            system_prompt=args.system_prompt, reporter=reporter,
                                            concurrency=args.concurrency, out=out, err=err)
    print(f"answered {answered}, failed {failed}, span contexts published {reporter.reported}", file=err, flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.question and not args.questions:
        parser.error("give --question ID TEXT and/or --questions FILE")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    # The guide writes LLMObs.enable(ml_app=...); ddtrace 4.16 names the same setting agent_service
    # and deprecates ml_app. Agentless mode, the API key, the site and DD_LLMOBS_OVERRIDE_ORIGIN
    # come from the DD_* environment as usual.
    try:
        LLMObs.enable(agent_service=args.ml_app)
    except ValueError as exc:  # e.g. agentless (no Agent found, or asked for) without DD_API_KEY
        print(f"app_side: LLM Observability: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args, out=sys.stdout, err=sys.stderr))
    except ValueError as exc:  # a bad --questions record, or invalid Kafka variables
        print(f"app_side: {exc}", file=sys.stderr)
        return 2
    except (KafkaError, DeliveryError) as exc:
        print(f"app_side: span contexts could not be published: {exc!r}", file=sys.stderr)
        return 3
    finally:
        LLMObs.flush()  # send the spans now rather than at interpreter exit
        LLMObs.disable()


if __name__ == "__main__":
    sys.exit(main())
