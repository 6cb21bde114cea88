"""``python -m tests.reliability``: the fault-injection suite at full size, then its results table.

Runs ``pytest -m reliability tests/reliability`` with ``RELIABILITY_SCALE`` (default 5 here: about
10,000 hostile records, 45 consumer kills; 1 is the CI size) and prints one table of every scenario.
Extra arguments go to pytest, e.g. ``python -m tests.reliability --scale 1 -k hostile``.

``--chaos SECONDS`` runs only the chaos scenario (``test_chaos.py``), with that many seconds of faults,
and prints its fault tally under the table; ``--chaos-rate`` sets its load in pairs/s instead of half
the maximum it measures.
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
from tests.reliability.schedule import tally_table

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAOS_SECONDS_ENV, CHAOS_RATE_ENV = "RELIABILITY_CHAOS_SECONDS", "RELIABILITY_CHAOS_RATE"  # read by test_chaos.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=5.0, help="RELIABILITY_SCALE (default 5; CI runs 1)")
    parser.add_argument("--seed", type=int, help="RELIABILITY_SEED, to repeat a run's random choices")
    parser.add_argument("--chaos", type=float, metavar="SECONDS",
                        help="run only the chaos scenario, with SECONDS of faults (RELIABILITY_CHAOS_SECONDS)")
    parser.add_argument("--chaos-rate", type=float, metavar="PAIRS_S",
                        help="the chaos load in pairs/s (RELIABILITY_CHAOS_RATE; default: half the measured maximum)")
    args, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch) / "results.jsonl"
        env = {**os.environ, "RELIABILITY_SCALE": str(args.scale), RESULTS_ENV: str(results)}
        if args.seed is not None:
            env["RELIABILITY_SEED"] = str(args.seed)
        if args.chaos_rate is not None:
            env[CHAOS_RATE_ENV] = str(args.chaos_rate)
        where = "tests/reliability"
        if args.chaos is not None:
            env[CHAOS_SECONDS_ENV] = str(args.chaos)
            where = "tests/reliability/test_chaos.py"
        command = [sys.executable, "-m", "pytest", where, "-m", "reliability", "-s", "-p", "no:cacheprovider",
                   *pytest_args]
        started = time.monotonic()
        code = subprocess.call(command, cwd=REPO_ROOT, env=env)
        took = time.monotonic() - started
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    print(f"\nreliability suite, RELIABILITY_SCALE={args.scale:g}, "
          f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, {took / 60:.1f} min, pytest exit {code}\n")
    print(table_header())
    for row in rows:
        print(table_row(row))
    for row in rows:
        if "tally" in row["notes"]:
            print(f"\n{row['scenario']}: seed {row['notes']['seed']}, {row['notes']['faults']} faults, "
                  f"at most {row['notes']['max_overlap']} at once")
            print(tally_table(row["notes"]["tally"]))
    return code


if __name__ == "__main__":
    sys.exit(main())
