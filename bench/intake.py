"""An eval-metric intake stand-in that accepts at line rate.

A minimal HTTP/1.1 server (keep-alive, ``Content-Length`` bodies) on its own event loop in a thread:
it answers 202 to every POST without parsing the JSON, and records when each body arrived and the
span ids it names (a regular expression over the bytes), which is all the benchmark needs for
counts and join latency. It can also keep the first few bodies whole, for a check of their content.
``localenv.intake.FakeIntake`` is the faithful stand-in with fault injection; this one is for speed.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from types import TracebackType

_SPAN_ID = re.compile(rb'"span_id":"([0-9]+)"')
_RESPONSE = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
START_TIMEOUT_S = 10.0  # for the server thread to listen
STOP_TIMEOUT_S = 10.0  # for the server thread to end after its loop is stopped


class LineRateIntake:
    """``with LineRateIntake() as intake:`` then point ``DD_LLMOBS_OVERRIDE_ORIGIN`` at ``intake.origin``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.arrivals: list[tuple[float, list[bytes]]] = []  # (time.time(), span ids) per request
        self.evaluations = 0
        self.requests = 0
        self.keep_bodies = 0  # keep the next bodies, up to this many, for take_bodies()
        self._bodies: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LineRateIntake:
        self._thread = threading.Thread(target=self._run, name="bench-intake", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("the intake stand-in did not start")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                now = time.time()
                ids = _SPAN_ID.findall(body)
                with self._lock:
                    self.arrivals.append((now, ids))
                    self.evaluations += len(ids)
                    self.requests += 1
                    if len(self._bodies) < self.keep_bodies:
                        self._bodies.append(body)
                writer.write(_RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.evaluations, self.requests

    def take_bodies(self) -> list[bytes]:
        """The bodies kept since the last call (at most ``keep_bodies``)."""
        with self._lock:
            out, self._bodies = self._bodies, []
            return out

    def take_arrivals(self) -> list[tuple[float, list[bytes]]]:
        with self._lock:
            out, self.arrivals = self.arrivals, []
            return out
