//! Map key/value types shared by the eBPF programs and `weft-agent`.
//!
//! `no_std` so the programs (built for `bpfel-unknown-none`) can use it. Empty until the eBPF redirect mode
//! (issue 4) adds its maps; the crate exists now so the workspace layout is the final one.
#![no_std]

/// The socket mark the node proxy sets on every socket it dials from a pod's network namespace, so that
/// capture (iptables, nftables or eBPF) lets the proxy's own traffic through. Same value as Istio's 1337.
pub const PROXY_MARK: u32 = 0x539;
/// Mask applied to the socket mark before comparing it with [`PROXY_MARK`].
pub const PROXY_MARK_MASK: u32 = 0xfff;
