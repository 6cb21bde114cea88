"""``python -m bench.capacity RESULTS.json``: what a deployment needs for a rate of evaluations per second.

Reads the JSON file of a benchmark run (``python -m bench --json RESULTS.json``) and turns its measured
per-evaluation costs into partitions, pods, Redis shards and Redis memory at 1k, 10k, 100k and 1M
evaluations per second (``--rates``). Every assumption is a flag; ``docs/capacity.md`` explains each.

What it needs from the run:

- process and redis-server CPU per evaluation (medians of the drains) on a single Redis, from the
  ``throughput`` step, and on a Redis Cluster, from the ``scale`` step (every shard sampled, and how
  unevenly they share it), either or both: a plan that fits one Redis uses the first, a cluster the
  second (or the first, marked, when the run has no scale step);
- Redis bytes per waiting span, per waiting result, per delivered pair (its span and its ledger) and
  of that its ledger: the ``memory`` step's.

The model, per second, for E evaluations/s, k evaluations per result event, P = E / k pairs and
S = P / f spans (f: the fraction of span-context events that ever get a result):

- process cores = E x process CPU per evaluation; pods = cores / (cores per pod x CPU target);
- Redis cores = E x Redis CPU per evaluation; shards = Redis cores x imbalance / Redis CPU target,
  or memory / memory per shard, whichever is more (a cluster has at least 3); REDIS_DEADLINE_SHARDS:
  4 per shard, a power of two from 16 to 4096 (each deadline index is one sorted set on one shard);
- Redis memory = (S - P) x TTL x bytes per span (a span without a result waits until its deadline)
  + P x TTL x (bytes per delivered pair - its ledger) (a joined span is kept until its deadline too)
  + P x (TTL + ledger grace) x ledger bytes per pair
  + P x match delay x bytes per result (as if every result came first and waited the whole delay),
  times the memory overhead (fragmentation, copy-on-write during an AOF rewrite, buffers).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

RATES = (1_000.0, 10_000.0, 100_000.0, 1_000_000.0)
CLUSTER_MIN_SHARDS = 3  # redis-cli --cluster create needs three primaries
CLUSTER_MAX_NODES = 1_000  # the Redis Cluster specification's design goal: linear scalability up to 1000 nodes
DEADLINE_SHARDS_MIN = 16  # REDIS_DEADLINE_SHARDS' default...
DEADLINE_SHARDS_MAX = 4_096  # ...and its largest value
DEADLINE_SHARDS_PER_SHARD = 4  # deadline-index shards per Redis primary: each index is one sorted set, on one shard
GIB = 2**30


@dataclass(frozen=True)
class CpuCosts:
    """CPU per evaluation with one kind of Redis: the consumer process's, and redis-server's (every shard's)."""

    process_cpu_ms_per_1000_evals: float
    redis_cpu_ms_per_1000_evals: float
    shard_imbalance: float  # the busiest shard's Redis CPU over the shards' mean (1.0: even, or a single Redis)
    source: str  # which step, how many drains, which Redis

    @classmethod
    def of(cls, drains: list[dict[str, Any]], source: str) -> CpuCosts:
        by_node = [d.get("redis_cpu_ms_per_1000_evals_by_node") or [1.0] for d in drains]
        return cls(process_cpu_ms_per_1000_evals=statistics.median(d["cpu_ms_per_1000_evals"] for d in drains),
                   redis_cpu_ms_per_1000_evals=statistics.median(d["redis_cpu_ms_per_1000_evals"] for d in drains),
                   shard_imbalance=statistics.median(max(nodes) / statistics.fmean(nodes) if sum(nodes) > 0 else 1.0
                                                     for nodes in by_node),
                   source=source)


@dataclass(frozen=True)
class Costs:
    """Per-evaluation costs measured by one benchmark run.

    The CPU differs with the Redis: on a single Redis the store takes a whole batch in one script call, on a
    cluster one call per join key (its keys must share a slot). ``single`` comes from the throughput step,
    ``cluster`` from the scale step; a run may have either or both.
    """

    single: CpuCosts | None
    cluster: CpuCosts | None
    bytes_per_span: float
    bytes_per_result: float
    bytes_per_joined_pair: float  # a delivered pair: its span (until its deadline) and its ledger entries
    ledger_bytes_per_pair: float  # of which the ledger (until TTL + grace after the delivery)
    evals_per_result: int
    span_event_bytes: int
    result_event_bytes: int

    @property
    def bytes_per_joined_span(self) -> float:
        """What a delivered pair keeps besides its ledger: its span, kept until its deadline."""
        return max(0.0, self.bytes_per_joined_pair - self.ledger_bytes_per_pair)

    @classmethod
    def from_results(cls, data: dict[str, Any]) -> Costs:
        """The costs in a ``python -m bench --json`` file's data; ``ValueError`` names a missing step."""
        figures = data.get("figures", {})
        evals = int(data.get("options", {}).get("traffic", {}).get("evals", 0))
        if evals < 1:
            raise ValueError("the file has no options.traffic.evals: is it a `python -m bench --json` file?")
        single = cluster = None
        if runs := figures.get("throughput"):
            # With several sizes (--pairs 20000,100000), the largest's runs: the closest to a deployment's steady
            # state. A file written before runs recorded their size has every run at 0.
            largest = max(run.get("pairs", 0) for run in runs)
            drains = [run["service"] for run in runs if run.get("pairs", 0) == largest]
            at = f" of {largest:,} pairs" if largest else ""
            single = CpuCosts.of(drains, f"throughput step, {len(drains)} drains{at}, a single Redis")
        if figures.get("scale"):
            points = figures["scale"]
            cluster = CpuCosts.of([p["drain"] for p in points],
                                  f"scale step, {len(points)} drains, {points[0]['shards']}-shard Redis Cluster")
        if single is None and cluster is None:
            raise ValueError("the run has neither a scale nor a throughput step: run `python -m bench` with "
                             "--steps throughput,memory,scale")
        memory = figures.get("memory")
        if not memory or memory.get("bytes_per_joined_pair") is None or memory.get("ledger_bytes_per_pair") is None:
            raise ValueError("the run has no memory step with bytes per joined pair and ledger: add --steps memory")
        return cls(
            single=single,
            cluster=cluster,
            bytes_per_span=float(memory["bytes_per_span"]),
            bytes_per_result=float(memory["bytes_per_result"]),
            bytes_per_joined_pair=float(memory["bytes_per_joined_pair"]),
            ledger_bytes_per_pair=float(memory["ledger_bytes_per_pair"]),
            evals_per_result=evals,
            span_event_bytes=int(memory["span_event_bytes"]),
            result_event_bytes=int(memory["result_event_bytes"]),
        )


@dataclass(frozen=True)
class Assumptions:
    """What the figures assume beyond the measurement; each is a flag of ``python -m bench.capacity``."""

    join_ttl_s: float = 86_400.0  # JOIN_TTL_SECONDS
    ledger_grace_s: float = 86_400.0  # LEDGER_GRACE_SECONDS
    match_delay_s: float = 300.0  # between a pair's two sides
    evaluated_fraction: float = 1.0  # of the span-context events published, the share that ever gets a result
    cores_per_pod: float = 1.0  # one pod = one consumer process; its event loop uses one core
    cpu_target: float = 0.6  # of a pod's cores, busy at the rate
    redis_cpu_target: float = 0.5  # of a Redis shard's one core (its main thread), busy at the rate
    redis_memory_overhead: float = 1.5  # used_memory x this = memory to provision
    shard_memory_gib: float = 16.0  # provisioned memory per Redis shard, at most
    partitions_per_pod: float = 2.0  # partitions per topic, per pod: room to add pods without adding partitions
    replicas: int = 1  # per Redis primary


@dataclass(frozen=True)
class Plan:
    """What a rate of evaluations per second needs."""

    evals_per_s: float
    pairs_per_s: float
    spans_per_s: float
    process_cores: float
    pods: int
    partitions: int
    redis_cores: float
    redis_memory_bytes: float  # used_memory at steady state, before the overhead
    redis_provisioned_bytes: float  # with the overhead
    shards_for_cpu: int
    shards_for_memory: int
    shards: int
    redis: str  # "single" (one Redis: the single-Redis CPU costs) or "cluster"
    measured_on: str  # the Redis the CPU costs were measured on: "single" or "cluster"
    nodes: int  # Redis nodes, replicas included
    deadline_shards: int  # REDIS_DEADLINE_SHARDS
    kafka_records_per_s: float
    kafka_mb_per_s: float


def plan(costs: Costs, assume: Assumptions, evals_per_s: float) -> Plan:
    """The pods, partitions, Redis shards and memory ``evals_per_s`` needs, at ``costs`` and under ``assume``.

    A single Redis is planned with the single-Redis CPU costs when one shard holds the memory and that CPU; anything
    larger is a Redis Cluster, planned with the cluster's costs (or the single Redis's, when the run has no cluster).
    """
    pairs = evals_per_s / costs.evals_per_result
    spans = pairs / assume.evaluated_fraction
    memory = ((spans - pairs) * assume.join_ttl_s * costs.bytes_per_span
              + pairs * assume.join_ttl_s * costs.bytes_per_joined_span
              + pairs * (assume.join_ttl_s + assume.ledger_grace_s) * costs.ledger_bytes_per_pair
              + pairs * assume.match_delay_s * costs.bytes_per_result)
    provisioned = memory * assume.redis_memory_overhead
    for_memory = max(1, math.ceil(provisioned / (assume.shard_memory_gib * GIB)))

    def for_cpu(cpu: CpuCosts) -> int:
        return max(1, math.ceil(evals_per_s * cpu.redis_cpu_ms_per_1000_evals / 1e6 * cpu.shard_imbalance
                                / assume.redis_cpu_target))

    if costs.single is not None and for_memory == 1 and for_cpu(costs.single) == 1:
        cpu, redis, measured_on = costs.single, "single", "single"
    elif costs.cluster is not None:
        cpu, redis, measured_on = costs.cluster, "cluster", "cluster"
    else:
        assert costs.single is not None  # from_results refuses a run with neither
        cpu, redis, measured_on = costs.single, "cluster", "single"
    shards = max(for_cpu(cpu), for_memory)
    if redis == "cluster":
        shards = max(shards, CLUSTER_MIN_SHARDS)
    process_cores = evals_per_s * cpu.process_cpu_ms_per_1000_evals / 1e6
    pods = max(1, math.ceil(process_cores / (assume.cores_per_pod * assume.cpu_target)))
    return Plan(evals_per_s=evals_per_s, pairs_per_s=pairs, spans_per_s=spans, process_cores=process_cores, pods=pods,
                partitions=max(pods, math.ceil(pods * assume.partitions_per_pod)),
                redis_cores=evals_per_s * cpu.redis_cpu_ms_per_1000_evals / 1e6,
                redis_memory_bytes=memory, redis_provisioned_bytes=provisioned, shards_for_cpu=for_cpu(cpu),
                shards_for_memory=for_memory, shards=shards, redis=redis, measured_on=measured_on,
                nodes=shards * (1 + assume.replicas),
                deadline_shards=min(DEADLINE_SHARDS_MAX, max(DEADLINE_SHARDS_MIN, 2 ** math.ceil(
                    math.log2(shards * DEADLINE_SHARDS_PER_SHARD)))),
                kafka_records_per_s=spans + pairs,
                kafka_mb_per_s=(spans * costs.span_event_bytes + pairs * costs.result_event_bytes) / 1e6)


def _rate(value: float) -> str:
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _gib(value: float) -> str:
    return f"{value / GIB:,.1f} GiB" if value >= GIB / 10 else f"{value / 2**20:,.0f} MiB"


def render(costs: Costs, assume: Assumptions, rates: tuple[float, ...]) -> str:
    """The inputs, the assumptions and a table with one column per rate (Markdown)."""
    plans = [plan(costs, assume, rate) for rate in rates]
    lines = ["Measured:", ""]
    for cpu in filter(None, (costs.single, costs.cluster)):
        shards = "" if cpu is costs.single else f" (all shards; the busiest x{cpu.shard_imbalance:.2f} the mean)"
        lines.append(f"- {cpu.source}: process CPU {cpu.process_cpu_ms_per_1000_evals:,.0f} ms, redis-server CPU "
                     f"{cpu.redis_cpu_ms_per_1000_evals:,.0f} ms per 1,000 evaluations{shards}")
    lines += [
        f"- memory step: Redis bytes: {costs.bytes_per_span:,.0f} per waiting span ({costs.span_event_bytes} B event), "
        f"{costs.bytes_per_result:,.0f} per waiting result ({costs.result_event_bytes} B event), "
        f"{costs.bytes_per_joined_pair:,.0f} per delivered pair (its span {costs.bytes_per_joined_span:,.0f}, "
        f"its ledger {costs.ledger_bytes_per_pair:,.0f})",
        f"- {costs.evals_per_result} evaluations per result event",
        "",
        "Assumed:",
        "",
        f"- join TTL {assume.join_ttl_s / 3600:g} h, ledger grace {assume.ledger_grace_s / 3600:g} h, "
        f"match delay {assume.match_delay_s:g} s (every result waits it, as if it came first)",
        f"- {assume.evaluated_fraction:.0%} of the span-context events get a result (the rest wait the TTL)",
        f"- one pod = one process = {assume.cores_per_pod:g} core(s), {assume.cpu_target:.0%} busy; "
        f"{assume.partitions_per_pod:g} partitions per topic per pod",
        f"- a Redis shard's main thread {assume.redis_cpu_target:.0%} busy; memory to provision = used_memory x "
        f"{assume.redis_memory_overhead:g}, at most {assume.shard_memory_gib:g} GiB per shard; memory of the "
        f"primaries (each replica holds as much again); {DEADLINE_SHARDS_PER_SHARD} deadline-index shards per "
        "primary",
        "",
    ]
    rows: list[tuple[str, ...]] = [
        ("evaluations/s", *(_rate(p.evals_per_s) for p in plans)),
        ("pairs/s (spans/s)", *(f"{_rate(p.pairs_per_s)} ({_rate(p.spans_per_s)})" for p in plans)),
        ("Kafka records/s in (MB/s)", *(f"{_rate(p.kafka_records_per_s)} ({p.kafka_mb_per_s:,.1f})" for p in plans)),
        ("consumer cores busy", *(f"{p.process_cores:,.1f}" for p in plans)),
        ("pods", *(f"{p.pods:,}" for p in plans)),
        ("partitions per topic", *(f"{p.partitions:,}" for p in plans)),
        ("Redis cores busy", *(f"{p.redis_cores:,.1f}" for p in plans)),
        ("Redis used_memory", *(_gib(p.redis_memory_bytes) for p in plans)),
        ("Redis memory to provision", *(_gib(p.redis_provisioned_bytes) for p in plans)),
        ("Redis shards for CPU / for memory", *(f"{p.shards_for_cpu:,} / {p.shards_for_memory:,}" for p in plans)),
        ("Redis", *(("one Redis" if p.redis == "single" else "Redis Cluster")
                    + ("" if p.redis == p.measured_on else " *") for p in plans)),
        ("Redis shards (primaries)", *(f"{p.shards:,}" for p in plans)),
        (f"Redis nodes, {assume.replicas} replica(s) each", *(f"{p.nodes:,}" for p in plans)),
        ("REDIS_DEADLINE_SHARDS", *(f"{p.deadline_shards:,}" for p in plans)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)) + " |")
        if i == 0:
            lines.append("| " + " | ".join("-" * widths[0] if j == 0 else "-" * (widths[j] - 1) + ":"
                                           for j in range(len(row))) + " |")
    if any(p.redis != p.measured_on for p in plans):
        lines += ["", "* planned with the CPU measured on a single Redis: a cluster costs more per evaluation (one "
                  "script call per join key instead of per batch); add the scale step to the run."]
    if too_big := [p for p in plans if p.nodes > CLUSTER_MAX_NODES]:
        lines += ["", f"Beyond {CLUSTER_MAX_NODES:,} nodes (the Redis Cluster specification's limit of linear scaling) "
                  f"at {', '.join(_rate(p.evals_per_s) for p in too_big)} evaluations/s: split the traffic over "
                  "several deployments (by ml_app, each with its own topics and Redis), or lower the memory per "
                  "second (a shorter TTL and ledger grace, fewer spans that never get a result)."]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    d = Assumptions()
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="the JSON file of `python -m bench --json FILE`")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES), help="evaluations per second, comma-separated")
    p.add_argument("--ttl-hours", type=float, default=d.join_ttl_s / 3600, help="JOIN_TTL_SECONDS, in hours")
    p.add_argument("--ledger-grace-hours", type=float, default=d.ledger_grace_s / 3600,
                   help="LEDGER_GRACE_SECONDS, in hours")
    p.add_argument("--match-delay-s", type=float, default=d.match_delay_s, help="between a pair's two sides")
    p.add_argument("--evaluated-fraction", type=float, default=d.evaluated_fraction,
                   help="share of the span-context events that ever get a result")
    p.add_argument("--cores-per-pod", type=float, default=d.cores_per_pod)
    p.add_argument("--cpu-target", type=float, default=d.cpu_target, help="share of a pod's cores busy at the rate")
    p.add_argument("--redis-cpu-target", type=float, default=d.redis_cpu_target,
                   help="share of a Redis shard's core busy at the rate")
    p.add_argument("--redis-memory-overhead", type=float, default=d.redis_memory_overhead,
                   help="memory to provision over Redis used_memory")
    p.add_argument("--shard-memory-gib", type=float, default=d.shard_memory_gib, help="most memory per Redis shard")
    p.add_argument("--partitions-per-pod", type=float, default=d.partitions_per_pod)
    p.add_argument("--replicas", type=int, default=d.replicas, help="per Redis primary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0 < args.evaluated_fraction <= 1 or not 0 < args.cpu_target <= 1 or not 0 < args.redis_cpu_target <= 1:
        raise SystemExit("--evaluated-fraction, --cpu-target and --redis-cpu-target are fractions in (0, 1]")
    try:
        costs = Costs.from_results(orjson.loads(args.results.read_bytes()))
    except ValueError as exc:
        raise SystemExit(f"{args.results}: {exc}") from exc
    assume = Assumptions(join_ttl_s=args.ttl_hours * 3600, ledger_grace_s=args.ledger_grace_hours * 3600,
                         match_delay_s=args.match_delay_s, evaluated_fraction=args.evaluated_fraction,
                         cores_per_pod=args.cores_per_pod, cpu_target=args.cpu_target,
                         redis_cpu_target=args.redis_cpu_target, redis_memory_overhead=args.redis_memory_overhead,
                         shard_memory_gib=args.shard_memory_gib, partitions_per_pod=args.partitions_per_pod,
                         replicas=args.replicas)
    rates = tuple(float(part) for part in args.rates.split(",") if part)
    sys.stdout.write(render(costs, assume, rates) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Assumptions", "Costs", "Plan", "main", "plan", "render"]
