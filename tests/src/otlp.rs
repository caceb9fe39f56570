//! An OTLP trace receiver (OpenTelemetry's own service definition, `opentelemetry-proto`): what proxies
//! exported to it, for the tracing tests.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

#[derive(Clone, Default)]
pub struct Receiver(pub Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Serves on `listener` (bound in the namespace) from a thread of its own, for the life of the process.
pub fn serve(listener: std::net::TcpListener) -> Receiver {
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(tokio::net::TcpListener::from_std(listener).unwrap());
            tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await.unwrap();
        });
    });
    receiver
}

impl Receiver {
    /// Every span received so far, with its resource's `service.name`.
    pub fn spans(&self) -> Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> {
        let exports = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for rs in exports.iter().flat_map(|e| &e.resource_spans) {
            let service = rs.resource.iter().flat_map(|r| &r.attributes).find(|a| a.key == "service.name").and_then(|a| a.value.as_ref()).map(|v| format!("{:?}", v.value)).unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                out.push((service.clone(), span.clone()));
            }
        }
        out
    }
}
