{{- define "cap.name" -}}certautopilot{{- end -}}

{{- define "cap.fullname" -}}
{{- if contains "certautopilot" .Release.Name -}}{{ .Release.Name | trunc 53 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-certautopilot" .Release.Name | trunc 53 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "cap.labels" -}}
app.kubernetes.io/name: {{ include "cap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cap.selector" -}}
app.kubernetes.io/name: {{ include "cap.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cap.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "cap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "cap.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{/* Guard invalid combinations once, from every template that needs the config. */}}
{{- define "cap.validate" -}}
{{- if and (not .Values.mongo.uri) (not .Values.mongo.existingSecret) -}}
{{- fail "mongo.uri or mongo.existingSecret is required (CAP_MONGO_URI)" -}}
{{- end -}}
{{- if and .Values.kek.existingSecret .Values.kek.command -}}
{{- fail "set only one of kek.existingSecret and kek.command" -}}
{{- end -}}
{{- if and (not .Values.kek.existingSecret) (not .Values.kek.command) -}}
{{- fail "kek.existingSecret or kek.command is required: CertAutoPilot never stores the KEK in MongoDB" -}}
{{- end -}}
{{- if lt (int .Values.scheduler.replicas) 1 -}}
{{- fail "scheduler.replicas must be at least 1 (2 recommended)" -}}
{{- end -}}
{{- with .Values.worker.autoscaling -}}
{{- if gt (int .minReplicas) (int .maxReplicas) -}}
{{- fail "worker.autoscaling.minReplicas must not exceed worker.autoscaling.maxReplicas" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.api.hpa.enabled (gt (int .Values.api.hpa.minReplicas) (int .Values.api.hpa.maxReplicas)) -}}
{{- fail "api.hpa.minReplicas must not exceed api.hpa.maxReplicas" -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding CAP_MONGO_URI for the ordinary resources. */}}
{{- define "cap.mongoSecretName" -}}
{{ .Values.mongo.existingSecret | default (printf "%s-mongo" (include "cap.fullname" .)) }}
{{- end -}}

{{- define "cap.mongoSecretKey" -}}
{{ if .Values.mongo.existingSecret }}{{ .Values.mongo.existingSecretKey }}{{ else }}mongo-uri{{ end }}
{{- end -}}

{{/* CAP_* environment; .secret names the Secret holding CAP_MONGO_URI (the migration
hook Job reads its own hook copy, which exists before the ordinary resources do). */}}
{{- define "cap.envWith" -}}
{{- $root := .root -}}
- name: CAP_MONGO_URI
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ include "cap.mongoSecretKey" $root }}
- name: CAP_MONGO_DB
  value: {{ $root.Values.mongo.database | quote }}
{{- with $root }}
- name: CAP_BROKER_DB
  value: {{ .Values.mongo.brokerDatabase | quote }}
{{- if .Values.kek.existingSecret }}
- name: CAP_KEK_DIR
  value: /var/run/certautopilot/kek
{{- else }}
- name: CAP_KEK_COMMAND
  value: {{ .Values.kek.command | quote }}
{{- end }}
{{- range $name, $value := .Values.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "cap.env" -}}
{{ include "cap.envWith" (dict "root" . "secret" (include "cap.mongoSecretName" .)) }}
{{- end -}}

{{/* The hook-time names of the migration Job's ServiceAccount and Secret. */}}
{{- define "cap.migrationsServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ include "cap.fullname" . }}-migrate
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "cap.migrationsSecretName" -}}
{{ .Values.mongo.existingSecret | default (printf "%s-migrate-mongo" (include "cap.fullname" .)) }}
{{- end -}}

{{- define "cap.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.kek.existingSecret }}
- name: kek
  secret:
    secretName: {{ .Values.kek.existingSecret }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{- define "cap.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.kek.existingSecret }}
- name: kek
  mountPath: /var/run/certautopilot/kek
  readOnly: true
{{- end }}
{{- end -}}

{{- define "cap.podSpecCommon" -}}
serviceAccountName: {{ include "cap.serviceAccountName" .root }}
securityContext: {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- $strict := has .component (list "api" "scheduler") }}
{{- with .root.Values.topologySpread }}
{{- if .enabled }}
{{- /* api and schedulers: DoNotSchedule by default, so one zone never holds them all */}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: {{ .topologyKey }}
    whenUnsatisfiable: {{ if $strict }}{{ .whenUnsatisfiable }}{{ else }}ScheduleAnyway{{ end }}
    labelSelector:
      matchLabels: {{- include "cap.selector" $ | nindent 8 }}
{{- end }}
{{- end }}
{{- $anti := ternary .root.Values.hostAntiAffinity "preferred" $strict }}
{{- if ne $anti "none" }}
affinity:
  podAntiAffinity:
    {{- if eq $anti "required" }}
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels: {{- include "cap.selector" . | nindent 12 }}
    {{- else }}
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels: {{- include "cap.selector" . | nindent 14 }}
    {{- end }}
{{- end }}
volumes: {{- include "cap.volumes" .root | nindent 2 }}
{{- end -}}

{{- define "cap.checksum" -}}
checksum/config: {{ include (print .Template.BasePath "/config/config-secret.yaml") . | sha256sum }}
{{- end -}}
