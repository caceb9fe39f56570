//! What only the eBPF mode has: programs verified and attached at the right hooks on the running kernel,
//! pinned state adopted by a restarted agent without attaching twice, the sockmap fast path, and the maps'
//! occupancy in the node metrics.
//! (The shared capture suite in `capture.rs` also runs in eBPF mode.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use weft_tests::agent::{Agent, ADMIN};
use weft_tests::traffic::{echo, echo_nonblocking, payload, EchoServer};
use weft_tests::{bin_path, cgroup2_root, require_ebpf, wait_for, Cluster, ClusterOptions, WeftEntry};

const HOOKS: [(&str, &str); 4] = [
    ("weft_connect4", "cgroup_inet4_connect"),
    ("weft_connect6", "cgroup_inet6_connect"),
    ("weft_getsockopt", "cgroup_getsockopt"),
    ("weft_sockops", "cgroup_sock_ops"),
];

fn cluster(test: &str) -> Option<Cluster> {
    if let Err(why) = require_ebpf("ebpf") {
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    Some(Cluster::with_options(test, ClusterOptions::with_weft(entry)).unwrap())
}

fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool").arg("-j").args(args).output().expect("bpftool (Debian package bpftool)");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool {args:?} output: {e}"))
}

/// Program id behind each of the agent's pinned cgroup links.
fn pinned_prog_ids(agent: &Agent) -> Vec<u64> {
    HOOKS
        .iter()
        .map(|(name, _)| {
            let pin = agent.pin_path().join("v1/links").join(name);
            bpftool(&["link", "show", "pinned", pin.to_str().unwrap()])["prog_id"].as_u64().unwrap()
        })
        .collect()
}

/// Asserts each program is attached exactly once, at its hook, at the cgroup v2 root.
fn assert_attached_once(ids: &[u64]) {
    let root = cgroup2_root().expect("cgroup v2 is mounted");
    let attached = bpftool(&["cgroup", "show", root.to_str().unwrap()]);
    let attached = attached.as_array().cloned().unwrap_or_default();
    for ((name, hook), id) in HOOKS.iter().zip(ids) {
        let at: Vec<&Value> = attached.iter().filter(|a| a["id"].as_u64() == Some(*id)).collect();
        assert_eq!(at.len(), 1, "{name} (prog {id}) attached {} times at {}: {attached:?}", at.len(), root.display());
        assert_eq!(at[0]["attach_type"], *hook, "{name}: {:?}", at[0]);
        assert_eq!(at[0]["name"], *name);
    }
}

#[test]
fn every_program_passes_the_verifier_and_sits_at_its_hook() {
    let Some(cluster) = cluster("ebpf-load") else { return };
    let agent = Agent::start(&cluster, "ebpf").unwrap();
    assert_attached_once(&pinned_prog_ids(&agent));
    let sk_msg = bpftool(&["prog", "show", "name", "weft_sk_msg"]);
    let progs = if sk_msg.is_array() { sk_msg.as_array().cloned().unwrap() } else { vec![sk_msg] };
    assert!(progs.iter().any(|p| p["type"] == "sk_msg"), "{progs:?}");
    let status = agent.status().unwrap();
    assert_eq!(status["redirect"], "ebpf");
    assert_eq!(status["capture"]["adopted_links"], serde_json::json!([]), "{status}");
}

#[test]
fn restarted_agent_adopts_pinned_state_without_attaching_twice() {
    let Some(cluster) = cluster("ebpf-adopt") else { return };
    let mut agent = Agent::start(&cluster, "ebpf").unwrap();
    let a = cluster.add_pod("default", "client").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let _server = EchoServer::start(&b.netns, 8080).unwrap();
    assert_eq!(echo(&a.netns, b.addr(8080), b"before").unwrap(), b"before");
    let ids = pinned_prog_ids(&agent);

    agent.kill().unwrap();
    // The programs stay attached and the pod stays enrolled: its connects still go to the (closed) listener.
    assert_attached_once(&ids);
    let err = echo(&a.netns, b.addr(8080), b"x").expect_err("a captured pod bypassed the dead proxy");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    agent.restart(&cluster).unwrap();
    let status = agent.status().unwrap();
    let adopted: Vec<&str> = status["capture"]["adopted_links"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(adopted, HOOKS.map(|(n, _)| n), "{status}");
    assert_eq!(pinned_prog_ids(&agent), ids, "the restarted agent replaced the pinned links");
    assert_attached_once(&ids);
    assert_eq!(echo(&a.netns, b.addr(8080), b"after").unwrap(), b"after");
}

#[test]
fn sockmap_fast_path_carries_data_intact() {
    let Some(cluster) = cluster("ebpf-sockmap") else { return };
    let agent = Agent::start_with_args(&cluster, "ebpf", ADMIN, &["--sockmap", "true"]).unwrap();
    let a = cluster.add_pod("default", "client").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let _server = EchoServer::start(&b.netns, 8080).unwrap();

    // While a connection is open, the app's socket and the proxy's are in the sockhash.
    let held = a.netns.tcp_connect(b.addr(8080), Duration::from_secs(5)).unwrap();
    wait_for("app and proxy sockets in the sockhash", Duration::from_secs(5), || {
        let n = agent.status().map_err(|e| e.to_string())?["capture"]["sockhash_entries"].as_u64().unwrap_or(0);
        if n >= 2 { Ok(()) } else { Err(format!("{n} entries")) }
    })
    .unwrap();
    // The node metrics show the maps' occupancy: both pods enrolled, the sockets held, and each capacity.
    let (status, metrics) = weft_tests::agent::http_get_path(&cluster, "/stats/prometheus");
    let sample = |name: &str, map: &str| {
        let prefix = format!("{name}{{map=\"{map}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<u64>().ok())
    };
    assert_eq!(status, 200);
    assert_eq!(sample("weft_ebpf_map_entries", "WEFT_POLICIES"), Some(2), "{metrics}");
    assert!(sample("weft_ebpf_map_entries", "WEFT_SOCKS").is_some_and(|n| n >= 2), "{metrics}");
    assert_eq!(sample("weft_ebpf_map_capacity", "WEFT_ORIG_BY_COOKIE"), Some(65536), "{metrics}");
    drop(held);

    for len in [0, 1, 1500, 8 << 20] {
        let data = payload(len);
        let back = echo_nonblocking(&a.netns, b.addr(8080), &data).unwrap_or_else(|e| panic!("{len} bytes: {e}"));
        assert!(back == data, "{len} bytes came back as {} different bytes", back.len());
    }
    let s = agent.pod_status("default", "client").unwrap().unwrap();
    assert_eq!(s["outbound"]["upstream_connect_failed"], 0, "{s}");
    assert!(Path::new(agent.pin_path()).join("v1/WEFT_SOCKS").exists());
}
