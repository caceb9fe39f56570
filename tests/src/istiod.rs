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
//!
//! [`World`] is what the live-istiod suites share: the cluster, its API server, istiod and `weft-agent run`
//! driven by it; [`serve_http`] and [`service`] give them apps and Services.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::agent::{Agent, ADMIN};
use crate::cluster::{Cluster, ClusterOptions, Pod, WeftEntry};
use crate::gotools::{istio_crds, ISTIOD};
use crate::kube::{KubeApi, AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT};
use crate::netns::NetNs;
use crate::tools::{bin_path, harness_dir};
use crate::traffic::{http_request_with, HttpResponse};
use crate::util::{self, ChildGuard, HarnessError};

pub const ISTIO_NAMESPACE: &str = "istio-system";
/// istiod's plaintext and secured xDS, inside the node's namespace.
pub const XDS_PLAINTEXT: &str = "127.0.0.1:15010";
pub const XDS_SECURED: &str = "127.0.0.1:15012";
const HTTP_PORT: u16 = 8080;

/// The MeshConfig istiod's Helm chart renders with its default values (`helm template` of the module's
/// `manifests/charts/istio-control/istio-discovery`): what a default install's sidecars are configured by; plus
/// access logs on stdout and an OpenTelemetry tracing provider (`otel`, which a Telemetry resource turns on).
const MESH_CONFIG: &str = "\
accessLogFile: /dev/stdout
extensionProviders:
- name: otel
  opentelemetry:
    service: otel-collector.shop.svc.cluster.local
    port: 4317
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

/// The header [`serve_http`] answers with the request's `x-forwarded-client-cert` in: what the app behind a
/// sidecar was told about its caller.
pub const ECHO_XFCC: &str = "x-echo-xfcc";

/// What the servers saw: `<server> <host> <path>` per request.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// An HTTP/1.1 server in `pod` answering every request with 200 and the body `<name> <path>`; a request's
/// `x-forwarded-client-cert` comes back in the response header [`ECHO_XFCC`]. Two paths behave otherwise, for
/// the tests of timeouts, retries and outlier detection: `/slow…` is answered after 3 s, `/flaky…` with 503 and
/// 200 in turn, `/fail-<name>…` with 503 by the server called `<name>` only.
/// Every request is recorded in `seen`.
pub fn serve_http(pod: &Pod, port: u16, name: &'static str, seen: &Seen) -> Result<(), HarnessError> {
    let listener = pod.netns.tcp_listen(("0.0.0.0", port)).map_err(|e| HarnessError(format!("{}: listening on {port}: {e}", pod.name)))?;
    let (seen, flaky) = (std::sync::Arc::clone(seen), std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (seen, flaky) = (std::sync::Arc::clone(&seen), std::sync::Arc::clone(&flaky));
            std::thread::spawn(move || answer(stream, name, &seen, &flaky));
        }
    });
    Ok(())
}

fn answer(mut stream: std::net::TcpStream, name: &str, seen: &Seen, flaky: &std::sync::atomic::AtomicU64) {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&received);
    let path = head.split_whitespace().nth(1).unwrap_or("?");
    let field = |name: &str| head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()));
    seen.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{name} {} {path}", field("host").unwrap_or("?")));
    if path.starts_with("/slow") {
        std::thread::sleep(Duration::from_secs(3));
    }
    let failing = path.starts_with(&format!("/fail-{name}"));
    let status = match failing || (path.starts_with("/flaky") && flaky.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2 == 0) {
        true => "503 Service Unavailable",
        false => "200 OK",
    };
    let echo = field("x-forwarded-client-cert").map(|v| format!("{ECHO_XFCC}: {v}\r\n")).unwrap_or_default();
    let body = format!("{name} {path}");
    let _ = write!(stream, "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{echo}connection: close\r\n\r\n{body}", body.len());
}

/// The value of `header` in a response's head, if present.
pub fn header<'a>(response: &'a HttpResponse, header: &str) -> Option<&'a str> {
    response.head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(header)).map(|(_, v)| v.trim()))
}

/// A Service `namespace/name` of `port` → `target_port` over `pods` (selector `app: <name>`), with the
/// EndpointSlice the endpoint controller would write (no controller manager runs here). Returns its cluster IP.
pub fn service(api: &KubeApi, namespace: &str, name: &str, port: u16, target_port: u16, pods: &[&Pod]) -> Result<String, HarnessError> {
    service_ports(api, namespace, name, &[(&format!("http-{port}"), port, target_port)], pods)
}

/// [`service`] with several `(name, port, target port)`s (Istio reads each port's protocol from its name).
pub fn service_ports(api: &KubeApi, namespace: &str, name: &str, ports: &[(&str, u16, u16)], pods: &[&Pod]) -> Result<String, HarnessError> {
    let svc_ports: Vec<Value> = ports.iter().map(|(n, p, t)| json!({"name": n, "port": p, "targetPort": t})).collect();
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": {"selector": {"app": name}, "ports": svc_ports}});
    api.apply(&svc)?;
    let created = api.ok("GET", &format!("/api/v1/namespaces/{namespace}/services/{name}"), None)?;
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": p.name, "namespace": namespace, "uid": p.uid}}))
        .collect();
    let slice_ports: Vec<Value> = ports.iter().map(|(n, _, t)| json!({"name": n, "port": t, "protocol": "TCP"})).collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": namespace, "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "weft-tests"}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": slice_ports,
    });
    api.apply(&slice)?;
    created["spec"]["clusterIP"].as_str().map(str::to_string).ok_or_else(|| HarnessError(format!("Service {namespace}/{name} without a clusterIP: {created}")))
}

/// A GET from `from` to `to` (HTTP/1.1, `host: <host>`) with `headers`: the response, or why there was none.
pub fn get(from: &Pod, to: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
    let stream = from.netns.tcp_connect(to, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    http_request_with(stream, "GET", host, path, headers).map_err(|e| e.to_string())
}

/// The live-istiod world: the netns cluster with weft-cni, its API server, istiod and `weft-agent run` taking
/// its pods' certificates from istiod's CA and their configuration from istiod's secured xDS.
pub struct World {
    pub cluster: Cluster,
    pub api: KubeApi,
    pub istiod: Istiod,
    pub agent: Agent,
}

impl World {
    /// Starts everything; `mesh_namespaces` are created labelled `istio-injection=enabled` before the agent
    /// starts.
    pub fn start(name_prefix: &str, mesh_namespaces: &[&str]) -> Result<World, HarnessError> {
        let weft_cni = bin_path("weft-cni")?;
        let cluster = Cluster::with_options(name_prefix, ClusterOptions::with_weft(WeftEntry::new(weft_cni, "run/cni.sock")))?;
        let api = KubeApi::start(cluster.node())?;
        let istiod = Istiod::start(cluster.node(), &api)?;
        let token = istiod.agent_token(&api, cluster.id())?.display().to_string();
        let root = istiod.root_cert().display().to_string();
        for ns in mesh_namespaces {
            api.create_namespace(ns, json!({"istio-injection": "enabled"}))?;
        }
        let kubeconfig = api.agent_kubeconfig()?.display().to_string();
        let args = [
            "--node-name", cluster.id(), "--kubeconfig", &kubeconfig,
            "--ca", "istiod", "--ca-address", XDS_SECURED, "--istiod-root-cert", &root, "--istiod-token-file", &token,
            "--xds-address", XDS_SECURED, "--xds-tls", "true",
        ];
        let agent = Agent::start_with_args(&cluster, "iptables", ADMIN, &args)?;
        Ok(World { cluster, api, istiod, agent })
    }

    /// Applies every document of `tests/istio/<file>`.
    pub fn apply(&self, file: &str) -> Result<(), HarnessError> {
        resources(file)?.iter().try_for_each(|doc| self.api.apply(doc))
    }

    /// Deletes every document of `tests/istio/<file>`.
    pub fn delete(&self, file: &str) -> Result<(), HarnessError> {
        resources(file)?.iter().try_for_each(|doc| self.api.delete(doc))
    }

    /// The agent's status, the end of its log and where istiod's log is: for failure messages.
    pub fn diagnostics(&self) -> String {
        let status = self.agent.status().map(|s| s.to_string()).unwrap_or_default();
        let log = std::fs::read_to_string(self.cluster.work_dir().join("weft-agent.log")).unwrap_or_default();
        let notable: Vec<&str> = log.lines().filter(|l| [" WARN ", " ERROR ", "failed", "mirror", "refused"].iter().any(|w| l.contains(w))).take(40).collect();
        let tail: Vec<&str> = log.lines().rev().filter(|l| !l.contains("frame=")).take(40).collect();
        format!(
            "status: {status}\nagent log, notable lines:\n{}\nagent log (last lines, newest first):\n{}\nistiod log: {}",
            notable.join("\n"),
            tail.join("\n"),
            self.istiod.log_path().display()
        )
    }

    /// With `UPDATE_GOLDEN`, istiod's configuration of `pods` as the regression corpus
    /// (`tests/istio/corpus/<prefix><pod>.json`).
    pub fn save_corpus(&self, prefix: &str, pods: &[&Pod]) -> Result<(), HarnessError> {
        if std::env::var_os("UPDATE_GOLDEN").is_none() {
            return Ok(());
        }
        for pod in pods {
            let dump = self.istiod.debug(&format!("/debug/config_dump?proxyID={}.{}", pod.name, pod.namespace))?;
            let path = crate::workspace_root().join(format!("tests/istio/corpus/{prefix}{}.json", pod.name));
            std::fs::write(path, serde_json::to_string_pretty(&dump).map_err(|e| HarnessError(e.to_string()))?)?;
        }
        Ok(())
    }

    /// Every xDS response the agent got was accepted, and every captured pod is synced.
    pub fn check_synced(&self) -> Result<(), String> {
        let log = std::fs::read_to_string(self.cluster.work_dir().join("weft-agent.log")).unwrap_or_default();
        let nacks: Vec<&str> = log.lines().filter(|l| l.contains("NACK")).collect();
        if !nacks.is_empty() {
            return Err(format!("the agent refused istiod's configuration:\n{}", nacks.join("\n")));
        }
        let status = self.agent.status().map_err(|e| e.to_string())?;
        for pod in status["pods"].as_array().into_iter().flatten() {
            for (kind, state) in pod["xds"].as_object().into_iter().flatten() {
                if !(state == "SYNCED" || (kind == "SDS" && state == "NOT SENT")) {
                    return Err(format!("{}/{}: {kind} {state}", pod["namespace"], pod["name"]));
                }
            }
        }
        Ok(())
    }

    /// The proxy ids (`<pod>.<namespace>`) istiod's `/debug/syncz` lists as connected.
    pub fn synced_proxies(&self) -> Result<std::collections::BTreeSet<String>, HarnessError> {
        let syncz = self.istiod.debug("/debug/syncz")?;
        Ok(syncz.as_array().into_iter().flatten().filter_map(|p| p["proxy"].as_str().map(str::to_string)).collect())
    }
}
