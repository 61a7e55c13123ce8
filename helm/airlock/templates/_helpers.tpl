{{/* Names are truncated to 63 characters: Kubernetes names and labels allow no more. */}}
{{- define "airlock.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "airlock.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The fullname with a suffix, still within 63 characters. */}}
{{- define "airlock.component" -}}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "airlock.fullname" (index . 0) | trunc (int (sub 62 (len $suffix)))) $suffix | trimSuffix "-" }}
{{- end }}

{{- define "airlock.selectorLabels" -}}
app.kubernetes.io/name: {{ include "airlock.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "airlock.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "airlock.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* An image from the internal registry, by digest when one is given, else by tag (never "latest"). */}}
{{- define "airlock.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- $repository := ternary (printf "%s/%s" $root.Values.imageRegistry $image.repository) $image.repository (ne $root.Values.imageRegistry "") }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- if or (not $image.tag) (eq $image.tag "latest") }}
{{- fail "image tags must be pinned: set a version tag or a digest, never 'latest'" }}
{{- end }}
{{- printf "%s:%s" $repository $image.tag }}
{{- end }}
{{- end }}

{{/* The restricted Pod Security Standard, for every pod and container. */}}
{{- define "airlock.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
fsGroup: {{ .Values.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "airlock.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "airlock.engineName" -}}
{{- include "airlock.component" (list (index . 0) (printf "engine-%d" (int (index . 1)))) }}
{{- end }}

{{- define "airlock.saltSecretName" -}}
{{- .Values.privacy.saltSecret.existingSecret | default (include "airlock.component" (list . "salt")) }}
{{- end }}

{{- define "airlock.authConfigured" -}}
{{- if or .Values.auth.htpasswd.existingSecret .Values.auth.htpasswd.content .Values.auth.apiKeys.existingSecret .Values.auth.apiKeys.content .Values.auth.oidc.issuer .Values.auth.oidc.existingSecret }}true{{ end }}
{{- end }}
