//! Envoy's local replies: the answers the proxy makes itself (no route, no upstream, timeouts, redirects).
//! To a gRPC request they are a trailers-only gRPC response (HTTP 200, `grpc-status`, `grpc-message`), as
//! Envoy sends them.

use std::borrow::Cow;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::super::super::body::{self, Body};
use super::super::super::route::{self, Vars};
use crate::config::headers::Part;
use crate::config::http_connection_manager::{BodyFormat, LocalReplyConfig};

/// Marks a response the proxy made itself (no upstream headers such as `x-envoy-upstream-service-time`),
/// with its text for `local_reply_config`.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub text: String,
    pub grpc: bool,
}

pub fn reply(status: StatusCode, text: Option<&str>, grpc: bool) -> Response<Body> {
    let mut response = build(status, text, grpc);
    response.extensions_mut().insert(LocalReply { text: text.unwrap_or_default().to_string(), grpc });
    response
}

/// Envoy's response flag of a local reply (`UH`, `UF`, `UO`, `UT`, `NR`, `FI`, `RL`, ...), in the response's
/// extensions for telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFlag(pub &'static str);

/// Envoy's response code details of a local reply, where its flag does not say them (a route's direct response
/// or redirect, an upstream reset with its reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseDetails(pub Cow<'static, str>);

/// The endpoint a local reply's failed attempt was sent to (`UPSTREAM_HOST` of the stream) and, when the
/// connection could not be made, why as Envoy spells it (`UPSTREAM_TRANSPORT_FAILURE_REASON`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailure {
    pub host: std::net::SocketAddr,
    pub transport: Option<&'static str>,
}

/// Envoy's response code details of a stream: those the reply carries, those of its flag, or `via_upstream`.
pub fn details(flag: Option<&str>, marked: Option<&ResponseDetails>, from_upstream: bool) -> Option<Cow<'static, str>> {
    if let Some(d) = marked {
        return Some(d.0.clone());
    }
    let by_flag = flag.and_then(|f| {
        Some(match f {
            "NR" => "route_not_found",
            "NC" => "cluster_not_found",
            "UH" => "no_healthy_upstream",
            "UT" => "upstream_response_timeout",
            "UO" => "upstream_reset_before_response_started{overflow}",
            "UF" => "upstream_reset_before_response_started{remote_connection_failure}",
            "UC" => "upstream_reset_before_response_started{connection_termination}",
            "FI" => "fault_filter_abort",
            "RL" => "local_rate_limited",
            _ => return None,
        })
    });
    by_flag.or(from_upstream.then_some("via_upstream")).map(Cow::Borrowed)
}

/// A local reply with its response flag.
pub fn flagged(flag: &'static str, status: StatusCode, text: Option<&str>, grpc: bool) -> Response<Body> {
    let mut response = reply(status, text, grpc);
    response.extensions_mut().insert(ResponseFlag(flag));
    response
}

pub fn is_local(response: &Response<Body>) -> bool {
    response.extensions().get::<LocalReply>().is_some()
}

/// Rewrites a local reply by the connection manager's `local_reply_config`: the first mapper whose filter
/// matches may change its status, text and headers, and a body format (the mapper's, or the config's)
/// formats its body.
pub fn map(config: &LocalReplyConfig, response: &mut Response<Body>, vars: &Vars<'_>) {
    let Some(local) = response.extensions().get::<LocalReply>().cloned() else { return };
    if local.grpc {
        return;
    }
    let status = response.status().as_u16();
    let mapper = config.mappers.iter().find(|m| m.filter.matches(status, vars.request));
    let mut text = local.text;
    let mut format = config.body_format.as_ref();
    if let Some(m) = mapper {
        if let Some(s) = m.status.and_then(|s| StatusCode::from_u16(s).ok()) {
            *response.status_mut() = s;
        }
        if let Some(body) = &m.body {
            text = body.clone();
        }
        format = m.body_format.as_ref().or(format);
        let returned = response.headers().clone();
        let vars = Vars { response: Some((response.status().as_u16(), &returned)), local_reply_body: Some(&text), ..*vars };
        route::apply_response(&m.headers, response.headers_mut(), &vars);
    }
    let returned = response.headers().clone();
    let vars = Vars { response: Some((response.status().as_u16(), &returned)), local_reply_body: Some(&text), ..*vars };
    let (body, content_type) = match format {
        Some(BodyFormat::Text { format, content_type }) => (route::format_value(format, &vars), content_type.as_str()),
        Some(BodyFormat::Json { fields, content_type }) => (json_body(fields, &vars), content_type.as_str()),
        None if mapper.is_some_and(|m| m.body.is_some()) => (text.clone(), "text/plain"),
        None => return,
    };
    if let Ok(v) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response.headers_mut().remove(header::CONTENT_LENGTH);
    *response.body_mut() = body::full(body);
}

/// Envoy's JSON format: keys sorted, a value that is one numeric command a number, a newline at the end.
fn json_body(fields: &[(String, Vec<Part>)], vars: &Vars<'_>) -> String {
    let mut map = serde_json::Map::new();
    for (key, parts) in fields {
        let text = route::format_value(parts, vars);
        let numeric = matches!(parts.as_slice(), [Part::ResponseCode]);
        let value = match text.parse::<u64>() {
            Ok(n) if numeric => serde_json::Value::from(n),
            _ => serde_json::Value::from(text),
        };
        map.insert(key.clone(), value);
    }
    let mut out = serde_json::Value::Object(map).to_string();
    out.push('\n');
    out
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
    grpc_code(u32::from(grpc_status(status)), text)
}

/// A trailers-only gRPC answer with `code` and `message`.
pub fn grpc_code(code: u32, message: &str) -> Response<Body> {
    let mut response = Response::new(body::empty());
    response.extensions_mut().insert(LocalReply { text: message.to_string(), grpc: true });
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code));
    // Envoy sends no grpc-message for a reply without text.
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            headers.insert("grpc-message", v);
        }
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
