//! The body type every HTTP message of the data path carries, whatever produced it (a downstream or upstream
//! connection of either HTTP version, a buffered body for retries, a local reply).

use std::pin::Pin;
use std::task::{Context, Poll};

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
}
