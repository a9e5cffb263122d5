{{- define "continuum.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "continuum.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "continuum.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The mailbox store every replica shares. */}}
{{- define "continuum.storeUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "continuum.fullname" .) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "continuum.relayKeySecret" -}}
{{- .Values.relay.existingSecret | default (printf "%s-relay-key" (include "continuum.fullname" .)) -}}
{{- end -}}

{{- define "continuum.oracleIdentitySecret" -}}
{{- .Values.oracle.existingSecret | default (printf "%s-oracle-identity" (include "continuum.fullname" .)) -}}
{{- end -}}

{{/* The oracle URL relays long-poll: this release's oracle Service, else another region's. */}}
{{- define "continuum.oracleUrl" -}}
{{- if .Values.oracle.enabled -}}
{{- printf "http://%s-oracle:%v" (include "continuum.fullname" .) .Values.oracle.port -}}
{{- else -}}
{{- required "oracle.externalUrl is required when oracle.publicKey is set and oracle.enabled is false" .Values.oracle.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The session cookie must be Secure exactly when browsers reach the dashboard over HTTPS. */}}
{{- define "continuum.oracleTls" -}}
{{- if and .Values.oracle.ingress.enabled .Values.oracle.ingress.tlsSecret -}}true{{- end -}}
{{- end -}}

{{/* The Dockerfile's user, numeric so the kubelet can enforce runAsNonRoot. */}}
{{- define "continuum.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "continuum.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities: {drop: [ALL]}
{{- end -}}
