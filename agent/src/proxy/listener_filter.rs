//! Listener filters that look at a connection's first bytes before a filter chain is chosen: the
//! tls_inspector (TLS ClientHello: SNI and ALPN) and the http_inspector (HTTP/1.x request line or the HTTP/2
//! preface). The bytes read are replayed to whatever serves the connection ([`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::listener::ListenerFilters;

/// What the listener filters detected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detected {
    pub tls: bool,
    pub server_name: Option<String>,
    pub application_protocols: Vec<String>,
}

impl Detected {
    pub fn transport_protocol(&self) -> &'static str {
        if self.tls {
            "tls"
        } else {
            "raw_buffer"
        }
    }
}

/// Why inspection gave up on the connection.
#[derive(Debug)]
pub enum InspectError {
    /// `listener_filters_timeout` passed without a verdict (and the listener does not continue on timeout).
    Timeout,
    /// The peer closed (or half-closed) before the filters were done: Envoy closes such connections.
    PeerClosed,
    Io(io::Error),
}

impl From<io::Error> for InspectError {
    fn from(e: io::Error) -> Self {
        InspectError::Io(e)
    }
}

/// A connection whose first bytes were read by the listener filters; reads return them first.
pub struct Rewind {
    prefix: Bytes,
    stream: TcpStream,
}

impl Rewind {
    pub fn new(stream: TcpStream) -> Rewind {
        Rewind { prefix: Bytes::new(), stream }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The most the inspectors read: a ClientHello record (16 KiB + header) or an HTTP request line.
const MAX_INSPECT: usize = 16 * 1024 + 5;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Runs the configured inspectors. Without any, the connection is not read at all.
pub async fn inspect(stream: TcpStream, filters: &ListenerFilters) -> Result<(Rewind, Detected), InspectError> {
    let mut rewind = Rewind::new(stream);
    if !filters.tls_inspector && !filters.http_inspector {
        return Ok((rewind, Detected::default()));
    }
    let mut buf = BytesMut::with_capacity(1024);
    let reading = async {
        loop {
            if let Some(detected) = verdict(&buf, filters, false) {
                return Ok(detected);
            }
            if rewind.stream.read_buf(&mut buf).await? == 0 {
                return Err(InspectError::PeerClosed);
            }
            if buf.len() >= MAX_INSPECT {
                return Ok(verdict(&buf, filters, true).unwrap_or_default());
            }
        }
    };
    let outcome = if filters.timeout.is_zero() {
        Ok(reading.await)
    } else {
        tokio::time::timeout(filters.timeout, reading).await
    };
    let detected = match outcome {
        Ok(result) => result?,
        Err(_) if filters.continue_on_timeout => verdict(&buf, filters, true).unwrap_or_default(),
        Err(_) => return Err(InspectError::Timeout),
    };
    // A FIN that came with the inspected bytes counts as closing during inspection too. Whatever else
    // already arrived is kept for replay (bounded: a fast sender must not grow it without end).
    while buf.len() < 2 * MAX_INSPECT {
        match rewind.stream.try_read_buf(&mut buf) {
            Ok(0) => return Err(InspectError::PeerClosed),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(InspectError::Io(e)),
        }
    }
    rewind.prefix = buf.freeze();
    Ok((rewind, detected))
}

/// What the bytes so far say, or `None` when more are needed (`done`: no more will come).
fn verdict(data: &[u8], filters: &ListenerFilters, done: bool) -> Option<Detected> {
    if data.is_empty() && !done {
        return None;
    }
    if filters.tls_inspector && data.first() == Some(&0x16) {
        return match client_hello(data) {
            Hello::Incomplete if !done => None,
            Hello::Parsed(detected) => Some(detected),
            Hello::Incomplete | Hello::NotTls => Some(Detected { tls: true, ..Default::default() }),
        };
    }
    if !filters.http_inspector {
        return Some(Detected::default());
    }
    let protocol = http_protocol(data);
    match protocol {
        Http::NeedMore if !done => None,
        Http::Detected(p) => Some(Detected { application_protocols: vec![p.to_string()], ..Default::default() }),
        Http::NeedMore | Http::Other => Some(Detected::default()),
    }
}

/// What the HTTP inspector makes of a connection's first bytes.
pub enum Http {
    NeedMore,
    Other,
    Detected(&'static str),
}

/// HTTP/2 prior knowledge (`h2c`) or an HTTP/1.x request line, as Envoy's http_inspector decides.
pub fn http_protocol(data: &[u8]) -> Http {
    let n = data.len().min(H2_PREFACE.len());
    if data[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Http::Detected("h2c") } else { Http::NeedMore };
    }
    let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
        // A request line may be long, but not longer than what we read, nor contain a control character.
        let plausible = data.iter().all(|b| *b == b'\r' || !b.is_ascii_control()) && data.len() < MAX_INSPECT;
        return if plausible { Http::NeedMore } else { Http::Other };
    };
    let line = &data[..end];
    let mut parts = line.split(|b| *b == b' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let token = |s: &[u8]| !s.is_empty() && s.iter().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b));
    match (method, target, version, parts.next()) {
        (Some(m), Some(t), Some(b"HTTP/1.1" | b"HTTP/1.0"), None) if token(m) && !t.is_empty() => {
            Http::Detected(if version == Some(b"HTTP/1.0") { "http/1.0" } else { "http/1.1" })
        }
        _ => Http::Other,
    }
}

enum Hello {
    Incomplete,
    NotTls,
    Parsed(Detected),
}

/// Parses the ClientHello in the first TLS record for SNI (extension 0) and ALPN (extension 16).
fn client_hello(data: &[u8]) -> Hello {
    let Some(header) = data.get(..5) else { return Hello::Incomplete };
    if header[1] != 3 {
        return Hello::NotTls;
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let Some(record) = data.get(5..5 + len) else { return Hello::Incomplete };
    parse_hello(record).map_or(Hello::NotTls, Hello::Parsed)
}

/// A cursor over a ClientHello; every read is bounds-checked (the bytes come from anyone).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A length-prefixed vector (`width` = 1 or 2 length bytes).
    fn vec(&mut self, width: usize) -> Option<Reader<'a>> {
        let len = if width == 1 { self.u8()? } else { self.u16()? };
        self.take(len).map(Reader)
    }
}

pub fn parse_hello(record: &[u8]) -> Option<Detected> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let body_len = r.take(3).map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))?;
    let mut body = Reader(r.0.get(..body_len).unwrap_or(r.0));
    body.take(2 + 32)?; // legacy_version, random
    body.vec(1)?; // session id
    body.vec(2)?; // cipher suites
    body.vec(1)?; // compression methods
    let mut detected = Detected { tls: true, ..Default::default() };
    let Some(mut extensions) = body.vec(2) else { return Some(detected) };
    while let (Some(kind), Some(mut data)) = (extensions.u16(), extensions.vec(2)) {
        match kind {
            0 => {
                let mut names = data.vec(2)?;
                while let Some(name_type) = names.u8() {
                    let name = names.vec(2)?;
                    if name_type == 0 {
                        detected.server_name = std::str::from_utf8(name.0).ok().map(str::to_ascii_lowercase);
                    }
                }
            }
            16 => {
                let mut protocols = data.vec(2)?;
                while let Some(p) = protocols.vec(1) {
                    detected.application_protocols.push(String::from_utf8_lossy(p.0).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(detected)
}

/// A minimal ClientHello record with SNI and ALPN, as a TLS client's first flight starts. For tests and
/// benchmarks that exercise the tls_inspector without a TLS stack.
#[doc(hidden)]
pub fn client_hello_record(sni: &str, alpn: &[&str]) -> Vec<u8> {
    let mut ext = Vec::new();
    let name = sni.as_bytes();
    let sni_list_len = 3 + name.len();
    ext.extend_from_slice(&0u16.to_be_bytes());
    ext.extend_from_slice(&((sni_list_len + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(sni_list_len as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    let protocols: Vec<u8> = alpn.iter().flat_map(|p| std::iter::once(p.len() as u8).chain(p.bytes())).collect();
    ext.extend_from_slice(&16u16.to_be_bytes());
    ext.extend_from_slice(&((protocols.len() + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(protocols.len() as u16).to_be_bytes());
    ext.extend_from_slice(&protocols);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut handshake = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1, (handshake.len() >> 8) as u8, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> ListenerFilters {
        ListenerFilters { tls_inspector: true, http_inspector: true, ..ListenerFilters::none() }
    }

    #[test]
    fn client_hello_gives_sni_and_alpn_and_needs_the_whole_record() {
        let hello = client_hello_record("API.example.com", &["h2", "http/1.1"]);
        let d = verdict(&hello, &both(), false).unwrap();
        assert_eq!(d, Detected { tls: true, server_name: Some("api.example.com".into()), application_protocols: vec!["h2".into(), "http/1.1".into()] });
        assert_eq!(verdict(&hello[..hello.len() - 1], &both(), false), None);
        // Truncated or corrupted hellos never panic; they count as TLS without details.
        for n in 1..hello.len() {
            assert_eq!(verdict(&hello[..n], &both(), true).map(|d| d.tls), Some(true));
            let mut corrupt = hello.clone();
            corrupt[n] = 0xff;
            assert!(verdict(&corrupt, &both(), true).is_some());
        }
    }

    #[test]
    fn http_inspector_detects_request_lines_and_the_h2_preface() {
        let f = both();
        let alpn = |d: &[u8], done| verdict(d, &f, done).map(|d| d.application_protocols);
        assert_eq!(alpn(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", false), Some(vec!["http/1.1".to_string()]));
        assert_eq!(alpn(b"GET /x HTTP/1.0\r\n", false), Some(vec!["http/1.0".to_string()]));
        assert_eq!(alpn(H2_PREFACE, false), Some(vec!["h2c".to_string()]));
        assert_eq!(alpn(b"PRI * HT", false), None, "a partial preface waits for more");
        assert_eq!(alpn(b"GET /x HT", false), None);
        assert_eq!(alpn(b"\x00\x01binary", false), Some(vec![]));
        assert_eq!(alpn(b"SSH-2.0-OpenSSH\r\n", false), Some(vec![]));
    }
}
