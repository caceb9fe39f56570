//! `envoy.config.cluster.v3.Cluster`: where upstream connections go.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::metadata::Metadata;
use super::metadata_exchange::{self, MetadataExchange, METADATA_EXCHANGE};
use super::tls::{TransportSocket, UpstreamTls};
use super::tree::{ConfigError, Obj, Result};
use super::socket_address;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    /// Upstream speaks HTTP/2 (gRPC clusters such as the ADS cluster).
    pub http2: bool,
    /// `use_downstream_protocol_config`: upstream requests use the downstream request's HTTP version.
    pub follow_downstream_protocol: bool,
    /// Pooled connections unused this long are closed (`common_http_protocol_options.idle_timeout`,
    /// Envoy's default 1 h; `None`: never).
    pub idle_timeout: Option<Duration>,
    /// `max_requests_per_connection`: a connection carries at most this many requests.
    pub max_requests_per_connection: Option<u64>,
    /// `http2_protocol_options` settings of an HTTP/2 upstream (unset: hyper's defaults, Envoy's pool limits).
    pub http2_settings: Http2Settings,
    /// `upstream_bind_config.source_address`: the local address upstream connections are made from (Istio's
    /// inbound clusters use 127.0.0.6, which capture lets through).
    pub source_address: Option<SocketAddr>,
    pub circuit_breakers: CircuitBreakers,
    pub outlier_detection: Option<OutlierDetection>,
    /// `common_lb_config.healthy_panic_threshold` (percent, default 50): below it, every endpoint is used.
    pub healthy_panic_threshold: f64,
    /// `common_lb_config.locality_weighted_lb_config`: a priority level's traffic is shared among its
    /// localities by their `load_balancing_weight` and availability before an endpoint is chosen.
    pub locality_weighted: bool,
    /// The active health check (`health_checks`, one).
    pub health_check: Option<HealthCheck>,
    /// TLS originated on every upstream connection, or plaintext: the socket of endpoints no
    /// `transport_socket_matches` entry selects.
    pub transport_socket: TransportSocket<UpstreamTls>,
    /// `transport_socket_matches`: per endpoint, the first entry whose criteria its metadata
    /// (`envoy.transport_socket_match`) carries (Istio's auto mTLS: `tlsMode: istio` endpoints get mTLS).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transport_socket_matches: Vec<TransportSocketMatch>,
    /// `metadata`: every namespace kept, Istio's read (`istio.alpn_override`, `external`, `disable_mx`...).
    pub metadata: Metadata,
    /// `filters`: Istio's TCP metadata exchange on every connection (the only upstream network filter weft
    /// has).
    pub metadata_exchange: Option<Arc<MetadataExchange>>,
    /// `per_connection_buffer_limit_bytes`: the most of an upstream connection's data held at once.
    pub buffer_limit: usize,
}

/// `envoy.config.cluster.v3.Cluster.TransportSocketMatch`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TransportSocketMatch {
    pub name: String,
    /// Key/value pairs an endpoint's `envoy.transport_socket_match` metadata must all have (none: every endpoint).
    pub criteria: SocketMatchLabels,
    pub socket: TransportSocket<UpstreamTls>,
}

/// The `envoy.transport_socket_match` metadata of an endpoint, or the criteria of a match.
pub type SocketMatchLabels = BTreeMap<String, serde_json::Value>;

/// The endpoint metadata namespace `transport_socket_matches` read.
pub const SOCKET_MATCH_NAMESPACE: &str = "envoy.transport_socket_match";

/// `envoy.config.core.v3.HealthCheck`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HealthCheck {
    pub timeout: Duration,
    pub interval: Duration,
    /// Consecutive failures that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that make an unhealthy endpoint healthy (one suffices for a new endpoint).
    pub healthy_threshold: u32,
    pub kind: HealthCheckKind,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum HealthCheckKind {
    /// A connection is made; `send` is written and every block of `receive` must then arrive, in order
    /// (not necessarily adjacent). Without `receive`, the connection alone passes.
    Tcp { send: Vec<u8>, receive: Vec<Vec<u8>> },
    Http(Box<HttpCheck>),
    /// `grpc.health.v1.Health/Check` for `service` answers SERVING.
    Grpc { service: String, authority: Option<String> },
}

/// An HTTP health check: `method path` with `host` (the cluster's name by default) answers a status in
/// `statuses` (`[start, end)`) and, with `receive`, a body whose first `response_buffer_size` bytes (all of
/// it when `None`) contain the `receive` blocks in order.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HttpCheck {
    pub path: String,
    pub host: Option<String>,
    pub statuses: Vec<(u16, u16)>,
    pub headers: super::headers::HeaderOps,
    pub method: String,
    /// The request body (`send`).
    pub send: Vec<u8>,
    pub receive: Vec<Vec<u8>>,
    pub response_buffer_size: Option<usize>,
    /// `codec_client_type: HTTP2`: HTTP/2 with prior knowledge.
    pub http2: bool,
}

/// The default priority's `circuit_breakers` thresholds (Envoy's defaults: 1024, 1024, 1024, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CircuitBreakers {
    pub max_connections: u64,
    pub max_pending_requests: u64,
    pub max_requests: u64,
    pub max_retries: u64,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3 }
    }
}

/// `http2_protocol_options` of an HTTP/2 connection (upstream, or a connection manager's downstream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Http2Settings {
    /// Streams one pooled connection carries at once; more requests open another connection.
    pub max_concurrent_streams: Option<u32>,
    pub initial_stream_window_size: Option<u32>,
    pub initial_connection_window_size: Option<u32>,
}

/// `outlier_detection`: consecutive errors (what Istio's DestinationRule `outlierDetection` sets), and the
/// success-rate and failure-percentage sweeps every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    /// Percent of detections that eject.
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// `always_eject_one_host`: one host may be ejected whatever `max_ejection_percent` says.
    pub always_eject_one_host: bool,
    /// How often the success-rate and failure-percentage sweeps run (each over the interval just ended).
    pub interval: Duration,
    pub success_rate: SuccessRate,
    pub failure_percentage: FailurePercentage,
}

/// Success-rate ejection: among the hosts with `request_volume` requests in the interval (at least
/// `minimum_hosts` of them), those below mean - stdev × `stdev_factor`/1000 are ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SuccessRate {
    pub minimum_hosts: u64,
    pub request_volume: u64,
    pub stdev_factor: u64,
    pub enforcing: u32,
}

/// Failure-percentage ejection: among the hosts with `request_volume` requests in the interval (at least
/// `minimum_hosts` of them), those failing `threshold` percent or more are ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FailurePercentage {
    pub threshold: u64,
    pub minimum_hosts: u64,
    pub request_volume: u64,
    pub enforcing: u32,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Discovery {
    /// Fixed endpoints from `load_assignment`, with the hostnames some of them have.
    Static { endpoints: Assignment, hostnames: Vec<(SocketAddr, String)> },
    /// Connect to the downstream connection's original destination. `cleanup_interval` (Envoy's default 5s)
    /// is accepted and changes nothing: Envoy drops a destination's host, and with it the host's pooled
    /// connections, once it has gone unused for an interval. weft keeps no host list to clean up: every
    /// request or connection goes to the destination it names, pooled connections to a destination close
    /// after the cluster's idle timeout (as for every cluster), and the small per-destination counters
    /// (requests in flight, outlier state) live as long as the cluster does.
    OriginalDst,
    /// Endpoints from EDS (over ADS), for `service_name`.
    Eds { service_name: String },
    /// STRICT_DNS (every address of every host) or LOGICAL_DNS (the first address of the one host), resolved
    /// again every `refresh`, or with `respect_dns_ttl` when the answer's TTL runs out.
    Dns { hosts: Vec<(String, u16)>, logical: bool, refresh: Duration, family: DnsFamily, respect_dns_ttl: bool },
}

/// `dns_lookup_family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DnsFamily {
    /// IPv6 addresses when there are any, else IPv4 (Envoy's AUTO).
    Auto,
    V4Only,
    V6Only,
    /// IPv4 addresses when there are any, else IPv6.
    V4Preferred,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    RoundRobin,
    Random,
    ClusterProvided,
    LeastRequest { choice_count: u32 },
    RingHash { min_ring_size: u64, max_ring_size: u64 },
    Maglev { table_size: u64 },
}

/// A cluster's endpoints by priority level (0 first). An endpoint appears as many times as its
/// `load_balancing_weight` (scaled down to at most [`MAX_WEIGHT_SLOTS`] per level), so round robin, random and
/// the hash rings give it its share; endpoints EDS marks unhealthy, draining or timed out are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Assignment {
    pub priorities: Vec<Vec<SocketAddr>>,
    /// Each priority level's localities (for `locality_weighted_lb_config`), in Envoy's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub localities: Vec<Vec<Locality>>,
    /// Endpoints' `envoy.transport_socket_match` metadata (which of the cluster's sockets they get).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub socket_labels: BTreeMap<SocketAddr, SocketMatchLabels>,
}

/// The endpoints of one locality of a priority level.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Locality {
    /// Its `load_balancing_weight`; 0 when no entry of the locality has one (it then takes no traffic).
    pub weight: u32,
    /// The endpoints that serve (each once).
    pub hosts: Vec<SocketAddr>,
    /// Every endpoint listed, including those EDS marks unhealthy: availability is `hosts` out of this.
    pub total: usize,
}

/// The most slots one priority level's weighted endpoints take.
pub const MAX_WEIGHT_SLOTS: u64 = 10_000;

impl Assignment {
    /// An endpoint's `envoy.transport_socket_match` metadata.
    pub fn socket_labels(&self, endpoint: SocketAddr) -> Option<&SocketMatchLabels> {
        self.socket_labels.get(&endpoint)
    }

    /// Every distinct endpoint, in order.
    pub fn hosts(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for e in self.priorities.iter().flatten() {
            if !out.contains(e) {
                out.push(*e);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.priorities.iter().all(Vec::is_empty)
    }
}

/// Envoy's default `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Cluster {
    /// The TLS contexts it may originate with (the default socket's and every match's).
    pub fn tls_contexts(&self) -> impl Iterator<Item = &super::tls::CommonTls> {
        std::iter::once(&self.transport_socket).chain(self.transport_socket_matches.iter().map(|m| &m.socket)).filter_map(|s| match s {
            TransportSocket::Tls(t) => Some(&t.common),
            TransportSocket::RawBuffer => None,
        })
    }

    /// The socket for an endpoint with `labels` (its `envoy.transport_socket_match` metadata), as Envoy
    /// chooses it: the first match all of whose criteria the endpoint has, else the cluster's own.
    pub fn transport_socket_for(&self, labels: Option<&SocketMatchLabels>) -> &TransportSocket<UpstreamTls> {
        let has = |criteria: &SocketMatchLabels| criteria.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        self.transport_socket_matches.iter().find(|m| has(&m.criteria)).map_or(&self.transport_socket, |m| &m.socket)
    }
}

pub fn translate(mut c: Obj<'_>) -> Result<Cluster> {
    let name = c.required_string("name")?.to_string();
    let kind = c.string("type")?.unwrap_or("STATIC");
    let connect_timeout = c.duration("connect_timeout")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let buffer_limit = super::buffer_limit(&mut c)?;
    if connect_timeout.is_zero() {
        return Err(ConfigError::new(c.at("connect_timeout"), "must be greater than 0s"));
    }
    let lb_policy = lb_policy(&mut c)?;
    let circuit_breakers = c.object("circuit_breakers")?.map(circuit_breakers).transpose()?.unwrap_or_default();
    let outlier_detection = c.object("outlier_detection")?.map(outlier_detection).transpose()?;
    let mut healthy_panic_threshold = 50.0;
    let mut locality_weighted = false;
    if let Some(mut common) = c.object("common_lb_config")? {
        if let Some(mut t) = common.object("healthy_panic_threshold")? {
            healthy_panic_threshold = number(&mut t, "value")?.unwrap_or(0.0).clamp(0.0, 100.0);
            t.finish()?;
        }
        if let Some(l) = common.object("locality_weighted_lb_config")? {
            l.finish()?;
            locality_weighted = locality_weighting(&common, lb_policy, kind)?;
        }
        common.finish()?;
    }
    let mut protocol = http2_options(&mut c)?;
    if let Some(n) = c.u64("max_requests_per_connection")?.filter(|n| *n > 0) {
        protocol.max_requests_per_connection = Some(n);
    }
    let HttpOptions { http2, follow_downstream_protocol, idle_timeout, max_requests_per_connection, http2_settings } = protocol;
    let source_address = c.object("upstream_bind_config")?.map(bind_config).transpose()?;
    let transport_socket = super::tls::upstream(c.object("transport_socket")?)?;
    let transport_socket_matches = c.objects("transport_socket_matches")?.into_iter().map(socket_match).collect::<Result<Vec<_>>>()?;
    let metadata_exchange = upstream_filters(&mut c)?;
    let mut checks = c.objects("health_checks")?;
    if checks.len() > 1 {
        return Err(ConfigError::new(c.at("health_checks"), "weft supports one health check per cluster"));
    }
    let health_check = checks.pop().map(super::health_check::translate).transpose()?;
    let metadata = c.object("metadata")?.map(super::metadata::translate).transpose()?.unwrap_or_default();
    // Used by ORIGINAL_DST clusters only (see `Discovery::OriginalDst`); Envoy accepts it on any cluster.
    if c.duration("cleanup_interval")?.is_some_and(|d| d.is_zero()) {
        return Err(ConfigError::new(c.at("cleanup_interval"), "must be greater than 0s"));
    }
    let any_tls = transport_socket != TransportSocket::RawBuffer || transport_socket_matches.iter().any(|m| m.socket != TransportSocket::RawBuffer);
    if health_check.is_some() && any_tls {
        return Err(ConfigError::new(c.at("health_checks"), "health checks of a TLS cluster are not supported yet (they would check in plaintext)"));
    }
    let discovery = match kind {
        "STATIC" => {
            if lb_policy == LbPolicy::ClusterProvided {
                return Err(ConfigError::new(c.at("lb_policy"), "CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters"));
            }
            let (endpoints, hostnames) = load_assignment(&mut c)?;
            Discovery::Static { endpoints, hostnames }
        }
        "EDS" => {
            if lb_policy == LbPolicy::ClusterProvided {
                return Err(ConfigError::new(c.at("lb_policy"), "CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters"));
            }
            let mut eds = c.required_object("eds_cluster_config")?;
            let service_name = eds.string("service_name")?.unwrap_or(&name).to_string();
            super::ads_source(eds.required_object("eds_config")?, "EDS")?;
            eds.finish()?;
            Discovery::Eds { service_name }
        }
        "ORIGINAL_DST" => {
            if lb_policy != LbPolicy::ClusterProvided {
                return Err(ConfigError::new(
                    c.at("lb_policy"),
                    "cluster: LB policy ROUND_ROBIN is not valid for Cluster type ORIGINAL_DST. Only 'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'",
                ));
            }
            if c.has("load_assignment") {
                return Err(ConfigError::new(c.at("load_assignment"), "ORIGINAL_DST clusters must have no load assignment configured"));
            }
            Discovery::OriginalDst
        }
        "STRICT_DNS" | "LOGICAL_DNS" => dns(&mut c, kind == "LOGICAL_DNS", lb_policy)?,
        other => {
            return Err(ConfigError::new(
                c.at("type"),
                format!("{other} clusters are not supported yet; use STATIC, STRICT_DNS, LOGICAL_DNS, EDS or ORIGINAL_DST"),
            ))
        }
    };
    c.finish()?;
    Ok(Cluster {
        name,
        discovery,
        connect_timeout,
        lb_policy,
        http2,
        follow_downstream_protocol,
        idle_timeout,
        max_requests_per_connection,
        http2_settings,
        source_address,
        circuit_breakers,
        outlier_detection,
        healthy_panic_threshold,
        locality_weighted,
        health_check,
        transport_socket,
        transport_socket_matches,
        metadata,
        metadata_exchange,
        buffer_limit,
    })
}

fn socket_match(mut m: Obj<'_>) -> Result<TransportSocketMatch> {
    let name = m.string("name")?.unwrap_or_default().to_string();
    let criteria = match m.take("match") {
        None => SocketMatchLabels::new(),
        Some(serde_json::Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(_) => return Err(ConfigError::new(m.at("match"), "expected an object of key/value criteria")),
    };
    let socket = super::tls::upstream(m.object("transport_socket")?)?;
    m.finish()?;
    Ok(TransportSocketMatch { name, criteria, socket })
}

/// `filters` (upstream network filters): Istio's metadata exchange, at most once; other types are refused.
fn upstream_filters(c: &mut Obj<'_>) -> Result<Option<Arc<MetadataExchange>>> {
    let mut exchange = None;
    for mut f in c.objects("filters")? {
        let _ = f.string("name")?;
        let mut typed = f.required_object("typed_config")?;
        let type_url = typed.required_string("@type")?;
        if type_url.rsplit('/').next() != Some(METADATA_EXCHANGE) {
            return Err(ConfigError::new(typed.at("@type"), format!("upstream network filter {type_url} is not supported; weft has {METADATA_EXCHANGE}")));
        }
        if exchange.is_some() {
            return Err(ConfigError::new(f.path(), "weft runs one metadata exchange per cluster; remove the second"));
        }
        exchange = Some(Arc::new(metadata_exchange::translate(typed)?));
        f.finish()?;
    }
    Ok(exchange)
}

/// Whether `locality_weighted_lb_config` can be honoured: the hash balancers fold locality weights into
/// their rings in Envoy (not done by weft), and weft's DNS clusters do not keep localities.
fn locality_weighting(common: &Obj<'_>, lb_policy: LbPolicy, kind: &str) -> Result<bool> {
    let path = common.at("locality_weighted_lb_config");
    if matches!(lb_policy, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }) {
        return Err(ConfigError::new(path, "is not supported by weft with RING_HASH or MAGLEV yet"));
    }
    if matches!(kind, "STRICT_DNS" | "LOGICAL_DNS") {
        return Err(ConfigError::new(path, "is not supported by weft for DNS clusters yet"));
    }
    Ok(true)
}

fn load_assignment(c: &mut Obj<'_>) -> Result<(Assignment, Vec<(SocketAddr, String)>)> {
    // Envoy accepts any cluster_name for a static cluster's inline assignment; only the endpoints matter.
    let Some(la) = c.object("load_assignment")? else { return Ok(Default::default()) };
    let mut hostnames = Vec::new();
    let (_, endpoints) = read_assignment(la, Some(&mut hostnames))?;
    Ok((endpoints, hostnames))
}

/// `envoy.config.endpoint.v3.ClusterLoadAssignment`: its cluster (service) name and endpoints.
pub fn assignment(la: Obj<'_>) -> Result<(String, Assignment)> {
    read_assignment(la, None)
}

/// Endpoint hostnames (for `auto_host_rewrite`) are kept where `hostnames` is given (static clusters) and
/// refused elsewhere, so they are never silently dropped. Localities are kept for
/// `locality_weighted_lb_config`; without it Envoy does not balance by them either.
fn read_assignment(mut la: Obj<'_>, mut hostnames: Option<&mut Vec<(SocketAddr, String)>>) -> Result<(String, Assignment)> {
    let name = la.string("cluster_name")?.unwrap_or_default().to_string();
    let mut levels: Vec<Vec<(SocketAddr, u64)>> = Vec::new();
    let mut socket_labels = BTreeMap::new();
    let mut localities: Vec<Vec<(LocalityKey, Locality)>> = Vec::new();
    for mut locality in la.objects("endpoints")? {
        let priority = locality.u64("priority")?.unwrap_or(0);
        if priority > 128 {
            return Err(ConfigError::new(locality.at("priority"), format!("{priority} is not a priority (0-128)")));
        }
        let key = match locality.object("locality")? {
            Some(l) => Some(locality_key(l)?),
            None => None,
        };
        let weight = locality.u64("load_balancing_weight")?;
        if weight == Some(0) {
            return Err(ConfigError::new(locality.at("load_balancing_weight"), "must be greater than or equal to 1"));
        }
        let weight = weight.map(|w| w.min(u64::from(u32::MAX)) as u32);
        let mut listed = 0;
        let mut entries = Vec::new();
        for mut lb in locality.objects("lb_endpoints")? {
            let mut endpoint = lb.required_object("endpoint")?;
            let address = socket_address(endpoint.required_object("address")?)?;
            if let Some(names) = hostnames.as_deref_mut() {
                if let Some(h) = endpoint.string("hostname")?.filter(|h| !h.is_empty()) {
                    names.push((address, h.to_string()));
                }
            }
            endpoint.finish()?;
            if let Some(labels) = lb.object("metadata")?.map(endpoint_metadata).transpose()?.flatten() {
                socket_labels.insert(address, labels);
            }
            let weight = lb.u64("load_balancing_weight")?.unwrap_or(1);
            if weight == 0 {
                return Err(ConfigError::new(lb.at("load_balancing_weight"), "must be greater than 0"));
            }
            let status = lb.string("health_status")?.unwrap_or("UNKNOWN");
            let serves = match status {
                "UNKNOWN" | "HEALTHY" | "DEGRADED" => true,
                "UNHEALTHY" | "DRAINING" | "TIMEOUT" => false,
                other => return Err(ConfigError::new(lb.at("health_status"), format!("{other} is not a health status"))),
            };
            lb.finish()?;
            // Envoy excludes draining hosts from a locality's count; unhealthy ones count as unavailable.
            if status != "DRAINING" {
                listed += 1;
            }
            if serves {
                entries.push((address, weight));
            }
        }
        locality.finish()?;
        let level = priority as usize;
        if levels.len() <= level {
            levels.resize_with(level + 1, Vec::new);
            localities.resize_with(level + 1, Vec::new);
        }
        add_locality(&mut localities[level], key, weight, entries.iter().map(|(a, _)| *a), listed);
        levels[level].extend(entries);
    }
    la.finish()?;
    let priorities = levels.into_iter().map(weighted_slots).collect();
    let localities = localities.into_iter().map(|level| level.into_iter().map(|(_, l)| l).collect()).collect();
    Ok((name, Assignment { priorities, localities, socket_labels }))
}

/// An endpoint's `metadata`: its `envoy.transport_socket_match` labels. Other namespaces (Istio's
/// `istio.workload` telemetry key) change nothing weft does and are accepted as Envoy accepts metadata no
/// filter reads.
fn endpoint_metadata(mut m: Obj<'_>) -> Result<Option<SocketMatchLabels>> {
    let path = m.at("filter_metadata");
    let labels = match m.take("filter_metadata") {
        None => None,
        Some(serde_json::Value::Object(namespaces)) => match namespaces.get(SOCKET_MATCH_NAMESPACE) {
            None => None,
            Some(serde_json::Value::Object(map)) => Some(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            Some(_) => return Err(ConfigError::new(format!("{path}.{SOCKET_MATCH_NAMESPACE}"), "expected an object")),
        },
        Some(_) => return Err(ConfigError::new(path, "expected an object of metadata namespaces")),
    };
    m.finish()?;
    Ok(labels)
}

/// A locality's `region`, `zone`, `sub_zone`: Envoy orders a level's localities by them.
type LocalityKey = (String, String, String);

fn locality_key(mut l: Obj<'_>) -> Result<LocalityKey> {
    let mut parts = [String::new(), String::new(), String::new()];
    for (part, key) in parts.iter_mut().zip(["region", "zone", "sub_zone"]) {
        *part = l.string(key)?.unwrap_or_default().to_string();
    }
    l.finish()?;
    let [region, zone, sub_zone] = parts;
    Ok((region, zone, sub_zone))
}

/// Adds one `LocalityLbEndpoints` entry to its level's localities, as Envoy groups them: entries of the same
/// locality share its endpoints, and its weight is the last one given by an entry that names the locality
/// (an entry without `locality` is in the unnamed locality but never gives it a weight).
fn add_locality(level: &mut Vec<(LocalityKey, Locality)>, key: Option<LocalityKey>, weight: Option<u32>, hosts: impl Iterator<Item = SocketAddr>, listed: usize) {
    let named = key.is_some();
    let key = key.unwrap_or_default();
    let index = match level.binary_search_by(|(k, _)| k.cmp(&key)) {
        Ok(i) => i,
        Err(i) => {
            level.insert(i, (key, Locality::default()));
            i
        }
    };
    let locality = &mut level[index].1;
    if let (true, Some(w)) = (named, weight) {
        locality.weight = w;
    }
    for h in hosts {
        if !locality.hosts.contains(&h) {
            locality.hosts.push(h);
        }
    }
    locality.total += listed;
}

/// Each endpoint repeated by its weight (divided by the weights' common divisor, scaled down proportionally
/// when the level would take more than [`MAX_WEIGHT_SLOTS`]).
fn weighted_slots(entries: Vec<(SocketAddr, u64)>) -> Vec<SocketAddr> {
    let gcd = entries.iter().fold(0, |g, (_, w)| gcd(g, *w)).max(1);
    let total: u64 = entries.iter().map(|(_, w)| w / gcd).sum();
    let scale = if total > MAX_WEIGHT_SLOTS { total as f64 / MAX_WEIGHT_SLOTS as f64 } else { 1.0 };
    entries.iter().flat_map(|(a, w)| std::iter::repeat_n(*a, (((w / gcd) as f64 / scale).round() as usize).max(1))).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `envoy.config.core.v3.BindConfig`: only the source address (a `SocketAddress`, not an `Address`).
fn bind_config(mut b: Obj<'_>) -> Result<SocketAddr> {
    let source = super::bare_socket_address(b.required_object("source_address")?)?;
    b.finish()?;
    Ok(source)
}

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// What a cluster's HTTP protocol options say.
struct HttpOptions {
    http2: bool,
    follow_downstream_protocol: bool,
    idle_timeout: Option<Duration>,
    max_requests_per_connection: Option<u64>,
    http2_settings: Http2Settings,
}

/// The upstream HTTP protocol: `http2_protocol_options`, or `typed_extension_protocol_options`
/// HttpProtocolOptions with `explicit_http_config` or `use_downstream_protocol_config`, and its
/// `common_http_protocol_options`.
fn http2_options(c: &mut Obj<'_>) -> Result<HttpOptions> {
    let mut out = HttpOptions {
        http2: false,
        follow_downstream_protocol: false,
        idle_timeout: Some(Duration::from_secs(3600)),
        max_requests_per_connection: None,
        http2_settings: Http2Settings::default(),
    };
    if let Some(o) = c.object("http2_protocol_options")? {
        out.http2_settings = http2_settings(o)?;
        out.http2 = true;
    }
    if let Some(mut ext) = c.object("typed_extension_protocol_options")? {
        if let Some(mut opts) = ext.object(HTTP_PROTOCOL_OPTIONS)? {
            super::expect_type(&mut opts, HTTP_PROTOCOL_OPTIONS)?;
            match (opts.object("explicit_http_config")?, opts.object("use_downstream_protocol_config")?) {
                (Some(mut explicit), None) => {
                    match (explicit.object("http2_protocol_options")?, explicit.object("http_protocol_options")?) {
                        (Some(h2), None) => {
                            out.http2_settings = http2_settings(h2)?;
                            out.http2 = true;
                        }
                        (None, Some(h1)) => h1.finish()?,
                        _ => return Err(ConfigError::new(explicit.path(), "needs exactly one of http_protocol_options or http2_protocol_options")),
                    }
                    explicit.finish()?;
                }
                (None, Some(mut follow)) => {
                    for key in ["http_protocol_options", "http2_protocol_options"] {
                        if let Some(o) = follow.object(key)? {
                            o.finish()?;
                        }
                    }
                    follow.finish()?;
                    out.follow_downstream_protocol = true;
                }
                _ => return Err(ConfigError::new(opts.path(), "needs exactly one of explicit_http_config or use_downstream_protocol_config")),
            }
            if let Some(mut common) = opts.object("common_http_protocol_options")? {
                out.idle_timeout = common.timeout("idle_timeout", out.idle_timeout)?;
                out.max_requests_per_connection = common.u64("max_requests_per_connection")?.filter(|n| *n > 0);
                common.finish()?;
            }
            opts.finish()?;
        }
        ext.finish()?;
    }
    Ok(out)
}

/// `envoy.config.core.v3.Http2ProtocolOptions`: the settings weft applies to its upstream HTTP/2 connections
/// (ranges as Envoy validates them); any other field is refused by its path.
/// `Http2ProtocolOptions`: the settings weft applies (on upstream connections, and on downstream ones of a
/// connection manager); others are refused by path.
pub(crate) fn http2_settings(mut o: Obj<'_>) -> Result<Http2Settings> {
    let within = |o: &mut Obj<'_>, key: &str, min: u64, max: u64| -> Result<Option<u32>> {
        match o.u64(key)? {
            None => Ok(None),
            Some(v) if (min..=max).contains(&v) => Ok(Some(v as u32)),
            Some(v) => Err(ConfigError::new(o.at(key), format!("{v} is out of range: must be between {min} and {max}"))),
        }
    };
    let settings = Http2Settings {
        max_concurrent_streams: within(&mut o, "max_concurrent_streams", 1, 2_147_483_647)?,
        initial_stream_window_size: within(&mut o, "initial_stream_window_size", 65_535, 2_147_483_647)?,
        initial_connection_window_size: within(&mut o, "initial_connection_window_size", 65_535, 2_147_483_647)?,
    };
    o.finish()?;
    Ok(settings)
}

/// A DNS cluster: its hosts (names or addresses with ports) from `load_assignment`, and how they are resolved.
fn dns(c: &mut Obj<'_>, logical: bool, lb_policy: LbPolicy) -> Result<Discovery> {
    if lb_policy == LbPolicy::ClusterProvided {
        return Err(ConfigError::new(c.at("lb_policy"), "CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters"));
    }
    let refresh = c.duration("dns_refresh_rate")?.unwrap_or(Duration::from_secs(5));
    if refresh < Duration::from_millis(1) {
        return Err(ConfigError::new(c.at("dns_refresh_rate"), "must be at least 1ms"));
    }
    let respect_dns_ttl = c.bool("respect_dns_ttl")?.unwrap_or(false);
    let family = match c.string("dns_lookup_family")?.unwrap_or("AUTO") {
        "AUTO" => DnsFamily::Auto,
        "V4_ONLY" => DnsFamily::V4Only,
        "V6_ONLY" => DnsFamily::V6Only,
        "V4_PREFERRED" => DnsFamily::V4Preferred,
        "ALL" => DnsFamily::All,
        other => return Err(ConfigError::new(c.at("dns_lookup_family"), format!("{other} is not a lookup family"))),
    };
    let mut la = c.required_object("load_assignment")?;
    let _ = la.string("cluster_name")?;
    let mut hosts = Vec::new();
    for mut locality in la.objects("endpoints")? {
        for mut lb in locality.objects("lb_endpoints")? {
            let mut endpoint = lb.required_object("endpoint")?;
            let mut address = endpoint.required_object("address")?;
            let mut sa = address.required_object("socket_address")?;
            let host = sa.required_string("address")?.to_string();
            let port = sa.u64("port_value")?.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0);
            let port = port.ok_or_else(|| ConfigError::new(sa.at("port_value"), "needs a port (1-65535)"))?;
            sa.finish()?;
            address.finish()?;
            endpoint.finish()?;
            lb.finish()?;
            hosts.push((host, port));
        }
        locality.finish()?;
    }
    la.finish()?;
    if hosts.is_empty() || (logical && hosts.len() != 1) {
        let why = if logical { "LOGICAL_DNS clusters need exactly one endpoint" } else { "needs at least one endpoint" };
        return Err(ConfigError::new(c.at("load_assignment"), why));
    }
    Ok(Discovery::Dns { hosts, logical, refresh, family, respect_dns_ttl })
}

fn lb_policy(c: &mut Obj<'_>) -> Result<LbPolicy> {
    let policy = match c.string("lb_policy")?.unwrap_or("ROUND_ROBIN") {
        "ROUND_ROBIN" => LbPolicy::RoundRobin,
        "RANDOM" => LbPolicy::Random,
        "CLUSTER_PROVIDED" => LbPolicy::ClusterProvided,
        "LEAST_REQUEST" => {
            let mut choice_count = 2;
            if let Some(mut l) = c.object("least_request_lb_config")? {
                choice_count = l.u64("choice_count")?.unwrap_or(2).clamp(2, 100) as u32;
                l.finish()?;
            }
            LbPolicy::LeastRequest { choice_count }
        }
        "RING_HASH" => {
            let (mut min_ring_size, mut max_ring_size) = (1024, 8 * 1024 * 1024);
            if let Some(mut r) = c.object("ring_hash_lb_config")? {
                min_ring_size = r.u64("minimum_ring_size")?.unwrap_or(min_ring_size).max(1);
                max_ring_size = r.u64("maximum_ring_size")?.unwrap_or(max_ring_size).max(min_ring_size);
                if let Some(f) = r.string("hash_function")? {
                    if f != "XX_HASH" {
                        return Err(ConfigError::new(r.at("hash_function"), format!("{f} is not supported by weft; use XX_HASH")));
                    }
                }
                r.finish()?;
            }
            LbPolicy::RingHash { min_ring_size, max_ring_size }
        }
        "MAGLEV" => {
            let mut table_size = 65537;
            if let Some(mut m) = c.object("maglev_lb_config")? {
                table_size = m.u64("table_size")?.unwrap_or(table_size);
                if !is_prime(table_size) || table_size > 5_000_011 {
                    return Err(ConfigError::new(m.at("table_size"), format!("{table_size} must be a prime number no larger than 5000011")));
                }
                m.finish()?;
            }
            LbPolicy::Maglev { table_size }
        }
        other => {
            return Err(ConfigError::new(
                c.at("lb_policy"),
                format!("{other} is not supported; use ROUND_ROBIN, RANDOM, LEAST_REQUEST, RING_HASH, MAGLEV or CLUSTER_PROVIDED"),
            ))
        }
    };
    Ok(policy)
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// A number that proto3 JSON may give as a number or a string.
fn number(o: &mut Obj<'_>, key: &str) -> Result<Option<f64>> {
    let path = o.at(key);
    match o.take(key) {
        None => Ok(None),
        Some(serde_json::Value::Number(n)) => Ok(n.as_f64()),
        Some(serde_json::Value::String(s)) => s.parse().map(Some).map_err(|_| ConfigError::new(path, "expected a number")),
        Some(_) => Err(ConfigError::new(path, "expected a number")),
    }
}

fn circuit_breakers(mut cb: Obj<'_>) -> Result<CircuitBreakers> {
    let mut out = CircuitBreakers::default();
    for mut t in cb.objects("thresholds")? {
        match t.string("priority")?.unwrap_or("DEFAULT") {
            "DEFAULT" => {}
            // weft has one priority of traffic; HIGH thresholds would never apply.
            "HIGH" => {
                return Err(ConfigError::new(t.at("priority"), "HIGH is not supported by weft; weft routes every request at DEFAULT priority"))
            }
            other => return Err(ConfigError::new(t.at("priority"), format!("{other} is not a priority"))),
        }
        let d = CircuitBreakers::default();
        out.max_connections = t.u64("max_connections")?.unwrap_or(d.max_connections);
        out.max_pending_requests = t.u64("max_pending_requests")?.unwrap_or(d.max_pending_requests);
        out.max_requests = t.u64("max_requests")?.unwrap_or(d.max_requests);
        out.max_retries = t.u64("max_retries")?.unwrap_or(d.max_retries);
        let _ = t.bool("track_remaining")?;
        t.finish()?;
    }
    cb.finish()?;
    Ok(out)
}

fn outlier_detection(mut o: Obj<'_>) -> Result<OutlierDetection> {
    let percent = |o: &mut Obj<'_>, key: &str, default: u64| -> Result<u32> {
        let v = o.u64(key)?.unwrap_or(default);
        if v > 100 {
            return Err(ConfigError::new(o.at(key), format!("{v} is not a percentage")));
        }
        Ok(v as u32)
    };
    let count = |o: &mut Obj<'_>, key: &str, default: u64| -> Result<u64> { Ok(o.u64(key)?.unwrap_or(default)) };
    let base_ejection_time = o.duration("base_ejection_time")?.unwrap_or(Duration::from_secs(30));
    // Envoy's detector refuses an explicit max below the base; an absent one is the larger of 300s and the base.
    let max_ejection_time = match o.duration("max_ejection_time")? {
        Some(max) if max < base_ejection_time => {
            return Err(ConfigError::new(o.at("max_ejection_time"), "outlier detector's max_ejection_time cannot be smaller than base_ejection_time"))
        }
        Some(max) => max,
        None => Duration::from_secs(300).max(base_ejection_time),
    };
    let interval = o.duration("interval")?.unwrap_or(Duration::from_secs(10));
    if interval.is_zero() {
        return Err(ConfigError::new(o.at("interval"), "must be greater than 0s"));
    }
    let out = OutlierDetection {
        consecutive_5xx: o.u64("consecutive_5xx")?.unwrap_or(5).min(u64::from(u32::MAX)) as u32,
        consecutive_gateway_failure: o.u64("consecutive_gateway_failure")?.unwrap_or(5).min(u64::from(u32::MAX)) as u32,
        enforcing_consecutive_5xx: percent(&mut o, "enforcing_consecutive_5xx", 100)?,
        enforcing_consecutive_gateway_failure: percent(&mut o, "enforcing_consecutive_gateway_failure", 0)?,
        max_ejection_time,
        base_ejection_time,
        max_ejection_percent: percent(&mut o, "max_ejection_percent", 10)?,
        always_eject_one_host: o.bool("always_eject_one_host")?.unwrap_or(false),
        interval,
        success_rate: SuccessRate {
            minimum_hosts: count(&mut o, "success_rate_minimum_hosts", 5)?,
            request_volume: count(&mut o, "success_rate_request_volume", 100)?,
            stdev_factor: count(&mut o, "success_rate_stdev_factor", 1900)?,
            enforcing: percent(&mut o, "enforcing_success_rate", 100)?,
        },
        failure_percentage: FailurePercentage {
            threshold: count(&mut o, "failure_percentage_threshold", 85)?,
            minimum_hosts: count(&mut o, "failure_percentage_minimum_hosts", 5)?,
            request_volume: count(&mut o, "failure_percentage_request_volume", 50)?,
            enforcing: percent(&mut o, "enforcing_failure_percentage", 0)?,
        },
    };
    if out.failure_percentage.threshold > 100 {
        return Err(ConfigError::new(o.at("failure_percentage_threshold"), format!("{} is not a percentage", out.failure_percentage.threshold)));
    }
    if o.bool("split_external_local_origin_errors")? == Some(true) {
        return Err(ConfigError::new(o.at("split_external_local_origin_errors"), "is not supported by weft yet"));
    }
    o.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(v: serde_json::Value) -> Result<Cluster> {
        translate(Obj::new(&v, "c")?)
    }

    fn at(port: u16) -> serde_json::Value {
        json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}})
    }

    /// Istio's auto mTLS: endpoints labelled `tlsMode: istio` get the TLS socket, the others plaintext.
    #[test]
    fn transport_socket_matches_choose_by_endpoint_metadata() {
        let tls = json!({"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "sni": "x"}});
        let raw = json!({"name": "raw", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}});
        let c = cluster(json!({"name": "c", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}, "initial_fetch_timeout": "0s"}},
            "transport_socket_matches": [{"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": tls}, {"name": "tlsMode-disabled", "match": {}, "transport_socket": raw}]}))
        .unwrap();
        let mut meshed = at(1);
        meshed["metadata"] = json!({"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}, "istio": {"workload": "w;ns;svc;v1;Kubernetes"}}});
        let la = json!({"cluster_name": "c", "endpoints": [{"lb_endpoints": [meshed, at(2)]}]});
        let (_, a) = assignment(Obj::new(&la, "la").unwrap()).unwrap();
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        assert!(matches!(c.transport_socket_for(a.socket_labels(addr(1))), TransportSocket::Tls(_)), "tlsMode istio → mTLS");
        assert_eq!(c.transport_socket_for(a.socket_labels(addr(2))), &TransportSocket::RawBuffer, "no label → the empty match");
        assert_eq!(c.tls_contexts().count(), 1);
        let e = cluster(json!({"name": "c", "transport_socket_matches": [{"name": "m", "match": "istio"}]})).unwrap_err();
        assert!(e.to_string().contains("transport_socket_matches[0].match"), "{e}");
    }

    #[test]
    fn localities_keep_their_weights_and_hosts_per_priority() {
        let mut down = at(3);
        down["health_status"] = json!("UNHEALTHY");
        let c = cluster(json!({"name": "c", "common_lb_config": {"locality_weighted_lb_config": {}}, "load_assignment": {"endpoints": [
            {"locality": {"zone": "b"}, "load_balancing_weight": 1, "lb_endpoints": [at(2), down]},
            {"locality": {"zone": "a"}, "load_balancing_weight": 3, "lb_endpoints": [at(1)]},
            {"lb_endpoints": [at(4)], "load_balancing_weight": 7},
            {"locality": {"zone": "c"}, "priority": 1, "lb_endpoints": [at(5)]}]}}))
        .unwrap();
        assert!(c.locality_weighted);
        let Discovery::Static { endpoints, .. } = c.discovery else { panic!("static") };
        let level0: Vec<(u32, usize, usize)> = endpoints.localities[0].iter().map(|l| (l.weight, l.hosts.len(), l.total)).collect();
        // Sorted by locality; the unnamed locality first and without a weight (Envoy keeps none for it).
        assert_eq!(level0, vec![(0, 1, 1), (3, 1, 1), (1, 1, 2)]);
        assert_eq!(endpoints.localities[1][0].weight, 0, "a locality without load_balancing_weight weighs nothing");
    }

    #[test]
    fn locality_weighting_refusals_name_the_field() {
        let err = |v| cluster(v).unwrap_err().to_string();
        let lb = json!({"locality_weighted_lb_config": {}});
        assert!(err(json!({"name": "c", "lb_policy": "RING_HASH", "common_lb_config": lb})).contains("c.common_lb_config.locality_weighted_lb_config"));
        assert!(err(json!({"name": "c", "common_lb_config": {"locality_weighted_lb_config": {"x": 1}}})).contains("locality_weighted_lb_config.x"));
        let zero = json!({"name": "c", "load_assignment": {"endpoints": [{"locality": {}, "load_balancing_weight": 0, "lb_endpoints": [at(1)]}]}});
        assert!(err(zero).contains("endpoints[0].load_balancing_weight"));
    }

    #[test]
    fn http2_settings_are_read_in_both_places_and_others_refused() {
        let c = cluster(json!({"name": "c", "http2_protocol_options": {"max_concurrent_streams": 2, "initial_stream_window_size": 65535}})).unwrap();
        assert_eq!(c.http2_settings, Http2Settings { max_concurrent_streams: Some(2), initial_stream_window_size: Some(65535), initial_connection_window_size: None });
        let typed = json!({"name": "c", "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"initial_connection_window_size": 1048576}}}}});
        let c = cluster(typed).unwrap();
        assert!(c.http2);
        assert_eq!(c.http2_settings.initial_connection_window_size, Some(1_048_576));
        let err = |v| cluster(v).unwrap_err().to_string();
        assert!(err(json!({"name": "c", "http2_protocol_options": {"initial_stream_window_size": 100}})).contains("c.http2_protocol_options.initial_stream_window_size"));
        assert!(err(json!({"name": "c", "http2_protocol_options": {"max_concurrent_streams": 0}})).contains("max_concurrent_streams"));
        assert!(err(json!({"name": "c", "http2_protocol_options": {"hpack_table_size": 0}})).contains("c.http2_protocol_options.hpack_table_size"));
    }

    #[test]
    fn istio_metadata_and_cleanup_interval_are_read() {
        let c = cluster(json!({"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "cleanup_interval": "5s",
            "metadata": {"filter_metadata": {"istio": {"alpn_override": "false", "external": true}}}}))
        .unwrap();
        assert!(!c.metadata.istio.alpn_override && c.metadata.istio.external && !c.metadata.istio.disable_mx);
        let err = cluster(json!({"name": "c", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "cleanup_interval": "0s"})).unwrap_err();
        assert_eq!(err.path, "c.cleanup_interval");
        assert!(cluster(json!({"name": "c"})).unwrap().metadata.istio.alpn_override, "no metadata: the override applies");
    }

    #[test]
    fn outlier_detection_has_envoys_defaults() {
        let c = cluster(json!({"name": "c", "outlier_detection": {}})).unwrap();
        let od = c.outlier_detection.unwrap();
        assert_eq!(od.interval, Duration::from_secs(10));
        assert_eq!(od.success_rate, SuccessRate { minimum_hosts: 5, request_volume: 100, stdev_factor: 1900, enforcing: 100 });
        assert_eq!(od.failure_percentage, FailurePercentage { threshold: 85, minimum_hosts: 5, request_volume: 50, enforcing: 0 });
        assert_eq!(od.max_ejection_time, Duration::from_secs(300));
        let err = cluster(json!({"name": "c", "outlier_detection": {"base_ejection_time": "10s", "max_ejection_time": "5s"}})).unwrap_err();
        assert!(err.to_string().contains("c.outlier_detection.max_ejection_time"));
        let err = cluster(json!({"name": "c", "outlier_detection": {"failure_percentage_threshold": 101}})).unwrap_err();
        assert!(err.to_string().contains("failure_percentage_threshold"));
    }
}
