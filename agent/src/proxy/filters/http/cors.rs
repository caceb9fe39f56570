//! The CORS filter: answers allowed preflight requests itself and adds the `access-control-*` headers to
//! responses for allowed origins, by the route's (or virtual host's) CorsPolicy, as Istio's VirtualService
//! `corsPolicy` configures it.

use hyper::header::{HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};

use super::super::super::body::Body;
use crate::random::random;
use super::local_reply;
use crate::config::http_filters::CorsPolicy;

pub enum Cors {
    /// Not a CORS request, or an origin the policy does not allow.
    Pass,
    /// An allowed preflight, answered here.
    Preflight(Response<Body>),
    /// An allowed request: these headers go on its response.
    Allowed(HeaderMap),
}

pub fn decode(policy: &CorsPolicy, parts: &Parts) -> Cors {
    let Some(origin) = parts.headers.get("origin").and_then(|v| v.to_str().ok()).filter(|o| !o.is_empty()) else { return Cors::Pass };
    if !policy.enabled.hit(random() as u64) || !policy.allow_origins.iter().any(|m| m.matches(origin)) {
        return Cors::Pass;
    }
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set("access-control-allow-origin", origin);
    if policy.allow_credentials {
        set("access-control-allow-credentials", "true");
    }
    let preflight = parts.method == Method::OPTIONS && parts.headers.get("access-control-request-method").is_some_and(|m| !m.is_empty());
    if !preflight {
        if let Some(expose) = &policy.expose_headers {
            set("access-control-expose-headers", expose);
        }
        return Cors::Allowed(headers);
    }
    for (name, value) in [
        ("access-control-allow-methods", &policy.allow_methods),
        ("access-control-allow-headers", &policy.allow_headers),
        ("access-control-max-age", &policy.max_age),
    ] {
        if let Some(v) = value {
            set(name, v);
        }
    }
    let mut reply = local_reply::reply(StatusCode::OK, None, false);
    reply.headers_mut().extend(headers);
    Cors::Preflight(reply)
}
