"""The limits that keep a hostile producer from exhausting memory, each at its boundary.

Decode level: every size and count limit accepts a record exactly at the limit and refuses one
just over it, with its reason. Against the real services (Kafka, Redis, the intake stand-in):
over-limit records are dead-lettered with their reasons while the valid pairs around them are
delivered, a dead-letter copy always fits the DLQ topic, one join key cannot buffer unbounded
results, and while the intake hangs the consumer holds at most two batches of records however much
traffic arrives, then delivers all of it once the intake recovers.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from consumer.config import Settings
from consumer.decode import decode_result, decode_span, record_bytes
from consumer.dlq import HEADERS_DROPPED, KEY_TRUNCATED_FROM, TRUNCATED_FROM, fit_record, kafka_size
from consumer.errors import InvalidMessage
from consumer.events import MAX_EVALUATIONS_PER_EVENT, MAX_JSON_DEPTH, MAX_METADATA_BYTES, MAX_TAGS, MAX_TEXT_CHARS
from consumer.service import Service
from consumer.sink import HttpIntakeSink
from consumer.store import Namespace, ResultOp, SpanOp, SpanPut
from consumer.store_redis import RedisJoinStore, connect
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from localenv.redis import RedisServer
from tests.support import Topics, eventually, group_lag, read_topic, running_service

pytestmark = pytest.mark.timeout(120)

MAX = 131_072  # MAX_MESSAGE_BYTES in these tests: small enough for a broker's default limit to take more
Headers = list[tuple[str, bytes | None]]


def span(key: str = "q-1", **changes: Any) -> dict[str, Any]:
    return {"schema_version": 1, "join_key": key, "trace_id": "abc", "span_id": "42", **changes}


def evaluation(**changes: Any) -> dict[str, Any]:
    return {"label": "faithfulness", "metric_type": "score", "value": 0.5, **changes}


def result(key: str = "q-1", event_id: str = "evt-00000001", evaluations: list[dict[str, Any]] | None = None,
           **changes: Any) -> dict[str, Any]:
    return {"schema_version": 1, "event_id": event_id, "join_key": key,
            "evaluations": evaluations or [evaluation()], **changes}


def padded(event: dict[str, Any], size: int) -> bytes:
    """``event`` as JSON of exactly ``size`` bytes (trailing whitespace is valid JSON)."""
    raw = orjson.dumps(event)
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def decode(topic: str, value: bytes, headers: Headers | None = None, *, key: bytes | None = None,
           max_bytes: int = 16 * 1_048_576) -> Any:
    call = decode_span if topic == "span" else decode_result
    return call(value, headers or [], join_key="question_id", default_ml_app="app", max_bytes=max_bytes, key=key)


def refusal(topic: str, value: bytes, headers: Headers | None = None, *, key: bytes | None = None,
            max_bytes: int = 16 * 1_048_576) -> str:
    with pytest.raises(InvalidMessage) as info:
        decode(topic, value, headers, key=key, max_bytes=max_bytes)
    return info.value.reason


# -- record size -------------------------------------------------------------------------------


def test_record_size_counts_key_value_and_headers() -> None:
    """MAX_MESSAGE_BYTES counts what the consumer holds: key, value, each header's name and value."""
    assert record_bytes(b"ab", b"xyz", [("h", b"12"), ("\u00e9", None)]) == 2 + 3 + (1 + 2) + 2
    assert record_bytes(None, None, []) == 0


@pytest.mark.parametrize("topic", ["span", "result"])
def test_a_record_at_the_size_limit_is_accepted_and_one_byte_more_is_oversize(topic: str) -> None:
    """Exactly MAX_MESSAGE_BYTES of key, value and headers is decoded; one more byte anywhere is `oversize`."""
    key = b"k" * 100
    headers: Headers = [("ml_app", b"app"), ("trace", b"t" * 1000)]
    at_limit = padded(span() if topic == "span" else result(), MAX - record_bytes(key, b"", headers))
    assert record_bytes(key, at_limit, headers) == MAX
    assert decode(topic, at_limit, headers, key=key, max_bytes=MAX).join_key == "q-1"
    assert refusal(topic, at_limit + b" ", headers, key=key, max_bytes=MAX) == "oversize"
    assert refusal(topic, at_limit, [*headers, ("x", None)], key=key, max_bytes=MAX) == "oversize"
    assert refusal(topic, at_limit, headers, key=key + b"k", max_bytes=MAX) == "oversize"


def test_a_small_value_with_a_megabyte_of_headers_is_oversize() -> None:
    """Headers alone can make a record oversize: the limit is not on the value only."""
    headers: Headers = [(f"h{i}", b"x" * 1000) for i in range(MAX // 1000)]
    assert refusal("span", orjson.dumps(span()), headers, max_bytes=MAX) == "oversize"


# -- event limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """A limit of the event schema: ``build(n)`` is a record with the limited quantity at ``n``."""

    name: str
    topic: str
    limit: int
    build: Callable[[int], dict[str, Any]]


def _metadata_of_bytes(n: int) -> dict[str, Any]:
    metadata = {"k": "x" * (n - len(b'{"k":""}'))}
    assert len(orjson.dumps(metadata)) == n
    return metadata


def _nested(depth: int) -> Any:
    """A JSON value nested ``depth`` levels: an object holding lists."""
    value: Any = []
    for _ in range(depth - 2):
        value = [value]
    return {"d": value}


def _deep_event(total_depth: int) -> bytes:
    """A result event whose JSON nests ``total_depth`` levels in all (the event, evaluations, one evaluation,
    its metadata object, then lists)."""
    lists = total_depth - 4
    raw = orjson.dumps(result(evaluations=[evaluation(metadata={"d": "@@"})]))
    return raw.replace(b'"@@"', b"[" * lists + b"]" * lists)


LIMITS = [
    Limit("evaluations per event", "result", MAX_EVALUATIONS_PER_EVENT,
          lambda n: result(evaluations=[evaluation(label=f"l{i}") for i in range(n)])),
    Limit("metadata bytes", "result", MAX_METADATA_BYTES,
          lambda n: result(evaluations=[evaluation(metadata=_metadata_of_bytes(n))])),
    Limit("json value bytes", "result", MAX_METADATA_BYTES,
          lambda n: result(evaluations=[evaluation(metric_type="json", value=_metadata_of_bytes(n))])),
    Limit("metadata nesting", "result", MAX_JSON_DEPTH,
          lambda n: result(evaluations=[evaluation(metadata=_nested(n))])),
    Limit("reasoning characters", "result", MAX_TEXT_CHARS,
          lambda n: result(evaluations=[evaluation(reasoning="\u00e9" * n)])),
    Limit("evaluation tags", "result", MAX_TAGS,
          lambda n: result(evaluations=[evaluation(tags={f"t{i}": "v" for i in range(n)})])),
    Limit("span tags", "span", MAX_TAGS, lambda n: span(tags={f"t{i}": "v" for i in range(n)})),
    Limit("label characters", "result", 200, lambda n: result(evaluations=[evaluation(label="L" * n)])),
    Limit("tag value characters", "span", 200, lambda n: span(tags={"env": "v" * n})),
    Limit("tag name characters", "span", 200, lambda n: span(tags={"t" * n: "v"})),
    Limit("categorical characters", "result", 1000,
          lambda n: result(evaluations=[evaluation(metric_type="categorical", value="c" * n)])),
    Limit("join key characters", "span", 512, lambda n: span(key="k" * n)),
    Limit("ml_app characters", "result", 200, lambda n: result(ml_app="a" * n)),
    Limit("event_id characters", "result", 128, lambda n: result(event_id="e" * n)),
    Limit("provenance name characters", "result", 200, lambda n: result(provenance={"job_id": "j" * n})),
    Limit("judges in provenance", "result", 10, lambda n: result(provenance={"judge": [f"j{i}" for i in range(n)]})),
]


@pytest.mark.parametrize("case", LIMITS, ids=[case.name for case in LIMITS])
def test_each_event_limit_accepts_its_limit_and_refuses_one_more(case: Limit) -> None:
    """At the limit the event decodes; one over, it is refused as `schema`."""
    decode(case.topic, orjson.dumps(case.build(case.limit)))
    assert refusal(case.topic, orjson.dumps(case.build(case.limit + 1))) == "schema"


def test_json_nested_past_1024_levels_is_not_parsed() -> None:
    """The parser stops at 1024 levels (`invalid_json`); up to there it parses, and the schema refuses what
    nests deeper than the metadata limit allows."""
    assert refusal("result", _deep_event(1024)) == "schema"
    assert refusal("result", _deep_event(1025)) == "invalid_json"


def test_ml_app_header_longer_than_200_bytes_is_refused() -> None:
    """The ml_app header becomes a key part and a log field: at most 200 characters, like the field."""
    raw = orjson.dumps(result())
    assert decode("result", raw, [("ml_app", b"a" * 200)]).ml_app == "a" * 200
    assert refusal("result", raw, [("ml_app", b"a" * 201)]) == "schema"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 253, 254, 255, 300, 1000, 1020])
def test_deep_nesting_anywhere_is_refused_never_raised(depth: int) -> None:
    """JSON orjson parses (up to 1024 levels) but cannot encode again (past 254), or that would exhaust
    Python's stack when printed, is refused with a reason, never an exception that would stop the consumer."""
    deep = b"[" * depth + b"]" * depth
    placements: list[tuple[str, dict[str, Any]]] = [
        ("result", result(evaluations=[evaluation(metadata={"d": "@@"})])),
        ("result", result(evaluations=[evaluation(metric_type="json", value={"d": "@@"})])),
        ("result", result(kind="@@")),
        ("result", {"question_id": 1, "score": 5, "judgment": "ok", "model": "@@"}),
        ("result", {"question_id": "@@", "score": 5, "judgment": "ok"}),
        ("span", span(kind="@@")),
        ("span", span(schema_version="@@")),
        ("span", span(padding="@@")),
    ]
    for topic, event in placements:
        raw = orjson.dumps(event).replace(b'"@@"', deep)
        assert refusal(topic, raw) in {"schema", "wrong_topic", "unsupported_schema_version", "invalid_json"}


# -- dead-letter copies ------------------------------------------------------------------------


OWN: list[tuple[str, bytes]] = [("evaljoin.error", b"oversize"), ("evaljoin.error.detail", b"d" * 300)]


def test_a_dead_letter_copy_that_fits_is_unchanged() -> None:
    """Below the limit the copy is the record as it was, plus the dead-letter headers."""
    kept = [("h", b"v")]
    value = b"x" * 1000
    limit = kafka_size(b"key", value, [*kept, *OWN])
    assert fit_record(b"key", value, kept, OWN, limit) == (b"key", value, [*kept, *OWN])


@pytest.mark.parametrize(("key_bytes", "header_bytes", "value_bytes"), [
    (10, 100, MAX + 1), (10, 100, MAX - 100), (10, MAX, 10), (MAX, 10, 10), (MAX, MAX, MAX), (0, 0, 5 * MAX)])
def test_a_dead_letter_copy_is_cut_to_the_limit_and_says_what_was_cut(key_bytes: int, header_bytes: int,
                                                                      value_bytes: int) -> None:
    """Whatever is large (value, headers or key), the copy fits the limit and its marks say what was cut."""
    key, value = b"k" * key_bytes, b"v" * value_bytes
    kept = [("trace", b"h" * header_bytes), ("ml_app", b"app")]
    out_key, out_value, out_headers = fit_record(key, value, kept, OWN, MAX)
    assert kafka_size(out_key, out_value, out_headers) <= MAX
    names = dict(out_headers)
    assert all(header in out_headers for header in OWN)
    assert out_value is not None and value.startswith(out_value)
    if len(out_value) < value_bytes:
        assert names[TRUNCATED_FROM] == str(value_bytes).encode()
    if ("trace", kept[0][1]) not in out_headers:
        assert names[HEADERS_DROPPED] == b"2" and ("ml_app", b"app") not in out_headers
    if out_key != key:
        assert names[KEY_TRUNCATED_FROM] == str(key_bytes).encode() and out_key is not None
        assert key.startswith(out_key)


# -- against the real services -----------------------------------------------------------------


async def _topic_with_limit(bootstrap: str, name: str, max_message_bytes: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs={"max.message.bytes": str(max_message_bytes)})])
    finally:
        await admin.close()


def _source_of(record: Any) -> tuple[str, int, int]:
    headers = dict(record.headers)
    return (headers["evaljoin.source.topic"].decode(), int(headers["evaljoin.source.partition"]),
            int(headers["evaljoin.source.offset"]))


def _delivered(intake: FakeIntake) -> set[tuple[str, str]]:
    return {(m["join_on"]["span"]["span_id"], m["label"]) for m in intake.accepted_metrics()}


async def test_over_limit_input_is_dead_lettered_and_the_pairs_around_it_delivered(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """Oversize records (by value or by headers), an event over a schema limit and a flood of results for one
    join key are dead-lettered with their reasons; a record exactly at the limit and every valid pair are
    delivered; and the DLQ topic, which takes no more than MAX_MESSAGE_BYTES, takes every copy."""
    dlq = f"{topics.dlq}.limited"
    await _topic_with_limit(kafka.bootstrap_servers, dlq, MAX)
    settings = make_settings(max_message_bytes=MAX, max_pending_results_per_key=3, dlq_topic=dlq)
    expected_dead: dict[tuple[str, int, int], str] = {}
    expected: set[tuple[str, str]] = set()

    async def send(topic: str, value: bytes, headers: Headers | None = None, *, key: bytes | None = None,
                   dead: str | None = None) -> tuple[str, int, int]:
        sent = await producer.send_and_wait(topic, value, key=key, headers=headers)
        if dead:
            expected_dead[(topic, sent.partition, sent.offset)] = dead
        return topic, sent.partition, sent.offset

    async def pair(key: str, span_id: str, result_value: bytes | None = None) -> None:
        await send(topics.span, orjson.dumps(span(key, span_id=span_id)))
        await send(topics.result, result_value or orjson.dumps(result(key)))
        expected.add((span_id, "faithfulness"))

    async with running_service(settings) as service:
        await pair("a", "1")
        await pair("b", "2", padded(result("b"), MAX))  # exactly at the limit
        by_value = await send(topics.span, padded(span("c", span_id="3"), MAX + 1), dead="oversize")
        by_headers = await send(topics.span, orjson.dumps(span("d", span_id="4")), [("pad", b"p" * 3 * MAX)],
                                dead="oversize")  # larger than a fetch (MAX + 64 KiB): fetched alone
        at_limit = await send(topics.span, b"{" * MAX, dead="invalid_json")  # too large with the DLQ's headers
        await send(topics.result, orjson.dumps(result("e", evaluations=[evaluation(label=f"l{i}") for i in range(
            MAX_EVALUATIONS_PER_EVENT + 1)])), dead="schema")
        await send(topics.result, orjson.dumps(result("f", evaluations=[evaluation(
            metadata=_metadata_of_bytes(MAX_METADATA_BYTES + 1))])), dead="schema")
        for i in range(5):  # one partition, in order: three may wait for the span of "g", two more are refused
            await send(topics.result, orjson.dumps(result("g", f"evt-g-{i:05d}", [evaluation(label=f"g{i}")])),
                       key=b"g", dead="too_many_pending_results" if i >= 3 else None)
        await pair("h", "5")
        dead = await read_topic(kafka.bootstrap_servers, dlq, len(expected_dead))
        await send(topics.span, orjson.dumps(span("g", span_id="6")))  # releases the three that waited
        expected |= {("6", "g0"), ("6", "g1"), ("6", "g2")}
        await eventually(lambda: _delivered(intake) >= expected, within=60, what="every valid evaluation")
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="the commits")
        assert service.metrics.registry.get_sample_value("evaljoin_batch_retries_total") == 0
    assert _delivered(intake) == expected
    assert {_source_of(record): dict(record.headers)["evaljoin.error"].decode() for record in dead} == expected_dead
    marks = {_source_of(r): sorted({TRUNCATED_FROM, HEADERS_DROPPED} & set(dict(r.headers))) for r in dead}
    assert {source: names for source, names in marks.items() if names} == {
        by_value: [TRUNCATED_FROM], by_headers: [HEADERS_DROPPED], at_limit: [TRUNCATED_FROM]}
    for record in dead:
        assert kafka_size(record.key, record.value, list(record.headers)) <= MAX


def _held(service: Service) -> Callable[[], Any]:
    """Records the consumer has taken from Kafka and not committed: what it holds in memory."""
    consumer = service._consumer

    async def count() -> int:
        total = 0
        for tp in consumer.assignment():
            total += await consumer.position(tp) - (await consumer.committed(tp) or 0)
        return total

    return count


async def test_while_the_intake_hangs_the_consumer_holds_two_batches_and_delivers_all_after(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker) -> None:
    """With every intake request hanging, the delivery in flight waits, the next batch waits for it, and the
    partitions are paused: records taken from Kafka stay at most two batches (2 x KAFKA_MAX_BATCH) while ten
    batches more arrive; after the intake recovers everything is delivered and committed."""
    max_batch = 20
    settings = make_settings(kafka_max_batch=max_batch, intake_timeout_seconds=0.5)
    intake.fail_next(1_000_000, status=503)
    intake.hang_next(1_000_000, seconds=1.0)
    expected: set[tuple[str, str]] = set()

    async def pairs(start: int, count: int) -> None:
        for i in range(start, start + count):
            await producer.send(topics.span, orjson.dumps(span(f"p{i}", span_id=str(1000 + i))))
            await producer.send(topics.result, orjson.dumps(result(f"p{i}", evaluations=[evaluation(
                reasoning="r" * 2000)])))
            expected.add((str(1000 + i), "faithfulness"))
        await producer.flush()

    async with running_service(settings) as service:
        await pairs(0, 2 * max_batch)
        await eventually(lambda: service.metrics.registry.get_sample_value("evaljoin_paused"), expect=1.0,
                         what="a batch waiting on the intake")
        held = _held(service)
        await pairs(2 * max_batch, 5 * max_batch)  # ten batches of records more, while the intake hangs
        samples = []
        for _ in range(15):
            samples.append(await held())
            await asyncio.sleep(0.2)
        lag = await group_lag(kafka.bootstrap_servers, settings.kafka_group_id, [topics.span, topics.result])
        assert service.metrics.registry.get_sample_value("evaljoin_paused") == 1.0
        assert not _delivered(intake)
        intake.reset_faults()
        await eventually(lambda: _delivered(intake) >= expected, within=60, what="every pair after recovery")
        await eventually(lambda: group_lag(kafka.bootstrap_servers, settings.kafka_group_id,
                                           [topics.span, topics.result]), expect=0, what="the commits")
    assert 0 < max(samples) <= 2 * max_batch, samples
    assert lag >= 2 * 5 * max_batch, lag  # what arrived meanwhile waits in Kafka, not in the consumer


# -- concurrency ---------------------------------------------------------------------------------


class _CountingIntake(ThreadingHTTPServer):
    """An HTTP server that answers 202 after a pause and records the most requests it had at once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CountingHandler)
        self.lock = threading.Lock()
        self.open = self.peak = self.answered = 0


class _CountingHandler(BaseHTTPRequestHandler):
    server: _CountingIntake
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.open += 1
            self.server.peak = max(self.server.peak, self.server.open)
        threading.Event().wait(0.2)
        with self.server.lock:
            self.server.open -= 1
            self.server.answered += 1
        self.send_response(202)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def counting_intake() -> Iterator[_CountingIntake]:
    server = _CountingIntake()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def test_intake_requests_in_flight_are_bounded(counting_intake: _CountingIntake) -> None:
    """A delivery split into many requests never has more than max_in_flight of them open at once."""
    sink = HttpIntakeSink(url=f"http://127.0.0.1:{counting_intake.server_address[1]}/eval", headers={},
                          timeout_s=5.0, max_batch=1, max_body_bytes=100_000, retry_initial_s=0.05,
                          retry_max_s=0.5, max_in_flight=2)
    try:
        assert await sink.send([orjson.dumps({"n": i}) for i in range(8)]) == []
    finally:
        await sink.aclose()
    assert counting_intake.answered == 8
    assert counting_intake.peak == 2


async def test_redis_commands_in_flight_are_bounded(redis_server: RedisServer) -> None:
    """However many store calls run at once, at most max_concurrency connections are ever opened."""
    name = "limits-" + uuid.uuid4().hex[:8]
    client = await connect(redis_server.url, cluster=False, client_name=name)
    observer = Redis.from_url(redis_server.url)
    try:
        store = RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], ledger_retention_ms=60_000,
                               max_concurrency=3)
        await asyncio.gather(*(store.lookup(Namespace("app", f"k{i}")) for i in range(200)))
        clients = await observer.client_list()
        assert 0 < sum(1 for entry in clients if entry.get("name") == name) <= 3
    finally:
        await client.aclose()
        await observer.aclose()


@pytest.mark.parametrize("redis", ["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
async def test_one_join_key_buffers_at_most_its_limit_of_results(redis: str, request: pytest.FixtureRequest) -> None:
    """Results for a join key without its span are refused past the limit ("full"), not stored; a duplicate
    of a waiting one is still recognised; the span releases exactly those that waited; later ones join."""
    server = request.getfixturevalue("redis_cluster" if redis == "cluster" else "redis_server")
    client = await connect(server.url, cluster=redis == "cluster")
    try:
        store = RedisJoinStore(client, prefix="t" + uuid.uuid4().hex[:8], ledger_retention_ms=60_000,
                               max_pending_results=3)
        ns = Namespace("app", "flooded")
        puts = await store.put_many([ResultOp(ns, f"e{i}", b"R", [f"v{i}"], 10**13) for i in range(6)])
        assert [put.status for put in puts] == ["buffered"] * 3 + ["full"] * 3
        (again,) = await store.put_many([ResultOp(ns, "e0", b"R", ["v0"], 10**13)])
        assert again.status == "duplicate"
        span, late = await store.put_many([SpanOp(ns, "t:1", b"SPAN", 10**13),
                                           ResultOp(ns, "e9", b"R", ["v9"], 10**13)])
        assert isinstance(span, SpanPut) and sorted(span.pending) == ["e0", "e1", "e2"]
        assert late.status == "joined"
    finally:
        await client.aclose()
