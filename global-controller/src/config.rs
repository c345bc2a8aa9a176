//! `global.toml`: how the global snapshot controller is run.
//!
//! ```toml
//! listen = "127.0.0.1:7400"          # where sites connect
//! store = "global.db"                # SQLite file, created on first start,
//!                                    # or a PostgreSQL server's database:
//!                                    # "postgresql://snaps@db:5432/snaps"
//! # store_ca = "db-ca.pem"           # PostgreSQL over TLS (with
//!                                    # ?sslmode=require in the URL)
//! network = "../fixtures/radiology"  # global schema, sites, key ranges, modes
//!
//! [relations]                        # optional: overrides network.toml's modes
//! doctor = "read-only"
//!
//! [indexes]                          # attributes selected often, besides keys
//! patient = [["surname"], ["dob"]]
//! visit = [["pno"]]
//!
//! [tls]                              # certificates: `snaps certs init`
//! dir = "certs/global"               # ca.pem, cert.pem, key.pem
//!                                    # (or ca = , cert = , key = )
//! # revoked = "certs/revoked.pem"    # `snaps certs revoke`; by default
//!                                    # beside the dir, read when it changes
//!
//! [credentials]                      # plain-text mode (--insecure) only:
//! CPH = { token = "..." }            # one token per site
//! STG = { token_file = "stg.token" }
//!
//! refresh_at = "02:00"               # the nightly refresh, daily, UTC;
//!                                    # without it only on demand
//! [refresh]                          # more about it (all optional)
//! collect_timeout_secs = 300         # how long an epoch waits for pushes
//! distribute_timeout_secs = 600      # ... and for acknowledgements
//! propagate_deletes = ["visit_rep"]  # owners' deletes remove others' copies
//! lease_secs = 15                    # with several controllers on one store:
//!                                    # how long a dead one's epoch waits
//!                                    # before another takes it over
//!
//! [access]                           # what no rule of `snaps acl` names:
//! default = "write"                  # none, read (fetch) or write (and lock)
//!
//! [audit]
//! patient_key = "pno"                # recorded for every patient fetched
//!
//! [admin]                            # plain-text mode: the token of
//! token_file = "admin.token"         # `snaps refresh` etc. (with TLS the
//!                                    # administrator's certificate)
//! ```
//!
//! Relative paths are resolved against the folder of `global.toml`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use snaps_proto::tls::Credentials;

use crate::acl::Right;
use snaps_schema::{Catalog, NetworkConfig, RelationMode, SiteConfig};

use crate::error::{Error, Result};

/// A site's credential as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// The token itself.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (surrounding white space ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: SocketAddr,
    store: String,
    #[serde(default)]
    store_ca: Option<PathBuf>,
    network: PathBuf,
    #[serde(default)]
    relations: BTreeMap<String, RelationMode>,
    #[serde(default)]
    indexes: BTreeMap<String, Vec<Vec<String>>>,
    #[serde(default)]
    credentials: BTreeMap<String, Credential>,
    /// The daily refresh time, as DESIGN.md names it (same as
    /// `[refresh] at`).
    #[serde(default)]
    refresh_at: Option<String>,
    #[serde(default)]
    refresh: RefreshFile,
    #[serde(default)]
    admin: Option<Credential>,
    #[serde(default)]
    tls: Option<TlsFile>,
    #[serde(default)]
    access: AccessFile,
    #[serde(default)]
    audit: AuditFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    default: Option<Right>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    patient_key: Option<String>,
}

/// `[tls]`: a credential directory, or its three files one by one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    dir: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    revoked: Option<PathBuf>,
}

impl TlsFile {
    fn resolve(&self, base: &Path) -> Result<Credentials> {
        match (&self.dir, &self.ca, &self.cert, &self.key) {
            (Some(d), None, None, None) => Ok(Credentials::in_dir(base.join(d))),
            (None, Some(ca), Some(cert), Some(key)) => Ok(Credentials {
                ca: base.join(ca),
                cert: base.join(cert),
                key: base.join(key),
            }),
            _ => Err(Error::Config(
                "[tls]: give dir, or all of ca, cert and key".into(),
            )),
        }
    }

    /// The revocation list: as given, or beside the credential directory
    /// (`snaps certs init` makes `certs/global`; `snaps certs revoke`
    /// writes `certs/revoked.pem`).
    fn revoked(&self, base: &Path) -> Option<PathBuf> {
        match (&self.revoked, &self.dir) {
            (Some(r), _) => Some(base.join(r)),
            (None, Some(d)) => base
                .join(d)
                .parent()
                .map(|p| p.join(snaps_proto::tls::REVOKED_FILE)),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshFile {
    at: Option<String>,
    collect_timeout_secs: Option<u64>,
    distribute_timeout_secs: Option<u64>,
    lease_secs: Option<u64>,
    #[serde(default)]
    propagate_deletes: Vec<String>,
}

/// How the nightly refresh runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshConfig {
    /// The time of day (UTC; hours, minutes) it runs by itself, if any.
    pub at: Option<(u8, u8)>,
    /// How long an epoch waits for its participants' pushes.
    pub collect_timeout: Duration,
    /// How long it waits for their acknowledgements.
    pub distribute_timeout: Duration,
    /// Global relations whose owners' deletes remove the copies other sites
    /// hold (by default a copy stays until its holder lets it go).
    pub propagate_deletes: BTreeSet<String>,
    /// How long the lease of the controller running an epoch lasts
    /// unrenewed: after that another controller on the store takes the
    /// epoch over.
    pub lease: Duration,
    /// How often a controller looks at the store for epochs another
    /// controller runs (to tell its own sites) and for a lease gone stale.
    pub watch: Duration,
}

impl Default for RefreshConfig {
    fn default() -> RefreshConfig {
        RefreshConfig {
            at: None,
            collect_timeout: Duration::from_secs(300),
            distribute_timeout: Duration::from_secs(600),
            propagate_deletes: BTreeSet::new(),
            lease: Duration::from_secs(15),
            watch: Duration::from_secs(1),
        }
    }
}

/// `HH:MM` as hours and minutes.
fn time_of_day(text: &str) -> Result<(u8, u8)> {
    let bad = || {
        Error::Config(format!(
            "refresh.at = {text:?}: expected a time of day as HH:MM"
        ))
    };
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let h: u8 = h.trim().parse().map_err(|_| bad())?;
    let m: u8 = m.trim().parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok((h, m))
}

impl Credential {
    /// The token, from the file or as given; `whose` names it in errors.
    fn read(&self, dir: &Path, whose: &str) -> Result<String> {
        match (&self.token, &self.token_file) {
            (Some(t), None) => Ok(t.clone()),
            (None, Some(f)) => Ok(std::fs::read_to_string(dir.join(f))
                .map_err(|e| Error::Config(format!("token file of {whose}: {}: {e}", f.display())))?
                .trim()
                .to_string()),
            _ => Err(Error::Config(format!(
                "credential of {whose}: give exactly one of token, token_file"
            ))),
        }
    }
}

/// Where the global store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// An SQLite file (created on first start).
    Sqlite(PathBuf),
    /// A database on a PostgreSQL server, by URL
    /// (`postgresql://user[:password]@host[:port]/database`).
    Postgres(String),
}

impl StoreLocation {
    /// `store = …` of `global.toml`: a `postgresql://` (or `postgres://`)
    /// URL, otherwise a file path relative to `dir`.
    pub fn parse(text: &str, dir: &Path) -> StoreLocation {
        if text.starts_with("postgresql://") || text.starts_with("postgres://") {
            StoreLocation::Postgres(text.to_string())
        } else {
            StoreLocation::Sqlite(dir.join(text))
        }
    }
}

impl From<PathBuf> for StoreLocation {
    fn from(p: PathBuf) -> StoreLocation {
        StoreLocation::Sqlite(p)
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "{}", p.display()),
            StoreLocation::Postgres(url) => f.write_str(&crate::db::postgres::redact(url)),
        }
    }
}

/// The controller's configuration, checked and resolved.
#[derive(Debug, Clone)]
pub struct GlobalConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The store.
    pub store: StoreLocation,
    /// The CA certificate (PEM) the PostgreSQL store's server certificate
    /// must chain to: the store is reached over TLS.
    pub store_ca: Option<PathBuf>,
    /// The network.
    pub network: NetworkConfig,
    /// The global schema.
    pub catalog: Catalog,
    /// Mode of every global relation.
    pub modes: BTreeMap<String, RelationMode>,
    /// Extra indexes: relation → attribute lists.
    pub indexes: BTreeMap<String, Vec<Vec<String>>>,
    /// Token → site code.
    pub tokens: BTreeMap<String, String>,
    /// The refresh.
    pub refresh: RefreshConfig,
    /// The administrator's token, if one is configured.
    pub admin_token: Option<String>,
    /// The controller's TLS credentials; none: plain text (development).
    pub tls: Option<Credentials>,
    /// The network's certificate revocation list (`snaps certs revoke`),
    /// read again whenever it changes; a missing file revokes nothing.
    pub revoked: Option<PathBuf>,
    /// What a site may do with a relation no access rule names.
    pub access_default: Right,
    /// The global attribute whose values the audit trail records as the
    /// patients a fetch returned.
    pub patient_key: String,
}

impl GlobalConfig {
    /// Reads and checks `global.toml`; every refusal names the file.
    pub fn load(path: &Path) -> Result<GlobalConfig> {
        let named = path.display().to_string();
        GlobalConfig::load_unnamed(path).map_err(|e| match e {
            Error::Config(m) if !m.contains(&named) => Error::Config(format!("{named}: {m}")),
            e => e,
        })
    }

    fn load_unnamed(path: &Path) -> Result<GlobalConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let file: File =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let network = NetworkConfig::load(&dir.join(&file.network))
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut tokens = BTreeMap::new();
        for (code, c) in &file.credentials {
            tokens.insert(c.read(&dir, &format!("site {code}"))?, code.clone());
        }
        let mut config = GlobalConfig::new(
            file.listen,
            StoreLocation::parse(&file.store, &dir),
            network,
            file.relations,
            file.indexes,
            tokens,
        )?;
        let defaults = RefreshConfig::default();
        let at = match (&file.refresh_at, &file.refresh.at) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "give the refresh time once: refresh_at or [refresh] at".into(),
                ));
            }
            (a, b) => a.as_deref().or(b.as_deref()),
        };
        let refresh = RefreshConfig {
            at: at.map(time_of_day).transpose()?,
            collect_timeout: file
                .refresh
                .collect_timeout_secs
                .map_or(defaults.collect_timeout, Duration::from_secs),
            distribute_timeout: file
                .refresh
                .distribute_timeout_secs
                .map_or(defaults.distribute_timeout, Duration::from_secs),
            propagate_deletes: file.refresh.propagate_deletes.into_iter().collect(),
            lease: match file.refresh.lease_secs {
                Some(0) => {
                    return Err(Error::Config(
                        "refresh.lease_secs = 0: the lease must last at least a second".into(),
                    ));
                }
                Some(s) => Duration::from_secs(s),
                None => defaults.lease,
            },
            watch: defaults.watch,
        };
        config.set_refresh(refresh)?;
        config.store_ca = file.store_ca.as_ref().map(|p| dir.join(p));
        config.tls = file.tls.as_ref().map(|t| t.resolve(&dir)).transpose()?;
        config.revoked = file.tls.as_ref().and_then(|t| t.revoked(&dir));
        if let Some(d) = file.access.default {
            config.access_default = d;
        }
        if let Some(k) = file.audit.patient_key {
            if !config
                .catalog
                .relations()
                .any(|r| r.attribute(&k).is_some())
            {
                return Err(Error::Config(format!(
                    "audit.patient_key = {k:?} is an attribute of no global relation"
                )));
            }
            config.patient_key = k;
        }
        if let Some(admin) = &file.admin {
            let token = admin.read(&dir, "the administrator")?;
            if token.len() < 16 {
                return Err(Error::Config(
                    "the administrator's token is shorter than 16 characters".into(),
                ));
            }
            if config.tokens.contains_key(&token) {
                return Err(Error::Config(
                    "the administrator's token is also a site's token".into(),
                ));
            }
            config.admin_token = Some(token);
        }
        Ok(config)
    }

    /// Sets how the refresh runs, checking the relations it names.
    pub fn set_refresh(&mut self, refresh: RefreshConfig) -> Result<()> {
        for r in &refresh.propagate_deletes {
            if self.catalog.relation(r).is_none() {
                return Err(Error::Config(format!(
                    "refresh.propagate_deletes names {r}, which is not a global relation"
                )));
            }
        }
        self.refresh = refresh;
        Ok(())
    }

    /// Builds a configuration in code (tests, the demo), with the same
    /// checks as [`GlobalConfig::load`].
    pub fn new(
        listen: SocketAddr,
        store: impl Into<StoreLocation>,
        network: NetworkConfig,
        mode_overrides: BTreeMap<String, RelationMode>,
        indexes: BTreeMap<String, Vec<Vec<String>>>,
        tokens: BTreeMap<String, String>,
    ) -> Result<GlobalConfig> {
        let catalog = network
            .global_catalog()
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut modes = BTreeMap::new();
        for r in catalog.relations() {
            modes.insert(r.name.clone(), network.mode(&r.name));
        }
        for (r, m) in mode_overrides {
            if !modes.contains_key(&r) {
                return Err(Error::Config(format!(
                    "mode given for {r}, which is not a global relation"
                )));
            }
            modes.insert(r, m);
        }
        for (r, lists) in &indexes {
            let rel = catalog.relation(r).ok_or_else(|| {
                Error::Config(format!("index on {r}, which is not a global relation"))
            })?;
            for a in lists.iter().flatten() {
                if rel.attribute(a).is_none() {
                    return Err(Error::Config(format!(
                        "index on {r}.{a}, which is not an attribute"
                    )));
                }
            }
        }
        for (token, code) in &tokens {
            network.site(code).map_err(|_| {
                Error::Config(format!(
                    "credential for {code}, which is not a site of the network"
                ))
            })?;
            if token.len() < 16 {
                return Err(Error::Config(format!(
                    "the token of site {code} is shorter than 16 characters"
                )));
            }
        }
        Ok(GlobalConfig {
            listen,
            store: store.into(),
            store_ca: None,
            network,
            catalog,
            modes,
            indexes,
            tokens,
            refresh: RefreshConfig::default(),
            admin_token: None,
            tls: None,
            revoked: None,
            access_default: Right::Write,
            patient_key: "pno".to_string(),
        })
    }

    /// Sites that cannot connect in plain-text mode, having no token.
    pub fn sites_without_token(&self) -> Vec<String> {
        self.network
            .sites
            .iter()
            .filter(|s| !self.tokens.values().any(|c| c == s.code.as_str()))
            .map(|s| s.code.to_string())
            .collect()
    }

    /// The site a token belongs to.
    pub fn site_of_token(&self, token: &str) -> Option<&SiteConfig> {
        // Compare every configured token in full, so the time taken does not
        // tell how much of a guess was right.
        let mut found = None;
        for (t, code) in &self.tokens {
            let same = t.len() == token.len()
                && t.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if same {
                found = Some(code);
            }
        }
        found.and_then(|c| self.network.site(c).ok())
    }

    /// The mode of a global relation.
    pub fn mode(&self, relation: &str) -> RelationMode {
        self.modes
            .get(relation)
            .copied()
            .unwrap_or(RelationMode::ReadOnly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn radiology() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/radiology")
    }

    fn write(dir: &Path, extra: &str) -> PathBuf {
        let text = format!(
            "listen = \"127.0.0.1:7400\"\nstore = \"g.db\"\nnetwork = {:?}\n{extra}",
            radiology().display().to_string()
        );
        let p = dir.join("global.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_example_configuration_reads() {
        let c = GlobalConfig::load(&radiology().join("global.example.toml")).unwrap();
        assert_eq!(c.refresh.at, Some((2, 0)));
        assert_eq!(c.tokens.len(), 3);
        assert!(c.admin_token.is_some());
    }

    #[test]
    fn reads_tls_access_and_audit() {
        let dir = tempfile::tempdir().unwrap();
        let c = GlobalConfig::load(&write(dir.path(), "")).unwrap();
        assert_eq!((c.tls.clone(), c.access_default), (None, Right::Write));
        assert_eq!(c.patient_key, "pno");
        let c = GlobalConfig::load(&write(
            dir.path(),
            "[tls]\ndir = \"certs/global\"\n[access]\ndefault = \"read\"\n[audit]\npatient_key = \"vno\"\n",
        ))
        .unwrap();
        assert_eq!(
            c.tls,
            Some(Credentials::in_dir(dir.path().join("certs/global")))
        );
        assert_eq!(c.access_default, Right::Read);
        assert_eq!(c.patient_key, "vno");
        let c = GlobalConfig::load(&write(
            dir.path(),
            "[tls]\nca = \"a.pem\"\ncert = \"b.pem\"\nkey = \"c.pem\"\n",
        ))
        .unwrap();
        assert_eq!(c.tls.unwrap().key, dir.path().join("c.pem"));
    }

    #[test]
    fn reads_the_refresh_and_the_administrator() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[refresh]\nat = \"02:30\"\ncollect_timeout_secs = 60\npropagate_deletes = [\"visit_rep\"]\n\
             [admin]\ntoken = \"admin-token-0123456789abcdef\"\n",
        );
        let c = GlobalConfig::load(&p).unwrap();
        assert_eq!(c.refresh.at, Some((2, 30)));
        assert_eq!(c.refresh.collect_timeout, Duration::from_secs(60));
        assert_eq!(c.refresh.distribute_timeout, Duration::from_secs(600));
        assert!(c.refresh.propagate_deletes.contains("visit_rep"));
        assert_eq!(
            c.admin_token.as_deref(),
            Some("admin-token-0123456789abcdef")
        );
        let c = GlobalConfig::load(&write(dir.path(), "refresh_at = \"23:05\"\n")).unwrap();
        assert_eq!(c.refresh.at, Some((23, 5)));
        // Without [refresh] it runs only on demand.
        let c = GlobalConfig::load(&write(dir.path(), "")).unwrap();
        assert_eq!(c.refresh, RefreshConfig::default());
        assert_eq!(c.admin_token, None);
        for (extra, why) in [
            ("[refresh]\nat = \"25:00\"\n", "refresh.at = \"25:00\""),
            (
                "[refresh]\nat = \"noon\"\n",
                "expected a time of day as HH:MM",
            ),
            (
                "[refresh]\npropagate_deletes = [\"nosuch\"]\n",
                "propagate_deletes names nosuch",
            ),
            (
                "[admin]\ntoken = \"short\"\n",
                "administrator's token is shorter",
            ),
            (
                "[credentials]\nCPH = { token = \"cph-token-0123456789abcdef\" }\n\
                 [admin]\ntoken = \"cph-token-0123456789abcdef\"\n",
                "also a site's token",
            ),
        ] {
            let e = GlobalConfig::load(&write(dir.path(), extra)).unwrap_err();
            assert!(e.to_string().contains(why), "{extra}: {e}");
        }
    }

    #[test]
    fn reads_credentials_modes_and_indexes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("grc.token"),
            "  grc-token-0123456789abcdef\n",
        )
        .unwrap();
        let p = write(
            dir.path(),
            "[relations]\ndoctor = \"read-only\"\n[indexes]\npatient = [[\"surname\"]]\n\
             [credentials]\nCPH = { token = \"cph-token-0123456789abcdef\" }\nGRC = { token_file = \"grc.token\" }\n",
        );
        let c = GlobalConfig::load(&p).unwrap();
        assert_eq!(c.store, StoreLocation::Sqlite(dir.path().join("g.db")));
        assert_eq!(c.mode("doctor"), RelationMode::ReadOnly);
        assert_eq!(c.mode("patient"), RelationMode::ReadWrite);
        assert_eq!(
            c.site_of_token("grc-token-0123456789abcdef")
                .unwrap()
                .code
                .as_str(),
            "GRC"
        );
        assert_eq!(
            c.site_of_token("cph-token-0123456789abcdef")
                .unwrap()
                .code
                .as_str(),
            "CPH"
        );
        assert!(c.site_of_token("cph-token-0123456789abcdeX").is_none());
        assert!(c.site_of_token("").is_none());
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("[relations]\nxray = \"read-only\"\n", "mode given for xray"),
            (
                "[indexes]\npatient = [[\"shoe_size\"]]\n",
                "index on patient.shoe_size",
            ),
            (
                "[credentials]\nXYZ = { token = \"xyz-token-0123456789abcdef\" }\n",
                "credential for XYZ",
            ),
            (
                "[credentials]\nCPH = {}\n",
                "give exactly one of token, token_file",
            ),
            (
                "[credentials]\nCPH = { token_file = \"missing.token\" }\n",
                "token file of site CPH",
            ),
            ("port = 1\n", "unknown field `port`"),
            ("[access]\ndefault = \"all\"\n", "unknown variant `all`"),
            (
                "[audit]\npatient_key = \"shoe_size\"\n",
                "attribute of no global relation",
            ),
            (
                "[tls]\nca = \"ca.pem\"\n",
                "give dir, or all of ca, cert and key",
            ),
        ];
        for (extra, expected) in cases {
            let p = write(dir.path(), extra);
            let err = GlobalConfig::load(&p).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra:?}: {err}");
        }
    }
}
