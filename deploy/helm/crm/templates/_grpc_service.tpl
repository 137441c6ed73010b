{{/*
Deployment of a gRPC service (leads, accounts, sales, service-desk, analytics): `crm-<name> serve`,
gRPC health checking on the gRPC port (native grpc probes), Prometheus metrics on `metrics.port`.
Called with (dict "root" $ "name" "<component>" "key" "<values key>").
*/}}
{{- define "crm.grpcService.deployment" -}}
{{- $values := index .root.Values .key -}}
{{- $root := .root -}}
{{- $prefix := include "crm.component.envPrefix" . -}}
{{- $services := include "crm.services" $root | fromYaml -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  {{- include "crm.component.metadata" . | nindent 2 }}
spec:
  {{- if not $values.autoscaling.enabled }}
  replicas: {{ $values.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "crm.component.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "crm.component.labels" . | nindent 8 }}
      {{- with (include "crm.component.podAnnotations" (dict "root" $root "name" .name "key" .key "metricsPort" $root.Values.metrics.port)) }}{{- . | trim | nindent 6 }}{{- end }}
    spec:
      serviceAccountName: {{ include "crm.component.serviceAccountName" . }}
      automountServiceAccountToken: false
      {{- with (include "crm.imagePullSecrets" $root) }}{{- . | trim | nindent 6 }}{{- end }}
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- include "crm.component.scheduling" . | trim | nindent 6 }}
      containers:
        - name: {{ .name }}
          image: {{ include "crm.component.image" . }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [{{ printf "crm-%s" .name | quote }}, "serve"]
          ports:
            - name: grpc
              containerPort: {{ $values.grpcPort }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
              protocol: TCP
          env:
            - name: {{ $prefix }}GRPC_HOST
              value: "0.0.0.0"
            - name: {{ $prefix }}GRPC_PORT
              value: {{ $values.grpcPort | quote }}
            - name: {{ $prefix }}METRICS_PORT
              value: {{ $root.Values.metrics.port | quote }}
            - name: {{ $prefix }}LOG_LEVEL
              value: {{ $values.logLevel | quote }}
            - name: {{ $prefix }}SHUTDOWN_GRACE_SECONDS
              value: {{ $root.Values.shutdownGraceSeconds | quote }}
            # With the migration Job, pods never migrate; without it they migrate at start.
            - name: {{ $prefix }}MIGRATE_ON_START
              value: {{ not $values.migrations.enabled | quote }}
            {{- include "crm.component.databaseEnv" . | nindent 12 }}
            {{- range $values.upstreams }}
            {{- $upstreamKey := required (printf "%s.upstreams: unknown service %q" $.key .) (get $services .) }}
            - name: {{ printf "%s%s_TARGET" $prefix (. | upper | replace "-" "_") }}
              value: {{ include "crm.service.target" (dict "root" $root "name" . "key" $upstreamKey) | quote }}
            {{- end }}
            {{- with (include "crm.component.settingsEnv" .) }}{{- . | trim | nindent 12 }}{{- end }}
            {{- include "crm.internalCalls.env" $root | nindent 12 }}
            {{- include "crm.kafka.env" $root | nindent 12 }}
            {{- with (include "crm.otel.env" .) }}{{- . | trim | nindent 12 }}{{- end }}
            {{- with $values.extraEnvVars }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            grpc:
              port: {{ $values.grpcPort }}
            periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
            failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
          livenessProbe:
            grpc:
              port: {{ $values.grpcPort }}
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          # Readiness asks the component's own gRPC service, NOT_SERVING while its database does not
          # answer (the pod leaves the endpoints); liveness asks the server (""), which stays SERVING.
          {{- $grpcService := get (dict
                "leads" "crm.leads.v1.LeadsService"
                "accounts" "crm.accounts.v1.AccountsService"
                "sales" "crm.sales.v1.SalesService"
                "service-desk" "crm.servicedesk.v1.ServiceDeskService"
                "analytics" "crm.analytics.v1.AnalyticsService"
              ) .name }}
          readinessProbe:
            grpc:
              port: {{ $values.grpcPort }}
              service: {{ required (printf "no gRPC service name for %q" .name) $grpcService | quote }}
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $root.Values.preStopSleepSeconds }}
          resources:
            {{- toYaml $values.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "crm.component.volumeMounts" . | nindent 12 }}
      volumes:
        {{- include "crm.component.volumes" . | nindent 8 }}
{{- end -}}
