//! What one pod (or the standalone proxy) keeps about each cluster while it runs, as its sidecar would:
//! requests and retries in flight (circuit breakers, least request), connections and waiting requests
//! (circuit breakers), and per-endpoint outlier detection by consecutive errors.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use super::super::random::random;

use crate::config::cluster::OutlierDetection;
use crate::config::store::ClusterState;

#[derive(Debug, Default)]
pub struct ClusterRuntime {
    pub active_requests: AtomicU64,
    pub active_retries: AtomicU64,
    /// HTTP/1.1 connections open (pooled or busy).
    pub connections: AtomicU64,
    /// Requests waiting for a connection.
    pub pending: AtomicU64,
    /// Signalled when a connection is returned to the pool or closes.
    pub freed: Notify,
    endpoints: Mutex<HashMap<SocketAddr, EndpointState>>,
}

#[derive(Debug, Default, Clone)]
struct EndpointState {
    active: u64,
    consecutive_5xx: u32,
    consecutive_gateway_failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// What an attempt ended with, for outlier detection.
#[derive(Debug, Clone, Copy)]
pub enum Result {
    Status(u16),
    /// Connect failure, reset or timeout: counted as a 503 (Envoy's default, no split of local errors).
    LocalFailure,
}

/// Counts an attempt in flight to an endpoint until dropped.
pub struct InFlight {
    runtime: Arc<ClusterRuntime>,
    endpoint: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(e) = self.runtime.endpoints().get_mut(&self.endpoint) {
            e.active = e.active.saturating_sub(1);
        }
    }
}

impl ClusterRuntime {
    fn endpoints(&self) -> MutexGuard<'_, HashMap<SocketAddr, EndpointState>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests in flight to `endpoint` from here.
    pub fn active(&self, endpoint: SocketAddr) -> u64 {
        self.endpoints().get(&endpoint).map_or(0, |e| e.active)
    }

    pub fn start(self: &Arc<Self>, endpoint: SocketAddr) -> InFlight {
        self.endpoints().entry(endpoint).or_default().active += 1;
        InFlight { runtime: Arc::clone(self), endpoint }
    }

    /// The endpoints load balancing may choose: those not ejected, or all of them when fewer than
    /// `panic_threshold` percent are available (Envoy's panic mode).
    /// `passes`: the active health check's verdict.
    pub fn available(&self, endpoints: &[SocketAddr], panic_threshold: f64, passes: impl Fn(SocketAddr) -> bool) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut states = self.endpoints();
        let healthy: Vec<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(|e| passes(*e))
            .filter(|e| match states.get_mut(e) {
                Some(s) if s.ejected_until.is_some_and(|t| t > now) => false,
                Some(s) => {
                    s.ejected_until = None;
                    true
                }
                None => true,
            })
            .collect();
        // Panic mode counts hosts, not their weighted slots.
        if (distinct(&healthy) as f64) * 100.0 < panic_threshold * distinct(endpoints) as f64 {
            endpoints.to_vec()
        } else {
            healthy
        }
    }

    /// Records an attempt's result; ejects the endpoint when its consecutive errors reach the threshold.
    pub fn record(&self, endpoint: SocketAddr, result: Result, detection: Option<&OutlierDetection>, hosts: usize, stats: &ClusterState) {
        let Some(od) = detection else { return };
        let code = match result {
            Result::Status(s) => s,
            Result::LocalFailure => 503,
        };
        let now = Instant::now();
        let mut states = self.endpoints();
        let ejected = states.values().filter(|s| s.ejected_until.is_some_and(|t| t > now)).count();
        let state = states.entry(endpoint).or_default();
        if code < 500 {
            state.consecutive_5xx = 0;
            state.consecutive_gateway_failures = 0;
            return;
        }
        state.consecutive_5xx += 1;
        if matches!(code, 502..=504) {
            state.consecutive_gateway_failures += 1;
        }
        let by_5xx = state.consecutive_5xx >= od.consecutive_5xx && enforced(od.enforcing_consecutive_5xx);
        let by_gateway = state.consecutive_gateway_failures >= od.consecutive_gateway_failure && enforced(od.enforcing_consecutive_gateway_failure);
        let room = ejected == 0 || ((ejected + 1) * 100) as f64 <= f64::from(od.max_ejection_percent) * hosts as f64;
        if (by_5xx || by_gateway) && room && state.ejected_until.is_none_or(|t| t <= now) {
            state.ejections += 1;
            let time = od.base_ejection_time.saturating_mul(state.ejections).min(od.max_ejection_time);
            state.ejected_until = Some(now + time);
            state.consecutive_5xx = 0;
            state.consecutive_gateway_failures = 0;
            stats.outlier_detection_ejections_total.fetch_add(1, Relaxed);
            tracing::debug!(%endpoint, ?time, "outlier detection: endpoint ejected");
        }
    }
}

/// How many different endpoints `hosts` holds (a weighted endpoint appears once per slot).
pub fn distinct(hosts: &[SocketAddr]) -> usize {
    hosts.iter().enumerate().filter(|(i, h)| !hosts[..*i].contains(h)).count()
}

fn enforced(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && (random() % 100) < percent as usize)
}
