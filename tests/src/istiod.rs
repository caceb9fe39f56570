//! A real istiod for the tests: `pilot-discovery` built from the `istio.io/istio` Go module by
//! `cargo xtask setup`, run as in a cluster against the tests' real API server ([`KubeApi`]) inside the node's
//! network namespace. Its CRDs come from the same module; it is configured only with Istio resources and
//! Kubernetes objects (Services, EndpointSlices, Pods) the test creates, as users and controllers would.
//!
//! Ports, on the node's 127.0.0.1: 15010 plaintext xDS, 15012 xDS and CA over TLS, 8080 debug (`/debug/syncz`,
//! `/debug/connections`, `/ready`).
//!
//! The agent authenticates to istiod's CA as ztunnel does: a token of its ServiceAccount bound to its Pod
//! ([`Istiod::agent_token`]), trusted by `CA_TRUSTED_NODE_ACCOUNTS`, so it may ask for the identities of the pods
//! on its node.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::gotools::{istio_crds, ISTIOD};
use crate::kube::{KubeApi, AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT};
use crate::netns::NetNs;
use crate::tools::harness_dir;
use crate::util::{self, ChildGuard, HarnessError};

pub const ISTIO_NAMESPACE: &str = "istio-system";
/// istiod's plaintext and secured xDS, inside the node's namespace.
pub const XDS_PLAINTEXT: &str = "127.0.0.1:15010";
pub const XDS_SECURED: &str = "127.0.0.1:15012";
const HTTP_PORT: u16 = 8080;

/// The MeshConfig istiod's Helm chart renders with its default values (`helm template` of the module's
/// `manifests/charts/istio-control/istio-discovery`): what a default install's sidecars are configured by.
const MESH_CONFIG: &str = "\
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
defaultProviders:
  metrics:
  - prometheus
enablePrometheusMerge: true
rootNamespace: istio-system
trustDomain: cluster.local
";

/// A running istiod; stops when dropped.
pub struct Istiod {
    netns: PathBuf,
    dir: PathBuf,
    child: ChildGuard,
}

impl Istiod {
    /// Installs Istio's CRDs in `api`, starts istiod in `node`'s namespace and waits until it is ready and has
    /// published its root certificate.
    pub fn start(node: &NetNs, api: &KubeApi) -> Result<Istiod, HarnessError> {
        let binary = ISTIOD.find().map_err(HarnessError)?;
        install_crds(api)?;
        api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ISTIO_NAMESPACE}}))?;
        let dir = harness_dir().join(format!("istiod-{}", node.name()));
        let _ = std::fs::remove_dir_all(&dir);
        // istiod reads its MeshConfig from ./etc/istio/config/mesh and writes ./var/run/secrets/… under its cwd.
        std::fs::create_dir_all(dir.join("etc/istio/config"))?;
        std::fs::write(dir.join("etc/istio/config/mesh"), MESH_CONFIG)?;
        let log = std::fs::File::create(dir.join("istiod.log"))?;
        let mut cmd = node.command(binary);
        cmd.current_dir(&dir);
        cmd.args(["discovery", "--kubeconfig"]).arg(api.admin_kubeconfig()?);
        cmd.arg(format!("--httpAddr=127.0.0.1:{HTTP_PORT}"));
        cmd.args([&format!("--grpcAddr={XDS_PLAINTEXT}"), &format!("--secureGRPCAddr={XDS_SECURED}")]);
        cmd.args(["--httpsAddr=127.0.0.1:15017", "--monitoringAddr=127.0.0.1:15014", "--domain=cluster.local", "--log_output_level=default:warn"]);
        cmd.envs([
            ("POD_NAMESPACE", ISTIO_NAMESPACE),
            ("POD_NAME", "istiod-0"),
            ("REVISION", "default"),
            ("CLUSTER_ID", "Kubernetes"),
            // The agent asks for its pods' certificates as ztunnel does.
            ("CA_TRUSTED_NODE_ACCOUNTS", &format!("{AGENT_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}")),
            ("PILOT_ENABLE_GATEWAY_API", "false"),
            ("PILOT_ENABLE_GATEWAY_API_STATUS", "false"),
            ("PILOT_ENABLE_GATEWAY_API_DEPLOYMENT_CONTROLLER", "false"),
            // No webhooks or validation configurations exist to patch here.
            ("VALIDATION_WEBHOOK_CONFIG_NAME", ""),
            ("INJECTION_WEBHOOK_CONFIG_NAME", ""),
        ]);
        cmd.stdout(Stdio::null()).stderr(log);
        let mut child = ChildGuard::new(cmd.spawn()?, "istiod");
        child.set_grace(Duration::from_secs(5));
        let mut istiod = Istiod { netns: node.path().to_path_buf(), dir, child };
        istiod.wait_ready(api)?;
        Ok(istiod)
    }

    fn wait_ready(&mut self, api: &KubeApi) -> Result<(), HarnessError> {
        let log = self.log_path();
        util::wait_for_with("istiod /ready", Duration::from_secs(120), Duration::from_millis(250), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("istiod exited ({status}); see {}", log.display()));
            }
            match self.http("/ready") {
                Ok((200, _)) => Ok(()),
                Ok((code, body)) => Err(format!("{code}: {body}")),
                Err(e) => Err(e.to_string()),
            }
        })?;
        let root = util::wait_for("istiod's root certificate (ConfigMap istio-ca-root-cert)", Duration::from_secs(60), || {
            match api.request("GET", &format!("/api/v1/namespaces/{ISTIO_NAMESPACE}/configmaps/istio-ca-root-cert"), None) {
                Ok((200, cm)) => cm["data"]["root-cert.pem"].as_str().map(str::to_string).ok_or_else(|| format!("no root-cert.pem in {cm}")),
                Ok((code, body)) => Err(format!("{code}: {body}")),
                Err(e) => Err(e.to_string()),
            }
        })?;
        std::fs::write(self.root_cert(), root)?;
        Ok(())
    }

    /// istiod's root certificate (PEM file), as istiod publishes it to every namespace.
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("istiod.log")
    }

    /// GET on istiod's HTTP port: status and body.
    pub fn http(&self, path: &str) -> Result<(u16, String), HarnessError> {
        let mut cmd = Command::new("curl");
        crate::netns::enter_path_on_spawn(&self.netns, &mut cmd);
        cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"]).arg(format!("http://127.0.0.1:{HTTP_PORT}{path}"));
        let out = cmd.output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        match code.trim().parse::<u16>() {
            Ok(code) if code != 0 => Ok((code, body.to_string())),
            _ => Err(HarnessError(format!("GET istiod {path}: {}", String::from_utf8_lossy(&out.stderr).trim()))),
        }
    }

    /// A JSON debug endpoint of istiod (`/debug/syncz`, `/debug/connections`, `/debug/config_dump?proxyID=…`).
    pub fn debug(&self, path: &str) -> Result<Value, HarnessError> {
        match self.http(path)? {
            (200, body) => serde_json::from_str(&body).map_err(|e| HarnessError(format!("istiod {path}: {e}: {body}"))),
            (code, body) => Err(HarnessError(format!("istiod {path}: {code}: {body}"))),
        }
    }

    /// The agent's credential for istiod's CA, as the DaemonSet's projected token gives it: a token of the
    /// agent's ServiceAccount for audience `istio-ca`, bound to an agent Pod on `node_name` (istiod checks that
    /// the pods it issues identities for run on the caller's node). Written to a 0600 file.
    pub fn agent_token(&self, api: &KubeApi, node_name: &str) -> Result<PathBuf, HarnessError> {
        let name = format!("weft-agent-{node_name}");
        let uid = api.create_pod(AGENT_NAMESPACE, &name, node_name, json!({}), json!({"hostNetwork": true, "serviceAccountName": AGENT_SERVICE_ACCOUNT}))?;
        let request = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["istio-ca"], "expirationSeconds": 43200, "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}},
        });
        let path = format!("/api/v1/namespaces/{AGENT_NAMESPACE}/serviceaccounts/{AGENT_SERVICE_ACCOUNT}/token");
        let answer = api.ok("POST", &path, Some(&request))?;
        let token = answer["status"]["token"].as_str().ok_or_else(|| HarnessError(format!("TokenRequest without a token: {answer}")))?;
        let file = self.dir.join("agent-token");
        write_private(&file, token.as_bytes())?;
        Ok(file)
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), HarnessError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    file.write_all(data)?;
    Ok(())
}

/// Istio's CRDs, created and established (their resources served) before istiod starts.
fn install_crds(api: &KubeApi) -> Result<(), HarnessError> {
    let text = std::fs::read_to_string(istio_crds().map_err(HarnessError)?)?;
    let mut plurals = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let crd: Value = serde::Deserialize::deserialize(doc).map_err(|e| HarnessError(format!("Istio CRDs: {e}")))?;
        if crd.is_null() {
            continue;
        }
        api.apply(&crd)?;
        if let Some(name) = crd["metadata"]["name"].as_str() {
            plurals.push(name.to_string());
        }
    }
    for name in plurals {
        util::wait_for(&format!("CRD {name} established"), Duration::from_secs(60), || {
            let crd = api.ok("GET", &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"), None).map_err(|e| e.to_string())?;
            let established = crd["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Established" && c["status"] == "True");
            if established { Ok(()) } else { Err("not yet".into()) }
        })?;
    }
    Ok(())
}

/// Documents of a YAML file under `tests/istio/`, as users write them.
pub fn resources(file: &str) -> Result<Vec<Value>, HarnessError> {
    let path = crate::workspace_root().join("tests/istio").join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| HarnessError(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc).map_err(|e| HarnessError(format!("{}: {e}", path.display())))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}
