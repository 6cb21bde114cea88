"""``inspect``: what waits in the join buffer, and everything stored for one join key."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Any

from consumer import records
from consumer.store import Namespace, RedisJoinStore


async def overview(store: RedisJoinStore, *, oldest: int = 10, join_ttl_ms: int) -> dict[str, Any]:
    """Counts per ml_app and the entries closest to their deadline (the oldest sides)."""
    now_ms = int(time.time() * 1000)
    entries = []
    for side in await store.oldest(oldest):
        entries.append({
            "kind": "span" if side.event_id is None else "result",
            "ml_app": side.namespace.ml_app,
            "join_key": side.namespace.join_key,
            "event_id": side.event_id,
            "age_s": round((now_ms - (side.deadline_ms - join_ttl_ms)) / 1000, 1),
            "deadline_in_s": round((side.deadline_ms - now_ms) / 1000, 1),
        })
    return {"buffered": await store.census(), "oldest": entries}


async def lookup(store: RedisJoinStore, ml_app: str, join_key: str) -> dict[str, Any]:
    """Both sides and the delivery ledger of one join key, with stored records decoded."""
    ns = Namespace(ml_app, join_key)
    raw = await store.lookup(ns)

    def decode(data: bytes, how: Callable[[bytes, Namespace], Any] = records.decode) -> Any:
        try:
            return how(data, ns)
        except (ValueError, zlib.error):  # not a record this version wrote: show it as it is
            return data.decode("utf-8", "replace")

    span = raw["span"]
    ledger_names = {"d": "delivered", "x": "dead-lettered"}
    ledger = {k: v.decode() for k, v in raw["ledger"].items()}
    return {
        "ml_app": ml_app,
        "join_key": join_key,
        "span": decode(span["body"], records.decode_span) if "body" in span else None,
        "span_joined": span.get("joined") == b"1",
        "pending_results": {k: decode(v) for k, v in raw["pending_results"].items()},
        "ledger": {k: ledger_names.get(v, "in flight" if v.startswith("c|") else v) for k, v in ledger.items()},
        "being_reported": sorted(raw["expiring"]),
    }
