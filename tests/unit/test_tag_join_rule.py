"""Joining by span tag, on the in-memory join store: which results join on the tag, which wait, and once only.

An ml_app named in ``JOIN_BY_TAG`` tags its spans with the join key; a result of it whose span is not
buffered is delivered at once with ``join_on.tag`` instead of waiting, and the ledger keeps a result
published again from going twice. Spans it does publish are buffered and joined as any app's.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from consumer.clock import ManualClock
from consumer.config import Settings, config_errors
from consumer.deliver import Deliverer
from consumer.dlq import DeadLetters, DlqLimit
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.join import Joined, Joiner, JoinResult, Source, TagJoin
from consumer.metrics import Metrics
from consumer.store import Namespace, ResultOp
from consumer.store_memory import MemoryJoinStore
from producer_examples.app_side import join_tag_value
from tests.unit.fakes import FakeProducer, FakeSink

pytestmark = pytest.mark.unit

TTL_MS = 60_000
TAG_APP = "tag-app"


def tag_join(**settings: Any) -> TagJoin:
    made = TagJoin.from_settings(Settings(**settings))
    assert made is not None
    return made


class Setup:
    """A joiner and a deliverer on one memory store, with ``JOIN_BY_TAG=tag-app`` unless told otherwise."""

    def __init__(self, **settings: Any) -> None:
        self.clock = ManualClock()
        self.store = MemoryJoinStore()
        self.sink = FakeSink()
        self.metrics = Metrics()
        letters = DeadLetters(FakeProducer(), topic="dlq", metrics=self.metrics,
                              limit=DlqLimit(max_invalid_ratio=0, window=100, max_consecutive=0))
        self.deliverer = Deliverer(self.store, self.sink, letters, owner="me", lease_ms=5_000,
                                   metrics=self.metrics, busy_poll_s=0.001, clock=self.clock)
        self.joiner = Joiner(self.store, join_ttl_ms=TTL_MS, clock=self.clock,
                             tag_join=TagJoin.from_settings(Settings(**{"join_by_tag": TAG_APP, **settings})))
        self.offset = 0

    def _source(self, topic: str) -> Source:
        self.offset += 1
        return Source(topic, 0, self.offset, self.clock.now_ms())

    async def span(self, ml_app: str = TAG_APP, key: str = "q-1", *, span_id: str = "7",
                   run_id: str | None = None) -> JoinResult:
        event = SpanContextEvent(schema_version=1, ml_app=ml_app, join_key=key, trace_id="ab", span_id=span_id,
                                 run_id=run_id)
        (outcome,) = await self.joiner.join_many([(event, self._source("spans"))])
        assert isinstance(outcome, JoinResult)
        return outcome

    async def result(self, ml_app: str = TAG_APP, key: str = "q-1", *, event_id: str = "evt-0001",
                     label: str = "quality", run_id: str | None = None) -> JoinResult:
        event = NemoResultEvent.model_validate({
            "schema_version": 1, "event_id": event_id, "ml_app": ml_app, "join_key": key, "run_id": run_id,
            "evaluations": [{"label": label, "metric_type": "score", "value": 8}]})
        (outcome,) = await self.joiner.join_many([(event, self._source("results"))])
        assert isinstance(outcome, JoinResult)
        return outcome

    async def deliver(self, joined: list[Joined]) -> None:
        await self.deliverer.deliver(joined)

    def sent(self) -> list[dict[str, Any]]:
        return [orjson.loads(metric) for metric in self.sink.sent]


def join_on(outcome: JoinResult) -> list[dict[str, Any]]:
    return [orjson.loads(item.metric)["join_on"] for item in outcome.joined]


# -- the settings -------------------------------------------------------------------------------


def test_every_app_joins_on_the_join_keys_name_by_default() -> None:
    """``JOIN_BY_TAG=*``: every ml_app joins on the tag named like the join key, valued the join key."""
    tags = tag_join(join_by_tag="*")
    assert tags.tag_of(Namespace("any-app", "q-1")) == ("question_id", "q-1")
    assert tag_join(join_by_tag="*", join_key="item_id").tag_of(Namespace("a", "7")) == ("item_id", "7")


def test_listed_apps_join_by_tag_with_their_own_keys_and_the_others_by_span_ids() -> None:
    """A list names the apps that join by tag; ``app=key`` gives one its own key, JOIN_TAG_KEY the rest's."""
    tags = tag_join(join_by_tag=" bot-a , bot-b=qid ", join_tag_key="dataset_row")
    assert tags.tag_of(Namespace("bot-a", "q-1")) == ("dataset_row", "q-1")
    assert tags.tag_of(Namespace("bot-b", "q-1")) == ("qid", "q-1")
    assert tags.tag_of(Namespace("bot-c", "q-1")) is None
    assert tag_join(join_by_tag="bot-b=qid,*").tag_of(Namespace("bot-c", "q-1")) == ("question_id", "q-1")


def test_a_result_with_a_run_joins_on_the_run_and_the_key() -> None:
    """Without JOIN_TAG_VALUE, a run's result joins on ``<run_id>:<join_key>``: a bare key names every run's span."""
    tags = tag_join(join_by_tag="*")
    assert tags.tag_of(Namespace("a", "q-1", "nightly-7")) == ("question_id", "nightly-7:q-1")


def test_the_value_template_fills_its_placeholders_once() -> None:
    """JOIN_TAG_VALUE fills {join_key}, {run_id} and {ml_app}; a placeholder inside a filled value stays as it is."""
    tags = tag_join(join_by_tag="*", join_tag_value="{ml_app}/{run_id}/{join_key}")
    assert tags.tag_of(Namespace("bot", "q-{run_id}", "r1")) == ("question_id", "bot/r1/q-{run_id}")
    assert tag_join(join_by_tag="*", join_tag_value="row-{join_key}").tag_of(Namespace("a", "9")) == (
        "question_id", "row-9")


def test_a_template_that_names_a_run_gives_no_tag_to_a_result_without_one() -> None:
    """A result without a run cannot fill {run_id}: it has no tag, and waits for its span as in span mode."""
    tags = tag_join(join_by_tag="*", join_tag_value="{run_id}:{join_key}")
    assert tags.tag_of(Namespace("a", "q-1")) is None
    assert tags.tag_of(Namespace("a", "q-1", "r")) == ("question_id", "r:q-1")


def test_no_tag_join_without_join_by_tag() -> None:
    """JOIN_BY_TAG unset: no tag join at all, whatever JOIN_TAG_KEY says."""
    assert TagJoin.from_settings(Settings(join_tag_key="question_id")) is None


@pytest.mark.parametrize(("settings", "says"), [
    ({"join_by_tag": "bot,bot=qid"}, "JOIN_BY_TAG: Value error, JOIN_BY_TAG names 'bot' twice"),
    ({"join_by_tag": "*,*"}, "JOIN_BY_TAG names '*' twice"),
    ({"join_by_tag": "my bot"}, "JOIN_BY_TAG: String should match pattern"),
    ({"join_by_tag": "bot=question:id"}, "JOIN_BY_TAG: String should match pattern"),
    ({"join_by_tag": "bot,"}, "JOIN_BY_TAG: String should match pattern"),
    ({"join_tag_key": "9lives"}, "JOIN_TAG_KEY: String should match pattern"),
    ({"join_tag_value": "{run_id}"}, "JOIN_TAG_VALUE: String should match pattern"),
    ({"join_tag_value": "{join_key}-{model}"}, "JOIN_TAG_VALUE: String should match pattern"),
])
def test_settings_that_cannot_name_a_tag_are_refused(settings: dict[str, Any], says: str) -> None:
    """An app named twice, a key Datadog's tags cannot have, or a value template without {join_key} (it would
    name every span of the app) or with an unknown placeholder is refused at start, naming the variable."""
    with pytest.raises(ValidationError) as refused:
        Settings(**settings)
    assert says in config_errors(refused.value)


# -- the join -----------------------------------------------------------------------------------


async def test_a_result_without_its_span_is_delivered_at_once_joined_by_tag() -> None:
    """No span-context event at all: the result is ``tagged``, joined on the tag, and stores nothing."""
    setup = Setup()
    outcome = await setup.result()
    assert outcome.status == "tagged"
    assert join_on(outcome) == [{"tag": {"key": "question_id", "value": "q-1"}}]
    state = await setup.store.lookup(Namespace(TAG_APP, "q-1"))
    assert (state.span, state.pending_results) == (None, {})
    assert await setup.store.index_size() == (0, None)
    await setup.deliver(outcome.joined)
    assert [metric["join_on"] for metric in setup.sent()] == [{"tag": {"key": "question_id", "value": "q-1"}}]


async def test_a_result_published_again_is_not_delivered_twice() -> None:
    """The ledger keeps a re-published result from going twice: ``duplicate`` once delivered, and a copy joined
    before the first was delivered is recognised by its evaluation id when it is claimed."""
    setup = Setup()
    first, again = await setup.result(), await setup.result()
    assert (first.status, again.status) == ("tagged", "tagged")  # both before any delivery
    await setup.deliver(first.joined)
    await setup.deliver(again.joined)
    assert len(setup.sink.sent) == 1
    late = await setup.result()
    assert (late.status, late.joined) == ("duplicate", [])
    assert len(setup.sink.sent) == 1


async def test_a_buffered_span_joins_its_result_by_span_ids() -> None:
    """The mixed case: an app that joins by tag but did publish this span gets its result joined by span ids."""
    setup = Setup()
    assert (await setup.span()).status == "stored"
    outcome = await setup.result()
    assert outcome.status == "joined"
    assert join_on(outcome) == [{"span": {"span_id": "7", "trace_id": "ab"}}]


async def test_an_app_not_listed_still_waits_for_its_span() -> None:
    """Only the apps JOIN_BY_TAG names join by tag: another app's result is buffered until its span comes."""
    setup = Setup()
    assert (await setup.result(ml_app="span-app")).status == "buffered"
    released = await setup.span(ml_app="span-app")
    assert released.status == "stored"
    assert join_on(released) == [{"span": {"span_id": "7", "trace_id": "ab"}}]


async def test_a_span_that_comes_after_its_result_went_by_tag_is_not_reported() -> None:
    """The span of a result already delivered by tag is stored as joined: its deadline passes without a report,
    and the same result published again is recognised as delivered."""
    setup = Setup()
    await setup.deliver((await setup.result()).joined)
    assert (await setup.span()).status == "stored"
    assert (await setup.store.lookup(Namespace(TAG_APP, "q-1"))).span_joined
    assert (await setup.result()).status == "duplicate"
    (due,) = [side for shard in range(setup.store.shards) for side in await setup.store.due(shard, 2**62, 10)
              if side.event_id is None]
    assert (await setup.store.expire(due)).verdict == "dropped"
    assert (await setup.result()).status == "duplicate"


async def test_a_span_whose_result_never_comes_is_still_reported() -> None:
    """A span of a tag-joined app with no result delivered for its key is reported at its deadline."""
    setup = Setup()
    await setup.span()
    assert not (await setup.store.lookup(Namespace(TAG_APP, "q-1"))).span_joined
    (due,) = [side for shard in range(setup.store.shards) for side in await setup.store.due(shard, 2**62, 10)]
    assert (await setup.store.expire(due)).verdict == "report"


async def test_a_run_joins_on_the_run_scoped_value() -> None:
    """A result with a run goes out joined on ``<run_id>:<join_key>``, and its ledger is the run's."""
    setup = Setup()
    outcome = await setup.result(run_id="nightly-7")
    assert join_on(outcome) == [{"tag": {"key": "question_id", "value": "nightly-7:q-1"}}]
    assert outcome.joined[0].namespace == Namespace(TAG_APP, "q-1", "nightly-7")


async def test_a_result_the_template_cannot_name_waits_for_its_span() -> None:
    """With a template that needs a run, a result without one is buffered and joins its span by ids."""
    setup = Setup(join_tag_value="{run_id}:{join_key}")
    assert (await setup.result()).status == "buffered"
    assert join_on(await setup.span()) == [{"span": {"span_id": "7", "trace_id": "ab"}}]


async def test_a_result_that_waited_from_before_goes_by_tag_and_leaves_the_buffer() -> None:
    """A result buffered before its app joined by tag (published again, or replayed) is delivered by tag and
    dropped from the buffer, so its deadline reports nothing."""
    store = MemoryJoinStore()
    ns = Namespace(TAG_APP, "q-1")
    (put,) = await store.put_many([ResultOp(ns, "evt-0001", b"old", ["x"], TTL_MS, ("s1234567",))])
    assert put.status == "buffered"
    setup = Setup()
    setup.store = store
    setup.joiner = Joiner(store, join_ttl_ms=TTL_MS, clock=setup.clock, tag_join=tag_join(join_by_tag=TAG_APP))
    setup.deliverer = Deliverer(store, setup.sink, DeadLetters(
        FakeProducer(), topic="dlq", metrics=setup.metrics,
        limit=DlqLimit(max_invalid_ratio=0, window=100, max_consecutive=0)),
        owner="me", lease_ms=5_000, metrics=setup.metrics, clock=setup.clock)
    outcome = await setup.result()
    assert outcome.status == "tagged"
    await setup.deliver(outcome.joined)
    assert (await store.lookup(ns)).pending_results == {}


async def test_without_a_run_a_repeated_slot_still_waits_for_the_next_answer() -> None:
    """With its span here, a tag-joined app keeps the repeated-key rule: the next answer's score waits for it."""
    setup = Setup()
    await setup.span()
    assert (await setup.result(event_id="night-0001")).status == "joined"
    assert (await setup.result(event_id="night-0002")).status == "waiting"


@pytest.mark.parametrize("run", [None, "nightly-2026-12-01"])
def test_the_example_app_tags_its_span_with_the_value_the_default_rule_joins_on(run: str | None) -> None:
    """producer_examples.app_side tags each answer's span with what TagJoin's default rule looks for."""
    rule = TagJoin(apps={}, every_app="question_id")
    assert rule.tag_of(Namespace("bot", "q-7", run or "")) == ("question_id", join_tag_value("q-7", run))
