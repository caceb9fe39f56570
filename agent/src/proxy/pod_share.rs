//! A pod's share of the node proxy. Every captured pod is served by worker threads of its own (a tokio
//! runtime per pod), so the kernel's scheduler shares the CPU between pods as it would between sidecars:
//! a pod's share does not grow with its connections or requests, an idle pod's share goes to the busy ones,
//! and a pod's xDS work runs on its own threads too. On top, each pod's load is counted (connections,
//! requests in flight, bytes, CPU time of its threads) and held to its limits: connections beyond
//! `max_connections` or `max_connection_rate` are closed at once (Envoy's listener `connection_limit`),
//! requests beyond `max_requests` get Envoy's overload reply (503 `envoy overloaded`), bytes wait for
//! `max_bandwidth`; and a node at `node_max_connections` (`node_max_requests`) sheds new connections
//! (requests) from the pods over their equal share only, as Envoy's overload manager sheds load.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use crate::config::agent::PodLimits;

/// The connections of all pods together, against the node's limit (Envoy's overload manager
/// `global_downstream_max_connections`). At the limit, connections are shed from the heaviest pods first:
/// only a pod under its equal share (the limit over the pods captured) still gets new ones.
#[derive(Debug)]
pub struct NodeLoad {
    connections: NodeBudget,
    requests: NodeBudget,
    pods: AtomicU64,
}

/// One node-wide limit: what all pods hold together, and the most they may.
#[derive(Debug)]
struct NodeBudget {
    max: u64,
    held: AtomicU64,
}

impl NodeLoad {
    pub fn new(max_connections: u64, max_requests: u64) -> Arc<NodeLoad> {
        let budget = |max| NodeBudget { max, held: AtomicU64::new(0) };
        Arc::new(NodeLoad { connections: budget(max_connections), requests: budget(max_requests), pods: AtomicU64::new(0) })
    }

    fn budget(&self, request: bool) -> &NodeBudget {
        if request {
            &self.requests
        } else {
            &self.connections
        }
    }

    /// Whether a pod holding `held` units may take another: always under the node's limit; at it, only a pod
    /// under its equal share of it (the heaviest pods are shed first).
    fn admits(&self, request: bool, held: u64) -> bool {
        let budget = self.budget(request);
        let share = budget.max / self.pods.load(Relaxed).max(1);
        budget.held.load(Relaxed) < budget.max || held < share
    }
}

/// A token bucket refilled at `rate` per second up to a second's worth. Tokens may be overdrawn (a read
/// takes what arrived); the next user then waits until the debt is paid.
#[derive(Debug)]
struct RateBucket {
    rate: f64,
    tokens: f64,
    last: tokio::time::Instant,
}

impl RateBucket {
    fn new(rate: u64) -> Mutex<RateBucket> {
        Mutex::new(RateBucket { rate: rate as f64, tokens: rate as f64, last: tokio::time::Instant::now() })
    }

    fn refill(&mut self) {
        let now = tokio::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
    }

    /// The whole tokens there now, or how long until there is one.
    fn available(&mut self) -> Result<u64, std::time::Duration> {
        self.refill();
        if self.tokens >= 1.0 {
            return Ok(self.tokens as u64);
        }
        Err(std::time::Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }

    fn take(&mut self, n: f64) {
        self.refill();
        self.tokens -= n;
    }
}

/// A pod's load, counted lock-free on the data path (the connection-rate bucket takes a lock per new
/// connection).
#[derive(Debug)]
pub struct PodLoad {
    limits: PodLimits,
    node: Option<Arc<NodeLoad>>,
    /// New connections per second.
    rate: Mutex<RateBucket>,
    /// Bytes per second read from and written to downstream, when limited.
    bandwidth: Option<[Mutex<RateBucket>; 2]>,
    connections: AtomicU64,
    connections_total: AtomicU64,
    connections_refused: AtomicU64,
    requests: AtomicU64,
    requests_total: AtomicU64,
    requests_refused: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// The pod's worker threads (Linux thread ids), for their CPU time.
    threads: Arc<ThreadIds>,
}

/// Linux ids of a runtime's threads, recorded as each starts.
type ThreadIds = Mutex<Vec<u32>>;

/// A point-in-time copy for `/status` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LoadSnapshot {
    pub connections: u64,
    pub connections_total: u64,
    pub connections_refused: u64,
    pub requests: u64,
    pub requests_total: u64,
    pub requests_refused: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// CPU time the pod's worker threads have used, in microseconds.
    pub cpu_us: u64,
}

/// Holds one unit of a pod's load until dropped.
pub struct Admitted {
    load: Arc<PodLoad>,
    request: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let counter = if self.request { &self.load.requests } else { &self.load.connections };
        counter.fetch_sub(1, Relaxed);
        if let Some(node) = &self.load.node {
            node.budget(self.request).held.fetch_sub(1, Relaxed);
        }
    }
}

impl PodLoad {
    pub fn new(limits: PodLimits) -> Arc<PodLoad> {
        PodLoad::on_node(limits, None, Arc::default())
    }

    /// A pod's load that also counts toward the node's, its CPU time that of `threads`.
    fn on_node(limits: PodLimits, node: Option<Arc<NodeLoad>>, threads: Arc<ThreadIds>) -> Arc<PodLoad> {
        Arc::new(PodLoad {
            limits,
            node,
            rate: RateBucket::new(limits.max_connection_rate),
            bandwidth: limits.max_bandwidth.map(|b| [RateBucket::new(b), RateBucket::new(b)]),
            connections: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            requests_refused: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            threads,
        })
    }

    /// Counts one more unit under the pod's limit and the node's, or refuses it.
    fn admit(self: &Arc<Self>, request: bool) -> Option<Admitted> {
        let (counter, total, refused, limit) = match request {
            true => (&self.requests, &self.requests_total, &self.requests_refused, self.limits.max_requests),
            false => (&self.connections, &self.connections_total, &self.connections_refused, self.limits.max_connections),
        };
        let node_admits = self.node.as_ref().is_none_or(|n| n.admits(request, counter.load(Relaxed)));
        if !node_admits || counter.fetch_add(1, Relaxed) >= limit {
            if node_admits {
                counter.fetch_sub(1, Relaxed);
            }
            refused.fetch_add(1, Relaxed);
            return None;
        }
        total.fetch_add(1, Relaxed);
        if let Some(node) = &self.node {
            node.budget(request).held.fetch_add(1, Relaxed);
        }
        Some(Admitted { load: Arc::clone(self), request })
    }

    /// A new downstream connection, unless the pod is over `max_connection_rate`, at `max_connections`, or
    /// over its share of a node at `node_max_connections`.
    pub fn connection(self: &Arc<Self>) -> Option<Admitted> {
        if !self.take_rate_token() {
            self.connections_refused.fetch_add(1, Relaxed);
            return None;
        }
        self.admit(false)
    }

    /// One token of the connection-rate bucket, refilled at `max_connection_rate` per second.
    fn take_rate_token(&self) -> bool {
        if self.limits.max_connection_rate == u64::MAX {
            return true;
        }
        let mut bucket = self.rate.lock().unwrap_or_else(PoisonError::into_inner);
        if bucket.available().is_err() {
            return false;
        }
        bucket.take(1.0);
        true
    }

    /// A new HTTP request, unless the pod is at `max_requests` or over its share of a node at
    /// `node_max_requests`.
    pub fn request(self: &Arc<Self>) -> Option<Admitted> {
        self.admit(true)
    }

    /// CPU time of the pod's threads so far (from `/proc/self/task/<tid>/schedstat`, in nanoseconds).
    fn cpu_us(&self) -> u64 {
        let threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let ns: u64 = threads
            .iter()
            .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        ns / 1000
    }

    pub fn snapshot(&self) -> LoadSnapshot {
        LoadSnapshot {
            connections: self.connections.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            connections_refused: self.connections_refused.load(Relaxed),
            requests: self.requests.load(Relaxed),
            requests_total: self.requests_total.load(Relaxed),
            requests_refused: self.requests_refused.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            cpu_us: self.cpu_us(),
        }
    }
}

/// One connection's bytes on the wire: read from it and written to it.
#[derive(Debug, Default)]
pub struct WireBytes([AtomicU64; 2]);

impl WireBytes {
    pub fn received(&self) -> u64 {
        self.0[READ].load(Relaxed)
    }

    pub fn sent(&self) -> u64 {
        self.0[WRITE].load(Relaxed)
    }
}

/// A downstream byte stream whose bytes count toward its pod's load, and wait for its bandwidth.
pub struct Metered<IO> {
    io: IO,
    load: Arc<PodLoad>,
    /// This connection's own bytes (Istio's TCP metrics).
    wire: Arc<WireBytes>,
    /// Waiting for bandwidth, per direction (read, write).
    waits: [Option<Pin<Box<tokio::time::Sleep>>>; 2],
}

const READ: usize = 0;
const WRITE: usize = 1;

impl<IO> Metered<IO> {
    pub fn new(io: IO, load: Arc<PodLoad>) -> Self {
        Metered { io, load, wire: Arc::default(), waits: [None, None] }
    }

    /// The connection's wire bytes so far, as they go on.
    pub fn wire(&self) -> Arc<WireBytes> {
        Arc::clone(&self.wire)
    }

    /// How many bytes the pod's bandwidth in `direction` allows now (any number when unlimited); pending
    /// until it allows one.
    fn poll_bandwidth(&mut self, cx: &mut Context<'_>, direction: usize) -> Poll<usize> {
        let Some(buckets) = &self.load.bandwidth else { return Poll::Ready(usize::MAX) };
        loop {
            let available = buckets[direction].lock().unwrap_or_else(PoisonError::into_inner).available();
            let wait = match available {
                Ok(bytes) => {
                    self.waits[direction] = None;
                    return Poll::Ready(usize::try_from(bytes).unwrap_or(usize::MAX));
                }
                Err(wait) => wait,
            };
            let sleep = self.waits[direction].get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
            sleep.as_mut().reset(tokio::time::Instant::now() + wait);
            std::task::ready!(sleep.as_mut().poll(cx));
        }
    }

    /// Counts `n` bytes moved in `direction` and takes them from the pod's bandwidth.
    fn moved(&self, direction: usize, n: usize) {
        let counter = if direction == READ { &self.load.bytes_in } else { &self.load.bytes_out };
        counter.fetch_add(n as u64, Relaxed);
        self.wire.0[direction].fetch_add(n as u64, Relaxed);
        if let Some(buckets) = &self.load.bandwidth {
            buckets[direction].lock().unwrap_or_else(PoisonError::into_inner).take(n as f64);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Metered<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let allowed = std::task::ready!(this.poll_bandwidth(cx, READ));
        if allowed < buf.remaining() {
            // Limited: read no more than the bandwidth allows now.
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(allowed));
            let polled = Pin::new(&mut this.io).poll_read(cx, &mut limited);
            let n = limited.filled().len();
            buf.advance(n);
            this.moved(READ, n);
            return polled;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.moved(READ, buf.filled().len() - before);
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Metered<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let allowed = std::task::ready!(this.poll_bandwidth(cx, WRITE));
        let polled = Pin::new(&mut this.io).poll_write(cx, &data[..allowed.min(data.len())]);
        if let Poll::Ready(Ok(n)) = polled {
            this.moved(WRITE, n);
        }
        polled
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let allowed = std::task::ready!(this.poll_bandwidth(cx, WRITE));
        if allowed < bufs.iter().map(|b| b.len()).sum::<usize>() {
            // Limited: the first slice, no more than the bandwidth allows now.
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            let polled = Pin::new(&mut this.io).poll_write(cx, &first[..allowed.min(first.len())]);
            if let Poll::Ready(Ok(n)) = polled {
                this.moved(WRITE, n);
            }
            return polled;
        }
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.moved(WRITE, n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The Linux id of the calling thread.
fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// Worker threads for one pod, which may be started before the pod comes (starting threads is a good part of
/// a pod's CNI ADD).
pub struct PodThreads {
    runtime: Option<tokio::runtime::Runtime>,
    workers: usize,
    tids: Arc<ThreadIds>,
}

impl PodThreads {
    pub fn start(workers: usize) -> std::io::Result<PodThreads> {
        let workers = workers.max(1);
        let tids = Arc::<ThreadIds>::default();
        let started = Arc::clone(&tids);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("weft-pod")
            .on_thread_start(move || {
                if let Some(tid) = current_tid() {
                    started.lock().unwrap_or_else(PoisonError::into_inner).push(tid);
                }
            })
            .enable_all()
            .build()?;
        Ok(PodThreads { runtime: Some(runtime), workers, tids })
    }

    /// How many worker threads these are.
    pub fn workers(&self) -> usize {
        self.workers
    }
}

impl Drop for PodThreads {
    fn drop(&mut self) {
        // Unused: nothing to wait for (and a runtime may not be dropped plainly inside another).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A pod's worker threads. Dropping it lets the pod's tasks finish on their own (the threads stay until
/// the last connection has ended, or the drain deadline passed).
pub struct PodShare {
    runtime: Option<tokio::runtime::Runtime>,
    pub load: Arc<PodLoad>,
}

impl PodShare {
    pub fn new(mut threads: PodThreads, limits: PodLimits, node: Option<Arc<NodeLoad>>) -> PodShare {
        let load = PodLoad::on_node(limits, node, Arc::clone(&threads.tids));
        if let Some(node) = &load.node {
            node.pods.fetch_add(1, Relaxed);
        }
        PodShare { runtime: threads.runtime.take(), load }
    }

    /// Where the pod's tasks run.
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.runtime {
            Some(r) => r.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }

    /// Stops the pod's threads once its connections have ended or `deadline` has passed.
    pub fn retire(mut self, deadline: std::time::Duration) {
        let Some(runtime) = self.runtime.take() else { return };
        let load = Arc::clone(&self.load);
        let spawned = std::thread::Builder::new().name("weft-pod-retire".into()).spawn(move || {
            runtime.block_on(async {
                let end = tokio::time::Instant::now() + deadline;
                while load.connections.load(Relaxed) > 0 && tokio::time::Instant::now() < end {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            });
            runtime.shutdown_background();
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot retire a pod's threads: {e}");
        }
    }
}

impl Drop for PodShare {
    fn drop(&mut self) {
        if let Some(node) = &self.load.node {
            node.pods.fetch_sub(1, Relaxed);
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_beyond_and_release_on_drop() {
        let load = PodLoad::new(PodLimits { max_connections: 2, max_requests: 1, ..PodLimits::UNLIMITED });
        let a = load.connection().unwrap();
        let _b = load.connection().unwrap();
        assert!(load.connection().is_none(), "a third connection is over the limit");
        drop(a);
        let _c = load.connection().expect("a closed connection frees its place");
        let _r = load.request().unwrap();
        assert!(load.request().is_none());
        let s = load.snapshot();
        assert_eq!((s.connections, s.connections_total, s.connections_refused, s.requests, s.requests_refused), (2, 3, 1, 1, 1));
    }

    #[test]
    fn connections_beyond_the_rate_are_refused_until_the_bucket_refills() {
        let load = PodLoad::new(PodLimits { max_connection_rate: 2, ..PodLimits::UNLIMITED });
        let held: Vec<_> = (0..2).map(|_| load.connection().expect("a second's burst")).collect();
        assert!(load.connection().is_none(), "a third connection in the same instant is over 2 per second");
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert!(load.connection().is_some(), "half a second refills one token");
        drop(held);
    }

    #[test]
    fn a_node_at_its_limit_sheds_the_heaviest_pods_never_one_within_its_share() {
        let node = NodeLoad::new(4, u64::MAX);
        node.pods.store(2, Relaxed);
        let heavy = PodLoad::on_node(PodLimits::UNLIMITED, Some(Arc::clone(&node)), Arc::default());
        let light = PodLoad::on_node(PodLimits::UNLIMITED, Some(Arc::clone(&node)), Arc::default());
        let mut held: Vec<_> = (0..4).map(|_| heavy.connection().expect("under the node's limit")).collect();
        assert!(heavy.connection().is_none(), "the node is full and the heavy pod holds more than its share of 2");
        held.push(light.connection().expect("the light pod is within its share"));
        held.push(light.connection().expect("still within its share"));
        assert!(light.connection().is_none(), "now at its share of a full node");
        held.pop();
        assert!(light.connection().is_some(), "a closed connection frees its place");
        assert_eq!((heavy.snapshot().connections_refused, light.snapshot().connections_refused), (1, 1));
    }

    #[test]
    fn a_node_at_its_request_limit_sheds_requests_of_the_heaviest_pods() {
        let node = NodeLoad::new(u64::MAX, 4);
        node.pods.store(2, Relaxed);
        let heavy = PodLoad::on_node(PodLimits::UNLIMITED, Some(Arc::clone(&node)), Arc::default());
        let light = PodLoad::on_node(PodLimits::UNLIMITED, Some(Arc::clone(&node)), Arc::default());
        let mut held: Vec<_> = (0..4).map(|_| heavy.request().expect("under the node's limit")).collect();
        assert!(heavy.request().is_none(), "503 for the pod over its share of a saturated node");
        held.push(light.request().expect("the light pod is within its share"));
        held.truncate(2);
        assert!(heavy.request().is_some(), "finished requests free the node");
        assert_eq!((heavy.snapshot().requests_refused, light.snapshot().requests_refused), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pods_bandwidth_paces_its_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let load = PodLoad::new(PodLimits { max_bandwidth: Some(10_000), ..PodLimits::UNLIMITED });
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut metered = Metered::new(server, Arc::clone(&load));
        client.write_all(&[0u8; 40_000]).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut got = 0;
        let mut buf = vec![0u8; 64 << 10];
        while got < 40_000 {
            got += metered.read(&mut buf).await.unwrap();
        }
        // A second's worth at once, then 10,000 bytes a second for the rest.
        let took = start.elapsed().as_secs_f64();
        assert!((2.9..3.2).contains(&took), "40,000 bytes at 10,000/s with a 10,000 burst took {took} s");
        assert_eq!(load.snapshot().bytes_in, 40_000);
    }

    #[test]
    fn a_pods_threads_count_their_cpu_time() {
        let share = PodShare::new(PodThreads::start(1).unwrap(), PodLimits::default(), None);
        let own_cpu_ns = || -> u64 {
            let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
            stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
        };
        share.handle().block_on(async move {
            // Busy on the pod's own thread until it has used 50 ms of CPU, however busy the machine is.
            tokio::spawn(async move {
                let start = own_cpu_ns();
                let mut x = 0u64;
                while own_cpu_ns() - start < 50_000_000 {
                    for _ in 0..10_000 {
                        x = x.wrapping_add(std::hint::black_box(1));
                    }
                }
                x
            })
            .await
            .unwrap();
        });
        assert!(share.load.snapshot().cpu_us >= 50_000, "{:?}", share.load.snapshot());
    }
}
