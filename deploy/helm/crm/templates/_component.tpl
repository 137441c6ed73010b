{{/*
Resources every component has. Each is called from the component's own folder with
(dict "root" $ "name" "<component>" "key" "<values key>").
*/}}

{{- define "crm.component.serviceAccount" -}}
{{- $values := index .root.Values .key -}}
{{- if $values.serviceAccount.create }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "crm.component.serviceAccountName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "crm.component.labels" . | nindent 4 }}
  {{- $annotations := merge (dict) $values.serviceAccount.annotations .root.Values.commonAnnotations }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# The services never call the Kubernetes API.
automountServiceAccountToken: false
{{- end }}
{{- end -}}

{{- define "crm.component.hpa" -}}
{{- $values := index .root.Values .key -}}
{{- if $values.autoscaling.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  {{- include "crm.component.metadata" . | nindent 2 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "crm.component.fullname" . }}
  minReplicas: {{ $values.autoscaling.minReplicas }}
  maxReplicas: {{ $values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $values.autoscaling.targetCPU }}
{{- end }}
{{- end -}}

{{- define "crm.component.pdb" -}}
{{- $values := index .root.Values .key -}}
{{- if $values.pdb.create }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  {{- include "crm.component.metadata" . | nindent 2 }}
spec:
  maxUnavailable: {{ $values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "crm.component.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/*
Service of a component. Called with the component context plus
  port, targetPort: the Service port and the container port's name
  portName: grpc or http
*/}}
{{- define "crm.component.service" -}}
{{- $values := index .root.Values .key -}}
{{- $service := $values.service | default dict -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "crm.component.fullname" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "crm.component.labels" . | nindent 4 }}
  {{- $annotations := merge (dict) ($service.annotations | default dict) .root.Values.commonAnnotations }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $service.type | default "ClusterIP" }}
  selector:
    {{- include "crm.component.selectorLabels" . | nindent 4 }}
  ports:
    - name: {{ .portName }}
      port: {{ .port }}
      targetPort: {{ .portName }}
      protocol: TCP
      {{- if eq .portName "grpc" }}
      appProtocol: grpc
      {{- end }}
{{- end -}}

{{/*
NetworkPolicy: the gateway takes traffic from `networkPolicy.gatewayFrom` (anywhere when empty);
a gRPC service only from the gateway and the services of this release that call it (`upstreams`). Metrics ports are
open to `networkPolicy.metricsFrom`. Egress stays open: PostgreSQL, Kafka and the OIDC provider
are external.
*/}}
{{- define "crm.component.networkPolicy" -}}
{{- $np := .root.Values.networkPolicy -}}
{{- if $np.enabled }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  {{- include "crm.component.metadata" . | nindent 2 }}
spec:
  podSelector:
    matchLabels:
      {{- include "crm.component.selectorLabels" . | nindent 6 }}
  policyTypes:
    - Ingress
  ingress:
    {{- if eq .name "gateway" }}
    - ports:
        - port: http
          protocol: TCP
      {{- with $np.gatewayFrom }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- else }}
    - ports:
        - port: grpc
          protocol: TCP
      from:
        - podSelector:
            matchLabels:
              app.kubernetes.io/name: {{ include "crm.name" .root }}
              app.kubernetes.io/instance: {{ .root.Release.Name }}
            matchExpressions:
              - key: app.kubernetes.io/component
                operator: In
                values: {{ include "crm.service.callers" . }}
    {{- end }}
    {{- with $np.metricsFrom }}
    - ports:
        - port: metrics
          protocol: TCP
      from:
        {{- toYaml . | nindent 8 }}
    {{- end }}
{{- end }}
{{- end -}}

{{/*
What a migration Job runs: `crm-<component> migrate` (the gateway's included).
*/}}
{{- define "crm.component.migrateCommand" -}}
{{- toJson (list (printf "crm-%s" .name) "migrate") -}}
{{- end -}}

{{/*
Migration Job, run by Helm before install and before every upgrade: `crm-<component> migrate`
(Alembic upgrade head). It runs before the release's other resources exist, so it uses the
namespace's default ServiceAccount without a token, and needs only the database Secret (and the
database CA's, when there is one).
*/}}
{{- define "crm.component.migrationJob" -}}
{{- $values := index .root.Values .key -}}
{{- $migrations := .root.Values.migrations -}}
{{- $job := dict "root" .root "name" (printf "%s-migrate" .name) "key" .key -}}
{{- if $values.migrations.enabled }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "crm.component.fullname" $job }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "crm.component.labels" $job | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "-5"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
    {{- with .root.Values.commonAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  backoffLimit: {{ $migrations.backoffLimit }}
  activeDeadlineSeconds: {{ $migrations.activeDeadlineSeconds }}
  template:
    metadata:
      labels:
        {{- include "crm.component.labels" $job | nindent 8 }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      {{- with (include "crm.imagePullSecrets" .root) }}{{- . | trim | nindent 6 }}{{- end }}
      securityContext:
        {{- toYaml .root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: migrate
          image: {{ include "crm.component.image" . }}
          imagePullPolicy: {{ .root.Values.image.pullPolicy }}
          command: {{ include "crm.component.migrateCommand" . }}
          env:
            {{- include "crm.component.databaseEnv" . | nindent 12 }}
            - name: {{ include "crm.component.envPrefix" . }}LOG_LEVEL
              value: {{ $values.logLevel | quote }}
          securityContext:
            {{- toYaml .root.Values.containerSecurityContext | nindent 12 }}
          resources:
            {{- toYaml $migrations.resources | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- with (include "crm.database.caVolumeMount" .root) }}{{- . | trim | nindent 12 }}{{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ .root.Values.tmpDirSizeLimit }}
        {{- with (include "crm.database.caVolume" .root) }}{{- . | trim | nindent 8 }}{{- end }}
{{- end }}
{{- end -}}

{{/* Pod annotations: Prometheus scrape hints, a checksum that restarts pods when the policy changes, and the component's own. */}}
{{- define "crm.component.podAnnotations" -}}
{{- $values := index .root.Values .key -}}
{{- $annotations := dict -}}
{{- if .root.Values.metrics.podAnnotations -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .metricsPort) -}}
{{- end -}}
{{- with .checksum -}}
{{- $_ := set $annotations "checksum/policy" . -}}
{{- end -}}
{{- $annotations = merge $annotations $values.podAnnotations -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
