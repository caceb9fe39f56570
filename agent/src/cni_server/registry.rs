//! The pod registry: which attachments the agent captures, persisted under the state dir so a restarted agent
//! can re-adopt them. One file per attachment (`<state_dir>/pods/<container id>@<ifname>.json`), each written
//! atomically: an ADD or DEL writes or removes one small file however many pods the node runs.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_cni::protocol::Attachment;

use crate::capture::netns::{NetnsId, NetnsPath};
use crate::capture::{PodCapture, RedirectMode};
use crate::config::agent::PodLimits;
use crate::k8s::PodMeta;

const DIR_NAME: &str = "pods";
/// Where agents before per-pod files kept every record; read once, migrated, removed.
const LEGACY_FILE: &str = "pods.json";
const FORMAT_VERSION: u32 = 1;

/// Everything needed to capture a pod again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: String,
    pub infra_container_id: String,
    pub ifname: String,
    pub netns: NetnsPath,
    /// The namespace the path named at ADD time: a re-used path is a different pod.
    pub netns_id: NetnsId,
    pub ips: Vec<IpAddr>,
    pub redirect: RedirectMode,
    pub added_at_unix: u64,
    /// What the Kubernetes API says of the pod (service account, labels, workload), when the agent watches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<PodMeta>,
    /// The pod's own limits (its annotations over the agent's `pod_limits`), when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<PodLimits>,
    /// The pod's own worker threads (its weight, by annotation), when it has a number of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// The pod's capture plan, re-installed as it is on restart; registries written before plans existed
    /// load with the default plan, which is what those pods were captured with.
    #[serde(default)]
    pub capture: PodCapture,
}

impl PodRecord {
    pub fn attachment(&self) -> Attachment {
        Attachment { container_id: self.container_id.clone(), ifname: self.ifname.clone() }
    }
}

/// One record as stored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    pod: PodRecord,
}

/// [`OnDisk`] as written, borrowing the record.
#[derive(Serialize)]
struct Writing<'a> {
    version: u32,
    pod: &'a PodRecord,
}

/// The single file of earlier agents.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Legacy {
    version: u32,
    pods: Vec<PodRecord>,
}

/// The registry directory under the state dir.
#[derive(Debug, Clone)]
pub struct RegistryDir {
    state_dir: PathBuf,
    dir: PathBuf,
}

impl RegistryDir {
    /// Uses `state_dir/pods/`, creating both (mode 0700) if needed.
    pub fn new(state_dir: &Path) -> io::Result<RegistryDir> {
        let dir = state_dir.join(DIR_NAME);
        for d in [state_dir, dir.as_path()] {
            fs::create_dir_all(d)?;
            fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        }
        Ok(RegistryDir { state_dir: state_dir.to_path_buf(), dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads every record, migrating an earlier agent's single file first. A damaged file is an error that names
    /// it: starting without it would silently forget a captured pod.
    pub fn load(&self) -> Result<Vec<PodRecord>, String> {
        self.migrate()?;
        let entries = fs::read_dir(&self.dir).map_err(|e| format!("cannot read pod registry {}: {e}", self.dir.display()))?;
        let mut records = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| format!("cannot read pod registry {}: {e}", self.dir.display()))?.path();
            // Temporary files of a write the agent did not finish are not records.
            if path.extension().is_some_and(|x| x == "json") {
                records.push(read_record(&path)?);
            }
        }
        records.sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
        Ok(records)
    }

    /// Moves the records of `pods.json` (agents before per-pod files) into their own files, then removes it.
    fn migrate(&self) -> Result<(), String> {
        let legacy = self.state_dir.join(LEGACY_FILE);
        let text = match fs::read_to_string(&legacy) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("cannot read pod registry {}: {e}", legacy.display())),
        };
        let disk: Legacy = serde_json::from_str(&text).map_err(|e| damaged(&legacy, e))?;
        check_version(&legacy, disk.version)?;
        for record in &disk.pods {
            // A file already there is newer: a migration cut short after writing it.
            if !self.file(&record.attachment()).exists() {
                self.store(record).map_err(|e| format!("cannot migrate pod registry {}: {e}", legacy.display()))?;
            }
        }
        fs::remove_file(&legacy).map_err(|e| format!("cannot remove the migrated pod registry {}: {e}", legacy.display()))
    }

    /// Writes one record atomically: an agent crash leaves either the old or the new file, never a mix.
    ///
    /// No fsync: the registry must survive agent restarts, not node reboots (a reboot takes every pod netns with
    /// it, and the default state dir is on tmpfs). rename(2) is atomic for every later reader, and skipping the
    /// flushes keeps milliseconds off each pod's start.
    pub fn store(&self, record: &PodRecord) -> io::Result<()> {
        let text = serde_json::to_vec(&Writing { version: FORMAT_VERSION, pod: record })?;
        let path = self.file(&record.attachment());
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&text)?;
        drop(f);
        fs::rename(&tmp, &path)
    }

    /// Removes one record; one that is not there is removed already.
    pub fn remove(&self, attachment: &Attachment) -> io::Result<()> {
        gone_already_ok(fs::remove_file(self.file(attachment)))
    }

    /// Removes every record, and an earlier agent's single file.
    pub fn delete(&self) -> io::Result<()> {
        gone_already_ok(fs::remove_dir_all(&self.dir))?;
        gone_already_ok(fs::remove_file(self.state_dir.join(LEGACY_FILE)))
    }

    /// The attachment's file: `<container id>@<ifname>.json`, any byte a file name cannot safely hold escaped.
    fn file(&self, attachment: &Attachment) -> PathBuf {
        self.dir.join(format!("{}@{}.json", escape(&attachment.container_id), escape(&attachment.ifname)))
    }
}

fn gone_already_ok(removed: io::Result<()>) -> io::Result<()> {
    match removed {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn read_record(path: &Path) -> Result<PodRecord, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read pod registry {}: {e}", path.display()))?;
    let disk: OnDisk = serde_json::from_str(&text).map_err(|e| damaged(path, e))?;
    check_version(path, disk.version)?;
    Ok(disk.pod)
}

fn damaged(path: &Path, e: serde_json::Error) -> String {
    format!(
        "pod registry {} is damaged ({e}); move it aside to start without the pods it lists (their rules stay and fail closed until the pods are re-created)",
        path.display()
    )
}

fn check_version(path: &Path, version: u32) -> Result<(), String> {
    if version == FORMAT_VERSION {
        return Ok(());
    }
    Err(format!("pod registry {} has format version {version} but this agent reads version {FORMAT_VERSION}", path.display()))
}

/// Letters, digits, `_`, `.` and `-` as they are (all a valid container id and interface name hold); anything
/// else as `%XX`, so no attachment names a path outside the directory or another attachment's file.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Writes `changes` in order; on a failure, returns the error with the changes not written.
fn write_changes(dir: &RegistryDir, changes: Changes) -> Result<(), (io::Error, Changes)> {
    let mut changes = changes.into_iter();
    while let Some((attachment, change)) = changes.next() {
        let done = match &change {
            Some(record) => dir.store(record),
            None => dir.remove(&attachment),
        };
        if let Err(e) = done {
            return Err((e, std::iter::once((attachment, change)).chain(changes).collect()));
        }
    }
    Ok(())
}

/// Records to store, or `None` to remove, by attachment.
type Changes = BTreeMap<Attachment, Option<PodRecord>>;

/// The registry written by group commit: each change is offered under the caller's lock, and its caller waits
/// outside it until a write that includes it is on disk. Writes happen one batch at a time, each of every change
/// offered so far, so a burst of CNI operations shares writes instead of queueing behind the caller's lock.
pub struct Registry {
    dir: RegistryDir,
    pending: std::sync::Mutex<Pending>,
    /// The generation on disk; held while writing.
    written: tokio::sync::Mutex<u64>,
}

#[derive(Default)]
struct Pending {
    generation: u64,
    /// The records as offered so far: what the directory holds once every change is written.
    offered: HashMap<Attachment, PodRecord>,
    /// Changes not yet written.
    changes: Changes,
}

impl Pending {
    fn change(&mut self, attachment: Attachment, record: Option<PodRecord>) {
        match &record {
            Some(r) => self.offered.insert(attachment.clone(), r.clone()),
            None => self.offered.remove(&attachment),
        };
        self.changes.insert(attachment, record);
    }
}

impl Registry {
    pub fn new(dir: RegistryDir) -> Registry {
        Registry { dir, pending: std::sync::Mutex::new(Pending::default()), written: tokio::sync::Mutex::new(0) }
    }

    pub fn dir(&self) -> &RegistryDir {
        &self.dir
    }

    /// [`RegistryDir::load`], taking what it read as the records offered so far.
    pub fn load(&self) -> Result<Vec<PodRecord>, String> {
        let records = self.dir.load()?;
        let mut pending = self.pending();
        pending.offered = records.iter().map(|r| (r.attachment(), r.clone())).collect();
        Ok(records)
    }

    /// Offers one record, new or changed (call under the lock that orders the changes); returns the generation
    /// to [`Registry::flush`].
    pub fn put(&self, record: &PodRecord) -> u64 {
        let mut pending = self.pending();
        pending.change(record.attachment(), Some(record.clone()));
        pending.generation += 1;
        pending.generation
    }

    /// Offers the removal of one record.
    pub fn remove(&self, attachment: &Attachment) -> u64 {
        let mut pending = self.pending();
        pending.change(attachment.clone(), None);
        pending.generation += 1;
        pending.generation
    }

    /// Offers `records` as the whole registry: the records that differ from the offered ones are stored, the
    /// offered ones not among them removed.
    pub fn offer<'a>(&self, records: impl IntoIterator<Item = &'a PodRecord>) -> u64 {
        let mut pending = self.pending();
        let mut gone: std::collections::HashSet<Attachment> = pending.offered.keys().cloned().collect();
        for record in records {
            let attachment = record.attachment();
            gone.remove(&attachment);
            if pending.offered.get(&attachment) != Some(record) {
                pending.change(attachment, Some(record.clone()));
            }
        }
        for attachment in gone {
            pending.change(attachment, None);
        }
        pending.generation += 1;
        pending.generation
    }

    /// Returns once the changes offered up to `generation`, or later ones, are on disk. The files are written on
    /// a blocking-pool thread while the caller's task goes on (an ADD captures its pod).
    pub async fn flush(&self, generation: u64) -> io::Result<()> {
        let mut written = self.written.lock().await;
        if *written >= generation {
            return Ok(());
        }
        let (newest, changes) = {
            let mut pending = self.pending();
            (pending.generation, std::mem::take(&mut pending.changes))
        };
        let dir = self.dir.clone();
        let outcome = tokio::task::spawn_blocking(move || write_changes(&dir, changes))
            .await
            .unwrap_or_else(|e| Err((io::Error::other(format!("registry writer failed: {e}")), BTreeMap::new())));
        if let Err((e, unwritten)) = outcome {
            // Back for the next waiter, unless newer changes of the same attachments replaced them meanwhile.
            let mut pending = self.pending();
            for (a, c) in unwritten {
                pending.changes.entry(a).or_insert(c);
            }
            return Err(e);
        }
        *written = newest;
        Ok(())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: &str) -> PodRecord {
        PodRecord {
            namespace: "default".into(),
            name: format!("pod-{id}"),
            uid: "u".into(),
            container_id: id.into(),
            infra_container_id: id.into(),
            ifname: "eth0".into(),
            netns: NetnsPath::try_from("/var/run/netns/x".to_string()).unwrap(),
            netns_id: NetnsId { dev: 4, ino: 4026532000 },
            ips: vec!["10.0.0.2".parse().unwrap()],
            redirect: RedirectMode::Iptables,
            added_at_unix: 1,
            meta: None,
            limits: None,
            workers: None,
            capture: PodCapture::default(),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-registry-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn round_trips_and_starts_empty() {
        let dir = temp_dir("rt");
        let file = RegistryDir::new(&dir).unwrap();
        assert!(file.load().unwrap().is_empty());
        file.store(&record("b")).unwrap();
        file.store(&record("a")).unwrap();
        assert_eq!(file.load().unwrap(), vec![record("a"), record("b")]);
        let mode = fs::metadata(file.path().join("a@eth0.json")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        file.remove(&record("a").attachment()).unwrap();
        file.remove(&record("a").attachment()).unwrap();
        assert_eq!(file.load().unwrap(), vec![record("b")]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plans_persist_and_a_single_file_registry_is_migrated() {
        let dir = temp_dir("plan");
        let file = RegistryDir::new(&dir).unwrap();
        let mut with_plan = record("p");
        with_plan.capture = PodCapture::nothing().with_probe_ports(vec![8080]);
        file.store(&with_plan).unwrap();
        assert_eq!(file.load().unwrap(), vec![with_plan.clone()]);
        // An earlier agent's single file, from before plans existed: its records load with the default plan.
        let old = json!({"version": FORMAT_VERSION, "pods": [record("o"), with_plan]});
        let mut old_without_plan = old.clone();
        old_without_plan["pods"][0].as_object_mut().unwrap().remove("capture");
        fs::write(dir.join(LEGACY_FILE), old_without_plan.to_string()).unwrap();
        let mut p = record("p");
        p.capture = PodCapture::nothing().with_probe_ports(vec![8080]);
        assert_eq!(file.load().unwrap(), vec![record("o"), p]);
        assert!(!dir.join(LEGACY_FILE).exists(), "migrated, then removed");
        assert!(file.path().join("o@eth0.json").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn damaged_file_is_an_error_naming_it() {
        let dir = temp_dir("bad");
        let file = RegistryDir::new(&dir).unwrap();
        fs::write(file.path().join("x@eth0.json"), "{not json").unwrap();
        fs::write(file.path().join("y@eth0.tmp-1"), "{a write cut short").unwrap();
        let err = file.load().unwrap_err();
        assert!(err.contains("x@eth0.json") && err.contains("damaged"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_attachment_never_names_a_file_outside_the_directory() {
        let dir = temp_dir("esc");
        let file = RegistryDir::new(&dir).unwrap();
        let mut r = record("../../etc/x");
        r.ifname = "a/b@c".into();
        file.store(&r).unwrap();
        let names: Vec<_> = fs::read_dir(file.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["..%2F..%2Fetc%2Fx@a%2Fb%40c.json"]);
        assert_eq!(file.load().unwrap(), vec![r]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_burst_of_changes_is_written_once_and_whole_offers_write_only_differences() {
        let dir = temp_dir("burst");
        let registry = Registry::new(RegistryDir::new(&dir).unwrap());
        assert!(registry.load().unwrap().is_empty());
        let first = registry.put(&record("a"));
        let second = registry.put(&record("b"));
        registry.flush(second).await.unwrap();
        // The first change's waiter finds it on disk already.
        registry.flush(first).await.unwrap();
        let on_disk = |r: &Registry| -> Vec<String> { r.dir().load().unwrap().into_iter().map(|r| r.container_id).collect() };
        assert_eq!(on_disk(&registry), ["a", "b"]);
        // A whole offer: c is new, b is gone, a is unchanged and not rewritten.
        use std::os::unix::fs::MetadataExt;
        let a_file = registry.dir().path().join("a@eth0.json");
        let before = fs::metadata(&a_file).unwrap().ino();
        let whole = registry.offer([&record("a"), &record("c")]);
        registry.flush(whole).await.unwrap();
        assert_eq!(on_disk(&registry), ["a", "c"]);
        assert_eq!(fs::metadata(&a_file).unwrap().ino(), before, "a rewrite would rename a new file over it");
        let gone = registry.remove(&record("c").attachment());
        registry.flush(gone).await.unwrap();
        assert_eq!(on_disk(&registry), ["a"]);
        // A restarted agent's registry knows what is on disk: a whole offer without a removes its file.
        let restarted = Registry::new(RegistryDir::new(&dir).unwrap());
        assert_eq!(restarted.load().unwrap().len(), 1);
        let empty = restarted.offer([]);
        restarted.flush(empty).await.unwrap();
        assert!(on_disk(&restarted).is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
