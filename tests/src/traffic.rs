//! Test traffic between pods: an echo server that records who connected, and a client that sends a payload,
//! half-closes, and reads everything back.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::NetNs;

/// An echo server inside a pod: reads until the client half-closes, then writes everything back and closes.
pub struct EchoServer {
    pub port: u16,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    pub fn start(pod: &NetNs, port: u16) -> io::Result<EchoServer> {
        let listener = pod.tcp_listen(("0.0.0.0", port))?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&peers);
        std::thread::spawn(move || serve(listener, seen));
        Ok(EchoServer { port, peers })
    }

    /// Source addresses of the connections accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

fn serve(listener: TcpListener, peers: Arc<Mutex<Vec<SocketAddr>>>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if let (Ok(peer), Ok(mut p)) = (conn.peer_addr(), peers.lock()) {
            p.push(peer);
        }
        std::thread::spawn(move || {
            let mut data = Vec::new();
            if conn.read_to_end(&mut data).is_ok() {
                let _ = conn.write_all(&data);
            }
        });
    }
}

/// Connects from `pod` to `addr`, sends `payload`, half-closes, and returns everything the server sent back.
pub fn echo(pod: &NetNs, addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let stream = pod.tcp_connect(addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let payload = payload.to_vec();
    // Write on another thread: with large payloads both directions must flow at once.
    let sender = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&payload)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    let mut reader: &TcpStream = &stream;
    reader.read_to_end(&mut back)?;
    sender.join().map_err(|_| io::Error::other("sender panicked"))??;
    Ok(back)
}

/// A deterministic, non-repeating-looking payload of `len` bytes.
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
