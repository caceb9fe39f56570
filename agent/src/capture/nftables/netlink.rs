//! Programs weft's nftables table (`inet weft`, see [`super::ruleset`]) over netlink: no `nft` process and no C
//! library. [`install`] sends what nft 1.0.6 itself sends for the table's text (same expressions, anonymous sets,
//! element encoding and set userdata), so the kernel holds the same objects whichever way the table was installed
//! (a root test compares both against the real `nft`).
//!
//! Attribute layouts come from the `netlink-bindings` crate (generated from
//! the kernel's nftables YAML spec). Three spots of its 0.3.5 nftables
//! bindings are wrong or missing and are written by hand here: the `lookup`
//! attribute numbers, the byte order of set ids, and the `redir` expression.
//! The socket is a small hand-written NETLINK_NETFILTER client at the bottom
//! of this file rather than `netlink-socket2`: it has to size the socket
//! buffers for large batches, bound the wait for replies, map each reply back
//! to the message (and rule) it answers, and keep the slow socket close off
//! the caller's path, none of which `netlink-socket2` exposes.

use std::collections::HashSet;
use std::ffi::CStr;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, OnceLock};

use ipnet::IpNet;
use netlink_bindings::nftables::{
    self as nft, CmpOps, MetaKeys, Nfgenmsg, PayloadBase, PushExprListAttrs, Registers, VerdictCode,
};
use netlink_bindings::traits::Pusher;
use netlink_bindings::utils::{finalize_nested_header, push_header, push_nested_header};

use super::ruleset::{
    abbreviate, dedup, is_host, normalize_nets, render_rule, validate, validate_ifname, AddrDir,
    Dir, Hook, Match, Rule, Table, Verdict, IFNAMSIZ,
};

const TABLE: &CStr = c"weft";

/// Replaces table inet weft with `table` in one netlink batch, atomically.
///
/// The batch is `add table; delete table; add table; chains; sets; rules`.
/// Deleting and recreating (rather than flushing) also drops chains that are
/// no longer in the model and allows a chain's hook or priority to change,
/// which an in-place update cannot do; the kernel commits the batch as one
/// transaction, so packets see either the old or the new table, never a gap.
///
/// Opens its netlink socket inside the call, so it acts in the network
/// namespace of the calling thread.
pub fn install(table: &Table) -> Result<(), String> {
    Install::new(table)?.send()
}

/// The batch that replaces table inet weft with one table, encoded once and sent to every namespace that gets
/// that table (building it costs about half as much as the kernel's taking it).
#[derive(Debug)]
pub struct Install(Batch);

impl Install {
    pub fn new(table: &Table) -> Result<Install, String> {
        let sealed = install_batch(table)?.seal();
        sealed.map(Install).map_err(|e| format!("installing table inet weft: {e}"))
    }

    /// Sends the batch from the calling thread's network namespace.
    pub fn send(&self) -> Result<(), String> {
        self.0.send().map_err(|e| format!("installing table inet weft: {e}"))
    }
}

fn install_batch(table: &Table) -> Result<Batch, String> {
    validate(table)?;
    let mut batch = Batch::new();
    let fam = inet_header();

    batch.msg(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        "create table inet weft if missing",
        |b| {
            nft::OpNewtableDo::encode_request(b, &fam)
                .push_name(TABLE)
                .push_flags(0);
        },
    );
    batch.msg(NFT_MSG_DELTABLE, 0, "delete table inet weft", |b| {
        nft::OpDeltableDo::encode_request(b, &fam).push_name(TABLE);
    });
    batch.msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, "add table inet weft", |b| {
        nft::OpNewtableDo::encode_request(b, &fam)
            .push_name(TABLE)
            .push_flags(0);
    });

    for chain in &table.chains {
        let name = cstring(chain.name)?;
        batch.msg(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("add chain {}", chain.name),
            |b| {
                nft::OpNewchainDo::encode_request(b, &fam)
                    .push_table(TABLE)
                    .push_name(&name)
                    .push_type(c"nat")
                    .push_policy(NF_ACCEPT)
                    .nested_hook()
                    .push_num(chain.hook.hooknum())
                    .push_priority(chain.priority)
                    .end_nested();
            },
        );
    }

    // Anonymous set ids only need to be unique within the batch; nft numbers
    // them from 1 as well.
    let mut next_set_id = 1;
    for chain in &table.chains {
        let chain_name = cstring(chain.name)?;
        for (i, rule) in chain.rules.iter().enumerate() {
            let what = format!(
                "rule {} of chain {} ({})",
                i + 1,
                chain.name,
                abbreviate(&render_rule(rule))
            );
            let lowered = lower_rule(rule, &mut next_set_id).map_err(|e| format!("{what}: {e}"))?;
            for set in &lowered.sets {
                encode_set(&mut batch, set, &what);
            }
            batch.msg(
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                format!("add {what}"),
                |b| {
                    let list = nft::OpNewruleDo::encode_request(b, &fam)
                        .push_table(TABLE)
                        .push_chain(&chain_name)
                        .nested_expressions();
                    let list = lowered.exprs.iter().fold(list, push_expr);
                    list.end_nested();
                },
            );
        }
    }

    Ok(batch)
}

/// Deletes table inet weft; Ok when it does not exist.
pub fn remove() -> Result<(), String> {
    let mut batch = Batch::new();
    let fam = inet_header();
    batch.msg(NFT_MSG_DELTABLE, 0, "delete table inet weft", |b| {
        nft::OpDeltableDo::encode_request(b, &fam).push_name(TABLE);
    });
    match batch.seal().map_err(BatchError::Io).and_then(|b| b.send()) {
        Ok(()) => Ok(()),
        // Only message of the batch, so ENOENT can only mean "no such table".
        Err(BatchError::Rejected(errs)) if errs.iter().all(|e| e.errno == libc::ENOENT) => Ok(()),
        Err(e) => Err(format!("removing table inet weft: {e}")),
    }
}

// ---------------------------------------------------------------------------
// Lowering: model -> nftables expressions (what nft 1.0.6 generates)
// ---------------------------------------------------------------------------

/// One nftables expression. Everything but verdicts works on register 1,
/// as nft does for these rule shapes.
#[derive(Debug, Clone)]
enum Expr {
    Meta(MetaKeys),
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
    },
    /// `reg1 = (reg1 & mask) ^ 0`
    Bitwise {
        mask: Vec<u8>,
    },
    Cmp {
        op: CmpOps,
        data: Vec<u8>,
    },
    Lookup {
        set_id: u32,
        inverted: bool,
    },
    /// `reg1 = port` (network byte order), the operand of `redir`.
    Port(u16),
    Redir,
    Return,
}

/// An anonymous, constant set created in the same batch as its rule.
#[derive(Debug, Clone)]
struct AnonSet {
    id: u32,
    key_type: u32,
    key_len: u32,
    interval: bool,
    /// nft's NFTA_SET_DESC size; see `interval_elems`.
    size: u32,
    userdata: Vec<u8>,
    elems: Vec<SetElem>,
}

#[derive(Debug, Clone)]
struct SetElem {
    key: Vec<u8>,
    /// NFT_SET_ELEM_INTERVAL_END: the first key *after* a range.
    end: bool,
    /// A range running to the top of the key space has no end element; nft
    /// marks its start in the element's userdata instead.
    open: bool,
}

struct LoweredRule {
    sets: Vec<AnonSet>,
    exprs: Vec<Expr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// nft only inserts a protocol dependency (`meta nfproto ipv4`,
/// `meta l4proto tcp`) when the rule so far has not established it; explicit
/// matches are always emitted.
#[derive(Default)]
struct ProtoCtx {
    nfproto: Option<Family>,
    tcp: bool,
}

fn lower_rule(rule: &Rule, next_set_id: &mut u32) -> Result<LoweredRule, String> {
    let mut ctx = ProtoCtx::default();
    let mut out = LoweredRule {
        sets: Vec::new(),
        exprs: Vec::new(),
    };
    let mut new_set = |out: &mut LoweredRule, mut set: AnonSet| {
        set.id = *next_set_id;
        *next_set_id = next_set_id.wrapping_add(1);
        let id = set.id;
        out.sets.push(set);
        id
    };

    for m in &rule.matches {
        match m {
            Match::Iface { dir, names } => {
                let names = dedup(names);
                if names.is_empty() {
                    return Err("interface match without names".into());
                }
                let keys = names
                    .iter()
                    .map(|n| validate_ifname(n).map(|()| ifname_bytes(n)))
                    .collect::<Result<Vec<_>, _>>()?;
                let key = match dir {
                    Dir::In => MetaKeys::Iifname,
                    Dir::Out => MetaKeys::Oifname,
                };
                out.exprs.push(Expr::Meta(key));
                if let [one] = keys.as_slice() {
                    out.exprs.push(Expr::Cmp {
                        op: CmpOps::Eq,
                        data: one.clone(),
                    });
                } else {
                    let set = plain_set(
                        TYPE_IFNAME,
                        IFNAMSIZ as u32,
                        set_userdata(BYTEORDER_HOST, false, Typeof::Meta(key)),
                        keys,
                    );
                    let set_id = new_set(&mut out, set);
                    out.exprs.push(Expr::Lookup {
                        set_id,
                        inverted: false,
                    });
                }
            }
            Match::NotTcp => {
                out.exprs.push(Expr::Meta(MetaKeys::L4Proto));
                out.exprs.push(Expr::Cmp {
                    op: CmpOps::Neq,
                    data: vec![IPPROTO_TCP],
                });
            }
            Match::Tcp => {
                out.exprs.push(Expr::Meta(MetaKeys::L4Proto));
                out.exprs.push(Expr::Cmp {
                    op: CmpOps::Eq,
                    data: vec![IPPROTO_TCP],
                });
                ctx.tcp = true;
            }
            Match::Mark { mask, value } => {
                // The mark is a host-endian meta key, so its operands are too.
                out.exprs.push(Expr::Meta(MetaKeys::Mark));
                out.exprs.push(Expr::Bitwise {
                    mask: mask.to_ne_bytes().to_vec(),
                });
                out.exprs.push(Expr::Cmp {
                    op: CmpOps::Eq,
                    data: value.to_ne_bytes().to_vec(),
                });
            }
            Match::Addr { dir, negated, nets } => {
                lower_addr(&mut out, &mut ctx, *dir, *negated, nets, &mut new_set)?;
            }
            Match::DPort(ports) => {
                let ports = dedup(ports);
                if ports.is_empty() {
                    return Err("tcp dport match without ports".into());
                }
                if !ctx.tcp {
                    out.exprs.push(Expr::Meta(MetaKeys::L4Proto));
                    out.exprs.push(Expr::Cmp {
                        op: CmpOps::Eq,
                        data: vec![IPPROTO_TCP],
                    });
                    ctx.tcp = true;
                }
                out.exprs.push(Expr::Payload {
                    base: PayloadBase::TransportHeader,
                    offset: 2,
                    len: 2,
                });
                let keys: Vec<Vec<u8>> = ports.iter().map(|p| p.to_be_bytes().to_vec()).collect();
                if let [one] = keys.as_slice() {
                    out.exprs.push(Expr::Cmp {
                        op: CmpOps::Eq,
                        data: one.clone(),
                    });
                } else {
                    let typeof_ = Typeof::Payload {
                        desc: PROTO_DESC_TCP,
                        field: TCPHDR_DPORT,
                    };
                    let set = plain_set(
                        TYPE_INET_SERVICE,
                        2,
                        set_userdata(BYTEORDER_BIG, false, typeof_),
                        keys,
                    );
                    let set_id = new_set(&mut out, set);
                    out.exprs.push(Expr::Lookup {
                        set_id,
                        inverted: false,
                    });
                }
            }
        }
    }

    match rule.verdict {
        Verdict::Return => out.exprs.push(Expr::Return),
        Verdict::Redirect(port) => {
            // nft refuses a port redirect without a transport protocol in
            // context ("transport protocol mapping is only valid after
            // transport protocol match"); mirror that rather than install a
            // rule nft could not have produced.
            if !ctx.tcp {
                return Err("redirect to a port needs a preceding tcp match".into());
            }
            out.exprs.push(Expr::Port(port));
            out.exprs.push(Expr::Redir);
        }
    }
    Ok(out)
}

fn lower_addr(
    out: &mut LoweredRule,
    ctx: &mut ProtoCtx,
    dir: AddrDir,
    negated: bool,
    nets: &[IpNet],
    new_set: &mut impl FnMut(&mut LoweredRule, AnonSet) -> u32,
) -> Result<(), String> {
    let nets = normalize_nets(nets);
    let family = match nets.first() {
        None => return Err("address match without addresses".into()),
        Some(IpNet::V4(_)) => Family::V4,
        Some(IpNet::V6(_)) => Family::V6,
    };
    if nets
        .iter()
        .any(|n| matches!(n, IpNet::V4(_)) != (family == Family::V4))
    {
        return Err("address match mixes IPv4 and IPv6".into());
    }
    match ctx.nfproto {
        Some(f) if f != family => return Err("rule matches both IPv4 and IPv6 addresses".into()),
        Some(_) => {}
        None => {
            let nfproto = match family {
                Family::V4 => NFPROTO_IPV4,
                Family::V6 => NFPROTO_IPV6,
            };
            out.exprs.push(Expr::Meta(MetaKeys::Nfproto));
            out.exprs.push(Expr::Cmp {
                op: CmpOps::Eq,
                data: vec![nfproto],
            });
            ctx.nfproto = Some(family);
        }
    }

    // (offset in the network header, address length, nft's typeof ids)
    let (offset, len, desc, field) = match (family, dir) {
        (Family::V4, AddrDir::Src) => (12, 4, PROTO_DESC_IP, IPHDR_SADDR),
        (Family::V4, AddrDir::Dst) => (16, 4, PROTO_DESC_IP, IPHDR_DADDR),
        (Family::V6, AddrDir::Src) => (8, 16, PROTO_DESC_IP6, IP6HDR_SADDR),
        (Family::V6, AddrDir::Dst) => (24, 16, PROTO_DESC_IP6, IP6HDR_DADDR),
    };
    let op = if negated { CmpOps::Neq } else { CmpOps::Eq };
    let load = |len| Expr::Payload {
        base: PayloadBase::NetworkHeader,
        offset,
        len,
    };

    if let [net] = nets.as_slice() {
        let addr = ip_bytes(net.network());
        let prefix = u32::from(net.prefix_len());
        if is_host(net) {
            out.exprs.push(load(len));
            out.exprs.push(Expr::Cmp { op, data: addr });
        } else if prefix > 0 && prefix % 8 == 0 {
            // nft shortens the load to the prefix bytes when it is byte aligned.
            let n = (prefix / 8) as usize;
            out.exprs.push(load(prefix / 8));
            out.exprs.push(Expr::Cmp {
                op,
                data: addr[..n].to_vec(),
            });
        } else {
            out.exprs.push(load(len));
            out.exprs.push(Expr::Bitwise {
                mask: ip_bytes(net.netmask()),
            });
            out.exprs.push(Expr::Cmp { op, data: addr });
        }
        return Ok(());
    }

    let key_type = match family {
        Family::V4 => TYPE_IPADDR,
        Family::V6 => TYPE_IP6ADDR,
    };
    let typeof_ = Typeof::Payload { desc, field };
    let set = if nets.iter().all(is_host) {
        let keys = nets.iter().map(|n| ip_bytes(n.addr())).collect();
        plain_set(
            key_type,
            len,
            set_userdata(BYTEORDER_BIG, false, typeof_),
            keys,
        )
    } else {
        let (elems, size) = interval_elems(&nets, len as usize);
        AnonSet {
            id: 0,
            key_type,
            key_len: len,
            interval: true,
            size,
            userdata: set_userdata(BYTEORDER_BIG, true, typeof_),
            elems,
        }
    };
    out.exprs.push(load(len));
    let set_id = new_set(out, set);
    out.exprs.push(Expr::Lookup {
        set_id,
        inverted: negated,
    });
    Ok(())
}

fn plain_set(key_type: u32, key_len: u32, userdata: Vec<u8>, keys: Vec<Vec<u8>>) -> AnonSet {
    AnonSet {
        id: 0,
        key_type,
        key_len,
        interval: false,
        size: keys.len() as u32,
        userdata,
        elems: keys
            .into_iter()
            .map(|key| SetElem {
                key,
                end: false,
                open: false,
            })
            .collect(),
    }
}

/// The element list nft 1.0.6 sends for an anonymous interval set
/// (src/intervals.c: set_automerge + set_to_intervals), and its desc size.
///
/// Ranges are sorted, and contained, overlapping and adjacent ones merged.
/// Each range then becomes a start key plus an END element at `high + 1`
/// (none when the range reaches the top of the key space: the start is
/// flagged "open" instead), and an END element at 0 comes first unless the
/// first range starts at 0, so the kernel's rbtree sees where the gap below
/// it begins. nft counts 2 per range plus that leading element as the size.
fn interval_elems(nets: &[IpNet], key_len: usize) -> (Vec<SetElem>, u32) {
    let max: u128 = if key_len == 4 {
        u32::MAX as u128
    } else {
        u128::MAX
    };
    let mut ranges: Vec<(u128, u128)> = nets
        .iter()
        .map(|n| (ip_u128(n.network()), ip_u128(n.broadcast())))
        .collect();
    ranges.sort();

    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (low, high) in ranges {
        match merged.last_mut() {
            Some(prev) if low <= prev.1 || low - prev.1 == 1 => prev.1 = prev.1.max(high),
            _ => merged.push((low, high)),
        }
    }

    let key = |v: u128| -> Vec<u8> {
        let bytes = v.to_be_bytes();
        bytes[16 - key_len..].to_vec()
    };
    let mut elems = Vec::with_capacity(merged.len() * 2 + 1);
    let leading_end = merged.first().is_some_and(|r| r.0 != 0);
    if leading_end {
        elems.push(SetElem {
            key: key(0),
            end: true,
            open: false,
        });
    }
    for &(low, high) in &merged {
        let open = high == max;
        elems.push(SetElem {
            key: key(low),
            end: false,
            open,
        });
        if !open {
            elems.push(SetElem {
                key: key(high + 1),
                end: true,
                open: false,
            });
        }
    }
    let size = 2 * merged.len() as u32 + u32::from(leading_end);
    (elems, size)
}

fn ip_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ip_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.resize(IFNAMSIZ, 0);
    b
}

/// What nft records about a set's key in NFTA_SET_USERDATA ("typeof").
enum Typeof {
    Meta(MetaKeys),
    Payload { desc: u32, field: u32 },
}

/// libnftnl's set userdata TLVs (u8 type, u8 len, value; u32s in host
/// order). The kernel stores them opaquely; nft reads them back when listing.
fn set_userdata(byteorder: u32, merge: bool, typeof_: Typeof) -> Vec<u8> {
    fn tlv(out: &mut Vec<u8>, ty: u8, value: &[u8]) {
        out.push(ty);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
    }
    let mut data = Vec::new();
    let expr_type = match typeof_ {
        Typeof::Meta(key) => {
            tlv(
                &mut data,
                UDATA_TYPEOF_META_KEY,
                &(key as u32).to_ne_bytes(),
            );
            EXPR_META
        }
        Typeof::Payload { desc, field } => {
            tlv(&mut data, UDATA_TYPEOF_PAYLOAD_DESC, &desc.to_ne_bytes());
            tlv(&mut data, UDATA_TYPEOF_PAYLOAD_TYPE, &field.to_ne_bytes());
            EXPR_PAYLOAD
        }
    };
    let mut typeof_attr = Vec::new();
    tlv(
        &mut typeof_attr,
        UDATA_SET_TYPEOF_EXPR,
        &expr_type.to_ne_bytes(),
    );
    tlv(&mut typeof_attr, UDATA_SET_TYPEOF_DATA, &data);

    let mut out = Vec::new();
    tlv(&mut out, UDATA_SET_KEYBYTEORDER, &byteorder.to_ne_bytes());
    if merge {
        tlv(&mut out, UDATA_SET_MERGE_ELEMENTS, &1u32.to_ne_bytes());
    }
    tlv(&mut out, UDATA_SET_KEY_TYPEOF, &typeof_attr);
    out
}

// ---------------------------------------------------------------------------
// Encoding: expressions and sets -> netlink attributes
// ---------------------------------------------------------------------------

fn push_expr<P: Pusher>(list: PushExprListAttrs<P>, e: &Expr) -> PushExprListAttrs<P> {
    let reg1 = Registers::Reg1 as u32;
    match e {
        Expr::Meta(key) => list
            .nested_elem()
            .nested_data_meta()
            .push_key(*key as u32)
            .push_dreg(reg1)
            .end_nested()
            .end_nested(),
        Expr::Payload { base, offset, len } => list
            .nested_elem()
            .nested_data_payload()
            .push_dreg(reg1)
            .push_base(*base as u32)
            .push_offset(*offset)
            .push_len(*len)
            .end_nested()
            .end_nested(),
        Expr::Bitwise { mask } => list
            .nested_elem()
            .nested_data_bitwise()
            .push_sreg(reg1)
            .push_dreg(reg1)
            .push_op(nft::BitwiseOps::MaskXor as u32)
            .push_len(mask.len() as u32)
            .nested_mask()
            .push_value(mask)
            .end_nested()
            .nested_xor()
            .push_value(&vec![0; mask.len()])
            .end_nested()
            .end_nested()
            .end_nested(),
        Expr::Cmp { op, data } => list
            .nested_elem()
            .nested_data_cmp()
            .push_sreg(reg1)
            .push_op(*op as u32)
            .nested_data()
            .push_value(data)
            .end_nested()
            .end_nested()
            .end_nested(),
        Expr::Lookup { set_id, inverted } => {
            // Written by hand: netlink-bindings 0.3.5 numbers the lookup
            // attributes in the wrong order (its spec lists set-id second,
            // the kernel has SET=1, SREG=2, DREG=3, SET_ID=4, FLAGS=5).
            let mut elem = list.nested_elem().push_name(c"lookup");
            let buf = elem.as_vec_mut();
            let data = push_nested_header(buf, NFTA_EXPR_DATA);
            let name = ANON_SET_NAME.to_bytes_with_nul();
            push_header(buf, NFTA_LOOKUP_SET, name.len() as u16);
            buf.extend_from_slice(name);
            push_u32_be(buf, NFTA_LOOKUP_SREG, reg1);
            push_u32_be(buf, NFTA_LOOKUP_SET_ID, *set_id);
            if *inverted {
                push_u32_be(buf, NFTA_LOOKUP_FLAGS, nft::LookupFlags::Invert as u32);
            }
            finalize_nested_header(buf, data);
            elem.end_nested()
        }
        Expr::Port(port) => list
            .nested_elem()
            .nested_data_immediate()
            .push_dreg(reg1)
            .nested_data()
            .push_value(&port.to_be_bytes())
            .end_nested()
            .end_nested()
            .end_nested(),
        Expr::Return => list
            .nested_elem()
            .nested_data_immediate()
            .push_dreg(Registers::RegVerdict as u32)
            .nested_data()
            .nested_verdict()
            .push_code(VerdictCode::Return as u32)
            .end_nested()
            .end_nested()
            .end_nested()
            .end_nested(),
        Expr::Redir => {
            // netlink-bindings 0.3.5 has no "redir" sub-message (its spec
            // lists only some expression types), so the data attribute is
            // written by hand: NFTA_REDIR_REG_PROTO_MIN = reg1 and
            // NFTA_REDIR_FLAGS = NF_NAT_RANGE_PROTO_SPECIFIED, as nft does.
            let mut elem = list.nested_elem().push_name(c"redir");
            let buf = elem.as_vec_mut();
            let data = push_nested_header(buf, NFTA_EXPR_DATA);
            push_u32_be(buf, NFTA_REDIR_REG_PROTO_MIN, reg1);
            push_u32_be(buf, NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
            finalize_nested_header(buf, data);
            elem.end_nested()
        }
    }
}

fn push_u32_be(buf: &mut Vec<u8>, ty: u16, value: u32) {
    push_header(buf, ty, 4);
    buf.extend_from_slice(&value.to_be_bytes());
}

fn encode_set(batch: &mut Batch, set: &AnonSet, what: &str) {
    let fam = inet_header();
    let mut flags = nft::SetFlags::Anonymous as u32 | nft::SetFlags::Constant as u32;
    if set.interval {
        flags |= nft::SetFlags::Interval as u32;
    }
    batch.msg(
        NFT_MSG_NEWSET,
        NLM_F_CREATE,
        format!("add anonymous set for {what}"),
        |b| {
            let mut attrs = nft::OpNewsetDo::encode_request(b, &fam)
                .push_table(TABLE)
                .push_name(ANON_SET_NAME)
                .push_flags(flags)
                .push_key_type(set.key_type)
                .push_key_len(set.key_len);
            // netlink-bindings 0.3.5 writes set ids in host byte order; the
            // kernel reads them big-endian, so they are written by hand.
            push_u32_be(attrs.as_vec_mut(), NFTA_SET_ID, set.id);
            attrs
                .nested_desc()
                .push_size(set.size)
                .end_nested()
                .push_userdata(&set.userdata);
        },
    );

    // One attribute holds at most 64 KiB, so long element lists are split
    // over several messages (nft splits too); the set stays anonymous and
    // constant because all of them are in the same transaction.
    for chunk in set.elems.chunks(ELEMS_PER_MSG) {
        batch.msg(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            format!("add set elements for {what}"),
            |b| {
                let mut attrs = nft::OpNewsetelemDo::encode_request(b, &fam)
                    .push_table(TABLE)
                    .push_set(ANON_SET_NAME);
                push_u32_be(attrs.as_vec_mut(), NFTA_SET_ELEM_LIST_SET_ID, set.id);
                let mut list = attrs.nested_elements();
                for e in chunk {
                    let mut el = list.nested_elem();
                    if e.end {
                        el = el.push_flags(&(nft::SetElemFlags::IntervalEnd as u32).to_be_bytes());
                    }
                    el = el.nested_key().push_value(&e.key).end_nested();
                    if e.open {
                        let mut ud = Vec::new();
                        ud.extend_from_slice(&[UDATA_SET_ELEM_FLAGS, 4]);
                        ud.extend_from_slice(&UDATA_SET_ELEM_F_INTERVAL_OPEN.to_ne_bytes());
                        el = el.push_userdata(&ud);
                    }
                    list = el.end_nested();
                }
                list.end_nested();
            },
        );
    }
}

fn inet_header() -> Nfgenmsg {
    Nfgenmsg {
        nfgen_family: NFPROTO_INET,
        ..Default::default()
    }
}

fn cstring(s: &str) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(s).map_err(|_| format!("name {s:?} contains a NUL byte"))
}

impl Hook {
    fn hooknum(self) -> u32 {
        match self {
            Hook::Prerouting => NF_INET_PRE_ROUTING,
            Hook::Output => NF_INET_LOCAL_OUT,
        }
    }
}

// ---------------------------------------------------------------------------
// Batch transport: one sendmsg, one reply per message
// ---------------------------------------------------------------------------

/// Messages between NFNL_MSG_BATCH_BEGIN and NFNL_MSG_BATCH_END, which the
/// kernel only accepts in a single write. Sequence numbers count from
/// [`FIRST_SEQ`] in every batch: each is sent on a socket of its own, so its
/// replies cannot be confused with another's.
#[derive(Debug)]
struct Batch {
    buf: Vec<u8>,
    /// What each message does, indexed by `seq - FIRST_SEQ`; index 0 is the
    /// batch begin.
    what: Vec<String>,
    /// The first message too large to encode. Attribute lengths are u16 and
    /// netlink-bindings truncates a nested length silently, so any message
    /// over 64 KiB is refused rather than sent corrupt.
    oversized: Option<String>,
}

#[derive(Debug)]
struct KernelError {
    errno: i32,
    what: String,
    extack: Option<String>,
}

#[derive(Debug)]
enum BatchError {
    Io(String),
    Rejected(Vec<KernelError>),
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Io(e) => f.write_str(e),
            BatchError::Rejected(errs) => {
                // The kernel checks the whole batch and reports every failing
                // message; the first few are enough to act on.
                const SHOWN: usize = 3;
                for (i, e) in errs.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    let os = io::Error::from_raw_os_error(e.errno);
                    write!(f, "kernel rejected \"{}\": {os}", e.what)?;
                    if let Some(x) = &e.extack {
                        write!(f, " ({x})")?;
                    }
                }
                if errs.len() > SHOWN {
                    write!(f, "; and {} more", errs.len() - SHOWN)?;
                }
                Ok(())
            }
        }
    }
}

const FIRST_SEQ: u32 = 1;

impl Batch {
    fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            what: Vec::new(),
            oversized: None,
        };
        b.raw_msg(NFNL_MSG_BATCH_BEGIN, "batch begin", batch_header());
        b
    }

    fn next_seq(&self) -> u32 {
        FIRST_SEQ.wrapping_add(self.what.len() as u32)
    }

    /// Appends one nftables message; `body` writes the nfgenmsg and attributes.
    fn msg(
        &mut self,
        ty: u8,
        flags: u16,
        what: impl Into<String>,
        body: impl FnOnce(&mut Vec<u8>),
    ) {
        let start = self.begin(NFNL_SUBSYS_NFTABLES << 8 | u16::from(ty), flags | NLM_F_ACK);
        body(&mut self.buf);
        self.finish(start, what.into());
    }

    fn raw_msg(&mut self, ty: u16, what: &str, header: Nfgenmsg) {
        // No NLM_F_ACK on begin/end: only newer kernels acknowledge them, and
        // waiting for an ack an older kernel never sends would hang.
        let start = self.begin(ty, 0);
        self.buf.extend_from_slice(header.as_slice());
        self.finish(start, what.to_string());
    }

    fn begin(&mut self, ty: u16, flags: u16) -> usize {
        let start = self.buf.len();
        let seq = self.next_seq();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf
            .extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel
        start
    }

    fn finish(&mut self, start: usize, what: String) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        let len = (self.buf.len() - start) as u32;
        if len > u32::from(u16::MAX) && self.oversized.is_none() {
            self.oversized = Some(format!(
                "\"{what}\" needs {len} bytes, more than one netlink message can hold"
            ));
        }
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.what.push(what);
    }

    /// Ends the batch; refuses one with a message too large to encode.
    fn seal(mut self) -> Result<Batch, String> {
        self.raw_msg(NFNL_MSG_BATCH_END, "batch end", batch_header());
        match self.oversized.take() {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }

    /// Sends a sealed batch and waits for every reply.
    fn send(&self) -> Result<(), BatchError> {
        let sock = NlSocket::open(self.buf.len(), self.what.len())
            .map_err(|e| BatchError::Io(format!("netlink socket: {e}")))?;
        let result = self.exchange(&sock);
        sock.close_in_background();
        result
    }

    fn exchange(&self, sock: &NlSocket) -> Result<(), BatchError> {
        let count = self.what.len();
        sock.send(&self.buf)
            .map_err(|e| BatchError::Io(format!("sending batch: {e}")))?;

        // Every message but begin/end asked for an ack, so each gets exactly
        // one reply: an ack (error 0) or its error. The kernel processes the
        // batch inside sendmsg, so all replies are already queued.
        let mut pending: HashSet<usize> = (1..count - 1).collect();
        let mut errors = Vec::new();
        let mut rbuf = vec![0u8; RECV_BUF];
        while !pending.is_empty() {
            let n = sock.recv(&mut rbuf).map_err(|e| {
                BatchError::Io(format!(
                    "waiting for {} replies from nftables: {e}",
                    pending.len()
                ))
            })?;
            for reply in parse_replies(&rbuf[..n]).map_err(BatchError::Io)? {
                let index = reply.seq.wrapping_sub(FIRST_SEQ) as usize;
                if index >= count {
                    continue; // not ours
                }
                let batch_framing = index == 0 || index == count - 1;
                if reply.errno != 0 {
                    errors.push(KernelError {
                        errno: reply.errno,
                        what: self.what[index].clone(),
                        extack: reply.extack,
                    });
                    // An error on begin/end (e.g. EPERM without CAP_NET_ADMIN)
                    // means nothing else was processed and no more replies come.
                    if batch_framing {
                        pending.clear();
                    }
                }
                pending.remove(&index);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Rejected(errors))
        }
    }
}

fn batch_header() -> Nfgenmsg {
    let mut h = Nfgenmsg::default();
    h.set_res_id(NFNL_SUBSYS_NFTABLES);
    h
}

struct Reply {
    seq: u32,
    errno: i32,
    extack: Option<String>,
}

/// Extracts NLMSG_ERROR replies (acks are errors with code 0) from one
/// datagram, with the kernel's extended-ack message or offset if present.
fn parse_replies(mut data: &[u8]) -> Result<Vec<Reply>, String> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = read_u32(data, 0) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(format!(
                "malformed netlink reply (length {len} of {})",
                data.len()
            ));
        }
        let msg = &data[..len];
        let ty = read_u16(msg, 4);
        let flags = read_u16(msg, 6);
        let seq = read_u32(msg, 8);
        if ty == NLMSG_ERROR {
            if msg.len() < NLMSG_HDRLEN + 4 + NLMSG_HDRLEN {
                return Err("truncated netlink error reply".into());
            }
            let errno = (read_u32(msg, NLMSG_HDRLEN) as i32).wrapping_neg();
            let mut extack = None;
            if flags & NLM_F_ACK_TLVS != 0 {
                // TLVs follow the echoed request: only its header when
                // NLM_F_CAPPED, else the whole original message.
                let echoed = if flags & NLM_F_CAPPED != 0 {
                    NLMSG_HDRLEN
                } else {
                    read_u32(msg, NLMSG_HDRLEN + 4) as usize
                };
                let tlv_start = (NLMSG_HDRLEN + 4 + echoed).next_multiple_of(4);
                extack = parse_extack(msg.get(tlv_start..).unwrap_or(&[]));
            }
            out.push(Reply { seq, errno, extack });
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    Ok(out)
}

fn parse_extack(mut tlvs: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    while tlvs.len() >= 4 {
        let len = read_u16(tlvs, 0) as usize;
        let ty = read_u16(tlvs, 2);
        if len < 4 || len > tlvs.len() {
            break;
        }
        let value = &tlvs[4..len];
        match ty {
            NLMSGERR_ATTR_MSG => {
                let text = value.split(|&b| b == 0).next().unwrap_or(&[]);
                parts.push(String::from_utf8_lossy(text).into_owned());
            }
            NLMSGERR_ATTR_OFFS if value.len() >= 4 => {
                parts.push(format!("at byte {} of the message", read_u32(value, 0)));
            }
            _ => {}
        }
        tlvs = &tlvs[len.next_multiple_of(4).min(tlvs.len())..];
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(", "))
    }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

struct NlSocket {
    fd: OwnedFd,
}

impl NlSocket {
    /// Opens a NETLINK_NETFILTER socket in the calling thread's network
    /// namespace, sized for a batch of `len` bytes answered by `replies` acks.
    fn open(len: usize, replies: usize) -> io::Result<NlSocket> {
        // SAFETY: plain socket(2) call; the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let sock = NlSocket {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };

        // Extended acks name the failing attribute; capped acks keep error
        // replies small (we know the request from its sequence number).
        // Both are optional: older kernels just ignore the error.
        let _ = sock.setsockopt(libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        let _ = sock.setsockopt(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);

        // The kernel refuses a write larger than the send buffer, and all
        // acks are queued before we read any, so both buffers must fit the
        // whole batch. Each queued ack costs roughly 1 KiB of receive buffer.
        // The *FORCE variants bypass rmem_max/wmem_max (we hold
        // CAP_NET_ADMIN, which nftables needs anyway).
        if len > DEFAULT_SOCK_BUF / 2 {
            sock.set_buf(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, len + 4096);
        }
        let rcv = replies * 1024 + RECV_BUF;
        if rcv > DEFAULT_SOCK_BUF / 2 {
            sock.set_buf(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, rcv);
        }

        // Replies are queued synchronously while the batch is processed;
        // the timeout only guards against a kernel that never answers.
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: passes a valid timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Closing a NETLINK_NETFILTER socket makes the kernel wait for
    /// nf_tables' deferred destruction of deleted objects, i.e. for an RCU
    /// grace period (8-16 ms on this machine after every replace; `nft` pays
    /// it too, when it exits). The transaction is committed and acknowledged
    /// by then, so the close is handed to a background thread instead of
    /// delaying the caller. The queue is small: under a burst of calls the
    /// caller closes inline again, so descriptors cannot pile up.
    fn close_in_background(self) {
        static CLOSER: OnceLock<Option<mpsc::SyncSender<OwnedFd>>> = OnceLock::new();
        let closer = CLOSER.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<OwnedFd>(CLOSE_QUEUE);
            let spawned = std::thread::Builder::new()
                .name("nft-netlink-close".into())
                .spawn(move || rx.into_iter().for_each(drop));
            spawned.ok().map(|_| tx)
        });
        // Queue full, or no closer thread: close here (slower, not wrong).
        if let Some(tx) = closer {
            let _ = tx.try_send(self.fd);
        }
    }

    fn setsockopt(&self, level: i32, name: i32, value: i32) -> io::Result<()> {
        // SAFETY: passes a valid int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const i32).cast(),
                size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn set_buf(&self, force: i32, plain: i32, bytes: usize) {
        let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
        if self.setsockopt(libc::SOL_SOCKET, force, bytes).is_err() {
            // Without CAP_NET_ADMIN: capped at rmem_max/wmem_max, and a
            // too-large batch then fails visibly (EMSGSIZE / ENOBUFS).
            let _ = self.setsockopt(libc::SOL_SOCKET, plain, bytes);
        }
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl is valid; pid 0 addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: buf and addr are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&addr as *const libc::sockaddr_nl).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n as usize != buf.len() {
                return Err(io::Error::other(format!(
                    "short netlink write ({n} of {} bytes)",
                    buf.len()
                )));
            }
            return Ok(());
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // MSG_TRUNC makes netlink return the datagram's real length, so
            // a reply larger than `buf` is detected instead of misparsed.
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
                    }
                    Some(libc::ENOBUFS) => {
                        return Err(io::Error::other(
                            "replies were dropped (ENOBUFS); the batch outcome is unknown",
                        ));
                    }
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::other(format!(
                    "netlink reply of {n} bytes truncated"
                )));
            }
            return Ok(n);
        }
    }
}

// ---------------------------------------------------------------------------
// Constants (linux/netfilter/nf_tables.h, nfnetlink.h, netlink.h, and
// nftables' own userdata / datatype / protocol ids for typeof)
// ---------------------------------------------------------------------------

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u8 = 0;
const NFT_MSG_DELTABLE: u8 = 2;
const NFT_MSG_NEWCHAIN: u8 = 3;
const NFT_MSG_NEWRULE: u8 = 6;
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_NEWSETELEM: u8 = 12;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const NF_ACCEPT: u32 = 1;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;

const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

/// nft names anonymous sets with this template; the kernel fills in the number.
const ANON_SET_NAME: &CStr = c"__set%d";

// nftables datatype ids (NFTA_SET_KEY_TYPE).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IFNAME: u32 = 41;

// libnftnl set / element userdata.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_MERGE_ELEMENTS: u8 = 2;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_TYPEOF_EXPR: u8 = 0;
const UDATA_SET_TYPEOF_DATA: u8 = 1;
const UDATA_TYPEOF_META_KEY: u8 = 0;
const UDATA_TYPEOF_PAYLOAD_DESC: u8 = 0;
const UDATA_TYPEOF_PAYLOAD_TYPE: u8 = 1;
const UDATA_SET_ELEM_FLAGS: u8 = 1;
const UDATA_SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;
const EXPR_PAYLOAD: u32 = 7;
const EXPR_META: u32 = 9;
const PROTO_DESC_TCP: u32 = 8;
const PROTO_DESC_IP: u32 = 12;
const PROTO_DESC_IP6: u32 = 13;
const TCPHDR_DPORT: u32 = 2;
const IPHDR_SADDR: u32 = 11;
const IPHDR_DADDR: u32 = 12;
const IP6HDR_SADDR: u32 = 8;
const IP6HDR_DADDR: u32 = 9;

const ELEMS_PER_MSG: usize = 512;
const RECV_BUF: usize = 64 * 1024;
const DEFAULT_SOCK_BUF: usize = 208 * 1024;
const CLOSE_QUEUE: usize = 4;
const REPLY_TIMEOUT_SECS: libc::time_t = 5;

#[cfg(test)]
mod tests {
    use super::super::ruleset::{render, Chain};
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().expect("test net")).collect()
    }

    #[test]
    fn interval_elements_match_nft() {
        // nft: 0 END, 10.96.0.0, 10.112.0.0 END, 192.168.7.0, 192.168.8.0 END; size 5
        let (e, size) = interval_elems(&nets(&["10.96.0.0/12", "192.168.7.0/24"]), 4);
        let keys: Vec<(Vec<u8>, bool)> = e.iter().map(|e| (e.key.clone(), e.end)).collect();
        assert_eq!(
            keys,
            vec![
                (vec![0, 0, 0, 0], true),
                (vec![10, 96, 0, 0], false),
                (vec![10, 112, 0, 0], true),
                (vec![192, 168, 7, 0], false),
                (vec![192, 168, 8, 0], true),
            ]
        );
        assert_eq!(size, 5);

        // Adjacent and contained ranges merge; a range at the top is open.
        let (e, size) = interval_elems(
            &nets(&[
                "255.255.255.0/24",
                "10.0.0.0/24",
                "10.0.1.0/24",
                "10.0.0.0/25",
            ]),
            4,
        );
        assert_eq!(e.len(), 4);
        assert!(e[3].open && !e[3].end);
        assert_eq!(size, 5);

        // Starting at 0: no leading END element.
        let (e, size) = interval_elems(&nets(&["0.0.0.0/8", "10.0.0.0/8", "10.1.0.0/16"]), 4);
        assert_eq!(e.len(), 4);
        assert_eq!(size, 4);
    }

    #[test]
    fn render_matches_spec_format() {
        let t = Table {
            chains: vec![Chain {
                name: "prerouting",
                hook: Hook::Prerouting,
                priority: -100,
                rules: vec![
                    Rule {
                        matches: vec![
                            Match::Addr {
                                dir: AddrDir::Src,
                                negated: false,
                                nets: nets(&["169.254.7.127/32"]),
                            },
                            Match::DPort(vec![8080]),
                        ],
                        verdict: Verdict::Return,
                    },
                    Rule {
                        matches: vec![Match::Tcp],
                        verdict: Verdict::Redirect(15006),
                    },
                ],
            }],
        };
        assert_eq!(
            render(&t),
            "table inet weft {\n\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tip saddr 169.254.7.127 tcp dport { 8080 } return\n\t\tmeta l4proto tcp redirect to :15006\n\t}\n}\n"
        );
    }
}
