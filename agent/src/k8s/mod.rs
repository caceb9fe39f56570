//! The Kubernetes side: a watch on the pods scheduled to this node and on the namespaces (kube-runtime
//! reflectors), the capture decision for each pod ([`policy`]), what istiod needs of a pod ([`PodMeta`]), and the
//! status annotation that tells users how each pod is captured. The caches keep the last good view while the
//! API server is unreachable; the watchers reconnect with backoff. Control path only: nothing here is on the
//! data path; it reads what a pod asks for (its capture plan, limits, weight) and the node acts on it.

pub mod policy;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::capture::PodCapture;
use crate::config::agent::{KubeSettings, PodLimits};
use policy::{PodFacts, Policy, Verdict};

/// The pod annotation where the agent says whether and how it captures the pod.
pub const STATUS_ANNOTATION: &str = "weft.dev/status";
/// Istio's label for a pod whose proxy speaks Istio's mTLS (istiod's endpoint metadata `tlsMode`).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// What istiod needs to know of a pod beyond its name and addresses, read from the API and kept in the pod
/// registry so a restarted agent presents the same identity before the API answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodMeta {
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// The workload the pod belongs to, as Istio names it (a Deployment for a ReplicaSet's pod).
    pub workload: Workload,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub kind: String,
    pub name: String,
    pub api_version: String,
}

/// What the watch holds: the node's pods and all namespaces, once both were listed.
#[derive(Debug, Clone, Serialize)]
pub struct KubeStatus {
    pub node: String,
    pub synced: bool,
    pub pods: usize,
    pub namespaces: usize,
}

/// The cached view of the node's pods and all namespaces.
pub struct KubeView {
    client: Client,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    policy: Policy,
    settings: KubeSettings,
    /// Bumped on every change either watch sees.
    changes: watch::Receiver<u64>,
    events: Recorder,
    /// (pod uid, message) of the warnings already given, so a reconcile pass repeats none.
    warned: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

impl KubeView {
    /// Connects (lazily) and starts both watches on the current runtime.
    pub async fn start(settings: KubeSettings) -> Result<Arc<KubeView>, String> {
        let client = client(&settings).await?;
        let (changes_tx, changes) = watch::channel(0u64);
        let changes_tx = Arc::new(changes_tx);
        let pods_config = watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
        let pods = reflect(Api::<Pod>::all(client.clone()), pods_config, "pods", Arc::clone(&changes_tx));
        let namespaces = reflect(Api::<Namespace>::all(client.clone()), watcher::Config::default(), "namespaces", changes_tx);
        let policy = Policy { agent_namespace: settings.agent_namespace.clone(), revision: settings.revision.clone() };
        let reporter = Reporter { controller: "weft-agent".into(), instance: Some(settings.node_name.clone()) };
        let events = Recorder::new(client.clone(), reporter);
        Ok(Arc::new(KubeView { client, pods, namespaces, policy, settings, changes, events, warned: Default::default() }))
    }

    /// A receiver that changes whenever a pod of the node or a namespace changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Both caches have been filled once.
    pub fn synced(&self) -> bool {
        ready(&self.pods) && ready(&self.namespaces)
    }

    /// The pod `namespace/name`, waiting up to the configured time for the API to show it (kubelet calls CNI ADD
    /// right after the pod is bound; the watch may be a moment behind). A pod whose uid differs is an older pod
    /// of the same name and is waited out too.
    pub async fn wait_pod(&self, namespace: &str, name: &str, uid: &str) -> Result<Arc<Pod>, String> {
        let key = ObjectRef::<Pod>::new(name).within(namespace);
        let mut changes = self.changes();
        let found = tokio::time::timeout(self.settings.pod_wait, async {
            loop {
                if let Some(pod) = self.pods.get(&key).filter(|p| uid.is_empty() || p.metadata.uid.as_deref() == Some(uid)) {
                    return Some(pod);
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        if let Some(pod) = found.ok().flatten() {
            return Ok(pod);
        }
        // The watch may be behind (re-listing after the API server came back): ask once directly.
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        // Bounded: with `pod_wait` it must end before weft-cni's deadline, so the plugin reports this error.
        let asked = tokio::time::timeout(std::time::Duration::from_secs(1), api.get_opt(name)).await;
        let direct = asked.ok().and_then(Result::ok).flatten().filter(|p| uid.is_empty() || p.metadata.uid.as_deref() == Some(uid));
        direct.map(Arc::new).ok_or_else(|| {
            format!(
                "pod {namespace}/{name} (uid {uid}) is not in the API server's view of node {} after {:?}: the agent cannot decide its capture (is the API server reachable? see the agent log)",
                self.settings.node_name, self.settings.pod_wait
            )
        })
    }

    /// The cached pod `namespace/name`, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    /// The watch, for the status endpoint.
    pub fn status(&self) -> KubeStatus {
        KubeStatus { node: self.settings.node_name.clone(), synced: self.synced(), pods: self.pods.len(), namespaces: self.namespaces.len() }
    }

    /// Every cached pod of the node.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        self.pods.state()
    }

    /// Whether `pod` is captured, and why.
    pub fn verdict(&self, pod: &Pod) -> Verdict {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let ns = self.namespaces.get(&ObjectRef::new(namespace));
        let spec = pod.spec.as_ref();
        let has_istio_proxy = spec.is_some_and(|s| {
            s.containers.iter().chain(s.init_containers.iter().flatten()).any(|c| c.name == "istio-proxy")
        });
        let facts = PodFacts {
            namespace,
            labels: pod.metadata.labels.as_ref(),
            annotations: pod.metadata.annotations.as_ref(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            has_istio_proxy,
        };
        let verdict = self.policy.decide(&facts, ns.as_ref().and_then(|n| n.metadata.labels.as_ref()));
        for warning in &verdict.warnings {
            self.warn(pod, "CaptureLabelIgnored", warning.clone());
        }
        verdict
    }

    /// Something in a pod's metadata the agent cannot honour: logged and published as a Warning event on the pod
    /// (`kubectl describe pod`), once per pod and message.
    pub fn warn(&self, pod: &Pod, reason: &'static str, note: String) {
        {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.len() > 10_000 {
                warned.clear();
            }
            if !warned.insert((pod.metadata.uid.clone().unwrap_or_default(), note.clone())) {
                return;
            }
        }
        tracing::warn!(pod = %label(pod), "{note}");
        let event = Event { type_: EventType::Warning, reason: reason.into(), note: Some(note), action: "Capture".into(), secondary: None };
        let (events, reference) = (self.events.clone(), pod.object_ref(&()));
        tokio::spawn(async move {
            if let Err(e) = events.publish(&event, &reference).await {
                tracing::debug!("cannot publish an event: {e}");
            }
        });
    }

    /// Writes the status annotation when it differs from what the pod carries.
    pub async fn annotate(&self, namespace: &str, name: &str, status: &str) {
        let current = self.pod(namespace, name);
        let annotations = current.as_ref().and_then(|p| p.metadata.annotations.as_ref());
        let carried = annotations.and_then(|a| a.get(STATUS_ANNOTATION));
        let labels = current.as_ref().and_then(|p| p.metadata.labels.as_ref());
        let tls_mode = labels.and_then(|l| l.get(TLS_MODE_LABEL)).map(String::as_str);
        let captured = status.starts_with("captured");
        // The label istiod marks the pod's endpoints with (auto mTLS: peers send it Istio's mTLS), as the
        // sidecar injector sets it; removed again only where weft set it.
        let label = match (captured, tls_mode) {
            (true, Some("istio")) => None,
            (true, _) => Some(serde_json::json!("istio")),
            (false, Some("istio")) if carried.is_some_and(|c| c.starts_with("captured")) => Some(serde_json::Value::Null),
            (false, _) => None,
        };
        if carried.is_some_and(|c| c == status) && label.is_none() {
            return;
        }
        let mut patch = serde_json::json!({"metadata": {"annotations": {STATUS_ANNOTATION: status}}});
        if let Some(value) = label {
            patch["metadata"]["labels"] = serde_json::json!({TLS_MODE_LABEL: value});
        }
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        if let Err(e) = api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(pod = %format!("{namespace}/{name}"), "cannot write the {STATUS_ANNOTATION} annotation and {TLS_MODE_LABEL} label: {e}");
        }
    }
}

fn ready<K: kube::Resource<DynamicType = ()> + Clone + 'static>(store: &Store<K>) -> bool {
    store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok())
}

/// The pod's capture plan: Istio's traffic annotations, plus the ports of its kubelet probes (exempt from
/// inbound capture when the agent's probe exemption is on). Settings weft leaves out are logged with the pod.
pub fn capture_plan(pod: &Pod) -> Result<PodCapture, String> {
    let empty = BTreeMap::new();
    let parsed = PodCapture::parse(pod.metadata.annotations.as_ref().unwrap_or(&empty)).map_err(|e| format!("pod {}: {e}", label(pod)))?;
    for ignored in &parsed.ignored {
        tracing::warn!(pod = %label(pod), "annotation {} not applied: {}", ignored.annotation, ignored.reason);
    }
    Ok(parsed.capture.with_probe_ports(probe_ports(pod)))
}

/// The ports kubelet probes (HTTP, TCP and gRPC liveness, readiness and startup probes), named ports
/// resolved against the container's ports.
fn probe_ports(pod: &Pod) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let Some(spec) = &pod.spec else { return Vec::new() };
    let mut ports = Vec::new();
    for container in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let resolve = |port: &IntOrString| match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        };
        for probe in [&container.liveness_probe, &container.readiness_probe, &container.startup_probe].into_iter().flatten() {
            ports.extend(probe.http_get.as_ref().and_then(|h| resolve(&h.port)));
            ports.extend(probe.tcp_socket.as_ref().and_then(|t| resolve(&t.port)));
            ports.extend(probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()));
        }
    }
    ports
}

/// Per-pod limits by annotation, over the agent's `pod_limits`: `weft.dev/max-connections`,
/// `weft.dev/max-requests`, `weft.dev/max-connection-rate` (per second) and `weft.dev/max-bandwidth` (bytes per
/// second each way), each a positive integer.
pub fn pod_limits(pod: &Pod, defaults: PodLimits) -> Result<PodLimits, String> {
    let Some(annotations) = &pod.metadata.annotations else { return Ok(defaults) };
    let read = |key: &str| -> Result<Option<u64>, String> {
        let Some(value) = annotations.get(key) else { return Ok(None) };
        match value.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(format!("pod {}: annotation {key}={value:?}: use a positive integer", label(pod))),
        }
    };
    let mut limits = defaults;
    if let Some(n) = read(MAX_CONNECTIONS)? {
        limits.max_connections = n;
    }
    if let Some(n) = read(MAX_REQUESTS)? {
        limits.max_requests = n;
    }
    if let Some(n) = read(MAX_CONNECTION_RATE)? {
        limits.max_connection_rate = n;
    }
    if let Some(n) = read(MAX_BANDWIDTH)? {
        limits.max_bandwidth = Some(n);
    }
    Ok(limits)
}

/// The pod's weight: worker threads of its own share of the proxy (`weft.dev/workers`, 1-64), over the
/// agent's `pod_workers`. The kernel's scheduler shares the CPUs between runnable threads, so under contention
/// a pod's share grows with its threads.
pub fn pod_workers(pod: &Pod, default: usize) -> Result<usize, String> {
    let Some(value) = pod.metadata.annotations.as_ref().and_then(|a| a.get(WORKERS)) else { return Ok(default) };
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(format!("pod {}: annotation {WORKERS}={value:?}: use a number of threads from 1 to 64", label(pod))),
    }
}

pub const WORKERS: &str = "weft.dev/workers";
pub const MAX_CONNECTIONS: &str = "weft.dev/max-connections";
pub const MAX_REQUESTS: &str = "weft.dev/max-requests";
pub const MAX_CONNECTION_RATE: &str = "weft.dev/max-connection-rate";
pub const MAX_BANDWIDTH: &str = "weft.dev/max-bandwidth";

/// `namespace/name` of a pod, for logs.
pub fn label(pod: &Pod) -> String {
    format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or_default(), pod.metadata.name.as_deref().unwrap_or_default())
}

/// What istiod needs of `pod`; a missing service account is the namespace's `default`, as the API server itself
/// fills it in.
pub fn pod_meta(pod: &Pod) -> PodMeta {
    let spec = pod.spec.as_ref();
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string());
    PodMeta { service_account, labels: pod.metadata.labels.clone().unwrap_or_default(), workload: workload(pod) }
}

/// The pod's workload as Istio derives it: a ReplicaSet whose name is `<deployment>-<pod-template-hash>` stands
/// for its Deployment; any other controller is itself; a pod without one is its own workload.
fn workload(pod: &Pod) -> Workload {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(owner) = pod.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true)) else {
        return Workload { kind: "Pod".into(), name, api_version: "v1".into() };
    };
    let hash = pod.metadata.labels.as_ref().and_then(|l| l.get("pod-template-hash"));
    if owner.kind == "ReplicaSet" {
        if let Some(deployment) = hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}"))) {
            return Workload { kind: "Deployment".into(), name: deployment.into(), api_version: "apps/v1".into() };
        }
    }
    Workload { kind: owner.kind.clone(), name: owner.name.clone(), api_version: owner.api_version.clone() }
}

async fn client(settings: &KubeSettings) -> Result<Client, String> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::incluster().map_err(|e| {
            format!("no kubeconfig given and not in a cluster ({e}): set kubeconfig in the agent configuration or --kubeconfig")
        })?,
    };
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Retries of a failed watch: 250 ms doubling to 5 s, reset by success, so a restarted API server is followed
/// within seconds (a CNI ADD waits on the watch) without hammering one that stays away.
struct WatchBackoff {
    next: std::time::Duration,
}

const WATCH_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(250);
const WATCH_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: WATCH_RETRY_MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(WATCH_RETRY_MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_RETRY_MIN;
    }
}

/// A reflector on `api` whose store the caller reads; every event bumps `changes`. Errors (the API server
/// away, refusing, a watch expired) are logged and retried with backoff; the store keeps its last state.
fn reflect<K>(api: Api<K>, config: watcher::Config, what: &'static str, changes: Arc<watch::Sender<u64>>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).backoff(WatchBackoff::default()));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("watch on {what} restored");
                    }
                    changes.send_modify(|n| *n += 1);
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("watch on {what} failed: {e}; retrying, the last known {what} stay in use");
                }
                Err(_) => {}
            }
        }
    });
    reader
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn workload_and_service_account_as_istio_names_them() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web-7d9f8c-x1", "namespace": "shop", "labels": {"pod-template-hash": "7d9f8c"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c", "uid": "u", "controller": true}]},
            "spec": {"containers": [], "serviceAccountName": "web"}
        }));
        let meta = pod_meta(&p);
        assert_eq!(meta.service_account, "web");
        assert_eq!(meta.workload, Workload { kind: "Deployment".into(), name: "web".into(), api_version: "apps/v1".into() });
        let job = pod(serde_json::json!({
            "metadata": {"name": "j-1", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": "u", "controller": true}]},
            "spec": {"containers": []}
        }));
        let meta = pod_meta(&job);
        assert_eq!((meta.service_account.as_str(), meta.workload.kind.as_str(), meta.workload.name.as_str()), ("default", "Job", "j"));
        let bare = pod_meta(&pod(serde_json::json!({"metadata": {"name": "solo"}})));
        assert_eq!((bare.workload.kind.as_str(), bare.workload.name.as_str()), ("Pod", "solo"));
    }

    #[test]
    fn probe_ports_resolve_named_ports() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app", "ports": [{"name": "health", "containerPort": 8081}],
                "livenessProbe": {"httpGet": {"port": "health"}}, "readinessProbe": {"tcpSocket": {"port": 8080}},
                "startupProbe": {"grpc": {"port": 9090}}}]}
        }));
        let plan = capture_plan(&p).unwrap();
        assert_eq!(plan.probe_ports, [8080, 8081, 9090]);
    }

    #[test]
    fn limits_by_annotation_name_the_bad_one() {
        let defaults = PodLimits::default();
        let p = pod(serde_json::json!({"metadata": {"name": "p", "namespace": "n", "annotations": {MAX_CONNECTIONS: "10", MAX_BANDWIDTH: "1000"}}}));
        let limits = pod_limits(&p, defaults).unwrap();
        assert_eq!((limits.max_connections, limits.max_bandwidth, limits.max_requests), (10, Some(1000), defaults.max_requests));
        let weighted = pod(serde_json::json!({"metadata": {"name": "p", "namespace": "n", "annotations": {WORKERS: "4"}}}));
        assert_eq!(pod_workers(&weighted, 2), Ok(4));
        let bad = pod(serde_json::json!({"metadata": {"name": "p", "namespace": "n", "annotations": {WORKERS: "65"}}}));
        assert!(pod_workers(&bad, 2).unwrap_err().contains("weft.dev/workers=\"65\""));
        let bad = pod(serde_json::json!({"metadata": {"name": "p", "namespace": "n", "annotations": {MAX_REQUESTS: "0"}}}));
        assert_eq!(pod_limits(&bad, defaults).unwrap_err(), "pod n/p: annotation weft.dev/max-requests=\"0\": use a positive integer");
    }
}
