//! Smoke test of the netns cluster harness itself: the real libcni driving
//! bridge + host-local + portmap, without weft in the chain.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::path::Path;
use std::time::Duration;

use weft_tests::{require_root, Cluster, GATEWAY, POD_SUBNET};

fn skip() -> bool {
    match require_root() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipping: {why}");
            true
        }
    }
}

fn in_pod_subnet(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 10 && o[1] == 77 && o[2] < 16 && (o[2], o[3]) != (0, 0) && (o[2], o[3]) != (0, 1)
}

#[test]
fn two_pods_echo_then_check_and_del() {
    if skip() {
        return;
    }
    let cluster = Cluster::new("harness").expect("cluster");
    let conflist = cluster.conflist().expect("conflist");
    let types: Vec<&str> = conflist["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types, ["bridge", "portmap"], "no weft entry by default");

    let (a, add_us) = cluster
        .add_pod_timed("default", "pod-a")
        .expect("ADD pod-a");
    let b = cluster.add_pod("default", "pod-b").expect("ADD pod-b");
    eprintln!("pod-a {} (ADD {add_us} us), pod-b {}", a.ip, b.ip);
    assert!(in_pod_subnet(a.ip), "pod-a ip {}", a.ip);
    assert!(in_pod_subnet(b.ip), "pod-b ip {}", b.ip);
    assert_ne!(a.ip, b.ip);

    // The bridge and its gateway address are the node's, not the host's.
    let node_addrs = cluster
        .node_exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", "cni0"])
        .expect("cni0 in node netns");
    assert!(
        node_addrs.contains(&format!("{GATEWAY}/{}", POD_SUBNET.split('/').nth(1).unwrap())),
        "{node_addrs}"
    );
    let pod_routes = a.netns.exec_ok(&["ip", "-4", "route"]).expect("pod routes");
    assert!(
        pod_routes.contains(&format!("default via {GATEWAY}")),
        "{pod_routes}"
    );

    // TCP echo: server in pod B on 0.0.0.0:8080, client in pod A.
    let listener = b.netns.tcp_listen("0.0.0.0:8080").expect("listen in pod-b");
    let server = std::thread::spawn(move || -> std::io::Result<std::net::SocketAddr> {
        let (mut s, peer) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        s.write_all(&buf)?;
        Ok(peer)
    });
    let mut client = a
        .netns
        .tcp_connect(b.addr(8080), Duration::from_secs(5))
        .expect("connect from pod-a to pod-b:8080");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let msg = b"hello from pod-a through cni0\n";
    client.write_all(msg).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    client.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, msg);
    let peer = server.join().expect("server thread").expect("server io");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(a.ip),
        "pod IP is the source (no masquerade)"
    );

    // Nothing was set up in the host netns: no cni0 there, no pod-subnet
    // address or route. (Don't probe with connect(): on these machines the
    // host's default route leads to an egress proxy that accepts any TCP
    // connection.)
    let host_addrs = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !host_addrs.contains("10.77.0."),
        "pod subnet address in host netns: {host_addrs}"
    );
    let host_route = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["-4", "route", "get", &b.ip.to_string()])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !host_route.contains("cni0"),
        "host routes the pod subnet to cni0: {host_route}"
    );

    cluster.check_pod(&a).expect("CHECK pod-a");
    cluster.check_pod(&b).expect("CHECK pod-b");

    for pod in [&a, &b] {
        let del = cluster.del_pod(pod).expect("DEL");
        eprintln!("DEL {} took {} us", pod.name, del.elapsed_us);
        cluster.del_pod(pod).expect("second DEL must succeed too");
        let eth0 = pod.netns.exec(&["ip", "link", "show", "eth0"]).unwrap();
        assert!(
            !eth0.status.success(),
            "eth0 still in {} after DEL",
            pod.name
        );
        let lease = cluster
            .ipam_dir()
            .join("weft-test")
            .join(pod.ip.to_string());
        assert!(
            !lease.exists(),
            "host-local lease {} not released",
            lease.display()
        );
    }

    cluster.remove_pod(a).expect("remove pod-a");
    cluster.remove_pod(b).expect("remove pod-b");
}

#[test]
fn drop_cleans_up_even_after_panic() {
    if skip() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let cluster = Cluster::new("panic").expect("cluster");
        let pod = cluster.add_pod("default", "doomed").expect("ADD");
        tx.send((
            cluster.node().path().to_path_buf(),
            pod.netns.path().to_path_buf(),
            cluster.work_dir().to_path_buf(),
        ))
        .unwrap();
        // Keep the pod alive past the cluster's Drop to check the cluster
        // removes pod namespaces it made on its own.
        std::mem::forget(pod);
        panic!("deliberate panic inside a test");
    });
    assert!(r.is_err());
    let (node, pod, work) = rx.recv().unwrap();
    for p in [&node, &pod, &work] {
        assert!(!Path::new(p).exists(), "{} left behind", p.display());
    }
}

/// A chained plugin that fails ADD with a CNI error: the failure carries the
/// plugin's error object, and add_pod cleans up like a runtime (DEL, netns
/// removal, IP released). Also checks the weft entry's shape in the conflist
/// and that the driver's environment reaches plugins.
#[test]
fn failing_chained_plugin_is_reported_and_cleaned_up() {
    if skip() {
        return;
    }
    let scratch = std::env::temp_dir().join(format!("weft-fake-cni-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let plugin = scratch.join("fake-weft-cni");
    let calls = scratch.join("calls.log");
    std::fs::write(
        &plugin,
        r#"#!/bin/sh
in=$(cat)
printf '%s %s\n' "$CNI_COMMAND" "$in" >> "$FAKE_LOG"
case "$CNI_COMMAND" in
  ADD) echo '{"cniVersion":"1.0.0","code":100,"msg":"weft agent unreachable","details":"no socket"}'; exit 1 ;;
  *) exit 0 ;;
esac
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut opts = weft_tests::ClusterOptions::with_weft(
        weft_tests::WeftEntry::new(&plugin, "agent.sock")
            .field("excluded_namespaces", serde_json::json!(["kube-system"])),
    );
    opts.driver_env
        .push(("FAKE_LOG".into(), calls.display().to_string()));
    let cluster = Cluster::with_options("fail", opts).expect("cluster");
    let conflist = cluster.conflist().unwrap();
    let entry = &conflist["plugins"][2];
    assert_eq!(entry["type"], "weft-cni");
    assert_eq!(
        entry["agent_socket"].as_str().map(Path::new),
        Some(cluster.work_dir().join("agent.sock").as_path())
    );
    assert_eq!(entry["excluded_namespaces"][0], "kube-system");
    assert!(entry["log_file"]
        .as_str()
        .unwrap()
        .ends_with("weft-cni.log"));

    let failure = cluster
        .add_pod("default", "unlucky")
        .expect_err("ADD must fail");
    eprintln!("{failure}");
    assert_eq!(failure.status, Some(1));
    let cni_error = failure.cni_error.clone().expect("plugin's CNI error");
    assert_eq!(cni_error.code, 100);
    assert_eq!(cni_error.msg, "weft agent unreachable");
    assert!(
        failure.message().contains("weft agent unreachable"),
        "{}",
        failure.message()
    );
    assert!(failure.elapsed_us.is_some());
    assert!(failure.cleanup.is_none(), "cleanup: {:?}", failure.cleanup);

    let log = std::fs::read_to_string(&calls).unwrap();
    let commands: Vec<&str> = log.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(commands, ["ADD", "DEL"], "{log}");
    assert!(
        log.contains("\"prevResult\""),
        "chained plugin gets prevResult: {log}"
    );
    let ipam = cluster.ipam_dir().join("weft-test");
    let leases: Vec<_> = std::fs::read_dir(&ipam)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(
        leases.is_empty(),
        "leases left after failed ADD: {leases:?}"
    );
    let netns = std::fs::read_dir("/var/run/netns")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("wp-{}-", cluster.id())))
        .collect::<Vec<_>>();
    assert!(
        netns.is_empty(),
        "pod netns left after failed ADD: {netns:?}"
    );

    // Processes on the node see the node's interfaces (setns, not ip netns exec).
    let out = cluster
        .node_command("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let links = String::from_utf8_lossy(&out.stdout);
    assert!(links.contains("cni0"), "{links}");
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600");
    let child = cluster.node_spawn(cmd).expect("spawn on node");
    let pid = child.id();
    let node_ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let own_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(node_ns, own_ns, "spawned process must be in the node netns");
    drop(child);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "guard did not stop the node process"
    );

    drop(cluster);
    let _ = std::fs::remove_dir_all(&scratch);
}
