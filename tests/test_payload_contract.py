"""Our eval-metric object against ddtrace's own: the same call gives the same object on the wire.

ddtrace runs in a child process (so LLMObs' global state stays out of this one) and sends its
evaluations to a FakeIntake through ``DD_LLMOBS_OVERRIDE_ORIGIN``; the bodies it posted are the
reference. Each case is one ``LLMObs.submit_evaluation(span={...}, ...)`` call and the equivalent
joined span and result record, shaped as ``consumer.join`` stores them.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from consumer.config import Settings
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.intake_route import IntakeRoute, RouteSettings, agent_url, decide
from consumer.payload import build_metric, encode_metric
from consumer.sink import encode_batch
from localenv.intake import FakeIntake, IntakeRequest

pytestmark = pytest.mark.timeout(120)

API_KEY = "x" * 32
DEFAULT_ML_APP = "nemos-contract"
BASE_TIMESTAMP_MS = 1_700_000_000_000

# What ddtrace is asked to do in the child: enable agentless LLMObs, submit each call, flush, stop.
DDTRACE_SCRIPT = """
import json
import sys

from ddtrace.llmobs import LLMObs

calls = json.load(sys.stdin)
LLMObs.enable(ml_app="ddtrace-default-app", agentless_enabled=True, api_key=sys.argv[1], site="datadoghq.com")
try:
    for call in calls:
        LLMObs.submit_evaluation(**call)
    LLMObs.flush()
finally:
    LLMObs.disable()
"""

VALUES: dict[str, tuple[str, Any]] = {
    "score_int": ("score", 8),
    "score_float": ("score", 0.875),
    "categorical": ("categorical", "relevant"),
    "boolean": ("boolean", True),
    "json": ("json", {"verdict": "grounded", "scores": [1, 2.5, -3], "detail": {"näive": None, "ok": False}}),
}
OPTIONAL_FIELDS = ("assessment", "reasoning", "metadata", "tags")
FULL_OPTIONALS: dict[str, Any] = {
    "assessment": "pass",
    "reasoning": "The answer cites the retrieved passage.",
    "metadata": {"judge": "meta/llama-3.1-70b-instruct", "rubric": {"scale": [1, 10], "weight": 0.5}},
    "tags": {"env": "staging", "team": "nemo-evals"},
}


@dataclass(frozen=True)
class Case:
    """One evaluation: ``evaluation`` as a result event carries it, ``ml_app`` of its span."""

    name: str
    evaluation: dict[str, Any]
    ml_app: str = DEFAULT_ML_APP


def _matrix() -> list[Case]:
    cases = []
    for kind, (metric_type, value) in VALUES.items():
        for size in range(len(OPTIONAL_FIELDS) + 1):
            for present in itertools.combinations(OPTIONAL_FIELDS, size):
                suffix = "_".join(present) if present else "bare"
                evaluation = {"label": f"{kind}_{suffix}", "metric_type": metric_type, "value": value,
                              **{name: FULL_OPTIONALS[name] for name in present}}
                cases.append(Case(f"{kind}-{suffix}", evaluation))
    return cases


EDGE_CASES = [
    Case("score-zero", {"label": "score_zero", "metric_type": "score", "value": 0}),
    Case("score-integral-float", {"label": "score_integral_float", "metric_type": "score", "value": 8.0}),
    Case("score-negative-float", {"label": "score_negative", "metric_type": "score", "value": -1.25e-7}),
    Case("score-2-pow-53", {"label": "score_big", "metric_type": "score", "value": 2**53}),
    Case("boolean-false", {"label": "boolean_false", "metric_type": "boolean", "value": False,
                           "assessment": "fail"}),
    Case("json-empty-object", {"label": "json_empty", "metric_type": "json", "value": {}}),
    Case("categorical-unicode", {"label": "categorical_unicode", "metric_type": "categorical",
                                 "value": "très pertinent ✓", "reasoning": "naïve \"quoted\"\nsecond line 😀",
                                 "metadata": {"clé": ["ü", 1.5, True, None]}, "tags": {"région": "eu-ouest"}}),
    Case("empty-optionals", {"label": "empty_optionals", "metric_type": "score", "value": 3,
                             "reasoning": "", "metadata": {}, "tags": {}}),
    Case("tags-shadow-ddtrace-tags", {"label": "tags_shadow", "metric_type": "score", "value": 1,
                                      "tags": {"zeta": "z", "ml_app": "other-app", "ddtrace.version": "0.0.0",
                                               "alpha": ""}}),
    Case("ml-app-with-spaces-and-colons", {"label": "odd_ml_app", "metric_type": "categorical", "value": "a:b"},
         ml_app="demo app: ünïcode"),
]

CASES = _matrix() + EDGE_CASES


def _ids(index: int) -> tuple[str, str]:
    """(span_id, trace_id) of case ``index``: distinct per case, shaped as LLMObs.export_span() gives them."""
    return str(7_000_000_000_000_000_000 + index), f"{0x6a1f00000000000000000000000000 + index:032x}"


def _timestamp(index: int) -> int:
    return BASE_TIMESTAMP_MS + index * 1_000


def ddtrace_call(index: int, case: Case) -> dict[str, Any]:
    """The keyword arguments of the ``LLMObs.submit_evaluation`` call equivalent to ``case``."""
    span_id, trace_id = _ids(index)
    evaluation = case.evaluation
    return {
        "span": {"span_id": span_id, "trace_id": trace_id},
        "label": evaluation["label"],
        "metric_type": evaluation["metric_type"],
        "value": evaluation["value"],
        "tags": evaluation.get("tags"),
        "ml_app": case.ml_app,
        "timestamp_ms": _timestamp(index),
        "metadata": evaluation.get("metadata"),
        "assessment": evaluation.get("assessment"),
        "reasoning": evaluation.get("reasoning"),
    }


def stored_records(index: int, case: Case) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(span, result, evaluation index) as consumer.join builds and stores them for ``case``.

    The case's evaluation sits after ``index % 3`` other evaluations of the same result, so that
    ``build_metric`` is also exercised at indexes other than 0.
    """
    span_id, trace_id = _ids(index)
    source = {"topic": "contract", "partition": 0, "offset": index, "timestamp_ms": 1_600_000_000_000}
    span_event = SpanContextEvent.model_validate(
        {"schema_version": 1, "ml_app": case.ml_app, "join_key": f"q-{index}", "trace_id": trace_id,
         "span_id": span_id})
    position = index % 3
    others = [{"label": f"other_{n}", "metric_type": "score", "value": 0.1} for n in range(position)]
    result_event = NemoResultEvent.model_validate(
        {"schema_version": 1, "event_id": f"evt-contract-{index:04d}", "ml_app": case.ml_app,
         "join_key": f"q-{index}",
         "evaluations": [*others, {**case.evaluation, "timestamp_ms": _timestamp(index)}]})
    span = {**span_event.model_dump(mode="json", exclude={"schema_version", "kind"}), "source": source}
    result = {**result_event.model_dump(mode="json", exclude={"schema_version", "kind"}),
              "received_ts_ms": 1_600_000_000_000, "source": source}
    assert result["provenance"] is None
    # Both records go through Redis as JSON before they are joined.
    return orjson.loads(orjson.dumps(span)), orjson.loads(orjson.dumps(result)), position


def ours(index: int, case: Case) -> dict[str, Any]:
    """Our eval-metric object for ``case``, parsed back from the bytes we send."""
    span, result, position = stored_records(index, case)
    metric: dict[str, Any] = orjson.loads(encode_metric(build_metric(span, result, position)))
    return metric


@dataclass(frozen=True)
class DdtraceCapture:
    """What ddtrace's agentless writer posted: the requests, and each metric by span id."""

    requests: list[IntakeRequest]
    by_span_id: dict[str, dict[str, Any]]


def _child_env(origin: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.upper().startswith(("DD_", "_DD_", "OTEL_"))}
    env.update({
        "DD_LLMOBS_OVERRIDE_ORIGIN": origin,
        "DD_TRACE_ENABLED": "false",
        "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
        "DD_REMOTE_CONFIGURATION_ENABLED": "false",
    })
    return env


@pytest.fixture(scope="module")
def ddtrace_capture() -> Iterator[DdtraceCapture]:
    """Every case submitted through ddtrace in one child process, as the FakeIntake received it."""
    calls = [ddtrace_call(index, case) for index, case in enumerate(CASES)]
    with FakeIntake() as intake:
        child = subprocess.run(
            [sys.executable, "-c", DDTRACE_SCRIPT, API_KEY], input=json.dumps(calls), env=_child_env(intake.origin),
            capture_output=True, text=True, timeout=60, check=False)
        assert child.returncode == 0, f"ddtrace child failed:\n{child.stderr[-4000:]}"
        metrics = intake.accepted_metrics()
        requests = intake.requests
    assert all(request.status == 202 for request in requests), [request.status for request in requests]
    by_span_id = {metric["join_on"]["span"]["span_id"]: metric for metric in metrics}
    assert len(metrics) == len(by_span_id) == len(CASES), f"ddtrace sent {len(metrics)} of {len(CASES)} metrics"
    yield DdtraceCapture(requests, by_span_id)


def _typed(value: Any) -> str:
    """JSON text of a parsed value that tells 1 from 1.0 and from true, independent of key order."""
    return json.dumps(value, sort_keys=True)


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)), ids=[case.name for case in CASES])
def test_metric_equals_ddtrace_submit_evaluation(index: int, case: Case, ddtrace_capture: DdtraceCapture) -> None:
    """build_metric gives exactly the object ddtrace's submit_evaluation sends for the same arguments."""
    theirs = ddtrace_capture.by_span_id[_ids(index)[0]]
    mine = ours(index, case)
    assert mine == theirs
    assert _typed(mine) == _typed(theirs)


def test_batch_envelope_path_and_auth_match_ddtrace(ddtrace_capture: DdtraceCapture) -> None:
    """Our batch body wraps metrics as ddtrace's does and goes to the same agentless path with the same key."""
    (request, *_) = ddtrace_capture.requests
    theirs = json.loads(request.body)
    mine = json.loads(encode_batch([encode_metric(ours(0, CASES[0]))]))
    for body in (theirs, mine):
        body["data"]["attributes"]["metrics"] = []
    assert mine == theirs
    settings = RouteSettings.from_settings(Settings(dd_llmobs_agentless_enabled=True, dd_api_key=API_KEY,
                                                    dd_llmobs_override_origin="http://127.0.0.1:1"))
    route = decide(settings, agent_url(settings), None)
    assert isinstance(route, IntakeRoute) and urlsplit(route.url).path == request.path
    sent = {name.lower(): value for name, value in request.headers.items()}
    expected = {name.lower(): value for name, value in route.headers.items()}
    assert expected == {"content-type": sent["content-type"], "dd-api-key": sent["dd-api-key"]}


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)), ids=[case.name for case in CASES])
def test_encoding_is_deterministic(index: int, case: Case) -> None:
    """The same joined records, given twice or re-read from their stored JSON, encode to identical bytes."""
    span, result, position = stored_records(index, case)
    first = encode_metric(build_metric(span, result, position))
    again = encode_metric(build_metric(copy.deepcopy(span), copy.deepcopy(result), position))
    reread = encode_metric(build_metric(orjson.loads(orjson.dumps(span)), orjson.loads(orjson.dumps(result)),
                                        position))
    assert first == again == reread


def test_tag_join_equals_ddtrace_span_with_tag_value() -> None:
    """A result joined by span tag gives exactly the object ``submit_evaluation(span_with_tag_value=...)`` sends:
    ``join_on.tag`` with the key and value, every metric type and optional field as with span ids."""
    from consumer.join import tagged_span
    from consumer.store import Namespace

    cases = [(index, case) for index, case in enumerate(CASES) if case.name.endswith(("-bare", "_tags"))
             or case.name.startswith(("categorical-unicode", "ml-app-with"))]
    tag_key = "question_id"
    calls = []
    for index, case in cases:
        call = ddtrace_call(index, case)
        del call["span"]
        calls.append({**call, "span_with_tag_value": {"tag_key": tag_key, "tag_value": f"run-7:q-{index}"}})
    with FakeIntake() as intake:
        child = subprocess.run(
            [sys.executable, "-c", DDTRACE_SCRIPT, API_KEY], input=json.dumps(calls), env=_child_env(intake.origin),
            capture_output=True, text=True, timeout=60, check=False)
        assert child.returncode == 0, f"ddtrace child failed:\n{child.stderr[-4000:]}"
        theirs = {metric["join_on"]["tag"]["value"]: metric for metric in intake.accepted_metrics()}
    assert len(theirs) == len(cases) >= 5
    for index, case in cases:
        _, result, position = stored_records(index, case)
        span = tagged_span(Namespace(case.ml_app, f"q-{index}", "run-7"), tag_key, f"run-7:q-{index}")
        mine = orjson.loads(encode_metric(build_metric(span, result, position)))
        assert mine == theirs[f"run-7:q-{index}"], case.name
        assert _typed(mine) == _typed(theirs[f"run-7:q-{index}"]), case.name
