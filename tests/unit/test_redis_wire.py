"""Commands packed by hiredis go on the wire as redis-py's own packer writes them, or fail as it fails."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.exceptions import DataError

from consumer.redis_wire import _HiredisPacking, pack_with_hiredis, packed_by_hiredis

pytestmark = pytest.mark.unit

PROPERTY = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ours = packed_by_hiredis(Connection)()
theirs = Connection()

arguments = st.one_of(
    st.text(), st.binary(max_size=9000),  # past redis-py's 6,000-byte buffer cutoff
    st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.floats(allow_nan=True),
    st.text(st.characters(codec="utf-8"), max_size=20),
)
names = st.sampled_from(["EVALSHA", "GET", b"SET", "CONFIG GET", b"SCRIPT LOAD", "ZADD"])


def _wire(connection: Connection, args: tuple[Any, ...]) -> bytes:
    return b"".join(bytes(part) for part in connection.pack_command(*args))


@PROPERTY
@given(names, st.lists(arguments, max_size=40))
def test_the_same_arguments_give_the_same_bytes(name: str | bytes, args: list[Any]) -> None:
    """Strings, bytes, integers and floats, any number of them and of any size, pack to redis-py's bytes."""
    assert _wire(ours, (name, *args)) == _wire(theirs, (name, *args))


@pytest.mark.parametrize("odd", [True, None, object(), [b"x"]])
def test_what_redis_py_refuses_is_refused_the_same_way(odd: Any) -> None:
    """A bool, None or another type is redis-py's DataError, not a hiredis TypeError."""
    with pytest.raises(DataError):
        theirs.pack_command("SET", "k", odd)
    with pytest.raises(DataError):
        ours.pack_command("SET", "k", odd)


def test_a_string_redis_py_cannot_encode_fails_the_same_way() -> None:
    """A lone surrogate is not UTF-8: both raise UnicodeEncodeError."""
    for connection in (theirs, ours):
        with pytest.raises(UnicodeEncodeError):
            connection.pack_command("SET", "k", "\ud800")


def test_memoryviews_and_bytearrays_pack_as_their_bytes() -> None:
    """What hiredis does not take goes through redis-py's packer."""
    args = ("SET", memoryview(b"key"), bytearray(b"value"))
    assert _wire(ours, args) == _wire(theirs, args)


def test_another_encoding_uses_redis_pys_packer() -> None:
    """A client configured for another encoding keeps redis-py's encoder."""
    latin = packed_by_hiredis(Connection)(encoding="latin-1")
    assert _wire(latin, ("SET", "k", "é")) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"


def test_every_connection_kind_keeps_its_class_and_gets_one_packer() -> None:
    """TLS, UNIX socket and Sentinel connections stay what they are; wrapping twice changes nothing."""
    for kind in (Connection, SSLConnection, UnixDomainSocketConnection, SentinelManagedConnection):
        packed = packed_by_hiredis(kind)
        assert issubclass(packed, kind)
        assert packed_by_hiredis(packed) is packed
        assert packed_by_hiredis(kind) is packed


async def test_clients_open_packed_connections() -> None:
    """A standalone client's pool and a cluster client's nodes, present and discovered later, use the packer."""
    standalone = Redis.from_url("rediss://127.0.0.1:1/0")
    pack_with_hiredis(standalone)
    assert issubclass(standalone.connection_pool.connection_class, SSLConnection)
    assert issubclass(standalone.connection_pool.connection_class, _HiredisPacking)
    await standalone.aclose()
    cluster = RedisCluster(host="127.0.0.1", port=1)
    pack_with_hiredis(cluster)
    manager = cluster.nodes_manager
    assert all(issubclass(node.connection_class, _HiredisPacking) for node in manager.startup_nodes.values())
    assert issubclass(manager.connection_kwargs["connection_class"], _HiredisPacking)
    await cluster.aclose()
