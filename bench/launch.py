"""Runs ``python -m consumer`` in this process with an optional event loop and profiler.

``python -m bench.launch [--uvloop] [--pyinstrument FILE]`` then the consumer's own arguments. The
service itself is unchanged: uvloop is installed as the event loop policy before ``asyncio.run``,
and pyinstrument samples the whole run and writes a text report when the service exits (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from typing import Any

PROFILE_INTERVAL_S = 0.001  # pyinstrument's sampling interval


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--pyinstrument", metavar="FILE")
    args, rest = parser.parse_known_args(argv)
    if args.uvloop:
        uvloop: Any = importlib.import_module("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from consumer.cli import main as consumer_main

    if not args.pyinstrument:
        return consumer_main(rest)
    profiler: Any = importlib.import_module("pyinstrument").Profiler(interval=PROFILE_INTERVAL_S,
                                                                             async_mode="disabled")
    profiler.start()
    try:
        return consumer_main(rest)
    finally:
        profiler.stop()
        with open(args.pyinstrument, "w") as out:
            out.write(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
