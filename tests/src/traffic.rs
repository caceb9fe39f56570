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
    echo_paced(pod, addr, payload, Duration::ZERO)
}

/// [`echo`] that sends 256 KiB at a time with `pause` between chunks: a transfer that is still running while
/// the test changes something underneath it.
pub fn echo_paced(pod: &NetNs, addr: SocketAddr, payload: &[u8], pause: Duration) -> io::Result<Vec<u8>> {
    echo_paced_on(pod.tcp_connect(addr, Duration::from_secs(5))?, payload, pause)
}

/// [`echo`] on a connection made earlier.
pub fn echo_on(stream: TcpStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    echo_paced_on(stream, payload, Duration::ZERO)
}

fn echo_paced_on(stream: TcpStream, payload: &[u8], pause: Duration) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let payload = payload.to_vec();
    // Write on another thread: with large payloads both directions must flow at once.
    let sender = std::thread::spawn(move || -> io::Result<()> {
        for chunk in payload.chunks(256 << 10) {
            writer.write_all(chunk)?;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    let mut reader: &TcpStream = &stream;
    reader.read_to_end(&mut back)?;
    sender.join().map_err(|_| io::Error::other("sender panicked"))??;
    Ok(back)
}

/// Connects from `source` inside `ns`, sends `payload` (without half-closing: a proxy may close connections
/// that end while its listener filters still inspect them), and returns what came back once `want` bytes
/// arrived or the other side closed (empty when it closed without answering).
pub fn exchange_from(ns: &NetNs, source: std::net::IpAddr, addr: SocketAddr, payload: &[u8], want: usize) -> io::Result<Vec<u8>> {
    let mut stream = ns.tcp_connect_from(source, addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(payload)?;
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    while back.len() < want {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            // A proxy that closes without reading everything resets the connection.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
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

/// [`echo`] with a non-blocking socket driven by poll(2), the way event-loop applications (Go, tokio, Envoy)
/// do I/O: `EAGAIN` means "wait for readiness", never an error.
pub fn echo_nonblocking(pod: &NetNs, addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut stream = pod.tcp_connect(addr, Duration::from_secs(5))?;
    stream.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (mut sent, mut shut, mut back, mut buf) = (0, false, Vec::new(), vec![0u8; 64 << 10]);
    loop {
        if !shut && sent == payload.len() {
            stream.shutdown(Shutdown::Write)?;
            shut = true;
        }
        let events = libc::POLLIN | if shut { 0 } else { libc::POLLOUT };
        let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events, revents: 0 };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("echo timed out after {} bytes back", back.len())));
        }
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut fd, 1, left.as_millis().min(1000) as i32) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if !shut && fd.revents & libc::POLLOUT != 0 {
            match stream.write(&payload[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match stream.read(&mut buf) {
                Ok(0) => return Ok(back),
                Ok(n) => back.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A response to [`http_request`]: the status code, the header block and the body.
#[derive(Debug, Clone, Default)]
pub struct HttpResponse {
    pub status: u16,
    /// Status line and headers, as received.
    pub head: String,
    pub body: String,
}

/// One HTTP/1.1 request (`connection: close`) on `stream`, and everything the server answered.
pub fn http_request(stream: TcpStream, method: &str, host: &str, path: &str) -> io::Result<HttpResponse> {
    http_request_with(stream, method, host, path, &[])
}

/// [`http_request`] with more request headers.
pub fn http_request_with(mut stream: TcpStream, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> io::Result<HttpResponse> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(stream, "{method} {path} HTTP/1.1\r\nhost: {host}\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok(HttpResponse { status, head: head.to_string(), body })
}

/// The payload of a chunked body (chunk sizes in hex, each chunk followed by CRLF, a 0-size chunk last).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else { break };
        let (Some(chunk), Some(after)) = (tail.get(..size), tail.get(size..)) else { break };
        if size == 0 {
            break;
        }
        out.push_str(chunk);
        rest = after.strip_prefix("\r\n").unwrap_or(after);
    }
    out
}

/// [`http_request`] from inside `ns` to `addr`.
pub fn http(ns: &NetNs, addr: SocketAddr, method: &str, host: &str, path: &str) -> io::Result<HttpResponse> {
    http_request(ns.tcp_connect(addr, Duration::from_secs(5))?, method, host, path)
}
