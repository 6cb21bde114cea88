#!/usr/bin/env bash
# The test command: sets up (see setup.sh), checks types and lint, then runs every test against
# real Kafka, Redis, Redis Cluster and HTTP intakes that the tests start on 127.0.0.1.
# Extra arguments go to pytest, e.g. scripts/test.sh -k cluster
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --chart-tools
.venv/bin/ruff check consumer localenv producer_examples bench tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
