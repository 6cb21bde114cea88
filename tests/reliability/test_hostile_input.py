"""Hostile input, property-based: every malformed record is dead-lettered with a reason, valid traffic flows.

Hypothesis generates the corpus (broken JSON, wrong types, huge strings and nesting, invalid UTF-8,
NaN/Infinity, labels the intake would reject, missing keys, unknown schema versions, odd header
bytes, records on the wrong topic, empty records, random bytes) and adversarial but valid pairs
(any Unicode join key and ml_app, odd headers). All of it goes through one real consumer process
with the DLQ halt circuit disabled; the property is checked record by record.
"""

from __future__ import annotations

import functools
import os
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.config import Settings
from consumer.decode import record_bytes
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker
from localenv.ports import free_port
from tests.reliability.harness import (
    Message,
    ServiceProcess,
    account,
    assert_guarantees,
    delivered_keys,
    drain_topic,
    header,
    lag_or_none,
    publish,
    report,
    scaled,
    timeout_for,
    wait_for,
)
from tests.support import Topics

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

ID_HEADER = "reliability.id"
MAX_BYTES = 131_072
LABEL_RULE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,199}$")


@dataclass(frozen=True)
class Hostile:
    """One record that must be dead-lettered, with the reasons that are correct for it."""

    category: str
    span_topic: bool
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    reasons: frozenset[str]


def _span(i: int) -> dict[str, Any]:
    return {"schema_version": 1, "join_key": f"hostile-{i}", "trace_id": f"{i:032x}", "span_id": str(i)}


def _result(i: int) -> dict[str, Any]:
    return {"schema_version": 1, "event_id": f"hostile-evt-{i:06d}", "join_key": f"hostile-{i}",
            "evaluations": [{"label": "faithfulness", "metric_type": "score", "value": 0.5}]}


def _base(draw: st.DrawFn) -> tuple[bool, dict[str, Any]]:
    on_span = draw(st.booleans())
    i = draw(st.integers(0, 10**9))
    return on_span, _span(i) if on_span else _result(i)


def _evaluation(event: dict[str, Any]) -> dict[str, Any]:
    evaluation: dict[str, Any] = event["evaluations"][0]
    return evaluation


PLACEHOLDER = "\u2603PLACEHOLDER\u2603"
odd_header_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(
    lambda name: name not in ("ml_app", ID_HEADER) and not name.startswith("evaljoin."))
odd_headers = st.lists(st.tuples(odd_header_names, st.binary(max_size=300)), max_size=4)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False,
                         allow_infinity=False), st.text(max_size=30))
wrong_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=3), st.dictionaries(st.text(max_size=5),
                         json_scalars, max_size=3))


@st.composite
def hostile(draw: st.DrawFn) -> Hostile:
    """One malformed or adversarial record and the dead-letter reasons that are right for it."""
    category = draw(st.sampled_from([
        "broken_json", "wrong_type", "huge_string", "oversize", "deep_nesting", "huge_metadata", "invalid_utf8",
        "nan_inf", "bad_label", "missing_key", "schema_version", "odd_ml_app_header", "wrong_topic", "empty",
        "not_an_object", "random_bytes",
    ]))
    on_span, event = _base(draw)
    reasons = frozenset({"schema"})
    value: bytes | None
    headers = list(draw(odd_headers))
    if category == "broken_json":
        raw = orjson.dumps(event)
        if draw(st.booleans()):
            value = raw[:draw(st.integers(1, len(raw) - 1))]
        else:
            value = raw + draw(st.sampled_from([b"}", b",", b" x", b"{}", b"]"]))
        reasons = frozenset({"invalid_json"})
    elif category == "wrong_type":
        fields = ["join_key", "trace_id", "span_id"] if on_span else ["event_id", "join_key", "evaluations",
                                                                      "label", "metric_type", "value"]
        name = draw(st.sampled_from(fields))
        target = event if name in event else _evaluation(event)
        wrong = draw(wrong_values.filter(functools.partial(_does_not_fit, name)))
        target[name] = wrong
        value = orjson.dumps(event)
    elif category == "huge_string":
        length = draw(st.integers(1_000, 40_000))
        char = draw(st.sampled_from(["a", "\u00e9", "\U0001f600", "0"]))
        name = draw(st.sampled_from(["join_key", "trace_id"] if on_span else ["join_key", "label", "reasoning"]))
        target = event if name in event else _evaluation(event)
        target[name] = char * (length if name != "reasoning" else length + 16 * 1024)
        value = orjson.dumps(event)
    elif category == "oversize":
        event["padding"] = "x" * draw(st.integers(MAX_BYTES, MAX_BYTES + 20_000))
        value = orjson.dumps(event)
        reasons = frozenset({"oversize"})
    elif category == "deep_nesting":
        depth = draw(st.integers(1_030, 5_000))
        nested = "[" * depth + "]" * depth
        if on_span:
            event["tags"] = PLACEHOLDER
        else:
            _evaluation(event)["metadata"] = PLACEHOLDER
        value = orjson.dumps(event).replace(orjson.dumps(PLACEHOLDER), nested.encode())
        reasons = frozenset({"invalid_json"})
    elif category == "huge_metadata":
        width = draw(st.integers(70, 120))  # over the 64 KiB metadata limit, under MAX_BYTES
        blob = {f"k{i}": "v" * 1000 for i in range(width)}
        if on_span:
            event["tags"] = blob
        else:
            _evaluation(event)["metadata"] = blob
        value = orjson.dumps(event)
    elif category == "invalid_utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80",
                                    b"\xe2\x82"]))
        event["join_key"] = PLACEHOLDER
        value = orjson.dumps(event).replace(PLACEHOLDER.encode(), b"q" + bad + b"q")
        reasons = frozenset({"invalid_json"})
    elif category == "nan_inf":
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b"nan"]))
        if on_span:
            event["emitted_at_ms"] = PLACEHOLDER
        else:
            _evaluation(event)["value"] = PLACEHOLDER
        value = orjson.dumps(event).replace(orjson.dumps(PLACEHOLDER), literal)
        reasons = frozenset({"invalid_json"})
    elif category == "bad_label":
        label = draw(st.text(max_size=250).filter(lambda text: not LABEL_RULE.match(text)))
        on_span, event = False, _result(draw(st.integers(0, 10**9)))
        _evaluation(event)["label"] = label
        value = orjson.dumps(event)
    elif category == "missing_key":
        required = ["join_key", "trace_id", "span_id", "schema_version"] if on_span else [
            "event_id", "join_key", "evaluations", "schema_version", "label", "metric_type", "value"]
        name = draw(st.sampled_from(required))
        target = event if name in event else _evaluation(event)
        del target[name]
        value = orjson.dumps(event)
    elif category == "schema_version":
        event["schema_version"] = draw(st.one_of(st.just(True), st.just(1.0), wrong_values).filter(
            lambda v: type(v) is not int or v != 1))
        value = orjson.dumps(event)
        reasons = frozenset({"unsupported_schema_version", "schema"})
    elif category == "odd_ml_app_header":
        event.pop("ml_app", None)
        if draw(st.booleans()):
            app = draw(st.binary(min_size=1, max_size=50).filter(lambda b: not _utf8(b)))
            reasons = frozenset({"invalid_header"})
        else:
            app = (draw(st.text(max_size=10)) + draw(st.sampled_from(["\x00", "\x1b", "\x7f", "\n"]))).encode()
        headers.append(("ml_app", app))
        value = orjson.dumps(event)
    elif category == "wrong_topic":
        event = _result(1) if on_span else _span(1)
        event["kind"] = "nemo_result" if on_span else "span_context"
        value = orjson.dumps(event)
        reasons = frozenset({"wrong_topic"})
    elif category == "empty":
        value = draw(st.sampled_from([b"", None]))
        reasons = frozenset({"empty"})
    elif category == "not_an_object":
        value = orjson.dumps(draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=5))))
    else:
        value = draw(st.binary(max_size=2_000))
        reasons = frozenset({"invalid_json", "schema", "empty"})
    if value is not None and len(value) > MAX_BYTES:
        reasons = frozenset({"oversize"})
    return Hostile(category, on_span, value, tuple(headers), reasons)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _does_not_fit(name: str, value: Any) -> bool:
    """True when ``value`` is surely invalid for field ``name`` (a wrong type, not just a wrong value)."""
    if name == "value":
        return isinstance(value, bool) or not isinstance(value, int | float)
    return not isinstance(value, str)  # some strings are valid for these fields: never count one as wrong


no_controls = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])


@st.composite
def adversarial_pair(draw: st.DrawFn) -> dict[str, Any]:
    """A valid pair with odd but legal content: any Unicode join key and ml_app, rare labels, odd headers."""
    return {
        "join_key": draw(st.text(no_controls, min_size=1, max_size=200)),
        "ml_app": draw(st.one_of(st.none(), st.text(no_controls, min_size=1, max_size=100))),
        "label": draw(st.from_regex(LABEL_RULE, fullmatch=True).filter(lambda text: len(text) <= 200)),
        "headers": draw(odd_headers),
        "value": draw(st.one_of(st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False,
                                                                         width=64))),
    }


def generate(strategy: st.SearchStrategy[Any], count: int, seed: int) -> list[Any]:
    """``count`` examples of ``strategy`` (generation only: no shrinking, no example database)."""
    out: list[Any] = []
    attempt = 0
    while len(out) < count:
        @hypothesis_seed(seed + attempt)
        @hypothesis_settings(max_examples=count - len(out), database=None, phases=[Phase.generate],
                             deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.filter_too_much,
                                                                   HealthCheck.large_base_example])
        @given(strategy)
        def collect(example: Any) -> None:
            out.append(example)

        collect()
        attempt += 1
    return out[:count]


@pytest.mark.timeout(timeout_for(240))
async def test_hostile_input_is_dead_lettered_and_valid_traffic_flows(
        make_settings: Callable[..., Settings], topics: Topics, producer: AIOKafkaProducer, intake: FakeIntake,
        kafka: KafkaBroker, tmp_path: Path) -> None:
    """Every malformed record is dead-lettered with a right reason, every valid pair delivered, the consumer up."""
    seed = int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    n_bad, n_valid = scaled(2_000), scaled(150)
    generated = time.monotonic()
    bad = generate(hostile(), n_bad, seed)
    odd = generate(adversarial_pair(), n_valid, seed)
    generate_s = time.monotonic() - generated
    run = uuid.uuid4().hex[:6]
    messages: list[tuple[str, Message]] = []
    oversize: set[int] = set()  # MAX_BYTES counts the key and the headers too, known only here
    for i, example in enumerate(bad):
        topic = topics.span if example.span_topic else topics.result
        key = rng.randbytes(rng.randrange(0, 40)) or (None if example.value is not None else b"\x00")
        headers = [*example.headers, (ID_HEADER, f"bad-{i}".encode())]
        if record_bytes(key, example.value, headers) > MAX_BYTES:
            oversize.add(i)
        messages.append((f"bad-{i}", (topic, key, example.value, headers)))
    expected = set()
    for i, pair in enumerate(odd):
        join_key, span_id = f"{pair['join_key']}\u00b7{run}-{i}", str(30_000_000 + i)
        span: dict[str, Any] = {"schema_version": 1, "join_key": join_key, "trace_id": f"{i:x}", "span_id": span_id}
        result: dict[str, Any] = {"schema_version": 1, "event_id": f"{run}-odd-{i:06d}", "join_key": join_key,
                                  "evaluations": [{"label": pair["label"], "metric_type": "score",
                                                   "value": pair["value"]}]}
        if pair["ml_app"] is not None:
            span["ml_app"] = result["ml_app"] = pair["ml_app"]
        expected.add((span_id, pair["label"]))
        sides = [(topics.span, span), (topics.result, result)]
        rng.shuffle(sides)
        for side, (topic, event) in enumerate(sides):
            messages.append((f"ok-{i}-{side}", (topic, join_key.encode(), orjson.dumps(event),
                                                [*pair["headers"], (ID_HEADER, f"ok-{i}-{side}".encode())])))
    # Interleave valid traffic with the hostile records, keeping each pair's own order.
    rng.shuffle(messages)
    settings = make_settings(dlq_max_invalid_ratio=0, dlq_max_consecutive_invalid=0, max_message_bytes=MAX_BYTES,
                             kafka_max_batch=200, health_port=free_port(), health_host="127.0.0.1")
    service = ServiceProcess(settings, tmp_path / "service.log")
    try:
        service.start()
        published = time.monotonic()
        await publish(producer, [message for _, message in messages], chunk=500)
        await wait_for(lambda: len(delivered_keys(intake) & expected), expect=len(expected),
                       within=timeout_for(120), what=f"every valid pair (seed {seed})", alive=[service])
        await wait_for(lambda: lag_or_none(kafka.bootstrap_servers, settings), expect=0, within=timeout_for(120),
                       what="the group's lag to reach 0", alive=[service])
        took_s = time.monotonic() - published
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{settings.health_port}/healthz", timeout=10)
        assert health.status_code == 200, health.text
        assert await service.terminate() == 0, service.tail()
    finally:
        service.kill_if_running()
    assert service.starts == 1 and service.exit_codes == [0]
    dlq = await drain_topic(kafka.bootstrap_servers, topics.dlq)
    by_id: dict[str, list[Any]] = defaultdict(list)
    for record in dlq:
        by_id[(header(record, ID_HEADER) or b"?").decode()].append(record)
    problems: list[str] = []
    for i, example in enumerate(bad):
        records = by_id.get(f"bad-{i}", [])
        if not records:
            problems.append(f"bad-{i} ({example.category}) is not in the DLQ: {example.value!r:.300}")
            continue
        reason = (header(records[0], "evaljoin.error") or b"").decode()
        reasons = frozenset({"oversize"}) if i in oversize else example.reasons
        if reason not in reasons:
            problems.append(f"bad-{i} ({example.category}) dead-lettered as {reason!r}, expected one of "
                            f"{sorted(reasons)}: {example.value!r:.300}")
        if not header(records[0], "evaljoin.error.detail"):
            problems.append(f"bad-{i} ({example.category}) has no detail")
    problems += [f"valid record {key} was dead-lettered as {header(records[0], 'evaljoin.error')!r}"
                 for key, records in by_id.items() if key.startswith("ok-")]
    outcome = account("f. hostile input (hypothesis)", expected=expected, intake=intake, dlq=dlq,
                      unmatched=await drain_topic(kafka.bootstrap_servers, topics.unmatched), recover_s=None,
                      seed=seed, hostile=len(bad), valid_pairs=len(odd), generate_s=round(generate_s, 1),
                      consume_s=round(took_s, 1))
    report(outcome)
    categories = Counter(example.category for example in bad)
    print("  hostile records by category: "
          + ", ".join(f"{name}={count}" for name, count in sorted(categories.items())))
    assert not problems, f"{len(problems)} problems (seed {seed}), e.g.:\n" + "\n".join(problems[:15])
    assert_guarantees(outcome)
    assert outcome.dead_lettered == len(bad) and outcome.duplicates == 0
