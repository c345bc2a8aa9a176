//! The nightly refresh end to end (DESIGN.md, "The nightly refresh"): three
//! radiology sites following the epochs of a real global controller over
//! their Subscribe streams, changed through their SQL endpoints, refreshed
//! through the administrator's interface.

mod common;

use common::{Client, Net, connect, run, setup};
use snaps_schema::{LocalRights, LocalStatus, TupleType};

fn db(net: &Net, code: &str) -> std::path::PathBuf {
    net.dir.path().join(code).join("local.db")
}

fn int(v: &snaps_schema::Value) -> i64 {
    match v {
        snaps_schema::Value::Int(i) => *i,
        v => panic!("not an integer: {v:?}"),
    }
}

fn patients(net: &Net, code: &str) -> Vec<i64> {
    net.data[code]["patient"]
        .iter()
        .map(|r| int(&r[0]))
        .collect()
}

async fn one(c: &mut Client, text: &str) -> Option<String> {
    let (rows, _) = run(c, text).await;
    assert_eq!(rows.len(), 1, "{text}: {rows:?}");
    rows[0][0].clone()
}

/// A value in the global store.
fn global_value(net: &Net, sql: &str) -> Option<String> {
    let conn = rusqlite::Connection::open(&net.store).unwrap();
    let v: rusqlite::types::Value = conn
        .query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    match v {
        rusqlite::types::Value::Null => None,
        rusqlite::types::Value::Integer(i) => Some(i.to_string()),
        rusqlite::types::Value::Text(t) => Some(t),
        other => panic!("{sql}: {other:?}"),
    }
}

fn status(net: &Net, code: &str, pno: i64) -> LocalStatus {
    let conn = rusqlite::Connection::open(db(net, code)).unwrap();
    let byte: i64 = conn
        .query_row(
            "SELECT snaps_status FROM patient WHERE pno = ?1",
            [pno],
            |r| r.get(0),
        )
        .unwrap();
    LocalStatus::from_byte(byte as u8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_epoch_commits_every_sites_changes_and_brings_every_copy_up_to_date() {
    let net = setup(30).await;
    let g = patients(&net, "GRC")[0];
    let gone = patients(&net, "GRC")[1];
    let mut stg = connect(net.sites["STG"]).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let mut grc = connect(net.sites["GRC"]).await;
    let lookup = format!("SELECT add1 FROM patient WHERE pno = {g}");
    // STG and CPH hold copies of GRC's patient; STG changes it under lock.
    one(&mut stg, &lookup).await;
    one(&mut cph, &lookup).await;
    run(
        &mut stg,
        &format!("UPDATE patient SET add1 = '7 Epoch St' WHERE pno = {g}"),
    )
    .await;
    // CPH registers a patient; GRC deletes one nobody holds.
    run(
        &mut cph,
        "INSERT INTO patient (surname, first_names, dob, sex) VALUES ('Refresh', 'Rita', 19700101, 'F')",
    )
    .await;
    let new_pno: i64 = one(
        &mut cph,
        "SELECT pno FROM patient WHERE surname = 'Refresh'",
    )
    .await
    .unwrap()
    .parse()
    .unwrap();
    run(&mut grc, &format!("DELETE FROM patient WHERE pno = {gone}")).await;

    let summary = net.refresh().await;
    assert_eq!(summary.sites.len(), 3, "{summary:?}");
    assert!(summary.absent.is_empty(), "{summary:?}");
    assert_eq!(summary.inserted, 1, "{summary:?}");
    assert_eq!(summary.updated, 1, "{summary:?}");
    assert_eq!(summary.deleted, 1, "{summary:?}");
    assert_eq!(summary.conflicts, 0, "{summary:?}");

    // The global snapshot has it all, and STG's lock is gone.
    assert_eq!(
        global_value(&net, &format!("SELECT add1 FROM patient WHERE pno = {g}")).as_deref(),
        Some("7 Epoch St")
    );
    assert_eq!(
        global_value(
            &net,
            &format!("SELECT snaps_lock_site FROM patient WHERE pno = {g}")
        ),
        None
    );
    assert_eq!(
        global_value(
            &net,
            &format!("SELECT count(*) FROM patient WHERE pno = {new_pno}")
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        global_value(
            &net,
            &format!("SELECT count(*) FROM patient WHERE pno = {gone}")
        )
        .as_deref(),
        Some("0")
    );
    // Every site sees the new address: GRC's own tuple and CPH's copy were
    // changed in place.
    for c in [&mut stg, &mut cph, &mut grc] {
        assert_eq!(one(c, &lookup).await.as_deref(), Some("7 Epoch St"));
    }
    // Flags are cleared, rights back to unknown.
    let s = status(&net, "STG", g);
    assert_eq!(s.tuple_type, TupleType::Snapshot);
    assert!(!s.modified && !s.new);
    assert_eq!(s.rights, LocalRights::Unknown);
    let s = status(&net, "CPH", new_pno);
    assert!(!s.new && s.tuple_type == TupleType::Local);
    // CPH can lock the patient now that STG's lock ended.
    run(
        &mut cph,
        &format!("UPDATE patient SET add2 = 'after' WHERE pno = {g}"),
    )
    .await;

    // A second epoch with nothing to do changes nothing.
    let again = net.refresh().await;
    assert_eq!(again.epoch, summary.epoch + 1);
    assert_eq!((again.inserted, again.deleted), (0, 0));
    assert_eq!(again.updated, 1, "CPH's change of the copy: {again:?}");
}
