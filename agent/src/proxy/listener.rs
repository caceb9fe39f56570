//! In-pod listeners: sockets created inside a pod's network namespace (by a thread that enters it and exits)
//! and served by the agent's async runtime. Their address is where capture sends the pod's traffic. Each
//! connection is served by the pod's configuration snapshot: its own xDS configuration (its `virtualOutbound`
//! / `virtualInbound` listener and whatever those hand it to) or, without a control plane, the generated
//! pass-through configuration. Upstream connections are made from the pod's netns and pooled per pod.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::connection_handler::{self, Accepted, Drain, Outcome, Pod, SnapshotWatch};
use super::istio_metrics::IstioMetrics;
use super::pod_share::{Admitted, PodShare};
use super::socket::{self, SocketFactory};
use super::stats::ListenerStats;
use super::upstream::pool::Pools;
use super::{Direction, ProxySettings};
use crate::capture::netns::Netns;
use crate::capture::{INBOUND_PORT, OUTBOUND_PORT};

/// What every connection accepted on one listener shares.
pub struct ListenerContext {
    /// `namespace/name` of the pod, for logs.
    pub pod: String,
    pub direction: Direction,
    pub port: u16,
    pub stats: Arc<ListenerStats>,
    pub settings: ProxySettings,
    /// The pod's configuration (`None` inside until the first one arrives).
    pub config: SnapshotWatch,
    /// The pod's upstream connections (made from its netns) and its load.
    pub served: Pod,
}

/// The accept loops of one pod's listening sockets. Dropping them aborts the loops; `close` also waits until
/// each socket is closed, so a connection made after it returns is refused rather than accepted and reset.
#[derive(Default)]
pub struct AcceptLoops {
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl AcceptLoops {
    pub fn push(&self, task: JoinHandle<()>) {
        self.lock().push(task);
    }

    /// Whether every loop is still running (false once closed).
    pub fn healthy(&self) -> bool {
        !self.closed.load(std::sync::atomic::Ordering::Relaxed) && self.lock().iter().all(|t| !t.is_finished())
    }

    /// Stops accepting and returns once every listening socket is closed; established connections carry on.
    pub async fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        let tasks = std::mem::take(&mut *self.lock());
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // An aborted task's future, and with it the socket, is dropped before its handle resolves.
            let _ = task.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        // The guarded code cannot panic, but a poisoned list is still a list of handles.
        self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for AcceptLoops {
    fn drop(&mut self) {
        for task in self.lock().iter() {
            task.abort();
        }
    }
}

/// The running listeners of one pod. Dropping it stops accepting; established connections finish on their own.
pub struct PodListeners {
    pub tasks: AcceptLoops,
    pub addresses: Vec<SocketAddr>,
    pub outbound: Arc<ListenerStats>,
    pub inbound: Arc<ListenerStats>,
    /// The pod's upstream pools and TLS state (where its workload certificate is pushed).
    pub pools: Arc<Pools>,
    /// Istio's standard metrics of the pod's traffic (its 15020 and the agent show them).
    pub metrics: Arc<IstioMetrics>,
}

impl PodListeners {
    /// Connections accepted and not yet finished, both directions.
    pub fn active(&self) -> u64 {
        self.outbound.snapshot().active + self.inbound.snapshot().active
    }
}

/// Addresses to listen on. Outbound capture redirects to loopback, so 15001 listens there only and other pods
/// cannot reach it; inbound capture redirects to the receiving interface's address, so 15006 listens on all.
fn addresses(ipv6: bool) -> Vec<(Direction, SocketAddr)> {
    let mut out = vec![
        (Direction::Outbound, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT)),
        (Direction::Inbound, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), INBOUND_PORT)),
    ];
    if ipv6 {
        out.push((Direction::Outbound, SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT)));
        out.push((Direction::Inbound, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), INBOUND_PORT)));
    }
    out
}

/// A listening socket for the agent's runtime; called on a thread inside the pod's netns.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    // A second agent (an upgrade) binds the same ports beside us and both accept until the old one exits.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&SockAddr::from(addr))
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr} in pod netns: {e}")))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The pod's listening sockets, bound but not yet served.
pub struct ListenerSockets(Vec<(Direction, SocketAddr, std::net::TcpListener)>);

/// Binds the pod's listeners; called on a thread inside its netns (`ipv6`: whether the netns has IPv6).
pub fn bind_here(ipv6: bool) -> io::Result<ListenerSockets> {
    addresses(ipv6).into_iter().map(|(dir, addr)| Ok((dir, addr, bind(addr)?))).collect::<io::Result<_>>().map(ListenerSockets)
}

/// Serves the pod's listeners by `config`, connecting upstream from its netns `ns`.
/// The accept loops and every task of their connections run on the pod's own threads (`share`).
pub fn start(pod: String, ns: Netns, settings: ProxySettings, config: SnapshotWatch, share: &PodShare, sockets: ListenerSockets) -> io::Result<PodListeners> {
    let outbound = Arc::new(ListenerStats::default());
    let inbound = Arc::new(ListenerStats::default());
    let pools = Pools::new(SocketFactory::Pod(ns));
    let mut listeners = PodListeners { tasks: AcceptLoops::default(), addresses: Vec::new(), outbound, inbound, pools: Arc::clone(&pools), metrics: Arc::default() };
    for (direction, addr, socket) in sockets.0 {
        let stats = match direction {
            Direction::Outbound => Arc::clone(&listeners.outbound),
            Direction::Inbound => Arc::clone(&listeners.inbound),
        };
        let ctx = Arc::new(ListenerContext {
            pod: pod.clone(),
            direction,
            port: addr.port(),
            stats,
            settings,
            config: config.clone(),
            served: Pod { pools: Arc::clone(&pools), load: Arc::clone(&share.load), metrics: Arc::clone(&listeners.metrics), name: Some(Arc::from(pod.as_str())) },
        });
        let runtime = share.handle();
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(socket)?
        };
        listeners.addresses.push(addr);
        listeners.tasks.push(runtime.spawn(accept_loop(listener, ctx)));
    }
    Ok(listeners)
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ListenerContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match ctx.served.load.connection() {
                Some(admitted) => {
                    tokio::spawn(serve(stream, peer, Arc::clone(&ctx), admitted));
                }
                // Over the pod's `max_connections`: closed at once, as Envoy's listener connection limit.
                None => {
                    ctx.stats.rejected();
                    drop(stream);
                }
            },
            Err(e) => {
                // Out of descriptors or memory: back off briefly instead of spinning on the error.
                tracing::warn!(pod = %ctx.pod, direction = ?ctx.direction, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a connection waits for the pod's first configuration before it is closed (Envoy's
/// `initial_fetch_timeout`); the pod is never proxied without the configuration the control plane meant.
const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<ListenerContext>, _admitted: Admitted) {
    ctx.stats.accepted();
    let (from, to) = match socket::original_dst(&stream) {
        // Nothing rewrote this connection: it was made to the listener itself. Proxying it would loop.
        Ok(dst) if dst.port() == ctx.port => {
            ctx.stats.refused_loop();
            tracing::debug!(pod = %ctx.pod, %peer, %dst, "refused direct connection to the proxy port");
            (0, 0)
        }
        Ok(dst) => from_config(Accepted { stream, peer, original_dst: Some(dst) }, &ctx).await,
        Err(e) => {
            ctx.stats.rejected();
            tracing::warn!(pod = %ctx.pod, %peer, "no original destination: {e}");
            (0, 0)
        }
    };
    ctx.stats.closed(from, to);
}

/// Serves the connection by the pod's configuration; closes it when there is none (fail closed).
async fn from_config(accepted: Accepted, ctx: &ListenerContext) -> (u64, u64) {
    let _ = accepted.stream.set_nodelay(true);
    let peer = accepted.peer;
    let mut updates = ctx.config.clone();
    let waited = tokio::time::timeout(INITIAL_FETCH_TIMEOUT, updates.wait_for(Option::is_some)).await;
    let Some(config) = waited.ok().and_then(Result::ok).and_then(|c| c.clone()) else {
        ctx.stats.rejected();
        tracing::warn!(pod = %ctx.pod, %peer, "no configuration from the control plane yet; closing the connection");
        return (0, 0);
    };
    let Some(entry) = config.bound_on_port(ctx.port) else {
        ctx.stats.rejected();
        tracing::debug!(pod = %ctx.pod, %peer, port = ctx.port, "the pod's configuration has no listener on this port; closing");
        return (0, 0);
    };
    let drain = Drain { updates, timeout: ctx.settings.drain_timeout };
    match connection_handler::serve(accepted, entry, &config, &ctx.served, drain).await {
        Outcome::Relayed { from_downstream, to_downstream } => (from_downstream, to_downstream),
        Outcome::Http | Outcome::Drained | Outcome::Denied | Outcome::ExchangeFailed => (0, 0),
        Outcome::UpstreamFailed(e) => {
            ctx.stats.upstream_connect_failed();
            tracing::debug!(pod = %ctx.pod, %peer, "upstream: {e}");
            (0, 0)
        }
        Outcome::NoFilterChain | Outcome::ListenerFilter | Outcome::Warming | Outcome::TlsFailed => {
            ctx.stats.rejected();
            (0, 0)
        }
    }
}
