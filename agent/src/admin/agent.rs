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
    pub started: std::time::SystemTime,
}

#[derive(Serialize)]
struct Status<'a> {
    ready: bool,
    redirect: crate::capture::RedirectMode,
    capture: serde_json::Value,
    version: &'a str,
    pods: Vec<PodStatus>,
}

impl Admin {
    /// `/pods/<namespace>/<name>/config_dump`: the pod's configuration from the control plane, in Envoy's shape.
    async fn pod_config_dump(&self, request: &AdminRequest<'_>) -> Reply {
        let parts: Vec<&str> = request.path.trim_matches('/').split('/').collect();
        let [_, namespace, name, _] = parts.as_slice() else {
            return Reply::status("404 Not Found", "use /pods/<namespace>/<name>/config_dump\n");
        };
        match self.node.pod_xds(namespace, name).await {
            Some(xds) => super::envoy::config_dump(&xds, self.started, request),
            None => Reply::status("404 Not Found", format!("no xDS state for pod {namespace}/{name}\n")),
        }
    }
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
                (method, "/logging") => super::logging(method, &request),
                ("GET", path) if path.starts_with("/pods/") && path.ends_with("/config_dump") => self.pod_config_dump(&request).await,
                ("GET", _) => {
                    Reply::status("404 Not Found", "paths: /healthz /ready /healthz/ready /status /pods/<ns>/<name>/config_dump /logging\n")
                }
                _ => Reply::status("405 Method Not Allowed", "GET only\n"),
            }
        })
    }
}
