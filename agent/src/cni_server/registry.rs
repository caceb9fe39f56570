//! The pod registry: which attachments the agent captures, persisted atomically under the state dir so a
//! restarted agent can re-adopt them.

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

const FILE_NAME: &str = "pods.json";
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

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    pods: Vec<PodRecord>,
}

/// [`OnDisk`] as written, borrowing the records.
#[derive(Serialize)]
struct Writing<'a> {
    version: u32,
    pods: &'a [PodRecord],
}

/// The registry file under the state dir.
#[derive(Debug, Clone)]
pub struct RegistryFile {
    path: PathBuf,
}

impl RegistryFile {
    /// Uses `state_dir/pods.json`, creating the directory (mode 0700) if needed.
    pub fn new(state_dir: &Path) -> io::Result<RegistryFile> {
        fs::create_dir_all(state_dir)?;
        fs::set_permissions(state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(RegistryFile { path: state_dir.join(FILE_NAME) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the records; a missing file is an empty registry. A damaged file is an error that names it: starting
    /// empty would silently forget captured pods.
    pub fn load(&self) -> Result<Vec<PodRecord>, String> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("cannot read pod registry {}: {e}", self.path.display())),
        };
        let disk: OnDisk = serde_json::from_str(&text).map_err(|e| {
            format!(
                "pod registry {} is damaged ({e}); move it aside to start without the pods it lists (their rules stay and fail closed until the pods are re-created)",
                self.path.display()
            )
        })?;
        if disk.version != FORMAT_VERSION {
            return Err(format!(
                "pod registry {} has format version {} but this agent reads version {FORMAT_VERSION}",
                self.path.display(),
                disk.version
            ));
        }
        Ok(disk.pods)
    }

    /// Writes the records atomically: an agent crash leaves either the old or the new file, never a mix.
    ///
    /// No fsync: the registry must survive agent restarts, not node reboots (a reboot takes every pod netns with
    /// it, and the default state dir is on tmpfs). rename(2) is atomic for every later reader, and skipping the
    /// flushes keeps milliseconds off each pod's start. Compact JSON for the same reason: the whole registry is
    /// written on every change (`jq . pods.json` reads it).
    pub fn store(&self, pods: &[PodRecord]) -> io::Result<()> {
        let text = serde_json::to_vec(&Writing { version: FORMAT_VERSION, pods })?;
        let tmp = self.path.with_extension(format!("json.tmp-{}", std::process::id()));
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&text)?;
        drop(f);
        fs::rename(&tmp, &self.path)
    }
}

/// The registry file written by group commit: each change offers the whole set of records under the caller's
/// lock (a clone, cheap), and waits outside it until a write that includes its offer is on disk. Writes happen
/// one at a time, each of the newest offer, so a burst of CNI operations shares writes instead of queueing one
/// serialisation of every record per operation behind the caller's lock.
pub struct Registry {
    file: RegistryFile,
    /// The newest offer not yet written, by generation.
    pending: std::sync::Mutex<(u64, Option<Vec<PodRecord>>)>,
    /// The generation on disk; held while writing.
    written: tokio::sync::Mutex<u64>,
}

impl Registry {
    pub fn new(file: RegistryFile) -> Registry {
        Registry { file, pending: std::sync::Mutex::new((0, None)), written: tokio::sync::Mutex::new(0) }
    }

    pub fn file(&self) -> &RegistryFile {
        &self.file
    }

    /// Offers `records` as the registry's new content (call under the lock that orders the changes); returns
    /// the generation to [`Registry::flush`].
    pub fn offer(&self, records: Vec<PodRecord>) -> u64 {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.0 += 1;
        pending.1 = Some(records);
        pending.0
    }

    /// Returns once an offer of `generation` or newer is on disk.
    pub async fn flush(&self, generation: u64) -> io::Result<()> {
        let mut written = self.written.lock().await;
        if *written >= generation {
            return Ok(());
        }
        let (newest, records) = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            (pending.0, pending.1.take())
        };
        let Some(records) = records else {
            return Err(io::Error::other("the registry offer was lost after a failed write"));
        };
        if let Err(e) = self.file.store(&records) {
            // Put it back for the next waiter, unless a newer offer replaced it meanwhile.
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.0 == newest {
                pending.1 = Some(records);
            }
            return Err(e);
        }
        *written = newest;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let file = RegistryFile::new(&dir).unwrap();
        assert!(file.load().unwrap().is_empty());
        file.store(&[record("a"), record("b")]).unwrap();
        assert_eq!(file.load().unwrap(), vec![record("a"), record("b")]);
        let mode = fs::metadata(file.path()).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plans_persist_and_records_without_one_load_with_the_default() {
        let dir = temp_dir("plan");
        let file = RegistryFile::new(&dir).unwrap();
        let mut with_plan = record("p");
        with_plan.capture = PodCapture::nothing().with_probe_ports(vec![8080]);
        file.store(&[with_plan.clone()]).unwrap();
        assert_eq!(file.load().unwrap(), vec![with_plan]);
        // A registry from before plans existed.
        let mut old = serde_json::to_value(OnDisk { version: FORMAT_VERSION, pods: vec![record("o")] }).unwrap();
        old["pods"][0].as_object_mut().unwrap().remove("capture");
        fs::write(file.path(), old.to_string()).unwrap();
        assert_eq!(file.load().unwrap(), vec![record("o")]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn damaged_file_is_an_error_naming_it() {
        let dir = temp_dir("bad");
        let file = RegistryFile::new(&dir).unwrap();
        fs::write(file.path(), "{not json").unwrap();
        let err = file.load().unwrap_err();
        assert!(err.contains("pods.json") && err.contains("damaged"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_burst_of_offers_is_written_once_with_the_newest() {
        let dir = std::env::temp_dir().join(format!("weft-registry-burst-{}", std::process::id()));
        let registry = Registry::new(RegistryFile::new(&dir).unwrap());
        let first = registry.offer(vec![record("a")]);
        let second = registry.offer(vec![record("a"), record("b")]);
        registry.flush(second).await.unwrap();
        // The first offer's waiter finds a newer content already on disk.
        registry.flush(first).await.unwrap();
        let on_disk: Vec<String> = registry.file().load().unwrap().into_iter().map(|r| r.container_id).collect();
        assert_eq!(on_disk, ["a", "b"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
