{{/* The image of every membrane container. */}}
{{- define "membrane.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "membrane.labels" -}}
app.kubernetes.io/part-of: membrane
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{/* kubeProxyReplacement as Cilium's ConfigMap writes it: "true" or "false". */}}
{{- define "membrane.kubeProxyReplacement" -}}
{{ .Values.kubeProxyReplacement | toString }}
{{- end }}
