"""Runs the measurements and collects their figures: services, consumer processes, producers.

Each measurement uses fresh topics, a fresh consumer group and a fresh Redis key prefix, so steps
never see each other's records. Consumers are real ``python -m consumer`` processes (through
:mod:`bench.launch`), one per partition where a step says so; their CPU time and RSS are read
from ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from bench.intake import LineRateIntake
from bench.peers import PEERS, Peer
from bench.results import Bare, Buffered, Drain, GuideJoin, Latency, Memory, Scale, Soak
from bench.traffic import Pair, Send, TrafficSpec, make_pairs, schedule, write_guide_files
from consumer import payload, records
from consumer.config import Settings
from consumer.enrich import EvaluationRules
from consumer.events import SpanContextEvent
from consumer.store import Namespace, SpanOp
from consumer.store_redis import RedisJoinStore, connect
from localenv.kafka import acreate_topics
from localenv.redis import RedisCluster

ROOT = Path(__file__).resolve().parent.parent
PRELOAD_RATE = 10_000.0  # pairs per second of virtual time: a preloaded log keeps the schedule's order
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# Waiting for the service.
POLL_S = 0.05  # how often a wait looks at assignments, committed offsets and arrivals
GROUP_SETTLE_S = 90.0  # for a new consumer group to hold every partition...
GROUP_QUIET_S = 1.0  # ...and to have kept that assignment this long
STOP_TIMEOUT_S = 40.0  # for a consumer process to exit after SIGTERM (its own deadline is 30 s) before a kill
LOG_THREAD_JOIN_S = 5.0  # for the thread copying a stopped consumer's stderr to its log
DRAIN_TIMEOUT_MIN_S = 180.0  # a drain is given this long at least...
DRAIN_PAIRS_PER_S_MIN = 100  # ...or one second per this many pairs
LIVE_COLLECT_S = 0.1  # how often arrivals are collected while live traffic is produced
LIVE_WARMUP_S = 2.0  # the first seconds of live traffic count for delivery, not latency
LIVE_SETTLE_S = 30.0  # after live traffic, for its last evaluations to arrive
SOAK_SEGMENT_S = 20.0  # a soak is produced in segments of this length, the RSS sampled after each
MEMORY_TIMEOUT_S = 300.0  # for the service to buffer the sides of the memory step
MEMORY_POLL_S = 0.1  # how often the memory step reads the committed offsets

# Producing.
PRELOAD_LINGER_MS = 20  # a preload is produced in full batches
LIVE_LINGER_MS = 1  # live traffic is sent at once: its send time starts the latency
BATCH_BYTES = 262_144  # per partition batch of the bench's producers
REQUEST_BYTES = 4_194_304  # per produce request of the bench's producers
PRELOAD_IN_FLIGHT = 5_000  # records sent before waiting for their acknowledgements, preloading
LIVE_IN_FLIGHT = 2_000  # the same for live traffic
LIVE_START_S = 0.05  # live traffic's schedule starts this long after the call
LIVE_TICK_S = 0.005  # the longest sleep between scheduled sends

# Filling Redis as the service would with its default settings.
_SETTINGS = Settings.model_fields
FILL_SHARDS: int = _SETTINGS["redis_deadline_shards"].default
FILL_TTL_MS: int = _SETTINGS["join_ttl_seconds"].default * 1000
FILL_LEDGER_RETENTION_MS: int = FILL_TTL_MS + _SETTINGS["ledger_grace_seconds"].default * 1000
FILL_BATCH = 1_000  # spans per put_many

CHECKED_BODIES = 5  # a peer's first request bodies of a drain, checked metric by metric against build_metric
# The peers join over the service's default join TTL and tag their metrics with its ddtrace version.
PEER_TTL_S: int = _SETTINGS["join_ttl_seconds"].default
DDTRACE_VERSION = importlib.metadata.version("ddtrace")


@dataclass
class Options:
    traffic: TrafficSpec = field(default_factory=lambda: TrafficSpec(pairs=20_000))  # pairs: the other steps' size
    throughput_pairs: tuple[int, ...] = ()  # the throughput step's sizes, each --runs times; empty: traffic.pairs
    partitions: int = 2
    max_batch: int = 500
    runs: int = 3
    latency_seconds: float = 20.0
    latency_loads: tuple[float, ...] = (0.25, 0.5, 0.9)
    max_pairs_per_s: float = 0.0  # given: the latency and soak loads are fractions of this, not of a measured maximum
    memory_sides: int = 20_000
    buffered: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    buffered_pairs: int = 10_000
    scaling: tuple[int, ...] = (1, 2, 4)
    scale: tuple[int, ...] = (1, 2, 4)  # consumer processes draining the same partitions, against a Redis Cluster
    scale_shards: int = 3  # primaries of the Redis Cluster the scale step starts
    soak_seconds: float = 600.0
    soak_load: float = 0.5
    guide_sizes: tuple[int, ...] = (1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000)
    guide_budget_s: float = 60.0
    steps: tuple[str, ...] = ("throughput", "latency", "memory", "buffered", "scaling", "scale", "soak", "guide",
                              "quix", "kstreams")
    peer_commit_ms: int = 1_000  # the peers' commit interval (they also commit after every max_batch records)
    uvloop: bool = False
    profile: str | None = None
    workdir: Path = field(default_factory=lambda: Path("bench-out"))
    service_root: Path | None = None  # run the service from another checkout (before/after comparisons)
    before_root: Path | None = None  # the throughput step also drains each run's records with this checkout's service

    @property
    def sizes(self) -> tuple[int, ...]:
        """The throughput step's sizes, in the order given."""
        return self.throughput_pairs or (self.traffic.pairs,)

    @property
    def drains(self) -> bool:
        """Whether the throughput runs happen: asked for, needed by a peer, or needed for the maximum the latency
        and soak loads are fractions of (unless ``max_pairs_per_s`` gives it)."""
        steps = set(self.steps)
        return bool(steps & {"throughput", *PEERS} or (steps & {"latency", "soak"} and not self.max_pairs_per_s))


@dataclass
class Env:
    bootstrap: str
    redis_url: str
    intake: LineRateIntake
    workdir: Path
    redis_wait_replicas: int = 0  # REDIS_WAIT_REPLICAS of the service
    redis_cluster: bool = False  # the service runs with REDIS_CLUSTER=true
    redis_nodes: tuple[str, ...] = ()  # a URL per primary, whose INFO is sampled; empty: redis_url alone
    cluster_url: str | None = None  # the scale step's Redis Cluster, when given rather than started

    @property
    def node_urls(self) -> tuple[str, ...]:
        return self.redis_nodes or (self.redis_url,)


# -- consumer processes ---------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


def _proc_rss(pid: int, field: str = "VmRSS:") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Consumers:
    """``count`` service processes in one group; stopped with SIGTERM by :meth:`stop`."""

    def __init__(self, env: Env, settings_env: dict[str, str], *, count: int, name: str, uvloop: bool,
                 profile: Path | None = None, service_root: Path | None = None,
                 command: list[str] | None = None) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._assigned: list[tuple[float, int]] = []  # (time, partitions) of each process's last assignment
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.started = time.time()
        environ = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
        environ.update(settings_env)
        if service_root is not None:  # its consumer package comes first on sys.path (the working directory)
            environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
        for i in range(count):
            args = [sys.executable, "-m", "bench.launch"]
            if uvloop:
                args.append("--uvloop")
            if profile is not None and i == 0:
                args += ["--pyinstrument", str(profile)]
            if command is not None:  # a peer: its own program, which says partitions_assigned as the service does
                args = command
            log = (env.workdir / f"{name}-{i}.log").open("wb")
            proc = subprocess.Popen(args, cwd=service_root or ROOT, env=environ, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.PIPE)
            self._procs.append(proc)
            self._assigned.append((0.0, 0))
            thread = threading.Thread(target=self._watch, args=(i, proc, log), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _watch(self, i: int, proc: subprocess.Popen[bytes], log: Any) -> None:
        assert proc.stderr is not None
        with log:
            for line in proc.stderr:
                log.write(line)
                if b"partitions_assigned" in line:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        event = orjson.loads(line)
                        with self._lock:
                            self._assigned[i] = (time.time(), len(event.get("partitions") or ()))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    async def wait_stable(self, total_partitions: int, within: float = GROUP_SETTLE_S) -> float:
        """Wait until the group holds every partition of both topics (``total_partitions`` each), then is quiet."""
        deadline = time.time() + within
        while time.time() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a consumer exited with {proc.returncode}; see its log in the workdir")
            with self._lock:
                snapshot = list(self._assigned)
            busy = min(len(self._procs), total_partitions)
            holding = [parts for _, parts in snapshot if parts]
            last = max(t for t, _ in snapshot)
            if len(holding) >= busy and sum(holding) == 2 * total_partitions and time.time() - last > GROUP_QUIET_S:
                return last
            await asyncio.sleep(POLL_S)
        raise TimeoutError(f"the consumer group did not settle within {within}s: {self._assigned}")

    def check_alive(self) -> None:
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a consumer exited with {proc.returncode}; see its log in the workdir")

    def settled_at(self, partitions: int) -> float | None:
        """When the group last changed its assignment, once it holds all ``partitions`` of both topics."""
        with self._lock:
            snapshot = list(self._assigned)
        if sum(parts for _, parts in snapshot) != 2 * partitions:
            return None
        return max(t for t, _ in snapshot)

    def cpu_seconds(self) -> float:
        return sum(_proc_cpu(pid) for pid in self.pids)

    def rss_bytes(self) -> int:
        return sum(_proc_rss(pid) for pid in self.pids)

    def peak_rss_bytes(self) -> int:
        """The largest of the processes' peak RSS (VmHWM) so far."""
        return max((_proc_rss(pid, "VmHWM:") for pid in self.pids), default=0)

    def stop(self) -> list[int]:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self._procs:
            try:
                codes.append(proc.wait(timeout=STOP_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        for thread in self._threads:
            thread.join(LOG_THREAD_JOIN_S)
        return codes


# -- Kafka helpers -------------------------------------------------------------------------------


@dataclass
class Run:
    """One measurement's own topics, group and key prefix."""

    name: str
    span_topic: str
    result_topic: str
    group: str
    prefix: str
    partitions: int

    @classmethod
    def new(cls, name: str, partitions: int, prefix: str | None = None) -> Run:
        tag = uuid.uuid4().hex[:8]
        return cls(name, f"bench.{tag}.spans", f"bench.{tag}.results", f"bench-{tag}", prefix or f"b{tag}",
                   partitions)

    def settings_env(self, env: Env, max_batch: int) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": env.bootstrap, "KAFKA_GROUP_ID": self.group, "KAFKA_MAX_BATCH": str(max_batch),
            "SPAN_TOPIC": self.span_topic, "RESULT_TOPIC": self.result_topic,
            "DLQ_TOPIC": f"{self.span_topic}.dlq", "UNMATCHED_TOPIC": f"{self.span_topic}.unmatched",
            "REDIS_URL": env.redis_url, "REDIS_CLUSTER": "true" if env.redis_cluster else "false",
            "REDIS_KEY_PREFIX": self.prefix,
            "REDIS_WAIT_REPLICAS": str(env.redis_wait_replicas),
            "DD_LLMOBS_OVERRIDE_ORIGIN": env.intake.origin, "DD_LLMOBS_AGENTLESS_ENABLED": "true",
            "DD_API_KEY": "bench-api-key", "HEALTH_PORT": "0", "LOG_FORMAT": "json", "LOG_LEVEL": "INFO",
        }

    async def create(self, env: Env) -> None:
        await acreate_topics(env.bootstrap, {self.span_topic: self.partitions, self.result_topic: self.partitions,
                                             f"{self.span_topic}.dlq": 1, f"{self.span_topic}.unmatched": 1})

    def topic(self, send: Send) -> str:
        return self.span_topic if send.topic_kind == "span" else self.result_topic


def _producer(env: Env, *, linger_ms: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all", linger_ms=linger_ms,
                            max_batch_size=BATCH_BYTES, max_request_size=REQUEST_BYTES)


async def preload(env: Env, run: Run, pairs: list[Pair], sends: list[Send]) -> None:
    producer = _producer(env, linger_ms=PRELOAD_LINGER_MS)
    await producer.start()
    try:
        pending = []
        for send in sends:
            pair = pairs[send.pair]
            value = pair.span if send.topic_kind == "span" else pair.result
            pending.append(await producer.send(run.topic(send), value, key=pair.key))
            if len(pending) >= PRELOAD_IN_FLIGHT:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def produce_live(producer: AIOKafkaProducer, run: Run, pairs: list[Pair], sends: list[Send],
                       second_at: dict[bytes, float]) -> None:
    """Produce each record at its scheduled time; records when each pair's completing side was sent."""
    start = time.time() + LIVE_START_S
    pending = []
    i = 0
    while i < len(sends):
        now = time.time() - start
        while i < len(sends) and sends[i].at_s <= now:
            send = sends[i]
            pair = pairs[send.pair]
            value = pair.span if send.topic_kind == "span" else pair.result
            pending.append(await producer.send(run.topic(send), value, key=pair.key))
            if send.second:
                second_at[pair.span_id.encode()] = time.time()
            i += 1
        if len(pending) > LIVE_IN_FLIGHT:
            await asyncio.gather(*pending)
            pending = []
        if i < len(sends):
            await asyncio.sleep(max(0.0, min(LIVE_TICK_S, sends[i].at_s - (time.time() - start))))
    await asyncio.gather(*pending)


class Offsets:
    """Committed offsets of a group, read with one admin client."""

    def __init__(self, env: Env) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap)

    async def __aenter__(self) -> Offsets:
        await self._admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._admin.close()

    async def committed(self, group: str, topics: tuple[str, ...] = ()) -> int:
        """The group's committed offsets, summed over ``topics`` (all topics if empty)."""
        try:
            offsets = await self._admin.list_consumer_group_offsets(group)
        except KafkaError:  # the group does not exist yet: nothing committed
            return 0
        return sum(meta.offset for tp, meta in offsets.items()
                   if meta.offset > 0 and (not topics or tp.topic in topics))


# -- measurements --------------------------------------------------------------------------------


def spec_for(opts: Options, run: str, pairs: int, **changes: Any) -> TrafficSpec:
    return dataclasses.replace(opts.traffic, pairs=pairs, run=run, **changes)


@dataclass
class Preloaded:
    """A run's topics with its traffic already produced: what every drain of it must deliver."""

    run: Run
    records: int  # records in the topics
    expected: set[bytes]  # span ids of the matched pairs
    pairs: dict[bytes, Pair] = field(default_factory=dict)  # by span id

    def regrouped(self, tag: str) -> Preloaded:
        """The same records under a consumer group and a Redis key prefix of their own (``tag`` appended)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, group=f"{self.run.group}-{tag}",
                                                                 prefix=f"{self.run.prefix}{tag}"))


def stored_span_of(raw: bytes) -> dict[str, Any]:
    """A span-context event as the service stores it under its default rules (consumer.enrich): the
    allow-listed tags only, ``ml_app_version`` resolved. The peers must build what the service sends."""
    event = EvaluationRules().span(SpanContextEvent.model_validate(orjson.loads(raw)))
    return event.model_dump(mode="json")


def mismatched_metrics(bodies: list[bytes], pairs: dict[bytes, Pair]) -> int:
    """Metrics in ``bodies`` that are not one of the objects build_metric makes of their pair."""
    wrong = 0
    for body in bodies:
        for metric in orjson.loads(body)["data"]["attributes"]["metrics"]:
            pair = pairs.get(metric["join_on"]["span"]["span_id"].encode())
            if pair is None:
                wrong += 1
                continue
            span, result = stored_span_of(pair.span), orjson.loads(pair.result)
            result["received_ts_ms"] = 0  # not used: every generated evaluation has its timestamp
            wrong += metric not in [payload.build_metric(span, result, i) for i in range(len(result["evaluations"]))]
    return wrong


async def redis_cpu_seconds(client: Redis) -> float:
    """redis-server's CPU time so far (INFO cpu: user + system, main thread and children)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def redis_memory_bytes(client: Redis) -> int:
    """redis-server's ``used_memory`` (INFO memory): what its data and buffers take, before fragmentation."""
    info = await client.info("memory")
    return int(info["used_memory"])


def peer_command(env: Env, opts: Options, peer: Peer, preloaded: Preloaded, name: str) -> list[str]:
    run = preloaded.run
    return peer.command(bootstrap=env.bootstrap, group=f"{run.group}-{peer.name}", span_topic=run.span_topic,
                        result_topic=run.result_topic, intake_origin=env.intake.origin, max_batch=opts.max_batch,
                        commit_ms=opts.peer_commit_ms, ttl_s=PEER_TTL_S, state_dir=env.workdir / f"{name}-state",
                        ddtrace_version=DDTRACE_VERSION)


async def prepared(env: Env, opts: Options, *, name: str, pairs_count: int, partitions: int,
                   prefix: str | None = None) -> Preloaded:
    """A new run's topics, with ``pairs_count`` pairs produced into them: what a drain reads."""
    run = Run.new(name, partitions, prefix)
    await run.create(env)
    pairs = make_pairs(spec_for(opts, run.group, pairs_count))
    sends = schedule(pairs, rate=PRELOAD_RATE, lag_ms=opts.traffic.lag_ms)
    await preload(env, run, pairs, sends)
    return Preloaded(run, len(sends), {p.span_id.encode() for p in pairs if p.matched},
                     {p.span_id.encode(): p for p in pairs})


async def drain(env: Env, opts: Options, *, name: str, pairs_count: int, partitions: int, consumers: int,
                prefix: str | None = None, profile: Path | None = None, peer: Peer | None = None,
                preloaded: Preloaded | None = None, service_root: Path | None = None) -> tuple[Drain, Preloaded]:
    """Drain a preloaded log with the service (or ``peer``), timed from the group's settled assignment.

    Without ``preloaded`` a new run is created and ``pairs_count`` pairs produced; with it, that run's
    records are drained again by a group of its own (a peer on the service's traffic; the service of another
    checkout on :meth:`Preloaded.regrouped` records). ``service_root``: run the service from that checkout
    (default ``opts.service_root``).
    """
    if preloaded is None:
        preloaded = await prepared(env, opts, name=name, pairs_count=pairs_count, partitions=partitions, prefix=prefix)
    run, expected = preloaded.run, preloaded.expected
    group_id = run.group if peer is None else f"{run.group}-{peer.name}"
    env.intake.take_arrivals()
    env.intake.take_bodies()
    env.intake.keep_bodies = CHECKED_BODIES if peer is not None else 0
    nodes = [Redis.from_url(url) for url in env.node_urls] if peer is None else []  # a peer keeps its own state
    memory_before = [await redis_memory_bytes(node) for node in nodes]
    memory_after = memory_before
    group = Consumers(env, run.settings_env(env, opts.max_batch), count=consumers, name=name, uvloop=opts.uvloop,
                      profile=profile, service_root=service_root or opts.service_root,
                      command=None if peer is None else peer_command(env, opts, peer, preloaded, name))
    seen: dict[bytes, int] = {}  # evaluations received per span id
    settled: float | None = None
    # (time, committed records, process CPU seconds, redis-server CPU seconds per node)
    samples: list[tuple[float, int, float, list[float]]] = []
    arrivals: list[tuple[float, int, int]] = []  # (time, evaluations, of which duplicates)
    try:
        async with Offsets(env) as offsets:
            deadline = time.time() + max(DRAIN_TIMEOUT_MIN_S, pairs_count / DRAIN_PAIRS_PER_S_MIN)
            while time.time() < deadline:
                group.check_alive()
                committed = await offsets.committed(group_id, (run.span_topic, run.result_topic))
                redis_cpu = [await redis_cpu_seconds(node) for node in nodes]
                samples.append((time.time(), committed, group.cpu_seconds(), redis_cpu))
                for when, ids in env.intake.take_arrivals():
                    duplicates = 0
                    for span_id in ids:
                        count = seen[span_id] = seen.get(span_id, 0) + 1
                        duplicates += count > opts.traffic.evals
                    arrivals.append((when, len(ids), duplicates))
                settled = group.settled_at(partitions)
                if committed >= preloaded.records and expected <= seen.keys() and settled:
                    break
                await asyncio.sleep(POLL_S)
        peak_rss = group.peak_rss_bytes()
        memory_after = [await redis_memory_bytes(node) for node in nodes]
    finally:
        codes = group.stop()
        env.intake.keep_bodies = 0
        for node in nodes:
            await node.aclose()
    # A peer must build the service's objects: its first bodies are checked against build_metric.
    mismatched = mismatched_metrics(env.intake.take_bodies(), preloaded.pairs)
    # The window starts once the group settled (its last assignment before the drain ended; a stopping peer
    # announces its revocation): what ran before is start-up.
    t0 = settled or samples[0][0]
    before = [sample for sample in samples if sample[0] <= t0] or samples[:1]
    _, c0, cpu0, rcpu0 = before[-1]
    t1, c1, cpu1, rcpu1 = samples[-1]
    seconds = max(t1 - t0, 1e-6)
    records = c1 - c0
    # Evaluations count once each: a peer that joins a duplicated side again delivers its evaluations twice.
    window = [(n, dup) for when, n, dup in arrivals if when >= t0]
    evals = sum(n - dup for n, dup in window)
    missing = expected - seen.keys()
    redis_cpu_by_node = [(b - a) * 1e6 / max(evals, 1) for a, b in zip(rcpu0, rcpu1, strict=True)]
    return Drain(total_records=preloaded.records, records=records, evaluations=evals, seconds=seconds,
                 records_per_s=records / seconds,
                 evaluations_per_s=evals / seconds, pairs_per_s=evals / opts.traffic.evals / seconds,
                 cpu_ms_per_1000_evals=(cpu1 - cpu0) * 1e6 / max(evals, 1),
                 delivered_all=not missing and not mismatched, missing=len(missing), exit_codes=codes,
                 redis_cpu_ms_per_1000_evals=sum(redis_cpu_by_node),
                 peak_rss_mb=peak_rss / 2**20, duplicates=sum(dup for _, _, dup in arrivals),
                 mismatched=mismatched, redis_cpu_ms_per_1000_evals_by_node=redis_cpu_by_node,
                 redis_memory_bytes_by_node=[b - a for a, b in zip(memory_before, memory_after, strict=True)]), \
        preloaded


async def bare(env: Env, run: Run, count: int, max_batch: int) -> Bare:
    """The bare consumer reading ``count`` records of ``run``'s topics."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bare", env.bootstrap, f"{run.span_topic},{run.result_topic}", str(count),
        str(max_batch), cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the bare consumer exited with {proc.returncode}")
    return Bare(**orjson.loads(out))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Live:
    """Live traffic at one rate: latencies (s) after the warm-up, and how many pairs were produced and delivered."""

    latencies: list[float]
    pairs: int
    matched: int
    delivered: int


async def live(env: Env, opts: Options, run: Run, producer: AIOKafkaProducer, *, rate: float, seconds: float,
               tag: str, warmup_s: float = LIVE_WARMUP_S) -> Live:
    """Produce ``rate`` pairs/s for ``seconds`` and collect what the intake received."""
    pairs = make_pairs(spec_for(opts, f"{run.group}-{tag}", max(1, int(rate * seconds))))
    sends = schedule(pairs, rate=rate, lag_ms=opts.traffic.lag_ms)
    expected = {p.span_id.encode() for p in pairs if p.matched}
    warm = {p.span_id.encode() for p in pairs if p.index / rate < warmup_s}
    second_at: dict[bytes, float] = {}
    latencies: list[float] = []
    seen: set[bytes] = set()

    def collect() -> None:
        for when, ids in env.intake.take_arrivals():
            for span_id in ids:
                if span_id in expected and span_id not in seen:
                    seen.add(span_id)
                    if span_id not in warm and span_id in second_at:
                        latencies.append(when - second_at[span_id])
                elif span_id in expected and span_id not in warm and span_id in second_at:
                    latencies.append(when - second_at[span_id])  # the pair's other evaluations

    producing = asyncio.create_task(produce_live(producer, run, pairs, sends, second_at))
    while not producing.done():
        await asyncio.sleep(LIVE_COLLECT_S)
        collect()
    await producing
    deadline = time.time() + LIVE_SETTLE_S
    while not expected <= seen and time.time() < deadline:
        await asyncio.sleep(POLL_S)
        collect()
    return Live(latencies, len(pairs), len(expected), len(seen))


async def latency(env: Env, opts: Options, max_pairs_per_s: float, peer: Peer | None = None) -> list[Latency]:
    """Join latency of the service (or ``peer``) at each of ``--latency-loads`` times the service's maximum."""
    run = Run.new("latency" if peer is None else f"latency-{peer.name}", opts.partitions)
    await run.create(env)
    env.intake.take_arrivals()
    command = None if peer is None else peer_command(env, opts, peer, Preloaded(run, 0, set()), run.name)
    group = Consumers(env, run.settings_env(env, opts.max_batch), count=1, name=run.name, uvloop=opts.uvloop,
                      service_root=opts.service_root, command=command)
    producer = _producer(env, linger_ms=LIVE_LINGER_MS)
    await producer.start()
    out = []
    try:
        await group.wait_stable(opts.partitions)
        for load in opts.latency_loads:
            rate = max(1.0, load * max_pairs_per_s)
            cpu0 = group.cpu_seconds()
            traffic = await live(env, opts, run, producer, rate=rate, seconds=opts.latency_seconds,
                                 tag=f"l{int(load * 100)}")
            # Everything the process spent while this load ran, idle moments included, per evaluation delivered.
            cpu_ms = (group.cpu_seconds() - cpu0) * 1e6 / max(1, traffic.delivered * opts.traffic.evals)
            ms = [v * 1000 for v in traffic.latencies]
            out.append(Latency(load, rate, traffic.pairs, traffic.matched, traffic.delivered, percentile(ms, 0.5),
                               percentile(ms, 0.95), percentile(ms, 0.99), max(ms) if ms else float("nan"),
                               "evaljoin" if peer is None else peer.name, cpu_ms))
    finally:
        await producer.stop()
        group.stop()
    return out


async def soak(env: Env, opts: Options, max_pairs_per_s: float) -> Soak:
    run = Run.new("soak", opts.partitions)
    await run.create(env)
    group = Consumers(env, run.settings_env(env, opts.max_batch), count=1, name="soak", uvloop=opts.uvloop,
                      service_root=opts.service_root)
    producer = _producer(env, linger_ms=LIVE_LINGER_MS)
    await producer.start()
    rate = max(1.0, opts.soak_load * max_pairs_per_s)
    samples: list[tuple[float, int]] = []
    pairs = delivered = 0
    try:
        await group.wait_stable(opts.partitions)
        start = time.time()
        segment = 0
        while time.time() - start < opts.soak_seconds:
            length = min(SOAK_SEGMENT_S, opts.soak_seconds - (time.time() - start))
            traffic = await live(env, opts, run, producer, rate=rate, seconds=max(1.0, length), tag=f"s{segment}")
            pairs += traffic.pairs
            delivered += traffic.delivered
            samples.append((time.time() - start, group.rss_bytes()))
            segment += 1
    finally:
        await producer.stop()
        group.stop()
    return Soak(time.time() - start, rate, samples, delivered, pairs)


async def redis_used_memory(url: str) -> int:
    client = Redis.from_url(url)
    try:
        info = await client.info("memory")
        return int(info["used_memory"])
    finally:
        await client.aclose()


async def memory(env: Env, opts: Options) -> Memory:
    """Redis bytes per buffered side: N spans alone, then N results alone, each buffered by the service.

    Then N complete pairs, joined and delivered: what a pair leaves in Redis once delivered (its span, kept until
    its deadline so that late results still join, and the delivery ledger).
    """
    figures = []
    sizes = []
    for kind in ("span", "result", "pair"):
        run = Run.new(f"memory-{kind}", opts.partitions)
        await run.create(env)
        sides = {"span": (True, False), "result": (False, True), "pair": (True, True)}[kind]
        pairs = [dataclasses.replace(p, sides=sides, duplicated=(False, False))
                 for p in make_pairs(spec_for(opts, run.group, opts.memory_sides))]
        sizes.append(len(pairs[0].span if kind == "span" else pairs[0].result))
        sends = schedule(pairs, rate=PRELOAD_RATE, lag_ms=0)
        group = Consumers(env, run.settings_env(env, opts.max_batch), count=1, name=run.name, uvloop=opts.uvloop,
                          service_root=opts.service_root)
        try:
            async with Offsets(env) as offsets:
                await group.wait_stable(opts.partitions)
                before = await redis_used_memory(env.redis_url)
                env.intake.take_arrivals()
                await preload(env, run, pairs, sends)
                deadline = time.time() + MEMORY_TIMEOUT_S
                while await offsets.committed(run.group) < len(sends) and time.time() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(MEMORY_POLL_S)
                after = await redis_used_memory(env.redis_url)
        finally:
            group.stop()
        delivered = {span_id for _, ids in env.intake.take_arrivals() for span_id in ids}
        if kind == "pair" and len(delivered) < len(pairs):  # a pair not yet delivered still holds its result
            raise RuntimeError(f"memory step: {len(delivered)} of {len(pairs)} joined pairs delivered")
        figures.append((after - before) / len(pairs))
    # Of a delivered pair, its ledger is kept longest (JOIN_TTL + LEDGER_GRACE after the delivery): what deleting
    # the pairs' ledgers frees.
    ledger = (after - await drop_keys(env.redis_url, f"{run.prefix}:*:d")) / len(pairs)
    return Memory(opts.memory_sides, sizes[0], sizes[1], figures[0], figures[1], bytes_per_joined_pair=figures[2],
                  ledger_bytes_per_pair=ledger)


async def drop_keys(url: str, pattern: str) -> int:
    """Delete the keys matching ``pattern`` on a single Redis; its ``used_memory`` afterwards."""
    client = Redis.from_url(url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=FILL_BATCH):
            batch.append(key)
            if len(batch) >= FILL_BATCH:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
        return await redis_memory_bytes(client)
    finally:
        await client.aclose()


async def fill(env: Env, prefix: str, count: int, opts: Options) -> float:
    """Buffer ``count`` spans under ``prefix`` as the service stores them (the store's own put_many)."""
    started = time.time()
    client = await connect(env.redis_url, cluster=False)
    try:
        store = RedisJoinStore(client, prefix=prefix, shards=FILL_SHARDS, ledger_retention_ms=FILL_LEDGER_RETENTION_MS)
        filler = make_pairs(spec_for(opts, f"fill-{prefix}", min(count, 1)))[0]
        event = orjson.loads(filler.span)
        body = records.encode_span({**event, "source": {"topic": "bench.filler", "partition": 0, "offset": 0,
                                                        "timestamp_ms": event["emitted_at_ms"]}})
        deadline = int(time.time() * 1000) + FILL_TTL_MS
        for start in range(0, count, FILL_BATCH):
            await store.put_many([
                SpanOp(Namespace("bench-filler", f"f{i}"), records.span_identity(filler.trace_id, str(i + 1)), body,
                       deadline)
                for i in range(start, min(count, start + FILL_BATCH))])
    finally:
        await client.aclose()
    return time.time() - started


async def buffered(env: Env, opts: Options) -> list[Buffered]:
    out = []
    for sides in opts.buffered:
        prefix = f"f{uuid.uuid4().hex[:8]}"
        took = await fill(env, prefix, sides, opts)
        drains = []
        for run in range(opts.runs):
            result, _ = await drain(env, opts, name=f"buffered-{sides}-{run}", pairs_count=opts.buffered_pairs,
                                    partitions=opts.partitions, consumers=1, prefix=prefix)
            drains.append(result)
        out.append(Buffered(sides, took, drains))
    return out


async def cluster_primaries(url: str) -> tuple[str, ...]:
    """A URL per primary of the Redis Cluster at ``url`` (its credentials and options, each node's address)."""
    client = await connect(url, cluster=True)
    try:
        assert isinstance(client, ClusterClient)
        nodes = client.get_primaries()
    finally:
        await client.aclose()
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return tuple(urlunsplit((parts.scheme, f"{credentials}@{node.host}:{node.port}" if credentials
                             else f"{node.host}:{node.port}", "/0", parts.query, ""))
                 for node in sorted(nodes, key=lambda n: (n.host, n.port)))


@contextlib.asynccontextmanager
async def redis_cluster_env(env: Env, shards: int, url: str | None) -> AsyncIterator[Env]:
    """``env`` with the service on a Redis Cluster: the one at ``url``, else ``shards`` primaries started here.

    The cluster started here is what the README asks of production: AOF with ``appendfsync always`` on each node.
    """
    if url is not None:
        yield dataclasses.replace(env, redis_url=url, redis_cluster=True, redis_nodes=await cluster_primaries(url))
        return
    with RedisCluster(nodes=shards) as cluster:
        yield dataclasses.replace(env, redis_url=cluster.url, redis_cluster=True,
                                  redis_nodes=tuple(f"redis://127.0.0.1:{port}/0" for port in cluster.ports))


async def scale(env: Env, opts: Options) -> list[Scale]:
    """The same drain by 1, 2, 4... processes (``--scale``) in one group over ``max(--scale)`` partitions.

    ``env`` points at a Redis Cluster (:func:`redis_cluster_env`): each process count drains fresh topics of
    ``--pairs`` pairs, every count once per round, ``--runs`` rounds; redis-server's CPU is sampled on every shard.
    """
    partitions = max(opts.scale)
    out = []
    for rnd in range(max(1, opts.runs)):
        for processes in opts.scale:
            with timed(f"scale round {rnd + 1}/{opts.runs}: {processes} process(es), {partitions} partitions, "
                       f"{len(env.node_urls)} Redis shards"):
                result, _ = await drain(env, opts, name=f"scale-{rnd}-{processes}", pairs_count=opts.traffic.pairs,
                                        partitions=partitions, consumers=processes)
            out.append(Scale(processes, partitions, len(env.node_urls), rnd, result))
    return out


async def guide(env: Env, opts: Options) -> list[GuideJoin]:
    out = []
    for size in opts.guide_sizes:
        pairs = make_pairs(spec_for(opts, f"guide{size}", size, duplicates=0.0))
        outputs, scores = write_guide_files(pairs, env.workdir / f"guide-{size}")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.guide", str(outputs), str(scores),
                                                    cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=opts.guide_budget_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            out.append(GuideJoin(size, seconds=float("inf"), joined=0))
            break
        result = orjson.loads(stdout)  # the guide's own script prints a plain JSON line
        joined = GuideJoin(size, seconds=result["seconds"], joined=result["joined"])
        out.append(joined)
        if joined.seconds > opts.guide_budget_s / 4:  # the next size takes about four times as long
            break
    return out


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    started = time.time()
    sys.stderr.write(f"bench: {label} ...\n")
    sys.stderr.flush()
    yield
    sys.stderr.write(f"bench: {label} done in {time.time() - started:.1f}s\n")
    sys.stderr.flush()


__all__ = ["Env", "Options", "Preloaded", "bare", "buffered", "drain", "guide", "latency", "memory",
           "redis_cluster_env", "scale", "soak", "timed"]
