//! Istio's mutual TLS on the wire between weft and a real Envoy sidecar, in both directions, with the
//! configurations istiod gives sidecars: pod a is weft (`weft-agent proxy --identity spiffe://cluster.local/ns/a/sa/a
//! --ca istiod`, its certificate requested from the test's istiod CA by impersonation, as ztunnel requests its
//! pods', and served as Istio's SDS `default`/`ROOTCA`), pod b is Envoy (`default`/`ROOTCA` static secrets
//! issued by the same CA, identity `ns/b/sa/b`). Outbound clusters carry Istio's SNI, ALPN
//! (`istio-peer-exchange`, `istio`) and server SAN check; inbound listeners split on `tls_inspector` with
//! Istio's ALPN chain match, require client certificates of the trust domain, and authorize the caller's
//! SPIFFE identity with RBAC (so a 200 proves which identity was presented). Pod b's inbound is PERMISSIVE,
//! pod a's STRICT. All on loopback in one network namespace of the test's own.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use weft_tests::ca_server::{CaServer, CLUSTER_ID, SERVER_NAME};
use weft_tests::traffic::{http, HttpResponse};
use weft_tests::{bin_path, envoy_path, require_root, wait_for, ChildGuard, NetNs};

const WEFT_OUTBOUND: u16 = 15001;
const WEFT_INBOUND: u16 = 15006;
const ENVOY_OUTBOUND: u16 = 16001;
const ENVOY_INBOUND: u16 = 16006;

/// How a sidecar names its own certificate and the roots: istio-agent's SDS for weft (resolved by the
/// agent itself), static secrets for the Envoy without an istio-agent.
fn sds(name: &str, weft: bool) -> String {
    if weft {
        format!("{{name: {name}, sds_config: {{api_config_source: {{api_type: GRPC, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}], set_node_on_first_message_only: true, transport_api_version: V3}}, initial_fetch_timeout: 0s, resource_api_version: V3}}}}")
    } else {
        format!("{{name: {name}}}")
    }
}

/// An outbound cluster to `port` as istiod writes it for a service whose pods run as `peer`.
fn outbound_cluster(name: &str, port: u16, peer: &str, weft: bool) -> String {
    format!(
        r#"  - name: "{name}"
    type: STATIC
    connect_timeout: 1s
    load_assignment: {{cluster_name: "{name}", endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: outbound_.8080_._.svc.ns.svc.cluster.local
        common_tls_context:
          alpn_protocols: [istio-peer-exchange, istio]
          tls_certificate_sds_secret_configs: [{default}]
          combined_validation_context:
            default_validation_context:
              match_subject_alt_names: [{{exact: "{peer}"}}]
            validation_context_sds_secret_config: {rootca}
"#,
        default = sds("default", weft),
        rootca = sds("ROOTCA", weft),
    )
}

fn outbound_listener(port: u16, cluster: &str, wrong: &str) -> String {
    format!(
        r#"  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts:
            - name: svc
              domains: ["*"]
              routes:
              - {{match: {{prefix: /wrong-san}}, route: {{cluster: "{wrong}"}}}}
              - {{match: {{prefix: /}}, route: {{cluster: "{cluster}"}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

/// Istio's virtualInbound: mTLS chosen by the ALPN Istio clients offer, then RBAC allowing `allowed`; with
/// `permissive`, a plaintext chain beside it.
fn inbound_listener(port: u16, allowed: &str, answer: &str, permissive: bool, weft: bool) -> String {
    let hcm = |prefix: &str, body: &str, rbac: bool| {
        let rbac = if rbac {
            format!(
                r#"
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                policies:
                  ns[ns]-policy[allow-caller]-rule[0]:
                    permissions: [{{and_rules: {{rules: [{{any: true}}]}}}}]
                    principals: [{{and_ids: {{ids: [{{or_ids: {{ids: [{{authenticated: {{principal_name: {{exact: "{allowed}"}}}}}}]}}}}]}}}}]"#
            )
        } else {
            String::new()
        };
        format!(
            r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {prefix}
          route_config:
            virtual_hosts: [{{name: inbound, domains: ["*"], routes: [{{match: {{prefix: /}}, direct_response: {{status: 200, body: {{inline_string: "{body}"}}}}}}]}}]
          http_filters:{rbac}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
        )
    };
    let plaintext = if permissive { format!("\n    - filter_chain_match: {{transport_protocol: raw_buffer}}\n      filters:{}", hcm("inbound_plain", &format!("{answer} over plaintext"), false)) } else { String::new() };
    format!(
        r#"  - name: virtualInbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
    filter_chains:
    - filter_chain_match: {{transport_protocol: tls, application_protocols: [istio-peer-exchange, istio, istio-http/1.0, istio-http/1.1, istio-h2]}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificate_sds_secret_configs: [{default}]
            combined_validation_context:
              default_validation_context:
                match_subject_alt_names: [{{prefix: "spiffe://cluster.local/"}}]
              validation_context_sds_secret_config: {rootca}
            tls_params: {{tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3,
              cipher_suites: [ECDHE-ECDSA-AES256-GCM-SHA384, ECDHE-RSA-AES256-GCM-SHA384, ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-GCM-SHA256, AES256-GCM-SHA384, AES128-GCM-SHA256]}}
      filters:{mtls}{plaintext}
"#,
        default = sds("default", weft),
        rootca = sds("ROOTCA", weft),
        mtls = hcm("inbound_mtls", &format!("{answer} over mTLS"), true),
    )
}

fn bootstrap(admin: u16, listeners: &[String], clusters: &[String], secrets: &str) -> String {
    format!("admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\nstatic_resources:\n  listeners:\n{}  clusters:\n{}{secrets}", listeners.concat(), clusters.concat())
}

fn start(ns: &NetNs, name: &'static str, mut cmd: Command, log: &Path) -> ChildGuard {
    let file = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
    ns.enter_on_spawn(&mut cmd);
    ChildGuard::new(cmd.spawn().unwrap(), name)
}

fn get(ns: &NetNs, port: u16, path: &str) -> Result<HttpResponse, String> {
    http(ns, SocketAddr::from(([127, 0, 0, 1], port)), "GET", "svc.ns.svc.cluster.local", path).map_err(|e| e.to_string())
}

fn answered(ns: &NetNs, port: u16, path: &str, status: u16, body: &str) {
    wait_for(&format!("{path} on {port}"), Duration::from_secs(20), || match get(ns, port, path) {
        Ok(r) if r.status == status && r.body.contains(body) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap();
}

#[test]
fn istio_mtls_between_weft_and_an_envoy_sidecar() {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let envoy = envoy_path().unwrap();
    let dir = std::env::temp_dir().join(format!("weft-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ns = NetNs::create_with_lo(&format!("wi-{}", std::process::id() % 100_000)).unwrap();
    let (a, b) = ("spiffe://cluster.local/ns/a/sa/a", "spiffe://cluster.local/ns/b/sa/b");

    // Pod a: weft, identity from the CA; STRICT inbound allowing pod b.
    let weft_config = dir.join("a.yaml");
    std::fs::write(
        &weft_config,
        bootstrap(
            19901,
            &[outbound_listener(WEFT_OUTBOUND, "outbound|8080||b", "outbound|8080||b-wrong"), inbound_listener(WEFT_INBOUND, b, "a", false, true)],
            &[outbound_cluster("outbound|8080||b", ENVOY_INBOUND, b, true), outbound_cluster("outbound|8080||b-wrong", ENVOY_INBOUND, "spiffe://cluster.local/ns/x/sa/x", true)],
            "",
        ),
    )
    .unwrap();
    // The test's istiod secured port, in the namespace, trusting the agent to impersonate a.
    let ca = ns.run_in(|| CaServer::start(&[a])).unwrap();
    let mut cmd = Command::new(bin_path("weft-agent").unwrap());
    cmd.args(["proxy", "--concurrency", "1", "--log-level", "debug", "-c"]).arg(&weft_config);
    cmd.args(["--identity", a, "--ca", "istiod", "--ca-address", &ca.address.to_string(), "--istiod-server-name", SERVER_NAME, "--cluster-id", CLUSTER_ID]);
    cmd.arg("--istiod-root-cert").arg(&ca.root_cert).arg("--istiod-token-file").arg(&ca.token_file);
    let _weft = start(&ns, "weft", cmd, &dir.join("weft.log"));

    // Pod b: Envoy with static default/ROOTCA; PERMISSIVE inbound allowing pod a.
    let (chain, key) = ca.issue_directly(b).unwrap();
    let (chain_file, key_file, root_file) = (dir.join("b.pem"), dir.join("b.key"), dir.join("root.pem"));
    std::fs::write(&chain_file, chain).unwrap();
    std::fs::write(&key_file, key).unwrap();
    std::fs::write(&root_file, ca.root_pem()).unwrap();
    let secrets = format!(
        "  secrets:\n  - {{name: default, tls_certificate: {{certificate_chain: {{filename: \"{}\"}}, private_key: {{filename: \"{}\"}}}}}}\n  - {{name: ROOTCA, validation_context: {{trusted_ca: {{filename: \"{}\"}}}}}}\n",
        chain_file.display(),
        key_file.display(),
        root_file.display()
    );
    let envoy_config = dir.join("b.yaml");
    std::fs::write(
        &envoy_config,
        bootstrap(
            19902,
            &[outbound_listener(ENVOY_OUTBOUND, "outbound|8080||a", "outbound|8080||a-wrong"), inbound_listener(ENVOY_INBOUND, a, "b", true, false)],
            &[outbound_cluster("outbound|8080||a", WEFT_INBOUND, a, false), outbound_cluster("outbound|8080||a-wrong", WEFT_INBOUND, "spiffe://cluster.local/ns/x/sa/x", false)],
            &secrets,
        ),
    )
    .unwrap();
    let mut cmd = Command::new(envoy);
    cmd.args(["--concurrency", "1", "--log-level", "info", "--base-id", "7", "-c"]).arg(&envoy_config);
    let _envoy = start(&ns, "envoy", cmd, &dir.join("envoy.log"));

    // weft → Envoy: weft presents its CA-issued identity (Envoy's RBAC allows exactly it) and checks b's SAN.
    answered(&ns, WEFT_OUTBOUND, "/", 200, "b over mTLS");
    answered(&ns, WEFT_OUTBOUND, "/wrong-san", 503, "");
    // Envoy → weft: weft serves its identity (Envoy checks the SAN is a's) and authorizes b's.
    answered(&ns, ENVOY_OUTBOUND, "/", 200, "a over mTLS");
    answered(&ns, ENVOY_OUTBOUND, "/wrong-san", 503, "");
    // PERMISSIVE (Envoy) takes plaintext; STRICT (weft) does not.
    answered(&ns, ENVOY_INBOUND, "/", 200, "b over plaintext");
    let strict = get(&ns, WEFT_INBOUND, "/");
    assert!(strict.as_ref().map_or(true, |r| r.status == 0), "plaintext to a STRICT port must get nothing: {strict:?}");
    // a's certificate came from the CA by impersonation: one request, for exactly a.
    let issued = ca.issued();
    assert!(!issued.is_empty() && issued.iter().all(|i| i.identity == a), "{issued:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One request on a new TLS connection to `port`: the DER of the certificate the server presented, if the
/// request got its 200.
async fn tls_request(port: u16) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let mut tls = weft_tests::tls_client::connect(tcp, &Default::default()).await?;
    let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).ok_or("no certificate")?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(presented)
    } else {
        Err(String::from_utf8_lossy(&answer).into_owned())
    }
}

/// Rotation under load: weft's identity certificate lives 4 s and is renewed at about half of it while a
/// client keeps opening TLS connections: no request fails, and new handshakes show new certificates.
#[test]
fn identity_rotation_under_load_loses_no_request() {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let pki = weft_tests::pki::dir().unwrap().to_path_buf();
    let dir = std::env::temp_dir().join(format!("weft-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ns = NetNs::create_with_lo(&format!("wr-{}", std::process::id() % 100_000)).unwrap();
    let config = dir.join("proxy.yaml");
    let listener = inbound_listener(WEFT_INBOUND, "unused", "a", false, true);
    // Any client: this listener asks for no client certificate.
    let listener = listener.replace("require_client_certificate: true", "require_client_certificate: false").replace(
        "filter_chain_match: {transport_protocol: tls, application_protocols: [istio-peer-exchange, istio, istio-http/1.0, istio-http/1.1, istio-h2]}",
        "filter_chain_match: {transport_protocol: tls}",
    );
    let listener = listener.split("\n          - name: envoy.filters.http.rbac").next().unwrap().to_string()
        + "\n          - name: envoy.filters.http.router\n            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}\n";
    std::fs::write(&config, bootstrap(19901, &[listener], &[], "")).unwrap();
    let mut cmd = Command::new(bin_path("weft-agent").unwrap());
    cmd.args(["proxy", "--concurrency", "2", "-c"]).arg(&config);
    cmd.args(["--identity", "spiffe://cluster.local/ns/a/sa/a", "--cert-lifetime-s", "4", "--ca", "file", "--ca-cert"]).arg(pki.join("ca.pem")).arg("--ca-key").arg(pki.join("ca.key"));
    let _weft = start(&ns, "weft", cmd, &dir.join("weft.log"));
    let (sent, failed, certificates) = ns.run_in(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                wait_for_async(|| tls_request(WEFT_INBOUND)).await;
                let (mut sent, mut failed, mut seen) = (0u32, Vec::new(), Vec::<Vec<u8>>::new());
                let until = tokio::time::Instant::now() + Duration::from_secs(7);
                while tokio::time::Instant::now() < until {
                    sent += 1;
                    match tls_request(WEFT_INBOUND).await {
                        Ok(der) if !seen.contains(&der) => seen.push(der),
                        Ok(_) => {}
                        Err(e) => failed.push(e),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (sent, failed, seen.len())
            })
        });
    assert!(failed.is_empty(), "{} of {sent} requests failed during rotation: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    assert!(certificates >= 3, "7 s of 4 s certificates renewed at half-life must show at least 3 certificates, saw {certificates} in {sent} requests");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `f` until it succeeds (the proxy is up and has its first certificate), for at most 20 s.
async fn wait_for_async<F, Fut>(f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>, String>>,
{
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(_) => return,
            Err(e) if tokio::time::Instant::now() > until => panic!("the proxy never served TLS: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
