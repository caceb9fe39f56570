//! Upstream connections. Today the ORIGINAL_DST cluster: connect to where the application meant to go, from a
//! socket in the pod's own network namespace (so the pod IP stays the source address) carrying the bypass mark.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::{Direction, ProxySettings};
use crate::capture::netns::Netns;
use crate::capture::{INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6, PROXY_MARK};

/// Connects to `dst` from inside `ns`. Inbound connections go to the local app from Istio's passthrough
/// address, which the capture rules let through without redirecting them again.
pub async fn connect_original_dst(
    ns: &Netns,
    dst: SocketAddr,
    direction: Direction,
    settings: &ProxySettings,
) -> io::Result<TcpStream> {
    let socket = ns.with(|| upstream_socket(dst, direction))??;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(settings.connect_timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out"))),
    }
}

fn upstream_socket(dst: SocketAddr, direction: Direction) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if direction == Direction::Inbound {
        let source = match dst.ip() {
            IpAddr::V4(_) => SocketAddr::new(INBOUND_PASSTHROUGH_V4.into(), 0),
            IpAddr::V6(_) => {
                // ::6 is not assigned to lo the way all of 127/8 is; freebind lets us use it anyway.
                socket.set_freebind_ipv6(true)?;
                SocketAddr::new(INBOUND_PASSTHROUGH_V6.into(), 0)
            }
        };
        socket.bind(&SockAddr::from(source))?;
    }
    Ok(socket)
}

/// The clusters of a configuration, ready to hand out upstream connections.
pub struct ClusterManager {
    clusters: std::collections::HashMap<String, ClusterRuntime>,
}

struct ClusterRuntime {
    config: crate::config::cluster::Cluster,
    /// STATIC endpoints, or EDS endpoints as last received; empty for ORIGINAL_DST.
    endpoints: Vec<SocketAddr>,
    next: std::sync::atomic::AtomicUsize,
    stats: ClusterCounters,
}

/// Counters of one cluster, named as Envoy names them.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub upstream_cx_total: std::sync::atomic::AtomicU64,
    pub upstream_cx_connect_fail: std::sync::atomic::AtomicU64,
}

/// Why no upstream connection could be made; the HTTP layer turns it into Envoy's 503 bodies.
#[derive(Debug)]
pub enum UpstreamError {
    UnknownCluster(String),
    NoHealthyUpstream,
    Connect(io::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::UnknownCluster(c) => write!(f, "unknown cluster {c:?}"),
            UpstreamError::NoHealthyUpstream => f.write_str("no healthy upstream"),
            UpstreamError::Connect(e) => write!(f, "connection failure: {e}"),
        }
    }
}

impl ClusterManager {
    /// Clusters with EDS endpoints resolved from `assignments` (service name → endpoints); an EDS cluster
    /// without an assignment has no healthy upstream.
    pub fn new(
        clusters: &[crate::config::cluster::Cluster],
        assignments: &std::collections::HashMap<String, Vec<SocketAddr>>,
    ) -> ClusterManager {
        use crate::config::cluster::Discovery;
        let runtime = |c: &crate::config::cluster::Cluster| {
            let endpoints = match &c.discovery {
                Discovery::Static { endpoints } => endpoints.clone(),
                Discovery::Eds { service_name } => assignments.get(service_name).cloned().unwrap_or_default(),
                Discovery::OriginalDst => Vec::new(),
            };
            ClusterRuntime { config: c.clone(), endpoints, next: Default::default(), stats: Default::default() }
        };
        ClusterManager { clusters: clusters.iter().map(|c| (c.name.clone(), runtime(c))).collect() }
    }

    /// Every cluster with its current endpoints and counters, sorted by name.
    pub fn all(&self) -> Vec<(&crate::config::cluster::Cluster, &[SocketAddr], &ClusterCounters)> {
        let mut all: Vec<_> = self.clusters.values().map(|c| (&c.config, c.endpoints.as_slice(), &c.stats)).collect();
        all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        all
    }

    /// Connects to an endpoint of `cluster`; `original_dst` is the downstream connection's original
    /// destination, used by ORIGINAL_DST clusters.
    pub async fn connect(&self, cluster: &str, original_dst: Option<SocketAddr>) -> Result<TcpStream, UpstreamError> {
        use crate::config::cluster::{Discovery, LbPolicy};
        let c = self.clusters.get(cluster).ok_or_else(|| UpstreamError::UnknownCluster(cluster.to_string()))?;
        let endpoints = &c.endpoints;
        let endpoint = match &c.config.discovery {
            Discovery::OriginalDst => original_dst.ok_or(UpstreamError::NoHealthyUpstream)?,
            _ if endpoints.is_empty() => return Err(UpstreamError::NoHealthyUpstream),
            _ => {
                let i = match c.config.lb_policy {
                    LbPolicy::Random => random_index(endpoints.len()),
                    _ => c.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
                endpoints[i % endpoints.len()]
            }
        };
        c.stats.upstream_cx_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = tokio::time::timeout(c.config.connect_timeout, TcpStream::connect(endpoint)).await;
        if !matches!(result, Ok(Ok(_))) {
            c.stats.upstream_cx_connect_fail.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match result {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(e)) => Err(UpstreamError::Connect(e)),
            Err(_) => Err(UpstreamError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))),
        }
    }
}

fn random_index(len: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(len);
    h.finish() as usize % len.max(1)
}
