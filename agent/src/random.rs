//! Randomness for load balancing, weighted choices and sampled features: the standard library's randomly
//! keyed hasher, so no RNG crate is needed. A leaf.

/// A random number.
pub fn random() -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::Instant::now().elapsed().as_nanos());
    h.finish() as usize
}

/// The index of the item whose share of the summed `weights` holds `point` (taken modulo the sum): a
/// weighted choice when `point` is random. The last item when every weight is zero.
pub fn weighted(weights: impl Iterator<Item = u64> + Clone, point: u64) -> usize {
    let total: u64 = weights.clone().sum();
    let mut point = point % total.max(1);
    let mut last = 0;
    for (i, w) in weights.enumerate() {
        if point < w {
            return i;
        }
        point -= w;
        last = i;
    }
    last
}
