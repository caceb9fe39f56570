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
    /// istiod's xDS address (plaintext gRPC, e.g. port 15010).
    pub address: std::net::SocketAddr,
    pub api: AdsApi,
    pub cluster_id: String,
    pub mesh_id: String,
    pub istio_version: String,
}

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
        }
    }
}

/// The config file: every field optional, unknown fields refused so a typo never goes unnoticed.
#[derive(Debug, Default, Deserialize)]
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
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<ConfigFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Layers this file over `base`.
    pub fn apply(self, mut base: AgentConfig) -> Result<AgentConfig, String> {
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
                        api: AdsApi::Sotw,
                        cluster_id: "Kubernetes".into(),
                        mesh_id: "cluster.local".into(),
                        istio_version: "1.24.0".into(),
                    })
                }
            }
        }
        let mesh_fields = [&self.xds_api, &self.cluster_id, &self.mesh_id, &self.istio_version];
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
            return Err("xds_api, cluster_id, mesh_id and istio_version need xds_address".into());
        }
        Ok(base)
    }
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
}
