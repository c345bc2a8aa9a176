//! The connection between a site and the global controller, compressed as
//! one stream.
//!
//! A site's messages are small and alike: a fetch names the same relations,
//! attributes and include groups as the last one, a reply holds the same
//! streets, surnames and report phrases. gRPC compresses each message on
//! its own, so a 300-byte request finds nothing to refer back to, and gzip's
//! header and trailer cost more than it saves. Here the whole byte stream
//! below HTTP/2 goes through one deflate context for the connection's life
//! (as PPP and SSH compress a link), flushed (`Z_SYNC_FLUSH`) whenever
//! HTTP/2 flushes, so each message is sent at once and refers back to the
//! 32 KiB that came before it — HTTP/2's frame and header bytes included.
//!
//! A client that compresses starts the connection with [`MAGIC`]; the
//! server reads the first byte to tell it from the HTTP/2 preface (which
//! starts with `P`), so compressing and plain clients share one port. Under
//! TLS the compression sits inside the encryption.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What a compressing client sends before anything else.
pub const MAGIC: &[u8; 16] = b"SNAPS-DEFLATE/1\n";

/// Compressed bytes waiting for the inner stream beyond this make a write
/// wait (the peer reads slower than we write).
const MAX_PENDING: usize = 64 << 10;

/// Compressed input read at a time.
const READ_CHUNK: usize = 16 << 10;

/// A stream whose bytes cross `inner` deflate-compressed, both ways.
pub struct Deflated<S> {
    inner: S,
    compress: Compress,
    decompress: Decompress,
    /// Compressed bytes not yet written to `inner` (from `sent`).
    out: Vec<u8>,
    sent: usize,
    /// Compressed bytes read from `inner` not yet inflated.
    input: Vec<u8>,
    /// `inner` reached its end.
    eof: bool,
    /// The last inflate filled the reader's buffer: more may be waiting.
    output_pending: bool,
    /// Bytes given to the compressor since the last sync flush.
    unflushed: bool,
}

impl<S> Deflated<S> {
    /// Wraps `inner`, whose first bytes are the compressed stream (the
    /// client has already sent [`MAGIC`], or the server has read it).
    pub fn new(inner: S) -> Deflated<S> {
        Deflated {
            inner,
            // Raw deflate, default level and window: the sync flush marks
            // message boundaries, a zlib header would add nothing.
            compress: Compress::new(Compression::default(), false),
            decompress: Decompress::new(false),
            out: Vec::new(),
            sent: 0,
            input: Vec::new(),
            eof: false,
            output_pending: false,
            unflushed: false,
        }
    }

    /// Runs the compressor over `data` (empty with `Sync`: the flush),
    /// appending to `out`.
    fn deflate(&mut self, mut data: &[u8], flush: FlushCompress) -> io::Result<()> {
        loop {
            if self.out.capacity() - self.out.len() < 256 {
                self.out.reserve(data.len() / 2 + 1024);
            }
            let before_in = self.compress.total_in();
            self.compress
                .compress_vec(data, &mut self.out, flush)
                .map_err(io::Error::other)?;
            let consumed = (self.compress.total_in() - before_in) as usize;
            data = &data[consumed..];
            // Done when all input is taken and the compressor had room to
            // spare (so nothing of a flush is left inside it).
            if data.is_empty() && self.out.len() < self.out.capacity() {
                return Ok(());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Deflated<S> {
    /// Writes compressed bytes to `inner` until none wait.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deflated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Inflate when there is input, or when the last call filled the
            // caller's buffer (the inflater may hold more output).
            if !this.input.is_empty() || this.output_pending {
                let dst = buf.initialize_unfilled();
                let room = dst.len();
                let (before_in, before_out) =
                    (this.decompress.total_in(), this.decompress.total_out());
                let status = this
                    .decompress
                    .decompress(&this.input, dst, FlushDecompress::None)
                    .map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("compressed stream: {e}"),
                        )
                    })?;
                let consumed = (this.decompress.total_in() - before_in) as usize;
                let produced = (this.decompress.total_out() - before_out) as usize;
                this.output_pending = produced == room;
                // Keep only what the inflater left of the input.
                this.input.drain(..consumed);
                if produced > 0 {
                    buf.advance(produced);
                    return Poll::Ready(Ok(()));
                }
                if status == Status::StreamEnd {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "compressed stream: ended inside the connection",
                    )));
                }
            }
            if this.eof {
                // The peer closed: what is left ends the stream.
                return Poll::Ready(Ok(()));
            }
            let start = this.input.len();
            this.input.resize(start + READ_CHUNK, 0);
            let mut rb = ReadBuf::new(&mut this.input[start..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            this.input.truncate(start + n);
            ready!(polled)?;
            if n == 0 {
                this.eof = true;
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deflated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() - this.sent >= MAX_PENDING {
            ready!(this.poll_drain(cx))?;
        }
        this.deflate(buf, FlushCompress::None)?;
        this.unflushed |= !buf.is_empty();
        // Start sending what is ready; the rest goes at the flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unflushed {
            this.deflate(&[], FlushCompress::Sync)?;
            this.unflushed = false;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One end of a connection, compressed or not: a server's accepted
/// connection is compressed if the client began with [`MAGIC`].
pub enum Link<S> {
    /// A plain client; the first byte, already read, is given back first.
    Plain(Option<u8>, S),
    /// A compressing client.
    Deflated(Box<Deflated<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// A client's end of a new connection: when `compress` is set, sends
    /// [`MAGIC`] and compresses from then on.
    pub async fn connect(mut inner: S, compress: bool) -> io::Result<Link<S>> {
        if !compress {
            return Ok(Link::Plain(None, inner));
        }
        inner.write_all(MAGIC).await?;
        Ok(Link::Deflated(Box::new(Deflated::new(inner))))
    }

    /// Reads as much of the connection's start as tells the two apart. A
    /// client that starts with `S` but not with [`MAGIC`] is refused.
    pub async fn accept(mut inner: S) -> io::Result<Link<S>> {
        let mut first = [0u8; 1];
        if inner.read(&mut first).await? == 0 {
            return Ok(Link::Plain(None, inner));
        }
        if first[0] != MAGIC[0] {
            return Ok(Link::Plain(Some(first[0]), inner));
        }
        let mut rest = [0u8; MAGIC.len() - 1];
        inner.read_exact(&mut rest).await?;
        if rest != MAGIC[1..] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the connection starts neither with HTTP/2 nor with SNAPS-DEFLATE/1",
            ));
        }
        Ok(Link::Deflated(Box::new(Deflated::new(inner))))
    }

    /// Whether the client compresses.
    pub fn is_deflated(&self) -> bool {
        matches!(self, Link::Deflated(_))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Link<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(first, s) => {
                if let Some(b) = first.take_if(|_| buf.remaining() > 0) {
                    buf.put_slice(&[b]);
                    return Poll::Ready(Ok(()));
                }
                Pin::new(s).poll_read(cx, buf)
            }
            Link::Deflated(d) => Pin::new(d.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Link<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(_, s) => Pin::new(s).poll_write(cx, buf),
            Link::Deflated(d) => Pin::new(d.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(_, s) => Pin::new(s).poll_flush(cx),
            Link::Deflated(d) => Pin::new(d.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Link::Plain(_, s) => Pin::new(s).poll_shutdown(cx),
            Link::Deflated(d) => Pin::new(d.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// A client and a server end over an in-memory pipe.
    async fn pair() -> (
        Deflated<tokio::io::DuplexStream>,
        Link<tokio::io::DuplexStream>,
    ) {
        let (mut c, s) = duplex(1 << 10);
        let server = tokio::spawn(Link::accept(s));
        c.write_all(MAGIC).await.unwrap();
        let s = server.await.unwrap().unwrap();
        assert!(s.is_deflated());
        (Deflated::new(c), s)
    }

    #[tokio::test]
    async fn each_flushed_message_arrives_whole_and_at_once() {
        let (mut c, mut s) = pair().await;
        for i in 0..50u32 {
            let msg = format!("fetch patient where surname = 'Smith' and pno = {i}\n").repeat(3);
            c.write_all(msg.as_bytes()).await.unwrap();
            c.flush().await.unwrap();
            // The server reads the message without the client sending more.
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg.as_bytes());
            s.write_all(b"ok").await.unwrap();
            s.flush().await.unwrap();
            let mut ok = [0u8; 2];
            c.read_exact(&mut ok).await.unwrap();
            assert_eq!(&ok, b"ok");
        }
    }

    #[tokio::test]
    async fn a_message_like_the_last_costs_a_fraction_of_it() {
        let (mut c, s) = pair().await;
        let reader = tokio::spawn(async move {
            let mut s = s;
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            all
        });
        // About a fetch request's size, little repetition inside it.
        let msg: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let msg = &msg[..];
        c.write_all(msg).await.unwrap();
        c.flush().await.unwrap();
        let first = c.compress.total_out();
        c.write_all(msg).await.unwrap();
        c.flush().await.unwrap();
        let second = c.compress.total_out() - first;
        assert!(second * 10 < first, "first {first} B, second {second} B");
        c.shutdown().await.unwrap();
        let all = reader.await.unwrap();
        assert_eq!(all, [msg, msg].concat());
    }

    #[tokio::test]
    async fn large_and_incompressible_data_passes_through_a_small_pipe() {
        let (mut c, s) = pair().await;
        let mut data = Vec::with_capacity(1 << 20);
        let mut x: u64 = 88172645463325252;
        for _ in 0..(1 << 20) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.push(x as u8);
        }
        let expect = data.clone();
        let reader = tokio::spawn(async move {
            let mut s = s;
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            all
        });
        c.write_all(&data).await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), expect);
    }

    #[tokio::test]
    async fn a_plain_client_is_served_plain() {
        let (mut c, s) = duplex(1 << 10);
        c.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut s = Link::accept(s).await.unwrap();
        assert!(!s.is_deflated());
        let mut got = [0u8; 16];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PRI * HTTP/2.0\r\n");
    }

    #[tokio::test]
    async fn a_wrong_start_is_refused_and_garbage_is_an_error() {
        let (mut c, s) = duplex(1 << 10);
        c.write_all(b"SNAPS-GZIP/9\n...").await.unwrap();
        let Err(err) = Link::accept(s).await else {
            panic!("a wrong start was accepted");
        };
        assert!(err.to_string().contains("SNAPS-DEFLATE/1"), "{err}");

        let (mut c, s) = duplex(1 << 10);
        c.write_all(MAGIC).await.unwrap();
        c.write_all(&[0xff; 64]).await.unwrap();
        drop(c);
        let mut s = Link::accept(s).await.unwrap();
        let mut buf = Vec::new();
        let err = s.read_to_end(&mut buf).await.expect_err("garbage refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
