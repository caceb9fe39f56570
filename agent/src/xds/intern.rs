//! Content-addressed sharing of xDS resources: identical bytes received on different streams (one per pod)
//! are decoded once and held once, so per-pod memory is proportional to what differs between pods.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Weak};

/// The live values of one content hash (collisions share a bucket).
type Bucket<T> = Vec<Weak<T>>;

/// Decoded resources of one type by content.
pub struct Interner<T> {
    buckets: Mutex<HashMap<u64, Bucket<T>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner { buckets: Mutex::default(), hasher: Default::default() }
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
            let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            let found = buckets.get(&key).into_iter().flatten().filter_map(Weak::upgrade).find(|v| same(v));
            if let Some(found) = found {
                return Ok(found);
            }
        }
        let shared = Arc::new(decode()?);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(key).or_default();
        bucket.retain(|v| v.strong_count() > 0);
        bucket.push(Arc::downgrade(&shared));
        Ok(shared)
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
}
