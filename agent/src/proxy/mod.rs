//! The node proxy's data path: in-pod listeners and the standalone proxy's listeners, the connection handler
//! (`use_original_dst` hand-off, listener filters, filter chains), tcp_proxy, the HTTP connection manager,
//! and clusters. Nothing in this module touches the control path's locks: configuration arrives as immutable
//! snapshots (see shared/DESIGN.md).

pub mod cluster;
pub mod connection_handler;
pub mod filter_chain;
pub mod http;
pub mod listener;
pub mod listener_filter;
pub mod pod;
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
    /// How long a connection may go on after its listener was removed or replaced (Envoy's drain time).
    pub drain_timeout: Duration,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings { connect_timeout: Duration::from_secs(10), drain_timeout: Duration::from_secs(30) }
    }
}
