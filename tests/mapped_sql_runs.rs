//! Every mapped query of the golden mapping cases is a valid SQLite query
//! over the global schema (with the global snapshot's tuple id columns): the
//! global controller can compile what the sites send.

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

#[test]
fn mapped_queries_of_the_golden_cases_compile_in_sqlite() {
    let dir = root().join("mapping/tests/golden");
    let mut checked = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("golden cases")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "case"))
        .collect();
    entries.sort();
    for path in entries {
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
