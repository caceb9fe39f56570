//! The local rate limit filter: a token bucket per filter (or per route, with a per-route configuration);
//! requests that find it empty get 429 `local_rate_limited`, as Envoy's filter answers.

use hyper::{Response, StatusCode};

use super::super::super::body::Body;
use super::super::super::route::{self, Vars};
use crate::random::random;
use super::local_reply;
use crate::config::http_filters::LocalRateLimit;

pub fn decode(limit: &LocalRateLimit, grpc: bool, vars: &Vars<'_>) -> Option<Response<Body>> {
    let bucket = limit.bucket.as_ref()?;
    if !limit.enabled.hit(random() as u64) || bucket.take() || !limit.enforced.hit(random() as u64) {
        return None;
    }
    let status = StatusCode::from_u16(limit.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let mut reply = local_reply::flagged("RL", status, Some("local_rate_limited"), grpc);
    route::apply_response(&limit.response_headers, reply.headers_mut(), vars);
    Some(reply)
}
