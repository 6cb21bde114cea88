# syntax=docker/dockerfile:1
# The evaljoin consumer: `python -m consumer` (see deploy/helm/evaljoin for running it on
# Kubernetes). Build from the repository root:
#
#   docker build -t evaljoin:0.1.0 .
#
# Two stages: the first installs the package and its dependencies (all prebuilt wheels) into a
# virtualenv; the second is the slim Python image with that virtualenv and no pip, no setuptools
# and no compiler.

FROM python:3.11.14-slim-trixie AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The service alone: the producer examples and the local test services stay out of the image.
COPY pyproject.toml README.md ./
COPY consumer/ consumer/
RUN python -m venv --without-pip /opt/evaljoin \
    && python -m pip --python /opt/evaljoin/bin/python install --no-cache-dir --no-compile . \
    && /opt/evaljoin/bin/python -m compileall -q --invalidation-mode checked-hash /opt/evaljoin/lib

FROM python:3.11.14-slim-trixie
LABEL org.opencontainers.image.title="evaljoin" \
      org.opencontainers.image.description="Joins LLM Observability span context with NeMo Evaluator results and delivers the evaluations to Datadog" \
      org.opencontainers.image.licenses="Apache-2.0"
# The runtime needs no package installer: remove the base image's.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
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
ENTRYPOINT ["python", "-m", "consumer"]
