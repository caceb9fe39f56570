//! The tcp_proxy filter: one downstream connection, one upstream connection, bytes copied both ways. A FIN from
//! either side is passed on as a FIN (half-close) and the other direction keeps flowing until it ends too.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::listener::ListenerContext;
use super::cluster;

/// Per-direction copy buffer. tokio's default (8 KiB) caps a bulk transfer at a fraction of what loopback
/// and veth carry; 64 KiB matches the socket's typical read size.
const BUFFER: usize = 64 * 1024;

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv4.h, netfilter_ipv6/ip6_tables.h).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Where the redirected connection was going before capture rewrote it.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    match stream.local_addr()? {
        SocketAddr::V4(_) => {
            // SAFETY: getsockopt fills at most `len` bytes of a sockaddr_in we own.
            let mut addr: libc::sockaddr_in = unsafe { zeroed() };
            getsockopt(fd, libc::SOL_IP, &mut addr)?;
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)).into())
        }
        SocketAddr::V6(_) => {
            // SAFETY: as above, for sockaddr_in6.
            let mut addr: libc::sockaddr_in6 = unsafe { zeroed() };
            getsockopt(fd, libc::SOL_IPV6, &mut addr)?;
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Ok(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0).into())
        }
    }
}

fn getsockopt<T>(fd: i32, level: libc::c_int, out: &mut T) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `out` is a valid, writable T of `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, level, SO_ORIGINAL_DST, (out as *mut T).cast(), &mut len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies both ways until both directions have ended (a FIN is passed on as a FIN). Returns the bytes
/// copied from downstream and to downstream.
pub async fn relay<D>(mut downstream: D, mut upstream: TcpStream) -> io::Result<(u64, u64)>
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, BUFFER, BUFFER).await
}

/// Without a control plane: proxies one accepted connection to its original destination until both
/// directions have ended. Returns the bytes copied from and to downstream.
pub async fn passthrough(downstream: TcpStream, peer: SocketAddr, original_dst: io::Result<SocketAddr>, ctx: &ListenerContext) -> (u64, u64) {
    let stats = &ctx.stats;
    let _ = downstream.set_nodelay(true);
    let dst = match original_dst {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(pod = %ctx.pod, %peer, "no original destination: {e}");
            return (0, 0);
        }
    };
    let upstream = match cluster::connect_original_dst(&ctx.netns, dst, ctx.direction, &ctx.settings).await {
        Ok(upstream) => upstream,
        Err(e) => {
            stats.upstream_connect_failed();
            tracing::debug!(pod = %ctx.pod, %peer, %dst, "upstream connect failed: {e}");
            return (0, 0);
        }
    };
    relay(downstream, upstream).await.unwrap_or_else(|e| {
        tracing::debug!(pod = %ctx.pod, %peer, %dst, "connection ended with error: {e}");
        (0, 0)
    })
}
