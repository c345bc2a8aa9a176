//! The harness the end-to-end tests of sites share: a real global
//! controller on loopback and three radiology sites with generated data,
//! each with its SQL endpoint on a real port, and a PostgreSQL client that
//! collects notices.
#![allow(dead_code)] // each test binary uses part of it

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use snaps::localnet::{LocalNetwork, Options};
use snaps_local::SiteStore;
use snaps_local::engine::Engine;
use snaps_local::site::{GlobalLink, Site, SiteEngine};
use snaps_schema::datagen::{self, Scale};
use snaps_schema::{NetworkConfig, Value};
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

/// Local relation → tuples.
pub type Rows = BTreeMap<String, Vec<Vec<Value>>>;

pub fn network() -> NetworkConfig {
    NetworkConfig::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/radiology"))
        .unwrap()
}

pub struct Net {
    pub dir: tempfile::TempDir,
    /// The SQLite store's file (absent when the store is on PostgreSQL).
    pub store: PathBuf,
    /// Where the global store is.
    pub location: snaps_global::StoreLocation,
    pub global: Option<LocalNetwork>,
    /// Site code → SQL endpoint address.
    pub sites: BTreeMap<String, std::net::SocketAddr>,
    pub data: BTreeMap<String, Rows>,
    pub network: NetworkConfig,
    /// Each site's part in the refresh epochs.
    pub participants: BTreeMap<String, tokio::task::JoinHandle<()>>,
    /// The sites themselves.
    pub handles: BTreeMap<String, Arc<Site>>,
    /// How the controller runs the refresh.
    pub refresh: snaps_global::config::RefreshConfig,
    /// The recording relay the sites reach the controller through, if any.
    pub relay: Option<Relay>,
    /// A second controller on the same (PostgreSQL) store, which the sites
    /// fall back to.
    pub second: Option<LocalNetwork>,
}

/// A TCP relay between the sites and the global controller that keeps
/// every byte crossing it, both ways.
#[derive(Clone)]
pub struct Relay {
    pub addr: std::net::SocketAddr,
    pub bytes: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Relay {
    /// Relays connections on a free port to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            bytes: Arc::default(),
        };
        let bytes = relay.bytes.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(
                        Relay::copy(ri, wo, bytes.clone()),
                        Relay::copy(ro, wi, bytes)
                    );
                });
            }
        });
        relay
    }

    async fn copy(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        bytes: Arc<std::sync::Mutex<Vec<u8>>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            bytes.lock().unwrap().extend_from_slice(&buf[..n]);
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    /// Everything relayed so far.
    pub fn captured(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub async fn setup(patients: usize) -> Net {
    setup_with(patients, |_| {}).await
}

/// The network with the controller's options changed by `configure`.
pub async fn setup_with(patients: usize, configure: impl FnOnce(&mut Options)) -> Net {
    setup_full(patients, configure, |_| {}, false, false).await
}

/// As [`setup_with`], the global store in a database of its own on the
/// PostgreSQL server this test binary shares.
pub async fn setup_on_postgres(patients: usize, configure: impl FnOnce(&mut Options)) -> Net {
    setup_full(patients, configure, |_| {}, false, true).await
}

/// A fresh database on the shared PostgreSQL server; its URL.
pub fn postgres_database() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    snaps::pg_server::PgServer::shared()
        .expect("the PostgreSQL server for the tests")
        .create_database(&format!("net_{n}"))
        .expect("a test database")
}

/// The network with the sites reaching the controller through a recording
/// [`Relay`], uncompressed, so a test can read what crosses the wire; the
/// generated data (site → relation → tuples) is changed by `prepare`
/// before the sites load it.
pub async fn setup_relayed(
    patients: usize,
    prepare: impl FnOnce(&mut BTreeMap<String, Rows>),
) -> Net {
    setup_full(patients, |_| {}, prepare, true, false).await
}

async fn setup_full(
    patients: usize,
    configure: impl FnOnce(&mut Options),
    prepare: impl FnOnce(&mut BTreeMap<String, Rows>),
    relayed: bool,
    on_postgres: bool,
) -> Net {
    setup_stores(patients, configure, prepare, relayed, on_postgres, false).await
}

/// As [`setup_on_postgres`], with a second controller on the store that the
/// sites fall back to when the first cannot be reached.
pub async fn setup_two_controllers(patients: usize, configure: impl FnOnce(&mut Options)) -> Net {
    setup_stores(patients, configure, |_| {}, false, true, true).await
}

async fn setup_stores(
    patients: usize,
    configure: impl FnOnce(&mut Options),
    prepare: impl FnOnce(&mut BTreeMap<String, Rows>),
    relayed: bool,
    on_postgres: bool,
    two: bool,
) -> Net {
    let network = network();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("global.db");
    let location = if on_postgres {
        snaps_global::StoreLocation::Postgres(postgres_database())
    } else {
        snaps_global::StoreLocation::Sqlite(store.clone())
    };
    let mut options = Options::new(&network);
    options.refresh.collect_timeout = Duration::from_secs(30);
    options.refresh.distribute_timeout = Duration::from_secs(30);
    configure(&mut options);
    let refresh = options.refresh.clone();
    let second_options = Options {
        tokens: options.tokens.clone(),
        admin: options.admin.clone(),
        refresh: options.refresh.clone(),
        ..Options::new(&network)
    };
    let global = LocalNetwork::start_with(network.clone(), location.clone(), options)
        .await
        .unwrap();
    let second = if two {
        Some(
            LocalNetwork::start_with(network.clone(), location.clone(), second_options)
                .await
                .unwrap(),
        )
    } else {
        None
    };
    let mut data: BTreeMap<String, Rows> = datagen::generate(&network, &Scale::new(patients), 42)
        .unwrap()
        .into_iter()
        .map(|(c, d)| (c.to_string(), d.rows))
        .collect();
    prepare(&mut data);
    let catalog = network.global_catalog().unwrap();
    let relay = if relayed {
        Some(Relay::start(global.addr.trim_start_matches("http://").to_string()).await)
    } else {
        None
    };
    let site_addr = match &relay {
        Some(r) => format!("http://{}", r.addr),
        None => global.addr.clone(),
    };
    let mut sites = BTreeMap::new();
    let mut participants = BTreeMap::new();
    let mut handles = BTreeMap::new();
    for (code, rows) in &data {
        let path = dir.path().join(code).join("local.db");
        let mut store = SiteStore::create_in_network(&network, code, &path).unwrap();
        for (relation, tuples) in rows {
            store.load(relation, tuples).unwrap();
        }
        drop(store);
        let link = GlobalLink {
            addr: site_addr.clone(),
            fallbacks: second.iter().map(|g| g.addr.clone()).collect(),
            auth: global.site_auth(code).unwrap(),
            compress: relay.is_none(),
            fetch_timeout: Duration::from_secs(5),
            // The restart test asks again right after the controller is back.
            retry_after: Duration::ZERO,
        };
        let site = Site::open(&path, &catalog, Some(link)).unwrap();
        site.initial_load().await.unwrap();
        participants.insert(code.clone(), tokio::spawn(site.clone().participate()));
        handles.insert(code.clone(), site.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        sites.insert(code.clone(), listener.local_addr().unwrap());
        let engine: Arc<dyn Engine> = Arc::new(SiteEngine(site));
        tokio::spawn(snaps_local::endpoint::serve(
            engine,
            snaps_local::endpoint::Login::Trust,
            None,
            listener,
            std::future::pending(),
        ));
    }
    let net = Net {
        dir,
        store,
        location,
        global: Some(global),
        sites,
        data,
        network,
        participants,
        handles,
        refresh,
        relay,
        second,
    };
    net.wait_subscribed(3).await;
    net
}

impl Net {
    /// Waits until `n` sites keep their Subscribe stream open (they take
    /// part in the next epoch).
    pub async fn wait_subscribed(&self, n: usize) {
        for _ in 0..250 {
            let connected = self.handles.values().filter(|s| s.subscribed()).count();
            if connected >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the sites did not subscribe to refresh epochs");
    }

    /// Kills the global controller, as a crash would, and starts it again
    /// on the same address with the same store and credentials (halting
    /// its epochs at `halt`, if given).
    pub async fn restart_global(&mut self, halt: Option<snaps_global::epochs::Halt>) {
        self.restart_global_after(halt, |_| {}).await;
    }

    /// Kills the global controller, moves its SQLite store into a fresh
    /// PostgreSQL database (`snaps global migrate`) and starts the
    /// controller again there; what was moved. `inspect` reads the store
    /// just before the move and `inspect_moved` just after, both while
    /// the controller is down: a live one writes counters and
    /// subscriptions every second.
    pub async fn move_store_to_postgres(
        &mut self,
        inspect: impl FnOnce(&Net),
        inspect_moved: impl FnOnce(&Net),
    ) -> Vec<snaps_global::sql_store::migrate::Moved> {
        let mut moved = Vec::new();
        self.restart_global_after(None, |net| {
            inspect(net);
            let url = postgres_database();
            let config = snaps_global::GlobalConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                snaps_global::StoreLocation::Postgres(url.clone()),
                net.network.clone(),
                BTreeMap::new(),
                BTreeMap::new(),
                BTreeMap::new(),
            )
            .unwrap();
            moved = snaps_global::sql_store::migrate::migrate(
                &net.store,
                &url,
                &config,
                &mut |_, _| {},
            )
            .expect("move the store");
            net.location = snaps_global::StoreLocation::Postgres(url);
            inspect_moved(net);
        })
        .await;
        moved
    }

    /// As [`Net::restart_global`], doing `between` while it is down.
    pub async fn restart_global_after(
        &mut self,
        halt: Option<snaps_global::epochs::Halt>,
        between: impl FnOnce(&mut Net),
    ) {
        let old = self.global.take().expect("a running controller");
        let addr: std::net::SocketAddr = old.addr.trim_start_matches("http://").parse().unwrap();
        let (tokens, admin) = (old.tokens.clone(), old.admin.clone());
        old.kill();
        between(self);
        let options = Options {
            addr,
            tokens,
            admin,
            refresh: self.refresh.clone(),
            halt,
            ..Options::new(&self.network)
        };
        // The port is free once the killed runtime has let go of it.
        for attempt in 0.. {
            match LocalNetwork::start_with(
                self.network.clone(),
                self.location.clone(),
                options.clone(),
            )
            .await
            {
                Ok(g) => {
                    self.global = Some(g);
                    self.wait_resubscribed().await;
                    return;
                }
                Err(_) if attempt < 50 => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("restart the global controller: {e}"),
            }
        }
    }

    /// Waits until the controller counts every site taking part in the
    /// refresh as subscribed: an epoch opened before a site reconnects
    /// would go on without it.
    async fn wait_resubscribed(&self) {
        let Some(code) = self.participants.keys().next() else {
            return;
        };
        let client = self.global.as_ref().unwrap().client(code).await.unwrap();
        for _ in 0..500 {
            let status = client.status().await.unwrap();
            let subscribed = status
                .sites
                .iter()
                .filter(|s| s.subscribed && self.participants.contains_key(&s.code))
                .count();
            if subscribed == self.participants.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the sites did not subscribe to the restarted controller");
    }

    /// Stops site `code`'s part in the refresh and opens the site afresh on
    /// its database, as a restarted process would (halting its refresh at
    /// `halt`, if given), taking part again.
    pub async fn restart_site(&mut self, code: &str, halt: Option<snaps_local::refresh::Halt>) {
        let addr = self
            .global
            .as_ref()
            .expect("a running controller")
            .addr
            .clone();
        let site = self.rejoin(code, addr, halt);
        self.handles.insert(code.to_string(), site);
    }

    /// Stops site `code`'s part in the refresh and opens the site afresh on
    /// its database, taking part through the controller at `addr` (halting
    /// its refresh at `halt`, if given).
    fn rejoin(
        &mut self,
        code: &str,
        addr: String,
        halt: Option<snaps_local::refresh::Halt>,
    ) -> Arc<Site> {
        if let Some(p) = self.participants.remove(code) {
            p.abort();
        }
        let link = GlobalLink {
            addr,
            fallbacks: Vec::new(),
            auth: self.global.as_ref().unwrap().site_auth(code).unwrap(),
            compress: true,
            fetch_timeout: Duration::from_secs(5),
            retry_after: Duration::ZERO,
        };
        let path = self.dir.path().join(code).join("local.db");
        let site = Site::open(&path, &self.network.global_catalog().unwrap(), Some(link)).unwrap();
        if let Some(h) = halt {
            site.halt_at(h);
        }
        self.participants
            .insert(code.to_string(), tokio::spawn(site.clone().participate()));
        site
    }

    /// Stops site `code`'s part in the refresh and has it take part again
    /// through the second controller on the store, as a site whose first
    /// controller is out of its reach would (its SQL endpoint stays as it
    /// is). Waits until the store records it subscribed there.
    pub async fn follow_second(&mut self, code: &str) {
        let second = self.second.as_ref().unwrap().addr.clone();
        self.rejoin(code, second.clone(), None);
        let number = self.network.site(code).unwrap().number;
        for _ in 0..500 {
            let rows = global_query(
                self,
                &format!(
                    "SELECT controller FROM snaps_subscribed WHERE site = {}",
                    number.0
                ),
            );
            let at: Vec<String> = rows.iter().map(|r| r.text(0).unwrap()).collect();
            let port = |c: &String| format!(":{}", c.rsplit(':').next().unwrap_or_default());
            if at.iter().any(|c| second.ends_with(&port(c))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{code} did not subscribe to the second controller");
    }

    /// Runs one refresh epoch through the administrator's interface and
    /// returns its summary.
    pub async fn refresh(&self) -> snaps_proto::v1::RefreshSummary {
        let admin = self.global.as_ref().unwrap().admin_client().await.unwrap();
        let mut progress = admin.run_refresh().await.unwrap();
        let mut last = None;
        while let Some(p) = progress.message().await.unwrap() {
            last = p.summary.or(last);
        }
        last.expect("the refresh ended without a summary")
    }
}

/// A client of a site's SQL endpoint, with the notices it receives.
pub struct Client {
    pub client: tokio_postgres::Client,
    pub notices: tokio::sync::mpsc::UnboundedReceiver<String>,
}

pub async fn connect(addr: std::net::SocketAddr) -> Client {
    connect_as(addr, "radiology").await
}

/// A client logged in as `user` (the endpoints of these tests trust the
/// login, whose name is also the user code).
pub async fn connect_as(addr: std::net::SocketAddr, user: &str) -> Client {
    let (client, mut connection) = tokio_postgres::connect(
        &format!("host={} port={} user={user}", addr.ip(), addr.port()),
        NoTls,
    )
    .await
    .unwrap();
    let (tx, notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = futures::StreamExt::next(&mut messages).await {
            match m {
                Ok(AsyncMessage::Notice(n)) => {
                    let _ = tx.send(n.message().to_string());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    Client { client, notices }
}

/// Rows as text, sorted, and the notices of one statement text.
pub async fn run(c: &mut Client, text: &str) -> (Vec<Vec<Option<String>>>, Vec<String>) {
    let messages = c
        .client
        .simple_query(text)
        .await
        .unwrap_or_else(|e| match e.as_db_error() {
            Some(db) => panic!("{text}: {} {}", db.code().code(), db.message()),
            None => panic!("{text}: {e}"),
        });
    tokio::task::yield_now().await;
    let mut notices = Vec::new();
    while let Ok(n) = c.notices.try_recv() {
        notices.push(n);
    }
    let mut rows: Vec<Vec<Option<String>>> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect();
    rows.sort();
    (rows, notices)
}

/// A counter of `snaps_stats` in a site's database file.
pub fn stat(site_db: &Path, name: &str) -> i64 {
    let conn = rusqlite::Connection::open(site_db).unwrap();
    conn.query_row(
        "SELECT value FROM snaps_stats WHERE name = ?1",
        [name],
        |r| r.get(0),
    )
    .unwrap()
}

/// A site's database file.
pub fn db(net: &Net, code: &str) -> PathBuf {
    net.dir.path().join(code).join("local.db")
}

/// An integer value.
pub fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        v => panic!("not an integer: {v:?}"),
    }
}

/// The patient numbers of a site's own patients.
pub fn patients(net: &Net, code: &str) -> Vec<i64> {
    net.data[code]["patient"]
        .iter()
        .map(|r| int(&r[0]))
        .collect()
}

/// The one value a statement returns through a site's endpoint.
pub async fn one(c: &mut Client, text: &str) -> Option<String> {
    let (rows, _) = run(c, text).await;
    assert_eq!(rows.len(), 1, "{text}: {rows:?}");
    rows[0][0].clone()
}

/// The SQLSTATE and message of a statement the site refuses.
pub async fn refused(c: &Client, text: &str) -> (String, String) {
    let e = c
        .client
        .simple_query(text)
        .await
        .expect_err(&format!("{text} should have been refused"));
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("{text}: not a database error: {e}"));
    (db.code().code().to_string(), db.message().to_string())
}

/// Runs `sql` on the network's global store (SQLite or PostgreSQL alike);
/// its rows.
pub fn global_query(net: &Net, sql: &str) -> Vec<snaps_global::db::Row> {
    use snaps_global::db::Db;
    fn run(db: &impl Db, sql: &str) -> Vec<snaps_global::db::Row> {
        db.transaction(&mut |tx| tx.query(sql, &[]))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
    match &net.location {
        snaps_global::StoreLocation::Sqlite(p) => {
            run(&snaps_global::db::sqlite::SqliteDb::open(p).unwrap(), sql)
        }
        snaps_global::StoreLocation::Postgres(url) => run(
            &snaps_global::db::postgres::PgDb::connect(url).unwrap(),
            sql,
        ),
    }
}

/// The rows of `sql` on the global store, each as text, sorted.
pub fn global_table(net: &Net, sql: &str) -> Vec<String> {
    let mut rows: Vec<String> = global_query(net, sql)
        .into_iter()
        .map(|r| format!("{:?}", r.0))
        .collect();
    rows.sort();
    rows
}

/// The audit trail's records of `site`, read with the administrator's
/// client.
pub async fn site_trail(
    admin: &snaps_local::remote::GlobalClient,
    site: &str,
) -> Vec<snaps_proto::v1::AuditEntry> {
    admin
        .audit(snaps_proto::v1::AuditRequest {
            site: site.into(),
            ..Default::default()
        })
        .await
        .unwrap()
}
