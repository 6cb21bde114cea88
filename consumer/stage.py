"""The shape of a processing stage (arroyo's strategy, in asyncio), and the retry rule every stage shares.

    Kafka batch -> decode -> JoinStage -> DeliveryStage -> commit

A stage holds at most one unit of work (a Kafka batch) at a time:

- ``submit(unit)`` starts it; only while ``has_room`` (the caller pauses fetching otherwise). Returning
  does not mean the unit was processed: it is in flight.
- ``poll()`` hands back the finished unit, once, for the next stage; ``None`` while it runs, when there
  is none, or when it was abandoned (cancelled by a revoke or a shutdown: its offsets are not committed
  and Kafka delivers it again). It raises what ended the unit for good: :class:`DlqLimitExceeded`, a
  dependency error that is not retriable, or a defect.
- ``join(deadline)`` waits for the unit in flight until ``deadline`` (``clock.monotonic()``) and
  cancels it after; then ``poll()`` tells how it ended.
- ``close()`` cancels whatever runs; whoever built the stage closes it.

A unit that fails on a retriable error (:class:`Unavailable`) is done again after a backoff, inside the
stage, for as long as it takes: every stage's work is idempotent. A :class:`ServiceRefused` (credentials,
ACLs, a wrong intake URL) is retried the same way but also makes the service unready with the reason
until the stage succeeds again; once a stop is requested, neither is retried any more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from consumer.aio import Backoff, cancel_and_wait
from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.errors import DependencyError, ServiceRefused
from consumer.metrics import Metrics

log = structlog.get_logger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

RETRY_FIRST_S = 0.2  # a unit that failed transiently is done again after this, doubling
RETRY_CAP_S = 10.0  # up to this


class Refusals:
    """Which dependencies refuse the service right now, and why: readiness fails while any does."""

    def __init__(self, metrics: Metrics) -> None:
        self._by_stage: dict[str, ServiceRefused] = {}
        self._metrics = metrics

    def refused(self, stage: str, error: ServiceRefused) -> None:
        if stage not in self._by_stage:
            log.error(f"{error.component}_refuses_the_service", stage=stage, error=error.detail, hint=error.hint)
        self._by_stage[stage] = error
        self._metrics.refused.labels(component=error.component).set(1)

    def cleared(self, stage: str) -> None:
        error = self._by_stage.pop(stage, None)
        if error is not None:
            log.info(f"{error.component}_accepts_the_service_again", stage=stage)
            if all(other.component != error.component for other in self._by_stage.values()):
                self._metrics.refused.labels(component=error.component).set(0)

    def reason(self) -> str | None:
        """What refuses the service, for ``/readyz``; None when nothing does."""
        if not self._by_stage:
            return None
        return "; ".join(f"{e.component} refuses the service ({e.detail}); {e.hint}" for e in self._by_stage.values())


@dataclass(frozen=True)
class _Abandoned:
    """A unit given up on shutdown after a failure: not finished, not committed."""


class Stage(Generic[In, Out]):
    """One stage: ``work`` applied to one unit at a time, with the shared retry rule."""

    def __init__(self, name: str, work: Callable[[In], Awaitable[Out]], *, metrics: Metrics, refusals: Refusals,
                 stopping: Callable[[], bool], clock: Clock = SYSTEM_CLOCK,
                 retry_first_s: float = RETRY_FIRST_S, retry_cap_s: float = RETRY_CAP_S) -> None:
        self.name = name
        self._work = work
        self._metrics = metrics
        self._refusals = refusals
        self._stopping = stopping
        self._clock = clock
        self._retry = (retry_first_s, retry_cap_s)
        self._task: asyncio.Task[Out | _Abandoned] | None = None

    @property
    def has_room(self) -> bool:
        return self._task is None

    @property
    def in_flight(self) -> asyncio.Task[Out | _Abandoned] | None:
        """The task of the unit in flight (to wait on), if one runs."""
        return self._task if self._task is not None and not self._task.done() else None

    def submit(self, unit: In, **context: object) -> None:
        assert self._task is None, f"{self.name}: submit while a unit is held"
        self._task = asyncio.create_task(self._until_done(unit, context), name=f"evaljoin-{self.name}")

    def check(self) -> None:
        """Raise now what ended the unit for good, if it failed, without taking a finished unit."""
        task = self._task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            self.poll()

    def poll(self) -> Out | None:
        task = self._task
        if task is None or not task.done():
            return None
        self._task = None
        if task.cancelled():
            log.warning(f"{self.name}_abandoned")  # revoked or shutting down: Kafka delivers it again
            return None
        outcome = task.result()  # raises what ended the unit for good
        return None if isinstance(outcome, _Abandoned) else outcome

    async def join(self, deadline: float) -> None:
        task = self.in_flight
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - self._clock.monotonic()))
        if not done:
            log.warning(f"{self.name}_cancelled_at_deadline")
            await cancel_and_wait(task)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            await cancel_and_wait(self._task)  # leaving on an error: its offsets stay uncommitted

    async def _until_done(self, unit: In, context: dict[str, object]) -> Out | _Abandoned:
        backoff = Backoff(*self._retry)
        while True:
            try:
                outcome = await self._work(unit)
            except DependencyError as exc:
                if not exc.retriable and not isinstance(exc, ServiceRefused):
                    raise
                if isinstance(exc, ServiceRefused):
                    self._refusals.refused(self.name, exc)
                if self._stopping():
                    log.warning(f"{self.name}_abandoned_on_shutdown", error=str(exc), **context)
                    return _Abandoned()
                delay = backoff.next()
                log.warning(f"{self.name}_retry", error=str(exc), retry_in_s=round(delay, 2), **context)
                self._metrics.batch_retries.inc()
                await asyncio.sleep(delay)
                continue
            self._refusals.cleared(self.name)
            return outcome
