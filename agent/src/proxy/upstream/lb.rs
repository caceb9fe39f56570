//! Load balancers over a cluster's available endpoints, as Envoy's: round robin, random, least request
//! (power of `choice_count` choices), ring hash (ketama over xxHash64 of `address_i`) and Maglev (a 65537-entry
//! lookup table from xxHash64 permutations), so a request with the same hash key reaches the same endpoint
//! as under Envoy.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use xxhash_rust::xxh64::xxh64;

use crate::random::random;
use super::super::snapshot::ClusterRef;
use super::runtime::ClusterRuntime;
use crate::config::cluster::LbPolicy;

/// Picks from `available` (non-empty) for a request whose hash policy produced `hash`.
pub fn choose(c: &ClusterRef<'_>, runtime: &ClusterRuntime, available: &[SocketAddr], hash: Option<u64>) -> SocketAddr {
    let n = available.len();
    match (&c.config.lb_policy, hash) {
        (LbPolicy::RingHash { min_ring_size, max_ring_size }, Some(h)) => {
            let ring = c.state.ring(available, || ring(available, *min_ring_size, *max_ring_size));
            ring_lookup(&ring, h).map_or(available[0], |i| available[i])
        }
        (LbPolicy::Maglev { table_size }, Some(h)) => {
            let table = c.state.ring(available, || maglev(available, *table_size));
            table.get((h % table.len().max(1) as u64) as usize).map_or(available[0], |(_, i)| available[*i])
        }
        (LbPolicy::LeastRequest { choice_count }, _) => {
            let mut best = available[random() % n];
            for _ in 1..*choice_count {
                let candidate = available[random() % n];
                if runtime.active(candidate) < runtime.active(best) {
                    best = candidate;
                }
            }
            best
        }
        (LbPolicy::Random | LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }, _) => available[random() % n],
        (LbPolicy::RoundRobin | LbPolicy::ClusterProvided, _) => available[c.cursor.fetch_add(1, Relaxed) % n],
    }
}

/// Envoy's ring: each distinct host gets hashes of `"<address>_<i>"` in proportion to its weight (how often
/// it appears in `hosts`), the least-weighted host at least `min_ring_size` times its share; sorted by hash.
fn ring(hosts: &[SocketAddr], min_ring_size: u64, max_ring_size: u64) -> Vec<(u64, usize)> {
    let mut weights: Vec<(usize, f64)> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        match weights.iter_mut().find(|(first, _)| hosts[*first] == *h) {
            Some((_, w)) => *w += 1.0,
            None => weights.push((i, 1.0)),
        }
    }
    let total = hosts.len() as f64;
    let min_weight = weights.iter().map(|(_, w)| w / total).fold(1.0, f64::min);
    let scale = ((min_weight * min_ring_size as f64).ceil() / min_weight).min(max_ring_size as f64);
    let mut entries = Vec::with_capacity(scale.ceil() as usize);
    let (mut current, mut target) = (0.0, 0.0);
    for (index, weight) in weights {
        target += scale * weight / total;
        let host = hosts[index];
        let mut i = 0u64;
        while current < target {
            entries.push((xxh64(format!("{host}_{i}").as_bytes(), 0), index));
            i += 1;
            current += 1.0;
        }
    }
    entries.sort_by_key(|e| e.0);
    entries
}

/// ketama's lookup, as Envoy ports it: the first entry whose hash is at least `h`, wrapping to the start.
fn ring_lookup(ring: &[(u64, usize)], h: u64) -> Option<usize> {
    let (mut low, mut high) = (0i64, ring.len() as i64);
    loop {
        let mid = (low + high) / 2;
        if mid as usize == ring.len() {
            return ring.first().map(|e| e.1);
        }
        let value = ring[mid as usize].0;
        let before = if mid == 0 { 0 } else { ring[mid as usize - 1].0 };
        if h <= value && h > before {
            return Some(ring[mid as usize].1);
        }
        if value < h {
            low = mid + 1;
        } else {
            high = mid - 1;
        }
        if low > high {
            return ring.first().map(|e| e.1);
        }
    }
}

/// Envoy's weighted Maglev table. Each distinct host (weighted by how often it appears in `hosts`) takes
/// its next free slot of its own permutation in turn; a host of the largest weight takes one every round,
/// one of a third of it every third round, as Envoy's table builder compares `round × weight` with a
/// target that grows by the largest weight per slot taken.
fn maglev(hosts: &[SocketAddr], size: u64) -> Vec<(u64, usize)> {
    struct Entry {
        index: usize,
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
    }
    let mut entries: Vec<Entry> = Vec::new();
    for (index, host) in hosts.iter().enumerate() {
        match entries.iter_mut().find(|e| hosts[e.index] == *host) {
            Some(e) => e.weight += 1.0,
            None => {
                let key = host.to_string();
                let (offset, skip) = (xxh64(key.as_bytes(), 0) % size, xxh64(key.as_bytes(), 1) % (size - 1) + 1);
                entries.push(Entry { index, offset, skip, weight: 1.0, target: 0.0, next: 0 });
            }
        }
    }
    let total = hosts.len() as f64;
    for e in &mut entries {
        e.weight = e.weight * 1.0 / total;
    }
    let max_weight = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
    let mut table: Vec<Option<usize>> = vec![None; size as usize];
    let mut filled = 0u64;
    let mut round = 1u32;
    while filled < size && !entries.is_empty() {
        for e in entries.iter_mut() {
            if filled == size {
                break;
            }
            if f64::from(round) * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            let mut slot = ((e.offset + e.next * e.skip) % size) as usize;
            while table[slot].is_some() {
                e.next += 1;
                slot = ((e.offset + e.next * e.skip) % size) as usize;
            }
            table[slot] = Some(e.index);
            e.next += 1;
            filled += 1;
        }
        round += 1;
    }
    table.into_iter().enumerate().map(|(slot, host)| (slot as u64, host.unwrap_or(0))).collect()
}

/// Envoy's combination of several hash policies' values.
pub fn combine(hash: Option<u64>, next: u64) -> u64 {
    match hash {
        None => next,
        Some(h) => h.rotate_left(1) ^ next,
    }
}

pub fn hash_str(s: &str) -> u64 {
    xxh64(s.as_bytes(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_lookup_wraps_and_finds_the_first_entry_at_or_above() {
        let ring = vec![(10, 0), (20, 1), (30, 2)];
        assert_eq!(ring_lookup(&ring, 5), Some(0));
        assert_eq!(ring_lookup(&ring, 10), Some(0));
        assert_eq!(ring_lookup(&ring, 11), Some(1));
        assert_eq!(ring_lookup(&ring, 30), Some(2));
        assert_eq!(ring_lookup(&ring, 31), Some(0));
    }

    #[test]
    fn maglev_table_is_full_and_balanced() {
        let hosts: Vec<SocketAddr> = (1..=3).map(|i| format!("127.0.0.1:2000{i}").parse().unwrap()).collect();
        let table = maglev(&hosts, 65537);
        let counts: Vec<usize> = (0..3).map(|i| table.iter().filter(|e| e.1 == i).count()).collect();
        assert!(counts.iter().all(|c| (21_000..23_000).contains(c)), "{counts:?}");
        assert_eq!(ring(&hosts, 1024, 8_388_608).len(), 1026, "ceil(1024/3)*3 entries");
        // Weight 3 against 1: three slots for every one.
        let weighted = [hosts[0], hosts[0], hosts[0], hosts[1]];
        let table = maglev(&weighted, 65537);
        let heavy = table.iter().filter(|e| e.1 == 0).count();
        let light = table.len() - heavy;
        assert!(heavy.abs_diff(3 * light) <= 4, "{heavy} slots against {light}");
    }
}
