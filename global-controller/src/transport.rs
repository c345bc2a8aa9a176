//! How connections reach the service: TLS with mutual authentication
//! (the peer's role comes from its verified client certificate), or plain
//! TCP in development mode (`--insecure`, bearer tokens).
//!
//! Either way a client may compress the connection as one stream
//! (`snaps_proto::deflate`); the first byte tells.
//!
//! TLS handshakes run in their own tasks, so one slow or hostile client
//! cannot hold up the accept loop; a refused handshake is logged with the
//! peer's address and the reason.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use snaps_proto::deflate::Link;
use snaps_proto::tls::{Credentials, Peer, peer_of, serial_of};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

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
    /// The certificate's serial number.
    serial: Vec<u8>,
    revocation: Arc<Revocation>,
}

impl Certified {
    /// Whether the certificate has been revoked since the connection was
    /// made (a connection lives for many requests), naming it if so.
    pub fn revoked(&self) -> Option<String> {
        self.revocation.is_revoked(&self.serial).then(|| {
            let serial: String = self.serial.iter().map(|b| format!("{b:02x}")).collect();
            match &self.peer {
                Ok(p) => format!("the certificate of {p} (serial {serial}) is revoked"),
                Err(_) => format!("the certificate with serial {serial} is revoked"),
            }
        })
    }
}

/// The controller's TLS settings and the network's revocation list, read
/// again whenever the list's file changes: new handshakes are checked
/// against it by rustls, requests on connections made before by serial.
pub struct Revocation {
    credentials: Credentials,
    path: Option<PathBuf>,
    state: Mutex<RevocationState>,
}

/// What tells a changed file: modification time, length and inode (a
/// coarse clock may give two quick rewrites the same time; the list is
/// replaced by a rename, so a new file is a new inode).
type FileStamp = (SystemTime, u64, u64);

struct RevocationState {
    /// The list file when read (none: no file).
    stamp: Option<FileStamp>,
    serials: BTreeSet<Vec<u8>>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Revocation {
    /// Reads the credentials and the list at `path` (if any); an unusable
    /// credential or list is an error now.
    pub fn new(
        credentials: Credentials,
        path: Option<PathBuf>,
    ) -> Result<Revocation, snaps_proto::tls::TlsError> {
        let state = Self::read(&credentials, path.as_deref())?;
        Ok(Revocation {
            credentials,
            path,
            state: Mutex::new(state),
        })
    }

    fn stamp_of(path: Option<&Path>) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path?).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    }

    fn read(
        credentials: &Credentials,
        path: Option<&Path>,
    ) -> Result<RevocationState, snaps_proto::tls::TlsError> {
        let stamp = Self::stamp_of(path);
        let serials = match path {
            Some(p) => snaps_proto::tls::revoked_serials(p)?,
            None => BTreeSet::new(),
        };
        let config = credentials.server_config(path)?;
        Ok(RevocationState {
            stamp,
            serials,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        })
    }

    /// The current state, read again if the list's file changed. A list
    /// that cannot be read keeps the previous one in force (and says why).
    fn current(&self) -> std::sync::MutexGuard<'_, RevocationState> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = Self::stamp_of(self.path.as_deref());
        if stamp != state.stamp {
            match Self::read(&self.credentials, self.path.as_deref()) {
                Ok(fresh) => {
                    tracing::info!(path = ?self.path, revoked = fresh.serials.len(), "revocation list read");
                    *state = fresh;
                }
                Err(error) => {
                    tracing::error!(path = ?self.path, %error, "the revocation list cannot be used: the previous one stays in force");
                    state.stamp = stamp;
                }
            }
        }
        state
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.current().acceptor.clone()
    }

    fn is_revoked(&self, serial: &[u8]) -> bool {
        self.current().serials.contains(serial)
    }
}

/// A TLS connection whose client certificate was verified (compressed
/// inside the encryption if the client asked).
pub struct TlsConnection {
    stream: Box<Link<TlsStream<TcpStream>>>,
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
    revocation: Arc<Revocation>,
) -> (
    tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConnection>>,
    tokio::task::JoinHandle<()>,
) {
    accept_each(listener, move |tcp, remote| {
        let acceptor = revocation.acceptor();
        let revocation = revocation.clone();
        async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::warn!(%remote, %error, "refused a connection: TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    tracing::warn!(%remote, "refused a connection: TLS handshake timed out");
                    return None;
                }
            };
            let (peer, serial) = match stream.get_ref().1.peer_certificates() {
                Some([first, ..]) => (
                    peer_of(first).map_err(|e| e.to_string()),
                    serial_of(first).unwrap_or_default(),
                ),
                _ => (
                    Err("the connection has no client certificate".to_string()),
                    Vec::new(),
                ),
            };
            match &peer {
                Ok(p) => tracing::debug!(%remote, peer = %p, "TLS connection"),
                Err(reason) => {
                    tracing::warn!(%remote, %reason, "TLS connection with a certificate naming no SNAPS role")
                }
            }
            let stream = sniff(stream, remote).await?;
            Some(TlsConnection {
                stream: Box::new(stream),
                certified: Certified {
                    peer,
                    remote,
                    serial,
                    revocation,
                },
            })
        }
    })
}

/// Accepts on `listener` and yields what `admit` makes of each connection,
/// in a task per connection so a slow or silent client holds up no other
/// (`None`: refused, and logged by `admit`). The loop ends when the
/// receiver is dropped and the returned task is aborted.
fn accept_each<T, F, Fut>(
    listener: TcpListener,
    admit: F,
) -> (
    tokio_stream::wrappers::ReceiverStream<std::io::Result<T>>,
    tokio::task::JoinHandle<()>,
)
where
    T: Send + 'static,
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = Option<T>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
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
            let admitted = admit(tcp, remote);
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(conn) = admitted.await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

/// Reads a connection's first byte to tell whether it is compressed;
/// `None` (logged) when it starts wrong or sends nothing in time.
async fn sniff<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    remote: SocketAddr,
) -> Option<Link<S>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, Link::accept(stream)).await {
        Ok(Ok(link)) => Some(link),
        Ok(Err(error)) => {
            tracing::warn!(%remote, %error, "refused a connection");
            None
        }
        Err(_) => {
            tracing::warn!(%remote, "refused a connection: it sent nothing");
            None
        }
    }
}

/// A plain-text connection (development mode), compressed if the client
/// asked.
pub struct PlainConnection {
    stream: Link<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for PlainConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PlainConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Accepts on `listener` and yields plain-text connections once their
/// first byte told whether they are compressed.
pub fn plain_incoming(
    listener: TcpListener,
) -> (
    tokio_stream::wrappers::ReceiverStream<std::io::Result<PlainConnection>>,
    tokio::task::JoinHandle<()>,
) {
    accept_each(listener, |tcp, remote| async move {
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(remote),
        };
        let stream = sniff(tcp, remote).await?;
        Some(PlainConnection { stream, info })
    })
}
