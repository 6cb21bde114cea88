"""Command line: ``python -m consumer [run]`` runs the service; ``schemas DIR`` exports JSON Schemas."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

import structlog
from pydantic import ValidationError

from consumer.config import Settings, load_settings
from consumer.errors import DlqLimitExceeded
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.logs import configure_logging
from consumer.service import Service

EXIT_HALTED = 3
EXIT_CONFIG = 2


async def run_service(settings: Settings) -> int:
    log = structlog.get_logger("consumer")
    async with Service.open(settings) as service:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        log.info("service_started", group=settings.kafka_group_id, span_topic=settings.span_topic,
                 result_topic=settings.result_topic, intake=settings.intake_url)
        try:
            await service.run()
        except DlqLimitExceeded as exc:
            log.error("halted_by_dlq_limit", error=str(exc))
            return EXIT_HALTED
    log.info("service_stopped")
    return 0


def export_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in (("span-context-event", SpanContextEvent), ("nemo-result-event", NemoResultEvent)):
        path = directory / f"{name}.v1.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumer", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the service (the default)")
    schemas = commands.add_parser("schemas", help="write the events' JSON Schemas to a directory")
    schemas.add_argument("directory", type=Path)
    args = parser.parse_args(argv)

    if args.command == "schemas":
        for path in export_schemas(args.directory):
            print(path)
        return 0
    try:
        settings = load_settings()
    except ValidationError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    return asyncio.run(run_service(settings))
