//! Upstream HTTP connection pools, one set per socket factory (the standalone proxy, or one pod): per
//! endpoint and source address, HTTP/1.1 connections are kept alive and reused one request at a time, and
//! an HTTP/2 connection carries concurrent requests as streams (up to the cluster's `max_concurrent_streams`,
//! beyond which another connection is opened), as Envoy's pools do. Dropping the pools closes their idle
//! connections.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::super::activity::{Activity, Counted, InFlight};
use super::super::body::Body;
use super::super::filters::network::metadata_exchange::{self, ExchangeStream, PeerSlot};
use super::super::socket::SocketFactory;
use super::super::tls::{MaybeTls, Tls};
use super::runtime::ClusterRuntime;
use crate::config::cluster::{CircuitBreakers, Cluster, Http2Settings};
use crate::config::metadata_exchange::MetadataExchange;
use crate::config::workload_metadata::LocalWorkload;
use crate::config::secret::Secret;
use crate::config::store::ByName;
use crate::config::tls::{TransportSocket, UpstreamTls};
use super::super::snapshot::{ClusterRef, Snapshot};

/// An upstream connection, TLS or not, under the cluster's metadata exchange (which passes everything through
/// when the cluster has none or it was not negotiated).
pub type UpstreamIo = ExchangeStream<MaybeTls<tokio::net::TcpStream, tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>;

/// Who is at the other end of an upstream connection, as Istio's telemetry reports it: the first URI SAN of
/// the server's certificate and of ours (TLS only), and what its metadata exchange learnt. Responses carry it
/// in their extensions.
#[derive(Debug, Default)]
pub struct UpstreamSession {
    /// The endpoint connected to, and the connection's local address (access logs' `UPSTREAM_HOST` and
    /// `UPSTREAM_LOCAL_ADDRESS`).
    pub host: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub peer_uri_san: Option<String>,
    pub local_uri_san: Option<String>,
    pub exchange: Arc<PeerSlot>,
}

/// Which connections of a pool can serve a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub endpoint: SocketAddr,
    /// `upstream_bind_config` of the cluster.
    pub source: Option<SocketAddr>,
    /// The cluster's TLS context: connections are shared only between clusters with the same one.
    pub tls: Option<TlsKey>,
    /// The ALPN list the TLS connection offers instead of the context's (`istio.alpn`): connections offering
    /// different lists are not shared.
    pub alpn: Option<Arc<[String]>>,
    /// The cluster's metadata exchange, with what this side sends.
    pub exchange: Option<ExchangeKey>,
}

impl Key {
    /// Connections of `cluster` to `endpoint` (with the transport socket its metadata selects), with the
    /// secrets of `snapshot`.
    pub fn of(endpoint: SocketAddr, cluster: &ClusterRef<'_>, snapshot: &Snapshot) -> Key {
        let tls = match cluster.config.transport_socket_for(cluster.endpoints.socket_labels(endpoint)) {
            TransportSocket::RawBuffer => None,
            TransportSocket::Tls(context) => Some(TlsKey(Arc::clone(context), Arc::clone(&snapshot.secrets))),
        };
        let exchange = cluster.config.metadata_exchange.as_ref().map(|m| ExchangeKey(Arc::clone(m), Arc::clone(&snapshot.local)));
        Key { endpoint, source: cluster.config.source_address, tls, alpn: None, exchange }
    }

    /// The same connections, offering `alpn` on TLS (a plaintext connection offers nothing).
    pub fn with_alpn(self, alpn: Option<Arc<[String]>>) -> Key {
        let alpn = alpn.filter(|_| self.tls.is_some());
        Key { alpn, ..self }
    }
}

/// A metadata exchange configuration with the local workload it sends, equal only to itself.
#[derive(Debug, Clone)]
pub struct ExchangeKey(pub Arc<MetadataExchange>, pub Arc<LocalWorkload>);

impl PartialEq for ExchangeKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) && Arc::ptr_eq(&self.1, &other.1)
    }
}

impl Eq for ExchangeKey {}

impl std::hash::Hash for ExchangeKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
        std::ptr::hash(Arc::as_ptr(&self.1), state)
    }
}

/// A TLS context with the secrets it names, equal only to itself (a changed cluster or secret gets new
/// connections).
#[derive(Debug, Clone)]
pub struct TlsKey(pub Arc<UpstreamTls>, pub Arc<ByName<Secret>>);

impl PartialEq for TlsKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) && Arc::ptr_eq(&self.1, &other.1)
    }
}

impl Eq for TlsKey {}

impl std::hash::Hash for TlsKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
        std::ptr::hash(Arc::as_ptr(&self.1), state)
    }
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
    session: Arc<UpstreamSession>,
    used: u64,
    parked: u64,
    /// The cluster (by name) whose `max_connections` it counts against.
    runtime: Weak<ClusterRuntime>,
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
    /// `http2_protocol_options` of HTTP/2 connections.
    pub http2: Http2Settings,
}

impl<'a> Reuse<'a> {
    pub fn of(cluster: &'a Cluster) -> Reuse<'a> {
        Reuse {
            connect_timeout: cluster.connect_timeout,
            limits: &cluster.circuit_breakers,
            idle_timeout: cluster.idle_timeout,
            max_requests: cluster.max_requests_per_connection,
            http2: cluster.http2_settings,
        }
    }
}

static PARKINGS: AtomicU64 = AtomicU64::new(0);

/// A pooled HTTP/2 connection: the streams it has carried, and those open now (a request's stream stays open
/// until its response body is dropped, as Envoy counts it until the stream completes).
struct Http2Connection {
    sender: http2::SendRequest<Body>,
    session: Arc<UpstreamSession>,
    used: u64,
    streams: Arc<Activity>,
}

impl Http2Connection {
    /// Whether it can take another stream: still up, under `max_requests_per_connection` streams in all and
    /// `max_concurrent_streams` at once.
    fn has_room(&self, reuse: &Reuse<'_>) -> bool {
        !self.sender.is_closed()
            && reuse.max_requests.is_none_or(|max| self.used < max)
            && reuse.http2.max_concurrent_streams.is_none_or(|max| self.streams.in_flight() < max as usize)
    }
}

pub struct Pools {
    sockets: SocketFactory,
    tls: Tls,
    idle_http1: Mutex<HashMap<Key, Vec<Pooled>>>,
    /// Each endpoint's HTTP/2 connections.
    http2: Mutex<HashMap<Key, Vec<Http2Connection>>>,
    clusters: Mutex<HashMap<String, Arc<ClusterRuntime>>>,
}

impl Pools {
    pub fn new(sockets: SocketFactory) -> Arc<Pools> {
        Arc::new(Pools { sockets, tls: Tls::default(), idle_http1: Mutex::default(), http2: Mutex::default(), clusters: Mutex::default() })
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

    /// The pod's secrets and TLS configurations, downstream and upstream.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// A new connection for `key`, with TLS originated on it when the cluster has a TLS context, and the
    /// cluster's metadata exchange started when the negotiated ALPN asks for it.
    pub async fn connect(&self, key: &Key, timeout: Duration) -> Result<(UpstreamIo, Arc<UpstreamSession>), PoolError> {
        let stream = self.sockets.connect(key.endpoint, key.source, timeout).await.map_err(PoolError::Connect)?;
        let mut session = UpstreamSession { host: Some(key.endpoint), local: stream.local_addr().ok(), ..Default::default() };
        let (io, alpn) = match &key.tls {
            None => (MaybeTls::Plain(stream), None),
            Some(TlsKey(context, secrets)) => {
                let (tls, local_sans) = self.tls.connect(stream, context, secrets, key.endpoint.ip(), key.alpn.as_deref()).await.map_err(|e| PoolError::Connect(std::io::Error::other(e.0)))?;
                let connection = tls.get_ref().1;
                let alpn = connection.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                let peer = connection.peer_certificates().and_then(super::super::tls::peer_certificate);
                session.peer_uri_san = peer.and_then(|p| p.uri_sans.into_iter().next());
                session.local_uri_san = local_sans.first().cloned();
                (MaybeTls::Tls(Box::new(tls)), alpn)
            }
        };
        let io = match &key.exchange {
            None => ExchangeStream::through(io),
            Some(ExchangeKey(config, local)) => metadata_exchange::start(io, Some(config), local, alpn.as_deref()).await.map_err(PoolError::Connect)?,
        };
        session.exchange = Arc::clone(io.peer());
        Ok((io, Arc::new(session)))
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
    ) -> (Result<Response<Body>, PoolError>, bool) {
        match protocol {
            Protocol::Http1 => {
                let (result, fresh) = self.send_http1(key, reuse, runtime, req).await;
                (result.map(|r| r.map(BodyExt::boxed)), fresh)
            }
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
            while let Some(Pooled { mut sender, used, session, .. }) = self.idle(&key) {
                match sender.try_send_request(req).await {
                    Ok(response) => {
                        self.recycle(key.clone(), (sender, Arc::clone(&session)), used + 1, reuse, runtime);
                        return (Ok(with_session(response, session)), false);
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
            // Idle connections of an earlier version of the cluster (another TLS context, secrets or ALPN: another
            // key) can never serve it again but still count: closed, as Envoy drains a replaced cluster's pools.
            self.close_stale(&key, runtime);
            // At max_connections: wait for a connection to come back, if there is room to wait.
            if runtime.pending.fetch_add(1, Relaxed) >= limits.max_pending_requests {
                runtime.pending.fetch_sub(1, Relaxed);
                return (Err(PoolError::Overflow), false);
            }
            let freed = runtime.freed.notified();
            let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
            runtime.pending.fetch_sub(1, Relaxed);
        }
        let (mut sender, session) = match self.connect_http1(&key, reuse.connect_timeout, runtime).await {
            Ok(s) => s,
            Err(e) => return (Err(e), true),
        };
        let result = sender.send_request(req).await.map_err(PoolError::Reset);
        if result.is_ok() {
            self.recycle(key, (sender, Arc::clone(&session)), 1, reuse, runtime);
        }
        (result.map(|r| with_session(r, session)), true)
    }

    /// HTTP/1.1 connections waiting in the pool, for tests.
    #[cfg(test)]
    pub fn idle_http1(&self) -> usize {
        self.idle_http1.lock().unwrap_or_else(|e| e.into_inner()).values().map(Vec::len).sum()
    }

    /// Closes the idle connections that count against `runtime`'s limits under another key than `key`.
    fn close_stale(&self, key: &Key, runtime: &Arc<ClusterRuntime>) {
        let this = Arc::downgrade(runtime);
        let mut idle = self.idle_http1.lock().unwrap_or_else(|e| e.into_inner());
        for (_, list) in idle.iter_mut().filter(|(k, _)| *k != key) {
            list.retain(|p| !p.runtime.ptr_eq(&this));
        }
    }

    fn idle(&self, key: &Key) -> Option<Pooled> {
        let mut idle = self.idle_http1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
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
    fn recycle(self: &Arc<Self>, key: Key, (mut sender, session): (http1::SendRequest<Body>, Arc<UpstreamSession>), used: u64, reuse: Reuse<'_>, runtime: &Arc<ClusterRuntime>) {
        let pools: Weak<Pools> = Arc::downgrade(self);
        let runtime = Arc::clone(runtime);
        let (idle_timeout, spent) = (reuse.idle_timeout, reuse.max_requests.is_some_and(|max| used >= max));
        tokio::spawn(async move {
            let parked = PARKINGS.fetch_add(1, Relaxed);
            let back = !spent && sender.ready().await.is_ok();
            if back {
                let Some(p) = pools.upgrade() else { return };
                let runtime = Arc::downgrade(&runtime);
                p.idle_list(&key, |list| list.push(Pooled { sender, session, used, parked, runtime }));
            }
            runtime.freed.notify_one();
            if let (true, Some(idle)) = (back, idle_timeout) {
                tokio::time::sleep(idle).await;
                if let Some(p) = pools.upgrade() {
                    // Still parked since then: dropping its sender closes the connection.
                    p.idle_list(&key, |list| list.retain(|c| c.parked != parked));
                }
            }
        });
    }

    fn idle_list<T>(&self, key: &Key, f: impl FnOnce(&mut Vec<Pooled>) -> T) -> T {
        let mut idle = self.idle_http1.lock().unwrap_or_else(|e| e.into_inner());
        f(idle.entry(key.clone()).or_default())
    }

    async fn connect_http1(&self, key: &Key, timeout: Duration, runtime: &Arc<ClusterRuntime>) -> Result<(http1::SendRequest<Body>, Arc<UpstreamSession>), PoolError> {
        let (stream, session) = self.connect(key, timeout).await?;
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
        Ok((sender, session))
    }

    /// Sends an upgrade request (WebSocket) on a connection of its own: after a 101 the connection belongs to
    /// the upgraded stream, so it never returns to the pool.
    pub async fn send_upgrade(&self, key: Key, timeout: Duration, protocol: Protocol, req: Request<Body>) -> Result<Response<Incoming>, PoolError> {
        let (stream, _) = self.connect(&key, timeout).await?;
        let stream = TokioIo::new(stream);
        if protocol == Protocol::Http2 {
            let (mut sender, conn) = http2::handshake(TokioExecutor::new(), stream).await.map_err(PoolError::Reset)?;
            tokio::spawn(conn);
            return sender.send_request(req).await.map_err(PoolError::Reset);
        }
        let (mut sender, conn) = http1::handshake(stream).await.map_err(PoolError::Reset)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream upgrade connection ended: {e}");
            }
        });
        sender.send_request(req).await.map_err(PoolError::Reset)
    }

    /// An HTTP/2 connection with room carries the request as a stream; when none has room (closed, at
    /// `max_requests_per_connection` streams in all, or at `max_concurrent_streams` open), a new connection
    /// is made for it while the others finish their streams.
    async fn send_http2(&self, key: Key, reuse: Reuse<'_>, req: Request<Body>) -> (Result<Response<Body>, PoolError>, bool) {
        let existing = {
            let mut conns = self.http2.lock().unwrap_or_else(|e| e.into_inner());
            let list = conns.entry(key.clone()).or_default();
            // Connections that closed or carried their last stream take no more.
            list.retain(|c| !c.sender.is_closed() && reuse.max_requests.is_none_or(|max| c.used < max));
            list.iter_mut().find(|c| c.has_room(&reuse)).map(|c| {
                c.used += 1;
                (c.sender.clone(), c.streams.request(), Arc::clone(&c.session))
            })
        };
        let ((mut sender, stream, session), fresh) = match existing {
            Some(s) => (s, false),
            None => match self.connect_http2(&key, reuse).await {
                Ok(s) => (s, true),
                Err(e) => return (Err(e), true),
            },
        };
        let result = sender.send_request(req).await.map_err(PoolError::Reset);
        // The stream stays open in the count while its response body is read.
        (result.map(|r| with_session(r.map(|body| Counted { body, _in_flight: stream }.boxed()), session)), fresh)
    }

    /// A new HTTP/2 connection, closed once it has carried no stream for the cluster's idle timeout.
    async fn connect_http2(&self, key: &Key, reuse: Reuse<'_>) -> Result<(http2::SendRequest<Body>, InFlight, Arc<UpstreamSession>), PoolError> {
        let (stream, session) = self.connect(key, reuse.connect_timeout).await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(reuse.http2.initial_stream_window_size)
            .initial_connection_window_size(reuse.http2.initial_connection_window_size);
        let (sender, conn) = builder.handshake(TokioIo::new(stream)).await.map_err(PoolError::Reset)?;
        let streams = Activity::new();
        let first = streams.request();
        let watched = Arc::clone(&streams);
        let idle_timeout = reuse.idle_timeout;
        tokio::spawn(async move {
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!("upstream HTTP/2 connection ended: {e}");
                },
                // Dropping the connection closes it; its senders then count as closed.
                () = watched.expired(idle_timeout, None) => tracing::debug!("idle upstream HTTP/2 connection closed"),
            }
        });
        let connection = Http2Connection { sender: sender.clone(), session: Arc::clone(&session), used: 1, streams };
        self.http2.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().push(connection);
        Ok((sender, first, session))
    }
}

/// The response, with the connection it came on in its extensions.
fn with_session<B>(mut response: Response<B>, session: Arc<UpstreamSession>) -> Response<B> {
    response.extensions_mut().insert(session);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering::SeqCst;

    /// An h2c upstream that answers 200 to everything; counts the connections it accepted.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, SeqCst);
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async { Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from("ok")))) });
                tokio::spawn(hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service));
            }
        });
        (addr, connections)
    }

    fn cluster(h2: serde_json::Value) -> Cluster {
        let v = serde_json::json!({"name": "c", "http2_protocol_options": h2});
        crate::config::cluster::translate(crate::config::tree::Obj::new(&v, "c").unwrap()).unwrap()
    }

    async fn get(pools: &Arc<Pools>, key: Key, cluster: &Cluster, runtime: &Arc<ClusterRuntime>) -> Response<Body> {
        let req = Request::builder().uri("http://upstream/").body(super::super::super::body::empty()).unwrap();
        let (result, _) = pools.send(key, Protocol::Http2, Reuse::of(cluster), runtime, req).await;
        result.unwrap()
    }

    #[tokio::test]
    async fn max_concurrent_streams_opens_another_connection_while_streams_are_open() {
        let (endpoint, connections) = upstream().await;
        let pools = Pools::new(SocketFactory::Host);
        let runtime = pools.runtime("c");
        let key = Key { endpoint, source: None, tls: None, alpn: None, exchange: None };
        let limited = cluster(serde_json::json!({"max_concurrent_streams": 1, "initial_stream_window_size": 65535, "initial_connection_window_size": 1048576}));
        let first = get(&pools, key.clone(), &limited, &runtime).await;
        let second = get(&pools, key.clone(), &limited, &runtime).await;
        assert_eq!(connections.load(SeqCst), 2, "the first connection's one stream is still open (its body unread)");
        drop((first, second));
        let third = get(&pools, key.clone(), &limited, &runtime).await;
        assert_eq!(third.into_body().collect().await.unwrap().to_bytes(), Bytes::from("ok"));
        assert_eq!(connections.load(SeqCst), 2, "a finished stream frees its connection for the next request");
    }

    #[tokio::test]
    async fn without_a_limit_one_connection_carries_every_stream() {
        let (endpoint, connections) = upstream().await;
        let pools = Pools::new(SocketFactory::Host);
        let runtime = pools.runtime("c");
        let key = Key { endpoint, source: None, tls: None, alpn: None, exchange: None };
        let unlimited = cluster(serde_json::json!({}));
        // Three responses held open at once, all on the first connection.
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(get(&pools, key.clone(), &unlimited, &runtime).await);
        }
        assert_eq!(connections.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn an_http2_connection_idle_for_the_idle_timeout_is_closed() {
        let (endpoint, connections) = upstream().await;
        let pools = Pools::new(SocketFactory::Host);
        let runtime = pools.runtime("c");
        let key = Key { endpoint, source: None, tls: None, alpn: None, exchange: None };
        let mut short = cluster(serde_json::json!({}));
        short.idle_timeout = Some(Duration::from_millis(100));
        let first = get(&pools, key.clone(), &short, &runtime).await;
        first.into_body().collect().await.unwrap();
        let closed = || pools.http2.lock().unwrap().get(&key).is_some_and(|list| list.iter().all(|c| c.sender.is_closed()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !closed() {
            assert!(tokio::time::Instant::now() < deadline, "the idle connection was not closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        get(&pools, key.clone(), &short, &runtime).await;
        assert_eq!(connections.load(SeqCst), 2, "the next request opened a new connection");
    }
}
