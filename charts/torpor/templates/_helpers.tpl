{{/*
Names, labels and the pieces every Pod of the chart shares.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "torpor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name: fullnameOverride, else RELEASE when it already
contains the chart name, else RELEASE-NAME. Truncated so that PREFIX-controller
and the StatefulSet's Pod names stay within DNS label limits.
*/}}
{{- define "torpor.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "torpor.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 42 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "torpor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway") */}}
{{- define "torpor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "torpor.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* All labels of an object: (dict "ctx" $ "component" "gateway"); component may be "". */}}
{{- define "torpor.labels" -}}
helm.sh/chart: {{ include "torpor.chart" .ctx }}
{{ include "torpor.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: torpor
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "torpor.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{- define "torpor.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtime.image.repository (.Values.runtime.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{- define "torpor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "torpor.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The API Service as Pods in the cluster reach it: HOST:PORT. */}}
{{- define "torpor.apiAuthority" -}}
{{- printf "%s-api.%s.svc:%d" (include "torpor.fullname" .) .Release.Namespace (int .Values.api.service.port) -}}
{{- end -}}

{{/* The Host names the API answers to beyond IP literals: its Service's DNS names, and api.allowedHosts. */}}
{{- define "torpor.apiAllowedHosts" -}}
{{- $svc := printf "%s-api" (include "torpor.fullname" .) -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) -}}
{{- join "," (concat $names .Values.api.allowedHosts) -}}
{{- end -}}

{{/* The Secret holding the API token, and its key. */}}
{{- define "torpor.apiSecretName" -}}
{{- .Values.api.existingSecret | default (printf "%s-api" (include "torpor.fullname" .)) -}}
{{- end -}}
{{- define "torpor.apiSecretKey" -}}
{{- if .Values.api.existingSecret -}}{{ .Values.api.existingSecretKey | default "token" }}{{- else -}}token{{- end -}}
{{- end -}}

{{/* "true" when the chart runs its own Redis (neither redis.url nor redis.existingSecret). */}}
{{- define "torpor.redis.internal" -}}
{{- if not (or .Values.redis.url .Values.redis.existingSecret) -}}true{{- end -}}
{{- end -}}

{{- define "torpor.redis.fullname" -}}
{{- printf "%s-redis" (include "torpor.fullname" .) -}}
{{- end -}}

{{/*
The env entries giving a Torpor process its store: TORPOR_REDIS. The bundled Redis's
password comes from its Secret into TORPOR_REDIS_PASSWORD, listed first so that the
kubelet expands $(TORPOR_REDIS_PASSWORD) in the URL; it never appears in the manifest.
*/}}
{{- define "torpor.redisEnv" -}}
{{- if .Values.redis.url -}}
- name: TORPOR_REDIS
  value: {{ .Values.redis.url | quote }}
{{- else if .Values.redis.existingSecret -}}
- name: TORPOR_REDIS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey | default "url" }}
{{- else if .Values.redis.auth.enabled -}}
- name: TORPOR_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "torpor.redis.fullname" . }}
      key: password
- name: TORPOR_REDIS
  value: {{ printf "redis://:$(TORPOR_REDIS_PASSWORD)@%s:%d/0" (include "torpor.redis.fullname" .) (int .Values.redis.port) | quote }}
{{- else -}}
- name: TORPOR_REDIS
  value: {{ printf "redis://%s:%d/0" (include "torpor.redis.fullname" .) (int .Values.redis.port) | quote }}
{{- end }}
{{- end -}}

{{/* Env every Torpor process gets. */}}
{{- define "torpor.commonEnv" -}}
- name: TORPOR_DOMAIN
  value: {{ .Values.domain | quote }}
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
- name: HOME
  value: /tmp
{{- end -}}

{{/*
The Pod securityContext: (dict "ids" .Values.podSecurity). Non-root and RuntimeDefault
seccomp always; the IDs when set (null drops one).
*/}}
{{- define "torpor.podSecurityContext" -}}
runAsNonRoot: true
{{- with .ids }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ int64 .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ int64 .runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" .fsGroup) }}
fsGroup: {{ int64 .fsGroup }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A container securityContext: (dict "ids" .Values.podSecurity). Not configurable on purpose. */}}
{{- define "torpor.containerSecurityContext" -}}
runAsNonRoot: true
{{- with .ids }}
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ int64 .runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" .runAsGroup) }}
runAsGroup: {{ int64 .runAsGroup }}
{{- end }}
{{- end }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The writable scratch a Torpor process needs under a read-only root: /tmp and its state dir. */}}
{{- define "torpor.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: state
  mountPath: /var/lib/torpor
{{- end -}}
{{- define "torpor.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
- name: state
  emptyDir:
    sizeLimit: 1Gi
{{- end -}}

{{/* Pod-level settings shared by the Torpor Deployments (affinity is each one's own): (dict "ctx" $ "values" .Values.gateway) */}}
{{- define "torpor.podCommon" -}}
enableServiceLinks: false
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "torpor.podSecurityContext" (dict "ids" .ctx.Values.podSecurity) | nindent 2 }}
terminationGracePeriodSeconds: {{ int .values.terminationGracePeriodSeconds }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
