//! The HTTP filters weft implements besides the router — `fault`, `cors`, `local_ratelimit` (and `rbac`, in
//! `rbac.rs`) — and their
//! per-route overrides (`typed_per_filter_config` on routes, virtual hosts and route configurations, keyed by
//! the filter's name in the connection manager).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::headers::{self, HeaderOps};
use super::matcher::{self, HeaderMatcher, StringMatcher};
use super::rbac::{self, Engines, HTTP_RBAC_PER_ROUTE};
use super::tree::{ConfigError, Obj, Result};

pub const FAULT: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
pub const CORS: &str = "envoy.extensions.filters.http.cors.v3.Cors";
pub const CORS_POLICY: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";
pub const LOCAL_RATELIMIT: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
pub const GRPC_STATS: &str = "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";
const FILTER_CONFIG: &str = "envoy.config.route.v3.FilterConfig";

/// A fraction of requests, as `FractionalPercent` or a runtime's default value.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percent {
    pub numerator: u64,
    pub denominator: u64,
}

impl Percent {
    pub const ALL: Percent = Percent { numerator: 100, denominator: 100 };
    pub const NONE: Percent = Percent { numerator: 0, denominator: 100 };

    /// Whether a request with random value `r` falls inside.
    pub fn hit(&self, r: u64) -> bool {
        self.numerator >= self.denominator || (self.numerator > 0 && r % self.denominator < self.numerator)
    }
}

pub fn fractional_percent(mut p: Obj<'_>) -> Result<Percent> {
    let numerator = p.u64("numerator")?.unwrap_or(0);
    let denominator = match p.string("denominator")?.unwrap_or("HUNDRED") {
        "HUNDRED" => 100,
        "TEN_THOUSAND" => 10_000,
        "MILLION" => 1_000_000,
        other => return Err(ConfigError::new(p.at("denominator"), format!("{other} is not a denominator"))),
    };
    p.finish()?;
    Ok(Percent { numerator, denominator })
}

/// `RuntimeFractionalPercent`: weft has no runtime, so the default value decides.
pub(crate) fn runtime_percent(mut p: Obj<'_>) -> Result<Percent> {
    let percent = fractional_percent(p.required_object("default_value")?)?;
    let _ = p.string("runtime_key")?;
    p.finish()?;
    Ok(percent)
}

/// `envoy.extensions.filters.http.fault.v3.HTTPFault`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
    /// The fault applies only to requests matching all of these.
    pub headers: Vec<HeaderMatcher>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FaultDelay {
    /// `None`: the delay comes from `x-envoy-fault-delay-request` (`header_delay`).
    pub fixed: Option<Duration>,
    pub percentage: Percent,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FaultAbort {
    pub kind: AbortKind,
    pub percentage: Percent,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum AbortKind {
    Http(u16),
    Grpc(u32),
    /// From `x-envoy-fault-abort-request` / `x-envoy-fault-abort-grpc-request`.
    Header,
}

pub fn fault(mut f: Obj<'_>) -> Result<Fault> {
    let delay = match f.object("delay")? {
        None => None,
        Some(mut d) => {
            let fixed = d.duration("fixed_delay")?;
            let header = match d.object("header_delay")? {
                Some(h) => {
                    h.finish()?;
                    true
                }
                None => false,
            };
            if fixed.is_some() == header {
                return Err(ConfigError::new(d.path(), "needs exactly one of fixed_delay or header_delay"));
            }
            let percentage = d.object("percentage")?.map(fractional_percent).transpose()?.unwrap_or(Percent::ALL);
            d.finish()?;
            Some(FaultDelay { fixed, percentage })
        }
    };
    let abort = match f.object("abort")? {
        None => None,
        Some(mut a) => {
            let found = [
                a.u64("http_status")?.map(|s| {
                    if (200..600).contains(&s) {
                        Ok(AbortKind::Http(s as u16))
                    } else {
                        Err(ConfigError::new(a.at("http_status"), format!("{s} is not in [200, 600)")))
                    }
                }),
                a.u64("grpc_status")?.map(|s| Ok(AbortKind::Grpc(s.min(u64::from(u32::MAX)) as u32))),
                a.object("header_abort")?.map(|h| h.finish().map(|()| AbortKind::Header)),
            ];
            let mut found = found.into_iter().flatten();
            let (Some(kind), None) = (found.next(), found.next()) else {
                return Err(ConfigError::new(a.path(), "needs exactly one of http_status, grpc_status or header_abort"));
            };
            let percentage = a.object("percentage")?.map(fractional_percent).transpose()?.unwrap_or(Percent::ALL);
            a.finish()?;
            Some(FaultAbort { kind: kind?, percentage })
        }
    };
    let headers = f.objects("headers")?.into_iter().map(matcher::header_matcher).collect::<Result<_>>()?;
    if f.u64("max_active_faults")?.is_some() {
        return Err(ConfigError::new(f.at("max_active_faults"), "is not supported by weft yet"));
    }
    f.finish()?;
    Ok(Fault { delay, abort, headers })
}

/// `envoy.extensions.filters.http.cors.v3.CorsPolicy`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CorsPolicy {
    pub allow_origins: Vec<StringMatcher>,
    pub allow_methods: Option<String>,
    pub allow_headers: Option<String>,
    pub expose_headers: Option<String>,
    pub max_age: Option<String>,
    pub allow_credentials: bool,
    pub enabled: Percent,
    pub forward_not_matching_preflights: bool,
}

pub fn cors_policy(mut c: Obj<'_>) -> Result<CorsPolicy> {
    let allow_origins = c.objects("allow_origin_string_match")?.into_iter().map(matcher::string_matcher).collect::<Result<_>>()?;
    let text = |c: &mut Obj<'_>, key: &str| -> Result<Option<String>> { Ok(c.string(key)?.filter(|s| !s.is_empty()).map(str::to_string)) };
    let policy = CorsPolicy {
        allow_origins,
        allow_methods: text(&mut c, "allow_methods")?,
        allow_headers: text(&mut c, "allow_headers")?,
        expose_headers: text(&mut c, "expose_headers")?,
        max_age: text(&mut c, "max_age")?,
        allow_credentials: c.bool("allow_credentials")?.unwrap_or(false),
        enabled: c.object("filter_enabled")?.map(runtime_percent).transpose()?.unwrap_or(Percent::ALL),
        forward_not_matching_preflights: c.bool("forward_not_matching_preflights")?.unwrap_or(true),
    };
    if c.object("shadow_enabled")?.is_some() {
        return Err(ConfigError::new(c.at("shadow_enabled"), "is not supported by weft yet"));
    }
    if c.bool("allow_private_network_access")? == Some(true) {
        return Err(ConfigError::new(c.at("allow_private_network_access"), "is not supported by weft yet"));
    }
    c.finish()?;
    Ok(policy)
}

/// `envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`, with its token bucket's state.
#[derive(Debug, serde::Serialize)]
pub struct LocalRateLimit {
    pub bucket: Option<TokenBucket>,
    pub enabled: Percent,
    pub enforced: Percent,
    pub status: u16,
    pub response_headers: HeaderOps,
}

impl PartialEq for LocalRateLimit {
    fn eq(&self, other: &Self) -> bool {
        self.bucket == other.bucket && self.enabled == other.enabled && self.enforced == other.enforced && self.status == other.status
    }
}

/// A token bucket refilled `tokens_per_fill` every `fill_interval`, up to `max_tokens`.
#[derive(Debug, serde::Serialize)]
pub struct TokenBucket {
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    pub fill_interval: Duration,
    #[serde(skip)]
    state: Mutex<(u64, Instant)>,
    #[serde(skip)]
    pub limited: AtomicU64,
}

impl PartialEq for TokenBucket {
    fn eq(&self, other: &Self) -> bool {
        (self.max_tokens, self.tokens_per_fill, self.fill_interval) == (other.max_tokens, other.tokens_per_fill, other.fill_interval)
    }
}

impl TokenBucket {
    /// Takes a token; `false` when none is left.
    pub fn take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        let fills = (last.elapsed().as_nanos() / self.fill_interval.as_nanos().max(1)) as u64;
        if fills > 0 {
            *tokens = (*tokens).saturating_add(fills.saturating_mul(self.tokens_per_fill)).min(self.max_tokens);
            *last += self.fill_interval * fills.min(u64::from(u32::MAX)) as u32;
        }
        if *tokens == 0 {
            self.limited.fetch_add(1, Relaxed);
            return false;
        }
        *tokens -= 1;
        true
    }
}

fn token_bucket(mut b: Obj<'_>) -> Result<TokenBucket> {
    let max_tokens = b.u64("max_tokens")?.filter(|n| *n > 0).ok_or_else(|| ConfigError::new(b.at("max_tokens"), "must be greater than 0"))?;
    let tokens_per_fill = b.u64("tokens_per_fill")?.unwrap_or(1);
    let fill_interval = b.duration("fill_interval")?.ok_or_else(|| ConfigError::new(b.at("fill_interval"), "is required"))?;
    if fill_interval < Duration::from_millis(50) {
        return Err(ConfigError::new(b.at("fill_interval"), "must be at least 50ms"));
    }
    b.finish()?;
    Ok(TokenBucket { max_tokens, tokens_per_fill, fill_interval, state: Mutex::new((max_tokens, Instant::now())), limited: AtomicU64::new(0) })
}

pub fn local_ratelimit(mut l: Obj<'_>) -> Result<LocalRateLimit> {
    let _ = l.string("stat_prefix")?;
    let bucket = l.object("token_bucket")?.map(token_bucket).transpose()?;
    // Envoy's defaults: a filter without filter_enabled / filter_enforced limits nothing.
    let enabled = l.object("filter_enabled")?.map(runtime_percent).transpose()?.unwrap_or(Percent::NONE);
    let enforced = l.object("filter_enforced")?.map(runtime_percent).transpose()?.unwrap_or(Percent::NONE);
    let status = match l.object("status")? {
        Some(mut s) => {
            let code = s.u64("code")?.unwrap_or(429);
            s.finish()?;
            u16::try_from(code).ok().filter(|c| (400..600).contains(c)).ok_or_else(|| ConfigError::new(l.at("status.code"), "must be in [400, 600)"))?
        }
        None => 429,
    };
    let response_add = l.objects("response_headers_to_add")?;
    let mut ops = HeaderOps::default();
    for o in response_add {
        ops.response_add.push(headers::option(o)?);
    }
    l.finish()?;
    Ok(LocalRateLimit { bucket, enabled, enforced, status, response_headers: ops })
}

/// One filter's configuration on a route, virtual host or route configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum FilterOverride {
    Fault(Arc<Fault>),
    Cors(Arc<CorsPolicy>),
    LocalRateLimit(Arc<LocalRateLimit>),
    /// `RBACPerRoute`: the route's own policies (none: the filter allows everything there).
    Rbac(Arc<Engines>),
    /// `FilterConfig` with `disabled: true`: the filter does not run for these requests.
    Disabled,
}

pub type PerFilterConfig = BTreeMap<String, FilterOverride>;

/// `typed_per_filter_config` of `o` (absent: empty).
pub fn per_filter_config(o: &mut Obj<'_>) -> Result<PerFilterConfig> {
    let mut out = BTreeMap::new();
    let path = o.at("typed_per_filter_config");
    let Some(value) = o.take("typed_per_filter_config") else { return Ok(out) };
    let serde_json::Value::Object(map) = value else {
        return Err(ConfigError::new(path, "expected a map of filter name to typed config"));
    };
    for (name, config) in map {
        out.insert(name.clone(), filter_override(Obj::new(config, format!("{path}.{name}"))?)?);
    }
    Ok(out)
}

fn filter_override(mut typed: Obj<'_>) -> Result<FilterOverride> {
    let type_url = typed.required_string("@type")?;
    let short = type_url.rsplit('/').next().unwrap_or(type_url);
    let parsed = match short {
        FAULT => FilterOverride::Fault(Arc::new(fault(typed)?)),
        CORS_POLICY => FilterOverride::Cors(Arc::new(cors_policy(typed)?)),
        LOCAL_RATELIMIT => FilterOverride::LocalRateLimit(Arc::new(local_ratelimit(typed)?)),
        HTTP_RBAC_PER_ROUTE => FilterOverride::Rbac(Arc::new(rbac::per_route(typed)?)),
        FILTER_CONFIG => {
            let disabled = typed.bool("disabled")?.unwrap_or(false);
            let _ = typed.bool("is_optional")?;
            if typed.object("config")?.is_some() {
                return Err(ConfigError::new(typed.at("config"), "is not supported by weft yet"));
            }
            if !disabled {
                return Err(ConfigError::new(typed.path(), "a FilterConfig without disabled: true is not supported by weft yet"));
            }
            typed.finish()?;
            FilterOverride::Disabled
        }
        _ => return Err(ConfigError::new(typed.at("@type"), format!("per-route configuration of type {type_url} is not supported by weft"))),
    };
    Ok(parsed)
}

/// `envoy.filters.http.grpc_stats` (`envoy.extensions.filters.http.grpc_stats.v3.FilterConfig`), which istiod
/// puts on every connection manager: Envoy counts gRPC messages per cluster (and per method) and, with
/// `emit_filter_state`, leaves the counts for `istio.stats`. It is telemetry only: weft accepts every field
/// and keeps them (for config dumps and a future stats implementation); no request or response changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GrpcStats {
    pub emit_filter_state: bool,
    /// `stats_for_all_methods` (default false): per-method stats for every method.
    pub stats_for_all_methods: bool,
    /// `individual_method_stats_allowlist`: the `service/method`s with stats of their own.
    pub method_allowlist: Vec<String>,
    pub enable_upstream_stats: bool,
    pub replace_dots_in_grpc_service_name: bool,
}

pub fn grpc_stats(mut c: Obj<'_>) -> Result<GrpcStats> {
    let mut out = GrpcStats {
        emit_filter_state: c.bool("emit_filter_state")?.unwrap_or(false),
        stats_for_all_methods: c.bool_value("stats_for_all_methods")?.unwrap_or(false),
        enable_upstream_stats: c.bool("enable_upstream_stats")?.unwrap_or(false),
        replace_dots_in_grpc_service_name: c.bool("replace_dots_in_grpc_service_name")?.unwrap_or(false),
        method_allowlist: Vec::new(),
    };
    if let Some(mut list) = c.object("individual_method_stats_allowlist")? {
        for mut service in list.objects("services")? {
            let name = service.required_string("name")?;
            out.method_allowlist.extend(service.strings("method_names")?.into_iter().map(|m| format!("{name}/{m}")));
            service.finish()?;
        }
        list.finish()?;
    }
    c.finish()?;
    Ok(out)
}

pub const PEER_METADATA: &str = "io.istio.http.peer_metadata.Config";

/// `io.istio.http.peer_metadata.Config` (istiod's HTTP `istio.metadata_exchange`): Istio's peer metadata in
/// the `x-envoy-peer-metadata` and `x-envoy-peer-metadata-id` headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerMetadata {
    /// How the downstream peer is found on the request, in order (the first that finds it wins).
    pub downstream_discovery: Vec<Discovery>,
    /// How the upstream peer is found on the response.
    pub upstream_discovery: Vec<Discovery>,
    /// Answer a request that carried the headers with this side's.
    pub downstream_propagation: Vec<IstioHeaders>,
    /// Send this side's headers with the request upstream.
    pub upstream_propagation: Vec<IstioHeaders>,
    /// Peer labels kept besides the canonical service ones.
    pub additional_labels: Vec<String>,
}

/// A discovery method of the peer metadata filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// The `x-envoy-peer-metadata*` headers: read, then removed.
    IstioHeaders,
    /// Workload discovery (WDS) by the peer's address: weft has no WDS, so it finds nothing.
    WorkloadDiscovery,
    /// Deprecated; istio-proxy builds nothing for it either.
    Baggage,
}

/// The `istio_headers` propagation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IstioHeaders {
    /// Not to `PassthroughCluster` nor to clusters with metadata `istio.external: true`.
    pub skip_external_clusters: bool,
}

impl PeerMetadata {
    pub fn discovers_by_headers(&self, downstream: bool) -> bool {
        let methods = if downstream { &self.downstream_discovery } else { &self.upstream_discovery };
        methods.contains(&Discovery::IstioHeaders)
    }
}

/// The filter's `typed_config` (its `@type` already read). `shared_with_upstream` (filter state shared with
/// upstream connections) is accepted: weft keeps no filter state to share.
pub fn peer_metadata(mut c: Obj<'_>) -> Result<PeerMetadata> {
    let downstream_discovery = c.objects("downstream_discovery")?.into_iter().map(discovery).collect::<Result<_>>()?;
    let upstream_discovery = c.objects("upstream_discovery")?.into_iter().map(discovery).collect::<Result<_>>()?;
    let downstream_propagation = c.objects("downstream_propagation")?.into_iter().map(propagation).collect::<Result<_>>()?;
    let upstream_propagation = c.objects("upstream_propagation")?.into_iter().map(propagation).collect::<Result<_>>()?;
    let _ = c.bool("shared_with_upstream")?;
    let additional_labels = c.strings("additional_labels")?.into_iter().map(str::to_string).collect();
    c.finish()?;
    Ok(PeerMetadata { downstream_discovery, upstream_discovery, downstream_propagation, upstream_propagation, additional_labels })
}

/// `DiscoveryMethod`: exactly one of `istio_headers`, `workload_discovery`, `baggage`.
fn discovery(mut m: Obj<'_>) -> Result<Discovery> {
    let mut found = Vec::new();
    if let Some(h) = m.object("istio_headers")? {
        istio_headers(h)?;
        found.push(Discovery::IstioHeaders);
    }
    for (key, kind) in [("workload_discovery", Discovery::WorkloadDiscovery), ("baggage", Discovery::Baggage)] {
        if let Some(o) = m.object(key)? {
            o.finish()?;
            found.push(kind);
        }
    }
    let path = m.path().to_string();
    m.finish()?;
    match found[..] {
        [one] => Ok(one),
        _ => Err(ConfigError::new(path, "needs exactly one of istio_headers, workload_discovery or baggage")),
    }
}

/// `PropagationMethod`: `istio_headers`.
fn propagation(mut m: Obj<'_>) -> Result<IstioHeaders> {
    let path = m.at("istio_headers");
    let headers = m.object("istio_headers")?.map(istio_headers).transpose()?;
    m.finish()?;
    headers.ok_or_else(|| ConfigError::new(path, "is required (the only propagation method)"))
}

fn istio_headers(mut h: Obj<'_>) -> Result<IstioHeaders> {
    let skip_external_clusters = h.bool("skip_external_clusters")?.unwrap_or(false);
    h.finish()?;
    Ok(IstioHeaders { skip_external_clusters })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn istiods_peer_metadata_configs_translate() {
        let inbound = json!({"downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}], "downstream_propagation": [{"istio_headers": {}}]});
        let p = peer_metadata(Obj::new(&inbound, "f").unwrap()).unwrap();
        assert_eq!(p.downstream_discovery, [Discovery::IstioHeaders, Discovery::WorkloadDiscovery]);
        assert_eq!(p.downstream_propagation, [IstioHeaders { skip_external_clusters: false }]);
        assert!(p.discovers_by_headers(true) && !p.discovers_by_headers(false) && p.upstream_propagation.is_empty());
        let outbound = json!({"upstream_discovery": [{"istio_headers": {}}], "upstream_propagation": [{"istio_headers": {"skip_external_clusters": true}}], "shared_with_upstream": true});
        let p = peer_metadata(Obj::new(&outbound, "f").unwrap()).unwrap();
        assert_eq!(p.upstream_propagation, [IstioHeaders { skip_external_clusters: true }]);
    }

    #[test]
    fn malformed_methods_are_refused_by_path() {
        let two = json!({"downstream_discovery": [{"istio_headers": {}, "baggage": {}}]});
        assert_eq!(peer_metadata(Obj::new(&two, "f").unwrap()).unwrap_err().path, "f.downstream_discovery[0]");
        let none = json!({"upstream_propagation": [{}]});
        assert_eq!(peer_metadata(Obj::new(&none, "f").unwrap()).unwrap_err().path, "f.upstream_propagation[0].istio_headers");
        let unknown = json!({"upstream_propagation": [{"istio_headers": {"bogus": 1}}]});
        assert_eq!(peer_metadata(Obj::new(&unknown, "f").unwrap()).unwrap_err().path, "f.upstream_propagation[0].istio_headers.bogus");
    }
}
