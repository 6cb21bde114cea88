"""Redis commands onto the wire in C: redis-py's asyncio connections with hiredis's command packer.

redis-py's synchronous connections pack commands with ``hiredis.pack_command`` when hiredis is
installed; its asyncio connections still pack in Python (redis-py issue 4176), one bytes join per
argument. The store's batch scripts send thousands of arguments per call (every key and field of
500 sides), and that packing was 12% of the service's CPU in a throughput drain. :func:`packed_by_hiredis`
gives a connection class the synchronous client's packer, with the same arguments to the same bytes
(``tests/unit/test_redis_wire.py``); anything hiredis does not take goes to redis-py's own packer,
which raises redis-py's error for it.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from hiredis import pack_command as _hiredis_pack
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection

_C = TypeVar("_C", bound=AbstractConnection)
_PACKED: dict[type[Any], type[Any]] = {}


class _HiredisPacking(AbstractConnection):
    """``pack_command`` by hiredis, where redis-py's synchronous connection uses it too."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):  # 'CONFIG GET': the words of a command name go as separate arguments
            words: tuple[Any, ...] = tuple(first.encode().split())
        elif isinstance(first, bytes) and b" " in first:
            words = tuple(first.split())
        else:
            words = (first,)
        encoder = self.encoder
        if encoder.encoding == "utf-8" and encoder.encoding_errors == "strict":
            try:
                return [_hiredis_pack(words + args[1:])]
            except TypeError:  # a bool, None, a memoryview...: redis-py's packer converts it or refuses it
                pass
        return super().pack_command(*args)


def packed_by_hiredis(connection_class: type[_C]) -> type[_C]:
    """``connection_class`` (TCP, TLS, UNIX socket, Sentinel-managed) packing its commands with hiredis."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    if connection_class not in _PACKED:
        _PACKED[connection_class] = type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})
    return cast(type[_C], _PACKED[connection_class])


def pack_with_hiredis(client: Redis | RedisCluster) -> None:
    """Make every connection ``client`` opens from now on pack its commands with hiredis.

    A cluster client must not have connected yet: its startup nodes and the nodes it will discover
    take the class, connections already open keep theirs.
    """
    if isinstance(client, RedisCluster):
        manager = client.nodes_manager
        manager.connection_kwargs["connection_class"] = packed_by_hiredis(
            manager.connection_kwargs.get("connection_class", Connection))
        for node in manager.startup_nodes.values():
            node.connection_class = packed_by_hiredis(node.connection_class)
    else:
        pool = client.connection_pool
        pool.connection_class = packed_by_hiredis(pool.connection_class)
