//! `snaps demo` as a newcomer runs it: the network comes up, prints a psql
//! line per site and `ready`; a site finds a patient registered at another
//! site, through a PostgreSQL driver and through `psql`; SIGTERM stops it;
//! a second run reuses the folder.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A port P such that P..P+3 are free now.
fn free_ports() -> u16 {
    free_run(4)
}

/// A port P such that P..P+n-1 are free now.
fn free_run(n: u16) -> u16 {
    for _ in 0..50 {
        let base = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        if base > 65_000 {
            continue;
        }
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} free ports in a row");
}

/// The demo process; killed if a test fails before stopping it.
struct Demo(Option<Child>);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the demo and waits for `ready`; returns the child and the lines
/// it printed.
fn start(dir: &std::path::Path, port: u16) -> (Demo, Vec<String>) {
    start_with(dir, port, &[])
}

/// As [`start`], with more options.
fn start_with(dir: &std::path::Path, port: u16, more: &[&str]) -> (Demo, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(["demo", "--dir"])
        .arg(dir)
        .args(["--scale", "small", "--port-base", &port.to_string()])
        .args(more)
        // Outside the checkout: the network comes from the binary.
        .current_dir(dir.parent().expect("the demo folder has a parent"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start snaps demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) if l == "ready" => return (Demo(Some(child)), lines),
            Ok(l) => lines.push(l),
            Err(e) => {
                let _ = child.kill();
                panic!("the demo did not get ready ({e}); it printed {lines:?}");
            }
        }
    }
}

/// Runs `script` with python3 when it can import `modules`: its output
/// (the script must succeed), or `None` when the modules are missing.
fn python(script: &str, modules: &str) -> Option<String> {
    let has = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        return None;
    }
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python ({modules}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn stop(mut demo: Demo) {
    let child = demo.0.take().expect("running");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "the demo exited with {}", out.status);
}

async fn connect(port: u16, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=radiology password=snaps-demo dbname={db}"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_psql_and_finds_patients_across_sites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_ports();
    let (child, lines) = start(dir.path(), port);
    // Run outside the checkout, the demo wrote its network for the user to
    // read and edit.
    assert!(dir.path().join("network/network.toml").exists());
    assert!(dir.path().join("network/CPH/mapping.tsv").exists());
    for (i, code) in ["CPH", "STG", "GRC"].iter().enumerate() {
        let expected = format!(
            "{code}: psql -h 127.0.0.1 -p {} -U radiology {code}",
            port + 1 + i as u16
        );
        assert!(lines.contains(&expected), "{expected:?} not in {lines:?}");
    }
    assert!(
        lines.iter().any(|l| l.contains("PGPASSWORD=snaps-demo")),
        "{lines:?}"
    );
    // Logins are checked: a wrong password is refused.
    let wrong = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=radiology password=guess dbname=CPH",
            port + 1
        ),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(wrong.is_err(), "a wrong password logged in");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("generating 200 patients per site")),
        "{lines:?}"
    );

    // A patient registered at CPH, looked up at STG by number.
    let cph = connect(port + 1, "CPH").await;
    let row = cph
        .query_one("SELECT pno, surname FROM patient ORDER BY pno LIMIT 1", &[])
        .await
        .expect("CPH patient");
    let (pno, surname): (i64, String) = (row.get(0), row.get(1));
    assert!(
        (1_000_000..10_000_000).contains(&pno),
        "a CPH number: {pno}"
    );
    let stg = connect(port + 2, "STG").await;
    let by_pno = stg
        .prepare_typed(
            "SELECT surname FROM patient WHERE pno = $1",
            &[tokio_postgres::types::Type::INT8],
        )
        .await
        .expect("prepare");
    let rows = stg.query(&by_pno, &[&pno]).await.expect("STG lookup");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), surname);
    let stats = stg
        .query_one(
            "SELECT value FROM snaps_stats WHERE name = 'global_fetches'",
            &[],
        )
        .await
        .expect("stats");
    assert!(stats.get::<_, i64>(0) >= 1);

    // The same through psql at GRC, when psql is installed (CI installs it).
    match Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &(port + 3).to_string(),
            "-U",
            "radiology",
            "-At",
            "-c",
        ])
        .arg(format!("SELECT surname FROM patient WHERE pno = {pno}"))
        .arg("GRC")
        .env("PGPASSWORD", "snaps-demo")
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "psql: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), surname);
            // psql's own description of a table, from the site's catalogue.
            let out = Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &(port + 3).to_string(),
                    "-U",
                    "radiology",
                ])
                .args(["-c", "\\d patient", "GRC"])
                .env("PGPASSWORD", "snaps-demo")
                .output()
                .expect("psql");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "psql \\d: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("Table \"public.patient\""), "{text}");
            assert!(
                text.contains("\"patient_pkey\" PRIMARY KEY, btree (pno)"),
                "{text}"
            );
            assert!(!text.contains("snaps_status"), "{text}");
        }
        Err(e) => eprintln!("psql not run ({e}): install postgresql-client to check it"),
    }
    // And through psycopg (autocommit off: every statement inside a
    // transaction), when Python has it (CI installs it).
    let script = format!(
        r#"
import psycopg
with psycopg.connect("host=127.0.0.1 port={port} user=radiology password=snaps-demo dbname=STG") as conn:
    with conn.cursor() as cur:
        cur.execute("SELECT surname FROM patient WHERE pno = %s", ({pno},))
        print(cur.fetchone()[0])
        cur.execute("SELECT count(*) FROM patient WHERE surname = %s", ({surname:?},))
        print(cur.fetchone()[0] >= 1)
"#,
        port = port + 2
    );
    match python(&script, "psycopg") {
        Some(out) => assert_eq!(out, format!("{surname}\nTrue\n")),
        None => eprintln!("psycopg not run: pip install 'psycopg[binary]' to check it"),
    }
    // SQLAlchemy's reflection reads the catalogue, when Python has it (CI
    // installs it).
    let script = format!(
        r#"
import sqlalchemy as sa
engine = sa.create_engine("postgresql+psycopg://radiology:snaps-demo@127.0.0.1:{port}/STG")
inspector = sa.inspect(engine)
print("patient" in inspector.get_table_names())
columns = {{c["name"]: c for c in inspector.get_columns("patient")}}
print(columns["pno"]["nullable"], columns["surname"]["nullable"], columns["surname"]["type"].length)
print("snaps_status" in columns)
"#,
        port = port + 2
    );
    match python(&script, "sqlalchemy, psycopg") {
        Some(out) => assert_eq!(out, "True\nFalse True 22\nFalse\n"),
        None => eprintln!("SQLAlchemy not run: pip install sqlalchemy to check it"),
    }
    stop(child);

    // A second run reuses the folder: no new data, the same patient.
    let (child, lines) = start(dir.path(), port);
    assert!(
        !lines.iter().any(|l| l.starts_with("generating")),
        "{lines:?}"
    );
    let stg = connect(port + 2, "STG").await;
    let rows = stg
        .query(
            "SELECT surname FROM patient WHERE pno = $1",
            &[&pno.to_string()],
        )
        .await
        .expect("STG lookup after restart");
    assert_eq!(rows.len(), 1);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_as_processes_keeps_answering_when_a_controller_is_killed() {
    let url = snaps::pg_server::PgServer::shared()
        .expect("PostgreSQL server")
        .create_database("demo_processes")
        .expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_run(5);
    let (child, lines) = start_with(
        dir.path(),
        port,
        &["--processes", "--globals", "2", "--store", &url],
    );
    let pid_of = |name: &str| -> u32 {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{name}: pid ")))
            .unwrap_or_else(|| panic!("no pid line for {name} in {lines:?}"));
        line.split_whitespace()
            .nth(2)
            .and_then(|p| p.parse().ok())
            .expect("pid")
    };
    for k in 1..=2u16 {
        let line = format!(
            "global-{k}: pid {} https://127.0.0.1:{}",
            pid_of(&format!("global-{k}")),
            port + k - 1
        );
        assert!(lines.contains(&line), "{line:?} not in {lines:?}");
    }
    // Every process is one, configured from files a user can read.
    let cph_pid = pid_of("CPH");
    assert!(std::path::Path::new(&format!("/proc/{cph_pid}")).exists());
    assert!(dir.path().join("global-2/global.toml").exists());
    let site_toml = std::fs::read_to_string(dir.path().join("STG/site.toml")).expect("site.toml");
    assert!(
        site_toml.contains(&format!("https://127.0.0.1:{}", port + 1)),
        "{site_toml}"
    );

    let cph = connect(port + 2, "CPH").await;
    let pnos: Vec<i64> = cph
        .query("SELECT pno FROM patient ORDER BY pno LIMIT 3", &[])
        .await
        .expect("CPH patients")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stg = connect(port + 3, "STG").await;
    let lookup = |pno: i64| format!("SELECT surname FROM patient WHERE pno = {pno}");
    let rows_of = |messages: Vec<tokio_postgres::SimpleQueryMessage>| {
        messages
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count()
    };
    assert_eq!(
        rows_of(stg.simple_query(&lookup(pnos[0])).await.expect("lookup")),
        1
    );
    // SIGKILL the first controller: STG reaches the second.
    let killed = Command::new("kill")
        .args(["-KILL", &pid_of("global-1").to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let _ = stg.simple_query(&lookup(pnos[1])).await;
    let found = rows_of(stg.simple_query(&lookup(pnos[2])).await.expect("lookup"));
    assert_eq!(
        found, 1,
        "a CPH patient found through the second controller"
    );
    stop(child);
    // The demo stopped its processes with it.
    assert!(!std::path::Path::new(&format!("/proc/{cph_pid}")).exists());
}
