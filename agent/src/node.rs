//! The node's captured pods: for each attachment, its netns, its in-pod listeners and its redirection rules,
//! kept in step with the persisted registry. The CNI server and the start-up adoption drive it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Mutex;
use weft_cni::protocol::{Attachment, PodSandbox};

use crate::admin::pod_ports::{self, PodMetrics, PodPorts, PortSockets, Readiness};
use crate::capture::netns::{self, Netns, NetnsPath};
use crate::capture::probes::{HostProbes, ProbeTarget};
use crate::capture::{CaptureError, PodCapture, RedirectMode, Redirector};
use crate::cni_server::registry::{PodRecord, Registry, RegistryDir};
use crate::identity::manager::{IdentityManager, Subscription};
use crate::config::agent::{PodLimits, DEFAULT_ISTIO_VERSION};
use crate::k8s::{self, KubeView, PodMeta};
use crate::proxy::connection_handler::SnapshotWatch;
use crate::proxy::listener::{self, PodListeners};
use crate::proxy::passthrough;
use crate::proxy::pod_share::{LoadSnapshot, NodeLoad, PodShare, PodThreads};
use crate::proxy::stats::ListenerSnapshot;
use crate::proxy::ProxySettings;
use crate::xds::pod::PodXds;
use crate::xds::XdsState;

/// A failure a CNI caller sees: what failed, and what to do about it.
#[derive(Debug)]
pub struct NodeError {
    pub msg: String,
    pub details: String,
}

impl NodeError {
    fn new(msg: impl Into<String>, details: impl ToString) -> Self {
        NodeError { msg: msg.into(), details: details.to_string() }
    }
}

struct CapturedPod {
    record: PodRecord,
    netns: Netns,
    listeners: PodListeners,
    xds: Option<PodStream>,
    /// The pod's own worker threads, where its connections and its xDS stream run.
    share: PodShare,
    /// Its workload certificate, pushed to its TLS as `default`/`ROOTCA` while held.
    identity: Option<PodIdentity>,
    /// Its sidecar's health and metrics ports (15020, 15021), unless `pod_health_ports` is off.
    ports: Option<PodPorts>,
    /// The configuration its listeners serve (what `explain` reads).
    config: SnapshotWatch,
}

/// A pod's subscription to its service account's certificate and the task that serves it to the pod's TLS.
struct PodIdentity {
    subscription: Subscription,
    follow: tokio::task::JoinHandle<()>,
}

impl Drop for PodIdentity {
    fn drop(&mut self) {
        self.follow.abort();
    }
}

/// A pod's xDS stream; dropping it ends the stream.
struct PodStream {
    state: Arc<XdsState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CapturedPod {
    fn label(&self) -> String {
        format!("{}/{}", self.record.namespace, self.record.name)
    }

    /// Whether every accept loop of the pod (data path, health ports) still runs.
    fn serving(&self) -> bool {
        self.listeners.tasks.healthy() && self.ports.as_ref().is_none_or(|p| p.tasks.healthy())
    }

    /// Points the pod's readiness at its current xDS stream.
    fn follow_stream(&self) {
        if let (Some(ports), Some(stream)) = (&self.ports, &self.xds) {
            ports.readiness.follow(Arc::clone(&stream.state));
        }
    }
}

/// The agent's pods. Control-path only: the data path holds its own `Arc`s and never takes the pods lock. CNI
/// operations take turns per attachment and hold the pods lock only to read and record, never while rules are
/// programmed or listeners started, so a burst of pods is captured side by side.
pub struct Node {
    redirector: Arc<dyn Redirector>,
    registry: Registry,
    settings: ProxySettings,
    xds: Option<PodXds>,
    pods: Mutex<BTreeMap<Attachment, CapturedPod>>,
    /// Records of pods an ADD is capturing now: written to the registry while the capture runs, so whole-registry
    /// offers keep them. Locked after `pods`.
    capturing: std::sync::Mutex<BTreeMap<Attachment, PodRecord>>,
    /// Worker threads started for the next pod with the default worker count.
    spare: std::sync::Mutex<Option<PodThreads>>,
    /// Connections and requests of all pods together, against `node_max_connections` and `node_max_requests`.
    load: Arc<NodeLoad>,
    /// The Kubernetes API's view of the node's pods: who is captured, and each pod's identity.
    kube: Option<Arc<KubeView>>,
    /// Where pods' workload certificates come from (needs `kube` for their service accounts).
    identities: Option<Arc<IdentityManager>>,
    /// Pods shown to the agent (by CNI ADD or repair) that their labels keep out of the mesh, kept so that a label
    /// change captures them live. Locked after `pods`.
    declined: Mutex<BTreeMap<Attachment, PodRecord>>,
    /// When repair last looked for each unknown pod's netns (by uid) and found none it could take: a scan enters
    /// every namespace of the node, so a pod is looked for at most every `REPAIR_RETRY`.
    repair_tried: std::sync::Mutex<HashMap<String, Instant>>,
    /// The node half of the kubelet probe exemption, and the targets it was last given.
    probes: Option<Arc<HostProbes>>,
    probe_targets: std::sync::Mutex<Option<Vec<ProbeTarget>>>,
    /// Probe rule updates one at a time, each from the pods captured when it starts (the last leaves the latest).
    probe_sync: Mutex<()>,
    /// One CNI operation at a time per attachment (an entry lives while an operation holds or waits for it).
    turns: std::sync::Mutex<HashMap<Attachment, Arc<Mutex<()>>>>,
    /// Captures and releases in progress at once (each starts threads and rule programs). A burst of 100 pods
    /// run all at once thrashes a small node until every CNI call times out; in turns (first come, first
    /// served) each is as quick as alone and the early ones answer early.
    capture_slots: tokio::sync::Semaphore,
}

/// A captured pod, by its Kubernetes UID (all its attachments) or by one CNI attachment.
#[derive(Debug, Clone, Copy)]
pub enum PodRef<'a> {
    Uid(&'a str),
    Attachment(&'a Attachment),
}

impl PodRef<'_> {
    fn matches(&self, attachment: &Attachment, record: &PodRecord) -> bool {
        match self {
            PodRef::Uid(uid) => record.uid == *uid,
            PodRef::Attachment(a) => *a == attachment,
        }
    }
}

impl std::fmt::Display for PodRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodRef::Uid(uid) => write!(f, "pod uid {uid}"),
            PodRef::Attachment(a) => write!(f, "container {} ({})", a.container_id, a.ifname),
        }
    }
}

/// Whether a new pod is captured, as the Kubernetes API says (every pod, without it).
enum Admission {
    Capture { asked: Option<Asked>, reason: String },
    Decline(String),
}

/// What the API asks of a pod the agent captures: the metadata istiod and its identity need, its capture plan,
/// its limits and its weight.
struct Asked {
    meta: PodMeta,
    plan: PodCapture,
    limits: PodLimits,
    workers: usize,
}

impl Asked {
    fn apply(self, record: &mut PodRecord) {
        record.meta = Some(self.meta);
        record.capture = self.plan;
        record.limits = Some(self.limits);
        record.workers = Some(self.workers);
    }
}

/// The container id of a pod the agent found itself (it started before the agent or before weft-cni was
/// installed): no runtime attachment names it, so CNI DEL and GC never release it; its netns going or the pod
/// leaving the API does.
const REPAIRED: &str = "repaired-";

/// How often repair looks again for the netns of a pod it could not find (or found ambiguous).
const REPAIR_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// One pod in the status endpoint.
#[derive(Debug, Serialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: String,
    pub netns: String,
    pub ips: Vec<std::net::IpAddr>,
    pub redirect: RedirectMode,
    pub listeners: Vec<std::net::SocketAddr>,
    pub listening: bool,
    /// Where the pod answers `/healthz/ready` and `/stats/prometheus` (15020, 15021), unless turned off.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub health_ports: Vec<std::net::SocketAddr>,
    pub outbound: ListenerSnapshot,
    pub inbound: ListenerSnapshot,
    /// The pod's share of the proxy: connections, requests in flight, bytes and CPU time of its threads.
    pub load: LoadSnapshot,
    /// xDS sync status per type (CDS, EDS, LDS, RDS), when the agent has a control plane.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xds: Option<std::collections::BTreeMap<&'static str, &'static str>>,
    /// Per type, the version last accepted and why the last rejected response was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xds_detail: Option<std::collections::BTreeMap<&'static str, crate::xds::TypeSync>>,
    /// The workload identity (SPIFFE id) whose certificate the pod's TLS uses, when the agent has a CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl Node {
    pub fn new(redirector: Arc<dyn Redirector>, registry: RegistryDir, settings: ProxySettings, xds: Option<PodXds>) -> Node {
        let load = NodeLoad::new(settings.node_max_connections, settings.node_max_requests);
        Node {
            redirector,
            registry: Registry::new(registry),
            settings,
            xds,
            pods: Mutex::new(BTreeMap::new()),
            capturing: std::sync::Mutex::default(),
            spare: std::sync::Mutex::default(),
            load,
            kube: None,
            identities: None,
            declined: Mutex::new(BTreeMap::new()),
            repair_tried: std::sync::Mutex::default(),
            probes: None,
            probe_targets: std::sync::Mutex::new(None),
            probe_sync: Mutex::new(()),
            turns: std::sync::Mutex::default(),
            capture_slots: tokio::sync::Semaphore::new(capture_slots()),
        }
    }

    /// Decides capture from the Kubernetes API and gives each pod its service account's identity.
    pub fn with_kube(mut self, kube: Arc<KubeView>, identities: Option<Arc<IdentityManager>>) -> Node {
        self.kube = Some(kube);
        self.identities = identities;
        self
    }

    /// Exempts kubelet's probes of captured pods from inbound capture (see `capture::probes`).
    pub fn with_host_probes(mut self, probes: HostProbes) -> Node {
        self.probes = Some(Arc::new(probes));
        self
    }

    /// The xDS state of pod `namespace/name`, when the agent has a control plane.
    /// Every captured pod as `explain` sees it: addresses, capture plan, identity and the configuration its
    /// listeners serve.
    pub async fn pod_views(&self) -> Vec<crate::explain::PodView> {
        let pods = self.pods.lock().await;
        pods.values()
            .map(|p| crate::explain::PodView {
                name: p.label(),
                ips: p.record.ips.clone(),
                redirect: p.record.redirect,
                capture: p.record.capture.clone(),
                identity: p.identity.as_ref().map(|i| i.subscription.identity().to_string()),
                snapshot: p.config.borrow().clone(),
            })
            .collect()
    }

    pub async fn pod_xds(&self, namespace: &str, name: &str) -> Option<Arc<XdsState>> {
        let pods = self.pods.lock().await;
        let pod = pods.values().find(|p| p.record.namespace == namespace && p.record.name == name)?;
        pod.xds.as_ref().map(|s| Arc::clone(&s.state))
    }

    pub fn mode(&self) -> RedirectMode {
        self.redirector.mode()
    }

    /// The Kubernetes watch, when there is one, for the status endpoint.
    pub fn kube_status(&self) -> Option<k8s::KubeStatus> {
        self.kube.as_ref().map(|k| k.status())
    }

    /// Backend details (eBPF pins, adopted links) for the status endpoint.
    pub fn capture_status(&self) -> serde_json::Value {
        self.redirector.status()
    }

    /// The capture backend's kernel maps: `(name, entries in use, capacity)` (eBPF mode; none otherwise).
    pub fn capture_maps(&self) -> Vec<(&'static str, u64, u64)> {
        self.redirector.map_occupancy()
    }

    /// Re-captures every pod of the persisted registry whose netns still exists; forgets the others. Returns
    /// how many pods were adopted and dropped. Run before serving CNI requests and before reporting ready.
    pub async fn adopt(&self) -> Result<(usize, usize), String> {
        let records = self.registry.load()?;
        let mut pods = self.pods.lock().await;
        let (mut adopted, mut dropped) = (0, 0);
        for record in records {
            let label = format!("{}/{}", record.namespace, record.name);
            if !netns::still_same(&record.netns, record.netns_id) {
                tracing::info!(pod = %label, netns = %record.netns, "pod is gone; forgetting it");
                dropped += 1;
                continue;
            }
            match self.capture(record.clone()).await {
                Ok(pod) => {
                    tracing::info!(pod = %label, "re-adopted captured pod");
                    pods.insert(record.attachment(), pod);
                    adopted += 1;
                }
                Err(e) => {
                    // Its rules stay, so the pod fails closed; CNI CHECK reports it and kubelet re-creates it.
                    tracing::error!(pod = %label, "cannot re-adopt pod: {}: {}", e.msg, e.details);
                    dropped += 1;
                }
            }
        }
        self.persist(&pods).await.map_err(|e| e.details)?;
        drop(pods);
        self.sync_probes().await;
        Ok((adopted, dropped))
    }

    /// CNI ADD: capture the pod with `capture`; returns once its listeners and rules are in place. A plan the
    /// backend cannot honour is refused before anything is touched.
    pub async fn add(&self, sandbox: PodSandbox, capture: PodCapture) -> Result<String, NodeError> {
        let started = Instant::now();
        self.redirector.check(&capture).map_err(|e| NodeError::new(format!("cannot capture {}/{}", sandbox.namespace, sandbox.name), e))?;
        let path = NetnsPath::try_from(sandbox.netns.clone()).map_err(|e| NodeError::new("invalid CNI_NETNS", e))?;
        let ns = Netns::open(&path).map_err(|e| NodeError::new(format!("cannot open netns {path}"), e))?;
        let attachment = Attachment { container_id: sandbox.container_id.clone(), ifname: sandbox.ifname.clone() };
        // Before taking the lock: the API may take a moment to show a new pod.
        let admission = self.admit(&sandbox.namespace, &sandbox.name, &sandbox.uid).await?;
        let admitted = started.elapsed();
        let _turn = self.turn(&attachment).await;
        let stale = {
            let mut pods = self.pods.lock().await;
            self.declined.lock().await.remove(&attachment);
            if let Some(existing) = pods.get(&attachment).filter(|p| p.record.netns_id == ns.id() && p.serving()) {
                let (netns, plan, label) = (existing.netns.clone(), existing.record.capture.clone(), existing.label());
                drop(pods);
                self.verify_rules(&netns, &plan).await?;
                return Ok(format!("{label} already captured"));
            }
            pods.remove(&attachment)
        };
        if let Some(stale) = stale {
            self.release(stale).await;
        }
        let mut record = PodRecord {
            namespace: sandbox.namespace,
            name: sandbox.name,
            uid: sandbox.uid,
            container_id: sandbox.container_id,
            infra_container_id: sandbox.infra_container_id,
            ifname: sandbox.ifname,
            netns: path,
            netns_id: ns.id(),
            ips: sandbox.ips,
            redirect: self.redirector.mode(),
            added_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            meta: None,
            limits: None,
            workers: None,
            capture,
        };
        let reason = match admission {
            Admission::Decline(reason) => {
                let label = format!("{}/{}", record.namespace, record.name);
                tracing::info!(pod = %label, "not captured: {reason}");
                self.annotate(&record, format!("not captured: {reason}"));
                let generation = {
                    // Under the pods lock, which orders the registry's changes; a stale record of it goes.
                    let _pods = self.pods.lock().await;
                    self.declined.lock().await.insert(attachment.clone(), record);
                    self.registry.remove(&attachment)
                };
                self.flush(generation).await?;
                return Ok(format!("{label} not captured: {reason}"));
            }
            Admission::Capture { asked, reason } => {
                if let Some(asked) = asked {
                    asked.apply(&mut record);
                }
                reason
            }
        };
        let before_capture = started.elapsed();
        // The record is written while the pod is captured (a restarted agent re-adopts what the registry holds,
        // and an ADD that fails is undone; a DEL follows it).
        let generation = {
            let _pods = self.pods.lock().await;
            self.capturing().insert(attachment.clone(), record.clone());
            self.registry.put(&record)
        };
        // The registry first: its files are written on another thread while this one captures.
        let (recorded, pod) = tokio::join!(self.flush(generation), self.capture_in(record, ns, Rules::Install));
        let captured = started.elapsed();
        let pod = match (pod, recorded) {
            (Ok(pod), Ok(())) => pod,
            (Err(e), _) => {
                self.forget_capturing(&attachment).await;
                return Err(e);
            }
            (Ok(pod), Err(e)) => {
                // Undone, so that what runs and what a restarted agent would re-adopt never disagree.
                self.release(pod).await;
                self.forget_capturing(&attachment).await;
                return Err(e);
            }
        };
        let (label, record) = (pod.label(), pod.record.clone());
        let replaced = {
            let mut pods = self.pods.lock().await;
            self.capturing().remove(&attachment);
            pods.insert(attachment.clone(), pod)
        };
        if let Some(replaced) = replaced {
            self.release(replaced).await;
        }
        let recorded = started.elapsed();
        if has_probes(&record) {
            self.sync_probes().await;
        }
        tracing::debug!(pod = %label, ?admitted, ?before_capture, ?captured, ?recorded, total = ?started.elapsed(), "ADD phases");
        tracing::info!(pod = %label, mode = %self.redirector.mode(), "captured pod: {reason}");
        self.annotate(&record, format!("captured ({}): {reason}", self.redirector.mode()));
        Ok(format!("{label} captured ({})", self.redirector.mode()))
    }

    /// CNI DEL: stop capturing. Unknown attachments succeed.
    pub async fn del(&self, attachment: &Attachment) -> Result<String, NodeError> {
        let _turn = self.turn(attachment).await;
        let (pod, persisted) = {
            let mut pods = self.pods.lock().await;
            self.declined.lock().await.remove(attachment);
            let Some(pod) = pods.remove(attachment) else {
                return Ok(format!("{} not captured", attachment.container_id));
            };
            (pod, self.registry.remove(attachment))
        };
        let (label, probed) = (pod.label(), has_probes(&pod.record));
        self.release(pod).await;
        self.flush(persisted).await?;
        if probed {
            self.sync_probes().await;
        }
        tracing::info!(pod = %label, "released pod");
        Ok(format!("{label} released"))
    }

    /// Waits for the attachment's turn: CNI operations on one attachment never interleave.
    async fn turn(&self, attachment: &Attachment) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
            turns.retain(|_, lock| Arc::strong_count(lock) > 1);
            Arc::clone(turns.entry(attachment.clone()).or_default())
        };
        lock.lock_owned().await
    }

    /// CNI CHECK: registered, listeners running, rules exactly in place.
    pub async fn check(&self, attachment: &Attachment) -> Result<String, NodeError> {
        let (netns, plan, label) = {
            let pods = self.pods.lock().await;
            if let Some(record) = self.declined.lock().await.get(attachment) {
                return Ok(format!("{}/{} not captured (its labels keep it out of the mesh)", record.namespace, record.name));
            }
            let pod = pods.get(attachment).ok_or_else(|| {
                NodeError::new(
                    format!("container {} ({}) is not captured", attachment.container_id, attachment.ifname),
                    "the agent has no record of this attachment; re-create the pod so that CNI ADD runs again",
                )
            })?;
            if !netns::still_same(&pod.record.netns, pod.record.netns_id) {
                return Err(NodeError::new(format!("{}: netns {} is gone", pod.label(), pod.record.netns), ""));
            }
            if !pod.serving() {
                return Err(NodeError::new(format!("{}: in-pod listeners stopped", pod.label()), "see the agent log"));
            }
            (pod.netns.clone(), pod.record.capture.clone(), pod.label())
        };
        self.verify_rules(&netns, &plan).await?;
        Ok(format!("{label} captured"))
    }

    /// CNI GC: release every attachment the runtime no longer knows.
    pub async fn gc(&self, valid: &[Attachment]) -> Result<String, NodeError> {
        let valid: HashSet<&Attachment> = valid.iter().collect();
        let (stale, persisted) = {
            let mut pods = self.pods.lock().await;
            self.declined.lock().await.retain(|a, _| valid.contains(a));
            let stale: Vec<Attachment> =
                pods.keys().filter(|a| !valid.contains(a) && !a.container_id.starts_with(REPAIRED)).cloned().collect();
            let stale: Vec<CapturedPod> = stale.iter().filter_map(|a| pods.remove(a)).collect();
            (stale, self.offer(&pods))
        };
        let released = stale.len();
        for pod in stale {
            tracing::info!(pod = %pod.label(), "garbage-collected pod");
            self.release(pod).await;
        }
        self.flush(persisted).await?;
        self.sync_probes().await;
        Ok(format!("released {released} stale attachment(s)"))
    }

    /// Applies a changed capture plan to a running pod: its rules are replaced in one batch (per IP family
    /// with iptables; one nftables transaction; one map update plus one transaction in eBPF mode), its
    /// listeners and established connections stay. A plan the backend cannot honour is refused before
    /// anything changes; if installing or persisting fails, the pod keeps its previous rules and plan.
    /// To stop capturing a pod live and resume later, apply [`PodCapture::nothing`] and then its plan again.
    pub async fn recapture(&self, pod: PodRef<'_>, capture: PodCapture) -> Result<String, NodeError> {
        self.redirector.check(&capture).map_err(|e| NodeError::new(format!("{pod}: capture plan refused"), e))?;
        let mut pods = self.pods.lock().await;
        let keys: Vec<Attachment> = pods.iter().filter(|(a, p)| pod.matches(a, &p.record)).map(|(a, _)| a.clone()).collect();
        if keys.is_empty() {
            return Err(NodeError::new(format!("{pod} is not captured"), "the agent has no record of it"));
        }
        let mut previous = Vec::new();
        for key in keys {
            let Some((label, ns)) =
                pods.get(&key).filter(|p| p.record.capture != capture).map(|p| (p.label(), p.netns.clone()))
            else {
                continue;
            };
            if let Err(e) = self.install_rules(&ns, &capture).await {
                self.restore_plans(&mut pods, previous).await;
                return Err(NodeError::new(format!("{label}: cannot apply the new capture plan"), e));
            }
            if let Some(p) = pods.get_mut(&key) {
                previous.push((key, std::mem::replace(&mut p.record.capture, capture.clone())));
            }
        }
        if previous.is_empty() {
            return Ok(format!("{pod}: capture plan unchanged"));
        }
        if let Err(e) = self.persist(&pods).await {
            self.restore_plans(&mut pods, previous).await;
            return Err(e);
        }
        drop(pods);
        self.sync_probes().await;
        tracing::info!(pod = %pod, attachments = previous.len(), "applied a new capture plan");
        Ok(format!("{pod}: new capture plan applied"))
    }

    /// Puts back the plans (and their rules) of pods whose new plan could not be applied in full.
    async fn restore_plans(&self, pods: &mut BTreeMap<Attachment, CapturedPod>, previous: Vec<(Attachment, PodCapture)>) {
        for (key, plan) in previous {
            let Some(p) = pods.get_mut(&key) else { continue };
            if let Err(e) = self.install_rules(&p.netns, &plan).await {
                tracing::error!(pod = %p.label(), "cannot restore the previous capture plan: {e}");
            }
            p.record.capture = plan;
        }
    }

    async fn install_rules(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        let (redirector, ns, plan) = (Arc::clone(&self.redirector), ns.clone(), plan.clone());
        blocking(move || redirector.install(&ns, &plan)).await
    }

    /// Gives the node's probe rules the probe ports of the pods captured now (skipped when unchanged). A
    /// failure is logged: probes then go through capture like other connections, nothing is let through.
    /// Called without the pods lock held. O(pods): a CNI ADD or DEL calls it only for a pod that has probe
    /// targets (no other pod changes the set).
    async fn sync_probes(&self) {
        let Some(probes) = self.probes.clone() else { return };
        let _turn = self.probe_sync.lock().await;
        let mut targets: Vec<ProbeTarget> = self
            .pods
            .lock()
            .await
            .values()
            .flat_map(|p| ProbeTarget::of_pod(&p.record.ips, &p.record.capture.probe_ports))
            .collect();
        targets.sort();
        targets.dedup();
        {
            let last = self.probe_targets.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_ref() == Some(&targets) {
                return;
            }
        }
        let synced = targets.clone();
        match blocking(move || probes.sync(&synced)).await {
            Ok(()) => *self.probe_targets.lock().unwrap_or_else(|e| e.into_inner()) = Some(targets),
            Err(e) => tracing::warn!("kubelet probe exemption not updated, probes of captured pods may be refused: {e}"),
        }
    }

    /// Closes every pod's listeners (shutdown); the records and rules stay for the next agent.
    pub async fn stop_listening(&self) {
        for pod in self.pods.lock().await.values() {
            pod.listeners.tasks.close().await;
            if let Some(ports) = &pod.ports {
                ports.tasks.close().await;
            }
        }
    }

    /// Established proxied connections across all pods.
    pub async fn active_connections(&self) -> u64 {
        self.pods.lock().await.values().map(|p| p.listeners.active()).sum()
    }

    /// Whether a pod the CNI plugin hands over is captured. With the Kubernetes API, an ADD for a pod the API does
    /// not show in time fails (kubelet retries it): capturing it blind could give it the wrong identity, and
    /// leaving it out could leave a meshed pod unprotected.
    async fn admit(&self, namespace: &str, name: &str, uid: &str) -> Result<Admission, NodeError> {
        let Some(kube) = &self.kube else {
            return Ok(Admission::Capture { asked: None, reason: "no Kubernetes API configured: every pod weft-cni hands over".into() });
        };
        let pod = kube.wait_pod(namespace, name, uid).await.map_err(|e| NodeError::new("cannot decide whether to capture the pod", e))?;
        let verdict = kube.verdict(&pod);
        if !verdict.capture {
            return Ok(Admission::Decline(verdict.reason));
        }
        // Annotations that cannot be honoured fail the ADD, as istio-cni does: capturing with other rules or
        // limits than the pod asks for is worse than the pod waiting for a fixed annotation.
        let asked = self.asked(kube, &pod).map_err(|e| NodeError::new("cannot capture the pod as its annotations ask", e))?;
        Ok(Admission::Capture { asked: Some(asked), reason: verdict.reason })
    }

    /// What `pod`'s metadata asks of its capture; an annotation weft cannot honour is a Warning event and
    /// keeps the pod out until it is fixed.
    fn asked(&self, kube: &KubeView, pod: &k8s_openapi::api::core::v1::Pod) -> Result<Asked, String> {
        let asked = (|| {
            let plan = k8s::capture_plan(pod)?;
            self.redirector.check(&plan).map_err(|e| format!("pod {}: capture plan refused: {e}", k8s::label(pod)))?;
            let limits = k8s::pod_limits(pod, self.settings.pod_limits)?;
            let workers = k8s::pod_workers(pod, self.settings.pod_workers)?;
            Ok(Asked { meta: k8s::pod_meta(pod), plan, limits, workers })
        })();
        if let Err(e) = &asked {
            kube.warn(pod, "InvalidAnnotation", format!("{e}; not captured until it is fixed"));
        }
        asked
    }

    /// Writes the pod's status annotation in the background (the CNI caller does not wait for the API).
    fn annotate(&self, record: &PodRecord, status: String) {
        if let Some(kube) = &self.kube {
            let (kube, namespace, name) = (Arc::clone(kube), record.namespace.clone(), record.name.clone());
            tokio::spawn(async move { kube.annotate(&namespace, &name, &status).await });
        }
    }

    /// Follows the Kubernetes API for as long as the agent runs: every change of a pod of the node or of a
    /// namespace re-decides capture (see [`Node::reconcile`]).
    pub async fn follow_kube(self: Arc<Self>) {
        let Some(kube) = self.kube.clone() else { return };
        let mut changes = kube.changes();
        loop {
            if kube.synced() {
                self.reconcile().await;
            }
            if changes.changed().await.is_err() {
                return;
            }
            // Coalesce a burst (a namespace relabel touches every pod) into one pass.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            changes.borrow_and_update();
        }
    }

    /// Brings capture in line with the API, without restarting any pod: captured pods whose labels now keep them
    /// out are released, declined pods whose labels now select them are captured, a pod whose labels or service
    /// account changed gets a new xDS stream and identity, and running pods the agent was never shown (they
    /// started before it, or while it was down) are found by their address and decided (repair).
    pub async fn reconcile(&self) {
        let Some(kube) = &self.kube else { return };
        let mut pods = self.pods.lock().await;
        let mut declined = self.declined.lock().await;
        let mut changed = false;
        for attachment in pods.keys().cloned().collect::<Vec<_>>() {
            let Some(pod) = pods.get_mut(&attachment) else { continue };
            let Some(current) = api_pod(kube, &pod.record) else {
                if attachment.container_id.starts_with(REPAIRED) && !netns::still_same(&pod.record.netns, pod.record.netns_id) {
                    if let Some(gone) = pods.remove(&attachment) {
                        self.release(gone).await;
                        changed = true;
                    }
                }
                continue;
            };
            let verdict = kube.verdict(&current);
            if !verdict.capture {
                let Some(pod) = pods.remove(&attachment) else { continue };
                tracing::info!(pod = %pod.label(), "no longer captured: {}", verdict.reason);
                let mut record = pod.record.clone();
                self.release(pod).await;
                record.meta = None;
                self.annotate(&record, format!("not captured: {}", verdict.reason));
                declined.insert(attachment, record);
                changed = true;
                continue;
            }
            changed |= self.follow_plan(pod, &current).await;
            let meta = k8s::pod_meta(&current);
            if pod.record.meta.as_ref() != Some(&meta) {
                tracing::info!(pod = %pod.label(), "labels or service account changed; renewing its xDS stream and identity");
                pod.record.meta = Some(meta);
                self.renew_control(pod);
                changed = true;
            }
        }
        for (attachment, mut record) in std::mem::take(&mut *declined) {
            if !netns::still_same(&record.netns, record.netns_id) {
                changed = true;
                continue;
            }
            let selected = api_pod(kube, &record).and_then(|p| {
                let verdict = kube.verdict(&p);
                verdict.capture.then(|| self.asked(kube, &p).ok().map(|asked| (asked, verdict.reason))).flatten()
            });
            let Some((asked, reason)) = selected else {
                declined.insert(attachment, record);
                continue;
            };
            asked.apply(&mut record);
            if let Some(pod) = self.capture_declined(record, &reason).await {
                pods.insert(attachment, pod);
                changed = true;
            }
        }
        changed |= self.repair(kube, &mut pods, &mut declined).await;
        if changed {
            if let Err(e) = self.persist(&pods).await {
                tracing::error!("{}: {}", e.msg, e.details);
            }
        }
        drop((pods, declined));
        self.sync_probes().await;
    }

    async fn capture_declined(&self, record: PodRecord, reason: &str) -> Option<CapturedPod> {
        let label = format!("{}/{}", record.namespace, record.name);
        match self.capture(record.clone()).await {
            Ok(pod) => {
                tracing::info!(pod = %label, mode = %self.mode(), "captured pod: {reason}");
                self.annotate(&pod.record, format!("captured ({}): {reason}", self.mode()));
                Some(pod)
            }
            Err(e) => {
                tracing::error!(pod = %label, "cannot capture: {}: {}", e.msg, e.details);
                self.annotate(&record, format!("capture failed: {}", e.msg));
                None
            }
        }
    }

    /// Pods of the node that are running with an address but were never shown to the agent: found by the network
    /// namespace that holds their address, then decided as a new pod is.
    async fn repair(&self, kube: &KubeView, pods: &mut BTreeMap<Attachment, CapturedPod>, declined: &mut BTreeMap<Attachment, PodRecord>) -> bool {
        let known: HashSet<(String, String)> = pods
            .values()
            .map(|p| &p.record)
            .chain(declined.values())
            .map(|r| (r.namespace.clone(), r.name.clone()))
            .collect();
        let mut changed = false;
        for current in kube.pods() {
            let Some(found) = repair_candidate(&current, &known) else { continue };
            if !self.repair_due(&found.uid) {
                continue;
            }
            let ip = found.ips[0];
            let Ok(mut holders) = tokio::task::spawn_blocking(move || netns::find_by_ip(ip)).await else { continue };
            let path = match holders.len() {
                1 => holders.remove(0),
                0 => continue,
                _ => {
                    let names: Vec<String> = holders.iter().map(ToString::to_string).collect();
                    tracing::error!(pod = %k8s::label(&current), "not repaired: its address {ip} is held by several network namespaces ({})", names.join(", "));
                    continue;
                }
            };
            let Ok(ns) = Netns::open(&path) else { continue };
            self.repair_tried().remove(&found.uid);
            let mut record = PodRecord {
                container_id: format!("{REPAIRED}{}", found.uid),
                infra_container_id: format!("{REPAIRED}{}", found.uid),
                namespace: found.namespace,
                name: found.name,
                uid: found.uid,
                ifname: "eth0".into(),
                netns: path,
                netns_id: ns.id(),
                ips: found.ips,
                redirect: self.mode(),
                added_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                meta: None,
                limits: None,
                workers: None,
                capture: PodCapture::default(),
            };
            let attachment = record.attachment();
            let verdict = kube.verdict(&current);
            tracing::info!(pod = %k8s::label(&current), netns = %record.netns, "found a running pod the agent was not shown");
            if !verdict.capture {
                self.annotate(&record, format!("not captured: {}", verdict.reason));
                declined.insert(attachment, record);
                continue;
            }
            let Ok(asked) = self.asked(kube, &current) else {
                declined.insert(attachment, record);
                continue;
            };
            asked.apply(&mut record);
            if let Some(pod) = self.capture_declined(record, &format!("{} (repaired)", verdict.reason)).await {
                pods.insert(attachment, pod);
                changed = true;
            }
        }
        changed
    }

    /// Whether repair may look for pod `uid`'s netns now; records the attempt.
    fn repair_due(&self, uid: &str) -> bool {
        let now = Instant::now();
        let mut tried = self.repair_tried();
        tried.retain(|_, at| now.duration_since(*at) < REPAIR_RETRY);
        match tried.get(uid) {
            Some(_) => false,
            None => {
                tried.insert(uid.to_string(), now);
                true
            }
        }
    }

    fn repair_tried(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.repair_tried.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a changed capture plan (annotations, probe ports) to a captured pod; a plan that cannot be
    /// applied is logged and the pod keeps its last good rules.
    async fn follow_plan(&self, pod: &mut CapturedPod, current: &k8s_openapi::api::core::v1::Pod) -> bool {
        let plan = match k8s::capture_plan(current) {
            Ok(plan) if plan != pod.record.capture => plan,
            Ok(_) => return false,
            Err(e) => {
                self.warn(current, "InvalidAnnotation", format!("{e}; keeping its current capture"));
                return false;
            }
        };
        let applied = match self.redirector.check(&plan) {
            Ok(()) => self.install_rules(&pod.netns, &plan).await,
            Err(e) => Err(e),
        };
        match applied {
            Ok(()) => {
                tracing::info!(pod = %pod.label(), "applied its new capture annotations");
                pod.record.capture = plan;
                true
            }
            Err(e) => {
                self.warn(current, "InvalidAnnotation", format!("cannot apply its new capture annotations ({e}); keeping its current capture"));
                false
            }
        }
    }

    /// [`KubeView::warn`], when the agent watches the API.
    fn warn(&self, pod: &k8s_openapi::api::core::v1::Pod, reason: &'static str, note: String) {
        if let Some(kube) = &self.kube {
            kube.warn(pod, reason, note);
        }
    }

    /// A new xDS stream and identity for a pod whose metadata changed; its listeners and connections stay.
    fn renew_control(&self, pod: &mut CapturedPod) {
        pod.identity = self.pod_identity(&pod.record, &pod.listeners, &pod.share);
        if let Some(snapshot) = pod.xds.take().and_then(|stream| stream.state.snapshot_sender()) {
            pod.xds = self.start_xds(&pod.record, snapshot, pod.identity.as_ref(), &pod.share);
            pod.follow_stream();
        }
    }

    /// Every captured pod's Istio standard metrics, by `namespace/name`.
    pub async fn istio_metrics(&self) -> Vec<(String, Arc<crate::proxy::istio_metrics::IstioMetrics>)> {
        let pods = self.pods.lock().await;
        pods.values().map(|p| (format!("{}/{}", p.record.namespace, p.record.name), Arc::clone(&p.listeners.metrics))).collect()
    }

    pub async fn status(&self) -> Vec<PodStatus> {
        let pods = self.pods.lock().await;
        pods.values()
            .map(|p| PodStatus {
                namespace: p.record.namespace.clone(),
                name: p.record.name.clone(),
                uid: p.record.uid.clone(),
                container_id: p.record.container_id.clone(),
                netns: p.record.netns.to_string(),
                ips: p.record.ips.clone(),
                redirect: p.record.redirect,
                listeners: p.listeners.addresses.clone(),
                listening: p.serving(),
                health_ports: p.ports.as_ref().map(|ports| ports.addresses.clone()).unwrap_or_default(),
                outbound: p.listeners.outbound.snapshot(),
                inbound: p.listeners.inbound.snapshot(),
                load: p.share.load.snapshot(),
                xds: p.xds.as_ref().map(|s| s.state.sync_status()),
                xds_detail: p.xds.as_ref().map(|s| s.state.sync_detail()),
                identity: p.identity.as_ref().map(|i| i.subscription.identity().to_string()),
            })
            .collect()
    }

    async fn capture_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, NodeError> {
        self.capture_slots.acquire().await.map_err(|e| NodeError::new("the agent is stopping", e))
    }

    /// Re-captures a pod from its record: rules that are still right are left as they are.
    async fn capture(&self, record: PodRecord) -> Result<CapturedPod, NodeError> {
        let ns = Netns::open(&record.netns).map_err(|e| NodeError::new(format!("cannot open netns {}", record.netns), e))?;
        self.capture_in(record, ns, Rules::Ensure).await
    }

    /// Binds and serves the pod's listeners and health ports, then installs its rules, both from this thread in
    /// the pod's netns: the pod is not running yet, so nothing meets the rules before the listeners. A hand-over
    /// to another thread would cost a wake-up as long as the nftables transaction itself.
    async fn capture_in(&self, mut record: PodRecord, ns: Netns, rules: Rules) -> Result<CapturedPod, NodeError> {
        let label = format!("{}/{}", record.namespace, record.name);
        let started = Instant::now();
        let _slot = self.capture_slot().await?;
        let queued = started.elapsed();
        // With a control plane, the listeners follow the configuration the pod's stream accepts; without
        // one, the pass-through configuration.
        let initial = match self.xds {
            Some(_) => None,
            None => Some(Arc::new(passthrough::snapshot(self.settings.connect_timeout))),
        };
        let (snapshot, config) = tokio::sync::watch::channel(initial);
        let served = config.clone();
        // Listeners first: a new pod whose listeners fail gets no rules, and a re-adopted one keeps its rules and
        // fails closed until it is re-created.
        let (listeners, ports, share) = self.open_listeners(&label, &record, &ns, config)?;
        let listening = started.elapsed();
        self.program_rules(&ns, &record.capture, rules)
            .map_err(|e| NodeError::new(format!("{label}: cannot install {} redirection", self.mode()), e))?;
        let rules_done = started.elapsed();
        tracing::debug!(pod = %label, ?queued, ?listening, rules = ?rules_done, total = ?started.elapsed(), "listeners and rules in place");
        record.redirect = self.redirector.mode();
        let identity = self.pod_identity(&record, &listeners, &share);
        let xds = self.start_xds(&record, snapshot, identity.as_ref(), &share);
        let pod = CapturedPod { record, netns: ns, listeners, xds, share, identity, ports, config: served };
        pod.follow_stream();
        Ok(pod)
    }

    /// Worker threads for a pod: the spare ones when they fit, else new ones.
    fn pod_threads(&self, workers: usize) -> std::io::Result<PodThreads> {
        let spare = self.spare().take_if(|t| t.workers() == workers.max(1));
        spare.map_or_else(|| PodThreads::start(workers), Ok)
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Option<PodThreads>> {
        self.spare.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts worker threads for the next pod in the background unless some are ready (called once a CNI request
    /// has been answered, so that starting them is off the next pod's ADD). They start a moment later: the
    /// runtime's next step for this pod, on this node's few CPUs, comes first.
    pub fn prepare_next_pod(self: &Arc<Self>) {
        if self.spare().is_some() {
            return;
        }
        let node = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(SPARE_THREADS_AFTER).await;
            tokio::task::spawn_blocking(move || {
                // Another request may have started them meanwhile.
                if node.spare().is_some() {
                    return;
                }
                match PodThreads::start(node.settings.pod_workers) {
                    Ok(threads) => *node.spare() = Some(threads),
                    Err(e) => tracing::warn!("cannot start worker threads ahead of the next pod: {e}"),
                }
            });
        });
    }

    /// Installs (or, for a re-adopted pod, ensures) the pod's rules on this thread; the runtime moves its other
    /// tasks off it meanwhile (rule programs can take milliseconds).
    fn program_rules(&self, ns: &Netns, plan: &PodCapture, rules: Rules) -> Result<(), CaptureError> {
        tokio::task::block_in_place(|| match rules {
            Rules::Install => self.redirector.install(ns, plan),
            Rules::Ensure => self.redirector.ensure(ns, plan),
        })
    }

    /// Binds the pod's listeners and, when `pod_health_ports` is on, its 15020 and 15021 (from the calling thread,
    /// inside the pod's netns), and serves them on the pod's worker threads.
    fn open_listeners(&self, label: &str, record: &PodRecord, ns: &Netns, config: SnapshotWatch) -> Result<(PodListeners, Option<PodPorts>, PodShare), NodeError> {
        let health_ports = self.settings.pod_health_ports;
        let (listeners, ports) = ns
            .with(|| {
                let ipv6 = netns::ipv6_enabled_here();
                (listener::bind_here(ipv6), health_ports.then(|| pod_ports::bind_here(ipv6)))
            })
            .map_err(|e| NodeError::new(format!("{label}: cannot enter the pod's netns"), e))?;
        let limits = record.limits.unwrap_or(self.settings.pod_limits);
        let workers = record.workers.unwrap_or(self.settings.pod_workers);
        let share = self
            .pod_threads(workers)
            .map(|threads| PodShare::new(threads, limits, Some(Arc::clone(&self.load))))
            .map_err(|e| NodeError::new(format!("{label}: cannot start the pod's worker threads"), e))?;
        let listeners = listeners
            .and_then(|sockets| listener::start(label.to_string(), ns.clone(), self.settings, config, &share, sockets))
            .map_err(|e| NodeError::new(format!("{label}: cannot create in-pod listeners"), e))?;
        let ports = ports.map(|sockets| self.start_ports(label, &listeners, &share, sockets)).transpose()?;
        Ok((listeners, ports, share))
    }

    /// Serves the pod's 15020 and 15021: ready at once without a control plane, otherwise once its stream has
    /// accepted clusters and listeners.
    fn start_ports(&self, label: &str, listeners: &PodListeners, share: &PodShare, sockets: std::io::Result<PortSockets>) -> Result<PodPorts, NodeError> {
        let readiness = match self.xds {
            Some(_) => Readiness::xds(),
            None => Readiness::Local,
        };
        let metrics = PodMetrics {
            istio: Arc::clone(&listeners.metrics),
            outbound: Arc::clone(&listeners.outbound),
            inbound: Arc::clone(&listeners.inbound),
            load: Arc::clone(&share.load),
            istio_version: self.xds.as_ref().map_or(DEFAULT_ISTIO_VERSION, PodXds::istio_version).to_string(),
        };
        sockets.and_then(|sockets| pod_ports::start(label.to_string(), Arc::new(readiness), metrics, share.handle(), sockets)).map_err(|e| {
            NodeError::new(
                format!("{label}: cannot serve the pod's health ports ({} and {})", pod_ports::STATUS_PORT, pod_ports::READINESS_PORT),
                format!("{e}; Istio reserves these ports: move the app off them, or set pod_health_ports to false"),
            )
        })
    }

    /// The pod's xDS stream, on the pod's own threads (one pod's configuration churn is translated there),
    /// presenting its workload certificate where the connection is TLS.
    fn start_xds(
        &self,
        record: &PodRecord,
        snapshot: tokio::sync::watch::Sender<Option<Arc<crate::proxy::snapshot::Snapshot>>>,
        identity: Option<&PodIdentity>,
        share: &PodShare,
    ) -> Option<PodStream> {
        let xds = self.xds.as_ref()?;
        let _on_pod_threads = share.handle().enter();
        let (state, task) = xds.start_as(record, snapshot, identity.map(|i| i.subscription.receiver()));
        Some(PodStream { state, task })
    }

    /// Subscribes the pod to its service account's certificate and serves it to the pod's TLS.
    fn pod_identity(&self, record: &PodRecord, listeners: &PodListeners, share: &PodShare) -> Option<PodIdentity> {
        let (manager, meta) = (self.identities.as_ref()?, record.meta.as_ref()?);
        match manager.pod_certificate(&record.namespace, &meta.service_account) {
            Ok(subscription) => {
                let pools = Arc::clone(&listeners.pools);
                let receiver = subscription.receiver();
                let follow = share.handle().spawn(async move { pools.tls().follow(receiver).await });
                Some(PodIdentity { subscription, follow })
            }
            Err(e) => {
                // Its TLS has no certificate: mTLS handshakes fail closed.
                tracing::error!(pod = %format!("{}/{}", record.namespace, record.name), "no workload identity: {e}");
                None
            }
        }
    }

    /// Removes the pod's rules (when its netns still exists) and stops its listeners.
    async fn release(&self, pod: CapturedPod) {
        // The semaphore is never closed; without a slot the rules are removed anyway.
        let _slot = self.capture_slot().await.ok();
        if netns::still_same(&pod.record.netns, pod.record.netns_id) {
            let redirector = Arc::clone(&self.redirector);
            let ns = pod.netns.clone();
            if let Err(e) = blocking(move || redirector.remove(&ns)).await {
                tracing::warn!(pod = %pod.label(), "cannot remove redirection: {e}");
            }
        }
        // Its listeners stop now; its established connections finish on its threads.
        let CapturedPod { listeners, xds, share, identity, ports, .. } = pod;
        drop((listeners, xds, identity, ports));
        share.retire(self.settings.drain_timeout);
    }

    async fn verify_rules(&self, ns: &Netns, plan: &PodCapture) -> Result<(), NodeError> {
        let redirector = Arc::clone(&self.redirector);
        let (ns, plan) = (ns.clone(), plan.clone());
        blocking(move || redirector.verify(&ns, &plan))
            .await
            .map_err(|e| NodeError::new(format!("{} redirection is not in place", self.mode()), e))
    }

    /// Writes the registry as `pods` are now (for callers that keep the pods lock anyway).
    async fn persist(&self, pods: &BTreeMap<Attachment, CapturedPod>) -> Result<(), NodeError> {
        self.flush(self.offer(pods)).await
    }

    /// Offers the registry content `pods` and the pods being captured make (under the pods lock, which orders
    /// the offers).
    fn offer(&self, pods: &BTreeMap<Attachment, CapturedPod>) -> u64 {
        let capturing = self.capturing();
        self.registry.offer(pods.values().map(|p| &p.record).chain(capturing.values()))
    }

    fn capturing(&self) -> std::sync::MutexGuard<'_, BTreeMap<Attachment, PodRecord>> {
        self.capturing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Removes the record of a capture that failed.
    async fn forget_capturing(&self, attachment: &Attachment) {
        let generation = {
            let _pods = self.pods.lock().await;
            self.capturing().remove(attachment);
            self.registry.remove(attachment)
        };
        if let Err(e) = self.flush(generation).await {
            tracing::warn!("{}: {}", e.msg, e.details);
        }
    }

    /// Waits until the offer `generation`, or a newer one, is on disk (without the pods lock: offers of a burst
    /// share one write).
    async fn flush(&self, generation: u64) -> Result<(), NodeError> {
        self.registry.flush(generation).await.map_err(|e| {
            NodeError::new("cannot persist the pod registry", format!("{}: {e}", self.registry.dir().path().display()))
        })
    }
}

/// How long after a CNI answer the spare worker threads for the next pod are started.
const SPARE_THREADS_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether a pod adds targets to the node's probe exemption.
fn has_probes(record: &PodRecord) -> bool {
    !ProbeTarget::of_pod(&record.ips, &record.capture.probe_ports).is_empty()
}

/// Two captures per core: each waits on rule programs about as long as it computes.
fn capture_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 2)
}

/// The API's pod for a record, when it is the same pod (same uid; repaired records carry the API's uid).
fn api_pod(kube: &KubeView, record: &PodRecord) -> Option<Arc<k8s_openapi::api::core::v1::Pod>> {
    kube.pod(&record.namespace, &record.name).filter(|p| record.uid.is_empty() || p.metadata.uid.as_deref() == Some(&record.uid))
}

/// A running pod of the API the agent does not know.
struct Unknown {
    namespace: String,
    name: String,
    uid: String,
    /// Never empty.
    ips: Vec<std::net::IpAddr>,
}

/// A pod of the API the agent was never shown whose sandbox is up (it has an address).
fn repair_candidate(pod: &k8s_openapi::api::core::v1::Pod, known: &HashSet<(String, String)>) -> Option<Unknown> {
    let (namespace, name) = (pod.metadata.namespace.clone()?, pod.metadata.name.clone()?);
    if known.contains(&(namespace.clone(), name.clone())) || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let (spec, status) = (pod.spec.as_ref()?, pod.status.as_ref()?);
    if spec.host_network == Some(true) || !matches!(status.phase.as_deref(), Some("Running" | "Pending")) {
        return None;
    }
    let ips: Vec<std::net::IpAddr> = status.pod_ips.iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
    if ips.is_empty() {
        return None;
    }
    Some(Unknown { namespace, name, uid: pod.metadata.uid.clone().unwrap_or_default(), ips })
}

/// Whether rules are put in place unconditionally (a new pod) or only where they differ (re-adoption).
#[derive(Debug, Clone, Copy)]
enum Rules {
    Install,
    Ensure,
}

/// Runs `f` on a blocking-pool thread, started now (not when the result is first awaited).
fn blocking<F>(f: F) -> impl std::future::Future<Output = Result<(), CaptureError>>
where
    F: FnOnce() -> Result<(), CaptureError> + Send + 'static,
{
    let task = tokio::task::spawn_blocking(f);
    async { task.await.map_err(|e| CaptureError(format!("capture task failed: {e}")))? }
}

/// `weft-agent cleanup`: removes every pod's rules, the eBPF pins and the registry. Returns a summary.
pub fn cleanup(cfg: &crate::config::agent::AgentConfig) -> Result<String, String> {
    use crate::capture::{iptables::Iptables, nftables::Nftables};
    let registry = RegistryDir::new(&cfg.state_dir).map_err(|e| format!("state dir {}: {e}", cfg.state_dir.display()))?;
    let records = registry.load().unwrap_or_else(|e| {
        tracing::warn!("{e}");
        Vec::new()
    });
    let mut cleaned = 0;
    for record in &records {
        let Ok(ns) = Netns::open(&record.netns) else { continue };
        if ns.id() != record.netns_id {
            continue;
        }
        let removed = match record.redirect {
            RedirectMode::Iptables => Iptables::detect(cfg.iptables_variant, None).and_then(|b| b.remove(&ns)),
            // eBPF enrolment goes with the pins below; its inbound rule is the nftables table.
            RedirectMode::Nftables | RedirectMode::Ebpf => Nftables::detect(None).and_then(|b| b.remove(&ns)),
        };
        match removed {
            Ok(()) => cleaned += 1,
            Err(e) => tracing::warn!(pod = %record.name, "cannot remove rules: {e}"),
        }
    }
    if let Some(source) = cfg.probe_source {
        if let Err(e) = HostProbes::new(cfg.redirect, cfg.iptables_variant, source, None).and_then(|p| p.remove()) {
            tracing::warn!("cannot remove the node's kubelet probe rules: {e}");
        }
    }
    if let Err(e) = registry.delete() {
        tracing::warn!("cannot remove the pod registry {}: {e}", registry.path().display());
    }
    crate::capture::ebpf::remove_pins(&cfg.ebpf.pin_path)
        .map_err(|e| format!("removing eBPF pins {}: {e}", cfg.ebpf.pin_path.display()))?;
    Ok(format!(
        "removed rules from {cleaned} of {} registered pod(s), the registry, and eBPF pins under {}",
        records.len(),
        cfg.ebpf.pin_path.display()
    ))
}
