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
