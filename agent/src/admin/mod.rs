//! Admin endpoints: an HTTP/1.1 server on hyper (keep-alive, a request head within 5 s, loopback by default)
//! and the two sets of routes it serves: the node agent's (`agent`) and the standalone proxy's
//! Envoy-compatible one (`envoy`); and each captured pod's own health and metrics ports (`pod_ports`, 15020
//! and 15021).

pub mod agent;
pub mod envoy;
pub mod pod_ports;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

/// How long a client may take to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read (hyper's smallest buffer).
const MAX_HEAD: usize = 8 * 1024;

/// One admin response.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: impl Into<String>) -> Reply {
        Reply { status: StatusCode::OK, content_type, body: body.into() }
    }

    pub fn json(value: &impl serde::Serialize) -> Reply {
        let body = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        Reply::ok("application/json", body + "\n")
    }

    pub fn status(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply { status, content_type: "text/plain", body: body.into() }
    }
}

/// A request: its method, its path percent-decoded, and its query string.
pub struct AdminRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
}

impl AdminRequest<'_> {
    /// The value of query parameter `name`, percent-decoded (`+` is a space), if present.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
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
                tokio::spawn(connection(stream, Arc::clone(&routes)));
            }
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One client connection, kept alive between requests.
async fn connection(stream: TcpStream, routes: Arc<dyn Routes>) {
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let routes = Arc::clone(&routes);
        async move { Ok::<_, std::convert::Infallible>(respond(&*routes, &req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEAD);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!("admin connection ended: {e}");
    }
}

async fn respond<B>(routes: &dyn Routes, req: &hyper::Request<B>) -> Response<Full<Bytes>> {
    let path = percent_decoded(req.uri().path());
    let request = AdminRequest { method: req.method().as_str(), path: &path, query: req.uri().query().unwrap_or_default() };
    let reply = routes.handle(request).await;
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = reply.status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    response
}

/// A path with its `%XX` escapes decoded (a path that does not decode to UTF-8 is left as it is).
fn percent_decoded(path: &str) -> String {
    percent_encoding::percent_decode_str(path).decode_utf8().map_or_else(|_| path.to_string(), |p| p.into_owned())
}

/// `/logging`, the same on both admin endpoints: shows the level, `POST ?level=L` changes it.
fn logging(method: &str, request: &AdminRequest<'_>) -> Reply {
    let (status, body) = crate::logging::admin(method, request.param("level").as_deref());
    Reply::status(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers with what it was asked: method, decoded path, the `name` parameter; 404 for `/missing`.
    struct Echo;

    impl Routes for Echo {
        fn handle<'a>(&'a self, request: AdminRequest<'a>) -> ReplyFuture<'a> {
            Box::pin(async move {
                let text = format!("{} {} {:?}", request.method, request.path, request.param("name"));
                match request.path {
                    "/missing" => Reply::status(StatusCode::NOT_FOUND, text),
                    _ => Reply::ok("text/plain", text),
                }
            })
        }
    }

    #[tokio::test]
    async fn requests_are_served_on_one_kept_alive_connection_with_decoded_paths_and_queries() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(Echo)));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET /pods/shop/web%2D1/config_dump?name=a%20b+c HTTP/1.1\r\nhost: admin\r\n\r\n").await.unwrap();
        client.write_all(b"POST /missing HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut answer)).await.unwrap().unwrap();
        let first = answer.find("HTTP/1.1 200 OK").expect("the first request answered");
        let second = answer.find("HTTP/1.1 404 Not Found").expect("the second, on the same connection");
        assert!(first < second, "{answer}");
        assert!(answer.contains("GET /pods/shop/web-1/config_dump Some(\"a b c\")"), "{answer}");
        assert!(answer.contains("POST /missing None"), "{answer}");
    }
}
