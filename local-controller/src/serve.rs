//! Running a site: `site.toml`, creating the site database on first start,
//! registration and initial load, and the SQL endpoint.
//!
//! ```toml
//! site = "CPH"                       # the site code in the network
//! network = "../fixtures/radiology"  # global schema, local schema, mapping
//! database = "CPH/local.db"          # created on first start
//! listen = "127.0.0.1:7701"          # SQL endpoint (PostgreSQL protocol)
//! global = "https://127.0.0.1:7700"  # the global snapshot controller, or a
//!                                    # list of the network's controllers
//!                                    # (one store), tried in order
//! tls = "certs/CPH"                  # ca.pem, cert.pem, key.pem: `snaps certs site CPH`
//! # token = "..."                    # plain text (http://, --insecure) only;
//! #                                  # or token_file = "cph.token"
//! fetch_timeout_ms = 10000           # then answer from local data
//! retry_after_ms = 10000             # after a failure, local answers at once
//! users_file = "users.toml"          # SCRAM logins: `snaps users add`
//!                                    # (without it, --insecure: anyone)
//! sql_tls = "certs/CPH-sql"          # TLS at the SQL endpoint: cert.pem,
//!                                    # key.pem (`snaps certs sql CPH`)
//! sql_tls_required = true            # refuse clients without TLS (default
//!                                    # with sql_tls)
//! max_days = 30                      # evict snapshots unused this long
//! compress = true                    # the connection as one deflate stream
//! ```
//!
//! Relative paths are resolved against the folder of `site.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use snaps_schema::NetworkConfig;

use crate::endpoint::{Login, SqlTls};
use crate::engine::Engine;
use crate::remote::Auth;
use crate::site::{GlobalLink, Site, SiteEngine};
use crate::{Error, Result, SiteStore};

/// `global = "URL"` or `global = ["URL", "URL", …]`: the network's
/// controllers, the first preferred.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Controllers {
    One(String),
    Several(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    site: String,
    network: PathBuf,
    database: PathBuf,
    listen: SocketAddr,
    global: Controllers,
    #[serde(default)]
    tls: Option<PathBuf>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    fetch_timeout_ms: u64,
    #[serde(default = "default_timeout")]
    retry_after_ms: u64,
    #[serde(default)]
    users_file: Option<PathBuf>,
    #[serde(default = "default_max_days")]
    max_days: u32,
    #[serde(default = "default_compress")]
    compress: bool,
    #[serde(default)]
    sql_tls: Option<PathBuf>,
    #[serde(default)]
    sql_tls_required: Option<bool>,
}

fn default_compress() -> bool {
    true
}

fn default_max_days() -> u32 {
    crate::site::DEFAULT_MAX_DAYS
}

fn default_timeout() -> u64 {
    10_000
}

/// A site's configuration, checked and resolved.
#[derive(Debug, Clone)]
pub struct SiteServeConfig {
    /// The site code.
    pub site: String,
    /// The network.
    pub network: NetworkConfig,
    /// The site database.
    pub database: PathBuf,
    /// SQL endpoint address.
    pub listen: SocketAddr,
    /// How the global controller is reached.
    pub link: GlobalLink,
    /// How the SQL endpoint checks logins.
    pub login: Login,
    /// TLS at the SQL endpoint, if configured.
    pub sql_tls: Option<SqlTls>,
    /// Snapshots unused this many days are evicted at the refresh.
    pub max_days: u32,
}

impl SiteServeConfig {
    /// Reads and checks `site.toml`. Without `tls` in it the site talks
    /// plain text with a token, which only `insecure` (the `--insecure`
    /// flag, for development) allows.
    pub fn load(path: &Path, insecure: bool) -> Result<SiteServeConfig> {
        let bad = |m: String| Error::Invalid(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let f: File = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let network = NetworkConfig::load(&dir.join(&f.network))
            .map_err(|e| bad(format!("network = {:?}: {e}", f.network.display())))?;
        network
            .site(&f.site)
            .map_err(|e| bad(format!("site = {:?}: {e}", f.site)))?;
        let auth = match (&f.tls, insecure) {
            (Some(tls), _) => {
                if f.token.is_some() || f.token_file.is_some() {
                    return Err(bad(
                        "give tls or a token, not both: with TLS the certificate is the credential"
                            .into(),
                    ));
                }
                Auth::tls_dir(&dir.join(tls)).map_err(|e| bad(e.to_string()))?
            }
            (None, false) => {
                return Err(bad(format!(
                    "no tls = \"DIR\": give the site's credential directory (made by `snaps \
                     certs site {}`), or run with --insecure to talk plain text (development \
                     only)",
                    f.site
                )));
            }
            (None, true) => Auth::Insecure(match (f.token, f.token_file) {
                (Some(t), None) => t,
                (None, Some(p)) => std::fs::read_to_string(dir.join(&p))
                    .map_err(|e| bad(format!("token file {}: {e}", p.display())))?
                    .trim()
                    .to_string(),
                _ => {
                    return Err(bad(
                        "plain-text mode: give exactly one of token, token_file".into(),
                    ));
                }
            }),
        };
        let login = match (&f.users_file, insecure) {
            (Some(users), _) => {
                let path = dir.join(users);
                // Read now so a broken file stops the start, not every login.
                crate::users::Users::load(&path).map_err(|e| bad(format!("users_file: {e}")))?;
                Login::Scram(path)
            }
            (None, true) => Login::Trust,
            (None, false) => {
                return Err(bad(
                    "no users_file = \"users.toml\": the SQL endpoint needs its users (`snaps \
                     users add`), or run with --insecure to trust every login (development only)"
                        .into(),
                ));
            }
        };
        let sql_tls = match (&f.sql_tls, f.sql_tls_required) {
            (Some(tls), required) => Some(
                SqlTls::from_dir(&dir.join(tls), required.unwrap_or(true))
                    .map_err(|e| bad(format!("sql_tls: {e}")))?,
            ),
            (None, Some(true)) => {
                return Err(bad(format!(
                    "sql_tls_required = true needs sql_tls = \"DIR\": the SQL endpoint's \
                     certificate and key (made by `snaps certs sql {}`)",
                    f.site
                )));
            }
            (None, _) => None,
        };
        if sql_tls.is_none() && !f.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %f.listen,
                "the SQL endpoint listens beyond this machine without TLS: passwords are \
                 safe (SCRAM), the data are not; see sql_tls in site.toml"
            );
        }
        let (addr, fallbacks) = match f.global {
            Controllers::One(a) => (a, Vec::new()),
            Controllers::Several(mut list) => {
                if list.is_empty() {
                    return Err(bad("global = [] names no global controller".into()));
                }
                let first = list.remove(0);
                (first, list)
            }
        };
        Ok(SiteServeConfig {
            site: f.site,
            network,
            database: dir.join(f.database),
            listen: f.listen,
            link: GlobalLink {
                addr,
                fallbacks,
                auth,
                compress: f.compress,
                fetch_timeout: Duration::from_millis(f.fetch_timeout_ms),
                retry_after: Duration::from_millis(f.retry_after_ms),
            },
            login,
            sql_tls,
            max_days: f.max_days,
        })
    }
}

/// Opens the site (creating its database if missing), registers and loads
/// its export when the global controller is reachable — retrying in the
/// background while it is not — and serves SQL on `listener` until
/// `shutdown`.
pub async fn serve_site(
    config: SiteServeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    if !config.database.exists() {
        tracing::info!(site = %config.site, path = %config.database.display(), "creating the site database");
        SiteStore::create_in_network(&config.network, &config.site, &config.database)?;
    }
    let global = config.network.global_catalog()?;
    let site = Site::open(&config.database, &global, Some(config.link.clone()))?;
    site.set_max_days(config.max_days);
    // Load the export once, then take part in the refresh epochs.
    let loader = {
        let site = site.clone();
        tokio::spawn(async move {
            loop {
                match site.initial_load().await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(site = %site.code(), error = %e, "initial load: retrying in 5 s");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
            site.participate().await;
        })
    };
    let engine: Arc<dyn Engine> = Arc::new(SiteEngine(site.clone()));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(site = %site.code(), %addr, "SQL endpoint serving");
    }
    let served = crate::endpoint::serve(
        engine,
        config.login.clone(),
        config.sql_tls.clone(),
        listener,
        shutdown,
    )
    .await;
    loader.abort();
    served.map_err(|e| Error::Io {
        path: PathBuf::from("SQL endpoint"),
        source: e,
    })
}
