//! Content-addressed sharing of xDS resources: identical bytes received on different streams (one per pod)
//! are decoded once and held once, so per-pod memory is proportional to what differs between pods.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Weak};

/// The live values of one content hash (collisions share a bucket).
type Bucket<T> = Vec<Weak<T>>;

/// Decoded resources of one type by content.
pub struct Interner<T> {
    buckets: Mutex<Buckets<T>>,
    hasher: std::collections::hash_map::RandomState,
}

/// The buckets, and how many there may be before the dead ones are swept.
struct Buckets<T> {
    map: HashMap<u64, Bucket<T>>,
    sweep_at: usize,
}

/// Buckets never swept below this many.
const MIN_SWEEP: usize = 64;

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner { buckets: Mutex::new(Buckets { map: HashMap::new(), sweep_at: MIN_SWEEP }), hasher: Default::default() }
    }
}

impl<T> Interner<T> {
    /// The shared value for content `bytes` (`same` confirms a candidate really is it), decoding (with
    /// `decode`) only on first sight.
    pub fn get_or_decode<E>(
        &self,
        bytes: &[u8],
        same: impl Fn(&T) -> bool,
        decode: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let key = self.hasher.hash_one(bytes);
        {
            let buckets = self.lock();
            let found = buckets.map.get(&key).into_iter().flatten().filter_map(Weak::upgrade).find(|v| same(v));
            if let Some(found) = found {
                return Ok(found);
            }
        }
        let shared = Arc::new(decode()?);
        let mut buckets = self.lock();
        let bucket = buckets.map.entry(key).or_default();
        bucket.retain(|v| v.strong_count() > 0);
        bucket.push(Arc::downgrade(&shared));
        // Content no stream holds any more leaves an entry behind (a `Weak` keeps its allocation): swept
        // whenever the map has doubled since the last sweep, so it stays within twice the live content.
        if buckets.map.len() >= buckets.sweep_at {
            buckets.map.retain(|_, bucket| {
                bucket.retain(|v| v.strong_count() > 0);
                !bucket.is_empty()
            });
            buckets.sweep_at = (buckets.map.len() * 2).max(MIN_SWEEP);
        }
        Ok(shared)
    }

    /// Distinct contents held (live or not yet swept).
    pub fn held(&self) -> usize {
        self.lock().map.values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets<T>> {
        self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_decodes_once_and_shares() {
        let interner = Interner::<String>::default();
        let mut decodes = 0;
        let same = |v: &String| v.starts_with('a');
        let v1 = interner.get_or_decode(b"abc", same, || -> Result<_, ()> { decodes += 1; Ok("abc".to_string()) }).unwrap();
        let v2 = interner.get_or_decode(b"abc", same, || -> Result<_, ()> { decodes += 1; Ok("other".to_string()) }).unwrap();
        assert_eq!(decodes, 1);
        assert!(Arc::ptr_eq(&v1, &v2));
        drop((v1, v2));
        let v3 = interner.get_or_decode(b"abc", same, || -> Result<_, ()> { Ok("again".to_string()) }).unwrap();
        assert_eq!(*v3, "again", "dropped values are decoded anew");
    }

    #[test]
    fn content_no_one_holds_is_released() {
        let interner = Interner::<u64>::default();
        let kept: Vec<Arc<u64>> = (0..10u64).map(|i| interner.get_or_decode(&i.to_le_bytes(), |_| true, || -> Result<_, ()> { Ok(i) }).unwrap()).collect();
        for i in 10..10_000u64 {
            drop(interner.get_or_decode(&i.to_le_bytes(), |_| true, || -> Result<_, ()> { Ok(i) }).unwrap());
        }
        assert!(interner.held() <= MIN_SWEEP, "{} entries held for 10 live values", interner.held());
        assert_eq!(kept.iter().map(|v| **v).sum::<u64>(), 45, "live values stay shared");
    }
}
