//! The byte stream under a connection: plain TCP, or TLS over TCP. Plain TCP keeps
//! tokio's owned halves (no lock between reader and writer, and the read half can
//! tell a hang-up while the connection is not reading); TLS splits the rustls stream
//! with `tokio::io::split`, whose lock the two halves take in turn.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

type Tls = TlsStream<TcpStream>;

pub enum Reader {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<Tls>),
}

pub enum Writer {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<Tls>),
}

pub fn split_tcp(stream: TcpStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (Reader::Tcp(r), Writer::Tcp(w))
}

pub fn split_tls(stream: Tls) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    (Reader::Tls(r), Writer::Tls(w))
}

impl Reader {
    /// Resolves when the peer has closed or reset its side, even while unread input
    /// is pending (readiness then says "readable" at once, so it is polled twice a
    /// second). Over TLS the socket is not reachable from the read half: it never
    /// resolves, and a peer that stopped reading is dropped by the send-stall timer.
    pub async fn hung_up(&self) {
        let Reader::Tcp(reader) = self else {
            return std::future::pending().await;
        };
        loop {
            match reader.ready(tokio::io::Interest::READABLE).await {
                Ok(r) if !(r.is_read_closed() || r.is_error()) => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await
                }
                _ => return,
            }
        }
    }
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Reader::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            Writer::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Writer::Tcp(w) => w.is_write_vectored(),
            Writer::Tls(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_flush(cx),
            Writer::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
