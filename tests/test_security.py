"""Kafka over TLS with SASL/SCRAM, Redis over TLS with an ACL user, and secrets that never show.

One broker for the module with a SASL_SSL listener (SCRAM-SHA-512/256, a throwaway CA) next to its
PLAINTEXT one, which only sets up topics and reads them back; a TLS-only redis-server per test
whose service user holds exactly the README's ACL rules (see ``localenv.redis.service_acl_rules``).
The service and its commands reach both only through the secured endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
import redis.asyncio as aredis
from aiokafka import ConsumerRecord
from pydantic import SecretStr
from redis.exceptions import NoPermissionError, RedisError

from consumer.config import Settings
from consumer.logs import Redactor
from consumer.ops.check import run_checks
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker, KafkaSecurity, acreate_topics
from localenv.ports import free_port
from localenv.redis import RedisServer, RedisUser, service_acl_rules
from producer_examples.publisher import EventPublisher
from tests.reliability.harness import drain_topic, service_env
from tests.support import FAST_TIMINGS, Topics, eventually, running_service, topic_size
from tests.test_service import result_event, span_event

pytestmark = pytest.mark.timeout(180)

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "evj"  # the default REDIS_KEY_PREFIX, so the ACL under test is the README's, verbatim
REDIS_USER = "evaljoin"


# -- services -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured_kafka() -> Iterator[KafkaBroker]:
    security = KafkaSecurity(username="evaljoin-svc", password="kafka-pw-" + secrets.token_urlsafe(18))
    with KafkaBroker(security=security, heap="384m") as broker:
        yield broker


@pytest.fixture
def secured_redis() -> Iterator[RedisServer]:
    """TLS only; the service user has a password that needs escaping in a URL."""
    password = f"redis-pw/{secrets.token_hex(8)}+@%:{secrets.token_hex(8)}"
    user = RedisUser(REDIS_USER, password, service_acl_rules(PREFIX))
    with RedisServer(tls=True, users=[user]) as server:
        yield server


@pytest.fixture
async def secured_topics(secured_kafka: KafkaBroker) -> Topics:
    run = uuid.uuid4().hex[:10]
    names = Topics(f"{run}.spans", f"{run}.results", f"{run}.dlq", f"{run}.unmatched")
    await acreate_topics(secured_kafka.bootstrap_servers,
                         {names.span: 1, names.result: 1, names.dlq: 1, names.unmatched: 1})
    return names


def secured_settings(kafka: KafkaBroker, redis_server: RedisServer, intake: FakeIntake, topics: Topics,
                     **overrides: Any) -> Settings:
    """The service on the SASL_SSL listener and the TLS Redis, as its ACL user; credentials as settings."""
    assert kafka.security is not None
    user = redis_server.users[0]
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka.sasl_ssl_bootstrap_servers,
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": kafka.security.username,
        "kafka_sasl_password": kafka.security.password,
        "kafka_ssl_cafile": str(kafka.ca_file),
        "kafka_group_id": "g-" + uuid.uuid4().hex[:12],
        "span_topic": topics.span, "result_topic": topics.result,
        "dlq_topic": topics.dlq, "unmatched_topic": topics.unmatched,
        "redis_url": redis_server.base_url,
        "redis_username": user.name,
        "redis_password": user.password,
        "redis_ssl_cafile": str(redis_server.ca_file),
        "redis_deadline_shards": 4,
        "default_ml_app": "secure-app",
        "dd_llmobs_override_origin": intake.origin,
        "dd_api_key": "dd-api-key-" + secrets.token_hex(16),
        **FAST_TIMINGS,
    }
    values.update(overrides)
    return Settings(**values)


def admin_client(server: RedisServer) -> aredis.Redis:
    """The default (admin) user, to look at what the service user did and was refused."""
    return aredis.Redis.from_url(server.url, ssl_ca_certs=str(server.ca_file))


async def refused_by_acl(server: RedisServer) -> list[str]:
    """What Redis's ACL log recorded as refused: ``reason object`` (a command, a key), oldest first."""
    admin = admin_client(server)
    try:
        return [f"{entry['reason']} {entry['object']}" for entry in reversed(await admin.acl_log())]
    finally:
        await admin.aclose()


async def cli(env: dict[str, str], *args: str, within: float = 60.0) -> tuple[int, str]:
    """``python -m consumer ARGS`` with exactly ``env``: (exit code, stdout and stderr)."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "consumer", *args, env=env, cwd=REPO_ROOT,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


@pytest.fixture
def publisher_env(secured_kafka: KafkaBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer configured like the service, through the service's own variables."""
    assert secured_kafka.security is not None
    for name, value in {"KAFKA_BOOTSTRAP_SERVERS": secured_kafka.sasl_ssl_bootstrap_servers,
                        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
                        "KAFKA_SASL_USERNAME": secured_kafka.security.username,
                        "KAFKA_SASL_PASSWORD": secured_kafka.security.password,
                        "KAFKA_SSL_CAFILE": str(secured_kafka.ca_file)}.items():
        monkeypatch.setenv(name, value)


# -- end to end -----------------------------------------------------------------------------------


async def test_service_joins_over_sasl_ssl_and_redis_tls_as_its_acl_user(
        secured_kafka: KafkaBroker, secured_redis: RedisServer, intake: FakeIntake, secured_topics: Topics,
        publisher_env: None) -> None:
    """Both sides published over SASL_SSL (SCRAM-SHA-256) join through a TLS Redis and reach the intake.

    The service authenticates with SCRAM-SHA-512 and as an ACL user that may touch only ``evj:*``
    with the README's command list: Redis's ACL log must stay empty, so nothing the service does
    was refused. ``check`` passes with the same settings, with the credentials as settings and
    with them in a ``rediss://`` URL.
    """
    settings = secured_settings(secured_kafka, secured_redis, intake, secured_topics)
    async with running_service(settings), EventPublisher(span_topic=secured_topics.span,
                                                         result_topic=secured_topics.result) as publisher:
        await publisher.publish_span(span_event("q-secure", trace="7e57", span="99"))
        await publisher.publish_result(result_event("q-secure", "evt-secure-1", "faithfulness"))
        await publisher.flush()
        try:
            await eventually(lambda: len(intake.accepted_metrics()), expect=1, what="the joined evaluation")
        finally:
            assert await refused_by_acl(secured_redis) == [], "add these to localenv.redis.SERVICE_COMMANDS"
    (metric,) = intake.accepted_metrics()
    assert metric["join_on"] == {"span": {"span_id": "99", "trace_id": "7e57"}}
    assert metric["ml_app"] == "secure-app"
    admin = admin_client(secured_redis)
    try:
        keys = [key.decode() async for key in admin.scan_iter(match="*")]
        assert keys and all(key.startswith(f"{PREFIX}:") for key in keys)
    finally:
        await admin.aclose()
    user = secured_redis.users[0]
    url = secured_redis.base_url.replace("://", f"://{user.name}:{quote(user.password, safe='')}@")
    in_url = settings.model_copy(update={"redis_username": None, "redis_password": None, "redis_url": SecretStr(url)})
    for variant in (settings, in_url):
        findings = await run_checks(variant)
        assert all(f.ok for f in findings), findings
        assert any("PING answered" in f.message for f in findings)


async def test_acl_user_is_confined_to_its_prefix_and_commands(secured_redis: RedisServer) -> None:
    """The service's user cannot read or write keys outside ``evj:``, nor run admin commands; no one anonymous."""
    user = secured_redis.users[0]
    client = aredis.Redis.from_url(secured_redis.base_url, username=user.name, password=user.password,
                                   ssl_ca_certs=str(secured_redis.ca_file))
    anonymous = aredis.Redis.from_url(secured_redis.base_url, ssl_ca_certs=str(secured_redis.ca_file))
    try:
        assert await client.set(f"{PREFIX}:probe", "1")
        for refused in (client.set("other:probe", "1"), client.get("other:probe"), client.flushall(),
                        client.config_get("appendfsync"), client.keys("*"), client.publish("channel", "x")):
            with pytest.raises(NoPermissionError):
                await refused
        with pytest.raises(RedisError):
            await anonymous.ping()
    finally:
        await client.aclose()
        await anonymous.aclose()


def test_a_password_in_redis_url_is_redacted_as_written_and_as_sent() -> None:
    """The URL holds it percent-encoded, the client sends it decoded: the redactor knows both, and REDIS_PASSWORD."""
    url_password, separate = "p@ss/w0rd:" + secrets.token_hex(4), "sep-" + secrets.token_hex(8)
    in_url = Settings(redis_url=f"redis://u:{quote(url_password, safe='')}@127.0.0.1:1/0")
    assert {url_password, quote(url_password, safe="")} <= set(in_url.secrets())
    assert separate in Settings(redis_password=separate).secrets()
    redact = Redactor([*in_url.secrets(), separate])
    text = f"{url_password} {quote(url_password, safe='')} {separate} {base64.b64encode(separate.encode()).decode()}"
    assert redact.text(text) == " ".join(["[redacted]"] * 4)


def test_readme_grants_exactly_the_tested_acl() -> None:
    """The README's ACL line for the service user is the one these tests run the service with."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"ACL SETUSER evaljoin on >PASSWORD {service_acl_rules('evj')}\n" in readme


# -- wrong credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["kafka_password", "redis_password", "kafka_ca", "redis_ca"])
async def test_refused_login_or_unverified_server_fails_check_clearly(
        wrong: str, secured_kafka: KafkaBroker, secured_redis: RedisServer, intake: FakeIntake,
        secured_topics: Topics) -> None:
    """``check`` exits 1 naming the component and the reason: the broker or server refused the password (which
    shows nowhere), or, without the CA file, the server's certificate does not verify (TLS really is checked)."""
    bad = f"wrong-pw-{secrets.token_hex(12)}"
    changes: dict[str, tuple[str, dict[str, Any]]] = {
        "kafka_password": ("kafka", {"kafka_sasl_password": bad}),
        "redis_password": ("redis", {"redis_password": bad}),
        "kafka_ca": ("kafka", {"kafka_ssl_cafile": None}),
        "redis_ca": ("redis", {"redis_ssl_cafile": None}),
    }
    component, change = changes[wrong]
    env = service_env(secured_settings(secured_kafka, secured_redis, intake, secured_topics, **change))
    code, out = await cli(env, "check")
    assert code == 1, out
    assert f"FAIL {component}" in out and f"ok   {'redis' if component == 'kafka' else 'kafka'}" in out, out
    reason = {"kafka_password": "SaslAuthenticationFailed: Authentication failed during authentication due to "
                                "invalid credentials",
              "redis_password": "invalid username-password pair",
              "kafka_ca": "CERTIFICATE_VERIFY_FAILED", "redis_ca": "CERTIFICATE_VERIFY_FAILED"}[wrong]
    assert reason in out, out
    assert_absent([bad], out.encode())


async def test_wrong_kafka_password_stops_the_service_with_a_logged_reason(
        secured_kafka: KafkaBroker, secured_redis: RedisServer, intake: FakeIntake, secured_topics: Topics) -> None:
    """``run`` exits 1 at once with JSON log lines that say why, not a raw traceback with the password."""
    bad = f"wrong-kafka-pw-{secrets.token_hex(12)}"
    env = service_env(secured_settings(secured_kafka, secured_redis, intake, secured_topics, kafka_sasl_password=bad))
    code, out = await cli(env, "run")
    assert code == 1, out
    assert "SaslAuthenticationFailed" in out and '"event": "command_failed"' in out, out
    assert not any(line.startswith("Traceback") for line in out.splitlines()), out
    assert_absent([bad], out.encode())


@pytest.mark.parametrize("broken", ["claim_lease", "two_redis_passwords"])
async def test_invalid_configuration_never_quotes_a_secret(broken: str) -> None:
    """A rule across settings fails with its message only.

    pydantic's own text quotes the whole input, shortened to its first and last characters: the
    start of the first secret setting and the end of the last one (before, ``check`` printed it).
    """
    key, password = secrets.token_hex(16), secrets.token_hex(16)
    env = {"PATH": os.environ.get("PATH", ""), "DD_API_KEY": key, "REDIS_PASSWORD": password}
    if broken == "claim_lease":
        env["CLAIM_LEASE_SECONDS"] = "1"
        expected = "CLAIM_LEASE_SECONDS must exceed INTAKE_TIMEOUT_SECONDS"
    else:
        env["REDIS_URL"] = f"redis://u:{key}@127.0.0.1:1/0"
        expected = "REDIS_PASSWORD is set and REDIS_URL has a password too"
    code, out = await cli(env, "check")
    assert (code, expected in out) == (2, True), out
    assert_absent([fragment for value in (key, password) for fragment in (value[:5], value[-5:])], out.encode())


# -- secrets never appear -----------------------------------------------------------------------------


async def test_secrets_never_appear_in_logs_topics_or_check_output(
        secured_kafka: KafkaBroker, secured_redis: RedisServer, intake: FakeIntake, secured_topics: Topics,
        tmp_path: Path) -> None:
    """A DEBUG run of ``python -m consumer run`` through intake 500s and a 400, dead letters and an unmatched
    side, then ``check``: the API key, the SASL password and the Redis password (secret files, as a
    Kubernetes Secret mounts them) appear in no log line, no DLQ or unmatched record, no check output,
    neither as they are nor URL-encoded nor base64-encoded."""
    # Sides expire 3 s after they were produced; traffic starts once the service is ready (in its group,
    # Redis answering), so that only the lonely span can outlive its deadline.
    # SCRAM-SHA-256 here, SCRAM-SHA-512 in the in-process run: the service speaks both.
    settings = secured_settings(secured_kafka, secured_redis, intake, secured_topics, join_ttl_seconds=3,
                                kafka_sasl_mechanism="SCRAM-SHA-256", health_host="127.0.0.1", health_port=free_port())
    env = service_env(settings) | {"LOG_LEVEL": "DEBUG", "EVALJOIN_SECRETS_DIR": str(tmp_path / "secrets")}
    (tmp_path / "secrets").mkdir()
    for name in ("KAFKA_SASL_PASSWORD", "REDIS_PASSWORD"):
        (tmp_path / "secrets" / name).write_text(env.pop(name))
    values = [s.get_secret_value() for s in (settings.dd_api_key, settings.kafka_sasl_password,
                                               settings.redis_password) if s is not None]
    log = tmp_path / "service.log"
    async with service_process(env, log) as exit_code:
        await eventually(lambda: _ready(settings.health_port), within=60, what="the service's readiness")
        await _traffic_with_faults(settings, secured_kafka, intake)
    assert exit_code == [0], tail(log)
    dead = await drain_topic(secured_kafka.bootstrap_servers, settings.dlq_topic)
    unmatched = await drain_topic(secured_kafka.bootstrap_servers, settings.unmatched_topic)
    assert sorted(_header(r, "evaljoin.error") or b"" for r in dead) == [b"intake_rejected", b"invalid_json", b"schema"]
    assert [_header(r, "evaljoin.reason") for r in unmatched] == [b"span_without_result"]
    check_code, check_out = await cli(env, "check")
    assert check_code == 0, check_out
    output = log.read_bytes()
    for event in (b"intake_retry", b"evaluation_dead_lettered", b"message_dead_lettered", b"unmatched_reported",
                  b'"level": "debug"'):
        assert event in output, event
    delivered = next(r for r in intake.requests if r.status == 202)
    assert delivered.headers.get("DD-API-KEY") == values[0]  # the key was in use, so in the process's memory
    haystack = output + check_out.encode() + b"".join(_record_bytes(r) for r in [*dead, *unmatched])
    assert_absent(values, haystack)


async def _traffic_with_faults(settings: Settings, kafka: KafkaBroker, intake: FakeIntake) -> None:
    """Two 500s (retried), a 400 (refused: dead-lettered), invalid JSON, a schema error, a span that never joins."""
    async with EventPublisher(bootstrap_servers=kafka.bootstrap_servers, span_topic=settings.span_topic,
                              result_topic=settings.result_topic, security_protocol="PLAINTEXT") as publisher:
        intake.fail_next(2, status=500)
        await publisher.publish_span(span_event("q-a", span="1"))
        await publisher.publish_result(result_event("q-a", "evt-secure-a", "faithfulness"))
        await publisher.flush()
        await eventually(lambda: len(intake.accepted_metrics()), expect=1, what="the delivery after two 500s")
        intake.fail_next(1, status=400)
        await publisher.publish_span(span_event("q-b", span="2"))
        await publisher.publish_result(result_event("q-b", "evt-secure-b", "relevance"))
        await publisher.publish_raw(settings.span_topic, b"{broken")
        await publisher.publish_raw(settings.result_topic, b'{"schema_version": 1, "join_key": "q-c"}')
        await publisher.publish_span(span_event("q-lonely", span="3"))
        await publisher.flush()
    await eventually(lambda: _ends(kafka, settings), expect=(3, 1), within=45,
                     what="three dead letters and one unmatched report")


@asynccontextmanager
async def service_process(env: dict[str, str], log: Path) -> AsyncIterator[list[int]]:
    """``python -m consumer run`` with stdout and stderr to ``log``, SIGTERM on leaving; its exit code is put
    in the yielded list then. A failure inside the block carries the log's tail."""
    exit_code: list[int] = []
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "consumer", "run", env=env, cwd=REPO_ROOT,
                                                       stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                       stderr=asyncio.subprocess.STDOUT)
    try:
        yield exit_code
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{tail(log)}") from exc
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            exit_code.append(await asyncio.wait_for(process.wait(), timeout=30))
        except TimeoutError:
            process.kill()
            exit_code.append(await process.wait())


async def _ready(port: int) -> bool:
    async with httpx.AsyncClient() as client:
        try:
            return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.TransportError:
            return False


def tail(log: Path) -> str:
    return "--- service log tail ---\n" + log.read_text(errors="replace")[-3000:]


async def _ends(kafka: KafkaBroker, settings: Settings) -> tuple[int, int]:
    return (await topic_size(kafka.bootstrap_servers, settings.dlq_topic),
            await topic_size(kafka.bootstrap_servers, settings.unmatched_topic))


def _header(record: ConsumerRecord[bytes, bytes], name: str) -> bytes | None:
    return next((value for key, value in record.headers if key == name), None)


def _record_bytes(record: ConsumerRecord[bytes, bytes]) -> bytes:
    parts = [record.key or b"", record.value or b""]
    parts += [key.encode() + b"=" + value for key, value in record.headers]
    return b"\n".join(parts)


def encoded_forms(secret: str) -> set[str]:
    """The secret as it is, URL-encoded both ways, and base64 (standard and URL-safe, with and without padding)."""
    raw = secret.encode()
    b64 = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    return {secret, quote(secret, safe=""), quote_plus(secret)} | b64 | {form.rstrip("=") for form in b64}


def assert_absent(values: list[str], haystack: bytes) -> None:
    for value in values:
        for form in encoded_forms(value):
            assert form.encode() not in haystack, f"a secret appears (as {form[:4]}...)"
