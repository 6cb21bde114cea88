"""A result goes to the store without its record, encoded only when it is to be stored (``consumer.join``).

Deferring the encoding must change nothing but the cost: on the same batches, a joiner that defers and one that
encodes every result up front give the same outcomes and leave the store in the same state, and the deferring one
encodes only the results that were stored.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import join, records
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.join import Joiner, JoinResult, Source
from consumer.store import Namespace
from consumer.store_memory import MemoryJoinStore

pytestmark = pytest.mark.unit

KEYS = ("q-1", "q-2", "q-3")


def span(key: str, answer: int, run: str | None) -> SpanContextEvent:
    return SpanContextEvent(schema_version=1, ml_app="app", join_key=key, run_id=run, trace_id=f"{answer:x}",
                            span_id=str(answer))


def result(key: str, event: int, label: str, run: str | None) -> NemoResultEvent:
    return NemoResultEvent.model_validate({
        "schema_version": 1, "event_id": f"evt-{event:04d}", "ml_app": "app", "join_key": key, "run_id": run,
        "evaluations": [{"label": label, "metric_type": "score", "value": event}]})


# One side: (is a span, key, answer or event number, label); a batch is a list of sides, a run a list of batches.
side = st.tuples(st.booleans(), st.sampled_from(KEYS), st.integers(1, 3), st.sampled_from(("a", "b")))
runs = st.lists(st.lists(side, min_size=1, max_size=6), min_size=1, max_size=6)


def events_of(batch: list[tuple[bool, str, int, str]], run: str | None) -> list[SpanContextEvent | NemoResultEvent]:
    return [span(key, n, run) if is_span else result(key, n, label, run) for is_span, key, n, label in batch]


async def drive(batches: list[list[tuple[bool, str, int, str]]], run: str | None) -> tuple[list[Any], list[Any]]:
    """Each batch through a fresh joiner's join_many: every outcome, and then what each key holds."""
    store = MemoryJoinStore()
    joiner = Joiner(store, join_ttl_ms=60_000)
    outcomes: list[Any] = []
    offset = 0
    for batch in batches:
        items = []
        for event in events_of(batch, run):
            items.append((event, Source("t", 0, offset, 1_000 + offset)))
            offset += 1
        for outcome in await joiner.join_many(items):
            if isinstance(outcome, JoinResult):
                outcomes.append((outcome.status, [(j.eval_id, j.metric, j.buffered) for j in outcome.joined]))
            else:  # refused: a conflict or a full key, and why
                outcomes.append((type(outcome).__name__, str(outcome)))
    held = [await store.lookup(Namespace("app", key, run or "")) for key in KEYS]
    return outcomes, held


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=runs, run=st.sampled_from((None, "run-1")))
async def test_deferring_changes_no_outcome_and_no_stored_state(batches: list[list[tuple[bool, str, int, str]]],
                                                                run: str | None, monkeypatch: Any) -> None:
    """The same batches, deferring and encoding up front: equal outcomes, equal store contents."""
    deferred = await drive(batches, run)
    with monkeypatch.context() as patch:
        patch.setattr(join, "DEFER_BELOW_STORED_SHARE", 0.0)  # never defer: the encoding before this change
        eager = await drive(batches, run)
    assert deferred == eager


async def test_only_stored_results_are_encoded(monkeypatch: Any) -> None:
    """Results whose span is here are joined without being encoded; one whose span is not is encoded and stored."""
    encoded: list[dict[str, Any]] = []
    encode = records.encode

    def counting(fields: dict[str, Any], **kwargs: Any) -> bytes:
        encoded.append(fields)
        return encode(fields, **kwargs)

    monkeypatch.setattr(records, "encode", counting)
    store = MemoryJoinStore()
    joiner = Joiner(store, join_ttl_ms=60_000)
    spans = [span(key, i, None) for i, key in enumerate(KEYS[:2], 1)]
    await joiner.join_many([(event, Source("t", 0, i, 1_000)) for i, event in enumerate(spans)])
    encoded.clear()  # spans are always stored, so always encoded
    results = [result(key, i, "a", None) for i, key in enumerate(KEYS, 1)]
    outcomes = await joiner.join_many([(event, Source("t", 1, i, 1_000)) for i, event in enumerate(results)])
    assert [o.status for o in outcomes if isinstance(o, JoinResult)] == ["joined", "joined", "buffered"]
    assert [fields["event_id"] for fields in encoded] == ["evt-0003"]
    state = await store.lookup(Namespace("app", "q-3"))
    assert list(state.pending_results) == ["evt-0003"]
