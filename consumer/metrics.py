"""Every metric the service emits, in one catalog.

Prometheus conventions: base units, ``_total`` for counters, and labels of bounded cardinality only
(topic, kind, outcome, reason; never join keys, span ids or ml_apps). Each service instance has its
own registry, served on ``/metrics`` by :mod:`consumer.health`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PREFIX = "evaljoin"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Consumption
        self.messages_consumed = Counter(
            f"{_PREFIX}_messages_consumed", "Kafka records read, by topic.", ["topic"], registry=r)
        self.events = Counter(
            f"{_PREFIX}_events", "Decoded events by kind (span, result) and join outcome (stored, replaced, "
            "duplicate, joined, buffered, waiting), invalid, or not sent (unrated, other_model).", ["kind", "outcome"],
            registry=r)
        self.unrated = Counter(
            f"{_PREFIX}_unrated_judgements", "Judge lines without a rating, by cause (unparsed_rating: score -1, "
            "missing: null, nan: NaN): reported on the DLQ as unrated, never sent as a score.", ["cause"], registry=r)
        self.labels_normalised = Counter(
            f"{_PREFIX}_labels_normalised", "Evaluation labels made to follow Datadog's rule (a '-', '.', space or "
            "non-ASCII character to '_', what precedes the first letter dropped) instead of dead-lettering their "
            "event.", registry=r)
        self.timestamps_clamped = Counter(
            f"{_PREFIX}_timestamps_clamped", "Evaluation times older than Datadog's window (23 h before the result "
            "record), sent as the record's time with the original in metadata.evaljoin_original_timestamp_ms.",
            registry=r)
        self.dead_letters = Counter(
            f"{_PREFIX}_dead_letters", "Records and evaluations published to the DLQ, by reason.", ["reason"],
            registry=r)
        self.batches = Counter(f"{_PREFIX}_batches", "Batches finished (and then committed).", registry=r)
        self.batch_retries = Counter(
            f"{_PREFIX}_batch_retries", "Batches processed again after a transient Redis or Kafka error.",
            registry=r)
        # Delivery
        self.evaluations = Counter(
            f"{_PREFIX}_evaluations", "Joined evaluations by delivery outcome (delivered, already_delivered, "
            "rejected).", ["outcome"], registry=r)
        self.intake_retries = Counter(
            f"{_PREFIX}_intake_retries", "Intake requests retried, by cause (HTTP status or 'error').", ["cause"],
            registry=r)
        self.intake_request_seconds = Histogram(
            f"{_PREFIX}_intake_request_seconds", "Time of one intake request, whatever its answer.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.join_latency_seconds = Histogram(
            f"{_PREFIX}_join_latency_seconds", "From the first side produced to its evaluation delivered.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400), registry=r)
        # Buffer and expiry
        self.buffered_sides = Gauge(
            f"{_PREFIX}_buffered_sides", "Sides in the deadline index (waiting, or joined spans kept for late "
            "results), as of the last sweep.", registry=r)
        self.oldest_buffered_age = Gauge(
            f"{_PREFIX}_oldest_buffered_age_seconds", "Age of the oldest buffered side, as of the last sweep.",
            registry=r)
        self.unmatched = Counter(
            f"{_PREFIX}_unmatched_reported", "Sides published to the unmatched topic, by reason.", ["reason"],
            registry=r)
        # Offsets and group
        self.commits = Counter(f"{_PREFIX}_commits", "Offset commits by outcome (ok, failed).", ["outcome"],
                               registry=r)
        self.commit_seconds = Histogram(
            f"{_PREFIX}_commit_seconds", "Time of one offset commit.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=r)
        self.lag = Gauge(f"{_PREFIX}_consumer_lag_records", "Records behind the partition's high watermark.",
                         ["topic", "partition"], registry=r)
        self.rebalances = Counter(f"{_PREFIX}_rebalances", "Partition revocations.", registry=r)
        self.assigned_partitions = Gauge(f"{_PREFIX}_assigned_partitions", "Partitions assigned now.", registry=r)
        self.refused = Gauge(
            f"{_PREFIX}_refused", "1 while a dependency (kafka, redis, intake) refuses the service itself "
            "(credentials, ACLs, a wrong URL): /readyz fails meanwhile.", ["component"], registry=r)
        self.redis_out_of_memory = Gauge(
            f"{_PREFIX}_redis_out_of_memory", "1 while Redis refuses writes for want of memory (maxmemory reached, "
            "noeviction): batches are held and retried, /readyz fails meanwhile.", registry=r)
        self.redis_oom_refusals = Counter(
            f"{_PREFIX}_redis_oom_refusals", "Redis calls refused with OOM (each is retried).", registry=r)
        self.paused = Gauge(f"{_PREFIX}_paused", "1 while fetching is paused for a batch in flight.", registry=r)
        self.last_progress = Gauge(
            f"{_PREFIX}_last_progress_timestamp_seconds", "Unix time the consume loop last made progress.",
            registry=r)
