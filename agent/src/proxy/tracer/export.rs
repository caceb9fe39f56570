//! Finished spans leave in batches, as Envoy's OpenTelemetry tracer sends them: one OTLP `Export` call over
//! gRPC to the provider's cluster when 5 spans wait (`min_flush_spans`) or every 5 s (`flush_interval`). One
//! exporter per provider and per pod (its upstream pools: exports leave from the pod, as its sidecar's
//! would); it ends with the pod. A full queue drops the span rather than holding a request.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Version};
use prost::Message;
use tokio::sync::mpsc;

use super::otlp;
use crate::config::tracing::OpenTelemetry;
use crate::proxy::body;
use crate::proxy::upstream::pool::Pools;
use crate::proxy::upstream::Upstream;

const MIN_FLUSH_SPANS: usize = 5;
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A span to export, with the configuration of the request it traced (the exporter sends through the
/// latest one it was given).
pub struct Finished {
    pub span: otlp::Span,
    pub upstream: Upstream,
}

type Key = (usize, Arc<OpenTelemetry>);

static EXPORTERS: LazyLock<Mutex<HashMap<Key, mpsc::Sender<Finished>>>> = LazyLock::new(Mutex::default);

/// Where spans of `provider` made by the pod (or proxy) owning `pools` go; started on first use.
pub fn exporter(provider: &Arc<OpenTelemetry>, pools: &Arc<Pools>) -> mpsc::Sender<Finished> {
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
                batch.push(finished.span);
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

/// One `Export` call.
async fn send(provider: Arc<OpenTelemetry>, upstream: Upstream, spans: Vec<otlp::Span>) {
    let count = spans.len();
    let request = export_request(&provider, spans);
    let call = upstream.request(&provider.cluster, request);
    let outcome = match tokio::time::timeout(Duration::from_millis(provider.timeout_ms), call).await {
        Err(_) => Err("deadline exceeded".to_string()),
        Ok(Err(e)) => Err(e),
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
        tracing::warn!(cluster = %provider.cluster, "exporting {count} spans failed: {e}");
    }
}

fn export_request(provider: &OpenTelemetry, spans: Vec<otlp::Span>) -> Request<body::Body> {
    let message = otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(otlp::Resource { attributes: vec![otlp::KeyValue::string("service.name", provider.service_name.clone())] }),
            scope_spans: vec![otlp::ScopeSpans { scope: Some(otlp::InstrumentationScope { name: "envoy".into(), version: super::SCOPE_VERSION.into() }), spans }],
        }],
    };
    let encoded = message.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + encoded.len());
    framed.put_u8(0);
    framed.put_u32(encoded.len() as u32);
    framed.put_slice(&encoded);
    let mut request = Request::new(body::full(Bytes::from(framed)));
    *request.method_mut() = Method::POST;
    *request.version_mut() = Version::HTTP_2;
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
