//! A SNAPS network on loopback: the global snapshot controller in this
//! process on a free port, with a fresh credential per site, and helpers to
//! connect as a site and load its export. Used by the demo, the
//! end-to-end tests and the benchmarks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use snaps_global::{GlobalConfig, GlobalController};
use snaps_local::remote::{Auth, GlobalClient, export_batches};
use snaps_mapping::SiteMapping;
use snaps_proto::v1;
use snaps_schema::{NetworkConfig, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running global controller and what a site needs to reach it.
pub struct LocalNetwork {
    /// The network.
    pub network: NetworkConfig,
    /// `https://127.0.0.1:port` (`http://` in plain-text mode).
    pub addr: String,
    /// Site code → token (plain-text mode).
    pub tokens: BTreeMap<String, String>,
    /// The administrator's token (plain-text mode).
    pub admin: String,
    /// The credential folder made by [`issue_certificates`]; none: plain
    /// text.
    pub tls: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<snaps_global::Result<()>>>,
    /// The controller runs on a runtime of its own, so that killing it
    /// ends every task it started, as a crash of its process would.
    runtime: Option<tokio::runtime::Runtime>,
}

/// A token nobody can guess from the site code or the time alone.
pub fn new_token(code: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::from(code);
    out.push('-');
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(code.as_bytes());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// How a network on loopback is started.
#[derive(Clone)]
pub struct Options {
    /// Extra indexes of the global store.
    pub indexes: BTreeMap<String, Vec<Vec<String>>>,
    /// Where the controller listens.
    pub addr: SocketAddr,
    /// Site code → token.
    pub tokens: BTreeMap<String, String>,
    /// The administrator's token.
    pub admin: String,
    /// How the refresh runs.
    pub refresh: snaps_global::config::RefreshConfig,
    /// Where its epochs stop, as a crash would (tests).
    pub halt: Option<snaps_global::epochs::Halt>,
    /// TLS with the credentials in this folder ([`issue_certificates`]);
    /// none: plain text with the tokens (development and tests).
    pub tls: Option<PathBuf>,
}

/// Creates a network CA in `dir` with the global controller's certificate
/// (for `localhost` and `127.0.0.1`), an administrator's, and every site's
/// of `network`, each in its own folder (`dir/global`, `dir/admin`,
/// `dir/CPH`, ...).
pub fn issue_certificates(dir: &std::path::Path, network: &NetworkConfig) -> Result<()> {
    snaps_proto::tls::issue_network(
        dir,
        &network.name,
        &["localhost".to_string(), "127.0.0.1".to_string()],
    )?;
    let local = ["localhost".to_string(), "127.0.0.1".to_string()];
    for s in &network.sites {
        snaps_proto::tls::issue_site(dir, s.code.as_str())?;
        snaps_proto::tls::issue_sql(dir, s.code.as_str(), &local)?;
    }
    Ok(())
}

impl Options {
    /// Fresh credentials, a free port, the default refresh.
    pub fn new(network: &NetworkConfig) -> Options {
        Options {
            indexes: BTreeMap::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: network
                .sites
                .iter()
                .map(|s| (s.code.to_string(), new_token(s.code.as_str())))
                .collect(),
            admin: new_token("admin"),
            refresh: Default::default(),
            halt: None,
            tls: None,
        }
    }
}

impl LocalNetwork {
    /// Starts the global controller of `network` with its store at `store`,
    /// on a free loopback port, with the given extra indexes.
    pub async fn start(
        network: NetworkConfig,
        store: PathBuf,
        indexes: BTreeMap<String, Vec<Vec<String>>>,
    ) -> Result<LocalNetwork> {
        let options = Options {
            indexes,
            ..Options::new(&network)
        };
        LocalNetwork::start_with(network, store, options).await
    }

    /// Starts the global controller on `addr` with the given site tokens
    /// (code → token): a restart on the address and credentials sites
    /// already know.
    pub async fn start_at(
        network: NetworkConfig,
        store: PathBuf,
        indexes: BTreeMap<String, Vec<Vec<String>>>,
        addr: SocketAddr,
        tokens: BTreeMap<String, String>,
    ) -> Result<LocalNetwork> {
        let options = Options {
            indexes,
            addr,
            tokens,
            ..Options::new(&network)
        };
        LocalNetwork::start_with(network, store, options).await
    }

    /// Starts the global controller with every option.
    pub async fn start_with(
        network: NetworkConfig,
        store: impl Into<snaps_global::StoreLocation>,
        options: Options,
    ) -> Result<LocalNetwork> {
        let Options {
            indexes,
            addr,
            tokens,
            admin,
            refresh,
            halt,
            tls,
        } = options;
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let local: SocketAddr = listener.local_addr()?;
        let mut config = GlobalConfig::new(
            local,
            store,
            network.clone(),
            BTreeMap::new(),
            indexes,
            tokens.iter().map(|(c, t)| (t.clone(), c.clone())).collect(),
        )?;
        config.set_refresh(refresh)?;
        config.admin_token = Some(admin.clone());
        config.tls = tls
            .as_ref()
            .map(|d| snaps_proto::tls::Credentials::in_dir(d.join("global")));
        config.revoked = tls.as_ref().map(|d| d.join(snaps_proto::tls::REVOKED_FILE));
        let mut controller = GlobalController::open(config)?;
        if let Some(h) = halt {
            controller.halt_at(h);
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("global-controller")
            .enable_all()
            .build()?;
        let task = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            controller
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(LocalNetwork {
            network,
            addr: format!("{}://{local}", if tls.is_some() { "https" } else { "http" }),
            tokens,
            admin,
            tls,
            stop: Some(stop),
            task: Some(task),
            runtime: Some(runtime),
        })
    }

    /// Stops the controller at once, as a crash would: requests under way
    /// are dropped, nothing more is written.
    pub fn kill(mut self) {
        self.stop.take();
        self.task.take();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// How the administrator proves who it is.
    pub fn admin_auth(&self) -> Result<Auth> {
        Ok(match &self.tls {
            Some(dir) => Auth::tls_dir(&dir.join("admin"))?,
            None => Auth::Insecure(self.admin.clone()),
        })
    }

    /// How site `code` proves who it is.
    pub fn site_auth(&self, code: &str) -> Result<Auth> {
        self.network.site(code)?;
        Ok(match &self.tls {
            Some(dir) => Auth::tls_dir(&dir.join(code))?,
            None => Auth::Insecure(
                self.tokens
                    .get(code)
                    .with_context(|| format!("no token for site {code}"))?
                    .clone(),
            ),
        })
    }

    /// TLS for site `code`'s SQL endpoint, offered to clients that ask for
    /// it, where the network's credentials include the endpoint's
    /// certificate (`CODE-sql`).
    pub fn sql_tls(&self, code: &str) -> Result<Option<snaps_local::endpoint::SqlTls>> {
        let Some(dir) = self.tls.as_ref().map(|d| d.join(format!("{code}-sql"))) else {
            return Ok(None);
        };
        if !dir.exists() {
            return Ok(None);
        }
        Ok(Some(snaps_local::endpoint::SqlTls::from_dir(&dir, false)?))
    }

    /// Connects as the network's administrator.
    pub async fn admin_client(&self) -> Result<GlobalClient> {
        Ok(GlobalClient::connect(&self.addr, &self.admin_auth()?, None).await?)
    }

    /// Connects as site `code`.
    pub async fn client(&self, code: &str) -> Result<GlobalClient> {
        self.client_with(code, true).await
    }

    /// Connects as site `code`, compressing the connection or not.
    pub async fn client_with(&self, code: &str, compress: bool) -> Result<GlobalClient> {
        let auth = self.site_auth(code)?;
        Ok(GlobalClient::connect_with(&self.addr, &auth, Some(code), compress).await?)
    }

    /// The mapping of site `code`.
    pub fn mapping(&self, code: &str) -> Result<SiteMapping> {
        site_mapping(&self.network, code)
    }

    /// Stops the controller and waits for it to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await??;
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        Ok(())
    }
}

impl Drop for LocalNetwork {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Let the controller finish its shutdown (counters written) on a
        // thread of its own: a runtime cannot be dropped inside another.
        if let (Some(rt), task) = (self.runtime.take(), self.task.take()) {
            std::thread::spawn(move || {
                if let Some(t) = task {
                    let _ = rt.block_on(async {
                        tokio::time::timeout(std::time::Duration::from_secs(5), t).await
                    });
                }
                drop(rt);
            });
        }
    }
}

/// Reads a site's mapping from the network folder.
pub fn site_mapping(network: &NetworkConfig, code: &str) -> Result<SiteMapping> {
    let site = network.site(code)?;
    let local = network.local_catalog(site)?;
    let global = network.global_catalog()?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(network.path(p))
            .with_context(|| format!("{}", network.path(p).display()))
    };
    let mapping = read(&site.mapping)?;
    let qualification = match &site.qualification {
        Some(q) => read(q)?,
        None => String::new(),
    };
    Ok(SiteMapping::from_text(
        &mapping,
        &qualification,
        &local,
        &global,
    )?)
}

/// Loads a site's export of every mapped relation in `rows` (local relation
/// → tuples), numbering each relation's tuples 1, 2, ... as their origins.
pub async fn load_site(
    client: &GlobalClient,
    mapping: &SiteMapping,
    rows: &BTreeMap<String, Vec<Vec<Value>>>,
    batch_rows: usize,
) -> Result<v1::LoadReply> {
    let mut batches = Vec::new();
    for rm in mapping.relations() {
        let Some(tuples) = rows.get(&rm.local.name) else {
            continue;
        };
        let numbered: Vec<(u64, Vec<Value>)> = tuples
            .iter()
            .enumerate()
            .map(|(i, t)| (i as u64 + 1, t.clone()))
            .collect();
        batches.extend(export_batches(rm, &numbered, batch_rows)?);
    }
    Ok(client.load(batches).await?)
}

/// A site running in this process: its database, its SQL endpoint.
pub struct RunningSite {
    /// Its database file.
    pub database: PathBuf,
    /// Its SQL endpoint.
    pub sql: SocketAddr,
    /// Tuples its initial load sent to the global snapshot now (0 when an
    /// earlier run loaded them).
    pub loaded: u64,
    /// The endpoint's task.
    pub endpoint: JoinHandle<std::io::Result<()>>,
    /// The site, for tests that drive it directly.
    pub site: std::sync::Arc<snaps_local::site::Site>,
    /// Its part in the refresh epochs.
    pub participant: JoinHandle<()>,
}

/// Opens site `code`'s database (which must exist) against `global`, loads
/// its export once, and serves its SQL endpoint on `sql` until `shutdown`,
/// checking logins as `login` says.
pub async fn run_site(
    global: &LocalNetwork,
    code: &str,
    database: PathBuf,
    sql: SocketAddr,
    login: snaps_local::endpoint::Login,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<RunningSite> {
    let link = snaps_local::site::GlobalLink {
        addr: global.addr.clone(),
        fallbacks: Vec::new(),
        auth: global.site_auth(code)?,
        compress: true,
        fetch_timeout: std::time::Duration::from_secs(10),
        retry_after: std::time::Duration::from_secs(10),
    };
    let site =
        snaps_local::site::Site::open(&database, &global.network.global_catalog()?, Some(link))
            .with_context(|| format!("open site {code} at {}", database.display()))?;
    let loaded = site
        .initial_load()
        .await
        .with_context(|| format!("initial load of {code}"))?;
    let listener = tokio::net::TcpListener::bind(sql)
        .await
        .with_context(|| format!("listen on {sql} for site {code}"))?;
    let sql = listener.local_addr()?;
    let participant = tokio::spawn(site.clone().participate());
    let engine: std::sync::Arc<dyn snaps_local::engine::Engine> =
        std::sync::Arc::new(snaps_local::site::SiteEngine(site.clone()));
    let sql_tls = global.sql_tls(code)?;
    let endpoint = tokio::spawn(snaps_local::endpoint::serve(
        engine, login, sql_tls, listener, shutdown,
    ));
    Ok(RunningSite {
        database,
        sql,
        loaded,
        endpoint,
        site,
        participant,
    })
}

/// Creates each site's database under `dir/<CODE>/local.db` with `data` as
/// its own tuples, and runs it ([`run_site`]) on a free loopback port until
/// the runtime ends.
pub async fn start_sites(
    global: &LocalNetwork,
    dir: &std::path::Path,
    data: &BTreeMap<String, BTreeMap<String, Vec<Vec<Value>>>>,
) -> Result<BTreeMap<String, RunningSite>> {
    let mut out = BTreeMap::new();
    for (code, rows) in data {
        let database = dir.join(code).join("local.db");
        let mut store =
            snaps_local::SiteStore::create_in_network(&global.network, code, &database)?;
        for (relation, tuples) in rows {
            store.load(relation, tuples)?;
        }
        drop(store);
        let free: SocketAddr = "127.0.0.1:0".parse()?;
        let site = run_site(
            global,
            code,
            database,
            free,
            snaps_local::endpoint::Login::Trust,
            std::future::pending(),
        )
        .await?;
        out.insert(code.clone(), site);
    }
    Ok(out)
}
