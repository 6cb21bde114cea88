"""The join store's cost per side, alone: ``put_many`` and ``settle_many`` in the service's batch shape.

``python -m bench.join_cost [--batches N] [--quota-sides N]`` starts a redis-server (AOF, ``appendfsync
always``), then per batch stores 250 spans of new keys and 250 results of the previous batch's keys (which
join), and settles them, as the join and delivery stages do; it prints one JSON line: sides, seconds, and
microseconds per side (the median of five runs), and from ``INFO commandstats`` the microseconds per side
Redis spent in the scripts and the commands per side the scripts ran (both less disturbed by other work on
the machine; the count not at all). Run it on two checkouts to compare
the store's code (it passes ``--quota-sides`` only to a store that takes quotas).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import statistics
import time
import uuid
from typing import Any

import orjson

from consumer.store import Namespace, ResultOp, Settle, SpanOp
from consumer.store_redis import RedisJoinStore, connect
from localenv.redis import RedisServer

PER_BATCH = 250  # spans, and as many results, per batch: a default batch of 500 records


_OUTSIDE_SCRIPTS = ("evalsha", "info", "config|resetstat", "script|load", "hello")  # the client's own commands


async def run(url: str, batches: int, quota_sides: int) -> tuple[float, float, int]:
    """(wall seconds, Redis's microseconds in EVALSHA, commands the scripts ran) of one run."""
    client = await connect(url)
    await client.config_resetstat()
    options: dict[str, Any] = {}
    if "quotas" in inspect.signature(RedisJoinStore).parameters:
        from consumer.store import AppQuotas

        options["quotas"] = AppQuotas(sides=quota_sides)
    store = RedisJoinStore(client, prefix="b" + uuid.uuid4().hex[:8], ledger_retention_ms=600_000, **options)
    body = orjson.dumps({"trace_id": "6747aa6c00000000a1b2c3d4e5f60718", "span_id": "1234567890123456789",
                         "tags": {"env": "prod"}})
    record = orjson.dumps({"event_id": "x" * 20, "evaluations": [{"label": "faithfulness", "value": 0.87}]})
    try:
        started = time.perf_counter()
        for batch in range(batches):
            ops: list[SpanOp | ResultOp] = [
                SpanOp(Namespace(f"app{i % 10}", f"q{batch}-{i}"), "t:1", body, 2**40) for i in range(PER_BATCH)]
            if batch:
                ops += [ResultOp(Namespace(f"app{i % 10}", f"q{batch - 1}-{i}"), f"evt-{i:08d}", record,
                                 [f"v{i}"], 2**40, ["aaaaaaaa"]) for i in range(PER_BATCH)]
            puts = await store.put_many(ops)
            assert all(put.status in ("stored", "joined") for put in puts), {put.status for put in puts}
            if batch:
                await store.settle_many([Settle(Namespace(f"app{i % 10}", f"q{batch - 1}-{i}"), delivered=[f"v{i}"])
                                         for i in range(PER_BATCH)])
        seconds = time.perf_counter() - started
        stats = await client.info("commandstats")
        inside = sum(int(stat["calls"]) for name, stat in stats.items()
                     if name.removeprefix("cmdstat_") not in _OUTSIDE_SCRIPTS)
        return seconds, float(stats.get("cmdstat_evalsha", {}).get("usec", 0)), inside
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--quota-sides", type=int, default=0, help="APP_QUOTA_SIDES for every app (0: none)")
    args = parser.parse_args()
    sides = (2 * args.batches - 1) * PER_BATCH
    with RedisServer() as server:
        runs = [asyncio.run(run(server.url, args.batches, args.quota_sides)) for _ in range(5)]
    seconds = statistics.median(wall for wall, _, _ in runs)
    script_us = statistics.median(usec for _, usec, _ in runs)
    print(orjson.dumps({"sides": sides, "seconds": round(seconds, 3), "us_per_side": round(seconds / sides * 1e6, 1),
                        "redis_script_us_per_side": round(script_us / sides, 2),
                        "script_commands_per_side": round(runs[0][2] / sides, 3)}).decode())


if __name__ == "__main__":
    main()
