"""The operator commands against real Kafka, Redis and an intake: check, inspect, replay-dlq, sweep."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer.cli import cmd_check, cmd_inspect, cmd_replay, cmd_sweep, parser
from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from tests.support import Topics, eventually, group_lag, read_topic, running_service, send_json

pytestmark = pytest.mark.timeout(120)

SPAN = {"schema_version": 1, "join_key": "q-1", "trace_id": "ab", "span_id": "7"}
RESULT = {"schema_version": 1, "event_id": "evt-cli-0001", "join_key": "q-1",
          "evaluations": [{"label": "relevance", "metric_type": "score", "value": 0.5}]}


async def test_check_reports_each_component(make_settings: Callable[..., Settings],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """check passes when everything is reachable and names the missing topic and dead Redis when not."""
    assert await cmd_check(make_settings()) == 0
    good = capsys.readouterr().out
    assert "FAIL" not in good and "PING answered" in good and "exists with 2 partition(s)" in good
    broken = make_settings(dlq_topic="no-such-topic", redis_url="redis://127.0.0.1:1/0", redis_cluster=False)
    assert await cmd_check(broken) == 1
    bad = capsys.readouterr().out
    assert "FAIL kafka   DLQ_TOPIC 'no-such-topic' does not exist" in bad
    assert "FAIL redis" in bad


async def test_check_runs_from_the_command_line(make_settings: Callable[..., Settings]) -> None:
    """`python -m consumer check` reads the environment and exits 0 when all is well."""
    settings = make_settings()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
           "SPAN_TOPIC": settings.span_topic, "RESULT_TOPIC": settings.result_topic, "DLQ_TOPIC": settings.dlq_topic,
           "UNMATCHED_TOPIC": settings.unmatched_topic, "REDIS_URL": settings.redis_url.get_secret_value(),
           "DD_LLMOBS_OVERRIDE_ORIGIN": str(settings.dd_llmobs_override_origin),
           "DD_LLMOBS_AGENTLESS_ENABLED": "true", "DD_API_KEY": "test-api-key-0123456789"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "consumer", "check", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, (out + err).decode()
    assert out.decode().count("ok  ") >= 6


async def test_inspect_shows_buffer_and_one_key(make_settings: Callable[..., Settings], topics: Topics,
                                                producer: AIOKafkaProducer, intake: FakeIntake, kafka: KafkaBroker,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """inspect counts waiting sides per ml_app and shows one key's span, pending results and ledger."""
    settings = make_settings()
    async with running_service(settings):
        await send_json(producer, topics.result, RESULT)
        await send_json(producer, topics.result, {**RESULT, "event_id": "evt-cli-0002", "join_key": "q-2"})
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id, [topics.result]),
                         expect=0, what="both results consumed and buffered")
        await send_json(producer, topics.span, SPAN)
        await eventually(lambda: len(intake.accepted_metrics()), expect=1, what="the q-1 evaluation")
    assert await cmd_inspect(settings, parser().parse_args(["inspect"])) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["buffered"] == {"nemos-demo": {"spans": 1, "results": 1}}
    assert {(e["kind"], e["join_key"]) for e in view["oldest"]} >= {("result", "q-2"), ("span", "q-1")}
    assert await cmd_inspect(settings, parser().parse_args(["inspect", "--key", "q-1"])) == 0
    key = json.loads(capsys.readouterr().out)
    assert key["span"]["span_id"] == "7" and key["span_joined"] is True
    assert key["pending_results"] == {} and list(key["ledger"].values()) == ["delivered"]


async def test_replay_dlq_after_a_config_fix_delivers_once(make_settings: Callable[..., Settings], topics: Topics,
                                                           producer: AIOKafkaProducer, intake: FakeIntake,
                                                           kafka: KafkaBroker,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Records dead-lettered for lack of an ml_app are replayed once DEFAULT_ML_APP is set, and only once."""
    broken = make_settings(default_ml_app=None)
    async with running_service(broken):
        await send_json(producer, topics.span, SPAN)
        await send_json(producer, topics.result, RESULT)
        await send_json(producer, topics.result, b"not json at all")
        await read_topic(kafka.bootstrap_servers, topics.dlq, 3)
    fixed = make_settings()
    args = parser().parse_args(["replay-dlq", "--reason", "no_ml_app", "--quiet"])
    async with running_service(fixed):
        assert await cmd_replay(fixed, args) == 0
        assert "read 3, replayed 2, skipped 1" in capsys.readouterr().out
        await eventually(lambda: len(intake.accepted_metrics()), expect=1, what="the replayed pair")
        assert await cmd_replay(fixed, args) == 0
        assert "read 0, replayed 0" in capsys.readouterr().out
        await asyncio.sleep(1)
    (metric,) = intake.accepted_metrics()
    assert (metric["ml_app"], metric["label"]) == ("nemos-demo", "relevance")


async def test_sweep_lists_then_publishes_due_sides(make_settings: Callable[..., Settings], topics: Topics,
                                                    producer: AIOKafkaProducer, kafka: KafkaBroker,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """sweep lists sides past their deadline without touching them; --publish reports them."""
    settings = make_settings(join_ttl_seconds=1, sweep_interval_seconds=3600)
    async with running_service(settings):
        await send_json(producer, topics.span, SPAN)
        await asyncio.sleep(2)  # consumed and buffered; the service's own sweep waits an hour
    assert await cmd_sweep(settings, parser().parse_args(["sweep"])) == 0
    listing = capsys.readouterr().out
    assert "due  nemos-demo/q-1  span" in listing and "1 side(s) due" in listing
    assert await cmd_sweep(settings, parser().parse_args(["sweep", "--publish"])) == 0
    assert "reported 1" in capsys.readouterr().out
    (report,) = await read_topic(kafka.bootstrap_servers, topics.unmatched, 1)
    assert orjson.loads(report.value)["reason"] == "span_without_result"
    assert await cmd_sweep(settings, parser().parse_args(["sweep"])) == 0
    assert "0 side(s) due" in capsys.readouterr().out
