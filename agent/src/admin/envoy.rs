//! The standalone proxy's admin routes, on Envoy's paths and in Envoy's formats.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};
use tokio::sync::Notify;

use hyper::StatusCode;

use super::{AdminRequest, Reply, ReplyFuture, Routes};
use crate::proxy::server::Proxy;
use crate::xds::XdsState;

pub struct EnvoyAdmin {
    /// The bootstrap and the dynamic resources on top of it.
    pub xds: Arc<XdsState>,
    pub proxy: Arc<Proxy>,
    pub config_path: String,
    pub concurrency: usize,
    pub started: SystemTime,
    /// Notified by `/quitquitquit`.
    pub quit: Arc<Notify>,
}

const TYPE_PREFIX: &str = "type.googleapis.com/envoy.admin.v3.";

impl Routes for EnvoyAdmin {
    fn handle<'a>(&'a self, request: AdminRequest<'a>) -> ReplyFuture<'a> {
        Box::pin(async move {
            match (request.method, request.path) {
                ("GET", "/ready") => Reply::ok("text/plain", "LIVE\n"),
                ("GET", "/server_info") => Reply::json(&self.server_info()),
                ("GET", "/config_dump") => config_dump(&self.xds, self.started, &request),
                ("GET", "/clusters") => self.clusters(&request),
                ("GET", "/listeners") => Reply::ok("text/plain", self.listeners()),
                ("GET", "/stats") => self.stats(&request),
                ("GET", "/stats/prometheus") => Reply::ok("text/plain; version=0.0.4", self.prometheus(&self.counters())),
                (method, "/logging") => super::logging(method, &request),
                ("POST", "/quitquitquit") => {
                    self.quit.notify_one();
                    Reply::ok("text/plain", "OK\n")
                }
                (_, "/quitquitquit") => Reply::status(StatusCode::METHOD_NOT_ALLOWED, "This endpoint requires POST\n"),
                _ => Reply::status(
                    StatusCode::NOT_FOUND,
                    "paths: /ready /server_info /config_dump /clusters /listeners /stats /stats/prometheus /logging /quitquitquit\n",
                ),
            }
        })
    }
}

impl EnvoyAdmin {
    fn uptime(&self) -> String {
        format!("{}s", self.started.elapsed().map_or(0, |d| d.as_secs()))
    }

    fn server_info(&self) -> Value {
        let node = &self.xds.bootstrap().node;
        json!({
            "version": format!("weft/{}", env!("CARGO_PKG_VERSION")),
            "state": "LIVE",
            "hot_restart_version": "disabled",
            "command_line_options": {"config_path": self.config_path, "concurrency": self.concurrency},
            "node": {"id": node.id, "cluster": node.cluster, "metadata": node.metadata},
            "uptime_current_epoch": self.uptime(),
            "uptime_all_epochs": self.uptime(),
        })
    }

    /// `/clusters`: each cluster's circuit breakers and each host's requests in flight, health and priority,
    /// as Envoy's text lines or (`?format=json`) its `ClusterStatuses`; only what weft knows, nothing made up.
    fn clusters(&self, request: &AdminRequest<'_>) -> Reply {
        let snapshot = self.proxy.snapshot();
        let clusters: Vec<ClusterStatus> = snapshot.all_clusters().map(|c| self.cluster_status(&c)).collect();
        if request.param("format").as_deref() == Some("json") {
            return Reply::json(&json!({"cluster_statuses": clusters.iter().map(ClusterStatus::json).collect::<Vec<_>>()}));
        }
        Reply::ok("text/plain", clusters.iter().map(ClusterStatus::text).collect::<String>())
    }

    fn cluster_status(&self, c: &crate::proxy::snapshot::ClusterRef<'_>) -> ClusterStatus {
        let runtime = self.proxy.pools().runtime(&c.config.name);
        let hosts = c.endpoints.priorities.iter().enumerate().flat_map(|(priority, level)| level.iter().map(move |e| (priority, *e)));
        let mut seen = Vec::new();
        let hosts = hosts
            .filter(|(_, e)| {
                let new = !seen.contains(e);
                seen.push(*e);
                new
            })
            .map(|(priority, endpoint)| HostStatus {
                endpoint,
                priority,
                rq_active: runtime.active(endpoint),
                failed_active_hc: c.state.health.started.load(Relaxed) && !c.state.health.allows(endpoint),
                failed_outlier_check: runtime.is_ejected(endpoint),
            })
            .collect();
        ClusterStatus { name: c.config.name.clone(), breakers: c.config.circuit_breakers, hosts }
    }

    fn listeners(&self) -> String {
        self.proxy.listeners().iter().map(|l| format!("{}::{}\n", l.name, l.local)).collect()
    }

    /// `/stats` with Envoy's query: `filter` (a regex the name must contain a match of), `usedonly` (counters
    /// that moved), `format` (`json`, `prometheus`, else text).
    fn stats(&self, request: &AdminRequest<'_>) -> Reply {
        let mut counters = self.counters();
        if let Some(filter) = request.param("filter") {
            match regex::Regex::new(&filter) {
                Ok(re) => counters.retain(|(name, _, _)| re.is_match(name)),
                Err(e) => return Reply::status(StatusCode::BAD_REQUEST, format!("Invalid re2 regex: {e}\n")),
            }
        }
        if request.param("usedonly").is_some() {
            counters.retain(|(_, _, value)| *value > 0);
        }
        match request.param("format").as_deref() {
            Some("json") => Reply::json(&json!({"stats": counters.iter().map(|(name, _, value)| json!({"name": name, "value": value})).collect::<Vec<_>>()})),
            Some("prometheus") => Reply::ok("text/plain; version=0.0.4", self.prometheus(&counters)),
            None | Some("text") => Reply::ok("text/plain", counters.iter().map(|(name, _, v)| format!("{name}: {v}\n")).collect::<String>()),
            Some(other) => Reply::status(StatusCode::BAD_REQUEST, format!("usage: /stats?format=(json|prometheus|text), not {other}\n")),
        }
    }

    /// Every counter: its Envoy name, its Prometheus series, its value.
    fn counters(&self) -> Vec<(String, String, u64)> {
        let mut counters: Vec<(String, String, u64)> = Vec::new();
        for l in self.proxy.listeners() {
            let (addr, c) = (l.local, &l.counters);
            let tag = format!("{}_{}", addr.ip(), addr.port());
            counters.push((format!("listener.{tag}.downstream_cx_total"), format!("envoy_listener_downstream_cx_total{{envoy_listener_address=\"{tag}\"}}"), c.downstream_cx_total.load(Relaxed)));
            counters.push((format!("listener.{tag}.downstream_cx_destroy"), format!("envoy_listener_downstream_cx_destroy{{envoy_listener_address=\"{tag}\"}}"), c.downstream_cx_destroy.load(Relaxed)));
        }
        let snapshot = self.proxy.snapshot();
        for c in snapshot.all_clusters() {
            let (n, s) = (&c.config.name, c.state);
            for (stat, value) in [
                ("upstream_cx_total", &s.upstream_cx_total),
                ("upstream_cx_connect_fail", &s.upstream_cx_connect_fail),
                ("upstream_rq_total", &s.upstream_rq_total),
                ("upstream_rq_retry", &s.upstream_rq_retry),
            ] {
                counters.push((format!("cluster.{n}.{stat}"), format!("envoy_cluster_{stat}{{envoy_cluster_name=\"{n}\"}}"), value.load(Relaxed)));
            }
        }
        // Filter counters kept by name (RBAC's), without tag extraction.
        for (name, value) in crate::counters::named_counters() {
            let series = format!("envoy_{}", name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
            counters.push((name, series, value));
        }
        counters
    }

    /// The counters in Prometheus text, then Istio's standard metrics.
    fn prometheus(&self, counters: &[(String, String, u64)]) -> String {
        let mut out = String::new();
        let mut typed = std::collections::HashSet::new();
        for (_, series, v) in counters {
            let metric = series.split('{').next().unwrap_or(series);
            if typed.insert(metric.to_string()) {
                out.push_str(&format!("# TYPE {metric} counter\n"));
            }
            out.push_str(&format!("{series} {v}\n"));
        }
        out.push_str(&crate::proxy::istio_metrics::render(&[(Vec::new(), self.proxy.istio_metrics())]));
        out
    }
}

/// What `/clusters` shows of one cluster.
struct ClusterStatus {
    name: String,
    breakers: crate::config::cluster::CircuitBreakers,
    hosts: Vec<HostStatus>,
}

struct HostStatus {
    endpoint: std::net::SocketAddr,
    priority: usize,
    rq_active: u64,
    failed_active_hc: bool,
    failed_outlier_check: bool,
}

impl HostStatus {
    /// Envoy's `health_flags`: `healthy`, or each failure after a slash.
    fn health_flags(&self) -> String {
        let flags: String = [(self.failed_active_hc, "/failed_active_hc"), (self.failed_outlier_check, "/failed_outlier_check")].iter().filter(|(on, _)| *on).map(|(_, f)| *f).collect();
        if flags.is_empty() { "healthy".into() } else { flags }
    }
}

impl ClusterStatus {
    fn text(&self) -> String {
        let (n, b) = (&self.name, &self.breakers);
        let mut out = format!("{n}::observability_name::{n}\n");
        for (key, value) in [("max_connections", b.max_connections), ("max_pending_requests", b.max_pending_requests), ("max_requests", b.max_requests), ("max_retries", b.max_retries)] {
            out.push_str(&format!("{n}::default_priority::{key}::{value}\n"));
        }
        for h in &self.hosts {
            let e = h.endpoint;
            out.push_str(&format!("{n}::{e}::rq_active::{}\n{n}::{e}::health_flags::{}\n{n}::{e}::priority::{}\n", h.rq_active, h.health_flags(), h.priority));
        }
        out
    }

    fn json(&self) -> Value {
        let b = &self.breakers;
        let hosts: Vec<Value> = self
            .hosts
            .iter()
            .map(|h| {
                json!({
                    "address": {"socket_address": {"address": h.endpoint.ip().to_string(), "port_value": h.endpoint.port()}},
                    "stats": [{"name": "rq_active", "type": "GAUGE", "value": h.rq_active.to_string()}],
                    "health_status": {"failed_active_health_check": h.failed_active_hc, "failed_outlier_check": h.failed_outlier_check, "eds_health_status": "HEALTHY"},
                    "priority": h.priority,
                })
            })
            .collect();
        json!({
            "name": self.name,
            "observability_name": self.name,
            "circuit_breakers": {"thresholds": [{"max_connections": b.max_connections, "max_pending_requests": b.max_pending_requests, "max_requests": b.max_requests, "max_retries": b.max_retries}]},
            "host_statuses": hosts,
        })
    }
}

/// Envoy's `/config_dump` shape; `?resource=` selects one repeated field, `?mask=` keeps named fields.
pub fn config_dump(xds: &XdsState, started: SystemTime, request: &AdminRequest<'_>) -> Reply {
    let raw = &xds.bootstrap().raw;
    let updated = crate::civil_time::rfc3339(started);
    let statics = |key: &str, item: &str, type_name: &str| -> Vec<Value> {
        raw.pointer(&format!("/static_resources/{key}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|v| {
                let mut resource = v.clone();
                if let Some(obj) = resource.as_object_mut() {
                    obj.insert("@type".into(), json!(format!("type.googleapis.com/envoy.config.{type_name}")));
                }
                json!({ item: resource, "last_updated": updated })
            })
            .collect()
    };
    let store = xds.store.lock().unwrap_or_else(|e| e.into_inner());
    let typed = |bytes: &[u8], type_name: &str| {
        let type_url = format!("type.googleapis.com/envoy.config.{type_name}");
        let mut v = redact(crate::xds::codec::any_to_json(&type_url, bytes).unwrap_or_else(|e| json!({"error": e})));
        if let Some(obj) = v.as_object_mut() {
            obj.insert("@type".into(), json!(format!("type.googleapis.com/envoy.config.{type_name}")));
        }
        v
    };
    let dynamic_clusters: Vec<Value> = store
        .clusters
        .values()
        .map(|e| json!({"version_info": e.version, "cluster": typed(&e.bytes, "cluster.v3.Cluster"), "last_updated": crate::civil_time::rfc3339(e.last_updated)}))
        .collect();
    let dynamic_listeners: Vec<Value> = store
        .listeners
        .iter()
        .map(|(name, e)| json!({"name": name, "active_state": {"version_info": e.version, "listener": typed(&e.bytes, "listener.v3.Listener"), "last_updated": crate::civil_time::rfc3339(e.last_updated)}}))
        .collect();
    // SDS secrets as received, keys redacted as Envoy redacts them.
    let dynamic_secrets: Vec<Value> = store
        .secrets
        .iter()
        .map(|(name, e)| {
            let mut secret = redact(crate::xds::codec::any_to_json(crate::xds::SECRET_TYPE, &e.bytes).unwrap_or_else(|e| json!({"error": e})));
            if let Some(obj) = secret.as_object_mut() {
                obj.insert("@type".into(), json!(crate::xds::SECRET_TYPE));
            }
            json!({"name": name, "version_info": e.version, "last_updated": crate::civil_time::rfc3339(e.last_updated), "secret": secret})
        })
        .collect();
    let dynamic_routes: Vec<Value> = store
        .routes
        .values()
        .map(|e| json!({"version_info": e.version, "route_config": typed(&e.bytes, "route.v3.RouteConfiguration"), "last_updated": crate::civil_time::rfc3339(e.last_updated)}))
        .collect();
    // Envoy shows endpoints only when asked (`?include_eds`).
    let dynamic_endpoints: Option<Vec<Value>> = request.param("include_eds").is_some().then(|| {
        store
            .assignments
            .values()
            .map(|e| json!({"version_info": e.version, "endpoint_config": typed(&e.bytes, "endpoint.v3.ClusterLoadAssignment"), "last_updated": crate::civil_time::rfc3339(e.last_updated)}))
            .collect()
    });
    let version = |t: &str| store.versions.get(t).cloned().unwrap_or_default();
    let static_secrets: Vec<Value> = raw
        .pointer("/static_resources/secrets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|s| {
            let mut secret = redact(s.clone());
            if let Some(obj) = secret.as_object_mut() {
                obj.insert("@type".into(), json!("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"));
            }
            json!({"name": s.get("name").cloned().unwrap_or_default(), "secret": secret})
        })
        .collect();
    let configs = vec![
        json!({"@type": format!("{TYPE_PREFIX}BootstrapConfigDump"), "bootstrap": redact(raw.clone()), "last_updated": updated}),
        json!({"@type": format!("{TYPE_PREFIX}ClustersConfigDump"), "version_info": version(crate::xds::CLUSTER_TYPE),
               "static_clusters": statics("clusters", "cluster", "cluster.v3.Cluster"), "dynamic_active_clusters": dynamic_clusters}),
        json!({"@type": format!("{TYPE_PREFIX}ListenersConfigDump"), "version_info": version(crate::xds::LISTENER_TYPE),
               "static_listeners": statics("listeners", "listener", "listener.v3.Listener"), "dynamic_listeners": dynamic_listeners}),
        json!({"@type": format!("{TYPE_PREFIX}RoutesConfigDump"), "dynamic_route_configs": dynamic_routes}),
        json!({"@type": format!("{TYPE_PREFIX}SecretsConfigDump"), "static_secrets": static_secrets, "dynamic_active_secrets": dynamic_secrets}),
    ];
    let mut configs = configs;
    if let Some(endpoints) = dynamic_endpoints {
        configs.push(json!({"@type": format!("{TYPE_PREFIX}EndpointsConfigDump"), "dynamic_endpoint_configs": endpoints}));
    }
    drop(store);
    let mut configs = match request.param("resource").as_deref() {
        None | Some("") => configs,
        Some(field) => {
            // Each item becomes an Any of its own message type, as Envoy returns them.
            let items: Vec<Value> = configs
                .iter()
                .filter_map(|c| Some((c.get("@type")?.as_str()?, c.get(field)?.as_array()?)))
                .flat_map(|(dump, items)| items.iter().map(move |item| typed_item(dump, field, item)))
                .collect();
            if items.is_empty() {
                return Reply::status(StatusCode::NOT_FOUND, format!("{field} not found in config dump\n"));
            }
            items
        }
    };
    if let Some(mask) = request.param("mask").filter(|m| !m.is_empty()) {
        let keep: Vec<&str> = mask.split(',').collect();
        for c in &mut configs {
            if let Some(obj) = c.as_object_mut() {
                obj.retain(|k, _| keep.contains(&k.as_str()) || k == "@type");
            }
        }
    }
    Reply::json(&json!({ "configs": configs }))
}


/// An item of a config dump's repeated `field` as an Any (`SecretsConfigDump.StaticSecret`, ...).
fn typed_item(dump: &str, field: &str, item: &Value) -> Value {
    let message = match field {
        "static_clusters" => "StaticCluster",
        "dynamic_active_clusters" => "DynamicCluster",
        "static_listeners" => "StaticListener",
        "dynamic_listeners" => "DynamicListener",
        "static_secrets" => "StaticSecret",
        "dynamic_active_secrets" => "DynamicSecret",
        "dynamic_route_configs" => "DynamicRouteConfig",
        "dynamic_endpoint_configs" => "DynamicEndpointConfig",
        _ => return item.clone(),
    };
    let mut item = item.clone();
    if let Some(obj) = item.as_object_mut() {
        obj.insert("@type".into(), json!(format!("{dump}.{message}")));
    }
    item
}

/// Fields Envoy marks sensitive: every string under them is shown as `[redacted]`, as Envoy shows them.
const SENSITIVE: [&str; 3] = ["private_key", "privateKey", "password"];

/// Private keys never leave the process, not even through the admin endpoint.
fn redact(mut v: Value) -> Value {
    match &mut v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                *child = if SENSITIVE.contains(&k.as_str()) { redact_all(child.take()) } else { redact(child.take()) };
            }
        }
        Value::Array(items) => {
            for item in items.iter_mut() {
                *item = redact(item.take());
            }
        }
        _ => {}
    }
    v
}

fn redact_all(v: Value) -> Value {
    match v {
        Value::String(_) => json!("[redacted]"),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, c)| (k, redact_all(c))).collect()),
        Value::Array(items) => Value::Array(items.into_iter().map(redact_all).collect()),
        other => other,
    }
}

/// RFC 3339 UTC timestamp with seconds, for `last_updated`.
#[cfg(test)]
mod tests {
    use super::*;

    /// The admin of a proxy serving `cluster` (no listeners).
    fn admin(cluster: Value) -> EnvoyAdmin {
        let proxy = Proxy::new(std::time::Duration::from_secs(1));
        let cluster = crate::config::cluster::translate(crate::config::tree::Obj::new(&cluster, "c").unwrap()).unwrap();
        let clusters = std::sync::Arc::new([crate::config::store::Resource::fixed(&cluster.name.clone(), cluster)].into_iter().collect());
        proxy.apply(crate::proxy::snapshot::Snapshot { clusters, ..Default::default() });
        let bootstrap = crate::config::bootstrap::translate(json!({"node": {"id": "n"}})).unwrap();
        let xds = XdsState::new(bootstrap, crate::xds::Sink::Proxy(Arc::clone(&proxy)));
        EnvoyAdmin { xds, proxy, config_path: "b.yaml".into(), concurrency: 1, started: SystemTime::now(), quit: Arc::default() }
    }

    async fn get(admin: &EnvoyAdmin, path: &str) -> Reply {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        admin.handle(AdminRequest { method: "GET", path, query }).await
    }

    #[tokio::test]
    async fn clusters_show_their_circuit_breakers_and_hosts_as_text_and_json() {
        let admin = admin(json!({"name": "web", "connect_timeout": "1s",
            "circuit_breakers": {"thresholds": [{"max_connections": 7, "max_requests": 9}]},
            "load_assignment": {"endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}}}]},
                {"priority": 1, "lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.0.0.2", "port_value": 80}}}}]}]}}));
        let text = get(&admin, "/clusters").await.body;
        for line in ["web::default_priority::max_connections::7", "web::default_priority::max_requests::9", "web::default_priority::max_retries::3",
            "web::10.0.0.1:80::health_flags::healthy", "web::10.0.0.1:80::rq_active::0", "web::10.0.0.2:80::priority::1"] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        let json: Value = serde_json::from_str(&get(&admin, "/clusters?format=json").await.body).unwrap();
        let web = &json["cluster_statuses"][0];
        assert_eq!(web["circuit_breakers"]["thresholds"][0]["max_connections"], 7);
        assert_eq!(web["host_statuses"][1]["address"]["socket_address"]["address"], "10.0.0.2");
        assert_eq!(web["host_statuses"][1]["priority"], 1);
        assert_eq!(web["host_statuses"][0]["health_status"]["failed_outlier_check"], false);
    }

    #[tokio::test]
    async fn stats_take_envoys_filter_usedonly_and_format() {
        let admin = admin(json!({"name": "web", "connect_timeout": "1s"}));
        crate::counters::counter("http.admin_test.rbac.allowed").fetch_add(2, Relaxed);
        let _ = crate::counters::counter("http.admin_test.rbac.denied");
        let used = get(&admin, "/stats?filter=admin_test%5C.rbac&usedonly").await.body;
        assert_eq!(used, "http.admin_test.rbac.allowed: 2\n");
        let all = get(&admin, "/stats?filter=admin_test").await.body;
        assert!(all.contains("http.admin_test.rbac.denied: 0\n") && all.contains("allowed: 2"), "{all}");
        let json: Value = serde_json::from_str(&get(&admin, "/stats?format=json&filter=admin_test.rbac.allowed").await.body).unwrap();
        assert_eq!(json, json!({"stats": [{"name": "http.admin_test.rbac.allowed", "value": 2}]}));
        assert!(get(&admin, "/stats?format=prometheus&filter=admin_test").await.body.contains("envoy_http_admin_test_rbac_allowed 2"));
        assert_eq!(get(&admin, "/stats?filter=(").await.status, StatusCode::BAD_REQUEST);
        assert_eq!(get(&admin, "/stats?format=xml").await.status, StatusCode::BAD_REQUEST);
        assert!(get(&admin, "/stats").await.body.contains("cluster.web.upstream_rq_total: 0"));
    }

    #[test]
    fn timestamps_and_redaction() {
        assert_eq!(crate::civil_time::rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_316_517)), "2026-11-22T03:01:57Z");
        let v = redact(json!({"tls": [{"private_key": {"inline_string": "KEY"}, "certificate_chain": {"filename": "/c"}}]}));
        assert_eq!(v, json!({"tls": [{"private_key": {"inline_string": "[redacted]"}, "certificate_chain": {"filename": "/c"}}]}));
    }
}
