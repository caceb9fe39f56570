//! The node agent's admin routes: liveness, readiness and a JSON status of captured pods.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::{AdminRequest, Reply, ReplyFuture, Routes};
use crate::node::{Node, PodStatus};

/// Shared state the agent's admin endpoint reports on.
pub struct Admin {
    pub node: Arc<Node>,
    /// Set once start-up adoption is done and the CNI socket serves.
    pub ready: AtomicBool,
}

#[derive(Serialize)]
struct Status<'a> {
    ready: bool,
    redirect: crate::capture::RedirectMode,
    capture: serde_json::Value,
    version: &'a str,
    pods: Vec<PodStatus>,
}

impl Routes for Admin {
    fn handle<'a>(&'a self, request: AdminRequest<'a>) -> ReplyFuture<'a> {
        Box::pin(async move {
            let ready = self.ready.load(Ordering::Acquire);
            match (request.method, request.path) {
                ("GET", "/healthz") => Reply::ok("text/plain", "ok\n"),
                ("GET", "/ready" | "/healthz/ready") if ready => Reply::ok("text/plain", "LIVE\n"),
                ("GET", "/ready" | "/healthz/ready") => Reply::status("503 Service Unavailable", "PRE_INITIALIZING\n"),
                ("GET", "/status") => Reply::json(&Status {
                    ready,
                    redirect: self.node.mode(),
                    capture: self.node.capture_status(),
                    version: env!("CARGO_PKG_VERSION"),
                    pods: self.node.status().await,
                }),
                ("GET", _) => Reply::status("404 Not Found", "paths: /healthz /ready /healthz/ready /status\n"),
                _ => Reply::status("405 Method Not Allowed", "GET only\n"),
            }
        })
    }
}
