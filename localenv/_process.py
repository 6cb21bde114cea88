"""Process helpers shared by the service harnesses (internal)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["LocalService", "kill_process", "log_tail", "require_binary", "spawn", "terminate_process"]


class LocalService:
    """What every local service shares: ``start``/``stop`` and the ``with`` block around them."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def require_binary(name: str, hint: str) -> str:
    """Return the absolute path of executable ``name`` on PATH.

    Raises ``FileNotFoundError`` whose message names the binary and ``hint``
    (how to install it) when it cannot be found.
    """
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found on PATH; {hint}")
    return found


def spawn(args: list[str], *, log_path: Path, cwd: Path, append: bool = True,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``args`` with stdout and stderr going to ``log_path``.

    The child gets its own session (process group), so a Ctrl-C in the
    terminal reaches only the Python process, which then stops the child in
    an orderly way. Stdin is /dev/null. The log file is appended to by
    default, so one log covers a restart. ``env`` adds variables to the
    child's environment (it inherits this process's otherwise).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )


def terminate_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Send SIGTERM, wait up to ``timeout`` seconds, then SIGKILL and reap.

    Returns once the process has exited and been reaped; harmless when it
    has already exited.
    """
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process(proc)


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    """Send SIGKILL and wait until the process has been reaped.

    Harmless when the process has already exited.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
    proc.wait()


def log_tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of ``path``, or a note if it is unreadable."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(could not read {path.name}: {exc})"
    return "\n".join(text.splitlines()[-lines:])
