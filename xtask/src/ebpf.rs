//! `cargo xtask build-ebpf`: builds `ebpf/weft-ebpf` for `bpfel-unknown-none` with the nightly toolchain and
//! puts the object beside the agent binaries (`target/{debug,release}/weft-ebpf`), where `weft-agent` looks
//! for it by default.

use std::process::Command;

use crate::{run, target_dir, workspace_root};

pub fn build() -> Result<(), String> {
    build_with(&crate::setup::ebpf_toolchain()?)
}

/// Builds with `toolchain` (the pinned nightly, by the name `setup` found it under).
pub fn build_with(toolchain: &str) -> Result<(), String> {
    let crate_dir = workspace_root().join("ebpf/weft-ebpf");
    let out = target_dir().join("ebpf");
    // The crate's .cargo/config.toml selects the target and build-std.
    run(Command::new("rustup")
        .args(["run", toolchain, "cargo", "build", "--quiet", "--release"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", &out)
        .env_remove("RUSTC")
        .env_remove("CARGO"))?;
    let object = out.join("bpfel-unknown-none/release/weft-ebpf");
    for profile in ["debug", "release"] {
        let dir = target_dir().join(profile);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::copy(&object, dir.join("weft-ebpf")).map_err(|e| format!("copying {}: {e}", object.display()))?;
    }
    Ok(())
}
