"""The delivery step on the in-memory join store: each evaluation once, refusals dead-lettered, results kept."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from consumer.clock import ManualClock
from consumer.deliver import Deliverer
from consumer.dlq import DeadLetters, DlqLimit
from consumer.errors import Unavailable
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.join import Joined, Joiner, JoinResult, Source
from consumer.metrics import Metrics
from consumer.sink import Accepted, Rejection
from consumer.store import Namespace, Settle
from consumer.store_memory import MemoryJoinStore
from tests.support import eventually
from tests.unit.fakes import FakeProducer, FakeSink

pytestmark = pytest.mark.unit

NS = Namespace("app", "q-1")
LEASE_MS = 5_000


class Setup:
    """A deliverer wired to a memory store, a sink and a dead-letter producer in memory, on a manual clock."""

    def __init__(self, sink: FakeSink | None = None, store: MemoryJoinStore | None = None) -> None:
        self.clock = ManualClock()
        self.store = store or MemoryJoinStore()
        self.sink = sink or FakeSink()
        self.producer = FakeProducer()
        self.metrics = Metrics()
        self.deliverer = self.restarted(self.sink, owner="me")
        self.joiner = Joiner(self.store, join_ttl_ms=60_000, clock=self.clock)

    def restarted(self, sink: FakeSink, *, owner: str) -> Deliverer:
        """A deliverer on the same store and clock, as a new process has it after a crash."""
        letters = DeadLetters(self.producer, topic="dlq", metrics=self.metrics,
                              limit=DlqLimit(max_invalid_ratio=0, window=100, max_consecutive=0))
        return Deliverer(self.store, sink, letters, owner=owner, lease_ms=LEASE_MS, metrics=self.metrics,
                         busy_poll_s=0.001, clock=self.clock)

    async def joined(self, labels: list[str], *, buffered: bool, produced_ms: int | None = None,
                     event_id: str = "evt-00000001") -> list[Joined]:
        """The evaluations of one result event with ``labels``; ``buffered``: the result came before its span."""
        at = self.clock.now_ms() if produced_ms is None else produced_ms
        span = SpanContextEvent(schema_version=1, ml_app=NS.ml_app, join_key=NS.join_key, trace_id="ab", span_id="7")
        result = NemoResultEvent.model_validate({
            "schema_version": 1, "event_id": event_id, "ml_app": NS.ml_app, "join_key": NS.join_key,
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


async def test_a_crash_after_the_first_of_three_requests_leaves_its_evaluations_in_the_ledger() -> None:
    """Each request's evaluations are recorded as soon as it is answered 2xx: a crash while the second of three
    requests is in flight leaves the first's as delivered, and the process after it sends only the other two."""
    setup = Setup(FakeSink(per_request=2, stall_at=1))
    joined = await setup.joined(["faithfulness", "relevance", "toxicity", "coherence", "fluency", "bias"],
                                buffered=True)
    delivery = asyncio.create_task(setup.deliverer.deliver(joined))
    await asyncio.wait_for(setup.sink.stalled.wait(), timeout=5)
    delivery.cancel()  # the crash: nothing after this point happens
    with pytest.raises(asyncio.CancelledError):
        await delivery
    first, rest = joined[:2], joined[2:]
    assert setup.sink.requests == [[item.metric for item in first]]
    ledger = await setup.ledger()
    assert {ledger[item.eval_id] for item in first} == {"delivered"}
    assert {ledger[item.eval_id] for item in rest} == {"in flight"}  # claimed, not recorded
    assert await setup.pending() == ["evt-00000001"]  # the result stays until every evaluation is finished

    sink = FakeSink(per_request=2)
    setup.clock.advance(LEASE_MS / 1000 + 0.001)  # the dead process's claims run out
    report = await setup.restarted(sink, owner="next").deliver(joined)
    assert (report.delivered, report.already_done) == (4, 2)
    assert sink.requests == [[item.metric for item in rest[:2]], [item.metric for item in rest[2:]]]
    assert set((await setup.ledger()).values()) == {"delivered"} and await setup.pending() == []


class FailingSettles(MemoryJoinStore):
    """A memory store whose next ``failures`` ledger writes fail, as they do while Redis is down."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def settle_many(self, requests: Sequence[Settle]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise Unavailable("redis", "connection refused")
        await super().settle_many(requests)


async def test_a_ledger_write_that_fails_is_done_on_the_next_try_without_sending_again() -> None:
    """The intake accepted a request but the ledger write after it failed: the batch fails (to be tried again),
    the other requests still go, and the next try records that request's evaluations instead of sending them."""
    store = FailingSettles(failures=1)
    setup = Setup(FakeSink(per_request=2), store=store)
    joined = await setup.joined(["faithfulness", "relevance", "toxicity", "coherence"], buffered=True)
    with pytest.raises(Unavailable):
        await setup.deliverer.deliver(joined)
    assert len(setup.sink.requests) == 2  # the second request went although the first one's record failed
    ledger = await setup.ledger()
    assert [ledger[item.eval_id] for item in joined] == ["in flight"] * 2 + ["delivered"] * 2
    assert await setup.pending() == ["evt-00000001"]  # not dropped before every evaluation is recorded

    report = await setup.deliverer.deliver(joined)
    assert (report.delivered, report.already_done) == (2, 2)
    assert len(setup.sink.requests) == 2  # nothing sent twice
    assert set((await setup.ledger()).values()) == {"delivered"} and await setup.pending() == []


async def test_what_a_failed_ledger_write_left_is_forgotten_when_another_batch_is_delivered() -> None:
    """Accepted evaluations whose record failed are remembered for their batch's next try only: a batch given up
    on (its partitions revoked) is delivered by its next owner, and this deliverer sends its next batch as usual."""
    store = FailingSettles(failures=1)
    setup = Setup(FakeSink(), store=store)
    joined = await setup.joined(["faithfulness"], buffered=False)
    with pytest.raises(Unavailable):
        await setup.deliverer.deliver(joined)
    other = await setup.joined(["relevance"], buffered=False, event_id="evt-00000002")
    report = await setup.deliverer.deliver(other)
    assert report.delivered == 1 and setup.sink.sent == [joined[0].metric, other[0].metric]
    setup.clock.advance(LEASE_MS / 1000 + 0.001)
    again = await setup.deliverer.deliver(joined)  # the same batch later (no longer remembered): sent again
    assert again.delivered == 1 and setup.sink.sent[-1] == joined[0].metric


class SilentSink(FakeSink):
    """A sink that reports no request as it goes: only its return says what was accepted."""

    async def send(self, metrics: Sequence[bytes], *, accepted: Accepted | None = None) -> list[Rejection]:
        return await super().send(metrics)


async def test_what_a_sink_accepted_without_reporting_it_is_recorded_at_its_return() -> None:
    """A sink that never calls ``accepted`` still has every evaluation it did not reject recorded as delivered."""
    setup = Setup(SilentSink(refuse=b'"label":"toxicity"', per_request=1))
    joined = await setup.joined(["faithfulness", "relevance", "toxicity"], buffered=True)
    report = await setup.deliverer.deliver(joined)
    assert (report.delivered, report.dead_lettered) == (2, 1)
    assert await setup.ledger() == {joined[0].eval_id: "delivered", joined[1].eval_id: "delivered",
                                    joined[2].eval_id: "dead-lettered"}
    assert await setup.pending() == []
