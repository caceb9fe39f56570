//! The router filter, last of the HTTP filters: picks the route's cluster, applies the route's rewrites and
//! header changes, and forwards the request over a pooled upstream connection with the route's timeout and
//! retry policy. Answers as Envoy's router does, local replies included.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use super::super::super::body::{self, Body, Kept, Replayable};
use crate::random::{random, weighted};
use super::super::super::route::{self, Downstream, Vars};
use super::super::super::snapshot::{ClusterRef, Snapshot};
use super::super::super::upstream::cluster::{self, PickError};
use super::super::super::upstream::{dns, health, lb};
use super::super::super::upstream::runtime::{ClusterRuntime, Result as AttemptResult};
use super::super::super::upstream::pool::{Key, PoolError, Protocol, Reuse};
use super::super::super::upstream::{ConnectError, Upstream};
use super::alpn::AlpnFilter;
use super::local_reply;
use crate::proxy::access_log::ForwardedRequest;
use crate::proxy::tracer::SpanSlot;
use crate::config::cluster::{Cluster, Discovery};
use crate::config::headers::HeaderOps;
use crate::config::matcher::HeaderMatcher;
use crate::config::route::{ClusterSpecifier, GrpcTimeout, HashKey, HashPolicy, HostRewrite, MirrorPolicy, RetryOn, Route, RouteAction, RouteConfiguration, VirtualHost};

/// Hop-by-hop headers: they describe one connection and are never forwarded (`te: trailers` excepted).
const HOP_BY_HOP: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"];

/// Headers that steer the router and are not forwarded.
const CONTROL_HEADERS: [&str; 5] = [
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-retry-on",
    "x-envoy-max-retries",
    "x-envoy-retriable-status-codes",
];

const RESET_BODY: &str = "upstream connect error or disconnect/reset before headers. ";

/// The route a request matched, with the levels whose header changes apply to it.
pub struct Matched<'a> {
    pub config: &'a RouteConfiguration,
    pub virtual_host: &'a VirtualHost,
    pub route: &'a Route,
    pub action: &'a RouteAction,
}

impl Matched<'_> {
    /// Header changes from the most specific level to the most general: applied in this order, the most
    /// general wins (Envoy's default); `most_specific_header_mutations_wins` reverses it.
    fn levels<'b>(&'b self, weighted: Option<&'b HeaderOps>) -> Vec<&'b HeaderOps> {
        let mut levels: Vec<&HeaderOps> = weighted.into_iter().chain([&self.route.headers, &self.virtual_host.headers, &self.config.headers]).collect();
        if self.config.most_specific_header_mutations_wins {
            levels.reverse();
        }
        levels
    }
}

/// The cluster a request goes to (by name, by header or by weight), chosen once when its route is resolved:
/// filters before the router see the same cluster the router uses (Envoy's `clusterInfo()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedCluster {
    pub name: String,
    /// Which of the route's weighted clusters, for its header changes.
    weighted: Option<usize>,
}

/// Chooses the route's cluster for a request.
pub fn route_cluster(action: &RouteAction, headers: &HeaderMap) -> RoutedCluster {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    match &action.cluster {
        ClusterSpecifier::Cluster(c) => RoutedCluster { name: c.clone(), weighted: None },
        ClusterSpecifier::Header(h) => RoutedCluster { name: header(h), weighted: None },
        ClusterSpecifier::Weighted(w) => {
            // `header_name`: the header's value (an unsigned integer) stands in for the random number.
            let point = w.header_name.as_deref().and_then(|h| header(h).trim().parse::<u64>().ok()).unwrap_or_else(|| random() as u64);
            let i = weighted(w.clusters.iter().map(|c| u64::from(c.weight)), point);
            match w.clusters.get(i) {
                Some(c) => RoutedCluster { name: c.name.clone(), weighted: Some(i) },
                None => RoutedCluster { name: String::new(), weighted: None },
            }
        }
    }
}

/// The cluster a filter chose for the request (kept in its extensions), or the route's choice now; with the
/// weighted cluster's header changes.
fn choose_cluster<'a>(action: &'a RouteAction, parts: &mut Parts) -> (String, Option<&'a HeaderOps>) {
    let chosen = parts.extensions.remove::<RoutedCluster>().unwrap_or_else(|| route_cluster(action, &parts.headers));
    let ops = match (&action.cluster, chosen.weighted) {
        (ClusterSpecifier::Weighted(w), Some(i)) => w.clusters.get(i).map(|c| &c.headers),
        _ => None,
    };
    (chosen.name, ops)
}

/// Forwards the request by the route. `upgrade` is set for an allowed upgrade request (WebSocket): it goes on a
/// connection of its own, once, and after a 101 the two connections are joined.
pub async fn forward(mut parts: Parts, body: Body, matched: Matched<'_>, downstream: &Downstream, upstream: &Upstream, upgrade: bool) -> Response<Body> {
    let grpc = route::is_grpc(&parts.headers);
    let action = matched.action;
    let (cluster_name, weighted_ops) = choose_cluster(action, &mut parts);
    dns::refresh(&upstream.snapshot, &cluster_name).await;
    health::ensure(&upstream.snapshot, &cluster_name, upstream.pools.sockets()).await;
    let Some(cluster) = upstream.snapshot.cluster(&cluster_name) else {
        let status = StatusCode::from_u16(action.cluster_not_found_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return local_reply::flagged("NC", status, None, grpc);
    };
    let levels = matched.levels(weighted_ops);
    // Header substitutions read the request as it arrived: kept only for routes that change headers.
    let arrived = levels.iter().any(|l| !l.is_empty()).then(|| Arrived {
        headers: parts.headers.clone(),
        path: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        authority: route::authority(&parts).unwrap_or_default().to_string(),
        method: parts.method.to_string(),
    });
    if let Some(arrived) = &arrived {
        let vars = arrived.vars(downstream, &arrived.headers);
        for ops in &levels {
            route::apply_request(ops, &mut parts.headers, &vars);
        }
    }
    let policy = Attempts::new(&mut parts.headers, action, matched.virtual_host);
    let on_downstream_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>().filter(|_| upgrade);
    let upgrade_header = parts.headers.get(header::UPGRADE).cloned();
    let mut template = prepare(parts, &matched, &cluster, downstream);
    let body = mirror(&template, body, &action.mirrors, upstream).await;
    let started = Instant::now();
    let (mut response, endpoint) = match (on_downstream_upgrade, upgrade_header) {
        // A CONNECT the route does not terminate goes to the cluster as it came, in its protocol.
        (Some(on_downstream), _) if template.method == Method::CONNECT => upgrade_once(&template, body, &cluster, upstream, on_downstream).await,
        (Some(on_downstream), Some(kind)) => {
            template.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            template.headers.insert(header::UPGRADE, kind);
            template.protocol = Protocol::Http1;
            upgrade_once(&template, body, &cluster, upstream, on_downstream).await
        }
        _ => policy.run(&template, body, &cluster, upstream, grpc).await,
    };
    finish_response(&mut response, template.downstream_version, started);
    if let Some(cookie) = template.set_cookie.clone() {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if let Some(arrived) = arrived.filter(|_| levels.iter().any(|l| !l.response_add.is_empty() || !l.response_remove.is_empty())) {
        let returned = response.headers().clone();
        let vars = Vars {
            upstream: endpoint.map(|e| (e, cluster.config.name.as_str())),
            response: Some((response.status().as_u16(), &returned)),
            ..arrived.vars(downstream, &template.headers)
        };
        for ops in &levels {
            route::apply_response(ops, response.headers_mut(), &vars);
        }
    }
    response
}

/// The request as it arrived, for the `%...%` substitutions of header changes.
struct Arrived {
    headers: HeaderMap,
    path: String,
    authority: String,
    method: String,
}

impl Arrived {
    fn vars<'a>(&'a self, downstream: &'a Downstream, request: &'a HeaderMap) -> Vars<'a> {
        Vars {
            downstream,
            request,
            path: &self.path,
            method: &self.method,
            authority: &self.authority,
            upstream: None,
            response: None,
            local_reply_body: None,
        }
    }
}

/// What every attempt sends: the request after the route's rewrites.
#[derive(Clone)]
struct Template {
    method: Method,
    path_and_query: String,
    authority: String,
    headers: HeaderMap,
    protocol: Protocol,
    downstream_version: Version,
    /// The request's hash for RING_HASH and MAGLEV clusters.
    hash: Option<u64>,
    /// A hash cookie generated for this request, set on its response.
    set_cookie: Option<HeaderValue>,
    /// `auto_host_rewrite` with the cluster's endpoint hostnames.
    host_rewrite: Option<HostRewrite>,
    hostnames: Vec<(SocketAddr, String)>,
    /// What the `istio.alpn` filter left for the router.
    alpn: Option<AlpnFilter>,
}

fn prepare(mut parts: Parts, matched: &Matched<'_>, cluster: &ClusterRef<'_>, downstream: &Downstream) -> Template {
    let action = matched.action;
    let original_path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let rewritten = route::rewrite_path(&original_path, &matched.route.matcher.path, action.prefix_rewrite.as_deref(), action.regex_rewrite.as_ref());
    if rewritten.is_some() {
        if let Ok(v) = HeaderValue::from_str(&original_path) {
            parts.headers.insert("x-envoy-original-path", v);
        }
    }
    let original_authority = route::authority(&parts).unwrap_or_default().to_string();
    let mut authority = original_authority.clone();
    match &action.host_rewrite {
        Some(HostRewrite::Literal(h)) => authority = h.clone(),
        Some(HostRewrite::Header(name)) => {
            if let Some(v) = parts.headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                authority = v.to_string();
            }
        }
        Some(HostRewrite::PathRegex(pattern, substitution)) => {
            let path = original_path.split('?').next().unwrap_or_default();
            if let Some(host) = route::rewrite_path(path, &matched.route.matcher.path, None, Some(&(pattern.clone(), substitution.clone()))) {
                authority = host;
            }
        }
        // Rewritten per attempt, to the chosen endpoint's hostname (if it has one).
        Some(HostRewrite::Auto) | None => {}
    }
    if authority != original_authority {
        set_original_host(&mut parts.headers, &original_authority);
    }
    let headers = &mut parts.headers;
    let keep_te = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Headers the Connection header nominates are hop-by-hop too.
    let nominated: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty() && !h.starts_with(':') && h != "host")
        .collect();
    for h in &nominated {
        headers.remove(h.as_str());
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove(header::HOST);
    let alpn = parts.extensions.remove::<AlpnFilter>();
    let (hash, set_cookie) = request_hash(&action.hash_policy, &parts, downstream);
    let path_and_query = rewritten.unwrap_or(original_path);
    if let Some(span) = parts.extensions.get::<Arc<SpanSlot>>() {
        span.inject(&mut parts.headers);
    }
    // Envoy's access logs read the request as the router rewrote it.
    if let Some(forwarded) = parts.extensions.get::<Arc<ForwardedRequest>>() {
        forwarded.rewritten(&path_and_query, &authority, &parts.headers);
    }
    Template {
        method: parts.method,
        path_and_query,
        authority,
        headers: parts.headers,
        protocol: protocol_for(cluster.config, parts.version),
        downstream_version: parts.version,
        hash,
        set_cookie,
        host_rewrite: action.host_rewrite.clone().filter(|h| *h == HostRewrite::Auto),
        hostnames: match &cluster.config.discovery {
            Discovery::Static { hostnames, .. } => hostnames.clone(),
            _ => Vec::new(),
        },
        alpn,
    }
}

/// Envoy keeps a rewritten request's original host in `x-envoy-original-host`.
fn set_original_host(headers: &mut HeaderMap, original: &str) {
    if let Ok(v) = HeaderValue::from_str(original) {
        headers.insert("x-envoy-original-host", v);
    }
}

/// The upstream protocol of `cluster` for a request that came in as `version`.
fn protocol_for(cluster: &Cluster, version: Version) -> Protocol {
    match (cluster.follow_downstream_protocol, version) {
        (true, Version::HTTP_2) => Protocol::Http2,
        (true, _) => Protocol::Http1,
        (false, _) if cluster.http2 => Protocol::Http2,
        (false, _) => Protocol::Http1,
    }
}

/// The request's hash by the route's hash policies, combined as Envoy combines them; a cookie policy with a
/// `ttl` and no cookie in the request generates one.
fn request_hash(policies: &[HashPolicy], parts: &Parts, downstream: &Downstream) -> (Option<u64>, Option<HeaderValue>) {
    let mut hash = None;
    let mut set_cookie = None;
    for policy in policies {
        let value = match &policy.key {
            HashKey::Header(name) => route::header_value(parts, name),
            HashKey::SourceIp => Some(downstream.remote.ip().to_canonical().to_string()),
            HashKey::QueryParameter(name) => {
                let query = parts.uri.query().unwrap_or_default();
                query.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == name.as_str()).then(|| v.to_string())
                })
            }
            HashKey::Cookie { name, ttl, path } => match cookie(&parts.headers, name) {
                Some(v) => Some(v),
                None => ttl.map(|ttl| {
                    let value = format!("{:016x}", lb::hash_str(&downstream.remote.to_string()));
                    let mut text = format!("{name}=\"{value}\"");
                    if let Some(p) = path {
                        text.push_str(&format!("; Path={p}"));
                    }
                    if !ttl.is_zero() {
                        text.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                    }
                    text.push_str("; HttpOnly");
                    set_cookie = HeaderValue::from_str(&text).ok();
                    value
                }),
            },
        };
        if let Some(v) = value {
            hash = Some(lb::combine(hash, lb::hash_str(&v)));
            if policy.terminal {
                break;
            }
        }
    }
    (hash, set_cookie)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.trim_matches('"').to_string())
    })
}

impl Template {
    /// The pooled connections of `cluster` to `endpoint` this request may use: those offering the ALPN list
    /// the `istio.alpn` filter gives for the protocol it goes upstream in.
    fn key(&self, endpoint: SocketAddr, cluster: &ClusterRef<'_>, snapshot: &Snapshot) -> Key {
        let alpn = self.alpn.as_ref().and_then(|f| f.offer(cluster.config, self.protocol, self.downstream_version));
        Key::of(endpoint, cluster, snapshot).with_alpn(alpn)
    }

    fn request(&self, body: Body, expected_timeout: Option<Duration>, attempt: Option<u32>, endpoint: Option<SocketAddr>) -> Request<Body> {
        let mut headers = self.headers.clone();
        if let Some(n) = attempt {
            headers.insert("x-envoy-attempt-count", HeaderValue::from(n));
        }
        if let Some(t) = expected_timeout {
            headers.insert("x-envoy-expected-rq-timeout-ms", HeaderValue::from(t.as_millis() as u64));
        }
        let authority = match (&self.host_rewrite, endpoint) {
            (Some(HostRewrite::Auto), Some(e)) => self.hostnames.iter().find(|(a, _)| *a == e).map_or(self.authority.as_str(), |(_, h)| h.as_str()),
            _ => self.authority.as_str(),
        };
        if authority != self.authority {
            set_original_host(&mut headers, &self.authority);
        }
        let (uri, version) = match self.protocol {
            Protocol::Http1 => {
                if let Ok(host) = HeaderValue::from_str(authority) {
                    headers.insert(header::HOST, host);
                }
                // Envoy's HTTP/1 codec sends an explicit empty body on requests that may carry one.
                let bodyless = body.is_end_stream() && !matches!(self.method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE | Method::CONNECT);
                if bodyless && !headers.contains_key(header::CONTENT_LENGTH) {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                }
                (Uri::try_from(self.path_and_query.as_str()), Version::HTTP_11)
            }
            Protocol::Http2 => (Uri::try_from(format!("http://{authority}{}", self.path_and_query)), Version::HTTP_2),
        };
        // CONNECT names its target alone (authority-form, or :authority without :path in HTTP/2).
        let uri = if self.method == Method::CONNECT { Uri::try_from(authority) } else { uri };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri.unwrap_or_else(|_| Uri::from_static("/"));
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        req
    }
}

/// The route's timeouts and retry policy, with the request's `x-envoy-*` overrides (which are removed).
struct Attempts {
    timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retry_on: RetryOn,
    retries: u32,
    retriable_status_codes: Vec<u16>,
    retriable_headers: Vec<HeaderMatcher>,
    previous_hosts: bool,
    host_attempts: u32,
    base_interval: Duration,
    max_interval: Duration,
    /// Under `max_grpc_timeout`, upstream requests carry the expected timeout as their `grpc-timeout`.
    grpc_timeout_follows: bool,
    /// `x-envoy-attempt-count` on upstream requests and on the response.
    count_to_upstream: bool,
    count_to_response: bool,
}

/// The router's timeout for a gRPC request under the deprecated `max_grpc_timeout`, as Envoy computes it:
/// the request's `grpc-timeout` less the offset (unless that leaves nothing), capped at the maximum when
/// one is set; `None` (no timeout) when neither gives one.
fn grpc_router_timeout(asked: Option<Duration>, limit: GrpcTimeout) -> Option<Duration> {
    let mut timeout = asked.unwrap_or_default();
    if limit.offset < timeout {
        timeout -= limit.offset;
    }
    if !limit.max.is_zero() && (timeout.is_zero() || timeout > limit.max) {
        timeout = limit.max;
    }
    (!timeout.is_zero()).then_some(timeout)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

impl Attempts {
    fn new(headers: &mut HeaderMap, action: &RouteAction, virtual_host: &VirtualHost) -> Attempts {
        let policy = action.retry_policy.as_ref().or(virtual_host.retry_policy.as_ref());
        // Envoy's router: a route with `max_stream_duration` has no timeout of its own (the stream's
        // duration limits it); a gRPC request under `max_grpc_timeout` takes its own deadline.
        let legacy_grpc = action.max_grpc_timeout.filter(|_| action.stream_duration.is_none() && route::is_grpc(headers));
        let timeout = match (header_u64(headers, "x-envoy-upstream-rq-timeout-ms"), legacy_grpc) {
            (Some(0), _) => None,
            (Some(ms), _) => Some(Duration::from_millis(ms)),
            (None, Some(limit)) => grpc_router_timeout(route::grpc_timeout(headers), limit),
            (None, None) if action.stream_duration.is_some() => None,
            (None, None) => action.timeout,
        };
        let per_try_timeout = header_u64(headers, "x-envoy-upstream-rq-per-try-timeout-ms")
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
            .or(policy.and_then(|p| p.per_try_timeout));
        let header_on = headers.get("x-envoy-retry-on").and_then(|v| v.to_str().ok()).and_then(|v| RetryOn::parse(v, false).ok());
        let retry_on = policy.map(|p| p.retry_on).unwrap_or_default().union(header_on.unwrap_or_default());
        let retries = header_u64(headers, "x-envoy-max-retries")
            .map(|n| n.min(u64::from(u32::MAX)) as u32)
            .or(policy.map(|p| p.num_retries))
            .unwrap_or(if header_on.is_some() { 1 } else { 0 });
        let mut retriable_status_codes = policy.map(|p| p.retriable_status_codes.clone()).unwrap_or_default();
        if let Some(codes) = headers.get("x-envoy-retriable-status-codes").and_then(|v| v.to_str().ok()) {
            retriable_status_codes.extend(codes.split(',').filter_map(|c| c.trim().parse::<u16>().ok()));
        }
        for h in CONTROL_HEADERS {
            headers.remove(h);
        }
        Attempts {
            timeout,
            per_try_timeout,
            retry_on,
            retries,
            retriable_status_codes,
            retriable_headers: policy.map(|p| p.retriable_headers.clone()).unwrap_or_default(),
            previous_hosts: policy.is_some_and(|p| p.previous_hosts),
            host_attempts: policy.map_or(1, |p| p.host_selection_max_attempts),
            base_interval: policy.map_or(Duration::from_millis(25), |p| p.base_interval),
            max_interval: policy.map_or(Duration::from_millis(250), |p| p.max_interval),
            grpc_timeout_follows: legacy_grpc.is_some(),
            count_to_upstream: virtual_host.include_request_attempt_count,
            count_to_response: virtual_host.include_attempt_count_in_response,
        }
    }

    fn retriable_response(&self, response: &Response<Body>) -> bool {
        let code = response.status().as_u16();
        let on = &self.retry_on;
        (on.server_error && code >= 500)
            || (on.gateway_error && matches!(code, 502..=504))
            || (on.retriable_4xx && code == 409)
            || (on.retriable_status_codes && self.retriable_status_codes.contains(&code))
            || (on.retriable_headers && self.retriable_headers.iter().any(|h| h.matches_in(response.headers())))
            || grpc_status(response).is_some_and(|c| on.grpc_status(c))
    }

    fn retriable_failure(&self, error: &Failure) -> bool {
        let on = &self.retry_on;
        match error {
            // No connection: nothing of the request went upstream.
            Failure::Pool(PoolError::Connect(_)) => on.server_error || on.gateway_error || on.connect_failure || on.reset || on.reset_before_request,
            Failure::Pool(PoolError::Reset(e)) => {
                // hyper cancels a request its connection closed before dispatching it (a pooled connection the
                // upstream had just closed): it was never sent.
                on.server_error || on.gateway_error || on.reset || (on.refused_stream && is_refused_stream(e)) || (on.reset_before_request && e.is_canceled())
            }
            Failure::PerTryTimeout => on.server_error || on.gateway_error,
            Failure::Pool(PoolError::Overflow) => false,
        }
    }

    /// Jittered exponential back-off before retry `n` (0-based), as Envoy's.
    fn back_off(&self, n: u32) -> Duration {
        let ceiling = self.base_interval.saturating_mul(1u32 << n.min(16)).min(self.max_interval);
        let millis = ceiling.as_millis().max(1) as usize;
        Duration::from_millis((random() % millis) as u64)
    }

    /// The response and the endpoint that gave it (none for local replies).
    async fn run(&self, template: &Template, body: Body, cluster: &ClusterRef<'_>, upstream: &Upstream, grpc: bool) -> (Response<Body>, Option<SocketAddr>) {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let attempt = self.send_all(template, body, cluster, upstream, grpc, &attempts);
        let (mut response, endpoint) = match deadline {
            None => attempt.await,
            Some(at) => match tokio::time::timeout_at(at, attempt).await {
                Ok(answered) => answered,
                Err(_) => (local_reply::flagged("UT", StatusCode::GATEWAY_TIMEOUT, Some("upstream request timeout"), grpc), None),
            },
        };
        let made = attempts.load(Relaxed);
        if self.count_to_response && made > 0 {
            response.headers_mut().insert("x-envoy-attempt-count", HeaderValue::from(made));
        }
        (response, endpoint)
    }

    async fn send_all(
        &self,
        template: &Template,
        body: Body,
        cluster: &ClusterRef<'_>,
        upstream: &Upstream,
        grpc: bool,
        attempts: &std::sync::atomic::AtomicU32,
    ) -> (Response<Body>, Option<SocketAddr>) {
        let runtime = upstream.pools.runtime(&cluster.config.name);
        let limits = &cluster.config.circuit_breakers;
        if runtime.active_requests.load(Relaxed) >= limits.max_requests {
            cluster.state.upstream_rq_pending_overflow.fetch_add(1, Relaxed);
            return (overflow(grpc), None);
        }
        let _request = Counted::new(&runtime.active_requests);
        // A body is kept only when a retry may need to send it again, and only while it fits the buffer limit.
        let mut once = Some(body);
        let replayable = match self.retries {
            0 => None,
            _ => once.take().map(|b| Replayable::new(b, upstream.downstream_buffer_limit)),
        };
        let mut tried: Vec<SocketAddr> = Vec::new();
        let expected = self.per_try_timeout.or(self.timeout);
        let mut n = 0;
        loop {
            let avoid: &[SocketAddr] = if self.previous_hosts { &tried } else { &[] };
            let endpoint = match pick_endpoint(cluster, &runtime, upstream.original_dst, avoid, self.host_attempts, template.hash) {
                Ok(e) => e,
                Err(_) => return (local_reply::flagged("UH", StatusCode::SERVICE_UNAVAILABLE, Some("no healthy upstream"), grpc), None),
            };
            tried.push(endpoint);
            let body = match (&replayable, once.take()) {
                (Some(r), _) => r.attempt(),
                (None, Some(b)) => b,
                (None, None) => body::empty(),
            };
            let attempt = attempts.fetch_add(1, Relaxed) + 1;
            let mut request = template.request(body, expected, self.count_to_upstream.then_some(attempt), Some(endpoint));
            if let Some(t) = expected.filter(|_| self.grpc_timeout_follows) {
                request.headers_mut().insert("grpc-timeout", route::grpc_timeout_value(t));
            }
            let result = {
                let _retry = (n > 0).then(|| Counted::new(&runtime.active_retries));
                let _in_flight = runtime.start(endpoint);
                self.send_one(request, template.key(endpoint, cluster, &upstream.snapshot), template.protocol, cluster, upstream, &runtime).await
            };
            let outcome = match &result {
                Ok(r) => Some(AttemptResult::Status(r.status().as_u16())),
                // The circuit breaker refused it before any host was tried: nothing to hold against one, as in
                // Envoy (an overflow is not an outlier event).
                Err(Failure::Pool(PoolError::Overflow)) => None,
                Err(_) => Some(AttemptResult::LocalFailure),
            };
            if let Some(outcome) = outcome {
                let hosts = cluster.endpoints.hosts().len();
                runtime.record(endpoint, outcome, cluster.config.outlier_detection.as_ref(), hosts, cluster.state);
            }
            let retriable = match &result {
                Ok(response) => self.retriable_response(response),
                Err(failure) => self.retriable_failure(failure),
            };
            // A retry needs room under the cluster's max_retries circuit breaker.
            let room = runtime.active_retries.load(Relaxed) < limits.max_retries;
            // Past the buffer limit nothing of the body is kept: no other attempt (Envoy gives up retrying).
            let replayable_body = replayable.as_ref().is_none_or(Replayable::can_replay);
            if retriable && n < self.retries && !room {
                cluster.state.upstream_rq_retry_overflow.fetch_add(1, Relaxed);
            }
            if !retriable || n >= self.retries || !room || !replayable_body {
                return match result {
                    Ok(response) => (response, Some(endpoint)),
                    Err(failure) => {
                        let mut reply = failure.reply(n > 0, grpc);
                        reply.extensions_mut().insert(local_reply::UpstreamFailure { host: endpoint, transport: failure.transport() });
                        (reply, None)
                    }
                };
            }
            tokio::time::sleep(self.back_off(n)).await;
            n += 1;
            cluster.state.upstream_rq_retry.fetch_add(1, Relaxed);
        }
    }

    async fn send_one(
        &self,
        request: Request<Body>,
        key: Key,
        protocol: Protocol,
        cluster: &ClusterRef<'_>,
        upstream: &Upstream,
        runtime: &Arc<ClusterRuntime>,
    ) -> Result<Response<Body>, Failure> {
        cluster.state.upstream_rq_total.fetch_add(1, Relaxed);
        let endpoint = key.endpoint;
        let send = upstream.pools.send(key, protocol, Reuse::of(cluster.config), runtime, request);
        let (result, new_connection) = match self.per_try_timeout {
            None => send.await,
            Some(t) => tokio::time::timeout(t, send).await.map_err(|_| Failure::PerTryTimeout)?,
        };
        if new_connection {
            cluster.state.upstream_cx_total.fetch_add(1, Relaxed);
            if matches!(result, Err(PoolError::Connect(_))) {
                cluster.state.upstream_cx_connect_fail.fetch_add(1, Relaxed);
            }
        }
        if let Err(e) = &result {
            tracing::debug!(cluster = %cluster.config.name, %endpoint, "upstream request failed: {e}");
        }
        result.map_err(Failure::Pool)
    }
}

/// Counts one while alive (requests or retries in flight, for the circuit breakers).
struct Counted<'a>(&'a AtomicU64);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Relaxed);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Envoy's answer when a circuit breaker refuses a request.
fn overflow(grpc: bool) -> Response<Body> {
    let mut reply = local_reply::flagged("UO", StatusCode::SERVICE_UNAVAILABLE, Some(&format!("{RESET_BODY}reset reason: overflow")), grpc);
    reply.headers_mut().insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    reply
}

fn pick_endpoint(
    cluster: &ClusterRef<'_>,
    runtime: &ClusterRuntime,
    original_dst: SocketAddr,
    avoid: &[SocketAddr],
    attempts: u32,
    hash: Option<u64>,
) -> Result<SocketAddr, PickError> {
    let mut choice = cluster::pick(cluster, runtime, original_dst, avoid, hash)?;
    for _ in 1..attempts {
        if !avoid.contains(&choice) {
            break;
        }
        choice = cluster::pick(cluster, runtime, original_dst, avoid, hash)?;
    }
    Ok(choice)
}

/// Envoy's response code details of a reset before the response: the reset reason and, for a connection
/// that could not be made, the transport's failure (`upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}`).
fn reset_details(e: &PoolError) -> String {
    let reason = e.reason().replace(' ', "_");
    match transport_failure(e) {
        Some(failure) => format!("upstream_reset_before_response_started{{{reason}|{failure}}}"),
        None => format!("upstream_reset_before_response_started{{{reason}}}"),
    }
}

/// Envoy's transport failure reason of a connection that could not be made (only a refusal has one weft
/// knows to spell as Envoy does).
fn transport_failure(e: &PoolError) -> Option<&'static str> {
    match e {
        PoolError::Connect(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => Some("delayed_connect_error:_Connection_refused"),
        _ => None,
    }
}

/// Why an attempt got no response.
enum Failure {
    Pool(PoolError),
    PerTryTimeout,
}

impl Failure {
    fn transport(&self) -> Option<&'static str> {
        match self {
            Failure::Pool(e) => transport_failure(e),
            Failure::PerTryTimeout => None,
        }
    }

    fn reply(&self, retried: bool, grpc: bool) -> Response<Body> {
        match self {
            Failure::PerTryTimeout => local_reply::flagged("UT", StatusCode::GATEWAY_TIMEOUT, Some("upstream request timeout"), grpc),
            Failure::Pool(PoolError::Overflow) => overflow(grpc),
            Failure::Pool(e) => {
                let reason = if retried { "retried and the latest reset reason: " } else { "reset reason: " };
                let text = format!("{RESET_BODY}{reason}{}", e.reason());
                // Envoy's flags: the connection could not be made, or it ended before the response.
                let flag = if matches!(e, PoolError::Connect(_)) { "UF" } else { "UC" };
                let mut reply = local_reply::flagged(flag, StatusCode::SERVICE_UNAVAILABLE, Some(&text), grpc);
                reply.extensions_mut().insert(local_reply::ResponseDetails(reset_details(e).into()));
                reply
            }
        }
    }
}

fn is_refused_stream(e: &hyper::Error) -> bool {
    super::super::super::upstream::pool::stream_reset(e) == Some(h2::Reason::REFUSED_STREAM)
}

/// Terminates a CONNECT request (the route's `connect_config`): a TCP connection to the route's cluster, then
/// 200 and the tunnel's bytes both ways, as Envoy does.
pub async fn tunnel(mut parts: Parts, matched: Matched<'_>, upstream: &Upstream) -> Response<Body> {
    let (cluster_name, _) = choose_cluster(matched.action, &mut parts);
    let Some(on_downstream) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return local_reply::reply(StatusCode::BAD_REQUEST, None, false);
    };
    match upstream.connect(&cluster_name).await {
        Err(ConnectError::UnknownCluster(_)) => {
            local_reply::flagged("NC", StatusCode::from_u16(matched.action.cluster_not_found_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE), None, false)
        }
        Err(ConnectError::NoHealthyUpstream) => local_reply::flagged("UH", StatusCode::SERVICE_UNAVAILABLE, Some("no healthy upstream"), false),
        Err(ConnectError::Connect(_, e)) => {
            tracing::debug!(cluster = cluster_name, "CONNECT upstream failed: {e}");
            local_reply::flagged("UF", StatusCode::SERVICE_UNAVAILABLE, Some(&format!("{RESET_BODY}reset reason: remote connection failure")), false)
        }
        Ok((mut stream, _)) => {
            tokio::spawn(async move {
                match on_downstream.await {
                    Ok(down) => {
                        if let Err(e) = tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut stream).await {
                            tracing::debug!("CONNECT tunnel ended: {e}");
                        }
                    }
                    Err(e) => tracing::debug!("CONNECT upgrade failed: {e}"),
                }
            });
            Response::new(body::empty())
        }
    }
}

/// Sends copies of the request to the mirror clusters (fire and forget, answers ignored) and returns the body
/// for the request itself; the body is buffered only when a mirror takes this request, and only up to the
/// downstream connection's buffer limit (its listener's `per_connection_buffer_limit_bytes`): a longer one goes
/// to the request alone, as Envoy abandons its shadows then.
async fn mirror(template: &Template, body: Body, mirrors: &[MirrorPolicy], upstream: &Upstream) -> Body {
    let chosen: Vec<&MirrorPolicy> = mirrors.iter().filter(|m| m.fraction.hit(random() as u64)).collect();
    if chosen.is_empty() {
        return body;
    }
    let bytes = match body::keep(body, upstream.downstream_buffer_limit).await {
        Ok(Kept::Whole(bytes)) => bytes,
        Ok(Kept::TooLarge(body)) => return body,
        Err(_) => return body::empty(),
    };
    for m in chosen {
        let Some(cluster) = upstream.snapshot.cluster(&m.cluster) else {
            tracing::debug!(cluster = %m.cluster, "mirror: no such cluster");
            continue;
        };
        let runtime = upstream.pools.runtime(&m.cluster);
        let Ok(endpoint) = pick_endpoint(&cluster, &runtime, upstream.original_dst, &[], 1, template.hash) else {
            tracing::debug!(cluster = %m.cluster, "mirror: no healthy endpoint");
            continue;
        };
        let mut copy = Template { protocol: protocol_for(cluster.config, template.downstream_version), ..template.clone() };
        if m.shadow_suffix {
            let (host, port) = route::split_port(&template.authority);
            copy.authority = match port {
                Some(p) => format!("{host}-shadow:{p}"),
                None => format!("{host}-shadow"),
            };
        }
        let request = copy.request(body::full(bytes.clone()), None, None, Some(endpoint));
        let (pools, key, config) = (Arc::clone(&upstream.pools), copy.key(endpoint, &cluster, &upstream.snapshot), cluster.config.clone());
        cluster.state.upstream_rq_total.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let (result, _) = pools.send(key, copy.protocol, Reuse::of(&config), &runtime, request).await;
            match result {
                // Read to the end so the pooled connection can serve again.
                Ok(response) => drop(response.into_body().collect().await),
                Err(e) => tracing::debug!(cluster = %config.name, "mirror: {e}"),
            }
        });
    }
    body::full(bytes)
}

/// Sends an upgrade request (or a forwarded CONNECT) once, no retries, on a connection of its own; on 101
/// (a 2xx for CONNECT) joins the downstream and upstream connections.
async fn upgrade_once(
    template: &Template,
    body: Body,
    cluster: &ClusterRef<'_>,
    upstream: &Upstream,
    on_downstream: hyper::upgrade::OnUpgrade,
) -> (Response<Body>, Option<SocketAddr>) {
    let runtime = upstream.pools.runtime(&cluster.config.name);
    let Ok(endpoint) = pick_endpoint(cluster, &runtime, upstream.original_dst, &[], 1, template.hash) else {
        return (local_reply::flagged("UH", StatusCode::SERVICE_UNAVAILABLE, Some("no healthy upstream"), false), None);
    };
    let key = template.key(endpoint, cluster, &upstream.snapshot);
    cluster.state.upstream_rq_total.fetch_add(1, Relaxed);
    cluster.state.upstream_cx_total.fetch_add(1, Relaxed);
    let request = template.request(body, None, None, Some(endpoint));
    let mut response = match upstream.pools.send_upgrade(key, cluster.config.connect_timeout, template.protocol, request).await {
        Ok(r) => r,
        Err(e) => return (Failure::Pool(e).reply(false, false), None),
    };
    let joined = match template.method {
        Method::CONNECT => response.status().is_success(),
        _ => response.status() == StatusCode::SWITCHING_PROTOCOLS,
    };
    if joined {
        let on_upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(on_downstream, on_upstream) {
                Ok((down, up)) => {
                    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        tracing::debug!("upgraded connection ended: {e}");
                    }
                }
                Err(e) => tracing::debug!("upgrade failed: {e}"),
            }
        });
    }
    (response.map(BodyExt::boxed), Some(endpoint))
}

/// The headers Envoy's router sets on the way back (an upgrade's 101 keeps `connection` and `upgrade`).
fn finish_response(response: &mut Response<Body>, version: Version, started: Instant) {
    *response.version_mut() = version;
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    for h in HOP_BY_HOP.iter().filter(|h| !(switching && matches!(**h, "connection" | "upgrade"))) {
        headers.remove(*h);
    }
    if !local_reply::is_local(response) {
        let elapsed = HeaderValue::from(started.elapsed().as_millis() as u64);
        response.headers_mut().insert("x-envoy-upstream-service-time", elapsed);
    }
}

/// The `grpc-status` of a response's headers (a trailers-only gRPC response), if any.
fn grpc_status(response: &Response<Body>) -> Option<u32> {
    response.headers().get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}
