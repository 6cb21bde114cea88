"""The stop's last resort: a process that has not closed in time says what was stuck and exits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from structlog.testing import capture_logs

from consumer.service import EXIT_STUCK, StopDeadline

pytestmark = pytest.mark.unit


class Exits:
    """Stands in for ``os._exit``: keeps the code instead of ending the test process."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


def a_call_that_never_returns(seconds: float) -> None:
    time.sleep(seconds)  # blocks the event loop's thread, as a stuck library call would


async def test_a_blocked_event_loop_is_reported_and_the_process_exits() -> None:
    """Past the deadline, with the event loop blocked, the watcher logs the blocking call's stack and exits 4."""
    exits = Exits()
    guard = StopDeadline(0.1, exit_process=exits)

    async def waiting_task() -> None:
        await asyncio.Event().wait()

    waiter = asyncio.create_task(waiting_task(), name="waits-forever")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        guard.arm()
        a_call_that_never_returns(1.0)
        assert exits.called.wait(5)
    waiter.cancel()
    assert exits.codes == [EXIT_STUCK]
    (event,) = [e for e in logs if e["event"] == "stop_deadline_passed"]
    assert event["log_level"] == "error" and event["exit_code"] == EXIT_STUCK
    main = [stack for name, stack in event["threads"].items() if name.startswith("MainThread")]
    assert len(main) == 1 and "a_call_that_never_returns" in main[0]
    assert any("waiting_task" in line for line in event["tasks"]["waits-forever"])


async def test_a_stop_that_closes_in_time_disarms_it() -> None:
    """Disarmed before the deadline (the service closed), the watcher neither logs nor exits."""
    exits = Exits()
    guard = StopDeadline(0.2, exit_process=exits)
    with capture_logs() as logs:
        guard.arm()
        guard.arm()  # a second signal: still one deadline, from the first
        guard.disarm()
        await asyncio.sleep(0.4)
    assert exits.codes == [] and logs == []
    assert [t.name for t in threading.enumerate()].count("evaljoin-stop-deadline") == 0
