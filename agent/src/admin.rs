//! The agent's admin endpoint: readiness and a JSON status of captured pods. HTTP/1.1, GET only, one request
//! per connection; it binds to loopback by default.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::node::{Node, PodStatus};

const MAX_HEAD: usize = 8 * 1024;

/// Shared state the admin endpoint reports on.
pub struct Admin {
    pub node: Arc<Node>,
    /// Set once start-up adoption is done and the CNI socket serves.
    pub ready: AtomicBool,
}

#[derive(Serialize)]
struct Status<'a> {
    ready: bool,
    redirect: crate::capture::RedirectMode,
    capture: serde_json::Value,
    version: &'a str,
    pods: Vec<PodStatus>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, Arc::clone(&admin)));
            }
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Binds with SO_REUSEPORT: during an upgrade the new agent starts while the old one still serves.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(128)?;
        TcpListener::from_std(socket.into())
    };
    bind().map_err(|e| std::io::Error::new(e.kind(), format!("admin address {addr}: {e}")))
}

async fn handle(mut stream: TcpStream, admin: Arc<Admin>) {
    let Ok(Ok(head)) = tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream)).await else { return };
    let (status, content_type, body) = route(&head, &admin).await;
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn route(head: &str, admin: &Admin) -> (&'static str, &'static str, String) {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let ready = admin.ready.load(Ordering::Acquire);
    match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".into()),
        ("GET", "/ready" | "/healthz/ready") if ready => ("200 OK", "text/plain", "LIVE\n".into()),
        ("GET", "/ready" | "/healthz/ready") => ("503 Service Unavailable", "text/plain", "PRE_INITIALIZING\n".into()),
        ("GET", "/status") => {
            let status = Status {
                ready,
                redirect: admin.node.mode(),
                capture: admin.node.capture_status(),
                version: env!("CARGO_PKG_VERSION"),
                pods: admin.node.status().await,
            };
            let body = serde_json::to_string_pretty(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            ("200 OK", "application/json", body + "\n")
        }
        ("GET", _) => ("404 Not Found", "text/plain", "paths: /healthz /ready /healthz/ready /status\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    }
}
