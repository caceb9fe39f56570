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
use weft_tests::istiod::{self, Seen, World};
use weft_tests::traffic::{echo, http_request_with, EchoServer, HttpResponse};
use weft_tests::{wait_for, Pod};

const NS: &str = "shop";
const OUTSIDE: &str = "outside";

/// The test's world and its pods.
struct Mesh {
    world: World,
    pods: BTreeMap<&'static str, Pod>,
    /// The server Service's cluster IP and HTTP port.
    server: SocketAddr,
    /// Its TCP port (an echo server on the pods' 9000).
    server_tcp: SocketAddr,
    /// What the HTTP servers saw.
    seen: Seen,
    _echo: Vec<EchoServer>,
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
        let seen = Seen::default();
        let mut _echo = Vec::new();
        for name in ["server-v1", "server-v2"] {
            istiod::serve_http(&pods[name], 8080, name, &seen).unwrap();
            _echo.push(EchoServer::start(&pods[name].netns, 9000).unwrap());
        }
        istiod::serve_http(&pods["outsider"], 8080, "outsider", &seen).unwrap();
        let ports = [("http-80", 80, 8080), ("tcp-9000", 9000, 9000)];
        let ip = istiod::service_ports(&world.api, NS, "server", &ports, &[&pods["server-v1"], &pods["server-v2"]]).unwrap();
        let (server, server_tcp) = (format!("{ip}:80").parse().unwrap(), format!("{ip}:9000").parse().unwrap());
        Mesh { world, pods, server, server_tcp, seen, _echo }
    }

    /// A GET from pod `from` to `to` with `headers`: the response, or why there was none.
    fn get_to(&self, from: &str, to: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
        istiod::get(&self.pods[from], to, "server", path, headers)
    }

    /// A request with another method than GET to the server Service.
    fn request(&self, from: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
        let stream = self.pods[from].netns.tcp_connect(self.server, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
        http_request_with(stream, method, "server", path, headers).map_err(|e| e.to_string())
    }

    /// Waits for `check` to pass, or fails the test with the diagnostics.
    fn until(&self, what: &str, check: impl FnMut() -> Result<(), String>) {
        wait_for(what, Duration::from_secs(60), check).unwrap_or_else(|e| panic!("{e}\n{}", self.world.diagnostics()));
    }

    fn save_corpus(&self, prefix: &str) {
        self.world.save_corpus(prefix, &[&self.pods["client"], &self.pods["server-v1"]]).unwrap();
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
    // Tracing from the start, so every connection between the pods carries it (see `traces`).
    let collector = trace_collector(&mesh);

    // Mesh-wide STRICT mTLS: the client reaches the servers (over Istio's mTLS: plaintext is refused, below).
    let first = mesh.eventually("client → server through istiod's configuration", "client", "/", &[], ok);
    assert!(first.body.starts_with("server-v"), "{first:?}");
    let spread = mesh.bodies("client", "/", &[], 20);
    assert_eq!(spread, BTreeSet::from(["200 server-v1 /".to_string(), "200 server-v2 /".to_string()]), "both endpoints serve");

    // Istio's standard metrics, as each sidecar reported them (HTTP above, TCP here).
    assert_eq!(echo(&mesh.pods["client"].netns, mesh.server_tcp, b"metered").unwrap(), b"metered");
    standard_metrics(&mesh);

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
    access_logs(&mesh);
    traces(&mesh, &collector);
    weft_explain(&mesh);
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
    weft_status(&mesh);
    weft_config(&mesh);

    mesh.save_corpus("");
}

/// `weft-agent explain` against the running agent, with the DENY policy on /admin in force: the client's
/// request is followed through its outbound listener, route and cluster into the server pod, whose
/// inbound chain (mutual TLS with the client's identity) and RBAC decide; nothing is sent.
fn weft_explain(mesh: &Mesh) {
    let run = |args: &[&str]| {
        let out = mesh.world.cluster.node().command(weft_tests::bin_path("weft-agent").unwrap()).arg("explain").arg("shop/client").args(args).output().unwrap();
        assert!(out.status.success(), "weft-agent explain {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let service = format!("server.shop.svc.cluster.local:{}", mesh.server.port());
    let denied = run(&[&service, "--path", "/admin"]);
    for expected in ["hands the connection to", "mutual TLS", "spiffe://cluster.local/ns/shop/sa/client", "DENY policy ns[shop]-policy[deny-admin]-rule[0] matches", "=> denied by HTTP RBAC"] {
        assert!(denied.contains(expected), "{expected:?} in\n{denied}");
    }
    let allowed = run(&[&service, "--path", "/"]);
    assert!(allowed.lines().last().is_some_and(|l| l.starts_with("=> delivered to the app of shop/server-v")), "{allowed}");
    // Istio turns a DENY rule's HTTP-only fields into a deny of the whole TCP port: the explanation says so,
    // and the traffic agrees.
    let json: serde_json::Value = serde_json::from_str(&run(&[&mesh.server_tcp.to_string(), "--tcp", "-o", "json"])).unwrap();
    assert!(json["outcome"].as_str().is_some_and(|o| o.starts_with("denied by network RBAC #1: DENY policy ns[shop]-policy[deny-admin]-rule[0] matches")), "{json}");
    assert!(json["steps"].as_array().unwrap().iter().any(|s| s["step"] == "tcp_proxy" && s["pod"] == "shop/client"), "{json}");
    let echoed = echo(&mesh.pods["client"].netns, mesh.server_tcp, b"denied?").unwrap_or_default();
    assert!(echoed.is_empty(), "the TCP port answered while explain said it is denied: {echoed:?}");
}

/// `weft-agent config` against the running agent: the client pod's configuration from istiod in
/// `istioctl proxy-config`'s tables (the server's service, its route, its endpoints, the pod's certificate),
/// as JSON, and a pod the agent does not hold named with what to do.
fn weft_config(mesh: &Mesh) {
    let run = |args: &[&str]| mesh.world.cluster.node().command(weft_tests::bin_path("weft-agent").unwrap()).arg("config").args(args).output().unwrap();
    let table = |kind: &str| {
        let out = run(&["shop/client", kind]);
        assert!(out.status.success(), "weft-agent config {kind}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let port = mesh.server.port().to_string();
    let service = "server.shop.svc.cluster.local";
    let has_row = |text: &str, cells: &[&str]| text.lines().any(|l| {
        let row: Vec<&str> = l.split_whitespace().collect();
        cells.iter().all(|c| row.contains(c))
    });
    let clusters = table("clusters");
    assert!(has_row(&clusters, &[service, &port, "outbound", "EDS"]), "{clusters}");
    let listeners = table("listeners");
    assert!(has_row(&listeners, &["15001"]) && has_row(&listeners, &["15006"]) && listeners.contains(&format!("Route: {port}")), "{listeners}");
    let routes = table("routes");
    assert!(routes.lines().any(|l| l.starts_with(&format!("{port} ")) && l.contains(service)), "{routes}");
    let endpoints = table("endpoints");
    let v1 = format!("{}:8080", mesh.pods["server-v1"].ip);
    assert!(has_row(&endpoints, &[&v1, "HEALTHY", &format!("outbound|{port}||{service}")]), "{endpoints}");
    let secrets = table("secrets");
    assert!(secrets.lines().any(|l| l.starts_with("default ") && l.contains("Cert Chain") && l.contains("ACTIVE")), "{secrets}");
    let json: serde_json::Value = serde_json::from_slice(&run(&["shop/client", "clusters", "-o", "json"]).stdout).unwrap();
    assert!(json.as_array().unwrap().iter().any(|c| c["name"] == format!("outbound|{port}||{service}")), "{json}");
    let outsider = run(&["outside/outsider", "clusters"]);
    assert!(!outsider.status.success() && String::from_utf8_lossy(&outsider.stderr).contains("not captured"), "{outsider:?}");
}

/// Istio's `accessLogFile: /dev/stdout` (this suite's MeshConfig): the agent writes each pod's lines in
/// Istio's default format, prefixed by the pod, on its stdout. The denied request shows on both sides: the
/// server's sidecar names the policy that denied it, the client's shows the 403 from upstream.
fn access_logs(mesh: &Mesh) {
    let log_path = mesh.world.agent.log_path().clone();
    mesh.until("access log lines of the denied request on both sides", || {
        let log = std::fs::read_to_string(&log_path).map_err(|e| e.to_string())?;
        let line = |prefix: &str| log.lines().rev().find(|l| l.starts_with(prefix) && l.contains("\"GET /admin HTTP/1.1\" 403")).map(str::to_string);
        let server = line("shop/server-").ok_or("no server-side line")?;
        let client = line("shop/client [").ok_or("no client-side line")?;
        if !server.contains("rbac_access_denied_matched_policy[ns[shop]-policy[deny-admin]-rule[0]]") || !server.contains("inbound|8080||") {
            return Err(format!("server line: {server}"));
        }
        if !client.contains(" via_upstream ") || !client.contains("|server.shop.svc.cluster.local ") {
            return Err(format!("client line: {client}"));
        }
        // The TCP echo through the server's TCP port, from the client's side: no HTTP fields, 7 bytes each way.
        let tcp_cluster = format!("outbound|{}||server.shop.svc.cluster.local", mesh.server_tcp.port());
        if !log.lines().any(|l| l.starts_with("shop/client [") && l.contains("\"- - -\" 0 - - - \"-\" 7 7 ") && l.contains(&tcp_cluster)) {
            return Err(format!("no TCP line for {tcp_cluster}"));
        }
        Ok(())
    });
}

/// An OTLP receiver in a collector pod behind the `otel-collector` Service, which MeshConfig's `otel` provider
/// names, and the Telemetry resource that turns tracing on for the whole mesh.
fn trace_collector(mesh: &Mesh) -> weft_tests::otlp::Receiver {
    let labels = json!({"labels": {"app": "otel-collector", "version": "v1"}});
    let collector = mesh.world.api.run_pod(&mesh.world.cluster, NS, "collector", labels, json!({"serviceAccountName": "otel-collector"})).unwrap();
    let receiver = weft_tests::otlp::serve(collector.netns.tcp_listen(("0.0.0.0", 4317)).unwrap());
    istiod::service_ports(&mesh.world.api, NS, "otel-collector", &[("grpc-otlp", 4317, 4317)], &[&collector]).unwrap();
    apply(mesh, "tracing.yaml");
    receiver
}

/// Traces as the Telemetry resource asked: the collector received, over the mesh's mTLS, the client's CLIENT
/// span and the server's SERVER span of one request, one trace, the server's span a child of the client's, each
/// named by its route's decorator and tagged by istiod's custom tags (`istio.namespace`; service names as istiod
/// derives them: `client.shop`, `server-v2.shop`).
fn traces(mesh: &Mesh, receiver: &weft_tests::otlp::Receiver) {
    mesh.until("a trace of a client request through both pods", || {
        let response = mesh.get("client", "/traced", &[]).map_err(|e| e.to_string())?;
        if response.status != 200 {
            return Err(format!("{} {}", response.status, response.body));
        }
        let spans = receiver.spans();
        let tag = |span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| {
            span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()).map(|v| format!("{:?}", v.value)).unwrap_or_default()
        };
        let traced = |s: &opentelemetry_proto::tonic::trace::v1::Span| tag(s, "http.url").contains("/traced");
        let client = spans.iter().find(|(service, s)| traced(s) && s.kind == 3 && service.contains("client.shop")).ok_or_else(|| format!("no client span yet: {} spans", spans.len()))?;
        let server = spans
            .iter()
            .find(|(service, s)| traced(s) && s.kind == 2 && service.contains("server-v") && s.trace_id == client.1.trace_id)
            .ok_or_else(|| {
                let seen: Vec<String> = spans.iter().filter(|(_, s)| traced(s)).map(|(service, s)| format!("{service} kind {} {} trace {:02x?}", s.kind, s.name, &s.trace_id[..4])).collect();
                format!("no server span in the client's trace {:02x?} yet: {seen:?}", &client.1.trace_id[..4])
            })?;
        if server.1.parent_span_id != client.1.span_id {
            return Err(format!("the server's span is not the client's child: {server:?}, {client:?}"));
        }
        for (side, span) in [("client", &client.1), ("server", &server.1)] {
            if !span.name.starts_with("server.shop.svc.cluster.local:80/") || !tag(span, "istio.namespace").contains(NS) {
                return Err(format!("{side} span: {span:?}"));
            }
        }
        Ok(())
    });
}

/// The sum of the samples of `metric` whose labels include all of `labels` in a Prometheus text.
fn total(text: &str, metric: &str, labels: &[(&str, &str)]) -> u64 {
    let has = |line: &str, (k, v): &(&str, &str)| line.contains(&format!("{{{k}=\"{v}\"")) || line.contains(&format!(",{k}=\"{v}\""));
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && labels.iter().all(|label| has(l, label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Istio's standard metrics of the traffic so far, scraped where Prometheus scrapes a sidecar (each pod's
/// 15020, from the node) and node-wide from the agent: the server side reports as the destination with
/// both workloads, both SPIFFE principals and mutual TLS; the client side as the source, naming the
/// service and the server workload it learnt from the metadata exchange; TCP connections with their bytes.
fn standard_metrics(mesh: &Mesh) {
    let node = mesh.world.cluster.node();
    let scrape = |pod: &str| {
        let addr: SocketAddr = format!("{}:15020", mesh.pods[pod].ip).parse().unwrap();
        let stream = node.tcp_connect(addr, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
        weft_tests::traffic::http_request(stream, "GET", &addr.to_string(), "/stats/prometheus").map(|r| r.body).map_err(|e| e.to_string())
    };
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let server_id = "spiffe://cluster.local/ns/shop/sa/server";
    let service = "server.shop.svc.cluster.local";
    let inbound = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_workload_namespace", NS),
        ("source_principal", client_id),
        ("source_app", "client"),
        ("source_canonical_service", "client"),
        ("destination_workload", "server-v1"),
        ("destination_principal", server_id),
        ("destination_app", "server"),
        ("destination_version", "v1"),
        ("destination_service", service),
        ("destination_service_name", "server"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let outbound = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_principal", client_id),
        ("destination_workload", "server-v1"),
        ("destination_principal", server_id),
        ("destination_canonical_service", "server"),
        ("destination_service", service),
        ("connection_security_policy", "unknown"),
    ];
    let http = [("request_protocol", "http"), ("response_code", "200"), ("response_flags", "-")];
    let tcp = [("request_protocol", "tcp"), ("response_flags", "-")];
    let with = |side: &[(&'static str, &'static str)], more: &[(&'static str, &'static str)]| side.iter().chain(more).copied().collect::<Vec<_>>();
    // The TCP connection went to either server: its series name whichever it was.
    let either = |labels: &[(&'static str, &'static str)]| labels.iter().filter(|(k, _)| !matches!(*k, "destination_workload" | "destination_version")).copied().collect::<Vec<_>>();
    let (tcp_inbound, tcp_outbound) = (either(&inbound), either(&outbound));
    // TCP connections are reported when they close: the echo above has.
    mesh.until("Istio's standard metrics on the pods' 15020", || {
        let (server, client) = (scrape("server-v1")?, scrape("client")?);
        let servers = server.clone() + &scrape("server-v2")?;
        for (text, side, metric) in [
            (&server, with(&inbound, &http), "istio_requests_total"),
            (&server, with(&inbound, &http), "istio_request_duration_milliseconds_count"),
            (&server, with(&inbound, &http), "istio_response_bytes_count"),
            (&client, with(&outbound, &http), "istio_requests_total"),
            (&client, with(&outbound, &http), "istio_request_bytes_count"),
            (&servers, with(&tcp_inbound, &tcp), "istio_tcp_connections_closed_total"),
            (&servers, with(&tcp_inbound, &tcp), "istio_tcp_received_bytes_total"),
            (&client, with(&tcp_outbound, &tcp), "istio_tcp_connections_opened_total"),
            (&client, with(&tcp_outbound, &tcp), "istio_tcp_sent_bytes_total"),
        ] {
            if total(text, metric, &side) == 0 {
                let found: Vec<&str> = text.lines().filter(|l| l.starts_with(metric)).collect();
                return Err(format!("{metric} with {side:?}: found {found:#?}"));
            }
        }
        Ok(())
    });
    // Every request the client sent to v1 is one the server received: the two sides count the same.
    let (server, client) = (scrape("server-v1").unwrap(), scrape("client").unwrap());
    let received = total(&server, "istio_requests_total", &[("reporter", "destination"), ("source_workload", "client")]);
    let sent = total(&client, "istio_requests_total", &[("reporter", "source"), ("destination_workload", "server-v1")]);
    assert_eq!(received, sent, "server-v1 received what the client sent it\n{server}\n{client}");
    // Node-wide, on the agent: the same series labelled by pod.
    let (status, agent) = weft_tests::agent::http_get(node.path(), weft_tests::agent::ADMIN.parse().unwrap(), "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    let by_pod = [("pod", "shop/server-v1"), ("reporter", "destination"), ("source_workload", "client")];
    assert_eq!(total(&agent, "istio_requests_total", &by_pod), received, "the agent shows the pod's series: {agent}");
    // The agent's own metrics: CNI ADDs, xDS ACKs, certificate fetches and expiry.
    for series in ["weft_cni_requests_total{command=\"ADD\",result=\"ok\"}", "weft_xds_responses_total{type=\"LDS\",result=\"ack\"}", "weft_certificate_fetches_total{result=\"ok\"}", "weft_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/client\"}"] {
        assert!(agent.lines().any(|l| l.starts_with(series)), "{series} in {agent}");
    }
    // Every metric the Grafana dashboard in deploy/ queries is one the agent exposes.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(weft_tests::workspace_root().join("deploy/grafana/weft-dashboard.json")).unwrap()).unwrap();
    let exprs: Vec<String> = dashboard["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string())).collect();
    let names: std::collections::BTreeSet<&str> = exprs.iter().flat_map(|e| e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))).filter(|w| w.starts_with("weft_") || w.starts_with("istio_")).collect();
    assert!(names.len() >= 10, "{names:?}");
    let exposed = |name: &str| agent.lines().any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']));
    let missing: Vec<&&str> = names.iter().filter(|n| !exposed(n)).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics the agent does not expose: {missing:?}");
}

/// `weft-agent status` against the running agent, from the node: every captured pod synced for clusters
/// and listeners, with its SPIFFE identity and a certificate that has not expired; `-o json` the same.
fn weft_status(mesh: &Mesh) {
    let status = |args: &[&str]| {
        let out = mesh.world.cluster.node().command(weft_tests::bin_path("weft-agent").unwrap()).arg("status").args(args).output().unwrap();
        assert!(out.status.success(), "weft-agent status: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let table = status(&[]);
    for (pod, sa) in [("client", "client"), ("server-v1", "server")] {
        let row = table.lines().find(|l| l.starts_with(&format!("shop/{pod} "))).unwrap_or_else(|| panic!("{pod} in {table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[1..4], ["iptables", "SYNCED", "SYNCED"], "capture, CDS, LDS: {row}");
        assert!(row.contains(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")) && row.contains(" in "), "identity and expiry: {row}");
    }
    let json: serde_json::Value = serde_json::from_str(&status(&["-o", "json"])).unwrap();
    let client = json["pods"].as_array().unwrap().iter().find(|p| p["pod"] == "shop/client").unwrap();
    assert!(client["xds"]["LDS"]["version"].as_str().is_some_and(|v| !v.is_empty()), "{client}");
    assert_eq!(client["xds"]["LDS"]["rejected"], serde_json::Value::Null);
}

/// DestinationRule traffic policies (outlier detection ejecting a failing server, a connection pool refusing
/// what is over it), VirtualService retries, timeouts and mirroring, AuthorizationPolicy on
/// namespaces, methods, ports and headers (403 over HTTP, a closed connection over TCP), port-level
/// PeerAuthentication, and egress: REGISTRY_ONLY and a ServiceEntry.
#[test]
fn istiod_traffic_policies_and_egress() {
    let mesh = Mesh::start();
    let ok = |r: &HttpResponse| r.status == 200;
    mesh.eventually("client → server through istiod's configuration", "client", "/", &[], ok);

    // Retries, a timeout and mirroring; least-request balancing, a connection pool and outlier detection.
    apply(&mesh, "policies.yaml");
    let mirrored = |path: &str| mesh.seen.lock().unwrap().iter().any(|l| l.starts_with("server-v2 ") && l.ends_with(path));
    let mut n = 0;
    mesh.until("the mirror to reach v2", || {
        n += 1;
        let path = format!("/mirrored/{n}");
        let r = mesh.get("client", &path, &[])?;
        let copied = wait_for("the mirrored copy", Duration::from_secs(2), || mirrored(&path).then_some(()).ok_or_else(|| "not yet".to_string())).is_ok();
        match r.body == format!("server-v1 {path}") && copied {
            true => Ok(()),
            false => Err(format!("{} {}", r.status, r.body)),
        }
    });
    for _ in 0..4 {
        let r = mesh.get("client", "/flaky", &[]).unwrap();
        assert_eq!(r.status, 200, "retried past the 503: {r:?}");
    }
    let slow = mesh.get("client", "/slow", &[]).unwrap();
    assert_eq!((slow.status, slow.body.as_str()), (504, "upstream request timeout"), "{slow:?}");

    // Authorization on namespaces, methods, ports and headers; and a TCP port closed by a DENY policy.
    assert_eq!(echo(&mesh.pods["client"].netns, mesh.server_tcp, b"tcp before").unwrap(), b"tcp before");
    apply(&mesh, "authz-rules.yaml");
    mesh.eventually("the header rule", "client", "/", &[], |r| r.status == 403);
    assert_eq!(mesh.get("client", "/", &[("x-token", "letmein")]).unwrap().status, 200, "GET with the token from shop");
    assert_eq!(mesh.request("client", "POST", "/", &[("x-token", "letmein")]).unwrap().status, 403, "POST is not allowed");
    let tcp = echo(&mesh.pods["client"].netns, mesh.server_tcp, b"tcp after");
    assert!(tcp.as_ref().map_or(true, |b| b.is_empty()), "the DENY policy closes TCP connections: {tcp:?}");
    delete(&mesh, "authz-rules.yaml");

    // Outlier detection: the server that keeps answering 503 is ejected, the other serves everything.
    delete(&mesh, "policies.yaml");
    mesh.until("both servers to serve again once the policies are gone", || match mesh.bodies("client", "/", &[], 10) {
        b if b == BTreeSet::from(["200 server-v1 /".to_string(), "200 server-v2 /".to_string()]) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    apply(&mesh, "outlier.yaml");
    let all_from_v2 = BTreeSet::from(["200 server-v2 /fail-server-v1".to_string()]);
    mesh.until("server-v1 to be ejected after its 5xx", || match mesh.bodies("client", "/fail-server-v1", &[], 6) {
        b if b == all_from_v2 => Ok(()),
        other => Err(format!("{other:?}")),
    });
    delete(&mesh, "outlier.yaml");
    // The connection pool: one connection and one pending request; concurrent slow requests beyond that are
    // refused with Envoy's overflow reply.
    apply(&mesh, "pool.yaml");
    let burst = || -> Vec<Result<HttpResponse, String>> {
        std::thread::scope(|s| {
            let calls: Vec<_> = (0..6).map(|_| s.spawn(|| mesh.get("client", "/slow", &[]))).collect();
            calls.into_iter().map(|c| c.join().unwrap_or_else(|_| Err("panicked".into()))).collect()
        })
    };
    mesh.until("the pool to refuse what is over its limit", || {
        let answers = burst();
        let served = answers.iter().filter(|r| r.as_ref().is_ok_and(|r| r.status == 200)).count();
        let overflow = answers.iter().filter(|r| r.as_ref().is_ok_and(|r| r.status == 503 && r.body.contains("overflow"))).count();
        match served >= 1 && overflow >= 1 {
            true => Ok(()),
            false => Err(format!("{served} served, {overflow} refused: {answers:?}")),
        }
    });
    delete(&mesh, "pool.yaml");

    // Port-level DISABLE: plaintext from outside the mesh reaches 8080, while STRICT still holds elsewhere.
    let direct: SocketAddr = format!("{}:8080", mesh.pods["server-v1"].ip).parse().unwrap();
    assert!(mesh.get_to("outsider", direct, "/", &[]).map_or(true, |r| r.status == 0), "STRICT first");
    apply(&mesh, "disable-8080.yaml");
    mesh.until("port 8080 to take plaintext", || match mesh.get_to("outsider", direct, "/", &[]) {
        Ok(r) if r.status == 200 => Ok(()),
        other => Err(format!("{other:?}")),
    });

    // Egress: an address outside the mesh is reachable (ALLOW_ANY), then not (REGISTRY_ONLY), then again
    // once a ServiceEntry names it (its address is the test's: filled into tests/istio/external.yaml).
    let outsider: SocketAddr = format!("{}:8080", mesh.pods["outsider"].ip).parse().unwrap();
    assert_eq!(mesh.get_to("client", outsider, "/", &[]).unwrap().body, "outsider /", "ALLOW_ANY passes through");
    apply(&mesh, "registry-only.yaml");
    mesh.until("REGISTRY_ONLY to block the unknown destination", || match mesh.get_to("client", outsider, "/", &[]) {
        Ok(r) if r.status == 200 => Err("still reachable".to_string()),
        _ => Ok(()),
    });
    for doc in istiod::resources("external.yaml").unwrap() {
        let doc = serde_json::from_str(&doc.to_string().replace("OUTSIDER_IP", &mesh.pods["outsider"].ip.to_string())).unwrap();
        mesh.world.api.apply(&doc).unwrap();
    }
    mesh.until("the ServiceEntry to open the destination", || match istiod::get(&mesh.pods["client"], outsider, "outsider.example", "/", &[]) {
        Ok(r) if r.status == 200 => Ok(()),
        other => Err(format!("{other:?}")),
    });
    mesh.world.check_synced().unwrap_or_else(|e| panic!("{e}"));
    mesh.save_corpus("policies-");
}
