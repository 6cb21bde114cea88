"""The dashboards under deploy/dashboards reference only metrics the service emits."""

from __future__ import annotations

import json
import re
from pathlib import Path

from consumer.metrics import Metrics

DASHBOARDS = Path(__file__).parent.parent / "deploy" / "dashboards"


def prometheus_series() -> set[str]:
    """Every series name /metrics can show (with _total, _bucket, _sum, _count suffixes)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def datadog_names() -> set[str]:
    """The same series as the Datadog Agent's OpenMetrics check names them (namespace evaljoin)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        base = "evaljoin." + family.name.removeprefix("evaljoin_")
        if family.type == "counter":
            names.add(base + ".count")
        elif family.type == "histogram":
            names |= {base + suffix for suffix in (".bucket", ".sum", ".count")}
        else:
            names.add(base)
    return names


def test_grafana_queries_use_emitted_series() -> None:
    """Every series in the Grafana dashboard's PromQL exists on /metrics, and every panel has a query."""
    board = json.loads((DASHBOARDS / "grafana.json").read_text())
    used = {name for panel in board["panels"] for target in panel["targets"]
            for name in re.findall(r"\bevaljoin_[a-z_]+", target["expr"])}
    assert used and used <= prometheus_series(), used - prometheus_series()
    assert all(panel["targets"] for panel in board["panels"])


def test_datadog_queries_use_emitted_metrics() -> None:
    """Every metric in the Datadog dashboard's queries is one the OpenMetrics check produces from /metrics."""
    board = json.loads((DASHBOARDS / "datadog.json").read_text())
    used = {name for widget in board["widgets"] for request in widget["definition"]["requests"]
            for name in re.findall(r"evaljoin\.[a-z_]+(?:\.[a-z]+)?", request["q"])}
    assert used and used <= datadog_names(), used - datadog_names()


def test_dashboards_cover_the_catalog_headlines() -> None:
    """Both dashboards show delivery, latency, dead letters, unmatched sides, the buffer and lag."""
    for board in ("grafana.json", "datadog.json"):
        text = (DASHBOARDS / board).read_text()
        for headline in ("evaluations", "join_latency_seconds", "dead_letters", "unmatched_reported",
                         "buffered_sides", "consumer_lag_records"):
            assert headline in text, (board, headline)
