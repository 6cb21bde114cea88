"""Backfill from files: the guide's outputs.json and scores.jsonl through Kafka and the service to the intake.

Streaming (bounded memory on large JSON arrays and JSON Lines files), idempotent re-runs,
resuming from the state file after a clean stop and after SIGKILL, dry runs, and checkpoints that
never pass a record the broker did not acknowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import signal
import sys
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from producer_examples import app_side
from producer_examples.backfill import Options, Result, build_parser, run, run_cli
from producer_examples.jsonstream import RecordReader, open_at
from tests.support import Topics, eventually, group_lag, read_topic, running_service

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = REPO_ROOT / "producer_examples" / "seed"
FileFormat = Literal["json_array", "jsonl"]


def write_pairs(directory: Path, count: int, *, outputs_format: FileFormat = "json_array",
                scores_format: FileFormat = "jsonl") -> tuple[Path, Path]:
    """``count`` outputs records and their scores lines, shaped like the guide's (a scores line is about 1 KB)."""
    outputs = ({"input": {"prompt": f"Question {i}?", "ideal_response": "An ideal answer. " * 6, "category": "food",
                          "source": f"trace_id={i + 1:032x};span_id={1000 + i};question_id=q-{i}"},
                "response": "A response long enough to matter. " * 8, "llm_name": "gpt-3.5-turbo"}
               for i in range(count))
    scores = ({"question_id": f"q-{i}", "model": "meta/llama-3.1-8b-instruct",
               "judge": ["meta/llama-3.1-8b-instruct", "single-v1"],
               "user_prompt": "[Instruction]\nPlease act as an impartial judge. " * 16,
               "judgment": f"Rating: [[{i % 10}]]", "score": i % 10, "turn": 1, "tstamp": 1740429821.107 + i}
              for i in range(count))
    paths = []
    for name, records, fmt in (("outputs", outputs, outputs_format), ("scores", scores, scores_format)):
        path = directory / (name + (".json" if fmt == "json_array" else ".jsonl"))
        with open(path, "wb") as out:
            if fmt == "jsonl":
                for record in records:
                    out.write(orjson.dumps(record) + b"\n")
            else:  # written as a person or json.dump would: indented, across many lines
                out.write(b"[\n" + b",\n".join(orjson.dumps(r, option=orjson.OPT_INDENT_2) for r in records) + b"\n]\n")
        paths.append(path)
    return paths[0], paths[1]


def options(kafka: KafkaBroker, topics: Topics, outputs: Path | None, scores: Path | None, **more: Any) -> Options:
    return Options(outputs=outputs, scores=scores, bootstrap=kafka.bootstrap_servers, span_topic=topics.span,
                   result_topic=topics.result, **more)


def cli(kafka: KafkaBroker, topics: Topics, *args: str) -> list[str]:
    return [*args, "--bootstrap", kafka.bootstrap_servers, "--span-topic", topics.span,
            "--result-topic", topics.result, "--quiet"]


async def topic_size(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def topic_values(bootstrap: str, topic: str) -> Counter[bytes]:
    """Every record value on ``topic`` with how often it is there."""
    size = await topic_size(bootstrap, topic)
    return Counter(record.value for record in await read_topic(bootstrap, topic, size))


def file_records(path: Path) -> list[bytes]:
    """The records of a test file, compact, for comparison with what was published."""
    if path.suffix == ".json":
        return [orjson.dumps(record) for record in json.loads(path.read_bytes())]
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def compact(values: Counter[bytes]) -> Counter[bytes]:
    return Counter({orjson.dumps(orjson.loads(value)): count for value, count in values.items()})


async def test_guide_seed_files_arrive_as_the_guides_evaluation(kafka: KafkaBroker, topics: Topics,
                                                               make_settings: Callable[..., Settings],
                                                               intake: FakeIntake) -> None:
    """The guide's outputs.json and scores.jsonl, backfilled, give the cake evaluation: quality_assessment 8."""
    out, err = io.StringIO(), io.StringIO()
    async with running_service(make_settings()):
        code = await run_cli(cli(kafka, topics, "--outputs", str(SEED / "outputs.json"),
                                 "--scores", str(SEED / "scores.jsonl"), "--ml-app", "nemos-demo"), out=out, err=err)
        assert code == 0, err.getvalue()
        await eventually(lambda: len(intake.accepted_metrics()) >= 1, what="the cake evaluation")
    (metric,) = intake.accepted_metrics()
    assert metric["join_on"] == {"span": {"span_id": "1", "trace_id": "0"}}
    assert (metric["label"], metric["metric_type"], metric["score_value"]) == ("quality_assessment", "score", 8)
    assert metric["reasoning"] == "The answer clearly denotes the ingredients needed to make a cake"
    # The line's tstamp (February 2025) is older than Datadog's window: sent with the record's time, kept in metadata.
    assert metric["metadata"] == {
        "model": "meta/llama-3.1-8b-instruct",
        "judgement": "Rating: [[8]] The answer clearly denotes the ingredients needed to make a cake",
        "evaljoin_original_timestamp_ms": 1740429821107,
    }
    # Published verbatim: the records on the topics are the files' bytes.
    (span_record,) = await read_topic(kafka.bootstrap_servers, topics.span, 1)
    (result_record,) = await read_topic(kafka.bootstrap_servers, topics.result, 1)
    assert (metric["ml_app"], metric["timestamp_ms"]) == ("nemos-demo", result_record.timestamp)
    assert result_record.value == (SEED / "scores.jsonl").read_bytes().strip()
    assert orjson.loads(span_record.value) == json.loads((SEED / "outputs.json").read_text())[0]
    assert span_record.key == result_record.key == b"nemos-demo:1"
    run = "backfill-" + hashlib.sha256((SEED / "outputs.json").read_bytes()).hexdigest()[:16]
    assert dict(span_record.headers) == dict(result_record.headers) == {"ml_app": b"nemos-demo",
                                                                        "run_id": run.encode()}
    assert out.getvalue().splitlines()[0].startswith(f"run_id: {run} (the default, made of the outputs file;")
    assert out.getvalue().splitlines()[-1] == "total: 2 read, 2 published, 0 skipped"


async def test_large_files_are_streamed_in_bounded_memory(kafka: KafkaBroker, topics: Topics, tmp_path: Path) -> None:
    """5,000 pairs (a JSON array and JSON Lines) are published with peak memory far below the files' size."""
    outputs, scores = write_pairs(tmp_path, 5000)
    size = outputs.stat().st_size + scores.stat().st_size
    assert size > 7_000_000
    tracemalloc.start()
    try:
        result = await run(options(kafka, topics, outputs, scores, ml_app="big-app", checkpoint_every=500))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(i.format, i.read, i.published) for i in result.inputs] == [("json_array", 5000, 5000),
                                                                         ("jsonl", 5000, 5000)]
    assert peak < size / 8, f"peak {peak} bytes while publishing {size} bytes of files"
    assert await topic_size(kafka.bootstrap_servers, topics.span) == 5000
    assert await topic_size(kafka.bootstrap_servers, topics.result) == 5000
    # The other way round (outputs as JSON Lines, scores as one JSON array) reads the same records.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    outputs, scores = write_pairs(swapped, 5000, outputs_format="jsonl", scores_format="json_array")
    checked = await run(Options(outputs=outputs, scores=scores, dry_run=True))
    assert [(i.format, i.published, i.skipped) for i in checked.inputs] == [("jsonl", 5000, Counter()),
                                                                           ("json_array", 5000, Counter())]


async def test_rerun_publishes_duplicates_that_the_service_ignores(kafka: KafkaBroker, topics: Topics,
                                                                  tmp_path: Path, intake: FakeIntake,
                                                                  make_settings: Callable[..., Settings]) -> None:
    """Backfilling the same files twice puts each record on the topics twice and each evaluation at the intake once."""
    outputs, scores = write_pairs(tmp_path, 100)
    settings = make_settings()
    async with running_service(settings):
        for _ in range(2):
            assert await run_cli(cli(kafka, topics, "--outputs", str(outputs), "--scores", str(scores)),
                                 out=io.StringIO(), err=io.StringIO()) == 0
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="both runs consumed")
        await eventually(lambda: len(intake.accepted_metrics()) >= 100, what="100 evaluations")
    assert await topic_size(kafka.bootstrap_servers, topics.span) == 200
    assert await topic_size(kafka.bootstrap_servers, topics.result) == 200
    delivered = Counter(m["join_on"]["span"]["span_id"] for m in intake.accepted_metrics())
    assert delivered == Counter({str(1000 + i): 1 for i in range(100)})


async def test_interrupted_run_resumes_where_it_stopped(kafka: KafkaBroker, topics: Topics, tmp_path: Path) -> None:
    """Runs stopped mid-array and mid-lines continue from the state file: every record is published exactly once."""
    outputs, scores = write_pairs(tmp_path, 200)
    state = tmp_path / "backfill.state.json"

    async def backfill(stop_after: int | None = None) -> Result:
        return await run(options(kafka, topics, outputs, scores, state=state, checkpoint_every=25,
                                 stop_after=stop_after))

    first = await backfill(stop_after=130)  # stops inside the JSON array
    assert first.interrupted and first.exit_code() == 130
    assert [(i.published_this_run, i.complete) for i in first.inputs] == [(130, False), (0, False)]
    saved = json.loads(state.read_text())["inputs"]["outputs"]
    assert (saved["records"], saved["array_state"], saved["complete"]) == (130, "after_element", False)

    second = await backfill(stop_after=150)  # finishes the array, stops inside the JSON Lines file
    assert [(i.resumed_at, i.published_this_run) for i in second.inputs] == [(130, 70), (None, 80)]
    third = await backfill()
    assert not third.interrupted and third.exit_code() == 0
    assert [(i.resumed_at, i.published_this_run, i.published, i.complete) for i in third.inputs] == [
        (200, 0, 200, True), (80, 120, 200, True)]

    assert compact(await topic_values(kafka.bootstrap_servers, topics.span)) == Counter(file_records(outputs))
    assert await topic_values(kafka.bootstrap_servers, topics.result) == Counter(file_records(scores))

    # Lines appended to a JSON Lines file are all a later run publishes; a changed file is read again.
    late = b'{"question_id": "q-late", "score": 5, "model": "m", "judgment": "late", "tstamp": 1740429900}\n'
    scores.write_bytes(scores.read_bytes() + late)
    fourth = await backfill()
    assert [i.published_this_run for i in fourth.inputs] == [0, 1]
    outputs.write_bytes(outputs.read_bytes().replace(b"Question 0?", b"Question zero?"))
    fifth = await backfill()
    assert [(i.resumed_at, i.published_this_run) for i in fifth.inputs] == [(None, 200), (201, 0)]
    # Every record went out in the run the state file started with, though the outputs file changed since.
    assert fifth.run_id == first.run_id and first.run_id is not None and first.run_id.startswith("backfill-")
    runs = {dict(r.headers)["run_id"] for topic in (topics.span, topics.result) for r in await read_topic(
        kafka.bootstrap_servers, topic, await topic_size(kafka.bootstrap_servers, topic))}
    assert runs == {first.run_id.encode()}


async def test_killed_run_resumes_from_its_last_checkpoint(kafka: KafkaBroker, topics: Topics, tmp_path: Path) -> None:
    """After SIGKILL a run with the same state file publishes what was not checkpointed, and nothing is lost."""
    outputs, scores = write_pairs(tmp_path, 2000, outputs_format="jsonl")
    state = tmp_path / "state.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producer_examples.backfill",
        *cli(kafka, topics, "--outputs", str(outputs), "--scores", str(scores), "--state", str(state),
             "--checkpoint-every", "5"),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await eventually(lambda: state.exists() and json.loads(state.read_text())["inputs"]["outputs"]["records"]
                         >= 200, within=30, what="checkpoints of the first run")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
    checkpointed = json.loads(state.read_text())["inputs"]
    assert not checkpointed.get("scores", {}).get("complete", False)

    result = await run(options(kafka, topics, outputs, scores, state=state))
    assert result.exit_code() == 0
    assert result.inputs[0].resumed_at == checkpointed["outputs"]["records"]
    spans = await topic_values(kafka.bootstrap_servers, topics.span)
    results = await topic_values(kafka.bootstrap_servers, topics.result)
    assert set(spans) == set(file_records(outputs)) and set(results) == set(file_records(scores))
    # Only the records of one checkpoint window (5) of the killed run can be there twice.
    assert 0 <= sum(spans.values()) + sum(results.values()) - 4000 <= 5


async def test_dry_run_reports_bad_records_and_publishes_nothing(kafka: KafkaBroker, topics: Topics,
                                                                tmp_path: Path) -> None:
    """--dry-run names each bad record's line and reason, counts them, publishes nothing and exits 1."""
    scores = tmp_path / "scores.jsonl"
    good = (SEED / "scores.jsonl").read_text().strip()
    scores.write_text("\n".join([
        good, "{not json", '{"model": "m", "score": 3}', '{"question_id": 2, "model": "m"}',
        '{"question_id": 3, "score": "high"}', "", "[1, 2]"]) + "\n")
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps([
        {"input": {"prompt": "p", "source": "trace_id=0;span_id=1;question_id=1"}},
        {"input": {"prompt": "p"}},
        {"input": {"prompt": "p", "source": "trace_id=ab;span_id=7"}},
    ], indent=2))
    out, err = io.StringIO(), io.StringIO()
    code = await run_cli(cli(kafka, topics, "--outputs", str(outputs), "--scores", str(scores), "--dry-run"),
                         out=out, err=err)
    assert code == 1
    reports = [line for line in err.getvalue().splitlines() if "skipped" in line]
    assert reports == [
        f"{outputs}:8: record 1 skipped (missing_source): input.source must be a string "
        "trace_id=..;span_id=..;<join key>=..",
        f"{outputs}:13: record 2 skipped (missing_question_id): input.source lacks question_id",
        f"{scores}:2: record 1 skipped (invalid_json): unexpected character, expected a string key: line 1 column 2 "
        "(char 1)",
        f"{scores}:3: record 2 skipped (missing_question_id): neither a NeMo result event nor a scores.jsonl "
        "judge line",
        f"{scores}:4: record 3 skipped (missing_score): neither a NeMo result event nor a scores.jsonl judge line",
        f"{scores}:5: record 4 skipped (schema): score must be a finite number (or null or NaN: not rated)",
        f"{scores}:7: record 5 skipped (not_an_object): a NeMo result event must be a JSON object",
    ]
    run, *summary = out.getvalue().splitlines()
    assert run.startswith("run_id: backfill-")
    assert summary[0].endswith(": 3 read, 1 valid, 2 skipped (missing_question_id 1, missing_source 1)")
    assert summary[1].endswith(": 6 read, 1 valid, 5 skipped (invalid_json 1, missing_question_id 1, "
                               "missing_score 1, not_an_object 1, schema 1)")
    assert summary[2:] == ["total: 9 read, 2 valid, 7 skipped", "dry run: nothing was published"]
    assert await topic_size(kafka.bootstrap_servers, topics.span) == 0
    assert await topic_size(kafka.bootstrap_servers, topics.result) == 0

    # A real run publishes the valid records only; --allow-skips makes that a success.
    code = await run_cli(cli(kafka, topics, "--outputs", str(outputs), "--scores", str(scores), "--allow-skips"),
                         out=io.StringIO(), err=io.StringIO())
    assert code == 0
    assert await topic_size(kafka.bootstrap_servers, topics.span) == 1
    assert await topic_size(kafka.bootstrap_servers, topics.result) == 1


async def test_checkpoint_never_passes_an_unacknowledged_record(kafka: KafkaBroker, topics: Topics,
                                                                tmp_path: Path) -> None:
    """A record the broker refuses stops the run with exit 3, and the state file stays before it."""
    refusing = topics.result + ".small"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(refusing, 1, 1, topic_configs={"max.message.bytes": "2000"})])
    finally:
        await admin.close()
    line = json.loads((SEED / "scores.jsonl").read_text())
    scores = tmp_path / "scores.jsonl"
    lines = [json.dumps({**line, "question_id": i}) for i in range(3)]  # about 1.2 KB each
    lines.append(json.dumps({**line, "question_id": 3, "judgment": "x" * 3000}))  # more than the topic takes
    scores.write_text("\n".join(lines) + "\n")
    state = tmp_path / "state.json"
    out_text, err = io.StringIO(), io.StringIO()
    code = await run_cli(["--scores", str(scores), "--bootstrap", kafka.bootstrap_servers, "--result-topic", refusing,
                          "--state", str(state), "--checkpoint-every", "1", "--quiet"], out=out_text, err=err)
    assert code == 3, err.getvalue()
    assert "MessageSizeTooLarge" in err.getvalue()
    assert json.loads(state.read_text())["inputs"]["scores"]["records"] == 3
    assert await topic_size(kafka.bootstrap_servers, refusing) == 3


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(items=st.lists(json_values, max_size=8), indent=st.booleans(), read_size=st.integers(1, 17),
       stop=st.integers(0, 8), fmt=st.sampled_from(["json_array", "jsonl"]))
def test_reader_yields_exact_records_and_resumes_at_any_record(items: list[Any], indent: bool, read_size: int,
                                                              stop: int, fmt: FileFormat) -> None:
    """The streaming reader yields each record's exact bytes and line, and resumes after any record it yielded."""
    if fmt == "json_array":
        text = json.dumps(items, indent=2 if indent else None, ensure_ascii=False).encode()
    else:
        text = b"".join(json.dumps(item).encode() + (b"\n\n" if indent else b"\n") for item in items)
    records = list(RecordReader(io.BytesIO(text), fmt, max_record_bytes=10**6, read_size=read_size))
    assert [json.loads(r.value or b"") for r in records] == items
    assert all(text[r.start:r.end].strip() == r.value for r in records)
    assert [r.line for r in records] == [text[:r.start].count(b"\n") + 1 for r in records]

    first = RecordReader(io.BytesIO(text), fmt, max_record_bytes=10**6, read_size=read_size)
    head = list(itertools.islice(first, min(stop, len(records))))
    assert first.prefix_digest() == hashlib.sha256(text[:first.position.offset]).hexdigest()
    resumed = open_at(io.BytesIO(text), fmt, first.position, first.prefix_digest(), max_record_bytes=10**6)
    assert resumed is not None
    assert [r.value for r in head + list(resumed)] == [r.value for r in records]
    changed = text[:first.position.offset - 1] + b"#" + text[first.position.offset:]
    if first.position.offset:
        assert open_at(io.BytesIO(changed), fmt, first.position, first.prefix_digest(), max_record_bytes=10) is None


def test_readme_names_only_real_options() -> None:
    """Every command-line flag the producer examples' README mentions exists in that program's parser."""
    readme = (REPO_ROOT / "producer_examples" / "README.md").read_text()
    intro, rest = readme.split("## App side", 1)
    app_section, backfill_section = rest.split("## Backfill", 1)
    app = {o for a in app_side.build_parser()._actions for o in a.option_strings}
    backfill = {o for a in build_parser()._actions for o in a.option_strings}
    flags = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
    assert set(flags.findall(intro)) <= app | backfill
    assert set(flags.findall(app_section)) <= app
    assert set(flags.findall(backfill_section)) <= backfill


async def test_the_run_is_given_the_default_or_none(kafka: KafkaBroker, topics: Topics, tmp_path: Path) -> None:
    """--run-id names the run; with both files the default is made of the outputs file; one file, --no-run-id: none."""
    outputs, scores = write_pairs(tmp_path, 3)

    async def headers() -> Counter[bytes | None]:
        found: Counter[bytes | None] = Counter()
        for topic in (topics.span, topics.result):
            records = await read_topic(kafka.bootstrap_servers, topic, await topic_size(kafka.bootstrap_servers, topic))
            found.update(dict(record.headers).get("run_id") for record in records)
        return found

    async def runs_of(*args: str) -> set[bytes | None]:
        before = await headers()
        assert await run_cli(cli(kafka, topics, *args), out=io.StringIO(), err=io.StringIO()) == 0
        return set(await headers() - before)

    default = ("backfill-" + hashlib.sha256(outputs.read_bytes()).hexdigest()[:16]).encode()
    assert await runs_of("--outputs", str(outputs), "--scores", str(scores)) == {default}
    assert await runs_of("--outputs", str(outputs), "--scores", str(scores), "--run-id", "nightly-7") == {b"nightly-7"}
    assert await runs_of("--outputs", str(outputs), "--scores", str(scores), "--no-run-id") == {None}
    assert await runs_of("--scores", str(scores)) == {None}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--scores", str(scores), "--run-id", "x", "--no-run-id"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        await run_cli(cli(kafka, topics, "--scores", str(scores), "--run-id", "a\nb"))
    assert "--run-id must be 1 to 200 characters" in err.getvalue()


async def test_judge_lines_that_give_no_score_are_counted_not_published(kafka: KafkaBroker, topics: Topics,
                                                                       tmp_path: Path) -> None:
    """Unrated lines (-1, null, NaN) and, with --judged-model, other models' lines are named and counted, not
    published, and the backfill still exits 0."""
    seed = json.loads((SEED / "scores.jsonl").read_text())
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps(line) + "\n" for line in [
        seed, seed | {"turn": 2, "score": -1}, seed | {"question_id": 2, "score": None},
        seed | {"question_id": 3, "score": float("nan")}, seed | {"question_id": 4, "model": "vicuna-13b"}]))
    out, err = io.StringIO(), io.StringIO()
    code = await run_cli(cli(kafka, topics, "--scores", str(scores), "--judged-model", seed["model"]), out=out, err=err)
    assert code == 0, err.getvalue()
    assert "5 read, 1 published, 0 skipped, 4 not sent (other_model 1, unrated 3)" in out.getvalue()
    assert "record 1 not sent (unrated): question_id '1', quality_assessment_turn2: score -1" in err.getvalue()
    assert await topic_size(kafka.bootstrap_servers, topics.result) == 1
