//! How the proxy makes upstream sockets, behind one factory: from the agent's own network namespace (the
//! standalone proxy) or from inside a captured pod's namespace with the capture-bypass mark, so the pod IP
//! stays the source address and the pod's own rules do not capture the proxy's connection again. Also the
//! original destination of an accepted connection, which capture rewrote.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::capture::netns::Netns;
use crate::capture::PROXY_MARK;

/// Where upstream connections are made from.
#[derive(Clone)]
pub enum SocketFactory {
    /// The agent's own network namespace, unmarked.
    Host,
    /// Inside the pod's network namespace, with the bypass mark.
    Pod(Netns),
}

impl SocketFactory {
    /// Connects to `dst` from `source` (any when `None`) within `timeout`.
    pub async fn connect(&self, dst: SocketAddr, source: Option<SocketAddr>, timeout: Duration) -> io::Result<TcpStream> {
        let socket = match self {
            SocketFactory::Pod(ns) => ns.with(|| upstream_socket(dst, source, true))??,
            SocketFactory::Host => upstream_socket(dst, source, false)?,
        };
        let socket = TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(timeout, socket.connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out"))),
        }
    }
}

fn upstream_socket(dst: SocketAddr, source: Option<SocketAddr>, mark: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    if mark {
        socket.set_mark(PROXY_MARK)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if let Some(source) = source {
        // ::6 (Istio's inbound passthrough source) is not assigned to lo the way all of 127/8 is.
        match source.ip() {
            IpAddr::V4(_) => socket.set_freebind(true)?,
            IpAddr::V6(_) => socket.set_freebind_ipv6(true)?,
        }
        socket.bind(&SockAddr::from(source))?;
    }
    Ok(socket)
}

/// Where the redirected connection was going before capture rewrote it (`SO_ORIGINAL_DST`, answered by
/// netfilter's conntrack or, in eBPF mode, by weft's getsockopt program).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => socket.original_dst()?,
        SocketAddr::V6(_) => socket.original_dst_ipv6()?,
    };
    addr.as_socket().ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}
