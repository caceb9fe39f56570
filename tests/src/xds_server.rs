//! A test xDS management server (tonic): serves Listener and Cluster resources given as YAML, over ADS in
//! both state-of-the-world and delta variants; pushes updates, records every request (ACKs and NACKs with
//! their error detail, delta's initial_resource_versions), and can drop every stream or stop entirely.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use xds_api::pb::google::protobuf::Any;

use crate::util::{wait_for, HarnessError};
use crate::NetNs;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Clusters, endpoints, listeners, routes: the order a management server sends them in.
const ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];
/// Types clients subscribe to by name.
const NAMED: [&str; 3] = [ENDPOINT, ROUTE, SECRET];

/// A bootstrap whose listeners and clusters come over ADS (`api`: `GRPC` or `DELTA_GRPC`) from a server at
/// 127.0.0.1:18000, with an admin endpoint on 127.0.0.1:19901.
pub fn ads_bootstrap(api: &str) -> String {
    format!(
        r#"
node: {{id: weft-xds-test, cluster: tests, metadata: {{NAMESPACE: default}}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 19901}}}}}}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 18000}}}}}}}}]}}]
"#
    )
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub delta: bool,
    pub type_url: String,
    pub version_info: String,
    pub response_nonce: String,
    pub error: Option<String>,
    pub initial_resource_versions: HashMap<String, String>,
    pub node_id: Option<String>,
    /// The node's metadata (the first request of a stream carries it), as JSON.
    pub node_metadata: Option<serde_json::Value>,
    /// SotW `resource_names`, or delta `resource_names_subscribe`.
    pub names: Vec<String>,
}

impl Recorded {
    pub fn is_ack(&self) -> bool {
        !self.response_nonce.is_empty() && self.error.is_none()
    }
}

/// name → (per-resource version, resource).
type Named = BTreeMap<String, (String, Any)>;

/// type → (version of the type, its resources)
type ByType = BTreeMap<String, (String, Named)>;

#[derive(Default)]
struct Resources {
    /// What every node gets.
    by_type: ByType,
    /// Node id → types served to that node instead (istiod serves each sidecar its own listeners).
    per_node: HashMap<String, ByType>,
}

impl Resources {
    fn for_node(&self, node: Option<&str>, type_url: &str) -> Option<&(String, Named)> {
        node.and_then(|n| self.per_node.get(n)).and_then(|t| t.get(type_url)).or_else(|| self.by_type.get(type_url))
    }
}

struct Shared {
    resources: Mutex<Resources>,
    requests: Mutex<Vec<Recorded>>,
    /// Bumped on every change; streams push when it moves.
    changed: watch::Sender<u64>,
    /// Bumped to drop every stream.
    drop_streams: watch::Sender<u64>,
}

pub struct XdsServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A resource given as YAML (a Listener or a Cluster as Envoy's JSON mapping spells it) as an `Any`.
pub fn any(type_url: &str, yaml: &str) -> Result<(String, Any), HarnessError> {
    let value: serde_json::Value = serde_yaml::from_str(yaml).map_err(|e| HarnessError(format!("resource YAML: {e}")))?;
    let name_field = if type_url == ENDPOINT { "cluster_name" } else { "name" };
    let name = value[name_field].as_str().unwrap_or_default().to_string();
    let message_name = type_url.rsplit('/').next().unwrap_or(type_url);
    let value = weft_agent::xds::codec::json_to_bytes(message_name, &value).map_err(|e| HarnessError(format!("{name}: {e}")))?;
    Ok((name, Any { type_url: type_url.to_string(), value }))
}

impl XdsServer {
    /// Serves on `addr` inside `ns` (a fixed address, so a restarted server is found at the same place).
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Result<XdsServer, HarnessError> {
        let listener = ns.tcp_listen(addr)?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            resources: Mutex::default(),
            requests: Mutex::default(),
            changed: watch::channel(0).0,
            drop_streams: watch::channel(0).0,
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let service = Service(Arc::clone(&shared));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let thread = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() else { return };
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                let incoming = TcpListenerStream::new(listener).map(move |c| {
                    if c.is_ok() {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    c
                });
                let _ = tonic::transport::Server::builder()
                    .add_service(AggregatedDiscoveryServiceServer::new(service))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        Ok(XdsServer { addr, shared, connections, shutdown: Some(tx), thread: Some(thread) })
    }

    /// Replaces every resource of `type_url` with `resources` at `version`, and pushes.
    pub fn set(&self, type_url: &str, version: &str, resources: &[&str]) -> Result<(), HarnessError> {
        let encoded = Self::encode(type_url, resources)?;
        self.publish(type_url, version, encoded);
        Ok(())
    }

    /// Encodes resources given as YAML (done before [`XdsServer::publish`] when the push is being timed).
    pub fn encode(type_url: &str, resources: &[&str]) -> Result<BTreeMap<String, Any>, HarnessError> {
        resources.iter().map(|yaml| any(type_url, yaml)).collect()
    }

    /// Replaces every resource of `type_url` with already encoded ones at `version`, and pushes.
    pub fn publish(&self, type_url: &str, version: &str, named: BTreeMap<String, Any>) {
        self.publish_to(None, type_url, version, named);
    }

    /// [`XdsServer::set`] for one node only: that node gets these resources of `type_url` instead of the
    /// ones every node gets.
    pub fn set_for_node(&self, node_id: &str, type_url: &str, version: &str, resources: &[&str]) -> Result<(), HarnessError> {
        let encoded = Self::encode(type_url, resources)?;
        self.publish_to(Some(node_id), type_url, version, encoded);
        Ok(())
    }

    /// [`XdsServer::publish`] for one node only.
    pub fn publish_for_node(&self, node_id: &str, type_url: &str, version: &str, named: BTreeMap<String, Any>) {
        self.publish_to(Some(node_id), type_url, version, named);
    }

    fn publish_to(&self, node: Option<&str>, type_url: &str, version: &str, named: BTreeMap<String, Any>) {
        {
            let mut resources = self.shared.resources.lock().unwrap_or_else(|e| e.into_inner());
            let all = match node {
                Some(n) => resources.per_node.entry(n.to_string()).or_default(),
                None => &mut resources.by_type,
            };
            let previous = all.get(type_url).map(|(_, r)| r.clone()).unwrap_or_default();
            // A resource keeps its version while its bytes do not change (what delta clients see).
            let entries = named
                .into_iter()
                .map(|(name, any)| {
                    let unchanged = previous.get(&name).filter(|(_, old)| old.value == any.value).map(|(v, _)| v.clone());
                    (name, (unchanged.unwrap_or_else(|| version.to_string()), any))
                })
                .collect();
            all.insert(type_url.to_string(), (version.to_string(), entries));
        }
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// TCP connections accepted so far (xDS streams of one client share one).
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits for a request matching `pred` (e.g. the ACK of a version) and returns it.
    pub fn wait_request(&self, what: &str, pred: impl Fn(&Recorded) -> bool) -> Result<Recorded, HarnessError> {
        self.wait_request_since(0, what, pred)
    }

    /// [`XdsServer::wait_request`] among the requests after the first `since` ones.
    pub fn wait_request_since(&self, since: usize, what: &str, pred: impl Fn(&Recorded) -> bool) -> Result<Recorded, HarnessError> {
        wait_for(what, Duration::from_secs(20), || {
            let requests = self.requests();
            let recent = requests.get(since..).unwrap_or_default();
            recent.iter().rev().find(|r| pred(r)).cloned().ok_or_else(|| format!("{} requests so far: {:?}", requests.len(), requests.last()))
        })
    }

    /// Drops every open stream (the client must reconnect).
    pub fn drop_streams(&self) {
        self.shared.drop_streams.send_modify(|n| *n += 1);
    }

    /// Stops serving and releases the address.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        self.drop_streams();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for XdsServer {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

struct Service(Arc<Shared>);

type Outbound<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn record(shared: &Shared, r: Recorded) {
    if let Ok(mut requests) = shared.requests.lock() {
        requests.push(r);
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = Outbound<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Outbound<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let shared = Arc::clone(&self.0);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let (mut changed, mut dropped) = (shared.changed.subscribe(), shared.drop_streams.subscribe());
            // type → names asked for (empty: all of them, for wildcard types).
            let mut subscribed: HashMap<String, Vec<String>> = HashMap::new();
            let mut sent: HashMap<String, String> = HashMap::new();
            let mut nonce = 0u64;
            // The node identifies itself in its first request.
            let mut node: Option<String> = None;
            loop {
                tokio::select! {
                    message = inbound.next() => {
                        let Some(Ok(req)) = message else { return };
                        node = node.or_else(|| req.node.as_ref().map(|n| n.id.clone()));
                        record(&shared, Recorded {
                            delta: false,
                            type_url: req.type_url.clone(),
                            version_info: req.version_info.clone(),
                            response_nonce: req.response_nonce.clone(),
                            error: req.error_detail.as_ref().map(|s| s.message.clone()),
                            initial_resource_versions: HashMap::new(),
                            node_id: req.node.as_ref().map(|n| n.id.clone()),
                            node_metadata: req.node.as_ref().and_then(|n| n.metadata.as_ref()).map(struct_json),
                            names: req.resource_names.clone(),
                        });
                        if subscribed.get(&req.type_url) != Some(&req.resource_names) {
                            // A changed subscription gets a fresh response.
                            sent.remove(&req.type_url);
                        }
                        subscribed.insert(req.type_url.clone(), req.resource_names.clone());
                    }
                    _ = changed.changed() => {}
                    _ = dropped.changed() => return,
                }
                for type_url in ORDER.iter().filter(|t| subscribed.contains_key(**t)) {
                    let names = &subscribed[*type_url];
                    let wanted = |name: &String| !NAMED.contains(type_url) || names.contains(name);
                    let response = {
                        let all = shared.resources.lock().unwrap_or_else(|e| e.into_inner());
                        let Some((version, resources)) = all.for_node(node.as_deref(), type_url) else { continue };
                        if sent.get(*type_url) == Some(version) {
                            continue;
                        }
                        sent.insert(type_url.to_string(), version.clone());
                        nonce += 1;
                        DiscoveryResponse {
                            version_info: version.clone(),
                            type_url: type_url.to_string(),
                            nonce: nonce.to_string(),
                            resources: resources.iter().filter(|(n, _)| wanted(n)).map(|(_, (_, any))| any.clone()).collect(),
                            ..Default::default()
                        }
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let shared = Arc::clone(&self.0);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let (mut changed, mut dropped) = (shared.changed.subscribe(), shared.drop_streams.subscribe());
            // What the client has, per type: name → version.
            let mut client: HashMap<String, HashMap<String, String>> = HashMap::new();
            // Named subscriptions (EDS); wildcard types are absent.
            let mut named: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
            let mut nonce = 0u64;
            let mut node: Option<String> = None;
            loop {
                tokio::select! {
                    message = inbound.next() => {
                        let Some(Ok(req)) = message else { return };
                        node = node.or_else(|| req.node.as_ref().map(|n| n.id.clone()));
                        record(&shared, Recorded {
                            delta: true,
                            type_url: req.type_url.clone(),
                            version_info: String::new(),
                            response_nonce: req.response_nonce.clone(),
                            error: req.error_detail.as_ref().map(|s| s.message.clone()),
                            initial_resource_versions: req.initial_resource_versions.clone(),
                            node_id: req.node.as_ref().map(|n| n.id.clone()),
                            node_metadata: req.node.as_ref().and_then(|n| n.metadata.as_ref()).map(struct_json),
                            names: req.resource_names_subscribe.clone(),
                        });
                        let known = client.entry(req.type_url.clone()).or_insert_with(|| req.initial_resource_versions.clone());
                        if NAMED.contains(&req.type_url.as_str()) {
                            let set = named.entry(req.type_url.clone()).or_default();
                            set.extend(req.resource_names_subscribe.iter().cloned());
                            for n in &req.resource_names_unsubscribe {
                                set.remove(n);
                                known.remove(n);
                            }
                        }
                    }
                    _ = changed.changed() => {}
                    _ = dropped.changed() => return,
                }
                for type_url in ORDER {
                    let Some(known) = client.get_mut(type_url) else { continue };
                    let response = {
                        let all = shared.resources.lock().unwrap_or_else(|e| e.into_inner());
                        let Some((version, resources)) = all.for_node(node.as_deref(), type_url) else { continue };
                        let subscribed = |name: &String| named.get(type_url).is_none_or(|set| set.contains(name));
                        let updated: Vec<Resource> = resources
                            .iter()
                            .filter(|(name, (v, _))| subscribed(name) && known.get(*name) != Some(v))
                            .map(|(name, (v, any))| Resource { name: name.clone(), version: v.clone(), resource: Some(any.clone()), ..Default::default() })
                            .collect();
                        let removed: Vec<String> =
                            known.keys().filter(|n| !resources.contains_key(*n) && subscribed(n)).cloned().collect();
                        if updated.is_empty() && removed.is_empty() {
                            continue;
                        }
                        for r in &updated {
                            known.insert(r.name.clone(), r.version.clone());
                        }
                        for n in &removed {
                            known.remove(n);
                        }
                        nonce += 1;
                        DeltaDiscoveryResponse {
                            system_version_info: version.clone(),
                            type_url: type_url.to_string(),
                            nonce: nonce.to_string(),
                            resources: updated,
                            removed_resources: removed,
                            ..Default::default()
                        }
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A protobuf Struct as JSON.
fn struct_json(s: &xds_api::pb::google::protobuf::Struct) -> serde_json::Value {
    serde_json::Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), value_json(v))).collect())
}

fn value_json(v: &xds_api::pb::google::protobuf::Value) -> serde_json::Value {
    use xds_api::pb::google::protobuf::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => serde_json::json!(n),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(value_json).collect()),
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
    }
}
