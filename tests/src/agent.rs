//! A `weft-agent run` process inside a cluster's node netns, with its state and socket in the cluster's work
//! dir and its admin endpoint on the node's loopback (reachable only from inside the node netns).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::util::{wait_for, ChildGuard, HarnessError};
use crate::bin_path;
use std::path::Path;

/// Where the agent's admin endpoint listens by default, inside the node netns.
pub const ADMIN: &str = "127.0.0.1:15000";
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Agent {
    process: Option<ChildGuard>,
    node: PathBuf,
    admin: SocketAddr,
    mode: String,
    args: Vec<String>,
    socket: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    /// bpffs directory of this agent's eBPF pins (ebpf mode): one per cluster, so suites run side by side.
    pins: PathBuf,
    runs: u32,
}

impl Agent {
    /// The agent socket and state dir a cluster should be created with, for `work_dir`.
    pub fn socket_path(work_dir: &std::path::Path) -> PathBuf {
        work_dir.join("run/cni.sock")
    }

    /// Starts `weft-agent run --redirect MODE` in the cluster's node netns and waits until it is ready.
    pub fn start(cluster: &Cluster, mode: &str) -> Result<Agent, HarnessError> {
        Agent::start_with_admin(cluster, mode, ADMIN)
    }

    /// [`Agent::start`] with its own admin address, for a second agent beside a first one (an upgrade).
    pub fn start_with_admin(cluster: &Cluster, mode: &str, admin: &str) -> Result<Agent, HarnessError> {
        Agent::start_with_args(cluster, mode, admin, &[])
    }

    /// [`Agent::start_with_admin`] with extra `weft-agent run` flags.
    pub fn start_with_args(cluster: &Cluster, mode: &str, admin: &str, args: &[&str]) -> Result<Agent, HarnessError> {
        let admin = admin.parse().map_err(|e| HarnessError(format!("admin address {admin}: {e}")))?;
        let socket = cluster
            .agent_socket()
            .map(PathBuf::from)
            .ok_or_else(|| HarnessError::new("the cluster was made without a weft-cni entry"))?;
        let mut agent = Agent {
            process: None,
            node: cluster.node().path().to_path_buf(),
            admin,
            mode: mode.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            socket,
            state_dir: cluster.work_dir().join("state"),
            log: cluster.work_dir().join("weft-agent.log"),
            pins: PathBuf::from("/sys/fs/bpf").join(format!("weft-test-{}", cluster.id())),
            runs: 0,
        };
        agent.launch(cluster)?;
        Ok(agent)
    }

    /// Starts the agent again (after [`Agent::kill`] or [`Agent::stop`]) with the same state dir.
    pub fn restart(&mut self, cluster: &Cluster) -> Result<(), HarnessError> {
        self.launch(cluster)
    }

    fn launch(&mut self, cluster: &Cluster) -> Result<(), HarnessError> {
        self.runs += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(bin_path("weft-agent")?);
        cmd.args(["run", "--redirect", &self.mode, "--log-level", "debug"])
            .arg("--admin-address")
            .arg(self.admin.to_string())
            .arg("--cni-socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpf-pin-path")
            .arg(&self.pins)
            .arg("--drain-timeout-ms")
            .arg("20000")
            .args(&self.args)
            // For debugging a suite with other agent settings, e.g. WEFT_AGENT_ARGS="--sockmap true".
            .args(std::env::var("WEFT_AGENT_ARGS").unwrap_or_default().split_whitespace())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut process = cluster.node_spawn(cmd)?;
        // A stopping agent drains established connections before it exits.
        process.set_grace(Duration::from_secs(25));
        self.process = Some(process);
        self.wait_ready()
    }

    /// Polls `/ready` until it answers 200 or the deadline passes (and fails early if the process exits).
    pub fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let (log, node, admin) = (self.log.clone(), self.node.clone(), self.admin);
        let process = self.process.as_mut().ok_or_else(|| HarnessError::new("agent not running"))?;
        wait_for("weft-agent /ready", START_TIMEOUT, || {
            if let Ok(Some(status)) = process.wait_timeout(Duration::ZERO) {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("agent exited ({status}); log:\n{tail}"));
            }
            match http_get(&node, admin, "/ready") {
                Ok((200, _)) => Ok(()),
                Ok((code, body)) => Err(format!("{code} {body}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .map_err(|e| {
            if e.0.contains("agent exited") {
                HarnessError(format!("weft-agent did not start: {}", e.0))
            } else {
                e
            }
        })
    }

    /// SIGKILL: no clean-up at all, like a crash or an OOM kill.
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        if let Some(mut p) = self.process.take() {
            p.signal(libc::SIGKILL)?;
            p.wait_timeout(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// SIGTERM and wait (the agent drains established connections first); returns how it exited.
    pub fn stop(&mut self) -> Result<Option<std::process::ExitStatus>, HarnessError> {
        match self.process.take() {
            Some(mut p) => Ok(Some(p.stop()?)),
            None => Ok(None),
        }
    }

    /// The agent's `/status` document.
    pub fn status(&self) -> Result<Value, HarnessError> {
        let (code, body) = http_get(&self.node, self.admin, "/status")?;
        if code != 200 {
            return Err(HarnessError(format!("/status answered {code}: {body}")));
        }
        serde_json::from_str(&body).map_err(|e| HarnessError(format!("/status is not JSON ({e}): {body}")))
    }

    /// The status entry of pod `namespace/name`, if the agent captures it.
    pub fn pod_status(&self, namespace: &str, name: &str) -> Result<Option<Value>, HarnessError> {
        let status = self.status()?;
        let pods = status["pods"].as_array().cloned().unwrap_or_default();
        Ok(pods.into_iter().find(|p| p["namespace"] == namespace && p["name"] == name))
    }

    pub fn log_path(&self) -> &PathBuf {
        &self.log
    }

    pub fn state_dir(&self) -> &PathBuf {
        &self.state_dir
    }

    /// The persisted pod registry's file names and contents (one file per captured attachment), as one text.
    pub fn registry(&self) -> String {
        let dir = self.state_dir.join("pods");
        let mut files: Vec<_> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        files.sort();
        files.iter().map(|f| format!("{}: {}\n", f.display(), std::fs::read_to_string(f).unwrap_or_default())).collect()
    }

    /// The running agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.id())
    }

    pub fn pin_path(&self) -> &PathBuf {
        &self.pins
    }

    pub fn mode(&self) -> &str {
        &self.mode
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Unpinning detaches this cluster's programs from the cgroup root.
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.pins);
        if std::thread::panicking() {
            if let Ok(text) = std::fs::read_to_string(&self.log) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!("--- tail of {} ---\n{}\n---", self.log.display(), tail.join("\n"));
            }
        }
    }
}

/// A plain HTTP/1.1 GET from inside the netns at `node` to an agent's admin address; returns status code and
/// body.
pub fn http_get(node: &Path, addr: SocketAddr, path: &str) -> Result<(u16, String), HarnessError> {
    let response = crate::traffic::http_request(connect_in(node, addr)?, "GET", "weft", path)?;
    Ok((response.status, response.body))
}

/// A TCP connection made from inside the netns at `path` (a scoped thread enters it; the socket keeps it).
fn connect_in(path: &Path, addr: SocketAddr) -> Result<std::net::TcpStream, HarnessError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            crate::netns::enter_thread(path)?;
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("connect thread panicked")))
    })
    .map_err(|e| HarnessError(format!("connect to {addr} in {}: {e}", path.display())))
}

/// GET `path` from the agent's default admin address inside `cluster`'s node netns.
pub fn http_get_path(cluster: &Cluster, path: &str) -> (u16, String) {
    let addr: SocketAddr = ADMIN.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 15000)));
    http_get(cluster.node().path(), addr, path).unwrap_or((0, String::new()))
}
