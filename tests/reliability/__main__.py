"""``python -m tests.reliability``: the fault-injection suite at full size, then its results table.

Runs ``pytest -m reliability tests/reliability`` with ``RELIABILITY_SCALE`` (default 5 here: about
10,000 hostile records, 45 consumer kills; 1 is the CI size) and prints one table of every scenario.
Extra arguments go to pytest, e.g. ``python -m tests.reliability --scale 1 -k hostile``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.reliability.harness import RESULTS_ENV, table_header, table_row

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=5.0, help="RELIABILITY_SCALE (default 5; CI runs 1)")
    parser.add_argument("--seed", type=int, help="RELIABILITY_SEED, to repeat a run's random choices")
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch) / "results.jsonl"
        env = {**os.environ, "RELIABILITY_SCALE": str(args.scale), RESULTS_ENV: str(results)}
        if args.seed is not None:
            env["RELIABILITY_SEED"] = str(args.seed)
        command = [sys.executable, "-m", "pytest", "tests/reliability", "-m", "reliability", "-s",
                   "-p", "no:cacheprovider", *pytest_args]
        started = time.monotonic()
        code = subprocess.call(command, cwd=REPO_ROOT, env=env)
        took = time.monotonic() - started
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    print(f"\nreliability suite, RELIABILITY_SCALE={args.scale:g}, "
          f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, {took / 60:.1f} min, pytest exit {code}\n")
    print(table_header())
    for row in rows:
        print(table_row(row))
    return code


if __name__ == "__main__":
    sys.exit(main())
