//! Envoy's HTTP/1 codec rules that hyper's parser does not share, applied to the downstream byte stream
//! before hyper reads it: malformed request heads get Envoy's local replies (400 `Bad Request`, 501 `Not
//! Implemented` for a transfer-encoding other than chunked) instead of hyper's bodiless 400, a request with
//! both `content-length` and `transfer-encoding` is refused rather than re-framed, and obsolete line folding
//! is joined with a space as Envoy joins it.
//!
//! The stream is followed request by request (heads, then their bodies by `content-length` or chunked
//! framing), so a bad head on a keep-alive connection is answered in order, after the responses to the
//! requests before it: it reaches hyper as a stand-in `connection: close` request whose sequence number
//! tells the connection manager to answer it with the codec's reply. Past an upgrade, a CONNECT, the HTTP/2
//! preface or anything the follower cannot frame, bytes pass through untouched and hyper's own parser
//! (stricter than none) is the only check.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// What the codec refused, answered with Envoy's status and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    BadRequest,
    NotImplemented,
    /// `request_headers_timeout` expired before the head was complete.
    HeaderTimeout,
}

impl CodecError {
    pub fn status(self) -> StatusCode {
        match self {
            CodecError::BadRequest => StatusCode::BAD_REQUEST,
            CodecError::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            CodecError::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CodecError::BadRequest => "Bad Request",
            CodecError::NotImplemented => "Not Implemented",
            CodecError::HeaderTimeout => "request header timeout",
        }
    }
}

/// Shared by the stream and the connection manager's service: which request (by its order on the
/// connection) stands in for a refused head.
#[derive(Default)]
pub struct Refusals {
    refused: OnceLock<(u64, CodecError)>,
    served: AtomicU64,
}

impl Refusals {
    /// Called once per request hyper hands over, in order; the codec's refusal when this is the stand-in.
    pub fn next_request(&self) -> Option<CodecError> {
        let n = self.served.fetch_add(1, Relaxed);
        self.refused.get().filter(|(at, _)| *at == n).map(|(_, e)| *e)
    }
}

/// The stand-in for a refused head: no body, and hyper closes the connection after answering it.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nhost: codec.invalid\r\nconnection: close\r\n\r\n";

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest chunk-size or trailer line followed before the stream is left to hyper.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Auto codec: the first bytes may be the HTTP/2 preface.
    Preface,
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    /// Not followed any more: bytes pass untouched.
    Opaque,
    /// The stand-in was delivered; nothing more is read.
    Refused,
}

/// The connection manager's limits on request heads.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Heads over this many bytes, or with more headers than `max_headers`, are left to hyper's limits.
    pub max_bytes: usize,
    pub max_headers: usize,
    /// `request_headers_timeout`: a head must be complete this long after its first byte, or the
    /// connection is closed.
    pub timeout: Option<Duration>,
}

/// What one step of following makes of the bytes at the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// This many bytes are followed (none when only the framing moved on).
    Advance(usize),
    /// More bytes are needed.
    More,
    /// The head here must be rewritten (folded lines) or refused: done where the bytes are held.
    Hold,
}

/// Where the stream is: the framing of what comes next, and how many request heads passed.
struct Follower {
    framing: Framing,
    heads: u64,
    max_bytes: usize,
    max_headers: usize,
}

impl Follower {
    /// One step over `rest`, the bytes not yet followed.
    fn step(&mut self, rest: &[u8]) -> Step {
        match self.framing {
            Framing::Refused => Step::More,
            _ if rest.is_empty() => Step::More,
            Framing::Opaque => Step::Advance(rest.len()),
            Framing::Preface => {
                if rest.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(rest) {
                    return Step::More;
                }
                self.framing = if rest.starts_with(H2_PREFACE) { Framing::Opaque } else { Framing::Head };
                Step::Advance(0)
            }
            Framing::Head => self.head(rest),
            Framing::Body(n) | Framing::ChunkData(n) => {
                let take = (rest.len() as u64).min(n);
                self.framing = match (self.framing, n - take) {
                    (Framing::Body(_), 0) => Framing::Head,
                    (Framing::Body(_), left) => Framing::Body(left),
                    (_, 0) => Framing::ChunkEnd,
                    (_, left) => Framing::ChunkData(left),
                };
                Step::Advance(take as usize)
            }
            Framing::ChunkSize | Framing::ChunkEnd | Framing::Trailers => {
                let Some((len, text)) = line(rest) else {
                    // A line longer than any framing line: the stream is not followed further.
                    if rest.len() > MAX_LINE {
                        self.framing = Framing::Opaque;
                        return Step::Advance(0);
                    }
                    return Step::More;
                };
                self.framing = match self.framing {
                    Framing::ChunkSize => match chunk_size(text) {
                        Some(0) => Framing::Trailers,
                        Some(n) => Framing::ChunkData(n),
                        None => Framing::Opaque,
                    },
                    Framing::ChunkEnd if text.is_empty() => Framing::ChunkSize,
                    Framing::Trailers if text.is_empty() => Framing::Head,
                    Framing::Trailers => Framing::Trailers,
                    _ => Framing::Opaque,
                };
                Step::Advance(len)
            }
        }
    }

    /// A request head that passes unchanged, once complete; `Hold` for one to rewrite or refuse.
    fn head(&mut self, rest: &[u8]) -> Step {
        // Empty lines before a request line are skipped by hyper and Envoy alike.
        let blank = rest.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
        let Some(end) = head_end(&rest[blank..]) else {
            if rest.len() > self.max_bytes {
                self.framing = Framing::Opaque;
                return Step::Advance(0);
            }
            // Refused at the first byte that cannot start a request, as Envoy's parser refuses it (a TLS
            // handshake sent in plaintext gets its 400 at once, not when a head never completes).
            // Judged by its complete lines (the last may still be continued), or its request line so far.
            let partial = &rest[blank..];
            let partial = partial.iter().rposition(|b| *b == b'\n').map_or(partial, |nl| &partial[..=nl]);
            let possible = partial.is_empty() || could_be_head(unfold(partial).as_deref().unwrap_or(partial), self.max_headers);
            return if possible { Step::More } else { Step::Hold };
        };
        let head = &rest[blank..blank + end];
        if unfold(head).is_some() {
            return Step::Hold;
        }
        match check(head, self.max_headers) {
            Ok(next) => {
                self.heads += 1;
                self.framing = next;
                Step::Advance(blank + end)
            }
            Err(_) => Step::Hold,
        }
    }

    /// The verdict on a held head (complete or not): the head as it goes on, or the codec's refusal.
    fn hold(&mut self, rest: &[u8]) -> Result<(usize, Vec<u8>), CodecError> {
        let blank = rest.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
        let end = head_end(&rest[blank..]).ok_or(CodecError::BadRequest)?;
        let head = &rest[blank..blank + end];
        let unfolded = unfold(head).unwrap_or_else(|| head.to_vec());
        self.framing = check(&unfolded, self.max_headers)?;
        self.heads += 1;
        Ok((blank + end, unfolded))
    }
}

/// The downstream stream as hyper reads it. Bytes are followed where hyper's read put them; only a head
/// split across reads (or one to rewrite) is held in a buffer of the codec's own.
pub struct Http1Codec<IO> {
    io: IO,
    /// Held bytes: the first `checked` are ready for hyper, the rest not yet followed.
    buf: BytesMut,
    checked: usize,
    follower: Follower,
    eof: bool,
    head_timeout: Option<Duration>,
    /// Armed by the first byte of a request head held incomplete, for the head of that number.
    head_deadline: Option<(u64, Pin<Box<Sleep>>)>,
    refusals: Arc<Refusals>,
}

impl<IO> Http1Codec<IO> {
    /// `auto`: the connection may be HTTP/2 with prior knowledge.
    pub fn new(io: IO, auto: bool, limits: HeadLimits, refusals: Arc<Refusals>) -> Self {
        let framing = if auto { Framing::Preface } else { Framing::Head };
        let follower = Follower { framing, heads: 0, max_bytes: limits.max_bytes, max_headers: limits.max_headers };
        Http1Codec { io, buf: BytesMut::new(), checked: 0, follower, eof: false, head_timeout: limits.timeout, head_deadline: None, refusals }
    }

    /// Arms the head timer when a head has begun and is not complete, disarms it otherwise; once it has
    /// expired, the head is refused (true).
    fn poll_head_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.head_timeout else { return false };
        let partial = matches!(self.follower.framing, Framing::Head | Framing::Preface) && self.buf.len() > self.checked;
        let head = self.follower.heads;
        match &mut self.head_deadline {
            _ if !partial => {
                self.head_deadline = None;
                return false;
            }
            Some((armed_for, deadline)) if *armed_for == head => {
                if deadline.as_mut().poll(cx).is_pending() {
                    return false;
                }
            }
            _ => {
                let mut deadline = Box::pin(tokio::time::sleep(timeout));
                let pending = deadline.as_mut().poll(cx).is_pending();
                self.head_deadline = Some((head, deadline));
                if pending {
                    return false;
                }
            }
        }
        self.refuse(CodecError::HeaderTimeout);
        true
    }

    /// Replaces everything from the current head on with the stand-in for `error`.
    fn refuse(&mut self, error: CodecError) {
        let _ = self.refusals.refused.set((self.follower.heads, error));
        self.follower.heads += 1;
        self.buf.truncate(self.checked);
        self.buf.extend_from_slice(STAND_IN);
        self.checked = self.buf.len();
        self.follower.framing = Framing::Refused;
    }

    /// Follows the held bytes as far as they are complete, rewriting or refusing held heads.
    fn follow(&mut self) {
        loop {
            match self.follower.step(&self.buf[self.checked..]) {
                Step::Advance(n) => self.checked += n,
                Step::More => return,
                Step::Hold => match self.follower.hold(&self.buf[self.checked..]) {
                    Ok((len, head)) => {
                        let tail = self.buf.split_off(self.checked + len);
                        self.buf.truncate(self.checked);
                        self.buf.extend_from_slice(&head);
                        self.buf.unsplit(tail);
                        self.checked += head.len();
                    }
                    Err(error) => self.refuse(error),
                },
            }
        }
    }

    /// Follows bytes hyper's read just put at `new`: how many of them pass as they are.
    fn follow_in_place(&mut self, new: &[u8]) -> usize {
        let mut at = 0;
        while let Step::Advance(n) = self.follower.step(&new[at..]) {
            at += n;
        }
        at
    }
}

/// The length of a request head (through its empty line), once it is complete.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(nl) = bytes[at..].iter().position(|b| *b == b'\n') {
        let line = &bytes[at..at + nl];
        at += nl + 1;
        if line.is_empty() || line == b"\r" {
            return Some(at);
        }
    }
    None
}

/// One line (without its line ending) and its length with it.
fn line(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let text = &bytes[..nl];
    Some((nl + 1, text.strip_suffix(b"\r").unwrap_or(text)))
}

/// A chunk size line: hex digits, optionally followed by extensions.
fn chunk_size(text: &[u8]) -> Option<u64> {
    let digits = text.split(|b| *b == b';').next()?;
    let digits = std::str::from_utf8(digits).ok()?.trim_matches([' ', '\t']);
    u64::from_str_radix(digits, 16).ok()
}

/// The head with obsolete line folding (a header line continued on lines starting with a space or tab)
/// joined by single spaces, as Envoy joins it; None when it has none.
fn unfold(head: &[u8]) -> Option<Vec<u8>> {
    let folded = head.windows(2).skip(1).any(|w| w[0] == b'\n' && (w[1] == b' ' || w[1] == b'\t'));
    if !folded {
        return None;
    }
    let mut out = Vec::with_capacity(head.len());
    let mut lines = head.split_inclusive(|b| *b == b'\n');
    out.extend_from_slice(lines.next()?);
    for line in lines {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') && line.iter().any(|b| !b.is_ascii_whitespace()) {
            while out.last().is_some_and(|b| b.is_ascii_whitespace()) {
                out.pop();
            }
            out.push(b' ');
            out.extend(line.iter().skip_while(|b| **b == b' ' || **b == b'\t'));
        } else {
            out.extend_from_slice(line);
        }
    }
    Some(out)
}

/// Whether the start of a head can still become a valid one.
fn could_be_head(partial: &[u8], max_headers: usize) -> bool {
    parsed(partial, max_headers, |status, _| !matches!(status, Err(e) if e != httparse::Error::TooManyHeaders))
}

/// Headers parsed without a heap allocation; a head with more (up to `max_headers`) is parsed again.
const STACK_HEADERS: usize = 64;

/// `f` of the head parsed by httparse, with room for `max_headers` headers.
fn parsed<R>(head: &[u8], max_headers: usize, f: impl Fn(httparse::Result<usize>, &httparse::Request<'_, '_>) -> R) -> R {
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut request = httparse::Request::new(&mut stack[..max_headers.min(STACK_HEADERS)]);
    let status = request.parse(head);
    if max_headers <= STACK_HEADERS || !matches!(status, Err(httparse::Error::TooManyHeaders)) {
        return f(status, &request);
    }
    let mut heap = vec![httparse::EMPTY_HEADER; max_headers];
    let mut request = httparse::Request::new(&mut heap);
    let status = request.parse(head);
    f(status, &request)
}

/// Envoy's verdict on a complete head: how the request's body is framed, or the codec's refusal.
fn check(head: &[u8], max_headers: usize) -> Result<Framing, CodecError> {
    parsed(head, max_headers, framing)
}

/// The framing of a parsed head, or the codec's refusal.
fn framing(status: httparse::Result<usize>, request: &httparse::Request<'_, '_>) -> Result<Framing, CodecError> {
    match status {
        Ok(httparse::Status::Complete(_)) => {}
        // Over the header count limit: left to the connection manager's 431.
        Err(httparse::Error::TooManyHeaders) => return Ok(Framing::Opaque),
        Ok(httparse::Status::Partial) | Err(_) => return Err(CodecError::BadRequest),
    }
    let mut length: Option<&[u8]> = None;
    let mut chunked = false;
    let mut upgrade = request.method == Some("CONNECT");
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Envoy's codec knows one transfer coding.
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(CodecError::NotImplemented);
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let value = h.value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) || length.is_some_and(|l| l != value) {
                return Err(CodecError::BadRequest);
            }
            length = Some(value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if chunked && length.is_some() {
        return Err(CodecError::BadRequest);
    }
    if upgrade {
        return Ok(Framing::Opaque);
    }
    if chunked {
        return Ok(Framing::ChunkSize);
    }
    let length = match length {
        None => 0,
        Some(digits) => std::str::from_utf8(digits).ok().and_then(|d| d.parse::<u64>().ok()).ok_or(CodecError::BadRequest)?,
    };
    Ok(if length == 0 { Framing::Head } else { Framing::Body(length) })
}

impl<IO: AsyncRead + Unpin> AsyncRead for Http1Codec<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.checked > 0 {
                let n = this.checked.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.checked -= n;
                if this.buf.is_empty() {
                    // An idle connection keeps no buffer of its own.
                    this.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.follower.framing == Framing::Refused {
                // Nothing follows the stand-in: hyper answers it and closes (an end of stream here would
                // make hyper drop the connection before answering).
                return Poll::Pending;
            }
            if this.eof {
                // Whatever is left incomplete is hyper's to refuse.
                this.checked = this.buf.len();
                if this.checked == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.buf.is_empty() {
                // Read where hyper wants the bytes, and hold back only what cannot pass yet.
                let before = out.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
                let read = out.filled().len() - before;
                if read == 0 {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                let passed = this.follow_in_place(&out.filled()[before..]);
                if passed == read {
                    return Poll::Ready(Ok(()));
                }
                this.buf.extend_from_slice(&out.filled()[before + passed..]);
                out.set_filled(before + passed);
                this.follow();
                if passed > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.buf.reserve(8192);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf);
            if read.is_pending() && this.poll_head_timer(cx) {
                continue;
            }
            if ready!(read)? == 0 {
                this.eof = true;
            }
            this.follow();
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Http1Codec<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What hyper reads when the client sends `input` in pieces of `piece` bytes, and the refusal recorded.
    async fn through(input: &[u8], piece: usize, auto: bool) -> (String, Option<(u64, CodecError)>) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let refusals = Arc::new(Refusals::default());
        let limits = HeadLimits { max_bytes: 8192, max_headers: 100, timeout: None };
        let mut codec = Http1Codec::new(server, auto, limits, Arc::clone(&refusals));
        for chunk in input.chunks(piece) {
            client.write_all(chunk).await.unwrap();
        }
        drop(client);
        let mut out = Vec::new();
        // A refused stream never ends for hyper: read until nothing more comes.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), codec.read_to_end(&mut out)).await;
        (String::from_utf8_lossy(&out).into_owned(), refusals.refused.get().copied())
    }

    const PIPELINED: &str = "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nGET /bPOST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\ntrailer: t\r\n\r\nGET /d HTTP/1.1\r\nhost: x\r\n\r\n";

    #[tokio::test]
    async fn valid_requests_pass_unchanged_however_they_are_split() {
        for piece in [1, 2, 7, 64, 4096] {
            assert_eq!(through(PIPELINED.as_bytes(), piece, true).await, (PIPELINED.to_string(), None), "pieces of {piece}");
        }
    }

    #[tokio::test]
    async fn a_bad_head_after_good_requests_becomes_the_stand_in_at_its_place() {
        let input = format!("{PIPELINED}GET /e HTTP/1.1\r\nbad header: x\r\n\r\nGET /f HTTP/1.1\r\n\r\n");
        let (out, refused) = through(input.as_bytes(), 3, false).await;
        assert_eq!(out, format!("{PIPELINED}{}", std::str::from_utf8(STAND_IN).unwrap()));
        assert_eq!(refused, Some((3, CodecError::BadRequest)));
    }

    #[tokio::test]
    async fn framing_refusals_are_envoys() {
        let cases: [(&str, CodecError); 5] = [
            ("THIS IS NOT HTTP\r\n\r\n", CodecError::BadRequest),
            ("POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", CodecError::NotImplemented),
            ("POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", CodecError::BadRequest),
            ("POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", CodecError::BadRequest),
            ("POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", CodecError::BadRequest),
        ];
        for (input, error) in cases {
            assert_eq!(through(input.as_bytes(), 5, false).await.1, Some((0, error)), "{input:?}");
        }
        // A TLS ClientHello is refused at its first byte, without waiting for a head that never ends.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let refusals = Arc::new(Refusals::default());
        let limits = HeadLimits { max_bytes: 8192, max_headers: 100, timeout: None };
        let mut codec = Http1Codec::new(server, true, limits, Arc::clone(&refusals));
        client.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).await.unwrap();
        let mut out = vec![0; 4096];
        let n = codec.read(&mut out).await.unwrap();
        assert_eq!((&out[..n], refusals.refused.get().copied()), (STAND_IN, Some((0, CodecError::BadRequest))));
    }

    #[tokio::test]
    async fn folded_header_lines_are_joined_with_a_space() {
        let (out, refused) = through(b"GET / HTTP/1.1\r\nx-folded: one\r\n \t two\r\nhost: x\r\n\r\n", 4, false).await;
        assert_eq!((out.as_str(), refused), ("GET / HTTP/1.1\r\nx-folded: one two\r\nhost: x\r\n\r\n", None));
    }

    #[tokio::test]
    async fn http2_upgrades_and_unframeable_bodies_pass_through() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00bad header: x\r\n\r\n";
        assert_eq!(through(h2, 3, true).await, (String::from_utf8_lossy(h2).into_owned(), None));
        let upgrade = "GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nnot http at all\r\n\r\n";
        assert_eq!(through(upgrade.as_bytes(), 9, false).await, (upgrade.to_string(), None));
        let bad_chunk = "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nbad header: x\r\n\r\n";
        assert_eq!(through(bad_chunk.as_bytes(), 9, false).await, (bad_chunk.to_string(), None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_does_not_complete_in_time_is_refused_with_408() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let refusals = Arc::new(Refusals::default());
        let limits = HeadLimits { max_bytes: 8192, max_headers: 100, timeout: Some(Duration::from_secs(5)) };
        let mut codec = Http1Codec::new(server, false, limits, Arc::clone(&refusals));
        client.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\n").await.unwrap();
        let mut out = vec![0; 4096];
        let n = codec.read(&mut out).await.unwrap();
        assert_eq!(&out[..n], b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n", "a complete head passes at once");
        let start = tokio::time::Instant::now();
        let n = codec.read(&mut out).await.unwrap();
        assert_eq!(&out[..n], STAND_IN);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(refusals.refused.get().copied(), Some((1, CodecError::HeaderTimeout)));
    }
}
