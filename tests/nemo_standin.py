"""A local stand-in of NeMo Evaluator's v1 evaluation API, for driving the real ``nemo-microservices`` client.

Written from the documented shapes: targets and configs are created under ``namespace/name`` (409
when one exists, 404 when one is read that does not), with stored API keys echoed back as
``******``; a job created for a config and a target moves through a scripted list of statuses, one
step per ``GET /v1/evaluation/jobs/{id}``; ``/status`` gives progress, ``/results`` the aggregates
(``tasks.<task>.metrics.<metric>.scores.<score>.value``) and ``/download-results`` a zip of the
job's output directory. Validation errors answer 422 in FastAPI's shape, including the offending
input, as the real service does. Faults (any status, for the next N requests matching a method and
a path pattern) can be injected. It listens on 127.0.0.1 on a free port, in a thread.
"""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from localenv.ports import free_port

MASK = "******"
COMPLETED_AT = "2025-11-20T10:00:00"


@dataclass
class Fault:
    method: str
    path_pattern: str
    status: int
    remaining: int
    body: Any


@dataclass
class Job:
    id: str
    config: dict[str, Any]
    target: dict[str, Any]
    namespace: str
    script: list[str]
    step: int = 0
    failure_message: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.script[min(self.step, len(self.script) - 1)]

    def details(self) -> dict[str, Any]:
        done = self.status == "completed"
        progress = 100.0 if done else (0.0 if self.status in ("created", "pending") else 50.0)
        message = self.failure_message if self.status == "failed" else f"job is {self.status}"
        return {"message": message, "progress": progress, "samples_processed": 3 if done else 1,
                "task_status": {}}

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "namespace": self.namespace, "config": self.config, "target": self.target,
                "status": self.status, "status_details": self.details(), "created_at": "2025-11-20T09:00:00",
                "updated_at": COMPLETED_AT if self.status == "completed" else "2025-11-20T09:30:00"}


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: MASK if k == "api_key" and v else _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def _nested_endpoint(value: Any, loc: list[str]) -> list[str] | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "api_endpoint" and isinstance(item, dict) and "api_endpoint" in item:
                return [*loc, key, "api_endpoint"]
            found = _nested_endpoint(item, [*loc, key])
            if found:
                return found
    return None


class NemoEvaluatorStandIn:
    """Context manager running the stand-in; inspect ``requests`` and state, inject ``fail_next``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.targets: dict[tuple[str, str], dict[str, Any]] = {}
        self.configs: dict[tuple[str, str], dict[str, Any]] = {}
        self.jobs: dict[str, Job] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.faults: list[Fault] = []
        self.job_script = ["created", "pending", "running", "running", "completed"]
        self.failure_message = ""
        self.results: dict[str, Any] = {}
        self.files: dict[str, bytes] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, method: str, path_pattern: str, status: int, *, count: int = 1, body: Any = None) -> None:
        """Answer the next ``count`` requests of ``method`` whose path matches ``path_pattern`` (re.search)."""
        with self._lock:
            self.faults.append(Fault(method, path_pattern, status, count, body or {"detail": f"injected {status}"}))

    def add_target(self, target: dict[str, Any]) -> None:
        """A target that already exists, as if created earlier."""
        with self._lock:
            self._store(self.targets, "eval-target", target)

    def paths(self, method: str | None = None) -> list[str]:
        with self._lock:
            return [path for m, path, _ in self.requests if method is None or m == method]

    def __enter__(self) -> NemoEvaluatorStandIn:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, payload, content_type = stand_in.handle(self.command, self.path.split("?")[0], body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="nemo-standin",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # --- the API ------------------------------------------------------------------------------------

    def _store(self, table: dict[tuple[str, str], dict[str, Any]], prefix: str, body: dict[str, Any]) -> dict[str, Any]:
        entity: dict[str, Any] = _mask(dict(body))
        entity.setdefault("namespace", "default")
        entity["id"] = f"{prefix}-{uuid.uuid4().hex[:16]}"
        entity["created_at"] = entity["updated_at"] = "2025-11-20T08:00:00"
        entity.setdefault("name", entity["id"])
        entity.setdefault("custom_fields", {})
        table[(entity["namespace"], entity["name"])] = entity
        return entity

    def _create(self, table: dict[tuple[str, str], dict[str, Any]], prefix: str, kind: str,
                body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            return 422, {"detail": [{"type": "missing", "loc": ["body", "type"], "msg": "Field required",
                                     "input": body}]}
        nested = _nested_endpoint(body, ["body"])
        if nested:
            return 422, {"detail": [{"type": "extra_forbidden", "loc": nested,
                                     "msg": "Extra inputs are not permitted", "input": body}]}
        key = (body.get("namespace", "default"), body.get("name", ""))
        if key in table:
            return 409, {"detail": f"{kind} {key[0]}/{key[1]} already exists"}
        return 200, self._store(table, prefix, body)

    def _resolve(self, table: dict[tuple[str, str], dict[str, Any]], ref: Any) -> dict[str, Any] | None:
        if isinstance(ref, dict):
            return ref
        if isinstance(ref, str) and "/" in ref:
            namespace, name = ref.split("/", 1)
            return table.get((namespace, name))
        return None

    def _zip(self, files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return buffer.getvalue()

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any, str]:
        with self._lock:
            self.requests.append((method, path, body))
            for fault in self.faults:
                if fault.remaining > 0 and fault.method == method and re.search(fault.path_pattern, path):
                    fault.remaining -= 1
                    return fault.status, fault.body, "application/json"
            status, payload = self._route(method, path, body)
        content_type = "application/zip" if isinstance(payload, bytes) else "application/json"
        return status, payload, content_type

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        for kind, table, prefix in (("targets", self.targets, "eval-target"), ("configs", self.configs, "eval-config")):
            if path == f"/v1/evaluation/{kind}" and method == "POST":
                return self._create(table, prefix, kind[:-1], body)
            match = re.fullmatch(rf"/v1/evaluation/{kind}/([^/]+)/([^/]+)", path)
            if match and method == "GET":
                found = table.get((match[1], match[2]))
                return (200, found) if found else (404, {"detail": f"{kind[:-1]} {match[1]}/{match[2]} not found"})
        if path == "/v1/evaluation/jobs" and method == "POST":
            return self._create_job(body)
        match = re.fullmatch(r"/v1/evaluation/jobs/([^/]+)(/[a-z-]+)?", path)
        if match and method == "GET":
            job = self.jobs.get(match[1])
            if job is None:
                return 404, {"detail": f"job {match[1]} not found"}
            if match[2] is None:
                job.step += 1
                return 200, job.body()
            if match[2] == "/status":
                return 200, job.details()
            if match[2] == "/results":
                return 200, {"id": f"evaluation_result-{job.id}", "job": job.id, **job.results}
            if match[2] == "/download-results":
                return 200, self._zip(job.files)
        return 404, {"detail": "Not Found"}

    def _create_job(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or "config" not in body or "target" not in body:
            return 422, {"detail": [{"type": "missing", "loc": ["body"], "msg": "config and target are required"}]}
        target = self._resolve(self.targets, body["target"])
        if target is None:
            return 404, {"detail": f"target {body['target']} not found"}
        config = self._resolve(self.configs, body["config"])
        if config is None:
            return 404, {"detail": f"config {body['config']} not found"}
        job = Job(id=f"eval-{uuid.uuid4().hex[:20]}", config=config, target=target,
                  namespace=body.get("namespace", "default"), script=list(self.job_script),
                  failure_message=self.failure_message, results=dict(self.results), files=dict(self.files))
        self.jobs[job.id] = job
        return 200, job.body()
