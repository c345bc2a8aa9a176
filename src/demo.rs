//! `snaps demo`: the Christchurch radiology network on this machine — the
//! global controller and the sites CPH, STG and GRC, each with its own
//! SQLite database of generated data and its own PostgreSQL-protocol
//! endpoint, ready for `psql`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use snaps_local::SiteStore;
use snaps_schema::NetworkConfig;
use snaps_schema::datagen::{self, Scale};

use crate::localnet::{LocalNetwork, run_site};

/// The demo's login at every site.
pub const DEMO_USER: &str = "radiology";
/// Its password (a demo on loopback; real sites choose their own with
/// `snaps users add`).
pub const DEMO_PASSWORD: &str = "snaps-demo";

/// How much data the demo generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoScale {
    /// 200 patients per site.
    Small,
    /// 2,000 patients per site.
    Medium,
    /// 20,000 patients per site.
    Large,
}

impl DemoScale {
    /// Patients per site.
    pub fn patients(self) -> usize {
        match self {
            DemoScale::Small => 200,
            DemoScale::Medium => 2_000,
            DemoScale::Large => 20_000,
        }
    }
}

/// Options of `snaps demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Where the network lives: DIR/global/ holds the global store, DIR/<SITE>/local.db
    /// each site's database. Reused when it exists.
    #[arg(long, default_value = "snaps-demo")]
    pub dir: PathBuf,
    /// How much data to generate (on first run only).
    #[arg(long, value_enum, default_value_t = DemoScale::Small)]
    pub scale: DemoScale,
    /// The global controller listens on this port (gRPC), the sites' SQL
    /// endpoints on the next ones, in the network's site order.
    #[arg(long, default_value_t = 7700)]
    pub port_base: u16,
    /// The network folder (holding network.toml).
    /// Default: the radiology network built into this binary, written to
    /// the demo folder's `network/` on the first run (edits there are kept).
    #[arg(long)]
    pub network: Option<PathBuf>,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1988)]
    pub seed: u64,
    /// The global store: a `postgresql://` URL of a database (empty on the
    /// first run). Default: an SQLite file in DIR/global/.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Global controllers on the store (more than one needs --processes
    /// and a PostgreSQL store).
    #[arg(long, default_value_t = 1)]
    pub globals: usize,
    /// Run every controller and every site as a process of its own, from
    /// configuration files written into the demo folder (DIR/global-K/
    /// global.toml, DIR/<SITE>/site.toml), as a real deployment would.
    #[arg(long)]
    pub processes: bool,
}

/// The demo's users file of site `code`, made on the first run.
pub(crate) fn demo_users(dir: &std::path::Path, code: &str) -> Result<PathBuf> {
    let users_file = dir.join(code).join("users.toml");
    if !users_file.exists() {
        let mut users = snaps_local::users::Users::default();
        users.add(DEMO_USER, &format!("{DEMO_USER}-{code}"), DEMO_PASSWORD)?;
        users.save(&users_file)?;
    }
    Ok(users_file)
}

/// Runs the demo until `shutdown` completes.
pub async fn run_demo(
    opts: &DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if opts.dir.exists() && !opts.dir.is_dir() {
        bail!("{} exists and is not a folder", opts.dir.display());
    }
    if opts.globals == 0 {
        bail!("--globals 0: the network needs a global controller");
    }
    if opts.globals > 1 && !opts.processes {
        bail!(
            "--globals {} runs each controller as a process: add --processes",
            opts.globals
        );
    }
    if let Some(url) = &opts.store
        && !(url.starts_with("postgresql://") || url.starts_with("postgres://"))
    {
        bail!(
            "--store {url:?} is not a postgresql:// URL (without --store the store is an SQLite file)"
        );
    }
    if opts.globals > 1 && opts.store.is_none() {
        bail!("several controllers share a PostgreSQL store: give --store postgresql://...");
    }
    let folder = match &opts.network {
        Some(folder) => folder.clone(),
        None => {
            let folder = opts.dir.join("network");
            crate::fixtures::write_radiology(&folder)?;
            folder
        }
    };
    let network = NetworkConfig::load(&folder)
        .with_context(|| format!("load network {}", folder.display()))?;
    let port = |i: usize| -> Result<u16> {
        opts.port_base
            .checked_add(i as u16)
            .context("--port-base is too high for the network's sites")
    };
    std::fs::create_dir_all(opts.dir.join("global"))
        .with_context(|| format!("create {}", opts.dir.join("global").display()))?;

    // Site databases: generated on the first run, reused afterwards.
    let paths: Vec<(String, PathBuf)> = network
        .sites
        .iter()
        .map(|s| {
            (
                s.code.to_string(),
                opts.dir.join(s.code.as_str()).join("local.db"),
            )
        })
        .collect();
    if paths.iter().any(|(_, p)| !p.exists()) {
        let patients = opts.scale.patients();
        println!("generating {patients} patients per site...");
        let data = datagen::generate(&network, &Scale::new(patients), opts.seed)?;
        for (code, path) in &paths {
            if path.exists() {
                continue;
            }
            let rows = &data
                .iter()
                .find(|(c, _)| c.as_str() == code)
                .with_context(|| format!("no data generated for {code}"))?
                .1
                .rows;
            let mut store = SiteStore::create_in_network(&network, code, path)
                .with_context(|| format!("create {}", path.display()))?;
            let mut n = 0;
            for (relation, tuples) in rows {
                n += store.load(relation, tuples)?;
            }
            println!("{code}: {n} tuples in {}", path.display());
        }
    }

    // The network's certificates (made once, reused): every connection
    // between a site and the controller is TLS with client certificates.
    let certs = opts.dir.join("certs");
    if !certs.join("ca.pem").exists() {
        crate::localnet::issue_certificates(&certs, &network)
            .with_context(|| format!("create the demo's certificates in {}", certs.display()))?;
        println!("certificates: {}", certs.display());
    }
    let store = match &opts.store {
        Some(url) => snaps_global::StoreLocation::Postgres(url.clone()),
        None => snaps_global::StoreLocation::Sqlite(opts.dir.join("global").join("global.db")),
    };
    if opts.processes {
        return crate::demo_processes::run(opts, &folder, &network, &store, &certs, shutdown).await;
    }
    let global_addr: SocketAddr = format!("127.0.0.1:{}", port(0)?).parse()?;
    let mut indexes = BTreeMap::new();
    indexes.insert("patient".to_string(), vec![vec!["surname".to_string()]]);
    indexes.insert("visit".to_string(), vec![vec!["pno".to_string()]]);
    let global = LocalNetwork::start_with(
        network.clone(),
        store,
        crate::localnet::Options {
            indexes,
            addr: global_addr,
            tls: Some(certs.clone()),
            ..crate::localnet::Options::new(&network)
        },
    )
    .await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut endpoints = Vec::new();
    let mut lines = Vec::new();
    for (i, (code, path)) in paths.iter().enumerate() {
        let addr: SocketAddr = format!("127.0.0.1:{}", port(i + 1)?).parse()?;
        let mut rx = stopped.clone();
        // The demo's one user per site, made once (`snaps users add` adds
        // more); its password is printed below.
        let users_file = demo_users(&opts.dir, code)?;
        let site = run_site(
            &global,
            code,
            path.clone(),
            addr,
            snaps_local::endpoint::Login::Scram(users_file),
            async move {
                let _ = rx.changed().await;
            },
        )
        .await?;
        if site.loaded > 0 {
            println!(
                "{code}: loaded {} tuples into the global snapshot",
                site.loaded
            );
        }
        endpoints.push(site.endpoint);
        lines.push(format!(
            "{code}: psql -h 127.0.0.1 -p {} -U {DEMO_USER} {code}",
            addr.port()
        ));
    }
    println!("global snapshot controller: {} (gRPC)", global.addr);
    println!(
        "refresh now: snaps refresh --global {} --tls {}",
        global.addr,
        certs.join("admin").display()
    );
    println!(
        "password of user {DEMO_USER} at every site: {DEMO_PASSWORD} (PGPASSWORD={DEMO_PASSWORD})"
    );
    if certs
        .join(format!("{}-sql", network.sites[0].code))
        .exists()
    {
        println!(
            "the sites' SQL endpoints offer TLS (psql uses it; to check the certificate: \
             sslmode=verify-full sslrootcert={})",
            certs.join("ca.pem").display()
        );
    }
    for l in &lines {
        println!("{l}");
    }
    println!("ready");
    shutdown.await;
    println!("stopping");
    let _ = stop.send(true);
    for e in endpoints {
        e.await??;
    }
    global.stop().await?;
    Ok(())
}
