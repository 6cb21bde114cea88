"""SIGTERM and SIGINT from the first moment: ``python -m consumer`` stopped while still starting exits 0 promptly."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.config import Settings

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).parent.parent
PROMPTLY_S = 5.0  # a pod's default grace period is 30 s; a start cut short must take far less


@pytest.fixture
def silent_broker() -> Iterator[socket.socket]:
    """A port that accepts TCP connections (the kernel completes them) and never answers a byte."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener


def service_env(bootstrap: str) -> dict[str, str]:
    """The environment of a service whose Kafka is ``bootstrap``: nothing else set that a start would reach."""
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in Settings.model_fields and name != "EVALJOIN_SECRETS_DIR"}
    return {**env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "HEALTH_PORT": "0", "LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1"}


async def wait_exit(process: asyncio.subprocess.Process, within: float) -> int | None:
    try:
        return await asyncio.wait_for(process.wait(), timeout=within)
    except TimeoutError:
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_connecting_to_kafka_exits_0_promptly(sig: signal.Signals,
                                                                   silent_broker: socket.socket) -> None:
    """Stuck connecting to a broker that never answers (aiokafka waits 40 s), the service exits 0 on a signal."""
    port = silent_broker.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", cwd=REPO_ROOT, env=service_env(f"127.0.0.1:{port}"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        # The service is inside its start once its Kafka client has connected: a connection waits to be accepted.
        deadline = time.monotonic() + 30
        while not select.select([silent_broker], [], [], 0)[0]:
            assert process.returncode is None, "the service exited before connecting to Kafka"
            assert time.monotonic() < deadline, "the service never connected to the silent broker"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # well into the start: the broker's answer is awaited
        process.send_signal(sig)
        signalled = time.monotonic()
        code = await wait_exit(process, PROMPTLY_S)
        took = time.monotonic() - signalled
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stdout is not None
    output = (await process.stdout.read()).decode()
    assert code == 0, f"exit {code} ({took:.1f}s after {sig.name}):\n{output}"
    assert '"event": "stop_requested_while_starting"' in output and sig.name in output, output
    assert "Traceback" not in output and "Unclosed" not in output, output


async def test_a_signal_during_the_imports_exits_0() -> None:
    """A signal before the service has even loaded its modules (about a second of imports) exits 0 too."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "importtime", "-m", "consumer", cwd=REPO_ROOT, env=service_env("127.0.0.1:1"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    seen: list[str] = []
    try:
        # -X importtime reports each module once it is imported: aiokafka comes with consumer.cli, after the
        # stop signals are handled and long before the event loop runs.
        while not seen or seen[-1].rpartition("|")[2].strip() != "aiokafka":
            line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
            assert line, "the process ended before importing aiokafka:\n" + "".join(seen[-30:])
            seen.append(line.decode())
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), timeout=PROMPTLY_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
