"""The performance benchmark: ``python -m bench --help``.

It generates realistic traffic, runs the service (``python -m consumer``) against a real Kafka
broker, a real redis-server and an intake stand-in that accepts at line rate, and prints a table
beside two baselines measured in the same run: a bare aiokafka consumer that only reads the same
records, and the Datadog guide's batch join on the same data as files.
"""
