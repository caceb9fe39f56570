//! The node proxy's data path, in Envoy's order: listeners (in-pod and standalone) accept, the connection
//! handler runs the `use_original_dst` hand-off, listener filters and filter chain selection, then the
//! chain's network filter (tcp_proxy, or the HTTP connection manager with its route step and HTTP filters
//! ending in the router), then upstreams (cluster, endpoint, pooled connections made by the socket factory).
//! Configuration arrives as immutable snapshots (`snapshot`, a leaf); nothing here touches the control
//! path's locks (see shared/DESIGN.md).

pub mod access_log;
pub mod activity;
pub mod body;
pub mod connection_handler;
pub mod filter_chain;
pub mod filters;
pub mod istio_metrics;
pub mod listener;
pub mod listener_filter;
pub mod passthrough;
pub mod pod_share;
pub mod route;
pub mod server;
pub mod snapshot;
pub mod socket;
pub mod stats;
pub mod stream_info;
#[cfg(test)]
pub mod testing;
pub mod tls;
pub mod tls_info;
pub mod tracer;
pub mod upstream;

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
    /// Worker threads of each pod's own share of the proxy.
    pub pod_workers: usize,
    pub pod_limits: pod_share::PodLimits,
    /// Connections of all pods together; at it, only pods under their equal share get new ones.
    pub node_max_connections: u64,
    /// Requests in flight of all pods together; at it, only pods under their equal share get new ones.
    pub node_max_requests: u64,
    /// Whether each captured pod answers on 15021 (`/healthz/ready`) and 15020 (`/healthz/ready`,
    /// `/stats/prometheus`) as its Istio sidecar did.
    pub pod_health_ports: bool,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            pod_workers: 2,
            pod_limits: pod_share::PodLimits::default(),
            node_max_connections: 65536,
            node_max_requests: 65536,
            pod_health_ports: true,
        }
    }
}
