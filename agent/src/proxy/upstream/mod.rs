//! Upstreams: which endpoint of a cluster a connection or request goes to, and the connections to it
//! (made by the snapshot's socket factory; pooled for HTTP).

pub mod cluster;
pub mod dns;
pub mod health;
pub mod lb;
pub mod pool;
pub mod runtime;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hyper::{Request, Response};

use super::body::Body;
use super::snapshot::{ClusterRef, Snapshot};
use pool::{Pools, UpstreamIo};

/// What one downstream connection's upstream connections are made with.
#[derive(Clone)]
pub struct Upstream {
    pub snapshot: Arc<Snapshot>,
    /// The pools (and socket factory) of the pod or proxy the connection belongs to.
    pub pools: Arc<Pools>,
    /// The downstream connection's destination, for ORIGINAL_DST clusters.
    pub original_dst: SocketAddr,
    /// The downstream connection's listener's `per_connection_buffer_limit_bytes`: the most of its data held.
    pub downstream_buffer_limit: usize,
}

/// Why a TCP upstream connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    UnknownCluster(String),
    NoHealthyUpstream,
    /// The endpoint chosen, and why the connection to it failed.
    Connect(SocketAddr, io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::UnknownCluster(c) => write!(f, "unknown cluster {c:?}"),
            ConnectError::NoHealthyUpstream => f.write_str("no healthy upstream"),
            ConnectError::Connect(endpoint, e) => write!(f, "connection failure to {endpoint}: {e}"),
        }
    }
}

impl Upstream {
    /// A request the proxy makes itself (Envoy's async client, as tracers export with): to an endpoint of
    /// `cluster`, on its pooled connections, in the cluster's protocol, counted in its statistics.
    /// `req` carries an absolute URI; over HTTP/1.1 it goes in origin form with a `Host` header.
    pub async fn request(&self, cluster: &str, mut req: Request<Body>) -> Result<Response<Body>, String> {
        let (c, runtime, endpoint) = self.pick(cluster).await.map_err(|e| e.to_string())?;
        let protocol = if c.config.http2 { pool::Protocol::Http2 } else { pool::Protocol::Http1 };
        if protocol == pool::Protocol::Http1 {
            if let Some(host) = req.uri().authority().and_then(|a| hyper::header::HeaderValue::from_str(a.as_str()).ok()) {
                req.headers_mut().entry(hyper::header::HOST).or_insert(host);
            }
            if let Some(origin) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = hyper::Uri::from(origin);
            }
            *req.version_mut() = hyper::Version::HTTP_11;
        } else {
            *req.version_mut() = hyper::Version::HTTP_2;
        }
        c.state.upstream_rq_total.fetch_add(1, Relaxed);
        let (result, fresh) = self.pools.send(pool::Key::of(endpoint, &c, &self.snapshot), protocol, pool::Reuse::of(c.config), &runtime, req).await;
        if fresh {
            c.state.upstream_cx_total.fetch_add(1, Relaxed);
        }
        result.map_err(|e| format!("{endpoint}: {e}"))
    }

    /// `cluster`'s current configuration and runtime state, and the endpoint its load balancer picks.
    async fn pick(&self, cluster: &str) -> Result<(ClusterRef<'_>, Arc<runtime::ClusterRuntime>, SocketAddr), ConnectError> {
        dns::refresh(&self.snapshot, cluster).await;
        health::ensure(&self.snapshot, cluster, self.pools.sockets()).await;
        let c = self.snapshot.cluster(cluster).ok_or_else(|| ConnectError::UnknownCluster(cluster.to_string()))?;
        let runtime = self.pools.runtime(cluster);
        let endpoint = cluster::pick(&c, &runtime, self.original_dst, &[], None).map_err(|_| ConnectError::NoHealthyUpstream)?;
        Ok((c, runtime, endpoint))
    }

    /// A new connection to an endpoint of `cluster` (tcp_proxy), TLS when the cluster originates it.
    pub async fn connect(&self, cluster: &str) -> Result<(UpstreamIo, Arc<pool::UpstreamSession>), ConnectError> {
        let (c, _, endpoint) = self.pick(cluster).await?;
        let result = self.pools.connect(&pool::Key::of(endpoint, &c, &self.snapshot), c.config.connect_timeout).await;
        c.state.upstream_cx_total.fetch_add(1, Relaxed);
        if result.is_err() {
            c.state.upstream_cx_connect_fail.fetch_add(1, Relaxed);
        }
        result.map_err(|e| match e {
            pool::PoolError::Connect(e) => ConnectError::Connect(endpoint, e),
            other => ConnectError::Connect(endpoint, io::Error::other(other.reason())),
        })
    }
}
