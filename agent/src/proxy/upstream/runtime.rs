//! What one pod (or the standalone proxy) keeps about each cluster while it runs, as its sidecar would:
//! requests and retries in flight (circuit breakers, least request), connections and waiting requests
//! (circuit breakers), and per-endpoint outlier detection as Envoy's detector does it: consecutive errors,
//! and success rate and failure percentage judged every `interval`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::random::random;

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
    /// The outlier detector's interval clock.
    sweeps: Mutex<Sweeps>,
}

/// Envoy's detector runs a sweep every `interval` from the cluster's creation; weft runs the sweeps that are
/// due (at the times they were due) whenever the cluster is used, which a client cannot tell apart.
#[derive(Debug, Default)]
struct Sweeps {
    started: Option<Instant>,
    done: u64,
}

#[derive(Debug, Default, Clone)]
struct EndpointState {
    active: u64,
    consecutive_5xx: u32,
    consecutive_gateway_failures: u32,
    /// When it was ejected, and for how long (it returns at the first sweep after that).
    ejected: Option<(Instant, Duration)>,
    /// Envoy's ejection time multiplier: grows with each ejection, shrinks by one per interval spent in service.
    backoff: u32,
    returned: Option<Instant>,
    /// Requests and successes since the last sweep (success-rate and failure-percentage detection).
    requests: u64,
    successes: u64,
}

/// Why an endpoint is being ejected: each kind has its own `enforcing_*` percentage.
#[derive(Debug, Clone, Copy)]
enum Detection {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    SuccessRate,
    FailurePercentage,
}

impl Detection {
    fn enforcing(self, od: &OutlierDetection) -> u32 {
        match self {
            Detection::Consecutive5xx => od.enforcing_consecutive_5xx,
            Detection::ConsecutiveGatewayFailure => od.enforcing_consecutive_gateway_failure,
            Detection::SuccessRate => od.success_rate.enforcing,
            Detection::FailurePercentage => od.failure_percentage.enforcing,
        }
    }
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

    /// Whether outlier detection has `endpoint` ejected now.
    pub fn is_ejected(&self, endpoint: SocketAddr) -> bool {
        self.endpoints().get(&endpoint).is_some_and(|e| e.ejected.is_some())
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
        let healthy = self.healthy(endpoints, passes);
        if in_panic(&healthy, endpoints, panic_threshold) {
            endpoints.to_vec()
        } else {
            healthy
        }
    }

    /// The endpoints that pass the health check and are not ejected.
    pub fn healthy(&self, endpoints: &[SocketAddr], passes: impl Fn(SocketAddr) -> bool) -> Vec<SocketAddr> {
        let states = self.endpoints();
        endpoints.iter().copied().filter(|e| passes(*e) && states.get(e).is_none_or(|s| s.ejected.is_none())).collect()
    }

    /// Runs the outlier detector's sweeps that are due: each returns the ejected endpoints whose time is up,
    /// the first also judges the success rates of the interval that ended (every later one had no requests),
    /// and each shortens the backoff of endpoints in service for a whole interval. `hosts`: the cluster's
    /// endpoint count. Without outlier detection nothing is ejected.
    pub fn sweep(&self, detection: Option<&OutlierDetection>, hosts: usize, stats: &ClusterState) {
        let mut sweeps = self.sweeps.lock().unwrap_or_else(|e| e.into_inner());
        let mut states = self.endpoints();
        let Some(od) = detection else {
            states.values_mut().for_each(|s| s.ejected = None);
            return;
        };
        let now = Instant::now();
        let started = *sweeps.started.get_or_insert(now);
        let interval = od.interval;
        let due = (now.duration_since(started).as_nanos() / interval.as_nanos().max(1)) as u64;
        let first = sweeps.done + 1;
        for k in first..=due {
            let tick = started + interval.saturating_mul(k.min(u64::from(u32::MAX)) as u32);
            return_due(&mut states, tick);
            if k == first {
                judge_interval(&mut states, od, hosts, tick, stats);
            }
            shorten_backoffs(&mut states, tick, interval);
            // Later sweeps have nothing left to do once no endpoint is ejected or backed off.
            if states.values().all(|s| s.ejected.is_none() && s.backoff == 0) {
                break;
            }
        }
        sweeps.done = sweeps.done.max(due);
    }

    /// Records an attempt's result: counts it for the interval's success rate, and ejects the endpoint when
    /// its consecutive errors reach a threshold (Envoy detects the run once, when the count equals it).
    pub fn record(&self, endpoint: SocketAddr, result: Result, detection: Option<&OutlierDetection>, hosts: usize, stats: &ClusterState) {
        let Some(od) = detection else { return };
        self.sweep(detection, hosts, stats);
        let code = match result {
            Result::Status(s) => s,
            Result::LocalFailure => 503,
        };
        let mut states = self.endpoints();
        let state = states.entry(endpoint).or_default();
        state.requests += 1;
        if code < 500 {
            state.successes += 1;
            state.consecutive_5xx = 0;
            state.consecutive_gateway_failures = 0;
            return;
        }
        let gateway = matches!(code, 502..=504);
        state.consecutive_gateway_failures = if gateway { state.consecutive_gateway_failures + 1 } else { 0 };
        state.consecutive_5xx += 1;
        let by_gateway = gateway && state.consecutive_gateway_failures == od.consecutive_gateway_failure;
        let by_5xx = state.consecutive_5xx == od.consecutive_5xx;
        let now = Instant::now();
        for (detected, kind) in [(by_gateway, Detection::ConsecutiveGatewayFailure), (by_5xx, Detection::Consecutive5xx)] {
            // An endpoint already ejected keeps its count; otherwise the run is spent whether or not it ejects.
            if !detected || states.get(&endpoint).is_some_and(|s| s.ejected.is_some()) {
                continue;
            }
            eject(&mut states, endpoint, kind, od, hosts, now, stats);
            if let Some(s) = states.get_mut(&endpoint) {
                match kind {
                    Detection::ConsecutiveGatewayFailure => s.consecutive_gateway_failures = 0,
                    _ => s.consecutive_5xx = 0,
                }
            }
        }
    }
}

/// Panic mode: fewer than `threshold` percent of the hosts are healthy (hosts, not their weighted slots).
pub fn in_panic(healthy: &[SocketAddr], all: &[SocketAddr], threshold: f64) -> bool {
    (distinct(healthy) as f64) * 100.0 < threshold * distinct(all) as f64
}

/// Ejects `endpoint` at `now` if `max_ejection_percent` leaves room and the detection's `enforcing_*`
/// percentage says so; its time is the base ejection time times its backoff, at most the max.
fn eject(states: &mut HashMap<SocketAddr, EndpointState>, endpoint: SocketAddr, kind: Detection, od: &OutlierDetection, hosts: usize, now: Instant, stats: &ClusterState) {
    let ejected = states.values().filter(|s| s.ejected.is_some()).count();
    let percent = 100.0 * (ejected + 1) as f64 / hosts.max(1) as f64;
    let room = percent <= f64::from(od.max_ejection_percent) || (od.always_eject_one_host && ejected == 0);
    if !room || !enforced(kind.enforcing(od)) {
        return;
    }
    let state = states.entry(endpoint).or_default();
    let base = od.base_ejection_time;
    if base.saturating_mul(state.backoff) < od.max_ejection_time.saturating_add(base) {
        state.backoff += 1;
    }
    let time = base.saturating_mul(state.backoff).min(od.max_ejection_time);
    state.ejected = Some((now, time));
    stats.outlier_detection_ejections_total.fetch_add(1, Relaxed);
    tracing::debug!(%endpoint, ?kind, ?time, "outlier detection: endpoint ejected");
}

/// Returns to service the endpoints whose ejection time has passed at the sweep at `tick`.
fn return_due(states: &mut HashMap<SocketAddr, EndpointState>, tick: Instant) {
    for s in states.values_mut() {
        if let Some((at, time)) = s.ejected {
            if tick.saturating_duration_since(at) >= time {
                s.ejected = None;
                s.consecutive_5xx = 0;
                s.consecutive_gateway_failures = 0;
                s.returned = Some(tick);
            }
        }
    }
}

/// The sweep's success-rate and failure-percentage detection over the requests since the last sweep, as
/// Envoy's detector does: only endpoints in service with enough requests count, and only when enough of
/// them do. The counts start again for the next interval.
fn judge_interval(states: &mut HashMap<SocketAddr, EndpointState>, od: &OutlierDetection, hosts: usize, tick: Instant, stats: &ClusterState) {
    let (sr, fp) = (od.success_rate, od.failure_percentage);
    let mut rates: Vec<(SocketAddr, f64, u64)> = Vec::new();
    for (endpoint, s) in states.iter_mut() {
        if s.ejected.is_none() && s.requests > 0 {
            rates.push((*endpoint, s.successes as f64 * 100.0 / s.requests as f64, s.requests));
        }
        s.requests = 0;
        s.successes = 0;
    }
    let hosts = hosts as u64;
    if hosts < sr.minimum_hosts && hosts < fp.minimum_hosts {
        return;
    }
    let by_rate: Vec<(SocketAddr, f64)> = rates.iter().filter(|r| r.2 >= sr.request_volume).map(|r| (r.0, r.1)).collect();
    if !by_rate.is_empty() && by_rate.len() as u64 >= sr.minimum_hosts {
        let threshold = success_rate_threshold(&by_rate.iter().map(|r| r.1).collect::<Vec<_>>(), sr.stdev_factor);
        for (endpoint, rate) in &by_rate {
            if *rate < threshold && states.get(endpoint).is_some_and(|s| s.ejected.is_none()) {
                eject(states, *endpoint, Detection::SuccessRate, od, hosts as usize, tick, stats);
            }
        }
    }
    let by_failures: Vec<(SocketAddr, f64)> = rates.iter().filter(|r| r.2 >= fp.request_volume).map(|r| (r.0, r.1)).collect();
    if !by_failures.is_empty() && by_failures.len() as u64 >= fp.minimum_hosts {
        for (endpoint, rate) in &by_failures {
            if 100.0 - rate >= fp.threshold as f64 && states.get(endpoint).is_some_and(|s| s.ejected.is_none()) {
                eject(states, *endpoint, Detection::FailurePercentage, od, hosts as usize, tick, stats);
            }
        }
    }
}

/// Envoy's success-rate ejection threshold: the mean minus `stdev_factor`/1000 population standard deviations.
fn success_rate_threshold(rates: &[f64], stdev_factor: u64) -> f64 {
    let n = rates.len().max(1) as f64;
    let mean = rates.iter().sum::<f64>() / n;
    let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    mean - stdev_factor as f64 / 1000.0 * variance.sqrt()
}

/// An endpoint in service for a whole interval since it last returned has its backoff shortened by one.
fn shorten_backoffs(states: &mut HashMap<SocketAddr, EndpointState>, tick: Instant, interval: Duration) {
    for s in states.values_mut() {
        if s.ejected.is_none() && s.backoff > 0 && s.returned.is_some_and(|r| tick.saturating_duration_since(r) >= interval) {
            s.backoff -= 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::{FailurePercentage, SuccessRate};

    fn detection() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 100,
            always_eject_one_host: false,
            interval: Duration::from_secs(10),
            success_rate: SuccessRate { minimum_hosts: 5, request_volume: 10, stdev_factor: 1900, enforcing: 100 },
            failure_percentage: FailurePercentage { threshold: 85, minimum_hosts: 5, request_volume: 10, enforcing: 0 },
        }
    }

    fn host(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1000 + i))
    }

    /// Endpoints 0..n with `successes[i]` of 100 requests each in the interval.
    fn interval(successes: &[u64]) -> HashMap<SocketAddr, EndpointState> {
        successes.iter().enumerate().map(|(i, s)| (host(i as u16), EndpointState { requests: 100, successes: *s, ..Default::default() })).collect()
    }

    fn ejected(states: &HashMap<SocketAddr, EndpointState>) -> Vec<u16> {
        let mut out: Vec<u16> = states.iter().filter(|(_, s)| s.ejected.is_some()).map(|(h, _)| h.port() - 1000).collect();
        out.sort();
        out
    }

    #[test]
    fn success_rate_threshold_is_envoys() {
        // Envoy's worked example: mean 90, stdev 20, threshold 90 - 1.9 × 20.
        assert!((success_rate_threshold(&[50.0, 100.0, 100.0, 100.0, 100.0], 1900) - 52.0).abs() < 1e-9);
    }

    #[test]
    fn the_sweep_ejects_success_rate_outliers_with_enough_hosts_and_volume() {
        let stats = ClusterState::default();
        let od = detection();
        let mut states = interval(&[40, 100, 100, 100, 100]);
        judge_interval(&mut states, &od, 5, Instant::now(), &stats);
        assert_eq!(ejected(&states), vec![0]);
        assert!(states.values().all(|s| s.requests == 0), "the next interval counts afresh");
        // Four hosts are fewer than success_rate_minimum_hosts.
        let mut states = interval(&[0, 100, 100, 100]);
        judge_interval(&mut states, &od, 4, Instant::now(), &stats);
        assert_eq!(ejected(&states), Vec::<u16>::new());
        // Too few requests: the host is not judged.
        let mut states = interval(&[40, 100, 100, 100, 100]);
        states.entry(host(0)).or_default().requests = 9;
        judge_interval(&mut states, &od, 5, Instant::now(), &stats);
        assert_eq!(ejected(&states), Vec::<u16>::new());
    }

    #[test]
    fn failure_percentage_ejects_only_when_enforced_and_within_max_ejection_percent() {
        let stats = ClusterState::default();
        let mut od = detection();
        od.success_rate.enforcing = 0;
        let mut states = interval(&[10, 10, 100, 100, 100]);
        judge_interval(&mut states, &od, 5, Instant::now(), &stats);
        assert_eq!(ejected(&states), Vec::<u16>::new(), "enforcing_failure_percentage defaults to 0");
        od.failure_percentage.enforcing = 100;
        od.max_ejection_percent = 20;
        let mut states = interval(&[10, 10, 100, 100, 100]);
        judge_interval(&mut states, &od, 5, Instant::now(), &stats);
        assert_eq!(ejected(&states).len(), 1, "a second ejection would be 40% of the hosts");
    }

    #[test]
    fn consecutive_errors_eject_once_per_run_and_respect_max_ejection_percent() {
        let stats = ClusterState::default();
        let runtime = ClusterRuntime::default();
        let mut od = detection();
        od.max_ejection_percent = 10;
        let hosts = [host(0), host(1)];
        for _ in 0..6 {
            runtime.record(host(0), Result::Status(500), Some(&od), 2, &stats);
        }
        assert_eq!(runtime.healthy(&hosts, |_| true), hosts.to_vec(), "one of two hosts is 50% > max_ejection_percent 10");
        od.always_eject_one_host = true;
        for _ in 0..3 {
            runtime.record(host(0), Result::LocalFailure, Some(&od), 2, &stats);
        }
        assert_eq!(runtime.healthy(&hosts, |_| true), vec![host(1)]);
        assert_eq!(stats.outlier_detection_ejections_total.load(Relaxed), 1);
    }

    #[test]
    fn ejected_hosts_return_at_the_first_sweep_after_their_time_with_a_growing_backoff() {
        let stats = ClusterState::default();
        let od = detection();
        let start = Instant::now();
        let mut states: HashMap<SocketAddr, EndpointState> = HashMap::new();
        eject(&mut states, host(0), Detection::Consecutive5xx, &od, 1, start, &stats);
        return_due(&mut states, start + Duration::from_secs(29));
        assert_eq!(ejected(&states), vec![0]);
        return_due(&mut states, start + Duration::from_secs(30));
        assert_eq!(ejected(&states), Vec::<u16>::new());
        let again = start + Duration::from_secs(31);
        eject(&mut states, host(0), Detection::Consecutive5xx, &od, 1, again, &stats);
        return_due(&mut states, again + Duration::from_secs(59));
        assert_eq!(ejected(&states), vec![0], "the second ejection lasts twice the base time");
        return_due(&mut states, again + Duration::from_secs(60));
        shorten_backoffs(&mut states, again + Duration::from_secs(70), od.interval);
        assert_eq!(states[&host(0)].backoff, 1, "an interval in service shortens the backoff");
    }

    #[test]
    fn sweeps_run_when_due_and_judge_the_interval_that_ended() {
        let stats = ClusterState::default();
        let runtime = ClusterRuntime::default();
        let mut od = detection();
        od.interval = Duration::from_millis(20);
        od.consecutive_5xx = 1000;
        let hosts: Vec<SocketAddr> = (0..5).map(host).collect();
        for h in &hosts {
            for _ in 0..10 {
                let status = if *h == host(0) { 503 } else { 200 };
                runtime.record(*h, Result::Status(status), Some(&od), 5, &stats);
            }
        }
        assert_eq!(runtime.healthy(&hosts, |_| true).len(), 5, "judged only when the interval ends");
        std::thread::sleep(Duration::from_millis(50));
        runtime.sweep(Some(&od), 5, &stats);
        assert_eq!(runtime.healthy(&hosts, |_| true), hosts[1..].to_vec());
    }
}
