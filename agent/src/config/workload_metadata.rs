//! Istio's workload metadata object: who a proxy serves (pod, namespace, workload and its kind, cluster, the
//! canonical service labels), as istio-proxy sends it to its peers in the TCP metadata exchange frame and the
//! `x-envoy-peer-metadata` header, and reads theirs. The local one is made once from the proxy's `Node` (the
//! bootstrap's, or the one weft presents to istiod for a captured pod); a peer's is read from what it sent.
//! The same reduction as istio-proxy's `convertStructToWorkloadMetadata` / `convertWorkloadMetadataToStruct`
//! applies to both, so only these fields ever travel.

use std::collections::BTreeMap;

use prost::Message;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use serde_json::Value as Json;

use super::bootstrap::Node;

/// The labels that travel (with a filter's `additional_labels`).
const KEPT_LABELS: [&str; 4] = ["service.istio.io/canonical-name", "service.istio.io/canonical-revision", "app", "version"];

/// istio-proxy rebuilds `OWNER` from the workload's kind and name under this prefix.
const OWNER_PREFIX: &str = "kubernetes://apis/apps/v1/namespaces/";

/// The kinds of workload istio-proxy recognises in `OWNER`; others are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Pod,
    Deployment,
    Job,
    CronJob,
}

impl WorkloadKind {
    fn suffix(self) -> &'static str {
        match self {
            WorkloadKind::Pod => "pod",
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::Job => "job",
            WorkloadKind::CronJob => "cronjob",
        }
    }

    /// The kind in an `OWNER` such as `kubernetes://apis/apps/v1/namespaces/shop/deployments/web` of workload
    /// `web`: the path segment before `s/<workload>`.
    fn of_owner(owner: &str, workload: &str) -> Option<WorkloadKind> {
        let head = owner.strip_suffix(workload)?.strip_suffix("s/")?;
        match head.rsplit('/').next()? {
            "pod" => Some(WorkloadKind::Pod),
            "deployment" => Some(WorkloadKind::Deployment),
            "job" => Some(WorkloadKind::Job),
            "cronjob" => Some(WorkloadKind::CronJob),
            _ => None,
        }
    }
}

/// The workload metadata of one side of a connection or request.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadMetadata {
    /// `NAME`: the pod.
    pub name: String,
    pub namespace: String,
    /// `WORKLOAD_NAME`: the deployment (or job, ...) the pod belongs to.
    pub workload_name: String,
    /// `CLUSTER_ID`.
    pub cluster_id: String,
    /// `OWNER`'s kind, when it is one istio-proxy recognises.
    pub kind: Option<WorkloadKind>,
    /// The labels that travel: the canonical service name and revision, `app`, `version`, and any additional
    /// labels asked for.
    pub labels: BTreeMap<String, String>,
}

impl WorkloadMetadata {
    /// From node metadata (proto3 JSON): non-string values count as absent, as in istio-proxy.
    pub fn from_node_metadata(metadata: &Json, additional_labels: &[String]) -> WorkloadMetadata {
        let text = |key: &str| metadata.get(key).and_then(Json::as_str).unwrap_or_default().to_string();
        let labels = metadata.get("LABELS").and_then(Json::as_object).into_iter().flatten();
        let labels = labels.filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)));
        WorkloadMetadata::from_fields(text("NAME"), text("NAMESPACE"), text("WORKLOAD_NAME"), text("CLUSTER_ID"), &text("OWNER"), labels, additional_labels)
    }

    /// From a peer's `google.protobuf.Struct`.
    pub fn from_struct(s: &Struct, additional_labels: &[String]) -> WorkloadMetadata {
        let text = |key: &str| string_of(s.fields.get(key)).to_string();
        let labels = match s.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(l)) => l.fields.iter().map(|(k, v)| (k.as_str(), string_of(Some(v)))).collect(),
            _ => Vec::new(),
        };
        WorkloadMetadata::from_fields(text("NAME"), text("NAMESPACE"), text("WORKLOAD_NAME"), text("CLUSTER_ID"), &text("OWNER"), labels.into_iter(), additional_labels)
    }

    fn from_fields<'a>(
        name: String,
        namespace: String,
        workload_name: String,
        cluster_id: String,
        owner: &str,
        labels: impl Iterator<Item = (&'a str, &'a str)>,
        additional_labels: &[String],
    ) -> WorkloadMetadata {
        let kept = |k: &str| KEPT_LABELS.contains(&k) || additional_labels.iter().any(|a| a == k);
        let labels = labels.filter(|(k, v)| kept(k) && !v.is_empty()).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let kind = WorkloadKind::of_owner(owner, &workload_name);
        WorkloadMetadata { name, namespace, workload_name, cluster_id, kind, labels }
    }

    /// `OWNER` as istio-proxy rebuilds it.
    pub fn owner(&self) -> Option<String> {
        self.kind.map(|k| format!("{OWNER_PREFIX}{}/{}s/{}", self.namespace, k.suffix(), self.workload_name))
    }

    /// The Struct sent to peers: the non-empty fields, `LABELS` always (possibly empty), `OWNER` when known.
    pub fn to_struct(&self) -> Struct {
        let mut fields = BTreeMap::new();
        for (key, value) in [("NAME", &self.name), ("NAMESPACE", &self.namespace), ("WORKLOAD_NAME", &self.workload_name), ("CLUSTER_ID", &self.cluster_id)] {
            if !value.is_empty() {
                fields.insert(key.to_string(), string(value));
            }
        }
        let labels = self.labels.iter().map(|(k, v)| (k.clone(), string(v))).collect();
        fields.insert("LABELS".to_string(), Value { kind: Some(Kind::StructValue(Struct { fields: labels })) });
        if let Some(owner) = self.owner() {
            fields.insert("OWNER".to_string(), string(&owner));
        }
        Struct { fields }
    }
}

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

fn string_of(v: Option<&Value>) -> &str {
    match v.and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => s,
        _ => "",
    }
}

/// What a peer told about itself: its node id and workload metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Peer {
    pub id: String,
    pub metadata: WorkloadMetadata,
}

/// This proxy's side: its node id and workload metadata, which both exchanges send, and its cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalWorkload {
    pub node_id: String,
    /// `node.cluster`: the local service name tracers report.
    pub cluster: String,
    pub metadata: WorkloadMetadata,
    /// `x-envoy-peer-metadata`: base64 of the metadata's Struct, serialized deterministically (prost writes a
    /// Struct's fields in key order).
    pub header: String,
}

impl LocalWorkload {
    pub fn from_node(node: &Node) -> LocalWorkload {
        let metadata = WorkloadMetadata::from_node_metadata(&node.metadata, &[]);
        let header = base64_encode(&metadata.to_struct().encode_to_vec());
        LocalWorkload { node_id: node.id.clone(), cluster: node.cluster.clone(), metadata, header }
    }
}

/// Standard base64 with padding (what istio-proxy writes in `x-envoy-peer-metadata`).
pub fn base64_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(DIGITS[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> Node {
        Node {
            id: "sidecar~10.0.0.7~web-1.shop~shop.svc.cluster.local".into(),
            cluster: "web.shop".into(),
            metadata: json!({"NAME": "web-1", "NAMESPACE": "shop", "WORKLOAD_NAME": "web", "CLUSTER_ID": "Kubernetes",
                "MESH_ID": "cluster.local", "INSTANCE_IPS": "10.0.0.7", "SERVICE_ACCOUNT": "web",
                "OWNER": "kubernetes://apis/apps/v1/namespaces/shop/deployments/web",
                "LABELS": {"app": "web", "version": "v1", "pod-template-hash": "abc", "service.istio.io/canonical-name": "web", "tier": "front"}}),
        }
    }

    #[test]
    fn the_local_struct_keeps_what_istio_proxy_keeps() {
        let local = LocalWorkload::from_node(&node());
        let s = local.metadata.to_struct();
        let keys: Vec<&str> = s.fields.keys().map(String::as_str).collect();
        assert_eq!(keys, ["CLUSTER_ID", "LABELS", "NAME", "NAMESPACE", "OWNER", "WORKLOAD_NAME"]);
        assert_eq!(string_of(s.fields.get("OWNER")), "kubernetes://apis/apps/v1/namespaces/shop/deployments/web");
        let labels: Vec<&String> = local.metadata.labels.keys().collect();
        assert_eq!(labels, ["app", "service.istio.io/canonical-name", "version"]);
        // The header is the Struct's serialization, and reads back as the same metadata.
        let back = Struct::decode(super::super::secret::base64(&local.header).unwrap().as_slice()).unwrap();
        assert_eq!(WorkloadMetadata::from_struct(&back, &[]), local.metadata);
        assert_eq!(local.node_id, "sidecar~10.0.0.7~web-1.shop~shop.svc.cluster.local");
    }

    #[test]
    fn owners_of_other_kinds_and_missing_fields_are_left_out() {
        let m = WorkloadMetadata::from_node_metadata(&json!({"NAME": "p", "WORKLOAD_NAME": "rs", "OWNER": "kubernetes://apis/apps/v1/namespaces/n/replicasets/rs", "CLUSTER_ID": 7}), &[]);
        assert_eq!((m.kind, m.cluster_id.as_str()), (None, ""));
        let s = m.to_struct();
        assert!(!s.fields.contains_key("OWNER") && !s.fields.contains_key("NAMESPACE") && s.fields.contains_key("LABELS"));
        let cron = WorkloadMetadata::from_node_metadata(&json!({"WORKLOAD_NAME": "nightly", "NAMESPACE": "n", "OWNER": "kubernetes://apis/batch/v1/namespaces/n/cronjobs/nightly"}), &[]);
        assert_eq!(cron.owner().as_deref(), Some("kubernetes://apis/apps/v1/namespaces/n/cronjobs/nightly"));
        let extra = WorkloadMetadata::from_node_metadata(&node().metadata, &["tier".to_string()]);
        assert_eq!(extra.labels.get("tier").map(String::as_str), Some("front"));
    }

    #[test]
    fn base64_round_trips_through_the_decoder() {
        for text in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            let encoded = base64_encode(text.as_bytes());
            assert_eq!(encoded.len() % 4, 0);
            assert_eq!(super::super::secret::base64(&encoded).unwrap(), text.as_bytes());
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
    }
}
