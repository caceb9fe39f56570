//! The CNI installer as a node runs it: the real `weft-agent install-cni` / `uninstall-cni` binaries on a
//! temporary net.d and bin dir, another component rewriting the config, and SIGKILL at random moments.
//! Needs no root: only files and inotify.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use weft_tests::util::run_ok;
use weft_tests::{bin_path, wait_for, workspace_root, ChildGuard};

/// A config as its project ships it, from the installer's golden files.
fn shipped(name: &str, file: &str) -> String {
    let path = workspace_root().join("agent/src/cni_install/testdata").join(name).join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fresh `<tmp>/net.d` and `<tmp>/bin`.
fn node_dirs(tag: &str) -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("weft-cni-install-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["net.d", "bin"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    (root.join("net.d"), root.join("bin"))
}

fn agent_cmd(verb: &str, net_d: &Path, bin: &Path) -> Command {
    let mut cmd = Command::new(bin_path("weft-agent").unwrap());
    cmd.arg(verb).arg("--cni-conf-dir").arg(net_d).arg("--cni-bin-dir").arg(bin);
    cmd
}

fn start_installer(net_d: &Path, bin: &Path) -> ChildGuard {
    let mut cmd = agent_cmd("install-cni", net_d, bin);
    cmd.args(["--cni-socket", "/var/run/weft/cni.sock", "--cni-log-file", "/var/log/weft-cni.log"]);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(net_d.with_file_name("installer.log")).unwrap();
    cmd.stdout(Stdio::null()).stderr(log);
    ChildGuard::new(cmd.spawn().unwrap(), "weft-agent install-cni")
}

/// The plugins' types, or why the file is not a valid plugin list.
fn plugin_types(path: &Path) -> Result<Vec<String>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let plugins = doc["plugins"].as_array().ok_or_else(|| format!("{}: no plugins array", path.display()))?;
    plugins.iter().map(|p| p["type"].as_str().map(str::to_owned).ok_or_else(|| "a plugin without type".to_string())).collect()
}

fn weft_count(path: &Path) -> Result<usize, String> {
    Ok(plugin_types(path)?.iter().filter(|t| *t == "weft-cni").count())
}

fn wait_entries(path: &Path, n: usize, what: &str, within: Duration) {
    wait_for(what, within, || match weft_count(path) {
        Ok(c) if c == n => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap();
}

#[test]
fn install_repairs_rewrites_survives_stop_and_uninstalls_to_the_original() {
    let (net_d, bin) = node_dirs("lifecycle");
    let calico = net_d.join("10-calico.conflist");
    let original = shipped("calico", "input.conflist");
    std::fs::write(&calico, &original).unwrap();
    std::fs::write(net_d.join("calico-kubeconfig"), "apiVersion: v1\n").unwrap();

    let mut installer = start_installer(&net_d, &bin);
    wait_entries(&calico, 1, "weft-cni inserted", Duration::from_secs(10));
    assert_eq!(plugin_types(&calico).unwrap(), ["calico", "portmap", "bandwidth", "weft-cni"]);
    let installed = std::fs::read(bin.join("weft-cni")).unwrap();
    // By default the installer copies the weft-cni beside the agent's own binary, as in the image.
    let beside_agent = bin_path("weft-agent").unwrap().with_file_name("weft-cni");
    assert_eq!(installed, std::fs::read(beside_agent).unwrap(), "bin dir holds another weft-cni");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(bin.join("weft-cni")).unwrap().permissions().mode() & 0o777, 0o755);

    // calico-node restarts and writes its config again, without weft.
    for round in 0..3 {
        std::fs::write(&calico, &original).unwrap();
        wait_entries(&calico, 1, &format!("weft-cni re-inserted (round {round})"), Duration::from_secs(20));
    }
    let log = std::fs::read_to_string(net_d.with_file_name("installer.log")).unwrap();
    assert!(log.contains("calico rewrote") && log.contains("10-calico.conflist"), "no conflict warning in:\n{log}");

    // A plain stop keeps the entry and the binary.
    let status = installer.stop().unwrap();
    assert!(status.success(), "install-cni exited with {status}");
    assert_eq!(weft_count(&calico).unwrap(), 1);
    assert!(bin.join("weft-cni").is_file());

    let out = run_ok(&mut agent_cmd("uninstall-cni", &net_d, &bin)).unwrap();
    assert!(out.contains("10-calico.conflist"), "{out}");
    let back: Value = serde_json::from_slice(&std::fs::read(&calico).unwrap()).unwrap();
    assert_eq!(back, serde_json::from_str::<Value>(&original).unwrap());
    assert!(!bin.join("weft-cni").exists());
}

#[test]
fn a_conf_becomes_a_conflist_once() {
    let (net_d, bin) = node_dirs("conf");
    std::fs::write(net_d.join("10-crio-bridge.conf"), shipped("bridge", "input.conf")).unwrap();
    let out = run_ok(agent_cmd("install-cni", &net_d, &bin).arg("--once")).unwrap();
    assert!(out.contains("10-crio-bridge.conflist"), "{out}");
    assert!(!net_d.join("10-crio-bridge.conf").exists());
    let list = net_d.join("10-crio-bridge.conflist");
    assert_eq!(plugin_types(&list).unwrap(), ["bridge", "weft-cni"]);
    let doc: Value = serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
    assert_eq!((doc["cniVersion"].as_str(), doc["name"].as_str()), (Some("0.3.1"), Some("crio-bridge")));
    // Again: nothing to do, still one entry.
    run_ok(agent_cmd("install-cni", &net_d, &bin).arg("--once")).unwrap();
    assert_eq!(weft_count(&list).unwrap(), 1);
}

#[test]
fn refuses_a_config_weft_cni_cannot_be_chained_into() {
    let (net_d, bin) = node_dirs("old");
    let conf = r#"{"cniVersion":"0.2.0","name":"mynet","type":"bridge","bridge":"cni0"}"#;
    std::fs::write(net_d.join("10-mynet.conf"), conf).unwrap();
    let out = agent_cmd("install-cni", &net_d, &bin).arg("--once").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10-mynet.conf") && err.contains("0.2.0"), "{err}");
    assert_eq!(std::fs::read_to_string(net_d.join("10-mynet.conf")).unwrap(), conf);
}

/// xorshift64*: enough randomness for kill timings; the seed is printed to replay a failure.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Watches the file as fast as it can. Each rewrite by the test makes `generation` odd while it is under way and
/// even after, so a read between two equal even readings saw a state no rewrite was changing.
struct Checker {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    violations: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checker {
    fn start(path: PathBuf, generation: Arc<AtomicU64>) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let (s, r, v) = (stop.clone(), reads.clone(), violations.clone());
        let thread = std::thread::spawn(move || {
            // The even generation at which the file was last seen holding weft's entry.
            let mut had_entry_at: Option<u64> = None;
            while !s.load(Ordering::Relaxed) {
                let g1 = generation.load(Ordering::SeqCst);
                let seen = weft_count(&path);
                let g2 = generation.load(Ordering::SeqCst);
                r.fetch_add(1, Ordering::Relaxed);
                let stable = g1 == g2 && g1 & 1 == 0;
                let fault = match seen {
                    Err(e) => Some(format!("invalid config: {e}")),
                    Ok(n) if n > 1 => Some(format!("{n} weft-cni entries")),
                    Ok(1) if stable => {
                        had_entry_at = Some(g1);
                        None
                    }
                    Ok(0) if stable && had_entry_at == Some(g1) => {
                        Some(format!("weft-cni's entry vanished at generation {g1} with no rewrite by another component"))
                    }
                    Ok(_) => None,
                };
                if let Some(f) = fault {
                    v.lock().unwrap().push(f);
                }
            }
        });
        Checker { stop, reads, violations, thread: Some(thread) }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let violations = self.violations.lock().unwrap().clone();
        (self.reads.load(Ordering::Relaxed), violations)
    }
}

/// Writes `content` as a well-behaved installer does (temporary file, rename), bracketed by generation bumps.
fn rewrite(path: &Path, content: &str, generation: &AtomicU64) {
    let temp = path.with_file_name(".calico-rewrite.tmp");
    std::fs::write(&temp, content).unwrap();
    generation.fetch_add(1, Ordering::SeqCst);
    std::fs::rename(&temp, path).unwrap();
    generation.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn sigkill_at_random_moments_never_leaves_zero_or_two_entries() {
    let (net_d, bin) = node_dirs("kill");
    let calico = net_d.join("10-calico.conflist");
    let original = shipped("calico", "input.conflist");
    std::fs::write(&calico, &original).unwrap();
    let seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("kill schedule seed {seed:#x}");
    let mut rng = Rng(seed);

    let generation = Arc::new(AtomicU64::new(0));
    let checker = Checker::start(calico.clone(), generation.clone());
    let started = Instant::now();
    let mut kills = 0;
    for cycle in 0..40 {
        let mut installer = start_installer(&net_d, &bin);
        // Sometimes let it finish its first pass, sometimes kill it in the middle of it.
        if cycle % 2 == 0 {
            wait_entries(&calico, 1, &format!("insert in cycle {cycle}"), Duration::from_secs(10));
        }
        for _ in 0..rng.below(3) {
            std::thread::sleep(Duration::from_millis(rng.below(40)));
            rewrite(&calico, &original, &generation);
        }
        std::thread::sleep(Duration::from_millis(rng.below(60)));
        installer.signal(libc::SIGKILL).unwrap();
        installer.wait_timeout(Duration::from_secs(5)).unwrap();
        kills += 1;
    }
    // One more start after all that: it converges to exactly one entry and leaves no temporary files.
    let mut installer = start_installer(&net_d, &bin);
    wait_entries(&calico, 1, "the final insert", Duration::from_secs(10));
    installer.stop().unwrap();
    let (reads, violations) = checker.finish();
    eprintln!("{kills} kills in {:?}, {reads} reads of the config", started.elapsed());
    assert!(violations.is_empty(), "seed {seed:#x}: {violations:#?}");
    assert!(reads > 1000, "the checker read the file only {reads} times");
    assert_eq!(std::fs::read_to_string(&calico).unwrap(), shipped("calico", "expected.conflist"));
    let mut names: Vec<_> = std::fs::read_dir(&net_d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["10-calico.conflist"], "leftovers in net.d");
    let mut bins: Vec<_> = std::fs::read_dir(&bin).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    bins.sort();
    assert_eq!(bins, ["weft-cni"], "leftovers in the bin dir");
}

/// `weft-agent run` with `install_cni` inserts the entry once its socket answers, and a `SIGTERM` (a rolling
/// update, a restart) leaves the entry and the binary in place.
#[test]
fn run_installs_at_start_up_and_keeps_the_entry_on_sigterm() {
    if let Err(why) = weft_tests::require_root() {
        eprintln!("SKIPPED run_installs_at_start_up_and_keeps_the_entry_on_sigterm: {why}");
        return;
    }
    let (net_d, bin) = node_dirs("run");
    let work = net_d.parent().unwrap().to_path_buf();
    let flannel = net_d.join("10-flannel.conflist");
    std::fs::write(&flannel, shipped("flannel", "input.conflist")).unwrap();
    let socket = work.join("cni.sock");
    // A port of our own: other suites use the default admin address.
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut cmd = Command::new(bin_path("weft-agent").unwrap());
    cmd.args(["run", "--install-cni", "true", "--admin-address", &admin.to_string()])
        .arg("--cni-conf-dir")
        .arg(&net_d)
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(work.join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("agent.log")).unwrap());
    let mut agent = ChildGuard::new(cmd.spawn().unwrap(), "weft-agent run");
    wait_entries(&flannel, 1, "weft-cni inserted by the agent", Duration::from_secs(20));
    let doc: Value = serde_json::from_slice(&std::fs::read(&flannel).unwrap()).unwrap();
    assert_eq!(doc["plugins"][2]["agent_socket"].as_str(), socket.to_str());
    assert!(socket.exists(), "the entry appeared before the agent's socket");
    assert!(agent.stop().unwrap().success());
    assert_eq!(weft_count(&flannel).unwrap(), 1);
    assert!(bin.join("weft-cni").is_file());
}

/// The weft-cni `cargo xtask` builds, as the image ships it, is linked statically: it answers the runtime on
/// a host that has none of the image's libraries (here a root holding nothing but the plugin).
#[test]
fn the_plugin_runs_on_a_host_without_the_images_libc() {
    if let Err(why) = weft_tests::require_root() {
        eprintln!("SKIPPED the_plugin_runs_on_a_host_without_the_images_libc: {why} (chroot)");
        return;
    }
    if std::env::var_os(weft_tests::tools::CNI_BIN).is_none() {
        eprintln!("SKIPPED the_plugin_runs_on_a_host_without_the_images_libc: run by `cargo xtask test`, which builds the static weft-cni");
        return;
    }
    let (_, bin) = node_dirs("bare-root");
    std::fs::copy(bin_path("weft-cni").unwrap(), bin.join("weft-cni")).unwrap();
    let out = Command::new("chroot").arg(&bin).arg("/weft-cni").env("CNI_COMMAND", "VERSION").stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "weft-cni did not start without a libc: {}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(answer["supportedVersions"].as_array().is_some_and(|v| v.iter().any(|v| v == "1.1.0")), "{answer}");
}
