//! The live-istiod suite: a real istiod (built from the `istio.io/istio` Go module by `cargo xtask setup`) runs
//! against the tests' real API server and drives `weft-agent run` in the netns cluster. It is configured only
//! with Kubernetes objects (a Namespace labelled `istio-injection=enabled`, Pods, a Service and its
//! EndpointSlice) and Istio resources as users write them (`tests/istio/*.yaml`); every behaviour is observed as
//! traffic between pods. The agent gets its pods' certificates from istiod's CA (as ztunnel does) and opens each
//! pod's xDS stream on istiod's secured port with that pod's certificate. Every response of istiod is ACKed
//! (the suite fails on a NACK), and istiod's own `/debug/syncz` lists every captured pod as synced.
//!
//! `UPDATE_GOLDEN=1` also saves istiod's `/debug/config_dump` of each pod as the regression corpus
//! (`tests/istio/corpus/`, which `cargo test -p weft-agent --lib istiod_corpus` must accept whole).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use weft_tests::agent::{Agent, ADMIN};
use weft_tests::istiod::{self, Istiod, XDS_SECURED};
use weft_tests::kube::KubeApi;
use weft_tests::traffic::{echo, http_request_with, EchoServer, HttpResponse};
use weft_tests::{bin_path, wait_for, Cluster, ClusterOptions, Pod, WeftEntry};

const NS: &str = "shop";
const OUTSIDE: &str = "outside";

/// What the servers saw: `<server> <host> <path>` per request.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// An HTTP/1.1 server in `pod` answering `<name> <path>`, except `/slow…` (answered after 3 s) and `/flaky…`
/// (503 and 200 in turn); every request is recorded in `seen`.
fn serve_http(pod: &Pod, port: u16, name: &'static str, seen: &Seen) {
    let listener = pod.netns.tcp_listen(("0.0.0.0", port)).unwrap();
    let (seen, flaky) = (std::sync::Arc::clone(seen), std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (seen, flaky) = (std::sync::Arc::clone(&seen), std::sync::Arc::clone(&flaky));
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("?").to_string();
                let host = head.lines().find_map(|l| l.strip_prefix("host: ").or_else(|| l.strip_prefix("Host: "))).unwrap_or("?").to_string();
                seen.lock().unwrap().push(format!("{name} {host} {path}"));
                if path.starts_with("/slow") {
                    std::thread::sleep(Duration::from_secs(3));
                }
                let status = match path.starts_with("/flaky") && flaky.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2 == 0 {
                    true => "503 Service Unavailable",
                    false => "200 OK",
                };
                let body = format!("{name} {path}");
                let _ = write!(stream, "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            });
        }
    });
}

/// A Service named `name` selecting `app: name` with `ports` (`(name, port, target port)`, Istio's protocol
/// from the port name), with the EndpointSlice the endpoint controller would write (no controller manager runs
/// here). Returns its cluster IP.
fn service(api: &KubeApi, name: &str, ports: &[(&str, u16, u16)], pods: &[&Pod]) -> String {
    let svc_ports: Vec<Value> = ports.iter().map(|(n, p, t)| json!({"name": n, "port": p, "targetPort": t})).collect();
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": {"selector": {"app": name}, "ports": svc_ports}});
    api.apply(&svc).unwrap();
    let created = api.ok("GET", &format!("/api/v1/namespaces/{NS}/services/{name}"), None).unwrap();
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": p.name, "namespace": NS, "uid": p.uid}}))
        .collect();
    let slice_ports: Vec<Value> = ports.iter().map(|(n, _, t)| json!({"name": n, "port": t, "protocol": "TCP"})).collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": NS, "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "weft-tests"}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": slice_ports,
    });
    api.apply(&slice).unwrap();
    created["spec"]["clusterIP"].as_str().unwrap().to_string()
}

/// The test's world: the cluster, its API server, istiod, the agent and the pods.
struct Mesh {
    cluster: Cluster,
    api: KubeApi,
    istiod: Istiod,
    agent: Agent,
    pods: BTreeMap<&'static str, Pod>,
    /// The server Service's cluster IP and HTTP port.
    server: SocketAddr,
    /// Its TCP port (an echo server on the pods' 9000).
    server_tcp: SocketAddr,
    /// What the server pods saw.
    seen: Seen,
    _echo: Vec<EchoServer>,
}

impl Mesh {
    fn start() -> Mesh {
        let cluster = Cluster::with_options("kist", ClusterOptions::with_weft(WeftEntry::new(bin_path("weft-cni").unwrap(), "run/cni.sock"))).unwrap();
        let api = KubeApi::start(cluster.node()).unwrap();
        let istiod = Istiod::start(cluster.node(), &api).unwrap();
        let token = istiod.agent_token(&api, cluster.id()).unwrap().display().to_string();
        let root = istiod.root_cert().display().to_string();
        api.create_namespace(NS, json!({"istio-injection": "enabled"})).unwrap();
        api.create_namespace(OUTSIDE, json!({})).unwrap();
        apply(&api, "strict.yaml");
        let kubeconfig = api.agent_kubeconfig().unwrap().display().to_string();
        let args = [
            "--node-name", cluster.id(), "--kubeconfig", &kubeconfig,
            "--ca", "istiod", "--ca-address", XDS_SECURED, "--istiod-root-cert", &root, "--istiod-token-file", &token,
            "--xds-address", XDS_SECURED, "--xds-tls", "true",
        ];
        let agent = Agent::start_with_args(&cluster, "iptables", ADMIN, &args).unwrap();
        let mut pods = BTreeMap::new();
        let workloads: [(&'static str, &str, &str, &str, &str); 5] = [
            ("client", NS, "client", "client", "v1"),
            ("other", NS, "other", "other", "v1"),
            ("server-v1", NS, "server", "server", "v1"),
            ("server-v2", NS, "server", "server", "v2"),
            ("outsider", OUTSIDE, "outsider", "default", "v1"),
        ];
        for (name, ns, app, sa, version) in workloads {
            let pod = api.run_pod(&cluster, ns, name, json!({"labels": {"app": app, "version": version}}), json!({"serviceAccountName": sa})).unwrap();
            pods.insert(name, pod);
        }
        let seen = Seen::default();
        let mut _echo = Vec::new();
        for name in ["server-v1", "server-v2"] {
            serve_http(&pods[name], 8080, name, &seen);
            _echo.push(EchoServer::start(&pods[name].netns, 9000).unwrap());
        }
        serve_http(&pods["outsider"], 8080, "outsider", &seen);
        let ip = service(&api, "server", &[("http-80", 80, 8080), ("tcp-9000", 9000, 9000)], &[&pods["server-v1"], &pods["server-v2"]]);
        let (server, server_tcp) = (format!("{ip}:80").parse().unwrap(), format!("{ip}:9000").parse().unwrap());
        Mesh { cluster, api, istiod, agent, pods, server, server_tcp, seen, _echo }
    }

    /// A GET from pod `from` to `to` with `headers`: the response, or why there was none.
    fn get_to(&self, from: &str, to: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
        self.get_host(from, to, "server", path, headers)
    }

    /// [`Mesh::get_to`] with the request's `host`.
    fn get_host(&self, from: &str, to: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
        let netns = &self.pods[from].netns;
        let stream = netns.tcp_connect(to, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
        http_request_with(stream, "GET", host, path, headers).map_err(|e| e.to_string())
    }

    /// A GET from `from` to the server Service.
    fn get(&self, from: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
        self.get_to(from, self.server, path, headers)
    }

    /// Waits until a GET from `from` answers as `expected` says (istiod pushes asynchronously).
    fn eventually(&self, what: &str, from: &str, path: &str, headers: &[(&str, &str)], expected: impl Fn(&HttpResponse) -> bool) -> HttpResponse {
        let outcome = wait_for(what, Duration::from_secs(60), || match self.get(from, path, headers) {
            Ok(r) if expected(&r) => Ok(r),
            Ok(r) => Err(format!("{} {}", r.status, r.body)),
            Err(e) => Err(e),
        });
        outcome.unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    /// Bodies of `n` GETs from `from` (failures as `error …`).
    fn bodies(&self, from: &str, path: &str, headers: &[(&str, &str)], n: usize) -> BTreeSet<String> {
        (0..n).map(|_| self.get(from, path, headers).map_or_else(|e| format!("error {e}"), |r| format!("{} {}", r.status, r.body))).collect()
    }

    fn diagnostics(&self) -> String {
        if let Ok(dump) = self.istiod.debug("/debug/config_dump?proxyID=client.shop") {
            let _ = std::fs::write(self.cluster.work_dir().join("../istiod-client-dump.json"), dump.to_string());
        }
        let status = self.agent.status().map(|s| s.to_string()).unwrap_or_default();
        let log = std::fs::read_to_string(self.cluster.work_dir().join("weft-agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().filter(|l| !l.contains("frame=")).take(40).collect();
        let notable: Vec<&str> = log.lines().filter(|l| [" WARN ", " ERROR ", "failed", "mirror", "refused"].iter().any(|w| l.contains(w))).take(40).collect();
        format!(
            "status: {status}\nagent log, notable lines:\n{}\nagent log (last lines, newest first):\n{}\nistiod log: {}",
            notable.join("\n"),
            tail.join("\n"),
            self.istiod.log_path().display()
        )
    }

    /// With `UPDATE_GOLDEN`, istiod's configuration of the client and a server as the regression corpus.
    fn save_corpus(&self, prefix: &str) {
        if std::env::var_os("UPDATE_GOLDEN").is_none() {
            return;
        }
        for name in ["client", "server-v1"] {
            let pod = &self.pods[name];
            let dump = self.istiod.debug(&format!("/debug/config_dump?proxyID={}.{}", pod.name, pod.namespace)).unwrap();
            let path = weft_tests::workspace_root().join(format!("tests/istio/corpus/{prefix}{name}.json"));
            std::fs::write(path, serde_json::to_string_pretty(&dump).unwrap()).unwrap();
        }
    }

    /// Every xDS response the agent got was accepted, and every captured pod is synced.
    fn assert_no_nack(&self) {
        let log = std::fs::read_to_string(self.cluster.work_dir().join("weft-agent.log")).unwrap_or_default();
        let nacks: Vec<&str> = log.lines().filter(|l| l.contains("NACK")).collect();
        assert!(nacks.is_empty(), "the agent refused istiod's configuration:\n{}", nacks.join("\n"));
        let status = self.agent.status().unwrap();
        for pod in status["pods"].as_array().into_iter().flatten() {
            for (kind, state) in pod["xds"].as_object().into_iter().flatten() {
                assert!(state == "SYNCED" || (kind == "SDS" && state == "NOT SENT"), "{}/{}: {kind} {state}", pod["namespace"], pod["name"]);
            }
        }
    }
}

fn apply(api: &KubeApi, file: &str) {
    for doc in istiod::resources(file).unwrap() {
        api.apply(&doc).unwrap();
    }
}

fn delete(api: &KubeApi, file: &str) {
    for doc in istiod::resources(file).unwrap() {
        api.delete(&doc).unwrap();
    }
}

#[test]
fn istiod_drives_the_agent() {
    let mesh = Mesh::start();
    let ok = |r: &HttpResponse| r.status == 200;

    // Mesh-wide STRICT mTLS: the client reaches the servers (over Istio's mTLS: plaintext is refused, below).
    let first = mesh.eventually("client → server through istiod's configuration", "client", "/", &[], ok);
    assert!(first.body.starts_with("server-v"), "{first:?}");
    let spread = mesh.bodies("client", "/", &[], 20);
    assert_eq!(spread, BTreeSet::from(["200 server-v1 /".to_string(), "200 server-v2 /".to_string()]), "both endpoints serve");

    // STRICT: a pod outside the mesh (plaintext) is refused at the server's inbound.
    let direct: SocketAddr = format!("{}:8080", mesh.pods["server-v1"].ip).parse().unwrap();
    let plaintext = mesh.get_to("outsider", direct, "/", &[]);
    assert!(plaintext.as_ref().map_or(true, |r| r.status == 0), "STRICT lets plaintext in: {plaintext:?}");

    // PERMISSIVE in the namespace: plaintext is let in too, without restarting anything.
    apply(&mesh.api, "permissive.yaml");
    wait_for("PERMISSIVE to let plaintext in", Duration::from_secs(60), || match mesh.get_to("outsider", direct, "/", &[]) {
        Ok(r) if r.status == 200 => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.diagnostics()));
    delete(&mesh.api, "permissive.yaml");

    // VirtualService and DestinationRule: default route to v2, a header to v1, a rewrite, a fault.
    apply(&mesh.api, "routing.yaml");
    let only = |body: &str| BTreeSet::from([format!("200 {body}")]);
    wait_for("the VirtualService to send everything to v2", Duration::from_secs(60), || match mesh.bodies("client", "/", &[], 10) {
        b if b == only("server-v2 /") => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.diagnostics()));
    assert_eq!(mesh.bodies("client", "/", &[("end-user", "jason")], 10), only("server-v1 /"), "header match to v1");
    assert_eq!(mesh.bodies("client", "/old/page", &[], 3), only("server-v1 /new/page"), "prefix rewrite");
    let teapot = mesh.get("client", "/teapot", &[]).unwrap();
    assert_eq!(teapot.status, 418, "fault abort: {teapot:?}");

    // AuthorizationPolicy DENY on a path: 403 from the server's sidecar, other paths still served.
    apply(&mesh.api, "deny-admin.yaml");
    let denied = mesh.eventually("the DENY policy on /admin", "client", "/admin", &[], |r| r.status == 403);
    assert!(denied.body.contains("RBAC: access denied"), "{denied:?}");
    assert_eq!(mesh.get("client", "/", &[]).unwrap().status, 200);

    // ALLOW by principal: the client's mTLS identity is allowed, another workload's is not.
    apply(&mesh.api, "allow-client.yaml");
    mesh.eventually("the ALLOW policy to shut out other", "other", "/", &[], |r| r.status == 403);
    assert_eq!(mesh.get("client", "/", &[]).unwrap().status, 200, "the client's principal is allowed");
    delete(&mesh.api, "allow-client.yaml");
    mesh.eventually("other allowed again once the policy is gone", "other", "/", &[], ok);

    // istiod's view: every captured pod is a connected proxy whose configuration is ACKed.
    let syncz = mesh.istiod.debug("/debug/syncz").unwrap();
    let synced: BTreeSet<String> = syncz.as_array().into_iter().flatten().filter_map(|p| p["proxy"].as_str().map(str::to_string)).collect();
    for name in ["client", "other", "server-v1", "server-v2"] {
        let pod = &mesh.pods[name];
        let id = format!("{}.{}", pod.name, pod.namespace);
        assert!(synced.contains(&id), "istiod's /debug/syncz lacks {id}: {syncz}");
    }
    mesh.assert_no_nack();

    mesh.save_corpus("");
}

/// DestinationRule traffic policies, VirtualService retries, timeouts and mirroring, AuthorizationPolicy on
/// namespaces, methods, ports and headers (403 over HTTP, a closed connection over TCP), port-level
/// PeerAuthentication, and egress: REGISTRY_ONLY and a ServiceEntry.
#[test]
fn istiod_traffic_policies_and_egress() {
    let mesh = Mesh::start();
    let ok = |r: &HttpResponse| r.status == 200;
    mesh.eventually("client → server through istiod's configuration", "client", "/", &[], ok);

    // Retries, a timeout and mirroring; least-request balancing, a connection pool and outlier detection.
    apply(&mesh.api, "policies.yaml");
    let mirrored = |path: &str| mesh.seen.lock().unwrap().iter().any(|l| l.starts_with("server-v2 ") && l.ends_with(path));
    wait_for("the mirror to reach v2", Duration::from_secs(60), || {
        let path = format!("/m{}", rand_suffix());
        let r = mesh.get("client", &path, &[]).map_err(|e| e.to_string())?;
        match r.body == format!("server-v1 {path}") && wait_for("the mirrored copy", Duration::from_secs(2), || mirrored(&path).then_some(()).ok_or_else(|| "not yet".to_string())).is_ok() {
            true => Ok(()),
            false => Err(format!("{} {}", r.status, r.body)),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.diagnostics()));
    for _ in 0..4 {
        let r = mesh.get("client", "/flaky", &[]).unwrap();
        assert_eq!(r.status, 200, "retried past the 503: {r:?}");
    }
    let slow = mesh.get("client", "/slow", &[]).unwrap();
    assert_eq!((slow.status, slow.body.as_str()), (504, "upstream request timeout"), "{slow:?}");

    // Authorization on namespaces, methods, ports and headers; and a TCP port closed by a DENY policy.
    assert_eq!(echo(&mesh.pods["client"].netns, mesh.server_tcp, b"tcp before").unwrap(), b"tcp before");
    apply(&mesh.api, "authz-rules.yaml");
    mesh.eventually("the header rule", "client", "/", &[], |r| r.status == 403);
    assert_eq!(mesh.get("client", "/", &[("x-token", "letmein")]).unwrap().status, 200, "GET with the token from shop");
    let post = mesh.pods["client"].netns.tcp_connect(mesh.server, Duration::from_secs(5)).unwrap();
    assert_eq!(weft_tests::traffic::http_request_with(post, "POST", "server", "/", &[("x-token", "letmein")]).unwrap().status, 403, "POST is not allowed");
    let tcp = echo(&mesh.pods["client"].netns, mesh.server_tcp, b"tcp after");
    assert!(tcp.as_ref().map_or(true, |b| b.is_empty()), "the DENY policy closes TCP connections: {tcp:?}");
    delete(&mesh.api, "authz-rules.yaml");

    // Port-level DISABLE: plaintext from outside the mesh reaches 8080, while STRICT still holds elsewhere.
    let direct: SocketAddr = format!("{}:8080", mesh.pods["server-v1"].ip).parse().unwrap();
    assert!(mesh.get_to("outsider", direct, "/", &[]).map_or(true, |r| r.status == 0), "STRICT first");
    apply(&mesh.api, "disable-8080.yaml");
    wait_for("port 8080 to take plaintext", Duration::from_secs(60), || match mesh.get_to("outsider", direct, "/", &[]) {
        Ok(r) if r.status == 200 => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.diagnostics()));

    // Egress: an address outside the mesh is reachable (ALLOW_ANY), then not (REGISTRY_ONLY), then again
    // once a ServiceEntry names it.
    let outsider: SocketAddr = format!("{}:8080", mesh.pods["outsider"].ip).parse().unwrap();
    assert_eq!(mesh.get_to("client", outsider, "/", &[]).unwrap().body, "outsider /", "ALLOW_ANY passes through");
    apply(&mesh.api, "registry-only.yaml");
    wait_for("REGISTRY_ONLY to block the unknown destination", Duration::from_secs(60), || match mesh.get_to("client", outsider, "/", &[]) {
        Ok(r) if r.status == 200 => Err("still reachable".to_string()),
        _ => Ok(()),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.diagnostics()));
    for mut doc in istiod::resources("external.yaml").unwrap() {
        let ip = mesh.pods["outsider"].ip.to_string();
        doc = serde_json::from_str(&doc.to_string().replace("OUTSIDER_IP", &ip)).unwrap();
        mesh.api.apply(&doc).unwrap();
    }
    wait_for("the ServiceEntry to open the destination", Duration::from_secs(60), || match mesh.get_host("client", outsider, "outsider.example", "/", &[]) {
        Ok(r) if r.status == 200 => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.diagnostics()));
    mesh.assert_no_nack();
    mesh.save_corpus("policies-");
}

/// A suffix that makes each request's path its own.
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
