{{/* Names */}}

{{- define "evaljoin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "evaljoin.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "evaljoin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "evaljoin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "evaljoin.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "evaljoin.secretName" -}}
{{- default (include "evaljoin.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* The image tag: the chart's appVersion unless set. */}}
{{- define "evaljoin.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "evaljoin.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "evaljoin.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
Selector labels: name and instance only. They never change with the chart or app version, since a
Deployment's or StatefulSet's selector cannot be changed after it is made.
*/}}
{{- define "evaljoin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "evaljoin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The Datadog service name: the same in every environment, so env and version tell them apart. */}}
{{- define "evaljoin.datadogService" -}}
{{- default (include "evaljoin.name" .) .Values.datadog.service }}
{{- end }}

{{/* Datadog unified service tagging. */}}
{{- define "evaljoin.datadogLabels" -}}
{{- $labels := dict "tags.datadoghq.com/service" (include "evaljoin.datadogService" .) "tags.datadoghq.com/version" (default (include "evaljoin.imageTag" .) .Values.datadog.version) }}
{{- with .Values.datadog.env }}{{ $_ := set $labels "tags.datadoghq.com/env" . }}{{ end }}
{{- toYaml $labels }}
{{- end }}

{{/* Common labels. Every object but the test pod carries them, so the checks run before any is made. */}}
{{- define "evaljoin.labels" -}}
{{- include "evaljoin.validate" . -}}
helm.sh/chart: {{ include "evaljoin.chart" . }}
{{ include "evaljoin.selectorLabels" . }}
app.kubernetes.io/version: {{ include "evaljoin.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: consumer
app.kubernetes.io/part-of: evaljoin
{{ include "evaljoin.datadogLabels" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
A setting as the string the service parses. Helm reads every number in a values file as a float,
which prints large ones in exponent form ("1.048576e+06") that an integer setting rejects; whole
numbers are printed as integers.
*/}}
{{- define "evaljoin.settingValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- printf "%d" (int64 .) }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* A setting is set unless null or empty (the service ignores empty variables). */}}
{{- define "evaljoin.isSet" -}}
{{- if and (not (kindIs "invalid" .)) (ne (toString .) "") }}true{{ end }}
{{- end }}

{{/*
How evaluations reach Datadog, as ddtrace decides it: "agentless" (DD_LLMOBS_AGENTLESS_ENABLED, else
DD_AGENTLESS_ENABLED), "agent" (DD_LLMOBS_AGENTLESS_ENABLED=false), or "ask": the service asks the
Agent's /info and posts through its EVP proxy, else directly when it has an API key.
*/}}
{{- define "evaljoin.deliveryRoute" -}}
{{- $llmobs := .Values.config.DD_LLMOBS_AGENTLESS_ENABLED }}
{{- if not (kindIs "invalid" $llmobs) }}
{{- ternary "agentless" "agent" $llmobs }}
{{- else if .Values.config.DD_AGENTLESS_ENABLED }}agentless
{{- else }}ask
{{- end }}
{{- end }}

{{- define "evaljoin.agentless" -}}
{{- if eq (include "evaljoin.deliveryRoute" .) "agentless" }}true{{ end }}
{{- end }}

{{/* The Agent's socket, when `datadog.agentSocket` mounts its directory. */}}
{{- define "evaljoin.agentSocketUrl" -}}
{{- if .Values.datadog.agentSocket.enabled }}
{{- printf "unix://%s/%s" (.Values.datadog.agentSocket.hostPath | trimSuffix "/") .Values.datadog.agentSocket.socket }}
{{- end }}
{{- end }}

{{/* The Agent's URL as the service sees it: DD_TRACE_AGENT_URL, else the mounted socket, else nothing. */}}
{{- define "evaljoin.agentUrl" -}}
{{- if include "evaljoin.isSet" .Values.config.DD_TRACE_AGENT_URL }}
{{- .Values.config.DD_TRACE_AGENT_URL }}
{{- else }}
{{- include "evaljoin.agentSocketUrl" . }}
{{- end }}
{{- end }}

{{/* An Agent is needed for delivery unless agentless, and for self-tracing always. */}}
{{- define "evaljoin.agentHostFromNode" -}}
{{- $c := .Values.config }}
{{- $needsAgent := or (not (include "evaljoin.agentless" .)) $c.DD_TRACE_ENABLED }}
{{- if and .Values.datadog.agentHostFromNode $needsAgent (not (include "evaljoin.isSet" $c.DD_AGENT_HOST)) (not (include "evaljoin.agentUrl" .)) }}true{{ end }}
{{- end }}

{{- define "evaljoin.saslEnabled" -}}
{{- if include "evaljoin.isSet" .Values.config.KAFKA_SASL_MECHANISM }}true{{ end }}
{{- end }}

{{/* A SASL mechanism with a user and a password (the others take tokens). */}}
{{- define "evaljoin.saslPassword" -}}
{{- if has .Values.config.KAFKA_SASL_MECHANISM (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512") }}true{{ end }}
{{- end }}

{{- define "evaljoin.kafkaTls" -}}
{{- if has .Values.config.KAFKA_SECURITY_PROTOCOL (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* KEDA's name for the consumer's SASL mechanism, if it uses one (MSK IAM is OAUTHBEARER with AWS's tokens). */}}
{{- define "evaljoin.kedaSasl" -}}
{{- if include "evaljoin.saslEnabled" . }}
{{- get (dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512" "OAUTHBEARER" "oauthbearer" "AWS_MSK_IAM" "oauthbearer") .Values.config.KAFKA_SASL_MECHANISM }}
{{- end }}
{{- end }}

{{/* AWS_MSK_IAM's region: KAFKA_SASL_AWS_REGION, else the one in MSK's broker names (as the service finds it). */}}
{{- define "evaljoin.awsRegion" -}}
{{- if include "evaljoin.isSet" .Values.config.KAFKA_SASL_AWS_REGION }}
{{- .Values.config.KAFKA_SASL_AWS_REGION }}
{{- else }}
{{- $found := list }}
{{- range splitList "," (toString .Values.config.KAFKA_BOOTSTRAP_SERVERS) }}
{{- $host := regexReplaceAll ":[^:]*$" (trim . | lower) "" }}
{{- $region := regexReplaceAll "^.*\\.kafka(-serverless)?\\.([a-z]{2}(-[a-z]+)+-[0-9]+)\\.amazonaws\\.com(\\.cn)?$" $host "${2}" }}
{{- if ne $region $host }}{{ $found = append $found $region }}{{ end }}
{{- end }}
{{- with $found }}{{ first . }}{{ end }}
{{- end }}
{{- end }}

{{/*
What KEDA's lag scaler needs besides the trigger's metadata to authenticate as the consumer does,
as a dict with `env` (read from the consumer container's environment) and `secretTargetRef`, each
present only when not empty: nothing for PLAINTEXT, or for TLS with the system's CAs.
- PLAIN/SCRAM: username (KAFKA_SASL_USERNAME) and password; OAUTHBEARER: username and password are
  the client id and secret, with the token endpoint, scope and extensions.
- TLS: the CA (caSecret) and, for mutual TLS, the client certificate and key (clientCertSecret).
A TriggerAuthentication reads its Secrets in the release's namespace, the secret ones from the pod's
own Secret unless named; a ClusterTriggerAuthentication reads them in KEDA's namespace, so each must
be named.
*/}}
{{- define "evaljoin.kedaAuthParams" -}}
{{- $c := .Values.config }}
{{- $k := .Values.autoscaling.keda }}
{{- $cluster := eq $k.authentication.kind "ClusterTriggerAuthentication" }}
{{- $existing := $k.authentication.name }}
{{- $podSecrets := include "evaljoin.secretItems" . | fromJson }}
{{- $container := include "evaljoin.name" . }}
{{- $env := list }}
{{- $secrets := list }}
{{- $mechanism := ternary (toString $c.KAFKA_SASL_MECHANISM) "" (include "evaljoin.isSet" $c.KAFKA_SASL_MECHANISM | eq "true") }}
{{- $secretSetting := "" }}
{{- if has $mechanism (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512") }}
{{- $env = append $env (dict "parameter" "username" "name" "KAFKA_SASL_USERNAME" "containerName" $container) }}
{{- $secretSetting = "KAFKA_SASL_PASSWORD" }}
{{- else if eq $mechanism "OAUTHBEARER" }}
{{- $env = append $env (dict "parameter" "username" "name" "KAFKA_SASL_OAUTHBEARER_CLIENT_ID" "containerName" $container) }}
{{- $env = append $env (dict "parameter" "oauthTokenEndpointUri" "name" "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL" "containerName" $container) }}
{{- if include "evaljoin.isSet" $c.KAFKA_SASL_OAUTHBEARER_SCOPE }}
{{- $env = append $env (dict "parameter" "scopes" "name" "KAFKA_SASL_OAUTHBEARER_SCOPE" "containerName" $container) }}
{{- end }}
{{- if include "evaljoin.isSet" $c.KAFKA_SASL_OAUTHBEARER_EXTENSIONS }}
{{- $env = append $env (dict "parameter" "oauthExtensions" "name" "KAFKA_SASL_OAUTHBEARER_EXTENSIONS" "containerName" $container) }}
{{- end }}
{{- $secretSetting = "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET" }}
{{- end }}
{{- if $secretSetting }}
{{- if $k.passwordSecret.name }}
{{- $secrets = append $secrets (dict "parameter" "password" "name" $k.passwordSecret.name "key" $k.passwordSecret.key) }}
{{- else if and $cluster (not $existing) }}
{{- fail (printf "autoscaling.keda.authentication.kind=ClusterTriggerAuthentication reads %s from KEDA's own namespace: name that Secret in autoscaling.keda.passwordSecret" $secretSetting) }}
{{- else }}
{{- $secrets = append $secrets (dict "parameter" "password" "name" (include "evaljoin.secretName" .) "key" (get $podSecrets $secretSetting)) }}
{{- end }}
{{- end }}
{{- if include "evaljoin.kafkaTls" . }}
{{- if $k.caSecret.name }}
{{- $secrets = append $secrets (dict "parameter" "ca" "name" $k.caSecret.name "key" $k.caSecret.key) }}
{{- end }}
{{- $cert := $k.clientCertSecret }}
{{- if $cert.name }}
{{- $secrets = append $secrets (dict "parameter" "cert" "name" $cert.name "key" $cert.certKey) }}
{{- $secrets = append $secrets (dict "parameter" "key" "name" $cert.name "key" $cert.keyKey) }}
{{- if $cert.keyPasswordKey }}
{{- $secrets = append $secrets (dict "parameter" "keyPassword" "name" $cert.name "key" $cert.keyPasswordKey) }}
{{- else if hasKey $podSecrets "KAFKA_SSL_KEY_PASSWORD" }}
{{- if $cluster }}
{{- fail "the client key has a password (KAFKA_SSL_KEY_PASSWORD): a ClusterTriggerAuthentication reads it from KEDA's namespace, so name its key in autoscaling.keda.clientCertSecret.keyPasswordKey" }}
{{- end }}
{{- $secrets = append $secrets (dict "parameter" "keyPassword" "name" (include "evaljoin.secretName" .) "key" (get $podSecrets "KAFKA_SSL_KEY_PASSWORD")) }}
{{- end }}
{{- else if and (include "evaljoin.isSet" $c.KAFKA_SSL_CERTFILE) (not $existing) }}
{{- fail "config.KAFKA_SSL_CERTFILE: Kafka asks for a client certificate, and KEDA reads it from a Secret, not the pod's file: name that Secret in autoscaling.keda.clientCertSecret" }}
{{- end }}
{{- end }}
{{- if and (eq $mechanism "AWS_MSK_IAM") (not $existing) }}
{{- fail "KAFKA_SASL_MECHANISM=AWS_MSK_IAM: KEDA signs MSK IAM tokens with its own AWS identity; name a TriggerAuthentication that gives it one (podIdentity provider aws, or awsRoleArn) in autoscaling.keda.authentication.name" }}
{{- end }}
{{- $params := dict }}
{{- with $env }}{{ $_ := set $params "env" . }}{{ end }}
{{- with $secrets }}{{ $_ := set $params "secretTargetRef" . }}{{ end }}
{{- toJson $params }}
{{- end }}

{{/* The name of the chart-made (Cluster)TriggerAuthentication: a cluster-wide one carries the namespace. */}}
{{- define "evaljoin.kedaAuthName" -}}
{{- if eq .Values.autoscaling.keda.authentication.kind "ClusterTriggerAuthentication" }}
{{- printf "%s-%s" .Release.Namespace (include "evaljoin.fullname" .) | trunc 253 | trimSuffix "-" }}
{{- else }}
{{- include "evaljoin.fullname" . }}
{{- end }}
{{- end }}

{{/*
The secret settings the pod mounts, as a dict of variable name -> key in the Secret. From the
chart's own Secret: those given. From an existing Secret: REDIS_URL unless Sentinel names the
primary, DD_API_KEY when agentless, KAFKA_SASL_PASSWORD when SASL is on, REDIS_PASSWORD and
REDIS_SENTINEL_PASSWORD when their keys are named (a key that is not needed is not required to exist).
*/}}
{{- define "evaljoin.secretItems" -}}
{{- $items := dict }}
{{- if .Values.existingSecret }}
{{- $keys := .Values.existingSecretKeys }}
{{- if and $keys.REDIS_URL (not (include "evaljoin.isSet" .Values.config.REDIS_SENTINELS)) }}{{ $_ := set $items "REDIS_URL" $keys.REDIS_URL }}{{ end }}
{{- if and (include "evaljoin.agentless" .) $keys.DD_API_KEY }}{{ $_ := set $items "DD_API_KEY" $keys.DD_API_KEY }}{{ end }}
{{- if and (include "evaljoin.saslPassword" .) $keys.KAFKA_SASL_PASSWORD }}{{ $_ := set $items "KAFKA_SASL_PASSWORD" $keys.KAFKA_SASL_PASSWORD }}{{ end }}
{{- if and (eq (toString .Values.config.KAFKA_SASL_MECHANISM) "OAUTHBEARER") $keys.KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET }}{{ $_ := set $items "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET" $keys.KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET }}{{ end }}
{{- if $keys.KAFKA_SSL_KEY_PASSWORD }}{{ $_ := set $items "KAFKA_SSL_KEY_PASSWORD" $keys.KAFKA_SSL_KEY_PASSWORD }}{{ end }}
{{- if $keys.REDIS_PASSWORD }}{{ $_ := set $items "REDIS_PASSWORD" $keys.REDIS_PASSWORD }}{{ end }}
{{- if and (include "evaljoin.isSet" .Values.config.REDIS_SENTINELS) $keys.REDIS_SENTINEL_PASSWORD }}{{ $_ := set $items "REDIS_SENTINEL_PASSWORD" $keys.REDIS_SENTINEL_PASSWORD }}{{ end }}
{{- else }}
{{- range $name, $value := .Values.secrets }}
{{- if $value }}{{ $_ := set $items $name $name }}{{ end }}
{{- end }}
{{- end }}
{{- toJson $items }}
{{- end }}

{{/* The port of a URL: explicit, else the scheme's. */}}
{{- define "evaljoin.urlPort" -}}
{{- $url := urlParse . }}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $url.host) }}
{{- if $port }}{{ $port }}{{ else if eq $url.scheme "https" }}443{{ else if hasPrefix "redis" $url.scheme }}6379{{ else }}80{{ end }}
{{- end }}

{{/* Where the preStop hook, the drain and the margin fit: the grace period the pod needs. */}}
{{- define "evaljoin.minimumGracePeriod" -}}
{{- add (int .Values.preStopSleepSeconds) (ceil .Values.config.SHUTDOWN_TIMEOUT_SECONDS | int) (int .Values.shutdownMarginSeconds) }}
{{- end }}

{{- define "evaljoin.terminationGracePeriodSeconds" -}}
{{- $minimum := include "evaljoin.minimumGracePeriod" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $minimum }}
{{- else if lt (int .Values.terminationGracePeriodSeconds) $minimum }}
{{- fail (printf "terminationGracePeriodSeconds=%v is shorter than the shutdown needs: preStopSleepSeconds (%v) + config.SHUTDOWN_TIMEOUT_SECONDS (%v) + shutdownMarginSeconds (%v) = %v. Raise it, or leave it unset to have it derived." .Values.terminationGracePeriodSeconds .Values.preStopSleepSeconds .Values.config.SHUTDOWN_TIMEOUT_SECONDS .Values.shutdownMarginSeconds $minimum) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The partitions of both input topics together, or nothing when either count is unknown. The
consumer's assignor (round robin) deals out the partitions of both topics as one list, so this
many replicas can each hold one.
*/}}
{{- define "evaljoin.partitions" -}}
{{- $p := .Values.kafkaPartitions }}
{{- if and (not (kindIs "invalid" $p.spanTopic)) (not (kindIs "invalid" $p.resultTopic)) }}
{{- add (int $p.spanTopic) (int $p.resultTopic) }}
{{- end }}
{{- end }}

{{/* Autoscaling bounds, checked against the partition count. */}}
{{- define "evaljoin.maxReplicas" -}}
{{- $a := .Values.autoscaling }}
{{- $partitions := include "evaljoin.partitions" . }}
{{- if not $partitions }}
{{- fail "kafkaPartitions.spanTopic and kafkaPartitions.resultTopic are required with autoscaling.keda or autoscaling.hpa: autoscalers must not add replicas beyond the partitions of both topics together" }}
{{- end }}
{{- $partitions = int $partitions }}
{{- $max := int (default $partitions $a.maxReplicas) }}
{{- if gt $max $partitions }}
{{- fail (printf "autoscaling.maxReplicas=%d is above the %d partitions of both topics (kafkaPartitions): a replica past them holds no partition, and every replica added or removed rebalances the group" $max $partitions) }}
{{- end }}
{{- if lt $max (int $a.minReplicas) }}
{{- fail (printf "autoscaling.maxReplicas=%d is below autoscaling.minReplicas=%d" $max (int $a.minReplicas)) }}
{{- end }}
{{- $max }}
{{- end }}

{{- define "evaljoin.autoscaled" -}}
{{- if or .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}true{{ end }}
{{- end }}

{{/*
Checks across values that the schema cannot express, with the service's own rules (the service
would refuse to start with exit code 2) and what the chart needs to render its objects.
*/}}
{{- define "evaljoin.validate" -}}
{{- $c := .Values.config }}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled are both true: choose one autoscaler" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled .Values.podMonitor.enabled }}
{{- fail "serviceMonitor.enabled and podMonitor.enabled are both true: Prometheus would scrape each pod twice; choose one" }}
{{- end }}
{{- if has (toString $c.HEALTH_HOST) (list "127.0.0.1" "localhost" "::1") }}
{{- fail (printf "config.HEALTH_HOST=%s: the kubelet probes the pod's IP, so the health server must listen on it (0.0.0.0)" $c.HEALTH_HOST) }}
{{- end }}
{{- include "evaljoin.settingsRules" . }}
{{- $reserved := concat (keys .Values.config) (keys .Values.secrets) (list "KAFKA_GROUP_INSTANCE_ID" "EVALJOIN_SECRETS_DIR" "EVALJOIN_POD_NAMESPACE" "EVALJOIN_POD_NAME") }}
{{- range .Values.extraEnv }}
{{- if has (upper .name) $reserved }}
{{- fail (printf "extraEnv sets %s, a setting of the service: set it in config (or secrets) instead" .name) }}
{{- end }}
{{- end }}
{{- end }}
