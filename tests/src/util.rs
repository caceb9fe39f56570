//! Small pieces shared by the harness: the error type, running commands with
//! diagnostics, polling with deadlines, and a child-process guard.

use std::fmt;
use std::io;
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// An error from the harness itself (a command that failed, a file that could
/// not be written, a deadline that passed). The message names the command and
/// carries its stderr; `Debug` prints the message verbatim so `unwrap()` in a
/// test shows it readably.
#[derive(Clone, PartialEq, Eq)]
pub struct HarnessError(pub String);

impl HarnessError {
    pub fn new(msg: impl Into<String>) -> Self {
        HarnessError(msg.into())
    }

    /// Prefixes the message with what was being done.
    pub fn context(self, what: impl fmt::Display) -> Self {
        HarnessError(format!("{what}: {}", self.0))
    }
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

impl From<io::Error> for HarnessError {
    fn from(e: io::Error) -> Self {
        HarnessError(e.to_string())
    }
}

/// Renders a command line for messages (program and arguments, space separated).
pub fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Describes an exit status: `exit 1`, `signal 9`.
pub fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{status}"),
    }
}

/// Runs `cmd` to completion capturing stdout and stderr. Only a failure to
/// start is an error; a non-zero exit is returned in the `Output`.
pub fn run(cmd: &mut Command) -> Result<Output, HarnessError> {
    cmd.output()
        .map_err(|e| HarnessError(format!("cannot run `{}`: {e}", command_line(cmd))))
}

/// Runs `cmd` and requires exit status 0; returns its stdout. The error names
/// the command, its status, stderr and stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String, HarnessError> {
    let out = run(cmd)?;
    check_output(&command_line(cmd), &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Turns a non-zero `Output` into an error naming `what`.
pub fn check_output(what: &str, out: &Output) -> Result<(), HarnessError> {
    if out.status.success() {
        return Ok(());
    }
    Err(HarnessError(format!(
        "`{what}` failed ({}):\nstderr: {}\nstdout: {}",
        describe_status(&out.status),
        String::from_utf8_lossy(&out.stderr).trim_end(),
        String::from_utf8_lossy(&out.stdout).trim_end(),
    )))
}

/// Polls `f` every `interval` (starting immediately) until it returns `Ok`
/// or `timeout` passes; the error names `what` and the last failure.
pub fn wait_for_with<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(last) => {
                if Instant::now() >= deadline {
                    return Err(HarnessError(format!(
                        "timed out after {timeout:?} waiting for {what}; last: {last}"
                    )));
                }
            }
        }
        std::thread::sleep(interval);
    }
}

/// [`wait_for_with`] polling every 20 ms.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> Result<T, String>,
) -> Result<T, HarnessError> {
    wait_for_with(what, timeout, Duration::from_millis(20), f)
}

/// Waits until `path` exists (e.g. the agent's unix socket).
pub fn wait_for_path(path: &std::path::Path, timeout: Duration) -> Result<(), HarnessError> {
    wait_for(&format!("{} to exist", path.display()), timeout, || {
        if path.exists() {
            Ok(())
        } else {
            Err("missing".into())
        }
    })
}

/// A child process that is stopped when the guard is dropped (SIGTERM, then
/// SIGKILL after a grace period), so a panicking test does not leak agents.
/// Derefs to [`std::process::Child`].
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
    grace: Duration,
}

impl ChildGuard {
    /// Wraps `child`; `what` names it in messages.
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        ChildGuard {
            child: Some(child),
            what: what.into(),
            grace: Duration::from_secs(3),
        }
    }

    /// How long [`ChildGuard::stop`] and `Drop` wait after SIGTERM before SIGKILL.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// What the process was started as.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Sends `sig` to the process (if it is still running).
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        let child = self
            .child
            .as_ref()
            .expect("ChildGuard used after into_inner");
        // SAFETY: plain kill(2) on a pid we own and have not reaped yet.
        if unsafe { libc::kill(child.id() as libc::pid_t, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL; returns the exit status.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        let grace = self.grace;
        let child = self
            .child
            .as_mut()
            .expect("ChildGuard used after into_inner");
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        // SAFETY: kill(2) on our unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let child = self
            .child
            .as_mut()
            .expect("ChildGuard used after into_inner");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Disarms the guard and returns the child.
    pub fn into_inner(mut self) -> Child {
        self.child.take().expect("ChildGuard used after into_inner")
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child
            .as_ref()
            .expect("ChildGuard used after into_inner")
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("ChildGuard used after into_inner")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// A reasonably unique 64-bit value: process-random hasher seed, pid, time
/// and a process-wide counter. Used for netns names and ids.
pub(crate) fn unique_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    h.finish()
}
