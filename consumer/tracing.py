"""Self-tracing with ddtrace APM, off unless ``DD_TRACE_ENABLED=true``.

When on, aiokafka, httpx and redis calls are traced by ddtrace's integrations (with Data Streams
Monitoring checkpoints for Kafka when ``DD_DATA_STREAMS_ENABLED=true``), and the consumer adds a
span per batch (``evaljoin.batch``) and per delivery (``evaljoin.deliver``). ddtrace reads
``DD_SERVICE``, ``DD_ENV``, ``DD_VERSION`` and the Agent address from the environment itself.
Unlike ddtrace's own default, tracing is off by default here: a consumer without an Agent next to
it should not log a failed trace upload every second.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_tracer: Any = None


def enable_tracing() -> None:
    """Patch the client libraries and start tracing. Call once, before the clients are created."""
    global _tracer
    from ddtrace import patch
    from ddtrace.trace import tracer

    patch(aiokafka=True, httpx=True, redis=True)
    _tracer = tracer


@contextmanager
def span(name: str, **tags: str | int) -> Iterator[None]:
    """A span named ``name`` when tracing is on; nothing otherwise."""
    if _tracer is None:
        yield
        return
    with _tracer.trace(name, service=None, resource=name) as current:
        for key, value in tags.items():
            current.set_tag(key, value)
        yield
