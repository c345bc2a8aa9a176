//! The controller keeps the body of every join group a site fetched, under
//! a name the site gives it, so the nightly refresh names a site's
//! standing groups in a few bytes instead of sending whole queries. A body
//! the controller no longer has is sent again (its definitions re-run), and
//! the refresh brings the same as before.

mod common;

use common::{connect, db, patients, run, setup, stat};

fn kept(net: &common::Net, site: u32) -> i64 {
    rusqlite::Connection::open(&net.store)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM snaps_site_group WHERE site = ?1",
            [site],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_refresh_names_standing_groups_and_resends_what_the_controller_lost() {
    let net = setup(30).await;
    let cph = patients(&net, "CPH");
    let mut stg = connect(net.sites["STG"]).await;
    for p in &cph[..6] {
        run(
            &mut stg,
            &format!("SELECT surname FROM patient WHERE pno = {p}"),
        )
        .await;
    }
    let bodies = kept(&net, 2);
    assert!(
        bodies >= 6,
        "the controller keeps what STG fetched: {bodies}"
    );

    // The first night sends the summaries whole, the standing set whole,
    // and the bodies of what the include trees brought (never fetched as
    // such); from then on a night with nothing new sends almost nothing.
    let stg_db = db(&net, "STG");
    let night = |net: &common::Net| stat(&db(net, "STG"), "refresh_distribute_bytes");
    net.refresh().await;
    let before = night(&net);
    net.refresh().await;
    let by_name = night(&net) - before;

    // The controller loses half of what it kept (a restored backup): the
    // site sends those bodies again.
    rusqlite::Connection::open(&net.store)
        .unwrap()
        .execute(
            "DELETE FROM snaps_site_group WHERE site = 2 AND name % 2 = 0",
            [],
        )
        .unwrap();
    let before = night(&net);
    net.refresh().await;
    let resent = night(&net) - before;
    assert!(kept(&net, 2) >= bodies, "the bodies are kept again");
    assert!(
        resent > by_name,
        "sending bodies again costs more than naming them ({resent} B against {by_name} B)"
    );

    // What the definitions select still comes with the night.
    let target = cph[0];
    let mut cph_client = connect(net.sites["CPH"]).await;
    run(
        &mut cph_client,
        &format!(
            "INSERT INTO visit (vno, pno, date, description) VALUES (1999001, {target}, 19880303, 'After the loss')"
        ),
    )
    .await;
    net.refresh().await;
    let fetches = stat(&stg_db, "global_fetches");
    let (visits, _) = run(
        &mut stg,
        &format!("SELECT vno FROM visit WHERE pno = {target}"),
    )
    .await;
    assert!(
        visits.contains(&vec![Some("1999001".to_string())]),
        "{visits:?}"
    );
    assert_eq!(
        stat(&stg_db, "global_fetches"),
        fetches,
        "no fetch: it came with the night"
    );
}
