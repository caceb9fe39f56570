//! Each captured pod's sidecar ports, served by `weft-agent run` inside the pod's netns: 15021
//! `/healthz/ready` (503 until the pod's xDS has delivered clusters and listeners, 200 after) and 15020
//! (`/healthz/ready`, `/stats/prometheus` with the pod's own counters and `istio_build`), reached from the
//! node's netns as kubelet and Prometheus reach them.

use std::net::SocketAddr;
use std::time::Duration;

use weft_tests::agent::{Agent, ADMIN};
use weft_tests::traffic::{echo, http_request, EchoServer, HttpResponse};
use weft_tests::xds_server::{XdsServer, CLUSTER, LISTENER};
use weft_tests::{bin_path, require_root, wait_for, Cluster, ClusterOptions, NetNs, WeftEntry};

/// One GET from the node's netns (where kubelet runs) to `addr`.
fn get(node: &NetNs, addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    let stream = node.tcp_connect(addr, Duration::from_secs(2)).map_err(|e| format!("connect {addr}: {e}"))?;
    http_request(stream, "GET", &addr.to_string(), path).map_err(|e| format!("GET {addr}{path}: {e}"))
}

/// The value of the sample `series` (name and labels exactly) in a Prometheus text body.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Istio's sidecar shape: outbound passes through to the original destination, inbound reaches the app from
/// 127.0.0.6.
fn sidecar_listeners() -> Vec<String> {
    let tcp = |cluster: &str| format!(r#"[{{name: envoy.filters.network.tcp_proxy, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: {cluster}}}}}]"#);
    vec![
        format!("{{name: virtualOutbound, address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}, use_original_dst: true, filter_chains: [{{filters: {}}}]}}", tcp("PassthroughCluster")),
        format!(
            r#"{{name: virtualInbound, address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}},
               listener_filters: [{{name: envoy.filters.listener.original_dst, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}}}],
               filter_chains: [{{filters: {}}}]}}"#,
            tcp("InboundPassthroughCluster")
        ),
    ]
}

const SIDECAR_CLUSTERS: [&str; 2] = [
    "{name: PassthroughCluster, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 1s}",
    "{name: InboundPassthroughCluster, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 1s, upstream_bind_config: {source_address: {address: 127.0.0.6, port_value: 0}}}",
];

#[test]
fn ready_once_the_pods_configuration_arrives_and_stats_count_its_traffic() {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    let cluster = Cluster::with_options("podhealth", ClusterOptions::with_weft(entry)).unwrap();
    // A control plane that has nothing for anyone yet.
    let xds = XdsServer::start(cluster.node(), "127.0.0.1:18000".parse().unwrap()).unwrap();
    let agent = Agent::start_with_args(&cluster, "iptables", ADMIN, &["--xds-address", "127.0.0.1:18000"]).unwrap();
    let server = cluster.add_pod("default", "server").unwrap();
    let client = cluster.add_pod("default", "client").unwrap();
    let node = cluster.node();

    // Captured (the ADD has returned): the ports answer at once, not ready.
    for addr in [client.addr(15021), client.addr(15020)] {
        let r = get(node, addr, "/healthz/ready").unwrap();
        assert_eq!(r.status, 503, "{addr}: {r:?}");
        assert!(r.body.contains("no clusters (CDS) and no listeners (LDS) accepted"), "{addr}: {}", r.body);
    }
    let status = agent.pod_status("default", "client").unwrap().unwrap();
    assert_eq!(status["health_ports"].as_array().map(|a| a.iter().any(|p| p == "0.0.0.0:15021")), Some(true), "{status}");

    // Clusters alone are not enough.
    xds.set(CLUSTER, "1", &SIDECAR_CLUSTERS).unwrap();
    wait_for("the client's CDS", Duration::from_secs(20), || {
        let s = agent.pod_status("default", "client").map_err(|e| e.to_string())?.ok_or("no client")?;
        if s["xds"]["CDS"] == "SYNCED" { Ok(()) } else { Err(s["xds"].to_string()) }
    })
    .unwrap();
    let r = get(node, client.addr(15021), "/healthz/ready").unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("no listeners (LDS)") && !r.body.contains("CDS"), "{}", r.body);

    // Listeners: ready, on both ports, for both pods.
    let listeners = sidecar_listeners();
    let refs: Vec<&str> = listeners.iter().map(String::as_str).collect();
    xds.set(LISTENER, "1", &refs).unwrap();
    for pod in [&client, &server] {
        for port in [15021, 15020] {
            wait_for(&format!("{}:{port} ready", pod.name), Duration::from_secs(20), || {
                let r = get(node, pod.addr(port), "/healthz/ready")?;
                if r.status == 200 { Ok(()) } else { Err(format!("{} {}", r.status, r.body)) }
            })
            .unwrap();
        }
    }

    // Traffic from client to server, through both pods' listeners.
    let _app = EchoServer::start(&server.netns, 7000).unwrap();
    for _ in 0..3 {
        assert_eq!(echo(&client.netns, server.addr(7000), b"counted").unwrap(), b"counted");
    }
    // Counters move when connections close: poll.
    let stats = |pod: &weft_tests::Pod| get(node, pod.addr(15020), "/stats/prometheus").map(|r| (r.status, r.head, r.body));
    let text = wait_for("the client's outbound counters", Duration::from_secs(10), || {
        let (code, _, text) = stats(&client)?;
        let accepted = sample(&text, r#"weft_pod_listener_connections_total{direction="outbound"}"#).unwrap_or(0.0);
        let sent = sample(&text, r#"weft_pod_listener_received_bytes_total{direction="outbound"}"#).unwrap_or(0.0);
        if code == 200 && accepted >= 3.0 && sent >= 3.0 * 7.0 { Ok(text) } else { Err(format!("{code}\n{text}")) }
    })
    .unwrap();
    assert_eq!(sample(&text, r#"istio_build{component="proxy",tag="1.31.0"}"#), Some(1.0), "{text}");
    assert!(sample(&text, "weft_pod_connections_total").is_some_and(|n| n >= 3.0), "{text}");
    assert_eq!(sample(&text, r#"weft_pod_listener_connections_total{direction="inbound"}"#), Some(0.0), "{text}");
    wait_for("the server's inbound counters", Duration::from_secs(10), || {
        let (_, _, text) = stats(&server)?;
        let accepted = sample(&text, r#"weft_pod_listener_connections_total{direction="inbound"}"#).unwrap_or(0.0);
        if accepted >= 3.0 { Ok(()) } else { Err(text) }
    })
    .unwrap();
    let (_, head, _) = stats(&server).unwrap();
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");

    // Only 15020 serves the stats.
    assert_eq!(get(node, client.addr(15021), "/stats/prometheus").unwrap().status, 404);
}

#[test]
fn without_a_control_plane_ready_at_capture_and_the_ports_can_be_turned_off() {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    let cluster = Cluster::with_options("podready", ClusterOptions::with_weft(entry)).unwrap();
    let mut agent = Agent::start(&cluster, "nftables").unwrap();
    let pod = cluster.add_pod("default", "solo").unwrap();
    let r = get(cluster.node(), pod.addr(15021), "/healthz/ready").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, ""), "{r:?}");
    let r = get(cluster.node(), pod.addr(15020), "/stats/prometheus").unwrap();
    assert!(r.body.contains("istio_build{component=\"proxy\",tag=\"1.31.0\"} 1\n"), "{}", r.body);

    // Off: a restarted agent re-adopts the pod without the ports, which nobody answers on then.
    agent.stop().unwrap();
    let mut off = Agent::start_with_args(&cluster, "nftables", ADMIN, &["--pod-health-ports", "false"]).unwrap();
    let status = off.pod_status("default", "solo").unwrap().unwrap();
    assert!(status.get("health_ports").is_none(), "{status}");
    assert_eq!(status["listening"], true, "{status}");
    let refused = cluster.node().tcp_connect(pod.addr(15021), Duration::from_secs(2));
    assert!(refused.is_err(), "15021 still answers with pod_health_ports false");
    off.stop().unwrap();
}
