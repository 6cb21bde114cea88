"""Real local services for tests and the local demo.

Each service binds 127.0.0.1 only, on a free port, and is a context manager
whose ``__exit__`` stops everything its ``__enter__`` started:

* :mod:`localenv.kafka` - ``KafkaBroker``: Apache Kafka 4.1.1 in KRaft mode
  (jars fetched once with Maven), plus ``create_topics``.
* :mod:`localenv.kafka_cluster` - ``KafkaCluster``: three such nodes, each broker and controller,
  replication factor 3 and ``min.insync.replicas=2``; partition leaders and the active controller
  looked up from the cluster, each node killed and restarted on its own.
* :mod:`localenv.redis` - ``RedisServer``, ``RedisCluster`` and ``RedisSentinelSet``
  (a primary, a replica and three sentinels; all ``redis-server``).
* :mod:`localenv.intake` - ``FakeIntake``: Datadog's LLM Observability
  eval-metric intake with fault injection (stdlib HTTP server in a thread).
* :mod:`localenv.testagent` - ``TestAgent``: Datadog's ``ddapm-test-agent``.
* :mod:`localenv.oidc` - ``OidcProvider``: an OIDC provider issuing RS256 JWTs with the
  client credentials grant, and their JWKS (for SASL/OAUTHBEARER).
* :mod:`localenv.netfault` - ``NetFault``: a TCP proxy in front of any of them
  that cuts, delays, refuses, blackholes or half-opens connections on demand.
* :mod:`localenv.ports` - ``free_port``.

``python -m localenv kafka|redis|intake`` runs one of them in the foreground;
``python -m localenv fetch`` only downloads the Kafka jars. Submodules are
imported on demand so that, e.g., the intake does not need aiokafka.
"""
