//! Choosing a cluster's endpoint: the downstream connection's original destination (ORIGINAL_DST clusters),
//! or the load balancer's choice among the endpoints outlier detection has not ejected, by priority level and
//! (with `locality_weighted_lb_config`) locality as Envoy chooses them.

use std::net::SocketAddr;

use super::super::snapshot::ClusterRef;
use crate::random::random;
use super::lb;
use super::runtime::{distinct, ClusterRuntime};
use super::runtime;
use crate::config::cluster::{Discovery, Locality};

/// Envoy's overprovisioning factor: a level at 1/1.4 of its hosts available still takes all its traffic.
const OVERPROVISIONING: f64 = 1.4;

/// The priority level this request goes to, by Envoy's priority load: each level takes traffic in
/// proportion to its (overprovisioned) availability, lower levels first; `None` when there are no endpoints.
/// With no available endpoint in any level, level 0 in panic mode.
fn priority_level(c: &ClusterRef<'_>, runtime: &ClusterRuntime, passes: impl Fn(SocketAddr) -> bool) -> Option<(usize, bool)> {
    let levels = &c.endpoints.priorities;
    if levels.len() <= 1 {
        return (!levels.is_empty()).then_some((0, false));
    }
    // Availability counts hosts, not their weighted slots.
    let health: Vec<f64> = levels.iter().map(|all| availability(distinct(&runtime.healthy(all, &passes)), distinct(all)) * 100.0).collect();
    let total: f64 = health.iter().sum::<f64>().min(100.0);
    if total <= 0.0 {
        return Some((0, true));
    }
    let mut point = (random() % 10_000) as f64 / 100.0;
    let mut remaining = 100.0;
    for (i, h) in health.iter().enumerate() {
        let load = (h * 100.0 / total).min(remaining);
        remaining -= load;
        if point < load {
            return Some((i, false));
        }
        point -= load;
    }
    Some((0, false))
}

/// Envoy's overprovisioned availability of `healthy` hosts out of `total`, from 0 to 1.
fn availability(healthy: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        (OVERPROVISIONING * healthy as f64 / total as f64).min(1.0)
    }
}

/// The endpoints this request may go to: the chosen priority level's available ones (all of them in panic
/// mode); with `locality_weighted_lb_config`, only those of one of its localities.
fn candidates(c: &ClusterRef<'_>, runtime: &ClusterRuntime) -> Vec<SocketAddr> {
    // Endpoints failing the active health check are unavailable like ejected ones (panic mode uses all).
    let passes = |e: SocketAddr| c.state.health.allows(e);
    let Some((level, total_panic)) = priority_level(c, runtime, passes) else { return Vec::new() };
    let all = &c.endpoints.priorities[level];
    if total_panic {
        return all.clone();
    }
    let healthy = runtime.healthy(all, passes);
    if runtime::in_panic(&healthy, all, c.config.healthy_panic_threshold) {
        return all.clone();
    }
    if c.config.locality_weighted {
        if let Some(hosts) = c.endpoints.localities.get(level).and_then(|l| locality(l, runtime, passes)) {
            return healthy.into_iter().filter(|e| hosts.contains(e)).collect();
        }
    }
    healthy
}

/// Envoy's locality choice within a level: each locality weighs its `load_balancing_weight` times its
/// overprovisioned availability (a locality without a weight or without an available endpoint takes
/// nothing); `None` when every locality weighs nothing, and then the whole level is used.
fn locality<'a>(localities: &'a [Locality], runtime: &ClusterRuntime, passes: impl Fn(SocketAddr) -> bool) -> Option<&'a [SocketAddr]> {
    let weights: Vec<f64> =
        localities.iter().map(|l| f64::from(l.weight) * availability(runtime.healthy(&l.hosts, &passes).len(), l.total)).collect();
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let mut point = random() as f64 / usize::MAX as f64 * total;
    for (l, w) in localities.iter().zip(&weights) {
        if point < *w {
            return Some(&l.hosts);
        }
        point -= w;
    }
    localities.iter().zip(&weights).rev().find(|(_, w)| **w > 0.0).map(|(l, _)| l.hosts.as_slice())
}

/// Why no upstream could be chosen; the HTTP layer turns it into Envoy's local replies.
#[derive(Debug)]
pub enum PickError {
    NoHealthyUpstream,
}

/// An endpoint of `c`, other than those in `avoid` where possible (a retry's `previous_hosts` predicate);
/// `hash` is the request's hash for RING_HASH and MAGLEV.
pub fn pick(c: &ClusterRef<'_>, runtime: &ClusterRuntime, original_dst: SocketAddr, avoid: &[SocketAddr], hash: Option<u64>) -> Result<SocketAddr, PickError> {
    if c.config.discovery == Discovery::OriginalDst {
        return Ok(original_dst);
    }
    runtime.sweep(c.config.outlier_detection.as_ref(), c.endpoints.hosts().len(), c.state);
    let available = candidates(c, runtime);
    if available.is_empty() {
        return Err(PickError::NoHealthyUpstream);
    }
    let fresh: Vec<SocketAddr> = available.iter().copied().filter(|e| !avoid.contains(e)).collect();
    let candidates = if fresh.is_empty() { &available } else { &fresh };
    Ok(lb::choose(c, runtime, candidates, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::store::Resource;
    use crate::config::tree::Obj;
    use crate::proxy::snapshot::Snapshot;
    use crate::proxy::upstream::runtime;
    use serde_json::json;
    use std::sync::Arc;

    fn endpoint(port: u16, priority: u64, weight: u64) -> serde_json::Value {
        json!({"priority": priority, "locality": {"zone": "z"}, "lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}, "load_balancing_weight": weight}]})
    }

    fn snapshot(endpoints: Vec<serde_json::Value>) -> Snapshot {
        let v = json!({"name": "c", "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 100},
            "load_assignment": {"endpoints": endpoints}});
        let cluster = crate::config::cluster::translate(Obj::new(&v, "c").unwrap()).unwrap();
        Snapshot { clusters: Arc::new([Resource::fixed("c", cluster)].into_iter().collect()), ..Snapshot::default() }
    }

    fn share(s: &Snapshot, runtime: &ClusterRuntime, port: u16) -> f64 {
        let c = s.cluster("c").unwrap();
        let hits = (0..4000).filter(|_| pick(&c, runtime, "127.0.0.1:1".parse().unwrap(), &[], None).unwrap().port() == port).count();
        hits as f64 / 4000.0
    }

    #[test]
    fn weights_and_priority_failover_follow_envoy() {
        let s = snapshot(vec![endpoint(1001, 0, 3), endpoint(1002, 0, 1), endpoint(1003, 1, 1)]);
        let runtime = ClusterRuntime::default();
        assert!((0.7..0.8).contains(&share(&s, &runtime, 1001)), "weight 3 of 4");
        assert_eq!(share(&s, &runtime, 1003), 0.0, "priority 1 idle while priority 0 is healthy");
        // Eject one of the two hosts of priority 0: it is 50% available, 70% with overprovisioning.
        let c = s.cluster("c").unwrap();
        let od = c.config.outlier_detection;
        runtime.record("127.0.0.1:1001".parse().unwrap(), runtime::Result::Status(503), od.as_ref(), 3, c.state);
        let p1 = share(&s, &runtime, 1003);
        assert!((0.25..0.35).contains(&p1), "priority 1 takes the 30% priority 0 cannot: {p1}");
        runtime.record("127.0.0.1:1002".parse().unwrap(), runtime::Result::LocalFailure, od.as_ref(), 3, c.state);
        assert_eq!(share(&s, &runtime, 1003), 1.0, "everything fails over to priority 1");
    }

    fn locality(zone: &str, weight: Option<u64>, ports: &[u16]) -> serde_json::Value {
        let hosts: Vec<serde_json::Value> = ports.iter().map(|p| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}})).collect();
        let mut l = json!({"locality": {"zone": zone}, "lb_endpoints": hosts});
        if let Some(w) = weight {
            l["load_balancing_weight"] = json!(w);
        }
        l
    }

    fn weighted(localities: Vec<serde_json::Value>) -> Snapshot {
        let v = json!({"name": "c", "common_lb_config": {"locality_weighted_lb_config": {}},
            "outlier_detection": {"consecutive_5xx": 1, "max_ejection_percent": 100},
            "load_assignment": {"endpoints": localities}});
        let cluster = crate::config::cluster::translate(Obj::new(&v, "c").unwrap()).unwrap();
        Snapshot { clusters: Arc::new([Resource::fixed("c", cluster)].into_iter().collect()), ..Snapshot::default() }
    }

    #[test]
    fn localities_share_traffic_by_weight_and_availability() {
        let s = weighted(vec![locality("a", Some(3), &[1001]), locality("b", Some(1), &[1002, 1003]), locality("c", None, &[1004])]);
        let runtime = ClusterRuntime::default();
        let a = share(&s, &runtime, 1001);
        assert!((0.72..0.78).contains(&a), "weight 3 of 4: {a}");
        assert_eq!(share(&s, &runtime, 1004), 0.0, "a locality without a weight takes nothing");
        // One of locality b's two hosts ejected: 50% available, 70% overprovisioned; 3 : 0.7.
        let c = s.cluster("c").unwrap();
        runtime.record("127.0.0.1:1002".parse().unwrap(), runtime::Result::Status(503), c.config.outlier_detection.as_ref(), 4, c.state);
        let b = share(&s, &runtime, 1003);
        assert!((0.16..0.22).contains(&b), "0.7 of 3.7: {b}");
        assert_eq!(share(&s, &runtime, 1002), 0.0);
    }

    #[test]
    fn without_any_locality_weight_the_whole_level_is_used() {
        let s = weighted(vec![locality("a", None, &[1001]), locality("b", None, &[1002])]);
        let runtime = ClusterRuntime::default();
        let a = share(&s, &runtime, 1001);
        assert!((0.45..0.55).contains(&a), "{a}");
    }
}
