"""Small asyncio helpers every stage shares: retry delays, and stopping what a component started.

Whoever starts a task stops it (aiokafka's ``Fetcher.close``): :func:`cancel_and_wait` cancels a task
and waits until it has really ended, and :func:`stop_within` bounds how long a library's ``stop()``
may take (and logs, rather than raises, a CancelledError that escapes one). :class:`Backoff` is the
one retry-delay rule: doubling from ``first_s``, capped at ``cap_s``, jittered into ``[0.5, 1.0]`` of
the step, and never shorter than what the other side asked for (an HTTP ``Retry-After``), capped too.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)

CANCEL_AGAIN_AFTER_S = 0.5  # how long cancel_and_wait waits before cancelling a task that runs on
STOP_GIVE_UP_S = 5.0  # how long stop_within waits for a stop() it cancelled


class Backoff:
    """Capped, jittered, doubling delays between attempts of something that failed transiently.

    ``next()`` gives the delay before the next attempt; ``reset()`` starts over after a success.
    """

    def __init__(self, first_s: float, cap_s: float, *, rng: random.Random | None = None) -> None:
        self._first = first_s
        self._cap = cap_s
        self._step = first_s
        self._rng = rng or random.Random()
        self.attempts = 0

    def next(self, *, retry_after_s: float | None = None) -> float:
        """The delay before the next attempt; at least ``retry_after_s`` (capped) when the other side said so."""
        self.attempts += 1
        delay = self._step * self._rng.uniform(0.5, 1.0)
        self._step = min(self._step * 2, self._cap)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self._cap))
        return delay

    def reset(self) -> None:
        self._step = self._first
        self.attempts = 0


async def cancel_and_wait(task: asyncio.Task[Any], *, again_after_s: float = CANCEL_AGAIN_AFTER_S) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again while it runs on.

    One cancel is not always enough on Python 3.11: ``asyncio.wait_for`` (which redis-py wraps
    around every socket write) returns the inner result and drops the cancellation when both land
    in the same turn of the loop, so a task cancelled inside a Redis call can carry on as if
    nothing happened (and a sweeper would then sleep and sweep forever).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=again_after_s)
    if not task.cancelled():
        task.exception()  # retrieved, like gather(return_exceptions=True) did


async def stop_within(stop: Callable[[], Awaitable[None]], timeout_s: float, what: str) -> None:
    """Run ``stop()`` for at most ``timeout_s``, then give up on it (cancelled) and log that."""
    task = asyncio.ensure_future(stop())
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        try:
            task.result()
        except asyncio.CancelledError:
            # The stop's own, not ours (a cancellation of this call raises from the wait above): aiokafka's
            # Fetcher.close awaits the fetch tasks it cancelled without suppressing it, which happens when one
            # waits out a retry backoff (a broker down). What it had left to close goes with the process.
            log.warning("stop_failed", component=what, error="CancelledError raised inside the library's stop()")
        return
    log.warning("stop_timed_out", component=what, timeout_s=timeout_s)
    await asyncio.wait({asyncio.ensure_future(cancel_and_wait(task))}, timeout=STOP_GIVE_UP_S)
