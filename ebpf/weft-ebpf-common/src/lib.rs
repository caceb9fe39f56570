//! Map key/value types shared by the eBPF programs (`ebpf/weft-ebpf`) and `weft-agent`.
//!
//! `no_std` and `repr(C)` so both sides agree byte for byte. Addresses are kept as the kernel stores them
//! (network byte order, read as native `u32` words); IPv4 addresses are widened to IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`) so one key type serves IPv4, IPv6 and IPv4-mapped sockets. Ports are host byte order.
#![no_std]

/// The socket mark the node proxy sets on every socket it dials from a pod's network namespace, so that
/// capture (iptables, nftables or eBPF) lets the proxy's own traffic through. Same value as Istio's 1337.
pub const PROXY_MARK: u32 = 0x539;
/// Mask applied to the socket mark before comparing it with [`PROXY_MARK`].
pub const PROXY_MARK_MASK: u32 = 0xfff;

/// Version of the pinned maps and links below. Bump it whenever a map's layout or a program's contract
/// changes: an upgraded agent then attaches its programs beside the old pins and removes the old version.
pub const PIN_VERSION: u32 = 1;

/// Names of the pinned maps (the `#[map]` statics in the programs).
pub const MAP_POLICIES: &str = "WEFT_POLICIES";
pub const MAP_ORIG_BY_COOKIE: &str = "WEFT_ORIG_BY_COOKIE";
pub const MAP_ORIG_BY_PEER: &str = "WEFT_ORIG_BY_PEER";
pub const MAP_SOCKS: &str = "WEFT_SOCKS";

/// Capacities of the maps: pods enrolled, and connection-scoped entries (original destinations, sockets).
pub const MAX_PODS: u32 = 16384;
pub const MAX_CONNECTIONS: u32 = 65536;

/// How many port and CIDR exclusions one pod can carry.
pub const MAX_EXCLUDED_PORTS: usize = 8;
pub const MAX_EXCLUDED_CIDRS: usize = 8;

/// `PodPolicy::flags`: put this pod's loopback sockets in the sockhash (app ⇄ proxy fast path).
pub const POLICY_SOCKMAP: u32 = 1;

/// An IPv4 or IPv6 network: address and mask as 4 native words of network-order bytes (IPv4 mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

impl Cidr {
    #[inline(always)]
    pub fn contains(&self, ip: &[u32; 4]) -> bool {
        (ip[0] & self.mask[0]) == self.addr[0]
            && (ip[1] & self.mask[1]) == self.addr[1]
            && (ip[2] & self.mask[2]) == self.addr[2]
            && (ip[3] & self.mask[3]) == self.addr[3]
    }
}

/// What the agent enrols for a captured pod, keyed by the pod's network namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    /// The pod's outbound listener port (15001), host byte order.
    pub outbound_port: u32,
    /// `POLICY_*` bits.
    pub flags: u32,
    pub n_excluded_ports: u32,
    pub n_excluded_cidrs: u32,
    /// Destination ports never redirected (host byte order).
    pub excluded_ports: [u32; MAX_EXCLUDED_PORTS],
    /// Destination networks never redirected.
    pub excluded_cidrs: [Cidr; MAX_EXCLUDED_CIDRS],
}

/// Where a redirected connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u32,
    /// `AF_INET` (2) or `AF_INET6` (10): the family the application used.
    pub family: u32,
}

/// One end of a connection inside a pod: the key of the original destination by the app socket's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    pub netns: u64,
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u32,
    pub _pad: u32,
}

/// A socket in the sockhash: its own address first, then its peer's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key of the socket at the other end of the same connection.
    #[inline(always)]
    pub fn peer(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// An IPv4 address (network-order word) as an IPv4-mapped IPv6 address.
#[inline(always)]
pub fn mapped_v4(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4]
}

/// Whether `ip` is an IPv4-mapped address.
#[inline(always)]
pub fn is_mapped_v4(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Whether `ip` (mapped form) is loopback: 127.0.0.0/8 or ::1.
#[inline(always)]
pub fn is_loopback(ip: &[u32; 4]) -> bool {
    (is_mapped_v4(ip) && ip[3].to_ne_bytes()[0] == 127)
        || (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_ne_bytes([0, 0, 0, 1]))
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain repr(C) data without padding holes that could leak or references.
    unsafe impl aya::Pod for super::PodPolicy {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::SockKey {}
}
