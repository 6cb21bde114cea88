"""``python -m consumer``, also as a container's PID 1.

The stop signals are handled before anything else is imported (that takes about a second): Python
as PID 1 has no default action for SIGTERM, so a pod deleted meanwhile would wait its whole grace
period. Nothing is open yet, so exiting 0 is all there is to do; :func:`consumer.cli.main` takes
over from there.
"""

import signal
import sys


def _exit_before_start(signum: int, frame: object) -> None:
    raise SystemExit(0)


for _sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_sig, _exit_before_start)

from consumer.cli import main  # noqa: E402 - after the handlers, on purpose

sys.exit(main())
