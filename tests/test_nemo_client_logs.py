"""No API key in any log line of the NeMo publisher's client path, at any level, whoever handles the logs.

At DEBUG the ``nemo-microservices`` client logs each request's options, JSON body included, so a
target's ``api_endpoint.api_key`` and a judge's key in a config were in the log record itself: the
publisher's own formatter redacted them, but any other handler (an application's, a test's, the
client's own ``NEMO_MICROSERVICES_LOG`` setup) printed them. These tests drive the real client
against the stand-in of the v1 API (``tests/nemo_standin.py``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from nemo_microservices import AsyncNeMoMicroservices

from producer_examples.nemo.cli import main
from producer_examples.nemo.evaluator import Evaluator
from producer_examples.nemo.targets import parse_config, parse_target
from tests.nemo_standin import NemoEvaluatorStandIn

pytestmark = pytest.mark.timeout(60)

SEED_JUDGE_LINES = (Path(__file__).parent.parent / "producer_examples" / "seed" / "scores.jsonl").read_bytes()
KEY = "nvapi-logs-0123456789abcdef"
JUDGE_KEY = "sk-judge-0123456789abcdef"
TARGET = {"type": "model", "name": "t1", "namespace": "my-org", "model": {"api_endpoint": {
    "url": "https://api.example.com/v1/chat/completions", "model_id": "gpt-4o-mini", "api_key": KEY,
    "format": "openai"}}}
CONFIG = {"type": "custom", "name": "qa-cfg", "namespace": "my-org", "tasks": {"qa": {
    "type": "chat-completion", "metrics": {"judge": {"type": "llm-judge", "params": {"model": {"api_endpoint": {
        "url": "https://judge.example.com/v1/chat/completions", "model_id": "judge", "api_key": JUDGE_KEY}}}}}}}}


@pytest.fixture
def stand_in() -> Iterator[NemoEvaluatorStandIn]:
    with NemoEvaluatorStandIn() as server:
        server.job_script = ["running", "completed"]
        server.files = {"qa/scores.jsonl": SEED_JUDGE_LINES}  # the judge lines of Datadog's guide
        yield server


@pytest.fixture
def plain_debug_handler() -> Iterator[io.StringIO]:
    """A handler of the standard library on the root logger at DEBUG, as an application would add one."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


async def test_the_clients_debug_request_logs_carry_no_key(stand_in: NemoEvaluatorStandIn,
                                                           plain_debug_handler: io.StringIO) -> None:
    """Creating a target and a config with keys logs their requests at DEBUG, with every key replaced."""
    async with AsyncNeMoMicroservices(base_url=stand_in.url, max_retries=0, timeout=10) as client:
        evaluator = Evaluator(client)  # told no secret: the keys are found in the records themselves
        await evaluator.ensure_target(parse_target(TARGET))
        await evaluator.ensure_config(parse_config(CONFIG))
    sent = {path: body for method, path, body in stand_in.requests if method == "POST"}
    assert sent["/v1/evaluation/targets"]["model"]["api_endpoint"]["api_key"] == KEY  # the key reaches the API
    output = plain_debug_handler.getvalue()
    requests = [line for line in output.splitlines() if "Request options" in line and "json_data" in line]
    assert len(requests) == 2 and all("'api_key': '[redacted]'" in line for line in requests)
    assert KEY not in output and JUDGE_KEY not in output


def test_the_run_command_at_debug_logs_no_key(stand_in: NemoEvaluatorStandIn, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``run --log-level debug`` through a whole job: the client's debug lines are there, the keys are not."""
    (tmp_path / "target.json").write_text(json.dumps(TARGET))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    root = logging.getLogger()
    saved: tuple[list[logging.Handler], int] = (root.handlers[:], root.level)
    try:
        code = main(["run", "--evaluator-url", stand_in.url, "--target-file", str(tmp_path / "target.json"),
                     "--config-file", str(tmp_path / "config.json"), "--ml-app", "app", "--poll-initial", "0.01",
                     "--poll-max", "0.02", "--dry-run", "--log-level", "debug", "--log-format", "json"])
    finally:
        root.handlers[:], root.level = saved
        structlog.reset_defaults()
    captured = capsys.readouterr()
    events: list[dict[str, Any]] = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]
    assert code == 0, captured.err
    assert any(e["event"].startswith("Request options") and "json_data" in e["event"] for e in events)
    assert KEY not in captured.err + captured.out and JUDGE_KEY not in captured.err + captured.out
