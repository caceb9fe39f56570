//! Active health checking (`health_checks`): TCP connects, HTTP GETs and gRPC `grpc.health.v1.Health/Check`
//! calls to each endpoint every `interval`, with Envoy's thresholds. The checker starts with the first
//! request that needs the cluster and that request waits for its first round, as Envoy's cluster warming
//! waits for the initial checks; it stops when the cluster is gone from the configuration.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::header::{self, HeaderValue};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::super::snapshot::Snapshot;
use super::super::socket::SocketFactory;
use crate::config::cluster::{Cluster, HealthCheck, HealthCheckKind};
use crate::config::headers::Part;
use crate::config::store::Resource;

/// Starts cluster `name`'s checker if it has a health check, keeps the endpoint list it checks current, and
/// waits (bounded) for the first round of checks.
pub async fn ensure(snapshot: &Snapshot, name: &str, sockets: &SocketFactory) {
    let Some(entry) = snapshot.clusters.get(name) else { return };
    let Some(hc) = entry.model().health_check.clone() else { return };
    let Some(c) = snapshot.cluster(name) else { return };
    *entry.state.health.hosts.lock().unwrap_or_else(|e| e.into_inner()) = c.endpoints.hosts();
    let health = &entry.state.health;
    if !health.started.swap(true, Relaxed) {
        tokio::spawn(run(Arc::downgrade(entry), hc.clone(), sockets.clone()));
    }
    if !health.first_round_done.load(Relaxed) {
        let notified = health.first_round.notified();
        if !health.first_round_done.load(Relaxed) {
            let _ = tokio::time::timeout(hc.timeout * 2 + Duration::from_secs(1), notified).await;
        }
    }
}

async fn run(cluster: Weak<Resource<Cluster>>, hc: HealthCheck, sockets: SocketFactory) {
    loop {
        let Some(entry) = cluster.upgrade() else { return };
        let hosts = entry.state.health.hosts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for host in hosts {
            let passed = check(host, &hc, entry.model(), &sockets).await;
            if !passed {
                tracing::debug!(cluster = %entry.name, %host, "health check failed");
            }
            entry.state.health.record(host, passed, hc.unhealthy_threshold, hc.healthy_threshold);
        }
        entry.state.health.first_round_done.store(true, Relaxed);
        entry.state.health.first_round.notify_waiters();
        drop(entry);
        tokio::time::sleep(hc.interval).await;
    }
}

/// One check of `host`, within the check's timeout.
async fn check(host: SocketAddr, hc: &HealthCheck, cluster: &Cluster, sockets: &SocketFactory) -> bool {
    let attempt = async {
        let stream = sockets.connect(host, cluster.source_address, hc.timeout).await.ok()?;
        match &hc.kind {
            HealthCheckKind::Tcp => Some(true),
            HealthCheckKind::Http { path, host: authority, statuses, headers } => {
                let (mut sender, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await.ok()?;
                tokio::spawn(conn);
                let mut req = Request::get(path.as_str()).body(Full::new(Bytes::new())).ok()?;
                let authority = authority.as_deref().unwrap_or(&cluster.name);
                req.headers_mut().insert(header::HOST, HeaderValue::from_str(authority).ok()?);
                req.headers_mut().insert(header::USER_AGENT, HeaderValue::from_static("Envoy/HC"));
                for o in &headers.request_add {
                    // Health check requests have no downstream: only literal text is substituted.
                    let value: String = o.value.iter().filter_map(|p| if let Part::Text(t) = p { Some(t.as_str()) } else { None }).collect();
                    if let (Ok(name), Ok(value)) = (header::HeaderName::from_bytes(o.name.as_bytes()), HeaderValue::from_str(&value)) {
                        req.headers_mut().append(name, value);
                    }
                }
                let status = sender.send_request(req).await.ok()?.status().as_u16();
                Some(statuses.iter().any(|(start, end)| (*start..*end).contains(&status)))
            }
            HealthCheckKind::Grpc { service, authority } => {
                let (mut sender, conn) = http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream)).await.ok()?;
                tokio::spawn(conn);
                let authority = authority.as_deref().unwrap_or(&cluster.name);
                let req = Request::post(format!("http://{authority}/grpc.health.v1.Health/Check"))
                    .header(header::CONTENT_TYPE, "application/grpc")
                    .header(header::TE, "trailers")
                    .body(Full::new(grpc_frame(service)))
                    .ok()?;
                let response = sender.send_request(req).await.ok()?;
                let head_status = response.headers().get("grpc-status").cloned();
                let collected = response.into_body().collect().await.ok()?;
                let status = collected.trailers().and_then(|t| t.get("grpc-status").cloned()).or(head_status);
                let body = collected.to_bytes();
                // HealthCheckResponse { status: SERVING (1) } is field 1, varint 1, after the 5-byte frame header.
                Some(status.is_some_and(|s| s == "0") && body.get(5..7) == Some(&[0x08, 0x01]))
            }
        }
    };
    matches!(tokio::time::timeout(hc.timeout, attempt).await, Ok(Some(true)))
}

/// A gRPC frame carrying `HealthCheckRequest { service }`.
fn grpc_frame(service: &str) -> Bytes {
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a);
        message.push(service.len().min(127) as u8);
        message.extend_from_slice(&service.as_bytes()[..service.len().min(127)]);
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use serde_json::json;

    /// A gRPC health server on loopback answering `serving` (1) or not (2) with grpc-status 0.
    async fn grpc_health(serving: u8) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    let frames = vec![
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, serving]))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let body = StreamBody::new(tokio_stream::iter(frames));
                    hyper::Response::builder().header(header::CONTENT_TYPE, "application/grpc").body(body)
                });
                tokio::spawn(hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service));
            }
        });
        addr
    }

    #[tokio::test]
    async fn grpc_checks_pass_only_when_serving() {
        let v = json!({"name": "g", "health_checks": [{"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "grpc_health_check": {"service_name": "svc"}}]});
        let cluster = crate::config::cluster::translate(crate::config::tree::Obj::new(&v, "c").unwrap()).unwrap();
        let hc = cluster.health_check.clone().unwrap();
        assert!(check(grpc_health(1).await, &hc, &cluster, &SocketFactory::Host).await, "SERVING passes");
        assert!(!check(grpc_health(2).await, &hc, &cluster, &SocketFactory::Host).await, "NOT_SERVING fails");
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        assert!(!check(dead, &hc, &cluster, &SocketFactory::Host).await, "no connection fails");
    }

    #[test]
    fn thresholds_flip_the_state_after_consecutive_results() {
        let state = crate::config::store::HealthState::default();
        state.started.store(true, Relaxed);
        let e: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(!state.allows(e), "unchecked endpoints are not used");
        state.record(e, true, 2, 3);
        assert!(state.allows(e), "one success suffices for a new endpoint");
        state.record(e, false, 2, 3);
        assert!(state.allows(e));
        state.record(e, false, 2, 3);
        assert!(!state.allows(e), "two failures in a row");
        state.record(e, true, 2, 3);
        state.record(e, true, 2, 3);
        assert!(!state.allows(e));
        state.record(e, true, 2, 3);
        assert!(state.allows(e), "three successes in a row");
    }
}
