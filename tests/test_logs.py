"""Logs are structured events, and secrets never appear in them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from consumer.config import Settings
from consumer.logs import configure_logging

pytestmark = pytest.mark.unit  # no server: part of the seconds-long tier

SECRET = "dd-api-key-5f1e0c2b9a"
REDIS_PASSWORD = "redis-pass-77aa"


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Production logging to the captured stderr (configured in the test's own phase), restored after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    saved_structlog = structlog.get_config()
    try:
        yield capsys
    finally:
        root.handlers[:], root.level = saved
        structlog.configure(**saved_structlog)


def configure() -> None:
    settings = Settings(dd_api_key=SECRET, redis_url=f"redis://default:{REDIS_PASSWORD}@127.0.0.1:1/0",
                        dd_llmobs_agentless_enabled=True)
    configure_logging(level="INFO", fmt="json", secrets=settings.secrets())


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_secret_values_are_redacted_everywhere(json_logs: pytest.CaptureFixture[str]) -> None:
    """A configured secret is replaced in values, nested values, exceptions and library log lines."""
    configure()
    log = structlog.get_logger("test")
    log.warning("event", url=f"https://x/?k={SECRET}", nested={"list": [SECRET, REDIS_PASSWORD]})
    try:
        raise RuntimeError(f"auth failed for {SECRET}")
    except RuntimeError:
        log.exception("failed")
    logging.getLogger("aiokafka").warning("connecting with password %s", REDIS_PASSWORD)
    output = json_logs.readouterr().err
    assert output.count("[redacted]") >= 5
    assert SECRET not in output and REDIS_PASSWORD not in output


def test_secret_named_fields_are_redacted(json_logs: pytest.CaptureFixture[str]) -> None:
    """Fields named like secrets are redacted even when their value is not a configured secret."""
    configure()
    structlog.get_logger("test").info("config", api_key="abc", sasl_password="def", topic="t")
    (event,) = lines(json_logs)
    assert (event["api_key"], event["sasl_password"], event["topic"]) == ("[redacted]", "[redacted]", "t")


def test_events_carry_level_timestamp_and_bound_context(json_logs: pytest.CaptureFixture[str]) -> None:
    """Each line is one JSON event with ISO UTC time, level, and the per-message context bound once."""
    configure()
    with structlog.contextvars.bound_contextvars(topic="spans", partition=3, offset=17):
        structlog.get_logger("test").info("message_joined", status="joined")
    (event,) = lines(json_logs)
    assert event["event"] == "message_joined" and event["level"] == "info"
    assert (event["topic"], event["partition"], event["offset"]) == ("spans", 3, 17)
    assert str(event["timestamp"]).endswith("Z")
