//! Golden tests of query mapping: each `tests/golden/*.case` file holds a
//! query, the site it runs at, and the explain text (`Plan`'s `Display`) an
//! administrator would read for it. The files are meant to be read without
//! this code:
//!
//! ```text
//! # one-line description (thesis reference)
//! network: figures
//! site: A
//! query: retrieve patient.all where patient.name = "Jones"
//! ----
//! decomposition (unambiguous):
//! ...
//! ```
//!
//! The query runs from `query:` to the `----` line and may span several lines.
//! Below `----` is the expected output: the plan of every retrieval in the
//! text (a QUEL `define snapshot` counts by its query), separated by a blank
//! line when there are several, or `error: <message>` where parsing or
//! planning fails.
//!
//! After a deliberate change to the engine, `UPDATE_EXPECT=1 cargo test -p
//! snaps-mapping --test golden` rewrites the expected part of every case
//! instead of failing; review the diff before committing it.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use common::Network;
use snaps_mapping::{Statement, rewrite};

const SEPARATOR: &str = "----";

/// One case file, split into its parts.
#[derive(Debug)]
struct Case {
    path: PathBuf,
    /// Everything above `----`, kept verbatim for rewriting.
    head: String,
    network: String,
    site: String,
    query: String,
    expected: String,
}

fn parse_case(path: &Path) -> Result<Case, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read: {e}"))?;
    let (head, expected) = match text.split_once(&format!("\n{SEPARATOR}\n")) {
        Some((h, e)) => (format!("{h}\n"), e.to_string()),
        None => match text.strip_suffix(&format!("\n{SEPARATOR}")) {
            Some(h) => (format!("{h}\n"), String::new()),
            None => {
                return Err(format!(
                    "no line `{SEPARATOR}` between the query and the expected output"
                ));
            }
        },
    };
    if !head.starts_with('#') {
        return Err("the first line must be a `# description`".into());
    }
    let mut network = None;
    let mut site = None;
    let mut query: Option<String> = None;
    for line in head.lines() {
        if let Some(q) = &mut query {
            q.push('\n');
            q.push_str(line);
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .ok_or_else(|| format!("expected `key: value`, found {line:?}"))?;
        let value = value.trim().to_string();
        match key.trim() {
            "network" => network = Some(value),
            "site" => site = Some(value),
            "query" => query = Some(value),
            other => return Err(format!("unknown header {other:?} (network, site, query)")),
        }
    }
    let missing = |what: &str| format!("missing `{what}:` line");
    let query = query.ok_or_else(|| missing("query"))?.trim().to_string();
    if query.is_empty() {
        return Err("the query is empty".into());
    }
    Ok(Case {
        path: path.to_path_buf(),
        head,
        network: network.ok_or_else(|| missing("network"))?,
        site: site.ok_or_else(|| missing("site"))?,
        query,
        expected,
    })
}

/// What the case's query plans to at its site: the explain text of every
/// retrieval, or the error.
fn render(
    case: &Case,
    networks: &mut BTreeMap<String, Result<Network, String>>,
) -> Result<String, String> {
    let network = networks
        .entry(case.network.clone())
        .or_insert_with(|| Network::load(&case.network))
        .as_ref()
        .map_err(|e| format!("fixture: {e}"))?;
    let site = network
        .site(&case.site)
        .map_err(|e| format!("fixture: {e}"))?;
    let statements = match snaps_mapping::parse(&case.query) {
        Ok((_, statements)) => statements,
        Err(e) => return Ok(format!("error: {e}\n")),
    };
    if statements.is_empty() {
        return Err("the query holds no statement".into());
    }
    let mut out = Vec::new();
    for statement in &statements {
        let select = match statement {
            Statement::Select(s) => s,
            Statement::DefineSnapshot { query, .. } => query,
            other => {
                out.push(format!("not a retrieval, nothing to fetch: {other}\n"));
                continue;
            }
        };
        match rewrite::plan(select, &site.local, &site.mapping) {
            Ok(plan) => {
                // The plan also travels as JSON (the CLI's `--json`): it must
                // always serialise.
                serde_json::to_string(&plan)
                    .map_err(|e| format!("plan does not serialise: {e}"))?;
                out.push(plan.to_string());
            }
            Err(e) => out.push(format!("error: {e}\n")),
        }
    }
    Ok(out.join("\n"))
}

/// A line diff (longest common subsequence) marking lines only in `expected`
/// with `-` and lines only in `actual` with `+`.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        } else {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        }
    }
    out
}

fn case_files() -> Vec<PathBuf> {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "case"))
        .collect();
    files.sort();
    files
}

#[test]
fn golden_cases() {
    let update = std::env::var("UPDATE_EXPECT").is_ok_and(|v| v == "1");
    let files = case_files();
    assert!(!files.is_empty(), "no golden cases found");
    let mut networks = BTreeMap::new();
    let mut failures = Vec::new();
    let mut updated = Vec::new();
    for path in &files {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let case = match parse_case(path) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{name}: malformed case: {e}"));
                continue;
            }
        };
        let actual = match render(&case, &mut networks) {
            Ok(a) => a,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if actual == case.expected {
            continue;
        }
        if update {
            let text = format!("{}{SEPARATOR}\n{actual}", case.head);
            std::fs::write(&case.path, text).unwrap_or_else(|e| panic!("write {name}: {e}"));
            updated.push(name);
            continue;
        }
        failures.push(format!(
            "{name}: the plan differs (query at site {} of {}):\n{}\n--- expected\n{}--- actual\n{}--- diff (- expected, + actual)\n{}",
            case.site,
            case.network,
            case.query,
            case.expected,
            actual,
            diff(&case.expected, &actual)
        ));
    }
    if !updated.is_empty() {
        eprintln!(
            "UPDATE_EXPECT=1: rewrote {} case(s): {}",
            updated.len(),
            updated.join(", ")
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden case(s) failed (UPDATE_EXPECT=1 rewrites the expectations):\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}
