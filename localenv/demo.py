"""The quick start: the whole pipeline on this machine, with the Datadog guide's example flowing through.

Starts a real Kafka broker, a redis-server and a local intake that prints what Datadog would
receive, runs the service against them, and publishes:

1. the guide's ``outputs.json`` record (span context) and ``scores.jsonl`` line (NeMo judge score),
   which join and arrive at the intake as ``quality_assessment`` = 8 with the guide's metadata;
2. the same two records again, which are recognised and not sent twice;
3. a record that is not JSON, which goes to the dead-letter topic with its reason;
4. a span whose result never comes, reported on the unmatched topic at its deadline.

Run it with ``scripts/demo.sh`` (or ``python -m localenv.demo`` once set up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.config import Settings
from consumer.logs import configure_logging
from consumer.service import Service
from localenv.intake import FakeIntake
from localenv.kafka import KafkaBroker, acreate_topics
from localenv.redis import RedisServer

SEED = Path(__file__).resolve().parent.parent / "producer_examples" / "seed"
TOPICS = {"llmobs.span-context": 2, "nemo.eval-results": 2, "evaljoin.dlq": 1, "evaljoin.unmatched": 1}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def read(bootstrap: str, topic: str, count: int, within: float = 30.0) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(within):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def wait_for(intake: FakeIntake, count: int, within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while len(intake.accepted_metrics()) < count:  # noqa: ASYNC110 - the intake runs in a thread
            await asyncio.sleep(0.05)


async def demo(kafka: KafkaBroker, redis: RedisServer, intake: FakeIntake) -> None:
    bootstrap = kafka.bootstrap_servers
    await acreate_topics(bootstrap, TOPICS)
    settings = Settings(
        kafka_bootstrap_servers=bootstrap, redis_url=redis.url, default_ml_app="nemos-demo",
        dd_llmobs_agentless_enabled=True, dd_llmobs_override_origin=intake.origin, dd_api_key="demo-api-key",
        join_ttl_seconds=3, sweep_interval_seconds=0.5, log_format="console", log_level="WARNING",
    )
    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    # A fresh broker elects its group coordinator a moment after it starts; aiokafka logs the wait loudly.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    output_record = json.loads((SEED / "outputs.json").read_text())[0]
    judge_line = (SEED / "scores.jsonl").read_text().splitlines()[0].encode()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    async with Service.open(settings) as service:
        task = asyncio.create_task(service.run())
        try:
            say(f"publishing the guide's outputs.json record to {settings.span_topic}")
            print(json.dumps(output_record["input"]["source"]))
            await producer.send_and_wait(settings.span_topic, orjson.dumps(output_record))
            say(f"publishing the guide's scores.jsonl line to {settings.result_topic}")
            await producer.send_and_wait(settings.result_topic, judge_line)
            await wait_for(intake, 1)

            say("publishing both again: recognised, nothing is sent twice")
            await producer.send_and_wait(settings.span_topic, orjson.dumps(output_record))
            await producer.send_and_wait(settings.result_topic, judge_line)

            say("publishing a record that is not JSON")
            await producer.send_and_wait(settings.result_topic, b"{this is not json")
            (dead,) = await read(bootstrap, settings.dlq_topic, 1)
            headers = {k: v.decode() for k, v in dead.headers if k.startswith("evaljoin.")}
            print(f"dead-lettered on {settings.dlq_topic}: {json.dumps(headers)}")

            say(f"publishing a span whose result never comes (JOIN_TTL_SECONDS={settings.join_ttl_seconds})")
            lonely = {"schema_version": 1, "join_key": "q-lonely", "trace_id": "7f", "span_id": "99"}
            await producer.send_and_wait(settings.span_topic, orjson.dumps(lonely))
            (report,) = await read(bootstrap, settings.unmatched_topic, 1)
            unmatched = orjson.loads(report.value)
            print(f"reported on {settings.unmatched_topic}: reason={unmatched['reason']} "
                  f"ml_app={unmatched['ml_app']} join_key={unmatched['join_key']}")
        finally:
            service.stop()
            await task
            await producer.stop()
    say(f"done: the intake accepted {len(intake.accepted_metrics())} evaluation(s) "
        f"in {sum(1 for r in intake.requests if 200 <= r.status < 300)} request(s)")


def main() -> int:
    say("starting Kafka (KRaft), redis-server and a local Datadog intake on 127.0.0.1")
    with KafkaBroker() as kafka, RedisServer() as redis, FakeIntake(echo=sys.stdout) as intake:
        print(f"kafka {kafka.bootstrap_servers}  redis {redis.url}  intake {intake.url}")
        asyncio.run(demo(kafka, redis, intake))
    return 0


if __name__ == "__main__":
    sys.exit(main())
