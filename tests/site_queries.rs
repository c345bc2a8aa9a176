//! The query path end to end: three radiology sites with generated data,
//! each a real site database with its SQL endpoint on a real port, in front
//! of a real global controller on loopback, driven through a PostgreSQL
//! driver (tokio-postgres); a workload of lookups by name and by number, visit histories,
//! reports, aggregates, QUEL and SQL, at every site. Every answer must equal
//! the oracle's (DESIGN.md, "A query at a site"): the same statement on one
//! database holding the site's own data plus every other site's data as of
//! the last refresh, restricted to the attributes the site maps.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Net, connect, run, setup, stat};
use snaps::localnet::LocalNetwork;
use snaps_local::engine::Engine;
use snaps_local::site::{GlobalLink, LOCAL_ONLY_NOTICE, Site, SiteEngine};
use snaps_mapping::SiteMapping;
use snaps_schema::Value;

/// The oracle of one site: its own data plus the others' mapped onto its
/// schema, in an in-memory SQLite database.
fn oracle(net: &Net, code: &str) -> rusqlite::Connection {
    let site = net.network.site(code).unwrap();
    let local = net.network.local_catalog(site).unwrap();
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    conn.execute_batch(&local.to_ddl()).unwrap();
    let insert = |relation: &str, row: &[Value]| {
        let marks = vec!["?"; row.len()].join(", ");
        conn.execute(
            &format!(
                "INSERT INTO {} VALUES ({marks})",
                snaps_schema::sql_ident(relation)
            ),
            rusqlite::params_from_iter(row.iter().map(to_sql)),
        )
        .unwrap();
    };
    for (relation, rows) in &net.data[code] {
        for row in rows {
            insert(relation, row);
        }
    }
    let mine = snaps::localnet::site_mapping(&net.network, code).unwrap();
    for (other, rows) in &net.data {
        if other == code {
            continue;
        }
        let theirs: SiteMapping = snaps::localnet::site_mapping(&net.network, other).unwrap();
        for rm in theirs.relations() {
            for row in rows.get(&rm.local.name).into_iter().flatten() {
                let parts = rm.export(row).unwrap();
                let global = &rm.parts[0].global;
                let by_attr: BTreeMap<&str, &Value> = rm.parts[0]
                    .attrs
                    .iter()
                    .map(|a| a.global.as_str())
                    .zip(&parts[0])
                    .collect();
                for my in mine.relations().filter(|m| &m.parts[0].global == global) {
                    let values: Vec<Value> = my.parts[0]
                        .attrs
                        .iter()
                        .map(|a| {
                            by_attr
                                .get(a.global.as_str())
                                .map_or(Value::Null, |v| (*v).clone())
                        })
                        .collect();
                    insert(&my.local.name, &my.map_back(&[Some(values)]).unwrap());
                }
            }
        }
    }
    conn
}

fn to_sql(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(i) => rusqlite::types::Value::Integer(*i),
        Value::Float(f) => rusqlite::types::Value::Real(*f),
        Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
    }
}

fn oracle_rows(conn: &rusqlite::Connection, sql: &str) -> Vec<Vec<Value>> {
    let mut stmt = conn
        .prepare(sql)
        .unwrap_or_else(|e| panic!("oracle: {e}\n{sql}"));
    let n = stmt.column_count();
    let mut rows: Vec<Vec<Value>> = stmt
        .query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                        rusqlite::types::Value::Null => Value::Null,
                        rusqlite::types::Value::Integer(x) => Value::Int(x),
                        rusqlite::types::Value::Real(x) => Value::Float(x),
                        rusqlite::types::Value::Text(x) => Value::Text(x),
                        rusqlite::types::Value::Blob(_) => Value::Null,
                    })
                })
                .collect()
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    rows.sort();
    rows
}

/// The oracle's rows as the endpoint writes them in text.
fn as_text(rows: Vec<Vec<Value>>) -> Vec<Vec<Option<String>>> {
    let mut out: Vec<Vec<Option<String>>> = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| match v {
                    Value::Null => None,
                    Value::Int(i) => Some(i.to_string()),
                    Value::Float(f) => Some(format!("{f}")),
                    Value::Text(s) => Some(s),
                })
                .collect()
        })
        .collect();
    out.sort();
    out
}

/// The workload: (statement at the site, the same in SQL for the oracle,
/// whether an earlier statement of the workload already covers it).
fn workload(net: &Net, code: &str) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    let text = |v: &Value| match v {
        Value::Text(s) => s.replace('\'', "''"),
        other => other.to_string(),
    };
    for (other, rows) in &net.data {
        let patients = &rows["patient"];
        for (i, p) in patients.iter().enumerate().step_by(7).take(6) {
            let (pno, surname) = (p[0].to_string(), text(&p[3]));
            let by_name = format!("SELECT * FROM patient WHERE surname = '{surname}'");
            out.push((by_name.clone(), by_name, false));
            let by_no =
                format!("SELECT pno, surname, first_names, dob FROM patient WHERE pno = {pno}");
            out.push((by_no.clone(), by_no, false));
            let history = format!(
                "SELECT p.surname, v.vno, v.date, v.description FROM patient p, visit v \
                 WHERE p.pno = v.pno AND p.surname = '{surname}' ORDER BY v.date"
            );
            out.push((history.clone(), history, false));
            let count = format!("SELECT count(*), max(date) FROM visit WHERE pno = {pno}");
            out.push((count.clone(), count, false));
            let raw = match &p[3] {
                Value::Text(s) => s.clone(),
                other => other.to_string(),
            };
            let quel = format!(
                "range of p is patient\nretrieve (p.surname, p.first_names, p.dob) where p.surname = \"{raw}\""
            );
            let quel_sql = format!(
                "SELECT p.surname, p.first_names, p.dob FROM patient AS p WHERE p.surname = '{surname}'"
            );
            out.push((quel, quel_sql, false));
            if i % 2 == 0 && other != code {
                let specific =
                    format!("SELECT * FROM patient WHERE surname = '{surname}' AND pno = {pno}");
                // More specific than the lookup by name: covered.
                out.push((specific.clone(), specific, true));
            }
        }
        for v in rows["visit"].iter().step_by(11).take(4) {
            let reports = format!(
                "SELECT line_no, line FROM visit_rep WHERE vno = {} ORDER BY line_no",
                v[0]
            );
            out.push((reports.clone(), reports, false));
        }
    }
    let agg = "SELECT surname, count(*) FROM patient WHERE dob BETWEEN 19400101 AND 19601231 GROUP BY surname ORDER BY surname".to_string();
    out.push((agg.clone(), agg, false));
    out
}

/// Runs the workload at every site, each answer against the oracle, each
/// repetition without a fetch.
async fn every_answer_against_the_oracle(net: &Net) {
    for (code, addr) in &net.sites {
        let mut client = connect(*addr).await;
        let oracle = oracle(net, code);
        let db = net.dir.path().join(code).join("local.db");
        let mut checked = 0;
        for (query, oracle_sql, covered) in workload(net, code) {
            let before = stat(&db, "global_fetches");
            let (rows, notices) = run(&mut client, &query).await;
            if covered {
                assert_eq!(
                    stat(&db, "global_fetches"),
                    before,
                    "{code}: {query} was covered but fetched"
                );
            }
            assert!(notices.is_empty(), "{code}: {query}: {notices:?}");
            let expected = as_text(oracle_rows(&oracle, &oracle_sql));
            assert_eq!(rows, expected, "{code}: {query}");
            // Asking again sends nothing to the global controller.
            let fetches = stat(&db, "global_fetches");
            let (again, _) = run(&mut client, &query).await;
            assert_eq!(again, expected, "{code}: again {query}");
            assert_eq!(
                stat(&db, "global_fetches"),
                fetches,
                "{code}: repeating {query} fetched"
            );
            checked += 1;
        }
        assert!(checked > 50, "{code}: only {checked} queries");
        assert!(stat(&db, "global_fetches") > 0);
        assert!(stat(&db, "tuples_received") > 0);
        assert!(stat(&db, "bytes_received") > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_answer_equals_the_oracle_and_repeats_cost_nothing() {
    let net = setup(40).await;
    every_answer_against_the_oracle(&net).await;
}

/// After an epoch every site holds the summaries of the others' data:
/// questions about its own patients stay at home, and every answer is
/// still the oracle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_summaries_in_hand_every_answer_still_equals_the_oracle() {
    let net = setup(40).await;
    net.refresh().await;
    every_answer_against_the_oracle(&net).await;
    for (code, site) in &net.handles {
        assert!(
            site.summary_answers() > 0,
            "{code}: no query was answered on the summaries"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_global_controller_answers_are_local_with_a_notice() {
    let mut net = setup(30).await;
    let mut stg = connect(net.sites["STG"]).await;
    let cph_patient = net.data["CPH"]["patient"][3].clone();
    let query = format!(
        "SELECT pno, surname FROM patient WHERE pno = {}",
        cph_patient[0]
    );
    let global = net.global.take().unwrap();
    let (addr, tokens) = (global.addr.clone(), global.tokens.clone());
    global.stop().await.unwrap();
    let (rows, notices) = run(&mut stg, &query).await;
    assert_eq!(notices, vec![LOCAL_ONLY_NOTICE.to_string()]);
    assert!(rows.is_empty(), "STG does not hold CPH's patient yet");
    let db = net.dir.path().join("STG").join("local.db");
    assert_eq!(stat(&db, "local_only_answers"), 1);
    // The controller comes back on the same address: the next query fetches.
    let sock: std::net::SocketAddr = addr.trim_start_matches("http://").parse().unwrap();
    let global = LocalNetwork::start_at(
        net.network.clone(),
        net.store.clone(),
        BTreeMap::new(),
        sock,
        tokens,
    )
    .await
    .unwrap();
    net.global = Some(global);
    let (rows, notices) = run(&mut stg, &query).await;
    assert!(notices.is_empty(), "{notices:?}");
    assert_eq!(
        rows,
        as_text(vec![vec![cph_patient[0].clone(), cph_patient[3].clone()]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inside_a_client_transaction_fetched_tuples_are_seen_and_a_rollback_loses_nothing() {
    let net = setup(30).await;
    let oracle = oracle(&net, "STG");
    let mut stg = connect(net.sites["STG"]).await;
    let db = net.dir.path().join("STG").join("local.db");
    let names: Vec<String> = ["CPH", "GRC"]
        .iter()
        .flat_map(|c| net.data[*c]["patient"].iter().step_by(5).take(3))
        .map(|p| match &p[3] {
            Value::Text(s) => s.replace('\'', "''"),
            v => v.to_string(),
        })
        .collect();
    let query = |n: &str| format!("SELECT pno, surname, dob FROM patient WHERE surname = '{n}'");
    let check = |rows: &Vec<Vec<Option<String>>>, n: &str| {
        assert_eq!(*rows, as_text(oracle_rows(&oracle, &query(n))), "{n}");
    };

    // Autocommit off, as psycopg does: several fetches in one transaction.
    stg.client.simple_query("BEGIN").await.unwrap();
    for n in &names[..3] {
        let (rows, _) = run(&mut stg, &query(n)).await;
        check(&rows, n);
    }
    stg.client.simple_query("COMMIT").await.unwrap();
    let fetches = stat(&db, "global_fetches");
    for n in &names[..3] {
        let (rows, _) = run(&mut stg, &query(n)).await;
        check(&rows, n);
    }
    assert_eq!(
        stat(&db, "global_fetches"),
        fetches,
        "committed snapshots cover"
    );

    // A rolled-back transaction takes its snapshot with it; asking again
    // still gets every tuple (the controller had marked them sent).
    stg.client.simple_query("BEGIN").await.unwrap();
    let (rows, _) = run(&mut stg, &query(&names[3])).await;
    check(&rows, &names[3]);
    stg.client.simple_query("ROLLBACK").await.unwrap();
    let (rows, _) = run(&mut stg, &query(&names[3])).await;
    check(&rows, &names[3]);
    // And from another connection too.
    let mut other = connect(net.sites["STG"]).await;
    let (rows, _) = run(&mut other, &query(&names[4])).await;
    check(&rows, &names[4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_applications_own_tables_and_ddl_go_to_sqlite_unchanged() {
    let net = setup(10).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let (rows, _) = run(
        &mut cph,
        "CREATE TABLE films (id INTEGER PRIMARY KEY, img BLOB, note TEXT); \
         INSERT INTO films (img, note) VALUES (x'cafe', 'chest'), (NULL, 'knee'); \
         SELECT id, img, note, typeof(img) FROM films",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            vec![
                Some("1".into()),
                Some("\\xcafe".into()),
                Some("chest".into()),
                Some("blob".into())
            ],
            vec![
                Some("2".into()),
                None,
                Some("knee".into()),
                Some("null".into())
            ],
        ]
    );
    // Errors come back with PostgreSQL's SQLSTATE for SQLite's complaint.
    let err = cph
        .client
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    let err = cph
        .client
        .simple_query("INSERT INTO films (id) VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    // SELECT * on a mapped relation never shows the status column.
    let (rows, _) = run(&mut cph, "SELECT * FROM doctor LIMIT 1").await;
    let doctor = net
        .network
        .local_catalog(net.network.site("CPH").unwrap())
        .unwrap();
    assert_eq!(
        rows[0].len(),
        doctor.relation("doctor").unwrap().attributes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_failed_connect_queries_answer_locally_at_once_until_the_retry_time() {
    let mut net = setup(10).await;
    let global = net.global.take().unwrap();
    let (addr, tokens) = (global.addr.clone(), global.tokens.clone());
    global.stop().await.unwrap();
    let link = GlobalLink {
        addr: addr.clone(),
        fallbacks: Vec::new(),
        auth: snaps_local::remote::Auth::Insecure(tokens["STG"].clone()),
        compress: true,
        fetch_timeout: Duration::from_secs(5),
        retry_after: Duration::from_secs(3600),
    };
    let db = net.dir.path().join("STG").join("local.db");
    let site = Site::open(&db, &net.network.global_catalog().unwrap(), Some(link)).unwrap();
    let query = format!(
        "SELECT surname FROM patient WHERE pno = {}",
        net.data["CPH"]["patient"][0][0]
    );
    let ask = |site: Arc<Site>, query: String| async move {
        tokio::task::spawn_blocking(move || {
            let mut session = SiteEngine(site).open_session("radiology").unwrap();
            session.execute(&query).unwrap().notices
        })
        .await
        .unwrap()
    };
    assert_eq!(
        ask(site.clone(), query.clone()).await,
        vec![LOCAL_ONLY_NOTICE.to_string()]
    );
    // The controller is back, but this site waits out its retry time.
    let sock: std::net::SocketAddr = addr.trim_start_matches("http://").parse().unwrap();
    net.global = Some(
        LocalNetwork::start_at(
            net.network.clone(),
            net.store.clone(),
            BTreeMap::new(),
            sock,
            tokens,
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        ask(site, query.clone()).await,
        vec![LOCAL_ONLY_NOTICE.to_string()]
    );
    assert_eq!(stat(&db, "local_only_answers"), 2);
    assert_eq!(stat(&db, "global_fetches"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remembered_covered_read_is_judged_again_after_a_change_it_depends_on() {
    let net = setup(20).await;
    let site = net.handles["STG"].clone();
    let db = net.dir.path().join("STG").join("local.db");
    let mut stg = connect(net.sites["STG"]).await;
    let mut other = connect(net.sites["STG"]).await;
    // Three of CPH's patients STG holds nothing of yet.
    let cph = &net.data["CPH"]["patient"];
    let surname = |i: usize| match &cph[i][3] {
        Value::Text(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let pno = |i: usize| cph[i][0].to_string();
    let query = "SELECT v.description, p.surname FROM visit v, patient p \
                 WHERE v.pno = p.pno AND v.description = 'Cache check film'";
    let row = |i: usize| vec![Some("Cache check film".to_string()), surname(i)];
    // Visit numbers from STG's own range, unused.
    let new_vno = net.data["STG"]["visit"]
        .iter()
        .map(|v| common::int(&v[0]))
        .max()
        .unwrap();

    // Fetched, then found covered, then answered on that verdict.
    let (rows, _) = run(&mut stg, query).await;
    assert!(rows.is_empty(), "{rows:?}");
    let fetches = stat(&db, "global_fetches");
    let repeated = site.repeated_reads();
    run(&mut stg, query).await;
    assert_eq!(
        site.repeated_reads(),
        repeated,
        "the fetch stored a snapshot since"
    );
    let (rows, _) = run(&mut stg, query).await;
    assert!(rows.is_empty(), "{rows:?}");
    assert_eq!(stat(&db, "global_fetches"), fetches, "covered now");
    assert_eq!(
        site.repeated_reads(),
        repeated + 1,
        "answered as remembered"
    );

    // Another client records a visit of CPH's patient: the join now needs
    // that patient, which only the global snapshot has.
    let record = |vno: i64, patient: usize, description: &str| {
        format!(
            "INSERT INTO visit (vno, pno, date, description) \
             VALUES ({vno}, {}, 20261201, '{description}')",
            pno(patient)
        )
    };
    run(&mut other, &record(new_vno + 1, 2, "Cache check film")).await;
    let (rows, _) = run(&mut stg, query).await;
    assert_eq!(
        rows,
        vec![row(2)],
        "the other client's visit joins its patient"
    );
    assert_eq!(stat(&db, "global_fetches"), fetches + 1);
    assert_eq!(site.repeated_reads(), repeated + 1, "judged again");

    // The same session records a visit of another CPH patient, then gives
    // it the description the query asks for.
    run(&mut stg, &record(new_vno + 2, 5, "Other film")).await;
    run(&mut stg, query).await;
    let repeated = site.repeated_reads();
    let (rows, _) = run(&mut stg, query).await;
    assert_eq!(rows, vec![row(2)]);
    assert_eq!(site.repeated_reads(), repeated + 1);
    let fetches = stat(&db, "global_fetches");
    run(
        &mut stg,
        &format!(
            "UPDATE visit SET description = 'Cache check film' WHERE vno = {}",
            new_vno + 2
        ),
    )
    .await;
    let (rows, _) = run(&mut stg, query).await;
    let mut expected = vec![row(2), row(5)];
    expected.sort();
    assert_eq!(rows, expected, "the session's own change is seen");
    // Two fetches: the UPDATE reads what it writes as `SELECT * FROM visit
    // WHERE vno = ...` would (a new visit is not in the global snapshot yet,
    // so another site's tuple could share its key), and the query's join.
    assert_eq!(stat(&db, "global_fetches"), fetches + 2);

    // A program writing to the site's file directly records a third.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "INSERT INTO visit (vno, pno, date, description) \
             VALUES (?1, ?2, 20261201, 'Cache check film')",
            rusqlite::params![new_vno + 3, common::int(&cph[8][0])],
        )
        .unwrap();
    let (rows, _) = run(&mut stg, query).await;
    let mut expected = vec![row(2), row(5), row(8)];
    expected.sort();
    assert_eq!(rows, expected);
    assert_eq!(stat(&db, "global_fetches"), fetches + 3);

    // With nothing changed since, the verdict is remembered again.
    let repeated = site.repeated_reads();
    run(&mut stg, query).await;
    let (rows, _) = run(&mut stg, query).await;
    assert_eq!(rows, expected);
    assert_eq!(site.repeated_reads(), repeated + 1);
    assert_eq!(stat(&db, "global_fetches"), fetches + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lookup_by_a_key_the_site_holds_needs_no_fetch() {
    let net = setup(20).await;
    let db = net.dir.path().join("STG").join("local.db");
    let mut stg = connect(net.sites["STG"]).await;
    let by_no = |pno: &Value| format!("SELECT pno, surname FROM patient WHERE pno = {pno}");
    let surname = |p: &[Value]| match &p[3] {
        Value::Text(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let fetches = stat(&db, "global_fetches");

    // STG's own exported patient: keys are unique in the global snapshot,
    // so the one tuple with this number is the one STG holds.
    let own = net.data["STG"]["patient"][4].clone();
    let (rows, notices) = run(&mut stg, &by_no(&own[0])).await;
    assert!(notices.is_empty(), "{notices:?}");
    assert_eq!(rows, vec![vec![Some(own[0].to_string()), surname(&own)]]);
    assert_eq!(stat(&db, "global_fetches"), fetches, "answered at STG");
    let explain = run(&mut stg, &format!("EXPLAIN SNAPS {}", by_no(&own[0])))
        .await
        .0;
    assert!(
        explain
            .iter()
            .flatten()
            .flatten()
            .any(|l| l.contains("holds the tuple with the key")),
        "{explain:?}"
    );
    // With another condition too; and in QUEL.
    run(
        &mut stg,
        &format!("SELECT dob FROM patient WHERE pno = {} AND dob > 0", own[0]),
    )
    .await;
    run(
        &mut stg,
        &format!(
            "range of p is patient\nretrieve (p.surname) where p.pno = {}",
            own[0]
        ),
    )
    .await;
    assert_eq!(stat(&db, "global_fetches"), fetches);

    // A CPH patient STG does not hold is asked for, once; then it is held.
    let cph = net.data["CPH"]["patient"][6].clone();
    let (rows, _) = run(&mut stg, &by_no(&cph[0])).await;
    assert_eq!(rows, vec![vec![Some(cph[0].to_string()), surname(&cph)]]);
    assert_eq!(stat(&db, "global_fetches"), fetches + 1);
    let (rows, _) = run(
        &mut stg,
        &format!(
            "SELECT surname FROM patient WHERE pno = {} AND surname IS NOT NULL",
            cph[0]
        ),
    )
    .await;
    assert_eq!(rows, vec![vec![surname(&cph)]]);
    assert_eq!(stat(&db, "global_fetches"), fetches + 1, "the copy is held");

    // A patient inserted here is not in the global snapshot yet, where
    // another site's tuple may hold the number: asked for.
    let new_pno = common::patients(&net, "STG").into_iter().max().unwrap() + 1;
    run(
        &mut stg,
        &format!("INSERT INTO patient (pno, surname) VALUES ({new_pno}, 'Newly')"),
    )
    .await;
    let (rows, _) = run(
        &mut stg,
        &format!("SELECT surname FROM patient WHERE pno = {new_pno}"),
    )
    .await;
    assert_eq!(rows, vec![vec![Some("Newly".to_string())]]);
    assert_eq!(stat(&db, "global_fetches"), fetches + 2);

    // A join still asks: other sites may record visits of STG's patient.
    run(
        &mut stg,
        &format!(
            "SELECT v.vno FROM patient p, visit v WHERE p.pno = v.pno AND p.pno = {}",
            own[0]
        ),
    )
    .await;
    assert_eq!(stat(&db, "global_fetches"), fetches + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_its_controller_gone_a_site_fetches_through_another_on_the_same_store() {
    let mut net = common::setup_on_postgres(10, |_| {}).await;
    let first = net.global.take().unwrap();
    // A second controller on the same PostgreSQL store, same credentials.
    let second = LocalNetwork::start_with(
        net.network.clone(),
        net.location.clone(),
        snaps::localnet::Options {
            tokens: first.tokens.clone(),
            admin: first.admin.clone(),
            ..snaps::localnet::Options::new(&net.network)
        },
    )
    .await
    .unwrap();
    let link = GlobalLink {
        addr: first.addr.clone(),
        fallbacks: vec![second.addr.clone()],
        auth: snaps_local::remote::Auth::Insecure(first.tokens["STG"].clone()),
        compress: true,
        fetch_timeout: Duration::from_secs(5),
        retry_after: Duration::ZERO,
    };
    let db = net.dir.path().join("STG").join("local.db");
    let site = Site::open(&db, &net.network.global_catalog().unwrap(), Some(link)).unwrap();
    let ask = |site: Arc<Site>, pno: String| async move {
        tokio::task::spawn_blocking(move || {
            let mut session = SiteEngine(site).open_session("radiology").unwrap();
            let out = session
                .execute(&format!("SELECT surname FROM patient WHERE pno = {pno}"))
                .unwrap();
            let rows = match &out.outcomes[..] {
                [snaps_local::engine::Outcome::Rows { rows, .. }] => rows.len(),
                other => panic!("{other:?}"),
            };
            (rows, out.notices)
        })
        .await
        .unwrap()
    };
    let cph = &net.data["CPH"]["patient"];
    assert_eq!(ask(site.clone(), cph[0][0].to_string()).await, (1, vec![]));
    first.kill();
    // The query that meets the lost connection answers from local data
    // and says so (whether the dead controller recorded a copy is unknown);
    // the next connects to the second controller.
    let lost = ask(site.clone(), cph[1][0].to_string()).await;
    assert!(
        lost == (0, vec![LOCAL_ONLY_NOTICE.to_string()]) || lost == (1, vec![]),
        "{lost:?}"
    );
    // Another patient not held yet: it can only come from the second
    // controller, which sees what the first one recorded.
    assert_eq!(ask(site.clone(), cph[2][0].to_string()).await, (1, vec![]));
    assert_eq!(ask(site.clone(), cph[0][0].to_string()).await, (1, vec![]));
    assert!(stat(&db, "global_fetches") >= 2);
    second.stop().await.unwrap();
}
