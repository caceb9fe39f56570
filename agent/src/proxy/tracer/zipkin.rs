//! Zipkin's JSON v2 span, as Envoy's Zipkin tracer reports it: ids in hex, times in microseconds, the local
//! endpoint named by the node's cluster (port 0, as Envoy's node address has none), non-empty tags as strings,
//! the end as a `cr` (client) or `ss` (server) annotation, `shared` on a server span that shares the client's
//! span id.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::propagation::{to_hex, SpanContext};

pub struct Span<'a> {
    pub context: &'a SpanContext,
    pub shared: bool,
    pub name: &'a str,
    pub client: bool,
    pub start: SystemTime,
    pub duration: Duration,
    /// The local endpoint's service name (`node.cluster`).
    pub service: &'a str,
    /// The address the request arrived at.
    pub local: Option<SocketAddr>,
}

impl Span<'_> {
    pub fn json(&self, tags: Vec<(String, String)>) -> Value {
        let micros = |d: Duration| d.as_micros() as u64;
        let mut endpoint = Map::new();
        endpoint.insert("serviceName".into(), json!(self.service));
        match self.local.map(|a| a.ip()) {
            Some(std::net::IpAddr::V4(ip)) => endpoint.insert("ipv4".into(), json!(ip.to_string())),
            Some(std::net::IpAddr::V6(ip)) => endpoint.insert("ipv6".into(), json!(ip.to_string())),
            None => None,
        };
        endpoint.insert("port".into(), json!(0));
        let mut span = Map::new();
        span.insert("traceId".into(), json!(self.context.trace_hex()));
        if let Some(parent) = self.context.parent_id {
            span.insert("parentId".into(), json!(to_hex(&parent)));
        }
        span.insert("id".into(), json!(to_hex(&self.context.span_id)));
        span.insert("kind".into(), json!(if self.client { "CLIENT" } else { "SERVER" }));
        span.insert("name".into(), json!(self.name));
        span.insert("timestamp".into(), json!(micros(self.start.duration_since(UNIX_EPOCH).unwrap_or_default())));
        span.insert("duration".into(), json!(micros(self.duration)));
        span.insert("localEndpoint".into(), Value::Object(endpoint));
        let end = micros(self.start.duration_since(UNIX_EPOCH).unwrap_or_default() + self.duration);
        span.insert("annotations".into(), json!([{"timestamp": end, "value": if self.client { "cr" } else { "ss" }}]));
        span.insert("tags".into(), Value::Object(tags.into_iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k, Value::String(v))).collect()));
        if self.shared {
            span.insert("shared".into(), json!(true));
        }
        Value::Object(span)
    }
}
