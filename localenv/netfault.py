"""A TCP fault proxy: the network between a client and one upstream service, made unreliable on demand.

Process kills show what happens when a peer is gone; they do not show a peer that is reachable but
slow, a connection reset in the middle of a request, or a network that silently stops delivering
packets. :class:`NetFault` sits between a client and its upstream (Kafka, Redis, the intake) on
127.0.0.1 and, while running, can:

* :meth:`~NetFault.cut` every open connection (RST, or an orderly FIN);
* :meth:`~NetFault.blackhole` the path: new connections are accepted but never answered, and open
  connections forward nothing; what was sent waits, as in a partitioned network where TCP keeps
  retransmitting, and flows once the path is back (clients see timeouts, not resets);
* :meth:`~NetFault.refuse` new connections (the port stops listening: "connection refused");
* :meth:`~NetFault.half_open` the open connections: they stay established, but nothing is ever
  forwarded on them again and no FIN or RST comes, as when a middlebox loses the connection's state
  or the peer's host vanishes; only a client-side timeout notices;
* :meth:`~NetFault.add_latency` to forwarded data (fixed delay plus jitter, per direction);
* go back to :meth:`~NetFault.normal`.

The proxy runs its own event loop in its own thread, so a busy test loop does not delay the data it
forwards and a blocked proxy never stalls the test. Every control method is thread-safe and returns
once the fault is in effect; :attr:`~NetFault.stats` counts connections accepted, cut, held and
half-opened. No third-party proxy is involved: a listening socket and asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from localenv._process import LocalService

__all__ = ["Direction", "NetFault", "NetFaultStats"]

Direction = Literal["both", "upstream", "downstream"]
"""``upstream`` is client -> service, ``downstream`` is service -> client."""

_CHUNK = 65_536
_QUEUED_CHUNKS = 64  # per direction and connection: then the proxy stops reading, as a full TCP window does
_CONTROL_TIMEOUT_S = 10.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class NetFaultStats:
    """What the proxy has done so far (a snapshot)."""

    accepted: int = 0  # client connections accepted
    active: int = 0  # connections open now (including held and half-open ones)
    cut: int = 0  # connections closed by cut()
    held: int = 0  # connections accepted during a blackhole (answered only once it ended, if ever)
    half_opened: int = 0  # connections left half-open by half_open()
    upstream_failures: int = 0  # connections whose upstream connect failed (closed with RST)
    bytes_upstream: int = 0  # client -> service bytes forwarded
    bytes_downstream: int = 0  # service -> client bytes forwarded


@dataclass
class _Latency:
    seconds: float = 0.0
    jitter: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.seconds <= 0 and self.jitter <= 0:
            return 0.0
        return max(0.0, self.seconds + rng.uniform(-self.jitter, self.jitter))


class _Connection:
    """One proxied connection: the accepted socket, then its stream, the upstream's, and its state.

    The accepted socket is registered the moment it is accepted, so :meth:`NetFault.stop` and
    :meth:`NetFault.cut` reach every connection, even one whose task has not started yet.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.client: asyncio.StreamWriter | None = None
        self.upstream: asyncio.StreamWriter | None = None
        self.wrapping = False  # asyncio is taking the socket over: only it may close it now
        self.stalled = False  # half-open: never forwards again
        self.closed = asyncio.Event()

    def abort(self, *, rst: bool) -> None:
        """Close both ends now; with ``rst`` the peers get a TCP RST instead of a FIN."""
        self.closed.set()
        if self.client is None and not self.wrapping:
            if rst:
                _linger_zero(self.sock)
            self.sock.close()
        for writer in (self.client, self.upstream):
            if writer is None or writer.transport.is_closing():
                continue
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    _linger_zero(sock)
                writer.transport.abort()
            else:
                writer.transport.close()


def _linger_zero(sock: Any) -> None:
    """SO_LINGER with a zero timeout: closing the socket sends RST and discards unsent data."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class NetFault(LocalService):
    """A fault-injecting TCP proxy on 127.0.0.1 in front of ``upstream_host:upstream_port``.

    What callers may assume once :meth:`start` has returned:

    * :attr:`port` listens (``port`` given to the constructor, else a free one) and forwards each
      connection to the upstream, byte for byte, in order, with half-closes passed on.
    * Each control method (:meth:`cut`, :meth:`blackhole`, :meth:`refuse`, :meth:`half_open`,
      :meth:`add_latency`, :meth:`normal`) may be called from any thread, and has taken effect when
      it returns. Faults combine: latency stays during a blackhole; :meth:`normal` ends them all
      (half-open connections stay dead: that is what they are).
    * Data is never dropped or reordered on a connection that is not cut: a blackhole or latency
      only delays it. A cut connection loses whatever was still queued in the proxy.
    * :meth:`stop` closes every connection and the listening socket and joins the thread.

    ``seed`` makes the jitter repeatable.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, port: int = 0, seed: int | None = None) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._requested_port = port
        self._port: int | None = None
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()  # cleared during a blackhole (replaced in the proxy's loop)
        self._latency: dict[str, _Latency] = {"upstream": _Latency(), "downstream": _Latency()}
        self._timer: asyncio.TimerHandle | None = None
        self._counts = {f.name: 0 for f in dataclasses.fields(NetFaultStats) if f.name != "active"}

    # -- addresses --------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port. Only valid after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("NetFault has not been started")
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, for clients that take host:port."""
        return f"127.0.0.1:{self.port}"

    @property
    def stats(self) -> NetFaultStats:
        """A snapshot of the counters (written by the proxy's thread only)."""
        return NetFaultStats(active=len(self._connections), **self._counts)

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Start the proxy's thread and event loop; returns once the port listens."""
        if self._thread is not None:
            raise RuntimeError("NetFault is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"netfault-{self._upstream[1]}", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._control(self._begin)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Close every connection and the listener, stop the loop and join the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(self._end(), loop).result(_CONTROL_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CONTROL_TIMEOUT_S)
        loop.close()
        self._loop, self._thread = None, None

    # -- fault controls ---------------------------------------------------

    def cut(self, *, rst: bool = True) -> int:
        """Close every open connection at once (both ends; RST unless ``rst`` is False); returns how many."""

        async def cut_all() -> int:
            victims = list(self._connections)
            for connection in victims:
                connection.abort(rst=rst)
            self._count(cut=len(victims))
            return len(victims)

        return self._control(cut_all)

    def blackhole(self, seconds: float | None = None) -> None:
        """Stop forwarding anything, on open and new connections, until :meth:`normal` (or ``seconds``)."""

        async def hole() -> None:
            self._flowing.clear()
            self._schedule_normal(seconds)

        self._control(hole)

    def refuse(self, seconds: float | None = None) -> None:
        """Stop listening, so new connections are refused, until :meth:`normal` (or ``seconds``).

        Open connections are left as they are.
        """

        async def close_listener() -> None:
            self._unlisten()
            self._schedule_normal(seconds)

        self._control(close_listener)

    def half_open(self) -> int:
        """Leave every open connection established but dead: nothing forwarded, no FIN, no RST; returns how many.

        Only the client's own timeouts can notice. Connections opened afterwards work normally.
        """

        async def stall() -> int:
            victims = [c for c in self._connections if not c.stalled]
            for connection in victims:
                connection.stalled = True
            self._count(half_opened=len(victims))
            return len(victims)

        return self._control(stall)

    def add_latency(self, seconds: float, *, jitter: float = 0.0, direction: Direction = "both") -> None:
        """Delay each forwarded chunk by ``seconds`` +- ``jitter`` (never below 0), keeping the order.

        Replaces the latency of ``direction``; 0 turns it off. Data already queued keeps its delay.
        """
        if seconds < 0 or jitter < 0:
            raise ValueError("latency and jitter must be >= 0")

        async def set_latency() -> None:
            for name in ("upstream", "downstream"):
                if direction in ("both", name):
                    self._latency[name] = _Latency(seconds, jitter)

        self._control(set_latency)

    def normal(self) -> None:
        """End every fault: listen again, forward held data, no latency (half-open connections stay dead)."""
        self._control(self._normal)

    # -- internals (the proxy's thread) -----------------------------------

    def _control(self, action: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``action`` on the proxy's loop and wait for it: when this returns, the fault is in effect."""
        if self._loop is None:
            raise RuntimeError("NetFault has not been started")
        return asyncio.run_coroutine_threadsafe(action(), self._loop).result(_CONTROL_TIMEOUT_S)

    def _count(self, **increments: int) -> None:
        for name, value in increments.items():
            self._counts[name] += value

    async def _begin(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._listen(self._requested_port)

    def _listen(self, port: int) -> None:
        """Listen and accept from a reader callback: no asyncio task ever holds an unregistered socket."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
            listener.setblocking(False)
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._port = int(listener.getsockname()[1])

    def _unlisten(self) -> None:
        """Close the listening socket: new connections are refused (queued ones are reset)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            asyncio.get_running_loop().remove_reader(listener.fileno())
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            sock.setblocking(False)
            connection = _Connection(sock)
            self._connections.add(connection)
            self._count(accepted=1, held=0 if self._flowing.is_set() else 1)
            self._spawn(self._serve(connection))

    async def _normal(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flowing.set()
        self._latency = {"upstream": _Latency(), "downstream": _Latency()}
        if self._listener is None:
            self._listen(self.port)

    def _schedule_normal(self, seconds: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(seconds, lambda: self._spawn(self._normal()))

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        """A task of ours: referenced until done, and cancelled by stop()."""
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._unlisten()
        for connection in list(self._connections):
            connection.abort(rst=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)  # let the aborted transports close their sockets before the loop stops

    async def _serve(self, connection: _Connection) -> None:
        """One client connection: wait while blackholed, connect upstream, pump both ways until done."""
        try:
            connection.wrapping = True
            reader, writer = await asyncio.open_connection(sock=connection.sock)
            connection.client = writer
            await self._gate(connection)  # blackholed: accepted, but nothing answers
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                self._count(upstream_failures=1)
                return
            connection.upstream = up_writer
            await self._gate(connection, blocking=False)  # cut while connecting
            await asyncio.gather(self._spawn(self._pump(reader, up_writer, connection, "upstream")),
                                 self._spawn(self._pump(up_reader, writer, connection, "downstream")))
            connection.abort(rst=False)  # both directions ended with a FIN: close in order
        except (OSError, asyncio.IncompleteReadError):
            pass  # a reset on one side: the other is reset below
        finally:
            connection.abort(rst=True)
            self._connections.discard(connection)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection,
                    direction: str) -> None:
        """Copy one direction, each chunk delayed by the latency in force when it was read.

        A reader task fills a bounded queue and this task writes from it, so latency delays data
        without limiting throughput to one chunk per delay. A reset on either side ends the
        connection (both ends are aborted), as a relaying middlebox would.
        """
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(_QUEUED_CHUNKS)
        feeder = self._spawn(self._read_into(reader, queue, direction))
        loop = asyncio.get_running_loop()
        last_due = 0.0
        try:
            while True:
                due, chunk = await queue.get()
                last_due = max(due, last_due)  # jitter never reorders a stream
                if last_due > loop.time():
                    await asyncio.sleep(last_due - loop.time())
                await self._gate(connection)
                if chunk is None:  # the other side was reset: reset this one too
                    connection.abort(rst=True)
                    return
                if not chunk:  # an orderly half-close, passed on
                    if writer.can_write_eof() and not writer.transport.is_closing():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()
                self._count(**{f"bytes_{direction}": len(chunk)})
        except (OSError, asyncio.IncompleteReadError):
            connection.abort(rst=True)
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def _read_into(self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes | None]],
                         direction: str) -> None:
        """Read one direction into ``queue``: data, then ``b""`` for EOF or None for a reset."""
        loop = asyncio.get_running_loop()
        while True:
            chunk: bytes | None
            try:
                chunk = await reader.read(_CHUNK)
            except OSError:
                chunk = None
            await queue.put((loop.time() + self._latency[direction].sample(self._rng), chunk))
            if not chunk:
                return

    async def _gate(self, connection: _Connection, *, blocking: bool = True) -> None:
        """Wait while the path is blackholed, forever on a half-open connection; raise once it is closed."""
        while blocking and not connection.closed.is_set() and (connection.stalled or not self._flowing.is_set()):
            waiters = {asyncio.ensure_future(connection.closed.wait())}
            if not connection.stalled:
                waiters.add(asyncio.ensure_future(self._flowing.wait()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        if connection.closed.is_set():
            raise ConnectionAbortedError("closed by the proxy")
