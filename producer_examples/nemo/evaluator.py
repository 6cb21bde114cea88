"""NeMo Evaluator's v1 evaluation API, through NVIDIA's ``nemo-microservices`` client.

:class:`Evaluator` does the steps of one run and says what each return means:

* :meth:`~Evaluator.ensure_target` / :meth:`~Evaluator.ensure_config`: the entity exists under its
  ``namespace/name`` when they return; created now, or, when the API answers 409, the stored one is
  reused (and a target whose stored endpoints differ from the file's is logged as a warning).
* :meth:`~Evaluator.create_job` and :meth:`~Evaluator.wait`: the job reached ``completed`` (or
  ``ready``); ``failed`` or ``cancelled`` raise :class:`JobFailed` with the API's message, and a job
  still unfinished after ``timeout_seconds`` raises :class:`JobTimeout`. Polls back off from
  ``poll_initial_seconds`` to at most ``poll_max_seconds`` (the service's :class:`~consumer.aio.Backoff`:
  doubling, capped, each wait jittered into half to all of its step).
* :meth:`~Evaluator.aggregates` (``GET .../results``): the job's aggregate scores, to log and print;
  they are not attached to spans. :meth:`~Evaluator.download_results`: the zip of the job's output
  directory, which holds the per-item files.

Retries: the client retries 408, 429, 5xx and connection errors (``max_retries``) with backoff. It
also retries 409, which for a create means "exists", so creates go through a copy of the client
without retries and are retried here on the same transient errors, not on 409. Client errors are
translated into :class:`EvaluatorError` once, here, with any known secret redacted from the
message, and without chaining the client's exception (its message holds the response body, which
may echo a key).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from nemo_microservices import (
    APIConnectionError,
    APIStatusError,
    AsyncNeMoMicroservices,
    ConflictError,
    NeMoMicroservicesError,
    NotFoundError,
)
from nemo_microservices.types.evaluation.evaluation_job import EvaluationJob
from nemo_microservices.types.evaluation_config import EvaluationConfig
from nemo_microservices.types.evaluation_result import EvaluationResult
from nemo_microservices.types.evaluation_target import EvaluationTarget
from nemo_microservices.types.group_result import GroupResult
from nemo_microservices.types.task_result import TaskResult

from consumer.aio import Backoff
from producer_examples.nemo.errors import EvaluatorError, JobFailed, JobTimeout
from producer_examples.nemo.targets import (
    EvaluationConfigSpec,
    Target,
    collect_secrets,
    endpoints,
    redact,
    redact_client_logs,
    request_body,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

SUCCEEDED = frozenset({"completed", "ready"})
FAILED = frozenset({"failed", "cancelled"})
_TRANSIENT = frozenset({408, 429})  # besides 5xx and connection errors
_DETAIL_CHARS = 500  # of an error answer's body, in an EvaluatorError

POLL_INITIAL_S = 2.0  # the first wait between polls of a job...
POLL_MAX_S = 30.0  # ...doubling up to this
JOB_TIMEOUT_S = 6 * 3600.0  # how long to wait for a job to finish
CREATE_ATTEMPTS = 5  # tries of a create that fails transiently
RETRY_INITIAL_S = 0.5  # the first wait before retrying a create...
RETRY_MAX_S = 8.0  # ...doubling up to this


@dataclass(frozen=True)
class Aggregate:
    """One aggregate score of a job: ``tasks.<task>.metrics.<metric>.scores.<score>.value`` (or groups)."""

    scope: str  # "tasks" or "groups"
    name: str
    metric: str
    score: str
    value: float

    def __str__(self) -> str:
        return f"{self.scope}.{self.name}.{self.metric}.{self.score} = {self.value}"


def _transient(exc: NeMoMicroservicesError) -> bool:
    if isinstance(exc, APIConnectionError):
        return True
    return isinstance(exc, APIStatusError) and (exc.status_code in _TRANSIENT or exc.status_code >= 500)


def timestamp_ms(value: datetime | None) -> int | None:
    """Milliseconds since the epoch; a naive time from the API is UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


class Evaluator:
    """One NeMo Evaluator, reached through an ``AsyncNeMoMicroservices`` client the caller owns."""

    def __init__(self, client: AsyncNeMoMicroservices, *, poll_initial_seconds: float = POLL_INITIAL_S,
                 poll_max_seconds: float = POLL_MAX_S, timeout_seconds: float = JOB_TIMEOUT_S,
                 create_attempts: int = CREATE_ATTEMPTS, retry_initial_seconds: float = RETRY_INITIAL_S,
                 retry_max_seconds: float = RETRY_MAX_S, secrets: Iterable[str] = ()) -> None:
        self._client = client
        self._once = client.with_options(max_retries=0)
        self._poll_initial = poll_initial_seconds
        self._poll_max = max(poll_max_seconds, poll_initial_seconds)
        self._timeout = timeout_seconds
        self._create_attempts = max(1, create_attempts)
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._secrets = list(secrets)
        redact_client_logs(self._secrets)  # the client logs request bodies at DEBUG

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Also redact these from error messages (the keys of targets and configs sent are added by themselves)."""
        self._secrets = sorted({*self._secrets, *secrets}, key=len, reverse=True)
        redact_client_logs(self._secrets)

    # --- errors ---------------------------------------------------------------------------------

    def _error(self, exc: NeMoMicroservicesError, doing: str) -> EvaluatorError:
        if isinstance(exc, APIStatusError):
            body = exc.body
            detail = body.get("detail", body) if isinstance(body, dict) else body
            text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
            text = redact(text, self._secrets)[:_DETAIL_CHARS]  # redacted before cut: no half key is left
            return EvaluatorError(f"{doing}: the evaluator answered {exc.status_code}: {text}", status=exc.status_code)
        if isinstance(exc, APIConnectionError):
            return EvaluatorError(redact(
                f"{doing}: could not reach the evaluator at {self._client.base_url} ({exc.message})", self._secrets))
        return EvaluatorError(redact(f"{doing}: {exc}", self._secrets))

    async def _call(self, doing: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except NeMoMicroservicesError as exc:
            raise self._error(exc, doing) from None

    async def _create_or_reuse(
        self, kind: str, spec: Target | EvaluationConfigSpec, create: Callable[..., Awaitable[T]],
        retrieve: Callable[..., Awaitable[T]],
    ) -> tuple[T, bool]:
        """(entity, created): ``spec`` sent to ``create`` or, on 409, the stored one read with ``retrieve``.

        The keys in ``spec`` are redacted from every message from now on. Transient errors are retried
        with the service's backoff.
        """
        self.add_secrets(collect_secrets(spec))
        body = request_body(spec)
        ref = spec.ref
        backoff = Backoff(self._retry_initial, self._retry_max)
        for attempt in range(1, self._create_attempts + 1):
            try:
                return await create(**body), True
            except ConflictError:
                try:
                    return await retrieve(spec.name, namespace=spec.namespace), False
                except NotFoundError:
                    raise EvaluatorError(
                        f"{kind} {ref}: creating it answered 409 (exists), but reading it answered 404", status=404
                    ) from None
                except NeMoMicroservicesError as exc:
                    raise self._error(exc, f"reading {kind} {ref}") from None
            except NeMoMicroservicesError as exc:
                if not _transient(exc) or attempt == self._create_attempts:
                    raise self._error(exc, f"creating {kind} {ref}") from None
                log.warning("nemo_create_retry", kind=kind, ref=ref, attempt=attempt,
                            status=getattr(exc, "status_code", None))
                await asyncio.sleep(backoff.next())
        raise AssertionError("unreachable")  # pragma: no cover

    # --- targets and configs --------------------------------------------------------------------

    async def ensure_target(self, target: Target) -> EvaluationTarget:
        """The target ``namespace/name``, created or, if it exists, reused."""
        stored, created = await self._create_or_reuse("target", target, self._once.evaluation.targets.create,
                                                      self._client.evaluation.targets.retrieve)
        if created:
            log.info("nemo_target_created", target=target.ref, type=target.type, id=stored.id)
        else:
            log.info("nemo_target_reused", target=target.ref, type=stored.type, id=stored.id)
            ours = endpoints(target.model_dump(mode="json"))
            theirs = endpoints(stored.model_dump(mode="json"))
            if stored.type != target.type or ours != theirs:
                log.warning("nemo_target_differs", target=target.ref, file_type=target.type, stored_type=stored.type,
                            file_endpoints=ours, stored_endpoints=theirs,
                            hint="the stored target is used; delete it or choose another name to use the file's")
        return stored

    async def ensure_config(self, config: EvaluationConfigSpec) -> EvaluationConfig:
        """The evaluation config ``namespace/name``, created or, if it exists, reused."""
        stored, created = await self._create_or_reuse("config", config, self._once.evaluation.configs.create,
                                                      self._client.evaluation.configs.retrieve)
        log.info("nemo_config_created" if created else "nemo_config_reused", config=config.ref, id=stored.id)
        return stored

    # --- jobs -----------------------------------------------------------------------------------

    async def create_job(self, *, config: str, target: str, namespace: str | None = None) -> EvaluationJob:
        """Start a job for ``config`` and ``target`` (each ``namespace/name``)."""
        extra: dict[str, Any] = {"namespace": namespace} if namespace else {}
        job = await self._call(f"creating a job for target {target} and config {config}",
                               lambda: self._client.evaluation.jobs.create(config=config, target=target, **extra))
        if not job.id:
            raise EvaluatorError("the evaluator created a job but gave no job id")
        log.info("nemo_job_created", job_id=job.id, target=target, config=config, status=job.status)
        return job

    async def job(self, job_id: str) -> EvaluationJob:
        return await self._call(f"reading job {job_id}", lambda: self._client.evaluation.jobs.retrieve(job_id))

    async def _progress(self, job_id: str) -> None:
        try:
            details = await self._client.evaluation.jobs.status(job_id)
        except NeMoMicroservicesError as exc:  # progress is informational: a failure here is not the job's
            log.info("nemo_job_progress_unavailable", job_id=job_id, error=str(self._error(exc, "status")))
            return
        log.info("nemo_job_progress", job_id=job_id, progress=details.progress,
                 samples_processed=details.samples_processed, message=details.message)

    async def _failure_message(self, job: EvaluationJob) -> str:
        assert job.id is not None
        try:
            details = await self._client.evaluation.jobs.status(job.id)
            message = details.message
        except NeMoMicroservicesError:
            message = None
        if not message and job.status_details is not None:
            message = job.status_details.message
        return redact(message or "no message given", self._secrets)

    async def wait(self, job_id: str) -> EvaluationJob:
        """Poll until the job succeeded; raise :class:`JobFailed` or :class:`JobTimeout` otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        polls = Backoff(self._poll_initial, self._poll_max)
        last: str | None = None
        while True:
            job = await self.job(job_id)
            status = job.status or "unknown"
            if status != last:
                log.info("nemo_job_status", job_id=job_id, status=status)
                last = status
            if status in SUCCEEDED:
                return job
            if status in FAILED:
                message = await self._failure_message(job)
                raise JobFailed(f"job {job_id} ended {status}: {message}", job_id=job_id, status=status)
            if status == "running":
                await self._progress(job_id)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise JobTimeout(
                    f"job {job_id} is still {status} after {self._timeout:g} s; it keeps running: resume with "
                    f"--job-id {job_id}", job_id=job_id, status=status,
                )
            await asyncio.sleep(min(polls.next(), remaining))

    async def aggregates(self, job_id: str) -> list[Aggregate]:
        """The job's aggregate scores (``GET /v1/evaluation/jobs/{id}/results``)."""
        result: EvaluationResult = await self._call(
            f"reading the results of job {job_id}", lambda: self._client.evaluation.jobs.results(job_id))
        scopes: list[tuple[str, Mapping[str, TaskResult | GroupResult]]] = [
            ("tasks", result.tasks or {}), ("groups", result.groups or {})]
        found: list[Aggregate] = []
        for scope, entries in scopes:
            for name, entry in sorted(entries.items()):
                for metric, metric_result in sorted((entry.metrics or {}).items()):
                    for score, value in sorted((metric_result.scores or {}).items()):
                        found.append(Aggregate(scope, name, metric, score, value.value))
        return found

    async def download_results(self, job_id: str) -> bytes:
        """The zip of the job's output directory (``GET /v1/evaluation/jobs/{id}/download-results``)."""
        async def fetch() -> bytes:
            response = await self._client.evaluation.jobs.download_results(job_id)
            return await response.read()

        data = await self._call(f"downloading the results of job {job_id}", fetch)
        log.info("nemo_results_downloaded", job_id=job_id, bytes=len(data))
        return data
