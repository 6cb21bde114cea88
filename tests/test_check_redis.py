"""``check`` and the start refuse a Redis the service can never use, and say what to change.

Against real servers: a TLS-only redis-server whose certificate REDIS_SSL_CAFILE does not verify (the
file is a second throwaway CA's), and REDIS_URL naming the replica of a Redis Sentinel set (a primary
and one replica), which would refuse every write with READONLY.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumer.cli import cmd_check
from consumer.config import Settings
from consumer.errors import Misconfigured
from consumer.service import Service
from consumer.store_redis import RedisJoinStore, connect
from consumer.store_redis import close as close_redis
from localenv.redis import RedisSentinelSet, RedisServer
from localenv.tls import make_certificates

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[RedisServer]:
    with RedisServer(tls=True) as server:
        yield server


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA of its own, which did not sign the server's certificate."""
    return make_certificates(tmp_path_factory.mktemp("other-ca")).ca_file


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[RedisSentinelSet]:
    with RedisSentinelSet(replicas=1) as started:
        yield started


async def test_a_certificate_another_ca_signed_fails_check_naming_redis_ssl_cafile(
        tls_redis: RedisServer, other_ca: Path, make_settings: Callable[..., Settings],
        capsys: pytest.CaptureFixture[str]) -> None:
    """``check`` fails on the certificate, naming REDIS_SSL_CAFILE and quoting the TLS library's reason."""
    settings = make_settings(redis_url=tls_redis.base_url, redis_ssl_cafile=str(other_ca))
    assert await cmd_check(settings) == 1
    out = capsys.readouterr().out
    assert ("FAIL redis   the Redis server's TLS certificate does not verify (self-signed certificate in certificate "
            "chain): set REDIS_SSL_CAFILE to the CA certificate that signed it") in out, out
    assert "CERTIFICATE_VERIFY_FAILED" in out, out


async def test_the_store_and_the_start_refuse_an_unverified_certificate_at_once(
        tls_redis: RedisServer, other_ca: Path, make_settings: Callable[..., Settings]) -> None:
    """The store's first call raises Misconfigured (not retriable) within a second instead of an outage retried
    for ever, and the start refuses with it (exit code 2); with the CA that signed the certificate, both work."""
    for ca_file, verified in ((other_ca, False), (tls_redis.ca_file, True)):
        settings = make_settings(redis_url=tls_redis.base_url, redis_ssl_cafile=str(ca_file))
        client = await connect(settings.redis_target(), **settings.redis_client_options())
        store = RedisJoinStore(client, prefix="tls-probe", shards=1, ledger_retention_ms=60_000)
        try:
            if verified:
                assert await store.ping()
                continue
            began = time.monotonic()
            with pytest.raises(Misconfigured) as refused:
                await store.ping()
            assert time.monotonic() - began < 1.0
            assert refused.value.setting == "REDIS_SSL_CAFILE" and not refused.value.retriable
        finally:
            await close_redis(client)
        with pytest.raises(Misconfigured) as at_start:
            async with Service.open(settings):
                pass
        assert at_start.value.setting == "REDIS_SSL_CAFILE" and "CERTIFICATE_VERIFY_FAILED" in at_start.value.detail


async def test_a_replica_in_redis_url_fails_check_and_the_start_naming_its_primary(
        sentinel_set: RedisSentinelSet, make_settings: Callable[..., Settings],
        capsys: pytest.CaptureFixture[str]) -> None:
    """REDIS_URL at the replica: ``check`` fails with the replica's role and the primary it reports
    (``master_host:master_port``), and the start refuses with the same words, naming REDIS_URL."""
    primary = sentinel_set.primary_port
    (replica,) = [port for port in sentinel_set.node_ports if port != primary]
    settings = make_settings(redis_url=f"redis://127.0.0.1:{replica}/0")
    expected = (f"REDIS_URL leads to 127.0.0.1:{replica}, which answers as 'slave' (a replica of 127.0.0.1:{primary}): "
                f"every write would fail with READONLY; point REDIS_URL at the primary (127.0.0.1:{primary})")
    assert await cmd_check(settings) == 1
    out = capsys.readouterr().out
    assert f"FAIL redis   {expected}" in out, out
    with pytest.raises(Misconfigured) as at_start:
        async with Service.open(settings):
            pass
    assert at_start.value.setting == "REDIS_URL" and expected in at_start.value.detail
    assert await cmd_check(make_settings(redis_url=f"redis://127.0.0.1:{primary}/0")) == 0, capsys.readouterr().out
