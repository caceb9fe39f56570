//! Randomness for load balancing, weighted choices and sampled features: the standard library's randomly
//! keyed hasher, so no RNG crate is needed. A leaf.

/// A random number.
pub fn random() -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::Instant::now().elapsed().as_nanos());
    h.finish() as usize
}
