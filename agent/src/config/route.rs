//! `envoy.config.route.v3.RouteConfiguration`: virtual hosts and routes of an HTTP connection manager, with
//! what Istio's VirtualService becomes: matches on path, headers and query parameters, weighted clusters,
//! redirects, rewrites, header changes, timeouts and retries.

use std::collections::HashSet;
use std::time::Duration;

use super::headers::{self, HeaderOps};
use super::http_filters::{self, PerFilterConfig, Percent};
use super::matcher::{self, HeaderMatcher, Regex, StringMatcher};
use super::tree::{ConfigError, Obj, Result};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RouteConfiguration {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    pub headers: HeaderOps,
    pub per_filter: PerFilterConfig,
    /// Routes to unknown clusters are refused at load time (Envoy's default for inline routes).
    pub validate_clusters: bool,
    pub most_specific_header_mutations_wins: bool,
    /// `ignore_port_in_host_matching`: the Host's port is ignored when matching domains.
    pub ignore_port_in_host_matching: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub headers: HeaderOps,
    pub retry_policy: Option<RetryPolicy>,
    pub per_filter: PerFilterConfig,
    pub include_request_attempt_count: bool,
    pub include_attempt_count_in_response: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: Action,
    pub headers: HeaderOps,
    pub per_filter: PerFilterConfig,
    /// `decorator`: the span name of the route's requests, told to the other side of the hop unless
    /// `propagate` is false (`x-envoy-decorator-operation`) when the connection manager traces.
    pub decorator: Option<Decorator>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decorator {
    pub operation: String,
    pub propagate: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query_parameters: Vec<QueryMatcher>,
    /// `grpc: {}`: only requests with `content-type: application/grpc*`.
    pub grpc: bool,
    /// `runtime_fraction` (its default value: weft has no runtime): the share of requests that match.
    pub fraction: Option<Percent>,
    /// `tls_context.presented`: whether the connection must (or must not) be TLS.
    pub tls_presented: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Prefix(String),
    Path(String),
    Regex(Regex),
    /// Matches the prefix followed by nothing, `/`, `?` or `#`.
    PathSeparatedPrefix(String),
    /// `connect_matcher`: CONNECT requests (which no path matcher matches).
    Connect,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueryMatcher {
    pub name: String,
    /// `None`: present.
    pub value: Option<StringMatcher>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Route(Box<RouteAction>),
    Redirect(Box<Redirect>),
    DirectResponse { status: u16, body: Option<String> },
}

/// A route's setting for a timer the connection manager also configures.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum TimerOverride {
    /// `0s`: no timer for this route, whatever the connection manager says.
    Disabled,
    After(Duration),
}

/// `max_stream_duration` of a route: its own limit (`max_stream_duration`), and for requests carrying
/// `grpc-timeout` when `grpc_timeout_header_max` is set, that deadline instead.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StreamDuration {
    pub max: Option<TimerOverride>,
    pub grpc_header: Option<GrpcTimeout>,
}

/// A gRPC request's `grpc-timeout`, capped at `max` (`ZERO`: uncapped), less `offset`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct GrpcTimeout {
    pub max: Duration,
    pub offset: Duration,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RouteAction {
    pub cluster: ClusterSpecifier,
    /// What to answer when the cluster named by a header does not exist (503 or 404).
    pub cluster_not_found_status: u16,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<HostRewrite>,
    /// `None`: disabled (`0s`); Envoy's default is 15s.
    pub timeout: Option<Duration>,
    /// `idle_timeout`: the stream idle timeout once this route is chosen, over the connection manager's.
    pub idle_timeout: Option<TimerOverride>,
    /// `max_stream_duration`: how long the whole stream may last once this route is chosen. Present, it
    /// puts the route on Envoy's "new timeouts": the router's `timeout` and `max_grpc_timeout` no longer
    /// apply.
    pub stream_duration: Option<StreamDuration>,
    /// The deprecated `max_grpc_timeout` and `grpc_timeout_offset` (what istiod emits): a gRPC request's
    /// `grpc-timeout` becomes the router's timeout, capped at the maximum (`ZERO`: uncapped).
    pub max_grpc_timeout: Option<GrpcTimeout>,
    pub retry_policy: Option<RetryPolicy>,
    /// How RING_HASH and MAGLEV clusters hash the request.
    pub hash_policy: Vec<HashPolicy>,
    pub internal_redirect: Option<InternalRedirectPolicy>,
    /// `upgrade_configs`: per upgrade type, enabled or disabled for this route (over the connection
    /// manager's).
    pub upgrades: Vec<(String, bool)>,
    /// A CONNECT upgrade with `connect_config`: the proxy terminates CONNECT and sends the tunnel's bytes to
    /// the cluster. Without it a CONNECT request is forwarded to the cluster, which answers it.
    pub terminate_connect: bool,
    /// `request_mirror_policies`: copies of the request sent to other clusters, their answers ignored.
    pub mirrors: Vec<MirrorPolicy>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MirrorPolicy {
    pub cluster: String,
    /// `runtime_fraction` (its default value): the share of requests mirrored.
    pub fraction: Percent,
    /// Envoy appends `-shadow` to the mirrored request's host unless told not to.
    pub shadow_suffix: bool,
}

/// `internal_redirect_policy`: upstream redirects the proxy follows itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct InternalRedirectPolicy {
    pub max_internal_redirects: u32,
    pub redirect_response_codes: Vec<u16>,
    pub allow_cross_scheme_redirect: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HashPolicy {
    pub key: HashKey,
    /// Stop at this policy when it produced a hash.
    pub terminal: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    Header(String),
    /// A cookie; with a `ttl`, one is generated (and set on the response) when the request has none.
    Cookie { name: String, ttl: Option<Duration>, path: Option<String> },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterSpecifier {
    Cluster(String),
    /// The cluster named by this request header.
    Header(String),
    Weighted(WeightedClusters),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    /// `header_name`: this request header's value is the random number that picks the cluster.
    pub header_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub headers: HeaderOps,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostRewrite {
    Literal(String),
    /// The chosen endpoint's address (`auto_host_rewrite`).
    Auto,
    /// The value of this request header, when present.
    Header(String),
    /// The path rewritten by a regex (`host_rewrite_path_regex`).
    PathRegex(Regex, String),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub status: u16,
    pub strip_query: bool,
}

/// `retry_policy` of a route or virtual host.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    /// `retriable_headers`: with `retriable-headers`, a response matching one of these is retried.
    pub retriable_headers: Vec<HeaderMatcher>,
    /// `retry_host_predicate: previous_hosts`: a retry avoids endpoints already tried.
    pub previous_hosts: bool,
    pub host_selection_max_attempts: u32,
    pub base_interval: Duration,
    pub max_interval: Duration,
}

/// The conditions of `retry_on` (and `x-envoy-retry-on`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryOn {
    pub server_error: bool,
    pub gateway_error: bool,
    pub reset: bool,
    /// `reset-before-request`: the stream failed before any of the request went upstream (Istio's default).
    pub reset_before_request: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub retriable_status_codes: bool,
    pub retriable_headers: bool,
    /// gRPC conditions (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`): the
    /// response's `grpc-status` (a trailers-only response carries it in its headers), as a bit per code.
    pub grpc_statuses: u32,
}

/// The gRPC retry conditions and the status codes they name.
const GRPC_CONDITIONS: [(&str, u32); 5] = [("cancelled", 1), ("deadline-exceeded", 4), ("resource-exhausted", 8), ("internal", 13), ("unavailable", 14)];

impl RetryOn {
    /// Whether a response with gRPC status `code` is to be retried.
    pub fn grpc_status(&self, code: u32) -> bool {
        code < 32 && self.grpc_statuses & (1 << code) != 0
    }

    /// Parses a comma list as Envoy does: unknown conditions are ignored (Envoy ignores them in headers;
    /// in configuration `strict` rejects them).
    pub fn parse(list: &str, strict: bool) -> std::result::Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "reset-before-request" => on.reset_before_request = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => on.retriable_status_codes = true,
                "retriable-headers" => on.retriable_headers = true,
                grpc if GRPC_CONDITIONS.iter().any(|(name, _)| *name == grpc) => {
                    let code = GRPC_CONDITIONS.iter().find(|(name, _)| *name == grpc).map_or(0, |(_, c)| *c);
                    on.grpc_statuses |= 1 << code;
                }
                other if strict => return Err(format!("retry condition {other:?} is not supported by weft")),
                _ => {}
            }
        }
        Ok(on)
    }

    pub fn union(self, other: RetryOn) -> RetryOn {
        RetryOn {
            server_error: self.server_error || other.server_error,
            gateway_error: self.gateway_error || other.gateway_error,
            reset: self.reset || other.reset,
            reset_before_request: self.reset_before_request || other.reset_before_request,
            connect_failure: self.connect_failure || other.connect_failure,
            retriable_4xx: self.retriable_4xx || other.retriable_4xx,
            refused_stream: self.refused_stream || other.refused_stream,
            retriable_status_codes: self.retriable_status_codes || other.retriable_status_codes,
            retriable_headers: self.retriable_headers || other.retriable_headers,
            grpc_statuses: self.grpc_statuses | other.grpc_statuses,
        }
    }
}

/// Envoy's default route timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

impl PathMatch {
    pub fn matches(&self, path: &str, case_sensitive: bool) -> bool {
        let eq = |a: &str, b: &str| if case_sensitive { a == b } else { a.eq_ignore_ascii_case(b) };
        let starts = |p: &str| path.len() >= p.len() && path.is_char_boundary(p.len()) && eq(&path[..p.len()], p);
        match self {
            PathMatch::Prefix(p) => starts(p),
            PathMatch::Path(p) => eq(path, p),
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::PathSeparatedPrefix(p) => starts(p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/' | b'?' | b'#')),
            PathMatch::Connect => false,
        }
    }
}

impl RouteConfiguration {
    /// The clusters its routes forward to by name.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.virtual_hosts.iter().flat_map(|vh| &vh.routes).flat_map(|r| {
            let names: Vec<&str> = match &r.action {
                Action::Route(a) => match &a.cluster {
                    ClusterSpecifier::Cluster(c) => vec![c.as_str()],
                    ClusterSpecifier::Weighted(w) => w.clusters.iter().map(|c| c.name.as_str()).collect(),
                    ClusterSpecifier::Header(_) => Vec::new(),
                },
                _ => Vec::new(),
            };
            names
        })
    }

    /// The virtual host for `host`, by Envoy's precedence: exact, then longest `*.suffix`, then longest
    /// `prefix.*`, then `*`.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let host = host.to_ascii_lowercase();
        let matching = |test: &dyn Fn(&str) -> Option<usize>| {
            self.virtual_hosts
                .iter()
                .flat_map(|vh| vh.domains.iter().filter_map(move |d| test(d).map(|len| (len, vh))))
                .max_by_key(|(len, _)| *len)
                .map(|(_, vh)| vh)
        };
        matching(&|d| (*d == host).then_some(usize::MAX))
            .or_else(|| matching(&|d| d.strip_prefix('*').filter(|s| !s.is_empty() && host.ends_with(s) && host.len() > s.len()).map(str::len)))
            .or_else(|| matching(&|d| d.strip_suffix('*').filter(|p| !p.is_empty() && host.starts_with(p) && host.len() > p.len()).map(str::len)))
            .or_else(|| matching(&|d| (d == "*").then_some(0)))
    }
}

pub fn translate(mut rc: Obj<'_>) -> Result<RouteConfiguration> {
    let name = rc.string("name")?.unwrap_or_default().to_string();
    let validate_clusters = rc.bool("validate_clusters")?.unwrap_or(true);
    let most_specific_header_mutations_wins = rc.bool("most_specific_header_mutations_wins")?.unwrap_or(false);
    let ignore_port_in_host_matching = rc.bool("ignore_port_in_host_matching")?.unwrap_or(false);
    let max_direct_body = rc.u64("max_direct_response_body_size_bytes")?.unwrap_or(DEFAULT_MAX_DIRECT_BODY);
    let mut virtual_hosts = Vec::new();
    let mut seen_domains = HashSet::new();
    for mut vh in rc.objects("virtual_hosts")? {
        let vh_name = vh.required_string("name")?.to_string();
        let domains: Vec<String> = vh.strings("domains")?.into_iter().map(str::to_ascii_lowercase).collect();
        if domains.is_empty() {
            return Err(ConfigError::new(vh.at("domains"), "must have at least one domain"));
        }
        for d in &domains {
            if !seen_domains.insert(d.clone()) {
                return Err(ConfigError::new(
                    vh.at("domains"),
                    format!("Only unique values for domains are permitted. Duplicate entry of domain {d} in route {name}"),
                ));
            }
        }
        let routes = vh.objects("routes")?.into_iter().map(route).collect::<Result<Vec<_>>>()?;
        check_direct_bodies(&vh, &routes, max_direct_body)?;
        let headers = headers::ops(&mut vh)?;
        let retry_policy = vh.object("retry_policy")?.map(retry_policy).transpose()?;
        let per_filter = http_filters::per_filter_config(&mut vh)?;
        let include_request_attempt_count = vh.bool("include_request_attempt_count")?.unwrap_or(false);
        let include_attempt_count_in_response = vh.bool("include_attempt_count_in_response")?.unwrap_or(false);
        vh.finish()?;
        virtual_hosts.push(VirtualHost {
            name: vh_name,
            domains,
            routes,
            headers,
            retry_policy,
            per_filter,
            include_request_attempt_count,
            include_attempt_count_in_response,
        });
    }
    let headers = headers::ops(&mut rc)?;
    let per_filter = http_filters::per_filter_config(&mut rc)?;
    rc.finish()?;
    Ok(RouteConfiguration { name, virtual_hosts, headers, per_filter, validate_clusters, most_specific_header_mutations_wins, ignore_port_in_host_matching })
}

fn route(mut r: Obj<'_>) -> Result<Route> {
    let name = r.string("name")?.unwrap_or_default().to_string();
    let matcher = route_match(r.required_object("match")?)?;
    let found = [
        r.object("route")?.map(route_action).transpose()?.map(|a| Action::Route(Box::new(a))),
        r.object("redirect")?.map(redirect).transpose()?.map(|a| Action::Redirect(Box::new(a))),
        r.object("direct_response")?.map(direct_response).transpose()?,
    ];
    let mut found = found.into_iter().flatten();
    let (Some(action), None) = (found.next(), found.next()) else {
        return Err(ConfigError::new(r.path(), "needs exactly one of route, redirect or direct_response"));
    };
    // Route metadata (istiod names the VirtualService there) is read by no filter weft has.
    let _ = r.object("metadata")?.map(super::metadata::translate).transpose()?;
    let headers = headers::ops(&mut r)?;
    let per_filter = http_filters::per_filter_config(&mut r)?;
    let decorator = r.object("decorator")?.map(decorator).transpose()?;
    r.finish()?;
    Ok(Route { name, matcher, action, headers, per_filter, decorator })
}

fn decorator(mut d: Obj<'_>) -> Result<Decorator> {
    let operation = d.required_string("operation")?.to_string();
    let propagate = d.bool_value("propagate")?.unwrap_or(true);
    d.finish()?;
    Ok(Decorator { operation, propagate })
}

fn route_match(mut m: Obj<'_>) -> Result<RouteMatch> {
    let found = [
        m.string("prefix")?.map(|p| PathMatch::Prefix(p.to_string())),
        m.string("path")?.map(|p| PathMatch::Path(p.to_string())),
        m.object("safe_regex")?.map(matcher::regex).transpose()?.map(PathMatch::Regex),
        m.string("path_separated_prefix")?.map(|p| PathMatch::PathSeparatedPrefix(p.to_string())),
        m.object("connect_matcher")?.map(|c| c.finish().map(|()| PathMatch::Connect)).transpose()?,
    ];
    let mut found = found.into_iter().flatten();
    let (Some(path), None) = (found.next(), found.next()) else {
        return Err(ConfigError::new(m.path(), "needs exactly one of prefix, path, safe_regex, path_separated_prefix or connect_matcher"));
    };
    if let PathMatch::PathSeparatedPrefix(p) = &path {
        if !p.starts_with('/') || (p.len() > 1 && p.ends_with('/')) || p.contains(['?', '#']) {
            return Err(ConfigError::new(m.at("path_separated_prefix"), "must start with '/', not end with '/' and have no '?' or '#'"));
        }
    }
    let case_sensitive = m.bool("case_sensitive")?.unwrap_or(true);
    let headers = m.objects("headers")?.into_iter().map(matcher::header_matcher).collect::<Result<_>>()?;
    let query_parameters = m.objects("query_parameters")?.into_iter().map(query_matcher).collect::<Result<_>>()?;
    let grpc = match m.object("grpc")? {
        Some(g) => {
            g.finish()?;
            true
        }
        None => false,
    };
    let fraction = m.object("runtime_fraction")?.map(http_filters::runtime_percent).transpose()?;
    let tls_presented = match m.object("tls_context")? {
        Some(mut t) => {
            let presented = t.bool("presented")?;
            if t.bool("validated")?.is_some() {
                return Err(ConfigError::new(t.at("validated"), "is not supported by weft yet"));
            }
            t.finish()?;
            presented
        }
        None => None,
    };
    m.finish()?;
    Ok(RouteMatch { path, case_sensitive, headers, query_parameters, grpc, fraction, tls_presented })
}

fn query_matcher(mut q: Obj<'_>) -> Result<QueryMatcher> {
    let name = q.required_string("name")?.to_string();
    let value = q.object("string_match")?.map(matcher::string_matcher).transpose()?;
    let present = q.bool("present_match")?;
    if value.is_some() && present.is_some() {
        return Err(ConfigError::new(q.path(), "needs at most one of string_match or present_match"));
    }
    if value.is_none() && present != Some(true) {
        return Err(ConfigError::new(q.path(), "needs string_match or present_match: true"));
    }
    q.finish()?;
    Ok(QueryMatcher { name, value })
}

fn route_action(mut a: Obj<'_>) -> Result<RouteAction> {
    let found = [
        a.string("cluster")?.map(|c| ClusterSpecifier::Cluster(c.to_string())),
        a.string("cluster_header")?.map(|h| ClusterSpecifier::Header(h.to_ascii_lowercase())),
        a.object("weighted_clusters")?.map(weighted_clusters).transpose()?,
    ];
    let mut found = found.into_iter().flatten();
    let (Some(cluster), None) = (found.next(), found.next()) else {
        return Err(ConfigError::new(a.path(), "needs exactly one of cluster, cluster_header or weighted_clusters"));
    };
    let cluster_not_found_status = match a.string("cluster_not_found_response_code")?.unwrap_or("SERVICE_UNAVAILABLE") {
        "SERVICE_UNAVAILABLE" => 503,
        "NOT_FOUND" => 404,
        "INTERNAL_SERVER_ERROR" => 500,
        other => return Err(ConfigError::new(a.at("cluster_not_found_response_code"), format!("{other} is not a response code"))),
    };
    let prefix_rewrite = a.string("prefix_rewrite")?.map(str::to_string);
    let regex_rewrite = a.object("regex_rewrite")?.map(regex_substitution).transpose()?;
    if prefix_rewrite.is_some() && regex_rewrite.is_some() {
        return Err(ConfigError::new(a.at("regex_rewrite"), "cannot be combined with prefix_rewrite"));
    }
    let found = [
        a.string("host_rewrite_literal")?.map(|h| HostRewrite::Literal(h.to_string())),
        a.bool("auto_host_rewrite")?.filter(|b| *b).map(|_| HostRewrite::Auto),
        a.string("host_rewrite_header")?.map(|h| HostRewrite::Header(h.to_ascii_lowercase())),
        a.object("host_rewrite_path_regex")?.map(regex_substitution).transpose()?.map(|(r, s)| HostRewrite::PathRegex(r, s)),
    ];
    let mut found = found.into_iter().flatten();
    let host_rewrite = found.next();
    if found.next().is_some() {
        return Err(ConfigError::new(a.path(), "needs at most one host rewrite"));
    }
    let timeout = a.timeout("timeout", Some(DEFAULT_TIMEOUT))?;
    let retry_policy = a.object("retry_policy")?.map(retry_policy).transpose()?;
    let idle_timeout = timer_override(&mut a, "idle_timeout")?;
    let stream_duration = match a.object("max_stream_duration")? {
        Some(mut m) => {
            let max = timer_override(&mut m, "max_stream_duration")?;
            let header_max = m.duration("grpc_timeout_header_max")?;
            let offset = m.duration("grpc_timeout_header_offset")?.unwrap_or_default();
            m.finish()?;
            Some(StreamDuration { max, grpc_header: header_max.map(|max| GrpcTimeout { max, offset }) })
        }
        None => None,
    };
    let max_grpc_timeout = a.duration("max_grpc_timeout")?;
    let grpc_offset = a.duration("grpc_timeout_offset")?.unwrap_or_default();
    let max_grpc_timeout = max_grpc_timeout.map(|max| GrpcTimeout { max, offset: grpc_offset });
    let hash_policy = a.objects("hash_policy")?.into_iter().map(hash_policy).collect::<Result<_>>()?;
    let internal_redirect = a.object("internal_redirect_policy")?.map(internal_redirect_policy).transpose()?;
    let (upgrades, terminate_connect) = upgrade_configs(&mut a, true)?;
    let mirrors = a.objects("request_mirror_policies")?.into_iter().map(mirror_policy).collect::<Result<_>>()?;
    a.finish()?;
    Ok(RouteAction {
        cluster,
        cluster_not_found_status,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        timeout,
        idle_timeout,
        stream_duration,
        max_grpc_timeout,
        retry_policy,
        hash_policy,
        internal_redirect,
        upgrades,
        terminate_connect,
        mirrors,
    })
}

/// A timer a route sets over the connection manager's: absent, `0s` (disabled) or a duration.
fn timer_override(o: &mut Obj<'_>, key: &str) -> Result<Option<TimerOverride>> {
    Ok(o.duration(key)?.map(|d| if d.is_zero() { TimerOverride::Disabled } else { TimerOverride::After(d) }))
}

fn mirror_policy(mut m: Obj<'_>) -> Result<MirrorPolicy> {
    let cluster = m.required_string("cluster")?.to_string();
    let fraction = m.object("runtime_fraction")?.map(http_filters::runtime_percent).transpose()?.unwrap_or(Percent::ALL);
    // Tracing decisions do not change what is sent.
    let _ = m.bool_value("trace_sampled")?;
    let shadow_suffix = !m.bool("disable_shadow_host_suffix_append")?.unwrap_or(false);
    m.finish()?;
    Ok(MirrorPolicy { cluster, fraction, shadow_suffix })
}

fn internal_redirect_policy(mut p: Obj<'_>) -> Result<InternalRedirectPolicy> {
    let max_internal_redirects = p.u64("max_internal_redirects")?.unwrap_or(1).min(u64::from(u32::MAX)) as u32;
    let path = p.at("redirect_response_codes");
    let codes: Vec<u16> = match p.take("redirect_response_codes") {
        None => vec![302],
        Some(serde_json::Value::Array(codes)) => codes
            .iter()
            .map(|c| c.as_u64().and_then(|c| u16::try_from(c).ok()).ok_or_else(|| ConfigError::new(path.clone(), "expected status codes")))
            .collect::<Result<_>>()?,
        Some(_) => return Err(ConfigError::new(path, "expected a list of status codes")),
    };
    // Envoy follows only these redirect codes; others in the list are ignored.
    let redirect_response_codes = codes.into_iter().filter(|c| matches!(c, 301 | 302 | 303 | 307 | 308)).collect();
    let allow_cross_scheme_redirect = p.bool("allow_cross_scheme_redirect")?.unwrap_or(false);
    if p.has("predicates") || p.has("response_headers_to_copy") {
        let key = if p.has("predicates") { "predicates" } else { "response_headers_to_copy" };
        return Err(ConfigError::new(p.at(key), "is not supported by weft yet"));
    }
    p.finish()?;
    Ok(InternalRedirectPolicy { max_internal_redirects, redirect_response_codes, allow_cross_scheme_redirect })
}

fn hash_policy(mut h: Obj<'_>) -> Result<HashPolicy> {
    let terminal = h.bool("terminal")?.unwrap_or(false);
    let mut found = Vec::new();
    if let Some(mut header) = h.object("header")? {
        found.push(HashKey::Header(header.required_string("header_name")?.to_ascii_lowercase()));
        header.finish()?;
    }
    if let Some(mut cookie) = h.object("cookie")? {
        let name = cookie.required_string("name")?.to_string();
        let ttl = cookie.duration("ttl")?;
        let path = cookie.string("path")?.map(str::to_string);
        cookie.finish()?;
        found.push(HashKey::Cookie { name, ttl, path });
    }
    if let Some(mut props) = h.object("connection_properties")? {
        if props.bool("source_ip")? == Some(true) {
            found.push(HashKey::SourceIp);
        }
        props.finish()?;
    }
    if let Some(mut q) = h.object("query_parameter")? {
        found.push(HashKey::QueryParameter(q.required_string("name")?.to_string()));
        q.finish()?;
    }
    if found.len() != 1 {
        return Err(ConfigError::new(h.path(), "needs exactly one of header, cookie, connection_properties.source_ip or query_parameter"));
    }
    h.finish()?;
    Ok(HashPolicy { key: found.remove(0), terminal })
}

fn weighted_clusters(mut w: Obj<'_>) -> Result<ClusterSpecifier> {
    let mut clusters = Vec::new();
    for mut c in w.objects("clusters")? {
        let name = c.required_string("name")?.to_string();
        let weight = c.u64("weight")?.unwrap_or(0);
        let weight = u32::try_from(weight).map_err(|_| ConfigError::new(c.at("weight"), "is too large"))?;
        let headers = headers::ops(&mut c)?;
        c.finish()?;
        clusters.push(WeightedCluster { name, weight, headers });
    }
    if clusters.is_empty() {
        return Err(ConfigError::new(w.at("clusters"), "must have at least one cluster"));
    }
    let sum: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    if let Some(total) = w.u64("total_weight")? {
        if total != sum {
            return Err(ConfigError::new(w.at("total_weight"), format!("Sum of weights in the weighted_cluster must add up to {total}")));
        }
    }
    if sum == 0 {
        return Err(ConfigError::new(w.at("clusters"), "Sum of weights in the weighted_cluster must be greater than 0"));
    }
    let _ = w.string("runtime_key_prefix")?;
    let header_name = w.string("header_name")?.map(str::to_ascii_lowercase);
    w.finish()?;
    Ok(ClusterSpecifier::Weighted(WeightedClusters { clusters, header_name }))
}

/// `RegexMatchAndSubstitute`.
fn regex_substitution(mut r: Obj<'_>) -> Result<(Regex, String)> {
    let pattern = matcher::regex(r.required_object("pattern")?)?;
    let substitution = r.string("substitution")?.unwrap_or_default().to_string();
    r.finish()?;
    Ok((pattern, substitution))
}

fn redirect(mut r: Obj<'_>) -> Result<Redirect> {
    let https = r.bool("https_redirect")?.unwrap_or(false);
    let scheme = r.string("scheme_redirect")?.map(str::to_ascii_lowercase);
    let scheme = if https { Some("https".to_string()) } else { scheme };
    let host = r.string("host_redirect")?.map(str::to_string);
    let port = r.u64("port_redirect")?.map(|p| u16::try_from(p).map_err(|_| ConfigError::new(r.at("port_redirect"), "is not a port"))).transpose()?;
    let path = r.string("path_redirect")?.map(str::to_string);
    let prefix_rewrite = r.string("prefix_rewrite")?.map(str::to_string);
    let regex_rewrite = r.object("regex_rewrite")?.map(regex_substitution).transpose()?;
    if [path.is_some(), prefix_rewrite.is_some(), regex_rewrite.is_some()].iter().filter(|b| **b).count() > 1 {
        return Err(ConfigError::new(r.path(), "needs at most one of path_redirect, prefix_rewrite or regex_rewrite"));
    }
    let status = match r.string("response_code")?.unwrap_or("MOVED_PERMANENTLY") {
        "MOVED_PERMANENTLY" => 301,
        "FOUND" => 302,
        "SEE_OTHER" => 303,
        "TEMPORARY_REDIRECT" => 307,
        "PERMANENT_REDIRECT" => 308,
        other => return Err(ConfigError::new(r.at("response_code"), format!("{other} is not a redirect response code"))),
    };
    let strip_query = r.bool("strip_query")?.unwrap_or(false);
    r.finish()?;
    Ok(Redirect { scheme, host, port, path, prefix_rewrite, regex_rewrite, status, strip_query })
}

/// Envoy's default `max_direct_response_body_size_bytes`.
const DEFAULT_MAX_DIRECT_BODY: u64 = 4096;

/// Direct response bodies larger than the route configuration allows are refused, as Envoy refuses them.
fn check_direct_bodies(vh: &Obj<'_>, routes: &[Route], max: u64) -> Result<()> {
    for (i, r) in routes.iter().enumerate() {
        if let Action::DirectResponse { body: Some(body), .. } = &r.action {
            if body.len() as u64 > max {
                let path = format!("{}.direct_response.body", vh.at(&format!("routes[{i}]")));
                return Err(ConfigError::new(path, format!("response body size is {} bytes; maximum is {max} (max_direct_response_body_size_bytes)", body.len())));
            }
        }
    }
    Ok(())
}

fn direct_response(mut dr: Obj<'_>) -> Result<Action> {
    let status = dr.u64("status")?.unwrap_or(0);
    if !(200..600).contains(&status) {
        return Err(ConfigError::new(dr.at("status"), format!("{status} is not in [200, 600)")));
    }
    let body = match dr.object("body")? {
        Some(mut b) => {
            let text = b.required_string("inline_string")?.to_string();
            b.finish()?;
            Some(text)
        }
        None => None,
    };
    dr.finish()?;
    Ok(Action::DirectResponse { status: status as u16, body })
}

fn retry_policy(mut p: Obj<'_>) -> Result<RetryPolicy> {
    let retry_on = RetryOn::parse(p.string("retry_on")?.unwrap_or_default(), true).map_err(|e| ConfigError::new(p.at("retry_on"), e))?;
    let num_retries = p.u64("num_retries")?.unwrap_or(1).min(u64::from(u32::MAX)) as u32;
    let per_try_timeout = p.duration("per_try_timeout")?.filter(|t| !t.is_zero());
    let path = p.at("retriable_status_codes");
    let retriable_status_codes = match p.take("retriable_status_codes") {
        None => Vec::new(),
        Some(serde_json::Value::Array(codes)) => codes
            .iter()
            .map(|c| c.as_u64().and_then(|c| u16::try_from(c).ok()).ok_or_else(|| ConfigError::new(path.clone(), "expected status codes")))
            .collect::<Result<_>>()?,
        Some(_) => return Err(ConfigError::new(path, "expected a list of status codes")),
    };
    let retriable_headers = p.objects("retriable_headers")?.into_iter().map(matcher::header_matcher).collect::<Result<_>>()?;
    let mut previous_hosts = false;
    for mut predicate in p.objects("retry_host_predicate")? {
        let name = predicate.string("name")?.unwrap_or_default().to_string();
        let mut typed = predicate.required_object("typed_config")?;
        super::expect_type(&mut typed, "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate")
            .map_err(|e| ConfigError::new(e.path, format!("retry host predicate {name:?}: only previous_hosts is supported")))?;
        typed.finish()?;
        predicate.finish()?;
        previous_hosts = true;
    }
    let host_selection_max_attempts = p.u64("host_selection_retry_max_attempts")?.unwrap_or(1).clamp(1, 16) as u32;
    let (mut base_interval, mut max_interval) = (Duration::from_millis(25), None);
    if let Some(mut backoff) = p.object("retry_back_off")? {
        base_interval = backoff.duration("base_interval")?.ok_or_else(|| ConfigError::new(backoff.at("base_interval"), "is required"))?;
        if base_interval.is_zero() {
            return Err(ConfigError::new(backoff.at("base_interval"), "must be greater than 0s"));
        }
        max_interval = backoff.duration("max_interval")?;
        backoff.finish()?;
    }
    p.finish()?;
    Ok(RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        retriable_status_codes,
        retriable_headers,
        previous_hosts,
        host_selection_max_attempts,
        base_interval,
        max_interval: max_interval.unwrap_or(base_interval * 10),
    })
}

/// `upgrade_configs` of a connection manager or a route: (lowercase upgrade type, enabled), and whether a
/// route's CONNECT entry carries `connect_config` (the proxy terminates CONNECT; without it CONNECT is
/// forwarded upstream as a request).
pub fn upgrade_configs(o: &mut Obj<'_>, route: bool) -> Result<(Vec<(String, bool)>, bool)> {
    let mut out = Vec::new();
    let mut terminate_connect = false;
    for mut u in o.objects("upgrade_configs")? {
        let kind = u.required_string("upgrade_type")?.to_ascii_lowercase();
        let enabled = u.bool("enabled")?.unwrap_or(true);
        if u.has("filters") {
            return Err(ConfigError::new(u.at("filters"), "upgrade filter chains are not supported by weft yet"));
        }
        match u.object("connect_config")? {
            Some(mut c) if route && kind == "connect" => {
                if c.has("proxy_protocol_config") || c.bool("allow_post")? == Some(true) {
                    return Err(ConfigError::new(c.path(), "only an empty connect_config is supported by weft"));
                }
                c.finish()?;
                terminate_connect = true;
            }
            Some(_) => return Err(ConfigError::new(u.at("connect_config"), "belongs to a route's CONNECT upgrade only")),
            None => {}
        }
        u.finish()?;
        out.push((kind, enabled));
    }
    Ok((out, terminate_connect))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Istio's default retry policy: `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`
    /// outbound, `reset-before-request` inbound.
    #[test]
    fn direct_response_bodies_are_bounded() {
        let rc = |max: serde_json::Value| {
            let mut v = json!({"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "0123456789"}}}]}]});
            if !max.is_null() {
                v["max_direct_response_body_size_bytes"] = max;
            }
            translate(Obj::new(&v, "rc").unwrap())
        };
        assert!(rc(json!(null)).is_ok() && rc(json!(10)).is_ok());
        let e = rc(json!(9)).unwrap_err();
        assert_eq!(e.path, "rc.virtual_hosts[0].routes[0].direct_response.body", "{e}");
    }

    #[test]
    fn istios_retry_conditions_parse() {
        let on = RetryOn::parse("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", true).unwrap();
        assert!(on.connect_failure && on.refused_stream && on.retriable_status_codes);
        assert!(on.grpc_status(14) && on.grpc_status(1) && !on.grpc_status(4) && !on.grpc_status(0) && !on.grpc_status(99));
        assert!(RetryOn::parse("reset-before-request", true).unwrap().reset_before_request);
        assert!(RetryOn::parse("bogus", true).unwrap_err().contains("bogus"));
    }
    use serde_json::json;

    fn rc(v: serde_json::Value) -> RouteConfiguration {
        translate(Obj::new(&v, "rc").unwrap()).unwrap()
    }

    #[test]
    fn virtual_host_precedence_is_envoys() {
        let config = rc(json!({"virtual_hosts": [
            {"name": "any", "domains": ["*"]},
            {"name": "suffix", "domains": ["*.example.com"]},
            {"name": "prefix", "domains": ["api.*"]},
            {"name": "exact", "domains": ["api.example.com"]},
        ]}));
        let pick = |h: &str| config.virtual_host(h).map(|vh| vh.name.as_str());
        assert_eq!(pick("api.example.com"), Some("exact"));
        assert_eq!(pick("www.example.com"), Some("suffix"));
        assert_eq!(pick("api.other"), Some("prefix"));
        assert_eq!(pick("elsewhere"), Some("any"));
    }

    #[test]
    fn route_errors_name_the_field() {
        let v = json!({"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c", "max_stream_duration": {"max_stream_duration": "5m"}}}]}]});
        let err = translate(Obj::new(&v, "rc").unwrap()).unwrap_err();
        assert_eq!(err.path, "rc.virtual_hosts[0].routes[0].route.max_stream_duration.max_stream_duration");
        let v = json!({"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [{"name": "a", "weight": 1}], "total_weight": 5}}}]}]});
        let err = translate(Obj::new(&v, "rc").unwrap()).unwrap_err();
        assert_eq!(err.path, "rc.virtual_hosts[0].routes[0].route.weighted_clusters.total_weight");
    }

    #[test]
    fn path_matches() {
        let sep = PathMatch::PathSeparatedPrefix("/api".into());
        assert!(sep.matches("/api", true) && sep.matches("/api/x", true) && sep.matches("/api?q", true) && !sep.matches("/apix", true));
        assert!(PathMatch::Prefix("/A".into()).matches("/abc", false) && !PathMatch::Prefix("/A".into()).matches("/abc", true));
    }
}
