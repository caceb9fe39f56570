//! weft's iptables rules sent over netlink in iptables-nft's own encoding: what `iptables-nft-restore` (1.8.9)
//! sends for the same rules — the `nat` table, its built-in chains, weft's chains, native expressions where
//! iptables-nft uses them (interfaces, protocol, addresses, `tcp` ports, `mark`), `xt` match and target blobs
//! where it does not (`multiport`, `REDIRECT`), a counter per rule and the rule's compat protocol — so that
//! `iptables-nft-save` and `iptables-nft` read and change the rules as their own, and no process is spawned.
//!
//! Only the fresh-table case is encoded: weft's chains are created with NLM_F_EXCL, so in a table that already
//! has one the whole batch fails and changes nothing (the caller then goes through `iptables-restore`).

use std::ffi::CString;

use ipnet::IpNet;
use netlink_bindings::nftables::Nfgenmsg;

use super::super::nfnetlink::{nest, put, put_str, put_u32, Batch, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL};
use super::rules::{Addr, Family, Target, XtMatch, XtRule, CHAINS};

/// A sealed batch installing weft's rules for one or both families in one transaction.
#[derive(Debug)]
pub struct Install(Batch);

impl Install {
    /// Creates weft's chains and appends `rules` for each `(family, rules)` given.
    pub fn new(families: &[(Family, Vec<XtRule>)]) -> Result<Install, String> {
        let mut batch = Batch::new();
        for (family, rules) in families {
            encode_table(&mut batch, *family, rules)?;
        }
        batch.seal().map(Install)
    }

    /// Sends the batch from the calling thread's network namespace.
    pub fn send(&self) -> Result<(), String> {
        self.0.send().map_err(|e| e.to_string())
    }
}

/// The built-in chains of the `nat` table weft appends to: hook number and priority (NF_IP_PRI_NAT_DST).
const BUILTIN: [(&str, u32, i32); 2] = [("PREROUTING", NF_INET_PRE_ROUTING, -100), ("OUTPUT", NF_INET_LOCAL_OUT, -100)];

fn encode_table(batch: &mut Batch, family: Family, rules: &[XtRule]) -> Result<(), String> {
    let fam = nfgen(family);
    let tag = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    batch.msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, format!("add table {tag} nat"), |b| {
        b.extend_from_slice(fam.as_slice());
        put_str(b, NFTA_TABLE_NAME, TABLE);
    });
    for chain in CHAINS {
        batch.msg(NFT_MSG_NEWCHAIN, NLM_F_EXCL, format!("create chain {chain} in {tag} nat"), |b| {
            b.extend_from_slice(fam.as_slice());
            put_str(b, NFTA_CHAIN_TABLE, TABLE);
            put_str(b, NFTA_CHAIN_NAME, chain);
        });
    }
    // A built-in chain is added just before its first rule, as iptables-nft does (so the kernel numbers every
    // object as it would for iptables-nft's batch).
    let mut added = [false; BUILTIN.len()];
    for rule in rules {
        if let Some(i) = BUILTIN.iter().position(|(name, ..)| *name == rule.chain) {
            if !std::mem::replace(&mut added[i], true) {
                add_builtin_chain(batch, &fam, tag, BUILTIN[i]);
            }
        }
        let what = format!("add {tag} nat rule {rule}");
        let body = rule_body(family, rule).map_err(|e| format!("{what}: {e}"))?;
        batch.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, what, |b| {
            b.extend_from_slice(fam.as_slice());
            b.extend_from_slice(&body);
        });
    }
    Ok(())
}

fn add_builtin_chain(batch: &mut Batch, fam: &Nfgenmsg, tag: &str, (chain, hooknum, priority): (&str, u32, i32)) {
    batch.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, format!("add chain {chain} to {tag} nat"), |b| {
        b.extend_from_slice(fam.as_slice());
        put_str(b, NFTA_CHAIN_TABLE, TABLE);
        put_str(b, NFTA_CHAIN_NAME, chain);
        nest(b, NFTA_CHAIN_HOOK, |b| {
            put_u32(b, NFTA_HOOK_HOOKNUM, hooknum);
            put_u32(b, NFTA_HOOK_PRIORITY, priority as u32);
        });
        put_u32(b, NFTA_CHAIN_POLICY, NF_ACCEPT);
        put_str(b, NFTA_CHAIN_TYPE, "nat");
    });
}

/// A rule's attributes after the nfgenmsg, in iptables-nft's order: interfaces, protocol, addresses, matches,
/// counter, target; then the protocol again as the rule's compat attribute (the kernel hands it to `xt`
/// extensions, which check it: `multiport` needs tcp).
fn rule_body(family: Family, rule: &XtRule) -> Result<Vec<u8>, String> {
    let mut b = Vec::with_capacity(512);
    put_str(&mut b, NFTA_RULE_TABLE, TABLE);
    put_str(&mut b, NFTA_RULE_CHAIN, rule.chain);
    nest(&mut b, NFTA_RULE_EXPRESSIONS, |b| rule_exprs(b, family, rule))?;
    nest(&mut b, NFTA_RULE_COMPAT, |b| {
        put_u32(b, NFTA_RULE_COMPAT_PROTO, if rule.tcp { IPPROTO_TCP } else { 0 });
        put_u32(b, NFTA_RULE_COMPAT_FLAGS, 0);
    });
    Ok(b)
}

fn rule_exprs(b: &mut Vec<u8>, family: Family, rule: &XtRule) -> Result<(), String> {
    for (key, iface) in [(NFT_META_IIFNAME, &rule.in_iface), (NFT_META_OIFNAME, &rule.out_iface)] {
        if let Some(name) = iface {
            meta(b, key);
            let name = CString::new(name.as_str()).map_err(|_| format!("interface {name:?} contains a NUL byte"))?;
            cmp(b, NFT_CMP_EQ, name.as_bytes_with_nul());
        }
    }
    if rule.tcp {
        meta(b, NFT_META_L4PROTO);
        cmp(b, NFT_CMP_EQ, &[IPPROTO_TCP as u8]);
    }
    let (saddr, daddr) = match family {
        Family::V4 => (IPV4_SADDR, IPV4_DADDR),
        Family::V6 => (IPV6_SADDR, IPV6_DADDR),
    };
    if let Some(a) = &rule.source {
        addr(b, saddr, a)?;
    }
    if let Some(a) = &rule.dest {
        addr(b, daddr, a)?;
    }
    for m in &rule.matches {
        match m {
            XtMatch::TcpDport(port) => {
                payload(b, NFT_PAYLOAD_TRANSPORT_HEADER, TCP_DPORT, 2);
                cmp(b, NFT_CMP_EQ, &port.to_be_bytes());
            }
            XtMatch::MultiportDports(ports) => xt(b, "match", "multiport", 1, &multiport_info(ports)?),
            XtMatch::Mark { value, mask } => {
                meta(b, NFT_META_MARK);
                if *mask != u32::MAX {
                    bitwise(b, &mask.to_ne_bytes());
                }
                cmp(b, NFT_CMP_EQ, &value.to_ne_bytes());
            }
        }
    }
    expr(b, "counter", |b| {
        put(b, NFTA_COUNTER_BYTES, &0u64.to_be_bytes());
        put(b, NFTA_COUNTER_PACKETS, &0u64.to_be_bytes());
    });
    match rule.target {
        Target::Jump(chain) => verdict(b, NFT_JUMP, Some(chain)),
        Target::Return => verdict(b, NFT_RETURN, None),
        Target::Redirect(port) => xt(b, "target", "REDIRECT", 0, &redirect_info(family, port)),
    }
    Ok(())
}

/// `-s`/`-d`: iptables-nft loads only the prefix's bytes when the prefix is whole bytes, else the whole
/// address through a mask; a /0 that is not negated matches everything and is left out, as iptables does.
fn addr(b: &mut Vec<u8>, offset: u32, a: &Addr) -> Result<(), String> {
    let (net, mask) = match a.net.trunc() {
        IpNet::V4(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
        IpNet::V6(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
    };
    let prefix = usize::from(a.net.prefix_len());
    let op = if a.negated { NFT_CMP_NEQ } else { NFT_CMP_EQ };
    if prefix == 0 {
        return if a.negated { Err(format!("! {} matches nothing", a.net)) } else { Ok(()) };
    }
    if prefix % 8 == 0 {
        payload(b, NFT_PAYLOAD_NETWORK_HEADER, offset, prefix as u32 / 8);
        cmp(b, op, &net[..prefix / 8]);
    } else {
        payload(b, NFT_PAYLOAD_NETWORK_HEADER, offset, net.len() as u32);
        bitwise(b, &mask);
        cmp(b, op, &net);
    }
    Ok(())
}

/// `struct xt_multiport_v1`: flags, count, 15 ports in host order, 15 range flags, invert.
fn multiport_info(ports: &[u16]) -> Result<Vec<u8>, String> {
    const MAX: usize = 15;
    if ports.is_empty() || ports.len() > MAX {
        return Err(format!("multiport takes 1 to {MAX} ports, not {}", ports.len()));
    }
    let mut info = vec![XT_MULTIPORT_DESTINATION, ports.len() as u8];
    for i in 0..MAX {
        info.extend_from_slice(&ports.get(i).copied().unwrap_or(0).to_ne_bytes());
    }
    info.resize(info.len() + MAX + 1, 0);
    Ok(info)
}

/// REDIRECT's revision-0 argument: `nf_nat_ipv4_multi_range_compat` for IPv4, `nf_nat_range` for IPv6, with
/// only the port range (one port, network order) specified; padded to XT_ALIGN as the kernel checks.
fn redirect_info(family: Family, port: u16) -> Vec<u8> {
    let flags = NF_NAT_RANGE_PROTO_SPECIFIED.to_ne_bytes();
    let mut info = Vec::with_capacity(40);
    match family {
        Family::V4 => {
            info.extend_from_slice(&1u32.to_ne_bytes()); // rangesize
            info.extend_from_slice(&flags);
            info.extend_from_slice(&[0; 8]); // min_ip, max_ip
        }
        Family::V6 => {
            info.extend_from_slice(&flags);
            info.extend_from_slice(&[0; 32]); // min_addr, max_addr
        }
    }
    info.extend_from_slice(&port.to_be_bytes());
    info.extend_from_slice(&port.to_be_bytes());
    info.resize(info.len().next_multiple_of(8), 0);
    info
}

fn meta(b: &mut Vec<u8>, key: u32) {
    expr(b, "meta", |b| {
        put_u32(b, NFTA_META_KEY, key);
        put_u32(b, NFTA_META_DREG, NFT_REG_1);
    });
}

fn payload(b: &mut Vec<u8>, base: u32, offset: u32, len: u32) {
    expr(b, "payload", |b| {
        put_u32(b, NFTA_PAYLOAD_DREG, NFT_REG_1);
        put_u32(b, NFTA_PAYLOAD_BASE, base);
        put_u32(b, NFTA_PAYLOAD_OFFSET, offset);
        put_u32(b, NFTA_PAYLOAD_LEN, len);
    });
}

/// `reg1 = (reg1 & mask) ^ 0`
fn bitwise(b: &mut Vec<u8>, mask: &[u8]) {
    expr(b, "bitwise", |b| {
        put_u32(b, NFTA_BITWISE_SREG, NFT_REG_1);
        put_u32(b, NFTA_BITWISE_DREG, NFT_REG_1);
        put_u32(b, NFTA_BITWISE_LEN, mask.len() as u32);
        nest(b, NFTA_BITWISE_MASK, |b| put(b, NFTA_DATA_VALUE, mask));
        nest(b, NFTA_BITWISE_XOR, |b| put(b, NFTA_DATA_VALUE, &vec![0; mask.len()]));
    });
}

fn cmp(b: &mut Vec<u8>, op: u32, data: &[u8]) {
    expr(b, "cmp", |b| {
        put_u32(b, NFTA_CMP_SREG, NFT_REG_1);
        put_u32(b, NFTA_CMP_OP, op);
        nest(b, NFTA_CMP_DATA, |b| put(b, NFTA_DATA_VALUE, data));
    });
}

fn verdict(b: &mut Vec<u8>, code: i32, chain: Option<&str>) {
    expr(b, "immediate", |b| {
        put_u32(b, NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        nest(b, NFTA_IMMEDIATE_DATA, |b| {
            nest(b, NFTA_DATA_VERDICT, |b| {
                put_u32(b, NFTA_VERDICT_CODE, code as u32);
                if let Some(chain) = chain {
                    put_str(b, NFTA_VERDICT_CHAIN, chain);
                }
            });
        });
    });
}

/// An `xt` extension run by the kernel's nft_compat: `kind` is "match" or "target".
fn xt(b: &mut Vec<u8>, kind: &str, name: &str, revision: u32, info: &[u8]) {
    expr(b, kind, |b| {
        put_str(b, NFTA_XT_NAME, name);
        put_u32(b, NFTA_XT_REV, revision);
        put(b, NFTA_XT_INFO, info);
    });
}

fn expr(b: &mut Vec<u8>, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
    nest(b, NFTA_LIST_ELEM, |b| {
        put_str(b, NFTA_EXPR_NAME, name);
        nest(b, NFTA_EXPR_DATA, data);
    });
}

fn nfgen(family: Family) -> Nfgenmsg {
    Nfgenmsg {
        nfgen_family: match family {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        },
        ..Default::default()
    }
}

// linux/netfilter/nf_tables.h, nf_nat.h, xt_multiport.h
const TABLE: &str = "nat";
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFT_MSG_NEWTABLE: u8 = 0;
const NFT_MSG_NEWCHAIN: u8 = 3;
const NFT_MSG_NEWRULE: u8 = 6;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_COMPAT: u16 = 5;
const NFTA_RULE_COMPAT_PROTO: u16 = 1;
const NFTA_RULE_COMPAT_FLAGS: u16 = 2;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// NFTA_MATCH_* and NFTA_TARGET_* share their numbers.
const NFTA_XT_NAME: u16 = 1;
const NFTA_XT_REV: u16 = 2;
const NFTA_XT_INFO: u16 = 3;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_JUMP: i32 = -3;
const NFT_RETURN: i32 = -5;
const NF_ACCEPT: u32 = 1;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const XT_MULTIPORT_DESTINATION: u8 = 1;
const IPPROTO_TCP: u32 = 6;
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;
const IPV6_SADDR: u32 = 8;
const IPV6_DADDR: u32 = 24;
const TCP_DPORT: u32 = 2;
