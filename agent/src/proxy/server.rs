//! The standalone proxy (`weft-agent proxy -c FILE`): the listeners and clusters of an Envoy bootstrap plus
//! whatever xDS adds, served in the agent's own network namespace. The configuration is one snapshot swapped
//! atomically; bound listeners are diffed by name so unchanged ones keep running and established connections
//! are never cut.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cluster::{ClusterManager, ClusterRef, Clusters};
use super::connection_handler::{self, listener_by_address, Config, Drain, Outcome};
use crate::config::cluster::Cluster;
use crate::config::listener::Listener;
use crate::config::route::RouteConfiguration;

/// Counters of one listener, named as Envoy names them.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    pub downstream_cx_total: AtomicU64,
    pub downstream_cx_destroy: AtomicU64,
}

/// One configuration of the standalone proxy.
pub struct ProxyConfig {
    listeners: Vec<Listener>,
    clusters: Arc<ClusterManager>,
    /// RDS route configurations by name.
    routes: HashMap<String, Arc<RouteConfiguration>>,
}

impl Clusters for ProxyConfig {
    fn cluster(&self, name: &str) -> Option<ClusterRef<'_>> {
        self.clusters.cluster(name)
    }
}

impl Config for ProxyConfig {
    fn listener_for(&self, dst: SocketAddr) -> Option<&Listener> {
        listener_by_address(self.listeners.iter(), dst)
    }

    fn route_config(&self, name: &str) -> Option<Arc<RouteConfiguration>> {
        self.routes.get(name).cloned()
    }

    fn listener_named(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }
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
    config: watch::Sender<Option<Arc<ProxyConfig>>>,
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
        let empty = ProxyConfig { listeners: Vec::new(), clusters: Arc::new(ClusterManager::new(&[], &HashMap::new())), routes: HashMap::new() };
        Arc::new(Proxy { config: watch::Sender::new(Some(Arc::new(empty))), bound: Mutex::default(), drain_timeout })
    }

    pub fn clusters(&self) -> Arc<ClusterManager> {
        self.config.borrow().as_ref().map_or_else(|| Arc::new(ClusterManager::new(&[], &HashMap::new())), |c| Arc::clone(&c.clusters))
    }

    /// The listeners with a socket.
    pub fn listeners(&self) -> Vec<ListenerView> {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound
            .values()
            .map(|b| ListenerView { name: b.config.name.clone(), local: b.local, counters: Arc::clone(&b.counters) })
            .collect()
    }

    /// Makes `clusters`, `listeners` and the RDS `routes` the whole running configuration; new connections and
    /// new requests see it at once. A listener whose address changed is bound anew beside the old socket
    /// (SO_REUSEPORT) before the old one stops accepting. Returns the listeners that could not be bound,
    /// which keep their previous socket.
    pub fn apply(
        &self,
        listeners: &[Listener],
        clusters: &[Cluster],
        assignments: &HashMap<String, Vec<SocketAddr>>,
        routes: HashMap<String, Arc<RouteConfiguration>>,
    ) -> Vec<(String, io::Error)> {
        let clusters = Arc::new(ClusterManager::new(clusters, assignments));
        self.config.send_replace(Some(Arc::new(ProxyConfig { listeners: listeners.to_vec(), clusters, routes })));
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound.retain(|name, _| listeners.iter().any(|l| &l.name == name && l.bind_to_port));
        let mut failed = Vec::new();
        for l in listeners.iter().filter(|l| l.bind_to_port) {
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
        let task = tokio::spawn(accept_loop(socket, l.name.clone(), self.config.subscribe(), self.drain_timeout, Arc::clone(&counters)));
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

async fn accept_loop(
    socket: TcpListener,
    name: String,
    updates: watch::Receiver<Option<Arc<ProxyConfig>>>,
    drain_timeout: std::time::Duration,
    counters: Arc<ListenerCounters>,
) {
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(listener = %name, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.downstream_cx_total.fetch_add(1, Relaxed);
        // Each connection keeps the configuration it started with.
        let mut updates = updates.clone();
        let config = updates.borrow_and_update().clone();
        let (counters, name) = (Arc::clone(&counters), name.clone());
        tokio::spawn(async move {
            if let Some((config, entry)) = config.as_ref().and_then(|c| Some((c, c.listener_named(&name)?))) {
                let _ = stream.set_nodelay(true);
                let drain = Drain { updates, timeout: drain_timeout };
                if let Outcome::UpstreamFailed(e) = connection_handler::serve(stream, peer, None, entry, config, None, drain).await {
                    tracing::debug!(listener = %name, %peer, "no upstream connection: {e}");
                }
            }
            counters.downstream_cx_destroy.fetch_add(1, Relaxed);
        });
    }
}
