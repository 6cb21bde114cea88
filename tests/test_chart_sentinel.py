"""The Helm chart with Redis Sentinel: which secrets the pod mounts, and where the NetworkPolicy lets it connect.

The scenario ``ci/sentinel-values.yaml`` is also linted, validated and read back into the service's
settings by every scenario test of ``tests/test_chart.py``.
"""

from __future__ import annotations

import base64

from tests.test_chart import one, render, render_scenario, secrets_volume

SENTINELS = "redis-node-0.redis-headless:26379,redis-node-1.redis-headless:26380,redis-node-2.redis-headless"
SET_SENTINELS = ["--set", "config.REDIS_SENTINELS=" + SENTINELS.replace(",", "\\,"),  # --set splits at a bare comma
                 "--set", "config.REDIS_SENTINEL_MASTER=mymaster"]


def test_an_existing_secret_mounts_the_sentinel_password_and_no_redis_url() -> None:
    """With sentinels REDIS_URL is not mounted (the service refuses both); the sentinels' password is, once named."""
    docs = render("--set", "existingSecret=creds", *SET_SENTINELS,
                  "--set", "existingSecretKeys.REDIS_PASSWORD=redis-password",
                  "--set", "existingSecretKeys.REDIS_SENTINEL_PASSWORD=sentinel-password")
    volume = secrets_volume(docs)
    assert volume is not None
    assert {item["path"]: item["key"] for item in volume["secret"]["items"]} == {
        "REDIS_PASSWORD": "redis-password", "REDIS_SENTINEL_PASSWORD": "sentinel-password"}
    without_sentinels = secrets_volume(render("--set", "existingSecret=creds",
                                              "--set", "existingSecretKeys.REDIS_SENTINEL_PASSWORD=sentinel-password"))
    assert without_sentinels is not None
    assert [item["path"] for item in without_sentinels["secret"]["items"]] == ["REDIS_URL"]


def test_the_sentinel_password_is_in_the_charts_secret_only() -> None:
    """REDIS_SENTINEL_PASSWORD given in `secrets` is in the chart's Secret, and in no other object."""
    docs = render_scenario("sentinel-values.yaml")
    assert base64.b64decode(one(docs, "Secret")["data"]["REDIS_SENTINEL_PASSWORD"]).decode() == "sentinel-password"
    assert "sentinel-password" not in str([doc for doc in docs if doc["kind"] != "Secret"])
    assert one(docs, "ConfigMap")["data"]["REDIS_SENTINEL_MASTER"] == "mymaster"


def test_network_policy_lets_the_pod_reach_every_sentinel_and_the_data_nodes() -> None:
    """Egress to Redis opens each sentinel's port (26379 when not named) and the data nodes' 6379."""
    docs = render("--set", "networkPolicy.enabled=true", *SET_SENTINELS)
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    ports = [sorted(p["port"] for p in rule["ports"]) for rule in egress]
    assert [6379, 26379, 26380] in ports
