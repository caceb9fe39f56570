//! `cargo xtask bench mtls [--duration S] [--connections N]`: mutual TLS between two proxies, as between two
//! meshed pods: a client-side proxy (plaintext in, mTLS out with a client certificate, SNI and a SAN check) and
//! a server-side proxy (mTLS in, client certificate required, SAN matched, an RBAC filter allowing the client's
//! namespace by SPIFFE id, then to the app), each with
//! `--concurrency 1`, an Envoy pair against a weft pair on the same bootstraps, in one run, in one network
//! namespace. HTTP/1.1 keep-alive through both (wrk): requests/s, p50/p99, CPU seconds of the pair and its
//! resident memory; then new TLS handshakes per second (a TCP chain through both, one upstream handshake per
//! client connection: connect, request, answer, close, from `--connections` threads).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weft_tests::{bin_path, envoy_path, NetNs};

use crate::bench::{release_build, rss_kib};
use crate::bench_http::{cpu_seconds, find_on_path, last_line, parse_wrk, run_tool, start_proxy, start_upstream, validate, write, Run, WorkDir, UPSTREAM_PORT};
use crate::{cargo, run as run_cmd, target_dir, workspace_root};

const USAGE: &str = "usage: cargo xtask bench mtls [--duration SECONDS] [--connections N]";
const HTTP_PORT: u16 = 10000;
const TCP_PORT: u16 = 10002;
const SERVER_HTTP_PORT: u16 = 10001;
const SERVER_TCP_PORT: u16 = 10003;
const CLIENT_ADMIN: u16 = 19901;
const SERVER_ADMIN: u16 = 19902;

#[derive(Clone, Copy, PartialEq)]
enum Pair {
    Envoy,
    Weft,
}

/// What one pair measured.
struct Row {
    pair: Pair,
    http: Result<Run, String>,
    cpu_s: f64,
    rss_kib: u64,
    handshakes_per_s: Result<f64, String>,
    /// CPU seconds of the pair during the handshake run.
    handshake_cpu_s: f64,
}

pub fn run(args: &[&str]) -> Result<(), String> {
    let (duration, connections) = match args {
        [] => (5, 32),
        ["--duration", d] => (d.parse().map_err(|_| USAGE)?, 32),
        ["--connections", c] => (5, c.parse().map_err(|_| USAGE)?),
        ["--duration", d, "--connections", c] | ["--connections", c, "--duration", d] => (d.parse().map_err(|_| USAGE)?, c.parse().map_err(|_| USAGE)?),
        _ => return Err(USAGE.into()),
    };
    release_build()?;
    run_cmd(cargo().current_dir(workspace_root()).args(["build", "--quiet", "--release", "-p", "xtask"]))?;
    if find_on_path("wrk").is_none() {
        return Err("wrk is not on PATH: `cargo xtask setup` installs it".into());
    }
    let pki = weft_tests::pki::dir()?;
    let work = WorkDir::create()?;
    let (client, server) = (work.0.join("client.yaml"), work.0.join("server.yaml"));
    write(&client, client_bootstrap(pki).as_bytes())?;
    write(&server, server_bootstrap(pki).as_bytes())?;
    let weft = bin_path("weft-agent").map_err(|e| e.to_string())?;
    let envoy = envoy_path().map_err(|e| e.to_string())?;
    for config in [&client, &server] {
        validate(&envoy, &[], config).map_err(|e| format!("envoy rejects {}: {e}", config.display()))?;
        validate(&weft, &["proxy"], config).map_err(|e| format!("weft rejects {}: {e}", config.display()))?;
    }
    let ns = NetNs::create_with_lo(&format!("wbm-{}", std::process::id() % 100_000)).map_err(|e| e.to_string())?;
    let mut upstream = start_upstream(&ns, &work.0, &target_dir().join("release/xtask"))?;
    let mut rows = Vec::new();
    for pair in [Pair::Envoy, Pair::Weft] {
        let command = || match pair {
            Pair::Envoy => {
                // Two Envoys in one network namespace: no hot-restart socket to share.
                let mut c = Command::new(&envoy);
                c.arg("--disable-hot-restart");
                c
            }
            Pair::Weft => {
                let mut c = Command::new(&weft);
                c.arg("proxy");
                c
            }
        };
        let name = |side: &'static str| -> &'static str {
            match (pair, side) {
                (Pair::Envoy, "client") => "envoy-client",
                (Pair::Envoy, _) => "envoy-server",
                (Pair::Weft, "client") => "weft-client",
                (Pair::Weft, _) => "weft-server",
            }
        };
        let mut server_side = start_proxy(&ns, &work.0, name("server"), command(), &server, SERVER_ADMIN)?;
        let mut client_side = start_proxy(&ns, &work.0, name("client"), command(), &client, CLIENT_ADMIN)?;
        let pids = [client_side.child.id(), server_side.child.id()];
        let cpu = || pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64, String>>();
        let before = cpu()?;
        let http = wrk(&ns, &work.0, duration, connections);
        let cpu_s = cpu()? - before;
        let rss = pids.iter().map(|p| rss_kib(*p)).sum();
        let before = cpu()?;
        let handshakes_per_s = handshakes(&ns, duration, connections.min(8));
        let handshake_cpu_s = cpu()? - before;
        for side in [&mut client_side, &mut server_side] {
            side.check_alive()?;
        }
        upstream.check_alive()?;
        eprintln!("xtask: bench mtls: {}: done", pair_name(pair));
        rows.push(Row { pair, http, cpu_s, rss_kib: rss, handshakes_per_s, handshake_cpu_s });
    }
    print(&rows, duration, connections);
    Ok(())
}

fn pair_name(pair: Pair) -> &'static str {
    match pair {
        Pair::Envoy => "envoy pair",
        Pair::Weft => "weft pair",
    }
}

fn wrk(ns: &NetNs, work: &Path, duration: u64, connections: usize) -> Result<Run, String> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{duration}s"), "--latency", &format!("http://127.0.0.1:{HTTP_PORT}/")]);
    let out = run_tool(ns, work, cmd, Duration::from_secs(duration + 30))?;
    let run = parse_wrk(&out).map_err(|e| format!("wrk output: {e}:\n{out}"))?;
    match run.errors.first() {
        Some(e) => Err(format!("wrk: {e}")),
        None => Ok(run),
    }
}

/// Client connections completed per second through the TCP chain, each one a new mTLS handshake between
/// the proxies: connect, send a request, read the answer to the end (the upstream closes), close.
fn handshakes(ns: &NetNs, duration: u64, threads: usize) -> Result<f64, String> {
    let (done, failed, stop) = (AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match one_connection(ns) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_secs(duration));
        stop.store(true, Ordering::Relaxed);
    });
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    if failed > done / 100 {
        return Err(format!("{failed} of {} connections failed", done + failed));
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

fn one_connection(ns: &NetNs) -> Result<(), String> {
    let mut s = ns.tcp_connect(SocketAddr::from(([127, 0, 0, 1], TCP_PORT)), Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("answer {:?}", String::from_utf8_lossy(&answer[..answer.len().min(40)])))
    }
}

fn print(rows: &[Row], duration: u64, connections: usize) {
    println!("\nmTLS between two proxies (client side: plaintext in, mTLS out; server side: mTLS in, client certificate required, SAN checked, RBAC on the SPIFFE id), each `--concurrency 1`, loopback in one network namespace, wrk -t1 -c{connections}, {duration} s per row\n");
    println!("| pair | req/s | p50 ms | p99 ms | CPU s (both) | req per CPU-s | RSS KiB (both) | new mTLS connections/s | per CPU-s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let handshakes = match &row.handshakes_per_s {
            Ok(h) => format!("{h:.0} | {:.0}", h * duration as f64 / row.handshake_cpu_s.max(0.001)),
            Err(e) => format!("failed: {} |", last_line(e)),
        };
        match &row.http {
            Ok(r) => println!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {handshakes} |",
                pair_name(row.pair),
                r.rps,
                r.p50_ms,
                r.p99_ms,
                row.cpu_s,
                r.rps * duration as f64 / row.cpu_s.max(0.001),
                row.rss_kib
            ),
            Err(e) => println!("| {} | failed: {} | | | | | {} | {handshakes} |", pair_name(row.pair), last_line(e), row.rss_kib),
        }
    }
    if let [envoy, weft] = rows {
        if let (Ok(e), Ok(w)) = (&envoy.http, &weft.http) {
            let per_cpu = |r: &Run, cpu: f64| r.rps / cpu.max(0.001);
            println!(
                "\nweft / Envoy: requests per CPU-second {:.2}x, p99 {:.2}x, memory {:.2}x{}",
                per_cpu(w, weft.cpu_s) / per_cpu(e, envoy.cpu_s),
                w.p99_ms / e.p99_ms,
                weft.rss_kib as f64 / envoy.rss_kib.max(1) as f64,
                match (&envoy.handshakes_per_s, &weft.handshakes_per_s) {
                    (Ok(e), Ok(w)) => format!(
                        ", new mTLS connections per second {:.2}x, per CPU-second {:.2}x",
                        w / e,
                        (w / weft.handshake_cpu_s.max(0.001)) / (e / envoy.handshake_cpu_s.max(0.001))
                    ),
                    _ => String::new(),
                }
            );
        }
    }
}

fn tls_context(kind: &str, pki: &Path, cert: &str, extra: &str) -> String {
    let dir = pki.display();
    format!(
        r#"transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}
          {extra}
          common_tls_context:
            tls_certificates: [{{certificate_chain: {{filename: "{dir}/{cert}.pem"}}, private_key: {{filename: "{dir}/{cert}.key"}}}}]
            validation_context:
              trusted_ca: {{filename: "{dir}/ca.pem"}}
              match_typed_subject_alt_names: [{{san_type: URI, matcher: {{prefix: "spiffe://cluster.local/"}}}}]"#
    )
}

/// A listener with one chain: `transport` (a `transport_socket:` block, or `name: plaintext`) and `filters`.
fn listener(name: &str, port: u16, transport: &str, filters: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - {transport}
      filters:
{filters}"#
    )
}

/// An HTTP connection manager to `cluster`; on the server side behind Istio's RBAC shape allowing the trust
/// domain's identities.
fn http_listener(name: &str, port: u16, cluster: &str, transport: &str, rbac: bool) -> String {
    let rbac = if rbac {
        r#"
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                policies:
                  ns[b]-policy[allow-mesh]-rule[0]:
                    permissions: [{and_rules: {rules: [{any: true}]}}]
                    principals: [{and_ids: {ids: [{or_ids: {ids: [{authenticated: {principal_name: {safe_regex: {regex: "spiffe://cluster[.]local/ns/a/.*"}}}}]}}]}}]"#
    } else {
        ""
    };
    let filters = format!(
        r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]
          http_filters:{rbac}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    );
    listener(name, port, transport, &filters)
}

fn tcp_listener(name: &str, port: u16, cluster: &str, transport: &str) -> String {
    let filters = format!(
        "      - name: envoy.filters.network.tcp_proxy\n        typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster}}}\n"
    );
    listener(name, port, transport, &filters)
}

fn cluster(name: &str, port: u16, transport: &str) -> String {
    format!(
        r#"  - name: {name}
    connect_timeout: 1s
    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}
    {transport}
"#
    )
}

/// The client side: plaintext in, mTLS to the server side as `client-a`, expecting a SAN of the trust domain.
fn client_bootstrap(pki: &Path) -> String {
    let out = tls_context("UpstreamTlsContext", pki, "client-a", "sni: outbound_.8080_._.b.ns.svc.cluster.local");
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {CLIENT_ADMIN}}}}}}}\nstatic_resources:\n  listeners:\n{}{}  clusters:\n{}{}",
        http_listener("out-http", HTTP_PORT, "server-http", "name: plaintext", false),
        tcp_listener("out-tcp", TCP_PORT, "server-tcp", "name: plaintext"),
        cluster("server-http", SERVER_HTTP_PORT, &out),
        cluster("server-tcp", SERVER_TCP_PORT, &out),
    )
}

/// The server side: mTLS in (client certificate required, SAN in the trust domain), plaintext to the app.
fn server_bootstrap(pki: &Path) -> String {
    let inbound = tls_context("DownstreamTlsContext", pki, "server", "require_client_certificate: true");
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {SERVER_ADMIN}}}}}}}\nstatic_resources:\n  listeners:\n{}{}  clusters:\n{}",
        http_listener("in-http", SERVER_HTTP_PORT, "app", &inbound, true),
        tcp_listener("in-tcp", SERVER_TCP_PORT, "app", &inbound),
        cluster("app", UPSTREAM_PORT, ""),
    )
}
