"""Real ``redis-server`` processes: a single server, a small cluster, and a primary with replicas and sentinels."""

from __future__ import annotations

import functools
import hashlib
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from localenv._process import LocalService, kill_process, log_tail, require_binary, spawn, terminate_process
from localenv.netfault import NetFault
from localenv.ports import free_ports
from localenv.tls import Certificates, make_certificates

__all__ = ["SERVICE_COMMANDS", "RedisCluster", "RedisSentinelSet", "RedisServer", "RedisUser", "service_acl_rules"]

_INSTALL_HINT = "install the Debian package redis-server"
_APPENDFSYNC = ("always", "everysec", "no")
_BIND_ATTEMPTS = 3


SERVICE_COMMANDS = (
    # connection and the `check` command (INFO persistence; its CONFIG GET may be refused)
    "ping", "info",
    # the Lua scripts, loaded on first use
    "evalsha", "script|load", "script|exists",
    # called directly and from the scripts
    "exists", "get", "set", "setrange", "del", "hget", "hset", "hdel", "hexists", "hgetall", "hlen", "pexpire",
    "zadd", "zrem", "zscore", "zrange", "zrangebyscore", "zcard",
    # per-app usage and quotas (lua/usage.lua), the oldest waiting side per app
    "strlen", "getrange", "hmget", "hincrby", "sadd", "smembers",
    # `inspect` counts buffered sides per ml_app
    "scan",
    # REDIS_WAIT_REPLICAS: replica acknowledgement of the writes
    "wait",
)
"""Every command the service and its operator commands send to a single Redis, scripts included."""


def service_acl_rules(prefix: str) -> str:
    """The ACL rules of a Redis user for the service with ``REDIS_KEY_PREFIX=prefix``: its keys, its commands.

    Scripts run with their caller's permissions, so the commands the Lua scripts call are listed
    too; no pub/sub channels, nothing else.
    """
    return f"~{prefix}:* resetchannels -@all " + " ".join(f"+{command}" for command in SERVICE_COMMANDS)


@dataclass(frozen=True)
class RedisUser:
    """An ACL user of a :class:`RedisServer`: ``ACL SETUSER <name> on ><password> <rules>``."""

    name: str
    password: str
    rules: str


def _no_retry() -> Retry:
    """Fail fast: the readiness loops poll on their own, redis-py's retries only add backoff."""
    return Retry(NoBackoff(), 0)


def _ping(port: int, password: str | None, ca_file: Path | None = None) -> bool:
    """True if the server on ``port`` answers PING (not while it is still loading data); TLS with ``ca_file``."""
    tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(ca_file)} if ca_file is not None else {}
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=_no_retry(),
        **tls,
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _wait_until(
    check: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    *,
    timeout: float,
    what: str,
    log_path: Path,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        code = proc.poll()
        if code is not None:
            raise RuntimeError(
                f"{what} exited with code {code} during startup; tail of {log_path.name}:\n{log_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s; tail of {log_path.name}:\n{log_tail(log_path)}")
        time.sleep(0.02)


class RedisServer(LocalService):
    """One ``redis-server`` on 127.0.0.1, in the foreground of a child process.

    What callers may assume once :meth:`start` has returned:

    * :attr:`url` (``redis://[:password@]127.0.0.1:<port>/0``) answers PING,
      with AUTH when ``password`` is given.
    * RDB snapshots are off (``--save ''``). With the defaults
      (``appendonly=True, appendfsync="always"``) every acknowledged write is
      in the AOF on disk before the reply, so it survives :meth:`kill`.
    * The port and data directory stay the same across :meth:`kill` and
      :meth:`restart`; :meth:`restart` returns once the AOF is loaded.
    * Server output goes to :attr:`log_path` (``<data_dir>/redis.log``).
    * With ``tls=True`` the port speaks only TLS (``rediss://``, no plaintext port), with a
      certificate for 127.0.0.1 from a throwaway CA whose file is :attr:`ca_file`.
    * With ``users``, those ACL users exist; the default user then needs a password (``password``,
      or a random one, see :attr:`password`), so a client without credentials can do nothing.

    When ``data_dir`` is None a temporary directory is used and removed by
    :meth:`stop`; a directory passed in is never removed. Raises
    ``FileNotFoundError`` from :meth:`start` if ``redis-server`` is missing.
    """

    def __init__(
        self,
        *,
        appendonly: bool = True,
        appendfsync: str = "always",
        password: str | None = None,
        data_dir: Path | None = None,
        startup_timeout: float = 15.0,
        tls: bool = False,
        users: Sequence[RedisUser] = (),
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC}, got {appendfsync!r}")
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._users = tuple(users)
        self._password = password if password is not None or not users else secrets.token_hex(16)
        self._tls = tls
        self._certificates: Certificates | None = None
        self._requested_data_dir = data_dir
        self._startup_timeout = startup_timeout
        self._data_dir: Path | None = None
        self._owns_data_dir = False
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The TCP port. Only valid after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("RedisServer has not been started")
        return self._port

    @property
    def password(self) -> str | None:
        """The default user's password (``requirepass``; random when ``users`` were given without one), or None."""
        return self._password

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (``rediss://`` with TLS), with the default user's ``:password@`` if any."""
        auth = f":{self._password}@" if self._password is not None else ""
        return self.base_url.replace("://", f"://{auth}", 1)

    @property
    def base_url(self) -> str:
        """The server's URL without credentials: ``redis://`` or, with TLS, ``rediss://127.0.0.1:<port>/0``."""
        return f"{'rediss' if self._tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def users(self) -> tuple[RedisUser, ...]:
        """The ACL users besides the default user."""
        return self._users

    @property
    def ca_file(self) -> Path:
        """The CA certificate that verifies the server's TLS certificate (``tls=True``, after :meth:`start`)."""
        if self._certificates is None:
            raise RuntimeError("RedisServer has no TLS certificate (tls=False, or not started)")
        return self._certificates.ca_file

    @property
    def data_dir(self) -> Path:
        """The server's ``--dir`` (AOF lives in ``appendonlydir/`` below it)."""
        if self._data_dir is None:
            raise RuntimeError("RedisServer has not been started")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The server's stdout/stderr log."""
        return self.data_dir / "redis.log"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server on a free port and wait until PING answers.

        Raises ``RuntimeError`` if already running, and ``RuntimeError`` or
        ``TimeoutError`` with the log tail if the server exits or does not
        answer within ``startup_timeout`` (the process is killed and a
        temporary data dir removed first).
        """
        if self.running:
            raise RuntimeError("RedisServer is already running")
        try:
            self._start()
        except BaseException:
            self.stop()  # no stray temp dir; the error carries the log tail
            raise

    def _start(self) -> None:
        if self._data_dir is None:
            if self._requested_data_dir is None:
                self._data_dir = Path(tempfile.mkdtemp(prefix="redis-"))
                self._owns_data_dir = True
            else:
                self._data_dir = self._requested_data_dir.resolve()
                self._data_dir.mkdir(parents=True, exist_ok=True)
                self._owns_data_dir = False
        if self._port is not None:
            self._launch()
            return
        for attempt in range(_BIND_ATTEMPTS):
            # Another process may take the free port before redis-server binds
            # it; on a first start it is safe to just pick a new one.
            self._port = free_ports(1)[0]
            try:
                self._launch()
                return
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == _BIND_ATTEMPTS - 1:
                    raise

    def restart(self) -> None:
        """Start again on the same port with the same data directory.

        A running server is stopped gracefully first. Returns once the server
        has reloaded its AOF and answers PING. Raises ``RuntimeError`` if the
        server was never started or has been stopped.
        """
        if self._data_dir is None or self._port is None or not self._data_dir.exists():
            raise RuntimeError("restart() needs a server that was started and not stopped")
        if self._proc is not None:
            terminate_process(self._proc, timeout=10.0)
            self._proc = None
        self._launch()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and wait for it to exit; data and port are kept."""
        if self._proc is not None:
            kill_process(self._proc)
            self._proc = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, up to 10 s, then SIGKILL) and remove a temporary data dir.

        Idempotent; also the way to clean up after :meth:`kill`.
        """
        if self._proc is not None:
            terminate_process(self._proc, timeout=10.0)
            self._proc = None
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._port = None
            self._owns_data_dir = False
            self._certificates = None

    def _args(self, binary: str) -> list[str]:
        args = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            "0" if self._tls else str(self.port),
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            "--appendfsync",
            self._appendfsync,
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
        ]
        if self._tls:
            args += self._tls_args()
        if self._users:
            args += ["--aclfile", str(self._write_acl_file())]
        elif self._password is not None:
            args += ["--requirepass", self._password]
        return args

    def _tls_args(self) -> list[str]:
        """TLS only, on the server's port; clients are verified by nothing but their ACL credentials."""
        self._certificates = make_certificates(self.data_dir / "tls")
        return ["--tls-port", str(self.port), "--tls-cert-file", str(self._certificates.cert_file),
                "--tls-key-file", str(self._certificates.key_file),
                "--tls-ca-cert-file", str(self._certificates.ca_file), "--tls-auth-clients", "no"]

    def _write_acl_file(self) -> Path:
        """The users, passwords as SHA-256 (``#<hex>``), so that no password is written to disk in clear."""
        def line(name: str, password: str, rules: str) -> str:
            return f"user {name} on #{hashlib.sha256(password.encode()).hexdigest()} {rules}"

        assert self._password is not None  # set in __init__ whenever there are users
        lines = [line("default", self._password, "~* &* +@all")]
        lines += [line(user.name, user.password, user.rules) for user in self._users]
        path = self.data_dir / "users.acl"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _launch(self) -> None:
        binary = require_binary("redis-server", _INSTALL_HINT)
        self._proc = spawn(self._args(binary), log_path=self.log_path, cwd=self.data_dir)
        try:
            _wait_until(
                functools.partial(_ping, self.port, self._password,
                                  self._certificates.ca_file if self._certificates else None),
                self._proc,
                timeout=self._startup_timeout,
                what=f"redis-server on port {self.port}",
                log_path=self.log_path,
            )
        except BaseException:
            kill_process(self._proc)
            self._proc = None
            raise


class RedisCluster(LocalService):
    """A Redis Cluster of ``nodes`` primaries, each with ``replicas`` replicas (default none), on 127.0.0.1.

    What callers may assume once :meth:`start` has returned:

    * All 16384 slots are assigned across the primaries and every node reports
      ``cluster_state:ok`` and knows every other node, so
      ``redis.cluster.RedisCluster(startup_nodes=...)`` works at once; with
      ``replicas``, every replica is in sync with its primary.
    * Each node runs with ``appendonly yes`` and ``appendfsync always`` in
      its own temporary directory (removed by :meth:`stop`).
    * With replicas, :meth:`kill_primary` SIGKILLs a primary and a replica takes
      its slots over after ``node_timeout_ms`` (:meth:`wait_for_failover`);
      :meth:`restart_node` brings the killed node back, as a replica of its successor.

    :meth:`stop` stops every node. At least 3 primaries are required by
    ``redis-cli --cluster create``.
    """

    def __init__(self, *, nodes: int = 3, replicas: int = 0, node_timeout_ms: int = 5000,
                 startup_timeout: float = 30.0) -> None:
        if nodes < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got nodes={nodes}")
        self._nodes = nodes
        self._replicas = replicas
        self._node_timeout_ms = node_timeout_ms
        self._startup_timeout = startup_timeout
        self._root: Path | None = None
        self._ports: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._args: dict[int, list[str]] = {}

    @property
    def ports(self) -> list[int]:
        """Every node's port, in creation order (primaries first at start). Only valid after :meth:`start`."""
        if not self._ports:
            raise RuntimeError("RedisCluster has not been started")
        return list(self._ports)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``[("127.0.0.1", port), ...]`` for every node."""
        return [("127.0.0.1", port) for port in self.ports]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<first node port>/0``; cluster clients discover the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def running(self) -> bool:
        """True while every node process is alive."""
        return bool(self._procs) and all(proc.poll() is None for proc in self._procs)

    def start(self) -> None:
        """Start the nodes, create the cluster with ``redis-cli``, wait for ``cluster_state:ok``.

        On any failure every started node is stopped before the error
        (``RuntimeError``/``TimeoutError`` with the relevant output) is raised.
        """
        if self._procs:
            raise RuntimeError("RedisCluster is already running")
        server = require_binary("redis-server", _INSTALL_HINT)
        cli = require_binary("redis-cli", _INSTALL_HINT)
        self._root = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        # The cluster bus needs a second port per node. Redis defaults it to
        # port + 10000, which may be taken (or above 65535), so pick it too.
        total = self._nodes * (1 + self._replicas)
        all_ports = free_ports(2 * total)
        self._ports = all_ports[:total]
        bus_ports = all_ports[total:]
        try:
            for port, bus_port in zip(self._ports, bus_ports, strict=True):
                node_dir = self._root / str(port)
                node_dir.mkdir()
                self._args[port] = [
                    server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                    "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self._node_timeout_ms),
                    "--appendonly", "yes", "--appendfsync", "always", "--repl-diskless-sync-delay", "0",
                    "--dir", str(node_dir), "--daemonize", "no",
                ]
                self._procs.append(spawn(self._args[port], log_path=node_dir / "redis.log", cwd=node_dir))
            for port, proc in zip(self._ports, self._procs, strict=True):
                self._wait_ping(port, proc)
            create = [cli, "--cluster", "create"]
            create += [f"127.0.0.1:{port}" for port in self._ports]
            create += ["--cluster-replicas", str(self._replicas), "--cluster-yes"]
            result = subprocess.run(create, capture_output=True, text=True, timeout=self._startup_timeout, check=False)
            if result.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed (exit {result.returncode}):\n"
                    f"{(result.stdout + result.stderr).strip()[-4000:]}"
                )
            self._wait_cluster_ok()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node (SIGTERM, up to 10 s each, then SIGKILL) and remove their directories. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            terminate_process(proc, timeout=10.0)
        self._procs = []
        self._ports = []
        self._args = {}
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    # -- failover ----------------------------------------------------------------------------------------

    def primary_of(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now, as a live node says."""
        slot = key_slot(key.encode())
        for port in (p for p in self._ports if self._alive(p)):
            client = self._client(port)
            try:
                for start, end, primary, *_ in client.cluster("SLOTS"):
                    if int(start) <= slot <= int(end):
                        return int(primary[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise RuntimeError(f"no live node says which primary serves {key!r}")

    def kill_primary(self, key: str) -> int:
        """SIGKILL the primary serving ``key`` (a crash; it is not restarted) and return its port."""
        port = self.primary_of(key)
        kill_process(self._procs[self._ports.index(port)])
        return port

    def wait_for_failover(self, key: str, old_port: int, *, timeout: float = 30.0) -> int:
        """Wait until a live node other than ``old_port`` serves ``key``'s slot as a primary and the cluster is ok."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                port = self.primary_of(key)
                if port != old_port and self._cluster_summary(port).startswith("ok/"):
                    return port
            except (RuntimeError, redis.RedisError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no failover from port {old_port} after {timeout:.0f}s")
            time.sleep(0.1)

    def restart_node(self, port: int) -> None:
        """Start a killed node again on its port and directory; it rejoins (as a replica of its successor)."""
        index = self._ports.index(port)
        if self._procs[index].poll() is None:
            raise RuntimeError(f"node {port} is still running")
        node_dir = Path(self._args[port][self._args[port].index("--dir") + 1])
        self._procs[index] = spawn(self._args[port], log_path=node_dir / "redis.log", cwd=node_dir)
        self._wait_ping(port, self._procs[index])

    def wait_for_replicas(self, key: str, count: int, *, timeout: float = 30.0) -> None:
        """Wait until the primary serving ``key`` has ``count`` replicas and every replica is in sync."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.replicas_of(self.primary_of(key))) >= count and self._replicas_in_sync():
                    return
            except (RuntimeError, redis.RedisError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the primary of {key!r} has not {count} replicas in sync after {timeout:.0f}s")
            time.sleep(0.1)

    def pause_node(self, port: int) -> None:
        """SIGSTOP a node: it holds its connections but answers nothing (a replica that stops acknowledging)."""
        self._procs[self._ports.index(port)].send_signal(signal.SIGSTOP)

    def resume_node(self, port: int) -> None:
        """SIGCONT a node paused by :meth:`pause_node`."""
        self._procs[self._ports.index(port)].send_signal(signal.SIGCONT)

    def replicas_of(self, port: int) -> list[int]:
        """The ports of the replicas the primary on ``port`` has now."""
        client = self._client(port)
        try:
            info = client.info("replication")
        finally:
            client.close()
        return [int(value["port"]) for name, value in info.items() if name.startswith("slave") and name[5:].isdigit()]

    def _alive(self, port: int) -> bool:
        return self._procs[self._ports.index(port)].poll() is None

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0,
                           retry=_no_retry())

    def _wait_ping(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        assert self._root is not None
        _wait_until(functools.partial(_ping, port, None), proc, timeout=self._startup_timeout,
                    what=f"redis-server (cluster node) on port {port}", log_path=self._root / str(port) / "redis.log")

    def _wait_cluster_ok(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        states: dict[int, str] = {}
        while True:
            states = {port: self._cluster_summary(port) for port in self._ports}
            expected = f"ok/{len(self._ports)}/16384"
            if all(state == expected for state in states.values()) and self._replicas_in_sync():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Redis Cluster not ok after {self._startup_timeout:.0f}s "
                    f"(state/known_nodes/slots_ok per port: {states})"
                )
            time.sleep(0.05)

    def _replicas_in_sync(self) -> bool:
        for port in self._ports:
            if not self._alive(port):
                continue
            client = self._client(port)
            try:
                info = client.info("replication")
            except redis.RedisError:
                return False
            finally:
                client.close()
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    @staticmethod
    def _cluster_summary(port: int) -> str:
        client = redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0, retry=_no_retry()
        )
        try:
            raw = client.cluster("INFO")
        except redis.RedisError as exc:
            return f"error: {exc}"
        finally:
            client.close()
        info: dict[str, str] = {}
        if isinstance(raw, dict):  # redis-py parses CLUSTER INFO into a dict
            info = {str(key): str(value) for key, value in raw.items()}
        else:
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            for line in text.splitlines():
                key, sep, value = line.strip().partition(":")
                if sep:
                    info[key] = value
        return (
            f"{info.get('cluster_state', '?')}/{info.get('cluster_known_nodes', '?')}/"
            f"{info.get('cluster_slots_ok', '?')}"
        )


@dataclass
class _Instance:
    """One process of a :class:`RedisSentinelSet`: a data node or a sentinel, with its own directory and config file."""

    name: str
    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / ("sentinel.conf" if self.name.startswith("sentinel") else "redis.conf")

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"


class RedisSentinelSet(LocalService):
    """A primary, its replicas and three (or ``sentinels``) Redis Sentinels on 127.0.0.1, as a Redis chart deploys them.

    What callers may assume once :meth:`start` has returned:

    * Every replica is in sync with the primary, and every sentinel monitors the primary as
      :attr:`master_name`, knows each replica and each other sentinel: a client asking any sentinel
      for :attr:`master_name` gets the primary's address (:attr:`primary_port`).
    * Data nodes run with ``appendonly yes`` and ``appendfsync always``, RDB snapshots off, each in its
      own directory with a config file (sentinels rewrite it when they promote or reconfigure a node).
    * Sentinels declare the primary down after ``down_after_ms`` and need a quorum of 2, so
      after :meth:`kill_primary` a replica is promoted within a few seconds (:meth:`wait_for_failover`).
    * With ``password``, data nodes need it (``requirepass``, ``masterauth`` between them) and the
      sentinels know it; with ``sentinel_password`` the sentinels need theirs (they use it among
      themselves too). With ``tls=True`` every port speaks only TLS (replication and sentinel links
      included), with a certificate for 127.0.0.1 from a throwaway CA whose file is :attr:`ca_file`.

    :meth:`stop` stops every process and removes the directory. Raises ``FileNotFoundError`` from
    :meth:`start` if ``redis-server`` is missing (sentinels are ``redis-server --sentinel``).
    """

    def __init__(self, *, master_name: str = "evj-primary", replicas: int = 1, sentinels: int = 3,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000, password: str | None = None,
                 sentinel_password: str | None = None, tls: bool = False, startup_timeout: float = 30.0) -> None:
        if replicas < 1 or sentinels < 3:
            raise ValueError(f"a failover needs a replica and a quorum of sentinels, got replicas={replicas}, "
                             f"sentinels={sentinels} (at least 1 and 3)")
        self.master_name = master_name
        self._replicas = replicas
        self._sentinel_count = sentinels
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self._tls = tls
        self._startup_timeout = startup_timeout
        self._root: Path | None = None
        self._certificates: Certificates | None = None
        self._nodes: list[_Instance] = []
        self._sentinels: list[_Instance] = []
        self._links: list[NetFault] = []

    # -- what clients need ---------------------------------------------------------------------------

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``[("127.0.0.1", port), ...]`` of the sentinels. Only valid after :meth:`start`."""
        if not self._sentinels:
            raise RuntimeError("RedisSentinelSet has not been started")
        return [("127.0.0.1", sentinel.port) for sentinel in self._sentinels]

    @property
    def sentinels_setting(self) -> str:
        """The sentinels as ``REDIS_SENTINELS`` names them: ``127.0.0.1:<port>,127.0.0.1:<port>,...``."""
        return ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)

    @property
    def node_ports(self) -> list[int]:
        """The data nodes' ports, the first primary at start."""
        return [node.port for node in self._nodes]

    @property
    def ca_file(self) -> Path:
        """The CA certificate that verifies every instance's TLS certificate (``tls=True``, after :meth:`start`)."""
        if self._certificates is None:
            raise RuntimeError("RedisSentinelSet has no TLS certificate (tls=False, or not started)")
        return self._certificates.ca_file

    @property
    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers names it now."""
        for port in (sentinel.port for sentinel in self._sentinels if _alive(sentinel)):
            address = self._ask_sentinel(port, lambda client: client.sentinel_get_master_addr_by_name(self.master_name))
            if address:
                return int(address[1])
        raise RuntimeError(f"no sentinel names a primary for {self.master_name!r}")

    @property
    def running(self) -> bool:
        """True while every sentinel and at least one data node is alive."""
        return bool(self._sentinels) and all(_alive(s) for s in self._sentinels) and any(_alive(n) for n in self._nodes)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the primary, its replicas (waiting until they are in sync), then the sentinels (until they agree).

        On any failure every started process is stopped before the error (``RuntimeError`` or ``TimeoutError``
        with the relevant log tail) is raised.
        """
        if self._nodes:
            raise RuntimeError("RedisSentinelSet is already running")
        binary = require_binary("redis-server", _INSTALL_HINT)
        self._root = Path(tempfile.mkdtemp(prefix="redis-sentinel-"))
        try:
            if self._tls:
                self._certificates = make_certificates(self._root / "tls")
            ports = free_ports(1 + self._replicas + self._sentinel_count)
            self._nodes = [_Instance(f"node-{i}", port, self._root / f"node-{i}")
                           for i, port in enumerate(ports[:1 + self._replicas])]
            self._sentinels = [_Instance(f"sentinel-{i}", port, self._root / f"sentinel-{i}")
                               for i, port in enumerate(ports[1 + self._replicas:])]
            primary = self._nodes[0]
            for node in self._nodes:
                self._write_node_config(node, replica_of=None if node is primary else primary.port)
                self._launch(binary, node, sentinel=False)
            for replica in self._nodes[1:]:
                self._wait(functools.partial(self._in_sync, replica.port), replica, "replica in sync with the primary")
            for sentinel in self._sentinels:
                self._write_sentinel_config(sentinel, primary.port)
                self._launch(binary, sentinel, sentinel=True)
            for sentinel in self._sentinels:
                self._wait(functools.partial(self._sentinel_ready, sentinel.port), sentinel,
                           "sentinel knowing the primary, its replicas and the other sentinels")
        except BaseException:
            self.stop()
            raise

    def kill_primary(self) -> int:
        """SIGKILL the current primary (a crash; it is not restarted) and return its port.

        Replication links delayed by :meth:`delay_replication` are reset at the same moment: the primary's host
        is gone, and with it what those links still carried.
        """
        port = self.primary_port
        node = next(node for node in self._nodes if node.port == port)
        if node.proc is not None:
            kill_process(node.proc)
        for link in self._links:
            link.cut(rst=True)
            link.stop()
        self._links = []
        return port

    def delay_replication(self, seconds: float, *, ports: Collection[int] | None = None) -> None:
        """Route each replica's link to the primary through a fault proxy that delays what the primary sends.

        The replicas (or only those on ``ports``) then lag the primary by ``seconds``, as behind a slow network
        or while busy: what the primary acknowledged in that time is not on those replicas yet. Sentinels
        correct a replica whose primary address differs from theirs only after the failover timeout, so give
        ``failover_timeout_ms`` longer than the test. Returns once every delayed replica is in sync through
        its proxy.
        """
        primary = self.primary_port
        for node in self._nodes:
            if node.port == primary or not _alive(node) or (ports is not None and node.port not in ports):
                continue
            link = NetFault("127.0.0.1", primary)
            link.start()
            link.add_latency(seconds, direction="downstream")
            self._links.append(link)
            client = self._client(node.port, self.password)
            try:
                client.replicaof("127.0.0.1", link.port)
            finally:
                client.close()

            def through_link(port: int = node.port, link_port: int = link.port) -> bool:
                info = self._info(port)
                return info.get("master_port") == link_port and info.get("master_link_status") == "up"

            self._wait(through_link, node, "replica in sync through its delayed link")

    def restart_node(self, port: int) -> None:
        """Start a killed data node again on its port and directory; the sentinels make it a replica of the primary."""
        node = next(node for node in self._nodes if node.port == port)
        if _alive(node):
            raise RuntimeError(f"{node.name} is still running")
        self._launch(require_binary("redis-server", _INSTALL_HINT), node, sentinel=False)

    def wait_for_replicas(self, count: int, *, timeout: float = 30.0) -> None:
        """Wait until the primary the sentinels name has ``count`` replicas in sync (after :meth:`restart_node`)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self._info(self.primary_port)
            online = [value for name, value in info.items() if name.startswith("slave") and name[5:].isdigit()
                      and isinstance(value, dict) and value.get("state") == "online"]
            if len(online) >= count and all(self._in_sync(int(value["port"])) for value in online):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the primary has {len(online)} replicas in sync after {timeout:.0f}s, not {count}")
            time.sleep(0.1)

    def replica_ports(self) -> list[int]:
        """The live data nodes other than the primary the sentinels name now."""
        primary = self.primary_port
        return [node.port for node in self._nodes if node.port != primary and _alive(node)]

    def prefer_replica(self, port: int, *, timeout: float = 30.0) -> None:
        """Make the replica on ``port`` the one a failover promotes (``replica-priority`` 1, the others 100).

        Sentinels rank replicas by priority before their replication offset, so the next failover promotes
        this one whatever it holds. Returns once every live sentinel has seen the priorities (they read them
        from each replica's INFO, every 10 s at most).
        """
        wanted = {other: (1 if other == port else 100) for other in self.replica_ports()}
        if port not in wanted:
            raise ValueError(f"port {port} is not a live replica (replicas: {sorted(wanted)})")
        for other, priority in wanted.items():
            client = self._client(other, self.password)
            try:
                client.config_set("replica-priority", priority)
            finally:
                client.close()

        def seen(sentinel_port: int) -> bool:
            state = self._ask_sentinel(sentinel_port, lambda client: client.sentinel_slaves(self.master_name)) or []
            known = {int(replica["port"]): int(replica.get("slave-priority", -1)) for replica in state}
            return all(known.get(other) == priority for other, priority in wanted.items())

        deadline = time.monotonic() + timeout
        while not all(seen(sentinel.port) for sentinel in self._sentinels if _alive(sentinel)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sentinels did not see replica priorities {wanted} within {timeout:.0f}s")
            time.sleep(0.2)

    def pause_node(self, port: int) -> None:
        """SIGSTOP a data node: it holds its connections but answers nothing (a replica that stops acknowledging)."""
        proc = next(node.proc for node in self._nodes if node.port == port)
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)

    def resume_node(self, port: int) -> None:
        """SIGCONT a node paused by :meth:`pause_node`."""
        proc = next(node.proc for node in self._nodes if node.port == port)
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def wait_for_failover(self, old_port: int, *, timeout: float = 30.0) -> int:
        """Wait until every live sentinel names a primary other than ``old_port`` and it says it is one; its port."""
        deadline = time.monotonic() + timeout
        seen: set[int | None] = set()
        while True:
            seen = {self._named_primary(sentinel.port) for sentinel in self._sentinels if _alive(sentinel)}
            if len(seen) == 1:
                (port,) = seen
                if port is not None and port != old_port and self._role(port) == "master":
                    return port
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no failover from port {old_port} after {timeout:.0f}s (sentinels name {seen})")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every sentinel and data node (SIGTERM, up to 10 s each, then SIGKILL) and remove their directories.

        Idempotent; also the way to clean up after :meth:`kill_primary`.
        """
        for link in self._links:
            link.stop()
        self._links = []
        for instance in [*self._sentinels, *self._nodes]:
            if instance.proc is not None and instance.proc.poll() is None:
                instance.proc.terminate()
        for instance in [*self._sentinels, *self._nodes]:
            if instance.proc is not None:
                terminate_process(instance.proc, timeout=10.0)
                instance.proc = None
        self._sentinels, self._nodes = [], []
        self._certificates = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    # -- configuration ---------------------------------------------------------------------------------

    def _listen(self, port: int) -> list[str]:
        """The port lines: plain, or TLS only (the port given, replication and sentinel links over TLS too)."""
        if self._certificates is None:
            return [f"port {port}"]
        certs = self._certificates
        return ["port 0", f"tls-port {port}", f"tls-cert-file {certs.cert_file}", f"tls-key-file {certs.key_file}",
                f"tls-ca-cert-file {certs.ca_file}", "tls-auth-clients no", "tls-replication yes"]

    def _write_node_config(self, node: _Instance, *, replica_of: int | None) -> None:
        # A replica's first sync starts at once, not after the default 5 s of waiting for more replicas.
        lines = ["bind 127.0.0.1", *self._listen(node.port), f"dir {node.directory}", 'save ""', "appendonly yes",
                 "appendfsync always", "repl-diskless-sync-delay 0", "daemonize no"]
        if self.password is not None:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        node.directory.mkdir(parents=True)
        node.config_path.write_text("\n".join(lines) + "\n")

    def _write_sentinel_config(self, sentinel: _Instance, primary_port: int) -> None:
        name = self.master_name
        lines = ["bind 127.0.0.1", *self._listen(sentinel.port), f"dir {sentinel.directory}", "daemonize no",
                 f"sentinel monitor {name} 127.0.0.1 {primary_port} 2",
                 f"sentinel down-after-milliseconds {name} {self._down_after_ms}",
                 f"sentinel failover-timeout {name} {self._failover_timeout_ms}",
                 f"sentinel parallel-syncs {name} 1"]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password is not None:
            lines.append(f"requirepass {self.sentinel_password}")
        sentinel.directory.mkdir(parents=True)
        sentinel.config_path.write_text("\n".join(lines) + "\n")

    def _launch(self, binary: str, instance: _Instance, *, sentinel: bool) -> None:
        args = [binary, str(instance.config_path), *(["--sentinel"] if sentinel else [])]
        instance.proc = spawn(args, log_path=instance.log_path, cwd=instance.directory)
        password = self.sentinel_password if sentinel else self.password
        self._wait(lambda: _ping(instance.port, password, self._certificates.ca_file if self._certificates else None),
                   instance, "PING")

    # -- readiness -------------------------------------------------------------------------------------

    def _wait(self, check: Callable[[], bool], instance: _Instance, what: str) -> None:
        assert instance.proc is not None
        _wait_until(check, instance.proc, timeout=self._startup_timeout,
                    what=f"{instance.name} on port {instance.port} ({what})", log_path=instance.log_path)

    def _client(self, port: int, password: str | None) -> redis.Redis:
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self._certificates else {}
        return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1.0,
                           socket_connect_timeout=1.0, retry=_no_retry(), **tls)

    def _in_sync(self, port: int) -> bool:
        return self._info(port).get("master_link_status") == "up"

    def _role(self, port: int) -> str | None:
        role = self._info(port).get("role")
        return None if role is None else str(role)

    def _info(self, port: int) -> dict[str, Any]:
        client = self._client(port, self.password)
        try:
            info: dict[str, Any] = client.info("replication")
            return info
        except redis.RedisError:
            return {}
        finally:
            client.close()

    def _ask_sentinel(self, port: int, ask: Callable[[redis.Redis], Any]) -> Any:
        client = self._client(port, self.sentinel_password)
        try:
            return ask(client)
        except redis.RedisError:
            return None
        finally:
            client.close()

    def _sentinel_ready(self, port: int) -> bool:
        state = self._ask_sentinel(port, lambda client: client.sentinel_master(self.master_name))
        return bool(state) and bool(state.get("is_master")) and state.get("num-slaves") == self._replicas and \
            state.get("num-other-sentinels") == self._sentinel_count - 1

    def _named_primary(self, port: int) -> int | None:
        address = self._ask_sentinel(port, lambda client: client.sentinel_get_master_addr_by_name(self.master_name))
        return int(address[1]) if address else None


def _alive(instance: _Instance) -> bool:
    return instance.proc is not None and instance.proc.poll() is None
