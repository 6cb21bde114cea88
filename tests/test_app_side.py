"""The app side: a real ddtrace-instrumented app answers questions and publishes its span context.

The app runs as ``python -m producer_examples.app_side`` in a child process (ddtrace keeps global
state) against a local OpenAI-compatible stand-in, with LLM Observability in agentless mode
pointed by ``DD_LLMOBS_OVERRIDE_ORIGIN`` at a local recorder, so the spans ddtrace sends can be
compared with the span-context events the app published to Kafka.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from producer_examples.publisher import EventPublisher
from tests.standins import FIXED_COMPLETION, FakeOpenAI, LLMObsRecorder
from tests.support import Topics, eventually, read_topic, running_service

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parent.parent
ML_APP = "cooking-bot"
QUESTIONS = {"q-1": "What are the ingredients in cake?", "q-2": "How long do I bake bread?",
             "q-3": "What is a roux?"}


@pytest.fixture
def llm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def recorder() -> Iterator[LLMObsRecorder]:
    with LLMObsRecorder() as server:
        yield server


def app_env(recorder: LLMObsRecorder) -> dict[str, str]:
    """The child's environment: agentless LLM Observability to the recorder, nothing else leaves the machine."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("DD_", "_DD_", "OPENAI_"))}
    env.update({
        "DD_API_KEY": "test-api-key-0123456789",
        "DD_LLMOBS_AGENTLESS_ENABLED": "true",
        "DD_LLMOBS_OVERRIDE_ORIGIN": recorder.origin,
        "DD_TRACE_AGENT_URL": recorder.origin,  # the tracer's Agent checks land here too, not on a real port
        "DD_APM_TRACING_ENABLED": "false",
        "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
        "DD_REMOTE_CONFIGURATION_ENABLED": "false",
        "DD_CRASHTRACKING_ENABLED": "false",
    })
    return env


async def run_app(*args: str, recorder: LLMObsRecorder) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "producer_examples.app_side", *args, cwd=REPO_ROOT, env=app_env(recorder),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def write_questions(path: Path) -> Path:
    path.write_text("".join(orjson.dumps({"question_id": qid, "question": text}).decode() + "\n"
                            for qid, text in QUESTIONS.items() if qid != "q-3"))
    return path


def app_args(llm: FakeOpenAI, kafka: KafkaBroker, topics: Topics, questions: Path) -> list[str]:
    return ["--ml-app", ML_APP, "--base-url", llm.base_url, "--model", "meta/llama-3.1-8b-instruct",
            "--questions", str(questions), "--question", "q-3", QUESTIONS["q-3"], "--tag", "env:test",
            "--concurrency", "2", "--bootstrap", kafka.bootstrap_servers, "--span-topic", topics.span]


def workflow_spans(recorder: LLMObsRecorder) -> dict[tuple[str, str], dict[str, Any]]:
    return {(span["trace_id"], span["span_id"]): span for span in recorder.spans()
            if span["meta"]["span"]["kind"] == "workflow"}


async def test_published_span_context_is_the_recorded_workflow_span(llm: FakeOpenAI, recorder: LLMObsRecorder,
                                                                    kafka: KafkaBroker, topics: Topics,
                                                                    tmp_path: Path) -> None:
    """Each question's span-context event names the LLM Observability workflow span that answered it."""
    code, stdout, stderr = await run_app(*app_args(llm, kafka, topics, write_questions(tmp_path / "q.jsonl")),
                                         recorder=recorder)
    assert code == 0, stderr
    records = await read_topic(kafka.bootstrap_servers, topics.span, len(QUESTIONS))
    events = {orjson.loads(r.value)["join_key"]: (r, orjson.loads(r.value)) for r in records}
    assert set(events) == set(QUESTIONS)

    workflows = workflow_spans(recorder)
    assert len(workflows) == len(QUESTIONS)
    printed = {line["question_id"]: line for line in map(orjson.loads, stdout.splitlines())}
    for question_id, (record, event) in events.items():
        span = workflows[(event["trace_id"], event["span_id"])]
        assert f"question_id:{question_id}" in span["tags"] and f"ml_app:{ML_APP}" in span["tags"]
        assert span["meta"]["input"]["value"] == QUESTIONS[question_id]
        assert span["meta"]["output"]["value"] == FIXED_COMPLETION
        assert (event["ml_app"], event["tags"], event["schema_version"]) == (ML_APP, {"env": "test"}, 1)
        assert record.key == f"{ML_APP}:{question_id}".encode()
        assert printed[question_id] == {"question_id": question_id, "trace_id": event["trace_id"],
                                        "span_id": event["span_id"], "answer": FIXED_COMPLETION}
    # The OpenAI call ran inside each workflow: ddtrace's LLM span is its child.
    llm_parents = {(s["trace_id"], s["parent_id"]) for s in recorder.spans() if s["meta"]["span"]["kind"] == "llm"}
    assert llm_parents == set(workflows)
    sent = sorted(request.json["messages"][-1]["content"] for request in llm.requests)
    assert sent == sorted(QUESTIONS.values())
    assert "span contexts published 3" in stderr


async def test_app_span_context_joins_a_result_at_the_intake(llm: FakeOpenAI, recorder: LLMObsRecorder,
                                                            kafka: KafkaBroker, topics: Topics, tmp_path: Path,
                                                            make_settings: Callable[..., Settings],
                                                            intake: FakeIntake) -> None:
    """The app's span contexts and NeMo results for the same questions reach the intake joined on the app's spans."""
    # The app runs first so that a failure of it is reported as such, not as a slow service shutdown.
    code, _, stderr = await run_app(*app_args(llm, kafka, topics, write_questions(tmp_path / "q.jsonl")),
                                    recorder=recorder)
    assert code == 0, stderr
    async with running_service(make_settings()):
        async with EventPublisher(bootstrap_servers=kafka.bootstrap_servers, result_topic=topics.result) as results:
            for question_id in QUESTIONS:
                await results.publish_result({
                    "schema_version": 1, "event_id": f"eval-job-7:{question_id}", "ml_app": ML_APP,
                    "join_key": question_id,
                    "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 0.75}]})
        await eventually(lambda: len(intake.accepted_metrics()) >= len(QUESTIONS), what="the joined evaluations")
    metrics = intake.accepted_metrics()
    joined = {(m["join_on"]["span"]["trace_id"], m["join_on"]["span"]["span_id"]) for m in metrics}
    assert joined == set(workflow_spans(recorder))
    assert {(m["ml_app"], m["label"], m["score_value"]) for m in metrics} == {(ML_APP, "faithfulness", 0.75)}
    assert len(metrics) == len(QUESTIONS)
