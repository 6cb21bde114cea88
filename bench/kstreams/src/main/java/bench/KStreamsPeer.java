package bench;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.ByteArrayOutputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeSet;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.ThreadMetadata;
import org.apache.kafka.streams.TaskMetadata;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.JoinWindows;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.StreamJoined;
import org.apache.kafka.streams.processor.StateStore;
import org.apache.kafka.streams.processor.StateStoreContext;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.internals.CacheFlushListener;
import org.apache.kafka.streams.state.internals.CachedStateStore;

/**
 * The benchmark's Kafka Streams peer: a KStream-KStream join of the span-context and NeMo result topics
 * (JoinWindows.ofTimeDifferenceAndGrace, the join TTL either way), building the eval-metric objects that
 * consumer/payload.py's build_metric builds, and posting them to the eval-metric intake in batches.
 *
 * <p>Delivery is at least once: joined metrics wait in an {@link IntakeBuffer}, posted when it holds
 * MAX_BATCH metrics and whenever the task commits. The buffer is a state store that is also a
 * CachedStateStore, so that Kafka Streams empties it before it commits the input offsets, as it empties
 * its own record caches (prepareCommit: flushCache, then the producer, then the offsets). A metric posted
 * before a crash may be posted again after it; none is lost.
 *
 * <p>Arguments: BOOTSTRAP GROUP SPAN_TOPIC RESULT_TOPIC INTAKE_URL MAX_BATCH COMMIT_MS TTL_S STATE_DIR
 * DDTRACE_VERSION. Prints {"event":"partitions_assigned","partitions":[...]} on stderr once RUNNING.
 * Stops on SIGTERM.
 */
public final class KStreamsPeer {
  static final ObjectMapper JSON = new ObjectMapper();
  static final String STORE = "intake-buffer";
  static final byte[] BODY_HEAD =
      "{\"data\":{\"type\":\"evaluation_metric\",\"attributes\":{\"metrics\":[".getBytes(StandardCharsets.UTF_8);
  static final byte[] BODY_TAIL = "]}}}".getBytes(StandardCharsets.UTF_8);

  private KStreamsPeer() {}

  public static void main(String[] args) throws Exception {
    String bootstrap = args[0];
    String group = args[1];
    String spanTopic = args[2];
    String resultTopic = args[3];
    String intakeUrl = args[4];
    int maxBatch = Integer.parseInt(args[5]);
    long commitMs = Long.parseLong(args[6]);
    long ttlS = Long.parseLong(args[7]);
    String stateDir = args[8];
    String ddtraceVersion = args[9];

    Properties props = new Properties();
    props.put(StreamsConfig.APPLICATION_ID_CONFIG, group);
    props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
    props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, commitMs);
    props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
    props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.AT_LEAST_ONCE);
    props.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");

    StreamsBuilder builder = new StreamsBuilder();
    builder.addStateStore(new IntakeBufferBuilder(intakeUrl, maxBatch));
    Consumed<String, byte[]> consumed = Consumed.with(Serdes.String(), Serdes.ByteArray());
    KStream<String, byte[]> spans = builder.stream(spanTopic, consumed);
    KStream<String, byte[]> results = builder.stream(resultTopic, consumed);
    spans
        .join(results, (span, result) -> metrics(span, result, ddtraceVersion),
            JoinWindows.ofTimeDifferenceAndGrace(Duration.ofSeconds(ttlS), Duration.ZERO),
            StreamJoined.with(Serdes.String(), Serdes.ByteArray(), Serdes.ByteArray()))
        .process(Deliver::new, STORE);

    KafkaStreams streams = new KafkaStreams(builder.build(), props);
    CountDownLatch stopped = new CountDownLatch(1);
    streams.setStateListener((now, before) -> {
      if (now == KafkaStreams.State.RUNNING) {
        announce(streams);
      } else if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
        stopped.countDown();
      }
    });
    // SIGTERM: close (the last commit posts what waits) and exit 0, as the service does. sun.misc.Signal
    // (jdk.unsupported) because a shutdown hook cannot choose the exit code.
    sun.misc.Signal.handle(new sun.misc.Signal("TERM"), signal -> stopped.countDown());
    streams.start();
    stopped.await();
    boolean failed = streams.state() == KafkaStreams.State.ERROR;
    streams.close(Duration.ofSeconds(30));
    System.exit(failed ? 1 : 0);
  }

  /** The line the benchmark waits for: the input partitions this instance holds. */
  static void announce(KafkaStreams streams) {
    TreeSet<String> partitions = new TreeSet<>();
    for (ThreadMetadata thread : streams.metadataForLocalThreads()) {
      for (TaskMetadata task : thread.activeTasks()) {
        task.topicPartitions().forEach(tp -> partitions.add(tp.topic() + ":" + tp.partition()));
      }
    }
    ObjectNode line = JSON.createObjectNode();
    line.put("event", "partitions_assigned");
    ArrayNode list = line.putArray("partitions");
    partitions.forEach(list::add);
    System.err.println(line.toString());
    System.err.flush();
  }

  /** The span tags the service keeps and carries onto evaluations by default (SPAN_TAGS_TO_EVALUATION). */
  static final java.util.Set<String> SPAN_TAGS = java.util.Set.of("env", "service", "version");

  /** The eval-metric objects of a joined pair, as consumer.payload.build_metric builds them. */
  static List<byte[]> metrics(byte[] spanBytes, byte[] resultBytes, String ddtraceVersion) {
    try {
      JsonNode span = JSON.readTree(spanBytes);
      JsonNode result = JSON.readTree(resultBytes);
      JsonNode provenance = result.path("provenance");
      List<byte[]> out = new ArrayList<>();
      for (JsonNode evaluation : result.path("evaluations")) {
        String metricType = evaluation.get("metric_type").asText();
        String mlApp = span.get("ml_app").asText();
        ObjectNode metric = JSON.createObjectNode();
        metric.put("event_kind", "evaluation");
        ObjectNode spanRef = metric.putObject("join_on").putObject("span");
        spanRef.set("span_id", span.get("span_id"));
        spanRef.set("trace_id", span.get("trace_id"));
        metric.set("label", evaluation.get("label"));
        metric.put("metric_type", metricType);
        // build_metric falls back to the result's receive time after these two; the benchmark's
        // evaluations always carry their own timestamp_ms.
        JsonNode timestamp = evaluation.path("timestamp_ms");
        if (timestamp.isMissingNode() || timestamp.isNull()) {
          timestamp = provenance.path("evaluated_at_ms");
        }
        metric.set("timestamp_ms", timestamp);
        metric.set(metricType + "_value", evaluation.get("value"));
        metric.put("ml_app", mlApp);
        // Tags as build_metric orders them (a Python dict: a later value replaces an earlier one in its
        // place): ddtrace.version, ml_app, the span's allow-listed tags (SPAN_TAGS_TO_EVALUATION's default,
        // env, service and version, are all the service stores), then the evaluation's own.
        Map<String, String> tagValues = new java.util.LinkedHashMap<>();
        tagValues.put("ddtrace.version", ddtraceVersion);
        tagValues.put("ml_app", mlApp);
        for (Map.Entry<String, JsonNode> tag : span.path("tags").properties()) {
          if (SPAN_TAGS.contains(tag.getKey())) {
            tagValues.put(tag.getKey(), tag.getValue().asText());
          }
        }
        for (Map.Entry<String, JsonNode> tag : evaluation.path("tags").properties()) {
          tagValues.put(tag.getKey(), tag.getValue().asText());
        }
        ArrayNode tags = metric.putArray("tags");
        tagValues.forEach((key, value) -> tags.add(key + ":" + value));
        String scope = evaluation.path("eval_scope").asText("");
        metric.put("eval_scope", scope.isEmpty() ? "span" : scope);
        // The span's ml_app_version: its field, else its ml_app_version tag, else its version tag.
        String version = span.path("ml_app_version").asText("");
        if (version.isEmpty()) {
          version = span.path("tags").path("ml_app_version").asText("");
        }
        if (version.isEmpty()) {
          version = span.path("tags").path("version").asText("");
        }
        if (!version.isEmpty()) {
          metric.put("ml_app_version", version);
        }
        if (!evaluation.path("assessment").asText("").isEmpty()) {
          metric.set("assessment", evaluation.get("assessment"));
        }
        if (!evaluation.path("reasoning").asText("").isEmpty()) {
          metric.set("reasoning", evaluation.get("reasoning"));
        }
        ObjectNode metadata = JSON.createObjectNode();
        if (evaluation.path("metadata").isObject()) {
          metadata.setAll((ObjectNode) evaluation.get("metadata"));
        }
        if (provenance.isObject() && provenance.size() > 0) {
          // A producer's own "nemo" key keeps its place; the provenance then goes under evaljoin_provenance.
          ObjectNode nemo = metadata.putObject(metadata.has("nemo") ? "evaljoin_provenance" : "nemo");
          for (Map.Entry<String, JsonNode> field : provenance.properties()) {
            if (!field.getValue().isNull()) {
              nemo.set(field.getKey(), field.getValue());
            }
          }
        }
        if (metadata.size() > 0) {
          metric.set("metadata", metadata);
        }
        out.add(JSON.writeValueAsBytes(metric));
      }
      return out;
    } catch (java.io.IOException e) {
      throw new IllegalArgumentException("not JSON", e);
    }
  }

  /** Hands each joined pair's metrics to the intake buffer. */
  static final class Deliver implements Processor<String, List<byte[]>, Void, Void> {
    private IntakeBuffer buffer;

    @Override
    public void init(ProcessorContext<Void, Void> context) {
      buffer = context.getStateStore(STORE);
    }

    @Override
    public void process(Record<String, List<byte[]>> record) {
      buffer.add(record.value());
    }
  }

  /** Metrics not yet posted: posted when MAX_BATCH are waiting, and before every commit (flushCache). */
  static final class IntakeBuffer implements StateStore, CachedStateStore<Object, Object> {
    private final String url;
    private final int maxBatch;
    private final HttpClient http = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1)
        .connectTimeout(Duration.ofSeconds(10)).build();
    private final List<byte[]> waiting = new ArrayList<>();
    private boolean open;

    IntakeBuffer(String url, int maxBatch) {
      this.url = url;
      this.maxBatch = maxBatch;
    }

    void add(List<byte[]> metrics) {
      waiting.addAll(metrics);
      if (waiting.size() >= maxBatch) {
        post();
      }
    }

    /** Posts what waits, retrying until the intake answers 2xx (as the service's sink does). */
    void post() {
      if (waiting.isEmpty()) {
        return;
      }
      ByteArrayOutputStream body = new ByteArrayOutputStream();
      body.writeBytes(BODY_HEAD);
      for (int i = 0; i < waiting.size(); i++) {
        if (i > 0) {
          body.write(',');
        }
        body.writeBytes(waiting.get(i));
      }
      body.writeBytes(BODY_TAIL);
      HttpRequest request = HttpRequest.newBuilder(URI.create(url))
          .header("Content-Type", "application/json")
          .header("DD-API-KEY", "bench-api-key")
          .timeout(Duration.ofSeconds(10))
          .POST(HttpRequest.BodyPublishers.ofByteArray(body.toByteArray())).build();
      long backoffMs = 100;
      while (true) {
        try {
          HttpResponse<Void> response = http.send(request, HttpResponse.BodyHandlers.discarding());
          if (response.statusCode() / 100 == 2) {
            waiting.clear();
            return;
          }
        } catch (java.io.IOException e) {
          // retried below
        } catch (InterruptedException e) {
          Thread.currentThread().interrupt();
          throw new IllegalStateException("interrupted while posting", e);
        }
        try {
          Thread.sleep(backoffMs);
        } catch (InterruptedException e) {
          Thread.currentThread().interrupt();
          throw new IllegalStateException("interrupted while posting", e);
        }
        backoffMs = Math.min(backoffMs * 2, 5_000);
      }
    }

    @Override
    public void flushCache() {
      post();
    }

    @Override
    public void clearCache() {
      waiting.clear();  // the task is closed dirty: its input is re-read from the last commit
    }

    @Override
    public boolean setFlushListener(CacheFlushListener<Object, Object> listener, boolean sendOldValues) {
      return false;
    }

    @Override
    public String name() {
      return STORE;
    }

    @Override
    public void init(StateStoreContext context, StateStore root) {
      context.register(root, (key, value) -> { });
      open = true;
    }

    @Override
    public void flush() {
      post();
    }

    @Override
    public void close() {
      open = false;
    }

    @Override
    public boolean persistent() {
      return false;
    }

    @Override
    public boolean isOpen() {
      return open;
    }
  }

  /** Builds one {@link IntakeBuffer} per task. */
  static final class IntakeBufferBuilder implements StoreBuilder<IntakeBuffer> {
    private final String url;
    private final int maxBatch;

    IntakeBufferBuilder(String url, int maxBatch) {
      this.url = url;
      this.maxBatch = maxBatch;
    }

    @Override
    public StoreBuilder<IntakeBuffer> withCachingEnabled() {
      return this;
    }

    @Override
    public StoreBuilder<IntakeBuffer> withCachingDisabled() {
      return this;
    }

    @Override
    public StoreBuilder<IntakeBuffer> withLoggingEnabled(Map<String, String> config) {
      return this;
    }

    @Override
    public StoreBuilder<IntakeBuffer> withLoggingDisabled() {
      return this;
    }

    @Override
    public IntakeBuffer build() {
      return new IntakeBuffer(url, maxBatch);
    }

    @Override
    public Map<String, String> logConfig() {
      return Map.of();
    }

    @Override
    public boolean loggingEnabled() {
      return false;
    }

    @Override
    public String name() {
      return STORE;
    }
  }
}
