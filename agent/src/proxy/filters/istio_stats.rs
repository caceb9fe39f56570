//! Istio's standard metrics filter (`istio.stats`), on HTTP streams and TCP connections, as istio-proxy's
//! `istio_stats` fills them: the reporter (`destination` on inbound listeners, `source` on outbound), the
//! workloads of both sides (this pod's from its node metadata, the peer's from the metadata exchanges), the
//! principals (the TLS certificates' first URI SANs), the destination service (the routed cluster's
//! `istio.services` metadata, else the `host` header unless `disable_host_header_fallback`), and per stream
//! the protocol, response code, gRPC status, Envoy's response flags and the connection security policy. HTTP
//! streams are recorded when they end; TCP connections when the peer is known (or they end), then every
//! `tcp_reporting_duration` and at their close.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use crate::config::cluster::Cluster;
use crate::config::istio_stats::IstioStats;
use crate::config::listener::TrafficDirection;
use crate::config::workload_metadata::{LocalWorkload, Peer, WorkloadMetadata};
use crate::proxy::body::{Body, StreamEnd};
use crate::proxy::filters::http::local_reply::{self, ResponseFlag};
use crate::proxy::filters::network::metadata_exchange::PeerSlot;
use crate::proxy::istio_metrics::{IstioMetrics, Labels, Metric};
use crate::proxy::pod_share::WireBytes;
use crate::proxy::snapshot::Snapshot;
use crate::proxy::tls_info::TlsInfo;
use crate::proxy::upstream::pool::UpstreamSession;

const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
const UNKNOWN: &str = "unknown";

/// Clusters istiod names for traffic that leaves the service registry: reported by name.
const SPECIAL_CLUSTERS: [&str; 5] = ["BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster", "InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv6"];

/// Which side reports: the client (`source`, outbound listeners) or the server (`destination`, inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    /// istio-proxy's choice for a sidecar listener: inbound reports as the destination, anything else as the
    /// source.
    pub fn of(direction: TrafficDirection) -> Reporter {
        match direction {
            TrafficDirection::Inbound => Reporter::Destination,
            TrafficDirection::Outbound | TrafficDirection::Unspecified => Reporter::Source,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The filter as one listener's streams use it.
#[derive(Clone)]
pub struct StatsFilter {
    pub config: Arc<IstioStats>,
    pub reporter: Reporter,
    pub metrics: Arc<IstioMetrics>,
    pub local: Arc<LocalWorkload>,
}

/// What a stream tells of its two sides and where it went.
#[derive(Default)]
pub struct Observed<'a> {
    /// The peer's workload metadata, from a metadata exchange.
    pub peer: Option<&'a WorkloadMetadata>,
    /// The first URI SAN of the peer's certificate, and of ours.
    pub peer_san: Option<&'a str>,
    pub local_san: Option<&'a str>,
    /// The request's `host` (HTTP).
    pub host: Option<&'a str>,
    /// The route's name (HTTP).
    pub route: Option<&'a str>,
    /// The cluster the stream went to, with its configuration when the snapshot has it.
    pub cluster: Option<(&'a str, Option<&'a Cluster>)>,
}

impl<'a> Observed<'a> {
    /// The downstream connection's side: the peer certificate and ours, when it is TLS.
    pub fn downstream(tls: Option<&'a TlsInfo>) -> Observed<'a> {
        let peer_san = tls.and_then(|t| t.peer.as_ref()).and_then(|p| p.uri_sans.first()).map(String::as_str);
        let local_san = tls.and_then(|t| t.local_uri_sans.first()).map(String::as_str);
        Observed { peer_san, local_san, ..Observed::default() }
    }

    /// The upstream connection's side: its certificates and its metadata exchange.
    pub fn upstream(session: Option<&'a UpstreamSession>) -> Observed<'a> {
        Observed {
            peer: session.and_then(|s| s.exchange.get().flatten()).map(|p| &p.metadata),
            peer_san: session.and_then(|s| s.peer_uri_san.as_deref()),
            local_san: session.and_then(|s| s.local_uri_san.as_deref()),
            ..Observed::default()
        }
    }
}

impl StatsFilter {
    /// The labels of a stream, in istio-proxy's order, up to `request_protocol` (excluded).
    pub fn peer_labels(&self, seen: &Observed<'_>) -> (Labels, Option<bool>) {
        let local = &self.local.metadata;
        let (host, name) = self.destination_service(seen);
        let peer = seen.peer;
        let peer_namespace = seen.peer_san.and_then(namespace_of).or_else(|| peer.map(|p| p.namespace.as_str()).filter(|n| !n.is_empty()));
        let or_unknown = |v: Option<&str>| v.filter(|v| !v.is_empty()).unwrap_or(UNKNOWN).to_string();
        let peer_label = |key: &str| or_unknown(peer.and_then(|p| p.labels.get(key)).map(String::as_str));
        let peer_revision = peer.and_then(|p| p.labels.get(CANONICAL_REVISION)).filter(|v| !v.is_empty()).map_or("latest", String::as_str).to_string();
        let local_label = |key: &str| local.labels.get(key).cloned().unwrap_or_default();
        let peer_side = [
            or_unknown(peer.map(|p| p.workload_name.as_str())),
            peer_label(CANONICAL_NAME),
            peer_revision,
            or_unknown(peer_namespace),
            or_unknown(seen.peer_san),
            peer_label("app"),
            peer_label("version"),
            or_unknown(peer.map(|p| p.cluster_id.as_str())),
        ];
        let local_side = [
            local.workload_name.clone(),
            local_label(CANONICAL_NAME),
            local_label(CANONICAL_REVISION),
            local.namespace.clone(),
            or_unknown(seen.local_san),
            local_label("app"),
            local_label("version"),
            local.cluster_id.clone(),
        ];
        let mut labels: Labels = Vec::with_capacity(25);
        labels.push(("reporter", self.reporter.label().to_string()));
        match self.reporter {
            Reporter::Destination => {
                labels.extend(SOURCE_KEYS.into_iter().zip(peer_side));
                // This side's canonical service stands in for a service the stream does not name.
                let canonical = local_side[1].clone();
                let service = (host.unwrap_or_else(|| canonical.clone()), name.unwrap_or(canonical));
                push_destination(&mut labels, local_side, service);
                let mutual = seen.peer_san.is_some_and(|s| !s.is_empty()) && seen.local_san.is_some_and(|s| !s.is_empty());
                (labels, Some(mutual))
            }
            Reporter::Source => {
                labels.extend(SOURCE_KEYS.into_iter().zip(local_side));
                let service = (host.unwrap_or_else(|| UNKNOWN.into()), name.unwrap_or_else(|| UNKNOWN.into()));
                push_destination(&mut labels, peer_side, service);
                (labels, None)
            }
        }
    }

    /// `destination_service` and `destination_service_name`: the routed cluster's first `istio.services`
    /// entry, a special cluster or route by name, else the `host` header (unless disabled).
    fn destination_service(&self, seen: &Observed<'_>) -> (Option<String>, Option<String>) {
        let mut host = seen.host.filter(|_| !self.config.disable_host_header_fallback).map(str::to_string);
        let mut name = host.clone();
        match (seen.route, seen.cluster) {
            (Some("block_all"), _) => name = Some("BlackHoleCluster".into()),
            (Some("allow_any"), _) => name = Some("PassthroughCluster".into()),
            (_, Some((cluster, _))) if SPECIAL_CLUSTERS.contains(&cluster) => name = Some(cluster.to_string()),
            (_, Some((_, Some(config)))) => {
                if let Some(service) = config.metadata.istio.services.first() {
                    host = Some(service.host.clone());
                    name = Some(if service.name.is_empty() { service.host.split('.').next().unwrap_or_default().to_string() } else { service.name.clone() });
                }
            }
            _ => {}
        }
        (host.filter(|h| !h.is_empty()), name.filter(|n| !n.is_empty()))
    }

    /// Records `amount` on counter `metric`, after the configuration's overrides.
    pub fn count(&self, metric: Metric, labels: &Labels, amount: u64) {
        if let Some(labels) = self.overridden(metric, labels) {
            self.metrics.count(metric, &labels, amount);
        }
    }

    /// Records `value` in histogram `metric`, after the configuration's overrides.
    pub fn observe(&self, metric: Metric, labels: &Labels, value: u64) {
        if let Some(labels) = self.overridden(metric, labels) {
            self.metrics.observe(metric, &labels, value);
        }
    }

    /// The labels after Telemetry's overrides for `metric`, `None` when it is dropped: istio-proxy's order
    /// (drop, then tag changes and removals, then new tags).
    fn overridden<'l>(&self, metric: Metric, labels: &'l Labels) -> Option<std::borrow::Cow<'l, Labels>> {
        let applies = |o: &&crate::config::istio_stats::MetricOverride| o.metric.as_deref().is_none_or(|m| m == metric.short_name());
        if !self.config.overrides.iter().any(|o| applies(&o)) {
            return Some(std::borrow::Cow::Borrowed(labels));
        }
        let overrides: Vec<_> = self.config.overrides.iter().filter(applies).collect();
        if overrides.iter().any(|o| o.drop && o.metric.is_some()) {
            return None;
        }
        let mut out = labels.clone();
        let mut added = Vec::new();
        for o in &overrides {
            out.retain(|(k, _)| !o.tags_to_remove.iter().any(|t| t == k));
            for (tag, value) in &o.dimensions {
                match (out.iter_mut().find(|(k, _)| k == tag), value) {
                    (Some(slot), Some(v)) => slot.1 = v.clone(),
                    (Some(_), None) => out.retain(|(k, _)| k != tag),
                    (None, Some(v)) if labels.iter().all(|(k, _)| k != tag) => added.push((leak_tag(tag), v.clone())),
                    (None, _) => {}
                }
            }
        }
        out.extend(added);
        Some(std::borrow::Cow::Owned(out))
    }
}

/// A new tag's name, kept for the process's life as metric names are (a configuration names a few).
fn leak_tag(tag: &str) -> &'static str {
    static TAGS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut tags = TAGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tags.iter().find(|t| **t == tag) {
        return t;
    }
    let leaked: &'static str = Box::leak(tag.to_string().into_boxed_str());
    tags.push(leaked);
    leaked
}

/// One side's values in the order `peer_labels` builds them, as the source's tags.
const SOURCE_KEYS: [&str; 8] =
    ["source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster"];

/// One side's values (as `peer_labels` builds them) as the destination's tags, in istio-proxy's order, with
/// the destination service and its name.
fn push_destination(labels: &mut Labels, side: [String; 8], (service, service_name): (String, String)) {
    let [workload, canonical, revision, namespace, principal, app, version, cluster] = side;
    labels.push(("destination_workload", workload));
    labels.push(("destination_workload_namespace", namespace.clone()));
    labels.push(("destination_principal", principal));
    labels.push(("destination_app", app));
    labels.push(("destination_version", version));
    labels.push(("destination_service", service));
    labels.push(("destination_canonical_service", canonical));
    labels.push(("destination_canonical_revision", revision));
    labels.push(("destination_service_name", service_name));
    labels.push(("destination_service_namespace", namespace));
    labels.push(("destination_cluster", cluster));
}

/// The namespace in a SPIFFE principal (`<domain>/ns/<namespace>/sa/<account>`).
fn namespace_of(principal: &str) -> Option<&str> {
    let start = principal.find("/ns/")? + 4;
    let rest = &principal[start..];
    Some(rest.split('/').next().unwrap_or(rest)).filter(|n| !n.is_empty())
}

/// The labels after the peer's: protocol, (HTTP) response code and gRPC status, flags and security policy.
pub fn stream_labels(mut labels: Labels, protocol: &'static str, response: Option<(u16, String)>, flags: &str, mutual_tls: Option<bool>) -> Labels {
    labels.push(("request_protocol", protocol.to_string()));
    if let Some((code, grpc_status)) = response {
        labels.push(("response_code", code.to_string()));
        labels.push(("grpc_response_status", grpc_status));
    }
    labels.push(("response_flags", if flags.is_empty() { "-".to_string() } else { flags.to_string() }));
    let policy = match mutual_tls {
        Some(true) => "mutual_tls",
        Some(false) => "none",
        None => UNKNOWN,
    };
    labels.push(("connection_security_policy", policy.to_string()));
    labels
}

/// Bytes one way, shared between whoever moves them and whoever reports them.
#[derive(Debug, Default)]
pub struct ByteCount(AtomicU64);

impl ByteCount {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// What the HTTP filters learnt of a request on its way (Istio's peer metadata headers, the route and the
/// cluster chosen), carried in the response's extensions to where the stream is reported.
#[derive(Debug, Clone, Default)]
pub struct StreamFacts {
    pub downstream_peer: Option<Peer>,
    pub upstream_peer: Option<Peer>,
    pub route: Option<String>,
    pub cluster: Option<String>,
}

/// One HTTP stream under the filter, from its request head to the end of its response.
pub struct HttpReport {
    filter: StatsFilter,
    started: Instant,
    grpc: bool,
    host: Option<String>,
    tls: Option<Arc<TlsInfo>>,
    /// The downstream connection's TCP metadata exchange.
    connection_peer: Arc<PeerSlot>,
    snapshot: Arc<Snapshot>,
    request_bytes: Arc<ByteCount>,
}

impl HttpReport {
    /// Starts the report of a request whose head is `parts` (its size counts as received bytes).
    pub fn start(filter: StatsFilter, parts: &hyper::http::request::Parts, tls: Option<Arc<TlsInfo>>, connection_peer: Arc<PeerSlot>, snapshot: Arc<Snapshot>) -> HttpReport {
        let head = parts.method.as_str().len() + parts.uri.to_string().len() + 12 + headers_size(&parts.headers);
        let request_bytes = Arc::new(ByteCount::default());
        request_bytes.add(head as u64);
        let host = crate::proxy::route::authority(parts).map(str::to_string);
        HttpReport { filter, started: Instant::now(), grpc: crate::proxy::route::is_grpc(&parts.headers), host, tls, connection_peer, snapshot, request_bytes }
    }

    /// Where the request body's bytes are counted.
    pub fn request_bytes(&self) -> Arc<ByteCount> {
        Arc::clone(&self.request_bytes)
    }

    /// What reports the stream when its response ends (the response head counts as sent bytes).
    pub fn finish(self, parts: &hyper::http::response::Parts) -> Box<dyn StreamEnd> {
        let ended = Ended {
            code: parts.status.as_u16(),
            grpc_status: parts.headers.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string),
            flag: parts.extensions.get::<ResponseFlag>().map(|f| f.0),
            facts: parts.extensions.get::<StreamFacts>().cloned().unwrap_or_default(),
            session: parts.extensions.get::<Arc<UpstreamSession>>().cloned(),
            head_and_trailers: (13 + parts.status.canonical_reason().map_or(0, str::len) + headers_size(&parts.headers)) as u64,
        };
        Box::new((self, ended))
    }

    fn record(self, ended: Ended, sent: u64, complete: bool) {
        let Ended { code, grpc_status, flag, facts, session, .. } = ended;
        let cluster = facts.cluster.as_deref().map(|name| (name, self.snapshot.cluster(name).map(|c| c.config)));
        let connection_peer = self.connection_peer.get().flatten().map(|p| &p.metadata);
        let mut seen = match self.filter.reporter {
            Reporter::Destination => Observed { peer: facts.downstream_peer.as_ref().map(|p| &p.metadata).or(connection_peer), ..Observed::downstream(self.tls.as_deref()) },
            Reporter::Source => {
                let upstream = Observed::upstream(session.as_deref());
                Observed { peer: facts.upstream_peer.as_ref().map(|p| &p.metadata).or(upstream.peer), ..upstream }
            }
        };
        seen.host = self.host.as_deref();
        seen.route = facts.route.as_deref();
        seen.cluster = cluster;
        let (labels, mutual_tls) = self.filter.peer_labels(&seen);
        // A stream whose response did not reach its end was reset downstream (`DC`), unless it already failed.
        let flag = flag.unwrap_or(if complete { "" } else { "DC" });
        let (protocol, grpc) = match self.grpc {
            true => ("grpc", grpc_status.unwrap_or_else(|| grpc_of_http(code))),
            false => ("http", String::new()),
        };
        let labels = stream_labels(labels, protocol, Some((code, grpc)), flag, mutual_tls);
        let f = &self.filter;
        f.count(Metric::RequestsTotal, &labels, 1);
        f.observe(Metric::RequestDurationMilliseconds, &labels, self.started.elapsed().as_millis() as u64);
        f.observe(Metric::RequestBytes, &labels, self.request_bytes.get());
        f.observe(Metric::ResponseBytes, &labels, sent);
    }
}

/// The gRPC status Envoy reports for an HTTP status when the response carries none.
fn grpc_of_http(code: u16) -> String {
    hyper::StatusCode::from_u16(code).map_or(2, local_reply::grpc_status).to_string()
}

/// What the response told when its head went out.
struct Ended {
    code: u16,
    grpc_status: Option<String>,
    flag: Option<&'static str>,
    facts: StreamFacts,
    session: Option<Arc<UpstreamSession>>,
    /// Bytes of the response head and trailers, counted with the body's as sent.
    head_and_trailers: u64,
}

impl StreamEnd for (HttpReport, Ended) {
    fn trailers(&mut self, trailers: &hyper::HeaderMap) {
        let ended = &mut self.1;
        ended.grpc_status = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string).or(ended.grpc_status.take());
        ended.head_and_trailers += headers_size(trailers) as u64;
    }

    fn ended(self: Box<Self>, body_bytes: u64, complete: bool) {
        let (report, ended) = *self;
        let sent = ended.head_and_trailers + body_bytes;
        report.record(ended, sent, complete);
    }
}

/// The size of a header block as HTTP/1.1 writes it (`name: value\r\n` each, and the blank line).
fn headers_size(headers: &hyper::HeaderMap) -> usize {
    headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>() + 2
}

/// A request body whose bytes are counted for `istio_request_bytes`.
pub struct CountedRequest {
    pub body: Body,
    pub bytes: Arc<ByteCount>,
}

impl hyper::body::Body for CountedRequest {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.add(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// One TCP connection under the filter: reported once its peer is known (or it ends), then every
/// `tcp_reporting_duration` and at its close, with the wire bytes moved since the last report.
pub struct TcpReport {
    filter: StatsFilter,
    tls: Option<Arc<TlsInfo>>,
    connection_peer: Arc<PeerSlot>,
    snapshot: Arc<Snapshot>,
    /// Wire bytes read from and written to downstream.
    wire: Arc<WireBytes>,
    upstream: Option<(String, Arc<UpstreamSession>)>,
    flag: &'static str,
    labels: Option<Labels>,
    reported: (u64, u64),
}

impl TcpReport {
    pub fn new(filter: StatsFilter, tls: Option<Arc<TlsInfo>>, connection_peer: Arc<PeerSlot>, snapshot: Arc<Snapshot>, wire: Arc<WireBytes>) -> TcpReport {
        TcpReport { filter, tls, connection_peer, snapshot, wire, upstream: None, flag: "", labels: None, reported: (0, 0) }
    }

    /// The upstream connection tcp_proxy made.
    pub fn connected(&mut self, cluster: &str, session: Arc<UpstreamSession>) {
        self.upstream = Some((cluster.to_string(), session));
    }

    /// tcp_proxy found no upstream: Envoy's flag for why (`NC`, `UH`, `UF`).
    pub fn failed(&mut self, flag: &'static str) {
        self.flag = flag;
    }

    pub fn interval(&self) -> std::time::Duration {
        self.filter.config.tcp_reporting_duration
    }

    /// Reports what is new: the connection as opened once its peer is known (or at its end), its bytes since
    /// the last report, and at its end its close.
    pub fn report(&mut self, end: bool) {
        let peer_slot = match (self.filter.reporter, &self.upstream) {
            (Reporter::Destination, _) => Some(&self.connection_peer),
            (Reporter::Source, Some((_, session))) => Some(&session.exchange),
            (Reporter::Source, None) => None,
        };
        let peer_read = peer_slot.is_some_and(|slot| slot.get().is_some());
        if self.labels.is_none() && (peer_read || end) {
            let labels = self.labels();
            self.filter.count(Metric::TcpConnectionsOpenedTotal, &labels, 1);
            self.labels = Some(labels);
        }
        let Some(labels) = &self.labels else { return };
        let (received, sent) = (self.wire.received(), self.wire.sent());
        self.filter.count(Metric::TcpSentBytesTotal, labels, sent - self.reported.1);
        self.filter.count(Metric::TcpReceivedBytesTotal, labels, received - self.reported.0);
        self.reported = (received, sent);
        if end {
            self.filter.count(Metric::TcpConnectionsClosedTotal, labels, 1);
        }
    }

    fn labels(&self) -> Labels {
        let upstream = self.upstream.as_ref();
        let session = upstream.map(|(_, s)| s);
        let seen = match self.filter.reporter {
            Reporter::Destination => Observed { peer: self.connection_peer.get().flatten().map(|p| &p.metadata), ..Observed::downstream(self.tls.as_deref()) },
            Reporter::Source => Observed::upstream(session.map(|s| &**s)),
        };
        let cluster = upstream.map(|(name, _)| (name.as_str(), self.snapshot.cluster(name).map(|c| c.config)));
        let (labels, mutual_tls) = self.filter.peer_labels(&Observed { cluster, ..seen });
        stream_labels(labels, "tcp", None, self.flag, mutual_tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::bootstrap::Node;
    use serde_json::json;

    fn filter(direction: TrafficDirection, config: serde_json::Value) -> StatsFilter {
        let node = Node {
            id: "sidecar~10.0.0.2~web-1.shop~shop.svc.cluster.local".into(),
            cluster: "web.shop".into(),
            metadata: json!({"NAME": "web-1", "NAMESPACE": "shop", "WORKLOAD_NAME": "web", "CLUSTER_ID": "Kubernetes",
                "LABELS": {"app": "web", "version": "v1", "service.istio.io/canonical-name": "web", "service.istio.io/canonical-revision": "v1"}}),
        };
        let config = crate::config::istio_stats::translate(crate::config::tree::Obj::new(&config, "f").unwrap()).unwrap();
        StatsFilter { config: Arc::new(config), reporter: Reporter::of(direction), metrics: Arc::default(), local: Arc::new(LocalWorkload::from_node(&node)) }
    }

    fn peer() -> WorkloadMetadata {
        let meta = json!({"NAME": "client-1", "NAMESPACE": "front", "WORKLOAD_NAME": "client", "CLUSTER_ID": "Kubernetes", "LABELS": {"app": "client"}});
        WorkloadMetadata::from_node_metadata(&meta, &[])
    }

    fn get<'a>(labels: &'a Labels, key: &str) -> &'a str {
        labels.iter().find(|(k, _)| *k == key).map_or("<absent>", |(_, v)| v.as_str())
    }

    #[test]
    fn a_server_reports_the_peer_as_source_and_itself_as_destination() {
        let f = filter(TrafficDirection::Inbound, json!({"disable_host_header_fallback": true}));
        let peer = peer();
        let seen = Observed {
            peer: Some(&peer),
            peer_san: Some("spiffe://cluster.local/ns/front/sa/client"),
            local_san: Some("spiffe://cluster.local/ns/shop/sa/web"),
            host: Some("web.shop:8080"),
            ..Observed::default()
        };
        let (labels, mtls) = f.peer_labels(&seen);
        let labels = stream_labels(labels, "http", Some((200, String::new())), "", mtls);
        let expect = [
            ("reporter", "destination"),
            ("source_workload", "client"),
            ("source_canonical_service", "unknown"),
            ("source_canonical_revision", "latest"),
            ("source_workload_namespace", "front"),
            ("source_principal", "spiffe://cluster.local/ns/front/sa/client"),
            ("source_app", "client"),
            ("source_version", "unknown"),
            ("source_cluster", "Kubernetes"),
            ("destination_workload", "web"),
            ("destination_workload_namespace", "shop"),
            ("destination_principal", "spiffe://cluster.local/ns/shop/sa/web"),
            ("destination_app", "web"),
            ("destination_version", "v1"),
            // The host header is not used (disabled) and the inbound cluster names no service.
            ("destination_service", "web"),
            ("destination_canonical_service", "web"),
            ("destination_canonical_revision", "v1"),
            ("destination_service_name", "web"),
            ("destination_service_namespace", "shop"),
            ("destination_cluster", "Kubernetes"),
            ("request_protocol", "http"),
            ("response_code", "200"),
            ("grpc_response_status", ""),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let got: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn a_client_reports_the_routed_service_and_an_unknown_peer_as_unknown() {
        let f = filter(TrafficDirection::Outbound, json!({}));
        let cluster = json!({"name": "outbound|80||api.shop.svc.cluster.local", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
            "metadata": {"filter_metadata": {"istio": {"services": [{"host": "api.shop.svc.cluster.local", "name": "api", "namespace": "shop"}]}}}});
        let cluster = crate::config::cluster::translate(crate::config::tree::Obj::new(&cluster, "c").unwrap()).unwrap();
        let seen = Observed { host: Some("api"), cluster: Some((&cluster.name, Some(&cluster))), ..Observed::default() };
        let (labels, mtls) = f.peer_labels(&seen);
        assert_eq!(mtls, None, "a client reports the security policy as unknown");
        assert_eq!(get(&labels, "reporter"), "source");
        assert_eq!(get(&labels, "source_workload"), "web");
        assert_eq!(get(&labels, "source_principal"), "unknown");
        assert_eq!(get(&labels, "destination_service"), "api.shop.svc.cluster.local");
        assert_eq!(get(&labels, "destination_service_name"), "api");
        assert_eq!(get(&labels, "destination_workload"), "unknown");
        assert_eq!(get(&labels, "destination_canonical_revision"), "latest");
        let blocked = Observed { host: Some("x.example"), route: Some("block_all"), ..Observed::default() };
        assert_eq!(get(&f.peer_labels(&blocked).0, "destination_service_name"), "BlackHoleCluster");
        assert_eq!(get(&f.peer_labels(&blocked).0, "destination_service"), "x.example", "the host header stands in");
    }

    #[test]
    fn telemetry_overrides_drop_remove_and_set_tags() {
        let f = filter(TrafficDirection::Inbound, json!({"metrics": [
            {"name": "request_bytes", "drop": true},
            {"tags_to_remove": ["source_cluster"], "dimensions": {"team": "'payments'", "destination_app": "'shop'", "source_app": "request.host"}}]}));
        let (labels, _) = f.peer_labels(&Observed::default());
        f.count(Metric::RequestsTotal, &labels, 1);
        f.observe(Metric::RequestBytes, &labels, 10);
        let text = crate::proxy::istio_metrics::render(&[(vec![], &f.metrics)]);
        assert!(!text.contains("istio_request_bytes"), "dropped: {text}");
        assert!(!text.contains("source_cluster=") && !text.contains("source_app="), "removed: {text}");
        assert!(text.contains("destination_app=\"shop\"") && text.contains("team=\"payments\""), "set and added: {text}");
    }

    #[test]
    fn the_namespace_comes_from_the_principal() {
        assert_eq!(namespace_of("spiffe://td/ns/shop/sa/web"), Some("shop"));
        assert_eq!(namespace_of("spiffe://td/sa/web"), None);
    }
}
