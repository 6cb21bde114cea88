"""Joining by span tag against the real things: the store's tag ops on a redis-server and a Redis Cluster (and the
memory store, which must agree), and the service between real Kafka, Redis and an HTTP intake, for an app that
publishes no span-context events at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from consumer.store import (
    DeadlineIndex,
    Inspectable,
    JoinStore,
    Namespace,
    ResultOp,
    ResultPut,
    Settle,
    SpanOp,
    SpanPut,
)
from consumer.store_memory import MemoryJoinStore
from consumer.store_redis import RedisJoinStore, connect
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from tests.support import Topics, eventually, group_lag, read_topic, running_service, send_json, topic_size

pytestmark = pytest.mark.timeout(180)

TAG_APP = "tag-app"
NS = Namespace(TAG_APP, "q-1")
RUN_NS = Namespace(TAG_APP, "q-1", "run-7")


class Store(JoinStore, DeadlineIndex, Inspectable, Protocol):
    """Everything a store implementation promises."""


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.unit), "standalone",
                        pytest.param("cluster", marks=pytest.mark.cluster)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A store of one backend, with keys of its own."""
    if request.param == "memory":
        yield MemoryJoinStore(shards=4)
        return
    server = request.getfixturevalue("redis_cluster" if request.param == "cluster" else "redis_server")
    client = await connect(server.url, cluster=request.param == "cluster")
    try:
        yield RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], shards=4, ledger_retention_ms=600_000)
    finally:
        await client.aclose()


async def put_result(store: Store, ns: Namespace, event_id: str = "e1", *, by_tag: bool = True,
                     slots: tuple[str, ...] = ("aaaaaaaa",)) -> ResultPut:
    (put,) = await store.put_many([ResultOp(ns, event_id, b"RESULT", [f"v-{event_id}"], 10_000,
                                            () if ns.run else slots, by_tag=by_tag)])
    assert isinstance(put, ResultPut)
    return put


async def put_span(store: Store, ns: Namespace, identity: str = "t:1", *, by_tag: bool = True) -> SpanPut:
    (put,) = await store.put_many([SpanOp(ns, identity, b"SPAN", 10_000, by_tag=by_tag)])
    assert isinstance(put, SpanPut)
    return put


# -- the store ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ns", [NS, RUN_NS], ids=["no_run", "run"])
async def test_a_tag_result_without_its_span_is_neither_stored_nor_indexed(store: Store, ns: Namespace) -> None:
    """``tagged``: nothing is written for it, so nothing is reported at a deadline; a span-mode result is buffered."""
    assert (await put_result(store, ns)).status == "tagged"
    assert (await put_result(store, ns)).status == "tagged"  # not delivered yet: the ledger decides at the claim
    state = await store.lookup(ns)
    assert (state.span, state.pending_results, state.ledger) == (None, {}, {})
    assert await store.index_size() == (0, None)
    assert (await put_result(store, ns, by_tag=False)).status == "buffered"


@pytest.mark.parametrize("ns", [NS, RUN_NS], ids=["no_run", "run"])
async def test_a_delivered_tag_result_is_a_duplicate(store: Store, ns: Namespace) -> None:
    """Once its evaluations are settled, the same result is ``duplicate``: the ledger keeps it from going twice."""
    assert (await put_result(store, ns)).status == "tagged"
    await store.settle_many([Settle(ns, delivered=["v-e1"], drop_event_ids=["e1"])])
    assert (await put_result(store, ns)).status == "duplicate"
    assert await store.index_size() == (0, None)


@pytest.mark.parametrize("ns", [NS, RUN_NS], ids=["no_run", "run"])
async def test_a_span_here_joins_a_tag_result_by_its_ids(store: Store, ns: Namespace) -> None:
    """With its span buffered, a tag app's result joins it as any result does."""
    assert (await put_span(store, ns)).status == "stored"
    put = await put_result(store, ns)
    assert (put.status, put.span) == ("joined", b"t:1\nSPAN")


async def test_a_span_after_its_results_went_by_tag_is_joined_and_not_reported(store: Store) -> None:
    """A tag app's span that finds its key's ledger written is stored as joined: dropped at its deadline."""
    await put_result(store, NS)
    await store.settle_many([Settle(NS, delivered=["v-e1"])])
    await put_span(store, NS)
    assert (await store.lookup(NS)).span_joined
    (due,) = await store.oldest(10)
    assert (await store.expire(due)).verdict == "dropped"


async def test_a_tag_apps_span_without_results_is_reported(store: Store) -> None:
    """No result delivered for its key: the span is stored unjoined and reported at its deadline."""
    await put_span(store, NS)
    assert not (await store.lookup(NS)).span_joined
    (due,) = await store.oldest(10)
    assert (await store.expire(due)).verdict == "report"


async def test_without_a_run_the_keys_next_answer_replaces_a_span_joined_by_tag(store: Store) -> None:
    """Without a run, such a span has an empty book: a newer span replaces it (the key's next answer), while in a
    run a second span is a conflict as always."""
    for ns in (NS, RUN_NS):
        await put_result(store, ns)
        await store.settle_many([Settle(ns, delivered=["v-e1"])])
        await put_span(store, ns, "t:1")
    assert (await put_span(store, NS, "t:2")).status == "replaced"
    assert (await put_span(store, RUN_NS, "t:2")).status == "conflict"


async def test_a_result_that_waited_from_before_is_tagged_and_its_copy_dropped_on_settle(store: Store) -> None:
    """A result buffered in span mode, put again by tag, is ``tagged``; settling it drops the waiting copy."""
    assert (await put_result(store, NS, by_tag=False)).status == "buffered"
    assert (await put_result(store, NS)).status == "tagged"
    await store.settle_many([Settle(NS, delivered=["v-e1"], drop_event_ids=["e1"])])
    assert (await store.lookup(NS)).pending_results == {}


# -- the service --------------------------------------------------------------------------------


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
def redis_url(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """The service runs against a single redis-server and against a three-node Redis Cluster."""
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster").url, True
    return request.getfixturevalue("redis_server").url, False


def result_event(key: str, event_id: str, *, ml_app: str = TAG_APP, run_id: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1, "event_id": event_id, "ml_app": ml_app, "join_key": key,
        "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 0.75,
                         "timestamp_ms": 1_700_000_000_000}]}
    if run_id:
        event["run_id"] = run_id
    return event


def span_event(key: str, span_id: str, *, ml_app: str = TAG_APP) -> dict[str, Any]:
    return {"schema_version": 1, "ml_app": ml_app, "join_key": key, "trace_id": "abc123", "span_id": span_id}


def joins(intake: FakeIntake) -> dict[tuple[str, str], dict[str, Any]]:
    """(ml_app, join key of the result) -> join_on, of every metric the intake accepted (each key once)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for metric in intake.accepted_metrics():
        key = (metric["ml_app"], metric["metadata"]["key"])
        assert key not in out, f"{key} delivered twice"
        out[key] = metric["join_on"]
    return out


def keyed(event: dict[str, Any]) -> dict[str, Any]:
    """The event with its join key in its evaluation's metadata, so that the intake's copy names it."""
    for evaluation in event["evaluations"]:
        evaluation["metadata"] = {"key": event["join_key"] + (f"@{event['run_id']}" if "run_id" in event else "")}
    return event


async def settled(kafka: KafkaBroker, settings: Settings, topics: Topics) -> None:
    await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id, [topics.span, topics.result]),
                     expect=0, what="every record committed")


async def test_an_app_without_span_context_events_gets_its_results_joined_by_tag_once(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """An app that publishes no span-context event: each result reaches the intake at once joined on the span tag,
    once, even when it is published twice (before and after its delivery); a run's result joins on
    ``<run_id>:<join_key>``; nothing is reported as unmatched."""
    settings = make_settings(join_by_tag=TAG_APP, join_ttl_seconds=2, sweep_interval_seconds=0.2)
    q1, q2 = keyed(result_event("q-1", "evt-tag-0001")), keyed(result_event("q-2", "evt-tag-0002", run_id="run-7"))
    async with running_service(settings):
        for event in (q1, q1, q2):
            await send_json(producer, topics.result, event)
        await eventually(lambda: len(intake.accepted_metrics()) >= 2, what="both results")
        await send_json(producer, topics.result, q1)
        await send_json(producer, topics.result, q2)
        await settled(kafka, settings, topics)
        await asyncio.sleep(2.5)  # past every deadline, several sweeps
        assert await topic_size(kafka.bootstrap_servers, topics.unmatched) == 0
    assert joins(intake) == {
        (TAG_APP, "q-1"): {"tag": {"key": "question_id", "value": "q-1"}},
        (TAG_APP, "q-2@run-7"): {"tag": {"key": "question_id", "value": "run-7:q-2"}},
    }


async def test_the_mixed_case_joins_by_span_ids_when_the_span_is_here(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """In one deployment: a tag app's result whose span was published joins by span ids, one without by tag (its
    own key), and a span-mode app's result still waits for its span. A tag app's span that comes after its result
    went by tag is not reported; one whose result never comes is."""
    settings = make_settings(join_by_tag=f"{TAG_APP}=dataset_row", join_ttl_seconds=2, sweep_interval_seconds=0.2)
    async with running_service(settings):
        await send_json(producer, topics.span, span_event("q-span", "11"))
        await settled(kafka, settings, topics)
        await send_json(producer, topics.result, keyed(result_event("q-span", "evt-mix-0001")))
        await send_json(producer, topics.result, keyed(result_event("q-tag", "evt-mix-0002")))
        await send_json(producer, topics.result, keyed(result_event("q-other", "evt-mix-0003", ml_app="span-app")))
        await eventually(lambda: len(intake.accepted_metrics()) >= 2, what="the tag app's two results")
        await settled(kafka, settings, topics)
        assert len(intake.accepted_metrics()) == 2  # the span-mode app's result waits
        await send_json(producer, topics.span, span_event("q-other", "33", ml_app="span-app"))
        await send_json(producer, topics.span, span_event("q-tag", "22"))  # after its result went by tag
        await send_json(producer, topics.span, span_event("q-lonely", "44"))
        await eventually(lambda: len(intake.accepted_metrics()) >= 3, what="the span-mode app's result")
        (report,) = await read_topic(kafka.bootstrap_servers, topics.unmatched, 1, within=20)
        await asyncio.sleep(1.5)  # more sweeps: the late span's deadline passed before the lonely one's
        assert await topic_size(kafka.bootstrap_servers, topics.unmatched) == 1
    assert joins(intake) == {
        (TAG_APP, "q-span"): {"span": {"span_id": "11", "trace_id": "abc123"}},
        (TAG_APP, "q-tag"): {"tag": {"key": "dataset_row", "value": "q-tag"}},
        ("span-app", "q-other"): {"span": {"span_id": "33", "trace_id": "abc123"}},
    }
    assert (orjson.loads(report.value)["reason"], orjson.loads(report.value)["join_key"]) == (
        "span_without_result", "q-lonely")
