//! `cargo xtask`: the project's commands. Each installs what it needs first, idempotently and quietly when
//! everything is already there.
//!
//! - `cargo xtask setup`: install the Debian packages the tests, demo and benchmarks use, and build the tests'
//!   Kubernetes control plane (etcd, kube-apiserver) from their Go modules and helm (deploy/'s
//!   manifest tests).
//! - `cargo xtask test`: setup, build, run every test (unit, libcni-driven capture suites for each backend).
//! - `cargo xtask demo`: setup, build, run a two-pod netns cluster and show captured traffic, then clean up.
//! - `cargo xtask bench cni`: setup, release build, measure CNI ADD latency with and without weft-cni.
//! - `cargo xtask bench http`: setup, release build, HTTP/1.1, HTTP/2 and gRPC throughput, latency, CPU and
//!   memory of weft's proxy against the real Envoy (same bootstrap, `--concurrency 1`) and against no proxy.
//! - `cargo xtask e2e-kind`: a kind cluster with istiod and weft's chart, the shared scenarios (tests/scenarios.yaml).
//! - `cargo xtask fuzz [--target T] [--time S | --runs N] [--sanitizer address|none]`: the cargo-fuzz targets of
//!   `fuzz/` under libFuzzer, with a table of executions (not part of `test`, which replays their corpora).
//! - `cargo xtask soak`: the fault suite at full scale (`test` runs it short), with its report.

mod bench;
mod bench_http;
mod bench_kube;
mod bench_mtls;
mod bench_neighbour;
mod cni_plugin;
mod demo;
mod e2e_kind;
mod ebpf;
mod fuzz;
mod gobuild;
mod goinstall;
mod setup;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["setup"] => setup::everything(),
        ["build-ebpf"] => setup::run().and_then(|()| ebpf::build()),
        ["test", rest @ ..] => test(rest),
        ["demo"] => demo::run(),
        ["bench", "cni", rest @ ..] => bench::cni(rest),
        ["bench", "capture", rest @ ..] => bench::capture(rest),
        ["bench", "xds", rest @ ..] => bench::xds(rest),
        ["bench", "pods", rest @ ..] => bench::pods(rest),
        ["bench", "http", rest @ ..] => bench_http::run(rest),
        ["bench", "neighbour", rest @ ..] => bench_neighbour::run(rest),
        ["bench", "mtls", rest @ ..] => bench_mtls::run(rest),
        ["bench", "kube", rest @ ..] => bench_kube::run(rest),
        ["e2e-kind"] => e2e_kind::run_e2e(),
        ["fuzz", rest @ ..] => fuzz::run(rest),
        ["soak"] => soak(),
        // The upstream `bench http` runs inside its network namespace (not in the usage).
        ["bench-upstream", rest @ ..] => bench_http::upstream(rest),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str =
    "usage: cargo xtask (setup | build-ebpf | test [-- CARGO TEST ARGS] | demo | e2e-kind | bench cni [--pods N[,M...]] | bench capture | bench xds [--clusters N] | bench pods | bench http [--duration S] [--connections N] | bench neighbour [--duration S] | bench kube [--objects N --pods M] | fuzz [--target T] [--time S | --runs N] [--sanitizer address|none] | soak)";

/// Runs a command, failing with its name when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The cargo target directory of the workspace.
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|| workspace_root().join("target"))
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(|p| p.to_path_buf()).unwrap_or_default()
}

fn test(extra: &[&str]) -> Result<(), String> {
    let toolchain = setup::run_all()?;
    setup::require_root("the capture suites create network namespaces and program iptables/nftables")?;
    let root = workspace_root();
    // Only a missing pinned toolchain skips the eBPF suites (loudly); a build failure fails the run.
    let ebpf_unavailable = match toolchain {
        Ok(toolchain) => {
            ebpf::build_with(&toolchain)?;
            None
        }
        Err(why) => {
            eprintln!("\n################################################################################");
            eprintln!("xtask: WARNING: the eBPF suites are SKIPPED on this machine: {why}");
            eprintln!("xtask: every other suite runs; install {} with rust-src to run them.", setup::EBPF_TOOLCHAIN);
            eprintln!("################################################################################\n");
            Some(why)
        }
    };
    // One debug build serves the binaries the suites drive and the test harnesses themselves; weft-cni is
    // driven as nodes run it, statically linked.
    run(cargo().current_dir(&root).args(["build", "--workspace", "--bins"]))?;
    cni_plugin::build(false)?;
    let mut cmd = cargo();
    cmd.current_dir(&root).args(["test", "--workspace"]);
    if let Some(why) = ebpf_unavailable {
        cmd.env("WEFT_EBPF_UNAVAILABLE", why);
    }
    let extra: Vec<&str> = extra.iter().copied().skip_while(|a| *a == "--").collect();
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    run(&mut cmd)
}

/// The fault suite (`tests/tests/faults.rs`) at the soak scale: minutes of control-plane outage and storm,
/// 10,000 pod cycles, as many held connections as the open file limit allows; prints its report.
fn soak() -> Result<(), String> {
    let _ = setup::run_all()?;
    setup::require_root("the fault suite creates network namespaces and programs iptables")?;
    let root = workspace_root();
    run(cargo().current_dir(&root).args(["build", "--workspace", "--bins"]))?;
    cni_plugin::build(false)?;
    // `--workspace` keeps the features `cargo xtask test` builds with, so its test build serves.
    run(cargo().current_dir(&root).env("WEFT_SOAK", "1").args(["test", "--workspace", "--test", "faults", "--", "--nocapture"]))?;
    let report = target_dir().join("fault-report-soak.md");
    println!("\nreport: {}", report.display());
    Ok(())
}
