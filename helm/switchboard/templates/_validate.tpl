{{/*
Consistency checks the schema cannot express. Each failure stops rendering (install,
upgrade, template) with a message naming the values involved. Included once from
validate.yaml.
*/}}
{{- define "switchboard.validate" -}}
{{- $v := .Values -}}

{{/* Drain: the kubelet SIGKILLs at terminationGracePeriodSeconds, counted from the
     start of preStop. After the drain window the gateway takes up to 8 s more (5 s of
     final close handshakes, drain::FINISH_GRACE, then 3 s to flush NATS and clean
     Redis, SHUTDOWN_CLEANUP_TIMEOUT); we keep 5 s of margin on top. */}}
{{- $preStop := $v.gateway.preStop.sleepSeconds | int -}}
{{- $drain := include "switchboard.drainSecs" . | int -}}
{{- $gwNeed := add $preStop $drain 13 -}}
{{- $gwGrace := $v.gateway.terminationGracePeriodSeconds | int -}}
{{- if lt $gwGrace $gwNeed -}}
{{- fail (printf "\n\ndrain: gateway.terminationGracePeriodSeconds (%d) must be at least gateway.preStop.sleepSeconds (%d) + gateway.config.drainSecs (%d) + 13 (up to 8 s of final close handshakes and clean-up after the drain window + 5 s margin) = %d; otherwise Kubernetes kills the gateway mid-drain and its remaining clients lose their sockets without a reconnect frame." $gwGrace $preStop $drain $gwNeed) -}}
{{- end -}}

{{/* Worker: SIGTERM may find it inside a JetStream call (up to 5 s,
     bus::JETSTREAM_TIMEOUT, e.g. re-creating the consumer while NATS is away); then
     in-flight requests get the shutdown grace, the rest 2 s to be handed back
     (consume::ABANDON_TIMEOUT), then 3 s of clean-up (SHUTDOWN_CLEANUP_TIMEOUT); we
     keep 5 s of margin on top. */}}
{{- if $v.worker.enabled -}}
{{- $grace := include "switchboard.shutdownGraceSecs" . | int -}}
{{- $wNeed := add $grace 15 -}}
{{- $wGrace := $v.worker.terminationGracePeriodSeconds | int -}}
{{- if lt $wGrace $wNeed -}}
{{- fail (printf "\n\ndrain: worker.terminationGracePeriodSeconds (%d) must be at least worker.config.shutdownGraceSecs (%d) + 15 (up to 10 s of JetStream calls, hand-back and clean-up around it + 5 s margin) = %d; otherwise Kubernetes kills the worker while it is still finishing or handing back LLM streams." $wGrace $grace $wNeed) -}}
{{- end -}}
{{- end -}}

{{/* JWT key source. */}}
{{- if eq $v.jwt.keySource "publicKey" -}}
{{- if and (not $v.jwt.publicKey) (not $v.jwt.existingKeys.name) -}}
{{- fail "\n\njwt: keySource is publicKey: set jwt.publicKey (PEM) or jwt.existingKeys.name" -}}
{{- end -}}
{{- else if eq $v.jwt.keySource "jwks" -}}
{{- if and (not $v.jwt.jwks) (not $v.jwt.existingKeys.name) -}}
{{- fail "\n\njwt: keySource is jwks: set jwt.jwks (JSON) or jwt.existingKeys.name" -}}
{{- end -}}
{{- else -}}
{{- if or $v.jwt.publicKey $v.jwt.jwks $v.jwt.existingKeys.name -}}
{{- fail "\n\njwt: jwt.publicKey, jwt.jwks and jwt.existingKeys are only read with jwt.keySource publicKey or jwks; the gateway accepts exactly one key source" -}}
{{- end -}}
{{- if and $v.secrets.jwtSecret (lt (len $v.secrets.jwtSecret) 32) -}}
{{- fail "\n\nsecrets.jwtSecret: must be at least 32 bytes (the gateway refuses shorter HS256 secrets)" -}}
{{- end -}}
{{- end -}}
{{- if and $v.secrets.jwtSecret (ne $v.jwt.keySource "secret") -}}
{{- fail "\n\nsecrets.jwtSecret is set but jwt.keySource is not secret; the gateway accepts exactly one key source" -}}
{{- end -}}

{{/* Credentials come from values or from an existing Secret, not both. */}}
{{- if $v.secrets.existingSecret -}}
{{- range $k := list "jwtSecret" "apiKey" "llmApiKey" "backendToken" -}}
{{- if index $v.secrets $k -}}
{{- fail (printf "\n\nsecrets.%s is set but secrets.existingSecret (%s) is used for every credential: put the value in that Secret (key %s) or drop existingSecret" $k $v.secrets.existingSecret (index $v.secrets.keys $k)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Proxies in front of the sockets must outlive the gateway's ping interval. */}}
{{- $ping := 25 -}}
{{- if not (kindIs "invalid" $v.gateway.config.pingIntervalSecs) -}}{{- $ping = $v.gateway.config.pingIntervalSecs | int -}}{{- end -}}
{{- if and $v.ingress.enabled (gt ($v.ingress.websocketTimeoutSeconds | int) 0) (le ($v.ingress.websocketTimeoutSeconds | int) $ping) -}}
{{- fail (printf "\n\ningress.websocketTimeoutSeconds (%d) must exceed gateway.config.pingIntervalSecs (%d): the proxy would cut idle sockets between two pings" ($v.ingress.websocketTimeoutSeconds | int) $ping) -}}
{{- end -}}

{{/* Disruption budgets that would block every voluntary eviction. */}}
{{- range $c := list "gateway" "worker" -}}
{{- $cv := index $v $c -}}
{{- if and $cv.pdb.enabled (not (kindIs "invalid" $cv.pdb.minAvailable)) (not (kindIs "invalid" $cv.pdb.maxUnavailable)) -}}
{{- fail (printf "\n\n%s.pdb: set only one of maxUnavailable and minAvailable (set the other to null)" $c) -}}
{{- end -}}
{{- if and $cv.pdb.enabled (not (kindIs "invalid" $cv.pdb.minAvailable)) (not (kindIs "string" $cv.pdb.minAvailable)) -}}
{{- $min := $cv.replicaCount | int -}}
{{- if $cv.autoscaling.enabled -}}{{- $min = $cv.autoscaling.minReplicas | int -}}{{- end -}}
{{- if ge ($cv.pdb.minAvailable | int) $min -}}
{{- fail (printf "\n\n%s.pdb.minAvailable (%d) must be below the replica count (%d): otherwise no pod can ever be evicted and node drains hang" $c ($cv.pdb.minAvailable | int) $min) -}}
{{- end -}}
{{- end -}}
{{- if $cv.autoscaling.enabled -}}
{{- $custom := or (and (eq $c "gateway") $cv.autoscaling.connections.enabled) (and (eq $c "worker") $cv.autoscaling.inFlight.enabled) -}}
{{- if not (or $cv.autoscaling.targetCPUUtilizationPercentage $cv.autoscaling.targetMemoryUtilizationPercentage $custom) -}}
{{- fail (printf "\n\n%s.autoscaling is enabled without any metric: set a CPU or memory target or enable the custom metric" $c) -}}
{{- end -}}
{{- end -}}
{{- if and $cv.autoscaling.enabled (gt ($cv.autoscaling.minReplicas | int) ($cv.autoscaling.maxReplicas | int)) -}}
{{- fail (printf "\n\n%s.autoscaling.minReplicas (%d) exceeds maxReplicas (%d)" $c ($cv.autoscaling.minReplicas | int) ($cv.autoscaling.maxReplicas | int)) -}}
{{- end -}}
{{- end -}}
{{- if and $v.gateway.autoscaling.enabled $v.gateway.autoscaling.connections.enabled (not (kindIs "invalid" $v.gateway.config.maxConnections)) -}}
{{- if ge ($v.gateway.autoscaling.connections.targetAverageValue | int) ($v.gateway.config.maxConnections | int) -}}
{{- fail (printf "\n\ngateway.autoscaling.connections.targetAverageValue (%d) must be below gateway.config.maxConnections (%d): pods would refuse connections (1013) before the autoscaler adds any" ($v.gateway.autoscaling.connections.targetAverageValue | int) ($v.gateway.config.maxConnections | int)) -}}
{{- end -}}
{{- end -}}

{{- if and $v.worker.enabled $v.worker.autoscaling.enabled $v.worker.autoscaling.inFlight.enabled -}}
{{- $max := 64 -}}
{{- if not (kindIs "invalid" $v.worker.config.maxInFlight) -}}{{- $max = $v.worker.config.maxInFlight | int -}}{{- end -}}
{{- if ge ($v.worker.autoscaling.inFlight.targetAverageValue | int) $max -}}
{{- fail (printf "\n\nworker.autoscaling.inFlight.targetAverageValue (%d) must be below worker.config.maxInFlight (%d): requests would queue before the autoscaler adds workers" ($v.worker.autoscaling.inFlight.targetAverageValue | int) $max) -}}
{{- end -}}
{{- end -}}

{{/* JetStream replicas versus the bundled NATS cluster. */}}
{{- if $v.nats.enabled -}}
{{- $servers := 1 -}}
{{- if $v.nats.config.cluster.enabled -}}{{- $servers = $v.nats.config.cluster.replicas | int -}}{{- end -}}
{{- $js := include "switchboard.jetstreamReplicas" . | int -}}
{{- if gt $js $servers -}}
{{- fail (printf "\n\njetstream.replicas (%d) exceeds the bundled NATS servers (%d): the chat stream could not be created" $js $servers) -}}
{{- end -}}
{{- if not $v.nats.config.jetstream.enabled -}}
{{- fail "\n\nnats.config.jetstream.enabled must be true: chat requests go through a JetStream work queue" -}}
{{- end -}}
{{- end -}}
{{/* Redis Cluster versus one server: caught here rather than by a crash-looping pod. */}}
{{- if and $v.redis.enabled $v.externalRedis.cluster -}}
{{- fail "\n\nexternalRedis.cluster is true but redis.enabled installs a standalone Redis: turn one off" -}}
{{- end -}}
{{- if and (not $v.redis.enabled) (not $v.externalRedis.existingSecret) (not $v.externalRedis.cluster) (contains "," ($v.externalRedis.url | default "")) -}}
{{- fail "\n\nexternalRedis.url lists several servers: set externalRedis.cluster: true for a Redis Cluster (a single Redis takes one URL)" -}}
{{- end -}}
{{- if and $v.httpRoute.enabled (not $v.httpRoute.parentRefs) -}}
{{- fail "\n\nhttpRoute.parentRefs: name at least one Gateway to attach the route to" -}}
{{- end -}}
{{- end }}
