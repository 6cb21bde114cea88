"""The TCP fault proxy (localenv/netfault.py) against a real echo server and a real redis-server.

The reliability scenarios trust the proxy to do exactly what its controls say: forward faithfully,
cut with RST or FIN, hold data during a blackhole and deliver it afterwards, refuse, leave
connections half-open, and delay data without reordering it. Each of those is checked here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from localenv.kafka import KafkaBroker
from localenv.netfault import NetFault
from localenv.ports import free_port
from localenv.redis import RedisServer

SILENCE_S = 0.5  # how long "nothing arrives" is watched for


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close (an orderly FIN back)."""
    try:
        while data := await reader.read(65_536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


@pytest.fixture
def proxy(echo_port: int) -> Iterator[NetFault]:
    with NetFault("127.0.0.1", echo_port, seed=1) as fault:
        yield fault


async def _connect(proxy: NetFault) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes,
                      within: float = 5.0) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), within)


async def _silent(reader: asyncio.StreamReader) -> bool:
    """True if nothing (no data, no EOF, no reset) arrives for SILENCE_S."""
    try:
        await asyncio.wait_for(reader.read(1), SILENCE_S)
    except TimeoutError:
        return True
    return False


def _close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


async def test_forwards_both_ways_and_passes_a_half_close_on(proxy: NetFault) -> None:
    reader, writer = await _connect(proxy)
    payload = bytes(range(256)) * 1000
    assert await _round_trip(reader, writer, payload) == payload
    writer.write_eof()  # the echo server sees EOF and closes: that FIN must come back
    assert await asyncio.wait_for(reader.read(), 5) == b""
    _close(writer)
    stats = proxy.stats
    assert stats.accepted == 1
    assert stats.bytes_upstream == stats.bytes_downstream == len(payload)


async def test_cut_resets_every_open_connection_and_new_ones_work(proxy: NetFault) -> None:
    pairs = [await _connect(proxy) for _ in range(3)]
    for reader, writer in pairs:
        await _round_trip(reader, writer, b"hello")
    assert proxy.cut() == 3
    for reader, writer in pairs:
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(_round_trip(reader, writer, b"again"), 5)
        _close(writer)
    reader, writer = await _connect(proxy)
    assert await _round_trip(reader, writer, b"after") == b"after"
    _close(writer)
    assert proxy.stats.cut == 3 and proxy.stats.accepted == 4


async def test_cut_without_rst_closes_in_order(proxy: NetFault) -> None:
    reader, writer = await _connect(proxy)
    await _round_trip(reader, writer, b"x")
    assert proxy.cut(rst=False) == 1
    assert await asyncio.wait_for(reader.read(), 5) == b""  # a FIN, not a reset
    _close(writer)


async def test_blackhole_holds_data_on_open_and_new_connections_and_delivers_it_after(proxy: NetFault) -> None:
    old_reader, old_writer = await _connect(proxy)
    await _round_trip(old_reader, old_writer, b"before")
    proxy.blackhole()
    new_reader, new_writer = await _connect(proxy)  # accepted: the client sees no error, only silence
    old_writer.write(b"during-old")
    new_writer.write(b"during-new")
    assert await _silent(old_reader) and await _silent(new_reader)
    proxy.normal()
    assert await asyncio.wait_for(old_reader.readexactly(10), 5) == b"during-old"
    assert await asyncio.wait_for(new_reader.readexactly(10), 5) == b"during-new"
    _close(old_writer)
    _close(new_writer)
    assert proxy.stats.held == 1


async def test_blackhole_for_a_while_ends_by_itself(proxy: NetFault) -> None:
    reader, writer = await _connect(proxy)
    proxy.blackhole(seconds=0.4)
    started = time.monotonic()
    assert await _round_trip(reader, writer, b"late") == b"late"
    assert time.monotonic() - started >= 0.35
    _close(writer)


async def test_cut_during_a_blackhole_closes_the_held_connections_too(proxy: NetFault) -> None:
    proxy.blackhole()
    reader, writer = await _connect(proxy)
    writer.write(b"held")
    assert await _silent(reader)
    assert proxy.cut() == 1
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 5)
    _close(writer)
    proxy.normal()
    for _ in range(100):
        if proxy.stats.active == 0:
            break
        await asyncio.sleep(0.02)
    assert proxy.stats.active == 0 and proxy.stats.held == 1


async def test_refuse_stops_listening_until_normal(proxy: NetFault) -> None:
    reader, writer = await _connect(proxy)
    await _round_trip(reader, writer, b"x")
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        await _connect(proxy)
    assert await _round_trip(reader, writer, b"open ones live on") == b"open ones live on"
    proxy.normal()
    reader2, writer2 = await _connect(proxy)
    assert await _round_trip(reader2, writer2, b"again") == b"again"
    _close(writer)
    _close(writer2)


async def test_half_open_connections_stay_silent_for_good(proxy: NetFault) -> None:
    reader, writer = await _connect(proxy)
    await _round_trip(reader, writer, b"x")
    assert proxy.half_open() == 1
    writer.write(b"anyone there?")
    assert await _silent(reader)
    proxy.normal()  # the path is fine again, but this connection's state is gone
    assert await _silent(reader)
    fresh_reader, fresh_writer = await _connect(proxy)
    assert await _round_trip(fresh_reader, fresh_writer, b"new") == b"new"
    _close(writer)
    _close(fresh_writer)
    assert proxy.stats.half_opened == 1


@pytest.mark.parametrize("direction", ["upstream", "downstream", "both"])
async def test_latency_delays_each_direction(proxy: NetFault, direction: str) -> None:
    reader, writer = await _connect(proxy)
    proxy.add_latency(0.25, direction=direction)  # type: ignore[arg-type]
    started = time.monotonic()
    await _round_trip(reader, writer, b"ping")
    took = time.monotonic() - started
    assert took >= (0.48 if direction == "both" else 0.24), took
    proxy.normal()
    started = time.monotonic()
    await _round_trip(reader, writer, b"ping")
    assert time.monotonic() - started < 0.2
    _close(writer)


async def test_jitter_never_reorders_a_stream(proxy: NetFault) -> None:
    reader, writer = await _connect(proxy)
    proxy.add_latency(0.05, jitter=0.05)
    sent = b""
    for i in range(50):
        piece = f"<{i}>".encode()
        sent += piece
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.002)
    assert await asyncio.wait_for(reader.readexactly(len(sent)), 10) == sent
    _close(writer)


def test_a_real_redis_client_times_out_in_a_blackhole_and_works_after() -> None:
    with RedisServer(appendonly=False) as server, NetFault("127.0.0.1", server.port) as proxy:
        client = redis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        try:
            assert client.set("k", "v")
            proxy.blackhole()
            with pytest.raises(redis.TimeoutError):
                client.get("k")
            proxy.normal()
            assert client.get("k") == b"v"
            assert proxy.cut() == 1
            assert client.get("k") == b"v"  # redis-py notices the reset connection and opens a new one
        finally:
            client.close()
        assert proxy.stats.accepted == 3 and proxy.stats.cut == 1  # the timed-out one was closed


async def test_stop_resets_open_connections_and_closes_the_port(echo_port: int) -> None:
    with NetFault("127.0.0.1", echo_port) as proxy:
        port = proxy.port
        held_reader, held_writer = await _connect(proxy)
        await _round_trip(held_reader, held_writer, b"x")
        proxy.half_open()
        proxy.blackhole()
        blackholed_reader, blackholed_writer = await _connect(proxy)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(held_reader.read(1), 5)
    # Closed (by a reset, or by a FIN when stop() came while the connection was still being accepted).
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(blackholed_reader.read(1), 5) == b""
    _close(held_writer)
    _close(blackholed_writer)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def _kafka_through(proxy: NetFault, broker: KafkaBroker) -> None:
    """Produce through the proxy, read back directly; the proxied client only ever saw the proxy's address."""
    producer = AIOKafkaProducer(bootstrap_servers=proxy.address, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait("proxied", b"through the proxy", partition=0)
        assert {(b.host, b.port) for b in producer.client.cluster.brokers()} == {("127.0.0.1", proxy.port)}
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        consumer.assign([TopicPartition("proxied", 0)])
        await consumer.seek_to_beginning()
        batch = await consumer.getmany(timeout_ms=10_000)
        assert [r.value for records in batch.values() for r in records] == [b"through the proxy"]
        assert {(b.host, b.port) for b in consumer._client.cluster.brokers()} == {("127.0.0.1", broker.port)}
    finally:
        await consumer.stop()


def test_a_kafka_broker_advertises_the_proxy_on_its_proxied_listener() -> None:
    port = free_port()
    with KafkaBroker(proxied_port=port) as broker, \
            NetFault("127.0.0.1", broker.proxied_listener_port, port=port) as proxy:
        asyncio.run(_kafka_through(proxy, broker))
        assert proxy.stats.accepted >= 2  # the bootstrap connection, then the one to the advertised address
