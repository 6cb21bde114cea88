"""The error tree: what each library error means to the service, and how a stage acts on it."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest
from aiokafka import errors as kafka
from redis import exceptions as redis

from consumer.errors import (
    DependencyError,
    Misconfigured,
    RedisOutOfMemory,
    ServiceRefused,
    Unavailable,
    kafka_errors,
    redis_errors,
    translate_kafka,
    translate_redis,
)
from consumer.metrics import Metrics
from consumer.sink import HttpIntakeSink
from consumer.stage import Refusals, Stage

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("error", [
    kafka.TopicAuthorizationFailedError(), kafka.GroupAuthorizationFailedError(), kafka.SaslAuthenticationFailed(),
    kafka.ClusterAuthorizationFailedError(),
])
def test_kafka_refusals_are_not_retriable_and_name_the_fix(error: Exception) -> None:
    """Authentication and ACL failures refuse the service: not retriable, with a hint about credentials and ACLs."""
    translated = translate_kafka(error)
    assert isinstance(translated, ServiceRefused) and not translated.retriable
    assert translated.component == "kafka" and "ACL" in translated.hint


@pytest.mark.parametrize("error", [
    kafka.KafkaConnectionError(), kafka.NodeNotReadyError(), kafka.RequestTimedOutError(), kafka.KafkaTimeoutError(),
    kafka.NotLeaderForPartitionError(), kafka.BrokerNotAvailableError(), ConnectionResetError(), TimeoutError(),
])
def test_kafka_outages_are_retriable(error: Exception) -> None:
    """What passes by itself (a lost connection, a timeout, a moving leader) is retried."""
    assert isinstance(translate_kafka(error), Unavailable)


@pytest.mark.parametrize("error", [kafka.UnsupportedVersionError(), kafka.InvalidTopicError(), kafka.UnknownError()])
def test_other_kafka_errors_are_not_retried(error: Exception) -> None:
    """An error nothing waits out is not retriable, and not taken for a refusal either."""
    translated = translate_kafka(error)
    assert type(translated) is DependencyError and not translated.retriable


@pytest.mark.parametrize(("error", "kind"), [
    (redis.AuthenticationError("invalid username-password pair"), ServiceRefused),
    (redis.NoPermissionError("NOPERM this user has no permissions"), ServiceRefused),
    (redis.ConnectionError("Connection refused"), Unavailable),
    (redis.TimeoutError("Timeout reading from socket"), Unavailable),
    (redis.OutOfMemoryError("OOM command not allowed"), RedisOutOfMemory),
    (redis.ReadOnlyError("READONLY You can't write against a read only replica"), Unavailable),
    (redis.ResponseError("BUSY Redis is busy running a script"), Unavailable),
    (redis.ClusterDownError("CLUSTERDOWN"), Unavailable),
    (redis.ResponseError("ERR Error running script: attempt to compare nil"), DependencyError),
])
def test_redis_errors_mean_one_thing_each(error: Exception, kind: type[DependencyError]) -> None:
    """Refusals are told apart from outages (redis-py makes AuthenticationError a ConnectionError); a script error is
    a defect."""
    translated = translate_redis(error)
    assert type(translated) is kind and translated.component == "redis"


def wrapped_as_redis_py_does(error: OSError) -> redis.ConnectionError:
    """``error`` under redis-py's ConnectionError, raised while handling it (as its connect does: ``__context__``)."""
    try:
        try:
            raise error
        except OSError as exc:
            raise redis.ConnectionError(f"Error 1 connecting to 127.0.0.1:6380. {exc}.")  # noqa: B904 - as redis-py
    except redis.ConnectionError as wrapped:
        return wrapped


def unverified(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    error.verify_code, error.verify_message = code, message
    return error


@pytest.mark.parametrize(("error", "setting"), [
    (unverified(19, "self-signed certificate in certificate chain"), "REDIS_SSL_CAFILE"),
    (unverified(20, "unable to get local issuer certificate"), "REDIS_SSL_CAFILE"),
    (unverified(10, "certificate has expired"), "REDIS_SSL_CAFILE"),
    (unverified(62, "Hostname mismatch, certificate is not valid for 'redis.internal'."), "REDIS_URL"),
    (unverified(64, "IP address mismatch, certificate is not valid for '10.0.0.7'."), "REDIS_URL"),
])
def test_a_redis_certificate_that_does_not_verify_names_the_setting(error: ssl.SSLCertVerificationError,
                                                                     setting: str) -> None:
    """Certificate verification fails the same way every time: Misconfigured, not retried, naming REDIS_SSL_CAFILE,
    or REDIS_URL's host when the certificate is for other names; whether raised as is or wrapped by redis-py."""
    for raised in (error, wrapped_as_redis_py_does(error)):
        translated = translate_redis(raised)
        assert isinstance(translated, Misconfigured) and not translated.retriable, raised
        assert translated.setting == setting and setting in translated.detail
        assert error.verify_message in translated.detail and "CERTIFICATE_VERIFY_FAILED" in translated.detail


@pytest.mark.parametrize("error", [
    ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), ConnectionResetError(104, "Connection reset by peer"),
])
def test_a_tls_handshake_cut_by_the_network_is_retried(error: OSError) -> None:
    """Only certificate verification is permanent: a handshake cut short may pass by itself."""
    assert type(translate_redis(wrapped_as_redis_py_does(error))) is Unavailable


def test_translation_keeps_the_cause() -> None:
    """The boundary raises the service's error from the library's, so the traceback keeps both."""
    with pytest.raises(Unavailable) as caught, redis_errors():
        raise redis.ConnectionError("gone")
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    with pytest.raises(ServiceRefused), kafka_errors():
        raise kafka.TopicAuthorizationFailedError()


async def test_an_intake_refusing_the_service_is_raised_not_retried_inside() -> None:
    """The sink hands a 403 to its caller at once, naming the fix, instead of retrying it as if it were transient."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(403, text="forbidden")

    sink = HttpIntakeSink(url="http://intake.test/x", headers={}, timeout_s=1, max_batch=2, max_body_bytes=100_000,
                          retry_initial_s=0.001, retry_max_s=0.01, transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(ServiceRefused) as caught:
            await sink.send([b'{"a":1}', b'{"a":2}', b'{"a":3}'])  # two requests in flight
    finally:
        await sink.aclose()
    assert caught.value.component == "intake" and "403" in caught.value.detail and "DD_API_KEY" in caught.value.hint
    assert len(calls) <= 2


def _stage(work: object, metrics: Metrics, refusals: Refusals, stopping: list[bool]) -> Stage[int, int]:
    return Stage("join", work, metrics=metrics, refusals=refusals,  # type: ignore[arg-type]
                 stopping=lambda: bool(stopping), retry_first_s=0.001, retry_cap_s=0.002)


async def test_a_stage_retries_outages_and_refusals_and_reports_refusals() -> None:
    """Unavailable and ServiceRefused are retried; a refusal makes the service unready until the stage succeeds."""
    metrics, refusals, seen = Metrics(), Refusals(Metrics()), []
    failures: list[Exception] = [Unavailable("redis", "down"), ServiceRefused("intake", "403", hint="fix the key")]

    async def work(unit: int) -> int:
        seen.append(refusals.reason())
        if failures:
            raise failures.pop(0)
        return unit * 2

    stage = _stage(work, metrics, refusals, [])
    stage.submit(21)
    assert not stage.has_room
    await stage.join(deadline=asyncio.get_running_loop().time() + 5)
    assert stage.poll() == 42 and stage.has_room
    assert seen[0] is None and seen[2] is not None and "fix the key" in seen[2]  # unready during the third attempt
    assert refusals.reason() is None  # ready again after the success


async def test_a_stage_raises_what_it_cannot_wait_out() -> None:
    """A dependency error that is not retriable ends the unit: poll raises it, nothing is retried."""
    attempts = []

    async def work(unit: int) -> int:
        attempts.append(unit)
        raise DependencyError("kafka", "UnsupportedVersionError")

    stage = _stage(work, Metrics(), Refusals(Metrics()), [])
    stage.submit(1)
    await stage.join(deadline=asyncio.get_running_loop().time() + 5)
    with pytest.raises(DependencyError):
        stage.poll()
    assert attempts == [1]


async def test_a_stage_gives_up_a_failing_unit_once_stopping() -> None:
    """After a stop is requested a failed unit is abandoned (not committed), not retried."""
    attempts = []

    async def work(unit: int) -> int:
        attempts.append(unit)
        raise Unavailable("redis", "down")

    stage = _stage(work, Metrics(), Refusals(Metrics()), [True])
    stage.submit(1)
    await stage.join(deadline=asyncio.get_running_loop().time() + 5)
    assert stage.poll() is None and attempts == [1]


async def test_a_stage_cancels_a_unit_past_its_deadline() -> None:
    """join(deadline) cancels a unit that outlasts it; poll then says nothing finished."""
    async def work(unit: int) -> int:
        await asyncio.sleep(60)
        return unit

    stage = _stage(work, Metrics(), Refusals(Metrics()), [])
    stage.submit(1)
    await stage.join(deadline=asyncio.get_running_loop().time() + 0.05)
    assert stage.poll() is None and stage.has_room


def test_the_dlq_circuit_counts_a_retried_batch_once() -> None:
    """Records seen again (a batch joined again after a transient failure) do not count twice towards the halt."""
    from consumer.dlq import DlqLimit
    from consumer.errors import DlqLimitExceeded

    limit = DlqLimit(max_invalid_ratio=0, window=100, max_consecutive=3)
    batch = [("t", 0, offset) for offset in range(3)]
    for _ in range(5):  # the same three invalid records, five attempts
        for position in batch:
            limit.record(valid=False, position=position)
    with pytest.raises(DlqLimitExceeded):
        limit.record(valid=False, position=("t", 0, 3))  # a fourth one in a row is over the limit
