"""The evaluation sink: where joined evaluations go, and what a return from it means.

ddtrace's own writer cannot be the delivery guarantee (it drops after three tries, caps its buffer
and never says whether a batch arrived), so :class:`HttpIntakeSink` posts eval-metric batches to the
intake itself, agentless or through the Datadog Agent's EVP proxy, and counts only a 2xx as
delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx
import structlog

from consumer.aio import Backoff
from consumer.errors import RejectedDelivery, RetryableDelivery, ServiceRefused
from consumer.metrics import Metrics

log = structlog.get_logger(__name__)

_BODY_HEAD = b'{"data":{"type":"evaluation_metric","attributes":{"metrics":['
_BODY_TAIL = b"]}}}"
_RETRYABLE_STATUS = frozenset({408, 425, 429})
# Refusals of the service, not of its evaluations: a wrong DD_API_KEY (401, 403), DD_SITE or Agent URL (404),
# proxy credentials (407). Dead-lettering would empty the whole stream into the DLQ; the delivery stage waits
# instead (unready, lag grows, alerts fire) until the configuration is fixed.
_REFUSES_THE_SERVICE = frozenset({401, 403, 404, 407})
INTAKE_HINT = "check DD_API_KEY, DD_SITE, DD_TRACE_AGENT_URL / DD_AGENT_HOST"
_ANSWER_LIMIT = 2000  # characters of an intake's answer kept for logs and dead-letter headers
# A batch answered with one of these may be refused because of a single metric: split it to find out.
_SPLIT_STATUS = frozenset({400, 413, 422})


@dataclass(frozen=True)
class Rejection:
    """The intake refused metric ``index`` of a ``send`` call for good."""

    index: int
    status: int
    body: str


# Called with the indexes (into ``send``'s metrics) of one request the intake answered 2xx.
Accepted = Callable[[Sequence[int]], Awaitable[None]]


class EvaluationSink(Protocol):
    async def send(self, metrics: Sequence[bytes], *, accepted: Accepted | None = None) -> list[Rejection]:
        """Deliver encoded eval-metric objects.

        A return means every metric not named in the returned rejections was accepted by the intake
        (a 2xx answer). Transient failures are retried inside, with capped jittered backoff, for as
        long as it takes; the only way to stop that is to cancel the call, and a cancelled call
        implies nothing about what was delivered. Raises :class:`ServiceRefused` when the intake
        refuses the service itself (401, 403, 404, 407): then nothing is known to be delivered either.

        ``accepted``, if given, is awaited with the indexes of each request's metrics as soon as the
        intake answered that request 2xx, and before the request's slot sends anything else (with
        several requests in flight, each awaits its own); so what it records of a request is recorded
        even if the call is cancelled or fails later. It is called once for each accepted metric, and
        never for a rejected one. An exception from it ends the call, as a refusal would.
        """
        ...

    async def aclose(self) -> None: ...


def encode_batch(metrics: Sequence[bytes]) -> bytes:
    """The intake's batch body around already-encoded metric objects."""
    return _BODY_HEAD + b",".join(metrics) + _BODY_TAIL


class HttpIntakeSink:
    """:class:`EvaluationSink` posting to the eval-metric intake over HTTP."""

    def __init__(self, *, url: str, headers: dict[str, str], timeout_s: float, max_batch: int,
                 max_body_bytes: int, retry_initial_s: float, retry_max_s: float,
                 metrics: Metrics | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, max_in_flight: int = 1) -> None:
        self._url = url
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout_s, transport=transport)
        self._max_batch = max_batch
        self._max_body = max_body_bytes - len(_BODY_HEAD) - len(_BODY_TAIL)
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._metrics = metrics or Metrics()
        self._in_flight = asyncio.Semaphore(max_in_flight)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, metrics: Sequence[bytes], *, accepted: Accepted | None = None) -> list[Rejection]:
        chunks = self._chunks(range(len(metrics)), metrics)
        if len(chunks) <= 1:
            return await self._send_chunk(chunks[0], metrics, accepted) if chunks else []
        # Several requests in flight: a batch's delivery takes about one request's time, not one per chunk.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._send_chunk_bounded(chunk, metrics, accepted)) for chunk in chunks]
        except BaseExceptionGroup as failed:  # one request refused: the others were cancelled
            raise failed.exceptions[0] from None
        return [rejection for task in tasks for rejection in task.result()]

    async def _send_chunk_bounded(self, chunk: list[int], metrics: Sequence[bytes],
                                  accepted: Accepted | None) -> list[Rejection]:
        async with self._in_flight:  # held through ``accepted``: a slot sends again once its 2xx is recorded
            return await self._send_chunk(chunk, metrics, accepted)

    def _chunks(self, indexes: Sequence[int], metrics: Sequence[bytes]) -> list[list[int]]:
        chunks: list[list[int]] = []
        current: list[int] = []
        size = 0
        for index in indexes:
            length = len(metrics[index]) + 1
            if current and (len(current) >= self._max_batch or size + length > self._max_body):
                chunks.append(current)
                current, size = [], 0
            current.append(index)
            size += length
        if current:
            chunks.append(current)
        return chunks

    async def _send_chunk(self, chunk: list[int], metrics: Sequence[bytes],
                          accepted: Accepted | None) -> list[Rejection]:
        try:
            await self._post_until_answered(encode_batch([metrics[i] for i in chunk]), len(chunk))
        except RejectedDelivery as exc:
            if len(chunk) > 1 and exc.status in _SPLIT_STATUS:
                half = len(chunk) // 2
                return [*await self._send_chunk(chunk[:half], metrics, accepted),
                        *await self._send_chunk(chunk[half:], metrics, accepted)]
            return [Rejection(i, exc.status or 0, exc.body) for i in chunk]
        if accepted is not None:
            await accepted(chunk)
        return []

    async def _post_until_answered(self, body: bytes, count: int) -> None:
        backoff = Backoff(self._retry_initial, self._retry_max)
        while True:
            try:
                await self._post(body)
                return
            except RetryableDelivery as exc:
                delay = backoff.next(retry_after_s=exc.retry_after)
                log.warning("intake_retry", attempt=backoff.attempts, evaluations=count, status=exc.status,
                            error=str(exc), retry_in_s=round(delay, 3))
                self._metrics.intake_retries.labels(cause=str(exc.status or "error")).inc()
                await asyncio.sleep(delay)

    async def _post(self, body: bytes) -> None:
        try:
            with self._metrics.intake_request_seconds.time():
                response = await self._client.post(self._url, content=body)
        except httpx.TimeoutException as exc:
            raise RetryableDelivery(f"timed out: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise RetryableDelivery(f"connection error: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if 200 <= status < 300:
            return
        text = response.text[:_ANSWER_LIMIT]
        if status in _RETRYABLE_STATUS or status >= 500:
            raise RetryableDelivery(f"intake answered {status}", status=status, body=text,
                                    retry_after=_retry_after(response))
        if status in _REFUSES_THE_SERVICE:
            raise ServiceRefused("intake", f"{self._url} answered {status}: {text[:200]}", hint=INTAKE_HINT)
        raise RejectedDelivery(f"intake answered {status}", status=status, body=text)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


