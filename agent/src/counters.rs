//! Counters named as Envoy names them (`http.inbound.rbac.allowed`), shared by every filter that names the
//! same one and kept across configuration updates, as Envoy's stats are. A leaf: the configuration model
//! creates them (so they exist at zero, as Envoy's do), the data path counts, the admin endpoints list them.
//! The process has one registry: the standalone proxy's admin lists it; in the node agent the names are
//! shared by all pods.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

static NAMED: Mutex<BTreeMap<String, Arc<AtomicU64>>> = Mutex::new(BTreeMap::new());

/// The counter called `name`, created at zero the first time.
pub fn counter(name: &str) -> Arc<AtomicU64> {
    let mut named = NAMED.lock().unwrap_or_else(|e| e.into_inner());
    Arc::clone(named.entry(name.to_string()).or_default())
}

/// Every named counter and its value, by name.
pub fn named_counters() -> Vec<(String, u64)> {
    let named = NAMED.lock().unwrap_or_else(|e| e.into_inner());
    named.iter().map(|(name, c)| (name.clone(), c.load(Relaxed))).collect()
}
