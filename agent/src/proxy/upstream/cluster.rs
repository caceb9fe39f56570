//! Choosing a cluster's endpoint: the downstream connection's original destination (ORIGINAL_DST clusters),
//! or the load balancer's choice among the endpoints outlier detection has not ejected.

use std::net::SocketAddr;

use super::super::snapshot::ClusterRef;
use super::lb;
use super::runtime::ClusterRuntime;
use crate::config::cluster::Discovery;

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
    let available = runtime.available(c.endpoints, c.config.healthy_panic_threshold);
    if available.is_empty() {
        return Err(PickError::NoHealthyUpstream);
    }
    let fresh: Vec<SocketAddr> = available.iter().copied().filter(|e| !avoid.contains(e)).collect();
    let candidates = if fresh.is_empty() { &available } else { &fresh };
    Ok(lb::choose(c, runtime, candidates, hash))
}
