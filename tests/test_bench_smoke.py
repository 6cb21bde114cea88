"""The benchmark's smoke run: ``python -m bench --smoke`` end to end, with no timing assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.peers import PEERS
from localenv.kafka import KafkaBroker
from localenv.redis import RedisServer

ROOT = Path(__file__).parent.parent
SMOKE_TIMEOUT_S = 420  # every step at tiny sizes, two peers (a JVM and a Quix Streams application) included


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 60)
def test_benchmark_smoke_run_delivers_every_pair(kafka: KafkaBroker, redis_server: RedisServer,
                                                 tmp_path: Path) -> None:
    """Every step of the tiny benchmark completes, prints its rows and delivers every matched pair, the peers too."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--bootstrap", kafka.bootstrap_servers,
         "--redis-url", redis_server.url, "--workdir", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    for row in ("service, records/s", "Redis bytes per buffered span", "sides buffered", "partition(s) / process(es)",
                "RSS over a", "guide's batch join", "Quix Streams: records/s", "Kafka Streams: records/s",
                "Quix Streams: delivery latency", "Kafka Streams: delivery latency"):
        assert row in done.stdout, f"no {row!r} row in:\n{done.stdout}"
    figures = orjson.loads(out.read_bytes())["figures"]
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
    assert figures["soak"]["delivered"] > 0
    assert all(entry["joined"] > 0 for entry in figures["guide"])
