//! The RBAC network filter, as Envoy's: the chain's RBAC filters decide, in order, when the first bytes
//! arrive from the client (`CONTINUOUS` ones again on every read); a denied connection is closed before the
//! terminal filter sees a byte. And ztunnel's connection guard: when the configuration changes, a connection
//! whose chain's new policies deny it is closed at once.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::super::super::filter_chain::{self, ConnectionInfo};
use super::super::super::snapshot::Snapshot;
use super::super::super::tls_info::TlsInfo;
use super::super::rbac::{self, Facts};
use crate::config::rbac::NetworkRbac;

/// What the network RBAC rules see of a connection.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The original destination when the listener restored it.
    pub local: SocketAddr,
    pub server_name: Option<String>,
    pub tls: Option<Arc<TlsInfo>>,
    /// What Istio's metadata exchange learnt of the peer (for telemetry).
    pub peer_metadata: Arc<super::metadata_exchange::PeerSlot>,
}

impl Connection {
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            local: self.local,
            peer: self.peer,
            remote: self.peer.ip(),
            server_name: self.server_name.as_deref(),
            tls: self.tls.as_deref(),
            request: None,
        }
    }
}

/// The filters' decision on data: all of them on the first read, the `CONTINUOUS` ones on later reads (the
/// one-time ones keep their first answer). Stops at the first denial, as Envoy closes the connection there.
pub fn on_data(filters: &[Arc<NetworkRbac>], connection: &Connection, first: bool) -> bool {
    let facts = connection.facts();
    filters.iter().filter(|f| first || f.continuous).all(|f| rbac::evaluate(&f.engines, &f.stats, &facts).0)
}

/// The enforced policies' decision, uncounted: the guard's re-check after a configuration change.
pub fn allows(filters: &[Arc<NetworkRbac>], connection: &Connection) -> bool {
    let facts = connection.facts();
    filters.iter().all(|f| f.engines.enforced.as_ref().is_none_or(|p| p.allows(&facts)))
}

/// The client's byte stream behind the chain's RBAC filters: a read that brings denied bytes fails instead
/// (they never reach the terminal filter), and so does everything after it.
pub struct Gated<IO> {
    io: IO,
    filters: Vec<Arc<NetworkRbac>>,
    connection: Arc<Connection>,
    checked: bool,
    denied: bool,
}

impl<IO> Gated<IO> {
    pub fn new(io: IO, filters: Vec<Arc<NetworkRbac>>, connection: Arc<Connection>) -> Gated<IO> {
        Gated { io, filters, connection, checked: false, denied: false }
    }
}

fn denied() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "closed by the RBAC network filter")
}

impl<IO: AsyncRead + Unpin> AsyncRead for Gated<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.denied {
            return Poll::Ready(Err(denied()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before && !this.filters.is_empty() {
            let first = !std::mem::replace(&mut this.checked, true);
            if !on_data(&this.filters, &this.connection, first) {
                buf.set_filled(before);
                this.denied = true;
                return Poll::Ready(Err(denied()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Gated<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.denied {
            return Poll::Ready(Err(denied()));
        }
        Pin::new(&mut this.io).poll_write(cx, data)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.denied {
            return Poll::Ready(Err(denied()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Completes when a configuration update gives this connection (listener `listener`, its chain chosen again
/// by `info`) network RBAC policies that deny it. A listener or chain that is gone is left to draining.
pub async fn guard(mut updates: watch::Receiver<Option<Arc<Snapshot>>>, listener: &str, info: &ConnectionInfo, connection: &Connection) {
    loop {
        if updates.changed().await.is_err() {
            return std::future::pending().await;
        }
        let current = updates.borrow_and_update().clone();
        let chain = current.as_ref().and_then(|s| filter_chain::select(s.listener_named(listener)?, info));
        if chain.is_some_and(|c| !allows(&c.rbac, connection)) {
            tracing::debug!(listener, peer = %connection.peer, "the updated RBAC policy denies this connection; closing it");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tree::Obj;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `prefix`: the counters' own names (they are shared by name, process-wide).
    fn filter(rules: serde_json::Value, continuous: bool, prefix: &str) -> Arc<NetworkRbac> {
        let mut v = json!({"stat_prefix": prefix, "rules": rules});
        if continuous {
            v["enforcement_type"] = json!("CONTINUOUS");
        }
        Arc::new(crate::config::rbac::network(Obj::new(&v, "n").unwrap()).unwrap())
    }

    fn connection(peer: &str) -> Arc<Connection> {
        Arc::new(Connection { peer: peer.parse().unwrap(), local: "10.0.0.1:9000".parse().unwrap(), server_name: None, tls: None, peer_metadata: Default::default() })
    }

    fn only_from(prefix: &str) -> serde_json::Value {
        json!({"policies": {"p": {"permissions": [{"destination_port": 9000}], "principals": [{"direct_remote_ip": {"address_prefix": prefix, "prefix_len": 24}}]}}})
    }

    #[tokio::test]
    async fn denied_bytes_never_reach_the_terminal_filter() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut gated = Gated::new(server, vec![filter(only_from("192.168.0.0"), false, "gate_denied")], connection("10.9.9.9:1234"));
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 16];
        let e = gated.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(gated.write_all(b"x").await.is_err(), "nothing more goes either way");
    }

    #[tokio::test]
    async fn allowed_connections_pass_and_continuous_filters_check_every_read() {
        let one_time = filter(only_from("10.9.9.0"), false, "gate_one_time");
        let continuous = filter(only_from("10.9.9.0"), true, "gate_continuous");
        let (mut client, server) = tokio::io::duplex(64);
        let mut gated = Gated::new(server, vec![Arc::clone(&one_time), Arc::clone(&continuous)], connection("10.9.9.9:1234"));
        let mut buf = [0u8; 16];
        for _ in 0..3 {
            client.write_all(b"ping").await.unwrap();
            assert_eq!(gated.read(&mut buf).await.unwrap(), 4);
        }
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(one_time.stats.allowed.load(Relaxed) + continuous.stats.allowed.load(Relaxed), 4, "1 one-time check + 3 continuous ones");
        gated.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf[..4]).await.unwrap();
        assert_eq!(&buf[..4], b"pong");
    }

    #[test]
    fn the_guard_recheck_uses_the_enforced_policies_only() {
        let deny_all = filter(json!({"action": "ALLOW"}), false, "gate_guard");
        let no_rules = Arc::new(crate::config::rbac::network(Obj::new(&json!({"stat_prefix": "g"}), "n").unwrap()).unwrap());
        let conn = connection("10.9.9.9:1");
        assert!(!allows(&[deny_all], &conn));
        assert!(allows(&[no_rules], &conn));
    }
}
