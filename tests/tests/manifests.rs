//! deploy/: the Helm chart, the plain manifests that are its default rendering, the kustomize base, and the
//! kind e2e workloads.
//!
//! - The chart's default rendering is `deploy/weft.yaml` and, one file per template, `deploy/kustomize/`
//!   (`UPDATE_GOLDEN=1` rewrites them); the kustomization lists exactly those files.
//! - Every manifest document, of every rendering (the default and variants that switch on each conditional
//!   part), is read strictly into k8s-openapi's types: deserialized, serialized back and compared with the
//!   input, so a field the API does not have (a typo) fails by its path.
//! - The ConfigMap's agent.json is accepted by the agent's own config reader.
//! - Values are checked against the chart's schema: a misspelt value is refused by name.
//!
//! Helm is built from its Go module by `cargo xtask setup` (tests/src/gotools.rs).

use std::any::TypeId;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ResourceQuota, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::{NamespaceResourceScope, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;
use weft_tests::gotools::HELM;
use weft_tests::workspace_root;

const NAMESPACE: &str = "weft-system";
const REGENERATE: &str = "UPDATE_GOLDEN=1 cargo test -p weft-tests --test manifests";

/// The default rendering's arguments (the plain manifests also create the namespace).
const DEFAULT_SETS: &[&str] = &["namespace.create=true"];

/// Renderings that switch on every conditional part of the chart, each read strictly like the default.
const VARIANTS: &[&[&str]] = &[
    &["redirect=ebpf", "hostPidNetns=true", "cni.distribution=gke"],
    &["redirect=nftables", "cni.distribution=k3s", "istiod.enabled=true", "istiod.xdsAddress=10.96.0.10:15012"],
    &["cni.distribution=microk8s", "criticalPodQuota=true", "cni.install=false", "agentConfig.pod_workers=4"],
];

fn chart() -> PathBuf {
    workspace_root().join("deploy/helm/weft")
}

fn helm(args: &[&str]) -> Result<String, String> {
    let helm = HELM.find()?;
    let out = Command::new(&helm)
        .args(args)
        // Helm's own state stays out of the user's home.
        .env("HELM_CACHE_HOME", std::env::temp_dir().join("weft-helm/cache"))
        .env("HELM_CONFIG_HOME", std::env::temp_dir().join("weft-helm/config"))
        .env("HELM_DATA_HOME", std::env::temp_dir().join("weft-helm/data"))
        .output()
        .map_err(|e| format!("running {}: {e}", helm.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("helm {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn render(sets: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut args = vec!["template", "weft", chart.to_str().unwrap_or_default(), "-n", NAMESPACE];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args)
}

fn header(what: &str) -> String {
    format!(
        "# Generated from deploy/helm/weft ({what} of `helm template weft deploy/helm/weft -n {NAMESPACE} --set \
         namespace.create=true`).\n# Do not edit: change the chart, then run `{REGENERATE}`.\n"
    )
}

/// The rendering split by template: (`namespace.yaml`, its documents).
fn by_template(rendering: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = Vec::new();
    for part in rendering.split("---\n").filter(|p| !p.trim().is_empty()) {
        let source = part.lines().find_map(|l| l.strip_prefix("# Source: weft/templates/"));
        match (source, files.last_mut()) {
            (Some(name), _) => files.push((name.to_string(), format!("---\n{part}"))),
            (None, Some((_, text))) => text.push_str(&format!("---\n{part}")),
            (None, None) => files.push(("unknown.yaml".into(), part.to_string())),
        }
    }
    files
}

/// The files the default rendering makes: deploy/weft.yaml and one per template under deploy/kustomize/.
fn generated() -> Vec<(PathBuf, String)> {
    let rendering = render(DEFAULT_SETS).unwrap();
    let deploy = workspace_root().join("deploy");
    let mut files = vec![(deploy.join("weft.yaml"), header("the whole rendering") + &rendering)];
    for (name, text) in by_template(&rendering) {
        files.push((deploy.join("kustomize").join(&name), header(&format!("templates/{name}")) + &text));
    }
    files
}

/// A short line diff: the first lines that differ, with the line number.
fn diff(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let first = w.iter().zip(&g).position(|(a, b)| a != b).unwrap_or(w.len().min(g.len()));
    let show = |lines: &[&str]| lines.iter().skip(first).take(6).map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    format!("first difference at line {}:\n  rendered:\n{}\n  in the file:\n{}", first + 1, show(&w), show(&g))
}

#[test]
fn the_plain_manifests_are_the_charts_default_rendering() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut stale = Vec::new();
    for (path, want) in generated() {
        let got = std::fs::read_to_string(&path).unwrap_or_default();
        if got == want {
            continue;
        }
        if update {
            std::fs::write(&path, &want).unwrap();
        } else {
            stale.push(format!("{} is out of date; {}", path.display(), diff(&want, &got)));
        }
    }
    assert!(stale.is_empty(), "{}\n\nregenerate with `{REGENERATE}`", stale.join("\n\n"));
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let dir = workspace_root().join("deploy/kustomize");
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let kustomization: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("deploy/kustomize/kustomization.yaml: `resources` is not a list")
        .iter()
        .map(|r| r.as_str().unwrap_or_default().to_string())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    let generated: BTreeSet<String> = by_template(&render(DEFAULT_SETS).unwrap()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(listed, on_disk, "deploy/kustomize/kustomization.yaml `resources` must list exactly the manifests beside it");
    assert_eq!(on_disk, generated, "deploy/kustomize/ must hold one file per rendered template; run `{REGENERATE}`");
}

/// Reads `doc` into `T` and back; the input must come back whole. Returns the API path to create it at.
fn strict<T>(doc: &Value) -> Result<String, String>
where
    T: Resource + DeserializeOwned + Serialize + 'static,
{
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| format!("not a valid {}: {e}", T::KIND))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{}: {e}", T::KIND))?;
    compare(doc, &back, "")?;
    let base = if T::GROUP.is_empty() { format!("/api/{}", T::VERSION) } else { format!("/apis/{}/{}", T::GROUP, T::VERSION) };
    let namespaced = TypeId::of::<T::Scope>() == TypeId::of::<NamespaceResourceScope>();
    Ok(match (namespaced, doc["metadata"]["namespace"].as_str()) {
        (true, Some(ns)) => format!("{base}/namespaces/{ns}/{}", T::URL_PATH_SEGMENT),
        (true, None) => return Err(format!("{} {}: metadata.namespace is missing", T::KIND, doc["metadata"]["name"])),
        (false, _) => format!("{base}/{}", T::URL_PATH_SEGMENT),
    })
}

/// The first place where `input` and what the typed value gave back differ, by path.
fn compare(input: &Value, back: &Value, path: &str) -> Result<(), String> {
    match (input, back) {
        (Value::Object(i), Value::Object(b)) => {
            for (key, value) in i {
                let at = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => compare(value, other, &at)?,
                    None => return Err(format!("{}: unknown field (not in the Kubernetes API: misspelt?)", &at[1..])),
                }
            }
            match b.keys().find(|k| !i.contains_key(*k)) {
                Some(extra) => Err(format!("{path}.{extra}: appeared on the way back (a defaulted or renamed field)")),
                None => Ok(()),
            }
        }
        (Value::Array(i), Value::Array(b)) if i.len() == b.len() => {
            i.iter().zip(b).enumerate().try_for_each(|(n, (x, y))| compare(x, y, &format!("{path}[{n}]")))
        }
        _ if input == back => Ok(()),
        _ => Err(format!("{}: {input} came back as {back}", path.trim_start_matches('.'))),
    }
}

/// One manifest document, strictly; returns the API path it is created at.
fn check_document(doc: &Value) -> Result<String, String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Namespace") => strict::<Namespace>(doc),
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(doc),
        ("v1", "ConfigMap") => strict::<ConfigMap>(doc),
        ("v1", "ResourceQuota") => strict::<ResourceQuota>(doc),
        ("v1", "Service") => strict::<Service>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => strict::<ClusterRoleBinding>(doc),
        ("apps/v1", "DaemonSet") => strict::<DaemonSet>(doc),
        ("apps/v1", "Deployment") => strict::<Deployment>(doc),
        _ => Err(format!("{api_version} {kind}: not a kind this test knows; add it to check_document")),
    }
}

/// The documents of a multi-document YAML stream, as JSON values (empty documents skipped).
fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(de).map_err(|e| e.to_string())?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Kinds of Istio's own API in the e2e workloads: not Kubernetes' types, so not read here.
fn is_istio(doc: &Value) -> bool {
    doc["apiVersion"].as_str().is_some_and(|v| v.contains(".istio.io/"))
}

/// Every manifest the project ships or applies: (where it comes from, the document).
fn all_manifests() -> Vec<(String, Value)> {
    let mut all = Vec::new();
    let mut add = |origin: String, text: &str| {
        for (n, doc) in documents(text).unwrap_or_else(|e| panic!("{origin}: {e}")).into_iter().enumerate() {
            all.push((format!("{origin} document {n}"), doc));
        }
    };
    let plain = std::fs::read_to_string(workspace_root().join("deploy/weft.yaml"))
        .unwrap_or_else(|e| panic!("deploy/weft.yaml: {e}; generate it with `{REGENERATE}`"));
    add("deploy/weft.yaml".into(), &plain);
    for sets in VARIANTS {
        add(format!("helm template --set {}", sets.join(",")), &render(sets).unwrap());
    }
    let e2e = workspace_root().join("tests/e2e/workloads.yaml");
    add("tests/e2e/workloads.yaml".into(), &std::fs::read_to_string(e2e).unwrap());
    all.retain(|(_, doc)| !is_istio(doc));
    all
}

#[test]
fn every_manifest_reads_strictly_into_the_kubernetes_types() {
    let failures: Vec<String> =
        all_manifests().iter().filter_map(|(origin, doc)| check_document(doc).err().map(|e| format!("{origin}: {e}"))).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn strict_reading_names_a_misspelt_field() {
    let mut doc = documents(&render(DEFAULT_SETS).unwrap()).unwrap().into_iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    doc["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = serde_json::json!({});
    let err = check_document(&doc).unwrap_err();
    assert_eq!(err, "spec.template.spec.containers[0].securityContxt: unknown field (not in the Kubernetes API: misspelt?)");
}

/// agent.json of every rendering, read by the agent's own config reader (unknown fields refused), with the node
/// name the DaemonSet adds.
#[test]
fn the_configmaps_agent_config_is_accepted_by_the_agent() {
    use weft_agent::config::agent::{AgentConfig, ConfigFile};
    let renderings = std::iter::once(DEFAULT_SETS).chain(VARIANTS.iter().copied());
    for sets in renderings {
        let docs = documents(&render(sets).unwrap()).unwrap();
        let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("no ConfigMap rendered");
        let text = cm["data"]["agent.json"].as_str().expect("ConfigMap has no agent.json");
        let mut json: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
        // The DaemonSet gives the node's name through the downward API (NODE_NAME, the agent's --node-name).
        json.insert("node_name".into(), Value::from("node-1"));
        let file: ConfigFile =
            serde_json::from_value(Value::Object(json)).unwrap_or_else(|e| panic!("--set {}: agent.json: {e}", sets.join(",")));
        file.apply(AgentConfig::default()).unwrap_or_else(|e| panic!("--set {}: agent.json: {e}", sets.join(",")));
    }
}

#[test]
fn the_values_schema_names_a_bad_value() {
    for (set, want) in [
        ("redirect=iptabels", "redirect"),
        ("cni.distribution=openshift", "distribution"),
        ("cni.binDIR=/opt/cni/bin", "binDIR"),
    ] {
        let err = render(&[set]).unwrap_err();
        assert!(err.contains(want), "--set {set}: {err}");
    }
    let err = render(&["istiod.enabled=true"]).unwrap_err();
    assert!(err.contains("istiod.xdsAddress: set istiod's xDS address"), "{err}");
}

#[test]
fn cni_paths_follow_the_distribution_preset() {
    for (distribution, bin, conf) in [
        ("generic", "/opt/cni/bin", "/etc/cni/net.d"),
        ("k3s", "/var/lib/rancher/k3s/data/current/bin", "/var/lib/rancher/k3s/agent/etc/cni/net.d"),
        ("microk8s", "/var/snap/microk8s/current/opt/cni/bin", "/var/snap/microk8s/current/args/cni-network"),
        ("gke", "/home/kubernetes/bin", "/etc/cni/net.d"),
    ] {
        let docs = documents(&render(&[&format!("cni.distribution={distribution}")]).unwrap()).unwrap();
        let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        let host_path = |name: &str| {
            ds["spec"]["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap()["hostPath"]
                ["path"]
                .clone()
        };
        assert_eq!(host_path("cni-bin"), bin, "{distribution}");
        assert_eq!(host_path("cni-conf"), conf, "{distribution}");
    }
    let docs = documents(&render(&["cni.distribution=k3s", "cni.binDir=/custom/bin"]).unwrap()).unwrap();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    assert!(ds.to_string().contains("\"/custom/bin\""), "cni.binDir overrides the preset");
}

/// The e2e workloads are the scenario file's: a Deployment per workload in the namespace its capture says, with
/// its service account and weft's capture label when captured, and a Service on its port per server.
#[test]
fn the_e2e_workloads_are_the_scenarios_workloads() {
    use weft_tests::scenarios::{default_path, Scenarios};
    let scenarios = Scenarios::load(&default_path()).unwrap();
    let text = std::fs::read_to_string(workspace_root().join("tests/e2e/workloads.yaml")).unwrap();
    let docs = documents(&text).unwrap();
    let find = |kind: &str, name: &str| docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name);
    for (name, w) in &scenarios.workloads {
        let ns = if w.captured { "weft-e2e" } else { "weft-e2e-outside" };
        let deployment = find("Deployment", name).unwrap_or_else(|| panic!("tests/e2e/workloads.yaml: no Deployment {name}"));
        assert_eq!(deployment["metadata"]["namespace"], ns, "Deployment {name}");
        assert_eq!(deployment["spec"]["template"]["spec"]["serviceAccountName"], w.service_account.as_str(), "Deployment {name}");
        let capture = &deployment["spec"]["template"]["metadata"]["labels"]["weft.dev/capture"];
        assert_eq!(capture == "enabled", w.captured, "Deployment {name}: pod label weft.dev/capture={capture}");
        if let Some(port) = w.port {
            let service = find("Service", name).unwrap_or_else(|| panic!("tests/e2e/workloads.yaml: no Service {name}"));
            assert_eq!(service["spec"]["ports"][0]["port"], port, "Service {name}");
            assert_eq!(service["metadata"]["namespace"], ns, "Service {name}");
        }
    }
}

/// The image builds the eBPF programs with the toolchain `cargo xtask setup` pins.
#[test]
fn the_containerfile_pins_setups_ebpf_toolchain() {
    let setup = std::fs::read_to_string(workspace_root().join("xtask/src/setup.rs")).unwrap();
    let pinned = setup
        .lines()
        .find_map(|l| l.trim().strip_prefix("pub const EBPF_TOOLCHAIN: &str = \"")?.strip_suffix("\";"))
        .expect("xtask/src/setup.rs: EBPF_TOOLCHAIN not found");
    let containerfile = std::fs::read_to_string(workspace_root().join("deploy/Containerfile")).unwrap();
    assert!(
        containerfile.lines().any(|l| l.trim() == format!("ARG EBPF_TOOLCHAIN={pinned}")),
        "deploy/Containerfile: set `ARG EBPF_TOOLCHAIN={pinned}` (xtask/src/setup.rs pins it)"
    );
}

/// Every manifest, sent to a real API server (etcd and kube-apiserver built from their Go modules,
/// tests/src/kube.rs) with server-side dry run and strict field validation, so a manifest the API refuses —
/// a bad value, a rule the types cannot express — fails here. Namespaces are created for real first, so the
/// objects in them can be checked; objects the harness created already (the agent's namespace, account and
/// RBAC) are checked as a dry-run update.
#[test]
fn every_manifest_is_accepted_by_the_api_server() {
    if let Err(why) = weft_tests::require_root() {
        eprintln!("skipping: {why}");
        return;
    }
    let node = weft_tests::NetNs::create_with_lo("kmanifest").unwrap();
    let api = weft_tests::kube::KubeApi::start(&node).unwrap();
    let manifests = all_manifests();
    for (origin, doc) in manifests.iter().filter(|(_, d)| d["kind"] == "Namespace") {
        let (code, body) = api.request("POST", "/api/v1/namespaces", Some(doc)).unwrap();
        assert!(matches!(code, 200..=299 | 409), "{origin}: creating the namespace: {code}: {body}");
    }
    let failures: Vec<String> = manifests
        .iter()
        .filter_map(|(origin, doc)| dry_run(&api, doc).err().map(|e| format!("{origin}: {e}")))
        .collect();
    assert!(failures.is_empty(), "the API server refused:\n{}\n(its log: {})", failures.join("\n"), api.log_path().display());

    // The check can fail: the API refuses what the types accept (privileged without privilege escalation).
    let mut ds = documents(&render(DEFAULT_SETS).unwrap()).unwrap().into_iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let security = &mut ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    security["privileged"] = Value::Bool(true);
    security["allowPrivilegeEscalation"] = Value::Bool(false);
    let err = dry_run(&api, &ds).unwrap_err();
    assert!(err.contains("allowPrivilegeEscalation"), "{err}");
}

/// A dry-run create, or a dry-run update where the object exists; the API's answer when it refuses.
fn dry_run(api: &weft_tests::kube::KubeApi, doc: &Value) -> Result<(), String> {
    const CHECK: &str = "dryRun=All&fieldValidation=Strict";
    let path = check_document(doc)?;
    let (code, body) = api.request("POST", &format!("{path}?{CHECK}"), Some(doc)).map_err(|e| e.to_string())?;
    let (code, body) = match code {
        409 => {
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            api.request("PUT", &format!("{path}/{name}?{CHECK}"), Some(doc)).map_err(|e| e.to_string())?
        }
        _ => (code, body),
    };
    match code {
        200..=299 => Ok(()),
        _ => Err(format!("{code}: {}", body["message"].as_str().map_or_else(|| body.to_string(), str::to_string))),
    }
}
