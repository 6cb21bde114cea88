"""NeMo Evaluator's per-item formats -> NeMo result events, one fixture per format (tests/fixtures/nemo/).

Each fixture's README names the public source its shape was taken from. These tests pin what the
publisher makes of each: labels, metric types (bool before int), values, tags, what is not sent and
why, and that inputs (a BEIR corpus, queries, a dataset) and aggregate-only output are never taken
for per-item results.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from consumer.events import NemoResultEvent
from producer_examples.nemo.cli import build_parser, execute
from producer_examples.nemo.errors import MappingError
from producer_examples.nemo.evaluator import Aggregate
from producer_examples.nemo.mapping import MappingResult, RunContext, config_groups, map_files
from producer_examples.nemo.publish import aggregate_only_tasks, map_local_run
from producer_examples.nemo.readers import FORMATS, Format, read_path, scan_path

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "nemo"
JUDGE = "meta/llama-3.1-8b-instruct"


def mapped(path: Path, fmt: Format | None = None, **context: Any) -> MappingResult:
    return map_local_run(path, fmt, RunContext(ml_app="support-bot", source_id=path.name, **context))


def values(events: list[NemoResultEvent]) -> set[tuple[str, str, str, Any]]:
    """(join key, label, metric type, value) of every evaluation."""
    return {(e.join_key, v.label, v.metric_type, v.value) for e in events for v in e.evaluations}


# (fixture directory, format it is read as, evaluations expected, not sent (label, reason) -> count)
EXPECTED: dict[str, tuple[Format, set[tuple[str, str, str, Any]], dict[tuple[str, str], int]]] = {
    "judge": ("judge", {
        ("q-1", "quality_assessment", "score", 8), ("q-1", "quality_assessment", "score", 7),
        ("q-1", "quality_assessment_turn2", "score", 9), ("q-3", "quality_assessment", "score", 6),
    }, {("quality_assessment", "unrated"): 1}),
    "rows": ("rows", {
        ("q-1", "helpfulness_judge_helpfulness", "score", 4.0), ("q-1", "string_check", "score", 1.0),
        ("q-2", "string_check", "score", 0.0),
        ("q-3", "helpfulness_judge_helpfulness", "score", 5.0), ("q-3", "string_check", "score", 1.0),
    }, {("helpfulness_judge_helpfulness", "error"): 1}),
    "launcher": ("launcher", {
        ("q-1", "reward", "score", 1.0), ("q-1", "scorer_exact_match", "score", 1.0),
        ("q-2", "reward", "score", 0.0), ("q-2", "scorer_exact_match", "score", 0.0),
        ("q-3", "scorer_exact_match", "score", 1.0),
    }, {("reward", "nan"): 1}),
    "byob": ("byob", {
        ("q-1", "correct", "boolean", True), ("q-1", "f1", "score", 1.0), ("q-1", "verdict", "categorical", "ok"),
        ("q-3", "correct", "boolean", False), ("q-3", "f1", "score", 0.0), ("q-3", "verdict", "categorical", "wrong"),
    }, {}),
    "lm_eval": ("lm_eval", {
        ("q-1", "exact_match_strict_match", "score", 1.0), ("q-2", "exact_match_strict_match", "score", 0.0),
        ("q-3", "exact_match_strict_match", "score", 1.0), ("q-1", "exact_match_flexible_extract", "score", 1.0),
        ("q-2", "exact_match_flexible_extract", "score", 1.0), ("q-3", "exact_match_flexible_extract", "score", 1.0),
    }, {}),
    "bfcl": ("bfcl", {
        ("simple_0", "valid", "boolean", True), ("simple_1", "valid", "boolean", False),
        ("simple_2", "valid", "boolean", True),
    }, {}),
    "beir": ("beir", {
        ("q-1", "ndcg_cut_10", "score", 0.8), ("q-1", "recall_5", "score", 1.0),
        ("q-2", "ndcg_cut_10", "score", 0.25), ("q-2", "recall_5", "score", 0.5),
        ("q-3", "ndcg_cut_10", "score", 1.0), ("q-3", "recall_5", "score", 1.0),
    }, {}),
    "ragas": ("ragas", {
        ("q-1", "faithfulness", "score", 1.0), ("q-1", "answer_relevancy", "score", 0.93),
        ("q-1", "context_precision", "score", 1.0), ("q-1", "context_recall", "score", 0.75),
        ("q-2", "faithfulness", "score", 0.0), ("q-2", "context_precision", "score", 1.0),
        ("q-2", "context_recall", "score", 1.0),
        ("q-3", "faithfulness", "score", 1.0), ("q-3", "answer_relevancy", "score", 0.88),
        ("q-3", "context_precision", "score", 1.0), ("q-3", "context_recall", "score", 1.0),
    }, {("answer_relevancy", "nan"): 1}),
}


def test_every_format_has_a_fixture_with_its_source() -> None:
    """Each per-item format has a fixture directory whose README names where its shape comes from."""
    assert set(EXPECTED) == set(FORMATS)
    for name in [*EXPECTED, "agentic", "bigcode", "multitask"]:
        readme = " ".join((FIXTURES / name / "README.md").read_text().split())
        assert "public repository" in readme or "launcher/README.md" in readme, name
        assert "no file is copied" in readme, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_fixture_maps_to_its_evaluations(name: str) -> None:
    """A fixture read with its format named, and found among every format, gives the same evaluations."""
    fmt, expected, dropped = EXPECTED[name]
    named = mapped(FIXTURES / name, fmt)
    found = mapped(FIXTURES / name)
    assert values(named.events) == expected
    assert values(found.events) == expected
    assert dict(named.report.dropped) == dropped
    assert all(v.tags.get("evaluator") == "nemo" or "judge" in v.tags for e in named.events for v in e.evaluations)


def test_bool_is_a_boolean_before_it_is_an_int() -> None:
    """``true`` is a boolean evaluation, never the score 1 (bool is checked before int)."""
    byob = mapped(FIXTURES / "byob", "byob")
    correct = [v for e in byob.events for v in e.evaluations if v.label == "correct"]
    assert {(v.metric_type, type(v.value)) for v in correct} == {("boolean", bool)}


def test_byob_sample_that_was_not_scored_is_a_failed_item() -> None:
    """A BYOB sample skipped on a model error is counted as a failed item with its status, not sent."""
    assert dict(mapped(FIXTURES / "byob", "byob").report.failed_items) == {"skipped_model_error": 1}


def test_bfcl_failure_carries_its_error() -> None:
    """A failed BFCL entry gives valid=false with its error text as reasoning and its error type as metadata."""
    events = mapped(FIXTURES / "bfcl", "bfcl").events
    failed = next(v for e in events if e.join_key == "simple_1" for v in e.evaluations)
    assert failed.reasoning is not None and "Expected one of [6]" in failed.reasoning
    assert failed.metadata == {"test_category": "simple", "error_type": "value_error:others"}


def test_bfcl_without_its_result_file_publishes_failures_and_says_so(tmp_path: Path) -> None:
    """A BFCL score file without its result file publishes its failed entries, and the summary says the
    passed ones are missing."""
    shutil.copytree(FIXTURES / "bfcl" / "score", tmp_path / "score")
    result = mapped(tmp_path, "bfcl")
    assert values(result.events) == {("simple_1", "valid", "boolean", False)}
    assert "BFCL result file result/llama-3.1-8b/BFCL_v3_simple_result.json not found" in result.report.summary()


def test_lm_eval_task_comes_from_the_samples_file_and_positions_are_not_ids() -> None:
    """An lm-evaluation-harness samples file names its task (the task: tag); doc_id is a position, refused."""
    events = mapped(FIXTURES / "lm_eval", "lm_eval").events
    assert {v.tags["task"] for e in events for v in e.evaluations} == {"gsm8k"}
    with pytest.raises(MappingError, match="row position"):
        mapped(FIXTURES / "lm_eval", "lm_eval", id_column="doc_id")


def test_agentic_output_maps_in_both_of_its_shapes() -> None:
    """An agentic benchmark's launcher results (with trajectories) and RAGAS agent metrics both map."""
    result = mapped(FIXTURES / "agentic")
    assert values(result.events) == {
        ("q-1", "reward", "score", 1.0), ("q-1", "scorer_tests_passed", "score", 1.0),
        ("q-2", "reward", "score", 0.0), ("q-2", "scorer_tests_passed", "score", 0.0),
        ("q-3", "tool_call_accuracy", "score", 1.0), ("q-3", "topic_adherence", "score", 0.5),
        ("q-3", "agent_goal_accuracy", "score", 1.0),
    }


def test_inputs_are_never_taken_for_results(tmp_path: Path) -> None:
    """A BEIR corpus and queries, and a dataset with numeric columns, are not results: in a run directory they
    are skipped, and named explicitly they are refused."""
    beir = scan_path(FIXTURES / "beir", None)
    assert [f.path for f in beir.files] == ["per_query.jsonl"]
    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in [
        {"_id": "q-1", "text": "What is a cake?", "year": 2020, "rank": 3},
        {"question_id": "q-2", "question": "How long?", "answer": "30 min", "difficulty": 2}]))
    (tmp_path / "other.jsonl").write_text(json.dumps({"question": "How long?", "answer": "30", "difficulty": 2}) + "\n")
    with pytest.raises(MappingError, match="no per-item result files found"):
        scan_path(tmp_path, None)
    with pytest.raises(MappingError, match="a corpus file is an evaluation's input"):
        scan_path(FIXTURES / "beir" / "corpus.jsonl", "beir")


def test_aggregate_only_output_is_said_in_the_summary(tmp_path: Path) -> None:
    """bigcode-evaluation-harness output and lm-evaluation-harness results without samples publish nothing and
    the summary says why."""
    bigcode = mapped(FIXTURES / "bigcode")
    assert bigcode.events == [] and "bigcode-evaluation-harness aggregate scores" in bigcode.report.summary()
    shutil.copy(FIXTURES / "lm_eval" / "results_2025-11-20T10-00-00.123456.json", tmp_path)
    lm_eval = mapped(tmp_path)
    assert lm_eval.events == [] and "run it with --log_samples" in lm_eval.report.summary()
    with_samples = mapped(FIXTURES / "lm_eval")
    assert with_samples.report.notes == []


# --- several tasks and groups ---------------------------------------------------------------------


def test_two_tasks_over_one_dataset_publish_every_item_apart() -> None:
    """Two tasks over the same questions: no duplicate error; a label both give to one item carries the task in
    front, a label only one gives keeps its name; the task: tag says which task every evaluation is of."""
    result = mapped(FIXTURES / "multitask")
    assert values(result.events) == {
        ("q-1", "qa_exact_reward", "score", 1.0), ("q-2", "qa_exact_reward", "score", 0.0),
        ("q-3", "qa_exact_reward", "score", 1.0),
        ("q-1", "qa_judge_reward", "score", 0.9), ("q-2", "qa_judge_reward", "score", 0.4),
        ("q-3", "qa_judge_reward", "score", 0.7),
        ("q-1", "scorer_judge", "score", 0.9), ("q-2", "scorer_judge", "score", 0.4),
        ("q-3", "scorer_judge", "score", 0.7),
    }
    assert {(v.label, v.tags["task"]) for e in result.events for v in e.evaluations} == {
        ("qa_exact_reward", "qa-exact"), ("qa_judge_reward", "qa-judge"), ("scorer_judge", "qa-judge")}
    assert result.report.qualified_labels == {"reward": ["qa_exact_reward", "qa_judge_reward"]}
    assert "label reward is given by several tasks to the same items" in result.report.summary()
    assert len({e.event_id for e in result.events}) == len(result.events)


def test_tasks_from_the_config_and_the_label_prefix() -> None:
    """The config's task names in the file paths name the tasks; a label prefix stays in front of the task."""
    result = mapped(FIXTURES / "multitask", tasks=("qa-exact", "qa-judge"), label_prefix="nemo_")
    assert {v.label for e in result.events for v in e.evaluations} == {
        "nemo_qa_exact_reward", "nemo_qa_judge_reward", "nemo_scorer_judge"}


def test_a_true_duplicate_is_still_an_error(tmp_path: Path) -> None:
    """The same item twice in one task (same run, group, id and repeat) fails the run before anything is sent."""
    shutil.copytree(FIXTURES / "multitask", tmp_path, dirs_exist_ok=True)
    rows = (tmp_path / "qa-exact" / "results.jsonl").read_text()
    (tmp_path / "qa-exact" / "results.jsonl").write_text(rows + rows.splitlines()[0] + "\n")
    with pytest.raises(MappingError, match="id 'q-1' of task 'qa-exact' already appeared"):
        mapped(tmp_path)


def test_two_judges_of_one_question_are_not_duplicates() -> None:
    """A judge file with two judges (and a second turn) for one question maps every line, told apart by tags."""
    events = mapped(FIXTURES / "judge", "judge").events
    q1 = sorted((v.label, v.tags["judge"]) for e in events if e.join_key == "q-1" for v in e.evaluations)
    assert q1 == [("quality_assessment", "gpt-4"), ("quality_assessment", "meta/llama-3.1-70b-instruct"),
                  ("quality_assessment_turn2", "gpt-4")]


def test_nested_groups_give_the_group_path() -> None:
    """A config's nested groups give each task its group path outer/inner, as the group: tag."""
    groups = {"rag": {"tasks": ["qa-judge"], "groups": {"retrieval": {"tasks": ["qa-exact"]}}}}
    assert config_groups(groups) == [("qa-judge", "rag"), ("qa-exact", "rag/retrieval")]
    result = mapped(FIXTURES / "multitask", tasks=("qa-exact", "qa-judge"), task_groups=tuple(config_groups(groups)))
    assert {(v.tags["task"], v.tags["group"]) for e in result.events for v in e.evaluations} == {
        ("qa-exact", "rag/retrieval"), ("qa-judge", "rag")}


def test_one_task_in_two_groups_of_one_job_is_not_a_duplicate(tmp_path: Path) -> None:
    """The same task's items under two groups (a group given per file set) stay apart: their labels carry the task
    or group only when needed, and the group: tag tells them apart."""
    files = read_path(FIXTURES / "multitask" / "qa-exact", "launcher")
    first = map_files(files, RunContext(ml_app="a", source_id="s", group="g1"))
    second = map_files(files, RunContext(ml_app="a", source_id="s", group="g2"))
    assert {v.tags["group"] for e in first.events for v in e.evaluations} == {"g1"}
    assert {e.event_id for e in first.events}.isdisjoint(e.event_id for e in second.events)


def test_a_job_task_without_per_item_files_is_named_aggregate_only() -> None:
    """A job's task with aggregates but no per-item file is named; a task whose directory holds a file of another
    name (lm-evaluation-harness names its own tasks) is not."""
    files = read_path(FIXTURES / "multitask", "launcher")
    lm_eval = [replace(f, path=f"gsm8k-eval/{f.path}") for f in read_path(FIXTURES / "lm_eval", "lm_eval")]
    aggregates = [Aggregate("tasks", name, "accuracy", "mean", 0.5)
                  for name in ("qa-exact", "qa-judge", "gsm8k-eval", "humaneval")]
    aggregates.append(Aggregate("groups", "all", "accuracy", "mean", 0.5))
    ctx = RunContext(ml_app="a", source_id="s", tasks=("gsm8k-eval", "humaneval", "qa-exact", "qa-judge"))
    assert aggregate_only_tasks(aggregates, ctx, files + lm_eval) == [
        "task humaneval: aggregate scores only (the job's results hold no per-item file of it)"]


async def test_from_files_finds_every_format_and_prints_what_is_aggregate_only() -> None:
    """``from-files`` without ``--format`` reads every format found; the summary says what was renamed and what has
    aggregates only, and a run with aggregates only publishes nothing and exits 0."""
    out = io.StringIO()
    args = build_parser().parse_args(["from-files", str(FIXTURES / "multitask"), "--ml-app", "bot", "--group", "qa",
                                      "--dry-run"])
    assert await execute(args, out=out) == 0
    assert "label reward is given by several tasks to the same items: sent as qa_exact_reward, qa_judge_reward" in (
        out.getvalue())
    assert "dry run: 6 events not published" in out.getvalue()
    out = io.StringIO()
    args = build_parser().parse_args(["from-files", str(FIXTURES / "bigcode"), "--ml-app", "bot", "--dry-run"])
    assert await execute(args, out=out) == 0
    assert "aggregate only, not attached to spans: evaluation_results.json" in out.getvalue()
