//! The xDS client against the test management server (tests/src/xds_server.rs), in both ADS variants:
//! initial sync, update, NACK with detail and last good kept, partial apply, removal, stream drop with
//! reconnect (delta: initial_resource_versions), and a server restart. Each test runs in its own network
//! namespace; all traffic stays on its loopback.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use weft_tests::traffic::{echo, EchoServer};
use weft_tests::xds_server::{ads_bootstrap as bootstrap, Recorded, XdsServer, CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};
use weft_tests::{bin_path, require_root, wait_for, ChildGuard, NetNs};

const XDS: &str = "127.0.0.1:18000";
const ADMIN: &str = "127.0.0.1:19901";

const ECHO_CLUSTER: &str = r#"
name: echo
type: STATIC
connect_timeout: 1s
load_assignment:
  cluster_name: echo
  endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 19300}}}}]}]
"#;

fn listener(name: &str, port: u16, extra: &str) -> String {
    listener_to(name, port, "echo", extra)
}

fn listener_to(name: &str, port: u16, cluster: &str, extra: &str) -> String {
    format!(
        r#"
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: {name}
      cluster: {cluster}{extra}
"#
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn works(ns: &NetNs, port: u16) {
    wait_for(&format!("echo through port {port}"), Duration::from_secs(10), || {
        echo(ns, addr(port), b"through weft").map_err(|e| e.to_string()).and_then(|b| if b == b"through weft" { Ok(()) } else { Err(format!("{b:?}")) })
    })
    .unwrap();
}

fn refused(ns: &NetNs, port: u16) {
    wait_for(&format!("port {port} to stop listening"), Duration::from_secs(10), || match ns.tcp_connect(addr(port), Duration::from_secs(1)) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap();
}

fn admin_get(ns: &NetNs, path: &str) -> String {
    weft_tests::traffic::http(ns, ADMIN.parse().unwrap(), "GET", "admin", path).unwrap().body
}

fn start_weft(ns: &NetNs, config: &std::path::Path) -> ChildGuard {
    start_weft_with(ns, config, &[])
}

fn start_weft_with(ns: &NetNs, config: &std::path::Path, args: &[&str]) -> ChildGuard {
    let mut cmd = Command::new(bin_path("weft-agent").unwrap());
    cmd.args(["proxy", "--concurrency", "1", "--log-level", "debug", "-c"]).arg(config).args(args).stdout(Stdio::null()).stderr(Stdio::null());
    ns.enter_on_spawn(&mut cmd);
    ChildGuard::new(cmd.spawn().unwrap(), "weft-agent proxy")
}

/// ACK of `type_url` in a state-of-the-world stream at `version`, or (delta) the n-th ACK of the type.
fn ack(server: &XdsServer, delta: bool, type_url: &str, version: &str, nth: usize) -> Recorded {
    server
        .wait_request(&format!("ACK of {type_url} {version}"), |r| {
            r.type_url == type_url && r.is_ack() && if delta { count_acks(server, type_url) >= nth } else { r.version_info == version }
        })
        .unwrap()
}

fn count_acks(server: &XdsServer, type_url: &str) -> usize {
    server.requests().iter().filter(|r| r.type_url == type_url && r.is_ack()).count()
}

/// A test's own network namespace with a management server at [`XDS`] and a bootstrap file for `api` in
/// `dir` (the test removes it); `None` (with the reason printed) where the tests cannot run.
struct Setup {
    ns: NetNs,
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    server: XdsServer,
}

impl Setup {
    fn new(tag: &str, api: &str) -> Option<Setup> {
        if let Err(why) = require_root() {
            eprintln!("SKIPPED {tag}: {why}");
            return None;
        }
        let ns = NetNs::create_with_lo(&format!("wx-{}-{tag}", std::process::id() % 100_000)).unwrap();
        let dir = std::env::temp_dir().join(format!("weft-xds-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("bootstrap.yaml");
        std::fs::write(&config, bootstrap(api)).unwrap();
        let server = XdsServer::start(&ns, XDS.parse().unwrap()).unwrap();
        Some(Setup { ns, dir, config, server })
    }
}


fn scenario(api: &str) {
    let delta = api == "DELTA_GRPC";
    let Some(Setup { ns, dir, config, server }) = Setup::new(if delta { "d" } else { "s" }, api) else { return };
    let _upstream = EchoServer::start(&ns, 19300).unwrap();

    // Initial sync.
    server.set(CLUSTER, "1", &[ECHO_CLUSTER]).unwrap();
    server.set(LISTENER, "1", &[&listener("l1", 19100, "")]).unwrap();
    let _weft = start_weft(&ns, &config);
    ack(&server, delta, CLUSTER, "1", 1);
    ack(&server, delta, LISTENER, "1", 1);
    works(&ns, 19100);
    let first = server.requests().into_iter().find(|r| r.node_id.is_some()).expect("no request carried the node");
    assert_eq!(first.node_id.as_deref(), Some("weft-xds-test"));

    // Update: a second listener.
    server.set(LISTENER, "2", &[&listener("l1", 19100, ""), &listener("l2", 19101, "")]).unwrap();
    ack(&server, delta, LISTENER, "2", 2);
    works(&ns, 19101);

    // A bad l1 next to a new l3: NACK naming l1 and the field, l3 applied, the last good l1 still serving.
    let bad = listener("l1", 19100, "\n      hash_policy: [{source_ip: {}}]");
    server.set(LISTENER, "3", &[&bad, &listener("l2", 19101, ""), &listener("l3", 19102, "")]).unwrap();
    let nack = server.wait_request("NACK of listeners v3", |r| r.type_url == LISTENER && r.error.is_some()).unwrap();
    let detail = nack.error.unwrap();
    assert!(detail.contains("Listener 'l1'") && detail.contains("typed_config.hash_policy: is not supported"), "{detail}");
    if !delta {
        assert_eq!(nack.version_info, "2", "a NACK carries the last accepted version");
    }
    works(&ns, 19102);
    works(&ns, 19100);

    // Removal.
    server.set(LISTENER, "4", &[&listener("l1", 19100, ""), &listener("l3", 19102, "")]).unwrap();
    ack(&server, delta, LISTENER, "4", 3);
    refused(&ns, 19101);
    let dump = admin_get(&ns, "/config_dump?resource=dynamic_listeners");
    assert!(dump.contains("\"name\": \"l1\"") && dump.contains("\"name\": \"l3\"") && !dump.contains("\"name\": \"l2\""), "{dump}");

    // Dropped stream: the client reconnects and says what it already has.
    let before = server.requests().len();
    server.drop_streams();
    let again = server
        .wait_request_since(before, "a fresh LDS subscription after the drop", |r| r.type_url == LISTENER && r.response_nonce.is_empty())
        .unwrap();
    if delta {
        let versions = &again.initial_resource_versions;
        // l1 was last accepted at v4 (v3's l1 was rejected), l3 at v3.
        assert_eq!(versions.get("l1").map(String::as_str), Some("4"), "{versions:?}");
        assert_eq!(versions.get("l3").map(String::as_str), Some("3"), "{versions:?}");
        assert!(versions.contains_key("l3") && !versions.contains_key("l2"), "{versions:?}");
    } else {
        assert_eq!(again.version_info, "4");
    }
    works(&ns, 19100);

    // Server restart: a new server at the same address, with l2 back.
    server.stop();
    let server = XdsServer::start(&ns, XDS.parse().unwrap()).unwrap();
    server.set(CLUSTER, "1", &[ECHO_CLUSTER]).unwrap();
    server.set(LISTENER, "5", &[&listener("l1", 19100, ""), &listener("l2", 19101, ""), &listener("l3", 19102, "")]).unwrap();
    ack(&server, delta, LISTENER, "5", 1);
    works(&ns, 19101);
    works(&ns, 19100);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn state_of_the_world_ads() {
    scenario("GRPC");
}

#[test]
fn delta_ads() {
    scenario("DELTA_GRPC");
}

/// An HTTP listener `h1` on 19200 whose routes come from `routes` (an inline `route_config` or `rds`).
fn http_listener(routes: &str) -> String {
    format!(
        r#"
name: h1
address: {{socket_address: {{address: 127.0.0.1, port_value: 19200}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: h1
      {routes}
      http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
"#
    )
}

/// Inline routes naming a cluster that does not exist: both Envoy and weft NACK the listener.
const ROUTES_TO_MISSING: &str =
    r#"route_config: {virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: missing}}]}]}"#;

/// Starts `proxy` against a management server serving l1, checks it serves, then pushes [`ROUTES_TO_MISSING`]
/// and returns the NACK's detail (l1 must keep serving).
fn nack_of_route_to_missing_cluster(tag: &str, start: impl Fn(&NetNs, &std::path::Path) -> ChildGuard) -> Option<String> {
    let Setup { ns, dir, config, server } = Setup::new(tag, "GRPC")?;
    let _upstream = EchoServer::start(&ns, 19300).unwrap();
    server.set(CLUSTER, "1", &[ECHO_CLUSTER]).unwrap();
    server.set(LISTENER, "1", &[&listener("l1", 19100, "")]).unwrap();
    let _proxy = start(&ns, &config);
    ack(&server, false, LISTENER, "1", 1);
    works(&ns, 19100);
    server.set(LISTENER, "2", &[&listener("l1", 19100, ""), &http_listener(ROUTES_TO_MISSING)]).unwrap();
    let nack = server.wait_request("NACK of v2", |r| r.type_url == LISTENER && r.error.is_some()).unwrap();
    works(&ns, 19100);
    let _ = std::fs::remove_dir_all(dir);
    nack.error
}

/// The same ADS bootstrap and the same management server drive the real Envoy.
#[test]
fn envoy_takes_the_same_bootstrap_and_resources() {
    let detail = nack_of_route_to_missing_cluster("e", |ns, config| {
        let mut cmd = weft_tests::envoy_command().unwrap();
        cmd.args(["--concurrency", "1", "--log-level", "warn", "-c"]).arg(config).stdout(Stdio::null()).stderr(Stdio::null());
        ns.enter_on_spawn(&mut cmd);
        ChildGuard::new(cmd.spawn().unwrap(), "envoy")
    });
    if let Some(detail) = detail {
        assert!(detail.contains("unknown cluster 'missing'"), "{detail}");
    }
}

#[test]
fn weft_refuses_the_listener_envoy_refuses() {
    if let Some(detail) = nack_of_route_to_missing_cluster("r", start_weft) {
        assert!(detail.contains("Listener 'h1': route: unknown cluster 'missing'"), "{detail}");
    }
}

const EDS_CLUSTER: &str = r#"
name: svc
type: EDS
connect_timeout: 1s
eds_cluster_config: {eds_config: {ads: {}, resource_api_version: V3}}
"#;

fn assignment(ports: &[u16]) -> String {
    assignment_of("svc", ports)
}

fn assignment_of(service: &str, ports: &[u16]) -> String {
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}}}"))
        .collect();
    format!("{{cluster_name: {service}, endpoints: [{{lb_endpoints: [{}]}}]}}", endpoints.join(", "))
}

fn eds_scenario(api: &str) {
    let delta = api == "DELTA_GRPC";
    let Some(Setup { ns, dir, config, server }) = Setup::new(if delta { "ed" } else { "es" }, api) else { return };
    let first = EchoServer::start(&ns, 19300).unwrap();
    let second = EchoServer::start(&ns, 19301).unwrap();
    server.set(CLUSTER, "1", &[EDS_CLUSTER]).unwrap();
    server.set(ENDPOINT, "1", &[&assignment(&[19300])]).unwrap();
    server.set(LISTENER, "1", &[&listener_to("l1", 19100, "svc", "")]).unwrap();
    let _weft = start_weft(&ns, &config);

    // The EDS subscription names the EDS cluster's service.
    let subscription = server.wait_request("an EDS subscription", |r| r.type_url == ENDPOINT && !r.names.is_empty()).unwrap();
    assert_eq!(subscription.names, ["svc"]);
    ack(&server, delta, ENDPOINT, "1", 1);
    ack(&server, delta, LISTENER, "1", 1);
    works(&ns, 19100);
    assert_eq!((first.peers().len(), second.peers().len()), (1, 0));

    // New endpoints: new connections go there.
    server.set(ENDPOINT, "2", &[&assignment(&[19301])]).unwrap();
    ack(&server, delta, ENDPOINT, "2", 2);
    works(&ns, 19100);
    assert_eq!((first.peers().len(), second.peers().len()), (1, 1));

    // No endpoints: no healthy upstream, the connection is closed without an answer.
    server.set(ENDPOINT, "3", &[&assignment(&[])]).unwrap();
    ack(&server, delta, ENDPOINT, "3", 3);
    let answer = echo(&ns, addr(19100), b"anyone?").unwrap_or_default();
    assert!(answer.is_empty(), "{answer:?}");

    // A second EDS service, then a response that omits it. In state of the world only listener and cluster
    // responses carry the full set, so the omitted assignment keeps serving; in delta only
    // `removed_resources` removes one (the test server sends it for what is no longer published).
    let svc2 = EDS_CLUSTER.replace("name: svc", "name: svc2");
    server.set(CLUSTER, "2", &[EDS_CLUSTER, &svc2]).unwrap();
    server.set(ENDPOINT, "4", &[&assignment(&[19300]), &assignment_of("svc2", &[19301])]).unwrap();
    server.set(LISTENER, "2", &[&listener_to("l1", 19100, "svc", ""), &listener_to("l2", 19102, "svc2", "")]).unwrap();
    let answers = |port: u16| echo(&ns, addr(port), b"ping").is_ok_and(|a| a == b"ping");
    wait_for("both services served", Duration::from_secs(20), || if answers(19100) && answers(19102) { Ok(()) } else { Err("not yet".into()) }).unwrap();
    let partial = server.requests().len();
    server.set(ENDPOINT, "5", &[&assignment(&[19300])]).unwrap();
    server.wait_request_since(partial, "ACK of the partial EDS response", |r| r.type_url == ENDPOINT && r.is_ack()).unwrap();
    if delta {
        wait_for("svc2 removed by removed_resources", Duration::from_secs(20), || if answers(19102) { Err("still served".into()) } else { Ok(()) }).unwrap();
    } else {
        assert!(answers(19102), "an EDS resource omitted from a state-of-the-world response was removed");
    }
    assert!(answers(19100));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn eds_over_state_of_the_world_ads() {
    eds_scenario("GRPC");
}

#[test]
fn eds_over_delta_ads() {
    eds_scenario("DELTA_GRPC");
}

const WEB_CLUSTER: &str = r#"
name: web
type: STATIC
connect_timeout: 1s
load_assignment:
  cluster_name: web
  endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 19400}}}}]}]
"#;

const RDS: &str = "rds: {route_config_name: main, config_source: {ads: {}, resource_api_version: V3}}";

fn routes(body: &str) -> String {
    format!(
        "{{name: main, virtual_hosts: [{{name: all, domains: [\"*\"], routes: [{{match: {{prefix: \"/\"}}, direct_response: {{status: 200, body: {{inline_string: \"{body}\"}}}}}}]}}]}}"
    )
}

fn http_get(ns: &NetNs, port: u16) -> String {
    weft_tests::traffic::http(ns, addr(port), "GET", "x", "/").map(|r| r.body).unwrap_or_default()
}

fn rds_scenario(api: &str) {
    let delta = api == "DELTA_GRPC";
    let Some(Setup { ns, dir, config, server }) = Setup::new(if delta { "rd" } else { "rs" }, api) else { return };
    server.set(CLUSTER, "1", &[WEB_CLUSTER]).unwrap();
    server.set(LISTENER, "1", &[&http_listener(RDS)]).unwrap();
    let _weft = start_weft(&ns, &config);

    // The listener waits for its routes: nothing listens until RDS delivers "main".
    let subscription = server.wait_request("an RDS subscription", |r| r.type_url == ROUTE && !r.names.is_empty()).unwrap();
    assert_eq!(subscription.names, ["main"]);
    refused(&ns, 19200);
    server.set(ROUTE, "1", &[&routes("first")]).unwrap();
    ack(&server, delta, ROUTE, "1", 1);
    wait_for("routes v1 served", Duration::from_secs(10), || {
        let body = http_get(&ns, 19200);
        if body == "first" { Ok(()) } else { Err(body) }
    })
    .unwrap();

    // A route update changes the answers without a listener update, also on a connection opened before it.
    let mut kept = ns.tcp_connect(addr(19200), Duration::from_secs(5)).unwrap();
    assert_eq!(keep_alive_get(&mut kept), "first");
    server.set(ROUTE, "2", &[&routes("second")]).unwrap();
    ack(&server, delta, ROUTE, "2", 2);
    wait_for("routes v2 served", Duration::from_secs(10), || {
        let body = http_get(&ns, 19200);
        if body == "second" { Ok(()) } else { Err(body) }
    })
    .unwrap();
    assert_eq!(keep_alive_get(&mut kept), "second", "an established connection kept the old routes");
    let _ = std::fs::remove_dir_all(dir);
}

/// One GET on a kept-alive connection; returns the body (the response carries content-length).
fn keep_alive_get(c: &mut std::net::TcpStream) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(c);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

#[test]
fn rds_over_state_of_the_world_ads() {
    rds_scenario("GRPC");
}

#[test]
fn rds_over_delta_ads() {
    rds_scenario("DELTA_GRPC");
}

/// Listener drain: a removed listener stops accepting at once; its established connections go on for the
/// drain time (`--drain-time-s`) and are then closed; connections of listeners the update kept are untouched.
#[test]
fn removed_listener_drains_its_connections() {
    use std::io::{Read, Write};
    let Some(Setup { ns, dir, config, server }) = Setup::new("drain", "GRPC") else { return };
    let upstream = EchoServer::start(&ns, 19300).unwrap();
    server.set(CLUSTER, "1", &[ECHO_CLUSTER]).unwrap();
    server.set(LISTENER, "1", &[&listener("l1", 19100, ""), &listener("l2", 19101, "")]).unwrap();
    // Long enough that a loaded machine still finishes the draining exchange well inside it.
    let _weft = start_weft_with(&ns, &config, &["--drain-time-s", "5"]);
    works(&ns, 19100);
    works(&ns, 19101);
    let relayed_before = upstream.peers().len();
    let open = |port| {
        let mut c = ns.tcp_connect(addr(port), Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(b"before the update, ").unwrap();
        c
    };
    let finish = |mut c: std::net::TcpStream| -> Vec<u8> {
        c.write_all(b"after it").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        back
    };
    let (draining, cut, kept) = (open(19100), open(19100), open(19101));
    // Accepted by the proxy (each has its upstream connection), not still in the listener's backlog, which the
    // listener's removal would reset.
    wait_for("the three connections relayed upstream", Duration::from_secs(10), || match upstream.peers().len() - relayed_before {
        n if n >= 3 => Ok(()),
        n => Err(format!("{n} relayed")),
    })
    .unwrap();

    server.set(LISTENER, "2", &[&listener("l2", 19101, "")]).unwrap();
    ack(&server, false, LISTENER, "2", 2);
    let removed_at = std::time::Instant::now();
    refused(&ns, 19100);
    assert_eq!(finish(draining), b"before the update, after it", "a draining connection was cut early");

    let mut cut = cut;
    let mut buf = [0u8; 64];
    let ended = match cut.read(&mut buf) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
        other => Err(format!("{other:?}")),
    };
    assert!(ended.is_ok(), "the idle connection of the removed listener was not closed: {ended:?}");
    assert!(removed_at.elapsed() >= Duration::from_millis(4500), "closed after {:?}, before the drain time", removed_at.elapsed());
    assert_eq!(finish(kept), b"before the update, after it", "a connection of a kept listener was cut");
    let _ = std::fs::remove_dir_all(dir);
}

/// A TLS listener whose certificate is an SDS secret over ADS (as istiod sends gateways' credentialName).
fn tls_listener() -> String {
    listener("tls", 19100, "").replace(
        "filter_chains:\n- filters:",
        "filter_chains:\n- transport_socket:\n    name: envoy.transport_sockets.tls\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n      common_tls_context:\n        tls_certificate_sds_secret_configs: [{name: \"kubernetes://web-cert\", sds_config: {ads: {}, resource_api_version: V3}}]\n  filters:",
    )
}

fn secret(chain: &str, key: &str) -> String {
    let json = serde_json::json!({"name": "kubernetes://web-cert", "tls_certificate": {"certificate_chain": {"inline_string": chain}, "private_key": {"inline_string": key}}});
    json.to_string()
}

/// The certificate a TLS client is shown on port 19100 (DER), or why the handshake failed.
fn served_certificate(ns: &NetNs) -> Result<Vec<u8>, String> {
    let tcp = ns.tcp_connect(addr(19100), Duration::from_secs(2)).map_err(|e| e.to_string())?;
    tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
        let tls = weft_tests::tls_client::connect(tcp, &Default::default()).await?;
        let certs = tls.get_ref().1.peer_certificates().ok_or("no certificate")?;
        Ok(certs[0].to_vec())
    })
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// SDS over ADS: the secret a TLS context names is subscribed to by name; until it arrives handshakes fail
/// (closed, never plaintext); a malformed one is NACKed naming the secret while the last good one keeps
/// serving; a rotated one serves the next handshake.
#[test]
fn sds_secrets_over_ads() {
    let Some(Setup { ns, dir, config, server }) = Setup::new("sds", "GRPC") else { return };
    let pki = weft_tests::pki::dir().unwrap();
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).unwrap();
    let _upstream = EchoServer::start(&ns, 19300).unwrap();
    server.set(CLUSTER, "1", &[ECHO_CLUSTER]).unwrap();
    server.set(LISTENER, "1", &[&tls_listener()]).unwrap();
    let _weft = start_weft(&ns, &config);
    let subscription = server.wait_request("an SDS subscription", |r| r.type_url == SECRET && !r.names.is_empty()).unwrap();
    assert_eq!(subscription.names, ["kubernetes://web-cert"]);
    wait_for("the listener to accept", Duration::from_secs(10), || ns.tcp_connect(addr(19100), Duration::from_secs(1)).map(drop).map_err(|e| e.to_string())).unwrap();
    assert!(served_certificate(&ns).is_err(), "no secret yet: the handshake must fail");

    server.set(SECRET, "1", &[&secret(&read("server.pem"), &read("server.key"))]).unwrap();
    ack(&server, false, SECRET, "1", 1);
    wait_for("the secret served", Duration::from_secs(10), || match served_certificate(&ns) {
        Ok(der) if der == pem_der(&read("server.pem")) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap();

    server.set(SECRET, "2", &[&secret(&read("server.pem"), "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")]).unwrap();
    let nack = server.wait_request("the NACK of v2", |r| r.type_url == SECRET && r.error.is_some()).unwrap();
    let error = nack.error.unwrap();
    assert!(error.contains("kubernetes://web-cert") && error.contains("private key"), "{error}");
    assert!(!error.contains("bm90IGEga2V5"), "key material in the NACK: {error}");
    assert_eq!(served_certificate(&ns).unwrap(), pem_der(&read("server.pem")), "the last good secret keeps serving");
    let dump = admin_get(&ns, "/config_dump?resource=dynamic_active_secrets");
    assert!(dump.contains("kubernetes://web-cert") && dump.contains("[redacted]"), "{dump}");
    assert!(!dump.contains("PRIVATE KEY"), "a private key in /config_dump: {dump}");

    server.set(SECRET, "3", &[&secret(&read("client-c.pem"), &read("client-c.key"))]).unwrap();
    ack(&server, false, SECRET, "3", 2);
    wait_for("the rotated secret served", Duration::from_secs(10), || match served_certificate(&ns) {
        Ok(der) if der == pem_der(&read("client-c.pem")) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
