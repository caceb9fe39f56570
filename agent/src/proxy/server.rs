//! The standalone proxy (`weft-agent proxy -c FILE`): the listeners and clusters of an Envoy bootstrap plus
//! whatever xDS adds, served in the agent's own network namespace. The configuration is one snapshot swapped
//! atomically; bound listeners are diffed by name so unchanged ones keep running and established connections
//! are never cut.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::connection_handler::{self, Accepted, Drain, Outcome, Pod};
use super::snapshot::Snapshot;
use super::socket::SocketFactory;
use crate::config::listener::Listener;

/// Counters of one listener, named as Envoy names them.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    pub downstream_cx_total: AtomicU64,
    pub downstream_cx_destroy: AtomicU64,
}

struct Bound {
    config: Listener,
    local: SocketAddr,
    counters: Arc<ListenerCounters>,
    task: JoinHandle<()>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        // Stops accepting; connections already accepted run on in their own tasks.
        self.task.abort();
    }
}

/// The running proxy.
pub struct Proxy {
    /// The current configuration; new connections take it, established ones watch it to drain.
    config: watch::Sender<Option<Arc<Snapshot>>>,
    pod: Arc<Pod>,
    bound: Mutex<BTreeMap<String, Bound>>,
    drain_timeout: std::time::Duration,
}

/// One listener as the admin endpoint shows it.
pub struct ListenerView {
    pub name: String,
    pub local: SocketAddr,
    pub counters: Arc<ListenerCounters>,
}

impl Proxy {
    /// A proxy whose removed or replaced listeners drain for `drain_timeout` (Envoy's `--drain-time-s`).
    pub fn new(drain_timeout: std::time::Duration) -> Arc<Proxy> {
        Arc::new(Proxy {
            config: watch::Sender::new(Some(Arc::new(Snapshot::default()))),
            // The standalone proxy is one pod without a netns, and without per-pod limits.
            pod: Arc::new(Pod::unlimited(SocketFactory::Host)),
            bound: Mutex::default(),
            drain_timeout,
        })
    }

    /// The proxy's secrets and TLS configurations.
    pub fn tls(&self) -> &crate::proxy::tls::Tls {
        self.pod.pools.tls()
    }

    /// The proxy's upstream pools (requests in flight and outlier state per cluster).
    pub fn pools(&self) -> &crate::proxy::upstream::pool::Pools {
        &self.pod.pools
    }

    /// Istio's standard metrics of the proxy's traffic (its `istio.stats` filters).
    pub fn istio_metrics(&self) -> &crate::proxy::istio_metrics::IstioMetrics {
        &self.pod.metrics
    }

    /// The configuration new connections are served by.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.borrow().clone().unwrap_or_default()
    }

    /// The listeners with a socket.
    pub fn listeners(&self) -> Vec<ListenerView> {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound
            .values()
            .map(|b| ListenerView { name: b.config.name.clone(), local: b.local, counters: Arc::clone(&b.counters) })
            .collect()
    }

    /// Makes `snapshot` the whole running configuration; new connections and new requests see it at once.
    /// A listener whose address changed is bound anew beside the old socket (SO_REUSEPORT) before the old one
    /// stops accepting; listeners still warming (RDS not arrived) are not bound. Returns the listeners that
    /// could not be bound, which keep their previous socket.
    pub fn apply(&self, snapshot: Snapshot) -> Vec<(String, io::Error)> {
        let listeners: Vec<Listener> = snapshot.active().filter(|l| l.bind_to_port).cloned().collect();
        self.config.send_replace(Some(Arc::new(snapshot)));
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound.retain(|name, _| listeners.iter().any(|l| &l.name == name));
        let mut failed = Vec::new();
        for l in &listeners {
            if bound.get(&l.name).is_some_and(|b| b.config.address == l.address) {
                bound.entry(l.name.clone()).and_modify(|b| b.config = l.clone());
                continue;
            }
            match self.bind(l) {
                Ok(new) => {
                    bound.insert(l.name.clone(), new);
                }
                Err(e) => failed.push((l.name.clone(), e)),
            }
        }
        failed
    }

    fn bind(&self, l: &Listener) -> io::Result<Bound> {
        let socket = bind_reuseport(l.address)
            .map_err(|e| io::Error::new(e.kind(), format!("listener {:?}: cannot bind {}: {e}", l.name, l.address)))?;
        let local = socket.local_addr()?;
        let counters = Arc::new(ListenerCounters::default());
        let served = Served { name: l.name.clone(), updates: self.config.subscribe(), pod: Arc::clone(&self.pod), drain_timeout: self.drain_timeout };
        let task = tokio::spawn(accept_loop(socket, served, Arc::clone(&counters)));
        Ok(Bound { config: l.clone(), local, counters, task })
    }
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// What one bound listener's connections are served with.
struct Served {
    name: String,
    updates: watch::Receiver<Option<Arc<Snapshot>>>,
    pod: Arc<Pod>,
    drain_timeout: std::time::Duration,
}

async fn accept_loop(socket: TcpListener, served: Served, counters: Arc<ListenerCounters>) {
    let served = Arc::new(served);
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(listener = %served.name, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.downstream_cx_total.fetch_add(1, Relaxed);
        // Each connection keeps the configuration it started with.
        let mut updates = served.updates.clone();
        let config = updates.borrow_and_update().clone();
        let (counters, served) = (Arc::clone(&counters), Arc::clone(&served));
        tokio::spawn(async move {
            if let Some((config, entry)) = config.as_ref().and_then(|c| Some((c, c.listener_named(&served.name)?))) {
                let _ = stream.set_nodelay(true);
                let drain = Drain { updates, timeout: served.drain_timeout };
                let accepted = Accepted { stream, peer, original_dst: None };
                if let Outcome::UpstreamFailed(e) = connection_handler::serve(accepted, entry, config, &served.pod, drain).await {
                    tracing::debug!(listener = %served.name, %peer, "no upstream connection: {e}");
                }
            }
            counters.downstream_cx_destroy.fetch_add(1, Relaxed);
        });
    }
}
