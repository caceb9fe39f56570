//! weft's iptables rules as values: what `capture::plan` lays out, printed in `iptables-save`'s canonical
//! spelling (for `iptables-restore` and for comparing with a saved table) and lowered to nf_tables expressions
//! by [`super::netlink`]. One model, so the two ways of installing a rule cannot disagree.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::IpNet;

use super::super::plan::{PodCapture, Selection};
use super::super::{EXCLUDED_INBOUND_PORTS, INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK, PROXY_MARK_MASK};

/// Chains weft owns in the `nat` table.
pub const CHAINS: [&str; 4] = ["WEFT_INBOUND", "WEFT_IN_REDIRECT", "WEFT_OUTPUT", "WEFT_REDIRECT"];

/// IP family of a rule batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> IpNet {
        match self {
            Family::V4 => IpNet::V4(ipnet::Ipv4Net::new_assert(Ipv4Addr::LOCALHOST, 32)),
            Family::V6 => IpNet::V6(ipnet::Ipv6Net::new_assert(std::net::Ipv6Addr::LOCALHOST, 128)),
        }
    }

    fn passthrough(self) -> IpNet {
        match self {
            Family::V4 => IpNet::V4(ipnet::Ipv4Net::new_assert(super::super::INBOUND_PASSTHROUGH_V4, 32)),
            Family::V6 => IpNet::V6(ipnet::Ipv6Net::new_assert(super::super::INBOUND_PASSTHROUGH_V6, 128)),
        }
    }
}

/// An address match (`-s`/`-d`), possibly negated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub negated: bool,
    pub net: IpNet,
}

/// The `-m` matches weft uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XtMatch {
    /// `-m tcp --dport N`
    TcpDport(u16),
    /// `-m multiport --dports A,B,...`
    MultiportDports(Vec<u16>),
    /// `-m mark --mark VALUE/MASK`
    Mark { value: u32, mask: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `-j CHAIN`, one of [`CHAINS`].
    Jump(&'static str),
    Return,
    /// `-j REDIRECT --to-ports N`
    Redirect(u16),
}

/// One `-A` rule of the `nat` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XtRule {
    pub chain: &'static str,
    pub source: Option<Addr>,
    pub dest: Option<Addr>,
    pub in_iface: Option<String>,
    pub out_iface: Option<String>,
    /// `-p tcp`
    pub tcp: bool,
    pub matches: Vec<XtMatch>,
    pub target: Target,
}

impl XtRule {
    fn new(chain: &'static str, target: Target) -> XtRule {
        XtRule { chain, source: None, dest: None, in_iface: None, out_iface: None, tcp: false, matches: Vec::new(), target }
    }

    fn src(mut self, net: IpNet) -> Self {
        self.source = Some(Addr { negated: false, net });
        self
    }

    fn dst(mut self, net: IpNet) -> Self {
        self.dest = Some(Addr { negated: false, net });
        self
    }

    fn not_dst(mut self, net: IpNet) -> Self {
        self.dest = Some(Addr { negated: true, net });
        self
    }

    fn in_if(mut self, name: &str) -> Self {
        self.in_iface = Some(name.to_string());
        self
    }

    fn out_if(mut self, name: &str) -> Self {
        self.out_iface = Some(name.to_string());
        self
    }

    fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// `-p tcp -m tcp --dport N`
    fn dport(mut self, port: u16) -> Self {
        self.tcp = true;
        self.matches.push(XtMatch::TcpDport(port));
        self
    }

    fn with(mut self, m: XtMatch) -> Self {
        self.matches.push(m);
        self
    }
}

/// `iptables-save`'s spelling: addresses, interfaces and protocol first, then matches, then the target.
impl fmt::Display for XtRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {}", self.chain)?;
        for (flag, addr) in [("-s", &self.source), ("-d", &self.dest)] {
            if let Some(Addr { negated, net }) = addr {
                write!(f, " {}{flag} {net}", if *negated { "! " } else { "" })?;
            }
        }
        if let Some(i) = &self.in_iface {
            write!(f, " -i {i}")?;
        }
        if let Some(o) = &self.out_iface {
            write!(f, " -o {o}")?;
        }
        if self.tcp {
            f.write_str(" -p tcp")?;
        }
        for m in &self.matches {
            match m {
                XtMatch::TcpDport(port) => write!(f, " -m tcp --dport {port}")?,
                XtMatch::MultiportDports(ports) => {
                    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                    write!(f, " -m multiport --dports {}", ports.join(","))?;
                }
                XtMatch::Mark { value, mask } => write!(f, " -m mark --mark 0x{value:x}/0x{mask:x}")?,
            }
        }
        match self.target {
            Target::Jump(chain) => write!(f, " -j {chain}"),
            Target::Return => f.write_str(" -j RETURN"),
            Target::Redirect(port) => write!(f, " -j REDIRECT --to-ports {port}"),
        }
    }
}

/// The rules weft puts in a pod's `nat` table for `plan`. The order within each chain is istio-iptables' (see
/// `capture::plan`); without annotations the rules are exactly those of the default golden files.
pub fn rules(family: Family, plan: &PodCapture, probe_source: Option<Ipv4Addr>) -> Vec<XtRule> {
    let mut r = vec![
        XtRule::new("PREROUTING", Target::Jump("WEFT_INBOUND")).tcp(),
        XtRule::new("OUTPUT", Target::Jump("WEFT_OUTPUT")).tcp(),
    ];
    inbound_rules(&mut r, family, plan, probe_source);
    r.push(XtRule::new("WEFT_IN_REDIRECT", Target::Redirect(INBOUND_PORT)).tcp());
    outbound_rules(&mut r, family, plan);
    r.push(XtRule::new("WEFT_REDIRECT", Target::Redirect(OUTBOUND_PORT)).tcp());
    r
}

fn inbound_rules(r: &mut Vec<XtRule>, family: Family, plan: &PodCapture, probe_source: Option<Ipv4Addr>) {
    let rule = |target| XtRule::new("WEFT_INBOUND", target);
    if let (Family::V4, Some(source)) = (family, probe_source) {
        // kubelet's probes, SNATed to `source` on the node (see `capture::probes`), reach the app directly.
        for port in &plan.probe_ports {
            r.push(rule(Target::Return).src(IpNet::from(std::net::IpAddr::V4(source))).dport(*port));
        }
    }
    // A VM's traffic entering on a virtual interface is the pod's outbound traffic.
    for vif in &plan.virtual_interfaces {
        let redirect = rule(Target::Jump("WEFT_REDIRECT")).in_if(vif.as_str());
        match &plan.outbound_ranges {
            Selection::All => r.push(redirect),
            Selection::Only(ranges) => r.extend(of_family(ranges, family).map(|net| redirect.clone().dst(*net))),
        }
        r.push(rule(Target::Return).in_if(vif.as_str()));
    }
    for iface in &plan.excluded_interfaces {
        r.push(rule(Target::Return).in_if(iface.as_str()));
    }
    r.push(rule(Target::Return).tcp().with(XtMatch::MultiportDports(EXCLUDED_INBOUND_PORTS.to_vec())));
    match &plan.inbound_ports {
        Selection::All => {
            for port in &plan.inbound_excluded_ports {
                r.push(rule(Target::Return).dport(*port));
            }
            r.push(rule(Target::Jump("WEFT_IN_REDIRECT")).tcp());
        }
        Selection::Only(ports) => {
            for port in ports {
                r.push(rule(Target::Jump("WEFT_IN_REDIRECT")).dport(*port));
            }
        }
    }
}

fn outbound_rules(r: &mut Vec<XtRule>, family: Family, plan: &PodCapture) {
    let rule = |target| XtRule::new("WEFT_OUTPUT", target);
    let mark = XtMatch::Mark { value: PROXY_MARK, mask: PROXY_MARK_MASK };
    let (lo, pass) = (family.loopback(), family.passthrough());
    for iface in &plan.excluded_interfaces {
        r.push(rule(Target::Return).out_if(iface.as_str()));
    }
    for port in &plan.outbound_excluded_ports {
        r.push(rule(Target::Return).dport(*port));
    }
    // The proxy's connections to the local app: already proxied inbound.
    r.push(rule(Target::Return).src(pass).out_if("lo"));
    // The proxy dialling its own pod over lo: run it through the pod's inbound side, as Istio does.
    r.push(rule(Target::Jump("WEFT_IN_REDIRECT")).not_dst(lo).out_if("lo").tcp().with(mark.clone()));
    // The app talking to itself over lo is not mesh traffic, unless loopback is explicitly included.
    if !plan.includes_loopback() {
        r.push(rule(Target::Return).out_if("lo"));
    }
    r.push(rule(Target::Return).with(mark));
    r.push(rule(Target::Return).dst(lo));
    for net in of_family(&plan.outbound_excluded_ranges, family) {
        r.push(rule(Target::Return).dst(*net));
    }
    for port in &plan.outbound_ports {
        r.push(rule(Target::Jump("WEFT_REDIRECT")).dport(*port));
    }
    match &plan.outbound_ranges {
        Selection::All => r.push(rule(Target::Jump("WEFT_REDIRECT"))),
        Selection::Only(ranges) => {
            r.extend(of_family(ranges, family).map(|net| rule(Target::Jump("WEFT_REDIRECT")).dst(*net)));
        }
    }
}

/// The ranges of one family (each family has its own table).
fn of_family(ranges: &[IpNet], family: Family) -> impl Iterator<Item = &IpNet> {
    ranges.iter().filter(move |n| matches!((n, family), (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)))
}
