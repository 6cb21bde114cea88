"""The unit tier (``pytest -m unit``): no Kafka, no Redis, no HTTP server; the whole tier runs in seconds."""
