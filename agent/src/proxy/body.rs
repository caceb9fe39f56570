//! The body type every HTTP message of the data path carries, whatever produced it (a downstream or upstream
//! connection of either HTTP version, a buffered body for retries, a local reply).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Frame, SizeHint};

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// Told when a response body ends, or is dropped before its end (the stream was reset): Istio's metrics and
/// access logs record streams here.
pub trait StreamEnd: Send + Sync {
    /// The response's trailers, when it has some.
    fn trailers(&mut self, _trailers: &hyper::HeaderMap) {}
    /// `body_bytes`: the data bytes that went out; `complete`: whether the body reached its end.
    fn ended(self: Box<Self>, body_bytes: u64, complete: bool);
}

/// `response` with its body's end told to `observers` (unchanged without any).
pub fn observed(response: hyper::Response<Body>, observers: Vec<Box<dyn StreamEnd>>) -> hyper::Response<Body> {
    if observers.is_empty() {
        return response;
    }
    response.map(|body| Observed { body, observers, sent: 0, complete: false }.boxed())
}

struct Observed {
    body: Body,
    observers: Vec<Box<dyn StreamEnd>>,
    sent: u64,
    complete: bool,
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref() {
                    self.observers.iter_mut().for_each(|o| o.trailers(trailers));
                }
            }
            Poll::Ready(None) => self.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let complete = self.complete || hyper::body::Body::is_end_stream(&self.body);
        for observer in self.observers.drain(..) {
            observer.ended(self.sent, complete);
        }
    }
}

/// A request body read for a retry or a mirror to send again.
pub enum Kept {
    /// It ended within the limit: every attempt sends these bytes.
    Whole(Bytes),
    /// It is longer than the limit: what was read goes first, the rest as it comes, and it can be sent once.
    TooLarge(Body),
}

/// Reads `body` to its end if it fits in `limit` bytes (Envoy's decoder buffer limit); a longer one is given
/// back whole for one attempt, as Envoy then gives up retrying and mirroring instead of failing the request.
/// Request trailers are dropped, as they were when the whole body was collected.
pub async fn keep(mut body: Body, limit: usize) -> Result<Kept, hyper::Error> {
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        if read.len() + data.len() > limit {
            read.extend_from_slice(&data);
            return Ok(Kept::TooLarge(Prefixed { front: Some(read.freeze()), rest: body }.boxed()));
        }
        read.extend_from_slice(&data);
    }
    Ok(Kept::Whole(read.freeze()))
}

/// `front`, then the rest of a body.
struct Prefixed {
    front: Option<Bytes>,
    rest: Body,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.front.take() {
            Some(front) => Poll::Ready(Some(Ok(Frame::data(front)))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.front.is_none() && self.rest.is_end_stream()
    }
}

/// A request body that can be sent again: each attempt's body replays what earlier attempts read, then goes
/// on reading the request as it comes. Nothing waits for the body to be buffered (a lock-step gRPC stream keeps
/// moving, as through Envoy); what was read is kept up to `limit` bytes (Envoy's decoder buffer limit), and
/// past it nothing is kept and no other attempt can be made (Envoy's `retry_or_shadow_abandoned`).
pub struct Replayable {
    source: Arc<Mutex<Source>>,
}

struct Source {
    body: Body,
    limit: usize,
    /// The data read so far, in the frames it came in, while it fits the limit.
    kept: Vec<Bytes>,
    kept_len: usize,
    overflowed: bool,
    /// The request's trailers, once read.
    trailers: Option<hyper::HeaderMap>,
    ended: bool,
    /// The newest attempt: an older attempt's body sends nothing more (its request was given up).
    attempt: u64,
    size: SizeHint,
}

impl Replayable {
    pub fn new(body: Body, limit: usize) -> Replayable {
        let size = hyper::body::Body::size_hint(&body);
        let source = Source { body, limit, kept: Vec::new(), kept_len: 0, overflowed: false, trailers: None, ended: false, attempt: 0, size };
        Replayable { source: Arc::new(Mutex::new(source)) }
    }

    /// Whether another attempt can send the request whole.
    pub fn can_replay(&self) -> bool {
        !lock(&self.source).overflowed
    }

    /// The body of a new attempt, from its first byte.
    pub fn attempt(&self) -> Body {
        let attempt = {
            let mut source = lock(&self.source);
            source.attempt += 1;
            source.attempt
        };
        Replay { source: Arc::clone(&self.source), attempt, next: 0, trailers_sent: false }.boxed()
    }
}

fn lock(source: &Mutex<Source>) -> std::sync::MutexGuard<'_, Source> {
    source.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One attempt's view of a [`Replayable`]: `next` is the kept frame it sends next.
struct Replay {
    source: Arc<Mutex<Source>>,
    attempt: u64,
    next: usize,
    trailers_sent: bool,
}

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let source = Arc::clone(&self.source);
        let mut source = lock(&source);
        if source.attempt != self.attempt {
            // Given up. Never an end: the upstream must not take a cut-off body for the whole request.
            return Poll::Pending;
        }
        if !source.overflowed && self.next < source.kept.len() {
            self.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(source.kept[self.next - 1].clone()))));
        }
        if source.ended {
            return match (source.trailers.clone(), self.trailers_sent) {
                (Some(trailers), false) => {
                    self.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                _ => Poll::Ready(None),
            };
        }
        let polled = ready!(Pin::new(&mut source.body).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    source.keep(data.clone());
                    self.next = source.kept.len();
                }
                if let Some(trailers) = frame.trailers_ref() {
                    source.trailers = Some(trailers.clone());
                    self.trailers_sent = true;
                }
            }
            None => source.ended = true,
            Some(Err(_)) => {}
        }
        Poll::Ready(polled)
    }

    fn size_hint(&self) -> SizeHint {
        // Every attempt sends the whole body.
        lock(&self.source).size.clone()
    }
}

impl Source {
    fn keep(&mut self, data: Bytes) {
        if self.overflowed {
            return;
        }
        if self.kept_len + data.len() > self.limit {
            self.overflowed = true;
            self.kept = Vec::new();
            return;
        }
        self.kept_len += data.len();
        self.kept.push(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(chunks: &[&'static [u8]]) -> Body {
        let frames = chunks.iter().map(|c| Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(c)))).collect::<Vec<_>>();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_kept_whole_and_a_longer_one_comes_back_unchanged() {
        match keep(chunked(&[b"abc", b"def"]), 6).await.unwrap() {
            Kept::Whole(bytes) => assert_eq!(&bytes[..], b"abcdef"),
            Kept::TooLarge(_) => panic!("6 bytes fit a limit of 6"),
        }
        let Kept::TooLarge(body) = keep(chunked(&[b"abc", b"def", b"ghi"]), 5).await.unwrap() else { panic!("9 bytes over a limit of 5") };
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abcdefghi", "nothing lost, nothing reordered");
    }

    #[tokio::test]
    async fn a_replayable_body_streams_at_once_and_a_new_attempt_replays_what_was_read() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, hyper::Error>>();
        let source = http_body_util::StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).boxed();
        let replayable = Replayable::new(source, 10);
        let mut first = replayable.attempt();
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc")))).unwrap();
        // The first frame goes on before the request ends: nothing waits to be buffered.
        assert_eq!(first.frame().await.unwrap().unwrap().into_data().unwrap(), "abc");
        // A retry: the first attempt's body sends nothing more (and never ends: its upstream must not take
        // "abc" for the whole request); the new one replays "abc" and goes on with the rest.
        let second = replayable.attempt();
        let stalled = tokio::time::timeout(std::time::Duration::from_millis(50), first.frame()).await;
        assert!(stalled.is_err(), "a given-up attempt's body must not end or go on: {stalled:?}");
        tx.send(Ok(Frame::data(Bytes::from_static(b"def")))).unwrap();
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        tx.send(Ok(Frame::trailers(trailers))).unwrap();
        drop(tx);
        let collected = second.collect().await.unwrap();
        assert_eq!(collected.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.to_str().unwrap()), Some("0"));
        assert_eq!(&collected.to_bytes()[..], b"abcdef");
        assert!(replayable.can_replay());
        assert_eq!(&replayable.attempt().collect().await.unwrap().to_bytes()[..], b"abcdef", "a third attempt, all kept");
    }

    #[tokio::test]
    async fn past_the_limit_a_replayable_body_keeps_nothing_and_cannot_be_sent_again() {
        let replayable = Replayable::new(chunked(&[b"abcdef", b"ghijkl"]), 10);
        assert_eq!(&replayable.attempt().collect().await.unwrap().to_bytes()[..], b"abcdefghijkl");
        assert!(!replayable.can_replay());
    }
}
