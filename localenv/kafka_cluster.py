"""A three-node Apache Kafka cluster (KRaft) on 127.0.0.1, each node both broker and controller.

Production runs Kafka replicated: topics with replication factor 3 and ``min.insync.replicas=2``, so
an acknowledged write (``acks=all``) is on at least two brokers and survives losing any one of them.
:class:`KafkaCluster` is that, from the same Maven Central jars as :class:`~localenv.kafka.KafkaBroker`:
three JVMs whose controllers form one static KRaft quorum (``controller.quorum.voters``), each with its
own ports and data directory, each killable and restartable on its own. It also answers the two
questions a fault scenario asks before it strikes: which broker leads which partition
(:meth:`KafkaCluster.aleaders`, a metadata request) and which node is the active controller
(:meth:`KafkaCluster.aquorum`, Kafka's DescribeQuorum request, which a broker forwards to the quorum,
as ``kafka-metadata-quorum describe --status`` does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields

from localenv._process import LocalService, log_tail
from localenv.kafka import KafkaBroker, _new_cluster_id, _probe_broker, _run_coroutine, ensure_jars
from localenv.ports import free_ports

__all__ = ["ClusterNode", "KafkaCluster", "PartitionState", "QuorumState"]

METADATA_TOPIC = "__cluster_metadata"
"""KRaft's metadata log: its leader is the active controller."""

OFFSETS_TOPIC = "__consumer_offsets"
_BIND_ATTEMPTS = 3


@dataclass(frozen=True)
class PartitionState:
    """One partition as the metadata says: its leader (-1: none), its replicas and its in-sync replicas."""

    topic: str
    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    @property
    def in_sync(self) -> bool:
        return self.leader >= 0 and set(self.isr) == set(self.replicas)


@dataclass(frozen=True)
class QuorumState:
    """The KRaft quorum as its leader reports it: the active controller (``leader_id``), its epoch, the voters."""

    leader_id: int
    leader_epoch: int
    high_watermark: int
    voters: dict[int, int]  # node id -> the end offset of its copy of the metadata log


class _DescribeQuorumResponse_v0(Response):  # type: ignore[misc]  # aiokafka ships no types
    API_KEY = 55
    API_VERSION = 0
    SCHEMA = Schema(
        ("error_code", Int16),
        ("topics", CompactArray(
            ("topic_name", CompactString("utf-8")),
            ("partitions", CompactArray(
                ("partition_index", Int32),
                ("error_code", Int16),
                ("leader_id", Int32),
                ("leader_epoch", Int32),
                ("high_watermark", Int64),
                ("current_voters", CompactArray(("replica_id", Int32), ("log_end_offset", Int64),
                                                ("tags", TaggedFields))),
                ("observers", CompactArray(("replica_id", Int32), ("log_end_offset", Int64), ("tags", TaggedFields))),
                ("tags", TaggedFields),
            )),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _DescribeQuorumRequest_v0(RequestStruct):  # type: ignore[misc]
    """Kafka's DescribeQuorum (KIP-595), version 0: aiokafka has no such request, and v0 is all it takes here."""

    FLEXIBLE_VERSION = True
    API_KEY = 55
    API_VERSION = 0
    RESPONSE_TYPE = _DescribeQuorumResponse_v0
    SCHEMA = Schema(
        ("topics", CompactArray(
            ("topic_name", CompactString("utf-8")),
            ("partitions", CompactArray(("partition_index", Int32), ("tags", TaggedFields))),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _DescribeQuorumRequest(Request[_DescribeQuorumRequest_v0]):  # type: ignore[misc]
    API_KEY = 55

    def build(self, request_struct_class: type[_DescribeQuorumRequest_v0]) -> _DescribeQuorumRequest_v0:
        return request_struct_class([(METADATA_TOPIC, [(0, {})], {})], {})


class ClusterNode(KafkaBroker):
    """One node of a :class:`KafkaCluster`: a :class:`KafkaBroker` with its node id, fixed ports and the cluster's
    quorum and replication settings. Its own :meth:`kill`, :meth:`restart` (SIGTERM first when it runs: a controlled
    shutdown) and :attr:`running` work as a single broker's; :meth:`stop` keeps its data (the cluster owns it)."""

    def __init__(self, cluster: KafkaCluster, node_id: int, *, data_dir: Path, heap: str,
                 extra_properties: dict[str, str], cache_dir: Path | None, startup_timeout: float,
                 proxied_port: int | None = None) -> None:
        super().__init__(data_dir=data_dir, heap=heap, extra_properties=extra_properties, cache_dir=cache_dir,
                         startup_timeout=startup_timeout, proxied_port=proxied_port)
        self.NODE_ID = node_id
        self._cluster = cluster

    @property
    def node_id(self) -> int:
        return self.NODE_ID

    @property
    def proxied_port(self) -> int:
        """The port this node's PROXIED listener advertises (where its fault proxy listens)."""
        if self._proxied_port is None:
            raise RuntimeError("the cluster has no PROXIED listeners (proxied=False)")
        return self._proxied_port

    def _assign_ports(self, port: int, controller_port: int, proxied_listener_port: int | None) -> None:
        self._port, self._controller_port = port, controller_port
        self._proxied_listener_port = proxied_listener_port

    def _begin(self) -> None:
        """What :meth:`KafkaBroker.start` does up to starting the JVM, without waiting for it: the cluster starts
        every node before any can be ready (a controller needs a majority of the voters to elect a leader)."""
        self._libs = self._cluster._libs
        self._data_dir = self._requested_data_dir.resolve() if self._requested_data_dir else None
        assert self._data_dir is not None
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn()

    def _storage_cluster_id(self) -> str:
        return self._cluster.cluster_id

    def _jvm_properties(self) -> list[str]:
        # Three JVMs share the machine: the C1 compiler alone and the serial collector halve a node's (re)start
        # on two cores (about 7 s instead of 15 after a SIGKILL), which is most of what a failover test waits for.
        return ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", *super()._jvm_properties()]

    def _properties(self) -> dict[str, str]:
        props = super()._properties()
        replicas = str(len(self._cluster.nodes))
        min_isr = str(self._cluster.min_insync_replicas)
        props.update({
            "node.id": str(self.node_id),
            "controller.quorum.voters": self._cluster.quorum_voters,
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replicas,
            # 50 by default: three replicas of each on a 2-core test machine make every start and failover slow.
            "offsets.topic.num.partitions": "6",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "unclean.leader.election.enable": "false",
            # Leadership goes back to the preferred replica after a restart within seconds, not Kafka's 5 minutes:
            # one more leader change while traffic flows, as a real cluster has after every rolling restart.
            "leader.imbalance.check.interval.seconds": "10",
        })
        props.update(self._extra_properties)
        return props


class KafkaCluster(LocalService):
    """Three (``size``) Kafka nodes on 127.0.0.1, each broker and controller, in one KRaft quorum.

    What callers may assume once :meth:`start` has returned:

    * :attr:`bootstrap_servers` lists every node's PLAINTEXT address; every node answers and every node is
      registered with the controller.
    * Topics get replication factor ``size`` by default (auto-created ones too, with 4 partitions), the
      brokers' ``min.insync.replicas`` is ``min_insync_replicas`` (2), unclean leader election is off; the
      internal topics (consumer offsets, transactions) are replicated the same way.
    * Each node keeps its ports and data directory across :meth:`ClusterNode.kill` and
      :meth:`ClusterNode.restart`; :meth:`node` gives a node by id (1 to ``size``).
    * :meth:`aleaders` and :meth:`aquorum` ask the cluster who leads what; :meth:`await_in_sync` waits until
      every replica is back in sync (what a rolling restart waits for between nodes).
    * With ``proxied=True`` each node also has a PROXIED listener (see :class:`~localenv.kafka.KafkaBroker`)
      that advertises :attr:`ClusterNode.proxied_port`: a fault proxy there forwarding to the node's
      :attr:`~localenv.kafka.KafkaBroker.proxied_listener_port` carries every connection of a client
      bootstrapped at :attr:`proxied_bootstrap_servers`. Both ports stay the same across restarts.

    ``heap`` is each JVM's ``-Xmx``. :meth:`stop` stops every node and removes the temporary data directory
    (a ``data_dir`` passed in is kept).
    """

    def __init__(self, *, size: int = 3, min_insync_replicas: int = 2, heap: str = "256m",
                 data_dir: Path | None = None, extra_properties: dict[str, str] | None = None,
                 cache_dir: Path | None = None, startup_timeout: float = 120.0, proxied: bool = False) -> None:
        if size < 1 or not 1 <= min_insync_replicas <= size:
            raise ValueError(f"need 1 <= min_insync_replicas ({min_insync_replicas}) <= size ({size})")
        self.min_insync_replicas = min_insync_replicas
        self.cluster_id = _new_cluster_id()
        self._size = size
        self._heap = heap
        self._requested_data_dir = data_dir
        self._extra_properties = dict(extra_properties or {})
        self._cache_dir = cache_dir
        self._startup_timeout = startup_timeout
        self._proxied = proxied
        self._data_dir: Path | None = None
        self._libs: Path | None = None
        self.nodes: list[ClusterNode] = []

    @property
    def bootstrap_servers(self) -> str:
        """Every node's ``127.0.0.1:<port>``, comma-separated. Only valid after :meth:`start`."""
        if not self.nodes:
            raise RuntimeError("KafkaCluster has not been started")
        return ",".join(node.bootstrap_servers for node in self.nodes)

    @property
    def proxied_bootstrap_servers(self) -> str:
        """Every node's proxy address (``proxied=True``): a client bootstrapped here only ever crosses the proxies."""
        if not self.nodes or not self._proxied:
            raise RuntimeError("KafkaCluster has no PROXIED listeners (proxied=False, or not started)")
        return ",".join(f"127.0.0.1:{node.proxied_port}" for node in self.nodes)

    @property
    def quorum_voters(self) -> str:
        """``controller.quorum.voters``: every node's id at its CONTROLLER listener."""
        return ",".join(f"{node.node_id}@127.0.0.1:{node.controller_port}" for node in self.nodes)

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("KafkaCluster has not been started")
        return self._data_dir

    def node(self, node_id: int) -> ClusterNode:
        """The node with this id (1 to ``size``)."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no node {node_id} in {[n.node_id for n in self.nodes]}")

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every node's log (for a failure message)."""
        return "\n".join(f"--- node {n.node_id} ---\n{log_tail(n.log_path, lines)}" for n in self.nodes)

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Format every node's storage with one cluster id, start all of them, and wait until each is registered.

        Raises ``TimeoutError``/``RuntimeError`` with the logs' tails when a node exits or is not ready within
        ``startup_timeout``; every node is then stopped and a temporary data directory removed.
        """
        if any(node.running for node in self.nodes):
            raise RuntimeError("KafkaCluster is already running")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._libs = ensure_jars(self._cache_dir)
        if self._requested_data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="kafka-cluster-"))
        else:
            self._data_dir = self._requested_data_dir.resolve()
            self._data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_BIND_ATTEMPTS):
            per_node = 4 if self._proxied else 2  # the listener, the controller, [the proxied listener, its proxy]
            ports = free_ports(per_node * self._size)
            mine = [ports[i * per_node:(i + 1) * per_node] for i in range(self._size)]
            self.nodes = [ClusterNode(self, i + 1, data_dir=self._data_dir / f"node-{i + 1}", heap=self._heap,
                                      extra_properties=self._extra_properties, cache_dir=self._cache_dir,
                                      startup_timeout=self._startup_timeout,
                                      proxied_port=mine[i][3] if self._proxied else None) for i in range(self._size)]
            for node, node_ports in zip(self.nodes, mine, strict=True):
                node._assign_ports(node_ports[0], node_ports[1], node_ports[2] if self._proxied else None)
            try:
                for node in self.nodes:
                    node._begin()
                for node in self.nodes:
                    node._wait_ready()
                self._wait_registered()
                return
            except RuntimeError as exc:
                for node in self.nodes:
                    node.kill()
                if "Address already in use" not in str(exc) or attempt == _BIND_ATTEMPTS - 1:
                    raise
                for node in self.nodes:
                    shutil.rmtree(node.data_dir, ignore_errors=True)  # formatted for ports that were taken

    def _wait_registered(self) -> None:
        """Until a node's metadata lists every node: each one registered and unfenced."""
        deadline = time.monotonic() + self._startup_timeout
        ids = {node.node_id for node in self.nodes}
        while _run_coroutine(lambda: self._registered(ids)) != ids:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka cluster: not every node registered after {self._startup_timeout:.0f}s\n"
                                   f"{self.log_tails()}")
            time.sleep(0.2)

    async def _registered(self, ids: set[int]) -> set[int]:
        found: set[int] = set()
        for node_id in ids:
            if await _probe_broker(self.bootstrap_servers, node_id, 5.0):
                found.add(node_id)
        return found

    def stop(self) -> None:
        """Stop every node (SIGTERM, up to 20 s, then SIGKILL) and remove a temporary data directory.

        The nodes are stopped all at once: one by one, the last would wait for a quorum that is already gone.
        """
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes))
        if self._requested_data_dir is None and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self.nodes = []

    # -- who leads what ---------------------------------------------------

    async def _admin_call(self, what: str, within: float, call: Any) -> Any:
        """Run ``call(admin)`` on a fresh admin client until it answers: a node just killed may still be in the
        metadata for a few seconds (until its session expires), and a request to it fails."""
        deadline = time.monotonic() + within
        last: BaseException | None = None
        while time.monotonic() < deadline:
            admin = AIOKafkaAdminClient(bootstrap_servers=self._live_bootstrap(), request_timeout_ms=5000,
                                        retry_backoff_ms=100)
            try:
                async with asyncio.timeout(10):
                    await admin.start()
                    return await call(admin)
            except (KafkaError, OSError, TimeoutError) as exc:
                last = exc
            finally:
                with contextlib.suppress(KafkaError, OSError, TimeoutError):
                    await admin.close()
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{what}: no answer from the cluster within {within:.0f}s (last error: {last!r})")

    def _live_bootstrap(self) -> str:
        live = [node.bootstrap_servers for node in self.nodes if node.running]
        return ",".join(live) or self.bootstrap_servers

    async def aleaders(self, topics: Iterable[str], *, within: float = 30.0,
                       missing_ok: bool = False) -> list[PartitionState]:
        """Every partition of ``topics`` with its leader, replicas and in-sync replicas, as the metadata says now
        (with ``missing_ok``, a topic that does not exist yet has none)."""
        names = list(topics)

        async def describe(admin: AIOKafkaAdminClient) -> list[PartitionState]:
            states = []
            for topic in await admin.describe_topics(names):
                if missing_ok and topic["error_code"] == UnknownTopicOrPartitionError.errno:
                    continue
                if topic["error_code"]:
                    raise for_code(topic["error_code"])(f"describing {topic['topic']}")
                for p in topic["partitions"]:
                    states.append(PartitionState(topic["topic"], p["partition"], p["leader"],
                                                 tuple(p["replicas"]), tuple(p["isr"])))
            return sorted(states, key=lambda s: (s.topic, s.partition))

        result: list[PartitionState] = await self._admin_call(f"leaders of {names}", within, describe)
        return result

    async def abusiest_leader(self, topics: Iterable[str]) -> int:
        """The node that leads the most partitions of ``topics`` (the lowest id among equals)."""
        counts = Counter(state.leader for state in await self.aleaders(topics) if state.leader >= 0)
        if not counts:
            raise RuntimeError("no partition of the topics has a leader")
        return min(counts, key=lambda node_id: (-counts[node_id], node_id))

    async def aquorum(self, *, within: float = 30.0) -> QuorumState:
        """The KRaft quorum (the active controller is ``leader_id``), from Kafka's DescribeQuorum request."""

        async def describe(admin: AIOKafkaAdminClient) -> QuorumState:
            response = await admin._send_request(_DescribeQuorumRequest())
            if response.error_code:
                raise for_code(response.error_code)("DescribeQuorum")
            _name, partitions, _tags = response.topics[0]
            _index, code, leader_id, epoch, high_watermark, voters, _observers, _ = partitions[0]
            if code:
                raise for_code(code)("DescribeQuorum of __cluster_metadata-0")
            if leader_id < 0:
                raise KafkaError("the quorum has no leader yet")
            return QuorumState(leader_id, epoch, high_watermark, {int(v[0]): int(v[1]) for v in voters})

        result: QuorumState = await self._admin_call("the active controller", within, describe)
        return result

    async def await_in_sync(self, topics: Iterable[str], *, within: float = 120.0,
                            include_offsets: bool = True) -> float:
        """Wait until every partition of ``topics`` (and of the consumer offsets topic, once a group made it) has a
        leader and every replica in sync, as a rolling restart waits between nodes; returns the seconds it took."""
        names = [*topics, *([OFFSETS_TOPIC] if include_offsets else [])]
        started = time.monotonic()
        lagging: list[PartitionState] = []
        while time.monotonic() - started < within:
            with contextlib.suppress(KafkaError, TimeoutError):
                lagging = [s for s in await self.aleaders(names, within=10, missing_ok=True) if not s.in_sync]
                if not lagging:
                    return time.monotonic() - started
            await asyncio.sleep(0.25)
        raise TimeoutError(f"replicas not in sync after {within:.0f}s: {lagging[:6]}\n{self.log_tails()}")
