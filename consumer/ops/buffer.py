"""``inspect``: what waits in the join buffer, and everything stored for one join key."""

from __future__ import annotations

import time
from typing import Any, Protocol

from consumer.store import DeadlineIndex, Inspectable, Namespace


class InspectableBuffer(DeadlineIndex, Inspectable, Protocol):
    """A store whose contents and deadline index can be read."""


async def overview(store: InspectableBuffer, *, oldest: int = 10, join_ttl_ms: int) -> dict[str, Any]:
    """Counts per ml_app and the entries closest to their deadline (the oldest sides)."""
    now_ms = int(time.time() * 1000)
    entries = []
    for side in await store.oldest(oldest):
        entries.append({
            "kind": "span" if side.event_id is None else "result",
            "ml_app": side.namespace.ml_app,
            "join_key": side.namespace.join_key,
            **({"run_id": side.namespace.run} if side.namespace.run else {}),
            "event_id": side.event_id,
            "age_s": round((now_ms - (side.deadline_ms - join_ttl_ms)) / 1000, 1),
            "deadline_in_s": round((side.deadline_ms - now_ms) / 1000, 1),
        })
    return {"buffered": await store.census(), "oldest": entries}


async def lookup(store: Inspectable, ml_app: str, join_key: str, run: str = "") -> dict[str, Any]:
    """Both sides and the delivery ledger of one join key (in one run, if given), with stored records decoded."""
    state = await store.lookup(Namespace(ml_app, join_key, run))
    return {
        "ml_app": ml_app,
        "join_key": join_key,
        **({"run_id": run} if run else {}),
        "span": state.span,
        "span_joined": state.span_joined,
        "replaced_span": state.replaced_span,
        "pending_results": state.pending_results,
        "waiting_for_next_answer": state.waiting,
        "ledger": state.ledger,
        "being_reported": state.being_reported,
    }
