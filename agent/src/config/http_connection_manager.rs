//! `envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager`: the codec, where
//! routes come from, the request handling options Envoy applies before routing, and the HTTP filters.

use std::sync::Arc;
use std::time::Duration;

use super::alpn::{self, AlpnOverrides, ALPN_FILTER};
use super::http_filters::{self, Fault, GrpcStats, LocalRateLimit, PeerMetadata, CORS, FAULT, GRPC_STATS, LOCAL_RATELIMIT, PEER_METADATA};
use super::headers::{HeaderOps, Part};
use super::cidr::{self, CidrRange};
use super::matcher::HeaderMatcher;
use super::rbac::{self, HttpRbac, HTTP_RBAC};
use super::route::{self, RouteConfiguration};
use super::cluster::Http2Settings;
use super::tracing::Tracing;
use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HttpConnectionManager {
    pub codec: Codec,
    /// `access_log`: written when each request's stream ends.
    pub access_log: super::access_log::AccessLogs,
    pub routes: Routes,
    pub http_filters: Vec<HttpFilter>,
    /// Use the connection's peer as the client address (and append it to `x-forwarded-for`).
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    /// `server_name` (default `envoy`) and what to do with an upstream's `server` header.
    pub server_name: String,
    pub server_header: ServerHeader,
    pub via: Option<String>,
    /// `max_request_headers_kb` (default 60): larger request headers get 431.
    pub max_request_headers_bytes: usize,
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub host_port: HostPort,
    /// `common_http_protocol_options.max_headers_count` (default 100): more request headers get 431.
    pub max_headers_count: usize,
    /// `common_http_protocol_options.idle_timeout` (default 1 h; `None`: never): a connection without
    /// requests for this long is closed gracefully.
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_connection_duration`: connections are closed gracefully after it.
    pub max_connection_duration: Option<Duration>,
    pub headers_with_underscores: UnderscoreHeaders,
    /// `stream_idle_timeout` (default 5 min; `None`: never): a stream without activity (request or response
    /// data) this long ends: `stream timeout` (408 while the request is incomplete, else 504) before the
    /// response starts, a reset after.
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout`: a request not received completely this long after it started gets 408
    /// `request timeout` (unless its response has started).
    pub request_timeout: Option<Duration>,
    /// `request_headers_timeout`: an HTTP/1 connection whose request head does not arrive completely this
    /// long after it began is closed.
    pub request_headers_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_stream_duration`: a stream lasting longer ends (408 `downstream
    /// duration timeout` before the response starts, a reset after), unless its route says otherwise.
    pub max_stream_duration: Option<Duration>,
    /// `internal_address_config.cidr_ranges`: clients in these ranges are internal (none by default).
    pub internal_ranges: Vec<CidrRange>,
    pub always_set_request_id_in_response: bool,
    /// `generate_request_id` (default true): requests without an `x-request-id` get one.
    pub generate_request_id: bool,
    /// Keep an edge request's own `x-request-id` instead of replacing it.
    pub preserve_external_request_id: bool,
    /// `request_id_extension` (UUID, Envoy's default): how `x-request-id` is made and used.
    pub request_id: RequestId,
    pub strip_trailing_host_dot: bool,
    pub escaped_slashes: EscapedSlashes,
    /// `http_protocol_options.accept_http_10`: HTTP/1.0 requests are served (else 426).
    pub accept_http_10: bool,
    pub local_reply: Option<LocalReplyConfig>,
    /// `upgrade_configs`: the `upgrade` protocols (lowercase, e.g. `websocket`) proxied as upgrades.
    pub upgrades: Vec<String>,
    /// `forward_client_cert_details` and `set_current_client_cert_details`: what becomes of
    /// `x-forwarded-client-cert`.
    pub client_cert: ClientCert,
    /// `tracing`: which requests are traced and where their spans go; `None`: no tracing.
    pub tracing: Option<Arc<Tracing>>,
    /// `http2_protocol_options` of downstream HTTP/2 connections (istiod sets it on gRPC ports).
    pub http2: Http2Settings,
}

impl HttpConnectionManager {
    /// Whether requests get spans (a tracer is configured), beyond the trace decision.
    pub fn reports_spans(&self) -> bool {
        self.tracing.as_ref().is_some_and(|t| t.provider.is_some())
    }
}

/// `request_id_extension`: `envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig`, the only one (and the
/// default). Ids are random UUIDs, generated when a request has none and kept when it has one (see
/// `generate_request_id`, `preserve_external_request_id`). With `tracing`, the id carries the trace decision
/// and random sampling is decided from it, as Envoy's UUID extension does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RequestId {
    /// `pack_trace_reason` (default true): the trace decision is written into the id's variant nibble.
    pub pack_trace_reason: bool,
    /// `use_request_id_for_trace_sampling` (default true): sampling is decided from the id.
    pub use_request_id_for_trace_sampling: bool,
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId { pack_trace_reason: true, use_request_id_for_trace_sampling: true }
    }
}

const UUID_REQUEST_ID: &str = "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig";

fn request_id_extension(h: &mut Obj<'_>) -> Result<RequestId> {
    let Some(mut extension) = h.object("request_id_extension")? else { return Ok(RequestId::default()) };
    let mut out = RequestId::default();
    if let Some(mut typed) = extension.object("typed_config")? {
        super::expect_type(&mut typed, UUID_REQUEST_ID)?;
        out.pack_trace_reason = typed.bool_value("pack_trace_reason")?.unwrap_or(true);
        out.use_request_id_for_trace_sampling = typed.bool_value("use_request_id_for_trace_sampling")?.unwrap_or(true);
        typed.finish()?;
    }
    extension.finish()?;
    Ok(out)
}

/// `x-forwarded-client-cert` handling, as Envoy's connection manager does it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ClientCert {
    pub forward: ForwardClientCert,
    /// What of the client's certificate is added (AppendForward, SanitizeSet), in Envoy's order.
    pub details: Vec<CertDetail>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ForwardClientCert {
    /// Removed from every request.
    #[default]
    Sanitize,
    /// Forwarded unchanged on mutual TLS connections, removed otherwise.
    ForwardOnly,
    /// On mutual TLS connections this hop's details are appended, removed otherwise.
    AppendForward,
    /// On mutual TLS connections replaced by this hop's details, removed otherwise.
    SanitizeSet,
    /// Forwarded unchanged on every connection.
    AlwaysForwardOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CertDetail {
    Subject,
    Cert,
    Chain,
    Dns,
    Uri,
}

/// `local_reply_config`: how the proxy's own replies are rewritten and formatted.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LocalReplyConfig {
    pub mappers: Vec<ReplyMapper>,
    pub body_format: Option<BodyFormat>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplyMapper {
    pub filter: ReplyFilter,
    pub status: Option<u16>,
    pub body: Option<String>,
    pub body_format: Option<BodyFormat>,
    /// `headers_to_add`, as response header additions.
    pub headers: HeaderOps,
}

/// The access-log filters a mapper selects local replies with.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum ReplyFilter {
    Status { op: Comparison, value: u16 },
    Header(HeaderMatcher),
    And(Vec<ReplyFilter>),
    Or(Vec<ReplyFilter>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Comparison {
    Eq,
    Ge,
    Le,
}

impl ReplyFilter {
    pub fn matches(&self, status: u16, request: &hyper::HeaderMap) -> bool {
        match self {
            ReplyFilter::Status { op: Comparison::Eq, value } => status == *value,
            ReplyFilter::Status { op: Comparison::Ge, value } => status >= *value,
            ReplyFilter::Status { op: Comparison::Le, value } => status <= *value,
            ReplyFilter::Header(h) => h.matches_in(request),
            ReplyFilter::And(all) => all.iter().all(|f| f.matches(status, request)),
            ReplyFilter::Or(any) => any.iter().any(|f| f.matches(status, request)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum BodyFormat {
    Text { format: Vec<Part>, content_type: String },
    /// Fields sorted by key, as Envoy writes them.
    Json { fields: Vec<(String, Vec<Part>)>, content_type: String },
}

/// `headers_with_underscores_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UnderscoreHeaders {
    Allow,
    RejectRequest,
    DropHeader,
}

/// `path_with_escaped_slashes_action`: what `%2F`/`%5C` in a path do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EscapedSlashes {
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerHeader {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

/// Which port of the Host header is removed before virtual host matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPort {
    Keep,
    /// `strip_matching_host_port`: the port when it is the listener's.
    StripMatching,
    /// `strip_any_host_port`.
    StripAny,
}

/// Where an HTTP connection manager's routes come from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Routes {
    Inline(Arc<RouteConfiguration>),
    /// A RouteConfiguration by name over ADS (RDS).
    Rds(String),
}

/// One of the HTTP filters weft runs, in order; the router is always last.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HttpFilter {
    /// The name routes use in `typed_per_filter_config`.
    pub name: String,
    pub kind: HttpFilterKind,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpFilterKind {
    Fault(Arc<Fault>),
    /// The policies come from the routes' `typed_per_filter_config`.
    Cors,
    LocalRateLimit(Arc<LocalRateLimit>),
    Rbac(Arc<HttpRbac>),
    /// `istio.alpn`: the ALPN list the routed cluster's TLS connection offers, by upstream HTTP protocol.
    Alpn(Arc<AlpnOverrides>),
    /// `envoy.filters.http.grpc_stats`: telemetry only (gRPC message counts); it changes no traffic.
    GrpcStats(GrpcStats),
    /// Istio's peer metadata headers.
    PeerMetadata(Arc<PeerMetadata>),
    /// `istio.stats`: Istio's standard HTTP metrics, recorded when the stream ends.
    IstioStats(Arc<super::istio_stats::IstioStats>),
    Router,
}

const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";

pub fn translate(mut h: Obj<'_>) -> Result<HttpConnectionManager> {
    // Names the filters' counters (`http.<stat_prefix>.`), as in Envoy.
    let stat_prefix = format!("http.{}.", h.string("stat_prefix")?.unwrap_or_default());
    let codec = match h.string("codec_type")?.unwrap_or("AUTO") {
        "AUTO" => Codec::Auto,
        "HTTP1" => Codec::Http1,
        "HTTP2" => Codec::Http2,
        other => return Err(ConfigError::new(h.at("codec_type"), format!("{other} is not supported; use AUTO, HTTP1 or HTTP2"))),
    };
    let routes = routes(&mut h)?;
    let access_log = super::access_log::translate_all(&mut h)?;
    // weft answers `Expect: 100-continue` once the request body starts to go upstream, and forwards the header:
    // istiod's `proxy_100_continue: true` (the upstream decides), and close to Envoy's default.
    let _ = h.bool("proxy_100_continue")?;
    let tracing = h.object("tracing")?.map(super::tracing::translate).transpose()?.map(Arc::new);
    let http_filters = http_filters(&mut h, &stat_prefix)?;
    let use_remote_address = h.bool("use_remote_address")?.unwrap_or(false);
    let xff_num_trusted_hops = h.u64("xff_num_trusted_hops")?.unwrap_or(0).min(u64::from(u32::MAX)) as u32;
    let server_name = h.string("server_name")?.unwrap_or("envoy").to_string();
    let server_header = match h.string("server_header_transformation")?.unwrap_or("OVERWRITE") {
        "OVERWRITE" => ServerHeader::Overwrite,
        "APPEND_IF_ABSENT" => ServerHeader::AppendIfAbsent,
        "PASS_THROUGH" => ServerHeader::PassThrough,
        other => return Err(ConfigError::new(h.at("server_header_transformation"), format!("{other} is not a server header transformation"))),
    };
    let via = h.string("via")?.filter(|v| !v.is_empty()).map(str::to_string);
    let kb = h.u64("max_request_headers_kb")?.unwrap_or(60);
    if !(1..=8192).contains(&kb) {
        return Err(ConfigError::new(h.at("max_request_headers_kb"), format!("{kb} is not in [1, 8192]")));
    }
    let normalize_path = h.bool("normalize_path")?.unwrap_or(false);
    let merge_slashes = h.bool("merge_slashes")?.unwrap_or(false);
    let escaped_slashes = match h.string("path_with_escaped_slashes_action")?.unwrap_or("IMPLEMENTATION_SPECIFIC_DEFAULT") {
        "IMPLEMENTATION_SPECIFIC_DEFAULT" | "KEEP_UNCHANGED" => EscapedSlashes::KeepUnchanged,
        "REJECT_REQUEST" => EscapedSlashes::RejectRequest,
        "UNESCAPE_AND_REDIRECT" => EscapedSlashes::UnescapeAndRedirect,
        "UNESCAPE_AND_FORWARD" => EscapedSlashes::UnescapeAndForward,
        other => return Err(ConfigError::new(h.at("path_with_escaped_slashes_action"), format!("{other} is not an escaped slashes action"))),
    };
    let mut internal_ranges = Vec::new();
    if let Some(mut internal) = h.object("internal_address_config")? {
        internal_ranges = internal.objects("cidr_ranges")?.into_iter().map(cidr::cidr_range).collect::<Result<_>>()?;
        let _ = internal.bool("unix_sockets")?;
        internal.finish()?;
    }
    let always_set_request_id_in_response = h.bool("always_set_request_id_in_response")?.unwrap_or(false);
    let generate_request_id = h.bool("generate_request_id")?.unwrap_or(true);
    let preserve_external_request_id = h.bool("preserve_external_request_id")?.unwrap_or(false);
    let request_id = request_id_extension(&mut h)?;
    let strip_trailing_host_dot = h.bool("strip_trailing_host_dot")?.unwrap_or(false);
    let http2 = h.object("http2_protocol_options")?.map(super::cluster::http2_settings).transpose()?.unwrap_or_default();
    let mut accept_http_10 = false;
    if let Some(mut http1) = h.object("http_protocol_options")? {
        accept_http_10 = http1.bool("accept_http_10")?.unwrap_or(false);
        if let Some(host) = http1.string("default_host_for_http_10")? {
            if !host.is_empty() {
                return Err(ConfigError::new(http1.at("default_host_for_http_10"), "is not supported by weft yet"));
            }
        }
        http1.finish()?;
    }
    let host_port = match (h.bool("strip_matching_host_port")?.unwrap_or(false), h.bool("strip_any_host_port")?.unwrap_or(false)) {
        (false, false) => HostPort::Keep,
        (true, false) => HostPort::StripMatching,
        (false, true) => HostPort::StripAny,
        (true, true) => return Err(ConfigError::new(h.at("strip_any_host_port"), "cannot be combined with strip_matching_host_port")),
    };
    let stream_idle_timeout = h.timeout("stream_idle_timeout", Some(Duration::from_secs(300)))?;
    let request_timeout = h.timeout("request_timeout", None)?;
    let request_headers_timeout = h.timeout("request_headers_timeout", None)?;
    let mut max_headers_count = 100;
    let mut idle_timeout = Some(Duration::from_secs(3600));
    let mut max_connection_duration = None;
    let mut max_stream_duration = None;
    let mut headers_with_underscores = UnderscoreHeaders::Allow;
    if let Some(mut common) = h.object("common_http_protocol_options")? {
        idle_timeout = common.timeout("idle_timeout", idle_timeout)?;
        max_connection_duration = common.timeout("max_connection_duration", None)?;
        max_stream_duration = common.timeout("max_stream_duration", None)?;
        max_headers_count = common.u64("max_headers_count")?.map_or(100, |n| n.clamp(1, 10_000) as usize);
        headers_with_underscores = match common.string("headers_with_underscores_action")?.unwrap_or("ALLOW") {
            "ALLOW" => UnderscoreHeaders::Allow,
            "REJECT_REQUEST" => UnderscoreHeaders::RejectRequest,
            "DROP_HEADER" => UnderscoreHeaders::DropHeader,
            other => return Err(ConfigError::new(common.at("headers_with_underscores_action"), format!("{other} is not an action"))),
        };
        common.finish()?;
    }
    let local_reply = h.object("local_reply_config")?.map(local_reply_config).transpose()?;
    let mut upgrades = Vec::new();
    for (kind, enabled) in route::upgrade_configs(&mut h, false)?.0 {
        if enabled {
            upgrades.push(kind);
        }
    }
    let client_cert = client_cert(&mut h)?;
    h.finish()?;
    Ok(HttpConnectionManager {
        codec,
        access_log,
        routes,
        http_filters,
        use_remote_address,
        xff_num_trusted_hops,
        server_name,
        server_header,
        via,
        max_request_headers_bytes: kb as usize * 1024,
        normalize_path,
        merge_slashes,
        host_port,
        max_headers_count,
        idle_timeout,
        max_connection_duration,
        headers_with_underscores,
        stream_idle_timeout,
        request_timeout,
        request_headers_timeout,
        max_stream_duration,
        internal_ranges,
        always_set_request_id_in_response,
        generate_request_id,
        preserve_external_request_id,
        request_id,
        strip_trailing_host_dot,
        escaped_slashes,
        accept_http_10,
        local_reply,
        upgrades,
        client_cert,
        tracing,
        http2,
    })
}

fn client_cert(h: &mut Obj<'_>) -> Result<ClientCert> {
    let forward = match h.string("forward_client_cert_details")?.unwrap_or("SANITIZE") {
        "SANITIZE" => ForwardClientCert::Sanitize,
        "FORWARD_ONLY" => ForwardClientCert::ForwardOnly,
        "APPEND_FORWARD" => ForwardClientCert::AppendForward,
        "SANITIZE_SET" => ForwardClientCert::SanitizeSet,
        "ALWAYS_FORWARD_ONLY" => ForwardClientCert::AlwaysForwardOnly,
        other => return Err(ConfigError::new(h.at("forward_client_cert_details"), format!("{other} is not a forward_client_cert_details mode"))),
    };
    let mut details = Vec::new();
    if let Some(mut d) = h.object("set_current_client_cert_details")? {
        // `subject` is a BoolValue ({value: true} in the JSON mapping, or a bare bool).
        let subject = match d.take("subject") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Object(o)) => o.get("value").and_then(serde_json::Value::as_bool).unwrap_or(false),
            _ => false,
        };
        // Envoy's order, whatever the configuration's.
        let [cert, chain, uri, dns] = [d.bool("cert")?, d.bool("chain")?, d.bool("uri")?, d.bool("dns")?].map(|b| b.unwrap_or(false));
        for (on, detail) in [(cert, CertDetail::Cert), (chain, CertDetail::Chain), (subject, CertDetail::Subject), (uri, CertDetail::Uri), (dns, CertDetail::Dns)] {
            if on {
                details.push(detail);
            }
        }
        d.finish()?;
    }
    Ok(ClientCert { forward, details })
}

fn local_reply_config(mut l: Obj<'_>) -> Result<LocalReplyConfig> {
    let mut mappers = Vec::new();
    for mut m in l.objects("mappers")? {
        let filter = reply_filter(m.required_object("filter")?)?;
        let status = m.u64("status_code")?.map(|s| u16::try_from(s).ok().filter(|s| (200..600).contains(s)).ok_or_else(|| ConfigError::new(m.at("status_code"), "must be in [200, 600)"))).transpose()?;
        let body = match m.object("body")? {
            Some(mut b) => {
                let text = b.string("inline_string")?.unwrap_or_default().to_string();
                b.finish()?;
                Some(text)
            }
            None => None,
        };
        let body_format = m.object("body_format_override")?.map(body_format).transpose()?;
        let mut headers = HeaderOps::default();
        for o in m.objects("headers_to_add")? {
            headers.response_add.push(super::headers::option(o)?);
        }
        m.finish()?;
        mappers.push(ReplyMapper { filter, status, body, body_format, headers });
    }
    let body_format = l.object("body_format")?.map(body_format).transpose()?;
    l.finish()?;
    Ok(LocalReplyConfig { mappers, body_format })
}

fn reply_filter(mut f: Obj<'_>) -> Result<ReplyFilter> {
    let mut found = Vec::new();
    if let Some(mut s) = f.object("status_code_filter")? {
        let mut c = s.required_object("comparison")?;
        let op = match c.string("op")?.unwrap_or("EQ") {
            "EQ" => Comparison::Eq,
            "GE" => Comparison::Ge,
            "LE" => Comparison::Le,
            other => return Err(ConfigError::new(c.at("op"), format!("{other} is not a comparison"))),
        };
        let mut v = c.required_object("value")?;
        let value = v.u64("default_value")?.unwrap_or(0).min(u64::from(u16::MAX)) as u16;
        let _ = v.string("runtime_key")?;
        v.finish()?;
        c.finish()?;
        s.finish()?;
        found.push(ReplyFilter::Status { op, value });
    }
    if let Some(mut h) = f.object("header_filter")? {
        found.push(ReplyFilter::Header(super::matcher::header_matcher(h.required_object("header")?)?));
        h.finish()?;
    }
    for (key, make) in [("and_filter", ReplyFilter::And as fn(Vec<ReplyFilter>) -> ReplyFilter), ("or_filter", ReplyFilter::Or)] {
        if let Some(mut list) = f.object(key)? {
            let filters = list.objects("filters")?.into_iter().map(reply_filter).collect::<Result<_>>()?;
            list.finish()?;
            found.push(make(filters));
        }
    }
    if found.len() != 1 {
        return Err(ConfigError::new(f.path(), "needs exactly one of status_code_filter, header_filter, and_filter or or_filter (others are not supported by weft)"));
    }
    f.finish()?;
    Ok(found.remove(0))
}

/// `SubstitutionFormatString` with `text_format`, `text_format_source.inline_string` or `json_format`.
fn body_format(mut b: Obj<'_>) -> Result<BodyFormat> {
    let content_type = b.string("content_type")?.map(str::to_string);
    let parse = |text: &str, path: String| super::headers::parse_format(text).map_err(|e| ConfigError::new(path, e));
    let text = match (b.string("text_format")?, b.object("text_format_source")?) {
        (Some(t), None) => Some(t.to_string()),
        (None, Some(mut src)) => {
            let t = src.required_string("inline_string")?.to_string();
            src.finish()?;
            Some(t)
        }
        (None, None) => None,
        _ => return Err(ConfigError::new(b.path(), "needs one of text_format or text_format_source")),
    };
    let format = match (text, b.take("json_format")) {
        (Some(t), None) => BodyFormat::Text { format: parse(&t, b.at("text_format"))?, content_type: content_type.unwrap_or_else(|| "text/plain".into()) },
        (None, Some(serde_json::Value::Object(map))) => {
            let mut fields = Vec::new();
            for (key, value) in map {
                let serde_json::Value::String(text) = value else {
                    return Err(ConfigError::new(format!("{}.{key}", b.at("json_format")), "only string values are supported by weft"));
                };
                fields.push((key.clone(), parse(text, format!("{}.{key}", b.at("json_format")))?));
            }
            fields.sort_by(|a, b| a.0.cmp(&b.0));
            BodyFormat::Json { fields, content_type: content_type.unwrap_or_else(|| "application/json".into()) }
        }
        _ => return Err(ConfigError::new(b.path(), "needs exactly one of text_format, text_format_source or json_format")),
    };
    if b.bool("omit_empty_values")? == Some(true) {
        return Err(ConfigError::new(b.at("omit_empty_values"), "is not supported by weft yet"));
    }
    b.finish()?;
    Ok(format)
}

fn routes(h: &mut Obj<'_>) -> Result<Routes> {
    match (h.object("route_config")?, h.object("rds")?) {
        (Some(rc), None) => Ok(Routes::Inline(Arc::new(route::translate(rc)?))),
        (None, Some(mut rds)) => {
            let name = rds.required_string("route_config_name")?.to_string();
            super::ads_source(rds.required_object("config_source")?, "RDS")?;
            rds.finish()?;
            Ok(Routes::Rds(name))
        }
        _ => Err(ConfigError::new(h.path(), "needs exactly one of route_config or rds")),
    }
}

fn http_filters(h: &mut Obj<'_>, stat_prefix: &str) -> Result<Vec<HttpFilter>> {
    let mut filters = Vec::new();
    let path = h.at("http_filters");
    for mut f in h.objects("http_filters")? {
        let name = f.string("name")?.unwrap_or_default().to_string();
        let optional = f.bool("is_optional")?.unwrap_or(false);
        if f.bool("disabled")? == Some(true) {
            return Err(ConfigError::new(f.at("disabled"), "filters disabled by default are not supported by weft yet"));
        }
        let mut typed = f.required_object("typed_config")?;
        let type_url = typed.required_string("@type")?;
        let kind = match type_url.rsplit('/').next().unwrap_or(type_url) {
            ROUTER => {
                if typed.bool("suppress_envoy_headers")? == Some(true) {
                    return Err(ConfigError::new(typed.at("suppress_envoy_headers"), "true is not supported by weft yet"));
                }
                typed.finish()?;
                Some(HttpFilterKind::Router)
            }
            FAULT => Some(HttpFilterKind::Fault(Arc::new(http_filters::fault(typed)?))),
            CORS => {
                typed.finish()?;
                Some(HttpFilterKind::Cors)
            }
            LOCAL_RATELIMIT => Some(HttpFilterKind::LocalRateLimit(Arc::new(http_filters::local_ratelimit(typed)?))),
            HTTP_RBAC => Some(HttpFilterKind::Rbac(Arc::new(rbac::http(typed, stat_prefix)?))),
            ALPN_FILTER => Some(HttpFilterKind::Alpn(Arc::new(alpn::translate(typed)?))),
            GRPC_STATS => Some(HttpFilterKind::GrpcStats(http_filters::grpc_stats(typed)?)),
            super::istio_stats::ISTIO_STATS => Some(HttpFilterKind::IstioStats(Arc::new(super::istio_stats::translate(typed)?))),
            PEER_METADATA => Some(HttpFilterKind::PeerMetadata(Arc::new(http_filters::peer_metadata(typed)?))),
            _ if optional => None,
            _ => {
                return Err(ConfigError::new(
                    typed.at("@type"),
                    format!("HTTP filter {name:?} of type {type_url} is not supported (mark it is_optional to skip it)"),
                ))
            }
        };
        f.finish()?;
        filters.extend(kind.map(|kind| HttpFilter { name, kind }));
    }
    match filters.iter().position(|f| f.kind == HttpFilterKind::Router) {
        Some(i) if i + 1 == filters.len() => Ok(filters),
        Some(_) => Err(ConfigError::new(path, "the router filter must be the last HTTP filter")),
        None => Err(ConfigError::new(path, "needs the router filter (envoy.filters.http.router)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hcm(extra: serde_json::Value) -> Result<HttpConnectionManager> {
        let mut v = json!({"route_config": {}, "http_filters": [{"name": "router", "typed_config": {"@type": format!("type.googleapis.com/{ROUTER}")}}]});
        if let (Some(base), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        translate(Obj::new(&v, "h")?)
    }

    #[test]
    fn istiods_uuid_request_id_extension_is_accepted_and_others_refused() {
        let h = hcm(json!({"request_id_extension": {"typed_config": {"@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
            "use_request_id_for_trace_sampling": true, "pack_trace_reason": false}}}))
        .unwrap();
        assert_eq!(h.request_id, RequestId { pack_trace_reason: false, use_request_id_for_trace_sampling: true });
        assert!(h.generate_request_id);
        assert_eq!(hcm(json!({})).unwrap().request_id, RequestId::default());
        let err = hcm(json!({"request_id_extension": {"typed_config": {"@type": "type.googleapis.com/example.OtherRequestId"}}})).unwrap_err();
        assert_eq!(err.path, "h.request_id_extension.typed_config.@type");
    }

    #[test]
    fn grpc_stats_and_istio_alpn_are_filters_before_the_router() {
        let h = hcm(json!({"http_filters": [
            {"name": "envoy.filters.http.grpc_stats", "typed_config": {"@type": format!("type.googleapis.com/{GRPC_STATS}"), "emit_filter_state": true, "stats_for_all_methods": false,
                "individual_method_stats_allowlist": {"services": [{"name": "pkg.Svc", "method_names": ["Get"]}]}}},
            {"name": "istio.alpn", "typed_config": {"@type": format!("type.googleapis.com/{ALPN_FILTER}"), "alpn_override": [{"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2"]}]}},
            {"name": "router", "typed_config": {"@type": format!("type.googleapis.com/{ROUTER}")}}]}))
        .unwrap();
        let HttpFilterKind::GrpcStats(stats) = &h.http_filters[0].kind else { panic!("{:?}", h.http_filters[0]) };
        assert!(stats.emit_filter_state && !stats.stats_for_all_methods);
        assert_eq!(stats.method_allowlist, ["pkg.Svc/Get"]);
        let HttpFilterKind::Alpn(alpn) = &h.http_filters[1].kind else { panic!("{:?}", h.http_filters[1]) };
        assert_eq!(alpn.http2.as_deref(), Some(&["istio-h2".to_string()][..]));
        let err = hcm(json!({"http_filters": [{"name": "g", "typed_config": {"@type": format!("type.googleapis.com/{GRPC_STATS}"), "bogus": 1}},
            {"name": "router", "typed_config": {"@type": format!("type.googleapis.com/{ROUTER}")}}]}))
        .unwrap_err();
        assert_eq!(err.path, "h.http_filters[0].typed_config.bogus");
    }
}
