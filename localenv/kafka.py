"""A real Apache Kafka broker (KRaft mode) started from Maven Central jars.

The jars are fetched once with Maven (see ``kafka-pom.xml`` next to this
module) into a cache directory, then every :class:`KafkaBroker` runs
``kafka.Kafka`` from them in a single JVM that is both broker and controller.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import functools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.protocol.admin import CreateAclsRequest

from localenv._process import LocalService, kill_process, log_tail, require_binary, spawn, terminate_process
from localenv.ports import free_ports
from localenv.tls import Certificates, make_certificates

__all__ = [
    "KAFKA_VERSION",
    "POM_PATH",
    "Acl",
    "KafkaBroker",
    "KafkaSecurity",
    "OAuthBearerValidation",
    "acreate_acls",
    "acreate_topics",
    "create_topics",
    "default_cache_dir",
    "ensure_jars",
]

KAFKA_VERSION = "4.1.1"
"""Version of the broker jars named in ``kafka-pom.xml``."""

POM_PATH = Path(__file__).resolve().with_name("kafka-pom.xml")
"""The checked-in pom whose runtime dependencies form the broker classpath."""

CACHE_ENV_VAR = "EVALJOIN_CACHE_DIR"
"""Environment variable that overrides the default cache directory."""

_MARKER = ".complete"
_BIND_ATTEMPTS = 3
_T = TypeVar("_T")


def default_cache_dir() -> Path:
    """Return ``$EVALJOIN_CACHE_DIR`` if set, else ``.cache`` at the repository root."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / ".cache"


def ensure_jars(cache_dir: Path | None = None) -> Path:
    """Make sure the Kafka runtime jars are in the cache and return their directory.

    The returned directory is ``<cache_dir>/kafka-<version>/libs`` and holds
    every runtime jar the broker needs, so ``'<libs>/*'`` is a complete Java
    classpath. Maven is run (``mvn dependency:copy-dependencies`` on
    :data:`POM_PATH`) only when the completion marker from an earlier
    successful run is missing; afterwards this is a cheap file check and needs
    neither Maven nor the network. Concurrent callers (several test
    processes) are serialised with a file lock, so only one runs Maven.

    Raises ``RuntimeError`` naming ``mvn`` and quoting its output when Maven
    is missing or fails. ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    root = (cache_dir if cache_dir is not None else default_cache_dir()).resolve()
    version_dir = root / f"kafka-{KAFKA_VERSION}"
    libs = version_dir / "libs"
    marker = version_dir / _MARKER
    if marker.exists():
        return libs
    version_dir.mkdir(parents=True, exist_ok=True)
    _ignore_in_git(root)
    with _file_lock(root / f"kafka-{KAFKA_VERSION}.lock"):
        if marker.exists():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError(
                "mvn (Apache Maven) not found on PATH; it is needed once to fetch the Kafka "
                f"{KAFKA_VERSION} jars into {libs} (install the Debian package maven)"
            )
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM_PATH),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-4000:]
            raise RuntimeError(
                f"mvn failed (exit {result.returncode}) fetching the Kafka {KAFKA_VERSION} jars "
                f"with: {' '.join(cmd)}\n{output}"
            )
        if not any(libs.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            raise RuntimeError(f"mvn succeeded but {libs} has no kafka_2.13-{KAFKA_VERSION}.jar")
        marker.write_text(f"kafka {KAFKA_VERSION} jars fetched by mvn\n")
    return libs


def _ignore_in_git(cache_root: Path) -> None:
    """Keep the repository-local default cache out of ``git status``."""
    if cache_root != default_cache_dir() or CACHE_ENV_VAR in os.environ:
        return
    gitignore = cache_root / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# downloaded by localenv; not part of the source tree\n*\n")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run_coroutine(factory: Callable[[], Awaitable[_T]]) -> _T:
    """Run a coroutine to completion from synchronous code.

    Works whether or not the calling thread already runs an event loop: in
    the latter case the coroutine runs on a fresh loop in a helper thread
    (blocking the caller, which is acceptable for set-up code).
    """

    async def main() -> _T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


async def acreate_topics(bootstrap: str, topics: dict[str, int], *, request_timeout: float = 30.0,
                         replication_factor: int = 1) -> None:
    """Create topics (name -> partition count) with ``replication_factor`` (1, one broker's; 3 on a cluster).

    Topics that already exist are left as they are (even if their partition
    count differs); any other error is raised as the matching
    ``aiokafka.errors`` exception. Returns once the controller has accepted
    the creation. ``request_timeout`` bounds each request to the broker.
    """
    if not topics:
        return
    timeout_ms = int(request_timeout * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        new_topics = [NewTopic(name, partitions, replication_factor) for name, partitions in topics.items()]
        response = await admin.create_topics(new_topics, timeout_ms=timeout_ms)
    finally:
        await admin.close()
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        if code == 0:
            continue
        error_cls = for_code(code)
        if error_cls is TopicAlreadyExistsError:
            continue
        message = entry[2] if len(entry) > 2 and entry[2] else ""
        raise error_cls(f"creating topic {name!r}: {message}")


def create_topics(bootstrap: str, topics: dict[str, int], *, request_timeout: float = 30.0,
                  replication_factor: int = 1) -> None:
    """Synchronous :func:`acreate_topics`; usable with or without a running event loop."""
    _run_coroutine(lambda: acreate_topics(bootstrap, topics, request_timeout=request_timeout,
                                          replication_factor=replication_factor))


async def _probe_broker(bootstrap: str, node_id: int, budget: float) -> bool:
    """True if the broker answers a metadata request within ``budget`` seconds and lists itself."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(1000, int(budget * 1000)),
        retry_backoff_ms=100,
    )
    try:
        async with asyncio.timeout(budget):
            await admin.start()
            cluster: dict[str, Any] = await admin.describe_cluster()
        brokers = cluster.get("brokers") or []
        return any(int(broker.get("node_id", -1)) == node_id for broker in brokers)
    except (KafkaError, OSError, TimeoutError):  # not ready yet
        return False
    finally:
        with contextlib.suppress(KafkaError, OSError, TimeoutError):
            await admin.close()


def _new_cluster_id() -> str:
    """A random Kafka cluster id (base64url UUID without padding, as Kafka's Uuid)."""
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not value.startswith("-"):
            return value


SCRAM_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")
OAUTHBEARER_VALIDATOR = "org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler"
OAUTHBEARER_ALLOWED_URLS = "org.apache.kafka.sasl.oauthbearer.allowed.urls"  # a JVM system property since Kafka 4.0
BROKER_JWT_VALIDATOR = "org.apache.kafka.common.security.oauthbearer.BrokerJwtValidator"
STANDARD_AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"


@dataclass(frozen=True)
class OAuthBearerValidation:
    """How the OAUTH listener validates SASL/OAUTHBEARER tokens: Kafka's own ``OAuthBearerValidatorCallbackHandler``
    checks each JWT's signature against the keys at ``jwks_url``, its ``iss`` and ``aud``, and that ``sub``,
    ``iat`` and ``exp`` are there and ``exp`` has not passed. The principal is ``User:<sub>``."""

    jwks_url: str
    issuer: str
    audience: str


@dataclass(frozen=True)
class KafkaSecurity:
    """A SASL_SSL listener next to the PLAINTEXT one: TLS with a throwaway CA, SCRAM users.

    The user is created with credentials for both SCRAM mechanisms when the storage is formatted,
    so it exists before any client connects (SCRAM users otherwise need an admin request).

    ``mutual_tls`` adds an SSL listener (MTLS) that requires a client certificate signed by the same
    CA (``ssl.client.auth=required``; principal ``User:CN=<common name>``); ``oauthbearer`` adds a
    SASL_SSL listener (OAUTH) with OAUTHBEARER validated as :class:`OAuthBearerValidation` says.
    ``super_users`` (principals such as ``User:CN=x``) turns on Kafka's ``StandardAuthorizer``: the
    PLAINTEXT listeners' ``User:ANONYMOUS`` and these may do anything, everyone else only what an ACL
    allows (:func:`acreate_acls`).
    """

    username: str = "evaljoin"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    mutual_tls: bool = False
    oauthbearer: OAuthBearerValidation | None = None
    super_users: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Acl:
    """One ALLOW or DENY rule (Kafka's codes: resource type TOPIC=2, GROUP=3, CLUSTER=4; pattern LITERAL=3,
    PREFIXED=4; operation READ=3, WRITE=4, DESCRIBE=8, IDEMPOTENT_WRITE=12; permission DENY=2, ALLOW=3)."""

    principal: str
    resource_type: int
    resource_name: str
    operation: int
    pattern_type: int = 3
    allow: bool = True

    TOPIC: ClassVar[int] = 2
    GROUP: ClassVar[int] = 3
    CLUSTER: ClassVar[int] = 4
    LITERAL: ClassVar[int] = 3
    PREFIXED: ClassVar[int] = 4
    READ: ClassVar[int] = 3
    WRITE: ClassVar[int] = 4
    DESCRIBE: ClassVar[int] = 8
    IDEMPOTENT_WRITE: ClassVar[int] = 12


async def acreate_acls(bootstrap: str, acls: list[Acl], *, request_timeout: float = 30.0) -> None:
    """Create ACLs through ``bootstrap`` (a super user's listener); raises the broker's error for a refused one."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(request_timeout * 1000))
    await admin.start()
    try:
        for acl in acls:
            request = CreateAclsRequest(acl.resource_type, acl.resource_name, acl.pattern_type, acl.principal, "*",
                                        acl.operation, 3 if acl.allow else 2)
            response = await admin._send_request(request)
            for code, message in response.creation_responses:
                if code != 0:
                    raise for_code(code)(f"creating {acl}: {message}")
    finally:
        await admin.close()


class KafkaBroker(LocalService):
    """One Apache Kafka broker+controller (KRaft, node id 1) on 127.0.0.1.

    What callers may assume once :meth:`start` has returned:

    * :attr:`bootstrap_servers` (``"127.0.0.1:<port>"``) accepts PLAINTEXT
      clients and has already answered a metadata request listing itself.
    * Topics are auto-created on first use with 4 partitions; internal
      topics (consumer offsets, transactions) use replication factor 1, and
      consumer groups rebalance without the initial delay.
    * The ports and the data directory stay the same for the life of the
      object, including across :meth:`kill` and :meth:`restart`, so data
      written before a crash is still there afterwards (storage is formatted
      only when the data directory has never been formatted).
    * Broker output (including the JVM's) is appended to :attr:`log_path`.

    Startup takes a few seconds (JVM start plus KRaft election). Every
    process started is stopped by :meth:`stop` (or leaving the ``with``
    block). When ``data_dir`` is None a temporary directory is used and
    removed by :meth:`stop`; a directory passed in is never removed.
    ``extra_properties`` are written last into ``server.properties`` and so
    override the defaults.

    With ``security``, the broker also has a SASL_SSL listener at
    :attr:`sasl_ssl_bootstrap_servers`: a certificate for 127.0.0.1 signed by a
    throwaway CA (:attr:`ca_file`, made at the first start in the data
    directory) and SCRAM-SHA-512/256 authentication of ``security.username``; with
    ``security.mutual_tls`` an SSL listener requiring client certificates at
    :attr:`mtls_bootstrap_servers`, with ``security.oauthbearer`` a SASL_SSL/OAUTHBEARER listener at
    :attr:`oauth_bootstrap_servers` (see :class:`KafkaSecurity`).

    With ``proxied_port``, the broker also has a listener named PROXIED,
    bound on a port of its own (:attr:`proxied_listener_port`) but
    advertising ``127.0.0.1:<proxied_port>``: a fault proxy listening there and
    forwarding to :attr:`proxied_listener_port` then carries every connection
    of a client bootstrapped through it (clients connect to the address the
    broker advertises), while other clients keep using :attr:`bootstrap_servers`.
    It is PLAINTEXT, or with ``security`` SASL_SSL like the SASL_SSL listener
    (same certificate, for 127.0.0.1, and SCRAM users): a proxy forwarding raw
    TCP carries the TLS session through unchanged.
    """

    NODE_ID = 1

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        heap: str = "512m",
        extra_properties: dict[str, str] | None = None,
        cache_dir: Path | None = None,
        startup_timeout: float = 60.0,
        security: KafkaSecurity | None = None,
        proxied_port: int | None = None,
    ) -> None:
        self.security = security
        self._proxied_port = proxied_port
        self._proxied_listener_port: int | None = None
        self._sasl_ssl_port: int | None = None
        self._mtls_port: int | None = None
        self._oauth_port: int | None = None
        self._requested_data_dir = data_dir
        self._heap = heap
        self._extra_properties = dict(extra_properties or {})
        self._cache_dir = cache_dir
        self._startup_timeout = startup_timeout
        self._data_dir: Path | None = None
        self._owns_data_dir = False
        self._port: int | None = None
        self._controller_port: int | None = None
        self._libs: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties -------------------------------------------------------

    @property
    def port(self) -> int:
        """The PLAINTEXT (client) port. Only valid after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("KafkaBroker has not been started")
        return self._port

    @property
    def controller_port(self) -> int:
        """The KRaft CONTROLLER listener port. Only valid after :meth:`start`."""
        if self._controller_port is None:
            raise RuntimeError("KafkaBroker has not been started")
        return self._controller_port

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:<port>"`` for Kafka clients. Only valid after :meth:`start`."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        """``"127.0.0.1:<port>"`` of the SASL_SSL listener. Only with ``security``, after :meth:`start`."""
        if self._sasl_ssl_port is None:
            raise RuntimeError("KafkaBroker has no SASL_SSL listener (no security given, or not started)")
        return f"127.0.0.1:{self._sasl_ssl_port}"

    @property
    def mtls_bootstrap_servers(self) -> str:
        """``"127.0.0.1:<port>"`` of the SSL listener that requires client certificates (``security.mutual_tls``)."""
        if self._mtls_port is None:
            raise RuntimeError("KafkaBroker has no MTLS listener (security.mutual_tls not set, or not started)")
        return f"127.0.0.1:{self._mtls_port}"

    @property
    def oauth_bootstrap_servers(self) -> str:
        """``"127.0.0.1:<port>"`` of the SASL_SSL listener with OAUTHBEARER (``security.oauthbearer``)."""
        if self._oauth_port is None:
            raise RuntimeError("KafkaBroker has no OAUTH listener (security.oauthbearer not set, or not started)")
        return f"127.0.0.1:{self._oauth_port}"

    @property
    def proxied_listener_port(self) -> int:
        """The port the PROXIED listener binds (a proxy forwards to it). Only with ``proxied_port``, after start."""
        if self._proxied_listener_port is None:
            raise RuntimeError("KafkaBroker has no PROXIED listener (no proxied_port given, or not started)")
        return self._proxied_listener_port

    @property
    def ca_file(self) -> Path:
        """The CA certificate that verifies the SASL_SSL listener. Only with ``security``, after :meth:`start`."""
        return self._certificates().ca_file

    @property
    def data_dir(self) -> Path:
        """Directory holding ``server.properties``, the log dirs and ``broker.log``."""
        if self._data_dir is None:
            raise RuntimeError("KafkaBroker has not been started")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The broker's combined stdout/stderr (``<data_dir>/broker.log``)."""
        return self.data_dir / "broker.log"

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Fetch jars if needed, format storage if needed, start the broker and wait until ready.

        Raises ``RuntimeError`` if the broker is already running, and
        ``TimeoutError``/``RuntimeError`` with the tail of ``broker.log`` when
        it exits early or does not answer within ``startup_timeout``; in that
        case the process is killed and a temporary data dir removed before raising.
        """
        if self.running:
            raise RuntimeError("KafkaBroker is already running")
        try:
            self._start()
        except BaseException:
            self.stop()  # no half-started broker or stray temp dir; the error carries the log tail
            raise

    def _start(self) -> None:
        self._libs = ensure_jars(self._cache_dir)
        require_binary("java", "install a Java 17+ runtime (Debian package openjdk-17-jre-headless)")
        if self._data_dir is None:
            if self._requested_data_dir is None:
                self._data_dir = Path(tempfile.mkdtemp(prefix="kafka-"))
                self._owns_data_dir = True
            else:
                self._data_dir = self._requested_data_dir.resolve()
                self._data_dir.mkdir(parents=True, exist_ok=True)
                self._owns_data_dir = False
        if self._port is not None and self._controller_port is not None:
            self._launch()
            return
        for attempt in range(_BIND_ATTEMPTS):
            # Free ports can be taken by another process before the JVM binds
            # them; on a first start it is safe to just pick new ones.
            self._port, self._controller_port = free_ports(2)
            self._sasl_ssl_port, self._mtls_port, self._oauth_port = self._pick_security_ports()
            self._proxied_listener_port = self._pick_proxied_listener_port()
            try:
                self._launch()
                return
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == _BIND_ATTEMPTS - 1:
                    raise

    def restart(self) -> None:
        """Start the broker again on the same ports with the same data.

        If the broker is still running it is stopped gracefully first. The
        storage is not reformatted, so every message the broker had written
        before (even before a :meth:`kill`) is readable afterwards. Raises
        ``RuntimeError`` if the broker was never started or its temporary
        data directory has already been removed by :meth:`stop`.
        """
        if self._data_dir is None or not self._data_dir.exists():
            raise RuntimeError("restart() needs a broker that was started and not stopped")
        if self._proc is not None:
            terminate_process(self._proc, timeout=20.0)
            self._proc = None
        self._launch()

    def stop(self) -> None:
        """Stop the broker (SIGTERM, up to 20 s, then SIGKILL) and remove a temporary data dir.

        Idempotent; also the way to clean up after :meth:`kill`. After stop,
        :meth:`start` begins afresh (new temporary directory and ports when
        none were given).
        """
        if self._proc is not None:
            terminate_process(self._proc, timeout=20.0)
            self._proc = None
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._port = None
            self._controller_port = None
            self._sasl_ssl_port = self._mtls_port = self._oauth_port = None
            self._proxied_listener_port = None
            self._owns_data_dir = False

    def kill(self) -> None:
        """SIGKILL the broker (a crash) and wait for it to exit; data and ports are kept."""
        if self._proc is not None:
            kill_process(self._proc)
            self._proc = None

    # -- internals --------------------------------------------------------

    def _properties(self) -> dict[str, str]:
        port, cport = self.port, self.controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.NODE_ID),
            "controller.quorum.voters": f"{self.NODE_ID}@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "kraft-logs"),
            "num.partitions": "4",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After a crash the controller keeps the dead incarnation registered
            # until its session expires; the default 9 s session would make every
            # restart() after kill() take 9 s longer.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
        }
        if self.security is not None:
            props.update(self._sasl_ssl_properties(props))
        if self._proxied_port is not None:
            props.update(self._proxied_properties(props, self._proxied_port))
        props.update(self._extra_properties)
        return props

    def _pick_security_ports(self) -> tuple[int | None, int | None, int | None]:
        """Ports for the SASL_SSL, MTLS and OAUTH listeners, distinct from the other two; None for those not asked."""
        if self.security is None:
            return None, None, None
        taken = {self._port, self._controller_port}
        sasl_ssl, mtls, oauth = [port for port in free_ports(5) if port not in taken][:3]
        return (sasl_ssl, mtls if self.security.mutual_tls else None,
                oauth if self.security.oauthbearer is not None else None)

    def _pick_proxied_listener_port(self) -> int | None:
        """A port for the PROXIED listener, distinct from the others, or None without ``proxied_port``."""
        if self._proxied_port is None:
            return None
        taken = {self._port, self._controller_port, self._sasl_ssl_port, self._proxied_port}
        return next(port for port in free_ports(5) if port not in taken)

    def _proxied_properties(self, props: dict[str, str], advertised_port: int) -> dict[str, str]:
        """The PROXIED listener added to ``props``' listeners (SASL_SSL with ``security``); the rest unchanged."""
        protocol = "PLAINTEXT" if self.security is None else "SASL_SSL"
        added = {
            "listeners": f"{props['listeners']},PROXIED://127.0.0.1:{self.proxied_listener_port}",
            "advertised.listeners": f"{props['advertised.listeners']},PROXIED://127.0.0.1:{advertised_port}",
            "listener.security.protocol.map": f"{props['listener.security.protocol.map']},PROXIED:{protocol}",
        }
        if self.security is not None:  # the keystore and mechanisms are the broker's, set with the SASL_SSL listener
            jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            for mechanism in SCRAM_MECHANISMS:
                added[f"listener.name.proxied.{mechanism.lower()}.sasl.jaas.config"] = jaas
        return added

    def _certificates(self) -> Certificates:
        if self.security is None:
            raise RuntimeError("KafkaBroker has no SASL_SSL listener (no security given)")
        return make_certificates(self.data_dir / "tls")

    def _sasl_ssl_properties(self, props: dict[str, str]) -> dict[str, str]:
        """The SASL_SSL listener added to ``props``' listeners; the others stay exactly as they are."""
        listener = f"SASL_SSL://{self.sasl_ssl_bootstrap_servers}"
        certs = self._certificates()
        jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        added = {
            "listeners": f"{props['listeners']},{listener}",
            "advertised.listeners": f"{props['advertised.listeners']},{listener}",
            "listener.security.protocol.map": f"{props['listener.security.protocol.map']},SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(certs.keystore_file),
        }
        for mechanism in SCRAM_MECHANISMS:
            added[f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config"] = jaas
        security = self.security
        assert security is not None
        if security.mutual_tls:
            self._add_listener(added, "MTLS", "SSL", self.mtls_bootstrap_servers)
            added.update({"listener.name.mtls.ssl.client.auth": "required",
                          "listener.name.mtls.ssl.truststore.type": "PEM",
                          "listener.name.mtls.ssl.truststore.location": str(certs.ca_file)})
        if security.oauthbearer is not None:
            oauth = security.oauthbearer
            self._add_listener(added, "OAUTH", "SASL_SSL", self.oauth_bootstrap_servers)
            added.update({
                "listener.name.oauth.sasl.enabled.mechanisms": "OAUTHBEARER",
                # The broker's own login (never used on this listener: it is not the inter-broker one) needs a subject.
                "listener.name.oauth.oauthbearer.sasl.jaas.config":
                    'org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required '
                    'unsecuredLoginStringClaim_sub="broker";',
                "listener.name.oauth.oauthbearer.sasl.server.callback.handler.class": OAUTHBEARER_VALIDATOR,
                # Named, not left to the default: Kafka 4.1.1's handler instantiates DefaultJwtValidator without a key
                # resolver, which then delegates to ClientJwtValidator: claims checked, signature not (a test pins it).
                "listener.name.oauth.sasl.oauthbearer.jwt.validator.class": BROKER_JWT_VALIDATOR,
                "listener.name.oauth.sasl.oauthbearer.jwks.endpoint.url": oauth.jwks_url,
                "listener.name.oauth.sasl.oauthbearer.expected.issuer": oauth.issuer,
                "listener.name.oauth.sasl.oauthbearer.expected.audience": oauth.audience,
            })
        if security.super_users is not None:
            added.update({"authorizer.class.name": STANDARD_AUTHORIZER,
                          "super.users": ";".join(["User:ANONYMOUS", *security.super_users]),
                          "allow.everyone.if.no.acl.found": "false"})
        return added

    @staticmethod
    def _add_listener(props: dict[str, str], name: str, protocol: str, address: str) -> None:
        props["listeners"] += f",{name}://{address}"
        props["advertised.listeners"] += f",{name}://{address}"
        props["listener.security.protocol.map"] += f",{name}:{protocol}"

    def _jvm_properties(self) -> list[str]:
        """System properties: Kafka 4 fetches OAUTHBEARER URLs (the JWKS) only when this allow-list names them."""
        if self.security is None or self.security.oauthbearer is None:
            return []
        return [f"-D{OAUTHBEARER_ALLOWED_URLS}={self.security.oauthbearer.jwks_url}"]

    def _scram_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments that create the SCRAM user, one per mechanism."""
        if self.security is None:
            return []
        user = self.security
        credential = f'[name="{user.username}",password="{user.password}"]'
        return [arg for mechanism in SCRAM_MECHANISMS for arg in ("--add-scram", f"{mechanism}={credential}")]

    def _write_properties(self) -> Path:
        path = self.data_dir / "server.properties"
        lines = ["# written by localenv.kafka.KafkaBroker"]
        lines += [f"{key}={value}" for key, value in self._properties().items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def _classpath(self) -> str:
        assert self._libs is not None
        return f"{self._libs}{os.sep}*"

    def _format_if_needed(self, properties: Path) -> None:
        log_dirs = self._properties()["log.dirs"].split(",")
        if all((Path(d) / "meta.properties").exists() for d in log_dirs):
            return
        cmd = [
            "java",
            "-cp",
            self._classpath(),
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self._storage_cluster_id(),
            "-c",
            str(properties),
            *self._scram_arguments(),
        ]
        result = subprocess.run(cmd, cwd=self.data_dir, capture_output=True, text=True, check=False)
        with open(self.log_path, "a") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(
                f"kafka StorageTool format failed (exit {result.returncode}):\n"
                f"{(result.stdout + result.stderr).strip()[-4000:]}"
            )

    def _storage_cluster_id(self) -> str:
        """The cluster id a first start formats the storage with (the nodes of a cluster share one)."""
        return _new_cluster_id()

    def _launch(self) -> None:
        self._spawn()
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _spawn(self) -> None:
        """Write the properties, format the storage on a first start, and start the JVM (not waiting for it)."""
        properties = self._write_properties()
        self._format_if_needed(properties)
        cmd = [
            "java",
            f"-Xmx{self._heap}",
            "-cp",
            self._classpath(),
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            *self._jvm_properties(),
            "kafka.Kafka",
            str(properties),
        ]
        self._proc = spawn(cmd, log_path=self.log_path, cwd=self.data_dir)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"Kafka broker exited with code {code} during startup; "
                    f"tail of {self.log_path.name}:\n{log_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"Kafka broker on {self.bootstrap_servers} not ready after "
                    f"{self._startup_timeout:.0f}s; tail of {self.log_path.name}:\n{log_tail(self.log_path)}"
                )
            budget = min(5.0, max(remaining, 0.5))
            if self._port_open() and _run_coroutine(
                functools.partial(_probe_broker, self.bootstrap_servers, self.NODE_ID, budget)
            ):
                return
            time.sleep(0.1)

    def _port_open(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0
