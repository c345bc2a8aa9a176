//! `snaps demo` as a newcomer runs it: the network comes up, prints a psql
//! line per site and `ready`; a site finds a patient registered at another
//! site, through a PostgreSQL driver and through `psql`; SIGTERM stops it;
//! a second run reuses the folder. As real processes on PostgreSQL, a
//! controller SIGKILLed while sites look patients up, in a lock storm and
//! in the middle of an epoch.

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
    let pid_of = |name: &str| pid_in(&lines, name);
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

/// The pid the demo printed for process `name` (`CPH: pid 4711`).
fn pid_in(lines: &[String], name: &str) -> u32 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{name}: pid ")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid line for {name} in {lines:?}"))
}

/// A process the test started itself; killed when the test ends.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigkill(pid: u32) {
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -KILL {pid}");
}

/// The one value of a query on the PostgreSQL store.
async fn store_value(store: &tokio_postgres::Client, sql: &str) -> Option<String> {
    store
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controllers_killed_in_a_lock_storm_and_mid_epoch_grant_no_lock_twice_and_lose_nothing() {
    let url = snaps::pg_server::PgServer::shared()
        .expect("PostgreSQL server")
        .create_database("demo_storm")
        .expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_run(5);
    let (child, lines) = start_with(
        dir.path(),
        port,
        &["--processes", "--globals", "2", "--store", &url],
    );
    let pid_of = |name: &str| pid_in(&lines, name);
    let (store, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the store");
    tokio::spawn(conn);
    let grc = connect(port + 4, "GRC").await;
    let pnos: Vec<i64> = grc
        .query(
            "SELECT pno FROM patient WHERE pno >= 20000000 ORDER BY pno LIMIT 12",
            &[],
        )
        .await
        .expect("GRC patients")
        .iter()
        .map(|r| r.get(0))
        .collect();

    // CPH and STG change the same GRC patients at once, three clients
    // each, client k the patients k, k+3, ...: every change of another
    // site's patient takes his lock, held until the night.
    let storm_until = std::time::Instant::now() + Duration::from_secs(14);
    let mut clients = Vec::new();
    for (site, p) in [("CPH", port + 2), ("STG", port + 3)] {
        for k in 0..3usize {
            let mine: Vec<i64> = pnos.iter().skip(k).step_by(3).copied().collect();
            clients.push(tokio::spawn(async move {
                let c = connect(p, site).await;
                // Per patient, the value of this client's last change that
                // was granted.
                let mut granted: std::collections::BTreeMap<i64, String> = Default::default();
                let mut n = 0;
                while std::time::Instant::now() < storm_until {
                    for &pno in &mine {
                        n += 1;
                        let value = format!("{site}-{k}-{n}");
                        let sql = format!("UPDATE patient SET add3 = '{value}' WHERE pno = {pno}");
                        if let Ok(m) = c.simple_query(&sql).await
                            && m.iter().any(|m| {
                                matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(1))
                            })
                        {
                            granted.insert(pno, value);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (site, granted)
            }));
        }
    }
    // The first controller dies in the middle of it; the sites go on
    // through the second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigkill(pid_of("global-1"));
    let mut won: std::collections::BTreeMap<i64, (&str, String)> = Default::default();
    for c in clients {
        let (site, granted) = c.await.expect("a storm client");
        for (pno, value) in granted {
            if let Some((other, _)) = won.get(&pno) {
                assert_eq!(
                    *other, site,
                    "patient {pno}'s lock was granted to {other} and {site}"
                );
            }
            won.insert(pno, (site, value));
        }
    }
    assert!(!won.is_empty(), "no change was granted at all");
    for (pno, (site, _)) in &won {
        let holder = store_value(
            &store,
            &format!(
                "SELECT s.code FROM patient p JOIN snaps_sites s ON s.number = p.snaps_lock_site WHERE p.pno = {pno}"
            ),
        )
        .await;
        assert_eq!(
            holder.as_deref(),
            Some(*site),
            "patient {pno}'s lock in the store"
        );
    }

    // The first controller comes back, opens the night's epoch and dies
    // again while the sites push; the second takes the epoch over when the
    // lease runs out and finishes it.
    let global_1 = Spawned(
        Command::new(env!("CARGO_BIN_EXE_snaps"))
            .args(["global", "serve", "--config"])
            .arg(dir.path().join("global-1/global.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart global-1"),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _refresh = Spawned(
        Command::new(env!("CARGO_BIN_EXE_snaps"))
            .args([
                "refresh",
                "--global",
                &format!("https://127.0.0.1:{port}"),
                "--tls",
            ])
            .arg(dir.path().join("certs/admin"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("snaps refresh"),
    );
    let latest = "SELECT epoch || ' ' || phase FROM snaps_epochs ORDER BY epoch DESC LIMIT 1";
    let mut opened = None;
    for _ in 0..200 {
        opened = store_value(&store, latest).await;
        if opened.as_deref().is_some_and(|e| e.ends_with("collect")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = opened.expect("an epoch opened");
    assert!(opened.ends_with("collect"), "{opened}");
    sigkill(global_1.0.id());
    let epoch = opened.split(' ').next().unwrap().to_string();
    let mut now = None;
    for _ in 0..120 {
        now = store_value(&store, latest).await;
        if now.as_deref() == Some(&format!("{epoch} closed")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        now,
        Some(format!("{epoch} closed")),
        "the second controller finished the epoch"
    );
    // Every granted change is in the global snapshot, once, and the locks
    // ended with the pushes.
    for (pno, (site, value)) in &won {
        let row = store_value(
            &store,
            &format!(
                "SELECT add3 || ' ' || coalesce(snaps_lock_site::text, 'none') FROM patient WHERE pno = {pno}"
            ),
        )
        .await;
        assert_eq!(
            row,
            Some(format!("{value} none")),
            "patient {pno}, changed by {site}"
        );
    }
    stop(child);
}
