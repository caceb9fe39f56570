//! Per-pod xDS streams for `weft-agent run`: each captured pod asks the control plane for its configuration
//! with the node identity its Istio sidecar would have had, so istiod serves it exactly what it would serve
//! that sidecar. Each stream has its own HTTP/2 connection, as each sidecar has, so one pod's configuration
//! storm queues only on its own connection; identical resources are held once (see `intern`). The connection
//! is plaintext (istiod's 15010) or, as istio-agent's, TLS to istiod's secured port with the agent's token.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{client, Sink, XdsState};
use crate::proxy::snapshot::Snapshot;
use crate::cni_server::registry::PodRecord;
use crate::config::agent::XdsSettings;
use crate::identity::grpc::{self, AuthChannel};
use crate::identity::manager::CertificateWatch;
use crate::config::bootstrap::{Ads, Bootstrap, Node};

/// Where the node's pods get their configuration.
pub struct PodXds {
    settings: XdsSettings,
}

impl PodXds {
    pub fn new(settings: XdsSettings) -> Result<PodXds, String> {
        let xds = PodXds { settings };
        xds.channel(None)?;
        Ok(xds)
    }

    /// The `ISTIO_VERSION` pods declare.
    pub fn istio_version(&self) -> &str {
        &self.settings.istio_version
    }

    /// A new lazily connected channel, as the settings say; over TLS presenting `identity`'s certificate.
    fn channel(&self, identity: Option<CertificateWatch>) -> Result<AuthChannel, String> {
        let address = self.settings.address.to_string();
        match &self.settings.tls {
            Some(tls) => grpc::istiod_channel(&address, tls, identity),
            None => grpc::plaintext_channel(&address),
        }
    }

    /// Starts the pod's stream on a connection of its own (connected on first use, reconnected by itself), on
    /// the runtime the caller is in; its accepted configurations go to `snapshot`. Dropping (aborting) the
    /// handle ends it.
    pub fn start(&self, pod: &PodRecord, snapshot: watch::Sender<Option<Arc<Snapshot>>>) -> (Arc<XdsState>, JoinHandle<()>) {
        self.start_as(pod, snapshot, None)
    }

    /// [`PodXds::start`], the TLS connection presenting the pod's workload certificate (`identity`) as
    /// istio-agent does: istiod's xDS identity check wants an identity of the pod's namespace, which the
    /// agent's own token is not. Until the certificate is there the stream is refused and retried.
    pub fn start_as(
        &self,
        pod: &PodRecord,
        snapshot: watch::Sender<Option<Arc<Snapshot>>>,
        identity: Option<CertificateWatch>,
    ) -> (Arc<XdsState>, JoinHandle<()>) {
        let bootstrap = Bootstrap {
            node: sidecar_node(pod, &self.settings),
            admin: None,
            listeners: Vec::new(),
            clusters: Vec::new(),
            secrets: Vec::new(),
            ads: Some(Ads { api: self.settings.api, cluster: String::new() }),
            raw: serde_json::Value::Null,
        };
        let state = XdsState::new(bootstrap, Sink::Pod(snapshot));
        let task = match self.channel(identity) {
            Ok(channel) => tokio::spawn(client::run_on(Arc::clone(&state), self.settings.api, channel)),
            // Checked in `new`: the same settings make the same channel.
            Err(e) => tokio::spawn(async move { tracing::error!("xDS channel: {e}") }),
        };
        (state, task)
    }
}

/// The pod's labels with Istio's canonical service labels, which the sidecar injector adds to every pod it
/// injects (weft injects nothing): the name from `app.kubernetes.io/name`, `app` or the workload, the revision
/// from `app.kubernetes.io/version`, `version` or `latest`. Labels the pod sets itself are kept.
fn with_canonical_labels(labels: &std::collections::BTreeMap<String, String>, workload: &str) -> std::collections::BTreeMap<String, String> {
    let first = |keys: [&str; 2], fallback: &str| keys.iter().find_map(|k| labels.get(*k)).map_or(fallback, String::as_str).to_string();
    let mut out = labels.clone();
    out.entry("service.istio.io/canonical-name".into()).or_insert_with(|| first(["app.kubernetes.io/name", "app"], workload));
    out.entry("service.istio.io/canonical-revision".into()).or_insert_with(|| first(["app.kubernetes.io/version", "version"], "latest"));
    out
}

/// The identity an Istio sidecar of this pod presents: `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` and
/// the metadata istiod reads. Labels, the service account and the workload come from the Kubernetes API
/// (`pod.meta`); without it (no API configured) they are left out rather than guessed.
pub fn sidecar_node(pod: &PodRecord, settings: &XdsSettings) -> Node {
    let ip = pod.ips.iter().find(|ip| matches!(ip, IpAddr::V4(_))).or(pod.ips.first());
    let ip = ip.map_or_else(|| "0.0.0.0".to_string(), IpAddr::to_string);
    let ips: Vec<String> = pod.ips.iter().map(IpAddr::to_string).collect();
    let workload = pod.meta.as_ref().map_or(pod.name.as_str(), |m| m.workload.name.as_str());
    let mut metadata = json!({
        "NAMESPACE": pod.namespace,
        "NAME": pod.name,
        "INSTANCE_IPS": ips.join(","),
        "INTERCEPTION_MODE": "REDIRECT",
        "ISTIO_VERSION": settings.istio_version,
        "WORKLOAD_NAME": workload,
        "CLUSTER_ID": settings.cluster_id,
        "MESH_ID": settings.mesh_id,
    });
    if let Some(meta) = &pod.meta {
        metadata["SERVICE_ACCOUNT"] = json!(meta.service_account);
        metadata["LABELS"] = json!(with_canonical_labels(&meta.labels, &meta.workload.name));
        // As istio-agent: kubernetes://apis/<group/version>/namespaces/<ns>/<plural kind>/<name>.
        let w = &meta.workload;
        let api = if w.api_version.contains('/') { format!("apis/{}", w.api_version) } else { format!("api/{}", w.api_version) };
        metadata["OWNER"] = json!(format!("kubernetes://{api}/namespaces/{}/{}s/{}", pod.namespace, w.kind.to_ascii_lowercase(), w.name));
    }
    Node { id: format!("sidecar~{ip}~{}.{}~{}.svc.cluster.local", pod.name, pod.namespace, pod.namespace), cluster: format!("{workload}.{}", pod.namespace), metadata }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_labels_are_added_as_the_injector_adds_them() {
        let labels: std::collections::BTreeMap<String, String> = [("app".to_string(), "web".to_string()), ("version".to_string(), "v2".to_string())].into();
        let out = with_canonical_labels(&labels, "web-deploy");
        assert_eq!(out["service.istio.io/canonical-name"], "web");
        assert_eq!(out["service.istio.io/canonical-revision"], "v2");
        let bare = with_canonical_labels(&Default::default(), "web-deploy");
        assert_eq!((bare["service.istio.io/canonical-name"].as_str(), bare["service.istio.io/canonical-revision"].as_str()), ("web-deploy", "latest"));
        let own: std::collections::BTreeMap<String, String> = [("service.istio.io/canonical-name".to_string(), "shop".to_string())].into();
        assert_eq!(with_canonical_labels(&own, "w")["service.istio.io/canonical-name"], "shop", "the pod's own label wins");
    }
}
