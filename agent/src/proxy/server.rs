//! The standalone proxy (`weft-agent proxy -c FILE`): the listeners and clusters of an Envoy bootstrap plus
//! whatever xDS adds, served in the agent's own network namespace. The cluster set is swapped atomically;
//! listeners are diffed by name so unchanged ones keep running and established connections are never cut.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::cluster::ClusterManager;
use super::{http, tcp};
use crate::config::cluster::Cluster;
use crate::config::listener::{Listener, NetworkFilter, Routes};

/// Counters of one listener, named as Envoy names them.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    pub downstream_cx_total: AtomicU64,
    pub downstream_cx_destroy: AtomicU64,
}

struct Active {
    config: Listener,
    local: SocketAddr,
    counters: Arc<ListenerCounters>,
    task: JoinHandle<()>,
}

impl Drop for Active {
    fn drop(&mut self) {
        // Stops accepting; connections already accepted run on in their own tasks.
        self.task.abort();
    }
}

/// The running proxy.
pub struct Proxy {
    clusters: Arc<ArcSwap<ClusterManager>>,
    listeners: Mutex<BTreeMap<String, Active>>,
}

/// One listener as the admin endpoint shows it.
pub struct ListenerView {
    pub name: String,
    pub local: SocketAddr,
    pub counters: Arc<ListenerCounters>,
}

impl Proxy {
    pub fn new() -> Arc<Proxy> {
        let empty = ClusterManager::new(&[], &Default::default());
        Arc::new(Proxy { clusters: Arc::new(ArcSwap::from_pointee(empty)), listeners: Mutex::default() })
    }

    pub fn clusters(&self) -> Arc<ClusterManager> {
        self.clusters.load_full()
    }

    pub fn listeners(&self) -> Vec<ListenerView> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners
            .values()
            .map(|a| ListenerView { name: a.config.name.clone(), local: a.local, counters: Arc::clone(&a.counters) })
            .collect()
    }

    /// Makes `clusters` and `listeners` the whole running configuration. Clusters first, so a new listener
    /// never sees a cluster set older than itself. A changed listener is bound anew beside the old socket
    /// (SO_REUSEPORT) before the old one stops accepting. Returns the listeners that could not be bound, which
    /// keep their previous state.
    pub fn apply(
        &self,
        listeners: &[Listener],
        clusters: &[Cluster],
        assignments: &std::collections::HashMap<String, Vec<SocketAddr>>,
    ) -> Vec<(String, io::Error)> {
        self.clusters.store(Arc::new(ClusterManager::new(clusters, assignments)));
        let mut active = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        active.retain(|name, _| listeners.iter().any(|l| &l.name == name));
        let mut failed = Vec::new();
        for l in listeners {
            if active.get(&l.name).is_some_and(|a| a.config == *l) {
                continue;
            }
            match self.bind(l) {
                Ok(new) => {
                    active.insert(l.name.clone(), new);
                }
                Err(e) => failed.push((l.name.clone(), e)),
            }
        }
        failed
    }

    fn bind(&self, l: &Listener) -> io::Result<Active> {
        let socket = bind_reuseport(l.address)
            .map_err(|e| io::Error::new(e.kind(), format!("listener {:?}: cannot bind {}: {e}", l.name, l.address)))?;
        let local = socket.local_addr()?;
        let counters = Arc::new(ListenerCounters::default());
        let task = tokio::spawn(accept_loop(socket, l.filter.clone(), Arc::clone(&self.clusters), Arc::clone(&counters)));
        Ok(Active { config: l.clone(), local, counters, task })
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

async fn accept_loop(socket: TcpListener, filter: NetworkFilter, clusters: Arc<ArcSwap<ClusterManager>>, counters: Arc<ListenerCounters>) {
    let routes = match &filter {
        NetworkFilter::HttpConnectionManager(Routes::Inline(rc)) => Some(Arc::new(rc.clone())),
        // RDS routes are resolved to inline ones before a listener reaches the proxy (see xds::XdsState).
        NetworkFilter::HttpConnectionManager(Routes::Rds(_)) | NetworkFilter::TcpProxy { .. } => None,
    };
    loop {
        let stream = match socket.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.downstream_cx_total.fetch_add(1, Relaxed);
        // Each connection keeps the cluster set it started with.
        let (filter, clusters, counters, routes) = (filter.clone(), clusters.load_full(), Arc::clone(&counters), routes.clone());
        tokio::spawn(async move {
            match (&filter, routes) {
                (NetworkFilter::TcpProxy { cluster }, _) => tcp_proxy(stream, cluster, &clusters).await,
                (NetworkFilter::HttpConnectionManager(_), Some(routes)) => http::serve_connection(stream, routes, clusters).await,
                _ => {}
            }
            counters.downstream_cx_destroy.fetch_add(1, Relaxed);
        });
    }
}

async fn tcp_proxy(downstream: TcpStream, cluster: &str, clusters: &ClusterManager) {
    let original_dst = tcp::original_dst(&downstream).ok();
    match clusters.connect(cluster, original_dst).await {
        Ok(upstream) => {
            if let Err(e) = tcp::relay(downstream, upstream).await {
                tracing::debug!(cluster, "tcp_proxy connection ended: {e}");
            }
        }
        // Envoy closes the downstream connection when no upstream connection can be made.
        Err(e) => tracing::debug!(cluster, "tcp_proxy: {e}"),
    }
}
