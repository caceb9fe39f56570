//! The agent's node, run inside the test process: the same `Node`, redirection backends, CNI socket and
//! in-pod listeners as `weft-agent run`, on a runtime of the test's own, so that a test can call what the
//! Kubernetes pod watcher will call (`Node::recapture` with a pod's plan) without a control surface on the
//! agent that only tests would use. The node's own rules (the kubelet probe exemption) go into the cluster's
//! node netns, never into the test machine's.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use weft_agent::capture::ebpf::EbpfSettings;
use weft_agent::capture::iptables::Variant;
use weft_agent::capture::netns::{self as agent_netns, Netns, NetnsPath};
use weft_agent::capture::probes::HostProbes;
use weft_agent::capture::{self, PodCapture, RedirectMode};
use weft_agent::cni_server::registry::RegistryDir;
use weft_agent::cni_server::CniSocket;
use weft_agent::node::{Node, PodRef};
use weft_agent::proxy::ProxySettings;

use crate::cluster::{Cluster, Pod};
use crate::util::HarnessError;
use crate::{bin_path, wait_for};

pub struct LocalAgent {
    pub node: Arc<Node>,
    runtime: Option<tokio::runtime::Runtime>,
    socket: Arc<CniSocket>,
    pins: PathBuf,
}

impl LocalAgent {
    /// A node for `cluster` in redirect `mode`, serving the cluster's CNI socket; `probe_source` turns on the
    /// kubelet probe exemption with its node rules in the cluster's node netns.
    pub fn start(cluster: &Cluster, mode: &str, probe_source: Option<Ipv4Addr>) -> Result<LocalAgent, HarnessError> {
        fn err(what: &'static str) -> impl Fn(String) -> HarnessError {
            move |e| HarnessError(format!("{what}: {e}"))
        }
        agent_netns::init_host_netns().map_err(|e| HarnessError(format!("recording the test's netns: {e}")))?;
        let mode: RedirectMode = mode.parse().map_err(err("redirect mode"))?;
        // The eBPF backend starts its log reader, and the CNI socket registers with the reactor.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let _in_runtime = runtime.enter();
        let pins = PathBuf::from("/sys/fs/bpf").join(format!("weft-test-local-{}", cluster.id()));
        let ebpf = EbpfSettings {
            object: (mode == RedirectMode::Ebpf).then(|| bin_path("weft-ebpf")).transpose()?,
            pin_path: pins.clone(),
            sockmap: false,
        };
        let redirector =
            capture::redirector(mode, Variant::Auto, &ebpf, probe_source).map_err(|e| err("capture backend")(e.0))?;
        let registry = RegistryDir::new(&cluster.work_dir().join("state"))?;
        let mut node = Node::new(Arc::from(redirector), registry, ProxySettings::default(), None);
        if let Some(source) = probe_source {
            let path = NetnsPath::try_from(cluster.node().path().to_string_lossy().into_owned()).map_err(err("node netns"))?;
            let node_ns = Netns::open(&path)?;
            let probes = HostProbes::new(mode, Variant::Auto, source, Some(node_ns)).map_err(|e| err("probe rules")(e.0))?;
            node = node.with_host_probes(probes);
        }
        let node = Arc::new(node);
        let socket_path = cluster.agent_socket().ok_or_else(|| HarnessError::new("the cluster has no weft-cni entry"))?;
        let socket = Arc::new(CniSocket::bind(socket_path)?);
        runtime.spawn(Arc::clone(&socket).serve(Arc::clone(&node)));
        drop(_in_runtime);
        Ok(LocalAgent { node, runtime: Some(runtime), socket, pins })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match &self.runtime {
            Some(rt) => rt.block_on(f),
            None => unreachable!("the runtime lives until drop"),
        }
    }

    /// Re-adopts the pods of the persisted registry, as `weft-agent run` does at start; returns how many
    /// were adopted and dropped.
    pub fn adopt(&self) -> Result<(usize, usize), HarnessError> {
        self.block_on(self.node.adopt()).map_err(HarnessError)
    }

    /// Applies `plan` to `pod`, as the pod watcher does when the pod's annotations change.
    pub fn recapture(&self, pod: &Pod, plan: PodCapture) -> Result<String, HarnessError> {
        self.block_on(self.node.recapture(PodRef::Uid(&pod.uid), plan)).map_err(|e| HarnessError(format!("{}: {}", e.msg, e.details)))
    }

    /// The node's status entry of `pod` (as `/status` shows it), if captured.
    pub fn pod_status(&self, pod: &Pod) -> Option<Value> {
        let pods = self.block_on(self.node.status());
        let status = pods.into_iter().find(|p| p.namespace == pod.namespace && p.name == pod.name)?;
        serde_json::to_value(status).ok()
    }

    /// Waits until `pod`'s status satisfies `pred` (counters move when connections close).
    pub fn wait_pod(&self, pod: &Pod, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let found = wait_for(what, Duration::from_secs(10), || match self.pod_status(pod) {
            Some(s) if pred(&s) => Ok(s),
            other => Err(format!("{other:?}")),
        });
        found.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Closes every pod's in-pod listeners (their rules stay: captured connections are refused).
    pub fn stop_listening(&self) {
        self.block_on(self.node.stop_listening());
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        self.socket.remove_if_ours();
        if let Some(rt) = self.runtime.take() {
            rt.block_on(self.node.stop_listening());
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        // Unpinning detaches this node's programs from the cgroup root.
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}
