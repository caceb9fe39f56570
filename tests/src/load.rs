//! Bounded load for the capture benchmark: request/response round trips and a bulk transfer between two
//! pods. Sockets are non-blocking and driven by poll(2), like event-loop applications, so they behave the
//! same with and without the sockmap fast path (see `echo_nonblocking`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::NetNs;

/// Size of one request and one response.
pub const MESSAGE: usize = 64;

fn wait(stream: &TcpStream, events: i16) -> io::Result<()> {
    let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events, revents: 0 };
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut fd, 1, 10_000) } {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::Error::new(io::ErrorKind::TimedOut, "no progress in 10 s")),
        _ => Ok(()),
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
fn read_full(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(stream, libc::POLLIN)?,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn write_full(stream: &mut TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(stream, libc::POLLOUT)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Serves both tests on one port: a connection whose first byte is `r` echoes `MESSAGE`-byte messages until
/// EOF; one whose first byte is `b` is drained to EOF and answered with the byte count (8 bytes).
pub fn start_server(pod: &NetNs, port: u16) -> io::Result<()> {
    let listener: TcpListener = pod.tcp_listen(("0.0.0.0", port))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    Ok(())
}

fn serve(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nonblocking(true)?;
    conn.set_nodelay(true)?;
    let mut kind = [0u8; 1];
    if !read_full(&mut conn, &mut kind)? {
        return Ok(());
    }
    let mut buf = vec![0u8; if kind[0] == b'r' { MESSAGE } else { 256 << 10 }];
    if kind[0] == b'r' {
        while read_full(&mut conn, &mut buf)? {
            write_full(&mut conn, &buf)?;
        }
        return Ok(());
    }
    let mut total: u64 = 0;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(&conn, libc::POLLIN)?,
            Err(e) => return Err(e),
        }
    }
    write_full(&mut conn, &total.to_be_bytes())
}

fn connect(pod: &NetNs, addr: SocketAddr, kind: u8) -> io::Result<TcpStream> {
    let mut stream = pod.tcp_connect(addr, Duration::from_secs(5))?;
    stream.set_nonblocking(true)?;
    stream.set_nodelay(true)?;
    write_full(&mut stream, &[kind])?;
    Ok(stream)
}

/// `count` round trips on one connection; returns each one's duration in microseconds.
pub fn round_trips(pod: &NetNs, addr: SocketAddr, count: usize) -> io::Result<Vec<f64>> {
    let mut stream = connect(pod, addr, b'r')?;
    let request = [7u8; MESSAGE];
    let mut response = [0u8; MESSAGE];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        write_full(&mut stream, &request)?;
        if !read_full(&mut stream, &mut response)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(times)
}

/// Sends `bytes` on one connection and waits for the server's count; returns Gbit/s.
pub fn bulk(pod: &NetNs, addr: SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut stream = connect(pod, addr, b'b')?;
    let chunk = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        write_full(&mut stream, &chunk[..n])?;
        sent += n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    read_full(&mut stream, &mut count)?;
    let secs = start.elapsed().as_secs_f64();
    if u64::from_be_bytes(count) != bytes {
        return Err(io::Error::other(format!("server received {} of {bytes} bytes", u64::from_be_bytes(count))));
    }
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}
