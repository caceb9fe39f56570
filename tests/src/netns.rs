//! Named network namespaces (`ip netns`), and running code or processes in them.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use nix::sched::CloneFlags;

use crate::util::{self, HarnessError};

/// Where `ip netns add NAME` bind-mounts the namespace.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// A named network namespace created with `ip netns add`, deleted (best
/// effort) with `ip netns del` when dropped.
///
/// Deleting only removes the name: the kernel keeps the namespace alive while
/// a process or socket still refers to it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// `ip netns add NAME`. Fails if the name exists. Keep names ≤ 15 chars
    /// if they double as interface names.
    pub fn create(name: &str) -> Result<NetNs, HarnessError> {
        util::run_ok(Command::new("ip").args(["netns", "add", name]))?;
        Ok(NetNs {
            name: name.to_string(),
            path: Path::new(NETNS_RUN_DIR).join(name),
        })
    }

    /// `create` followed by `ip -n NAME link set lo up`, as a container
    /// runtime does for a sandbox.
    pub fn create_with_lo(name: &str) -> Result<NetNs, HarnessError> {
        let ns = NetNs::create(name)?;
        util::run_ok(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// The name under /var/run/netns.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/NAME`, the path CNI gets as `CNI_NETNS`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `cmd` through `ip netns exec NAME ...` and returns its output
    /// (a non-zero exit is not an error here; see [`NetNs::exec_ok`]).
    ///
    /// Note: `ip netns exec` also enters a new mount namespace and remounts
    /// `/sys`, which hides `/sys/fs/cgroup` and `/sys/fs/bpf`; use
    /// [`NetNs::command`] for processes that need those.
    pub fn exec(&self, cmd: &[&str]) -> Result<Output, HarnessError> {
        util::run(&mut self.ip_exec_command(cmd))
    }

    /// Like [`NetNs::exec`] but requires exit 0; returns stdout, or an error
    /// naming the command with its stderr.
    pub fn exec_ok(&self, cmd: &[&str]) -> Result<String, HarnessError> {
        util::run_ok(&mut self.ip_exec_command(cmd))
    }

    /// The `ip netns exec NAME cmd...` command, not yet run.
    pub fn ip_exec_command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(cmd);
        c
    }

    /// A `Command` for `program` whose child enters this namespace with
    /// `setns(2)` just before exec. Unlike `ip netns exec`, only the network
    /// namespace changes (mounts such as cgroup2 and bpffs stay visible), and
    /// the child's pid is the program's own. If the namespace file cannot be
    /// opened the spawn fails with that error.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        self.enter_on_spawn(&mut c);
        c
    }

    /// Makes any `Command` enter this namespace in the child before exec.
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        enter_path_on_spawn(&self.path, cmd);
    }

    /// Runs `f` on a fresh thread that has entered this namespace with
    /// `setns(2)`; returns its result. The thread exits afterwards, so the
    /// caller's namespace is never changed. Errors entering the namespace are
    /// returned; a panic in `f` is propagated.
    pub fn try_run_in<F, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = &self.path;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                enter_thread(path)?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// [`NetNs::try_run_in`], panicking if the namespace cannot be entered.
    pub fn run_in<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        match self.try_run_in(f) {
            Ok(r) => r,
            Err(e) => panic!("cannot enter netns {}: {e}", self.name),
        }
    }

    /// A TCP listener bound inside this namespace. Sockets keep the namespace
    /// they were created in, so the listener can be used from any thread.
    pub fn tcp_listen<A: ToSocketAddrs + Send>(&self, addr: A) -> io::Result<TcpListener> {
        self.try_run_in(move || TcpListener::bind(addr))?
    }

    /// A TCP connection made from inside this namespace.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.try_run_in(move || TcpStream::connect_timeout(&addr, timeout))?
    }

    /// A TCP connection made from inside this namespace, from `source` (any port).
    pub fn tcp_connect_from(&self, source: std::net::IpAddr, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.try_run_in(move || {
            let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.connect_timeout(&addr.into(), timeout)?;
            Ok(TcpStream::from(socket))
        })?
    }

    /// A UDP socket bound inside this namespace.
    pub fn udp_bind<A: ToSocketAddrs + Send>(&self, addr: A) -> io::Result<std::net::UdpSocket> {
        self.try_run_in(move || std::net::UdpSocket::bind(addr))?
    }

    /// Deletes the namespace name now (what `Drop` does), reporting errors.
    pub fn delete(self) -> Result<(), HarnessError> {
        let r = delete_netns(&self.name);
        std::mem::forget(self);
        r
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = delete_netns(&self.name);
    }
}

/// `ip netns del NAME` unless it is already gone.
pub(crate) fn delete_netns(name: &str) -> Result<(), HarnessError> {
    if !Path::new(NETNS_RUN_DIR).join(name).exists() {
        return Ok(());
    }
    util::run_ok(Command::new("ip").args(["netns", "del", name])).map(|_| ())
}

/// Makes `cmd` enter the network namespace at `path` in the child before exec.
pub fn enter_path_on_spawn(path: &Path, cmd: &mut Command) {
    let fd: Result<Arc<OwnedFd>, (i32, String)> = File::open(path)
        .map(|f| Arc::new(OwnedFd::from(f)))
        .map_err(|e| (e.raw_os_error().unwrap_or(libc::EIO), e.to_string()));
    // SAFETY: the closure only calls setns(2), which is async-signal-safe,
    // on an fd owned by the closure (kept open until the Command drops).
    unsafe {
        cmd.pre_exec(move || match &fd {
            Ok(fd) => nix::sched::setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from),
            Err((errno, _)) => Err(io::Error::from_raw_os_error(*errno)),
        });
    }
}

/// Moves the calling thread (only it) into the network namespace at `path`;
/// the error names the path.
pub fn enter_thread(path: &Path) -> io::Result<()> {
    let named = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
    let file = File::open(path).map_err(|e| named(e, "opening netns"))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| named(e.into(), "entering netns"))
}
