//! tcp_proxy's byte copy, both ways, with buffers taken as data arrives (as Envoy's connection buffers are)
//! instead of a fixed pair per connection: a read lands in the thread's scratch buffer and is written straight
//! on; only the bytes the other side cannot take at once are kept, in a buffer of their size, and that
//! direction reads nothing more until they are written. An idle connection holds no buffer at all, and a busy
//! one at most its `per_connection_buffer_limit_bytes` (the smaller of its listener's and its cluster's) each way.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read takes: what a socket typically hands over at once on loopback and veth.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Copies `a` to `b` and `b` to `a` until both have ended; a read end is passed on as a write shutdown
/// (half-close) while the other direction goes on. Each direction holds at most `buffer_limit` bytes: one
/// read takes no more. Returns the bytes copied each way.
pub async fn relay<A, B>(a: &mut A, b: &mut B, buffer_limit: usize) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let max_read = buffer_limit.clamp(1, SCRATCH);
    let (mut a_to_b, mut b_to_a) = (Direction::new(max_read), Direction::new(max_read));
    poll_fn(|cx| {
        let forward = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let backward = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forward, backward) {
            (Poll::Ready(there), Poll::Ready(back)) => Poll::Ready(Ok((there, back))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction's state: the bytes read but not yet written, if the writer was full.
struct Direction {
    max_read: usize,
    pending: Vec<u8>,
    written_of_pending: usize,
    copied: u64,
    read_ended: bool,
    unflushed: bool,
    finished: bool,
}

enum Read {
    Data,
    Ended,
    Waiting,
}

impl Direction {
    fn new(max_read: usize) -> Direction {
        Direction { max_read, pending: Vec::new(), written_of_pending: 0, copied: 0, read_ended: false, unflushed: false, finished: false }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, mut reader: Pin<&mut R>, mut writer: Pin<&mut W>) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            ready!(self.poll_write_pending(cx, writer.as_mut()))?;
            if self.read_ended {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.finished = true;
                return Poll::Ready(Ok(self.copied));
            }
            match self.read_through(cx, reader.as_mut(), writer.as_mut())? {
                Read::Data => self.unflushed = true,
                Read::Ended => self.read_ended = true,
                Read::Waiting => {
                    // Nothing more to read now: push out what a buffering writer (TLS) holds.
                    if self.unflushed {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Writes what is kept from an earlier read; its buffer is given back once written.
    fn poll_write_pending<W: AsyncWrite + ?Sized>(&mut self, cx: &mut Context<'_>, mut writer: Pin<&mut W>) -> Poll<io::Result<()>> {
        while self.written_of_pending < self.pending.len() {
            let n = ready!(writer.as_mut().poll_write(cx, &self.pending[self.written_of_pending..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written_of_pending += n;
            self.copied += n as u64;
        }
        if !self.pending.is_empty() {
            self.pending = Vec::new();
            self.written_of_pending = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// One read into the thread's scratch buffer, written on at once as far as the writer takes it; the rest
    /// is kept.
    fn read_through<R, W>(&mut self, cx: &mut Context<'_>, reader: Pin<&mut R>, mut writer: Pin<&mut W>) -> io::Result<Read>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        SCRATCH_BUFFER.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..self.max_read]);
            match reader.poll_read(cx, &mut buf) {
                Poll::Pending => return Ok(Read::Waiting),
                Poll::Ready(result) => result?,
            }
            let data = buf.filled();
            if data.is_empty() {
                return Ok(Read::Ended);
            }
            let mut written = 0;
            while written < data.len() {
                match writer.as_mut().poll_write(cx, &data[written..]) {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => break,
                }
            }
            self.copied += written as u64;
            if written < data.len() {
                self.pending = data[written..].to_vec();
            }
            Ok(Read::Data)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_through_a_slow_writer_and_passes_half_closes_on() {
        // Small pipes: most reads find the other side full, so the kept-bytes path carries most data.
        let (mut client, mut proxy_down) = tokio::io::duplex(1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(1024);
        let relayed = tokio::spawn(async move { relay(&mut proxy_down, &mut proxy_up, 1 << 20).await });
        let request: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, request, "the request arrives whole, then its end");
        server.write_all(b"answer after the client's half-close").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"answer after the client's half-close");
        assert_eq!(relayed.await.unwrap().unwrap(), (300_000, 36));
    }

    /// A reader that records the largest read it was offered.
    struct Offered<R> {
        inner: R,
        largest: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Offered<R> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            self.largest.fetch_max(buf.remaining(), std::sync::atomic::Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<R: AsyncWrite + Unpin> AsyncWrite for Offered<R> {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn holds_no_more_than_the_buffer_limit_and_still_copies_everything() {
        let largest = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut client, proxy_down) = tokio::io::duplex(256 * 1024);
        let (mut proxy_up, mut server) = tokio::io::duplex(256 * 1024);
        let mut proxy_down = Offered { inner: proxy_down, largest: std::sync::Arc::clone(&largest) };
        let relayed = tokio::spawn(async move { relay(&mut proxy_down, &mut proxy_up, 1000).await });
        let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = request.clone();
        tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(got, request);
        assert_eq!(relayed.await.unwrap().unwrap(), (200_000, 0));
        // With 256 KiB waiting in the pipe, only the limit kept each read (and so what is held) to 1000 bytes.
        assert_eq!(largest.load(std::sync::atomic::Ordering::Relaxed), 1000);
    }
}
