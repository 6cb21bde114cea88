"""Delivery through the Datadog Agent's EVP proxy, with Datadog's ddapm-test-agent as the agent."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from consumer.intake_route import IntakeRoute, RouteSettings, choose_route
from localenv.intake import EVP_PROXY_PATH, FakeIntake
from localenv.kafka import KafkaBroker
from localenv.testagent import TestAgent
from tests.support import Topics, eventually, group_lag, running_service, send_json

pytestmark = pytest.mark.timeout(180)


def _metrics(request: dict[str, Any]) -> list[dict[str, Any]]:
    body = request["body"]
    try:
        return list(body["data"]["attributes"]["metrics"])
    except (KeyError, TypeError):
        return []


def _carrying(requests: list[dict[str, Any]], span_id: str) -> list[dict[str, Any]]:
    """The requests with a metric joined to ``span_id`` (the test agent is shared by the session)."""
    return [r for r in requests if any(m.get("join_on", {}).get("span", {}).get("span_id") == span_id
                                       for m in _metrics(r))]


async def test_evaluation_is_delivered_through_the_agent_evp_proxy(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer,
        test_agent: TestAgent, intake: FakeIntake, kafka: KafkaBroker) -> None:
    """Without agentless mode the evaluation goes to the agent's EVP proxy with the api subdomain and no API key."""
    span_id = str(random.randrange(10**18, 10**19))
    trace_id = uuid.uuid4().hex
    key = f"q-agent-{span_id}"
    settings = make_settings(dd_llmobs_agentless_enabled=False, dd_llmobs_override_origin=None,
                             dd_trace_agent_url=test_agent.url, dd_api_key=None)
    route = await choose_route(RouteSettings.from_settings(settings))
    assert isinstance(route, IntakeRoute) and route.url == test_agent.url + EVP_PROXY_PATH

    async def delivered() -> bool:
        return bool(_carrying(await asyncio.to_thread(test_agent.eval_metric_requests), span_id))

    async with running_service(settings):
        await send_json(producer, topics.span,
                        {"schema_version": 1, "join_key": key, "trace_id": trace_id, "span_id": span_id})
        await send_json(producer, topics.result, {
            "schema_version": 1, "event_id": f"evt-agent-{span_id}", "join_key": key,
            "evaluations": [{"label": "agent_path_faithfulness", "metric_type": "score", "value": 0.875,
                             "timestamp_ms": int(time.time() * 1000) - 60_000}],  # inside Datadog's window
            "provenance": {"job_id": "eval-job-agent", "target_type": "model"},
        })
        await eventually(delivered, what="the eval-metric request at the test agent")
        # A 200 from the agent counts as delivered: the records are committed and nothing is re-sent.
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="the commit")

    (request,) = _carrying(await asyncio.to_thread(test_agent.eval_metric_requests), span_id)
    assert request["method"] == "POST"
    assert request["url"] == test_agent.url + EVP_PROXY_PATH
    headers = {name.lower(): value for name, value in request["headers"].items()}
    assert headers["x-datadog-evp-subdomain"] == "api"
    assert headers["content-type"] == "application/json"
    assert "dd-api-key" not in headers
    (metric,) = _metrics(request)
    assert metric["join_on"] == {"span": {"span_id": span_id, "trace_id": trace_id}}
    assert (metric["label"], metric["metric_type"], metric["score_value"]) == ("agent_path_faithfulness", "score",
                                                                               0.875)
    assert metric["ml_app"] == "nemos-demo"
    assert metric["metadata"] == {"nemo": {"job_id": "eval-job-agent", "target_type": "model"}}
    assert intake.requests == []
