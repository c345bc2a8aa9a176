//! The refresh epoch as a protocol: crash safety at every phase boundary
//! (the global controller killed and restarted; a site stopped and opened
//! again) ending exactly as an uninterrupted epoch, and the differential
//! refresh ending exactly as a recomputation from scratch would, over
//! random days at three radiology sites; and reads through a long-lived
//! session (remembered verdicts) against a new session's over such days.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Client, Net, connect, int, setup, setup_with};
use proptest::prelude::*;
use snaps_global::epochs::{Halt, HaltPoint};
use snaps_local::refresh::{Halt as SiteHalt, SitePoint};
use snaps_schema::Value;
use tokio::sync::Notify;

const SITES: [&str; 3] = ["CPH", "STG", "GRC"];

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
        Value::Text(s) => s.replace('\'', "''"),
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

/// Every global tuple id by its place in its relation's order. Ids are
/// unique and never reused, but PostgreSQL's sequences skip the ids a
/// transaction took before it was run again after a conflict, so two runs
/// that end alike may number their tuples apart; the order stays.
fn id_ranks(net: &Net) -> BTreeMap<(String, i64), i64> {
    let mut ranks = BTreeMap::new();
    for r in net.network.global_catalog().unwrap().relations() {
        let ids = common::global_query(
            net,
            &format!("SELECT tuple_id FROM \"{}\" ORDER BY tuple_id", r.name),
        );
        for (i, row) in ids.iter().enumerate() {
            ranks.insert((r.name.clone(), row.int(0).unwrap()), i as i64 + 1);
        }
    }
    ranks
}

/// Everything an epoch leaves behind: every site's shared relations (with
/// their status), pins, pending deletes and snapshot bookkeeping; every
/// global relation with its status columns; global tuple ids by rank
/// ([`id_ranks`]).
fn end_state(net: &Net) -> BTreeMap<String, Vec<String>> {
    let ranks = id_ranks(net);
    // A tuple no longer in its relation (deleted, still held) keeps its id,
    // negated.
    let rank = |relation: &str, id: i64| *ranks.get(&(relation.to_string(), id)).unwrap_or(&-id);
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
        for t in ["snaps_pinned", "snaps_deleted"] {
            out.insert(
                format!("{code}.{t}"),
                table(&conn, &format!("SELECT * FROM {t}")),
            );
        }
        let mut copies: Vec<String> = conn
            .prepare(
                "SELECT global_relation, tuple_id, relation, tuple_rowid, owner FROM snaps_copy",
            )
            .unwrap()
            .query_map([], |r| {
                let g: String = r.get(0)?;
                let id: i64 = r.get(1)?;
                Ok(format!(
                    "{g}|{}|{}|{}|{:?}",
                    rank(&g, id),
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<String>>(4)?
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        copies.sort();
        out.insert(format!("{code}.snaps_copy"), copies);
        out.insert(
            format!("{code}.snapshots"),
            table(
                &conn,
                "SELECT snapshot_no, relation, tuple_rowid FROM snaps_snapshot_membership",
            ),
        );
    }
    use snaps_global::db::Cell;
    for r in net.network.global_catalog().unwrap().relations() {
        let mut rows: Vec<String> =
            common::global_query(net, &format!("SELECT * FROM \"{}\"", r.name))
                .into_iter()
                .map(|mut row| {
                    // tuple_id, then main_tuple_id after the attributes.
                    let main = r.attributes.len() + 1;
                    for i in [0, main] {
                        if let Some(Cell::Int(id)) = row.0.get(i).cloned() {
                            row.0[i] = Cell::Int(rank(&r.name, id));
                        }
                    }
                    format!("{:?}", row.0)
                })
                .collect();
        rows.sort();
        out.insert(format!("global.{}", r.name), rows);
    }
    let mut gone: Vec<String> =
        common::global_query(net, "SELECT relation, tuple_id, sent_to FROM snaps_gone")
            .into_iter()
            .map(|row| {
                let relation = row.text(0).unwrap();
                let id = row.int(1).unwrap();
                format!("{relation}|{id}|{:?}", row.0[2])
            })
            .collect();
    gone.sort();
    out.insert("global.gone".into(), gone);
    out
}

/// Waits until epoch `epoch` is closed and every site has recorded that it
/// acknowledged it.
async fn settled(net: &Net, epoch: u64) {
    for _ in 0..1200 {
        let closed = !common::global_query(
            net,
            &format!("SELECT 1 FROM snaps_epochs WHERE epoch = {epoch} AND phase = 'closed'"),
        )
        .is_empty();
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

/// The network of these tests, its global store on PostgreSQL or not.
async fn network(on_postgres: bool, configure: impl FnOnce(&mut snaps::localnet::Options)) -> Net {
    if on_postgres {
        common::setup_on_postgres(PATIENTS, configure).await
    } else {
        setup_with(PATIENTS, configure).await
    }
}

async fn uninterrupted(on_postgres: bool) -> BTreeMap<String, Vec<String>> {
    let net = network(on_postgres, |_| {}).await;
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
        let client = snaps_local::remote::GlobalClient::connect(
            &addr,
            &snaps_local::remote::Auth::Insecure(admin),
            None,
        )
        .await
        .unwrap();
        if let Ok(mut p) = client.run_refresh().await {
            while let Ok(Some(_)) = p.message().await {}
        }
    })
}

/// The sites the controller's status reports as subscribed.
async fn subscribed_in_status(net: &Net) -> Vec<String> {
    let client = net.global.as_ref().unwrap().client("CPH").await.unwrap();
    let status = client.status().await.unwrap();
    status
        .sites
        .into_iter()
        .filter(|s| s.subscribed)
        .map(|s| s.code)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_names_the_sites_an_epoch_would_wait_for() {
    let mut net = setup(PATIENTS).await;
    let mut all = subscribed_in_status(&net).await;
    all.sort();
    assert_eq!(all, ["CPH", "GRC", "STG"]);
    // STG stops taking part: once its stream is gone (and the controller's
    // record of it has aged out), an epoch would not wait for it.
    net.participants.remove("STG").unwrap().abort();
    for _ in 0..200 {
        if !subscribed_in_status(&net)
            .await
            .contains(&"STG".to_string())
        {
            let summary = net.refresh().await;
            assert!(
                !summary.sites.contains(&"STG".to_string()),
                "{:?}",
                summary.sites
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("STG still counted as subscribed 10 s after it left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_controller_killed_at_any_phase_finishes_the_epoch_as_if_it_had_not_been() {
    controller_killed_at_any_phase(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_on_postgres_killed_at_any_phase_finishes_the_epoch_as_if_it_had_not_been() {
    controller_killed_at_any_phase(true).await;
}

async fn controller_killed_at_any_phase(on_postgres: bool) {
    let expected = uninterrupted(on_postgres).await;
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
        let mut net = network(on_postgres, |o| o.halt = Some(halt)).await;
        day(&net).await;
        let refresh = start_refresh(&net);
        tokio::time::timeout(Duration::from_secs(30), reached.notified())
            .await
            .unwrap_or_else(|_| panic!("{at:?} was not reached"));
        // Killed there; restarted, it resumes the recorded phase by itself.
        net.restart_global(None).await;
        refresh.abort();
        settled(&net, 1).await;
        assert_same_state(
            &end_state(&net),
            &expected,
            &format!("after a crash at {at:?}"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_dying_mid_epoch_leaves_it_to_the_other_on_the_store() {
    let expected = uninterrupted(true).await;
    for at in [HaltPoint::Collecting, HaltPoint::Committed] {
        let reached = Arc::new(Notify::new());
        let halt = Halt {
            at,
            reached: reached.clone(),
        };
        let mut net = common::setup_two_controllers(PATIENTS, |o| {
            o.halt = Some(halt);
            o.refresh.lease = Duration::from_secs(2);
        })
        .await;
        day(&net).await;
        let refresh = start_refresh(&net);
        tokio::time::timeout(Duration::from_secs(30), reached.notified())
            .await
            .unwrap_or_else(|_| panic!("{at:?} was not reached"));
        // The first controller dies holding the epoch; its lease runs out,
        // the second takes the epoch over from the recorded phase, and the
        // sites, their controller gone, reach it instead.
        net.global.take().unwrap().kill();
        refresh.abort();
        settled(&net, 1).await;
        assert_same_state(
            &end_state(&net),
            &expected,
            &format!("after the first controller died at {at:?}"),
        );
        let epochs = common::global_query(&net, "SELECT count(*) FROM snaps_epochs");
        assert_eq!(epochs[0].int(0).unwrap(), 1, "one epoch, finished once");
    }
}

/// Panics naming the tables of `got` that differ from `expected`, with the
/// rows only one of them holds.
fn assert_same_state(
    got: &BTreeMap<String, Vec<String>>,
    expected: &BTreeMap<String, Vec<String>>,
    when: &str,
) {
    let mut differences = Vec::new();
    for (k, want) in expected {
        let have = got.get(k).map(Vec::as_slice).unwrap_or_default();
        if have != want.as_slice() {
            let missing: Vec<_> = want.iter().filter(|r| !have.contains(r)).collect();
            let extra: Vec<_> = have.iter().filter(|r| !want.contains(r)).collect();
            differences.push(format!("{k}: missing {missing:?}, extra {extra:?}"));
        }
    }
    assert!(
        differences.is_empty(),
        "{when}:\n{}",
        differences.join("\n")
    );
}

/// Every table of the global store, row for row.
fn whole_store(net: &Net, tables: &[String]) -> BTreeMap<String, Vec<String>> {
    tables
        .iter()
        .map(|t| {
            (
                t.clone(),
                common::global_table(net, &format!("SELECT * FROM \"{t}\"")),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_moved_to_postgres_mid_day_keeps_everything_and_finishes_the_epoch_as_if_unmoved() {
    let expected = uninterrupted(false).await;
    let mut net = setup(PATIENTS).await;
    day(&net).await;
    let tables: Vec<String> = common::global_query(
        &net,
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )
    .iter()
    .map(|r| r.text(0).unwrap())
    .collect();
    let (mut before, mut after) = (BTreeMap::new(), BTreeMap::new());
    let moved = net
        .move_store_to_postgres(
            |net| before = whole_store(net, &tables),
            |net| after = whole_store(net, &tables),
        )
        .await;
    let count = |t: &str| moved.iter().find(|m| m.table == t).map_or(0, |m| m.rows);
    assert!(
        count("snaps_audit") > 0 && count("patient") > 0,
        "{moved:?}"
    );
    assert_eq!(moved.len(), tables.len());
    // Every tuple with its status (locks, sent-to bits), every audit
    // record, the change log: all there.
    assert_eq!(after, before);
    let locked = common::global_query(
        &net,
        "SELECT count(*) FROM patient WHERE snaps_lock_site IS NOT NULL",
    );
    assert!(
        locked[0].int(0).unwrap() > 0,
        "the day's locks moved with the store"
    );
    let summary = net.refresh().await;
    settled(&net, summary.epoch).await;
    assert_same_state(&end_state(&net), &expected, "after the move");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_stopped_at_any_step_finishes_the_epoch_as_if_it_had_not_been() {
    let expected = uninterrupted(false).await;
    for at in [
        SitePoint::Evicted,
        SitePoint::Pushed,
        SitePoint::Applied,
        SitePoint::Refetching,
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
        assert_same_state(
            &end_state(&net),
            &expected,
            &format!("after STG stopped at {at:?}"),
        );
    }
}

// ------------------------------------------------- differential = recompute --

/// One step of a random day: which site acts, what it does, on whose
/// patient (site index, patient index).
#[derive(Debug, Clone)]
struct Step {
    site: usize,
    op: u8,
    whose: usize,
    which: usize,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (0..3usize, 0..9u8, 0..3usize, 0..8usize).prop_map(|(site, op, whose, which)| Step {
            site,
            op,
            whose,
            which,
        }),
        8..28,
    )
}

/// The statement of step `n`.
fn statement(net: &Net, n: usize, s: &Step) -> String {
    let me = SITES[s.site];
    let pno = patient(net, SITES[s.whose], s.which);
    let mine = patient(net, me, s.which);
    let surname = surname(net, s);
    match s.op {
        0 => format!("SELECT * FROM patient WHERE pno = {pno}"),
        1 => format!(
            "SELECT p.surname, v.date FROM patient p, visit v WHERE p.pno = v.pno AND p.pno = {pno}"
        ),
        2 => format!("UPDATE patient SET add1 = 'day {n}' WHERE pno = {pno}"),
        3 => format!("UPDATE patient SET surname = 'Renamed{n}' WHERE pno = {pno}"),
        4 => format!(
            "INSERT INTO patient (surname, first_names, dob, sex) VALUES ('{surname}', 'New {n}', 19800101, 'F')"
        ),
        5 => format!("DELETE FROM patient WHERE pno = {mine}"),
        6 => format!("UPDATE patient SET film_locate = 'shelf {n}' WHERE pno = {pno}"),
        7 => format!("SELECT * FROM patient WHERE surname = '{surname}'"),
        _ => format!("UPDATE visit SET description = 'seen {n}' WHERE pno = {mine}"),
    }
}

/// The surname of the patient a step is about, quoted for SQL.
fn surname(net: &Net, s: &Step) -> String {
    match &net.data[SITES[s.whose]]["patient"][s.which][3] {
        Value::Text(t) => t.replace('\'', "''"),
        v => panic!("surname {v:?}"),
    }
}

async fn random_day(net: &Net, steps: &[Step]) {
    let mut clients = Vec::new();
    for code in SITES {
        clients.push(connect(net.sites[code]).await);
    }
    for (n, s) in steps.iter().enumerate() {
        try_run(&clients[s.site], &statement(net, n, s)).await;
    }
}

/// A site's shared relations as text rows (status included, rowids not:
/// a copy fetched again gets a new one).
fn shared_rows(path: &std::path::Path, net: &Net, code: &str) -> BTreeMap<String, Vec<String>> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mapping = snaps::localnet::site_mapping(&net.network, code).unwrap();
    mapping
        .relations()
        .map(|rm| {
            let r = &rm.local.name;
            (r.clone(), table(&conn, &format!("SELECT * FROM \"{r}\"")))
        })
        .collect()
}

fn to_value(v: rusqlite::types::Value) -> Value {
    match v {
        rusqlite::types::Value::Null => Value::Null,
        rusqlite::types::Value::Integer(i) => Value::Int(i),
        rusqlite::types::Value::Real(f) => Value::Float(f),
        rusqlite::types::Value::Text(t) => Value::Text(t),
        rusqlite::types::Value::Blob(_) => panic!("a blob in a shared relation"),
    }
}

/// The global snapshot as the sites' exports say it should be: every
/// site's own tuples, mapped, NULL where the site maps nothing.
fn union_of_exports(net: &Net) -> BTreeMap<String, Vec<String>> {
    let global = net.network.global_catalog().unwrap();
    let mut out: BTreeMap<String, Vec<String>> = global
        .relations()
        .map(|r| (r.name.clone(), Vec::new()))
        .collect();
    for site in &net.network.sites {
        let code = site.code.as_str();
        let conn = rusqlite::Connection::open(net.dir.path().join(code).join("local.db")).unwrap();
        let mapping = snaps::localnet::site_mapping(&net.network, code).unwrap();
        for rm in mapping.relations() {
            let cols: Vec<String> = rm
                .local
                .attributes
                .iter()
                .map(|a| format!("\"{}\"", a.name))
                .collect();
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {} FROM \"{}\" WHERE (snaps_status & 128) = 0",
                    cols.join(", "),
                    rm.local.name
                ))
                .unwrap();
            let rows: Vec<Vec<Value>> = stmt
                .query_map([], |r| {
                    (0..cols.len())
                        .map(|i| Ok(to_value(r.get(i)?)))
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            for row in rows {
                for (part, values) in rm.parts.iter().zip(rm.export(&row).unwrap()) {
                    let rel = global.relation(&part.global).unwrap();
                    let mut full = vec![Value::Null; rel.attributes.len()];
                    for (a, v) in part.attrs.iter().zip(values) {
                        full[rel.position(&a.global).unwrap()] = v;
                    }
                    full.push(Value::Int(i64::from(site.number.0)));
                    out.get_mut(&part.global).unwrap().push(format!("{full:?}"));
                }
            }
        }
    }
    for rows in out.values_mut() {
        rows.sort();
    }
    out
}

fn global_rows(net: &Net) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for r in net.network.global_catalog().unwrap().relations() {
        let cols: Vec<String> = r
            .attributes
            .iter()
            .map(|a| format!("\"{}\"", a.name))
            .collect();
        let sql = format!(
            "SELECT {}, snaps_owner FROM \"{}\"",
            cols.join(", "),
            r.name
        );
        let mut rows: Vec<String> = common::global_query(net, &sql)
            .iter()
            .map(|row| {
                let values: Vec<Value> = (0..=cols.len()).map(|i| row.value(i).unwrap()).collect();
                format!("{values:?}")
            })
            .collect();
        rows.sort();
        out.insert(r.name.clone(), rows);
    }
    out
}

/// After the refresh, a copy of each site's database has its copies thrown
/// away and every snapshot definition fetched from scratch: it must hold
/// exactly what the differential refresh left.
async fn recomputed(net: &Net, code: &str) -> BTreeMap<String, Vec<String>> {
    let live = net.dir.path().join(code).join("local.db");
    let copy = net.dir.path().join(format!("{code}-recomputed.db"));
    {
        let conn = rusqlite::Connection::open(&live).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))
            .unwrap();
    }
    std::fs::copy(&live, &copy).unwrap();
    let global = net.global.as_ref().unwrap();
    let link = snaps_local::site::GlobalLink {
        addr: global.addr.clone(),
        fallbacks: Vec::new(),
        auth: global.site_auth(code).unwrap(),
        compress: true,
        fetch_timeout: Duration::from_secs(5),
        retry_after: Duration::ZERO,
    };
    let site =
        snaps_local::site::Site::open(&copy, &net.network.global_catalog().unwrap(), Some(link))
            .unwrap();
    tokio::task::spawn_blocking(move || site.rebuild_snapshots())
        .await
        .unwrap()
        .unwrap();
    shared_rows(&copy, net, code)
}

/// The reads a step makes at its site afterwards: the patient it was about
/// (of the first two of each site, so reads repeat), by number, with the
/// visits, and by name.
fn reads(net: &Net, s: &Step) -> Vec<String> {
    let step = Step {
        which: s.which % 2,
        ..s.clone()
    };
    let pno = patient(net, SITES[step.whose], step.which);
    vec![
        format!("SELECT pno, surname, add1 FROM patient WHERE pno = {pno}"),
        format!(
            "SELECT p.surname, v.vno, v.description FROM patient p, visit v \
             WHERE p.pno = v.pno AND p.pno = {pno}"
        ),
        format!(
            "SELECT pno, first_names FROM patient WHERE surname = '{}'",
            surname(net, &step)
        ),
    ]
}

/// A runtime for one property-test case.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, max_shrink_iters: 16, ..ProptestConfig::default() })]

    /// A session answers a repeated read on the verdict it remembered while
    /// nothing it was drawn from changed: at every step of a random day (with
    /// a refresh in the middle; the day's changes made through another
    /// connection), each read through the long-lived session equals the same
    /// read through a new session, which judges it afresh.
    #[test]
    fn a_remembered_answer_equals_a_fresh_sessions_answer(day in steps()) {
        runtime().block_on(async {
            let net = setup(12).await;
            // The day's statements go through other connections than the
            // reads: the readers learn of them only from the database.
            let (mut long, mut writers) = (Vec::new(), Vec::new());
            for code in SITES {
                long.push(connect(net.sites[code]).await);
                writers.push(connect(net.sites[code]).await);
            }
            let mut asked: Vec<(usize, String)> = Vec::new();
            for (n, s) in day.iter().enumerate() {
                if n == day.len() / 2 {
                    let summary = net.refresh().await;
                    settled(&net, summary.epoch).await;
                }
                try_run(&writers[s.site], &statement(&net, n, s)).await;
                for q in reads(&net, s) {
                    let (remembered, _) = common::run(&mut long[s.site], &q).await;
                    let mut fresh_client = connect(net.sites[SITES[s.site]]).await;
                    let (fresh, _) = common::run(&mut fresh_client, &q).await;
                    prop_assert_eq!(&remembered, &fresh, "step {} at {}: {}", n, SITES[s.site], &q);
                    asked.push((s.site, q));
                }
            }
            // Asked three times with nothing changed, a read is answered on
            // its remembered verdict at least the third time.
            let before: u64 = net.handles.values().map(|h| h.repeated_reads()).sum();
            for (site, q) in &asked {
                for _ in 0..3 {
                    common::run(&mut long[*site], q).await;
                }
            }
            let after: u64 = net.handles.values().map(|h| h.repeated_reads()).sum();
            prop_assert!(after >= before + asked.len() as u64, "{} of {}", after - before, asked.len());
            Ok(())
        })?;
    }

    /// DESIGN.md's oracle for the refresh: after a random day and one
    /// refresh, every site holds what a recomputation from scratch would
    /// give, and the global snapshot is the union of the sites' exports.
    #[test]
    fn a_differential_refresh_equals_a_recomputation(day in steps()) {
        runtime().block_on(refresh_equals_recomputation(&day, false))?;
    }

    /// The same oracle with the global store on PostgreSQL.
    #[test]
    fn a_differential_refresh_on_postgres_equals_a_recomputation(day in steps()) {
        runtime().block_on(refresh_equals_recomputation(&day, true))?;
    }
}

async fn refresh_equals_recomputation(
    day: &[Step],
    on_postgres: bool,
) -> Result<(), TestCaseError> {
    let all: Vec<String> = common::network()
        .global_catalog()
        .unwrap()
        .relations()
        .map(|r| r.name.clone())
        .collect();
    let propagate =
        |o: &mut snaps::localnet::Options| o.refresh.propagate_deletes = all.into_iter().collect();
    let net = if on_postgres {
        common::setup_on_postgres(12, propagate).await
    } else {
        setup_with(12, propagate).await
    };
    random_day(&net, day).await;
    let summary = net.refresh().await;
    settled(&net, summary.epoch).await;
    prop_assert_eq!(global_rows(&net), union_of_exports(&net));
    for code in SITES {
        let live = shared_rows(&net.dir.path().join(code).join("local.db"), &net, code);
        let again = recomputed(&net, code).await;
        prop_assert_eq!(&live, &again, "site {}", code);
    }
    Ok(())
}
