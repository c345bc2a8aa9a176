//! `snaps_sync_patient(<pno>)` and `snaps sync --site --patient`: one
//! patient's changes at his owner brought to another site now, ahead of the
//! night — and the night after, which neither loses nor doubles them. And
//! the refusals: a bad call, an unknown patient, the access rules, an owner
//! offline — each a clear error that changes nothing.

mod common;

use std::time::Duration;

use common::{Client, Net, connect, global_query, one, refused, run, setup};
use snaps_proto::v1;

/// A CPH patient with visits, and how many.
async fn cph_patient_with_visits(cph: &mut Client) -> (i64, i64) {
    let (rows, _) = run(
        cph,
        "SELECT pno, count(*) FROM visit GROUP BY pno ORDER BY count(*) DESC, pno LIMIT 1",
    )
    .await;
    let n = |i: usize| rows[0][i].as_deref().unwrap().parse::<i64>().unwrap();
    (n(0), n(1))
}

async fn address(c: &mut Client, pno: i64) -> Option<String> {
    one(c, &format!("SELECT add1 FROM patient WHERE pno = {pno}")).await
}

async fn visits(c: &mut Client, pno: i64) -> i64 {
    one(c, &format!("SELECT count(*) FROM visit WHERE pno = {pno}"))
        .await
        .unwrap()
        .parse()
        .unwrap()
}

/// The visits of `pno` in the global snapshot.
fn global_visits(net: &Net, pno: i64) -> i64 {
    global_query(
        net,
        &format!("SELECT count(*) FROM visit WHERE pno = {pno}"),
    )[0]
    .int(0)
    .unwrap()
}

async fn trail(net: &Net, site: &str) -> Vec<v1::AuditEntry> {
    let admin = net.global.as_ref().unwrap().admin_client().await.unwrap();
    common::site_trail(&admin, site).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patient_seen_this_morning_is_at_another_site_at_once_and_the_night_keeps_it_once() {
    let net = setup(10).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let mut stg = connect(net.sites["STG"]).await;
    let (p, had) = cph_patient_with_visits(&mut cph).await;
    let q = common::patients(&net, "CPH")
        .into_iter()
        .find(|&q| q != p)
        .unwrap();
    // STG has seen both patients before.
    let old = address(&mut stg, p).await;
    assert_eq!(visits(&mut stg, p).await, had);
    let q_old = address(&mut stg, q).await;

    // This morning CPH moves both and sees P again.
    for sql in [
        format!("UPDATE patient SET add1 = '1 Sync St' WHERE pno = {p}"),
        format!("UPDATE patient SET add1 = '9 Night St' WHERE pno = {q}"),
        format!(
            "INSERT INTO visit (vno, pno, date, description) VALUES (1999001, {p}, 19880505, 'Seen this morning')"
        ),
    ] {
        run(&mut cph, &sql).await;
    }
    assert_eq!(address(&mut stg, p).await, old, "not before the sync");

    // STG's emergency department asks for P now.
    let said = one(&mut stg, &format!("SELECT snaps_sync_patient({p})")).await;
    let said = said.unwrap();
    assert!(
        said.starts_with("synced: 2 changed tuples from CPH"),
        "{said}"
    );
    assert!(said.ends_with("1 new here"), "{said}");
    assert_eq!(address(&mut stg, p).await.as_deref(), Some("1 Sync St"));
    assert_eq!(visits(&mut stg, p).await, had + 1);
    assert_eq!(global_visits(&net, p), had + 1);
    // Asked again, nothing more has changed: no epoch for nothing.
    let again = one(&mut stg, &format!("SELECT snaps_sync_patient({p})")).await;
    assert_eq!(
        again.as_deref(),
        Some("synced: nothing changed at CPH since the last epoch or sync; 0 new here")
    );
    // Other patients' changes wait for the night.
    assert_eq!(address(&mut stg, q).await, q_old);
    let sync = trail(&net, "STG")
        .await
        .into_iter()
        .find(|e| e.action == "sync")
        .expect("the sync is audited");
    assert_eq!(sync.patients, [p.to_string()]);
    assert!(sync.detail.contains("from CPH"), "{}", sync.detail);

    // CPH changes P again before the night: that is not lost, and what was
    // synced is not committed twice.
    run(
        &mut cph,
        &format!("UPDATE patient SET add1 = '2 Later St' WHERE pno = {p}"),
    )
    .await;
    let night = net.refresh().await;
    assert_eq!(night.inserted, 0, "{night:?}");
    assert_eq!(night.updated, 2, "P again and Q: {night:?}");
    assert_eq!(address(&mut stg, p).await.as_deref(), Some("2 Later St"));
    assert_eq!(address(&mut stg, q).await.as_deref(), Some("9 Night St"));
    assert_eq!(visits(&mut stg, p).await, had + 1);
    assert_eq!(global_visits(&net, p), had + 1);
    // The night cleared CPH's flags: the next pushes nothing.
    assert_eq!(net.refresh().await.tuples_pushed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_administrator_syncs_a_patient_to_a_site_that_never_read_him() {
    let net = setup(10).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let (p, had) = cph_patient_with_visits(&mut cph).await;
    run(
        &mut cph,
        &format!(
            "INSERT INTO visit (vno, pno, date, description) VALUES (1999002, {p}, 19880506, 'Seen at noon')"
        ),
    )
    .await;
    let admin = net.global.as_ref().unwrap().admin_client().await.unwrap();
    let reply = admin.sync_patient(p, "", "GRC").await.unwrap();
    assert_eq!(
        (reply.owner.as_str(), reply.pushed, reply.inserted),
        ("CPH", 1, 1),
        "{reply:?}"
    );
    assert!(reply.epoch > 0);
    // Patient, every visit and their report lines are at GRC now.
    assert!(reply.brought > had as u64, "{reply:?}");
    let grc_db = common::db(&net, "GRC");
    let held: i64 = rusqlite::Connection::open(&grc_db)
        .unwrap()
        .query_row(
            &format!("SELECT count(*) FROM visit WHERE pno = {p}"),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(held, had + 1);
    // Asked for a site that does not exist, it names the sites there are.
    let e = admin.sync_patient(p, "", "XYZ").await.unwrap_err();
    assert!(e.to_string().contains("unknown site XYZ"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sync_refused_says_why_and_changes_nothing() {
    let mut net = setup(10).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let stg = connect(net.sites["STG"]).await;
    let (p, _) = cph_patient_with_visits(&mut cph).await;
    run(
        &mut cph,
        &format!("UPDATE patient SET add1 = '3 Kept St' WHERE pno = {p}"),
    )
    .await;
    let in_global = |net: &Net| {
        global_query(net, &format!("SELECT add1 FROM patient WHERE pno = {p}"))[0]
            .opt_text(0)
            .unwrap()
    };
    let before = in_global(&net);

    let (code, message) = refused(&stg, "SELECT snaps_sync_patient('x')").await;
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("takes one patient number"), "{message}");
    let (code, message) = refused(&stg, "SELECT snaps_sync_patient(999)").await;
    assert_eq!(code, "22023", "{message}");
    assert!(
        message.contains("no site registers patient 999"),
        "{message}"
    );

    // A user who may read patients but not lock them may not sync.
    let admin = net.global.as_ref().unwrap().admin_client().await.unwrap();
    admin
        .grant(v1::AclRule {
            relation: "patient".into(),
            site: "STG".into(),
            user: "clerk".into(),
            right: v1::Right::Read as i32,
        })
        .await
        .unwrap();
    let clerk = common::connect_as(net.sites["STG"], "clerk").await;
    let (code, message) = refused(&clerk, &format!("SELECT snaps_sync_patient({p})")).await;
    assert_eq!(code, "42501", "{message}");
    assert!(
        trail(&net, "STG")
            .await
            .iter()
            .any(|e| e.action == "sync-denied" && e.user == "clerk")
    );

    // A site's own patient needs no sync.
    let mut stg = stg;
    let own = common::patients(&net, "STG")[0];
    assert_eq!(
        one(&mut stg, &format!("SELECT snaps_sync_patient({own})"))
            .await
            .as_deref(),
        Some("STG owns this patient: the record here is current")
    );

    // The owner offline: the call names it.
    net.participants.remove("CPH").unwrap().abort();
    let as_grc = net.global.as_ref().unwrap().client("GRC").await.unwrap();
    for _ in 0..250 {
        let status = as_grc.status().await.unwrap();
        if !status.sites.iter().any(|s| s.code == "CPH" && s.subscribed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, message) = refused(&stg, &format!("SELECT snaps_sync_patient({p})")).await;
    assert_eq!(code, "55006", "{message}");
    assert!(message.contains("CPH is offline"), "{message}");
    assert_eq!(
        in_global(&net),
        before,
        "nothing reached the global snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_following_another_controller_on_the_store_is_asked_through_it() {
    let mut net = common::setup_two_controllers(10, |_| {}).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let mut stg = connect(net.sites["STG"]).await;
    let (p, had) = cph_patient_with_visits(&mut cph).await;
    for sql in [
        format!("UPDATE patient SET add1 = '5 Second St' WHERE pno = {p}"),
        format!(
            "INSERT INTO visit (vno, pno, date, description) VALUES (1999003, {p}, 19880507, 'Seen at the other door')"
        ),
    ] {
        run(&mut cph, &sql).await;
    }
    // CPH now keeps its stream at the second controller, STG at the first.
    net.follow_second("CPH").await;
    let said = one(&mut stg, &format!("SELECT snaps_sync_patient({p})"))
        .await
        .unwrap();
    assert!(
        said.starts_with("synced: 2 changed tuples from CPH"),
        "{said}"
    );
    assert_eq!(address(&mut stg, p).await.as_deref(), Some("5 Second St"));
    assert_eq!(visits(&mut stg, p).await, had + 1);
    let asks = global_query(&net, "SELECT count(*) FROM snaps_sync_asks");
    assert_eq!(
        asks[0].int(0).unwrap(),
        0,
        "the answer was read and the ask dropped"
    );
}
