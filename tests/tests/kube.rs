//! The Kubernetes side against a real API server (tests/src/kube.rs: etcd and kube-apiserver built from their Go
//! modules, running in the node's namespace). The test plays kubelet: Pod objects bound to the node, sandboxes
//! made by libcni (weft-cni's ADD included), status written with the sandbox's address. The agent runs with
//! `--node-name` and a kubeconfig whose token is the DaemonSet's ServiceAccount, bound to deploy/'s ClusterRole.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use weft_tests::agent::{Agent, ADMIN};
use weft_tests::ca_server::{CaServer, CLUSTER_ID, SERVER_NAME};
use weft_tests::kube::KubeApi;
use weft_tests::traffic::{echo, EchoServer};
use weft_tests::xds_server::XdsServer;
use weft_tests::{bin_path, wait_for, Cluster, ClusterOptions, Pod, WeftEntry};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);

/// One API server at a time: each is a few hundred MB and busy on two cores, and the clusters' pod subnets are
/// the same (the repair test finds a pod by its address among the machine's namespaces).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn cluster(test: &str, entry: WeftEntry) -> (Cluster, KubeApi) {
    let cluster = Cluster::with_options(test, ClusterOptions::with_weft(entry)).unwrap();
    let api = KubeApi::start(cluster.node()).unwrap();
    (cluster, api)
}

fn entry() -> WeftEntry {
    WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock")
}

fn agent(cluster: &Cluster, api: &KubeApi, extra: &[&str]) -> Agent {
    let kubeconfig = api.agent_kubeconfig().unwrap();
    let mut args = vec!["--node-name", cluster.id(), "--kubeconfig", kubeconfig.to_str().unwrap()];
    args.extend_from_slice(extra);
    Agent::start_with_args(cluster, "iptables", ADMIN, &args).unwrap()
}

/// Waits until the pod's `weft.dev/status` annotation starts with `prefix`; returns it.
fn status_annotation(api: &KubeApi, ns: &str, name: &str, prefix: &str) -> String {
    wait_for(&format!("{ns}/{name} annotated {prefix:?}"), WAIT, || {
        let pod = api.get_pod(ns, name).map_err(|e| e.to_string())?;
        match pod["metadata"]["annotations"]["weft.dev/status"].as_str() {
            Some(s) if s.starts_with(prefix) => Ok(s.to_string()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap()
}

/// Waits until the agent does (or does not) capture `ns/name`.
fn captured(agent: &Agent, ns: &str, name: &str, want: bool) -> Option<Value> {
    wait_for(&format!("{ns}/{name} captured={want}"), WAIT, || match agent.pod_status(ns, name) {
        Ok(s) if s.is_some() == want => Ok(s),
        Ok(s) => Err(format!("{s:?}")),
        Err(e) => Err(e.to_string()),
    })
    .unwrap()
}

fn outbound_connections(agent: &Agent, pod: &Pod) -> u64 {
    agent.pod_status(&pod.namespace, &pod.name).unwrap().map_or(0, |s| s["outbound"]["accepted"].as_u64().unwrap_or(0))
}

fn assert_echo(from: &Pod, to: SocketAddr) {
    let back = echo(&from.netns, to, b"ping").unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.name));
    assert_eq!(back, b"ping");
}

#[test]
fn capture_follows_istio_labels_live() {
    let _serial = serial();
    let (cluster, api) = cluster("kcap", entry());
    api.create_namespace("mesh", json!({"istio-injection": "enabled"})).unwrap();
    api.create_namespace("plain", json!({})).unwrap();
    let agent = agent(&cluster, &api, &[]);

    let a = api.run_pod(&cluster, "mesh", "a", json!({"labels": {"app": "a"}}), json!({})).unwrap();
    let b = api.run_pod(&cluster, "plain", "b", json!({}), json!({})).unwrap();
    let c = api.run_pod(&cluster, "mesh", "c", json!({"labels": {"sidecar.istio.io/inject": "false"}}), json!({})).unwrap();
    captured(&agent, "mesh", "a", true);
    assert!(agent.pod_status("plain", "b").unwrap().is_none(), "b's namespace has no injection label");
    assert!(agent.pod_status("mesh", "c").unwrap().is_none(), "c opted out");
    assert_eq!(status_annotation(&api, "mesh", "a", "captured"), "captured (iptables): namespace label istio-injection=enabled");
    status_annotation(&api, "plain", "b", "not captured: not selected");
    assert_eq!(status_annotation(&api, "mesh", "c", "not captured"), "not captured: pod sidecar.istio.io/inject=false");

    let _servers: Vec<EchoServer> = [&a, &b, &c].iter().map(|p| EchoServer::start(&p.netns, PORT).unwrap()).collect();
    let before = outbound_connections(&agent, &a);
    assert_echo(&a, c.addr(PORT));
    wait_for("a's outbound connection counted", WAIT, || {
        (outbound_connections(&agent, &a) > before).then_some(()).ok_or_else(|| "not yet".to_string())
    })
    .unwrap();

    // The namespace joins the mesh: b is captured where it runs, without a restart.
    api.patch_namespace("plain", json!({"labels": {"istio-injection": "enabled"}})).unwrap();
    captured(&agent, "plain", "b", true);
    status_annotation(&api, "plain", "b", "captured (iptables): namespace label istio-injection=enabled");
    let before = outbound_connections(&agent, &b);
    assert_echo(&b, a.addr(PORT));
    wait_for("b's traffic through the proxy", WAIT, || (outbound_connections(&agent, &b) > before).then_some(()).ok_or_else(|| "not yet".to_string())).unwrap();

    // Istio's traffic annotation, live: b's connections to c bypass the proxy.
    let range = format!("{}/32", c.ip);
    api.patch_pod("plain", "b", json!({"annotations": {"traffic.sidecar.istio.io/excludeOutboundIPRanges": range}})).unwrap();
    wait_for("b's plan to exclude c", WAIT, || {
        let status = agent.pod_status("plain", "b").map_err(|e| e.to_string())?;
        let before = outbound_connections(&agent, &b);
        assert_echo(&b, c.addr(PORT));
        std::thread::sleep(Duration::from_millis(100));
        match (status, outbound_connections(&agent, &b)) {
            (Some(_), after) if after == before => Ok(()),
            (s, after) => Err(format!("still through the proxy ({before} -> {after}), {s:?}")),
        }
    })
    .unwrap();

    // A value weft cannot parse: named in the log, the last good plan kept, the agent serving.
    api.patch_pod("plain", "b", json!({"annotations": {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "not-a-range"}})).unwrap();
    wait_for("the bad annotation logged", WAIT, || {
        let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
        log.lines()
            .any(|l| l.contains("plain/b") && l.contains("excludeOutboundIPRanges") && l.contains("keeping its current capture"))
            .then_some(())
            .ok_or_else(|| "not logged".to_string())
    })
    .unwrap();
    assert!(agent.pod_status("plain", "b").unwrap().is_some());
    wait_for("a Warning event on plain/b naming the annotation", WAIT, || {
        let events = api.ok("GET", "/apis/events.k8s.io/v1/namespaces/plain/events", None).map_err(|e| e.to_string())?;
        let found = events["items"].as_array().into_iter().flatten().any(|e| {
            e["regarding"]["name"] == "b" && e["type"] == "Warning" && e["note"].as_str().is_some_and(|n| n.contains("excludeOutboundIPRanges"))
        });
        found.then_some(()).ok_or_else(|| format!("{events}"))
    })
    .unwrap();

    // Per-pod limits by annotation: one downstream connection at a time for this pod.
    let lim = api.run_pod(&cluster, "mesh", "lim", json!({"annotations": {"weft.dev/max-connections": "1"}}), json!({})).unwrap();
    captured(&agent, "mesh", "lim", true);
    let held = lim.netns.tcp_connect(c.addr(PORT), Duration::from_secs(5)).unwrap();
    wait_for("lim's first connection held", WAIT, || {
        let status = agent.pod_status("mesh", "lim").map_err(|e| e.to_string())?.unwrap_or_default();
        (status["load"]["connections"].as_u64() == Some(1)).then_some(()).ok_or_else(|| format!("{status}"))
    })
    .unwrap();
    // Refused as Envoy's connection limit does: accepted and closed at once, so the client sees a reset or an
    // end without an answer, whichever reaches it first.
    let second = echo(&lim.netns, c.addr(PORT), b"ping");
    assert!(second.as_ref().map_or(true, Vec::is_empty), "a second connection of lim must be refused at its limit, got {second:?}");
    let status = agent.pod_status("mesh", "lim").unwrap().unwrap_or_default();
    assert_eq!(status["load"]["connections_refused"].as_u64(), Some(1), "{status}");
    drop(held);
    wait_for("lim's limit freed", WAIT, || echo(&lim.netns, c.addr(PORT), b"ping").map(drop).map_err(|e| e.to_string())).unwrap();

    // weft's own switch takes a pod out, live; its traffic no longer meets the proxy.
    api.patch_pod("mesh", "a", json!({"labels": {"weft.dev/capture": "disabled"}})).unwrap();
    captured(&agent, "mesh", "a", false);
    assert_eq!(status_annotation(&api, "mesh", "a", "not captured"), "not captured: pod label weft.dev/capture=disabled");
    let rules = a.netns.exec_ok(&["iptables-save", "-t", "nat"]).unwrap();
    assert!(!rules.contains("WEFT"), "a's rules stay after release:\n{rules}");
    assert_echo(&a, c.addr(PORT));
}

#[test]
fn istiod_gets_each_pods_identity_and_metadata() {
    let _serial = serial();
    let (cluster, api) = cluster("kmeta", entry());
    api.create_namespace("shop", json!({"istio-injection": "enabled"})).unwrap();
    let xds_addr: SocketAddr = "127.0.0.1:15010".parse().unwrap();
    let xds = XdsServer::start(cluster.node(), xds_addr).unwrap();
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let ca = cluster.node().run_in(|| CaServer::start(&[web])).unwrap();
    let (ca_addr, root, token) = (ca.address.to_string(), ca.root_cert.display().to_string(), ca.token_file.display().to_string());
    let agent = agent(
        &cluster,
        &api,
        &[
            "--xds-address", "127.0.0.1:15010", "--ca", "istiod", "--ca-address", &ca_addr, "--istiod-root-cert", &root,
            "--istiod-token-file", &token, "--istiod-server-name", SERVER_NAME, "--cluster-id", CLUSTER_ID,
        ],
    );
    let owner = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c", "uid": "0b3c6f0e-0000-4000-8000-000000000001", "controller": true}]);
    let metadata = json!({"labels": {"app": "web", "version": "v1", "pod-template-hash": "7d9f8c"}, "ownerReferences": owner});
    api.run_pod(&cluster, "shop", "web-7d9f8c-x1", metadata, json!({"serviceAccountName": "web"})).unwrap();
    captured(&agent, "shop", "web-7d9f8c-x1", true);

    // The pod's stream says what its sidecar's would: service account, labels, workload.
    let request = xds
        .wait_request("the pod's first request with metadata", |r| {
            r.node_id.as_deref().is_some_and(|id| id.contains("~web-7d9f8c-x1.shop~")) && r.node_metadata.is_some()
        })
        .unwrap();
    let meta = request.node_metadata.unwrap();
    assert_eq!(meta["SERVICE_ACCOUNT"], "web", "{meta}");
    assert_eq!(meta["LABELS"]["version"], "v1", "{meta}");
    assert_eq!(meta["WORKLOAD_NAME"], "web", "{meta}");
    assert_eq!(meta["OWNER"], "kubernetes://apis/apps/v1/namespaces/shop/deployments/web", "{meta}");

    // Its certificate is requested for its service account's identity, by impersonation.
    wait_for("web's certificate issued", WAIT, || {
        ca.issued().iter().any(|i| i.identity == web).then_some(()).ok_or(format!("{:?}", ca.issued()))
    })
    .unwrap();

    // A label change reaches istiod on a new stream, without restarting the pod.
    let seen = xds.requests().len();
    api.patch_pod("shop", "web-7d9f8c-x1", json!({"labels": {"version": "v2"}})).unwrap();
    let request = xds
        .wait_request_since(seen, "a new stream with the new labels", |r| {
            r.node_metadata.as_ref().is_some_and(|m| m["LABELS"]["version"] == "v2")
        })
        .unwrap();
    assert!(request.node_id.is_some_and(|id| id.contains("web-7d9f8c-x1.shop")));
}

#[test]
fn repair_and_api_server_outage() {
    let _serial = serial();
    // Pods of `legacy` never reach the agent through CNI: they stand for pods that started before weft-cni was
    // installed (or while the agent was down).
    let (cluster, mut api) = cluster("krep", entry().field("exclude_namespaces", json!(["legacy"])));
    api.create_namespace("legacy", json!({"istio-injection": "enabled"})).unwrap();
    api.create_namespace("mesh", json!({"istio-injection": "enabled"})).unwrap();
    let old = api.run_pod(&cluster, "legacy", "old", json!({}), json!({})).unwrap();
    let agent = agent(&cluster, &api, &[]);

    // Found by its address, decided as a new pod, captured where it runs.
    captured(&agent, "legacy", "old", true);
    status_annotation(&api, "legacy", "old", "captured (iptables): namespace label istio-injection=enabled (repaired)");
    let peer = api.run_pod(&cluster, "mesh", "peer", json!({}), json!({})).unwrap();
    let _server = EchoServer::start(&peer.netns, PORT).unwrap();
    let before = outbound_connections(&agent, &old);
    assert_echo(&old, peer.addr(PORT));
    wait_for("old's traffic through the proxy", WAIT, || (outbound_connections(&agent, &old) > before).then_some(()).ok_or_else(|| "not yet".to_string())).unwrap();

    // The API server goes away: captured pods keep being served; a new pod cannot be decided and its ADD fails
    // (kubelet retries), naming why.
    api.stop_apiserver().unwrap();
    assert_echo(&old, peer.addr(PORT));
    let err = cluster.add_pod("mesh", "during-outage").expect_err("an ADD the agent cannot decide must fail");
    assert!(err.message().contains("not in the API server's view"), "{}", err.message());

    // Back: the watch resumes and new pods are decided again.
    api.start_apiserver(cluster.node()).unwrap();
    api.run_pod(&cluster, "mesh", "after", json!({}), json!({})).unwrap();
    captured(&agent, "mesh", "after", true);
    assert!(agent.pod_status("legacy", "old").unwrap().is_some());
}
