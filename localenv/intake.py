"""A fake Datadog LLM Observability eval-metric intake with fault injection."""

from __future__ import annotations

import copy
import gzip
import json
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import urlsplit

from localenv._process import LocalService

__all__ = ["AGENTLESS_PATH", "EVP_PROXY_PATH", "FakeIntake", "IntakeRequest"]

AGENTLESS_PATH = "/api/intake/llm-obs/v2/eval-metric"
"""Path of the agentless endpoint (direct to Datadog; authenticated by ``DD-API-KEY``)."""

EVP_PROXY_PATH = "/evp_proxy/v2/api/intake/llm-obs/v2/eval-metric"
"""Path of the same endpoint behind the Datadog agent's EVP proxy (``X-Datadog-EVP-Subdomain``)."""

ECHO_PREFIX = "intake received: "
"""Prefix of each line written to ``echo``."""


@dataclass(frozen=True)
class IntakeRequest:
    """One request the intake answered, in arrival order.

    ``path`` excludes any query string; ``headers`` keeps the last value of
    each header under its name as sent; ``body`` is the raw body as sent
    (still gzip-compressed if it was); ``status`` is the status answered;
    ``metrics`` is the ``data.attributes.metrics`` list when the body had the
    expected shape (also for requests answered with an error), else ``[]``.
    Instances are not hashable (they hold dicts and lists).
    """

    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    metrics: list[dict[str, Any]]


class _BadPayload(ValueError):
    pass


def _parse_metrics(body: bytes, content_encoding: str) -> list[dict[str, Any]]:
    """Return ``data.attributes.metrics`` or raise ``_BadPayload`` explaining what is wrong."""
    if content_encoding.strip().lower() == "gzip":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise _BadPayload(f"body is not valid gzip: {exc}") from exc
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadPayload(f"body is not valid JSON: {exc}") from exc
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        raise _BadPayload("missing object 'data'")
    if data.get("type") != "evaluation_metric":
        raise _BadPayload("'data.type' must be 'evaluation_metric'")
    attributes = data.get("attributes")
    if not isinstance(attributes, dict):
        raise _BadPayload("missing object 'data.attributes'")
    metrics = attributes.get("metrics")
    if not isinstance(metrics, list):
        raise _BadPayload("'data.attributes.metrics' must be a list")
    for index, metric in enumerate(metrics):
        if not isinstance(metric, dict):
            raise _BadPayload(f"'data.attributes.metrics[{index}]' must be an object")
    return metrics


def _error_body(status: int, detail: str) -> bytes:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return json.dumps({"errors": [{"status": str(status), "title": title, "detail": detail}]}).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, intake: FakeIntake) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.intake = intake

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client resetting its connection (it timed out, the network cut it) is routine: no traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.server.intake._handle(self, "POST")

    def do_GET(self) -> None:
        self.server.intake._handle(self, "GET")

    def do_PUT(self) -> None:
        self.server.intake._handle(self, "PUT")

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr logging."""


class FakeIntake(LocalService):
    """An in-process HTTP stand-in for Datadog's eval-metric intake on 127.0.0.1.

    Accepts ``POST`` on :data:`AGENTLESS_PATH` and :data:`EVP_PROXY_PATH`
    with a body ``{"data": {"type": "evaluation_metric", "attributes":
    {"metrics": [...]}}}`` (optionally ``Content-Encoding: gzip``) and
    answers ``202`` with ``{}``. Other paths get 404, other methods on the
    intake paths 405, a body of the wrong shape 400 with a JSON error.

    What callers may assume:

    * Every request is recorded (see :class:`IntakeRequest`) *before* its
      answer is sent, so once a client has seen a 2xx the metrics are
      already in :meth:`accepted_metrics`.
    * :meth:`delay` applies to every answer. The other fault controls act on
      POSTs to the two intake paths only, in arrival order, and may be
      changed while serving. For one request the order is: delay, then a
      :meth:`hang_next` hang, then a :meth:`fail_next` failure, then body
      validation, then :meth:`reject_labels`. A hung request that is not
      also failed is recorded and answered 202 after the hang even if the
      client gave up.
    * All methods are thread-safe.
    """

    def __init__(self, *, echo: TextIO | None = None) -> None:
        self._echo = echo
        self._lock = threading.Condition()
        self._requests: list[IntakeRequest] = []
        self._fail_remaining = 0
        self._fail_status = 500
        self._fail_retry_after: float | None = None
        self._hang_remaining = 0
        self._hang_seconds = 0.0
        self._rejected_labels: frozenset[str] = frozenset()
        self._delay = 0.0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- addresses --------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port. Only valid after :meth:`start`."""
        if self._server is None:
            raise RuntimeError("FakeIntake has not been started")
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:<port>`` (use as an agent URL for the EVP proxy path)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The agentless endpoint: :attr:`origin` + :data:`AGENTLESS_PATH`."""
        return self.origin + AGENTLESS_PATH

    @property
    def evp_url(self) -> str:
        """The agent-proxy endpoint: :attr:`origin` + :data:`EVP_PROXY_PATH`."""
        return self.origin + EVP_PROXY_PATH

    @property
    def running(self) -> bool:
        """True while the server thread is serving."""
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Bind a free port on 127.0.0.1 and serve from a daemon thread; returns once listening."""
        if self._server is not None:
            raise RuntimeError("FakeIntake is already running")
        server = _Server(self)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-intake", daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread. Idempotent.

        Requests still sleeping in a hang or delay finish in their own daemon
        threads; recorded requests are kept.
        """
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    # -- fault controls ---------------------------------------------------

    def fail_next(self, count: int, status: int = 500, retry_after: float | None = None) -> None:
        """Answer the next ``count`` intake requests with ``status`` (and ``Retry-After`` if given).

        Replaces any pending failures. The failed requests are recorded with
        that status and so never count as accepted.
        """
        with self._lock:
            self._fail_remaining = count
            self._fail_status = status
            self._fail_retry_after = retry_after

    def hang_next(self, count: int, seconds: float) -> None:
        """Sleep ``seconds`` before handling each of the next ``count`` intake requests.

        Replaces any pending hangs. After the sleep the request is handled
        normally (recorded and usually answered 202), modelling a server that
        received the data but answered too late for the client.
        """
        with self._lock:
            self._hang_remaining = count
            self._hang_seconds = seconds

    def reject_labels(self, labels: set[str]) -> None:
        """Answer 400 to any request containing a metric whose ``label`` is in ``labels``.

        The whole request is rejected (none of its metrics are accepted) and
        the JSON error names the offending label. Replaces the previous set;
        an empty set rejects nothing.
        """
        with self._lock:
            self._rejected_labels = frozenset(labels)

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency before every answer (0 to turn off)."""
        with self._lock:
            self._delay = seconds

    def reset_faults(self) -> None:
        """Cancel pending failures and hangs, rejected labels and delay."""
        with self._lock:
            self._fail_remaining = 0
            self._hang_remaining = 0
            self._rejected_labels = frozenset()
            self._delay = 0.0

    def clear(self) -> None:
        """Forget every recorded request (fault settings are kept)."""
        with self._lock:
            self._requests.clear()

    # -- inspection -------------------------------------------------------

    @property
    def requests(self) -> list[IntakeRequest]:
        """A copy of the recorded requests, in the order they were answered."""
        with self._lock:
            return list(self._requests)

    def accepted_metrics(self) -> list[dict[str, Any]]:
        """Deep copies of the metrics of every request answered 2xx, in order."""
        with self._lock:
            return self._accepted_locked()

    def wait_for_metrics(self, n: int, timeout: float) -> list[dict[str, Any]]:
        """Wait until at least ``n`` metrics have been accepted and return all of them.

        Raises ``TimeoutError`` saying how many had arrived if ``timeout``
        seconds pass first.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                accepted = self._accepted_locked()
                if len(accepted) >= n:
                    return accepted
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"expected at least {n} accepted metrics within {timeout}s, "
                        f"got {len(accepted)} (from {len(self._requests)} requests)"
                    )
                self._lock.wait(remaining)

    def _accepted_locked(self) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(metric)
            for request in self._requests
            if 200 <= request.status < 300
            for metric in request.metrics
        ]

    # -- request handling (server threads) ----------------------------------

    def _handle(self, handler: _Handler, method: str) -> None:
        body = _read_body(handler)
        path = urlsplit(handler.path).path
        headers = {name: value for name, value in handler.headers.items()}

        with self._lock:
            delay = self._delay
        if delay > 0:
            time.sleep(delay)

        if path not in (AGENTLESS_PATH, EVP_PROXY_PATH):
            self._answer(handler, path, headers, body, 404, [], _error_body(404, "not found"))
            return
        if method != "POST":
            self._answer(handler, path, headers, body, 405, [], _error_body(405, "method not allowed"))
            return

        with self._lock:
            hang = self._hang_seconds if self._hang_remaining > 0 else 0.0
            self._hang_remaining = max(0, self._hang_remaining - 1)
        if hang > 0:
            time.sleep(hang)

        try:
            metrics = _parse_metrics(body, handler.headers.get("Content-Encoding", ""))
            problem = ""
        except _BadPayload as exc:
            metrics, problem = [], str(exc)

        with self._lock:
            fail = self._fail_remaining > 0
            if fail:
                self._fail_remaining -= 1
            fail_status, retry_after = self._fail_status, self._fail_retry_after
            rejected = self._rejected_labels

        if fail:
            extra = {"Retry-After": _format_seconds(retry_after)} if retry_after is not None else {}
            error = _error_body(fail_status, "injected failure")
            self._answer(handler, path, headers, body, fail_status, metrics, error, extra)
            return
        if problem:
            self._answer(handler, path, headers, body, 400, [], _error_body(400, problem))
            return
        for metric in metrics:
            label = metric.get("label")
            if isinstance(label, str) and label in rejected:
                detail = f"invalid evaluation metric label: {label!r}"
                self._answer(handler, path, headers, body, 400, metrics, _error_body(400, detail))
                return
        self._answer(handler, path, headers, body, 202, metrics, b"{}")

    def _answer(
        self,
        handler: _Handler,
        path: str,
        headers: dict[str, str],
        body: bytes,
        status: int,
        metrics: list[dict[str, Any]],
        response: bytes,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        record = IntakeRequest(path=path, headers=headers, body=body, status=status, metrics=metrics)
        with self._lock:
            self._requests.append(record)
            if 200 <= status < 300 and self._echo is not None:
                for metric in metrics:
                    self._echo.write(ECHO_PREFIX + json.dumps(metric, sort_keys=True) + "\n")
                self._echo.flush()
            self._lock.notify_all()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(response)))
            for name, value in (extra_headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(response)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. timed out during a hang); the request stays recorded


def _read_body(handler: _Handler) -> bytes:
    """Read the request body, honouring ``Content-Length`` or chunked transfer encoding."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size_line = handler.rfile.readline(1024)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline(1024)  # CRLF after each chunk
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length > 0 else b""


def _format_seconds(seconds: float) -> str:
    """Retry-After is an integer number of seconds on the wire; keep fractions if asked for them."""
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)
