//! `cargo xtask demo`: the mesh on one machine. A network-namespace node with a real API server and a real
//! istiod (built from their Go modules by setup), weft-agent capturing the pods of an injected namespace, and
//! what a mesh does, shown as traffic: mTLS on the wire with istiod's certificates, a route split by a
//! VirtualService, an AuthorizationPolicy denying one call; then fail-closed capture and a restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use weft_tests::istiod::{self, World};
use weft_tests::kube::KubeApi;
use weft_tests::{wait_for, Cluster, Pod};

use crate::{cargo, run as run_cmd, setup, workspace_root};

const NS: &str = "demo";

pub fn run() -> Result<(), String> {
    setup::everything()?;
    setup::require_root("the demo creates network namespaces and programs iptables")?;
    run_cmd(cargo().current_dir(workspace_root()).args(["build", "--quiet", "-p", "weft-agent"]))?;
    crate::cni_plugin::build(false)?;
    let e = |e: &dyn std::fmt::Display| e.to_string();

    step("a node (network namespace) with libcni + weft-cni, a kube-apiserver and istiod");
    let World { cluster, api, istiod, mut agent } = World::start("demo", &[NS]).map_err(|x| e(&x))?;
    println!("istiod ready (log: {}); weft-agent ready (log: {})", istiod.log_path().display(), agent.log_path().display());

    step("namespace `demo` labelled istio-injection=enabled, mesh-wide STRICT mTLS, two services");
    apply(&api, "strict.yaml")?;
    let mut pods = BTreeMap::new();
    for (name, app, version) in [("frontend", "frontend", "v1"), ("backend-v1", "backend", "v1"), ("backend-v2", "backend", "v2")] {
        let pod = api.run_pod(&cluster, NS, name, json!({"labels": {"app": app, "version": version}}), json!({"serviceAccountName": app})).map_err(|x| e(&x))?;
        println!("  pod {name} {} ({})", pod.ip, api.get_pod(NS, name).map_err(|x| e(&x))?["metadata"]["annotations"]["weft.dev/status"].as_str().unwrap_or("status pending"));
        pods.insert(name, pod);
    }
    let seen = istiod::Seen::default();
    istiod::serve_http(&pods["backend-v1"], 8080, "backend v1", &seen).map_err(|x| e(&x))?;
    istiod::serve_http(&pods["backend-v2"], 8080, "backend v2", &seen).map_err(|x| e(&x))?;
    let ip = istiod::service(&api, NS, "backend", 80, 8080, &[&pods["backend-v1"], &pods["backend-v2"]]).map_err(|x| e(&x))?;
    let backend: SocketAddr = format!("{ip}:80").parse().map_err(|x| e(&x))?;
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
    for doc in istiod::resources(file).map_err(|e| e.to_string())? {
        api.apply(&doc).map_err(|e| e.to_string())?;
        println!("  applied {} {}/{} (tests/istio/{file})", doc["kind"].as_str().unwrap_or("?"), doc["metadata"]["namespace"].as_str().unwrap_or("-"), doc["metadata"]["name"].as_str().unwrap_or("?"));
    }
    Ok(())
}

/// `GET path` from `pod` to `to`: `<status> <body>`.
fn get(pod: &Pod, to: SocketAddr, path: &str) -> Result<String, String> {
    istiod::get(pod, to, "backend", path, &[]).map(|r| format!("{} {}", r.status, r.body))
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
