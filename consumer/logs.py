"""Logging: structlog events, JSON in production, readable on a terminal, secrets never printed.

Library logs (aiokafka, httpx, redis) go through the same processors, so the redactor sees them
too. Every line about one record carries its topic, partition and offset (and, once decoded, its
ml_app and join key): bound with ``structlog.contextvars.bound_contextvars`` where a record is
dead-lettered, and passed as fields where an evaluation is refused (its result record) and where an
unmatched side is reported (its own record).
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import quote

import structlog

_SECRET_KEY = re.compile(r"(api[_-]?key|password|passwd|secret|token|authorization)", re.IGNORECASE)
REDACTED = "[redacted]"


class Redactor:
    """Replaces configured secret values anywhere in an event, and values of secret-named keys.

    Each secret is also looked for percent-encoded (as it would sit in a URL) and base64-encoded
    (as in a Basic or SASL PLAIN credential), the forms a library could echo it in.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms = {form for s in secrets if len(s) >= 4 for form in _encoded_forms(s)}
        self._secrets = sorted(forms, key=len, reverse=True)

    def text(self, value: str) -> str:
        """``value`` with every secret replaced, for output that does not go through logging."""
        return str(self._clean(value))

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else self._clean(v)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if isinstance(value, BaseException):
            return self._clean(str(value))
        return value

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event):
            if _SECRET_KEY.search(key):
                event[key] = REDACTED
            else:
                event[key] = self._clean(event[key])
        return event


def _encoded_forms(secret: str) -> set[str]:
    encoded = base64.b64encode(secret.encode()).decode()
    return {secret, quote(secret, safe=""), encoded, encoded.rstrip("=")}


def configure_logging(*, level: str = "INFO", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    redact = Redactor(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,  # after the traceback is text, so secrets in exceptions are caught too
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "httpx", "httpcore", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
