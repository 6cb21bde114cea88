"""Shapes of NeMo Evaluator's per-item formats that their upstream sources write and the first fixtures left out.

Each fixture README under tests/fixtures/nemo/ says whether its shape was checked against the code that writes it,
and where (repository, path, commit). These tests pin what that check found beyond the fixtures of
test_nemo_formats.py: BFCL v4's layout (a group directory per category) and its multi-turn entries, whose error
is an object, and RAGAS result rows whose optional sample fields are null.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer_examples.nemo.mapping import MappingResult, RunContext
from producer_examples.nemo.publish import map_local_run
from producer_examples.nemo.readers import Format

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "nemo"


def mapped(path: Path, fmt: Format | None = None) -> MappingResult:
    return map_local_run(path, fmt, RunContext(ml_app="support-bot", source_id=path.name))


def test_every_fixture_readme_says_what_was_checked() -> None:
    """Each fixture's README states whether its shape was checked against the source that writes it."""
    readmes = sorted(FIXTURES.glob("*/README.md"))
    assert len(readmes) >= 12
    for readme in readmes:
        text = " ".join(readme.read_text().split())
        assert "Shape check:" in text, readme.parent.name


@pytest.mark.parametrize("fmt", [None, "bfcl"])
def test_bfcl_v4_group_directories_pair_score_and_result_files(fmt: Format | None) -> None:
    """BFCL v4 writes score/<model>/<group>/BFCL_v4_<category>_score.json: each pairs with the result file of the
    same group, so an entry absent from the score file is a pass and a listed one a failure."""
    result = mapped(FIXTURES / "bfcl_v4", fmt)
    assert {(e.join_key, v.label, v.metric_type, v.value) for e in result.events for v in e.evaluations} == {
        ("simple_python_0", "valid", "boolean", True),
        ("simple_python_1", "valid", "boolean", False),
        ("multi_turn_base_0", "valid", "boolean", False),
    }
    assert result.report.notes == []


def test_bfcl_multi_turn_failure_keeps_its_nested_error() -> None:
    """A failed multi-turn entry nests its error ({error_message, error_type, details}): the message is the
    reasoning and the type the error_type metadata, as for an AST entry's list and top-level type."""
    events = mapped(FIXTURES / "bfcl_v4", "bfcl").events
    failed = next(v for e in events if e.join_key == "multi_turn_base_0" for v in e.evaluations)
    assert failed.reasoning == "Model response list is empty for turn 1"
    assert failed.metadata == {"test_category": "multi_turn_base", "error_type": "multi_turn:empty_turn_model_response"}
    ast = next(v for e in events if e.join_key == "simple_python_1" for v in e.evaluations)
    assert ast.reasoning is not None and "Expected one of [6]" in ast.reasoning
    assert ast.metadata == {"test_category": "simple_python", "error_type": "value_error:others"}


def test_ragas_optional_sample_fields_are_not_metrics(tmp_path: Path) -> None:
    """A RAGAS table of mixed rows has null in the sample fields a row lacks (context ids, persona, query style):
    they are the sample, not metrics, so nothing is reported missing."""
    rows = [
        {"question_id": "q-1", "user_input": "What is in cake?", "retrieved_contexts": ["Eggs and flour."],
         "retrieved_context_ids": ["doc-1"], "response": "Eggs.", "persona_name": "baker", "query_style": "casual",
         "query_length": "short", "faithfulness": 1.0},
        {"question_id": "q-2", "user_input": "Can I freeze it?", "retrieved_contexts": ["Cakes freeze well."],
         "retrieved_context_ids": None, "reference_context_ids": None, "response": "Yes.", "persona_name": None,
         "query_style": None, "query_length": None, "faithfulness": 0.5},
    ]
    (tmp_path / "ragas_results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = mapped(tmp_path, "ragas")
    assert {(e.join_key, v.label, v.value) for e in result.events for v in e.evaluations} == {
        ("q-1", "faithfulness", 1.0), ("q-2", "faithfulness", 0.5)}
    assert dict(result.report.dropped) == {}
