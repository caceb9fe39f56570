//! weft and a real Envoy sidecar in one mesh, both driven by the same real istiod (the live-istiod world of
//! `tests/tests/istiod.rs`, see `weft_tests::istiod::World`).
//!
//! Pod `envoy-web` in the injected namespace is what Istio's injector leaves behind: the
//! `sidecar.istio.io/status` annotation and an `istio-proxy` container (so weft keeps off it), Istio's init
//! container's NAT rules in its namespace, and upstream Envoy 1.40 running as uid 1337 in front of its app on
//! 8080. Its configuration is istiod's own output for that pod: a twin (`weft-agent proxy` with an ADS
//! bootstrap) connects to istiod's plaintext xDS with the pod's sidecar node id and metadata and subscribes to
//! everything, istiod's `/debug/config_dump?proxyID=envoy-web.shop&include_eds` of it is taken once complete,
//! and `weft_tests::envoy_sidecar::static_bootstrap` turns it into a static bootstrap for upstream Envoy
//! (Istio's own extensions out, `istio-peer-exchange` out of the ALPN lists, SDS `default`/`ROOTCA` as static
//! secrets with a certificate for `spiffe://cluster.local/ns/shop/sa/envoy-web` from istiod's CA, RDS and EDS
//! inlined). The AuthorizationPolicies are applied before the dump, so Envoy's configuration has them.
//!
//! Observed as traffic, both directions, each identity checked by the other data plane:
//! - weft's client → the `envoy-web` Service: 200 from the Envoy pod's app, whose `x-forwarded-client-cert`
//!   (set by Envoy) names the client's SPIFFE id; another weft pod is refused by Envoy's RBAC (403);
//! - the Envoy pod's app → the `server` Service: 200 from weft's server, whose `x-forwarded-client-cert` (set by
//!   weft) names `envoy-web`'s SPIFFE id; weft's server admits only that identity (another pod: 403), and
//!   Envoy's own counters show the TLS handshake on the outbound cluster.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use weft_tests::envoy_sidecar::{self, complete_dump, EnvoySidecar, SidecarCredentials, Twin};
use weft_tests::istiod::{self, header, World, ECHO_XFCC};
use weft_tests::traffic::HttpResponse;
use weft_tests::{wait_for, Pod};

const NS: &str = "shop";
const TRUST: &str = "spiffe://cluster.local";

/// As Istio's injector annotates a pod it gave a sidecar.
const SIDECAR_STATUS: &str = r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#;

fn spiffe(sa: &str) -> String {
    format!("{TRUST}/ns/{NS}/sa/{sa}")
}

/// A weft pod in the mesh namespace (captured by the agent), labelled `app: <app>`.
fn weft_pod(world: &World, name: &str, app: &str) -> Pod {
    world.api.run_pod(&world.cluster, NS, name, json!({"labels": {"app": app}}), json!({"serviceAccountName": name})).unwrap()
}

/// GETs `http://<host>/<path>` (sent to `to`) until `expected` holds (istiod pushes to weft asynchronously),
/// panicking with `context` otherwise.
fn eventually(what: &str, from: &Pod, to: SocketAddr, host: &str, path: &str, expected: impl Fn(&HttpResponse) -> bool, context: impl Fn() -> String) -> HttpResponse {
    let outcome = wait_for(what, Duration::from_secs(60), || match istiod::get(from, to, host, path, &[]) {
        Ok(r) if expected(&r) => Ok(r),
        Ok(r) => Err(format!("{} {} {}", r.status, r.head.lines().next().unwrap_or_default(), r.body)),
        Err(e) => Err(e),
    });
    outcome.unwrap_or_else(|e| panic!("{e}\n{}", context()))
}

/// The dump holds what the test relies on: both Services and Envoy's RBAC for the ALLOW policy.
fn dump_ready(dump: &Value) -> Result<(), String> {
    let text = dump.to_string();
    for needed in ["outbound|80||server.shop.svc.cluster.local", "inbound|8080||", "envoy.filters.http.rbac", "cluster.local/ns/shop/sa/client"] {
        if !text.contains(needed) {
            return Err(format!("istiod's dump has no {needed} yet"));
        }
    }
    Ok(())
}

#[test]
fn weft_and_an_envoy_sidecar_share_istiod() {
    let world = World::start("kint", &[NS]).unwrap();
    world.apply("strict.yaml").unwrap();
    world.apply("interop-authz.yaml").unwrap();

    let client = weft_pod(&world, "client", "client");
    let other = weft_pod(&world, "other", "other");
    let server = weft_pod(&world, "server", "server");
    let labels = json!({"app": "envoy-web", "security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": "envoy-web"});
    let metadata = json!({"labels": labels, "annotations": {"sidecar.istio.io/status": SIDECAR_STATUS}});
    let containers = json!([{"name": "app", "image": "app:test"}, {"name": "istio-proxy", "image": "envoy:1.40"}]);
    let web = world.api.run_pod(&world.cluster, NS, "envoy-web", metadata, json!({"serviceAccountName": "envoy-web", "containers": containers})).unwrap();

    let seen = istiod::Seen::default();
    istiod::serve_http(&server, 8080, "server", &seen).unwrap();
    istiod::serve_http(&web, 8080, "envoy-web", &seen).unwrap();
    let server_svc: SocketAddr = format!("{}:80", istiod::service(&world.api, NS, "server", 80, 8080, &[&server]).unwrap()).parse().unwrap();
    let web_svc: SocketAddr = format!("{}:80", istiod::service(&world.api, NS, "envoy-web", 80, 8080, &[&web]).unwrap()).parse().unwrap();

    // weft keeps off the injected pod, and says why on it.
    let verdict = wait_for("weft's decision on envoy-web", Duration::from_secs(30), || {
        let pod = world.api.get_pod(NS, "envoy-web").map_err(|e| e.to_string())?;
        pod["metadata"]["annotations"]["weft.dev/status"].as_str().map(str::to_string).ok_or_else(|| "no weft.dev/status yet".to_string())
    });
    assert_eq!(verdict.unwrap(), "not captured: already runs an Istio sidecar");

    // The sidecar: istio-init's rules, then Envoy from istiod's output for this pod.
    let dir = world.cluster.work_dir().join("envoy-web");
    std::fs::create_dir_all(&dir).unwrap();
    envoy_sidecar::istio_iptables(&web.netns, &dir).unwrap();
    let node = envoy_sidecar::sidecar_node(&web, "envoy-web", &labels);
    let creds = SidecarCredentials::issue(&world.api, &world.istiod, &spiffe("envoy-web"), &dir).unwrap();
    let twin = Twin::connect(world.cluster.node(), &node, &spiffe("envoy-web"), &creds, &dir).unwrap();
    let dump = complete_dump(&world.istiod, &format!("envoy-web.{NS}"), dump_ready).unwrap_or_else(|e| panic!("{e}\ntwin: {}", twin.admin("/ready")));
    drop(twin);
    std::fs::write(dir.join("istiod-config-dump.json"), serde_json::to_vec_pretty(&dump).unwrap()).unwrap();
    let bootstrap = envoy_sidecar::static_bootstrap(&dump, &node, &creds).unwrap();
    let envoy = EnvoySidecar::start(&web, &bootstrap, &dir).unwrap();
    let context = || format!("{}\nenvoy log: {}", world.diagnostics(), envoy.log_path().display());

    // weft → Envoy: Envoy accepts weft's mTLS and tells its app who called.
    let ok = eventually("weft's client → the Envoy pod's Service", &client, web_svc, "envoy-web", "/hello", |r| r.status == 200, context);
    assert_eq!(ok.body, "envoy-web /hello", "{ok:?}");
    let xfcc = header(&ok, ECHO_XFCC).unwrap_or_else(|| panic!("Envoy set no x-forwarded-client-cert: {ok:?}"));
    assert!(xfcc.contains(&format!("URI={}", spiffe("client"))), "the client's identity as Envoy saw it: {xfcc}");
    assert!(xfcc.contains(&format!("By={}", spiffe("envoy-web"))), "{xfcc}");
    // Envoy's RBAC (istiod's ALLOW for the client's principal) refuses another weft pod's identity.
    let refused = istiod::get(&other, web_svc, "envoy-web", "/hello", &[]).unwrap();
    assert_eq!(refused.status, 403, "Envoy let another identity in: {refused:?}");
    assert!(refused.body.contains("RBAC: access denied"), "{refused:?}");

    // Envoy → weft: weft's STRICT inbound accepts Envoy's mTLS and its RBAC admits the Envoy pod's identity.
    let ok = eventually("the Envoy pod's app → weft's server", &web, server_svc, "server", "/from-envoy", |r| r.status == 200, context);
    assert_eq!(ok.body, "server /from-envoy", "{ok:?}");
    let xfcc = header(&ok, ECHO_XFCC).unwrap_or_else(|| panic!("weft set no x-forwarded-client-cert: {ok:?}"));
    assert!(xfcc.contains(&format!("URI={}", spiffe("envoy-web"))), "the Envoy pod's identity as weft saw it: {xfcc}");
    assert!(xfcc.contains(&format!("By={}", spiffe("server"))), "{xfcc}");
    // istiod's alt_stat_name (`<cluster>;`) names the cluster's stats.
    let handshakes = envoy.counter("cluster.outbound|80||server.shop.svc.cluster.local;.ssl.handshake").unwrap();
    assert!(handshakes >= 1, "Envoy's outbound cluster made no TLS handshake");
    let refused = istiod::get(&other, server_svc, "server", "/", &[]).unwrap();
    assert_eq!(refused.status, 403, "weft let another identity in: {refused:?}");

    world.check_synced().unwrap_or_else(|e| panic!("{e}"));
}
