"""What redis-server spends per evaluation in each of the store's batch scripts, in instructions.

``python -m bench.redis_scripts [--pairs N]`` records every call the service's join and delivery stages make
to the put, claim and settle scripts while ``bench.hot_path``'s traffic runs through them, then replays those
calls, in order, on fresh redis-servers under valgrind's cachegrind (AOF, ``appendfsync always``), once as they
were and once with each script in turn (and all of them) swapped for one that only reads its keys and
arguments and returns. A replay's count less an idle server's is what the calls cost; the difference between
the real replay and one with a script swapped is that script's own work; the all-swapped replay is what
passing the keys and arguments costs (Redis makes a Lua string of each). Every figure is per evaluation
delivered. It needs valgrind (``apt-get install valgrind``); ``--pairs 2000`` takes about two minutes.

The swapped scripts leave the store's state as it would not be (no side stored, no claim), so the other
scripts of that replay meet empty keys: a script's share is approximate, the whole is exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from typing import Any

from bench.hot_path import _CountedRedis, _one_run

SCRIPTS = ("put", "claim", "settle")
# Reads what a batch script is given, as any script must, and does nothing with it.
ARGUMENTS_ONLY = "return #KEYS + #ARGV"


def _record(redis_url: str, pairs: int) -> tuple[list[tuple[str, list[Any], list[Any]]], int]:
    """The script calls (name, keys, args) of one hot-path run, in order, and the evaluations it delivered."""
    from consumer import store_redis

    calls: list[tuple[str, list[Any], list[Any]]] = []
    real_call = store_redis.RedisJoinStore._call

    async def recording(self: Any, script: Any, *, keys: Any, args: Any) -> Any:
        name = next((n for n in SCRIPTS if getattr(self, f"_{n}") is script), None)
        if name is not None:
            calls.append((name, list(keys), [a if isinstance(a, (bytes, str)) else str(a) for a in args]))
        return await real_call(self, script, keys=keys, args=args)

    store_redis.RedisJoinStore._call = recording  # type: ignore[method-assign]
    try:
        got = asyncio.run(_one_run(redis_url, pairs))
    finally:
        store_redis.RedisJoinStore._call = real_call  # type: ignore[method-assign]
    return calls, int(got["delivered"])


def _replay(calls: list[tuple[str, list[Any], list[Any]]], swapped: frozenset[str],
            config: Sequence[tuple[str, str]] = ()) -> float:
    """Instructions a fresh redis-server (with ``config``) runs for ``calls``, with the scripts named in ``swapped``
    reading their arguments only; nothing replayed when ``calls`` is empty (an idle server's start and stop)."""
    import redis

    from consumer.store_redis import _script

    server = _CountedRedis(config)
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=120)
        sources = {name: ARGUMENTS_ONLY if name in swapped else _script(f"{name}_batch") for name in SCRIPTS}
        shas = {name: client.script_load(source) for name, source in sources.items()}
        for name, keys, args in calls:
            client.evalsha(shas[name], len(keys), *keys, *args)
        client.close()
    finally:
        count = server.stop()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2_000)
    parser.add_argument("--redis-config", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a redis-server setting for the replays, e.g. hash-max-listpack-value 512 (repeatable)")
    args = parser.parse_args()
    config = [tuple(pair) for pair in args.redis_config]
    from localenv.redis import RedisServer

    with RedisServer() as server:
        calls, evaluations = _record(server.url, args.pairs)
    if evaluations == 0:
        raise SystemExit("the run delivered no evaluation")
    idle = _replay([], frozenset(), config)
    whole = _replay(calls, frozenset(), config) - idle
    row: dict[str, Any] = {"redis_config": dict(config), "evaluations": evaluations,
                           "calls": {n: sum(c[0] == n for c in calls) for n in SCRIPTS},
                           "all_scripts_per_eval": round(whole / evaluations)}
    for name in SCRIPTS:
        without = _replay(calls, frozenset({name}), config) - idle
        row[f"{name}_own_work_per_eval"] = round((whole - without) / evaluations)
    row["keys_and_arguments_per_eval"] = round((_replay(calls, frozenset(SCRIPTS), config) - idle) / evaluations)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
