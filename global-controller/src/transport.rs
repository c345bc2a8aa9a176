//! How connections reach the service: TLS with mutual authentication
//! (the peer's role comes from its verified client certificate), or plain
//! TCP in development mode (`--insecure`, bearer tokens).
//!
//! TLS handshakes run in their own tasks, so one slow or hostile client
//! cannot hold up the accept loop; a refused handshake is logged with the
//! peer's address and the reason.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use snaps_proto::tls::{Peer, peer_of};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a TLS connection's certificate says about its holder; every
/// request on the connection carries it as an extension.
#[derive(Debug, Clone)]
pub struct Certified {
    /// The holder, or why the certificate names no SNAPS role (the
    /// requests are then refused with that reason).
    pub peer: Result<Peer, String>,
    /// The client's address.
    pub remote: SocketAddr,
}

/// A TLS connection whose client certificate was verified.
pub struct TlsConnection {
    stream: Box<TlsStream<TcpStream>>,
    certified: Certified,
}

impl Connected for TlsConnection {
    type ConnectInfo = Certified;

    fn connect_info(&self) -> Certified {
        self.certified.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().stream.as_mut()).poll_shutdown(cx)
    }
}

/// Accepts on `listener` and yields the connections whose TLS handshake
/// (client certificate included) succeeded. The accept loop ends when the
/// receiver is dropped and the returned task is aborted.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> (
    tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConnection>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    // Back off so a persistent condition (EMFILE) does not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::warn!(%remote, %error, "refused a connection: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "refused a connection: TLS handshake timed out");
                        return;
                    }
                };
                let peer = match stream.get_ref().1.peer_certificates() {
                    Some([first, ..]) => peer_of(first).map_err(|e| e.to_string()),
                    _ => Err("the connection has no client certificate".to_string()),
                };
                match &peer {
                    Ok(p) => tracing::debug!(%remote, peer = %p, "TLS connection"),
                    Err(reason) => {
                        tracing::warn!(%remote, %reason, "TLS connection with a certificate naming no SNAPS role")
                    }
                }
                let conn = TlsConnection {
                    stream: Box::new(stream),
                    certified: Certified { peer, remote },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}
