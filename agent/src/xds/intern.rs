//! Content-addressed sharing of xDS resources: identical bytes received on different streams (one per pod)
//! are decoded once and held once, so per-pod memory is proportional to what differs between pods.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Weak};

/// The live copies of one content hash (collisions share a bucket).
type Bucket<T> = Vec<(Weak<[u8]>, Weak<T>)>;

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
    /// The shared copy of `bytes` and its decoded value, decoding (with `decode`) only on first sight.
    pub fn get_or_decode<E>(&self, bytes: &[u8], decode: impl FnOnce() -> Result<T, E>) -> Result<(Arc<[u8]>, Arc<T>), E> {
        let key = self.hasher.hash_one(bytes);
        {
            let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(found) = buckets.get(&key).into_iter().flatten().find_map(|(b, v)| {
                let (b, v) = (b.upgrade()?, v.upgrade()?);
                (*b == *bytes).then_some((b, v))
            }) {
                return Ok(found);
            }
        }
        let shared: (Arc<[u8]>, Arc<T>) = (Arc::from(bytes), Arc::new(decode()?));
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(key).or_default();
        bucket.retain(|(b, _)| b.strong_count() > 0);
        bucket.push((Arc::downgrade(&shared.0), Arc::downgrade(&shared.1)));
        Ok(shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_decode_once_and_share() {
        let interner = Interner::<String>::default();
        let mut decodes = 0;
        let (b1, v1) = interner.get_or_decode(b"abc", || -> Result<_, ()> { decodes += 1; Ok("abc".to_string()) }).unwrap();
        let (b2, v2) = interner.get_or_decode(b"abc", || -> Result<_, ()> { decodes += 1; Ok("other".to_string()) }).unwrap();
        assert_eq!(decodes, 1);
        assert!(Arc::ptr_eq(&v1, &v2) && Arc::ptr_eq(&b1, &b2));
        drop((b1, v1, b2, v2));
        let (_, v3) = interner.get_or_decode(b"abc", || -> Result<_, ()> { Ok("again".to_string()) }).unwrap();
        assert_eq!(*v3, "again", "dropped entries are decoded anew");
    }
}
