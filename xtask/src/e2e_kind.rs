//! `cargo xtask e2e-kind`: weft on a real cluster. Creates a kind cluster (deploy/kind.yaml), builds the image
//! (deploy/Containerfile) and loads it into the nodes, installs istiod (Istio's charts, with weft's agent
//! trusted to ask for the pods' certificates) and weft's chart, deploys the workloads of tests/scenarios.yaml
//! (tests/e2e/workloads.yaml) and runs its scenarios from inside the client pods.
//!
//! Needs a container engine (docker, or podman as kind's provider), kubectl, and the network to pull kind's node
//! image, Istio's charts and images, and the workloads' images. Without an engine or kubectl it stops at once,
//! saying what is missing. kind itself is built from its Go module when it is not installed.
//! `WEFT_E2E_KEEP=1` keeps the cluster afterwards (it is reused by the next run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use weft_tests::gotools::{HELM, KIND};
use weft_tests::scenarios::{Expect, Scenario, Scenarios};

use crate::{goinstall, run, workspace_root};

const CLUSTER: &str = "weft-e2e";
const IMAGE: &str = "weft:e2e";
/// Istio's release whose charts and images the run installs (the one the project's istiod tests build).
const ISTIO_VERSION: &str = "1.29.0";
const ISTIO_CHARTS: &str = "https://istio-release.storage.googleapis.com/charts";
const CAPTURED_NS: &str = "weft-e2e";
const OUTSIDE_NS: &str = "weft-e2e-outside";
/// How long a scenario may take to reach its expected outcome (configuration still propagating).
const SCENARIO_DEADLINE: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, PartialEq)]
enum Engine {
    Docker,
    Podman,
}

impl Engine {
    fn binary(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

pub fn run_e2e() -> Result<(), String> {
    let engine = container_engine()?;
    which("kubectl").ok_or("cargo xtask e2e-kind needs kubectl on PATH (it deploys the workloads and runs the scenarios)")?;
    let scenarios = Scenarios::load(&weft_tests::scenarios::default_path())?;
    let kind = which("kind").map_or_else(|| goinstall::ensure(&KIND), Ok)?;
    let helm = goinstall::ensure(&HELM)?;
    let dir = crate::target_dir().join("e2e-kind");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let cluster = Cluster { kind, helm, engine, kubeconfig: dir.join("kubeconfig") };
    cluster.create()?;
    let result = cluster.install_and_check(&scenarios, &dir);
    if std::env::var_os("WEFT_E2E_KEEP").is_some() {
        eprintln!("xtask: keeping cluster {CLUSTER} (KUBECONFIG={})", cluster.kubeconfig.display());
    } else if let Err(e) = cluster.delete() {
        eprintln!("xtask: could not delete cluster {CLUSTER}: {e}");
    }
    result
}

/// docker or podman, answering: a client without its daemon is no engine.
fn container_engine() -> Result<Engine, String> {
    let mut found = Vec::new();
    for engine in [Engine::Docker, Engine::Podman] {
        if which(engine.binary()).is_none() {
            continue;
        }
        let info = Command::new(engine.binary()).arg("info").output();
        match info {
            Ok(out) if out.status.success() => return Ok(engine),
            Ok(out) => found.push(format!(
                "{} is installed but `{} info` fails: {}",
                engine.binary(),
                engine.binary(),
                String::from_utf8_lossy(&out.stderr).lines().rfind(|l| !l.trim().is_empty()).unwrap_or("no output").trim()
            )),
            Err(e) => found.push(format!("{} cannot be run: {e}", engine.binary())),
        }
    }
    let why = if found.is_empty() { "neither docker nor podman is on PATH".to_string() } else { found.join("; ") };
    Err(format!("cargo xtask e2e-kind needs a container engine to run kind's nodes and build the image: {why}"))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// What a command printed on stdout, or why it failed (with its stderr).
fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

struct Cluster {
    kind: PathBuf,
    helm: PathBuf,
    engine: Engine,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn kind(&self) -> Command {
        let mut cmd = Command::new(&self.kind);
        if self.engine == Engine::Podman {
            cmd.env("KIND_EXPERIMENTAL_PROVIDER", "podman");
        }
        cmd
    }

    fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    fn helm(&self) -> Command {
        let mut cmd = Command::new(&self.helm);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// The cluster, created unless a kept one is there.
    fn create(&self) -> Result<(), String> {
        let existing = output(self.kind().args(["get", "clusters"]))?;
        if existing.lines().any(|l| l.trim() == CLUSTER) {
            eprintln!("xtask: reusing kind cluster {CLUSTER}");
            return run(self.kind().args(["export", "kubeconfig", "--name", CLUSTER]).arg("--kubeconfig").arg(&self.kubeconfig));
        }
        let config = workspace_root().join("deploy/kind.yaml");
        run(self
            .kind()
            .args(["create", "cluster", "--name", CLUSTER, "--wait", "180s", "--config"])
            .arg(&config)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig))
    }

    fn delete(&self) -> Result<(), String> {
        run(self.kind().args(["delete", "cluster", "--name", CLUSTER]))
    }

    fn install_and_check(&self, scenarios: &Scenarios, dir: &Path) -> Result<(), String> {
        self.load_image(dir)?;
        self.install_istiod()?;
        self.install_weft()?;
        self.deploy_workloads(scenarios)?;
        run_scenarios(self, scenarios)
    }

    /// The image built from this checkout, loaded into every node (never pulled: pullPolicy Never).
    fn load_image(&self, dir: &Path) -> Result<(), String> {
        let root = workspace_root();
        eprintln!("xtask: building {IMAGE} with {} (deploy/Containerfile)", self.engine.binary());
        run(Command::new(self.engine.binary()).current_dir(&root).args(["build", "-f", "deploy/Containerfile", "-t", IMAGE, "."]))?;
        match self.engine {
            Engine::Docker => run(self.kind().args(["load", "docker-image", IMAGE, "--name", CLUSTER])),
            Engine::Podman => {
                let archive = dir.join("weft-image.tar");
                run(Command::new("podman").args(["save", "-o"]).arg(&archive).arg(IMAGE))?;
                run(self.kind().args(["load", "image-archive"]).arg(&archive).args(["--name", CLUSTER]))
            }
        }
    }

    /// istiod from Istio's charts; its CA trusts weft's agent to ask for the certificates of its node's pods.
    fn install_istiod(&self) -> Result<(), String> {
        let common = ["--repo", ISTIO_CHARTS, "--version", ISTIO_VERSION, "-n", "istio-system", "--wait", "--timeout", "5m"];
        run(self.helm().args(["upgrade", "--install", "istio-base", "base", "--create-namespace"]).args(common))?;
        run(self
            .helm()
            .args(["upgrade", "--install", "istiod", "istiod"])
            .args(common)
            .args(["--set", "pilot.env.CA_TRUSTED_NODE_ACCOUNTS=weft-system/weft-agent"]))
    }

    /// weft's chart with the image just loaded and istiod's xDS at its Service's cluster IP.
    fn install_weft(&self) -> Result<(), String> {
        let ip = output(self.kubectl().args(["get", "service", "istiod", "-n", "istio-system", "-o", "jsonpath={.spec.clusterIP}"]))?;
        let ip = ip.trim();
        if ip.is_empty() {
            return Err("istiod's Service has no cluster IP".into());
        }
        let ns = output(self.kubectl().args(["create", "namespace", "weft-system", "--dry-run=client", "-o", "yaml"]))?;
        apply_text(self, &ns)?;
        run(self.kubectl().args(["label", "--overwrite", "namespace", "weft-system", "pod-security.kubernetes.io/enforce=privileged"]))?;
        let chart = workspace_root().join("deploy/helm/weft");
        let (repository, tag) = IMAGE.split_once(':').unwrap_or((IMAGE, "latest"));
        run(self
            .helm()
            .args(["upgrade", "--install", "weft"])
            .arg(&chart)
            .args(["-n", "weft-system", "--wait", "--timeout", "5m"])
            .args(["--set", &format!("image.repository={repository}"), "--set", &format!("image.tag={tag}")])
            .args(["--set", "image.pullPolicy=Never", "--set", "istiod.enabled=true"])
            .args(["--set", &format!("istiod.xdsAddress={ip}:15012")]))
    }

    fn deploy_workloads(&self, scenarios: &Scenarios) -> Result<(), String> {
        run(self.kubectl().arg("apply").arg("-f").arg(workspace_root().join("tests/e2e/workloads.yaml")))?;
        for (name, workload) in &scenarios.workloads {
            let ns = namespace(workload.captured);
            run(self.kubectl().args(["rollout", "status", "-n", ns, &format!("deployment/{name}"), "--timeout", "5m"]))?;
        }
        Ok(())
    }
}

fn apply_text(cluster: &Cluster, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = cluster
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("kubectl apply: {e}"))?;
    child.stdin.take().ok_or("kubectl apply: no stdin")?.write_all(text.as_bytes()).map_err(|e| format!("kubectl apply: {e}"))?;
    let status = child.wait().map_err(|e| format!("kubectl apply: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kubectl apply failed: {status}"))
    }
}

fn namespace(captured: bool) -> &'static str {
    if captured {
        CAPTURED_NS
    } else {
        OUTSIDE_NS
    }
}

/// What the caller saw: an HTTP status, or no answer at all.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Observed {
    Status(u16),
    NoAnswer,
}

fn expected(expect: Expect, observed: Observed) -> bool {
    match expect {
        Expect::Reach => observed == Observed::Status(200),
        Expect::Denied => observed == Observed::Status(403),
        Expect::Reset => observed == Observed::NoAnswer,
    }
}

/// One request from `from`'s pod, with curl: the status, or `NoAnswer` when the connection gave none.
fn request(cluster: &Cluster, scenarios: &Scenarios, s: &Scenario) -> Result<Observed, String> {
    let from = &scenarios.workloads[&s.from];
    let to = &scenarios.workloads[&s.to];
    let url = format!("http://{}.{}.svc:{}/hello", s.to, namespace(to.captured), s.port);
    let out = cluster
        .kubectl()
        .args(["exec", "-n", namespace(from.captured), &format!("deployment/{}", s.from), "--"])
        .args(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &url])
        .output()
        .map_err(|e| format!("kubectl exec: {e}"))?;
    // curl prints 000 when the connection gave no HTTP answer; nothing at all when kubectl exec itself failed.
    match String::from_utf8_lossy(&out.stdout).trim().parse::<u16>() {
        Ok(0) => Ok(Observed::NoAnswer),
        Ok(status) => Ok(Observed::Status(status)),
        Err(_) => Err(format!("kubectl exec into {}: {}", s.from, String::from_utf8_lossy(&out.stderr).trim())),
    }
}

/// Each scenario until its outcome is the expected one or its deadline passes; then a table.
fn run_scenarios(cluster: &Cluster, scenarios: &Scenarios) -> Result<(), String> {
    let mut rows = Vec::new();
    for s in &scenarios.scenarios {
        let deadline = Instant::now() + SCENARIO_DEADLINE;
        let observed = loop {
            let observed = request(cluster, scenarios, s);
            let done = matches!(observed, Ok(o) if expected(s.expect, o));
            if done || Instant::now() >= deadline {
                break observed;
            }
            std::thread::sleep(Duration::from_secs(2));
        };
        let ok = matches!(observed, Ok(o) if expected(s.expect, o));
        rows.push((s.name.clone(), s.expect, observed, ok));
    }
    println!("\n| scenario | expected | observed | |\n|---|---|---|---|");
    for (name, expect, observed, ok) in &rows {
        let observed = match observed {
            Ok(Observed::Status(code)) => format!("HTTP {code}"),
            Ok(Observed::NoAnswer) => "no answer".to_string(),
            Err(e) => e.clone(),
        };
        println!("| {name} | {expect:?} | {observed} | {} |", if *ok { "ok" } else { "FAILED" });
    }
    let failed = rows.iter().filter(|r| !r.3).count();
    println!("\n{} passed, {failed} failed", rows.len() - failed);
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} of {} scenarios failed", rows.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_match_expectations() {
        assert!(expected(Expect::Reach, Observed::Status(200)));
        assert!(!expected(Expect::Reach, Observed::Status(403)));
        assert!(expected(Expect::Denied, Observed::Status(403)));
        assert!(!expected(Expect::Denied, Observed::NoAnswer));
        assert!(expected(Expect::Reset, Observed::NoAnswer));
        assert!(!expected(Expect::Reset, Observed::Status(503)));
    }
}
