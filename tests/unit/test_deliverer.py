"""The delivery step on the in-memory join store: each evaluation once, refusals dead-lettered, results kept."""

from __future__ import annotations

import asyncio

import pytest

from consumer.clock import ManualClock
from consumer.deliver import Deliverer
from consumer.dlq import DeadLetters, DlqLimit
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.join import Joined, Joiner, JoinResult, Source
from consumer.metrics import Metrics
from consumer.store import Namespace, Settle
from consumer.store_memory import MemoryJoinStore
from tests.support import eventually
from tests.unit.fakes import FakeProducer, FakeSink

pytestmark = pytest.mark.unit

NS = Namespace("app", "q-1")
LEASE_MS = 5_000


class Setup:
    """A deliverer wired to a memory store, a sink and a dead-letter producer in memory, on a manual clock."""

    def __init__(self, sink: FakeSink | None = None) -> None:
        self.clock = ManualClock()
        self.store = MemoryJoinStore()
        self.sink = sink or FakeSink()
        self.producer = FakeProducer()
        self.metrics = Metrics()
        letters = DeadLetters(self.producer, topic="dlq", metrics=self.metrics,
                              limit=DlqLimit(max_invalid_ratio=0, window=100, max_consecutive=0))
        self.deliverer = Deliverer(self.store, self.sink, letters, owner="me", lease_ms=LEASE_MS,
                                   metrics=self.metrics, busy_poll_s=0.001, clock=self.clock)
        self.joiner = Joiner(self.store, join_ttl_ms=60_000, clock=self.clock)

    async def joined(self, labels: list[str], *, buffered: bool, produced_ms: int | None = None) -> list[Joined]:
        """The evaluations of one result event with ``labels``; ``buffered``: the result came before its span."""
        at = self.clock.now_ms() if produced_ms is None else produced_ms
        span = SpanContextEvent(schema_version=1, ml_app=NS.ml_app, join_key=NS.join_key, trace_id="ab", span_id="7")
        result = NemoResultEvent.model_validate({
            "schema_version": 1, "event_id": "evt-00000001", "ml_app": NS.ml_app, "join_key": NS.join_key,
            "evaluations": [{"label": label, "metric_type": "score", "value": 1} for label in labels]})
        sides: list[tuple[SpanContextEvent | NemoResultEvent, Source]] = [
            (result, Source("results", 0, 10, at)), (span, Source("spans", 0, 20, at))]
        outcomes = await self.joiner.join_many(sides if buffered else sides[::-1])
        last = outcomes[-1]
        assert isinstance(last, JoinResult) and len(last.joined) == len(labels)
        return last.joined

    async def ledger(self) -> dict[str, str]:
        return (await self.store.lookup(NS)).ledger

    async def pending(self) -> list[str]:
        return list((await self.store.lookup(NS)).pending_results)


async def test_each_evaluation_is_delivered_once() -> None:
    """A result's evaluations go to the sink in one call and are recorded; delivering them again sends nothing."""
    setup = Setup()
    joined = await setup.joined(["faithfulness", "relevance"], buffered=False)
    first = await setup.deliverer.deliver(joined)
    again = await setup.deliverer.deliver(joined)
    assert (first.delivered, first.already_done, again.delivered, again.already_done) == (2, 0, 0, 2)
    assert setup.sink.calls == [[item.metric for item in joined]]
    assert set((await setup.ledger()).values()) == {"delivered"}


async def test_an_evaluation_listed_twice_is_sent_once() -> None:
    """The same evaluation twice in one call (a redelivered record in the batch) is claimed and sent once."""
    setup = Setup()
    joined = await setup.joined(["faithfulness"], buffered=False)
    report = await setup.deliverer.deliver([*joined, *joined])
    assert report.delivered == 1 and setup.sink.sent == [joined[0].metric]


async def test_evaluations_already_finished_elsewhere_are_skipped() -> None:
    """Evaluations the ledger has as delivered or dead-lettered (by another consumer) are not sent."""
    setup = Setup()
    joined = await setup.joined(["faithfulness", "relevance", "toxicity"], buffered=False)
    await setup.store.settle_many([Settle(NS, delivered=[joined[0].eval_id], dead_lettered=[joined[1].eval_id])])
    report = await setup.deliverer.deliver(joined)
    assert (report.delivered, report.already_done) == (1, 2)
    assert setup.sink.sent == [joined[2].metric]


async def test_a_refused_evaluation_is_dead_lettered_and_the_rest_delivered() -> None:
    """What the intake refuses goes to the DLQ with its key and metric and is recorded so; the rest is delivered."""
    setup = Setup(FakeSink(refuse=b'"label":"toxicity"'))
    joined = await setup.joined(["faithfulness", "toxicity"], buffered=False)
    report = await setup.deliverer.deliver(joined)
    assert (report.delivered, report.dead_lettered) == (1, 1)
    (record,) = setup.producer.sent
    assert (record["topic"], record["key"], record["value"]) == ("dlq", b"app:q-1", joined[1].metric)
    assert ("evaljoin.error", b"intake_rejected") in record["headers"]
    assert await setup.ledger() == {joined[0].eval_id: "delivered", joined[1].eval_id: "dead-lettered"}


async def test_a_buffered_result_is_dropped_once_every_evaluation_is_finished() -> None:
    """A result that waited for its span leaves the store when its evaluations are delivered or dead-lettered."""
    setup = Setup(FakeSink(refuse=b'"label":"toxicity"'))
    joined = await setup.joined(["faithfulness", "toxicity"], buffered=True)
    assert await setup.pending() == ["evt-00000001"]
    await setup.deliverer.deliver(joined)
    assert await setup.pending() == []


async def test_a_result_stays_while_another_consumer_sends_part_of_it() -> None:
    """While another consumer holds a live claim on one evaluation, the rest is sent but the result is kept;
    it is dropped once that evaluation is finished, which the deliverer waits for instead of sending it."""
    setup = Setup()
    joined = await setup.joined(["faithfulness", "relevance"], buffered=True)
    await setup.store.claim_many([(NS, [joined[1].eval_id])], owner="other", now_ms=setup.clock.now_ms(),
                                 lease_ms=LEASE_MS)
    delivery = asyncio.create_task(setup.deliverer.deliver(joined))
    await eventually(lambda: setup.sink.sent == [joined[0].metric], within=5, what="the unclaimed evaluation sent")
    await asyncio.sleep(0.01)  # several busy polls
    assert not delivery.done() and await setup.pending() == ["evt-00000001"]
    await setup.store.settle_many([Settle(NS, delivered=[joined[1].eval_id])])
    report = await asyncio.wait_for(delivery, timeout=5)
    assert (report.delivered, report.already_done) == (1, 1)
    assert setup.sink.sent == [joined[0].metric] and await setup.pending() == []


async def test_a_claim_whose_lease_ran_out_is_taken_over() -> None:
    """An evaluation claimed by a consumer that went away is waited for until its lease ends, then sent."""
    setup = Setup()
    joined = await setup.joined(["faithfulness"], buffered=True)
    await setup.store.claim_many([(NS, [joined[0].eval_id])], owner="gone", now_ms=setup.clock.now_ms(),
                                 lease_ms=LEASE_MS)
    delivery = asyncio.create_task(setup.deliverer.deliver(joined))
    await asyncio.sleep(0.02)  # busy polls while the lease lasts
    assert not delivery.done() and setup.sink.calls == []
    setup.clock.advance(LEASE_MS / 1000 + 0.001)
    report = await asyncio.wait_for(delivery, timeout=5)
    assert report.delivered == 1 and setup.sink.sent == [joined[0].metric]
    assert await setup.ledger() == {joined[0].eval_id: "delivered"} and await setup.pending() == []


async def test_join_latency_is_measured_on_the_clock_from_the_first_side_produced() -> None:
    """The latency observed for a delivered evaluation runs from the earlier side's timestamp to now."""
    setup = Setup()
    joined = await setup.joined(["faithfulness"], buffered=False, produced_ms=setup.clock.now_ms() - 2_500)
    setup.clock.advance(1.5)
    await setup.deliverer.deliver(joined)
    assert setup.metrics.registry.get_sample_value("evaljoin_join_latency_seconds_sum") == pytest.approx(4.0)
