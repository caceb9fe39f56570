//! weft's eBPF programs. Attached at the root of the cgroup v2 hierarchy; they act only on sockets whose
//! network namespace the agent enrolled in `WEFT_POLICIES`, so the rest of the node is untouched.
//!
//! - `weft_connect4` / `weft_connect6` (cgroup/connect4, connect6): redirect a captured pod's outbound TCP
//!   connect to its outbound listener (127.0.0.1 / ::1 : 15001), remembering the original destination by
//!   socket cookie. The proxy's own sockets carry the proxy mark and are left alone.
//! - `weft_sockops` (sock_ops): when that connection is established, re-key the original destination by the
//!   app socket's address (what the proxy sees as the peer), and put loopback sockets of captured pods into
//!   the sockhash for the fast path.
//! - `weft_getsockopt` (cgroup/getsockopt): answer `SO_ORIGINAL_DST` on the proxy's accepted socket from that
//!   map, so the proxy reads the original destination the same way for every capture backend.
//! - `weft_sk_msg` (sk_msg on the sockhash): move payload straight to the peer socket's receive queue.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{sk_action, BPF_F_INGRESS};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_msg, sock_ops};
use aya_ebpf::maps::{HashMap, LruHashMap, SockHash};
use aya_ebpf::programs::{SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext};
use aya_ebpf::EbpfContext;
use core::ptr::read_volatile;
use aya_log_ebpf::debug;
use weft_ebpf_common::{
    is_loopback, mapped_v4, OrigDst, PeerKey, PodPolicy, SockKey, MAX_CONNECTIONS, MAX_PODS, POLICY_SOCKMAP, PROXY_MARK, PROXY_MARK_MASK,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const SO_ORIGINAL_DST: i32 = 80;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
/// Connection-scoped entries: LRU, so a connection that never completes cannot fill the map.
const CONNECTIONS: u32 = MAX_CONNECTIONS;

#[map(name = "WEFT_POLICIES")]
static POLICIES: HashMap<u64, PodPolicy> = HashMap::pinned(MAX_PODS, 0);
#[map(name = "WEFT_ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(CONNECTIONS, 0);
#[map(name = "WEFT_ORIG_BY_PEER")]
static ORIG_BY_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::pinned(CONNECTIONS, 0);
#[map(name = "WEFT_SOCKS")]
static SOCKS: SockHash<SockKey> = SockHash::pinned(CONNECTIONS, 0);

// ---- connect: redirect to the outbound listener ----

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    redirect_connect(&ctx, false);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    redirect_connect(&ctx, true);
    1
}

#[inline(always)]
fn redirect_connect(ctx: &SockAddrContext, v6: bool) {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: map values are plain data.
    let Some(policy) = (unsafe { POLICIES.get(&netns) }) else { return };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() || unsafe { (*sk).mark } & PROXY_MARK_MASK == PROXY_MARK {
        return;
    }
    let (ip, family) = if v6 { (sa.user_ip6, AF_INET6) } else { (mapped_v4(sa.user_ip4), AF_INET) };
    let port = u16::from_be(sa.user_port as u16) as u32;
    if is_loopback(&ip) || excluded(policy, &ip, port) {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst { ip, port, family };
    if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        // Fail closed: without the original destination the proxy could not serve the connection, and
        // leaving it alone would let it bypass the proxy. Pointing it at a closed port refuses it.
        sa.user_port = 0;
        return;
    }
    let listener = (policy.outbound_port as u16).to_be() as u32;
    if v6 && !weft_ebpf_common::is_mapped_v4(&ip) {
        sa.user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    } else if v6 {
        sa.user_ip6 = mapped_v4(u32::from_ne_bytes([127, 0, 0, 1]));
    } else {
        sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    }
    sa.user_port = listener;
    debug!(ctx, "weft: redirected connect to port {} (cookie {})", port, cookie);
}

#[inline(always)]
fn excluded(policy: &PodPolicy, ip: &[u32; 4], port: u32) -> bool {
    let mut i = 0;
    while i < weft_ebpf_common::MAX_EXCLUDED_PORTS {
        if (i as u32) < policy.n_excluded_ports && policy.excluded_ports[i] == port {
            return true;
        }
        i += 1;
    }
    let mut i = 0;
    while i < weft_ebpf_common::MAX_EXCLUDED_CIDRS {
        if (i as u32) < policy.n_excluded_cidrs && policy.excluded_cidrs[i].contains(ip) {
            return true;
        }
        i += 1;
    }
    false
}

// ---- sock_ops: original destination by peer address, sockhash ----

#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(policy) = (unsafe { POLICIES.get(&netns) }) else { return 0 };
    // SAFETY: valid bpf_sock_ops for the program's lifetime.
    let ops = unsafe { &*ctx.ops };
    let Some(key) = sock_key(netns, Addrs::read(ops)) else { return 0 };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
            let peer = PeerKey { netns, ip: key.local_ip, port: key.local_port, _pad: 0 };
            let _ = ORIG_BY_PEER.insert(&peer, orig, 0);
            let _ = ORIG_BY_COOKIE.remove(&cookie);
        }
    }
    if policy.flags & POLICY_SOCKMAP != 0 && (is_loopback(&key.local_ip) || is_loopback(&key.remote_ip)) {
        let mut key = key;
        // SAFETY: the sock_ops context is the socket being inserted.
        let _ = SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0);
    }
    0
}

/// Ports as the kernel hands them: local in host order, remote in network order in the upper half.
#[inline(always)]
fn remote_port_host(raw: u32) -> u32 {
    let be = if raw & 0xffff == 0 { (raw >> 16) as u16 } else { raw as u16 };
    u16::from_be(be) as u32
}

/// The address fields sock_ops and sk_msg contexts share. Context pointers only allow loads at constant
/// offsets, so every field is read on its own, volatile and unconditionally (see `answer_original_dst`).
struct Addrs {
    family: u32,
    local4: u32,
    remote4: u32,
    local6: [u32; 4],
    remote6: [u32; 4],
    local_port: u32,
    remote_port: u32,
}

macro_rules! read_addrs {
    ($ctx:expr) => {
        // SAFETY: `$ctx` is the context the kernel passed, valid for the program's lifetime.
        unsafe {
            Addrs {
                family: read_volatile(&$ctx.family),
                local4: read_volatile(&$ctx.local_ip4),
                remote4: read_volatile(&$ctx.remote_ip4),
                local6: [
                    read_volatile(&$ctx.local_ip6[0]),
                    read_volatile(&$ctx.local_ip6[1]),
                    read_volatile(&$ctx.local_ip6[2]),
                    read_volatile(&$ctx.local_ip6[3]),
                ],
                remote6: [
                    read_volatile(&$ctx.remote_ip6[0]),
                    read_volatile(&$ctx.remote_ip6[1]),
                    read_volatile(&$ctx.remote_ip6[2]),
                    read_volatile(&$ctx.remote_ip6[3]),
                ],
                local_port: read_volatile(&$ctx.local_port),
                remote_port: read_volatile(&$ctx.remote_port),
            }
        }
    };
}

trait ReadAddrs {
    fn read_addrs(&self) -> Addrs;
}

impl ReadAddrs for aya_ebpf::bindings::bpf_sock_ops {
    #[inline(always)]
    fn read_addrs(&self) -> Addrs {
        read_addrs!(self)
    }
}

impl ReadAddrs for aya_ebpf::bindings::sk_msg_md {
    #[inline(always)]
    fn read_addrs(&self) -> Addrs {
        read_addrs!(self)
    }
}

impl Addrs {
    #[inline(always)]
    fn read(ctx: &impl ReadAddrs) -> Addrs {
        ctx.read_addrs()
    }
}

#[inline(always)]
fn sock_key(netns: u64, a: Addrs) -> Option<SockKey> {
    let (local_ip, remote_ip) = match a.family {
        AF_INET => (mapped_v4(a.local4), mapped_v4(a.remote4)),
        AF_INET6 => (a.local6, a.remote6),
        _ => return None,
    };
    Some(SockKey { netns, local_ip, remote_ip, local_port: a.local_port, remote_port: remote_port_host(a.remote_port) })
}

// ---- sk_msg: app ⇄ proxy without the loopback TCP stack ----

#[sk_msg]
pub fn weft_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: valid sk_msg_md for the program's lifetime.
    let md = unsafe { &*ctx.msg };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(key) = sock_key(netns, Addrs::read(md)) {
        let mut peer = key.peer();
        // Where the peer is not in the map the redirect fails and the data takes the normal path.
        let _ = SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64);
    }
    sk_action::SK_PASS
}

// ---- getsockopt: SO_ORIGINAL_DST for the proxy ----

#[cgroup_sockopt(getsockopt)]
pub fn weft_getsockopt(ctx: SockoptContext) -> i32 {
    answer_original_dst(&ctx);
    1
}

#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext) {
    // SAFETY: valid bpf_sockopt for the program's lifetime.
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return;
    }
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Socket pointers only allow loads at a constant offset from the pointer itself (no pointer arithmetic),
    // so all address fields are read unconditionally (a branch per family lets LLVM merge the two loads into
    // one with a computed offset) and volatile (no array copies through a temporary).
    // SAFETY: reading fields of the socket the kernel passed.
    let (family, dst_port, dst4, dst6) = unsafe {
        (
            read_volatile(&(*sk).family),
            read_volatile(&(*sk).dst_port),
            read_volatile(&(*sk).dst_ip4),
            [
                read_volatile(&(*sk).dst_ip6[0]),
                read_volatile(&(*sk).dst_ip6[1]),
                read_volatile(&(*sk).dst_ip6[2]),
                read_volatile(&(*sk).dst_ip6[3]),
            ],
        )
    };
    let ip = if family == AF_INET { mapped_v4(dst4) } else { dst6 };
    let peer = PeerKey { netns, ip, port: u16::from_be(dst_port) as u32, _pad: 0 };
    let Some(orig) = (unsafe { ORIG_BY_PEER.get(&peer) }) else { return };
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    let port = (orig.port as u16).to_be_bytes();
    if so.level == SOL_IP {
        // struct sockaddr_in: family, port (network order), address, 8 bytes of zero.
        if unsafe { optval.add(16) } > optval_end {
            return;
        }
        let mut out = [0u8; 16];
        out[0..2].copy_from_slice(&(AF_INET as u16).to_ne_bytes());
        out[2..4].copy_from_slice(&port);
        out[4..8].copy_from_slice(&orig.ip[3].to_ne_bytes());
        unsafe { core::ptr::copy_nonoverlapping(out.as_ptr(), optval, 16) };
        so.optlen = 16;
    } else {
        // struct sockaddr_in6: family, port, flowinfo, address, scope id.
        if unsafe { optval.add(28) } > optval_end {
            return;
        }
        let mut out = [0u8; 28];
        out[0..2].copy_from_slice(&(AF_INET6 as u16).to_ne_bytes());
        out[2..4].copy_from_slice(&port);
        let mut i = 0;
        while i < 4 {
            out[8 + i * 4..12 + i * 4].copy_from_slice(&orig.ip[i].to_ne_bytes());
            i += 1;
        }
        unsafe { core::ptr::copy_nonoverlapping(out.as_ptr(), optval, 28) };
        so.optlen = 28;
    }
    so.retval = 0;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
