//! Upstream connections. Today the ORIGINAL_DST cluster: connect to where the application meant to go, from a
//! socket in the pod's own network namespace (so the pod IP stays the source address) carrying the bypass mark.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::{Direction, ProxySettings};
use crate::capture::netns::Netns;
use crate::capture::{INBOUND_PASSTHROUGH_V4, INBOUND_PASSTHROUGH_V6, PROXY_MARK};

/// Connects to `dst` from inside `ns`. Inbound connections go to the local app from Istio's passthrough
/// address, which the capture rules let through without redirecting them again.
pub async fn connect_original_dst(
    ns: &Netns,
    dst: SocketAddr,
    direction: Direction,
    settings: &ProxySettings,
) -> io::Result<TcpStream> {
    let socket = ns.with(|| upstream_socket(dst, direction))??;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(settings.connect_timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out"))),
    }
}

fn upstream_socket(dst: SocketAddr, direction: Direction) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if direction == Direction::Inbound {
        let source = match dst.ip() {
            IpAddr::V4(_) => SocketAddr::new(INBOUND_PASSTHROUGH_V4.into(), 0),
            IpAddr::V6(_) => {
                // ::6 is not assigned to lo the way all of 127/8 is; freebind lets us use it anyway.
                socket.set_freebind_ipv6(true)?;
                SocketAddr::new(INBOUND_PASSTHROUGH_V6.into(), 0)
            }
        };
        socket.bind(&SockAddr::from(source))?;
    }
    Ok(socket)
}
