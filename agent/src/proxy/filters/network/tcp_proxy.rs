//! The tcp_proxy filter: one downstream connection, one upstream connection (to a cluster chosen by weight,
//! after up to `max_connect_attempts` tries), bytes copied both ways until both sides have closed or nothing
//! moved for `idle_timeout`. A FIN from either side is passed on as a FIN (half-close) and the other
//! direction keeps flowing until it ends too.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::random::{random, weighted};
use super::super::super::upstream::{ConnectError, Upstream};
use super::super::istio_stats::TcpReport;
use crate::proxy::upstream::pool::UpstreamSession;
use crate::config::listener::TcpProxy;

/// How a proxied connection ended.
#[derive(Debug)]
pub enum Relayed {
    /// Bytes copied from and to downstream.
    Done(u64, u64),
    /// No upstream connection: the downstream one is closed, as Envoy does.
    NoUpstream(ConnectError),
    Failed(io::Error),
}

/// What a connection's telemetry learns of its upstream: the cluster, the connection made (or the response
/// flag of why none was), and Istio's TCP metrics, reported as the connection goes.
#[derive(Default)]
pub struct TcpSeen {
    pub cluster: Option<String>,
    pub session: Option<Arc<UpstreamSession>>,
    pub flag: Option<&'static str>,
    /// The endpoint a failed connection was made to.
    pub failed_host: Option<std::net::SocketAddr>,
    pub report: Option<TcpReport>,
}

/// Relays `downstream` to an upstream of the proxy's cluster; `seen` learns the upstream connection and
/// reports the connection as it goes.
pub async fn serve<D>(downstream: D, config: &TcpProxy, upstream: &Upstream, seen: &mut TcpSeen) -> Relayed
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let cluster = pick_weighted(&config.clusters);
    seen.cluster = Some(cluster.to_string());
    let mut attempt = 1;
    let up = loop {
        match upstream.connect(cluster).await {
            Ok((up, session)) => {
                if let Some(r) = &mut seen.report {
                    r.connected(cluster, Arc::clone(&session));
                }
                seen.session = Some(session);
                break up;
            }
            Err(ConnectError::Connect(_, e)) if attempt < config.max_connect_attempts => {
                tracing::debug!(cluster, attempt, "tcp_proxy connect failed, trying again: {e}");
                attempt += 1;
            }
            Err(e) => {
                let flag = match e {
                    ConnectError::UnknownCluster(_) => "NC",
                    ConnectError::NoHealthyUpstream => "UH",
                    // Envoy's: the connection failed, and so did the last of `max_connect_attempts`.
                    ConnectError::Connect(..) => "UF,URX",
                };
                seen.flag = Some(flag);
                if let ConnectError::Connect(endpoint, _) = &e {
                    seen.failed_host = Some(*endpoint);
                }
                if let Some(r) = &mut seen.report {
                    r.failed(flag);
                }
                return Relayed::NoUpstream(e);
            }
        }
    };
    let started = Instant::now();
    let last_activity = Arc::new(AtomicU64::new(0));
    let mut down = Tracked { inner: downstream, started, last_activity: Arc::clone(&last_activity) };
    let mut up = Tracked { inner: up, started, last_activity: Arc::clone(&last_activity) };
    let cluster_limit = upstream.snapshot.cluster(cluster).map_or(crate::config::DEFAULT_BUFFER_LIMIT, |c| c.config.buffer_limit);
    let copy = super::relay::relay(&mut down, &mut up, upstream.downstream_buffer_limit.min(cluster_limit));
    tokio::pin!(copy);
    let idle = async {
        match config.idle_timeout {
            Some(idle) => idle_for(idle, started, &last_activity).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(idle);
    // Istio's periodic TCP reports (`tcp_reporting_duration`; zero turns them off).
    let mut ticks = seen.report.as_ref().map(|r| r.interval()).filter(|p| !p.is_zero()).map(|p| tokio::time::interval_at(started + p, p));
    let result = loop {
        let tick = async {
            match &mut ticks {
                Some(t) => t.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut copy => break result,
            () = &mut idle => {
                tracing::debug!(cluster, idle = ?config.idle_timeout, "tcp_proxy idle timeout; closing");
                return Relayed::Done(0, 0);
            }
            _ = tick => {
                if let Some(r) = &mut seen.report {
                    r.report(false);
                }
            }
        }
    };
    match result {
        Ok((from, to)) => Relayed::Done(from, to),
        Err(e) => Relayed::Failed(e),
    }
}

/// A cluster by weight (the only one when there is one).
fn pick_weighted(clusters: &[(String, u32)]) -> &str {
    let i = weighted(clusters.iter().map(|(_, w)| u64::from(*w)), random() as u64);
    clusters.get(i).map_or("", |(name, _)| name.as_str())
}

/// Completes once nothing has been read either way for `idle`: sleeps until the deadline the last activity
/// sets, no polling in between.
async fn idle_for(idle: Duration, started: Instant, last_activity: &AtomicU64) {
    loop {
        let last = started + Duration::from_millis(last_activity.load(Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A stream that records when it last read bytes (milliseconds since the connection started).
struct Tracked<S> {
    inner: S,
    started: Instant,
    last_activity: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last_activity.store(self.started.elapsed().as_millis() as u64, Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::store::Resource;
    use crate::proxy::snapshot::Snapshot;
    use crate::proxy::socket::SocketFactory;
    use crate::proxy::upstream::pool::Pools;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn upstream_to(addr: std::net::SocketAddr) -> Upstream {
        let v = serde_json::json!({"name": "echo", "connect_timeout": "1s",
            "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": addr.port()}}}}]}]}});
        let cluster = crate::config::cluster::translate(crate::config::tree::Obj::new(&v, "c").unwrap()).unwrap();
        let snapshot = Snapshot { clusters: Arc::new([Resource::fixed("echo", cluster)].into_iter().collect()), ..Snapshot::default() };
        Upstream { snapshot: Arc::new(snapshot), pools: Pools::new(SocketFactory::Host), original_dst: addr, downstream_buffer_limit: crate::config::DEFAULT_BUFFER_LIMIT }
    }

    #[tokio::test]
    async fn relays_both_ways_and_closes_idle_connections() {
        let addr = crate::proxy::testing::echo_server().await;
        let config = TcpProxy { clusters: vec![("echo".into(), 1)], idle_timeout: Some(Duration::from_millis(200)), max_connect_attempts: 1, access_log: Default::default() };
        let (mut client, server) = tokio::io::duplex(1024);
        let upstream = upstream_to(addr);
        let relay = tokio::spawn(async move { serve(server, &config, &upstream, &mut TcpSeen::default()).await });
        client.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        // Nothing more is sent: the idle timeout ends the relay and closes the downstream side.
        let ended = tokio::time::timeout(Duration::from_secs(5), relay).await;
        assert!(ended.is_ok(), "the idle connection was not closed");
        assert_eq!(client.read(&mut back).await.unwrap_or(0), 0);
    }

    #[test]
    fn weights_pick_every_cluster_in_proportion() {
        let clusters = vec![("a".to_string(), 3), ("b".to_string(), 1)];
        let picks: Vec<&str> = (0..4000).map(|_| pick_weighted(&clusters)).collect();
        let a = picks.iter().filter(|c| **c == "a").count();
        assert!((2700..3300).contains(&a), "{a} of 4000");
    }
}
