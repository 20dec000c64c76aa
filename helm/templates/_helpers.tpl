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
{{- end -}}

{{- define "cap.env" -}}
- name: CAP_MONGO_URI
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mongo.existingSecret | default (printf "%s-mongo" (include "cap.fullname" .)) }}
      key: {{ if .Values.mongo.existingSecret }}{{ .Values.mongo.existingSecretKey }}{{ else }}mongo-uri{{ end }}
- name: CAP_BROKER_DB
  value: {{ .Values.mongo.brokerDatabase | quote }}
- name: CAP_METRICS_CERTIFICATE_SERIES
  value: {{ .Values.metrics.certificateSeries | default "per-certificate" | quote }}
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
{{- if .root.Values.topologySpreadAcrossZones }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels: {{- include "cap.selector" . | nindent 8 }}
{{- end }}
volumes: {{- include "cap.volumes" .root | nindent 2 }}
{{- end -}}

{{- define "cap.checksum" -}}
checksum/config: {{ include (print .Template.BasePath "/config/config-secret.yaml") . | sha256sum }}
{{- end -}}
