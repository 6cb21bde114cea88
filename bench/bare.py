"""The read ceiling: a bare aiokafka consumer that only reads the records, in a process of its own.

``python -m bench.bare BOOTSTRAP TOPIC[,TOPIC] COUNT [MAX_BATCH]`` assigns every partition of the
topics, reads from the beginning with ``getmany`` until COUNT records arrived, touching each value,
and prints one JSON line: records, seconds (from the first fetch to the last record) and the
process's CPU seconds over the same span.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.config import Settings
from consumer.service import FETCH_MAX_BYTES as SERVICE_FETCH_MAX_BYTES
from consumer.service import RECORD_OVERHEAD_BYTES

# Fetch sizes as the service sets them for its default MAX_MESSAGE_BYTES, so that both read alike.
_MAX_MESSAGE_BYTES: int = Settings.model_fields["max_message_bytes"].default
FETCH_MAX_BYTES = max(SERVICE_FETCH_MAX_BYTES, 2 * _MAX_MESSAGE_BYTES)  # one fetch, all partitions
PARTITION_FETCH_BYTES = _MAX_MESSAGE_BYTES + RECORD_OVERHEAD_BYTES  # one partition's share: a record and its overhead
POLL_TIMEOUT_MS = 500  # how long one getmany waits for records
MAX_BATCH: int = Settings.model_fields["kafka_max_batch"].default  # records per getmany, as the service's default


async def read(bootstrap: str, topics: list[str], count: int, max_batch: int) -> dict[str, float]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_bytes=FETCH_MAX_BYTES,
                                max_partition_fetch_bytes=PARTITION_FETCH_BYTES)
    await consumer.start()
    try:
        partitions: list[TopicPartition] = []
        for topic in topics:
            known = consumer.partitions_for_topic(topic)
            if not known:
                await consumer._client.force_metadata_update()
                known = consumer.partitions_for_topic(topic)
            partitions += [TopicPartition(topic, p) for p in sorted(known or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen = 0
        size = 0
        started, cpu0 = time.perf_counter(), time.process_time()
        while seen < count:
            batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=max_batch)
            for records in batch.values():
                for record in records:
                    size += len(record.value or b"")
                seen += len(records)
        return {"records": seen, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu0,
                "bytes": size}
    finally:
        await consumer.stop()


def main(argv: list[str]) -> int:
    bootstrap, topics, count = argv[0], argv[1].split(","), int(argv[2])
    max_batch = int(argv[3]) if len(argv) > 3 else MAX_BATCH
    sys.stdout.write(orjson.dumps(asyncio.run(read(bootstrap, topics, count, max_batch))).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
