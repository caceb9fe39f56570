//! weft-cni as nodes run it: linked statically against musl. The installer copies the binary out of the
//! agent's image onto the host, whose libc may be older than the image's (a glibc-linked plugin then fails
//! to start, and every pod's sandbox with it); and the runtime starts it for every pod's ADD and DEL, where a
//! static binary starts in less than half the time a dynamically linked one takes.

use std::path::PathBuf;
use std::process::Command;

use weft_tests::tools::{CNI_BIN, CNI_PLUGIN_TARGET};

use crate::{cargo, run, target_dir, workspace_root};

/// Builds weft-cni for `CNI_PLUGIN_TARGET` (release or debug) and points the suites at it through
/// `$WEFT_CNI_BIN`.
pub fn build(release: bool) -> Result<PathBuf, String> {
    ensure_target()?;
    let mut cmd = cargo();
    cmd.current_dir(workspace_root()).args(["build", "--quiet", "-p", "weft-cni", "--bin", "weft-cni", "--target", CNI_PLUGIN_TARGET]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let path = target_dir().join(CNI_PLUGIN_TARGET).join(if release { "release" } else { "debug" }).join("weft-cni");
    std::env::set_var(CNI_BIN, &path);
    Ok(path)
}

/// The musl target of the toolchain cargo runs with, added when missing.
fn ensure_target() -> Result<(), String> {
    let listed = Command::new("rustup").args(["target", "list", "--installed"]).output().map_err(|e| format!("rustup: {e}"))?;
    if String::from_utf8_lossy(&listed.stdout).lines().any(|l| l.trim() == CNI_PLUGIN_TARGET) {
        return Ok(());
    }
    eprintln!("xtask: adding the {CNI_PLUGIN_TARGET} target (weft-cni is linked statically)");
    let added = Command::new("rustup").args(["target", "add", CNI_PLUGIN_TARGET]).output().map_err(|e| format!("rustup: {e}"))?;
    if added.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&added.stderr).lines().last().unwrap_or_default().to_string();
    Err(format!("rustup target add {CNI_PLUGIN_TARGET} failed: {why}"))
}
