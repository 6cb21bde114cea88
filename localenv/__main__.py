"""Run one local service in the foreground: ``python -m localenv kafka|redis|intake|fetch``.

The service's address is printed on stdout as soon as it is ready; Ctrl-C
or SIGTERM stops it cleanly (its processes and temporary directories are
removed). The exit status is 0 after a requested stop, 1 if the service
died on its own. ``fetch`` only downloads the Kafka jars (for set-up
scripts) and prints their directory.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import FrameType

from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker, ensure_jars
from localenv.redis import RedisCluster, RedisServer


def _serve(service: AbstractContextManager[object], describe: Callable[[], str], alive: Callable[[], bool]) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with service:
            if stop.is_set():
                return 0
            print(describe(), flush=True)
            print("running; press Ctrl-C to stop", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                if not alive():
                    print("service exited unexpectedly", file=sys.stderr, flush=True)
                    return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m localenv", description="Run a local service for tests or a demo.")
    sub = parser.add_subparsers(dest="service", required=True)

    kafka = sub.add_parser("kafka", help="an Apache Kafka broker (KRaft) on 127.0.0.1")
    kafka.add_argument("--data-dir", type=Path, help="keep broker data here (default: a temp dir removed on exit)")
    kafka.add_argument("--heap", default="512m", help="JVM -Xmx (default: 512m)")

    redis = sub.add_parser("redis", help="a redis-server (or a 3-node cluster) on 127.0.0.1")
    redis.add_argument("--cluster", action="store_true", help="start a 3-node Redis Cluster instead")
    redis.add_argument("--password", help="requirepass for the single server")
    redis.add_argument("--data-dir", type=Path, help="keep the AOF here (default: a temp dir removed on exit)")

    sub.add_parser("intake", help="the fake Datadog eval-metric intake; prints every accepted metric")
    sub.add_parser("fetch", help="download the Kafka jars into the cache and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    if args.service == "fetch":
        print(ensure_jars(), flush=True)
        return 0
    if args.service == "kafka":
        broker = KafkaBroker(data_dir=args.data_dir, heap=args.heap)
        return _serve(
            broker,
            lambda: f"kafka bootstrap servers: {broker.bootstrap_servers}  (log: {broker.log_path})",
            lambda: broker.running,
        )
    if args.service == "redis":
        if args.cluster:
            cluster = RedisCluster()
            return _serve(
                cluster,
                lambda: "redis cluster: " + " ".join(f"{h}:{p}" for h, p in cluster.startup_nodes),
                lambda: cluster.running,
            )
        server = RedisServer(password=args.password, data_dir=args.data_dir)
        return _serve(server, lambda: f"redis url: {server.url}", lambda: server.running)
    intake = FakeIntake(echo=sys.stdout)
    return _serve(
        intake,
        lambda: f"intake url: {intake.url}  (agent-proxy origin: {intake.origin})",
        lambda: intake.running,
    )


if __name__ == "__main__":
    sys.exit(main())
