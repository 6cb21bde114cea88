"""The join store on Redis or Redis Cluster: :class:`RedisJoinStore`.

One Lua script per check-and-store, so any number of consumer replicas can race on one join key
safely. Every key of one join key shares a hash tag, so each script touches a single slot and the
same code runs on a Redis Cluster. Deadlines live in sharded sorted sets (the deadline index), swept
in batches by :mod:`consumer.expiry`; keyspace notifications are never used.

Keys, for ``prefix`` (default ``evj``) and tag ``{<ml_app>:<join key>}``, or ``{<ml_app>:<join key>:<run>}``
when the events name a run (each part percent-encoded):

========================  =====================================================================
``prefix:{tag}:s``        the span: string ``<joined 0|1><trace_id:span_id>\\n<body>``, or, once results
                          joined it without a run, ``b<book>\\x1e<trace_id:span_id>\\n<body>`` (lua/book.lua)
``prefix:{tag}:r``        results waiting for a span, or taken and not delivered: hash event_id -> record
                          (``\\x02<slots>\\x1e<record>`` without a run)
``prefix:{tag}:o``        the span the current one replaced (the key's earlier answer, without a run), as ``s``
``prefix:{tag}:d``        delivery ledger: hash eval_id -> ``d`` | ``x`` | ``c|owner|lease_until``
``prefix:{tag}:x``        sides whose deadline passed, kept until their report is published
``prefix:{dlN}:idx``      deadline index shard N: sorted set member -> deadline (ms)
``prefix:{dlN}:lock``     sweeper lock of shard N
``prefix:{ackN}``         replica acknowledgement marker (only with ``wait_replicas``), one per primary
``prefix:{use}:use``      usage hash (single Redis): ``s:<app>`` sides, ``b:<app>`` bytes per ml_app (lua/usage.lua)
``prefix:{uN}:use``       the same on a Redis Cluster, one per hash slot: ``uN`` hashes to the slot of the
                          namespaces it counts, so each script updates it with theirs, exactly
``prefix:{use}:slots``    (Redis Cluster) the slots whose usage hash may hold counts
========================  =====================================================================

Per-app usage (``AppQuotas``) is exact on both: every script that stores or drops a side counts it in
the same atomic call. On a single Redis the quota is checked against that count in the same call, so
no app stores a side that would wait once it holds its quota. On a Redis Cluster an app's sides spread
over every slot, so its total is the sum of the slots' hashes: each store reads it at most every
:data:`QUOTA_REFRESH_S` and refuses the app's new waiting sides once it is used up; in between, an app
can exceed its quota by what it writes in that time (the counts stay exact; only the refusal lags).
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import os
import re
import time
import traceback
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import REDIS_CLUSTER_HASH_SLOTS
from redis.exceptions import AskError, BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consumer import records
from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.errors import DependencyError, Misconfigured, RedisOutOfMemory, Unavailable, redis_errors
from consumer.metrics import Metrics
from consumer.redis_wire import pack_with_hiredis
from consumer.store import (
    SLOT_CHARS,
    AppQuotas,
    AppUsage,
    ClaimVerdict,
    DueSide,
    ExpireOutcome,
    KeyState,
    Namespace,
    ResultOp,
    ResultPut,
    Settle,
    SpanOp,
    SpanPut,
    result_digest,
)

RedisClient = Redis | RedisCluster

log = structlog.get_logger(__name__)

_SEP = "\x1f"  # cannot occur in a tag: tags are percent-encoded

# Every command must end. redis-py before 8 has no socket timeout by default, and then a connection that
# died silently (a half-open connection after a partition or a lost NAT entry) stalls the consumer for
# good; redis-py 8's defaults, made explicit here. A ``socket_timeout`` in the URL takes precedence.
SOCKET_TIMEOUTS: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}


@dataclass(frozen=True)
class SentinelTarget:
    """A primary found through Redis Sentinel: where the sentinels are, and the name they monitor it by.

    ``options`` are for the sentinels themselves (``username``, ``password``, ``ssl``, ``ssl_ca_certs``);
    the primary's own credentials are :func:`connect`'s options, as with a URL.
    """

    sentinels: tuple[tuple[str, int], ...]
    master: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """``'<master>' via sentinels host:port,...``: for logs and ``check`` (no credentials)."""
        return f"{self.master!r} via sentinels " + ",".join(f"{host}:{port}" for host, port in self.sentinels)


class _SentinelPrimary(Redis):
    """The client of a Sentinel-monitored primary; closing it also closes its clients of the sentinels."""

    sentinel_manager: Sentinel  # (``sentinel`` is the name of Redis's SENTINEL command)
    master_name: str

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            await self.sentinel_manager.aclose()


async def connect(target: str | SentinelTarget, *, cluster: bool = False, max_connections: int = 64,
                  **options: Any) -> RedisClient:
    """A client for ``target``, a Redis URL or a :class:`SentinelTarget`; a cluster client is initialised before use.

    ``options`` (``username``, ``password``, ``ssl_ca_certs``, and ``ssl`` with sentinels) go to the client of
    the data nodes as given; what a URL itself holds takes precedence over them.

    Initialising first matters: concurrent scripts on a lazily initialised asyncio cluster client
    fail intermittently (redis-py issue 3935).

    With sentinels, every new connection asks them for the primary's address first, and a connection error
    or a READONLY reply (the primary turned replica) drops the connection, so a failover is followed on the
    next attempt (redis-py's ``SentinelConnectionPool``). The store bounds the commands in flight below
    ``max_connections``, so this pool, which does not wait for a free connection, never runs out.
    """
    options = {**SOCKET_TIMEOUTS, **options}
    if isinstance(target, SentinelTarget):
        if cluster:
            raise ValueError("a Sentinel-monitored primary is not a Redis Cluster")
        # One try per sentinel and per discovery: the list of sentinels is the redundancy, and the data
        # connection's own retries (redis-py's default) ask all of them again.
        sentinel_options = {**SOCKET_TIMEOUTS, "retry": Retry(NoBackoff(), 0), **target.options}
        sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_options,  # type: ignore[no-untyped-call]
                            **options)
        client: _SentinelPrimary = sentinel.master_for(target.master, redis_class=_SentinelPrimary,
                                                       max_connections=max_connections)
        client.sentinel_manager, client.master_name = sentinel, target.master
        pack_with_hiredis(client)
        return client
    if cluster:
        cluster_client = RedisCluster.from_url(target, max_connections=max_connections, **options)
        pack_with_hiredis(cluster_client)
        await cluster_client.initialize()
        return cluster_client
    # from_pool: the client owns the pool and closes its connections on aclose().
    standalone = Redis.from_pool(BlockingConnectionPool.from_url(target, max_connections=max_connections, timeout=30,
                                                                 **options))
    pack_with_hiredis(standalone)
    return standalone


async def close(client: RedisClient) -> None:
    """Close ``client``; a connection whose server went silent is given up on, not an error.

    Closing a TLS connection waits for the server's close_notify, which a half-open or blackholed
    connection never sends: redis-py then raises ``TimeoutError`` after ``socket_connect_timeout``
    (a plaintext close does not wait). The socket is closed anyway (asyncio aborts it at the end of
    its TLS shutdown timeout) and every write the store made was acknowledged before, so a stop goes
    on to close the other clients and exits 0 instead of 1.
    """
    try:
        await client.aclose()
    except (RedisError, OSError) as exc:
        log.warning("redis_close_incomplete", error=f"{type(exc).__name__}: {exc}")


async def sentinel_primary(client: RedisClient) -> tuple[str, int] | None:
    """The address the sentinels give for the primary now, for a client made from a :class:`SentinelTarget`; else None.

    Raises redis-py's ``MasterNotFoundError`` (a ``ConnectionError``) when no sentinel names a healthy primary.
    """
    if not isinstance(client, _SentinelPrimary):
        return None
    host, port = await client.sentinel_manager.discover_master(client.master_name)
    return str(host), int(port)


# -- a Redis that can never work: a certificate that does not verify, REDIS_URL leading to a replica ---


def url_address(url: str) -> str:
    """``host:port`` of a Redis URL (its path for a UNIX socket), for messages: never the whole URL, which may
    hold the password."""
    parts = urlsplit(url)
    if not parts.hostname:
        return parts.path
    try:
        port = parts.port or 6379
    except ValueError:  # not a number: redis-py refuses it when it connects
        return parts.hostname
    return f"{parts.hostname}:{port}"


@dataclass(frozen=True)
class Replication:
    """What ``INFO replication`` says of one Redis: its ``role`` (``master`` or ``slave``) and, for a replica,
    the address of its primary as the replica reports it (``master_host:master_port``)."""

    role: str
    primary: str | None = None

    @property
    def is_primary(self) -> bool:
        return self.role == "master"


async def replication(client: Redis) -> Replication:
    """``INFO replication`` of the one Redis ``client`` talks to; redis-py's errors pass unchanged."""
    info = await client.info("replication")
    host, port = info.get("master_host"), info.get("master_port")
    return Replication(str(info.get("role")), None if host is None else f"{host}:{port}")


def replica_refusal(where: str, found: Replication) -> str:
    """Why a REDIS_URL leading to a replica cannot work, and what to do: the words of ``check`` and of the start."""
    of = f"a replica of {found.primary}" if found.primary else "a replica"
    return (f"REDIS_URL leads to {where}, which answers as {found.role!r} ({of}): every write would fail with "
            f"READONLY; point REDIS_URL at the primary{f' ({found.primary})' if found.primary else ''}, or, when "
            "Redis Sentinel manages it, set REDIS_SENTINELS and REDIS_SENTINEL_MASTER instead")


async def check_usable(client: RedisClient, target: str | SentinelTarget) -> None:
    """At start, before the store reads or writes: raise :class:`Misconfigured` (exit code 2, naming the setting)
    for what about Redis can never work.

    That is a TLS certificate that does not verify (REDIS_SSL_CAFILE or the host, see
    :func:`consumer.errors.translate_redis`), and a REDIS_URL leading to a replica, which refuses every
    write. The primary of a Sentinel target or of a cluster is not asked its role: their clients follow
    the primary. A Redis not reachable now, or refusing the command (credentials, an ACL), passes: the
    stages wait for it and report a refusal.
    """
    if isinstance(client, RedisCluster):  # connected already: connect() initialised it (redis-py chains the cause)
        return
    try:
        with redis_errors():
            if not isinstance(target, str):
                await client.ping()
                return
            found = await replication(client)
    except Misconfigured:
        raise
    except DependencyError:
        return
    if not found.is_primary:
        raise Misconfigured("redis", "REDIS_URL", replica_refusal(url_address(target), found))


# -- memory -------------------------------------------------------------------------------------------
# The store keeps every buffered side and ledger entry until its deadline: a Redis that evicts keys under memory
# pressure drops joins and re-sends evaluations without a word. With noeviction a full Redis refuses writes
# instead (OOM), and the service holds the stream, retrying, until memory frees.

EVICTING_POLICIES = ("allkeys-", "volatile-")  # allkeys-lru|lfu|random, volatile-lru|lfu|random|ttl
EVICTION_HINT = ("set maxmemory-policy to noeviction (then a full Redis refuses writes and the service waits, "
                 "unready, losing nothing), or set REDIS_ALLOW_EVICTION=true to run anyway and accept the loss")


@dataclass(frozen=True)
class EvictionPolicy:
    """The ``maxmemory-policy`` of the Redis (every primary of a cluster), as far as the server would say."""

    policies: frozenset[str]  # empty: neither CONFIG GET nor INFO answered
    source: str  # "INFO memory", "CONFIG GET", or why neither answered

    @property
    def evicting(self) -> list[str]:
        return sorted(p for p in self.policies if p.startswith(EVICTING_POLICIES))

    @property
    def known(self) -> bool:
        return bool(self.policies)

    def describe(self) -> str:
        names = ", ".join(sorted(self.policies)) or "unknown"
        return f"maxmemory-policy {names} (from {self.source})"


def _policy_values(reply: Any, field_name: str) -> set[str]:
    """``field_name`` from a CONFIG GET or INFO reply: one node's dict, or a cluster's dict of them per node."""
    if not isinstance(reply, dict):
        return set()
    values = [reply[field_name]] if field_name in reply else [
        node[field_name] for node in reply.values() if isinstance(node, dict) and field_name in node]
    return {value.decode() if isinstance(value, bytes) else str(value) for value in values}


async def eviction_policy(client: RedisClient) -> EvictionPolicy:
    """What ``maxmemory-policy`` Redis runs with (on a cluster, every primary's): ``INFO memory``, else
    ``CONFIG GET`` (managed Redis services often disable CONFIG, and an ACL user may lack it).
    A refusal of both, or a Redis not reachable, gives an unknown policy (the source says why); never raises."""
    nodes: dict[str, Any] = {"target_nodes": RedisCluster.PRIMARIES} if isinstance(client, RedisCluster) else {}
    why = []
    # INFO first: the ACL the README gives allows it and not CONFIG (a refusal would be in Redis's ACL log).
    for source, field_name in (("INFO memory", "maxmemory_policy"), ("CONFIG GET", "maxmemory-policy")):
        try:
            with redis_errors():
                reply = await (client.config_get("maxmemory-policy", **nodes) if source == "CONFIG GET"
                               else client.info("memory", **nodes))
        except DependencyError as exc:  # refused (an ACL), an unknown command (renamed), unreachable at start
            why.append(f"{source}: {exc.detail}")
            if exc.retriable:
                break  # not reachable now: not to be waited for here (the stages wait for Redis)
            continue
        found = _policy_values(reply, field_name)
        if found:
            return EvictionPolicy(frozenset(found), source)
        why.append(f"{source}: no {field_name}")
    return EvictionPolicy(frozenset(), "; ".join(why))


def check_eviction(policy: EvictionPolicy, *, allow: bool) -> None:
    """At start: refuse an evicting policy (:class:`Misconfigured`, exit code 2) unless ``allow``; then warn loudly.
    A policy Redis would not tell is warned about, not refused."""
    if not policy.known:
        log.warning("redis_eviction_policy_unknown", why=policy.source,
                    hint="check that maxmemory-policy is noeviction: an evicting policy loses buffered sides")
        return
    if not policy.evicting:
        return
    detail = (f"Redis runs with {policy.describe()}: under memory pressure it drops buffered sides and delivery "
              "ledger entries, so joins are lost and evaluations sent twice, without an error")
    if not allow:
        raise Misconfigured("redis", "REDIS_ALLOW_EVICTION", f"{detail}; {EVICTION_HINT}")
    log.error("redis_evicts_keys", policy=policy.evicting, source=policy.source, detail=detail,
              allowed_by="REDIS_ALLOW_EVICTION=true")


class MemoryAlarm:
    """Whether Redis refuses writes for want of memory now: for ``/readyz``, one log line each way, and metrics.

    Set by any call refused with OOM; cleared when sides are stored again (:meth:`RedisJoinStore.put_many`), not by
    any call that succeeds: deleting commands (a sweep's unlock) succeed on a full Redis.
    """

    def __init__(self, metrics: Metrics | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._metrics = metrics
        self._clock = clock
        self._since: float | None = None
        self._error = ""

    def refused(self, error: RedisOutOfMemory) -> None:
        if self._metrics is not None:
            self._metrics.redis_oom_refusals.inc()
            self._metrics.redis_out_of_memory.set(1)
        if self._since is None:
            self._since = self._clock.monotonic()
            self._error = error.detail
            log.error("redis_out_of_memory", error=error.detail,
                      hint="Redis is at maxmemory (noeviction) and refuses writes: the batch is held and retried, "
                           "nothing is committed or dead-lettered; free memory or raise maxmemory")

    def succeeded(self) -> None:
        if self._since is None:
            return
        log.info("redis_memory_available_again", after_s=round(self._clock.monotonic() - self._since, 1))
        self._since = None
        if self._metrics is not None:
            self._metrics.redis_out_of_memory.set(0)

    def reason(self) -> str | None:
        if self._since is None:
            return None
        return (f"redis is out of memory for {self._clock.monotonic() - self._since:.0f} s and refuses writes "
                f"({self._error}); the stream is held until memory frees")


ITEMS_PER_CALL = 1000  # per batch-script call on a single Redis: a default batch (500 records) takes one call
QUOTA_REFRESH_S = 1.0  # on a Redis Cluster, how old the per-app totals the quota is checked against may be


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """Per cluster hash slot, a short hash tag (``u<hex>``) in that slot: where the slot's usage hash lives.

    Redis hashes a key's tag with CRC16/XMODEM, which is binascii's ``crc_hqx`` (about 0.2 s, once).
    """
    tags: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    left, i = REDIS_CLUSTER_HASH_SLOTS, 0
    while left:
        tag = f"u{i:x}"
        slot = binascii.crc_hqx(tag.encode(), 0) % REDIS_CLUSTER_HASH_SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            left -= 1
        i += 1
    return tuple(tag for tag in tags if tag is not None)


def _slot(ns: Namespace) -> int:
    return binascii.crc_hqx(ns.tag.encode(), 0) % REDIS_CLUSTER_HASH_SLOTS


_INCLUDE = re.compile(r'^--- @include "(\w+)"$', re.MULTILINE)


def _lua(name: str) -> str:
    return resources.files("consumer").joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")


def _script(name: str) -> str:
    """A script's source, with each line ``--- @include "<name>"`` replaced by the file ``lua/<name>.lua``."""
    return _INCLUDE.sub(lambda match: _lua(match[1]), _lua(name))


# -- script inputs ----------------------------------------------------------------------------------
# Each script's header lists its KEYS and ARGV by name. A batch script's are written by the method
# ``_<script>_input`` of RedisJoinStore, another script's where it is called (once each): from named
# fields, in the order of the header; nothing else knows an offset.


class _Item(NamedTuple):
    """One item of a batch script's call: its namespace (a cluster call holds one only), its KEYS and its ARGV."""

    ns: Namespace
    keys: list[str]
    args: list[Any]


def _counted(values: Sequence[str]) -> list[Any]:
    """A list as the batch scripts' ``arg_reader`` reads it back (``next_list``): its length, then its values."""
    return [len(values), *values]


def _parse_span(stored: bytes | None) -> tuple[bytes, bytes, bytes | None]:
    """A stored span (lua/book.lua's parse_span): its flag, its book, and identity, "\\n", body."""
    if stored is None:
        return b"", b"", None
    if stored[:1] != b"b":
        return stored[:1], b"", stored[1:]
    book, _, rest = stored[1:].partition(b"\x1e")
    return b"b", book, rest


def _parse_pending(value: bytes) -> tuple[bytes | None, bytes]:
    """A pending value (lua/book.lua's parse_pending): its slots (None if stored without) and the record."""
    if value[:1] != b"\x02":
        return None, value
    slots, _, record = value[1:].partition(b"\x1e")
    return slots, record


def _book_results(book: bytes) -> set[bytes]:
    """The digests of the results a book names."""
    return {book[i + SLOT_CHARS:i + 2 * SLOT_CHARS] for i in range(0, len(book), 2 * SLOT_CHARS)}


@contextmanager
def _redis_calls() -> Iterator[None]:
    """:func:`~consumer.errors.redis_errors`, and a connection torn down under a command in flight as what it is.

    redis-py's asyncio connections can raise ``AttributeError`` or ``TypeError`` instead of a connection
    error when one task's command meets a connection another task (or the peer) just closed: seen when a
    Redis Cluster primary was SIGKILLed mid-stream, where it stopped the process (redis-py issue 4287
    describes the same kind). Raised with redis-py's connection code innermost, it is a lost connection:
    :class:`~consumer.errors.Unavailable`, and the batch is done again. Anywhere else it stays a defect.
    """
    with redis_errors():
        try:
            yield
        except (AttributeError, TypeError) as exc:
            in_redis_py = [frame.filename for frame in traceback.extract_tb(exc.__traceback__)
                           if f"{os.sep}redis{os.sep}" in frame.filename]
            if not in_redis_py or not in_redis_py[-1].endswith(_REDIS_CONNECTION_CODE):
                raise
            raise Unavailable("redis", f"connection closed under a command ({type(exc).__name__}: {exc})") from exc


_REDIS_CONNECTION_CODE = f"{os.sep}redis{os.sep}asyncio{os.sep}connection.py"  # the innermost redis-py frame


def _check_acknowledged(ack: ReplicaAck, reply: Any, where: str) -> None:
    """``WAIT``'s reply: enough replicas, or :class:`~consumer.errors.Unavailable` (the batch is done again)."""
    if int(reply) < ack.replicas:
        raise Unavailable("redis", f"WAIT: {int(reply)} of {ack.replicas} replicas acknowledged the writes{where} "
                                   f"within {ack.timeout_ms} ms (REDIS_WAIT_REPLICAS)")


# -- idle connections after a lost one ---------------------------------------------------------------
# A connection that dies silently (half-open: a NAT or firewall that lost its state, a Redis whose keepalive
# dropped it during a partition) is found dead only when a command waits out the socket timeout on it. The
# others opened before then are likely dead the same way, and redis-py would let each cost its own timeout
# when next used (the pool is a stack: a busier moment reaches deeper into it). So once a command times out
# or loses its connection, the idle connections of that pool are closed: they reconnect when next taken.


def _lost_connection(exc: BaseException) -> bool:
    """A command's failure that says the path to the server may be dead: a timeout or a connection error.
    Not ``BusyLoadingError`` (a ``ConnectionError`` for redis-py, but the server answered)."""
    if isinstance(exc, BusyLoadingError):
        return False
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError))


async def _drop_idle(idle: Collection[Any]) -> int:
    """Close every connection of ``idle`` (a pool's list of idle connections) that is still idle and open.

    Each is checked and closed with no await in between, so none taken meanwhile by another task is closed
    under its command; it stays in the pool, and connects again when next taken. ``nowait``: a TLS close
    would wait for the server's close_notify, which a dead connection never sends. Returns how many.
    """
    dropped = 0
    for connection in list(idle):
        if connection in idle and connection.is_connected:
            await connection.disconnect(nowait=True)
            dropped += 1
    return dropped


async def drop_idle_connections(client: RedisClient, node: ClusterNode | None = None) -> int:
    """Close the idle connections of ``client``'s pool (a Sentinel-monitored primary's too), or of one cluster
    ``node``'s; the connections in use are left to their commands. Returns how many were closed.

    A cluster client has no pool of its own, only one per node: without ``node`` nothing is closed (redis-py's
    cluster client closes the idle connections of a node a command failed on itself).
    """
    idle: Collection[Any]
    if node is not None:
        idle = node._free
    elif isinstance(client, Redis):
        idle = client.connection_pool._available_connections
    else:
        return 0
    dropped = await _drop_idle(idle)
    if dropped:
        log.info("redis_idle_connections_dropped", count=dropped, node=node.name if node is not None else None,
                 why="a command timed out or lost its connection: connections opened before may be dead too")
    return dropped


async def _node_failed(cluster: RedisCluster, node: ClusterNode, error: BaseException) -> None:
    """What redis-py's cluster client does after a node failed a command sent to it directly: try it last, read
    the slots again and, if the connection was lost, close that node's idle connections (only that node's)."""
    cluster.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
    cluster._initialize = True  # redis-py's own flag: read the cluster's slots before the next command
    if _lost_connection(error):
        await drop_idle_connections(cluster, node)


def _node_of(cluster: RedisCluster, key: str) -> ClusterNode:
    node = cluster.get_node_from_key(key)
    if node is None:
        raise Unavailable("redis", f"no node serves the slot of {key!r}")
    return node


def _member(op: SpanOp | ResultOp) -> str:
    """A side's name in the deadline index: what :meth:`RedisJoinStore.due` reads back into a :class:`DueSide`."""
    return f"s{_SEP}{op.ns.tag}" if isinstance(op, SpanOp) else f"r{_SEP}{op.ns.tag}{_SEP}{op.event_id}"


@dataclass(frozen=True)
class ReplicaAck:
    """Wait for replicas to acknowledge every buffered write and ledger record before it counts as stored.

    Redis replicates asynchronously: a primary answers a write before any replica has it, so a failover
    after that answer loses the write (a buffered side that never joins, a ledger entry that lets an
    evaluation go again). With a ``ReplicaAck``, :meth:`RedisJoinStore.put_many` and
    :meth:`RedisJoinStore.settle_many` return only once ``replicas`` replicas acknowledged their writes,
    and raise :class:`~consumer.errors.Unavailable` (the batch is done again) when fewer did within
    ``timeout_ms``: the offsets of that batch are not committed.

    How: ``WAIT`` counts the replicas that acknowledged the last write *of its own connection*, so each
    primary that got writes is sent a marker write (``SET prefix:{ackN}``) and ``WAIT`` on one
    connection, after the batch's writes. The replication stream is ordered, so a replica that has the
    marker has every write before it, whichever connection made them, including the writes of an
    earlier try of the batch whose ``WAIT`` fell short (done again, they may change nothing, and then
    the connection that does them again has no write of its own to wait for). On a single Redis or a
    Sentinel-monitored primary the writes, the marker and ``WAIT`` are one pipeline on one connection;
    on a Redis Cluster the marker and ``WAIT`` go to each primary that got writes, right after them (a
    failover completed within that gap is not covered: it takes the cluster's node timeout).
    """

    replicas: int
    timeout_ms: int


ACK_MARKER_TTL_MS = 600_000  # a marker is one small key per primary, rewritten by every acknowledged batch


class RedisJoinStore:
    """:class:`~consumer.store.JoinStore`, :class:`~consumer.store.DeadlineIndex` and
    :class:`~consumer.store.Inspectable` on Redis or Redis Cluster."""

    def __init__(self, client: RedisClient, *, prefix: str = "evj", shards: int = 16,
                 ledger_retention_ms: int, max_concurrency: int = 32, max_pending_results: int = 0,
                 memory: MemoryAlarm | None = None, replica_ack: ReplicaAck | None = None,
                 quotas: AppQuotas | None = None) -> None:
        self._client = client
        self.memory = memory or MemoryAlarm()
        self._ack = replica_ack if replica_ack is not None and replica_ack.replicas > 0 else None
        self._markers: dict[str, str] = {}  # cluster: primary's name -> a marker key in one of its slots
        self._cluster = isinstance(client, RedisCluster)
        self._quotas = quotas or AppQuotas()
        self._used_up: frozenset[str] = frozenset()  # cluster: apps (as in their tag) over their quota, last read
        self._used_up_read = -float("inf")  # when (monotonic seconds)
        self._slots_known: set[int] = set()  # cluster: slots this store registered in the slots set
        # Results that may wait for one join key's span (0: no limit); a result over it is refused ("full").
        self._max_pending = max_pending_results
        # At most this many commands in flight, so that a large batch never exhausts the client's pool.
        self._slots = asyncio.Semaphore(max_concurrency)
        self._prefix = prefix
        self.shards = shards
        self._retention_ms = ledger_retention_ms
        register = client.register_script
        self._put: AsyncScript = register(_script("put_batch"))
        self._claim: AsyncScript = register(_script("claim_batch"))
        self._settle: AsyncScript = register(_script("settle_batch"))
        self._expire: AsyncScript = register(_script("expire_side"))
        self._unindex: AsyncScript = register(_script("unindex"))
        self._unlock: AsyncScript = register(_script("unlock"))

    # Every Redis call goes through _calling, which also drops the pool's idle connections after a lost one.

    @asynccontextmanager
    async def _calling(self, *, memory: bool = True) -> AsyncIterator[None]:
        """A slot (at most ``max_concurrency`` calls), redis-py's errors translated, and after a timeout or a
        connection error the idle connections dropped (:func:`drop_idle_connections`): a dead path costs one
        socket timeout, not one per pooled connection. With ``memory``, an OOM refusal sets :attr:`memory`."""
        async with self._slots:
            try:
                with _redis_calls():
                    try:
                        yield
                    except BaseException as exc:
                        if _lost_connection(exc):
                            await drop_idle_connections(self._client)
                        raise
            except RedisOutOfMemory as exc:
                if memory:
                    self.memory.refused(exc)
                raise

    async def _call(self, script: AsyncScript, *, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async with self._calling():
            return await script(keys=keys, args=args)

    async def _bounded(self, command: Awaitable[Any]) -> Any:
        async with self._calling(memory=False):
            return await command

    async def _pipelined(self, queue: Callable[[Any], Awaitable[None] | None]) -> list[Any]:
        """One round trip: ``queue(pipe)`` queues the commands, their replies come back in order."""
        async with self._calling():
            pipe = self._client.pipeline(transaction=False)
            queued = queue(pipe)
            if queued is not None:
                await queued
            return list(await pipe.execute())

    # -- keys ---------------------------------------------------------------------------------

    def _key(self, ns: Namespace, suffix: str) -> str:
        return f"{self._prefix}:{{{ns.tag}}}:{suffix}"

    def shard_of(self, ns: Namespace) -> int:
        return zlib.crc32(ns.tag.encode()) % self.shards

    def index_key(self, shard: int) -> str:
        return f"{self._prefix}:{{dl{shard}}}:idx"

    def lock_key(self, shard: int) -> str:
        return f"{self._prefix}:{{dl{shard}}}:lock"

    def _side_keys(self, ns: Namespace) -> list[str]:
        base = f"{self._prefix}:{{{ns.tag}}}:"  # what _key(ns, suffix) begins with, built once
        return [base + "s", base + "r", base + "x", base + "o"]

    async def _index_many(self, entries: Sequence[tuple[Namespace, str, int]]) -> None:
        """Deadline-index entries (namespace, member, deadline), in one pipelined round trip."""
        if not entries:
            return

        def queue(pipe: Any) -> None:
            for ns, member, deadline_ms in entries:
                # GT: a redelivered side never pulls a deadline earlier; a republished one may push it later.
                pipe.zadd(self.index_key(self.shard_of(ns)), {member: deadline_ms}, gt=True)

        await self._pipelined(queue)

    def _usage_key(self, ns: Namespace) -> str:
        """The usage hash that counts ``ns``'s sides (lua/usage.lua): the only one, or its slot's on a cluster."""
        if self._cluster:
            return f"{self._prefix}:{{{_slot_tags()[_slot(ns)]}}}:use"
        return f"{self._prefix}:{{use}}:use"

    def _slots_key(self) -> str:
        return f"{self._prefix}:{{use}}:slots"

    async def _run_batched(self, script: AsyncScript, head: list[Any], items: Sequence[_Item], *,
                           acknowledged: bool = False, usage: bool = False) -> list[Any]:
        """Run a batch script over items: one reply per item, in item order.

        With ``usage``, each call gets one more key, last: the usage hash of its items (lua/usage.lua).

        A batch script takes the keys of all its items, then ``head`` and the args of all its items,
        handles the items in order and returns one reply per item; so a batch costs one command, not
        one per record (redis-py spends about 70 us of CPU per command). On a single Redis the items
        go in calls of at most ``ITEMS_PER_CALL`` (no call holds Redis for long), pipelined in one
        round trip. On a cluster every key of a call must share a slot: one call per namespace, with
        that namespace's items in order, and namespaces concurrently (at most ``max_concurrency``).

        ``acknowledged`` (with a :class:`ReplicaAck`): the calls, the marker and ``WAIT`` in one pipeline on a
        single Redis; on a cluster the caller acknowledges (:meth:`_acknowledge_cluster`) once its writes are done.
        """
        if not items:
            return []

        def keys_args(chosen: Sequence[_Item]) -> tuple[list[str], list[Any]]:
            keys = [k for item in chosen for k in item.keys]
            if usage:
                keys.append(self._usage_key(chosen[0].ns))  # a cluster call holds one namespace
            return keys, [*head, *(a for item in chosen for a in item.args)]

        if self._cluster:
            groups: dict[Namespace, list[int]] = {}
            for i, item in enumerate(items):
                groups.setdefault(item.ns, []).append(i)
            replies: list[Any] = [None] * len(items)

            async def one_namespace(indexes: list[int]) -> None:
                keys, args = keys_args([items[i] for i in indexes])
                for i, reply in zip(indexes, await self._call(script, keys=keys, args=args), strict=True):
                    replies[i] = reply

            await asyncio.gather(*(one_namespace(indexes) for indexes in groups.values()))
            return replies
        chunks = [items[i:i + ITEMS_PER_CALL] for i in range(0, len(items), ITEMS_PER_CALL)]
        ack = self._ack if acknowledged else None
        if len(chunks) == 1 and ack is None:
            keys, args = keys_args(chunks[0])
            return list(await self._call(script, keys=keys, args=args))

        async def queue(pipe: Any) -> None:
            for chunk in chunks:
                keys, args = keys_args(chunk)
                await script(keys=keys, args=args, client=pipe)  # queued; the pipeline loads missing scripts
            if ack is not None:
                pipe.set(self._marker_key(0), "1", px=ACK_MARKER_TTL_MS)
                pipe.execute_command("WAIT", ack.replicas, ack.timeout_ms)

        results = await self._pipelined(queue)
        if ack is not None:
            _check_acknowledged(ack, results[-1], "")
            results = results[:-2]
        return [reply for result in results for reply in result]

    # -- replica acknowledgement (ReplicaAck) -----------------------------------------------------

    def _marker_key(self, n: int) -> str:
        return f"{self._prefix}:{{ack{n}}}"

    def _cluster_marker(self, cluster: RedisCluster, node: ClusterNode) -> str:
        """A marker key in one of ``node``'s slots (found once, looked for again when the slots moved)."""
        known = self._markers.get(node.name)
        if known is not None and _node_of(cluster, known).name == node.name:
            return known
        for n in range(100_000):  # 16384 slots: a primary of even a few slots has one among the first tries
            key = self._marker_key(n)
            if _node_of(cluster, key).name == node.name:
                self._markers[node.name] = key
                return key
        raise Unavailable("redis", f"no marker key found in the slots of {node.name}")

    async def _acknowledge_cluster(self, written: Sequence[str]) -> None:
        """With a :class:`ReplicaAck` on a cluster: the marker and ``WAIT`` on each primary holding a ``written`` key.

        Each goes to the node itself on one of its connections, without redis-py's redirection and retry,
        which could send ``WAIT`` on another connection than its marker: any failure is the batch's.
        """
        if self._ack is None or not isinstance(self._client, RedisCluster) or not written:
            return
        cluster, ack = self._client, self._ack
        nodes = {node.name: node for node in (_node_of(cluster, key) for key in written)}

        async def one(node: ClusterNode) -> None:
            commands = [PipelineCommand(0, "SET", self._cluster_marker(cluster, node), "1", "PX", ACK_MARKER_TTL_MS),
                        PipelineCommand(1, "WAIT", ack.replicas, ack.timeout_ms)]
            async with self._slots:
                with _redis_calls():
                    try:
                        await node.execute_pipeline(commands)
                    except (RedisError, OSError, TimeoutError) as exc:
                        await _node_failed(cluster, node, exc)
                        raise
                    for command in commands:
                        if isinstance(command.result, BaseException):  # a reply's timeout lands here too
                            await _node_failed(cluster, node, command.result)  # MOVED, READONLY, ...
                            if isinstance(command.result, AskError):  # (MovedError too): slots moved
                                raise Unavailable("redis", f"{type(command.result).__name__}: {command.result}")
                            raise command.result
            _check_acknowledged(ack, commands[1].result, f" on {node.name}")

        await asyncio.gather(*(one(node) for node in nodes.values()))

    # -- join -----------------------------------------------------------------------------------

    async def put_many(self, ops: Sequence[SpanOp | ResultOp]) -> list[SpanPut | ResultPut]:
        """Many sides in one round trip (two on a cluster), in order per namespace.

        A stored side is entered in the deadline index by its own script, atomically. On a cluster
        the index lives in another slot, so it is written afterwards: a crash in between leaves the
        message uncommitted, and its redelivery (status "duplicate") indexes it then.
        """
        in_script = not self._cluster
        if self._cluster:
            await self._register_slots(ops)
            if self._quotas.enabled and time.monotonic() - self._used_up_read >= QUOTA_REFRESH_S:
                await self._read_used_up()
        replies = await self._run_batched(self._put, *self._put_batch_input(ops, with_index=in_script),
                                          acknowledged=True, usage=True)
        puts: list[SpanPut | ResultPut] = []
        index: list[tuple[Namespace, str, int]] = []
        for op, reply in zip(ops, replies, strict=True):
            member = _member(op)
            status = reply[0].decode()
            if isinstance(op, SpanOp):
                if status == "conflict":
                    puts.append(SpanPut("conflict", {}, reply[1]))
                    continue
                if status == "quota":
                    puts.append(SpanPut("quota", {}))
                    continue
                index.append((op.ns, member, op.deadline_ms))
                flat = reply[1]
                puts.append(SpanPut(status, {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}))
            elif status == "joined":
                puts.append(ResultPut("joined", reply[1]))
            elif status in ("full", "tagged", "quota", "later") or (op.by_tag and status == "duplicate"):  # not stored
                puts.append(ResultPut(status))
            else:
                index.append((op.ns, member, op.deadline_ms))
                puts.append(ResultPut(status))
        if not in_script:
            await self._index_many(index)
            await self._acknowledge_cluster([self._key(op.ns, "s") for op in ops] +
                                            [self.index_key(self.shard_of(ns)) for ns, _, _ in index])
        if ops:
            self.memory.succeeded()  # sides stored: Redis takes writes again (a delete alone would succeed when full)
        return puts

    def _put_batch_input(self, ops: Sequence[SpanOp | ResultOp], *, with_index: bool) -> tuple[list[Any], list[_Item]]:
        """put_batch.lua's ARGV keys_per_side and max_pending, and per side its KEYS and ARGV."""
        items = []
        for op in ops:
            # span, pending, expiring, replaced, ledger: _key(op.ns, suffix), its beginning built once
            base = f"{self._prefix}:{{{op.ns.tag}}}:"
            keys = [base + "s", base + "r", base + "x", base + "o", base + "d"]
            if with_index:
                keys.append(self.index_key(self.shard_of(op.ns)))
            if isinstance(op, SpanOp):
                args: list[Any] = ["s", op.identity, op.record, op.deadline_ms, _member(op)]
                if op.by_tag:
                    args[0] = "S"
                    args.append("1" if op.ns.run else "b")
            else:
                args = ["t" if op.by_tag else "r", op.event_id, op.record, op.deadline_ms, _member(op),
                        *_counted(op.eval_ids), "".join(op.slots)]
            items.append(_Item(op.ns, keys, args))
        quotas = self._quotas
        own: list[Any] = []
        for app in dict.fromkeys(op.ns.ml_app for op in ops):
            tag = quote(app, safe="")
            if tag in self._used_up:
                own += [tag, -1, -1]
            elif app in quotas.per_app:
                own += [tag, *quotas.of(app)]
        return [6 if with_index else 5, self._max_pending, quotas.sides, quotas.bytes, *_counted(own)], items

    async def _register_slots(self, ops: Sequence[SpanOp | ResultOp]) -> None:
        """Cluster: name the slots these ops may count sides in, before any is counted, so a reader finds them."""
        new = {_slot(op.ns) for op in ops} - self._slots_known
        if new:
            await self._bounded(self._client.sadd(self._slots_key(), *sorted(new)))
            self._slots_known |= new

    async def _read_used_up(self) -> None:
        """Cluster: which apps hold their quota now, from the sum of the slots' usage hashes."""
        used_up = set()
        for app, usage in (await self.app_usage()).items():
            max_sides, max_bytes = self._quotas.of(app)
            if (max_sides and usage.sides >= max_sides) or (max_bytes and usage.bytes >= max_bytes):
                used_up.add(quote(app, safe=""))
        self._used_up, self._used_up_read = frozenset(used_up), time.monotonic()

    async def app_usage(self) -> dict[str, AppUsage]:
        if self._cluster:
            slots = [int(slot) for slot in await self._bounded(self._client.smembers(self._slots_key()))]
            tags = _slot_tags()

            def queue(pipe: Any) -> None:
                for slot in slots:
                    pipe.hgetall(f"{self._prefix}:{{{tags[slot]}}}:use")

            hashes = await self._pipelined(queue) if slots else []
        else:
            hashes = [await self._bounded(self._client.hgetall(f"{self._prefix}:{{use}}:use"))]
        sides: dict[str, int] = {}
        size: dict[str, int] = {}
        for counts in hashes:
            for raw_field, raw_value in counts.items():
                kind, _, app = raw_field.decode().partition(":")
                total = sides if kind == "s" else size
                total[unquote(app)] = total.get(unquote(app), 0) + int(raw_value)
        return {app: AppUsage(count, size.get(app, 0)) for app, count in sides.items() if count > 0}

    async def oldest_pending(self, per_shard: int) -> dict[str, int]:
        sides = [side for shard in range(self.shards) for side in await self.due(shard, 2**62, per_shard)]

        def queue(pipe: Any) -> None:
            for side in sides:
                if side.event_id is None:
                    pipe.getrange(self._key(side.namespace, "s"), 0, 0)
                else:
                    pipe.hexists(self._key(side.namespace, "r"), side.event_id)

        earliest: dict[str, int] = {}
        for side, state in zip(sides, await self._pipelined(queue) if sides else [], strict=True):
            waiting = state == b"0" if side.event_id is None else bool(state)
            app = side.namespace.ml_app
            if waiting and side.deadline_ms < earliest.get(app, 2**62):
                earliest[app] = side.deadline_ms
        return earliest

    # -- delivery ledger -------------------------------------------------------------------------

    async def claim_many(self, requests: Sequence[tuple[Namespace, Sequence[str]]], *, owner: str, now_ms: int,
                         lease_ms: int) -> list[list[ClaimVerdict]]:
        """Claims for many namespaces in one round trip; verdicts per request."""
        replies: list[list[bytes]] = await self._run_batched(
            self._claim, *self._claim_batch_input(requests, owner=owner, now_ms=now_ms, lease_ms=lease_ms))
        return [[verdict.decode() for verdict in reply] for reply in replies]  # type: ignore[misc]

    def _claim_batch_input(self, requests: Sequence[tuple[Namespace, Sequence[str]]], *, owner: str, now_ms: int,
                           lease_ms: int) -> tuple[list[Any], list[_Item]]:
        """claim_batch.lua's ARGV owner, now_ms, lease_ms and retention_ms, and per request its ledger and eval_ids."""
        return ([owner, now_ms, lease_ms, self._retention_ms],
                [_Item(ns, [self._key(ns, "d")], _counted(eval_ids)) for ns, eval_ids in requests])

    async def settle_many(self, requests: Sequence[Settle]) -> None:
        """Settles for many namespaces in one round trip."""
        await self._run_batched(self._settle, *self._settle_batch_input(requests), acknowledged=True, usage=True)
        await self._acknowledge_cluster([self._key(request.ns, "d") for request in requests])

    def _settle_batch_input(self, requests: Sequence[Settle]) -> tuple[list[Any], list[_Item]]:
        """settle_batch.lua's ARGV retention_ms, and per request its ledger, pending hash and three lists."""
        return [self._retention_ms], [
            _Item(r.ns, [self._key(r.ns, "d"), self._key(r.ns, "r")],
                  [*_counted(r.delivered), *_counted(r.dead_lettered), *_counted(r.drop_event_ids)])
            for r in requests]

    async def ping(self) -> bool:
        return bool(await self._bounded(self._client.ping()))

    # -- expiry ---------------------------------------------------------------------------------

    async def due(self, shard: int, now_ms: int, limit: int) -> list[DueSide]:
        rows: list[tuple[bytes, float]] = await self._bounded(self._client.zrangebyscore(
            self.index_key(shard), "-inf", now_ms, start=0, num=limit, withscores=True
        ))
        sides = []
        for raw_member, score in rows:
            member = raw_member.decode()
            kind, _, rest = member.partition(_SEP)
            tag, _, event_id = rest.partition(_SEP)
            sides.append(DueSide(shard, member, int(score), Namespace.from_tag(tag),
                                 event_id if kind == "r" else None))
        return sides

    async def expire(self, side: DueSide) -> ExpireOutcome:
        # expire_side.lua: KEYS span, pending, expiring; ARGV kind and, for a result, event_id.
        args = ["s"] if side.event_id is None else ["r", side.event_id]
        keys = [*self._side_keys(side.namespace), self._usage_key(side.namespace)]
        reply: list[Any] = await self._call(self._expire, keys=keys, args=args)
        verdict = reply[0].decode()
        return ExpireOutcome(verdict, reply[1] if len(reply) > 1 else None)

    async def forget(self, side: DueSide) -> None:
        field = "s" if side.event_id is None else f"r:{side.event_id}"
        await self._bounded(self._client.hdel(self._key(side.namespace, "x"), field))
        await self._call(self._unindex, keys=[self.index_key(side.shard)], args=[side.member, side.deadline_ms])

    async def postpone(self, side: DueSide, deadline_ms: int) -> None:
        await self._bounded(self._client.zadd(self.index_key(side.shard), {side.member: deadline_ms}, xx=True, gt=True))

    async def try_lock(self, shard: int, token: str, ttl_ms: int) -> bool:
        return bool(await self._bounded(self._client.set(self.lock_key(shard), token, nx=True, px=ttl_ms)))

    async def unlock(self, shard: int, token: str) -> None:
        await self._call(self._unlock, keys=[self.lock_key(shard)], args=[token])

    async def index_size(self) -> tuple[int, int | None]:
        total, earliest = 0, None
        for shard in range(self.shards):
            key = self.index_key(shard)
            total += int(await self._bounded(self._client.zcard(key)))
            first: list[tuple[bytes, float]] = await self._bounded(self._client.zrange(key, 0, 0, withscores=True))
            if first and (earliest is None or first[0][1] < earliest):
                earliest = int(first[0][1])
        return total, earliest

    async def oldest(self, count: int) -> list[DueSide]:
        sides: list[DueSide] = []
        for shard in range(self.shards):
            sides.extend(await self.due(shard, 2**62, count))
        return sorted(sides, key=lambda side: side.deadline_ms)[:count]

    # -- inspection (operators' CLI) ------------------------------------------------------------

    async def lookup(self, ns: Namespace) -> KeyState:
        stored: bytes | None = await self._bounded(self._client.get(self._key(ns, "s")))
        replaced: bytes | None = await self._bounded(self._client.get(self._key(ns, "o")))
        pending, ledger, expiring = [
            {k.decode(): v for k, v in (await self._bounded(self._client.hgetall(self._key(ns, suffix)))).items()}
            for suffix in ("r", "d", "x")]
        flag, book, span = _parse_span(stored)
        _, replaced_book, replaced_span = _parse_span(replaced)
        taken = _book_results(book + replaced_book)
        waiting = []
        for event_id, value in list(pending.items()):
            slots, pending[event_id] = _parse_pending(value)
            if slots is not None and result_digest(event_id).encode() not in taken:
                waiting.append(event_id)
        return records.key_state(ns, span=span, span_joined=flag in (b"1", b"b"), pending=pending,
                                 ledger={k: v.decode() for k, v in ledger.items()}, being_reported=expiring,
                                 replaced_span=replaced_span, waiting=waiting)

    async def census(self) -> dict[str, dict[str, int]]:
        """Scans every key of the prefix."""
        counts: dict[str, dict[str, int]] = {}
        async for raw in self._client.scan_iter(match=f"{self._prefix}:{{*}}:[sr]", count=1000):
            key = raw.decode()
            tag = key[key.index("{") + 1: key.rindex("}")]
            entry = counts.setdefault(Namespace.from_tag(tag).ml_app, {"spans": 0, "results": 0})
            if key.endswith(":s"):
                entry["spans"] += 1
            else:
                entry["results"] += int(await self._bounded(self._client.hlen(key)))
        return counts

    async def delivery_state(self, ns: Namespace, eval_id: str) -> str | None:
        value: bytes | None = await self._bounded(self._client.hget(self._key(ns, "d"), eval_id))
        return None if value is None else value.decode()
