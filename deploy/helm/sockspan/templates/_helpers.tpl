{{- define "sockspan.name" -}}
{{- .Chart.Name -}}
{{- end -}}

{{- define "sockspan.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sockspan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sockspan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sockspan.labels" -}}
{{ include "sockspan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sockspan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sockspan.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The metrics address: loopback unless metrics.exposed. */}}
{{- define "sockspan.metricsAddr" -}}
{{- if .Values.metrics.exposed -}}
0.0.0.0:{{ .Values.metrics.port }}
{{- else -}}
127.0.0.1:{{ .Values.metrics.port }}
{{- end -}}
{{- end -}}
