//! Finished spans leave in batches, as Envoy's tracers send them, when 5 spans wait (`min_flush_spans`) or
//! every 5 s (`flush_interval`): one OTLP `Export` call over gRPC, or one Zipkin JSON v2 POST, to the
//! provider's cluster. One exporter per provider and per pod (its upstream pools: exports leave from the pod,
//! as its sidecar's would); it ends with the pod. A full queue drops the span rather than holding a request.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::header::HeaderValue;
use hyper::{Method, Request};
use prost::Message;
use tokio::sync::mpsc;

use super::otlp;
use crate::config::tracing::{OpenTelemetry, Provider, Zipkin};
use crate::proxy::body;
use crate::proxy::upstream::pool::Pools;
use crate::proxy::upstream::Upstream;

/// The instrumentation scope's version in exported spans.
const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");
const MIN_FLUSH_SPANS: usize = 5;
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A span to export, with the configuration of the request it traced (the exporter sends through the
/// latest one it was given).
pub struct Finished {
    pub report: Report,
    pub upstream: Upstream,
}

/// A span in its tracer's format.
pub enum Report {
    Otlp(otlp::Span),
    Zipkin(serde_json::Value),
}

type Key = (usize, Arc<Provider>);

static EXPORTERS: LazyLock<Mutex<HashMap<Key, mpsc::Sender<Finished>>>> = LazyLock::new(Mutex::default);

/// Where spans of `provider` made by the pod (or proxy) owning `pools` go; started on first use.
pub fn exporter(provider: &Arc<Provider>, pools: &Arc<Pools>) -> mpsc::Sender<Finished> {
    let key = (Arc::as_ptr(pools) as usize, Arc::clone(provider));
    let mut exporters = EXPORTERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(sender) = exporters.get(&key).filter(|s| !s.is_closed()) {
        return sender.clone();
    }
    let (sender, receiver) = mpsc::channel(QUEUE);
    exporters.insert(key.clone(), sender.clone());
    tokio::spawn(run(key, receiver, Arc::downgrade(pools)));
    sender
}

/// Batches spans until the pod's pools are gone.
async fn run(key: Key, mut receiver: mpsc::Receiver<Finished>, pools: Weak<Pools>) {
    let provider = Arc::clone(&key.1);
    let mut batch = Vec::new();
    let mut latest: Option<Upstream> = None;
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    loop {
        tokio::select! {
            received = receiver.recv() => {
                let Some(finished) = received else { break };
                batch.push(finished.report);
                latest = Some(finished.upstream);
                if batch.len() < MIN_FLUSH_SPANS {
                    continue;
                }
            }
            _ = tick.tick() => {
                if pools.strong_count() == 0 {
                    break;
                }
            }
        }
        if let Some(upstream) = latest.clone().filter(|_| !batch.is_empty()) {
            tokio::spawn(send(Arc::clone(&provider), upstream, std::mem::take(&mut batch)));
        }
    }
    let mut exporters = EXPORTERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if exporters.get(&key).is_some_and(|s| s.is_closed() || pools.strong_count() == 0) {
        exporters.remove(&key);
    }
}

/// One export of `reports` (all in the provider's format).
async fn send(provider: Arc<Provider>, upstream: Upstream, reports: Vec<Report>) {
    let count = reports.len();
    let (request, timeout_ms) = match &*provider {
        Provider::OpenTelemetry(o) => {
            let spans = reports.into_iter().filter_map(|r| if let Report::Otlp(s) = r { Some(s) } else { None }).collect();
            (export_request(o, spans), o.timeout_ms)
        }
        Provider::Zipkin(z) => {
            let spans: Vec<serde_json::Value> = reports.into_iter().filter_map(|r| if let Report::Zipkin(s) = r { Some(s) } else { None }).collect();
            (zipkin_request(z, &spans), ZIPKIN_TIMEOUT_MS)
        }
    };
    let call = upstream.request(provider.cluster(), request);
    let outcome = match tokio::time::timeout(Duration::from_millis(timeout_ms), call).await {
        Err(_) => Err("deadline exceeded".to_string()),
        Ok(Err(e)) => Err(e),
        // Envoy counts a Zipkin report sent on 202 Accepted only.
        Ok(Ok(response)) if matches!(*provider, Provider::Zipkin(_)) => match response.status() {
            hyper::StatusCode::ACCEPTED => Ok(()),
            other => Err(format!("the collector answered {other}")),
        },
        Ok(Ok(response)) => {
            let head_status = response.headers().get("grpc-status").cloned();
            let ok = response.status().is_success();
            let trailers = response.into_body().collect().await.ok().and_then(|c| c.trailers().cloned());
            let status = head_status.or_else(|| trailers.and_then(|t| t.get("grpc-status").cloned()));
            match (ok, status.as_ref().map(HeaderValue::as_bytes)) {
                (true, Some(b"0")) => Ok(()),
                (_, status) => Err(format!("gRPC status {:?}", status.map(String::from_utf8_lossy))),
            }
        }
    };
    if let Err(e) = outcome {
        tracing::warn!(cluster = %provider.cluster(), "exporting {count} spans failed: {e}");
    }
}

/// Envoy's `tracing.zipkin.request_timeout` default.
const ZIPKIN_TIMEOUT_MS: u64 = 5_000;

/// A POST of Zipkin JSON v2 spans to the collector's endpoint, `Host` the collector's hostname.
fn zipkin_request(z: &Zipkin, spans: &[serde_json::Value]) -> Request<body::Body> {
    let mut request = Request::new(body::full(serde_json::to_vec(spans).unwrap_or_default()));
    *request.method_mut() = Method::POST;
    let uri = format!("http://{}{}", z.hostname, z.endpoint).parse().or_else(|_| z.endpoint.parse());
    *request.uri_mut() = uri.unwrap_or_else(|_| hyper::Uri::from_static("/"));
    if let Ok(host) = HeaderValue::from_str(&z.hostname) {
        request.headers_mut().insert(hyper::header::HOST, host);
    }
    request.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    request
}

fn export_request(provider: &OpenTelemetry, spans: Vec<otlp::Span>) -> Request<body::Body> {
    let message = otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(otlp::Resource { attributes: vec![otlp::KeyValue::string("service.name", provider.service_name.clone())] }),
            scope_spans: vec![otlp::ScopeSpans { scope: Some(otlp::InstrumentationScope { name: "envoy".into(), version: SCOPE_VERSION.into() }), spans }],
        }],
    };
    let encoded = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + encoded.len());
    framed.put_u8(0);
    framed.put_u32(encoded.len() as u32);
    framed.put_slice(&encoded);
    let mut request = Request::new(body::full(Bytes::from(framed)));
    *request.method_mut() = Method::POST;
    // Istio's cluster names (`outbound|4317||...`) are no URI authority: the request then goes without one.
    *request.uri_mut() = format!("http://{}{EXPORT_PATH}", provider.authority).parse().unwrap_or_else(|_| hyper::Uri::from_static(EXPORT_PATH));
    let headers = request.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
    if let Ok(timeout) = HeaderValue::from_str(&format!("{}m", provider.timeout_ms)) {
        headers.insert("grpc-timeout", timeout);
    }
    request
}
