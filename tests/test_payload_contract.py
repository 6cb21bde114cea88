"""Our eval-metric object against ddtrace's own: the same call gives the same object on the wire.

ddtrace runs in a child process (so LLMObs' global state stays out of this one) and sends its
evaluations to a FakeIntake through ``DD_LLMOBS_OVERRIDE_ORIGIN``; the bodies it posted are the
reference. Each case is one ``LLMObs.submit_evaluation(span={...}, ...)`` call and the equivalent
joined span and result record, shaped as ``consumer.join`` stores them after the decode step's rules
(:mod:`consumer.enrich`): the span's carried tags are the call's tags (under the evaluation's own), the
evaluation's scope its ``eval_scope``, the provenance part of its ``metadata``.

Two fields have no exact counterpart in the call: ``timestamp_ms`` 0, which ddtrace makes its "now" and
we the result record's time (both are checked to be "now", not 1970), and ``ml_app_version``, a field of
Datadog's evaluation API that ddtrace 4.16's ``submit_evaluation`` has no argument for: ours is
compared without it, and it must be exactly the span's.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from consumer.config import Settings
from consumer.enrich import EvaluationRules
from consumer.events import NemoResultEvent, SpanContextEvent, normalise_label
from consumer.intake_route import IntakeRoute, RouteSettings, agent_url, decide
from consumer.payload import PROVENANCE_FALLBACK_KEY, PROVENANCE_KEY, build_metric, encode_metric
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


RECEIVED_TS_MS = 1_600_000_000_000
PROVENANCE = {"job_id": "eval-job-42", "config": "my-org/judge", "target_type": "model", "model": "m/llama",
              "judge": ["meta/llama-3.1-70b-instruct", "single-v1"], "evaluated_at_ms": 1_650_000_000_000}


@dataclass(frozen=True)
class Case:
    """One evaluation: ``evaluation`` as a result event carries it; ``span`` the span event's own fields
    (``tags``, ``ml_app_version``), ``ml_app`` its app; ``provenance`` the result's; ``timestamp`` the
    evaluation's ``timestamp_ms`` (None: a distinct time per case)."""

    name: str
    evaluation: dict[str, Any]
    ml_app: str = DEFAULT_ML_APP
    span: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    timestamp: int | None = None


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
    # The fields beyond the guide's example: each as ddtrace builds it.
    Case("eval-scope-trace", {"label": "task_completion", "metric_type": "boolean", "value": True,
                              "eval_scope": "trace"}),
    Case("eval-scope-span-given", {"label": "scope_span", "metric_type": "score", "value": 2, "eval_scope": "span"}),
    Case("assessment-and-reasoning-of-a-judge", {"label": "quality_assessment", "metric_type": "score", "value": 8,
                                                 "assessment": "pass", "reasoning": "Clear and complete."}),
    Case("span-tags-carried", {"label": "carried", "metric_type": "score", "value": 1},
         span={"tags": {"env": "prod", "service": "support-bot", "version": "1.4.2", "team": "not-carried"}}),
    Case("span-tags-under-the-evaluations", {"label": "carried_under", "metric_type": "score", "value": 1,
                                             "tags": {"env": "staging", "judge": "j"}},
         span={"tags": {"env": "prod", "service": "support-bot"}}),
    Case("ml-app-version-field", {"label": "versioned", "metric_type": "score", "value": 1},
         span={"ml_app_version": "2.0.1"}),
    Case("ml-app-version-from-version-tag", {"label": "versioned_tag", "metric_type": "categorical", "value": "ok"},
         span={"tags": {"version": "1.4.2"}}),
    Case("label-normalised", {"label": "answer-relevancy", "metric_type": "score", "value": 0.5}),
    Case("label-normalised-unicode-and-leading", {"label": "1. Fidélité du contexte", "metric_type": "score",
                                                  "value": 0.5}),
    Case("provenance-as-nemo", {"label": "with_provenance", "metric_type": "score", "value": 3},
         provenance=PROVENANCE),
    Case("provenance-beside-a-producers-nemo", {"label": "nemo_taken", "metric_type": "score", "value": 3,
                                                "metadata": {"nemo": {"task": "mt-bench"}, "judge": "x"}},
         provenance=PROVENANCE),
    Case("timestamp-zero-is-now", {"label": "timestamp_zero", "metric_type": "score", "value": 4}, timestamp=0),
]

CASES = _matrix() + EDGE_CASES


def _ids(index: int) -> tuple[str, str]:
    """(span_id, trace_id) of case ``index``: distinct per case, shaped as LLMObs.export_span() gives them."""
    return str(7_000_000_000_000_000_000 + index), f"{0x6a1f00000000000000000000000000 + index:032x}"


def _timestamp(index: int) -> int:
    return BASE_TIMESTAMP_MS + index * 1_000


def _case_timestamp(index: int, case: Case) -> int:
    return _timestamp(index) if case.timestamp is None else case.timestamp


def ddtrace_call(index: int, case: Case) -> dict[str, Any]:
    """The keyword arguments of the ``LLMObs.submit_evaluation`` call equivalent to ``case``."""
    span_id, trace_id = _ids(index)
    evaluation = case.evaluation
    carried = {name: value for name, value in ((case.span or {}).get("tags") or {}).items()
               if name in EvaluationRules().span_tags}
    metadata = dict(evaluation.get("metadata") or {})
    if case.provenance:
        key = PROVENANCE_FALLBACK_KEY if PROVENANCE_KEY in metadata else PROVENANCE_KEY
        metadata[key] = case.provenance
    label = normalise_label(evaluation["label"])
    assert label is not None
    return {
        "span": {"span_id": span_id, "trace_id": trace_id},
        "label": label,
        "metric_type": evaluation["metric_type"],
        "value": evaluation["value"],
        "tags": {**carried, **(evaluation.get("tags") or {})} or evaluation.get("tags"),
        "ml_app": case.ml_app,
        "timestamp_ms": _case_timestamp(index, case),
        "metadata": metadata or evaluation.get("metadata"),
        "assessment": evaluation.get("assessment"),
        "reasoning": evaluation.get("reasoning"),
        "eval_scope": evaluation.get("eval_scope", "span"),
    }


def stored_records(index: int, case: Case) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(span, result, evaluation index) as consumer.join builds and stores them for ``case``.

    The case's evaluation sits after ``index % 3`` other evaluations of the same result, so that
    ``build_metric`` is also exercised at indexes other than 0.
    """
    span_id, trace_id = _ids(index)
    source = {"topic": "contract", "partition": 0, "offset": index, "timestamp_ms": RECEIVED_TS_MS}
    span_event = EvaluationRules().span(SpanContextEvent.model_validate(
        {"schema_version": 1, "ml_app": case.ml_app, "join_key": f"q-{index}", "trace_id": trace_id,
         "span_id": span_id, **(case.span or {})}))
    position = index % 3
    others = [{"label": f"other_{n}", "metric_type": "score", "value": 0.1} for n in range(position)]
    result_event = NemoResultEvent.model_validate(
        {"schema_version": 1, "event_id": f"evt-contract-{index:04d}", "ml_app": case.ml_app,
         "join_key": f"q-{index}", "provenance": case.provenance,
         "evaluations": [*others, {**case.evaluation, "timestamp_ms": _case_timestamp(index, case)}]})
    span = {**span_event.model_dump(mode="json", exclude={"schema_version", "kind"}, exclude_none=True),
            "source": source}
    result = {**result_event.model_dump(mode="json", exclude={"schema_version", "kind"}, exclude_none=True),
              "received_ts_ms": RECEIVED_TS_MS, "source": source}
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
    started_ms: int
    ended_ms: int


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
    started_ms = int(time.time() * 1000)
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
    yield DdtraceCapture(requests, by_span_id, started_ms, int(time.time() * 1000))


def _typed(value: Any) -> str:
    """JSON text of a parsed value that tells 1 from 1.0 and from true, independent of key order."""
    return json.dumps(value, sort_keys=True)


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)), ids=[case.name for case in CASES])
def test_metric_equals_ddtrace_submit_evaluation(index: int, case: Case, ddtrace_capture: DdtraceCapture) -> None:
    """build_metric gives exactly the object ddtrace's submit_evaluation sends for the same arguments."""
    theirs = dict(ddtrace_capture.by_span_id[_ids(index)[0]])
    mine = ours(index, case)
    version = (case.span or {}).get("ml_app_version") or ((case.span or {}).get("tags") or {}).get("version")
    assert mine.pop("ml_app_version", None) == version
    if case.timestamp == 0:  # "now" to both: ddtrace's clock, the result record's time for us
        assert ddtrace_capture.started_ms <= theirs.pop("timestamp_ms") <= ddtrace_capture.ended_ms
        assert mine.pop("timestamp_ms") == RECEIVED_TS_MS
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
