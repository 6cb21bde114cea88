"""The service end to end: real Kafka, real Redis (single and cluster), a real HTTP intake."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from consumer.errors import DlqLimitExceeded
from consumer.service import Service
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from tests.support import Topics, eventually, group_lag, read_topic, running_service, send_json, topic_size

pytestmark = pytest.mark.timeout(180)

SEED = Path(__file__).parent.parent / "producer_examples" / "seed"
OUTPUT_RECORD = json.loads((SEED / "outputs.json").read_text())[0]
JUDGE_LINE = (SEED / "scores.jsonl").read_text().splitlines()[0].encode()


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
def redis_url(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """Join and delivery run against a single redis-server and against a three-node Redis Cluster."""
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster").url, True
    return request.getfixturevalue("redis_server").url, False


def span_event(key: str, *, trace: str = "abc123", span: str = "42", ml_app: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"schema_version": 1, "join_key": key, "trace_id": trace, "span_id": span}
    if ml_app:
        event["ml_app"] = ml_app
    return event


JUDGED_MS = int(time.time() * 1000) - 3_600_000  # an hour before the tests: inside Datadog's window, kept as given


def result_event(key: str, event_id: str, *labels: str, ml_app: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1, "event_id": event_id, "join_key": key,
        "evaluations": [{"label": label, "metric_type": "score", "value": 0.5, "timestamp_ms": JUDGED_MS}
                        for label in labels or ("faithfulness",)],
        "provenance": {"job_id": "eval-job-1", "target_type": "model"},
    }
    if ml_app:
        event["ml_app"] = ml_app
    return event


def received(intake: FakeIntake) -> list[tuple[str, str, str, str]]:
    """(ml_app, span_id, trace_id, label) of every metric the intake accepted."""
    return [(m["ml_app"], m["join_on"]["span"]["span_id"], m["join_on"]["span"]["trace_id"], m["label"])
            for m in intake.accepted_metrics()]


@pytest.mark.parametrize("order", ["span_first", "result_first"])
async def test_guide_cake_example_reaches_the_intake(order: str, make_settings: Callable[..., Settings],
                                                    topics: Topics, producer: AIOKafkaProducer,
                                                    intake: FakeIntake) -> None:
    """The guide's outputs.json record and scores.jsonl line, in either order, give the guide's evaluation."""
    published_ms = int(time.time() * 1000)
    async with running_service(make_settings()):
        sends = [(topics.span, OUTPUT_RECORD), (topics.result, JUDGE_LINE)]
        for topic, value in sends if order == "span_first" else reversed(sends):
            await send_json(producer, topic, value, key="1")
        await eventually(lambda: len(intake.accepted_metrics()) >= 1, what="the cake evaluation")
    (metric,) = intake.accepted_metrics()
    assert metric["join_on"] == {"span": {"span_id": "1", "trace_id": "0"}}
    assert (metric["label"], metric["metric_type"], metric["score_value"]) == ("quality_assessment", "score", 8)
    assert metric["reasoning"] == "The answer clearly denotes the ingredients needed to make a cake"
    # The line's tstamp (February 2025) is older than Datadog's window: sent with the record's time, kept in metadata.
    assert metric["metadata"] == {
        "model": "meta/llama-3.1-8b-instruct",
        "judgement": "Rating: [[8]] The answer clearly denotes the ingredients needed to make a cake",
        "evaljoin_original_timestamp_ms": 1740429821107,
    }
    assert published_ms <= metric["timestamp_ms"] <= time.time() * 1000 and metric["ml_app"] == "nemos-demo"
    request = next(r for r in intake.requests if r.status == 202)
    assert request.headers.get("DD-API-KEY") == "test-api-key-0123456789"


async def test_one_span_many_evaluations_including_late_ones(make_settings: Callable[..., Settings],
                                                            topics: Topics, producer: AIOKafkaProducer,
                                                            intake: FakeIntake) -> None:
    """Several judges and metrics join one span, also results that arrive after the span was joined."""
    async with running_service(make_settings()):
        await send_json(producer, topics.result, result_event("q-7", "evt-judge-a", "relevance", "faithfulness"))
        await send_json(producer, topics.span, span_event("q-7"))
        await eventually(lambda: len(intake.accepted_metrics()) >= 2, what="the first two evaluations")
        await send_json(producer, topics.result, result_event("q-7", "evt-judge-b", "toxicity"))
        await eventually(lambda: len(intake.accepted_metrics()) >= 3, what="the late evaluation")
    assert sorted(label for *_, label in received(intake)) == ["faithfulness", "relevance", "toxicity"]
    assert {(app, span, trace) for app, span, trace, _ in received(intake)} == {("nemos-demo", "42", "abc123")}
    metric = intake.accepted_metrics()[0]
    assert metric["metadata"] == {"nemo": {"job_id": "eval-job-1", "target_type": "model"}}


async def test_fetch_min_bytes_gathers_a_trickle_into_a_few_batches(make_settings: Callable[..., Settings],
                                                                   topics: Topics, producer: AIOKafkaProducer,
                                                                   intake: FakeIntake) -> None:
    """KAFKA_FETCH_MIN_BYTES above a trickle's size (the default, 64 KiB): the broker answers a fetch after
    KAFKA_FETCH_MAX_WAIT_MS with what arrived meanwhile, so a light stream costs a few batches instead of about one
    per record (KAFKA_FETCH_MIN_BYTES=1); every pair is still delivered."""

    async def trickle(service: Service, first_span: int) -> int:
        await eventually(lambda: service.in_group, what="the assignment")
        before = service.batches_done
        spans = {str(first_span + i) for i in range(15)}
        for span in sorted(spans):
            await send_json(producer, topics.span, span_event(f"k-{span}", span=span))
            await send_json(producer, topics.result, result_event(f"k-{span}", f"evt-{span:0>8}"))
            await asyncio.sleep(0.04)
        await eventually(lambda: spans <= {span for _, span, _, _ in received(intake)}, what="the trickle")
        return service.batches_done - before

    at_once = make_settings(kafka_fetch_max_wait_ms=500, kafka_fetch_min_bytes=1)
    async with running_service(at_once) as service:
        batches_at_once = await trickle(service, 1_000)
    gathering = at_once.model_copy(update={"kafka_fetch_min_bytes": Settings().kafka_fetch_min_bytes,
                                           "kafka_group_id": at_once.kafka_group_id + "-gathering"})
    async with running_service(gathering) as service:
        await eventually(lambda: service.batches_done > 0, what="the first trickle, read again by the new group")
        batches_gathered = await trickle(service, 2_000)
    assert batches_gathered <= 4 < 8 <= batches_at_once, (batches_gathered, batches_at_once)
    assert len(received(intake)) == 30  # each pair once: the second group found the first trickle delivered


async def test_redelivered_and_republished_events_are_delivered_once(make_settings: Callable[..., Settings],
                                                                     topics: Topics, producer: AIOKafkaProducer,
                                                                     intake: FakeIntake, kafka: KafkaBroker) -> None:
    """Duplicates on the topics, and a second consumer group re-reading everything, send nothing twice."""
    for _ in range(3):
        await send_json(producer, topics.span, span_event("q-1"))
        await send_json(producer, topics.result, result_event("q-1", "evt-00000001", "a", "b"))
        await send_json(producer, topics.result, JUDGE_LINE)
        await send_json(producer, topics.span, OUTPUT_RECORD)
    settings = make_settings()
    async with running_service(settings):
        await eventually(lambda: len(intake.accepted_metrics()) >= 3, what="three evaluations")
    # Everything again from offset 0, as after a lost commit: the delivery ledger recognises it all.
    again = settings.model_copy(update={"kafka_group_id": settings.kafka_group_id + "-again"})
    async with running_service(again):
        await eventually(lambda: group_lag(kafka.bootstrap_servers, again.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="the second group")
    assert Counter(label for *_, label in received(intake)) == {"a": 1, "b": 1, "quality_assessment": 1}


async def test_same_question_id_in_two_apps_stays_apart(make_settings: Callable[..., Settings], topics: Topics,
                                                        producer: AIOKafkaProducer, intake: FakeIntake) -> None:
    """question_id 1 of app-a and question_id 1 of app-b join their own spans only."""
    async with running_service(make_settings()):
        await send_json(producer, topics.span, span_event("1", span="111", ml_app="app-a"))
        await send_json(producer, topics.span, span_event("1", span="222"), headers=[("ml_app", b"app-b")])
        await send_json(producer, topics.result, result_event("1", "evt-app-a-1", "la", ml_app="app-a"))
        await send_json(producer, topics.result, result_event("1", "evt-app-b-1", "lb"),
                        headers=[("ml_app", b"app-b")])
        await eventually(lambda: len(intake.accepted_metrics()) >= 2, what="both apps' evaluations")
    assert sorted(received(intake)) == [("app-a", "111", "abc123", "la"), ("app-b", "222", "abc123", "lb")]


async def test_poison_messages_are_dead_lettered_and_the_partition_flows(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """Bad records go to the DLQ with reason and origin; the valid records around them are delivered."""
    poison = [b"{not json", b'{"schema_version": 9}', b"\xff\xfe",
              orjson.dumps(result_event("q", "evt-bad-label", "1-2"))]  # no letter: no label Datadog takes
    async with running_service(make_settings(kafka_max_batch=3)):
        await send_json(producer, topics.span, span_event("q-9"))
        for value in poison:
            await send_json(producer, topics.result, value, key="q-9")
        await send_json(producer, topics.result, result_event("q-9", "evt-good-0001", "good"))
        await eventually(lambda: len(intake.accepted_metrics()) >= 1, what="the valid evaluation")
        dead = await read_topic(kafka.bootstrap_servers, topics.dlq, len(poison))
    assert [label for *_, label in received(intake)] == ["good"]
    reasons = sorted(dict(r.headers)["evaljoin.error"].decode() for r in dead)
    assert reasons == ["invalid_json", "invalid_json", "schema", "unsupported_schema_version"]
    assert sorted(r.value for r in dead) == sorted(poison)
    for record in dead:
        headers = dict(record.headers)
        assert headers["evaljoin.source.topic"].decode() == topics.result
        assert int(headers["evaljoin.source.offset"]) >= 0 and headers["evaljoin.error.detail"]


async def test_intake_failures_are_retried_until_delivered_once(make_settings: Callable[..., Settings],
                                                                topics: Topics, producer: AIOKafkaProducer,
                                                                intake: FakeIntake) -> None:
    """500s, 429s and a hang past the timeout delay delivery; every evaluation arrives exactly once."""
    intake.fail_next(3, status=500)
    async with running_service(make_settings(intake_timeout_seconds=1.0, claim_lease_seconds=3.0,
                                             kafka_max_batch=5)):
        for i in range(20):
            await send_json(producer, topics.span, span_event(f"q-{i}", span=str(1000 + i)))
        await send_json(producer, topics.result, result_event("q-0", "evt-retry-0000", "score"))
        await eventually(lambda: len(intake.requests) >= 4, what="the failing requests and a success")
        intake.fail_next(2, status=429, retry_after=0.2)
        intake.hang_next(1, seconds=1.5)
        for i in range(1, 20):
            await send_json(producer, topics.result, result_event(f"q-{i}", f"evt-retry-{i:04d}", "score"))
        await eventually(lambda: len({s for _, s, _, _ in received(intake)}), expect=20, what="all 20 evaluations")
    statuses = Counter(r.status for r in intake.requests)
    assert statuses[500] >= 3 and statuses[429] >= 2
    by_span: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for metric in intake.accepted_metrics():
        by_span[metric["join_on"]["span"]["span_id"]].append(metric)
    assert set(by_span) == {str(1000 + i) for i in range(20)}
    # The hung request was processed by the intake after we had timed out and sent it again: its
    # evaluations are the only possible duplicates, each at most twice and byte-identical.
    duplicates = {span: metrics for span, metrics in by_span.items() if len(metrics) > 1}
    assert all(len(metrics) == 2 and metrics[0] == metrics[1] for metrics in duplicates.values())
    assert len(duplicates) <= max(len(r.metrics) for r in intake.requests)


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_an_intake_refusing_the_service_holds_the_stream_instead_of_dead_lettering_it(
        status: int, make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer,
        intake: FakeIntake, kafka: KafkaBroker) -> None:
    """A wrong API key, site or Agent URL refuses every request: nothing is dead-lettered, all waits and arrives."""
    intake.fail_next(4, status=status)
    async with running_service(make_settings(intake_retry_initial_seconds=0.05, intake_retry_max_seconds=0.2)):
        await send_json(producer, topics.span, span_event("q-auth"))
        await send_json(producer, topics.result, result_event("q-auth", "evt-auth-01", "kept", "also_kept"))
        await eventually(lambda: len(intake.accepted_metrics()), expect=2, what="delivery once the intake accepts")
    assert Counter(r.status for r in intake.requests)[status] == 4
    assert await topic_size(kafka.bootstrap_servers, topics.dlq) == 0


async def test_refused_evaluation_is_dead_lettered_alone(make_settings: Callable[..., Settings], topics: Topics,
                                                         producer: AIOKafkaProducer, intake: FakeIntake,
                                                         kafka: KafkaBroker) -> None:
    """A 400 for one evaluation in a batch dead-letters that one with the answer; its batch-mates arrive."""
    intake.reject_labels({"refused"})
    async with running_service(make_settings()):
        await send_json(producer, topics.span, span_event("q-r"))
        await send_json(producer, topics.result, result_event("q-r", "evt-mixed-01", "kept", "refused", "also_kept"))
        await eventually(lambda: len(intake.accepted_metrics()) >= 2, what="the accepted evaluations")
        (dead,) = await read_topic(kafka.bootstrap_servers, topics.dlq, 1)
    assert sorted(label for *_, label in received(intake)) == ["also_kept", "kept"]
    headers = dict(dead.headers)
    assert headers["evaljoin.error"] == b"intake_rejected" and b"400" in headers["evaljoin.error.detail"]
    assert orjson.loads(dead.value)["label"] == "refused"


async def test_unmatched_sides_are_reported_at_their_deadline(make_settings: Callable[..., Settings],
                                                             topics: Topics, producer: AIOKafkaProducer,
                                                             intake: FakeIntake, kafka: KafkaBroker) -> None:
    """A span without result and a result without span are published to the unmatched topic with reasons."""
    async with running_service(make_settings(join_ttl_seconds=1, sweep_interval_seconds=0.2)):
        await send_json(producer, topics.span, span_event("lonely-span"))
        await send_json(producer, topics.result, result_event("lonely-result", "evt-lonely-1"))
        reports = await read_topic(kafka.bootstrap_servers, topics.unmatched, 2, within=20)
    by_reason = {orjson.loads(r.value)["reason"]: orjson.loads(r.value) for r in reports}
    assert set(by_reason) == {"span_without_result", "result_without_span"}
    assert by_reason["span_without_result"]["join_key"] == "lonely-span"
    assert by_reason["result_without_span"]["side"]["event_id"] == "evt-lonely-1"
    assert intake.accepted_metrics() == []


async def test_second_span_for_a_bound_key_is_dead_lettered(make_settings: Callable[..., Settings],
                                                            topics: Topics, producer: AIOKafkaProducer,
                                                            intake: FakeIntake, kafka: KafkaBroker) -> None:
    """A different span claiming a join key that is bound goes to the DLQ as join_key_conflict."""
    async with running_service(make_settings()):
        await send_json(producer, topics.span, span_event("q-c", span="1"))
        await send_json(producer, topics.span, span_event("q-c", span="2"))
        (dead,) = await read_topic(kafka.bootstrap_servers, topics.dlq, 1)
    assert dict(dead.headers)["evaljoin.error"] == b"join_key_conflict"


async def test_dlq_limit_halts_without_committing(make_settings: Callable[..., Settings], topics: Topics,
                                                  producer: AIOKafkaProducer, kafka: KafkaBroker) -> None:
    """When nearly everything is invalid the consumer halts instead of dead-lettering the topic."""
    for _ in range(30):
        await send_json(producer, topics.result, b"garbage")
    settings = make_settings(dlq_max_consecutive_invalid=5, dlq_window=100)
    async with Service.open(settings) as service:
        with pytest.raises(DlqLimitExceeded):
            await service.run()
    assert await group_lag(kafka.bootstrap_servers, settings.kafka_group_id, [topics.result]) == 30


async def test_a_member_joining_while_batches_are_in_flight_leaves_nothing_behind(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """A rebalance while one batch is delivered and the next is joined waits for both stages.

    Regression: the revoke waited for the join, whose end starts the next delivery; that delivery
    then finished for partitions no longer assigned and the consumer crashed (AssertionError in
    aiokafka's highwater). Every evaluation arrives, the group's lag ends at 0, both members stop cleanly.
    """
    n = 120
    settings = make_settings(kafka_max_batch=8)
    intake.delay(0.15)  # each delivery takes a while, so a rebalance finds both stages busy
    async with running_service(settings):
        for i in range(n):
            await send_json(producer, topics.span, span_event(f"rb-{i}", span=str(5000 + i)), key=f"rb-{i}")
            await send_json(producer, topics.result, result_event(f"rb-{i}", f"evt-rebalance-{i:04d}"), key=f"rb-{i}")
        await eventually(lambda: len(intake.requests) >= 3, what="deliveries under way")
        async with running_service(settings):  # joins the group mid-stream, and leaves it again at the end
            await eventually(lambda: len(intake.requests) >= 12, within=60, what="deliveries after the rebalance")
        await eventually(lambda: len({s for _, s, _, _ in received(intake)}), expect=n, within=90,
                         what=f"all {n} evaluations")
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="everything committed")


# -- the same dataset evaluated again: repeated join keys -------------------------------------------------


def outputs_record(question: str, span: int, *, run: str | None = None) -> dict[str, Any]:
    """An outputs.json record of the guide for ``question``, answered by span ``span``."""
    source = f"trace_id={span:032x};span_id={span};question_id={question}" + (f";run_id={run}" if run else "")
    return {"input": {"prompt": f"question {question}", "source": source}, "response": "an answer"}


def judge_line(question: str, score: int, tstamp: float) -> dict[str, Any]:
    """A scores.jsonl line of the guide: the judge's score of the answer to ``question``."""
    return {"question_id": question, "model": "meta/llama-3.1-8b-instruct",
            "judge": ["meta/llama-3.1-70b-instruct", "single-v1"], "user_prompt": "...",
            "judgment": f"Rating: [[{score}]]", "score": score, "turn": 1, "tstamp": tstamp}


def scores_by_span(intake: FakeIntake) -> dict[str, list[Any]]:
    """span_id -> the score values delivered onto that span."""
    out: dict[str, list[Any]] = defaultdict(list)
    for metric in intake.accepted_metrics():
        out[metric["join_on"]["span"]["span_id"]].append(metric["score_value"])
    return dict(out)


@pytest.mark.parametrize("scope", ["no_run", "run_header"])
async def test_a_dataset_evaluated_again_scores_each_answer_on_its_own_span(
        scope: str, make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer,
        intake: FakeIntake, kafka: KafkaBroker) -> None:
    """The nightly case: after a first run was delivered, 20 questions answered again (new spans) and judged again;
    every new score lands on its new span, none on the old one, and nothing is dead-lettered.

    Without a run the repeated-key rule tells the answers apart; with a run_id header each run is its own key.
    """
    questions = [f"q-{i}" for i in range(20)]
    settings = make_settings()

    def headers(night: int) -> list[tuple[str, bytes]] | None:
        return [("run_id", f"nightly-{night}".encode())] if scope == "run_header" else None

    async with running_service(settings):
        for night, (first_span, score) in enumerate([(1000, 4), (2000, 7)], start=1):
            for i, question in enumerate(questions):
                await send_json(producer, topics.span, outputs_record(question, first_span + i), key=question,
                                headers=headers(night))
            for question in questions:
                await send_json(producer, topics.result, judge_line(question, score, 1_767_000_000.0 + night),
                                key=question, headers=headers(night))
            await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                               [topics.span, topics.result]), expect=0, within=60,
                             what=f"night {night} consumed")
            await eventually(lambda: len(intake.accepted_metrics()), expect=20 * night, what=f"night {night}")
    assert scores_by_span(intake) == {**{str(1000 + i): [4] for i in range(20)},
                                      **{str(2000 + i): [7] for i in range(20)}}
    assert await topic_size(kafka.bootstrap_servers, topics.dlq) == 0


# Every way the two runs' sides of one key can interleave (each topic keeps its own order): which scores reach
# which span, and what is dead-lettered. r1 (score 3) is the judgement of span s1, r2 (score 9) of s2.
INTERLEAVINGS = {
    "s1 s2 r1 r2": ({"s1": [3]}, ["s2"]),
    "s1 r1 s2 r2": ({"s1": [3], "s2": [9]}, []),
    "s1 r1 r2 s2": ({"s1": [3], "s2": [9]}, []),
    "r1 s1 s2 r2": ({"s1": [3], "s2": [9]}, []),
    "r1 s1 r2 s2": ({"s1": [3], "s2": [9]}, []),
    "r1 r2 s1 s2": ({}, ["s2"]),
}


@pytest.mark.parametrize("scope", ["no_run", "run_in_events"])
async def test_every_interleaving_of_two_runs_gives_what_the_readme_says(
        scope: str, make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer,
        intake: FakeIntake, kafka: KafkaBroker) -> None:
    """Sides sent one step at a time (each consumed before the next): no score ever lands on the other answer's span;
    without a run the two orders that cannot be told apart dead-letter the second span, with a run none does."""
    settings = make_settings()
    spans = {order: {"s1": 10_000 + 10 * n, "s2": 10_000 + 10 * n + 1} for n, order in enumerate(INTERLEAVINGS)}
    async with running_service(settings):
        for step in range(4):
            for n, order in enumerate(INTERLEAVINGS):
                side = order.split()[step]
                question, run = f"order-{n}", (f"run-{side[1]}" if scope == "run_in_events" else None)
                if side[0] == "s":
                    await send_json(producer, topics.span, outputs_record(question, spans[order][side], run=run),
                                    key=question)
                else:
                    line = judge_line(question, 3 if side == "r1" else 9, 1_767_000_000.0 + int(side[1]))
                    await send_json(producer, topics.result, line | ({"run_id": run} if run else {}), key=question)
            await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                               [topics.span, topics.result]), expect=0, within=60,
                             what=f"step {step + 1} consumed")
        dead = await read_topic(kafka.bootstrap_servers, topics.dlq, 0 if scope == "run_in_events" else 2)
    delivered = scores_by_span(intake)
    conflicts = sorted(orjson.loads(record.value)["input"]["source"] for record in dead)
    expected_conflicts = []
    for order, (scores, dead_sides) in INTERLEAVINGS.items():
        got = {side: delivered.get(str(span_id), []) for side, span_id in spans[order].items()}
        if scope == "run_in_events":
            assert got == {"s1": [3], "s2": [9]}, order
            continue
        assert got == {"s1": scores.get("s1", []), "s2": scores.get("s2", [])}, order
        expected_conflicts += [outputs_record(f"order-{list(INTERLEAVINGS).index(order)}",
                                              spans[order][side])["input"]["source"] for side in dead_sides]
    assert conflicts == sorted(expected_conflicts)
    assert all(dict(record.headers)["evaljoin.error"] == b"join_key_conflict" for record in dead)
    assert await topic_size(kafka.bootstrap_servers, topics.dlq) == len(expected_conflicts)
