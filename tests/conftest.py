"""Real services for the tests: one Kafka broker, one redis-server and one intake per session.

Each test gets its own topics, consumer group and Redis key prefix, so tests never see each
other's data. Servers listen on 127.0.0.1 on free ports and are stopped by the fixture that
started them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaProducer

from consumer.config import Settings
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker, acreate_topics
from localenv.redis import RedisCluster, RedisServer
from localenv.testagent import TestAgent
from tests.support import FAST_TIMINGS, Topics

# The service's structlog events go to stdlib logging, where pytest captures them per test
# (structlog's default would print them to stdout, mixed with what commands print).
structlog.configure(
    processors=[structlog.contextvars.merge_contextvars, structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.dev.ConsoleRenderer(colors=False)],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
)
_configure_structlog = structlog.configure


@pytest.fixture(autouse=True)
def _structlog_isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that runs a command's ``configure_logging`` leaves structlog as it found it.

    The commands cache each logger on first use; a logger cached under one test's configuration would
    ignore the next test's ``capture_logs``. In tests nothing is cached, and the configuration is restored.
    """
    saved = structlog.get_config()
    monkeypatch.setattr(structlog, "configure", lambda **options: _configure_structlog(
        **{**options, "cache_logger_on_first_use": False}))
    yield
    _configure_structlog(**saved)


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def test_agent() -> Iterator[TestAgent]:
    """Datadog's own APM test agent (ddapm-test-agent), standing in for the Datadog Agent."""
    with TestAgent() as agent:
        yield agent


@pytest.fixture
def intake() -> Iterator[FakeIntake]:
    with FakeIntake() as server:
        yield server


@pytest.fixture
async def topics(kafka: KafkaBroker) -> Topics:
    run = uuid.uuid4().hex[:10]
    names = Topics(f"{run}.spans", f"{run}.results", f"{run}.dlq", f"{run}.unmatched")
    await acreate_topics(kafka.bootstrap_servers, {names.span: 2, names.result: 2, names.dlq: 1, names.unmatched: 1})
    return names


@pytest.fixture(params=["standalone"])
def redis_url(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """The Redis the service uses: (url, is_cluster). Modules that also run on a cluster override this."""
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url, False


@pytest.fixture
def make_settings(kafka: KafkaBroker, intake: FakeIntake, topics: Topics,
                  redis_url: tuple[str, bool]) -> Callable[..., Settings]:
    prefix = "t" + uuid.uuid4().hex[:12]
    group = "g-" + uuid.uuid4().hex[:12]

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": kafka.bootstrap_servers,
            "kafka_group_id": group,
            "span_topic": topics.span,
            "result_topic": topics.result,
            "dlq_topic": topics.dlq,
            "unmatched_topic": topics.unmatched,
            "redis_url": redis_url[0],
            "redis_cluster": redis_url[1],
            "redis_key_prefix": prefix,
            "redis_deadline_shards": 4,
            "default_ml_app": "nemos-demo",
            "dd_llmobs_override_origin": intake.origin,
            "dd_api_key": "test-api-key-0123456789",
            **FAST_TIMINGS,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def producer(kafka: KafkaBroker) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await client.start()
    try:
        yield client
    finally:
        await client.stop()
