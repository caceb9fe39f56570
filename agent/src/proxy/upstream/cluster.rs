//! Choosing a cluster's endpoint: the downstream connection's original destination (ORIGINAL_DST clusters),
//! or the load balancer's choice among the endpoints outlier detection has not ejected.

use std::net::SocketAddr;

use super::super::snapshot::ClusterRef;
use super::super::random::random;
use super::lb;
use super::runtime::{distinct, ClusterRuntime};
use crate::config::cluster::Discovery;

/// Envoy's overprovisioning factor: a level at 1/1.4 of its hosts available still takes all its traffic.
const OVERPROVISIONING: f64 = 1.4;

/// The endpoints of the priority level this request goes to, by Envoy's priority load: each level takes
/// traffic in proportion to its (overprovisioned) availability, lower levels first; within the level,
/// the available endpoints (all of them in panic mode).
fn priority_level(c: &ClusterRef<'_>, runtime: &ClusterRuntime) -> Vec<SocketAddr> {
    let levels = &c.endpoints.priorities;
    // Endpoints failing the active health check are unavailable like ejected ones (panic mode uses all).
    let passes = |e: SocketAddr| c.state.health.allows(e);
    let threshold = c.config.healthy_panic_threshold;
    if levels.len() <= 1 {
        return levels.first().map(|l| runtime.available(l, threshold, passes)).unwrap_or_default();
    }
    let healthy: Vec<Vec<SocketAddr>> = levels.iter().map(|l| runtime.available(l, 0.0, passes)).collect();
    // Availability counts hosts, not their weighted slots.
    let health: Vec<f64> = levels
        .iter()
        .zip(&healthy)
        .map(|(all, ok)| if all.is_empty() { 0.0 } else { (OVERPROVISIONING * 100.0 * distinct(ok) as f64 / distinct(all) as f64).min(100.0) })
        .collect();
    let total: f64 = health.iter().sum::<f64>().min(100.0);
    if total <= 0.0 {
        // No level has an available endpoint: Envoy's panic mode on the first level.
        return levels.first().cloned().unwrap_or_default();
    }
    let mut point = (random() % 10_000) as f64 / 100.0;
    let mut remaining = 100.0;
    for (i, h) in health.iter().enumerate() {
        let load = (h * 100.0 / total).min(remaining);
        remaining -= load;
        if point < load {
            return runtime.available(&levels[i], threshold, passes);
        }
        point -= load;
    }
    runtime.available(&levels[0], threshold, passes)
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
    let available = priority_level(c, runtime);
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
}
