"""Stand-ins for what the consumer talks to over the network, kept in memory for the unit tier."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from consumer.sink import Accepted, Rejection


class FakeProducer:
    """Keeps what is sent, as the broker would after acknowledging it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_and_wait(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                            headers: Sequence[tuple[str, bytes]] | None = None) -> None:
        self.sent.append({"topic": topic, "key": key, "value": value, "headers": list(headers or [])})


class FakeSink:
    """An evaluation sink that keeps every ``send`` call and refuses the metrics that contain ``refuse``.

    A call is cut into requests of ``per_request`` metrics (all in one when 0), answered one after the other;
    ``accepted`` hears of each request's accepted metrics as the HTTP sink reports them. With ``stall_at``
    the request of that number (0 is the first, counted over every call) never gets an answer: the process
    is stuck there, as one is when it dies mid-request; ``stalled`` is set when it is reached.
    """

    def __init__(self, refuse: bytes | None = None, *, per_request: int = 0, stall_at: int | None = None) -> None:
        self.calls: list[list[bytes]] = []
        self.requests: list[list[bytes]] = []  # every request answered, in order
        self.stalled = asyncio.Event()
        self._refuse = refuse
        self._per_request = per_request
        self._stall_at = stall_at

    async def send(self, metrics: Sequence[bytes], *, accepted: Accepted | None = None) -> list[Rejection]:
        self.calls.append(list(metrics))
        size = self._per_request or max(1, len(metrics))
        rejections: list[Rejection] = []
        for start in range(0, len(metrics), size):
            if len(self.requests) == self._stall_at:
                self.stalled.set()
                await asyncio.Event().wait()  # no answer, ever
            indexes = range(start, min(start + size, len(metrics)))
            self.requests.append([metrics[i] for i in indexes])
            refused = [Rejection(i, 400, "refused") for i in indexes
                       if self._refuse is not None and self._refuse in metrics[i]]
            rejections += refused
            ok = [i for i in indexes if i not in {r.index for r in refused}]
            if accepted is not None and ok:
                await accepted(ok)
        return rejections

    async def aclose(self) -> None:
        pass

    @property
    def sent(self) -> list[bytes]:
        return [metric for call in self.calls for metric in call]
