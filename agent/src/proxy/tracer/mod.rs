//! Tracing, as Envoy's connection manager does it with the OpenTelemetry tracer:
//! - `decide`: the trace decision (client, forced, random and overall sampling), packed into `x-request-id`;
//! - `decorate`: the route decorator's operation, told to the other side of the hop in
//!   `x-envoy-decorator-operation`;
//! - `start`: a span (a child of the request's `traceparent`, or a new trace), whose context the router
//!   injects upstream (`traceparent`, `tracestate`), even when it is not sampled;
//! - `ActiveSpan::finish`: Envoy's tags from the finished stream; sampled spans go to the exporter.

pub mod export;
pub mod otlp;
pub mod propagation;
pub mod zipkin;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::header::{HeaderMap, HeaderValue};

use super::stream_info::Entry;
use super::upstream::Upstream;
use crate::config::http_connection_manager::RequestId;
use crate::config::route::Decorator;
use crate::config::tracing::{Provider, TagValue, Tracing};
use propagation::{Incoming, SpanContext};


const DECORATOR: &str = "x-envoy-decorator-operation";
/// Where Envoy's UUID request id packs the trace reason (the UUID's version nibble).
const TRACE_BYTE: usize = 14;

/// Why a request is traced, as the UUID request id records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    NotTraceable,
    Sampling,
    ServiceForced,
    ClientForced,
}

impl Reason {
    fn packed(self) -> u8 {
        match self {
            Reason::NotTraceable => b'4',
            Reason::Sampling => b'9',
            Reason::ServiceForced => b'a',
            Reason::ClientForced => b'b',
        }
    }

    fn unpack(b: u8) -> Reason {
        match b {
            b'9' => Reason::Sampling,
            b'a' => Reason::ServiceForced,
            b'b' => Reason::ClientForced,
            _ => Reason::NotTraceable,
        }
    }
}

/// Envoy's trace decision for a request whose connection manager traces; `x-request-id` records it (and an
/// id that already records one keeps it). Random and overall sampling draw from the id, so every proxy on
/// the request's path decides alike. Returns whether the request is traced.
pub fn decide(tracing: &Tracing, rid: RequestId, headers: &mut HeaderMap) -> bool {
    if !rid.use_request_id_for_trace_sampling {
        return true;
    }
    let Some(mut id) = headers.get("x-request-id").map(|v| v.as_bytes().to_vec()) else { return false };
    let Some(drawn) = id.get(..8).and_then(|p| std::str::from_utf8(p).ok()).and_then(|p| u64::from_str_radix(p, 16).ok()) else { return false };
    let drawn = drawn % 10_000;
    let packs = rid.pack_trace_reason && id.len() == 36;
    let recorded = if packs { Reason::unpack(id[TRACE_BYTE]) } else { Reason::NotTraceable };
    let mut reason = recorded;
    if reason == Reason::NotTraceable {
        if headers.contains_key("x-client-trace-id") && (crate::random::random() as u64 % 100) < tracing.client_sampling {
            reason = Reason::ClientForced;
        } else if headers.contains_key("x-envoy-force-trace") {
            reason = Reason::ServiceForced;
        } else if drawn < tracing.random_sampling {
            reason = Reason::Sampling;
        }
    }
    if reason != Reason::NotTraceable && drawn >= tracing.overall_sampling {
        reason = Reason::NotTraceable;
    }
    if packs && reason != recorded {
        id[TRACE_BYTE] = reason.packed();
        if let Ok(v) = HeaderValue::from_bytes(&id) {
            headers.insert("x-request-id", v);
        }
    }
    reason != Reason::NotTraceable
}

/// What the route's decorator makes of a request: the span's name, and the operation an inbound response
/// tells the client.
#[derive(Debug, Default)]
pub struct Operation {
    pub name: Option<String>,
    respond_with: Option<HeaderValue>,
}

/// The route's `decorator`: outbound, its operation goes upstream (when it propagates); inbound, the
/// client's `x-envoy-decorator-operation` names the span instead, and never reaches the application.
pub fn decorate(egress: bool, decorator: Option<&Decorator>, headers: &mut HeaderMap) -> Operation {
    let operation = decorator.filter(|d| !d.operation.is_empty());
    let propagate = decorator.is_none_or(|d| d.propagate);
    let mut name = operation.map(|d| d.operation.clone());
    let mut decorated = operation.and_then(|d| HeaderValue::from_str(&d.operation).ok());
    if egress {
        if let Some(op) = decorated.filter(|_| propagate) {
            headers.insert(DECORATOR, op);
        }
        return Operation { name, respond_with: None };
    }
    if let Some(asked) = headers.remove(DECORATOR) {
        if !asked.is_empty() {
            name = Some(String::from_utf8_lossy(asked.as_bytes()).into_owned());
            decorated = None;
        }
    }
    Operation { name, respond_with: decorated.filter(|_| propagate) }
}

/// The response side of `decorate`: inbound, the route's operation goes back to the client; outbound, the
/// server's operation renames the span and goes no further.
pub fn decorate_response(egress: bool, operation: &Operation, headers: &mut HeaderMap, span: Option<&SpanSlot>) {
    if !egress {
        if let Some(op) = &operation.respond_with {
            headers.insert(DECORATOR, op.clone());
        }
        return;
    }
    if let Some(told) = headers.remove(DECORATOR) {
        if let (false, Some(slot)) = (told.is_empty(), span) {
            slot.rename(String::from_utf8_lossy(told.as_bytes()).into_owned());
        }
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    // The system's generator does not fail on Linux; were it to, the ids would be zero and the span ignored
    // by collectors, never a wrong trace.
    let _ = ring::rand::SystemRandom::new().fill(&mut out);
    out
}

/// A request's span while the request is served.
pub struct ActiveSpan {
    context: SpanContext,
    /// Zipkin: a server span under `shared_span_context` (which reports it as `shared`).
    shared: bool,
    /// The request's B3 came in the single `b3` header, and goes on in it.
    single_b3: bool,
    name: String,
    client: bool,
    tracing: Arc<Tracing>,
    provider: Arc<Provider>,
    upstream: Upstream,
}

/// Where a request's span is kept: the connection manager starts it, the router injects its context, and
/// the stream's end finishes it.
#[derive(Default)]
pub struct SpanSlot(Mutex<Option<ActiveSpan>>);

impl SpanSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ActiveSpan>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the request's span: a child of the client's (sampled as the client says, else as `traced`
    /// says), or the root of a new trace. Headers Envoy's tracer would refuse leave the request untraced and
    /// its headers untouched.
    pub fn start(&self, tracing: &Arc<Tracing>, (headers, authority): (&HeaderMap, &str), traced: bool, egress: bool, operation: &Operation, upstream: &Upstream) {
        let Some(provider) = &tracing.provider else { return };
        let (incoming, wide) = match &**provider {
            Provider::OpenTelemetry(_) => (propagation::w3c(headers), true),
            Provider::Zipkin(z) => (propagation::b3(headers), z.trace_id_128bit),
        };
        let shares = matches!(&**provider, Provider::Zipkin(z) if z.shared_span_context) && !egress;
        let single_b3 = matches!(&**provider, Provider::Zipkin(_)) && headers.contains_key("b3");
        let root = |sampled: bool| {
            let mut trace_id: [u8; 16] = random_bytes();
            if !wide {
                trace_id[..8].fill(0);
            }
            SpanContext { trace_id, wide, span_id: random_bytes(), parent_id: None, sampled, trace_state: String::new() }
        };
        let context = match incoming {
            Incoming::Refused => return,
            Incoming::Nothing => root(traced),
            Incoming::Sampled(sampled) => root(sampled),
            // Zipkin's shared span context: the server side reports the client's span (its id and parent).
            Incoming::Parent { context, sampled } if shares => SpanContext { sampled: sampled.unwrap_or(traced), ..context },
            Incoming::Parent { context, sampled } => SpanContext { span_id: random_bytes(), parent_id: Some(context.span_id), sampled: sampled.unwrap_or(traced), ..context },
        };
        let name = operation.name.clone().unwrap_or_else(|| match egress {
            true => format!("egress {authority}"),
            false => "ingress".to_string(),
        });
        *self.lock() = Some(ActiveSpan {
            context,
            shared: shares,
            single_b3,
            name,
            client: egress,
            tracing: Arc::clone(tracing),
            provider: Arc::clone(provider),
            upstream: upstream.clone(),
        });
    }

    /// Writes the span's context into a request going upstream, in its tracer's propagation format.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let Some(span) = &*self.lock() else { return };
        match &*span.provider {
            Provider::OpenTelemetry(_) => span.context.inject_w3c(headers),
            // The upstream's parent is this span.
            Provider::Zipkin(_) => span.context.inject_b3(headers, span.single_b3),
        }
    }

    fn rename(&self, name: String) {
        if let Some(span) = &mut *self.lock() {
            span.name = name;
        }
    }

    /// The span, to finish when the stream ends.
    pub fn take(&self) -> Option<ActiveSpan> {
        self.lock().take()
    }
}

/// gRPC statuses Envoy counts as the server's error: Unknown, DeadlineExceeded, Unimplemented,
/// ResourceExhausted (tag only), Internal, Unavailable, DataLoss.
fn grpc_server_error(code: u32, for_status: bool) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15) || (!for_status && code == 8)
}

impl ActiveSpan {
    /// Tags the span from the finished stream, as Envoy's `finalizeDownstreamSpan`, and exports it when
    /// sampled.
    pub fn finish(self, e: &Entry<'_>) {
        if !self.context.sampled {
            return;
        }
        let local = &self.upstream.snapshot.local;
        let mut tags = Tags(vec![("node_id".into(), local.node_id.clone()), ("zone".into(), String::new())]);
        if let Some(req) = e.request {
            let header = |name: &str| req.headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            tags.set_some("guid:x-request-id", header("x-request-id"));
            let path = header("x-envoy-original-path").unwrap_or_else(|| req.path.clone());
            let path = truncate(&path, self.tracing.max_path_tag_length);
            let host = req.authority.clone().unwrap_or_default();
            tags.set("http.url", format!("{}://{host}{path}", header("x-forwarded-proto").unwrap_or_default()));
            tags.set("http.method", req.method.clone());
            tags.set("downstream_cluster", header("x-envoy-downstream-service-cluster").unwrap_or_else(|| "-".into()));
            tags.set("user_agent", header("user-agent").unwrap_or_else(|| "-".into()));
            tags.set("http.protocol", e.protocol.unwrap_or("-"));
            tags.set("peer.address", e.downstream_direct_remote.map(|a| a.ip().to_string()).unwrap_or_default());
            tags.set_some("guid:x-client-trace-id", header("x-client-trace-id"));
            if header("content-type").is_some_and(|c| c.starts_with("application/grpc")) {
                tags.set("grpc.path", req.path.clone());
                tags.set("grpc.authority", host);
                tags.set("grpc.content_type", header("content-type").unwrap_or_default());
                tags.set("grpc.timeout", header("grpc-timeout").unwrap_or_default());
            }
        }
        tags.set("request_size", e.bytes_received.to_string());
        tags.set("response_size", e.bytes_sent.to_string());
        tags.set("component", "proxy");
        if let Some(cluster) = e.cluster {
            tags.set("upstream_cluster", cluster);
            tags.set("upstream_cluster.name", cluster);
        }
        tags.set("http.status_code", e.code.unwrap_or(0).to_string());
        tags.set("response_flags", e.flag.unwrap_or("-"));
        let grpc = grpc_status(e);
        if e.code.is_none_or(|c| c >= 500) || grpc.as_ref().is_some_and(|(c, _)| grpc_server_error(*c, false)) {
            tags.set("error", "true");
        }
        for custom in &self.tracing.custom_tags {
            if let Some(v) = custom_value(&custom.value, e).filter(|v| !v.is_empty()) {
                tags.set(&custom.tag, v);
            }
        }
        if let Some((code, message)) = &grpc {
            tags.set("grpc.status_code", code.to_string());
            tags.set_some("grpc.message", message.clone());
        }
        let start = e.start.unwrap_or_else(SystemTime::now);
        let report = match &*self.provider {
            Provider::OpenTelemetry(_) => {
                let failed = e.code.is_some_and(|c| c >= 500 || (self.client && (400..500).contains(&c)))
                    || grpc.as_ref().is_some_and(|(c, _)| if self.client { *c != 0 } else { grpc_server_error(*c, true) });
                let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
                export::Report::Otlp(otlp::Span {
                    trace_id: self.context.trace_id.to_vec(),
                    span_id: self.context.span_id.to_vec(),
                    trace_state: self.context.trace_state.clone(),
                    parent_span_id: self.context.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
                    name: self.name,
                    kind: if self.client { otlp::SPAN_KIND_CLIENT } else { otlp::SPAN_KIND_SERVER },
                    start_time_unix_nano: nanos(start),
                    end_time_unix_nano: nanos(start + e.duration),
                    attributes: tags.0.into_iter().map(|(k, v)| otlp::KeyValue::string(k, v)).collect(),
                    status: failed.then(|| otlp::Status { message: String::new(), code: otlp::STATUS_CODE_ERROR }),
                })
            }
            Provider::Zipkin(_) => {
                let span = zipkin::Span { context: &self.context, shared: self.shared, name: &self.name, client: self.client, start, duration: e.duration, service: &local.cluster, local: e.downstream_local };
                export::Report::Zipkin(span.json(tags.0))
            }
        };
        // A full queue drops the span: tracing never holds a request.
        let exporter = export::exporter(&self.provider, &self.upstream.pools);
        let _ = exporter.try_send(export::Finished { report, upstream: self.upstream });
    }
}

/// A span's tags, in the order set; setting a tag again replaces its value, as Envoy's spans do.
struct Tags(Vec<(String, String)>);

impl Tags {
    fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    fn set_some(&mut self, key: &str, value: Option<String>) {
        if let Some(v) = value {
            self.set(key, v);
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The response's `grpc-status` (headers, else trailers) and `grpc-message`.
fn grpc_status(e: &Entry<'_>) -> Option<(u32, Option<String>)> {
    let from = |h: &HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        Some((code, h.get("grpc-message").map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())))
    };
    e.response.and_then(from).or_else(|| e.trailers.and_then(from))
}

fn custom_value(value: &TagValue, e: &Entry<'_>) -> Option<String> {
    match value {
        TagValue::Literal(v) => Some(v.clone()),
        TagValue::Environment { value, default } => value.clone().or_else(|| default.clone()),
        TagValue::RequestHeader { name, default } => {
            let found = e.request.and_then(|r| r.headers.get(name.as_str())).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            found.or_else(|| default.clone())
        }
        TagValue::RbacMetadata { key, default } => e.rbac_shadow.and_then(|m| m.get(key)).map(str::to_string).or_else(|| default.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tracing::Tracing;

    fn tracing(random: u64) -> Tracing {
        Tracing { client_sampling: 100, random_sampling: random, overall_sampling: 10_000, verbose: false, max_path_tag_length: 256, custom_tags: vec![], provider: None }
    }

    fn decided(t: &Tracing, id: &str, extra: &[(&'static str, &str)]) -> (bool, String) {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_str(id).unwrap());
        for (k, v) in extra {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        let traced = decide(t, RequestId::default(), &mut h);
        (traced, h["x-request-id"].to_str().unwrap().to_string())
    }

    #[test]
    fn the_decision_is_drawn_from_the_request_id_and_packed_into_it() {
        // 0x00000063 % 10000 = 99 < 1% (100 of 10,000): sampled, packed as '9'.
        assert_eq!(decided(&tracing(100), "00000063-0000-4000-8000-000000000000", &[]), (true, "00000063-0000-9000-8000-000000000000".into()));
        // 0x00000064 % 10000 = 100: not sampled, the id unchanged.
        assert_eq!(decided(&tracing(100), "00000064-0000-4000-8000-000000000000", &[]), (false, "00000064-0000-4000-8000-000000000000".into()));
        // A client's trace id forces it ('b'); so does a trusted x-envoy-force-trace ('a').
        assert_eq!(decided(&tracing(0), "00000064-0000-4000-8000-000000000000", &[("x-client-trace-id", "x")]).1, "00000064-0000-b000-8000-000000000000");
        assert_eq!(decided(&tracing(0), "00000064-0000-4000-8000-000000000000", &[("x-envoy-force-trace", "1")]).1, "00000064-0000-a000-8000-000000000000");
        // An id that records a decision keeps it, and overall sampling can still refuse it.
        assert!(decided(&tracing(0), "00000064-0000-9000-8000-000000000000", &[]).0);
        let none = Tracing { overall_sampling: 0, ..tracing(10_000) };
        assert_eq!(decided(&none, "00000064-0000-9000-8000-000000000000", &[]), (false, "00000064-0000-4000-8000-000000000000".into()));
    }

    #[test]
    fn decorators_cross_the_hop_once() {
        let d = Decorator { operation: "ratings:9080/*".into(), propagate: true };
        let mut out = HeaderMap::new();
        let op = decorate(true, Some(&d), &mut out);
        assert_eq!((op.name.as_deref(), out[DECORATOR].to_str().unwrap()), (Some("ratings:9080/*"), "ratings:9080/*"));
        // Inbound: the client's operation names the span, is removed, and nothing goes back.
        let mut inbound = out.clone();
        let op = decorate(false, Some(&d), &mut inbound);
        assert_eq!((op.name.as_deref(), inbound.get(DECORATOR), op.respond_with), (Some("ratings:9080/*"), None, None));
        // Without one, the route's operation goes back to the client.
        let op = decorate(false, Some(&d), &mut HeaderMap::new());
        let mut response = HeaderMap::new();
        decorate_response(false, &op, &mut response, None);
        assert_eq!(response[DECORATOR], "ratings:9080/*");
    }
}
