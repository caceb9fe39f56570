//! What happens to an accepted connection, in Envoy's order: the listener of its original destination takes
//! it over (`use_original_dst`), that listener's filters inspect it, a filter chain is chosen, and the chain's
//! network filter (tcp_proxy or the HTTP connection manager) serves it. Shared by the standalone proxy and the
//! in-pod listeners; each connection keeps the configuration snapshot it started with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::filter_chain::{self, ConnectionInfo};
use super::filters::network::http_connection_manager::{self, HttpContext};
use super::filters::network::metadata_exchange::{self, ExchangeStream};
use super::filters::network::rbac;
use super::access_log;
use super::stream_info::Entry;
use super::filters::network::tcp_proxy::{self, Relayed, TcpSeen};
use super::listener_filter::{self, InspectError, Rewind};
use super::tls::{MaybeTls, TlsError};
use super::filters::istio_stats::{Reporter, StatsFilter, TcpReport};
use super::istio_metrics::IstioMetrics;
use super::pod_share::{Metered, PodLoad, WireBytes};
use super::snapshot::Snapshot;
use super::tls_info::TlsInfo;
use super::upstream::pool::Pools;
use super::upstream::{ConnectError, Upstream};
use crate::config::http_connection_manager::Routes;
use crate::config::istio_stats::IstioStats;
use crate::config::listener::{FilterChain, Listener, NetworkFilter, TrafficDirection};
use crate::config::tls::TransportSocket;

/// The configuration a pod's (or the proxy's) connections are served by: the latest snapshot, `None` until
/// the first one arrives.
pub type SnapshotWatch = watch::Receiver<Option<Arc<Snapshot>>>;

/// How a connection ended, for the caller's counters.
#[derive(Debug)]
pub enum Outcome {
    /// tcp_proxy relayed it until both sides closed.
    Relayed { from_downstream: u64, to_downstream: u64 },
    /// The HTTP connection manager served it.
    Http,
    /// No filter chain (and no default chain) matched: closed, as Envoy does.
    NoFilterChain,
    /// The listener filters timed out or the connection failed while they read it.
    ListenerFilter,
    /// The HTTP connection manager's RDS routes have not arrived (the listener is still warming).
    Warming,
    UpstreamFailed(ConnectError),
    /// Its listener was removed or replaced and the drain time ran out: closed.
    Drained,
    /// The chain's TLS handshake failed (or its secrets are missing): closed, as Envoy does.
    TlsFailed,
    /// The metadata exchange frame could not be written: the peer went away.
    ExchangeFailed,
    /// A configuration update's network RBAC policy for its chain denies it: closed at once.
    Denied,
}

/// Listener draining, as Envoy does it: when a configuration update removes or changes the listener that
/// serves a connection, the connection may go on for `timeout` and is then closed.
pub struct Drain {
    pub updates: SnapshotWatch,
    pub timeout: Duration,
}

impl Drain {
    /// Completes `timeout` after the first update in which listener `served` is gone or different.
    async fn of(mut self, served: &Listener) {
        loop {
            if self.updates.changed().await.is_err() {
                // No more updates will come (the pod or proxy is going away): nothing to drain for.
                return std::future::pending().await;
            }
            let current = self.updates.borrow_and_update().clone();
            if current.as_ref().and_then(|c| c.listener_named(&served.name)) != Some(served) {
                break;
            }
        }
        tracing::debug!(listener = %served.name, timeout = ?self.timeout, "listener removed or replaced; draining its connection");
        tokio::time::sleep(self.timeout).await;
    }
}

/// One accepted connection and where it came from.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// The original destination, when the listener's caller already read it.
    pub original_dst: Option<SocketAddr>,
}

/// What serves a pod's connections: its upstream pools and its load (the standalone proxy is a pod too).
pub struct Pod {
    pub pools: Arc<Pools>,
    pub load: Arc<PodLoad>,
    /// Istio's standard metrics of its streams.
    pub metrics: Arc<IstioMetrics>,
    /// `namespace/name`, which its access log lines carry (none: the standalone proxy).
    pub name: Option<Arc<str>>,
}

impl Pod {
    /// A pod of its own (the standalone proxy, tests): its pools on `sockets`, no limits.
    pub fn unlimited(sockets: super::socket::SocketFactory) -> Pod {
        Pod { pools: Pools::new(sockets), load: PodLoad::new(super::pod_share::PodLimits::UNLIMITED), metrics: Arc::default(), name: None }
    }
}

/// Serves a connection accepted by `entry` until it ends or its listener has been drained; upstream
/// connections come from `pools` (the pod's or the proxy's).
pub async fn serve(accepted: Accepted, entry: &Listener, snapshot: &Arc<Snapshot>, pod: &Pod, drain: Drain) -> Outcome {
    let pools = &pod.pools;
    let accepted_at = (SystemTime::now(), Instant::now());
    let Accepted { stream, peer, original_dst } = accepted;
    let socket_local = stream.local_addr().unwrap_or(entry.address);
    let restored = match entry.listener_filters.original_dst {
        true => original_dst.or_else(|| super::socket::original_dst(&stream).ok()),
        false => None,
    };
    let local = restored.unwrap_or(socket_local);
    let listener = match restored {
        Some(dst) if entry.use_original_dst => snapshot.listener_for(dst).unwrap_or(entry),
        _ => entry,
    };
    let (io, detected) = match listener_filter::inspect(stream, &listener.listener_filters.for_port(local.port())).await {
        Ok(inspected) => inspected,
        Err(InspectError::Timeout | InspectError::PeerClosed) => return Outcome::ListenerFilter,
        Err(InspectError::Io(e)) => {
            tracing::debug!(listener = %listener.name, %peer, "listener filters: {e}");
            return Outcome::ListenerFilter;
        }
    };
    let info = ConnectionInfo {
        local,
        peer,
        server_name: detected.server_name.clone(),
        transport_protocol: detected.transport_protocol(),
        application_protocols: detected.application_protocols,
    };
    let Some(chain) = filter_chain::select(listener, &info) else {
        tracing::debug!(listener = %listener.name, %peer, %local, "no filter chain matched; closing");
        let unmatched = Entry { flag: Some("NR"), server_name: info.server_name.as_deref(), ..Entry::connection(accepted_at.0, accepted_at.1, peer, local) };
        access_log::emit(&listener.access_log, &unmatched, pod.name.as_deref());
        return Outcome::NoFilterChain;
    };
    let upstream = Upstream { snapshot: Arc::clone(snapshot), pools: Arc::clone(pools), original_dst: local, downstream_buffer_limit: listener.buffer_limit };
    let (updates, guarded) = (drain.updates.clone(), drain.updates.clone());
    let served = async {
        // Bytes are metered on the wire, under TLS: a pod's bandwidth includes its handshakes.
        let io = Metered::new(io, Arc::clone(&pod.load));
        let wire = io.wire();
        let (io, tls) = match transport(io, chain, snapshot, pools).await {
            Ok(transported) => transported,
            Err((outcome, e)) => {
                tracing::debug!(listener = %listener.name, %peer, "{e}");
                return outcome;
            }
        };
        let peer_metadata = Arc::clone(io.peer());
        let connection = Arc::new(rbac::Connection { peer, local, server_name: info.server_name.clone(), tls, peer_metadata });
        let io = rbac::Gated::new(io, chain.rbac.clone(), Arc::clone(&connection));
        let telemetry = Telemetry { direction: listener.direction, stats: chain.istio_stats.clone(), metrics: Arc::clone(&pod.metrics), wire, pod: pod.name.clone(), accepted_at };
        tokio::select! {
            outcome = run_filter(io, chain, upstream, updates, &connection, (&pod.load, telemetry)) => outcome,
            () = rbac::guard(guarded, &listener.name, &info, &connection) => Outcome::Denied,
        }
    };
    tokio::select! {
        outcome = served => outcome,
        () = drain.of(listener) => Outcome::Drained,
    }
}

/// A TLS handshake within the chain's `transport_socket_connect_timeout`: a client that does not finish it
/// in time has its connection closed (dropping the handshake closes the socket), as Envoy does.
async fn handshake<T>(accept: impl std::future::Future<Output = Result<T, TlsError>>, timeout: Option<Duration>) -> Result<T, TlsError> {
    match timeout {
        None => accept.await,
        Some(limit) => tokio::time::timeout(limit, accept)
            .await
            .unwrap_or_else(|_| Err(TlsError(format!("TLS handshake not finished within transport_socket_connect_timeout ({limit:?})")))),
    }
}

/// A downstream connection after its transport socket (TLS terminated or plaintext, metered either way) and
/// the chain's metadata exchange.
pub type DownstreamIo = Transported<Metered<Rewind>>;

/// A connection `S` after a chain's transport socket and metadata exchange.
pub type Transported<S> = ExchangeStream<MaybeTls<S, tokio_rustls::server::TlsStream<S>>>;

/// The chain's transport socket, then its metadata exchange, under the ALPN the handshake agreed on.
pub async fn transport<S>(io: S, chain: &FilterChain, snapshot: &Snapshot, pools: &Pools) -> Result<(Transported<S>, Option<Arc<TlsInfo>>), (Outcome, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (io, tls) = match &chain.transport_socket {
        TransportSocket::RawBuffer => (MaybeTls::Plain(io), None),
        TransportSocket::Tls(context) => match handshake(pools.tls().accept(io, context, &snapshot.secrets), chain.transport_socket_connect_timeout).await {
            Ok((stream, info)) => (MaybeTls::Tls(Box::new(stream)), Some(Arc::new(info))),
            Err(e) => return Err((Outcome::TlsFailed, e.to_string())),
        },
    };
    let alpn = tls.as_ref().and_then(|t| t.alpn.as_deref());
    match metadata_exchange::start(io, chain.metadata_exchange.as_ref(), &snapshot.local, alpn).await {
        Ok(io) => Ok((io, tls)),
        Err(e) => Err((Outcome::ExchangeFailed, format!("metadata exchange: {e}"))),
    }
}

/// What Istio's telemetry of a connection needs: its listener's direction, the chain's `istio.stats`
/// filter, the pod's metrics and the connection's wire bytes.
struct Telemetry {
    direction: TrafficDirection,
    stats: Option<Arc<IstioStats>>,
    metrics: Arc<IstioMetrics>,
    wire: Arc<WireBytes>,
    /// The pod's name for access logs, and when the connection was accepted.
    pod: Option<Arc<str>>,
    accepted_at: (SystemTime, Instant),
}

/// The chain's terminal network filter, behind its RBAC filters.
async fn run_filter(io: rbac::Gated<DownstreamIo>, chain: &FilterChain, upstream: Upstream, updates: SnapshotWatch, connection: &rbac::Connection, (load, telemetry): (&Arc<PodLoad>, Telemetry)) -> Outcome {
    let (peer, local) = (connection.peer, connection.local);
    match &chain.filter {
        NetworkFilter::TcpProxy(config) => {
            let report = telemetry.stats.map(|config| {
                let filter = StatsFilter { config, reporter: Reporter::of(telemetry.direction), metrics: telemetry.metrics, local: Arc::clone(&upstream.snapshot.local) };
                TcpReport::new(filter, connection.tls.clone(), Arc::clone(&connection.peer_metadata), Arc::clone(&upstream.snapshot), telemetry.wire)
            });
            let mut seen = TcpSeen { report, ..Default::default() };
            let relayed = tcp_proxy::serve(io, config, &upstream, &mut seen).await;
            if let Some(r) = &mut seen.report {
                r.report(true);
            }
            let bytes = match &relayed {
                Relayed::Done(from, to) => (*from, *to),
                _ => (0, 0),
            };
            let (start, started) = telemetry.accepted_at;
            let logged = Entry {
                server_name: connection.server_name.as_deref(),
                tls: connection.tls.as_deref(),
                cluster: seen.cluster.as_deref(),
                upstream: seen.session.as_deref(),
                upstream_host: seen.session.as_ref().and_then(|s| s.host).or(seen.failed_host),
                flag: seen.flag,
                bytes_received: bytes.0,
                bytes_sent: bytes.1,
                ..Entry::connection(start, started, peer, local)
            };
            access_log::emit(&config.access_log, &logged, telemetry.pod.as_deref());
            match relayed {
                Relayed::Done(from_downstream, to_downstream) => Outcome::Relayed { from_downstream, to_downstream },
                Relayed::NoUpstream(e) => Outcome::UpstreamFailed(e),
                Relayed::Failed(e) => {
                    tracing::debug!(%peer, "tcp_proxy connection ended: {e}");
                    Outcome::Relayed { from_downstream: 0, to_downstream: 0 }
                }
            }
        }
        NetworkFilter::HttpConnectionManager(hcm) => {
            if let Routes::Rds(name) = &hcm.routes {
                if upstream.snapshot.route_config(name).is_none() {
                    return Outcome::Warming;
                }
            }
            let (tls, server_name) = (connection.tls.clone(), connection.server_name.clone());
            let context = HttpContext {
                hcm: Arc::clone(hcm),
                updates,
                upstream,
                peer,
                local,
                load: Arc::clone(load),
                tls,
                server_name,
                telemetry: http_connection_manager::Telemetry { direction: telemetry.direction, metrics: telemetry.metrics, connection_peer: Arc::clone(&connection.peer_metadata), pod: telemetry.pod },
            };
            http_connection_manager::serve(io, context).await;
            Outcome::Http
        }
    }
}

/// The connection handler on loopback sockets (no root, no namespaces): the listener filters detect the
/// protocol, the chain is chosen by it, and its network filter serves the connection.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::store::Resource;
    use crate::config::tree::Obj;
    use crate::proxy::socket::SocketFactory;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn snapshot(echo: SocketAddr) -> (Arc<Snapshot>, Listener) {
        let listener = json!({"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "listener_filters": [{"name": "h", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}],
            "filter_chains": [{"filter_chain_match": {"application_protocols": ["http/1.1"]}, "filters": [{"name": "hcm", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "from the HTTP chain"}}}]}]},
                "http_filters": [{"name": "router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}],
            "default_filter_chain": {"filters": [{"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "cluster": "echo"}}]}});
        let listener = crate::config::listener::translate(Obj::new(&listener, "l").unwrap()).unwrap();
        let cluster = json!({"name": "echo", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": echo.port()}}}}]}]}});
        let cluster = crate::config::cluster::translate(Obj::new(&cluster, "c").unwrap()).unwrap();
        let snapshot = Snapshot {
            listeners: Arc::new([Resource::fixed("l", listener.clone())].into_iter().collect()),
            clusters: Arc::new([Resource::fixed("echo", cluster)].into_iter().collect()),
            ..Snapshot::default()
        };
        (Arc::new(snapshot), listener)
    }

    /// A loopback listener whose one connection the handler serves with `listener` of `snapshot`.
    async fn front(snapshot: Arc<Snapshot>, listener: Listener) -> SocketAddr {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, peer) = front.accept().await.unwrap();
            let (_tx, updates) = watch::channel(Some(Arc::clone(&snapshot)));
            let drain = Drain { updates, timeout: Duration::from_secs(1) };
            let pod = Pod::unlimited(SocketFactory::Host);
            serve(Accepted { stream, peer, original_dst: None }, &listener, &snapshot, &pod, drain).await
        });
        addr
    }

    /// Serves one connection carrying `payload` through the handler; returns what came back.
    async fn exchange(payload: &'static [u8]) -> Vec<u8> {
        let (snapshot, listener) = snapshot(crate::proxy::testing::echo_server().await);
        let addr = front(snapshot, listener).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back)).await.unwrap().unwrap();
        back
    }

    /// The tcp_proxy listener of `snapshot` with a network RBAC filter of `rules` in front.
    fn guarded(echo: SocketAddr, rules: serde_json::Value) -> (Arc<Snapshot>, Listener) {
        let (base, _) = snapshot(echo);
        let listener = json!({"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [
                {"name": "rbac", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC", "stat_prefix": "guard_test", "rules": rules}},
                {"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "cluster": "echo"}}]}]});
        let listener = crate::config::listener::translate(Obj::new(&listener, "l").unwrap()).unwrap();
        let listeners = Arc::new([Resource::fixed("l", listener.clone())].into_iter().collect());
        let snapshot = Snapshot { listeners, clusters: Arc::clone(&base.clusters), ..Snapshot::default() };
        (Arc::new(snapshot), listener)
    }

    #[tokio::test]
    async fn an_update_whose_network_rbac_denies_an_open_connection_closes_it() {
        let echo = crate::proxy::testing::echo_server().await;
        let allow_all = json!({"action": "DENY", "policies": {}});
        let deny_loopback = json!({"action": "DENY", "policies": {"loopback": {"permissions": [{"any": true}],
            "principals": [{"direct_remote_ip": {"address_prefix": "127.0.0.0", "prefix_len": 8}}]}}});
        let (first, listener) = guarded(echo, allow_all);
        let (denying, _) = guarded(echo, deny_loopback);
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let (tx, updates) = watch::channel(Some(Arc::clone(&first)));
        let served = tokio::spawn(async move {
            let (stream, peer) = front.accept().await.unwrap();
            // A drain time far longer than the test: only the guard can close the connection.
            let drain = Drain { updates, timeout: Duration::from_secs(3600) };
            let pod = Pod::unlimited(SocketFactory::Host);
            serve(Accepted { stream, peer, original_dst: None }, &listener, &first, &pod, drain).await
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"ping", "allowed by the first policy");
        tx.send_replace(Some(denying));
        let outcome = tokio::time::timeout(Duration::from_secs(5), served).await.expect("closed before the deadline").unwrap();
        assert!(matches!(outcome, Outcome::Denied), "{outcome:?}");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await.unwrap();
        assert!(read.is_err() || rest.is_empty(), "the client sees the connection end");
    }

    #[tokio::test]
    async fn a_denied_connection_is_closed_before_the_upstream_sees_a_byte() {
        let echo = crate::proxy::testing::echo_server().await;
        let (snapshot, listener) = guarded(echo, json!({"action": "ALLOW", "policies": {}}));
        let addr = front(snapshot, listener).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"secret").await.unwrap();
        let mut back = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back)).await.unwrap();
        assert!(read.is_err() || back.is_empty(), "nothing echoed: {back:?}");
    }

    /// A TLS listener whose chain (tcp_proxy to `echo`) gives handshakes `timeout`.
    fn tls_listener(echo: SocketAddr, timeout: &str) -> (Arc<Snapshot>, Listener) {
        let (base, _) = snapshot(echo);
        let (chain, key) = crate::proxy::testing::self_signed("server.test");
        let listener = json!({"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"transport_socket_connect_timeout": timeout,
                "transport_socket": {"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": {"tls_certificates": [{"certificate_chain": {"inline_string": chain}, "private_key": {"inline_string": key}}]}}},
                "filters": [{"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "cluster": "echo"}}]}]});
        let listener = crate::config::listener::translate(Obj::new(&listener, "l").unwrap()).unwrap();
        let listeners = Arc::new([Resource::fixed("l", listener.clone())].into_iter().collect());
        (Arc::new(Snapshot { listeners, clusters: Arc::clone(&base.clusters), ..Snapshot::default() }), listener)
    }

    /// Serves one connection of `listener`; the handler's outcome comes back on the handle.
    async fn serve_one(snapshot: Arc<Snapshot>, listener: Listener) -> (SocketAddr, tokio::task::JoinHandle<Outcome>) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (stream, peer) = front.accept().await.unwrap();
            let (_tx, updates) = watch::channel(Some(Arc::clone(&snapshot)));
            let drain = Drain { updates, timeout: Duration::from_secs(3600) };
            let pod = Pod::unlimited(SocketFactory::Host);
            serve(Accepted { stream, peer, original_dst: None }, &listener, &snapshot, &pod, drain).await
        });
        (addr, served)
    }

    #[tokio::test]
    async fn a_tls_client_silent_past_transport_socket_connect_timeout_is_closed() {
        let echo = crate::proxy::testing::echo_server().await;
        let (snapshot, listener) = tls_listener(echo, "0.2s");
        assert_eq!(listener.filter_chains[0].transport_socket_connect_timeout, Some(Duration::from_millis(200)));
        let (addr, served) = serve_one(snapshot, listener).await;
        // Connects and never sends a ClientHello.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), served).await.expect("closed before the test's deadline").unwrap();
        assert!(matches!(outcome, Outcome::TlsFailed), "{outcome:?}");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await.unwrap();
        assert!(read.is_err() || rest.is_empty(), "the client sees the connection end");
    }

    #[tokio::test]
    async fn a_handshake_within_transport_socket_connect_timeout_is_served() {
        let echo = crate::proxy::testing::echo_server().await;
        let (snapshot, listener) = tls_listener(echo, "5s");
        let (addr, _served) = serve_one(snapshot, listener).await;
        // No roots: the server's certificate is not checked (Envoy's rule), so a self-signed one does.
        let v = json!({"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "sni": "server.test"}});
        let TransportSocket::Tls(context) = crate::config::tls::upstream(Some(Obj::new(&v, "ts").unwrap())).unwrap() else { panic!("TLS") };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = crate::proxy::tls::Tls::default();
        let (mut stream, _) = tls.connect(tcp, &context, &Default::default(), addr.ip(), None).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn istio_stats_reports_a_tcp_connection_with_its_wire_bytes() {
        let echo = crate::proxy::testing::echo_server().await;
        let (base, _) = snapshot(echo);
        let listener = json!({"name": "virtualInbound", "traffic_direction": "INBOUND", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [
                {"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}},
                {"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "cluster": "echo"}}]}]});
        let listener = crate::config::listener::translate(Obj::new(&listener, "l").unwrap()).unwrap();
        let snapshot = Arc::new(Snapshot { listeners: Arc::new([Resource::fixed("l", listener.clone())].into_iter().collect()), clusters: Arc::clone(&base.clusters), ..Snapshot::default() });
        let pod = Pod::unlimited(SocketFactory::Host);
        let metrics = Arc::clone(&pod.metrics);
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (stream, peer) = front.accept().await.unwrap();
            let (_tx, updates) = watch::channel(Some(Arc::clone(&snapshot)));
            serve(Accepted { stream, peer, original_dst: None }, &listener, &snapshot, &pod, Drain { updates, timeout: Duration::from_secs(1) }).await
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"twelve bytes").await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back)).await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(5), served).await.unwrap().unwrap();
        let text = crate::proxy::istio_metrics::render(&[(Vec::new(), &metrics)]);
        let line = |metric: &str| text.lines().find(|l| l.starts_with(&format!("{metric}{{"))).unwrap_or_default().to_string();
        for (metric, value) in [("istio_tcp_connections_opened_total", 1), ("istio_tcp_connections_closed_total", 1), ("istio_tcp_received_bytes_total", 12), ("istio_tcp_sent_bytes_total", 12)] {
            let l = line(metric);
            assert!(l.ends_with(&format!(" {value}")), "{metric}: {text}");
            for label in ["reporter=\"destination\"", "request_protocol=\"tcp\"", "connection_security_policy=\"none\"", "response_flags=\"-\""] {
                assert!(l.contains(label), "{label} in {l}");
            }
        }
    }

    #[tokio::test]
    async fn chains_are_chosen_by_the_detected_protocol() {
        let http = exchange(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        let text = String::from_utf8_lossy(&http);
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("from the HTTP chain"), "{text}");
        assert_eq!(exchange(b"raw bytes, not HTTP\r\n").await, b"raw bytes, not HTTP\r\n", "tcp_proxy echoed them");
    }

    /// Two weft sides with the configuration istiod gives sidecars: a client cluster with the upstream metadata
    /// exchange and TLS offering `istio-peer-exchange`, a listener chain with the exchange filter and TLS
    /// accepting it.
    mod metadata_exchange {
        use super::*;
        use crate::config::bootstrap::Node;
        use crate::config::workload_metadata::LocalWorkload;
        use crate::proxy::upstream::pool::Key;
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

        const MX: &str = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange";

        fn local(pod: &str) -> Arc<LocalWorkload> {
            Arc::new(LocalWorkload::from_node(&Node {
                id: format!("sidecar~127.0.0.1~{pod}.shop~shop.svc.cluster.local"),
                cluster: String::new(),
                metadata: json!({"NAME": pod, "NAMESPACE": "shop", "WORKLOAD_NAME": pod, "LABELS": {"app": pod}}),
            }))
        }

        /// (root PEM, [(chain PEM, key PEM)] for each SPIFFE id).
        fn certificates(ids: &[&str]) -> (String, Vec<(String, String)>) {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_key = KeyPair::generate().unwrap();
            let ca = params.self_signed(&ca_key).unwrap();
            let leaves = ids
                .iter()
                .map(|id| {
                    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
                    params.subject_alt_names = vec![SanType::URI((*id).try_into().unwrap())];
                    let key = KeyPair::generate().unwrap();
                    (params.signed_by(&key, &ca, &ca_key).unwrap().pem(), key.serialize_pem())
                })
                .collect();
            (ca.pem(), leaves)
        }

        fn common(root: &str, (chain, key): &(String, String), alpn: &[&str]) -> serde_json::Value {
            json!({"tls_certificates": [{"certificate_chain": {"inline_string": chain}, "private_key": {"inline_string": key}}],
                "alpn_protocols": alpn, "validation_context": {"trusted_ca": {"inline_string": root}}})
        }

        /// A server-first application: it greets, then echoes.
        async fn greeting_echo() -> SocketAddr {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        s.write_all(b"220 hello\r\n").await.unwrap();
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
            addr
        }

        /// The server side: its listener (MX, then tcp_proxy to `app`) in a snapshot of pod `server-1`.
        fn server(root: &str, leaf: &(String, String), app: SocketAddr) -> (Arc<Snapshot>, Listener) {
            let listener = json!({"name": "virtualInbound", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                "filter_chains": [{
                    "transport_socket": {"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true, "common_tls_context": common(root, leaf, &["istio-peer-exchange", "h2", "http/1.1"])}},
                    "filters": [
                        {"name": "istio.metadata_exchange", "typed_config": {"@type": MX, "protocol": "istio-peer-exchange", "enable_discovery": true}},
                        {"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "cluster": "app"}}]}]});
            let listener = crate::config::listener::translate(Obj::new(&listener, "l").unwrap()).unwrap();
            let cluster = json!({"name": "app", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": app.port()}}}}]}]}});
            let cluster = crate::config::cluster::translate(Obj::new(&cluster, "c").unwrap()).unwrap();
            let snapshot = Snapshot {
                listeners: Arc::new([Resource::fixed("virtualInbound", listener.clone())].into_iter().collect()),
                clusters: Arc::new([Resource::fixed("app", cluster)].into_iter().collect()),
                local: local("server-1"),
                ..Snapshot::default()
            };
            (Arc::new(snapshot), listener)
        }

        /// The client side: an outbound cluster to `server` (with the exchange as its upstream filter) in a
        /// snapshot of pod `client-1`, and the pool key of a connection to it.
        fn client(root: &str, leaf: &(String, String), server: SocketAddr) -> (Arc<Snapshot>, Key) {
            let cluster = json!({"name": "outbound|80||server.shop.svc.cluster.local",
                "transport_socket": {"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": common(root, leaf, &["istio-peer-exchange", "istio"])}},
                "filters": [{"name": "istio.metadata_exchange", "typed_config": {"@type": MX, "protocol": "istio-peer-exchange"}}],
                "metadata": {"filter_metadata": {"istio": {"services": [{"host": "server.shop.svc.cluster.local"}]}}}});
            let cluster = crate::config::cluster::translate(Obj::new(&cluster, "c").unwrap()).unwrap();
            let snapshot = Snapshot { local: local("client-1"), clusters: Arc::new([Resource::fixed(&cluster.name, cluster.clone())].into_iter().collect()), ..Snapshot::default() };
            let key = Key::of(server, &snapshot.cluster(&cluster.name).unwrap(), &snapshot);
            (Arc::new(snapshot), key)
        }

        async fn read_exactly<IO: tokio::io::AsyncRead + Unpin>(io: &mut IO, n: usize) -> Vec<u8> {
            let mut buf = vec![0u8; n];
            tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf)).await.expect("bytes before the deadline").unwrap();
            buf
        }

        #[tokio::test]
        async fn application_bytes_cross_intact_both_ways_through_the_listener() {
            let (root, leaves) = certificates(&["spiffe://cluster.local/ns/shop/sa/server", "spiffe://cluster.local/ns/shop/sa/client"]);
            let (snapshot, listener) = server(&root, &leaves[0], greeting_echo().await);
            let addr = front(snapshot, listener).await;
            let (_client_snapshot, key) = client(&root, &leaves[1], addr);
            let pools = Pools::new(SocketFactory::Host);
            let (mut upstream, _) = pools.connect(&key, Duration::from_secs(5)).await.unwrap();
            assert_eq!(read_exactly(&mut upstream, 11).await, b"220 hello\r\n", "the app spoke first; the frame before it was stripped");
            let peer = upstream.peer().get().flatten().cloned().expect("the server's metadata");
            assert_eq!((peer.id.as_str(), peer.metadata.name.as_str()), ("sidecar~127.0.0.1~server-1.shop~shop.svc.cluster.local", "server-1"));
            // Bytes that look like a frame are payload once the exchange is over.
            let mut payload = MAGIC_BYTES.to_vec();
            payload.extend_from_slice(b"\0\0\0\x02hi and more");
            upstream.write_all(&payload).await.unwrap();
            assert_eq!(read_exactly(&mut upstream, payload.len()).await, payload, "echoed intact through both exchanges");
        }

        const MAGIC_BYTES: [u8; 4] = crate::proxy::filters::network::metadata_exchange::MAGIC.to_be_bytes();

        #[tokio::test]
        async fn each_side_sees_the_others_metadata() {
            let (root, leaves) = certificates(&["spiffe://cluster.local/ns/shop/sa/server", "spiffe://cluster.local/ns/shop/sa/client"]);
            let (snapshot, listener) = server(&root, &leaves[0], greeting_echo().await);
            let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (_client_snapshot, key) = client(&root, &leaves[1], front.local_addr().unwrap());
            let accepting = async {
                let (stream, _) = front.accept().await.unwrap();
                let pools = Pools::new(SocketFactory::Host);
                let (mut io, tls) = transport(stream, &listener.filter_chains[0], &snapshot, &pools).await.map_err(|(_, e)| e).unwrap();
                assert_eq!(tls.and_then(|t| t.alpn.clone()).as_deref(), Some("istio-peer-exchange"));
                // Server first, then an echo of what the client says.
                io.write_all(b"ready").await.unwrap();
                let said = read_exactly(&mut io, 4).await;
                io.write_all(&said).await.unwrap();
                io.peer().get().flatten().cloned()
            };
            let pools = Pools::new(SocketFactory::Host);
            let connecting = async {
                let (mut io, _) = pools.connect(&key, Duration::from_secs(5)).await.unwrap();
                assert_eq!(read_exactly(&mut io, 5).await, b"ready");
                io.write_all(b"ping").await.unwrap();
                assert_eq!(read_exactly(&mut io, 4).await, b"ping");
                io.peer().get().flatten().cloned()
            };
            let (seen_by_server, seen_by_client) = tokio::join!(accepting, connecting);
            assert_eq!(seen_by_server.map(|p| p.metadata.name.clone()), Some("client-1".to_string()));
            assert_eq!(seen_by_client.map(|p| p.metadata.labels.clone()), Some([("app".to_string(), "server-1".to_string())].into()));
        }
    }

}
