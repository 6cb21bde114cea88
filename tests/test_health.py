"""The health and metrics endpoint against a running service, real Kafka and a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from consumer.config import Settings
from consumer.health import HealthServer
from consumer.metrics import Metrics
from localenv.intake import FakeIntake
from localenv.ports import free_port
from localenv.redis import RedisServer
from tests.support import Topics, eventually, running_service, send_json

pytestmark = pytest.mark.timeout(120)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _gauge(client: httpx.AsyncClient, name: str) -> float | None:
    return samples((await client.get("/metrics")).text).get((name, ()))


async def _sample(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    return samples((await client.get("/metrics")).text).get((name, tuple(sorted(labels.items()))))


async def status(client: httpx.AsyncClient, path: str) -> int:
    return (await client.get(path)).status_code


async def test_probes_and_metrics_follow_what_happens(make_settings: Callable[..., Settings], topics: Topics,
                                                      producer: AIOKafkaProducer, intake: FakeIntake) -> None:
    """Ready once in the group with Redis up, not ready when Redis dies; /metrics counts what happened."""
    port = free_port()
    with RedisServer() as redis:
        settings = make_settings(health_port=port, health_host="127.0.0.1", redis_url=redis.url,
                                 redis_cluster=False)
        async with running_service(settings), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert await status(client, "/healthz") == 200
            await eventually(lambda: status(client, "/readyz"), expect=200, what="readiness")
            await send_json(producer, topics.span, {"schema_version": 1, "join_key": "q", "trace_id": "a",
                                                    "span_id": "1"})
            # The span stored first, so that the result joins it (in one batch the result's partition may come first).
            await eventually(lambda: _sample(client, "evaljoin_events_total", kind="span", outcome="stored"),
                             expect=1.0, what="the span stored")
            await send_json(producer, topics.result, b"{broken")
            await send_json(producer, topics.result, {
                "schema_version": 1, "event_id": "evt-metrics-1", "join_key": "q",
                "evaluations": [{"label": "x", "metric_type": "boolean", "value": True}]})
            await eventually(lambda: len(intake.accepted_metrics()), expect=1, what="the evaluation")

            async def settled() -> bool:  # the intake answers before the ledger, the counters and the commit step
                now = samples((await client.get("/metrics")).text)
                return now.get(("evaljoin_evaluations_total", (("outcome", "delivered"),))) == 1 and all(
                    v == 0 for (name, _), v in now.items() if name == "evaljoin_consumer_lag_records")

            await eventually(settled, what="the delivery recorded and committed")
            values = samples((await client.get("/metrics")).text)
            assert values[("evaljoin_evaluations_total", (("outcome", "delivered"),))] == 1
            assert values[("evaljoin_events_total", (("kind", "span"), ("outcome", "stored")))] == 1
            assert values[("evaljoin_events_total", (("kind", "result"), ("outcome", "joined")))] == 1
            assert values[("evaljoin_events_total", (("kind", "result"), ("outcome", "invalid")))] == 1
            assert values[("evaljoin_dead_letters_total", (("reason", "invalid_json"),))] == 1
            consumed = sum(v for (name, _), v in values.items() if name == "evaljoin_messages_consumed_total")
            assert consumed == 3
            assert values[("evaljoin_join_latency_seconds_count", ())] == 1
            lag = [v for (name, _), v in values.items() if name == "evaljoin_consumer_lag_records"]
            assert lag and all(v == 0 for v in lag)
            await eventually(lambda: _gauge(client, "evaljoin_buffered_sides"), expect=1.0,
                             what="the joined span counted by a sweep")
            redis.kill()
            assert await status(client, "/readyz") == 503
            assert await status(client, "/nope") == 404


async def test_liveness_fails_when_the_loop_stops_progressing() -> None:
    """/healthz answers 503 once the last progress is older than the liveness timeout."""
    progress = {"at": 0.0}

    async def ping() -> bool:
        return True

    server = HealthServer(host="127.0.0.1", port=0, metrics=Metrics(), liveness_timeout_s=5,
                          last_progress=lambda: progress["at"], in_group=lambda: True, redis_ping=ping)
    async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        assert await status(client, "/healthz") == 503
        progress["at"] = time.time()
        assert await status(client, "/healthz") == 200
        progress["at"] = time.time() - 6
        assert await status(client, "/healthz") == 503
        assert await status(client, "/readyz") == 200


async def test_an_intake_refusing_the_service_makes_it_unready_with_the_reason(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake) -> None:
    """While the intake answers 403 the service says so on /readyz and /metrics; once it accepts, ready again."""
    port = free_port()
    intake.fail_next(6, status=403)
    settings = make_settings(health_port=port, health_host="127.0.0.1")
    async with running_service(settings), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        await eventually(lambda: status(client, "/readyz"), expect=200, what="readiness")
        await send_json(producer, topics.span, {"schema_version": 1, "join_key": "q", "trace_id": "a", "span_id": "1"})
        await send_json(producer, topics.result, {
            "schema_version": 1, "event_id": "evt-refused-1", "join_key": "q",
            "evaluations": [{"label": "x", "metric_type": "boolean", "value": True}]})
        await eventually(lambda: status(client, "/readyz"), expect=503, what="unready while refused")
        body = (await client.get("/readyz")).json()
        assert "intake refuses the service" in body["refused"] and "403" in body["refused"]
        assert "DD_API_KEY" in body["refused"]
        assert samples((await client.get("/metrics")).text)[("evaljoin_refused", (("component", "intake"),))] == 1
        await eventually(lambda: len(intake.accepted_metrics()), expect=1, what="delivery once the intake accepts")
        await eventually(lambda: status(client, "/readyz"), expect=200, what="ready again")
        assert samples((await client.get("/metrics")).text)[("evaljoin_refused", (("component", "intake"),))] == 0
