"""The health and metrics endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` on one small server.

* ``/healthz`` (liveness): 200 while the consume loop made progress within the liveness timeout.
  The loop keeps polling while a batch waits on a slow intake, so waiting is not a failure; a loop
  that stopped turning is.
* ``/readyz`` (readiness): 200 once the consumer has joined its group (it may hold no partition
  when there are more replicas than partitions; a later rebalance does not make it unready) and
  Redis answers PING within a second.
* ``/metrics``: the service's Prometheus registry.

A plain asyncio server: a handful of GET requests from probes and scrapers needs no framework.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.metrics import Metrics

log = structlog.get_logger(__name__)


REDIS_PING_TIMEOUT_S = 1.0  # a Redis slower than this to answer PING counts as not ready
REQUEST_READ_TIMEOUT_S = 5.0  # a probe that has not sent its request line and headers by then is dropped

class HealthServer:
    def __init__(self, *, host: str, port: int, metrics: Metrics, liveness_timeout_s: float,
                 last_progress: Callable[[], float], in_group: Callable[[], bool],
                 redis_ping: Callable[[], Awaitable[bool]],
                 not_ready_because: Callable[[], str | None] = lambda: None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._not_ready_because = not_ready_because
        self._clock = clock
        self._host = host
        self._last_progress = last_progress
        self._port = port
        self._metrics = metrics
        self._liveness_timeout_s = liveness_timeout_s
        self._in_group = in_group
        self._redis_ping = redis_ping
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> HealthServer:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("health_server_started", host=self._host, port=self.port)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def live(self) -> tuple[bool, dict[str, object]]:
        last = self._last_progress()
        age = self._clock.now_s() - last if last else None
        ok = age is not None and age <= self._liveness_timeout_s
        return ok, {"last_progress_age_s": None if age is None else round(age, 3)}

    async def ready(self) -> tuple[bool, dict[str, object]]:
        in_group = self._in_group()
        try:
            redis_ok = await asyncio.wait_for(self._redis_ping(), timeout=REDIS_PING_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure to answer means not ready
            redis_ok = False
        refused = self._not_ready_because()
        detail: dict[str, object] = {"in_group": in_group, "redis": redis_ok}
        if refused is not None:
            detail["refused"] = refused
        return in_group and redis_ok and refused is None, detail

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=REQUEST_READ_TIMEOUT_S)
            end_of_headers = (b"\r\n", b"\n", b"")
            while (await asyncio.wait_for(reader.readline(), timeout=REQUEST_READ_TIMEOUT_S)) not in end_of_headers:
                pass  # headers are not needed
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] != "GET":
                await _respond(writer, 405, b"method not allowed\n", "text/plain")
            elif path == "/metrics":
                await _respond(writer, 200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, detail = await (self.live() if path == "/healthz" else self.ready())
                body = orjson.dumps({"status": "ok" if ok else "unavailable", **detail}) + b"\n"
                await _respond(writer, 200 if ok else 503, body, "application/json")
            else:
                await _respond(writer, 404, b"not found\n", "text/plain")
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    writer.write(head + body)
    await writer.drain()
