//! The configuration a captured pod is served by when there is no control plane: what istiod gives a sidecar
//! that knows no services — `virtualOutbound` (15001) and `virtualInbound` (15006) relaying every connection
//! to its original destination through ORIGINAL_DST clusters, inbound from Istio's passthrough source
//! addresses (127.0.0.6, ::6) which capture lets through. One data path: the same listeners, filter chains
//! and clusters as configuration from istiod, only generated here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::snapshot::Snapshot;
use crate::capture::{INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6, INBOUND_PORT, OUTBOUND_PORT};
use crate::config::cluster::{CircuitBreakers, Cluster, Discovery, LbPolicy};
use crate::config::listener::{CidrRange, FilterChain, FilterChainMatch, Listener, ListenerFilters, TcpProxy};
use crate::config::store::Resource;

pub const OUTBOUND_CLUSTER: &str = "PassthroughCluster";
pub const INBOUND_CLUSTER_V4: &str = "InboundPassthroughClusterIpv4";
pub const INBOUND_CLUSTER_V6: &str = "InboundPassthroughClusterIpv6";

/// The pass-through snapshot; upstream connections time out after `connect_timeout`.
pub fn snapshot(connect_timeout: Duration) -> Snapshot {
    let listeners = [
        listener("virtualOutbound", OUTBOUND_PORT, vec![chain(None, OUTBOUND_CLUSTER)]),
        listener(
            "virtualInbound",
            INBOUND_PORT,
            vec![chain(Some(Ipv4Addr::UNSPECIFIED.into()), INBOUND_CLUSTER_V4), chain(Some(Ipv6Addr::UNSPECIFIED.into()), INBOUND_CLUSTER_V6)],
        ),
    ];
    let clusters = [
        cluster(OUTBOUND_CLUSTER, None, connect_timeout),
        cluster(INBOUND_CLUSTER_V4, Some(INBOUND_PASSTHROUGH_V4.into()), connect_timeout),
        cluster(INBOUND_CLUSTER_V6, Some(INBOUND_PASSTHROUGH_V6.into()), connect_timeout),
    ];
    Snapshot {
        listeners: std::sync::Arc::new(listeners.into_iter().map(|l| Resource::fixed(&l.name.clone(), l)).collect()),
        clusters: std::sync::Arc::new(clusters.into_iter().map(|c| Resource::fixed(&c.name.clone(), c)).collect()),
        ..Snapshot::default()
    }
}

fn listener(name: &str, port: u16, filter_chains: Vec<FilterChain>) -> Listener {
    Listener {
        name: name.to_string(),
        address: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        filter_chains,
        default_filter_chain: None,
        use_original_dst: false,
        bind_to_port: true,
        listener_filters: ListenerFilters::original_dst_only(),
        direction: Default::default(),
        access_log: Default::default(),
        buffer_limit: crate::config::DEFAULT_BUFFER_LIMIT,
    }
}

/// A chain for destinations of one address family (`None`: any).
fn chain(family: Option<IpAddr>, cluster: &str) -> FilterChain {
    let matcher = FilterChainMatch { prefix_ranges: family.map(|prefix| CidrRange { prefix, len: 0 }).into_iter().collect(), ..Default::default() };
    FilterChain { name: cluster.to_string(), matcher, transport_socket: Default::default(), transport_socket_connect_timeout: None, metadata_exchange: None, rbac: Vec::new(), istio_stats: None, filter: TcpProxy::to(cluster) }
}

fn cluster(name: &str, source: Option<IpAddr>, connect_timeout: Duration) -> Cluster {
    Cluster {
        name: name.to_string(),
        discovery: Discovery::OriginalDst,
        connect_timeout,
        lb_policy: LbPolicy::ClusterProvided,
        http2: false,
        follow_downstream_protocol: false,
        idle_timeout: Some(Duration::from_secs(3600)),
        max_requests_per_connection: None,
        http2_settings: Default::default(),
        source_address: source.map(|ip| SocketAddr::new(ip, 0)),
        circuit_breakers: CircuitBreakers::default(),
        outlier_detection: None,
        healthy_panic_threshold: 50.0,
        locality_weighted: false,
        health_check: None,
        transport_socket: Default::default(),
        transport_socket_matches: Vec::new(),
        metadata: Default::default(),
        metadata_exchange: None,
        buffer_limit: crate::config::DEFAULT_BUFFER_LIMIT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_relays_by_family_to_the_original_destination() {
        let s = snapshot(Duration::from_secs(1));
        let inbound = s.bound_on_port(INBOUND_PORT).unwrap();
        let info = |dst: &str| super::super::filter_chain::ConnectionInfo {
            local: dst.parse().unwrap(),
            peer: "10.0.0.9:1234".parse().unwrap(),
            server_name: None,
            transport_protocol: "raw_buffer",
            application_protocols: Vec::new(),
        };
        let v4 = super::super::filter_chain::select(inbound, &info("10.0.0.2:8080")).unwrap();
        assert_eq!(v4.filter, TcpProxy::to(INBOUND_CLUSTER_V4));
        let v6 = super::super::filter_chain::select(inbound, &info("[fd00::2]:8080")).unwrap();
        assert_eq!(v6.filter, TcpProxy::to(INBOUND_CLUSTER_V6));
        assert_eq!(s.cluster(INBOUND_CLUSTER_V4).unwrap().config.source_address, Some("127.0.0.6:0".parse().unwrap()));
        assert!(s.bound_on_port(OUTBOUND_PORT).is_some());
    }
}
