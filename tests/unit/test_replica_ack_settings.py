"""REDIS_WAIT_REPLICAS and REDIS_WAIT_TIMEOUT_MS: off by default, bounded, and kept below the socket timeout."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from consumer.config import Settings, config_errors

pytestmark = pytest.mark.unit


def refusal(**values: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    return config_errors(caught.value)


def test_replica_acknowledgement_is_off_by_default() -> None:
    """No WAIT unless asked for: a Redis without replicas keeps working as before."""
    settings = Settings()
    assert (settings.redis_wait_replicas, settings.redis_wait_timeout_ms) == (0, 1000)


def test_the_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the README and the chart name are the ones read."""
    monkeypatch.setenv("REDIS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("REDIS_WAIT_TIMEOUT_MS", "250")
    settings = Settings()
    assert (settings.redis_wait_replicas, settings.redis_wait_timeout_ms) == (2, 250)


@pytest.mark.parametrize(("values", "variable"), [
    ({"redis_wait_replicas": -1}, "REDIS_WAIT_REPLICAS"),
    ({"redis_wait_replicas": 17}, "REDIS_WAIT_REPLICAS"),
    ({"redis_wait_timeout_ms": 0}, "REDIS_WAIT_TIMEOUT_MS"),  # WAIT 0 would block for ever
    ({"redis_wait_timeout_ms": 4001}, "REDIS_WAIT_TIMEOUT_MS"),  # past the client's 5 s socket timeout
])
def test_out_of_range_values_are_refused_by_name(values: dict[str, Any], variable: str) -> None:
    """A replica count or timeout out of range stops the start, naming the variable."""
    assert variable in refusal(**values)


def test_a_wait_longer_than_the_urls_socket_timeout_is_refused() -> None:
    """A socket_timeout in REDIS_URL at or below the WAIT timeout would cut every WAIT that waits."""
    url = "redis://:hunter2@redis:6379/0?socket_timeout=0.5"
    text = refusal(redis_url=url, redis_wait_replicas=1, redis_wait_timeout_ms=500)
    assert "REDIS_WAIT_TIMEOUT_MS (500) must be below the socket_timeout in REDIS_URL" in text
    assert "hunter2" not in text
    assert Settings(redis_url=url, redis_wait_replicas=1, redis_wait_timeout_ms=400).redis_wait_timeout_ms == 400
    assert Settings(redis_url=url, redis_wait_timeout_ms=900).redis_wait_replicas == 0  # off: no WAIT to cut
