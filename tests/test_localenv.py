"""The local test harness itself, checked against the real services it starts."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster as RedisClusterClient
from redis.retry import Retry

from localenv.intake import AGENTLESS_PATH, EVP_PROXY_PATH, FakeIntake
from localenv.kafka import KafkaBroker, create_topics
from localenv.ports import free_port, free_ports
from localenv.redis import RedisCluster, RedisServer
from localenv.testagent import TestAgent

REPO_ROOT = Path(__file__).resolve().parent.parent


def _payload(*labels: str) -> dict[str, Any]:
    metrics = [
        {"label": label, "metric_type": "score", "score_value": 0.5, "join_on": {"span": {"span_id": "1"}}}
        for label in labels
    ]
    return {"data": {"type": "evaluation_metric", "attributes": {"metrics": metrics}}}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, count: int, within: float = 20.0) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + within
        while len(values) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                values.extend(record.value for record in records)
    finally:
        await consumer.stop()
    return values


def test_free_ports_are_distinct_and_bindable() -> None:
    """free_port/free_ports return loopback ports that can be bound, and free_ports never repeats one."""
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in [free_port(), *ports]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_kafka_broker_round_trips_a_message() -> None:
    """A started broker takes a produced message on a created topic and hands it back to a consumer."""
    with KafkaBroker() as broker:
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        create_topics(broker.bootstrap_servers, {"roundtrip": 2})
        create_topics(broker.bootstrap_servers, {"roundtrip": 2})  # already exists: ignored
        asyncio.run(_produce(broker.bootstrap_servers, "roundtrip", [b"hello"]))
        assert asyncio.run(_consume(broker.bootstrap_servers, "roundtrip", 1)) == [b"hello"]
        data_dir = broker.data_dir
    assert not data_dir.exists()


def test_kafka_broker_keeps_messages_across_kill_and_restart() -> None:
    """After SIGKILL and restart() the broker is back on the same address with the earlier message."""
    with KafkaBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(_produce(bootstrap, "durable", [b"before-crash"]))
        broker.kill()
        assert not broker.running
        assert not _listening(broker.port)
        broker.restart()
        assert broker.bootstrap_servers == bootstrap
        asyncio.run(_produce(bootstrap, "durable", [b"after-restart"]))
        got = asyncio.run(_consume(bootstrap, "durable", 2))
        assert sorted(got) == [b"after-restart", b"before-crash"]


def test_redis_server_keeps_a_key_across_kill_and_restart() -> None:
    """With appendfsync always, an acknowledged write survives SIGKILL; restart keeps port, password and data."""
    with RedisServer(password="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        client.set("durable", "yes")
        client.close()
        port = server.port
        server.kill()
        assert not _listening(port)
        server.restart()
        assert server.port == port
        client = redis.Redis.from_url(server.url)
        try:
            assert client.get("durable") == b"yes"
        finally:
            client.close()
        anonymous = redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
        try:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
        finally:
            anonymous.close()


def test_redis_cluster_serves_keys_on_every_node() -> None:
    """The three-node cluster is ready on start: a cluster client writes keys that land on all three masters."""
    with RedisCluster() as cluster:
        ports = {port for _, port in cluster.startup_nodes}
        assert cluster.url == f"redis://127.0.0.1:{cluster.startup_nodes[0][1]}/0"
        client = RedisClusterClient(host="127.0.0.1", port=cluster.startup_nodes[0][1])
        try:
            for i in range(30):  # these 30 key slots fall in all three masters' ranges
                client.set(f"key-{i}", str(i))
                assert client.get(f"key-{i}") == str(i).encode()
        finally:
            client.close()
        for port in ports:
            node = redis.Redis(host="127.0.0.1", port=port)
            try:
                assert node.dbsize() > 0, f"no key landed on node {port}"
            finally:
                node.close()
    assert not any(_listening(port) for port in ports)


def test_intake_accepts_both_endpoints_and_records_headers() -> None:
    """Both intake paths answer 202 {}, record their auth/routing header, and echo accepted metrics."""
    echo = io.StringIO()
    with FakeIntake(echo=echo) as intake:
        assert intake.url == intake.origin + AGENTLESS_PATH
        r1 = httpx.post(intake.url, json=_payload("a"), headers={"DD-API-KEY": "key-1"})
        r2 = httpx.post(intake.origin + EVP_PROXY_PATH, json=_payload("b"), headers={"X-Datadog-EVP-Subdomain": "api"})
        assert (r1.status_code, r1.json()) == (202, {})
        assert r2.status_code == 202
        assert [m["label"] for m in intake.wait_for_metrics(2, timeout=1)] == ["a", "b"]
        first, second = intake.requests
        assert first.headers["DD-API-KEY"] == "key-1"
        assert second.headers["X-Datadog-EVP-Subdomain"] == "api"
        assert second.path == EVP_PROXY_PATH
    lines = echo.getvalue().splitlines()
    assert [json.loads(line.removeprefix("intake received: "))["label"] for line in lines] == ["a", "b"]


def test_intake_fail_next_answers_errors_then_recovers() -> None:
    """fail_next answers the next N requests with the status and Retry-After, none accepted, then 202 again."""
    with FakeIntake() as intake:
        intake.fail_next(2, status=429, retry_after=3)
        answers = [httpx.post(intake.url, json=_payload("x")) for _ in range(3)]
        assert [r.status_code for r in answers] == [429, 429, 202]
        assert answers[0].headers["Retry-After"] == "3"
        assert [r.status for r in intake.requests] == [429, 429, 202]
        assert len(intake.accepted_metrics()) == 1


def test_intake_hang_next_answers_late_but_keeps_the_data() -> None:
    """hang_next delays the answer past a client timeout, yet the request is recorded as accepted."""
    with FakeIntake() as intake:
        intake.hang_next(1, seconds=0.6)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(intake.url, json=_payload("late"), timeout=0.2)
        assert [m["label"] for m in intake.wait_for_metrics(1, timeout=3)] == ["late"]
        started = time.monotonic()
        assert httpx.post(intake.url, json=_payload("on-time")).status_code == 202
        assert time.monotonic() - started < 0.5


def test_intake_reject_labels_rejects_the_whole_request() -> None:
    """A request with a rejected label gets 400 naming it and none of its metrics are accepted."""
    with FakeIntake() as intake:
        intake.reject_labels({"bad label"})
        response = httpx.post(intake.url, json=_payload("good", "bad label"))
        assert response.status_code == 400
        assert "bad label" in response.json()["errors"][0]["detail"]
        assert intake.accepted_metrics() == []
        intake.reset_faults()
        assert httpx.post(intake.url, json=_payload("good", "bad label")).status_code == 202
        with pytest.raises(TimeoutError, match="got 2"):
            intake.wait_for_metrics(3, timeout=0.1)


def test_intake_rejects_unknown_paths_and_malformed_bodies() -> None:
    """Unknown paths get 404 and bodies that are not an evaluation_metric payload get a JSON 400."""
    with FakeIntake() as intake:
        assert httpx.post(intake.origin + "/api/v2/llmobs", json=_payload("a")).status_code == 404
        bad = httpx.post(intake.url, json={"data": {"type": "span", "attributes": {}}})
        assert bad.status_code == 400
        assert "evaluation_metric" in bad.json()["errors"][0]["detail"]
        assert [r.status for r in intake.requests] == [404, 400]
        intake.clear()
        assert intake.requests == []


def test_test_agent_records_eval_metrics_sent_through_the_evp_proxy() -> None:
    """ddapm-test-agent answers the EVP-proxied eval-metric POST with 200 and returns the decoded payload."""
    with TestAgent() as agent:
        token = uuid.uuid4().hex
        agent.start_session(token)
        response = httpx.post(
            agent.url + EVP_PROXY_PATH,
            json=_payload("agent"),
            headers={"X-Datadog-EVP-Subdomain": "api", "X-Datadog-Test-Session-Token": token},
        )
        assert response.status_code == 200
        (request,) = agent.eval_metric_requests(token)
        assert request["headers"]["X-Datadog-EVP-Subdomain"] == "api"
        assert request["body"] == _payload("agent")
        assert agent.eval_metric_requests("no-such-session") == []


@pytest.mark.parametrize("service", ["intake", "redis"])
def test_main_prints_the_address_and_stops_on_sigterm(service: str) -> None:
    """`python -m localenv <service>` prints a reachable address, then SIGTERM stops it and its children."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "localenv", service],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split("/")[0].split()[0])
        assert _listening(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not _listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
