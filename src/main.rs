//! `snaps`: the command line of SNAPS — explain how a site's query maps onto
//! the global snapshot, check a site's mapping, and run the demo network.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use snaps_mapping::{SiteMapping, ir::Statement, rewrite};
use snaps_schema::{Catalog, NetworkConfig};

#[derive(Parser)]
#[command(name = "snaps", version, about = "SNAPS: snapshots of radiology data across independent sites")]
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

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Explain { network, site, json, statement } => explain(&network, &site, json, &statement),
        Command::Check { network, site } => check(&network, site.as_deref()),
        Command::Demo { network, dir, patients, seed } => demo(&network, &dir, patients, seed),
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
            other => bail!("only retrievals are fetched from the global snapshot; this is {}", kind(&other)),
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
            println!("site {code}, {}", if language == snaps_mapping::Language::Sql { "SQL" } else { "QUEL" });
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
