{{/* Name of the operator's Deployment, ServiceAccount and RBAC objects. */}}
{{- define "moeserve.fullname" -}}
{{- printf "%s-moeserve-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moeserve.serviceAccountName" -}}
{{- default (include "moeserve.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "moeserve.labels" -}}
app.kubernetes.io/name: moeserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "moeserve.selectorLabels" -}}
app.kubernetes.io/name: moeserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The namespaces served in namespaced mode: watchNamespaces, or the release namespace. */}}
{{- define "moeserve.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- join "," .Values.watchNamespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* What the operator may do: its own resource, the children it makes, Events (Kopf and its own).
     No Namespace or CRD watch and no peering objects: it runs standalone with scanning disabled. */}}
{{- define "moeserve.rules" -}}
- apiGroups: [moeserve.io]
  resources: [moeservices]
  verbs: [get, list, watch, patch]
- apiGroups: [moeserve.io]
  resources: [moeservices/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]  # patch: the group-size annotation and the head's moeserve.io/serve label
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, create, patch, delete]
- apiGroups: [""]
  resources: [secrets]  # each MoEService's Ray auth token: created once, then read
  verbs: [get, list, create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
