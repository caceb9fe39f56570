//! Envoy's local replies: the answers the proxy makes itself (no route, no upstream, timeouts, redirects).
//! To a gRPC request they are a trailers-only gRPC response (HTTP 200, `grpc-status`, `grpc-message`), as
//! Envoy sends them.

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::super::super::body::{self, Body};

/// Marks a response the proxy made itself (no upstream headers such as `x-envoy-upstream-service-time`).
#[derive(Debug, Clone, Copy)]
pub struct LocalReply;

pub fn reply(status: StatusCode, text: Option<&str>, grpc: bool) -> Response<Body> {
    let mut response = build(status, text, grpc);
    response.extensions_mut().insert(LocalReply);
    response
}

pub fn is_local(response: &Response<Body>) -> bool {
    response.extensions().get::<LocalReply>().is_some()
}

fn build(status: StatusCode, text: Option<&str>, grpc: bool) -> Response<Body> {
    if grpc {
        return grpc_reply(status, text.unwrap_or_default());
    }
    let mut builder = Response::builder().status(status);
    let body = match text {
        Some(text) => {
            builder = builder.header(header::CONTENT_TYPE, "text/plain");
            body::full(text.to_string())
        }
        None => body::empty(),
    };
    builder.body(body).unwrap_or_else(|_| Response::new(body::empty()))
}

fn grpc_reply(status: StatusCode, text: &str) -> Response<Body> {
    let message = if text.is_empty() { status.canonical_reason().unwrap_or_default() } else { text };
    grpc_code(u32::from(grpc_status(status)), message)
}

/// A trailers-only gRPC answer with `code` and `message`.
pub fn grpc_code(code: u32, message: &str) -> Response<Body> {
    let mut response = Response::new(body::empty());
    response.extensions_mut().insert(LocalReply);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", v);
    }
    response
}

/// Envoy's HTTP to gRPC status mapping (`Grpc::Utility::httpToGrpcStatus`).
pub fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII except `%` is kept.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_get_trailers_only_replies() {
        let r = reply(StatusCode::SERVICE_UNAVAILABLE, Some("no healthy upstream"), true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no healthy upstream");
        let r = reply(StatusCode::NOT_FOUND, None, false);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(!r.headers().contains_key(header::CONTENT_TYPE));
    }
}
