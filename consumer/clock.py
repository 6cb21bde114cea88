"""Time, passed in: wall-clock milliseconds for deadlines and latencies, a monotonic clock for timeouts.

Every component that reads the time takes a :class:`Clock` (keyword ``clock``, default
:data:`SYSTEM_CLOCK`), so a test can step time instead of sleeping through it.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in milliseconds since the epoch (Kafka record timestamps use the same)."""
        ...

    def now_s(self) -> float:
        """Wall-clock time in seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: for deadlines within this process."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def now_s(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()


class ManualClock:
    """A clock that moves only when told to (for tests)."""

    def __init__(self, now_ms: int = 1_700_000_000_000, monotonic_s: float = 1000.0) -> None:
        self._now_ms = now_ms
        self._monotonic = monotonic_s

    def now_ms(self) -> int:
        return self._now_ms

    def now_s(self) -> float:
        return self._now_ms / 1000

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._now_ms += int(seconds * 1000)
        self._monotonic += seconds
