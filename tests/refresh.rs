//! The nightly refresh end to end (DESIGN.md, "The nightly refresh"): three
//! radiology sites following the epochs of a real global controller over
//! their Subscribe streams, changed through their SQL endpoints, refreshed
//! through the administrator's interface.

mod common;

use common::{Net, connect, db, one, patients, refused, run, setup, stat};
use snaps_schema::{LocalRights, LocalStatus, TupleType};

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

/// Whether the global controller counts site `site` as holding patient `pno`.
fn sent_to(net: &Net, pno: i64, site: u32) -> bool {
    let global = rusqlite::Connection::open(&net.store).unwrap();
    let bits: Vec<u8> = global
        .query_row(
            &format!("SELECT snaps_sent_to FROM patient WHERE pno = {pno}"),
            [],
            |r| r.get(0),
        )
        .unwrap();
    snaps_schema::SentTo::from_bytes(&bits).contains(snaps_schema::SiteNo(site))
}

/// Waits until the latest epoch is closed in the global store.
async fn wait_closed(net: &Net, epoch: u64) {
    for _ in 0..600 {
        let phase = global_value(
            net,
            &format!(
                "SELECT coalesce((SELECT phase FROM snaps_epochs WHERE epoch = {epoch}), 'none')"
            ),
        );
        if phase.as_deref() == Some("closed") {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("epoch {epoch} did not close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_an_epoch_collects_queries_answer_locally_and_writes_wait() {
    let reached = std::sync::Arc::new(tokio::sync::Notify::new());
    let halt = snaps_global::epochs::Halt {
        at: snaps_global::epochs::HaltPoint::Collecting,
        reached: reached.clone(),
    };
    let mut net = common::setup_with(30, |o| o.halt = Some(halt)).await;
    let g = patients(&net, "GRC")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let admin = net.global.as_ref().unwrap().admin_client().await.unwrap();
    let refresh = tokio::spawn(async move {
        let mut p = admin.run_refresh().await.unwrap();
        while p.message().await.ok().flatten().is_some() {}
    });
    reached.notified().await;
    // The controller stopped at the first push; wait for STG's.
    let meta = rusqlite::Connection::open(db(&net, "STG")).unwrap();
    for _ in 0..200 {
        let pushed: Option<String> = meta
            .query_row(
                "SELECT value FROM snaps_meta WHERE key = 'refresh_pushed'",
                [],
                |r| r.get(0),
            )
            .ok();
        if pushed.as_deref() == Some("1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // A site that has pushed holds its shared data still; a query that
    // would fetch is answered from local data with a notice.
    let (rows, notices) = run(&mut stg, &format!("SELECT * FROM patient WHERE pno = {g}")).await;
    assert!(rows.is_empty());
    assert!(
        notices
            .iter()
            .any(|n| n.contains("refresh of the global snapshot is in progress")),
        "{notices:?}"
    );
    let mine = patients(&net, "STG")[0];
    let (code, message) = refused(
        &stg,
        &format!("UPDATE visit SET description = 'x' WHERE pno = {mine}"),
    )
    .await;
    assert_eq!(code, "55006", "{message}");
    assert!(
        message.contains("refresh epoch 1 is under way"),
        "{message}"
    );
    // A program writing to the file directly waits too.
    let app = rusqlite::Connection::open(db(&net, "STG")).unwrap();
    let e = app
        .execute("UPDATE patient SET surname = 'x' WHERE pno = ?1", [mine])
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("refresh of the global snapshot is in progress"),
        "{e}"
    );

    // The controller crashes here; restarted, it finishes the epoch and the
    // site may write again.
    refresh.abort();
    net.restart_global(None).await;
    wait_closed(&net, 1).await;
    for _ in 0..100 {
        if stg
            .client
            .simple_query(&format!(
                "UPDATE visit SET description = 'x' WHERE pno = {mine}"
            ))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("writes stayed refused after the epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_absent_site_keeps_its_locks_and_catches_up_when_it_returns() {
    let mut net = setup(30).await;
    let c = patients(&net, "CPH")[0];
    let mut grc = connect(net.sites["GRC"]).await;
    let mut cph = connect(net.sites["CPH"]).await;
    let lookup = format!("SELECT add1, add2 FROM patient WHERE pno = {c}");
    run(&mut grc, &lookup).await;
    run(
        &mut grc,
        &format!("UPDATE patient SET add1 = 'GRC was here' WHERE pno = {c}"),
    )
    .await;
    run(
        &mut grc,
        "INSERT INTO patient (surname, first_names) VALUES ('Absent', 'Amy')",
    )
    .await;
    // GRC goes away for a whole epoch.
    net.participants.remove("GRC").unwrap().abort();
    let grc_site = net.handles["GRC"].clone();
    for _ in 0..100 {
        if !grc_site.subscribed() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // ... and the controller has seen its stream end.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // GRC's lock holds while it is away: CPH cannot change its own patient.
    let (code, _) = refused(
        &cph,
        &format!("UPDATE patient SET add2 = 'CPH' WHERE pno = {c}"),
    )
    .await;
    assert_eq!(code, "55P03");
    let summary = net.refresh().await;
    assert_eq!(summary.sites.len(), 2, "{summary:?}");
    assert_eq!(summary.absent, vec!["GRC".to_string()]);
    assert_eq!(
        global_value(
            &net,
            &format!("SELECT snaps_lock_site FROM patient WHERE pno = {c}")
        )
        .as_deref(),
        Some("3"),
        "GRC's lock is held until GRC has pushed"
    );
    assert_eq!(
        global_value(
            &net,
            "SELECT count(*) FROM patient WHERE surname = 'Absent'"
        )
        .as_deref(),
        Some("0")
    );

    // GRC returns: it catches up on the closed epoch, keeping its changes.
    net.participants
        .insert("GRC".into(), tokio::spawn(grc_site.clone().participate()));
    net.wait_subscribed(3).await;
    let next = net.refresh().await;
    assert!(next.absent.is_empty(), "{next:?}");
    assert_eq!(next.inserted, 1, "{next:?}");
    assert_eq!(
        global_value(&net, &format!("SELECT add1 FROM patient WHERE pno = {c}")).as_deref(),
        Some("GRC was here")
    );
    assert_eq!(
        global_value(
            &net,
            &format!("SELECT snaps_lock_site FROM patient WHERE pno = {c}")
        ),
        None
    );
    // CPH's own tuple has GRC's change now.
    assert_eq!(
        one(
            &mut cph,
            &format!("SELECT add1 FROM patient WHERE pno = {c}")
        )
        .await
        .as_deref(),
        Some("GRC was here")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unused_snapshots_are_evicted_and_their_copies_released() {
    let net = setup(30).await;
    let grc = patients(&net, "GRC");
    let (old, kept, pinned, by_name) = (grc[0], grc[1], grc[2], grc[3]);
    let mut stg = connect(net.sites["STG"]).await;
    for p in [old, kept, pinned] {
        run(&mut stg, &format!("SELECT * FROM patient WHERE pno = {p}")).await;
    }
    let surname = match &net.data["GRC"]["patient"][3][3] {
        snaps_schema::Value::Text(s) => s.replace('\'', "''"),
        v => v.to_string(),
    };
    run(
        &mut stg,
        &format!("SELECT * FROM patient WHERE surname = '{surname}'"),
    )
    .await;
    run(
        &mut stg,
        &format!("UPDATE patient SET race = 'pin' WHERE pno = {pinned}"),
    )
    .await;
    // Age every snapshot but the one holding `kept` past max_days (30).
    let site = rusqlite::Connection::open(db(&net, "STG")).unwrap();
    site.execute_batch(&format!(
        "UPDATE snaps_snapshot_membership SET last_access_day = last_access_day - 40
           WHERE NOT (relation = 'patient' AND tuple_rowid = {kept});
         UPDATE snaps_snapshot_definition SET created_day = created_day - 40;"
    ))
    .unwrap();
    let count = |sql: &str| -> i64 { site.query_row(sql, [], |r| r.get(0)).unwrap() };
    // Each fetch made two: the query's, and the one of what its include
    // tree brought along (the patients' visits and report lines).
    assert_eq!(count("SELECT count(*) FROM snaps_snapshot_definition"), 8);
    // A lookup by number of the patient fetched by name is answered on the
    // copy held (no fetch), and uses the snapshot that holds it.
    let fetches = stat(&db(&net, "STG"), "global_fetches");
    run(
        &mut stg,
        &format!("SELECT surname FROM patient WHERE pno = {by_name}"),
    )
    .await;
    assert_eq!(stat(&db(&net, "STG"), "global_fetches"), fetches);

    net.refresh().await;
    // What holds `kept` and what holds `by_name` stay, with what came
    // along with them.
    assert_eq!(count("SELECT count(*) FROM snaps_snapshot_definition"), 4);
    let held = |p: i64| count(&format!("SELECT count(*) FROM patient WHERE pno = {p}"));
    assert_eq!(
        (held(old), held(kept), held(pinned), held(by_name)),
        (0, 1, 1, 1)
    );
    // The controller no longer counts STG as holding the evicted copy: a
    // query brings it again.
    let sent_to_stg = |p: i64| sent_to(&net, p, 2);
    assert!(!sent_to_stg(old));
    assert!(sent_to_stg(kept) && sent_to_stg(pinned));
    let (rows, _) = run(
        &mut stg,
        &format!("SELECT pno FROM patient WHERE pno = {old}"),
    )
    .await;
    assert_eq!(rows.len(), 1);

    // The controller evaluates at night only what STG's definitions still
    // fetch: evicting the lookup by name stops its groups standing, and
    // the controller's standing names are the site's.
    let standing = || -> std::collections::BTreeSet<i64> {
        let conn = rusqlite::Connection::open(&net.store).unwrap();
        let mut stmt = conn
            .prepare("SELECT name FROM snaps_site_group WHERE site = 2 AND standing = 1")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let at_site = || -> std::collections::BTreeSet<i64> {
        let mut stmt = site
            .prepare("SELECT name FROM snaps_kept_group WHERE standing = 1")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let before = standing();
    assert_eq!(before, at_site());
    site.execute_batch(&format!(
        "UPDATE snaps_snapshot_membership SET last_access_day = last_access_day - 40
           WHERE NOT (relation = 'patient' AND tuple_rowid IN
                      (SELECT rowid FROM patient WHERE pno IN ({kept}, {old})));
         UPDATE snaps_snapshot_definition SET created_day = created_day - 40;"
    ))
    .unwrap();
    net.refresh().await;
    assert_eq!(held(by_name), 0, "evicted");
    let after = standing();
    assert_eq!(after, at_site());
    assert!(
        !before.is_subset(&after) && !after.is_empty(),
        "the evicted definitions' groups stop standing: {before:?} before, {after:?} after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snaps_refresh_and_snaps_conflicts_on_the_command_line() {
    let net = setup(20).await;
    let global = net.global.as_ref().unwrap();
    let token = net.dir.path().join("admin.token");
    std::fs::write(&token, &global.admin).unwrap();
    let bin = env!("CARGO_BIN_EXE_snaps");
    let addr = global.addr.clone();
    let out = tokio::task::spawn_blocking({
        let (addr, token) = (addr.clone(), token.clone());
        move || {
            std::process::Command::new(bin)
                .args(["refresh", "--global", &addr, "--insecure", "--token-file"])
                .arg(&token)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("epoch 1: sites CPH, STG, GRC (absent: none)"),
        "{stdout}"
    );
    assert!(stdout.contains("0 conflicts"), "{stdout}");
    let out = std::process::Command::new(bin)
        .args([
            "conflicts",
            "--global",
            &addr,
            "--json",
            "--insecure",
            "--token-file",
        ])
        .arg(&token)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    // A site's token is not the administrator's.
    let wrong = net.dir.path().join("site.token");
    std::fs::write(&wrong, &global.tokens["CPH"]).unwrap();
    let out = std::process::Command::new(bin)
        .args(["refresh", "--global", &addr, "--insecure", "--token-file"])
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not the administrator's credential"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owners_delete_leaves_held_copies_until_their_holders_let_go() {
    let net = setup(30).await;
    let g = patients(&net, "GRC")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let mut grc = connect(net.sites["GRC"]).await;
    let mut cph = connect(net.sites["CPH"]).await;
    run(&mut stg, &format!("SELECT * FROM patient WHERE pno = {g}")).await;
    run(&mut grc, &format!("DELETE FROM patient WHERE pno = {g}")).await;
    let summary = net.refresh().await;
    assert_eq!(summary.deleted, 1, "{summary:?}");
    // No longer in the global snapshot: nobody is sent it again ...
    assert_eq!(
        global_value(
            &net,
            &format!("SELECT count(*) FROM patient WHERE pno = {g}")
        )
        .as_deref(),
        Some("0")
    );
    let (rows, _) = run(&mut cph, &format!("SELECT * FROM patient WHERE pno = {g}")).await;
    assert!(rows.is_empty());
    // ... but STG keeps the copy it holds, and the controller remembers it.
    let (rows, _) = run(&mut stg, &format!("SELECT * FROM patient WHERE pno = {g}")).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        global_value(&net, "SELECT count(*) FROM snaps_gone").as_deref(),
        Some("1")
    );
    // When STG's snapshot is evicted, the last holder is gone and so is the
    // tuple.
    let site = rusqlite::Connection::open(db(&net, "STG")).unwrap();
    site.execute_batch(
        "UPDATE snaps_snapshot_membership SET last_access_day = last_access_day - 40;
         UPDATE snaps_snapshot_definition SET created_day = created_day - 40;",
    )
    .unwrap();
    net.refresh().await;
    let (rows, _) = run(&mut stg, &format!("SELECT * FROM patient WHERE pno = {g}")).await;
    assert!(rows.is_empty());
    assert_eq!(
        global_value(&net, "SELECT count(*) FROM snaps_gone").as_deref(),
        Some("0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mapping_edit_is_checked_when_written_and_takes_effect_at_the_next_epoch() {
    let net = setup(30).await;
    let c = patients(&net, "CPH")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let mut cph = connect(net.sites["CPH"]).await;
    run(&mut stg, &format!("SELECT * FROM patient WHERE pno = {c}")).await;
    let races = |owner: u32| {
        global_value(
            &net,
            &format!(
                "SELECT count(*) FROM patient WHERE snaps_owner = {owner} AND race IS NOT NULL"
            ),
        )
        .unwrap()
        .parse::<i64>()
        .unwrap()
    };
    assert!(races(1) > 0, "CPH shares race");
    assert_eq!(races(2), 0, "STG does not");

    // A bad row is refused with the mapping's own message.
    let (_, message) = refused(
        &stg,
        "INSERT INTO snaps_mapping (row, local_relation, local_attribute, global_relation, global_attribute) \
         VALUES (100, 'patient', 'nosuch', 'patient', 'race')",
    )
    .await;
    assert!(message.contains("nosuch"), "{message}");
    // A change that would leave a definition selecting on an unmapped
    // attribute names the definition.
    run(&mut stg, "SELECT * FROM patient WHERE surname = 'Nobody'").await;
    let (_, message) = refused(
        &stg,
        "DELETE FROM snaps_mapping WHERE local_relation = 'patient' AND local_attribute = 'surname'",
    )
    .await;
    assert!(
        message.contains("(SELECT * FROM patient WHERE surname = 'Nobody')")
            && message.contains("patient.surname"),
        "{message}"
    );
    // STG starts sharing race, CPH stops.
    let (_, notices) = run(
        &mut stg,
        "INSERT INTO snaps_mapping (row, local_relation, local_attribute, global_relation, global_attribute) \
         VALUES (100, 'patient', 'race', 'patient', 'race')",
    )
    .await;
    assert!(
        notices
            .iter()
            .any(|n| n.contains("takes effect at the next refresh epoch")),
        "{notices:?}"
    );
    run(
        &mut cph,
        "DELETE FROM snaps_mapping WHERE local_relation = 'patient' AND local_attribute = 'race'",
    )
    .await;
    assert!(
        races(1) > 0 && races(2) == 0,
        "nothing changes before the epoch"
    );

    let summary = net.refresh().await;
    assert!(summary.absent.is_empty(), "{summary:?}");
    assert_eq!(races(1), 0, "CPH's race left the global snapshot");
    assert!(races(2) > 0, "STG's race reached it");
    // STG's copy of CPH's patient came again in the new shape: no race.
    assert_eq!(
        one(
            &mut stg,
            &format!("SELECT race FROM patient WHERE pno = {c}")
        )
        .await,
        None
    );
    // CPH still answers with its own race values; the edit is in effect.
    let own = one(
        &mut cph,
        &format!("SELECT race FROM patient WHERE pno = {c}"),
    )
    .await;
    assert!(own.is_some());
}

#[test]
fn snaps_mapping_checks_adds_and_removes_rows_of_a_site_database() {
    let dir = tempfile::tempdir().unwrap();
    let network = common::network();
    let path = dir.path().join("STG.db");
    snaps_local::SiteStore::create_in_network(&network, "STG", &path).unwrap();
    let bin = env!("CARGO_BIN_EXE_snaps");
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/radiology");
    let snaps = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .args(["--database", path.to_str().unwrap(), "--network", fixtures])
            .output()
            .unwrap()
    };
    let out = snaps(&["mapping", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("they are the mapping in effect"));
    let out = snaps(&["mapping", "add", "patient", "race", "patient", "race"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains("+ patient.race → patient.race"), "{stdout}");
    let out = snaps(&["mapping", "add", "patient", "race", "patient", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
    let out = snaps(&["mapping", "remove", "patient", "pno"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not map key attribute patient.pno"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = snaps(&["mapping", "remove", "patient", "race"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("they are the mapping in effect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_taken_while_offline_becomes_a_conflict_for_an_administrator() {
    let mut net = setup(30).await;
    let taken = patients(&net, "CPH")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let controller = net.global.take().unwrap();
    let (addr, tokens, admin) = (
        controller.addr.clone(),
        controller.tokens.clone(),
        controller.admin.clone(),
    );
    controller.stop().await.unwrap();
    // Offline, STG registers a patient under a number CPH already uses.
    let (_, notices) = run(
        &mut stg,
        &format!("INSERT INTO patient (pno, surname) VALUES ({taken}, 'Twice')"),
    )
    .await;
    assert!(
        notices
            .iter()
            .any(|n| n.contains("checked at the next refresh"))
    );
    net.global = Some(
        snaps::localnet::LocalNetwork::start_with(
            net.network.clone(),
            net.store.clone(),
            snaps::localnet::Options {
                addr: addr.trim_start_matches("http://").parse().unwrap(),
                tokens,
                admin,
                refresh: net.refresh.clone(),
                ..snaps::localnet::Options::new(&net.network)
            },
        )
        .await
        .unwrap(),
    );
    net.wait_subscribed(3).await;
    let summary = net.refresh().await;
    assert_eq!(summary.conflicts, 1, "{summary:?}");
    let conflicts = net
        .global
        .as_ref()
        .unwrap()
        .admin_client()
        .await
        .unwrap()
        .conflicts()
        .await
        .unwrap();
    assert_eq!(conflicts.len(), 1);
    let c = &conflicts[0];
    assert_eq!((c.site.as_str(), c.holder_site.as_str()), ("STG", "CPH"));
    assert!(c.tuple.contains("Twice"), "{}", c.tuple);
    // Never silently merged: CPH's patient is unchanged at the controller.
    assert_ne!(
        global_value(
            &net,
            &format!("SELECT surname FROM patient WHERE pno = {taken}")
        )
        .as_deref(),
        Some("Twice")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mapping_edit_waits_for_changes_under_lock_and_keeps_pinned_attributes() {
    let net = setup(30).await;
    let (c, g) = (patients(&net, "CPH")[0], patients(&net, "GRC")[0]);
    let mut stg = connect(net.sites["STG"]).await;
    run(
        &mut stg,
        &format!("SELECT * FROM patient WHERE pno IN ({c}, {g})"),
    )
    .await;
    run(
        &mut stg,
        &format!("UPDATE patient SET add1 = 'under lock' WHERE pno = {c}"),
    )
    .await;
    run(
        &mut stg,
        &format!("UPDATE patient SET film_locate = 'shelf 9' WHERE pno = {g}"),
    )
    .await;
    run(
        &mut stg,
        "INSERT INTO snaps_mapping (row, local_relation, local_attribute, global_relation, global_attribute) \
         VALUES (100, 'patient', 'race', 'patient', 'race')",
    )
    .await;
    let stg_races = || {
        global_value(
            &net,
            "SELECT count(*) FROM patient WHERE snaps_owner = 2 AND race IS NOT NULL",
        )
        .unwrap()
    };
    // First epoch: STG's change under lock is committed in the shape it was
    // made in; the edit waits.
    net.refresh().await;
    assert_eq!(
        global_value(&net, &format!("SELECT add1 FROM patient WHERE pno = {c}")).as_deref(),
        Some("under lock")
    );
    assert_eq!(stg_races(), "0");
    // Second epoch: the edit takes effect.
    net.refresh().await;
    assert_ne!(stg_races(), "0");
    // The pinned copy came again in the new shape and kept its own value.
    assert_eq!(
        one(
            &mut stg,
            &format!("SELECT film_locate FROM patient WHERE pno = {g}")
        )
        .await
        .as_deref(),
        Some("shelf 9")
    );
    assert_eq!(
        one(
            &mut stg,
            &format!("SELECT add1 FROM patient WHERE pno = {c}")
        )
        .await
        .as_deref(),
        Some("under lock")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_deleted_and_registered_again_before_the_refresh_is_the_new_tuple() {
    let net = setup(30).await;
    let s = patients(&net, "STG")[0];
    let mut stg = connect(net.sites["STG"]).await;
    run(&mut stg, &format!("DELETE FROM patient WHERE pno = {s}")).await;
    run(
        &mut stg,
        &format!("INSERT INTO patient (pno, surname, first_names) VALUES ({s}, 'Again', 'Anew')"),
    )
    .await;
    let summary = net.refresh().await;
    assert_eq!((summary.deleted, summary.inserted), (1, 1), "{summary:?}");
    assert_eq!(
        global_value(
            &net,
            &format!("SELECT surname FROM patient WHERE pno = {s}")
        )
        .as_deref(),
        Some("Again")
    );
    let mut grc = connect(net.sites["GRC"]).await;
    assert_eq!(
        one(
            &mut grc,
            &format!("SELECT first_names FROM patient WHERE pno = {s}")
        )
        .await
        .as_deref(),
        Some("Anew")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_unsure_of_what_it_holds_is_resynchronised_and_old_changes_are_forgotten() {
    let mut net = setup(30).await;
    let grc = patients(&net, "GRC");
    let (kept, lost) = (grc[0], grc[1]);
    let mut stg = connect(net.sites["STG"]).await;
    run(
        &mut stg,
        &format!("SELECT * FROM patient WHERE pno = {kept}"),
    )
    .await;
    run(
        &mut stg,
        &format!("SELECT * FROM patient WHERE pno = {lost}"),
    )
    .await;
    run(
        &mut stg,
        &format!("UPDATE patient SET add1 = 'logged' WHERE pno = {kept}"),
    )
    .await;
    // As if the second fetch's reply had been lost: the controller believes
    // STG holds a tuple it never stored (nor the snapshot asking for it).
    let site = rusqlite::Connection::open(db(&net, "STG")).unwrap();
    site.execute_batch(&format!(
        "UPDATE patient SET snaps_status = snaps_status | 1 WHERE pno = {lost};
         DELETE FROM patient WHERE pno = {lost};
         DELETE FROM snaps_copy WHERE relation = 'patient' AND tuple_rowid = {lost};
         DELETE FROM snaps_snapshot_membership WHERE relation = 'patient' AND tuple_rowid = {lost};
         DELETE FROM snaps_snapshot_definition WHERE statement LIKE '%{lost}%';
         INSERT OR REPLACE INTO snaps_meta (key, value) VALUES ('sent_to_uncertain', '0');"
    ))
    .unwrap();
    net.restart_site("STG", None).await;
    net.wait_subscribed(3).await;
    let sent_to_stg = |p: i64| sent_to(&net, p, 2);
    assert!(sent_to_stg(lost));
    net.refresh().await;
    assert!(sent_to_stg(kept) && !sent_to_stg(lost));
    assert!(!net.handles["STG"].uncertain());
    // The epoch's change log is gone once every site has applied it.
    assert_eq!(
        global_value(&net, "SELECT count(*) FROM snaps_changes").as_deref(),
        Some("0")
    );
}

/// How many audit records of `action` the controller has for `site`, and
/// their tuples.
fn audited(net: &Net, site: &str, action: &str) -> (i64, i64) {
    rusqlite::Connection::open(&net.store)
        .unwrap()
        .query_row(
            "SELECT count(*), coalesce(sum(tuples), 0) FROM snaps_audit WHERE site = ?1 AND action = ?2",
            [site, action],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_night_brings_what_the_changes_add_to_a_definition_without_re_running_it() {
    let net = setup(30).await;
    let g = patients(&net, "GRC")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let mut grc = connect(net.sites["GRC"]).await;
    let history =
        format!("SELECT v.vno FROM patient p, visit v WHERE p.pno = {g} AND v.pno = p.pno");
    let (before, _) = run(&mut stg, &history).await;
    // The first night makes STG's definitions standing at the controller.
    net.refresh().await;
    let standing: i64 = rusqlite::Connection::open(&net.store)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM snaps_site_group WHERE site = 2 AND standing = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(standing >= 1, "STG's visit history is standing: {standing}");

    // GRC records a visit of its patient; the night brings it to STG as the
    // controller's delta, and STG fetches nothing.
    run(
        &mut grc,
        &format!(
            "INSERT INTO visit (vno, pno, date, description) VALUES (30999001, {g}, 19880404, 'Seen tonight')"
        ),
    )
    .await;
    let fetches = audited(&net, "STG", "fetch");
    let (refetches, refetched) = audited(&net, "STG", "refetch");
    net.refresh().await;
    assert_eq!(
        audited(&net, "STG", "fetch"),
        fetches,
        "no definition was re-run"
    );
    let (refetches_now, refetched_now) = audited(&net, "STG", "refetch");
    assert_eq!(refetches_now, refetches + 1, "one refetch for the night");
    assert_eq!(refetched_now - refetched, 1, "the new visit alone");

    // The history at STG shows the new visit, answered from its snapshot.
    let stg_db = db(&net, "STG");
    let asked = stat(&stg_db, "global_fetches");
    let (after, _) = run(&mut stg, &history).await;
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    assert!(
        after.contains(&vec![Some("30999001".to_string())]),
        "{after:?}"
    );
    assert_eq!(stat(&stg_db, "global_fetches"), asked, "covered");
}
