"""The route to the intake chosen as ddtrace chooses it, with the real service over Kafka and Redis.

The Agent is Datadog's own ddapm-test-agent: on a UNIX socket (as the Agent's ``apm.socket``), on the
IPv6 loopback, and with an ``/info`` that lacks ``/evp_proxy/v2/`` (an Agent without the EVP proxy); the
agentless side is the intake stand-in behind ``DD_LLMOBS_OVERRIDE_ORIGIN``.
"""

from __future__ import annotations

import asyncio
import random
import socket
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from structlog.testing import capture_logs

from consumer.config import Settings
from consumer.ops.check import run_checks
from localenv.intake import AGENTLESS_PATH, EVP_PROXY_PATH, FakeIntake
from localenv.kafka import KafkaBroker
from localenv.ports import free_port
from localenv.testagent import TestAgent
from tests.support import Topics, eventually, group_lag, running_service, send_json

pytestmark = pytest.mark.timeout(180)

# Nothing decided by the settings: the service asks the Agent, as ddtrace does with no agentless switch set.
UNDECIDED: dict[str, Any] = {"dd_llmobs_agentless_enabled": None, "dd_agentless_enabled": False}
LogLines = list[MutableMapping[str, Any]]
NO_EVP_INFO = {"endpoints": ["/v0.4/traces", "/v0.5/traces", "/v0.7/traces", "/v0.6/stats", "/telemetry/proxy/"]}


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def socket_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestAgent]:
    """ddapm-test-agent listening on a UNIX socket, as the Datadog Agent's apm.socket."""
    with TestAgent(uds_path=tmp_path_factory.mktemp("agent") / "apm.socket") as agent:
        yield agent


@pytest.fixture(scope="module")
def agent_without_evp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestAgent]:
    """An Agent whose /info lists no /evp_proxy/v2/ endpoint (an old Agent, or one without APM's proxy)."""
    with TestAgent(info=NO_EVP_INFO) as agent:
        yield agent


@pytest.fixture(scope="module")
def ipv6_agent() -> Iterator[TestAgent]:
    """ddapm-test-agent on the IPv6 loopback, ::1."""
    if not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (binding ::1 fails)")
    with TestAgent(host="::1") as agent:
        yield agent


def _ids() -> tuple[str, str, str]:
    span_id = str(random.randrange(10**18, 10**19))
    return span_id, uuid.uuid4().hex, f"q-route-{span_id}"


async def _publish(producer: AIOKafkaProducer, topics: Topics, span_id: str, trace_id: str, key: str) -> None:
    await send_json(producer, topics.span,
                    {"schema_version": 1, "join_key": key, "trace_id": trace_id, "span_id": span_id})
    await send_json(producer, topics.result, {
        "schema_version": 1, "event_id": f"evt-{key}", "join_key": key,
        "evaluations": [{"label": "route_check", "metric_type": "score", "value": 0.5,
                         "timestamp_ms": 1_700_000_000_000}]})


def _carrying(requests: list[dict[str, Any]], span_id: str) -> list[dict[str, Any]]:
    """The agent's eval-metric requests with a metric joined to ``span_id`` (the agents are shared)."""
    def metrics(request: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return list(request["body"]["data"]["attributes"]["metrics"])
        except (KeyError, TypeError):
            return []
    return [r for r in requests
            if any(m.get("join_on", {}).get("span", {}).get("span_id") == span_id for m in metrics(r))]


async def _at_agent(agent: TestAgent, span_id: str) -> list[dict[str, Any]]:
    return _carrying(await asyncio.to_thread(agent.eval_metric_requests), span_id)


def _route_lines(logs: LogLines) -> LogLines:
    return [line for line in logs if line.get("event") == "intake_route"]


async def _delivered_through_agent(settings: Settings, agent: TestAgent, producer: AIOKafkaProducer,
                                   topics: Topics, kafka: KafkaBroker) -> tuple[dict[str, Any], LogLines]:
    """Run the service, publish one span and its result; the request the agent got, and the intake_route lines."""
    span_id, trace_id, key = _ids()
    with capture_logs() as logs:
        async with running_service(settings):
            await _publish(producer, topics, span_id, trace_id, key)
            await eventually(lambda: _count_at_agent(agent, span_id), expect=1, what="the request at the agent")
            await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                               [topics.span, topics.result]), expect=0, what="the commit")
    (request,) = await _at_agent(agent, span_id)
    return request, _route_lines(logs)


async def _count_at_agent(agent: TestAgent, span_id: str) -> int:
    return len(await _at_agent(agent, span_id))


def _evp_headers(request: dict[str, Any]) -> dict[str, str]:
    headers = {name.lower(): value for name, value in request["headers"].items()}
    assert headers["x-datadog-evp-subdomain"] == "api"
    assert "dd-api-key" not in headers
    return headers


# -- through the Agent --------------------------------------------------------------------------------


async def test_delivers_through_the_agents_unix_socket(make_settings: Callable[..., Settings], topics: Topics,
                                                       producer: AIOKafkaProducer, kafka: KafkaBroker,
                                                       socket_agent: TestAgent, intake: FakeIntake) -> None:
    """A unix:// DD_TRACE_AGENT_URL is asked over the socket, offers the EVP proxy, and gets the evaluation there."""
    settings = make_settings(**UNDECIDED, dd_llmobs_override_origin=None, dd_api_key=None,
                             dd_trace_agent_url=socket_agent.unix_url)
    request, lines = await _delivered_through_agent(settings, socket_agent, producer, topics, kafka)
    assert request["method"] == "POST"
    assert request["url"] == "http://localhost" + EVP_PROXY_PATH  # over the socket: no TCP port anywhere
    _evp_headers(request)
    (line,) = lines
    assert (line["route"], line["reason"]) == ("agent", "agent_has_evp_proxy")
    assert line["intake"] == socket_agent.unix_url + EVP_PROXY_PATH and line["agent"] == socket_agent.unix_url
    assert intake.requests == []


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_delivers_through_the_agent_named_by_host_and_port(
        family: str, make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer,
        kafka: KafkaBroker, request: pytest.FixtureRequest) -> None:
    """DD_AGENT_HOST (an IPv6 address bracketed) and DD_TRACE_AGENT_PORT name the Agent that is asked and used."""
    agent: TestAgent = request.getfixturevalue("test_agent" if family == "ipv4" else "ipv6_agent")
    host = "127.0.0.1" if family == "ipv4" else "::1"
    settings = make_settings(**UNDECIDED, dd_llmobs_override_origin=None, dd_api_key=None, dd_agent_host=host,
                             dd_trace_agent_port=agent.port)
    sent, lines = await _delivered_through_agent(settings, agent, producer, topics, kafka)
    assert sent["url"] == agent.url + EVP_PROXY_PATH
    assert agent.url == (f"http://127.0.0.1:{agent.port}" if family == "ipv4" else f"http://[::1]:{agent.port}")
    _evp_headers(sent)
    (line,) = lines
    assert (line["route"], line["reason"], line["agent"]) == ("agent", "agent_has_evp_proxy", agent.url)


# -- agentless when the Agent cannot take them ----------------------------------------------------------


@pytest.mark.parametrize("agent_state", ["absent", "without_evp_proxy"])
async def test_falls_back_to_agentless_with_an_api_key(agent_state: str, make_settings: Callable[..., Settings],
                                                       topics: Topics, producer: AIOKafkaProducer, kafka: KafkaBroker,
                                                       intake: FakeIntake, request: pytest.FixtureRequest) -> None:
    """No Agent, or one without the EVP proxy: with DD_API_KEY the evaluation goes agentless (to the override)."""
    if agent_state == "absent":
        agent_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        reason = "agent_unreachable"
    else:
        agent_url = request.getfixturevalue("agent_without_evp").url
        reason = "agent_without_evp_proxy"
    settings = make_settings(**UNDECIDED, dd_trace_agent_url=agent_url)
    assert settings.dd_api_key is not None
    span_id, trace_id, key = _ids()
    with capture_logs() as logs:
        async with running_service(settings):
            await _publish(producer, topics, span_id, trace_id, key)
            await eventually(lambda: len(intake.accepted_metrics()), expect=1, what="the agentless request")
    (sent,) = intake.requests
    assert sent.path == AGENTLESS_PATH
    headers = {name.lower(): value for name, value in sent.headers.items()}
    assert headers["dd-api-key"] == settings.dd_api_key.get_secret_value()
    assert "x-datadog-evp-subdomain" not in headers
    assert sent.metrics[0]["join_on"] == {"span": {"span_id": span_id, "trace_id": trace_id}}
    (line,) = _route_lines(logs)
    assert (line["route"], line["reason"], line["agent"]) == ("agentless", reason, agent_url)
    assert line["intake"] == intake.origin + AGENTLESS_PATH
    if agent_state == "without_evp_proxy":
        assert await _at_agent(request.getfixturevalue("agent_without_evp"), span_id) == []


# -- no route: not ready, not crashing ------------------------------------------------------------------


async def _readiness(port: int) -> tuple[int, str]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/readyz")
    return response.status_code, response.text


async def _ready_status(port: int) -> int:
    return (await _readiness(port))[0]


async def _refused_gauge(port: int) -> str:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return next(line for line in text.splitlines() if line.startswith('evaljoin_refused{component="intake"}'))


async def test_no_route_means_not_ready_with_the_reason_and_nothing_sent(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer,
        agent_without_evp: TestAgent, intake: FakeIntake) -> None:
    """An Agent without the EVP proxy and no DD_API_KEY: up, not ready with the reason, nothing posted anywhere."""
    port = free_port()
    settings = make_settings(**UNDECIDED, dd_api_key=None, dd_trace_agent_url=agent_without_evp.url,
                             health_port=port, health_host="127.0.0.1")
    span_id, trace_id, key = _ids()
    with capture_logs() as logs:
        async with running_service(settings) as service:
            await eventually(lambda: service.in_group, what="the group")
            status, body = await _readiness(port)
            assert status == 503
            assert "no route to the intake" in body and agent_without_evp.url in body and "DD_API_KEY" in body
            assert (await _refused_gauge(port)).endswith(" 1.0")
            await _publish(producer, topics, span_id, trace_id, key)
            await asyncio.sleep(3)  # the join happens; the delivery waits for a route instead of posting
            assert await _at_agent(agent_without_evp, span_id) == [] and intake.requests == []
            assert (await _readiness(port))[0] == 503
    (line,) = _route_lines(logs)
    assert (line["route"], line["reason"]) == ("none", "agent_without_evp_proxy")
    assert line["log_level"] == "error" and "DD_API_KEY is not set" in line["why"]
    assert any(entry["event"] == "intake_refuses_the_service" for entry in logs)


async def test_an_agent_that_comes_later_is_found_and_used(make_settings: Callable[..., Settings], topics: Topics,
                                                           producer: AIOKafkaProducer, kafka: KafkaBroker,
                                                           tmp_path: Path) -> None:
    """No Agent at the socket at start: not ready; once one listens there it is found, and what waited is delivered."""
    port = free_port()
    socket_path = tmp_path / "apm.socket"
    settings = make_settings(**UNDECIDED, dd_llmobs_override_origin=None, dd_api_key=None,
                             dd_trace_agent_url=f"unix://{socket_path}", health_port=port, health_host="127.0.0.1")
    span_id, trace_id, key = _ids()
    with capture_logs() as logs:
        async with running_service(settings) as service:
            await eventually(lambda: service.in_group, what="the group")
            status, body = await _readiness(port)
            assert status == 503 and "is unreachable" in body
            await _publish(producer, topics, span_id, trace_id, key)
            with TestAgent(uds_path=socket_path) as agent:
                await eventually(lambda: _count_at_agent(agent, span_id), expect=1, within=60,
                                 what="the evaluation, once the Agent is there")
                await eventually(lambda: _ready_status(port), expect=200, what="readiness")
                assert (await _refused_gauge(port)).endswith(" 0.0")
                await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                                   [topics.span, topics.result]), expect=0, what="the commit")
    first, found = _route_lines(logs)
    assert (first["route"], first["reason"]) == ("none", "agent_unreachable")
    assert (found["route"], found["reason"]) == ("agent", "agent_has_evp_proxy")


# -- check ------------------------------------------------------------------------------------------------


async def test_check_reports_the_route_and_why(make_settings: Callable[..., Settings], socket_agent: TestAgent,
                                               agent_without_evp: TestAgent) -> None:
    """`check` names the route the service would take and why, and fails when there is none."""
    through_socket = make_settings(**UNDECIDED, dd_llmobs_override_origin=None, dd_api_key=None,
                                   dd_trace_agent_url=socket_agent.unix_url)
    findings = [f for f in await run_checks(through_socket) if f.component == "intake"]
    assert [f.ok for f in findings] == [True]
    assert "route agent (agent_has_evp_proxy)" in findings[0].message
    assert socket_agent.unix_url + EVP_PROXY_PATH in findings[0].message

    nowhere = make_settings(**UNDECIDED, dd_api_key=None, dd_trace_agent_url=agent_without_evp.url)
    (finding,) = [f for f in await run_checks(nowhere) if f.component == "intake"]
    assert not finding.ok and "no route to the intake (agent_without_evp_proxy)" in finding.message

    told = make_settings(dd_llmobs_agentless_enabled=False, dd_llmobs_override_origin=None, dd_api_key=None,
                         dd_trace_agent_url=agent_without_evp.url)
    route, answer = [f for f in await run_checks(told) if f.component == "intake"]
    assert route.ok and "route agent (llmobs_agentless_disabled)" in route.message
    assert not answer.ok and "does not offer the EVP proxy" in answer.message
