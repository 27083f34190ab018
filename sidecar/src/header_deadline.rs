//! A total deadline for reading each request's header block, against slowloris clients.
//!
//! pingora times out each *read* of a request header (60 s), not the header as a whole, so a
//! client sending one byte every few seconds would hold its connection for as long as it likes.
//! nginx's `client_header_timeout` is the model: the whole header must arrive within
//! `server.request_header_timeout_seconds`, counted from the connection's accept for its first
//! request and from the first byte of each later request on a kept-alive connection (idle time
//! between requests is `keepalive_timeout_seconds`' business). A client that misses the deadline
//! gets `408` if it had sent anything, and the connection is closed.
//!
//! The deadline lives in a wrapper around the accepted connection, below pingora's HTTP parser:
//! it watches the bytes read for the empty line that ends a header block and the bytes written for
//! the response that ends a request. Only header bytes are scanned; bodies pass untouched.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType,
};
use pingora_core::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Wraps every connection `inner` accepts in a [`DeadlineStream`].
pub struct HeaderDeadline<A> {
    inner: Arc<A>,
    timeout: Duration,
    timeouts: IntCounter,
}

impl<A> HeaderDeadline<A> {
    /// `timeouts` counts connections closed for missing the deadline.
    pub fn new(inner: A, timeout: Duration, timeouts: IntCounter) -> Self {
        HeaderDeadline {
            inner: Arc::new(inner),
            timeout,
            timeouts,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderDeadline<A> {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let stream = DeadlineStream::new(stream, self.timeout, self.timeouts.clone());
        self.inner.process_new(Box::new(stream), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Where the connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: no deadline until the next request's first byte.
    Idle,
    /// Reading a header block that must be complete by `deadline`.
    Header { deadline: Instant, received: usize },
    /// The header is in; the body and the response are not timed here.
    Body,
}

/// Where the bytes read so far leave the current line: just after a line feed (`after_lf`),
/// possibly followed by one carriage return (`cr`); an empty line ends a header block.
///
/// Kept across reads and phases, not per header: a read that ends one request's header block can
/// carry the start of a pipelined next request, which is not scanned then (it could as well be a
/// body). When the rest of that header arrives, its empty line may be split across the two reads
/// (`...\r\n` then `\r\n`), and only this state finds it; without it the request's header
/// was never seen to end, and the idle connection got a 408 and was closed after the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Line {
    after_lf: bool,
    cr: bool,
}

impl Line {
    const AFTER_LF: Line = Line {
        after_lf: true,
        cr: false,
    };

    /// The state after `bytes` that are not scanned for an empty line (a body, bytes past a
    /// header block's end): their last two bytes decide it.
    fn skip(self, bytes: &[u8]) -> Line {
        match bytes {
            [] => self,
            [.., b'\n'] => Line::AFTER_LF,
            [.., b'\n', b'\r'] => Line {
                after_lf: true,
                cr: true,
            },
            [b'\r'] if self.after_lf && !self.cr => Line {
                after_lf: true,
                cr: true,
            },
            _ => Line::default(),
        }
    }
}

/// The request cycle and the line state, advanced over the bytes read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cycle {
    phase: Phase,
    line: Line,
}

impl Cycle {
    fn new(phase: Phase) -> Cycle {
        Cycle {
            phase,
            line: Line::default(),
        }
    }

    /// Advances over bytes just read.
    fn on_read(&mut self, bytes: &[u8], timeout: Duration) {
        if bytes.is_empty() {
            return;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Header {
                deadline: Instant::now() + timeout,
                received: 0,
            };
        }
        let Phase::Header { received, .. } = &mut self.phase else {
            self.line = self.line.skip(bytes);
            return;
        };
        *received += bytes.len();
        let line = &mut self.line;
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                // An empty line ends the header block: LF LF or LF CR LF (HTTP/1 also tolerates
                // bare LF line ends). What follows in this read is a body or the next request.
                b'\n' if line.after_lf => {
                    self.phase = Phase::Body;
                    self.line = Line::default().skip(&bytes[i + 1..]);
                    return;
                }
                b'\n' => *line = Line::AFTER_LF,
                b'\r' if line.after_lf && !line.cr => line.cr = true,
                _ => *line = Line::default(),
            }
        }
    }

    /// Advances over bytes just written: a final response means the next bytes read belong to a
    /// new request. Interim `1xx` responses (100 Continue) keep the request going.
    fn on_write(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Body && !is_interim_response(bytes) {
            self.phase = Phase::Idle;
        }
    }
}

fn is_interim_response(bytes: &[u8]) -> bool {
    bytes.len() > 9 && bytes.starts_with(b"HTTP/1.") && bytes[9] == b'1'
}

fn header_timeout() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "request header not complete within server.request_header_timeout_seconds",
    )
}

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A connection whose request headers must each arrive within a deadline.
pub struct DeadlineStream {
    inner: Stream,
    timeout: Duration,
    cycle: Cycle,
    /// Created the first time a header read has to wait, then reset for later requests.
    timer: Option<Pin<Box<Sleep>>>,
    /// Set once the deadline has passed: every later read fails, whatever the caller did with the
    /// first error.
    expired: bool,
    timeouts: IntCounter,
}

impl DeadlineStream {
    pub fn new(inner: Stream, timeout: Duration, timeouts: IntCounter) -> Self {
        DeadlineStream {
            inner,
            timeout,
            // A new connection's first request is timed from the accept: a client that connects
            // and sends nothing is let go after the same deadline.
            cycle: Cycle::new(Phase::Header {
                deadline: Instant::now() + timeout,
                received: 0,
            }),
            timer: None,
            expired: false,
            timeouts,
        }
    }

    /// Polls the header deadline while a read waits; `Ready` once it has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        let Phase::Header { deadline, received } = self.cycle.phase else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).map(|()| received)
    }
}

impl AsyncRead for DeadlineStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(header_timeout()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.cycle.on_read(&buf.filled()[before..], this.timeout);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(received) => {
                    this.timeouts.inc();
                    if received > 0 {
                        // Best effort: the socket's send buffer is empty at this point, so the
                        // short answer goes out in one write or not at all.
                        let _ = Pin::new(&mut this.inner).poll_write(cx, REQUEST_TIMEOUT);
                    }
                    this.expired = true;
                    Poll::Ready(Err(header_timeout()))
                }
            },
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.cycle.on_write(&buf[..n]);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            if n > 0 {
                this.cycle
                    .on_write(bufs.iter().find(|b| !b.is_empty()).map_or(&[], |b| b));
            }
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl fmt::Debug for DeadlineStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineStream")
            .field("inner", &self.inner)
            .field("cycle", &self.cycle)
            .finish()
    }
}

// pingora's transport traits, passed through to the accepted connection.

#[async_trait]
impl Shutdown for DeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for DeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for DeadlineStream {
    fn get_ssl(&self) -> Option<&pingora_core::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora_core::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for DeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<pingora_core::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for DeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora_core::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for DeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<pingora_core::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora_core::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for DeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(cycle: &mut Cycle, chunks: &[&[u8]]) {
        for chunk in chunks {
            cycle.on_read(chunk, Duration::from_secs(10));
        }
    }

    fn phase_after(chunks: &[&[u8]]) -> Phase {
        let mut cycle = Cycle::new(Phase::Idle);
        read_all(&mut cycle, chunks);
        cycle.phase
    }

    #[tokio::test]
    async fn the_empty_line_ends_the_header_however_it_is_split() {
        let request = b"GET /api/products HTTP/1.1\r\nHost: mall\r\n\r\n";
        for split in 1..request.len() {
            let (a, b) = request.split_at(split);
            assert_eq!(phase_after(&[a, b]), Phase::Body, "split at {split}");
        }
        assert_eq!(phase_after(&[b"GET / HTTP/1.1\nHost: x\n\n"]), Phase::Body);
        assert!(matches!(
            phase_after(&[b"GET / HTTP/1.1\r\nHost: x\r\n"]),
            Phase::Header { received: 25, .. }
        ));
        // A CR LF inside a header line is not an empty line.
        assert!(matches!(
            phase_after(&[b"GET / HTTP/1.1\r\nA: b\r\r\n"]),
            Phase::Header { .. }
        ));
    }

    #[tokio::test]
    async fn a_final_response_starts_the_next_request_and_100_continue_does_not() {
        let mut cycle = Cycle::new(Phase::Idle);
        read_all(
            &mut cycle,
            &[b"POST /api/orders HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"],
        );
        cycle.on_write(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(cycle.phase, Phase::Body);
        cycle.on_write(b"HTTP/1.1 201 Created\r\n");
        assert_eq!(cycle.phase, Phase::Idle);
        // Idle time before the next request is not timed; its first byte starts the clock.
        cycle.on_read(b"G", Duration::from_secs(10));
        assert!(matches!(cycle.phase, Phase::Header { received: 1, .. }));
    }

    /// A pipelined request that starts in the read ending the one before (not scanned then) ends
    /// wherever the rest of its header is split: its empty line is found, so the connection is
    /// not timed out as if a header were still arriving.
    #[tokio::test]
    async fn a_pipelined_header_begun_in_the_previous_read_ends_however_the_rest_is_split() {
        let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".as_slice();
        let second = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n".as_slice();
        for split in 1..second.len() {
            let (begun, rest) = second.split_at(split);
            let mut cycle = Cycle::new(Phase::Idle);
            read_all(&mut cycle, &[&[first, begun].concat()]);
            assert_eq!(cycle.phase, Phase::Body, "split at {split}");
            // pingora has the start of the second request buffered; the first is answered.
            cycle.on_write(b"HTTP/1.1 200 OK\r\n");
            read_all(&mut cycle, &[rest]);
            assert_eq!(cycle.phase, Phase::Body, "the second's header ends, split at {split}");
        }
        // Bytes skipped in a body still leave the line state right for the next read.
        let mut cycle = Cycle::new(Phase::Idle);
        read_all(&mut cycle, &[first, b"G", b"ET /b HTTP/1.1\r\nHost: x\r\n"]);
        cycle.on_write(b"HTTP/1.1 200 OK\r\n");
        read_all(&mut cycle, &[b"\r", b"\n"]);
        assert_eq!(cycle.phase, Phase::Body);
    }
}
