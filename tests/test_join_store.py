"""The join store's contract, run against a real redis-server and a real three-node Redis Cluster."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from consumer.store import ClaimVerdict, Namespace, ResultOp, ResultPut, Settle, SpanOp, SpanPut
from consumer.store_redis import ITEMS_PER_CALL, RedisJoinStore, connect

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RedisJoinStore]:
    server = request.getfixturevalue("redis_cluster" if request.param == "cluster" else "redis_server")
    client = await connect(server.url, cluster=request.param == "cluster")
    try:
        yield RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000)
    finally:
        await client.aclose()


NS = Namespace("app", "q-1")


# One side, one claim, one settle at a time: the batch methods with a batch of one.

async def put_span(store: RedisJoinStore, ns: Namespace, identity: str, record: bytes, deadline_ms: int) -> SpanPut:
    (put,) = await store.put_many([SpanOp(ns, identity, record, deadline_ms)])
    assert isinstance(put, SpanPut)
    return put


async def put_result(store: RedisJoinStore, ns: Namespace, event_id: str, record: bytes, eval_ids: list[str],
                     deadline_ms: int) -> ResultPut:
    (put,) = await store.put_many([ResultOp(ns, event_id, record, eval_ids, deadline_ms)])
    assert isinstance(put, ResultPut)
    return put


async def claim(store: RedisJoinStore, ns: Namespace, eval_ids: list[str], *, owner: str, now_ms: int,
                lease_ms: int = 500) -> list[ClaimVerdict]:
    return (await store.claim_many([(ns, eval_ids)], owner=owner, now_ms=now_ms, lease_ms=lease_ms))[0]


async def test_span_first_then_result_joins(store: RedisJoinStore) -> None:
    """A result arriving after its span joins at once and returns the span record."""
    assert (await put_span(store, NS, "t:1", b"SPAN", 10_000)).status == "stored"
    put = await put_result(store, NS, "e1", b"RESULT", ["v1"], 10_000)
    assert (put.status, put.span) == ("joined", b"t:1\nSPAN")


async def test_result_first_waits_and_is_released_by_span(store: RedisJoinStore) -> None:
    """A result arriving first is buffered, and the span's arrival hands it over."""
    assert (await put_result(store, NS, "e1", b"RESULT", ["v1"], 10_000)).status == "buffered"
    assert (await put_result(store, NS, "e1", b"RESULT", ["v1"], 10_000)).status == "duplicate"
    put = await put_span(store, NS, "t:1", b"SPAN", 10_000)
    assert (put.status, put.pending) == ("stored", {"e1": b"RESULT"})


async def test_redelivered_span_returns_pending_until_settled(store: RedisJoinStore) -> None:
    """A redelivered span gets the undelivered results again, and none once they are settled."""
    await put_result(store, NS, "e1", b"RESULT", ["v1"], 10_000)
    await put_span(store, NS, "t:1", b"SPAN", 10_000)
    again = await put_span(store, NS, "t:1", b"SPAN", 10_000)
    assert (again.status, again.pending) == ("duplicate", {"e1": b"RESULT"})
    await store.settle_many([Settle(NS, delivered=["v1"], drop_event_ids=["e1"])])
    assert (await put_span(store, NS, "t:1", b"SPAN", 10_000)).pending == {}


async def test_other_span_on_same_key_conflicts(store: RedisJoinStore) -> None:
    """A different span for a key already bound is a conflict that names the bound span."""
    await put_span(store, NS, "t:1", b"SPAN-1", 10_000)
    put = await put_span(store, NS, "t:2", b"SPAN-2", 10_000)
    assert (put.status, put.existing) == ("conflict", b"t:1\nSPAN-1")


async def test_namespaces_do_not_collide(store: RedisJoinStore) -> None:
    """The same join key in two ml_apps (and keys with brace and colon characters) stay apart."""
    await put_span(store, Namespace("app-a", "1"), "t:1", b"A", 10_000)
    assert (await put_result(store, Namespace("app-b", "1"), "e", b"R", ["v"], 10_000)).status == "buffered"
    odd = Namespace("a:{b}", "c}:{d")
    await put_span(store, odd, "t:9", b"ODD", 10_000)
    assert (await put_result(store, odd, "e", b"R", ["v"], 10_000)).span == b"t:9\nODD"
    assert (await put_result(store, Namespace("a", "{b}:c}:{d"), "e", b"R", ["v"], 10_000)).status == "buffered"


async def test_claims_exclude_other_owners_until_lease_ends(store: RedisJoinStore) -> None:
    """A live claim makes others wait; an expired one can be taken over; settled ones are done."""
    assert await claim(store, NS, ["v1", "v2"], owner="a", now_ms=1000) == ["new", "new"]
    assert await claim(store, NS, ["v1"], owner="b", now_ms=1200) == ["busy"]
    assert await claim(store, NS, ["v1"], owner="a", now_ms=1200) == ["new"]
    assert await claim(store, NS, ["v2"], owner="b", now_ms=1600) == ["new"]
    await store.settle_many([Settle(NS, delivered=["v1"])])
    await store.settle_many([Settle(NS, dead_lettered=["v2"])])
    assert await claim(store, NS, ["v1", "v2"], owner="c", now_ms=9000) == ["done", "done"]
    assert await store.delivery_state(NS, "v2") == "x"


async def test_concurrent_sides_always_meet(store: RedisJoinStore) -> None:
    """Racing span and result puts on many keys: every result is either joined or handed to its span."""
    keys = [Namespace("race", f"k{i}") for i in range(200)]

    async def span_side(ns: Namespace) -> set[str]:
        return set((await put_span(store, ns, "t:1", b"S", 10_000)).pending)

    async def result_side(ns: Namespace) -> bool:
        return (await put_result(store, ns, "e", b"R", ["v"], 10_000)).status == "joined"

    outcomes = await asyncio.gather(*(asyncio.gather(span_side(ns), result_side(ns)) for ns in keys))
    for released, joined in outcomes:
        assert joined != ("e" in released)  # exactly one of the two sides saw the match


async def test_result_already_settled_is_not_buffered_again(store: RedisJoinStore) -> None:
    """A result redelivered after its span is gone but whose evaluations were delivered is a duplicate."""
    await store.settle_many([Settle(NS, delivered=["v1", "v2"])])
    assert (await put_result(store, NS, "e1", b"R", ["v1", "v2"], 10_000)).status == "duplicate"
    assert (await put_result(store, NS, "e2", b"R", ["v1", "v3"], 10_000)).status == "buffered"


async def test_expiry_reports_unmatched_sides_once(store: RedisJoinStore) -> None:
    """Due sides come out of the index: an unjoined span and a lone result are reported, then forgotten."""
    lonely_span, lonely_result = Namespace("app", "s-only"), Namespace("app", "r-only")
    await put_span(store, lonely_span, "t:1", b"SPAN", 1_000)
    await put_result(store, lonely_result, "e1", b"RESULT", ["v"], 2_000)
    due = [side for shard in range(store.shards) for side in await store.due(shard, 5_000, 100)]
    assert {(s.namespace, s.event_id) for s in due} == {(lonely_span, None), (lonely_result, "e1")}
    for side in due:
        outcome = await store.expire(side)
        assert (outcome.verdict, outcome.body) == ("report", b"t:1\nSPAN" if side.event_id is None else b"RESULT")
        # A crash before forget: the next sweep reports the same copy again.
        assert (await store.expire(side)).body == outcome.body
        await store.forget(side)
    assert [s for shard in range(store.shards) for s in await store.due(shard, 5_000, 100)] == []
    assert (await put_result(store, lonely_span, "e9", b"R", ["v9"], 9_000)).status == "buffered"


async def test_expiry_drops_joined_span_silently(store: RedisJoinStore) -> None:
    """A span that received results is dropped at its deadline without an unmatched report."""
    await put_span(store, NS, "t:1", b"SPAN", 1_000)
    await put_result(store, NS, "e1", b"R", ["v1"], 1_000)
    (side,) = [s for shard in range(store.shards) for s in await store.due(shard, 5_000, 100)]
    assert (await store.expire(side)).verdict == "dropped"


async def test_redelivered_side_moves_deadline_only_later(store: RedisJoinStore) -> None:
    """A side indexed again with the same deadline keeps it; forget after a later re-index keeps the entry."""
    await put_result(store, NS, "e1", b"R", ["v1"], 1_000)
    (side,) = [s for shard in range(store.shards) for s in await store.due(shard, 5_000, 100)]
    await put_result(store, NS, "e1", b"R", ["v1"], 500)  # redelivery with an earlier stamp: no change
    await put_result(store, NS, "e1", b"R", ["v1"], 8_000)  # re-published later: deadline moves
    await store.forget(side)  # the sweeper read the old deadline; the new entry must survive
    (later,) = [s for shard in range(store.shards) for s in await store.due(shard, 9_000, 100)]
    assert later.deadline_ms == 8_000


async def test_a_batch_larger_than_one_call_keeps_each_keys_order(store: RedisJoinStore) -> None:
    """A batch spans several script calls (pipelined) and many keys: each key's sides still meet in order."""
    n = ITEMS_PER_CALL + 44  # one key's result and span land in different calls
    ops: list[SpanOp | ResultOp] = []
    for i in range(n):
        ns = Namespace("app", f"big-{i}")
        ops.append(ResultOp(ns, f"e{i}", f"R{i}".encode(), [f"v{i}"], 10_000))
    ops += [SpanOp(Namespace("app", f"big-{i}"), f"t:{i}", f"S{i}".encode(), 10_000) for i in range(n)]
    puts = await store.put_many(ops)
    assert [p.status for p in puts] == ["buffered"] * n + ["stored"] * n
    assert [p.pending for p in puts[n:]] == [{f"e{i}": f"R{i}".encode()} for i in range(n)]  # type: ignore[union-attr]
    requests = [(Namespace("app", f"big-{i}"), [f"v{i}"]) for i in range(n)]
    claims = await store.claim_many(requests, owner="me", now_ms=1, lease_ms=1_000)
    assert claims == [["new"]] * n
    await store.settle_many([Settle(ns, ids, (), [f"e{i}"]) for i, (ns, ids) in enumerate(requests)])
    assert await store.claim_many(requests, owner="me", now_ms=2, lease_ms=1_000) == [["done"]] * n
    assert all(state == "d" for state in [await store.delivery_state(ns, ids[0]) for ns, ids in requests])
