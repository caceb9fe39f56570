//! Admin endpoints: a small HTTP/1.1 server (one request per connection, loopback by default) and the two
//! sets of routes it serves: the node agent's (`agent`) and the standalone proxy's Envoy-compatible one
//! (`envoy`); and each captured pod's own health and metrics ports (`pod_ports`, 15020 and 15021).

pub mod agent;
pub mod envoy;
pub mod pod_ports;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 8 * 1024;

/// One admin response.
pub struct Reply {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: impl Into<String>) -> Reply {
        Reply { status: "200 OK", content_type, body: body.into() }
    }

    pub fn json(value: &impl serde::Serialize) -> Reply {
        let body = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        Reply::ok("application/json", body + "\n")
    }

    pub fn status(status: &'static str, body: impl Into<String>) -> Reply {
        Reply { status, content_type: "text/plain", body: body.into() }
    }
}

/// A parsed request line.
pub struct AdminRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
}

impl AdminRequest<'_> {
    /// The value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

pub type ReplyFuture<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

/// A set of admin routes.
pub trait Routes: Send + Sync + 'static {
    fn handle<'a>(&'a self, request: AdminRequest<'a>) -> ReplyFuture<'a>;
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

pub async fn serve(listener: TcpListener, routes: Arc<dyn Routes>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, Arc::clone(&routes)));
            }
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, routes: Arc<dyn Routes>) {
    let Ok(Ok(head)) = tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream)).await else { return };
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let reply = routes.handle(AdminRequest { method, path, query }).await;
    let text = format!(
        "HTTP/1.1 {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.body
    );
    let _ = stream.write_all(text.as_bytes()).await;
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

/// `/logging`, the same on both admin endpoints: shows the level, `POST ?level=L` changes it.
fn logging(method: &str, request: &AdminRequest<'_>) -> Reply {
    let (status, body) = crate::logging::admin(method, request.param("level"));
    Reply::status(status, body)
}
