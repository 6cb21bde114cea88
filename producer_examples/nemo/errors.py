"""What can go wrong when publishing NeMo Evaluator results, as one tree.

::

    NemoPublisherError
    ├── InputError            the input is wrong; nothing was sent (exit code 2)
    │   ├── TargetError       a target or config file fails validation
    │   └── MappingError      a per-item file cannot be mapped: no id, duplicate ids, unreadable
    ├── EvaluatorError        NeMo Evaluator answered an error or could not be reached (exit code 1)
    │   ├── JobFailed         the job ended ``failed`` or ``cancelled``
    │   └── JobTimeout        the job did not finish within the time allowed
    └── PublishError          Kafka did not take or acknowledge the events (exit code 1)

Errors of the ``nemo-microservices`` client are translated into :class:`EvaluatorError` once, where
the client is called (``evaluator.py``), with any API key that the answer echoes redacted. A score
that cannot be sent (NaN, infinity, a failed score) is not an error: it is counted in the mapping
report.
"""

from __future__ import annotations


class NemoPublisherError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class InputError(NemoPublisherError):
    """The input (a file, an option) is wrong; nothing was sent."""

    exit_code = 2


class TargetError(InputError):
    """A target or evaluation config fails validation. The message never contains an API key."""


class MappingError(InputError):
    """A per-item result file cannot be mapped to events."""


class EvaluatorError(NemoPublisherError):
    """NeMo Evaluator answered an error, or could not be reached after retries."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JobFailed(EvaluatorError):
    """The evaluation job ended ``failed`` or ``cancelled``."""

    def __init__(self, message: str, *, job_id: str, status: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.job_status = status


class JobTimeout(EvaluatorError):
    """The evaluation job was still unfinished when the time allowed ran out."""

    def __init__(self, message: str, *, job_id: str, status: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.job_status = status


class PublishError(NemoPublisherError):
    """The events could not be published: the broker was unreachable or did not acknowledge them all.

    Publishing the same run again is safe: event ids are deterministic, so the service delivers
    what it already delivered only once.
    """
