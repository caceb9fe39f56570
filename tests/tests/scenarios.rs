//! The scenario list `cargo xtask e2e-kind` runs in a kind cluster (tests/scenarios.yaml), run here on the netns
//! cluster with the real API server: each workload a Pod of the API (its service account, its labels; captured by
//! `weft.dev/capture=enabled` as in tests/e2e/workloads.yaml), its sandbox made by libcni, its identity issued
//! for its service account by the agent's file CA, and its configuration what istiod gives a sidecar for
//! PeerAuthentication STRICT and the AuthorizationPolicy of tests/e2e/workloads.yaml (translated here as istiod
//! translates it, served per pod by the test xDS server; issue 10 puts the real istiod in its place).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use weft_tests::agent::{Agent, ADMIN};
use weft_tests::kube::KubeApi;
use weft_tests::scenarios::{default_path, Expect, Scenarios};
use weft_tests::traffic::http;
use weft_tests::xds_server::{XdsServer, CLUSTER, LISTENER};
use weft_tests::{bin_path, wait_for, Cluster, ClusterOptions, NetNs, Pod, WeftEntry};

const MESH_NS: &str = "weft-e2e";
const OUTSIDE_NS: &str = "weft-e2e-outside";

/// An HTTP/1.1 server in `pod` answering every request with 200 and `body`.
fn serve_http(pod: &NetNs, port: u16, body: String) {
    let listener = pod.tcp_listen(("0.0.0.0", port)).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            });
        }
    });
}

fn sds(name: &str) -> String {
    format!("{{name: {name}, sds_config: {{api_config_source: {{api_type: GRPC, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}], set_node_on_first_message_only: true, transport_api_version: V3}}, initial_fetch_timeout: 0s, resource_api_version: V3}}}}")
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// The AuthorizationPolicies of tests/e2e/workloads.yaml: (the `version` label they select, the principals
/// they allow, as istiod writes them: `spiffe://` + the policy's principal).
fn policies() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(weft_tests::workspace_root().join("tests/e2e/workloads.yaml")).unwrap();
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["kind"] != "AuthorizationPolicy" {
            continue;
        }
        assert_eq!(doc["spec"]["action"], "ALLOW", "only ALLOW policies are translated here: {doc}");
        let version = doc["spec"]["selector"]["matchLabels"]["version"].as_str().unwrap().to_string();
        let principals = doc["spec"]["rules"].as_array().into_iter().flatten()
            .flat_map(|r| r["from"].as_array().into_iter().flatten())
            .flat_map(|f| f["source"]["principals"].as_array().into_iter().flatten())
            .map(|p| format!("spiffe://{}", p.as_str().unwrap()))
            .collect();
        out.push((version, principals));
    }
    out
}

/// A client's outbound side: per server, a listener for its address and port whose tcp_proxy goes to the
/// server over Istio's mTLS, the server's identity checked.
fn outbound(servers: &[(&Pod, u16, String)]) -> (Vec<String>, Vec<String>) {
    let tcp = |c: &str| format!(r#"[{{name: envoy.filters.network.tcp_proxy, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: "{c}"}}}}]"#);
    let mut listeners = vec![format!("{{name: virtualOutbound, address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}, use_original_dst: true, filter_chains: [{{filters: {}}}]}}", tcp("PassthroughCluster"))];
    let mut clusters = vec!["{name: PassthroughCluster, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 1s}".to_string()];
    for (pod, port, identity) in servers {
        let name = format!("outbound|{port}||{}", pod.name);
        listeners.push(format!("{{name: {ip}_{port}, address: {{socket_address: {{address: {ip}, port_value: {port}}}}}, bind_to_port: false, filter_chains: [{{filters: {}}}]}}", tcp(&name), ip = pod.ip));
        clusters.push(format!(
            r#"{{name: "{name}", type: STATIC, connect_timeout: 1s,
              load_assignment: {{cluster_name: "{name}", endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]}},
              transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext,
                sni: "outbound_.{port}_._.{server}.{MESH_NS}.svc.cluster.local",
                common_tls_context: {{alpn_protocols: [istio-peer-exchange, istio], tls_certificate_sds_secret_configs: [{default}],
                  combined_validation_context: {{default_validation_context: {{match_subject_alt_names: [{{exact: "{identity}"}}]}}, validation_context_sds_secret_config: {rootca}}}}}}}}}}}"#,
            ip = pod.ip,
            server = pod.name,
            default = sds("default"),
            rootca = sds("ROOTCA"),
        ));
    }
    (listeners, clusters)
}

/// A server's inbound side under STRICT: only Istio's mTLS on `port` (a plaintext connection matches no chain
/// and is closed), then the HTTP RBAC filter when a policy selects the server, then the app.
fn inbound(port: u16, allowed: Option<&[String]>) -> (Vec<String>, Vec<String>) {
    let rbac = match allowed {
        Some(principals) => {
            let ids: Vec<String> = principals.iter().map(|p| format!(r#"{{authenticated: {{principal_name: {{exact: "{p}"}}}}}}"#)).collect();
            format!(
                r#"{{name: envoy.filters.http.rbac, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC,
                  rules: {{policies: {{"ns[{MESH_NS}]-policy[allow]-rule[0]": {{permissions: [{{any: true}}], principals: [{{or_ids: {{ids: [{}]}}}}]}}}}}}}}}},"#,
                ids.join(", ")
            )
        }
        None => String::new(),
    };
    let listener = format!(
        r#"{{name: virtualInbound, address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}},
          listener_filters: [{{name: envoy.filters.listener.original_dst, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}}},
                             {{name: envoy.filters.listener.tls_inspector, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}}}],
          filter_chains: [{{filter_chain_match: {{destination_port: {port}, transport_protocol: tls, application_protocols: [istio-peer-exchange, istio]}},
            transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext,
              require_client_certificate: true,
              common_tls_context: {{tls_certificate_sds_secret_configs: [{default}],
                combined_validation_context: {{default_validation_context: {{match_subject_alt_names: [{{prefix: "spiffe://cluster.local/"}}]}}, validation_context_sds_secret_config: {rootca}}}}}}}}},
            filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager,
              stat_prefix: inbound, route_config: {{virtual_hosts: [{{name: inbound, domains: ["*"], routes: [{{match: {{prefix: /}}, route: {{cluster: "inbound|{port}||"}}}}]}}]}},
              http_filters: [{rbac} {{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]}}]}}"#,
        default = sds("default"),
        rootca = sds("ROOTCA"),
    );
    let cluster = format!("{{name: \"inbound|{port}||\", type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED, connect_timeout: 1s, upstream_bind_config: {{source_address: {{address: 127.0.0.6, port_value: 0}}}}}}");
    (vec![listener], vec![cluster])
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn node_id(pod: &Pod) -> String {
    format!("sidecar~{}~{}.{}~{}.svc.cluster.local", pod.ip, pod.name, pod.namespace, pod.namespace)
}

/// What a request from `from` to `to` gets: its status and body, or no answer.
fn outcome(from: &Pod, to: SocketAddr) -> Result<(u16, String), String> {
    http(&from.netns, to, "GET", "server", "/").map(|r| (r.status, r.body)).map_err(|e| e.to_string())
}

#[test]
fn the_e2e_scenarios_on_the_netns_cluster() {
    let list = Scenarios::load(&default_path()).unwrap();
    let cluster = Cluster::with_options("kscn", ClusterOptions::with_weft(WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock"))).unwrap();
    let api = KubeApi::start(cluster.node()).unwrap();
    api.create_namespace(MESH_NS, json!({})).unwrap();
    api.create_namespace(OUTSIDE_NS, json!({})).unwrap();
    let xds = XdsServer::start(cluster.node(), "127.0.0.1:15010".parse().unwrap()).unwrap();
    let pki = weft_tests::pki::dir().unwrap();
    let (ca_cert, ca_key) = (pki.join("ca.pem").display().to_string(), pki.join("ca.key").display().to_string());
    let kubeconfig = api.agent_kubeconfig().unwrap().display().to_string();
    let agent = Agent::start_with_args(
        &cluster,
        "iptables",
        ADMIN,
        &["--node-name", cluster.id(), "--kubeconfig", &kubeconfig, "--xds-address", "127.0.0.1:15010", "--ca", "file", "--ca-cert", &ca_cert, "--ca-key", &ca_key],
    )
    .unwrap();

    // The workloads, as the e2e manifests make them.
    let mut pods: BTreeMap<&str, Pod> = BTreeMap::new();
    for (name, w) in &list.workloads {
        let (ns, mut labels) = match w.captured {
            true => (MESH_NS, json!({"app": name, "weft.dev/capture": "enabled"})),
            false => (OUTSIDE_NS, json!({"app": name})),
        };
        if let Some(version) = &w.version {
            labels["app"] = json!("server");
            labels["version"] = json!(version);
        }
        let pod = api.run_pod(&cluster, ns, name, json!({"labels": labels}), json!({"serviceAccountName": w.service_account})).unwrap();
        if let (Some(port), Some(version)) = (w.port, &w.version) {
            serve_http(&pod.netns, port, format!("{name} {version}"));
        }
        pods.insert(name.as_str(), pod);
    }

    // Each captured pod's configuration, as istiod would give its sidecar.
    let policies = policies();
    let servers: Vec<(&Pod, u16, String)> = list
        .servers()
        .filter_map(|(name, w)| Some((&pods[name], w.port?, spiffe(MESH_NS, &w.service_account))))
        .collect();
    for (name, w) in list.workloads.iter().filter(|(_, w)| w.captured) {
        let pod = &pods[name.as_str()];
        let (mut listeners, mut clusters) = outbound(&servers);
        if let (Some(port), Some(version)) = (w.port, &w.version) {
            let allowed = policies.iter().find(|(v, _)| v == version).map(|(_, p)| p.as_slice());
            let (l, c) = inbound(port, allowed);
            listeners.extend(l);
            clusters.extend(c);
        }
        xds.set_for_node(&node_id(pod), CLUSTER, "1", &refs(&clusters)).unwrap();
        xds.set_for_node(&node_id(pod), LISTENER, "1", &refs(&listeners)).unwrap();
    }
    for (name, w) in list.workloads.iter().filter(|(_, w)| w.captured) {
        wait_for(&format!("{name} configured with its identity"), Duration::from_secs(30), || {
            let status = agent.status().map_err(|e| e.to_string())?;
            let pod = status["pods"].as_array().into_iter().flatten().find(|p| p["name"] == name.as_str()).cloned().unwrap_or_default();
            let identity = spiffe(MESH_NS, &w.service_account);
            let issued = status["identities"].as_array().into_iter().flatten().any(|i| i["identity"] == identity.as_str() && i["state"] == "valid");
            (pod["xds"]["LDS"] == "SYNCED" && issued).then_some(()).ok_or_else(|| format!("{pod} {}", status["identities"]))
        })
        .unwrap();
    }

    // Every scenario, as e2e-kind runs it.
    let mut failures = Vec::new();
    for s in &list.scenarios {
        let (from, to) = (&pods[s.from.as_str()], &pods[s.to.as_str()]);
        let got = wait_for(&s.name, Duration::from_secs(15), || {
            let got = outcome(from, to.addr(s.port));
            let ok = match (&got, s.expect) {
                (Ok((200, body)), Expect::Reach) => body.starts_with(s.to.as_str()),
                (Ok((403, _)), Expect::Denied) => true,
                (Err(_), Expect::Reset) => true,
                _ => false,
            };
            if ok { Ok(got) } else { Err(format!("{got:?}")) }
        });
        match got {
            Ok(got) => eprintln!("scenario {:?}: {got:?}", s.name),
            Err(e) => failures.push(format!("{}: expected {:?}: {e}", s.name, s.expect)),
        }
    }
    assert!(failures.is_empty(), "{} of {} scenarios failed:\n{}", failures.len(), list.scenarios.len(), failures.join("\n"));
}
