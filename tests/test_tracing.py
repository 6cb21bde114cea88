"""Self-tracing: with DD_TRACE_ENABLED=true the consumer's spans reach a Datadog Agent (ddapm-test-agent)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from localenv.testagent import TestAgent
from tests.support import Topics, eventually, send_json

pytestmark = pytest.mark.timeout(120)


async def traces(agent: TestAgent) -> list[list[dict[str, Any]]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{agent.url}/test/traces")
        return response.json() if response.status_code == 200 else []


async def test_batches_deliveries_and_kafka_reads_are_traced(make_settings: Callable[..., Settings], topics: Topics,
                                                             producer: AIOKafkaProducer, test_agent: TestAgent,
                                                             tmp_path: Path) -> None:
    """A joined pair produces evaljoin.batch and evaljoin.deliver spans and aiokafka spans at the agent."""
    settings = make_settings()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DD_", "_DD_"))},
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers, "KAFKA_GROUP_ID": settings.kafka_group_id,
        "SPAN_TOPIC": topics.span, "RESULT_TOPIC": topics.result, "DLQ_TOPIC": topics.dlq,
        "UNMATCHED_TOPIC": topics.unmatched, "REDIS_URL": settings.redis_url.get_secret_value(),
        "REDIS_KEY_PREFIX": settings.redis_key_prefix, "DEFAULT_ML_APP": "traced-app", "HEALTH_PORT": "0",
        "DD_TRACE_ENABLED": "true", "DD_TRACE_AGENT_URL": test_agent.url, "DD_SERVICE": "evaljoin-test",
        "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false", "DD_REMOTE_CONFIGURATION_ENABLED": "false",
        "DD_TRACE_SAMPLING_RULES": '[{"sample_rate": 1.0}]', "LOG_FORMAT": "json",
    }
    log = (tmp_path / "consumer.log").open("wb")
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "consumer", env=env, stderr=log)
    try:
        await send_json(producer, topics.span, {"schema_version": 1, "join_key": "t-1", "trace_id": "ab",
                                                "span_id": "5"})
        await send_json(producer, topics.result, {"schema_version": 1, "event_id": "evt-traced-1", "join_key": "t-1",
                                                  "evaluations": [{"label": "traced", "metric_type": "score",
                                                                   "value": 1}]})

        async def names() -> set[str]:
            return {s["name"] for trace in await traces(test_agent) for s in trace
                    if s.get("service") == "evaljoin-test"}

        await eventually(lambda: _has(names(), {"evaljoin.batch", "evaljoin.deliver"}), within=60,
                         what="the consumer's own spans at the agent")
        every = {(s["name"], s.get("service")) for trace in await traces(test_agent) for s in trace}
        assert any("kafka" in name for name, _ in every), every
        delivered = [r for r in test_agent.eval_metric_requests()
                     if any(m["label"] == "traced" for m in r["body"]["data"]["attributes"]["metrics"])]
        assert len(delivered) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0, (tmp_path / "consumer.log").read_text()[-3000:]
        log.close()


async def _has(names: Awaitable[set[str]], wanted: set[str]) -> bool:
    return wanted <= await names
