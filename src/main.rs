//! `snaps`: the command line of SNAPS — run the global snapshot controller,
//! explain how a site's query maps onto the global snapshot, check a site's
//! mapping, run the demo network and the benchmarks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use snaps_mapping::{SiteMapping, ir::Statement, rewrite};
use snaps_schema::{Catalog, NetworkConfig};

#[derive(Parser)]
#[command(
    name = "snaps",
    version,
    about = "SNAPS: snapshots of radiology data across independent sites"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show how a statement at a site decomposes and maps onto the global
    /// snapshot: selections, join clauses, local-only conjuncts, semi-join
    /// projections and the mapped global query.
    Explain {
        /// The network folder (holding network.toml).
        #[arg(long, default_value = "fixtures/radiology")]
        network: PathBuf,
        /// The site code, e.g. CPH.
        #[arg(long)]
        site: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The statement, in SQL or QUEL.
        statement: String,
    },
    /// Validate every site's mapping tables of a network (or one site's).
    Check {
        /// The network folder (holding network.toml).
        #[arg(long, default_value = "fixtures/radiology")]
        network: PathBuf,
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
    },
    /// The global snapshot controller.
    Global {
        #[command(subcommand)]
        command: GlobalCommand,
    },
    /// Measure SNAPS on this machine.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Generate the demo network's data: one SQLite database per site.
    Demo {
        /// The network folder (holding network.toml).
        #[arg(long, default_value = "fixtures/radiology")]
        network: PathBuf,
        /// Where to write the site databases.
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
        /// Patients per site.
        #[arg(long, default_value_t = 200)]
        patients: usize,
        /// Seed of the data generator.
        #[arg(long, default_value_t = 1988)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum GlobalCommand {
    /// Serve the global snapshot controller until SIGINT or SIGTERM.
    Serve {
        /// The controller's configuration (listen address, store, network,
        /// credentials; see fixtures/radiology/global.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The global controller on loopback: load rate, point fetches and lock
    /// requests per second, bytes on the wire per fetched tuple.
    Global(snaps::bench::GlobalBenchOptions),
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Global {
            command: GlobalCommand::Serve { config },
        } => {
            init_logging();
            let config = snaps_global::GlobalConfig::load(&config)
                .with_context(|| format!("read {}", config.display()))?;
            let controller =
                snaps_global::GlobalController::open(config).context("open the global store")?;
            runtime()?.block_on(controller.run())?;
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Global(opts),
        } => {
            let report = runtime()?.block_on(snaps::bench::bench_global(&opts))?;
            print!("{report}");
            Ok(())
        }
        Command::Explain {
            network,
            site,
            json,
            statement,
        } => explain(&network, &site, json, &statement),
        Command::Check { network, site } => check(&network, site.as_deref()),
        Command::Demo {
            network,
            dir,
            patients,
            seed,
        } => demo(&network, &dir, patients, seed),
    }
}

/// A site's catalogs and validated mapping, read from the network's files.
struct Site {
    local: Catalog,
    mapping: SiteMapping,
}

fn load_site(config: &NetworkConfig, code: &str) -> Result<Site> {
    let site = config.site(code)?;
    let local = config.local_catalog(site)?;
    let global = config.global_catalog()?;
    let read = |p: &Path| {
        let path = config.path(p);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let rows = read(&site.mapping)?;
    let quals = match &site.qualification {
        Some(q) => read(q)?,
        None => String::new(),
    };
    let mapping = SiteMapping::from_text(&rows, &quals, &local, &global)
        .with_context(|| format!("mapping of site {code}"))?;
    Ok(Site { local, mapping })
}

fn load_network(path: &Path) -> Result<NetworkConfig> {
    NetworkConfig::load(path).with_context(|| format!("load network {}", path.display()))
}

fn explain(network: &Path, code: &str, json: bool, text: &str) -> Result<()> {
    let config = load_network(network)?;
    let site = load_site(&config, code)?;
    let (language, statements) = snaps_mapping::parse(text)?;
    for statement in statements {
        let select = match statement {
            Statement::Select(s) => s,
            Statement::DefineSnapshot { query, .. } => query,
            other => bail!(
                "only retrievals are fetched from the global snapshot; this is {}",
                kind(&other)
            ),
        };
        let plan = rewrite::plan(&select, &site.local, &site.mapping)?;
        if json {
            let out = serde_json::json!({
                "site": code,
                "language": language,
                "plan": plan,
                "mapped_sql": plan.query.as_ref().map(|q| q.to_string()),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "site {code}, {}",
                if language == snaps_mapping::Language::Sql {
                    "SQL"
                } else {
                    "QUEL"
                }
            );
            print!("{plan}");
        }
    }
    Ok(())
}

fn kind(s: &Statement) -> &'static str {
    match s {
        Statement::Select(_) | Statement::DefineSnapshot { .. } => "a retrieval",
        Statement::Insert(_) => "an insert",
        Statement::Update(_) => "an update",
        Statement::Delete(_) => "a delete",
    }
}

fn check(network: &Path, only: Option<&str>) -> Result<()> {
    let config = load_network(network)?;
    let mut failed = 0;
    for site in &config.sites {
        if only.is_some_and(|c| c != site.code.as_str()) {
            continue;
        }
        match load_site(&config, site.code.as_str()) {
            Ok(s) => {
                let rels: Vec<String> = s
                    .mapping
                    .relations()
                    .map(|r| {
                        let parts: Vec<&str> = r.parts.iter().map(|p| p.global.as_str()).collect();
                        format!("{} -> {}", r.local.name, parts.join(" + "))
                    })
                    .collect();
                println!("{}: ok ({})", site.code, rels.join(", "));
            }
            Err(e) => {
                failed += 1;
                println!("{}: {e:#}", site.code);
            }
        }
    }
    if failed > 0 {
        bail!("{failed} site mapping(s) are invalid");
    }
    Ok(())
}

/// Builds the demo network's site databases: generates every site's data,
/// creates `<dir>/<CODE>.db` for each site and loads the data as the site's
/// own, then says what can be done with them so far.
fn demo(network: &Path, dir: &Path, patients: usize, seed: u64) -> Result<()> {
    let config = load_network(network)?;
    println!(
        "SNAPS demo: network {}, {} sites, {patients} patients per site, seed {seed}",
        config.name,
        config.sites.len()
    );
    // A second run reuses the databases of the first: the demo never
    // overwrites a site database.
    let missing = config
        .sites
        .iter()
        .any(|s| !dir.join(format!("{}.db", s.code)).exists());
    let mut data = if missing {
        println!("generating the sites' data...");
        snaps_schema::datagen::generate(&config, &snaps_schema::datagen::Scale::new(patients), seed)
            .context("generate the demo data")?
    } else {
        Default::default()
    };
    std::fs::create_dir_all(dir).with_context(|| format!("create folder {}", dir.display()))?;
    let read = |p: &Path| {
        let path = config.path(p);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let mut summary = Vec::new();
    for site in &config.sites {
        let code = site.code.as_str();
        let Site { local, mapping } = load_site(&config, code)?;
        let rows = snaps_mapping::mapping::parse_mapping_rows(&read(&site.mapping)?)
            .with_context(|| format!("mapping rows of site {code}"))?;
        let quals = match &site.qualification {
            Some(q) => snaps_mapping::mapping::parse_qualification_rows(&read(q)?)
                .with_context(|| format!("mapping-qualification rows of site {code}"))?,
            None => Vec::new(),
        };
        let path = dir.join(format!("{code}.db"));
        let store = if path.exists() {
            let store = snaps_local::SiteStore::open(&path).with_context(|| {
                format!("open the database of site {code} at {}", path.display())
            })?;
            let holder = store.site_code().context("read the site code")?;
            if holder != code {
                bail!(
                    "{} holds the database of site {holder}, not {code}: remove {} or pass --dir with another folder",
                    path.display(),
                    dir.display()
                );
            }
            println!("{code}: using the existing database {}", path.display());
            store
        } else {
            println!("{code} ({}): creating {}", site.name, path.display());
            let mut store =
                snaps_local::SiteStore::create(&path, site, &local, &rows, &quals, &mapping)
                    .with_context(|| {
                        format!("create the database of site {code} at {}", path.display())
                    })?;
            let site_data = data
                .remove(&site.code)
                .with_context(|| format!("the generator made no data for site {code}"))?;
            let mut tuples = 0;
            for (relation, tuple_rows) in &site_data.rows {
                tuples += store
                    .load(relation, tuple_rows)
                    .with_context(|| format!("load {relation} at site {code}"))?;
            }
            println!(
                "{code}: loaded {tuples} tuples into {} relations",
                site_data.rows.len()
            );
            store
        };
        for relation in store.catalog().relations() {
            let count = store
                .count(&relation.name)
                .with_context(|| format!("count {} at site {code}", relation.name))?;
            summary.push((
                code,
                relation.name.clone(),
                count,
                store.is_mapped(&relation.name),
            ));
        }
    }

    println!();
    println!(
        "{:<6}{:<12}{:>8}  mapped onto the global snapshot",
        "site", "relation", "rows"
    );
    for (code, relation, count, mapped) in &summary {
        println!(
            "{code:<6}{relation:<12}{count:>8}  {}",
            if *mapped { "yes" } else { "no" }
        );
    }
    let first = config.sites.first().map_or("CPH", |s| s.code.as_str());
    println!();
    println!("Not built yet: the local controller's query path and its SQL endpoint, which");
    println!("will connect these sites to the global controller and let psql connect to a site.");
    println!("Meanwhile:");
    println!(
        "  run the global controller:  snaps global serve --config {}",
        network.join("global.example.toml").display()
    );
    println!(
        "  inspect a site's database:  sqlite3 {}",
        dir.join(format!("{first}.db")).display()
    );
    println!(
        "  explain a query:            snaps explain --network {} --site {first} \
         \"SELECT surname, dob FROM patient WHERE surname = 'Smith'\"",
        network.display()
    );
    Ok(())
}
