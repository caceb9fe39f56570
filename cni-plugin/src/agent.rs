//! The plugin's side of the agent socket: one request line out, one response line back, all within a deadline.
//!
//! Blocking std I/O on purpose: one exchange per process, and the plugin must start fast and stay small.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::protocol::{Request, Response, MAX_MESSAGE_BYTES};

/// Why an exchange with the agent failed.
#[derive(Debug)]
pub struct AgentError {
    pub socket: PathBuf,
    pub timeout: Duration,
    pub kind: AgentErrorKind,
}

#[derive(Debug)]
pub enum AgentErrorKind {
    /// connect() failed: no socket file, nobody listening, permissions.
    Connect(io::Error),
    /// The deadline passed; `stage` says during what.
    Timeout { stage: &'static str },
    /// The connection broke or closed mid-exchange (agent restarting or crashed).
    Broken { stage: &'static str, error: Option<io::Error> },
    /// The request would exceed what the agent accepts.
    RequestTooLarge(usize),
    /// The agent answered something that is not one `Response` line.
    Malformed(String),
}

impl AgentError {
    /// Transient failures: the agent is absent, restarting or overloaded, so retrying later can succeed.
    pub fn is_unreachable(&self) -> bool {
        matches!(self.kind, AgentErrorKind::Connect(_) | AgentErrorKind::Timeout { .. } | AgentErrorKind::Broken { .. })
    }

    /// One-line summary for the CNI error's `msg`.
    pub fn msg(&self) -> String {
        let socket = self.socket.display();
        match &self.kind {
            AgentErrorKind::Connect(_) => format!("weft agent unreachable at {socket}"),
            AgentErrorKind::Timeout { .. } => {
                format!("weft agent at {socket} did not answer within {} ms", self.timeout.as_millis())
            }
            AgentErrorKind::Broken { .. } => format!("weft agent at {socket} closed the connection"),
            AgentErrorKind::RequestTooLarge(_) => "request too large for the weft agent".to_owned(),
            AgentErrorKind::Malformed(_) => format!("weft agent at {socket} sent a malformed response"),
        }
    }

    /// What happened underneath, for the CNI error's `details`.
    pub fn cause(&self) -> String {
        match &self.kind {
            AgentErrorKind::Connect(e) => format!("connect: {e}"),
            AgentErrorKind::Timeout { stage } => format!("timed out while {stage} (timeout_ms in the CNI config)"),
            AgentErrorKind::Broken { stage, error: Some(e) } => format!("{stage}: {e}"),
            AgentErrorKind::Broken { stage, error: None } => format!("{stage}: the agent closed the connection"),
            AgentErrorKind::RequestTooLarge(n) => {
                format!("the request is {n} bytes and the agent accepts at most {MAX_MESSAGE_BYTES}")
            }
            AgentErrorKind::Malformed(why) => why.clone(),
        }
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.msg(), self.cause())
    }
}

impl std::error::Error for AgentError {}

/// Sends `request` to the agent at `socket` and returns its answer, all within `timeout`.
pub fn exchange(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, AgentError> {
    let fail = |kind| AgentError { socket: socket.to_path_buf(), timeout, kind };
    let deadline = Instant::now() + timeout;

    let mut line = serde_json::to_vec(request)
        .map_err(|e| fail(AgentErrorKind::Malformed(format!("cannot encode the request: {e}"))))?;
    line.push(b'\n');
    if line.len() > MAX_MESSAGE_BYTES {
        return Err(fail(AgentErrorKind::RequestTooLarge(line.len())));
    }

    let mut stream = connect(socket, deadline).map_err(fail)?;
    write_line(&mut stream, &line, deadline).map_err(fail)?;
    let answer = read_line(&mut stream, deadline).map_err(fail)?;
    serde_json::from_slice(&answer)
        .map_err(|e| fail(AgentErrorKind::Malformed(format!("{e}; the response began with {:?}", preview(&answer)))))
}

fn remaining(deadline: Instant, stage: &'static str) -> Result<Duration, AgentErrorKind> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or(AgentErrorKind::Timeout { stage })
}

/// A non-blocking connect: `UnixStream::connect` has no timeout and blocks while the listener's backlog is full
/// (an agent that stopped accepting). A Unix socket reports a full backlog as EAGAIN at once and cannot be
/// polled for room, so that case is retried with a growing pause until the deadline; the usual case costs one
/// connect(2) and no thread.
fn connect(socket: &Path, deadline: Instant) -> Result<UnixStream, AgentErrorKind> {
    let stage = "connecting";
    let address = SockAddr::unix(socket).map_err(AgentErrorKind::Connect)?;
    let client = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).map_err(AgentErrorKind::Connect)?;
    let mut pause = Duration::from_millis(1);
    loop {
        match client.connect(&address) {
            Ok(()) => break,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(pause.min(remaining(deadline, stage)?));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(AgentErrorKind::Connect(e)),
        }
    }
    client.set_nonblocking(false).map_err(AgentErrorKind::Connect)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(client)))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn write_line(stream: &mut UnixStream, mut buf: &[u8], deadline: Instant) -> Result<(), AgentErrorKind> {
    let stage = "sending the request";
    while !buf.is_empty() {
        let wait = remaining(deadline, stage)?;
        stream.set_write_timeout(Some(wait)).map_err(|e| AgentErrorKind::Broken { stage, error: Some(e) })?;
        match stream.write(buf) {
            Ok(0) => return Err(AgentErrorKind::Broken { stage, error: None }),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(AgentErrorKind::Timeout { stage }),
            Err(e) => return Err(AgentErrorKind::Broken { stage, error: Some(e) }),
        }
    }
    Ok(())
}

/// Reads up to the first `\n` (excluded). A final line without `\n` before EOF is accepted; nothing at all is a
/// broken exchange; more than [`MAX_MESSAGE_BYTES`] without a newline is malformed.
fn read_line(stream: &mut UnixStream, deadline: Instant) -> Result<Vec<u8>, AgentErrorKind> {
    let stage = "waiting for the response";
    let mut line = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        let wait = remaining(deadline, stage)?;
        stream.set_read_timeout(Some(wait)).map_err(|e| AgentErrorKind::Broken { stage, error: Some(e) })?;
        match stream.read(&mut chunk) {
            Ok(0) if line.is_empty() => return Err(AgentErrorKind::Broken { stage, error: None }),
            Ok(0) => return Ok(line),
            Ok(n) => {
                let new = &chunk[..n];
                if let Some(pos) = new.iter().position(|b| *b == b'\n') {
                    line.extend_from_slice(&new[..pos]);
                    return Ok(line);
                }
                line.extend_from_slice(new);
                if line.len() > MAX_MESSAGE_BYTES {
                    return Err(AgentErrorKind::Malformed(format!(
                        "no end of line within {MAX_MESSAGE_BYTES} bytes; the response began with {:?}",
                        preview(&line)
                    )));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(AgentErrorKind::Timeout { stage }),
            Err(e) => return Err(AgentErrorKind::Broken { stage, error: Some(e) }),
        }
    }
}

fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]);
    if bytes.len() > 120 {
        format!("{text}...")
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn temp_socket(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-cni-agent-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("a.sock")
    }

    /// A one-shot agent that reads one line and answers `answer` (raw bytes).
    fn serve_once(path: &Path, answer: &'static [u8]) -> thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = io::BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            reader.get_mut().write_all(answer).unwrap();
            line
        })
    }

    #[test]
    fn round_trip() {
        let path = temp_socket("ok");
        let agent = serve_once(&path, b"{\"result\":\"ok\",\"detail\":\"ready\"}\n");
        let resp = exchange(&path, &Request::Status {}, Duration::from_secs(5)).unwrap();
        assert_eq!(resp, Response::ok("ready"));
        assert_eq!(agent.join().unwrap(), "{\"op\":\"status\"}\n");
    }

    #[test]
    fn missing_socket_is_unreachable() {
        let path = temp_socket("missing");
        let err = exchange(&path, &Request::Status {}, Duration::from_secs(1)).unwrap_err();
        assert!(err.is_unreachable());
        assert!(err.msg().starts_with("weft agent unreachable at"), "{err}");
        assert!(err.cause().contains("No such file"), "{err}");
    }

    #[test]
    fn malformed_answer_is_not_unreachable() {
        let path = temp_socket("bad");
        let _agent = serve_once(&path, b"hello\n");
        let err = exchange(&path, &Request::Status {}, Duration::from_secs(5)).unwrap_err();
        assert!(!err.is_unreachable());
        assert!(err.cause().contains("hello"), "{err}");
    }

    #[test]
    fn full_backlog_times_out_while_connecting() {
        let path = temp_socket("full");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        // Never accepted: these fill the backlog (Linux admits backlog + 1).
        let mut waiting = Vec::new();
        while let Ok(c) = connect(&path, Instant::now() + Duration::from_millis(20)) {
            waiting.push(c);
        }
        assert!(!waiting.is_empty());
        let err = exchange(&path, &Request::Status {}, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err.kind, AgentErrorKind::Timeout { stage: "connecting" }), "{err}");
        assert!(err.is_unreachable(), "a runtime retries an agent that does not accept");
    }

    #[test]
    fn silent_agent_times_out() {
        let path = temp_socket("silent");
        let listener = UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let err = exchange(&path, &Request::Status {}, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err.kind, AgentErrorKind::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
        drop(listener);
    }
}
