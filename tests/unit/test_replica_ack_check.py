"""`check`'s decision on REDIS_WAIT_REPLICAS against the replicas each primary has connected."""

from __future__ import annotations

import pytest

from consumer.ops.check import replica_ack_finding

pytestmark = pytest.mark.unit


def verdict(wait: int, replicas: dict[str, int]) -> str:
    finding = replica_ack_finding(wait, replicas)
    return "fail" if not finding.ok else ("warn" if finding.warning else "ok")


@pytest.mark.parametrize(("wait", "replicas", "expected"), [
    (0, {"the primary": 0}, "ok"),  # nothing to fail over to, nothing to wait for
    (0, {"the primary": 2}, "warn"),  # a failover can lose acknowledged writes
    (1, {"the primary": 1}, "ok"),
    (1, {"the primary": 2}, "warn"),  # a failover can promote the replica that did not acknowledge
    (2, {"the primary": 2}, "ok"),
    (2, {"the primary": 1}, "fail"),  # no write is ever acknowledged by 2
    (1, {"the primary": 0}, "fail"),
    # A cluster: the primary with the fewest replicas decides a failure, any primary with replicas a warning.
    (1, {"primary a:1": 1, "primary b:2": 1, "primary c:3": 1}, "ok"),
    (1, {"primary a:1": 1, "primary b:2": 0, "primary c:3": 2}, "fail"),
    (1, {"primary a:1": 1, "primary b:2": 2}, "warn"),
    (0, {"primary a:1": 0, "primary b:2": 1}, "warn"),
    (0, {"primary a:1": 0, "primary b:2": 0}, "ok"),
])
def test_wait_replicas_against_connected_replicas(wait: int, replicas: dict[str, int], expected: str) -> None:
    """More than a primary has fails; fewer than a primary has (0 included) warns; every replica passes."""
    assert verdict(wait, replicas) == expected


def test_a_failure_names_the_primaries_short_of_replicas_and_what_to_do() -> None:
    """The message says which primaries lack replicas, that writes stop, and the two ways out."""
    finding = replica_ack_finding(1, {"primary a:1": 1, "primary b:2": 0})
    assert "REDIS_WAIT_REPLICAS=1" in finding.message and "primary b:2 has 0" in finding.message
    assert "primary a:1" not in finding.message
    assert "writes stop" in finding.message and "lower REDIS_WAIT_REPLICAS" in finding.message


def test_the_warning_points_at_the_guarantee_and_the_setting() -> None:
    """REDIS_WAIT_REPLICAS=0 with replicas: the message says what a failover loses and which setting keeps it."""
    finding = replica_ack_finding(0, {"the primary": 2})
    assert finding.ok and finding.warning
    assert "the primary has 2" in finding.message and "Delivery guarantees" in finding.message
    assert "REDIS_WAIT_REPLICAS=2" in finding.message


def test_one_of_two_replicas_warns_that_a_failover_can_promote_the_other() -> None:
    """REDIS_WAIT_REPLICAS=1 with 2 replicas: the message names the primary, the risk and the setting."""
    finding = replica_ack_finding(1, {"the primary": 2})
    assert finding.ok and finding.warning
    assert "the primary has 2" in finding.message and "had not acknowledged" in finding.message
    assert "REDIS_WAIT_REPLICAS=2" in finding.message
