"""The benchmark's Quix Streams peer: ``join_interval`` of the two topics, delivered to the intake in batches.

``python -m bench.quix_peer BOOTSTRAP GROUP SPAN_TOPIC RESULT_TOPIC INTAKE_URL MAX_BATCH COMMIT_MS TTL_S
STATE_DIR DDTRACE_VERSION`` runs a Quix Streams application (in a virtualenv of its own, see
:mod:`bench.peers`): the span-context stream is joined with the NeMo result stream on the record key
(``join_interval``, the join TTL backward and forward, RocksDB state with changelog topics, at least
once), each joined pair becomes the eval-metric objects :func:`consumer.payload.build_metric` builds,
and a ``BatchingSink`` posts them to the intake in batches of at most MAX_BATCH metrics at every
checkpoint. Quix Streams flushes sinks before it commits the input offsets, so delivery is at least
once. A checkpoint is taken every COMMIT_MS, and after every MAX_BATCH input records.

Prints ``{"event": "partitions_assigned", "partitions": [...]}`` on stderr when it holds partitions of
the input topics, the line the benchmark waits for. Stops on SIGTERM (Quix Streams' own handler).
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

import httpx
import orjson

from bench.peer_view import stored_span
from consumer import payload

_BODY_HEAD = b'{"data":{"type":"evaluation_metric","attributes":{"metrics":['
_BODY_TAIL = b"]}}}"
POST_TIMEOUT_S = 10.0
RETRY_INITIAL_S = 0.1  # the first wait after a failed post...
RETRY_MAX_S = 5.0  # ...doubling up to this

quixstreams: Any = importlib.import_module("quixstreams")
_sinks: Any = importlib.import_module("quixstreams.sinks")


class IntakeSink(_sinks.BatchingSink):  # type: ignore[misc]
    """Posts each checkpoint's metrics to the eval-metric intake, retrying until a 2xx, as the service does."""

    def __init__(self, url: str, max_batch: int) -> None:
        super().__init__()
        self._url = url
        self._max_batch = max_batch
        self._client = httpx.Client(timeout=POST_TIMEOUT_S, headers={"Content-Type": "application/json",
                                                                     "DD-API-KEY": "bench-api-key"})

    def write(self, batch: Any) -> None:
        metrics: list[bytes] = []
        for item in batch:
            metrics.extend(item.value)
            while len(metrics) >= self._max_batch:
                self._post(metrics[:self._max_batch])
                del metrics[:self._max_batch]
        if metrics:
            self._post(metrics)

    def _post(self, metrics: list[bytes]) -> None:
        body = _BODY_HEAD + b",".join(metrics) + _BODY_TAIL
        delay = RETRY_INITIAL_S
        while True:
            try:
                if self._client.post(self._url, content=body).is_success:
                    return
            except httpx.TransportError:
                pass
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)


class Application(quixstreams.Application):  # type: ignore[misc]
    """Quix Streams' Application, announcing the input partitions it holds after each assignment."""

    def __init__(self, *args: Any, inputs: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inputs = inputs
        self._held: set[str] = set()

    def _on_assign(self, consumer: Any, topic_partitions: list[Any]) -> None:
        super()._on_assign(consumer, topic_partitions)
        self._held |= {f"{tp.topic}:{tp.partition}" for tp in topic_partitions if tp.topic in self._inputs}
        self._announce()

    def _on_revoke(self, consumer: Any, topic_partitions: list[Any]) -> None:
        super()._on_revoke(consumer, topic_partitions)
        self._held -= {f"{tp.topic}:{tp.partition}" for tp in topic_partitions}
        self._announce()

    def _announce(self) -> None:
        line = {"event": "partitions_assigned", "partitions": sorted(self._held)}
        sys.stderr.write(orjson.dumps(line).decode() + "\n")
        sys.stderr.flush()


def metrics(value: tuple[dict[str, Any], dict[str, Any]], key: Any, timestamp: int, headers: Any) -> list[bytes]:
    """A joined pair's eval-metric objects, encoded (the result's receive time is the record's timestamp)."""
    span, result = value
    span = stored_span(span)
    result = {**result, "received_ts_ms": timestamp}
    return [payload.encode_metric(payload.build_metric(span, result, i)) for i in range(len(result["evaluations"]))]


def main(argv: list[str]) -> int:
    bootstrap, group, span_topic, result_topic, intake_url = argv[:5]
    max_batch, commit_ms, ttl_s = int(argv[5]), int(argv[6]), int(argv[7])
    state_dir, ddtrace_version = argv[8], argv[9]
    # The service's ddtrace.version tag: ddtrace itself is not in this virtualenv.
    payload._DDTRACE_VERSION = ddtrace_version
    app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
                      commit_interval=commit_ms / 1000, commit_every=max_batch, state_dir=state_dir,
                      loglevel="WARNING", inputs={span_topic, result_topic})
    spans = app.dataframe(app.topic(span_topic, key_deserializer="str", value_deserializer="json"))
    results = app.dataframe(app.topic(result_topic, key_deserializer="str", value_deserializer="json"))
    ttl_ms = ttl_s * 1000
    joined = spans.join_interval(results, how="inner", on_merge=lambda span, result: (span, result),
                                 grace_ms=ttl_ms, backward_ms=ttl_ms, forward_ms=ttl_ms)
    joined.apply(metrics, metadata=True).sink(IntakeSink(intake_url, max_batch))
    app.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
