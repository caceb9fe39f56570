//! `cargo xtask bench cni`: what weft-cni adds to a pod's CNI ADD. Both chains run in one go on this machine
//! through the real libcni: bridge + host-local + portmap, then the same plus weft-cni with a running agent
//! (release builds). The time is the one libcni reports for the whole chain.

use weft_tests::agent::Agent;
use weft_tests::{bin_path, Cluster, ClusterOptions, WeftEntry};

use crate::{cargo, run as run_cmd, setup, workspace_root};

pub fn cni(args: &[&str]) -> Result<(), String> {
    let pods = match args {
        [] => 100,
        ["--pods", n] => n.parse().map_err(|_| format!("--pods {n}: not a number"))?,
        _ => return Err("usage: cargo xtask bench cni [--pods N]".into()),
    };
    setup::run()?;
    setup::require_root("the benchmark creates network namespaces")?;
    let root = workspace_root();
    run_cmd(cargo().current_dir(&root).args(["build", "--quiet", "--release", "-p", "weft-agent", "-p", "weft-cni"]))?;
    let release = std::env::var("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|_| root.join("target")).join("release");
    std::env::set_var("WEFT_BIN_DIR", &release);
    let e = |e: &dyn std::fmt::Display| e.to_string();

    let plain = Cluster::new("bench-plain").map_err(|x| e(&x))?;
    let without = add_times(&plain, pods)?;
    let entry = WeftEntry::new(bin_path("weft-cni").map_err(|x| e(&x))?, "run/cni.sock");
    let meshed = Cluster::with_options("bench-weft", ClusterOptions::with_weft(entry)).map_err(|x| e(&x))?;
    let mut rows = vec![("bridge+host-local+portmap", without)];
    for mode in ["iptables", "nftables"] {
        let mut agent = Agent::start(&meshed, mode).map_err(|x| e(&x))?;
        let name = if mode == "iptables" { "+ weft-cni (iptables)" } else { "+ weft-cni (nftables)" };
        rows.push((name, add_times(&meshed, pods)?));
        agent.stop().map_err(|x| e(&x))?;
    }

    println!("\nCNI ADD latency through libcni, {pods} pods per row (ms)\n");
    println!("| chain | p50 | p99 | p50 added by weft | p99 added by weft |");
    println!("|---|---|---|---|---|");
    let (base50, base99) = (percentile(&rows[0].1, 50.0), percentile(&rows[0].1, 99.0));
    for (i, (name, times)) in rows.iter().enumerate() {
        let (p50, p99) = (percentile(times, 50.0), percentile(times, 99.0));
        let added = |v: f64, base: f64| if i == 0 { "-".to_string() } else { format!("{:+.2}", v - base) };
        println!("| {name} | {p50:.2} | {p99:.2} | {} | {} |", added(p50, base50), added(p99, base99));
    }
    Ok(())
}

/// ADDs `pods` pods (timing each), then DELs them.
fn add_times(cluster: &Cluster, pods: usize) -> Result<Vec<f64>, String> {
    let mut times = Vec::with_capacity(pods);
    let mut made = Vec::with_capacity(pods);
    for i in 0..pods {
        let (pod, us) = cluster.add_pod_timed("bench", &format!("p{i}")).map_err(|e| e.to_string())?;
        times.push(us as f64 / 1000.0);
        made.push(pod);
    }
    for pod in made {
        cluster.del_pod(&pod).map_err(|e| e.to_string())?;
        cluster.remove_pod(pod).map_err(|e| e.to_string())?;
    }
    Ok(times)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted.get(rank).copied().unwrap_or(f64::NAN)
}
