//! One configuration snapshot: what a connection or request of the data path is served by. The standalone
//! proxy and every captured pod use this one type (the standalone proxy is a pod without a netns); without a
//! control plane a pod's snapshot is the generated pass-through configuration. Snapshots are immutable and
//! share their resources (copy on write) with the store they were taken from, so one costs a few pointers.
//! A leaf: it knows the configuration model and nothing of the data path.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::config::cluster::{Assignment, Cluster, Discovery};
use crate::config::listener::Listener;
use crate::config::route::RouteConfiguration;
use crate::config::secret::Secret;
use crate::config::store::{ByName, ClusterState};
use crate::config::workload_metadata::LocalWorkload;

#[derive(Default)]
pub struct Snapshot {
    pub listeners: Arc<ByName<Listener>>,
    /// RDS route configurations by name.
    pub routes: Arc<ByName<Arc<RouteConfiguration>>>,
    pub clusters: Arc<ByName<Cluster>>,
    /// EDS: service name → endpoints.
    pub assignments: Arc<ByName<Assignment>>,
    /// Secrets TLS contexts name: the bootstrap's static ones and those received over ADS (SDS).
    pub secrets: Arc<ByName<Secret>>,
    /// Who this proxy serves (its node id and workload metadata), for Istio's metadata exchanges.
    pub local: Arc<LocalWorkload>,
}

/// One cluster as the data path sees it.
pub struct ClusterRef<'a> {
    pub config: &'a Cluster,
    /// STATIC endpoints, EDS endpoints as last received, DNS endpoints as last resolved; empty for
    /// ORIGINAL_DST.
    pub endpoints: Endpoints<'a>,
    /// Round-robin position.
    pub cursor: &'a AtomicUsize,
    pub state: &'a ClusterState,
}

/// A cluster's endpoints: from the configuration, or a DNS resolution shared with the cluster's state.
pub enum Endpoints<'a> {
    Config(&'a Assignment),
    Resolved(Arc<Assignment>),
}

impl std::ops::Deref for Endpoints<'_> {
    type Target = Assignment;

    fn deref(&self) -> &Assignment {
        match self {
            Endpoints::Config(a) => a,
            Endpoints::Resolved(a) => a,
        }
    }
}

impl Snapshot {
    /// The listener an in-pod socket on `port` serves: Istio's `virtualOutbound` (15001) or `virtualInbound`
    /// (15006), bound on the wildcard address.
    pub fn bound_on_port(&self, port: u16) -> Option<&Listener> {
        self.active().find(|l| l.bind_to_port && l.address.port() == port)
    }

    /// Listeners that take connections: a listener whose RDS routes have not all arrived is still warming.
    pub fn active(&self) -> impl Iterator<Item = &Listener> + Clone {
        self.listeners.values().map(|e| e.model()).filter(|l| l.rds_names().all(|n| self.routes.contains_key(n)))
    }

    /// The listener a `use_original_dst` listener hands a connection for `dst` to: Envoy's lookup, a listener
    /// on exactly `dst`, else one on the wildcard address with `dst`'s port.
    pub fn listener_for(&self, dst: SocketAddr) -> Option<&Listener> {
        let wildcard = |ip: IpAddr| ip.is_unspecified() && ip.is_ipv4() == dst.is_ipv4();
        let active = self.active();
        active.clone().find(|l| l.address == dst).or_else(|| active.into_iter().find(|l| l.address.port() == dst.port() && wildcard(l.address.ip())))
    }

    /// The listener called `name`, if this configuration still has it.
    pub fn listener_named(&self, name: &str) -> Option<&Listener> {
        self.listeners.get(name).map(|e| e.model())
    }

    /// An RDS route configuration (`None` while it has not arrived).
    pub fn route_config(&self, name: &str) -> Option<Arc<RouteConfiguration>> {
        self.routes.get(name).map(|e| Arc::clone(e.model()))
    }

    pub fn cluster(&self, name: &str) -> Option<ClusterRef<'_>> {
        let entry = self.clusters.get(name)?;
        let config = entry.model();
        static NONE: Assignment = Assignment { priorities: Vec::new(), localities: Vec::new(), socket_labels: std::collections::BTreeMap::new() };
        let endpoints = match &config.discovery {
            Discovery::Static { endpoints, .. } => Endpoints::Config(endpoints),
            Discovery::Eds { service_name } => Endpoints::Config(self.assignments.get(service_name).map_or(&NONE, |a| a.model())),
            Discovery::Dns { .. } => entry.state.resolved().map_or(Endpoints::Config(&NONE), |(_, a)| Endpoints::Resolved(a)),
            Discovery::OriginalDst => Endpoints::Config(&NONE),
        };
        Some(ClusterRef { config, endpoints, cursor: &entry.cursor, state: &entry.state })
    }

    /// Every cluster with its current endpoints, sorted by name.
    pub fn all_clusters(&self) -> impl Iterator<Item = ClusterRef<'_>> {
        self.clusters.values().filter_map(|e| self.cluster(&e.name))
    }
}
