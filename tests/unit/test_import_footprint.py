"""What the service loads: ddtrace only when self-tracing is on (``DD_TRACE_ENABLED``).

Importing ddtrace costs a process about 27 MB of RSS; the service needs it only to trace itself. The
version tag every evaluation carries is ddtrace's, read from its installed metadata instead.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_the_service_runs_without_importing_ddtrace() -> None:
    """The consumer's modules, the command line included, load without ddtrace; the tracing switch loads it."""
    probe = ("import sys, consumer.cli, consumer.service\n"
             "print(sorted(m for m in sys.modules if m == 'ddtrace' or m.startswith('ddtrace.')))\n"
             "from consumer import tracing\n"
             "tracing.enable_tracing()\n"
             "print('ddtrace' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_version_tag_is_ddtraces_own() -> None:
    import ddtrace

    from consumer import payload

    assert ddtrace.__version__ == payload._DDTRACE_VERSION
