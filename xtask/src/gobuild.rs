//! Real Go programs of the ecosystem, built from their modules with the ordinary `go` command and cached.
//!
//! Each program is a small Go module of ours under `tests/kube/` whose `go.mod`/`go.sum` pin the release; the
//! binary is cached under `~/.cache/weft/go-bin/<name>-<hash of the module files>` (a pin change rebuilds, a
//! second run builds nothing) and linked to `target/weft-test/bin/<name>`, where the tests look for it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A Go program the tests run.
pub struct GoProgram {
    /// The binary's name under `target/weft-test/bin`.
    pub name: &'static str,
    /// The module directory, relative to the workspace root.
    pub module: &'static str,
    /// The package to build, as `go build` takes it.
    pub package: &'static str,
    /// What it is for, shown while it builds.
    pub why: &'static str,
    /// Extra `-X` settings (the version a program reports comes from its release's build flags).
    pub ldflags: &'static str,
}

/// The real Kubernetes control plane of the Kubernetes suites.
pub const KUBE: &[GoProgram] = &[
    GoProgram {
        name: "etcd",
        module: "tests/kube/etcd",
        package: "go.etcd.io/etcd/server/v3",
        why: "etcd, the API server's store (about 2 minutes the first time)",
        ldflags: "",
    },
    GoProgram {
        name: "kube-apiserver",
        module: "tests/kube/apiserver",
        package: ".",
        why: "kube-apiserver from k8s.io/kubernetes (about 7 minutes the first time)",
        // As Kubernetes' release build stamps it; clients read it from /version.
        ldflags: "-X k8s.io/component-base/version.gitVersion=v1.36.3 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36 -X k8s.io/component-base/version.gitTreeState=clean",
    },
];

/// Builds each program unless its cached binary is there, and links it where the tests look.
pub fn ensure(programs: &[GoProgram]) -> Result<(), String> {
    let root = crate::workspace_root();
    let bin_dir = crate::target_dir().join("weft-test/bin");
    std::fs::create_dir_all(&bin_dir).map_err(|e| format!("creating {}: {e}", bin_dir.display()))?;
    for program in programs {
        let module = root.join(program.module);
        let key = module_hash(&module)? ^ fnv(program.ldflags.as_bytes(), 0);
        let cached = cache_dir()?.join(format!("{}-{key:016x}", program.name));
        if !cached.exists() {
            build(program, &module, &cached)?;
        }
        link(&cached, &bin_dir.join(program.name))?;
    }
    Ok(())
}

fn build(program: &GoProgram, module: &Path, out: &Path) -> Result<(), String> {
    let go = crate::goinstall::go_binary()?;
    check_go(&go)?;
    eprintln!("xtask: building {}", program.why);
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    crate::run(
        Command::new(&go)
            .current_dir(module)
            .args(["build", "-trimpath", "-ldflags", &format!("-s -w {}", program.ldflags), "-o"])
            .arg(&tmp)
            .arg(program.package),
    )?;
    std::fs::rename(&tmp, out).map_err(|e| format!("moving {} into place: {e}", out.display()))
}

/// The modules need Go 1.26 (kube-apiserver 1.36's `go` line); Debian's older Go cannot build them.
fn check_go(go: &Path) -> Result<(), String> {
    let out = Command::new(go)
        .arg("version")
        .output()
        .map_err(|e| format!("`go` is needed to build the Kubernetes control plane for the tests and cannot run: {e}; install Go 1.26 or newer"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let minor = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("go1."))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if m >= 26 => Ok(()),
        _ => Err(format!("`go version` says {:?}: Go 1.26 or newer is needed to build kube-apiserver 1.36", text.trim())),
    }
}

/// The cache `go install`ed tools share (see `goinstall`).
fn cache_dir() -> Result<PathBuf, String> {
    let dir = weft_tests::gotools::cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// FNV-1a over the module's files (names and contents, sorted): stable across toolchains, unlike `DefaultHasher`.
fn module_hash(module: &Path) -> Result<u64, String> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(module)
        .map_err(|e| format!("reading {}: {e}", module.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    let mut hash = FNV_OFFSET;
    for path in entries {
        let name = path.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_default();
        let content = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        hash = fnv(&content, fnv(&name, hash));
    }
    Ok(hash)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(bytes: &[u8], mut hash: u64) -> u64 {
    if hash == 0 {
        hash = FNV_OFFSET;
    }
    for byte in bytes {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Points `link` at `target`, replacing what was there in one rename.
fn link(target: &Path, link: &Path) -> Result<(), String> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = link.with_extension("tmp-link");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| format!("linking {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, link).map_err(|e| format!("linking {}: {e}", link.display()))
}
