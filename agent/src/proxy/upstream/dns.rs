//! STRICT_DNS and LOGICAL_DNS clusters: their hosts are resolved (the system resolver, on tokio's blocking
//! pool) when a request needs the cluster and the last resolution is older than `dns_refresh_rate`; a
//! failed resolution keeps the last good endpoints, as Envoy does.

use std::net::SocketAddr;

use super::super::snapshot::Snapshot;
use crate::config::cluster::{Assignment, Discovery, DnsFamily};

/// Brings cluster `name`'s resolution up to date, if it is a DNS cluster.
pub async fn refresh(snapshot: &Snapshot, name: &str) {
    let Some(c) = snapshot.cluster(name) else { return };
    let Discovery::Dns { hosts, logical, refresh, family } = &c.config.discovery else { return };
    if c.state.resolved().is_some_and(|(at, _)| at.elapsed() < *refresh) {
        return;
    }
    let mut addresses: Vec<SocketAddr> = Vec::new();
    for (host, port) in hosts {
        let lookup = tokio::net::lookup_host((host.as_str(), *port));
        match tokio::time::timeout(c.config.connect_timeout, lookup).await {
            Ok(Ok(found)) => addresses.extend(by_family(found.collect(), *family)),
            Ok(Err(e)) => tracing::debug!(cluster = name, host, "DNS resolution failed: {e}"),
            Err(_) => tracing::debug!(cluster = name, host, "DNS resolution timed out"),
        }
    }
    addresses.dedup();
    if *logical {
        addresses.truncate(1);
    }
    if addresses.is_empty() && c.state.resolved().is_some() {
        return;
    }
    c.state.set_resolved(Assignment { priorities: vec![addresses], ..Default::default() });
}

/// The addresses `dns_lookup_family` keeps.
fn by_family(found: Vec<SocketAddr>, family: DnsFamily) -> Vec<SocketAddr> {
    let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = found.into_iter().partition(SocketAddr::is_ipv4);
    match family {
        DnsFamily::V4Only => v4,
        DnsFamily::V6Only => v6,
        DnsFamily::Auto if !v6.is_empty() => v6,
        DnsFamily::Auto => v4,
        DnsFamily::V4Preferred if !v4.is_empty() => v4,
        DnsFamily::V4Preferred => v6,
        DnsFamily::All => v4.into_iter().chain(v6).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::store::Resource;
    use crate::config::tree::Obj;
    use serde_json::json;
    use std::sync::Arc;

    #[tokio::test]
    async fn localhost_resolves_by_family_and_keeps_its_port() {
        let v = json!({"name": "d", "type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY",
            "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "localhost", "port_value": 8080}}}}]}]}});
        let cluster = crate::config::cluster::translate(Obj::new(&v, "c").unwrap()).unwrap();
        let snapshot = Snapshot { clusters: Arc::new([Resource::fixed("d", cluster)].into_iter().collect()), ..Snapshot::default() };
        assert!(snapshot.cluster("d").unwrap().endpoints.is_empty(), "nothing before the first resolution");
        refresh(&snapshot, "d").await;
        assert_eq!(snapshot.cluster("d").unwrap().endpoints.hosts(), vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]);
        let e = crate::config::cluster::translate(Obj::new(&json!({"name": "l", "type": "LOGICAL_DNS", "load_assignment": {"endpoints": []}}), "c").unwrap()).unwrap_err();
        assert_eq!(e.path, "c.load_assignment");
    }
}
