//! Programs weft's nftables table (`inet weft`, see [`super::ruleset`]) over netlink: no `nft` process and no C
//! library. [`install`] sends what nft 1.0.6 itself sends for the table's text (same expressions, anonymous sets,
//! element encoding and set userdata), so the kernel holds the same objects whichever way the table was installed
//! (a root test compares both against the real `nft`).
//!
//! Attribute layouts come from the `netlink-bindings` crate (generated from
//! the kernel's nftables YAML spec). Three spots of its 0.3.5 nftables
//! bindings are wrong or missing and are written by hand here: the `lookup`
//! attribute numbers, the byte order of set ids, and the `redir` expression.
//! Batches go over [`super::super::nfnetlink`].

use std::ffi::CStr;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_bindings::nftables::{
    self as nft, CmpOps, MetaKeys, Nfgenmsg, PayloadBase, PushExprListAttrs, Registers, VerdictCode,
};
use netlink_bindings::traits::Pusher;

use super::super::nfnetlink::{nest, put, put_u32, Batch, BatchError, NLM_F_APPEND, NLM_F_CREATE};
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
            nest(elem.as_vec_mut(), NFTA_EXPR_DATA, |buf| {
                put(buf, NFTA_LOOKUP_SET, ANON_SET_NAME.to_bytes_with_nul());
                put_u32(buf, NFTA_LOOKUP_SREG, reg1);
                put_u32(buf, NFTA_LOOKUP_SET_ID, *set_id);
                if *inverted {
                    put_u32(buf, NFTA_LOOKUP_FLAGS, nft::LookupFlags::Invert as u32);
                }
            });
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
            nest(elem.as_vec_mut(), NFTA_EXPR_DATA, |buf| {
                put_u32(buf, NFTA_REDIR_REG_PROTO_MIN, reg1);
                put_u32(buf, NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
            });
            elem.end_nested()
        }
    }
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
            put_u32(attrs.as_vec_mut(), NFTA_SET_ID, set.id);
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
                put_u32(attrs.as_vec_mut(), NFTA_SET_ELEM_LIST_SET_ID, set.id);
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
// Constants (linux/netfilter/nf_tables.h, nfnetlink.h, netlink.h, and
// nftables' own userdata / datatype / protocol ids for typeof)
// ---------------------------------------------------------------------------

const NFT_MSG_NEWTABLE: u8 = 0;
const NFT_MSG_DELTABLE: u8 = 2;
const NFT_MSG_NEWCHAIN: u8 = 3;
const NFT_MSG_NEWRULE: u8 = 6;
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_NEWSETELEM: u8 = 12;


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
