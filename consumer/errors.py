"""Every failure the consumer tells apart, and the one thing each means.

    EvalJoinError
    ├── InvalidMessage        bad input; dead-lettered with ``reason``, never retried
    ├── DeliveryError         the intake did not take a request
    │   ├── RetryableDelivery   408, 429, 5xx, timeout, connection error: retried with backoff
    │   └── RejectedDelivery    any other 4xx: the evaluations in it are dead-lettered
    └── DlqLimitExceeded      so much input is bad that a deploy is probably broken: halt, commit nothing

Third-party errors (httpx, aiokafka, redis) are translated into these once, where they are raised
(``raise ... from exc``); callers branch on the class or on ``retriable``, never on message text.
"""

from __future__ import annotations


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


class DeliveryError(EvalJoinError):
    """The intake did not accept a request."""

    def __init__(self, detail: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.body = body


class RetryableDelivery(DeliveryError):
    """Transient: the same request may succeed later (after ``retry_after`` seconds, if the intake said)."""

    retriable = True

    def __init__(self, detail: str, *, status: int | None = None, body: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(detail, status=status, body=body)
        self.retry_after = retry_after


class RejectedDelivery(DeliveryError):
    """Permanent: the intake refused the request's content; sending it again will not help."""


class DlqLimitExceeded(EvalJoinError):
    """Too many messages were invalid; the consumer stops before dead-lettering any more."""
