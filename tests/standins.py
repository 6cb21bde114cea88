"""Small HTTP stand-ins for the app-side tests: an OpenAI-compatible LLM and an LLM Observability recorder.

Both serve from a daemon thread on 127.0.0.1 on a free port and are context managers: the test
that starts one stops it.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from localenv.ports import free_port

FIXED_COMPLETION = "Flour, sugar, eggs, butter and milk."
LLMOBS_SPAN_PATH = "/api/v2/llmobs"  # ddtrace 4.16: LLMObsSpanWriter.ENDPOINT in agentless mode


@dataclass(frozen=True)
class Recorded:
    """One request: path without query, headers, body (gunzipped if it was gzip), parsed JSON or None."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: _StandIn, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.owner = owner


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_GET(self) -> None:
        self._handle("GET")

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        request = Recorded(method, urlsplit(self.path).path, dict(self.headers.items()), body, parsed)
        status, answer = self.server.owner._answer(request)
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging."""


class _StandIn:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def __enter__(self) -> _StandIn:
        self._server = _Server(self, free_port())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def _answer(self, request: Recorded) -> tuple[int, Any]:
        with self._lock:
            self._requests.append(request)
        return self.respond(request)

    def respond(self, request: Recorded) -> tuple[int, Any]:
        raise NotImplementedError


class FakeOpenAI(_StandIn):
    """Answers ``POST /v1/chat/completions`` with :data:`FIXED_COMPLETION` in OpenAI's response shape."""

    def __enter__(self) -> FakeOpenAI:
        super().__enter__()
        return self

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def respond(self, request: Recorded) -> tuple[int, Any]:
        if (request.method, request.path) != ("POST", "/v1/chat/completions"):
            return 404, {"error": {"message": "not found", "type": "invalid_request_error"}}
        model = (request.json or {}).get("model", "unknown")
        return 200, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": FIXED_COMPLETION}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
        }


class LLMObsRecorder(_StandIn):
    """Accepts any request, answers 202 ``{}``, and keeps it: a stand-in for ``DD_LLMOBS_OVERRIDE_ORIGIN``."""

    def __enter__(self) -> LLMObsRecorder:
        super().__enter__()
        return self

    def respond(self, request: Recorded) -> tuple[int, Any]:
        return 202, {}

    def spans(self) -> list[dict[str, Any]]:
        """Every span event POSTed to the LLM Observability span endpoint, in arrival order."""
        found = []
        for request in self.requests:
            if request.path == LLMOBS_SPAN_PATH and isinstance(request.json, list):
                for envelope in request.json:
                    found.extend(envelope.get("spans", []))
        return found
