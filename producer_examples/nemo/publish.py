"""The two ways results reach the result topic: from a NeMo Evaluator job, or from a local run's files.

:func:`run_job` creates (or reuses) the target and config, starts a job (or resumes one by id),
waits for it, logs its aggregate scores, downloads its per-item files and maps them;
:func:`map_local_run` maps the per-item files of a local run's output directory, a file or a zip.
Both return the events without publishing them: :func:`publish` sends them through
:class:`~producer_examples.publisher.EventPublisher` and returns once the broker acknowledged all.
Mapping finishes (or fails) before the first event is sent, so a run is published whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import structlog
from aiokafka.errors import KafkaError
from nemo_microservices.types.evaluation.evaluation_job import EvaluationJob

from consumer.events import NemoResultEvent
from producer_examples.nemo.errors import InputError, MappingError, PublishError
from producer_examples.nemo.evaluator import Aggregate, Evaluator, timestamp_ms
from producer_examples.nemo.mapping import MappingResult, RunContext, config_groups, map_files, task_of
from producer_examples.nemo.readers import Format, ResultFile, scan_path, scan_zip
from producer_examples.nemo.targets import EvaluationConfigSpec, Target, evaluated_model, judge_model
from producer_examples.publisher import DeliveryError, EventPublisher

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """A finished job, its aggregate scores (not attached to spans), and its mapped per-item results."""

    job: EvaluationJob
    aggregates: list[Aggregate]
    mapping: MappingResult


def _ref(namespace: str | None, name: str | None) -> str | None:
    if not name:
        return None
    return f"{namespace}/{name}" if namespace else name


def context_for_job(job: EvaluationJob, base: RunContext) -> RunContext:
    """``base`` with the job's provenance: its id, config, target and their models, its finish time."""
    target = job.target.model_dump(mode="json", exclude_none=True)
    config = job.config.model_dump(mode="json", exclude_none=True)
    return replace(
        base,
        source_id=job.id or base.source_id,
        job_id=job.id,
        config=_ref(job.config.namespace, job.config.name) or job.config.id,
        target_type=job.target.type,
        target_name=_ref(job.target.namespace, job.target.name) or job.target.id,
        model=base.model or evaluated_model(target),
        judge=base.judge or judge_model(config),
        tasks=base.tasks or tuple(sorted(job.config.tasks or {})),
        task_groups=base.task_groups or tuple(config_groups(job.config.groups)),
        evaluated_at_ms=timestamp_ms(job.updated_at),
    )


async def run_job(evaluator: Evaluator, base: RunContext, *, fmt: Format | None = None, target: Target | None = None,
                  config: EvaluationConfigSpec | None = None, job_id: str | None = None) -> RunOutcome:
    """Run (or, with ``job_id``, resume) a job to completion and map its per-item results."""
    if job_id is None:
        if target is None or config is None:
            raise InputError("a target and a config are needed to start a job (or give the id of a job to resume)")
        await evaluator.ensure_target(target)
        await evaluator.ensure_config(config)
        created = await evaluator.create_job(config=config.ref, target=target.ref, namespace=target.namespace)
        assert created.id is not None
        job_id = created.id
    job = await evaluator.wait(job_id)
    aggregates = await evaluator.aggregates(job_id)
    for aggregate in aggregates:
        log.info("nemo_aggregate", job_id=job_id, scope=aggregate.scope, name=aggregate.name,
                 metric=aggregate.metric, score=aggregate.score, value=aggregate.value)
    scan = scan_zip(await evaluator.download_results(job_id), fmt)
    ctx = context_for_job(job, base)
    mapping = map_files(scan.files, ctx, scan.notes)
    mapping.report.notes.extend(aggregate_only_tasks(aggregates, ctx, scan.files))
    if not scan.files and not mapping.report.notes:
        kind = f"{fmt} " if fmt else ""
        raise MappingError(f"the results of job {job_id} hold no {kind}per-item result files")
    log.info("nemo_results_mapped", job_id=job_id, files=[f.path for f in scan.files], **mapping.report.as_dict())
    return RunOutcome(job, aggregates, mapping)


def aggregate_only_tasks(aggregates: list[Aggregate], ctx: RunContext, files: list[ResultFile]) -> list[str]:
    """A note for each task with aggregate scores but no per-item file: nothing of it can reach a span."""
    directories = len({PurePosixPath(f.path).parent for f in files})
    tasks = {task_of(f, ctx, directories) for f in files}
    if None in tasks:  # a file of no known task: it may be any task's
        return []
    in_paths = {part for f in files for part in PurePosixPath(f.path).parts}  # a task's directory: its output
    return [f"task {name}: aggregate scores only (the job's results hold no per-item file of it)"
            for name in sorted({a.name for a in aggregates if a.scope == "tasks"} - tasks - in_paths)]


def map_local_run(path: Path, fmt: Format | None, base: RunContext) -> MappingResult:
    """Map the per-item files (of ``fmt``, else of every format found) of a local run: a directory, a file, a zip."""
    scan = scan_path(path, fmt)
    mapping = map_files(scan.files, base, scan.notes)
    log.info("nemo_results_mapped", source=base.source_id, files=[f.path for f in scan.files],
             **mapping.report.as_dict())
    return mapping


async def publish(events: Iterable[NemoResultEvent], publisher: EventPublisher) -> int:
    """Send every event and wait until the broker acknowledged all of them. Returns how many were sent.

    Raises :class:`PublishError` if the broker refused or did not acknowledge some of them.
    """
    sent = 0
    try:
        for event in events:
            await publisher.publish_result(event)
            sent += 1
        await publisher.flush()
    except (KafkaError, DeliveryError) as exc:
        raise PublishError(f"publishing to {publisher.result_topic} failed after {sent} events: {exc!r}") from exc
    log.info("nemo_results_published", events=sent, topic=publisher.result_topic)
    return sent
