//! The `nftables` backend: one `inet weft` table replaced atomically by a single `nft -f` batch. Same
//! behaviour as the iptables backend (see the module comment of `capture`), for IPv4 and IPv6 at once.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use ipnet::IpNet;

use super::netns::Netns;
use super::plan::{InterfaceName, PodCapture, Selection};
use super::{
    find_binary, run, run_in, CaptureError, Redirector, RedirectMode, EXCLUDED_INBOUND_PORTS, INBOUND_PASSTHROUGH_V4,
    INBOUND_PASSTHROUGH_V6, INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK, PROXY_MARK_MASK,
};

const TABLE: &str = "inet weft";

/// The table definition for `plan`. Chains sit at the `dstnat` priority, like the iptables `nat` table, and
/// follow the iptables backend's order (istio-iptables'). Without `outbound` (eBPF mode, where connects are
/// redirected by a cgroup program that applies the outbound part of the plan) the outbound redirects and
/// their exclusions are left out and everything else stays.
pub fn table(outbound: bool, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> String {
    let marked = format!("meta mark & 0x{PROXY_MARK_MASK:08x} == 0x{PROXY_MARK:08x}");
    let (pass4, pass6) = (INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6);
    let mut out = String::new();
    for line in outbound.then(|| outbound_exclusions(plan)).into_iter().flatten() {
        out.push_str(&format!("\t\t{line}\n"));
    }
    out.push_str(&format!(
        r#"		oifname "lo" ip saddr {pass4} return
		oifname "lo" ip6 saddr {pass6} return
		oifname "lo" {marked} ip daddr != 127.0.0.1 meta l4proto tcp redirect to :{INBOUND_PORT}
		oifname "lo" {marked} ip6 daddr != ::1 meta l4proto tcp redirect to :{INBOUND_PORT}
"#
    ));
    if !(outbound && plan.includes_loopback()) {
        out.push_str("\t\toifname \"lo\" return\n");
    }
    out.push_str(&format!("\t\t{marked} return\n\t\tip daddr 127.0.0.1 return\n\t\tip6 daddr ::1 return\n"));
    for line in outbound.then(|| outbound_redirects(plan)).into_iter().flatten() {
        out.push_str(&format!("\t\t{line}\n"));
    }
    let inbound: String = inbound_rules(plan, probe_source).iter().map(|l| format!("\t\t{l}\n")).collect();
    format!(
        r#"table {TABLE} {{
	chain prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
{inbound}	}}

	chain output {{
		type nat hook output priority -100; policy accept;
		meta l4proto != tcp return
{out}	}}
}}
"#
    )
}

fn inbound_rules(plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> Vec<String> {
    let mut r = Vec::new();
    if let (Some(source), false) = (probe_source, plan.probe_ports.is_empty()) {
        // kubelet's probes, SNATed to `source` on the node (see `capture::probes`), reach the app directly.
        r.push(format!("ip saddr {source} tcp dport {} return", set(&plan.probe_ports)));
    }
    // A VM's traffic entering on a virtual interface is the pod's outbound traffic.
    for vif in &plan.virtual_interfaces {
        match &plan.outbound_ranges {
            Selection::All => r.push(format!("iifname \"{vif}\" meta l4proto tcp redirect to :{OUTBOUND_PORT}")),
            Selection::Only(ranges) => {
                let (v4, v6) = split(ranges);
                if !v4.is_empty() {
                    r.push(format!("iifname \"{vif}\" ip daddr {} meta l4proto tcp redirect to :{OUTBOUND_PORT}", set(&v4)));
                }
                if !v6.is_empty() {
                    r.push(format!("iifname \"{vif}\" ip6 daddr {} meta l4proto tcp redirect to :{OUTBOUND_PORT}", set(&v6)));
                }
            }
        }
    }
    if !plan.virtual_interfaces.is_empty() {
        r.push(format!("iifname {} return", names(&plan.virtual_interfaces)));
    }
    if !plan.excluded_interfaces.is_empty() {
        r.push(format!("iifname {} return", names(&plan.excluded_interfaces)));
    }
    r.push(format!("tcp dport {} return", set(&EXCLUDED_INBOUND_PORTS)));
    match &plan.inbound_ports {
        Selection::All => {
            if !plan.inbound_excluded_ports.is_empty() {
                r.push(format!("tcp dport {} return", set(&plan.inbound_excluded_ports)));
            }
            r.push(format!("meta l4proto tcp redirect to :{INBOUND_PORT}"));
        }
        Selection::Only(ports) if !ports.is_empty() => {
            r.push(format!("tcp dport {} redirect to :{INBOUND_PORT}", set(ports)));
        }
        Selection::Only(_) => {}
    }
    r
}

/// Output rules before the loopback handling: excluded interfaces and ports.
fn outbound_exclusions(plan: &PodCapture) -> Vec<String> {
    let mut r = Vec::new();
    if !plan.excluded_interfaces.is_empty() {
        r.push(format!("oifname {} return", names(&plan.excluded_interfaces)));
    }
    if !plan.outbound_excluded_ports.is_empty() {
        r.push(format!("tcp dport {} return", set(&plan.outbound_excluded_ports)));
    }
    r
}

/// Output rules after the loopback handling: excluded ranges, then what is redirected.
fn outbound_redirects(plan: &PodCapture) -> Vec<String> {
    let mut r = Vec::new();
    let (ex4, ex6) = split(&plan.outbound_excluded_ranges);
    if !ex4.is_empty() {
        r.push(format!("ip daddr {} return", set(&ex4)));
    }
    if !ex6.is_empty() {
        r.push(format!("ip6 daddr {} return", set(&ex6)));
    }
    if !plan.outbound_ports.is_empty() {
        r.push(format!("tcp dport {} redirect to :{OUTBOUND_PORT}", set(&plan.outbound_ports)));
    }
    match &plan.outbound_ranges {
        Selection::All => r.push(format!("meta l4proto tcp redirect to :{OUTBOUND_PORT}")),
        Selection::Only(ranges) => {
            let (v4, v6) = split(ranges);
            if !v4.is_empty() {
                r.push(format!("ip daddr {} meta l4proto tcp redirect to :{OUTBOUND_PORT}", set(&v4)));
            }
            if !v6.is_empty() {
                r.push(format!("ip6 daddr {} meta l4proto tcp redirect to :{OUTBOUND_PORT}", set(&v6)));
            }
        }
    }
    r
}

/// An anonymous set: `{ a, b }`.
fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(T::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

fn names(interfaces: &[InterfaceName]) -> String {
    let quoted: Vec<String> = interfaces.iter().map(|i| format!("\"{i}\"")).collect();
    set(&quoted)
}

fn split(ranges: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    ranges.iter().partition(|n| matches!(n, IpNet::V4(_)))
}

/// Creating then flushing the table makes the batch valid whether or not it already exists, and the kernel
/// applies the whole file as one transaction: there is no moment without rules. (Flushing rather than deleting
/// the table: deleting base chains waits for an RCU grace period, ~15 ms per pod.)
pub fn install_batch(outbound: bool, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> String {
    format!("table {TABLE}\nflush table {TABLE}\n{}", table(outbound, plan, probe_source))
}

pub fn remove_batch() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

/// Rule statements of `listing` (the output of `nft list table`), without chain headers and braces.
fn statements(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("table ") && !l.starts_with("chain ") && *l != "}")
        .map(str::to_string)
        .collect()
}

/// Checks that the listed table has the statements weft wants. The expected statements come from feeding
/// [`table`] through the same `nft` (see [`Nftables::detect`]), so `nft`'s own normalisation is accounted for.
pub fn compare(expected: &[String], listing: &str) -> Result<(), CaptureError> {
    let actual = statements(listing);
    if actual == expected {
        return Ok(());
    }
    let missing: Vec<_> = expected.iter().filter(|e| !actual.contains(e)).cloned().collect();
    let extra: Vec<_> = actual.iter().filter(|a| !expected.contains(a)).cloned().collect();
    Err(CaptureError(format!(
        "weft nftables table differs from the expected one: missing [{}], unexpected [{}]",
        missing.join("; "),
        extra.join("; ")
    )))
}

/// How many plans' canonical listings are kept; past it the cache starts over (plans are few in practice:
/// most pods share the default one).
const LISTINGS_KEPT: usize = 256;

#[derive(Debug)]
pub struct Nftables {
    nft: String,
    outbound: bool,
    probe_source: Option<Ipv4Addr>,
    /// `nft list table` output of a freshly installed table, as this node's `nft` prints it, per plan.
    expected: Mutex<HashMap<PodCapture, Vec<String>>>,
}

impl Nftables {
    /// Finds `nft` and learns how it prints weft's table, by installing it in a scratch network namespace.
    pub fn detect(probe_source: Option<Ipv4Addr>) -> Result<Nftables, CaptureError> {
        Self::detect_with(true, probe_source)
    }

    /// The inbound half only, for eBPF mode.
    pub fn detect_inbound_only(probe_source: Option<Ipv4Addr>) -> Result<Nftables, CaptureError> {
        Self::detect_with(false, probe_source)
    }

    fn detect_with(outbound: bool, probe_source: Option<Ipv4Addr>) -> Result<Nftables, CaptureError> {
        let nft = find_binary("nft")
            .ok_or_else(|| CaptureError("nft not found: install the nftables package".into()))?;
        let backend = Nftables { nft, outbound, probe_source, expected: Mutex::new(HashMap::new()) };
        backend.expected(&PodCapture::default())?;
        Ok(backend)
    }

    fn list(&self, ns: &Netns) -> Result<Option<String>, CaptureError> {
        match run_in(ns, &self.nft, &["list", "table", "inet", "weft"], "") {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.0.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The statements `nft` lists for `plan`'s table, learnt once per plan.
    fn expected(&self, plan: &PodCapture) -> Result<Vec<String>, CaptureError> {
        let cached = self.expected.lock().unwrap_or_else(|e| e.into_inner()).get(plan).cloned();
        if let Some(listing) = cached {
            return Ok(listing);
        }
        let listing = canonical_listing(&self.nft, install_batch(self.outbound, plan, self.probe_source))?;
        let mut cache = self.expected.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= LISTINGS_KEPT {
            cache.clear();
        }
        cache.insert(plan.clone(), listing.clone());
        Ok(listing)
    }

    /// Installs `plan`'s table in `ns`.
    pub(crate) fn install_plan(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        run_in(ns, &self.nft, &["-f", "-"], &install_batch(self.outbound, plan, self.probe_source)).map(drop)
    }
}

/// Installs a table in a private, throw-away network namespace and reads it back.
fn canonical_listing(nft: &str, batch: String) -> Result<Vec<String>, CaptureError> {
    let nft = nft.to_string();
    let listing = std::thread::spawn(move || -> Result<String, CaptureError> {
        // Only this short-lived thread moves (CLONE_NEWNET is per thread); it exits right after.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| CaptureError(format!("unshare(CLONE_NEWNET): {e}")))?;
        run(None, &nft, &["-f", "-"], &batch)?;
        run(None, &nft, &["list", "table", "inet", "weft"], "")
    })
    .join()
    .map_err(|_| CaptureError("nft probe thread panicked".into()))??;
    Ok(statements(&listing))
}

impl Redirector for Nftables {
    fn mode(&self) -> RedirectMode {
        RedirectMode::Nftables
    }

    fn install(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        self.install_plan(ns, plan)
    }

    fn verify(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        match self.list(ns)? {
            Some(listing) => compare(&self.expected(plan)?, &listing),
            None => Err(CaptureError("weft nftables table `inet weft` is missing".into())),
        }
    }

    fn remove(&self, ns: &Netns) -> Result<(), CaptureError> {
        run_in(ns, &self.nft, &["-f", "-"], &remove_batch()).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::check_golden;
    use crate::capture::plan::tests_support::golden_plans;

    #[test]
    fn install_batch_matches_golden_file() {
        check_golden("nftables.golden", &install_batch(true, &PodCapture::default(), None));
        check_golden("nftables-inbound-only.golden", &install_batch(false, &PodCapture::default(), None));
    }

    /// One golden file per annotation combination (`plan-<name>.nftables.golden`, and the eBPF mode's inbound
    /// half `plan-<name>.nftables-inbound-only.golden`).
    #[test]
    fn plans_match_golden_files() {
        for (name, plan, probes) in golden_plans() {
            check_golden(&format!("plan-{name}.nftables.golden"), &install_batch(true, &plan, probes));
            check_golden(&format!("plan-{name}.nftables-inbound-only.golden"), &install_batch(false, &plan, probes));
        }
    }

    #[test]
    fn compare_names_the_difference() {
        let plan = PodCapture::default();
        let expected = statements(&table(true, &plan, None));
        let tampered = table(true, &plan, None).replace("redirect to :15001", "accept");
        let err = compare(&expected, &tampered).unwrap_err().to_string();
        assert!(err.contains("missing [meta l4proto tcp redirect to :15001]"), "{err}");
        assert!(err.contains("unexpected [meta l4proto tcp accept]"), "{err}");
        assert!(compare(&expected, &table(true, &plan, None)).is_ok());
    }
}
