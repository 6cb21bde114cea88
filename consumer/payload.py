"""Joined span + evaluation -> the eval-metric object the intake takes, encoded once.

The object is the one ``LLMObs.submit_evaluation(span={...}, ...)`` builds for the same arguments
(``tests/test_payload_contract.py`` checks that against ddtrace itself), and it is a pure function
of the two records, so a re-sent evaluation is byte-identical. What the deployment's rules decide
(scope, assessment, a time out of Datadog's window, the span's tags) is in the records already
(:mod:`consumer.enrich`).

* ``timestamp_ms``: the evaluation's, else the provenance's ``evaluated_at_ms``, else the result record's
  time (``received_ts_ms``); ``0`` is "not given", as ddtrace reads it ("now" being the record's time).
* ``tags``: ``ddtrace.version`` and ``ml_app`` (as ddtrace), the span's carried tags, then the
  evaluation's own (which win over a span tag of the same name).
* ``ml_app_version``: the span's, when it has one (a field of Datadog's API that ddtrace 4.16 does not set).
* ``metadata.nemo``: the result's provenance, unless the evaluation's metadata has a ``nemo`` key of its
  own: then the provenance goes under ``evaljoin_provenance`` and the producer's ``nemo`` stays as given.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from typing import Any

import orjson

try:  # the tag ddtrace puts on every evaluation it sends: its distribution's version, as ddtrace.__version__ is.
    # Read from the installed metadata: importing ddtrace to read it costs the process about 27 MB of RSS (its
    # settings, telemetry and native modules), which the service needs only when DD_TRACE_ENABLED is set.
    _DDTRACE_VERSION = importlib.metadata.version("ddtrace")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - ddtrace is a dependency
    _DDTRACE_VERSION = "unknown"


def evaluation_id(ml_app: str, join_key: str, event_id: str, index: int, run: str = "") -> str:
    """Deterministic id of one evaluation: the delivery ledger's key (without a run, the id it always had)."""
    raw = f"{ml_app}\x00{join_key}\x00{event_id}\x00{index}" + (f"\x00{run}" if run else "")
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


PROVENANCE_KEY = "nemo"
PROVENANCE_FALLBACK_KEY = "evaljoin_provenance"  # where the provenance goes when the producer's metadata has "nemo"


def build_metric(span: dict[str, Any], result: dict[str, Any], index: int) -> dict[str, Any]:
    """The eval-metric object for evaluation ``index`` of ``result``, joined to ``span``."""
    evaluation = result["evaluations"][index]
    provenance = result.get("provenance") or {}
    metric_type = evaluation["metric_type"]
    ml_app = span["ml_app"]
    timestamp_ms = next(value for value in (evaluation.get("timestamp_ms"), provenance.get("evaluated_at_ms"),
                                            result["received_ts_ms"]) if value)
    tags = {"ddtrace.version": _DDTRACE_VERSION, "ml_app": ml_app, **(span.get("tags") or {}),
            **(evaluation.get("tags") or {})}
    metric: dict[str, Any] = {
        "event_kind": "evaluation",
        "join_on": join_on(span),
        "label": evaluation["label"],
        "metric_type": metric_type,
        "timestamp_ms": timestamp_ms,
        f"{metric_type}_value": evaluation["value"],
        "ml_app": ml_app,
        "tags": [f"{key}:{value}" for key, value in tags.items()],
        "eval_scope": evaluation.get("eval_scope") or "span",
    }
    if span.get("ml_app_version"):
        metric["ml_app_version"] = span["ml_app_version"]
    if evaluation.get("assessment"):
        metric["assessment"] = evaluation["assessment"]
    if evaluation.get("reasoning"):
        metric["reasoning"] = evaluation["reasoning"]
    metadata = dict(evaluation.get("metadata") or {})
    if provenance:
        key = PROVENANCE_FALLBACK_KEY if PROVENANCE_KEY in metadata else PROVENANCE_KEY
        metadata[key] = {k: v for k, v in provenance.items() if v is not None}
    if metadata:
        metric["metadata"] = metadata
    return metric


def join_on(span: dict[str, Any]) -> dict[str, Any]:
    """The ``join_on`` of an evaluation joined to ``span``: by span and trace ids, or, for a result joined by
    span tag (``consumer.join.tagged_span``), ``{"tag": {"key", "value"}}``, as ``span_with_tag_value`` gives."""
    tag = span.get("join_tag")
    if tag is not None:
        return {"tag": tag}
    return {"span": {"span_id": span["span_id"], "trace_id": span["trace_id"]}}


def encode_metric(metric: dict[str, Any]) -> bytes:
    return orjson.dumps(metric)
