//! Choosing a cluster's endpoint: round robin, random, or the downstream connection's original destination
//! (ORIGINAL_DST clusters).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use crate::config::cluster::{Discovery, LbPolicy};
use super::super::snapshot::ClusterRef;

/// Why no upstream could be chosen; the HTTP layer turns it into Envoy's local replies.
#[derive(Debug)]
pub enum PickError {
    UnknownCluster,
    NoHealthyUpstream,
}

/// An endpoint of `c` other than those in `avoid` where possible (a retry's `previous_hosts` predicate).
pub fn pick(c: &ClusterRef<'_>, original_dst: SocketAddr, avoid: &[SocketAddr]) -> Result<SocketAddr, PickError> {
    let endpoints = c.endpoints;
    match &c.config.discovery {
        Discovery::OriginalDst => Ok(original_dst),
        _ if endpoints.is_empty() => Err(PickError::NoHealthyUpstream),
        _ => {
            let mut choice = endpoints[next(c) % endpoints.len()];
            for _ in 1..endpoints.len().min(4) {
                if !avoid.contains(&choice) {
                    break;
                }
                choice = endpoints[next(c) % endpoints.len()];
            }
            Ok(choice)
        }
    }
}

fn next(c: &ClusterRef<'_>) -> usize {
    match c.config.lb_policy {
        LbPolicy::Random => random(),
        _ => c.cursor.fetch_add(1, Relaxed),
    }
}

/// A random number from the standard library's randomly keyed hasher (no RNG crate for this).
pub fn random() -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::Instant::now().elapsed().as_nanos());
    h.finish() as usize
}
