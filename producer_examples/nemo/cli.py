"""Command line: ``python -m producer_examples.nemo run|from-files ...``.

``run`` drives a NeMo Evaluator job through the ``nemo-microservices`` client and publishes its
per-item results; ``from-files`` publishes the per-item results of a local run. Both print the
mapping summary (what was sent, what was not and why) on stdout; ``run`` first prints the job's
aggregate scores, which are not attached to spans. Logs go to stderr, with every API key found in
the target and config files redacted.

Exit codes: 0 done, 1 the evaluator failed (job failed or cancelled, timeout, API error) or Kafka
did not acknowledge the events, 2 invalid input (a target, config or per-item file, or the Kafka
variables), nothing published.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from aiokafka.errors import KafkaError
from nemo_microservices import AsyncNeMoMicroservices

from consumer.judge import JUDGE_LABEL
from consumer.logs import configure_logging
from producer_examples.nemo.errors import InputError, NemoPublisherError, PublishError
from producer_examples.nemo.evaluator import JOB_TIMEOUT_S, POLL_INITIAL_S, POLL_MAX_S, Evaluator
from producer_examples.nemo.mapping import MappingResult, RunContext
from producer_examples.nemo.publish import map_local_run, publish, run_job
from producer_examples.nemo.readers import DEFAULT_ID_COLUMN, FORMATS, Format
from producer_examples.nemo.targets import (
    EvaluationConfigSpec,
    Target,
    collect_secrets,
    load_config,
    load_target,
    redact_client_logs,
)
from producer_examples.publisher import (
    DeliveryError,
    EventPublisher,
    KafkaConfigError,
    add_kafka_arguments,
    kafka_settings_from,
)

MAX_RETRIES = 5  # the client's retries of a request that failed transiently
REQUEST_TIMEOUT_S = 60.0  # for one request to the evaluator


def _common(parser: argparse.ArgumentParser) -> None:
    defaults = ", ".join(f"{fmt}: {column}" for fmt, column in DEFAULT_ID_COLUMN.items())
    group = parser.add_argument_group("mapping")
    group.add_argument("--ml-app", default=os.environ.get("DEFAULT_ML_APP"),
                       help="the ml_app of the spans the results join (default: $DEFAULT_ML_APP)")
    group.add_argument("--id-column", help=f"the column holding each item's join key; dotted names walk into "
                                           f"objects (default per format: {defaults})")
    group.add_argument("--task", help="the task name for the task:<task> tag (default: from the config, the file's "
                                      "name or its directory; see the README)")
    group.add_argument("--group", help="the group for the group:<group> tag (default: the task's group in the "
                                       "config, outer/inner when nested)")
    group.add_argument("--label-prefix", default="", help="put in front of every label, e.g. nemo_")
    group.add_argument("--judge-label", default=JUDGE_LABEL, help="label of a judge's score (default: %(default)s)")
    group.add_argument("--run-id", help="the run the evaluated answers belong to: the run_id the app gave their "
                                        "span-context events (default: none, or a judge line's own run_id)")
    group.add_argument("--judged-model", default=os.environ.get("JUDGED_MODEL"),
                       help="publish only the judge lines about this model, the app's (default: $JUDGED_MODEL; "
                            "unset: every model's)")
    kafka = parser.add_argument_group("publishing")
    add_kafka_arguments(kafka, topics=("result",), bootstrap_flag="--bootstrap-servers")
    kafka.add_argument("--dry-run", action="store_true", help="map and report, publish nothing")
    logs = parser.add_argument_group("logging")
    logs.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    logs.add_argument("--log-format", default=os.environ.get("LOG_FORMAT", "auto"), choices=("auto", "json", "console"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m producer_examples.nemo",
                                     description="Publish NeMo Evaluator per-item results to evaljoin's result topic.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a NeMo Evaluator job and publish its per-item results")
    run.add_argument("--evaluator-url", default=os.environ.get("NEMO_MICROSERVICES_BASE_URL"),
                     help="NeMo Evaluator's base URL (default: $NEMO_MICROSERVICES_BASE_URL)")
    run.add_argument("--target-file", type=Path, help="the evaluation target, as JSON")
    run.add_argument("--config-file", type=Path, help="the evaluation config, as JSON")
    run.add_argument("--job-id", help="resume an existing job instead of creating one")
    run.add_argument("--format", choices=FORMATS, help="the per-item format to publish (default: every one found)")
    run.add_argument("--poll-initial", type=float, default=POLL_INITIAL_S,
                     help="first poll delay, seconds (default: %(default)s)")
    run.add_argument("--poll-max", type=float, default=POLL_MAX_S,
                     help="poll delay cap, seconds (default: %(default)s)")
    run.add_argument("--timeout", type=float, default=JOB_TIMEOUT_S,
                     help="give up waiting for the job after this many seconds (default: %(default)s)")
    run.add_argument("--max-retries", type=int, default=MAX_RETRIES,
                     help="retries of a request on 408, 429, 5xx and connection errors (default: %(default)s)")
    run.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                     help="per request, seconds (default: %(default)s)")
    _common(run)

    files = commands.add_parser("from-files", help="publish the per-item results of a local run")
    files.add_argument("path", type=Path, help="the run's output directory, a per-item file, or a results zip")
    files.add_argument("--format", choices=FORMATS, help="the per-item format (default: every one found)")
    provenance = files.add_argument_group("provenance (goes into metadata.nemo)")
    provenance.add_argument("--job-id")
    provenance.add_argument("--config", help="namespace/name of the evaluation config")
    provenance.add_argument("--target-type")
    provenance.add_argument("--target-name", help="namespace/name of the target")
    provenance.add_argument("--model", help="the evaluated model")
    provenance.add_argument("--judge", help="the judge model")
    _common(files)
    return parser


@dataclass(frozen=True)
class Inputs:
    """The validated target and config files of ``run`` (None when resuming a job)."""

    target: Target | None = None
    config: EvaluationConfigSpec | None = None

    def secrets(self) -> list[str]:
        return collect_secrets(*(spec for spec in (self.target, self.config) if spec is not None))


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Validate the files of ``run``. Raises :class:`InputError` (never with a key in the message)."""
    if args.command != "run":
        return Inputs()
    if not args.evaluator_url:
        raise InputError("--evaluator-url (or $NEMO_MICROSERVICES_BASE_URL) is required")
    if args.job_id:
        return Inputs()
    if args.target_file is None or args.config_file is None:
        raise InputError("--target-file and --config-file are required (or --job-id to resume a job)")
    return Inputs(load_target(args.target_file), load_config(args.config_file))


def _context(args: argparse.Namespace, source_id: str) -> RunContext:
    return RunContext(
        ml_app=args.ml_app or None, source_id=source_id, id_column=args.id_column, task=args.task,
        group=args.group or None,
        label_prefix=args.label_prefix, judge_label=args.judge_label, run_id=args.run_id or None,
        judged_model=args.judged_model or None,
        job_id=getattr(args, "job_id", None) if args.command == "from-files" else None,
        config=getattr(args, "config", None), target_type=getattr(args, "target_type", None),
        target_name=getattr(args, "target_name", None), model=getattr(args, "model", None),
        judge=getattr(args, "judge", None),
    )


async def _map(args: argparse.Namespace, inputs: Inputs, out: TextIO) -> MappingResult:
    if args.command == "from-files":
        fmt: Format | None = args.format
        return map_local_run(args.path, fmt, _context(args, args.run_id or args.path.name))
    async with AsyncNeMoMicroservices(base_url=args.evaluator_url, max_retries=args.max_retries,
                                      timeout=args.request_timeout) as client:
        evaluator = Evaluator(client, poll_initial_seconds=args.poll_initial, poll_max_seconds=args.poll_max,
                              timeout_seconds=args.timeout, secrets=inputs.secrets())
        outcome = await run_job(evaluator, _context(args, args.job_id or ""), fmt=args.format,
                                target=inputs.target, config=inputs.config, job_id=args.job_id)
    print(f"job {outcome.job.id}: {outcome.job.status}; aggregate scores (not attached to spans):", file=out)
    for aggregate in outcome.aggregates:
        print(f"  {aggregate}", file=out)
    return outcome.mapping


async def execute(args: argparse.Namespace, inputs: Inputs | None = None, *, out: TextIO | None = None) -> int:
    """Run a parsed command line; returns the exit code. Errors are printed, not raised."""
    out = out or sys.stdout
    try:
        inputs = inputs if inputs is not None else load_inputs(args)
        mapping = await _map(args, inputs, out)
        print(mapping.report.summary(), file=out)
        if args.dry_run:
            print(f"dry run: {len(mapping.events)} events not published", file=out)
            return 0
        try:
            kafka = kafka_settings_from(args)
        except KafkaConfigError as exc:
            raise InputError(str(exc)) from None
        try:
            async with EventPublisher(kafka=kafka) as sink:
                sent = await publish(mapping.events, sink)
        except (KafkaError, DeliveryError) as exc:  # starting or leaving the publisher
            raise PublishError(f"publishing failed: {exc!r}") from exc
        print(f"published {sent} events to {sink.result_topic}", file=out)
        return 0
    except NemoPublisherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        inputs = load_inputs(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    configure_logging(level=args.log_level.upper(), fmt=args.log_format, secrets=inputs.secrets())
    redact_client_logs(inputs.secrets())  # in the client's records themselves, before any handler
    return asyncio.run(execute(args, inputs))
