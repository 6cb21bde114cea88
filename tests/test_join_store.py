"""The join store's contract, run against the in-memory store, a real redis-server and a real three-node Redis Cluster.

The memory store's runs are unit tests (``pytest -m unit``); the same tests against Redis say that
the fake behaves as the real thing does.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import pytest

from consumer import records
from consumer.store import (
    AppUsage,
    ClaimVerdict,
    DeadlineIndex,
    DueSide,
    ExpireOutcome,
    Inspectable,
    JoinStore,
    KeyState,
    Namespace,
    ResultOp,
    ResultPut,
    Settle,
    SpanOp,
    SpanPut,
    evaluation_slot,
)
from consumer.store_memory import MemoryJoinStore
from consumer.store_redis import ITEMS_PER_CALL, RedisJoinStore, connect

pytestmark = pytest.mark.timeout(120)


class Store(JoinStore, DeadlineIndex, Inspectable, Protocol):
    """Everything a store implementation promises."""


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.unit), "standalone",
                        pytest.param("cluster", marks=pytest.mark.cluster)])
async def new_store(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Store]]:
    """Makes stores of one backend, each with keys of its own, configured with the options given."""
    if request.param == "memory":
        yield lambda **options: MemoryJoinStore(shards=4, **options)
        return
    server = request.getfixturevalue("redis_cluster" if request.param == "cluster" else "redis_server")
    client = await connect(server.url, cluster=request.param == "cluster")
    try:
        yield lambda **options: RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4,
                                               ledger_retention_ms=600_000, **options)
    finally:
        await client.aclose()


@pytest.fixture
def store(new_store: Callable[..., Store]) -> Store:
    return new_store()


NS = Namespace("app", "q-1")


# One side, one claim, everything due: the batch methods with a batch of one, the index read whole.

async def put_span(store: Store, ns: Namespace, identity: str, record: bytes, deadline_ms: int) -> SpanPut:
    (put,) = await store.put_many([SpanOp(ns, identity, record, deadline_ms)])
    assert isinstance(put, SpanPut)
    return put


async def put_result(store: Store, ns: Namespace, event_id: str, record: bytes, eval_ids: list[str],
                     deadline_ms: int, *, slots: list[str] | None = None) -> ResultPut:
    (put,) = await store.put_many([ResultOp(ns, event_id, record, eval_ids, deadline_ms, slots or ())])
    assert isinstance(put, ResultPut)
    return put


async def claim(store: Store, ns: Namespace, eval_ids: list[str], *, owner: str, now_ms: int,
                lease_ms: int = 500) -> list[ClaimVerdict]:
    return (await store.claim_many([(ns, eval_ids)], owner=owner, now_ms=now_ms, lease_ms=lease_ms))[0]


async def all_due(store: Store, now_ms: int) -> list[DueSide]:
    return [side for shard in range(store.shards) for side in await store.due(shard, now_ms, 100)]


# -- join ---------------------------------------------------------------------------------------

async def test_span_first_then_result_joins(store: Store) -> None:
    """A result arriving after its span joins at once and returns the span record."""
    assert (await put_span(store, NS, "t:1", b"SPAN", 10_000)).status == "stored"
    put = await put_result(store, NS, "e1", b"RESULT", ["v1"], 10_000)
    assert (put.status, put.span) == ("joined", b"t:1\nSPAN")


async def test_result_first_waits_and_is_released_by_span(store: Store) -> None:
    """A result arriving first is buffered, and the span's arrival hands it over."""
    assert (await put_result(store, NS, "e1", b"RESULT", ["v1"], 10_000)).status == "buffered"
    assert (await put_result(store, NS, "e1", b"RESULT", ["v1"], 10_000)).status == "duplicate"
    put = await put_span(store, NS, "t:1", b"SPAN", 10_000)
    assert (put.status, put.pending) == ("stored", {"e1": b"RESULT"})


async def test_redelivered_span_returns_pending_until_settled(store: Store) -> None:
    """A redelivered span gets the undelivered results again, and none once they are settled."""
    await put_result(store, NS, "e1", b"RESULT", ["v1"], 10_000)
    await put_span(store, NS, "t:1", b"SPAN", 10_000)
    again = await put_span(store, NS, "t:1", b"SPAN", 10_000)
    assert (again.status, again.pending) == ("duplicate", {"e1": b"RESULT"})
    await store.settle_many([Settle(NS, delivered=["v1"], drop_event_ids=["e1"])])
    assert (await put_span(store, NS, "t:1", b"SPAN", 10_000)).pending == {}


async def test_other_span_on_same_key_conflicts(store: Store) -> None:
    """A different span for a key already bound is a conflict that names the bound span."""
    await put_span(store, NS, "t:1", b"SPAN-1", 10_000)
    put = await put_span(store, NS, "t:2", b"SPAN-2", 10_000)
    assert (put.status, put.existing) == ("conflict", b"t:1\nSPAN-1")


async def test_namespaces_do_not_collide(store: Store) -> None:
    """The same join key in two ml_apps (and keys with brace and colon characters) stay apart."""
    await put_span(store, Namespace("app-a", "1"), "t:1", b"A", 10_000)
    assert (await put_result(store, Namespace("app-b", "1"), "e", b"R", ["v"], 10_000)).status == "buffered"
    odd = Namespace("a:{b}", "c}:{d")
    await put_span(store, odd, "t:9", b"ODD", 10_000)
    assert (await put_result(store, odd, "e", b"R", ["v"], 10_000)).span == b"t:9\nODD"
    assert (await put_result(store, Namespace("a", "{b}:c}:{d"), "e", b"R", ["v"], 10_000)).status == "buffered"


async def test_concurrent_sides_always_meet(store: Store) -> None:
    """Racing span and result puts on many keys: every result is either joined or handed to its span."""
    keys = [Namespace("race", f"k{i}") for i in range(200)]

    async def span_side(ns: Namespace) -> set[str]:
        return set((await put_span(store, ns, "t:1", b"S", 10_000)).pending)

    async def result_side(ns: Namespace) -> bool:
        return (await put_result(store, ns, "e", b"R", ["v"], 10_000)).status == "joined"

    outcomes = await asyncio.gather(*(asyncio.gather(span_side(ns), result_side(ns)) for ns in keys))
    for released, joined in outcomes:
        assert joined != ("e" in released)  # exactly one of the two sides saw the match


async def test_a_result_without_its_record_joins_or_changes_nothing(store: Store) -> None:
    """A result put without its record (b"") joins a span that is here; one that would be stored is "later" and
    nothing is stored, indexed or counted, until it is put again with its record."""
    other = Namespace("app", "q-2")
    slot = evaluation_slot("faithfulness", {})
    await put_span(store, NS, "t:1", b"SPAN", 10_000)
    put = await put_result(store, NS, "e1", b"", ["v1"], 10_000, slots=[slot])
    assert (put.status, put.span) == ("joined", b"t:1\nSPAN")
    # The span has this slot taken: another result of that slot would wait for the key's next answer.
    assert (await put_result(store, NS, "e2", b"", ["v2"], 10_000, slots=[slot])).status == "later"
    assert (await put_result(store, other, "e3", b"", ["v3"], 10_000, slots=[slot])).status == "later"
    assert (await store.lookup(other)).pending_results == {}
    assert (await store.lookup(NS)).pending_results == {}
    # The span alone is indexed.
    assert [(side.namespace, side.event_id) for side in await all_due(store, 20_000)] == [(NS, None)]
    assert await store.census() == {"app": {"spans": 1, "results": 0}}
    assert (await put_result(store, other, "e3", b"R3", ["v3"], 10_000, slots=[slot])).status == "buffered"
    assert (await put_result(store, NS, "e2", b"R2", ["v2"], 10_000, slots=[slot])).status == "waiting"
    assert (await put_result(store, other, "e3", b"", ["v3"], 10_000, slots=[slot])).status == "duplicate"


async def test_result_already_settled_is_not_buffered_again(store: Store) -> None:
    """A result redelivered after its span is gone but whose evaluations were delivered is a duplicate."""
    await store.settle_many([Settle(NS, delivered=["v1", "v2"])])
    assert (await put_result(store, NS, "e1", b"R", ["v1", "v2"], 10_000)).status == "duplicate"
    assert (await put_result(store, NS, "e2", b"R", ["v1", "v3"], 10_000)).status == "buffered"


async def test_a_key_buffers_at_most_its_limit_of_results(new_store: Callable[..., Store]) -> None:
    """Past max_pending_results a result is refused ("full", not stored); a waiting one is still a duplicate."""
    store = new_store(max_pending_results=2)
    puts = await store.put_many([ResultOp(NS, f"e{i}", b"R", [f"v{i}"], 10_000) for i in range(3)])
    assert [put.status for put in puts] == ["buffered", "buffered", "full"]
    assert (await put_result(store, NS, "e0", b"R", ["v0"], 10_000)).status == "duplicate"
    assert sorted((await put_span(store, NS, "t:1", b"S", 10_000)).pending) == ["e0", "e1"]
    assert {side.event_id for side in await all_due(store, 10_000)} == {"e0", "e1", None}  # e2 is not indexed


async def test_a_batch_larger_than_one_call_keeps_each_keys_order(store: Store) -> None:
    """A batch larger than one script call, over many keys, still puts each key's sides in the order given."""
    n = ITEMS_PER_CALL + 44  # on a single Redis, one key's result and span land in different calls
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


async def test_ping_answers(store: Store) -> None:
    """A store that is there answers a ping."""
    assert await store.ping() is True


# -- delivery ledger ----------------------------------------------------------------------------

async def test_claims_exclude_other_owners_until_lease_ends(store: Store) -> None:
    """A live claim makes others wait; an expired one can be taken over; settled ones are done."""
    assert await claim(store, NS, ["v1", "v2"], owner="a", now_ms=1000) == ["new", "new"]
    assert await claim(store, NS, ["v1"], owner="b", now_ms=1200) == ["busy"]
    assert await claim(store, NS, ["v1"], owner="a", now_ms=1200) == ["new"]
    assert await claim(store, NS, ["v2"], owner="b", now_ms=1600) == ["new"]
    await store.settle_many([Settle(NS, delivered=["v1"])])
    await store.settle_many([Settle(NS, dead_lettered=["v2"])])
    assert await claim(store, NS, ["v1", "v2"], owner="c", now_ms=9000) == ["done", "done"]
    assert await store.delivery_state(NS, "v2") == "x"


async def test_an_id_listed_twice_gets_one_verdict_and_a_result_dropped_twice_counts_once(store: Store) -> None:
    """An evaluation id twice in one claim is "new" both times for its claimant and "busy" both times for another
    owner; a result id twice in one settle (and one that is not there) is dropped, and uncounted, once."""
    assert await claim(store, NS, ["v1", "v1", "v2"], owner="a", now_ms=1000) == ["new", "new", "new"]
    assert await claim(store, NS, ["v1", "v1"], owner="b", now_ms=1100) == ["busy", "busy"]
    assert await claim(store, NS, ["v1", "v1"], owner="a", now_ms=1100) == ["new", "new"]
    other = Namespace("app", "q-2")
    await put_result(store, other, "e1", b"R1", ["w1"], 10_000)
    await put_result(store, other, "e2", b"R2", ["w2"], 10_000)
    before = (await store.app_usage())["app"]
    await store.settle_many([Settle(other, delivered=["w1", "w1"], drop_event_ids=["e1", "e1", "e-none"])])
    assert (await store.app_usage())["app"] == AppUsage(before.sides - 1, before.bytes - len(b"R1"))
    assert await store.delivery_state(other, "w1") == "d"
    assert (await put_result(store, other, "e2", b"R2", ["w2"], 10_000)).status == "duplicate"  # still waiting


async def test_thousands_of_evaluations_of_one_join_key_in_one_claim_and_one_settle(store: Store) -> None:
    """One join key with thousands of evaluations in one claim and one settle (a call's arguments are many,
    not bounded by the batch size): every one is claimed, recorded and found done, every result dropped."""
    eval_ids = [f"v{i}" for i in range(2_500)]
    assert await claim(store, NS, eval_ids, owner="a", now_ms=1000) == ["new"] * len(eval_ids)
    assert await claim(store, NS, eval_ids, owner="b", now_ms=1100) == ["busy"] * len(eval_ids)
    event_ids = [f"e{i}" for i in range(1_200)]
    for chunk in range(0, len(event_ids), 400):
        await store.put_many([ResultOp(NS, event_id, b"R", [f"w-{event_id}"], 10_000, ())
                              for event_id in event_ids[chunk:chunk + 400]])
    await store.settle_many([Settle(NS, delivered=eval_ids[:2_000], dead_lettered=eval_ids[2_000:],
                                    drop_event_ids=event_ids)])
    verdicts = await claim(store, NS, eval_ids, owner="c", now_ms=1200)
    assert verdicts == ["done"] * len(eval_ids)
    assert [await store.delivery_state(NS, v) for v in ("v0", "v1999", "v2000", "v2499")] == ["d", "d", "x", "x"]
    assert "app" not in await store.app_usage()


# -- deadline index -----------------------------------------------------------------------------

async def test_expiry_reports_unmatched_sides_once(store: Store) -> None:
    """Due sides come out of the index: an unjoined span and a lone result are reported, then forgotten."""
    lonely_span, lonely_result = Namespace("app", "s-only"), Namespace("app", "r-only")
    await put_span(store, lonely_span, "t:1", b"SPAN", 1_000)
    await put_result(store, lonely_result, "e1", b"RESULT", ["v"], 2_000)
    due = await all_due(store, 5_000)
    assert {(s.namespace, s.event_id) for s in due} == {(lonely_span, None), (lonely_result, "e1")}
    for side in due:
        outcome = await store.expire(side)
        assert (outcome.verdict, outcome.body) == ("report", b"t:1\nSPAN" if side.event_id is None else b"RESULT")
        # A crash before forget: the next sweep reports the same copy again.
        assert (await store.expire(side)).body == outcome.body
        await store.forget(side)
    assert await all_due(store, 5_000) == []
    assert (await put_result(store, lonely_span, "e9", b"R", ["v9"], 9_000)).status == "buffered"


async def test_expiry_drops_joined_span_silently(store: Store) -> None:
    """A span that received results is dropped at its deadline without an unmatched report."""
    await put_span(store, NS, "t:1", b"SPAN", 1_000)
    await put_result(store, NS, "e1", b"R", ["v1"], 1_000)
    (side,) = await all_due(store, 5_000)
    assert (await store.expire(side)).verdict == "dropped"


async def test_a_due_result_whose_span_came_is_busy_and_can_be_postponed(store: Store) -> None:
    """A due result released to its span is "busy" (its delivery is under way); postponing moves it later."""
    await put_result(store, NS, "e1", b"R", ["v1"], 1_000)
    await put_span(store, NS, "t:1", b"SPAN", 50_000)
    (side,) = await all_due(store, 5_000)
    assert (await store.expire(side)).verdict == "busy"
    await store.postpone(side, 8_000)
    await store.postpone(side, 7_000)  # never earlier
    assert await all_due(store, 5_000) == []
    (later,) = await all_due(store, 9_000)
    assert (later.event_id, later.deadline_ms) == ("e1", 8_000)


async def test_a_result_settled_before_its_deadline_is_gone(store: Store) -> None:
    """A due result that its delivery dropped already is "gone", and forgetting it empties the index."""
    await put_result(store, NS, "e1", b"R", ["v1"], 1_000)
    await store.settle_many([Settle(NS, delivered=["v1"], drop_event_ids=["e1"])])
    (side,) = await all_due(store, 5_000)
    assert await store.expire(side) == ExpireOutcome("gone")
    await store.forget(side)
    assert await store.index_size() == (0, None)


async def test_postpone_never_brings_back_a_forgotten_entry(store: Store) -> None:
    """Postponing an entry that was forgotten meanwhile leaves the index empty."""
    await put_result(store, NS, "e1", b"R", ["v1"], 1_000)
    (side,) = await all_due(store, 5_000)
    await store.expire(side)
    await store.forget(side)
    await store.postpone(side, 8_000)
    assert await store.index_size() == (0, None)


async def test_redelivered_side_moves_deadline_only_later(store: Store) -> None:
    """A side indexed again with the same deadline keeps it; forget after a later re-index keeps the entry."""
    await put_result(store, NS, "e1", b"R", ["v1"], 1_000)
    (side,) = await all_due(store, 5_000)
    await put_result(store, NS, "e1", b"R", ["v1"], 500)  # redelivery with an earlier stamp: no change
    await put_result(store, NS, "e1", b"R", ["v1"], 8_000)  # re-published later: deadline moves
    await store.forget(side)  # the sweeper read the old deadline; the new entry must survive
    (later,) = await all_due(store, 9_000)
    assert later.deadline_ms == 8_000


async def test_a_side_given_twice_in_one_batch_keeps_the_later_deadline(store: Store) -> None:
    """One put_many holding the same result three times (a redelivery and a republish in one batch): its
    deadline entry ends at the latest of them, whatever their order, as with one call each."""
    other = Namespace("app", "q-2")
    await store.put_many([ResultOp(NS, "e1", b"R", ["v1"], deadline, ()) for deadline in (1_000, 500, 8_000)])
    await store.put_many([ResultOp(other, "e2", b"R", ["v2"], deadline, ()) for deadline in (8_000, 500, 1_000)])
    assert await all_due(store, 7_999) == []
    assert sorted((side.event_id, side.deadline_ms) for side in await all_due(store, 9_000)) == [
        ("e1", 8_000), ("e2", 8_000)]


async def test_span_redelivered_while_its_copy_is_reported_is_a_duplicate(store: Store) -> None:
    """A span whose expired copy is being reported is recognised on redelivery, not stored again."""
    await put_span(store, NS, "t:1", b"SPAN", 1_000)
    (side,) = await all_due(store, 5_000)
    assert (await store.expire(side)).verdict == "report"
    assert await put_span(store, NS, "t:1", b"SPAN", 1_000) == SpanPut("duplicate", {})
    assert (await store.lookup(NS)).span is None


async def test_index_size_and_oldest_count_indexed_sides_earliest_first(store: Store) -> None:
    """index_size counts stored sides and gives the earliest deadline; oldest lists them earliest first."""
    assert await store.index_size() == (0, None)
    assert await store.oldest(5) == []
    for i, deadline in enumerate([3_000, 1_000, 2_000, 4_000]):
        await put_span(store, Namespace("app", f"k{i}"), "t:1", b"S", deadline)
    await put_span(store, Namespace("app", "k0"), "t:2", b"S", 500)  # a conflict: not indexed
    await put_result(store, Namespace("app", "k1"), "e1", b"R", ["v1"], 100)  # joined: not indexed
    assert await store.index_size() == (4, 1_000)
    oldest = await store.oldest(3)
    assert [(side.namespace.join_key, side.deadline_ms) for side in oldest] == [("k1", 1_000), ("k2", 2_000),
                                                                                 ("k0", 3_000)]


async def test_a_lock_excludes_other_tokens_and_only_its_holder_unlocks(store: Store) -> None:
    """A shard's lock refuses every other token (and a second take), and only its holder's unlock frees it."""
    assert await store.try_lock(0, "a", 60_000) is True
    assert await store.try_lock(0, "b", 60_000) is False
    assert await store.try_lock(0, "a", 60_000) is False
    assert await store.try_lock(1, "b", 60_000) is True  # shards lock apart
    await store.unlock(0, "b")
    assert await store.try_lock(0, "b", 60_000) is False
    await store.unlock(0, "a")
    assert await store.try_lock(0, "b", 60_000) is True


async def test_a_lock_frees_itself_after_its_ttl(store: Store) -> None:
    """A lock whose holder never unlocks (a crashed sweeper) can be taken once its ttl passed."""
    assert await store.try_lock(2, "crashed", 50) is True
    await asyncio.sleep(0.15)
    assert await store.try_lock(2, "next", 60_000) is True


# -- inspection ---------------------------------------------------------------------------------

SPAN_FIELDS: dict[str, Any] = {"trace_id": "abc", "span_id": "7", "tags": {"env": "prod"}}


def result_fields(event_id: str) -> dict[str, Any]:
    return {"event_id": event_id, "evaluations": [{"label": "faithfulness", "value": 0.9}]}


async def test_lookup_decodes_what_one_key_holds(store: Store) -> None:
    """lookup gives the span and waiting results decoded, the joined flag, and each ledger state by name."""
    for event_id in ("e1", "e2"):
        await put_result(store, NS, event_id, records.encode(result_fields(event_id)), [f"{event_id}-0"], 10_000)
    await put_span(store, NS, records.span_identity("abc", "7"), records.encode_span(SPAN_FIELDS), 10_000)
    await claim(store, NS, ["e1-0"], owner="a", now_ms=1_000)
    await store.settle_many([Settle(NS, delivered=["e2-0"], drop_event_ids=["e2"]), Settle(NS, dead_lettered=["v9"])])
    implied = {"ml_app": "app", "join_key": "q-1"}
    assert await store.lookup(NS) == KeyState(
        span={**SPAN_FIELDS, **implied},
        span_joined=True,
        pending_results={"e1": {**result_fields("e1"), **implied}},
        ledger={"e1-0": "in flight", "e2-0": "delivered", "v9": "dead-lettered"},
        being_reported=[],
    )


async def test_lookup_names_the_sides_being_reported_and_shows_unreadable_records_as_text(store: Store) -> None:
    """A result taken out by the sweeper is listed as being reported; a record that is not one shows as text."""
    await put_result(store, NS, "e1", b"not a record", ["v1"], 1_000)
    await put_result(store, NS, "e2", b"{broken", ["v2"], 9_000)
    (side,) = await all_due(store, 5_000)
    await store.expire(side)
    assert await store.lookup(NS) == KeyState(span=None, span_joined=False, pending_results={"e2": "{broken"},
                                              ledger={}, being_reported=["r:e1"])
    assert await store.lookup(Namespace("app", "unknown")) == KeyState(None, False, {}, {}, [])


async def test_census_counts_buffered_sides_per_ml_app(store: Store) -> None:
    """census counts spans and waiting results per ml_app; settled results and expired spans are not counted."""
    await put_span(store, Namespace("one", "a"), "t:1", b"S", 1_000)
    await put_span(store, Namespace("one", "b"), "t:1", b"S", 9_000)
    await put_result(store, Namespace("two", "a"), "e1", b"R", ["v1"], 9_000)
    await put_result(store, Namespace("two", "a"), "e2", b"R", ["v2"], 9_000)
    await put_result(store, Namespace("two", "b"), "e1", b"R", ["v1"], 9_000)
    await put_result(store, Namespace("three", "a"), "e1", b"R", ["v1"], 9_000)
    await store.settle_many([Settle(Namespace("three", "a"), delivered=["v1"], drop_event_ids=["e1"])])
    (side,) = await all_due(store, 5_000)
    await store.expire(side)
    assert await store.census() == {"one": {"spans": 1, "results": 0}, "two": {"spans": 0, "results": 3}}


# -- a join key answered again, without a run ---------------------------------------------------------

QA = evaluation_slot("quality_assessment", {})
OTHER_LABEL = evaluation_slot("toxicity", {})

# The two runs of an evaluation over the same dataset question: spans s1, s2 (the app's answers), results
# r1, r2 (the judge's scores of them, each in the same slot). Each topic keeps its own order; these are
# all the ways the two topics can interleave.
ORDERS = {
    "s1 s2 r1 r2": ({"r1": "t:1"}, {"s2": "conflict", "r2": "waiting"}),
    "s1 r1 s2 r2": ({"r1": "t:1", "r2": "t:2"}, {"s2": "replaced"}),
    "s1 r1 r2 s2": ({"r1": "t:1", "r2": "t:2"}, {"r2": "waiting", "s2": "replaced"}),
    "r1 s1 s2 r2": ({"r1": "t:1", "r2": "t:2"}, {"s2": "replaced"}),
    "r1 s1 r2 s2": ({"r1": "t:1", "r2": "t:2"}, {"r2": "waiting", "s2": "replaced"}),
    "r1 r2 s1 s2": ({}, {"s2": "conflict"}),
}


async def play(store: Store, order: str, *, run: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """Put the sides of ``order``, one call each: (result -> identity of the span it was attached to, statuses)."""
    attached: dict[str, str] = {}
    statuses: dict[str, str] = {}
    for side in order.split():
        ns = Namespace("app", "q-1", f"run-{side[1]}" if run else "")
        if side.startswith("s"):
            put = await put_span(store, ns, f"t:{side[1]}", b"SPAN", 10_000)
            statuses[side] = put.status
            attached.update(dict.fromkeys(put.pending, f"t:{side[1]}"))
        else:
            result = await put_result(store, ns, side, b"R", [f"v-{side}"], 10_000, slots=[] if run else [QA])
            statuses[side] = result.status
            if result.span is not None:
                attached[side] = result.span.split(b"\n")[0].decode()
    return attached, statuses


@pytest.mark.parametrize("order", list(ORDERS))
async def test_two_answers_of_one_key_never_swap_evaluations(store: Store, order: str) -> None:
    """However the two runs interleave, a result is attached to its own answer's span or to none (it waits)."""
    attached, statuses = await play(store, order)
    expected_attached, expected_statuses = ORDERS[order]
    assert attached == expected_attached
    assert {side: statuses[side] for side in expected_statuses} == expected_statuses


@pytest.mark.parametrize("order", list(ORDERS))
async def test_with_a_run_every_order_attaches_each_result_to_its_answer(store: Store, order: str) -> None:
    """With the run in the namespace, each run's key is its own: every order gives r1 on s1 and r2 on s2."""
    attached, _ = await play(store, order, run=True)
    assert attached == {"r1": "t:1", "r2": "t:2"}


async def test_a_batch_puts_a_repeated_key_as_one_by_one(store: Store) -> None:
    """The sides of both runs in one put_many give the statuses they give one call at a time."""
    ops: list[SpanOp | ResultOp] = [SpanOp(NS, "t:1", b"S1", 10_000), ResultOp(NS, "r1", b"R1", ["v1"], 10_000, [QA]),
                                    ResultOp(NS, "r2", b"R2", ["v2"], 10_000, [QA]), SpanOp(NS, "t:2", b"S2", 10_000)]
    puts = await store.put_many(ops)
    assert [put.status for put in puts] == ["stored", "joined", "waiting", "replaced"]
    assert puts[3].pending == {"r2": b"R2"}  # type: ignore[union-attr]


async def test_an_evaluation_of_another_label_still_joins_the_current_answer(store: Store) -> None:
    """A late result whose slots the span does not have yet joins it, as late results always have."""
    await put_span(store, NS, "t:1", b"S", 10_000)
    assert (await put_result(store, NS, "r1", b"R", ["v1"], 10_000, slots=[QA])).status == "joined"
    assert (await put_result(store, NS, "r1b", b"R", ["v1b"], 10_000, slots=[OTHER_LABEL])).status == "joined"
    assert (await put_result(store, NS, "r2", b"R", ["v2"], 10_000, slots=[QA, OTHER_LABEL])).status == "waiting"


async def test_redelivered_sides_join_the_span_that_took_them(store: Store) -> None:
    """After a replacement, each side of either answer put again joins (or is) its own span, nothing else."""
    await put_span(store, NS, "t:1", b"S1", 10_000)
    await put_result(store, NS, "r1", b"R1", ["v1"], 10_000, slots=[QA])
    assert (await put_span(store, NS, "t:2", b"S2", 10_000)).status == "replaced"
    await put_result(store, NS, "r2", b"R2", ["v2"], 10_000, slots=[QA])
    assert (await put_result(store, NS, "r1", b"R1", ["v1"], 10_000, slots=[QA])).span == b"t:1\nS1"
    assert (await put_result(store, NS, "r2", b"R2", ["v2"], 10_000, slots=[QA])).span == b"t:2\nS2"
    assert (await put_span(store, NS, "t:1", b"S1", 10_000)).status == "duplicate"
    assert (await put_span(store, NS, "t:2", b"S2", 10_000)).status == "duplicate"
    state = await store.lookup(NS)
    assert (state.span, state.replaced_span) == ("t:2\nS2", "t:1\nS1")  # not records: shown as text


async def test_a_span_returns_again_only_the_results_it_took(store: Store) -> None:
    """A redelivered span gets back what it took and is not delivered yet, never a result that waits for the next."""
    await put_result(store, NS, "r1", b"R1", ["v1"], 10_000, slots=[QA])
    assert (await put_span(store, NS, "t:1", b"S1", 10_000)).pending == {"r1": b"R1"}
    assert (await put_result(store, NS, "r2", b"R2", ["v2"], 10_000, slots=[QA])).status == "waiting"
    assert (await put_span(store, NS, "t:1", b"S1", 10_000)).pending == {"r1": b"R1"}
    await store.settle_many([Settle(NS, delivered=["v1"], drop_event_ids=["r1"])])
    assert (await put_span(store, NS, "t:1", b"S1", 10_000)).pending == {}
    assert (await put_span(store, NS, "t:2", b"S2", 10_000)) == SpanPut("replaced", {"r2": b"R2"})


async def test_a_third_answer_waits_until_the_first_ones_results_are_delivered(store: Store) -> None:
    """A span replacing one that itself replaced a span with undelivered results is a conflict until they are."""
    await put_result(store, NS, "r1", b"R1", ["v1"], 10_000, slots=[QA])
    await put_span(store, NS, "t:1", b"S1", 10_000)  # takes r1, which stays pending until delivered
    await put_result(store, NS, "r2", b"R2", ["v2"], 10_000, slots=[QA])
    assert (await put_span(store, NS, "t:2", b"S2", 10_000)).status == "replaced"
    assert (await put_span(store, NS, "t:3", b"S3", 10_000)) == SpanPut("conflict", {}, b"t:2\nS2")
    await store.settle_many([Settle(NS, delivered=["v1"], drop_event_ids=["r1"])])
    assert (await put_span(store, NS, "t:3", b"S3", 10_000)).status == "replaced"


async def test_a_result_waiting_for_the_next_answer_is_reported_at_its_deadline(store: Store) -> None:
    """A waiting result whose answer never came is reported although a span is here; one a span took is busy."""
    await put_result(store, NS, "r1", b"R1", ["v1"], 1_000, slots=[QA])
    await put_span(store, NS, "t:1", b"S1", 50_000)
    await put_result(store, NS, "r2", b"R2", ["v2"], 2_000, slots=[QA])
    outcomes = {side.event_id: await store.expire(side) for side in await all_due(store, 5_000)}
    assert outcomes == {"r1": ExpireOutcome("busy"), "r2": ExpireOutcome("report", b"R2")}


async def test_results_that_cannot_be_told_apart_are_taken_by_no_span(store: Store) -> None:
    """Two results of one slot waiting when a span comes: neither is attached; both are reported at their deadline."""
    await put_result(store, NS, "r1", b"R1", ["v1"], 1_000, slots=[QA])
    await put_result(store, NS, "r2", b"R2", ["v2"], 1_000, slots=[QA])
    await put_result(store, NS, "r3", b"R3", ["v3"], 1_000, slots=[OTHER_LABEL])
    assert (await put_span(store, NS, "t:1", b"S1", 50_000)).pending == {"r3": b"R3"}
    assert (await put_result(store, NS, "r4", b"R4", ["v4"], 1_000, slots=[QA])).status == "waiting"
    verdicts = {side.event_id: (await store.expire(side)).verdict for side in await all_due(store, 5_000)}
    assert verdicts == {"r1": "report", "r2": "report", "r3": "busy", "r4": "report"}


async def test_lookup_names_the_replaced_span_and_the_waiting_results(store: Store) -> None:
    """inspect shows the answer the span replaced and the results that wait for the key's next answer."""
    await put_span(store, NS, records.span_identity("abc", "1"), records.encode_span({}), 10_000)
    await put_result(store, NS, "r1", records.encode(result_fields("r1")), ["v1"], 10_000, slots=[QA])
    await put_span(store, NS, records.span_identity("abc", "2"), records.encode_span({}), 10_000)
    await put_result(store, NS, "r2", records.encode(result_fields("r2")), ["v2"], 10_000, slots=[QA])
    await put_result(store, NS, "r3", records.encode(result_fields("r3")), ["v3"], 10_000, slots=[QA])
    state = await store.lookup(NS)
    implied = {"ml_app": "app", "join_key": "q-1"}
    assert state.span == {"trace_id": "abc", "span_id": "2", **implied} and state.span_joined
    assert state.replaced_span == {"trace_id": "abc", "span_id": "1", **implied}
    assert (state.waiting, list(state.pending_results)) == (["r3"], ["r3"])


async def test_a_run_is_part_of_the_namespace_and_of_its_records(store: Store) -> None:
    """A namespace with a run keeps its own keys, and records read back carry the run."""
    scoped = Namespace("app", "q-1", "nightly-2")
    assert Namespace.from_tag(scoped.tag) == scoped and Namespace.from_tag(NS.tag) == NS
    await put_span(store, NS, "t:1", b"S", 10_000)
    await put_result(store, scoped, "e1", records.encode(result_fields("e1")), ["v1"], 10_000)
    assert (await store.lookup(scoped)).pending_results == {"e1": {**result_fields("e1"), "ml_app": "app",
                                                                   "join_key": "q-1", "run_id": "nightly-2"}}
    assert (await store.lookup(NS)).pending_results == {}


async def test_the_memory_store_answers_random_sequences_as_redis_does(redis_server: Any) -> None:
    """Random sequences of spans, results, deliveries and expiries on one key get the same replies from both."""
    client = await connect(redis_server.url)
    rng = random.Random(20260105)
    try:
        for sequence in range(60):
            redis_store = RedisJoinStore(client, prefix=f"diff{sequence}{uuid.uuid4().hex[:6]}", shards=1,
                                         ledger_retention_ms=600_000, max_pending_results=4)
            memory_store = MemoryJoinStore(shards=1, max_pending_results=4)
            ns = Namespace("app", "q", "run" if sequence % 5 == 0 else "")
            for step in range(25):
                action = rng.choice(["span", "result", "result", "settle", "expire"])
                if action == "span":
                    n = rng.randint(1, 3)
                    ops: list[SpanOp | ResultOp] = [SpanOp(ns, f"t:{n}", f"S{n}".encode(), rng.randint(1, 9) * 1000)]
                elif action == "result":
                    n = rng.randint(1, 6)
                    slots = [] if ns.run else sorted(rng.sample([QA, OTHER_LABEL], rng.randint(1, 2)))
                    ops = [ResultOp(ns, f"e{n}", f"R{n}".encode(), [f"v{n}"], rng.randint(1, 9) * 1000, slots)]
                else:
                    ops = []
                what = f"sequence {sequence}, step {step}: {action} {ops}"
                if ops:
                    assert await memory_store.put_many(ops) == await redis_store.put_many(ops), what
                elif action == "settle":
                    n = rng.randint(1, 6)
                    settle = [Settle(ns, delivered=[f"v{n}"], drop_event_ids=[f"e{n}"])]
                    await memory_store.settle_many(settle)
                    await redis_store.settle_many(settle)
                else:
                    now = rng.randint(1, 9) * 1000
                    due_memory, due_redis = await memory_store.due(0, now, 50), await redis_store.due(0, now, 50)
                    assert due_memory == due_redis, what
                    for side in due_memory:
                        assert await memory_store.expire(side) == await redis_store.expire(side), what
                        await memory_store.forget(side)
                        await redis_store.forget(side)
                assert await memory_store.lookup(ns) == await redis_store.lookup(ns), what
    finally:
        await client.aclose()
