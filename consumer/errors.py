"""Every failure the consumer tells apart, and the one thing each means.

    EvalJoinError
    ├── InvalidMessage          bad input; dead-lettered with ``reason``, never retried
    ├── NotSent                 valid input that gives nothing to send: a judge line without a rating
    │                           (``unrated``: reported on the dead-letter topic, but not bad input), or
    │                           about another model than the app's (``other_model``: counted only)
    ├── DependencyError         Kafka, Redis or the intake failed; ``component`` says which
    │   ├── Unavailable           retriable: it may pass by itself (connection lost, timeout, a leader
    │   │   │                     or primary moving, Redis out of memory); the stage is done again
    │   │   │                     after a backoff
    │   │   ├── RedisOutOfMemory    Redis at maxmemory with noeviction refuses writes: the batch is held
    │   │   │                       and retried, the service unready (reason, log, metric) until memory frees
    │   │   └── RetryableDelivery   the intake: 408, 425, 429, 5xx, timeout, connection error
    │   ├── ServiceRefused        not retriable: the dependency refuses this service, not a message
    │   │                         (credentials, ACLs, a wrong site or Agent URL: intake 401, 403, 404,
    │   │                         407; Kafka or Redis authentication or authorisation). Only an operator
    │   │                         can fix it: the service logs it as an error, reports not ready with
    │   │                         the reason, and checks again at the slowest backoff
    │   ├── Misconfigured         not retriable: a setting asks for what the dependency does not do or
    │   │                         allow (idempotent producing on a broker without InitProducerId, a session
    │   │                         timeout outside the broker's bounds, a client certificate that does not
    │   │                         load, a Redis TLS certificate that does not verify, REDIS_URL naming a
    │   │                         replica); the process exits with code 2 and the message names the setting
    │   └── (itself)              not retriable, and nothing the service knows how to wait out: a
    │                             defect or a broken deployment; the process exits (code 1)
    ├── RejectedDelivery        the intake refused a request's content; its evaluations are dead-lettered
    └── DlqLimitExceeded        so much input is bad that a deploy is probably broken: halt, commit nothing

Third-party errors are translated once, where the library is called (:func:`kafka_errors`,
:func:`redis_errors`, and the sink for httpx), as httpx's ``map_httpcore_exceptions`` does
(``raise ... from exc``). Callers branch on the class or on ``retriable``, never on message text.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from aiokafka import errors as kafka
from redis import exceptions as redis


class EvalJoinError(Exception):
    """Base class of the consumer's own errors."""

    retriable: bool = False


class InvalidMessage(EvalJoinError):
    """A message that can never be processed as it is.

    ``reason`` is a short stable code (``invalid_json``, ``schema``, ``oversize`` ...) that goes into
    the dead-letter headers and metrics; ``detail`` is a human-readable explanation.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class NotSent(EvalJoinError):
    """A valid message that gives no evaluation: ``unrated`` (reported) or ``other_model`` (counted only).

    Not bad input: it does not count towards the dead-letter limits. ``cause`` says why an unrated
    judge line is unrated (``unparsed_rating``, ``missing``, ``nan``).
    """

    def __init__(self, reason: str, detail: str, *, cause: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.cause = cause

    @property
    def reported(self) -> bool:
        """Whether the record goes to the dead-letter topic (an unrated line: someone may judge it again)."""
        return self.reason == "unrated"


class DependencyError(EvalJoinError):
    """Kafka, Redis or the intake failed. Not retriable unless a subclass says so."""

    def __init__(self, component: str, detail: str) -> None:
        super().__init__(f"{component}: {detail}")
        self.component = component
        self.detail = detail


class Unavailable(DependencyError):
    """Transient: the same call may succeed later."""

    retriable = True


class ServiceRefused(DependencyError):
    """The dependency refuses this service (credentials, permissions, address); an operator must act."""

    def __init__(self, component: str, detail: str, *, hint: str) -> None:
        super().__init__(component, detail)
        self.hint = hint


class Misconfigured(DependencyError):
    """A setting that cannot work with the dependency as it is; ``setting`` names the variable to change."""

    def __init__(self, component: str, setting: str, detail: str) -> None:
        super().__init__(component, detail)
        self.setting = setting


class RedisOutOfMemory(Unavailable):
    """Redis refuses writes: its used memory is over ``maxmemory`` and its policy is ``noeviction``.

    Retried like any :class:`Unavailable` (nothing is dead-lettered, no offset moves), until someone frees
    memory or raises ``maxmemory``; meanwhile the service reports not ready (:class:`consumer.store_redis.MemoryAlarm`).
    """


class RetryableDelivery(Unavailable):
    """The intake did not take a request this time (after ``retry_after`` seconds, if it said, try again)."""

    def __init__(self, detail: str, *, status: int | None = None, body: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__("intake", detail)
        self.status = status
        self.body = body
        self.retry_after = retry_after


class RejectedDelivery(EvalJoinError):
    """Permanent: the intake refused the request's content; sending it again will not help."""

    def __init__(self, detail: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.body = body


class DlqLimitExceeded(EvalJoinError):
    """Too many messages were invalid; the consumer stops before dead-lettering any more."""


# -- translation at the boundary ------------------------------------------------------------------

_KAFKA_REFUSALS: tuple[type[Exception], ...] = (
    kafka.TopicAuthorizationFailedError, kafka.GroupAuthorizationFailedError, kafka.ClusterAuthorizationFailedError,
    kafka.TransactionalIdAuthorizationFailed, kafka.SaslAuthenticationFailed, kafka.AuthenticationFailedError,
    kafka.AuthenticationMethodNotSupported, kafka.UnsupportedSaslMechanismError, kafka.IllegalSaslStateError,
)
# Transient although aiokafka does not mark them ``retriable``: a produce or request that timed out, no
# broker reachable yet, a replica or leader moving, a rebalance under way.
_KAFKA_TRANSIENT: tuple[type[Exception], ...] = (
    OSError, TimeoutError, kafka.KafkaTimeoutError, kafka.KafkaUnavailableError, kafka.BrokerNotAvailableError,
    kafka.ReplicaNotAvailableError, kafka.RebalanceInProgressError, kafka.NotEnoughReplicasError,
)
KAFKA_HINT = "check KAFKA_SASL_* credentials and the ACLs of this user on the topics and the consumer group"
REDIS_HINT = "check REDIS_USERNAME / REDIS_PASSWORD and the ACL of this user (README: the ACL line)"


# What an idempotent producer's start (its InitProducerId request) fails with on a broker that does not give
# producer ids: Kafka-compatible brokers without idempotence answer UNKNOWN_SERVER_ERROR, CLUSTER_AUTHORIZATION_FAILED
# or UNSUPPORTED_VERSION; Apache Kafka answers CLUSTER_AUTHORIZATION_FAILED to a user with neither IdempotentWrite on
# the cluster nor Write on any topic.
_PRODUCER_ID_REFUSALS: tuple[type[Exception], ...] = (
    kafka.UnknownError, kafka.ClusterAuthorizationFailedError, kafka.UnsupportedVersionError,
    kafka.IncompatibleBrokerVersion,
)
IDEMPOTENCE_HINT = ("the broker gives no producer id to an idempotent producer: a Kafka-compatible broker without "
                    "idempotent producers, or (Apache Kafka) a user with neither IdempotentWrite on the cluster nor "
                    "Write on any topic. Set KAFKA_ENABLE_IDEMPOTENCE=false (dead letters and unmatched reports may "
                    "then be written twice after a retried produce), or grant the permission")
SESSION_TIMEOUT_HINT = ("the broker refused KAFKA_SESSION_TIMEOUT_MS: it must lie within the broker's "
                        "group.min.session.timeout.ms and group.max.session.timeout.ms (Kafka's defaults: "
                        "6000 and 1800000)")


def translate_kafka(exc: BaseException) -> DependencyError:
    """What an aiokafka (or socket) error means to the service."""
    detail = f"{type(exc).__name__}: {exc}"
    # aiokafka's group coordinator wraps the JoinGroup answer in a KafkaError; the broker's code is its cause.
    if isinstance(exc, kafka.InvalidSessionTimeoutError) or isinstance(exc.__cause__, kafka.InvalidSessionTimeoutError):
        return Misconfigured("kafka", "KAFKA_SESSION_TIMEOUT_MS", f"{SESSION_TIMEOUT_HINT} ({detail})")
    if isinstance(exc, _KAFKA_REFUSALS):
        return ServiceRefused("kafka", detail, hint=KAFKA_HINT)
    if isinstance(exc, _KAFKA_TRANSIENT) or getattr(exc, "retriable", False):
        return Unavailable("kafka", detail)
    return DependencyError("kafka", detail)


# OpenSSL's verify codes for a certificate issued for another name or address than the one connected to.
_X509_HOSTNAME_MISMATCH = 62
_X509_IP_ADDRESS_MISMATCH = 64


def certificate_not_verified(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The TLS certificate verification failure ``exc`` is or wraps (redis-py raises its ``ConnectionError``
    while handling it: ``__context__``; others chain it as ``__cause__``); None for anything else, among
    them a handshake cut by the network (``SSLEOFError``, a reset), which may pass by itself."""
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        pending += [current.__context__, current.__cause__]
    return None


def redis_certificate_refusal(error: ssl.SSLCertVerificationError, detail: str) -> Misconfigured:
    """A Redis server whose certificate does not verify, as :class:`Misconfigured` naming what to change:
    the host connected to when the certificate is for other names, else REDIS_SSL_CAFILE."""
    why = error.verify_message or str(error)
    if error.verify_code in (_X509_HOSTNAME_MISMATCH, _X509_IP_ADDRESS_MISMATCH):
        return Misconfigured("redis", "REDIS_URL", f"the Redis server's TLS certificate is not issued for the host "
                             f"connected to ({why}): use in REDIS_URL a host name or address the certificate "
                             f"names (with Sentinel, the sentinels give the address) ({detail})")
    return Misconfigured("redis", "REDIS_SSL_CAFILE", f"the Redis server's TLS certificate does not verify ({why}): "
                         "set REDIS_SSL_CAFILE to the CA certificate that signed it (unset, the system's CAs are "
                         f"used), or renew it on the server if it expired ({detail})")


def translate_redis(exc: BaseException) -> DependencyError:
    """What a redis-py (or socket) error means to the service.

    A TLS certificate that does not verify is :class:`Misconfigured` (it will not verify on the next
    try either). Authentication and ACL refusals are checked next: redis-py makes them subclasses of its
    ``ConnectionError``. Out of memory (``noeviction``), a primary that turned replica after a
    failover, a loading or busy server and a cluster moving slots pass by themselves.
    """
    detail = f"{type(exc).__name__}: {exc}"
    unverified = certificate_not_verified(exc)
    if unverified is not None:
        return redis_certificate_refusal(unverified, detail)
    if isinstance(exc, redis.AuthenticationError | redis.AuthorizationError | redis.NoPermissionError):
        return ServiceRefused("redis", detail, hint=REDIS_HINT)
    if isinstance(exc, redis.OutOfMemoryError):
        return RedisOutOfMemory("redis", detail)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | redis.ClusterError | redis.TryAgainError
                  | redis.ReadOnlyError | redis.OutOfMemoryError | redis.SlotNotCoveredError
                  | redis.MaxConnectionsError | OSError | TimeoutError):
        return Unavailable("redis", detail)
    if isinstance(exc, redis.ResponseError) and str(exc).startswith(("BUSY", "MASTERDOWN", "LOADING", "NOREPLICAS")):
        return Unavailable("redis", detail)
    return DependencyError("redis", detail)


@contextmanager
def kafka_errors() -> Iterator[None]:
    """Translate what escapes an aiokafka call into this tree (``raise ... from exc``)."""
    try:
        yield
    except (kafka.KafkaError, OSError, TimeoutError) as exc:
        raise translate_kafka(exc) from exc


@contextmanager
def producer_start_errors(*, idempotent: bool) -> Iterator[None]:
    """Around ``AIOKafkaProducer.start()``: an idempotent producer refused its producer id is :class:`Misconfigured`,
    naming KAFKA_ENABLE_IDEMPOTENCE (aiokafka says only ``UnknownError``); anything else passes unchanged."""
    try:
        yield
    except _PRODUCER_ID_REFUSALS as exc:
        if not idempotent:
            raise
        raise Misconfigured("kafka", "KAFKA_ENABLE_IDEMPOTENCE",
                            f"{IDEMPOTENCE_HINT} ({type(exc).__name__}: {exc})") from exc


@contextmanager
def kafka_errors_logged() -> Iterator[list[str]]:
    """The errors aiokafka logs meanwhile: its exception only says "Unable to bootstrap", the log says why
    (connection refused, a TLS certificate not trusted, SASL credentials refused)."""
    reasons: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reasons.append(record.getMessage())

    handler = Collect(logging.ERROR)
    logger = logging.getLogger("aiokafka")
    logger.addHandler(handler)
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)


# What aiokafka logs when the brokers answer but refuse this client (it raises only "Unable to bootstrap").
_KAFKA_REFUSAL_MARKS = ("SaslAuthenticationFailed", "AuthenticationFailed", "CERTIFICATE_VERIFY_FAILED",
                        "UnsupportedSaslMechanism", "IllegalSaslState")


def kafka_refusal(reasons: list[str]) -> ServiceRefused | None:
    """A refusal among what aiokafka logged while bootstrapping, if any: credentials or a CA that cannot work."""
    for reason in reasons:
        if any(mark in reason for mark in _KAFKA_REFUSAL_MARKS):
            return ServiceRefused("kafka", reason, hint=KAFKA_HINT)
    return None


@contextmanager
def redis_errors() -> Iterator[None]:
    """Translate what escapes a redis-py call into this tree (``raise ... from exc``)."""
    try:
        yield
    except (redis.RedisError, redis.RedisClusterException, OSError, TimeoutError) as exc:
        raise translate_redis(exc) from exc
