# syntax=docker/dockerfile:1
# The evaljoin consumer: `python -m consumer` (see deploy/helm/evaljoin for running it on
# Kubernetes). Build from the repository root:
#
#   docker build -t evaljoin:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE=https://github.com/<owner>/<repository> .
#
# Two stages: the first installs the locked dependencies, then the package, into a virtualenv;
# the second is the slim Python image with that virtualenv, tini as PID 1, and no pip, no
# setuptools and no compiler.

FROM python:3.11.14-slim-trixie AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The dependencies first, in a layer of their own, so that a change to the code does not reinstall
# them: exactly the versions requirements.lock pins (made from pyproject.toml by pip-compile), each
# file checked against its hash; in this mode pip refuses any package the lock does not name.
# setuptools, which builds the package below, is locked the same way (requirements-build.lock).
COPY requirements.lock requirements-build.lock ./
RUN python -m venv --without-pip /opt/evaljoin \
    && python -m pip install --no-cache-dir --require-hashes -r requirements-build.lock \
    && python -m pip --python /opt/evaljoin/bin/python install --no-cache-dir --no-compile --require-hashes \
       -r requirements.lock
# The service alone: the producer examples and the local test services stay out of the image. Its
# dependencies are in already (--no-deps); it is built with the locked setuptools, not a download.
COPY pyproject.toml README.md ./
COPY consumer/ consumer/
RUN python -m pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
    && python -m pip --python /opt/evaljoin/bin/python install --no-cache-dir --no-compile --no-deps \
       /tmp/dist/evaljoin-*.whl \
    && /opt/evaljoin/bin/python -m compileall -q --invalidation-mode checked-hash /opt/evaljoin/lib

FROM python:3.11.14-slim-trixie
# Where the image came from (OCI annotations): the version, the commit and the repository, given as
# build arguments.
ARG VERSION=0.1.0
ARG REVISION=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="evaljoin" \
      org.opencontainers.image.description="Joins LLM Observability span context with NeMo Evaluator results and delivers the evaluations to Datadog" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
# tini (Debian's) runs as PID 1: it forwards SIGTERM to the service and reaps what the service's
# children leave (ddtrace's crash tracker), which a Python process as PID 1 would not; and a signal
# sent before the service installs its handlers is not lost to PID 1's ignore-by-default rule.
# Then the runtime needs no package installer: remove the base image's pip.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-3+b8 \
    && rm -rf /var/lib/apt/lists/* \
    && python -m pip uninstall --yes --quiet pip setuptools wheel \
    && groupadd --system --gid 10001 evaljoin \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin evaljoin
COPY --from=build /opt/evaljoin /opt/evaljoin
ENV PATH=/opt/evaljoin/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes can verify runAsNonRoot; the chart runs it with the same UID and GID.
USER 10001:10001
# /healthz, /readyz and /metrics (HEALTH_PORT).
EXPOSE 8080
# The same check as the chart's liveness probe: /healthz answers 200 while the consume loop makes
# progress (503 otherwise, and nothing while Kafka and Redis are still being connected).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HEALTH_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["tini", "--", "python", "-m", "consumer"]
