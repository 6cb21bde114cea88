"""The stream processors a team would pick instead of the service, as benchmark peers.

- ``quix``: a Quix Streams application (:mod:`bench.quix_peer`), run by a virtualenv of its own
  (``<cache>/venv-quix``, from ``bench/quix-requirements.txt``): quixstreams pins pydantic below the
  version the service uses, so the two cannot share one environment.
- ``kstreams``: a Kafka Streams application (``bench/kstreams``, Java), built with Maven from
  ``org.apache.kafka:kafka-streams`` of the broker's version into ``<cache>/kstreams-peer-<hash>``.

Both are prepared on first use (a file lock serialises concurrent callers) and then need neither the
network nor Maven until their sources change; ``python -m bench.peers`` prepares both ahead
(``scripts/setup.sh`` runs it). Each runs as one process the benchmark starts, like the service, so
that its CPU time and RSS are read the same way.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from consumer.config import EVAL_METRIC_PATH
from localenv.kafka import _file_lock, default_cache_dir

BENCH = Path(__file__).resolve().parent
QUIX_REQUIREMENTS = BENCH / "quix-requirements.txt"
KSTREAMS_DIR = BENCH / "kstreams"
KSTREAMS_SOURCES = (KSTREAMS_DIR / "pom.xml", KSTREAMS_DIR / "src/main/java/bench/KStreamsPeer.java")
KSTREAMS_MAIN = "bench.KStreamsPeer"
_MARKER = ".complete"

PEERS = ("quix", "kstreams")
LABELS = {"quix": "Quix Streams", "kstreams": "Kafka Streams"}


def _digest(paths: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n"
                           f"{(done.stdout + done.stderr).strip()[-4000:]}")


def ensure_quix(cache_dir: Path | None = None) -> Path:
    """The Python of the Quix Streams virtualenv, created and installed if missing or out of date."""
    root = cache_dir or default_cache_dir()
    venv = root / "venv-quix"
    python = venv / "bin" / "python"
    marker = venv / _MARKER
    want = _digest((QUIX_REQUIREMENTS,))
    if marker.exists() and marker.read_text().strip() == want:
        return python
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / "venv-quix.lock"):
        if marker.exists() and marker.read_text().strip() == want:
            return python
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], "creating the Quix Streams virtualenv")
        _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
              str(QUIX_REQUIREMENTS)], "installing Quix Streams")
        marker.write_text(want + "\n")
    return python


def ensure_kstreams(cache_dir: Path | None = None) -> Path:
    """The directory of the Kafka Streams peer's jar and its runtime jars, built with Maven if missing."""
    root = cache_dir or default_cache_dir()
    out = root / f"kstreams-peer-{_digest(KSTREAMS_SOURCES)}"
    if (out / _MARKER).exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / "kstreams-peer.lock"):
        if (out / _MARKER).exists():
            return out
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("mvn (Apache Maven) not found on PATH; it builds the Kafka Streams peer "
                               "(install the Debian package maven)")
        shutil.rmtree(out, ignore_errors=True)
        _run([mvn, "-q", "-B", "-f", str(KSTREAMS_DIR / "pom.xml"), f"-Dout={out}", "package",
              "dependency:copy-dependencies", f"-DoutputDirectory={out / 'libs'}", "-DincludeScope=runtime"],
             "building the Kafka Streams peer with Maven")
        (out / _MARKER).write_text("built by mvn package\n")
    return out


@dataclass(frozen=True)
class Peer:
    """One peer's command line for one run: its group, topics and the intake it posts to."""

    name: str
    program: tuple[str, ...]  # the process and its fixed arguments

    @classmethod
    def prepare(cls, name: str, cache_dir: Path | None = None) -> Peer:
        if name == "quix":
            return cls(name, (str(ensure_quix(cache_dir)), "-m", "bench.quix_peer"))
        if name == "kstreams":
            out = ensure_kstreams(cache_dir)
            classpath = f"{out / 'kstreams-peer.jar'}:{out / 'libs'}/*"
            return cls(name, ("java", "-cp", classpath, KSTREAMS_MAIN))  # the JVM's default heap, as deployed untuned
        raise ValueError(f"unknown peer {name!r}")

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def command(self, *, bootstrap: str, group: str, span_topic: str, result_topic: str, intake_origin: str,
                max_batch: int, commit_ms: int, ttl_s: int, state_dir: Path, ddtrace_version: str) -> list[str]:
        return [*self.program, bootstrap, group, span_topic, result_topic, intake_origin + EVAL_METRIC_PATH,
                str(max_batch), str(commit_ms), str(ttl_s), str(state_dir), ddtrace_version]


def main(argv: list[str]) -> int:
    """``python -m bench.peers [quix] [kstreams]``: prepare the peers (all without arguments)."""
    for name in argv or PEERS:
        peer = Peer.prepare(name)
        sys.stdout.write(f"{peer.label} peer ready: {' '.join(peer.program)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
