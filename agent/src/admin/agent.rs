//! The node agent's admin routes: liveness, readiness, a JSON status of captured pods and their share of the
//! proxy as Prometheus metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

use hyper::StatusCode;

use super::{AdminRequest, Reply, ReplyFuture, Routes};
use crate::node::{Node, PodStatus};
use crate::proxy::pod_share::LoadSnapshot;

/// Shared state the agent's admin endpoint reports on.
pub struct Admin {
    pub node: Arc<Node>,
    /// Set once start-up adoption is done and the CNI socket serves.
    pub ready: AtomicBool,
    pub started: std::time::SystemTime,
    /// The pods' workload identities, when the agent has a CA.
    pub identity: Option<Arc<crate::identity::manager::IdentityManager>>,
}

#[derive(Serialize)]
struct Status<'a> {
    ready: bool,
    redirect: crate::capture::RedirectMode,
    capture: serde_json::Value,
    version: &'a str,
    pods: Vec<PodStatus>,
    /// Workload identities held: serial, expiry, last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    identities: Option<Vec<crate::identity::manager::IdentityStatus>>,
    /// The Kubernetes watch: node, synced, pods and namespaces held.
    #[serde(skip_serializing_if = "Option::is_none")]
    kube: Option<crate::k8s::KubeStatus>,
}

impl Admin {
    /// `/pods/<namespace>/<name>/config_dump`: the pod's configuration from the control plane, in Envoy's shape.
    async fn pod_config_dump(&self, request: &AdminRequest<'_>) -> Reply {
        let Some((namespace, name)) = pod_path(request) else {
            return Reply::status(StatusCode::NOT_FOUND, "use /pods/<namespace>/<name>/config_dump\n");
        };
        match self.node.pod_xds(namespace, name).await {
            Some(xds) => super::envoy::config_dump(&xds, self.started, request),
            None => Reply::status(StatusCode::NOT_FOUND, format!("no xDS state for pod {namespace}/{name}\n")),
        }
    }
}

impl Admin {
    /// `/pods/<namespace>/<name>/explain?to=HOST&port=P[&tcp][&method=M][&path=P][&header=K:V...]`: what
    /// would happen to that connection or request of the pod, from its live configuration (nothing is sent).
    async fn pod_explain(&self, request: &AdminRequest<'_>) -> Reply {
        let Some((namespace, name)) = pod_path(request) else {
            return Reply::status(StatusCode::NOT_FOUND, "use /pods/<namespace>/<name>/explain?to=HOST&port=PORT\n");
        };
        let question = match explain_question(request) {
            Ok(q) => q,
            Err(e) => return Reply::status(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let pods = self.node.pod_views().await;
        let label = format!("{namespace}/{name}");
        let Some(client) = pods.iter().find(|p| p.name == label) else {
            return Reply::status(StatusCode::NOT_FOUND, format!("pod {label} is not captured by this agent\n"));
        };
        let others: Vec<_> = pods.iter().filter(|p| p.name != label).cloned().collect();
        Reply::json(&crate::explain::outbound(client, &question, &others))
    }
}

/// The pod a `/pods/<namespace>/<name>/<view>` path names.
fn pod_path<'a>(request: &AdminRequest<'a>) -> Option<(&'a str, &'a str)> {
    match request.path.trim_matches('/').split('/').collect::<Vec<_>>()[..] {
        ["pods", namespace, name, _] => Some((namespace, name)),
        _ => None,
    }
}

/// The question of an explain request, from its query.
fn explain_question(request: &AdminRequest<'_>) -> Result<crate::explain::Question, String> {
    let to = request.param("to").filter(|t| !t.is_empty()).ok_or("to= is required: the destination's address or host")?;
    let port = request.param("port").ok_or("port= is required")?.parse::<u16>().map_err(|_| "port= must be a port number")?;
    let headers = form_urlencoded::parse(request.query.as_bytes())
        .filter(|(k, _)| k == "header")
        .map(|(_, v)| v.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).ok_or_else(|| format!("header={v}: write name:value")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::explain::Question {
        to,
        port,
        tcp: request.param("tcp").is_some(),
        method: request.param("method").unwrap_or_else(|| "GET".into()),
        path: request.param("path").unwrap_or_else(|| "/".into()),
        headers,
    })
}

impl Routes for Admin {
    fn handle<'a>(&'a self, request: AdminRequest<'a>) -> ReplyFuture<'a> {
        Box::pin(async move {
            let ready = self.ready.load(Ordering::Acquire);
            match (request.method, request.path) {
                ("GET", "/healthz") => Reply::ok("text/plain", "ok\n"),
                ("GET", "/ready" | "/healthz/ready") if ready => Reply::ok("text/plain", "LIVE\n"),
                ("GET", "/ready" | "/healthz/ready") => Reply::status(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n"),
                ("GET", "/status") => Reply::json(&Status {
                    ready,
                    redirect: self.node.mode(),
                    capture: self.node.capture_status(),
                    version: env!("CARGO_PKG_VERSION"),
                    pods: self.node.status().await,
                    identities: self.identity.as_ref().map(|m| m.status()),
                    kube: self.node.kube_status(),
                }),
                ("GET", "/stats/prometheus") => {
                    let pods = self.node.status().await;
                    let certificates = self.identity.as_ref().map(|m| m.status()).unwrap_or_default();
                    let scrape = crate::node_metrics::Scrape {
                        pods_captured: pods.len() as i64,
                        certificates: certificates.into_iter().filter_map(|c| Some((c.identity, c.not_after_unix? as i64))).collect(),
                        access_log_dropped: crate::proxy::access_log::DROPPED.load(Ordering::Relaxed),
                        ebpf_maps: self.node.capture_maps(),
                    };
                    let mut text = crate::node_metrics::render(&scrape);
                    text.push_str(&prometheus(&pods));
                    let pods = self.node.istio_metrics().await;
                    let sources: Vec<_> = pods.iter().map(|(pod, m)| (vec![("pod", pod.as_str())], &**m)).collect();
                    text.push_str(&crate::proxy::istio_metrics::render(&sources));
                    Reply::ok("text/plain; version=0.0.4", text)
                }
                (method, "/logging") => super::logging(method, &request),
                ("GET", path) if path.starts_with("/pods/") && path.ends_with("/config_dump") => self.pod_config_dump(&request).await,
                ("GET", path) if path.starts_with("/pods/") && path.ends_with("/explain") => self.pod_explain(&request).await,
                ("GET", _) => {
                    Reply::status(StatusCode::NOT_FOUND, "paths: /healthz /ready /healthz/ready /status /stats/prometheus /pods/<ns>/<name>/config_dump /pods/<ns>/<name>/explain /logging\n")
                }
                _ => Reply::status(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
            }
        })
    }
}

/// One metric of a pod's share of the proxy: name, type, help and its value.
pub(crate) type LoadMetric = (&'static str, &'static str, &'static str, fn(&LoadSnapshot) -> f64);

/// A pod's share of the proxy as metrics: on this endpoint labelled `pod="namespace/name"`, on each pod's
/// own status port (15020) as they are.
pub(crate) const LOAD_METRICS: &[LoadMetric] = &[
    ("weft_pod_connections", "gauge", "Downstream connections open.", |l| l.connections as f64),
    ("weft_pod_connections_total", "counter", "Downstream connections accepted.", |l| l.connections_total as f64),
    ("weft_pod_connections_refused_total", "counter", "Connections closed over max_connections.", |l| l.connections_refused as f64),
    ("weft_pod_requests", "gauge", "HTTP requests in flight.", |l| l.requests as f64),
    ("weft_pod_requests_total", "counter", "HTTP requests admitted.", |l| l.requests_total as f64),
    ("weft_pod_requests_refused_total", "counter", "Requests answered 503 over max_requests.", |l| l.requests_refused as f64),
    ("weft_pod_received_bytes_total", "counter", "Bytes read from downstream.", |l| l.bytes_in as f64),
    ("weft_pod_sent_bytes_total", "counter", "Bytes written to downstream.", |l| l.bytes_out as f64),
    ("weft_pod_cpu_seconds_total", "counter", "CPU time of the pod's worker threads.", |l| l.cpu_us as f64 / 1e6),
];

/// Each pod's share of the proxy, labelled `pod="namespace/name"`, and the node's connections counted by
/// the listeners (which the pods' connections add up to).
fn prometheus(pods: &[PodStatus]) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in LOAD_METRICS {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for p in pods {
            let pod = crate::proxy::istio_metrics::label_value(&format!("{}/{}", p.namespace, p.name));
            out.push_str(&format!("{name}{{pod=\"{pod}\"}} {}\n", value(&p.load)));
        }
    }
    let listened: u64 = pods.iter().map(|p| p.outbound.active + p.inbound.active).sum();
    out.push_str(&format!("# HELP weft_node_connections Connections open on every pod's listeners.\n# TYPE weft_node_connections gauge\nweft_node_connections {listened}\n"));
    out
}
