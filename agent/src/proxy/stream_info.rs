//! Envoy's stream info: what is known of a finished stream (an HTTP request, or a TCP connection), as the
//! access logs and the tracer read it.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use hyper::HeaderMap;

use super::tls_info::TlsInfo;
use super::upstream::pool::UpstreamSession;

/// The request of an HTTP stream, as `%REQ(...)%` reads it (pseudo-headers included).
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub authority: Option<String>,
    pub scheme: &'static str,
    pub headers: HeaderMap,
}

/// What a logger knows of a finished stream (Envoy's `StreamInfo` and headers).
#[derive(Debug, Default)]
pub struct Entry<'a> {
    pub start: Option<SystemTime>,
    pub duration: Duration,
    /// `HTTP/1.1`, `HTTP/2`; none for TCP.
    pub protocol: Option<&'static str>,
    pub request: Option<&'a RequestHead>,
    pub response: Option<&'a HeaderMap>,
    pub trailers: Option<&'a HeaderMap>,
    pub code: Option<u16>,
    pub flag: Option<&'a str>,
    pub details: Option<&'a str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub cluster: Option<&'a str>,
    pub upstream: Option<&'a UpstreamSession>,
    /// The endpoint chosen (connected to or not), and why no connection to it could be made.
    pub upstream_host: Option<SocketAddr>,
    pub transport_failure: Option<&'a str>,
    pub route: Option<&'a str>,
    /// The client address (after `x-forwarded-for` where trusted), and the connection's peer.
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_direct_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub server_name: Option<&'a str>,
    pub tls: Option<&'a TlsInfo>,
    /// What the RBAC filters' shadow rules decided (their dynamic metadata).
    pub rbac_shadow: Option<&'a RbacShadow>,
}

/// The RBAC filter's dynamic metadata (`envoy.filters.http.rbac`): its shadow rules' result
/// (`<shadow_rules_stat_prefix>shadow_engine_result`, `allowed` or `denied`) and the policy that matched
/// (`<prefix>shadow_effective_policy_id`); a response extension.
#[derive(Debug, Clone, Default)]
pub struct RbacShadow(pub Vec<(String, String)>);

impl RbacShadow {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl RequestHead {
    pub fn of(parts: &hyper::http::request::Parts) -> RequestHead {
        RequestHead {
            method: parts.method.to_string(),
            path: parts.uri.path_and_query().map_or_else(|| "/".to_string(), |p| p.to_string()),
            authority: crate::proxy::route::authority(parts).map(str::to_string),
            scheme: if parts.uri.scheme_str() == Some("https") { "https" } else { "http" },
            headers: parts.headers.clone(),
        }
    }
}

impl Entry<'_> {
    /// A TCP connection accepted at `start` from `peer` to `local` (no HTTP fields); the caller fills in what
    /// became of it.
    pub fn connection(start: SystemTime, started: Instant, peer: SocketAddr, local: SocketAddr) -> Self {
        Entry {
            start: Some(start),
            duration: started.elapsed(),
            downstream_remote: Some(peer),
            downstream_direct_remote: Some(peer),
            downstream_local: Some(local),
            ..Default::default()
        }
    }
}
