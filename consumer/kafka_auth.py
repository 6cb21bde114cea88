"""Where SASL/OAUTHBEARER tokens come from: an OIDC provider (client credentials), or AWS IAM for Amazon MSK.

aiokafka asks a token provider for a token each time it opens a connection (``token()``), and sends
``extensions()`` beside it. Both providers here fetch a token once, hand the same one to every
connection, and fetch the next one when 80% of its lifetime has passed (Kafka's own
``sasl.login.refresh.window.factor``), so a pod with many connections asks its identity provider
about once per token lifetime.

What a caller may assume of ``token()``: it returns a token that has not expired, or raises an
aiokafka error, which aiokafka treats as a failed connection and tries again with its backoff:

* ``SaslAuthenticationFailed``: the identity provider refused the client (wrong client id or secret,
  unknown scope), or there are no AWS credentials; only an operator can fix it;
* ``KafkaConnectionError``: the identity provider could not be reached or failed (5xx, timeout); it
  may pass by itself. While the token in hand is still valid, it is used meanwhile.

A token the broker refuses (a wrong audience or issuer, an expired one, an IAM policy that denies
``kafka-cluster:Connect``) is a ``SaslAuthenticationFailed`` with the broker's reason too: aiokafka
0.14 ends the exchange after sending the token and takes the broker's error challenge for success,
leaving a connection that answers nothing (a client that "started" with no brokers).
:func:`answer_oauthbearer_errors` makes it answer the challenge as RFC 7628 section 3.2.2 says, so
that the broker fails the exchange with its reason.

Secrets (the client secret, the tokens) are never put into an error message or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from typing import Any

import httpx
import structlog
from aiokafka import conn as aiokafka_conn
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from consumer.clock import SYSTEM_CLOCK, Clock
from consumer.errors import Misconfigured

log = structlog.get_logger(__name__)

REFRESH_FACTOR = 0.8  # a token is replaced once this share of its lifetime has passed (Kafka's default)
EXPIRY_MARGIN_S = 5.0  # a token this close to its expiry is not handed out any more
TOKEN_TIMEOUT_S = 10.0  # one request to the token endpoint
EXTENSION_KEY = re.compile(r"^[A-Za-z]+$")  # RFC 7628 section 3.1, as Kafka checks them
EXTENSION_VALUE = re.compile(r"^[\x21-\x7E \t\r\n]+$")
MSK_SIGNER_PACKAGE = "aws-msk-iam-sasl-signer-python"


class _OAuthBearerAnsweringErrors(aiokafka_conn.OAuthAuthenticator):  # type: ignore[misc]
    """aiokafka's OAUTHBEARER exchange, plus the client's half of a failure (RFC 7628 section 3.2.2): a server that
    refuses the token sends an error challenge (JSON with ``status``) instead of completing; the client answers
    ``%x01`` and the server then fails the exchange with its reason, which aiokafka raises."""

    async def step(self, payload: bytes | None) -> tuple[bytes, bool] | None:
        if self._token_sent and payload:
            return b"\x01", True
        result: tuple[bytes, bool] | None = await super().step(payload)
        return result


def answer_oauthbearer_errors() -> None:
    """Make aiokafka's connections use :class:`_OAuthBearerAnsweringErrors` (idempotent; done by the providers)."""
    connection = aiokafka_conn.AIOKafkaConnection
    if getattr(connection.authenticator_oauth, "_evaljoin", False):
        return

    def authenticator_oauth(self: Any) -> _OAuthBearerAnsweringErrors:
        return _OAuthBearerAnsweringErrors(sasl_oauth_token_provider=self._sasl_oauth_token_provider)

    authenticator_oauth._evaljoin = True  # type: ignore[attr-defined]
    connection.authenticator_oauth = authenticator_oauth


class _CachedToken(AbstractTokenProvider):  # type: ignore[misc]
    """One token shared by every connection, replaced after :data:`REFRESH_FACTOR` of its lifetime."""

    def __init__(self, *, clock: Clock) -> None:
        answer_oauthbearer_errors()
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self.fetches = 0

    async def token(self) -> str:
        async with self._lock:
            now = self._clock.monotonic()
            if self._token is not None and now < self._refresh_at:
                return self._token
            try:
                token, lifetime_s = await self._fetch()
            except (KafkaConnectionError, SaslAuthenticationFailed) as exc:
                if self._token is not None and now < self._expires_at - EXPIRY_MARGIN_S:
                    log.warning("kafka_token_refresh_failed", error=str(exc),
                                expires_in_s=round(self._expires_at - now, 1))
                    return self._token
                raise
            self.fetches += 1
            self._token = token
            self._refresh_at = now + lifetime_s * REFRESH_FACTOR
            self._expires_at = now + lifetime_s
            return token

    async def _fetch(self) -> tuple[str, float]:
        """A new token and its lifetime in seconds."""
        raise NotImplementedError


class OidcTokenProvider(_CachedToken):
    """Tokens from an OAuth 2 / OIDC token endpoint with the client credentials grant (RFC 6749 section 4.4).

    The client authenticates with HTTP Basic (``client_secret_basic``), as Kafka's Java client does;
    ``scope`` is sent when given. The token's lifetime is the answer's ``expires_in``, else the
    ``exp`` claim of a JWT access token. Confluent Cloud, Redpanda and Strimzi with Keycloak take
    such tokens; Confluent Cloud also needs the ``logicalCluster`` and ``identityPoolId`` extensions.
    """

    def __init__(self, *, token_endpoint_url: str, client_id: str, client_secret: str, scope: str | None = None,
                 extensions: dict[str, str] | None = None, timeout_s: float = TOKEN_TIMEOUT_S,
                 clock: Clock = SYSTEM_CLOCK, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(clock=clock)
        self._url = token_endpoint_url
        self._auth = httpx.BasicAuth(client_id, client_secret)
        self._client_id = client_id
        self._form = {"grant_type": "client_credentials", **({"scope": scope} if scope else {})}
        self._extensions = dict(extensions or {})
        self._timeout_s = timeout_s
        self._transport = transport

    def extensions(self) -> dict[str, str]:
        return dict(self._extensions)

    async def _fetch(self) -> tuple[str, float]:
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s, transport=self._transport) as client:
                response = await client.post(self._url, data=self._form, auth=self._auth,
                                             headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise KafkaConnectionError(f"OAUTHBEARER token endpoint {self._url} unreachable: "
                                       f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise KafkaConnectionError(f"OAUTHBEARER token endpoint {self._url} answered {response.status_code}")
        body = _json_object(response)
        if response.status_code != 200:
            # RFC 6749 section 5.2: error and error_description name the problem and never echo the secret.
            reason = " ".join(str(body.get(k, "")) for k in ("error", "error_description")).strip()
            raise SaslAuthenticationFailed(
                f"OAUTHBEARER token endpoint {self._url} refused client {self._client_id!r}: "
                f"{response.status_code} {reason or response.reason_phrase} (check KAFKA_SASL_OAUTHBEARER_CLIENT_ID, "
                "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET and KAFKA_SASL_OAUTHBEARER_SCOPE)")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise SaslAuthenticationFailed(f"OAUTHBEARER token endpoint {self._url} answered 200 without "
                                           "an access_token")
        lifetime = body.get("expires_in")
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = _jwt_lifetime_s(token, now_s=self._clock.now_s())
        if lifetime is None:
            raise SaslAuthenticationFailed(f"OAUTHBEARER token endpoint {self._url} gave a token without a lifetime "
                                           "(no expires_in, and not a JWT with an exp claim)")
        log.info("kafka_token_fetched", mechanism="OAUTHBEARER", expires_in_s=round(float(lifetime)))
        return token, float(lifetime)


class MskIamTokenProvider(_CachedToken):
    """Amazon MSK IAM tokens: a SigV4-presigned ``kafka-cluster:Connect`` URL, base64url-encoded.

    Made by AWS's ``aws-msk-iam-sasl-signer-python`` (the optional ``aws-msk-iam`` extra) from the
    default AWS credential chain: environment variables, the shared files and ``AWS_PROFILE``, web
    identity (EKS IRSA, ``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``), EKS Pod Identity, and the
    instance role. A token is valid for 15 minutes.
    """

    def __init__(self, *, region: str, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self._region = region
        self._signer = load_msk_signer()

    async def _fetch(self) -> tuple[str, float]:
        try:
            token, expiry_ms = await asyncio.to_thread(self._signer.generate_auth_token, self._region)
        except (AttributeError, ValueError) as exc:
            # The signer reads the credentials of an empty chain as None (AttributeError) or refuses empty ones.
            raise SaslAuthenticationFailed(
                f"AWS_MSK_IAM: no AWS credentials found ({type(exc).__name__}); give the pod an IAM role (IRSA, "
                "EKS Pod Identity, an instance role) or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        except Exception as exc:  # noqa: BLE001 - botocore's errors (STS, instance metadata) have no common base
            raise KafkaConnectionError(f"AWS_MSK_IAM: signing the token failed: {type(exc).__name__}: {exc}") from None
        lifetime = max(1.0, expiry_ms / 1000 - self._clock.now_s())
        log.info("kafka_token_fetched", mechanism="AWS_MSK_IAM", region=self._region, expires_in_s=round(lifetime))
        return str(token), lifetime


def load_msk_signer() -> Any:
    """``aws_msk_iam_sasl_signer.MSKAuthTokenProvider``, imported only when AWS_MSK_IAM is chosen."""
    try:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
    except ImportError:
        raise Misconfigured("kafka", "KAFKA_SASL_MECHANISM",
                            f"KAFKA_SASL_MECHANISM=AWS_MSK_IAM needs the {MSK_SIGNER_PACKAGE} package, which is "
                            "not installed: pip install 'evaljoin[aws-msk-iam]'") from None
    return MSKAuthTokenProvider


def parse_extensions(text: str) -> dict[str, str]:
    """KAFKA_SASL_OAUTHBEARER_EXTENSIONS: ``key=value`` pairs separated by commas.

    Raises ``ValueError`` naming the pair that is not one (keys are letters only, values printable
    ASCII, ``auth`` is the token's own key), as Kafka's client refuses them.
    """
    extensions: dict[str, str] = {}
    for pair in (part.strip() for part in text.split(",")):
        key, equals, value = pair.partition("=")
        if not equals or not EXTENSION_KEY.match(key) or not EXTENSION_VALUE.match(value):
            raise ValueError(f"KAFKA_SASL_OAUTHBEARER_EXTENSIONS entry {pair!r} is not key=value "
                             "(a key of letters, a value of printable ASCII)")
        if key == "auth":
            raise ValueError("KAFKA_SASL_OAUTHBEARER_EXTENSIONS may not set 'auth': it carries the token")
        if key in extensions:
            raise ValueError(f"KAFKA_SASL_OAUTHBEARER_EXTENSIONS names {key!r} twice")
        extensions[key] = value
    return extensions


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _jwt_lifetime_s(token: str, *, now_s: float) -> float | None:
    """Seconds until a JWT's ``exp`` claim (read, not verified: the broker verifies it), or None if it has none."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp <= now_s:
        return None
    return float(exp - now_s)
