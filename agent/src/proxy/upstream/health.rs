//! Active health checking (`health_checks`): TCP connects (with `send`/`receive` payloads), HTTP requests
//! (HTTP/1.1 or HTTP/2, with a body and `receive` blocks) and gRPC `grpc.health.v1.Health/Check` calls to
//! each endpoint every `interval`, with Envoy's thresholds. The checker starts with the first
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::super::snapshot::Snapshot;
use super::super::socket::SocketFactory;
use crate::config::cluster::{Cluster, HealthCheck, HealthCheckKind, HttpCheck};
use crate::config::headers::Part;
use crate::config::store::{CheckOutcome, Resource};

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
            let outcome = check(host, &hc, entry.model(), &sockets).await;
            if outcome != CheckOutcome::Passed {
                tracing::debug!(cluster = %entry.name, %host, ?outcome, "health check failed");
            }
            entry.state.health.record(host, outcome, hc.unhealthy_threshold, hc.healthy_threshold);
        }
        entry.state.health.first_round_done.store(true, Relaxed);
        entry.state.health.first_round.notify_waiters();
        drop(entry);
        tokio::time::sleep(hc.interval).await;
    }
}

/// One check of `host`, within the check's timeout (running out of it is a network failure, as in Envoy).
async fn check(host: SocketAddr, hc: &HealthCheck, cluster: &Cluster, sockets: &SocketFactory) -> CheckOutcome {
    let attempt = async {
        let Ok(stream) = sockets.connect(host, cluster.source_address, hc.timeout).await else { return CheckOutcome::NetworkFailure };
        match &hc.kind {
            HealthCheckKind::Tcp { send, receive } => tcp(stream, send, receive).await,
            HealthCheckKind::Http(http) => match http_check(stream, http, &cluster.name).await {
                Some(outcome) => outcome,
                None => CheckOutcome::NetworkFailure,
            },
            HealthCheckKind::Grpc { service, authority } => match grpc(stream, service, authority.as_deref().unwrap_or(&cluster.name)).await {
                Some(true) => CheckOutcome::Passed,
                Some(false) => CheckOutcome::Failed,
                None => CheckOutcome::NetworkFailure,
            },
        }
    };
    tokio::time::timeout(hc.timeout, attempt).await.unwrap_or(CheckOutcome::NetworkFailure)
}

/// A TCP check: without `receive` the connection passes (Envoy then closes it without writing `send`);
/// otherwise `send` is written and the answer read until it contains the `receive` blocks. A close before
/// that fails the check; an answer that never matches runs into the timeout.
async fn tcp(mut stream: TcpStream, send: &[u8], receive: &[Vec<u8>]) -> CheckOutcome {
    if receive.is_empty() {
        return CheckOutcome::Passed;
    }
    if !send.is_empty() && stream.write_all(send).await.is_err() {
        return CheckOutcome::NetworkFailure;
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return CheckOutcome::NetworkFailure,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
        if contains_in_order(&answer, receive) {
            return CheckOutcome::Passed;
        }
    }
}

/// Envoy's payload match: each block is found after the end of the previous one.
fn contains_in_order(haystack: &[u8], blocks: &[Vec<u8>]) -> bool {
    let mut from = 0;
    for block in blocks.iter().filter(|b| !b.is_empty()) {
        let Some(at) = haystack.get(from..).and_then(|rest| rest.windows(block.len()).position(|w| w == block.as_slice())) else { return false };
        from += at + block.len();
    }
    true
}

/// An HTTP check over HTTP/1.1 or HTTP/2 (prior knowledge). `None`: no complete answer (a network failure).
/// Envoy judges the answer once its body has ended: the body first (`receive`), then the status.
async fn http_check(stream: TcpStream, http: &HttpCheck, cluster: &str) -> Option<CheckOutcome> {
    let authority = http.host.as_deref().unwrap_or(cluster);
    let body = Full::new(Bytes::from(http.send.clone()));
    let mut req = if http.http2 {
        Request::builder().method(http.method.as_str()).uri(format!("http://{authority}{}", http.path)).body(body).ok()?
    } else {
        let mut req = Request::builder().method(http.method.as_str()).uri(http.path.as_str()).body(body).ok()?;
        req.headers_mut().insert(header::HOST, HeaderValue::from_str(authority).ok()?);
        req
    };
    req.headers_mut().insert(header::USER_AGENT, HeaderValue::from_static("Envoy/HC"));
    if !http.send.is_empty() {
        req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(http.send.len()));
    }
    for o in &http.headers.request_add {
        // Health check requests have no downstream: only literal text is substituted.
        let value: String = o.value.iter().filter_map(|p| if let Part::Text(t) = p { Some(t.as_str()) } else { None }).collect();
        if let (Ok(name), Ok(value)) = (header::HeaderName::from_bytes(o.name.as_bytes()), HeaderValue::from_str(&value)) {
            req.headers_mut().append(name, value);
        }
    }
    let response = if http.http2 {
        let (mut sender, conn) = http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        sender.send_request(req).await.ok()?
    } else {
        let (mut sender, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        sender.send_request(req).await.ok()?
    };
    let status = response.status().as_u16();
    let kept = body_prefix(response.into_body(), !http.receive.is_empty(), http.response_buffer_size).await?;
    if !http.receive.is_empty() && !contains_in_order(&kept, &http.receive) {
        return Some(CheckOutcome::Failed);
    }
    let expected = http.statuses.iter().any(|(start, end)| (*start..*end).contains(&status));
    Some(if expected { CheckOutcome::Passed } else { CheckOutcome::Failed })
}

/// Reads a response body to its end, keeping its first `limit` bytes (all of them for `None`) when `keep`.
async fn body_prefix(mut body: hyper::body::Incoming, keep: bool, limit: Option<usize>) -> Option<Vec<u8>> {
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.ok()?.into_data() else { continue };
        if keep {
            let room = limit.map_or(data.len(), |l| l.saturating_sub(kept.len()).min(data.len()));
            kept.extend_from_slice(&data[..room]);
        }
    }
    Some(kept)
}

/// A gRPC health check: `Some(true)` for SERVING, `Some(false)` for any other answer, `None` without one.
async fn grpc(stream: TcpStream, service: &str, authority: &str) -> Option<bool> {
    let (mut sender, conn) = http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
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

    fn cluster(check: serde_json::Value) -> Cluster {
        let mut hc = json!({"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1});
        if let (Some(m), Some(extra)) = (hc.as_object_mut(), check.as_object()) {
            m.extend(extra.clone());
        }
        let v = json!({"name": "checked", "health_checks": [hc]});
        crate::config::cluster::translate(crate::config::tree::Obj::new(&v, "c").unwrap()).unwrap()
    }

    async fn run_check(host: SocketAddr, cluster: &Cluster) -> CheckOutcome {
        check(host, cluster.health_check.as_ref().unwrap(), cluster, &SocketFactory::Host).await
    }

    /// A TCP server on loopback that reads what the check sends (up to `expect` bytes, which it hands
    /// back) and answers `answer` in two writes; it closes after `answer` when `close` is set.
    async fn tcp_server(answer: &'static [&'static [u8]], close: bool) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = [0u8; 64];
                    let n = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut got)).await.ok().and_then(Result::ok).unwrap_or(0);
                    let _ = tx.send(got[..n].to_vec());
                    for part in answer {
                        let _ = stream.write_all(part).await;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if !close {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                });
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn tcp_checks_send_the_payload_and_match_the_answer_in_order() {
        // "PING" sent; "PO", "NG" expected in order, across two reads.
        let c = cluster(json!({"timeout": "0.5s", "tcp_health_check": {"send": {"text": "50494E47"}, "receive": [{"text": "504f"}, {"binary": "Tkc="}]}}));
        let (addr, mut sent) = tcp_server(&[b"xxPO", b"..NGyy"], false).await;
        assert_eq!(run_check(addr, &c).await, CheckOutcome::Passed);
        assert_eq!(sent.recv().await.unwrap(), b"PING");
        let (addr, _) = tcp_server(&[b"NG", b"PO"], false).await;
        assert_eq!(run_check(addr, &c).await, CheckOutcome::NetworkFailure, "out of order: no match before the timeout");
        let (addr, _) = tcp_server(&[b"PO"], true).await;
        assert_eq!(run_check(addr, &c).await, CheckOutcome::NetworkFailure, "closed before the match");
        // Without receive the connection alone passes and nothing is written.
        let c = cluster(json!({"tcp_health_check": {"send": {"text": "50494E47"}}}));
        let (addr, mut sent) = tcp_server(&[], false).await;
        assert_eq!(run_check(addr, &c).await, CheckOutcome::Passed);
        assert_eq!(sent.recv().await.unwrap(), b"");
    }

    /// An HTTP/1.1 and h2c server on loopback answering `status` with `body`.
    async fn http_server(status: u16, body: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    hyper::Response::builder().status(status).body(Full::new(Bytes::from_static(body.as_bytes())))
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                tokio::spawn(async move { builder.serve_connection(TokioIo::new(stream), service).await });
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_checks_match_the_body_prefix_then_the_status() {
        let c = cluster(json!({"http_health_check": {"path": "/h", "receive": [{"text": "6f6b"}]}}));
        assert_eq!(run_check(http_server(200, "all ok here").await, &c).await, CheckOutcome::Passed);
        assert_eq!(run_check(http_server(200, "not good").await, &c).await, CheckOutcome::Failed, "body without the block");
        assert_eq!(run_check(http_server(503, "ok").await, &c).await, CheckOutcome::Failed, "status outside expected_statuses");
        // Only the first response_buffer_size bytes are searched.
        let c = cluster(json!({"http_health_check": {"path": "/h", "receive": [{"text": "6f6b"}], "response_buffer_size": 4}}));
        assert_eq!(run_check(http_server(200, "..ok").await, &c).await, CheckOutcome::Passed);
        assert_eq!(run_check(http_server(200, "...ok").await, &c).await, CheckOutcome::Failed);
    }

    #[tokio::test]
    async fn http_checks_send_method_and_body_over_http1_and_http2() {
        // The server reports the method, version, authority, content-length and body it received.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let seen = (req.method().to_string(), req.version(), req.uri().authority().map(|a| a.to_string()).or(req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("?").to_string())));
                        let len = req.headers().get(header::CONTENT_LENGTH).cloned();
                        let sent = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let _ = tx.send((seen, len, sent));
                        hyper::Response::builder().status(200).body(Full::new(Bytes::new()))
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                tokio::spawn(async move { builder.serve_connection(TokioIo::new(stream), service).await });
            }
        });
        for (codec, version) in [("HTTP1", hyper::Version::HTTP_11), ("HTTP2", hyper::Version::HTTP_2)] {
            let c = cluster(json!({"http_health_check": {"path": "/h", "host": "svc", "method": "PUT", "send": {"text": "6869"}, "codec_client_type": codec}}));
            assert_eq!(run_check(addr, &c).await, CheckOutcome::Passed, "{codec}");
            let ((method, v, authority), len, body) = rx.recv().await.unwrap();
            assert_eq!((method.as_str(), v, authority.as_deref(), len, &body[..]), ("PUT", version, Some("svc"), Some(HeaderValue::from(2)), &b"hi"[..]), "{codec}");
        }
    }

    #[tokio::test]
    async fn grpc_checks_pass_only_when_serving() {
        let v = json!({"name": "g", "health_checks": [{"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "grpc_health_check": {"service_name": "svc"}}]});
        let cluster = crate::config::cluster::translate(crate::config::tree::Obj::new(&v, "c").unwrap()).unwrap();
        assert_eq!(run_check(grpc_health(1).await, &cluster).await, CheckOutcome::Passed, "SERVING passes");
        assert_eq!(run_check(grpc_health(2).await, &cluster).await, CheckOutcome::Failed, "NOT_SERVING fails");
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        assert_eq!(run_check(dead, &cluster).await, CheckOutcome::NetworkFailure, "no connection fails");
    }

    #[test]
    fn thresholds_flip_the_state_after_consecutive_results() {
        use CheckOutcome::*;
        let state = crate::config::store::HealthState::default();
        state.started.store(true, Relaxed);
        let e: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(!state.allows(e), "unchecked endpoints are not used");
        state.record(e, Passed, 2, 3);
        assert!(state.allows(e), "one success suffices for a new endpoint");
        state.record(e, NetworkFailure, 2, 3);
        assert!(state.allows(e));
        state.record(e, NetworkFailure, 2, 3);
        assert!(!state.allows(e), "two network failures in a row");
        state.record(e, Passed, 2, 3);
        state.record(e, Passed, 2, 3);
        assert!(!state.allows(e));
        state.record(e, Passed, 2, 3);
        assert!(state.allows(e), "three successes in a row");
        state.record(e, Failed, 2, 3);
        assert!(!state.allows(e), "a wrong answer is unhealthy at once");
    }
}
