//! Per-pod, per-listener connection counters, updated lock-free on the data path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Woken whenever a connection of any listener closes: what a drain waits on.
pub static CONNECTION_CLOSED: tokio::sync::Notify = tokio::sync::Notify::const_new();

#[derive(Debug, Default)]
pub struct ListenerStats {
    accepted: AtomicU64,
    closed: AtomicU64,
    upstream_connect_failed: AtomicU64,
    refused_loop: AtomicU64,
    rejected: AtomicU64,
    bytes_from_downstream: AtomicU64,
    bytes_to_downstream: AtomicU64,
}

/// A point-in-time copy for the status endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ListenerSnapshot {
    pub accepted: u64,
    pub active: u64,
    pub upstream_connect_failed: u64,
    pub refused_loop: u64,
    /// Closed by the pod's configuration: no listener, no filter chain, no configuration yet.
    pub rejected: u64,
    pub bytes_from_downstream: u64,
    pub bytes_to_downstream: u64,
}

impl ListenerStats {
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub fn closed(&self, from_downstream: u64, to_downstream: u64) {
        self.bytes_from_downstream.fetch_add(from_downstream, Relaxed);
        self.bytes_to_downstream.fetch_add(to_downstream, Relaxed);
        self.closed.fetch_add(1, Relaxed);
        CONNECTION_CLOSED.notify_waiters();
    }

    pub fn upstream_connect_failed(&self) {
        self.upstream_connect_failed.fetch_add(1, Relaxed);
    }

    pub fn refused_loop(&self) {
        self.refused_loop.fetch_add(1, Relaxed);
    }

    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> ListenerSnapshot {
        let accepted = self.accepted.load(Relaxed);
        ListenerSnapshot {
            accepted,
            active: accepted.saturating_sub(self.closed.load(Relaxed)),
            upstream_connect_failed: self.upstream_connect_failed.load(Relaxed),
            refused_loop: self.refused_loop.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            bytes_from_downstream: self.bytes_from_downstream.load(Relaxed),
            bytes_to_downstream: self.bytes_to_downstream.load(Relaxed),
        }
    }
}
