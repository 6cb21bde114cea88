"""Datadog's APM test agent (``ddapm-test-agent``) as a local subprocess."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from localenv._process import LocalService, kill_process, log_tail, spawn, terminate_process
from localenv.ports import free_ports

__all__ = ["EVAL_METRIC_PATH_SUFFIX", "SESSION_TOKEN_HEADER", "TestAgent"]

EVAL_METRIC_PATH_SUFFIX = "/api/intake/llm-obs/v2/eval-metric"
"""Requests whose URL path ends with this are eval-metric submissions."""

SESSION_TOKEN_HEADER = "X-Datadog-Test-Session-Token"
"""Header a client sends so its requests belong to a test session (see :meth:`TestAgent.start_session`)."""


def _find_binary() -> str:
    found = shutil.which("ddapm-test-agent")
    if found is not None:
        return found
    beside_python = Path(sys.executable).with_name("ddapm-test-agent")
    if beside_python.exists():
        return str(beside_python)
    raise FileNotFoundError("'ddapm-test-agent' not found on PATH; install it with: pip install ddapm-test-agent")


class TestAgent(LocalService):
    """``ddapm-test-agent`` on 127.0.0.1 (or ``host``) with LLM Observability forwarding disabled.

    What callers may assume once :meth:`start` has returned:

    * :attr:`url` (``http://127.0.0.1:<port>``) is a Datadog agent
      look-alike: ``POST {url}/evp_proxy/v2/api/intake/llm-obs/v2/eval-metric``
      is answered ``200`` (text body ``200: OK``; the real intake answers
      202) and the request is kept for inspection; nothing is forwarded to
      Datadog. The agentless path ``/api/intake/llm-obs/v2/eval-metric`` is
      not served (404).
    * With ``uds_path``, the same agent also listens on that UNIX socket (as
      the Datadog Agent's ``/var/run/datadog/apm.socket``); :attr:`unix_url`
      names it. With ``host="::1"``, it listens on the IPv6 loopback and
      :attr:`url` brackets the address.
    * ``info`` replaces fields of its ``GET /info`` answer (e.g. ``endpoints``
      without ``/evp_proxy/v2/``, an Agent without the EVP proxy).
    * ``GET {url}/test/session/requests`` already answered once.
    * Its OTLP HTTP/gRPC listeners are on other free ports, on the same host.
    * Output goes to :attr:`log_path` in a temporary directory removed by
      :meth:`stop`.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, *, startup_timeout: float = 30.0, extra_args: Sequence[str] = (), host: str = "127.0.0.1",
                 uds_path: str | Path | None = None, info: Mapping[str, Any] | None = None) -> None:
        self._startup_timeout = startup_timeout
        self._extra_args = list(extra_args)
        self._host = host
        self._uds_path = str(uds_path) if uds_path is not None else None
        self._info = dict(info) if info is not None else None
        self._port: int | None = None
        self._work_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The agent's HTTP port. Only valid after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("TestAgent has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (``http://[::1]:<port>`` on IPv6): what a tracer would use as its agent URL."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def unix_url(self) -> str:
        """``unix://<socket>``: the agent URL over its UNIX socket (only with ``uds_path``)."""
        if self._uds_path is None:
            raise RuntimeError("TestAgent was not given a uds_path")
        return f"unix://{self._uds_path}"

    @property
    def log_path(self) -> Path:
        """The agent's stdout/stderr log."""
        if self._work_dir is None:
            raise RuntimeError("TestAgent has not been started")
        return self._work_dir / "test-agent.log"

    @property
    def running(self) -> bool:
        """True while the agent process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the agent on free ports and wait until it answers HTTP.

        Raises ``FileNotFoundError`` if the console script is missing, and
        ``RuntimeError``/``TimeoutError`` with the log tail if it exits or is
        not answering within ``startup_timeout`` (the process is stopped first).
        """
        if self.running:
            raise RuntimeError("TestAgent is already running")
        binary = _find_binary()
        self._port, otlp_http, otlp_grpc = free_ports(3)
        self._work_dir = Path(tempfile.mkdtemp(prefix="ddapm-test-agent-"))
        cmd = [
            binary,
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--otlp-http-port",
            str(otlp_http),
            "--otlp-grpc-port",
            str(otlp_grpc),
            "--disable-llmobs-data-forwarding",
            *(["--trace-uds-socket", self._uds_path] if self._uds_path is not None else []),
            *self._extra_args,
        ]
        env = {"DD_AGENT_EXTRA_INFO": json.dumps(self._info)} if self._info is not None else None
        self._proc = spawn(cmd, log_path=self.log_path, cwd=self._work_dir, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the agent (SIGTERM, up to 10 s, then SIGKILL) and remove its directory. Idempotent."""
        if self._proc is not None:
            terminate_process(self._proc, timeout=10.0)
            self._proc = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        self._port = None

    def kill(self) -> None:
        """SIGKILL the agent and wait for it; :meth:`stop` still cleans up afterwards."""
        if self._proc is not None:
            kill_process(self._proc)
            self._proc = None

    # -- session helpers --------------------------------------------------

    def start_session(self, token: str) -> None:
        """Begin a test session: later requests carrying ``token`` are grouped under it."""
        response = httpx.get(f"{self.url}/test/session/start", params={"test_session_token": token}, timeout=10)
        response.raise_for_status()

    def clear(self, token: str | None = None) -> None:
        """Forget the stored requests (of one session when ``token`` is given)."""
        params = {"test_session_token": token} if token is not None else {}
        response = httpx.get(f"{self.url}/test/session/clear", params=params, timeout=10)
        response.raise_for_status()

    def eval_metric_requests(self, token: str | None = None) -> list[dict[str, Any]]:
        """Return the eval-metric submissions the agent received, oldest first.

        Each item is ``{"url": str, "method": str, "headers": dict[str, str],
        "raw_body": bytes, "body": <parsed JSON or None if not JSON>}``;
        gzip bodies are decompressed before parsing. With ``token``, only the
        requests of that test session (plus ones without any token since the
        session started) are returned, as ``/test/session/requests`` defines
        it; an unknown token gives ``[]`` (the agent itself answers 400).
        """
        params = {"test_session_token": token} if token is not None else {}
        response = httpx.get(f"{self.url}/test/session/requests", params=params, timeout=10)
        if token is not None and response.status_code == 400 and "No session found" in response.text:
            return []
        response.raise_for_status()
        stored: list[dict[str, Any]] = response.json()
        result: list[dict[str, Any]] = []
        for item in reversed(stored):  # the agent lists the newest first
            if not urlsplit(str(item.get("url", ""))).path.endswith(EVAL_METRIC_PATH_SUFFIX):
                continue
            headers = {str(k): str(v) for k, v in dict(item.get("headers") or {}).items()}
            raw = base64.b64decode(str(item.get("body") or ""))
            result.append(
                {
                    "url": str(item.get("url")),
                    "method": str(item.get("method")),
                    "headers": headers,
                    "raw_body": raw,
                    "body": _decode_json(raw, headers),
                }
            )
        return result

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        probe = f"{self.url}/test/session/requests"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"ddapm-test-agent exited with code {code} during startup; "
                    f"tail of {self.log_path.name}:\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(probe, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"ddapm-test-agent not answering {probe} after {self._startup_timeout:.0f}s; "
                    f"tail of {self.log_path.name}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)


def _decode_json(raw: bytes, headers: dict[str, str]) -> Any:
    encoding = next((v for k, v in headers.items() if k.lower() == "content-encoding"), "")
    data = raw
    if encoding.strip().lower() == "gzip":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
