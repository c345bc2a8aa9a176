//! The `snaps` binary as an administrator uses it.

use std::process::{Command, Output};

fn snaps(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run snaps")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn explain_shows_decomposition_semijoins_and_the_mapped_query() {
    let o = snaps(&[
        "explain",
        "--network",
        "fixtures/figures",
        "--site",
        "A",
        r#"retrieve (visit.all) where patient.name = "Smith" and patient.pno = visit.pno"#,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("site A, QUEL\ndecomposition (ambiguous):"),
        "{out}"
    );
    assert!(
        out.contains("  selection patient: patient.name = 'Smith'\n"),
        "{out}"
    );
    assert!(out.contains("  join: patient.pno = visit.pno\n"), "{out}");
    assert!(
        out.contains("FROM patient WHERE patient.name = 'Smith' AND <new or modified here>"),
        "{out}"
    );
    assert!(
        out.contains("(pat_addr FULL JOIN pat_other ON pat_addr.pno = pat_other.pno)"),
        "{out}"
    );
}

#[test]
fn explain_json_is_machine_readable() {
    let o = snaps(&[
        "explain",
        "--json",
        "--network",
        "fixtures/radiology",
        "--site",
        "STG",
        "SELECT * FROM patient WHERE surname = 'Jones' AND race = 'MAOR'",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(v["site"], "STG");
    assert_eq!(v["language"], "sql");
    let dropped = v["plan"]["dropped"].as_array().expect("dropped list");
    assert!(
        dropped.iter().any(|d| d
            .as_str()
            .is_some_and(|s| s.contains("patient.race is not mapped"))),
        "STG does not map race: {dropped:?}"
    );
    let sql = v["mapped_sql"].as_str().expect("mapped sql");
    assert!(sql.contains("WHERE patient.surname = 'Jones'"), "{sql}");
    assert!(!sql.contains("race"), "race must not leave STG: {sql}");
}

#[test]
fn check_accepts_the_fixture_networks() {
    for network in ["fixtures/radiology", "fixtures/figures"] {
        let o = snaps(&["check", "--network", network]);
        assert!(
            o.status.success(),
            "{network}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
    let o = snaps(&["check", "--network", "fixtures/radiology"]);
    assert!(stdout(&o).contains("CPH: ok ("), "{}", stdout(&o));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let o = snaps(&[
        "explain",
        "--network",
        "fixtures/radiology",
        "--site",
        "XYZ",
        "SELECT 1",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown site XYZ in network christchurch (sites: CPH, STG, GRC)"),
        "{}",
        stderr(&o)
    );
    let o = snaps(&[
        "explain",
        "--network",
        "fixtures/radiology",
        "--site",
        "CPH",
        "SELECT surnme FROM patient",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown attribute surnme"),
        "{}",
        stderr(&o)
    );
    let o = snaps(&[
        "explain",
        "--network",
        "fixtures/radiology",
        "--site",
        "CPH",
        "retreive (p.all)",
    ]);
    assert!(!o.status.success());
    let o = snaps(&[
        "explain",
        "--network",
        "/nonexistent",
        "--site",
        "CPH",
        "SELECT 1",
    ]);
    assert!(
        stderr(&o).contains("load network /nonexistent"),
        "{}",
        stderr(&o)
    );
}

/// A `global.toml` in `dir` for the radiology network, listening on a free
/// loopback port; returns its path and the address.
fn global_config(dir: &std::path::Path, cph_token: &str) -> (std::path::PathBuf, String) {
    let port = free_port();
    let network = radiology();
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\nstore = \"global.db\"\nnetwork = {:?}\n\n[credentials]\nCPH = {{ token = {cph_token:?} }}\nSTG = {{ token_file = \"stg.token\" }}\n",
        network.display().to_string()
    );
    std::fs::write(dir.join("stg.token"), "stg-token-0123456789abcdef\n").expect("write token");
    let path = dir.join("global.toml");
    std::fs::write(&path, text).expect("write config");
    (path, format!("http://127.0.0.1:{port}"))
}

#[test]
fn global_serve_answers_sites_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, addr) = global_config(dir.path(), "cph-token-0123456789abcdef");
    let child = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(["global", "serve", "--insecure", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start snaps global serve");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let fingerprint = snaps_schema::NetworkConfig::load(&radiology())
        .and_then(|n| n.global_catalog())
        .expect("network")
        .fingerprint();
    let hello = rt.block_on(async {
        for _ in 0..100 {
            if let Ok(c) = snaps_local::remote::GlobalClient::connect(
                &addr,
                &snaps_local::remote::Auth::Insecure("stg-token-0123456789abcdef".into()),
                Some("STG"),
            )
            .await
            {
                return c.hello(&fingerprint).await.expect("hello");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the global controller did not start listening at {addr}");
    });
    assert_eq!(hello.site_code, "STG");
    assert_eq!(hello.site_number, 2);
    assert_eq!(
        hello.keys.map(|k| (k.first, k.last)),
        Some((10_000_000, 19_999_999))
    );
    let out = signalled(child, "TERM");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("SIGTERM: shutting down"), "{err}");
    assert!(err.contains("global controller stopped"), "{err}");
    assert!(dir.path().join("global.db").exists());
}

#[test]
fn global_serve_refuses_a_short_token_naming_the_site() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = global_config(dir.path(), "short");
    let o = snaps(&[
        "global",
        "serve",
        "--config",
        config.to_str().expect("path"),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the token of site CPH is shorter than 16 characters"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_global_runs_and_reports_ratios() {
    let o = snaps(&[
        "bench",
        "global",
        "--patients",
        "40",
        "--fetches",
        "15",
        "--locks",
        "15",
        "--clients",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("baseline: point lookup on the store's SQLite file"),
        "{out}"
    );
    assert!(
        out.contains("point fetch over gRPC, new tuple, 1 client"),
        "{out}"
    );
    assert!(out.contains("lock request over gRPC, refused"), "{out}");
    assert!(out.contains("wire/raw"), "{out}");
}

/// Processes killed if a test fails before stopping them.
/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The radiology fixture network.
fn radiology() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/radiology")
}

/// `snaps users add radiology` (user code RAD01, password `film-badge-7`)
/// to `dir/users.toml`.
fn add_radiology_user(dir: &std::path::Path) -> Output {
    let added = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(["users", "add", "radiology", "--code", "RAD01", "--file"])
        .arg(dir.join("users.toml"))
        .env("SNAPS_USER_PASSWORD", "film-badge-7")
        .output()
        .expect("snaps users add");
    assert!(added.status.success(), "{}", stderr(&added));
    added
}

/// Sends `signal` (`TERM`, `INT`) to `child` and waits for it to end.
fn signalled(child: std::process::Child, signal: &str) -> Output {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{signal} failed");
    child.wait_with_output().expect("wait")
}

struct Running(Vec<std::process::Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn site_serve_creates_its_database_registers_and_answers_sql() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (global_config, global_addr) = global_config(dir.path(), "cph-token-0123456789abcdef");
    let global = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(["global", "serve", "--insecure", "--config"])
        .arg(&global_config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the global controller");
    let sql_port = free_port();
    let network = radiology();
    let site_toml = dir.path().join("site.toml");
    std::fs::write(
        &site_toml,
        format!(
            "site = \"STG\"\nnetwork = {:?}\ndatabase = \"STG/local.db\"\nlisten = \"127.0.0.1:{sql_port}\"\n\
             global = {global_addr:?}\ntoken_file = \"stg.token\"\nusers_file = \"users.toml\"\n",
            network.display().to_string()
        ),
    )
    .expect("write site.toml");
    let added = add_radiology_user(dir.path());
    assert!(
        String::from_utf8_lossy(&added.stdout).contains("added user radiology (user code RAD01)")
    );
    let site = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(["site", "serve", "--insecure", "--config"])
        .arg(&site_toml)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the site");
    let mut running = Running(vec![site, global]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (count, refused) = rt.block_on(async {
        let connect = |user: &'static str| async move {
            let config =
                format!("host=127.0.0.1 port={sql_port} user={user} password=film-badge-7");
            tokio_postgres::connect(&config, tokio_postgres::NoTls).await
        };
        for _ in 0..100 {
            if let Ok((client, conn)) = connect("radiology").await {
                tokio::spawn(conn);
                let count: i64 = client
                    .query_one("SELECT count(*) FROM patient", &[])
                    .await
                    .expect("count")
                    .get(0);
                let refused = connect("mallory").await.err().map(|e| format!("{e:?}"));
                return (count, refused);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the site did not start serving SQL on port {sql_port}");
    });
    assert_eq!(count, 0, "a new site holds no patients");
    let refused = refused.expect("an unknown user is refused");
    assert!(
        refused.contains("password authentication failed for user \\\"mallory\\\""),
        "{refused}"
    );
    assert!(dir.path().join("STG/local.db").exists());
    for child in std::mem::take(&mut running.0) {
        let out = signalled(child, "TERM");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bench_site_runs_and_reports_ratios() {
    let o = snaps(&[
        "bench",
        "site",
        "--patients",
        "40",
        "--queries",
        "20",
        "--lookups",
        "10",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("baseline: the query on the site's SQLite file directly"),
        "{out}"
    );
    assert!(
        out.contains("the query through the SQL endpoint (covered)"),
        "{out}"
    );
    assert!(
        out.contains("first lookup of another site's patient (by pno): 10 tuples"),
        "{out}"
    );
    // The fixed cost of a statement, beside PostgreSQL's own (CI has it).
    assert!(out.contains("one tuple by key: SELECT"), "{out}");
    assert!(
        out.contains(": the same query, the same tuples")
            || out.contains("PostgreSQL baseline not measured: "),
        "{out}"
    );
}

#[test]
fn bench_match_scores_the_grades_against_the_truth() {
    let o = snaps(&["bench", "match", "--patients", "300"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("900 records matched"), "{out}");
    // Precision and recall of every grade and of the baseline, as numbers
    // between 0 and 1.
    for what in ["| `certain` |", "| `probable` or better |", "(baseline) |"] {
        let row = out
            .lines()
            .find(|l| l.starts_with('|') && l.contains(what))
            .unwrap_or_else(|| panic!("no row {what}: {out}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for c in &cells[4..6] {
            let v: f64 = c.parse().unwrap_or_else(|_| panic!("{row}"));
            assert!((0.0..=1.0).contains(&v), "{row}");
        }
    }
    assert!(out.contains("`certain` has precision"), "{out}");
}

#[test]
fn bench_refresh_runs_and_reports_ratios() {
    let o = snaps(&[
        "bench",
        "refresh",
        "--patients",
        "600,1200",
        "--changed",
        "0.05",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("5.0% of own patients changed"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("600 ") || l.trim_start().starts_with("1200 "))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    // Every row measured both designs: non-zero bytes on each side.
    for r in rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert!(cols.len() >= 12, "{r}");
        assert_ne!(cols[5], "0", "{r}");
        assert_ne!(cols[8], "0", "{r}");
    }
    let o = snaps(&["bench", "refresh", "--patients", "600", "--changed", "2"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--changed must be in (0, 1]"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn serving_plain_text_needs_insecure_and_certificates_are_issued_by_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = global_config(dir.path(), "cph-token-0123456789abcdef");
    let o = snaps(&[
        "global",
        "serve",
        "--config",
        config.to_str().expect("path"),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no [tls]") && stderr(&o).contains("--insecure"),
        "{}",
        stderr(&o)
    );
    let site_toml = dir.path().join("site.toml");
    let network = radiology();
    let serve_site = |extra: &str| {
        std::fs::write(
            &site_toml,
            format!(
                "site = \"STG\"\nnetwork = {:?}\ndatabase = \"STG/local.db\"\n\
                 listen = \"127.0.0.1:1\"\nglobal = \"https://127.0.0.1:1\"\n{extra}",
                network.display().to_string()
            ),
        )
        .expect("write site.toml");
        snaps(&[
            "site",
            "serve",
            "--config",
            site_toml.to_str().expect("path"),
        ])
    };
    let o = serve_site("");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("snaps certs site STG") && stderr(&o).contains("--insecure"),
        "{}",
        stderr(&o)
    );

    // The certificate commands, and their refusals.
    let certs = dir.path().join("certs");
    let certs_arg = certs.to_str().expect("path");
    let o = snaps(&["certs", "init", "--dir", certs_arg]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("keep it offline"), "{}", stdout(&o));
    let o = snaps(&["certs", "init", "--dir", certs_arg]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already holds a network CA"),
        "{}",
        stderr(&o)
    );
    let o = snaps(&["certs", "site", "STG", "--dir", certs_arg]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert!(certs.join("STG").join(f).exists(), "{f}");
    }
    let o = snaps(&["certs", "site", "ST G", "--dir", certs_arg]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("letters, digits and _ only"),
        "{}",
        stderr(&o)
    );
    let o = snaps(&[
        "certs",
        "site",
        "STG",
        "--dir",
        dir.path().join("nowhere").to_str().expect("path"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ca-key.pem"), "{}", stderr(&o));

    // Revoking a certificate: by its credential directory.
    let stg_dir = certs.join("STG");
    let o = snaps(&[
        "certs",
        "revoke",
        "--dir",
        certs_arg,
        stg_dir.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("revoked: site STG (serial "),
        "{}",
        stdout(&o)
    );
    assert!(certs.join("revoked.pem").exists());
    let o = snaps(&["certs", "revoke", "--dir", certs_arg]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("<HOLDERS>"), "{}", stderr(&o));
    let o = snaps(&["certs", "site", "STG", "--dir", certs_arg]);
    assert!(
        o.status.success(),
        "a revoked site gets a new certificate: {}",
        stderr(&o)
    );

    // With the site's credentials configured, a missing users file is the
    // next thing named.
    let o = serve_site("tls = \"certs/STG\"\n");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no users_file"), "{}", stderr(&o));
}

/// `psql` at `conninfo` running `command`, with the demo user's password.
fn psql(conninfo: &str, command: &str) -> Option<Output> {
    match Command::new("psql")
        .args([conninfo, "-X", "-A", "-t", "-c", command])
        .env("PGPASSWORD", "film-badge-7")
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
    {
        Ok(o) => Some(o),
        Err(e) if std::env::var_os("SNAPS_REQUIRE_POSTGRES").is_some() => {
            panic!("psql is needed for this test (SNAPS_REQUIRE_POSTGRES is set): {e}")
        }
        Err(e) => {
            eprintln!(
                "psql not run ({e}): install postgresql-client to check TLS at the SQL endpoint"
            );
            None
        }
    }
}

#[test]
fn the_sql_endpoint_serves_tls_with_the_networks_certificate_and_refuses_plain_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let certs_arg = certs.to_str().expect("path");
    let o = snaps(&["certs", "init", "--dir", certs_arg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sql_cert = |host: &str| snaps(&["certs", "sql", "STG", "--dir", certs_arg, "--host", host]);
    let o = sql_cert("not a host!");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a host!"), "{}", stderr(&o));
    let o = sql_cert("127.0.0.1");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("sql_tls = "), "{}", stdout(&o));

    add_radiology_user(dir.path());
    let sql_port = free_port();
    let network = radiology();
    let site_toml = dir.path().join("site.toml");
    let write_site = |extra: &str| {
        std::fs::write(
            &site_toml,
            format!(
                "site = \"STG\"\nnetwork = {:?}\ndatabase = \"STG/local.db\"\n\
                 listen = \"127.0.0.1:{sql_port}\"\nglobal = \"http://127.0.0.1:1\"\n\
                 token = \"stg-token-0123456789abcdef\"\nusers_file = \"users.toml\"\n{extra}",
                network.display().to_string()
            ),
        )
        .expect("write site.toml");
    };
    // Asking for TLS without a certificate is named.
    write_site("sql_tls_required = true\n");
    let o = snaps(&[
        "site",
        "serve",
        "--insecure",
        "--config",
        site_toml.to_str().expect("path"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("snaps certs sql STG"), "{}", stderr(&o));

    // The SQL endpoint needs no global controller to answer this.
    write_site("sql_tls = \"certs/STG-sql\"\n");
    let site = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(["site", "serve", "--insecure", "--config"])
        .arg(&site_toml)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the site");
    let _running = Running(vec![site]);
    let ca = certs.join("ca.pem");
    let verified = format!(
        "host=127.0.0.1 port={sql_port} user=radiology dbname=STG sslmode=verify-full sslrootcert={}",
        ca.display()
    );
    let mut answer = None;
    for _ in 0..100 {
        let Some(o) = psql(&verified, "SELECT 41 + 1") else {
            return;
        };
        if o.status.success() {
            answer = Some(o);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let answer = answer.expect("psql with sslmode=verify-full never got in");
    assert_eq!(String::from_utf8_lossy(&answer.stdout).trim(), "42");
    // The login is bound to the endpoint's certificate (SCRAM-SHA-256-PLUS).
    let bound = psql(
        &format!("{verified} channel_binding=require"),
        "SELECT 6 * 7",
    )
    .expect("psql");
    assert!(
        bound.status.success(),
        "{}",
        String::from_utf8_lossy(&bound.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&bound.stdout).trim(), "42");
    let wrong = psql(&format!("{verified} password=not-the-password"), "SELECT 1").expect("psql");
    assert!(!wrong.status.success());
    let info = psql(&verified, "\\conninfo").expect("psql");
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("SSL connection"),
        "{}",
        String::from_utf8_lossy(&info.stdout)
    );
    // Plain text is refused before any password is asked for.
    let plain = psql(
        &format!("host=127.0.0.1 port={sql_port} user=radiology dbname=STG sslmode=disable"),
        "SELECT 1",
    )
    .expect("psql");
    assert!(!plain.status.success());
    let message = String::from_utf8_lossy(&plain.stderr);
    assert!(message.contains("over TLS only"), "{message}");
    // A client that trusts another CA refuses the endpoint.
    let other = tempfile::tempdir().expect("tempdir");
    let other_certs = other.path().join("certs");
    let o = snaps(&[
        "certs",
        "init",
        "--network",
        "elsewhere",
        "--dir",
        other_certs.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let wrong_ca = psql(
        &format!(
            "host=127.0.0.1 port={sql_port} user=radiology dbname=STG sslmode=verify-full sslrootcert={}",
            other_certs.join("ca.pem").display()
        ),
        "SELECT 1",
    )
    .expect("psql");
    assert!(!wrong_ca.status.success());
    let message = String::from_utf8_lossy(&wrong_ca.stderr);
    assert!(message.contains("certificate verify failed"), "{message}");
}

/// The week's total bytes of `design` in the report's table.
fn total_bytes(report: &str, design: &str) -> u64 {
    let row = report
        .lines()
        .find(|l| l.starts_with(&format!("| {design} |")))
        .unwrap_or_else(|| panic!("no row for {design} in\n{report}"));
    let bold = row
        .split('|')
        .map(str::trim)
        .find(|c| c.starts_with("**"))
        .unwrap_or_else(|| panic!("no total in {row}"));
    bold.trim_matches('*').replace(',', "").parse().expect(row)
}

#[test]
fn bench_network_compares_three_designs_and_writes_the_report() {
    // Bad arguments are named before anything starts.
    let o = snaps(&["bench", "network", "--sites", "1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--sites must be between 2 and 20"),
        "{}",
        stderr(&o)
    );
    let o = snaps(&["bench", "network", "--days", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--days must be"), "{}", stderr(&o));

    let out = tempfile::tempdir().expect("tempdir");
    // An earlier report outside the section is kept.
    std::fs::write(
        out.path().join("benchmarks.md"),
        "# Benchmarks\n\n## Another section\n\nkept\n",
    )
    .expect("write");
    let dir = out.path().to_str().expect("utf-8 path");
    let args = [
        "bench",
        "network",
        "--scale",
        "30",
        "--days",
        "2",
        "--encounters",
        "8",
        "--updates",
        "3",
        "--repeats",
        "2",
        "--shaped",
        "1",
        "--out",
        dir,
    ];
    let o = snaps(&args);
    if !o.status.success()
        && stderr(&o).contains("no PostgreSQL server binaries")
        && std::env::var_os("SNAPS_REQUIRE_POSTGRES").is_none()
    {
        eprintln!(
            "SKIPPED bench network: the PostgreSQL server is not installed (apt-get install postgresql); \
             set SNAPS_REQUIRE_POSTGRES=1 to make this a failure"
        );
        return;
    }
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = stdout(&o);
    for design in ["SNAPS", "central PostgreSQL", "full nightly copy"] {
        assert!(summary.contains(design), "{summary}");
    }
    assert!(
        summary.contains("shaped 2,400 bit/s, 300 ms RTT line: 1 cross-site encounter took"),
        "{summary}"
    );
    let report = std::fs::read_to_string(out.path().join("benchmarks.md")).expect("report");
    assert!(
        report.contains("### The model against a shaped line"),
        "{report}"
    );
    assert!(report.contains("## Another section\n\nkept"), "{report}");
    assert!(report.contains("snaps bench network: begin"), "{report}");
    let (snaps_b, central_b, copy_b) = (
        total_bytes(&report, "SNAPS"),
        total_bytes(&report, "central PostgreSQL"),
        total_bytes(&report, "full nightly copy"),
    );
    assert!(snaps_b > 0 && central_b > 0 && copy_b > 0, "{report}");
    assert!(
        snaps_b < copy_b,
        "SNAPS sent {snaps_b} bytes, the full copy {copy_b}"
    );
    for goal in [
        "1/10 of the central",
        "1/20 of the full copy",
        "1.5x",
        "10 s",
    ] {
        assert!(report.contains(goal), "{report}");
    }
    for plot in [
        "network-bytes.svg",
        "network-response.svg",
        "network-refresh.svg",
    ] {
        let svg = std::fs::read_to_string(out.path().join(plot)).expect(plot);
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{plot}");
        assert!(report.contains(plot), "{report}");
    }
    // Running again replaces the section rather than adding one.
    let o = snaps(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = std::fs::read_to_string(out.path().join("benchmarks.md")).expect("report");
    assert_eq!(again.matches("snaps bench network: begin").count(), 1);
    assert!(again.contains("## Another section\n\nkept"));
}

#[test]
fn an_interrupted_bench_network_stops_its_postgresql_and_removes_its_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Run as root, the benchmark runs PostgreSQL as `postgres`, which must
    // reach its cluster inside.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let out = tmp.path().join("out");
    let pg_dirs = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(tmp.path())
            .expect("read tmp")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("snaps-pg-"))
            })
            .collect()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args([
            "bench", "network", "--scale", "1000", "--days", "3", "--out",
        ])
        .arg(&out)
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the benchmark");
    let mut running = Running(vec![child]);
    // The server's cluster is made first; once it is running the
    // benchmark goes on to the workload.
    let mut started = None;
    for _ in 0..600 {
        if let Some(dir) = pg_dirs().pop()
            && dir.join("data/postmaster.pid").exists()
        {
            started = Some(dir);
            break;
        }
        if running.0[0].try_wait().expect("poll").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let child = running.0.pop().expect("child");
    let Some(cluster) = started else {
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("no PostgreSQL server binaries")
            && std::env::var_os("SNAPS_REQUIRE_POSTGRES").is_none()
        {
            eprintln!("PostgreSQL server binaries missing: skipped");
            return;
        }
        panic!("the benchmark's PostgreSQL never started: {err}");
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let done = signalled(child, "INT");
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(!done.status.success(), "{err}");
    assert!(
        err.contains("interrupted: the report was not written"),
        "{err}"
    );
    assert!(!cluster.exists(), "{} is left behind", cluster.display());
    assert!(pg_dirs().is_empty());
    assert!(!out.join("benchmarks.md").exists());
    let left = Command::new("pgrep")
        .args(["-f", &cluster.to_string_lossy()])
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "postgres still running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn commands_outside_the_checkout_use_the_built_in_radiology_network() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .arg("check")
        .current_dir(dir.path())
        .output()
        .expect("run snaps");
    assert!(o.status.success(), "{}", stderr(&o));
    for code in ["CPH", "STG", "GRC"] {
        assert!(
            stdout(&o).contains(&format!("{code}: ok")),
            "{}",
            stdout(&o)
        );
    }
    // A folder given that does not exist is an error naming it.
    let o = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(["check", "--network", "no/such/network"])
        .current_dir(dir.path())
        .output()
        .expect("run snaps");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no/such/network"), "{}", stderr(&o));
}

#[test]
fn global_migrate_moves_the_store_to_postgres_once_and_refuses_a_full_target() {
    use snaps_global::GlobalStore;
    use snaps_global::store::{AuditFilter, AuditRecord};
    let dir = tempfile::tempdir().expect("tempdir");
    let (config_path, _) = global_config(dir.path(), "cph-token-0123456789abcdef");
    let config = snaps_global::GlobalConfig::load(&config_path).expect("config");
    {
        let store = snaps_global::SqliteStore::open(&dir.path().join("global.db"), &config)
            .expect("SQLite store");
        let records: Vec<AuditRecord> = (0..5)
            .map(|i| AuditRecord {
                at: 1_700_000_000 + i,
                site: "STG".into(),
                user: "rad1".into(),
                action: "fetch".into(),
                relations: vec!["patient".into()],
                tuples: 1,
                patients: vec![format!("{}", 1_000_001 + i)],
                detail: String::new(),
                ..AuditRecord::default()
            })
            .collect();
        store.append_audit(&records).expect("audit");
    }
    let url = snaps::pg_server::PgServer::shared()
        .expect("PostgreSQL server")
        .create_database("cli_migrate")
        .expect("database");
    let config_arg = config_path.to_str().expect("path");
    let o = snaps(&["global", "migrate", "--config", config_arg, "--to", &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("snaps_audit"), "{out}");
    assert!(out.contains("moved "), "{out}");
    let moved = snaps_global::PgStore::connect(&url, &config).expect("PostgreSQL store");
    let trail = moved.audit(&AuditFilter::default()).expect("audit");
    assert_eq!(trail.len(), 5);
    assert_eq!(trail[4].patients, vec!["1000005".to_string()]);
    drop(moved);
    // Moving again would mix two stores: refused, the target unchanged.
    let o = snaps(&["global", "migrate", "--config", config_arg, "--to", &url]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already holds rows of"),
        "{}",
        stderr(&o)
    );
    let o = snaps(&[
        "global",
        "migrate",
        "--config",
        config_arg,
        "--to",
        "db.example",
    ]);
    assert!(
        stderr(&o).contains("is not a postgresql:// URL"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_global_compares_the_stores_in_one_run() {
    let o = snaps(&[
        "bench",
        "global",
        "--store",
        "auto",
        "--patients",
        "40",
        "--fetches",
        "16",
        "--locks",
        "16",
        "--clients",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for line in [
        "global stores side by side: 4 clients",
        "point fetch, new tuple, 2 controllers",
        "lock request, granted, 1 controller",
        "PostgreSQL: a second controller gives",
    ] {
        assert!(out.contains(line), "{line} missing:\n{out}");
    }
    let o = snaps(&["bench", "global", "--store", "db.example"]);
    assert!(
        stderr(&o).contains("give a postgresql:// URL"),
        "{}",
        stderr(&o)
    );
}
