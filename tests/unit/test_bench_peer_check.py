"""The benchmark's check that a peer builds the service's eval-metric objects, without a broker."""

from __future__ import annotations

import orjson
import pytest

from bench.runner import mismatched_metrics
from bench.traffic import TrafficSpec, make_pairs
from consumer import payload

pytestmark = pytest.mark.unit


def _body(metrics: list[dict[str, object]]) -> bytes:
    return orjson.dumps({"data": {"type": "evaluation_metric", "attributes": {"metrics": metrics}}})


def _built(pair_span: bytes, pair_result: bytes) -> list[dict[str, object]]:
    span, result = orjson.loads(pair_span), orjson.loads(pair_result)
    result["received_ts_ms"] = 0
    return [payload.build_metric(span, result, i) for i in range(len(result["evaluations"]))]


def test_the_objects_build_metric_makes_pass_and_any_change_is_counted() -> None:
    pairs = make_pairs(TrafficSpec(pairs=3, evals=2, unmatched=0.0, run="check"))
    by_id = {p.span_id.encode(): p for p in pairs}
    metrics = [m for p in pairs for m in _built(p.span, p.result)]
    assert mismatched_metrics([_body(metrics[:3]), _body(metrics[3:])], by_id) == 0

    changed = [dict(m) for m in metrics]
    changed[1]["score_value"] = 0.5 if changed[1]["score_value"] != 0.5 else 0.25
    changed[4]["tags"] = ["ml_app:other"]
    assert mismatched_metrics([_body(changed)], by_id) == 2

    stranger = dict(metrics[0], join_on={"span": {"span_id": "1", "trace_id": "0"}})
    assert mismatched_metrics([_body([stranger])], by_id) == 1
