//! A real Kubernetes control plane for the tests: etcd and kube-apiserver, built from their Go modules by
//! `cargo xtask setup` (`tests/kube/`), started inside the test node's network namespace on 127.0.0.1 with a
//! generated serving certificate and service-account key. The test plays kubelet: it creates Pod objects bound
//! to its node and writes their status, while libcni makes their networks.
//!
//! Two identities talk to it: the test (token in `system:masters`) through `curl` run in the node's namespace,
//! and the agent, whose token authenticates as the ServiceAccount `weft-system/weft-agent`, so the ClusterRole of
//! `deploy/` is what it is allowed to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::{json, Value};

use crate::cluster::{Cluster, Pod, PodOptions};
use crate::netns::NetNs;
use crate::tools::harness_dir;
use crate::util::{self, ChildGuard, HarnessError};

const ADMIN_TOKEN: &str = "weft-test-admin";
const AGENT_TOKEN: &str = "weft-test-agent";
/// The agent's own namespace and service account, as deploy/ creates them.
pub const AGENT_NAMESPACE: &str = "weft-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "weft-agent";
/// Inside the node's namespace.
const API_PORT: u16 = 6443;
const ETCD_CLIENT: &str = "http://127.0.0.1:2379";

/// etcd and kube-apiserver in a node's network namespace; both stop when dropped.
pub struct KubeApi {
    netns: PathBuf,
    dir: PathBuf,
    etcd: Option<ChildGuard>,
    apiserver: Option<ChildGuard>,
}

/// The Go-built binaries, linked by `cargo xtask setup`.
fn binary(name: &str) -> Result<PathBuf, HarnessError> {
    let path = harness_dir().join("bin").join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(HarnessError(format!("{} is missing: run `cargo xtask setup` (it builds {name} from its Go module)", path.display())))
    }
}

impl KubeApi {
    /// Starts etcd and the API server in `node`'s namespace and waits until the API server is ready and the
    /// agent's ServiceAccount, namespace and ClusterRole exist.
    pub fn start(node: &NetNs) -> Result<KubeApi, HarnessError> {
        let dir = harness_dir().join(format!("kube-{}", node.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pki"))?;
        write_pki(&dir.join("pki"))?;
        let mut api = KubeApi { netns: node.path().to_path_buf(), dir, etcd: None, apiserver: None };
        api.start_etcd(node)?;
        api.start_apiserver(node)?;
        api.grant_agent()?;
        Ok(api)
    }

    fn start_etcd(&mut self, node: &NetNs) -> Result<(), HarnessError> {
        let log = std::fs::File::create(self.dir.join("etcd.log"))?;
        let mut cmd = node.command(binary("etcd")?);
        cmd.args(["--data-dir"]).arg(self.dir.join("etcd-data"));
        cmd.args(["--listen-client-urls", ETCD_CLIENT, "--advertise-client-urls", ETCD_CLIENT]);
        cmd.args(["--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380"]);
        cmd.args(["--initial-cluster", "default=http://127.0.0.1:2380", "--log-level", "warn"]);
        cmd.stdout(Stdio::null()).stderr(log);
        self.etcd = Some(ChildGuard::new(cmd.spawn()?, "etcd"));
        Ok(())
    }

    /// Starts (or restarts) the API server and waits for `/readyz`.
    pub fn start_apiserver(&mut self, node: &NetNs) -> Result<(), HarnessError> {
        let pki = self.dir.join("pki");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("kube-apiserver.log"))?;
        let mut cmd = node.command(binary("kube-apiserver")?);
        cmd.arg(format!("--etcd-servers={ETCD_CLIENT}"));
        cmd.args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"]).arg(format!("--secure-port={API_PORT}"));
        cmd.arg(format!("--tls-cert-file={}", pki.join("apiserver.pem").display()));
        cmd.arg(format!("--tls-private-key-file={}", pki.join("apiserver.key").display()));
        cmd.arg(format!("--client-ca-file={}", pki.join("ca.pem").display()));
        cmd.arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local");
        cmd.arg(format!("--service-account-key-file={}", pki.join("sa.pub").display()));
        cmd.arg(format!("--service-account-signing-key-file={}", pki.join("sa.key").display()));
        cmd.arg("--api-audiences=https://kubernetes.default.svc.cluster.local,istio-ca");
        cmd.arg(format!("--token-auth-file={}", pki.join("tokens.csv").display()));
        cmd.args(["--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true"]);
        // No ServiceAccount admission: pods are created without token volumes (no kubelet mounts them here).
        cmd.args(["--disable-admission-plugins=ServiceAccount", "--enable-priority-and-fairness=false", "-v=1"]);
        cmd.stdout(Stdio::null()).stderr(log);
        let mut guard = ChildGuard::new(cmd.spawn()?, "kube-apiserver");
        guard.set_grace(Duration::from_secs(10));
        self.apiserver = Some(guard);
        util::wait_for_with("kube-apiserver /readyz", Duration::from_secs(120), Duration::from_millis(250), || {
            if let Some(st) = self.apiserver.as_mut().and_then(|g| g.try_wait().ok()).flatten() {
                return Err(format!("kube-apiserver exited ({st}); see {}", self.dir.join("kube-apiserver.log").display()));
            }
            match self.raw("GET", "/readyz", None) {
                Ok((200, _)) => Ok(()),
                Ok((code, body)) => Err(format!("{code}: {body}")),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    /// Stops the API server (etcd keeps the data), as when the control plane goes away.
    pub fn stop_apiserver(&mut self) -> Result<(), HarnessError> {
        if let Some(mut guard) = self.apiserver.take() {
            guard.stop()?;
        }
        Ok(())
    }

    /// The agent's kubeconfig: the API server's address in the node's namespace, its CA, the agent's token.
    pub fn agent_kubeconfig(&self) -> Result<PathBuf, HarnessError> {
        self.kubeconfig("agent", AGENT_TOKEN)
    }

    /// A cluster admin's kubeconfig (for istiod, which runs as its own cluster-wide controller).
    pub fn admin_kubeconfig(&self) -> Result<PathBuf, HarnessError> {
        self.kubeconfig("admin", ADMIN_TOKEN)
    }

    fn kubeconfig(&self, user: &str, token: &str) -> Result<PathBuf, HarnessError> {
        let path = self.dir.join(format!("{user}.kubeconfig"));
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": format!("https://127.0.0.1:{API_PORT}"), "certificate-authority": self.dir.join("pki/ca.pem")}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&config).map_err(|e| HarnessError(e.to_string()))?)?;
        Ok(path)
    }

    /// Creates `object` (any kind the API serves, CRD-defined ones included), or replaces it when it
    /// exists: what `kubectl apply` does for a test that changes a policy.
    pub fn apply(&self, object: &Value) -> Result<(), HarnessError> {
        let collection = collection_path(object)?;
        let name = object["metadata"]["name"].as_str().ok_or_else(|| HarnessError(format!("object without metadata.name: {object}")))?;
        match self.request("POST", &collection, Some(object))? {
            (200..=299, _) => Ok(()),
            (409, _) => {
                let current = self.ok("GET", &format!("{collection}/{name}"), None)?;
                let mut replaced = object.clone();
                replaced["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
                self.ok("PUT", &format!("{collection}/{name}"), Some(&replaced)).map(drop)
            }
            (code, v) => Err(HarnessError(format!("creating {} {name}: {code}: {v}", object["kind"]))),
        }
    }

    /// Deletes `object` (by kind, namespace and name).
    pub fn delete(&self, object: &Value) -> Result<(), HarnessError> {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        self.ok("DELETE", &format!("{}/{name}", collection_path(object)?), None).map(drop)
    }

    /// A request as cluster admin; returns the status code and the JSON body (Null when empty).
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), HarnessError> {
        let (code, text) = self.raw(method, path, body)?;
        let value = if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Ok((code, value))
    }

    /// [`KubeApi::request`], failing unless the status is 2xx.
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, HarnessError> {
        match self.request(method, path, body)? {
            (200..=299, v) => Ok(v),
            (code, v) => Err(HarnessError(format!("{method} {path}: {code}: {v}"))),
        }
    }

    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String), HarnessError> {
        let mut cmd = Command::new("curl");
        crate::netns::enter_path_on_spawn(&self.netns, &mut cmd);
        cmd.args(["-sS", "--max-time", "20", "-X", method, "-w", "\n%{http_code}"]);
        cmd.arg("--cacert").arg(self.dir.join("pki/ca.pem"));
        cmd.args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")]);
        let content_type = match method {
            "PATCH" => "application/merge-patch+json",
            _ => "application/json",
        };
        if body.is_some() {
            // On stdin: a CRD is larger than an argument may be.
            cmd.args(["-H", &format!("Content-Type: {content_type}"), "--data-binary", "@-"]);
        }
        cmd.arg(format!("https://127.0.0.1:{API_PORT}{path}"));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let (Some(body), Some(mut stdin)) = (body, child.stdin.take()) {
            use std::io::Write;
            stdin.write_all(body.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        match code.trim().parse::<u16>() {
            Ok(code) if code != 0 => Ok((code, body.to_string())),
            _ => Err(HarnessError(format!("curl {method} {path}: {}", String::from_utf8_lossy(&out.stderr).trim()))),
        }
    }

    /// Creates a namespace with `labels`.
    pub fn create_namespace(&self, name: &str, labels: Value) -> Result<(), HarnessError> {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
        self.ok("POST", "/api/v1/namespaces", Some(&ns)).map(drop)
    }

    /// Merges `metadata` (labels, annotations) into a namespace.
    pub fn patch_namespace(&self, name: &str, metadata: Value) -> Result<(), HarnessError> {
        self.ok("PATCH", &format!("/api/v1/namespaces/{name}"), Some(&json!({"metadata": metadata}))).map(drop)
    }

    /// Creates a Pod bound to `node_name`, as the scheduler would have; `spec` is merged over a one-container
    /// default. Returns its uid.
    pub fn create_pod(&self, namespace: &str, name: &str, node_name: &str, metadata: Value, spec: Value) -> Result<String, HarnessError> {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node_name, "containers": [{"name": "app", "image": "app:test"}]},
        });
        merge(&mut pod["metadata"], metadata);
        merge(&mut pod["spec"], spec);
        let created = self.ok("POST", &format!("/api/v1/namespaces/{namespace}/pods"), Some(&pod))?;
        created["metadata"]["uid"].as_str().map(str::to_string).ok_or_else(|| HarnessError(format!("created pod without uid: {created}")))
    }

    /// Plays kubelet for a new pod: the Pod object bound to the cluster's node, its sandbox made by libcni
    /// (weft-cni's ADD included) with the API's uid, then its status with the sandbox's address.
    pub fn run_pod(&self, cluster: &Cluster, namespace: &str, name: &str, metadata: Value, spec: Value) -> Result<Pod, HarnessError> {
        self.run_pod_timed(cluster, namespace, name, metadata, spec).map(|(pod, _)| pod)
    }

    /// [`KubeApi::run_pod`], also returning the time libcni's ADD took, in microseconds.
    pub fn run_pod_timed(&self, cluster: &Cluster, namespace: &str, name: &str, metadata: Value, spec: Value) -> Result<(Pod, u64), HarnessError> {
        let uid = self.create_pod(namespace, name, cluster.id(), metadata, spec)?;
        let opts = PodOptions { uid: Some(uid), ..PodOptions::default() };
        let (pod, out) = cluster.add_pod_with(namespace, name, &opts).map_err(|e| HarnessError(format!("CNI ADD of {namespace}/{name}: {}", e.message())))?;
        self.set_pod_running(namespace, name, pod.ip.into())?;
        Ok((pod, out.elapsed_us))
    }

    /// Writes the pod's status as kubelet does once its sandbox has an address.
    pub fn set_pod_running(&self, namespace: &str, name: &str, ip: std::net::IpAddr) -> Result<(), HarnessError> {
        let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}});
        self.ok("PATCH", &format!("/api/v1/namespaces/{namespace}/pods/{name}/status"), Some(&status)).map(drop)
    }

    /// Merges `metadata` (labels, annotations) into a pod.
    pub fn patch_pod(&self, namespace: &str, name: &str, metadata: Value) -> Result<(), HarnessError> {
        self.ok("PATCH", &format!("/api/v1/namespaces/{namespace}/pods/{name}"), Some(&json!({"metadata": metadata}))).map(drop)
    }

    pub fn get_pod(&self, namespace: &str, name: &str) -> Result<Value, HarnessError> {
        self.ok("GET", &format!("/api/v1/namespaces/{namespace}/pods/{name}"), None)
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), HarnessError> {
        self.ok("DELETE", &format!("/api/v1/namespaces/{namespace}/pods/{name}?gracePeriodSeconds=0"), None).map(drop)
    }

    /// The agent's namespace, ServiceAccount and the ClusterRole (with its binding) from `deploy/`.
    fn grant_agent(&self) -> Result<(), HarnessError> {
        self.create_namespace(AGENT_NAMESPACE, json!({}))?;
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": AGENT_SERVICE_ACCOUNT, "namespace": AGENT_NAMESPACE}});
        self.ok("POST", &format!("/api/v1/namespaces/{AGENT_NAMESPACE}/serviceaccounts"), Some(&sa))?;
        for doc in crate::manifests::documents()? {
            let kind = doc["kind"].as_str().unwrap_or_default();
            let path = match kind {
                "ClusterRole" => "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                "ClusterRoleBinding" => "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                _ => continue,
            };
            self.ok("POST", path, Some(&doc))?;
        }
        Ok(())
    }

    /// The API server's log, for failure messages.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("kube-apiserver.log")
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // The API server first: it must not see its store vanish.
        drop(self.apiserver.take());
        drop(self.etcd.take());
    }
}

/// The API path of the collection `object` belongs to: core kinds under `/api/v1`, others under
/// `/apis/<group>/<version>`; the plural is the lower-cased kind plus `s` (or `es`), which holds for every kind
/// the tests create.
fn collection_path(object: &Value) -> Result<String, HarnessError> {
    let api_version = object["apiVersion"].as_str().ok_or_else(|| HarnessError(format!("object without apiVersion: {object}")))?;
    let kind = object["kind"].as_str().ok_or_else(|| HarnessError(format!("object without kind: {object}")))?.to_ascii_lowercase();
    let plural = match kind.ends_with('s') || kind.ends_with("ch") {
        true => format!("{kind}es"),
        false if kind.ends_with('y') && !kind.ends_with("ay") => format!("{}ies", &kind[..kind.len() - 1]),
        false => format!("{kind}s"),
    };
    let root = match api_version.contains('/') {
        true => format!("/apis/{api_version}"),
        false => format!("/api/{api_version}"),
    };
    Ok(match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{root}/namespaces/{ns}/{plural}"),
        None => format!("{root}/{plural}"),
    })
}

/// Merges the keys of `patch` into `target` (objects recursively).
fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

/// A CA, the API server's certificate for 127.0.0.1, the service-account signing key and the token file.
fn write_pki(dir: &Path) -> Result<(), HarnessError> {
    let e = |e: rcgen::Error| HarnessError(format!("test PKI: {e}"));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "weft test kubernetes ca");
    let ca_key = KeyPair::generate().map_err(e)?;
    let ca = ca_params.self_signed(&ca_key).map_err(e)?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(e)?;
    params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver");
    let key = KeyPair::generate().map_err(e)?;
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(e)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("apiserver.pem"), cert.pem())?;
    std::fs::write(dir.join("apiserver.key"), key.serialize_pem())?;
    let sa = KeyPair::generate().map_err(e)?;
    std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    let agent = format!("system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}");
    let tokens = format!(
        "{ADMIN_TOKEN},weft-test-admin,admin,system:masters\n{AGENT_TOKEN},{agent},agent,\"system:serviceaccounts,system:serviceaccounts:{AGENT_NAMESPACE},system:authenticated\"\n"
    );
    std::fs::write(dir.join("tokens.csv"), tokens)?;
    Ok(())
}
