"""Per-app buffer quotas on the in-memory store, and the join stage's handling of a flooding app.

What counts, what a quota refuses (only sides that would wait without joining anything), and that the
counts return to zero as sides leave by delivery, expiry or replacement. ``tests/test_app_quota.py`` runs
the same rules on a redis-server and a Redis Cluster, and checks the counts against what Redis holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from consumer.clock import ManualClock
from consumer.config import Settings, config_errors
from consumer.decode import RecordDecoder
from consumer.dlq import DeadLetters, DlqLimit
from consumer.expiry import Sweeper
from consumer.join import QUOTA_REASON, BatchJoin, Joiner
from consumer.metrics import OTHER_APPS, AppLabels, Metrics
from consumer.store import AppQuotas, AppUsage, Namespace, ResultOp, ResultPut, Settle, SpanOp, SpanPut
from consumer.store_memory import MemoryJoinStore
from tests.unit.fakes import FakeProducer

pytestmark = pytest.mark.unit

RUN = "r1"  # with a run no slots or books: a side's size is its record's plus the span's flag and identity


def ns(app: str, key: str) -> Namespace:
    return Namespace(app, key, RUN)


def span_size(identity: str, record: bytes) -> int:
    """A span without a book as Redis stores it: its flag, identity, newline, body."""
    return 1 + len(identity) + 1 + len(record)


async def put(store: MemoryJoinStore, op: SpanOp | ResultOp) -> SpanPut | ResultPut:
    (reply,) = await store.put_many([op])
    return reply


def result(app: str, key: str, event_id: str = "e", record: bytes = b"R" * 10) -> ResultOp:
    return ResultOp(ns(app, key), event_id, record, [f"{key}/{event_id}/0"], 10_000)


def span(app: str, key: str, record: bytes = b"S" * 10) -> SpanOp:
    return SpanOp(ns(app, key), "t:1", record, 10_000)


async def test_sides_are_counted_with_their_bytes_as_stored() -> None:
    """A buffered result counts its record's bytes; a span its flag, identity and body; a join adds nothing."""
    store = MemoryJoinStore()
    assert (await put(store, result("a", "k1", record=b"x" * 30))).status == "buffered"
    assert (await put(store, span("a", "k2", record=b"y" * 20))).status == "stored"
    assert (await put(store, result("a", "k2"))).status == "joined"
    assert await store.app_usage() == {"a": AppUsage(2, 30 + span_size("t:1", b"y" * 20))}


async def test_a_quota_refuses_only_sides_that_would_wait() -> None:
    """At its quota an app's new waiting results and lone spans are refused, not indexed; a span that takes a
    waiting result, and a result that joins its span, still go through."""
    store = MemoryJoinStore(quotas=AppQuotas(sides=2))
    assert [(await put(store, result("a", k))).status for k in ("k1", "k2", "k3")] == ["buffered", "buffered", "quota"]
    assert (await put(store, span("a", "k4"))).status == "quota"
    assert not [side for shard in range(store.shards) for side in await store.due(shard, 2**62, 100)
                if side.namespace.join_key in ("k3", "k4")]
    taken = await put(store, span("a", "k1"))
    assert isinstance(taken, SpanPut) and (taken.status, list(taken.pending)) == ("stored", ["e"])
    assert (await put(store, result("a", "k1", event_id="e2"))).status == "joined"
    assert (await store.app_usage())["a"].sides == 3  # over the quota by a span that ended a wait


async def test_room_comes_back_as_sides_leave() -> None:
    """Delivered results dropped, and sides taken out by the sweeper, free their app's quota."""
    store = MemoryJoinStore(quotas=AppQuotas(sides=2))
    await put(store, result("a", "k1"))
    await put(store, result("a", "k2"))
    await put(store, span("a", "k1"))
    await store.settle_many([Settle(ns("a", "k1"), delivered=["k1/e/0"], drop_event_ids=["e"])])
    assert (await store.app_usage())["a"].sides == 2  # the span k1 and the result k2
    assert (await put(store, result("a", "k3"))).status == "quota"
    for shard in range(store.shards):
        for side in await store.due(shard, 2**62, 100):
            # "gone": the index entry of the result delivered above, which the store dropped already
            assert (await store.expire(side)).verdict in ("report", "dropped", "gone")
            await store.forget(side)
    assert await store.app_usage() == {}
    assert (await put(store, result("a", "k3"))).status == "buffered"


async def test_a_bytes_quota_counts_what_the_side_would_add() -> None:
    """APP_QUOTA_BYTES: a side that would take the app past it is refused; one that fits is stored."""
    store = MemoryJoinStore(quotas=AppQuotas(bytes=100))
    assert (await put(store, result("a", "k1", record=b"x" * 60))).status == "buffered"
    assert (await put(store, result("a", "k2", record=b"x" * 41))).status == "quota"
    assert (await put(store, result("a", "k2", record=b"x" * 40))).status == "buffered"


async def test_quotas_are_per_app_with_overrides() -> None:
    """One app at its quota leaves the others untouched; APP_QUOTAS gives an app its own (0: no limit)."""
    store = MemoryJoinStore(quotas=AppQuotas(sides=1, per_app={"big": (0, -1), "tiny": (1, 15)}))
    assert (await put(store, result("noisy", "k1"))).status == "buffered"
    assert (await put(store, result("noisy", "k2"))).status == "quota"
    assert (await put(store, result("quiet", "k1"))).status == "buffered"
    assert {(await put(store, result("big", f"k{i}"))).status for i in range(50)} == {"buffered"}
    assert (await put(store, result("tiny", "k1", record=b"x" * 16))).status == "quota"
    assert AppQuotas(sides=7, bytes=9, per_app={"big": (0, -1)}).of("big") == (0, 9)


async def test_replaced_span_counts_until_the_new_ones_deadline() -> None:
    """Without a run, the key's next answer keeps the one it replaced: both count, and both leave at expiry."""
    store = MemoryJoinStore()
    key = Namespace("a", "q")
    await put(store, SpanOp(key, "t:1", b"first", 10_000))
    await put(store, ResultOp(key, "e1", b"R", ["v1"], 10_000, ["aaaaaaaa"]))
    assert (await put(store, SpanOp(key, "t:2", b"second", 10_000))).status == "replaced"
    assert (await store.app_usage())["a"].sides == 2
    (side,) = [s for shard in range(store.shards) for s in await store.due(shard, 2**62, 10)]
    await store.expire(side)
    assert await store.app_usage() == {}


async def test_sweeper_gauges_per_app_what_it_holds_and_its_oldest_waiting_side() -> None:
    """After a sweep: each app's sides and bytes, and the age of its oldest side still waiting (a span a result
    joined does not wait; an app with nothing waiting has no age)."""
    store = MemoryJoinStore()
    await store.put_many([SpanOp(ns("joined", "k"), "t:1", b"S", 70_000), ResultOp(ns("joined", "k"), "e", b"R", ["v"],
                                                                                   70_000)])
    await store.put_many([ResultOp(ns("waits", "old"), "e", b"R", ["v"], 40_000),
                          SpanOp(ns("waits", "new"), "t:1", b"S", 55_000)])
    metrics = Metrics(CollectorRegistry())
    sweeper = Sweeper(store, FakeProducer(), topic="unmatched", interval_s=1, batch=10, retry_later_ms=1000,
                      metrics=metrics, join_ttl_ms=30_000)
    await sweeper.sweep_once(now_ms=20_000)
    gauge = metrics.registry.get_sample_value
    assert gauge("evaljoin_app_buffered_sides", {"ml_app": "waits"}) == 2
    assert gauge("evaljoin_app_buffered_bytes", {"ml_app": "joined"}) == span_size("t:1", b"S")
    assert gauge("evaljoin_app_oldest_pending_age_seconds", {"ml_app": "waits"}) == 10.0  # produced at 10 s
    assert gauge("evaljoin_app_oldest_pending_age_seconds", {"ml_app": "joined"}) is None


# -- the join stage --------------------------------------------------------------------------------


@dataclass
class Record:
    """The parts of an aiokafka ConsumerRecord the decode and join steps read."""

    topic: str
    value: bytes
    offset: int
    timestamp: int = 1_764_000_000_000
    partition: int = 0
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def records_of(app: str, key: str, offset: int, *, with_span: bool) -> list[Record]:
    result_event = {"schema_version": 1, "event_id": f"evt-{app}-{key}", "ml_app": app, "join_key": key,
                    "evaluations": [{"label": "quality", "metric_type": "score", "value": 1}]}
    out = [Record("results", orjson.dumps(result_event), offset)]
    if with_span:
        span_event = {"schema_version": 1, "ml_app": app, "join_key": key, "trace_id": "ab", "span_id": "1"}
        out.append(Record("spans", orjson.dumps(span_event), offset))
    return out


async def test_a_flooding_app_is_dead_lettered_as_over_quota_and_the_batch_goes_on() -> None:
    """In one batch, an app sending 100x its quota of results nobody joins: what it holds stops at the quota, the
    rest is dead-lettered with reason app_quota_exceeded (valid input: the DLQ's 50% halt does not trip), and
    the other apps' pairs in the same batch are all joined."""
    metrics = Metrics(CollectorRegistry(), AppLabels(max_apps=3))
    producer = FakeProducer()
    dead_letters = DeadLetters(producer, topic="dlq", metrics=metrics,
                               limit=DlqLimit(max_invalid_ratio=0.5, window=100, max_consecutive=10))
    store = MemoryJoinStore(quotas=AppQuotas(sides=50, per_app={"flood": (5, -1)}))
    decoder = RecordDecoder(span_topic="spans", join_key="question_id", default_ml_app="unnamed", max_bytes=1_000_000,
                            clock=ManualClock())
    join = BatchJoin(Joiner(store, join_ttl_ms=60_000), decoder, dead_letters, metrics)
    batch: list[Record] = []
    for i in range(500):
        batch += records_of("flood", f"f{i}", i, with_span=False)
        if i % 50 == 0:
            batch += [record for app in range(9)
                      for record in records_of(f"app{app}", f"q{i}", 1000 + i, with_span=True)]
    joined = await join({"all": batch})
    assert len(joined.evaluations) == 9 * 10
    assert (await store.app_usage())["flood"].sides == 5
    over = [sent for sent in producer.sent if (b"evaljoin.error", QUOTA_REASON.encode()) in
            [(name.encode(), value) for name, value in sent["headers"]]]
    assert len(over) == len(producer.sent) == 495
    assert metrics.registry.get_sample_value("evaljoin_app_dead_letters_total",
                                             {"ml_app": "flood", "reason": QUOTA_REASON}) == 495
    # Labels: flood, app0 and app1 (the first three seen), then every other app together.
    assert metrics.registry.get_sample_value("evaljoin_app_matched_results_total", {"ml_app": OTHER_APPS}) == 70
    assert metrics.registry.get_sample_value("evaljoin_app_matched_results_total", {"ml_app": "app0"}) == 10
    assert metrics.registry.get_sample_value("evaljoin_app_events_total",
                                             {"ml_app": "flood", "kind": "result", "outcome": "buffered"}) == 5


# -- settings and labels -----------------------------------------------------------------------------


def test_app_quota_settings_are_validated_at_start() -> None:
    """APP_QUOTAS must be an object of {"sides", "bytes"} whole numbers; the error names the variable only."""
    settings = Settings(app_quota_sides=100, app_quotas='{"big": {"bytes": 5000000}, "free": {"sides": 0}}')
    assert settings.app_quotas_limits().of("big") == (100, 5_000_000)
    assert settings.app_quotas_limits().of("free") == (0, 0)
    for given in ('{"a": {"sides": -1}}', '{"a": {"rows": 1}}', '{"a": 5}', "[1]", "{", '{"a": {"sides": 1.5}}'):
        with pytest.raises(ValidationError) as caught:
            Settings(app_quotas=given)
        assert "APP_QUOTAS" in config_errors(caught.value)
        assert len(given) < 4 or given not in config_errors(caught.value)
    with pytest.raises(ValidationError):
        Settings(app_quota_sides=-1)


def test_app_labels_are_bounded() -> None:
    """Listed apps always get their own label; then the first max_apps seen; every other app is 'other'."""
    labels = AppLabels(["vip"], max_apps=2)
    assert [labels(app) for app in ("a", "b", "c", "vip", "a", None, OTHER_APPS)] == [
        "a", "b", OTHER_APPS, "vip", "a", OTHER_APPS, OTHER_APPS]
    settings = Settings(app_metrics_ml_apps=" x , y", app_metrics_max_apps=0)
    assert [settings.app_metric_labels()(app) for app in ("x", "y", "z")] == ["x", "y", OTHER_APPS]
