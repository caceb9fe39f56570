//! A captured pod's configuration as its in-pod listeners see it: the pod's own listeners, routes, clusters
//! and endpoints from its xDS stream, shared (not copied) with the stream's store.

use std::net::SocketAddr;
use std::sync::Arc;

use super::cluster::{ClusterRef, Clusters};
use super::connection_handler::{listener_by_address, Config};
use crate::config::cluster::{Cluster, Discovery};
use crate::config::listener::Listener;
use crate::config::route::RouteConfiguration;
use crate::xds::sorted::ByName;

/// One accepted state of a pod's xDS configuration.
pub struct PodConfig {
    pub listeners: Arc<ByName<Listener>>,
    pub routes: Arc<ByName<Arc<RouteConfiguration>>>,
    pub clusters: Arc<ByName<Cluster>>,
    pub assignments: Arc<ByName<Vec<SocketAddr>>>,
}

impl PodConfig {
    /// The listener an in-pod socket on `port` serves: Istio's `virtualOutbound` (15001) or `virtualInbound`
    /// (15006), bound on the wildcard address.
    pub fn bound_on_port(&self, port: u16) -> Option<&Listener> {
        self.listeners.values().map(|e| e.model()).find(|l| l.bind_to_port && l.address.port() == port)
    }

    /// A listener whose RDS routes have not all arrived is still warming and takes no connections.
    fn active(&self, l: &Listener) -> bool {
        l.rds_names().all(|n| self.routes.contains_key(n))
    }
}

impl Clusters for PodConfig {
    fn cluster(&self, name: &str) -> Option<ClusterRef<'_>> {
        let entry = self.clusters.get(name)?;
        let config = entry.model();
        let endpoints: &[SocketAddr] = match &config.discovery {
            Discovery::Static { endpoints } => endpoints,
            Discovery::Eds { service_name } => self.assignments.get(service_name).map_or(&[], |a| a.model().as_slice()),
            Discovery::OriginalDst => &[],
        };
        Some(ClusterRef { config, endpoints, cursor: &entry.cursor, counters: None })
    }
}

impl Config for PodConfig {
    fn listener_for(&self, dst: SocketAddr) -> Option<&Listener> {
        listener_by_address(self.listeners.values().map(|e| e.model()).filter(|l| self.active(l)), dst)
    }

    fn route_config(&self, name: &str) -> Option<Arc<RouteConfiguration>> {
        self.routes.get(name).map(|e| Arc::clone(e.model()))
    }

    fn listener_named(&self, name: &str) -> Option<&Listener> {
        self.listeners.get(name).map(|e| e.model())
    }
}
