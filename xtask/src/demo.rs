//! `cargo xtask demo`: a two-pod network-namespace node, captured by weft, with the traffic shown.

use std::time::Duration;

use weft_tests::agent::Agent;
use weft_tests::traffic::{echo, EchoServer};
use weft_tests::{bin_path, Cluster, ClusterOptions, WeftEntry};

use crate::{cargo, run as run_cmd, setup, workspace_root};

pub fn run() -> Result<(), String> {
    setup::run()?;
    setup::require_root("the demo creates network namespaces and programs iptables")?;
    run_cmd(cargo().current_dir(workspace_root()).args(["build", "--quiet", "-p", "weft-agent", "-p", "weft-cni"]))?;
    let e = |e: &dyn std::fmt::Display| e.to_string();

    step("a node (network namespace) with bridge + host-local + portmap + weft-cni, driven by libcni");
    let entry = WeftEntry::new(bin_path("weft-cni").map_err(|x| e(&x))?, "run/cni.sock");
    let cluster = Cluster::with_options("demo", ClusterOptions::with_weft(entry)).map_err(|x| e(&x))?;
    let mut agent = Agent::start(&cluster, "iptables").map_err(|x| e(&x))?;
    println!("weft-agent ready in node netns {} (log: {})", cluster.node().name(), agent.log_path().display());

    step("CNI ADD of two pods in namespace `demo`");
    let frontend = cluster.add_pod("demo", "frontend").map_err(|x| e(&x))?;
    let backend = cluster.add_pod("demo", "backend").map_err(|x| e(&x))?;
    println!("frontend {}  backend {}", frontend.ip, backend.ip);
    let rules = frontend.netns.exec_ok(&["iptables-save", "-t", "nat"]).map_err(|x| e(&x))?;
    println!("rules in frontend's netns:\n{}", indent(&rules, |l| l.contains("WEFT")));

    step("frontend -> backend:8080 (an echo server in the backend pod)");
    let server = EchoServer::start(&backend.netns, 8080).map_err(|x| e(&x))?;
    let reply = echo(&frontend.netns, backend.addr(8080), b"hello through weft").map_err(|x| e(&x))?;
    println!("frontend got back: {:?}", String::from_utf8_lossy(&reply));
    println!("backend saw the connection from: {:?} (the proxy's inbound side)", server.peers());
    let status = agent.status().map_err(|x| e(&x))?;
    for pod in status["pods"].as_array().into_iter().flatten() {
        println!(
            "  {}/{}: outbound accepted={} bytes={}  inbound accepted={} bytes={}",
            pod["namespace"].as_str().unwrap_or("?"),
            pod["name"].as_str().unwrap_or("?"),
            pod["outbound"]["accepted"],
            pod["outbound"]["bytes_from_downstream"],
            pod["inbound"]["accepted"],
            pod["inbound"]["bytes_from_downstream"],
        );
    }

    step("agent killed: captured traffic fails closed instead of bypassing the proxy");
    agent.kill().map_err(|x| e(&x))?;
    match frontend.netns.tcp_connect(backend.addr(8080), Duration::from_secs(2)) {
        Err(err) => println!("frontend -> backend: {err}"),
        Ok(_) => return Err("frontend reached backend with the agent down: capture is broken".into()),
    }

    step("agent restarted: pods re-adopted from its registry, traffic flows again");
    agent.restart(&cluster).map_err(|x| e(&x))?;
    let reply = echo(&frontend.netns, backend.addr(8080), b"hello again").map_err(|x| e(&x))?;
    println!("frontend got back: {:?}", String::from_utf8_lossy(&reply));

    step("CNI DEL of both pods, then clean-up");
    cluster.del_pod(&frontend).map_err(|x| e(&x))?;
    cluster.del_pod(&backend).map_err(|x| e(&x))?;
    agent.stop().map_err(|x| e(&x))?;
    println!("done");
    Ok(())
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn indent(text: &str, keep: impl Fn(&str) -> bool) -> String {
    text.lines().filter(|l| keep(l)).map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}
