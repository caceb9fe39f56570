//! STRICT_DNS and LOGICAL_DNS clusters: their hosts are resolved (hickory's stub resolver with the system's
//! /etc/resolv.conf and /etc/hosts, and no cache, as Envoy's c-ares resolver) when a request needs the
//! cluster and the last resolution is due for a refresh: after `dns_refresh_rate`, or with
//! `respect_dns_ttl` after the smallest TTL of the answer. A failed resolution keeps the last good
//! endpoints, as Envoy does.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use super::super::snapshot::Snapshot;
use crate::config::cluster::{Assignment, Discovery, DnsFamily};

/// Brings cluster `name`'s resolution up to date, if it is a DNS cluster.
pub async fn refresh(snapshot: &Snapshot, name: &str) {
    let Some(c) = snapshot.cluster(name) else { return };
    let Discovery::Dns { family, .. } = &c.config.discovery else { return };
    if !due(&c) {
        return;
    }
    // The system configuration is read for each refresh: a resolver belongs to the runtime it was built on,
    // and the files are small.
    match system_resolver(*family) {
        Ok(resolver) => refresh_with(snapshot, name, &resolver).await,
        Err(e) => tracing::debug!(cluster = name, "no DNS resolver: {e}"),
    }
}

/// A resolver with the system's configuration, asking only for the families `family` may keep. Without a
/// readable /etc/resolv.conf the name server is 127.0.0.1, as for c-ares and the C library.
fn system_resolver(family: DnsFamily) -> Result<TokioResolver, hickory_resolver::net::NetError> {
    let mut builder = TokioResolver::builder_tokio().unwrap_or_else(|e| {
        tracing::debug!("no system DNS configuration ({e}); using 127.0.0.1");
        let local = NameServerConfig::udp_and_tcp(IpAddr::from([127, 0, 0, 1]));
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(vec![local]), TokioRuntimeProvider::default())
    });
    configure(builder.options_mut(), family);
    builder.build()
}

/// What every DNS cluster resolver does: no cache (a refresh asks again, as c-ares does), /etc/hosts first.
fn configure(options: &mut hickory_resolver::config::ResolverOpts, family: DnsFamily) {
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Always;
    options.ip_strategy = match family {
        DnsFamily::V4Only => LookupIpStrategy::Ipv4Only,
        DnsFamily::V6Only => LookupIpStrategy::Ipv6Only,
        _ => LookupIpStrategy::Ipv4AndIpv6,
    };
}

/// Whether the cluster was never resolved or its last resolution is due for a refresh.
fn due(c: &super::super::snapshot::ClusterRef<'_>) -> bool {
    c.state.resolved().is_none_or(|(due, _)| std::time::Instant::now() >= due)
}

/// Resolves cluster `name`'s hosts with `resolver`, if they are due, and stores the endpoints and when to
/// refresh them.
async fn refresh_with(snapshot: &Snapshot, name: &str, resolver: &TokioResolver) {
    let Some(c) = snapshot.cluster(name) else { return };
    let Discovery::Dns { hosts, logical, refresh, family, respect_dns_ttl } = &c.config.discovery else { return };
    if !due(&c) {
        return;
    }
    let mut addresses: Vec<SocketAddr> = Vec::new();
    let mut ttl: Option<u32> = None;
    for (host, port) in hosts {
        match tokio::time::timeout(c.config.connect_timeout, resolver.lookup_ip(host.as_str())).await {
            Ok(Ok(found)) => {
                let records: Vec<(IpAddr, u32)> = found.as_lookup().answers().iter().filter_map(|r| Some((r.data.ip_addr()?, r.ttl))).collect();
                let mut kept = by_family(records, *family);
                if *logical {
                    kept.truncate(1);
                }
                // As Envoy's: the smallest TTL of the records used (hosts-file entries and literal addresses
                // have none).
                ttl = kept.iter().map(|(_, t)| *t).filter(|t| *t < hickory_resolver::MAX_TTL).chain(ttl).min();
                addresses.extend(kept.into_iter().map(|(ip, _)| SocketAddr::new(ip, *port)));
            }
            Ok(Err(e)) => tracing::debug!(cluster = name, host, "DNS resolution failed: {e}"),
            Err(_) => tracing::debug!(cluster = name, host, "DNS resolution timed out"),
        }
    }
    let mut unique: Vec<SocketAddr> = Vec::with_capacity(addresses.len());
    for a in addresses {
        if !unique.contains(&a) {
            unique.push(a);
        }
    }
    let addresses = unique;
    let next = next_refresh(*refresh, *respect_dns_ttl, ttl);
    if addresses.is_empty() {
        if let Some((_, last)) = c.state.resolved() {
            c.state.set_resolved((*last).clone(), next);
            return;
        }
    }
    c.state.set_resolved(Assignment { priorities: vec![addresses], ..Default::default() }, next);
}

/// Envoy's refresh interval: the answer's TTL with `respect_dns_ttl` (unless it is 0), else
/// `dns_refresh_rate`. (Envoy keeps one timer per host; weft refreshes a cluster's hosts together, at the
/// earliest of their TTLs.)
fn next_refresh(refresh: Duration, respect_dns_ttl: bool, ttl: Option<u32>) -> Duration {
    match ttl {
        Some(t) if respect_dns_ttl && t > 0 => Duration::from_secs(u64::from(t)),
        _ => refresh,
    }
}

/// The addresses (with their TTLs) `dns_lookup_family` keeps.
fn by_family(found: Vec<(IpAddr, u32)>, family: DnsFamily) -> Vec<(IpAddr, u32)> {
    let (v4, v6): (Vec<_>, Vec<_>) = found.into_iter().partition(|(ip, _)| ip.is_ipv4());
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
    use hickory_resolver::config::ConnectionConfig;
    use serde_json::json;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    fn dns_cluster(name: &str, host: &str, extra: serde_json::Value) -> crate::config::cluster::Cluster {
        let mut v = json!({"name": name, "type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY",
            "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": 8080}}}}]}]}});
        if let (Some(m), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            m.extend(extra.clone());
        }
        crate::config::cluster::translate(Obj::new(&v, "c").unwrap()).unwrap()
    }

    fn snapshot(clusters: Vec<crate::config::cluster::Cluster>) -> Snapshot {
        let entries = clusters.into_iter().map(|c| Resource::fixed(&c.name.clone(), c));
        Snapshot { clusters: Arc::new(entries.collect()), ..Snapshot::default() }
    }

    fn endpoints(s: &Snapshot, name: &str) -> Vec<SocketAddr> {
        s.cluster(name).unwrap().endpoints.hosts()
    }

    #[tokio::test]
    async fn localhost_resolves_by_family_and_keeps_its_port() {
        let snapshot = snapshot(vec![dns_cluster("d", "localhost", json!({}))]);
        assert!(snapshot.cluster("d").unwrap().endpoints.is_empty(), "nothing before the first resolution");
        refresh(&snapshot, "d").await;
        assert_eq!(endpoints(&snapshot, "d"), vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]);
        let e = crate::config::cluster::translate(Obj::new(&json!({"name": "l", "type": "LOGICAL_DNS", "load_assignment": {"endpoints": []}}), "c").unwrap()).unwrap_err();
        assert_eq!(e.path, "c.load_assignment");
    }

    /// A DNS server on loopback (UDP) answering A queries for the names in `answers` (address, TTL);
    /// anything else gets an empty answer.
    type Answers = Arc<Mutex<HashMap<String, (Ipv4Addr, u32)>>>;

    async fn dns_server(answers: Answers) -> SocketAddr {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                if let Some(reply) = answer(&buf[..n], &answers) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        addr
    }

    /// The reply to one query: its header and question, and an A record when the name is known.
    fn answer(query: &[u8], answers: &Answers) -> Option<Vec<u8>> {
        let mut at = 12;
        let mut labels = Vec::new();
        while *query.get(at)? != 0 {
            let len = usize::from(query[at]);
            labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_ascii_lowercase());
            at += 1 + len;
        }
        let question_end = at + 5;
        let qtype = u16::from_be_bytes([*query.get(at + 1)?, *query.get(at + 2)?]);
        let found = answers.lock().unwrap().get(&labels.join(".")).copied().filter(|_| qtype == 1);
        let mut reply = query.get(..question_end)?.to_vec();
        reply[2] = 0x81; // response, recursion desired
        reply[3] = 0x80; // recursion available, NOERROR
        reply[6..8].copy_from_slice(&u16::from(found.is_some()).to_be_bytes());
        reply[8..12].fill(0);
        if let Some((ip, ttl)) = found {
            reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]); // the question's name, A, IN
            reply.extend_from_slice(&ttl.to_be_bytes());
            reply.extend_from_slice(&[0, 4]);
            reply.extend_from_slice(&ip.octets());
        }
        Some(reply)
    }

    fn resolver(server: SocketAddr) -> TokioResolver {
        let mut connection = ConnectionConfig::udp();
        connection.port = server.port();
        let mut name_server = NameServerConfig::udp(server.ip());
        name_server.connections = vec![connection];
        let mut builder = TokioResolver::builder_with_config(ResolverConfig::from_name_servers(vec![name_server]), TokioRuntimeProvider::default());
        configure(builder.options_mut(), DnsFamily::V4Only);
        builder.build().unwrap()
    }

    #[tokio::test]
    async fn respect_dns_ttl_refreshes_when_the_ttl_runs_out_and_nothing_is_cached() {
        let answers: Answers = Arc::default();
        answers.lock().unwrap().insert("short.test".into(), (Ipv4Addr::new(127, 0, 0, 2), 1));
        answers.lock().unwrap().insert("long.test".into(), (Ipv4Addr::new(127, 0, 0, 2), 3600));
        let resolver = resolver(dns_server(answers.clone()).await);
        let s = snapshot(vec![
            dns_cluster("ttl", "short.test.", json!({"respect_dns_ttl": true, "dns_refresh_rate": "3600s"})),
            dns_cluster("rate", "short.test.", json!({"dns_refresh_rate": "3600s"})),
            dns_cluster("fast", "long.test.", json!({"dns_refresh_rate": "0.05s"})),
        ]);
        let old: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        let new: SocketAddr = "127.0.0.3:8080".parse().unwrap();
        for name in ["ttl", "rate", "fast"] {
            refresh_with(&s, name, &resolver).await;
            assert_eq!(endpoints(&s, name), vec![old], "{name}");
        }
        for (_, answer) in answers.lock().unwrap().iter_mut() {
            answer.0 = Ipv4Addr::new(127, 0, 0, 3);
        }
        // The 1 s TTL runs out long before the 3600 s refresh rate; the 3600 s TTL does not hold back a
        // cluster refreshing every 50 ms (the resolver caches nothing).
        for name in ["ttl", "fast"] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while endpoints(&s, name) != vec![new] && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
                refresh_with(&s, name, &resolver).await;
            }
            assert_eq!(endpoints(&s, name), vec![new], "{name}");
        }
        refresh_with(&s, "rate", &resolver).await;
        assert_eq!(endpoints(&s, "rate"), vec![old], "without respect_dns_ttl the refresh rate holds");
    }

    #[test]
    fn the_ttl_replaces_the_refresh_rate_only_when_asked_and_not_zero() {
        let rate = Duration::from_secs(5);
        assert_eq!(next_refresh(rate, true, Some(30)), Duration::from_secs(30));
        assert_eq!(next_refresh(rate, true, Some(0)), rate);
        assert_eq!(next_refresh(rate, true, None), rate);
        assert_eq!(next_refresh(rate, false, Some(30)), rate);
    }
}
