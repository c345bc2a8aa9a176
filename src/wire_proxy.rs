//! A counting TCP proxy: forwards every connection it accepts on loopback to
//! a target address and counts, at its sockets, the bytes each way, the
//! connections, and the round trips.
//!
//! A round trip is a turn of the conversation: the server starts sending
//! after the client has sent something since the server last spoke. That is
//! what a client waits for on a slow line, whatever the protocol (gRPC over
//! HTTP/2, the PostgreSQL protocol). Each new connection costs one more
//! (the TCP handshake).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What a proxy counted, so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wire {
    /// Bytes from the client to the server.
    pub up: u64,
    /// Bytes from the server to the client.
    pub down: u64,
    /// Turns of the conversation plus one per new connection.
    pub round_trips: u64,
}

impl Wire {
    /// Both directions.
    pub fn bytes(&self) -> u64 {
        self.up + self.down
    }

    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Wire) -> Wire {
        Wire {
            up: self.up - earlier.up,
            down: self.down - earlier.down,
            round_trips: self.round_trips - earlier.round_trips,
        }
    }

    /// Adds another count.
    pub fn add(&mut self, other: &Wire) {
        self.up += other.up;
        self.down += other.down;
        self.round_trips += other.round_trips;
    }
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    round_trips: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct WireProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl WireProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Result<WireProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("listen for the counting proxy")?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        c.round_trips.fetch_add(1, Ordering::Relaxed);
                        forward(client, server, c).await;
                    }
                });
            }
        });
        Ok(WireProxy {
            addr,
            counters,
            task,
        })
    }

    /// The counts so far.
    pub fn wire(&self) -> Wire {
        Wire {
            up: self.counters.up.load(Ordering::SeqCst),
            down: self.counters.down.load(Ordering::SeqCst),
            round_trips: self.counters.round_trips.load(Ordering::SeqCst),
        }
    }
}

impl Drop for WireProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until either side closes.
async fn forward(client: TcpStream, server: TcpStream, counters: Arc<Counters>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // True while the client spoke last on this connection.
    let client_spoke = Arc::new(AtomicBool::new(false));
    let (c_up, s_up) = (counters.clone(), client_spoke.clone());
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            c_up.up.fetch_add(n as u64, Ordering::SeqCst);
            s_up.store(true, Ordering::SeqCst);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if client_spoke.swap(false, Ordering::SeqCst) {
                counters.round_trips.fetch_add(1, Ordering::SeqCst);
            }
            counters.down.fetch_add(n as u64, Ordering::SeqCst);
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server: every request gets its bytes back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn counts_bytes_both_ways_and_one_round_trip_per_turn() {
        let proxy = WireProxy::start(echo().await).await.expect("proxy");
        let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
        let mut buf = [0u8; 5];
        for _ in 0..3 {
            c.write_all(b"hello").await.expect("write");
            c.read_exact(&mut buf).await.expect("read");
        }
        // The last reply is counted before it is forwarded.
        let w = proxy.wire();
        assert_eq!((w.up, w.down), (15, 15));
        // The connection, then three turns.
        assert_eq!(w.round_trips, 4);
        let later = proxy.wire();
        assert_eq!(later.since(&w), Wire::default());
    }
}
