//! Load for measuring how pods share the node proxy: an echo server and closed-loop clients, each one
//! event loop on one thread (as most apps are), so that a pod's app gets the same CPU whatever its number of
//! connections and only the proxy decides how the pods fare against each other.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::NetNs;

/// Size of one request and one response.
pub const MESSAGE: usize = 64;

fn single_thread() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Serves every connection to `port` in `pod` with `serve`, on one thread, until the process ends.
pub fn serve_on_one_thread<F, Fut>(pod: &NetNs, port: u16, serve: F) -> io::Result<()>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = io::Result<()>> + 'static,
{
    let listener = pod.tcp_listen(("0.0.0.0", port))?;
    listener.set_nonblocking(true)?;
    let runtime = single_thread()?;
    std::thread::spawn(move || {
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            while let Ok((conn, _)) = listener.accept().await {
                let _ = conn.set_nodelay(true);
                tokio::task::spawn_local(serve(conn));
            }
        });
    });
    Ok(())
}

/// Echoes every connection to `port` in `pod`, on one thread, until the process ends.
pub fn start_echo(pod: &NetNs, port: u16) -> io::Result<()> {
    serve_on_one_thread(pod, port, |mut conn| async move {
        let (mut r, mut w) = conn.split();
        tokio::io::copy(&mut r, &mut w).await.map(|_| ())
    })
}

/// `n` connections from `pod` to `addr`, ready for an event loop.
fn connect_all(pod: &NetNs, addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpStream>> {
    (0..n)
        .map(|_| {
            let s = pod.tcp_connect(addr, Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect()
}

/// Round trips of [`MESSAGE`] bytes, as many as they go, on `connections` connections from `pod` to
/// `addr` for `window`, on one thread. Returns how many completed.
pub fn closed_loop(pod: &NetNs, addr: SocketAddr, connections: usize, window: Duration) -> io::Result<u64> {
    let streams = connect_all(pod, addr, connections)?;
    single_thread()?.block_on(async move {
        let end = Instant::now() + window;
        let mut tasks = Vec::new();
        for s in streams {
            let mut stream = tokio::net::TcpStream::from_std(s)?;
            tasks.push(tokio::spawn(async move {
                let request = [7u8; MESSAGE];
                let mut response = [0u8; MESSAGE];
                let mut done = 0u64;
                while Instant::now() < end {
                    stream.write_all(&request).await?;
                    stream.read_exact(&mut response).await?;
                    done += 1;
                }
                Ok::<u64, io::Error>(done)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.map_err(io::Error::other)??;
        }
        Ok(total)
    })
}

const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A minimal HTTP/1.1 server on `port` in `pod` (every request, GET without a body, is answered 200 `ok`
/// on its keep-alive connection), one thread, until the process ends.
pub fn start_http(pod: &NetNs, port: u16) -> io::Result<()> {
    serve_on_one_thread(pod, port, answer_requests)
}

async fn answer_requests(mut conn: tokio::net::TcpStream) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            conn.write_all(ANSWER).await?;
        }
    }
}

/// GET requests to `addr` from `pod` at a fixed `rate` per second for `duration`, spread over `connections`
/// keep-alive connections, on one thread. Each latency (µs) counts from when its request was due, so a
/// stalled proxy shows in the latencies instead of slowing the load (no coordinated omission).
pub fn fixed_rate(pod: &NetNs, addr: SocketAddr, rate: u32, connections: usize, duration: Duration) -> io::Result<Vec<f64>> {
    let streams = connect_all(pod, addr, connections)?;
    let interval = Duration::from_secs_f64(connections as f64 / f64::from(rate.max(1)));
    let per_connection = (duration.as_secs_f64() / interval.as_secs_f64()) as u32;
    let request = format!("GET / HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    single_thread()?.block_on(async move {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for (i, s) in streams.into_iter().enumerate() {
            let mut stream = tokio::net::TcpStream::from_std(s)?;
            let request = request.clone();
            // Connections take turns, so requests leave evenly spaced.
            let offset = interval.mul_f64(i as f64 / connections as f64);
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_connection as usize);
                let mut answer = vec![0u8; ANSWER.len()];
                for k in 0..per_connection {
                    let due = start + offset + interval * k;
                    tokio::time::sleep_until(due).await;
                    stream.write_all(request.as_bytes()).await?;
                    stream.read_exact(&mut answer).await?;
                    latencies.push(due.elapsed().as_secs_f64() * 1e6);
                }
                Ok::<_, io::Error>(latencies)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.map_err(io::Error::other)??);
        }
        Ok(all)
    })
}
