//! The `nftables` backend: one `inet weft` table replaced atomically by a single `nft -f` batch. Same
//! behaviour as the iptables backend (see the module comment of `capture`), for IPv4 and IPv6 at once.

use super::netns::Netns;
use super::{
    find_binary, run, run_in, CaptureError, Redirector, RedirectMode, EXCLUDED_INBOUND_PORTS, INBOUND_PASSTHROUGH_V4,
    INBOUND_PASSTHROUGH_V6, INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK, PROXY_MARK_MASK,
};

const TABLE: &str = "inet weft";

/// The table definition. Chains sit at the `dstnat` priority, like the iptables `nat` table. Without
/// `outbound` (eBPF mode, where connects are redirected by a cgroup program) the final outbound redirect is
/// left out and everything else stays.
pub fn table(outbound: bool) -> String {
    let ports: Vec<String> = EXCLUDED_INBOUND_PORTS.iter().map(u16::to_string).collect();
    let marked = format!("meta mark & 0x{PROXY_MARK_MASK:08x} == 0x{PROXY_MARK:08x}");
    let (pass4, pass6) = (INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6);
    format!(
        r#"table {TABLE} {{
	chain prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		tcp dport {{ {ports} }} return
		meta l4proto tcp redirect to :{INBOUND_PORT}
	}}

	chain output {{
		type nat hook output priority -100; policy accept;
		meta l4proto != tcp return
		oifname "lo" ip saddr {pass4} return
		oifname "lo" ip6 saddr {pass6} return
		oifname "lo" {marked} ip daddr != 127.0.0.1 meta l4proto tcp redirect to :{INBOUND_PORT}
		oifname "lo" {marked} ip6 daddr != ::1 meta l4proto tcp redirect to :{INBOUND_PORT}
		oifname "lo" return
		{marked} return
		ip daddr 127.0.0.1 return
		ip6 daddr ::1 return
{outbound_rule}	}}
}}
"#,
        ports = ports.join(", "),
        outbound_rule = if outbound { format!("\t\tmeta l4proto tcp redirect to :{OUTBOUND_PORT}\n") } else { String::new() },
    )
}

/// Creating then flushing the table makes the batch valid whether or not it already exists, and the kernel
/// applies the whole file as one transaction: there is no moment without rules. (Flushing rather than deleting
/// the table: deleting base chains waits for an RCU grace period, ~15 ms per pod.)
pub fn install_batch(outbound: bool) -> String {
    format!("table {TABLE}\nflush table {TABLE}\n{}", table(outbound))
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

#[derive(Debug)]
pub struct Nftables {
    nft: String,
    outbound: bool,
    /// `nft list table` output of a freshly installed table, as this node's `nft` prints it.
    expected: Vec<String>,
}

impl Nftables {
    /// Finds `nft` and learns how it prints weft's table, by installing it in a scratch network namespace.
    pub fn detect() -> Result<Nftables, CaptureError> {
        Self::detect_with(true)
    }

    /// The inbound half only, for eBPF mode.
    pub fn detect_inbound_only() -> Result<Nftables, CaptureError> {
        Self::detect_with(false)
    }

    fn detect_with(outbound: bool) -> Result<Nftables, CaptureError> {
        let nft = find_binary("nft")
            .ok_or_else(|| CaptureError("nft not found: install the nftables package".into()))?;
        let expected = canonical_listing(&nft, outbound)?;
        Ok(Nftables { nft, outbound, expected })
    }

    fn list(&self, ns: &Netns) -> Result<Option<String>, CaptureError> {
        match run_in(ns, &self.nft, &["list", "table", "inet", "weft"], "") {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.0.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Installs the table in a private, throw-away network namespace and reads it back.
fn canonical_listing(nft: &str, outbound: bool) -> Result<Vec<String>, CaptureError> {
    let nft = nft.to_string();
    let listing = std::thread::spawn(move || -> Result<String, CaptureError> {
        // SAFETY: unshare only affects this short-lived thread, which exits right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(CaptureError(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error())));
        }
        run(None, &nft, &["-f", "-"], &install_batch(outbound))?;
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

    fn install(&self, ns: &Netns) -> Result<(), CaptureError> {
        run_in(ns, &self.nft, &["-f", "-"], &install_batch(self.outbound)).map(drop)
    }

    fn verify(&self, ns: &Netns) -> Result<(), CaptureError> {
        match self.list(ns)? {
            Some(listing) => compare(&self.expected, &listing),
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

    #[test]
    fn install_batch_matches_golden_file() {
        check_golden("nftables.golden", &install_batch(true));
        check_golden("nftables-inbound-only.golden", &install_batch(false));
    }

    #[test]
    fn compare_names_the_difference() {
        let expected = statements(&table(true));
        let tampered = table(true).replace("redirect to :15001", "accept");
        let err = compare(&expected, &tampered).unwrap_err().to_string();
        assert!(err.contains("missing [meta l4proto tcp redirect to :15001]"), "{err}");
        assert!(err.contains("unexpected [meta l4proto tcp accept]"), "{err}");
        assert!(compare(&expected, &table(true)).is_ok());
    }
}
