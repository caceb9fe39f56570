//! Network namespaces of pods: which paths we accept, how we hold them, and how code runs inside them.
//!
//! Code runs in a pod's netns by [`Netns::with`]: the *current* thread enters the netns and comes back. Per
//! connection, to create upstream sockets (a socket keeps the netns it was created in); per capture, on a
//! blocking-pool thread, to bind listeners, program rules and start rule programs (a child inherits its parent
//! thread's namespaces, so the spawn stays the cheap vfork-style one with no `pre_exec` hook). No thread is
//! started for it: on this kind of node starting one costs about 0.1 ms of a pod's ADD. If the way back fails
//! the process aborts: a thread left in a pod's netns would silently send other pods' traffic from the wrong
//! namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nix::sched::CloneFlags;
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// Where runtimes put pod network namespaces. Anything else is refused: a path from the CNI request is an
/// instruction to enter a namespace as root, so it must name a network namespace and nothing else.
const ALLOWED_PREFIXES: [&str; 2] = ["/var/run/netns/", "/run/netns/"];

/// A validated netns path as given by the runtime (`CNI_NETNS`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NetnsPath(PathBuf);

impl NetnsPath {
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl TryFrom<String> for NetnsPath {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, String> {
        let path = PathBuf::from(&raw);
        let plain = raw.starts_with('/') && !raw.split('/').any(|part| part == "." || part == "..");
        if !plain {
            return Err(format!("netns path {raw:?} must be absolute without '.' or '..' components"));
        }
        let under_netns_dir = ALLOWED_PREFIXES.iter().any(|p| raw.starts_with(p) && raw.len() > p.len());
        if under_netns_dir || is_proc_pid_netns(&path) {
            Ok(NetnsPath(path))
        } else {
            Err(format!(
                "netns path {raw:?} is not accepted: it must be under /var/run/netns/, /run/netns/ or be /proc/<pid>/ns/net"
            ))
        }
    }
}

impl From<NetnsPath> for String {
    fn from(p: NetnsPath) -> String {
        p.0.to_string_lossy().into_owned()
    }
}

impl std::fmt::Display for NetnsPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.display().fmt(f)
    }
}

fn is_proc_pid_netns(path: &Path) -> bool {
    let parts: Vec<_> = path.components().collect();
    matches!(
        parts.as_slice(),
        [Component::RootDir, Component::Normal(proc), Component::Normal(pid), Component::Normal(ns), Component::Normal(net)]
            if *proc == "proc" && *ns == "ns" && *net == "net"
                && pid.to_str().is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    )
}

/// The identity of a network namespace: device and inode of its nsfs file. A path can be re-used by a new
/// namespace after the old one is gone; the inode tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// An open pod network namespace. Cloning shares the file descriptor.
#[derive(Debug, Clone)]
pub struct Netns {
    fd: Arc<OwnedFd>,
    id: NetnsId,
    path: NetnsPath,
}

impl Netns {
    /// Opens `path` and checks that it is a network namespace.
    pub fn open(path: &NetnsPath) -> io::Result<Netns> {
        let file = File::open(path.as_path())?;
        check_is_netns(file.as_fd())?;
        let meta = file.metadata()?;
        Ok(Netns { fd: Arc::new(file.into()), id: NetnsId { dev: meta.dev(), ino: meta.ino() }, path: path.clone() })
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    pub fn path(&self) -> &NetnsPath {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `f` on the current thread inside this netns, then returns the thread to the agent's own netns,
    /// also when `f` panics (the thread may be a runtime worker that goes on serving).
    pub fn with<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = host_netns()?;
        setns(self.fd())?;
        let _back = ReturnHome(home);
        Ok(f())
    }
}

/// Returns the thread to the agent's own network namespace when dropped (unwinding included).
struct ReturnHome(&'static OwnedFd);

impl Drop for ReturnHome {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.as_fd()) {
            // See the module comment: continuing would route later connections from the wrong namespace.
            eprintln!("weft-agent: cannot return a thread to the agent's network namespace: {e}; aborting");
            std::process::abort();
        }
    }
}

/// Whether `path` still names the same namespace as `id` (the pod is alive).
pub fn still_same(path: &NetnsPath, id: NetnsId) -> bool {
    Netns::open(path).is_ok_and(|ns| ns.id() == id)
}

/// The agent's own network namespace: recorded by [`init_host_netns`], which the agent calls from `main` before
/// any thread can enter a pod namespace; otherwise (one-shot commands) the main thread's, the first time it is
/// asked for.
fn host_netns() -> io::Result<&'static OwnedFd> {
    if let Some(fd) = HOST_NETNS.get() {
        return Ok(fd);
    }
    let fd: OwnedFd = File::open("/proc/self/ns/net")?.into();
    Ok(HOST_NETNS.get_or_init(|| fd))
}

static HOST_NETNS: OnceLock<OwnedFd> = OnceLock::new();

/// Records the calling thread's network namespace as the agent's own.
pub fn init_host_netns() -> io::Result<()> {
    if HOST_NETNS.get().is_none() {
        let fd: OwnedFd = File::open("/proc/thread-self/ns/net")?.into();
        let _ = HOST_NETNS.set(fd);
    }
    Ok(())
}

/// Moves the calling thread (only it: CLONE_NEWNET is per thread) into the namespace of `fd`.
fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::sched::setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

fn check_is_netns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // /proc/<pid>/ns/net is a magic link into nsfs as well.
    if fstatfs(fd).map_err(io::Error::from)?.filesystem_type() != NSFS_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace (not on nsfs)"));
    }
    Ok(())
}

/// Whether IPv6 is enabled in the namespace the calling thread is in. Asked first with a socket (`::1` can be
/// bound: enabled, and loopback holds the address the v6 outbound listener binds), then of
/// `/proc/sys/net/ipv6/conf/all/disable_ipv6`: proc's sysctl lookups slow down with every namespace on the node,
/// and a runtime brings a pod's loopback up before its CNI ADD.
pub fn ipv6_enabled_here() -> bool {
    let loopback = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
    let bound = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM.cloexec(), None).and_then(|s| s.bind(&loopback.into()));
    bound.is_ok() || std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6").is_ok_and(|v| v.trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetnsPath, String> {
        NetnsPath::try_from(s.to_string())
    }

    #[test]
    fn accepts_runtime_netns_paths() {
        for ok in ["/var/run/netns/cni-1234", "/run/netns/pod", "/proc/42/ns/net"] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "/etc/passwd",
            "/var/run/netns/",
            "/var/run/netns/../../etc/shadow",
            "/proc/self/ns/net",
            "/proc/1/ns/mnt",
            "relative/netns",
            "/var/run/netns/./x",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("netns path"), "{bad}: {err}");
        }
    }

    /// A named network namespace for one test, deleted when dropped; `None` (the test says it is skipped)
    /// without root.
    struct TestNetns(String, Netns);

    impl TestNetns {
        fn create(test: &str) -> Option<TestNetns> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("SKIPPED {test}: needs root to create a network namespace");
                return None;
            }
            let name = format!("weft-unit-{test}-{}", std::process::id());
            let name = name[name.len().saturating_sub(60)..].to_string();
            assert!(std::process::Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
            init_host_netns().unwrap();
            let ns = Netns::open(&parse(&format!("/var/run/netns/{name}")).unwrap()).unwrap();
            Some(TestNetns(name, ns))
        }

        fn ip(&self, args: &[&str]) -> bool {
            std::process::Command::new("ip").arg("-n").arg(&self.0).args(args).status().unwrap().success()
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "delete", &self.0]).status();
        }
    }

    /// A panic inside a pod's namespace leaves the thread back in the agent's.
    #[test]
    fn a_panic_inside_a_pod_namespace_returns_the_thread_home() {
        let Some(TestNetns(_, ns)) = &TestNetns::create("panic-home") else { return };
        let here = || std::fs::metadata("/proc/thread-self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
        let home = here();
        let inside = ns.with(here).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ns.with(|| panic!("inside the pod"))));
        let after = here();
        assert_ne!(inside, home, "with() entered the pod's namespace");
        assert!(panicked.is_err());
        assert_eq!(after, home, "the thread is back in the agent's namespace after the panic");
    }

    /// IPv6 counts as enabled in a pod's namespace unless it is disabled, whether loopback is up yet or not.
    #[test]
    fn ipv6_is_enabled_unless_disabled() {
        let Some(pod) = TestNetns::create("ipv6") else { return };
        let lo_down = pod.1.with(ipv6_enabled_here).unwrap();
        assert!(pod.ip(&["link", "set", "lo", "up"]));
        let lo_up = pod.1.with(ipv6_enabled_here).unwrap();
        let sysctl = ["netns", "exec", &pod.0, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1"];
        assert!(std::process::Command::new("ip").args(sysctl).status().unwrap().success());
        let disabled = pod.1.with(ipv6_enabled_here).unwrap();
        assert_eq!((lo_down, lo_up, disabled), (true, true, false), "(lo down, lo up, IPv6 disabled)");
    }

    #[test]
    fn opening_a_plain_file_is_refused() {
        let err = check_is_netns(File::open("/proc/self/status").unwrap().as_fd()).unwrap_err();
        assert!(err.to_string().contains("not a network namespace"));
    }
}

/// The network namespaces that hold `ip` on one of their interfaces, among the named ones (`/var/run/netns`,
/// `/run/netns`, where runtimes pin pod namespaces): how a pod that started before the agent (no CNI ADD reached
/// it) is found again. On a node a pod address is in one namespace; the caller refuses anything else. Blocking;
/// run it off the async runtime.
pub fn find_by_ip(ip: std::net::IpAddr) -> Vec<NetnsPath> {
    let host = std::fs::metadata("/proc/self/ns/net").ok().map(|m| (m.dev(), m.ino()));
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for path in candidates() {
        let Ok(path) = NetnsPath::try_from(path.to_string_lossy().into_owned()) else { continue };
        let Ok(ns) = Netns::open(&path) else { continue };
        let id = (ns.id.dev, ns.id.ino);
        if Some(id) == host || !seen.insert(id) {
            continue;
        }
        let holds = ns.with(|| {
            nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
                addrs.any(|a| {
                    let addr = a.address;
                    addr.and_then(|s| s.as_sockaddr_in().map(|s| std::net::IpAddr::V4(s.ip()))) == Some(ip)
                        || addr.and_then(|s| s.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip()))) == Some(ip)
                })
            })
        });
        if holds.unwrap_or(false) {
            found.push(path);
        }
    }
    found
}

fn candidates() -> Vec<PathBuf> {
    ALLOWED_PREFIXES
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()))
        .collect()
}
