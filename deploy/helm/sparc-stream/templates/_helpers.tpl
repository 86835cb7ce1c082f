{{/* Names and labels. */}}
{{- define "sparc.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sparc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one role: (dict "root" $ "role" "worker") */}}
{{- define "sparc.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "sparc.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* "true" when any scale-out role (ingest, learn, serve) is enabled, else "". */}}
{{- define "sparc.scaleOut" -}}
{{- range $role := list "ingest" "learn" "serve" -}}
{{- if (get $.Values.roles $role | default dict).enabled -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sparc.sharedStoreClaim" -}}
{{- .Values.sharedStore.existingClaim | default (printf "%s-snapshots" (include "sparc.fullname" .)) -}}
{{- end -}}

{{- define "sparc.configPath" -}}/etc/sparc/sparc.toml{{- end -}}
{{- define "sparc.tlsDir" -}}/etc/sparc/kafka-tls{{- end -}}

{{/* The settings as rendered: the user's config plus what the chart decides (paths, bind address). */}}
{{- define "sparc.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $worker := dict "data_dir" "/var/lib/sparc/tables" "store_url" "rocksdb:///var/lib/sparc/snapshots" -}}
{{- $_ := set $worker "torch_threads" (int .Values.roles.worker.torchThreads) -}}
{{- if include "sparc.scaleOut" . -}}
{{- $_ := set $worker "store_url" "file:///var/lib/sparc/snapshots" -}}{{/* the shared ReadWriteMany volume */}}
{{- $_ := set $worker "torch_threads" (int .Values.roles.learn.torchThreads) -}}
{{- end -}}
{{- $chart := dict "web" (dict "web_host" "0.0.0.0") "worker" $worker -}}
{{- with .Values.kafka.tlsSecret -}}
{{- if .name -}}
{{- $tls := dict "ssl_cafile" (printf "%s/ca.crt" (include "sparc.tlsDir" $)) -}}
{{- if .clientCertificate -}}
{{- $_ := set $tls "ssl_certfile" (printf "%s/tls.crt" (include "sparc.tlsDir" $)) -}}
{{- $_ := set $tls "ssl_keyfile" (printf "%s/tls.key" (include "sparc.tlsDir" $)) -}}
{{- end -}}
{{- $_ := set $chart "kafka" $tls -}}
{{- end -}}
{{- end -}}
{{- toJson (mustMergeOverwrite $config $chart) -}}
{{- end -}}

{{- define "sparc.webPort" -}}
{{- $config := include "sparc.config" . | fromJson -}}
{{- int64 (dig "web" "web_port" 6066 $config) -}}
{{- end -}}

{{/* One TOML value: a string (JSON quoting is TOML's), a boolean, an integer or a float. */}}
{{- define "sparc.tomlValue" -}}
{{- if kindIs "string" . -}}{{ toJson . }}
{{- else if kindIs "bool" . -}}{{ . }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) -}}{{ . }}
{{- else if kindIs "float64" . -}}{{ if eq (float64 (int64 .)) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else -}}{{ fail (printf "config: %v is not a string, number or boolean" .) }}
{{- end -}}
{{- end -}}

{{- define "sparc.toml" -}}
# Rendered by the sparc-stream chart from .Values.config (`sparc config show` prints the effective settings).
{{- $config := include "sparc.config" . | fromJson }}
{{- range $section := keys $config | sortAlpha }}

[{{ $section }}]
{{- $fields := get $config $section }}
{{- if not (kindIs "map" $fields) }}{{ fail (printf "config.%s must be a section (a map of settings)" $section) }}{{ end }}
{{- range $name := keys $fields | sortAlpha }}
{{ $name }} = {{ include "sparc.tomlValue" (get $fields $name) }}
{{- end }}
{{- end }}
{{- end -}}
