//! Runs the `weft-cni` binary the way a runtime does (environment + stdin) against a scripted agent socket:
//! the edge cases a real agent cannot be made to produce on demand (silence, malformed answers). The plugin
//! against the real agent, through the real libcni, is covered by `tests/tests/capture.rs`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_cni::protocol::{Attachment, Request, Response};

struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
    fn code(&self) -> u64 {
        assert_eq!(self.status, 1, "stdout {} stderr {}", self.stdout, self.stderr);
        self.json()["code"].as_u64().expect("error object has a code")
    }
}

fn run(command: &str, args: &str, stdin: &str) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "abc123")
        .env("CNI_NETNS", "/var/run/netns/pod1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn weft-cni");
    // The plugin stops reading oversized input, so a broken pipe here is expected.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    Run {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir =
        std::env::temp_dir().join(format!("weft-cni-it-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fake agent answering `count` connections with `answer`; returns the requests it saw.
fn agent(path: &Path, count: usize, answer: Response) -> JoinHandle<Vec<Request>> {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..count {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            seen.push(serde_json::from_str(&line).unwrap());
            let mut out = serde_json::to_vec(&answer).unwrap();
            out.push(b'\n');
            reader.get_mut().write_all(&out).unwrap();
        }
        seen
    })
}

const POD: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=uid-1";

fn config(version: &str, socket: &Path, extra: Value) -> String {
    let mut conf = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "weft-cni",
        "agent_socket": socket,
        "prevResult": {
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/pod1"}],
            "ips": [{"version": "4", "address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0}],
            "dns": {}
        }
    });
    for (k, v) in extra.as_object().unwrap() {
        conf[k] = v.clone();
    }
    conf.to_string()
}

#[test]
fn version_needs_no_config() {
    let r = run("VERSION", "", "");
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.json(), json!({"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}));
}

#[test]
fn add_captures_and_returns_converted_prev_result() {
    let dir = temp_dir();
    let sock = dir.join("a.sock");
    let log = dir.join("cni.log");
    let fake = agent(&sock, 1, Response::ok("listening"));
    let r = run("ADD", POD, &config("1.0.0", &sock, json!({"log_file": log})));
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    let out = r.json();
    assert_eq!(out["cniVersion"], "1.0.0");
    assert_eq!(out["ips"][0], json!({"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0}));
    let seen = fake.join().unwrap();
    let Request::Add { pod } = &seen[0] else { panic!("{seen:?}") };
    assert_eq!((pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()), ("shop", "web-1", "uid-1"));
    assert_eq!((pod.container_id.as_str(), pod.netns.as_str()), ("abc123", "/var/run/netns/pod1"));
    assert_eq!(pod.ips, vec!["10.22.0.5".parse::<std::net::IpAddr>().unwrap()]);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("ADD container=abc123 pod=shop/web-1: captured"), "{logged}");
}

#[test]
fn add_without_agent_is_try_again() {
    let dir = temp_dir();
    let sock = dir.join("missing.sock");
    let r = run("ADD", POD, &config("0.4.0", &sock, json!({})));
    assert_eq!(r.code(), 11);
    let e = r.json();
    assert_eq!(e["cniVersion"], "0.4.0");
    assert_eq!(e["msg"], format!("weft agent unreachable at {}", sock.display()));
    let details = e["details"].as_str().unwrap();
    assert!(details.contains("No such file") && details.contains("weft-agent DaemonSet"), "{details}");
}

#[test]
fn add_with_silent_agent_times_out() {
    let dir = temp_dir();
    let sock = dir.join("a.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let start = Instant::now();
    let r = run("ADD", POD, &config("1.1.0", &sock, json!({"timeout_ms": 300})));
    assert_eq!(r.code(), 11);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(r.json()["msg"].as_str().unwrap().contains("did not answer within 300 ms"), "{}", r.stdout);
}

#[test]
fn add_passes_through_excluded_and_non_k8s_pods() {
    let sock = temp_dir().join("missing.sock");
    for args in ["K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns", ""] {
        let r = run("ADD", args, &config("0.4.0", &sock, json!({})));
        assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
        assert_eq!(r.json()["ips"][0]["version"], "4");
        assert!(r.stderr.contains("not captured"), "{}", r.stderr);
    }
}

#[test]
fn add_agent_error_and_missing_prev_result() {
    let dir = temp_dir();
    let sock = dir.join("a.sock");
    let fake = agent(&sock, 1, Response::error("netns /var/run/netns/pod1 not found", "pod gone"));
    let r = run("ADD", POD, &config("1.1.0", &sock, json!({})));
    assert_eq!(r.code(), 999);
    assert_eq!(r.json()["msg"], "netns /var/run/netns/pod1 not found");
    fake.join().unwrap();

    let r = run("ADD", POD, &config("1.1.0", &sock, json!({"prevResult": null})));
    assert_eq!(r.code(), 7);
    assert!(r.json()["details"].as_str().unwrap().contains("chained"), "{}", r.stdout);
}

#[test]
fn del_succeeds_without_agent_and_talks_to_it_when_present() {
    let dir = temp_dir();
    let sock = dir.join("a.sock");
    let r = run("DEL", POD, &config("1.1.0", &sock, json!({})));
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "");
    assert!(r.stderr.contains("WARN"), "{}", r.stderr);

    let fake = agent(&sock, 1, Response::ok(""));
    let r = run("DEL", POD, &config("1.1.0", &sock, json!({})));
    assert_eq!((r.status, r.stdout.as_str()), (0, ""), "{}", r.stderr);
    let seen = fake.join().unwrap();
    assert_eq!(
        seen,
        vec![Request::Del { attachment: Attachment { container_id: "abc123".into(), ifname: "eth0".into() } }]
    );
}

#[test]
fn check_status_gc() {
    let dir = temp_dir();
    let sock = dir.join("a.sock");
    assert_eq!(run("STATUS", "", &config("1.1.0", &sock, json!({}))).code(), 50);
    assert_eq!(run("CHECK", POD, &config("1.1.0", &sock, json!({}))).code(), 11);
    assert_eq!(run("GC", "", &config("1.1.0", &sock, json!({"cni.dev/valid-attachments": []}))).code(), 11);
    // The operations older configs do not have.
    assert_eq!(run("STATUS", "", &config("1.0.0", &sock, json!({}))).code(), 1);

    let fake = agent(&sock, 3, Response::ok(""));
    let valid = json!({"cni.dev/valid-attachments": [{"containerID": "c9", "ifname": "eth0"}]});
    for (cmd, args, conf) in [
        ("STATUS", "", config("1.1.0", &sock, json!({}))),
        ("CHECK", POD, config("1.1.0", &sock, json!({}))),
        ("GC", "", config("1.1.0", &sock, valid)),
    ] {
        let r = run(cmd, args, &conf);
        assert_eq!((r.status, r.stdout.as_str()), (0, ""), "{cmd}: {}", r.stderr);
    }
    let seen = fake.join().unwrap();
    assert_eq!(seen[0], Request::Status {});
    assert!(matches!(&seen[1], Request::Check { attachment } if attachment.container_id == "abc123"));
    assert_eq!(seen[2], Request::Gc { valid: vec![Attachment { container_id: "c9".into(), ifname: "eth0".into() }] });
}

#[test]
fn input_errors_have_their_codes() {
    let sock = temp_dir().join("a.sock");
    assert_eq!(run("FROB", "", "{}").code(), 4);
    assert_eq!(run("ADD", "garbage", &config("1.0.0", &sock, json!({}))).code(), 4);
    assert_eq!(run("ADD", POD, "{nope").code(), 6);
    assert_eq!(run("ADD", POD, &"x".repeat(2 << 20)).code(), 6);
    let r = run("ADD", POD, &config("0.2.0", &sock, json!({})));
    assert_eq!(r.code(), 1);
    assert_eq!(r.json()["cniVersion"], "1.1.0");
    let r = run("ADD", POD, &config("0.3.1", &sock, json!({"timeout_ms": 0})));
    assert_eq!(r.code(), 7);
    assert_eq!(r.json()["cniVersion"], "0.3.1");
    assert!(r.json()["msg"].as_str().unwrap().contains("timeout_ms"), "{}", r.stdout);
}
