"""The dead-letter path: what cannot be processed is published with its reason, never dropped.

Invalid input and evaluations the intake refused go to the dead-letter topic with headers that say
why and where they came from; the partition keeps flowing. :class:`DlqLimit` (after arroyo's) halts
the consumer when so much is invalid that a deploy is probably broken: better to stop than to
dead-letter a whole topic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from consumer.errors import DlqLimitExceeded, InvalidMessage
from consumer.metrics import Metrics

_DETAIL_LIMIT = 1000
# The headers this module adds; a record dead-lettered again gets fresh ones (other headers are kept,
# among them evaljoin.truncated_from, which the caller adds to an oversize record it truncated).
DLQ_HEADERS = frozenset({"evaljoin.error", "evaljoin.error.detail", "evaljoin.source.topic",
                         "evaljoin.source.partition", "evaljoin.source.offset"})


class Producer(Protocol):
    async def send_and_wait(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                            headers: Sequence[tuple[str, bytes]] | None = None) -> Any: ...


class DlqLimit:
    """Raise :class:`DlqLimitExceeded` when invalid messages pass a ratio or a consecutive count.

    ``max_invalid_ratio`` is checked over the last ``window`` messages once a tenth of the window has
    been seen; 0 disables either check.
    """

    def __init__(self, *, max_invalid_ratio: float, window: int, max_consecutive: int) -> None:
        self._ratio = max_invalid_ratio
        self._window: deque[bool] = deque(maxlen=window)
        self._invalid_in_window = 0
        self._max_consecutive = max_consecutive
        self._consecutive = 0

    def record(self, *, valid: bool) -> None:
        if len(self._window) == self._window.maxlen and not self._window[0]:
            self._invalid_in_window -= 1
        self._window.append(valid)
        if valid:
            self._consecutive = 0
            return
        self._invalid_in_window += 1
        self._consecutive += 1
        if self._max_consecutive and self._consecutive > self._max_consecutive:
            raise DlqLimitExceeded(f"{self._consecutive} invalid messages in a row")
        seen = len(self._window)
        minimum = max(10, (self._window.maxlen or 0) // 10)
        if self._ratio and seen >= minimum and self._invalid_in_window / seen > self._ratio:
            raise DlqLimitExceeded(
                f"{self._invalid_in_window} of the last {seen} messages were invalid "
                f"(limit {self._ratio:.0%})"
            )


class DeadLetters:
    """Publishes to the dead-letter topic; each call returns once the broker acknowledged it."""

    def __init__(self, producer: Producer, *, topic: str, limit: DlqLimit, metrics: Metrics) -> None:
        self._producer = producer
        self._metrics = metrics
        self._topic = topic
        self._limit = limit

    def record_valid(self) -> None:
        self._limit.record(valid=True)

    async def invalid(self, *, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]],
                      source: dict[str, Any], error: InvalidMessage) -> None:
        """Dead-letter an invalid record as it was, unless the DlqLimit says to halt first."""
        self._limit.record(valid=False)
        await self._publish(key, value, headers, source, error.reason, error.detail)

    async def rejected(self, *, key: bytes | None, metric: bytes, source: dict[str, Any], status: int,
                       body: str) -> None:
        """Dead-letter one evaluation the intake refused, with the intake's answer."""
        await self._publish(key, metric, [], source, "intake_rejected", f"HTTP {status}: {body}")

    async def _publish(self, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]],
                       source: dict[str, Any], reason: str, detail: str) -> None:
        out = [(name, data) for name, data in headers if data is not None and name not in DLQ_HEADERS]
        out += [
            ("evaljoin.error", reason.encode()),
            ("evaljoin.error.detail", detail[:_DETAIL_LIMIT].encode("utf-8", "replace")),
            ("evaljoin.source.topic", str(source.get("topic", "")).encode()),
            ("evaljoin.source.partition", str(source.get("partition", "")).encode()),
            ("evaljoin.source.offset", str(source.get("offset", "")).encode()),
        ]
        await self._producer.send_and_wait(self._topic, value=value, key=key, headers=out)
        self._metrics.dead_letters.labels(reason=reason).inc()
