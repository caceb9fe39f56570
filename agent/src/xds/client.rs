//! The ADS stream: state of the world (`StreamAggregatedResources`) or delta (`DeltaAggregatedResources`),
//! reconnected with jittered exponential backoff. Every response is ACKed or NACKed on the same stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::InterceptedService;
use tonic::transport::Endpoint;
use xds_api::pb::envoy::config::core::v3::Node;
use xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use xds_api::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use xds_api::pb::google::rpc::Status;

use crate::identity::grpc::{AuthChannel, BearerToken};
use super::{codec, is_wildcard, Received, XdsState, CLUSTER_TYPE, LISTENER_TYPE, NAMED_TYPES, TYPES};
use crate::config::bootstrap::AdsApi;
use crate::config::cluster::Discovery;

/// Envoy's defaults for xDS reconnects.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// gRPC `INVALID_ARGUMENT`, the code Envoy puts in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// Runs the ADS client of the standalone proxy until the task is dropped: a connection of its own to the
/// bootstrap's ADS cluster.
pub async fn run(state: Arc<XdsState>) {
    let Some(ads) = state.bootstrap().ads.clone() else { return };
    let mut failures = 0u32;
    loop {
        let channel = match endpoint(&state, &ads.cluster) {
            Err(e) => Err(e),
            Ok(endpoint) => endpoint
                .connect()
                .await
                .map(|c| InterceptedService::new(c, BearerToken(None)))
                .map_err(|e| format!("connect: {e}")),
        };
        let result = match channel {
            Ok(channel) => stream(&state, ads.api, channel, &mut failures).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(cluster = %ads.cluster, "xDS stream ended: {e}");
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff(failures)).await;
    }
}

/// Runs the ADS stream of `state` on `channel` until the task is dropped.
pub async fn run_on(state: Arc<XdsState>, api: AdsApi, channel: AuthChannel) {
    let mut failures = 0u32;
    loop {
        if let Err(e) = stream(&state, api, channel.clone(), &mut failures).await {
            tracing::debug!(node = %state.bootstrap().node.id, "xDS stream ended: {e}");
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff(failures)).await;
    }
}

async fn stream(state: &Arc<XdsState>, api: AdsApi, channel: AuthChannel, failures: &mut u32) -> Result<(), String> {
    match api {
        AdsApi::Sotw => sotw(state, channel, failures).await,
        AdsApi::Delta => delta(state, channel, failures).await,
    }
}

/// Full jitter: a random wait up to base·2^failures, capped.
fn backoff(failures: u32) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << failures.min(10)).min(BACKOFF_MAX);
    let nanos = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), failures) as u128;
    Duration::from_nanos((nanos % ceiling.as_nanos().max(1)) as u64).max(BACKOFF_BASE / 5)
}

fn endpoint(state: &XdsState, cluster: &str) -> Result<Endpoint, String> {
    let c = state.bootstrap().clusters.iter().find(|c| c.name == cluster).ok_or(format!("no cluster {cluster}"))?;
    let Discovery::Static { endpoints, .. } = &c.discovery else { return Err(format!("cluster {cluster} is not STATIC")) };
    let hosts = endpoints.hosts();
    let addr = hosts.first().ok_or(format!("cluster {cluster} has no endpoint"))?;
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| e.connect_timeout(c.connect_timeout))
        .map_err(|e| e.to_string())
}

fn node(state: &XdsState) -> Option<Node> {
    let n = &state.bootstrap().node;
    let value = serde_json::json!({"id": n.id, "cluster": n.cluster, "metadata": n.metadata, "user_agent_name": "weft"});
    codec::json_to_message("envoy.config.core.v3.Node", &value)
        .map_err(|e| tracing::warn!("node metadata: {e}"))
        .ok()
}

fn status(errors: &[String]) -> Option<Status> {
    (!errors.is_empty()).then(|| Status { code: INVALID_ARGUMENT, message: errors.join("; "), details: Vec::new() })
}

async fn sotw(state: &Arc<XdsState>, channel: AuthChannel, failures: &mut u32) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(16);
    let mut named = NAMED_TYPES.map(Subscription::new);
    for (i, type_url) in TYPES.iter().filter(|t| is_wildcard(t)).enumerate() {
        let request = DiscoveryRequest {
            node: if i == 0 { node(state) } else { None },
            type_url: type_url.to_string(),
            // After a reconnect, tell the server what we already run.
            version_info: state.accepted_version(type_url),
            ..Default::default()
        };
        tx.send(request).await.map_err(|e| e.to_string())?;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut responses = client.stream_aggregated_resources(ReceiverStream::new(rx)).await.map_err(|e| e.to_string())?.into_inner();
    for request in named.iter_mut().filter_map(|s| s.sotw_update(state)) {
        tx.send(request).await.map_err(|e| e.to_string())?;
    }
    while let Some(response) = responses.message().await.map_err(|e| e.to_string())? {
        *failures = 0;
        let Some(type_url) = subscribed(&response.type_url) else { continue };
        let received: Vec<Received<'_>> = response
            .resources
            .iter()
            .map(|any| Received { name: None, version: &response.version_info, type_url: &any.type_url, bytes: &any.value })
            .collect();
        // State of the world: only LDS and CDS responses carry every resource; an EDS, RDS or SDS response may
        // carry just the changed ones (istiod's incremental EDS pushes), the others stay.
        let complete = matches!(type_url, LISTENER_TYPE | CLUSTER_TYPE);
        let errors = state.apply(type_url, &response.version_info, &received, &[], complete);
        log_outcome(type_url, &response.version_info, &errors);
        let subscription = named.iter_mut().find(|s| s.type_url == type_url);
        // A state-of-the-world ACK repeats the names it subscribes to.
        let resource_names = match subscription {
            Some(s) => {
                s.nonce = response.nonce.clone();
                s.names.clone()
            }
            None => Vec::new(),
        };
        let request = DiscoveryRequest {
            type_url: type_url.to_string(),
            response_nonce: response.nonce.clone(),
            version_info: state.accepted_version(type_url),
            resource_names,
            error_detail: status(&errors),
            ..Default::default()
        };
        tx.send(request).await.map_err(|e| e.to_string())?;
        for request in named.iter_mut().filter_map(|s| s.sotw_update(state)) {
            tx.send(request).await.map_err(|e| e.to_string())?;
        }
    }
    Err("the server closed the stream".into())
}

/// The names of one named type (EDS, RDS) subscribed on one stream, kept in step with what the clusters and
/// listeners refer to.
struct Subscription {
    type_url: &'static str,
    names: Vec<String>,
    nonce: String,
    sent: bool,
}

impl Subscription {
    fn new(type_url: &'static str) -> Subscription {
        Subscription { type_url, names: Vec::new(), nonce: String::new(), sent: false }
    }

    /// The changes since the last request, if any: (wanted, added, removed).
    fn diff(&mut self, state: &XdsState) -> Option<(Vec<String>, Vec<String>, Vec<String>)> {
        let wanted = state.names_for(self.type_url);
        if self.sent && wanted == self.names {
            return None;
        }
        if !self.sent && wanted.is_empty() {
            return None;
        }
        let added = wanted.iter().filter(|n| !self.names.contains(n)).cloned().collect();
        let removed = self.names.iter().filter(|n| !wanted.contains(n)).cloned().collect();
        self.names = wanted.clone();
        self.sent = true;
        Some((wanted, added, removed))
    }

    fn sotw_update(&mut self, state: &XdsState) -> Option<DiscoveryRequest> {
        let (wanted, _, _) = self.diff(state)?;
        Some(DiscoveryRequest {
            type_url: self.type_url.to_string(),
            resource_names: wanted,
            version_info: state.accepted_version(self.type_url),
            response_nonce: self.nonce.clone(),
            ..Default::default()
        })
    }

    fn delta_update(&mut self, state: &XdsState) -> Option<DeltaDiscoveryRequest> {
        let first = !self.sent;
        let (_, added, removed) = self.diff(state)?;
        Some(DeltaDiscoveryRequest {
            type_url: self.type_url.to_string(),
            resource_names_subscribe: added,
            resource_names_unsubscribe: removed,
            initial_resource_versions: if first { state.resource_versions(self.type_url) } else { Default::default() },
            ..Default::default()
        })
    }
}

async fn delta(state: &Arc<XdsState>, channel: AuthChannel, failures: &mut u32) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(16);
    let mut named = NAMED_TYPES.map(Subscription::new);
    for (i, type_url) in TYPES.iter().filter(|t| is_wildcard(t)).enumerate() {
        let request = DeltaDiscoveryRequest {
            node: if i == 0 { node(state) } else { None },
            type_url: type_url.to_string(),
            // Wildcard subscription; after a reconnect the server learns what we already have.
            initial_resource_versions: state.resource_versions(type_url),
            ..Default::default()
        };
        tx.send(request).await.map_err(|e| e.to_string())?;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut responses = client.delta_aggregated_resources(ReceiverStream::new(rx)).await.map_err(|e| e.to_string())?.into_inner();
    for request in named.iter_mut().filter_map(|s| s.delta_update(state)) {
        tx.send(request).await.map_err(|e| e.to_string())?;
    }
    while let Some(response) = responses.message().await.map_err(|e| e.to_string())? {
        *failures = 0;
        let Some(type_url) = subscribed(&response.type_url) else { continue };
        let received: Vec<Received<'_>> = response
            .resources
            .iter()
            .filter_map(|r| {
                let any = r.resource.as_ref()?;
                Some(Received { name: Some(&r.name), version: &r.version, type_url: &any.type_url, bytes: &any.value })
            })
            .collect();
        let errors = state.apply(type_url, &response.system_version_info, &received, &response.removed_resources, false);
        log_outcome(type_url, &response.system_version_info, &errors);
        let request = DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            response_nonce: response.nonce.clone(),
            error_detail: status(&errors),
            ..Default::default()
        };
        tx.send(request).await.map_err(|e| e.to_string())?;
        for request in named.iter_mut().filter_map(|s| s.delta_update(state)) {
            tx.send(request).await.map_err(|e| e.to_string())?;
        }
    }
    Err("the server closed the stream".into())
}

/// The subscribed type a response is for; responses of other types are ignored (with a warning).
fn subscribed(type_url: &str) -> Option<&'static str> {
    let found = TYPES.iter().copied().find(|t| *t == type_url);
    if found.is_none() {
        tracing::warn!(type_url, "ignoring a response of a type weft did not ask for");
    }
    found
}

fn log_outcome(type_url: &str, version: &str, errors: &[String]) {
    if errors.is_empty() {
        tracing::info!(type_url, version, "xDS update accepted");
    } else {
        tracing::warn!(type_url, version, "xDS update rejected (NACK): {}", errors.join("; "));
    }
}
