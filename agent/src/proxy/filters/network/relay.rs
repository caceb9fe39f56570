//! tcp_proxy's byte copy, both ways, with buffers taken as data arrives (as Envoy's connection buffers are)
//! instead of a fixed pair per connection: a read lands in the thread's scratch buffer and is written straight
//! on; only the bytes the other side cannot take at once are kept, in a buffer of their size, and that
//! direction reads nothing more until they are written. An idle connection holds no buffer at all.

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
/// (half-close) while the other direction goes on. Returns the bytes copied each way.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
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
#[derive(Default)]
struct Direction {
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
            let mut buf = ReadBuf::new(&mut scratch[..]);
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
        let relayed = tokio::spawn(async move { relay(&mut proxy_down, &mut proxy_up).await });
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
}
