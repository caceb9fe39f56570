//! The live-istiod suite: a real istiod (built from the `istio.io/istio` Go module by `cargo xtask setup`) runs
//! against the tests' real API server and drives `weft-agent run` in the netns cluster. It is configured only
//! with Kubernetes objects (Namespaces labelled for injection, Pods, Services, EndpointSlices) and Istio
//! resources as users write them (`tests/istio/*.yaml`); every behaviour is observed as traffic between pods.
//! The agent gets its pods' certificates from istiod's CA (as ztunnel does) and opens each pod's xDS stream on
//! istiod's secured port with that pod's certificate.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use weft_tests::agent::{Agent, ADMIN};
use weft_tests::istiod::{self, Istiod, XDS_SECURED};
use weft_tests::kube::KubeApi;
use weft_tests::traffic::http;
use weft_tests::{bin_path, wait_for, Cluster, ClusterOptions, Pod, WeftEntry};

const NS: &str = "shop";

/// An HTTP/1.1 server in `pod` answering every request with 200 and `body`.
fn serve_http(pod: &Pod, port: u16, body: String) {
    let listener = pod.netns.tcp_listen(("0.0.0.0", port)).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            });
        }
    });
}

/// A Service of `port` → `target_port` over `pods`, with the EndpointSlice the endpoint controller would
/// write (no controller manager runs here). Returns its cluster IP.
fn service(api: &KubeApi, name: &str, port: u16, target_port: u16, protocol: &str, pods: &[&Pod]) -> String {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"app": name}, "ports": [{"name": format!("{protocol}-{port}"), "port": port, "targetPort": target_port}]},
    });
    api.apply(&svc).unwrap();
    let created = api.ok("GET", &format!("/api/v1/namespaces/{NS}/services/{name}"), None).unwrap();
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true}, "nodeName": "node", "targetRef": {"kind": "Pod", "name": p.name, "namespace": NS, "uid": p.uid}}))
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": NS, "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "weft-tests"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": format!("{protocol}-{port}"), "port": target_port, "protocol": "TCP"}],
    });
    api.apply(&slice).unwrap();
    created["spec"]["clusterIP"].as_str().unwrap().to_string()
}

#[test]
fn istiod_drives_the_agent() {
    let cluster = Cluster::with_options("kist", ClusterOptions::with_weft(WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock"))).unwrap();
    let api = KubeApi::start(cluster.node()).unwrap();
    let istiod = Istiod::start(cluster.node(), &api).unwrap();
    let token = istiod.agent_token(&api, cluster.id()).unwrap().display().to_string();
    let root = istiod.root_cert().display().to_string();
    api.create_namespace(NS, json!({"istio-injection": "enabled"})).unwrap();
    for doc in istiod::resources("strict.yaml").unwrap() {
        api.apply(&doc).unwrap();
    }
    let kubeconfig = api.agent_kubeconfig().unwrap().display().to_string();
    let agent = Agent::start_with_args(
        &cluster,
        "iptables",
        ADMIN,
        &[
            "--node-name", cluster.id(), "--kubeconfig", &kubeconfig,
            "--ca", "istiod", "--ca-address", XDS_SECURED, "--istiod-root-cert", &root, "--istiod-token-file", &token,
            "--xds-address", XDS_SECURED, "--xds-tls", "true",
        ],
    )
    .unwrap();

    let mut pods = BTreeMap::new();
    for (name, app, sa, version) in [("client", "client", "client", "v1"), ("server-v1", "server", "server", "v1"), ("server-v2", "server", "server", "v2")] {
        let pod = api.run_pod(&cluster, NS, name, json!({"labels": {"app": app, "version": version}}), json!({"serviceAccountName": sa})).unwrap();
        pods.insert(name, pod);
    }
    serve_http(&pods["server-v1"], 8080, "server v1".into());
    serve_http(&pods["server-v2"], 8080, "server v2".into());
    let ip = service(&api, "server", 80, 8080, "http", &[&pods["server-v1"], &pods["server-v2"]]);
    let to: SocketAddr = format!("{ip}:80").parse().unwrap();
    let answer = wait_for("client → server through istiod's configuration", Duration::from_secs(60), || {
        http(&pods["client"].netns, to, "GET", "server", "/").map_err(|e| e.to_string()).and_then(|r| if r.status == 200 { Ok(r.body) } else { Err(r.head) })
    });
    let status = agent.status().map(|s| s.to_string()).unwrap_or_default();
    let log = std::fs::read_to_string(cluster.work_dir().join("weft-agent.log")).unwrap_or_default();
    for pod in pods.values() {
        let id = format!("{}.{}", pod.name, pod.namespace);
        let dump = wait_for(&format!("istiod's config_dump of {id}"), Duration::from_secs(60), || istiod.debug(&format!("/debug/config_dump?proxyID={id}")).map_err(|e| e.to_string())).unwrap();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            let path = weft_tests::workspace_root().join(format!("tests/istio/corpus/{}.json", pod.name));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, serde_json::to_string_pretty(&dump).unwrap()).unwrap();
        }
    }
    assert!(answer.is_ok(), "{answer:?}\nstatus: {status}\nagent log:\n{log}\nistiod log: {}", istiod.log_path().display());
}
