"""The benchmark's check that a peer builds the service's eval-metric objects, without a broker."""

from __future__ import annotations

import orjson
import pytest

from bench.peer_view import stored_span
from bench.runner import mismatched_metrics, stored_span_of
from bench.traffic import TrafficSpec, make_pairs
from consumer import payload

pytestmark = pytest.mark.unit


def _body(metrics: list[dict[str, object]]) -> bytes:
    return orjson.dumps({"data": {"type": "evaluation_metric", "attributes": {"metrics": metrics}}})


def _built(pair_span: bytes, pair_result: bytes) -> list[dict[str, object]]:
    span, result = stored_span_of(pair_span), orjson.loads(pair_result)
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


@pytest.mark.parametrize("tags", [
    {}, {"env": "prod", "version": "1.4.2"}, {"env": "prod", "team": "search", "service": "bot"},
    {"ml_app_version": "7", "version": "1.0"}, {"team": "search"},
])
@pytest.mark.parametrize("ml_app_version", [None, "2.0.0"])
def test_the_peers_span_view_is_the_services(tags: dict[str, str], ml_app_version: str | None) -> None:
    """A peer's plain-dict view of a span (bench.peer_view) is what the service stores under its defaults."""
    event = {"schema_version": 1, "kind": "span_context", "ml_app": "app", "join_key": "q-1", "trace_id": "ab",
             "span_id": "12", "tags": tags, "ml_app_version": ml_app_version}
    expected = stored_span_of(orjson.dumps(event))
    view = stored_span(event)
    assert (view["tags"], view["ml_app_version"]) == (expected["tags"], expected["ml_app_version"])
