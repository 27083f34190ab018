{{/* The release's full name: the release name, plus the chart name when it is not already in it. */}}
{{- define "mall-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mall-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mall-operator.labels" -}}
{{ include "mall-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: mall
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mall-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mall-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mall-operator.webhookSecret" -}}
{{- default (printf "%s-webhook" (include "mall-operator.fullname" .)) .Values.webhook.existingSecret -}}
{{- end -}}

{{/* The malls' monitoring labels as key=value,key=value for OPERATOR_MONITORING_LABELS. */}}
{{- define "mall-operator.monitoringLabels" -}}
{{- $pairs := list -}}
{{- range $k, $v := .Values.monitoring.labels -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
