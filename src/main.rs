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
    /// Manage the users of a site's SQL endpoint (its users file): each has
    /// a SCRAM-SHA-256 verifier and the user code the global controller
    /// sees. Changes take effect at the next login.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Access rules at the global controller: what each site (or user code
    /// at a site) may do with each global relation.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// Read the global controller's audit trail: every fetch (with the
    /// patients returned), lock, refresh push and access-rule change.
    Audit {
        #[command(flatten)]
        admin: snaps::admin::AdminOptions,
        #[command(flatten)]
        filter: snaps::admin::AuditOptions,
    },
    /// Create the network's certificate authority and issue certificates
    /// for the global controller, sites and administrators.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Bring one patient's changes to a site now, ahead of the night: the
    /// patient's owner pushes what it changed of his record, visits and
    /// report lines since the last epoch, and the site receives them as at
    /// a distribution. Audited; says so if the owner is offline.
    Sync {
        #[command(flatten)]
        admin: snaps::admin::AdminOptions,
        /// The site to bring the patient to, e.g. STG.
        #[arg(long)]
        site: String,
        /// The patient's number in the global snapshot.
        #[arg(long)]
        patient: i64,
    },
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
        /// Serve plain text with bearer tokens when global.toml has no [tls]
        /// (development only: anyone on the path reads the data).
        #[arg(long)]
        insecure: bool,
    },
    /// Move a network's global store from its SQLite file into an empty
    /// PostgreSQL database, whole or not at all: every tuple with its
    /// status and locks, the epochs and change log, the access rules, the
    /// audit trail. Stop the controller first; afterwards set `store` in
    /// global.toml to the URL and start it again.
    Migrate {
        /// The controller's configuration (its network gives the schema).
        #[arg(long)]
        config: PathBuf,
        /// The SQLite store file (default: global.toml's store).
        #[arg(long)]
        from: Option<PathBuf>,
        /// The PostgreSQL database, e.g. postgresql://snaps@db:5432/snaps.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum AclCommand {
    /// Set what a site, or one user code at it, may do with a relation:
    /// none, read (fetch) or write (fetch and lock).
    Grant {
        #[command(flatten)]
        admin: snaps::admin::AdminOptions,
        #[command(flatten)]
        who: snaps::admin::RuleSubject,
        /// The right.
        #[arg(value_enum)]
        right: snaps::admin::RightArg,
    },
    /// Remove a rule: the broader one (the site's, then the network's
    /// default) applies again.
    Revoke {
        #[command(flatten)]
        admin: snaps::admin::AdminOptions,
        #[command(flatten)]
        who: snaps::admin::RuleSubject,
    },
    /// List the rules in force.
    List {
        #[command(flatten)]
        admin: snaps::admin::AdminOptions,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Add a user, or set the password and user code of one. The password
    /// comes from --password-file, else $SNAPS_USER_PASSWORD, else one line
    /// of standard input.
    Add {
        /// The site's users file (users_file in site.toml).
        #[arg(long, default_value = "users.toml")]
        file: PathBuf,
        /// The login name.
        name: String,
        /// The user code the global controller's access rules and audit
        /// trail know the user by.
        #[arg(long)]
        code: String,
        /// A file holding the password.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Remove a user.
    Remove {
        /// The site's users file.
        #[arg(long, default_value = "users.toml")]
        file: PathBuf,
        /// The login name.
        name: String,
    },
    /// List the users and their user codes.
    List {
        /// The site's users file.
        #[arg(long, default_value = "users.toml")]
        file: PathBuf,
    },
}

fn users_command(command: UsersCommand) -> Result<String> {
    use snaps_local::users::Users;
    match command {
        UsersCommand::Add {
            file,
            name,
            code,
            password_file,
        } => {
            let password = match password_file {
                Some(f) => std::fs::read_to_string(&f)
                    .with_context(|| format!("read the password from {}", f.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                None => match std::env::var("SNAPS_USER_PASSWORD") {
                    Ok(p) => p,
                    Err(_) => {
                        eprint!("password for {name}: ");
                        let mut line = String::new();
                        std::io::stdin()
                            .read_line(&mut line)
                            .context("read the password from standard input")?;
                        line.trim_end_matches(['\r', '\n']).to_string()
                    }
                },
            };
            let mut users = Users::load(&file)?;
            let replaced = users.get(&name).is_some();
            users.add(&name, &code, &password)?;
            users.save(&file)?;
            Ok(format!(
                "{} user {name} (user code {code}) in {}",
                if replaced { "updated" } else { "added" },
                file.display()
            ))
        }
        UsersCommand::Remove { file, name } => {
            let mut users = Users::load(&file)?;
            if !users.remove(&name) {
                bail!("{} has no user {name}", file.display());
            }
            users.save(&file)?;
            Ok(format!("removed user {name} from {}", file.display()))
        }
        UsersCommand::List { file } => {
            let users = Users::load(&file)?;
            if users.users.is_empty() {
                return Ok(format!("{} has no users", file.display()));
            }
            let mut out = format!("{:<20} user code\n", "user");
            for u in &users.users {
                out.push_str(&format!("{:<20} {}\n", u.name, u.code));
            }
            Ok(out.trim_end().to_string())
        }
    }
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the network's certificate authority (DIR/ca.pem and
    /// DIR/ca-key.pem: keep the key off the network's machines), the global
    /// controller's credentials (DIR/global) and an administrator's
    /// (DIR/admin).
    Init {
        /// Where the credentials are written.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The network's name, written into the certificates.
        #[arg(long, default_value = "snaps")]
        network: String,
        /// Host names and addresses the sites dial the global controller
        /// by (repeat for several).
        #[arg(long = "host", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
    },
    /// Issue a site's key and certificate (DIR/CODE) with the CA in DIR:
    /// the certificate is the site's identity at the global controller.
    Site {
        /// The folder `snaps certs init` wrote.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The site code, e.g. CPH.
        code: String,
    },
    /// Issue the server certificate of a site's SQL endpoint (DIR/CODE-sql)
    /// for the host names and addresses its clients connect to; in the
    /// site's site.toml: sql_tls = "DIR/CODE-sql".
    Sql {
        /// The folder `snaps certs init` wrote.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The site code, e.g. CPH.
        code: String,
        /// Host names and addresses the site's SQL clients connect to
        /// (repeat for several).
        #[arg(long = "host", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
    },
    /// Revoke certificates (a lost laptop, a site leaving the network): adds
    /// them to the network's revocation list DIR/revoked.pem, signed by the
    /// CA. The global controller reads the list again when it changes and
    /// refuses those certificates from the next request on, on connections
    /// already open too.
    Revoke {
        /// The folder `snaps certs init` wrote.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Credential directories (e.g. certs/STG) or certificate files.
        #[arg(required = true)]
        holders: Vec<PathBuf>,
    },
    /// Issue another administrator's key and certificate (DIR/admin-NAME).
    Admin {
        /// The folder `snaps certs init` wrote.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The administrator's name (letters, digits, _).
        name: String,
    },
}

fn certs_command(command: CertsCommand) -> Result<String> {
    use snaps_proto::tls;
    match command {
        CertsCommand::Init {
            dir,
            network,
            hosts,
        } => {
            let n = tls::issue_network(&dir, &network, &hosts)?;
            Ok(format!(
                "network CA: {} (its key {} signs every certificate: keep it offline)\n\
                 global controller: {} (for {})\n\
                 administrator: {}\n\
                 next: snaps certs site CODE --dir {} for each site",
                n.ca.display(),
                n.ca_key.display(),
                n.global.display(),
                hosts.join(", "),
                n.admin.display(),
                dir.display()
            ))
        }
        CertsCommand::Site { dir, code } => {
            let out = tls::issue_site(&dir, &code)?;
            Ok(format!(
                "site {code}: {} (give it to the site; in its site.toml: tls = \"{}\")",
                out.display(),
                out.display()
            ))
        }
        CertsCommand::Sql { dir, code, hosts } => {
            let out = tls::issue_sql(&dir, &code, &hosts)?;
            Ok(format!(
                "SQL endpoint of {code}: {} (for {}; in its site.toml: sql_tls = \"{}\"; \
                 clients check it with sslmode=verify-full sslrootcert={})",
                out.display(),
                hosts.join(", "),
                out.display(),
                dir.join("ca.pem").display()
            ))
        }
        CertsCommand::Revoke { dir, holders } => {
            let revoked = tls::revoke(&dir, &holders)?;
            let mut out = String::new();
            for r in &revoked {
                out.push_str(&format!("revoked: {} (serial {})\n", r.peer, r.serial));
            }
            out.push_str(&format!(
                "revocation list: {} (the global controller reads it from beside its \
                 credential directory, or from [tls] revoked = \"...\"; a revoked site needs \
                 a new certificate: snaps certs site CODE)",
                dir.join(tls::REVOKED_FILE).display()
            ));
            Ok(out)
        }
        CertsCommand::Admin { dir, name } => {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("administrator name {name:?}: letters, digits and _ only");
            }
            let out = dir.join(format!("admin-{name}"));
            tls::issue_peer(&dir, &tls::Peer::Admin(name.clone()), &out)?;
            Ok(format!("administrator {name}: {}", out.display()))
        }
    }
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
        /// Talk plain text with a token when site.toml has no tls
        /// (development only).
        #[arg(long)]
        insecure: bool,
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
    /// snaps_match on the generator's network, whose second registrations
    /// vary as real ones do: precision and recall per grade against the
    /// known truth, beside exact matching of names and birth date.
    Match(snaps::match_bench::MatchBenchOptions),
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Warnings only: the demo's own output is what its user reads.
fn init_logging_quiet() {
    init_logging_with("warn");
}

/// The benchmarks run their networks in plain text on purpose (their
/// baselines are plain text too): the controller's warning about it, once
/// per network started, would bury the report.
fn init_logging_bench() {
    // A benchmark stops the PostgreSQL server it started while the store's
    // pool still holds idle connections: their ends are expected.
    init_logging_with("warn,snaps_global=error,deadpool.postgres=error");
}

fn init_logging_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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
        Command::Acl { command } => {
            init_logging_quiet();
            let rt = runtime()?;
            let (reply, json) = match command {
                AclCommand::Grant { admin, who, right } => (
                    rt.block_on(snaps::admin::acl_grant(&admin, &who, right))?,
                    false,
                ),
                AclCommand::Revoke { admin, who } => {
                    (rt.block_on(snaps::admin::acl_revoke(&admin, &who))?, false)
                }
                AclCommand::List { admin, json } => {
                    (rt.block_on(snaps::admin::acl_list(&admin))?, json)
                }
            };
            println!("{}", snaps::admin::acl_text(&reply, json));
            Ok(())
        }
        Command::Audit { admin, filter } => {
            init_logging_quiet();
            println!(
                "{}",
                runtime()?.block_on(snaps::admin::audit(&admin, &filter))?
            );
            Ok(())
        }
        Command::Users { command } => {
            println!("{}", users_command(command)?);
            Ok(())
        }
        Command::Certs { command } => {
            println!("{}", certs_command(command)?);
            Ok(())
        }
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
        Command::Sync {
            admin,
            site,
            patient,
        } => {
            init_logging_quiet();
            println!(
                "{}",
                runtime()?.block_on(snaps::admin::sync(&admin, &site, patient))?
            );
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
            command: GlobalCommand::Serve { config, insecure },
        } => {
            init_logging();
            let path = config;
            let config = snaps_global::GlobalConfig::load(&path)
                .with_context(|| format!("read {}", path.display()))?;
            if config.tls.is_none() && !insecure {
                bail!(
                    "{}: no [tls]: give the controller's certificates (snaps certs init, then \
                     [tls] dir = \"certs/global\"), or run with --insecure to serve plain text \
                     (development only)",
                    path.display()
                );
            }
            let controller =
                snaps_global::GlobalController::open(config).context("open the global store")?;
            runtime()?.block_on(controller.run())?;
            Ok(())
        }
        Command::Global {
            command: GlobalCommand::Migrate { config, from, to },
        } => {
            let path = config;
            let config = snaps_global::GlobalConfig::load(&path)
                .with_context(|| format!("read {}", path.display()))?;
            let from = match (from, &config.store) {
                (Some(f), _) => f,
                (None, snaps_global::StoreLocation::Sqlite(f)) => f.clone(),
                (None, snaps_global::StoreLocation::Postgres(_)) => bail!(
                    "{}: the store is on PostgreSQL already; give --from the SQLite file to move",
                    path.display()
                ),
            };
            if !(to.starts_with("postgresql://") || to.starts_with("postgres://")) {
                bail!("--to {to:?} is not a postgresql:// URL");
            }
            let bar = indicatif::ProgressBar::new_spinner();
            let moved =
                snaps_global::sql_store::migrate::migrate(&from, &to, &config, &mut |t, n| {
                    bar.set_message(format!("{t}: {n} rows"));
                    bar.tick();
                })
                .with_context(|| format!("move {} to PostgreSQL", from.display()))?;
            bar.finish_and_clear();
            let rows: u64 = moved.iter().map(|m| m.rows).sum();
            for m in &moved {
                println!("{:<24} {:>10}", m.table, m.rows);
            }
            println!(
                "moved {rows} rows in {} tables from {} to {}; set store to that URL in {} and start the controller",
                moved.len(),
                from.display(),
                snaps_global::StoreLocation::Postgres(to.clone()),
                path.display()
            );
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Refresh(opts),
        } => {
            init_logging_bench();
            let report = runtime()?.block_on(snaps::refresh_bench::bench_refresh(&opts))?;
            print!("{report}");
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Network(opts),
        } => {
            init_logging_bench();
            // On Ctrl-C or SIGTERM the benchmark is dropped where it stands,
            // which stops its PostgreSQL server and removes its files.
            let rt = runtime()?;
            let report = rt.block_on(async {
                tokio::select! {
                    report = snaps::network_bench::bench_network(&opts) => report.map(Some),
                    () = snaps_global::shutdown_signal() => Ok(None),
                }
            })?;
            // Blocking work still running (a day's workload stops at its
            // next encounter; a PostgreSQL start finishes and is undone).
            rt.shutdown_timeout(std::time::Duration::from_secs(30));
            let Some(report) = report else {
                bail!(
                    "interrupted: the report was not written; the benchmark's servers are stopped and their files removed"
                );
            };
            print!("{}", report.summary());
            println!(
                "report: {}, plots: network-bytes.svg, network-response.svg, network-refresh.svg",
                opts.out.join("benchmarks.md").display()
            );
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Match(opts),
        } => {
            init_logging_bench();
            let report = runtime()?.block_on(snaps::match_bench::bench_match(&opts))?;
            print!("{report}");
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Site(opts),
        } => {
            init_logging_bench();
            let report = runtime()?.block_on(snaps::bench::bench_site(&opts))?;
            print!("{report}");
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Global(opts),
        } => {
            init_logging_bench();
            match &opts.store {
                Some(url) => {
                    let report =
                        runtime()?.block_on(snaps::store_bench::bench_stores(&opts, url))?;
                    print!("{report}");
                }
                None => {
                    let report = runtime()?.block_on(snaps::bench::bench_global(&opts))?;
                    print!("{report}");
                }
            }
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
            command: SiteCommand::Serve { config, insecure },
        } => {
            init_logging();
            let config = snaps_local::serve::SiteServeConfig::load(&config, insecure)?;
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
    snaps::fixtures::load_network(path)
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
