//! A site's database is an ordinary SQLite file: the platform's own
//! `sqlite3` (Debian 12 ships 3.40; CI installs it) opens it, checks it and
//! reads it, and a write it makes meets the same update rules as any other
//! program's.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{connect, db, patients, run, setup};

fn sqlite3(file: &Path, sql: &str) -> Output {
    Command::new("sqlite3")
        .arg("-bail")
        .arg(file)
        .arg(sql)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "this test needs the sqlite3 command-line tool (Debian: apt install sqlite3): {e}"
            )
        })
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_platforms_sqlite3_opens_checks_reads_and_meets_the_update_rules() {
    let net = setup(20).await;
    let other = patients(&net, "GRC")[0];
    let mut stg = connect(net.sites["STG"]).await;
    run(
        &mut stg,
        &format!("SELECT surname FROM patient WHERE pno = {other}"),
    )
    .await;
    let file = db(&net, "STG");

    let version = sqlite3(&file, "SELECT sqlite_version();");
    assert!(version.status.success(), "{version:?}");
    eprintln!("system sqlite3 {}", out(&version));
    let check = sqlite3(&file, "PRAGMA integrity_check;");
    assert_eq!(out(&check), "ok", "{check:?}");
    let held = sqlite3(
        &file,
        &format!("SELECT count(*) FROM patient WHERE pno = {other};"),
    );
    assert_eq!(out(&held), "1", "{held:?}");

    // A copy of GRC's patient: refused by the triggers, and unchanged.
    let refused = sqlite3(
        &file,
        &format!("UPDATE patient SET surname = 'Direct' WHERE pno = {other};"),
    );
    assert!(!refused.status.success(), "{refused:?}");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("patient: this tuple is a copy of a tuple another site owns"),
        "{why}"
    );
    let surname = sqlite3(
        &file,
        &format!("SELECT surname FROM patient WHERE pno = {other};"),
    );
    assert_ne!(out(&surname), "Direct");

    // A patient of the site's own, registered by the program: stored, seen
    // through SNAPS, and new for the next refresh to push.
    let pno = patients(&net, "STG").into_iter().max().unwrap() + 500;
    let written = sqlite3(
        &file,
        &format!(
            "INSERT INTO patient (pno, surname, first_names, dob, sex) \
             VALUES ({pno}, 'Direct', 'Dora', 19700101, 'F');"
        ),
    );
    assert!(written.status.success(), "{written:?}");
    let (rows, _) = run(
        &mut stg,
        &format!("SELECT surname FROM patient WHERE pno = {pno}"),
    )
    .await;
    assert_eq!(rows, vec![vec![Some("Direct".to_string())]]);
    let status = sqlite3(
        &file,
        &format!("SELECT snaps_status & 16 FROM patient WHERE pno = {pno};"),
    );
    assert_eq!(out(&status), "16", "the new bit is set: {status:?}");
    let check = sqlite3(&file, "PRAGMA integrity_check;");
    assert_eq!(out(&check), "ok", "{check:?}");
}
