//! How captured pods share the node proxy: a pod's share does not grow with its connections, and a pod over
//! its limits is refused while the others are served. Real agent, real capture (iptables), pods as network
//! namespaces; the apps are one event loop each, so only the proxy decides the shares.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use weft_tests::agent::{http_get_path, Agent};
use weft_tests::share::{closed_loop, start_echo, MESSAGE};
use weft_tests::{bin_path, Cluster, ClusterOptions, Pod, WeftEntry};

const PORT: u16 = 9000;

/// A node with weft-cni chained in and an agent started with `config` (JSON) as its config file.
fn node(test: &str, config: &str) -> (Cluster, Agent) {
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    let cluster = Cluster::with_options(test, ClusterOptions::with_weft(entry)).unwrap();
    let path = cluster.work_dir().join("agent.json");
    std::fs::write(&path, config).unwrap();
    let args = ["--config", path.to_str().unwrap()];
    let agent = Agent::start_with_args(&cluster, "iptables", weft_tests::agent::ADMIN, &args).unwrap();
    (cluster, agent)
}

#[test]
fn pods_share_the_proxy_equally_whatever_their_connections() {
    let (cluster, _agent) = node("fair-share", "{}");
    let victim = cluster.add_pod("default", "victim").unwrap();
    let aggressor = cluster.add_pod("default", "aggressor").unwrap();
    let (d, b) = (cluster.add_pod("default", "d").unwrap(), cluster.add_pod("default", "b").unwrap());
    start_echo(&d.netns, PORT).unwrap();
    start_echo(&b.netns, PORT).unwrap();
    let window = Duration::from_secs(4);
    // Both pods ask for more than their share, one with four times the connections of the other.
    let (victim_done, aggressor_done) = std::thread::scope(|s| {
        let flood = s.spawn(|| closed_loop(&aggressor.netns, b.addr(PORT), 64, window));
        let victim_done = closed_loop(&victim.netns, d.addr(PORT), 16, window).unwrap();
        (victim_done, flood.join().unwrap().unwrap())
    });
    let share = victim_done as f64 / (victim_done + aggressor_done) as f64;
    eprintln!("round trips in {window:?}: victim (16 connections) {victim_done}, aggressor (64 connections) {aggressor_done}; victim's share {share:.2}");
    // Shared by connection, the victim would get 16/80 of the proxy; shared by pod, half, give or take.
    assert!((0.3..=0.7).contains(&share), "the victim's share is {share:.2} of the round trips (equal would be 0.5)");
}

/// A connection from `pod` to `to` that has carried one round trip.
fn open(pod: &Pod, to: &Pod) -> std::io::Result<TcpStream> {
    let mut s = pod.netns.tcp_connect(to.addr(PORT), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&[1u8; MESSAGE])?;
    let mut back = [0u8; MESSAGE];
    s.read_exact(&mut back)?;
    Ok(s)
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(line_start)?.trim().parse::<f64>().ok()).map_or(0, |v| v as u64)
}

#[test]
fn a_pod_over_its_connection_limit_is_refused_while_others_are_served() {
    let (cluster, _agent) = node("pod-limits", r#"{"pod_limits": {"max_connections": 3, "max_requests": 100}}"#);
    let a = cluster.add_pod("default", "a").unwrap();
    let c = cluster.add_pod("default", "c").unwrap();
    let (b, d) = (cluster.add_pod("default", "b").unwrap(), cluster.add_pod("default", "d").unwrap());
    start_echo(&b.netns, PORT).unwrap();
    start_echo(&d.netns, PORT).unwrap();

    let held: Vec<TcpStream> = (0..3).map(|_| open(&a, &b).unwrap()).collect();
    assert!(open(&a, &b).is_err(), "a fourth connection of pod a went through its limit of 3");
    let others: Vec<TcpStream> = (0..3).map(|i| open(&c, &d).unwrap_or_else(|e| panic!("pod c's connection {i} refused: {e}"))).collect();

    let (code, metrics) = http_get_path(&cluster, "/stats/prometheus");
    assert_eq!(code, 200, "{metrics}");
    let pod = |name: &str, metric_name: &str| metric(&metrics, &format!("{metric_name}{{pod=\"default/{name}\"}}"));
    assert_eq!(pod("a", "weft_pod_connections"), 3, "{metrics}");
    assert_eq!(pod("a", "weft_pod_connections_refused_total"), 1, "{metrics}");
    assert_eq!(pod("c", "weft_pod_connections"), 3, "{metrics}");
    let per_pod: u64 = ["a", "b", "c", "d"].iter().map(|p| pod(p, "weft_pod_connections")).sum();
    assert_eq!(per_pod, metric(&metrics, "weft_node_connections "), "the pods' connections add up to the node's: {metrics}");
    assert!(pod("a", "weft_pod_received_bytes_total") >= 3 * MESSAGE as u64, "{metrics}");
    drop((held, others));
}
