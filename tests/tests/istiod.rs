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
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use weft_tests::istiod::{self, World};
use weft_tests::traffic::HttpResponse;
use weft_tests::{wait_for, Pod};

const NS: &str = "shop";
const OUTSIDE: &str = "outside";

/// The test's world and its pods.
struct Mesh {
    world: World,
    pods: BTreeMap<&'static str, Pod>,
    /// The server Service's cluster IP and port.
    server: SocketAddr,
}

impl Mesh {
    fn start() -> Mesh {
        let world = World::start("kist", &[NS]).unwrap();
        world.api.create_namespace(OUTSIDE, json!({})).unwrap();
        world.apply("strict.yaml").unwrap();
        let mut pods = BTreeMap::new();
        let workloads: [(&'static str, &str, &str, &str, &str); 5] = [
            ("client", NS, "client", "client", "v1"),
            ("other", NS, "other", "other", "v1"),
            ("server-v1", NS, "server", "server", "v1"),
            ("server-v2", NS, "server", "server", "v2"),
            ("outsider", OUTSIDE, "outsider", "default", "v1"),
        ];
        for (name, ns, app, sa, version) in workloads {
            let labels = json!({"labels": {"app": app, "version": version}});
            let pod = world.api.run_pod(&world.cluster, ns, name, labels, json!({"serviceAccountName": sa})).unwrap();
            pods.insert(name, pod);
        }
        istiod::serve_http(&pods["server-v1"], 8080, "server-v1").unwrap();
        istiod::serve_http(&pods["server-v2"], 8080, "server-v2").unwrap();
        let ip = istiod::service(&world.api, NS, "server", 80, 8080, &[&pods["server-v1"], &pods["server-v2"]]).unwrap();
        let server = format!("{ip}:80").parse().unwrap();
        Mesh { world, pods, server }
    }

    /// A GET from pod `from` to `to` with `headers`: the response, or why there was none.
    fn get_to(&self, from: &str, to: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
        istiod::get(&self.pods[from], to, "server", path, headers)
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
        outcome.unwrap_or_else(|e| panic!("{e}\n{}", self.world.diagnostics()))
    }

    /// Bodies of `n` GETs from `from` (failures as `error …`).
    fn bodies(&self, from: &str, path: &str, headers: &[(&str, &str)], n: usize) -> BTreeSet<String> {
        (0..n).map(|_| self.get(from, path, headers).map_or_else(|e| format!("error {e}"), |r| format!("{} {}", r.status, r.body))).collect()
    }
}

fn apply(mesh: &Mesh, file: &str) {
    mesh.world.apply(file).unwrap();
}

fn delete(mesh: &Mesh, file: &str) {
    mesh.world.delete(file).unwrap();
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
    apply(&mesh, "permissive.yaml");
    wait_for("PERMISSIVE to let plaintext in", Duration::from_secs(60), || match mesh.get_to("outsider", direct, "/", &[]) {
        Ok(r) if r.status == 200 => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.world.diagnostics()));
    delete(&mesh, "permissive.yaml");

    // VirtualService and DestinationRule: default route to v2, a header to v1, a rewrite, a fault.
    apply(&mesh, "routing.yaml");
    let only = |body: &str| BTreeSet::from([format!("200 {body}")]);
    wait_for("the VirtualService to send everything to v2", Duration::from_secs(60), || match mesh.bodies("client", "/", &[], 10) {
        b if b == only("server-v2 /") => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.world.diagnostics()));
    assert_eq!(mesh.bodies("client", "/", &[("end-user", "jason")], 10), only("server-v1 /"), "header match to v1");
    assert_eq!(mesh.bodies("client", "/old/page", &[], 3), only("server-v1 /new/page"), "prefix rewrite");
    let teapot = mesh.get("client", "/teapot", &[]).unwrap();
    assert_eq!(teapot.status, 418, "fault abort: {teapot:?}");

    // AuthorizationPolicy DENY on a path: 403 from the server's sidecar, other paths still served.
    apply(&mesh, "deny-admin.yaml");
    let denied = mesh.eventually("the DENY policy on /admin", "client", "/admin", &[], |r| r.status == 403);
    assert!(denied.body.contains("RBAC: access denied"), "{denied:?}");
    assert_eq!(mesh.get("client", "/", &[]).unwrap().status, 200);

    // ALLOW by principal: the client's mTLS identity is allowed, another workload's is not.
    apply(&mesh, "allow-client.yaml");
    mesh.eventually("the ALLOW policy to shut out other", "other", "/", &[], |r| r.status == 403);
    assert_eq!(mesh.get("client", "/", &[]).unwrap().status, 200, "the client's principal is allowed");
    delete(&mesh, "allow-client.yaml");
    mesh.eventually("other allowed again once the policy is gone", "other", "/", &[], ok);

    // istiod's view: every captured pod is a connected proxy whose configuration is ACKed.
    let synced = mesh.world.synced_proxies().unwrap();
    for name in ["client", "other", "server-v1", "server-v2"] {
        let pod = &mesh.pods[name];
        let id = format!("{}.{}", pod.name, pod.namespace);
        assert!(synced.contains(&id), "istiod's /debug/syncz lacks {id}: {synced:?}");
    }
    mesh.world.check_synced().unwrap_or_else(|e| panic!("{e}"));

    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        for name in ["client", "server-v1"] {
            let pod = &mesh.pods[name];
            let dump = mesh.world.istiod.debug(&format!("/debug/config_dump?proxyID={}.{}", pod.name, pod.namespace)).unwrap();
            let path = weft_tests::workspace_root().join(format!("tests/istio/corpus/{name}.json"));
            std::fs::write(path, serde_json::to_string_pretty(&dump).unwrap()).unwrap();
        }
    }
}
