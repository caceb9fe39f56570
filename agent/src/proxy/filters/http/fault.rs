//! The fault filter: delays and aborts a share of the requests (or those whose headers ask for it), as
//! Istio's VirtualService `fault` injects them.

use std::time::Duration;

use hyper::http::request::Parts;
use hyper::{Response, StatusCode};

use super::super::super::body::Body;
use super::super::super::route;
use crate::random::random;
use super::local_reply;
use crate::config::http_filters::{AbortKind, Fault, Percent};

/// Runs the fault: waits out the delay, then answers with the abort when there is one.
pub async fn decode(fault: &Fault, parts: &Parts) -> Option<Response<Body>> {
    if !fault.headers.iter().all(|h| h.matches(route::header_value(parts, &h.name).as_deref())) {
        return None;
    }
    if let Some(delay) = &fault.delay {
        let percent = header_percent(parts, "x-envoy-fault-delay-request-percentage", delay.percentage, delay.fixed.is_none());
        let duration = match delay.fixed {
            Some(d) => Some(d),
            None => header_u64(parts, "x-envoy-fault-delay-request").map(Duration::from_millis),
        };
        if let Some(d) = duration.filter(|_| percent.hit(random() as u64)) {
            tokio::time::sleep(d).await;
        }
    }
    let abort = fault.abort.as_ref()?;
    let header = abort.kind == AbortKind::Header;
    let percent = header_percent(parts, "x-envoy-fault-abort-request-percentage", abort.percentage, header);
    if !percent.hit(random() as u64) {
        return None;
    }
    let grpc = route::is_grpc(&parts.headers);
    let status = match abort.kind {
        AbortKind::Http(s) => s,
        AbortKind::Grpc(code) => return Some(local_reply::grpc_code(code, "fault filter abort")),
        AbortKind::Header => match (header_u64(parts, "x-envoy-fault-abort-request"), header_u64(parts, "x-envoy-fault-abort-grpc-request")) {
            (Some(s), _) if (200..600).contains(&s) => s as u16,
            (None, Some(code)) => return Some(local_reply::grpc_code(code.min(u64::from(u32::MAX)) as u32, "fault filter abort")),
            _ => return None,
        },
    };
    Some(local_reply::flagged("FI", StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE), Some("fault filter abort"), grpc))
}

fn header_u64(parts: &Parts, name: &str) -> Option<u64> {
    parts.headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

/// A header-controlled fault's percentage header may lower (never raise) the configured share.
fn header_percent(parts: &Parts, name: &str, configured: Percent, header_controlled: bool) -> Percent {
    match header_u64(parts, name).filter(|_| header_controlled) {
        Some(n) => Percent { numerator: n.min(configured.numerator), denominator: configured.denominator },
        None => configured,
    }
}
