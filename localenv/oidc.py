"""A local OpenID Connect provider for SASL/OAUTHBEARER: client credentials in, RS256-signed JWTs out.

It does what Keycloak, Okta or Entra ID do for a Kafka client with the client credentials grant, and
no more: ``POST /token`` checks the client (HTTP Basic, or ``client_id``/``client_secret`` in the
form), the grant type and the scope, and answers an access token signed with its RSA key;
``GET /jwks`` publishes that key, which is what a broker's ``OAuthBearerValidatorCallbackHandler``
verifies tokens with (``sasl.oauthbearer.jwks.endpoint.url``). ``GET /.well-known/openid-configuration``
names both.

The RSA key is made by ``openssl`` at start and kept in memory; RS256 (RSASSA-PKCS1-v1_5 with
SHA-256, RFC 7518 section 3.3) is computed here with Python integers, so nothing beyond the standard
library and ``openssl`` is needed. The server binds 127.0.0.1 only and serves from a thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from localenv._process import LocalService, require_binary

__all__ = ["IssuedToken", "OidcClient", "OidcProvider"]

_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")  # RFC 8017 section 9.2, note 1


@dataclass(frozen=True)
class OidcClient:
    """A confidential client the provider knows, and the scopes it may ask for."""

    client_id: str
    client_secret: str = field(repr=False)
    scopes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class IssuedToken:
    """What ``POST /token`` answered: to whom, with which scope, and until when (epoch seconds)."""

    client_id: str
    scope: str
    expires_at: int
    token: str = field(repr=False)


class OidcProvider(LocalService):
    """An OIDC provider on 127.0.0.1 issuing RS256 JWTs to :class:`OidcClient` s with the client credentials grant.

    What callers may assume once :meth:`start` has returned: :attr:`token_url` and :attr:`jwks_url`
    answer; every token has the claims Kafka's broker-side validator requires (``sub``, ``iat``,
    ``exp``) and ``iss`` = :attr:`issuer`, ``aud`` = ``audience``, ``scope``, ``kid`` in its header.
    ``token_lifetime_s`` is each token's ``expires_in``. :attr:`issued` lists every token given out
    and :attr:`refusals` every request refused (as ``"<status> <error>"``), so a test can count them.
    """

    def __init__(self, *, clients: list[OidcClient], audience: str = "kafka", token_lifetime_s: int = 300) -> None:
        self.clients = {client.client_id: client for client in clients}
        self.audience = audience
        self.token_lifetime_s = token_lifetime_s
        self.kid = "evaljoin-" + secrets.token_hex(4)
        self.issued: list[IssuedToken] = []
        self.refusals: list[str] = []
        self.jwks_requests = 0
        self._key: _RsaKey | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("OidcProvider has not been started")
        return int(self._server.server_address[1])

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Make the RSA key (about 0.1 s) and serve from a daemon thread; returns once listening."""
        if self._server is not None:
            raise RuntimeError("OidcProvider is already running")
        self._key = _RsaKey.generate()
        server = _Server(self)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="oidc",
                                  daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop serving and join the thread. Idempotent."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    # -- what it serves ------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        key = self._signing_key()
        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                          "n": _b64url(_int_bytes(key.n)), "e": _b64url(_int_bytes(key.e))}]}

    def sign(self, claims: dict[str, Any]) -> str:
        """A compact JWS (RS256) of ``claims`` with this provider's key id: for tokens of any shape in tests."""
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{_b64url(_json(header))}.{_b64url(_json(claims))}".encode()
        return signing_input.decode() + "." + _b64url(self._signing_key().sign_sha256(signing_input))

    def _signing_key(self) -> _RsaKey:
        if self._key is None:
            raise RuntimeError("OidcProvider has not been started")
        return self._key

    def _token_response(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        form = {k: v[0] for k, v in parse_qs(body.decode("ascii", "replace"), keep_blank_values=True).items()}
        client_id, client_secret = _client_credentials(headers.get("authorization", ""), form)
        client = self.clients.get(client_id or "")
        if client is None or not secrets.compare_digest(client.client_secret, client_secret or ""):
            return self._refuse(401, "invalid_client", "unknown client or wrong secret",
                                {"WWW-Authenticate": 'Basic realm="evaljoin-oidc"'})
        if form.get("grant_type") != "client_credentials":
            return self._refuse(400, "unsupported_grant_type", "only client_credentials")
        asked = set(form.get("scope", "").split())
        if not asked <= client.scopes:
            return self._refuse(400, "invalid_scope", f"not granted: {' '.join(sorted(asked - client.scopes))}")
        now = int(time.time())
        scope = " ".join(sorted(asked))
        claims = {"iss": self.issuer, "sub": client.client_id, "aud": self.audience, "iat": now, "nbf": now,
                  "exp": now + self.token_lifetime_s, "scope": scope, "client_id": client.client_id,
                  "jti": secrets.token_hex(8)}
        token = self.sign(claims)
        with self._lock:
            self.issued.append(IssuedToken(client.client_id, scope, now + self.token_lifetime_s, token))
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s,
                     "scope": scope}, {}

    def _refuse(self, status: int, error: str, description: str,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self.refusals.append(f"{status} {error}")
        return status, {"error": error, "error_description": description}, headers or {}

    def _handle(self, handler: _Handler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        extra: dict[str, str] = {}
        if method == "POST" and path == "/token":
            status, answer, extra = self._token_response({k.lower(): v for k, v in handler.headers.items()}, body)
        elif method == "GET" and path == "/jwks":
            with self._lock:
                self.jwks_requests += 1
            status, answer = 200, self.jwks()
        elif method == "GET" and path == "/.well-known/openid-configuration":
            status, answer = 200, {"issuer": self.issuer, "token_endpoint": self.token_url, "jwks_uri": self.jwks_url,
                                   "grant_types_supported": ["client_credentials"],
                                   "id_token_signing_alg_values_supported": ["RS256"]}
        else:
            status, answer = 404, {"error": "not_found"}
        payload = _json(answer)
        handler.send_response(status, HTTPStatus(status).phrase)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Cache-Control", "no-store")
        handler.send_header("Content-Length", str(len(payload)))
        for name, value in extra.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)


def _client_credentials(authorization: str, form: dict[str, str]) -> tuple[str | None, str | None]:
    """``client_secret_basic`` (RFC 6749 section 2.3.1: each part form-urlencoded) or ``client_secret_post``."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except ValueError:
            return None, None
        client_id, _, client_secret = decoded.partition(":")
        return unquote(client_id.replace("+", " ")), unquote(client_secret.replace("+", " "))
    return form.get("client_id"), form.get("client_secret")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, provider: OidcProvider) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.provider = provider


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.server.provider._handle(self, "POST")

    def do_GET(self) -> None:
        self.server.provider._handle(self, "GET")

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr logging."""


# -- RSA, enough to sign -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RsaKey:
    n: int
    e: int
    d: int = field(repr=False)

    @classmethod
    def generate(cls, bits: int = 2048) -> _RsaKey:
        """A fresh key from ``openssl genpkey``, read from its PKCS#8 DER form."""
        openssl = require_binary("openssl", "install the Debian package openssl")
        with tempfile.TemporaryDirectory(prefix="oidc-") as tmp:
            path = Path(tmp) / "key.der"
            result = subprocess.run([openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}",
                                     "-outform", "DER", "-out", str(path)], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"openssl genpkey failed: {result.stderr.strip()[-2000:]}")
            der = path.read_bytes()
        # PKCS#8 PrivateKeyInfo ::= SEQUENCE { version, AlgorithmIdentifier, OCTET STRING (RSAPrivateKey) }, or
        # (what OpenSSL 3 writes as DER) the PKCS#1 RSAPrivateKey ::= SEQUENCE { version, n, e, d, p, q, ... } itself
        _, fields, _ = _der(der, 0x30)
        _, _, rest = _der(fields, 0x02)
        if rest[0] == 0x30:
            _, _, rest = _der(rest, 0x30)
            _, rsa_key, _ = _der(rest, 0x04)
            _, fields, _ = _der(rsa_key, 0x30)
        numbers: list[int] = []
        while fields and len(numbers) < 4:
            _, value, fields = _der(fields, 0x02)
            numbers.append(int.from_bytes(value, "big"))
        _, n, e, d = numbers
        return cls(n=n, e=e, d=d)

    def sign_sha256(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 section 8.2.1)."""
        size = (self.n.bit_length() + 7) // 8
        digest_info = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        encoded = b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info
        return pow(int.from_bytes(encoded, "big"), self.d, self.n).to_bytes(size, "big")


def _der(data: bytes, expected_tag: int) -> tuple[int, bytes, bytes]:
    """One DER element: (tag, contents, what follows it)."""
    tag, length = data[0], data[1]
    if tag != expected_tag:
        raise ValueError(f"DER: expected tag {expected_tag:#x}, found {tag:#x}")
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[2:2 + count], "big")
        offset += count
    return tag, data[offset:offset + length], data[offset + length:]


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
