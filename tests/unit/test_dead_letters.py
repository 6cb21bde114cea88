"""The dead-letter path without a broker: the halt limits, what a copy carries, and how it is cut to fit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.dlq import (
    HEADERS_DROPPED,
    KEY_TRUNCATED_FROM,
    TRUNCATED_FROM,
    DeadLetters,
    DlqLimit,
    Header,
    fit_record,
    kafka_size,
)
from consumer.errors import DlqLimitExceeded, InvalidMessage
from consumer.metrics import Metrics
from tests.unit.fakes import FakeProducer

pytestmark = pytest.mark.unit

SOURCE = {"topic": "results", "partition": 3, "offset": 41}
OWN: list[Header] = [("evaljoin.error", b"schema"), ("evaljoin.error.detail", b"evaluations: too short"),
                     ("evaljoin.source.topic", b"results"), ("evaljoin.source.partition", b"3"),
                     ("evaljoin.source.offset", b"41")]


def feed(limit: DlqLimit, pattern: str) -> int:
    """Record ``pattern`` ("v" valid, "x" invalid); the 1-based position that raised, or 0 when none did."""
    for position, mark in enumerate(pattern, start=1):
        try:
            limit.record(valid=mark == "v")
        except DlqLimitExceeded:
            return position
    return 0


def dead_lettered(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("evaljoin_dead_letters_total", {"reason": reason})


def dead_letters(producer: FakeProducer, metrics: Metrics, *, max_consecutive: int = 0,
                 max_record_bytes: int | None = None) -> DeadLetters:
    return DeadLetters(producer, topic="dlq", metrics=metrics, max_record_bytes=max_record_bytes,
                       limit=DlqLimit(max_invalid_ratio=0, window=1000, max_consecutive=max_consecutive))


# -- DlqLimit ------------------------------------------------------------------------------------------


def test_more_invalid_in_a_row_than_allowed_halts() -> None:
    """max_consecutive invalid messages in a row pass; the next one raises; a valid one starts the count over."""
    limit = DlqLimit(max_invalid_ratio=0, window=1000, max_consecutive=3)
    assert feed(limit, "xxxvxxx") == 0
    assert feed(limit, "x") == 1


@pytest.mark.parametrize(("window", "first_checked"), [(1000, 100), (50, 10)])
def test_the_ratio_is_checked_once_a_tenth_of_the_window_is_seen(window: int, first_checked: int) -> None:
    """The ratio waits for a tenth of the window (at least 10 messages): all-invalid input halts exactly there."""
    limit = DlqLimit(max_invalid_ratio=0.5, window=window, max_consecutive=0)
    assert feed(limit, "x" * window) == first_checked


def test_the_ratio_halts_only_above_the_limit() -> None:
    """Exactly max_invalid_ratio of the window passes; one more invalid message raises."""
    limit = DlqLimit(max_invalid_ratio=0.5, window=100, max_consecutive=0)
    assert feed(limit, "v" * 50 + "x" * 50) == 0
    assert feed(limit, "x") == 1


def test_the_ratio_counts_only_the_last_window() -> None:
    """Invalid messages that slid out of the window no longer count towards the ratio."""
    limit = DlqLimit(max_invalid_ratio=0.3, window=40, max_consecutive=0)
    assert feed(limit, "v" * 30 + "x" * 10 + "v" * 40) == 0  # the window is all valid again
    assert feed(limit, "x" * 13) == 13  # 12 of 40 is the limit; counting the old 10 would halt at the 3rd


@pytest.mark.parametrize(("ratio", "consecutive", "pattern"), [
    (0, 0, "x" * 2000), (0, 5000, "x" * 2000), (0.5, 0, "v" * 1000 + "x" * 400)])
def test_zero_disables_a_check(ratio: float, consecutive: int, pattern: str) -> None:
    """A ratio of 0 or a count of 0 turns that check off: input that only it would halt on passes."""
    assert feed(DlqLimit(max_invalid_ratio=ratio, window=1000, max_consecutive=consecutive), pattern) == 0


# -- DeadLetters -------------------------------------------------------------------------------------------


async def test_an_invalid_record_is_published_as_it_was_with_why_and_where() -> None:
    """The key, value and the record's own headers go as they were, then the reason, detail and source offsets."""
    producer, metrics = FakeProducer(), Metrics()
    headers = [("ml_app", b"app"), ("empty", None), ("evaljoin.error", b"stale"), ("trace", b"\xff")]
    await dead_letters(producer, metrics).invalid(key=b"k", value=b"{bad", headers=headers, source=SOURCE,
                                                  error=InvalidMessage("invalid_json", "unexpected end"))
    assert producer.sent == [{"topic": "dlq", "key": b"k", "value": b"{bad", "headers": [
        ("ml_app", b"app"), ("trace", b"\xff"), ("evaljoin.error", b"invalid_json"),
        ("evaljoin.error.detail", b"unexpected end"), ("evaljoin.source.topic", b"results"),
        ("evaljoin.source.partition", b"3"), ("evaljoin.source.offset", b"41")]}]
    assert dead_lettered(metrics, "invalid_json") == 1


async def test_a_long_detail_is_cut() -> None:
    """The detail header carries at most 1000 characters of the explanation."""
    producer = FakeProducer()
    await dead_letters(producer, Metrics()).invalid(key=None, value=b"x", headers=[], source=SOURCE,
                                                    error=InvalidMessage("schema", "y" * 5000))
    assert dict(producer.sent[0]["headers"])["evaljoin.error.detail"] == b"y" * 1000


async def test_a_refused_evaluation_is_published_with_the_intakes_answer() -> None:
    """An evaluation the intake refused goes with reason intake_rejected and the status and body as detail."""
    producer, metrics = FakeProducer(), Metrics()
    await dead_letters(producer, metrics).rejected(key=b"app:q-1", metric=b'{"label":"x"}', source=SOURCE,
                                                   status=400, body="label is invalid")
    (record,) = producer.sent
    assert (record["key"], record["value"]) == (b"app:q-1", b'{"label":"x"}')
    assert record["headers"][:2] == [("evaljoin.error", b"intake_rejected"),
                                     ("evaljoin.error.detail", b"HTTP 400: label is invalid")]
    assert dead_lettered(metrics, "intake_rejected") == 1


async def test_the_limit_halts_before_the_record_that_passes_it_is_published() -> None:
    """Past max_consecutive, invalid() raises DlqLimitExceeded and that record is not published."""
    producer = FakeProducer()
    letters = dead_letters(producer, Metrics(), max_consecutive=2)
    for offset in range(2):
        await letters.invalid(key=None, value=b"x", headers=[], source={**SOURCE, "offset": offset},
                              error=InvalidMessage("invalid_json", "x"))
    letters.record_valid()
    for offset in (10, 11):  # each record at its own offset: a record seen again counts once
        await letters.invalid(key=None, value=b"x", headers=[], source={**SOURCE, "offset": offset},
                              error=InvalidMessage("empty", "x"))
    with pytest.raises(DlqLimitExceeded):
        await letters.invalid(key=None, value=b"x", headers=[], source={**SOURCE, "offset": 12},
                              error=InvalidMessage("empty", "x"))
    assert len(producer.sent) == 4


async def test_a_copy_larger_than_the_topic_takes_is_cut_to_fit() -> None:
    """With max_record_bytes, a too-large value is cut so that the record fits, and marked with its length."""
    producer = FakeProducer()
    await dead_letters(producer, Metrics(), max_record_bytes=2000).invalid(
        key=b"k", value=b"v" * 100_000, headers=[("ml_app", b"app")], source=SOURCE,
        error=InvalidMessage("oversize", "too big"))
    (record,) = producer.sent
    assert kafka_size(record["key"], record["value"], record["headers"]) <= 2000
    assert record["value"] and (b"v" * 100_000).startswith(record["value"])
    assert ("ml_app", b"app") in record["headers"] and (TRUNCATED_FROM, b"100000") in record["headers"]


# -- fit_record ---------------------------------------------------------------------------------------------


def test_a_record_exactly_at_the_limit_is_unchanged() -> None:
    """A copy whose size equals the limit goes as it is, with no mark."""
    kept: list[Header] = [("ml_app", b"app")]
    limit = kafka_size(b"key", b"value" * 50, [*kept, *OWN])
    assert fit_record(b"key", b"value" * 50, kept, OWN, limit) == (b"key", b"value" * 50, [*kept, *OWN])


def test_one_byte_over_cuts_only_the_value() -> None:
    """A copy one byte over the limit keeps its key and headers; its value is cut and marked with its length."""
    kept: list[Header] = [("ml_app", b"app")]
    limit = kafka_size(b"key", b"value" * 50, [*kept, *OWN]) - 1
    key, value, headers = fit_record(b"key", b"value" * 50, kept, OWN, limit)
    assert key == b"key" and headers == [*kept, *OWN, (TRUNCATED_FROM, b"250")]
    assert value is not None and len(value) < 250 and (b"value" * 50).startswith(value)
    assert kafka_size(key, value, headers) <= limit


def test_headers_that_do_not_fit_are_dropped_and_counted() -> None:
    """When the key and the record's headers alone are over the limit, those headers go, and how many is said."""
    kept: list[Header] = [("big", b"h" * 3000), ("small", b"s")]
    limit = kafka_size(b"key", b"", [*OWN, (TRUNCATED_FROM, b"10"), (HEADERS_DROPPED, b"2")]) + 50
    key, value, headers = fit_record(b"key", b"v" * 10, kept, OWN, limit)
    assert key == b"key" and [h for h in headers if h in kept] == []
    assert headers[:len(OWN)] == OWN and (HEADERS_DROPPED, b"2") in headers
    assert kafka_size(key, value, headers) <= limit


def test_a_key_that_does_not_fit_is_cut_and_marked() -> None:
    """When the key alone is over the limit, it is cut and marked with its length; the dead-letter headers stay."""
    limit = kafka_size(b"", b"", [*OWN, (HEADERS_DROPPED, b"1"), (KEY_TRUNCATED_FROM, b"5000")]) + 100
    key, value, headers = fit_record(b"K" * 5000, None, [("ml_app", b"app")], OWN, limit)
    assert key is not None and 0 < len(key) < 5000 and value is None
    assert headers == [*OWN, (HEADERS_DROPPED, b"1"), (KEY_TRUNCATED_FROM, b"5000")]
    assert kafka_size(key, value, headers) <= limit


optional_bytes = st.none() | st.binary(max_size=2000)


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(key=optional_bytes, value=optional_bytes,
       kept=st.lists(st.tuples(st.text(max_size=20).filter(lambda name: not name.startswith("evaljoin.")),
                               st.binary(max_size=800)), max_size=4),
       room=st.integers(0, 5000))
def test_a_cut_copy_always_fits_and_says_what_was_cut(key: bytes | None, value: bytes | None, kept: list[Header],
                                                      room: int) -> None:
    """For any limit with room for the dead-letter headers and the marks, the copy fits and every cut is marked."""
    marks = [(TRUNCATED_FROM, str(len(value or b"")).encode()), (HEADERS_DROPPED, str(len(kept)).encode()),
             (KEY_TRUNCATED_FROM, str(len(key or b"")).encode())]
    limit = kafka_size(b"", b"", [*OWN, *marks]) + room
    new_key, new_value, headers = fit_record(key, value, kept, OWN, limit)
    assert kafka_size(new_key, new_value, headers) <= limit
    assert [h for h in headers if h in OWN] == OWN
    said = dict(h for h in headers if h[0] in (TRUNCATED_FROM, HEADERS_DROPPED, KEY_TRUNCATED_FROM))
    if new_value != value:
        assert value is not None and value.startswith(new_value or b"") and said[TRUNCATED_FROM] == marks[0][1]
    if any(h not in headers for h in kept):
        assert said[HEADERS_DROPPED] == marks[1][1]
    if new_key != key:
        assert key is not None and key.startswith(new_key or b"") and said[KEY_TRUNCATED_FROM] == marks[2][1]
    assert all(said[name] == length for name, length in marks if name in said)
