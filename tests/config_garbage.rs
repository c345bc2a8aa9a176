//! Configuration files an administrator edits by hand — `network.toml`,
//! `global.toml`, `site.toml`, `users.toml` — damaged at random (cut short,
//! characters dropped, garbage inserted, lines doubled): loading never
//! panics, and a file it refuses is named in the error. Seeded property
//! tests, so CI runs the same cases every time (PROPTEST_RNG_SEED).

use std::path::{Path, PathBuf};

use proptest::prelude::*;

const GLOBAL: &str = "listen = \"127.0.0.1:7400\"\nstore = \"global.db\"\nnetwork = \".\"\n\
    refresh_at = \"02:00\"\n[indexes]\npatient = [[\"surname\"], [\"dob\"]]\n\
    [credentials]\nCPH = { token = \"cph-token-0123456789abcdef\" }\n\
    STG = { token_file = \"stg.token\" }\n";

const SITE: &str = "site = \"STG\"\nnetwork = \".\"\ndatabase = \"STG/local.db\"\n\
    listen = \"127.0.0.1:7702\"\nglobal = \"http://127.0.0.1:7400\"\n\
    token_file = \"stg.token\"\n";

/// A users file with one user, as `snaps users add` writes it.
fn users_text() -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.toml");
    let mut users = snaps_local::users::Users::default();
    users.add("radiology", "RAD01", "film-badge-7").unwrap();
    users.save(&path).unwrap();
    std::fs::read_to_string(&path).unwrap()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// One damage to a text.
#[derive(Debug, Clone)]
enum Damage {
    Cut(usize),
    Drop(usize, usize),
    Insert(usize, String),
    DoubleLine(usize),
}

fn damages() -> impl Strategy<Value = Vec<Damage>> {
    let garbage = prop::sample::select(vec![
        "\"",
        "'",
        "[",
        "]",
        "[[",
        "=",
        "\n",
        "{",
        "}",
        ",",
        "#",
        "\\",
        "\u{0}",
        "é",
        "999999999999999999999",
        "-1",
        "true",
        "nan",
        "\"\"\"",
        "[site]",
        "a = ",
        "keys = { first = 5, last = 1 }",
    ]);
    prop::collection::vec(
        prop_oneof![
            any::<usize>().prop_map(Damage::Cut),
            (any::<usize>(), 1..20usize).prop_map(|(a, n)| Damage::Drop(a, n)),
            (any::<usize>(), garbage).prop_map(|(a, g)| Damage::Insert(a, g.to_string())),
            any::<usize>().prop_map(Damage::DoubleLine),
        ],
        1..4,
    )
}

/// `text` with `damages` applied, at char boundaries.
fn damaged(text: &str, damages: &[Damage]) -> String {
    let mut t = text.to_string();
    let at = |t: &str, i: usize| {
        let n = t.chars().count().max(1);
        t.char_indices().nth(i % n).map_or(t.len(), |(b, _)| b)
    };
    for d in damages {
        match d {
            Damage::Cut(i) => {
                let b = at(&t, *i);
                t.truncate(b);
            }
            Damage::Drop(i, n) => {
                let b = at(&t, *i);
                let e = t[b..]
                    .char_indices()
                    .nth(*n)
                    .map_or(t.len(), |(k, _)| b + k);
                t.replace_range(b..e, "");
            }
            Damage::Insert(i, g) => {
                let b = at(&t, *i);
                t.insert_str(b, g);
            }
            Damage::DoubleLine(i) => {
                let lines: Vec<&str> = t.lines().collect();
                if !lines.is_empty() {
                    let k = i % lines.len();
                    let mut out: Vec<&str> = lines[..=k].to_vec();
                    out.extend(&lines[k..]);
                    t = out.join("\n");
                }
            }
        }
    }
    t
}

/// Copies the radiology network into `dir` (the files network.toml names).
fn copy_network(dir: &Path) {
    let from = root().join("fixtures/radiology");
    for entry in ["network.toml", "global.sql", "local.sql"] {
        std::fs::copy(from.join(entry), dir.join(entry)).unwrap();
    }
    for site in ["CPH", "STG", "GRC"] {
        std::fs::create_dir_all(dir.join(site)).unwrap();
        for f in ["mapping.tsv", "qualification.tsv"] {
            std::fs::copy(from.join(site).join(f), dir.join(site).join(f)).unwrap();
        }
    }
}

fn check<T, E: std::fmt::Display>(outcome: Result<T, E>, file: &str) -> Result<(), TestCaseError> {
    if let Err(e) = outcome {
        let text = e.to_string();
        prop_assert!(
            text.contains(file),
            "the error does not name {file}: {text}"
        );
    }
    Ok(())
}

#[test]
fn the_undamaged_files_load() {
    let dir = tempfile::tempdir().unwrap();
    copy_network(dir.path());
    snaps_schema::NetworkConfig::load(dir.path()).expect("network.toml");
    std::fs::write(dir.path().join("stg.token"), "stg-token-0123456789abcdef").unwrap();
    let global = dir.path().join("global.toml");
    std::fs::write(&global, GLOBAL).unwrap();
    snaps_global::GlobalConfig::load(&global).expect("global.toml");
    let site = dir.path().join("site.toml");
    std::fs::write(&site, SITE).unwrap();
    snaps_local::serve::SiteServeConfig::load(&site, true).expect("site.toml");
    let users = dir.path().join("users.toml");
    std::fs::write(&users, users_text()).unwrap();
    snaps_local::users::Users::load(&users).expect("users.toml");
}

#[test]
fn site_toml_may_name_several_controllers_the_first_preferred() {
    let dir = tempfile::tempdir().unwrap();
    copy_network(dir.path());
    std::fs::write(dir.path().join("stg.token"), "stg-token-0123456789abcdef").unwrap();
    let site = dir.path().join("site.toml");
    let several = SITE.replace(
        "global = \"http://127.0.0.1:7400\"",
        "global = [\"http://127.0.0.1:7400\", \"http://127.0.0.1:7401\"]",
    );
    std::fs::write(&site, &several).unwrap();
    let c = snaps_local::serve::SiteServeConfig::load(&site, true).expect("site.toml");
    assert_eq!(c.link.addr, "http://127.0.0.1:7400");
    assert_eq!(c.link.fallbacks, vec!["http://127.0.0.1:7401".to_string()]);
    let none = SITE.replace("global = \"http://127.0.0.1:7400\"", "global = []");
    std::fs::write(&site, none).unwrap();
    let err = snaps_local::serve::SiteServeConfig::load(&site, true)
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("site.toml") && err.contains("names no global controller"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn a_damaged_network_toml_is_refused_naming_it(d in damages()) {
        let dir = tempfile::tempdir().unwrap();
        copy_network(dir.path());
        let text = std::fs::read_to_string(dir.path().join("network.toml")).unwrap();
        std::fs::write(dir.path().join("network.toml"), damaged(&text, &d)).unwrap();
        let loaded = snaps_schema::NetworkConfig::load(dir.path())
            .and_then(|n| n.global_catalog().map(|_| n));
        check(loaded, "network.toml")?;
    }

    #[test]
    fn a_damaged_global_toml_is_refused_naming_it(d in damages()) {
        let dir = tempfile::tempdir().unwrap();
        copy_network(dir.path());
        std::fs::write(dir.path().join("stg.token"), "stg-token-0123456789abcdef").unwrap();
        let path = dir.path().join("global.toml");
        std::fs::write(&path, damaged(GLOBAL, &d)).unwrap();
        check(snaps_global::GlobalConfig::load(&path), "global.toml")?;
    }

    #[test]
    fn a_damaged_site_toml_is_refused_naming_it(d in damages()) {
        let dir = tempfile::tempdir().unwrap();
        copy_network(dir.path());
        std::fs::write(dir.path().join("stg.token"), "stg-token-0123456789abcdef").unwrap();
        let path = dir.path().join("site.toml");
        std::fs::write(&path, damaged(SITE, &d)).unwrap();
        check(snaps_local::serve::SiteServeConfig::load(&path, true), "site.toml")?;
    }

    #[test]
    fn a_damaged_users_toml_is_refused_naming_it(d in damages()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        std::fs::write(&path, damaged(&users_text(), &d)).unwrap();
        check(snaps_local::users::Users::load(&path), "users.toml")?;
    }
}
