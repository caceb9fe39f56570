//! Traffic capture: the rules that send a pod's TCP to the node proxy's in-pod listeners.
//!
//! Every backend implements the same contract, the one istio-cni's sidecar mode implements with a UID:
//! - outbound TCP from the pod is redirected to the outbound listener (15001);
//! - inbound TCP to the pod is redirected to the inbound listener (15006), except Istio's own ports;
//! - the proxy's own sockets carry [`PROXY_MARK`] and pass untouched (the proxy is one process for all pods, so
//!   a UID cannot tell its traffic apart); the proxy's connections to the local app leave from
//!   [`INBOUND_PASSTHROUGH_V4`] and pass too;
//! - loopback is handled as Istio does: app-to-loopback is left alone, the proxy dialling its own pod's address
//!   over `lo` is sent through the inbound listener.
//!
//! Backends apply their whole rule set in one atomic batch and can verify it is still in place.

pub mod ebpf;
pub mod iptables;
pub mod netns;
mod nfnetlink;
pub mod nftables;
pub mod plan;
pub mod probes;

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

pub use weft_ebpf_common::{PROXY_MARK, PROXY_MARK_MASK};

use netns::Netns;
pub use plan::PodCapture;

/// The in-pod outbound listener port (Istio's 15001).
pub const OUTBOUND_PORT: u16 = 15001;
/// The in-pod inbound listener port (Istio's 15006).
pub const INBOUND_PORT: u16 = 15006;
/// Inbound ports never redirected: the proxy's own listeners, HBONE, and Istio's status/metrics ports.
pub const EXCLUDED_INBOUND_PORTS: [u16; 6] = [15001, 15006, 15008, 15020, 15021, 15090];
/// Source address of the proxy's connections to the local app (Istio's inbound passthrough address).
pub const INBOUND_PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
pub const INBOUND_PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// Source address kubelet's probes get on the node when the probe exemption is on (Istio ambient's choice,
/// link-local so that no pod or remote host has it).
pub const DEFAULT_PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);

/// How pod traffic is redirected to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    Iptables,
    Nftables,
    /// cgroup connect hooks + sockmap for outbound, nftables for inbound.
    Ebpf,
}

impl std::str::FromStr for RedirectMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "iptables" => Ok(RedirectMode::Iptables),
            "nftables" => Ok(RedirectMode::Nftables),
            "ebpf" => Ok(RedirectMode::Ebpf),
            other => Err(format!("unknown redirect mode {other:?}: use iptables, nftables or ebpf")),
        }
    }
}

impl fmt::Display for RedirectMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedirectMode::Iptables => "iptables",
            RedirectMode::Nftables => "nftables",
            RedirectMode::Ebpf => "ebpf",
        })
    }
}

/// A capture failure, with the command output that explains it.
#[derive(Debug)]
pub struct CaptureError(pub String);

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CaptureError {}

impl From<std::io::Error> for CaptureError {
    fn from(e: std::io::Error) -> Self {
        CaptureError(e.to_string())
    }
}

/// A redirection backend. All methods block (they run external tools); call them off the async runtime.
/// Every method that installs or checks rules takes the pod's [`PodCapture`] plan.
pub trait Redirector: Send + Sync {
    fn mode(&self) -> RedirectMode;
    /// Whether this backend can honour `plan`; the error names the annotation it cannot. Install, ensure and
    /// verify refuse such a plan too; this lets a caller check a plan before touching a pod.
    fn check(&self, plan: &PodCapture) -> Result<(), CaptureError> {
        let _ = plan;
        Ok(())
    }
    /// Puts the full rule set of `plan` in place in one atomic step, replacing any earlier weft rules (a
    /// changed plan is applied the same way). Fast path for a new pod: it does not read the rules back (the
    /// batch is applied whole or not at all).
    fn install(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError>;
    /// Leaves correct rules alone and re-installs anything else (re-adoption, repeated ADD).
    fn ensure(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        match self.verify(ns, plan) {
            Ok(()) => Ok(()),
            Err(_) => self.install(ns, plan),
        }
    }
    /// Checks the rules in the namespace are exactly the ones `install` puts there for `plan`.
    fn verify(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError>;
    /// Removes weft's rules, leaving everything else. Succeeds when there is nothing to remove.
    fn remove(&self, ns: &Netns) -> Result<(), CaptureError>;
    /// Backend details for the status endpoint.
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The backend's kernel maps, for the node metrics: `(name, entries in use, capacity)`.
    fn map_occupancy(&self) -> Vec<(&'static str, u64, u64)> {
        Vec::new()
    }
}

/// Builds the backend for `mode`, probing the node for the tools (or kernel features) it needs.
/// `probe_source`: kubelet's probes arrive from this address (see [`probes`]) and are not redirected to
/// the pod's probe ports; `None` redirects them like any other connection.
pub fn redirector(
    mode: RedirectMode,
    variant: iptables::Variant,
    ebpf: &ebpf::EbpfSettings,
    probe_source: Option<Ipv4Addr>,
) -> Result<Box<dyn Redirector>, CaptureError> {
    Ok(match mode {
        RedirectMode::Iptables => Box::new(iptables::Iptables::detect(variant, probe_source)?),
        RedirectMode::Nftables => Box::new(nftables::Nftables::detect(probe_source)?),
        RedirectMode::Ebpf => {
            let backend = ebpf::Ebpf::start(ebpf, probe_source)?;
            tracing::info!(adopted = ?backend.adopted, pins = %ebpf.pin_path.display(), "eBPF programs in place");
            Box::new(backend)
        }
    })
}

/// Runs `program args` inside `ns` with `stdin` fed to it, returning stdout; fails with stderr on non-zero exit.
fn run_in(ns: &Netns, program: &str, args: &[&str], stdin: &str) -> Result<String, CaptureError> {
    run(Some(ns), program, args, stdin)
}

/// How long a rule program may take before it is killed: one stuck on a lock must not hold a pod's capture
/// (and the CNI ADD waiting for it) for ever.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);

/// [`run_in`], or in the calling thread's own namespace with `ns` = `None` (children inherit it).
fn run(ns: Option<&Netns>, program: &str, args: &[&str], stdin: &str) -> Result<String, CaptureError> {
    run_within(ns, program, args, stdin, CHILD_DEADLINE)
}

fn run_within(ns: Option<&Netns>, program: &str, args: &[&str], stdin: &str, deadline: Duration) -> Result<String, CaptureError> {
    match ns {
        Some(ns) => ns.with(|| run_here(program, args, stdin, deadline))?,
        None => run_here(program, args, stdin, deadline),
    }
}

/// Runs `program` in the calling thread's network namespace, killing it at `deadline`.
fn run_here(program: &str, args: &[&str], stdin: &str, deadline: Duration) -> Result<String, CaptureError> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| CaptureError(format!("cannot run {program}: {e}")))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Input and output on a thread of their own, so a child that neither reads nor exits is killed in time.
    let (done, outcome) = std::sync::mpsc::channel();
    let input = stdin.to_string();
    let talker = std::thread::spawn(move || {
        let written = match child.stdin.take() {
            Some(mut pipe) => pipe.write_all(input.as_bytes()),
            None => Ok(()),
        };
        let _ = done.send(written.and_then(|()| child.wait_with_output()));
    });
    let out = match outcome.recv_timeout(deadline) {
        Ok(out) => out.map_err(|e| CaptureError(format!("running {program}: {e}")))?,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = talker.join();
            return Err(CaptureError(format!("{program} {} did not finish within {deadline:?} and was killed", args.join(" "))));
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CaptureError(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Finds an executable by name in `PATH` and the usual sbin directories (agents often run with a short PATH).
fn find_binary(name: &str) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .filter(|d| !d.is_empty())
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()));
    found
}

/// How many plans' learnt values (rule listings, encoded batches) are kept; past it a cache starts over (plans are few in practice: most
/// pods share the default one).
const PLANS_KEPT: usize = 256;

/// Something learnt once per plan.
#[derive(Debug)]
pub(crate) struct PerPlan<V>(Mutex<HashMap<PodCapture, V>>);

impl<V: Clone> PerPlan<V> {
    pub(crate) fn new() -> PerPlan<V> {
        PerPlan(Mutex::new(HashMap::new()))
    }

    /// The value for `plan`, made by `learn` the first time (outside the lock: learning may take a while).
    pub(crate) fn get(&self, plan: &PodCapture, learn: impl FnOnce() -> Result<V, CaptureError>) -> Result<V, CaptureError> {
        if let Some(known) = self.lock().get(plan) {
            return Ok(known.clone());
        }
        let value = learn()?;
        let mut cache = self.lock();
        if cache.len() >= PLANS_KEPT {
            cache.clear();
        }
        cache.insert(plan.clone(), value.clone());
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PodCapture, V>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs `f` on a short-lived thread in a private, empty network namespace (only that thread moves: CLONE_NEWNET
/// is per thread, and it exits right after).
pub(crate) fn in_scratch_netns<T: Send>(f: impl FnOnce() -> Result<T, CaptureError> + Send) -> Result<T, CaptureError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| CaptureError(format!("unshare(CLONE_NEWNET): {e}")))?;
                f()
            })
            .join()
            .map_err(|_| CaptureError("scratch netns thread panicked".into()))?
    })
}

/// Whether IPv6 is enabled inside `ns` (rules and listeners for v6 are only set up where it is).
pub fn ipv6_enabled(ns: &Netns) -> bool {
    ns.with(netns::ipv6_enabled_here).unwrap_or(false)
}

#[cfg(test)]
fn check_golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/capture/testdata").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create it)", path.display()));
    assert_eq!(actual, expected, "generated rules differ from {} (UPDATE_GOLDEN=1 to accept)", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule program that neither reads its input nor exits is killed at the deadline (the test would hang
    /// for an hour otherwise), and the error says so.
    #[test]
    fn a_stuck_child_is_killed_at_its_deadline() {
        let input = "x".repeat(1 << 20);
        let err = run_within(None, "sleep", &["3600"], &input, Duration::from_millis(200)).unwrap_err();
        assert!(err.0.contains("sleep 3600 did not finish within 200ms and was killed"), "{err}");
        assert_eq!(run_within(None, "cat", &[], "rules", Duration::from_secs(30)).unwrap(), "rules");
    }
}
