"""An AttributeError or TypeError escaping redis-py: a lost connection only when its connection code raised it."""

from __future__ import annotations

import os
from typing import Any

import pytest

from consumer.errors import Unavailable
from consumer.store_redis import _redis_calls

pytestmark = pytest.mark.unit


def _raiser(filename: str, error: str) -> Any:
    """A function whose code says it lives in ``filename`` and raises ``error`` there, as redis-py's own would."""
    namespace: dict[str, Any] = {}
    exec(compile(f"def send():\n    raise {error}\n", filename, "exec"), namespace)
    return namespace["send"]


CONNECTION = os.path.join(os.sep, "site-packages", "redis", "asyncio", "connection.py")
CLIENT = os.path.join(os.sep, "site-packages", "redis", "asyncio", "client.py")


@pytest.mark.parametrize("error", ["AttributeError(\"'NoneType' object has no attribute 'writelines'\")",
                                   "TypeError(\"'NoneType' object is not callable\")"])
def test_a_connection_torn_down_under_a_command_is_retryable(error: str) -> None:
    """Raised with redis-py's connection code innermost (a connection closed by another task): Unavailable."""
    send = _raiser(CONNECTION, error)
    with pytest.raises(Unavailable, match="connection closed under a command"), _redis_calls():
        send()


def test_the_same_error_elsewhere_stays_a_defect() -> None:
    """Raised in other redis-py code or in ours, the error passes unchanged: the process stops as for any defect."""
    send = _raiser(CLIENT, "AttributeError('x')")
    with pytest.raises(AttributeError), _redis_calls():
        send()
    with pytest.raises(TypeError), _redis_calls():
        raise TypeError("ours")
