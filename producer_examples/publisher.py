"""Publishing events to the service's topics: the one piece every producer example shares.

:class:`EventPublisher` validates each event against the service's own models before it leaves
the process (so a producer learns about a bad event at once, not from the dead-letter topic),
keys records by ``ml_app:join_key`` so both sides of a key stay ordered within their topic, and
produces with ``acks=all`` and idempotence. Leaving the ``async with`` block flushes everything
that was sent; a return from :meth:`publish_span` / :meth:`publish_result` means the broker has
queued it for sending, and :meth:`flush` waits until the broker acknowledged all of it, raising
:class:`DeliveryError` if the broker refused or never acknowledged any of it.

The broker connection is configured like the service's: ``KAFKA_BOOTSTRAP_SERVERS``,
``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_MECHANISM``, ``KAFKA_SASL_USERNAME``,
``KAFKA_SASL_PASSWORD`` (or its file in ``EVALJOIN_SECRETS_DIR``) and ``KAFKA_SSL_CAFILE``; aiokafka
options given to :class:`EventPublisher` (``security_protocol``, ``sasl_mechanism``,
``sasl_plain_username``, ``sasl_plain_password``, ``ssl_context``, ...) take precedence.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.helpers import create_ssl_context

from consumer.events import NemoResultEvent, SpanContextEvent

DEFAULT_SPAN_TOPIC = "llmobs.span-context"
DEFAULT_RESULT_TOPIC = "nemo.eval-results"


def kafka_security_from_env() -> dict[str, Any]:
    """aiokafka's security options from the service's own variables, so that a producer next to the service
    reaches a TLS/SASL cluster with the same configuration (an unsecured one when none is set)."""
    protocol = os.environ.get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT"
    options: dict[str, Any] = {"security_protocol": protocol}
    mechanism = os.environ.get("KAFKA_SASL_MECHANISM")
    if mechanism:
        options.update(sasl_mechanism=mechanism, sasl_plain_username=os.environ.get("KAFKA_SASL_USERNAME"),
                       sasl_plain_password=_secret("KAFKA_SASL_PASSWORD"))
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=os.environ.get("KAFKA_SSL_CAFILE") or None)
    return options


def _secret(name: str) -> str | None:
    """The variable, else its file in ``EVALJOIN_SECRETS_DIR`` (as the service reads a mounted Secret)."""
    value = os.environ.get(name)
    directory = os.environ.get("EVALJOIN_SECRETS_DIR")
    if value or not directory or not (Path(directory) / name).is_file():
        return value
    return (Path(directory) / name).read_text().strip()


class DeliveryError(Exception):
    """Records sent since the last :meth:`EventPublisher.flush` were not acknowledged by the broker."""

    def __init__(self, failed: int, first: BaseException) -> None:
        super().__init__(f"{failed} record(s) were not delivered: {first!r}")
        self.failed = failed
        self.first = first


class EventPublisher:
    """Async context manager that publishes span-context and NeMo result events to Kafka."""

    def __init__(self, *, bootstrap_servers: str | None = None, span_topic: str | None = None,
                 result_topic: str | None = None, linger_ms: int = 20, **producer_options: Any) -> None:
        self.span_topic = span_topic or os.environ.get("SPAN_TOPIC", DEFAULT_SPAN_TOPIC)
        self.result_topic = result_topic or os.environ.get("RESULT_TOPIC", DEFAULT_RESULT_TOPIC)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
            acks="all", enable_idempotence=True, linger_ms=linger_ms,
            **{**kafka_security_from_env(), **producer_options},
        )
        self.published = 0
        self._failures: list[BaseException] = []

    async def __aenter__(self) -> EventPublisher:
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()  # e.g. no broker reachable: release what start() opened
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.flush()
        finally:
            await self._producer.stop()

    async def publish_span(self, event: SpanContextEvent | Mapping[str, Any]) -> None:
        """Validate and send one span-context event."""
        model = event if isinstance(event, SpanContextEvent) else SpanContextEvent.model_validate(dict(event))
        await self._send(self.span_topic, model.ml_app, model.join_key,
                         model.model_dump(mode="json", exclude_none=True))

    async def publish_result(self, event: NemoResultEvent | Mapping[str, Any]) -> None:
        """Validate and send one NeMo result event."""
        model = event if isinstance(event, NemoResultEvent) else NemoResultEvent.model_validate(dict(event))
        await self._send(self.result_topic, model.ml_app, model.join_key,
                         model.model_dump(mode="json", exclude_none=True))

    async def publish_raw(self, topic: str, value: bytes, *, key: str | None = None,
                          ml_app: str | None = None) -> None:
        """Send a record as it is (e.g. a line of the guide's files), with an optional ml_app header."""
        headers = [("ml_app", ml_app.encode())] if ml_app else None
        delivery = await self._producer.send(topic, value, key=key.encode() if key else None, headers=headers)
        delivery.add_done_callback(self._note_delivery)
        self.published += 1

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged by the broker.

        Raises :class:`DeliveryError` if any record sent since the previous flush failed: aiokafka's
        own flush returns normally in that case, so the failures are collected from each record's
        delivery future.
        """
        await self._producer.flush()
        await asyncio.sleep(0)  # let the delivery callbacks of the last batches run
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(len(failures), failures[0])

    async def _send(self, topic: str, ml_app: str | None, join_key: str, body: dict[str, Any]) -> None:
        key = f"{ml_app or ''}:{join_key}".encode()
        delivery = await self._producer.send(topic, orjson.dumps(body), key=key)
        delivery.add_done_callback(self._note_delivery)
        self.published += 1

    def _note_delivery(self, delivery: asyncio.Future[Any]) -> None:
        failure = None if delivery.cancelled() else delivery.exception()
        if failure is not None:
            self._failures.append(failure)
