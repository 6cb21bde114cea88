"""``stop_within``: a library's stop() that leaks a CancelledError of its own does not stop the service's close.

aiokafka 0.14's ``Fetcher.close`` (inside ``AIOKafkaConsumer.stop``) cancels its pending fetch tasks and then
awaits each without suppressing the CancelledError. A fetch task is pending while a broker is unreachable
(it waits out its retry backoff), so a SIGTERM during a broker outage made ``consumer.stop()`` raise
CancelledError, and the process exited 1 instead of 0 (the chaos run, scenario m, seed 463828335).
"""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from consumer.aio import stop_within

pytestmark = pytest.mark.unit


async def test_a_cancelled_error_leaking_from_a_stop_is_logged_and_the_close_goes_on() -> None:
    async def stop_like_the_fetchers_close() -> None:
        pending = asyncio.create_task(asyncio.sleep(30))  # a fetch request waiting out its retry backoff
        await asyncio.sleep(0)
        pending.cancel()
        await pending  # as Fetcher.close does: the CancelledError is not suppressed

    with capture_logs() as logs:
        await stop_within(stop_like_the_fetchers_close, 5.0, "kafka consumer")
    (event,) = [e for e in logs if e["event"] == "stop_failed"]
    assert event["component"] == "kafka consumer" and event["log_level"] == "warning"
    current = asyncio.current_task()
    assert current is not None and not current.cancelling()


async def test_cancelling_the_caller_still_cancels_it() -> None:
    """Only the stop's own CancelledError is absorbed: a cancellation of the close itself goes through."""
    started = asyncio.Event()

    async def slow_stop() -> None:
        started.set()
        await asyncio.sleep(30)

    closing = asyncio.create_task(stop_within(slow_stop, 60.0, "kafka consumer"))
    await started.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
