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
ServiceAccount of a component's migration Job. The Job is a pre-install hook: it runs before the
release's own resources exist, the component's ServiceAccount included. So:
- `serviceAccount.create: false`: the Job runs as the ServiceAccount the operator made
  (`serviceAccount.name`, or the namespace's `default`), which exists before the install;
- `serviceAccount.create: true`: the chart makes `<fullname>-<component>-migrate`, a hook of its
  own (weight -10, before the Jobs' -5) with the component's ServiceAccount annotations (workload
  identity), deleted once every hook of the install or upgrade has succeeded. The component's own
  ServiceAccount stays an ordinary release resource: making it a hook would take it out of the
  release (left behind by `helm uninstall`, deleted and made again at every upgrade while its pods
  run, and in the way of a rollback to a revision that owns it).
*/}}
{{- define "crm.component.migrationServiceAccountName" -}}
{{- $values := index .root.Values .key -}}
{{- if $values.serviceAccount.create -}}
{{- include "crm.component.fullname" (dict "root" .root "name" (printf "%s-migrate" .name) "key" .key) -}}
{{- else -}}
{{- include "crm.component.serviceAccountName" . -}}
{{- end -}}
{{- end -}}

{{/*
Migration Job, run by Helm before install and before every upgrade: `crm-<component> migrate`
(Alembic upgrade head). It needs only the database Secret (and the database CA's, when there is
one), no Kubernetes API token. It runs as the ServiceAccount above, on the nodes the component may
run on (its node selector, tolerations and node affinity), with the component's pod annotations.
*/}}
{{- define "crm.component.migrationJob" -}}
{{- $values := index .root.Values .key -}}
{{- $migrations := .root.Values.migrations -}}
{{- $job := dict "root" .root "name" (printf "%s-migrate" .name) "key" .key -}}
{{- if $values.migrations.enabled }}
{{- if $values.serviceAccount.create }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "crm.component.migrationServiceAccountName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "crm.component.labels" $job | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: "-10"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
    {{- with (merge (dict) $values.serviceAccount.annotations .root.Values.commonAnnotations) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
automountServiceAccountToken: false
---
{{- end }}
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
      {{- with (include "crm.component.podAnnotations" .) }}{{- . | trim | nindent 6 }}{{- end }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "crm.component.migrationServiceAccountName" . }}
      automountServiceAccountToken: false
      {{- with (include "crm.imagePullSecrets" .root) }}{{- . | trim | nindent 6 }}{{- end }}
      securityContext:
        {{- toYaml .root.Values.podSecurityContext | nindent 8 }}
      {{- with (include "crm.component.scheduling" (merge (dict "job" true) .)) }}{{- . | trim | nindent 6 }}{{- end }}
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

{{/*
Pod annotations: Prometheus scrape hints, a checksum that restarts pods when the policy changes, and
the component's own `podAnnotations`. The scrape hints only with a `metricsPort` in the context (a
migration Job has none) and only where a scraper can reach that port: NetworkPolicies off, or
`networkPolicy.metricsFrom` naming the scrapers. Otherwise every scrape of an annotated pod would
time out against the policy.
*/}}
{{- define "crm.component.podAnnotations" -}}
{{- $values := index .root.Values .key -}}
{{- $annotations := dict -}}
{{- if and .metricsPort (include "crm.metrics.scrapeAnnotations" .root) -}}
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

{{/* Non-empty when the pods get the prometheus.io/* annotations: asked for, and scrapers let in. */}}
{{- define "crm.metrics.scrapeAnnotations" -}}
{{- $np := .Values.networkPolicy -}}
{{- if and .Values.metrics.podAnnotations (or (not $np.enabled) $np.metricsFrom) -}}
true
{{- end -}}
{{- end -}}
