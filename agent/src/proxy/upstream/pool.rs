//! Upstream HTTP connection pools, one set per socket factory (the standalone proxy, or one pod): per
//! endpoint and source address, HTTP/1.1 connections are kept alive and reused one request at a time, and
//! one HTTP/2 connection carries every concurrent request as its own stream, as Envoy's pools do. Dropping
//! the pools closes their idle connections.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::super::body::Body;
use super::super::socket::SocketFactory;
use super::runtime::ClusterRuntime;
use crate::config::cluster::{CircuitBreakers, Cluster};

/// Which connections of a pool can serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub endpoint: SocketAddr,
    /// `upstream_bind_config` of the cluster.
    pub source: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Why a request got no response.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be made (Envoy's "remote connection failure").
    Connect(io::Error),
    /// The connection failed or was reset before the response headers (Envoy's "connection termination").
    Reset(hyper::Error),
    /// The cluster's circuit breakers refused it (`max_connections` with `max_pending_requests` waiting).
    Overflow,
}

impl PoolError {
    /// Envoy's reset reason in its local reply body.
    pub fn reason(&self) -> &'static str {
        match self {
            PoolError::Connect(_) => "remote connection failure",
            PoolError::Reset(e) => match stream_reset(e) {
                Some(h2::Reason::REFUSED_STREAM) => "remote refused stream reset",
                Some(_) => "remote reset",
                None => "connection termination",
            },
            PoolError::Overflow => "overflow",
        }
    }
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Connect(e) => write!(f, "connect: {e}"),
            PoolError::Reset(e) => write!(f, "reset before response headers: {e}"),
            PoolError::Overflow => f.write_str("circuit breaker overflow"),
        }
    }
}

/// The HTTP/2 error code of a stream the upstream reset, if that is what happened.
pub fn stream_reset(e: &hyper::Error) -> Option<h2::Reason> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_remote().then(|| h2.reason()).flatten().filter(|_| h2.is_reset());
        }
        source = err.source();
    }
    None
}

/// An idle HTTP/1.1 connection: the requests it has carried, and which parking of it this is (so its idle
/// timer removes it only if it is still that parking).
struct Pooled {
    sender: http1::SendRequest<Body>,
    used: u64,
    parked: u64,
}

/// How a cluster's connections are reused.
#[derive(Debug, Clone, Copy)]
pub struct Reuse<'a> {
    pub connect_timeout: Duration,
    pub limits: &'a CircuitBreakers,
    /// Closed after this long unused (`common_http_protocol_options.idle_timeout`).
    pub idle_timeout: Option<Duration>,
    /// Not reused after this many requests (`max_requests_per_connection`).
    pub max_requests: Option<u64>,
}

impl<'a> Reuse<'a> {
    pub fn of(cluster: &'a Cluster) -> Reuse<'a> {
        Reuse {
            connect_timeout: cluster.connect_timeout,
            limits: &cluster.circuit_breakers,
            idle_timeout: cluster.idle_timeout,
            max_requests: cluster.max_requests_per_connection,
        }
    }
}

static PARKINGS: AtomicU64 = AtomicU64::new(0);

pub struct Pools {
    sockets: SocketFactory,
    idle_http1: Mutex<HashMap<Key, Vec<Pooled>>>,
    /// Each endpoint's HTTP/2 connection and the streams it has carried.
    http2: Mutex<HashMap<Key, (http2::SendRequest<Body>, u64)>>,
    clusters: Mutex<HashMap<String, Arc<ClusterRuntime>>>,
}

impl Pools {
    pub fn new(sockets: SocketFactory) -> Arc<Pools> {
        Arc::new(Pools { sockets, idle_http1: Mutex::default(), http2: Mutex::default(), clusters: Mutex::default() })
    }

    /// This pod's state of cluster `name`.
    pub fn runtime(&self, name: &str) -> Arc<ClusterRuntime> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        match clusters.get(name) {
            Some(r) => Arc::clone(r),
            None => Arc::clone(clusters.entry(name.to_string()).or_default()),
        }
    }

    pub fn sockets(&self) -> &SocketFactory {
        &self.sockets
    }

    /// Sends `req` on a pooled connection to `key`, making one when none is free (within the cluster's
    /// circuit breakers). Returns whether a new connection was made, for the cluster's counters.
    pub async fn send(
        self: &Arc<Self>,
        key: Key,
        protocol: Protocol,
        reuse: Reuse<'_>,
        runtime: &Arc<ClusterRuntime>,
        req: Request<Body>,
    ) -> (Result<Response<Incoming>, PoolError>, bool) {
        match protocol {
            Protocol::Http1 => self.send_http1(key, reuse, runtime, req).await,
            Protocol::Http2 => self.send_http2(key, reuse, req).await,
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        key: Key,
        reuse: Reuse<'_>,
        runtime: &Arc<ClusterRuntime>,
        mut req: Request<Body>,
    ) -> (Result<Response<Incoming>, PoolError>, bool) {
        let limits = reuse.limits;
        loop {
            while let Some(Pooled { mut sender, used, .. }) = self.idle(key) {
                match sender.try_send_request(req).await {
                    Ok(response) => {
                        self.recycle(key, sender, used + 1, reuse, runtime);
                        return (Ok(response), false);
                    }
                    // The kept-alive connection was closed by the upstream before the request went out: the
                    // request comes back unsent and goes on another connection.
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => return (Err(PoolError::Reset(e.into_error())), false),
                    },
                }
            }
            if runtime.connections.load(Relaxed) < limits.max_connections {
                break;
            }
            // At max_connections: wait for a connection to come back, if there is room to wait.
            if runtime.pending.fetch_add(1, Relaxed) >= limits.max_pending_requests {
                runtime.pending.fetch_sub(1, Relaxed);
                return (Err(PoolError::Overflow), false);
            }
            let freed = runtime.freed.notified();
            let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
            runtime.pending.fetch_sub(1, Relaxed);
        }
        let mut sender = match self.connect_http1(key, reuse.connect_timeout, runtime).await {
            Ok(s) => s,
            Err(e) => return (Err(e), true),
        };
        let result = sender.send_request(req).await.map_err(PoolError::Reset);
        if result.is_ok() {
            self.recycle(key, sender, 1, reuse, runtime);
        }
        (result, true)
    }

    fn idle(&self, key: Key) -> Option<Pooled> {
        let mut idle = self.idle_http1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&key)?;
        while let Some(pooled) = list.pop() {
            if pooled.sender.is_ready() {
                return Some(pooled);
            }
        }
        None
    }

    /// Puts the connection back once its response has been read to the end (an HTTP/1.1 connection carries
    /// one exchange at a time), unless it has carried `max_requests`; a connection that closes instead is
    /// forgotten, and one left unused for the idle timeout is closed.
    fn recycle(self: &Arc<Self>, key: Key, mut sender: http1::SendRequest<Body>, used: u64, reuse: Reuse<'_>, runtime: &Arc<ClusterRuntime>) {
        let pools: Weak<Pools> = Arc::downgrade(self);
        let runtime = Arc::clone(runtime);
        let (idle_timeout, spent) = (reuse.idle_timeout, reuse.max_requests.is_some_and(|max| used >= max));
        tokio::spawn(async move {
            let parked = PARKINGS.fetch_add(1, Relaxed);
            let back = !spent && sender.ready().await.is_ok();
            if back {
                let Some(p) = pools.upgrade() else { return };
                p.idle_list(key, |list| list.push(Pooled { sender, used, parked }));
            }
            runtime.freed.notify_one();
            if let (true, Some(idle)) = (back, idle_timeout) {
                tokio::time::sleep(idle).await;
                if let Some(p) = pools.upgrade() {
                    // Still parked since then: dropping its sender closes the connection.
                    p.idle_list(key, |list| list.retain(|c| c.parked != parked));
                }
            }
        });
    }

    fn idle_list<T>(&self, key: Key, f: impl FnOnce(&mut Vec<Pooled>) -> T) -> T {
        let mut idle = self.idle_http1.lock().unwrap_or_else(|e| e.into_inner());
        f(idle.entry(key).or_default())
    }

    async fn connect_http1(&self, key: Key, timeout: Duration, runtime: &Arc<ClusterRuntime>) -> Result<http1::SendRequest<Body>, PoolError> {
        let stream = self.sockets.connect(key.endpoint, key.source, timeout).await.map_err(PoolError::Connect)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(PoolError::Reset)?;
        runtime.connections.fetch_add(1, Relaxed);
        let runtime = Arc::clone(runtime);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream HTTP/1.1 connection ended: {e}");
            }
            runtime.connections.fetch_sub(1, Relaxed);
            runtime.freed.notify_one();
        });
        Ok(sender)
    }

    /// Sends an upgrade request (WebSocket) on a connection of its own: after a 101 the connection belongs to
    /// the upgraded stream, so it never returns to the pool.
    pub async fn send_upgrade(&self, key: Key, timeout: Duration, req: Request<Body>) -> Result<Response<Incoming>, PoolError> {
        let stream = self.sockets.connect(key.endpoint, key.source, timeout).await.map_err(PoolError::Connect)?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(PoolError::Reset)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream upgrade connection ended: {e}");
            }
        });
        sender.send_request(req).await.map_err(PoolError::Reset)
    }

    /// One HTTP/2 connection per endpoint carries every request; after `max_requests` streams new requests
    /// go on a new connection while the old one finishes its streams.
    async fn send_http2(&self, key: Key, reuse: Reuse<'_>, req: Request<Body>) -> (Result<Response<Incoming>, PoolError>, bool) {
        let existing = {
            let mut conns = self.http2.lock().unwrap_or_else(|e| e.into_inner());
            match conns.get_mut(&key).filter(|(s, used)| !s.is_closed() && reuse.max_requests.is_none_or(|max| *used < max)) {
                Some((sender, used)) => {
                    *used += 1;
                    Some(sender.clone())
                }
                None => None,
            }
        };
        let (mut sender, fresh) = match existing {
            Some(s) => (s, false),
            None => match self.connect_http2(key, reuse.connect_timeout).await {
                Ok(s) => (s, true),
                Err(e) => return (Err(e), true),
            },
        };
        (sender.send_request(req).await.map_err(PoolError::Reset), fresh)
    }

    async fn connect_http2(&self, key: Key, timeout: Duration) -> Result<http2::SendRequest<Body>, PoolError> {
        let stream = self.sockets.connect(key.endpoint, key.source, timeout).await.map_err(PoolError::Connect)?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.map_err(PoolError::Reset)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream HTTP/2 connection ended: {e}");
            }
        });
        self.http2.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (sender.clone(), 1));
        Ok(sender)
    }
}
