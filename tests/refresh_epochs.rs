//! The refresh epoch as a protocol: crash safety at every phase boundary
//! (the global controller killed and restarted; a site stopped and opened
//! again) ending exactly as an uninterrupted epoch, and the differential
//! refresh ending exactly as a recomputation from scratch would, over
//! random days at three radiology sites.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Client, Net, connect, setup, setup_with};
use proptest::prelude::*;
use snaps_global::epochs::{Halt, HaltPoint};
use snaps_local::refresh::{Halt as SiteHalt, SitePoint};
use snaps_schema::Value;
use tokio::sync::Notify;

const SITES: [&str; 3] = ["CPH", "STG", "GRC"];

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        v => panic!("not an integer: {v:?}"),
    }
}

fn patient(net: &Net, code: &str, i: usize) -> i64 {
    int(&net.data[code]["patient"][i][0])
}

fn own_visit(net: &Net, code: &str) -> i64 {
    int(&net.data[code]["visit"][0][0])
}

/// Runs a statement; a refusal (a lock another site holds, say) is part
/// of the day and changes nothing.
async fn try_run(c: &Client, text: &str) {
    if let Err(e) = c.client.simple_query(text).await {
        let db = e.as_db_error().unwrap_or_else(|| panic!("{text}: {e}"));
        assert!(
            ["55P03", "42501"].contains(&db.code().code()),
            "{text}: {}",
            db.message()
        );
    }
}

/// A day at the three sites, the same every time: look-ups that fetch,
/// changes under lock, an owner's changes, a pin, new patients, deletes.
async fn day(net: &Net) {
    let (c0, c1) = (patient(net, "CPH", 0), patient(net, "CPH", 1));
    let (g0, g1, g2, g3) = (
        patient(net, "GRC", 0),
        patient(net, "GRC", 1),
        patient(net, "GRC", 2),
        patient(net, "GRC", 3),
    );
    let (s0, s2) = (patient(net, "STG", 0), patient(net, "STG", 2));
    let cph = connect(net.sites["CPH"]).await;
    let stg = connect(net.sites["STG"]).await;
    let grc = connect(net.sites["GRC"]).await;
    let surname = |code: &str, i: usize| match &net.data[code]["patient"][i][3] {
        Value::Text(s) => s.clone(),
        v => panic!("surname {v:?}"),
    };
    let c1_surname = surname("CPH", 1);
    let steps: Vec<(&Client, String)> = vec![
        (&stg, format!("SELECT * FROM patient WHERE pno IN ({g0}, {g1}, {c0})")),
        // Definitions the refresh re-runs: one that new patients join, one
        // that a change elsewhere stops matching.
        (&stg, "SELECT * FROM patient WHERE surname = 'Newday'".into()),
        (&stg, format!("SELECT * FROM patient WHERE surname = '{c1_surname}'")),
        (&grc, "SELECT pno FROM patient WHERE surname = 'Newday'".into()),
        (
            &stg,
            format!("SELECT v.vno, v.date FROM patient p, visit v WHERE p.pno = v.pno AND p.pno = {g0}"),
        ),
        (&cph, format!("SELECT * FROM patient WHERE pno IN ({g0}, {g2}, {s0})")),
        (&grc, format!("SELECT * FROM patient WHERE pno IN ({c0}, {s0})")),
        (&stg, format!("UPDATE patient SET add1 = 'STG day' WHERE pno = {g0}")),
        (&cph, format!("UPDATE patient SET vip = 'Y' WHERE pno = {g2}")),
        (&grc, format!("UPDATE patient SET add2 = 'GRC day' WHERE pno = {c0}")),
        (&cph, format!("UPDATE patient SET surname = 'Dayson' WHERE pno = {c1}")),
        (
            &stg,
            format!("UPDATE visit SET description = 'STG visit' WHERE vno = {}", own_visit(net, "STG")),
        ),
        (
            &cph,
            "INSERT INTO patient (surname, first_names, dob, sex) VALUES ('Newday', 'Nia', 19900101, 'F')".into(),
        ),
        (
            &grc,
            "INSERT INTO patient (surname, first_names, dob, sex) VALUES ('Newday', 'Gus', 19910101, 'M')".into(),
        ),
        (&grc, format!("DELETE FROM patient WHERE pno = {g3}")),
        (&stg, format!("DELETE FROM patient WHERE pno = {s2}")),
    ];
    for (c, text) in steps {
        try_run(c, &text).await;
    }
}

/// Rows of a table as text, sorted.
fn table(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let n = stmt.column_count();
    let mut rows: Vec<String> = stmt
        .query_map([], |r| {
            (0..n)
                .map(|i| Ok(format!("{:?}", r.get::<_, rusqlite::types::Value>(i)?)))
                .collect::<rusqlite::Result<Vec<_>>>()
                .map(|v| v.join("|"))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows.sort();
    rows
}

/// Everything an epoch leaves behind: every site's shared relations (with
/// their status), pins, pending deletes and snapshot bookkeeping; every
/// global relation with its status columns.
fn end_state(net: &Net) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for code in SITES {
        let conn = rusqlite::Connection::open(net.dir.path().join(code).join("local.db")).unwrap();
        let mapping = snaps::localnet::site_mapping(&net.network, code).unwrap();
        for rm in mapping.relations() {
            let r = &rm.local.name;
            out.insert(
                format!("{code}.{r}"),
                table(&conn, &format!("SELECT *, rowid FROM \"{r}\"")),
            );
        }
        for t in ["snaps_pinned", "snaps_deleted", "snaps_copy"] {
            out.insert(
                format!("{code}.{t}"),
                table(&conn, &format!("SELECT * FROM {t}")),
            );
        }
        out.insert(
            format!("{code}.snapshots"),
            table(
                &conn,
                "SELECT snapshot_no, relation, tuple_rowid FROM snaps_snapshot_membership",
            ),
        );
    }
    let conn = rusqlite::Connection::open(&net.store).unwrap();
    for r in net.network.global_catalog().unwrap().relations() {
        out.insert(
            format!("global.{}", r.name),
            table(&conn, &format!("SELECT * FROM \"{}\"", r.name)),
        );
    }
    out.insert(
        "global.gone".into(),
        table(&conn, "SELECT * FROM snaps_gone"),
    );
    out
}

/// Waits until epoch `epoch` is closed and every site has recorded that it
/// acknowledged it.
async fn settled(net: &Net, epoch: u64) {
    for _ in 0..1200 {
        let global = rusqlite::Connection::open(&net.store).unwrap();
        let closed: bool = global
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM snaps_epochs WHERE epoch = ?1 AND phase = 'closed')",
                [epoch as i64],
                |r| r.get(0),
            )
            .unwrap();
        let acked = SITES.iter().all(|code| {
            let c = rusqlite::Connection::open(net.dir.path().join(code).join("local.db")).unwrap();
            let v: Option<String> = c
                .query_row(
                    "SELECT value FROM snaps_meta WHERE key = 'refresh_acked'",
                    [],
                    |r| r.get(0),
                )
                .ok();
            v.as_deref() == Some(&epoch.to_string())
        });
        if closed && acked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("epoch {epoch} did not settle");
}

const PATIENTS: usize = 20;

async fn uninterrupted() -> BTreeMap<String, Vec<String>> {
    let net = setup(PATIENTS).await;
    day(&net).await;
    let summary = net.refresh().await;
    settled(&net, summary.epoch).await;
    end_state(&net)
}

/// Starts an epoch through the administrator's interface, in the
/// background (the controller may die under it).
fn start_refresh(net: &Net) -> tokio::task::JoinHandle<()> {
    let global = net.global.as_ref().unwrap();
    let (addr, admin) = (global.addr.clone(), global.admin.clone());
    tokio::spawn(async move {
        let client = snaps_local::remote::GlobalClient::connect(&addr, &admin)
            .await
            .unwrap();
        if let Ok(mut p) = client.run_refresh().await {
            while let Ok(Some(_)) = p.message().await {}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_controller_killed_at_any_phase_finishes_the_epoch_as_if_it_had_not_been() {
    let expected = uninterrupted().await;
    for at in [
        HaltPoint::Opened,
        HaltPoint::Collecting,
        HaltPoint::Committed,
        HaltPoint::Distributing,
    ] {
        let reached = Arc::new(Notify::new());
        let halt = Halt {
            at,
            reached: reached.clone(),
        };
        let mut net = setup_with(PATIENTS, |o| o.halt = Some(halt)).await;
        day(&net).await;
        let refresh = start_refresh(&net);
        tokio::time::timeout(Duration::from_secs(30), reached.notified())
            .await
            .unwrap_or_else(|_| panic!("{at:?} was not reached"));
        // Killed there; restarted, it resumes the recorded phase by itself.
        net.restart_global(None).await;
        refresh.abort();
        settled(&net, 1).await;
        let got = end_state(&net);
        for (k, v) in &expected {
            assert_eq!(got.get(k), Some(v), "after a crash at {at:?}: {k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_stopped_at_any_step_finishes_the_epoch_as_if_it_had_not_been() {
    let expected = uninterrupted().await;
    for at in [
        SitePoint::Evicted,
        SitePoint::Pushed,
        SitePoint::Applied,
        SitePoint::Rerunning,
    ] {
        let mut net = setup(PATIENTS).await;
        day(&net).await;
        let reached = Arc::new(Notify::new());
        net.handles["STG"].halt_at(SiteHalt {
            at,
            reached: reached.clone(),
        });
        let refresh = start_refresh(&net);
        tokio::time::timeout(Duration::from_secs(30), reached.notified())
            .await
            .unwrap_or_else(|_| panic!("{at:?} was not reached"));
        net.restart_site("STG", None).await;
        settled(&net, 1).await;
        refresh.await.unwrap();
        let got = end_state(&net);
        for (k, v) in &expected {
            assert_eq!(got.get(k), Some(v), "after STG stopped at {at:?}: {k}");
        }
    }
}
