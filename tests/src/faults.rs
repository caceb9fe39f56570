//! The fault suite's parts: traffic between captured pods that records every request while faults are
//! injected, the phases the faults occupy, and the report (fault, requests sent, failed, when, recovered in).
//! `tests/tests/faults.rs` runs the faults; `cargo xtask soak` runs them at [`Scale::soak`].

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::NetNs;

/// How hard each fault pushes: [`Scale::short`] for every `cargo xtask test`, [`Scale::soak`] for `cargo xtask
/// soak` (the numbers).
#[derive(Debug, Clone)]
pub struct Scale {
    pub name: &'static str,
    /// How long the agent stays dead after `SIGKILL`.
    pub agent_down: Duration,
    pub control_plane_down: Duration,
    pub storm: Duration,
    pub storm_updates_per_second: u32,
    pub concurrent_pods: usize,
    pub pod_cycles: usize,
    pub connections: usize,
}

impl Scale {
    pub fn short() -> Scale {
        Scale {
            name: "short",
            agent_down: Duration::from_secs(2),
            control_plane_down: Duration::from_secs(5),
            storm: Duration::from_secs(5),
            storm_updates_per_second: 1000,
            concurrent_pods: 100,
            pod_cycles: 100,
            connections: 1000,
        }
    }

    pub fn soak() -> Scale {
        Scale {
            name: "soak",
            agent_down: Duration::from_secs(5),
            control_plane_down: Duration::from_secs(180),
            storm: Duration::from_secs(60),
            storm_updates_per_second: 1000,
            concurrent_pods: 100,
            pod_cycles: 10_000,
            connections: 10_000,
        }
    }

    /// `WEFT_SOAK=1` (set by `cargo xtask soak`) selects the soak.
    pub fn from_env() -> Scale {
        if std::env::var_os("WEFT_SOAK").is_some_and(|v| v == "1") { Scale::soak() } else { Scale::short() }
    }
}

/// One request of the traffic: when it started and ended (since the traffic began) and why it failed.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub start: Duration,
    pub end: Duration,
    pub error: Option<String>,
}

/// Closed-loop request/response traffic from one pod to an echo address, each request on a new connection (so
/// every request goes through capture, the proxy's listeners and its current configuration), paced to stay
/// under the pod's connection rate limit. Every attempt is recorded.
pub struct Traffic {
    began: Instant,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

/// A request that gets no answer within this fails (and is counted as failed).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const PAUSE: Duration = Duration::from_millis(5);

impl Traffic {
    pub fn start(from: &NetNs, to: SocketAddr, workers: usize) -> io::Result<Traffic> {
        let began = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..workers)
            .map(|worker| {
                let (stop, attempts, netns) = (Arc::clone(&stop), Arc::clone(&attempts), from.path().to_path_buf());
                std::thread::spawn(move || {
                    if let Err(e) = crate::netns::enter_thread(&netns) {
                        eprintln!("traffic worker {worker} cannot enter {}: {e}", netns.display());
                        return;
                    }
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let start = began.elapsed();
                        let error = request(to, worker, n).err().map(|e| e.to_string());
                        let attempt = Attempt { start, end: began.elapsed(), error };
                        attempts.lock().unwrap_or_else(|e| e.into_inner()).push(attempt);
                        n += 1;
                        std::thread::sleep(PAUSE);
                    }
                })
            })
            .collect();
        Ok(Traffic { began, stop, attempts, workers })
    }

    /// Time since the traffic began (the report's clock).
    pub fn now(&self) -> Duration {
        self.began.elapsed()
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for a request that started at `since` or later to succeed; returns when it ended.
    pub fn first_success_since(&self, since: Duration, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempts = self.attempts();
            if let Some(a) = attempts.iter().find(|a| a.start >= since && a.error.is_none()) {
                return Ok(a.end);
            }
            if Instant::now() > deadline {
                let last = attempts.last().and_then(|a| a.error.clone()).unwrap_or_default();
                return Err(format!("no request succeeded within {timeout:?} (last error: {last})"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.attempts()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One request: connect, send a 16-byte message naming it, read it back whole.
fn request(to: SocketAddr, worker: usize, n: u64) -> io::Result<()> {
    let mut conn = TcpStream::connect_timeout(&to, REQUEST_TIMEOUT)?;
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let message = format!("{worker:02}-{n:013}");
    conn.write_all(message.as_bytes())?;
    let mut answer = [0u8; 16];
    conn.read_exact(&mut answer)?;
    if answer != message.as_bytes() {
        return Err(io::Error::other(format!("answered {:?} to {message:?}", String::from_utf8_lossy(&answer))));
    }
    Ok(())
}

/// An echo server in a pod (one event loop) that also counts connections whose peer is not the proxy's
/// inbound address: with capture in place every connection arrives from 127.0.0.6, so any other peer is
/// traffic that bypassed the proxy.
pub fn start_echo_counting_bypass(pod: &NetNs, port: u16) -> io::Result<Arc<AtomicU64>> {
    let bypassed = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&bypassed);
    let proxy: IpAddr = [127, 0, 0, 6].into();
    crate::share::serve_on_one_thread(pod, port, move |mut conn| {
        if conn.peer_addr().map_or(true, |p| p.ip() != proxy) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        async move {
            let (mut r, mut w) = conn.split();
            tokio::io::copy(&mut r, &mut w).await.map(|_| ())
        }
    })?;
    Ok(bypassed)
}

/// `n` connections from `pod` to `to`, opened at most `per_second` a second (under the pod's connection rate
/// limit), each carrying one message both ways before the next opens, so every one is established end to end.
pub fn hold_connections(pod: &NetNs, to: SocketAddr, n: usize, per_second: u32) -> io::Result<Vec<TcpStream>> {
    let gap = Duration::from_secs(1) / per_second.max(1);
    pod.try_run_in(move || {
        let began = Instant::now();
        (0..n)
            .map(|i| {
                if let Some(wait) = (gap * i as u32).checked_sub(began.elapsed()) {
                    std::thread::sleep(wait);
                }
                let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                let message = format!("held-{i:010}");
                conn.write_all(message.as_bytes())?;
                let mut answer = vec![0u8; message.len()];
                conn.read_exact(&mut answer).map_err(|e| io::Error::new(e.kind(), format!("connection {i}: {e}")))?;
                Ok(conn)
            })
            .collect()
    })?
}

/// A process's resident memory (KiB) and open descriptors, from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: usize,
}

impl Usage {
    pub fn of(pid: u32) -> io::Result<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| io::Error::other("no VmRSS"))?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        Ok(Usage { rss_kib, fds })
    }

    pub fn describe_change(before: Usage, after: Usage) -> String {
        format!(
            "agent RSS {:.1} → {:.1} MiB, descriptors {} → {}",
            before.rss_kib as f64 / 1024.0,
            after.rss_kib as f64 / 1024.0,
            before.fds,
            after.fds
        )
    }
}

/// This process's open file limit (the agent it starts inherits it). Each connection the suite holds through
/// both pods' proxy sides costs the agent four descriptors (downstream and upstream on each side), so the limit
/// bounds how many the suite can hold: raising a hard limit needs `CAP_SYS_RESOURCE`, which a container may
/// lack (the development machine caps every process at 20,000).
pub fn open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_max)
}

/// What one fault occupied on the traffic's clock, and which failures it explains.
#[derive(Debug, Clone)]
pub struct Phase {
    pub fault: String,
    pub start: Duration,
    pub end: Duration,
    /// Failures of requests overlapping this window are the fault's (an outage the fault causes by design,
    /// e.g. the gap while the agent is dead); outside it, none is allowed.
    pub outage: Option<(Duration, Duration)>,
    /// From the fault's end until everything it disturbed was back (traffic, streams, pods).
    pub recovered_in: Option<Duration>,
    pub notes: String,
}

/// One row of the report, with the failures no fault explains.
pub struct Row {
    pub sent: usize,
    pub failed: usize,
    pub unexplained: Vec<Attempt>,
}

impl Phase {
    pub fn row(&self, attempts: &[Attempt]) -> Row {
        let mine: Vec<&Attempt> = attempts.iter().filter(|a| a.start >= self.start && a.start < self.end).collect();
        let failed: Vec<&Attempt> = mine.iter().copied().filter(|a| a.error.is_some()).collect();
        let unexplained = failed
            .iter()
            .filter(|a| !self.outage.is_some_and(|(from, to)| a.end >= from && a.start <= to))
            .map(|a| (*a).clone())
            .collect();
        Row { sent: mine.len(), failed: failed.len(), unexplained }
    }

    /// When this phase's failures happened, relative to its start ("-" without failures).
    fn failed_during(&self, attempts: &[Attempt]) -> String {
        let failed: Vec<&Attempt> =
            attempts.iter().filter(|a| a.start >= self.start && a.start < self.end && a.error.is_some()).collect();
        match (failed.iter().map(|a| a.start).min(), failed.iter().map(|a| a.end).max()) {
            (Some(from), Some(to)) => {
                format!("{:.2}-{:.2} s", (from - self.start).as_secs_f64(), to.saturating_sub(self.start).as_secs_f64())
            }
            _ => "-".into(),
        }
    }
}

/// The report as a Markdown table, and every failure no fault explains.
pub fn report(scale: &Scale, phases: &[Phase], attempts: &[Attempt]) -> (String, Vec<(String, Attempt)>) {
    let mut table = format!(
        "Fault suite ({} scale): {} requests in all, each on a new connection through both pods' capture and the proxy.\n\n\
         | fault | requests sent | failed | failed during (s into the fault) | recovered in | notes |\n|---|---|---|---|---|---|\n",
        scale.name,
        attempts.len()
    );
    let mut unexplained = Vec::new();
    for phase in phases {
        let row = phase.row(attempts);
        let recovered = phase.recovered_in.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            phase.fault,
            row.sent,
            row.failed,
            phase.failed_during(attempts),
            recovered,
            phase.notes
        ));
        unexplained.extend(row.unexplained.into_iter().map(|a| (phase.fault.clone(), a)));
    }
    (table, unexplained)
}

/// Where the report of the last run is written (and `cargo xtask soak` prints it from).
pub fn report_path(scale: &Scale) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(|p| p.join("target")).unwrap_or_else(|| "target".into())
    });
    target.join(format!("fault-report-{}.md", scale.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(start_ms: u64, end_ms: u64, ok: bool) -> Attempt {
        Attempt {
            start: Duration::from_millis(start_ms),
            end: Duration::from_millis(end_ms),
            error: (!ok).then(|| "refused".to_string()),
        }
    }

    #[test]
    fn failures_outside_the_outage_are_unexplained() {
        let phase = Phase {
            fault: "f".into(),
            start: Duration::from_secs(1),
            end: Duration::from_secs(5),
            outage: Some((Duration::from_secs(2), Duration::from_secs(3))),
            recovered_in: None,
            notes: String::new(),
        };
        // Before the phase, in flight into the outage, after it, and after the phase.
        let attempts =
            [attempt(500, 600, false), attempt(1900, 2100, false), attempt(2500, 2600, true), attempt(3500, 3600, false), attempt(6000, 6100, false)];
        let row = phase.row(&attempts);
        assert_eq!((row.sent, row.failed), (3, 2));
        assert_eq!(row.unexplained.len(), 1);
        assert_eq!(row.unexplained[0].start, Duration::from_millis(3500));
        assert_eq!(phase.failed_during(&attempts), "0.90-2.60 s");
    }
}
