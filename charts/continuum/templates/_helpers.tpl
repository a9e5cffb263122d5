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

{{/* The oracle URL relays long-poll: this release's oracle Service, else another region's;
https unless oracle.tls.enabled is false. */}}
{{- define "continuum.oracleUrl" -}}
{{- if .Values.oracle.enabled -}}
{{- printf "%s://%s-oracle:%v" (ternary "https" "http" .Values.oracle.tls.enabled) (include "continuum.fullname" .) .Values.oracle.port -}}
{{- else -}}
{{- $url := required "oracle.externalUrl is required when oracle.publicKey is set and oracle.enabled is false" .Values.oracle.externalUrl -}}
{{- if and .Values.oracle.tls.enabled (not (hasPrefix "https://" $url)) -}}
{{- fail "oracle.externalUrl must be https:// (the relays fetch the access list from it), or set oracle.tls.enabled=false" -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{/* The in-cluster oracle's TLS Secret (tls.crt, tls.key, ca.crt). */}}
{{- define "continuum.oracleTlsSecret" -}}
{{- .Values.oracle.tls.secretName | default (printf "%s-oracle-tls" (include "continuum.fullname" .)) -}}
{{- end -}}

{{/* The Secret whose ca.crt relays verify the oracle with; empty: the system's trust store. */}}
{{- define "continuum.oracleCaSecret" -}}
{{- if .Values.relay.oracleCaSecret -}}
{{- .Values.relay.oracleCaSecret -}}
{{- else if and .Values.oracle.enabled .Values.oracle.tls.enabled -}}
{{- include "continuum.oracleTlsSecret" . -}}
{{- end -}}
{{- end -}}

{{/* Where relays find that CA bundle. */}}
{{- define "continuum.oracleCaDir" -}}/run/continuum-oracle-ca{{- end -}}

{{/* The Secret the relay Ingress serves wss:// with. */}}
{{- define "continuum.relayTlsSecret" -}}
{{- .Values.ingress.tlsSecret | default (printf "%s-relay-tls" (include "continuum.fullname" .)) -}}
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

{{/* With regions, the Secret holding every store URL the relays use (each may carry a
password): the other regions' (CONTINUUM_REGION_STORES) and, for an external Redis,
this region's own (CONTINUUM_STORE). */}}
{{- define "continuum.regionsSecret" -}}
{{- .Values.regions.existingSecret | default (printf "%s-regions" (include "continuum.fullname" .)) -}}
{{- end -}}

{{/* Whether this region's own store URL lives in that Secret rather than the ConfigMap. */}}
{{- define "continuum.storeInSecret" -}}
{{- if and .Values.regions.name (not .Values.redis.enabled) -}}true{{- end -}}
{{- end -}}
