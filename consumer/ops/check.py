"""``check``: is the configuration usable, and can the service reach Kafka, Redis and the intake?

Each finding names the component and says precisely what is wrong and what to do; nothing is
changed anywhere (no topic is created, nothing is sent to the intake).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from aiokafka.admin import AIOKafkaAdminClient
from redis import exceptions as redis_exceptions
from redis.asyncio.cluster import RedisCluster

from consumer.config import Settings
from consumer.errors import Misconfigured, kafka_errors_logged, translate_redis
from consumer.intake_route import NoRoute, RouteSettings, ask_agent, choose_route, target
from consumer.store_redis import (
    EVICTION_HINT,
    EvictionPolicy,
    RedisClient,
    SentinelTarget,
    check_usable,
    connect,
    eviction_policy,
    sentinel_primary,
)
from consumer.store_redis import close as close_redis


@dataclass(frozen=True)
class Finding:
    component: str
    ok: bool
    message: str
    warning: bool = False


async def run_checks(settings: Settings, *, timeout_s: float = 10.0) -> list[Finding]:
    findings: list[Finding] = []
    for probe in (_kafka, _redis, _intake):
        try:
            findings.extend(await asyncio.wait_for(probe(settings), timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a finding, with its cause
            findings.append(Finding(probe.__name__.strip("_"), False, f"{type(exc).__name__}: {exc}"))
    return findings


async def _kafka(settings: Settings) -> list[Finding]:
    admin = AIOKafkaAdminClient(**settings.kafka_client_options(), request_timeout_ms=8000)
    with kafka_errors_logged() as reasons:
        try:
            await admin.start()
        except Exception as exc:  # noqa: BLE001
            why = reasons[-1] if reasons else repr(exc)
            return [Finding("kafka", False, f"cannot reach {settings.kafka_bootstrap_servers}: {why}")]
    try:
        findings = [Finding("kafka", True, f"connected to {settings.kafka_bootstrap_servers}")]
        partitions = await topic_partitions(admin)
        for role, topic in (("SPAN_TOPIC", settings.span_topic), ("RESULT_TOPIC", settings.result_topic),
                            ("DLQ_TOPIC", settings.dlq_topic), ("UNMATCHED_TOPIC", settings.unmatched_topic)):
            if topic in partitions:
                findings.append(Finding("kafka", True, f"{role} {topic!r} exists with "
                                        f"{partitions[topic]} partition(s)"))
            else:
                findings.append(Finding("kafka", False, f"{role} {topic!r} does not exist; create it "
                                        "(the service never creates topics)"))
        return findings
    finally:
        await admin.close()


async def topic_partitions(admin: AIOKafkaAdminClient) -> dict[str, int]:
    """Every topic the cluster has, with its partition count."""
    names = await admin.list_topics()
    described = await admin.describe_topics(list(names))
    return {t["topic"]: len(t["partitions"]) for t in described if t.get("error_code", 0) == 0}


async def _redis(settings: Settings) -> list[Finding]:
    """The Redis findings; what can never work (a certificate that does not verify, a replica in REDIS_URL) fails
    with the start's own words."""
    try:
        return await _redis_findings(settings)
    except Misconfigured as refused:
        return [Finding("redis", False, refused.detail)]
    except (redis_exceptions.RedisError, redis_exceptions.RedisClusterException, OSError) as exc:
        refusal = translate_redis(exc)
        if not isinstance(refusal, Misconfigured):
            raise
        return [Finding("redis", False, refusal.detail)]


async def _redis_findings(settings: Settings) -> list[Finding]:
    target = settings.redis_target()
    client = await connect(target, cluster=settings.redis_cluster, **settings.redis_client_options())
    try:
        if isinstance(target, SentinelTarget):
            findings = await _sentinel_primary(client, target)
            if not findings[0].ok:
                return findings
        else:
            where = urlsplit(target).hostname or urlsplit(target).path  # never the whole URL: it may hold the password
            await client.ping()
            await check_usable(client, target)  # one Redis: a replica would refuse every write (READONLY)
            findings = [Finding("redis", True, f"PING answered by {where}"
                                + (" (cluster)" if settings.redis_cluster else ""))]
        info = await client.info("persistence")
        aof = info.get("aof_enabled") if isinstance(info, dict) else None
        if aof in (0, "0"):
            findings.append(Finding("redis", True, "appendonly is off: a Redis crash loses buffered sides whose "
                                    "offsets were committed (see Delivery guarantees)", warning=True))
        try:
            fsync = (await client.config_get("appendfsync")).get("appendfsync")
        except Exception:  # noqa: BLE001 - managed Redis often forbids CONFIG
            fsync = None
        if fsync not in (None, "always", b"always"):
            findings.append(Finding("redis", True, f"appendfsync is {fsync!r}, not 'always': a crash can lose "
                                    "up to about a second of buffered sides", warning=True))
        findings.append(_eviction_finding(await eviction_policy(client), allow=settings.redis_allow_eviction))
        findings.append(replica_ack_finding(settings.redis_wait_replicas, await connected_replicas(client)))
        return findings
    finally:
        await close_redis(client)


def _eviction_finding(policy: EvictionPolicy, *, allow: bool) -> Finding:
    """An evicting maxmemory-policy fails the check (the service refuses to start) unless REDIS_ALLOW_EVICTION."""
    if not policy.known:
        return Finding("redis", True, f"maxmemory-policy unknown ({policy.source}): make sure it is noeviction, an "
                       "evicting policy drops buffered sides and ledger entries under memory pressure", warning=True)
    if not policy.evicting:
        return Finding("redis", True, f"{policy.describe()}: a full Redis refuses writes and the service waits")
    why = (f"{policy.describe()}: under memory pressure Redis drops buffered sides and ledger entries, so joins "
           "are lost and evaluations sent twice, without an error")
    if allow:
        return Finding("redis", True, f"{why}; allowed by REDIS_ALLOW_EVICTION=true", warning=True)
    return Finding("redis", False, f"{why}; the service refuses to start: {EVICTION_HINT}")


async def connected_replicas(client: RedisClient) -> dict[str, int]:
    """The replicas connected to each primary (``INFO replication``: ``connected_slaves``), by primary: the one
    a URL or the sentinels lead to, or every primary of a cluster."""
    if isinstance(client, RedisCluster):
        return {f"primary {node.name}": int((await client.info("replication", target_nodes=node))["connected_slaves"])
                for node in client.get_primaries()}
    return {"the primary": int((await client.info("replication"))["connected_slaves"])}


def replica_ack_finding(wait_replicas: int, replicas: Mapping[str, int]) -> Finding:
    """REDIS_WAIT_REPLICAS against each primary's connected replicas.

    More than a primary has fails: no write to it is ever acknowledged, so every batch is tried again and
    nothing is committed. Fewer than a primary has warns: a failover can lose what the old primary
    acknowledged and had not replicated to the replica that is promoted (0: to any replica; 1 of 2: Sentinel
    ranks replicas by priority and by the offset each last reported, not by which acknowledged).
    """
    counts = ", ".join(f"{name} has {count}" for name, count in sorted(replicas.items()))
    short = ", ".join(f"{name} has {count}" for name, count in sorted(replicas.items()) if count < wait_replicas)
    if short:
        return Finding("redis", False, f"REDIS_WAIT_REPLICAS={wait_replicas}, more replicas than are connected "
                       f"({short}): writes stop, every batch waits REDIS_WAIT_TIMEOUT_MS for acknowledgements that "
                       "do not come and is tried again, nothing is committed; lower REDIS_WAIT_REPLICAS or bring "
                       "the replicas back")
    most = max(replicas.values(), default=0)
    if wait_replicas == 0 and most:
        return Finding("redis", True, f"REDIS_WAIT_REPLICAS=0 while replicas are connected ({counts}): a failover "
                       "loses the writes the old primary acknowledged and had not replicated yet (see Delivery "
                       f"guarantees); set REDIS_WAIT_REPLICAS={most} (every replica) to keep them", warning=True)
    if wait_replicas < most:
        more = ", ".join(f"{name} has {count}" for name, count in sorted(replicas.items()) if count > wait_replicas)
        return Finding("redis", True, f"REDIS_WAIT_REPLICAS={wait_replicas}, fewer than the replicas connected "
                       f"({more}): a failover can promote a replica that had not acknowledged the last writes and "
                       f"lose them (see Delivery guarantees); set REDIS_WAIT_REPLICAS={most} (every replica) to "
                       "keep them", warning=True)
    if wait_replicas == 0:
        return Finding("redis", True, f"REDIS_WAIT_REPLICAS=0, no replicas connected ({counts})")
    return Finding("redis", True, f"REDIS_WAIT_REPLICAS={wait_replicas}, connected replicas: {counts}")


async def _sentinel_primary(client: RedisClient, target: SentinelTarget) -> list[Finding]:
    """Which primary the sentinels name, and that it answers as one (a replica would refuse every write)."""
    try:
        address = await sentinel_primary(client)
    except redis_exceptions.ConnectionError as exc:  # no sentinel reachable, or none names a healthy primary
        return [Finding("redis", False, f"no primary found for {target.describe()}: {exc}")]
    assert address is not None
    primary = f"{address[0]}:{address[1]}"
    await client.ping()
    role = (await client.info("replication")).get("role")
    if role != "master":
        return [Finding("redis", False, f"the sentinels name {primary} as primary of {target.describe()}, "
                        f"but it answers as {role!r}: a failover may be under way")]
    return [Finding("redis", True, f"PING answered by the primary {primary}, found through Redis Sentinel "
                    f"({target.describe()})")]


async def _intake(settings: Settings) -> list[Finding]:
    """The route the service would take (chosen as it chooses it at start), and whether its far end takes it."""
    route = await choose_route(RouteSettings.from_settings(settings))
    if isinstance(route, NoRoute):
        return [Finding("intake", False, f"no route to the intake ({route.reason}): {route.why}; {route.hint}")]
    findings = [Finding("intake", True, f"route {route.kind} ({route.reason}): {route.why}; posts to {route.where}")]
    async with httpx.AsyncClient(timeout=8.0, transport=route.transport()) as client:
        if settings.dd_llmobs_override_origin:
            url, _ = target(settings.dd_llmobs_override_origin, "/")
            response = await client.get(url)
            findings.append(Finding("intake", True, f"{settings.dd_llmobs_override_origin} answers HTTP "
                                    f"{response.status_code} (override origin: key not validated)"))
        elif route.kind == "agentless":
            response = await client.get(f"https://api.{settings.dd_site}/api/v1/validate",
                                        headers={"DD-API-KEY": route.headers["DD-API-KEY"]})
            if response.status_code == 200:
                findings.append(Finding("intake", True, f"DD_API_KEY is valid for {settings.dd_site}"))
            else:
                findings.append(Finding("intake", False, f"api.{settings.dd_site} refused DD_API_KEY "
                                        f"(HTTP {response.status_code}); check DD_API_KEY and DD_SITE"))
    if route.kind == "agent" and route.reason != "agent_has_evp_proxy":  # not asked: DD_LLMOBS_AGENTLESS_ENABLED=false
        answer = await ask_agent(route.agent)
        findings.append(Finding("intake", answer.evp_proxy, f"the Datadog Agent at {route.agent} {answer.detail}"
                                + ("" if answer.evp_proxy else "; upgrade or enable the Agent's APM, or set DD_API_KEY "
                                   "and unset DD_LLMOBS_AGENTLESS_ENABLED (or set it to true)")))
    return findings
