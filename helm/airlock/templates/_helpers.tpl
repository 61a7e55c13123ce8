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

{{/*
An image reference, by digest when one is given, else by tag (never "latest"). The registry follows the bitnami
charts' convention (bitnami/common, common.images.image): global.imageRegistry wins over the image's own `registry`.
With neither, the repository must name its registry itself: a container runtime resolves a name whose first component
is not a host ("." or ":" in it, or "localhost": the rule of distribution/reference's ParseNormalizedNamed) on
docker.io, which an air-gapped cluster cannot reach and should never try. (list root image)
*/}}
{{- define "airlock.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- $registry := dig "imageRegistry" "" ($root.Values.global | default dict) | default $image.registry | default "" | trimSuffix "/" }}
{{- $repository := $image.repository }}
{{- if $registry }}
{{- $repository = printf "%s/%s" $registry $repository }}
{{- else }}
{{- $parts := splitList "/" $repository }}
{{- $host := first $parts }}
{{- if not (and (gt (len $parts) 1) (or (contains "." $host) (contains ":" $host) (eq $host "localhost"))) }}
{{- fail (printf "image %s names no registry: set global.imageRegistry (or the image's registry), or a repository that starts with your registry's host (registry.corp/%s); a bare name would be pulled from docker.io" $repository $repository) }}
{{- end }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- if or (not $image.tag) (eq $image.tag "latest") }}
{{- fail "image tags must be pinned: set a version tag or a digest, never 'latest'" }}
{{- end }}
{{- printf "%s:%s" $repository $image.tag }}
{{- end }}
{{- end }}

{{/* Pull secrets of every pod: global.imagePullSecrets, then imagePullSecrets, each a name or {name: ...}, once
each (bitnami/common, common.images.renderPullSecrets). */}}
{{- define "airlock.imagePullSecrets" -}}
{{- $names := list }}
{{- range concat (dig "imagePullSecrets" list (.Values.global | default dict) | default list) (.Values.imagePullSecrets | default list) }}
{{- $name := "" }}
{{- if kindIs "string" . }}{{ $name = . }}{{ else }}{{ $name = .name }}{{ end }}
{{- if not (has $name $names) }}{{ $names = append $names $name }}{{ end }}
{{- end }}
{{- with $names }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* A value rendered with tpl when it holds a template (bitnami/common, common.tplvalues.render). (dict value context) */}}
{{- define "airlock.tplvalues" -}}
{{- if kindIs "string" .value }}
{{- tpl .value .context }}
{{- else }}
{{- tpl (toYaml .value) .context }}
{{- end }}
{{- end }}

{{/* The values of a component's pods: the component's name, but sharedLimits for the limits server (its pods are
"limits", as its Service and labels). (component) */}}
{{- define "airlock.valuesKey" -}}
{{- ternary "sharedLimits" . (eq . "limits") }}
{{- end }}

{{/* The ServiceAccount of a component's pods (bitnami: common.names.serviceAccountName). (list root component) */}}
{{- define "airlock.serviceAccountName" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $account := (get $root.Values (include "airlock.valuesKey" $component)).serviceAccount }}
{{- if $account.create }}
{{- $account.name | default (include "airlock.component" (list $root $component)) }}
{{- else }}
{{- $account.name | default "default" }}
{{- end }}
{{- end }}

{{/* A pod template's labels: the selector labels, the component, then podLabels (never overriding the chart's).
(list root component extraLabels) */}}
{{- define "airlock.podLabels" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $own := include "airlock.selectorLabels" $root | fromYaml }}
{{- $_ := set $own "app.kubernetes.io/component" $component }}
{{- $own = merge $own (index . 2) }}
{{- $extra := (get $root.Values (include "airlock.valuesKey" $component)).podLabels | default dict }}
{{- range $key, $value := $extra }}
{{- if hasKey $own $key }}
{{- fail (printf "%s.podLabels: %s is the chart's own label" (include "airlock.valuesKey" $component) $key) }}
{{- end }}
{{- end }}
{{- merge $own $extra | toYaml }}
{{- end }}

{{/* What a component's pods get from the extensibility values (bitnami and prometheus-community conventions): the
ServiceAccount, runtime and priority class, scheduling. (list root component) */}}
{{- define "airlock.podExtras" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $values := get $root.Values (include "airlock.valuesKey" $component) -}}
serviceAccountName: {{ include "airlock.serviceAccountName" (list $root $component) }}
automountServiceAccountToken: {{ $values.serviceAccount.automountServiceAccountToken }}
enableServiceLinks: false
{{- include "airlock.imagePullSecrets" $root }}
{{- with $values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- include "airlock.tplvalues" (dict "value" . "context" $root) | nindent 2 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
{{- /* A constraint without labelSelector counts no pod (Kubernetes API, TopologySpreadConstraint.labelSelector:
"used to find matching pods"), so it would spread nothing: the component's own selector labels fill it in. */}}
{{- $selector := include "airlock.selectorLabels" $root | fromYaml }}
{{- $_ := set $selector "app.kubernetes.io/component" $component }}
{{- $constraints := list }}
{{- range include "airlock.tplvalues" (dict "value" . "context" $root) | fromYamlArray }}
{{- if not (hasKey . "labelSelector") }}
{{- $_ := set . "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
{{- $constraints = append $constraints . }}
{{- end }}
topologySpreadConstraints:
  {{- toYaml $constraints | nindent 2 }}
{{- end }}
{{- end }}

{{/* extraEnv entries (rendered with tpl, bitnami's extraEnvVars), refusing the names the chart sets itself (a
later duplicate would silently win) and every AIRLOCK_* variable: Airlock reads them, in any case, over the airlock.yaml
the chart writes (pydantic-settings, server/config.py settings_customise_sources), so one would silently undo a
setting of the chart (the model check, the listening address, the certificates). (list root component chartNames) */}}
{{- define "airlock.extraEnv" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $extra := (get $root.Values $component).extraEnv | default list }}
{{- range $extra }}
{{- if has .name (index $ 2) }}
{{- fail (printf "%s.extraEnv: %s is set by the chart" $component .name) }}
{{- end }}
{{- if hasPrefix "AIRLOCK_" (upper .name) }}
{{- fail (printf "%s.extraEnv: %s is an Airlock setting, which would override the chart's airlock.yaml (AIRLOCK_* variables win over it): set it in %s instead" $component .name (ternary "gateway.settings" "the engine values (values.yaml, engine.*)" (eq $component "gateway"))) }}
{{- end }}
{{- end }}
{{- with $extra }}
{{- include "airlock.tplvalues" (dict "value" . "context" $root) }}
{{- end }}
{{- end }}

{{/* The OIDC issuer and audience, as environment variables (from auth.oidc, or its Secret): the gateway's, and the
limits server's, which reads the same settings (with no sign-in method left, they would be refused). */}}
{{- define "airlock.oidcEnv" -}}
{{- if .Values.auth.oidc.existingSecret }}
- name: AIRLOCK_AUTH__OIDC__ISSUER
  valueFrom: {secretKeyRef: {name: {{ .Values.auth.oidc.existingSecret }}, key: issuer}}
- name: AIRLOCK_AUTH__OIDC__AUDIENCE
  valueFrom: {secretKeyRef: {name: {{ .Values.auth.oidc.existingSecret }}, key: audience}}
{{- else if .Values.auth.oidc.issuer }}
- name: AIRLOCK_AUTH__OIDC__ISSUER
  value: {{ .Values.auth.oidc.issuer | quote }}
- name: AIRLOCK_AUTH__OIDC__AUDIENCE
  value: {{ required "auth.oidc.audience is required with auth.oidc.issuer" .Values.auth.oidc.audience | quote }}
{{- end }}
{{- end }}

{{/*
Where the engines' weights come from: "claim" (engine.model.existingClaim), "created" (engine.model.persistence.create)
or "image" (engine.model.image.repository): exactly one. A claim's access modes are checked against the number of
engines: ReadWriteOnce lets only one node mount the volume and ReadWriteOncePod only one pod (Kubernetes docs,
"Persistent Volumes", Access Modes), so a second engine would never start.
*/}}
{{- define "airlock.modelSource" -}}
{{- $model := .Values.engine.model }}
{{- $sources := list }}
{{- if $model.existingClaim }}{{ $sources = append $sources "claim" }}{{ end }}
{{- if $model.persistence.create }}{{ $sources = append $sources "created" }}{{ end }}
{{- if $model.image.repository }}{{ $sources = append $sources "image" }}{{ end }}
{{- if ne (len $sources) 1 }}
{{- fail "engine.model: set exactly one of existingClaim, persistence.create or image.repository (where the weights come from; set existingClaim: '' to use another)" }}
{{- end }}
{{- $source := first $sources }}
{{- if and (ne $source "image") (gt (int .Values.engine.replicas) 1) }}
{{- $modes := $model.persistence.accessModes }}
{{- if not (or (has "ReadOnlyMany" $modes) (has "ReadWriteMany" $modes)) }}
{{- fail (printf "engine.model.persistence.accessModes %s: %d engine replicas cannot share a claim that only one node (ReadWriteOnce) or one pod (ReadWriteOncePod) may mount; use ReadOnlyMany or ReadWriteMany storage (NFS, CephFS, ...) or engine.model.image" (toJson $modes) (int .Values.engine.replicas)) }}
{{- end }}
{{- end }}
{{- if and $model.persistence.nfs.server (ne $source "created") }}
{{- fail "engine.model.persistence.nfs needs engine.model.persistence.create: true (and existingClaim: '')" }}
{{- end }}
{{- if and $model.publicKey.configMap $model.publicKey.secret }}
{{- fail "engine.model.publicKey: set configMap or secret, not both" }}
{{- end }}
{{- if and (or $model.publicKey.configMap $model.publicKey.secret) (eq $model.verify "off") }}
{{- fail "engine.model.publicKey needs engine.model.verify require or if_present (with off nothing is checked)" }}
{{- end }}
{{- $source }}
{{- end }}

{{- define "airlock.modelClaimName" -}}
{{- .Values.engine.model.existingClaim | default (include "airlock.component" (list . "models")) }}
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

{{/*
TLS inside the cluster. A private CA for each hop, so that no certificate is accepted where it does not belong:
the engine CA issues the engines' server certificates and the gateway's client certificate (engines accept a client
only with a certificate from it); the gateway CA issues the gateway's server certificate (the Ingress verifies it); the
limits CA (sharedLimits.enabled) issues the one certificate that the limits server and the gateways both present
(each side accepts only a peer with a certificate from it, and the gateways check it names the limits Service), so
neither an engine's certificate nor the gateway's upstream one reaches the limits server. Every certificate Secret
holds tls.crt, tls.key and ca.crt (the layout of kubernetes.io/tls and of cert-manager).
*/}}

{{/* The hops that have a CA of their own, as JSON: engine, gateway, and limits with sharedLimits.enabled. */}}
{{- define "airlock.caRoles" -}}
{{- $roles := list "engine" "gateway" }}
{{- if .Values.sharedLimits.enabled }}{{ $roles = append $roles "limits" }}{{ end }}
{{- toJson $roles }}
{{- end }}

{{/*
A Secret as the cluster holds it now, as JSON ({} when there is none): the chart's only lookup. Renderers without a
cluster (helm template, helm install --dry-run, Argo CD) always get {}. (list root name)
*/}}
{{- define "airlock.clusterSecret" -}}
{{- lookup "v1" "Secret" (index . 0).Release.Namespace (index . 1) | toJson }}
{{- end }}

{{/*
Where the certificates come from: certManager, existingSecret or generated ("auto" resolved). auto keeps generated
certificates once the chart has made them (the engine CA Secret exists and cert-manager did not issue it): cert-manager
installed later does not switch a release over by itself. Memoized on the root context (one lookup per render).
*/}}
{{- define "airlock.tlsSource" -}}
{{- if not (hasKey . "airlockTlsSource") }}
{{- $source := .Values.tls.source }}
{{- if eq $source "auto" }}
{{- $ca := include "airlock.clusterSecret" (list . (include "airlock.component" (list . "engine-ca"))) | fromJson }}
{{- if and $ca (not (dig "metadata" "annotations" "cert-manager.io/certificate-name" "" $ca)) }}
{{- $source = "generated" }}
{{- else }}
{{- $source = ternary "certManager" "generated" (.Capabilities.APIVersions.Has "cert-manager.io/v1") }}
{{- end }}
{{- end }}
{{- $_ := set . "airlockTlsSource" $source }}
{{- end }}
{{- get . "airlockTlsSource" }}
{{- end }}

{{/* The names a Service answers to inside the cluster (the SANs of its certificate). */}}
{{- define "airlock.serviceDNSNames" -}}
{{- $root := index . 0 }}
{{- $service := index . 1 }}
{{- $namespace := $root.Release.Namespace }}
{{- list $service (printf "%s.%s" $service $namespace) (printf "%s.%s.svc" $service $namespace) (printf "%s.%s.svc.%s" $service $namespace $root.Values.tls.clusterDomain) | toJson }}
{{- end }}

{{- define "airlock.engineTlsSecret" -}}
{{- $root := index . 0 }}
{{- if eq (include "airlock.tlsSource" $root) "existingSecret" }}
{{- required "tls.existingSecret.engine: name the Secret with the engines' certificate (tls.crt, tls.key, ca.crt)" $root.Values.tls.existingSecret.engine }}
{{- else }}
{{- include "airlock.component" (list $root (printf "engine-%d-tls" (int (index . 1)))) }}
{{- end }}
{{- end }}

{{- define "airlock.gatewayClientTlsSecret" -}}
{{- if eq (include "airlock.tlsSource" .) "existingSecret" }}
{{- required "tls.existingSecret.gatewayClient: name the Secret with the gateway's client certificate (tls.crt, tls.key, ca.crt)" .Values.tls.existingSecret.gatewayClient }}
{{- else }}
{{- include "airlock.component" (list . "gateway-client-tls") }}
{{- end }}
{{- end }}

{{- define "airlock.gatewayServerTlsSecret" -}}
{{- if eq (include "airlock.tlsSource" .) "existingSecret" }}
{{- required "tls.existingSecret.gatewayServer: name the Secret with the gateway's server certificate (tls.crt, tls.key, ca.crt), or set tls.gateway.enabled: false (see values.yaml)" .Values.tls.existingSecret.gatewayServer }}
{{- else }}
{{- include "airlock.component" (list . "gateway-tls") }}
{{- end }}
{{- end }}

{{- define "airlock.limitsTlsSecret" -}}
{{- if eq (include "airlock.tlsSource" .) "existingSecret" }}
{{- required "tls.existingSecret.limits: name the Secret with the limits server's certificate for its Service names, allowing server and client authentication (tls.crt, tls.key, ca.crt), or set sharedLimits.enabled: false" .Values.tls.existingSecret.limits }}
{{- else }}
{{- include "airlock.component" (list . "limits-tls") }}
{{- end }}
{{- end }}

{{/* Where the gateways reach the limits server: its Service's fully qualified name, which its certificate names (the
gateways check it). */}}
{{- define "airlock.limitsUrl" -}}
{{- $service := include "airlock.component" (list . "limits") }}
{{- printf "tcp://%s:%d" (last (include "airlock.serviceDNSNames" (list . $service) | fromJsonArray)) (int .Values.sharedLimits.port) }}
{{- end }}

{{/* A CA's commonName, "<fullname> <role> CA", within the 64 characters of X.509 (RFC 5280, ub-common-name;
cert-manager refuses a longer one). Leaf names are Service names (63) or "<gateway>-client", cut to fit likewise.
(list root role) */}}
{{- define "airlock.caCommonName" -}}
{{- $suffix := printf " %s CA" (index . 1) }}
{{- printf "%s%s" (include "airlock.fullname" (index . 0) | trunc (int (sub 64 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/*
Every certificate the chart issues: a list of {secret, ca, commonName, dnsNames, usages}. The engine CA's leaves
(engines, gateway client), the limits CA's leaf (the limits Service, only with sharedLimits.enabled) and the gateway
CA's leaf (gateway server, only with tls.gateway.enabled).
*/}}
{{- define "airlock.tlsLeaves" -}}
{{- $leaves := list }}
{{- range $index := until (int .Values.engine.replicas) }}
{{- $service := include "airlock.engineName" (list $ $index) }}
{{- /* client auth too: the engine's own probe presents it (engines refuse clients without a certificate). */}}
{{- $leaves = append $leaves (dict "secret" (include "airlock.engineTlsSecret" (list $ $index)) "ca" "engine" "commonName" $service "dnsNames" (include "airlock.serviceDNSNames" (list $ $service) | fromJsonArray) "usages" (list "server auth" "client auth")) }}
{{- end }}
{{- $gateway := include "airlock.component" (list . "gateway") }}
{{- $leaves = append $leaves (dict "secret" (include "airlock.gatewayClientTlsSecret" .) "ca" "engine" "commonName" (printf "%s-client" ($gateway | trunc 57 | trimSuffix "-")) "dnsNames" list "usages" (list "client auth")) }}
{{- if .Values.sharedLimits.enabled }}
{{- /* Presented by both sides of the hop: server auth for the limits server, client auth for the gateways. */}}
{{- $limits := include "airlock.component" (list . "limits") }}
{{- $leaves = append $leaves (dict "secret" (include "airlock.limitsTlsSecret" .) "ca" "limits" "commonName" $limits "dnsNames" (include "airlock.serviceDNSNames" (list . $limits) | fromJsonArray) "usages" (list "server auth" "client auth")) }}
{{- end }}
{{- if .Values.tls.gateway.enabled }}
{{- $leaves = append $leaves (dict "secret" (include "airlock.gatewayServerTlsSecret" .) "ca" "gateway" "commonName" $gateway "dnsNames" (include "airlock.serviceDNSNames" (list . $gateway) | fromJsonArray) "usages" (list "server auth")) }}
{{- end }}
{{- toJson $leaves }}
{{- end }}

{{/*
Generated certificates (tls.source generated): made with Sprig and kept across upgrades by looking up the Secrets
already in the cluster (as the salt is). Each Secret carries its identity (what it was made for: names, CA, validity)
and its expiry (airlock.dev/tls-not-after, unix seconds; Sprig cannot read a certificate's dates, so the chart writes
down the date it asked for, taken just before the certificate is made, so never later than the real one). On an
upgrade a certificate is made again when its identity changed, when it expires within tls.generated.renewBeforeDays,
or when its CA was made again; a CA when its identity changed or when it expires before a certificate issued now
would (validityDays + renewBeforeDays). Sprig certificates always allow both server and client authentication (it
cannot restrict usages): the CAs keep them apart. Memoized on the root context: every template of one render
sees the same certificates (the Secrets and the pods' checksums). Returns {secretName: {tls.crt, tls.key, ca.crt,
identity, notAfter}} with base64 values, CA Secrets included.
*/}}
{{- define "airlock.generatedTls" -}}
{{- if not (hasKey . "airlockGeneratedTls") }}
{{- $generated := .Values.tls.generated }}
{{- $days := int $generated.validityDays }}
{{- $caDays := int $generated.caValidityDays }}
{{- $renewDays := int $generated.renewBeforeDays }}
{{- if ge $renewDays $days }}
{{- fail "tls.generated.renewBeforeDays must be less than tls.generated.validityDays (else every upgrade makes new certificates)" }}
{{- end }}
{{- if le $caDays (add $days $renewDays) }}
{{- fail "tls.generated.caValidityDays must be more than tls.generated.validityDays + tls.generated.renewBeforeDays (a certificate must not outlive its CA)" }}
{{- end }}
{{- $now := now | unixEpoch | int64 }}
{{- $secrets := dict }}
{{- $cas := dict }}
{{- range $role := include "airlock.caRoles" . | fromJsonArray }}
{{- $name := include "airlock.component" (list $ (printf "%s-ca" $role)) }}
{{- $commonName := include "airlock.caCommonName" (list $ $role) }}
{{- $identity := printf "%s|%d" $commonName $caDays | sha256sum }}
{{- $existing := include "airlock.clusterSecret" (list $ $name) | fromJson }}
{{- $data := dig "data" dict $existing }}
{{- $notAfter := int64 (dig "metadata" "annotations" "airlock.dev/tls-not-after" "0" $existing) }}
{{- $ca := dict }}
{{- $kept := false }}
{{- if and (index $data "tls.crt") (index $data "tls.key") (eq (dig "metadata" "annotations" "airlock.dev/tls-identity" "" $existing) $identity) (gt (sub $notAfter $now) (mul (add $days $renewDays) 86400)) }}
{{- $ca = buildCustomCert (index $data "tls.crt") (index $data "tls.key") }}
{{- $kept = true }}
{{- else }}
{{- $notAfter = add $now (mul $caDays 86400) }}
{{- $ca = genCA $commonName $caDays }}
{{- end }}
{{- $_ := set $cas $role (dict "cert" $ca "kept" $kept) }}
{{- $_ := set $secrets $name (dict "tls.crt" ($ca.Cert | b64enc) "tls.key" ($ca.Key | b64enc) "ca.crt" ($ca.Cert | b64enc) "identity" $identity "notAfter" (toString $notAfter)) }}
{{- end }}
{{- range $leaf := include "airlock.tlsLeaves" . | fromJsonArray }}
{{- $ca := get $cas $leaf.ca }}
{{- $caPem := $ca.cert.Cert }}
{{- $identity := printf "%s|%s|%d|%s" $leaf.commonName (join "," $leaf.dnsNames) $days $caPem | sha256sum }}
{{- $existing := include "airlock.clusterSecret" (list $ $leaf.secret) | fromJson }}
{{- $data := dig "data" dict $existing }}
{{- $notAfter := int64 (dig "metadata" "annotations" "airlock.dev/tls-not-after" "0" $existing) }}
{{- if and $ca.kept (index $data "tls.crt") (index $data "tls.key") (eq (dig "metadata" "annotations" "airlock.dev/tls-identity" "" $existing) $identity) (gt (sub $notAfter $now) (mul $renewDays 86400)) }}
{{- $_ := set $secrets $leaf.secret (dict "tls.crt" (index $data "tls.crt") "tls.key" (index $data "tls.key") "ca.crt" ($caPem | b64enc) "identity" $identity "notAfter" (toString $notAfter)) }}
{{- else }}
{{- $notAfter = add $now (mul $days 86400) }}
{{- $cert := genSignedCert $leaf.commonName nil $leaf.dnsNames $days $ca.cert }}
{{- $_ := set $secrets $leaf.secret (dict "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc) "ca.crt" ($caPem | b64enc) "identity" $identity "notAfter" (toString $notAfter)) }}
{{- end }}
{{- end }}
{{- $_ := set . "airlockGeneratedTls" $secrets }}
{{- end }}
{{- get . "airlockGeneratedTls" | toJson }}
{{- end }}

{{/*
A pod's checksum/tls: restarts it when the certificate it mounts is replaced by the chart (generated: only when made
anew, not when looked up again) or when what it asks cert-manager for changes. Renewals by cert-manager need no
restart: the files are updated in place and the engines (--enable-ssl-refresh) and the gateway reload them.
*/}}
{{- define "airlock.tlsChecksum" -}}
{{- $root := index . 0 }}
{{- $secrets := index . 1 }}
{{- $source := include "airlock.tlsSource" $root }}
{{- $parts := list $source }}
{{- if eq $source "generated" }}
{{- $generated := include "airlock.generatedTls" $root | fromJson }}
{{- range $secrets }}{{ $parts = append $parts (get $generated . | toJson) }}{{ end }}
{{- else if eq $source "certManager" }}
{{- $leaves := include "airlock.tlsLeaves" $root | fromJsonArray }}
{{- range $leaves }}{{ if has .secret $secrets }}{{ $parts = append $parts (toJson .) }}{{ end }}{{ end }}
{{- $parts = append $parts (toJson $root.Values.tls.certManager) }}
{{- else }}
{{- $parts = concat $parts $secrets }}
{{- end }}
{{- join "\n" $parts | sha256sum }}
{{- end }}

{{/*
The gateway's limits, as the Ingress must mirror them: {bodyBytes, timeoutSeconds}, Airlock's defaults (server/config.py)
when unset. The gateway may hold a request without sending a byte for as long as it waits in the fair queue
(admission.queue_timeout_s), then connects to an engine (gateway.connect_timeout_s) and waits for its first byte
(gateway.read_timeout_s): the Ingress must wait longer than all three, plus a margin, or it cuts off an answer the
gateway would still have given.
*/}}
{{- define "airlock.gatewayLimits" -}}
{{- $settings := .Values.gateway.settings | default dict }}
{{- $gateway := dig "gateway" dict $settings }}
{{- $admission := dig "admission" dict $settings }}
{{- $body := int64 (float64 (dig "max_body_bytes" 33554432 $gateway)) }}
{{- $silence := addf (dig "queue_timeout_s" 120 $admission) (dig "connect_timeout_s" 5 $gateway) (dig "read_timeout_s" 600 $gateway) }}
{{- $timeout := add (int64 (ceil $silence)) 10 }}
{{- dict "bodyBytes" $body "timeoutSeconds" $timeout | toJson }}
{{- end }}

{{/* Qwen3-VL's image budget from engine.imageBudget, as Airlock settings (engine.max_pixels, engine.min_pixels), in
JSON: the engines' --mm-processor-kwargs and the gateway's cost estimate and console down-scaling read the same
values. Unset (null): none of them, so both sides take the profile's. */}}
{{- define "airlock.imageBudget" -}}
{{- $budget := .Values.engine.imageBudget | default dict }}
{{- $settings := dict }}
{{- if not (kindIs "invalid" $budget.maxPixels) }}
{{- $_ := set $settings "max_pixels" (int64 $budget.maxPixels) }}
{{- end }}
{{- if not (kindIs "invalid" $budget.minPixels) }}
{{- $_ := set $settings "min_pixels" (int64 $budget.minPixels) }}
{{- end }}
{{- /* Unset, each side is the profiles' (max 4,194,304, min 65,536 pixels: configs/models). */}}
{{- if gt ($settings.min_pixels | default 65536 | int64) ($settings.max_pixels | default 4194304 | int64) }}
{{- fail "engine.imageBudget: minPixels must not be more than maxPixels (unset, they are the profiles' 65536 and 4194304)" }}
{{- end }}
{{- $settings | toJson }}
{{- end }}

{{/* vLLM flags the engine values set (the engine passes them from its plan, server/engine.py), each with the value
to use instead. An engine.extraArgs entry that sets one of them again is refused: vLLM's argparse keeps the last
one given, so it would silently override the sizing. Names are read as vLLM reads them (vllm/utils/argparse_utils.py,
FlexibleArgumentParser.parse_args: "_" for "-" before the first ".", --flag=value, and the dotted --flag.key value);
argparse takes any unambiguous abbreviation (allow_abbrev), so a prefix of a flag counts, as in server/engine.py
check_extra_args; -q and -tp are vLLM's short forms of --quantization and --tensor-parallel-size
(vllm/engine/arg_utils.py). */}}
{{- define "airlock.checkEngineArgs" -}}
{{- $managed := dict
  "--max-model-len" "engine.maxModelLen"
  "--gpu-memory-utilization" "engine.gpuMemoryUtilization"
  "--max-num-seqs" "engine.maxNumSeqs"
  "--dtype" "engine.dtype"
  "--quantization" "engine.quantization (the checkpoint's format decides it)"
  "--mm-processor-kwargs" "engine.imageBudget.maxPixels and engine.imageBudget.minPixels"
  "--limit-mm-per-prompt" "engine.maxImagesPerRequest"
  "--tensor-parallel-size" "engine.tensorParallelSize"
  "--pipeline-parallel-size" "engine.tensorParallelSize (the chart gives each replica tensor-parallel GPUs only)"
  "--data-parallel-size" "engine.replicas"
  "--stream-interval" "engine.streamInterval"
}}
{{- $short := dict "-q" "--quantization" "-tp" "--tensor-parallel-size" "-pp" "--pipeline-parallel-size" "-dp" "--data-parallel-size" }}
{{- range $arg := .Values.engine.extraArgs }}
{{- $flag := "" }}
{{- if hasPrefix "--" $arg }}
{{- $name := regexReplaceAll "[=.].*$" $arg "" }}
{{- if gt (len $name) 2 }}
{{- $name = replace "_" "-" $name }}
{{- range $managedFlag := keys $managed | sortAlpha }}
{{- if hasPrefix $name $managedFlag }}{{ $flag = $managedFlag }}{{ end }}
{{- end }}
{{- end }}
{{- else }}
{{- range $option, $long := $short }}
{{- if hasPrefix $option $arg }}{{ $flag = $long }}{{ end }}
{{- end }}
{{- end }}
{{- if $flag }}
{{- fail (printf "engine.extraArgs: %s is set by the chart from %s; set that value instead of the flag" $flag (get $managed $flag)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A Prometheus duration in milliseconds (prometheus/common model.ParseDuration: units y=365d, w, d, h, m, s, ms, each at
most once, largest first, e.g. 1m30s). Anything else, or zero, is refused, naming the value. (list name duration)
*/}}
{{- define "airlock.durationMs" -}}
{{- $name := index . 0 }}
{{- $duration := toString (index . 1) }}
{{- if not (regexMatch "^(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?$" $duration) }}
{{- fail (printf "%s %q is not a Prometheus duration (such as 30s, 1m or 1m30s)" $name $duration) }}
{{- end }}
{{- $units := dict "y" 31536000000 "w" 604800000 "d" 86400000 "h" 3600000 "m" 60000 "s" 1000 "ms" 1 }}
{{- $total := int64 0 }}
{{- range regexFindAll "[0-9]+(ms|y|w|d|h|m|s)" $duration -1 }}
{{- $unit := regexFind "[a-z]+$" . }}
{{- $total = add $total (mul (trimSuffix $unit . | int64) (get $units $unit)) }}
{{- end }}
{{- if le $total 0 }}
{{- fail (printf "%s %q must be more than zero" $name $duration) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
The settings (dotted paths, as JSON) that both the chart's own airlock.yaml and gateway.settings set: maps are followed
into, anything else (a value, a list) is one setting. (dict chart user path)
*/}}
{{- define "airlock.overlaps" -}}
{{- $paths := list }}
{{- range $key, $value := .chart }}
{{- if hasKey $.user $key }}
{{- $path := ternary $key (printf "%s.%s" $.path $key) (eq $.path "") }}
{{- $theirs := get $.user $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $theirs) }}
{{- $paths = concat $paths (include "airlock.overlaps" (dict "chart" $value "user" $theirs "path" $path) | fromJsonArray) }}
{{- else }}
{{- $paths = append $paths $path }}
{{- end }}
{{- end }}
{{- end }}
{{- $paths | toJson }}
{{- end }}

{{/*
The gateway's memory limit must hold its document render workers: gateway.settings.documents.workers x
documents.worker_memory_mib (each worker's RLIMIT_AS, which its resident memory can never pass; Airlock's defaults,
server/config.py DocumentSettings, 2 x 1024 MiB, when unset) plus GATEWAY_OWN_MIB for the gateway process itself (its
memory request before documents; about 95 MiB resident when idle, the rest holds request bodies in flight). With less,
a hostile PDF could take the container past its limit before the worker's own limit stops it, and on cgroup v2
Kubernetes (1.28 and later, kubernetes/kubernetes PR 117793) sets memory.oom.group on every container: the kernel then
kills the whole container, the gateway and every open answer with it, where the worker's limit refuses that one
document (a 422). Quantities as Kubernetes writes them: bytes, or with k, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti
(powers of 1024), the suffixes values.schema.json allows (which also requires a limit). Documents off: nothing to check.
*/}}
{{- define "airlock.checkGatewayMemory" -}}
{{- $ownMiB := 512 }}
{{- $documents := dig "documents" dict (.Values.gateway.settings | default dict) }}
{{- $limit := dig "limits" "memory" nil (.Values.gateway.resources | default dict) }}
{{- if and (dig "enabled" true $documents) (not (kindIs "invalid" $limit)) }}
{{- $workers := int64 (dig "workers" 2 $documents) }}
{{- $each := int64 (dig "worker_memory_mib" 1024 $documents) }}
{{- $needMiB := add (mul $workers $each) $ownMiB }}
{{- $bytes := 0.0 }}
{{- if kindIs "string" $limit }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $limit }}
{{- $units := dict "" 1.0 "m" 0.001 "k" 1000.0 "M" 1000000.0 "G" 1000000000.0 "T" 1000000000000.0 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 }}
{{- $bytes = mulf (float64 $number) (get $units (trimPrefix $number $limit)) }}
{{- else }}
{{- $bytes = float64 $limit }}
{{- end }}
{{- if lt (divf $bytes 1048576.0) (float64 $needMiB) }}
{{- fail (printf "gateway.resources.limits.memory (%v) cannot hold the document render workers: gateway.settings.documents.workers (%d) x documents.worker_memory_mib (%d MiB, each worker's address-space limit) + %d MiB for the gateway itself = %d MiB. Raise the limit, or lower those settings (documents.enabled: false needs none): a worker that took the container past its limit would have the kernel kill the whole container, the gateway and its open answers with it" $limit $workers $each $ownMiB $needMiB) }}
{{- end }}
{{- end }}
{{- end }}
