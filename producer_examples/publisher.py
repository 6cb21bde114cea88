"""Publishing events to the service's topics: the one piece every producer example shares.

:class:`EventPublisher` validates each event against the service's own models before it leaves
the process (so a producer learns about a bad event at once, not from the dead-letter topic),
keys records by ``ml_app:join_key`` so both sides of a key stay ordered within their topic, and
produces with ``acks=all`` and idempotence. Leaving the ``async with`` block flushes everything
that was sent; a return from :meth:`publish_span` / :meth:`publish_result` means the broker has
queued it for sending, and :meth:`flush` waits until the broker acknowledged all of it, raising
:class:`DeliveryError` if the broker refused or never acknowledged any of it.

The broker connection and the topics are the service's own :class:`~consumer.config.KafkaSettings`,
read by :func:`kafka_settings` from the same variables and secret files (``KAFKA_BOOTSTRAP_SERVERS``,
``KAFKA_CLIENT_ID``, ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_MECHANISM``, ``KAFKA_SASL_USERNAME``,
``KAFKA_SASL_PASSWORD`` or its file in ``EVALJOIN_SECRETS_DIR``, ``KAFKA_SSL_CAFILE``, ``SPAN_TOPIC``,
``RESULT_TOPIC``) with the same defaults, so a producer next to the service reaches the same (TLS/SASL)
cluster. aiokafka options given to :class:`EventPublisher` (``security_protocol``, ``sasl_mechanism``,
``sasl_plain_username``, ``sasl_plain_password``, ``ssl_context``, ...) take precedence.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from consumer.config import KafkaSettings, Settings, config_errors, load_kafka_settings
from consumer.events import NemoResultEvent, SpanContextEvent

LINGER_MS = 20  # how long the producer waits to fill a batch before sending it
MAX_MESSAGE_BYTES: int = Settings.model_fields["max_message_bytes"].default  # the service's default limit


class KafkaConfigError(ValueError):
    """The Kafka variables (or the values given on top) are invalid; the message names them, never their values."""


def kafka_settings(*, bootstrap_servers: str | None = None, span_topic: str | None = None,
                   result_topic: str | None = None) -> KafkaSettings:
    """The service's Kafka settings, read as the service reads them, with the values given (command-line flags) on top.

    Raises :class:`KafkaConfigError` when they are invalid, e.g. a SASL setup missing its password.
    """
    given = {"kafka_bootstrap_servers": bootstrap_servers, "span_topic": span_topic, "result_topic": result_topic}
    try:
        return load_kafka_settings(**{name: value for name, value in given.items() if value})
    except ValidationError as exc:
        # pydantic's own text quotes the input, secrets included: say what is wrong in the service's words.
        # Imported here only: consumer.cli loads the whole service, which a producer otherwise never needs.

        raise KafkaConfigError(f"invalid Kafka configuration:\n{config_errors(exc)}") from None


def add_kafka_arguments(parser: argparse._ActionsContainer, *, topics: tuple[Literal["span", "result"], ...],
                        bootstrap_flag: str = "--bootstrap") -> None:
    """The flags that override :func:`kafka_settings`: the brokers, and the topic of each side a command publishes."""
    fields = KafkaSettings.model_fields
    parser.add_argument(bootstrap_flag, dest="bootstrap", help="Kafka bootstrap servers (default: "
                        f"$KAFKA_BOOTSTRAP_SERVERS or {fields['kafka_bootstrap_servers'].default})")
    for side in topics:
        name = f"{side}_topic"
        parser.add_argument(f"--{side}-topic", dest=name, help=f"default: ${name.upper()} or {fields[name].default}")


def kafka_settings_from(args: argparse.Namespace) -> KafkaSettings:
    """:func:`kafka_settings` with the flags of :func:`add_kafka_arguments` on top."""
    return kafka_settings(bootstrap_servers=args.bootstrap, span_topic=getattr(args, "span_topic", None),
                          result_topic=getattr(args, "result_topic", None))


def raw_headers(*, ml_app: str | None = None, run_id: str | None = None) -> list[tuple[str, bytes]]:
    """The headers of a record published as it is: what the service reads when the record does not say."""
    given = {"ml_app": ml_app, "run_id": run_id}
    return [(name, value.encode()) for name, value in given.items() if value]


class DeliveryError(Exception):
    """Records sent since the last :meth:`EventPublisher.flush` were not acknowledged by the broker."""

    def __init__(self, failed: int, first: BaseException) -> None:
        super().__init__(f"{failed} record(s) were not delivered: {first!r}")
        self.failed = failed
        self.first = first


class EventPublisher:
    """Async context manager that publishes span-context and NeMo result events to Kafka."""

    def __init__(self, *, kafka: KafkaSettings | None = None, bootstrap_servers: str | None = None,
                 span_topic: str | None = None, result_topic: str | None = None, linger_ms: int = LINGER_MS,
                 **producer_options: Any) -> None:
        """Publish to the cluster and topics of ``kafka``, by default :func:`kafka_settings` of the values given.

        Raises :class:`KafkaConfigError` when the Kafka variables are invalid.
        """
        if kafka is None:
            kafka = kafka_settings(bootstrap_servers=bootstrap_servers, span_topic=span_topic,
                                   result_topic=result_topic)
        elif bootstrap_servers or span_topic or result_topic:
            raise TypeError("give kafka settings or the values to read them with, not both")
        self.span_topic = kafka.span_topic
        self.result_topic = kafka.result_topic
        self._producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=linger_ms,
                                          **{**kafka.kafka_client_options(), **producer_options})
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

    async def publish_raw(self, topic: str, value: bytes, *, key: str | None = None, ml_app: str | None = None,
                          run_id: str | None = None) -> None:
        """Send a record as it is (e.g. a line of the guide's files), with optional ``ml_app`` and ``run_id``
        headers (the service reads them for a record that does not name its own)."""
        headers = raw_headers(ml_app=ml_app, run_id=run_id) or None
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
