"""What a peer of the benchmark must start from to build the service's eval-metric objects.

The service stores a span-context event under its rules (``consumer.enrich``) before it joins it; a peer
that builds metrics from the raw event must apply the same default rules, on plain dicts and without
validating (validation is the service's cost, not the peers'). ``tests/unit/test_bench_peer_check.py``
holds this to ``consumer.enrich`` itself.
"""

from __future__ import annotations

from typing import Any

SPAN_TAGS = ("env", "service", "version")  # SPAN_TAGS_TO_EVALUATION's default: what the service keeps of a span


def stored_span(span: dict[str, Any]) -> dict[str, Any]:
    """The span as the service stores it by default (consumer.enrich): allow-listed tags, ml_app_version resolved."""
    tags = span.get("tags") or {}
    version = span.get("ml_app_version") or tags.get("ml_app_version") or tags.get("version")
    return {**span, "tags": {name: value for name, value in tags.items() if name in SPAN_TAGS},
            "ml_app_version": version}
