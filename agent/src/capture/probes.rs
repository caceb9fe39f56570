//! Kubelet's health probes with inbound capture on: the node half of the probe exemption.
//!
//! kubelet probes pods from the node (a host process, its source one of the node's addresses). Under inbound
//! capture those connections would reach the pod's inbound listener and, with strict mTLS, be refused as
//! plaintext. Istio's sidecar mode rewrites the probes to pilot-agent; Istio ambient SNATs the node's
//! connections to pods to 169.254.7.127 and lets that source through in the pod. weft does the ambient thing,
//! narrowed to the pod's probe ports (from its spec): here, on the node, connections that the node itself
//! opens (`addrtype --src-type LOCAL` / `fib saddr type local`) to a captured pod's probe port leave with the
//! probe source address; in the pod, `PodCapture::probe_ports` rules let that source through to those ports.
//! Forwarded traffic (other pods, other nodes) never has a local source address and is not touched.
//!
//! The rule set is rebuilt from the node's list of pods and replaced in one batch on every change.

use std::net::{IpAddr, Ipv4Addr};

use super::iptables::{self, Variant};
use super::netns::Netns;
use super::{find_binary, run, CaptureError, RedirectMode};

const CHAIN: &str = "WEFT_PROBES";
const TABLE: &str = "ip weft_probes";

/// One probe port of one captured pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeTarget {
    pub pod_ip: Ipv4Addr,
    pub port: u16,
}

impl ProbeTarget {
    /// A pod's probe targets: each IPv4 address with each probe port (IPv6 probes are captured as usual).
    pub fn of_pod(ips: &[IpAddr], ports: &[u16]) -> Vec<ProbeTarget> {
        let v4 = ips.iter().filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        v4.flat_map(|pod_ip| ports.iter().map(move |&port| ProbeTarget { pod_ip, port })).collect()
    }
}

#[derive(Debug)]
enum Tool {
    Iptables { save: String, restore: String },
    Nft(String),
}

/// The node's SNAT rules for kubelet's probes, in the agent's network namespace (or `ns`, for tests that play
/// the node in a namespace of their own).
#[derive(Debug)]
pub struct HostProbes {
    source: Ipv4Addr,
    tool: Tool,
    ns: Option<Netns>,
}

impl HostProbes {
    /// Uses the same tool family as pod capture: iptables (the node's variant) in iptables mode, nftables
    /// otherwise.
    pub fn new(mode: RedirectMode, variant: Variant, source: Ipv4Addr, ns: Option<Netns>) -> Result<HostProbes, CaptureError> {
        let tool = match mode {
            RedirectMode::Iptables => {
                let tools = iptables::v4_tools(iptables::resolve(variant))?;
                Tool::Iptables { save: tools.save, restore: tools.restore }
            }
            RedirectMode::Nftables | RedirectMode::Ebpf => {
                Tool::Nft(find_binary("nft").ok_or_else(|| CaptureError("nft not found: install the nftables package".into()))?)
            }
        };
        Ok(HostProbes { source, tool, ns })
    }

    pub fn source(&self) -> Ipv4Addr {
        self.source
    }

    /// Replaces the node's probe rules with rules for exactly `targets`; with none, removes them, so a node
    /// without probe ports to exempt carries nothing of weft's.
    pub fn sync(&self, targets: &[ProbeTarget]) -> Result<(), CaptureError> {
        if targets.is_empty() {
            return self.remove();
        }
        match &self.tool {
            Tool::Iptables { save, restore } => {
                let saved = self.run(save, &["-t", "nat"], "")?;
                self.run(restore, super::iptables::RESTORE_ARGS, &iptables_batch(&saved, targets, self.source)).map(drop)
            }
            Tool::Nft(nft) => self.run(nft, &["-f", "-"], &nft_batch(targets, self.source)).map(drop),
        }
    }

    /// Removes the node's probe rules (`weft-agent cleanup`).
    pub fn remove(&self) -> Result<(), CaptureError> {
        match &self.tool {
            Tool::Iptables { save, restore } => {
                let saved = self.run(save, &["-t", "nat"], "")?;
                match iptables_remove_batch(&saved) {
                    Some(batch) => self.run(restore, super::iptables::RESTORE_ARGS, &batch).map(drop),
                    None => Ok(()),
                }
            }
            Tool::Nft(nft) => self.run(nft, &["-f", "-"], &format!("table {TABLE}\ndelete table {TABLE}\n")).map(drop),
        }
    }

    fn run(&self, program: &str, args: &[&str], stdin: &str) -> Result<String, CaptureError> {
        run(self.ns.as_ref(), program, args, stdin)
    }
}

fn sorted(targets: &[ProbeTarget]) -> Vec<ProbeTarget> {
    let mut t = targets.to_vec();
    t.sort();
    t.dedup();
    t
}

/// The jump sits first in POSTROUTING, ahead of the CNI's and kube-proxy's masquerading.
fn iptables_batch(saved: &str, targets: &[ProbeTarget], source: Ipv4Addr) -> String {
    let mut lines = vec!["*nat".to_string(), format!(":{CHAIN} - [0:0]")];
    lines.extend(existing_jumps(saved).map(|j| j.replacen("-A ", "-D ", 1)));
    lines.push(format!("-I POSTROUTING 1 -j {CHAIN}"));
    lines.extend(sorted(targets).iter().map(|t| {
        format!(
            "-A {CHAIN} -d {}/32 -p tcp -m tcp --dport {} -m addrtype --src-type LOCAL -j SNAT --to-source {source}",
            t.pod_ip, t.port
        )
    }));
    lines.push("COMMIT".into());
    lines.join("\n") + "\n"
}

fn iptables_remove_batch(saved: &str) -> Option<String> {
    if !saved.lines().any(|l| l.starts_with(&format!(":{CHAIN} "))) {
        return None;
    }
    let mut lines = vec!["*nat".to_string(), format!(":{CHAIN} - [0:0]")];
    lines.extend(existing_jumps(saved).map(|j| j.replacen("-A ", "-D ", 1)));
    lines.push(format!("-X {CHAIN}"));
    lines.push("COMMIT".into());
    Some(lines.join("\n") + "\n")
}

fn existing_jumps(saved: &str) -> impl Iterator<Item = &str> {
    saved.lines().filter(|l| l.starts_with("-A POSTROUTING ") && l.ends_with(&format!("-j {CHAIN}")))
}

/// `srcnat` priority, like the iptables `nat` POSTROUTING chain.
fn nft_batch(targets: &[ProbeTarget], source: Ipv4Addr) -> String {
    let targets = sorted(targets);
    let rule = if targets.is_empty() {
        String::new()
    } else {
        let elements: Vec<String> = targets.iter().map(|t| format!("{} . {}", t.pod_ip, t.port)).collect();
        format!("\t\tfib saddr type local ip daddr . tcp dport {{ {} }} snat to {source}\n", elements.join(", "))
    };
    format!(
        "table {TABLE}\nflush table {TABLE}\ntable {TABLE} {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{rule}\t}}\n}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{check_golden, DEFAULT_PROBE_SOURCE};

    fn targets() -> Vec<ProbeTarget> {
        let ips: Vec<IpAddr> = vec!["10.244.1.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let mut t = ProbeTarget::of_pod(&ips, &[8080, 8081]);
        t.extend(ProbeTarget::of_pod(&["10.244.1.5".parse().unwrap()], &[9090]));
        t
    }

    #[test]
    fn targets_are_the_ipv4_addresses_times_the_ports() {
        let t = ProbeTarget::of_pod(&["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()], &[1, 2]);
        assert_eq!(t.len(), 2);
        assert!(ProbeTarget::of_pod(&["10.0.0.1".parse().unwrap()], &[]).is_empty());
    }

    #[test]
    fn host_batches_match_golden_files() {
        let saved = "*nat\n:POSTROUTING ACCEPT [0:0]\n:WEFT_PROBES - [0:0]\n-A POSTROUTING -j WEFT_PROBES\n-A POSTROUTING -j KUBE-POSTROUTING\nCOMMIT\n";
        check_golden("probes-host.iptables.golden", &iptables_batch(saved, &targets(), DEFAULT_PROBE_SOURCE));
        check_golden("probes-host.nftables.golden", &nft_batch(&targets(), DEFAULT_PROBE_SOURCE));
        check_golden("probes-host-remove.iptables.golden", &iptables_remove_batch(saved).unwrap());
        assert_eq!(iptables_remove_batch("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"), None);
        assert!(!nft_batch(&[], DEFAULT_PROBE_SOURCE).contains("snat"));
    }
}
