//! A connection's streams in flight and when it closes on its own: after `idle_timeout` without streams in
//! flight, or at `max_connection_duration`. Downstream, the HTTP connection manager closes gracefully (the
//! request in flight finishes, HTTP/2 gets a GOAWAY); upstream, a pooled HTTP/2 connection idle that long
//! is closed. A stream counts as in flight until its response body has been sent (or dropped).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Requests in flight on one connection and when it last became idle.
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `started` at which the last request finished.
    idle_since: AtomicU64,
    idle: Notify,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity { started: Instant::now(), in_flight: AtomicUsize::new(0), idle_since: AtomicU64::new(0), idle: Notify::new() })
    }

    /// Streams in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Counts a request until the guard (held by its response body) is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Completes when the connection should close: idle for `idle`, or `max_duration` after it started.
    pub async fn expired(&self, idle: Option<Duration>, max_duration: Option<Duration>) {
        let end = max_duration.map(|d| self.started + d);
        loop {
            let notified = self.idle.notified();
            let idle_end = match (idle, self.in_flight.load(Relaxed)) {
                (Some(i), 0) => Some(self.started + Duration::from_millis(self.idle_since.load(Relaxed)) + i),
                _ => None,
            };
            let deadline = match (idle_end, end) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return;
            }
            match deadline {
                Some(d) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(d) => {}
                        () = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// One request in flight.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Relaxed) == 1 {
            activity.idle_since.store(activity.started.elapsed().as_millis() as u64, Relaxed);
            activity.idle.notify_one();
        }
    }
}

/// A response body that keeps its request counted until it is dropped (sent or abandoned).
pub struct Counted<B, G = InFlight> {
    pub body: B,
    /// Held until the body is dropped.
    pub _in_flight: G,
}

impl<B: Body<Data = Bytes> + Unpin, G: Unpin> Body for Counted<B, G> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
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

    #[tokio::test(start_paused = true)]
    async fn expires_when_idle_and_not_while_a_request_is_in_flight() {
        let activity = Activity::new();
        let request = activity.request();
        let idle = Some(Duration::from_secs(10));
        let waited = tokio::time::timeout(Duration::from_secs(60), activity.expired(idle, None)).await;
        assert!(waited.is_err(), "a request in flight keeps the connection");
        drop(request);
        let started = Instant::now();
        activity.expired(idle, None).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10), "closed after the idle time");
        let busy = activity.request();
        let started = Instant::now();
        activity.expired(None, Some(Duration::from_secs(100))).await;
        assert!(started.elapsed() <= Duration::from_secs(100), "max duration closes even a busy connection");
        drop(busy);
    }
}
