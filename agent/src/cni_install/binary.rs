//! The `weft-cni` binary in the host's CNI bin dir.

use std::path::{Path, PathBuf};

use super::files;

pub const BINARY_NAME: &str = "weft-cni";

/// What [`install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// The bin dir already held the same bytes.
    Unchanged,
    Written,
}

/// Copies `source` to `<bin_dir>/weft-cni` (mode 0755) unless the same bytes are there. The copy replaces the
/// old binary atomically: a runtime exec'ing the plugin meanwhile gets the old or the new one, whole.
pub fn install(source: &Path, bin_dir: &Path) -> Result<Copied, String> {
    let target = bin_dir.join(BINARY_NAME);
    let bytes = std::fs::read(source).map_err(|e| format!("cannot read the plugin binary {}: {e}", source.display()))?;
    if same_bytes(&target, &bytes) {
        return Ok(Copied::Unchanged);
    }
    files::write_atomic(&target, &bytes, 0o755)
        .map_err(|e| format!("cannot install {} into the CNI bin dir {}: {e}", BINARY_NAME, bin_dir.display()))?;
    Ok(Copied::Written)
}

/// Removes `<bin_dir>/weft-cni`; true when it was there.
pub fn uninstall(bin_dir: &Path) -> Result<bool, String> {
    let target = bin_dir.join(BINARY_NAME);
    let existed = target.exists();
    files::remove(&target).map_err(|e| format!("cannot remove {}: {e}", target.display()))?;
    Ok(existed)
}

/// `weft-cni` beside the running binary (the release archive and the container image put them together), else
/// `/usr/lib/weft/weft-cni`.
pub fn default_source() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(BINARY_NAME)));
    match beside {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("/usr/lib/weft").join(BINARY_NAME),
    }
}

fn same_bytes(target: &Path, bytes: &[u8]) -> bool {
    let same_len = std::fs::metadata(target).is_ok_and(|m| m.len() == bytes.len() as u64);
    same_len && std::fs::read(target).is_ok_and(|on_disk| on_disk == bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn copies_once_with_exec_mode_and_removes() {
        let dir = super::super::tests::temp_dir("binary");
        let source = dir.join("src-weft-cni");
        std::fs::write(&source, b"\x7fELF v1").unwrap();
        let bin = dir.join("bin");
        std::fs::create_dir(&bin).unwrap();
        assert_eq!(install(&source, &bin).unwrap(), Copied::Written);
        let target = bin.join(BINARY_NAME);
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(install(&source, &bin).unwrap(), Copied::Unchanged);
        std::fs::write(&source, b"\x7fELF v2").unwrap();
        assert_eq!(install(&source, &bin).unwrap(), Copied::Written);
        assert_eq!(std::fs::read(&target).unwrap(), b"\x7fELF v2");
        assert!(uninstall(&bin).unwrap());
        assert!(!uninstall(&bin).unwrap());
        let e = install(&dir.join("missing"), &bin).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }
}
