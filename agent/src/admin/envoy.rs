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
                ("GET", "/clusters") => Reply::ok("text/plain", self.clusters()),
                ("GET", "/listeners") => Reply::ok("text/plain", self.listeners()),
                ("GET", "/stats") => Reply::ok("text/plain", self.stats(false)),
                ("GET", "/stats/prometheus") => Reply::ok("text/plain; version=0.0.4", self.stats(true)),
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

    fn clusters(&self) -> String {
        let mut out = String::new();
        let snapshot = self.proxy.snapshot();
        for c in snapshot.all_clusters() {
            let name = &c.config.name;
            out.push_str(&format!("{name}::observability_name::{name}\n"));
            out.push_str(&format!("{name}::default_priority::max_connections::1024\n"));
            for e in c.endpoints.hosts() {
                out.push_str(&format!("{name}::{e}::cx_total::{}\n", c.state.upstream_cx_total.load(Relaxed)));
                out.push_str(&format!("{name}::{e}::health_flags::healthy\n"));
            }
        }
        out
    }

    fn listeners(&self) -> String {
        self.proxy.listeners().iter().map(|l| format!("{}::{}\n", l.name, l.local)).collect()
    }

    fn stats(&self, prometheus: bool) -> String {
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
        if !prometheus {
            return counters.iter().map(|(name, _, v)| format!("{name}: {v}\n")).collect();
        }
        let mut out = String::new();
        let mut typed = std::collections::HashSet::new();
        for (_, series, v) in &counters {
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

/// Envoy's `/config_dump` shape; `?resource=` selects one repeated field, `?mask=` keeps named fields.
pub fn config_dump(xds: &XdsState, started: SystemTime, request: &AdminRequest<'_>) -> Reply {
    let raw = &xds.bootstrap().raw;
    let updated = humantime_rfc3339(started);
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
        .map(|e| json!({"version_info": e.version, "cluster": typed(&e.bytes, "cluster.v3.Cluster"), "last_updated": humantime_rfc3339(e.last_updated)}))
        .collect();
    let dynamic_listeners: Vec<Value> = store
        .listeners
        .iter()
        .map(|(name, e)| json!({"name": name, "active_state": {"version_info": e.version, "listener": typed(&e.bytes, "listener.v3.Listener"), "last_updated": humantime_rfc3339(e.last_updated)}}))
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
            json!({"name": name, "version_info": e.version, "last_updated": humantime_rfc3339(e.last_updated), "secret": secret})
        })
        .collect();
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
        json!({"@type": format!("{TYPE_PREFIX}SecretsConfigDump"), "static_secrets": static_secrets, "dynamic_active_secrets": dynamic_secrets}),
    ];
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
fn humantime_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_redaction() {
        assert_eq!(humantime_rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_316_517)), "2026-11-22T03:01:57Z");
        let v = redact(json!({"tls": [{"private_key": {"inline_string": "KEY"}, "certificate_chain": {"filename": "/c"}}]}));
        assert_eq!(v, json!({"tls": [{"private_key": {"inline_string": "[redacted]"}, "certificate_chain": {"filename": "/c"}}]}));
    }
}
