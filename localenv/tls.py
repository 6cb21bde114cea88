"""Throwaway TLS material for the local services: a CA, a server certificate for 127.0.0.1, client certificates.

Kafka's and Redis's TLS listeners need a certificate that clients verify against a CA file, as
they would in production (hostname checking on, no "insecure" switch). The ``openssl`` command
line makes them in well under a second, so each secured service makes its own at start and
deletes it with its data directory; nothing is checked in and nothing is trusted system-wide.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from localenv._process import require_binary

__all__ = ["Certificates", "ClientCertificate", "make_certificates", "make_client_certificate"]

_DAYS = "2"
_CURVE = "ec_paramgen_curve:P-256"  # an EC key is generated in milliseconds; Java, OpenSSL and Python all take it
_SERVER_EXTENSIONS = "\n".join([
    "basicConstraints=critical,CA:FALSE",
    "keyUsage=critical,digitalSignature,keyEncipherment",
    "extendedKeyUsage=serverAuth",
    "subjectAltName=IP:127.0.0.1,DNS:localhost",
])


_CLIENT_EXTENSIONS = "\n".join([
    "basicConstraints=critical,CA:FALSE",
    "keyUsage=critical,digitalSignature",
    "extendedKeyUsage=clientAuth",
])


@dataclass(frozen=True)
class Certificates:
    """PEM files in one directory; only :attr:`ca_file` is for clients."""

    ca_file: Path
    """The CA certificate clients verify the server with (``KAFKA_SSL_CAFILE``, ``REDIS_SSL_CAFILE``)."""
    cert_file: Path
    """The server certificate (subject alternative names 127.0.0.1 and localhost), signed by the CA."""
    key_file: Path
    """The server's unencrypted PKCS#8 private key."""
    keystore_file: Path
    """Key and certificate in one file, as Kafka's ``ssl.keystore.type=PEM`` reads it."""


def make_certificates(directory: Path) -> Certificates:
    """Create (or reuse, when present from an earlier start) the CA and server certificate in ``directory``.

    Reuse keeps a restarted server's certificate verifiable by clients that already hold the CA
    file. Raises ``FileNotFoundError`` if ``openssl`` is missing and ``RuntimeError`` quoting its
    output if it fails.
    """
    certs = Certificates(ca_file=directory / "ca.pem", cert_file=directory / "server.pem",
                         key_file=directory / "server.key", keystore_file=directory / "server-keystore.pem")
    if certs.keystore_file.exists():
        return certs
    directory.mkdir(parents=True, exist_ok=True)
    openssl = require_binary("openssl", "install the Debian package openssl")
    ca_key = directory / "ca.key"
    _run(directory, [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", _CURVE, "-nodes", "-days", _DAYS,
                     "-subj", "/CN=evaljoin throwaway test CA", "-keyout", ca_key.name, "-out", certs.ca_file.name,
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    (directory / "server.ext").write_text(_SERVER_EXTENSIONS + "\n")
    _run(directory, [openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", _CURVE, "-nodes",
                     "-subj", "/CN=127.0.0.1", "-keyout", certs.key_file.name, "-out", "server.csr"])
    _run(directory, [openssl, "x509", "-req", "-in", "server.csr", "-CA", certs.ca_file.name, "-CAkey", ca_key.name,
                     "-CAcreateserial", "-days", _DAYS, "-extfile", "server.ext", "-out", certs.cert_file.name])
    # Written last: its presence means the set is complete (see the reuse check above).
    certs.keystore_file.write_text(certs.key_file.read_text() + certs.cert_file.read_text())
    return certs


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate signed by the same CA, for mutual TLS; its key is encrypted with :attr:`password`."""

    common_name: str
    cert_file: Path
    key_file: Path
    """The PKCS#8 private key, encrypted (AES-256) with :attr:`password`."""
    password: str


def make_client_certificate(directory: Path, common_name: str, password: str) -> ClientCertificate:
    """Create a client certificate (subject ``CN=<common_name>``, for ``clientAuth``) signed by the CA of
    :func:`make_certificates` in ``directory``, which must have been made before. A broker that requires
    client certificates sees the principal ``User:CN=<common_name>``.
    """
    ca_file, ca_key = directory / "ca.pem", directory / "ca.key"
    if not ca_key.exists():
        raise RuntimeError(f"no CA in {directory}: make_certificates() first")
    openssl = require_binary("openssl", "install the Debian package openssl")
    stem = "client-" + "".join(c if c.isalnum() else "-" for c in common_name)
    cert = ClientCertificate(common_name, directory / f"{stem}.pem", directory / f"{stem}.key", password)
    plain_key = directory / f"{stem}.plain.key"
    (directory / "client.ext").write_text(_CLIENT_EXTENSIONS + "\n")
    _run(directory, [openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", _CURVE, "-nodes",
                     "-subj", f"/CN={common_name}", "-keyout", plain_key.name, "-out", f"{stem}.csr"])
    _run(directory, [openssl, "x509", "-req", "-in", f"{stem}.csr", "-CA", ca_file.name, "-CAkey", ca_key.name,
                     "-CAcreateserial", "-days", _DAYS, "-extfile", "client.ext", "-out", cert.cert_file.name])
    _run(directory, [openssl, "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", plain_key.name,
                     "-passout", "env:EVALJOIN_CLIENT_KEY_PASSWORD", "-out", cert.key_file.name],
         env={"EVALJOIN_CLIENT_KEY_PASSWORD": password})
    plain_key.unlink()
    return cert


def _run(directory: Path, args: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(args, cwd=directory, capture_output=True, text=True, check=False,
                            env=None if env is None else {**os.environ, **env})
    if result.returncode != 0:
        raise RuntimeError(f"openssl failed (exit {result.returncode}): {' '.join(args[1:3])}\n"
                           f"{(result.stdout + result.stderr).strip()[-2000:]}")
