//! `weft-agent run` with a control plane: every captured pod gets its own xDS stream with the node identity
//! its Istio sidecar would present, on a connection of its own (as each sidecar has), and each pod's configuration and sync
//! status are visible per pod. The control plane is the test management server (no istiod here), run in the
//! node's network namespace.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;
use weft_tests::agent::{http_get_path, Agent, ADMIN};
use weft_tests::traffic::{echo, http, EchoServer};
use weft_tests::xds_server::{XdsServer, CLUSTER, LISTENER};
use weft_tests::{bin_path, require_root, wait_for, Cluster, ClusterOptions, Pod, WeftEntry};

const PODS: usize = 100;

fn clusters() -> Vec<String> {
    (0..20)
        .map(|i| {
            format!("{{name: svc{i}, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: svc{i}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 10.96.0.{i}, port_value: 80}}}}}}}}]}}]}}}}")
        })
        .collect()
}

const OUTBOUND: &str = r#"
name: virtualOutbound
address: {socket_address: {address: 0.0.0.0, port_value: 15001}}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: out, cluster: svc0}
"#;

#[test]
fn every_pod_gets_its_own_stream_on_its_own_connection() {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    let cluster = Cluster::with_options("podxds", ClusterOptions::with_weft(entry)).unwrap();
    let server = XdsServer::start(cluster.node(), "127.0.0.1:18000".parse().unwrap()).unwrap();
    let shared = clusters();
    let refs: Vec<&str> = shared.iter().map(String::as_str).collect();
    server.set(CLUSTER, "1", &refs).unwrap();
    server.set(LISTENER, "1", &[OUTBOUND]).unwrap();
    let agent = Agent::start_with_args(&cluster, "iptables", ADMIN, &["--xds-address", "127.0.0.1:18000"]).unwrap();

    let pods: Vec<_> = (0..PODS).map(|i| cluster.add_pod("default", &format!("p{i}")).unwrap()).collect();

    // Each pod presents its own sidecar identity.
    wait_for("a stream per pod", Duration::from_secs(30), || {
        let ids: std::collections::HashSet<String> = server.requests().into_iter().filter_map(|r| r.node_id).collect();
        if ids.len() == PODS { Ok(()) } else { Err(format!("{} node ids", ids.len())) }
    })
    .unwrap();
    let ids: std::collections::HashSet<String> = server.requests().into_iter().filter_map(|r| r.node_id).collect();
    for pod in &pods {
        let id = format!("sidecar~{}~{}.default~default.svc.cluster.local", pod.ip, pod.name);
        assert!(ids.contains(&id), "no stream for {id}");
    }
    // A connection per pod, so that one pod's configuration storm queues on its own connection only.
    assert_eq!(server.connections(), PODS, "one HTTP/2 connection per pod's stream");

    // Every pod is SYNCED for what the server sent.
    wait_for("every pod SYNCED", Duration::from_secs(30), || {
        let status = agent.status().map_err(|e| e.to_string())?;
        let pods = status["pods"].as_array().cloned().unwrap_or_default();
        let synced = pods.iter().filter(|p| p["xds"]["CDS"] == "SYNCED" && p["xds"]["LDS"] == "SYNCED").count();
        if synced == PODS { Ok(()) } else { Err(format!("{synced} of {} synced", pods.len())) }
    })
    .unwrap();
    let status = agent.status().unwrap();
    assert_eq!(status["pods"][0]["xds"]["EDS"], "NOT SENT", "{}", status["pods"][0]);

    // Per-pod configuration, in Envoy's config_dump shape.
    let (code, body) = http_get_path(&cluster, "/pods/default/p7/config_dump?resource=dynamic_active_clusters");
    assert_eq!(code, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["configs"].as_array().map(Vec::len), Some(20), "{body}");
    let (code, _) = http_get_path(&cluster, "/pods/default/nope/config_dump");
    assert_eq!(code, 404);

    // DEL releases the pod, its stream with it.
    cluster.del_pod(&pods[0]).unwrap();
    assert!(agent.pod_status("default", "p0").unwrap().is_none());
}

/// Istio's sidecar shape: a `virtualOutbound` listener on 15001 that hands connections to the listener of their
/// original destination (or passes them through), and a `virtualInbound` on 15006 with filter chains by port.
fn sidecar_listeners(http_body: &str, extra: &[String]) -> Vec<String> {
    let tcp = |cluster: &str| format!(r#"[{{name: envoy.filters.network.tcp_proxy, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: {cluster}}}}}]"#);
    let mut listeners = vec![
        format!("{{name: virtualOutbound, address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}, use_original_dst: true, filter_chains: [{{filters: {}}}]}}", tcp("PassthroughCluster")),
        format!(
            r#"{{name: virtualInbound, address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}},
               listener_filters: [{{name: envoy.filters.listener.original_dst, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}}}],
               filter_chains: [{{filter_chain_match: {{destination_port: 7200}}, filters: {}}}],
               default_filter_chain: {{filters: {}}}}}"#,
            tcp("BlackHoleCluster"),
            tcp("InboundPassthroughCluster")
        ),
        format!(
            r#"{{name: 0.0.0.0_8080, address: {{socket_address: {{address: 0.0.0.0, port_value: 8080}}}}, bind_to_port: false,
               filter_chains: [{{filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: h,
                 route_config: {{virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "{http_body}"}}}}}}]}}]}},
                 http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]}}]}}"#
        ),
    ];
    listeners.extend_from_slice(extra);
    listeners
}

fn sidecar_clusters(server: &Pod) -> Vec<String> {
    vec![
        "{name: PassthroughCluster, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 1s}".to_string(),
        "{name: InboundPassthroughCluster, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 1s, upstream_bind_config: {source_address: {address: 127.0.0.6, port_value: 0}}}".to_string(),
        "{name: BlackHoleCluster, type: STATIC, connect_timeout: 1s}".to_string(),
        format!("{{name: echo7000, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: echo7000, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {}, port_value: 7000}}}}}}}}]}}]}}}}", server.ip),
    ]
}

fn node_id(pod: &Pod) -> String {
    format!("sidecar~{}~{}.{}~{}.svc.cluster.local", pod.ip, pod.name, pod.namespace, pod.namespace)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Polls until `from`'s request to `to:8080` is answered with `body` (configuration arrives asynchronously).
fn wait_http_body(from: &Pod, to: &Pod, body: &str) {
    wait_for(&format!("{} to see {body:?}", from.name), Duration::from_secs(30), || {
        let r = http(&from.netns, to.addr(8080), "GET", "svc", "/").map_err(|e| e.to_string())?;
        if r.body == body { Ok(()) } else { Err(format!("{} {:?}", r.status, r.body)) }
    })
    .unwrap();
}

#[test]
fn captured_traffic_follows_each_pods_own_configuration() {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let entry = WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock");
    let cluster = Cluster::with_options("podcfg", ClusterOptions::with_weft(entry)).unwrap();
    let xds = XdsServer::start(cluster.node(), "127.0.0.1:18000".parse().unwrap()).unwrap();
    let agent = Agent::start_with_args(&cluster, "iptables", ADMIN, &["--xds-address", "127.0.0.1:18000"]).unwrap();
    let server = cluster.add_pod("default", "server").unwrap();
    let (c1, c2) = (cluster.add_pod("default", "c1").unwrap(), cluster.add_pod("default", "c2").unwrap());
    let echo7000 = EchoServer::start(&server.netns, 7000).unwrap();
    let _echo7200 = EchoServer::start(&server.netns, 7200).unwrap();

    // Every pod gets the mesh-wide configuration; c1 gets its own listeners on top: port 7100 of any host is
    // served by the echo7000 cluster, and its HTTP route on 8080 answers differently.
    xds.set(CLUSTER, "1", &refs(&sidecar_clusters(&server))).unwrap();
    xds.set(LISTENER, "1", &refs(&sidecar_listeners("mesh route", &[]))).unwrap();
    let to_7000 = "{name: 0.0.0.0_7100, address: {socket_address: {address: 0.0.0.0, port_value: 7100}}, bind_to_port: false, filter_chains: [{filters: [{name: envoy.filters.network.tcp_proxy, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: echo7000}}]}]}".to_string();
    xds.set_for_node(&node_id(&c1), LISTENER, "c1-1", &refs(&sidecar_listeners("c1 route", std::slice::from_ref(&to_7000)))).unwrap();

    // The server pod's inbound listener decides its connections below: without its configuration it refuses
    // them (fail closed), so wait until it has arrived.
    wait_for("the server pod's listeners", Duration::from_secs(30), || {
        let status = agent.pod_status("default", "server").map_err(|e| e.to_string())?.ok_or("server not captured")?;
        if status["xds"]["LDS"] == "SYNCED" && status["xds"]["CDS"] == "SYNCED" { Ok(()) } else { Err(status["xds"].to_string()) }
    })
    .unwrap();
    // HTTP to port 8080 (where nothing listens in the server pod) is answered by each client's own route.
    wait_http_body(&c1, &server, "c1 route");
    wait_http_body(&c2, &server, "mesh route");

    // c1's listener for port 7100 sends the connection to the echo7000 cluster; c2 has no such listener, so
    // its connection passes through to server:7100, where nobody listens.
    assert_eq!(echo(&c1.netns, server.addr(7100), b"via c1's listener").unwrap(), b"via c1's listener");
    assert_eq!(echo(&c2.netns, server.addr(7100), b"x").unwrap_or_default(), b"", "c2 reached a port nobody listens on");

    // Passthrough, then the server pod's inbound configuration: port 7000 reaches the app from Istio's inbound
    // passthrough address (the cluster's upstream_bind_config); port 7200 is blackholed by its filter chain
    // although the app listens there.
    assert_eq!(echo(&c2.netns, server.addr(7000), b"inbound").unwrap(), b"inbound");
    assert!(echo7000.peers().iter().any(|p| p.ip() == IpAddr::from([127, 0, 0, 6])), "peers: {:?}", echo7000.peers());
    assert_eq!(echo(&c1.netns, server.addr(7200), b"x").unwrap_or_default(), b"", "the inbound chain for 7200 let it through");

    // An update reaches new connections; a connection opened before it keeps flowing.
    let held = c1.netns.tcp_connect(server.addr(7100), Duration::from_secs(5)).unwrap();
    xds.set_for_node(&node_id(&c1), LISTENER, "c1-2", &refs(&sidecar_listeners("c1 route v2", &[to_7000]))).unwrap();
    wait_http_body(&c1, &server, "c1 route v2");
    assert_eq!(weft_tests::traffic::echo_on(held, b"still here").unwrap(), b"still here");
    let status = agent.pod_status("default", "c1").unwrap().unwrap();
    assert_eq!(status["xds"]["LDS"], "SYNCED", "{status}");
}
