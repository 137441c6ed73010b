{{/*
Names, labels and values lookups shared by every component.

Component templates are called with a context dict:
  root: the chart's root context ($)
  name: the component's Kubernetes name (gateway, leads, accounts, sales, service-desk, analytics)
  key:  the component's key in values (gateway, leads, accounts, sales, serviceDesk, analytics)
*/}}

{{- define "crm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "crm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The gRPC services, in a fixed order: Kubernetes name -> values key. */}}
{{- define "crm.services" -}}
leads: leads
accounts: accounts
sales: sales
service-desk: serviceDesk
analytics: analytics
{{- end -}}

{{/* The components allowed to call a gRPC service: the gateway and the services listing it in `upstreams`. */}}
{{- define "crm.service.callers" -}}
{{- $callers := list "gateway" -}}
{{- range $name, $key := include "crm.services" .root | fromYaml -}}
{{- if has $.name (index $.root.Values $key).upstreams -}}
{{- $callers = append $callers $name -}}
{{- end -}}
{{- end -}}
{{- toJson $callers -}}
{{- end -}}

{{/* `<fullname>-<component>`: the name of the component's Deployment, Service, HPA, PDB, ... */}}
{{- define "crm.component.fullname" -}}
{{- printf "%s-%s" (include "crm.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* CRM_<COMPONENT>_: the prefix of the component's settings (pydantic-settings env_prefix). */}}
{{- define "crm.component.envPrefix" -}}
{{- printf "CRM_%s_" (.name | upper | replace "-" "_") -}}
{{- end -}}

{{/*
`<component>.settings`: the component's own settings by their camelCase names, each rendered as
CRM_<COMPONENT>_<NAME> (`firstContactHours` -> CRM_LEADS_FIRST_CONTACT_HOURS) only when set, so an
unset one keeps the code's default. Helm reads YAML numbers as floats: whole ones are written
without an exponent (209715200, never 2.097152e+08), which an integer setting could not parse.
*/}}
{{- define "crm.component.settingsEnv" -}}
{{- $prefix := include "crm.component.envPrefix" . -}}
{{- range $name, $value := (index .root.Values .key).settings }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ printf "%s%s" $prefix ($name | snakecase | upper) }}
  value: {{ include "crm.envNumber" $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A value as an environment variable's text: a whole float without its fraction or exponent. */}}
{{- define "crm.envNumber" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{- define "crm.labels" -}}
app.kubernetes.io/name: {{ include "crm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crm
helm.sh/chart: {{ include "crm.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "crm.component.labels" -}}
{{ include "crm.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "crm.component.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "crm.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "crm.component.metadata" -}}
name: {{ include "crm.component.fullname" . }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "crm.component.labels" . | nindent 2 }}
{{- include "crm.annotations" .root }}
{{- end -}}

{{- define "crm.component.serviceAccountName" -}}
{{- $values := index .root.Values .key -}}
{{- if $values.serviceAccount.create -}}
{{- default (include "crm.component.fullname" .) $values.serviceAccount.name -}}
{{- else -}}
{{- default "default" $values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "crm.component.image" -}}
{{- $values := index .root.Values .key -}}
{{- $image := .root.Values.image -}}
{{- $registry := default $image.registry .root.Values.global.imageRegistry -}}
{{- $repository := $values.image.repository -}}
{{- if $registry -}}
{{- $repository = printf "%s/%s" $registry $repository -}}
{{- end -}}
{{- if $values.image.digest -}}
{{- printf "%s@%s" $repository $values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default (default .root.Chart.AppVersion $image.tag) $values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* `<service>.<namespace>.svc:<port>`: where a component's peers reach a gRPC service. */}}
{{- define "crm.service.target" -}}
{{- $values := index .root.Values .key -}}
{{- printf "%s.%s.svc:%v" (include "crm.component.fullname" .) .root.Release.Namespace $values.grpcPort -}}
{{- end -}}

{{/*
The database URL, from the component's existing Secret; with `database.tls.caExistingSecret`, the
CA that verifies the server. asyncpg reads PGSSLROOTCERT and PGSSLMODE as libpq does, for the
engine's connections and the outbox relay's LISTEN one alike; a URL's own `?ssl=` wins over PGSSLMODE.
*/}}
{{- define "crm.component.databaseEnv" -}}
{{- $values := index .root.Values .key -}}
- name: {{ include "crm.component.envPrefix" . }}DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "%s.database.existingSecret is required" .key) $values.database.existingSecret }}
      key: {{ $values.database.urlKey }}
{{- if include "crm.database.caMounted" .root }}
- name: PGSSLROOTCERT
  value: "/etc/crm/database-ca/{{ .root.Values.database.tls.caKey }}"
- name: PGSSLMODE
  value: verify-full
{{- end }}
{{- end -}}

{{/* Non-empty when the CA of the PostgreSQL servers' certificates is mounted from a Secret. */}}
{{- define "crm.database.caMounted" -}}
{{- if .Values.database.tls.caExistingSecret -}}
true
{{- end -}}
{{- end -}}

{{/* The PostgreSQL CA's volume, in every pod that connects to a database (Deployments and migration Jobs). */}}
{{- define "crm.database.caVolume" -}}
{{- if include "crm.database.caMounted" . }}
- name: database-ca
  secret:
    secretName: {{ .Values.database.tls.caExistingSecret }}
    items:
      - key: {{ .Values.database.tls.caKey }}
        path: {{ .Values.database.tls.caKey }}
{{- end }}
{{- end -}}

{{- define "crm.database.caVolumeMount" -}}
{{- if include "crm.database.caMounted" . }}
- name: database-ca
  mountPath: /etc/crm/database-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Kafka connection settings (crm_platform.config.KafkaSettings, prefix CRM_KAFKA_). */}}
{{- define "crm.kafka.env" -}}
{{- $kafka := .Values.kafka -}}
- name: CRM_KAFKA_BOOTSTRAP_SERVERS
  value: {{ required "kafka.bootstrapServers is required" $kafka.bootstrapServers | quote }}
- name: CRM_KAFKA_SECURITY_PROTOCOL
  value: {{ $kafka.securityProtocol | quote }}
{{- if hasPrefix "SASL_" $kafka.securityProtocol }}
- name: CRM_KAFKA_SASL_MECHANISM
  value: {{ $kafka.sasl.mechanism | quote }}
- name: CRM_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret is required with a SASL_* security protocol" $kafka.sasl.existingSecret }}
      key: {{ $kafka.sasl.usernameKey }}
- name: CRM_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $kafka.sasl.existingSecret }}
      key: {{ $kafka.sasl.passwordKey }}
{{- end }}
{{- if include "crm.kafka.caMounted" . }}
- name: CRM_KAFKA_SSL_CAFILE
  value: "/etc/crm/kafka-ca/{{ $kafka.tls.caKey }}"
{{- end }}
{{- if include "crm.kafka.clientCertMounted" . }}
- name: CRM_KAFKA_SSL_CERTFILE
  value: "/etc/crm/kafka-client/{{ $kafka.tls.clientCertKey }}"
- name: CRM_KAFKA_SSL_KEYFILE
  value: "/etc/crm/kafka-client/{{ $kafka.tls.clientKeyKey }}"
{{- end }}
- name: CRM_KAFKA_ENABLE_IDEMPOTENCE
  value: {{ $kafka.enableIdempotence | quote }}
- name: CRM_KAFKA_CREATE_TOPICS
  value: {{ $kafka.createTopics | quote }}
- name: CRM_KAFKA_TOPIC_PARTITIONS
  value: {{ $kafka.topicPartitions | quote }}
- name: CRM_KAFKA_REPLICATION_FACTOR
  value: {{ $kafka.replicationFactor | quote }}
{{- end -}}

{{/* Non-empty when the Kafka CA certificate is mounted from a Secret. */}}
{{- define "crm.kafka.caMounted" -}}
{{- if and (hasSuffix "SSL" .Values.kafka.securityProtocol) .Values.kafka.tls.caExistingSecret -}}
true
{{- end -}}
{{- end -}}

{{/* Non-empty when the CRM's Kafka client certificate (mTLS) is mounted from a Secret. */}}
{{- define "crm.kafka.clientCertMounted" -}}
{{- if and (hasSuffix "SSL" .Values.kafka.securityProtocol) .Values.kafka.tls.clientCertExistingSecret -}}
true
{{- end -}}
{{- end -}}

{{/*
The secret the gateway and the services sign and check their gRPC calls with (crm_platform.call_auth):
`internalCalls.existingSecret`, else the Secret the chart generates (templates/internal-calls-secret.yaml).
Not for the migration Jobs, which call no one (and run before that Secret exists on install).
*/}}
{{- define "crm.internalCalls.secretName" -}}
{{- default (printf "%s-internal-calls" (include "crm.fullname" .)) .Values.internalCalls.existingSecret -}}
{{- end -}}

{{- define "crm.internalCalls.env" -}}
- name: CRM_INTERNAL_CALL_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "crm.internalCalls.secretName" . }}
      key: {{ .Values.internalCalls.secretKey }}
{{- end -}}

{{/* OpenTelemetry exporter (read by the OpenTelemetry SDK itself, see crm_platform.telemetry). */}}
{{- define "crm.otel.env" -}}
{{- if .root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .root.Values.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "crm-%s" .name | quote }}
{{- with .root.Values.otel.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- with .root.Values.otel.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "crm.component.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpDirSizeLimit }}
{{- include "crm.database.caVolume" .root }}
{{- if include "crm.kafka.caMounted" .root }}
- name: kafka-ca
  secret:
    secretName: {{ .root.Values.kafka.tls.caExistingSecret }}
    items:
      - key: {{ .root.Values.kafka.tls.caKey }}
        path: {{ .root.Values.kafka.tls.caKey }}
{{- end }}
{{- if include "crm.kafka.clientCertMounted" .root }}
- name: kafka-client
  secret:
    secretName: {{ .root.Values.kafka.tls.clientCertExistingSecret }}
    defaultMode: 0440  # the private key: readable by the pod's fsGroup only
    items:
      - key: {{ .root.Values.kafka.tls.clientCertKey }}
        path: {{ .root.Values.kafka.tls.clientCertKey }}
      - key: {{ .root.Values.kafka.tls.clientKeyKey }}
        path: {{ .root.Values.kafka.tls.clientKeyKey }}
{{- end }}
{{- end -}}

{{- define "crm.component.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- include "crm.database.caVolumeMount" .root }}
{{- if include "crm.kafka.caMounted" .root }}
- name: kafka-ca
  mountPath: /etc/crm/kafka-ca
  readOnly: true
{{- end }}
{{- if include "crm.kafka.clientCertMounted" .root }}
- name: kafka-client
  mountPath: /etc/crm/kafka-client
  readOnly: true
{{- end }}
{{- end -}}

{{/*
Scheduling: the component's own settings, or a preferred spread of its replicas across nodes.
With "job" true in the context (a migration Job's pod): the node selector, the tolerations and the
affinity's `nodeAffinity` only, so the Job lands on the nodes its component may run on (a tainted or
arm64 pool). Pod (anti-)affinity and topology spread describe how the replicas spread among
themselves: a required anti-affinity against the component's own pods would leave the Job Pending
on an upgrade, with a replica on every node.
*/}}
{{- define "crm.component.scheduling" -}}
{{- $values := index .root.Values .key -}}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .job }}
{{- with ($values.affinity | default dict).nodeAffinity }}
affinity:
  nodeAffinity:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- else }}
affinity:
{{- if $values.affinity }}
  {{- toYaml $values.affinity | nindent 2 }}
{{- else }}
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "crm.component.selectorLabels" . | nindent 14 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "crm.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The gateway's access policy: `gateway.policy.content`, else the default policy shipped in files/. */}}
{{- define "crm.gateway.policy" -}}
{{- if .Values.gateway.policy.content -}}
{{- .Values.gateway.policy.content -}}
{{- else -}}
{{- required "files/policy.yaml is missing from the chart" (.Files.Get "files/policy.yaml") -}}
{{- end -}}
{{- end -}}

{{/* Cross-value rules the schema cannot express; rendered once, from the gateway's Deployment. */}}
{{- define "crm.validateValues" -}}
{{- $shutdown := add .Values.preStopSleepSeconds (mul 2 .Values.shutdownGraceSeconds) -}}
{{- if gt (int $shutdown) (int .Values.terminationGracePeriodSeconds) -}}
{{- fail (printf "preStopSleepSeconds + 2 x shutdownGraceSeconds (%d s) must not exceed terminationGracePeriodSeconds (%d s): pods would be killed while draining or flushing their outbox" (int $shutdown) (int .Values.terminationGracePeriodSeconds)) -}}
{{- end -}}
{{- range $name, $key := include "crm.services" . | fromYaml -}}
{{- $autoscaling := (index $.Values $key).autoscaling -}}
{{- if gt (int $autoscaling.minReplicas) (int $autoscaling.maxReplicas) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%d) is above maxReplicas (%d)" $key (int $autoscaling.minReplicas) (int $autoscaling.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas) -}}
{{- fail (printf "gateway.autoscaling.minReplicas (%d) is above maxReplicas (%d)" (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- end -}}
