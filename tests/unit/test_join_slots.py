"""The join step's slots on the in-memory store: what makes two results of one key the same evaluation or not."""

from __future__ import annotations

from typing import Any

import pytest

from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.join import Joiner, JoinResult, Source
from consumer.store_memory import MemoryJoinStore

pytestmark = pytest.mark.unit


def result(event_id: str, *, tags: dict[str, str] | None = None, run_id: str | None = None,
           **provenance: Any) -> NemoResultEvent:
    return NemoResultEvent.model_validate({
        "schema_version": 1, "event_id": event_id, "ml_app": "app", "join_key": "q-1", "run_id": run_id,
        "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 1, "tags": tags or {}}],
        "provenance": provenance or None})


async def statuses(*results: NemoResultEvent) -> list[str]:
    """The join statuses of a span of q-1 and then each result."""
    joiner = Joiner(MemoryJoinStore(), join_ttl_ms=60_000)
    span = SpanContextEvent(schema_version=1, ml_app="app", join_key="q-1", trace_id="ab", span_id="7")
    events: list[SpanContextEvent | NemoResultEvent] = [span, *results]
    outcomes = await joiner.join_many([(event, Source("t", 0, i, 1_000)) for i, event in enumerate(events)])
    assert all(isinstance(outcome, JoinResult) for outcome in outcomes)
    return [outcome.status for outcome in outcomes if isinstance(outcome, JoinResult)][1:]


async def test_two_judges_under_one_label_are_two_evaluations_of_the_answer() -> None:
    """Results told apart by a tag or by their provenance's judge, config or model both join the answer."""
    assert await statuses(result("evt-judge-a", judge="judge-a"), result("evt-judge-b", judge="judge-b"),
                          result("evt-config-b", judge="judge-a", config="org/other"),
                          result("evt-tagged-01", tags={"judge": "c"})) == ["joined"] * 4


async def test_the_same_evaluation_from_another_job_is_the_next_answers() -> None:
    """Job id and time change from run to run: the same label, tags and judge again waits for the next answer."""
    assert await statuses(result("evt-night-01", job_id="night-1", judge="j", evaluated_at_ms=1),
                          result("evt-night-02", job_id="night-2", judge="j", evaluated_at_ms=2)) == [
        "joined", "waiting"]


async def test_with_a_run_a_repeated_evaluation_still_joins_its_span() -> None:
    """In a run the answer is named: a second result of the same slot is no next answer's, it joins."""
    joiner = Joiner(MemoryJoinStore(), join_ttl_ms=60_000)
    span = SpanContextEvent(schema_version=1, ml_app="app", run_id="r", join_key="q-1", trace_id="ab", span_id="7")
    events: list[SpanContextEvent | NemoResultEvent] = [span, result("evt-first-01", run_id="r"),
                                                        result("evt-again-01", run_id="r")]
    outcomes = await joiner.join_many([(event, Source("t", 0, i, 1_000)) for i, event in enumerate(events)])
    assert [outcome.status for outcome in outcomes if isinstance(outcome, JoinResult)] == [
        "stored", "joined", "joined"]
