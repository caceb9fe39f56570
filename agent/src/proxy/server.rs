//! The standalone proxy (`weft-agent proxy -c FILE`): the listeners and clusters of an Envoy bootstrap, served
//! in the agent's own network namespace.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::cluster::ClusterManager;
use super::{http, tcp};
use crate::config::bootstrap::Bootstrap;
use crate::config::listener::{Listener, NetworkFilter};

/// Counters of one listener, named as Envoy names them.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    pub downstream_cx_total: AtomicU64,
    pub downstream_cx_destroy: AtomicU64,
}

/// A running configuration: its clusters and its bound listeners.
pub struct Running {
    pub bootstrap: Arc<Bootstrap>,
    pub clusters: Arc<ClusterManager>,
    pub listeners: Vec<(Listener, SocketAddr, Arc<ListenerCounters>)>,
}

/// Binds every listener (all or nothing: a port in use fails start-up, as in Envoy) and starts serving.
pub async fn start(bootstrap: Bootstrap) -> io::Result<Running> {
    let bootstrap = Arc::new(bootstrap);
    let clusters = Arc::new(ClusterManager::new(&bootstrap.clusters));
    let mut bound = Vec::new();
    for l in &bootstrap.listeners {
        let socket = TcpListener::bind(l.address)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("listener {:?}: cannot bind {}: {e}", l.name, l.address)))?;
        bound.push((l.clone(), socket));
    }
    let mut listeners = Vec::new();
    for (l, socket) in bound {
        let counters = Arc::new(ListenerCounters::default());
        let local = socket.local_addr()?;
        tokio::spawn(accept_loop(socket, l.filter.clone(), Arc::clone(&clusters), Arc::clone(&counters)));
        listeners.push((l, local, counters));
    }
    Ok(Running { bootstrap, clusters, listeners })
}

async fn accept_loop(socket: TcpListener, filter: NetworkFilter, clusters: Arc<ClusterManager>, counters: Arc<ListenerCounters>) {
    let routes = match &filter {
        NetworkFilter::HttpConnectionManager(rc) => Some(Arc::new(rc.clone())),
        NetworkFilter::TcpProxy { .. } => None,
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
        let (filter, clusters, counters, routes) = (filter.clone(), Arc::clone(&clusters), Arc::clone(&counters), routes.clone());
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
