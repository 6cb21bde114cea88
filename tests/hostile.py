"""Hostile input for the decoder and the consumer, as hypothesis strategies.

:func:`hostile` draws one record that must be dead-lettered together with the reasons that are right
for it (broken JSON, wrong types, huge strings and nesting, invalid UTF-8, NaN/Infinity, labels the
intake would reject, missing keys, unknown schema versions, odd header bytes, records on the wrong
topic, empty records, random bytes). :func:`adversarial_pair` draws the content of a valid pair that
is odd but legal (any Unicode join key and ml_app, rare labels, odd headers). The unit tests feed them
to the decoder; the reliability suite feeds them to a running consumer.

Some records cannot be written through a Kafka client's string API: a header *name* that is not UTF-8
(librdkafka-based producers write whatever bytes they are given). :class:`RawName` carries such a name, and
:func:`send_raw` writes a record holding one to a real broker, below the client's string API.

:func:`generate` draws a list of examples outside a hypothesis test (the reliability suite's corpora), and
:func:`reasons_for` gives the reasons right for one record as it is sent (its key and headers count too).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from hypothesis import HealthCheck, Phase, given
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.decode import record_bytes
from consumer.events import normalise_label

ID_HEADER = "reliability.id"  # names each record for the reliability suite; generated headers never use it
MAX_BYTES = 131_072  # the MAX_MESSAGE_BYTES the records are sized against: "oversize" is over it
LABEL_RULE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,199}$")


class RawName(str):
    """A header name given as bytes, any bytes: what aiokafka's pure-Python batch builder writes for it.

    The builder writes ``name.encode("utf-8")``; this returns the raw bytes instead. aiokafka's C builder
    refuses a ``str`` subclass, so records holding one go through :func:`send_raw`.
    """

    raw: bytes

    def __new__(cls, raw: bytes) -> RawName:
        name = super().__new__(cls, raw.decode("utf-8", "surrogateescape"))
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82", b"\xc0\xaf"]


def has_raw_name(headers: Sequence[tuple[str, bytes | None]] | None) -> bool:
    return any(isinstance(name, RawName) for name, _ in headers or ())


async def send_raw(producer: AIOKafkaProducer, topic: str, value: bytes | None, *, key: bytes | None = None,
                   headers: Sequence[tuple[str, bytes | None]] = (), partition: int = 0) -> asyncio.Future[Any]:
    """Queue one record whose header names may be :class:`RawName` bytes, as a batch of its own; returns the
    future of its acknowledgement. The producer must not be idempotent (its C batch builder is replaced)."""
    batch = producer.create_batch()
    batch._builder = _DefaultRecordBatchBuilderPy(2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1,
                                                  base_sequence=0, batch_size=1 << 21)
    batch.append(timestamp=None, key=key, value=value, headers=list(headers))
    future: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
    return future


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
# Not the headers the service reads (an odd run_id would put one side of a valid pair in another run).
odd_header_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(
    lambda name: name not in ("ml_app", "run_id", "judged_model", ID_HEADER) and not name.startswith("evaljoin."))
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
        "not_an_object", "random_bytes", "header_name_not_utf8", "odd_run_id_header",
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
        bad = draw(st.sampled_from(INVALID_UTF8))
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
        # A label Datadog would take once normalised (answer-relevancy) is normalised, not refused.
        label = draw(st.one_of(st.text(max_size=250), st.text("0123456789_-. é", max_size=30)).filter(
            lambda text: normalise_label(text) is None))
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
    elif category == "header_name_not_utf8":
        # The name is not UTF-8; the value may be anything. The record is otherwise valid.
        # Bytes around an invalid sequence can complete it (b"\xe2" b"\x82" b"\x80" is "\u2080"): keep invalid ones.
        raw = draw(st.tuples(st.binary(max_size=20), st.sampled_from(INVALID_UTF8), st.binary(max_size=20))
                   .map(b"".join).filter(lambda name: not _utf8(name)))
        headers.insert(draw(st.integers(0, len(headers))), (RawName(raw), draw(st.binary(max_size=100))))
        value = orjson.dumps(event)
        reasons = frozenset({"invalid_header"})
    elif category == "odd_run_id_header":
        # run_id is read from the header when the event has none (judged_model only for judge lines).
        headers.append(("run_id", draw(st.binary(min_size=1, max_size=50).filter(lambda b: not _utf8(b)))))
        value = orjson.dumps(event)
        reasons = frozenset({"invalid_header"})
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


def reasons_for(example: Hostile, key: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> frozenset[str]:
    """The dead-letter reasons right for ``example`` sent with this key and these headers: MAX_BYTES counts the
    key and the headers too, so a record is "oversize" by what it is sent with, known only when it is sent."""
    return frozenset({"oversize"}) if record_bytes(key, example.value, headers) > MAX_BYTES else example.reasons


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
