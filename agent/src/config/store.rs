//! Accepted configuration resources as the control path stores them and the data path's snapshots share
//! them: each resource decoded once (and shared by every pod that received the same bytes), a pod's
//! resources of one type in a vector sorted by name (one pointer per resource, where a map would add a key
//! and node overhead to every entry of every pod).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// One accepted resource, from xDS or from the bootstrap.
#[derive(Debug)]
pub struct Resource<T> {
    pub name: Arc<str>,
    pub version: String,
    /// The resource as received (protobuf bytes, a fraction of its JSON tree), decoded again for config_dump;
    /// empty for bootstrap resources.
    pub bytes: Box<[u8]>,
    pub model: T,
    pub last_updated: SystemTime,
    /// Round-robin position over a cluster's endpoints, shared by every pod holding the cluster.
    pub cursor: AtomicUsize,
    /// A cluster's counters and load-balancing state.
    pub state: ClusterState,
}

/// What every holder of a cluster shares: counters named as Envoy names them and the hash ring of its
/// endpoints (a function of the endpoints alone). What each pod keeps for itself (requests in flight,
/// outlier detection) is in its upstream pools.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub upstream_cx_total: AtomicU64,
    pub upstream_cx_connect_fail: AtomicU64,
    pub upstream_rq_total: AtomicU64,
    pub upstream_rq_retry: AtomicU64,
    pub upstream_rq_pending_overflow: AtomicU64,
    pub upstream_rq_retry_overflow: AtomicU64,
    pub outlier_detection_ejections_total: AtomicU64,
    ring: Mutex<Option<(Vec<SocketAddr>, Arc<Ring>)>>,
    /// A DNS cluster's last resolution and when it is due for a refresh.
    resolved: Mutex<Option<(std::time::Instant, Arc<super::cluster::Assignment>)>>,
    /// The active health check: whether it runs, the endpoints it checks, and what it found.
    pub health: HealthState,
}

/// What a cluster's active health checker knows, shared with the data path.
#[derive(Debug, Default)]
pub struct HealthState {
    pub started: std::sync::atomic::AtomicBool,
    /// The endpoints to check: the ones the data path last saw.
    pub hosts: Mutex<Vec<SocketAddr>>,
    results: Mutex<std::collections::HashMap<SocketAddr, Health>>,
    /// Set when the first round of checks is done; waiters are woken then.
    pub first_round_done: std::sync::atomic::AtomicBool,
    pub first_round: tokio::sync::Notify,
}

#[derive(Debug, Clone, Copy)]
struct Health {
    healthy: bool,
    /// Consecutive results against the current state.
    streak: u32,
}

impl HealthState {
    /// Whether load balancing may use `endpoint`: always without a health checker; with one, once a check
    /// passed (a new endpoint is unhealthy until then, as in Envoy).
    pub fn allows(&self, endpoint: SocketAddr) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        !self.started.load(Relaxed) || self.results.lock().unwrap_or_else(|e| e.into_inner()).get(&endpoint).is_some_and(|h| h.healthy)
    }

    /// Records one check: the first decides at once; later ones flip the state after `threshold`
    /// consecutive results against it, except that a wrong answer (not a network failure) makes a healthy
    /// endpoint unhealthy at once, as Envoy's non-network failures do.
    pub fn record(&self, endpoint: SocketAddr, outcome: CheckOutcome, unhealthy_threshold: u32, healthy_threshold: u32) {
        let passed = outcome == CheckOutcome::Passed;
        let mut results = self.results.lock().unwrap_or_else(|e| e.into_inner());
        let h = results.entry(endpoint).or_insert(Health { healthy: passed, streak: 0 });
        if h.healthy == passed {
            h.streak = 0;
            return;
        }
        h.streak += 1;
        let threshold = match outcome {
            CheckOutcome::Passed => healthy_threshold,
            CheckOutcome::NetworkFailure => unhealthy_threshold,
            CheckOutcome::Failed => 1,
        };
        if h.streak >= threshold {
            *h = Health { healthy: passed, streak: 0 };
        }
    }
}

/// The result of one active health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    Passed,
    /// No connection, a reset, or no (complete) answer within the timeout: counts toward
    /// `unhealthy_threshold`.
    NetworkFailure,
    /// The endpoint answered, wrongly (status, body, gRPC status).
    Failed,
}

/// A hash ring or Maglev table: (hash or slot, index of the endpoint).
pub type Ring = Vec<(u64, usize)>;

impl ClusterState {
    /// A DNS cluster's endpoints as last resolved (none before the first resolution) and when they are due
    /// for a refresh.
    pub fn resolved(&self) -> Option<(std::time::Instant, Arc<super::cluster::Assignment>)> {
        self.resolved.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stores a resolution, to be refreshed after `refresh`.
    pub fn set_resolved(&self, assignment: super::cluster::Assignment, refresh: std::time::Duration) {
        let due = std::time::Instant::now() + refresh;
        *self.resolved.lock().unwrap_or_else(|e| e.into_inner()) = Some((due, Arc::new(assignment)));
    }

    /// The hash ring (or Maglev table) of `hosts`, built by `build` when the hosts changed.
    pub fn ring(&self, hosts: &[SocketAddr], build: impl FnOnce() -> Ring) -> Arc<Ring> {
        let mut cached = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some((for_hosts, ring)) if for_hosts == hosts => Arc::clone(ring),
            _ => {
                let ring = Arc::new(build());
                *cached = Some((hosts.to_vec(), Arc::clone(&ring)));
                ring
            }
        }
    }
}

impl<T> Resource<T> {
    pub fn model(&self) -> &T {
        &self.model
    }

    /// A resource from the bootstrap file (no wire form, no version).
    pub fn fixed(name: &str, model: T) -> Entry<T> {
        Arc::new(Resource {
            name: Arc::from(name),
            version: String::new(),
            bytes: Box::default(),
            model,
            last_updated: SystemTime::now(),
            cursor: AtomicUsize::new(0),
            state: ClusterState::default(),
        })
    }
}

pub type Entry<T> = Arc<Resource<T>>;

#[derive(Debug)]
pub struct ByName<T>(Vec<Entry<T>>);

/// Copies the pointers (copy on write of a pod's store), never the resources.
impl<T> Clone for ByName<T> {
    fn clone(&self) -> Self {
        ByName(self.0.clone())
    }
}

impl<T> Default for ByName<T> {
    fn default() -> Self {
        ByName(Vec::new())
    }
}

impl<T> FromIterator<Entry<T>> for ByName<T> {
    /// Later entries replace earlier ones of the same name.
    fn from_iter<I: IntoIterator<Item = Entry<T>>>(entries: I) -> Self {
        let mut out = ByName::default();
        for e in entries {
            out.insert(e);
        }
        out
    }
}

impl<T> ByName<T> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|e| (*e.name).cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&Entry<T>> {
        self.find(name).ok().map(|i| &self.0[i])
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Inserts or replaces the entry of the same name.
    pub fn insert(&mut self, entry: Entry<T>) {
        match self.find(&entry.name) {
            Ok(i) => self.0[i] = entry,
            Err(i) => self.0.insert(i, entry),
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Entry<T>> {
        self.find(name).ok().map(|i| self.0.remove(i))
    }

    pub fn retain(&mut self, keep: impl FnMut(&Entry<T>) -> bool) {
        self.0.retain(keep);
        self.0.shrink_to_fit();
    }

    pub fn values(&self) -> std::slice::Iter<'_, Entry<T>> {
        self.0.iter()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Resource<T>)> {
        self.0.iter().map(|e| (&*e.name, &**e))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
