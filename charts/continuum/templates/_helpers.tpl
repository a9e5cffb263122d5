{{/* The chart's name, or nameOverride. */}}
{{- define "continuum.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Every object's name prefix: fullnameOverride, else the release name when it already
contains the chart's name (release "continuum" gives "continuum-relay", not
"continuum-continuum-relay"), else "<release>-<name>". */}}
{{- define "continuum.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "continuum.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "continuum.labels" -}}
app.kubernetes.io/name: {{ include "continuum.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: continuum
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "continuum.selector" -}}
app.kubernetes.io/name: {{ include "continuum.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Where a component's pods may run: nodeSelector, tolerations, affinity, and topology
spread constraints, each from the component's values (`.values`); a spread constraint
without a labelSelector spreads that component's own pods. */}}
{{- define "continuum.scheduling" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range . }}
  - {{- toYaml (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" (include "continuum.selector" (dict "root" $.root "component" $.component) | fromYaml)))) | nindent 4 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The in-chart Redis's password Secret: the operator's, else the chart's own. */}}
{{- define "continuum.redisSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "continuum.fullname" .)) -}}
{{- end -}}

{{- define "continuum.redisAuth" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled -}}true{{- end -}}
{{- end -}}

{{/* The mailbox store every replica shares. */}}
{{- define "continuum.storeUrl" -}}
{{- if .Values.redis.enabled -}}
{{- /* With auth the password comes from the REDIS_PASSWORD variable the pod sets from the
Secret first (Kubernetes expands $(NAME) in a later variable's value). */ -}}
{{- printf "redis://%s%s-redis:6379/0" (ternary ":$(REDIS_PASSWORD)@" "" (eq (include "continuum.redisAuth" .) "true")) (include "continuum.fullname" .) -}}
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
