//! Istio's HTTP peer metadata filter (istio-proxy's `istio.metadata_exchange`, `io.istio.http.peer_metadata`):
//! each side of a request learns the other's workload from the `x-envoy-peer-metadata` (base64 of its
//! workload metadata Struct) and `x-envoy-peer-metadata-id` (its node id) headers. On the request, the
//! downstream peer's headers are read and removed (with `istio_headers` discovery), then this side's are set
//! for the upstream (`upstream_propagation`) unless the routed cluster is external and the method skips
//! external clusters, or the cluster disables the exchange. On the response, the upstream peer's headers are
//! read and removed, and this side's are set for the downstream (`downstream_propagation`) only where the
//! request carried them. Applications behind the proxy never see the headers.

use std::sync::Arc;

use hyper::header::{HeaderMap, HeaderValue};
use prost::Message;
use prost_types::Struct;

use crate::config::cluster::Cluster;
use crate::config::http_filters::{IstioHeaders, PeerMetadata};
use crate::config::workload_metadata::{LocalWorkload, Peer, WorkloadMetadata};

pub const METADATA_HEADER: &str = "x-envoy-peer-metadata";
pub const ID_HEADER: &str = "x-envoy-peer-metadata-id";

/// istio-proxy counts `PassthroughCluster` as external whatever its metadata says.
const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// What of the routed cluster decides whether this side's headers go out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routed {
    external: bool,
    disable_mx: bool,
}

impl Routed {
    /// The cluster the request is routed to (`None`: no cluster, or one that does not exist).
    pub fn to(name: &str, cluster: Option<&Cluster>) -> Routed {
        let (external, disable_mx) = cluster.map_or((false, false), |c| (c.metadata.istio.external, c.metadata.istio.disable_mx));
        Routed { external: name == PASSTHROUGH_CLUSTER || external, disable_mx }
    }

    fn skips(self, method: IstioHeaders) -> bool {
        self.disable_mx || (method.skip_external_clusters && self.external)
    }
}

/// One request through the filter: what it learnt on the way in, for the way out.
pub struct Exchange {
    config: Arc<PeerMetadata>,
    local: Arc<LocalWorkload>,
    routed: Routed,
    /// The request carried `x-envoy-peer-metadata-id` / `x-envoy-peer-metadata`.
    had_id: bool,
    had_metadata: bool,
    /// The peers found (for telemetry).
    pub downstream_peer: Option<Peer>,
    pub upstream_peer: Option<Peer>,
}

/// The request path: discovers the downstream peer, removes its headers, adds this side's for the upstream.
pub fn decode(config: &Arc<PeerMetadata>, local: &Arc<LocalWorkload>, routed: Routed, headers: &mut HeaderMap) -> Exchange {
    let mut exchange = Exchange { config: Arc::clone(config), local: Arc::clone(local), routed, had_id: false, had_metadata: false, downstream_peer: None, upstream_peer: None };
    if config.discovers_by_headers(true) {
        exchange.had_id = headers.contains_key(ID_HEADER);
        exchange.had_metadata = headers.contains_key(METADATA_HEADER);
        exchange.downstream_peer = take_peer(headers, &config.additional_labels);
    }
    for method in &config.upstream_propagation {
        if !routed.skips(*method) {
            set(headers, ID_HEADER, &local.node_id);
            set(headers, METADATA_HEADER, &local.header);
        }
    }
    exchange
}

/// The response path: discovers the upstream peer, removes its headers, answers a downstream that sent its own.
pub fn encode(exchange: &mut Exchange, headers: &mut HeaderMap) {
    if exchange.config.discovers_by_headers(false) {
        exchange.upstream_peer = take_peer(headers, &exchange.config.additional_labels);
    }
    for method in &exchange.config.downstream_propagation {
        if exchange.routed.skips(*method) {
            continue;
        }
        if exchange.had_id {
            set(headers, ID_HEADER, &exchange.local.node_id);
        }
        if exchange.had_metadata {
            set(headers, METADATA_HEADER, &exchange.local.header);
        }
    }
}

/// The peer the headers describe (`None` without `x-envoy-peer-metadata`, or when it is not a Struct in
/// base64); the headers are removed either way.
fn take_peer(headers: &mut HeaderMap, additional_labels: &[String]) -> Option<Peer> {
    let id = headers.remove(ID_HEADER);
    let metadata = headers.remove(METADATA_HEADER)?;
    let bytes = crate::config::secret::base64(metadata.to_str().ok()?.trim())?;
    let data = Struct::decode(bytes.as_slice()).ok()?;
    let id = id.and_then(|v| v.to_str().ok().map(str::to_string)).unwrap_or_default();
    Some(Peer { id, metadata: WorkloadMetadata::from_struct(&data, additional_labels) })
}

/// Sets `name`; a node id that is no header value (control characters) is left out.
fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::bootstrap::Node;
    use crate::config::http_filters::Discovery;
    use serde_json::json;

    fn local(pod: &str) -> Arc<LocalWorkload> {
        let node = Node {
            id: format!("sidecar~10.0.0.1~{pod}.shop~shop.svc.cluster.local"),
            cluster: String::new(),
            metadata: json!({"NAME": pod, "NAMESPACE": "shop", "WORKLOAD_NAME": "web", "LABELS": {"app": "web"}}),
        };
        Arc::new(LocalWorkload::from_node(&node))
    }

    fn inbound() -> Arc<PeerMetadata> {
        Arc::new(PeerMetadata {
            downstream_discovery: vec![Discovery::IstioHeaders, Discovery::WorkloadDiscovery],
            downstream_propagation: vec![IstioHeaders { skip_external_clusters: false }],
            ..Default::default()
        })
    }

    fn outbound(skip_external_clusters: bool) -> Arc<PeerMetadata> {
        Arc::new(PeerMetadata {
            upstream_discovery: vec![Discovery::IstioHeaders, Discovery::WorkloadDiscovery],
            upstream_propagation: vec![IstioHeaders { skip_external_clusters }],
            ..Default::default()
        })
    }

    fn peer_headers(from: &LocalWorkload) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ID_HEADER, HeaderValue::from_str(&from.node_id).unwrap());
        h.insert(METADATA_HEADER, HeaderValue::from_str(&from.header).unwrap());
        h
    }

    #[test]
    fn outbound_requests_carry_ours_and_responses_lose_theirs() {
        let (client, server) = (local("client-1"), local("server-1"));
        let mut request = HeaderMap::new();
        let mut x = decode(&outbound(false), &client, Routed::to("outbound|80||server", None), &mut request);
        assert_eq!(request[ID_HEADER], client.node_id.as_str());
        assert_eq!(request[METADATA_HEADER], client.header.as_str());
        let mut response = peer_headers(&server);
        encode(&mut x, &mut response);
        assert!(response.is_empty(), "the upstream peer's headers are removed: {response:?}");
        let peer = x.upstream_peer.expect("the upstream peer was read");
        assert_eq!((peer.id.as_str(), peer.metadata.name.as_str()), (server.node_id.as_str(), "server-1"));
    }

    #[test]
    fn inbound_requests_lose_theirs_and_only_what_came_is_answered() {
        let (client, server) = (local("client-1"), local("server-1"));
        let mut request = peer_headers(&client);
        let mut x = decode(&inbound(), &server, Routed::to("inbound|8080||", None), &mut request);
        assert!(request.is_empty(), "the app never sees them: {request:?}");
        assert_eq!(x.downstream_peer.as_ref().map(|p| p.metadata.name.as_str()), Some("client-1"));
        let mut response = HeaderMap::new();
        encode(&mut x, &mut response);
        assert_eq!(response[ID_HEADER], server.node_id.as_str());
        assert_eq!(response[METADATA_HEADER], server.header.as_str());
        // Only the id came: only the id goes back; nothing came: nothing goes back.
        let mut request = HeaderMap::new();
        request.insert(ID_HEADER, HeaderValue::from_static("someone"));
        let mut x = decode(&inbound(), &server, Routed::default(), &mut request);
        assert!(x.downstream_peer.is_none() && request.is_empty());
        let mut response = HeaderMap::new();
        encode(&mut x, &mut response);
        assert!(response.contains_key(ID_HEADER) && !response.contains_key(METADATA_HEADER));
        let mut x = decode(&inbound(), &server, Routed::default(), &mut HeaderMap::new());
        let mut response = HeaderMap::new();
        encode(&mut x, &mut response);
        assert!(response.is_empty());
    }

    #[test]
    fn external_and_mx_disabled_clusters_get_no_headers() {
        let client = local("client-1");
        let sent = |config: Arc<PeerMetadata>, routed: Routed| {
            let mut request = HeaderMap::new();
            decode(&config, &client, routed, &mut request);
            request.contains_key(METADATA_HEADER)
        };
        let cluster = |name: &str, istio: serde_json::Value| {
            let v = json!({"name": name, "metadata": {"filterMetadata": {"istio": istio, "other.filter": {"k": "v"}}}});
            crate::config::cluster::translate(crate::config::tree::Obj::new(&v, "c").unwrap()).unwrap()
        };
        let external = cluster("ext", json!({"external": true, "services": [{"host": "example.com"}]}));
        let disabled = cluster("mesh", json!({"disable_mx": true}));
        assert!(external.metadata.istio.external && !external.metadata.istio.disable_mx);
        assert!(!sent(outbound(true), Routed::to(PASSTHROUGH_CLUSTER, None)));
        assert!(sent(outbound(false), Routed::to(PASSTHROUGH_CLUSTER, None)), "only skipped when asked");
        assert!(!sent(outbound(true), Routed::to("ext", Some(&external))));
        assert!(sent(outbound(false), Routed::to("ext", Some(&external))));
        assert!(!sent(outbound(false), Routed::to("mesh", Some(&disabled))), "disable_mx always skips");
    }

    #[test]
    fn garbled_peer_headers_are_removed_and_find_no_peer() {
        let server = local("server-1");
        let mut request = HeaderMap::new();
        request.insert(METADATA_HEADER, HeaderValue::from_static("not base64!"));
        request.insert(ID_HEADER, HeaderValue::from_static("x"));
        let x = decode(&inbound(), &server, Routed::default(), &mut request);
        assert!(x.downstream_peer.is_none() && request.is_empty());
        // Without istio_headers discovery the headers are not this filter's business.
        let mut request = peer_headers(&server);
        let x = decode(&outbound(false), &server, Routed::default(), &mut request);
        assert!(x.downstream_peer.is_none());
        assert_eq!(request[ID_HEADER], server.node_id.as_str(), "replaced by ours, as propagation sets it");
    }
}
