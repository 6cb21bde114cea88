"""The NeMo Evaluator publisher: target validation, result mapping, the v1 API through the real client, end to end.

The API tests drive NVIDIA's own ``nemo-microservices`` client against ``tests/nemo_standin.py``,
a local stand-in of the v1 evaluation API; the end-to-end test sends the publisher's events and
span-context events through a real Kafka broker and the running service to the intake.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import logging
import math
import time
import traceback
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaProducer
from hypothesis import given
from hypothesis import strategies as st
from nemo_microservices import AsyncNeMoMicroservices
from structlog.testing import capture_logs

from consumer.config import Settings
from consumer.logs import configure_logging
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from localenv.ports import free_port
from producer_examples.nemo.cli import build_parser, execute
from producer_examples.nemo.errors import EvaluatorError, JobFailed, JobTimeout, MappingError, TargetError
from producer_examples.nemo.evaluator import Evaluator
from producer_examples.nemo.mapping import LABEL_RULE, RunContext, classify, label_for, map_files
from producer_examples.nemo.publish import map_local_run, publish, run_job
from producer_examples.nemo.readers import read_path, read_zip
from producer_examples.nemo.targets import (
    NESTED_ENDPOINT_FIX,
    collect_secrets,
    parse_config,
    parse_target,
    request_body,
)
from producer_examples.publisher import EventPublisher
from tests.nemo_standin import MASK, NemoEvaluatorStandIn
from tests.support import Topics, eventually, group_lag, read_topic, running_service, send_json, topic_size

pytestmark = pytest.mark.timeout(120)

SEED = Path(__file__).parent.parent / "producer_examples" / "seed"
OUTPUT_RECORD = json.loads((SEED / "outputs.json").read_text())[0]
API_KEY = "nvapi-test-0123456789abcdef"
NIM = "http://nim.internal:8000/v1"
LLM = {"api_endpoint": {"url": f"{NIM}/chat/completions", "model_id": "meta/llama-3.1-8b-instruct"}}
QUERY = {"api_endpoint": {"url": f"{NIM}/embeddings", "model_id": "nvidia/nv-embedqa-e5-v5"}}
INDEX = copy.deepcopy(QUERY)
RERANK = {"api_endpoint": {"url": f"{NIM}/ranking", "model_id": "nvidia/nv-rerankqa-mistral-4b-v3"}}
FILES = {"files_url": "hf://datasets/my-org/qa-cache/outputs.jsonl"}


def target(kind: str, body: dict[str, Any], name: str = "t1") -> dict[str, Any]:
    return {"type": kind, "name": name, "namespace": "my-organization", **body}


def retriever(*, reranker: bool, top_k: Any = 5) -> dict[str, Any]:
    pipeline: dict[str, Any] = {"query_embedding_model": QUERY, "index_embedding_model": INDEX, "top_k": top_k}
    if reranker:
        pipeline["reranker_model"] = RERANK
    return {"pipeline": pipeline}


# Every target of NVIDIA's "Create and Manage Evaluation Targets" guide, placeholders filled in, and
# the last two RAG examples with api_endpoint at the level the API takes it.
VALID_TARGETS = {
    "model_completions": target("model", {"model": {"api_endpoint": {
        "url": "http://nim.internal:8000/v1/completions", "model_id": "meta/llama-3.1-8b-instruct"}}}),
    "model_chat": target("model", {"model": LLM}),
    "model_openai_with_key": target("model", {"model": {"api_endpoint": {
        "url": "https://api.example.com/v1/chat/completions", "model_id": "gpt-4o-mini", "api_key": API_KEY,
        "format": "openai"}}}),
    "cached_outputs": target("cached_outputs", {"cached_outputs": FILES}),
    "retriever_embedding": target("retriever", {"retriever": retriever(reranker=False)}),
    "retriever_embedding_reranker": target("retriever", {"retriever": retriever(reranker=True)}),
    "rag_cached_answers": target("rag", {"rag": {"cached_outputs": FILES}}),
    "rag_cached_retrieval_and_model": target("rag", {"rag": {"pipeline": {
        "retriever": {"cached_outputs": FILES}, "model": LLM}}}),
    "rag_retriever_and_model": target("rag", {"rag": {"pipeline": {
        "retriever": retriever(reranker=False, top_k=3), "model": LLM}}}),
    "rag_retriever_reranker_and_model": target("rag", {"rag": {"pipeline": {
        "retriever": retriever(reranker=True, top_k=3), "model": LLM}}}),
    "model_reference": target("model", {"model": "meta/llama-3.1-8b-instruct"}),
    "rows": target("rows", {"rows": [{"question": "What is in a cake?", "answer": "flour"}]}),
}


def nested_rag(reranker: bool) -> dict[str, Any]:
    """The guide's last two RAG examples as printed: api_endpoint inside api_endpoint."""
    body = copy.deepcopy(VALID_TARGETS["rag_retriever_reranker_and_model" if reranker else "rag_retriever_and_model"])
    body["rag"]["pipeline"]["model"] = {"api_endpoint": {"api_endpoint": {**LLM["api_endpoint"], "api_key": API_KEY}}}
    return body


# --- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALID_TARGETS))
def test_every_documented_target_type_is_accepted(name: str) -> None:
    """Each target type of the guide validates, and its request body is what was given."""
    spec = parse_target(VALID_TARGETS[name])
    assert spec.type == VALID_TARGETS[name]["type"] and spec.ref == "my-organization/t1"
    assert request_body(spec) == VALID_TARGETS[name]


@pytest.mark.parametrize("reranker", [False, True], ids=["embedding", "embedding_reranker"])
def test_nested_api_endpoint_is_rejected_with_the_fix(reranker: bool) -> None:
    """The guide's nested api_endpoint is refused at its path, with the fix named, and without the key."""
    with pytest.raises(TargetError) as caught:
        parse_target(nested_rag(reranker))
    message = str(caught.value)
    assert "rag.pipeline.model.api_endpoint:" in message and NESTED_ENDPOINT_FIX in message
    assert API_KEY not in message


@pytest.mark.parametrize("top_k", [0, -3, 2.5, "5", True])
def test_top_k_must_be_a_positive_integer(top_k: Any) -> None:
    """A retriever's top_k that is not a positive integer is refused, naming top_k."""
    with pytest.raises(TargetError, match=r"retriever\.pipeline\.top_k"):
        parse_target(target("retriever", {"retriever": retriever(reranker=False, top_k=top_k)}))


@pytest.mark.parametrize(("body", "where"), [
    (target("model", {"model": {"api_endpoint": {"url": "<my-nim-deployment-base-url>/completions",
                                                 "model_id": "m"}}}), "placeholder"),
    (target("model", {"model": {"api_endpoint": {"url": "http://nim:8000/v1/embeddings", "model_id": "m"}}}),
     "/completions"),
    (target("model", {"model": {"api_endpoint": {**LLM["api_endpoint"], "api_key": MASK}}}), "masked"),
    (target("model", {"retriever": retriever(reranker=False)}), "model: Field required"),
    (target("rag", {"rag": {"cached_outputs": FILES, "pipeline": {"retriever": {"cached_outputs": FILES},
                                                                  "model": LLM}}}), "exactly one"),
    (target("retriever", {"retriever": {"pipeline": {"query_embedding_model": QUERY}}}), "index_embedding_model"),
    (target("cached_outputs", {"cached_outputs": {"files_url": "datasets/no-scheme"}}), "files_url"),
    ({"type": "llm", "name": "x"}, "type: must be one of"),
    ({**VALID_TARGETS["model_chat"], "name": "my/target"}, "name"),
])
def test_invalid_targets_are_rejected_naming_the_field(body: dict[str, Any], where: str) -> None:
    """Placeholders, wrong URLs, the API's masked key, missing or conflicting parts are refused before sending."""
    with pytest.raises(TargetError, match=where):
        parse_target(body)


def test_api_key_is_never_in_repr_errors_or_tracebacks() -> None:
    """A key shows as ********** in repr and str, and no validation error or traceback carries it."""
    spec = parse_target(VALID_TARGETS["model_openai_with_key"])
    assert API_KEY not in repr(spec) and API_KEY not in str(spec) and "**********" in repr(spec)
    assert request_body(spec)["model"]["api_endpoint"]["api_key"] == API_KEY  # sent, and only there
    assert collect_secrets(spec) == [API_KEY]
    bad = copy.deepcopy(VALID_TARGETS["model_openai_with_key"])
    bad["model"]["api_endpoint"]["url"] = "ftp://nowhere"
    with pytest.raises(TargetError) as caught:
        parse_target(bad)
    assert API_KEY not in "".join(traceback.format_exception(caught.value))
    config = parse_config({"type": "custom", "name": "judge-cfg", "tasks": {"qa": {"type": "chat-completion",
        "params": {"judge": {"model": {"api_endpoint": {
            "url": "http://judge/v1/chat/completions", "model_id": "judge", "api_key": API_KEY}}}}}}})
    assert API_KEY not in repr(config) and collect_secrets(config) == [API_KEY]


# --- mapping ------------------------------------------------------------------------------------


def ctx(**overrides: Any) -> RunContext:
    values: dict[str, Any] = {"ml_app": "support-bot", "source_id": "eval-job-1", "job_id": "eval-job-1",
                              "config": "my-org/qa", "target_type": "model", "target_name": "my-org/bot",
                              "model": "meta/llama-3.1-8b-instruct", "task": "qa"}
    values.update(overrides)
    return RunContext(**values)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))  # NaN/Infinity as Python writes them
    return path


def launcher_row(qid: str | None, idx: int, *, reward: Any = 1.0, repeat: int = 0, **scorers: Any) -> dict[str, Any]:
    metadata = {"question": f"question {idx}", **({"question_id": qid} if qid is not None else {})}
    return {"problem_idx": idx, "repeat": repeat, "reward": reward, "scorer_rewards": scorers,
            "model_response": "answer", "expected_answer": "answer", "metadata": metadata}


def byob_row(qid: str, idx: int, scores: dict[str, Any] | None, status: str = "scored") -> dict[str, Any]:
    return {"sample_id": idx, "prompt": "Q", "response": "A", "target": "A", "scores": scores, "status": status,
            "error": None if status == "scored" else "model call failed", "metadata": {"question_id": qid}}


def evaluations(result: Any) -> dict[tuple[str, str], tuple[str, Any]]:
    """(join key, label) -> (metric_type, value) of every mapped evaluation."""
    return {(event.join_key, e.label): (e.metric_type, e.value) for event in result.events for e in event.evaluations}


def test_bool_maps_to_boolean_before_int(tmp_path: Path) -> None:
    """True is a boolean, 1 a score, 0.5 a score and a string categorical: bool is checked before int."""
    assert classify(True) == ("boolean", True) and classify(1) == ("score", 1)
    assert classify(0.5) == ("score", 0.5) and classify("pass") == ("categorical", "pass")
    path = write_jsonl(tmp_path / "byob_predictions.jsonl",
                       [byob_row("q-1", 0, {"correct": True, "wrong": False, "points": 1, "f1": 0.5, "grade": "B"})])
    result = map_files(read_path(path, "byob"), ctx())
    assert evaluations(result) == {
        ("q-1", "correct"): ("boolean", True), ("q-1", "wrong"): ("boolean", False), ("q-1", "points"): ("score", 1),
        ("q-1", "f1"): ("score", 0.5), ("q-1", "grade"): ("categorical", "B"),
    }


def test_nan_infinity_and_failed_scores_are_not_sent_but_reported(tmp_path: Path) -> None:
    """NaN, infinities, None, error objects, unscored samples and unparsed judge ratings are counted, not sent."""
    launcher = write_jsonl(tmp_path / "launcher" / "results.jsonl", [
        launcher_row("q-1", 0, reward=math.nan, exact=math.inf, judge=-math.inf, ok=True),
        launcher_row("q-2", 1, reward=None, exact={"error": "scorer crashed"}, judge=[1, 2], ok=False),
        launcher_row("q-3", 2, reward=math.nan),
    ])
    result = map_files(read_path(launcher, "launcher"), ctx())
    assert evaluations(result) == {("q-1", "ok"): ("boolean", True), ("q-2", "ok"): ("boolean", False)}
    report = result.report.as_dict()
    assert report["dropped_by_reason"] == {"error": 1, "infinite": 2, "missing": 1, "nan": 2, "unsupported_type": 1}
    assert report["dropped_by_label"]["reward:nan"] == 2 and report["items_without_evaluations"] == 1
    assert "not sent: reward (nan) x2" in result.report.summary()

    byob = write_jsonl(tmp_path / "byob" / "byob_predictions.jsonl", [
        byob_row("q-1", 0, {"correct": True}), byob_row("q-2", 1, None, status="skipped_model_error")])
    result = map_files(read_path(byob, "byob"), ctx())
    assert [e.join_key for e in result.events] == ["q-1"]
    assert result.report.failed_items == {"skipped_model_error": 1}

    judge_line = json.loads((SEED / "scores.jsonl").read_text())
    judge = write_jsonl(tmp_path / "judge" / "scores.jsonl", [
        {**judge_line, "score": -1}, {**judge_line, "turn": 2, "score": None},
        {**judge_line, "turn": 3, "score": math.nan}])
    result = map_files(read_path(judge, "judge"), ctx())
    assert not result.events
    assert result.report.as_dict()["dropped_by_label"] == {
        "quality_assessment:unrated": 1, "quality_assessment_turn2:unrated": 1, "quality_assessment_turn3:unrated": 1}


def test_duplicate_ids_in_a_run_are_an_error(tmp_path: Path) -> None:
    """Two records with one id (same repeat) fail the run, naming both lines; repeats get their own labels."""
    path = write_jsonl(tmp_path / "results.jsonl", [launcher_row("q-1", 0), launcher_row("q-1", 1)])
    with pytest.raises(MappingError,
                       match=r"results.jsonl:2: id 'q-1' of task 'qa' already appeared at results.jsonl:1"):
        map_files(read_path(path, "launcher"), ctx())
    path = write_jsonl(tmp_path / "repeats.jsonl", [launcher_row("q-1", 0), launcher_row("q-1", 0, repeat=1)])
    result = map_files(read_path(path, "launcher"), ctx())
    assert sorted(evaluations(result)) == [("q-1", "reward"), ("q-1", "reward_repeat1")]


def test_missing_id_column_is_an_error_and_positions_are_not_ids(tmp_path: Path) -> None:
    """A record without the id column fails the run; row positions are refused as id columns."""
    path = write_jsonl(tmp_path / "results.jsonl", [launcher_row("q-1", 0), launcher_row(None, 1)])
    with pytest.raises(MappingError, match=r"results.jsonl:2: no value for the id column 'metadata.question_id'"):
        map_files(read_path(path, "launcher"), ctx())
    with pytest.raises(MappingError, match="row position"):
        map_files(read_path(path, "launcher"), ctx(id_column="problem_idx"))
    with pytest.raises(MappingError, match=r"no value for the id column 'metadata\.dd_trace_id'"):
        map_files(read_path(path, "launcher"), ctx(id_column="metadata.dd_trace_id"))


@given(st.text(max_size=400))
def test_labels_are_always_valid_and_stable(name: str) -> None:
    """Any metric name gives a label under the intake's rule, the same one every time."""
    label = label_for(name)
    assert LABEL_RULE.match(label) and label_for(name) == label


def test_labels_are_readable_names_of_the_metric() -> None:
    """Labels keep the metric's own name, sanitised; long names stay apart; no job id is in them."""
    assert [label_for(n) for n in ("ndcg_cut_10", "pass@1", "system/retriever-recall-5", "1st", "", "f1 score")] == [
        "ndcg_cut_10", "pass_1", "system_retriever_recall_5", "m_1st", "metric", "f1_score"]
    first, second = label_for("x" * 300 + "a"), label_for("x" * 300 + "b")
    assert first != second and len(first) == len(second) == 200


def test_event_ids_are_deterministic_and_follow_the_content(tmp_path: Path) -> None:
    """Mapping the same run twice gives the same event ids; another score or another job gives new ones."""
    rows = [launcher_row("q-1", 0, exact=True), launcher_row("q-2", 1, exact=False)]
    path = write_jsonl(tmp_path / "results.jsonl", rows)
    first = map_files(read_path(path, "launcher"), ctx())
    again = map_files(read_path(path, "launcher"), ctx(evaluated_at_ms=1_763_632_800_000))
    assert [e.event_id for e in first.events] == [e.event_id for e in again.events]
    other_job = map_files(read_path(path, "launcher"), ctx(source_id="eval-job-2", job_id="eval-job-2"))
    assert not {e.event_id for e in first.events} & {e.event_id for e in other_job.events}
    write_jsonl(path, [launcher_row("q-1", 0, exact=True), launcher_row("q-2", 1, exact=True)])
    changed = map_files(read_path(path, "launcher"), ctx())
    assert changed.events[0].event_id == first.events[0].event_id
    assert changed.events[1].event_id != first.events[1].event_id
    assert all("eval-job" not in e.label for event in first.events for e in event.evaluations)


def test_judge_lines_map_with_provenance_and_turns(tmp_path: Path) -> None:
    """The seed's judge line gives quality_assessment=8 as the service maps it (judgement, judge, model, time) plus
    the run's task and provenance; turn 2 its own label."""
    line = json.loads((SEED / "scores.jsonl").read_text())
    path = write_jsonl(tmp_path / "scores.jsonl", [line, {**line, "turn": 2, "score": 6.5}])
    result = map_files(read_path(path, "judge"), ctx(ml_app="nemos-demo"))
    assert evaluations(result) == {("1", "quality_assessment"): ("score", 8),
                                   ("1", "quality_assessment_turn2"): ("score", 6.5)}
    first = result.events[0]
    (evaluation,) = first.evaluations
    assert evaluation.metadata == {"model": line["model"], "judgement": line["judgment"]}
    assert evaluation.reasoning == "The answer clearly denotes the ingredients needed to make a cake"
    assert evaluation.timestamp_ms == 1740429821107
    assert evaluation.tags == {"judge": "meta/llama-3.1-8b-instruct", "judge_prompt": "single-v1",
                               "model": "meta/llama-3.1-8b-instruct", "task": "qa"}
    assert first.provenance is not None and first.provenance.job_id == "eval-job-1"
    assert first.provenance.target_name == "my-org/bot" and first.run_id is None


def test_several_judges_and_models_of_one_question_and_the_judged_model(tmp_path: Path) -> None:
    """Lines of several judges and judged models for one question map apart (tags); a judged model keeps its own."""
    line = json.loads((SEED / "scores.jsonl").read_text())
    rows = [line, {**line, "judge": ["gpt-4", "single-v1"]}, {**line, "model": "vicuna-13b"},
            {**line, "model": "vicuna-13b", "turn": 2, "score": -1}]
    path = write_jsonl(tmp_path / "scores.jsonl", rows)
    every = map_files(read_path(path, "judge"), ctx())
    assert sorted((e.tags["judge"], e.tags["model"]) for event in every.events for e in event.evaluations) == [
        ("gpt-4", "meta/llama-3.1-8b-instruct"), ("meta/llama-3.1-8b-instruct", "meta/llama-3.1-8b-instruct"),
        ("meta/llama-3.1-8b-instruct", "vicuna-13b")]
    mine = map_files(read_path(path, "judge"), ctx(judged_model="meta/llama-3.1-8b-instruct"))
    assert {e.tags["model"] for event in mine.events for e in event.evaluations} == {"meta/llama-3.1-8b-instruct"}
    assert mine.report.as_dict()["dropped_by_reason"] == {"other_model": 2}
    with pytest.raises(MappingError, match="already appeared"):  # the same judge and model twice
        map_files(read_path(write_jsonl(tmp_path / "twice.jsonl", [line, line]), "judge"), ctx())


def test_the_run_is_the_one_given_else_the_judge_lines_own(tmp_path: Path) -> None:
    """--run-id gives every event its run; without it a judge line's run_id field does; runs keep ids apart."""
    line = json.loads((SEED / "scores.jsonl").read_text())
    path = write_jsonl(tmp_path / "scores.jsonl", [{**line, "run_id": "night-1"}, {**line, "run_id": "night-2"}])
    own = map_files(read_path(path, "judge"), ctx())
    assert [event.run_id for event in own.events] == ["night-1", "night-2"]
    assert own.events[0].event_id != own.events[1].event_id
    with pytest.raises(MappingError, match="in run 'nightly'"):  # one run given: the same question twice
        map_files(read_path(path, "judge"), ctx(run_id="nightly"))


def test_beir_per_query_scores_in_both_shapes(tmp_path: Path) -> None:
    """Per-query scores keyed by the query's _id map to one event per query, from JSON lines or a pytrec_eval file."""
    lines = write_jsonl(tmp_path / "lines" / "per_query.jsonl", [
        {"_id": "q1", "text": "what is a cake", "ndcg_cut_10": 0.8, "recall_5": 1.0},
        {"_id": "q2", "text": "what is bread", "scores": {"ndcg_cut_10": 0.4, "recall_5": math.nan}},
    ])
    obj = tmp_path / "object" / "per_query.json"
    obj.parent.mkdir()
    obj.write_text(json.dumps({"q1": {"ndcg_cut_10": 0.8, "recall_5": 1.0}, "q2": {"ndcg_cut_10": 0.4}}))
    for path in (lines.parent, obj):
        result = map_files(read_path(path, "beir"), ctx(target_type="retriever"))
        assert evaluations(result) == {("q1", "ndcg_cut_10"): ("score", 0.8), ("q1", "recall_5"): ("score", 1.0),
                                       ("q2", "ndcg_cut_10"): ("score", 0.4)}


async def test_from_files_command_maps_a_local_run(tmp_path: Path) -> None:
    """``from-files DIR --format byob --dry-run`` reads the run's predictions and prints the summary."""
    write_jsonl(tmp_path / "run-7" / "qa" / "byob_predictions.jsonl",
                [byob_row("q-1", 0, {"correct": True}), byob_row("q-2", 1, {"correct": math.nan})])
    out = io.StringIO()
    args = build_parser().parse_args(["from-files", str(tmp_path / "run-7"), "--format", "byob", "--ml-app", "bot",
                                      "--dry-run"])
    assert await execute(args, out=out) == 0
    assert "items: 2, events: 1, evaluations: 1" in out.getvalue() and "correct (nan) x1" in out.getvalue()


# --- the v1 API, through the real client --------------------------------------------------------

JOB_ROWS = [launcher_row(f"q-{i}", i, reward=float(i % 2), exact=bool(i % 2), verdict="ok" if i % 2 else "wrong")
            for i in range(3)]
AGGREGATES = {"tasks": {"qa": {"metrics": {"accuracy": {"scores": {"exact_match": {"value": 0.33}}}}}},
              "groups": {"all": {"metrics": {"accuracy": {"scores": {"mean": {"value": 0.5}}}}}}}
JOB_TARGET = VALID_TARGETS["model_openai_with_key"]
JOB_CONFIG = {"type": "custom", "name": "qa-cfg", "namespace": "my-organization",
              "tasks": {"qa": {"type": "chat-completion", "metrics": {"accuracy": {"type": "string-check"}}}}}


@pytest.fixture
def stand_in() -> Iterator[NemoEvaluatorStandIn]:
    with NemoEvaluatorStandIn() as server:
        server.results = AGGREGATES
        server.files = {"qa/results.jsonl": "".join(json.dumps(r) + "\n" for r in JOB_ROWS).encode(),
                        "qa/results.json": json.dumps(AGGREGATES).encode(), "logs/eval.log": b"done\n"}
        yield server


@pytest.fixture
async def evaluator(stand_in: NemoEvaluatorStandIn) -> AsyncIterator[Evaluator]:
    async with AsyncNeMoMicroservices(base_url=stand_in.url, max_retries=2, timeout=10) as client:
        yield Evaluator(client, poll_initial_seconds=0.01, poll_max_seconds=0.05, timeout_seconds=10,
                        retry_initial_seconds=0.01)  # learns the keys from the targets it sends


async def run(evaluator: Evaluator, **kwargs: Any) -> Any:
    return await run_job(evaluator, RunContext(ml_app="support-bot", source_id=""), target=parse_target(JOB_TARGET),
                         config=parse_config(JOB_CONFIG), **kwargs)


async def test_run_creates_target_config_and_job_and_maps_the_results(stand_in: NemoEvaluatorStandIn,
                                                                     evaluator: Evaluator) -> None:
    """A run creates the target and config, polls the job to completion, reads aggregates and per-item files."""
    outcome = await run(evaluator)
    job_id = outcome.job.id
    assert [p for p in stand_in.paths("POST")] == ["/v1/evaluation/targets", "/v1/evaluation/configs",
                                                   "/v1/evaluation/jobs"]
    gets = stand_in.paths("GET")
    assert gets.count(f"/v1/evaluation/jobs/{job_id}") == 4  # pending, running, running, completed
    assert f"/v1/evaluation/jobs/{job_id}/status" in gets
    assert gets[-2:] == [f"/v1/evaluation/jobs/{job_id}/results", f"/v1/evaluation/jobs/{job_id}/download-results"]
    sent = next(body for method, path, body in stand_in.requests if path == "/v1/evaluation/targets")
    assert sent["model"]["api_endpoint"]["api_key"] == API_KEY  # the key reaches the API ...
    assert stand_in.targets[("my-organization", "t1")]["model"]["api_endpoint"]["api_key"] == MASK  # ... stored masked
    job_post = next(body for method, path, body in stand_in.requests if path == "/v1/evaluation/jobs")
    assert job_post == {"config": "my-organization/qa-cfg", "target": "my-organization/t1",
                        "namespace": "my-organization"}
    assert [str(a) for a in outcome.aggregates] == ["tasks.qa.accuracy.exact_match = 0.33",
                                                    "groups.all.accuracy.mean = 0.5"]
    assert evaluations(outcome.mapping) == {
        (f"q-{i}", label): value for i in range(3) for label, value in (
            ("reward", ("score", float(i % 2))), ("exact", ("boolean", bool(i % 2))),
            ("verdict", ("categorical", "ok" if i % 2 else "wrong")))
    }
    provenance = outcome.mapping.events[0].provenance
    assert provenance is not None and provenance.model_dump(exclude_none=True) == {
        "job_id": job_id, "config": "my-organization/qa-cfg", "target_type": "model",
        "target_name": "my-organization/t1", "model": "gpt-4o-mini", "evaluated_at_ms": 1763632800000}
    assert outcome.mapping.events[0].evaluations[0].tags == {"evaluator": "nemo", "task": "qa"}


async def test_existing_target_and_config_are_reused_on_409(stand_in: NemoEvaluatorStandIn,
                                                            evaluator: Evaluator) -> None:
    """409 on create reuses the stored target by namespace/name (a drifted one with a warning) and runs the job."""
    stand_in.add_target({**VALID_TARGETS["model_chat"], "name": "t1"})  # same name, another endpoint
    await run(evaluator)
    with capture_logs() as logs:
        outcome = await run(evaluator)
    targets = [(m, p) for m, p, _ in stand_in.requests if "/evaluation/targets" in p]
    assert targets == [("POST", "/v1/evaluation/targets"), ("GET", "/v1/evaluation/targets/my-organization/t1")] * 2
    assert len(stand_in.targets) == 1 and len(stand_in.configs) == 1 and len(stand_in.jobs) == 2
    assert {"nemo_target_reused", "nemo_config_reused", "nemo_target_differs"} <= {e["event"] for e in logs}
    provenance = outcome.mapping.events[0].provenance
    assert provenance is not None and provenance.model == "meta/llama-3.1-8b-instruct"  # the stored target's


@pytest.mark.parametrize("end", ["failed", "cancelled"])
async def test_a_failed_or_cancelled_job_raises_with_the_api_message(stand_in: NemoEvaluatorStandIn,
                                                                      evaluator: Evaluator, end: str) -> None:
    """A job ending failed or cancelled raises JobFailed with its id, status and the API's message; nothing maps."""
    stand_in.job_script = ["pending", "running", end]
    stand_in.failure_message = "judge endpoint returned 401"
    with pytest.raises(JobFailed) as caught:
        await run(evaluator)
    assert caught.value.job_status == end and caught.value.job_id in str(caught.value)
    assert end in str(caught.value) and "download-results" not in " ".join(stand_in.paths())
    if end == "failed":
        assert "judge endpoint returned 401" in str(caught.value)


async def test_a_job_that_never_finishes_times_out(stand_in: NemoEvaluatorStandIn, stand_in_client: Any) -> None:
    """A job still running after the timeout raises JobTimeout telling how to resume it."""
    stand_in.job_script = ["pending", "running"]
    evaluator = Evaluator(stand_in_client, poll_initial_seconds=0.01, poll_max_seconds=0.05, timeout_seconds=0.3)
    with pytest.raises(JobTimeout, match=r"still running after 0.3 s.*--job-id eval-"):
        await run(evaluator)


@pytest.fixture
async def stand_in_client(stand_in: NemoEvaluatorStandIn) -> AsyncIterator[AsyncNeMoMicroservices]:
    async with AsyncNeMoMicroservices(base_url=stand_in.url, max_retries=2, timeout=10) as client:
        yield client


async def test_not_found_answers_are_clear_errors(stand_in: NemoEvaluatorStandIn, evaluator: Evaluator) -> None:
    """A 404 for the job's target, for a job to resume, and a 409 whose entity cannot be read are clear errors."""
    stand_in.fail_next("POST", "/v1/evaluation/jobs", 404, body={"detail": "target my-organization/t1 not found"})
    with pytest.raises(EvaluatorError, match="answered 404: target my-organization/t1 not found") as caught:
        await run(evaluator)
    assert caught.value.status == 404
    with pytest.raises(EvaluatorError, match="reading job eval-gone: the evaluator answered 404"):
        await run(evaluator, job_id="eval-gone")
    stand_in.fail_next("POST", "/v1/evaluation/targets", 409)
    with pytest.raises(EvaluatorError, match=r"target my-organization/t2: creating it answered 409 \(exists\), but "
                                             r"reading it answered 404"):
        await evaluator.ensure_target(parse_target({**JOB_TARGET, "name": "t2"}))


async def test_server_errors_are_retried_until_success(stand_in: NemoEvaluatorStandIn, evaluator: Evaluator) -> None:
    """5xx on create (retried here), on polling and on download (retried by the client) end in a normal run."""
    stand_in.fail_next("POST", "/v1/evaluation/targets", 500, count=2)
    stand_in.fail_next("POST", "/v1/evaluation/configs", 503)
    stand_in.fail_next("GET", r"/jobs/[^/]+$", 503, count=2)
    stand_in.fail_next("GET", r"/download-results$", 502)
    outcome = await run(evaluator)
    assert stand_in.paths("POST").count("/v1/evaluation/targets") == 3
    assert stand_in.paths("POST").count("/v1/evaluation/configs") == 2
    assert sum(p.endswith("/download-results") for p in stand_in.paths("GET")) == 2
    assert len(stand_in.targets) == 1 and outcome.job.status == "completed" and len(outcome.mapping.events) == 3


async def test_a_failure_that_outlasts_the_retries_is_an_error(stand_in: NemoEvaluatorStandIn,
                                                               evaluator: Evaluator) -> None:
    """A create that keeps failing with 500 gives up after the attempts allowed, with the answer in the error."""
    stand_in.fail_next("POST", "/v1/evaluation/targets", 500, count=10, body={"detail": "database is down"})
    with pytest.raises(EvaluatorError, match="creating target my-organization/t1: the evaluator answered 500: "
                                             "database is down"):
        await run(evaluator)
    assert stand_in.paths("POST").count("/v1/evaluation/targets") == 5


async def test_api_keys_are_redacted_from_logs_and_api_errors(stand_in: NemoEvaluatorStandIn, evaluator: Evaluator,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """With debug logs on, the client's request logs and an API error echoing the body never show the key."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging(level="DEBUG", fmt="json", secrets=collect_secrets(parse_target(JOB_TARGET)))
        logging.getLogger("nemo_microservices").setLevel(logging.DEBUG)
        await run(evaluator)
        stand_in.fail_next("POST", "/v1/evaluation/targets", 422,
                           body={"detail": [{"loc": ["body", "model"], "msg": "bad", "input": request_body(
                               parse_target(JOB_TARGET))}]})
        with pytest.raises(EvaluatorError) as caught:
            await evaluator.ensure_target(parse_target(JOB_TARGET))
    finally:
        root.handlers[:], root.level = saved
        structlog.reset_defaults()
    output = capsys.readouterr().err
    assert "Request options" in output and "[redacted]" in output and API_KEY not in output
    assert "422" in str(caught.value) and "[redacted]" in str(caught.value) and API_KEY not in str(caught.value)


async def test_run_command_prints_aggregates_and_summary(stand_in: NemoEvaluatorStandIn, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``run --dry-run`` prints the job's aggregates and the mapping summary; a bad target file exits 2 with the fix."""
    (tmp_path / "target.json").write_text(json.dumps(JOB_TARGET))
    (tmp_path / "config.json").write_text(json.dumps(JOB_CONFIG))
    common = ["run", "--evaluator-url", stand_in.url, "--config-file", str(tmp_path / "config.json"),
              "--ml-app", "support-bot", "--poll-initial", "0.01", "--poll-max", "0.05", "--dry-run"]
    out = io.StringIO()
    args = build_parser().parse_args([*common, "--target-file", str(tmp_path / "target.json")])
    assert await execute(args, out=out) == 0
    text = out.getvalue()
    assert "aggregate scores (not attached to spans)" in text and "tasks.qa.accuracy.exact_match = 0.33" in text
    assert "items: 3, events: 3, evaluations: 9" in text and "dry run: 3 events not published" in text
    (tmp_path / "nested.json").write_text(json.dumps(nested_rag(reranker=True)))
    args = build_parser().parse_args([*common, "--target-file", str(tmp_path / "nested.json")])
    assert await execute(args, out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert NESTED_ENDPOINT_FIX in err and API_KEY not in err
    assert stand_in.paths("POST").count("/v1/evaluation/targets") == 1  # the bad target was never sent


def test_download_zip_holds_only_per_item_files_that_are_read() -> None:
    """Per-item files of a downloaded zip are found by their records; aggregates, configs and queries are skipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("qa/results.jsonl", "".join(json.dumps(r) + "\n" for r in JOB_ROWS))
        archive.writestr("qa/results.json", json.dumps(AGGREGATES))
        archive.writestr("judge/scores.jsonl", (SEED / "scores.jsonl").read_text())
        archive.writestr("config.jsonl", json.dumps({"params": {"temperature": 0.1}}) + "\n")
        archive.writestr("beir/queries.jsonl", json.dumps({"_id": "q1", "text": "what is a cake"}) + "\n")
        archive.writestr("beir/per_query.jsonl", json.dumps({"_id": "q1", "ndcg_cut_10": 0.5}) + "\n")
    found = read_zip(buffer.getvalue(), None)
    assert [(f.path, f.format, len(f.records)) for f in found] == [
        ("beir/per_query.jsonl", "beir", 1), ("judge/scores.jsonl", "judge", 1), ("qa/results.jsonl", "launcher", 3)]
    assert [f.path for f in read_zip(buffer.getvalue(), "judge")] == ["judge/scores.jsonl"]


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_results_reach_the_intake_joined_to_their_spans(
        stand_in: NemoEvaluatorStandIn, evaluator: Evaluator, make_settings: Callable[..., Settings], topics: Topics,
        producer: AIOKafkaProducer, intake: FakeIntake, kafka: KafkaBroker) -> None:
    """Published results join their spans in the service: the intake gets labels, types, values and provenance,
    and publishing the same job again (``run --job-id``) delivers nothing twice."""
    settings = make_settings(default_ml_app=None)
    async with running_service(settings):
        for i in range(3):
            await send_json(producer, topics.span, {"schema_version": 1, "ml_app": "support-bot", "join_key": f"q-{i}",
                                                    "trace_id": f"{i + 1:032x}", "span_id": str(1000 + i)})
        outcome = await run(evaluator)
        async with EventPublisher(bootstrap_servers=kafka.bootstrap_servers, result_topic=topics.result) as sink:
            assert await publish(outcome.mapping.events, sink) == 3
        await eventually(lambda: len(intake.accepted_metrics()) >= 9, what="nine evaluations")
        # The same job again, resumed by id through the command line: same event ids, nothing new sent.
        args = build_parser().parse_args([
            "run", "--evaluator-url", stand_in.url, "--job-id", str(outcome.job.id), "--ml-app", "support-bot",
            "--bootstrap-servers", kafka.bootstrap_servers, "--result-topic", topics.result, "--poll-initial", "0.01"])
        out = io.StringIO()
        assert await execute(args, out=out) == 0
        assert f"published 3 events to {topics.result}" in out.getvalue()
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="the re-published events")
    metrics = intake.accepted_metrics()
    assert len(metrics) == 9
    got = {(m["join_on"]["span"]["span_id"], m["label"]): (m["metric_type"], m[f"{m['metric_type']}_value"])
           for m in metrics}
    assert got == {
        ("1000", "reward"): ("score", 0.0), ("1000", "exact"): ("boolean", False),
        ("1000", "verdict"): ("categorical", "wrong"),
        ("1001", "reward"): ("score", 1.0), ("1001", "exact"): ("boolean", True),
        ("1001", "verdict"): ("categorical", "ok"),
        ("1002", "reward"): ("score", 0.0), ("1002", "exact"): ("boolean", False),
        ("1002", "verdict"): ("categorical", "wrong"),
    }
    metric = next(m for m in metrics if m["label"] == "reward" and m["join_on"]["span"]["span_id"] == "1001")
    assert metric["join_on"]["span"]["trace_id"] == f"{2:032x}" and metric["ml_app"] == "support-bot"
    # The job finished on 2025-11-20, older than Datadog's window: sent with its record's time, its own kept.
    assert metric["metadata"] == {"problem_idx": 1, "repeat": 0, "evaljoin_original_timestamp_ms": 1763632800000,
                                  "nemo": {"job_id": outcome.job.id, "config": "my-organization/qa-cfg",
                                           "target_type": "model", "target_name": "my-organization/t1",
                                           "model": "gpt-4o-mini", "evaluated_at_ms": 1763632800000}}
    assert {"evaluator:nemo", "task:qa", "ml_app:support-bot"} <= set(metric["tags"])
    assert metric["timestamp_ms"] > 1763632800000 + 23 * 3_600_000
    assert all(outcome.job.id not in m["label"] and API_KEY not in json.dumps(m) for m in metrics)


async def test_an_unreachable_broker_is_a_publish_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """When Kafka cannot be reached the command exits 1 with a publishing error instead of a traceback."""
    write_jsonl(tmp_path / "run" / "byob_predictions.jsonl", [byob_row("q-1", 0, {"correct": True})])
    args = build_parser().parse_args(["from-files", str(tmp_path / "run"), "--format", "byob", "--ml-app", "bot",
                                      "--bootstrap-servers", f"127.0.0.1:{free_port()}"])
    assert await execute(args, out=io.StringIO()) == 1
    assert "error: publishing failed" in capsys.readouterr().err


# --- one judge line, two paths ------------------------------------------------------------------

def metric_bytes(intake: FakeIntake) -> list[bytes]:
    """Each eval-metric object the intake accepted, as the bytes of the request body it came in."""
    out = []
    decoder = json.JSONDecoder()
    for request in intake.requests:
        if not 200 <= request.status < 300:
            continue
        body = gzip.decompress(request.body) if request.headers.get("Content-Encoding") == "gzip" else request.body
        text = body.decode()
        at = text.index("[", text.index('"metrics"')) + 1
        while text[at] != "]":
            _, end = decoder.raw_decode(text, at)
            out.append(text[at:end].encode())
            at = end + (text[end] == ",")
    return out


@pytest.mark.timeout(120)
async def test_a_judge_line_gives_the_same_datadog_data_on_both_paths(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker, tmp_path: Path) -> None:
    """The same judge lines (turns, judges, judged models, unrated ones) published as they are to the result topic,
    and mapped by the NeMo publisher, reach the intake as byte-identical eval-metric objects; the unrated lines
    reach it on neither: the service reports them on the DLQ as unrated and counts them, the publisher counts them.
    (Judged a minute ago: a time older than Datadog's window would be sent as each record's own time.)"""
    seed = {**json.loads((SEED / "scores.jsonl").read_text()), "tstamp": round(time.time() - 60, 3)}
    lines = [seed, {**seed, "turn": 2, "score": 6.5}, {**seed, "judge": ["gpt-4", "single-v1"], "score": 7},
             {**seed, "model": "vicuna-13b", "score": 5},
             {**seed, "question_id": 2, "score": -1}, {**seed, "question_id": 2, "turn": 2, "score": None},
             {**seed, "question_id": 2, "judge": ["gpt-4", "single-v1"], "score": math.nan},
             {**seed, "question_id": 2, "model": "vicuna-13b", "score": 2}]
    scores = write_jsonl(tmp_path / "judge" / "scores.jsonl", lines)
    settings = make_settings(default_ml_app=None)

    async def spans(run: str) -> None:  # the app's answers to questions 1 and 2, in the run of one path
        for question in ("1", "2"):
            await send_json(producer, topics.span, {"schema_version": 1, "ml_app": "support-bot", "run_id": run,
                                                    "join_key": question, "trace_id": f"{int(question):032x}",
                                                    "span_id": str(7000 + int(question))})

    async with running_service(settings) as service:
        # The guide's path: each line published as it is.
        await spans("guide")
        for raw in scores.read_bytes().splitlines():
            await producer.send_and_wait(topics.result, raw, headers=[("ml_app", b"support-bot"), ("run_id", b"guide")])
        await eventually(lambda: len(intake.accepted_metrics()), expect=5, what="the guide path's evaluations")
        dead = await read_topic(kafka.bootstrap_servers, topics.dlq, 3)
        guide = metric_bytes(intake)
        intake.clear()
        # The NeMo publisher's path: the same file, mapped and published as NeMo result events.
        await spans("nemo")
        out = io.StringIO()
        args = build_parser().parse_args([
            "from-files", str(scores), "--format", "judge", "--ml-app", "support-bot", "--run-id", "nemo",
            "--bootstrap-servers", kafka.bootstrap_servers, "--result-topic", topics.result])
        assert await execute(args, out=out) == 0
        await eventually(lambda: len(intake.accepted_metrics()), expect=5, what="the NeMo path's evaluations")
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="everything consumed")
        nemo = metric_bytes(intake)
        unrated = {cause: service.metrics.unrated.labels(cause=cause)._value.get()
                   for cause in ("unparsed_rating", "missing", "nan")}
    assert sorted(guide) == sorted(nemo) and len(set(guide)) == 5
    got = {(m["label"], m["score_value"], tuple(t for t in m["tags"] if t.split(":")[0] in ("judge", "model")))
           for m in map(json.loads, guide)}
    llama, gpt4, vicuna = "meta/llama-3.1-8b-instruct", "gpt-4", "vicuna-13b"
    assert got == {("quality_assessment", 8, (f"judge:{llama}", f"model:{llama}")),
                   ("quality_assessment_turn2", 6.5, (f"judge:{llama}", f"model:{llama}")),
                   ("quality_assessment", 7, (f"judge:{gpt4}", f"model:{llama}")),
                   ("quality_assessment", 5, (f"judge:{llama}", f"model:{vicuna}")),
                   ("quality_assessment", 2, (f"judge:{llama}", f"model:{vicuna}"))}
    assert [dict(record.headers)["evaljoin.error"] for record in dead] == [b"unrated"] * 3
    assert await topic_size(kafka.bootstrap_servers, topics.dlq) == 3
    assert unrated == {"unparsed_rating": 1, "missing": 1, "nan": 1}
    assert "not sent: quality_assessment (unrated) x2\n  not sent: quality_assessment_turn2 (unrated) x1" in (
        out.getvalue())


async def test_only_the_judged_model_reaches_the_intake(make_settings: Callable[..., Settings], topics: Topics,
                                                       producer: AIOKafkaProducer, intake: FakeIntake,
                                                       kafka: KafkaBroker) -> None:
    """With JUDGED_MODEL (or a record's judged_model header, which wins) other models' lines are counted, not sent
    and not dead-lettered."""
    seed = json.loads((SEED / "scores.jsonl").read_text())
    settings = make_settings(judged_model="meta/llama-3.1-8b-instruct")
    async with running_service(settings) as service:
        await send_json(producer, topics.span, OUTPUT_RECORD)
        await send_json(producer, topics.result, {**seed, "model": "vicuna-13b", "score": 3})
        await send_json(producer, topics.result, {**seed, "judge": "gpt-4", "model": "vicuna-13b", "score": 4},
                        headers=[("judged_model", b"vicuna-13b")])
        await send_json(producer, topics.result, seed)
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="everything consumed")
        other = service.metrics.events.labels(kind="result", outcome="other_model")._value.get()
    assert sorted((m["score_value"], m["tags"][-1]) for m in intake.accepted_metrics()) == [
        (4, "model:vicuna-13b"), (8, "model:meta/llama-3.1-8b-instruct")]
    assert other == 1 and await topic_size(kafka.bootstrap_servers, topics.dlq) == 0


# --- every per-item format, and a multi-task job, through Kafka and the service -----------------

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
MULTITASK_CONFIG = {"type": "custom", "name": "qa-multi", "namespace": "my-organization",
                    "tasks": {name: {"type": "chat-completion", "metrics": {"accuracy": {"type": "string-check"}}}
                              for name in ("qa-exact", "qa-judge", "humaneval")},
                    "groups": {"qa": {"tasks": ["qa-judge"], "groups": {"exact": {"tasks": ["qa-exact"]}}}}}
MULTITASK_AGGREGATES = {"tasks": {name: {"metrics": {"accuracy": {"scores": {"mean": {"value": 0.5}}}}}
                                  for name in ("qa-exact", "qa-judge", "humaneval")}}
# fixture directory -> its join keys (the spans the app would have answered them on)
FORMAT_RUNS = {"judge": ["q-1", "q-2", "q-3"], "rows": ["q-1", "q-2", "q-3"], "launcher": ["q-1", "q-2", "q-3"],
               "agentic": ["q-1", "q-2", "q-3"], "byob": ["q-1", "q-2", "q-3"], "lm_eval": ["q-1", "q-2", "q-3"],
               "bfcl": ["simple_0", "simple_1", "simple_2"], "beir": ["q-1", "q-2", "q-3"],
               "ragas": ["q-1", "q-2", "q-3"]}


@pytest.mark.timeout(120)
async def test_every_format_and_a_multi_task_job_reach_the_intake(
        stand_in: NemoEvaluatorStandIn, evaluator: Evaluator, make_settings: Callable[..., Settings], topics: Topics,
        producer: AIOKafkaProducer, intake: FakeIntake, kafka: KafkaBroker) -> None:
    """A job with two tasks over the same questions (nested groups, a third task with aggregates only) and every
    documented per-item format, published through the real broker, join their spans in one running service: the
    intake gets every evaluation the mapping made, on the span of its own run, with its task and group tags."""
    stand_in.results = MULTITASK_AGGREGATES
    stand_in.files = {f"{task}/results.jsonl": (FIXTURES / "multitask" / task / "results.jsonl").read_bytes()
                      for task in ("qa-exact", "qa-judge")}
    runs = {**FORMAT_RUNS, "job": ["q-1", "q-2", "q-3"]}
    span_of = {(run, key): str(10_000 + 100 * n + i) for n, run in enumerate(runs) for i, key in enumerate(runs[run])}
    outcome = await run_job(evaluator, RunContext(ml_app="support-bot", source_id="", run_id="job"),
                            target=parse_target(JOB_TARGET), config=parse_config(MULTITASK_CONFIG))
    mappings = {"job": outcome.mapping}
    for name in FORMAT_RUNS:
        mappings[name] = map_local_run(FIXTURES / name, None, RunContext(ml_app="support-bot", source_id=name,
                                                                         run_id=name))
    expected = {(span_of[(run, event.join_key)], e.label, e.metric_type, json.dumps(e.value), e.tags.get("task"),
                 e.tags.get("group")) for run, mapping in mappings.items() for event in mapping.events
                for e in event.evaluations}
    assert {run for (span, *_rest) in expected for run, key in span_of if span_of[(run, key)] == span} == set(runs)
    assert "task humaneval: aggregate scores only" in outcome.mapping.report.summary()
    settings = make_settings(default_ml_app=None)
    async with running_service(settings):
        for (run, key), span in span_of.items():
            await send_json(producer, topics.span, {"schema_version": 1, "ml_app": "support-bot", "run_id": run,
                                                    "join_key": key, "trace_id": f"{int(span):032x}",
                                                    "span_id": span})
        async with EventPublisher(bootstrap_servers=kafka.bootstrap_servers, result_topic=topics.result) as sink:
            for mapping in mappings.values():
                await publish(mapping.events, sink)
        await eventually(lambda: len(intake.accepted_metrics()), expect=len(expected), within=60,
                         what="every format's evaluations")
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="everything consumed")
    got = set()
    for m in intake.accepted_metrics():
        tags = dict(tag.split(":", 1) for tag in m["tags"])
        got.add((m["join_on"]["span"]["span_id"], m["label"], m["metric_type"],
                 json.dumps(m[f"{m['metric_type']}_value"]), tags.get("task"), tags.get("group")))
    assert got == expected and len(intake.accepted_metrics()) == len(expected)
    job = {(label, task, group) for span, label, _, _, task, group in got if span in
           {span_of[("job", key)] for key in runs["job"]}}
    assert job == {("qa_exact_reward", "qa-exact", "qa/exact"), ("qa_judge_reward", "qa-judge", "qa"),
                   ("scorer_judge", "qa-judge", "qa")}
    assert await topic_size(kafka.bootstrap_servers, topics.dlq) == 0
