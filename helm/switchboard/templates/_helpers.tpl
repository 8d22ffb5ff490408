{{/* Names ---------------------------------------------------------------- */}}

{{- define "switchboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchboard.fullname" -}}
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

{{/* "<fullname>-<component>", kept within 63 characters. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "switchboard.componentName" -}}
{{- printf "%s-%s" (include "switchboard.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" }}
{{- end }}

{{- define "switchboard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchboard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "switchboard.secretName" -}}
{{- include "switchboard.fullname" . }}
{{- end }}

{{/* Labels --------------------------------------------------------------- */}}

{{- define "switchboard.labels" -}}
helm.sh/chart: {{ include "switchboard.chart" . }}
app.kubernetes.io/name: {{ include "switchboard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchboard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Call with (dict "root" $ "component" "gateway"). */}}
{{- define "switchboard.componentLabels" -}}
{{ include "switchboard.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "switchboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchboard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "switchboard.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Images --------------------------------------------------------------- */}}

{{/* Call with (dict "root" $ "c" .Values.gateway). */}}
{{- define "switchboard.image" -}}
{{- $tag := .c.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.registry -}}
{{ printf "%s/%s:%v" .root.Values.image.registry .c.image.repository $tag }}
{{- else -}}
{{ printf "%s:%v" .c.image.repository $tag }}
{{- end -}}
{{- end }}

{{/* Settings ------------------------------------------------------------- */}}

{{/* A settings value as its env string: integers without exponent, bools as
     true/false. */}}
{{- define "switchboard.envValue" -}}
{{- if kindIs "float64" . -}}
{{- . | int64 | toString -}}
{{- else -}}
{{- . | toString -}}
{{- end -}}
{{- end }}

{{/* SB_ name of a settings key: maxMessageBytes -> SB_MAX_MESSAGE_BYTES. */}}
{{- define "switchboard.envName" -}}
{{- printf "SB_%s" (snakecase . | upper) -}}
{{- end }}

{{/* Effective JetStream replicas. */}}
{{- define "switchboard.jetstreamReplicas" -}}
{{- if not (kindIs "invalid" .Values.jetstream.replicas) -}}
{{- .Values.jetstream.replicas | int -}}
{{- else if and .Values.nats.enabled .Values.nats.config.cluster.enabled -}}
{{- min 3 (.Values.nats.config.cluster.replicas | int) -}}
{{- else -}}
1
{{- end -}}
{{- end }}

{{/* Effective gateway drain window (the gateway's default is 10 s). */}}
{{- define "switchboard.drainSecs" -}}
{{- if kindIs "invalid" .Values.gateway.config.drainSecs }}10{{ else }}{{ .Values.gateway.config.drainSecs | int }}{{ end -}}
{{- end }}

{{/* Effective worker shutdown grace (the worker's default is 25 s). */}}
{{- define "switchboard.shutdownGraceSecs" -}}
{{- if kindIs "invalid" .Values.worker.config.shutdownGraceSecs }}25{{ else }}{{ .Values.worker.config.shutdownGraceSecs | int }}{{ end -}}
{{- end }}

{{/* Where NATS and Redis come from. */}}
{{- define "switchboard.natsServiceHost" -}}
{{- $name := "nats" -}}
{{- if .Values.nats.fullnameOverride -}}
{{- .Values.nats.fullnameOverride -}}
{{- else if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{- define "switchboard.redisFullname" -}}
{{- $name := "redis" -}}
{{- if .Values.redis.fullnameOverride -}}
{{- .Values.redis.fullnameOverride -}}
{{- else if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/* JWT key file path inside the gateway container, or empty. */}}
{{- define "switchboard.jwtKeyFile" -}}
{{- if eq .Values.jwt.keySource "publicKey" -}}
/etc/switchboard/jwt/public.pem
{{- else if eq .Values.jwt.keySource "jwks" -}}
/etc/switchboard/jwt/jwks.json
{{- end -}}
{{- end }}

{{- define "switchboard.jwtKeysName" -}}
{{- if .Values.jwt.existingKeys.name -}}
{{- .Values.jwt.existingKeys.name -}}
{{- else -}}
{{- include "switchboard.componentName" (dict "root" . "component" "jwt-keys") -}}
{{- end -}}
{{- end }}

{{/* Whether the chart's Secret holds a given key. */}}
{{- define "switchboard.chartSecretHas" -}}
{{- $v := .root.Values -}}
{{- if eq .key "jwt-secret" -}}
{{- if and (eq $v.jwt.keySource "secret") (not $v.secrets.existingSecret) }}true{{ end -}}
{{- else if eq .key "api-key" -}}
{{- if and $v.secrets.apiKey (not $v.secrets.existingSecret) }}true{{ end -}}
{{- else if eq .key "llm-api-key" -}}
{{- if and $v.secrets.llmApiKey (not $v.secrets.existingSecret) }}true{{ end -}}
{{- else if eq .key "backend-token" -}}
{{- if and $v.secrets.backendToken (not $v.secrets.existingSecret) }}true{{ end -}}
{{- else if eq .key "nats-url" -}}
{{- if and (not $v.nats.enabled) (not $v.externalNats.existingSecret) }}true{{ end -}}
{{- else if eq .key "redis-url" -}}
{{- if and (not $v.redis.enabled) (not $v.externalRedis.existingSecret) }}true{{ end -}}
{{- end -}}
{{- end }}

{{/* An env entry reading a credential: from secrets.existingSecret (optional keys
     marked optional) or from the chart's Secret when it holds the key.
     Call with (dict "root" $ "env" "SB_API_KEY" "key" "api-key" "existingKey" "apiKey" "optional" true). */}}
{{- define "switchboard.secretEnv" -}}
{{- $v := .root.Values -}}
{{- if $v.secrets.existingSecret }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.secrets.existingSecret }}
      key: {{ index $v.secrets.keys .existingKey }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- else if include "switchboard.chartSecretHas" . }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "switchboard.secretName" .root }}
      key: {{ .key }}
{{- end }}
{{- end }}

{{/* SB_NATS_URL, SB_REDIS_URL and SB_REDIS_CLUSTER entries, shared by gateway and
     worker. */}}
{{- define "switchboard.connectionEnv" -}}
{{- $v := .Values -}}
{{- if $v.nats.enabled }}
- name: SB_NATS_URL
  value: {{ printf "nats://%s:4222" (include "switchboard.natsServiceHost" .) | quote }}
{{- else }}
- name: SB_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.externalNats.existingSecret | default (include "switchboard.secretName" .) }}
      key: {{ ternary $v.externalNats.existingSecretKey "nats-url" (not (empty $v.externalNats.existingSecret)) }}
{{- end }}
{{- if $v.redis.enabled }}
{{- $host := printf "%s-master" (include "switchboard.redisFullname" .) }}
{{- if $v.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.auth.existingSecret | default (include "switchboard.redisFullname" .) }}
      key: {{ $v.redis.auth.existingSecretPasswordKey | default "redis-password" }}
- name: SB_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379" $host | quote }}
{{- else }}
- name: SB_REDIS_URL
  value: {{ printf "redis://%s:6379" $host | quote }}
{{- end }}
{{- else }}
- name: SB_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.externalRedis.existingSecret | default (include "switchboard.secretName" .) }}
      key: {{ ternary $v.externalRedis.existingSecretKey "redis-url" (not (empty $v.externalRedis.existingSecret)) }}
{{- if $v.externalRedis.cluster }}
- name: SB_REDIS_CLUSTER
  value: "true"
{{- end }}
{{- end }}
{{- end }}

{{/* Scheduling: affinity (anti-affinity preset unless given) and spread.
     Call with (dict "root" $ "c" .Values.gateway "component" "gateway"). */}}
{{- define "switchboard.scheduling" -}}
{{- $sel := include "switchboard.selectorLabels" (dict "root" .root "component" .component) | fromYaml -}}
{{- if .c.affinity }}
affinity:
  {{- toYaml .c.affinity | nindent 2 }}
{{- else if eq .c.podAntiAffinity "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- toYaml $sel | nindent 14 }}
{{- else if eq .c.podAntiAffinity "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- toYaml $sel | nindent 12 }}
{{- end }}
{{- if .c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml .c.topologySpreadConstraints | nindent 2 }}
{{- else if .c.defaultTopologySpread.enabled }}
topologySpreadConstraints:
  {{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
  - maxSkew: {{ $.c.defaultTopologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $.c.defaultTopologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- toYaml $sel | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
  {{- end }}
{{- end }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by both Deployments. */}}
{{- define "switchboard.podCommon" -}}
serviceAccountName: {{ include "switchboard.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
