//! The node's captured pods: for each attachment, its netns, its in-pod listeners and its redirection rules,
//! kept in step with the persisted registry. The CNI server and the start-up adoption drive it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Mutex;
use weft_cni::protocol::{Attachment, PodSandbox};

use crate::capture::netns::{self, Netns, NetnsPath};
use crate::capture::probes::{HostProbes, ProbeTarget};
use crate::capture::{CaptureError, PodCapture, RedirectMode, Redirector};
use crate::cni_server::registry::{PodRecord, RegistryFile};
use crate::proxy::listener::{self, PodListeners};
use crate::proxy::passthrough;
use crate::proxy::pod_share::{LoadSnapshot, NodeLoad, PodShare};
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
}

/// The agent's pods. Control-path only: one lock serialises CNI operations (rare, each a few milliseconds);
/// the data path holds its own `Arc`s and never takes it.
pub struct Node {
    redirector: Arc<dyn Redirector>,
    registry: RegistryFile,
    settings: ProxySettings,
    xds: Option<PodXds>,
    pods: Mutex<BTreeMap<Attachment, CapturedPod>>,
    /// Connections and requests of all pods together, against `node_max_connections` and `node_max_requests`.
    load: Arc<NodeLoad>,
    /// The node half of the kubelet probe exemption, and the targets it was last given.
    probes: Option<Arc<HostProbes>>,
    probe_targets: std::sync::Mutex<Option<Vec<ProbeTarget>>>,
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
    pub outbound: ListenerSnapshot,
    pub inbound: ListenerSnapshot,
    /// The pod's share of the proxy: connections, requests in flight, bytes and CPU time of its threads.
    pub load: LoadSnapshot,
    /// xDS sync status per type (CDS, EDS, LDS, RDS), when the agent has a control plane.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xds: Option<std::collections::BTreeMap<&'static str, &'static str>>,
}

impl Node {
    pub fn new(redirector: Arc<dyn Redirector>, registry: RegistryFile, settings: ProxySettings, xds: Option<PodXds>) -> Node {
        let load = NodeLoad::new(settings.node_max_connections, settings.node_max_requests);
        Node {
            redirector,
            registry,
            settings,
            xds,
            pods: Mutex::new(BTreeMap::new()),
            load,
            probes: None,
            probe_targets: std::sync::Mutex::new(None),
        }
    }

    /// Exempts kubelet's probes of captured pods from inbound capture (see `capture::probes`).
    pub fn with_host_probes(mut self, probes: HostProbes) -> Node {
        self.probes = Some(Arc::new(probes));
        self
    }

    /// The xDS state of pod `namespace/name`, when the agent has a control plane.
    pub async fn pod_xds(&self, namespace: &str, name: &str) -> Option<Arc<XdsState>> {
        let pods = self.pods.lock().await;
        let pod = pods.values().find(|p| p.record.namespace == namespace && p.record.name == name)?;
        pod.xds.as_ref().map(|s| Arc::clone(&s.state))
    }

    pub fn mode(&self) -> RedirectMode {
        self.redirector.mode()
    }

    /// Backend details (eBPF pins, adopted links) for the status endpoint.
    pub fn capture_status(&self) -> serde_json::Value {
        self.redirector.status()
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
        self.persist(&pods).map_err(|e| e.details)?;
        self.sync_probes(&pods).await;
        Ok((adopted, dropped))
    }

    /// CNI ADD: capture the pod with `capture`; returns once its listeners and rules are in place. A plan the
    /// backend cannot honour is refused before anything is touched.
    pub async fn add(&self, sandbox: PodSandbox, capture: PodCapture) -> Result<String, NodeError> {
        self.redirector.check(&capture).map_err(|e| NodeError::new(format!("cannot capture {}/{}", sandbox.namespace, sandbox.name), e))?;
        let path = NetnsPath::try_from(sandbox.netns.clone()).map_err(|e| NodeError::new("invalid CNI_NETNS", e))?;
        let ns = Netns::open(&path).map_err(|e| NodeError::new(format!("cannot open netns {path}"), e))?;
        let attachment = Attachment { container_id: sandbox.container_id.clone(), ifname: sandbox.ifname.clone() };
        let mut pods = self.pods.lock().await;
        if let Some(existing) = pods.get(&attachment) {
            if existing.record.netns_id == ns.id() && existing.listeners.healthy() {
                self.verify_rules(&existing.netns, &existing.record.capture).await?;
                return Ok(format!("{} already captured", existing.label()));
            }
        }
        if let Some(stale) = pods.remove(&attachment) {
            self.release(stale).await;
        }
        let record = PodRecord {
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
            capture,
        };
        let pod = self.capture_in(record, ns, Rules::Install).await?;
        let label = pod.label();
        pods.insert(attachment.clone(), pod);
        if let Err(e) = self.persist(&pods) {
            // Undo, so that what runs and what a restarted agent would re-adopt never disagree.
            if let Some(pod) = pods.remove(&attachment) {
                self.release(pod).await;
            }
            return Err(e);
        }
        self.sync_probes(&pods).await;
        tracing::info!(pod = %label, mode = %self.redirector.mode(), "captured pod");
        Ok(format!("{label} captured ({})", self.redirector.mode()))
    }

    /// CNI DEL: stop capturing. Unknown attachments succeed.
    pub async fn del(&self, attachment: &Attachment) -> Result<String, NodeError> {
        let mut pods = self.pods.lock().await;
        let Some(pod) = pods.remove(attachment) else {
            return Ok(format!("{} not captured", attachment.container_id));
        };
        let label = pod.label();
        self.release(pod).await;
        self.persist(&pods)?;
        self.sync_probes(&pods).await;
        tracing::info!(pod = %label, "released pod");
        Ok(format!("{label} released"))
    }

    /// CNI CHECK: registered, listeners running, rules exactly in place.
    pub async fn check(&self, attachment: &Attachment) -> Result<String, NodeError> {
        let pods = self.pods.lock().await;
        let pod = pods.get(attachment).ok_or_else(|| {
            NodeError::new(
                format!("container {} ({}) is not captured", attachment.container_id, attachment.ifname),
                "the agent has no record of this attachment; re-create the pod so that CNI ADD runs again",
            )
        })?;
        if !netns::still_same(&pod.record.netns, pod.record.netns_id) {
            return Err(NodeError::new(format!("{}: netns {} is gone", pod.label(), pod.record.netns), ""));
        }
        if !pod.listeners.healthy() {
            return Err(NodeError::new(format!("{}: in-pod listeners stopped", pod.label()), "see the agent log"));
        }
        self.verify_rules(&pod.netns, &pod.record.capture).await?;
        Ok(format!("{} captured", pod.label()))
    }

    /// CNI GC: release every attachment the runtime no longer knows.
    pub async fn gc(&self, valid: &[Attachment]) -> Result<String, NodeError> {
        let valid: HashSet<&Attachment> = valid.iter().collect();
        let mut pods = self.pods.lock().await;
        let stale: Vec<Attachment> = pods.keys().filter(|a| !valid.contains(a)).cloned().collect();
        for attachment in &stale {
            if let Some(pod) = pods.remove(attachment) {
                tracing::info!(pod = %pod.label(), "garbage-collected pod");
                self.release(pod).await;
            }
        }
        self.persist(&pods)?;
        self.sync_probes(&pods).await;
        Ok(format!("released {} stale attachment(s)", stale.len()))
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
        if let Err(e) = self.persist(&pods) {
            self.restore_plans(&mut pods, previous).await;
            return Err(e);
        }
        self.sync_probes(&pods).await;
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
    async fn sync_probes(&self, pods: &BTreeMap<Attachment, CapturedPod>) {
        let Some(probes) = self.probes.clone() else { return };
        let mut targets: Vec<ProbeTarget> =
            pods.values().flat_map(|p| ProbeTarget::of_pod(&p.record.ips, &p.record.capture.probe_ports)).collect();
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
            pod.listeners.close();
        }
    }

    /// Established proxied connections across all pods.
    pub async fn active_connections(&self) -> u64 {
        self.pods.lock().await.values().map(|p| p.listeners.active()).sum()
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
                listening: p.listeners.healthy(),
                outbound: p.listeners.outbound.snapshot(),
                inbound: p.listeners.inbound.snapshot(),
                load: p.share.load.snapshot(),
                xds: p.xds.as_ref().map(|s| s.state.sync_status()),
            })
            .collect()
    }

    /// Re-captures a pod from its record: rules that are still right are left as they are.
    async fn capture(&self, record: PodRecord) -> Result<CapturedPod, NodeError> {
        let ns = Netns::open(&record.netns).map_err(|e| NodeError::new(format!("cannot open netns {}", record.netns), e))?;
        self.capture_in(record, ns, Rules::Ensure).await
    }

    /// Listeners first, then rules: the rules never point at a port nobody listens on.
    async fn capture_in(&self, mut record: PodRecord, ns: Netns, rules: Rules) -> Result<CapturedPod, NodeError> {
        let label = format!("{}/{}", record.namespace, record.name);
        let started = Instant::now();
        // With a control plane, the listeners follow the configuration the pod's stream accepts; without
        // one, the pass-through configuration.
        let initial = match self.xds {
            Some(_) => None,
            None => Some(Arc::new(passthrough::snapshot(self.settings.connect_timeout))),
        };
        let (snapshot, config) = tokio::sync::watch::channel(initial);
        let share = PodShare::new(self.settings.pod_workers, self.settings.pod_limits, Some(Arc::clone(&self.load)))
            .map_err(|e| NodeError::new(format!("{label}: cannot start the pod's worker threads"), e))?;
        let listeners = listener::start(label.clone(), ns.clone(), self.settings, config, &share)
            .await
            .map_err(|e| NodeError::new(format!("{label}: cannot create in-pod listeners"), e))?;
        let listening = started.elapsed();
        let redirector = Arc::clone(&self.redirector);
        let (rules_ns, plan) = (ns.clone(), record.capture.clone());
        blocking(move || match rules {
            Rules::Install => redirector.install(&rules_ns, &plan),
            Rules::Ensure => redirector.ensure(&rules_ns, &plan),
        })
        .await
        .map_err(|e| NodeError::new(format!("{label}: cannot install {} redirection", self.mode()), e))?;
        tracing::debug!(pod = %label, ?listening, total = ?started.elapsed(), "listeners and rules in place");
        record.redirect = self.redirector.mode();
        let xds = self.xds.as_ref().map(|x| {
            // One pod's configuration churn is translated on its own threads.
            let _on_pod_threads = share.handle().enter();
            let (state, task) = x.start(&record, snapshot);
            PodStream { state, task }
        });
        Ok(CapturedPod { record, netns: ns, listeners, xds, share })
    }

    /// Removes the pod's rules (when its netns still exists) and stops its listeners.
    async fn release(&self, pod: CapturedPod) {
        if netns::still_same(&pod.record.netns, pod.record.netns_id) {
            let redirector = Arc::clone(&self.redirector);
            let ns = pod.netns.clone();
            if let Err(e) = blocking(move || redirector.remove(&ns)).await {
                tracing::warn!(pod = %pod.label(), "cannot remove redirection: {e}");
            }
        }
        // Its listeners stop now; its established connections finish on its threads.
        let CapturedPod { listeners, xds, share, .. } = pod;
        drop((listeners, xds));
        share.retire(self.settings.drain_timeout);
    }

    async fn verify_rules(&self, ns: &Netns, plan: &PodCapture) -> Result<(), NodeError> {
        let redirector = Arc::clone(&self.redirector);
        let (ns, plan) = (ns.clone(), plan.clone());
        blocking(move || redirector.verify(&ns, &plan))
            .await
            .map_err(|e| NodeError::new(format!("{} redirection is not in place", self.mode()), e))
    }

    fn persist(&self, pods: &BTreeMap<Attachment, CapturedPod>) -> Result<(), NodeError> {
        let records: Vec<PodRecord> = pods.values().map(|p| p.record.clone()).collect();
        self.registry.store(&records).map_err(|e| {
            NodeError::new("cannot persist the pod registry", format!("{}: {e}", self.registry.path().display()))
        })
    }
}

/// Whether rules are put in place unconditionally (a new pod) or only where they differ (re-adoption).
#[derive(Debug, Clone, Copy)]
enum Rules {
    Install,
    Ensure,
}

async fn blocking<F>(f: F) -> Result<(), CaptureError>
where
    F: FnOnce() -> Result<(), CaptureError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| CaptureError(format!("capture task failed: {e}")))?
}

/// `weft-agent cleanup`: removes every pod's rules, the eBPF pins and the registry. Returns a summary.
pub fn cleanup(cfg: &crate::config::agent::AgentConfig) -> Result<String, String> {
    use crate::capture::{iptables::Iptables, nftables::Nftables};
    let registry = RegistryFile::new(&cfg.state_dir).map_err(|e| format!("state dir {}: {e}", cfg.state_dir.display()))?;
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
    let _ = std::fs::remove_file(registry.path());
    crate::capture::ebpf::remove_pins(&cfg.ebpf.pin_path)
        .map_err(|e| format!("removing eBPF pins {}: {e}", cfg.ebpf.pin_path.display()))?;
    Ok(format!(
        "removed rules from {cleaned} of {} registered pod(s), the registry, and eBPF pins under {}",
        records.len(),
        cfg.ebpf.pin_path.display()
    ))
}
