"""The capacity calculation (``python -m bench.capacity``): from a benchmark's JSON figures to a deployment."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.capacity import Assumptions, Costs, CpuCosts, main, plan, render

pytestmark = pytest.mark.unit

SINGLE = CpuCosts(process_cpu_ms_per_1000_evals=50.0, redis_cpu_ms_per_1000_evals=10.0, shard_imbalance=1.0,
                  source="single")
CLUSTER = CpuCosts(process_cpu_ms_per_1000_evals=100.0, redis_cpu_ms_per_1000_evals=20.0, shard_imbalance=1.25,
                   source="cluster")
COSTS = Costs(single=SINGLE, cluster=CLUSTER, bytes_per_span=400.0, bytes_per_result=800.0,
              bytes_per_joined_pair=1000.0, ledger_bytes_per_pair=300.0, evals_per_result=2, span_event_bytes=200,
              result_event_bytes=900)
ASSUME = Assumptions(join_ttl_s=1000.0, ledger_grace_s=500.0, match_delay_s=100.0, evaluated_fraction=0.5,
                     cores_per_pod=1.0, cpu_target=0.6, redis_cpu_target=0.5, redis_memory_overhead=1.5,
                     shard_memory_gib=8.0, partitions_per_pod=2.0, replicas=1)


def _drain(cpu: float, redis_by_node: list[float]) -> dict[str, Any]:
    return {"cpu_ms_per_1000_evals": cpu, "redis_cpu_ms_per_1000_evals": sum(redis_by_node),
            "redis_cpu_ms_per_1000_evals_by_node": redis_by_node}


MEMORY = {"sides": 100, "span_event_bytes": 221, "result_event_bytes": 863, "bytes_per_span": 410.0,
          "bytes_per_result": 790.0, "bytes_per_joined_pair": 950.0, "ledger_bytes_per_pair": 250.0}


def _results(**figures: Any) -> dict[str, Any]:
    return {"options": {"traffic": {"evals": 2}}, "figures": {"memory": MEMORY, **figures}}


def test_a_plan_follows_the_documented_model_figure_by_figure() -> None:
    """10k evaluations/s at the costs above: every figure as docs/capacity.md's model computes it by hand."""
    p = plan(COSTS, ASSUME, 10_000.0)
    assert (p.pairs_per_s, p.spans_per_s) == (5_000.0, 10_000.0)  # half the spans ever get a result
    # 5,000 spans/s never joined x 1000 s x 400 B + 5,000 joined spans x 1000 s x 700 B
    # + 5,000 ledgers x 1500 s x 300 B + 5,000 results x 100 s x 800 B
    assert p.redis_memory_bytes == pytest.approx(2.0e9 + 3.5e9 + 2.25e9 + 0.4e9)
    assert p.redis_provisioned_bytes == pytest.approx(1.5 * 8.15e9)
    assert p.shards_for_memory == 2  # 12.2 GB over 8 GiB shards: a cluster, so the cluster's CPU costs
    assert (p.redis, p.measured_on) == ("cluster", "cluster")
    assert p.process_cores == pytest.approx(1.0)
    assert (p.pods, p.partitions) == (2, 4)  # 1 core at 60% per pod; 2 partitions per pod
    assert p.redis_cores == pytest.approx(0.2)
    assert p.shards_for_cpu == 1  # 0.2 cores x 1.25 imbalance at 50%
    assert p.shards == 3  # a Redis Cluster has three primaries at least
    assert (p.nodes, p.deadline_shards) == (6, 16)  # a replica each; 4 index shards per primary, 16 at least
    assert p.kafka_records_per_s == 15_000.0
    assert p.kafka_mb_per_s == pytest.approx((10_000 * 200 + 5_000 * 900) / 1e6)


def test_a_rate_one_redis_holds_is_planned_with_the_single_redis_costs() -> None:
    """Below a shard's worth of memory and CPU: one Redis, whose store takes whole batches (cheaper per evaluation)."""
    p = plan(COSTS, ASSUME, 1_000.0)
    assert (p.redis, p.measured_on, p.shards, p.nodes) == ("single", "single", 1, 2)
    assert p.process_cores == pytest.approx(0.05) and p.redis_cores == pytest.approx(0.01)
    assert p.pods == 1


def test_redis_cpu_decides_the_shards_when_memory_is_plentiful() -> None:
    """With room for the memory on one shard, the busiest shard's CPU target sets the shard count."""
    roomy = Assumptions(join_ttl_s=1.0, ledger_grace_s=0.0, match_delay_s=0.0, shard_memory_gib=1e6)
    p = plan(COSTS, roomy, 1_000_000.0)
    assert p.redis_cores == pytest.approx(20.0)
    assert p.shards == p.shards_for_cpu == 50  # 20 cores x 1.25 / 0.5
    assert p.deadline_shards == 256  # the power of two from 4 x 50
    assert plan(COSTS, roomy, 1e9).deadline_shards == 4096  # REDIS_DEADLINE_SHARDS' largest value


def test_a_cluster_planned_with_single_redis_costs_is_marked() -> None:
    """Without a scale step, a plan that needs a cluster says its CPU was measured on a single Redis."""
    single_only = dataclasses.replace(COSTS, cluster=None)
    p = plan(single_only, ASSUME, 10_000.0)
    assert (p.redis, p.measured_on, p.shards) == ("cluster", "single", 3)
    assert p.process_cores == pytest.approx(0.5)
    table = render(single_only, ASSUME, (10_000.0,))
    assert "Redis Cluster *" in table and "planned with the CPU measured on a single Redis" in table
    assert "*" not in render(COSTS, ASSUME, (10_000.0,))


def test_a_plan_beyond_a_thousand_redis_nodes_says_so() -> None:
    """The Redis Cluster specification aims at linear scaling up to 1000 nodes: a plan above it is flagged."""
    assert "Beyond 1,000 nodes" not in render(COSTS, ASSUME, (10_000.0,))
    assert plan(COSTS, ASSUME, 1e8).nodes > 1_000
    assert "Beyond 1,000 nodes (the Redis Cluster specification's limit of linear scaling) at 100M evaluations/s" in \
        render(COSTS, ASSUME, (10_000.0, 1e8))


def test_costs_come_from_the_throughput_step_and_the_scale_step() -> None:
    """Single-Redis CPU from the throughput drains, cluster CPU and shard imbalance from the scale drains."""
    data = _results(
        scale=[{"processes": n, "partitions": 4, "shards": 3, "round": 0, "drain": _drain(cpu, nodes)}
               for n, cpu, nodes in ((1, 90.0, [10.0, 10.0, 10.0]), (2, 100.0, [10.0, 20.0, 30.0]),
                                     (4, 120.0, [20.0, 20.0, 20.0]))],
        throughput=[{"service": _drain(cpu, [r])} for cpu, r in ((80.0, 30.0), (90.0, 40.0), (200.0, 35.0))])
    costs = Costs.from_results(data)
    assert costs.cluster is not None and costs.single is not None
    assert costs.cluster.process_cpu_ms_per_1000_evals == 100.0  # median of 90, 100, 120
    assert costs.cluster.redis_cpu_ms_per_1000_evals == 60.0  # median of the sums 30, 60, 60
    assert costs.cluster.shard_imbalance == 1.0  # median of 1.0, 1.5 (30 over a mean of 20), 1.0
    assert "3-shard Redis Cluster" in costs.cluster.source
    assert (costs.single.process_cpu_ms_per_1000_evals, costs.single.redis_cpu_ms_per_1000_evals) == (90.0, 35.0)
    assert costs.single.shard_imbalance == 1.0
    assert (costs.bytes_per_joined_span, costs.ledger_bytes_per_pair) == (700.0, 250.0)


def test_single_redis_costs_come_from_the_largest_size_of_the_throughput_step() -> None:
    """``--pairs 300,600``: the 600-pair runs are the costs; the 300-pair runs are left out."""
    data = _results(throughput=[{"pairs": pairs, "service": _drain(cpu, [r])}
                                for pairs, cpu, r in ((300, 500.0, 90.0), (600, 80.0, 30.0), (300, 400.0, 80.0),
                                                      (600, 100.0, 40.0))])
    costs = Costs.from_results(data)
    assert costs.single is not None
    assert (costs.single.process_cpu_ms_per_1000_evals, costs.single.redis_cpu_ms_per_1000_evals) == (90.0, 35.0)
    assert "2 drains of 600 pairs" in costs.single.source


@pytest.mark.parametrize(("figures", "names"), [
    ({"throughput": [{"service": _drain(80.0, [30.0])}]}, "memory"),
    ({"memory": MEMORY}, "scale"),
    ({"memory": {**MEMORY, "ledger_bytes_per_pair": None}, "throughput": [{"service": _drain(80.0, [30.0])}]},
     "memory"),
])
def test_a_run_without_a_needed_step_is_refused_naming_it(figures: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        Costs.from_results({"options": {"traffic": {"evals": 2}}, "figures": figures})


def test_the_command_prints_a_column_per_rate_from_a_results_file(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m bench.capacity FILE --rates ...``: the measured inputs, the assumptions, then the table."""
    results = tmp_path / "results.json"
    results.write_bytes(orjson.dumps(_results(throughput=[{"service": _drain(100.0, [20.0])}])))
    assert main([str(results), "--rates", "1000,1e6", "--ttl-hours", "1", "--match-delay-s", "60"]) == 0
    out = capsys.readouterr().out
    assert "process CPU 100 ms, redis-server CPU 20 ms per 1,000 evaluations" in out
    assert "join TTL 1 h" in out and "match delay 60 s" in out
    header = next(line for line in out.splitlines() if line.startswith("| evaluations/s"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == ["evaluations/s", "1k", "1M"]
    pods = next(line for line in out.splitlines() if line.startswith("| pods "))
    assert [cell.strip() for cell in pods.strip("|").split("|")][1:] == ["1", "167"]  # 100 cores at 60%
