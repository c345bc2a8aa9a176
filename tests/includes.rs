//! Include trees (network.toml `[includes]`): a fetch of another site's
//! patient brings his visits and their report lines along in the same
//! request, so the visit-history and report queries of the encounter that
//! follow need no round trip, and answer what the whole network holds. The
//! refresh keeps what came along current: a visit recorded elsewhere
//! arrives with the next epoch, without a fetch of its own.

mod common;

use common::{Net, connect, db, int, run, setup, stat};
use snaps_schema::Value;

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An STG patient with at least two visits, the last with report lines:
/// (pno, surname, first names, last visit's vno).
fn patient_with_reports(net: &Net) -> (i64, String, String, i64) {
    let stg = &net.data["STG"];
    stg["patient"]
        .iter()
        .find_map(|p| {
            let pno = int(&p[0]);
            let visits: Vec<i64> = net
                .data
                .values()
                .flat_map(|rows| &rows["visit"])
                .filter(|v| v[1] == Value::Int(pno))
                .map(|v| int(&v[0]))
                .collect();
            let last = *visits.iter().max()?;
            let reported = net
                .data
                .values()
                .flat_map(|rows| &rows["visit_rep"])
                .any(|r| r[0] == Value::Int(last));
            (visits.len() >= 2 && reported).then(|| (pno, text(&p[3]), text(&p[4]), last))
        })
        .expect("an STG patient with visits and reports")
}

/// Result rows as `run` gives them.
type Rows = Vec<Vec<Option<String>>>;

/// What the whole network holds: the visits of `pno` as (vno, date), and
/// the report lines of `vno` as line numbers, sorted as `run` sorts.
fn network_view(net: &Net, pno: i64, vno: i64) -> (Rows, Rows) {
    let mut visits: Rows = net
        .data
        .values()
        .flat_map(|rows| &rows["visit"])
        .filter(|v| v[1] == Value::Int(pno))
        .map(|v| vec![Some(int(&v[0]).to_string()), Some(int(&v[4]).to_string())])
        .collect();
    visits.sort();
    let mut lines: Rows = net
        .data
        .values()
        .flat_map(|rows| &rows["visit_rep"])
        .filter(|r| r[0] == Value::Int(vno))
        .map(|r| vec![Some(int(&r[1]).to_string())])
        .collect();
    lines.sort();
    (visits, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patient_fetched_by_name_brings_his_whole_record_in_one_round_trip() {
    let net = setup(30).await;
    let (pno, surname, first, vno) = patient_with_reports(&net);
    let sq = |s: &str| s.replace('\'', "''");
    let lookup = format!(
        "SELECT pno FROM patient WHERE surname = '{}' AND first_names = '{}'",
        sq(&surname),
        sq(&first)
    );
    let history = format!(
        "SELECT v.vno, v.date FROM patient p, visit v WHERE p.pno = {pno} AND v.pno = p.pno"
    );
    let visits_only = format!("SELECT vno, date FROM visit WHERE pno = {pno}");
    let reports = format!("SELECT line_no FROM visit_rep WHERE vno = {vno}");
    let (want_visits, want_lines) = network_view(&net, pno, vno);
    let cph_db = db(&net, "CPH");
    let mut cph = connect(net.sites["CPH"]).await;

    let before = stat(&cph_db, "global_fetches");
    let (found, _) = run(&mut cph, &lookup).await;
    assert!(found.contains(&vec![Some(pno.to_string())]), "{found:?}");
    assert_eq!(stat(&cph_db, "global_fetches"), before + 1);

    // The rest of the encounter is answered at CPH, as the network has it.
    assert_eq!(run(&mut cph, &history).await.0, want_visits);
    assert_eq!(run(&mut cph, &visits_only).await.0, want_visits);
    assert_eq!(run(&mut cph, &reports).await.0, want_lines);
    assert_eq!(
        stat(&cph_db, "global_fetches"),
        before + 1,
        "the visit history and the reports came along with the patient"
    );

    // What came along is a snapshot definition naming the patient by key.
    let definitions: Vec<String> = rusqlite::Connection::open(&cph_db)
        .unwrap()
        .prepare("SELECT statement FROM snaps_snapshot_definition ORDER BY snapshot_no")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(
        definitions
            .iter()
            .any(|d| d.contains(&format!("IN ({pno}")) || d.contains(&format!(", {pno}"))),
        "{definitions:#?}"
    );

    // STG records a new visit of the patient; after the epoch CPH has it
    // without asking.
    let mut stg = connect(net.sites["STG"]).await;
    run(
        &mut stg,
        &format!(
            "INSERT INTO visit (vno, pno, date, description) VALUES (10999001, {pno}, 19880202, 'Seen again')"
        ),
    )
    .await;
    net.refresh().await;
    let before = stat(&cph_db, "global_fetches");
    let (now, _) = run(&mut cph, &visits_only).await;
    assert_eq!(now.len(), want_visits.len() + 1, "{now:?}");
    assert!(now.contains(&vec![Some("10999001".into()), Some("19880202".into())]));
    assert_eq!(run(&mut cph, &history).await.0, now);
    assert_eq!(stat(&cph_db, "global_fetches"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patient_fetched_by_number_brings_his_record_and_a_rebuild_keeps_it() {
    let net = setup(30).await;
    let (pno, _, _, vno) = patient_with_reports(&net);
    let (want_visits, want_lines) = network_view(&net, pno, vno);
    let cph_db = db(&net, "CPH");
    let mut cph = connect(net.sites["CPH"]).await;
    run(
        &mut cph,
        &format!("SELECT surname FROM patient WHERE pno = {pno}"),
    )
    .await;
    let fetched = stat(&cph_db, "global_fetches");
    let visits_only = format!("SELECT vno, date FROM visit WHERE pno = {pno}");
    let reports = format!("SELECT line_no FROM visit_rep WHERE vno = {vno}");
    assert_eq!(run(&mut cph, &visits_only).await.0, want_visits);
    assert_eq!(run(&mut cph, &reports).await.0, want_lines);
    assert_eq!(stat(&cph_db, "global_fetches"), fetched);

    // Thrown away and fetched again from the definitions, the copies are
    // the same.
    let site = net.handles["CPH"].clone();
    tokio::task::spawn_blocking(move || site.rebuild_snapshots())
        .await
        .unwrap()
        .unwrap();
    let fetched = stat(&cph_db, "global_fetches");
    assert_eq!(run(&mut cph, &visits_only).await.0, want_visits);
    assert_eq!(run(&mut cph, &reports).await.0, want_lines);
    assert_eq!(stat(&cph_db, "global_fetches"), fetched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_visit_history_asked_first_brings_the_report_lines_along() {
    let net = setup(30).await;
    let (pno, _, _, vno) = patient_with_reports(&net);
    let (want_visits, want_lines) = network_view(&net, pno, vno);
    let cph_db = db(&net, "CPH");
    let mut cph = connect(net.sites["CPH"]).await;
    // The join of patient and visit hangs the tree from the patient's own
    // selection: one fetch brings the visits and their report lines.
    let before = stat(&cph_db, "global_fetches");
    let history = format!(
        "SELECT v.vno, v.date FROM patient p, visit v WHERE p.pno = {pno} AND v.pno = p.pno"
    );
    assert_eq!(run(&mut cph, &history).await.0, want_visits);
    assert_eq!(stat(&cph_db, "global_fetches"), before + 1);
    let reports = format!("SELECT line_no FROM visit_rep WHERE vno = {vno}");
    assert_eq!(run(&mut cph, &reports).await.0, want_lines);
    assert_eq!(
        stat(&cph_db, "global_fetches"),
        before + 1,
        "the report lines came along with the visit history"
    );
}
