//! Atomic file replacement: a reader (the container runtime, another installer) sees the old file or the new
//! one, never a part, and a crash at any moment leaves one of the two.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Marks the installer's temporary files. Their names never end in `.conf`, `.conflist` or `.json`, so libcni
/// and other installers watching the directory never read a half-written one.
const TEMP_MARK: &str = ".weft-tmp-";

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path` and syncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}{TEMP_MARK}{}", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&temp)?;
        // The mode given to open() is cut by the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    File::open(dir)?.sync_all()
}

/// Removes a file and syncs its directory; a file already gone is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => File::open(parent(path))?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `name` is one of the installer's temporary files.
pub fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARK)
}

/// Temporary files a killed installer left behind in `dir`.
pub fn remove_stale_temps(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if is_temp(&entry.file_name().to_string_lossy()) {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// The file's permission bits, to keep them when the file is replaced.
pub fn mode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o7777)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_with_mode_and_leaves_no_temp() {
        let dir = super::super::tests::temp_dir("files");
        let path = dir.join("10-x.conflist");
        std::fs::write(&path, "old").unwrap();
        write_atomic(&path, b"new", 0o640).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(mode_of(&path), Some(0o640));
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("10-x.conflist")]);
        std::fs::write(dir.join(".10-x.conflist.weft-tmp-1"), "half").unwrap();
        assert_eq!(remove_stale_temps(&dir).unwrap().len(), 1);
        assert!(!is_temp("10-x.conflist") && is_temp(".weft-cni.weft-tmp-7"));
    }
}
