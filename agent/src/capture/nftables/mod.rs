//! The `nftables` backend: one `inet weft` table replaced atomically by a single netlink batch (no process:
//! [`netlink`]), read back with `nft list` where a pod's rules are verified. Same behaviour as the iptables
//! backend (see the module comment of `capture`), for IPv4 and IPv6 at once.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::IpNet;

use super::netns::Netns;
use super::plan::{InterfaceName, PodCapture, Selection};
use super::{
    find_binary, in_scratch_netns, run, run_in, CaptureError, PerPlan, RedirectMode, Redirector, EXCLUDED_INBOUND_PORTS,
    INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6, INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK,
    PROXY_MARK_MASK,
};

mod netlink;
pub mod ruleset;

use ruleset::{AddrDir, Chain, Dir, Hook, Match, Rule, Table, Verdict};

const TABLE: &str = "inet weft";

/// The table for `plan`. Chains sit at the `dstnat` priority, like the iptables `nat` table, and follow the
/// iptables backend's order (istio-iptables'). Without `outbound` (eBPF mode, where connects are redirected by a
/// cgroup program that applies the outbound part of the plan) the outbound redirects and their exclusions are
/// left out and everything else stays.
pub fn table(outbound: bool, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> Table {
    let marked = || Match::Mark {
        mask: PROXY_MARK_MASK,
        value: PROXY_MARK,
    };
    let lo = || Match::Iface {
        dir: Dir::Out,
        names: vec!["lo".into()],
    };
    let host = |addr: std::net::IpAddr| vec![IpNet::from(addr)];
    let (pass4, pass6) = (
        host(INBOUND_PASSTHROUGH_V4.into()),
        host(INBOUND_PASSTHROUGH_V6.into()),
    );
    let (local4, local6) = (
        host(Ipv4Addr::LOCALHOST.into()),
        host(std::net::Ipv6Addr::LOCALHOST.into()),
    );
    let mut out = vec![rule(vec![Match::NotTcp], Verdict::Return)];
    out.extend(
        outbound
            .then(|| outbound_exclusions(plan))
            .into_iter()
            .flatten(),
    );
    out.extend([
        rule(vec![lo(), addr(AddrDir::Src, pass4)], Verdict::Return),
        rule(vec![lo(), addr(AddrDir::Src, pass6)], Verdict::Return),
        rule(
            vec![lo(), marked(), not_addr(local4.clone()), Match::Tcp],
            Verdict::Redirect(INBOUND_PORT),
        ),
        rule(
            vec![lo(), marked(), not_addr(local6.clone()), Match::Tcp],
            Verdict::Redirect(INBOUND_PORT),
        ),
    ]);
    if !(outbound && plan.includes_loopback()) {
        out.push(rule(vec![lo()], Verdict::Return));
    }
    out.extend([
        rule(vec![marked()], Verdict::Return),
        rule(vec![addr(AddrDir::Dst, local4)], Verdict::Return),
        rule(vec![addr(AddrDir::Dst, local6)], Verdict::Return),
    ]);
    out.extend(
        outbound
            .then(|| outbound_redirects(plan))
            .into_iter()
            .flatten(),
    );
    Table {
        chains: vec![
            Chain {
                name: "prerouting",
                hook: Hook::Prerouting,
                priority: -100,
                rules: inbound_rules(plan, probe_source),
            },
            Chain {
                name: "output",
                hook: Hook::Output,
                priority: -100,
                rules: out,
            },
        ],
    }
}

fn rule(matches: Vec<Match>, verdict: Verdict) -> Rule {
    Rule { matches, verdict }
}

fn addr(dir: AddrDir, nets: Vec<IpNet>) -> Match {
    Match::Addr {
        dir,
        negated: false,
        nets,
    }
}

fn not_addr(nets: Vec<IpNet>) -> Match {
    Match::Addr {
        dir: AddrDir::Dst,
        negated: true,
        nets,
    }
}

fn names(dir: Dir, interfaces: &[InterfaceName]) -> Match {
    Match::Iface {
        dir,
        names: interfaces.iter().map(ToString::to_string).collect(),
    }
}

/// Redirects of the destinations in `ranges` (one rule per family present) to `port`, after `first`.
fn redirect_ranges(first: &[Match], ranges: &Selection<IpNet>, port: u16) -> Vec<Rule> {
    let with = |extra: Vec<Match>| {
        rule(
            first
                .iter()
                .cloned()
                .chain(extra)
                .chain([Match::Tcp])
                .collect(),
            Verdict::Redirect(port),
        )
    };
    match ranges {
        Selection::All => vec![with(Vec::new())],
        Selection::Only(ranges) => {
            let (v4, v6) = split(ranges);
            [v4, v6]
                .into_iter()
                .filter(|nets| !nets.is_empty())
                .map(|nets| with(vec![addr(AddrDir::Dst, nets)]))
                .collect()
        }
    }
}

fn inbound_rules(plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> Vec<Rule> {
    let mut r = Vec::new();
    if let (Some(source), false) = (probe_source, plan.probe_ports.is_empty()) {
        // kubelet's probes, SNATed to `source` on the node (see `capture::probes`), reach the app directly.
        r.push(rule(
            vec![
                addr(
                    AddrDir::Src,
                    vec![IpNet::from(std::net::IpAddr::from(source))],
                ),
                Match::DPort(plan.probe_ports.clone()),
            ],
            Verdict::Return,
        ));
    }
    // A VM's traffic entering on a virtual interface is the pod's outbound traffic.
    for vif in &plan.virtual_interfaces {
        r.extend(redirect_ranges(
            &[names(Dir::In, std::slice::from_ref(vif))],
            &plan.outbound_ranges,
            OUTBOUND_PORT,
        ));
    }
    if !plan.virtual_interfaces.is_empty() {
        r.push(rule(
            vec![names(Dir::In, &plan.virtual_interfaces)],
            Verdict::Return,
        ));
    }
    if !plan.excluded_interfaces.is_empty() {
        r.push(rule(
            vec![names(Dir::In, &plan.excluded_interfaces)],
            Verdict::Return,
        ));
    }
    r.push(rule(
        vec![Match::DPort(EXCLUDED_INBOUND_PORTS.to_vec())],
        Verdict::Return,
    ));
    match &plan.inbound_ports {
        Selection::All => {
            if !plan.inbound_excluded_ports.is_empty() {
                r.push(rule(
                    vec![Match::DPort(plan.inbound_excluded_ports.clone())],
                    Verdict::Return,
                ));
            }
            r.push(rule(vec![Match::Tcp], Verdict::Redirect(INBOUND_PORT)));
        }
        Selection::Only(ports) if !ports.is_empty() => r.push(rule(
            vec![Match::DPort(ports.clone())],
            Verdict::Redirect(INBOUND_PORT),
        )),
        Selection::Only(_) => {}
    }
    r
}

/// Output rules before the loopback handling: excluded interfaces and ports.
fn outbound_exclusions(plan: &PodCapture) -> Vec<Rule> {
    let mut r = Vec::new();
    if !plan.excluded_interfaces.is_empty() {
        r.push(rule(
            vec![names(Dir::Out, &plan.excluded_interfaces)],
            Verdict::Return,
        ));
    }
    if !plan.outbound_excluded_ports.is_empty() {
        r.push(rule(
            vec![Match::DPort(plan.outbound_excluded_ports.clone())],
            Verdict::Return,
        ));
    }
    r
}

/// Output rules after the loopback handling: excluded ranges, then what is redirected.
fn outbound_redirects(plan: &PodCapture) -> Vec<Rule> {
    let (ex4, ex6) = split(&plan.outbound_excluded_ranges);
    let mut r: Vec<Rule> = [ex4, ex6]
        .into_iter()
        .filter(|nets| !nets.is_empty())
        .map(|nets| rule(vec![addr(AddrDir::Dst, nets)], Verdict::Return))
        .collect();
    if !plan.outbound_ports.is_empty() {
        r.push(rule(
            vec![Match::DPort(plan.outbound_ports.clone())],
            Verdict::Redirect(OUTBOUND_PORT),
        ));
    }
    r.extend(redirect_ranges(&[], &plan.outbound_ranges, OUTBOUND_PORT));
    r
}

fn split(ranges: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    ranges.iter().partition(|n| matches!(n, IpNet::V4(_)))
}

/// The `nft -f` text equivalent to what [`Nftables::install`] sends (goldens, and the text an administrator can
/// feed to `nft` by hand). Creating then flushing the table makes it valid whether or not the table exists.
pub fn install_batch(outbound: bool, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> String {
    format!(
        "table {TABLE}\nflush table {TABLE}\n{}",
        ruleset::render(&table(outbound, plan, probe_source))
    )
}

fn netlink_error(e: String) -> CaptureError {
    CaptureError(format!("nftables: {e}"))
}

/// Rule statements of `listing` (the output of `nft list table`), without chain headers and braces.
fn statements(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("table ") && !l.starts_with("chain ") && *l != "}"
        })
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
    let missing: Vec<_> = expected
        .iter()
        .filter(|e| !actual.contains(e))
        .cloned()
        .collect();
    let extra: Vec<_> = actual
        .iter()
        .filter(|a| !expected.contains(a))
        .cloned()
        .collect();
    Err(CaptureError(format!(
        "weft nftables table differs from the expected one: missing [{}], unexpected [{}]",
        missing.join("; "),
        extra.join("; ")
    )))
}

#[derive(Debug)]
pub struct Nftables {
    nft: String,
    outbound: bool,
    probe_source: Option<Ipv4Addr>,
    /// `nft list table` output of a freshly installed table, as this node's `nft` prints it, per plan.
    expected: PerPlan<Vec<String>>,
    /// The netlink batch that installs each plan's table.
    batches: PerPlan<Arc<netlink::Install>>,
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

    fn detect_with(
        outbound: bool,
        probe_source: Option<Ipv4Addr>,
    ) -> Result<Nftables, CaptureError> {
        let nft = find_binary("nft")
            .ok_or_else(|| CaptureError("nft not found: install the nftables package".into()))?;
        let backend = Nftables {
            nft,
            outbound,
            probe_source,
            expected: PerPlan::new(),
            batches: PerPlan::new(),
        };
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
        self.expected.get(plan, || canonical_listing(&self.nft, self.table(plan)))
    }

    fn table(&self, plan: &PodCapture) -> Table {
        table(self.outbound, plan, self.probe_source)
    }

    /// Installs `plan`'s table in `ns`, over netlink from a thread inside it.
    pub(crate) fn install_plan(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        let batch = self.batches.get(plan, || netlink::Install::new(&self.table(plan)).map(Arc::new).map_err(netlink_error))?;
        ns.with(|| batch.send())?.map_err(netlink_error)
    }
}

/// Installs a table in a private, throw-away network namespace and reads it back: how this node's `nft` lists
/// what [`netlink::install`] puts in place (`nft`'s own normalisation is accounted for).
fn canonical_listing(nft: &str, table: Table) -> Result<Vec<String>, CaptureError> {
    let listing = in_scratch_netns(|| {
        netlink::install(&table).map_err(netlink_error)?;
        run(None, nft, &["list", "table", "inet", "weft"], "")
    })?;
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
            None => Err(CaptureError(
                "weft nftables table `inet weft` is missing".into(),
            )),
        }
    }

    fn remove(&self, ns: &Netns) -> Result<(), CaptureError> {
        ns.with(netlink::remove)?
            .map_err(netlink_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::check_golden;
    use crate::capture::plan::tests_support::golden_plans;

    #[test]
    fn install_batch_matches_golden_file() {
        check_golden(
            "nftables.golden",
            &install_batch(true, &PodCapture::default(), None),
        );
        check_golden(
            "nftables-inbound-only.golden",
            &install_batch(false, &PodCapture::default(), None),
        );
    }

    /// One golden file per annotation combination (`plan-<name>.nftables.golden`, and the eBPF mode's inbound
    /// half `plan-<name>.nftables-inbound-only.golden`).
    #[test]
    fn plans_match_golden_files() {
        for (name, plan, probes) in golden_plans() {
            check_golden(
                &format!("plan-{name}.nftables.golden"),
                &install_batch(true, &plan, probes),
            );
            check_golden(
                &format!("plan-{name}.nftables-inbound-only.golden"),
                &install_batch(false, &plan, probes),
            );
        }
    }

    #[test]
    fn compare_names_the_difference() {
        let plan = PodCapture::default();
        let text = ruleset::render(&table(true, &plan, None));
        let expected = statements(&text);
        let tampered = text.replace("redirect to :15001", "accept");
        let err = compare(&expected, &tampered).unwrap_err().to_string();
        assert!(
            err.contains("missing [meta l4proto tcp redirect to :15001]"),
            "{err}"
        );
        assert!(
            err.contains("unexpected [meta l4proto tcp accept]"),
            "{err}"
        );
        assert!(compare(&expected, &text).is_ok());
    }

    /// The real `nft` is the oracle of the netlink encoding: for every golden plan, both halves, the table
    /// installed over netlink lists exactly as the same table fed to `nft -f` as text (needs root and `nft`).
    #[test]
    fn netlink_install_lists_as_nft_does_for_the_text() {
        let Some(nft) = root_and_nft("netlink_install_lists_as_nft_does_for_the_text") else {
            return;
        };
        for (name, plan, probes) in golden_plans() {
            for outbound in [true, false] {
                let text = install_batch(outbound, &plan, probes);
                let by_text = in_scratch_netns(|| {
                    run(None, &nft, &["-f", "-"], &text)?;
                    run(None, &nft, &["list", "table", "inet", "weft"], "")
                });
                let by_netlink = canonical_listing(&nft, table(outbound, &plan, probes)).unwrap();
                assert_eq!(
                    by_netlink,
                    statements(&by_text.unwrap()),
                    "plan {name}, outbound {outbound}"
                );
            }
        }
    }

    /// Replacing an installed table and removing it (twice: absent is fine) over netlink.
    #[test]
    fn netlink_replace_and_remove() {
        let Some(nft) = root_and_nft("netlink_replace_and_remove") else {
            return;
        };
        let listed = in_scratch_netns(|| {
            let first = table(true, &PodCapture::default(), None);
            let second = table(false, &golden_plans()[1].1, None);
            netlink::install(&first).map_err(netlink_error)?;
            netlink::install(&second).map_err(netlink_error)?;
            let after_replace = run(None, &nft, &["list", "table", "inet", "weft"], "")?;
            netlink::remove().map_err(netlink_error)?;
            netlink::remove().map_err(netlink_error)?;
            let after_remove = run(None, &nft, &["list", "tables"], "")?;
            Ok((after_replace, after_remove))
        })
        .unwrap();
        let expected = canonical_listing(&nft, table(false, &golden_plans()[1].1, None)).unwrap();
        assert_eq!(statements(&listed.0), expected);
        assert!(!listed.1.contains("weft"), "{}", listed.1);
    }

    fn root_and_nft(test: &str) -> Option<String> {
        let found = nix::unistd::geteuid()
            .is_root()
            .then(|| find_binary("nft"))
            .flatten();
        if found.is_none() {
            eprintln!("SKIPPED {test}: needs root and nft (the nftables package) to make a network namespace and list it");
        }
        found
    }
}
