"""Real ``redis-server`` processes: a single server and a small cluster."""

from __future__ import annotations

import functools
import hashlib
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from localenv._process import LocalService, kill_process, log_tail, require_binary, spawn, terminate_process
from localenv.ports import free_ports
from localenv.tls import Certificates, make_certificates

__all__ = ["SERVICE_COMMANDS", "RedisCluster", "RedisServer", "RedisUser", "service_acl_rules"]

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
    # `inspect` counts buffered sides per ml_app
    "scan",
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
    """A Redis Cluster of ``nodes`` masters (no replicas) on 127.0.0.1.

    What callers may assume once :meth:`start` has returned:

    * All 16384 slots are assigned across the nodes and every node reports
      ``cluster_state:ok`` and knows every other node, so
      ``redis.cluster.RedisCluster(startup_nodes=...)`` works at once.
    * Each node runs with ``appendonly yes`` and ``appendfsync always`` in
      its own temporary directory (removed by :meth:`stop`).

    :meth:`stop` stops every node. At least 3 nodes are required by
    ``redis-cli --cluster create``.
    """

    def __init__(self, *, nodes: int = 3, startup_timeout: float = 30.0) -> None:
        if nodes < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got nodes={nodes}")
        self._nodes = nodes
        self._startup_timeout = startup_timeout
        self._root: Path | None = None
        self._ports: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def ports(self) -> list[int]:
        """The nodes' ports, in creation order. Only valid after :meth:`start`."""
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
        all_ports = free_ports(2 * self._nodes)
        self._ports = all_ports[: self._nodes]
        bus_ports = all_ports[self._nodes :]
        try:
            for port, bus_port in zip(self._ports, bus_ports, strict=True):
                node_dir = self._root / str(port)
                node_dir.mkdir()
                args = [
                    server,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(bus_port),
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--dir",
                    str(node_dir),
                    "--daemonize",
                    "no",
                ]
                self._procs.append(spawn(args, log_path=node_dir / "redis.log", cwd=node_dir))
            for port, proc in zip(self._ports, self._procs, strict=True):
                _wait_until(
                    functools.partial(_ping, port, None),
                    proc,
                    timeout=self._startup_timeout,
                    what=f"redis-server (cluster node) on port {port}",
                    log_path=self._root / str(port) / "redis.log",
                )
            create = [cli, "--cluster", "create"]
            create += [f"127.0.0.1:{port}" for port in self._ports]
            create += ["--cluster-replicas", "0", "--cluster-yes"]
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
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def _wait_cluster_ok(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        states: dict[int, str] = {}
        while True:
            states = {port: self._cluster_summary(port) for port in self._ports}
            expected = f"ok/{self._nodes}/16384"
            if all(state == expected for state in states.values()):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Redis Cluster not ok after {self._startup_timeout:.0f}s "
                    f"(state/known_nodes/slots_ok per port: {states})"
                )
            time.sleep(0.05)

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
