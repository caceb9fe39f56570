//! The unix socket `weft-cni` talks to: one JSON request line, one JSON response line per connection.

pub mod registry;

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use weft_cni::protocol::{Request, Response, MAX_MESSAGE_BYTES};

use crate::node::Node;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound CNI socket. The path is only replaced once the new socket is ready, so during an upgrade the old
/// agent serves until the new one takes over, and no plugin ever sees a missing socket.
pub struct CniSocket {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl CniSocket {
    /// Binds beside `path`, restricts it to root (0600), then renames it into place.
    pub fn bind(path: &Path) -> io::Result<CniSocket> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".weft-cni.sock.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let std_listener = std::os::unix::net::UnixListener::bind(&tmp)
            .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        std_listener.set_nonblocking(true)?;
        let ino = std::fs::metadata(path)?.ino();
        Ok(CniSocket { listener: UnixListener::from_std(std_listener)?, path: path.to_path_buf(), ino })
    }

    /// Serves requests until the task is dropped.
    pub async fn serve(self: Arc<Self>, node: Arc<Node>) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, Arc::clone(&node)));
                }
                Err(e) => {
                    tracing::warn!("CNI socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Removes the socket file if it is still ours (a newer agent may have replaced it).
    pub fn remove_if_ours(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn handle(stream: UnixStream, node: Arc<Node>) {
    let (read, mut write) = stream.into_split();
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(read)).await {
        Err(_) => Response::error("request timed out", "send one JSON request line within 5s"),
        Ok(Err(e)) => Response::error("malformed request", e),
        Ok(Ok(request)) => dispatch(request, &node).await,
    };
    let mut line = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    if let Err(e) = write.write_all(&line).await {
        tracing::debug!("CNI client went away before the response: {e}");
    }
    node.prepare_next_pod();
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut line = Vec::new();
    let limit = MAX_MESSAGE_BYTES as u64 + 1;
    BufReader::new(read.take(limit)).read_until(b'\n', &mut line).await.map_err(|e| e.to_string())?;
    if line.len() as u64 >= limit {
        return Err(format!("request larger than {MAX_MESSAGE_BYTES} bytes"));
    }
    decode_request(&line)
}

/// One request line of the socket protocol.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("not a weft CNI request: {e}"))
}

/// The CNI command a request carries, for the agent's metrics.
fn command(request: &Request) -> &'static str {
    match request {
        Request::Add { .. } => "ADD",
        Request::Del { .. } => "DEL",
        Request::Check { .. } => "CHECK",
        Request::Gc { .. } => "GC",
        Request::Status {} => "STATUS",
    }
}

async fn dispatch(request: Request, node: &Node) -> Response {
    let (command, started) = (command(&request), std::time::Instant::now());
    let result = match request {
        // The pod watcher will pass each pod's plan; until then, every pod gets the default one.
        Request::Add { pod } => node.add(pod, crate::capture::PodCapture::default()).await,
        Request::Del { attachment } => node.del(&attachment).await,
        Request::Check { attachment } => node.check(&attachment).await,
        Request::Gc { valid } => node.gc(&valid).await,
        Request::Status {} => Ok(format!("ready ({} redirection)", node.mode())),
    };
    crate::node_metrics::cni(command, result.is_ok(), started.elapsed());
    tracing::debug!(command, took = ?started.elapsed(), "CNI request served");
    match result {
        Ok(detail) => Response::ok(detail),
        Err(e) => {
            tracing::warn!("CNI request failed: {}: {}", e.msg, e.details);
            Response::error(e.msg, e.details)
        }
    }
}
