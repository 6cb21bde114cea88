"""The image definition (Dockerfile, .dockerignore, requirements.lock), checked without a Docker engine.

hadolint and checkov lint it; the rest reads its instructions: what the final stage runs, as whom,
from which base, and that it agrees with the Helm chart (user, health endpoint, port). The lock is
checked against pyproject.toml: exactly the declared dependencies, transitively closed, each pin
satisfying its specifiers, every file hashed. scripts/setup.sh installs the lock as the image
does (.cache/venv-image, --require-hashes); the build context that .dockerignore lets through is
installed on top of it as the build stage installs it, and the result runs. The linters come from
scripts/setup.sh too (.cache/venv-chart).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
TOOLS = ROOT / ".cache" / "venv-chart" / "bin"
IMAGE_VENV = ROOT / ".cache" / "venv-image"
CHART_VALUES = ROOT / "deploy" / "helm" / "evaljoin" / "values.yaml"
LOCK, BUILD_LOCK = ROOT / "requirements.lock", ROOT / "requirements-build.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


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
    """The image runs `python -m consumer` under tini as a numeric non-root UID:GID, the one the chart's pods run as."""
    final = stages()[-1]
    assert final.all("ENTRYPOINT") == ['["tini", "--", "python", "-m", "consumer"]']
    assert final.all("CMD") == []
    (user,) = final.all("USER")
    uid, gid = (int(part) for part in user.split(":"))
    assert uid >= 10000 and gid >= 10000
    assert chart_security_context() == {"runAsUser": uid, "runAsGroup": gid}
    assert final.instructions[-1][0] in ("ENTRYPOINT", "HEALTHCHECK")
    assert [kw for kw, _ in final.instructions].index("USER") > max(
        i for i, (kw, _) in enumerate(final.instructions) if kw in ("RUN", "COPY"))


def test_final_stage_has_no_build_tools() -> None:
    """The final stage installs only Debian's tini (pinned): it copies the build stage's virtualenv, removes pip."""
    final = stages()[-1]
    for command in final.all("RUN"):
        assert not re.search(r"\b(apt|apk|pip) install\b", command), command
        for install in re.findall(r"apt-get install ([^&]+)", command):
            assert [arg for arg in install.split() if not arg.startswith("-")] == ["tini=0.19.0-3+b8"], install
            assert "--no-install-recommends" in install
        if "apt-get install" in command:
            assert "rm -rf /var/lib/apt/lists/*" in command
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


def test_dependencies_are_a_layer_of_their_own_installed_from_the_lock() -> None:
    """The lock is copied and installed (hashes required) before the code is copied; the package adds no dependency."""
    build = stages()[0]
    steps = [(kw, args) for kw, args in build.instructions if kw in ("COPY", "RUN")]
    lock_copy = next(i for i, (kw, args) in enumerate(steps) if kw == "COPY" and "requirements.lock" in args)
    lock_install = next(i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "-r requirements.lock" in args)
    code_copy = next(i for i, (kw, args) in enumerate(steps) if kw == "COPY" and args.startswith("consumer/"))
    assert lock_copy < lock_install < code_copy
    installs = re.findall(r"pip (?:--python \S+ )?(?:install|wheel) [^&]+", steps[lock_install][1])
    assert installs and all("--require-hashes" in command for command in installs), installs
    assert "-r requirements-build.lock" in steps[lock_install][1]
    package = [args for kw, args in steps[code_copy:] if kw == "RUN" and "pip" in args]
    assert package and all(command.count("--no-deps") == command.count(" pip ") for command in package), package
    assert all("--no-build-isolation" in command for command in package if " wheel " in command)


def test_oci_labels_come_from_build_arguments() -> None:
    """The image's version, revision and source labels are build arguments; the version defaults to the package's."""
    final = stages()[-1]
    args = dict(arg.partition("=")[::2] for arg in final.all("ARG"))
    assert args["VERSION"] == PYPROJECT["project"]["version"]
    assert {"REVISION", "SOURCE"} <= set(args)
    labels = " ".join(final.all("LABEL"))
    for label, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")):
        assert f'org.opencontainers.image.{label}="${{{arg}}}"' in labels, label


def test_tini_is_pid_1() -> None:
    """tini, from Debian, starts the service: it forwards signals and reaps children as PID 1 must."""
    final = stages()[-1]
    assert any("apt-get install" in command and "tini=" in command for command in final.all("RUN"))
    entrypoint = json.loads(final.all("ENTRYPOINT")[0])
    assert entrypoint[:2] == ["tini", "--"]
    healthcheck = final.all("HEALTHCHECK")[0]
    assert "tini" not in healthcheck


@dataclass
class Pin:
    version: str
    hashes: list[str]


def read_lock(path: Path) -> dict[str, Pin]:
    """A pip-compile --generate-hashes file: canonical name -> pinned version and its sha256 hashes."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                       if not line.lstrip().startswith("#")))
    pins: dict[str, Pin] = {}
    for line in filter(str.strip, text.splitlines()):
        requirement, *options = line.split(" --")
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;\[]+)", requirement.strip())
        assert match, f"{path.name}: not a pin: {line!r}"
        hashes = [option.strip().removeprefix("hash=") for option in options if option.strip().startswith("hash=")]
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{path.name}: {line!r}"
        assert len(options) == len(hashes), f"{path.name}: options other than hashes: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = Pin(match.group(2), hashes)
    return pins


def image_distributions() -> dict[str, importlib.metadata.Distribution]:
    """The distributions scripts/setup.sh installed from the lock into .cache/venv-image, by canonical name."""
    sites = list((IMAGE_VENV / "lib").glob("python3*/site-packages"))
    if not (IMAGE_VENV / ".installed").exists() or not sites:
        pytest.fail(".cache/venv-image is missing: run scripts/setup.sh --chart-tools")
    return {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(sites[0])])}


def test_lock_is_exactly_the_declared_dependencies_transitively_closed() -> None:
    """requirements.lock pins what pyproject.toml declares and what those need, nothing else, each pin in range."""
    pins = read_lock(LOCK)
    installed = image_distributions()
    assert {name: d.version for name, d in installed.items()} == {name: pin.version for name, pin in pins.items()}, (
        ".cache/venv-image is not this lock: run scripts/setup.sh --chart-tools")
    needed: dict[str, set[str]] = {}
    queue = [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is needed but not locked: run the pip-compile line atop requirements.lock"
        assert requirement.specifier.contains(Version(pins[name].version), prereleases=True), (
            f"{name}=={pins[name].version} does not satisfy {requirement}")
        seen = needed.get(name)
        if seen is not None and requirement.extras <= seen:
            continue
        extras = needed[name] = (seen or set()) | requirement.extras
        for text in installed[name].requires or []:
            dependency = Requirement(text)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": extra})
                                                for extra in {"", *extras}):
                queue.append(dependency)
    assert set(pins) == set(needed), f"locked but not needed: {set(pins) - set(needed)} (run its pip-compile line)"
    assert "hiredis" in needed, "the redis[hiredis] extra's parser is locked"


def test_locked_set_is_consistent_by_pips_own_check() -> None:
    """`pip check` over the lock as installed finds every requirement of every package met."""
    image_distributions()
    done = run(sys.executable, "-m", "pip", "--python", IMAGE_VENV / "bin" / "python", "check")
    assert done.returncode == 0 and "No broken requirements found" in done.stdout, done.stdout + done.stderr


def test_build_lock_is_the_build_backend() -> None:
    """requirements-build.lock pins, hashed, exactly what pyproject.toml's build-system requires."""
    pins = read_lock(BUILD_LOCK)
    requires = [Requirement(text) for text in PYPROJECT["build-system"]["requires"]]
    assert set(pins) == {canonicalize_name(r.name) for r in requires}
    for requirement in requires:
        assert requirement.specifier.contains(Version(pins[canonicalize_name(requirement.name)].version))


def test_lock_is_what_pip_compile_writes_for_python_3_11() -> None:
    """The lock says how it was made (pip-compile, hashes), for the Python of the image's base."""
    header = LOCK.read_text().split("\n\n")[0]
    assert "autogenerated by pip-compile with Python 3.11" in header
    assert "--generate-hashes" in header and "pyproject.toml" in header
    base = stages()[-1].base
    assert base.startswith("python:3.11.")


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
    assert {"pyproject.toml", "README.md", "requirements.lock", "requirements-build.lock"} <= set(context)
    assert "consumer/__main__.py" in context and any(p.startswith("consumer/lua/") for p in context)
    for copy in stages()[0].all("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert any(p == source or p.startswith(source.rstrip("/") + "/") for p in context), source
    for path in context:
        assert not path.startswith((".git/", ".venv/", ".cache/", "tests/", "localenv/", "deploy/", ".env")), path
        assert "__pycache__" not in path


def test_package_installed_from_the_build_context_runs(tmp_path: Path) -> None:
    """The build context installed as the build stage installs it runs `python -m consumer` on the locked versions."""
    context = tmp_path / "context"
    for path in build_context():
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, context / path)
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    python = venv / "bin" / "python"
    # As in the build stage: the package without dependencies, which come from the lock (.cache/venv-image).
    done = run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-compile",
               ".", cwd=context)
    assert done.returncode == 0, done.stdout + done.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    installed = sorted(p.relative_to(site).as_posix() for p in (site / "consumer").rglob("*") if p.is_file())
    assert "consumer/__main__.py" in installed and "consumer/py.typed" in installed
    assert any(p.startswith("consumer/lua/") and p.endswith(".lua") for p in installed)
    assert not (site / "localenv").exists() and not (site / "producer_examples").exists()
    image_distributions()
    (dependencies,) = (IMAGE_VENV / "lib").glob("python3*/site-packages")
    env = {"PYTHONPATH": str(dependencies)}
    done = run(python, "-m", "consumer", "--help", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m consumer")
    where = run(python, "-c", "import consumer; print(consumer.__file__)", cwd=tmp_path, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
