#!/usr/bin/env bash
# The quick start: sets up, then runs Kafka, redis-server, a local intake and the service on
# 127.0.0.1 and shows the Datadog guide's example flowing through to what Datadog would receive.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m localenv.demo
