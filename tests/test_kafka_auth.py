"""Kafka as managed services run it: mutual TLS, SASL/OAUTHBEARER from an OIDC provider, Amazon MSK IAM, brokers
without idempotent producers, and the group's timings.

One broker for the module with, next to its PLAINTEXT listener (which sets up topics and ACLs and publishes the
events): an SSL listener that requires a client certificate from the throwaway CA, a SASL_SSL listener whose
OAUTHBEARER tokens Kafka's own ``BrokerJwtValidator`` checks against the JWKS of a local OIDC provider, and the
SCRAM listener, whose user is bound by ACLs (Kafka's ``StandardAuthorizer``). The service reaches the broker only
through the listener under test; nothing between them is mocked.

What cannot run here: Amazon MSK. The MSK IAM token is made by AWS's own signer from fixed credentials and its
SigV4 signature is recomputed independently; a real broker then receives it over SASL/OAUTHBEARER and, not being
MSK, refuses it. Whether MSK accepts it (the IAM policy, the cluster's region and ARN) is not tested.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidSessionTimeoutError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnknownError,
)
from pydantic import ValidationError
from structlog.testing import capture_logs

from consumer.cli import EXIT_CONFIG, logged_failure
from consumer.clock import ManualClock
from consumer.config import KafkaSettings, Settings, load_settings
from consumer.errors import Misconfigured, producer_start_errors, translate_kafka
from consumer.kafka_auth import MskIamTokenProvider, OidcTokenProvider, parse_extensions
from consumer.ops.check import run_checks
from localenv.intake import FakeIntake
from localenv.kafka import Acl, KafkaBroker, KafkaSecurity, OAuthBearerValidation, acreate_acls, acreate_topics
from localenv.oidc import OidcClient, OidcProvider
from localenv.redis import RedisServer
from localenv.tls import ClientCertificate, make_client_certificate
from producer_examples.publisher import EventPublisher
from tests.reliability.harness import service_env
from tests.support import FAST_TIMINGS, Topics, eventually, running_service
from tests.test_security import assert_absent, cli
from tests.test_service import result_event, span_event

pytestmark = pytest.mark.timeout(180)

CLIENT_CN = "evaljoin-client"
OAUTH_CLIENT = "evaljoin-oauth"
AUDIENCE = "kafka"
BROKER_MAX_SESSION_MS = 60_000
# AWS's documented example credentials: they sign, and they open nothing.
AWS_KEY_ID, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


# -- services -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcProvider]:
    secret = "oidc-secret-" + uuid.uuid4().hex
    with OidcProvider(clients=[OidcClient(OAUTH_CLIENT, secret, frozenset({"kafka"}))], audience=AUDIENCE) as provider:
        yield provider


@pytest.fixture(scope="module")
def broker(oidc: OidcProvider) -> Iterator[KafkaBroker]:
    security = KafkaSecurity(username="evaljoin-acl", password="scram-" + uuid.uuid4().hex, mutual_tls=True,
                             oauthbearer=OAuthBearerValidation(oidc.jwks_url, oidc.issuer, AUDIENCE),
                             super_users=(f"User:CN={CLIENT_CN}", f"User:{OAUTH_CLIENT}"))
    with KafkaBroker(security=security, heap="384m",
                     extra_properties={"group.max.session.timeout.ms": str(BROKER_MAX_SESSION_MS)}) as kafka:
        yield kafka


@pytest.fixture(scope="module")
def client_cert(broker: KafkaBroker) -> ClientCertificate:
    return make_client_certificate(broker.data_dir / "tls", CLIENT_CN, "key-pw-" + uuid.uuid4().hex[:12])


@pytest.fixture
async def run_topics(broker: KafkaBroker) -> Topics:
    run = uuid.uuid4().hex[:10]
    names = Topics(f"{run}.spans", f"{run}.results", f"{run}.dlq", f"{run}.unmatched")
    await acreate_topics(broker.bootstrap_servers, {names.span: 1, names.result: 1, names.dlq: 1, names.unmatched: 1})
    return names


def base_settings(broker: KafkaBroker, redis_server: RedisServer, intake: FakeIntake, topics: Topics,
                  **kafka: Any) -> Settings:
    return Settings(kafka_group_id="g-" + uuid.uuid4().hex[:12], span_topic=topics.span, result_topic=topics.result,
                    dlq_topic=topics.dlq, unmatched_topic=topics.unmatched, redis_url=redis_server.url,
                    redis_key_prefix="kauth" + uuid.uuid4().hex[:6], redis_deadline_shards=4,
                    default_ml_app="managed-kafka", dd_llmobs_override_origin=intake.origin,
                    dd_api_key="dd-api-key-" + uuid.uuid4().hex,
                    **{**FAST_TIMINGS, **kafka})


def mtls(broker: KafkaBroker, cert: ClientCertificate) -> dict[str, Any]:
    return {"kafka_bootstrap_servers": broker.mtls_bootstrap_servers, "kafka_security_protocol": "SSL",
            "kafka_ssl_cafile": str(broker.ca_file), "kafka_ssl_certfile": str(cert.cert_file),
            "kafka_ssl_keyfile": str(cert.key_file), "kafka_ssl_key_password": cert.password}


def oauthbearer(broker: KafkaBroker, oidc: OidcProvider) -> dict[str, Any]:
    return {"kafka_bootstrap_servers": broker.oauth_bootstrap_servers, "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "OAUTHBEARER", "kafka_ssl_cafile": str(broker.ca_file),
            "kafka_sasl_oauthbearer_token_endpoint_url": oidc.token_url,
            "kafka_sasl_oauthbearer_client_id": OAUTH_CLIENT,
            "kafka_sasl_oauthbearer_client_secret": oidc.clients[OAUTH_CLIENT].client_secret,
            "kafka_sasl_oauthbearer_scope": "kafka"}


async def delivers_a_pair(settings: Settings, broker: KafkaBroker, intake: FakeIntake, key: str) -> None:
    """Run the service; publish a span and its result (as a super user, on PLAINTEXT); the intake gets the join."""
    async with running_service(settings), EventPublisher(
            bootstrap_servers=broker.bootstrap_servers, span_topic=settings.span_topic,
            result_topic=settings.result_topic, security_protocol="PLAINTEXT") as publisher:
        await publisher.publish_span(span_event(key, trace="7e57", span="42"))
        await publisher.publish_result(result_event(key, f"evt-{key}", "faithfulness"))
        await publisher.flush()
        await eventually(lambda: len(intake.accepted_metrics()), expect=1, within=60, what="the joined evaluation")
    (metric,) = intake.accepted_metrics()
    assert metric["join_on"] == {"span": {"span_id": "42", "trace_id": "7e57"}}
    assert metric["ml_app"] == "managed-kafka"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fixed AWS credentials in the environment, and no other source of credentials (files, instance metadata)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# -- mutual TLS -----------------------------------------------------------------------------------------


async def test_service_joins_over_mutual_tls_with_an_encrypted_key(
        broker: KafkaBroker, client_cert: ClientCertificate, redis_server: RedisServer, intake: FakeIntake,
        run_topics: Topics) -> None:
    """On a listener with ssl.client.auth=required the service presents its certificate (key decrypted with
    KAFKA_SSL_KEY_PASSWORD), is admitted as User:CN=evaljoin-client, and delivers a joined pair."""
    settings = base_settings(broker, redis_server, intake, run_topics, **mtls(broker, client_cert))
    await delivers_a_pair(settings, broker, intake, "q-mtls")
    findings = await run_checks(settings)
    assert [f for f in findings if f.component == "kafka" and not f.ok] == [], findings


@pytest.mark.parametrize("missing", ["certificate", "key_password"])
async def test_mutual_tls_without_certificate_or_password_fails_clearly(
        missing: str, broker: KafkaBroker, client_cert: ClientCertificate, redis_server: RedisServer,
        intake: FakeIntake, run_topics: Topics) -> None:
    """Without a client certificate the broker ends the handshake (the listener really requires one); without the
    key's password ``check`` names KAFKA_SSL_KEY_PASSWORD and ``run`` exits 2 naming the setting."""
    options = mtls(broker, client_cert)
    if missing == "certificate":
        for name in ("kafka_ssl_certfile", "kafka_ssl_keyfile", "kafka_ssl_key_password"):
            del options[name]
    else:
        del options["kafka_ssl_key_password"]
    settings = base_settings(broker, redis_server, intake, run_topics, **options)
    kafka_findings = [f for f in await run_checks(settings) if f.component == "kafka"]
    assert len(kafka_findings) == 1 and not kafka_findings[0].ok, kafka_findings
    if missing == "certificate":
        assert "cannot reach" in kafka_findings[0].message, kafka_findings
        return
    assert "KAFKA_SSL_KEY_PASSWORD" in kafka_findings[0].message, kafka_findings
    code, out = await cli(service_env(settings), "run")
    assert code == EXIT_CONFIG, out
    assert '"event": "invalid_configuration"' in out and '"setting": "KAFKA_SSL_CERTFILE"' in out, out


# -- OAUTHBEARER -----------------------------------------------------------------------------------------


async def test_service_joins_with_oauthbearer_tokens_from_an_oidc_provider(
        broker: KafkaBroker, oidc: OidcProvider, redis_server: RedisServer, intake: FakeIntake,
        run_topics: Topics) -> None:
    """The service fetches a client-credentials token, the broker verifies its RS256 signature against the JWKS,
    its issuer and audience, and the pair is delivered; the consumer's and producer's connections share tokens."""
    before = len(oidc.issued)
    settings = base_settings(broker, redis_server, intake, run_topics, **oauthbearer(broker, oidc))
    await delivers_a_pair(settings, broker, intake, "q-oauth")
    issued = oidc.issued[before:]
    assert len(issued) == 1, issued  # one token for every connection of the process (it lives 300 s)
    assert issued[0].client_id == OAUTH_CLIENT and issued[0].scope == "kafka"
    assert oidc.jwks_requests >= 1


@pytest.mark.parametrize("case", ["wrong_secret", "foreign_signer", "msk_iam_token"])
async def test_refused_tokens_fail_check_with_the_reason(
        case: str, broker: KafkaBroker, oidc: OidcProvider, redis_server: RedisServer, intake: FakeIntake,
        run_topics: Topics, aws_env: None) -> None:
    """``check`` fails Kafka with the reason: the identity provider refused the client (the secret shows nowhere),
    or the broker refused a token: one signed by a key outside its JWKS, or an MSK IAM token (a real broker got it
    over SASL/OAUTHBEARER; not being MSK, it cannot accept it)."""
    options = oauthbearer(broker, oidc)
    bad_secret = "not-the-secret-" + uuid.uuid4().hex
    if case == "wrong_secret":
        options["kafka_sasl_oauthbearer_client_secret"] = bad_secret
        expected = f"refused client '{OAUTH_CLIENT}': 401 invalid_client"
    elif case == "foreign_signer":
        expected = 'SaslAuthenticationFailed: {"status":"invalid_token"}'
    else:
        for name in [n for n in options if n.startswith("kafka_sasl_oauthbearer_")]:
            del options[name]
        options.update(kafka_sasl_mechanism="AWS_MSK_IAM", kafka_sasl_aws_region="eu-west-1")
        expected = 'SaslAuthenticationFailed: {"status":"invalid_token"}'
    settings = base_settings(broker, redis_server, intake, run_topics, **options)
    if case == "foreign_signer":
        with OidcProvider(clients=[OidcClient(OAUTH_CLIENT, options["kafka_sasl_oauthbearer_client_secret"],
                                              frozenset({"kafka"}))], audience=AUDIENCE) as impostor:
            settings = settings.model_copy(update={"kafka_sasl_oauthbearer_token_endpoint_url": impostor.token_url})
            findings = await run_checks(settings)
    else:
        findings = await run_checks(settings)
    (kafka_finding,) = [f for f in findings if f.component == "kafka"]
    assert not kafka_finding.ok and expected in kafka_finding.message, kafka_finding
    assert_absent([bad_secret], str(findings).encode())


async def test_token_is_fetched_once_and_refreshed_after_80_percent_of_its_life(oidc: OidcProvider) -> None:
    """Every caller gets the cached token until 80% of ``expires_in`` has passed, then a new one; while the provider
    is down a still-valid token is handed out, and an expired one is not (a retriable connection error)."""
    clock = ManualClock()
    secret = oidc.clients[OAUTH_CLIENT].client_secret
    provider = OidcTokenProvider(token_endpoint_url=oidc.token_url, client_id=OAUTH_CLIENT, client_secret=secret,
                                 clock=clock, extensions={"logicalCluster": "lkc-1"})
    first = await provider.token()
    clock.advance(oidc.token_lifetime_s * 0.79)
    assert await provider.token() == first and provider.fetches == 1
    clock.advance(oidc.token_lifetime_s * 0.02)
    second = await provider.token()
    assert second != first and provider.fetches == 2
    assert provider.extensions() == {"logicalCluster": "lkc-1"}
    down = OidcTokenProvider(token_endpoint_url=oidc.token_url.replace(str(oidc.port), "1"), client_id=OAUTH_CLIENT,
                             client_secret=secret, clock=clock)
    down._token, down._refresh_at, down._expires_at = second, clock.monotonic(), clock.monotonic() + 60
    assert await down.token() == second  # the endpoint is unreachable, the token still valid for 60 s
    clock.advance(56)
    with pytest.raises(KafkaConnectionError, match="unreachable"):
        await down.token()


async def test_a_token_without_lifetime_is_refused_and_a_jwt_exp_is_used() -> None:
    """An answer without expires_in whose token is not a JWT with exp is refused naming the endpoint, never the
    token; the JWT's exp is used when expires_in is missing (answers from an in-process transport)."""
    clock = ManualClock(now_ms=1_800_000_000_000)
    jwt = ".".join(base64.urlsafe_b64encode(part).rstrip(b"=").decode()
                   for part in (b'{"alg":"RS256"}', b'{"exp":1800000120}', b"sig"))
    answers = iter([{"access_token": jwt, "token_type": "Bearer"}, {"access_token": "opaque-token-abc"}])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=next(answers))

    provider = OidcTokenProvider(token_endpoint_url="https://idp.example/token", client_id="c", client_secret="s",
                                 clock=clock, transport=httpx.MockTransport(handler))
    assert await provider.token() == jwt
    assert provider._refresh_at - clock.monotonic() == pytest.approx(120 * 0.8)
    clock.advance(116)  # past 80%, and within 5 s of exp: the old token is not handed out any more
    with pytest.raises(SaslAuthenticationFailed, match="without a lifetime") as refused:
        await provider.token()
    assert "opaque-token-abc" not in str(refused.value)


# -- AWS MSK IAM ------------------------------------------------------------------------------------------


async def test_msk_iam_token_is_a_sigv4_presigned_connect_url(aws_env: None) -> None:
    """The token is base64url (unpadded) of https://kafka.<region>.amazonaws.com/?Action=kafka-cluster:Connect,
    presigned with SigV4 for 900 s by the credentials in the environment: recomputing the signature here with the
    secret key gives the same one (what MSK checks), and it is cached like any token."""
    clock = ManualClock(now_ms=int(time.time() * 1000))
    provider = MskIamTokenProvider(region="eu-west-1", clock=clock)
    token = await provider.token()
    assert "=" not in token and await provider.token() == token and provider.fetches == 1
    url = urlsplit(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    assert (url.scheme, url.hostname, url.path) == ("https", "kafka.eu-west-1.amazonaws.com", "/")
    params = dict(parse_qsl(url.query))
    assert params["Action"] == "kafka-cluster:Connect"
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and params["X-Amz-Expires"] == "900"
    assert params["X-Amz-SignedHeaders"] == "host"
    key_id, _day, region, service, terminator = params["X-Amz-Credential"].split("/")
    assert (key_id, region, service, terminator) == (AWS_KEY_ID, "eu-west-1", "kafka-cluster", "aws4_request")
    assert params["User-Agent"].startswith("aws-msk-iam-sasl-signer-python/")
    assert params["X-Amz-Signature"] == _sigv4_query_signature(url.hostname or "", params, AWS_SECRET)
    assert provider._expires_at - clock.monotonic() == pytest.approx(900, abs=5)


def _sigv4_query_signature(host: str, params: dict[str, str], secret_key: str) -> str:
    """AWS Signature Version 4 of a presigned GET / (query authentication), computed from its definition."""
    signed = sorted((k, v) for k, v in params.items() if k not in ("X-Amz-Signature", "User-Agent"))
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in signed)
    canonical = "\n".join(["GET", "/", query, f"host:{host}", "", "host", hashlib.sha256(b"").hexdigest()])
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


async def test_msk_iam_without_credentials_is_a_refusal_naming_what_to_give(
        aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no AWS credentials anywhere the token request fails as an authentication refusal that says where the
    credentials come from, not as the signer's AttributeError."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SaslAuthenticationFailed, match=r"no AWS credentials found .* AWS_ACCESS_KEY_ID"):
        await MskIamTokenProvider(region="eu-west-1").token()


def test_msk_iam_without_the_signer_package_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the optional aws-msk-iam extra the client options fail at once, naming the package and the extra."""
    monkeypatch.setitem(sys.modules, "aws_msk_iam_sasl_signer", None)
    settings = KafkaSettings(kafka_bootstrap_servers="b-1.c.abc123.c2.kafka.eu-central-1.amazonaws.com:9098",
                             kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="AWS_MSK_IAM")
    assert settings.kafka_aws_region() == "eu-central-1"
    with pytest.raises(Misconfigured, match=r"aws-msk-iam-sasl-signer-python .* pip install 'evaljoin\[aws-msk-iam\]'"):
        settings.kafka_client_options()


# -- idempotence and group timings against the broker ------------------------------------------------------


async def test_broker_refusing_producer_ids_stops_the_service_naming_kafka_enable_idempotence(
        broker: KafkaBroker, redis_server: RedisServer, intake: FakeIntake, run_topics: Topics) -> None:
    """A user without IdempotentWrite and without Write on any topic gets no producer id: ``run`` exits 2 naming
    KAFKA_ENABLE_IDEMPOTENCE instead of exiting 1 on a bare error; with KAFKA_ENABLE_IDEMPOTENCE=false it starts
    and delivers a pair (its ACLs let it read the topics and use its group)."""
    assert broker.security is not None
    user = f"User:{broker.security.username}"
    await acreate_acls(broker.bootstrap_servers, [
        Acl(user, Acl.TOPIC, run_topics.span.split(".")[0], Acl.READ, pattern_type=Acl.PREFIXED),
        Acl(user, Acl.GROUP, "g-", Acl.READ, pattern_type=Acl.PREFIXED)])
    settings = base_settings(broker, redis_server, intake, run_topics,
                             kafka_bootstrap_servers=broker.sasl_ssl_bootstrap_servers,
                             kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                             kafka_sasl_username=broker.security.username,
                             kafka_sasl_password=broker.security.password, kafka_ssl_cafile=str(broker.ca_file))
    code, out = await cli(service_env(settings), "run")
    assert code == EXIT_CONFIG, out
    assert '"setting": "KAFKA_ENABLE_IDEMPOTENCE"' in out and "ClusterAuthorizationFailedError" in out, out
    assert "Set KAFKA_ENABLE_IDEMPOTENCE=false" in out, out
    await delivers_a_pair(settings.model_copy(update={"kafka_enable_idempotence": False}), broker, intake, "q-noidem")


async def test_session_timeout_beyond_the_brokers_bound_exits_2_naming_it(
        broker: KafkaBroker, redis_server: RedisServer, intake: FakeIntake, run_topics: Topics) -> None:
    """KAFKA_SESSION_TIMEOUT_MS above the broker's group.max.session.timeout.ms (60000 on this broker): the join is
    refused and ``run`` exits 2 naming the setting and the broker's bounds, instead of exiting 1 on a KafkaError."""
    settings = base_settings(broker, redis_server, intake, run_topics, kafka_bootstrap_servers=broker.bootstrap_servers,
                             kafka_session_timeout_ms=BROKER_MAX_SESSION_MS * 2, kafka_heartbeat_interval_ms=3_000)
    code, out = await cli(service_env(settings), "run")
    assert code == EXIT_CONFIG, out
    assert '"setting": "KAFKA_SESSION_TIMEOUT_MS"' in out and "group.max.session.timeout.ms" in out, out


# -- translation and settings, without a broker ----------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("error", [UnknownError, ClusterAuthorizationFailedError])
def test_an_idempotent_producer_refused_its_id_names_the_setting(error: type[KafkaError]) -> None:
    """What aiokafka raises from an idempotent producer's start on a broker without InitProducerId (UnknownError on
    Kafka-compatible ones) becomes Misconfigured naming KAFKA_ENABLE_IDEMPOTENCE; without idempotence it passes."""
    with pytest.raises(Misconfigured) as caught, producer_start_errors(idempotent=True):
        raise error()
    assert caught.value.setting == "KAFKA_ENABLE_IDEMPOTENCE" and error.__name__ in caught.value.detail
    with pytest.raises(error), producer_start_errors(idempotent=False):
        raise error()
    with pytest.raises(KafkaConnectionError), producer_start_errors(idempotent=True):
        raise KafkaConnectionError("no broker")


@pytest.mark.unit
def test_a_misconfiguration_exits_2_with_one_log_line_naming_the_setting() -> None:
    """``logged_failure`` turns Misconfigured into exit code 2 and an ``invalid_configuration`` event, no traceback."""
    async def fails() -> int:
        raise Misconfigured("kafka", "KAFKA_ENABLE_IDEMPOTENCE", "the broker gives no producer id")

    with capture_logs() as logs:
        assert logged_failure("run", fails) == EXIT_CONFIG
    assert logs == [{"event": "invalid_configuration", "log_level": "error", "command": "run", "component": "kafka",
                     "setting": "KAFKA_ENABLE_IDEMPOTENCE", "error": "the broker gives no producer id"}]


@pytest.mark.unit
def test_session_timeout_refusal_is_translated_also_when_wrapped() -> None:
    """aiokafka wraps the JoinGroup refusal in a KafkaError; either way it is Misconfigured naming the setting."""
    wrapped = KafkaError("Unexpected error during coordination")
    wrapped.__cause__ = InvalidSessionTimeoutError()
    for error in (InvalidSessionTimeoutError(), wrapped):
        translated = translate_kafka(error)
        assert isinstance(translated, Misconfigured) and translated.setting == "KAFKA_SESSION_TIMEOUT_MS"


@pytest.mark.unit
@pytest.mark.parametrize(("given", "expected"), [
    ({"kafka_security_protocol": "SASL_SSL"}, "needs KAFKA_SASL_MECHANISM"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "OAUTHBEARER",
      "kafka_sasl_oauthbearer_token_endpoint_url": "https://idp/token", "kafka_sasl_oauthbearer_client_id": "c"},
     "KAFKA_SASL_MECHANISM=OAUTHBEARER needs KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": "u",
      "kafka_sasl_password": "p", "kafka_sasl_oauthbearer_client_id": "c"},
     "KAFKA_SASL_OAUTHBEARER_CLIENT_ID is not read with KAFKA_SASL_MECHANISM=SCRAM-SHA-512"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "AWS_MSK_IAM",
      "kafka_sasl_aws_region": "us-east-1"}, "AWS_MSK_IAM needs KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "AWS_MSK_IAM"}, "needs KAFKA_SASL_AWS_REGION"),
    ({"kafka_ssl_certfile": "/c.pem"}, "KAFKA_SSL_CERTFILE set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"}, "KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "OAUTHBEARER",
      "kafka_sasl_oauthbearer_token_endpoint_url": "https://idp/token", "kafka_sasl_oauthbearer_client_id": "c",
      "kafka_sasl_oauthbearer_client_secret": "s", "kafka_sasl_oauthbearer_extensions": "logicalCluster"},
     "KAFKA_SASL_OAUTHBEARER_EXTENSIONS entry 'logicalCluster' is not key=value"),
    ({"kafka_heartbeat_interval_ms": 4_000}, "KAFKA_HEARTBEAT_INTERVAL_MS (4000) must be at most a third of "
     "KAFKA_SESSION_TIMEOUT_MS (10000)"),
])
def test_incomplete_or_contradictory_kafka_settings_are_refused(given: dict[str, Any], expected: str) -> None:
    """Each missing part, stray setting, or timing Kafka would refuse is named by its variable before connecting."""
    with pytest.raises(ValidationError, match=expected.replace("(", r"\(").replace(")", r"\)")) as refused:
        Settings(**given)
    if "HEARTBEAT" in expected:
        assert "group.min.session.timeout.ms and group.max.session.timeout.ms (6000 and 1800000" in str(refused.value)


@pytest.mark.unit
def test_new_secrets_come_from_files_and_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KAFKA_SSL_KEY_PASSWORD and KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET are read from EVALJOIN_SECRETS_DIR and are
    among the values the log redactor replaces."""
    (tmp_path / "KAFKA_SSL_KEY_PASSWORD").write_text("key-pw-file")
    (tmp_path / "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET").write_text("client-secret-file")
    for name, value in {"EVALJOIN_SECRETS_DIR": str(tmp_path), "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                        "KAFKA_SASL_MECHANISM": "OAUTHBEARER", "KAFKA_SSL_CERTFILE": "/c.pem",
                        "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example/token",
                        "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "evaljoin",
                        "KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "logicalCluster=lkc-1,identityPoolId=pool-2"}.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert {"key-pw-file", "client-secret-file"} <= set(settings.secrets())
    assert parse_extensions(settings.kafka_sasl_oauthbearer_extensions or "") == {
        "logicalCluster": "lkc-1", "identityPoolId": "pool-2"}
