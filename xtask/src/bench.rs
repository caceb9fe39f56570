//! `cargo xtask bench cni`: what weft-cni adds to a pod's CNI ADD. Both chains run in one go on this machine
//! through the real libcni: bridge + host-local + portmap, then the same plus weft-cni with a running agent
//! (release builds). The times are the ones libcni reports for the whole chain and for each plugin's run.

use std::collections::{BTreeMap, BTreeSet};

use weft_tests::agent::{Agent, ADMIN};
use weft_tests::load;
use weft_tests::{bin_path, Cluster, ClusterOptions, Pod, PodOptions, WeftEntry};

use crate::{cargo, cni_plugin, ebpf, run as run_cmd, setup, target_dir, workspace_root};

/// Release builds of the binaries and the eBPF object, used by every benchmark.
pub(crate) fn release_build() -> Result<(), String> {
    setup::run()?;
    setup::require_root("the benchmarks create network namespaces")?;
    ebpf::build()?;
    run_cmd(cargo().current_dir(workspace_root()).args(["build", "--quiet", "--release", "-p", "weft-agent"]))?;
    cni_plugin::build(true)?;
    std::env::set_var("WEFT_BIN_DIR", target_dir().join("release"));
    Ok(())
}

pub(crate) fn weft_cluster(name: &str) -> Result<Cluster, String> {
    let entry = WeftEntry::new(bin_path("weft-cni").map_err(|e| e.to_string())?, "run/cni.sock");
    Cluster::with_options(name, ClusterOptions::with_weft(entry)).map_err(|e| e.to_string())
}

pub fn cni(args: &[&str]) -> Result<(), String> {
    const USAGE: &str = "usage: cargo xtask bench cni [--pods N[,M...]]";
    let counts: Vec<usize> = match args {
        [] => vec![100],
        ["--pods", list] => list.split(',').map(|n| n.parse().ok().filter(|n| *n > 0).ok_or(format!("--pods {list}: not a list of pod counts; {USAGE}"))).collect::<Result<_, _>>()?,
        _ => return Err(USAGE.into()),
    };
    release_build()?;
    for pods in counts {
        cni_table(pods)?;
    }
    Ok(())
}

/// One table: the bridge chain alone, then with weft-cni in each capture mode, `pods` ADDs per row. Every row
/// has its own node (an agent each, all running at once) and the ADDs take turns across the rows, so a slow
/// spell of this shared machine falls on every row alike instead of on whichever row ran then.
fn cni_table(pods: usize) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut rows = vec![("bridge+host-local+portmap".to_string(), Cluster::new("bench-plain").map_err(|x| e(&x))?, None)];
    // The floor of any chained plugin: libcni runs weft-cni, which passes the result on without asking the
    // agent (the pods' namespace is excluded).
    let entry = WeftEntry::new(bin_path("weft-cni").map_err(|x| e(&x))?, "run/cni.sock").field("exclude_namespaces", serde_json::json!(["bench"]));
    let floor = Cluster::with_options("bench-floor", ClusterOptions::with_weft(entry)).map_err(|x| e(&x))?;
    rows.push(("+ weft-cni, namespace excluded (no agent call)".to_string(), floor, None));
    for mode in ["iptables", "nftables", "ebpf"] {
        let cluster = weft_cluster(&format!("bench-{mode}"))?;
        let agent = Agent::start(&cluster, mode).map_err(|x| e(&x))?;
        rows.push((format!("+ weft-cni ({mode})"), cluster, Some(agent)));
    }
    let mut times = vec![Vec::with_capacity(pods); rows.len()];
    // Per row, each plugin's runs as libcni timed them (exec until it had the output).
    let mut plugin_times: Vec<BTreeMap<String, Vec<f64>>> = vec![BTreeMap::new(); rows.len()];
    let mut made: Vec<Vec<Pod>> = (0..rows.len()).map(|_| Vec::with_capacity(pods)).collect();
    for i in 0..pods {
        for (row, (_, cluster, _)) in rows.iter().enumerate() {
            let (pod, out) = cluster.add_pod_with("bench", &format!("p{i}"), &PodOptions::default()).map_err(|x| e(&x))?;
            times[row].push(out.elapsed_us as f64 / 1000.0);
            for (plugin, us) in out.plugins_us {
                plugin_times[row].entry(plugin).or_default().push(us as f64 / 1000.0);
            }
            made[row].push(pod);
        }
    }
    for ((_, cluster, agent), pods) in rows.iter_mut().zip(made) {
        for pod in pods {
            cluster.del_pod(&pod).map_err(|x| e(&x))?;
            cluster.remove_pod(pod).map_err(|x| e(&x))?;
        }
        if let Some(agent) = agent {
            agent.stop().map_err(|x| e(&x))?;
        }
    }

    println!("\nCNI ADD latency through libcni, {pods} pods per row, the rows' ADDs interleaved (ms)\n");
    println!("| chain | p50 | p99 | p50 added by weft | p99 added by weft | weft-cni's run p50 | weft-cni's run p99 |");
    println!("|---|---|---|---|---|---|---|");
    let (base50, base99) = (percentile(&times[0], 50.0), percentile(&times[0], 99.0));
    for (i, ((name, _, _), times)) in rows.iter().zip(&times).enumerate() {
        let (p50, p99) = (percentile(times, 50.0), percentile(times, 99.0));
        let added = |v: f64, base: f64| if i == 0 { "-".to_string() } else { format!("{:+.2}", v - base) };
        let run = |p: f64| plugin_times[i].get("weft-cni").map_or("-".to_string(), |t| format!("{:.2}", percentile(t, p)));
        println!("| {name} | {p50:.2} | {p99:.2} | {} | {} | {} | {} |", added(p50, base50), added(p99, base99), run(50.0), run(99.0));
    }
    print_plugin_table(&rows.iter().map(|(name, _, _)| name.as_str()).collect::<Vec<_>>(), &plugin_times);
    Ok(())
}

/// Each plugin's p50 run time per row: whether weft's rows slowed the plugins before weft-cni too.
fn print_plugin_table(rows: &[&str], plugin_times: &[BTreeMap<String, Vec<f64>>]) {
    let plugins: BTreeSet<&String> = plugin_times.iter().flat_map(BTreeMap::keys).collect();
    println!("\nEach plugin's run as libcni timed it, p50 (ms)\n");
    println!("| chain | {} |", plugins.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" | "));
    println!("|---|{}", "---|".repeat(plugins.len()));
    for (name, times) in rows.iter().zip(plugin_times) {
        let cells: Vec<String> = plugins.iter().map(|p| times.get(*p).map_or("-".to_string(), |t| format!("{:.2}", percentile(t, 50.0)))).collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}

pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted.get(rank).copied().unwrap_or(f64::NAN)
}

/// A capture mode: `weft-agent run --redirect MODE FLAGS...`, or `None` for no agent at all.
type Capture = Option<(&'static str, &'static [&'static str])>;

/// The capture modes compared by `bench capture`.
const CAPTURE_ROWS: [(&str, Capture); 5] = [
    ("no capture", None),
    ("iptables", Some(("iptables", &[]))),
    ("nftables", Some(("nftables", &[]))),
    ("ebpf", Some(("ebpf", &["--sockmap", "false"]))),
    ("ebpf + sockmap", Some(("ebpf", &["--sockmap", "true"]))),
];

/// `cargo xtask bench capture`: same-node pod-to-pod request/response latency and bulk throughput for each
/// capture mode, all measured in one run on this machine.
pub fn capture(args: &[&str]) -> Result<(), String> {
    let (round_trips, bulk_mib) = match args {
        [] => (5000, 256u64),
        ["--round-trips", n, "--bulk-mib", m] => (
            n.parse().map_err(|_| format!("--round-trips {n}: not a number"))?,
            m.parse().map_err(|_| format!("--bulk-mib {m}: not a number"))?,
        ),
        _ => return Err("usage: cargo xtask bench capture [--round-trips N --bulk-mib M]".into()),
    };
    release_build()?;
    let mut rows = Vec::new();
    for (name, capture) in CAPTURE_ROWS {
        let cluster = match capture {
            None => Cluster::new("bench-cap").map_err(|e| e.to_string())?,
            Some(_) => weft_cluster("bench-cap")?,
        };
        let _agent = match capture {
            Some((mode, flags)) => Some(Agent::start_with_args(&cluster, mode, ADMIN, flags).map_err(|e| e.to_string())?),
            None => None,
        };
        let a = cluster.add_pod("bench", "client").map_err(|e| e.to_string())?;
        let b = cluster.add_pod("bench", "server").map_err(|e| e.to_string())?;
        load::start_server(&b.netns, 9000).map_err(|e| e.to_string())?;
        // Warm-up, then the measured runs.
        load::round_trips(&a.netns, b.addr(9000), 200).map_err(|e| format!("{name}: {e}"))?;
        let times = load::round_trips(&a.netns, b.addr(9000), round_trips).map_err(|e| format!("{name}: {e}"))?;
        let gbps = load::bulk(&a.netns, b.addr(9000), bulk_mib << 20).map_err(|e| format!("{name}: {e}"))?;
        eprintln!("xtask: {name}: done");
        rows.push((name, percentile(&times, 50.0), percentile(&times, 99.0), gbps));
    }
    let (base50, base99, base_gbps) = (rows[0].1, rows[0].2, rows[0].3);
    let iptables_added = rows[1].1 - base50;
    println!("\nSame-node pod-to-pod TCP, {round_trips} round trips of {} B on one connection, {bulk_mib} MiB bulk\n", load::MESSAGE);
    println!("| capture | RR p50 (µs) | RR p99 (µs) | p50 added | added / iptables added | bulk (Gbit/s) | bulk vs no capture |");
    println!("|---|---|---|---|---|---|---|");
    for (name, p50, p99, gbps) in &rows {
        let added = p50 - base50;
        let vs_iptables = if *name == "no capture" { "-".to_string() } else { format!("{:.2}", added / iptables_added) };
        println!(
            "| {name} | {p50:.1} | {p99:.1} | {added:+.1} | {vs_iptables} | {gbps:.2} | {:.2}x |",
            gbps / base_gbps
        );
    }
    let _ = base99;
    Ok(())
}

/// `cargo xtask bench xds [--clusters N]`: one ADS push of N clusters and a listener with N routes (one per
/// cluster), applied by weft and by the real Envoy in the same run: time from the push to the ACK of each
/// type, and resident memory after it.
pub fn xds(args: &[&str]) -> Result<(), String> {
    use weft_tests::xds_server::{XdsServer, CLUSTER, LISTENER};
    let n: usize = match args {
        [] => 10_000,
        ["--clusters", n] => n.parse().map_err(|_| format!("--clusters {n}: not a number"))?,
        _ => return Err("usage: cargo xtask bench xds [--clusters N]".into()),
    };
    release_build()?;
    let clusters: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{name: c{i}, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: c{i}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]}}}}",
                20000 + i % 1000
            )
        })
        .collect();
    let routes: Vec<String> = (0..n).map(|i| format!("{{match: {{prefix: \"/c{i}/\"}}, route: {{cluster: c{i}}}}}")).collect();
    let listener = format!(
        "{{name: http, address: {{socket_address: {{address: 127.0.0.1, port_value: 19200}}}}, filter_chains: [{{filters: [{{name: hcm, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: h, route_config: {{name: r, virtual_hosts: [{{name: all, domains: [\"*\"], routes: [{}]}}]}}, http_filters: [{{name: router, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]}}]}}",
        routes.join(", ")
    );
    let work = std::env::temp_dir().join(format!("weft-bench-xds-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let config = work.join("bootstrap.yaml");
    std::fs::write(&config, weft_tests::xds_server::ads_bootstrap("GRPC")).map_err(|e| e.to_string())?;
    let weft = bin_path("weft-agent").map_err(|e| e.to_string())?;
    let envoy = weft_tests::envoy_path().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for (name, program, args) in [
        ("weft", weft.clone(), vec!["proxy", "--concurrency", "2", "--log-level", "warn", "-c"]),
        ("envoy", envoy, vec!["--concurrency", "2", "--log-level", "warn", "-c"]),
    ] {
        let ns = weft_tests::NetNs::create_with_lo(&format!("wbx-{}", std::process::id() % 100_000)).map_err(|e| e.to_string())?;
        let server = XdsServer::start(&ns, "127.0.0.1:18000".parse().map_err(|e| format!("{e}"))?).map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(&args).arg(&config).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        ns.enter_on_spawn(&mut cmd);
        let child = weft_tests::ChildGuard::new(cmd.spawn().map_err(|e| e.to_string())?, name);
        // An empty first state, so the process is up and subscribed before the measured push.
        server.set(CLUSTER, "0", &[]).map_err(|e| e.to_string())?;
        server.set(LISTENER, "0", &[]).map_err(|e| e.to_string())?;
        server.wait_request("subscribed", |r| r.type_url == LISTENER && r.is_ack()).map_err(|e| e.to_string())?;
        let rss_before = rss_kib(child.id());
        let cluster_refs: Vec<&str> = clusters.iter().map(String::as_str).collect();
        let encoded_clusters = XdsServer::encode(CLUSTER, &cluster_refs).map_err(|e| e.to_string())?;
        let encoded_listener = XdsServer::encode(LISTENER, &[&listener]).map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        server.publish(CLUSTER, "1", encoded_clusters);
        server.publish(LISTENER, "1", encoded_listener);
        let ack = |t: &'static str| {
            server.wait_request(&format!("{name} ACK of {t}"), |r| r.type_url == t && r.version_info == "1" && r.is_ack())
        };
        ack(CLUSTER).map_err(|e| e.to_string())?;
        let clusters_at = started.elapsed();
        ack(LISTENER).map_err(|e| e.to_string())?;
        let all_at = started.elapsed();
        let rss_after = rss_kib(child.id());
        eprintln!("xtask: {name}: done");
        rows.push((name, clusters_at, all_at, rss_before, rss_after));
        drop(child);
        drop(server);
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("\nOne ADS push of {n} clusters + a listener with {n} routes (state of the world), same machine, one run\n");
    println!("| proxy | clusters ACKed (s) | all ACKed (s) | RSS before (MiB) | RSS after (MiB) | vs Envoy (time) |");
    println!("|---|---|---|---|---|---|");
    let envoy_time = rows.iter().find(|r| r.0 == "envoy").map(|r| r.2.as_secs_f64()).unwrap_or(f64::NAN);
    for (name, clusters_at, all_at, before, after) in &rows {
        println!(
            "| {name} | {:.3} | {:.3} | {:.1} | {:.1} | {:.2}x |",
            clusters_at.as_secs_f64(),
            all_at.as_secs_f64(),
            *before as f64 / 1024.0,
            *after as f64 / 1024.0,
            all_at.as_secs_f64() / envoy_time
        );
    }
    Ok(())
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// `cargo xtask bench pods [--pods N] [--clusters M]`: the agent's resident memory per captured pod, with
/// and without a per-pod xDS stream, every pod receiving the same M clusters and one listener.
pub fn pods(args: &[&str]) -> Result<(), String> {
    use weft_tests::xds_server::{XdsServer, CLUSTER, LISTENER};
    let (pods, clusters) = match args {
        [] => (100usize, 1000usize),
        ["--pods", p, "--clusters", c] => (p.parse().map_err(|_| "--pods: not a number")?, c.parse().map_err(|_| "--clusters: not a number")?),
        _ => return Err("usage: cargo xtask bench pods [--pods N --clusters M]".into()),
    };
    release_build()?;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let cluster_yaml: Vec<String> = (0..clusters)
        .map(|i| format!("{{name: svc{i}, type: STATIC, connect_timeout: 1s, load_assignment: {{cluster_name: svc{i}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 10.96.{}.{}, port_value: 80}}}}}}}}]}}]}}}}", i / 250, i % 250))
        .collect();
    let listener = "{name: virtualOutbound, address: {socket_address: {address: 0.0.0.0, port_value: 15001}}, filter_chains: [{filters: [{name: tcp, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: out, cluster: svc0}}]}]}";
    let mut rows = Vec::new();
    for with_xds in [false, true] {
        let cluster = weft_cluster("bench-pods")?;
        let server = XdsServer::start(cluster.node(), "127.0.0.1:18000".parse().map_err(|x| e(&x))?).map_err(|x| e(&x))?;
        let refs: Vec<&str> = cluster_yaml.iter().map(String::as_str).collect();
        server.set(CLUSTER, "1", &refs).map_err(|x| e(&x))?;
        server.set(LISTENER, "1", &[listener]).map_err(|x| e(&x))?;
        let args: &[&str] = if with_xds { &["--xds-address", "127.0.0.1:18000"] } else { &[] };
        let agent = Agent::start_with_args(&cluster, "iptables", ADMIN, args).map_err(|x| e(&x))?;
        let pid = agent.pid().ok_or("agent has no pid")?;
        let mut made = Vec::new();
        let mut rss = Vec::new();
        for target in [1, pods] {
            while made.len() < target {
                made.push(cluster.add_pod("bench", &format!("p{}", made.len())).map_err(|x| e(&x))?);
            }
            if with_xds {
                weft_tests::wait_for("every pod SYNCED", std::time::Duration::from_secs(120), || {
                    let status = agent.status().map_err(|x| x.to_string())?;
                    let synced = status["pods"].as_array().into_iter().flatten().filter(|p| p["xds"]["CDS"] == "SYNCED").count();
                    if synced == target { Ok(()) } else { Err(format!("{synced}/{target}")) }
                })
                .map_err(|x| e(&x))?;
            }
            rss.push(rss_kib(pid));
        }
        let marginal = (rss[1] as f64 - rss[0] as f64) / (pods as f64 - 1.0);
        eprintln!("xtask: pods with_xds={with_xds}: done");
        rows.push((with_xds, rss[0], rss[1], marginal));
    }
    println!("\nweft-agent run, {pods} pods, each receiving the same {clusters} clusters + 1 listener over its own xDS stream\n");
    println!("| agent | RSS with 1 pod (MiB) | RSS with {pods} pods (MiB) | marginal per pod (KiB) |");
    println!("|---|---|---|---|");
    for (with_xds, one, all, marginal) in &rows {
        let name = if *with_xds { "capture + per-pod xDS" } else { "capture only" };
        println!("| {name} | {:.1} | {:.1} | {marginal:.0} |", *one as f64 / 1024.0, *all as f64 / 1024.0);
    }
    if let [(_, _, _, without), (_, _, _, with)] = rows.as_slice() {
        println!("\nper-pod cost of the xDS stream and its configuration: {:.0} KiB", with - without);
    }
    Ok(())
}
