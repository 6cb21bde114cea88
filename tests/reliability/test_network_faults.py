"""The network between the consumer and Kafka, Redis or the intake misbehaves; the peers themselves are fine.

Process kills (the other scenarios) show a peer that is gone. Here every peer keeps running and a
fault proxy (:class:`localenv.netfault.NetFault`) on one link at a time does what networks do:

* **cuts**: every open connection reset (or closed) at once, repeatedly, while traffic flows;
* **latency**: 200 to 500 ms (+-100 ms jitter) added in each direction for a while;
* **refused**: every connection reset and new ones refused for a few seconds (the port is closed);
* **blackhole**: nothing forwarded, on open and new connections, for longer than the client's
  timeouts on that link; what was sent is held and arrives once the path is back (as TCP would
  retransmit it), so a request the client gave up on may still be processed;
* **half-open**: the open connections silently die (no FIN, no RST, nothing ever again), as when a
  middlebox loses their state; only the client's own timeouts can notice.

Only the consumer's connections go through the proxy: the test publishes and checks lag directly.
Each fault gets its own wave of pairs, published while the fault is on, with a few records that are
not JSON among them (so dead-lettering, a produce to Kafka, also meets the faults); its recovery
time is from the end of the fault to every evaluation of its wave accepted by the intake.

Scenario l runs the same schedule on secured links: the Kafka link over SASL_SSL (SCRAM-SHA-512, the
proxied listener is the broker's SASL_SSL one, advertised at the proxy; the proxy forwards raw TCP,
so TLS runs end to end through it and the certificate's 127.0.0.1 matches the advertised address),
and the Redis link over TLS only (``rediss://``, no plaintext port) as an ACL user holding only the
README's rules, the default user password-protected. Every reconnect is then a TLS handshake (and
on Kafka a SASL exchange), which the faults meet too.

On the Kafka link, half-open connections are noticed only by the client's request timeout
(``KAFKA_REQUEST_TIMEOUT_MS``, 10 s) on busy connections, and idle ones are closed before they are used
again (``consumer.service.CONNECTIONS_MAX_IDLE_MS``); the phase's recovery time is that bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from consumer.store_redis import connect
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker, KafkaSecurity, acreate_topics
from localenv.netfault import NetFault
from localenv.ports import free_port
from localenv.redis import RedisServer, RedisUser, service_acl_rules
from tests.reliability.harness import (
    EvalKey,
    Message,
    Pair,
    ServiceProcess,
    account,
    assert_guarantees,
    delivered_keys,
    drain_topic,
    header,
    interleave,
    lag_or_none,
    make_pairs,
    metric_key,
    publish,
    report,
    scaled,
    timeout_for,
    wait_for,
)
from tests.support import Topics

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

LABELS = ("faithfulness", "relevance")
BAD_ID = "netfault.bad-id"  # header naming each record that is not JSON, to find it on the DLQ
INTAKE_TIMEOUT_S = 2.0
# Longer than the client's timeouts on each link: the intake request timeout; the Redis socket
# timeout (5 s, consumer.store_redis.SOCKET_TIMEOUTS); for Kafka the group session (10 s: the member is
# evicted) and the request timeout (KAFKA_REQUEST_TIMEOUT_MS, 10 s: every request in flight times out).
BLACKHOLE_S = {"intake": 2.5 * INTAKE_TIMEOUT_S, "redis": 8.0, "kafka": 15.0}


@dataclass
class Link:
    """The link under test: the proxy on it, the consumer's settings through it, and the direct way in."""

    name: str  # kafka, redis or intake
    proxy: NetFault
    settings: Settings
    bootstrap: str  # direct (not proxied) bootstrap address, for the test's own producer and checks
    producer: AIOKafkaProducer
    secured: bool = False  # SASL_SSL Kafka or TLS Redis with an ACL user (scenario l), not plaintext (g)

    @property
    def row(self) -> str:
        """The row of the results table."""
        if not self.secured:
            return f"g. network faults, consumer<->{self.name}"
        return f"l. network faults, consumer<->{self.name} ({SECURED_AS[self.name]})"


SECURED_AS = {"kafka": "SASL_SSL, SCRAM-SHA-512", "redis": "TLS, ACL user"}


Fault = Callable[[Link, random.Random], Awaitable[str]]  # runs the fault, returns a description once it ended


async def _cuts(link: Link, rng: random.Random) -> str:
    """Reset (three in four) or close every open connection, again and again, while the wave flows."""
    count, resets = scaled(6, minimum=6), 0
    for _ in range(count):
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        rst = rng.random() < 0.75
        resets += rst
        link.proxy.cut(rst=rst)
    return f"{count} cuts ({resets} RST)"


async def _latency(link: Link, rng: random.Random) -> str:
    delay = rng.uniform(0.2, 0.5)
    link.proxy.add_latency(delay, jitter=0.1)
    await asyncio.sleep(rng.uniform(3.0, 4.0))
    link.proxy.normal()
    return f"{delay * 1000:.0f} ms each way"


async def _blackhole(link: Link, rng: random.Random) -> str:
    seconds = BLACKHOLE_S[link.name] * rng.uniform(1.0, 1.2)
    link.proxy.blackhole()
    await asyncio.sleep(seconds)
    link.proxy.normal()
    return f"{seconds:.1f} s"


async def _refused(link: Link, rng: random.Random) -> str:
    """Every connection reset and the port closed for a while: reconnects are refused, not left hanging."""
    seconds = rng.uniform(3.0, 4.0)
    link.proxy.cut()
    link.proxy.refuse()
    await asyncio.sleep(seconds)
    link.proxy.normal()
    return f"{seconds:.1f} s"


async def _half_open(link: Link, rng: random.Random) -> str:
    """The open connections die silently; the path itself stays fine for new ones."""
    return f"{link.proxy.half_open()} connections"


PHASES: dict[str, Fault] = {"cuts": _cuts, "latency": _latency, "refused": _refused, "blackhole": _blackhole,
                            "half-open": _half_open}




async def _publish_spread(producer: AIOKafkaProducer, messages: Sequence[Message], over_s: float) -> None:
    """Publish in ten slices over ``over_s`` seconds, so that the fault meets traffic in flight."""
    slices = 10
    for i in range(slices):
        await publish(producer, messages[i::slices])
        await asyncio.sleep(over_s / slices)


def _delivered_of(intake: FakeIntake, keys: set[EvalKey]) -> int:
    return len(delivered_keys(intake) & keys)


def _with_bad_records(wave: list[Pair], link: Link, rng: random.Random, first: int) -> tuple[list[Message], list[str]]:
    """The wave's records with one record that is not JSON per 16 pairs (at least one) among them; and their ids."""
    messages = interleave(wave, link.settings.span_topic, link.settings.result_topic, rng)
    ids = [f"{link.name}-bad-{first + i}" for i in range(max(1, len(wave) // 16))]
    for bad_id in ids:
        bad: Message = (link.settings.result_topic, bad_id.encode(), b'{"not json', [(BAD_ID, bad_id.encode())])
        messages.insert(rng.randrange(len(messages) + 1), bad)
    return messages, ids


async def _run_phase(name: str, fault: Fault, wave: list[Pair], messages: list[Message], link: Link,
                     intake: FakeIntake, service: ServiceProcess, rng: random.Random) -> tuple[float, str]:
    """Publish the wave during the fault; returns (seconds from the fault's end to the wave delivered, what it was)."""
    publishing = asyncio.ensure_future(_publish_spread(link.producer, messages, over_s=3.0))
    what = await fault(link, rng)
    ended = time.monotonic()
    await publishing
    keys = {key for pair in wave for key in pair.eval_keys}
    await wait_for(lambda: _delivered_of(intake, keys), expect=len(keys), within=timeout_for(120),
                   what=f"the {name} wave on the {link.name} link", alive=[service])
    return time.monotonic() - ended, what


async def _quiet(intake: FakeIntake, service: ServiceProcess, seconds: float) -> None:
    """Wait until the intake got no request for ``seconds`` (late copies of held requests are counted)."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < seconds:
        service.ensure_running()
        now = len(intake.requests)
        if now != last:
            last, since = now, time.monotonic()
        await asyncio.sleep(0.25)


@contextlib.asynccontextmanager
async def _link(name: str, secured: bool, *, make_settings: Callable[..., Settings], kafka: KafkaBroker,
                producer: AIOKafkaProducer, redis_server: RedisServer, intake: FakeIntake,
                tmp_path: Path) -> AsyncIterator[Link]:
    """The proxy on link ``name`` and the consumer's settings that route that link through it (``secured``: TLS)."""
    common = {"kafka_max_batch": 32, "intake_batch_max_evals": 8, "intake_timeout_seconds": INTAKE_TIMEOUT_S,
              "claim_lease_seconds": 5.0}
    if name == "kafka":
        async with _proxied_kafka(make_settings, tmp_path, common, secured) as link:
            yield link
    elif name == "redis" and secured:
        with _secured_redis(make_settings().redis_key_prefix, tmp_path) as server, \
                NetFault("127.0.0.1", server.port) as proxy:
            user = server.users[0]
            settings = make_settings(redis_url=f"rediss://{proxy.address}/0", redis_cluster=False,
                                     redis_username=user.name, redis_password=user.password,
                                     redis_ssl_cafile=str(server.ca_file), **common)
            yield Link(name, proxy, settings, kafka.bootstrap_servers, producer, secured=True)
    elif name == "redis":
        with NetFault("127.0.0.1", redis_server.port) as proxy:
            settings = make_settings(redis_url=f"redis://{proxy.address}/0", redis_cluster=False, **common)
            yield Link(name, proxy, settings, kafka.bootstrap_servers, producer)
    else:
        with NetFault("127.0.0.1", intake.port) as proxy:
            settings = make_settings(dd_llmobs_override_origin=f"http://{proxy.address}", **common)
            yield Link(name, proxy, settings, kafka.bootstrap_servers, producer)


def _secured_redis(prefix: str, tmp_path: Path) -> RedisServer:
    """A TLS-only redis-server whose service user has only the README's ACL; the default user has a password."""
    user = RedisUser("evaljoin", "redis-pw-" + secrets.token_urlsafe(18), service_acl_rules(prefix))
    return RedisServer(tls=True, users=[user], data_dir=tmp_path / "redis")


@contextlib.asynccontextmanager
async def _proxied_kafka(make_settings: Callable[..., Settings], tmp_path: Path, common: dict[str, float],
                         secured: bool) -> AsyncIterator[Link]:
    """A broker of its own whose PROXIED listener is advertised at the proxy: every consumer connection crosses it.

    ``secured``: that listener is SASL_SSL (SCRAM), and the consumer authenticates with SCRAM-SHA-512 over TLS.
    """
    proxy_port = free_port()
    security = KafkaSecurity(username="evaljoin-svc", password="kafka-pw-" + secrets.token_urlsafe(18)) \
        if secured else None
    broker = KafkaBroker(data_dir=tmp_path / "kafka", startup_timeout=120, proxied_port=proxy_port,
                         security=security)
    await asyncio.to_thread(broker.start)
    producer: AIOKafkaProducer | None = None
    try:
        with NetFault("127.0.0.1", broker.proxied_listener_port, port=proxy_port) as proxy:
            run = uuid.uuid4().hex[:8]
            names = {"span_topic": f"{run}.spans", "result_topic": f"{run}.results", "dlq_topic": f"{run}.dlq",
                     "unmatched_topic": f"{run}.unmatched"}
            await acreate_topics(broker.bootstrap_servers, {names["span_topic"]: 4, names["result_topic"]: 4,
                                                            names["dlq_topic"]: 1, names["unmatched_topic"]: 1})
            auth: dict[str, str] = {} if security is None else {
                "kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512",
                "kafka_sasl_username": security.username, "kafka_sasl_password": security.password,
                "kafka_ssl_cafile": str(broker.ca_file)}
            settings = make_settings(kafka_bootstrap_servers=proxy.address, **names, **auth, **common)
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
            await producer.start()
            yield Link("kafka", proxy, settings, broker.bootstrap_servers, producer, secured=secured)
    finally:
        if producer is not None:
            await producer.stop()
        await asyncio.to_thread(broker.stop)


def _duplicates_by_phase(intake: FakeIntake, waves: dict[str, list[Pair]]) -> dict[str, int]:
    """Extra accepted copies per phase's wave, to tell which fault caused the re-sends."""
    copies = Counter(metric_key(m) for r in intake.requests if 200 <= r.status < 300 for m in r.metrics)
    return {phase: sum(copies[key] - 1 for pair in wave for key in pair.eval_keys if copies[key] > 1)
            for phase, wave in waves.items()}


def _check_dead_letters(dlq: Sequence[Any], bad_ids: list[str]) -> None:
    """Each record that is not JSON is on the DLQ as invalid_json (a batch done again adds a copy); nothing else."""
    found = Counter((header(r, BAD_ID) or b"").decode() for r in dlq)
    assert set(found) == set(bad_ids), f"DLQ ids {sorted(found)} != {sorted(bad_ids)}"
    assert {header(r, "evaljoin.error") for r in dlq} == {b"invalid_json"}


@pytest.mark.parametrize(("name", "secured"), [
    pytest.param("kafka", False, id="kafka"), pytest.param("redis", False, id="redis"),
    pytest.param("intake", False, id="intake"),
    # scenario l: the same schedule on secured links
    pytest.param("kafka", True, id="secured-kafka"), pytest.param("redis", True, id="secured-redis"),
])
@pytest.mark.timeout(timeout_for(420))
async def test_network_faults(name: str, secured: bool, make_settings: Callable[..., Settings], kafka: KafkaBroker,
                              producer: AIOKafkaProducer, redis_server: RedisServer, topics: Topics,
                              intake: FakeIntake, tmp_path: Path) -> None:
    """Cuts, latency, refusals, a blackhole past the timeouts and half-open connections on one link lose nothing.

    ``secured``: the link is SASL_SSL Kafka or TLS Redis as an ACL user (scenario l), else plaintext (g).
    """
    seed = int(os.environ.get("RELIABILITY_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    phases = PHASES
    pairs = make_pairs(scaled(160), run=f"net-{'secured-' if secured else ''}{name}", labels=LABELS)
    waves = {phase: pairs[i::len(phases)] for i, phase in enumerate(phases)}
    everything = {key for pair in pairs for key in pair.eval_keys}
    intake.delay(0.03)  # requests take a moment, so that a cut can land in the middle of one
    recovered: dict[str, float] = {}
    faults: dict[str, str] = {}
    bad_ids: list[str] = []
    async with _link(name, secured, make_settings=make_settings, kafka=kafka, producer=producer,
                     redis_server=redis_server, intake=intake, tmp_path=tmp_path) as link:
        service = ServiceProcess(link.settings, tmp_path / "service.log")
        try:
            service.start()
            for phase, fault in phases.items():
                messages, ids = _with_bad_records(waves[phase], link, rng, first=len(bad_ids))
                bad_ids += ids
                recovered[phase], faults[phase] = await _run_phase(phase, fault, waves[phase], messages, link,
                                                                   intake, service, rng)
            await wait_for(lambda: lag_or_none(link.bootstrap, link.settings), expect=0, within=timeout_for(90),
                           what="the group's lag to reach 0", alive=[service])
            await _quiet(intake, service, 3.0)
            stats = link.proxy.stats
            assert await service.terminate() == 0, service.tail()
        finally:
            service.kill_if_running()
        dlq = await drain_topic(link.bootstrap, link.settings.dlq_topic)
        unmatched = await drain_topic(link.bootstrap, link.settings.unmatched_topic)
    outcome = account(link.row, expected=everything, intake=intake, dlq=dlq,
                      unmatched=unmatched, recover_s=max(recovered.values()), seed=seed,
                      faults=faults, recovered_s={phase: round(s, 1) for phase, s in recovered.items()},
                      duplicates_by_phase=_duplicates_by_phase(intake, waves), not_json=len(bad_ids),
                      accepted=stats.accepted, cut=stats.cut, held=stats.held, half_opened=stats.half_opened,
                      batch_retries=service.log_events("join_retry"),
                      intake_retries=service.log_events("intake_retry"),
                      commit_failures=service.log_events("commit_failed"))
    report(outcome)
    assert_guarantees(outcome)
    _check_dead_letters(dlq, bad_ids)
    assert outcome.unmatched == 0
    assert stats.cut > 0, "the cuts met no open connection"


@pytest.mark.timeout(60)
async def test_the_consumers_redis_client_gives_up_on_a_half_open_connection(redis_server: RedisServer) -> None:
    """A Redis connection that died silently ends in a timeout (and a new connection), never in a hang.

    The half-open phase on the Redis link recovers only because the client has a socket timeout;
    redis-py before 8 has none by default, so ``connect`` sets it.
    """
    with NetFault("127.0.0.1", redis_server.port) as proxy:
        client = await connect(f"redis://{proxy.address}/0", cluster=False)
        try:
            assert await client.ping()
            assert proxy.half_open() == 1
            started = time.monotonic()
            # redis-py 8 retries on a new connection; older ones raise, and the consumer retries the batch.
            with contextlib.suppress(redis.exceptions.TimeoutError):
                await asyncio.wait_for(client.ping(), 30)
            assert time.monotonic() - started < 15
        finally:
            await client.aclose()


@pytest.mark.timeout(timeout_for(120))
async def test_the_service_stops_cleanly_while_its_tls_redis_connections_are_dead(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """SIGTERM while every Redis connection is half-open: exit 0, not 1.

    Closing a TLS connection waits for the server's close_notify, which a dead connection never
    sends; redis-py then raises ``TimeoutError`` from ``aclose()`` (a plaintext close does not wait),
    and the service used to exit 1 with ``command_failed``. The sweeper waits a minute between sweeps,
    so that the connections stay idle in the pool (a command in flight on one is cancelled by the stop,
    and redis-py drops such a connection without waiting).
    """
    with _secured_redis(make_settings().redis_key_prefix, tmp_path) as server, \
            NetFault("127.0.0.1", server.port) as proxy:
        user = server.users[0]
        settings = make_settings(redis_url=f"rediss://{proxy.address}/0", redis_cluster=False,
                                 redis_username=user.name, redis_password=user.password,
                                 redis_ssl_cafile=str(server.ca_file), sweep_interval_seconds=60.0)
        service = ServiceProcess(settings, tmp_path / "service.log")
        try:
            service.start()
            await wait_for(lambda: service.log_events("partitions_assigned"), expect=1, within=timeout_for(60),
                           what="the service to start", alive=[service])
            assert proxy.half_open() > 0, "the service holds no Redis connection"
            assert await service.terminate() == 0, service.tail()
        finally:
            service.kill_if_running()
    assert service.log_events("command_failed") == 0
