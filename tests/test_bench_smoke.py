"""The benchmark's smoke run: ``python -m bench --smoke`` end to end, with no timing assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from localenv.kafka import KafkaBroker
from localenv.redis import RedisServer

ROOT = Path(__file__).parent.parent


def test_benchmark_smoke_run_delivers_every_pair(kafka: KafkaBroker, redis_server: RedisServer,
                                                 tmp_path: Path) -> None:
    """The tiny benchmark completes, prints its table and delivers every matched pair in every step."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--bootstrap", kafka.bootstrap_servers,
         "--redis-url", redis_server.url, "--workdir", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert "service, records/s" in done.stdout and "guide's batch join" in done.stdout
    figures = orjson.loads(out.read_bytes())["figures"]
    for run in figures["throughput"]:
        assert run["service"]["delivered_all"] and run["service"]["missing"] == 0
        assert run["service"]["exit_codes"] == [0]
        assert run["bare"]["records"] == run["service"]["total_records"]
    for load in figures["latency"]:
        assert load["delivered"] == load["matched"] > 0
    assert all(entry["joined"] > 0 for entry in figures["guide"])
