"""Every failure the consumer tells apart, and the one thing each means.

    EvalJoinError
    ├── InvalidMessage          bad input; dead-lettered with ``reason``, never retried
    ├── DependencyError         Kafka, Redis or the intake failed; ``component`` says which
    │   ├── Unavailable           retriable: it may pass by itself (connection lost, timeout, a leader
    │   │   │                     or primary moving, Redis out of memory); the stage is done again
    │   │   │                     after a backoff
    │   │   └── RetryableDelivery   the intake: 408, 425, 429, 5xx, timeout, connection error
    │   ├── ServiceRefused        not retriable: the dependency refuses this service, not a message
    │   │                         (credentials, ACLs, a wrong site or Agent URL: intake 401, 403, 404,
    │   │                         407; Kafka or Redis authentication or authorisation). Only an operator
    │   │                         can fix it: the service logs it as an error, reports not ready with
    │   │                         the reason, and checks again at the slowest backoff
    │   └── (itself)              not retriable, and nothing the service knows how to wait out: a
    │                             defect or a broken deployment; the process exits (code 1)
    ├── RejectedDelivery        the intake refused a request's content; its evaluations are dead-lettered
    └── DlqLimitExceeded        so much input is bad that a deploy is probably broken: halt, commit nothing

Third-party errors are translated once, where the library is called (:func:`kafka_errors`,
:func:`redis_errors`, and the sink for httpx), as httpx's ``map_httpcore_exceptions`` does
(``raise ... from exc``). Callers branch on the class or on ``retriable``, never on message text.
"""

from __future__ import annotations

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


def translate_kafka(exc: BaseException) -> DependencyError:
    """What an aiokafka (or socket) error means to the service."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, _KAFKA_REFUSALS):
        return ServiceRefused("kafka", detail, hint=KAFKA_HINT)
    if isinstance(exc, _KAFKA_TRANSIENT) or getattr(exc, "retriable", False):
        return Unavailable("kafka", detail)
    return DependencyError("kafka", detail)


def translate_redis(exc: BaseException) -> DependencyError:
    """What a redis-py (or socket) error means to the service.

    Authentication and ACL refusals are checked first: redis-py makes them subclasses of its
    ``ConnectionError``. Out of memory (``noeviction``), a primary that turned replica after a
    failover, a loading or busy server and a cluster moving slots pass by themselves.
    """
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, redis.AuthenticationError | redis.AuthorizationError | redis.NoPermissionError):
        return ServiceRefused("redis", detail, hint=REDIS_HINT)
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
def redis_errors() -> Iterator[None]:
    """Translate what escapes a redis-py call into this tree (``raise ... from exc``)."""
    try:
        yield
    except (redis.RedisError, redis.RedisClusterException, OSError, TimeoutError) as exc:
        raise translate_redis(exc) from exc
