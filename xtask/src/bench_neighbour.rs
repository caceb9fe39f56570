//! `cargo xtask bench neighbour [--duration S]`: one pod's load against another pod's traffic, through weft
//! (one agent for the node, pods captured) and through Envoy sidecars (one Envoy per pod, `--concurrency 2`
//! as Istio's sidecars), in the same run on the same machine. Pod a (the victim) talks to pod d over 4
//! keep-alive connections; pod c (the aggressor) floods pod b over 64. Every app is one event loop (the
//! servers answer `200 ok`; wrk `-t1` and a fixed-rate client load them), so only the proxy decides how the
//! pods fare. Both proxies relay at L4 (weft's pass-through, Envoy's `tcp_proxy`). Last, the control plane:
//! weft with the test management server, a calm pod's configuration pushes timed to their ACK, alone and
//! while another pod gets large configurations back to back.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use weft_tests::agent::{Agent, ADMIN};
use weft_tests::share::{fixed_rate, start_http};
use weft_tests::xds_server::{XdsServer, CLUSTER, LISTENER};
use weft_tests::{envoy_path, wait_for, ChildGuard, Cluster, Pod};

use crate::bench::{percentile, release_build, weft_cluster};

const APP_PORT: u16 = 9000;
const OUTBOUND: u16 = 15001;
const INBOUND: u16 = 15006;
const VICTIM_RATE: u32 = 1000;
const VICTIM_CONNECTIONS: usize = 4;
const AGGRESSOR_CONNECTIONS: usize = 64;

/// What one proxy's run measured.
struct Row {
    name: &'static str,
    p50_alone: f64,
    p99_alone: f64,
    p50_attacked: f64,
    p99_attacked: f64,
    closed_alone: f64,
    closed_attacked: f64,
    aggressor_alone: f64,
    aggressor_attacking: f64,
}

/// The four pods and where each client sends (the server itself when captured; the sidecar otherwise).
struct Pods {
    victim: Pod,
    aggressor: Pod,
    victim_target: SocketAddr,
    aggressor_target: SocketAddr,
}

pub fn run(args: &[&str]) -> Result<(), String> {
    let secs: u64 = match args {
        [] => 5,
        ["--duration", s] => s.parse().map_err(|_| format!("--duration {s}: not a number"))?,
        ["--control-plane"] => return control_plane(),
        _ => return Err("usage: cargo xtask bench neighbour [--duration S | --control-plane]".into()),
    };
    let window = Duration::from_secs(secs);
    release_build()?;
    let weft = {
        let cluster = weft_cluster("bench-nb-weft")?;
        let _agent = Agent::start(&cluster, "iptables").map_err(|e| e.to_string())?;
        let (pods, _servers) = pods(&cluster, |_, server| Ok(server.addr(APP_PORT)))?;
        measure("weft", &pods, window)?
    };
    eprintln!("xtask: bench neighbour: weft: done");
    let envoy = {
        let cluster = Cluster::new("bench-nb-envoy").map_err(|e| e.to_string())?;
        let mut sidecars = Vec::new();
        let (pods, servers) = pods(&cluster, |client, server| {
            sidecars.push(sidecar(&cluster, client, Some(server))?);
            Ok(SocketAddr::from(([127, 0, 0, 1], OUTBOUND)))
        })?;
        for server in &servers {
            sidecars.push(sidecar(&cluster, server, None)?);
        }
        measure("envoy sidecars", &pods, window)?
    };
    eprintln!("xtask: bench neighbour: envoy: done");
    print(&[weft, envoy], secs);
    control_plane()
}

/// The control-plane part alone (`--control-plane`).
fn control_plane() -> Result<(), String> {
    release_build()?;
    let (calm_alone, calm_stormed, storm_pushes) = xds_storm(XDS_ROUNDS)?;
    print_xds(&calm_alone, &calm_stormed, storm_pushes);
    Ok(())
}

/// Configuration pushes to the calm pod, each measured from the push to its ACK.
const XDS_ROUNDS: usize = 40;
/// Clusters in each of the storming pod's pushes.
const STORM_CLUSTERS: usize = 2000;

fn cluster_yaml(name: &str, port: u32) -> String {
    format!("{{name: {name}, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 10.96.0.1, port_value: {port}}}}}}}}}]}}]}}}}")
}

const XDS_LISTENER: &str = r#"
name: virtualOutbound
address: {socket_address: {address: 0.0.0.0, port_value: 15001}}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: out, cluster: svc}
"#;

/// The calm pod's configuration latency (push to ACK, ms), alone and while another pod of the node gets
/// a storm of large configurations (`STORM_CLUSTERS` clusters a push, as fast as the agent ACKs them);
/// and how many storm pushes were ACKed meanwhile.
fn xds_storm(rounds: usize) -> Result<(Vec<f64>, Vec<f64>, usize), String> {
    let e = |e: weft_tests::HarnessError| e.to_string();
    let cluster = weft_cluster("bench-nb-xds")?;
    let server = XdsServer::start(cluster.node(), "127.0.0.1:18000".parse().map_err(|_| "address")?).map_err(e)?;
    server.set(CLUSTER, "0", &[&cluster_yaml("svc", 80)]).map_err(e)?;
    server.set(LISTENER, "0", &[XDS_LISTENER]).map_err(e)?;
    let _agent = Agent::start_with_args(&cluster, "iptables", ADMIN, &["--xds-address", "127.0.0.1:18000"]).map_err(e)?;
    let calm = cluster.add_pod("bench", "calm").map_err(|e| e.to_string())?;
    let storm = cluster.add_pod("bench", "storm").map_err(|e| e.to_string())?;
    let id = |p: &Pod| format!("sidecar~{}~{}.bench~bench.svc.cluster.local", p.ip, p.name);
    let (calm_id, storm_id) = (id(&calm), id(&storm));
    // Only a stream's first request names its node; versions unique to a pod tell whose ACK it is.
    wait_for("both pods synced", Duration::from_secs(30), || {
        let acks = server.requests().iter().filter(|r| r.type_url == CLUSTER && r.version_info == "0" && r.is_ack()).count();
        if acks >= 2 { Ok(()) } else { Err(format!("{acks} CDS ACKs")) }
    })
    .map_err(e)?;
    let alone = pushes(&server, &calm_id, rounds, "alone")?;
    // Two large configurations, encoded once, pushed in turn so that every push changes every cluster.
    let variants: Vec<_> = (0..2u32)
        .map(|v| {
            let yaml: Vec<String> = (0..STORM_CLUSTERS).map(|i| cluster_yaml(&format!("storm{i}"), 1000 + v)).collect();
            XdsServer::encode(CLUSTER, &yaml.iter().map(String::as_str).collect::<Vec<_>>()).map_err(e)
        })
        .collect::<Result<_, _>>()?;
    let stop = AtomicBool::new(false);
    let (stormed, storm_pushes) = std::thread::scope(|s| {
        let storming = s.spawn(|| {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let version = format!("storm-{n}");
                let since = server.requests().len();
                server.publish_for_node(&storm_id, CLUSTER, &version, variants[n % 2].clone());
                let acked = |r: &weft_tests::xds_server::Recorded| r.type_url == CLUSTER && r.version_info == version && r.is_ack();
                if server.wait_request_since(since, "storm ACK", acked).is_err() {
                    break;
                }
                n += 1;
            }
            n
        });
        // The storm is under way (its first push out) before the calm pod's pushes start.
        std::thread::sleep(Duration::from_millis(300));
        let stormed = pushes(&server, &calm_id, rounds, "stormed");
        stop.store(true, Ordering::Relaxed);
        (stormed, storming.join().unwrap_or(0))
    });
    Ok((alone, stormed?, storm_pushes))
}

/// `rounds` pushes of a changed cluster to `node`, each waited for until ACKed: the latencies in ms.
fn pushes(server: &XdsServer, node: &str, rounds: usize, tag: &str) -> Result<Vec<f64>, String> {
    let mut latencies = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let version = format!("{tag}-{i}");
        let since = server.requests().len();
        let start = Instant::now();
        server.set_for_node(node, CLUSTER, &version, &[&cluster_yaml("svc", 2000 + i as u32)]).map_err(|e| e.to_string())?;
        loop {
            let requests = server.requests();
            let acked = requests.get(since..).unwrap_or_default().iter().any(|r| r.type_url == CLUSTER && r.version_info == version && r.is_ack());
            if acked {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!("{node} did not ACK {version} in 20 s"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        latencies.push(start.elapsed().as_secs_f64() * 1000.0);
        // Spread over a few seconds, so that the pushes meet the storm at every stage.
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(latencies)
}

fn print_xds(alone: &[f64], stormed: &[f64], storm_pushes: usize) {
    println!("
Control plane: {XDS_ROUNDS} pushes to a calm pod, push to ACK, alone and while another pod of the node is sent {STORM_CLUSTERS}-cluster configurations back to back ({storm_pushes} ACKed meanwhile)
");
    println!("| calm pod | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for (name, l) in [("alone", alone), ("during the storm", stormed)] {
        let max = l.iter().copied().fold(0.0, f64::max);
        println!("| {name} | {:.1} | {:.1} | {:.1} |", percentile(l, 50.0), percentile(l, 99.0), max);
    }
}

/// Pods a, c (clients) and d, b (servers, HTTP on 9000); `target(client, server)` is where the client sends.
fn pods(cluster: &Cluster, mut target: impl FnMut(&Pod, &Pod) -> Result<SocketAddr, String>) -> Result<(Pods, Vec<Pod>), String> {
    let add = |name: &str| cluster.add_pod("bench", name).map_err(|e| e.to_string());
    let (victim, aggressor, d, b) = (add("a")?, add("c")?, add("d")?, add("b")?);
    for server in [&d, &b] {
        start_http(&server.netns, APP_PORT).map_err(|e| e.to_string())?;
    }
    let victim_target = target(&victim, &d)?;
    let aggressor_target = target(&aggressor, &b)?;
    Ok((Pods { victim, aggressor, victim_target, aggressor_target }, vec![d, b]))
}

/// An Envoy sidecar in `pod`: outbound on 127.0.0.1:15001 to `peer`'s sidecar, inbound on 15006 to the app.
fn sidecar(cluster: &Cluster, pod: &Pod, peer: Option<&Pod>) -> Result<ChildGuard, String> {
    let peer = peer.map_or(SocketAddr::from(([127, 0, 0, 1], 9)), |p| p.addr(INBOUND));
    let config = cluster.work_dir().join(format!("envoy-{}.json", pod.name));
    std::fs::write(&config, bootstrap(peer).to_string()).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(cluster.work_dir().join(format!("envoy-{}.log", pod.name))).map_err(|e| e.to_string())?;
    let mut cmd = pod.netns.command(envoy_path().map_err(|e| e.to_string())?);
    cmd.arg("-c")
        .arg(&config)
        .args(["--concurrency", "2", "--log-level", "error", "--disable-hot-restart"])
        .stdout(Stdio::null())
        .stderr(log);
    let child = cmd.spawn().map(|c| ChildGuard::new(c, format!("envoy in pod {}", pod.name))).map_err(|e| format!("envoy in pod {}: {e}", pod.name))?;
    for port in [OUTBOUND, INBOUND] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for("the sidecar listening", Duration::from_secs(20), || pod.netns.tcp_connect(addr, Duration::from_secs(1)).map_err(|e| e.to_string()))
            .map_err(|e| format!("envoy in pod {}: {e}", pod.name))?;
    }
    Ok(child)
}

fn bootstrap(peer: SocketAddr) -> serde_json::Value {
    let listener = |name: &str, address: &str, port: u16, cluster: &str| {
        serde_json::json!({"name": name, "address": {"socket_address": {"address": address, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": name, "cluster": cluster}}]}]})
    };
    let cluster = |name: &str, addr: SocketAddr| {
        serde_json::json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": addr.ip().to_string(), "port_value": addr.port()}}}}]}]}})
    };
    serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "static_resources": {
            "listeners": [listener("outbound", "127.0.0.1", OUTBOUND, "peer"), listener("inbound", "0.0.0.0", INBOUND, "app")],
            "clusters": [cluster("peer", peer), cluster("app", SocketAddr::from(([127, 0, 0, 1], APP_PORT)))],
        },
    })
}

/// wrk `-t1` from `pod` to `target` over `connections` for `window`: requests per second.
fn wrk(pod: &Pod, target: SocketAddr, connections: usize, window: Duration) -> Result<f64, String> {
    let out = pod
        .netns
        .command("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{}s", window.as_secs()), &format!("http://{target}/")])
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse().ok())
        .ok_or_else(|| format!("wrk printed no Requests/sec: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// Runs `f` while the aggressor floods (wrk over 64 connections, from before `f` starts to after it ends);
/// returns `f`'s result and the aggressor's requests per second.
fn under_attack<T: Send>(pods: &Pods, window: Duration, f: impl FnOnce() -> Result<T, String> + Send) -> Result<(T, f64), String> {
    std::thread::scope(|s| {
        let flood = s.spawn(|| wrk(&pods.aggressor, pods.aggressor_target, AGGRESSOR_CONNECTIONS, window + Duration::from_secs(2)));
        std::thread::sleep(Duration::from_secs(1));
        let measured = f()?;
        let aggressor = flood.join().map_err(|_| "the aggressor's wrk thread panicked".to_string())??;
        Ok((measured, aggressor))
    })
}

fn measure(name: &'static str, pods: &Pods, window: Duration) -> Result<Row, String> {
    let victim_fixed = || fixed_rate(&pods.victim.netns, pods.victim_target, VICTIM_RATE, VICTIM_CONNECTIONS, window).map_err(|e| format!("{name}: victim: {e}"));
    let victim_closed = || wrk(&pods.victim, pods.victim_target, VICTIM_CONNECTIONS, window);
    // Warm-up: connections, pools and caches.
    victim_fixed()?;
    let alone = victim_fixed()?;
    let closed_alone = victim_closed()?;
    let aggressor_alone = wrk(&pods.aggressor, pods.aggressor_target, AGGRESSOR_CONNECTIONS, window)?;
    let (attacked, aggressor_attacking) = under_attack(pods, window, victim_fixed)?;
    let (closed_attacked, _) = under_attack(pods, window, victim_closed)?;
    Ok(Row {
        name,
        p50_alone: percentile(&alone, 50.0) / 1000.0,
        p99_alone: percentile(&alone, 99.0) / 1000.0,
        p50_attacked: percentile(&attacked, 50.0) / 1000.0,
        p99_attacked: percentile(&attacked, 99.0) / 1000.0,
        closed_alone,
        closed_attacked,
        aggressor_alone,
        aggressor_attacking,
    })
}

fn print(rows: &[Row], secs: u64) {
    println!(
        "\nVictim pod a → d ({VICTIM_CONNECTIONS} connections) while aggressor pod c → b floods over {AGGRESSOR_CONNECTIONS}; {secs} s per \
         measurement, 2 CPUs shared by apps and proxies\n"
    );
    println!("Fixed rate: the victim at {VICTIM_RATE} requests/s (latency from when each request was due)\n");
    println!("| proxy | p50 alone ms | p99 alone ms | p50 attacked ms | p99 attacked ms | p99 degradation | aggressor req/s meanwhile |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.0} |",
            r.name,
            r.p50_alone,
            r.p99_alone,
            r.p50_attacked,
            r.p99_attacked,
            r.p99_attacked / r.p99_alone,
            r.aggressor_attacking
        );
    }
    println!("\nClosed loop: the victim as fast as it goes (wrk -t1 -c{VICTIM_CONNECTIONS})\n");
    println!("| proxy | victim req/s alone | victim req/s attacked | victim keeps | aggressor req/s alone |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0}% | {:.0} |",
            r.name,
            r.closed_alone,
            r.closed_attacked,
            100.0 * r.closed_attacked / r.closed_alone,
            r.aggressor_alone
        );
    }
    if let [weft, envoy] = rows {
        println!(
            "\nweft / envoy sidecars: p99 attacked {:.2}x, p99 degradation {:.2}x vs {:.2}x, closed-loop victim keeps {:.0}% vs {:.0}%",
            weft.p99_attacked / envoy.p99_attacked,
            weft.p99_attacked / weft.p99_alone,
            envoy.p99_attacked / envoy.p99_alone,
            100.0 * weft.closed_attacked / weft.closed_alone,
            100.0 * envoy.closed_attacked / envoy.closed_alone
        );
    }
}
