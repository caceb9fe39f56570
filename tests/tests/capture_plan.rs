//! Per-pod capture plans (Istio's traffic annotations) and the kubelet probe exemption, on the netns cluster
//! through the real libcni, per redirect backend. The node runs in the test process (`LocalAgent`) so that
//! the tests apply plans the way the pod watcher does, with `Node::recapture`; everything else is the real
//! thing: weft-cni, the kernel's rules and eBPF programs, the in-pod listeners.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;
use weft_agent::capture::plan;
use weft_agent::capture::{PodCapture, DEFAULT_PROBE_SOURCE};
use weft_tests::local_agent::LocalAgent;
use weft_tests::traffic::{echo, EchoServer};
use weft_tests::{bin_path, require_ebpf, Cluster, ClusterOptions, WeftEntry};

const PASSTHROUGH: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));

fn node(test: &str, mode: &str, probe_source: Option<Ipv4Addr>) -> Option<(Cluster, LocalAgent)> {
    if let Err(why) = require_ebpf(mode) {
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    let cluster = Cluster::with_options(test, ClusterOptions::with_weft(entry)).unwrap();
    let agent = LocalAgent::start(&cluster, mode, probe_source).unwrap();
    Some((cluster, agent))
}

fn annotations(pairs: &[(&str, String)]) -> PodCapture {
    let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    PodCapture::from_annotations(&map).unwrap()
}

fn counter(status: &Value, direction: &str, name: &str) -> u64 {
    status[direction][name].as_u64().unwrap_or(0)
}

fn echo_ok(from: &weft_tests::NetNs, to: std::net::SocketAddr) {
    let back = echo(from, to, b"ping").unwrap_or_else(|e| panic!("echo to {to}: {e}"));
    assert_eq!(back, b"ping", "echo to {to}");
}

/// excludeOutboundIPRanges: the pod reaches the excluded address without its outbound listener (the proxy's
/// counters stay), other destinations still through it; removing the annotation live brings the bypass back
/// under capture.
fn excluded_outbound_range_bypasses_the_proxy(mode: &str) {
    let Some((cluster, agent)) = node(&format!("pexcl-{mode}"), mode, None) else { return };
    let a = cluster.add_pod("default", "client").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let c = cluster.add_pod("default", "external").unwrap();
    let (_sb, _sc) = (EchoServer::start(&b.netns, 8080).unwrap(), EchoServer::start(&c.netns, 8080).unwrap());

    agent.recapture(&a, annotations(&[(plan::EXCLUDE_OUTBOUND_IP_RANGES, format!("{}/32", c.ip))])).unwrap();
    cluster.check_pod(&a).expect("CNI CHECK verifies the rules of the pod's new plan");
    echo_ok(&a.netns, c.addr(8080));
    echo_ok(&a.netns, b.addr(8080));
    let s = agent.wait_pod(&a, "client outbound counters", |s| counter(s, "outbound", "accepted") == 1 && counter(s, "outbound", "active") == 0);
    assert_eq!(counter(&s, "outbound", "accepted"), 1, "only the connection to B went through the proxy: {s}");

    agent.recapture(&a, PodCapture::default()).unwrap();
    cluster.check_pod(&a).unwrap();
    echo_ok(&a.netns, c.addr(8080));
    agent.wait_pod(&a, "the connection to C counted once the exclusion is gone", |s| counter(s, "outbound", "accepted") == 2);
}

/// A pod's plan is persisted: a restarted node re-adopts the pod with the same rules (CNI CHECK verifies
/// them against the plan) and the excluded destination still bypasses the proxy.
fn plan_survives_a_restart(mode: &str) {
    let Some((cluster, agent)) = node(&format!("prst-{mode}"), mode, None) else { return };
    let a = cluster.add_pod("default", "client").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let c = cluster.add_pod("default", "external").unwrap();
    let (_sb, _sc) = (EchoServer::start(&b.netns, 8080).unwrap(), EchoServer::start(&c.netns, 8080).unwrap());
    agent.recapture(&a, annotations(&[(plan::EXCLUDE_OUTBOUND_IP_RANGES, format!("{}/32", c.ip))])).unwrap();

    drop(agent);
    let agent = LocalAgent::start(&cluster, mode, None).unwrap();
    assert_eq!(agent.adopt().unwrap(), (3, 0));
    cluster.check_pod(&a).expect("the re-adopted pod has its plan's rules");
    echo_ok(&a.netns, c.addr(8080));
    echo_ok(&a.netns, b.addr(8080));
    let s = agent.wait_pod(&a, "client outbound counters", |s| counter(s, "outbound", "accepted") == 1 && counter(s, "outbound", "active") == 0);
    assert_eq!(counter(&s, "outbound", "accepted"), 1, "{s}");
}

/// includeInboundPorts: only the listed port reaches the app through the inbound listener; the other port
/// is not captured inbound (the app sees the peer itself, not 127.0.0.6).
fn include_inbound_ports_captures_only_those(mode: &str) {
    let Some((cluster, agent)) = node(&format!("pinb-{mode}"), mode, None) else { return };
    let system = cluster.add_pod("kube-system", "uncaptured").unwrap();
    let b = cluster.add_pod("default", "server").unwrap();
    let (on_8080, on_9090) = (EchoServer::start(&b.netns, 8080).unwrap(), EchoServer::start(&b.netns, 9090).unwrap());

    agent.recapture(&b, annotations(&[(plan::INCLUDE_INBOUND_PORTS, "8080".into())])).unwrap();
    cluster.check_pod(&b).unwrap();
    echo_ok(&system.netns, b.addr(8080));
    echo_ok(&system.netns, b.addr(9090));
    assert_eq!(on_8080.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(), [PASSTHROUGH], "8080 is captured");
    assert_eq!(on_9090.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(), [IpAddr::V4(system.ip)], "9090 is not");
    agent.wait_pod(&b, "one inbound connection", |s| counter(s, "inbound", "accepted") == 1 && counter(s, "inbound", "active") == 0);

    // With the annotation gone, 9090 is captured again.
    agent.recapture(&b, PodCapture::default()).unwrap();
    echo_ok(&system.netns, b.addr(9090));
    assert_eq!(on_9090.peers().last().map(|p| p.ip()), Some(PASSTHROUGH));
}

/// The kubelet probe exemption: a "kubelet" on the node probes the pod's probe port and reaches the app
/// directly (from the probe source address), even when the pod's inbound capture refuses everything else;
/// the node's other connections to the pod stay captured.
fn kubelet_probes_reach_the_app(mode: &str) {
    let Some((cluster, agent)) = node(&format!("probe-{mode}"), mode, Some(DEFAULT_PROBE_SOURCE)) else { return };
    let b = cluster.add_pod("default", "server").unwrap();
    let (probe_port, app_port) = (EchoServer::start(&b.netns, 8080).unwrap(), EchoServer::start(&b.netns, 9090).unwrap());
    agent.recapture(&b, PodCapture::default().with_probe_ports(vec![8080])).unwrap();
    cluster.check_pod(&b).unwrap();
    let kubelet = cluster.node();

    echo_ok(kubelet, b.addr(8080));
    assert_eq!(probe_port.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(), [IpAddr::V4(DEFAULT_PROBE_SOURCE)]);
    echo_ok(kubelet, b.addr(9090));
    assert_eq!(app_port.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(), [PASSTHROUGH], "a non-probe port stays captured");
    agent.wait_pod(&b, "only the non-probe connection proxied", |s| counter(s, "inbound", "accepted") == 1 && counter(s, "inbound", "active") == 0);

    // The pod's inbound now refuses everything it captures (its proxy listeners are closed, as with a
    // policy that refuses plaintext): the probe still reaches the app, the other port does not.
    agent.stop_listening();
    echo_ok(kubelet, b.addr(8080));
    let err = echo(kubelet, b.addr(9090), b"x").expect_err("a captured connection bypassed a closed inbound listener");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // The node's rules follow the pods: gone with the last pod that has probe ports.
    let node_rules = || match mode {
        "iptables" => cluster.node_exec_ok(&["iptables-save", "-t", "nat"]).unwrap(),
        _ => cluster.node_exec_ok(&["nft", "list", "ruleset"]).unwrap(),
    };
    assert!(node_rules().contains(&b.ip.to_string()), "{}", node_rules());
    cluster.del_pod(&b).unwrap();
    assert!(!node_rules().contains("WEFT_PROBES") && !node_rules().contains("weft_probes"), "{}", node_rules());
}

macro_rules! plan_suite {
    ($mode:ident) => {
        mod $mode {
            #[test]
            fn excluded_outbound_range_bypasses_the_proxy() {
                super::excluded_outbound_range_bypasses_the_proxy(stringify!($mode));
            }
            #[test]
            fn plan_survives_a_restart() {
                super::plan_survives_a_restart(stringify!($mode));
            }
            #[test]
            fn include_inbound_ports_captures_only_those() {
                super::include_inbound_ports_captures_only_those(stringify!($mode));
            }
            #[test]
            fn kubelet_probes_reach_the_app() {
                super::kubelet_probes_reach_the_app(stringify!($mode));
            }
        }
    };
}

plan_suite!(iptables);
plan_suite!(nftables);
plan_suite!(ebpf);
