"""Configuration, read once from the environment at the edge and passed on as plain values.

Names are the environment variables themselves (case-insensitive). The ``DD_*`` variables mean
what they mean to ddtrace, so an existing Datadog setup carries over unchanged. Secrets are
``SecretStr`` and can also come from files in ``EVALJOIN_SECRETS_DIR`` (one file per variable, as
Kubernetes mounts a Secret).
"""

from __future__ import annotations

import os
import re
import ssl
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from consumer.metrics import AppLabels
    from consumer.store import AppQuotas
    from consumer.store_redis import SentinelTarget

EVAL_METRIC_PATH = "/api/intake/llm-obs/v2/eval-metric"
EVP_PROXY_PREFIX = "/evp_proxy/v2"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SENTINEL_PORT = 26379  # Redis Sentinel's own default port, for an address given without one

_S = TypeVar("_S", bound="KafkaSettings")

# Joining by span tag (consumer/join.py TagJoin). A tag key as Datadog writes one (a letter, then letters, digits
# and _ . / -; no colon, which ends a key in "key:value"); an ml_app in JOIN_BY_TAG is anything without
# whitespace, comma or "=" (Datadog's application names have none of them).
_TAG_KEY = r"[A-Za-z][A-Za-z0-9_./-]{0,199}"
_TAG_JOIN_ENTRY = rf"\s*(?:\*|[^\s,=]{{1,200}})(?:={_TAG_KEY})?\s*"
JOIN_BY_TAG_PATTERN = rf"^{_TAG_JOIN_ENTRY}(?:,{_TAG_JOIN_ENTRY})*$"
_TAG_VALUE_PART = r"(?:[^{}]|\{(?:join_key|run_id|ml_app)\})*"
JOIN_TAG_VALUE_PATTERN = rf"^{_TAG_VALUE_PART}\{{join_key\}}{_TAG_VALUE_PART}$"

SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM"]
# The settings each kind of SASL authentication reads; those of another kind are refused, not ignored.
_SASL_SETTINGS: dict[str, tuple[str, ...]] = {
    "password": ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"),
    "OAUTHBEARER": ("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
                    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "KAFKA_SASL_OAUTHBEARER_SCOPE",
                    "KAFKA_SASL_OAUTHBEARER_EXTENSIONS"),
    "AWS_MSK_IAM": ("KAFKA_SASL_AWS_REGION",),
}
_SASL_REQUIRED: dict[str, tuple[str, ...]] = {
    "password": ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"),
    "OAUTHBEARER": ("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
                    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"),
    "AWS_MSK_IAM": (),
}
# Amazon MSK broker names carry the region: b-1.name.abc123.c2.kafka.us-east-1.amazonaws.com (provisioned),
# boot-abc123.c1.kafka-serverless.us-east-1.amazonaws.com (serverless).
_MSK_HOST = re.compile(r"\.kafka(?:-serverless)?\.([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?$")


class KafkaSettings(BaseSettings):
    """The broker connection and the two input topics: what the service and every producer example share.

    Producers read it with :func:`load_kafka_settings`, so a producer next to the service reaches the same
    (TLS/SASL) cluster with the same variables and the same defaults.
    """

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_ignore_empty=True)

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_client_id: str = "evaljoin"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_oauthbearer_token_endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/]+\S*$")
    kafka_sasl_oauthbearer_client_id: str | None = None
    kafka_sasl_oauthbearer_client_secret: SecretStr | None = None
    kafka_sasl_oauthbearer_scope: str | None = None
    kafka_sasl_oauthbearer_extensions: str | None = None
    kafka_sasl_aws_region: str | None = Field(None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_enable_idempotence: bool = True
    span_topic: str = "llmobs.span-context"
    result_topic: str = "nemo.eval-results"

    @model_validator(mode="after")
    def _kafka_auth_is_complete(self) -> Self:
        """A security setup missing a part would connect unauthenticated or fail deep inside the client; one given
        a part of another mechanism would silently ignore it. Say which part, by its variable."""
        protocol, mechanism = self.kafka_security_protocol, self.kafka_sasl_mechanism
        if mechanism and not protocol.startswith("SASL_"):
            raise ValueError(f"KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL={protocol}: "
                             "use SASL_SSL (or SASL_PLAINTEXT)")
        if protocol.startswith("SASL_") and not mechanism:
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_MECHANISM: PLAIN, SCRAM-SHA-256 or "
                             "SCRAM-SHA-512 (with KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD), OAUTHBEARER or "
                             "AWS_MSK_IAM")
        if mechanism:
            kind = "password" if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") else mechanism
            missing = [name for name in _SASL_REQUIRED[kind] if getattr(self, name.lower()) is None]
            if missing:
                raise ValueError(f"KAFKA_SASL_MECHANISM={mechanism} needs {' and '.join(missing)}")
            stray = [name for other, names in _SASL_SETTINGS.items() if other != kind for name in names
                     if getattr(self, name.lower()) is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} not read with "
                                 f"KAFKA_SASL_MECHANISM={mechanism}: unset {'it' if len(stray) == 1 else 'them'}")
        if self.kafka_sasl_oauthbearer_extensions is not None:
            from consumer.kafka_auth import parse_extensions

            parse_extensions(self.kafka_sasl_oauthbearer_extensions)
        if mechanism == "AWS_MSK_IAM":
            if protocol != "SASL_SSL":
                raise ValueError("KAFKA_SASL_MECHANISM=AWS_MSK_IAM needs KAFKA_SECURITY_PROTOCOL=SASL_SSL "
                                 "(MSK's IAM listener, port 9098 or 9198, takes TLS only)")
            if self.kafka_aws_region() is None:
                raise ValueError("KAFKA_SASL_MECHANISM=AWS_MSK_IAM needs KAFKA_SASL_AWS_REGION (the broker names "
                                 "are not MSK's *.kafka.<region>.amazonaws.com, which would give it)")
        return self

    @model_validator(mode="after")
    def _kafka_tls_is_complete(self) -> Self:
        """TLS files given to a connection without TLS, or a key without its certificate, would be ignored."""
        given = [name for name in ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE",
                                   "KAFKA_SSL_KEY_PASSWORD") if getattr(self, name.lower()) is not None]
        if given and self.kafka_security_protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"{', '.join(given)} set but KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}: "
                             "use SSL (or SASL_SSL)")
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ValueError("KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE, the client certificate it belongs to")
        if self.kafka_ssl_key_password is not None and self.kafka_ssl_certfile is None:
            raise ValueError("KAFKA_SSL_KEY_PASSWORD needs KAFKA_SSL_CERTFILE (and KAFKA_SSL_KEYFILE unless the key "
                             "is in the certificate file)")
        return self

    def kafka_aws_region(self) -> str | None:
        """KAFKA_SASL_AWS_REGION, else the region in MSK's broker names, else None."""
        if self.kafka_sasl_aws_region:
            return self.kafka_sasl_aws_region
        for server in self.kafka_bootstrap_servers.split(","):
            found = _MSK_HOST.search(server.strip().rsplit(":", 1)[0].lower())
            if found:
                return found.group(1)
        return None

    def kafka_client_options(self) -> dict[str, Any]:
        """aiokafka's connection options (brokers, client id, TLS, SASL), for producers, consumers and admins.

        A token provider (OAUTHBEARER, AWS_MSK_IAM) is made anew by each call: give the options of one call to all
        of a process's clients, so that they share one token. Raises :class:`consumer.errors.Misconfigured` when a
        TLS file does not load or the MSK signer is not installed.
        """
        options: dict[str, Any] = {"bootstrap_servers": self.kafka_bootstrap_servers,
                                   "client_id": self.kafka_client_id,
                                   "security_protocol": self.kafka_security_protocol}
        mechanism = self.kafka_sasl_mechanism
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            options["sasl_mechanism"] = mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = (self.kafka_sasl_password.get_secret_value()
                                              if self.kafka_sasl_password else None)
        elif mechanism is not None:
            options["sasl_mechanism"] = "OAUTHBEARER"  # AWS_MSK_IAM is OAUTHBEARER with an AWS-signed token
            options["sasl_oauth_token_provider"] = self._kafka_token_provider(mechanism)
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self.kafka_ssl_context()
        return options

    def kafka_ssl_context(self) -> ssl.SSLContext:
        """The TLS context: KAFKA_SSL_CAFILE (else the system's CAs) and the client certificate for mutual TLS."""
        from aiokafka.helpers import create_ssl_context

        from consumer.errors import Misconfigured

        try:
            context: ssl.SSLContext = create_ssl_context(cafile=self.kafka_ssl_cafile)
        except OSError as exc:  # ssl.SSLError is an OSError
            raise Misconfigured("kafka", "KAFKA_SSL_CAFILE",
                                f"KAFKA_SSL_CAFILE {self.kafka_ssl_cafile!r} does not load: {_os_error(exc)}") from None
        if self.kafka_ssl_certfile is not None:
            password = self.kafka_ssl_key_password
            try:
                # Without a password, an encrypted key fails here instead of prompting on a terminal.
                context.load_cert_chain(self.kafka_ssl_certfile, self.kafka_ssl_keyfile,
                                        password.get_secret_value() if password is not None else (lambda: ""))
            except OSError as exc:
                files = " and ".join(repr(f) for f in (self.kafka_ssl_certfile, self.kafka_ssl_keyfile) if f)
                hint = ("; an encrypted key needs KAFKA_SSL_KEY_PASSWORD, and the right one"
                        if isinstance(exc, ssl.SSLError) else "")
                raise Misconfigured("kafka", "KAFKA_SSL_CERTFILE",
                                    f"the client certificate and key ({files}, KAFKA_SSL_CERTFILE and "
                                    f"KAFKA_SSL_KEYFILE) do not load: {_os_error(exc)}{hint}") from None
        return context

    def _kafka_token_provider(self, mechanism: str) -> Any:
        from consumer.kafka_auth import MskIamTokenProvider, OidcTokenProvider, parse_extensions

        if mechanism == "AWS_MSK_IAM":
            region = self.kafka_aws_region()
            assert region is not None  # _kafka_auth_is_complete
            return MskIamTokenProvider(region=region)
        secret = self.kafka_sasl_oauthbearer_client_secret
        assert self.kafka_sasl_oauthbearer_token_endpoint_url and self.kafka_sasl_oauthbearer_client_id and secret
        extensions = self.kafka_sasl_oauthbearer_extensions
        return OidcTokenProvider(token_endpoint_url=self.kafka_sasl_oauthbearer_token_endpoint_url,
                                 client_id=self.kafka_sasl_oauthbearer_client_id,
                                 client_secret=secret.get_secret_value(), scope=self.kafka_sasl_oauthbearer_scope,
                                 extensions=parse_extensions(extensions) if extensions else None)


def _os_error(exc: OSError) -> str:
    """An OSError's reason without the Python noise: ``[Errno 2] No such file or directory``, ``[SSL] PEM lib``."""
    return str(exc.strerror) if exc.strerror else f"{type(exc).__name__}: {exc}"


class Settings(KafkaSettings):
    """Everything the service reads: :class:`KafkaSettings` and the rest."""

    # Kafka (the connection and the input topics are KafkaSettings')
    kafka_group_id: str = "evaljoin"
    kafka_group_instance_id: str | None = None
    kafka_max_batch: int = Field(500, ge=1, le=100_000)
    kafka_max_poll_interval_ms: int = Field(300_000, ge=10_000)
    kafka_fetch_max_wait_ms: int = Field(100, ge=0, le=10_000)
    kafka_fetch_min_bytes: int = Field(65_536, ge=1, le=52_428_800)
    kafka_session_timeout_ms: int = Field(10_000, ge=1_000, le=3_600_000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100, le=1_200_000)
    # A half-open connection (a peer or middlebox that vanished without FIN or RST) is noticed only when a request
    # on it times out: aiokafka's 40 s default made it 80 s without progress (fetch, then a dead-letter produce).
    kafka_request_timeout_ms: int = Field(10_000, ge=1_000, le=900_000)
    dlq_topic: str = "evaljoin.dlq"
    unmatched_topic: str = "evaljoin.unmatched"

    # Redis
    redis_url: SecretStr = SecretStr(DEFAULT_REDIS_URL)
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_ssl_cafile: str | None = None
    redis_cluster: bool = False
    redis_sentinels: str | None = None
    redis_sentinel_master: str | None = Field(None, pattern=r"^[^\s]{1,200}$")
    redis_sentinel_username: str | None = None
    redis_sentinel_password: SecretStr | None = None
    redis_sentinel_tls: bool = False
    redis_key_prefix: str = Field("evj", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    redis_deadline_shards: int = Field(16, ge=1, le=4096)
    # An evicting maxmemory-policy loses buffered sides silently: refused at start unless this says to run anyway.
    redis_allow_eviction: bool = False
    # Replica acknowledgement (WAIT) of every buffered write and ledger record before offsets move; 0: off.
    # The timeout stays below the client's 5 s socket timeout, which WAIT's blocking reply must not outlast.
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(1000, ge=1, le=4000)

    # Join
    join_key: str = Field("question_id", min_length=1, max_length=100)
    join_ttl_seconds: int = Field(86_400, ge=1)
    ledger_grace_seconds: int = Field(86_400, ge=0)
    default_ml_app: str | None = None
    judged_model: str | None = Field(None, min_length=1, max_length=200)
    join_by_tag: str | None = Field(None, pattern=JOIN_BY_TAG_PATTERN)
    join_tag_key: str | None = Field(None, pattern=f"^{_TAG_KEY}$")
    join_tag_value: str | None = Field(None, max_length=200, pattern=JOIN_TAG_VALUE_PATTERN)
    max_message_bytes: int = Field(1_048_576, ge=1024, le=16 * 1_048_576)
    max_pending_results_per_key: int = Field(100, ge=1, le=100_000)
    sweep_interval_seconds: float = Field(5.0, gt=0)
    sweep_batch: int = Field(500, ge=1)

    # Per-app buffer quotas (consumer.store.AppQuotas; 0 = no limit) and per-app metric labels (consumer.metrics)
    app_quota_sides: int = Field(0, ge=0)
    app_quota_bytes: int = Field(0, ge=0)
    app_quotas: str | None = None
    app_metrics_ml_apps: str | None = None
    app_metrics_max_apps: int = Field(20, ge=0, le=1000)

    # Evaluations: what the service decides for them (consumer.enrich), as JSON objects or a list of names
    eval_scopes: str | None = None
    assessment_thresholds: str | None = None
    span_tags_to_evaluation: str = "env,service,version"

    # Delivery (the DD_* names are ddtrace's own)
    dd_api_key: SecretStr | None = None
    dd_site: str = "datadoghq.com"
    dd_llmobs_agentless_enabled: bool | None = None
    dd_agentless_enabled: bool = False
    dd_trace_agent_url: str | None = None
    dd_agent_host: str | None = None
    dd_trace_agent_port: int = 8126
    dd_llmobs_override_origin: str | None = None
    intake_timeout_seconds: float = Field(10.0, gt=0)
    intake_batch_max_evals: int = Field(256, ge=1, le=10_000)
    intake_max_body_bytes: int = Field(4_000_000, ge=10_000, le=5_000_000)
    intake_max_in_flight: int = Field(4, ge=1, le=64)
    intake_retry_initial_seconds: float = Field(0.5, gt=0)
    intake_retry_max_seconds: float = Field(30.0, gt=0)
    claim_lease_seconds: float = Field(60.0, gt=0)

    # Failure policy
    dlq_max_invalid_ratio: float = Field(0.5, ge=0, le=1)
    dlq_window: int = Field(1000, ge=10)
    dlq_max_consecutive_invalid: int = Field(1000, ge=0)
    shutdown_timeout_seconds: float = Field(30.0, gt=0)

    # Self-tracing (ddtrace APM; ddtrace itself reads DD_SERVICE, DD_ENV, DD_VERSION, DD_AGENT_HOST)
    dd_trace_enabled: bool = False

    # Health and metrics
    health_host: str = "0.0.0.0"
    health_port: int = Field(8080, ge=0, le=65535)
    liveness_timeout_seconds: float = Field(120.0, gt=0)

    # Logs
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("join_by_tag")
    @classmethod
    def _join_by_tag_names_each_app_once(cls, value: str | None) -> str | None:
        if value is not None:
            parse_join_by_tag(value)
        return value

    @field_validator("app_quotas")
    @classmethod
    def _app_quotas_parse(cls, value: str | None) -> str | None:
        """The per-app overrides, read as the store will read them: a mistake stops the start."""
        if value is not None:
            parse_app_quotas(value)
        return value

    @field_validator("app_metrics_ml_apps")
    @classmethod
    def _app_metrics_ml_apps_parse(cls, value: str | None) -> str | None:
        if value is not None:
            parse_ml_apps(value)
        return value

    @field_validator("eval_scopes", "assessment_thresholds", "span_tags_to_evaluation")
    @classmethod
    def _evaluation_rules_parse(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Each rule on its own, read as the decode step will read it: a mistake stops the start, not a record."""
        from consumer import enrich

        if value is not None:
            parse = {"eval_scopes": enrich.parse_scopes, "assessment_thresholds": enrich.parse_thresholds,
                     "span_tags_to_evaluation": enrich.parse_span_tags}[str(info.field_name)]
            parse(value)
        return value

    @model_validator(mode="after")
    def _kafka_group_timings_fit(self) -> Settings:
        """Kafka's rule for the heartbeat, checked here instead of as a group that keeps losing its members."""
        if self.kafka_heartbeat_interval_ms * 3 > self.kafka_session_timeout_ms:
            raise ValueError(f"KAFKA_HEARTBEAT_INTERVAL_MS ({self.kafka_heartbeat_interval_ms}) must be at most a "
                             f"third of KAFKA_SESSION_TIMEOUT_MS ({self.kafka_session_timeout_ms}), so that a "
                             "member misses three heartbeats before the broker drops it; the session timeout itself "
                             "must lie within the broker's group.min.session.timeout.ms and "
                             "group.max.session.timeout.ms (6000 and 1800000 unless the broker sets others)")
        return self

    @model_validator(mode="after")
    def _delivery_is_possible(self) -> Settings:
        """ddtrace's own refusals: agentless without a key (``AgentlessConfig.__init__``, ``LLMObs.enable``), and
        an intake URL it cannot use (``verify_url``); the route itself is chosen at start (consumer.intake_route)."""
        if self.dd_api_key is None and self.dd_agentless_enabled:
            raise ValueError("DD_AGENTLESS_ENABLED=true needs DD_API_KEY (agentless delivery posts to Datadog with "
                             "it): set DD_API_KEY, or unset DD_AGENTLESS_ENABLED to deliver through the Agent")
        if self.dd_api_key is None and self.dd_llmobs_agentless_enabled:
            raise ValueError("DD_LLMOBS_AGENTLESS_ENABLED=true needs DD_API_KEY (agentless delivery posts to Datadog "
                             "with it): set DD_API_KEY, or unset DD_LLMOBS_AGENTLESS_ENABLED")
        _check_intake_url("DD_TRACE_AGENT_URL", self.dd_trace_agent_url)
        _check_intake_url("DD_LLMOBS_OVERRIDE_ORIGIN", self.dd_llmobs_override_origin)
        if self.claim_lease_seconds <= self.intake_timeout_seconds:
            raise ValueError("CLAIM_LEASE_SECONDS must exceed INTAKE_TIMEOUT_SECONDS")
        return self

    @model_validator(mode="after")
    def _redis_auth_is_unambiguous(self) -> Settings:
        """Credentials in REDIS_URL would silently win over the separate settings (redis-py's rule); refuse both."""
        url = urlsplit(self.redis_url.get_secret_value())
        if self.redis_password is not None and url.password:
            raise ValueError("REDIS_PASSWORD is set and REDIS_URL has a password too: give it in one place")
        if self.redis_username is not None and url.username:
            raise ValueError("REDIS_USERNAME is set and REDIS_URL has a user name too: give it in one place")
        if self.redis_ssl_cafile is not None and not self.redis_tls:
            raise ValueError("REDIS_SSL_CAFILE is set but REDIS_SENTINEL_TLS is false: set REDIS_SENTINEL_TLS=true"
                             if self.redis_sentinels else
                             "REDIS_SSL_CAFILE is set but REDIS_URL does not use TLS: use rediss://")
        return self

    @model_validator(mode="after")
    def _redis_wait_fits_the_socket_timeout(self) -> Settings:
        """WAIT blocks its connection for up to REDIS_WAIT_TIMEOUT_MS: a shorter socket timeout would cut every
        acknowledgement that waits, and the batch would be tried again for ever."""
        if self.redis_wait_replicas == 0:
            return self
        query = parse_qs(urlsplit(self.redis_url.get_secret_value()).query)
        for value in query.get("socket_timeout", []):
            try:
                seconds = float(value)
            except ValueError:
                continue
            if seconds * 1000 <= self.redis_wait_timeout_ms:
                raise ValueError(f"REDIS_WAIT_TIMEOUT_MS ({self.redis_wait_timeout_ms}) must be below the "
                                 "socket_timeout in REDIS_URL, which would cut every WAIT that waits")
        return self

    @model_validator(mode="after")
    def _redis_sentinel_is_complete(self) -> Settings:
        """Sentinel settings come together or not at all, and exclude the other ways of naming the Redis."""
        sentinel_only = {"REDIS_SENTINEL_MASTER": self.redis_sentinel_master is not None,
                         "REDIS_SENTINEL_USERNAME": self.redis_sentinel_username is not None,
                         "REDIS_SENTINEL_PASSWORD": self.redis_sentinel_password is not None,
                         "REDIS_SENTINEL_TLS": self.redis_sentinel_tls}
        if not self.redis_sentinels:
            given = [name for name, is_set in sentinel_only.items() if is_set]
            if given:
                raise ValueError(f"{', '.join(given)} without REDIS_SENTINELS: name the sentinels too "
                                 "(host:port,host:port)")
            return self
        parse_sentinels(self.redis_sentinels)
        if self.redis_sentinel_master is None:
            raise ValueError("REDIS_SENTINELS needs REDIS_SENTINEL_MASTER, the name the sentinels monitor "
                             "the primary by (their `sentinel monitor <name> ...`)")
        if self.redis_cluster:
            raise ValueError("REDIS_SENTINELS and REDIS_CLUSTER=true exclude each other: Sentinel watches one "
                             "primary and its replicas, a Redis Cluster is reached through REDIS_URL")
        if self.redis_url.get_secret_value() != DEFAULT_REDIS_URL:
            raise ValueError("REDIS_SENTINELS and REDIS_URL exclude each other: the sentinels name the primary; "
                             "unset REDIS_URL (the primary's user and password are REDIS_USERNAME and "
                             "REDIS_PASSWORD)")
        if self.redis_sentinel_username is not None and self.redis_sentinel_password is None:
            raise ValueError("REDIS_SENTINEL_USERNAME needs REDIS_SENTINEL_PASSWORD")
        return self

    @property
    def redis_tls(self) -> bool:
        """Whether the Redis connections use TLS: a ``rediss://`` URL, or REDIS_SENTINEL_TLS with sentinels."""
        if self.redis_sentinels:
            return self.redis_sentinel_tls
        return urlsplit(self.redis_url.get_secret_value()).scheme == "rediss"

    def redis_target(self) -> str | SentinelTarget:
        """What :func:`consumer.store_redis.connect` connects to: REDIS_URL, or the primary the sentinels name."""
        if not self.redis_sentinels:
            return self.redis_url.get_secret_value()
        from consumer.store_redis import SentinelTarget

        options: dict[str, Any] = {}
        if self.redis_sentinel_username is not None:
            options["username"] = self.redis_sentinel_username
        if self.redis_sentinel_password is not None:
            options["password"] = self.redis_sentinel_password.get_secret_value()
        if self.redis_sentinel_tls:
            options["ssl"] = True
            if self.redis_ssl_cafile is not None:
                options["ssl_ca_certs"] = self.redis_ssl_cafile
        assert self.redis_sentinel_master is not None  # _redis_sentinel_is_complete
        return SentinelTarget(parse_sentinels(self.redis_sentinels), self.redis_sentinel_master, options)

    def redis_client_options(self) -> dict[str, Any]:
        """What the client of the data nodes takes besides REDIS_URL: user, password, TLS as settings of their own.

        A password kept out of the URL can come from its own secret file, and a URL then never holds a secret.
        With sentinels, TLS to the primary is REDIS_SENTINEL_TLS (there is no URL to say ``rediss://``).
        """
        options: dict[str, Any] = {}
        if self.redis_username is not None:
            options["username"] = self.redis_username
        if self.redis_password is not None:
            options["password"] = self.redis_password.get_secret_value()
        if self.redis_sentinels and self.redis_sentinel_tls:
            options["ssl"] = True
        if self.redis_ssl_cafile is not None:
            options["ssl_ca_certs"] = self.redis_ssl_cafile
        return options

    def app_quotas_limits(self) -> AppQuotas:
        """The per-app buffer quotas: APP_QUOTA_SIDES and APP_QUOTA_BYTES, APP_QUOTAS for single apps."""
        from consumer.store import AppQuotas

        return AppQuotas(self.app_quota_sides, self.app_quota_bytes,
                         parse_app_quotas(self.app_quotas) if self.app_quotas else {})

    def app_metric_labels(self) -> AppLabels:
        """The ml_app label of the per-app metrics: APP_METRICS_ML_APPS, then the first APP_METRICS_MAX_APPS seen."""
        from consumer.metrics import AppLabels

        listed = parse_ml_apps(self.app_metrics_ml_apps) if self.app_metrics_ml_apps else frozenset()
        return AppLabels(listed, self.app_metrics_max_apps)

    def secrets(self) -> list[str]:
        """Every secret value, for the log redactor.

        A password in REDIS_URL counts as written (percent-encoded) and as the client sends it (decoded).
        """
        values = [self.dd_api_key, self.kafka_sasl_password, self.redis_password, self.redis_sentinel_password]
        values += [self.kafka_ssl_key_password, self.kafka_sasl_oauthbearer_client_secret]
        found = [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
        url_password = urlsplit(self.redis_url.get_secret_value()).password
        if url_password:
            found += sorted({url_password, unquote(url_password)})
        return found


def _check_intake_url(name: str, url: str | None) -> None:
    """ddtrace's ``verify_url`` (ddtrace/internal/utils/http.py): http, https or unix, with a host or a socket path."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "unix"):
        raise ValueError(f"{name}={url!r}: the scheme must be http, https or unix (unix:///var/run/datadog/apm.socket)")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"{name}={url!r} names no socket: write unix:///path/to/apm.socket (three slashes)")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"{name}={url!r} names no host")


def parse_join_by_tag(text: str) -> dict[str, str | None]:
    """JOIN_BY_TAG (its syntax checked by :data:`JOIN_BY_TAG_PATTERN`): ml_app -> its tag key, None for JOIN_TAG_KEY.

    ``*`` stands for every ml_app not named. Raises ``ValueError`` when an ml_app (or ``*``) is named twice.
    """
    apps: dict[str, str | None] = {}
    for entry in text.split(","):
        app, _, key = entry.strip().partition("=")
        if app in apps:
            raise ValueError(f"JOIN_BY_TAG names {app!r} twice")
        apps[app] = key or None
    return apps


def parse_app_quotas(text: str) -> dict[str, tuple[int, int]]:
    """APP_QUOTAS: a JSON object, ml_app -> ``{"sides": n, "bytes": m}`` (either may be left out: the default's).

    Returns ml_app -> (sides, bytes), -1 for "the default" (APP_QUOTA_SIDES, APP_QUOTA_BYTES); 0 is no limit.
    Raises ``ValueError`` naming what is wrong (never a value that is not the app's name or a number).
    """
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError('APP_QUOTAS is not JSON: write {"app": {"sides": 1000, "bytes": 10000000}}') from None
    if not isinstance(parsed, dict):
        raise ValueError('APP_QUOTAS must be a JSON object: {"app": {"sides": 1000, "bytes": 10000000}}')
    out: dict[str, tuple[int, int]] = {}
    for app, limits in parsed.items():
        if not app or len(app) > 200 or any(ord(c) < 32 for c in app):
            raise ValueError("APP_QUOTAS: an ml_app name is 1 to 200 characters without control characters")
        if not isinstance(limits, dict) or not limits or set(limits) - {"sides", "bytes"}:
            raise ValueError(f'APP_QUOTAS[{app!r}] must be an object with "sides", "bytes" or both')
        values = []
        for name in ("sides", "bytes"):
            value = limits.get(name, -1)
            if name in limits and (type(value) is not int or value < 0):
                raise ValueError(f'APP_QUOTAS[{app!r}]["{name}"] must be a whole number, 0 or more (0: no limit)')
            values.append(value)
        out[app] = (values[0], values[1])
    return out


def parse_ml_apps(text: str) -> frozenset[str]:
    """APP_METRICS_ML_APPS: ml_app names separated by commas (surrounding spaces ignored)."""
    apps = [app.strip() for app in text.split(",")]
    if any(not app or len(app) > 200 for app in apps):
        raise ValueError("APP_METRICS_ML_APPS: ml_app names separated by commas, each 1 to 200 characters")
    return frozenset(apps)


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """REDIS_SENTINELS: ``host:port`` separated by commas; ``[addr]:port`` for IPv6; a missing port is 26379.

    Raises ``ValueError`` naming the entry that is not an address.
    """
    addresses = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            raise ValueError(f"REDIS_SENTINELS has an empty entry in {text!r}: host:port,host:port")
        if entry.startswith("["):  # [IPv6]:port
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"REDIS_SENTINELS entry {entry!r} is not [address]:port")
            has_port, port_text = bool(rest), rest[1:]
        elif entry.count(":") > 1:
            raise ValueError(f"REDIS_SENTINELS entry {entry!r}: write an IPv6 address in brackets, [address]:port")
        else:
            host, colon, port_text = entry.partition(":")
            has_port = bool(colon)
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"REDIS_SENTINELS entry {entry!r} is not host:port")
        if not has_port:
            port = SENTINEL_PORT
        elif port_text.isdigit() and 1 <= int(port_text) <= 65535:
            port = int(port_text)
        else:
            raise ValueError(f"REDIS_SENTINELS entry {entry!r}: the port must be a number from 1 to 65535")
        addresses.append((host, port))
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"REDIS_SENTINELS names a sentinel twice: {text!r}")
    return tuple(addresses)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment (and secrets files), with explicit overrides on top."""
    return _load(Settings, overrides)


def load_kafka_settings(**overrides: Any) -> KafkaSettings:
    """The Kafka connection and topics alone, read as :func:`load_settings` reads them (for producers)."""
    return _load(KafkaSettings, overrides)


def _load(model: type[_S], overrides: dict[str, Any]) -> _S:
    secrets_dir = os.environ.get("EVALJOIN_SECRETS_DIR")
    if secrets_dir:
        return model(_secrets_dir=secrets_dir, **overrides)
    return model(**overrides)


def config_errors(exc: ValidationError) -> str:
    """One line per problem, naming the variable but never the value given: a value may be a secret.

    (pydantic's own text quotes the input, for a rule across settings all of them, secrets included.)
    """
    lines = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        variable = ".".join(str(part) for part in error["loc"]).upper()
        lines.append(f"  {variable}: {error['msg']}" if variable else f"  {error['msg']}")
    return "\n".join(lines)
