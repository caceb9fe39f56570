//! A Kubernetes node without Kubernetes: a "node" network namespace holding
//! the CNI bridge, and one network namespace per pod, wired by the real
//! plugins through the real libcni (see `tests/cnidriver`).
//!
//! Everything lives in namespaces and a temp work dir the cluster creates;
//! nothing is configured in the host network namespace. Every CNI invocation
//! runs inside the node netns (`ip netns exec <node> cnidriver ...`), so the
//! bridge `cni0`, its gateway address and portmap's iptables rules are the
//! node's, not the host's.
//!
//! Set `WEFT_TEST_KEEP=1` to keep namespaces and the work dir after a test
//! (their names are printed).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::netns::{self, NetNs};
use crate::tools;
use crate::util::{self, ChildGuard, HarnessError};

/// Network name in the conflist (also host-local's data subdirectory).
pub const NETWORK_NAME: &str = "weft-test";
/// The bridge the `bridge` plugin creates in the node netns.
pub const BRIDGE: &str = "cni0";
/// Pod subnet handed out by host-local (room for `cargo xtask bench cni --pods 1000`).
pub const POD_SUBNET: &str = "10.77.0.0/20";
/// The bridge's address (pods' gateway), inside the node netns only.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Interface name inside pods.
pub const POD_IFNAME: &str = "eth0";
/// CNI plugins symlinked from /usr/lib/cni into the cluster's bin dir.
pub const STANDARD_PLUGINS: [&str; 4] = ["bridge", "host-local", "portmap", "loopback"];

/// The `weft-cni` entry appended to the conflist.
#[derive(Clone, Debug)]
pub struct WeftEntry {
    /// The plugin binary; `<bin dir>/weft-cni` is a symlink to it.
    pub binary: PathBuf,
    /// `agent_socket` in the entry. A relative path is taken from the
    /// cluster's work dir (so `"agent.sock"` works before the dir exists).
    pub agent_socket: PathBuf,
    /// Fields merged over the defaults (`type`, `agent_socket`, `log_file`);
    /// a `null` value removes that key.
    pub extra: Map<String, Value>,
}

impl WeftEntry {
    pub fn new(binary: impl Into<PathBuf>, agent_socket: impl Into<PathBuf>) -> Self {
        WeftEntry {
            binary: binary.into(),
            agent_socket: agent_socket.into(),
            extra: Map::new(),
        }
    }

    /// Adds (or with `Value::Null`, removes) one field of the entry.
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_string(), value);
        self
    }
}

/// How to build the cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The weft-cni entry; `None` gives a conflist of `bridge` + `portmap` only.
    pub weft: Option<WeftEntry>,
    /// The conflist's `cniVersion` (default "1.0.0", the newest libcni 1.1.2
    /// and the Debian plugins speak).
    pub cni_version: String,
    /// The libcni driver; default [`tools::cnidriver_path`] (built on demand).
    pub driver: Option<PathBuf>,
    /// Deadline the driver gives each libcni call.
    pub cni_timeout: Duration,
    /// Extra environment for the driver; libcni passes its environment on to
    /// every plugin (e.g. `RUST_LOG` for weft-cni).
    pub driver_env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            weft: None,
            cni_version: "1.0.0".to_string(),
            driver: None,
            cni_timeout: Duration::from_secs(60),
            driver_env: Vec::new(),
        }
    }
}

impl ClusterOptions {
    /// Default options with the given weft-cni entry.
    pub fn with_weft(entry: WeftEntry) -> Self {
        ClusterOptions {
            weft: Some(entry),
            ..Default::default()
        }
    }
}

/// Per-pod options for [`Cluster::add_pod_with`].
#[derive(Clone, Debug, Default)]
pub struct PodOptions {
    /// libcni `CapabilityArgs` (runtimeConfig), e.g.
    /// `{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}`.
    /// `None` passes `{"portMappings":[]}` as containerd does.
    pub capability_args: Option<Value>,
    /// The pod's uid (`K8S_POD_UID`), as the API server gave it; `None`: a random one.
    pub uid: Option<String>,
}

/// A pod sandbox: its netns and the ids a runtime would pass to CNI.
#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// 64 hex chars, like a containerd sandbox id.
    pub container_id: String,
    pub ifname: String,
    pub netns: NetNs,
    /// The pod's IPv4 address from the ADD result.
    pub ip: Ipv4Addr,
    /// The ADD result as libcni returned it.
    pub result: Value,
    /// CapabilityArgs used for ADD, reused for CHECK and DEL.
    pub capability_args: Option<Value>,
}

impl Pod {
    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip.into(), port)
    }
}

/// A CNI command of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Check,
    Del,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "add",
            CniCommand::Check => "check",
            CniCommand::Del => "del",
        }
    }
}

/// A successful driver run.
#[derive(Clone, Debug)]
pub struct CniOutput {
    pub stdout: String,
    /// Includes what plugins wrote to stderr (libcni passes it through).
    pub stderr: String,
    /// Time spent inside the libcni call, in microseconds.
    pub elapsed_us: u64,
    /// Each plugin libcni ran, in order, with the time from its exec until libcni had its output (microseconds).
    pub plugins_us: Vec<(String, u64)>,
}

/// The driver's `plugin_us=TYPE:N` lines.
fn plugin_times(stderr: &str) -> Vec<(String, u64)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("plugin_us="))
        .filter_map(|v| v.rsplit_once(':'))
        .filter_map(|(name, us)| Some((name.to_string(), us.trim().parse().ok()?)))
        .collect()
}

/// The error object a plugin returned (`{"code","msg","details"}`), as
/// libcni decoded it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct CniError {
    pub code: u64,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// A failed CNI operation: the driver's exit status, stdout and stderr, or
/// (status `None`) why the harness could not run it.
#[derive(Clone)]
pub struct CniFailure {
    /// `add`, `check`, `del`, or a harness step.
    pub operation: String,
    /// The command line run (empty if none was).
    pub command: String,
    /// Driver exit code; `None` if it did not run or died by a signal.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// `elapsed_us` reported by the driver, if it got that far.
    pub elapsed_us: Option<u64>,
    /// The plugin's CNI error, if the failure carried one.
    pub cni_error: Option<CniError>,
    /// For `add_pod`: what went wrong in the runtime-style cleanup (DEL and
    /// netns removal) after the failed ADD; `None` if it succeeded.
    pub cleanup: Option<String>,
}

impl CniFailure {
    fn harness(operation: &str, err: impl fmt::Display) -> Self {
        CniFailure {
            operation: operation.to_string(),
            command: String::new(),
            status: None,
            stdout: String::new(),
            stderr: err.to_string(),
            elapsed_us: None,
            cni_error: None,
            cleanup: None,
        }
    }

    /// The driver's error message (its stderr lines other than `elapsed_us=`,
    /// `plugin_us=` and `cni_error=`).
    pub fn message(&self) -> String {
        self.stderr
            .lines()
            .filter(|l| !["elapsed_us=", "cni_error=", "plugin_us="].iter().any(|p| l.starts_with(p)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for CniFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Some(c) => format!("exit {c}"),
            None if self.command.is_empty() => "not run".to_string(),
            None => "killed by a signal".to_string(),
        };
        write!(f, "CNI {} failed ({status})", self.operation)?;
        if !self.command.is_empty() {
            write!(f, "\ncommand: {}", self.command)?;
        }
        write!(f, "\nstderr: {}", self.stderr.trim_end())?;
        if !self.stdout.trim().is_empty() {
            write!(f, "\nstdout: {}", self.stdout.trim_end())?;
        }
        if let Some(c) = &self.cleanup {
            write!(f, "\ncleanup after failed ADD: {c}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CniFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for CniFailure {}

impl From<HarnessError> for CniFailure {
    fn from(e: HarnessError) -> Self {
        CniFailure::harness("setup", e)
    }
}

/// The node. See the module docs.
pub struct Cluster {
    id: String,
    node: Option<NetNs>,
    work_dir: PathBuf,
    driver: PathBuf,
    opts: ClusterOptions,
    agent_socket: Option<PathBuf>,
    pod_counter: AtomicU32,
    /// Names of pod namespaces made, deleted on drop if still there.
    pods: Mutex<Vec<String>>,
    keep: bool,
}

impl Cluster {
    /// A cluster whose conflist is `bridge` + `portmap` (no weft entry).
    /// `name_prefix` names the work dir (`$TMPDIR/weft-<prefix>-<id>`).
    pub fn new(name_prefix: &str) -> Result<Cluster, HarnessError> {
        Cluster::with_options(name_prefix, ClusterOptions::default())
    }

    /// A cluster built from `opts`. The node netns is `wn-<id>` with `lo` up.
    pub fn with_options(name_prefix: &str, opts: ClusterOptions) -> Result<Cluster, HarnessError> {
        let driver = match &opts.driver {
            Some(d) => d.clone(),
            None => tools::cnidriver_path()?,
        };
        let prefix: String = name_prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();

        // A fresh id whose netns name and work dir are both unused.
        let mut attempt = 0;
        let (id, node) = loop {
            attempt += 1;
            let id = format!("{:06x}", util::unique_u64() & 0xff_ffff);
            let name = format!("wn-{id}");
            let dir = std::env::temp_dir().join(format!("weft-{prefix}-{id}"));
            if Path::new(netns::NETNS_RUN_DIR).join(&name).exists() || dir.exists() {
                if attempt >= 20 {
                    return Err(HarnessError(format!(
                        "no free node netns name / work dir after {attempt} tries (last {name}, {})",
                        dir.display()
                    )));
                }
                continue;
            }
            match NetNs::create_with_lo(&name) {
                Ok(ns) => break (id, ns),
                Err(e) if attempt >= 5 => return Err(e.context("creating the node netns")),
                Err(_) => continue,
            }
        };
        let work_dir = std::env::temp_dir().join(format!("weft-{prefix}-{id}"));
        let keep = std::env::var_os("WEFT_TEST_KEEP").is_some_and(|v| !v.is_empty() && v != "0");
        let agent_socket = opts.weft.as_ref().map(|w| {
            if w.agent_socket.is_absolute() {
                w.agent_socket.clone()
            } else {
                work_dir.join(&w.agent_socket)
            }
        });
        // From here on Drop cleans up whatever was made.
        let cluster = Cluster {
            id,
            node: Some(node),
            work_dir,
            driver,
            opts,
            agent_socket,
            pod_counter: AtomicU32::new(0),
            pods: Mutex::new(Vec::new()),
            keep,
        };
        cluster.populate_work_dir()?;
        Ok(cluster)
    }

    fn populate_work_dir(&self) -> Result<(), HarnessError> {
        std::fs::create_dir(&self.work_dir).map_err(|e| {
            HarnessError(format!(
                "creating work dir {}: {e}",
                self.work_dir.display()
            ))
        })?;
        for d in [
            self.bin_dir(),
            self.cache_dir(),
            self.ipam_dir(),
            self.conf_dir(),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| HarnessError(format!("creating {}: {e}", d.display())))?;
        }
        for p in STANDARD_PLUGINS {
            let target = Path::new(tools::CNI_PLUGIN_DIR).join(p);
            if !target.is_file() {
                return Err(HarnessError(format!(
                    "CNI plugin {} is missing (apt-get install containernetworking-plugins)",
                    target.display()
                )));
            }
            symlink(&target, &self.bin_dir().join(p))?;
        }
        if let Some(w) = &self.opts.weft {
            symlink(&w.binary, &self.bin_dir().join("weft-cni"))?;
        }
        self.write_conflist(&self.default_conflist())
    }

    /// The node's network namespace.
    pub fn node(&self) -> &NetNs {
        self.node.as_ref().expect("node netns present until drop")
    }

    /// The short unique id in the cluster's names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The temp work dir (removed on drop).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// CNI plugin dir (symlinks to the Debian plugins and to weft-cni).
    pub fn bin_dir(&self) -> PathBuf {
        self.work_dir.join("bin")
    }

    /// libcni's cache dir (`--cache-dir`).
    pub fn cache_dir(&self) -> PathBuf {
        self.work_dir.join("cache")
    }

    /// host-local's `dataDir`.
    pub fn ipam_dir(&self) -> PathBuf {
        self.work_dir.join("ipam")
    }

    /// The node's CNI config dir (the cluster's `/etc/cni/net.d`).
    pub fn conf_dir(&self) -> PathBuf {
        self.work_dir.join("net.d")
    }

    /// The conflist every CNI call reads (re-read on each call).
    pub fn conflist_path(&self) -> PathBuf {
        self.conf_dir().join("10-weft-test.conflist")
    }

    /// `log_file` of the default weft entry: `<work dir>/weft-cni.log`.
    pub fn weft_cni_log(&self) -> PathBuf {
        self.work_dir.join("weft-cni.log")
    }

    /// The weft entry's `agent_socket` (absolute), if there is a weft entry.
    pub fn agent_socket(&self) -> Option<&Path> {
        self.agent_socket.as_deref()
    }

    /// The options the cluster was built with.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// The libcni driver binary in use.
    pub fn driver_path(&self) -> &Path {
        &self.driver
    }

    /// The conflist the cluster was created with.
    pub fn default_conflist(&self) -> Value {
        let mut plugins = vec![
            json!({
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": POD_SUBNET,
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.ipam_dir(),
                },
            }),
            json!({
                "type": "portmap",
                "capabilities": {"portMappings": true},
                "snat": false,
            }),
        ];
        if let Some(w) = &self.opts.weft {
            let mut entry = Map::new();
            entry.insert("type".into(), json!("weft-cni"));
            entry.insert("agent_socket".into(), json!(self.agent_socket));
            entry.insert("log_file".into(), json!(self.weft_cni_log()));
            for (k, v) in &w.extra {
                if v.is_null() {
                    entry.remove(k);
                } else {
                    entry.insert(k.clone(), v.clone());
                }
            }
            plugins.push(Value::Object(entry));
        }
        json!({
            "cniVersion": self.opts.cni_version,
            "name": NETWORK_NAME,
            "plugins": plugins,
        })
    }

    /// The conflist as currently on disk.
    pub fn conflist(&self) -> Result<Value, HarnessError> {
        let p = self.conflist_path();
        let s = std::fs::read_to_string(&p)
            .map_err(|e| HarnessError(format!("reading {}: {e}", p.display())))?;
        serde_json::from_str(&s).map_err(|e| HarnessError(format!("parsing {}: {e}", p.display())))
    }

    /// Replaces the conflist (atomically: temp file + rename).
    pub fn write_conflist(&self, conflist: &Value) -> Result<(), HarnessError> {
        let p = self.conflist_path();
        let tmp = p.with_extension("tmp");
        let text = serde_json::to_string_pretty(conflist)
            .map_err(|e| HarnessError(format!("serializing conflist: {e}")))?;
        std::fs::write(&tmp, text)
            .map_err(|e| HarnessError(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &p).map_err(|e| {
            HarnessError(format!(
                "renaming {} to {}: {e}",
                tmp.display(),
                p.display()
            ))
        })
    }

    /// Creates a pod sandbox netns (`lo` up), runs CNI ADD and returns the pod.
    /// Like containerd, a failed ADD is followed by DEL and removal of the
    /// netns; the returned failure is the ADD's.
    pub fn add_pod(&self, namespace: &str, name: &str) -> Result<Pod, CniFailure> {
        self.add_pod_with(namespace, name, &PodOptions::default())
            .map(|(p, _)| p)
    }

    /// [`Cluster::add_pod`], also returning the time spent inside libcni's
    /// `AddNetworkList` in microseconds.
    pub fn add_pod_timed(&self, namespace: &str, name: &str) -> Result<(Pod, u64), CniFailure> {
        self.add_pod_with(namespace, name, &PodOptions::default())
            .map(|(p, o)| (p, o.elapsed_us))
    }

    /// [`Cluster::add_pod`] with options; returns the driver's output too.
    pub fn add_pod_with(
        &self,
        namespace: &str,
        name: &str,
        opts: &PodOptions,
    ) -> Result<(Pod, CniOutput), CniFailure> {
        let n = self.pod_counter.fetch_add(1, Ordering::Relaxed);
        let ns_name = format!("wp-{}-{n}", self.id);
        let netns = NetNs::create_with_lo(&ns_name)
            .map_err(|e| CniFailure::harness("add (creating the pod netns)", e))?;
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ns_name.clone());
        let container_id = format!(
            "{:016x}{:016x}{:016x}{:016x}",
            util::unique_u64(),
            util::unique_u64(),
            util::unique_u64(),
            util::unique_u64()
        );
        let u = (util::unique_u64(), util::unique_u64());
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            u.0 >> 32,
            (u.0 >> 16) & 0xffff,
            u.0 & 0xfff,
            (u.1 >> 48) & 0x3fff | 0x8000,
            u.1 & 0xffff_ffff_ffff
        );
        let uid = opts.uid.clone().unwrap_or(uid);
        let mut pod = Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid,
            container_id,
            ifname: POD_IFNAME.to_string(),
            netns,
            ip: Ipv4Addr::UNSPECIFIED,
            result: Value::Null,
            capability_args: opts.capability_args.clone(),
        };
        let added = self.cni(CniCommand::Add, &pod).and_then(|out| {
            let parsed = serde_json::from_str::<Value>(out.stdout.trim())
                .map_err(|e| format!("ADD result is not JSON: {e}"))
                .and_then(|v| match pod_ipv4(&v) {
                    Some(ip) => Ok((v, ip)),
                    None => Err("ADD result has no IPv4 address".to_string()),
                });
            match parsed {
                Ok((v, ip)) => {
                    pod.result = v;
                    pod.ip = ip;
                    Ok(out)
                }
                Err(why) => Err(CniFailure {
                    operation: "add (parsing the result)".into(),
                    command: String::new(),
                    status: Some(0),
                    stdout: out.stdout,
                    stderr: format!("{why}\ndriver stderr: {}", out.stderr),
                    elapsed_us: Some(out.elapsed_us),
                    cni_error: None,
                    cleanup: None,
                }),
            }
        });
        match added {
            Ok(out) => Ok((pod, out)),
            Err(mut failure) => {
                // What a runtime does after a failed ADD: DEL, then drop the netns.
                let mut problems = Vec::new();
                if let Err(del) = self.cni(CniCommand::Del, &pod) {
                    problems.push(del.to_string());
                }
                let name = pod.netns.name().to_string();
                self.untrack(&name);
                if let Err(e) = pod.netns.delete() {
                    problems.push(format!("deleting netns {name}: {e}"));
                }
                if !problems.is_empty() {
                    failure.cleanup = Some(problems.join("\n"));
                }
                Err(failure)
            }
        }
    }

    /// CNI CHECK for `pod`.
    pub fn check_pod(&self, pod: &Pod) -> Result<CniOutput, CniFailure> {
        self.cni(CniCommand::Check, pod)
    }

    /// CNI DEL for `pod`. The pod netns is kept, so DEL can be repeated; see
    /// [`Cluster::remove_pod`].
    pub fn del_pod(&self, pod: &Pod) -> Result<CniOutput, CniFailure> {
        self.cni(CniCommand::Del, pod)
    }

    /// Deletes the pod's netns (no CNI call).
    pub fn remove_pod(&self, pod: Pod) -> Result<(), HarnessError> {
        self.untrack(pod.netns.name());
        pod.netns.delete()
    }

    fn untrack(&self, ns_name: &str) {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|n| n != ns_name);
    }

    /// Runs the libcni driver for `pod` inside the node netns.
    pub fn cni(&self, command: CniCommand, pod: &Pod) -> Result<CniOutput, CniFailure> {
        let caps = pod.capability_args.as_ref().map(|v| v.to_string());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.node().name()])
            .arg(&self.driver)
            .arg(command.as_str())
            .arg("--conflist")
            .arg(self.conflist_path())
            .arg("--bin-dir")
            .arg(self.bin_dir())
            .arg("--cache-dir")
            .arg(self.cache_dir())
            .arg("--netns")
            .arg(pod.netns.path())
            .args(["--container-id", &pod.container_id])
            .args(["--ifname", &pod.ifname])
            .args(["--pod-namespace", &pod.namespace])
            .args(["--pod-name", &pod.name])
            .args(["--pod-uid", &pod.uid])
            .arg("--timeout")
            .arg(format!("{}ms", self.opts.cni_timeout.as_millis()));
        if let Some(c) = &caps {
            cmd.args(["--capability-args", c]);
        }
        for (k, v) in &self.opts.driver_env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        let line = util::command_line(&cmd);
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                let mut f =
                    CniFailure::harness(command.as_str(), format!("cannot run driver: {e}"));
                f.command = line;
                return Err(f);
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let elapsed_us = stderr
            .lines()
            .find_map(|l| l.strip_prefix("elapsed_us="))
            .and_then(|v| v.trim().parse::<u64>().ok());
        let cni_error = stderr
            .lines()
            .find_map(|l| l.strip_prefix("cni_error="))
            .and_then(|v| serde_json::from_str::<CniError>(v).ok());
        match (out.status.success(), elapsed_us) {
            (true, Some(elapsed_us)) => Ok(CniOutput {
                plugins_us: plugin_times(&stderr),
                stdout,
                stderr,
                elapsed_us,
            }),
            (ok, _) => Err(CniFailure {
                operation: command.as_str().to_string(),
                command: line,
                status: out.status.code(),
                stdout,
                stderr: if ok {
                    format!("driver succeeded but printed no elapsed_us=\n{stderr}")
                } else {
                    stderr
                },
                elapsed_us,
                cni_error,
                cleanup: None,
            }),
        }
    }

    /// Runs `cmd` in the node netns via `ip netns exec` (see [`NetNs::exec`]).
    pub fn node_exec(&self, cmd: &[&str]) -> Result<std::process::Output, HarnessError> {
        self.node().exec(cmd)
    }

    /// [`Cluster::node_exec`] requiring exit 0; returns stdout.
    pub fn node_exec_ok(&self, cmd: &[&str]) -> Result<String, HarnessError> {
        self.node().exec_ok(cmd)
    }

    /// A `Command` for `program` that will run in the node netns (setns in
    /// the child; mounts such as cgroup2 and bpffs stay visible).
    pub fn node_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.node().command(program)
    }

    /// Spawns `cmd` in the node netns (e.g. `weft-agent run`); the guard stops
    /// it when dropped. Stdio is whatever `cmd` was configured with.
    pub fn node_spawn(&self, mut cmd: Command) -> Result<ChildGuard, HarnessError> {
        self.node().enter_on_spawn(&mut cmd);
        let line = util::command_line(&cmd);
        let child = cmd.spawn().map_err(|e| {
            HarnessError(format!("spawning `{line}` in {}: {e}", self.node().name()))
        })?;
        Ok(ChildGuard::new(child, line))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.weft_cni_log();
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "--- tail of {} ---\n{}\n---",
                    log.display(),
                    tail.join("\n")
                );
            }
        }
        let pods = std::mem::take(&mut *self.pods.lock().unwrap_or_else(|e| e.into_inner()));
        if self.keep {
            eprintln!(
                "WEFT_TEST_KEEP: keeping node netns {}, pod netns {:?}, work dir {}",
                self.node().name(),
                pods,
                self.work_dir.display()
            );
            if let Some(node) = self.node.take() {
                std::mem::forget(node);
            }
            return;
        }
        for name in pods {
            let _ = netns::delete_netns(&name);
        }
        if let Some(node) = self.node.take() {
            let _ = node.delete();
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

fn symlink(target: &Path, link: &Path) -> Result<(), HarnessError> {
    std::os::unix::fs::symlink(target, link).map_err(|e| {
        HarnessError(format!(
            "symlinking {} -> {}: {e}",
            link.display(),
            target.display()
        ))
    })
}

/// The pod's IPv4 address in a CNI result: from `ips` (0.3.0+; prefers an
/// address on a sandbox interface) or `ip4.ip` (0.1/0.2).
pub fn pod_ipv4(result: &Value) -> Option<Ipv4Addr> {
    let parse = |s: &str| s.split('/').next().and_then(|a| a.parse::<Ipv4Addr>().ok());
    if let Some(ips) = result.get("ips").and_then(Value::as_array) {
        let ifaces = result.get("interfaces").and_then(Value::as_array);
        let on_sandbox = |ip: &Value| {
            ip.get("interface")
                .and_then(Value::as_u64)
                .and_then(|i| ifaces.and_then(|f| f.get(i as usize)))
                .and_then(|f| f.get("sandbox"))
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        };
        let v4: Vec<(&Value, Ipv4Addr)> = ips
            .iter()
            .filter_map(|ip| Some((ip, parse(ip.get("address")?.as_str()?)?)))
            .collect();
        return v4
            .iter()
            .find(|(ip, _)| on_sandbox(ip))
            .or_else(|| v4.first())
            .map(|(_, a)| *a);
    }
    result
        .get("ip4")
        .and_then(|v| v.get("ip"))
        .and_then(Value::as_str)
        .and_then(parse)
}
