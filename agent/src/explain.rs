//! `weft-agent explain`: what would happen to a connection or request a captured pod makes, step by step, from
//! the pod's live configuration and without sending anything: capture, the listener and filter chain chosen
//! and why, the transport (mTLS or plaintext), each RBAC filter's decision with the policy that decided, the
//! route matched, the cluster and its endpoints. When an endpoint is a pod this agent serves, the explanation
//! goes on through that pod's inbound side with the client's identity. It calls the data path's own
//! selection functions (filter chains, routes, RBAC), so it cannot disagree with what traffic gets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper::http::request::Parts;

use crate::capture::plan::{PodCapture, Selection};
use crate::capture::{RedirectMode, INBOUND_PORT, OUTBOUND_PORT};
use crate::config::alpn::{AlpnOverrides, UpstreamProtocol};
use crate::config::cluster::{Discovery, LbPolicy};
use crate::config::http_connection_manager::{HttpConnectionManager, HttpFilterKind, Routes};
use crate::config::http_filters::FilterOverride;
use crate::config::listener::{FilterChain, FilterChainMatch, Listener, NetworkFilter};
use crate::config::rbac::{Action as RbacAction, Engines};
use crate::config::route::{Action, ClusterSpecifier, PathMatch, RouteConfiguration};
use crate::config::tls::TransportSocket;
use crate::proxy::filter_chain::{self, ConnectionInfo};
use crate::proxy::filters::rbac::Facts;
use crate::proxy::snapshot::Snapshot;
use crate::proxy::tls_info::{PeerCertificate, TlsInfo};

/// What to explain: a connection to `to` (an address or a host the pod's routes know) on `port`, as HTTP
/// (`method`, `path`, `headers`) unless `tcp`.
#[derive(Debug, Clone)]
pub struct Question {
    pub to: String,
    pub port: u16,
    pub tcp: bool,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// A pod as the explanation needs it.
#[derive(Clone)]
pub struct PodView {
    /// `namespace/name`.
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub redirect: RedirectMode,
    pub capture: PodCapture,
    /// Its SPIFFE identity, when the agent issues it one.
    pub identity: Option<String>,
    /// Its configuration (`None`: none received yet).
    pub snapshot: Option<Arc<Snapshot>>,
}

/// One step: the pod it happens in, what it is, what happened.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Step {
    pub pod: String,
    pub step: std::borrow::Cow<'static, str>,
    pub what: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Explanation {
    pub steps: Vec<Step>,
    /// How it ends: delivered, refused, answered locally.
    pub outcome: String,
}

/// Where the steps go, and the pod they are about.
struct Trace<'a> {
    pod: &'a str,
    steps: Vec<Step>,
}

impl Trace<'_> {
    fn add(&mut self, step: &'static str, what: impl Into<String>) {
        self.steps.push(Step { pod: self.pod.to_string(), step: step.into(), what: what.into() });
    }
}

/// The connection `client` makes, and what follows; `pods` are the other pods this agent serves (an
/// endpoint among them is followed through its inbound side).
pub fn outbound(client: &PodView, q: &Question, pods: &[PodView]) -> Explanation {
    let mut trace = Trace { pod: &client.name, steps: Vec::new() };
    let outcome = match outbound_steps(client, q, pods, &mut trace) {
        Ok(outcome) | Err(outcome) => outcome,
    };
    Explanation { steps: trace.steps, outcome }
}

fn outbound_steps(client: &PodView, q: &Question, pods: &[PodView], trace: &mut Trace<'_>) -> Result<String, String> {
    let snapshot = client.snapshot.as_deref().ok_or("the pod has no configuration yet (no control-plane response accepted): its connections wait or are refused")?;
    let (dst, host) = resolve(snapshot, q)?;
    trace.add("destination", match &host {
        Some(h) => format!("{h} is {dst} (an address of the virtual host that names it in the pod's routes)"),
        None => format!("{dst}"),
    });
    let source = client.ips.first().copied().ok_or("the pod has no address")?;
    if let Err(why) = captures_outbound(&client.capture, dst) {
        trace.add("capture", why.clone());
        return Err(format!("not proxied: the connection goes to {dst} directly ({why})"));
    }
    trace.add("capture", format!("outbound TCP to {dst} is redirected ({}) to the pod's 127.0.0.1:{OUTBOUND_PORT}", client.redirect));
    let conn = ConnectionInfo {
        local: dst,
        peer: SocketAddr::new(source, 40_000),
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: if q.tcp { Vec::new() } else { vec!["http/1.1".to_string()] },
    };
    let facts = Peer { tls: None };
    let routed = through_listener(snapshot, OUTBOUND_PORT, &conn, &facts, q, host.as_deref(), trace)?;
    let (cluster_name, endpoints) = cluster_step(snapshot, &routed, dst, trace)?;
    // Follow the connection into a pod this agent serves.
    let served = endpoints.iter().find_map(|(e, tls)| pods.iter().find(|p| p.ips.contains(&e.ip())).map(|p| (p, *e, tls.clone())));
    let Some((server, endpoint, tls)) = served else {
        return Ok(format!("proxied to cluster {cluster_name}: an endpoint outside this node's pods"));
    };
    trace.add("next hop", format!("{endpoint} is pod {} on this node: following it inbound", server.name));
    let mut inbound_trace = Trace { pod: &server.name, steps: Vec::new() };
    let result = inbound_steps(server, endpoint, client, tls, q, host.as_deref(), &mut inbound_trace);
    trace.steps.append(&mut inbound_trace.steps);
    result
}

/// How the client's proxy connects to the endpoint: TLS with these ALPN protocols, or plaintext.
#[derive(Debug, Clone)]
struct Upstream {
    alpn: Vec<String>,
}

fn inbound_steps(server: &PodView, endpoint: SocketAddr, client: &PodView, tls: Option<Upstream>, q: &Question, host: Option<&str>, trace: &mut Trace<'_>) -> Result<String, String> {
    let snapshot = server.snapshot.as_deref().ok_or("the server pod has no configuration yet: its inbound connections are refused")?;
    if let Err(why) = captures_inbound(&server.capture, endpoint.port()) {
        trace.add("capture", why.clone());
        return Ok(format!("delivered to the app on {endpoint} without its proxy ({why})"));
    }
    trace.add("capture", format!("inbound TCP to port {} is redirected ({}) to the pod's port {INBOUND_PORT}", endpoint.port(), server.redirect));
    let peer = SocketAddr::new(client.ips.first().copied().unwrap_or(IpAddr::from([0, 0, 0, 0])), 40_000);
    let (transport, alpn) = match &tls {
        Some(u) => ("tls", u.alpn.clone()),
        None => ("raw_buffer", if q.tcp { Vec::new() } else { vec!["http/1.1".to_string()] }),
    };
    let conn = ConnectionInfo { local: endpoint, peer, server_name: None, transport_protocol: transport, application_protocols: alpn };
    // Over mTLS the client presents its workload certificate: its SPIFFE id is the principal RBAC sees.
    let presented = tls.as_ref().map(|_| TlsInfo {
        sni: None,
        alpn: conn.application_protocols.first().cloned(),
        peer: client.identity.as_ref().map(|id| Arc::new(PeerCertificate { uri_sans: vec![id.clone()], ..Default::default() })),
        local_uri_sans: server.identity.iter().cloned().collect::<Vec<_>>().into(),
    });
    let facts = Peer { tls: presented.as_ref() };
    let routed = through_listener(snapshot, INBOUND_PORT, &conn, &facts, q, host, trace)?;
    trace.add("cluster", format!("{}: the app on {endpoint}, reached from 127.0.0.6", routed.cluster));
    Ok(format!("delivered to the app of {} on port {}", server.name, endpoint.port()))
}

/// What RBAC sees of the connection's TLS session.
struct Peer<'a> {
    tls: Option<&'a TlsInfo>,
}

/// The address `q` names: an IP, or a host a virtual host of the pod's routes (RDS or inline) names together
/// with an address.
fn resolve(snapshot: &Snapshot, q: &Question) -> Result<(SocketAddr, Option<String>), String> {
    if let Ok(ip) = q.to.parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, q.port), None));
    }
    let with_port = format!("{}:{}", q.to, q.port);
    let inline = snapshot.listeners.values().flat_map(|l| l.model().inline_routes());
    for rc in snapshot.routes.values().map(|e| &**e.model()).chain(inline) {
        for vh in &rc.virtual_hosts {
            if !vh.domains.iter().any(|d| *d == q.to || *d == with_port) {
                continue;
            }
            let ip = vh.domains.iter().find_map(|d| d.parse::<IpAddr>().ok().or_else(|| d.parse::<SocketAddr>().ok().map(|a| a.ip())));
            if let Some(ip) = ip {
                return Ok((SocketAddr::new(ip, q.port), Some(q.to.clone())));
            }
        }
    }
    Err(format!("{} is neither an address nor a host with an address in the pod's routes; give the service's cluster IP", q.to))
}

/// Istio's outbound capture order: excluded ports, excluded ranges, included ports, included ranges.
fn captures_outbound(plan: &PodCapture, dst: SocketAddr) -> Result<(), String> {
    if plan.outbound_excluded_ports.contains(&dst.port()) {
        return Err(format!("port {} is in excludeOutboundPorts", dst.port()));
    }
    if let Some(range) = plan.outbound_excluded_ranges.iter().find(|r| r.contains(&dst.ip())) {
        return Err(format!("{} is in excludeOutboundIPRanges ({range})", dst.ip()));
    }
    if plan.outbound_ports.contains(&dst.port()) {
        return Ok(());
    }
    match &plan.outbound_ranges {
        Selection::All => Ok(()),
        Selection::Only(ranges) if ranges.iter().any(|r| r.contains(&dst.ip())) => Ok(()),
        Selection::Only(_) => Err(format!("{} is not in includeOutboundIPRanges", dst.ip())),
    }
}

fn captures_inbound(plan: &PodCapture, port: u16) -> Result<(), String> {
    match &plan.inbound_ports {
        Selection::All if plan.inbound_excluded_ports.contains(&port) => Err(format!("port {port} is in excludeInboundPorts")),
        Selection::All => Ok(()),
        Selection::Only(ports) if ports.contains(&port) => Ok(()),
        Selection::Only(_) => Err(format!("port {port} is not in includeInboundPorts")),
    }
}

/// Where a connection or request goes: the cluster, and for HTTP the `istio.alpn` lists its TLS offers.
struct Routed {
    cluster: String,
    alpn: Option<AlpnOverrides>,
}

/// The listener bound on `port` (and the one it hands the connection to), its chain, transport, network RBAC
/// and terminal filter.
fn through_listener(snapshot: &Snapshot, port: u16, conn: &ConnectionInfo, peer: &Peer<'_>, q: &Question, host: Option<&str>, trace: &mut Trace<'_>) -> Result<Routed, String> {
    let entry = snapshot.bound_on_port(port).ok_or_else(|| format!("no listener is bound on port {port}: the connection is refused"))?;
    let listener = match entry.use_original_dst.then(|| snapshot.listener_for(conn.local)).flatten() {
        Some(l) => {
            trace.add("listener", format!("{} (port {port}) hands the connection to {}, the listener for {}", entry.name, l.name, conn.local));
            l
        }
        None => {
            trace.add("listener", format!("{} (port {port}) serves it: no listener for {}", entry.name, conn.local));
            entry
        }
    };
    let chain = chain_step(listener, conn, trace)?;
    let tls = match &chain.transport_socket {
        TransportSocket::RawBuffer => {
            trace.add("transport", "plaintext");
            None
        }
        TransportSocket::Tls(context) => {
            let Some(tls) = peer.tls else {
                return Err(format!("the chain {} wants TLS and the connection is plaintext: refused", chain.name));
            };
            let mutual = if context.require_client_certificate { "mutual TLS (a client certificate is required)" } else { "TLS" };
            let who = tls.peer.as_ref().and_then(|p| p.uri_sans.first()).map_or("no certificate".to_string(), |id| format!("the client presents {id}"));
            trace.add("transport", format!("{mutual}; {who}"));
            Some(tls)
        }
    };
    let facts = Facts { local: conn.local, peer: conn.peer, remote: conn.peer.ip(), server_name: conn.server_name.as_deref(), tls, request: None };
    for (i, rbac) in chain.rbac.iter().enumerate() {
        rbac_step(&format!("network RBAC #{}", i + 1), &rbac.engines, &facts, trace)?;
    }
    match &chain.filter {
        NetworkFilter::TcpProxy(t) => {
            let clusters: Vec<String> = t.clusters.iter().map(|(c, w)| if t.clusters.len() > 1 { format!("{c} (weight {w})") } else { c.clone() }).collect();
            trace.add("tcp_proxy", format!("to {}", clusters.join(", ")));
            Ok(Routed { cluster: heaviest(t.clusters.iter().map(|(c, w)| (c.as_str(), *w))), alpn: None })
        }
        NetworkFilter::HttpConnectionManager(hcm) => {
            if q.tcp {
                return Err("the chain serves HTTP and the question is TCP: ask with --method/--path".into());
            }
            let cluster = http_steps(snapshot, hcm, q, host, conn, facts, trace)?;
            let alpn = hcm.http_filters.iter().find_map(|f| match &f.kind {
                HttpFilterKind::Alpn(overrides) => Some((**overrides).clone()),
                _ => None,
            });
            Ok(Routed { cluster, alpn })
        }
    }
}

fn chain_step<'l>(listener: &'l Listener, conn: &ConnectionInfo, trace: &mut Trace<'_>) -> Result<&'l FilterChain, String> {
    let chain = filter_chain::select(listener, conn).ok_or_else(|| {
        trace.add("filter chain", format!("none of {}'s {} chains matches, and it has no default chain", listener.name, listener.filter_chains.len()));
        "no filter chain matches: the connection is closed (NR)".to_string()
    })?;
    let default = listener.default_filter_chain.as_ref().is_some_and(|d| std::ptr::eq(d, chain));
    let why = if default { "no chain matches: the default chain".to_string() } else { describe_match(&chain.matcher) };
    let name = if chain.name.is_empty() { "(unnamed)" } else { &chain.name };
    trace.add("filter chain", format!("{name}: {why} (the connection: port {}, {}, ALPN [{}])", conn.local.port(), conn.transport_protocol, conn.application_protocols.join(",")));
    Ok(chain)
}

fn describe_match(m: &FilterChainMatch) -> String {
    let mut parts = Vec::new();
    if let Some(p) = m.destination_port {
        parts.push(format!("destination port {p}"));
    }
    if !m.prefix_ranges.is_empty() {
        let ranges: Vec<String> = m.prefix_ranges.iter().map(|r| format!("{}/{}", r.prefix, r.len)).collect();
        parts.push(format!("destination in {}", ranges.join(",")));
    }
    if !m.server_names.is_empty() {
        parts.push(format!("SNI {}", m.server_names.join(",")));
    }
    if let Some(t) = &m.transport_protocol {
        parts.push(format!("transport {t}"));
    }
    if !m.application_protocols.is_empty() {
        parts.push(format!("ALPN {}", m.application_protocols.join(",")));
    }
    if parts.is_empty() { "it matches every connection".into() } else { format!("matches {}", parts.join(", ")) }
}

/// An RBAC filter's decision; a denial ends the explanation.
fn rbac_step(name: &str, engines: &Engines, facts: &Facts<'_>, trace: &mut Trace<'_>) -> Result<(), String> {
    let Some(policies) = &engines.enforced else {
        trace.add("rbac", format!("{name}: no enforced policies, allowed"));
        return Ok(());
    };
    let matched = policies.matched(facts);
    let (allowed, why) = match (policies.action, matched) {
        (RbacAction::Allow, Some(p)) => (true, format!("ALLOW policy {p} matches")),
        (RbacAction::Allow, None) => (false, format!("no ALLOW policy matches (of {})", policies.policies.len())),
        (RbacAction::Deny, Some(p)) => (false, format!("DENY policy {p} matches")),
        (RbacAction::Deny, None) => (true, format!("no DENY policy matches (of {})", policies.policies.len())),
        (RbacAction::Log, _) => (true, "LOG policies never deny".into()),
    };
    trace.add("rbac", format!("{name}: {} — {why}", if allowed { "allowed" } else { "denied" }));
    match allowed {
        true => Ok(()),
        false => Err(format!("denied by {name}: {why} (403 over HTTP, the connection closed over TCP)")),
    }
}

/// The connection manager: the route for the request, its HTTP filters' RBAC decisions, the route's action.
fn http_steps(snapshot: &Snapshot, hcm: &HttpConnectionManager, q: &Question, host: Option<&str>, conn: &ConnectionInfo, connection: Facts<'_>, trace: &mut Trace<'_>) -> Result<String, String> {
    let routes: Option<Arc<RouteConfiguration>> = match &hcm.routes {
        Routes::Inline(rc) => Some(Arc::clone(rc)),
        Routes::Rds(name) => snapshot.route_config(name),
    };
    let routes = routes.ok_or("the connection manager's routes have not arrived: the listener is still warming")?;
    // The Host an HTTP client sends: the one asked for, the host named, or the address (without port 80).
    let given = q.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("host")).map(|(_, v)| v.clone());
    let address = || if conn.local.port() == 80 { conn.local.ip().to_string() } else { conn.local.to_string() };
    let authority = given.or(host.map(str::to_string)).unwrap_or_else(address);
    let parts = request(q, &authority)?;
    let Some((vh, route)) = crate::proxy::route::select(&routes, &authority, &parts) else {
        trace.add("route", format!("route configuration {}: no virtual host and route match {} {} for {authority}", name_of(&routes.name), q.method, q.path));
        return Err("no route: 404 (NR)".into());
    };
    let route_name = if route.name.is_empty() { String::new() } else { format!(" {}", route.name) };
    trace.add("route", format!("route configuration {}, virtual host {}, route{route_name} ({})", name_of(&routes.name), vh.name, describe_path(&route.matcher.path)));
    for filter in &hcm.http_filters {
        let chosen = route.per_filter.get(&filter.name).or_else(|| vh.per_filter.get(&filter.name)).or_else(|| routes.per_filter.get(&filter.name));
        if let HttpFilterKind::Rbac(rbac) = &filter.kind {
            let engines = match chosen {
                Some(FilterOverride::Disabled) => continue,
                Some(FilterOverride::Rbac(engines)) => engines,
                _ => &rbac.engines,
            };
            rbac_step(&format!("HTTP RBAC {}", filter.name), engines, &Facts { request: Some(&parts), ..connection }, trace)?;
        }
    }
    match &route.action {
        Action::DirectResponse { status, .. } => Err(format!("answered by the proxy: direct response {status}")),
        Action::Redirect(_) => Err("answered by the proxy: a redirect".into()),
        Action::Route(a) => match &a.cluster {
            ClusterSpecifier::Cluster(c) => Ok(c.clone()),
            ClusterSpecifier::Header(h) => parts.headers.get(h.as_str()).and_then(|v| v.to_str().ok()).map(str::to_string).ok_or_else(|| format!("the route takes its cluster from header {h}, which the request lacks: 503")),
            ClusterSpecifier::Weighted(w) => {
                let shares: Vec<String> = w.clusters.iter().map(|c| format!("{} (weight {})", c.name, c.weight)).collect();
                trace.add("weighted clusters", shares.join(", "));
                Ok(heaviest(w.clusters.iter().map(|c| (c.name.as_str(), c.weight))))
            }
        },
    }
}

fn name_of(name: &str) -> &str {
    if name.is_empty() { "(inline)" } else { name }
}

fn describe_path(p: &PathMatch) -> String {
    match p {
        PathMatch::Prefix(s) => format!("prefix {s}"),
        PathMatch::Path(s) => format!("path {s}"),
        PathMatch::Regex(r) => format!("regex {}", r.source),
        PathMatch::PathSeparatedPrefix(s) => format!("path-separated prefix {s}"),
        PathMatch::Connect => "CONNECT".into(),
    }
}

/// The request `q` asks about, as the connection manager would see it.
fn request(q: &Question, authority: &str) -> Result<Parts, String> {
    let mut builder = hyper::Request::builder().method(q.method.as_str()).uri(q.path.as_str()).header(hyper::header::HOST, authority);
    for (k, v) in q.headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("host")) {
        builder = builder.header(k.as_str(), v.as_str());
    }
    builder.body(()).map(|r| r.into_parts().0).map_err(|e| format!("the request cannot be made: {e}"))
}

/// The cluster with the most weight (the one most requests take), the first among equals.
fn heaviest<'a>(clusters: impl Iterator<Item = (&'a str, u32)>) -> String {
    clusters.fold(None::<(&str, u32)>, |best, (c, w)| match best {
        Some((_, bw)) if bw >= w => best,
        _ => Some((c, w)),
    })
    .map_or_else(String::new, |(c, _)| c.to_string())
}

/// The cluster's kind and endpoints, with the transport each endpoint gets (TLS offering the `istio.alpn`
/// list for the request's upstream protocol, unless the cluster opts out).
fn cluster_step(snapshot: &Snapshot, routed: &Routed, dst: SocketAddr, trace: &mut Trace<'_>) -> Result<(String, Vec<(SocketAddr, Option<Upstream>)>), String> {
    let name = routed.cluster.as_str();
    let cluster = snapshot.cluster(name).ok_or_else(|| {
        trace.add("cluster", format!("{name} is not in the pod's configuration"));
        format!("cluster {name} not found: 503 (NC)")
    })?;
    let endpoints: Vec<SocketAddr> = match &cluster.config.discovery {
        Discovery::OriginalDst => vec![dst],
        _ => cluster.endpoints.hosts(),
    };
    let kind = match &cluster.config.discovery {
        Discovery::Static { .. } => "STATIC",
        Discovery::OriginalDst => "ORIGINAL_DST (the connection's own destination)",
        Discovery::Eds { .. } => "EDS",
        Discovery::Dns { .. } => "DNS",
    };
    if endpoints.is_empty() {
        trace.add("cluster", format!("{name} ({kind}) has no healthy endpoint"));
        return Err("no healthy upstream: 503 (UH)".into());
    }
    let with_tls: Vec<(SocketAddr, Option<Upstream>)> = endpoints
        .iter()
        .map(|e| {
            let tls = match cluster.config.transport_socket_for(cluster.endpoints.socket_labels(*e)) {
                TransportSocket::RawBuffer => None,
                TransportSocket::Tls(context) => {
                    let protocol = if cluster.config.http2 { UpstreamProtocol::Http2 } else { UpstreamProtocol::Http11 };
                    let chosen = routed.alpn.as_ref().filter(|_| cluster.config.metadata.istio.alpn_override).and_then(|o| o.get(protocol));
                    Some(Upstream { alpn: chosen.map_or_else(|| context.common.alpn.clone(), |list| list.to_vec()) })
                }
            };
            (*e, tls)
        })
        .collect();
    let shown: Vec<String> = with_tls.iter().map(|(e, tls)| format!("{e} ({})", if tls.is_some() { "mTLS" } else { "plaintext" })).collect();
    trace.add("cluster", format!("{name} ({kind}, {}): {}", lb_name(cluster.config.lb_policy), shown.join(", ")));
    Ok((name.to_string(), with_tls))
}

/// A load balancing policy by Envoy's name.
fn lb_name(policy: LbPolicy) -> &'static str {
    match policy {
        LbPolicy::RoundRobin => "ROUND_ROBIN",
        LbPolicy::Random => "RANDOM",
        LbPolicy::ClusterProvided => "CLUSTER_PROVIDED",
        LbPolicy::LeastRequest { .. } => "LEAST_REQUEST",
        LbPolicy::RingHash { .. } => "RING_HASH",
        LbPolicy::Maglev { .. } => "MAGLEV",
    }
}

/// The explanation as people read it.
pub fn text(e: &Explanation) -> String {
    let width = e.steps.iter().map(|s| s.step.len()).max().unwrap_or(0);
    let mut out = String::new();
    let mut pod = "";
    for s in &e.steps {
        if s.pod != pod {
            pod = &s.pod;
            out.push_str(&format!("{pod}\n"));
        }
        out.push_str(&format!("  {:<width$}  {}\n", s.step, s.what));
    }
    out.push_str(&format!("=> {}\n", e.outcome));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::store::Resource;
    use crate::config::tree::Obj;
    use serde_json::json;

    fn listener(v: serde_json::Value) -> crate::config::store::Entry<Listener> {
        Resource::fixed(v["name"].as_str().unwrap(), crate::config::listener::translate(Obj::new(&v, "l").unwrap()).unwrap())
    }

    /// Istio's sidecar shape, reduced: virtualOutbound hands port 80 to an HTTP listener whose route sends to
    /// the server's cluster; the server's virtualInbound wants mTLS and denies /admin.
    fn snapshot(server: bool) -> Arc<Snapshot> {
        let virtual_outbound = json!({"name": "virtualOutbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}}, "use_original_dst": true,
            "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "p", "cluster": "PassthroughCluster"}}]}]});
        let http = json!({"name": "0.0.0.0_80", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}}, "bind_to_port": false,
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "stat_prefix": "h",
                "route_config": {"name": "80", "virtual_hosts": [{"name": "server", "domains": ["server.shop.svc.cluster.local", "10.96.0.7"], "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "outbound|80||server"}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]});
        let inbound = json!({"name": "virtualInbound", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}}, "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
            "filter_chains": [{"name": "0.0.0.0_8080", "filter_chain_match": {"destination_port": 8080, "transport_protocol": "tls"},
                "transport_socket": {"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", "require_client_certificate": true,
                    "common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "default"}], "validation_context_sds_secret_config": {"name": "ROOTCA"}}}},
                "filters": [{"name": "hcm", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "stat_prefix": "i",
                    "route_config": {"name": "inbound|8080||", "virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.rbac", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                        "rules": {"action": "DENY", "policies": {"ns[shop]-policy[deny-admin]-rule[0]": {"permissions": [{"url_path": {"path": {"prefix": "/admin"}}}], "principals": [{"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/shop/sa/client"}}}]}}}}},
                        {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]});
        let cluster = |v: serde_json::Value| Resource::fixed(v["name"].as_str().unwrap(), crate::config::cluster::translate(Obj::new(&v, "c").unwrap()).unwrap());
        let server_cluster = json!({"name": "outbound|80||server", "type": "STATIC", "load_assignment": {"cluster_name": "s", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.77.0.4", "port_value": 8080}}}}]}]},
            "transport_socket": {"name": "tls", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "common_tls_context": {"alpn_protocols": ["istio-http/1.1"]}}}});
        let inbound_cluster = json!({"name": "inbound|8080||", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"});
        let (listeners, clusters) = match server {
            false => (vec![listener(virtual_outbound), listener(http)], vec![cluster(server_cluster)]),
            true => (vec![listener(inbound)], vec![cluster(inbound_cluster)]),
        };
        Arc::new(Snapshot { listeners: Arc::new(listeners.into_iter().collect()), clusters: Arc::new(clusters.into_iter().collect()), ..Default::default() })
    }

    fn pod(name: &str, ip: [u8; 4], sa: &str, server: bool) -> PodView {
        PodView {
            name: format!("shop/{name}"),
            ips: vec![IpAddr::from(ip)],
            redirect: RedirectMode::Iptables,
            capture: PodCapture::default(),
            identity: Some(format!("spiffe://cluster.local/ns/shop/sa/{sa}")),
            snapshot: Some(snapshot(server)),
        }
    }

    fn question(to: &str, path: &str) -> Question {
        Question { to: to.into(), port: 80, tcp: false, method: "GET".into(), path: path.into(), headers: Vec::new() }
    }

    #[test]
    fn a_request_is_followed_from_the_client_into_the_server_and_its_policy() {
        let (client, server) = (pod("client", [10, 77, 0, 2], "client", false), pod("server-v1", [10, 77, 0, 4], "server", true));
        let allowed = outbound(&client, &question("server.shop.svc.cluster.local", "/"), std::slice::from_ref(&server));
        assert_eq!(allowed.outcome, "delivered to the app of shop/server-v1 on port 8080", "{}", text(&allowed));
        let said = text(&allowed);
        for expected in ["server.shop.svc.cluster.local is 10.96.0.7:80", "virtualOutbound (port 15001) hands the connection to 0.0.0.0_80", "route configuration 80, virtual host server, route default (prefix /)",
            "outbound|80||server (STATIC, ROUND_ROBIN): 10.77.0.4:8080 (mTLS)", "10.77.0.4:8080 is pod shop/server-v1", "0.0.0.0_8080: matches destination port 8080, transport tls",
            "mutual TLS (a client certificate is required); the client presents spiffe://cluster.local/ns/shop/sa/client", "no DENY policy matches (of 1)"] {
            assert!(said.contains(expected), "{expected:?} in\n{said}");
        }
        let denied = outbound(&client, &question("10.96.0.7", "/admin/users"), &[server]);
        assert!(denied.outcome.starts_with("denied by HTTP RBAC envoy.filters.http.rbac: DENY policy ns[shop]-policy[deny-admin]-rule[0] matches"), "{}", text(&denied));
    }

    #[test]
    fn exclusions_unknown_hosts_and_missing_routes_are_said() {
        let mut client = pod("client", [10, 77, 0, 2], "client", false);
        let nowhere = outbound(&client, &question("nowhere.example", "/"), &[]);
        assert!(nowhere.outcome.contains("neither an address nor a host"), "{}", text(&nowhere));
        let mut q = question("10.96.0.7", "/");
        q.port = 81;
        let passthrough = outbound(&client, &q, &[]);
        assert!(text(&passthrough).contains("virtualOutbound (port 15001) serves it: no listener for 10.96.0.7:81") && passthrough.outcome.contains("PassthroughCluster"), "{}", text(&passthrough));
        client.capture.outbound_excluded_ports = vec![80];
        let excluded = outbound(&client, &question("10.96.0.7", "/"), &[]);
        assert_eq!(excluded.outcome, "not proxied: the connection goes to 10.96.0.7:80 directly (port 80 is in excludeOutboundPorts)");
    }
}
