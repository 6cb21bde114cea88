"""The benchmark's smoke run: ``python -m bench --smoke`` end to end, with no timing assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.__main__ import SMOKE
from bench.peers import PEERS
from localenv.kafka import KafkaBroker
from localenv.redis import RedisCluster, RedisServer

ROOT = Path(__file__).parent.parent
SMOKE_TIMEOUT_S = 420  # every step at tiny sizes, two peers (a JVM and a Quix Streams application) included


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 60)
def test_benchmark_smoke_run_delivers_every_pair(kafka: KafkaBroker, redis_server: RedisServer,
                                                 redis_cluster: RedisCluster, tmp_path: Path) -> None:
    """Every step of the tiny benchmark completes, prints its rows and delivers every matched pair, the peers too.

    The capacity command then reads the run's JSON file.
    """
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--bootstrap", kafka.bootstrap_servers,
         "--redis-url", redis_server.url, "--redis-cluster-url", redis_cluster.url,
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    for row in ("service, records/s", "Redis bytes per buffered span", "sides buffered", "partition(s) / process(es)",
                "RSS over a", "guide's batch join", "Quix Streams: records/s", "Kafka Streams: records/s",
                "Quix Streams: delivery latency", "Kafka Streams: delivery latency",
                "Redis bytes kept per delivered pair", "process(es), 2 partitions, 3-shard Redis Cluster: records/s",
                "3-shard Redis Cluster: redis-server CPU ms per 1,000 evaluations, each shard"):
        assert row in done.stdout, f"no {row!r} row in:\n{done.stdout}"
    figures = orjson.loads(out.read_bytes())["figures"]
    sizes = SMOKE["pairs"]
    assert [run["pairs"] for run in figures["throughput"]] == list(sizes)  # --runs 1 at each size, in order
    for size in sizes:
        assert f"throughput at {size:,} pairs" in done.stdout
    for run in figures["throughput"]:
        assert run["service"]["delivered_all"] and run["service"]["missing"] == 0
        assert run["service"]["exit_codes"] == [0]
        assert run["bare"]["records"] == run["service"]["total_records"]
        assert sorted(run["peers"]) == sorted(PEERS)
        for name, peer in run["peers"].items():
            # Every matched pair, as the objects build_metric makes, from a peer that stopped cleanly.
            assert peer["delivered_all"] and peer["missing"] == 0 and peer["mismatched"] == 0, name
            assert peer["exit_codes"] == [0], name
            assert peer["evaluations"] > 0 and peer["total_records"] == run["service"]["total_records"], name
    assert {load["process"] for load in figures["latency"]} == {"evaljoin", *PEERS}
    for load in figures["latency"]:
        assert load["delivered"] == load["matched"] > 0, load["process"]
    memory = figures["memory"]
    assert memory["bytes_per_span"] > 0 and memory["bytes_per_result"] > 0
    assert figures["buffered"] and all(cost["delivered_all"] for cost in figures["buffered"])
    assert figures["scaling"] and all(point["drain"]["delivered_all"] for point in figures["scaling"])
    assert memory["bytes_per_joined_pair"] > 0 and memory["ledger_bytes_per_pair"] > 0
    assert sorted(point["processes"] for point in figures["scale"]) == [1, 2]
    for point in figures["scale"]:
        drain = point["drain"]
        assert drain["delivered_all"] and drain["missing"] == 0, point["processes"]
        assert drain["exit_codes"] == [0] * point["processes"]
        assert len(drain["redis_cpu_ms_per_1000_evals_by_node"]) == point["shards"] == 3  # every shard sampled
        assert sum(drain["redis_memory_bytes_by_node"]) > 0  # the service stored its sides on the cluster
    assert figures["soak"]["delivered"] > 0
    assert all(entry["joined"] > 0 for entry in figures["guide"])
    capacity = subprocess.run([sys.executable, "-m", "bench.capacity", str(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False)
    assert capacity.returncode == 0, capacity.stderr
    assert "3-shard Redis Cluster" in capacity.stdout  # the CPU figures came from the scale step
    assert f"of {max(sizes):,} pairs" in capacity.stdout  # single-Redis CPU: the largest size's runs
    for row in ("| evaluations/s", "| pods", "| partitions per topic", "| Redis memory to provision",
                "| Redis shards (primaries)"):
        assert row in capacity.stdout, f"no {row!r} row in:\n{capacity.stdout}"


@pytest.mark.timeout(240)
def test_hot_path_harness_joins_and_delivers_every_evaluation_from_two_checkouts() -> None:
    """``python -m bench.hot_path`` runs the service's join and delivery stages on a redis-server it starts, once
    per checkout per run (here this checkout twice), and exits 0 only if each delivered every matched pair's
    evaluations once. No timing is asserted."""
    done = subprocess.run([sys.executable, "-m", "bench.hot_path", "--pairs", "600", "--runs", "2",
                           "--before-root", str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True, timeout=200, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 3 and rows[-1]["runs"] == 2
    for row in rows[:2]:
        assert row["now_us_per_eval"] > 0 and row["before_us_per_eval"] > 0 and row["ratio"] > 0
        assert row["now_redis_us_per_eval"] > 0


@pytest.mark.timeout(300)
def test_hot_path_counts_instructions_per_evaluation_under_valgrind() -> None:
    """``--instructions``: each size runs under valgrind on a redis-server under valgrind too, delivers every
    matched pair's evaluations once, and both counts per evaluation (the process's, redis-server's) come out of
    valgrind's reports. No figure is asserted but that they are there."""
    done = subprocess.run([sys.executable, "-m", "bench.hot_path", "--instructions", "--pairs", "600"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    (row,) = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert row["now_instructions_per_eval"] > 0 and row["now_redis_instructions_per_eval"] > 0


def test_hot_path_refuses_a_traffic_of_one_batch() -> None:
    """Too few pairs for a warm-up batch and a measured one: refused with the reason, not a division by zero."""
    done = subprocess.run([sys.executable, "-m", "bench.hot_path", "--pairs", "100", "--runs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "at least 2 are needed" in done.stderr, done.stderr[-2000:]


@pytest.mark.timeout(240)
def test_redis_scripts_counts_each_scripts_instructions_per_evaluation() -> None:
    """``python -m bench.redis_scripts``: the put, claim and settle calls of a hot-path run are recorded and
    replayed on redis-servers under valgrind; each script's share and the whole come out. No figure is asserted
    but that each is there and the recorded calls cover all three scripts."""
    done = subprocess.run([sys.executable, "-m", "bench.redis_scripts", "--pairs", "600"],
                          cwd=ROOT, capture_output=True, text=True, timeout=220, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    (row,) = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith('{"redis_config"')]
    assert row["redis_config"] == {}
    assert row["evaluations"] > 0 and all(row["calls"][name] > 0 for name in ("put", "claim", "settle"))
    assert row["all_scripts_per_eval"] > 0 and row["keys_and_arguments_per_eval"] > 0
    assert all(row[f"{name}_own_work_per_eval"] > 0 for name in ("put", "claim", "settle"))
