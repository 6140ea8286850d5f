//! Large reads from a TCP socket under the security layer.
//!
//! Noise reads the socket 8 KiB at a time and TLS (rustls) 4 KiB at a
//! time, one system call each: 130,000-260,000 calls per GiB received.
//! [`ReadAhead`] reads up to [`GULP`] bytes per call and hands them out
//! from memory. Writes pass straight through.
//!
//! The buffer exists only while the connection carries bulk data: it is
//! taken when a read fills the caller's buffer, and given back when a
//! short read drains the socket (control traffic again). A connection that
//! is idle or only writing holds none and allocates nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};

/// Bytes asked of the socket per read: a full Noise frame and then some.
const GULP: usize = 128 << 10;

/// A read shorter than this, followed by an empty socket, ends bulk mode.
const SMALL: usize = 16 << 10;

/// A socket read in gulps of up to [`GULP`] bytes.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Bytes the last gulp brought (a full small read counts as a gulp).
    last: usize,
}

impl<S> ReadAhead<S> {
    /// `inner`, read in gulps.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            last: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pos == this.end {
            if this.buf.is_empty() || out.len() >= GULP {
                // No bulk data seen: read into the caller's buffer. Only a
                // read that fills it takes the gulp buffer for the next.
                let r = Pin::new(&mut this.inner).poll_read(cx, out);
                if matches!(r, Poll::Ready(Ok(n)) if n > 0 && n == out.len() && n < GULP) {
                    this.buf = vec![0; GULP];
                    this.last = GULP;
                }
                return r;
            }
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.buf) {
                Poll::Ready(Ok(n)) => {
                    this.pos = 0;
                    this.end = n;
                    this.last = n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Between the packets of a bulk transfer the last read
                    // was large: keep the buffer. After a small one the
                    // connection is back to control traffic: give it back.
                    if this.last < SMALL {
                        this.buf = Vec::new();
                    }
                    return Poll::Pending;
                }
            }
        }
        let n = out.len().min(this.end - this.pos);
        out[..n].copy_from_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::{AsyncReadExt, AsyncWriteExt, Cursor};

    /// A reader that yields its data in the given pieces, with a
    /// `Pending` before each piece (as a socket between packets does).
    struct Pieces {
        pieces: Vec<Vec<u8>>,
        pending: bool,
        reads: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            if !self.pending {
                self.pending = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.pending = false;
            self.reads += 1;
            let Some(p) = self.pieces.first_mut() else {
                return Poll::Ready(Ok(0));
            };
            let n = out.len().min(p.len());
            out[..n].copy_from_slice(&p[..n]);
            p.drain(..n);
            if p.is_empty() {
                self.pieces.remove(0);
            }
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn small_reads_see_the_same_bytes_in_fewer_socket_reads() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let pieces: Vec<Vec<u8>> = data.chunks(100_000).map(|c| c.to_vec()).collect();
        let mut r = ReadAhead::new(Pieces {
            pieces,
            pending: false,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        futures::executor::block_on(async {
            loop {
                let n = r.read(&mut small).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&small[..n]);
            }
        });
        assert_eq!(got, data);
        // one 4 KiB read that found more, the rest of ten pieces in gulps,
        // and the end: not 245 reads of 4 KiB
        assert_eq!(r.inner.reads, 12);
        // kept between the pieces of a bulk transfer
        assert!(!r.buf.is_empty());
    }

    #[test]
    fn a_short_read_after_bulk_gives_the_buffer_back() {
        let mut r = ReadAhead::new(Pieces {
            pieces: vec![vec![1u8; 100_000], b"ping".to_vec()],
            pending: false,
            reads: 0,
        });
        let mut got = vec![0u8; 100_004];
        futures::executor::block_on(async {
            for piece in got.chunks_mut(4096) {
                r.read_exact(piece).await.unwrap();
            }
        });
        assert_eq!(&got[100_000..], b"ping");
        assert!(!r.buf.is_empty());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut r)
            .poll_read(&mut cx, &mut [0u8; 16])
            .is_pending());
        assert!(r.buf.is_empty());
    }

    #[test]
    fn an_idle_connection_keeps_no_buffer() {
        let mut r = ReadAhead::new(Pieces {
            pieces: vec![b"ping".to_vec(), b"pong".to_vec()],
            pending: false,
            reads: 0,
        });
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = [0u8; 16];
        // the first poll finds the socket empty
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_pending());
        assert!(r.buf.is_empty());
        let n = match Pin::new(&mut r).poll_read(&mut cx, &mut out) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("expected data, got {other:?}"),
        };
        assert_eq!(&out[..n], b"ping");
        // drained, a small last read, and the socket is waiting: given back
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut out).is_pending());
        assert!(r.buf.is_empty());
    }

    #[test]
    fn large_reads_and_writes_go_straight_through() {
        let data = vec![7u8; GULP * 2];
        let mut r = ReadAhead::new(Cursor::new(data.clone()));
        let mut big = vec![0u8; GULP * 2];
        futures::executor::block_on(async {
            r.read_exact(&mut big).await.unwrap();
            assert!(r.buf.is_empty());
            r.write_all(b"x").await.unwrap();
            r.flush().await.unwrap();
        });
        assert_eq!(big, data);
    }
}
