"""Every metric the service emits, in one catalog.

Prometheus conventions: base units, ``_total`` for counters, and labels of bounded cardinality only
(topic, kind, outcome, reason; never join keys or span ids). The ``evaljoin_app_*`` metrics carry an
``ml_app`` label bounded by :class:`AppLabels`: the apps it names, then the first ones seen, then
``other``. Each service instance has its own registry, served on ``/metrics`` by :mod:`consumer.health`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PREFIX = "evaljoin"
OTHER_APPS = "other"


class AppLabels:
    """The ``ml_app`` label of an app: its name if listed (``APP_METRICS_ML_APPS``) or among the first ``max_apps``
    others this process saw, else ``other``; so a registry holds at most listed + ``max_apps`` + 1 apps' series.

    An app is named in its own label as soon as it is seen, and stays so for the process's life (a restart may
    name another set of first-seen apps; list the apps that matter).
    """

    def __init__(self, listed: Iterable[str] = (), max_apps: int = 20) -> None:
        self._listed = frozenset(listed)
        self._max_apps = max_apps
        self._seen: set[str] = set()

    def __call__(self, ml_app: str | None) -> str:
        if ml_app is None:
            return OTHER_APPS
        if ml_app in self._listed or ml_app in self._seen:
            return ml_app
        if ml_app != OTHER_APPS and len(self._seen) < self._max_apps:
            self._seen.add(ml_app)
            return ml_app
        return OTHER_APPS


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, app_labels: AppLabels | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.app = app_labels or AppLabels()
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
        # Per ml_app (label bounded by AppLabels)
        self.app_events = Counter(
            f"{_PREFIX}_app_events", "Decoded events per ml_app, kind and join outcome (as evaljoin_events_total, "
            "and app_quota_exceeded: refused by the app's buffer quota and dead-lettered).",
            ["ml_app", "kind", "outcome"], registry=r)
        self.app_matched_results = Counter(
            f"{_PREFIX}_app_matched_results", "Results per ml_app that met their span (joined on arrival, taken by "
            "a span arriving, or joined by span tag): with app_unmatched_reported_total{reason=result_without_span}, "
            "the match rate.", ["ml_app"], registry=r)
        self.app_evaluations_delivered = Counter(
            f"{_PREFIX}_app_evaluations_delivered", "Evaluations per ml_app the intake accepted.", ["ml_app"],
            registry=r)
        self.app_dead_letters = Counter(
            f"{_PREFIX}_app_dead_letters", "Records and evaluations per ml_app published to the DLQ, by reason "
            "(records whose ml_app is unknown count as 'other').", ["ml_app", "reason"], registry=r)
        self.app_unmatched = Counter(
            f"{_PREFIX}_app_unmatched_reported", "Sides per ml_app published to the unmatched topic, by reason.",
            ["ml_app", "reason"], registry=r)
        self.app_buffered_sides = Gauge(
            f"{_PREFIX}_app_buffered_sides", "Sides per ml_app in the buffer (spans, replaced spans, pending "
            "results: what APP_QUOTA_SIDES limits), as of the last sweep.", ["ml_app"], registry=r)
        self.app_buffered_bytes = Gauge(
            f"{_PREFIX}_app_buffered_bytes", "Bytes of those sides (what APP_QUOTA_BYTES limits), as of the last "
            "sweep.", ["ml_app"], registry=r)
        self.app_oldest_pending_age = Gauge(
            f"{_PREFIX}_app_oldest_pending_age_seconds", "Per ml_app, the age of its oldest side still waiting for "
            "the other (among the oldest entries of each deadline shard), as of the last sweep.", ["ml_app"],
            registry=r)
        self.last_progress = Gauge(
            f"{_PREFIX}_last_progress_timestamp_seconds", "Unix time the consume loop last made progress.",
            registry=r)
