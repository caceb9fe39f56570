//! `cargo xtask bench kube`: what the Kubernetes watch costs on a node with many pods, against the real API
//! server and etcd of the tests. The agent's memory with its watch holding N pod objects of its node (kubelet's
//! share of a busy node: 110 by default, 1,000 here), and the CNI ADD latency of real pods with and without the
//! watch (each ADD then waits for the pod to be in the watch and decides its capture from its labels).

use serde_json::json;
use weft_tests::agent::{Agent, ADMIN};
use weft_tests::kube::KubeApi;

use crate::bench::{percentile, release_build, rss_kib, weft_cluster};

pub fn run(args: &[&str]) -> Result<(), String> {
    let (objects, pods) = match args {
        [] => (1000usize, 50usize),
        ["--objects", o, "--pods", p] => (o.parse().map_err(|_| "--objects: not a number")?, p.parse().map_err(|_| "--pods: not a number")?),
        _ => return Err("usage: cargo xtask bench kube [--objects N --pods M]".into()),
    };
    release_build()?;
    let e = |e: &dyn std::fmt::Display| e.to_string();

    // Without the watch: every pod weft-cni hands over is captured.
    let cluster = weft_cluster("bench-kube0")?;
    let agent = Agent::start(&cluster, "iptables").map_err(|x| e(&x))?;
    let mut without = Vec::new();
    for i in 0..pods {
        let (_, us) = cluster.add_pod_timed("bench", &format!("p{i}")).map_err(|x| e(&x))?;
        without.push(us as f64 / 1000.0);
    }
    drop(agent);
    drop(cluster);

    let cluster = weft_cluster("bench-kube")?;
    let api = KubeApi::start(cluster.node()).map_err(|x| e(&x))?;
    api.create_namespace("bench", json!({"istio-injection": "enabled"})).map_err(|x| e(&x))?;
    let kubeconfig = api.agent_kubeconfig().map_err(|x| e(&x))?;
    let kubeconfig = kubeconfig.to_string_lossy();
    let agent = Agent::start_with_args(&cluster, "iptables", ADMIN, &["--node-name", cluster.id(), "--kubeconfig", &kubeconfig]).map_err(|x| e(&x))?;
    let pid = agent.pid().ok_or("agent has no pid")?;
    let watched = |n: usize| {
        weft_tests::wait_for(&format!("{n} pods in the agent's watch"), std::time::Duration::from_secs(120), || {
            let status = agent.status().map_err(|x| x.to_string())?;
            let held = status["kube"]["pods"].as_u64().unwrap_or(0) as usize;
            if held >= n { Ok(()) } else { Err(format!("{held}/{n}")) }
        })
        .map_err(|x| e(&x))
    };
    watched(0)?;
    let before = rss_kib(pid);
    // Pods of the node the agent only watches (their sandboxes are not made here), labelled as real ones are.
    for i in 0..objects {
        let metadata = json!({"labels": {"app": format!("app{}", i % 50), "version": "v1", "pod-template-hash": "5d4f8c7b9"}});
        api.create_pod("bench", &format!("w{i}"), cluster.id(), metadata, json!({"serviceAccountName": "default"})).map_err(|x| e(&x))?;
    }
    watched(objects)?;
    let after = rss_kib(pid);
    let mut with = Vec::new();
    for i in 0..pods {
        let (_, us) = api.run_pod_timed(&cluster, "bench", &format!("p{i}"), json!({"labels": {"app": "p"}}), json!({})).map_err(|x| e(&x))?;
        with.push(us as f64 / 1000.0);
    }

    println!("\nweft-agent run with the Kubernetes watch, real kube-apiserver {} and etcd on this machine (release build)\n", "v1.36.3");
    println!("| agent memory | RSS (MiB) |");
    println!("|---|---|");
    println!("| watch synced, 0 pods on the node | {:.1} |", before as f64 / 1024.0);
    println!("| watch holding {objects} pods of the node | {:.1} |", after as f64 / 1024.0);
    println!("| per pod object held | {:.1} KiB |", (after as f64 - before as f64) / objects as f64);
    println!("\nCNI ADD latency through libcni (bridge + host-local + portmap + weft-cni), {pods} pods per row (ms)\n");
    println!("| agent | p50 | p99 |");
    println!("|---|---|---|");
    println!("| without the watch (every pod captured) | {:.2} | {:.2} |", percentile(&without, 50.0), percentile(&without, 99.0));
    println!("| with the watch ({objects} pods held; capture decided from labels) | {:.2} | {:.2} |", percentile(&with, 50.0), percentile(&with, 99.0));
    Ok(())
}
