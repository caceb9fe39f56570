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

/// Echoes every connection to `port` in `pod`, on one thread, until the process ends.
pub fn start_echo(pod: &NetNs, port: u16) -> io::Result<()> {
    let listener = pod.tcp_listen(("0.0.0.0", port))?;
    listener.set_nonblocking(true)?;
    let runtime = single_thread()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = conn.set_nodelay(true);
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    });
    Ok(())
}

/// Round trips of [`MESSAGE`] bytes, as many as they go, on `connections` connections from `pod` to
/// `addr` for `window`, on one thread. Returns how many completed.
pub fn closed_loop(pod: &NetNs, addr: SocketAddr, connections: usize, window: Duration) -> io::Result<u64> {
    let streams = (0..connections)
        .map(|_| {
            let s = pod.tcp_connect(addr, Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect::<io::Result<Vec<_>>>()?;
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
