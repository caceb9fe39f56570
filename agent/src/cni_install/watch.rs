//! Keeping weft's entry in place: inotify on the conf dir (and on the bin dir for the binary), a repair pass
//! after each relevant change, at most one pass per interval that doubles while another component keeps
//! undoing the repair.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

use super::binary::{self, Copied};
use super::conflist::Format;
use super::{files, Applied, Change, Installer};

/// The shortest time between two passes.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest a fight with another component can stretch it to.
pub const MAX_INTERVAL: Duration = Duration::from_secs(32);

/// Installs (binary first), inserts the entry and keeps it there until the future is dropped. Returns only when
/// the directories cannot be watched any more.
pub async fn run(installer: Installer) -> Result<(), String> {
    // Watching starts before the first pass, so a change made during it is not missed.
    let mut watcher = Watcher::new(installer.conf_dir(), installer.bin_dir())?;
    let mut keeper = Keeper::new(installer);
    keeper.pass(Instant::now());
    loop {
        watcher.changed().await?;
        tokio::time::sleep_until(keeper.limit.next_pass(Instant::now())).await;
        // What arrived while waiting is covered by the pass about to run.
        watcher.drain()?;
        keeper.pass(Instant::now());
    }
}

/// The conf dir's and bin dir's inotify watches.
struct Watcher {
    fd: AsyncFd<InotifyFd>,
    conf: (WatchDescriptor, PathBuf),
    bin: (WatchDescriptor, PathBuf),
    /// Cookies of renames of the installer's own temporary files: their arrival is not a change by others.
    own_renames: HashSet<u32>,
}

/// `AsyncFd` wants `AsRawFd`; nix's `Inotify` offers `AsFd`.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Watcher {
    fn new(conf_dir: &Path, bin_dir: &Path) -> Result<Watcher, String> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("cannot start watching the CNI directories (inotify): {e}"))?;
        let gone = AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_ONLYDIR;
        let changes = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE;
        let conf = inotify
            .add_watch(conf_dir, changes | gone)
            .map_err(|e| format!("cni_conf_dir: cannot watch {}: {e}", conf_dir.display()))?;
        let bin = inotify
            .add_watch(bin_dir, changes | gone)
            .map_err(|e| format!("cni_bin_dir: cannot watch {}: {e}", bin_dir.display()))?;
        // SAFETY: the descriptor is owned by the `Inotify` inside, which the `AsyncFd` owns: it stays open, and
        // `as_raw_fd` returns the same one, for the `AsyncFd`'s whole life.
        let fd = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
            .map_err(|e| format!("cannot poll inotify: {e}"))?;
        Ok(Watcher {
            fd,
            conf: (conf, conf_dir.to_path_buf()),
            bin: (bin, bin_dir.to_path_buf()),
            own_renames: HashSet::new(),
        })
    }

    /// Waits for a change that may need a pass.
    async fn changed(&mut self) -> Result<(), String> {
        loop {
            let mut ready = self.fd.readable().await.map_err(|e| format!("inotify: {e}"))?;
            let events = match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(read) => read.map_err(|e| format!("inotify: {e}"))?,
                Err(_would_block) => continue,
            };
            if self.relevant(&events)? {
                return Ok(());
            }
        }
    }

    /// Reads (and forgets) what is queued without waiting.
    fn drain(&mut self) -> Result<(), String> {
        loop {
            match self.fd.get_ref().0.read_events() {
                Ok(events) if !events.is_empty() => {
                    self.relevant(&events)?;
                }
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(e) => return Err(format!("inotify: {e}")),
            }
        }
    }

    fn relevant(&mut self, events: &[InotifyEvent]) -> Result<bool, String> {
        let mut relevant = false;
        for event in events {
            relevant |= self.classify(event)?;
        }
        Ok(relevant)
    }

    /// Whether `event` may have moved weft's entry or binary; an error when a watched directory is gone.
    fn classify(&mut self, event: &InotifyEvent) -> Result<bool, String> {
        let mask = event.mask;
        if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            return Ok(true);
        }
        let dir = if event.wd == self.conf.0 { &self.conf.1 } else { &self.bin.1 };
        if mask.intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED) {
            return Err(format!("{} was removed or moved away; the installer stops watching it", dir.display()));
        }
        let name = event.name.as_ref().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if files::is_temp(&name) {
            if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                self.own_renames.insert(event.cookie);
            }
            return Ok(false);
        }
        if mask.contains(AddWatchFlags::IN_MOVED_TO) && self.own_renames.remove(&event.cookie) {
            return Ok(false);
        }
        Ok(if event.wd == self.conf.0 { Format::of(&name).is_some() } else { name == binary::BINARY_NAME })
    }
}

/// One pass's bookkeeping: the file weft's entry was last put in, and the rate limit.
struct Keeper {
    installer: Installer,
    last_file: Option<PathBuf>,
    limit: RateLimit,
}

impl Keeper {
    fn new(installer: Installer) -> Keeper {
        Keeper { installer, last_file: None, limit: RateLimit::default() }
    }

    fn pass(&mut self, now: Instant) {
        self.limit.passed(now);
        match self.installer.ensure_binary() {
            Ok(Copied::Written) => tracing::warn!(
                dir = %self.installer.bin_dir().display(),
                "weft-cni was removed or replaced in the CNI bin dir; reinstalled"
            ),
            Ok(Copied::Unchanged) => {}
            Err(e) => tracing::error!("{e}"),
        }
        match self.installer.ensure_config() {
            Ok(Some(applied)) => self.report(applied, now),
            Ok(None) => tracing::info!(
                dir = %self.installer.conf_dir().display(),
                "no CNI network config yet; weft-cni is inserted when the primary CNI writes one"
            ),
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// Logs what the pass did; a repair of the file weft had already been in is a conflict.
    fn report(&mut self, applied: Applied, now: Instant) {
        let file = applied.file.display().to_string();
        let owner = applied.primary_type.as_str();
        let previous = self.last_file.replace(applied.file.clone());
        let same_file = previous.as_ref() == Some(&applied.file);
        match (&applied.change, previous) {
            (Change::Unchanged, _) => tracing::debug!(%file, "weft-cni's entry is in place"),
            (Change::Inserted, Some(_)) if same_file => {
                let interval = self.limit.conflict(now);
                tracing::warn!(
                    "{owner} rewrote {file} without weft-cni; re-inserted (next repair no sooner than {}s){}",
                    interval.as_secs(),
                    hint(owner)
                );
            }
            (Change::Updated, _) => {
                let interval = self.limit.conflict(now);
                tracing::warn!(
                    "weft-cni's entry in {file} was changed or duplicated by another component; restored (next repair no sooner than {}s)",
                    interval.as_secs()
                );
            }
            (_, Some(before)) if !same_file => tracing::warn!(
                "{file} ({owner}) now comes first in the CNI config dir, before {}; inserted weft-cni there",
                before.display()
            ),
            (Change::Converted { from }, _) => {
                tracing::info!("converted {} into {file} with weft-cni as its last plugin", from.display())
            }
            _ => tracing::info!("inserted weft-cni as the last plugin of {file} ({owner})"),
        }
    }
}

/// What an operator can do when the fight goes on.
fn hint(owner: &str) -> &'static str {
    match owner {
        "cilium-cni" => "; Cilium with cni.exclusive=true rewrites its file on every change in the directory: set cni.exclusive=false",
        _ => "",
    }
}

/// At most one pass per `interval`; each conflict that follows another within twice the interval doubles it
/// (up to [`MAX_INTERVAL`]), a conflict after a calm spell starts again from [`MIN_INTERVAL`].
#[derive(Debug, Clone)]
struct RateLimit {
    interval: Duration,
    last_pass: Option<Instant>,
    last_conflict: Option<Instant>,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit { interval: MIN_INTERVAL, last_pass: None, last_conflict: None }
    }
}

impl RateLimit {
    fn next_pass(&self, now: Instant) -> Instant {
        self.last_pass.map_or(now, |last| (last + self.interval).max(now))
    }

    fn passed(&mut self, now: Instant) {
        self.last_pass = Some(now);
    }

    /// Records a conflict; the interval now in force.
    fn conflict(&mut self, now: Instant) -> Duration {
        let close = self.last_conflict.is_some_and(|last| now.saturating_duration_since(last) <= self.interval * 2);
        self.interval = if close { (self.interval * 2).min(MAX_INTERVAL) } else { MIN_INTERVAL };
        self.last_conflict = Some(now);
        self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{golden, installer, weft_entries};
    use super::*;

    #[test]
    fn rate_limit_backs_off_while_conflicts_continue_and_resets_after_calm() {
        let t0 = Instant::now();
        let mut limit = RateLimit::default();
        assert_eq!(limit.next_pass(t0), t0);
        limit.passed(t0);
        assert_eq!(limit.next_pass(t0), t0 + MIN_INTERVAL);
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            now = limit.next_pass(now);
            limit.passed(now);
            seen.push(limit.conflict(now).as_secs());
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 16, 32, 32, 32]);
        let later = now + Duration::from_secs(600);
        assert_eq!(limit.next_pass(later), later);
        assert_eq!(limit.conflict(later), MIN_INTERVAL);
    }

    /// Polls `check` every 20 ms until it holds or `within` passes.
    async fn eventually(what: &str, within: Duration, check: impl Fn() -> bool) {
        let deadline = Instant::now() + within;
        while !check() {
            assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_rewrite_by_the_primary_cni_is_repaired() {
        let inst = installer("watch-rewrite");
        let path = inst.conf_dir().join("10-calico.conflist");
        std::fs::write(&path, golden("calico", "input.conflist")).unwrap();
        let task = tokio::spawn(run(inst.clone()));
        eventually("the first insert", Duration::from_secs(5), || weft_entries(&path) == 1).await;
        for round in 0..3 {
            // Calico's installer writes in place.
            std::fs::write(&path, golden("calico", "input.conflist")).unwrap();
            eventually(&format!("repair {round}"), Duration::from_secs(20), || weft_entries(&path) == 1).await;
        }
        // The binary, removed, comes back.
        std::fs::remove_file(inst.bin_dir().join("weft-cni")).unwrap();
        eventually("the binary", Duration::from_secs(40), || inst.bin_dir().join("weft-cni").is_file()).await;
        task.abort();
    }

    /// Cilium with `cni.exclusive=true` renames every other config to `*.cilium_bak` and rewrites its own file
    /// (without weft) on each change in the directory: weft follows it into 05-cilium.conflist.
    #[tokio::test]
    async fn cilium_exclusive_mode_takes_over_and_weft_follows() {
        let inst = installer("watch-cilium");
        let dir = inst.conf_dir().to_path_buf();
        let calico = dir.join("10-calico.conflist");
        std::fs::write(&calico, golden("calico", "input.conflist")).unwrap();
        let task = tokio::spawn(run(inst.clone()));
        eventually("the insert into calico", Duration::from_secs(5), || weft_entries(&calico) == 1).await;

        let cilium = dir.join("05-cilium.conflist");
        std::fs::write(&cilium, golden("cilium", "input.conflist")).unwrap();
        std::fs::rename(&calico, dir.join("10-calico.conflist.cilium_bak")).unwrap();
        eventually("weft in Cilium's file", Duration::from_secs(10), || weft_entries(&cilium) == 1).await;
        assert_eq!(std::fs::read_to_string(&cilium).unwrap(), golden("cilium", "expected.conflist"));

        std::fs::write(&cilium, golden("cilium", "input.conflist")).unwrap();
        eventually("weft back in Cilium's file", Duration::from_secs(20), || weft_entries(&cilium) == 1).await;
        task.abort();
    }
}
