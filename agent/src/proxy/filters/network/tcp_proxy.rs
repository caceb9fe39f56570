//! The tcp_proxy filter: one downstream connection, one upstream connection, bytes copied both ways. A FIN from
//! either side is passed on as a FIN (half-close) and the other direction keeps flowing until it ends too.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

use super::super::super::upstream::{ConnectError, Upstream};

/// Per-direction copy buffer. tokio's default (8 KiB) caps a bulk transfer at a fraction of what loopback
/// and veth carry; 64 KiB matches the socket's typical read size.
const BUFFER: usize = 64 * 1024;

/// How a proxied connection ended.
#[derive(Debug)]
pub enum Relayed {
    /// Bytes copied from and to downstream.
    Done(u64, u64),
    /// No upstream connection: the downstream one is closed, as Envoy does.
    NoUpstream(ConnectError),
    Failed(io::Error),
}

pub async fn serve<D>(mut downstream: D, cluster: &str, upstream: &Upstream) -> Relayed
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = match upstream.connect(cluster).await {
        Ok(up) => up,
        Err(e) => return Relayed::NoUpstream(e),
    };
    match tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut up, BUFFER, BUFFER).await {
        Ok((from, to)) => Relayed::Done(from, to),
        Err(e) => Relayed::Failed(e),
    }
}
