//! The CNI installer: puts `weft-cni` into the host's CNI bin dir and its entry last in the network
//! configuration the container runtime loads first, keeps it there while other components rewrite the
//! directory, and takes both out again on `weft-agent uninstall-cni` (never on a plain stop).
//!
//! - [`conflist`]: the pure JSON transformation (golden-tested on real-world configs).
//! - [`binary`]: the plugin binary.
//! - [`watch`]: inotify on the conf and bin dirs, rate-limited repair.

pub mod binary;
pub mod conflist;
mod files;
mod json;
pub mod watch;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::agent::CniInstallSettings;
use conflist::{Chained, Format, NetConfig, WeftEntry};

/// `sun_path` holds 107 bytes and a NUL: weft-cni refuses longer socket paths, so would every pod.
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Where the installer works and what it writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Installer {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    binary: PathBuf,
    entry: WeftEntry,
}

/// The configuration file libcni loads first (the first by name among those it can parse).
struct Primary {
    path: PathBuf,
    config: NetConfig,
}

/// What one pass over the conf dir did to the primary configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// weft's entry was there, exactly.
    Unchanged,
    /// The file had no weft entry; it now ends with one.
    Inserted,
    /// The file had a weft entry that differed (or two); it now holds exactly ours.
    Updated,
    /// A single-plugin `.conf`/`.json` became this `.conflist`, ending with weft's entry; the old file is gone.
    Converted { from: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The file that now holds weft's entry.
    pub file: PathBuf,
    /// The first plugin's type: whose file it is.
    pub primary_type: String,
    pub change: Change,
}

/// What `uninstall-cni` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    pub entries_from: Vec<PathBuf>,
    pub binary: Option<PathBuf>,
}

impl fmt::Display for Removed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entries_from.is_empty() {
            write!(f, "no weft-cni entry found")?;
        } else {
            let files: Vec<_> = self.entries_from.iter().map(|p| p.display().to_string()).collect();
            write!(f, "removed weft-cni's entry from {}", files.join(", "))?;
        }
        match &self.binary {
            Some(path) => write!(f, "; removed {}", path.display()),
            None => write!(f, "; no weft-cni binary to remove"),
        }
    }
}

impl Installer {
    /// `agent_socket` is the agent's CNI socket as the plugin (on the host) reaches it.
    pub fn new(settings: &CniInstallSettings, agent_socket: &Path) -> Result<Installer, String> {
        let shown = agent_socket.display();
        if !agent_socket.is_absolute() || agent_socket.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
            return Err(format!(
                "cni_socket: {shown} must be an absolute path of at most {MAX_SOCKET_PATH_BYTES} bytes for weft-cni to reach the agent"
            ));
        }
        Ok(Installer {
            conf_dir: settings.conf_dir.clone(),
            bin_dir: settings.bin_dir.clone(),
            binary: settings.binary.clone().unwrap_or_else(binary::default_source),
            entry: WeftEntry {
                agent_socket: agent_socket.to_path_buf(),
                exclude_namespaces: settings.exclude_namespaces.clone(),
                log_file: settings.log_file.clone(),
            },
        })
    }

    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Creates the two directories if the node has none yet, removes temporary files a killed installer left
    /// and installs the binary (before any config names it, so a runtime never finds an entry without its
    /// plugin).
    pub fn prepare(&self) -> Result<binary::Copied, String> {
        for (what, dir) in [("cni_conf_dir", &self.conf_dir), ("cni_bin_dir", &self.bin_dir)] {
            std::fs::create_dir_all(dir).map_err(|e| format!("{what}: cannot create {}: {e}", dir.display()))?;
            for stale in files::remove_stale_temps(dir).map_err(|e| format!("{what}: {}: {e}", dir.display()))? {
                tracing::info!(file = %stale.display(), "removed a temporary file an interrupted install left");
            }
        }
        self.ensure_binary()
    }

    pub fn ensure_binary(&self) -> Result<binary::Copied, String> {
        binary::install(&self.binary, &self.bin_dir)
    }

    /// Makes the primary configuration end with weft's entry; `None` while the directory has no configuration
    /// libcni would load (the primary CNI has not written one yet).
    pub fn ensure_config(&self) -> Result<Option<Applied>, String> {
        let Some(primary) = self.primary()? else { return Ok(None) };
        let shown = primary.path.display();
        let chained = primary.config.with_entry(&self.entry).map_err(|e| format!("cannot chain weft-cni into {shown}: {e}"))?;
        let primary_type = primary.config.primary_type().to_owned();
        let Chained::Changed(list) = chained else {
            return Ok(Some(Applied { file: primary.path, primary_type, change: Change::Unchanged }));
        };
        let mode = files::mode_of(&primary.path).unwrap_or(0o644);
        match primary.config.format() {
            Format::List => {
                files::write_atomic(&primary.path, &list.to_pretty(), mode).map_err(|e| format!("cannot write {shown}: {e}"))?;
                let change = if primary.config.weft_entries() == 0 { Change::Inserted } else { Change::Updated };
                Ok(Some(Applied { file: primary.path, primary_type, change }))
            }
            Format::Single => {
                let target = primary.path.with_extension("conflist");
                self.check_conversion_target(&primary.path, &target)?;
                files::write_atomic(&target, &list.to_pretty(), mode).map_err(|e| format!("cannot write {}: {e}", target.display()))?;
                // Only now: until the list is in place, the runtime keeps the old file.
                files::remove(&primary.path).map_err(|e| format!("wrote {} but cannot remove {shown}: {e}", target.display()))?;
                Ok(Some(Applied { file: target, primary_type, change: Change::Converted { from: primary.path } }))
            }
        }
    }

    /// Takes weft's entry out of every configuration in the conf dir and removes the binary. A `.conf` the
    /// installer turned into a `.conflist` stays a list (its own plugin alone), which libcni loads the same way.
    pub fn uninstall(&self) -> Result<Removed, String> {
        let mut removed = Removed::default();
        for (path, format) in self.config_files()? {
            let Ok(bytes) = std::fs::read(&path) else { continue };
            let Ok(config) = NetConfig::parse(format, &bytes) else { continue };
            if let Some(without) = config.without_entry() {
                let mode = files::mode_of(&path).unwrap_or(0o644);
                files::write_atomic(&path, &without.to_pretty(), mode).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                removed.entries_from.push(path);
            }
        }
        if binary::uninstall(&self.bin_dir)? {
            removed.binary = Some(self.bin_dir.join(binary::BINARY_NAME));
        }
        Ok(removed)
    }

    /// The files libcni considers, in its order: `.conf`, `.conflist` and `.json` files sorted by name.
    fn config_files(&self) -> Result<Vec<(PathBuf, Format)>, String> {
        let dir = &self.conf_dir;
        let entries = std::fs::read_dir(dir).map_err(|e| format!("cni_conf_dir: cannot list {}: {e}", dir.display()))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("cni_conf_dir: cannot list {}: {e}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(format) = Format::of(&name) else { continue };
            // libcni skips directories; a symlink to a file counts.
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
                found.push((entry.path(), format));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    /// The first configuration that parses; files that do not are skipped with a warning, as CRI-O and
    /// istio-cni skip them (containerd would refuse the whole directory, which no installer can fix).
    fn primary(&self) -> Result<Option<Primary>, String> {
        for (path, format) in self.config_files()? {
            let parsed = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| NetConfig::parse(format, &b));
            match parsed {
                Ok(config) => return Ok(Some(Primary { path, config })),
                Err(e) => tracing::warn!(file = %path.display(), "skipping a CNI config the runtime cannot load: {e}"),
            }
        }
        Ok(None)
    }

    /// A `.conf` becomes the `.conflist` of the same name; a file of that name that is not weft's own earlier
    /// conversion is someone else's and is not overwritten.
    fn check_conversion_target(&self, from: &Path, target: &Path) -> Result<(), String> {
        let Ok(bytes) = std::fs::read(target) else { return Ok(()) };
        match NetConfig::parse(Format::List, &bytes) {
            Ok(existing) if existing.weft_entries() > 0 => Ok(()),
            _ => Err(format!(
                "cannot turn {} into a plugin list: {} exists and is not weft's; remove or rename one of them",
                from.display(),
                target.display()
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the target dir's tmp (removed first if a previous run left it).
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir()
            .join(format!("weft-cni-install-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub(crate) fn golden(name: &str, file: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/cni_install/testdata").join(name).join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// An installer on fresh `net.d` and `bin` dirs, with a fake plugin binary to copy.
    pub(crate) fn installer(tag: &str) -> Installer {
        let root = temp_dir(tag);
        let source = root.join("weft-cni-build");
        std::fs::write(&source, b"\x7fELF weft-cni").unwrap();
        let settings = CniInstallSettings {
            enabled: true,
            conf_dir: root.join("net.d"),
            bin_dir: root.join("bin"),
            binary: Some(source),
            exclude_namespaces: vec!["kube-system".into()],
            log_file: Some("/var/log/weft-cni.log".into()),
        };
        let installer = Installer::new(&settings, Path::new("/var/run/weft/cni.sock")).unwrap();
        installer.prepare().unwrap();
        installer
    }

    pub(crate) fn weft_entries(path: &Path) -> usize {
        let bytes = std::fs::read(path).unwrap();
        NetConfig::parse(Format::List, &bytes).unwrap().weft_entries()
    }

    #[test]
    fn inserts_into_the_first_loadable_file_only() {
        let inst = installer("first");
        let dir = inst.conf_dir().to_path_buf();
        std::fs::write(dir.join("00-broken.conflist"), "{ half").unwrap();
        std::fs::create_dir(dir.join("05-dir.conf")).unwrap();
        std::fs::write(dir.join("10-calico.conflist"), golden("calico", "input.conflist")).unwrap();
        std::fs::write(dir.join("20-flannel.conflist"), golden("flannel", "input.conflist")).unwrap();
        std::fs::write(dir.join("calico-kubeconfig"), "apiVersion: v1").unwrap();
        let applied = inst.ensure_config().unwrap().unwrap();
        assert_eq!(applied, Applied { file: dir.join("10-calico.conflist"), primary_type: "calico".into(), change: Change::Inserted });
        assert_eq!(std::fs::read_to_string(dir.join("10-calico.conflist")).unwrap(), golden("calico", "expected.conflist"));
        assert_eq!(weft_entries(&dir.join("20-flannel.conflist")), 0);
        assert_eq!(inst.ensure_config().unwrap().unwrap().change, Change::Unchanged);
        assert_eq!(std::fs::read(inst.bin_dir().join("weft-cni")).unwrap(), b"\x7fELF weft-cni");
    }

    #[test]
    fn a_conf_becomes_a_conflist_and_uninstall_leaves_the_list() {
        let inst = installer("conf");
        let dir = inst.conf_dir().to_path_buf();
        std::fs::write(dir.join("10-crio-bridge.conf"), golden("bridge", "input.conf")).unwrap();
        let applied = inst.ensure_config().unwrap().unwrap();
        assert_eq!(applied.file, dir.join("10-crio-bridge.conflist"));
        assert_eq!(applied.change, Change::Converted { from: dir.join("10-crio-bridge.conf") });
        assert!(!dir.join("10-crio-bridge.conf").exists());
        assert_eq!(std::fs::read_to_string(&applied.file).unwrap(), golden("bridge", "expected.conflist"));

        // The bridge's installer writes its .conf again: converted again over weft's own list.
        std::fs::write(dir.join("10-crio-bridge.conf"), golden("bridge", "input.conf")).unwrap();
        assert!(matches!(inst.ensure_config().unwrap().unwrap().change, Change::Converted { .. }));

        let removed = inst.uninstall().unwrap();
        assert_eq!(removed.entries_from, vec![dir.join("10-crio-bridge.conflist")]);
        assert_eq!(weft_entries(&dir.join("10-crio-bridge.conflist")), 0);
        assert!(!inst.bin_dir().join("weft-cni").exists());
        assert!(removed.to_string().contains("10-crio-bridge.conflist"), "{removed}");
    }

    #[test]
    fn someone_elses_conflist_of_the_same_name_is_not_overwritten() {
        let inst = installer("clash");
        let dir = inst.conf_dir().to_path_buf();
        std::fs::write(dir.join("10-x.conf"), golden("bridge", "input.conf")).unwrap();
        std::fs::write(dir.join("10-x.conflist"), golden("flannel", "input.conflist")).unwrap();
        let e = inst.ensure_config().unwrap_err();
        assert!(e.contains("10-x.conflist exists and is not weft's"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.join("10-x.conflist")).unwrap(), golden("flannel", "input.conflist"));
    }

    #[test]
    fn uninstall_restores_the_original_content() {
        let inst = installer("restore");
        let path = inst.conf_dir().join("10-aws.conflist");
        std::fs::write(&path, golden("aws-vpc-cni", "input.conflist")).unwrap();
        inst.ensure_config().unwrap();
        assert_eq!(weft_entries(&path), 1);
        inst.uninstall().unwrap();
        let back = json::Json::parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, json::Json::parse(golden("aws-vpc-cni", "input.conflist").as_bytes()).unwrap());
    }

    #[test]
    fn empty_dir_and_bad_socket() {
        let inst = installer("empty");
        assert_eq!(inst.ensure_config().unwrap(), None);
        let settings = CniInstallSettings::default();
        let long = PathBuf::from(format!("/{}", "s".repeat(120)));
        for socket in [Path::new("run/cni.sock"), long.as_path()] {
            let e = Installer::new(&settings, socket).unwrap_err();
            assert!(e.contains("cni_socket"), "{e}");
        }
    }
}
