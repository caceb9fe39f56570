//! weft's nftables table as a typed model: what [`super::netlink`] sends to the kernel and what [`render`]
//! prints in `nft -f` syntax (goldens, logs, and the text the real `nft` is compared against).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::Hash;

use ipnet::IpNet;

/// The kernel's interface name size, NUL included.
pub(super) const IFNAMSIZ: usize = 16;

/// The whole `table inet weft`. Installing it replaces whatever was there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub chains: Vec<Chain>,
}

/// A base chain: `type nat hook <hook> priority <priority>; policy accept;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
}

/// Matches are ANDed in order, then the verdict applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// `iifname`
    In,
    /// `oifname`
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrDir {
    Src,
    Dst,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `iifname "x"`, or `iifname { "a", "b" }` for several names.
    Iface { dir: Dir, names: Vec<String> },
    /// `meta l4proto != tcp`
    NotTcp,
    /// `meta l4proto tcp`
    Tcp,
    /// `meta mark & MASK == VALUE`
    Mark { mask: u32, value: u32 },
    /// `ip|ip6 saddr|daddr [!=] X`: one host address is rendered plainly,
    /// anything else as a set (`{ 10.0.0.0/8 }`; like nft, the encoder turns
    /// a one-element set into a plain comparison). All nets must be of one
    /// family, and one rule cannot mix IPv4 and IPv6 matches.
    Addr {
        dir: AddrDir,
        negated: bool,
        nets: Vec<IpNet>,
    },
    /// `tcp dport { 1, 2 }` (a one-element set becomes `tcp dport 1`, as
    /// in nft). Implies `meta l4proto tcp` unless the rule already has it.
    DPort(Vec<u16>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Return,
    /// `redirect to :PORT`; like nft, needs a `Tcp` or `DPort` match before.
    Redirect(u16),
}

pub(super) const TABLE_NAME: &str = "weft";

/// The `nft -f` text for `table` (tab-indented, as `nft list` prints it).
pub fn render(table: &Table) -> String {
    let mut out = format!("table inet {TABLE_NAME} {{\n");
    for (i, chain) in table.chains.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let (hook, prio) = match chain.hook {
            // nft's symbolic name for -100 at prerouting; other values stay numeric.
            Hook::Prerouting if chain.priority == -100 => ("prerouting", "dstnat".to_string()),
            Hook::Prerouting => ("prerouting", chain.priority.to_string()),
            Hook::Output => ("output", chain.priority.to_string()),
        };
        let _ = writeln!(out, "\tchain {} {{", chain.name);
        let _ = writeln!(
            out,
            "\t\ttype nat hook {hook} priority {prio}; policy accept;"
        );
        for rule in &chain.rules {
            let _ = writeln!(out, "\t\t{}", render_rule(rule));
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out
}

// ---------------------------------------------------------------------------
// Rendering and normalisation shared with the encoder
// ---------------------------------------------------------------------------

pub(super) fn render_rule(rule: &Rule) -> String {
    let mut parts: Vec<String> = rule.matches.iter().map(render_match).collect();
    parts.push(match rule.verdict {
        Verdict::Return => "return".to_string(),
        Verdict::Redirect(port) => format!("redirect to :{port}"),
    });
    parts.join(" ")
}

fn render_match(m: &Match) -> String {
    match m {
        Match::Iface { dir, names } => {
            let kw = match dir {
                Dir::In => "iifname",
                Dir::Out => "oifname",
            };
            let names: Vec<String> = dedup(names).iter().map(|n| format!("\"{n}\"")).collect();
            format!("{kw} {}", braces_unless_single(&names))
        }
        Match::NotTcp => "meta l4proto != tcp".to_string(),
        Match::Tcp => "meta l4proto tcp".to_string(),
        Match::Mark { mask, value } => format!("meta mark & 0x{mask:08x} == 0x{value:08x}"),
        Match::Addr { dir, negated, nets } => {
            let nets = normalize_nets(nets);
            let proto = match nets.first() {
                Some(IpNet::V6(_)) => "ip6",
                _ => "ip",
            };
            let field = match dir {
                AddrDir::Src => "saddr",
                AddrDir::Dst => "daddr",
            };
            let neg = if *negated { "!= " } else { "" };
            let elems: Vec<String> = nets.iter().map(render_net).collect();
            let value = match nets.as_slice() {
                [one] if is_host(one) => elems.join(""),
                _ => format!("{{ {} }}", elems.join(", ")),
            };
            format!("{proto} {field} {neg}{value}")
        }
        Match::DPort(ports) => {
            let ports: Vec<String> = dedup(ports).iter().map(u16::to_string).collect();
            format!("tcp dport {{ {} }}", ports.join(", "))
        }
    }
}

/// Keeps error messages readable when a rule carries a large set.
pub(super) fn abbreviate(text: &str) -> String {
    const MAX: usize = 120;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

fn braces_unless_single(items: &[String]) -> String {
    match items {
        [one] => one.clone(),
        _ => format!("{{ {} }}", items.join(", ")),
    }
}

fn render_net(net: &IpNet) -> String {
    if is_host(net) {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

pub(super) fn is_host(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// Host bits cleared (nft would otherwise compare against the unmasked
/// address) and exact duplicates dropped, keeping first-seen order. Both
/// `render` and the encoder use this, so they agree on the element count,
/// which decides between a plain comparison and a set.
pub(super) fn normalize_nets(nets: &[IpNet]) -> Vec<IpNet> {
    dedup(&nets.iter().map(IpNet::trunc).collect::<Vec<_>>())
}

/// Duplicates are dropped on both paths: nft would send them and the kernel
/// would ignore them, but a duplicated single element would otherwise turn a
/// plain comparison into a set.
pub(super) fn dedup<T: Eq + Hash + Clone>(items: &[T]) -> Vec<T> {
    let mut seen = HashSet::new();
    items
        .iter()
        .filter(|i| seen.insert((*i).clone()))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

pub(super) fn validate(table: &Table) -> Result<(), String> {
    let mut names = HashSet::new();
    for chain in &table.chains {
        let ok_name = chain
            .name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chain.name.len() <= 255
            && chain
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !ok_name {
            return Err(format!("invalid chain name {:?}", chain.name));
        }
        if !names.insert(chain.name) {
            return Err(format!("duplicate chain name {:?}", chain.name));
        }
    }
    Ok(())
}

pub(super) fn validate_ifname(name: &str) -> Result<(), String> {
    // IFNAMSIZ is 16 including the NUL. '*' would make nft do a prefix
    // (wildcard) match, which this encoder does not implement.
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == b'"' || b == b'\\' || b == b'*' || b == b'/' || b <= b' ' || b >= 0x7f);
    if ok {
        Ok(())
    } else {
        Err(format!("invalid interface name {name:?}"))
    }
}
