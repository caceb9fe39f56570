//! `cargo xtask demo`: the mesh on one machine. A network-namespace node with a real API server and a real
//! istiod (built from their Go modules by setup), weft-agent capturing the pods of an injected namespace, and
//! what a mesh does, shown as traffic: mTLS on the wire with istiod's certificates, a route split by a
//! VirtualService, an AuthorizationPolicy denying one call; then fail-closed capture and a restart.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use weft_tests::agent::{Agent, ADMIN};
use weft_tests::istiod::{Istiod, XDS_SECURED};
use weft_tests::kube::KubeApi;
use weft_tests::traffic::http_request_with;
use weft_tests::{bin_path, wait_for, Cluster, ClusterOptions, Pod, WeftEntry};

use crate::{cargo, run as run_cmd, setup, workspace_root};

const NS: &str = "demo";

pub fn run() -> Result<(), String> {
    setup::everything()?;
    setup::require_root("the demo creates network namespaces and programs iptables")?;
    run_cmd(cargo().current_dir(workspace_root()).args(["build", "--quiet", "-p", "weft-agent", "-p", "weft-cni"]))?;
    let e = |e: &dyn std::fmt::Display| e.to_string();

    step("a node (network namespace) with libcni + weft-cni, a kube-apiserver and istiod");
    let entry = WeftEntry::new(bin_path("weft-cni").map_err(|x| e(&x))?, "run/cni.sock");
    let cluster = Cluster::with_options("demo", ClusterOptions::with_weft(entry)).map_err(|x| e(&x))?;
    let api = KubeApi::start(cluster.node()).map_err(|x| e(&x))?;
    let istiod = Istiod::start(cluster.node(), &api).map_err(|x| e(&x))?;
    let token = istiod.agent_token(&api, cluster.id()).map_err(|x| e(&x))?.display().to_string();
    let root = istiod.root_cert().display().to_string();
    let kubeconfig = api.agent_kubeconfig().map_err(|x| e(&x))?.display().to_string();
    let args = [
        "--node-name", cluster.id(), "--kubeconfig", &kubeconfig, "--ca", "istiod", "--ca-address", XDS_SECURED,
        "--istiod-root-cert", &root, "--istiod-token-file", &token, "--xds-address", XDS_SECURED, "--xds-tls", "true",
    ];
    let mut agent = Agent::start_with_args(&cluster, "iptables", ADMIN, &args).map_err(|x| e(&x))?;
    println!("istiod ready (log: {}); weft-agent ready (log: {})", istiod.log_path().display(), agent.log_path().display());

    step("namespace `demo` labelled istio-injection=enabled, mesh-wide STRICT mTLS, two services");
    api.create_namespace(NS, json!({"istio-injection": "enabled"})).map_err(|x| e(&x))?;
    apply(&api, "strict.yaml")?;
    let mut pods = BTreeMap::new();
    for (name, app, version) in [("frontend", "frontend", "v1"), ("backend-v1", "backend", "v1"), ("backend-v2", "backend", "v2")] {
        let pod = api.run_pod(&cluster, NS, name, json!({"labels": {"app": app, "version": version}}), json!({"serviceAccountName": app})).map_err(|x| e(&x))?;
        println!("  pod {name} {} ({})", pod.ip, api.get_pod(NS, name).map_err(|x| e(&x))?["metadata"]["annotations"]["weft.dev/status"].as_str().unwrap_or("status pending"));
        pods.insert(name, pod);
    }
    serve(&pods["backend-v1"], "backend v1")?;
    serve(&pods["backend-v2"], "backend v2")?;
    let backend = service(&api, "backend", &[&pods["backend-v1"], &pods["backend-v2"]])?;
    println!("  service backend {backend} -> pods :8080");

    step("frontend -> backend: istiod's configuration, mTLS between the pods");
    let answer = wait_for("frontend -> backend", Duration::from_secs(60), || get(&pods["frontend"], backend, "/").and_then(ok)).map_err(|x| e(&x))?;
    println!("  GET http://backend/ -> {answer}");
    let status = agent.status().map_err(|x| e(&x))?;
    for id in status["identities"].as_array().into_iter().flatten() {
        println!("  certificate from istiod's CA: {} (serial {})", id["identity"].as_str().unwrap_or("?"), id["serial"].as_str().unwrap_or("?"));
    }
    let direct = pods["backend-v1"].addr(8080);
    println!("  what the node (outside the mesh) sees at backend-v1 {direct}: {}", on_the_wire(&cluster, direct));

    step("a VirtualService splits backend's traffic 80/20 between v1 and v2");
    apply(&api, "demo-split.yaml")?;
    let split = wait_for("the split", Duration::from_secs(60), || {
        let counts = tally(&pods["frontend"], backend, 100);
        match (counts.get("backend v1 /"), counts.get("backend v2 /")) {
            // Round robin alone gives 50/50; the split shows as a clear majority for v1 with v2 still served.
            (Some(v1), Some(v2)) if *v1 >= 65 && *v2 >= 5 && v1 + v2 == 100 => Ok(counts),
            _ => Err(format!("{counts:?}")),
        }
    })
    .map_err(|x| e(&x))?;
    println!("  100 requests: {split:?}");

    step("an AuthorizationPolicy denies GET /admin on backend");
    apply(&api, "demo-deny.yaml")?;
    let denied = wait_for("the policy", Duration::from_secs(60), || match get(&pods["frontend"], backend, "/admin") {
        Ok(r) if r.starts_with("403") => Ok(r),
        other => Err(format!("{other:?}")),
    })
    .map_err(|x| e(&x))?;
    println!("  GET /admin -> {denied}");
    println!("  GET /      -> {}", get(&pods["frontend"], backend, "/")?);

    step("agent killed: captured traffic fails closed instead of bypassing the proxy");
    agent.kill().map_err(|x| e(&x))?;
    match pods["frontend"].netns.tcp_connect(direct, Duration::from_secs(2)) {
        Err(err) => println!("  frontend -> backend-v1: {err}"),
        Ok(_) => return Err("frontend reached backend with the agent down: capture is broken".into()),
    }

    step("agent restarted: pods re-adopted, configuration and certificates fetched again");
    agent.restart(&cluster).map_err(|x| e(&x))?;
    let again = wait_for("traffic after the restart", Duration::from_secs(60), || get(&pods["frontend"], backend, "/").and_then(ok)).map_err(|x| e(&x))?;
    println!("  GET http://backend/ -> {again}");

    step("clean-up");
    for pod in pods.values() {
        cluster.del_pod(pod).map_err(|x| e(&x))?;
    }
    agent.stop().map_err(|x| e(&x))?;
    println!("done");
    Ok(())
}

fn apply(api: &KubeApi, file: &str) -> Result<(), String> {
    for doc in weft_tests::istiod::resources(file).map_err(|e| e.to_string())? {
        api.apply(&doc).map_err(|e| e.to_string())?;
        println!("  applied {} {}/{} (tests/istio/{file})", doc["kind"].as_str().unwrap_or("?"), doc["metadata"]["namespace"].as_str().unwrap_or("-"), doc["metadata"]["name"].as_str().unwrap_or("?"));
    }
    Ok(())
}

/// A Service over `pods` (port 80 to 8080) and the EndpointSlice the endpoint controller would write.
fn service(api: &KubeApi, name: &str, pods: &[&Pod]) -> Result<SocketAddr, String> {
    let e = |x: weft_tests::util::HarnessError| x.to_string();
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
    api.apply(&svc).map_err(e)?;
    let endpoints: Vec<serde_json::Value> = pods
        .iter()
        .map(|p| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": p.name, "namespace": NS, "uid": p.uid}}))
        .collect();
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": NS, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]});
    api.apply(&slice).map_err(e)?;
    let created = api.ok("GET", &format!("/api/v1/namespaces/{NS}/services/{name}"), None).map_err(e)?;
    let ip = created["spec"]["clusterIP"].as_str().ok_or("the Service got no cluster IP")?;
    format!("{ip}:80").parse().map_err(|x| format!("{ip}: {x}"))
}

/// An HTTP server in `pod` on 8080 answering `<name> <path>`.
fn serve(pod: &Pod, name: &'static str) -> Result<(), String> {
    let listener = pod.netns.tcp_listen(("0.0.0.0", 8080)).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&head);
            let body = format!("{name} {}", text.split_whitespace().nth(1).unwrap_or("?"));
            let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        }
    });
    Ok(())
}

/// `GET path` from `pod` to `to`: `<status> <body>`.
fn get(pod: &Pod, to: SocketAddr, path: &str) -> Result<String, String> {
    let stream = pod.netns.tcp_connect(to, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    let r = http_request_with(stream, "GET", "backend", path, &[]).map_err(|e| e.to_string())?;
    Ok(format!("{} {}", r.status, r.body))
}

fn ok(answer: String) -> Result<String, String> {
    if answer.starts_with("200") { Ok(answer) } else { Err(answer) }
}

/// Bodies of `n` requests, counted.
fn tally(pod: &Pod, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let answer = get(pod, to, "/").unwrap_or_else(|e| format!("error {e}"));
        *counts.entry(answer.trim_start_matches("200 ").to_string()).or_default() += 1;
    }
    counts
}

/// The certificate a meshed pod's port presents to a TLS client on the node (openssl s_client): its
/// SPIFFE identity, issued by istiod.
fn on_the_wire(cluster: &Cluster, to: SocketAddr) -> String {
    let target = to.to_string();
    let out = cluster.node().exec(&["sh", "-c", &format!("openssl s_client -connect {target} -alpn istio </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName 2>/dev/null")]);
    match out {
        Ok(o) if !String::from_utf8_lossy(&o.stdout).trim().is_empty() => {
            let text = String::from_utf8_lossy(&o.stdout);
            format!("TLS only, certificate {}", text.lines().last().unwrap_or("").trim())
        }
        _ => "no TLS answer (openssl missing?)".into(),
    }
}

fn step(text: &str) {
    println!("\n== {text}");
}
