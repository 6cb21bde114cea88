"""The join store in memory: :class:`MemoryJoinStore`, for unit tests.

It does what the Lua scripts of :mod:`consumer.store_redis` do, step for step, on plain dicts, and
keeps the same bytes (records as the caller encoded them, spans as identity, "\\n", body), so what
it returns is what Redis returns. Nothing is durable and nothing is shared between processes; the
ledger's retention is not modelled (entries stay). tests/test_join_store.py runs the same contract
tests against it, a redis-server and a Redis Cluster.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from consumer import records, store
from consumer.store import (
    AppQuotas,
    AppUsage,
    DueSide,
    ExpireOutcome,
    KeyState,
    Namespace,
    ResultOp,
    ResultPut,
    Settle,
    SpanOp,
    SpanPut,
    result_digest,
)


@dataclass
class _Span:
    """A stored span (the Redis key ``s``, or ``o`` for the span it replaced)."""

    stored: bytes  # identity, "\n", body
    # "0": no result joined it (at its deadline it is reported); "1": results joined it, no book (a run);
    # "b": results joined it, and the book says which
    flag: str
    book: list[tuple[str, str]] = field(default_factory=list)  # (slot, result digest) per slot of each taken

    def took(self, digest: str) -> bool:
        return any(ev == digest for _, ev in self.book)

    def holds(self, slot: str) -> bool:
        return any(taken == slot for taken, _ in self.book)

    @property
    def size(self) -> int:
        """Its bytes as Redis stores it: the flag, the book and its end mark (flag "b"), identity, "\\n", body."""
        return 1 + (len(self.book) * 2 * store.SLOT_CHARS + 1 if self.flag == "b" else 0) + len(self.stored)


@dataclass(frozen=True)
class _Pending:
    slots: tuple[str, ...] | None  # None: stored without (a namespace with a run)
    record: bytes

    @property
    def size(self) -> int:
        """Its bytes as Redis stores it: "\\2", the slots and "\\36" before the record, when it has slots."""
        return len(self.record) + (0 if self.slots is None else 2 + len(self.slots) * store.SLOT_CHARS)


@dataclass
class _Key:
    """What one namespace holds (the Redis keys ``s``, ``o``, ``r``, ``x`` and ``d`` of its tag)."""

    span: _Span | None = None
    replaced: _Span | None = None  # the span the current one replaced, with its book
    pending: dict[str, _Pending] = field(default_factory=dict)  # results waiting for a span, or taken by one
    expiring: dict[str, bytes] = field(default_factory=dict)  # "s" | "r:<event_id>" -> copy being reported
    ledger: dict[str, str] = field(default_factory=dict)  # eval_id -> "d" | "x" | "c|owner|lease_until_ms"

    def taken_by(self, span: _Span | None, *, plain: bool) -> dict[str, bytes]:
        """Pending results ``span`` took (by its book); with ``plain``, also every one stored without slots."""
        return {event_id: p.record for event_id, p in self.pending.items()
                if (p.slots is None and plain) or (p.slots is not None and span is not None
                                                   and span.took(result_digest(event_id)))}

    def waiting(self) -> list[tuple[str, _Pending]]:
        """Pending results with slots that neither the span nor the one it replaced took."""
        return [(event_id, p) for event_id, p in self.pending.items() if p.slots is not None
                and not any(s is not None and s.took(result_digest(event_id)) for s in (self.span, self.replaced))]


def _take(candidates: list[tuple[str, _Pending]]) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
    """What a span arriving takes of the waiting results (those whose slots no other one shares), and its book."""
    count = Counter(slot for _, p in candidates for slot in p.slots or ())
    taken: dict[str, bytes] = {}
    book: list[tuple[str, str]] = []
    for event_id, p in candidates:
        if all(count[slot] == 1 for slot in p.slots or ()):
            taken[event_id] = p.record
            book += [(slot, result_digest(event_id)) for slot in p.slots or ()]
    return taken, book


class MemoryJoinStore(store.JoinStore, store.DeadlineIndex, store.Inspectable):
    """The store's three protocols in this process's memory.

    They are its bases so that mypy holds it to the contract: no type-checked code uses it otherwise.
    """

    def __init__(self, *, shards: int = 16, max_pending_results: int = 0, quotas: AppQuotas | None = None) -> None:
        self.shards = shards
        self._max_pending = max_pending_results  # 0: no limit
        self._quotas = quotas or AppQuotas()
        self._usage: dict[str, list[int]] = {}  # ml_app -> [sides, bytes], kept as lua/usage.lua keeps it
        self._keys: dict[Namespace, _Key] = {}
        self._index: list[dict[str, DueSide]] = [{} for _ in range(shards)]  # per shard: member -> entry
        self._locks: dict[int, tuple[str, float]] = {}  # shard -> (token, held until, monotonic seconds)

    def _key(self, ns: Namespace) -> _Key:
        return self._keys.setdefault(ns, _Key())

    def _account(self, app: str, sides: int, size: int) -> None:
        """Count a change of what ``app`` holds; a count that would fall below zero is cleared (lua/usage.lua)."""
        used = self._usage.setdefault(app, [0, 0])
        used[0] += sides
        used[1] += size
        if used[0] <= 0:
            del self._usage[app]
        elif used[1] < 0:
            used[1] = 0

    def _over_quota(self, app: str, size: int) -> bool:
        """Whether a side of ``size`` bytes that joins nothing would take ``app`` past its quota."""
        max_sides, max_bytes = self._quotas.of(app)
        sides, held = self._usage.get(app, (0, 0))
        return bool((max_sides and sides + 1 > max_sides) or (max_bytes and held + size > max_bytes))

    def _enter(self, ns: Namespace, event_id: str | None, deadline_ms: int) -> None:
        """Index a side (ZADD GT: a new entry, or a later deadline for an existing one)."""
        shard = zlib.crc32(ns.tag.encode()) % self.shards
        member = f"s\x1f{ns.tag}" if event_id is None else f"r\x1f{ns.tag}\x1f{event_id}"
        entry = self._index[shard].get(member)
        if entry is None or deadline_ms > entry.deadline_ms:
            self._index[shard][member] = DueSide(shard, member, deadline_ms, ns, event_id)

    # -- JoinStore ------------------------------------------------------------------------------

    async def put_many(self, ops: Sequence[SpanOp | ResultOp]) -> list[SpanPut | ResultPut]:
        return [self._put_span(op) if isinstance(op, SpanOp) else self._put_result(op) for op in ops]

    def _put_span(self, op: SpanOp) -> SpanPut:
        k = self._key(op.ns)
        prefix = op.identity.encode() + b"\n"
        stored = prefix + op.record
        if k.span is None:
            if k.expiring.get("s", b"").startswith(prefix):  # the sweeper is reporting this very span
                self._enter(op.ns, None, op.deadline_ms)
                return SpanPut("duplicate", {})
            out = k.taken_by(None, plain=True)  # results without slots: all of them
            taken, book = _take(k.waiting())
            out.update(taken)
            flag = "b" if book else "1" if out else "0"
            if flag == "0" and op.by_tag and k.ledger:  # its results were delivered by tag before it came
                flag = "1" if op.ns.run else "b"  # without a run: an empty book, so the key's next answer replaces it
            new = _Span(stored, flag, book)
            if flag == "0" and self._over_quota(op.ns.ml_app, new.size):
                return SpanPut("quota", {})
            if k.replaced is not None:
                self._account(op.ns.ml_app, -1, -k.replaced.size)
            k.span, k.replaced = new, None
            self._account(op.ns.ml_app, 1, new.size)
            self._enter(op.ns, None, op.deadline_ms)
            return SpanPut("stored", out)
        span, old = k.span, k.replaced
        if span.stored.startswith(prefix):
            self._enter(op.ns, None, op.deadline_ms)
            return SpanPut("duplicate", k.taken_by(span, plain=True))
        if old is not None and old.stored.startswith(prefix):
            self._enter(op.ns, None, op.deadline_ms)
            return SpanPut("duplicate", k.taken_by(old, plain=False))
        if span.flag != "b" or (old is not None and k.taken_by(old, plain=False)):
            return SpanPut("conflict", {}, span.stored)
        taken, book = _take(k.waiting())  # what the one it replaced took is not waiting (and never is again)
        new = _Span(stored, "b" if book else "0", book)
        if not taken and self._over_quota(op.ns.ml_app, new.size):
            return SpanPut("quota", {})
        old_size = 0 if old is None else old.size
        self._account(op.ns.ml_app, 0 if old is not None else 1, new.size - old_size)
        k.span, k.replaced = new, span
        self._enter(op.ns, None, op.deadline_ms)
        return SpanPut("replaced", taken)

    def _known(self, k: _Key, op: ResultOp) -> bool:
        """Waiting already (or being reported), or delivered (or dead-lettered) in full."""
        settled = bool(op.eval_ids) and all(k.ledger.get(eval_id) in ("d", "x") for eval_id in op.eval_ids)
        return op.event_id in k.pending or f"r:{op.event_id}" in k.expiring or settled

    def _put_result(self, op: ResultOp) -> ResultPut:
        k = self._key(op.ns)
        slots = tuple(op.slots)
        span = k.span
        if span is not None:
            if not slots or span.flag == "1":  # a run names the answer, or the span predates books
                if span.flag == "0":
                    span.flag = "1"
                return ResultPut("joined", span.stored)
            digest = result_digest(op.event_id)
            if span.took(digest):
                return ResultPut("joined", span.stored)
            if k.replaced is not None and k.replaced.took(digest):
                return ResultPut("joined", k.replaced.stored)
            if self._known(k, op):
                self._enter(op.ns, op.event_id, op.deadline_ms)
                return ResultPut("duplicate")
            if not any(span.holds(slot) for slot in slots) and not any(
                    set(p.slots or ()) & set(slots) for _, p in k.waiting()):
                before = span.size
                span.flag = "b"
                span.book += [(slot, digest) for slot in slots]
                self._account(op.ns.ml_app, 0, span.size - before)
                return ResultPut("joined", span.stored)
            return self._buffer(k, op, slots, "waiting")  # for the key's next answer
        if op.by_tag:  # no span: delivered joined by tag, never stored; the ledger keeps it from going twice
            settled = bool(op.eval_ids) and all(k.ledger.get(eval_id) in ("d", "x") for eval_id in op.eval_ids)
            return ResultPut("duplicate" if settled or f"r:{op.event_id}" in k.expiring else "tagged")
        if self._known(k, op):
            self._enter(op.ns, op.event_id, op.deadline_ms)
            return ResultPut("duplicate")
        return self._buffer(k, op, slots or None, "buffered")

    def _buffer(self, k: _Key, op: ResultOp, slots: tuple[str, ...] | None,
                status: store.ResultStatus) -> ResultPut:
        if not op.record:  # not encoded: the caller puts it again with its record
            return ResultPut("later")
        if self._max_pending and len(k.pending) >= self._max_pending:
            return ResultPut("full")
        pending = _Pending(slots, op.record)
        if self._over_quota(op.ns.ml_app, pending.size):
            return ResultPut("quota")
        k.pending[op.event_id] = pending
        self._account(op.ns.ml_app, 1, pending.size)
        self._enter(op.ns, op.event_id, op.deadline_ms)
        return ResultPut(status)

    async def claim_many(self, requests: Sequence[tuple[Namespace, Sequence[str]]], *, owner: str, now_ms: int,
                         lease_ms: int) -> list[list[store.ClaimVerdict]]:
        replies = []
        for ns, eval_ids in requests:
            ledger = self._key(ns).ledger
            verdicts: list[store.ClaimVerdict] = []
            for eval_id in eval_ids:
                state = ledger.get(eval_id, "")
                holder, _, until = state[2:].rpartition("|")
                verdict: store.ClaimVerdict = "new"
                if state in ("d", "x"):
                    verdict = "done"
                elif state and holder != owner and int(until) > now_ms:
                    verdict = "busy"
                if verdict == "new":
                    ledger[eval_id] = f"c|{owner}|{now_ms + lease_ms}"
                verdicts.append(verdict)
            replies.append(verdicts)
        return replies

    async def settle_many(self, requests: Sequence[Settle]) -> None:
        for request in requests:
            k = self._key(request.ns)
            k.ledger.update(dict.fromkeys(request.delivered, "d"))
            k.ledger.update(dict.fromkeys(request.dead_lettered, "x"))
            for event_id in request.drop_event_ids:
                dropped = k.pending.pop(event_id, None)
                if dropped is not None:
                    self._account(request.ns.ml_app, -1, -dropped.size)

    async def ping(self) -> bool:
        return True

    # -- DeadlineIndex --------------------------------------------------------------------------

    async def due(self, shard: int, now_ms: int, limit: int) -> list[DueSide]:
        due = [side for side in self._index[shard].values() if side.deadline_ms <= now_ms]
        return sorted(due, key=lambda side: (side.deadline_ms, side.member))[:limit]

    async def expire(self, side: DueSide) -> ExpireOutcome:
        k = self._key(side.namespace)
        if side.event_id is None:
            if "s" in k.expiring:
                return ExpireOutcome("report", k.expiring["s"])
            if k.span is None:
                return ExpireOutcome("gone")
            span, old, k.span, k.replaced = k.span, k.replaced, None, None
            self._account(side.namespace.ml_app, -1 if old is None else -2,
                          -span.size - (0 if old is None else old.size))
            if span.flag != "0":
                return ExpireOutcome("dropped")
            k.expiring["s"] = span.stored
            return ExpireOutcome("report", span.stored)
        copy = f"r:{side.event_id}"
        if copy in k.expiring:
            return ExpireOutcome("report", k.expiring[copy])
        pending = k.pending.get(side.event_id)
        if pending is None:
            return ExpireOutcome("gone")
        if k.span is not None:
            # Without slots (a run names the answer), the span here took it; with slots, only if a book says so.
            digest = result_digest(side.event_id)
            if pending.slots is None or any(s is not None and s.took(digest) for s in (k.span, k.replaced)):
                return ExpireOutcome("busy")
        self._account(side.namespace.ml_app, -1, -pending.size)
        k.expiring[copy] = k.pending.pop(side.event_id).record
        return ExpireOutcome("report", k.expiring[copy])

    async def forget(self, side: DueSide) -> None:
        self._key(side.namespace).expiring.pop("s" if side.event_id is None else f"r:{side.event_id}", None)
        entries = self._index[side.shard]
        if side.member in entries and entries[side.member].deadline_ms == side.deadline_ms:
            del entries[side.member]

    async def postpone(self, side: DueSide, deadline_ms: int) -> None:
        entry = self._index[side.shard].get(side.member)
        if entry is not None and deadline_ms > entry.deadline_ms:
            self._index[side.shard][side.member] = replace(entry, deadline_ms=deadline_ms)

    async def try_lock(self, shard: int, token: str, ttl_ms: int) -> bool:
        now = time.monotonic()
        if shard in self._locks and self._locks[shard][1] > now:
            return False
        self._locks[shard] = (token, now + ttl_ms / 1000)
        return True

    async def unlock(self, shard: int, token: str) -> None:
        if self._locks.get(shard, ("", 0.0))[0] == token:
            del self._locks[shard]

    async def index_size(self) -> tuple[int, int | None]:
        deadlines = [side.deadline_ms for entries in self._index for side in entries.values()]
        return len(deadlines), min(deadlines, default=None)

    async def oldest(self, count: int) -> list[DueSide]:
        every = [side for entries in self._index for side in entries.values()]
        return sorted(every, key=lambda side: (side.deadline_ms, side.shard, side.member))[:count]

    async def app_usage(self) -> dict[str, AppUsage]:
        return {app: AppUsage(sides, size) for app, (sides, size) in self._usage.items()}

    async def oldest_pending(self, per_shard: int) -> dict[str, int]:
        earliest: dict[str, int] = {}
        for shard in range(self.shards):
            for side in await self.due(shard, 2**62, per_shard):
                k = self._keys.get(side.namespace, _Key())
                if side.event_id is None:
                    waiting = k.span is not None and k.span.flag == "0"
                else:
                    waiting = side.event_id in k.pending
                app = side.namespace.ml_app
                if waiting and side.deadline_ms < earliest.get(app, 2**62):
                    earliest[app] = side.deadline_ms
        return earliest

    # -- Inspectable ----------------------------------------------------------------------------

    async def lookup(self, ns: Namespace) -> KeyState:
        k = self._keys.get(ns, _Key())
        return records.key_state(ns, span=None if k.span is None else k.span.stored,
                                 span_joined=k.span is not None and k.span.flag != "0",
                                 pending={event_id: p.record for event_id, p in k.pending.items()}, ledger=k.ledger,
                                 being_reported=k.expiring,
                                 replaced_span=None if k.replaced is None else k.replaced.stored,
                                 waiting=[event_id for event_id, _ in k.waiting()])

    async def census(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for ns, k in self._keys.items():
            if k.span is not None or k.pending:
                entry = counts.setdefault(ns.ml_app, {"spans": 0, "results": 0})
                entry["spans"] += int(k.span is not None)
                entry["results"] += len(k.pending)
        return counts

    async def delivery_state(self, ns: Namespace, eval_id: str) -> str | None:
        return self._keys.get(ns, _Key()).ledger.get(eval_id)
