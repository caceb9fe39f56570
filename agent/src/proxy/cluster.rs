//! Upstream connections: a cluster's endpoint is chosen (round robin, random, or the original destination)
//! and connected to, from the agent's namespace (standalone proxy) or from a socket inside the pod's own
//! network namespace carrying the bypass mark (node agent), so the pod IP stays the source address.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::{Direction, ProxySettings};
use crate::capture::netns::Netns;
use crate::capture::{INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6, PROXY_MARK};
use crate::config::cluster::{Cluster, Discovery, LbPolicy};

/// One cluster as the data path sees it.
pub struct ClusterRef<'a> {
    pub config: &'a Cluster,
    /// STATIC endpoints, or EDS endpoints as last received; empty for ORIGINAL_DST.
    pub endpoints: &'a [SocketAddr],
    /// Round-robin position.
    pub cursor: &'a AtomicUsize,
    /// Counters shown by the admin endpoint, where the configuration keeps them.
    pub counters: Option<&'a ClusterCounters>,
}

/// A configuration's clusters.
pub trait Clusters: Send + Sync + 'static {
    fn cluster(&self, name: &str) -> Option<ClusterRef<'_>>;
}

/// Counters of one cluster, named as Envoy names them.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub upstream_cx_total: AtomicU64,
    pub upstream_cx_connect_fail: AtomicU64,
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

/// Connects to an endpoint of cluster `name`. `original_dst` is the downstream connection's original
/// destination (ORIGINAL_DST clusters); `netns` is the pod the connection is made from, if any.
pub async fn connect<C: Clusters + ?Sized>(
    clusters: &C,
    name: &str,
    original_dst: Option<SocketAddr>,
    netns: Option<&Netns>,
) -> Result<TcpStream, UpstreamError> {
    let c = clusters.cluster(name).ok_or_else(|| UpstreamError::UnknownCluster(name.to_string()))?;
    let endpoint = pick(&c, original_dst)?;
    let result = open(endpoint, c.config.source_address, netns, c.config.connect_timeout).await;
    if let Some(counters) = c.counters {
        counters.upstream_cx_total.fetch_add(1, Relaxed);
        if result.is_err() {
            counters.upstream_cx_connect_fail.fetch_add(1, Relaxed);
        }
    }
    result.map_err(UpstreamError::Connect)
}

fn pick(c: &ClusterRef<'_>, original_dst: Option<SocketAddr>) -> Result<SocketAddr, UpstreamError> {
    let endpoints = c.endpoints;
    match &c.config.discovery {
        Discovery::OriginalDst => original_dst.ok_or(UpstreamError::NoHealthyUpstream),
        _ if endpoints.is_empty() => Err(UpstreamError::NoHealthyUpstream),
        _ => {
            let i = match c.config.lb_policy {
                LbPolicy::Random => random_index(endpoints.len()),
                _ => c.cursor.fetch_add(1, Relaxed),
            };
            Ok(endpoints[i % endpoints.len()])
        }
    }
}

/// Connects to `dst` from `source` (any when `None`), inside `netns` with the bypass mark when given.
async fn open(dst: SocketAddr, source: Option<SocketAddr>, netns: Option<&Netns>, timeout: Duration) -> io::Result<TcpStream> {
    let socket = match netns {
        Some(ns) => ns.with(|| upstream_socket(dst, source, true))??,
        None => upstream_socket(dst, source, false)?,
    };
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out"))),
    }
}

fn upstream_socket(dst: SocketAddr, source: Option<SocketAddr>, mark: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    if mark {
        socket.set_mark(PROXY_MARK)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if let Some(source) = source {
        // ::6 (Istio's inbound passthrough source) is not assigned to lo the way all of 127/8 is.
        match source.ip() {
            IpAddr::V4(_) => socket.set_freebind(true)?,
            IpAddr::V6(_) => socket.set_freebind_ipv6(true)?,
        }
        socket.bind(&SockAddr::from(source))?;
    }
    Ok(socket)
}

/// Without a control plane: connects to where the application meant to go. Inbound connections go to the
/// local app from Istio's passthrough address, which the capture rules let through without redirecting them.
pub async fn connect_original_dst(ns: &Netns, dst: SocketAddr, direction: Direction, settings: &ProxySettings) -> io::Result<TcpStream> {
    let source = (direction == Direction::Inbound).then(|| match dst.ip() {
        IpAddr::V4(_) => SocketAddr::new(INBOUND_PASSTHROUGH_V4.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(INBOUND_PASSTHROUGH_V6.into(), 0),
    });
    open(dst, source, Some(ns), settings.connect_timeout).await
}

/// The standalone proxy's clusters, with their endpoints resolved and their counters.
pub struct ClusterManager {
    clusters: HashMap<String, ClusterRuntime>,
}

struct ClusterRuntime {
    config: Cluster,
    endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
    stats: ClusterCounters,
}

impl ClusterManager {
    /// Clusters with EDS endpoints resolved from `assignments` (service name → endpoints); an EDS cluster
    /// without an assignment has no healthy upstream.
    pub fn new(clusters: &[Cluster], assignments: &HashMap<String, Vec<SocketAddr>>) -> ClusterManager {
        let runtime = |c: &Cluster| {
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
    pub fn all(&self) -> Vec<(&Cluster, &[SocketAddr], &ClusterCounters)> {
        let mut all: Vec<_> = self.clusters.values().map(|c| (&c.config, c.endpoints.as_slice(), &c.stats)).collect();
        all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        all
    }
}

impl Clusters for ClusterManager {
    fn cluster(&self, name: &str) -> Option<ClusterRef<'_>> {
        self.clusters.get(name).map(|c| ClusterRef { config: &c.config, endpoints: &c.endpoints, cursor: &c.next, counters: Some(&c.stats) })
    }
}

fn random_index(len: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(len);
    h.finish() as usize % len.max(1)
}
