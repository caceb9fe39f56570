//! `weft-agent run` with a control plane: every captured pod gets its own xDS stream with the node identity
//! its Istio sidecar would present, all streams share one connection, and each pod's configuration and sync
//! status are visible per pod. The control plane is the test management server (no istiod here), run in the
//! node's network namespace.

use std::time::Duration;

use serde_json::Value;
use weft_tests::agent::{http_get_path, Agent, ADMIN};
use weft_tests::xds_server::{XdsServer, CLUSTER, LISTENER};
use weft_tests::{bin_path, require_root, wait_for, Cluster, ClusterOptions, WeftEntry};

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
fn every_pod_gets_its_own_stream_over_one_connection() {
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
    // One HTTP/2 connection carries them all.
    assert_eq!(server.connections(), 1, "streams did not share one connection");

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
