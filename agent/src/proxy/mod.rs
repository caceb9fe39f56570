//! The node proxy's data path. Today: in-pod listeners with `use_original_dst` semantics, a tcp_proxy filter
//! and an ORIGINAL_DST cluster. Listener filter chains, HTTP and the other cluster types grow here (see
//! shared/DESIGN.md); nothing in this module touches the control path's locks.

pub mod cluster;
pub mod http;
pub mod listener;
pub mod server;
pub mod stats;
pub mod tcp;

use std::time::Duration;

/// Which side of the pod a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Connections the pod makes (listener 15001).
    Outbound,
    /// Connections made to the pod (listener 15006).
    Inbound,
}

/// Data-path settings shared by every pod.
#[derive(Debug, Clone, Copy)]
pub struct ProxySettings {
    /// Upper bound for establishing an upstream connection (Envoy's cluster `connect_timeout`).
    pub connect_timeout: Duration,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings { connect_timeout: Duration::from_secs(10) }
    }
}
