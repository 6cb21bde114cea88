"""The dashboards (deploy/dashboards) and Datadog monitors (deploy/monitors) use only what the service emits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from consumer.metrics import Metrics

ROOT = Path(__file__).parent.parent
DASHBOARDS = ROOT / "deploy" / "dashboards"
MONITORS = ROOT / "deploy" / "monitors"
DATADOG_METRIC = r"evaljoin\.[a-z_]+(?:\.[a-z]+)?"
# The alerts every monitoring setup covers, by the name of the chart's PrometheusRule alert.
ALERTS = {"EvaljoinHaltedByDlqLimit", "EvaljoinDependencyRefused", "EvaljoinRedisOutOfMemory", "EvaljoinNoProgress",
          "EvaljoinLagGrowing", "EvaljoinUnmatchedRatioHigh", "EvaljoinDeadLetterRatioHigh"}


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
            for name in re.findall(DATADOG_METRIC, request["q"])}
    assert used and used <= datadog_names(), used - datadog_names()


def test_dashboards_cover_the_catalog_headlines() -> None:
    """Both dashboards show delivery, latency, dead letters, unmatched sides, the buffer, lag and refusals."""
    for board in ("grafana.json", "datadog.json"):
        text = (DASHBOARDS / board).read_text()
        for headline in ("evaluations", "join_latency_seconds", "dead_letters", "unmatched_reported",
                         "buffered_sides", "consumer_lag_records", "refused"):
            assert headline in text, (board, headline)


def monitors() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(MONITORS.glob("*.json"))}


def logged_events() -> set[str]:
    """Every structlog event name the service's code logs (the first argument of a log call)."""
    source = "\n".join(path.read_text() for path in (ROOT / "consumer").rglob("*.py"))
    return set(re.findall(r"\blog\.(?:debug|info|warning|error|exception|critical)\(\s*\"([a-z_]+)\"", source))


def test_monitors_use_emitted_metrics_and_log_events() -> None:
    """Each metric monitor queries metrics the OpenMetrics check makes; each log monitor, an event the service logs."""
    found = monitors()
    assert found
    for name, monitor in found.items():
        query = monitor["query"]
        if monitor["type"] == "log alert":
            events = set(re.findall(r"@event:([a-z_]+)", query))
            assert events and events <= logged_events(), (name, events - logged_events())
        else:
            assert monitor["type"] == "query alert", name
            used = set(re.findall(DATADOG_METRIC, query))
            assert used and used <= datadog_names(), (name, used - datadog_names())
        assert "service:evaljoin" in query, name


def test_monitors_are_complete_datadog_definitions() -> None:
    """Each monitor has a name, a message and thresholds, its critical threshold is the one in its query."""
    for name, monitor in monitors().items():
        assert {"name", "type", "query", "message", "tags", "options"} <= set(monitor), name
        comparison = re.search(r"(>=|<=|>|<)\s*([0-9.]+)\s*$", monitor["query"])
        assert comparison, name
        assert float(comparison.group(2)) == monitor["options"]["thresholds"]["critical"], name
        warning = monitor["options"]["thresholds"].get("warning")
        if warning is not None:
            below = comparison.group(1).startswith(">")
            assert (warning < float(comparison.group(2))) == below, name


def test_monitors_cover_every_alert_once() -> None:
    """The monitors are the PrometheusRule's alerts, one each, named by their `alert:` tag."""
    tagged = [tag.removeprefix("alert:") for monitor in monitors().values() for tag in monitor["tags"]
              if tag.startswith("alert:")]
    assert sorted(tagged) == sorted(ALERTS)


def test_grafana_queries_keep_to_the_chosen_release() -> None:
    """Every Grafana query selects the namespace and job variables, so two releases' series never mix."""
    board = json.loads((DASHBOARDS / "grafana.json").read_text())
    assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "namespace", "job"}
    for panel in board["panels"]:
        for target in panel["targets"]:
            for selector in re.findall(r"\bevaljoin_[a-z_]+(\{[^}]*\})?", target["expr"]):
                assert 'namespace=~"$namespace"' in selector and 'job=~"$job"' in selector, target["expr"]
