//! The capture suite: real libcni drives bridge + host-local + portmap + weft-cni for pods that are network
//! namespaces; a real `weft-agent` captures them. Every test runs once per redirect backend.
//! Kubernetes itself is the one thing not here: kubelet's CNI calls are made by the libcni driver with the
//! same arguments kubelet's runtime passes.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde_json::Value;
use weft_tests::agent::Agent;
use weft_tests::traffic::{echo, echo_paced, payload, EchoServer};
use weft_tests::{bin_path, require_ebpf, wait_for, Cluster, ClusterOptions, Pod, WeftEntry};

const SERVER_PORT: u16 = 8080;

/// A node with weft-cni chained in and a running agent; `None` (with the reason printed) where the suite
/// cannot run.
fn node(test: &str, mode: &str) -> Option<(Cluster, Agent)> {
    if let Err(why) = require_ebpf(mode) {
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    let cluster = Cluster::with_options(test, ClusterOptions::with_weft(entry)).unwrap();
    let agent = Agent::start(&cluster, mode).unwrap();
    Some((cluster, agent))
}

fn counter(status: &Value, direction: &str, name: &str) -> u64 {
    status[direction][name].as_u64().unwrap_or(0)
}

/// Waits until the agent's status for a pod satisfies `pred` (counters move when connections close).
fn wait_pod(agent: &Agent, pod: &Pod, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(10), || match agent.pod_status(&pod.namespace, &pod.name) {
        Ok(Some(s)) if pred(&s) => Ok(s),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    })
    .unwrap()
}

fn assert_echo(from: &Pod, to: &Pod, len: usize) {
    let data = payload(len);
    let back = echo(&from.netns, to.addr(SERVER_PORT), &data).unwrap_or_else(|e| panic!("echo of {len} bytes: {e}"));
    assert_eq!(back.len(), data.len(), "echo of {len} bytes came back with {} bytes", back.len());
    assert!(back == data, "echo of {len} bytes came back altered");
}

/// Rules weft installed in a pod's netns, as the backend's own tool lists them (empty when none).
fn weft_rules(pod: &Pod, mode: &str) -> String {
    // eBPF mode keeps the nftables inbound rule; its outbound capture is the enrolment in a map.
    let out = match mode {
        "iptables" => pod.netns.exec(&["iptables-save", "-t", "nat"]).unwrap(),
        _ => pod.netns.exec(&["nft", "list", "table", "inet", "weft"]).unwrap(),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    match mode {
        "iptables" => text.lines().filter(|l| l.contains("WEFT")).collect::<Vec<_>>().join("\n"),
        _ => text.trim().to_string(),
    }
}

fn traffic_flows_through_the_proxy_both_ways(mode: &str) {
    let Some((cluster, agent)) = node(&format!("flow-{mode}"), mode) else { return };
    let a = cluster.add_pod("default", "client").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let server = EchoServer::start(&b.netns, SERVER_PORT).unwrap();

    for len in [0, 1, 1500, 8 << 20] {
        assert_echo(&a, &b, len);
    }

    // The app in B sees its peer as Istio's inbound passthrough address: the connection came from the
    // proxy's inbound listener in B, not straight from A.
    let peers = server.peers();
    assert_eq!(peers.len(), 4, "{peers:?}");
    assert!(peers.iter().all(|p| p.ip() == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))), "{peers:?}");

    let sa = wait_pod(&agent, &a, "client outbound counters", |s| counter(s, "outbound", "accepted") == 4 && counter(s, "outbound", "active") == 0);
    assert!(counter(&sa, "outbound", "bytes_from_downstream") >= (8 << 20) + 1501, "{sa}");
    assert_eq!(counter(&sa, "outbound", "bytes_to_downstream"), counter(&sa, "outbound", "bytes_from_downstream"));
    let sb = wait_pod(&agent, &b, "server inbound counters", |s| counter(s, "inbound", "accepted") == 4 && counter(s, "inbound", "active") == 0);
    assert_eq!(counter(&sb, "outbound", "accepted"), 0, "{sb}");
    assert_eq!(sa["redirect"], mode);
    assert_eq!(sa["ips"][0], a.ip.to_string());
    cluster.check_pod(&a).unwrap();
    cluster.check_pod(&b).unwrap();
}

fn agent_down_fails_closed_and_restart_readopts(mode: &str) {
    let Some((cluster, mut agent)) = node(&format!("restart-{mode}"), mode) else { return };
    let a = cluster.add_pod("default", "client").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let gone = cluster.add_pod("default", "gone").unwrap();
    let _server = EchoServer::start(&b.netns, SERVER_PORT).unwrap();
    assert_echo(&a, &b, 4096);

    agent.kill().unwrap();
    // The server is still up; only capture stands between A and B, and it must not let A through.
    let err = echo(&a.netns, b.addr(SERVER_PORT), b"hello").expect_err("captured pod bypassed a dead proxy");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    // A meshed pod must not start uncaptured either.
    let failure = cluster.add_pod("default", "late").expect_err("ADD succeeded without an agent");
    let cni = failure.cni_error.clone().unwrap_or_else(|| panic!("no CNI error object: {failure}"));
    assert_eq!(cni.code, 11, "{failure}");
    assert!(cni.msg.contains("unreachable"), "{failure}");
    // A pod deleted while the agent is down is forgotten on restart.
    cluster.remove_pod(gone).unwrap();

    agent.restart(&cluster).unwrap();
    assert_echo(&a, &b, 4096);
    let status = agent.status().unwrap();
    let mut names: Vec<&str> = status["pods"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["client", "server"], "{status}");
    let registry = agent.registry();
    assert!(registry.contains("\"client\"") && registry.contains("\"server\"") && !registry.contains("\"gone\""), "{registry}");
    cluster.check_pod(&a).unwrap();
    // Rules were verified, not stacked: the same rule set, once.
    // In eBPF mode the table only holds the inbound half (15001 appears once, in the excluded ports).
    let expected = if mode == "ebpf" { 1 } else { 2 };
    assert_eq!(weft_rules(&a, mode).matches("15001").count(), expected, "{}", weft_rules(&a, mode));
}

fn del_releases_the_pod_and_is_idempotent(mode: &str) {
    let Some((cluster, agent)) = node(&format!("del-{mode}"), mode) else { return };
    let a = cluster.add_pod("default", "app").unwrap();
    assert!(weft_rules(&a, mode).contains("15001"), "no rules after ADD");
    cluster.check_pod(&a).unwrap();

    cluster.del_pod(&a).unwrap();
    assert!(agent.pod_status("default", "app").unwrap().is_none());
    assert_eq!(weft_rules(&a, mode), "", "rules left after DEL");
    let registry = agent.registry();
    assert!(!registry.contains(&a.container_id), "{registry}");
    cluster.del_pod(&a).unwrap();
    // With the netns gone too, DEL still succeeds.
    let deleted = std::process::Command::new("ip").args(["netns", "del", a.netns.name()]).status().unwrap();
    assert!(deleted.success());
    cluster.del_pod(&a).unwrap();
}

fn excluded_namespace_is_not_captured(mode: &str) {
    let Some((cluster, agent)) = node(&format!("excl-{mode}"), mode) else { return };
    let system = cluster.add_pod("kube-system", "coredns").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let _server = EchoServer::start(&b.netns, SERVER_PORT).unwrap();
    assert!(agent.pod_status("kube-system", "coredns").unwrap().is_none());
    assert_eq!(weft_rules(&system, mode), "", "excluded pod got rules");
    // Its traffic still reaches meshed pods (through their inbound capture).
    assert_echo(&system, &b, 100);
    wait_pod(&agent, &b, "server inbound counters", |s| counter(s, "inbound", "accepted") == 1);
}

fn upgrade_with_overlapping_agents(mode: &str) {
    let Some((cluster, mut old)) = node(&format!("upg-{mode}"), mode) else { return };
    let a = cluster.add_pod("default", "client").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let _server = EchoServer::start(&b.netns, SERVER_PORT).unwrap();
    let data = payload(16 << 20);

    std::thread::scope(|s| {
        // A long transfer through the old agent, paced so that it spans the whole upgrade.
        let transfer = s.spawn(|| echo_paced(&a.netns, b.addr(SERVER_PORT), &data, Duration::from_millis(25)));
        wait_pod(&old, &a, "the transfer to be proxied by the old agent", |s| counter(s, "outbound", "active") == 1);

        // The new agent binds the same in-pod ports beside the old one (SO_REUSEPORT) and takes over the
        // socket; the old one stops accepting and drains.
        let new = Agent::start_with_admin(&cluster, mode, "127.0.0.1:15010").unwrap();
        assert!(!transfer.is_finished(), "the transfer ended before the upgrade started; pace it slower");
        let exit = old.stop().unwrap().unwrap();
        assert!(exit.success(), "the old agent did not drain and exit cleanly: {exit}");
        let back = transfer.join().unwrap().expect("the transfer across the upgrade failed");
        assert!(back == data, "the transfer across the upgrade came back altered ({} bytes)", back.len());

        assert!(cluster.agent_socket().unwrap().exists(), "the old agent removed the new agent's CNI socket");
        assert_echo(&a, &b, 4096);
        let c = cluster.add_pod("default", "after-upgrade").unwrap();
        assert!(new.pod_status("default", "after-upgrade").unwrap().is_some());
        assert!(new.pod_status("default", "client").unwrap().is_some());
        cluster.check_pod(&c).unwrap();
    });
}

/// Runs `weft-cni` directly in the node netns for the verbs libcni 1.1.2 cannot send (STATUS and GC are CNI
/// 1.1.0), with a config that points at the cluster's real agent.
fn plugin(cluster: &Cluster, command: &str, extra: Value) -> (i32, Value) {
    use std::io::Write;
    let mut conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "weft-test",
        "type": "weft-cni",
        "agent_socket": cluster.agent_socket().unwrap(),
    });
    if let (Some(obj), Value::Object(more)) = (conf.as_object_mut(), extra) {
        obj.extend(more);
    }
    let mut cmd = cluster.node_command(bin_path("weft-cni").unwrap());
    cmd.env("CNI_COMMAND", command)
        .env("CNI_PATH", cluster.bin_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), serde_json::from_str(&stdout).unwrap_or(Value::Null))
}

fn status_and_gc_talk_to_the_real_agent(mode: &str) {
    let Some((cluster, mut agent)) = node(&format!("gc-{mode}"), mode) else { return };
    let keep = cluster.add_pod("default", "keep").unwrap();
    let stale = cluster.add_pod("default", "stale").unwrap();
    assert_eq!(plugin(&cluster, "STATUS", Value::Null).0, 0);

    let valid = serde_json::json!({"cni.dev/valid-attachments": [{"containerID": keep.container_id, "ifname": "eth0"}]});
    let (code, out) = plugin(&cluster, "GC", valid);
    assert_eq!(code, 0, "{out}");
    assert!(agent.pod_status("default", "keep").unwrap().is_some());
    assert!(agent.pod_status("default", "stale").unwrap().is_none(), "GC left the stale attachment captured");
    assert_eq!(weft_rules(&stale, mode), "", "GC left rules in the stale pod");

    agent.stop().unwrap();
    let (code, out) = plugin(&cluster, "STATUS", Value::Null);
    assert_eq!((code, out["code"].as_u64()), (1, Some(50)), "{out}");
}

/// Where the node's iptables is the legacy variant (`--iptables-variant legacy`), the pod's rules go through
/// `iptables-legacy-restore` and live in the legacy tables, not in nf_tables; traffic is captured all the same
/// and DEL removes them. (The nf_tables variant, the default here, is the suite above.)
#[test]
fn legacy_iptables_variant_captures_through_its_own_tables() {
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    let cluster = Cluster::with_options("legacy-iptables", ClusterOptions::with_weft(entry)).unwrap();
    let agent = weft_tests::agent::Agent::start_with_args(&cluster, "iptables", weft_tests::agent::ADMIN, &["--iptables-variant", "legacy"]).unwrap();
    let a = cluster.add_pod("default", "client").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let _server = EchoServer::start(&b.netns, SERVER_PORT).unwrap();
    assert_echo(&a, &b, 1500);
    wait_pod(&agent, &a, "client outbound counters", |s| counter(s, "outbound", "accepted") == 1);

    let saved = |pod: &Pod, tool: &str| {
        let out = pod.netns.exec(&[tool, "-t", "nat"]).unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("WEFT")).count()
    };
    assert!(saved(&a, "iptables-legacy-save") > 10, "weft's rules are not in the legacy table");
    assert_eq!(saved(&a, "iptables-nft-save"), 0, "weft's rules went to nf_tables although the node uses legacy");
    cluster.del_pod(&a).unwrap();
    assert_eq!(saved(&a, "iptables-legacy-save"), 0, "rules left after DEL");
}

macro_rules! capture_suite {
    ($mode:ident) => {
        mod $mode {
            #[test]
            fn traffic_flows_through_the_proxy_both_ways() {
                super::traffic_flows_through_the_proxy_both_ways(stringify!($mode));
            }
            #[test]
            fn agent_down_fails_closed_and_restart_readopts() {
                super::agent_down_fails_closed_and_restart_readopts(stringify!($mode));
            }
            #[test]
            fn del_releases_the_pod_and_is_idempotent() {
                super::del_releases_the_pod_and_is_idempotent(stringify!($mode));
            }
            #[test]
            fn status_and_gc_talk_to_the_real_agent() {
                super::status_and_gc_talk_to_the_real_agent(stringify!($mode));
            }
            #[test]
            fn upgrade_with_overlapping_agents() {
                super::upgrade_with_overlapping_agents(stringify!($mode));
            }
            #[test]
            fn excluded_namespace_is_not_captured() {
                super::excluded_namespace_is_not_captured(stringify!($mode));
            }
        }
    };
}

capture_suite!(iptables);
capture_suite!(nftables);
capture_suite!(ebpf);
