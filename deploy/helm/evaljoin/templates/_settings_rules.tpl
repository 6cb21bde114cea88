{{/*
The service's own rules across settings (consumer/config.py: the model validators of KafkaSettings
and Settings, in their order, and the parsers they call), checked on what the pod will get: the
ConfigMap's settings and the secret files it mounts. A release that breaks one fails here with the
service's message, instead of a pod that exits with code 2 and restarts forever. The chart's tests
walk every rule (tests/chart-rules) and compare the message with the service's.

What the chart cannot see is not checked: the contents of an existing Secret (REDIS_URL from
`existingSecret` is unknown, so the rules about its user, password and scheme are the service's).
*/}}
{{- define "evaljoin.settingsRules" -}}
{{- $c := .Values.config }}
{{- $secrets := include "evaljoin.secretItems" . | fromJson }}
{{- $set := dict }}
{{- range $name, $value := $c }}{{ if include "evaljoin.isSet" $value }}{{ $_ := set $set $name true }}{{ end }}{{ end }}
{{- range $name, $_ := $secrets }}{{ $_ := set $set $name true }}{{ end }}
{{- $agentUrl := include "evaljoin.agentUrl" . }}
{{- if $agentUrl }}{{ $_ := set $set "DD_TRACE_AGENT_URL" true }}{{ end }}
{{- $protocol := toString $c.KAFKA_SECURITY_PROTOCOL }}
{{- $mechanism := ternary (toString $c.KAFKA_SASL_MECHANISM) "" (hasKey $set "KAFKA_SASL_MECHANISM") }}
{{- $sasl := hasPrefix "SASL_" $protocol }}

{{- /* KafkaSettings._kafka_auth_is_complete */}}
{{- if and $mechanism (not $sasl) }}
{{- fail (printf "KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL=%s: use SASL_SSL (or SASL_PLAINTEXT)" $protocol) }}
{{- end }}
{{- if and $sasl (not $mechanism) }}
{{- fail (printf "KAFKA_SECURITY_PROTOCOL=%s needs KAFKA_SASL_MECHANISM: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD), OAUTHBEARER or AWS_MSK_IAM" $protocol) }}
{{- end }}
{{- if $mechanism }}
{{- $settings := list (list "password" (list "KAFKA_SASL_USERNAME" "KAFKA_SASL_PASSWORD")) (list "OAUTHBEARER" (list "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL" "KAFKA_SASL_OAUTHBEARER_CLIENT_ID" "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET" "KAFKA_SASL_OAUTHBEARER_SCOPE" "KAFKA_SASL_OAUTHBEARER_EXTENSIONS")) (list "AWS_MSK_IAM" (list "KAFKA_SASL_AWS_REGION")) }}
{{- $required := dict "password" (list "KAFKA_SASL_USERNAME" "KAFKA_SASL_PASSWORD") "OAUTHBEARER" (list "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL" "KAFKA_SASL_OAUTHBEARER_CLIENT_ID" "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET") "AWS_MSK_IAM" (list) }}
{{- $kind := ternary "password" $mechanism (has $mechanism (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512")) }}
{{- $missing := list }}
{{- range get $required $kind }}{{ if not (hasKey $set .) }}{{ $missing = append $missing . }}{{ end }}{{ end }}
{{- if $missing }}
{{- fail (printf "KAFKA_SASL_MECHANISM=%s needs %s" $mechanism (join " and " $missing)) }}
{{- end }}
{{- $stray := list }}
{{- range $settings }}{{ if ne (index . 0) $kind }}{{ range index . 1 }}{{ if hasKey $set . }}{{ $stray = append $stray . }}{{ end }}{{ end }}{{ end }}{{ end }}
{{- if $stray }}
{{- $one := eq (len $stray) 1 }}
{{- fail (printf "%s %s not read with KAFKA_SASL_MECHANISM=%s: unset %s" (join ", " $stray) (ternary "is" "are" $one) $mechanism (ternary "it" "them" $one)) }}
{{- end }}
{{- end }}
{{- if hasKey $set "KAFKA_SASL_OAUTHBEARER_EXTENSIONS" }}
{{- /* consumer.kafka_auth.parse_extensions */}}
{{- $seen := dict }}
{{- range splitList "," (toString $c.KAFKA_SASL_OAUTHBEARER_EXTENSIONS) }}
{{- $pair := trim . }}
{{- $key := index (splitList "=" $pair) 0 }}
{{- $value := trimPrefix (printf "%s=" $key) $pair }}
{{- if or (not (contains "=" $pair)) (not (regexMatch "^[A-Za-z]+$" $key)) (not (regexMatch "^[\\x21-\\x7E \\t\\r\\n]+$" $value)) }}
{{- fail (printf "KAFKA_SASL_OAUTHBEARER_EXTENSIONS entry %s is not key=value (a key of letters, a value of printable ASCII)" (squote $pair)) }}
{{- end }}
{{- if eq $key "auth" }}
{{- fail "KAFKA_SASL_OAUTHBEARER_EXTENSIONS may not set 'auth': it carries the token" }}
{{- end }}
{{- if hasKey $seen $key }}
{{- fail (printf "KAFKA_SASL_OAUTHBEARER_EXTENSIONS names %s twice" (squote $key)) }}
{{- end }}
{{- $_ := set $seen $key true }}
{{- end }}
{{- end }}
{{- if eq $mechanism "AWS_MSK_IAM" }}
{{- if ne $protocol "SASL_SSL" }}
{{- fail "KAFKA_SASL_MECHANISM=AWS_MSK_IAM needs KAFKA_SECURITY_PROTOCOL=SASL_SSL (MSK's IAM listener, port 9098 or 9198, takes TLS only)" }}
{{- end }}
{{- if not (include "evaljoin.awsRegion" .) }}
{{- fail "KAFKA_SASL_MECHANISM=AWS_MSK_IAM needs KAFKA_SASL_AWS_REGION (the broker names are not MSK's *.kafka.<region>.amazonaws.com, which would give it)" }}
{{- end }}
{{- end }}

{{- /* KafkaSettings._kafka_tls_is_complete */}}
{{- $tlsGiven := list }}
{{- range list "KAFKA_SSL_CAFILE" "KAFKA_SSL_CERTFILE" "KAFKA_SSL_KEYFILE" "KAFKA_SSL_KEY_PASSWORD" }}{{ if hasKey $set . }}{{ $tlsGiven = append $tlsGiven . }}{{ end }}{{ end }}
{{- if and $tlsGiven (not (has $protocol (list "SSL" "SASL_SSL"))) }}
{{- fail (printf "%s set but KAFKA_SECURITY_PROTOCOL=%s: use SSL (or SASL_SSL)" (join ", " $tlsGiven) $protocol) }}
{{- end }}
{{- if and (hasKey $set "KAFKA_SSL_KEYFILE") (not (hasKey $set "KAFKA_SSL_CERTFILE")) }}
{{- fail "KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE, the client certificate it belongs to" }}
{{- end }}
{{- if and (hasKey $set "KAFKA_SSL_KEY_PASSWORD") (not (hasKey $set "KAFKA_SSL_CERTFILE")) }}
{{- fail "KAFKA_SSL_KEY_PASSWORD needs KAFKA_SSL_CERTFILE (and KAFKA_SSL_KEYFILE unless the key is in the certificate file)" }}
{{- end }}

{{- /* Settings._kafka_group_timings_fit; a StatefulSet's pods get workload.sessionTimeoutMs. */}}
{{- $statefulset := eq .Values.workload.kind "StatefulSet" }}
{{- $session := ternary .Values.workload.sessionTimeoutMs $c.KAFKA_SESSION_TIMEOUT_MS $statefulset }}
{{- if gt (mul 3 (int $c.KAFKA_HEARTBEAT_INTERVAL_MS)) (int $session) }}
{{- fail (printf "KAFKA_HEARTBEAT_INTERVAL_MS (%d) must be at most a third of KAFKA_SESSION_TIMEOUT_MS (%d), so that a member misses three heartbeats before the broker drops it; the session timeout itself must lie within the broker's group.min.session.timeout.ms and group.max.session.timeout.ms (6000 and 1800000 unless the broker sets others) [the pods' KAFKA_SESSION_TIMEOUT_MS is %s]" (int $c.KAFKA_HEARTBEAT_INTERVAL_MS) (int $session) (ternary "workload.sessionTimeoutMs, for a StatefulSet" "config.KAFKA_SESSION_TIMEOUT_MS" $statefulset)) }}
{{- end }}

{{- /* Settings._delivery_is_possible */}}
{{- if and $c.DD_AGENTLESS_ENABLED (not (hasKey $set "DD_API_KEY")) }}
{{- fail "DD_AGENTLESS_ENABLED=true needs DD_API_KEY (agentless delivery posts to Datadog with it): set DD_API_KEY, or unset DD_AGENTLESS_ENABLED to deliver through the Agent [secrets.DD_API_KEY, or existingSecret with existingSecretKeys.DD_API_KEY]" }}
{{- end }}
{{- if and $c.DD_LLMOBS_AGENTLESS_ENABLED (not (hasKey $set "DD_API_KEY")) }}
{{- fail "DD_LLMOBS_AGENTLESS_ENABLED=true needs DD_API_KEY (agentless delivery posts to Datadog with it): set DD_API_KEY, or unset DD_LLMOBS_AGENTLESS_ENABLED [secrets.DD_API_KEY, or existingSecret with existingSecretKeys.DD_API_KEY]" }}
{{- end }}
{{- range $check := list (list "DD_TRACE_AGENT_URL" $agentUrl) (list "DD_LLMOBS_OVERRIDE_ORIGIN" (ternary (toString $c.DD_LLMOBS_OVERRIDE_ORIGIN) "" (hasKey $set "DD_LLMOBS_OVERRIDE_ORIGIN"))) }}
{{- $name := index $check 0 }}
{{- $url := index $check 1 }}
{{- if $url }}
{{- $scheme := regexFind "^[A-Za-z][A-Za-z0-9+.-]*:" $url | trimSuffix ":" | lower }}
{{- $rest := ternary (trimPrefix (printf "%s:" (regexFind "^[A-Za-z][A-Za-z0-9+.-]*" $url)) $url) $url (ne $scheme "") }}
{{- $authority := ternary (regexFind "^//[^/?#]*" $rest | trimPrefix "//") "" (hasPrefix "//" $rest) }}
{{- $path := regexReplaceAll "[?#].*$" (ternary (trimPrefix (printf "//%s" $authority) $rest) $rest (hasPrefix "//" $rest)) "" }}
{{- $hostport := regexReplaceAll "^.*@" $authority "" }}
{{- $hostname := ternary (regexReplaceAll "^\\[([^\\]]*)\\].*$" $hostport "${1}") (regexReplaceAll ":[^:]*$" $hostport "") (hasPrefix "[" $hostport) }}
{{- if not (has $scheme (list "http" "https" "unix")) }}
{{- fail (printf "%s=%s: the scheme must be http, https or unix (unix:///var/run/datadog/apm.socket)" $name (squote $url)) }}
{{- end }}
{{- if and (eq $scheme "unix") (not $path) }}
{{- fail (printf "%s=%s names no socket: write unix:///path/to/apm.socket (three slashes)" $name (squote $url)) }}
{{- end }}
{{- if and (ne $scheme "unix") (not $hostname) }}
{{- fail (printf "%s=%s names no host" $name (squote $url)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if le (float64 $c.CLAIM_LEASE_SECONDS) (float64 $c.INTAKE_TIMEOUT_SECONDS) }}
{{- fail (printf "CLAIM_LEASE_SECONDS must exceed INTAKE_TIMEOUT_SECONDS [config.CLAIM_LEASE_SECONDS=%v, config.INTAKE_TIMEOUT_SECONDS=%v]" $c.CLAIM_LEASE_SECONDS $c.INTAKE_TIMEOUT_SECONDS) }}
{{- end }}

{{- /* Settings._redis_auth_is_unambiguous, on REDIS_URL when the chart knows it (its own Secret, or the default). */}}
{{- $sentinels := hasKey $set "REDIS_SENTINELS" }}
{{- $redisUrlKnown := or (not .Values.existingSecret) (not (hasKey $secrets "REDIS_URL")) }}
{{- $redisUrl := ternary .Values.secrets.REDIS_URL "" (not .Values.existingSecret) | default "redis://127.0.0.1:6379/0" }}
{{- $redisUserinfo := ternary (regexReplaceAll "^[^:/?#]*://" (regexFind "^[^:/?#]*://[^@/?#]*@" $redisUrl) "" | trimSuffix "@") "" $redisUrlKnown }}
{{- if and $redisUrlKnown (hasKey $set "REDIS_PASSWORD") (regexMatch ":." $redisUserinfo) }}
{{- fail "REDIS_PASSWORD is set and REDIS_URL has a password too: give it in one place" }}
{{- end }}
{{- if and $redisUrlKnown (hasKey $set "REDIS_USERNAME") (regexMatch "^[^:]" $redisUserinfo) }}
{{- fail "REDIS_USERNAME is set and REDIS_URL has a user name too: give it in one place" }}
{{- end }}
{{- if hasKey $set "REDIS_SSL_CAFILE" }}
{{- if and $sentinels (not $c.REDIS_SENTINEL_TLS) }}
{{- fail "REDIS_SSL_CAFILE is set but REDIS_SENTINEL_TLS is false: set REDIS_SENTINEL_TLS=true" }}
{{- else if and (not $sentinels) $redisUrlKnown (not (hasPrefix "rediss:" (lower $redisUrl))) }}
{{- fail "REDIS_SSL_CAFILE is set but REDIS_URL does not use TLS: use rediss://" }}
{{- end }}
{{- end }}

{{- /* Settings._redis_wait_fits_the_socket_timeout, on REDIS_URL when the chart knows it. */}}
{{- if and $redisUrlKnown (gt (int64 ($c.REDIS_WAIT_REPLICAS | default 0)) 0) }}
{{- range regexFindAll "[?&]socket_timeout=[^&#]*" $redisUrl -1 }}
{{- $seconds := regexReplaceAll "^[?&]socket_timeout=" . "" }}
{{- if and (regexMatch "^[0-9]+([.][0-9]*)?$" $seconds) (le (mulf (float64 $seconds) 1000.0) (float64 $c.REDIS_WAIT_TIMEOUT_MS)) }}
{{- fail (printf "REDIS_WAIT_TIMEOUT_MS (%v) must be below the socket_timeout in REDIS_URL, which would cut every WAIT that waits" $c.REDIS_WAIT_TIMEOUT_MS) }}
{{- end }}
{{- end }}
{{- end }}

{{- /* Settings._redis_sentinel_is_complete, with consumer.config.parse_sentinels */}}
{{- if not $sentinels }}
{{- $given := list }}
{{- range list "REDIS_SENTINEL_MASTER" "REDIS_SENTINEL_USERNAME" "REDIS_SENTINEL_PASSWORD" }}{{ if hasKey $set . }}{{ $given = append $given . }}{{ end }}{{ end }}
{{- if $c.REDIS_SENTINEL_TLS }}{{ $given = append $given "REDIS_SENTINEL_TLS" }}{{ end }}
{{- if $given }}
{{- fail (printf "%s without REDIS_SENTINELS: name the sentinels too (host:port,host:port)" (join ", " $given)) }}
{{- end }}
{{- else }}
{{- $text := toString $c.REDIS_SENTINELS }}
{{- $addresses := list }}
{{- range splitList "," $text }}
{{- $entry := trim . }}
{{- if not $entry }}
{{- fail (printf "REDIS_SENTINELS has an empty entry in %s: host:port,host:port" (squote $text)) }}
{{- end }}
{{- $host := "" }}
{{- $port := "" }}
{{- $hasPort := false }}
{{- if hasPrefix "[" $entry }}
{{- if not (regexMatch "^\\[[^\\]]*\\](:.*)?$" $entry) }}
{{- fail (printf "REDIS_SENTINELS entry %s is not [address]:port" (squote $entry)) }}
{{- end }}
{{- $host = regexReplaceAll "^\\[([^\\]]*)\\].*$" $entry "${1}" }}
{{- $hasPort = regexMatch "^\\[[^\\]]*\\]:" $entry }}
{{- $port = regexReplaceAll "^\\[[^\\]]*\\]:?" $entry "" }}
{{- else if gt (len (splitList ":" $entry)) 2 }}
{{- fail (printf "REDIS_SENTINELS entry %s: write an IPv6 address in brackets, [address]:port" (squote $entry)) }}
{{- else }}
{{- $host = index (splitList ":" $entry) 0 }}
{{- $hasPort = contains ":" $entry }}
{{- if $hasPort }}{{ $port = index (splitList ":" $entry) 1 }}{{ end }}
{{- end }}
{{- if or (not $host) (regexMatch "\\s" $host) }}
{{- fail (printf "REDIS_SENTINELS entry %s is not host:port" (squote $entry)) }}
{{- end }}
{{- if not $hasPort }}
{{- $port = "26379" }}
{{- else if not (and (regexMatch "^[0-9]+$" $port) (ge (atoi $port) 1) (le (atoi $port) 65535)) }}
{{- fail (printf "REDIS_SENTINELS entry %s: the port must be a number from 1 to 65535" (squote $entry)) }}
{{- end }}
{{- $address := printf "%s %d" $host (atoi $port) }}
{{- if has $address $addresses }}
{{- fail (printf "REDIS_SENTINELS names a sentinel twice: %s" (squote $text)) }}
{{- end }}
{{- $addresses = append $addresses $address }}
{{- end }}
{{- if not (hasKey $set "REDIS_SENTINEL_MASTER") }}
{{- fail "REDIS_SENTINELS needs REDIS_SENTINEL_MASTER, the name the sentinels monitor the primary by (their `sentinel monitor <name> ...`)" }}
{{- end }}
{{- if $c.REDIS_CLUSTER }}
{{- fail "REDIS_SENTINELS and REDIS_CLUSTER=true exclude each other: Sentinel watches one primary and its replicas, a Redis Cluster is reached through REDIS_URL" }}
{{- end }}
{{- if hasKey $secrets "REDIS_URL" }}
{{- fail "REDIS_SENTINELS and REDIS_URL exclude each other: the sentinels name the primary; unset REDIS_URL (the primary's user and password are REDIS_USERNAME and REDIS_PASSWORD)" }}
{{- end }}
{{- if and (hasKey $set "REDIS_SENTINEL_USERNAME") (not (hasKey $set "REDIS_SENTINEL_PASSWORD")) }}
{{- fail "REDIS_SENTINEL_USERNAME needs REDIS_SENTINEL_PASSWORD" }}
{{- end }}
{{- end }}
{{- end }}
