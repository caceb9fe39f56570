//! `cargo xtask bench http [--duration S] [--connections N]`: request throughput, latency, CPU and memory of
//! weft's proxy against the real Envoy, both serving the same Envoy v3 bootstrap with `--concurrency 1`, and
//! of no proxy at all (the client straight to the upstream), all measured in one run on this machine.
//!
//! Everything runs inside one fresh network namespace (loopback only): a fast upstream written here (hyper,
//! HTTP/1.1 and h2c on one port, one tokio worker; the hidden command `cargo xtask bench-upstream ADDR`, which
//! the bench runs as its own executable), then Envoy, then weft, one after the other on the same ports.
//! Scenarios: HTTP/1.1 keep-alive with `wrk`, HTTP/2 (h2c prior knowledge) with `h2load`, gRPC unary with
//! `h2load` (to an HTTP/2 cluster). For each: requests/s, p50 and p99 latency, the CPU time the proxy process
//! consumed during the run, its resident memory after it. Then the proxy's resident memory holding 10,000 idle
//! keep-alive HTTP/1.1 connections, each having served one request.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_tests::{bin_path, envoy_path, ChildGuard, NetNs};

use crate::bench::{percentile, release_build, rss_kib};
use crate::{cargo, run as run_cmd, target_dir, workspace_root};

const USAGE: &str = "usage: cargo xtask bench http [--duration SECONDS] [--connections N]";
const LISTEN_PORT: u16 = 10000;
const ADMIN_PORT: u16 = 19901;
pub(crate) const UPSTREAM_PORT: u16 = 20000;
const IDLE_CONNECTIONS: usize = 10_000;
/// The file-descriptor limit of the bench process, inherited by everything it spawns.
const NOFILE: u64 = 131_072;
const GRPC_PATH: &str = "/bench.Echo/Call";
/// The gRPC request message (protobuf: field 1, string "hello weft"), sent length-prefixed.
const GRPC_MESSAGE: &[u8] = b"\x0a\x0ahello weft";
/// h2load's concurrent streams per connection.
const STREAMS: usize = 10;
/// The upstream's plain answer.
const HELLO: &[u8] = b"hello\n";
/// How long a proxy or the upstream may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Envoy,
    Weft,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "no proxy",
            Target::Envoy => "envoy",
            Target::Weft => "weft",
        }
    }
}

#[derive(Clone, Copy)]
enum Scenario {
    Http1,
    Http2,
    Grpc,
}

const SCENARIOS: [Scenario; 3] = [Scenario::Http1, Scenario::Http2, Scenario::Grpc];

/// One load run of one scenario against one target.
#[derive(Default)]
pub(crate) struct Run {
    pub(crate) rps: f64,
    /// Requests that completed successfully.
    requests: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Set when the percentiles could not be computed and the two latency cells hold h2load's mean.
    mean_only: bool,
    /// Everything that went wrong: errors and non-2xx counted by the load tool, failed correctness probes.
    pub(crate) errors: Vec<String>,
    cpu_s: Option<f64>,
    rss_kib: Option<u64>,
    upstream_cpu_s: f64,
}

/// The processes whose CPU time a run measures.
struct Pids {
    proxy: Option<u32>,
    upstream: u32,
}

/// Everything measured of one target: its runs in `SCENARIOS` order, and for a proxy the idle connections.
type Measured = (Target, Vec<Run>, Option<Result<Idle, String>>);

/// The proxy's resident memory before and while holding the idle connections.
struct Idle {
    before_kib: u64,
    after_kib: u64,
}

struct Options {
    duration: u64,
    connections: usize,
}

fn parse_args(args: &[&str]) -> Result<Options, String> {
    let mut opts = Options { duration: 10, connections: 32 };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(USAGE)?;
        let number = |v: &str| v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| format!("{flag} {v}: not a positive number\n{USAGE}"));
        match *flag {
            "--duration" => opts.duration = number(value)?,
            "--connections" => opts.connections = number(value)? as usize,
            _ => return Err(USAGE.into()),
        }
    }
    Ok(opts)
}

pub fn run(args: &[&str]) -> Result<(), String> {
    let opts = parse_args(args)?;
    let started = Instant::now();
    release_build()?;
    // The upstream is this program; `cargo xtask` runs a debug build, whose hyper saturates a core well below
    // what the proxies reach, so the upstream runs from a release build of xtask (which reuses the release
    // units just built: it only adds weft-tests and xtask).
    run_cmd(cargo().current_dir(workspace_root()).args(["build", "--quiet", "--release", "-p", "xtask"]))?;
    let upstream_exe = target_dir().join("release/xtask");
    for tool in ["wrk", "h2load"] {
        if find_on_path(tool).is_none() {
            return Err(format!("{tool} is not on PATH: `cargo xtask setup` installs it (Debian wrk, nghttp2-client)"));
        }
    }
    raise_nofile(NOFILE)?;
    let weft = bin_path("weft-agent").map_err(|e| e.to_string())?;
    let envoy = envoy_path().map_err(|e| e.to_string())?;
    // "envoy  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL"
    let envoy_version = Command::new(&envoy)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split("version:").nth(1).and_then(|v| v.trim().split('/').nth(1)).map(str::to_string)
        })
        .unwrap_or_else(|| "(unknown version)".into());

    let work = WorkDir::create()?;
    let config = work.0.join("bootstrap.yaml");
    write(&config, bootstrap(true).as_bytes())?;
    validate(&envoy, &[], &config).map_err(|e| format!("envoy rejects the bench's bootstrap: {e}"))?;
    // If weft rejects the bootstrap, its HTTP/1.1 and HTTP/2 rows use it without the gRPC route and cluster,
    // and its gRPC row says why it was not run.
    let weft_rejects = validate(&weft, &["proxy"], &config).err();
    let weft_config = match &weft_rejects {
        None => config.clone(),
        Some(_) => {
            let reduced = work.0.join("bootstrap-without-grpc.yaml");
            write(&reduced, bootstrap(false).as_bytes())?;
            validate(&weft, &["proxy"], &reduced).map_err(|e| format!("weft rejects the bench's bootstrap even without the gRPC cluster: {e}"))?;
            reduced
        }
    };
    let grpc_request = work.0.join("grpc-request.bin");
    write(&grpc_request, &grpc_frame(GRPC_MESSAGE))?;

    let ns = NetNs::create_with_lo(&format!("wbh-{}", std::process::id() % 100_000)).map_err(|e| e.to_string())?;
    let mut upstream = start_upstream(&ns, &work.0, &upstream_exe)?;
    eprintln!("xtask: bench http: upstream ready");

    let load_before = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().map(str::to_string));
    let measuring = Instant::now();
    let mut results: Vec<Measured> = Vec::new();
    for target in [Target::Direct, Target::Envoy, Target::Weft] {
        let start = || -> Result<Option<Server>, String> {
            match target {
                Target::Direct => Ok(None),
                Target::Envoy => start_proxy(&ns, &work.0, "envoy", Command::new(&envoy), &config, ADMIN_PORT).map(Some),
                Target::Weft => {
                    let mut cmd = Command::new(&weft);
                    cmd.arg("proxy");
                    start_proxy(&ns, &work.0, "weft", cmd, &weft_config, ADMIN_PORT).map(Some)
                }
            }
        };
        let mut proxy = start()?;
        let port = if target == Target::Direct { UPSTREAM_PORT } else { LISTEN_PORT };
        let probes = probe(&ns, port);
        let mut runs = Vec::new();
        for (scenario, problems) in SCENARIOS.into_iter().zip(probes) {
            let what = format!("{} {}", target.name(), scenario_name(scenario));
            if let (Target::Weft, Scenario::Grpc, Some(why)) = (target, scenario, &weft_rejects) {
                runs.push(Run::failed(format!("not run: weft rejects the bootstrap: {}", last_line(why))));
                continue;
            }
            if proxy.is_none() && target != Target::Direct {
                // It exited in an earlier scenario: start it again.
                match start() {
                    Ok(p) => proxy = p,
                    Err(e) => {
                        eprintln!("xtask: bench http: {what}: {e}");
                        runs.push(Run::failed(format!("did not start: {}", last_line(&e))));
                        continue;
                    }
                }
            }
            let pids = Pids { proxy: proxy.as_ref().map(|p| p.child.id()), upstream: upstream.child.id() };
            let mut run = match measure(&ns, &work.0, scenario, port, &opts, &grpc_request, pids) {
                Ok(run) => run,
                // Without a proxy a failure is the bench's own: stop there.
                Err(e) if target == Target::Direct => return Err(format!("{what}: {e}")),
                Err(e) => {
                    eprintln!("xtask: bench http: {what}: {e}");
                    Run::failed(format!("failed: {}", first_line(&e)))
                }
            };
            run.errors.extend(problems);
            if let Some(Err(e)) = proxy.as_mut().map(Server::check_alive) {
                eprintln!("xtask: bench http: {what}: {e}");
                run.errors.push(format!("proxy exited during the run: {}", last_line(&e)));
                proxy = None;
            }
            upstream.check_alive()?;
            runs.push(run);
        }
        let idle = match (target, proxy.is_some()) {
            (Target::Direct, _) => None,
            (_, false) => Some(Err("the proxy exited earlier".to_string())),
            (_, true) => Some(proxy.as_mut().map_or(Err("no proxy".into()), |p| {
                let idle = idle_connections(&ns, p.child.id());
                match (idle, p.check_alive()) {
                    (Ok(idle), Ok(())) => Ok(idle),
                    (Err(e), _) | (_, Err(e)) => {
                        eprintln!("xtask: bench http: {} with {IDLE_CONNECTIONS} idle connections: {e}", target.name());
                        Err(first_line(&e).to_string())
                    }
                }
            })),
        };
        if let Some(mut p) = proxy {
            let _ = p.child.stop();
        }
        eprintln!("xtask: bench http: {}: done", target.name());
        results.push((target, runs, idle));
    }
    drop(upstream);
    drop(ns);
    let measured = measuring.elapsed();

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nweft vs Envoy {envoy_version}: one bootstrap, `--concurrency 1`, loopback in one network namespace, {cpus} CPUs \
         shared by client, proxy and upstream (hyper, 1 worker; load average {} before measuring); {} connections, {} s \
         per row\n",
        load_before.as_deref().unwrap_or("?"),
        opts.connections,
        opts.duration
    );
    if let Some(why) = &weft_rejects {
        println!(
            "**weft rejects the bootstrap** ({}): its HTTP/1.1 and HTTP/2 rows ran the same bootstrap without the gRPC \
             route and HTTP/2 cluster (which those scenarios do not use).\n",
            cell(last_line(why))
        );
    }
    for (i, scenario) in SCENARIOS.into_iter().enumerate() {
        let rows: Vec<(Target, &Run)> = results.iter().map(|(t, runs, _)| (*t, &runs[i])).collect();
        print_scenario(scenario, &opts, &rows);
    }
    print_idle(&results);
    eprintln!(
        "xtask: bench http: measurements {:.0} s, total {:.0} s (with setup and the release build)",
        measured.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

impl Run {
    /// A run that produced no numbers, only `why`.
    fn failed(why: String) -> Run {
        let nan = f64::NAN;
        Run { rps: nan, p50_ms: nan, p99_ms: nan, upstream_cpu_s: nan, errors: vec![why], ..Run::default() }
    }
}

pub(crate) fn first_line(text: &str) -> &str {
    text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default()
}

pub(crate) fn last_line(text: &str) -> &str {
    text.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default()
}

/// Text made safe for one markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "/").replace('\n', " ")
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Http1 => "HTTP/1.1",
        Scenario::Http2 => "HTTP/2",
        Scenario::Grpc => "gRPC",
    }
}

fn print_scenario(scenario: Scenario, opts: &Options, rows: &[(Target, &Run)]) {
    let (c, d) = (opts.connections, opts.duration);
    let mean_only = rows.iter().any(|(_, r)| r.mean_only);
    let latency = if mean_only { "latency: h2load's mean where marked" } else { "latency from h2load --log-file per-request times" };
    let title = match scenario {
        Scenario::Http1 => format!("HTTP/1.1 keep-alive GET /: `wrk -t1 -c{c} -d{d}s --latency`"),
        Scenario::Http2 => format!("HTTP/2 (h2c) GET / to an HTTP/1.1 cluster: `h2load -c{c} -m{STREAMS} -D {d}`, {latency}"),
        Scenario::Grpc => format!(
            "gRPC unary POST {GRPC_PATH} ({} B message) to an HTTP/2 cluster: `h2load -c{c} -m{STREAMS} -D {d}`, {latency}",
            GRPC_MESSAGE.len()
        ),
    };
    println!("{title}\n");
    println!("| path | req/s | p50 ms | p99 ms | proxy CPU s | proxy RSS MiB | req per proxy CPU s | upstream CPU s | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let num = |v: f64, digits: usize| if v.is_nan() { "-".to_string() } else { format!("{v:.digits$}") };
    let ms = |r: &Run, v: f64| if r.mean_only { format!("mean {v:.3}") } else { num(v, 3) };
    let per_cpu = |r: &Run| r.cpu_s.filter(|c| *c > 0.0).map(|c| r.requests as f64 / c);
    for (target, r) in rows {
        let errors = if r.errors.is_empty() { "0".to_string() } else { cell(&r.errors.join("; ")) };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            target.name(),
            num(r.rps, 0),
            ms(r, r.p50_ms),
            ms(r, r.p99_ms),
            r.cpu_s.map_or("-".into(), |v| format!("{v:.2}")),
            r.rss_kib.map_or("-".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
            per_cpu(r).map_or("-".into(), |v| format!("{v:.0}")),
            num(r.upstream_cpu_s, 2),
            errors
        );
    }
    let find = |t: Target| rows.iter().find(|(x, _)| *x == t).map(|(_, r)| *r);
    if let (Some(w), Some(e)) = (find(Target::Weft), find(Target::Envoy)) {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let kib = |r: &Run| r.rss_kib.map(|v| v as f64);
        println!(
            "| weft / envoy | {} | {} | {} | {} | {} | {} | | |",
            ratio(Some(w.rps), Some(e.rps)),
            ratio(Some(w.p50_ms), Some(e.p50_ms)),
            ratio(Some(w.p99_ms), Some(e.p99_ms)),
            ratio(w.cpu_s, e.cpu_s),
            ratio(kib(w), kib(e)),
            ratio(per_cpu(w), per_cpu(e)),
        );
    }
    println!();
}

fn print_idle(results: &[Measured]) {
    println!("Proxy memory holding {IDLE_CONNECTIONS} idle HTTP/1.1 keep-alive connections (one GET / served on each)\n");
    println!("| proxy | RSS before MiB | RSS with {IDLE_CONNECTIONS} idle MiB | KiB per connection |");
    println!("|---|---|---|---|");
    let per_conn = |i: &Idle| (i.after_kib as f64 - i.before_kib as f64) / IDLE_CONNECTIONS as f64;
    for (target, _, idle) in results {
        match idle {
            Some(Ok(i)) => println!(
                "| {} | {:.1} | {:.1} | {:.2} |",
                target.name(),
                i.before_kib as f64 / 1024.0,
                i.after_kib as f64 / 1024.0,
                per_conn(i)
            ),
            Some(Err(e)) => println!("| {} | failed: {} | | |", target.name(), cell(e)),
            None => {}
        }
    }
    let find = |t: Target| results.iter().find(|(x, _, _)| *x == t).and_then(|(_, _, i)| i.as_ref()?.as_ref().ok());
    if let (Some(w), Some(e)) = (find(Target::Weft), find(Target::Envoy)) {
        let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() };
        println!(
            "| weft / envoy | {} | {} | {} |",
            ratio(w.before_kib as f64, e.before_kib as f64),
            ratio(w.after_kib as f64, e.after_kib as f64),
            ratio(per_conn(w), per_conn(e))
        );
    }
    println!();
}

/// The bootstrap both proxies serve; `with_grpc: false` leaves out the gRPC route and its HTTP/2 cluster.
fn bootstrap(with_grpc: bool) -> String {
    let endpoint = |cluster: &str| {
        format!(
            "load_assignment: {{cluster_name: {cluster}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {UPSTREAM_PORT}}}}}}}}}]}}]}}"
        )
    };
    let (grpc_route, grpc_cluster) = if with_grpc {
        (
            "\n              - match: {prefix: \"/bench.Echo/\"}\n                route: {cluster: grpc}".to_string(),
            format!(
                r#"  - name: grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    {}
"#,
                endpoint("grpc")
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        r#"admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: {ADMIN_PORT}}}
static_resources:
  listeners:
  - name: bench
    address:
      socket_address: {{address: 127.0.0.1, port_value: {LISTEN_PORT}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          codec_type: AUTO
          stat_prefix: bench
          route_config:
            name: bench
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:{grpc_route}
              - match: {{prefix: "/"}}
                route: {{cluster: web}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: web
    type: STATIC
    connect_timeout: 1s
    {web}
{grpc_cluster}"#,
        web = endpoint("web"),
    )
}

/// One gRPC message with its 5-byte prefix (not compressed, big-endian length).
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

// ---------------------------------------------------------------------------------------------------------
// Processes

/// A temporary directory removed when dropped.
pub(crate) struct WorkDir(pub(crate) PathBuf);

impl WorkDir {
    pub(crate) fn create() -> Result<WorkDir, String> {
        let dir = std::env::temp_dir().join(format!("weft-bench-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn write(path: &Path, contents: &[u8]) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A long-running process of the bench, its stderr in a log file.
pub(crate) struct Server {
    pub(crate) child: ChildGuard,
    name: &'static str,
    log: PathBuf,
}

impl Server {
    pub(crate) fn spawn(ns: &NetNs, work: &Path, name: &'static str, mut cmd: Command) -> Result<Server, String> {
        let log = work.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let file2 = file.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
        ns.enter_on_spawn(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        Ok(Server { child: ChildGuard::new(child, name), name, log })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(3000);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text[start..].trim_end().to_string()
    }

    /// Fails, with the end of its log, if the process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited ({status}); its log ends with:\n{}", self.name, self.log_tail())),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// Polls `ready` until it succeeds, failing early if the process exits.
    pub(crate) fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> Result<(), String>) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            match ready() {
                Ok(()) => return Ok(()),
                Err(last) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{}: timed out after {READY_TIMEOUT:?} waiting for {what}; last: {last}; its log ends with:\n{}",
                        self.name,
                        self.log_tail()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

pub(crate) fn start_upstream(ns: &NetNs, work: &Path, exe: &Path) -> Result<Server, String> {
    let mut cmd = Command::new(exe);
    cmd.args(["bench-upstream", &format!("127.0.0.1:{UPSTREAM_PORT}")]);
    let mut server = Server::spawn(ns, work, "upstream", cmd)?;
    server.wait_ready("GET / answered 200", || match get(ns, UPSTREAM_PORT, "/") {
        Ok((200, _)) => Ok(()),
        Ok((status, _)) => Err(format!("status {status}")),
        Err(e) => Err(e),
    })?;
    Ok(server)
}

/// Starts `cmd` (Envoy, or `weft-agent proxy`) with the bench flags and waits for its admin (on `admin`) /ready.
pub(crate) fn start_proxy(ns: &NetNs, work: &Path, name: &'static str, mut cmd: Command, config: &Path, admin: u16) -> Result<Server, String> {
    cmd.arg("-c").arg(config).args(["--concurrency", "1", "--log-level", "error"]);
    let mut server = Server::spawn(ns, work, name, cmd)?;
    server.wait_ready("admin /ready answered 200", || match get(ns, admin, "/ready") {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("status {status}: {}", String::from_utf8_lossy(&body).trim())),
        Err(e) => Err(e),
    })?;
    Ok(server)
}

/// `PROGRAM [ARGS] --mode validate -c CONFIG`: whether the proxy accepts the bootstrap (its output if not).
pub(crate) fn validate(program: &Path, args: &[&str], config: &Path) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_string())
}

pub(crate) fn find_on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Raises RLIMIT_NOFILE to `want` (soft and hard), or, where the hard limit cannot be raised (no
/// CAP_SYS_RESOURCE, as in some containers), the soft limit to the hard one if that still leaves room for the
/// idle connections. Processes spawned afterwards inherit it.
pub(crate) fn raise_nofile(want: u64) -> Result<(), String> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with valid pointers to locals.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
        }
        let raised = libc::rlimit { rlim_cur: limit.rlim_cur.max(want), rlim_max: limit.rlim_max.max(want) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        let needed = IDLE_CONNECTIONS as u64 + 1024;
        let to_hard = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        if limit.rlim_max >= needed && libc::setrlimit(libc::RLIMIT_NOFILE, &to_hard) == 0 {
            return Ok(());
        }
        Err(format!(
            "setrlimit(RLIMIT_NOFILE, {want}): {error}; the hard limit {} is below the {needed} file descriptors \
             {IDLE_CONNECTIONS} idle connections need",
            limit.rlim_max
        ))
    }
}

/// User plus system CPU time of a process (all its threads), in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the parenthesised command name start at field 3 (state); utime and stime are fields 14, 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (field(11), field(12)) else {
        return Err(format!("{path}: unexpected contents {stat:?}"));
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        return Err("sysconf(_SC_CLK_TCK) failed".into());
    }
    Ok((utime + stime) as f64 / ticks as f64)
}

/// Runs a load tool inside the namespace, its output in files, killed if it overruns `timeout`. Returns its
/// stdout; a non-zero exit is an error showing both outputs.
pub(crate) fn run_tool(ns: &NetNs, work: &Path, mut cmd: Command, timeout: Duration) -> Result<String, String> {
    let line = format!("{cmd:?}");
    let out_path = work.join("tool.out");
    let err_path = work.join("tool.err");
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let err = std::fs::File::create(&err_path).map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    ns.enter_on_spawn(&mut cmd);
    let mut child = ChildGuard::new(cmd.spawn().map_err(|e| format!("cannot run {line}: {e}"))?, "load tool");
    let status = child.wait_timeout(timeout).map_err(|e| format!("{line}: {e}"))?;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(stdout),
        Some(s) => Err(format!("{line} failed ({s}):\nstdout: {stdout}\nstderr: {stderr}")),
        None => Err(format!("{line} still running after {timeout:?}; killed.\nstdout: {stdout}\nstderr: {stderr}")),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Measurements

fn measure(
    ns: &NetNs,
    work: &Path,
    scenario: Scenario,
    port: u16,
    opts: &Options,
    grpc_request: &Path,
    pids: Pids,
) -> Result<Run, String> {
    let cpu_before = pids.proxy.map(cpu_seconds).transpose()?;
    let upstream_before = cpu_seconds(pids.upstream)?;
    let timeout = Duration::from_secs(opts.duration + 30);
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let mut run = match scenario {
        Scenario::Http1 => {
            let mut cmd = Command::new("wrk");
            cmd.args(["-t1", &format!("-c{}", opts.connections), &format!("-d{}s", opts.duration), "--latency", &url("/")]);
            let out = run_tool(ns, work, cmd, timeout)?;
            parse_wrk(&out).map_err(|e| format!("wrk output: {e}:\n{out}"))?
        }
        Scenario::Http2 | Scenario::Grpc => {
            let log = work.join("h2load.log");
            let mut cmd = Command::new("h2load");
            cmd.args(["-c", &opts.connections.to_string(), "-m", &STREAMS.to_string(), "-D", &opts.duration.to_string()]);
            cmd.arg(format!("--log-file={}", log.display()));
            if matches!(scenario, Scenario::Grpc) {
                cmd.args(["-H", "content-type: application/grpc", "-H", "te: trailers", "-d"]).arg(grpc_request);
                cmd.arg(url(GRPC_PATH));
            } else {
                cmd.arg(url("/"));
            }
            let out = run_tool(ns, work, cmd, timeout)?;
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            parse_h2load(&out, &log_text).map_err(|e| format!("h2load output: {e}:\n{out}"))?
        }
    };
    run.upstream_cpu_s = cpu_seconds(pids.upstream)? - upstream_before;
    if let (Some(pid), Some(before)) = (pids.proxy, cpu_before) {
        run.cpu_s = Some(cpu_seconds(pid)? - before);
        run.rss_kib = Some(rss_kib(pid));
    }
    Ok(run)
}

/// A duration as wrk prints it (`245.00us`, `1.23ms`, `2.00s`, `1.00m`), in milliseconds.
fn wrk_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let v: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        "h" => v * 3_600_000.0,
        _ => return None,
    })
}

pub(crate) fn parse_wrk(out: &str) -> Result<Run, String> {
    let mut run = Run::default();
    let mut found = (false, false, false, false);
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => {
                run.rps = v.parse().map_err(|_| format!("bad Requests/sec {v:?}"))?;
                found.0 = true;
            }
            ["50%", v] => {
                run.p50_ms = wrk_ms(v).ok_or_else(|| format!("bad 50% latency {v:?}"))?;
                found.1 = true;
            }
            ["99%", v] => {
                run.p99_ms = wrk_ms(v).ok_or_else(|| format!("bad 99% latency {v:?}"))?;
                found.2 = true;
            }
            [n, "requests", "in", ..] => {
                run.requests = n.parse().map_err(|_| format!("bad request count {n:?}"))?;
                found.3 = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                let n: u64 = n.parse().map_err(|_| format!("bad Non-2xx count {n:?}"))?;
                run.requests = run.requests.saturating_sub(n);
                run.errors.push(format!("non-2xx/3xx: {n}"));
            }
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                let text = rest.join(" ");
                let nonzero: Vec<&str> = text.split(", ").filter(|kv| !kv.ends_with(" 0")).collect();
                if !nonzero.is_empty() {
                    run.errors.push(format!("socket errors: {}", nonzero.join(", ")));
                }
            }
            _ => {}
        }
    }
    match found {
        (true, true, true, true) => Ok(run),
        _ => Err("missing Requests/sec, the 50%/99% latency lines or the request count".into()),
    }
}

/// h2load's summary, and its per-request log (`start µs \t status \t latency µs`) for the percentiles.
fn parse_h2load(out: &str, log: &str) -> Result<Run, String> {
    let mut run = Run::default();
    let mut mean_ms = None;
    let mut found_rps = false;
    let mut found_requests = false;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 5.00s, 41234.60 req/s, 1.45MB/s"
            let rps = rest.split(", ").find_map(|p| p.strip_suffix(" req/s")).ok_or("no req/s on the `finished in` line")?;
            run.rps = rps.parse().map_err(|_| format!("bad req/s {rps:?}"))?;
            found_rps = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            for part in rest.split(", ") {
                let Some((n, what)) = part.split_once(' ') else { continue };
                let n: u64 = n.parse().map_err(|_| format!("bad count {part:?}"))?;
                match what {
                    "succeeded" => {
                        run.requests = n;
                        found_requests = true;
                    }
                    "failed" | "errored" | "timeout" if n > 0 => run.errors.push(format!("{what}: {n}")),
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // "status codes: N 2xx, N 3xx, N 4xx, N 5xx"
            for part in rest.split(", ") {
                if let Some((n, class)) = part.split_once(' ') {
                    if class != "2xx" && n != "0" {
                        run.errors.push(format!("{class}: {n}"));
                    }
                }
            }
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // "time for request:  min  max  mean  sd  +/- sd"
            mean_ms = rest.split_whitespace().nth(2).and_then(wrk_ms);
        }
    }
    if !(found_rps && found_requests) {
        return Err("missing the `finished in` or `requests:` line".into());
    }
    let latencies: Vec<f64> = log
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_start, status, us) = (f.next()?, f.next()?, f.next()?);
            (status.trim() == "200").then(|| us.trim().parse::<f64>().ok().map(|us| us / 1000.0))?
        })
        .collect();
    if latencies.is_empty() {
        let mean = mean_ms.ok_or("no per-request log and no `time for request` line")?;
        run.p50_ms = mean;
        run.p99_ms = mean;
        run.mean_only = true;
    } else {
        run.p50_ms = percentile(&latencies, 50.0);
        run.p99_ms = percentile(&latencies, 99.0);
    }
    Ok(run)
}

/// Opens `IDLE_CONNECTIONS` connections to the listener from inside the namespace, one GET / answered on
/// each, and reads the proxy's resident memory while they are all open; then closes them (with a reset, so
/// no TIME_WAIT is left for the next proxy).
fn idle_connections(ns: &NetNs, pid: u32) -> Result<Idle, String> {
    let before_kib = rss_kib(pid);
    let conns = ns
        .try_run_in(|| -> Result<Vec<TcpStream>, String> {
            let addr = SocketAddr::from(([127, 0, 0, 1], LISTEN_PORT));
            let mut conns = Vec::with_capacity(IDLE_CONNECTIONS);
            for i in 0..IDLE_CONNECTIONS {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connection {i}: connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
                let (status, _) = exchange(&mut s, "/", false).map_err(|e| format!("connection {i}: {e}"))?;
                if status != 200 {
                    return Err(format!("connection {i}: status {status}"));
                }
                conns.push(s);
            }
            Ok(conns)
        })
        .map_err(|e| e.to_string())??;
    let after_kib = rss_kib(pid);
    for s in conns {
        reset_on_close(&s);
    }
    Ok(Idle { before_kib, after_kib })
}

/// SO_LINGER 0: closing sends a reset and leaves no TIME_WAIT.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on an open socket with a pointer to a local of the stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// HTTP/1.1 by hand (readiness, the idle connections, the HTTP/1.1 probe)

/// One `GET path` on a fresh connection from inside the namespace (`Connection: close`).
pub(crate) fn get(ns: &NetNs, port: u16, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s = ns
        .tcp_connect(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    exchange(&mut s, path, true)
}

/// Sends `GET path HTTP/1.1` and reads one response: status and body (content-length, chunked, or to EOF).
fn exchange(s: &mut TcpStream, path: &str, close: bool) -> Result<(u16, Vec<u8>), String> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n{connection}\r\n").as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let mut fill = |buf: &mut Vec<u8>| -> Result<usize, String> {
        let n = s.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if fill(&mut buf)? == 0 {
            return Err(format!("connection closed before a response head: {:?}", String::from_utf8_lossy(&buf)));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).and_then(|v| v.parse().ok()).ok_or_else(|| format!("bad response head {head:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in head.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.trim().parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
    }
    let mut body = buf.split_off(head_end);
    if let Some(len) = content_length {
        while body.len() < len {
            if fill(&mut body)? == 0 {
                return Err(format!("connection closed after {} of {len} body bytes", body.len()));
            }
        }
        body.truncate(len);
    } else if chunked {
        loop {
            if let Some(decoded) = dechunk(&body) {
                body = decoded;
                break;
            }
            if fill(&mut body)? == 0 {
                return Err("connection closed inside a chunked body".into());
            }
        }
    } else if status >= 200 && status != 204 && status != 304 {
        while fill(&mut body)? > 0 {}
    }
    Ok((status, body))
}

/// The decoded body once `raw` holds a whole chunked body (ignoring trailers), else `None`.
fn dechunk(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + raw[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&raw[at..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            raw[at..].windows(4).position(|w| w == b"\r\n\r\n").or_else(|| raw[at..].starts_with(b"\r\n").then_some(0))?;
            return Some(out);
        }
        if raw.len() < at + size + 2 {
            return None;
        }
        out.extend_from_slice(&raw[at..at + size]);
        at += size + 2;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Correctness probes: the load tools check status codes only, so one request of each scenario is checked
// in full first (body, and for gRPC the content-type, the echoed message and the grpc-status trailer).

/// Problems found for each scenario, in `SCENARIOS` order.
fn probe(ns: &NetNs, port: u16) -> [Vec<String>; 3] {
    let mut h1 = Vec::new();
    match get(ns, port, "/") {
        Ok((200, body)) if body == HELLO => {}
        Ok((status, body)) => h1.push(format!("probe: status {status}, body {:?}", String::from_utf8_lossy(&body))),
        Err(e) => h1.push(format!("probe: {e}")),
    }
    let (h2, grpc) = match probe_h2(ns, port) {
        Ok(pair) => pair,
        Err(e) => (vec![format!("probe: {e}")], vec![format!("probe: {e}")]),
    };
    [h1, h2, grpc]
}

fn probe_h2(ns: &NetNs, port: u16) -> Result<(Vec<String>, Vec<String>), String> {
    let stream = ns
        .tcp_connect(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(10), async move {
            let tcp = tokio::net::TcpStream::from_std(stream).map_err(|e| e.to_string())?;
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            tokio::spawn(conn);
            let uri = |path: &str| format!("http://127.0.0.1:{port}{path}");

            let mut h2 = Vec::new();
            let request = Request::get(uri("/")).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
            match send.send_request(request).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp.into_body().collect().await.map(|c| c.to_bytes());
                    match body {
                        Ok(body) if status == StatusCode::OK && body.as_ref() == HELLO => {}
                        Ok(body) => h2.push(format!("probe: status {status}, body {:?}", String::from_utf8_lossy(&body))),
                        Err(e) => h2.push(format!("probe: body: {e}")),
                    }
                }
                Err(e) => h2.push(format!("probe: {e}")),
            }

            let mut grpc = Vec::new();
            let sent = Bytes::from(grpc_frame(GRPC_MESSAGE));
            let request = Request::post(uri(GRPC_PATH))
                .header(CONTENT_TYPE, "application/grpc")
                .header("te", "trailers")
                .body(Full::new(sent.clone()))
                .map_err(|e| e.to_string())?;
            match send.send_request(request).await {
                Ok(resp) => {
                    let status = resp.status();
                    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
                    match resp.into_body().collect().await {
                        Ok(collected) => {
                            let trailers = collected.trailers().cloned();
                            let body = collected.to_bytes();
                            if status != StatusCode::OK {
                                grpc.push(format!("probe: status {status}"));
                            }
                            if content_type.as_ref().map(HeaderValue::as_bytes) != Some(b"application/grpc".as_slice()) {
                                grpc.push(format!("probe: content-type {content_type:?}"));
                            }
                            if body != sent {
                                grpc.push(format!("probe: body {body:?}, expected {sent:?}"));
                            }
                            let grpc_status = trailers.as_ref().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes().to_vec());
                            if grpc_status.as_deref() != Some(b"0".as_slice()) {
                                grpc.push(format!("probe: trailers {trailers:?} (want grpc-status: 0)"));
                            }
                        }
                        Err(e) => grpc.push(format!("probe: body: {e}")),
                    }
                }
                Err(e) => grpc.push(format!("probe: {e}")),
            }
            Ok((h2, grpc))
        })
        .await
        .map_err(|_| "HTTP/2 probe timed out after 10 s".to_string())?
    })
}

// ---------------------------------------------------------------------------------------------------------
// The upstream: `cargo xtask bench-upstream ADDR` (hidden; the bench runs it as its own executable).

/// Serves HTTP/1.1 and h2c on `ADDR` with one tokio worker: `200 hello\n` for any request, and for
/// `content-type: application/grpc` a gRPC answer echoing the request's message with `grpc-status: 0`.
pub fn upstream(args: &[&str]) -> Result<(), String> {
    let addr: SocketAddr = match args {
        [addr] => addr.parse().map_err(|e| format!("{addr}: {e}"))?,
        _ => return Err("usage: cargo xtask bench-upstream ADDR".into()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("bind {addr}: {e}"))?;
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http2().max_concurrent_streams(1024);
        let builder = std::sync::Arc::new(builder);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("bench-upstream: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let builder = std::sync::Arc::clone(&builder);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(answer);
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

async fn answer(request: Request<Incoming>) -> Result<Response<Reply>, Infallible> {
    let grpc = request.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        let mut response = Response::new(Reply { data: Some(Bytes::from_static(HELLO)), trailers: None });
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(response);
    }
    let (status, message, data) = match request.into_body().collect().await {
        Ok(collected) => {
            let body = collected.to_bytes();
            let declared = body.get(1..5).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
            if body.first() == Some(&0) && declared.is_some_and(|len| body.len() == 5 + len) {
                ("0", None, body)
            } else {
                ("3", Some("expected one uncompressed length-prefixed message"), Bytes::new())
            }
        }
        Err(_) => ("13", Some("cannot read the request body"), Bytes::new()),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    if let Some(m) = message {
        trailers.insert("grpc-message", HeaderValue::from_static(m));
    }
    let mut response = Response::new(Reply { data: (!data.is_empty()).then_some(data), trailers: Some(trailers) });
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// A response body: one data frame, then optional trailers.
struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let len = self.data.as_ref().map_or(0, |d| d.len() as u64);
        if self.trailers.is_none() {
            SizeHint::with_exact(len)
        } else {
            let mut hint = SizeHint::new();
            hint.set_lower(len);
            hint
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let out = "Running 2s test @ http://127.0.0.1:20000/
  1 threads and 32 connections
  Latency Distribution
     50%  698.00us
     75%    1.01ms
     99%    1.20s
  11256 requests in 2.01s, 1.15MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 6
Requests/sec:   5609.18
";
        let run = parse_wrk(out).unwrap();
        assert_eq!(run.rps, 5609.18);
        assert_eq!(run.p50_ms, 0.698);
        assert_eq!(run.p99_ms, 1200.0);
        assert_eq!(run.requests, 11250);
        assert_eq!(run.errors, ["socket errors: read 3, timeout 2", "non-2xx/3xx: 6"]);
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }

    #[test]
    fn parses_h2load() {
        let out = "finished in 2.00s, 4772.50 req/s, 146.18KB/s
requests: 9545 total, 9865 started, 9545 done, 9540 succeeded, 5 failed, 0 errored, 0 timeout
status codes: 9540 2xx, 0 3xx, 0 4xx, 5 5xx
                     min         max         mean         sd        +/- sd
time for request:      265us    252.75ms     65.83ms     36.07ms    81.40%
";
        let log: String = (1..=100).map(|i| format!("1796016210002223\t200\t{}\n", i * 1000)).collect();
        let run = parse_h2load(out, &log).unwrap();
        assert_eq!((run.rps, run.requests), (4772.5, 9540));
        assert_eq!((run.p50_ms, run.p99_ms, run.mean_only), (51.0, 99.0, false));
        assert_eq!(run.errors, ["failed: 5", "5xx: 5"]);
        let run = parse_h2load(out, "").unwrap();
        assert_eq!((run.p50_ms, run.mean_only), (65.83, true));
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk(b"6\r\nhello\n\r\n0\r\n\r\n").as_deref(), Some(b"hello\n".as_slice()));
        assert_eq!(dechunk(b"6\r\nhello\n\r\n"), None);
    }

    #[test]
    fn bootstraps_differ_only_by_the_grpc_route_and_cluster() {
        let (full, reduced) = (bootstrap(true), bootstrap(false));
        assert!(full.contains("route: {cluster: grpc}") && full.contains("http2_protocol_options"));
        assert!(!reduced.contains("grpc") && reduced.contains("route: {cluster: web}"));
    }
}
