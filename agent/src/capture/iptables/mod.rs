//! The `iptables` backend: same rule shape as istio-cni's sidecar mode with a socket mark in place of the proxy
//! UID. A new pod's rules go in over netlink where the node's iptables is the nf_tables variant (one
//! transaction for both families, no process; see [`netlink`]), otherwise as one `iptables-restore --noflush`
//! batch per family.

use std::net::Ipv4Addr;
use std::sync::Arc;

use super::netns::{self, Netns};
use super::plan::PodCapture;
use super::{find_binary, in_scratch_netns, ipv6_enabled, run, run_in, CaptureError, PerPlan, Redirector, RedirectMode};

mod netlink;
mod rules;

pub use rules::Family;
use rules::{XtRule, CHAINS};

/// Which iptables implementation the node uses. Rules must go through the same one kube-proxy and the other
/// CNI plugins use, or the two rule sets would be evaluated in an order nobody chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Pick the variant that already holds rules on the node; nft when neither does.
    Auto,
    Legacy,
    Nft,
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Variant::Auto),
            "legacy" => Ok(Variant::Legacy),
            "nft" => Ok(Variant::Nft),
            other => Err(format!("unknown iptables variant {other:?}: use auto, legacy or nft")),
        }
    }
}

/// The rules for `plan` as `iptables-save` prints them, so that the saved state can be compared line by line.
pub fn rule_lines(family: Family, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> Vec<String> {
    rules::rules(family, plan, probe_source).iter().map(XtRule::to_string).collect()
}

/// Jumps from built-in chains into ours found in `saved` (an `iptables-save -t nat` dump).
fn existing_jumps(saved: &str) -> Vec<&str> {
    saved
        .lines()
        .filter(|l| {
            (l.starts_with("-A PREROUTING ") || l.starts_with("-A OUTPUT "))
                && CHAINS.iter().any(|c| l.ends_with(&format!("-j {c}")))
        })
        .collect()
}

fn chain_declarations() -> impl Iterator<Item = String> {
    // In --noflush mode, declaring a chain creates it or empties it.
    CHAINS.iter().map(|c| format!(":{c} - [0:0]"))
}

/// The batch that replaces whatever weft rules `saved` holds with the current ones.
pub fn install_batch(family: Family, saved: &str, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> String {
    let mut lines = vec!["*nat".to_string()];
    lines.extend(chain_declarations());
    lines.extend(existing_jumps(saved).into_iter().map(|j| j.replacen("-A ", "-D ", 1)));
    lines.extend(rule_lines(family, plan, probe_source));
    lines.push("COMMIT".into());
    lines.join("\n") + "\n"
}

/// The batch for a table that has none of weft's chains (a new pod's): it creates them with `-N`, so that where
/// they already exist the whole batch fails and changes nothing, and no `iptables-save` is needed first.
pub fn fresh_install_batch(family: Family, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> String {
    let mut lines = vec!["*nat".to_string()];
    lines.extend(CHAINS.iter().map(|c| format!("-N {c}")));
    lines.extend(rule_lines(family, plan, probe_source));
    lines.push("COMMIT".into());
    lines.join("\n") + "\n"
}

/// The batch that removes weft's rules and chains from a table whose state is `saved`.
pub fn remove_batch(saved: &str) -> Option<String> {
    let has_chains = CHAINS.iter().any(|c| saved.lines().any(|l| l.starts_with(&format!(":{c} "))));
    if !has_chains {
        return None;
    }
    let mut lines = vec!["*nat".to_string()];
    lines.extend(chain_declarations());
    lines.extend(existing_jumps(saved).into_iter().map(|j| j.replacen("-A ", "-D ", 1)));
    lines.extend(CHAINS.iter().map(|c| format!("-X {c}")));
    lines.push("COMMIT".into());
    Some(lines.join("\n") + "\n")
}

/// Compares a saved table with the rules weft wants; the error lists what is missing and what is extra.
pub fn compare(family: Family, saved: &str, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> Result<(), CaptureError> {
    let ours = |l: &&str| l.starts_with("-A WEFT_") || existing_jumps(l).len() == 1;
    let mut actual: Vec<&str> = saved.lines().filter(ours).collect();
    let wanted = rule_lines(family, plan, probe_source);
    let mut missing = Vec::new();
    for rule in &wanted {
        match actual.iter().position(|a| a == rule) {
            Some(i) => {
                actual.remove(i);
            }
            None => missing.push(rule.as_str()),
        }
    }
    if missing.is_empty() && actual.is_empty() {
        Ok(())
    } else {
        Err(CaptureError(format!(
            "weft {family:?} iptables rules differ from the expected ones: missing [{}], unexpected [{}]",
            missing.join("; "),
            actual.join("; ")
        )))
    }
}

/// Paths of the save/restore tools of one iptables variant.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub(crate) save: String,
    pub(crate) restore: String,
}

impl Tools {
    pub(crate) fn find(prefix: &str, variant: &str) -> Option<Tools> {
        let name = |verb: &str| {
            find_binary(&format!("{prefix}-{variant}-{verb}")).or_else(|| find_binary(&format!("{prefix}-{verb}")))
        };
        Some(Tools { save: name("save")?, restore: name("restore")? })
    }
}

#[derive(Debug)]
pub struct Iptables {
    v4: Tools,
    v6: Option<Tools>,
    variant: Variant,
    probe_source: Option<Ipv4Addr>,
    /// iptables-nft only: each plan's netlink batches, or `None` for a plan whose rules this node's
    /// `iptables-save` did not read back as sent (they then go through `iptables-restore`).
    netlink: Option<PerPlan<Option<Arc<NetlinkInstall>>>>,
}

/// A plan's rules as netlink batches: IPv4 alone, and IPv4 with IPv6 where `ip6tables` is installed.
#[derive(Debug)]
struct NetlinkInstall {
    v4: netlink::Install,
    dual: Option<netlink::Install>,
}

impl NetlinkInstall {
    /// Sends the batch for the calling thread's namespace: with IPv6 rules where it has IPv6.
    fn send_here(&self) -> Result<(), String> {
        if !netns::ipv6_enabled_here() {
            return self.v4.send();
        }
        self.dual.as_ref().ok_or("the namespace has IPv6 but ip6tables is not installed")?.send()
    }
}

impl Iptables {
    /// Finds the tools of `variant` (resolving `Auto` on the node's current rules); with the nf_tables variant,
    /// checks the default plan's netlink encoding against this node's `iptables-save` once.
    pub fn detect(variant: Variant, probe_source: Option<Ipv4Addr>) -> Result<Iptables, CaptureError> {
        let variant = resolve(variant);
        let netlink = (variant == Variant::Nft).then(PerPlan::new);
        let backend =
            Iptables { v4: v4_tools(variant)?, v6: Tools::find("ip6tables", variant_name(variant)), variant, probe_source, netlink };
        backend.netlink_install(&PodCapture::default());
        Ok(backend)
    }

    /// `plan`'s netlink batches, learnt on first use; `None` where rules go through `iptables-restore`.
    fn netlink_install(&self, plan: &PodCapture) -> Option<Arc<NetlinkInstall>> {
        self.netlink.as_ref()?.get(plan, || Ok(self.learn_netlink(plan))).ok().flatten()
    }

    /// Encodes `plan`'s batches and has this node's `iptables-save` read them back in a scratch namespace:
    /// only an encoding it reads as exactly the plan's rules is used (another iptables release might encode
    /// or print differently).
    fn learn_netlink(&self, plan: &PodCapture) -> Option<Arc<NetlinkInstall>> {
        let family = |f| (f, rules::rules(f, plan, self.probe_source));
        let encoded = netlink::Install::new(&[family(Family::V4)]).and_then(|v4| {
            let dual = self.v6.as_ref().map(|_| netlink::Install::new(&[family(Family::V4), family(Family::V6)])).transpose()?;
            Ok(NetlinkInstall { v4, dual })
        });
        let checked = encoded.map_err(CaptureError).and_then(|install| {
            in_scratch_netns(|| {
                install.dual.as_ref().unwrap_or(&install.v4).send().map_err(CaptureError)?;
                compare(Family::V4, &run(None, &self.v4.save, &["-t", "nat"], "")?, plan, self.probe_source)?;
                if let Some(v6) = &self.v6 {
                    compare(Family::V6, &run(None, &v6.save, &["-t", "nat"], "")?, plan, self.probe_source)?;
                }
                Ok(install)
            })
        });
        match checked {
            Ok(install) => Some(Arc::new(install)),
            Err(e) => {
                tracing::warn!(error = %e, "iptables rules over netlink are not read back as sent here; using iptables-restore");
                None
            }
        }
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Runs `op` for IPv4 and, where the namespace has it, IPv6 — concurrently: each is a couple of process
    /// spawns, and a pod's ADD waits for both.
    fn per_family<F>(&self, ns: &Netns, op: F) -> Result<(), CaptureError>
    where
        F: Fn(Family, &Tools) -> Result<(), CaptureError> + Sync,
    {
        if !ipv6_enabled(ns) {
            return op(Family::V4, &self.v4);
        }
        let v6 = self.v6.as_ref().ok_or_else(|| {
            CaptureError("the pod has IPv6 but ip6tables-restore is not installed: IPv6 would go uncaptured".into())
        })?;
        std::thread::scope(|s| {
            let v6_result = s.spawn(|| op(Family::V6, v6));
            let v4_result = op(Family::V4, &self.v4);
            let v6_result = v6_result.join().unwrap_or_else(|_| Err(CaptureError("ip6tables worker panicked".into())));
            v4_result.and(v6_result)
        })
    }
}

/// `Auto` resolved on the node's current rules.
pub(crate) fn resolve(variant: Variant) -> Variant {
    match variant {
        Variant::Auto => detect_variant(),
        fixed => fixed,
    }
}

fn variant_name(variant: Variant) -> &'static str {
    if variant == Variant::Legacy {
        "legacy"
    } else {
        "nft"
    }
}

pub(crate) fn v4_tools(variant: Variant) -> Result<Tools, CaptureError> {
    let name = variant_name(variant);
    Tools::find("iptables", name).ok_or_else(|| {
        CaptureError(format!(
            "iptables-{name}-restore/iptables-restore not found: install the iptables package or use --redirect nftables"
        ))
    })
}

/// `iptables-restore` adds to the table, and waits up to 10 s for the xtables lock another program holds
/// rather than failing at once.
pub(crate) const RESTORE_ARGS: &[&str] = &["--noflush", "--wait", "10"];

fn save(ns: &Netns, tools: &Tools) -> Result<String, CaptureError> {
    run_in(ns, &tools.save, &["-t", "nat"], "")
}

impl Redirector for Iptables {
    fn mode(&self) -> RedirectMode {
        RedirectMode::Iptables
    }

    fn install(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        if let Some(install) = self.netlink_install(plan) {
            // Refused as a whole where weft's chains already exist (a re-install): then as below.
            match ns.with(|| install.send_here())? {
                Ok(()) => return Ok(()),
                Err(e) => tracing::debug!(error = %e, "iptables rules over netlink refused; using iptables-restore"),
            }
        }
        self.per_family(ns, |family, tools| {
            // A new pod's table: one process. Otherwise (a new plan, a re-ADD) the batch failed as a whole,
            // and the table is read to replace what is there.
            let fresh = fresh_install_batch(family, plan, self.probe_source);
            if run_in(ns, &tools.restore, RESTORE_ARGS, &fresh).is_ok() {
                return Ok(());
            }
            let saved = save(ns, tools)?;
            run_in(ns, &tools.restore, RESTORE_ARGS, &install_batch(family, &saved, plan, self.probe_source)).map(drop)
        })
    }

    fn verify(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        self.per_family(ns, |family, tools| compare(family, &save(ns, tools)?, plan, self.probe_source))
    }

    fn remove(&self, ns: &Netns) -> Result<(), CaptureError> {
        self.per_family(ns, |_, tools| match remove_batch(&save(ns, tools)?) {
            Some(batch) => run_in(ns, &tools.restore, RESTORE_ARGS, &batch).map(drop),
            None => Ok(()),
        })
    }
}

/// Counts rules in the agent's own (host) namespace for each variant, like istio-cni does: the variant that
/// kube-proxy and friends already use wins; nft when there is no evidence either way.
fn detect_variant() -> Variant {
    let count = |bin: &str| {
        let Some(path) = find_binary(bin) else { return 0 };
        std::process::Command::new(path)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("-A ")).count())
            .unwrap_or(0)
    };
    if count("iptables-legacy-save") > count("iptables-nft-save") {
        Variant::Legacy
    } else {
        Variant::Nft
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::check_golden;
    use crate::capture::plan::tests_support::golden_plans;

    fn default_rules(family: Family) -> Vec<String> {
        rule_lines(family, &PodCapture::default(), None)
    }

    #[test]
    fn fresh_install_batches_match_golden_files() {
        check_golden("iptables-v4.golden", &install_batch(Family::V4, "", &PodCapture::default(), None));
        check_golden("iptables-v6.golden", &install_batch(Family::V6, "", &PodCapture::default(), None));
    }

    /// One golden file per annotation combination and family (`plan-<name>.iptables-v{4,6}.golden`).
    #[test]
    fn plans_match_golden_files() {
        for (name, plan, probes) in golden_plans() {
            check_golden(&format!("plan-{name}.iptables-v4.golden"), &install_batch(Family::V4, "", &plan, probes));
            check_golden(&format!("plan-{name}.iptables-v6.golden"), &install_batch(Family::V6, "", &plan, probes));
        }
    }

    #[test]
    fn a_changed_plan_is_compared_against_its_own_rules() {
        let (_, plan, probes) = golden_plans().into_iter().find(|(n, ..)| *n == "outbound-ranges").unwrap();
        let installed = rule_lines(Family::V4, &plan, probes).join("\n");
        assert!(compare(Family::V4, &installed, &plan, probes).is_ok());
        let err = compare(Family::V4, &installed, &PodCapture::default(), None).unwrap_err().to_string();
        assert!(err.contains("missing [-A WEFT_OUTPUT -j WEFT_REDIRECT]"), "{err}");
    }

    #[test]
    fn the_fresh_batch_creates_the_chains_the_general_one_declares() {
        for family in [Family::V4, Family::V6] {
            let general = install_batch(family, "", &PodCapture::default(), None);
            let fresh = fresh_install_batch(family, &PodCapture::default(), None);
            let declared = CHAINS.iter().fold(general, |b, c| b.replace(&format!(":{c} - [0:0]"), &format!("-N {c}")));
            assert_eq!(fresh, declared);
        }
    }

    #[test]
    fn reinstall_deletes_old_jumps_in_the_same_batch() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:WEFT_INBOUND - [0:0]\n-A PREROUTING -p tcp -j WEFT_INBOUND\n-A PREROUTING -p udp -j OTHER\nCOMMIT\n";
        let batch = install_batch(Family::V4, saved, &PodCapture::default(), None);
        assert!(batch.contains("\n-D PREROUTING -p tcp -j WEFT_INBOUND\n"), "{batch}");
        assert!(!batch.contains("OTHER"), "rules of others are left alone: {batch}");
    }

    #[test]
    fn remove_batch_matches_golden_file_and_is_empty_when_nothing_is_installed() {
        let installed: String = std::iter::once("*nat".to_string())
            .chain(chain_declarations())
            .chain(default_rules(Family::V4))
            .collect::<Vec<_>>()
            .join("\n");
        check_golden("iptables-remove.golden", &remove_batch(&installed).unwrap());
        assert_eq!(remove_batch("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"), None);
    }

    #[test]
    fn compare_names_missing_and_extra_rules() {
        let plan = PodCapture::default();
        let mut saved = default_rules(Family::V4);
        saved.retain(|r| !r.contains("--to-ports 15001"));
        saved.push("-A WEFT_OUTPUT -j ACCEPT".into());
        let err = compare(Family::V4, &saved.join("\n"), &plan, None).unwrap_err().to_string();
        assert!(err.contains("missing [-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001]"), "{err}");
        assert!(err.contains("unexpected [-A WEFT_OUTPUT -j ACCEPT]"), "{err}");
        assert!(compare(Family::V4, &default_rules(Family::V4).join("\n"), &plan, None).is_ok());
    }

    /// `iptables-nft-restore` is the oracle of the netlink encoding: for every golden plan and family, the
    /// rules sent over netlink make the same kernel objects (`nft --debug=netlink` lists every expression and
    /// handle) and `iptables-save` prints them as the plan's rules (which covers the `xt` blobs `nft` does
    /// not show). Needs root, iptables-nft and nft.
    #[test]
    fn netlink_rules_are_what_iptables_nft_restore_makes() {
        let (Some(tools), Some(nft)) = (Tools::find("iptables", "nft"), find_binary("nft")) else {
            eprintln!("SKIPPED netlink_rules_are_what_iptables_nft_restore_makes: needs iptables-nft and nft");
            return;
        };
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED netlink_rules_are_what_iptables_nft_restore_makes: needs root to make network namespaces");
            return;
        }
        let v6 = Tools::find("ip6tables", "nft").expect("ip6tables-nft beside iptables-nft");
        for (name, plan, probes) in golden_plans() {
            for (family, tools, table) in [(Family::V4, &tools, "ip"), (Family::V6, &v6, "ip6")] {
                let listing = |install: &(dyn Fn() -> Result<(), CaptureError> + Sync)| {
                    in_scratch_netns(|| {
                        install()?;
                        let objects = run(None, &nft, &["--debug=netlink", "list", "table", table, "nat"], "")?;
                        Ok((objects, run(None, &tools.save, &["-t", "nat"], "")?))
                    })
                    .unwrap()
                };
                let by_restore = listing(&|| {
                    run(None, &tools.restore, RESTORE_ARGS, &fresh_install_batch(family, &plan, probes)).map(drop)
                });
                let batch = netlink::Install::new(&[(family, rules::rules(family, &plan, probes))]).unwrap();
                let by_netlink = listing(&|| batch.send().map_err(CaptureError));
                assert_eq!(by_netlink.0, by_restore.0, "plan {name}, {family:?}: kernel objects");
                compare(family, &by_netlink.1, &plan, probes).unwrap_or_else(|e| panic!("plan {name}: {e}"));
            }
        }
    }
}
