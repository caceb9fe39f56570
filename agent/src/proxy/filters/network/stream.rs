//! The timers of one HTTP stream, as Envoy's connection manager keeps them for each active stream:
//! `stream_idle_timeout` (or the route's `idle_timeout`), re-armed by every request and response body
//! frame; `request_timeout`, until the request has been received completely; and the stream's maximum
//! duration (the connection manager's `max_stream_duration`, the route's, or a gRPC request's own
//! `grpc-timeout` under `grpc_timeout_header_max`). Before the response starts, an expired timer becomes
//! a local reply; after, it resets the stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::HeaderMap;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::config::route::{StreamDuration, TimerOverride};

/// Which timer ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Idle,
    Request,
    Duration,
}

#[derive(Debug)]
struct Timers {
    idle: Option<Duration>,
    last_activity: Instant,
    /// Since the stream started; `None`: unlimited.
    duration: Option<Duration>,
}

/// One stream's timers, shared by the connection manager and the request and response bodies.
pub struct StreamTimers {
    started: Instant,
    request_timeout: Option<Duration>,
    request_complete: AtomicBool,
    timers: Mutex<Timers>,
    /// The route changed the timers.
    changed: Notify,
}

impl StreamTimers {
    pub fn new(idle: Option<Duration>, request_timeout: Option<Duration>, duration: Option<Duration>, request_complete: bool) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(StreamTimers {
            started: now,
            request_timeout,
            request_complete: AtomicBool::new(request_complete),
            timers: Mutex::new(Timers { idle, last_activity: now, duration }),
            changed: Notify::new(),
        })
    }

    fn timers(&self) -> std::sync::MutexGuard<'_, Timers> {
        self.timers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Data moved in either direction: the idle timer starts over.
    fn touch(&self) {
        self.timers().last_activity = Instant::now();
    }

    pub fn request_complete(&self) -> bool {
        self.request_complete.load(Relaxed)
    }

    /// The chosen route's timers, as Envoy refreshes them on route selection. Its `idle_timeout` replaces
    /// the connection manager's. The stream's duration is, for a request carrying `grpc-timeout` when the
    /// route sets `grpc_timeout_header_max`, that deadline (capped, less the offset); else the route's
    /// `max_stream_duration` (`0s`: none); else the connection manager's. A gRPC request on a route with
    /// `max_stream_duration` carries the resulting limit upstream as its `grpc-timeout` (or none once a
    /// running limit was lifted).
    pub fn route(&self, idle: Option<TimerOverride>, duration: Option<&StreamDuration>, hcm_duration: Option<Duration>, request: &mut HeaderMap) {
        let asked = super::super::super::route::grpc_timeout(request);
        let limit = match (duration.and_then(|d| d.grpc_header), asked) {
            (Some(cap), Some(asked)) => {
                let capped = if !cap.max.is_zero() && asked > cap.max { cap.max } else { asked };
                Some(if capped.is_zero() || cap.offset < capped { capped.saturating_sub(cap.offset) } else { Duration::ZERO })
            }
            _ => match duration.and_then(|d| d.max) {
                Some(TimerOverride::Disabled) => None,
                Some(TimerOverride::After(d)) => Some(d),
                None => hcm_duration,
            },
        };
        let mut timers = self.timers();
        match idle {
            Some(TimerOverride::Disabled) => timers.idle = None,
            Some(TimerOverride::After(d)) => timers.idle = Some(d),
            None => {}
        }
        if idle.is_some() {
            timers.last_activity = Instant::now();
        }
        let was_armed = timers.duration.is_some();
        timers.duration = limit;
        drop(timers);
        if duration.is_some() && super::super::super::route::is_grpc(request) {
            match limit {
                Some(t) => {
                    request.insert("grpc-timeout", super::super::super::route::grpc_timeout_value(t));
                }
                None if was_armed => {
                    request.remove("grpc-timeout");
                }
                None => {}
            }
        }
        self.changed.notify_one();
    }

    /// The earliest armed deadline, and its timer. The request timer counts only before the response.
    fn next(&self, before_response: bool) -> Option<(Instant, Expired)> {
        let timers = self.timers();
        let request = self.request_timeout.filter(|_| before_response && !self.request_complete()).map(|t| (self.started + t, Expired::Request));
        let idle = timers.idle.map(|t| (timers.last_activity + t, Expired::Idle));
        let duration = timers.duration.map(|t| (self.started + t, Expired::Duration));
        [duration, request, idle].into_iter().flatten().min_by_key(|(at, _)| *at)
    }

    /// Completes when a timer expires before the response starts.
    pub async fn expired(&self) -> Expired {
        loop {
            let changed = self.changed.notified();
            match self.next(true) {
                Some((at, which)) if Instant::now() >= at => return which,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// A request body whose frames keep its stream alive and whose end disarms `request_timeout`.
pub struct RequestBody<B> {
    body: B,
    timers: Arc<StreamTimers>,
}

impl<B> RequestBody<B> {
    pub fn new(body: B, timers: Arc<StreamTimers>) -> Self {
        RequestBody { body, timers }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        this.timers.touch();
        if frame.is_none() || this.body.is_end_stream() {
            this.timers.request_complete.store(true, Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body whose frames keep its stream alive; when the idle or duration timer expires while it
/// streams, the stream is reset (HTTP/2) or its connection closed (HTTP/1.1).
pub struct ResponseBody<B> {
    body: B,
    /// `None`: the response has no stream timers (the codec's refusals).
    timers: Option<(Arc<StreamTimers>, Pin<Box<Sleep>>)>,
}

impl<B> ResponseBody<B> {
    pub fn new(body: B, timers: Option<Arc<StreamTimers>>) -> Self {
        ResponseBody { body, timers: timers.map(|t| (t, Box::pin(tokio::time::sleep(Duration::ZERO)))) }
    }
}

/// The error that resets a stream whose timer expired while its response was streaming.
#[derive(Debug)]
pub struct StreamTimeout(Expired);

impl std::fmt::Display for StreamTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Expired::Duration => f.write_str("stream reached its maximum duration"),
            _ => f.write_str("stream idle timeout"),
        }
    }
}

impl std::error::Error for StreamTimeout {}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            if let Some((timers, _)) = &this.timers {
                timers.touch();
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let Some((timers, sleep)) = this.timers.as_mut() else { return Poll::Pending };
        loop {
            let Some((at, which)) = timers.next(false) else { return Poll::Pending };
            if Instant::now() >= at {
                return Poll::Ready(Some(Err(Box::new(StreamTimeout(which)))));
            }
            sleep.as_mut().reset(at);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::GrpcTimeout;
    use http_body_util::{BodyExt, StreamBody};

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[tokio::test(start_paused = true)]
    async fn the_earliest_timer_expires_and_the_route_replaces_the_connection_managers() {
        let timers = StreamTimers::new(Some(S(10)), Some(S(3)), Some(S(20)), false);
        let start = Instant::now();
        assert_eq!(timers.expired().await, Expired::Request);
        assert_eq!(start.elapsed(), S(3));

        let timers = StreamTimers::new(Some(S(10)), Some(S(3)), Some(S(20)), true);
        let mut headers = HeaderMap::new();
        timers.route(Some(TimerOverride::Disabled), Some(&StreamDuration { max: Some(TimerOverride::After(S(5))), grpc_header: None }), Some(S(20)), &mut headers);
        let start = Instant::now();
        assert_eq!(timers.expired().await, Expired::Duration);
        assert_eq!(start.elapsed(), S(5), "the route's duration; its disabled idle timer never fires");
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_deadline_is_capped_less_the_offset_and_sent_upstream() {
        let timers = StreamTimers::new(None, None, None, true);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/grpc".parse().unwrap());
        headers.insert("grpc-timeout", "30S".parse().unwrap());
        let cap = GrpcTimeout { max: S(10), offset: S(1) };
        timers.route(None, Some(&StreamDuration { max: None, grpc_header: Some(cap) }), None, &mut headers);
        assert_eq!(headers["grpc-timeout"], "9000m");
        let start = Instant::now();
        assert_eq!(timers.expired().await, Expired::Duration);
        assert_eq!(start.elapsed(), S(9));
    }

    #[tokio::test(start_paused = true)]
    async fn body_frames_keep_a_stream_alive_and_a_stalled_response_is_reset() {
        let timers = StreamTimers::new(Some(S(2)), None, None, true);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut response = ResponseBody::new(body, Some(Arc::clone(&timers)));
        let start = Instant::now();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(S(1)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
            }
            tokio::time::sleep(S(60)).await;
            drop(tx);
        });
        for _ in 0..3 {
            assert!(response.frame().await.unwrap().is_ok(), "a frame every second keeps a 2 s idle timer away");
        }
        let reset = response.frame().await.unwrap().unwrap_err();
        assert_eq!(reset.to_string(), "stream idle timeout");
        assert_eq!(start.elapsed(), S(5), "reset 2 s after the last frame");
    }
}
