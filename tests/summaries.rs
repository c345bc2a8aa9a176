//! The summaries (network.toml `[summaries]`): after an epoch a site knows
//! which of its own keys other sites' tuples hold and, by fingerprint,
//! which names are held elsewhere. Questions about its own patients that
//! nobody else holds anything for are answered without the network; once
//! another site records something under one of them, the next epoch tells
//! the site, and the same question fetches it. Every summary sent is in the
//! audit trail.

mod common;

use common::{Net, connect, db, run, setup, stat};
use snaps_schema::Value;

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A CPH patient with a visit whose name no other site's patient has.
fn lonely_patient(net: &Net) -> (i64, String, String, i64) {
    let held_elsewhere = |surname: &str, first: &str| {
        net.data
            .iter()
            .filter(|(code, _)| code.as_str() != "CPH")
            .flat_map(|(_, rows)| &rows["patient"])
            .any(|p| text(&p[3]) == surname && text(&p[4]) == first)
    };
    let cph = &net.data["CPH"];
    cph["patient"]
        .iter()
        .find_map(|p| {
            let Value::Int(pno) = p[0] else { return None };
            let (surname, first) = (text(&p[3]), text(&p[4]));
            if held_elsewhere(&surname, &first) {
                return None;
            }
            let vno = cph["visit"]
                .iter()
                .find(|v| v[1] == Value::Int(pno))
                .and_then(|v| match v[0] {
                    Value::Int(vno) => Some(vno),
                    _ => None,
                })?;
            Some((pno, surname, first, vno))
        })
        .expect("a CPH patient with a visit and a name of his own")
}

fn fetches(net: &Net) -> i64 {
    stat(&db(net, "CPH"), "global_fetches")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_patients_stay_home_until_another_site_records_something_of_theirs() {
    let net = setup(30).await;
    let (pno, surname, first, vno) = lonely_patient(&net);
    let sq = |s: &str| s.replace('\'', "''");
    let by_name = format!(
        "SELECT pno FROM patient WHERE surname = '{}' AND first_names = '{}'",
        sq(&surname),
        sq(&first)
    );
    let history = format!(
        "SELECT v.vno, v.description FROM patient p, visit v WHERE p.pno = {pno} AND v.pno = p.pno"
    );
    let reports = format!("SELECT line_no FROM visit_rep WHERE vno = {vno}");
    let mut cph = connect(net.sites["CPH"]).await;

    net.refresh().await;
    let before = fetches(&net);
    let answered = net.handles["CPH"].summary_answers();
    let (own_history, _) = run(&mut cph, &history).await;
    let (names, _) = run(&mut cph, &by_name).await;
    run(&mut cph, &reports).await;
    assert_eq!(
        fetches(&net),
        before,
        "the summaries answer for own patients"
    );
    assert_eq!(net.handles["CPH"].summary_answers(), answered + 3);
    assert_eq!(names, vec![vec![Some(pno.to_string())]]);
    assert!(!own_history.is_empty());

    // Another site records a visit of this patient, a report line of the
    // patient's visit, and a patient of the same name.
    let mut stg = connect(net.sites["STG"]).await;
    run(
        &mut stg,
        &format!(
            "INSERT INTO visit (vno, pno, date, description) VALUES (10999001, {pno}, 19880101, 'Seen at STG')"
        ),
    )
    .await;
    run(
        &mut stg,
        &format!(
            "INSERT INTO visit_rep (vno, line_no, line) VALUES ({vno}, 99, 'Second opinion, STG')"
        ),
    )
    .await;
    run(
        &mut stg,
        &format!(
            "INSERT INTO patient (pno, surname, first_names, dob) VALUES (10999002, '{}', '{}', 19500101)",
            sq(&surname),
            sq(&first)
        ),
    )
    .await;

    // Until the epoch commits them they are not in the global snapshot:
    // the answer is still the one as of the last epoch, without a fetch.
    let before = fetches(&net);
    assert_eq!(run(&mut cph, &history).await.0, own_history);
    assert_eq!(fetches(&net), before);

    net.refresh().await;
    let (history_now, _) = run(&mut cph, &history).await;
    assert_eq!(history_now.len(), own_history.len() + 1);
    assert!(history_now.contains(&vec![
        Some("10999001".to_string()),
        Some("Seen at STG".to_string())
    ]));
    let (reports_now, _) = run(&mut cph, &reports).await;
    assert!(reports_now.contains(&vec![Some("99".to_string())]));
    let (names_now, _) = run(&mut cph, &by_name).await;
    let mut expected = vec![
        vec![Some("10999002".to_string())],
        vec![Some(pno.to_string())],
    ];
    expected.sort();
    assert_eq!(names_now, expected);

    // Every summary that went out is on the record, by site.
    let store = rusqlite::Connection::open(&net.store).unwrap();
    let details: Vec<String> = store
        .prepare("SELECT detail FROM snaps_audit WHERE site = 'CPH' AND action = 'summaries' ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(details.len(), 2, "{details:?}");
    assert!(details[0].contains("(whole)"), "{}", details[0]);
    assert!(details[1].contains("visit.pno +1 -0"), "{}", details[1]);
    assert!(details[1].contains("visit_rep.vno +1 -0"), "{}", details[1]);
    assert!(
        details[1].contains("patient(surname,first_names) +1 -0"),
        "{}",
        details[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_that_lost_its_summaries_gets_them_whole_again() {
    let net = setup(20).await;
    net.refresh().await;
    let path = db(&net, "GRC");
    let count = |path: &std::path::Path| -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM snaps_summary_item", [], |r| r.get(0))
            .unwrap()
    };
    let held = count(&path);
    assert!(held > 0, "GRC holds fingerprints of the others' names");
    // As after a restore from an older backup: the items and the version
    // the site held are gone.
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "DELETE FROM snaps_summary_item; DELETE FROM snaps_meta WHERE key = 'summary_version';",
        )
        .unwrap();
    }
    net.refresh().await;
    assert_eq!(count(&path), held);
}
