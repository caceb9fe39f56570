//! Filter chain selection, as Envoy's filter chain manager does it: the criteria are tried in a fixed order
//! (destination port, destination IP, server name, transport protocol, application protocols, source type,
//! source IP, source port) and each step keeps only the chains with the most specific match. A chain that is
//! silent on a criterion is a fallback for that step only: once a step found specific matches, later steps
//! never fall back to chains the step dropped. No chain left: the default chain, if any.

use std::net::{IpAddr, SocketAddr};

use crate::config::listener::{canonical, CidrRange, FilterChain, Listener, SourceType};

/// What is known of a connection when its filter chain is chosen.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The destination: the original one when the listener restores it (`original_dst`).
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// SNI, from the tls_inspector.
    pub server_name: Option<String>,
    /// `tls` (tls_inspector) or `raw_buffer`.
    pub transport_protocol: &'static str,
    /// ALPN (tls_inspector) or `http/1.1`/`h2c` (http_inspector).
    pub application_protocols: Vec<String>,
}

/// The chain that serves `conn`, or `None` (the connection is closed).
pub fn select<'l>(listener: &'l Listener, conn: &ConnectionInfo) -> Option<&'l FilterChain> {
    let mut candidates: Vec<&FilterChain> = listener.filter_chains.iter().collect();
    let local_ip = canonical(conn.local.ip());
    let peer_ip = canonical(conn.peer.ip());
    let same_host = peer_ip.is_loopback() || peer_ip == local_ip;
    let steps: [&dyn Fn(&FilterChain) -> Specificity; 8] = [
        &|c| exact(c.matcher.destination_port.map(|p| p == conn.local.port())),
        &|c| longest_prefix(&c.matcher.prefix_ranges, local_ip),
        &|c| server_name(&c.matcher.server_names, conn.server_name.as_deref()),
        &|c| exact(c.matcher.transport_protocol.as_ref().map(|t| t == conn.transport_protocol)),
        &|c| application_protocol(&c.matcher.application_protocols, &conn.application_protocols),
        &|c| match c.matcher.source_type {
            SourceType::Any => Specificity::Any,
            SourceType::SameIpOrLoopback => specific(same_host, 0),
            SourceType::External => specific(!same_host, 0),
        },
        &|c| longest_prefix(&c.matcher.source_prefix_ranges, peer_ip),
        &|c| exact((!c.matcher.source_ports.is_empty()).then(|| c.matcher.source_ports.contains(&conn.peer.port()))),
    ];
    for step in steps {
        candidates = narrow(candidates, step);
        if candidates.is_empty() {
            return listener.default_filter_chain.as_ref();
        }
    }
    candidates.first().copied()
}

/// How a chain matches one criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Specificity {
    /// The chain names values for the criterion and the connection has none of them.
    Mismatch,
    /// The chain is silent on the criterion.
    Any,
    /// A named value matched; higher ranks are more specific (a longer prefix, a longer wildcard).
    Match(u32),
}

fn specific(matched: bool, rank: u32) -> Specificity {
    if matched {
        Specificity::Match(rank)
    } else {
        Specificity::Mismatch
    }
}

fn exact(criterion: Option<bool>) -> Specificity {
    criterion.map_or(Specificity::Any, |m| specific(m, 0))
}

/// Keeps the chains of the best specific rank; if none matched specifically, those silent on the criterion.
fn narrow<'l>(candidates: Vec<&'l FilterChain>, rank: &dyn Fn(&FilterChain) -> Specificity) -> Vec<&'l FilterChain> {
    let ranked: Vec<(Specificity, &FilterChain)> = candidates.into_iter().map(|c| (rank(c), c)).collect();
    let best = ranked.iter().map(|(s, _)| *s).max().unwrap_or(Specificity::Mismatch);
    if best == Specificity::Mismatch {
        return Vec::new();
    }
    ranked.into_iter().filter(|(s, _)| *s == best).map(|(_, c)| c).collect()
}

fn longest_prefix(ranges: &[CidrRange], ip: IpAddr) -> Specificity {
    if ranges.is_empty() {
        return Specificity::Any;
    }
    // Ranks start at 1 so that an explicit /0 beats a chain with no ranges, as in Envoy.
    ranges.iter().filter(|r| r.contains(ip)).map(|r| Specificity::Match(u32::from(r.len) + 1)).max().unwrap_or(Specificity::Mismatch)
}

/// Exact names beat wildcards (`*.example.com`), longer wildcards beat shorter ones.
fn server_name(names: &[String], sni: Option<&str>) -> Specificity {
    if names.is_empty() {
        return Specificity::Any;
    }
    let Some(sni) = sni.map(str::to_ascii_lowercase) else { return Specificity::Mismatch };
    names
        .iter()
        .filter_map(|n| match n.strip_prefix('*') {
            None => (*n == sni).then_some(u32::MAX),
            Some(suffix) => (sni.ends_with(suffix) && sni.len() > suffix.len()).then_some(suffix.len() as u32),
        })
        .max()
        .map_or(Specificity::Mismatch, Specificity::Match)
}

/// The connection's protocols are tried in its order of preference: the first one some chain names wins.
fn application_protocol(names: &[String], offered: &[String]) -> Specificity {
    if names.is_empty() {
        return Specificity::Any;
    }
    let rank = offered.iter().position(|p| names.contains(p));
    rank.map_or(Specificity::Mismatch, |i| Specificity::Match(u32::MAX - i as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::listener::{FilterChainMatch, ListenerFilters};

    fn chain(name: &str, matcher: FilterChainMatch) -> FilterChain {
        FilterChain { name: name.into(), matcher, transport_socket: Default::default(), transport_socket_connect_timeout: None, metadata_exchange: None, rbac: Vec::new(), istio_stats: None, filter: crate::config::listener::TcpProxy::to(name) }
    }

    fn listener(chains: Vec<FilterChain>, default: bool) -> Listener {
        Listener {
            name: "l".into(),
            address: "0.0.0.0:15006".parse().unwrap(),
            filter_chains: chains,
            default_filter_chain: default.then(|| chain("default", FilterChainMatch::default())),
            use_original_dst: false,
            bind_to_port: true,
            listener_filters: ListenerFilters::original_dst_only(),
            direction: Default::default(),
            access_log: Default::default(),
            buffer_limit: crate::config::DEFAULT_BUFFER_LIMIT,
        }
    }

    fn conn(local: &str, transport: &'static str, alpn: &[&str]) -> ConnectionInfo {
        ConnectionInfo {
            local: local.parse().unwrap(),
            peer: "10.0.0.9:40000".parse().unwrap(),
            server_name: None,
            transport_protocol: transport,
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn range(text: &str, len: u8) -> CidrRange {
        CidrRange { prefix: text.parse().unwrap(), len }
    }

    fn picked(l: &Listener, c: &ConnectionInfo) -> Option<String> {
        select(l, c).map(|c| c.name.clone())
    }

    #[test]
    fn a_specific_port_wins_and_never_falls_back_to_the_port_wildcard() {
        let port_8080_tls = FilterChainMatch { destination_port: Some(8080), transport_protocol: Some("tls".into()), ..Default::default() };
        let l = listener(vec![chain("8080-tls", port_8080_tls), chain("any", FilterChainMatch::default())], false);
        assert_eq!(picked(&l, &conn("10.0.0.1:8080", "tls", &[])).as_deref(), Some("8080-tls"));
        assert_eq!(picked(&l, &conn("10.0.0.1:9090", "raw_buffer", &[])).as_deref(), Some("any"));
        // Port 8080 matched a chain; that chain wants TLS; Envoy does not fall back to "any".
        assert_eq!(picked(&l, &conn("10.0.0.1:8080", "raw_buffer", &[])), None);
        let with_default = listener(l.filter_chains.clone(), true);
        assert_eq!(picked(&with_default, &conn("10.0.0.1:8080", "raw_buffer", &[])).as_deref(), Some("default"));
    }

    #[test]
    fn the_longest_destination_prefix_wins_and_explicit_zero_beats_none() {
        let l = listener(
            vec![
                chain("wide", FilterChainMatch { prefix_ranges: vec![range("10.0.0.0", 8)], ..Default::default() }),
                chain("narrow", FilterChainMatch { prefix_ranges: vec![range("10.1.0.0", 16)], ..Default::default() }),
                chain("zero", FilterChainMatch { prefix_ranges: vec![range("0.0.0.0", 0)], ..Default::default() }),
                chain("none", FilterChainMatch { source_ports: vec![1], ..Default::default() }),
            ],
            false,
        );
        assert_eq!(picked(&l, &conn("10.1.2.3:80", "raw_buffer", &[])).as_deref(), Some("narrow"));
        assert_eq!(picked(&l, &conn("10.2.2.3:80", "raw_buffer", &[])).as_deref(), Some("wide"));
        assert_eq!(picked(&l, &conn("192.168.0.1:80", "raw_buffer", &[])).as_deref(), Some("zero"));
    }

    #[test]
    fn server_names_and_application_protocols() {
        let l = listener(
            vec![
                chain("exact", FilterChainMatch { server_names: vec!["api.example.com".into()], ..Default::default() }),
                chain("wild", FilterChainMatch { server_names: vec!["*.example.com".into()], ..Default::default() }),
                chain("h2", FilterChainMatch { application_protocols: vec!["h2".into()], ..Default::default() }),
                chain("http1", FilterChainMatch { application_protocols: vec!["http/1.1".into()], ..Default::default() }),
            ],
            false,
        );
        let mut c = conn("10.0.0.1:443", "tls", &["h2", "http/1.1"]);
        c.server_name = Some("API.example.com".into());
        assert_eq!(picked(&l, &c).as_deref(), Some("exact"));
        c.server_name = Some("www.example.com".into());
        assert_eq!(picked(&l, &c).as_deref(), Some("wild"));
        c.server_name = None;
        assert_eq!(picked(&l, &c).as_deref(), Some("h2"), "the client's first protocol wins");
        c.application_protocols = vec!["http/1.1".into()];
        assert_eq!(picked(&l, &c).as_deref(), Some("http1"));
        c.application_protocols.clear();
        assert_eq!(picked(&l, &c), None);
    }
}
