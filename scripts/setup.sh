#!/usr/bin/env bash
# Installs everything the service, its demo and its tests need on a fresh Debian machine:
# redis-server and openssl (Debian; openssl makes the throwaway TLS certificates of the security
# tests), a JDK and Maven for the Kafka broker and the benchmark's Kafka Streams peer, the Python
# packages in .venv and the Apache Kafka jars from Maven Central; with --chart-tools (the test
# command) also the benchmark's peers, valgrind (bench.hot_path --instructions), helm (built with Go) and the
# chart and Dockerfile linters.
# Safe to run again; it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# A JDK, not only a JRE: the benchmark's Kafka Streams peer (bench/kstreams) is compiled by Maven.
command -v javac >/dev/null 2>&1 || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
# The test tools: valgrind counts instructions for `python -m bench.hot_path --instructions` (tests/test_bench_smoke.py).
if [ "${1:-}" = "--chart-tools" ]; then
  command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev,examples,aws-msk-iam]'
  touch .venv/.installed
fi

.venv/bin/python -m localenv fetch >/dev/null

if [ "${1:-}" != "--chart-tools" ]; then
  echo "setup: ready"
  exit 0
fi

# The test command also needs the benchmark's peers (tests/test_bench_smoke.py; python -m bench):
# Quix Streams in .cache/venv-quix (bench/quix-requirements.txt), the Kafka Streams application built
# with Maven into .cache/kstreams-peer-*. Skipped while they match their sources; the demo needs neither.
.venv/bin/python -m bench.peers >/dev/null

# --chart-tools (scripts/test.sh passes it): the Helm chart's and the image's checks
# (tests/test_chart.py, tests/test_dockerfile.py); the demo does not need them.
# helm: built from its Go module with the flags of a release build, so that it reports its own
# version and assumes the Kubernetes version of its client-go (1.37 for helm 3.22) as a release
# binary does. About 2 to 4 minutes on 2 cores the first time; skipped while .cache/bin/helm is
# this version.
helm_version=v3.22.0
helm_kube_minor=37
if [ "$(.cache/bin/helm version --template '{{.Version}}' 2>/dev/null)" != "$helm_version" ]; then
  command -v go >/dev/null 2>&1 || { echo "setup: Go is needed to build helm" >&2; exit 1; }
  echo "setup: building helm $helm_version"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags="$ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_kube_minor"
  done
  mkdir -p .cache/bin
  CGO_ENABLED=0 GOBIN="$PWD/.cache/bin" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$helm_version"
fi
# checkov, kubernetes-validate and hadolint: the `chart` extra of pyproject.toml, installed into a
# venv of their own so that their pinned dependencies never touch the service's .venv.
if [ ! -x .cache/venv-chart/bin/python ]; then
  echo "setup: creating .cache/venv-chart"
  "$python" -m venv .cache/venv-chart
fi
if [ ! -f .cache/venv-chart/.installed ] || [ pyproject.toml -nt .cache/venv-chart/.installed ]; then
  echo "setup: installing the chart tools into .cache/venv-chart"
  "$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["chart"]))' \
    > .cache/venv-chart/requirements.txt
  .cache/venv-chart/bin/python -m pip install -q --disable-pip-version-check -r .cache/venv-chart/requirements.txt
  touch .cache/venv-chart/.installed
fi
# The image's dependencies, installed as the Dockerfile installs them (requirements.lock, every file
# checked against its hash, into a venv without pip), so that tests/test_dockerfile.py can check that
# the lock is consistent and matches pyproject.toml, and run the service on exactly those versions.
if [ ! -f .cache/venv-image/.installed ] || [ requirements.lock -nt .cache/venv-image/.installed ]; then
  echo "setup: installing requirements.lock into .cache/venv-image"
  rm -rf .cache/venv-image
  "$python" -m venv --without-pip .cache/venv-image
  "$python" -m pip --python .cache/venv-image/bin/python install -q --disable-pip-version-check \
    --require-hashes -r requirements.lock
  touch .cache/venv-image/.installed
fi
echo "setup: ready"
