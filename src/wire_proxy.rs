//! A counting TCP proxy: forwards every connection it accepts on loopback to
//! a target address and counts, at its sockets, the bytes each way, the
//! connections, and the round trips.
//!
//! A round trip is a turn of the conversation: the server starts sending
//! after the client has sent something since the server last spoke. That is
//! what a client waits for on a slow line, whatever the protocol (gRPC over
//! HTTP/2, the PostgreSQL protocol). Each new connection costs one more
//! (the TCP handshake).
//!
//! A proxy may also stand for a slow line ([`Line`]): each direction sends
//! one chunk after another at the line's rate and delivers it the one-way
//! delay later, so what crosses it takes as long as it would on the line
//! (TCP's own pacing aside).

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

/// A line a shaped proxy stands for.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    /// Its rate, each direction.
    pub bits_per_second: f64,
    /// Half its round-trip time.
    pub one_way: std::time::Duration,
}

impl Line {
    /// How long `bytes` take to go onto the line.
    fn sending(&self, bytes: usize) -> std::time::Duration {
        std::time::Duration::from_secs_f64(bytes as f64 * 8.0 / self.bits_per_second)
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
        Self::start_with(target, None).await
    }

    /// The same, through `line` when given.
    pub async fn start_with(target: SocketAddr, line: Option<Line>) -> Result<WireProxy> {
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
                        forward(client, server, c, line).await;
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

/// Copies both ways until either side closes, through `line` if given.
async fn forward(
    client: TcpStream,
    server: TcpStream,
    counters: Arc<Counters>,
    line: Option<Line>,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // True while the client spoke last on this connection.
    let client_spoke = Arc::new(AtomicBool::new(false));
    let (c_up, s_up) = (counters.clone(), client_spoke.clone());
    let up = pump(client_read, server_write, line, move |n| {
        c_up.up.fetch_add(n as u64, Ordering::SeqCst);
        s_up.store(true, Ordering::SeqCst);
    });
    let down = pump(server_read, client_write, line, move |n| {
        if client_spoke.swap(false, Ordering::SeqCst) {
            counters.round_trips.fetch_add(1, Ordering::SeqCst);
        }
        counters.down.fetch_add(n as u64, Ordering::SeqCst);
    });
    tokio::join!(up, down);
}

/// One direction: counts each chunk read (`count`), then writes it on,
/// at once or as `line` would deliver it.
async fn pump(
    mut read: tokio::net::tcp::OwnedReadHalf,
    mut write: tokio::net::tcp::OwnedWriteHalf,
    line: Option<Line>,
    count: impl Fn(usize),
) {
    let mut buf = vec![0u8; 64 * 1024];
    let Some(line) = line else {
        loop {
            let n = match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            count(n);
            if write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
        return;
    };
    // Chunks in order with the time each arrives at the far end.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let deliver = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if write.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    };
    let receive = async move {
        // When the line has sent everything queued so far.
        let mut free = tokio::time::Instant::now();
        loop {
            let n = match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            count(n);
            free = free.max(tokio::time::Instant::now()) + line.sending(n);
            if tx.send((free + line.one_way, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    tokio::join!(receive, deliver);
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

    #[tokio::test]
    async fn a_shaped_proxy_takes_the_lines_time_and_counts_the_same() {
        // 1,000 bytes each way at 80,000 bit/s: 0.1 s each way, plus 50 ms
        // each way.
        let line = Line {
            bits_per_second: 80_000.0,
            one_way: std::time::Duration::from_millis(50),
        };
        let proxy = WireProxy::start_with(echo().await, Some(line))
            .await
            .expect("proxy");
        let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
        let started = std::time::Instant::now();
        let sent = vec![7u8; 1000];
        c.write_all(&sent).await.expect("write");
        let mut back = vec![0u8; 1000];
        c.read_exact(&mut back).await.expect("read");
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
        assert_eq!(back, sent, "every byte arrives, in order");
        let w = proxy.wire();
        assert_eq!((w.up, w.down), (1000, 1000));
    }
}
