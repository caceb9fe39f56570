{{/* The labels every object carries; the selector uses the name only (it cannot change on upgrade). */}}
{{- define "weft.labels" -}}
app.kubernetes.io/name: weft-agent
app.kubernetes.io/part-of: weft
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* The node's CNI directories: the distribution's preset unless cni.binDir / cni.confDir are set. */}}
{{- define "weft.cniBinDir" -}}
{{- $presets := dict "generic" "/opt/cni/bin" "k3s" "/var/lib/rancher/k3s/data/current/bin" "microk8s" "/var/snap/microk8s/current/opt/cni/bin" "gke" "/home/kubernetes/bin" -}}
{{- .Values.cni.binDir | default (get $presets .Values.cni.distribution) -}}
{{- end }}

{{- define "weft.cniConfDir" -}}
{{- $presets := dict "generic" "/etc/cni/net.d" "k3s" "/var/lib/rancher/k3s/agent/etc/cni/net.d" "microk8s" "/var/snap/microk8s/current/args/cni-network" "gke" "/etc/cni/net.d" -}}
{{- .Values.cni.confDir | default (get $presets .Values.cni.distribution) -}}
{{- end }}

{{/* agent.json: the agent's config file. Paths are the container's (the DaemonSet mounts the node's there). */}}
{{- define "weft.agentConfig" -}}
{{- $c := dict
  "redirect" .Values.redirect
  "iptables_variant" .Values.iptablesVariant
  "bpf_pin_path" .Values.bpfPinPath
  "sockmap" .Values.sockmap
  "cni_socket" (printf "%s/cni.sock" .Values.stateDir)
  "state_dir" .Values.stateDir
  "admin_address" "127.0.0.1:15000"
  "log_level" .Values.logLevel
  "drain_timeout_ms" .Values.drainTimeoutMs
  "trust_domain" .Values.trustDomain
  "agent_namespace" .Release.Namespace
  "revision" .Values.istioRevision
  "install_cni" .Values.cni.install
  "cni_bin_dir" "/host/opt/cni/bin"
  "cni_conf_dir" "/host/etc/cni/net.d"
-}}
{{- with .Values.istiod }}
{{- if .enabled }}
{{- $_ := set $c "xds_address" (required "istiod.xdsAddress: set istiod's xDS address as IP:port (15012 with istiod.xdsTls, else 15010)" .xdsAddress) }}
{{- $_ := set $c "xds_tls" .xdsTls }}
{{- $_ := set $c "ca" "istiod" }}
{{- $_ := set $c "ca_address" .caAddress }}
{{- $_ := set $c "istiod_root_cert" "/var/run/secrets/istio/root-cert.pem" }}
{{- $_ := set $c "istiod_token_file" "/var/run/secrets/tokens/istio-token" }}
{{- $_ := set $c "istiod_server_name" .serverName }}
{{- $_ := set $c "cluster_id" .clusterId }}
{{- $_ := set $c "mesh_id" .meshId }}
{{- end }}
{{- end }}
{{- mergeOverwrite $c .Values.agentConfig | toPrettyJson }}
{{- end }}
