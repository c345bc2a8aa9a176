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
    /// Run the demo network: the global controller and the radiology sites
    /// on localhost, generated data, ready for psql. Runs until SIGINT/SIGTERM.
    Demo(snaps::demo::DemoOptions),
    /// A site's local controller.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Edit a site's mapping tables (its database file): every change is
    /// checked when written and takes effect at the next refresh epoch.
    Mapping {
        #[command(subcommand)]
        command: MappingCommand,
    },
    /// Run one refresh epoch now and wait for it: every reachable site
    /// evicts, pushes its changes, and receives what changed. Shows a bar
    /// per phase and a summary.
    Refresh(snaps::admin::AdminOptions),
    /// List the key conflicts awaiting an administrator: tuples a site
    /// created with a key another site owns.
    Conflicts {
        #[command(flatten)]
        admin: snaps::admin::AdminOptions,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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

/// Where a site's mapping tables are.
#[derive(clap::Args)]
struct SiteDatabase {
    /// The site's database file.
    #[arg(long)]
    database: PathBuf,
    /// The network folder (holding network.toml): the global schema.
    #[arg(long, default_value = "fixtures/radiology")]
    network: PathBuf,
}

#[derive(Subcommand)]
enum MappingCommand {
    /// Check the mapping tables and say what takes effect at the next epoch.
    Check {
        #[command(flatten)]
        site: SiteDatabase,
    },
    /// Map a local attribute onto a global one (with conversion functions
    /// where the types differ, e.g. int_widen int_narrow).
    Add {
        #[command(flatten)]
        site: SiteDatabase,
        local_relation: String,
        local_attribute: String,
        global_relation: String,
        global_attribute: String,
        /// The conversion to the global type.
        to_global: Option<String>,
        /// The conversion back.
        to_local: Option<String>,
    },
    /// Stop mapping a local attribute (onto every global relation, or one).
    Remove {
        #[command(flatten)]
        site: SiteDatabase,
        local_relation: String,
        local_attribute: String,
        /// Only its mapping onto this global relation.
        #[arg(long)]
        global_relation: Option<String>,
    },
}

fn mapping_command(command: MappingCommand) -> Result<String> {
    use snaps_local::mapping_admin;
    let global = |site: &SiteDatabase| -> Result<Catalog> {
        let network = NetworkConfig::load(&site.network)
            .with_context(|| format!("load network {}", site.network.display()))?;
        Ok(network.global_catalog()?)
    };
    let report = match command {
        MappingCommand::Check { site } => mapping_admin::check(&site.database, &global(&site)?)?,
        MappingCommand::Add {
            site,
            local_relation,
            local_attribute,
            global_relation,
            global_attribute,
            to_global,
            to_local,
        } => {
            if to_global.is_some() != to_local.is_some() {
                bail!("a conversion needs both functions, to_global and to_local");
            }
            let row = snaps_mapping::mapping::MappingRow {
                row: 0,
                local_relation: local_relation.to_lowercase(),
                local_attribute: local_attribute.to_lowercase(),
                global_relation: global_relation.to_lowercase(),
                global_attribute: global_attribute.to_lowercase(),
                to_global,
                to_local,
            };
            mapping_admin::add_row(&site.database, &global(&site)?, &row)?
        }
        MappingCommand::Remove {
            site,
            local_relation,
            local_attribute,
            global_relation,
        } => mapping_admin::remove_rows(
            &site.database,
            &global(&site)?,
            &local_relation.to_lowercase(),
            &local_attribute.to_lowercase(),
            global_relation.as_deref(),
        )?,
    };
    Ok(report.to_string())
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Serve a site: its database (created on first start), registration and
    /// initial load at the global controller, and the SQL endpoint
    /// (PostgreSQL protocol), until SIGINT or SIGTERM.
    Serve {
        /// The site's configuration (site code, network, database, SQL listen
        /// address, global controller address and credential, users).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The global controller on loopback: load rate, point fetches and lock
    /// requests per second, bytes on the wire per fetched tuple.
    Global(snaps::bench::GlobalBenchOptions),
    /// A site through its SQL endpoint: a covered query against the same
    /// query on SQLite directly; bytes of first lookups against raw size.
    Site(snaps::bench::SiteBenchOptions),
    /// The nightly refresh: differential against delete-and-re-execute, in
    /// bytes and time, at several sizes of the global snapshot.
    Refresh(snaps::refresh_bench::RefreshBenchOptions),
    /// SNAPS against a central PostgreSQL database and a full nightly copy:
    /// days of a radiology network, the same seeded workload through all
    /// three, bytes and round trips counted at the sockets, response times
    /// modelled at 2,400 bit/s and 10 Mbit/s. Writes the report section of
    /// <out>/benchmarks.md and its plots. Needs the PostgreSQL server
    /// binaries (apt-get install postgresql).
    Network(snaps::network_bench::NetworkBenchOptions),
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Warnings only: the demo's own output is what its user reads.
fn init_logging_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
        Command::Mapping { command } => {
            println!("{}", mapping_command(command)?.trim_end());
            Ok(())
        }
        Command::Refresh(admin) => {
            init_logging_quiet();
            let summary = runtime()?.block_on(snaps::admin::refresh(&admin))?;
            println!("{}", snaps::admin::summary_text(&summary));
            Ok(())
        }
        Command::Conflicts { admin, json } => {
            init_logging_quiet();
            println!(
                "{}",
                runtime()?.block_on(snaps::admin::conflicts(&admin, json))?
            );
            Ok(())
        }
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
            command: BenchCommand::Refresh(opts),
        } => {
            init_logging_quiet();
            let report = runtime()?.block_on(snaps::refresh_bench::bench_refresh(&opts))?;
            print!("{report}");
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Network(opts),
        } => {
            init_logging_quiet();
            let report = runtime()?.block_on(snaps::network_bench::bench_network(&opts))?;
            print!("{}", report.summary());
            println!(
                "report: {}, plots: network-bytes.svg, network-response.svg, network-refresh.svg",
                opts.out.join("benchmarks.md").display()
            );
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Site(opts),
        } => {
            let report = runtime()?.block_on(snaps::bench::bench_site(&opts))?;
            print!("{report}");
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
        Command::Demo(opts) => {
            init_logging_quiet();
            runtime()?.block_on(snaps::demo::run_demo(
                &opts,
                snaps_global::shutdown_signal(),
            ))
        }
        Command::Site {
            command: SiteCommand::Serve { config },
        } => {
            init_logging();
            let config = snaps_local::serve::SiteServeConfig::load(&config)?;
            runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("listen on {}", config.listen))?;
                snaps_local::serve::serve_site(config, listener, snaps_global::shutdown_signal())
                    .await?;
                Ok(())
            })
        }
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
