//! `snaps_match(<pno>)` through a site's SQL endpoint: the same person's
//! records at other sites, graded, over the global snapshot; and its
//! refusals (a bad argument, an unknown patient, the access rules, the
//! controller down), each a clear error that changes nothing. And the
//! links a site's users confirm over the Link RPC, which `snaps_match`
//! grades `linked`.

mod common;

use common::{Client, Net, connect, one, refused, run, setup, site_trail};
use snaps_proto::v1;
use snaps_schema::Value;

/// `(site, pno, grade)` of every match of `pno` asked at `c`, best first.
async fn matches(c: &Client, pno: i64) -> Vec<(String, i64, String, f64)> {
    c.client
        .query(
            &format!(
                "SELECT site, pno, grade, score FROM snaps_match({pno}) ORDER BY score DESC, site"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("snaps_match({pno}): {e:?}"))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// The access rules say `user` at `site` may not read patients.
async fn deny_patients(admin: &snaps_local::remote::GlobalClient, site: &str, user: &str) {
    admin
        .grant(v1::AclRule {
            relation: "patient".into(),
            site: site.into(),
            user: user.into(),
            right: v1::Right::None as i32,
        })
        .await
        .unwrap();
}

/// A CPH patient, female, with everything the match compares.
fn cph_woman(net: &Net) -> Vec<Value> {
    net.data["CPH"]["patient"]
        .iter()
        .find(|r| r[6] == Value::text("F") && r[2] == Value::text("Mrs"))
        .expect("a married woman at CPH")
        .clone()
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        v => panic!("not text: {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patient_registered_again_elsewhere_is_found_and_graded() {
    let net = setup(30).await;
    let p = cph_woman(&net);
    let (pno, surname, first, dob) = (
        common::int(&p[0]),
        text(&p[3]),
        text(&p[4]),
        common::int(&p[5]),
    );
    let first_given = first.split(' ').next().unwrap().to_string();
    let (y, m, d) = (dob / 10_000, dob / 100 % 100, dob % 100);
    // STG registers her again as it happens at a front desk: the same
    // details (a certain match); GRC under a married name, only her first
    // given name, and her birth date a day out (probable at best).
    let stg_pno = 10_000_900;
    let grc_pno = 20_000_900;
    let mut stg = connect(net.sites["STG"]).await;
    let mut grc = connect(net.sites["GRC"]).await;
    let sq = |s: &str| s.replace('\'', "''");
    run(
        &mut stg,
        &format!(
            "INSERT INTO patient (pno, title, surname, first_names, dob, sex) \
             VALUES ({stg_pno}, 'Mrs', '{}', '{}', {dob}, 'F')",
            sq(&surname),
            sq(&first)
        ),
    )
    .await;
    let near = if d < 28 {
        y * 10_000 + m * 100 + d + 1
    } else {
        y * 10_000 + m * 100 + d - 1
    };
    run(
        &mut grc,
        &format!(
            "INSERT INTO patient (pno, title, surname, first_names, dob, sex) \
             VALUES ({grc_pno}, 'Mrs', 'Papadopoulos', '{}', {near}, 'F')",
            sq(&first_given)
        ),
    )
    .await;
    let summary = net.refresh().await;
    assert!(summary.inserted >= 2, "{summary:?}");

    let cph = connect(net.sites["CPH"]).await;
    let found = matches(&cph, pno).await;
    let at = |site: &str, key: i64| found.iter().find(|m| m.0 == site && m.1 == key);
    let stg_match = at("STG", stg_pno).unwrap_or_else(|| panic!("STG's record: {found:?}"));
    assert_eq!(stg_match.2, "certain", "{found:?}");
    let grc_match = at("GRC", grc_pno).unwrap_or_else(|| panic!("GRC's record: {found:?}"));
    assert!(
        ["probable", "possible"].contains(&grc_match.2.as_str()),
        "{found:?}"
    );
    assert!(stg_match.3 > grc_match.3, "{found:?}");
    assert!(
        found.iter().all(|m| m.0 != "CPH"),
        "no record of her own site: {found:?}"
    );
    // Asked the other way round, at STG, about its own record.
    let back = matches(&stg, stg_pno).await;
    assert!(
        back.iter()
            .any(|m| m.0 == "CPH" && m.1 == pno && m.2 == "certain"),
        "{back:?}"
    );

    // It is a table like any other: filtered, counted.
    let (rows, _) = run(
        &mut grc,
        &format!(
            "SELECT count(*) FROM snaps_match({pno}) WHERE grade = 'certain' AND site = 'STG'"
        ),
    )
    .await;
    assert_eq!(rows, [[Some("1".to_string())]]);

    // Every match is in the audit trail with the patient and what it named.
    let admin = net.global.as_ref().unwrap().admin_client().await.unwrap();
    let trail = site_trail(&admin, "CPH").await;
    let record = trail
        .iter()
        .find(|e| e.action == "match")
        .expect("the match is audited");
    assert_eq!(record.patients.first(), Some(&pno.to_string()));
    assert!(record.patients.contains(&stg_pno.to_string()), "{record:?}");
    assert_eq!(record.relations, ["patient"]);
    // Nothing was copied to the asking site.
    let copies = rusqlite::Connection::open(common::db(&net, "CPH"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM patient WHERE pno IN (?1, ?2)",
            [stg_pno, grc_pno],
            |r| r.get::<_, i64>(0),
        )
        .unwrap();
    assert_eq!(copies, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_matches_say_why_and_change_nothing() {
    let mut net = setup(10).await;
    let pno = common::patients(&net, "CPH")[0];
    let cph = connect(net.sites["CPH"]).await;

    let (code, message) = refused(&cph, "SELECT * FROM snaps_match('Smith')").await;
    assert_eq!(code, "22023", "{message}");
    assert!(
        message.contains("snaps_match takes one patient number"),
        "{message}"
    );

    let (code, message) = refused(&cph, "SELECT * FROM snaps_match(999)").await;
    assert_eq!(code, "22023", "{message}");
    assert!(
        message.contains("no patient with pno = 999 in the global snapshot"),
        "{message}"
    );

    // The access rules apply: a user who may not read patients may not
    // match them, and the refusal is audited.
    let admin = net.global.as_ref().unwrap().admin_client().await.unwrap();
    deny_patients(&admin, "CPH", "clerk").await;
    let clerk = common::connect_as(net.sites["CPH"], "clerk").await;
    let (code, message) = refused(&clerk, &format!("SELECT * FROM snaps_match({pno})")).await;
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("user clerk at site CPH may not read patient"),
        "{message}"
    );
    let trail = admin.audit(v1::AuditRequest::default()).await.unwrap();
    assert!(
        trail
            .iter()
            .any(|e| e.action == "match-denied" && e.user == "clerk")
    );
    // The refused statements left no table behind.
    let (rows, _) = run(
        &mut connect(net.sites["CPH"]).await,
        "SELECT count(*) FROM sqlite_temp_master WHERE name LIKE 'snaps_match%'",
    )
    .await;
    assert_eq!(rows, [[Some("0".to_string())]]);

    // With the controller down, the site says so.
    net.global.take().unwrap().kill();
    let (code, message) = refused(&cph, &format!("SELECT * FROM snaps_match({pno})")).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("unreachable"), "{message}");
}

/// The refusal the global controller answered `r` with.
fn status<T: std::fmt::Debug>(r: Result<T, snaps_local::Error>) -> tonic::Status {
    match r {
        Err(snaps_local::Error::Remote(s)) => s,
        other => panic!("expected a refusal from the global controller, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_confirmed_link_is_graded_linked_checked_and_audited() {
    let net = setup(10).await;
    let global = net.global.as_ref().unwrap();
    let stg = snaps_local::remote::GlobalClient::connect(
        &global.addr,
        &snaps_local::remote::Auth::Insecure(global.tokens["STG"].clone()),
        Some("STG"),
    )
    .await
    .unwrap();
    let (cph_pno, stg_pno) = (
        common::patients(&net, "CPH")[0],
        common::patients(&net, "STG")[0],
    );
    let (cph_key, stg_key) = (Value::Int(cph_pno), Value::Int(stg_pno));

    // A ward user at STG confirms the two records are one woman.
    let made = stg
        .link(&stg_key, ("CPH", &cph_key), "ward", false)
        .await
        .unwrap();
    assert!(made.changed);
    let link = made.link.expect("the link as it stands");
    assert_eq!(
        (link.site.as_str(), link.other_site.as_str()),
        ("CPH", "STG")
    );
    assert!(!link.removed);
    let again = stg
        .link(&stg_key, ("CPH", &cph_key), "ward", false)
        .await
        .unwrap();
    assert!(!again.changed, "linking twice changes nothing");

    // Matched from CPH, her STG record comes first, graded linked.
    let cph = connect(net.sites["CPH"]).await;
    let found = matches(&cph, cph_pno).await;
    assert_eq!(
        found.first().map(|m| (m.0.as_str(), m.1, m.2.as_str())),
        Some(("STG", stg_pno, "linked")),
        "{found:?}"
    );

    // Bad links are refused with what was wrong.
    let s = status(stg.link(&stg_key, ("STG", &stg_key), "ward", false).await);
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("not linked with itself"), "{s:?}");
    let s = status(stg.link(&stg_key, ("GRC", &cph_key), "ward", false).await);
    assert!(
        s.message()
            .contains(&format!("{cph_pno} is not a record of site GRC")),
        "{s:?}"
    );
    let s = status(
        stg.link(&Value::Int(999), ("CPH", &cph_key), "ward", false)
            .await,
    );
    assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}");
    assert!(s.message().contains("999"), "{s:?}");
    // A site may only link its own patients.
    let s = status(stg.link(&cph_key, ("GRC", &stg_key), "ward", false).await);
    assert!(
        s.message()
            .contains(&format!("{cph_pno} is not a record of site STG")),
        "{s:?}"
    );

    // A user who may not read patients may not link them.
    let admin = global.admin_client().await.unwrap();
    deny_patients(&admin, "STG", "clerk").await;
    let s = status(stg.link(&stg_key, ("CPH", &cph_key), "clerk", true).await);
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");

    // The link, and the refusal, are in the audit trail with both patients.
    let trail = site_trail(&admin, "STG").await;
    let linked = trail
        .iter()
        .find(|e| e.action == "link")
        .expect("the link is audited");
    assert_eq!(linked.user, "ward");
    assert!(linked.patients.contains(&cph_pno.to_string()), "{linked:?}");
    assert!(linked.patients.contains(&stg_pno.to_string()), "{linked:?}");
    assert!(
        trail
            .iter()
            .any(|e| e.action == "unlink-denied" && e.user == "clerk"),
        "{trail:?}"
    );

    // Unlinked, the record is no longer graded linked.
    let gone = stg
        .link(&stg_key, ("CPH", &cph_key), "ward", true)
        .await
        .unwrap();
    assert!(gone.changed && gone.link.expect("link").removed);
    let found = matches(&cph, cph_pno).await;
    assert!(found.iter().all(|m| m.2 != "linked"), "{found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lookup_of_a_linked_patient_brings_the_other_records_before_the_controller_goes_down() {
    let mut net = setup(10).await;
    let global = net.global.as_ref().unwrap();
    let stg_client = snaps_local::remote::GlobalClient::connect(
        &global.addr,
        &snaps_local::remote::Auth::Insecure(global.tokens["STG"].clone()),
        Some("STG"),
    )
    .await
    .unwrap();
    let mut cph = connect(net.sites["CPH"]).await;
    // The CPH patient with the most visits, and his visits as CPH has them.
    let (rows, _) = run(
        &mut cph,
        "SELECT pno, count(*) FROM visit GROUP BY pno ORDER BY count(*) DESC, pno LIMIT 1",
    )
    .await;
    let cph_pno: i64 = rows[0][0].as_deref().unwrap().parse().unwrap();
    let visits = rows[0][1].clone();
    assert_ne!(visits.as_deref(), Some("0"));
    let stg_pno = common::patients(&net, "STG")[0];
    let made = stg_client
        .link(
            &Value::Int(stg_pno),
            ("CPH", &Value::Int(cph_pno)),
            "ward",
            false,
        )
        .await
        .unwrap();
    assert!(made.changed);

    // The refresh tells every site that may read patients.
    net.refresh().await;
    let links = |code: &str| -> Vec<(i64, i64, String)> {
        let conn = rusqlite::Connection::open(common::db(&net, code)).unwrap();
        let mut stmt = conn
            .prepare("SELECT key, other, other_site FROM snaps_link ORDER BY key")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    let both = {
        let mut v = vec![
            (stg_pno, cph_pno, "CPH".to_string()),
            (cph_pno, stg_pno, "STG".to_string()),
        ];
        v.sort();
        v
    };
    assert_eq!(links("GRC"), both);
    assert_eq!(links("STG"), both);

    // STG looks up its own patient: the CPH record and its visits come
    // along, so with the controller gone they are still answered in full.
    let mut stg = connect(net.sites["STG"]).await;
    let (rows, notices) = run(
        &mut stg,
        &format!("SELECT pno FROM patient WHERE pno = {stg_pno}"),
    )
    .await;
    assert_eq!(rows.len(), 1);
    assert!(notices.is_empty(), "{notices:?}");
    net.global.take().unwrap().kill();
    let (rows, notices) = run(
        &mut stg,
        &format!("SELECT count(*) FROM visit WHERE pno = {cph_pno}"),
    )
    .await;
    assert_eq!(rows, [[visits]]);
    assert!(
        notices.is_empty(),
        "covered, not a local-only answer: {notices:?}"
    );
    let (rows, notices) = run(
        &mut stg,
        &format!("SELECT pno FROM patient WHERE pno = {cph_pno}"),
    )
    .await;
    assert_eq!(rows, [[Some(cph_pno.to_string())]]);
    assert!(notices.is_empty(), "{notices:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_links_and_unlinks_in_sql_and_bad_calls_say_why() {
    let mut net = setup(10).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let (rows, _) = run(
        &mut cph,
        "SELECT pno, count(*) FROM visit GROUP BY pno ORDER BY count(*) DESC, pno LIMIT 1",
    )
    .await;
    let cph_pno: i64 = rows[0][0].as_deref().unwrap().parse().unwrap();
    let visits = rows[0][1].clone();
    let stg_pno = common::patients(&net, "STG")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let call = |f: &str| format!("SELECT {f}({stg_pno}, 'CPH', {cph_pno})");

    // The link is made and kept at STG at once, and the CPH record comes
    // along: with the controller gone, his visits are answered in full.
    assert_eq!(
        one(&mut stg, &call("snaps_link")).await.as_deref(),
        Some("linked")
    );
    assert_eq!(
        one(&mut stg, &call("snaps_link")).await.as_deref(),
        Some("already linked")
    );
    assert_eq!(
        one(
            &mut stg,
            &format!(
                "SELECT other_site FROM snaps_link WHERE key = {stg_pno} AND other = {cph_pno}"
            )
        )
        .await
        .as_deref(),
        Some("CPH")
    );
    let (rows, notices) = run(
        &mut stg,
        &format!("SELECT count(*) FROM visit WHERE pno = {cph_pno}"),
    )
    .await;
    assert_eq!(rows, [[visits.clone()]]);
    assert!(notices.is_empty(), "{notices:?}");

    // Bad calls are refused with what was wrong, and change nothing.
    let (code, message) = refused(&stg, &format!("SELECT snaps_link({stg_pno}, CPH)")).await;
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("the other site's code"), "{message}");
    let (code, message) = refused(
        &stg,
        &format!("SELECT snaps_link({stg_pno}, 'GRC', {cph_pno})"),
    )
    .await;
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("is not a record of site GRC"), "{message}");
    let admin = net.global.as_ref().unwrap().admin_client().await.unwrap();
    deny_patients(&admin, "STG", "clerk").await;
    let clerk = common::connect_as(net.sites["STG"], "clerk").await;
    let (code, message) = refused(&clerk, &call("snaps_unlink")).await;
    assert_eq!(code, "42501", "{message}");
    assert!(
        site_trail(&admin, "STG")
            .await
            .iter()
            .any(|e| e.action == "unlink-denied" && e.user == "clerk")
    );

    // Unlinked, the site forgets the link at once.
    assert_eq!(
        one(&mut stg, &call("snaps_unlink")).await.as_deref(),
        Some("unlinked")
    );
    assert_eq!(
        one(&mut stg, "SELECT count(*) FROM snaps_link")
            .await
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        one(&mut stg, &call("snaps_unlink")).await.as_deref(),
        Some("not linked")
    );

    // With the controller down, the site says so.
    net.global.take().unwrap().kill();
    let (code, message) = refused(&stg, &call("snaps_link")).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("snaps_link keeps links"), "{message}");
    // The copies brought along are still answered.
    let (rows, _) = run(
        &mut stg,
        &format!("SELECT count(*) FROM visit WHERE pno = {cph_pno}"),
    )
    .await;
    assert_eq!(rows, [[visits]]);
}
