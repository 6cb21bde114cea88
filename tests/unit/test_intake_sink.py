"""The HTTP intake sink against an in-process transport: what it splits, retries, waits for, chunks and returns."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.errors import ServiceRefused
from consumer.sink import Accepted, HttpIntakeSink, Rejection, encode_batch

pytestmark = pytest.mark.unit

URL = "http://intake.test/api/intake/llm-obs/v2/eval-metric"
Handler = Callable[[httpx.Request], httpx.Response]


class Intake:
    """An intake in memory: answers each request with ``handler``, and keeps the metrics of every request."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[list[Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(metrics_of(request))
        return self.handler(request)


def metrics_of(request: httpx.Request) -> list[Any]:
    metrics: list[Any] = orjson.loads(request.content)["data"]["attributes"]["metrics"]
    return metrics


def metric(i: int, padding: int = 0) -> bytes:
    return orjson.dumps({"label": "faithfulness", "score_value": i, "pad": "x" * padding})


async def send(intake: Intake, metrics: list[bytes], *, max_batch: int = 100, max_body_bytes: int = 1_000_000,
               retry_max_s: float = 0.002, accepted: Accepted | None = None,
               max_in_flight: int = 1) -> list[Rejection]:
    """``metrics`` through a sink that posts to ``intake``; retries start at a millisecond."""
    client = HttpIntakeSink(url=URL, headers={"DD-API-KEY": "k"}, timeout_s=1.0, max_batch=max_batch,
                            max_body_bytes=max_body_bytes, retry_initial_s=0.001, retry_max_s=retry_max_s,
                            transport=httpx.MockTransport(intake), max_in_flight=max_in_flight)
    try:
        return await client.send(metrics, accepted=accepted)
    finally:
        await client.aclose()


def answers(*responses: httpx.Response | Exception) -> Handler:
    """The given answers in turn (an exception is raised as the transport's), then 202 for ever."""
    queue: Iterator[httpx.Response | Exception] = iter(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(queue, httpx.Response(202))
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the sink asks to sleep, recorded instead of slept."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float, *args: Any) -> None:
        asked.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    return asked


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_a_2xx_answer_returns_no_rejections(status: int) -> None:
    """Every metric of a batch the intake answers with any 2xx is delivered: nothing comes back."""
    intake = Intake(answers(httpx.Response(status)))
    assert await send(intake, [metric(i) for i in range(5)]) == []
    assert intake.requests == [[orjson.loads(metric(i)) for i in range(5)]]


async def test_nothing_to_send_makes_no_request() -> None:
    """An empty batch returns at once, without a request."""
    intake = Intake(answers())
    assert await send(intake, []) == []
    assert intake.requests == []


@pytest.mark.parametrize("status", [400, 413, 422])
@settings(max_examples=25, derandomize=True, database=None, deadline=None)
@given(data=st.data())
async def test_a_refused_batch_is_split_until_the_refused_metrics_are_found(status: int, data: st.DataObject) -> None:
    """A batch refused for its content is halved until each refused metric is alone; only those come back."""
    count = data.draw(st.integers(1, 40), label="count")
    refused = data.draw(st.sets(st.integers(0, count - 1), max_size=count), label="refused")

    def handler(request: httpx.Request) -> httpx.Response:
        scores = {m["score_value"] for m in metrics_of(request)}
        return httpx.Response(status, text="bad label") if scores & refused else httpx.Response(202)

    intake = Intake(handler)
    rejections = await send(intake, [metric(i) for i in range(count)])
    assert sorted(r.index for r in rejections) == sorted(refused)
    assert {(r.status, r.body) for r in rejections} <= {(status, "bad label")}
    accepted = [m["score_value"] for request in intake.requests if not {m["score_value"] for m in request} & refused
                for m in request]
    assert sorted(accepted) == sorted(set(range(count)) - refused)


async def test_another_4xx_refuses_the_whole_request_without_splitting() -> None:
    """A 4xx that says nothing about single metrics (409) rejects every metric of the request, in one request."""
    intake = Intake(answers(httpx.Response(409, text="conflict")))
    rejections = await send(intake, [metric(i) for i in range(4)])
    assert rejections == [Rejection(i, 409, "conflict") for i in range(4)]
    assert len(intake.requests) == 1


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
async def test_a_transient_status_is_retried_until_a_2xx(status: int, sleeps: list[float]) -> None:
    """408, 425, 429 and 5xx are retried with the same body until the intake answers 2xx; nothing is rejected."""
    intake = Intake(answers(*[httpx.Response(status)] * 3))
    assert await send(intake, [metric(1), metric(2)]) == []
    assert len(intake.requests) == 4 and all(request == intake.requests[0] for request in intake.requests)
    assert len(sleeps) == 3


@pytest.mark.parametrize("error", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow connect"),
                                   httpx.ReadTimeout("slow answer"), httpx.RemoteProtocolError("cut")])
async def test_a_connection_error_or_timeout_is_retried_until_a_2xx(error: Exception, sleeps: list[float]) -> None:
    """A request that gets no answer (refused, timed out, cut) is sent again until the intake answers 2xx."""
    intake = Intake(answers(error, error))
    assert await send(intake, [metric(1)]) == []
    assert len(intake.requests) == 3 and len(sleeps) == 2


@pytest.mark.parametrize(("status", "retry_after", "expected"), [
    (429, "2", 2.0), (503, "2.5", 2.5), (429, "3600", 5.0), (429, "soon", None)])
async def test_retry_after_is_honoured_up_to_the_longest_backoff(status: int, retry_after: str, expected: float | None,
                                                                 sleeps: list[float]) -> None:
    """The wait is what Retry-After asks, capped at retry_max_s; one that is not a number leaves the backoff."""
    intake = Intake(answers(httpx.Response(status, headers={"Retry-After": retry_after})))
    assert await send(intake, [metric(1)], retry_max_s=5.0) == []
    assert len(intake.requests) == 2
    if expected is None:
        assert sleeps[0] <= 0.001
    else:
        assert sleeps == [pytest.approx(expected)]


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), max_size=30), max_batch=st.integers(1, 8),
       max_body_bytes=st.integers(300, 1500))
async def test_a_batch_is_cut_into_requests_by_count_and_body_size(sizes: list[int], max_batch: int,
                                                                   max_body_bytes: int) -> None:
    """Every metric is sent once; a request holds at most max_batch metrics and max_body_bytes (or one metric)."""
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(202)

    intake = Intake(handler)
    metrics = [metric(i, padding) for i, padding in enumerate(sizes)]
    assert await send(intake, metrics, max_batch=max_batch, max_body_bytes=max_body_bytes) == []
    assert sorted(m["score_value"] for request in intake.requests for m in request) == list(range(len(sizes)))
    for request, body in zip(intake.requests, bodies, strict=True):
        assert len(request) <= max_batch
        assert len(body) <= max_body_bytes or len(request) == 1
    # A request is cut only where the next metric would not fit: no more requests than needed. (The sink
    # counts a separator for every metric, one byte more than a body has, so a body may stop one byte short.)
    chunks = sorted([m["score_value"] for m in request] for request in intake.requests)
    for chunk, following in itertools.pairwise(chunks):
        grown = encode_batch([metrics[i] for i in [*chunk, following[0]]])
        assert len(chunk) == max_batch or len(grown) >= max_body_bytes


@pytest.mark.parametrize("max_in_flight", [1, 3])
@settings(max_examples=25, derandomize=True, database=None, deadline=None)
@given(data=st.data())
async def test_each_accepted_request_is_reported_before_its_slot_sends_again(max_in_flight: int,
                                                                             data: st.DataObject) -> None:
    """``accepted`` gets the indexes of every request answered 2xx, once each and never a refused one, and a
    request slot waits for it before its next request: requests in flight never outnumber the slots."""
    count = data.draw(st.integers(1, 30), label="count")
    refused = data.draw(st.sets(st.integers(0, count - 1), max_size=3), label="refused")
    reported: list[list[int]] = []
    sent_unreported = 0  # requests answered and not yet reported, at most one per slot
    most_unreported = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal sent_unreported, most_unreported
        scores = {m["score_value"] for m in metrics_of(request)}
        if scores & refused:
            return httpx.Response(400, text="bad label")
        sent_unreported += 1
        most_unreported = max(most_unreported, sent_unreported)
        return httpx.Response(202)

    async def accepted(indexes: Sequence[int]) -> None:
        nonlocal sent_unreported
        await asyncio.sleep(0)  # a store round trip: other slots run meanwhile
        reported.append(list(indexes))
        sent_unreported -= 1

    intake = Intake(handler)
    rejections = await send(intake, [metric(i) for i in range(count)], max_batch=4, accepted=accepted,
                            max_in_flight=max_in_flight)
    assert sorted(i for indexes in reported for i in indexes) == sorted(set(range(count)) - refused)
    assert sorted(r.index for r in rejections) == sorted(refused)
    accepted_requests = [sorted(m["score_value"] for m in request) for request in intake.requests
                         if not {m["score_value"] for m in request} & refused]
    assert sorted(sorted(indexes) for indexes in reported) == sorted(accepted_requests)
    assert sent_unreported == 0 and most_unreported <= max_in_flight


async def test_a_request_accepted_before_a_later_one_fails_is_reported() -> None:
    """The first request's 2xx is reported even though a later request of the same call refuses the service."""
    reported: list[list[int]] = []

    async def accepted(indexes: Sequence[int]) -> None:
        reported.append(list(indexes))

    intake = Intake(answers(httpx.Response(202), httpx.Response(401, text="bad key")))
    with pytest.raises(ServiceRefused):
        await send(intake, [metric(i) for i in range(4)], max_batch=2, accepted=accepted)
    first, _ = intake.requests  # the two requests go in either order; the first is answered 202
    assert reported == [[m["score_value"] for m in first]]
