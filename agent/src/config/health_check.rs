//! `envoy.config.core.v3.HealthCheck`: the active health check of a cluster (the model's types are in
//! [`super::cluster`]).

use std::time::Duration;

use super::cluster::{HealthCheck, HealthCheckKind, HttpCheck};
use super::tree::{ConfigError, Obj, Result};

/// Envoy's default `response_buffer_size`: how much of an HTTP check's response body `receive` looks at.
const DEFAULT_RESPONSE_BUFFER: u64 = 1024;

pub fn translate(mut h: Obj<'_>) -> Result<HealthCheck> {
    let required = |h: &mut Obj<'_>, key: &str| -> Result<Duration> {
        h.duration(key)?.filter(|d| !d.is_zero()).ok_or_else(|| ConfigError::new(h.at(key), "is required and must be greater than 0s"))
    };
    let timeout = required(&mut h, "timeout")?;
    let interval = required(&mut h, "interval")?;
    let threshold = |h: &mut Obj<'_>, key: &str| -> Result<u32> {
        let n = h.u64(key)?.ok_or_else(|| ConfigError::new(h.at(key), "is required"))?;
        Ok(n.clamp(1, u64::from(u32::MAX)) as u32)
    };
    let unhealthy_threshold = threshold(&mut h, "unhealthy_threshold")?;
    let healthy_threshold = threshold(&mut h, "healthy_threshold")?;
    // Scheduling and logging details: they change when checks run or what is logged, not what is healthy.
    for key in ["no_traffic_interval", "no_traffic_healthy_interval", "unhealthy_interval", "unhealthy_edge_interval", "healthy_edge_interval", "interval_jitter", "initial_jitter", "event_log_path"] {
        let _ = h.take(key);
    }
    let _ = h.u64("interval_jitter_percent")?;
    let _ = h.bool("always_log_health_check_failures")?;
    let _ = h.bool("always_log_health_check_success")?;
    let _ = h.bool("reuse_connection")?;
    let mut found = Vec::new();
    if let Some(t) = h.object("tcp_health_check")? {
        found.push(tcp(t)?);
    }
    if let Some(http) = h.object("http_health_check")? {
        found.push(HealthCheckKind::Http(Box::new(http_check(http)?)));
    }
    if let Some(mut g) = h.object("grpc_health_check")? {
        let service = g.string("service_name")?.unwrap_or_default().to_string();
        let authority = g.string("authority")?.filter(|a| !a.is_empty()).map(str::to_string);
        g.finish()?;
        found.push(HealthCheckKind::Grpc { service, authority });
    }
    if found.len() != 1 {
        return Err(ConfigError::new(h.path(), "needs exactly one of tcp_health_check, http_health_check or grpc_health_check"));
    }
    h.finish()?;
    Ok(HealthCheck { timeout, interval, unhealthy_threshold, healthy_threshold, kind: found.remove(0) })
}

/// `tcp_health_check`: bytes to send after connecting, and the blocks the answer must contain.
fn tcp(mut t: Obj<'_>) -> Result<HealthCheckKind> {
    let send = match t.object("send")? {
        // Envoy writes the `send` payload only when it is given as `text`: a `binary` one is validated and
        // then not sent (TcpHealthCheckerImpl reads `send().text()`), so weft sends nothing for it either.
        Some(p) => match payload(p)? {
            Payload { bytes, hex: true } => bytes,
            Payload { hex: false, .. } => Vec::new(),
        },
        None => Vec::new(),
    };
    let receive = payloads(&mut t, "receive")?;
    if t.has("proxy_protocol_config") {
        return Err(ConfigError::new(t.at("proxy_protocol_config"), "is not supported by weft yet"));
    }
    t.finish()?;
    Ok(HealthCheckKind::Tcp { send, receive })
}

fn http_check(mut http: Obj<'_>) -> Result<HttpCheck> {
    let path = http.required_string("path")?.to_string();
    let host = http.string("host")?.filter(|h| !h.is_empty()).map(str::to_string);
    let mut statuses = Vec::new();
    for mut r in http.objects("expected_statuses")? {
        let range_path = r.path().to_string();
        let start = r.u64("start")?.unwrap_or(0);
        let end = r.u64("end")?.unwrap_or(0);
        r.finish()?;
        // Envoy's HttpStatusChecker refuses these ranges when the cluster is created.
        if start >= end || start < 100 || end > 600 {
            return Err(ConfigError::new(range_path, format!("[{start}, {end}) is not a status range: start must be at least 100 and below end, end at most 600")));
        }
        statuses.push((start as u16, end as u16));
    }
    if statuses.is_empty() {
        statuses.push((200, 201));
    }
    let http2 = match http.string("codec_client_type")?.unwrap_or("HTTP1") {
        "HTTP1" => false,
        "HTTP2" => true,
        "HTTP3" => return Err(ConfigError::new(http.at("codec_client_type"), "HTTP3 is not supported by weft; use HTTP1 or HTTP2")),
        other => return Err(ConfigError::new(http.at("codec_client_type"), format!("{other} is not a codec client type"))),
    };
    let method = match http.string("method")?.unwrap_or("METHOD_UNSPECIFIED") {
        "METHOD_UNSPECIFIED" | "GET" => "GET",
        m @ ("HEAD" | "POST" | "PUT" | "DELETE" | "OPTIONS" | "TRACE" | "PATCH") => m,
        "CONNECT" => return Err(ConfigError::new(http.at("method"), "CONNECT is not allowed for health checks")),
        other => return Err(ConfigError::new(http.at("method"), format!("{other} is not a request method"))),
    };
    let send = match http.object("send")? {
        Some(p) => {
            let send_path = p.path().to_string();
            let bytes = payload(p)?.bytes;
            // As Envoy: a body only with a method that carries one.
            if matches!(method, "GET" | "HEAD" | "DELETE" | "TRACE") {
                return Err(ConfigError::new(send_path, format!("cannot be sent with method {method}; use POST, PUT, PATCH or OPTIONS")));
            }
            bytes
        }
        None => Vec::new(),
    };
    let receive = payloads(&mut http, "receive")?;
    let buffer = http.u64("response_buffer_size")?.unwrap_or(DEFAULT_RESPONSE_BUFFER);
    let expected: u64 = receive.iter().map(|b| b.len() as u64).sum();
    if buffer != 0 && expected > buffer {
        return Err(ConfigError::new(
            http.at("receive"),
            format!("the expected response length {expected} is over the response buffer size {buffer} (response_buffer_size)"),
        ));
    }
    let headers = super::headers::ops(&mut http)?;
    http.finish()?;
    let response_buffer_size = (buffer != 0).then(|| usize::try_from(buffer).unwrap_or(usize::MAX));
    Ok(HttpCheck { path, host, statuses, headers, method: method.to_string(), send, receive, response_buffer_size, http2 })
}

/// One `HealthCheck.Payload`, decoded.
struct Payload {
    bytes: Vec<u8>,
    /// Given as `text` (hex) rather than `binary`.
    hex: bool,
}

/// `text` (hex digits) or `binary` (base64 in JSON), exactly one; `text` may not be empty.
fn payload(mut p: Obj<'_>) -> Result<Payload> {
    let out = match (p.string("text")?, p.string("binary")?) {
        (Some(text), None) => {
            let bytes = hex(text).filter(|b| !b.is_empty()).ok_or_else(|| ConfigError::new(p.at("text"), format!("invalid hex string '{text}'")))?;
            Payload { bytes, hex: true }
        }
        (None, Some(b64)) => {
            let bytes = super::secret::base64(b64).ok_or_else(|| ConfigError::new(p.at("binary"), "is not valid base64"))?;
            Payload { bytes, hex: false }
        }
        _ => return Err(ConfigError::new(p.path(), "needs exactly one of text or binary")),
    };
    p.finish()?;
    Ok(out)
}

/// A list of payloads; empty ones (an empty `binary`) are left out, as Envoy leaves them out of matching.
fn payloads(o: &mut Obj<'_>, key: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for p in o.objects(key)? {
        let bytes = payload(p)?.bytes;
        if !bytes.is_empty() {
            out.push(bytes);
        }
    }
    Ok(out)
}

/// Pairs of hex digits (either case); `None` for an odd length or any other character.
fn hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    text.as_bytes().chunks(2).map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: serde_json::Value) -> Result<HealthCheck> {
        let mut full = json!({"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1});
        if let (Some(m), Some(extra)) = (full.as_object_mut(), v.as_object()) {
            m.extend(extra.clone());
        }
        translate(Obj::new(&full, "hc")?)
    }

    #[test]
    fn tcp_payloads_decode_hex_and_base64() {
        let hc = check(json!({"tcp_health_check": {"send": {"text": "50494e47"}, "receive": [{"text": "504F"}, {"binary": "Tkc="}, {"binary": ""}]}})).unwrap();
        assert_eq!(hc.kind, HealthCheckKind::Tcp { send: b"PING".to_vec(), receive: vec![b"PO".to_vec(), b"NG".to_vec()] });
        // A binary `send` is not written by Envoy's TCP checker.
        let hc = check(json!({"tcp_health_check": {"send": {"binary": "UElORw=="}}})).unwrap();
        assert_eq!(hc.kind, HealthCheckKind::Tcp { send: Vec::new(), receive: Vec::new() });
        for (bad, path) in [
            (json!({"send": {"text": "5"}}), "hc.tcp_health_check.send.text"),
            (json!({"send": {"text": "zz"}}), "hc.tcp_health_check.send.text"),
            (json!({"receive": [{"text": ""}]}), "hc.tcp_health_check.receive[0].text"),
            (json!({"receive": [{}]}), "hc.tcp_health_check.receive[0]"),
            (json!({"receive": [{"text": "50", "binary": "UA=="}]}), "hc.tcp_health_check.receive[0]"),
            (json!({"proxy_protocol_config": {"version": "V1"}}), "hc.tcp_health_check.proxy_protocol_config"),
        ] {
            assert_eq!(check(json!({"tcp_health_check": bad})).unwrap_err().path, path);
        }
    }

    #[test]
    fn http_checks_take_method_body_receive_and_codec() {
        let hc = check(json!({"http_health_check": {"path": "/h", "method": "POST", "send": {"text": "6869"}, "receive": [{"text": "6f6b"}],
            "response_buffer_size": 0, "codec_client_type": "HTTP2"}}))
        .unwrap();
        let HealthCheckKind::Http(http) = hc.kind else { panic!("{hc:?}") };
        assert_eq!((http.method.as_str(), http.send.as_slice(), http.receive, http.response_buffer_size, http.http2), ("POST", &b"hi"[..], vec![b"ok".to_vec()], None, true));
        let hc = check(json!({"http_health_check": {"path": "/h"}})).unwrap();
        let HealthCheckKind::Http(http) = hc.kind else { panic!("{hc:?}") };
        assert_eq!((http.method.as_str(), http.response_buffer_size, http.http2, http.statuses), ("GET", Some(1024), false, vec![(200, 201)]));
        for (bad, path) in [
            (json!({"path": "/h", "send": {"text": "6869"}}), "hc.http_health_check.send"),
            (json!({"path": "/h", "method": "CONNECT"}), "hc.http_health_check.method"),
            (json!({"path": "/h", "codec_client_type": "HTTP3"}), "hc.http_health_check.codec_client_type"),
            (json!({"path": "/h", "receive": [{"text": "616263"}], "response_buffer_size": 2}), "hc.http_health_check.receive"),
            (json!({"path": "/h", "expected_statuses": [{"start": 200, "end": 200}]}), "hc.http_health_check.expected_statuses[0]"),
            (json!({"path": "/h", "expected_statuses": [{"start": 99, "end": 200}]}), "hc.http_health_check.expected_statuses[0]"),
        ] {
            assert_eq!(check(json!({"http_health_check": bad})).unwrap_err().path, path, "{bad}");
        }
    }
}
