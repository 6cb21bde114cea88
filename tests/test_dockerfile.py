"""The image definition (Dockerfile, .dockerignore), checked without a Docker engine.

hadolint and checkov lint it; the rest reads its instructions: what the final stage runs, as whom,
from which base, and that it agrees with the Helm chart (user, health endpoint, port). The build
context that .dockerignore lets through is installed as the build stage installs it, and the
result runs. The linters come from scripts/setup.sh (.cache/venv-chart).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
TOOLS = ROOT / ".cache" / "venv-chart" / "bin"
CHART_VALUES = ROOT / "deploy" / "helm" / "evaljoin" / "values.yaml"


def tool(name: str) -> Path:
    path = TOOLS / name
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run scripts/setup.sh --chart-tools")
    return path


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages() -> list[Stage]:
    """The Dockerfile's stages with their instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    found: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            found.append(Stage(base=base.strip(), name=name.strip() or None))
        else:
            found[-1].instructions.append((keyword, args))
    return found


def chart_security_context() -> dict[str, int]:
    """runAsUser and runAsGroup of the chart's container security context."""
    text = CHART_VALUES.read_text()
    block = text[text.index("\nsecurityContext:"):]
    found = {}
    for key in ("runAsUser", "runAsGroup"):
        match = re.search(rf"^\s+{key}: (\d+)$", block, flags=re.MULTILINE)
        assert match, key
        found[key] = int(match.group(1))
    return found


def test_hadolint_is_clean() -> None:
    """hadolint reports nothing at all about the Dockerfile."""
    done = run(tool("hadolint"), DOCKERFILE)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_checkov_dockerfile_checks_pass() -> None:
    """checkov's Dockerfile checks all pass, none skipped."""
    done = run(tool("checkov"), "--file", DOCKERFILE, "--framework", "dockerfile", "--skip-download",
               "--output", "json", "--quiet")
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["results"]["failed_checks"] == []
    assert report["summary"]["skipped"] == 0
    assert report["summary"]["passed"] > 0


def test_both_stages_use_one_pinned_slim_python_of_the_projects_version() -> None:
    """Build and final stage start from the same slim Python image, pinned to a patch version the project supports."""
    build, final = stages()
    assert build.name == "build" and final.name is None
    assert build.base == final.base
    match = re.fullmatch(r"python:(3)\.(\d+)\.(\d+)-slim-\w+(@sha256:[0-9a-f]{64})?", final.base)
    assert match, final.base
    requires = re.search(r'^requires-python = ">=3\.(\d+)"$', (ROOT / "pyproject.toml").read_text(),
                         flags=re.MULTILINE)
    assert requires and int(match.group(2)) >= int(requires.group(1))


def test_final_stage_runs_the_consumer_as_the_charts_non_root_user() -> None:
    """The image runs `python -m consumer` as a numeric non-root UID:GID, the one the chart's pods run as."""
    final = stages()[-1]
    assert final.all("ENTRYPOINT") == ['["python", "-m", "consumer"]']
    assert final.all("CMD") == []
    (user,) = final.all("USER")
    uid, gid = (int(part) for part in user.split(":"))
    assert uid >= 10000 and gid >= 10000
    assert chart_security_context() == {"runAsUser": uid, "runAsGroup": gid}
    assert final.instructions[-1][0] in ("ENTRYPOINT", "HEALTHCHECK")
    assert [kw for kw, _ in final.instructions].index("USER") > max(
        i for i, (kw, _) in enumerate(final.instructions) if kw in ("RUN", "COPY"))


def test_final_stage_has_no_build_tools() -> None:
    """The final stage installs nothing: it copies the build stage's virtualenv and removes pip and setuptools."""
    final = stages()[-1]
    for command in final.all("RUN"):
        assert not re.search(r"\b(apt-get|apt|apk|pip) install\b", command), command
    assert any("pip uninstall" in command and "setuptools" in command for command in final.all("RUN"))
    copies = final.all("COPY")
    assert copies and all(c.startswith("--from=build ") for c in copies), copies
    build = stages()[0]
    assert any("venv --without-pip" in command for command in build.all("RUN"))


def test_healthcheck_is_the_charts_liveness_check() -> None:
    """HEALTHCHECK asks /healthz on HEALTH_PORT (default the chart's), like the chart's liveness probe."""
    final = stages()[-1]
    (healthcheck,) = final.all("HEALTHCHECK")
    assert "/healthz" in healthcheck and "HEALTH_PORT" in healthcheck
    default_port = re.search(r"^  HEALTH_PORT: (\d+)$", CHART_VALUES.read_text(), flags=re.MULTILINE)
    assert default_port and f"'HEALTH_PORT', '{default_port.group(1)}'" in healthcheck
    assert final.all("EXPOSE") == [default_port.group(1)]
    chart_templates = (ROOT / "deploy" / "helm" / "evaljoin" / "templates" / "_pod.tpl").read_text()
    liveness = re.search(r"livenessProbe:\s+httpGet:\s+path: (\S+)", chart_templates)
    assert liveness and liveness.group(1) == "/healthz"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rules, as far as this project's file uses them: last match wins, `!` re-includes."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def build_context() -> list[str]:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    tracked = run("git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    return sorted(path for path in tracked if not _ignored(path, patterns))


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_private() -> None:
    """The context .dockerignore lets through has every file the build copies, and no git, venv, cache or test."""
    context = build_context()
    assert "pyproject.toml" in context and "README.md" in context
    assert "consumer/__main__.py" in context and any(p.startswith("consumer/lua/") for p in context)
    for copy in stages()[0].all("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert any(p == source or p.startswith(source.rstrip("/") + "/") for p in context), source
    for path in context:
        assert not path.startswith((".git/", ".venv/", ".cache/", "tests/", "localenv/", "deploy/", ".env")), path
        assert "__pycache__" not in path


def test_package_installed_from_the_build_context_runs(tmp_path: Path) -> None:
    """Installing the build context as the build stage does gives a package whose `python -m consumer` runs."""
    context = tmp_path / "context"
    for path in build_context():
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, context / path)
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    python = venv / "bin" / "python"
    # As in the build stage, but without dependencies: the test's own environment provides them.
    done = run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-compile",
               ".", cwd=context)
    assert done.returncode == 0, done.stdout + done.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    installed = sorted(p.relative_to(site).as_posix() for p in (site / "consumer").rglob("*") if p.is_file())
    assert "consumer/__main__.py" in installed and "consumer/py.typed" in installed
    assert any(p.startswith("consumer/lua/") and p.endswith(".lua") for p in installed)
    assert not (site / "localenv").exists() and not (site / "producer_examples").exists()
    dependencies = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "pydantic").exists())
    env = {"PYTHONPATH": str(dependencies)}
    done = run(python, "-m", "consumer", "--help", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m consumer")
    where = run(python, "-c", "import consumer; print(consumer.__file__)", cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
