"""The service's per-record work alone: decode, join and delivery, without the broker and the intake's sockets.

``python -m bench.hot_path [--pairs N] [--runs N] [--before-root DIR]`` starts a redis-server (AOF,
``appendfsync always``), builds the benchmark's traffic (``bench.traffic``: 2 evaluations per pair, 2%
duplicates, 5% unmatched) as Kafka records in batches of 500, and runs each batch through the service's own
join stage (``BatchJoin``: decode, ``put_many``) and delivery stage (``Deliverer``: claim, the real
``HttpIntakeSink`` on an in-process transport that answers 202, settle), on a ``RedisJoinStore``. What it
leaves out is what a code change on the hot path does not touch: aiokafka's fetch, the offset commit, and the
HTTP sockets. It builds the two stages itself, with the constructors ``consumer.service`` calls, rather than
through the service: it must also run older checkouts (``--before-root``), whose service builds them inline.

It prints one JSON line per run and then the medians: the process's CPU microseconds per evaluation
(``time.process_time`` around the batches only, after a tenth of them as warm-up), and redis-server's
(``INFO cpu``). Each run is a fresh child process. With ``--before-root``, every run also runs ``consumer``
from that checkout (a ``git worktree``), alternating which goes first, and the line gives the ratio.

Times on a shared virtual machine vary by 10 to 20% from run to run, more than most single changes are
worth. ``--instructions`` counts instead (it needs valgrind: ``apt-get install valgrind``): each checkout runs
``--pairs`` and twice as many under cachegrind, and the growth in instructions, less what building the larger
traffic alone adds, over the growth in evaluations, is the instructions one evaluation costs. Start-up and
imports cancel out; with a fixed hash seed two counts agree to within 0.5%. redis-server is counted the same
way: each of those runs gets a fresh redis-server under cachegrind (AOF, ``appendfsync always``), stopped with
``SHUTDOWN NOSAVE`` when the run ends, and its growth from N to 2N pairs over the growth in evaluations is
redis-server's instructions per evaluation (the Lua scripts, the commands they call, the AOF). Instructions are
not time (a cache miss costs more than an add, an fsync costs none), so a change is judged by both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BATCH = 500  # records per batch: KAFKA_MAX_BATCH's default
WARM_SHARE = 0.1  # of the batches, joined and delivered before the measurement starts
RATE = 5_000.0  # pairs/s of the schedule: a pair's second side comes about 500 records after its first


def _records(pairs: int, span_topic: str, result_topic: str) -> tuple[list[Any], int]:
    """The traffic's records in the order they are produced, and how many evaluations its matched pairs hold."""
    from aiokafka.structs import ConsumerRecord

    from bench.traffic import TrafficSpec, make_pairs, schedule

    spec = TrafficSpec(pairs=pairs, run=uuid.uuid4().hex[:8])
    made = make_pairs(spec)
    out = []
    for offset, send in enumerate(schedule(made, rate=RATE, lag_ms=100.0)):
        pair = made[send.pair]
        topic, value = (span_topic, pair.span) if send.topic_kind == "span" else (result_topic, pair.result)
        partition = zlib.crc32(pair.key) % 2
        out.append(ConsumerRecord(topic, partition, offset, int(time.time() * 1000), 0, pair.key, value, None,
                                  len(pair.key), len(value), []))
    return out, sum(pair.matched for pair in made) * spec.evals


async def _one_run(redis_url: str, pairs: int, *, traffic_only: bool = False) -> dict[str, float]:
    """Join and deliver the traffic once in this process: CPU per evaluation of the process and of redis-server.

    ``traffic_only``: build the traffic's records and stop (what :func:`_instructions` subtracts).
    """
    import httpx
    from aiokafka.structs import TopicPartition

    from consumer.config import Settings
    from consumer.decode import RecordDecoder
    from consumer.deliver import Deliverer
    from consumer.dlq import DeadLetters, DlqLimit
    from consumer.join import BatchJoin, Joiner
    from consumer.logs import configure_logging
    from consumer.metrics import Metrics
    from consumer.service import _collector_tuned
    from consumer.sink import HttpIntakeSink
    from consumer.store_redis import RedisJoinStore, connect

    settings = Settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)  # as the service runs: INFO, one line a batch
    records, expected = _records(pairs, settings.span_topic, settings.result_topic)
    if traffic_only:
        return {"evaluations": expected, "delivered": 0}
    metrics = Metrics(app_labels=settings.app_metric_labels())
    client = await connect(redis_url)
    await client.flushall()
    store = RedisJoinStore(client, prefix="hp", ledger_retention_ms=600_000)
    delivered = 0

    def intake(request: httpx.Request) -> httpx.Response:
        nonlocal delivered
        delivered += request.content.count(b'"join_on"')
        return httpx.Response(202)

    sink = HttpIntakeSink(url="http://intake.invalid/api/intake/llm-obs/v2/eval-metric", headers={},
                          transport=httpx.MockTransport(intake), timeout_s=10.0, metrics=metrics,
                          max_batch=settings.intake_batch_max_evals, max_body_bytes=settings.intake_max_body_bytes,
                          retry_initial_s=0.1, retry_max_s=1.0, max_in_flight=settings.intake_max_in_flight)

    class NoDeadLetters:  # the traffic is valid: nothing is dead-lettered, and a send would be a defect here
        async def send_and_wait(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("the benchmark's traffic is valid; nothing may be dead-lettered")

    dead_letters = DeadLetters(NoDeadLetters(), topic=settings.dlq_topic, metrics=metrics,
                               limit=DlqLimit(max_invalid_ratio=1.0, window=100, max_consecutive=100),
                               max_record_bytes=settings.max_message_bytes)
    join = BatchJoin(Joiner(store, join_ttl_ms=settings.join_ttl_seconds * 1000), RecordDecoder.from_settings(
        settings, metrics=metrics), dead_letters, metrics)
    deliverer = Deliverer(store, sink, dead_letters, owner="hot-path", metrics=metrics,
                          lease_ms=int(settings.claim_lease_seconds * 1000))
    batches = []
    for start in range(0, len(records), BATCH):
        batch: dict[Any, list[Any]] = {}
        for record in records[start:start + BATCH]:
            batch.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        batches.append(batch)
    if len(batches) < 2:
        raise SystemExit(f"--pairs {pairs} makes {len(batches)} batch(es) of {BATCH} records: at least 2 are needed "
                         "(one warms up, the rest are measured)")
    warm = min(max(1, int(len(batches) * WARM_SHARE)), len(batches) - 1)
    for batch in batches[:warm]:  # first calls: lazy imports, script loads, connections
        await deliverer.deliver_batch(await join(batch))
    delivered_before = delivered
    with _collector_tuned():  # the garbage collector as the consume loop sets it
        redis_before = await _redis_cpu_s(client)
        cpu_before = time.process_time()
        for batch in batches[warm:]:
            await deliverer.deliver_batch(await join(batch))
        cpu = time.process_time() - cpu_before
        redis_cpu = await _redis_cpu_s(client) - redis_before
    measured = delivered - delivered_before
    await sink.aclose()
    await client.aclose()
    return {"evaluations": expected, "delivered": delivered, "us_per_eval": cpu / measured * 1e6,
            "redis_us_per_eval": redis_cpu / measured * 1e6}


async def _redis_cpu_s(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _child(root: Path, redis_url: str, pairs: int, *, traffic_only: bool = False,
           instructions: bool = False) -> dict[str, float]:
    """One run in a fresh interpreter: ``consumer`` imported from ``root``, this module from its own checkout.

    ``instructions``: under valgrind's cachegrind (no cache simulation), which counts the instructions the whole
    process ran, as ``instructions``; its CPU times are then valgrind's, not the code's.
    """
    here = str(Path(__file__).resolve().parent.parent)
    code = (f"import asyncio, json, sys; sys.path[:0] = [{str(root)!r}]; import consumer; sys.path[0] = {here!r}; "
            "from bench.hot_path import _one_run; "
            f"print(json.dumps(asyncio.run(_one_run({redis_url!r}, {pairs}, traffic_only={traffic_only}))))")
    command = [sys.executable, "-c", code]
    if instructions:
        command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *command]
    # A fixed hash seed: the same dict and set layouts, so the instruction counts repeat to within 0.5%.
    out = subprocess.run(command, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if out.returncode:
        raise SystemExit(f"the run with consumer from {root} failed:\n{out.stderr}")
    got = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    if instructions:
        counted = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
        if counted is None:
            raise SystemExit(f"valgrind printed no instruction count:\n{out.stderr[-2000:]}")
        got["instructions"] = float(counted.group(1).replace(",", ""))
    if not traffic_only and got["delivered"] != got["evaluations"]:
        raise SystemExit(f"consumer from {root}: {got['delivered']} evaluations delivered, {got['evaluations']} "
                         "expected (each matched pair's, once)")
    return got


class _CountedRedis:
    """A fresh redis-server under cachegrind for one run: :attr:`url` while it runs; :meth:`stop` gives its count."""

    def __init__(self, config: Sequence[tuple[str, str]] = ()) -> None:
        """``config``: more ``redis-server`` settings, as name and value (``("hash-max-listpack-value", "512")``)."""
        import redis

        from localenv.ports import free_port

        self._dir = Path(tempfile.mkdtemp(prefix="hot-path-redis-"))
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self._log = self._dir / "valgrind.log"
        self._proc = subprocess.Popen(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
             f"--log-file={self._log}", "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self._dir),
             *(arg for name, value in config for arg in (f"--{name}", value))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._client = redis.Redis.from_url(self.url, socket_timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                self._client.ping()
                return
            except redis.ConnectionError:
                if self._proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
            self._proc.kill()
            report = self._log.read_text() if self._log.exists() else ""
            shutil.rmtree(self._dir, ignore_errors=True)
            raise SystemExit(f"redis-server under valgrind did not start:\n{report[-2000:]}")

    def stop(self) -> float:
        """Shut the server down and return the instructions it ran, start-up included."""
        import redis

        with contextlib.suppress(redis.ConnectionError):  # SHUTDOWN answers by closing the connection
            self._client.shutdown(nosave=True)
        self._client.close()
        self._proc.wait(timeout=120)
        report = self._log.read_text()
        shutil.rmtree(self._dir, ignore_errors=True)
        counted = re.search(r"I\s+refs:\s+([\d,]+)", report)
        if counted is None:
            raise SystemExit(f"valgrind printed no instruction count for redis-server:\n{report[-2000:]}")
        return float(counted.group(1).replace(",", ""))


def _counted_child(root: Path, pairs: int) -> dict[str, float]:
    """:func:`_child` under valgrind, on a redis-server of its own counted too, as ``redis_instructions``."""
    server = _CountedRedis()
    try:
        got = _child(root, server.url, pairs, instructions=True)
    finally:
        redis_instructions = server.stop()
    return got | {"redis_instructions": redis_instructions}


def _timed(roots: list[tuple[str, Path]], redis_url: str, pairs: int, runs: int) -> None:
    """CPU per evaluation, each root once per run, alternating which goes first."""
    rows: list[dict[str, float]] = []
    for run in range(runs):
        row: dict[str, float] = {}
        for name, root in (roots if run % 2 == 0 else roots[::-1]):
            got = _child(root, redis_url, pairs)
            row |= {f"{name}_{k}": round(v, 1) for k, v in got.items() if k.endswith("per_eval")}
        if len(roots) > 1:
            row["ratio"] = round(row["now_us_per_eval"] / row["before_us_per_eval"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"median": {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}, "runs": runs}))


def instructions_per_eval(small: dict[str, float], large: dict[str, float], traffic_growth: float) -> float:
    """What one more evaluation costs: the growth in instructions from the small run to the large one, less what
    building the larger traffic alone added, over the growth in evaluations."""
    grown = large["instructions"] - small["instructions"] - traffic_growth
    return grown / (large["evaluations"] - small["evaluations"])


def _instructions(roots: list[tuple[str, Path]], redis_url: str, pairs: int) -> None:
    """Instructions per evaluation: the difference between runs of ``pairs`` and twice as many, less the same
    difference for building the traffic alone, over the difference in evaluations. What does not grow with the
    traffic (the interpreter's start, imports, connections) cancels out. redis-server's the same way, each run on
    a fresh server of its own (building the traffic does not touch it: nothing is subtracted)."""
    now_root = roots[0][1]
    traffic = [_child(now_root, redis_url, n, traffic_only=True, instructions=True) for n in (pairs, 2 * pairs)]
    traffic_growth = traffic[1]["instructions"] - traffic[0]["instructions"]
    row: dict[str, float] = {}
    for name, root in roots:
        small, large = (_counted_child(root, n) for n in (pairs, 2 * pairs))
        row[f"{name}_instructions_per_eval"] = round(instructions_per_eval(small, large, traffic_growth))
        row[f"{name}_redis_instructions_per_eval"] = round(instructions_per_eval(
            {**small, "instructions": small["redis_instructions"]},
            {**large, "instructions": large["redis_instructions"]}, 0.0))
    if len(roots) > 1:
        for what in ("instructions", "redis_instructions"):
            row[f"{what}_ratio"] = round(row[f"now_{what}_per_eval"] / row[f"before_{what}_per_eval"], 4)
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before-root", type=Path, help="also run consumer from this checkout, alternating")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per evaluation under valgrind instead of timing (--pairs 2000 "
                             "takes about a minute per checkout)")
    args = parser.parse_args()
    from localenv.redis import RedisServer

    roots = [("now", Path(__file__).resolve().parent.parent)]
    if args.before_root:
        roots.append(("before", args.before_root.resolve()))
    with RedisServer() as server:
        if args.instructions:
            _instructions(roots, server.url, args.pairs)
        else:
            _timed(roots, server.url, args.pairs, args.runs)


if __name__ == "__main__":
    main()
