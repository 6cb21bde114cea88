"""The Redis Sentinel settings: what they accept, what they refuse and why, and the clients' options they make."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from consumer.config import Settings, config_errors, parse_sentinels
from consumer.store_redis import SentinelTarget

pytestmark = pytest.mark.unit

SENTINEL: dict[str, Any] = {"redis_sentinels": "s1:26379,s2:26380", "redis_sentinel_master": "mymaster"}


def refusal(**values: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)
    return config_errors(caught.value)


@pytest.mark.parametrize(("text", "addresses"), [
    ("s1:26379,s2:26380", (("s1", 26379), ("s2", 26380))),
    (" s1:1 , 10.0.0.2:65535 ", (("s1", 1), ("10.0.0.2", 65535))),
    ("redis-node-0.redis-headless", (("redis-node-0.redis-headless", 26379),)),
    ("[::1]:26380,[fd00::2]", (("::1", 26380), ("fd00::2", 26379))),
])
def test_sentinel_addresses_are_read_as_host_and_port(text: str, addresses: tuple[tuple[str, int], ...]) -> None:
    """Addresses are host:port separated by commas, IPv6 in brackets, and a missing port is Sentinel's 26379."""
    assert parse_sentinels(text) == addresses


@pytest.mark.parametrize(("text", "says"), [
    ("s1:26379,,s2:26379", "empty entry"),
    ("s1:port", "the port must be a number from 1 to 65535"),
    ("s1:0", "the port must be a number from 1 to 65535"),
    ("s1:", "the port must be a number from 1 to 65535"),
    ("::1:26379", "write an IPv6 address in brackets"),
    ("[::1:26379", "is not [address]:port"),
    (":26379", "is not host:port"),
    ("s1:26379,s1:26379", "names a sentinel twice"),
])
def test_a_malformed_sentinel_address_is_named(text: str, says: str) -> None:
    """Each malformed entry is refused with a message naming it and what is wrong."""
    assert says in refusal(redis_sentinels=text, redis_sentinel_master="m")


@pytest.mark.parametrize(("values", "says"), [
    ({"redis_sentinels": "s1:26379"}, "REDIS_SENTINELS needs REDIS_SENTINEL_MASTER"),
    ({"redis_sentinel_master": "m"}, "REDIS_SENTINEL_MASTER without REDIS_SENTINELS"),
    ({"redis_sentinel_tls": True, "redis_sentinel_password": "p"},
     "REDIS_SENTINEL_PASSWORD, REDIS_SENTINEL_TLS without REDIS_SENTINELS"),
    ({**SENTINEL, "redis_cluster": True}, "REDIS_SENTINELS and REDIS_CLUSTER=true exclude each other"),
    ({**SENTINEL, "redis_url": "redis://redis-master:6379/0"}, "REDIS_SENTINELS and REDIS_URL exclude each other"),
    ({**SENTINEL, "redis_sentinel_username": "watcher"}, "REDIS_SENTINEL_USERNAME needs REDIS_SENTINEL_PASSWORD"),
    ({**SENTINEL, "redis_ssl_cafile": "/ca.pem"}, "REDIS_SSL_CAFILE is set but REDIS_SENTINEL_TLS is false"),
    ({**SENTINEL, "redis_sentinel_master": "my master"}, "REDIS_SENTINEL_MASTER"),
])
def test_sentinel_combinations_that_cannot_work_are_refused(values: dict[str, Any], says: str) -> None:
    """Incomplete or conflicting Sentinel settings are refused at start with what to change, never guessed at."""
    assert says in refusal(**values)


def test_sentinel_settings_make_the_sentinels_and_the_primarys_options_apart() -> None:
    """Sentinel credentials go to the sentinels, REDIS_USERNAME/PASSWORD to the primary, TLS and the CA to both."""
    settings = Settings(**SENTINEL, redis_sentinel_username="watcher", redis_sentinel_password="sentinel-secret",
                        redis_sentinel_tls=True, redis_ssl_cafile="/etc/ca.pem", redis_username="evaljoin",
                        redis_password="data-secret")
    assert settings.redis_target() == SentinelTarget(
        (("s1", 26379), ("s2", 26380)), "mymaster",
        {"username": "watcher", "password": "sentinel-secret", "ssl": True, "ssl_ca_certs": "/etc/ca.pem"})
    assert settings.redis_client_options() == {"username": "evaljoin", "password": "data-secret", "ssl": True,
                                               "ssl_ca_certs": "/etc/ca.pem"}
    assert {"sentinel-secret", "data-secret"} <= set(settings.secrets())


def test_without_sentinels_the_url_is_the_target() -> None:
    """With no sentinels nothing changes: REDIS_URL is what the client connects to, TLS is its scheme."""
    settings = Settings(redis_url="rediss://redis:6380/0", redis_ssl_cafile="/etc/ca.pem")
    assert settings.redis_target() == "rediss://redis:6380/0"
    assert settings.redis_client_options() == {"ssl_ca_certs": "/etc/ca.pem"}
