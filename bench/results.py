"""What each measurement gives, typed: the runner fills these, the table and the JSON file read them.

A result's fields are what was measured; its properties listed in ``derived`` are figures computed
from them, which :func:`plain` writes into the JSON file beside the fields.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any, ClassVar

# A consumer's RSS counts as flat over a soak if it grew by at most this much, or by this fraction.
FLAT_RSS_MB = 5.0
FLAT_RSS_FRACTION = 0.05
# The soak's first tenth is start-up (imports, pools, first batches): its RSS is not the baseline.
SOAK_WARMUP_FRACTION = 0.1


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Drain:
    """A preloaded log drained by the service (or a peer): the throughput figures over the settled window."""

    derived: ClassVar[tuple[str, ...]] = ("total_cpu_ms_per_1000_evals",)

    total_records: int  # in the topics (the bare consumer reads them all)
    records: int  # committed during the settled window
    evaluations: int
    seconds: float
    records_per_s: float
    evaluations_per_s: float
    pairs_per_s: float
    cpu_ms_per_1000_evals: float
    delivered_all: bool
    missing: int
    exit_codes: list[int]
    redis_cpu_ms_per_1000_evals: float = 0.0  # redis-server's CPU in the same window (the service's drains)
    peak_rss_mb: float = 0.0  # the largest process's peak RSS (VmHWM)
    duplicates: int = 0  # evaluations received more than once
    mismatched: int = 0  # metrics of a peer's checked bodies that differ from build_metric's objects
    # Per Redis node (one entry on a single Redis, one per shard on a cluster), over the same window: redis-server's
    # CPU per 1,000 evaluations, and how much its used_memory grew from before the consumers started to the end.
    redis_cpu_ms_per_1000_evals_by_node: list[float] = field(default_factory=list)
    redis_memory_bytes_by_node: list[int] = field(default_factory=list)

    @property
    def total_cpu_ms_per_1000_evals(self) -> float:
        """The process's CPU and redis-server's: what one evaluation costs the deployment."""
        return self.cpu_ms_per_1000_evals + self.redis_cpu_ms_per_1000_evals


@dataclass
class Bare:
    """The bare aiokafka consumer reading the same records (``python -m bench.bare``): the service's ceiling."""

    derived: ClassVar[tuple[str, ...]] = ("records_per_s",)

    records: int
    seconds: float
    cpu_seconds: float
    bytes: int

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def cpu_ms_per_1000_records(self) -> float:
        return self.cpu_seconds * 1e6 / self.records


@dataclass
class Throughput:
    """One throughput run of ``pairs`` pairs: the service's drain, the bare consumer's, each peer's and, with
    ``--before-root``, the older checkout's service, over the same records."""

    derived: ClassVar[tuple[str, ...]] = ("ratio",)

    service: Drain
    bare: Bare
    peers: dict[str, Drain] = field(default_factory=dict)  # by peer name (bench.peers.PEERS)
    pairs: int = 0  # the size of the run (0: a file written before runs recorded it)
    before: Drain | None = None  # the same records drained by the service of the --before-root checkout

    @property
    def ratio(self) -> float:
        return self.service.records_per_s / self.bare.records_per_s

    def records_ratio(self, peer: str) -> float:
        """The service's records/s over the peer's, in this run."""
        return self.service.records_per_s / self.peers[peer].records_per_s

    def fastest_peer_ratio(self) -> float:
        """The service's records/s over the faster peer's, in this run."""
        return self.service.records_per_s / max(d.records_per_s for d in self.peers.values())

    def before_cpu_ratio(self) -> float:
        """Process CPU per evaluation, now over the --before-root checkout's, in this run."""
        if self.before is None:
            raise ValueError("this run has no before drain")
        return self.service.cpu_ms_per_1000_evals / self.before.cpu_ms_per_1000_evals

    def cpu_ratio(self, peer: str) -> float:
        """Evaluations per CPU-second, the service (with redis-server) over the peer, in this run."""
        return self.peers[peer].cpu_ms_per_1000_evals / self.service.total_cpu_ms_per_1000_evals

    def rss_ratio(self, peer: str) -> float:
        """The service's peak RSS over the peer's, in this run (redis-server not counted)."""
        return self.service.peak_rss_mb / self.peers[peer].peak_rss_mb


def max_pairs_per_s(runs: list[Throughput]) -> float:
    """The service's maximum: the median pairs/s of the throughput runs at the largest size (the latency and soak
    steps take fractions of it, the guide's comparison uses it)."""
    largest = max((r.pairs for r in runs), default=0)
    return median([r.service.pairs_per_s for r in runs if r.pairs == largest])


@dataclass
class Latency:
    """Join latency at one load: from a pair's completing side produced to its evaluations at the intake."""

    load: float
    pairs_per_s: float
    pairs: int
    matched: int  # pairs with both sides: each must be delivered
    delivered: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    process: str = "evaljoin"  # or the peer's name: from the completing side to the peer's post
    # The process's CPU while this load ran (idle moments included) per evaluation delivered; None in a file
    # written before it was measured.
    cpu_ms_per_1000_evals: float | None = None


@dataclass
class Memory:
    """Redis bytes per buffered side, measured on ``sides`` spans alone and then as many results alone.

    ``bytes_per_joined_pair``: what stays in Redis once a pair joined and its evaluations were delivered (the
    span, kept until its deadline so that late results still join, and the delivery ledger), measured on
    ``sides`` complete pairs; ``ledger_bytes_per_pair``: the part of it that deleting the ledgers frees. Both
    ``None`` in a file written before they were measured.
    """

    sides: int
    span_event_bytes: int
    result_event_bytes: int
    bytes_per_span: float
    bytes_per_result: float
    bytes_per_joined_pair: float | None = None
    ledger_bytes_per_pair: float | None = None


@dataclass
class Buffered:
    """The per-event cost with ``sides`` sides already buffered, over ``--runs`` drains."""

    derived: ClassVar[tuple[str, ...]] = ("us_per_record", "cpu_ms_per_1000_evals", "delivered_all")

    sides: int
    fill_seconds: float
    drains: list[Drain]

    @property
    def us_per_record(self) -> float:
        """Median wall time per record: what a user sees, and what a loaded machine moves most."""
        return median([1e6 / d.records_per_s if d.records_per_s else float("nan") for d in self.drains])

    @property
    def cpu_ms_per_1000_evals(self) -> float:
        """Median CPU per 1,000 evaluations: the cost itself, less moved by what else runs."""
        return median([d.cpu_ms_per_1000_evals for d in self.drains])

    @property
    def delivered_all(self) -> bool:
        return all(d.delivered_all for d in self.drains)


@dataclass
class Scaling:
    """A drain with ``processes`` consumer processes, one per partition."""

    processes: int
    drain: Drain


@dataclass
class Scale:
    """A drain of the same ``partitions`` by ``processes`` consumer processes against a Redis Cluster of ``shards``."""

    derived: ClassVar[tuple[str, ...]] = ("redis_cpu_ms_per_1000_evals_by_shard",)

    processes: int
    partitions: int
    shards: int
    round: int  # the drains of one round (every process count once) are compared with each other
    drain: Drain

    @property
    def redis_cpu_ms_per_1000_evals_by_shard(self) -> list[float]:
        return self.drain.redis_cpu_ms_per_1000_evals_by_node


def scale_ratios(points: list[Scale]) -> dict[int, float]:
    """Records/s of each process count over the fewest processes' in the same round, median over the rounds."""
    ratios: dict[int, list[float]] = {}
    for rnd in sorted({p.round for p in points}):
        drains = {p.processes: p.drain for p in points if p.round == rnd}
        base = drains[min(drains)].records_per_s
        for processes, d in drains.items():
            ratios.setdefault(processes, []).append(d.records_per_s / base if base else float("nan"))
    return {processes: median(values) for processes, values in sorted(ratios.items())}


@dataclass
class Soak:
    """Steady traffic for a long time: does the consumer's RSS stay flat?"""

    derived: ClassVar[tuple[str, ...]] = ("rss_start_mb", "rss_end_mb", "rss_max_mb", "flat")

    seconds: float
    pairs_per_s: float
    samples: list[tuple[float, int]]  # (seconds since start, RSS bytes)
    delivered: int
    pairs: int

    @property
    def rss_start_mb(self) -> float:
        settled = [rss for t, rss in self.samples if t >= self.seconds * SOAK_WARMUP_FRACTION] or [self.samples[0][1]]
        return settled[0] / 2**20

    @property
    def rss_end_mb(self) -> float:
        return self.samples[-1][1] / 2**20

    @property
    def rss_max_mb(self) -> float:
        return max(rss for _, rss in self.samples) / 2**20

    @property
    def flat(self) -> bool:
        return self.rss_end_mb - self.rss_start_mb <= max(FLAT_RSS_MB, FLAT_RSS_FRACTION * self.rss_start_mb)


@dataclass
class GuideJoin:
    """The guide's batch join (``python -m bench.guide``) of ``pairs`` pairs in files; inf ``seconds``: gave up."""

    derived: ClassVar[tuple[str, ...]] = ("pairs_per_s",)

    pairs: int
    seconds: float
    joined: int

    @property
    def pairs_per_s(self) -> float:
        return self.joined / self.seconds


@dataclass
class Figures:
    """Every step's results; a step that did not run stays empty."""

    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    memory: Memory | None = None
    buffered: list[Buffered] = field(default_factory=list)
    scaling: list[Scaling] = field(default_factory=list)
    scale: list[Scale] = field(default_factory=list)
    soak: Soak | None = None
    guide: list[GuideJoin] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The steps that ran, as :func:`plain` data."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name)}


def plain(value: Any) -> Any:
    """A result as JSON-ready data: its fields and the properties it names in ``derived``, all the way down."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return data | {name: getattr(value, name) for name in getattr(value, "derived", ())}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value
