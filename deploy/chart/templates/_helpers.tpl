{{/* The name every object of the release carries. */}}
{{- define "mesh.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "mesh.labels" -}}
app.kubernetes.io/name: mesh-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The agent pods' selector. */}}
{{- define "mesh.selector" -}}
app.kubernetes.io/name: mesh-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The image, its tag defaulting to the chart's appVersion. */}}
{{- define "mesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
