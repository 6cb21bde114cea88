{{/*
What the consumer container reads, shared by the workload's pods and the `helm test` pod.

Every non-secret setting comes from the ConfigMap (envFrom); secrets are files in
EVALJOIN_SECRETS_DIR; the only variables set here are those whose value is the pod's own
(KAFKA_GROUP_INSTANCE_ID from the namespace and pod name, and the session timeout, DD_AGENT_HOST from the node's IP) and, with
self-tracing on, the unified service tags ddtrace reads (from the pod's labels).
*/}}
{{- define "evaljoin.containerEnv" -}}
{{- $c := .Values.config -}}
{{- $secretItems := include "evaljoin.secretItems" . | fromJson -}}
envFrom:
  - configMapRef:
      name: {{ include "evaljoin.fullname" . }}
{{- if or $secretItems (eq .Values.workload.kind "StatefulSet") (include "evaljoin.agentHostFromNode" .) $c.DD_TRACE_ENABLED .Values.extraEnv }}
env:
  {{- if $secretItems }}
  - name: EVALJOIN_SECRETS_DIR
    value: {{ .Values.secretsMountPath | quote }}
  {{- end }}
  {{- if eq .Values.workload.kind "StatefulSet" }}
  # Static membership: <namespace>-<pod name> is the member id, unique across releases sharing a group.
  - name: EVALJOIN_POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  - name: EVALJOIN_POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: KAFKA_GROUP_INSTANCE_ID
    value: "$(EVALJOIN_POD_NAMESPACE)-$(EVALJOIN_POD_NAME)"
  # How long the broker keeps a restarting member's partitions (over the ConfigMap's value).
  - name: KAFKA_SESSION_TIMEOUT_MS
    value: {{ .Values.workload.sessionTimeoutMs | int | quote }}
  {{- end }}
  {{- if include "evaljoin.agentHostFromNode" . }}
  # The Datadog Agent on this pod's node.
  - name: DD_AGENT_HOST
    valueFrom:
      fieldRef:
        fieldPath: status.hostIP
  {{- end }}
  {{- if $c.DD_TRACE_ENABLED }}
  # Read by ddtrace for the service's own traces: the pod's unified service tags.
  {{- range $tag := list "env" "service" "version" }}
  {{- if hasKey (include "evaljoin.datadogLabels" $ | fromYaml) (printf "tags.datadoghq.com/%s" $tag) }}
  - name: DD_{{ upper $tag }}
    valueFrom:
      fieldRef:
        fieldPath: metadata.labels['tags.datadoghq.com/{{ $tag }}']
  {{- end }}
  {{- end }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "evaljoin.volumeMounts" -}}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- if include "evaljoin.secretItems" . | fromJson }}
  - name: secrets
    mountPath: {{ .Values.secretsMountPath }}
    readOnly: true
  {{- end }}
  {{- if .Values.datadog.agentSocket.enabled }}
  # The Datadog Agent's sockets (APM and DogStatsD), as its admission controller's socket mode mounts them.
  - name: datadog-agent-socket
    mountPath: {{ .Values.datadog.agentSocket.hostPath }}
    readOnly: true
  {{- end }}
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{- define "evaljoin.volumes" -}}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: {{ .Values.tmpSizeLimit }}
  {{- $secretItems := include "evaljoin.secretItems" . | fromJson }}
  {{- if $secretItems }}
  - name: secrets
    secret:
      secretName: {{ include "evaljoin.secretName" . }}
      defaultMode: 0440
      items:
        {{- range $name, $key := $secretItems }}
        - key: {{ $key }}
          path: {{ $name }}
        {{- end }}
  {{- end }}
  {{- if .Values.datadog.agentSocket.enabled }}
  - name: datadog-agent-socket
    hostPath:
      path: {{ .Values.datadog.agentSocket.hostPath }}
      type: DirectoryOrCreate
  {{- end }}
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Scheduling and identity, shared by every pod of the chart. */}}
{{- define "evaljoin.podCommon" -}}
serviceAccountName: {{ include "evaljoin.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The pod template of the Deployment or the StatefulSet. */}}
{{- define "evaljoin.podTemplate" -}}
{{- $c := .Values.config -}}
{{- $container := include "evaljoin.name" . -}}
metadata:
  labels:
    {{- include "evaljoin.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/version: {{ include "evaljoin.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
    app.kubernetes.io/component: consumer
    {{- include "evaljoin.datadogLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Roll the pods when their settings change.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if and (include "evaljoin.secretItems" . | fromJson) (not .Values.existingSecret) }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- if .Values.datadog.autodiscovery.enabled }}
    # A Datadog Agent scrapes the same /metrics endpoint with its OpenMetrics check.
    ad.datadoghq.com/{{ $container }}.checks: |
      {{- $instance := dict "openmetrics_endpoint" (printf "http://%%%%host%%%%:%s/metrics" (include "evaljoin.settingValue" $c.HEALTH_PORT)) "namespace" .Values.datadog.autodiscovery.namespace "raw_metric_prefix" "evaljoin_" "metrics" (list ".*") }}
      {{- dict "openmetrics" (dict "init_config" (dict) "instances" (list $instance)) | toJson | nindent 6 }}
    ad.datadoghq.com/{{ $container }}.logs: |
      {{- list (dict "source" .Values.datadog.autodiscovery.logsSource "service" (include "evaljoin.datadogService" .)) | toJson | nindent 6 }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- include "evaljoin.podCommon" . | nindent 2 }}
  # SIGTERM starts the drain: stop fetching, finish the batch in flight (at most
  # SHUTDOWN_TIMEOUT_SECONDS), commit, close. The grace period covers the preStop hook, the drain
  # and the margin, so SIGKILL never cuts the drain short.
  terminationGracePeriodSeconds: {{ include "evaljoin.terminationGracePeriodSeconds" . }}
  containers:
    - name: {{ $container }}
      image: {{ include "evaljoin.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      ports:
        - name: http
          containerPort: {{ include "evaljoin.settingValue" $c.HEALTH_PORT }}
          protocol: TCP
      {{- include "evaljoin.containerEnv" . | nindent 6 }}
      # Liveness is the consume loop's progress, judged by the service against
      # LIVENESS_TIMEOUT_SECONDS; readiness is group membership and Redis.
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml .Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      {{- if gt (int .Values.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ int .Values.preStopSleepSeconds }}
      {{- end }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- include "evaljoin.volumeMounts" . | nindent 6 }}
  {{- include "evaljoin.volumes" . | nindent 2 }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range . }}
    - {{ toYaml (merge (dict) . (dict "labelSelector" (dict "matchLabels" (include "evaljoin.selectorLabels" $ | fromYaml)))) | nindent 6 | trim }}
    {{- end }}
  {{- end }}
{{- end }}
