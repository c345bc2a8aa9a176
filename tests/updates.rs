//! The update path end to end (DESIGN.md, "Updates"): three radiology sites
//! with generated data in front of a real global controller, driven through
//! a PostgreSQL driver in SQL and QUEL, and one program writing to a site's
//! SQLite file directly. Patient details are read-write for every site
//! holding them (under the primary-copy lock); visits and reports are
//! read-only for every site but the owner.

mod common;

use common::{Client, Net, connect, db, int, one, patients, refused, run, setup, stat};
use snaps_schema::{LocalRights, LocalStatus, TupleType};

/// The number of tuples a statement changed, from its command tag.
async fn changed(c: &Client, text: &str) -> u64 {
    let messages = c
        .client
        .simple_query(text)
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{text}: no command tag"))
}

/// The appendix-A status of a tuple in a site's file.
fn status(net: &Net, code: &str, relation: &str, key: &str, value: i64) -> LocalStatus {
    let conn = rusqlite::Connection::open(db(net, code)).unwrap();
    let byte: i64 = conn
        .query_row(
            &format!("SELECT snaps_status FROM {relation} WHERE {key} = ?1"),
            [value],
            |r| r.get(0),
        )
        .unwrap_or_else(|e| panic!("{code} {relation} {key}={value}: {e}"));
    LocalStatus::from_byte(byte as u8)
}

/// A count in a site's file.
fn count(net: &Net, code: &str, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db(net, code)).unwrap();
    conn.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{code}: {sql}: {e}"))
}

/// A visit of `code`'s (vno, pno).
fn visit(net: &Net, code: &str) -> (i64, i64) {
    let v = &net.data[code]["visit"][0];
    (int(&v[0]), int(&v[1]))
}

/// STG with copies of two GRC patients, holding the lock on one of them.
struct Scene {
    stg: Client,
    /// The GRC patient STG holds the lock on.
    held: i64,
    /// The GRC patient STG holds a copy of, without the lock.
    other: i64,
    /// An exported patient of STG's own.
    mine: i64,
    /// An exported visit of STG's own.
    own_visit: i64,
}

async fn stg_holding_a_lock(net: &Net) -> Scene {
    let grc = patients(net, "GRC");
    let (held, other) = (grc[0], grc[1]);
    let mut stg = connect(net.sites["STG"]).await;
    run(
        &mut stg,
        &format!("SELECT * FROM patient WHERE pno IN ({held}, {other})"),
    )
    .await;
    let text = format!("UPDATE patient SET add3 = 'locked' WHERE pno = {held}");
    assert_eq!(changed(&stg, &text).await, 1);
    Scene {
        stg,
        held,
        other,
        mine: patients(net, "STG")[0],
        own_visit: visit(net, "STG").0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_conflict_names_the_holder_and_the_holder_does_not_ask_again() {
    let net = setup(30).await;
    let g = patients(&net, "GRC")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let lookup = format!("SELECT add1 FROM patient WHERE pno = {g}");
    let original = one(&mut stg, &lookup).await;
    assert_eq!(one(&mut cph, &lookup).await, original);

    // STG locks GRC's patient by changing it.
    let update = format!("UPDATE patient SET add1 = '1 Lock Lane' WHERE pno = {g}");
    assert_eq!(changed(&stg, &update).await, 1);
    assert_eq!(stat(&db(&net, "STG"), "locks_granted"), 1);
    let s = status(&net, "STG", "patient", "pno", g);
    assert_eq!(s.tuple_type, TupleType::Snapshot);
    assert_eq!(s.rights, LocalRights::ReadWrite);
    assert!(s.modified, "the change is pushed at the refresh");

    // CPH's update of the same patient fails, naming STG, and changes nothing.
    let (code, message) = refused(
        &cph,
        &format!("UPDATE patient SET add1 = 'Elsewhere' WHERE pno = {g}"),
    )
    .await;
    assert_eq!(code, "55P03", "{message}");
    assert!(message.contains("locked by site STG"), "{message}");
    assert!(message.contains(&format!("pno={g}")), "{message}");
    assert_eq!(one(&mut cph, &lookup).await, original);
    assert_eq!(
        status(&net, "CPH", "patient", "pno", g).rights,
        LocalRights::ReadOnly
    );
    assert_eq!(stat(&db(&net, "CPH"), "locks_refused"), 1);

    // STG's second update, in QUEL, needs no new lock.
    run(
        &mut stg,
        &format!("range of p is patient\nreplace p (add1 = \"2 Lock Lane\") where p.pno = {g}"),
    )
    .await;
    assert_eq!(one(&mut stg, &lookup).await.as_deref(), Some("2 Lock Lane"));
    assert_eq!(stat(&db(&net, "STG"), "locks_granted"), 1);
    // The global controller saw one lock request from STG and one from CPH.
    let status = net
        .global
        .as_ref()
        .unwrap()
        .client("STG")
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    let site = |c: &str| status.sites.iter().find(|s| s.code == c).unwrap().clone();
    assert_eq!(
        (site("STG").locks_granted, site("STG").locks_refused),
        (1, 0)
    );
    assert_eq!(
        (site("CPH").locks_granted, site("CPH").locks_refused),
        (0, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_read_only_relations_are_refused_naming_the_owner() {
    let net = setup(30).await;
    let (vno, pno) = visit(&net, "GRC");
    let mut stg = connect(net.sites["STG"]).await;
    let lookup = format!("SELECT description FROM visit WHERE vno = {vno}");
    let (rows, _) = run(
        &mut stg,
        &format!("SELECT vno FROM visit WHERE pno = {pno}"),
    )
    .await;
    assert!(rows.contains(&vec![Some(vno.to_string())]), "{rows:?}");
    let original = one(&mut stg, &lookup).await;

    for text in [
        format!("UPDATE visit SET description = 'Edited' WHERE vno = {vno}"),
        format!("range of v is visit\nreplace v (description = \"Edited\") where v.vno = {vno}"),
        format!("DELETE FROM visit WHERE vno = {vno}"),
        format!("range of v is visit\ndelete v where v.vno = {vno}"),
    ] {
        let (code, message) = refused(&stg, &text).await;
        assert_eq!(code, "42501", "{text}: {message}");
        assert!(message.contains("owned by site GRC"), "{text}: {message}");
        assert!(
            message.contains(&format!("visit (vno, pno)=({vno}, {pno})")),
            "{text}: {message}"
        );
    }
    assert_eq!(one(&mut stg, &lookup).await, original);

    // STG's own visit: changed without a lock, marked modified.
    let (own, _) = visit(&net, "STG");
    let text = format!("UPDATE visit SET description = 'Revised' WHERE vno = {own}");
    assert_eq!(changed(&stg, &text).await, 1);
    assert_eq!(stat(&db(&net, "STG"), "locks_granted"), 0);
    let s = status(&net, "STG", "visit", "vno", own);
    assert!(s.modified && !s.new && s.tuple_type == TupleType::Local);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_of_several_tuples_takes_every_lock_or_changes_nothing() {
    let net = setup(30).await;
    let own = patients(&net, "CPH");
    let (c1, c2) = (own[0], own[1]);
    let mut stg = connect(net.sites["STG"]).await;
    let mut grc = connect(net.sites["GRC"]).await;
    let mut cph = connect(net.sites["CPH"]).await;
    run(&mut stg, &format!("SELECT * FROM patient WHERE pno = {c1}")).await;
    run(&mut grc, &format!("SELECT * FROM patient WHERE pno = {c2}")).await;
    let both = format!("SELECT pno, add2 FROM patient WHERE pno IN ({c1}, {c2})");
    let (before, _) = run(&mut cph, &both).await;

    let text = format!("UPDATE patient SET add2 = 'STG ward' WHERE pno = {c1}");
    assert_eq!(changed(&stg, &text).await, 1);
    // CPH's own two patients: one is locked by STG, so neither changes.
    let (code, message) = refused(
        &cph,
        &format!("UPDATE patient SET add2 = 'both' WHERE pno IN ({c1}, {c2})"),
    )
    .await;
    assert_eq!(code, "55P03", "{message}");
    assert!(message.contains("locked by site STG"), "{message}");
    assert_eq!(run(&mut cph, &both).await.0, before);
    // CPH was granted nothing: GRC can lock the other one now.
    let text = format!("UPDATE patient SET add2 = 'GRC ward' WHERE pno = {c2}");
    assert_eq!(changed(&grc, &text).await, 1);
    let (code, message) = refused(
        &cph,
        &format!("UPDATE patient SET add2 = 'mine' WHERE pno = {c2}"),
    )
    .await;
    assert_eq!(code, "55P03");
    assert!(message.contains("locked by site GRC"), "{message}");
    assert_eq!(stat(&db(&net, "CPH"), "locks_granted"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_global_controller_no_lock_can_be_had() {
    let mut net = setup(30).await;
    let Scene {
        mut stg,
        held,
        other,
        mine,
        own_visit,
    } = stg_holding_a_lock(&net).await;
    net.global.take().unwrap().stop().await.unwrap();

    let lookup = format!("SELECT add3 FROM patient WHERE pno = {other}");
    let original = one(&mut stg, &lookup).await;
    for pno in [other, mine] {
        let (code, message) = refused(
            &stg,
            &format!("UPDATE patient SET add3 = 'offline' WHERE pno = {pno}"),
        )
        .await;
        assert_eq!(code, "08006", "{message}");
        assert!(
            message.contains("primary-copy lock") && message.contains("unreachable"),
            "{message}"
        );
    }
    assert_eq!(one(&mut stg, &lookup).await, original);
    // A lock already held, and the site's own tuples of a relation read-only
    // for the others, need nobody.
    let text = format!("UPDATE patient SET add3 = 'offline' WHERE pno = {held}");
    assert_eq!(changed(&stg, &text).await, 1);
    let text = format!("UPDATE visit SET description = 'offline' WHERE vno = {own_visit}");
    let (_, notices) = run(&mut stg, &text).await;
    assert!(
        notices
            .iter()
            .any(|n| n.contains("applies to the tuples this site holds")),
        "the write applied to what the site holds, and says so: {notices:?}"
    );
    assert_eq!(
        one(
            &mut stg,
            &format!("SELECT description FROM visit WHERE vno = {own_visit}")
        )
        .await
        .as_deref(),
        Some("offline")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inserts_take_keys_from_the_site_range_and_a_key_owned_elsewhere_is_refused() {
    let mut net = setup(30).await;
    let taken = patients(&net, "CPH")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let range = 10_000_000..=19_999_999;

    let next: i64 = one(&mut stg, "SELECT snaps_next_key('patient')")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(range.contains(&next), "{next}");

    let (code, message) = refused(
        &stg,
        &format!(
            "INSERT INTO patient (pno, surname, first_names, dob, sex) \
             VALUES ({taken}, 'Double', 'Dora', 19500101, 'F')"
        ),
    )
    .await;
    assert_eq!(code, "23505", "{message}");
    assert!(
        message.contains(&format!("pno={taken}")) && message.contains("owned by site CPH"),
        "{message}"
    );
    assert_eq!(
        count(
            &net,
            "STG",
            &format!("SELECT count(*) FROM patient WHERE pno = {taken}")
        ),
        0
    );

    // No key given: one from STG's range, above every key STG holds there.
    let text = "INSERT INTO patient (surname, first_names, dob, sex) \
                VALUES ('Newman', 'Ada', 19800101, 'F'), ('Newman', 'Bea', 19810101, 'F')";
    assert_eq!(changed(&stg, text).await, 2);
    let (rows, _) = run(
        &mut stg,
        "SELECT pno FROM patient WHERE surname = 'Newman' ORDER BY pno",
    )
    .await;
    let keys: Vec<i64> = rows
        .iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| range.contains(k)), "{keys:?}");
    assert_ne!(keys[0], keys[1]);
    let s = status(&net, "STG", "patient", "pno", keys[0]);
    assert!(s.new && s.tuple_type == TupleType::Local);
    // QUEL append, the same way.
    run(
        &mut stg,
        "append to patient (surname = \"Newer\", first_names = \"Cy\", dob = 19900101)",
    )
    .await;
    let quel: i64 = one(&mut stg, "SELECT pno FROM patient WHERE surname = 'Newer'")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(range.contains(&quel) && quel > keys[1], "{quel}");

    // Offline the insert is accepted; the refresh checks its key.
    net.global.take().unwrap().stop().await.unwrap();
    let other = patients(&net, "CPH")[1];
    let (_, notices) = run(
        &mut stg,
        &format!("INSERT INTO patient (pno, surname) VALUES ({other}, 'Offline')"),
    )
    .await;
    assert!(
        notices
            .iter()
            .any(|n| n.contains("checked at the next refresh")),
        "{notices:?}"
    );
    assert_eq!(
        count(
            &net,
            "STG",
            &format!("SELECT count(*) FROM patient WHERE pno = {other}")
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changing_a_copys_own_attribute_pins_it_without_a_lock() {
    let net = setup(30).await;
    let g = patients(&net, "GRC")[0];
    let mut stg = connect(net.sites["STG"]).await;
    run(&mut stg, &format!("SELECT * FROM patient WHERE pno = {g}")).await;
    // STG does not map race: it is STG's own attribute of the copy.
    let text = format!("UPDATE patient SET race = 'Maor' WHERE pno = {g}");
    assert_eq!(changed(&stg, &text).await, 1);
    assert_eq!(stat(&db(&net, "STG"), "locks_granted"), 0);
    assert_eq!(
        count(
            &net,
            "STG",
            &format!(
                "SELECT count(*) FROM snaps_pinned WHERE relation = 'patient' AND tuple_rowid = {g}"
            )
        ),
        1
    );
    let s = status(&net, "STG", "patient", "pno", g);
    assert!(!s.modified, "nothing the global snapshot holds changed");
    assert_eq!(s.rights, LocalRights::Unknown);
    assert_eq!(
        one(
            &mut stg,
            &format!("SELECT race FROM patient WHERE pno = {g}")
        )
        .await
        .as_deref(),
        Some("Maor")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_hides_the_tuple_at_once_and_is_kept_for_the_refresh() {
    let net = setup(30).await;
    let gone = patients(&net, "STG")[0];
    let (own_visit, _) = visit(&net, "STG");
    let mut stg = connect(net.sites["STG"]).await;

    assert_eq!(
        changed(&stg, &format!("DELETE FROM patient WHERE pno = {gone}")).await,
        1
    );
    assert_eq!(
        one(
            &mut stg,
            &format!("SELECT count(*) FROM patient WHERE pno = {gone}")
        )
        .await
        .as_deref(),
        Some("0")
    );
    // Other sites may hold it: the delete needed the lock and waits for the
    // refresh, marked deleted.
    assert_eq!(stat(&db(&net, "STG"), "locks_granted"), 1);
    let byte = count(
        &net,
        "STG",
        &format!("SELECT status FROM snaps_deleted WHERE relation = 'patient' AND origin = {gone}"),
    );
    assert_eq!(
        LocalStatus::from_byte(byte as u8).rights,
        LocalRights::Deleted
    );

    // A relation read-only for others: the owner deletes without a lock (QUEL).
    run(
        &mut stg,
        &format!("range of v is visit\ndelete v where v.vno = {own_visit}"),
    )
    .await;
    assert_eq!(
        count(
            &net,
            "STG",
            &format!("SELECT count(*) FROM visit WHERE vno = {own_visit}")
        ),
        0
    );
    assert_eq!(
        count(
            &net,
            "STG",
            "SELECT count(*) FROM snaps_deleted WHERE relation = 'visit'"
        ),
        1
    );
    assert_eq!(stat(&db(&net, "STG"), "locks_granted"), 1);

    // A tuple never exported simply goes.
    run(&mut stg, "INSERT INTO patient (surname) VALUES ('Brief')").await;
    let brief: i64 = one(&mut stg, "SELECT pno FROM patient WHERE surname = 'Brief'")
        .await
        .unwrap()
        .parse()
        .unwrap();
    run(
        &mut stg,
        &format!("DELETE FROM patient WHERE pno = {brief}"),
    )
    .await;
    assert_eq!(
        count(
            &net,
            "STG",
            &format!("SELECT count(*) FROM snaps_deleted WHERE origin = {brief}")
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_program_writing_to_the_file_directly_meets_the_same_rules() {
    let net = setup(30).await;
    let Scene {
        mut stg,
        held,
        other,
        mine,
        own_visit,
    } = stg_holding_a_lock(&net).await;

    let app = rusqlite::Connection::open(db(&net, "STG")).unwrap();
    let refuse = |sql: String, why: &str| {
        let e = app
            .execute(&sql, [])
            .expect_err(&format!("{sql} should be refused"));
        assert!(e.to_string().contains(why), "{sql}: {e}");
    };
    refuse(
        format!("UPDATE patient SET surname = 'Direct' WHERE pno = {other}"),
        "patient: this tuple is a copy of a tuple another site owns",
    );
    refuse(
        format!("DELETE FROM patient WHERE pno = {other}"),
        "only its owner deletes it",
    );
    refuse(
        format!("UPDATE patient SET surname = 'Direct' WHERE pno = {mine}"),
        "needs the primary-copy lock",
    );
    refuse(
        format!("UPDATE visit SET vno = vno + 1000000 WHERE vno = {own_visit}"),
        "the key of a tuple the global snapshot holds cannot change",
    );
    // Allowed: the copy STG holds the lock on, a copy's own attribute (pins
    // it), STG's own visit (read-only for the others).
    app.execute(
        &format!("UPDATE patient SET surname = 'Direct' WHERE pno = {held}"),
        [],
    )
    .unwrap();
    app.execute(
        &format!("UPDATE patient SET race = 'Euro' WHERE pno = {other}"),
        [],
    )
    .unwrap();
    app.execute(
        &format!("UPDATE visit SET description = 'Direct' WHERE vno = {own_visit}"),
        [],
    )
    .unwrap();
    assert!(status(&net, "STG", "visit", "vno", own_visit).modified);
    assert_eq!(
        count(
            &net,
            "STG",
            &format!("SELECT count(*) FROM snaps_pinned WHERE tuple_rowid = {other}")
        ),
        1
    );
    app.execute(&format!("DELETE FROM visit WHERE vno = {own_visit}"), [])
        .unwrap();
    assert_eq!(
        count(
            &net,
            "STG",
            "SELECT count(*) FROM snaps_deleted WHERE relation = 'visit'"
        ),
        1
    );
    // Nothing refused changed anything.
    let (rows, _) = run(
        &mut stg,
        &format!("SELECT pno FROM patient WHERE pno IN ({other}, {mine}) AND surname = 'Direct'"),
    )
    .await;
    assert!(rows.is_empty(), "{rows:?}");
}

/// Many concurrent UPDATEs from every site on a small hot set of patients
/// (owned by all three sites, held by all three): no tuple ever has two
/// lock holders, no statement is half applied, and every refused statement
/// names the site holding the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 6)]
async fn concurrent_updates_on_a_hot_set_never_share_a_lock_nor_half_apply() {
    const CLIENTS_PER_SITE: usize = 3;
    const STATEMENTS: usize = 12;
    let net = setup(30).await;
    let mut hot: Vec<i64> = Vec::new();
    for code in ["CPH", "STG", "GRC"] {
        hot.extend(patients(&net, code).into_iter().take(2));
    }
    let list = hot
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // Every site holds every hot patient: its own, and copies of the others.
    let dob = |code: &str| -> std::collections::BTreeMap<i64, i64> {
        let conn = rusqlite::Connection::open(db(&net, code)).unwrap();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT pno, dob FROM patient WHERE pno IN ({list})"
            ))
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    let mut before = std::collections::BTreeMap::new();
    for code in ["CPH", "STG", "GRC"] {
        let mut c = connect(net.sites[code]).await;
        let (rows, _) = run(
            &mut c,
            &format!("SELECT pno FROM patient WHERE pno IN ({list})"),
        )
        .await;
        assert_eq!(rows.len(), hot.len(), "{code}");
        before.insert(code, dob(code));
    }

    // Each statement moves the birth dates of two hot patients by one day.
    let mut tasks = Vec::new();
    for (si, code) in ["CPH", "STG", "GRC"].into_iter().enumerate() {
        for ci in 0..CLIENTS_PER_SITE {
            let addr = net.sites[code];
            let hot = hot.clone();
            tasks.push(tokio::spawn(async move {
                let c = connect(addr).await;
                let mut seed = (si * 31 + ci * 7 + 1) as u64;
                let mut done = Vec::new();
                for _ in 0..STATEMENTS {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let a = (seed >> 33) as usize % hot.len();
                    let b = (a + 1 + (seed >> 45) as usize % (hot.len() - 1)) % hot.len();
                    let pair = (hot[a], hot[b]);
                    let text = format!(
                        "UPDATE patient SET dob = dob + 1 WHERE pno IN ({}, {})",
                        pair.0, pair.1
                    );
                    let outcome = match c.client.simple_query(&text).await {
                        Ok(_) => Ok(()),
                        Err(e) => {
                            let db = e.as_db_error().expect("a database error");
                            Err((db.code().code().to_string(), db.message().to_string()))
                        }
                    };
                    done.push((pair, outcome));
                }
                (code, done)
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }

    // The global controller's lock holders, by patient number.
    let global = rusqlite::Connection::open(&net.store).unwrap();
    let holder = |pno: i64| -> Option<String> {
        let site: Option<i64> = global
            .query_row(
                "SELECT snaps_lock_site FROM patient WHERE pno = ?1",
                [pno],
                |r| r.get(0),
            )
            .unwrap();
        site.map(|n| {
            net.network
                .sites
                .iter()
                .find(|s| i64::from(s.number.0) == n)
                .unwrap()
                .code
                .to_string()
        })
    };
    let mut applied: std::collections::BTreeMap<(&str, i64), i64> = Default::default();
    let mut refusals = 0;
    for (code, done) in &results {
        for ((a, b), outcome) in done {
            match outcome {
                Ok(()) => {
                    for p in [a, b] {
                        *applied.entry((code, *p)).or_default() += 1;
                        // Only the lock holder ever changes a tuple.
                        assert_eq!(holder(*p).as_deref(), Some(*code), "pno {p}");
                    }
                }
                Err((state, message)) => {
                    refusals += 1;
                    assert_eq!(state, "55P03", "{code}: {message}");
                    let named: Vec<String> = [a, b].iter().filter_map(|p| holder(**p)).collect();
                    assert!(
                        named
                            .iter()
                            .any(|h| h != code && message.contains(&format!("locked by site {h}"))),
                        "{code} ({a}, {b}): {message}; holders {named:?}"
                    );
                }
            }
        }
    }
    assert!(refusals > 0, "the hot set should have produced conflicts");
    assert!(!applied.is_empty(), "some statements should have succeeded");
    for code in ["CPH", "STG", "GRC"] {
        let after = dob(code);
        for p in &hot {
            // Every successful statement moved both its tuples; a refused
            // one moved neither.
            let n = applied.get(&(code, *p)).copied().unwrap_or(0);
            assert_eq!(after[p] - before[code][p], n, "{code} pno {p}");
            // A site with rights read-write on a tuple is its lock holder.
            let rights = status(&net, code, "patient", "pno", *p).rights;
            if rights == LocalRights::ReadWrite {
                assert_eq!(holder(*p).as_deref(), Some(code), "{code} pno {p}");
            }
        }
    }
}

/// A surname registered at every site of the network.
fn surname_everywhere(net: &Net) -> String {
    let names = |code: &str| -> std::collections::BTreeSet<String> {
        net.data[code]["patient"]
            .iter()
            .filter_map(|r| match &r[3] {
                snaps_schema::Value::Text(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    };
    let (c, s, g) = (names("CPH"), names("STG"), names("GRC"));
    c.iter()
        .find(|n| s.contains(*n) && g.contains(*n) && !n.contains('\''))
        .cloned()
        .expect("a surname at all three sites")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_reaches_every_tuple_the_same_select_shows() {
    let net = setup(30).await;
    let grc = patients(&net, "GRC");
    let mut stg = connect(net.sites["STG"]).await;

    // A copy STG never read: the UPDATE brings it as the SELECT would, and
    // changes it under its lock.
    let text = format!(
        "UPDATE patient SET add1 = '1 Test St' WHERE pno = {}",
        grc[0]
    );
    assert_eq!(changed(&stg, &text).await, 1);
    assert_eq!(
        one(
            &mut stg,
            &format!("SELECT add1 FROM patient WHERE pno = {}", grc[0])
        )
        .await
        .as_deref(),
        Some("1 Test St")
    );
    // The same in QUEL.
    let text = format!(
        "range of p is patient\nreplace p (add1 = \"2 Quel St\") where p.pno = {}",
        grc[1]
    );
    assert_eq!(changed(&stg, &text).await, 1);

    // A condition on a non-key attribute that holds at all three sites: the
    // UPDATE changes as many tuples as the SELECT then shows, all of them.
    let surname = surname_everywhere(&net);
    let text = format!("UPDATE patient SET add3 = 'Seen' WHERE surname = '{surname}'");
    let n = changed(&stg, &text).await;
    let (rows, _) = run(
        &mut stg,
        &format!("SELECT pno, add3 FROM patient WHERE surname = '{surname}'"),
    )
    .await;
    assert_eq!(n as usize, rows.len(), "{rows:?}");
    assert!(
        rows.iter().all(|r| r[1].as_deref() == Some("Seen")),
        "{rows:?}"
    );
    let sites: std::collections::BTreeSet<i64> = rows
        .iter()
        .map(|r| r[0].as_deref().unwrap().parse::<i64>().unwrap() / 10_000_000)
        .collect();
    assert_eq!(sites.len(), 3, "patients of all three sites: {rows:?}");

    // The other sites see it after the night, as any change under lock.
    net.refresh().await;
    let mut cph = connect(net.sites["CPH"]).await;
    let (rows, _) = run(
        &mut cph,
        &format!("SELECT add3 FROM patient WHERE surname = '{surname}'"),
    )
    .await;
    assert_eq!(rows.len(), n as usize);
    assert!(
        rows.iter().all(|r| r[0].as_deref() == Some("Seen")),
        "{rows:?}"
    );
}
