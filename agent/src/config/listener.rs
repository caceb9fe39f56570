//! `envoy.config.listener.v3.Listener`: its filter chains with their `filter_chain_match`, listener filters,
//! `use_original_dst`/`bind_to_port`, and the network filters (tcp_proxy, http_connection_manager).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::http_connection_manager::{self as hcm, HttpConnectionManager, Routes};
use super::istio_stats::{self, IstioStats, ISTIO_STATS};
use super::metadata_exchange::{self, MetadataExchange, METADATA_EXCHANGE};
use super::rbac::{self, NetworkRbac, NETWORK_RBAC};
use super::route::RouteConfiguration;
use super::tls::{self, DownstreamTls, TransportSocket};
use super::tree::{ConfigError, Obj, Result};
use super::socket_address;
pub use super::cidr::{canonical, CidrRange};
use super::cidr::cidr_range;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub filter_chains: Vec<FilterChain>,
    /// Serves connections no chain matches; without it they are closed.
    pub default_filter_chain: Option<FilterChain>,
    /// Hands each connection to the listener bound to its original destination, when there is one.
    pub use_original_dst: bool,
    /// `false`: no socket; the listener only serves connections handed over by a `use_original_dst` one.
    pub bind_to_port: bool,
    pub listener_filters: ListenerFilters,
    /// `traffic_direction`: which side of the workload the listener serves (Istio's telemetry reads it).
    pub direction: TrafficDirection,
    /// `access_log`: written for connections the listener closes before a filter chain serves them.
    pub access_log: super::access_log::AccessLogs,
    /// `per_connection_buffer_limit_bytes`: the most of a downstream connection's data held at once.
    pub buffer_limit: usize,
}

/// `envoy.config.core.v3.TrafficDirection`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrafficDirection {
    #[default]
    Unspecified,
    Inbound,
    Outbound,
}

/// The listener filters weft runs before choosing a filter chain.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ListenerFilters {
    /// `original_dst`: match filter chains on the destination before capture rewrote it.
    pub original_dst: bool,
    /// `tls_inspector`: detect TLS, its SNI and ALPN from the ClientHello.
    pub tls_inspector: bool,
    /// `http_inspector`: detect HTTP/1.x and HTTP/2 prior knowledge (h2c) on plaintext connections.
    pub http_inspector: bool,
    /// `listener_filters_timeout` (Envoy's default 15s; zero disables it).
    pub timeout: Duration,
    /// `continue_on_listener_filters_timeout`: on timeout, go on with what was detected instead of closing.
    pub continue_on_timeout: bool,
    /// The inspectors' `filter_disabled`: connections it matches skip that inspector (istiod turns the TLS
    /// inspector off for 15006 itself, and the HTTP inspector for ports it knows to be HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_inspector_disabled: Option<PortPredicate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_inspector_disabled: Option<PortPredicate>,
}

/// `ListenerFilterChainMatchPredicate`: what can be decided from the connection's destination port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortPredicate {
    Any,
    /// `destination_port_range`: `start` inclusive, `end` exclusive.
    DestinationPortRange { start: u16, end: u16 },
    Or(Vec<PortPredicate>),
    And(Vec<PortPredicate>),
    Not(Box<PortPredicate>),
}

impl PortPredicate {
    pub fn matches(&self, port: u16) -> bool {
        match self {
            PortPredicate::Any => true,
            PortPredicate::DestinationPortRange { start, end } => (*start..*end).contains(&port),
            PortPredicate::Or(rules) => rules.iter().any(|r| r.matches(port)),
            PortPredicate::And(rules) => rules.iter().all(|r| r.matches(port)),
            PortPredicate::Not(rule) => !rule.matches(port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FilterChain {
    pub name: String,
    pub matcher: FilterChainMatch,
    /// TLS terminated before the filters, or plaintext.
    pub transport_socket: TransportSocket<DownstreamTls>,
    /// `transport_socket_connect_timeout`: a TLS handshake not finished this long after the chain was chosen
    /// closes the connection (`None`, Envoy's default: no limit).
    pub transport_socket_connect_timeout: Option<Duration>,
    /// Istio's TCP metadata exchange, run on the byte stream right after the transport socket (istiod puts it
    /// first, before RBAC).
    pub metadata_exchange: Option<Arc<MetadataExchange>>,
    /// The network RBAC filters before the terminal filter, in order.
    pub rbac: Vec<Arc<NetworkRbac>>,
    /// Istio's standard TCP metrics (`istio.stats` as a network filter).
    pub istio_stats: Option<Arc<IstioStats>>,
    pub filter: NetworkFilter,
}

/// `filter_chain_match`: empty criteria match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FilterChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<CidrRange>,
    pub server_names: Vec<String>,
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
    pub source_type: SourceType,
    pub source_prefix_ranges: Vec<CidrRange>,
    pub source_ports: Vec<u16>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SourceType {
    #[default]
    Any,
    SameIpOrLoopback,
    External,
}

/// `envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TcpProxy {
    /// One cluster, or several with weights (`weighted_clusters`).
    pub clusters: Vec<(String, u32)>,
    /// Closed after this long without bytes either way (Envoy's default 1 h; `None`: never).
    pub idle_timeout: Option<Duration>,
    /// Upstream connection attempts before giving up (default 1).
    pub max_connect_attempts: u32,
    /// `access_log`: written when each connection ends.
    pub access_log: super::access_log::AccessLogs,
}

impl TcpProxy {
    /// A proxy to one cluster with Envoy's defaults.
    pub fn to(cluster: &str) -> NetworkFilter {
        NetworkFilter::TcpProxy(Arc::new(TcpProxy {
            clusters: vec![(cluster.to_string(), 1)],
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connect_attempts: 1,
            access_log: Default::default(),
        }))
    }
}

impl ListenerFilters {
    /// Only `original_dst`, nothing to inspect (so no timeout): what capture listeners need.
    pub fn original_dst_only() -> ListenerFilters {
        ListenerFilters { original_dst: true, ..ListenerFilters::none() }
    }

    /// No listener filter.
    pub fn none() -> ListenerFilters {
        ListenerFilters {
            original_dst: false,
            tls_inspector: false,
            http_inspector: false,
            timeout: Duration::ZERO,
            continue_on_timeout: false,
            tls_inspector_disabled: None,
            http_inspector_disabled: None,
        }
    }

    /// The filters that run for a connection to `port`: an inspector its `filter_disabled` matches is skipped.
    pub fn for_port(&self, port: u16) -> std::borrow::Cow<'_, ListenerFilters> {
        let off = |p: &Option<PortPredicate>| p.as_ref().is_some_and(|p| p.matches(port));
        let (tls_off, http_off) = (self.tls_inspector && off(&self.tls_inspector_disabled), self.http_inspector && off(&self.http_inspector_disabled));
        if !tls_off && !http_off {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut active = self.clone();
        active.tls_inspector &= !tls_off;
        active.http_inspector &= !http_off;
        std::borrow::Cow::Owned(active)
    }
}

/// The terminal network filter of a filter chain.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkFilter {
    TcpProxy(Arc<TcpProxy>),
    HttpConnectionManager(Arc<HttpConnectionManager>),
}

impl Listener {
    /// The terminal filter of every chain, the default chain's included.
    pub fn filters(&self) -> impl Iterator<Item = &NetworkFilter> {
        self.filter_chains.iter().chain(&self.default_filter_chain).map(|c| &c.filter)
    }

    /// The TLS contexts of its chains.
    pub fn tls_contexts(&self) -> impl Iterator<Item = &super::tls::CommonTls> {
        self.filter_chains.iter().chain(&self.default_filter_chain).filter_map(|c| match &c.transport_socket {
            TransportSocket::Tls(t) => Some(&t.common),
            TransportSocket::RawBuffer => None,
        })
    }

    /// The route configurations given inline.
    pub fn inline_routes(&self) -> impl Iterator<Item = &RouteConfiguration> {
        self.filters().filter_map(|f| match f {
            NetworkFilter::HttpConnectionManager(h) => match &h.routes {
                Routes::Inline(rc) => Some(&**rc),
                Routes::Rds(_) => None,
            },
            _ => None,
        })
    }

    /// The RDS route configurations this listener needs.
    pub fn rds_names(&self) -> impl Iterator<Item = &str> {
        self.filters().filter_map(|f| match f {
            NetworkFilter::HttpConnectionManager(h) => match &h.routes {
                Routes::Rds(name) => Some(name.as_str()),
                Routes::Inline(_) => None,
            },
            _ => None,
        })
    }
}

const TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ORIGINAL_DST: &str = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const TLS_INSPECTOR: &str = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const HTTP_INSPECTOR: &str = "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";

/// Envoy's default `listener_filters_timeout`.
const LISTENER_FILTERS_TIMEOUT: Duration = Duration::from_secs(15);

pub fn translate(mut l: Obj<'_>) -> Result<Listener> {
    let name = l.required_string("name")?.to_string();
    let address = socket_address(l.required_object("address")?)?;
    let use_original_dst = l.bool("use_original_dst")?.unwrap_or(false);
    let bind_to_port = l.bool("bind_to_port")?.unwrap_or(true);
    let direction = match l.string("traffic_direction")?.unwrap_or("UNSPECIFIED") {
        "UNSPECIFIED" => TrafficDirection::Unspecified,
        "INBOUND" => TrafficDirection::Inbound,
        "OUTBOUND" => TrafficDirection::Outbound,
        other => return Err(ConfigError::new(l.at("traffic_direction"), format!("{other} is not a direction; use UNSPECIFIED, INBOUND or OUTBOUND"))),
    };
    let mut listener_filters = listener_filters(&mut l)?;
    listener_filters.original_dst |= use_original_dst;
    let access_log = super::access_log::translate_all(&mut l)?;
    let buffer_limit = super::buffer_limit(&mut l)?;
    let filter_chains = l.objects("filter_chains")?.into_iter().map(filter_chain).collect::<Result<Vec<_>>>()?;
    let default_filter_chain = l.object("default_filter_chain")?.map(filter_chain).transpose()?;
    if filter_chains.is_empty() && default_filter_chain.is_none() {
        return Err(ConfigError::new(l.at("filter_chains"), format!("error adding listener '{name}': no filter chains specified")));
    }
    for (i, chain) in filter_chains.iter().enumerate() {
        if filter_chains[..i].iter().any(|earlier| earlier.matcher == chain.matcher) {
            return Err(ConfigError::new(
                format!("{}[{i}].filter_chain_match", l.at("filter_chains")),
                format!("error adding listener '{name}': multiple filter chains with the same matching rules are defined"),
            ));
        }
    }
    // Envoy's accept batching (connections accepted per wakeup): weft's accept loop has no such knob, so it
    // changes nothing; Envoy's range is checked.
    if l.u64("max_connections_to_accept_per_socket_event")? == Some(0) {
        return Err(ConfigError::new(l.at("max_connections_to_accept_per_socket_event"), "must be greater than 0"));
    }
    if default_filter_chain.as_ref().is_some_and(|d| d.matcher != FilterChainMatch::default()) {
        return Err(ConfigError::new(l.at("default_filter_chain.filter_chain_match"), "must be empty: the default chain serves what no chain matches"));
    }
    l.finish()?;
    Ok(Listener { name, address, filter_chains, default_filter_chain, use_original_dst, bind_to_port, listener_filters, direction, access_log, buffer_limit })
}

fn listener_filters(l: &mut Obj<'_>) -> Result<ListenerFilters> {
    let mut out = ListenerFilters {
        timeout: l.duration("listener_filters_timeout")?.unwrap_or(LISTENER_FILTERS_TIMEOUT),
        continue_on_timeout: l.bool("continue_on_listener_filters_timeout")?.unwrap_or(false),
        ..ListenerFilters::none()
    };
    for mut f in l.objects("listener_filters")? {
        let filter_name = f.string("name")?.unwrap_or_default().to_string();
        let mut typed = f.required_object("typed_config")?;
        let type_url = typed.required_string("@type")?;
        let disabled = f.object("filter_disabled")?.map(port_predicate).transpose()?;
        let (flag, disabled_slot) = match type_url.rsplit('/').next().unwrap_or(type_url) {
            ORIGINAL_DST => (&mut out.original_dst, None),
            TLS_INSPECTOR => (&mut out.tls_inspector, Some(&mut out.tls_inspector_disabled)),
            HTTP_INSPECTOR => (&mut out.http_inspector, Some(&mut out.http_inspector_disabled)),
            _ => {
                return Err(ConfigError::new(
                    typed.at("@type"),
                    format!("listener filter {filter_name:?} of type {type_url} is not supported; weft has original_dst, tls_inspector and http_inspector"),
                ))
            }
        };
        *flag = true;
        match (disabled_slot, disabled) {
            (Some(slot), disabled) => *slot = disabled,
            (None, Some(_)) => return Err(ConfigError::new(f.at("filter_disabled"), "is only supported on the TLS and HTTP inspectors")),
            (None, None) => {}
        }
        typed.finish()?;
        f.finish()?;
    }
    Ok(out)
}

/// `envoy.config.listener.v3.ListenerFilterChainMatchPredicate`, exactly one rule.
fn port_predicate(mut p: Obj<'_>) -> Result<PortPredicate> {
    let rules = |p: &mut Obj<'_>, key: &str| -> Result<Option<Vec<PortPredicate>>> {
        match p.object(key)? {
            Some(mut set) => {
                let rules = set.objects("rules")?.into_iter().map(port_predicate).collect::<Result<Vec<_>>>()?;
                set.finish()?;
                Ok(Some(rules))
            }
            None => Ok(None),
        }
    };
    let mut found = Vec::new();
    if let Some(r) = rules(&mut p, "or_match")? {
        found.push(PortPredicate::Or(r));
    }
    if let Some(r) = rules(&mut p, "and_match")? {
        found.push(PortPredicate::And(r));
    }
    if let Some(not) = p.object("not_match")? {
        found.push(PortPredicate::Not(Box::new(port_predicate(not)?)));
    }
    if p.bool("any_match")? == Some(true) {
        found.push(PortPredicate::Any);
    }
    if let Some(mut range) = p.object("destination_port_range")? {
        let bound = |range: &mut Obj<'_>, key: &str| -> Result<u16> {
            let v = range.u64(key)?.unwrap_or(0);
            u16::try_from(v).map_err(|_| ConfigError::new(range.at(key), format!("{v} is not a port")))
        };
        let (start, end) = (bound(&mut range, "start")?, bound(&mut range, "end")?);
        range.finish()?;
        found.push(PortPredicate::DestinationPortRange { start, end });
    }
    let path = p.path().to_string();
    p.finish()?;
    match found.len() {
        1 => Ok(found.remove(0)),
        _ => Err(ConfigError::new(path, "needs exactly one of or_match, and_match, not_match, any_match or destination_port_range")),
    }
}

fn filter_chain(mut chain: Obj<'_>) -> Result<FilterChain> {
    let name = chain.string("name")?.unwrap_or_default().to_string();
    let matcher = chain.object("filter_chain_match")?.map(filter_chain_match).transpose()?.unwrap_or_default();
    let transport_socket = tls::downstream(chain.object("transport_socket")?)?;
    let transport_socket_connect_timeout = chain.timeout("transport_socket_connect_timeout", None)?;
    let NetworkFilters { metadata_exchange, rbac, istio_stats, terminal: filter } = network_filters(&mut chain)?;
    chain.finish()?;
    Ok(FilterChain { name, matcher, transport_socket, transport_socket_connect_timeout, metadata_exchange, rbac, istio_stats, filter })
}

fn filter_chain_match(mut m: Obj<'_>) -> Result<FilterChainMatch> {
    let destination_port = m.u64("destination_port")?.map(|p| port(&m, "destination_port", p)).transpose()?;
    let prefix_ranges = cidr_ranges(&mut m, "prefix_ranges")?;
    let server_names = m.strings("server_names")?.into_iter().map(str::to_ascii_lowercase).collect();
    let transport_protocol = m.string("transport_protocol")?.filter(|t| !t.is_empty()).map(str::to_string);
    let application_protocols = m.strings("application_protocols")?.into_iter().map(str::to_string).collect();
    let source_type = match m.string("source_type")?.unwrap_or("ANY") {
        "ANY" => SourceType::Any,
        "SAME_IP_OR_LOOPBACK" => SourceType::SameIpOrLoopback,
        "EXTERNAL" => SourceType::External,
        other => return Err(ConfigError::new(m.at("source_type"), format!("{other} is not a source type; use ANY, SAME_IP_OR_LOOPBACK or EXTERNAL"))),
    };
    let source_prefix_ranges = cidr_ranges(&mut m, "source_prefix_ranges")?;
    let path = m.at("source_ports");
    let source_ports = match m.take("source_ports") {
        None => Vec::new(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_u64().and_then(|p| u16::try_from(p).ok()).ok_or_else(|| ConfigError::new(format!("{path}[{i}]"), "expected a port number")))
            .collect::<Result<_>>()?,
        Some(_) => return Err(ConfigError::new(path, "expected a list of port numbers")),
    };
    m.finish()?;
    Ok(FilterChainMatch {
        destination_port,
        prefix_ranges,
        server_names,
        transport_protocol,
        application_protocols,
        source_type,
        source_prefix_ranges,
        source_ports,
    })
}

fn port(m: &Obj<'_>, key: &str, value: u64) -> Result<u16> {
    u16::try_from(value).ok().filter(|p| *p > 0).ok_or_else(|| ConfigError::new(m.at(key), format!("{value} is not a port (1-65535)")))
}

fn cidr_ranges(m: &mut Obj<'_>, key: &str) -> Result<Vec<CidrRange>> {
    m.objects(key)?.into_iter().map(cidr_range).collect()
}

/// A chain's network filters, by kind.
struct NetworkFilters {
    metadata_exchange: Option<Arc<MetadataExchange>>,
    rbac: Vec<Arc<NetworkRbac>>,
    istio_stats: Option<Arc<IstioStats>>,
    terminal: NetworkFilter,
}

/// The chain's filters: at most one metadata exchange and RBAC filters, then the terminal filter, last;
/// optional filters of unknown types are skipped, as Envoy does.
fn network_filters(chain: &mut Obj<'_>) -> Result<NetworkFilters> {
    let filters: Vec<Obj<'_>> = chain.objects("filters")?;
    let count = filters.len();
    let mut terminal = None;
    let mut rbac_filters = Vec::new();
    let mut exchange = None;
    let mut stats = None;
    for (i, mut f) in filters.into_iter().enumerate() {
        let filter_name = f.string("name")?.unwrap_or_default().to_string();
        let optional = f.bool("is_optional")?.unwrap_or(false);
        let mut typed = f.required_object("typed_config")?;
        let type_url = typed.required_string("@type")?;
        let filter = match type_url.rsplit('/').next().unwrap_or(type_url) {
            TCP_PROXY => Some(tcp_proxy(typed)?),
            HCM => Some(NetworkFilter::HttpConnectionManager(Arc::new(hcm::translate(typed)?))),
            NETWORK_RBAC => {
                rbac_filters.push(Arc::new(rbac::network(typed)?));
                None
            }
            // Telemetry only: Istio's standard TCP metrics.
            ISTIO_STATS => {
                stats = Some(Arc::new(istio_stats::translate(typed)?));
                None
            }
            METADATA_EXCHANGE => {
                if exchange.is_some() {
                    return Err(ConfigError::new(f.path(), "weft runs one metadata exchange per filter chain; remove the second"));
                }
                exchange = Some(Arc::new(metadata_exchange::translate(typed)?));
                None
            }
            _ if optional => None,
            _ => {
                return Err(ConfigError::new(
                    f.at("typed_config"),
                    format!("filter {filter_name:?} of type {type_url} is not supported (mark it is_optional to skip it)"),
                ))
            }
        };
        if filter.is_some() && i + 1 != count {
            return Err(ConfigError::new(f.path(), "a terminal filter must be the last filter of the chain"));
        }
        f.finish()?;
        terminal = terminal.or(filter);
    }
    let terminal = terminal.ok_or_else(|| ConfigError::new(chain.at("filters"), "the filter chain has no terminal filter"))?;
    Ok(NetworkFilters { metadata_exchange: exchange, rbac: rbac_filters, istio_stats: stats, terminal })
}

fn tcp_proxy(mut t: Obj<'_>) -> Result<NetworkFilter> {
    let _ = t.string("stat_prefix")?;
    let clusters = match (t.string("cluster")?, t.object("weighted_clusters")?) {
        (Some(c), None) if !c.is_empty() => vec![(c.to_string(), 1)],
        (None, Some(mut w)) => {
            let mut clusters = Vec::new();
            for mut c in w.objects("clusters")? {
                let name = c.required_string("name")?.to_string();
                let weight = c.u64("weight")?.filter(|w| *w > 0).ok_or_else(|| ConfigError::new(c.at("weight"), "must be greater than 0"))?;
                c.finish()?;
                clusters.push((name, u32::try_from(weight).unwrap_or(u32::MAX)));
            }
            if clusters.is_empty() {
                return Err(ConfigError::new(w.at("clusters"), "must have at least one cluster"));
            }
            w.finish()?;
            clusters
        }
        _ => return Err(ConfigError::new(t.path(), "needs exactly one of cluster or weighted_clusters")),
    };
    let idle_timeout = t.timeout("idle_timeout", Some(Duration::from_secs(3600)))?;
    let max_connect_attempts = t.u64("max_connect_attempts")?.unwrap_or(1).clamp(1, 100) as u32;
    let access_log = super::access_log::translate_all(&mut t)?;
    t.finish()?;
    Ok(NetworkFilter::TcpProxy(Arc::new(TcpProxy { clusters, idle_timeout, max_connect_attempts, access_log })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// istiod's virtualInbound: the TLS inspector is off for connections to 15006 itself.
    #[test]
    fn filter_disabled_turns_an_inspector_off_by_destination_port() {
        let l = listener(json!({"filter_chains": [{"filters": [{"name": "tcp", "typed_config": {"@type": format!("type.googleapis.com/{TCP_PROXY}"), "cluster": "c"}}]}],
            "listener_filters": [
                {"name": "tls", "filter_disabled": {"destination_port_range": {"start": 15006, "end": 15007}}, "typed_config": {"@type": format!("type.googleapis.com/{TLS_INSPECTOR}")}},
                {"name": "http", "filter_disabled": {"or_match": {"rules": [{"destination_port_range": {"start": 80, "end": 81}}, {"not_match": {"any_match": true}}]}}, "typed_config": {"@type": format!("type.googleapis.com/{HTTP_INSPECTOR}")}}]}))
        .unwrap();
        let f = &l.listener_filters;
        assert!(!f.for_port(15006).tls_inspector && f.for_port(15006).http_inspector);
        assert!(f.for_port(8080).tls_inspector && f.for_port(8080).http_inspector);
        assert!(!f.for_port(80).http_inspector && f.for_port(80).tls_inspector);
        let e = listener(json!({"filter_chains": [], "listener_filters": [{"name": "o", "filter_disabled": {"any_match": true}, "typed_config": {"@type": format!("type.googleapis.com/{ORIGINAL_DST}")}}]})).unwrap_err();
        assert!(e.path.ends_with("listener_filters[0].filter_disabled"), "{e}");
        let e = listener(json!({"filter_chains": [], "listener_filters": [{"name": "t", "filter_disabled": {"any_match": true, "destination_port_range": {"start": 1, "end": 2}}, "typed_config": {"@type": format!("type.googleapis.com/{TLS_INSPECTOR}")}}]})).unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
    }

    fn listener(extra: serde_json::Value) -> Result<Listener> {
        let mut v = json!({"name": "l", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}}});
        if let (Some(base), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        translate(Obj::new(&v, "listeners[0]")?)
    }

    fn tcp(cluster: &str) -> serde_json::Value {
        json!({"filters": [{"name": "tcp", "typed_config": {"@type": format!("type.googleapis.com/{TCP_PROXY}"), "cluster": cluster}}]})
    }

    #[test]
    fn filter_chain_match_is_translated_and_normalised() {
        let mut chain = tcp("a");
        chain["filter_chain_match"] = json!({"destination_port": 8080, "prefix_ranges": [{"address_prefix": "10.1.2.3", "prefix_len": 16}],
            "server_names": ["Example.COM"], "transport_protocol": "tls", "application_protocols": ["h2"], "source_ports": [1234]});
        let l = listener(json!({"filter_chains": [chain], "use_original_dst": true, "bind_to_port": false})).unwrap();
        let m = &l.filter_chains[0].matcher;
        assert_eq!(m.destination_port, Some(8080));
        assert_eq!(m.prefix_ranges, vec![CidrRange { prefix: "10.1.0.0".parse().unwrap(), len: 16 }]);
        assert_eq!(m.server_names, vec!["example.com"]);
        assert_eq!(m.source_ports, vec![1234]);
        assert!(l.use_original_dst && !l.bind_to_port && l.listener_filters.original_dst);
        assert!(m.prefix_ranges[0].contains("10.1.200.1".parse().unwrap()));
        assert!(m.prefix_ranges[0].contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!m.prefix_ranges[0].contains("10.2.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_listeners_are_refused_by_path() {
        let e = listener(json!({"filter_chains": [tcp("a"), tcp("b")]})).unwrap_err();
        assert_eq!(e.path, "listeners[0].filter_chains[1].filter_chain_match");
        assert!(e.to_string().contains("multiple filter chains with the same matching rules"));
        let e = listener(json!({})).unwrap_err();
        assert!(e.to_string().contains("no filter chains specified"), "{e}");
        let mut chain = tcp("a");
        chain["filter_chain_match"] = json!({"direct_source_prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]});
        let e = listener(json!({"filter_chains": [chain]})).unwrap_err();
        assert_eq!(e.path, "listeners[0].filter_chains[0].filter_chain_match.direct_source_prefix_ranges");
        let mut chain = tcp("a");
        chain["filter_chain_match"] = json!({"prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 33}]});
        let e = listener(json!({"filter_chains": [chain]})).unwrap_err();
        assert_eq!(e.path, "listeners[0].filter_chains[0].filter_chain_match.prefix_ranges[0].prefix_len");
        let e = listener(json!({"filter_chains": [tcp("a")], "listener_filters": [{"name": "pp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"}}]})).unwrap_err();
        assert_eq!(e.path, "listeners[0].listener_filters[0].typed_config.@type");
    }

    #[test]
    fn istiods_listener_settings_are_accepted() {
        let mut chain = tcp("a");
        chain["transport_socket_connect_timeout"] = json!("15s");
        let l = listener(json!({"filter_chains": [chain, {"filter_chain_match": {"destination_port": 1}, "transport_socket_connect_timeout": "0s", "filters": tcp("b")["filters"]}],
            "max_connections_to_accept_per_socket_event": 1}))
        .unwrap();
        assert_eq!(l.filter_chains[0].transport_socket_connect_timeout, Some(Duration::from_secs(15)));
        assert_eq!(l.filter_chains[1].transport_socket_connect_timeout, None, "0s: no limit");
        let e = listener(json!({"filter_chains": [tcp("a")], "max_connections_to_accept_per_socket_event": 0})).unwrap_err();
        assert_eq!(e.path, "listeners[0].max_connections_to_accept_per_socket_event");
    }

    #[test]
    fn buffer_limits_default_to_envoys_and_are_range_checked() {
        assert_eq!(listener(json!({"filter_chains": [tcp("a")]})).unwrap().buffer_limit, 1 << 20);
        let l = listener(json!({"filter_chains": [tcp("a")], "per_connection_buffer_limit_bytes": 32768})).unwrap();
        assert_eq!(l.buffer_limit, 32768);
        for bad in [json!(0), json!(1u64 << 32), json!("lots")] {
            let e = listener(json!({"filter_chains": [tcp("a")], "per_connection_buffer_limit_bytes": bad})).unwrap_err();
            assert_eq!(e.path, "listeners[0].per_connection_buffer_limit_bytes", "{e}");
        }
    }
}
