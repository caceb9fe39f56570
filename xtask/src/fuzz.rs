//! `cargo xtask fuzz [--target T] [--time S | --runs N] [--sanitizer address|none]`: runs the cargo-fuzz targets
//! of `fuzz/` (weft's parsers of outside input, `agent/src/fuzz_targets.rs`) under libFuzzer with the pinned
//! nightly, each for S seconds (default 60) or N executions, starting from the committed corpus; prints a table
//! of executions per target. New inputs
//! libFuzzer finds go to `target/fuzz-corpus/<target>` (not committed); a crash is copied into the committed
//! corpus (`fuzz/corpus/<target>/crash-...`), where the replay test makes it a regression test, and the run
//! fails naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TARGETS: [&str; 8] = ["cni_stdin", "agent_socket", "bootstrap", "xds_resource", "tls_client_hello", "http_inspector", "metadata_exchange", "rbac_and_routes"];

/// How long each target runs.
#[derive(Clone, Copy)]
enum Budget {
    Seconds(u64),
    Executions(u64),
}

/// What the command line asked for.
struct Options {
    targets: Vec<&'static str>,
    budget: Budget,
    /// cargo-fuzz's `--sanitizer`: `address` (the default) also catches memory errors in the unsafe code of
    /// dependencies; `none` runs several times faster.
    sanitizer: &'static str,
}

/// One target's run.
struct Run {
    target: &'static str,
    seconds: u64,
    executions: u64,
    corpus: usize,
    crashes: Vec<PathBuf>,
}

pub fn run(args: &[&str]) -> Result<(), String> {
    let Options { targets, budget, sanitizer } = options(args)?;
    let toolchain = crate::setup::pinned_toolchain().map_err(|e| format!("fuzzing needs the pinned nightly: {e}"))?;
    ensure_cargo_fuzz()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace root")?.to_path_buf();
    eprintln!("xtask: building the fuzz targets with {toolchain}");
    crate::run(&mut fuzz_command(&root, &toolchain, "build", sanitizer))?;
    let mut runs = Vec::new();
    for target in targets {
        match budget {
            Budget::Seconds(s) => eprintln!("xtask: fuzzing {target} for {s} s (sanitizer {sanitizer})"),
            Budget::Executions(n) => eprintln!("xtask: fuzzing {target} for {n} executions (sanitizer {sanitizer})"),
        }
        runs.push(fuzz(&root, &toolchain, target, budget, sanitizer)?);
    }
    println!("{:<20} {:>8} {:>14} {:>10} {:>8} {:>8}", "target", "seconds", "executions", "exec/s", "corpus", "crashes");
    for r in &runs {
        println!("{:<20} {:>8} {:>14} {:>10} {:>8} {:>8}", r.target, r.seconds, r.executions, r.executions / r.seconds.max(1), r.corpus, r.crashes.len());
    }
    let crashes: Vec<String> = runs.iter().flat_map(|r| r.crashes.iter().map(|c| c.display().to_string())).collect();
    match crashes.is_empty() {
        true => Ok(()),
        false => Err(format!("crashes found, now in the committed corpora (fix them; the replay test fails until then): {}", crashes.join(", "))),
    }
}

fn options(args: &[&str]) -> Result<Options, String> {
    const USAGE: &str = "usage: cargo xtask fuzz [--target T] [--time S | --runs N] [--sanitizer address|none]";
    let mut options = Options { targets: TARGETS.to_vec(), budget: Budget::Seconds(60), sanitizer: "address" };
    let mut rest = args.iter();
    let positive = |value: Option<&&str>, what: &str| value.and_then(|s| s.parse().ok()).filter(|n: &u64| *n > 0).ok_or(format!("{what}; {USAGE}"));
    while let Some(arg) = rest.next() {
        match *arg {
            "--target" => {
                let name = rest.next().ok_or("--target needs a name")?;
                let known = TARGETS.iter().find(|t| *t == name).ok_or_else(|| format!("no target {name}; the targets: {}", TARGETS.join(", ")))?;
                options.targets = vec![known];
            }
            "--time" => options.budget = Budget::Seconds(positive(rest.next(), "--time needs a number of seconds")?),
            "--runs" => options.budget = Budget::Executions(positive(rest.next(), "--runs needs a number of executions")?),
            "--sanitizer" => {
                options.sanitizer = match rest.next().copied() {
                    Some("address") => "address",
                    Some("none") => "none",
                    _ => return Err(format!("--sanitizer takes address or none; {USAGE}")),
                }
            }
            other => return Err(format!("unknown option {other}; {USAGE}")),
        }
    }
    Ok(options)
}

fn ensure_cargo_fuzz() -> Result<(), String> {
    let present = crate::cargo().args(["fuzz", "--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !present {
        eprintln!("xtask: installing cargo-fuzz");
        crate::run(crate::cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}

fn fuzz(root: &Path, toolchain: &str, target: &'static str, budget: Budget, sanitizer: &str) -> Result<Run, String> {
    let committed = root.join("fuzz/corpus").join(target);
    let found = root.join("target/fuzz-corpus").join(target);
    let artifacts = root.join("target/fuzz-artifacts").join(target);
    for dir in [&found, &artifacts] {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let before = crash_files(&artifacts);
    let limit = match budget {
        Budget::Seconds(s) => format!("-max_total_time={s}"),
        Budget::Executions(n) => format!("-runs={n}"),
    };
    let started = std::time::Instant::now();
    let output = fuzz_command(root, toolchain, "run", sanitizer)
        .arg(target)
        .arg(&found)
        .arg(&committed)
        .arg("--")
        .arg(limit)
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cargo fuzz run {target}: {e}"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let stat = |name: &str| log.lines().find_map(|l| l.strip_prefix(&format!("stat::{name}:"))?.trim().parse::<u64>().ok());
    let mut crashes = Vec::new();
    for crash in crash_files(&artifacts).into_iter().filter(|c| !before.contains(c)) {
        let name = crash.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let kept = committed.join(&name);
        std::fs::copy(&crash, &kept).map_err(|e| format!("{}: {e}", kept.display()))?;
        crashes.push(kept);
    }
    let Some(executions) = stat("number_of_executed_units") else {
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        return Err(format!("cargo fuzz run {target} did not finish ({}):\n{}", output.status, tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
    };
    let corpus = std::fs::read_dir(&found).map(|d| d.count()).unwrap_or(0) + std::fs::read_dir(&committed).map(|d| d.count()).unwrap_or(0);
    Ok(Run { target, seconds: started.elapsed().as_secs(), executions, corpus, crashes })
}

/// `cargo fuzz <action>` on `fuzz/` with the nightly, its build kept in `target/fuzz` (one directory per
/// sanitizer, so switching does not rebuild the other).
fn fuzz_command(root: &Path, toolchain: &str, action: &str, sanitizer: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo", "fuzz", action, "--sanitizer", sanitizer, "--fuzz-dir"]).arg(root.join("fuzz"));
    let dir = match sanitizer {
        "address" => root.join("target/fuzz"),
        other => root.join(format!("target/fuzz-{other}")),
    };
    cmd.current_dir(root).env("CARGO_TARGET_DIR", dir);
    cmd
}

fn crash_files(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_else(|_| Vec::new());
    entries.into_iter().filter(|p: &PathBuf| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("crash-"))).collect()
}
