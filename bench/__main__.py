"""``python -m bench``: run the benchmark and print the table (``--help`` for every flag).

Starts what it is not given: a Kafka broker (KRaft, one node), a redis-server (AOF,
``appendfsync always``, as the README asks of production) and, for the scale step, a Redis Cluster
(the same persistence on each node) on 127.0.0.1 free ports, and always the line-rate intake
stand-in; all are stopped before it exits. Exit code 0 when every measurement ran
and every matched pair was delivered, 1 otherwise: a target NOT met does not change it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from bench.intake import LineRateIntake
from bench.peers import LABELS, PEERS, Peer
from bench.results import Drain, Figures, Scaling, Throughput, max_pairs_per_s, median, plain, scale_ratios
from bench.runner import (
    ROOT,
    Env,
    Options,
    bare,
    buffered,
    drain,
    guide,
    latency,
    memory,
    prepared,
    redis_cluster_env,
    scale,
    soak,
    timed,
)
from bench.traffic import ORDERS, TrafficSpec
from localenv.kafka import KafkaBroker
from localenv.redis import RedisSentinelSet, RedisServer

STEPS = ("throughput", "latency", "memory", "buffered", "scaling", "scale", "soak", "guide", *PEERS)
# The targets the table judges against (docs/performance.md explains each). Ratios are taken within one run (same
# records, same minute), then the median over the runs; a target NOT met is a verdict, not a failed run.
TARGET_RATIO = 0.5  # service records/s at least half the bare consumer's
# Evaluations per CPU-second, the service process and redis-server together, at least this many times each peer's
# (Throughput.cpu_ratio). The performance issue judges it at 100,000 pairs; the table judges it at every size.
TARGET_PEER_CPU_RATIO = 2.0
# Service records/s at least this many times the faster peer's in the same run (Throughput.fastest_peer_ratio).
TARGET_FASTEST_PEER_RATIO = 1.5
TARGET_P99_LOAD = 0.5  # the latency target applies at half the maximal load (pairs/s at the largest size)...
TARGET_P99_MS = 100.0  # ...where the p99 join latency is at most this
TARGET_SIDE_BYTES = 300  # Redis bytes per buffered side, a span and a result alike
# Service peak RSS at most this fraction of Quix Streams' (Throughput.rss_ratio("quix"); redis-server not counted).
TARGET_QUIX_RSS_RATIO = 1 / 3
RSS_TARGET_PEER = "quix"  # the peer the RSS target is about
# Process CPU per 1,000 evaluations at most this fraction of the --before-root checkout's (Throughput.before_cpu_ratio).
TARGET_BEFORE_CPU_RATIO = 1 / 3
TARGET_BUFFERED_CHANGE = 0.15  # CPU per evaluation with many sides buffered, against the fewest
# --smoke: these flags' values, where the command line left them at their defaults (every step runs, peers too).
SMOKE: dict[str, Any] = {"pairs": (300, 600), "runs": 1, "latency_seconds": 3.0, "latency_loads": (0.5,),
                         "memory_sides": 300, "buffered": (100,), "buffered_pairs": 200, "scaling": (1,),
                         "scale": (1, 2),
                         "soak_seconds": 5.0, "guide_sizes": (200, 400)}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(part)) for part in text.split(",") if part)


def _sizes(text: str) -> tuple[int, ...]:
    sizes = _ints(text)
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes separated by commas, got {text!r}")
    return sizes


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part)


def parser() -> argparse.ArgumentParser:
    d = Options()
    traffic = d.traffic
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t = p.add_argument_group("traffic")
    t.add_argument("--pairs", type=_sizes, default=(traffic.pairs,),
                   help="pairs per throughput run: comma-separated sizes, each run --runs times (e.g. 20000,100000); "
                        "the other steps use the first, latency and soak the largest's pairs/s as the maximum")
    t.add_argument("--apps", type=int, default=traffic.apps, help="ml_apps the pairs spread over")
    t.add_argument("--evals", type=int, default=traffic.evals, help="evaluations per result event (per span)")
    t.add_argument("--order", choices=ORDERS, default=traffic.order, help="which side of a pair is produced first")
    t.add_argument("--lag-ms", type=float, default=traffic.lag_ms, help="delay of a pair's second side")
    t.add_argument("--duplicates", type=float, default=traffic.duplicates, help="fraction of sides produced twice")
    t.add_argument("--unmatched", type=float, default=traffic.unmatched, help="fraction of pairs with one side only")
    t.add_argument("--seed", type=int, default=traffic.seed)
    s = p.add_argument_group("service")
    s.add_argument("--partitions", type=int, default=d.partitions, help="partitions per topic (one consumer)")
    s.add_argument("--max-batch", type=int, default=d.max_batch, help="KAFKA_MAX_BATCH of the service")
    s.add_argument("--uvloop", action="store_true", help="run the service on uvloop (needs the bench extra)")
    s.add_argument("--service-root", type=Path, help="run the service from this checkout (e.g. a git worktree)")
    s.add_argument("--before-root", type=Path,
                   help="an older checkout (e.g. a git worktree): each throughput run also drains its records with "
                        "this checkout's service, judged on process CPU per evaluation, before -> now")
    s.add_argument("--profile", metavar="FILE", help="pyinstrument text profile of the first throughput run")
    m = p.add_argument_group("measurements")
    m.add_argument("--steps", default=",".join(d.steps), help=f"comma-separated subset of {','.join(STEPS)}")
    m.add_argument("--runs", type=int, default=d.runs, help="throughput runs per size (medians are reported)")
    m.add_argument("--latency-seconds", type=float, default=d.latency_seconds, help="traffic per latency load")
    m.add_argument("--latency-loads", type=_floats, default=d.latency_loads, help="fractions of the max")
    m.add_argument("--max-pairs-per-s", type=float, default=d.max_pairs_per_s,
                   help="the maximum the latency and soak loads are fractions of, instead of the throughput step's "
                        "(to compare two checkouts at the same rates); the throughput step then runs only if asked")
    m.add_argument("--memory-sides", type=int, default=d.memory_sides, help="sides buffered to measure memory")
    m.add_argument("--buffered", type=_ints, default=d.buffered, help="sides already buffered, per cost run")
    m.add_argument("--buffered-pairs", type=int, default=d.buffered_pairs, help="pairs per cost run")
    m.add_argument("--scaling", type=_ints, default=d.scaling, help="partitions = consumer processes")
    m.add_argument("--scale", type=_ints, default=d.scale,
                   help="consumer processes draining max(N) partitions against a Redis Cluster (the scale step)")
    m.add_argument("--scale-shards", type=int, default=d.scale_shards,
                   help="primaries of the Redis Cluster the scale step starts (at least 3)")
    m.add_argument("--soak-seconds", type=float, default=d.soak_seconds)
    m.add_argument("--soak-load", type=float, default=d.soak_load, help="fraction of the max during the soak")
    m.add_argument("--guide-sizes", type=_ints, default=d.guide_sizes, help="pairs per guide-join run")
    m.add_argument("--guide-budget", type=float, default=d.guide_budget_s, help="seconds before a size is given up")
    m.add_argument("--peer-commit-ms", type=int, default=d.peer_commit_ms,
                   help="commit interval of the peers (quix, kstreams); they post what they joined at each commit")
    m.add_argument("--smoke", action="store_true", help="tiny sizes, for CI: " + ", ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in SMOKE.items()))
    e = p.add_argument_group("environment")
    e.add_argument("--bootstrap", help="use this Kafka instead of starting one")
    e.add_argument("--redis-url", help="use this Redis (standalone) instead of starting one")
    e.add_argument("--redis-cluster-url", help="the scale step: use this Redis Cluster (any node), not one of its own")
    e.add_argument("--appendfsync", default="always", choices=("always", "everysec", "no"),
                   help="AOF policy of the redis-server the benchmark starts")
    e.add_argument("--redis-replicas", type=int, default=0,
                   help="start the Redis as a primary with this many replicas (the service uses the primary)")
    e.add_argument("--redis-wait-replicas", type=int, default=0,
                   help="REDIS_WAIT_REPLICAS of the service: writes wait for this many replicas")
    e.add_argument("--workdir", type=Path, default=d.workdir, help="consumer logs, guide files, profile")
    e.add_argument("--json", type=Path, help="also write every figure here")
    return p


def options(args: argparse.Namespace) -> Options:
    if args.smoke:
        defaults = parser().parse_args([])
        for key, value in SMOKE.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    steps = tuple(s for s in args.steps.split(",") if s)
    if args.before_root is not None and not (args.before_root / "consumer").is_dir():
        raise SystemExit(f"--before-root {args.before_root}: no checkout of the service there (no consumer/)")
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps: {', '.join(sorted(unknown))}")
    opts = Options(
        traffic=TrafficSpec(pairs=args.pairs[0], apps=args.apps, evals=args.evals, order=args.order, lag_ms=args.lag_ms,
                            duplicates=args.duplicates, unmatched=args.unmatched, seed=args.seed),
        partitions=args.partitions, max_batch=args.max_batch, runs=args.runs, latency_seconds=args.latency_seconds,
        latency_loads=args.latency_loads, max_pairs_per_s=args.max_pairs_per_s, memory_sides=args.memory_sides,
        buffered=args.buffered,
        buffered_pairs=args.buffered_pairs, scaling=args.scaling, scale=args.scale, scale_shards=args.scale_shards,
        soak_seconds=args.soak_seconds,
        soak_load=args.soak_load, guide_sizes=args.guide_sizes, guide_budget_s=args.guide_budget, steps=steps,
        peer_commit_ms=args.peer_commit_ms,
        uvloop=args.uvloop, profile=args.profile, workdir=args.workdir,
        service_root=args.service_root.resolve() if args.service_root else None,
        throughput_pairs=args.pairs, before_root=args.before_root.resolve() if args.before_root else None,
    )
    if opts.before_root is not None and not opts.drains:
        raise SystemExit(f"--before-root drains each throughput run's records again, and --steps {args.steps} "
                         "runs no throughput run: add the throughput step")
    return opts


# -- the run ---------------------------------------------------------------------------------------


async def measure(env: Env, opts: Options) -> Figures:
    figures = Figures()
    steps = set(opts.steps)
    peers = [Peer.prepare(name) for name in PEERS if name in steps]  # built or installed before any timing
    maximum = 0.0
    if opts.drains:
        runs = max(1, opts.runs)
        for size in opts.sizes:
            for i in range(runs):
                run = await throughput_run(env, opts, peers, size, i, first=not figures.throughput)
                figures.throughput.append(run)
        maximum = max_pairs_per_s(figures.throughput)
    maximum = opts.max_pairs_per_s or maximum
    if "latency" in steps:
        with timed("latency"):
            figures.latency = await latency(env, opts, maximum)
        for peer in peers:  # at the same loads: fractions of the service's maximum
            with timed(f"latency: {peer.label}"):
                figures.latency += await latency(env, opts, maximum, peer)
    if "memory" in steps:
        with timed("redis memory"):
            figures.memory = await memory(env, opts)
    if "buffered" in steps:
        with timed("per-event cost with buffered sides"):
            figures.buffered = await buffered(env, opts)
    if "scaling" in steps:
        for n in opts.scaling:
            with timed(f"scaling: {n} partitions / processes"):
                result, _ = await drain(env, opts, name=f"scaling-{n}", pairs_count=opts.traffic.pairs, partitions=n,
                                        consumers=n)
            figures.scaling.append(Scaling(n, result))
    if "scale" in steps:
        async with redis_cluster_env(env, opts.scale_shards, env.cluster_url) as cluster:
            figures.scale = await scale(cluster, opts)
    if "soak" in steps:
        with timed(f"soak {opts.soak_seconds:.0f}s"):
            figures.soak = await soak(env, opts, maximum)
    if "guide" in steps:
        with timed("the guide's batch join"):
            figures.guide = await guide(env, opts)
    return figures


async def throughput_run(env: Env, opts: Options, peers: list[Peer], size: int, i: int, *, first: bool) -> Throughput:
    """One throughput run of ``size`` pairs: the service drains fresh topics, then the bare consumer, the
    --before-root checkout's service and each peer read the same records again (each under a group of its own).
    With --before-root, every second run drains the before checkout first, so that neither version is always the
    one that reads the records first."""
    step = f"throughput at {size:,} pairs, run {i + 1}/{max(1, opts.runs)}"
    name = f"throughput-{size}-{i}"
    preloaded = await prepared(env, opts, name=name, pairs_count=size, partitions=opts.partitions)
    before: Drain | None = None

    async def drain_before() -> Drain:  # its own group and key prefix: it finds none of the service's sides
        assert opts.before_root is not None
        with timed(f"{step}: before ({opts.before_root})"):
            return (await drain(env, opts, name=f"{name}-before", pairs_count=size, partitions=opts.partitions,
                                consumers=1, preloaded=preloaded.regrouped("before"),
                                service_root=opts.before_root))[0]

    if opts.before_root is not None and i % 2 == 1:
        before = await drain_before()
    with timed(f"{step}: service"):
        profile = Path(opts.profile) if opts.profile and first else None
        service, _ = await drain(env, opts, name=name, pairs_count=size, partitions=opts.partitions,
                                 consumers=1, profile=profile, preloaded=preloaded)
    with timed(f"{step}: bare consumer"):
        run = Throughput(service, await bare(env, preloaded.run, service.total_records, opts.max_batch), pairs=size)
    if opts.before_root is not None and before is None:
        before = await drain_before()
    run.before = before
    for peer in peers:  # the same records, read again by a group of the peer's own
        with timed(f"{step}: {peer.label}"):
            run.peers[peer.name], _ = await drain(env, opts, name=f"{name}-{peer.name}", pairs_count=size,
                                                  partitions=opts.partitions, consumers=1, peer=peer,
                                                  preloaded=preloaded)
    return run


# -- the table -------------------------------------------------------------------------------------


def _n(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "-"
    return f"{value:,.{digits}f}"


def by_size(runs: list[Throughput]) -> dict[int, list[Throughput]]:
    """The throughput runs grouped by their size, in the order the sizes ran."""
    out: dict[int, list[Throughput]] = {}
    for run in runs:
        out.setdefault(run.pairs, []).append(run)
    return out


def render(opts: Options, figures: Figures, heading: str) -> tuple[str, bool]:
    rows: list[tuple[str, str, str, str]] = []
    ok = True

    def row(measure: str, value: str, target: str = "", verdict: str = "") -> None:
        rows.append((measure, value, target, verdict))

    def met(condition: bool) -> str:
        return "met" if condition else "NOT met"

    for size, runs in by_size(figures.throughput).items():
        n = len(runs)
        row(f"throughput at {size:,} pairs (median of {n} run{'s' if n > 1 else ''}):" if size
            else f"throughput (median of {n} runs):", "")
        delivered = all(r.service.delivered_all for r in runs)
        ok &= delivered
        ratio = median([r.ratio for r in runs])
        row("  bare aiokafka consumer, records/s", _n(median([r.bare.records_per_s for r in runs])))
        row("  service, records/s", _n(median([r.service.records_per_s for r in runs])))
        row("  service, pairs/s", _n(median([r.service.pairs_per_s for r in runs])))
        row("  service, evaluations/s", _n(median([r.service.evaluations_per_s for r in runs])))
        row("  service / bare consumer (ratio per run, median)", f"{ratio:.2f}", f">= {TARGET_RATIO:.2f}",
            met(ratio >= TARGET_RATIO))
        row("  service CPU ms per 1,000 evaluations", _n(median([r.service.cpu_ms_per_1000_evals for r in runs])))
        row("  redis-server CPU ms per 1,000 evaluations",
            _n(median([r.service.redis_cpu_ms_per_1000_evals for r in runs])))
        row("  service peak RSS, MB (redis-server not counted)", _n(median([r.service.peak_rss_mb for r in runs])))
        row("  bare consumer CPU ms per 1,000 records", _n(median([r.bare.cpu_ms_per_1000_records for r in runs])))
        row("  every matched pair delivered", "yes" if delivered else "NO")
        befores = [r.before for r in runs if r.before is not None]
        if befores:
            before_ok = len(befores) == n and all(d.delivered_all for d in befores)
            ok &= before_ok
            change = median([r.before_cpu_ratio() for r in runs if r.before is not None])
            where = opts.before_root or "before"
            row(f"  process CPU ms per 1,000 evaluations, before ({where}) -> now",
                f"{_n(median([d.cpu_ms_per_1000_evals for d in befores]))} -> "
                f"{_n(median([r.service.cpu_ms_per_1000_evals for r in runs]))} (x{change:.2f})",
                f"<= x{TARGET_BEFORE_CPU_RATIO:.2f}", met(change <= TARGET_BEFORE_CPU_RATIO))
            row("  before: records/s, redis-server CPU ms per 1,000 evaluations",
                f"{_n(median([d.records_per_s for d in befores]))}, "
                f"{_n(median([d.redis_cpu_ms_per_1000_evals for d in befores]))}")
            row("  before: every matched pair delivered", "yes" if before_ok else "NO", "",
                "" if before_ok else f"{sum(d.missing for d in befores)} pairs MISSING")
        names = list(runs[0].peers)
        for name in names:
            # Each ratio is taken within one run (same traffic, same minute), then the median of the runs.
            label = LABELS[name]
            drains = [r.peers[name] for r in runs]
            peer_ok = all(d.delivered_all for d in drains)
            ok &= peer_ok
            speed = median([r.records_ratio(name) for r in runs])
            row(f"  {label}: records/s (evaljoin x)", f"{_n(median([d.records_per_s for d in drains]))} (x{speed:.2f})")
            cpu = median([r.cpu_ratio(name) for r in runs])
            row(f"  {label}: CPU ms per 1,000 evaluations (evaljoin evals per CPU-s x, with Redis)",
                f"{_n(median([d.cpu_ms_per_1000_evals for d in drains]))} (x{cpu:.2f})",
                f">= x{TARGET_PEER_CPU_RATIO:.2f}", met(cpu >= TARGET_PEER_CPU_RATIO))
            rss = median([r.rss_ratio(name) for r in runs])
            judged = name == RSS_TARGET_PEER
            row(f"  {label}: peak RSS, MB (evaljoin's RSS x)", f"{_n(median([d.peak_rss_mb for d in drains]))} "
                f"(x{rss:.2f})", f"<= x{TARGET_QUIX_RSS_RATIO:.2f}" if judged else "",
                met(rss <= TARGET_QUIX_RSS_RATIO) if judged else "")
            row(f"  {label}: every matched pair delivered (evaluations delivered twice)",
                f"{'yes' if peer_ok else 'NO'} ({sum(d.duplicates for d in drains):,})", "",
                "" if peer_ok else f"{sum(d.missing for d in drains)} pairs MISSING, "
                f"{sum(d.mismatched for d in drains)} metrics not build_metric's")
        if names:
            fastest = median([r.fastest_peer_ratio() for r in runs])
            row("  service / faster peer, records/s (ratio per run, median)", f"x{fastest:.2f}",
                f">= x{TARGET_FASTEST_PEER_RATIO:.2f}", met(fastest >= TARGET_FASTEST_PEER_RATIO))
    for lat in figures.latency:
        if lat.process != "evaljoin":
            row(f"{LABELS[lat.process]}: delivery latency at {lat.load:.0%} ({_n(lat.pairs_per_s)} pairs/s), "
                "p50/p95/p99 ms", f"{_n(lat.p50_ms)} / {_n(lat.p95_ms)} / {_n(lat.p99_ms)}")
        else:
            target = f"p99 <= {TARGET_P99_MS:g} ms" if lat.load == TARGET_P99_LOAD else ""
            verdict = met(lat.p99_ms <= TARGET_P99_MS) if target else ""
            row(f"join latency at {lat.load:.0%} ({_n(lat.pairs_per_s)} pairs/s), p50/p95/p99 ms",
                f"{_n(lat.p50_ms)} / {_n(lat.p95_ms)} / {_n(lat.p99_ms)}", target, verdict)
        if lat.cpu_ms_per_1000_evals is not None:
            row(f"  {LABELS.get(lat.process, 'service')} process CPU ms per 1,000 evaluations at {lat.load:.0%}",
                _n(lat.cpu_ms_per_1000_evals))
        if lat.delivered < lat.matched:
            ok = False
            row(f"  delivered at {lat.load:.0%}", f"{lat.delivered} of {lat.matched} pairs", "", "MISSING")
    if mem := figures.memory:
        for kind, per, event_bytes in (("span", mem.bytes_per_span, mem.span_event_bytes),
                                       ("result", mem.bytes_per_result, mem.result_event_bytes)):
            row(f"Redis bytes per buffered {kind} ({event_bytes} B event)", _n(per), f"<= {TARGET_SIDE_BYTES}",
                met(per <= TARGET_SIDE_BYTES))
        if mem.bytes_per_joined_pair is not None and mem.ledger_bytes_per_pair is not None:
            row("Redis bytes kept per delivered pair until its deadline (of which its ledger)",
                f"{_n(mem.bytes_per_joined_pair)} ({_n(mem.ledger_bytes_per_pair)})")
    if figures.buffered:
        # The verdict is on CPU per evaluation (medians of --runs drains): the cost itself. Wall time per
        # record is shown too; on a shared machine it moves with whatever else runs.
        first = figures.buffered[0]
        for cost in figures.buffered:
            change = cost.cpu_ms_per_1000_evals / first.cpu_ms_per_1000_evals - 1
            judged = cost is not first
            row(f"cost with {cost.sides:,} sides buffered: CPU ms/1k evals (us per record)",
                f"{_n(cost.cpu_ms_per_1000_evals)} ({_n(cost.us_per_record)})",
                f"within {TARGET_BUFFERED_CHANGE:.0%}" if judged else "",
                met(abs(change) <= TARGET_BUFFERED_CHANGE) + f" ({change:+.0%})" if judged else "")
            ok &= cost.delivered_all
    if figures.scaling:
        base = figures.scaling[0].drain.records_per_s
        for point in figures.scaling:
            d = point.drain
            ok &= d.delivered_all
            row(f"{point.processes} partition(s) / process(es): records/s, pairs/s",
                f"{_n(d.records_per_s)}, {_n(d.pairs_per_s)}", "", f"x{d.records_per_s / base:.2f}")
    if figures.scale:
        points = figures.scale
        ok &= all(p.drain.delivered_all for p in points)
        where = f"{points[0].partitions} partitions, {points[0].shards}-shard Redis Cluster"
        rounds = len({p.round for p in points})
        for processes, ratio in scale_ratios(points).items():
            drains = [p.drain for p in points if p.processes == processes]
            row(f"{processes} process(es), {where}: records/s, evaluations/s (median of {rounds})",
                f"{_n(median([d.records_per_s for d in drains]))}, {_n(median([d.evaluations_per_s for d in drains]))}",
                "", f"x{ratio:.2f}")
        drains = [p.drain for p in points]
        row(f"{where}: process CPU ms per 1,000 evaluations (median of every drain)",
            _n(median([d.cpu_ms_per_1000_evals for d in drains])))
        shards = range(points[0].shards)
        per_shard = [median([d.redis_cpu_ms_per_1000_evals_by_node[i] for d in drains]) for i in shards]
        row(f"{where}: redis-server CPU ms per 1,000 evaluations, each shard (all)",
            " / ".join(_n(v, 1) for v in per_shard) + f" ({_n(sum(per_shard), 1)})")
        per_drain = [sum(d.redis_memory_bytes_by_node) for d in drains]
        shares = [median([d.redis_memory_bytes_by_node[i] / total for d, total in zip(drains, per_drain, strict=True)
                          if total > 0]) for i in shards]
        row(f"{where}: share of the memory each drain added, each shard", " / ".join(f"{v:.0%}" for v in shares))
        row(f"{where}: every matched pair delivered", "yes" if all(d.delivered_all for d in drains) else "NO")
    if sk := figures.soak:
        row(f"consumer RSS over a {sk.seconds:.0f} s soak at {_n(sk.pairs_per_s)} pairs/s, MB start/end/max",
            f"{sk.rss_start_mb:.1f} / {sk.rss_end_mb:.1f} / {sk.rss_max_mb:.1f}", "flat", met(sk.flat))
    if figures.guide:
        service_rate = max_pairs_per_s(figures.throughput)
        for join in figures.guide:
            if math.isinf(join.seconds):
                row(f"guide's batch join, {join.pairs:,} pairs", f"> {opts.guide_budget_s:.0f} s", "", "gave up")
                continue
            row(f"guide's batch join, {join.pairs:,} pairs: s (pairs/s)",
                f"{join.seconds:.2f} ({_n(join.pairs_per_s)})", "",
                f"service x{service_rate / join.pairs_per_s:.2f}" if service_rate == service_rate else "")
    widths = [max(len(r[i]) for r in [("measure", "value", "target", "verdict"), *rows]) for i in range(4)]
    lines = [heading, ""]
    for i, r in enumerate([("measure", "value", "target", "verdict"), *rows]):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines), ok


def revision(root: Path) -> str:
    """``git rev-parse --short HEAD`` of a checkout, or why not."""
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 else f"(no git revision: {done.stderr.strip()})"


def headline(opts: Options) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    t = opts.traffic
    names = [LABELS[name] for name in PEERS if name in opts.steps]
    peers = (f"\npeers: {', '.join(names)}, each committing (and posting) every {opts.peer_commit_ms} ms or "
             f"{opts.max_batch} records") if names else ""
    sizes = opts.sizes
    pairs = f"{t.pairs:,} pairs" if len(sizes) == 1 else \
        f"{' and '.join(f'{n:,}' for n in sizes)} pairs (throughput; {t.pairs:,} for the other steps)"
    now = opts.service_root or ROOT
    before = (f"\nbefore: {opts.before_root} at {revision(opts.before_root)}; now: {now} at {revision(now)}"
              if opts.before_root else "")
    return (f"evaljoin benchmark: {pairs}, {t.apps} apps, {t.evals} evals/pair, order {t.order}, "
            f"lag {t.lag_ms:g} ms, {t.duplicates:.0%} duplicates, {t.unmatched:.0%} unmatched, "
            f"{opts.partitions} partitions, batch {opts.max_batch}{', uvloop' if opts.uvloop else ''}"
            f"{peers}{before}\n"
            f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
            f"load average at start {load[0]:.2f}")


async def amain(opts: Options, args: argparse.Namespace) -> int:
    opts.workdir.mkdir(parents=True, exist_ok=True)
    heading = headline(opts)
    with contextlib.ExitStack() as stack:
        bootstrap = args.bootstrap
        if not bootstrap:
            with timed("starting Kafka"):
                bootstrap = stack.enter_context(KafkaBroker()).bootstrap_servers
        redis_url = args.redis_url
        if not redis_url and args.redis_replicas:
            replicated = stack.enter_context(RedisSentinelSet(replicas=args.redis_replicas))
            redis_url = f"redis://127.0.0.1:{replicated.primary_port}/0"
        elif not redis_url:
            redis_url = stack.enter_context(RedisServer(appendfsync=args.appendfsync)).url
        intake = stack.enter_context(LineRateIntake())
        env = Env(bootstrap=bootstrap, redis_url=redis_url, intake=intake, workdir=opts.workdir,
                  redis_wait_replicas=args.redis_wait_replicas,
                  cluster_url=args.redis_cluster_url)
        figures = await measure(env, opts)
    table, ok = render(opts, figures, heading)
    sys.stdout.write(table + "\n")
    if args.json:
        args.json.write_bytes(orjson.dumps({"options": plain(opts), "figures": figures.as_json(), "table": table},
                                           default=str, option=orjson.OPT_INDENT_2))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return asyncio.run(amain(options(args), args))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["main"]
