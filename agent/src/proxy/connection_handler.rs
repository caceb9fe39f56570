//! What happens to an accepted connection, in Envoy's order: the listener of its original destination takes
//! it over (`use_original_dst`), that listener's filters inspect it, a filter chain is chosen, and the chain's
//! network filter (tcp_proxy or the HTTP connection manager) serves it. Shared by the standalone proxy and the
//! in-pod listeners; each connection keeps the configuration snapshot it started with.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::cluster::{self, Clusters, UpstreamError};
use super::filter_chain::{self, ConnectionInfo};
use super::listener_filter::{self, InspectError, Rewind};
use super::{http, tcp};
use crate::capture::netns::Netns;
use crate::config::listener::{Listener, NetworkFilter, Routes};
use crate::config::route::RouteConfiguration;

/// A configuration snapshot as the data path sees it.
pub trait Config: Clusters {
    /// The listener a `use_original_dst` listener hands a connection for `dst` to.
    fn listener_for(&self, dst: SocketAddr) -> Option<&Listener>;
    /// The listener called `name`, if this configuration still has it.
    fn listener_named(&self, name: &str) -> Option<&Listener>;
    /// An RDS route configuration (`None` while it has not arrived).
    fn route_config(&self, name: &str) -> Option<Arc<RouteConfiguration>>;
}

/// Envoy's lookup: a listener on exactly `dst`, else one on the wildcard address with `dst`'s port.
pub fn listener_by_address<'a>(listeners: impl Iterator<Item = &'a Listener> + Clone, dst: SocketAddr) -> Option<&'a Listener> {
    let wildcard = |ip: IpAddr| ip.is_unspecified() && ip.is_ipv4() == dst.is_ipv4();
    listeners.clone().find(|l| l.address == dst).or_else(|| listeners.into_iter().find(|l| l.address.port() == dst.port() && wildcard(l.address.ip())))
}

/// Where an upstream connection of this downstream connection goes from.
pub struct Upstream<C> {
    pub config: Arc<C>,
    /// The pod's network namespace (node agent), or the agent's own (standalone proxy).
    pub netns: Option<Netns>,
    /// The downstream connection's destination, for ORIGINAL_DST clusters.
    pub original_dst: SocketAddr,
}

impl<C> Clone for Upstream<C> {
    fn clone(&self) -> Self {
        Upstream { config: Arc::clone(&self.config), netns: self.netns.clone(), original_dst: self.original_dst }
    }
}

impl<C: Config> Upstream<C> {
    pub async fn connect(&self, cluster: &str) -> Result<TcpStream, UpstreamError> {
        cluster::connect(&*self.config, cluster, Some(self.original_dst), self.netns.as_ref()).await
    }
}

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
    UpstreamFailed(UpstreamError),
    /// Its listener was removed or replaced and the drain time ran out: closed.
    Drained,
}

/// Listener draining, as Envoy does it: when a configuration update removes or changes the listener that
/// serves a connection, the connection may go on for `timeout` and is then closed.
pub struct Drain<C> {
    pub updates: watch::Receiver<Option<Arc<C>>>,
    pub timeout: Duration,
}

impl<C: Config> Drain<C> {
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

/// Serves a connection accepted by `entry`, from `netns` when it is a pod's, until it ends or its listener has
/// been drained. `known_dst` is the original destination when the caller already read it.
pub async fn serve<C: Config>(
    stream: TcpStream,
    peer: SocketAddr,
    known_dst: Option<SocketAddr>,
    entry: &Listener,
    config: &Arc<C>,
    netns: Option<&Netns>,
    drain: Drain<C>,
) -> Outcome {
    let socket_local = stream.local_addr().unwrap_or(entry.address);
    let restored = match entry.listener_filters.original_dst {
        true => known_dst.or_else(|| tcp::original_dst(&stream).ok()),
        false => None,
    };
    let local = restored.unwrap_or(socket_local);
    let listener = match restored {
        Some(dst) if entry.use_original_dst => config.listener_for(dst).unwrap_or(entry),
        _ => entry,
    };
    let (io, detected) = match listener_filter::inspect(stream, &listener.listener_filters).await {
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
        return Outcome::NoFilterChain;
    };
    let upstream = Upstream { config: Arc::clone(config), netns: netns.cloned(), original_dst: local };
    let updates = drain.updates.clone();
    tokio::select! {
        outcome = run_filter(io, &chain.filter, upstream, updates, listener, peer) => outcome,
        () = drain.of(listener) => Outcome::Drained,
    }
}

/// What an HTTP connection manager's requests are routed by: each request takes the latest configuration
/// (RDS routes and clusters), as Envoy applies route and cluster updates to established connections.
pub struct HttpContext<C> {
    pub routes: Routes,
    pub updates: watch::Receiver<Option<Arc<C>>>,
    /// The connection's own snapshot, for what the latest one lacks.
    pub upstream: Upstream<C>,
}

impl<C: Config> HttpContext<C> {
    /// The routes and upstreams for a request starting now; no routes when the RDS configuration is gone.
    pub fn current(&self) -> (Option<Arc<RouteConfiguration>>, Upstream<C>) {
        let config = self.updates.borrow().clone().unwrap_or_else(|| Arc::clone(&self.upstream.config));
        let routes = match &self.routes {
            Routes::Inline(rc) => Some(Arc::clone(rc)),
            Routes::Rds(name) => config.route_config(name),
        };
        (routes, Upstream { config, ..self.upstream.clone() })
    }
}

/// The chain's terminal network filter.
async fn run_filter<C: Config>(
    io: Rewind,
    filter: &NetworkFilter,
    upstream: Upstream<C>,
    updates: watch::Receiver<Option<Arc<C>>>,
    listener: &Listener,
    peer: SocketAddr,
) -> Outcome {
    match filter {
        NetworkFilter::TcpProxy { cluster } => match upstream.connect(cluster).await {
            // Envoy closes the downstream connection when no upstream connection can be made.
            Err(e) => Outcome::UpstreamFailed(e),
            Ok(up) => match tcp::relay(io, up).await {
                Ok((from_downstream, to_downstream)) => Outcome::Relayed { from_downstream, to_downstream },
                Err(e) => {
                    tracing::debug!(listener = %listener.name, %peer, cluster, "tcp_proxy connection ended: {e}");
                    Outcome::Relayed { from_downstream: 0, to_downstream: 0 }
                }
            },
        },
        NetworkFilter::HttpConnectionManager(routes) => {
            if let Routes::Rds(name) = routes {
                if upstream.config.route_config(name).is_none() {
                    return Outcome::Warming;
                }
            }
            http::serve_connection(io, Arc::new(HttpContext { routes: routes.clone(), updates, upstream })).await;
            Outcome::Http
        }
    }
}
