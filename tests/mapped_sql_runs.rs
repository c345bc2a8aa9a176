//! Every mapped query of the golden mapping cases is a valid SQLite query
//! over the global schema (with the global snapshot's tuple id columns), and
//! the global controller accepts it as the sites send it — through its
//! checks, compiled with and without semi-join temporary tuples — into SQL
//! its store can run.

use std::path::{Path, PathBuf};

use snaps_mapping::{SiteMapping, Statement, rewrite};
use snaps_schema::NetworkConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `network:`, `site:` and `query:` of a golden case file.
fn case(text: &str) -> Option<(String, String, String)> {
    let head = text.split("\n----").next()?;
    let mut network = None;
    let mut site = None;
    let mut query = String::new();
    let mut in_query = false;
    for line in head.lines() {
        if let Some(v) = line.strip_prefix("network:") {
            network = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("site:") {
            site = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("query:") {
            in_query = true;
            query.push_str(v);
        } else if in_query {
            query.push('\n');
            query.push_str(line);
        }
    }
    Some((network?, site?, query))
}

fn global_database(config: &NetworkConfig) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
    let global = config.global_catalog().expect("global schema");
    conn.execute_batch(&global.to_ddl())
        .expect("create global relations");
    for r in global.relations() {
        conn.execute_batch(&format!(
            "ALTER TABLE {} ADD COLUMN tuple_id INTEGER; ALTER TABLE {} ADD COLUMN main_tuple_id INTEGER;",
            r.name, r.name
        ))
        .expect("status columns");
    }
    conn
}

fn site_mapping(config: &NetworkConfig, code: &str) -> (snaps_schema::Catalog, SiteMapping) {
    let site = config.site(code).expect("site");
    let local = config.local_catalog(site).expect("local schema");
    let read = |p: &Path| std::fs::read_to_string(config.path(p)).expect("read mapping file");
    let quals = site.qualification.as_deref().map(read).unwrap_or_default();
    let mapping = SiteMapping::from_text(
        &read(&site.mapping),
        &quals,
        &local,
        &config.global_catalog().expect("global"),
    )
    .expect("mapping");
    (local, mapping)
}

fn golden_cases() -> Vec<PathBuf> {
    let dir = root().join("mapping/tests/golden");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("golden cases")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "case"))
        .collect();
    entries.sort();
    entries
}

#[test]
fn mapped_queries_of_the_golden_cases_compile_in_sqlite() {
    let mut checked = 0;
    for path in golden_cases() {
        let text = std::fs::read_to_string(&path).expect("read case");
        let Some((network, site, query)) = case(&text) else {
            continue;
        };
        let config = NetworkConfig::load(&root().join("fixtures").join(&network)).expect("network");
        let (local, mapping) = site_mapping(&config, &site);
        let Ok((_, statements)) = snaps_mapping::parse(&query) else {
            continue;
        };
        let conn = global_database(&config);
        for statement in statements {
            let select = match statement {
                Statement::Select(s) => s,
                Statement::DefineSnapshot { query, .. } => query,
                _ => continue,
            };
            let Ok(plan) = rewrite::plan(&select, &local, &mapping) else {
                continue;
            };
            for group in plan.query.iter().flat_map(|q| &q.groups) {
                let sql = group.to_string();
                conn.prepare(&sql).unwrap_or_else(|e| {
                    panic!(
                        "{}: mapped query does not compile: {e}\n{sql}",
                        path.display()
                    )
                });
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 40,
        "only {checked} mapped queries found in the golden cases"
    );
}

/// The global store of a network in `dir`, and a second connection to it.
fn global_store(
    config: &NetworkConfig,
    dir: &Path,
) -> (snaps_global::GlobalConfig, rusqlite::Connection) {
    let store = dir.join(format!("{}.db", config.name));
    let global = snaps_global::GlobalConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        store.clone(),
        config.clone(),
        Default::default(),
        Default::default(),
        Default::default(),
    )
    .expect("global config");
    snaps_global::SqliteStore::open(&store, &global).expect("open store");
    (
        global,
        rusqlite::Connection::open(&store).expect("second connection"),
    )
}

#[test]
fn the_global_controller_accepts_and_compiles_every_golden_mapped_query() {
    use snaps_global::GlobalStore;
    use snaps_global::compile::{compile_group, temp_table};
    use snaps_global::query::FetchQuery;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut compiled = 0;
    let mut fetched = 0;
    let mut on_postgres: std::collections::HashMap<String, snaps_global::PgStore> =
        Default::default();
    for path in golden_cases() {
        let text = std::fs::read_to_string(&path).expect("read case");
        let Some((network, site, query)) = case(&text) else {
            continue;
        };
        let config = NetworkConfig::load(&root().join("fixtures").join(&network)).expect("network");
        let (global, conn) = global_store(&config, dir.path());
        let (local, mapping) = site_mapping(&config, &site);
        let Ok((_, statements)) = snaps_mapping::parse(&query) else {
            continue;
        };
        for statement in statements {
            let select = match statement {
                Statement::Select(s) => s,
                Statement::DefineSnapshot { query, .. } => query,
                _ => continue,
            };
            let Ok(plan) = rewrite::plan(&select, &local, &mapping) else {
                continue;
            };
            let Some(q) = &plan.query else { continue };
            let mut req = snaps_proto::fetch_request(q);
            // A semi-join row of NULLs for every projection the site makes.
            for sj in &plan.semijoins {
                let (gi, ti) = q
                    .groups
                    .iter()
                    .enumerate()
                    .find_map(|(gi, g)| {
                        g.tables
                            .iter()
                            .position(|t| t.local_var == sj.local_var)
                            .map(|ti| (gi, ti))
                    })
                    .expect("projected variable is a mapped table");
                let rm = mapping.relation(&sj.local_relation).expect("mapped");
                let row = vec![snaps_schema::Value::Null; sj.attributes.len()];
                req.semijoins.push(
                    snaps_local::remote::semijoin(
                        gi,
                        ti,
                        &q.groups[gi].tables[ti],
                        rm,
                        &sj.attributes,
                        &[row],
                    )
                    .expect("semi-join message"),
                );
            }
            let checked = FetchQuery::decode(&req, &global.catalog).unwrap_or_else(|e| {
                panic!(
                    "{}: the global controller refuses the mapped query: {e}",
                    path.display()
                )
            });
            // Run whole, and as the nightly delta, on both stores: the
            // PostgreSQL dialect of every compiled fetch is run for real.
            let number = config
                .sites
                .iter()
                .find(|s| s.code.as_str() == site)
                .expect("site of the case")
                .number;
            let asker = snaps_global::store::SiteId {
                code: site.clone(),
                number,
            };
            let pg = on_postgres.entry(config.name.clone()).or_insert_with(|| {
                let url = snaps::pg_server::PgServer::shared()
                    .expect("the PostgreSQL server for the tests")
                    .create_database(&format!("golden_{}", config.name))
                    .expect("a database");
                snaps_global::PgStore::connect(&url, &global).expect("PostgreSQL store")
            });
            let sqlite = snaps_global::SqliteStore::open(
                &dir.path().join(format!("{}.db", config.name)),
                &global,
            )
            .expect("SQLite store");
            for changed_after in [None, Some(0)] {
                let q = FetchQuery {
                    changed_after,
                    ..checked.clone()
                };
                for (name, store) in [
                    ("SQLite", &sqlite as &dyn GlobalStore),
                    ("PostgreSQL", pg as &dyn GlobalStore),
                ] {
                    store.fetch(&asker, &q).unwrap_or_else(|e| {
                        panic!(
                            "{}: the {name} store cannot run the fetch: {e}",
                            path.display()
                        )
                    });
                }
                fetched += 1;
            }
            for (gi, g) in checked.groups.iter().enumerate() {
                let sjs: Vec<_> = checked.semijoins.iter().filter(|s| s.group == gi).collect();
                for sj in &sjs {
                    let cols: Vec<String> =
                        (0..sj.columns.len()).map(|n| format!("c{n}")).collect();
                    conn.execute_batch(&format!(
                        "DROP TABLE IF EXISTS temp.{0}; CREATE TEMP TABLE {0} ({1})",
                        temp_table(sj.table),
                        cols.join(", ")
                    ))
                    .expect("temp table");
                }
                for mask in 0u32..(1 << sjs.len()) {
                    let temps: Vec<_> = sjs
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, s)| (s.table, *s))
                        .collect();
                    if temps.len() == g.tables.len() {
                        continue;
                    }
                    // The whole group, and each term of its nightly delta.
                    let terms = std::iter::once(None).chain(
                        (0..g.tables.len())
                            .filter(|t| temps.iter().all(|(x, _)| x != t))
                            .map(|t| Some((t, 1))),
                    );
                    for term in terms {
                        let c = compile_group(g, &temps, term, snaps_global::db::Dialect::Sqlite);
                        conn.prepare(&c.sql).unwrap_or_else(|e| {
                            panic!(
                                "{}: compiled fetch does not run: {e}\n{}",
                                path.display(),
                                c.sql
                            )
                        });
                        compiled += 1;
                    }
                }
            }
        }
    }
    assert!(
        compiled >= 60,
        "only {compiled} compiled fetches from the golden cases"
    );
    assert!(fetched >= 40, "only {fetched} fetches run on both stores");
}
