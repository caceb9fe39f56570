//! The HTTP connection manager: decodes HTTP/1.1 and HTTP/2 (prior knowledge, or either by `codec_type: AUTO`)
//! on any byte stream, applies Envoy's request handling (limits, path normalisation, `x-forwarded-*`, `via`,
//! host port stripping), matches the route, runs the HTTP filters ending in the router, and finishes the
//! response (`server`, `via`, the route's response headers). Each request takes the latest configuration, as
//! Envoy applies route and cluster updates to established connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::super::super::body::{self, Body};
use super::super::super::route::{self, Downstream, Vars};
use super::super::super::snapshot::Snapshot;
use super::super::super::upstream::Upstream;
use super::super::http::alpn::AlpnFilter;
use super::super::http::cors::{self, Cors};
use super::super::http::router::{self, Matched};
use super::super::http::peer_metadata::{self, Routed};
use super::super::http::{fault, local_ratelimit, local_reply, rbac};
use super::super::istio_stats::{CountedRequest, HttpReport, Reporter, StatsFilter, StreamFacts};
use crate::proxy::access_log::{ForwardedRequest, HttpConnection, HttpLog};
use crate::proxy::stream_info::RequestHead;
use crate::proxy::body::StreamEnd;
use crate::proxy::tracer::{self, SpanSlot};
use super::super::rbac::Facts;
use super::super::super::istio_metrics::IstioMetrics;
use super::metadata_exchange::PeerSlot;
use super::super::super::tls_info::TlsInfo;
use super::client_cert;
use super::http1_codec::{CodecError, HeadLimits, Http1Codec, Refusals};
use super::super::super::activity::{Activity, Counted};
use super::super::super::pod_share::PodLoad;
use super::stream::{Expired, RequestBody, ResponseBody, StreamTimers};
use crate::config::http_connection_manager::{Codec, EscapedSlashes, HostPort, HttpConnectionManager, HttpFilterKind, Routes, ServerHeader, UnderscoreHeaders};
use crate::config::cluster::Http2Settings;
use crate::config::http_filters::FilterOverride;
use crate::config::listener::TrafficDirection;
use crate::config::route::{Action, InternalRedirectPolicy, Route, RouteConfiguration, VirtualHost};

/// A request's route configuration, virtual host and route.
type Selected<'a> = (&'a RouteConfiguration, (&'a VirtualHost, &'a Route));

/// What the requests of one downstream connection are served with.
pub struct HttpContext {
    pub hcm: Arc<HttpConnectionManager>,
    /// The latest configuration: each request reads it when it starts.
    pub updates: watch::Receiver<Option<Arc<Snapshot>>>,
    /// The connection's own snapshot and upstream pools.
    pub upstream: Upstream,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The pod's load: requests in flight count toward its `max_requests`.
    pub load: Arc<PodLoad>,
    /// The connection's TLS session (`None`: plaintext; RBAC, routes' `tls_context`) and the SNI the
    /// client asked for, for RBAC.
    pub tls: Option<Arc<TlsInfo>>,
    pub server_name: Option<String>,
    pub telemetry: Telemetry,
}

/// What Istio's standard metrics of the connection's requests need besides the request.
#[derive(Default)]
pub struct Telemetry {
    /// The listener's `traffic_direction`: inbound listeners report as the destination.
    pub direction: TrafficDirection,
    /// The pod's metrics.
    pub metrics: Arc<IstioMetrics>,
    /// The connection's TCP metadata exchange (the downstream peer when no header named it).
    pub connection_peer: Arc<PeerSlot>,
    /// `namespace/name` of the pod the connection belongs to, for access logs (none: the standalone proxy).
    pub pod: Option<Arc<str>>,
}

/// Headers only a trusted (internal) client may send; removed from other requests, as Envoy does.
const INTERNAL_ONLY_HEADERS: [&str; 12] = [
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
];

/// Removed from requests of external clients at the edge (`use_remote_address`).
const EDGE_ONLY_HEADERS: [&str; 4] = [
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-original-path",
];

/// The request is refused by resetting its stream (HTTP/2) or closing the connection (HTTP/1.1), as Envoy's
/// codec does with headers over the limit in HTTP/2.
#[derive(Debug)]
pub struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request refused by the codec")
    }
}

impl std::error::Error for Reset {}

/// hyper's smallest header buffer; smaller `max_request_headers_kb` limits are checked per request.
const MIN_HEADER_BUFFER: usize = 8192;

/// Runs a hyper connection until it ends, or until its lifetime expires and it has closed gracefully.
macro_rules! drive {
    ($conn:expr, $activity:expr, $hcm:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => result,
            () = $activity.expired($hcm.idle_timeout, $hcm.max_connection_duration) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// The connection manager's `http2_protocol_options` on a downstream HTTP/2 connection's builder (hyper's, or
/// the HTTP/2 side of hyper_util's AUTO one); hyper's defaults where unset.
macro_rules! http2_settings {
    ($builder:expr, $settings:expr) => {{
        #[allow(unused_mut)]
        let (mut builder, settings): (_, &Http2Settings) = ($builder, $settings);
        if let Some(n) = settings.max_concurrent_streams {
            builder.max_concurrent_streams(n);
        }
        if let Some(n) = settings.initial_stream_window_size {
            builder.initial_stream_window_size(n);
        }
        if let Some(n) = settings.initial_connection_window_size {
            builder.initial_connection_window_size(n);
        }
    }};
}

/// Serves one downstream connection until it closes.
pub async fn serve<IO>(io: IO, context: HttpContext)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let hcm = Arc::clone(&context.hcm);
    let buffer = hcm.max_request_headers_bytes.max(MIN_HEADER_BUFFER) + 1024;
    let max_headers = hcm.max_headers_count;
    // hyper refuses more headers than this before the connection manager sees them; the configured limit
    // is checked per request, with Envoy's reply.
    let parser_headers = max_headers * 2 + 100;
    let activity = Activity::new();
    let context = Arc::new(context);
    let counting = Arc::clone(&activity);
    let refusals = Arc::new(Refusals::default());
    let codec_refusals = Arc::clone(&refusals);
    let limits = HeadLimits { max_bytes: buffer, max_headers: parser_headers, timeout: hcm.request_headers_timeout };
    let http1_codec = move |io, auto| TokioIo::new(Http1Codec::new(io, auto, limits, codec_refusals));
    let service = hyper::service::service_fn(move |req| {
        let context = Arc::clone(&context);
        let in_flight = counting.request();
        let refused = refusals.next_request();
        let admitted = context.load.request();
        async move {
            let response = match (refused, &admitted) {
                (Some(error), _) => context.refuse(error).map(|body| ResponseBody::new(body, None)),
                (None, None) => context.overloaded().map(|body| ResponseBody::new(body, None)),
                (None, Some(_)) => context.handle(req).await?,
            };
            Ok::<_, Reset>(response.map(|body| Counted { body, _in_flight: (in_flight, admitted) }))
        }
    });
    let ended = match hcm.codec {
        Codec::Http1 => {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.max_buf_size(buffer).max_headers(parser_headers);
            drive!(builder.serve_connection(http1_codec(io, false), service).with_upgrades(), activity, hcm).map_err(|e| e.to_string())
        }
        Codec::Http2 => {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            http2_settings!(&mut builder, &hcm.http2);
            drive!(builder.serve_connection(TokioIo::new(io), service), activity, hcm).map_err(|e| e.to_string())
        }
        Codec::Auto => {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().max_buf_size(buffer).max_headers(parser_headers);
            http2_settings!(builder.http2(), &hcm.http2);
            drive!(builder.serve_connection_with_upgrades(http1_codec(io, true), service), activity, hcm).map_err(|e| e.to_string())
        }
    };
    if let Err(e) = ended {
        tracing::debug!("HTTP connection ended: {e}");
    }
}

impl HttpContext {
    /// The snapshot and routes for a request starting now.
    fn current(&self) -> (Upstream, Option<Arc<RouteConfiguration>>) {
        let snapshot = self.updates.borrow().clone().unwrap_or_else(|| Arc::clone(&self.upstream.snapshot));
        let routes = match &self.hcm.routes {
            Routes::Inline(rc) => Some(Arc::clone(rc)),
            Routes::Rds(name) => snapshot.route_config(name),
        };
        (Upstream { snapshot, ..self.upstream.clone() }, routes)
    }

    /// One request under its stream's timers: one that expires before the response starts is answered
    /// here; after, the response body resets the stream.
    async fn handle(&self, req: Request<Incoming>) -> Result<Response<ResponseBody<Body>>, Reset> {
        let hcm = &self.hcm;
        let timers = StreamTimers::new(hcm.stream_idle_timeout, hcm.request_timeout, hcm.max_stream_duration, req.body().is_end_stream());
        let (grpc, version) = (route::is_grpc(req.headers()), req.version());
        let (parts, body) = req.into_parts();
        let report = self.istio_stats().map(|(filter, snapshot)| HttpReport::start(filter, &parts, self.tls.clone(), Arc::clone(&self.telemetry.connection_peer), snapshot));
        // The request's span, when the connection manager reports them.
        let span = self.hcm.reports_spans().then(|| Arc::new(SpanSlot::default()));
        let log = HttpLog::start(self.log_connection(), &parts, span.clone());
        let mut body = RequestBody::new(body, Arc::clone(&timers)).boxed();
        for bytes in report.as_ref().map(HttpReport::request_bytes).into_iter().chain(log.as_ref().map(HttpLog::request_bytes)) {
            body = CountedRequest { body, bytes }.boxed();
        }
        let mut req = Request::from_parts(parts, body);
        if let Some(log) = &log {
            req.extensions_mut().insert(log.routed());
        }
        if let Some(span) = span {
            req.extensions_mut().insert(span);
        }
        if let Some(tls) = &self.tls {
            // What route matching (`tls_context`) and RBAC read of the connection's TLS session.
            req.extensions_mut().insert(Arc::clone(tls));
        }
        let response = tokio::select! {
            answered = self.respond(req, &timers) => answered?,
            expired = timers.expired() => self.timed_out(expired, grpc, version, &timers),
        };
        let (head, body) = response.into_parts();
        let observers: Vec<Box<dyn StreamEnd>> = report.map(|r| r.finish(&head)).into_iter().chain(log.map(|l| l.finish(&head))).collect();
        let response = crate::proxy::body::observed(Response::from_parts(head, body), observers);
        Ok(response.map(|body| ResponseBody::new(body, Some(timers))))
    }

    /// The connection as its requests' access logs show it.
    fn log_connection(&self) -> HttpConnection<'_> {
        HttpConnection { logs: &self.hcm.access_log, pod: self.telemetry.pod.clone(), peer: self.peer, local: self.local, server_name: self.server_name.clone(), tls: self.tls.clone() }
    }

    /// The connection manager's `istio.stats` filter, as this request's stream uses it, with the snapshot
    /// it names clusters from.
    fn istio_stats(&self) -> Option<(StatsFilter, Arc<Snapshot>)> {
        let config = self.hcm.http_filters.iter().find_map(|f| match &f.kind {
            HttpFilterKind::IstioStats(config) => Some(Arc::clone(config)),
            _ => None,
        })?;
        let snapshot = self.current().0.snapshot;
        let filter = StatsFilter { config, reporter: Reporter::of(self.telemetry.direction), metrics: Arc::clone(&self.telemetry.metrics), local: Arc::clone(&snapshot.local) };
        Some((filter, snapshot))
    }

    /// Envoy's local reply to a stream whose timer expired before its response started.
    fn timed_out(&self, expired: Expired, grpc: bool, version: Version, timers: &StreamTimers) -> Response<Body> {
        let complete = timers.request_complete();
        let mut reply = match expired {
            Expired::Duration if grpc => local_reply::grpc_code(4, "downstream duration timeout"),
            Expired::Request => local_reply::reply(StatusCode::REQUEST_TIMEOUT, Some("request timeout"), grpc),
            // Envoy's code for a timer that fires before the response: 408 while the request is still
            // arriving, 504 once it is complete.
            Expired::Duration | Expired::Idle => {
                let status = if complete { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::REQUEST_TIMEOUT };
                let text = if expired == Expired::Idle { "stream timeout" } else { "downstream duration timeout" };
                local_reply::reply(status, Some(text), grpc)
            }
        };
        // The rest of an HTTP/1.1 request will not be read: its connection cannot carry another.
        if !complete && version != Version::HTTP_2 {
            reply.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.finish(reply.headers_mut());
        reply
    }

    /// Envoy's overload reply to a request beyond the pod's `max_requests` in flight.
    fn overloaded(&self) -> Response<Body> {
        let mut reply = local_reply::reply(StatusCode::SERVICE_UNAVAILABLE, Some("envoy overloaded"), false);
        self.finish(reply.headers_mut());
        reply
    }

    /// The codec's answer to a refused request head, after which the connection closes.
    fn refuse(&self, error: CodecError) -> Response<Body> {
        let mut reply = local_reply::reply(error.status(), Some(error.text()), false);
        reply.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        self.finish(reply.headers_mut());
        reply
    }

    async fn respond(&self, req: Request<Body>, timers: &StreamTimers) -> Result<Response<Body>, Reset> {
        let (upstream, routes) = self.current();
        let protocol = route::protocol_name(req.version());
        let (mut parts, body) = req.into_parts();
        let mut response = match self.check(&parts)? {
            Some(reply) => reply,
            None => match self.normalize(&mut parts) {
                Some(reply) => reply,
                None => {
                    let remote = self.mutate_request(&mut parts.headers);
                    let traced = self.hcm.tracing.as_ref().map(|t| tracer::decide(t, self.hcm.request_id, &mut parts.headers));
                    // Envoy answers a forced trace with its request id.
                    let forced = parts.headers.contains_key("x-envoy-force-trace");
                    if let Some(routed) = parts.extensions.get::<Arc<ForwardedRequest>>() {
                        routed.set(RequestHead::of(&parts), remote);
                    }
                    let request_id = parts.headers.get("x-request-id").cloned();
                    let connect = parts.method == hyper::Method::CONNECT;
                    let downstream = Downstream { remote, local: self.local, protocol };
                    // The request as local reply mappers see it.
                    let request = self.hcm.local_reply.as_ref().map(|_| (parts.headers.clone(), parts.uri.clone(), parts.method.clone()));
                    let mut response = self.route(parts, body, routes.as_deref(), (&downstream, &upstream), timers, traced).await;
                    if let Some(id) = request_id.filter(|_| self.hcm.always_set_request_id_in_response || forced) {
                        response.headers_mut().insert("x-request-id", id);
                    }
                    // A refused CONNECT ends its HTTP/1.1 connection: what follows was meant for the tunnel.
                    if connect && !response.status().is_success() && protocol != "HTTP/2" {
                        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    if let (Some(config), Some((headers, uri, method))) = (&self.hcm.local_reply, &request) {
                        let path = uri.path_and_query().map_or("/", |p| p.as_str());
                        let authority = uri.authority().map(|a| a.as_str()).or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok())).unwrap_or_default();
                        let vars = Vars { downstream: &downstream, request: headers, path, method: method.as_str(), authority, upstream: None, response: None, local_reply_body: None };
                        local_reply::map(config, &mut response, &vars);
                    }
                    response
                }
            },
        };
        self.finish(response.headers_mut());
        Ok(response)
    }

    /// What Envoy's codecs refuse before routing: oversized headers (431, or a stream reset in HTTP/2),
    /// HTTP/1.0 unless accepted (426), and malformed HTTP/1.1 requests (400).
    fn check(&self, parts: &Parts) -> Result<Option<Response<Body>>, Reset> {
        let grpc = route::is_grpc(&parts.headers);
        let size: usize = parts.headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum::<usize>()
            + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
        if size > self.hcm.max_request_headers_bytes || parts.headers.len() > self.hcm.max_headers_count {
            if parts.version == Version::HTTP_2 {
                return Err(Reset);
            }
            return Ok(Some(local_reply::reply(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, Some("Request Header Fields Too Large"), grpc)));
        }
        // Refused by the codec, as Envoy's: HTTP/2 resets the stream, HTTP/1 answers and closes.
        if parts.headers.keys().any(|k| k.as_str().contains('_')) && self.hcm.headers_with_underscores == UnderscoreHeaders::RejectRequest {
            if parts.version == Version::HTTP_2 {
                return Err(Reset);
            }
            let mut reply = local_reply::reply(StatusCode::BAD_REQUEST, Some("Bad Request"), grpc);
            reply.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(Some(reply));
        }
        if parts.version == Version::HTTP_2 {
            return Ok(None);
        }
        if parts.version == Version::HTTP_10 && !self.hcm.accept_http_10 {
            let mut reply = local_reply::reply(StatusCode::UPGRADE_REQUIRED, Some("Upgrade Required"), grpc);
            reply.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(Some(reply));
        }
        let method_ok = parts.method.as_str().bytes().all(|b| !b.is_ascii_lowercase());
        let target_ok = match (parts.uri.scheme(), parts.uri.authority()) {
            (Some(_), Some(_)) => true,
            // Authority-form belongs to CONNECT only.
            (None, Some(_)) => parts.method == hyper::Method::CONNECT,
            _ => parts.uri.path().starts_with('/') || parts.uri == "*",
        };
        let framing_ok = !(parts.headers.contains_key(header::CONTENT_LENGTH) && parts.headers.contains_key(header::TRANSFER_ENCODING));
        if !method_ok || !target_ok || !framing_ok {
            return Ok(Some(local_reply::reply(StatusCode::BAD_REQUEST, Some("Bad Request"), grpc)));
        }
        if route::authority(parts).is_none_or(str::is_empty) && parts.version == Version::HTTP_11 {
            return Ok(Some(local_reply::reply(StatusCode::BAD_REQUEST, None, grpc)));
        }
        Ok(None)
    }

    /// Path normalisation, escaped slashes and host rewriting for matching, before routing and before any
    /// filter reads them. Returns the reply when the path's escaped slashes are refused or redirected.
    fn normalize(&self, parts: &mut Parts) -> Option<Response<Body>> {
        let hcm = &self.hcm;
        let untouched = !hcm.normalize_path
            && !hcm.merge_slashes
            && hcm.escaped_slashes == EscapedSlashes::KeepUnchanged
            && hcm.host_port == HostPort::Keep
            && !hcm.strip_trailing_host_dot;
        if untouched {
            return None;
        }
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let mut new_path = path.to_string();
        if self.hcm.normalize_path {
            new_path = normalize_path(&new_path);
        }
        if self.hcm.merge_slashes {
            new_path = merge_slashes(&new_path);
        }
        let escaped = new_path.as_bytes().windows(3).any(|w| w[0] == b'%' && (w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f') || w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c')));
        let mut redirect = false;
        if escaped {
            match self.hcm.escaped_slashes {
                EscapedSlashes::KeepUnchanged => {}
                EscapedSlashes::RejectRequest => return Some(local_reply::reply(StatusCode::BAD_REQUEST, None, route::is_grpc(&parts.headers))),
                EscapedSlashes::UnescapeAndForward | EscapedSlashes::UnescapeAndRedirect => {
                    new_path = unescape_slashes(&new_path);
                    redirect = self.hcm.escaped_slashes == EscapedSlashes::UnescapeAndRedirect;
                }
            }
        }
        if new_path != path {
            let rebuilt = match query {
                Some(q) => format!("{new_path}?{q}"),
                None => new_path,
            };
            if redirect {
                let mut reply = local_reply::reply(StatusCode::TEMPORARY_REDIRECT, None, false);
                if let Ok(v) = HeaderValue::from_str(&rebuilt) {
                    reply.headers_mut().insert(header::LOCATION, v);
                }
                return Some(reply);
            }
            set_path(&mut parts.uri, &rebuilt);
        }
        let authority = route::authority(parts).map(str::to_string)?;
        let (mut host, port) = route::split_port(&authority);
        if self.hcm.strip_trailing_host_dot {
            host = host.strip_suffix('.').unwrap_or(host);
        }
        let strip = match self.hcm.host_port {
            HostPort::Keep => false,
            HostPort::StripAny => port.is_some(),
            HostPort::StripMatching => port.and_then(|p| p.parse::<u16>().ok()) == Some(self.local.port()),
        };
        let rebuilt = match port {
            Some(p) if !strip => format!("{host}:{p}"),
            _ => host.to_string(),
        };
        if rebuilt != authority {
            set_authority(parts, &rebuilt);
        }
        None
    }

    /// The downstream's scheme, as `x-forwarded-proto` tells it.
    fn scheme(&self) -> HeaderValue {
        HeaderValue::from_static(if self.tls.is_some() { "https" } else { "http" })
    }

    /// `x-forwarded-for`, `x-forwarded-proto`, internal and edge requests, `x-request-id` and `via`, as
    /// Envoy's connection manager sets them. Returns the client's address (the trusted XFF entry or the
    /// peer).
    fn mutate_request(&self, headers: &mut HeaderMap) -> SocketAddr {
        for h in ["x-envoy-internal", "keep-alive", "proxy-connection"] {
            headers.remove(h);
        }
        if self.hcm.headers_with_underscores == UnderscoreHeaders::DropHeader {
            let underscored: Vec<_> = headers.keys().filter(|k| k.as_str().contains('_')).cloned().collect();
            for k in underscored {
                headers.remove(k);
            }
        }
        let hops = self.hcm.xff_num_trusted_hops as usize;
        let xff: Vec<String> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        let from_xff = |skip: usize| xff.len().checked_sub(skip + 1).and_then(|i| xff[i].parse::<IpAddr>().ok());
        let (remote, single) = if self.hcm.use_remote_address {
            let single = xff.is_empty();
            let trusted = if hops > 0 { from_xff(hops - 1) } else { None };
            let appended = if self.peer.ip().is_loopback() { self.local.ip() } else { self.peer.ip() }.to_canonical();
            let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(existing) => format!("{existing},{appended}"),
                None => appended.to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert("x-forwarded-for", v);
            }
            headers.insert("x-forwarded-proto", self.scheme());
            (trusted.or(Some(self.peer.ip())), single)
        } else {
            (from_xff(hops), xff.len() == 1)
        };
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert("x-forwarded-proto", self.scheme());
        }
        client_cert::mutate(headers, &self.hcm.client_cert, self.tls.as_deref());
        let internal = single && remote.is_some_and(|ip| self.hcm.internal_ranges.iter().any(|r| r.contains(ip)));
        let edge = !internal && self.hcm.use_remote_address;
        if internal {
            headers.insert("x-envoy-internal", HeaderValue::from_static("true"));
        } else {
            if edge {
                for h in EDGE_ONLY_HEADERS {
                    headers.remove(h);
                }
            }
            for h in INTERNAL_ONLY_HEADERS {
                headers.remove(h);
            }
        }
        if let Some(via) = &self.hcm.via {
            append_via(headers, via);
        }
        let remote = remote.unwrap_or(self.peer.ip());
        if edge {
            if let Ok(v) = HeaderValue::from_str(&remote.to_canonical().to_string()) {
                headers.insert("x-envoy-external-address", v);
            }
        }
        let replace = edge && !self.hcm.preserve_external_request_id;
        if self.hcm.generate_request_id && (replace || !headers.contains_key("x-request-id")) {
            if let Ok(v) = HeaderValue::from_str(&request_id()) {
                headers.insert("x-request-id", v);
            }
        }
        SocketAddr::new(remote.to_canonical(), if remote == self.peer.ip() { self.peer.port() } else { 0 })
    }

    /// Routes the request, following upstream redirects the matched route's `internal_redirect_policy`
    /// allows (the followed request has no body and carries `x-envoy-original-url`). `traced`: the trace
    /// decision, when the connection manager traces; the span starts with the first route chosen.
    async fn route(
        &self,
        mut parts: Parts,
        body: Body,
        routes: Option<&RouteConfiguration>,
        (downstream, upstream): (&Downstream, &Upstream),
        timers: &StreamTimers,
        mut traced: Option<bool>,
    ) -> Response<Body> {
        let mut body = Some(body);
        let mut followed = 0;
        let egress = self.telemetry.direction == TrafficDirection::Outbound;
        let span = parts.extensions.get::<Arc<SpanSlot>>().cloned();
        let mut operation = None;
        loop {
            let host = route::authority(&parts).unwrap_or_default().to_string();
            let selected = routes.and_then(|rc| Some((rc, route::select(rc, &host, &parts)?)));
            if let (Some(traced), Some(tracing)) = (traced.take(), &self.hcm.tracing) {
                let op = tracer::decorate(egress, selected.and_then(|(_, (_, r))| r.decorator.as_ref()), &mut parts.headers);
                if let Some(slot) = &span {
                    slot.start(tracing, (&parts.headers, &host), traced, egress, &op, upstream);
                }
                operation = Some(op);
            }
            if let Some(Action::Route(a)) = selected.map(|(_, (_, r))| &r.action) {
                timers.route(a.idle_timeout, a.stream_duration.as_ref(), self.hcm.max_stream_duration, &mut parts.headers);
            }
            let policy = match selected.map(|(_, (_, r))| &r.action) {
                Some(Action::Route(a)) => a.internal_redirect.as_ref().filter(|p| followed < p.max_internal_redirects),
                _ => None,
            };
            let saved = policy.map(|_| (parts.method.clone(), parts.uri.clone(), parts.version, parts.headers.clone()));
            let body = body.take().unwrap_or_else(body::empty);
            let response = self.filters_and_route(parts, body, selected, &host, downstream, upstream).await;
            let next = policy.zip(saved).and_then(|(p, saved)| internal_redirect(p, &response, saved));
            match next {
                Some(redirected) => {
                    parts = redirected;
                    followed += 1;
                }
                None => {
                    let mut response = response;
                    if let Some(op) = &operation {
                        tracer::decorate_response(egress, op, response.headers_mut(), span.as_deref());
                    }
                    return response;
                }
            }
        }
    }

    /// The HTTP filters, then the action of the route `selected` for the request; the response goes back
    /// through the filters that keep state for it (peer metadata).
    async fn filters_and_route(
        &self,
        mut parts: Parts,
        body: Body,
        selected: Option<Selected<'_>>,
        host: &str,
        downstream: &Downstream,
        upstream: &Upstream,
    ) -> Response<Body> {
        let grpc = route::is_grpc(&parts.headers);
        let overrides = |name: &str| {
            let (rc, (vh, r)) = selected?;
            r.per_filter.get(name).or_else(|| vh.per_filter.get(name)).or_else(|| rc.per_filter.get(name))
        };
        // Headers the filters add to the response (CORS).
        let mut added = HeaderMap::new();
        let mut exchanges = Vec::new();
        let mut routed = None;
        // Istio's metrics, access logs and spans name the routed cluster even when a filter answers before the
        // router.
        let observed = self.hcm.reports_spans() || !self.hcm.access_log.is_empty() || self.hcm.http_filters.iter().any(|f| matches!(f.kind, HttpFilterKind::IstioStats(_)));
        // The RBAC filters' shadow results, for the spans' custom tags.
        let mut shadow = None;
        if observed {
            routed = Some(routed_cluster(&mut parts, selected, upstream));
        }
        let mut response = 'filters: {
            for filter in &self.hcm.http_filters {
                let chosen = overrides(&filter.name);
                let reply = match (&filter.kind, chosen) {
                    (_, Some(FilterOverride::Disabled)) => None,
                    (HttpFilterKind::Fault(_), Some(FilterOverride::Fault(f))) | (HttpFilterKind::Fault(f), _) => fault::decode(f, &parts).await,
                    (HttpFilterKind::Cors, Some(FilterOverride::Cors(policy))) => match cors::decode(policy, &parts) {
                        Cors::Pass => None,
                        Cors::Preflight(reply) => Some(reply),
                        Cors::Allowed(headers) => {
                            added.extend(headers);
                            None
                        }
                    },
                    (HttpFilterKind::Cors, _) => None,
                    (HttpFilterKind::LocalRateLimit(_), Some(FilterOverride::LocalRateLimit(l))) | (HttpFilterKind::LocalRateLimit(l), _) => {
                        local_ratelimit::decode(l, grpc, &Vars::of(&parts, downstream))
                    }
                    (HttpFilterKind::Rbac(filter), chosen) => {
                        let route_engines = match chosen {
                            Some(FilterOverride::Rbac(engines)) => Some(&**engines),
                            _ => None,
                        };
                        let (reply, metadata) = rbac::decode(filter, route_engines, &self.facts(&parts, downstream), grpc);
                        shadow = metadata.or(shadow);
                        reply
                    }
                    (HttpFilterKind::Alpn(overrides), _) => {
                        parts.extensions.insert(AlpnFilter(Arc::clone(overrides)));
                        None
                    }
                    (HttpFilterKind::GrpcStats(_), _) => None,
                    (HttpFilterKind::PeerMetadata(config), _) => {
                        let (routed, _) = routed.get_or_insert_with(|| routed_cluster(&mut parts, selected, upstream));
                        exchanges.push(peer_metadata::decode(config, &upstream.snapshot.local, *routed, &mut parts.headers));
                        None
                    }
                    // Recorded when the stream ends (`HttpReport`).
                    (HttpFilterKind::IstioStats(_), _) => None,
                    (HttpFilterKind::Router, _) => break,
                };
                if let Some(reply) = reply {
                    break 'filters reply;
                }
            }
            let mut response = match selected {
                None => local_reply::flagged("NR", StatusCode::NOT_FOUND, None, grpc),
                Some((config, (virtual_host, matched))) => self.answer(parts, body, config, virtual_host, matched, host, downstream, upstream).await,
            };
            response.headers_mut().extend(added);
            response
        };
        for exchange in exchanges.iter_mut().rev() {
            peer_metadata::encode(exchange, response.headers_mut());
        }
        if observed {
            let facts = StreamFacts {
                downstream_peer: exchanges.iter_mut().find_map(|e| e.downstream_peer.take()),
                upstream_peer: exchanges.iter_mut().find_map(|e| e.upstream_peer.take()),
                route: selected.map(|(_, (_, r))| r.name.clone()).filter(|n| !n.is_empty()),
                cluster: routed.and_then(|(_, name)| name),
            };
            response.extensions_mut().insert(facts);
        }
        if let Some(shadow) = shadow {
            response.extensions_mut().insert(shadow);
        }
        response
    }

    /// What RBAC rules see of this request and its connection.
    fn facts<'a>(&'a self, parts: &'a Parts, downstream: &Downstream) -> Facts<'a> {
        Facts {
            local: self.local,
            peer: self.peer,
            remote: downstream.remote.ip(),
            server_name: self.server_name.as_deref(),
            tls: self.tls.as_deref(),
            request: Some(parts),
        }
    }

    /// The route's action: the router filter, a direct response or a redirect.
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        parts: Parts,
        body: Body,
        config: &RouteConfiguration,
        virtual_host: &VirtualHost,
        matched: &Route,
        host: &str,
        downstream: &Downstream,
        upstream: &Upstream,
    ) -> Response<Body> {
        let mut response = match &matched.action {
            Action::Route(action) => {
                let upgrade = if parts.method == hyper::Method::CONNECT { Some("connect".to_string()) } else { upgrade_type(&parts) };
                let allowed = |kind: &String| match action.upgrades.iter().find(|(k, _)| k == kind) {
                    Some((_, enabled)) => *enabled,
                    None => self.hcm.upgrades.contains(kind),
                };
                // Envoy refuses upgrades neither the route nor the connection manager allows.
                if upgrade.as_ref().is_some_and(|kind| !allowed(kind)) {
                    return local_reply::reply(StatusCode::FORBIDDEN, None, false);
                }
                let matched = Matched { config, virtual_host, route: matched, action };
                if parts.method == hyper::Method::CONNECT && action.terminate_connect {
                    return router::tunnel(parts, matched, upstream).await;
                }
                return router::forward(parts, body, matched, downstream, upstream, upgrade.is_some()).await;
            }
            Action::DirectResponse { status, body } => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                let mut reply = local_reply::reply(status, body.as_deref(), route::is_grpc(&parts.headers));
                reply.extensions_mut().insert(local_reply::ResponseDetails("direct_response".into()));
                // Envoy points a 201 or a redirect at the request's own URL when the route names no other.
                if status == StatusCode::CREATED || status.is_redirection() {
                    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    if let Ok(v) = HeaderValue::from_str(&format!("http://{host}{target}")) {
                        reply.headers_mut().insert(header::LOCATION, v);
                    }
                }
                reply
            }
            Action::Redirect(redirect) => {
                let scheme = parts.headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("http");
                let location = route::redirect_location(redirect, &matched.matcher.path, &parts, scheme);
                let mut reply = local_reply::reply(StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY), None, false);
                reply.extensions_mut().insert(local_reply::ResponseDetails("direct_response".into()));
                if let Ok(v) = HeaderValue::from_str(&location) {
                    reply.headers_mut().insert(header::LOCATION, v);
                }
                reply
            }
        };
        let returned = response.headers().clone();
        let vars = Vars { response: Some((response.status().as_u16(), &returned)), ..Vars::of(&parts, downstream) };
        let mut levels = [&matched.headers, &virtual_host.headers, &config.headers];
        if config.most_specific_header_mutations_wins {
            levels.reverse();
        }
        for ops in levels {
            route::apply_response(ops, response.headers_mut(), &vars);
        }
        response
    }

    /// The response headers the connection manager owns: `server` and `via`.
    fn finish(&self, headers: &mut HeaderMap) {
        let server = HeaderValue::from_str(&self.hcm.server_name).unwrap_or(HeaderValue::from_static("envoy"));
        match self.hcm.server_header {
            ServerHeader::Overwrite => {
                headers.insert(header::SERVER, server);
            }
            ServerHeader::AppendIfAbsent => {
                headers.entry(header::SERVER).or_insert(server);
            }
            ServerHeader::PassThrough => {}
        }
        if let Some(via) = &self.hcm.via {
            append_via(headers, via);
        }
    }
}

/// The cluster the selected route sends the request to (with its name), chosen now and kept in the request
/// for the router (so a weighted choice is made once).
fn routed_cluster(parts: &mut Parts, selected: Option<Selected<'_>>, upstream: &Upstream) -> (Routed, Option<String>) {
    let Some((_, (_, Route { action: Action::Route(action), .. }))) = selected else { return (Routed::default(), None) };
    let chosen = router::route_cluster(action, &parts.headers);
    let routed = Routed::to(&chosen.name, upstream.snapshot.cluster(&chosen.name).map(|c| c.config));
    let name = chosen.name.clone();
    parts.extensions.insert(chosen);
    (routed, Some(name))
}

fn append_via(headers: &mut HeaderMap, via: &str) {
    let value = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {via}"),
        None => via.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(header::VIA, v);
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`connection: upgrade` with `upgrade: X`), lowercase.
fn upgrade_type(parts: &Parts) -> Option<String> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let connection = parts.headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let asks = connection.map(str::trim).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let kind = parts.headers.get(header::UPGRADE)?.to_str().ok()?.trim().to_ascii_lowercase();
    (asks && !kind.is_empty()).then_some(kind)
}

/// The request to send instead of passing `response` on, when it is a redirect the policy follows: an
/// absolute `http` URL (or any scheme with `allow_cross_scheme_redirect`), one of the policy's codes.
fn internal_redirect(policy: &InternalRedirectPolicy, response: &Response<Body>, saved: (hyper::Method, Uri, Version, HeaderMap)) -> Option<Parts> {
    if local_reply::is_local(response) || !policy.redirect_response_codes.contains(&response.status().as_u16()) {
        return None;
    }
    let location: Uri = response.headers().get(header::LOCATION)?.to_str().ok()?.parse().ok()?;
    let (scheme, authority) = (location.scheme_str()?, location.authority()?.as_str().to_string());
    if scheme != "http" && !policy.allow_cross_scheme_redirect {
        return None;
    }
    let (method, uri, version, mut headers) = saved;
    let original_host = uri.authority().map(|a| a.as_str().to_string()).or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))?;
    let original = format!("http://{original_host}{}", uri.path_and_query().map_or("/", |p| p.as_str()));
    if let Ok(v) = HeaderValue::from_str(&original) {
        headers.insert("x-envoy-original-url", v);
    }
    headers.remove(header::CONTENT_LENGTH);
    let mut request = hyper::Request::new(());
    *request.method_mut() = method;
    *request.version_mut() = version;
    *request.uri_mut() = match version {
        Version::HTTP_2 => location.clone(),
        _ => location.path_and_query().map_or("/", |p| p.as_str()).parse().ok()?,
    };
    if let Ok(v) = HeaderValue::from_str(&authority) {
        headers.insert(header::HOST, v);
    }
    *request.headers_mut() = headers;
    Some(request.into_parts().0)
}

/// `%2F`, `%2f` to `/` and `%5C`, `%5c` to `\\`.
fn unescape_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3).map(str::to_ascii_lowercase);
        match code.as_deref() {
            Some("2f") => out.push('/'),
            Some("5c") => out.push('\\'),
            _ => {
                out.push('%');
                rest = &rest[i + 1..];
                continue;
            }
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    out
}

fn set_path(uri: &mut Uri, path_and_query: &str) {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(new) = Uri::from_parts(parts) {
        *uri = new;
    }
}

fn set_authority(parts: &mut Parts, host: &str) {
    if parts.uri.authority().is_some() {
        let mut uri = parts.uri.clone().into_parts();
        uri.authority = host.parse().ok();
        if let Ok(new) = Uri::from_parts(uri) {
            parts.uri = new;
        }
    }
    if parts.headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(host) {
            parts.headers.insert(header::HOST, v);
        }
    }
}

/// RFC 3986 normalisation as Envoy's `normalize_path`: backslashes become slashes, percent-encoded unreserved
/// characters are decoded, and `.` and `..` segments are resolved.
pub fn normalize_path(path: &str) -> String {
    let decoded = decode_unreserved(&path.replace('\\', "/"));
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = decoded.split('/').collect();
    let last = parts.len().saturating_sub(1);
    for (i, segment) in parts.iter().enumerate().skip(1) {
        match *segment {
            "." => {
                if i == last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if i == last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                } else {
                    out.extend_from_slice(&bytes[i..i + 3]);
                }
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// A random UUID (version 4 layout), like Envoy's generated request ids.
fn request_id() -> String {
    use crate::random::random;
    let (a, b) = (random() as u64, random() as u64);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_as_envoy_does() {
        assert_eq!(normalize_path("/a/./b/../c"), "/a/c");
        assert_eq!(normalize_path("/a/%62/%2F/.."), "/a/b/");
        assert_eq!(normalize_path("/../x"), "/x");
        assert_eq!(normalize_path("/a\\b"), "/a/b");
        assert_eq!(merge_slashes("//a///b/"), "/a/b/");
    }
}

/// The connection manager and router in memory: the downstream connection is a tokio duplex stream, the
/// upstream an HTTP server on loopback; no root, no namespaces.
#[cfg(test)]
mod in_memory {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use serde_json::json;

    use super::*;
    use crate::config::store::Resource;
    use crate::config::tree::Obj;
    use crate::proxy::pod_share::PodLimits;
    use crate::proxy::socket::SocketFactory;
    use crate::proxy::upstream::pool::Pools;

    /// An upstream that answers `path=<path> n=<request number>`, 503 for the first `fail_first` requests;
    /// counts the connections it accepted.
    async fn upstream(fail_first: usize, http2: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, SeqCst);
                let requests = Arc::clone(&requests);
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = requests.fetch_add(1, SeqCst);
                    let status = if n < fail_first { 503 } else { 200 };
                    let text = format!("path={} n={n} version={:?}", req.uri().path(), req.version());
                    async move { Response::builder().status(status).body(Full::new(Bytes::from(text))) }
                });
                let io = TokioIo::new(stream);
                tokio::spawn(async move {
                    let _ = if http2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
                    } else {
                        hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
                    };
                });
            }
        });
        (addr, connections)
    }

    fn proxy(endpoint: SocketAddr, http2: bool, route: serde_json::Value) -> HttpContext {
        proxy_with(endpoint, http2, route, json!({}))
    }

    /// A context whose connection manager has `extra` fields.
    fn cluster(name: &str, endpoint: SocketAddr, http2: bool) -> crate::config::cluster::Cluster {
        let mut cluster = json!({"name": name, "connect_timeout": "1s",
            "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": endpoint.port()}}}}]}]}});
        if http2 {
            cluster["http2_protocol_options"] = json!({});
        }
        crate::config::cluster::translate(Obj::new(&cluster, "c").unwrap()).unwrap()
    }

    fn proxy_with(endpoint: SocketAddr, http2: bool, route: serde_json::Value, extra: serde_json::Value) -> HttpContext {
        let cluster = cluster("web", endpoint, http2);
        let mut hcm = json!({"route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            "http_filters": [{"name": "router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]});
        if let (Some(hcm), Some(extra)) = (hcm.as_object_mut(), extra.as_object()) {
            hcm.extend(extra.clone());
        }
        let hcm = crate::config::http_connection_manager::translate(Obj::new(&hcm, "h").unwrap()).unwrap();
        let snapshot = Arc::new(Snapshot { clusters: Arc::new([Resource::fixed("web", cluster)].into_iter().collect()), ..Snapshot::default() });
        let (_, updates) = watch::channel(Some(Arc::clone(&snapshot)));
        let upstream = Upstream { snapshot, pools: Pools::new(SocketFactory::Host), original_dst: "127.0.0.1:1".parse().unwrap(), downstream_buffer_limit: crate::config::DEFAULT_BUFFER_LIMIT };
        HttpContext { hcm: Arc::new(hcm), updates, upstream, peer: "127.0.0.1:40000".parse().unwrap(), local: "127.0.0.1:10000".parse().unwrap(), load: PodLoad::new(PodLimits::default()), tls: None, server_name: None, telemetry: Default::default() }
    }

    /// Sends `paths` over one downstream connection (HTTP/2 prior knowledge when `h2`); returns status and
    /// body of each.
    async fn requests(context: HttpContext, h2: bool, paths: &[&str]) -> Vec<(u16, String)> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server, context));
        let io = TokioIo::new(client);
        let mut out = Vec::new();
        if h2 {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            for p in paths {
                let req = Request::builder().uri(format!("http://example.com{p}")).body(Full::new(Bytes::new())).unwrap();
                let r = sender.send_request(req).await.unwrap();
                out.push((r.status().as_u16(), String::from_utf8_lossy(&r.into_body().collect().await.unwrap().to_bytes()).into_owned()));
            }
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            for p in paths {
                let req = Request::builder().uri(*p).header("host", "example.com").body(Full::new(Bytes::new())).unwrap();
                let r = sender.send_request(req).await.unwrap();
                assert_eq!(r.headers()["server"], "envoy");
                out.push((r.status().as_u16(), String::from_utf8_lossy(&r.into_body().collect().await.unwrap().to_bytes()).into_owned()));
            }
        }
        out
    }

    /// The series of `metric` whose labels include every one of `labels`, with its value.
    fn series(metrics: &IstioMetrics, metric: &str, labels: &[&str]) -> Vec<String> {
        let text = crate::proxy::istio_metrics::render(&[(Vec::new(), metrics)]);
        text.lines().filter(|l| l.starts_with(&format!("{metric}{{")) && labels.iter().all(|want| l.contains(want))).map(str::to_string).collect()
    }

    #[tokio::test]
    async fn istio_stats_records_each_request_when_its_response_ends() {
        let (addr, _) = upstream(0, false).await;
        let stats = json!({"http_filters": [
            {"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}},
            {"name": "router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]});
        let context = proxy_with(addr, false, json!({"match": {"prefix": "/"}, "route": {"cluster": "web"}}), stats.clone());
        let metrics = Arc::clone(&context.telemetry.metrics);
        assert_eq!(requests(context, false, &["/a", "/b"]).await.len(), 2);
        let missing = proxy_with(addr, false, json!({"match": {"prefix": "/"}, "route": {"cluster": "gone"}}), stats);
        let missing_metrics = Arc::clone(&missing.telemetry.metrics);
        assert_eq!(requests(missing, false, &["/c"]).await[0].0, 503);
        let served = ["reporter=\"source\"", "destination_service=\"example.com\"", "request_protocol=\"http\"", "response_code=\"200\"", "response_flags=\"-\"", "connection_security_policy=\"unknown\""];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while series(&metrics, "istio_requests_total", &served).first().is_none_or(|l| !l.ends_with(" 2")) {
            assert!(std::time::Instant::now() < deadline, "two requests recorded: {:?}", series(&metrics, "istio_requests_total", &[]));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sizes = series(&metrics, "istio_response_bytes_count", &served);
        assert!(sizes.len() == 1 && sizes[0].ends_with(" 2"), "{sizes:?}");
        let durations = series(&metrics, "istio_request_duration_milliseconds_bucket", &["le=\"+Inf\""]);
        assert!(durations.len() == 1 && durations[0].ends_with(" 2"), "{durations:?}");
        while series(&missing_metrics, "istio_requests_total", &["response_code=\"503\"", "response_flags=\"NC\""]).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the unknown cluster is flagged NC: {:?}", series(&missing_metrics, "istio_requests_total", &[]));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_malformed_request_after_a_good_one_is_answered_in_order_then_the_connection_closes() {
        let (addr, _) = upstream(0, false).await;
        let context = proxy(addr, false, json!({"match": {"prefix": "/"}, "route": {"cluster": "web"}}));
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server, context));
        client.write_all(b"GET /first HTTP/1.1\r\nhost: example.com\r\n\r\nPOST / HTTP/1.1\r\nhost: example.com\r\ntransfer-encoding: gzip\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut answer)).await.unwrap().unwrap();
        let first = answer.find("path=/first n=0").expect("the good request is answered first");
        let refused = answer.find("HTTP/1.1 501 Not Implemented").expect("then the codec's refusal");
        assert!(first < refused, "{answer}");
        assert!(answer.ends_with("\r\n\r\nNot Implemented") && answer[refused..].contains("connection: close"), "{answer}");
    }

    #[tokio::test]
    async fn requests_beyond_the_pods_limit_get_envoys_overload_reply() {
        // An upstream that accepts and never answers keeps the first request in flight.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        });
        let mut context = proxy(addr, false, json!({"match": {"prefix": "/"}, "route": {"cluster": "web"}}));
        context.load = PodLoad::new(PodLimits { max_requests: 1, ..PodLimits::default() });
        let load = Arc::clone(&context.load);
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server, context));
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn);
        let get = || Request::builder().uri("http://example.com/").body(Full::new(Bytes::new())).unwrap();
        let first = tokio::spawn(sender.send_request(get()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while load.snapshot().requests == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the first request never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let refused = sender.send_request(get()).await.unwrap();
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.into_body().collect().await.unwrap().to_bytes(), "envoy overloaded");
        first.abort();
        let s = load.snapshot();
        assert_eq!((s.requests, s.requests_total, s.requests_refused), (1, 1, 1));
    }

    #[tokio::test]
    async fn http1_requests_reuse_one_upstream_connection() {
        let (addr, connections) = upstream(0, false).await;
        let context = proxy(addr, false, json!({"match": {"prefix": "/"}, "route": {"cluster": "web"}}));
        let answers = requests(context, false, &["/a", "/b", "/c"]).await;
        assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), [200, 200, 200]);
        assert!(answers[2].1.starts_with("path=/c n=2"), "{answers:?}");
        assert_eq!(connections.load(SeqCst), 1, "kept-alive upstream connection reused");
    }

    #[tokio::test]
    async fn http2_downstream_to_http2_cluster_multiplexes() {
        let (addr, connections) = upstream(0, true).await;
        let context = proxy(addr, true, json!({"match": {"prefix": "/"}, "route": {"cluster": "web", "prefix_rewrite": "/x/"}}));
        let answers = requests(context, true, &["/a", "/b"]).await;
        assert_eq!(answers[1], (200, "path=/x/b n=1 version=HTTP/2.0".to_string()));
        assert_eq!(connections.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn retries_5xx_then_answers_and_routes_miss_with_404() {
        let (addr, _) = upstream(2, false).await;
        let route = json!({"match": {"prefix": "/r"}, "route": {"cluster": "web", "retry_policy": {"retry_on": "5xx", "num_retries": 2}}});
        let answers = requests(proxy(addr, false, route), false, &["/r", "/other"]).await;
        assert_eq!(answers[0].0, 200, "{answers:?}");
        assert!(answers[0].1.contains("n=2"), "third attempt answered: {answers:?}");
        assert_eq!(answers[1], (404, String::new()));
    }

    /// An upstream that switches to the WebSocket protocol and then echoes bytes.
    async fn websocket_upstream() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                        head.push(byte[0]);
                    }
                    let _ = stream.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n").await;
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn upgrade(context: HttpContext) -> Result<String, u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server, context));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        let req = Request::builder().uri("/chat").header("host", "example.com").header("connection", "upgrade").header("upgrade", "websocket");
        let response = sender.send_request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(response.status().as_u16());
        }
        let mut io = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
        io.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        io.read_exact(&mut back).await.unwrap();
        Ok(String::from_utf8_lossy(&back).into_owned())
    }

    #[tokio::test]
    async fn websocket_upgrades_join_the_connections_when_allowed() {
        let addr = websocket_upstream().await;
        let route = json!({"match": {"prefix": "/"}, "route": {"cluster": "web"}});
        let allowed = proxy_with(addr, false, route.clone(), json!({"upgrade_configs": [{"upgrade_type": "websocket"}]}));
        assert_eq!(upgrade(allowed).await, Ok("ping".to_string()), "bytes flow both ways after the 101");
        assert_eq!(upgrade(proxy(addr, false, route)).await, Err(403), "not configured: refused as Envoy refuses it");
        let disabled = json!({"match": {"prefix": "/"}, "route": {"cluster": "web", "upgrade_configs": [{"upgrade_type": "websocket", "enabled": false}]}});
        let context = proxy_with(addr, false, disabled, json!({"upgrade_configs": [{"upgrade_type": "websocket"}]}));
        assert_eq!(upgrade(context).await, Err(403), "the route disables it");
    }

    #[tokio::test]
    async fn mirrored_requests_reach_the_shadow_cluster_and_answers_come_from_the_route() {
        let (web, _) = upstream(0, false).await;
        let (shadow, shadow_connections) = upstream(0, false).await;
        let route = json!({"match": {"prefix": "/"}, "route": {"cluster": "web", "request_mirror_policies": [{"cluster": "shadow"}]}});
        let mut context = proxy(web, false, route);
        let clusters = [Resource::fixed("web", cluster("web", web, false)), Resource::fixed("shadow", cluster("shadow", shadow, false))];
        let snapshot = Arc::new(Snapshot { clusters: Arc::new(clusters.into_iter().collect()), ..Snapshot::default() });
        context.upstream.snapshot = Arc::clone(&snapshot);
        context.updates = watch::channel(Some(snapshot)).1;
        let answers = requests(context, false, &["/m"]).await;
        assert!(answers[0].1.starts_with("path=/m n=0"), "{answers:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while shadow_connections.load(SeqCst) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(shadow_connections.load(SeqCst), 1, "the mirror cluster got its copy");
    }

    #[tokio::test]
    async fn connections_carry_at_most_max_requests_per_connection() {
        let (addr, connections) = upstream(0, false).await;
        let mut context = proxy(addr, false, json!({"match": {"prefix": "/"}, "route": {"cluster": "web"}}));
        let mut limited = cluster("web", addr, false);
        limited.max_requests_per_connection = Some(2);
        let snapshot = Arc::new(Snapshot { clusters: Arc::new([Resource::fixed("web", limited)].into_iter().collect()), ..Snapshot::default() });
        context.upstream.snapshot = Arc::clone(&snapshot);
        context.updates = watch::channel(Some(snapshot)).1;
        let answers = requests(context, false, &["/1", "/2", "/3", "/4", "/5"]).await;
        assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
        assert_eq!(connections.load(SeqCst), 3, "two requests per connection");
    }

    #[tokio::test]
    async fn connect_is_terminated_into_a_tunnel_to_the_route_cluster() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = crate::proxy::testing::echo_server().await;
        let route = json!({"match": {"connect_matcher": {}}, "route": {"cluster": "web", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}});
        let context = proxy_with(addr, false, route, json!({"upgrade_configs": [{"upgrade_type": "CONNECT"}]}));
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server, context));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        let req = Request::builder().method("CONNECT").uri("backend.example:443").header("host", "backend.example:443");
        let response = sender.send_request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut io = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
        io.write_all(b"through the tunnel").await.unwrap();
        let mut back = [0u8; 18];
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"through the tunnel");
    }

    #[tokio::test]
    async fn refused_upstream_is_envoys_503() {
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let answers = requests(proxy(dead, false, json!({"match": {"prefix": "/"}, "route": {"cluster": "web"}})), false, &["/"]).await;
        assert_eq!(answers[0].0, 503);
        assert_eq!(answers[0].1, "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure");
    }

    /// Istio's peer metadata filter in the connection manager: what the upstream app and the downstream
    /// client see of the `x-envoy-peer-metadata*` headers.
    mod peer_metadata_headers {
        use super::*;
        use crate::config::bootstrap::Node;
        use crate::config::workload_metadata::LocalWorkload;
        use hyper::header::HeaderName;

        const PEER: [&str; 2] = ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"];

        /// An app that answers which peer headers it got (`id=<id or -> metadata=<yes|no>`) and, as an
        /// istio-proxy in front of it would, adds peer headers to the response.
        async fn app() -> SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let id = req.headers().get(PEER[1]).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                        let text = format!("id={id} metadata={}", if req.headers().contains_key(PEER[0]) { "yes" } else { "no" });
                        Response::builder().header(PEER[0], "e30=").header(PEER[1], "far-side").body(Full::new(Bytes::from(text)))
                    });
                    tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
                }
            });
            addr
        }

        /// A connection manager with the peer metadata filter `config` of pod `client-1`, routing `/ext` to
        /// `PassthroughCluster` and everything else to `web` (both the app).
        fn context(app: SocketAddr, config: serde_json::Value) -> HttpContext {
            let routes = json!([{"match": {"prefix": "/ext"}, "route": {"cluster": "PassthroughCluster"}}, {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]);
            let mut filter = config;
            filter["@type"] = json!("type.googleapis.com/io.istio.http.peer_metadata.Config");
            let hcm = json!({"route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
                "http_filters": [{"name": "istio.metadata_exchange", "typed_config": filter},
                    {"name": "router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]});
            let hcm = crate::config::http_connection_manager::translate(Obj::new(&hcm, "h").unwrap()).unwrap();
            let clusters = [Resource::fixed("web", cluster("web", app, false)), Resource::fixed("PassthroughCluster", cluster("PassthroughCluster", app, false))];
            let local = LocalWorkload::from_node(&Node { id: "sidecar~10.0.0.1~client-1.shop~shop.svc.cluster.local".into(), cluster: String::new(), metadata: json!({"NAME": "client-1"}) });
            let snapshot = Arc::new(Snapshot { clusters: Arc::new(clusters.into_iter().collect()), local: Arc::new(local), ..Snapshot::default() });
            let (_, updates) = watch::channel(Some(Arc::clone(&snapshot)));
            let upstream = Upstream { snapshot, pools: Pools::new(SocketFactory::Host), original_dst: "127.0.0.1:1".parse().unwrap(), downstream_buffer_limit: crate::config::DEFAULT_BUFFER_LIMIT };
            HttpContext { hcm: Arc::new(hcm), updates, upstream, peer: "127.0.0.1:40000".parse().unwrap(), local: "127.0.0.1:10000".parse().unwrap(), load: PodLoad::new(PodLimits::default()), tls: None, server_name: None, telemetry: Default::default() }
        }

        /// One request with `headers`: (body, the peer headers of the response).
        async fn exchange(context: HttpContext, path: &str, headers: &[(&str, &str)]) -> (String, Vec<String>) {
            let (client, server) = tokio::io::duplex(64 * 1024);
            tokio::spawn(serve(server, context));
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.unwrap();
            tokio::spawn(conn);
            let mut req = Request::builder().uri(path).header("host", "example.com");
            for (k, v) in headers {
                req = req.header(HeaderName::from_bytes(k.as_bytes()).unwrap(), *v);
            }
            let r = sender.send_request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
            let returned = PEER.iter().filter_map(|h| r.headers().get(*h).map(|v| format!("{h}: {}", v.to_str().unwrap()))).collect();
            (String::from_utf8_lossy(&r.into_body().collect().await.unwrap().to_bytes()).into_owned(), returned)
        }

        #[tokio::test]
        async fn outbound_requests_carry_the_pods_headers_and_responses_lose_the_peers() {
            let outbound = json!({"upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}], "upstream_propagation": [{"istio_headers": {"skip_external_clusters": true}}]});
            let app = app().await;
            let (body, returned) = exchange(context(app, outbound.clone()), "/", &[]).await;
            assert_eq!(body, "id=sidecar~10.0.0.1~client-1.shop~shop.svc.cluster.local metadata=yes");
            assert!(returned.is_empty(), "the client never sees the far side's: {returned:?}");
            let (body, _) = exchange(context(app, outbound), "/ext", &[]).await;
            assert_eq!(body, "id=- metadata=no", "nothing leaks to PassthroughCluster");
        }

        #[tokio::test]
        async fn inbound_requests_lose_the_peers_headers_and_are_answered_with_the_pods() {
            let inbound = json!({"downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}], "downstream_propagation": [{"istio_headers": {}}]});
            let app = app().await;
            let sent = [("x-envoy-peer-metadata", "e30="), ("x-envoy-peer-metadata-id", "sidecar~10.0.0.9~caller")];
            let (body, returned) = exchange(context(app, inbound.clone()), "/", &sent).await;
            assert_eq!(body, "id=- metadata=no", "the app never sees them");
            let ours = LocalWorkload::from_node(&Node { id: String::new(), cluster: String::new(), metadata: json!({"NAME": "client-1"}) }).header;
            assert_eq!(returned, [format!("x-envoy-peer-metadata: {ours}"), "x-envoy-peer-metadata-id: sidecar~10.0.0.1~client-1.shop~shop.svc.cluster.local".to_string()]);
            // A request without them gets none of ours; the app's own pass (without upstream discovery they are
            // not the filter's business, as in istio-proxy).
            let (_, returned) = exchange(context(app, inbound), "/", &[]).await;
            assert_eq!(returned, ["x-envoy-peer-metadata: e30=", "x-envoy-peer-metadata-id: far-side"]);
        }
    }
}
