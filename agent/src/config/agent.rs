//! The agent's configuration: built-in defaults, then an optional JSON file, then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::capture::ebpf::EbpfSettings;
use crate::config::bootstrap::AdsApi;
use crate::capture::iptables::Variant;
use crate::capture::RedirectMode;

/// Where the control plane is and how the mesh is named.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsSettings {
    /// istiod's xDS address: plaintext gRPC (port 15010), or TLS (15012) when `tls` is set.
    pub address: std::net::SocketAddr,
    /// istiod's secured port: TLS verified against istiod's root, the agent's token as bearer credential.
    pub tls: Option<IstiodConnection>,
    pub api: AdsApi,
    pub cluster_id: String,
    pub mesh_id: String,
    pub istio_version: String,
}

/// How the agent reaches istiod's secured port (15012), as istio-agent does: istiod's certificate verified
/// against its root, the agent's own token as `authorization: Bearer`.
#[derive(Debug, Clone, PartialEq)]
pub struct IstiodConnection {
    /// PEM file of istiod's root certificate(s).
    pub root_cert: PathBuf,
    /// The agent's ServiceAccount token (audience `istio-ca`), re-read for every request.
    pub token_file: PathBuf,
    /// The name istiod's certificate is checked against.
    pub server_name: String,
}

/// istiod's CA, asked for each pod's identity by impersonation (as ztunnel asks).
#[derive(Debug, Clone, PartialEq)]
pub struct IstiodCa {
    /// `host:port` of istiod's secured port.
    pub address: String,
    pub connection: IstiodConnection,
    /// Sent as the `ClusterID` header.
    pub cluster_id: String,
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CaSettings {
    Istiod(IstiodCa),
    /// A CA certificate and key (PEM) that sign locally.
    File { cert: PathBuf, key: PathBuf },
}

/// Workload identities (`spiffe://<trust_domain>/ns/<namespace>/sa/<service account>`).
#[derive(Debug, Clone, PartialEq)]
pub struct IdentitySettings {
    pub trust_domain: String,
    /// None: pods get no certificates.
    pub ca: Option<CaSettings>,
    /// The validity requested for each certificate.
    pub cert_lifetime: Duration,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        IdentitySettings { trust_domain: "cluster.local".into(), ca: None, cert_lifetime: Duration::from_secs(24 * 3600) }
    }
}

pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
pub const DEFAULT_ISTIOD_SERVER_NAME: &str = "istiod.istio-system.svc";

/// Per-pod limits (the config file's `pod_limits`): what one pod may hold of the node proxy at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodLimits {
    /// Downstream connections open at once; more are closed at once.
    pub max_connections: u64,
    /// HTTP requests in flight at once; more get 503 `envoy overloaded`.
    pub max_requests: u64,
    /// New downstream connections per second (bursts of up to a second's worth); more are closed at once.
    pub max_connection_rate: u64,
    /// Bytes per second the pod's downstream connections may move, each direction (bursts of up to a
    /// second's worth); `None`: unlimited.
    pub max_bandwidth: Option<u64>,
}

impl Default for PodLimits {
    fn default() -> Self {
        PodLimits { max_connections: 4096, max_requests: 4096, max_connection_rate: 1000, max_bandwidth: None }
    }
}

impl PodLimits {
    pub const UNLIMITED: PodLimits =
        PodLimits { max_connections: u64::MAX, max_requests: u64::MAX, max_connection_rate: u64::MAX, max_bandwidth: None };
}

/// The CNI installer (`weft-agent install-cni`, and `weft-agent run` with `install_cni`).
#[derive(Debug, Clone, PartialEq)]
pub struct CniInstallSettings {
    /// Install at `weft-agent run` start-up and keep weft's entry in place while the agent runs.
    pub enabled: bool,
    /// The host's CNI network configuration directory (as mounted in the agent's container).
    pub conf_dir: PathBuf,
    /// The host's CNI plugin directory.
    pub bin_dir: PathBuf,
    /// The weft-cni binary to copy; `None`: beside weft-agent, then `/usr/lib/weft/weft-cni`.
    pub binary: Option<PathBuf>,
    /// weft-cni's `exclude_namespaces`.
    pub exclude_namespaces: Vec<String>,
    /// weft-cni's `log_file` (a path on the host); `None`: the plugin logs to the runtime's log only.
    pub log_file: Option<PathBuf>,
}

impl Default for CniInstallSettings {
    fn default() -> Self {
        CniInstallSettings {
            enabled: false,
            conf_dir: "/etc/cni/net.d".into(),
            bin_dir: "/opt/cni/bin".into(),
            binary: None,
            exclude_namespaces: weft_cni::cni::DEFAULT_EXCLUDED_NAMESPACES.iter().map(|n| (*n).to_owned()).collect(),
            log_file: None,
        }
    }
}

/// Validated agent settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub cni_socket: PathBuf,
    pub state_dir: PathBuf,
    pub redirect: RedirectMode,
    pub iptables_variant: Variant,
    pub admin_address: SocketAddr,
    pub log_level: tracing::Level,
    pub connect_timeout: Duration,
    pub ebpf: EbpfSettings,
    /// How long a stopping agent lets established connections finish.
    pub drain_timeout: Duration,
    /// The control plane each captured pod gets its configuration from; none: pods are proxied by original
    /// destination only.
    pub xds: Option<XdsSettings>,
    /// Worker threads of each pod's share of the proxy.
    pub pod_workers: usize,
    pub pod_limits: PodLimits,
    /// Downstream connections of all pods together (Envoy's overload manager
    /// `global_downstream_max_connections`): at it, only pods under their equal share get new ones.
    pub node_max_connections: u64,
    /// HTTP requests in flight of all pods together; at it, requests are shed from the pods over their share.
    pub node_max_requests: u64,
    pub identity: IdentitySettings,
    /// The Kubernetes API the agent watches its node's pods in; none: every pod weft-cni hands over is captured.
    pub kube: Option<KubeSettings>,
    pub cni_install: CniInstallSettings,
    /// Source address kubelet's probes of captured pods' probe ports are SNATed to on the node and let
    /// through in the pod (see `capture::probes`); `None`: probes are captured like other connections.
    pub probe_source: Option<std::net::Ipv4Addr>,
    /// Each captured pod answers on 15021 (`/healthz/ready`) and 15020 (`/healthz/ready`, `/stats/prometheus`),
    /// as its Istio sidecar did.
    pub pod_health_ports: bool,
}

/// How the agent reaches the Kubernetes API and which pods are its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    /// A kubeconfig file; `None` is the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// The node whose pods this agent captures (`spec.nodeName`).
    pub node_name: String,
    /// The agent's own namespace, never captured.
    pub agent_namespace: String,
    /// The Istio revision served.
    pub revision: String,
    /// How long a CNI ADD waits for a pod the API has not shown yet.
    pub pod_wait: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            cni_socket: weft_cni::protocol::DEFAULT_SOCKET.into(),
            state_dir: "/var/run/weft".into(),
            redirect: RedirectMode::Iptables,
            iptables_variant: Variant::Auto,
            admin_address: SocketAddr::from(([127, 0, 0, 1], 15000)),
            log_level: tracing::Level::INFO,
            connect_timeout: Duration::from_secs(10),
            ebpf: EbpfSettings::default(),
            drain_timeout: Duration::from_secs(30),
            xds: None,
            pod_workers: 2,
            pod_limits: PodLimits::default(),
            node_max_connections: 65536,
            node_max_requests: 65536,
            identity: IdentitySettings::default(),
            kube: None,
            cni_install: CniInstallSettings::default(),
            probe_source: Some(crate::capture::DEFAULT_PROBE_SOURCE),
            pod_health_ports: true,
        }
    }
}

/// The `ISTIO_VERSION` pods declare to istiod, which picks its encodings by it: the newest Istio weft is tested
/// against (tests/tests/istiod.rs), so istiod sends the encodings weft decodes.
pub const DEFAULT_ISTIO_VERSION: &str = "1.31.0";

/// The config file: every field optional, unknown fields refused so a typo never goes unnoticed.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub cni_socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub redirect: Option<RedirectMode>,
    pub iptables_variant: Option<Variant>,
    pub admin_address: Option<SocketAddr>,
    pub log_level: Option<String>,
    pub connect_timeout_ms: Option<u64>,
    pub ebpf_object: Option<PathBuf>,
    pub bpf_pin_path: Option<PathBuf>,
    pub sockmap: Option<bool>,
    pub drain_timeout_ms: Option<u64>,
    pub xds_address: Option<SocketAddr>,
    /// `sotw` or `delta`.
    pub xds_api: Option<String>,
    pub cluster_id: Option<String>,
    pub mesh_id: Option<String>,
    pub istio_version: Option<String>,
    pub pod_workers: Option<usize>,
    pub pod_limits: Option<PodLimits>,
    pub node_max_connections: Option<u64>,
    pub node_max_requests: Option<u64>,
    /// SPIFFE trust domain of the pods' identities [cluster.local].
    pub trust_domain: Option<String>,
    /// `istiod`, `file` or `none`.
    pub ca: Option<String>,
    /// istiod's secured address, `host:port` (ca = istiod).
    pub ca_address: Option<String>,
    /// CA certificate and key PEM files (ca = file).
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Requested certificate validity, seconds.
    pub cert_lifetime_s: Option<u64>,
    /// istiod's root certificate file (ca = istiod, xds_tls).
    pub istiod_root_cert: Option<PathBuf>,
    /// The agent's token file (ca = istiod, xds_tls).
    pub istiod_token_file: Option<PathBuf>,
    /// The name istiod's certificate must carry.
    pub istiod_server_name: Option<String>,
    /// xDS over istiod's secured port (TLS + token) rather than plaintext.
    pub xds_tls: Option<bool>,
    /// The node this agent runs on: turns on the Kubernetes pod watch (capture by Istio's labels, per-pod
    /// identities and metadata).
    pub node_name: Option<String>,
    /// kubeconfig file [in-cluster credentials].
    pub kubeconfig: Option<PathBuf>,
    /// The agent's own namespace, never captured [weft-system].
    pub agent_namespace: Option<String>,
    /// The Istio revision whose injection labels select pods [default].
    pub revision: Option<String>,
    /// How long a CNI ADD waits for the watch to show the pod, ms [3000]; with the direct lookup after it (at
    /// most 1 s) it must stay below weft-cni's `timeout_ms` (5000 by default).
    pub pod_wait_ms: Option<u64>,
    /// Install weft-cni at start-up and keep its entry in place.
    pub install_cni: Option<bool>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_bin_dir: Option<PathBuf>,
    /// The weft-cni binary to install.
    pub cni_binary: Option<PathBuf>,
    pub cni_exclude_namespaces: Option<Vec<String>>,
    pub cni_log_file: Option<PathBuf>,
    /// Kubelet probe exemption: the IPv4 source address probes get on the node, or `off` [169.254.7.127].
    pub probe_snat: Option<String>,
    /// Serve each captured pod's 15020 and 15021 [true].
    pub pod_health_ports: Option<bool>,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<ConfigFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Layers this file over `base`.
    pub fn apply(self, mut base: AgentConfig) -> Result<AgentConfig, String> {
        let identity = self.clone();
        set(&mut base.cni_socket, self.cni_socket);
        set(&mut base.state_dir, self.state_dir);
        set(&mut base.redirect, self.redirect);
        set(&mut base.iptables_variant, self.iptables_variant);
        set(&mut base.admin_address, self.admin_address);
        if let Some(level) = self.log_level {
            base.log_level = parse_level(&level).map_err(|e| format!("log_level: {e}"))?;
        }
        if let Some(ms) = self.connect_timeout_ms {
            base.connect_timeout = millis("connect_timeout_ms", ms, 1)?;
        }
        if let Some(ms) = self.drain_timeout_ms {
            base.drain_timeout = millis("drain_timeout_ms", ms, 0)?;
        }
        if let Some(n) = self.pod_workers {
            if !(1..=64).contains(&n) {
                return Err(format!("pod_workers: {n} is not between 1 and 64"));
            }
            base.pod_workers = n;
        }
        if let Some(limits) = self.pod_limits {
            if limits.max_connections == 0 || limits.max_requests == 0 || limits.max_connection_rate == 0 || limits.max_bandwidth == Some(0) {
                return Err("pod_limits: max_connections, max_requests, max_connection_rate and max_bandwidth must be at least 1".into());
            }
            base.pod_limits = limits;
        }
        if let Some(n) = self.node_max_connections {
            if n == 0 {
                return Err("node_max_connections: must be at least 1".into());
            }
            base.node_max_connections = n;
        }
        if let Some(n) = self.node_max_requests {
            if n == 0 {
                return Err("node_max_requests: must be at least 1".into());
            }
            base.node_max_requests = n;
        }
        if self.ebpf_object.is_some() {
            base.ebpf.object = self.ebpf_object;
        }
        set(&mut base.ebpf.pin_path, self.bpf_pin_path);
        set(&mut base.ebpf.sockmap, self.sockmap);
        if let Some(address) = self.xds_address {
            match base.xds.as_mut() {
                Some(xds) => xds.address = address,
                None => {
                    base.xds = Some(XdsSettings {
                        address,
                        tls: None,
                        api: AdsApi::Sotw,
                        cluster_id: "Kubernetes".into(),
                        mesh_id: "cluster.local".into(),
                        istio_version: DEFAULT_ISTIO_VERSION.into(),
                    })
                }
            }
        }
        // The cluster id is istiod's CA's business too.
        let cluster_id_for_xds = if self.ca.as_deref() == Some("istiod") { &None } else { &self.cluster_id };
        let mesh_fields = [&self.xds_api, cluster_id_for_xds, &self.mesh_id, &self.istio_version];
        if let Some(xds) = base.xds.as_mut() {
            if let Some(api) = self.xds_api {
                xds.api = match api.as_str() {
                    "sotw" => AdsApi::Sotw,
                    "delta" => AdsApi::Delta,
                    other => return Err(format!("xds_api: unknown {other:?}: use sotw or delta")),
                };
            }
            set(&mut xds.cluster_id, self.cluster_id);
            set(&mut xds.mesh_id, self.mesh_id);
            set(&mut xds.istio_version, self.istio_version);
        } else if mesh_fields.iter().any(|f| f.is_some()) {
            return Err("xds_api, cluster_id (without ca istiod), mesh_id and istio_version need xds_address".into());
        }
        set(&mut base.pod_health_ports, self.pod_health_ports);
        if let Some(text) = self.probe_snat {
            base.probe_source = parse_probe_snat(&text)?;
        }
        identity.apply_identity(&mut base)?;
        identity.apply_kube(&mut base)?;
        identity.apply_cni_install(&mut base.cni_install)?;
        Ok(base)
    }

    /// The Kubernetes fields: `node_name` turns the watch on; the others need it.
    fn apply_kube(&self, base: &mut AgentConfig) -> Result<(), String> {
        let Some(node_name) = &self.node_name else {
            let stray = [("kubeconfig", self.kubeconfig.is_some()), ("agent_namespace", self.agent_namespace.is_some()), ("revision", self.revision.is_some()), ("pod_wait_ms", self.pod_wait_ms.is_some())];
            if let Some((field, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(format!("{field}: needs node_name (the Kubernetes node this agent runs on)"));
            }
            return Ok(());
        };
        let name_ok = |s: &str| !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !name_ok(node_name) {
            return Err(format!("node_name: {node_name:?} is not a Kubernetes node name"));
        }
        let agent_namespace = self.agent_namespace.clone().unwrap_or_else(|| "weft-system".into());
        if !name_ok(&agent_namespace) {
            return Err(format!("agent_namespace: {agent_namespace:?} is not a Kubernetes namespace name"));
        }
        let pod_wait = millis("pod_wait_ms", self.pod_wait_ms.unwrap_or(3000), 1)?;
        base.kube = Some(KubeSettings {
            kubeconfig: self.kubeconfig.clone(),
            node_name: node_name.clone(),
            agent_namespace,
            revision: self.revision.clone().unwrap_or_else(|| "default".into()),
            pod_wait,
        });
        Ok(())
    }

    /// The identity fields, taken together from this layer (`weft-agent run` merges the file and the flags
    /// into one layer first, see [`ConfigFile::or`]): a CA's settings are complete or refused, by field.
    fn apply_identity(&self, base: &mut AgentConfig) -> Result<(), String> {
        if let Some(td) = &self.trust_domain {
            crate::identity::SpiffeId::new(td, "ns", "sa").map_err(|e| format!("trust_domain: {e}"))?;
            base.identity.trust_domain = td.clone();
        }
        if let Some(s) = self.cert_lifetime_s {
            if !(2..=90 * 86400).contains(&s) {
                return Err(format!("cert_lifetime_s: {s} is out of range, use 2..=7776000 (90 days)"));
            }
            base.identity.cert_lifetime = Duration::from_secs(s);
        }
        let connection = self.istiod_connection()?;
        match self.ca.as_deref() {
            None | Some("none") => {
                let stray = [("ca_address", self.ca_address.is_some()), ("ca_cert", self.ca_cert.is_some()), ("ca_key", self.ca_key.is_some())];
                if let Some((field, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err(format!("{field}: set ca to istiod or file to use it"));
                }
                if self.ca.is_some() {
                    base.identity.ca = None;
                }
            }
            Some("istiod") => {
                if self.ca_cert.is_some() || self.ca_key.is_some() {
                    return Err("ca_cert, ca_key: only for ca file".into());
                }
                let address = self.ca_address.clone().ok_or("ca_address: needed by ca istiod (istiod's secured port, host:15012)")?;
                check_address(&address).map_err(|e| format!("ca_address: {e}"))?;
                let connection = connection.clone().ok_or("istiod_root_cert: needed by ca istiod")?;
                let cluster_id = match (&self.cluster_id, &base.xds) {
                    (Some(id), _) => id.clone(),
                    (None, Some(xds)) => xds.cluster_id.clone(),
                    (None, None) => "Kubernetes".into(),
                };
                base.identity.ca = Some(CaSettings::Istiod(IstiodCa { address, connection, cluster_id }));
            }
            Some("file") => {
                if self.ca_address.is_some() {
                    return Err("ca_address: only for ca istiod".into());
                }
                let cert = self.ca_cert.clone().ok_or("ca_cert: needed by ca file")?;
                let key = self.ca_key.clone().ok_or("ca_key: needed by ca file")?;
                base.identity.ca = Some(CaSettings::File { cert, key });
            }
            Some(other) => return Err(format!("ca: unknown {other:?}: use istiod, file or none")),
        }
        if let Some(tls) = self.xds_tls {
            let xds = base.xds.as_mut().ok_or("xds_tls: needs xds_address")?;
            xds.tls = match tls {
                true => Some(connection.ok_or("istiod_root_cert: needed by xds_tls")?),
                false => None,
            };
        }
        Ok(())
    }

    fn apply_cni_install(&self, cni: &mut CniInstallSettings) -> Result<(), String> {
        set(&mut cni.enabled, self.install_cni);
        set(&mut cni.conf_dir, self.cni_conf_dir.clone());
        set(&mut cni.bin_dir, self.cni_bin_dir.clone());
        if self.cni_binary.is_some() {
            cni.binary = self.cni_binary.clone();
        }
        if let Some(namespaces) = &self.cni_exclude_namespaces {
            if let Some(bad) = namespaces.iter().find(|n| n.is_empty() || n.contains(|c: char| c.is_whitespace() || c == ',')) {
                return Err(format!("cni_exclude_namespaces: {bad:?} is not a namespace name"));
            }
            cni.exclude_namespaces = namespaces.clone();
        }
        if let Some(log) = &self.cni_log_file {
            if !log.is_absolute() {
                return Err(format!("cni_log_file: {} must be an absolute path on the host", log.display()));
            }
            cni.log_file = Some(log.clone());
        }
        Ok(())
    }

    /// istiod's secured-port settings, when a root certificate is given.
    fn istiod_connection(&self) -> Result<Option<IstiodConnection>, String> {
        let Some(root_cert) = self.istiod_root_cert.clone() else {
            if self.istiod_token_file.is_some() || self.istiod_server_name.is_some() {
                return Err("istiod_token_file, istiod_server_name: need istiod_root_cert".into());
            }
            return Ok(None);
        };
        let server_name = self.istiod_server_name.clone().unwrap_or_else(|| DEFAULT_ISTIOD_SERVER_NAME.into());
        rustls_pki_types::ServerName::try_from(server_name.as_str()).map_err(|e| format!("istiod_server_name: {server_name:?}: {e}"))?;
        let token_file = self.istiod_token_file.clone().unwrap_or_else(|| DEFAULT_TOKEN_FILE.into());
        Ok(Some(IstiodConnection { root_cert, token_file, server_name }))
    }

    /// This layer with the fields it leaves unset taken from `under`.
    pub fn or(self, under: ConfigFile) -> ConfigFile {
        ConfigFile {
            cni_socket: self.cni_socket.or(under.cni_socket),
            state_dir: self.state_dir.or(under.state_dir),
            redirect: self.redirect.or(under.redirect),
            iptables_variant: self.iptables_variant.or(under.iptables_variant),
            admin_address: self.admin_address.or(under.admin_address),
            log_level: self.log_level.or(under.log_level),
            connect_timeout_ms: self.connect_timeout_ms.or(under.connect_timeout_ms),
            ebpf_object: self.ebpf_object.or(under.ebpf_object),
            bpf_pin_path: self.bpf_pin_path.or(under.bpf_pin_path),
            sockmap: self.sockmap.or(under.sockmap),
            drain_timeout_ms: self.drain_timeout_ms.or(under.drain_timeout_ms),
            xds_address: self.xds_address.or(under.xds_address),
            xds_api: self.xds_api.or(under.xds_api),
            cluster_id: self.cluster_id.or(under.cluster_id),
            mesh_id: self.mesh_id.or(under.mesh_id),
            istio_version: self.istio_version.or(under.istio_version),
            pod_workers: self.pod_workers.or(under.pod_workers),
            pod_limits: self.pod_limits.or(under.pod_limits),
            node_max_connections: self.node_max_connections.or(under.node_max_connections),
            node_max_requests: self.node_max_requests.or(under.node_max_requests),
            trust_domain: self.trust_domain.or(under.trust_domain),
            ca: self.ca.or(under.ca),
            ca_address: self.ca_address.or(under.ca_address),
            ca_cert: self.ca_cert.or(under.ca_cert),
            ca_key: self.ca_key.or(under.ca_key),
            cert_lifetime_s: self.cert_lifetime_s.or(under.cert_lifetime_s),
            istiod_root_cert: self.istiod_root_cert.or(under.istiod_root_cert),
            istiod_token_file: self.istiod_token_file.or(under.istiod_token_file),
            istiod_server_name: self.istiod_server_name.or(under.istiod_server_name),
            xds_tls: self.xds_tls.or(under.xds_tls),
            node_name: self.node_name.or(under.node_name),
            kubeconfig: self.kubeconfig.or(under.kubeconfig),
            agent_namespace: self.agent_namespace.or(under.agent_namespace),
            revision: self.revision.or(under.revision),
            pod_wait_ms: self.pod_wait_ms.or(under.pod_wait_ms),
            install_cni: self.install_cni.or(under.install_cni),
            cni_conf_dir: self.cni_conf_dir.or(under.cni_conf_dir),
            cni_bin_dir: self.cni_bin_dir.or(under.cni_bin_dir),
            cni_binary: self.cni_binary.or(under.cni_binary),
            cni_exclude_namespaces: self.cni_exclude_namespaces.or(under.cni_exclude_namespaces),
            cni_log_file: self.cni_log_file.or(under.cni_log_file),
            probe_snat: self.probe_snat.or(under.probe_snat),
            pod_health_ports: self.pod_health_ports.or(under.pod_health_ports),
        }
    }
}

/// `off`, or a link-local IPv4 address: no pod or remote host may have it, or its connections would skip
/// capture on the probe ports.
fn parse_probe_snat(text: &str) -> Result<Option<std::net::Ipv4Addr>, String> {
    if text == "off" {
        return Ok(None);
    }
    let ip: std::net::Ipv4Addr =
        text.parse().map_err(|_| format!("probe_snat: {text:?} is not an IPv4 address or `off`"))?;
    if !ip.is_link_local() {
        return Err(format!("probe_snat: {ip} is not link-local (169.254.0.0/16); use e.g. 169.254.7.127, or `off`"));
    }
    Ok(Some(ip))
}

/// `host:port` with a non-zero port.
fn check_address(address: &str) -> Result<(), String> {
    let (host, port) = address.rsplit_once(':').ok_or_else(|| format!("{address:?} is not host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{address:?}: port {port:?} is not a number below 65536"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("{address:?} is not host:port"));
    }
    format!("https://{address}").parse::<tonic::codegen::http::Uri>().map_err(|e| format!("{address:?}: {e}"))?;
    Ok(())
}

fn millis(field: &str, ms: u64, min: u64) -> Result<Duration, String> {
    if (min..=300_000).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(format!("{field}: {ms} is out of range, use {min}..=300000"))
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

pub fn parse_level(s: &str) -> Result<tracing::Level, String> {
    s.parse().map_err(|_| format!("unknown log level {s:?}: use error, warn, info, debug or trace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str) -> Result<AgentConfig, String> {
        serde_json::from_str::<ConfigFile>(json).map_err(|e| e.to_string())?.apply(AgentConfig::default())
    }

    #[test]
    fn file_overrides_defaults() {
        let cfg = file(r#"{"redirect":"nftables","state_dir":"/tmp/w","log_level":"debug"}"#).unwrap();
        assert_eq!(cfg.redirect, RedirectMode::Nftables);
        assert_eq!(cfg.state_dir, PathBuf::from("/tmp/w"));
        assert_eq!(cfg.log_level, tracing::Level::DEBUG);
        assert_eq!(cfg.cni_socket, PathBuf::from("/var/run/weft/cni.sock"));
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(file(r#"{"redirect":"ebpff"}"#).unwrap_err().contains("ebpff"));
        assert!(file(r#"{"stat_dir":"/x"}"#).unwrap_err().contains("stat_dir"));
        assert!(file(r#"{"log_level":"loud"}"#).unwrap_err().contains("log_level"));
        assert!(file(r#"{"connect_timeout_ms":0}"#).unwrap_err().contains("connect_timeout_ms"));
    }

    #[test]
    fn probe_snat_defaults_to_ambients_address_and_can_be_turned_off() {
        assert_eq!(file("{}").unwrap().probe_source, Some(crate::capture::DEFAULT_PROBE_SOURCE));
        assert_eq!(file(r#"{"probe_snat":"off"}"#).unwrap().probe_source, None);
        assert_eq!(file(r#"{"probe_snat":"169.254.9.9"}"#).unwrap().probe_source, Some([169, 254, 9, 9].into()));
        assert!(file(r#"{"probe_snat":"10.0.0.1"}"#).unwrap_err().contains("probe_snat: 10.0.0.1 is not link-local"));
        assert!(file(r#"{"probe_snat":"none"}"#).unwrap_err().contains("probe_snat"));
    }

    #[test]
    fn pod_health_ports_are_on_unless_turned_off() {
        assert!(file("{}").unwrap().pod_health_ports);
        assert!(!file(r#"{"pod_health_ports":false}"#).unwrap().pod_health_ports);
        let flag = ConfigFile { pod_health_ports: Some(true), ..ConfigFile::default() };
        let under = serde_json::from_str::<ConfigFile>(r#"{"pod_health_ports":false}"#).unwrap();
        assert!(flag.or(under).apply(AgentConfig::default()).unwrap().pod_health_ports, "the flag wins over the file");
        assert!(file(r#"{"pod_health_ports":"no"}"#).unwrap_err().contains("expected a boolean"));
    }

    #[test]
    fn identity_defaults_to_cluster_local_without_a_ca() {
        let cfg = file("{}").unwrap();
        assert_eq!(cfg.identity, IdentitySettings::default());
        assert_eq!(cfg.identity.trust_domain, "cluster.local");
    }

    #[test]
    fn istiod_ca_and_secured_xds() {
        let cfg = file(
            r#"{"ca":"istiod","ca_address":"istiod.istio-system.svc:15012","istiod_root_cert":"/r.pem",
                "xds_address":"10.0.0.1:15012","xds_tls":true,"cluster_id":"c1","trust_domain":"example.org","cert_lifetime_s":3600}"#,
        )
        .unwrap();
        let connection = IstiodConnection {
            root_cert: "/r.pem".into(),
            token_file: DEFAULT_TOKEN_FILE.into(),
            server_name: DEFAULT_ISTIOD_SERVER_NAME.into(),
        };
        assert_eq!(
            cfg.identity,
            IdentitySettings {
                trust_domain: "example.org".into(),
                ca: Some(CaSettings::Istiod(IstiodCa {
                    address: "istiod.istio-system.svc:15012".into(),
                    connection: connection.clone(),
                    cluster_id: "c1".into()
                })),
                cert_lifetime: Duration::from_secs(3600),
            }
        );
        assert_eq!(cfg.xds.unwrap().tls, Some(connection));
    }

    #[test]
    fn identity_errors_name_the_field() {
        for (json, field) in [
            (r#"{"ca":"istiod","istiod_root_cert":"/r"}"#, "ca_address"),
            (r#"{"ca":"istiod","ca_address":"istiod:15012"}"#, "istiod_root_cert"),
            (r#"{"ca":"istiod","ca_address":"istiod","istiod_root_cert":"/r"}"#, "ca_address"),
            (r#"{"ca":"file","ca_cert":"/c"}"#, "ca_key"),
            (r#"{"ca":"vault"}"#, "ca: unknown"),
            (r#"{"ca_cert":"/c"}"#, "ca_cert"),
            (r#"{"trust_domain":"Cluster.Local"}"#, "trust_domain"),
            (r#"{"cert_lifetime_s":1}"#, "cert_lifetime_s"),
            (r#"{"xds_tls":true}"#, "xds_tls"),
            (r#"{"xds_address":"10.0.0.1:15012","xds_tls":true}"#, "istiod_root_cert"),
            (r#"{"istiod_token_file":"/t"}"#, "istiod_root_cert"),
            (r#"{"istiod_root_cert":"/r","istiod_server_name":"bad name"}"#, "istiod_server_name"),
        ] {
            let e = file(json).unwrap_err();
            assert!(e.contains(field), "{json}: {e}");
        }
    }

    #[test]
    fn cni_install_fields() {
        let cfg = file("{}").unwrap();
        assert_eq!(cfg.cni_install, CniInstallSettings::default());
        assert!(!cfg.cni_install.enabled);
        assert_eq!(cfg.cni_install.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(cfg.cni_install.bin_dir, PathBuf::from("/opt/cni/bin"));
        let cfg = file(
            r#"{"install_cni":true,"cni_conf_dir":"/host/etc/cni/net.d","cni_bin_dir":"/host/opt/cni/bin",
                "cni_exclude_namespaces":[],"cni_log_file":"/var/log/weft-cni.log"}"#,
        )
        .unwrap();
        assert!(cfg.cni_install.enabled);
        assert_eq!(cfg.cni_install.conf_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert!(cfg.cni_install.exclude_namespaces.is_empty());
        assert_eq!(cfg.cni_install.log_file, Some(PathBuf::from("/var/log/weft-cni.log")));
        assert!(file(r#"{"cni_log_file":"weft.log"}"#).unwrap_err().contains("cni_log_file"));
        assert!(file(r#"{"cni_exclude_namespaces":["a b"]}"#).unwrap_err().contains("cni_exclude_namespaces"));
    }

    #[test]
    fn flags_complete_the_file() {
        let from_file: ConfigFile = serde_json::from_str(r#"{"ca":"file","ca_cert":"/c"}"#).unwrap();
        let flags = ConfigFile { ca_key: Some("/k".into()), ..ConfigFile::default() };
        let cfg = flags.or(from_file).apply(AgentConfig::default()).unwrap();
        assert_eq!(cfg.identity.ca, Some(CaSettings::File { cert: "/c".into(), key: "/k".into() }));
    }
}
