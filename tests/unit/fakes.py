"""Stand-ins for what the consumer talks to over the network, kept in memory for the unit tier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consumer.sink import Rejection


class FakeProducer:
    """Keeps what is sent, as the broker would after acknowledging it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_and_wait(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                            headers: Sequence[tuple[str, bytes]] | None = None) -> None:
        self.sent.append({"topic": topic, "key": key, "value": value, "headers": list(headers or [])})


class FakeSink:
    """An evaluation sink that keeps every ``send`` call and refuses the metrics that contain ``refuse``."""

    def __init__(self, refuse: bytes | None = None) -> None:
        self.calls: list[list[bytes]] = []
        self._refuse = refuse

    async def send(self, metrics: Sequence[bytes]) -> list[Rejection]:
        self.calls.append(list(metrics))
        return [Rejection(i, 400, "refused") for i, metric in enumerate(metrics)
                if self._refuse is not None and self._refuse in metric]

    async def aclose(self) -> None:
        pass

    @property
    def sent(self) -> list[bytes]:
        return [metric for call in self.calls for metric in call]
