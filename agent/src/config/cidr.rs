//! `envoy.config.core.v3.CidrRange`: address ranges of filter chain matches and of internal addresses.

use std::net::IpAddr;

use super::tree::{ConfigError, Obj, Result};

/// `envoy.config.core.v3.CidrRange`, normalised (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct CidrRange {
    pub prefix: IpAddr,
    pub len: u8,
}

impl CidrRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.prefix, canonical(ip)) {
            (IpAddr::V4(p), IpAddr::V4(a)) => mask(u32::from(p).into(), u32::from(a).into(), self.len, 32),
            (IpAddr::V6(p), IpAddr::V6(a)) => mask(u128::from(p), u128::from(a), self.len, 128),
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's view of IPv4 peers) match IPv4 ranges.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn mask(prefix: u128, addr: u128, len: u8, bits: u8) -> bool {
    let shift = u32::from(bits.saturating_sub(len));
    len == 0 || prefix.checked_shr(shift) == addr.checked_shr(shift)
}

pub fn cidr_range(mut c: Obj<'_>) -> Result<CidrRange> {
    let text = c.required_string("address_prefix")?;
    let ip: IpAddr = text.parse().map_err(|_| ConfigError::new(c.at("address_prefix"), format!("{text:?} is not an IP address")))?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let len = c.u64("prefix_len")?.unwrap_or(0);
    let len = u8::try_from(len).ok().filter(|l| *l <= bits).ok_or_else(|| ConfigError::new(c.at("prefix_len"), format!("{len} is longer than the address ({bits} bits)")))?;
    c.finish()?;
    // Clear the host bits so equal ranges compare equal.
    let prefix = match ip {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & u32::MAX.checked_shl(u32::from(32 - len)).unwrap_or(0)).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & u128::MAX.checked_shl(u32::from(128 - len)).unwrap_or(0)).into()),
    };
    Ok(CidrRange { prefix, len })
}

