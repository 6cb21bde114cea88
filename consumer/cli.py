"""Command line: ``python -m consumer [COMMAND]`` (also installed as ``evaljoin``).

With no command it runs the service, as deployments call it. Every command reads the same
environment as the service (see the README's configuration table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from consumer.config import Settings, config_errors, load_settings
from consumer.errors import DlqLimitExceeded, Misconfigured
from consumer.events import NemoResultEvent, SpanContextEvent
from consumer.expiry import Sweeper
from consumer.logs import Redactor, configure_logging
from consumer.metrics import Metrics
from consumer.ops.buffer import lookup, overview
from consumer.ops.check import run_checks
from consumer.ops.replay import ReplayFilter, progress_bar, replay_dlq
from consumer.service import Service
from consumer.store_redis import RedisJoinStore, connect
from consumer.store_redis import close as close_redis
from consumer.tracing import enable_tracing

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_HALTED = 3


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_service(settings: Settings) -> int:
    """Run the service until SIGTERM or SIGINT; the exit code.

    A signal is handled from the first moment: while the service starts (connecting to Kafka can take
    as long as a broker does not answer), it cancels the start, closes what was opened, and the process
    exits 0, as a pod being deleted expects; once started, it stops the service as described in
    :mod:`consumer.service`.
    """
    log = structlog.get_logger("consumer")
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    assert starting is not None
    service: Service | None = None
    stopped_while_starting = False

    def on_signal(sig: signal.Signals) -> None:
        nonlocal stopped_while_starting
        if service is not None:
            service.stop()
        elif not stopped_while_starting:  # a second signal must not cut the closing short
            stopped_while_starting = True
            log.info("stop_requested_while_starting", signal=sig.name)
            starting.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with Service.open(settings) as service:
            if stopped_while_starting:  # the cancellation came after the last step of the start
                service.stop()
            log.info("service_started", group=settings.kafka_group_id, span_topic=settings.span_topic,
                     result_topic=settings.result_topic)
            try:
                await service.run()
            except DlqLimitExceeded as exc:
                log.error("halted_by_dlq_limit", error=str(exc))
                return EXIT_HALTED
    except asyncio.CancelledError:
        if not stopped_while_starting or starting.uncancel() > 0:
            raise
        log.info("service_stopped", during="start")
        return 0
    log.info("service_stopped")
    return 0


def exit_before_start(signum: int, frame: object) -> None:
    """SIGTERM or SIGINT before the event loop runs: nothing is open yet, so the process just exits 0.

    Without a handler, Python as a container's PID 1 ignores SIGTERM, and the pod would wait its whole
    grace period.
    """
    raise SystemExit(0)


def export_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in (("span-context-event", SpanContextEvent), ("nemo-result-event", NemoResultEvent)):
        path = directory / f"{name}.v1.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


async def with_store(settings: Settings, use: Callable[[RedisJoinStore], Awaitable[Any]]) -> Any:
    client = await connect(settings.redis_target(), cluster=settings.redis_cluster, **settings.redis_client_options())
    try:
        return await use(RedisJoinStore(
            client, prefix=settings.redis_key_prefix, shards=settings.redis_deadline_shards,
            ledger_retention_ms=(settings.join_ttl_seconds + settings.ledger_grace_seconds) * 1000))
    finally:
        await close_redis(client)


async def cmd_check(settings: Settings) -> int:
    findings = await run_checks(settings)
    redact = Redactor(settings.secrets())  # findings quote errors from Kafka, Redis and HTTP clients
    for finding in findings:
        mark = "ok  " if finding.ok and not finding.warning else ("warn" if finding.ok else "FAIL")
        print(f"{mark} {finding.component:7} {redact.text(finding.message)}")
    return 0 if all(f.ok for f in findings) else EXIT_FAILED


async def cmd_inspect(settings: Settings, args: argparse.Namespace) -> int:
    if args.key is not None:
        ml_app = args.ml_app or settings.default_ml_app
        if not ml_app:
            print("inspect --key needs --ml-app (or DEFAULT_ML_APP)", file=sys.stderr)
            return EXIT_CONFIG
        result = await with_store(settings, lambda store: lookup(store, ml_app, args.key, args.run_id or ""))
    else:
        result = await with_store(settings, lambda store: overview(
            store, oldest=args.oldest, join_ttl_ms=settings.join_ttl_seconds * 1000))
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


async def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    flt = ReplayFilter(reasons=set(args.reason or ()), since_ms=_time_ms(args.since), until_ms=_time_ms(args.until),
                       key_contains=args.key, include_replayed=args.include_replayed)
    show = progress_bar if sys.stderr.isatty() and not args.quiet else None
    report = await replay_dlq(settings, flt, dry_run=args.dry_run, progress=show)
    if show:
        sys.stderr.write("\n")
    verb = "would replay" if args.dry_run else "replayed"
    print(f"read {report.read}, {verb} {report.replayed}, skipped {sum(report.skipped.values())}")
    for reason, count in sorted(report.skipped.items()):
        print(f"  skipped {count}: {reason}")
    return 0


async def cmd_sweep(settings: Settings, args: argparse.Namespace) -> int:
    async def sweep(store: RedisJoinStore) -> int:
        now_ms = int(time.time() * 1000)
        if not args.publish:
            due = [side for shard in range(store.shards) for side in await store.due(shard, now_ms, 10_000)]
            for side in due:
                kind = "span" if side.event_id is None else f"result {side.event_id}"
                print(f"due  {side.namespace.ml_app}/{side.namespace.join_key}  {kind}  "
                      f"deadline {datetime.fromtimestamp(side.deadline_ms / 1000).astimezone().isoformat()}")
            print(f"{len(due)} side(s) due; run with --publish to report them to {settings.unmatched_topic}")
            return 0
        producer = AIOKafkaProducer(acks="all", enable_idempotence=settings.kafka_enable_idempotence,
                                    **settings.kafka_client_options())
        await producer.start()
        try:
            sweeper = Sweeper(store, producer, topic=settings.unmatched_topic, interval_s=0, batch=settings.sweep_batch,
                              retry_later_ms=int(settings.claim_lease_seconds * 1000), metrics=Metrics())
            report = await sweeper.sweep_once(now_ms)
        finally:
            await producer.stop()
        print(f"reported {report.reported}, dropped {report.dropped} (joined spans), "
              f"postponed {report.postponed} (delivery under way)")
        return 0

    result: int = await with_store(settings, sweep)
    return result


def _time_ms(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m consumer", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the service (the default)")
    commands.add_parser("check", help="check the configuration and that Kafka, Redis and the intake are reachable")
    inspect = commands.add_parser("inspect", help="show what waits in the join buffer, or one join key")
    inspect.add_argument("--key", help="show everything stored for this join key")
    inspect.add_argument("--ml-app", help="the join key's ml_app (default: DEFAULT_ML_APP)")
    inspect.add_argument("--run-id", help="the join key's run, when its events name one")
    inspect.add_argument("--oldest", type=int, default=10, help="how many of the oldest sides to list (10)")
    replay = commands.add_parser("replay-dlq", help="re-publish dead-lettered records to their source topic")
    replay.add_argument("--reason", action="append", help="only this reason (repeatable), e.g. schema")
    replay.add_argument("--since", help="only records dead-lettered at or after this time (ISO 8601 or epoch ms)")
    replay.add_argument("--until", help="only records dead-lettered at or before this time")
    replay.add_argument("--key", help="only records whose Kafka key contains this text")
    replay.add_argument("--include-replayed", action="store_true", help="also records that failed after a replay")
    replay.add_argument("--dry-run", action="store_true", help="count what would be replayed; publish nothing")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep = commands.add_parser("sweep", help="list sides whose deadline passed; --publish reports them now")
    sweep.add_argument("--publish", action="store_true", help="publish them to the unmatched topic")
    schemas = commands.add_parser("schemas", help="write the events' JSON Schemas to a directory")
    schemas.add_argument("directory", type=Path)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    serving = args.command in (None, "run")
    for sig in STOP_SIGNALS:
        # The service exits 0 on a stop signal from here on (run_service takes over in its loop); an operator
        # command keeps the usual meaning of one (interrupted, not done).
        signal.signal(sig, exit_before_start if serving else signal.default_int_handler if sig == signal.SIGINT
                      else signal.SIG_DFL)
    if args.command == "schemas":
        for path in export_schemas(args.directory):
            print(path)
        return 0
    try:
        settings = load_settings()
    except ValidationError as exc:
        print(f"invalid configuration:\n{config_errors(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    if serving:
        configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
        if settings.dd_trace_enabled:
            enable_tracing()
        return logged_failure("run", lambda: run_service(settings))
    configure_logging(level="WARNING", fmt=settings.log_format, secrets=settings.secrets())
    commands: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "check": lambda: cmd_check(settings),
        "inspect": lambda: cmd_inspect(settings, args),
        "replay-dlq": lambda: cmd_replay(settings, args),
        "sweep": lambda: cmd_sweep(settings, args),
    }
    return logged_failure(args.command, commands[args.command])


def logged_failure(name: str, command: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``command``; a failure is logged (so through the redactor) instead of printed raw, and exits 1.

    A setting the dependency cannot work with (:class:`Misconfigured`, found only once connected) exits 2, as an
    invalid configuration does, with one line naming the setting.
    """
    try:
        return asyncio.run(command())
    except Misconfigured as exc:
        structlog.get_logger("consumer").error("invalid_configuration", command=name, setting=exc.setting,
                                               component=exc.component, error=exc.detail)
        return EXIT_CONFIG
    except Exception:  # noqa: BLE001 - any failure: its traceback is logged, redacted
        structlog.get_logger("consumer").exception("command_failed", command=name)
        return EXIT_FAILED
