//! The contract of [`GlobalStore`]: what every implementation of the global
//! store must do for the controller, written once and run against each of
//! them, so a second store (PostgreSQL) is held to the behaviour the
//! controller relies on from the SQLite one.
//!
//! Each scenario is a function of `(&dyn GlobalStore, &GlobalConfig)` over a
//! fresh, empty store of the radiology network (`fixtures/radiology`: CPH is
//! site 1, STG 2, GRC 3; `patient` and `doctor` are read-write, the others
//! read-only). `contract!` makes one `#[test]` per scenario and store;
//! another store is one more line in it and one more opener beside
//! `sqlite`.
//!
//! Requests are built as the controller builds them: wire messages decoded
//! by the public decoders (`LoadBatch::decode`, `FetchQuery::decode`) and
//! pushes staged as the encoded `PushRequest` a site sends.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use snaps_global::query::FetchQuery;
use snaps_global::store::{
    Activity, AuditFilter, AuditRecord, AuditVerification, ChangedPart, CommitSummary,
    ConflictRecord, EpochState, FetchedTable, IdentityLink, LinkChanges, LoadBatch, LoadOutcome,
    LockOutcome, Phase, Refusal, Right, SiteId, Subject, SummaryRequest, TupleRef, TupleSel,
};
use snaps_global::{Error, GlobalConfig, GlobalStore, PgStore, SqliteStore};
use snaps_mapping::ir::{BinOp, ColumnRef, Expr};
use snaps_proto::{encode_expr, encode_rows, v1};
use snaps_schema::{NetworkConfig, RelationMode, SiteNo, Value};

// ---------------------------------------------------------------------------
// The stores under test
// ---------------------------------------------------------------------------

/// The radiology network's controller configuration. Its `store` path lies
/// in the returned folder; the stores of this suite bring their own.
fn config() -> (GlobalConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let network =
        NetworkConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/radiology"))
            .expect("the radiology network");
    let config = GlobalConfig::new(
        "127.0.0.1:0".parse().expect("address"),
        dir.path().join("global.db"),
        network,
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
    )
    .expect("global configuration");
    (config, dir)
}

/// Opens a fresh, empty store of the radiology network for one test.
fn sqlite(config: &GlobalConfig) -> (Box<dyn GlobalStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let store = SqliteStore::open(&dir.path().join("global.db"), config).expect("SQLite store");
    (Box::new(store), dir)
}

/// Opens a fresh, empty store of the radiology network on PostgreSQL: a
/// database of its own on the server this test binary shares.
fn postgres(config: &GlobalConfig) -> (Box<dyn GlobalStore>, ()) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let server = snaps::pg_server::PgServer::shared().expect("PostgreSQL server for the tests");
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let url = server
        .create_database(&format!("contract_{n}"))
        .expect("test database");
    let store = PgStore::connect(&url, config).expect("PostgreSQL store");
    (Box::new(store), ())
}

/// One module per scenario, one test in it per store.
macro_rules! contract {
    ($($name:ident),* $(,)?) => { $( mod $name {
        #[test] fn sqlite() { let (config, _d) = super::config(); let (store, _s) = super::sqlite(&config); super::$name(store.as_ref(), &config); }
        #[test] fn postgres() { let (config, _d) = super::config(); let (store, _s) = super::postgres(&config); super::$name(store.as_ref(), &config); }
    } )* };
}

contract!(
    // Calls at once, as several controllers (or one with many sites) make
    // them: on PostgreSQL they conflict and are run again.
    a_lock_storm_never_grants_one_tuple_twice,
    fetches_at_once_send_each_tuple_once,
    // Loading the initial export.
    load_is_idempotent_by_origin,
    a_taken_key_becomes_a_recorded_conflict,
    a_null_key_refuses_the_whole_batch,
    // Fetching.
    a_fetch_returns_other_sites_tuples_once,
    released_copies_come_again,
    semijoin_tuples_bring_their_partners,
    // Primary-copy locks.
    locks_are_granted_all_or_nothing,
    read_only_relations_refuse_non_owners,
    key_owners_names_owners,
    // Identity matching.
    identity_candidates_share_a_blocking_key,
    links_are_kept_versioned_and_checked,
    // Refresh epochs.
    epochs_move_through_their_phases,
    a_commit_applies_the_pushes_once,
    changes_reach_holders_and_owners,
    deletes_withdrawals_and_clashes_commit,
    // Access rules and the audit trail.
    access_rules_are_set_replaced_and_removed,
    the_audit_trail_is_filtered_oldest_first,
    the_audit_trail_is_hash_chained_in_order,
    // Counters.
    activity_adds_up_in_status,
    status_counts_tuples_locks_owners_and_conflicts,
    // Kept join groups.
    kept_groups_round_trip_per_site,
    standing_groups_follow_change_standing,
    // Sent-to bits.
    resync_sets_sent_to_bits_exactly,
);

// ---------------------------------------------------------------------------
// Building requests
// ---------------------------------------------------------------------------

/// Patient numbers from CPH's, STG's and GRC's key ranges.
const CPH_P1: i64 = 1_000_001;
const CPH_P2: i64 = 1_000_002;
const CPH_P3: i64 = 1_000_003;
const STG_P1: i64 = 10_000_001;
const GRC_P1: i64 = 20_000_001;

/// The attributes of `patient` the tests export (the key first).
const PATIENT: [&str; 4] = ["pno", "surname", "first_names", "dob"];
/// The attributes of `visit` the tests export (the key first).
const VISIT: [&str; 4] = ["vno", "pno", "date", "description"];

fn site(config: &GlobalConfig, code: &str) -> SiteId {
    let s = config.network.site(code).expect("a radiology site");
    SiteId {
        code: s.code.as_str().to_string(),
        number: s.number,
    }
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn shape(var: &str, relation: &str, columns: &[&str]) -> v1::Shape {
    v1::Shape {
        parts: vec![v1::Part {
            var: var.into(),
            relation: relation.into(),
            columns: strings(columns),
            attributes: Vec::new(),
        }],
        split: None,
    }
}

/// The wire batch of one single-part relation.
fn wire_batch(relation: &str, columns: &[&str], tuples: Vec<(u64, Vec<Value>)>) -> v1::LoadBatch {
    let (origins, rows): (Vec<u64>, Vec<Vec<Value>>) = tuples.into_iter().unzip();
    v1::LoadBatch {
        shape: Some(shape("x", relation, columns)),
        origins,
        values: vec![encode_rows(columns.len(), &rows).expect("rows")],
    }
}

/// Patients as (origin, pno, surname); every one is Ann, born 1950-01-01.
fn wire_patients(tuples: &[(u64, i64, &str)]) -> v1::LoadBatch {
    let rows = tuples
        .iter()
        .map(|&(o, pno, surname)| (o, patient_row(Value::Int(pno), surname)))
        .collect();
    wire_batch("patient", &PATIENT, rows)
}

fn patient_row(pno: Value, surname: &str) -> Vec<Value> {
    vec![
        pno,
        Value::Text(surname.into()),
        Value::Text("Ann".into()),
        Value::Int(19_500_101),
    ]
}

/// Visits as (origin, vno, pno), all on 1987-12-12.
fn wire_visits(tuples: &[(u64, i64, i64)]) -> v1::LoadBatch {
    let rows = tuples
        .iter()
        .map(|&(o, vno, pno)| {
            let row = vec![
                Value::Int(vno),
                Value::Int(pno),
                Value::Int(19_871_212),
                Value::Text("chest".into()),
            ];
            (o, row)
        })
        .collect();
    wire_batch("visit", &VISIT, rows)
}

fn decode(config: &GlobalConfig, b: &v1::LoadBatch) -> LoadBatch {
    LoadBatch::decode(b, &config.catalog).expect("a valid load batch")
}

/// Loads patients of `code`; the outcome.
fn load_patients(
    store: &dyn GlobalStore,
    config: &GlobalConfig,
    code: &str,
    tuples: &[(u64, i64, &str)],
) -> LoadOutcome {
    store
        .load(&site(config, code), &decode(config, &wire_patients(tuples)))
        .expect("load")
}

fn load_visits(store: &dyn GlobalStore, config: &GlobalConfig, code: &str, t: &[(u64, i64, i64)]) {
    store
        .load(&site(config, code), &decode(config, &wire_visits(t)))
        .expect("load visits");
}

fn loaded(n: u64) -> LoadOutcome {
    LoadOutcome {
        loaded: n,
        ..LoadOutcome::default()
    }
}

fn column(var: &str, attr: &str) -> Expr {
    Expr::Column(ColumnRef::new(var, attr))
}

fn table(var: &str, relation: &str, columns: &[&str], selection: Vec<Expr>) -> v1::Table {
    v1::Table {
        shape: Some(shape(var, relation, columns)),
        selection: selection.iter().map(encode_expr).collect(),
        outer: false,
    }
}

/// A fetch of one relation, optionally with `where key = value`.
fn select(
    relation: &str,
    columns: &[&str],
    key: Option<i64>,
    include_held: bool,
) -> v1::FetchRequest {
    let selection = key
        .map(|k| Expr::Binary {
            op: BinOp::Eq,
            left: Box::new(column("x", columns[0])),
            right: Box::new(Expr::Literal(Value::Int(k))),
        })
        .into_iter()
        .collect();
    v1::FetchRequest {
        groups: vec![v1::Group {
            tables: vec![table("x", relation, columns, selection)],
            ..v1::Group::default()
        }],
        include_held,
        ..v1::FetchRequest::default()
    }
}

fn all_patients() -> v1::FetchRequest {
    select("patient", &PATIENT, None, false)
}

/// One tuple a fetch returned: its first part's id, key (first column) and
/// second column, and its owner.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    table: usize,
    id: u64,
    key: i64,
    second: Value,
    owner: u32,
}

/// Decodes `req` as the controller does and fetches it for `code`: the
/// tuples returned, by table and key.
fn fetch(
    store: &dyn GlobalStore,
    config: &GlobalConfig,
    code: &str,
    req: &v1::FetchRequest,
) -> Vec<Got> {
    let q = FetchQuery::decode(req, &config.catalog).expect("a valid fetch");
    flatten(&store.fetch(&site(config, code), &q).expect("fetch"))
}

fn flatten(tables: &[FetchedTable]) -> Vec<Got> {
    let mut out = Vec::new();
    for t in tables {
        let p = &t.parts[0];
        for (i, row) in p.rows.iter().enumerate() {
            let Value::Int(key) = row[0] else {
                panic!("key {:?} is not an integer", row[0]);
            };
            out.push(Got {
                table: t.table,
                id: p.tuple_ids[i],
                key,
                second: row[1].clone(),
                owner: t.owners[i].0,
            });
        }
    }
    out.sort_by_key(|g| (g.table, g.key));
    out
}

fn keys(got: &[Got]) -> Vec<i64> {
    got.iter().map(|g| g.key).collect()
}

/// Tuple id by key.
fn ids(got: &[Got]) -> BTreeMap<i64, u64> {
    got.iter().map(|g| (g.key, g.id)).collect()
}

fn by_id(relation: &str, id: u64) -> TupleRef {
    TupleRef {
        relation: relation.into(),
        id: TupleSel::Id(id),
    }
}

fn patient(id: u64) -> TupleRef {
    by_id("patient", id)
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// Tuples of `relation` held in the store, and how many are locked.
fn counts(store: &dyn GlobalStore, relation: &str) -> (u64, u64) {
    let status = store.status().expect("status");
    let r = status
        .relations
        .iter()
        .find(|r| r.name == relation)
        .unwrap_or_else(|| panic!("status lists no {relation}"));
    (r.tuples, r.locked)
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

fn load_is_idempotent_by_origin(store: &dyn GlobalStore, config: &GlobalConfig) {
    let cph = [(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")];
    assert_eq!(load_patients(store, config, "CPH", &cph), loaded(2));
    assert_eq!(
        load_patients(store, config, "STG", &[(1, STG_P1, "Brown")]),
        loaded(1)
    );
    // A site resuming its export after a crash sends the batch again.
    assert_eq!(
        load_patients(store, config, "CPH", &cph),
        LoadOutcome {
            already_loaded: 2,
            ..LoadOutcome::default()
        }
    );
    // Origins are per site: STG's origin 2 is not CPH's.
    assert_eq!(
        load_patients(
            store,
            config,
            "STG",
            &[(1, STG_P1, "Brown"), (2, STG_P1 + 1, "Grey")]
        ),
        LoadOutcome {
            loaded: 1,
            already_loaded: 1,
            ..LoadOutcome::default()
        }
    );
    assert_eq!(counts(store, "patient"), (4, 0));
    let p = |code| {
        store
            .load_progress(&site(config, code), "patient")
            .expect("progress")
    };
    assert_eq!((p("CPH"), p("STG"), p("GRC")), (2, 2, 0));
    assert_eq!(
        store
            .load_progress(&site(config, "CPH"), "visit")
            .expect("progress"),
        0
    );
    assert!(store.load_progress(&site(config, "CPH"), "nurse").is_err());
    // Every tuple loaded is owned by its site.
    let owners = store
        .key_owners(
            "patient",
            &strings(&["pno"]),
            &[vec![Value::Int(CPH_P2)], vec![Value::Int(STG_P1 + 1)]],
        )
        .expect("key owners");
    assert_eq!(owners, [Some("CPH".to_string()), Some("STG".to_string())]);
}

fn a_taken_key_becomes_a_recorded_conflict(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(store, config, "CPH", &[(1, CPH_P1, "Smith")]);
    // STG exports, as its origin 7, a patient under CPH's number.
    let stg = [(1, STG_P1, "Brown"), (7, CPH_P1, "Clash")];
    let clash = ConflictRecord {
        relation: "patient".into(),
        origin: 7,
        key: vec![Value::Int(CPH_P1)],
        holder: "CPH".into(),
    };
    assert_eq!(
        load_patients(store, config, "STG", &stg),
        LoadOutcome {
            loaded: 1,
            conflicts: vec![clash],
            ..LoadOutcome::default()
        }
    );
    let listed = store.conflicts().expect("conflicts");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let c = &listed[0];
    assert_eq!(
        (
            c.site.as_str(),
            c.relation.as_str(),
            c.origin,
            &c.key,
            c.holder.as_str()
        ),
        ("STG", "patient", 7, &vec![Value::Int(CPH_P1)], "CPH")
    );
    assert!(c.recorded_at > 0, "{c:?}");
    // The administrator sees what was refused.
    assert!(c.tuple.contains("Clash"), "{}", c.tuple);
    // The key stays CPH's tuple; the refused one is not in the snapshot.
    assert_eq!(counts(store, "patient"), (2, 0));
    let got = fetch(store, config, "GRC", &all_patients());
    assert_eq!(keys(&got), [CPH_P1, STG_P1]);
    assert_eq!(got[0].second, text("Smith"));
    // The conflict counts as processed: resuming the export neither loads it
    // nor records it twice, and the progress is past it.
    assert_eq!(
        load_patients(store, config, "STG", &stg),
        LoadOutcome {
            already_loaded: 2,
            ..LoadOutcome::default()
        }
    );
    assert_eq!(store.conflicts().expect("conflicts").len(), 1);
    assert_eq!(store.status().expect("status").conflicts, 1);
    assert_eq!(
        store
            .load_progress(&site(config, "STG"), "patient")
            .expect("progress"),
        7
    );
}

fn a_null_key_refuses_the_whole_batch(store: &dyn GlobalStore, config: &GlobalConfig) {
    let grc = site(config, "GRC");
    let rows = vec![
        (1, patient_row(Value::Int(GRC_P1), "Smith")),
        (2, patient_row(Value::Null, "Nobody")),
    ];
    let batch = decode(config, &wire_batch("patient", &PATIENT, rows));
    let err = store.load(&grc, &batch).expect_err("a NULL key is refused");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("patient.pno"), "{err}");
    // One transaction: the good tuple before it is not loaded either.
    assert_eq!(counts(store, "patient"), (0, 0));
    assert_eq!(store.load_progress(&grc, "patient").expect("progress"), 0);
    assert_eq!(
        load_patients(store, config, "GRC", &[(1, GRC_P1, "Smith")]),
        loaded(1)
    );
}

// ---------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------

fn a_fetch_returns_other_sites_tuples_once(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(
        store,
        config,
        "CPH",
        &[(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")],
    );
    load_patients(store, config, "STG", &[(1, STG_P1, "Brown")]);
    let q = FetchQuery::decode(&all_patients(), &config.catalog).expect("fetch");
    let tables = store.fetch(&site(config, "STG"), &q).expect("fetch");
    // One table, whole tuples with their values and owner; not STG's own.
    assert_eq!(tables.len(), 1, "{tables:?}");
    let t = &tables[0];
    assert_eq!((t.group, t.table, t.len(), t.parts.len()), (0, 0, 2, 1));
    assert_eq!(t.owners, [SiteNo(1), SiteNo(1)]);
    let mut rows = t.parts[0].rows.clone();
    rows.sort_by_key(|r| match r[0] {
        Value::Int(pno) => pno,
        _ => 0,
    });
    assert_eq!(
        rows,
        [
            patient_row(Value::Int(CPH_P1), "Smith"),
            patient_row(Value::Int(CPH_P2), "Jones")
        ]
    );
    let ids: BTreeSet<u64> = t.parts[0].tuple_ids.iter().copied().collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&0), "{ids:?}");
    // STG holds them now: asked again, nothing new.
    assert_eq!(fetch(store, config, "STG", &all_patients()), []);
    // Unless it asks for what it holds too; still never its own.
    let again = fetch(
        store,
        config,
        "STG",
        &select("patient", &PATIENT, None, true),
    );
    assert_eq!(keys(&again), [CPH_P1, CPH_P2]);
    // Another site's copies are its own business; a selection is applied.
    let one = fetch(
        store,
        config,
        "GRC",
        &select("patient", &PATIENT, Some(STG_P1), false),
    );
    assert_eq!(
        one.iter()
            .map(|g| (g.key, &g.second, g.owner))
            .collect::<Vec<_>>(),
        [(STG_P1, &text("Brown"), 2)]
    );
    assert_eq!(
        keys(&fetch(store, config, "GRC", &all_patients())),
        [CPH_P1, CPH_P2]
    );
    assert_eq!(
        fetch(store, config, "CPH", &select("visit", &VISIT, None, true)),
        []
    );
}

fn released_copies_come_again(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(
        store,
        config,
        "CPH",
        &[(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")],
    );
    let got = ids(&fetch(store, config, "STG", &all_patients()));
    let stg = site(config, "STG");
    assert_eq!(
        store
            .release_copies(&stg, &[patient(got[&CPH_P1])])
            .expect("release"),
        1
    );
    // A copy released twice was held once.
    assert_eq!(
        store
            .release_copies(&stg, &[patient(got[&CPH_P1])])
            .expect("release"),
        0
    );
    // GRC never held it.
    let grc = site(config, "GRC");
    assert_eq!(
        store
            .release_copies(&grc, &[patient(got[&CPH_P1])])
            .expect("release"),
        0
    );
    let again = fetch(store, config, "STG", &all_patients());
    assert_eq!(keys(&again), [CPH_P1]);
    assert_eq!(again[0].id, got[&CPH_P1], "a tuple keeps its id");
    // Releasing by the owner's origin names the same tuple.
    let by_origin = TupleRef {
        relation: "patient".into(),
        id: TupleSel::Origin(2),
    };
    let cph = site(config, "CPH");
    assert_eq!(
        store.release_copies(&cph, &[by_origin]).expect("release"),
        0
    );
    assert_eq!(
        store
            .release_copies(&stg, &[patient(got[&CPH_P1]), patient(got[&CPH_P2])])
            .expect("release"),
        2
    );
    assert_eq!(
        keys(&fetch(store, config, "STG", &all_patients())),
        [CPH_P1, CPH_P2]
    );
}

fn semijoin_tuples_bring_their_partners(store: &dyn GlobalStore, config: &GlobalConfig) {
    // CPH's patient 1 has no visit in the snapshot, patient 2 has one.
    load_patients(
        store,
        config,
        "CPH",
        &[(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")],
    );
    load_visits(store, config, "CPH", &[(1, 1_000_502, CPH_P2)]);
    let join = |rows: Option<Vec<Vec<Value>>>| v1::FetchRequest {
        groups: vec![v1::Group {
            tables: vec![
                table("p", "patient", &PATIENT, Vec::new()),
                table("v", "visit", &VISIT, Vec::new()),
            ],
            joins: vec![v1::Join {
                left: Some(encode_expr(&column("p", "pno"))),
                right: Some(encode_expr(&column("v", "pno"))),
                outer_table: None,
            }],
            ..v1::Group::default()
        }],
        semijoins: rows
            .map(|r| v1::SemiJoin {
                group: 0,
                table: 1,
                columns: vec![v1::ColumnRef {
                    var: "v".into(),
                    attr: "pno".into(),
                }],
                rows: Some(encode_rows(1, &r).expect("rows")),
            })
            .into_iter()
            .collect(),
        ..v1::FetchRequest::default()
    };
    let got = fetch(store, config, "STG", &join(None));
    assert_eq!(
        got.iter().map(|g| (g.table, g.key)).collect::<Vec<_>>(),
        [(0, CPH_P2), (1, 1_000_502)]
    );
    // STG records a visit of CPH's patient 1 locally: its temporary tuple
    // joins patient 1, which comes alone (the visit is STG's own).
    let got = fetch(
        store,
        config,
        "STG",
        &join(Some(vec![vec![Value::Int(CPH_P1)]])),
    );
    assert_eq!(
        got.iter()
            .map(|g| (g.table, g.key, g.owner))
            .collect::<Vec<_>>(),
        [(0, CPH_P1, 1)]
    );
    // Temporary tuples last one request: nothing is left for the next.
    assert_eq!(fetch(store, config, "STG", &join(None)), []);
    assert_eq!(counts(store, "visit"), (1, 0));
}

// ---------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------

fn locks_are_granted_all_or_nothing(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(
        store,
        config,
        "CPH",
        &[
            (1, CPH_P1, "Smith"),
            (2, CPH_P2, "Jones"),
            (3, CPH_P3, "Brown"),
        ],
    );
    let id = ids(&fetch(store, config, "STG", &all_patients()));
    fetch(store, config, "GRC", &all_patients());
    let (cph, stg, grc) = (
        site(config, "CPH"),
        site(config, "STG"),
        site(config, "GRC"),
    );
    let (p1, p2, p3) = (
        patient(id[&CPH_P1]),
        patient(id[&CPH_P2]),
        patient(id[&CPH_P3]),
    );
    assert_eq!(
        store.lock(&stg, std::slice::from_ref(&p1)).expect("lock"),
        LockOutcome::Granted
    );
    // The holder asking again (after a lost reply) is granted.
    assert_eq!(
        store.lock(&stg, std::slice::from_ref(&p1)).expect("lock"),
        LockOutcome::Granted
    );
    // GRC asks for a free tuple and the locked one: neither is granted.
    assert_eq!(
        store.lock(&grc, &[p2.clone(), p1.clone()]).expect("lock"),
        LockOutcome::Refused {
            tuple: p1.clone(),
            reason: Refusal::Locked,
            holder: "STG".into()
        }
    );
    assert_eq!(counts(store, "patient"), (3, 1));
    // The free one stayed free: its owner locks it.
    assert_eq!(
        store.lock(&cph, std::slice::from_ref(&p2)).expect("lock"),
        LockOutcome::Granted
    );
    assert_eq!(
        store.lock(&grc, std::slice::from_ref(&p3)).expect("lock"),
        LockOutcome::Granted
    );
    assert_eq!(counts(store, "patient"), (3, 3));
    // A refusal names the tuple as the request did (CPH's by origin).
    let own = TupleRef {
        relation: "patient".into(),
        id: TupleSel::Origin(3),
    };
    assert_eq!(
        store.lock(&cph, std::slice::from_ref(&own)).expect("lock"),
        LockOutcome::Refused {
            tuple: own,
            reason: Refusal::Locked,
            holder: "GRC".into()
        }
    );
    // Unlocking counts only the locks the site held.
    assert_eq!(
        store
            .unlock(&stg, &[p1.clone(), p2.clone(), p3.clone()])
            .expect("unlock"),
        1
    );
    assert_eq!(
        store
            .unlock(&stg, std::slice::from_ref(&p1))
            .expect("unlock"),
        0
    );
    assert_eq!(counts(store, "patient"), (3, 2));
    assert_eq!(
        store.lock(&grc, std::slice::from_ref(&p1)).expect("lock"),
        LockOutcome::Granted
    );
    // A locked copy cannot be released: its change has not reached the
    // snapshot yet.
    assert!(
        store
            .release_copies(&grc, std::slice::from_ref(&p1))
            .is_err()
    );
    assert_eq!(store.unlock(&grc, &[p1.clone(), p3]).expect("unlock"), 2);
    // A tuple that does not exist is not found, and nothing is locked (not
    // even the free tuple named before it).
    let missing = store.lock(&stg, &[p1, patient(999_999)]);
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    assert_eq!(counts(store, "patient"), (3, 1));
}

fn read_only_relations_refuse_non_owners(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(store, config, "CPH", &[(1, CPH_P1, "Smith")]);
    load_visits(store, config, "CPH", &[(1, 1_000_501, CPH_P1)]);
    assert_eq!(config.modes["visit"], RelationMode::ReadOnly);
    let p = ids(&fetch(store, config, "STG", &all_patients()))[&CPH_P1];
    let v = ids(&fetch(
        store,
        config,
        "STG",
        &select("visit", &VISIT, None, false),
    ))[&1_000_501];
    let stg = site(config, "STG");
    let visit = by_id("visit", v);
    assert_eq!(
        store
            .lock(&stg, &[patient(p), visit.clone()])
            .expect("lock"),
        LockOutcome::Refused {
            tuple: visit,
            reason: Refusal::ReadOnly,
            holder: "CPH".into()
        }
    );
    // All or nothing across relations too.
    assert_eq!(counts(store, "patient"), (1, 0));
    // The owner changes its read-only tuples freely.
    let own = TupleRef {
        relation: "visit".into(),
        id: TupleSel::Origin(1),
    };
    assert_eq!(
        store.lock(&site(config, "CPH"), &[own]).expect("lock"),
        LockOutcome::Granted
    );
}

fn identity_candidates_share_a_blocking_key(store: &dyn GlobalStore, config: &GlobalConfig) {
    let people = ["pno", "surname", "first_names", "dob", "sex"];
    let person = |pno: i64, surname: &str, first: &str, dob: i64| {
        vec![
            Value::Int(pno),
            Value::Text(surname.into()),
            Value::Text(first.into()),
            Value::Int(dob),
            Value::Text("F".into()),
        ]
    };
    let load = |code: &str, rows: Vec<(u64, Vec<Value>)>| {
        let batch = decode(config, &wire_batch("patient", &people, rows));
        store.load(&site(config, code), &batch).expect("load");
    };
    load(
        "CPH",
        vec![
            (1, person(CPH_P1, "Harris", "Lynette Mary", 19_441_108)),
            // The same site's records are never candidates.
            (2, person(CPH_P2, "Harris", "Lynette Mary", 19_441_108)),
        ],
    );
    load(
        "STG",
        vec![
            // Same birth date, other names.
            (1, person(STG_P1, "Walker", "Ruth", 19_441_108)),
            // Day and month transposed.
            (2, person(10_000_002, "Jones", "Ann", 19_440_811)),
            // A day out.
            (3, person(10_000_003, "Jones", "Ann", 19_441_109)),
            // Same surname.
            (4, person(10_000_004, "Harris", "Ann", 19_700_101)),
            // The first given name, alone or with another.
            (5, person(10_000_005, "Brown", "Lynette", 19_700_101)),
            (6, person(10_000_006, "Brown", "Lynette Ann", 19_700_101)),
            // Nothing shared: not a candidate.
            (7, person(10_000_007, "Brown", "Lyn", 19_700_101)),
            (8, person(10_000_008, "Harrison", "Ann", 19_441_117 + 100)),
        ],
    );
    let spec = config
        .network
        .identity_spec()
        .expect("identity section")
        .expect("the radiology network declares one");
    let (subject, found) = store
        .identity_candidates(&spec, &Value::Int(CPH_P1))
        .expect("candidates")
        .expect("the patient is in the global snapshot");
    assert_eq!(subject.owner, SiteNo(1));
    assert_eq!(subject.person.surname.as_deref(), Some("Harris"));
    assert_eq!(subject.person.dob, Some(19_441_108));
    let mut keys: Vec<i64> = found
        .iter()
        .map(|c| match c.key {
            Value::Int(i) => i,
            ref v => panic!("{v:?}"),
        })
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            STG_P1, 10_000_002, 10_000_003, 10_000_004, 10_000_005, 10_000_006
        ]
    );
    assert!(found.iter().all(|c| c.owner == SiteNo(2)));
    assert_eq!(
        store
            .identity_candidates(&spec, &Value::Int(GRC_P1))
            .expect("candidates"),
        None
    );
}

fn links_are_kept_versioned_and_checked(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(
        store,
        config,
        "CPH",
        &[(1, CPH_P1, "Harris"), (2, CPH_P2, "Harris")],
    );
    load_patients(store, config, "STG", &[(1, STG_P1, "Harris")]);
    let spec = config
        .network
        .identity_spec()
        .expect("identity section")
        .expect("the radiology network declares one");
    let (cph, stg) = (site(config, "CPH"), site(config, "STG"));
    // Each change is audited in its transaction; a call changing nothing
    // is not.
    let link = |key, other, by, unlink| {
        store.link(&spec, key, other, by, unlink, &mut |l: &IdentityLink| {
            let mut r = AuditRecord::new(&by.0.code, by.1, if unlink { "unlink" } else { "link" });
            r.patients = vec![l.key.to_string(), l.other_key.to_string()];
            r
        })
    };
    let trail = || -> Vec<(String, Vec<String>)> {
        store
            .audit(&AuditFilter::default())
            .expect("audit")
            .into_iter()
            .filter(|r| r.action.ends_with("link"))
            .map(|r| (r.action, r.patients))
            .collect()
    };
    let none = LinkChanges {
        whole: true,
        ..LinkChanges::default()
    };
    assert_eq!(store.links_since(0).expect("links"), none);

    let linked = IdentityLink {
        key: CPH_P1,
        owner: SiteNo(1),
        other_key: STG_P1,
        other_owner: SiteNo(2),
        removed: false,
    };
    // Asked from either side, the link is kept with the lesser key first.
    let made = link(STG_P1, (CPH_P1, &cph), (&stg, "ward"), false);
    assert_eq!(made.expect("link"), (linked.clone(), true));
    let again = link(CPH_P1, (STG_P1, &stg), (&cph, "ward"), false);
    assert_eq!(again.expect("link"), (linked.clone(), false));
    let all = store.links_since(0).expect("links");
    assert_eq!((all.version, all.whole), (1, true));
    assert_eq!(all.links, std::slice::from_ref(&linked));
    assert_eq!(store.links_since(1).expect("links").links, []);

    // The candidates of a linked record include the other and say so.
    let (_, found) = store
        .identity_candidates(&spec, &Value::Int(CPH_P1))
        .expect("candidates")
        .expect("the patient is in the global snapshot");
    let linked_keys: Vec<&Value> = found.iter().filter(|c| c.linked).map(|c| &c.key).collect();
    assert_eq!(linked_keys, [&Value::Int(STG_P1)]);

    // Bad links change nothing.
    let refused = |r: snaps_global::Result<(IdentityLink, bool)>| match r {
        Err(e @ (Error::NotFound(_) | Error::InvalidArgument(_))) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let msg = refused(link(CPH_P1, (CPH_P1, &cph), (&cph, "ward"), false));
    assert!(msg.contains("itself"), "{msg}");
    let grc = site(config, "GRC");
    let msg = refused(link(CPH_P2, (STG_P1, &grc), (&cph, "ward"), false));
    assert!(
        msg.contains(&format!("{STG_P1} is not a record of site GRC")),
        "{msg}"
    );
    // A site links only its own patients.
    let msg = refused(link(CPH_P2, (STG_P1, &stg), (&grc, "ward"), false));
    assert!(
        msg.contains(&format!("{CPH_P2} is not a record of site GRC")),
        "{msg}"
    );
    let msg = refused(link(CPH_P1, (CPH_P2, &cph), (&cph, "ward"), false));
    assert!(msg.contains("both records would be of site CPH"), "{msg}");
    let msg = refused(link(CPH_P2, (GRC_P1, &grc), (&cph, "ward"), false));
    assert!(msg.contains(&GRC_P1.to_string()), "{msg}");
    assert_eq!(store.links_since(1).expect("links").version, 1);

    // An unlink is a change the sites that held the link receive.
    let (gone, changed) = link(CPH_P1, (STG_P1, &stg), (&cph, "ward"), true).expect("unlink");
    assert!(changed && gone.removed);
    let since = store.links_since(1).expect("links");
    assert_eq!((since.version, since.whole), (2, false));
    assert_eq!(
        since.links,
        [IdentityLink {
            removed: true,
            ..linked.clone()
        }]
    );
    assert_eq!(store.links_since(0).expect("links").links, []);
    let (_, changed) = link(CPH_P1, (STG_P1, &stg), (&cph, "ward"), true).expect("unlink");
    assert!(!changed);
    let pair = vec![CPH_P1.to_string(), STG_P1.to_string()];
    assert_eq!(
        trail(),
        [
            ("link".to_string(), pair.clone()),
            ("unlink".to_string(), pair)
        ],
        "one record per change, none for a refusal or a repeat"
    );
    // A version the store never had gets every standing link.
    assert!(store.links_since(99).expect("links").whole);
}

fn key_owners_names_owners(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(store, config, "CPH", &[(1, CPH_P1, "Smith")]);
    load_patients(store, config, "STG", &[(1, STG_P1, "Brown")]);
    load_visits(store, config, "CPH", &[(1, 1_000_501, CPH_P1)]);
    let int = |i| vec![Value::Int(i)];
    assert_eq!(
        store
            .key_owners(
                "patient",
                &strings(&["pno"]),
                &[int(STG_P1), int(GRC_P1), int(CPH_P1)]
            )
            .expect("key owners"),
        [Some("STG".to_string()), None, Some("CPH".to_string())]
    );
    // A key of two attributes: both must match.
    assert_eq!(
        store
            .key_owners(
                "visit",
                &strings(&["vno", "pno"]),
                &[
                    vec![Value::Int(1_000_501), Value::Int(CPH_P1)],
                    vec![Value::Int(1_000_501), Value::Int(STG_P1)]
                ]
            )
            .expect("key owners"),
        [Some("CPH".to_string()), None]
    );
    assert_eq!(
        store
            .key_owners("patient", &strings(&["pno"]), &[])
            .expect("key owners"),
        []
    );
}

// ---------------------------------------------------------------------------
// Refresh epochs
// ---------------------------------------------------------------------------

/// The encoded push of a site, as the controller stages it.
fn push_body(
    epoch: u64,
    inserted: Vec<v1::LoadBatch>,
    updated: Vec<v1::LoadBatch>,
    copies: Vec<v1::CopyUpdate>,
) -> Vec<u8> {
    v1::PushRequest {
        epoch,
        inserted,
        updated,
        copies,
        ..v1::PushRequest::default()
    }
    .encode_to_vec()
}

/// A change of patients' surnames, by tuple id.
fn surnames(changes: &[(u64, &str)]) -> v1::CopyUpdate {
    let rows: Vec<Vec<Value>> = changes.iter().map(|(_, s)| vec![text(s)]).collect();
    v1::CopyUpdate {
        relation: "patient".into(),
        columns: strings(&["surname"]),
        tuple_ids: changes.iter().map(|(id, _)| *id).collect(),
        values: Some(encode_rows(1, &rows).expect("rows")),
    }
}

fn stage(store: &dyn GlobalStore, config: &GlobalConfig, code: &str, epoch: u64, body: &[u8]) {
    let record = AuditRecord::new(code, "", "push");
    store
        .stage_push(&site(config, code), epoch, body, &record)
        .expect("stage push");
}

/// An epoch as a test sees it: number, phase, participants, pushed, acked.
type Seen = (u64, Phase, Vec<SiteNo>, Vec<SiteNo>, Vec<SiteNo>);

fn state(epoch: u64, phase: Phase, participants: &[u32], pushed: &[u32], acked: &[u32]) -> Seen {
    let sites = |s: &[u32]| s.iter().map(|&n| SiteNo(n)).collect();
    (
        epoch,
        phase,
        sites(participants),
        sites(pushed),
        sites(acked),
    )
}

/// An epoch's state without its time, with sites sorted.
fn seen(e: &EpochState) -> Seen {
    let sorted = |s: &[SiteNo]| {
        let mut s = s.to_vec();
        s.sort();
        s
    };
    (
        e.epoch,
        e.phase,
        sorted(&e.participants),
        sorted(&e.pushed),
        sorted(&e.acked),
    )
}

fn latest(store: &dyn GlobalStore) -> Seen {
    seen(&store.epoch().expect("epoch").expect("an epoch"))
}

fn epochs_move_through_their_phases(store: &dyn GlobalStore, config: &GlobalConfig) {
    assert_eq!(store.epoch().expect("epoch"), None);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let opened = store.open_epoch(&[SiteNo(1), SiteNo(3)]).expect("open");
    assert_eq!(seen(&opened), state(1, Phase::Collect, &[1, 3], &[], &[]));
    assert!(opened.opened_at >= before, "{opened:?}");
    assert_eq!(store.epoch().expect("epoch"), Some(opened));
    // One epoch at a time.
    assert!(store.open_epoch(&[SiteNo(1)]).is_err());
    // Only the collecting epoch takes pushes.
    let empty = push_body(1, Vec::new(), Vec::new(), Vec::new());
    let record = AuditRecord::new("CPH", "", "push");
    assert!(
        store
            .stage_push(&site(config, "CPH"), 2, &empty, &record)
            .is_err()
    );
    stage(store, config, "GRC", 1, &empty);
    assert_eq!(latest(store), state(1, Phase::Collect, &[1, 3], &[3], &[]));
    // A site that is no participant may push too (it connected late).
    stage(store, config, "STG", 1, &empty);
    assert_eq!(
        latest(store),
        state(1, Phase::Collect, &[1, 3], &[2, 3], &[])
    );
    let summary = store.commit_epoch(1).expect("commit");
    let mut by = summary.pushed_by.clone();
    by.sort();
    assert_eq!(by, ["GRC", "STG"]);
    assert_eq!(
        latest(store),
        state(1, Phase::Distribute, &[1, 3], &[2, 3], &[])
    );
    assert!(
        store
            .stage_push(&site(config, "CPH"), 1, &empty, &record)
            .is_err()
    );
    assert!(store.open_epoch(&[SiteNo(1)]).is_err());
    store.acknowledge(&site(config, "GRC"), 1).expect("ack");
    assert_eq!(
        latest(store),
        state(1, Phase::Distribute, &[1, 3], &[2, 3], &[3])
    );
    store.acknowledge(&site(config, "CPH"), 1).expect("ack");
    store.close_epoch(1).expect("close");
    assert_eq!(
        latest(store),
        state(1, Phase::Closed, &[1, 3], &[2, 3], &[1, 3])
    );
    // The next epoch starts afresh.
    let second = store.open_epoch(&[SiteNo(2)]).expect("open");
    assert_eq!(seen(&second), state(2, Phase::Collect, &[2], &[], &[]));
    assert!(
        store.close_epoch(2).is_err(),
        "a collecting epoch cannot close"
    );
    assert_eq!(
        store.commit_epoch(2).expect("commit"),
        CommitSummary::default()
    );
    assert!(store.commit_epoch(3).is_err(), "there is no epoch 3");
}

/// Before the epoch: CPH's patients 1 and 2, both held by STG, which locks
/// 2. In epoch 1 (every site taking part) CPH first pushes a patient 4 and
/// then replaces that push with a new patient 3 and its patient 1 renamed;
/// STG corrects patient 2 under its lock; GRC changes patient 1 without the
/// lock. Returns the tuple ids by pno.
fn pushes_of_epoch_one(store: &dyn GlobalStore, config: &GlobalConfig) -> BTreeMap<i64, u64> {
    load_patients(
        store,
        config,
        "CPH",
        &[(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")],
    );
    let id = ids(&fetch(store, config, "STG", &all_patients()));
    let stg = site(config, "STG");
    assert_eq!(
        store.lock(&stg, &[patient(id[&CPH_P2])]).expect("lock"),
        LockOutcome::Granted
    );
    store
        .open_epoch(&[SiteNo(1), SiteNo(2), SiteNo(3)])
        .expect("open");
    let replaced = push_body(
        1,
        vec![wire_patients(&[(4, 1_000_004, "Gone")])],
        Vec::new(),
        Vec::new(),
    );
    stage(store, config, "CPH", 1, &replaced);
    let cph = push_body(
        1,
        vec![wire_patients(&[(3, CPH_P3, "Brown")])],
        vec![wire_patients(&[(1, CPH_P1, "Smith-Renamed")])],
        Vec::new(),
    );
    stage(store, config, "CPH", 1, &cph);
    let stg = push_body(
        1,
        Vec::new(),
        Vec::new(),
        vec![surnames(&[(id[&CPH_P2], "Jones-Corrected")])],
    );
    stage(store, config, "STG", 1, &stg);
    let grc = push_body(
        1,
        Vec::new(),
        Vec::new(),
        vec![surnames(&[(id[&CPH_P1], "Hijack")])],
    );
    stage(store, config, "GRC", 1, &grc);
    id
}

fn a_commit_applies_the_pushes_once(store: &dyn GlobalStore, config: &GlobalConfig) {
    pushes_of_epoch_one(store, config);
    assert_eq!(
        latest(store),
        state(1, Phase::Collect, &[1, 2, 3], &[1, 2, 3], &[])
    );
    let mut summary = store.commit_epoch(1).expect("commit");
    summary.pushed_by.sort();
    assert_eq!(
        summary,
        CommitSummary {
            pushed_by: strings(&["CPH", "GRC", "STG"]),
            tuples_pushed: 4,
            inserted: 1,
            updated: 2,
            refused: 1,
            ..CommitSummary::default()
        }
    );
    // A controller that crashed after the commit commits again: the same
    // summary, nothing applied twice.
    let mut again = store.commit_epoch(1).expect("commit again");
    again.pushed_by.sort();
    assert_eq!(again, summary);
    // STG's lock ended with its committed push; the replaced push left
    // nothing behind.
    assert_eq!(counts(store, "patient"), (3, 0));
    let owners = store
        .key_owners(
            "patient",
            &strings(&["pno"]),
            &[vec![Value::Int(CPH_P3)], vec![Value::Int(1_000_004)]],
        )
        .expect("key owners");
    assert_eq!(owners, [Some("CPH".to_string()), None]);
    // What a site that held nothing now fetches.
    let got = fetch(store, config, "GRC", &all_patients());
    assert_eq!(
        got.iter()
            .map(|g| (g.key, g.second.clone(), g.owner))
            .collect::<Vec<_>>(),
        [
            (CPH_P1, text("Smith-Renamed"), 1),
            (CPH_P2, text("Jones-Corrected"), 1),
            (CPH_P3, text("Brown"), 1)
        ]
    );
    // STG still holds patients 1 and 2; patient 3 is new to it.
    assert_eq!(
        keys(&fetch(store, config, "STG", &all_patients())),
        [CPH_P3]
    );
    // Each staging appended its audit record, the replaced one too.
    let pushes = store
        .audit(&AuditFilter {
            site: Some("CPH".into()),
            ..AuditFilter::default()
        })
        .expect("audit");
    assert_eq!(
        pushes.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
        ["push", "push"]
    );
}

fn changes_reach_holders_and_owners(store: &dyn GlobalStore, config: &GlobalConfig) {
    let id = pushes_of_epoch_one(store, config);
    let columns = strings(&["pno", "surname"]);
    let parts = [("patient".to_string(), columns.clone())];
    let changes = |code: &str, since: u64| {
        store
            .changes(
                &site(config, code),
                since,
                &parts,
                &SummaryRequest::default(),
            )
            .expect("changes")
    };
    // Nothing is committed yet.
    let none = changes("STG", 0);
    assert_eq!(
        (none.epoch, none.committed_push, none.changed.len()),
        (0, 0, 0)
    );
    store.commit_epoch(1).expect("commit");
    let part = |ids: Vec<u64>, origins: Vec<u64>, rows: Vec<Vec<Value>>| ChangedPart {
        relation: "patient".into(),
        columns: columns.clone(),
        tuple_ids: ids,
        origins,
        rows,
    };
    // STG holds patient 1, which CPH renamed (its own correction of
    // patient 2 it knows already; patient 3 it does not hold).
    let stg = changes("STG", 0);
    assert_eq!((stg.epoch, stg.committed_push), (1, 1));
    assert_eq!(
        stg.changed,
        [part(
            vec![id[&CPH_P1]],
            vec![0],
            vec![vec![Value::Int(CPH_P1), text("Smith-Renamed")]]
        )]
    );
    assert_eq!(stg.removed, []);
    // CPH owns patient 2, which STG corrected: told with CPH's origin.
    let cph = changes("CPH", 0);
    assert_eq!(
        cph.changed,
        [part(
            vec![id[&CPH_P2]],
            vec![2],
            vec![vec![Value::Int(CPH_P2), text("Jones-Corrected")]]
        )]
    );
    // GRC holds nothing; its refused push was committed all the same.
    let grc = changes("GRC", 0);
    assert_eq!(
        (grc.epoch, grc.committed_push, grc.changed.len()),
        (1, 1, 0)
    );
    // Asked since the epoch it applied, nothing.
    assert_eq!(changes("STG", 1).changed, []);
    // A part of another relation is only what was asked for.
    let visits = store
        .changes(
            &site(config, "STG"),
            0,
            &[("visit".to_string(), strings(&["vno"]))],
            &SummaryRequest::default(),
        )
        .expect("changes");
    assert_eq!(visits.changed, []);
    let bad = store.changes(
        &site(config, "STG"),
        0,
        &[("patient".to_string(), strings(&["shoe_size"]))],
        &SummaryRequest::default(),
    );
    assert!(bad.is_err(), "{bad:?}");
}

/// A changed part with its tuples in id order (the order is no part of the
/// contract).
fn by_tuple_id(mut part: ChangedPart) -> ChangedPart {
    let mut rows: Vec<(u64, u64, Vec<Value>)> = part
        .tuple_ids
        .iter()
        .zip(&part.origins)
        .zip(&part.rows)
        .map(|((&id, &origin), row)| (id, origin, row.clone()))
        .collect();
    rows.sort_by_key(|r| r.0);
    part.tuple_ids = rows.iter().map(|r| r.0).collect();
    part.origins = rows.iter().map(|r| r.1).collect();
    part.rows = rows.into_iter().map(|r| r.2).collect();
    part
}

fn deletes_withdrawals_and_clashes_commit(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(
        store,
        config,
        "CPH",
        &[(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")],
    );
    load_patients(store, config, "STG", &[(1, STG_P1, "Brown")]);
    let id = ids(&fetch(store, config, "STG", &all_patients()));
    let s1 = ids(&fetch(store, config, "GRC", &all_patients()))[&STG_P1];
    store.open_epoch(&[SiteNo(1), SiteNo(2)]).expect("open");
    // CPH stops exporting first names; STG deletes its patient and
    // registers, under a new origin, a patient number CPH owns.
    let cph = v1::PushRequest {
        epoch: 1,
        withdrawn: vec![v1::Withdrawn {
            relation: "patient".into(),
            columns: strings(&["first_names"]),
        }],
        ..v1::PushRequest::default()
    };
    stage(store, config, "CPH", 1, &cph.encode_to_vec());
    let stg = v1::PushRequest {
        epoch: 1,
        inserted: vec![wire_patients(&[(2, CPH_P1, "Clash")])],
        deleted: vec![v1::OwnDeletes {
            relations: strings(&["patient"]),
            origins: vec![1],
        }],
        ..v1::PushRequest::default()
    };
    stage(store, config, "STG", 1, &stg.encode_to_vec());
    let mut summary = store.commit_epoch(1).expect("commit");
    summary.pushed_by.sort();
    assert_eq!(
        summary,
        CommitSummary {
            pushed_by: strings(&["CPH", "STG"]),
            tuples_pushed: 2,
            deleted: 1,
            conflicts: 1,
            withdrawn: 2,
            ..CommitSummary::default()
        }
    );
    // The clash waits for an administrator like one of the initial load.
    let listed = store.conflicts().expect("conflicts");
    assert_eq!(
        listed
            .iter()
            .map(|c| (c.site.as_str(), c.origin, c.holder.as_str()))
            .collect::<Vec<_>>(),
        [("STG", 2, "CPH")]
    );
    // The deleted tuple is gone from the snapshot ...
    let owner = store
        .key_owners("patient", &strings(&["pno"]), &[vec![Value::Int(STG_P1)]])
        .expect("key owners");
    assert_eq!(owner, [None]);
    assert_eq!(counts(store, "patient"), (2, 0));
    // ... but GRC's copy stays (deletes do not propagate here) until GRC
    // releases it, once.
    assert_eq!(
        store
            .changes(&site(config, "GRC"), 0, &[], &SummaryRequest::default())
            .expect("changes")
            .removed,
        []
    );
    let grc = site(config, "GRC");
    assert_eq!(
        store.release_copies(&grc, &[patient(s1)]).expect("release"),
        1
    );
    assert_eq!(
        store.release_copies(&grc, &[patient(s1)]).expect("release"),
        0
    );
    // The withdrawn attribute is NULL, and the holder is told.
    let names = ["pno", "first_names"];
    let got = fetch(store, config, "GRC", &select("patient", &names, None, true));
    assert_eq!(
        got.iter()
            .map(|g| (g.key, g.second.clone()))
            .collect::<Vec<_>>(),
        [(CPH_P1, Value::Null), (CPH_P2, Value::Null)]
    );
    let parts = [("patient".to_string(), strings(&names))];
    let changes = store
        .changes(&site(config, "STG"), 0, &parts, &SummaryRequest::default())
        .expect("changes");
    assert_eq!(
        changes
            .changed
            .into_iter()
            .map(by_tuple_id)
            .collect::<Vec<_>>(),
        [by_tuple_id(ChangedPart {
            relation: "patient".into(),
            columns: strings(&names),
            tuple_ids: vec![id[&CPH_P1], id[&CPH_P2]],
            origins: vec![0, 0],
            rows: vec![
                vec![Value::Int(CPH_P1), Value::Null],
                vec![Value::Int(CPH_P2), Value::Null]
            ],
        })]
    );
}

// ---------------------------------------------------------------------------
// Access rules and the audit trail
// ---------------------------------------------------------------------------

fn access_rules_are_set_replaced_and_removed(store: &dyn GlobalStore, _config: &GlobalConfig) {
    let subject = |site: &str, user: &str| Subject {
        relation: "patient".into(),
        site: site.into(),
        user: user.into(),
    };
    let (grc, clerk) = (subject("GRC", ""), subject("GRC", "CLERK"));
    let record = |action: &str, detail: &str| AuditRecord {
        detail: detail.into(),
        ..AuditRecord::new("admin", "", action)
    };
    let rules = || {
        let mut r = store.acl_rules().expect("rules");
        r.sort();
        r
    };
    assert_eq!(rules(), []);
    assert!(
        !store
            .set_acl(&grc, Some(Right::Read), &record("grant", "GRC read"))
            .expect("set")
    );
    assert!(
        !store
            .set_acl(&clerk, Some(Right::None), &record("grant", "CLERK none"))
            .expect("set")
    );
    assert_eq!(
        rules(),
        [(grc.clone(), Right::Read), (clerk.clone(), Right::None)]
    );
    // Setting again replaces the rule.
    assert!(
        store
            .set_acl(&grc, Some(Right::Write), &record("grant", "GRC write"))
            .expect("set")
    );
    assert_eq!(
        rules(),
        [(grc.clone(), Right::Write), (clerk.clone(), Right::None)]
    );
    assert!(
        store
            .set_acl(&clerk, None, &record("revoke", "CLERK"))
            .expect("remove")
    );
    assert_eq!(rules(), [(grc, Right::Write)]);
    assert!(
        !store
            .set_acl(&clerk, None, &record("revoke", "CLERK"))
            .expect("remove")
    );
    // Every change is on the trail, even the one that changed nothing.
    let trail = store
        .audit(&AuditFilter {
            site: Some("admin".into()),
            ..AuditFilter::default()
        })
        .expect("audit");
    assert_eq!(
        trail
            .iter()
            .map(|r| (r.action.as_str(), r.detail.as_str()))
            .collect::<Vec<_>>(),
        [
            ("grant", "GRC read"),
            ("grant", "CLERK none"),
            ("grant", "GRC write"),
            ("revoke", "CLERK"),
            ("revoke", "CLERK")
        ]
    );
}

/// `n` fetch records at CPH, one patient each.
fn fetches(n: i64) -> Vec<AuditRecord> {
    (0..n)
        .map(|i| AuditRecord {
            at: 2_000 + i,
            site: "CPH".into(),
            user: "RAD1".into(),
            action: "fetch".into(),
            relations: strings(&["patient"]),
            tuples: 1,
            patients: vec![(1_000_001 + i).to_string()],
            ..AuditRecord::default()
        })
        .collect()
}

fn the_audit_trail_is_hash_chained_in_order(store: &dyn GlobalStore, _config: &GlobalConfig) {
    let verdict = |chained, unchained| AuditVerification {
        chained,
        unchained,
        broken: None,
    };
    store.append_audit(&fetches(5)).expect("append");
    assert_eq!(store.verify_audit().expect("verify"), verdict(0, 5));
    assert_eq!(store.seal_audit(3).expect("seal"), 3);
    assert_eq!(store.verify_audit().expect("verify"), verdict(3, 2));
    assert_eq!(store.seal_audit(500).expect("seal"), 2);
    assert_eq!(store.seal_audit(500).expect("seal"), 0, "nothing twice");
    store.append_audit(&fetches(1)).expect("append");
    assert_eq!(store.seal_audit(500).expect("seal"), 1);
    assert_eq!(store.verify_audit().expect("verify"), verdict(6, 0));
}

/// The second fetch record of the trail is changed, then the fourth
/// removed, behind the store's back (`tamper` runs SQL on its database
/// with the append-only triggers out of the way); each time the walk of
/// the chain names the first record that no longer follows.
fn a_changed_or_removed_record_breaks_the_chain(store: &dyn GlobalStore, tamper: &dyn Fn(&str)) {
    store.append_audit(&fetches(6)).expect("append");
    while store.seal_audit(2).expect("seal") > 0 {}
    let ids: Vec<u64> = store
        .audit(&AuditFilter::default())
        .expect("audit")
        .iter()
        .map(|r| r.id)
        .collect();
    tamper(&format!("DELETE FROM snaps_audit WHERE id = {}", ids[3]));
    let found = store.verify_audit().expect("verify");
    let broken = found.broken.expect("a removed record is found");
    assert_eq!((broken.seq, broken.id), (4, ids[3]), "{broken:?}");
    assert!(broken.reason.contains("was removed"), "{broken:?}");
    assert_eq!(found.chained, 3);
    tamper(&format!(
        "UPDATE snaps_audit SET patients = ',1000999,' WHERE id = {}",
        ids[1]
    ));
    let broken = store
        .verify_audit()
        .expect("verify")
        .broken
        .expect("a change is found");
    assert_eq!((broken.seq, broken.id), (2, ids[1]), "{broken:?}");
    assert!(
        broken.reason.contains("is not what was chained"),
        "{broken:?}"
    );
}

#[test]
fn a_changed_or_removed_record_breaks_the_chain_on_sqlite() {
    let (config, _d) = config();
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("global.db");
    let store = SqliteStore::open(&path, &config).expect("SQLite store");
    a_changed_or_removed_record_breaks_the_chain(&store, &|sql| {
        let conn = rusqlite::Connection::open(&path).expect("the store file");
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS snaps_audit_no_update;
             DROP TRIGGER IF EXISTS snaps_audit_no_delete; {sql};"
        ))
        .expect("tamper");
    });
}

#[test]
fn a_changed_or_removed_record_breaks_the_chain_on_postgres() {
    use snaps_global::db::Db;
    let (config, _d) = config();
    let url = snaps::pg_server::PgServer::shared()
        .expect("PostgreSQL server for the tests")
        .create_database("contract_tamper")
        .expect("test database");
    let store = PgStore::connect(&url, &config).expect("PostgreSQL store");
    let db = snaps_global::db::postgres::PgDb::connect(&url).expect("a connection");
    a_changed_or_removed_record_breaks_the_chain(&store, &|sql| {
        db.transaction(&mut |tx| {
            tx.batch(&format!(
                "ALTER TABLE snaps_audit DISABLE TRIGGER USER; {sql};
                 ALTER TABLE snaps_audit ENABLE TRIGGER USER;"
            ))
        })
        .expect("tamper");
    });
}

fn the_audit_trail_is_filtered_oldest_first(store: &dyn GlobalStore, _config: &GlobalConfig) {
    let record = |at: i64, site: &str, action: &str, patients: &[&str]| AuditRecord {
        id: 0,
        at,
        site: site.into(),
        user: "RAD1".into(),
        action: action.into(),
        relations: strings(&["patient", "visit"]),
        tuples: patients.len() as u64,
        patients: strings(patients),
        detail: format!("at {at}"),
    };
    let a = record(1_000, "CPH", "fetch", &["1000001", "1000002"]);
    // A patient whose number contains the other's must not be found for it.
    let b = record(1_010, "STG", "fetch", &["10000011"]);
    let c = record(1_020, "CPH", "lock", &[]);
    let d = record(1_030, "GRC", "fetch-denied", &[]);
    store.append_audit(&[a.clone(), b.clone()]).expect("append");
    store.append_audit(&[]).expect("append nothing");
    store.append_audit(&[c.clone(), d.clone()]).expect("append");
    let read = |filter: AuditFilter| {
        let records = store.audit(&filter).expect("audit");
        records
            .into_iter()
            .map(|r| AuditRecord { id: 0, ..r })
            .collect::<Vec<_>>()
    };
    let all = store.audit(&AuditFilter::default()).expect("audit");
    let numbers: Vec<u64> = all.iter().map(|r| r.id).collect();
    assert!(
        numbers[0] > 0 && numbers.windows(2).all(|w| w[0] < w[1]),
        "{numbers:?}"
    );
    assert_eq!(
        read(AuditFilter::default()),
        [a.clone(), b.clone(), c.clone(), d.clone()]
    );
    let by_site = AuditFilter {
        site: Some("CPH".into()),
        ..AuditFilter::default()
    };
    assert_eq!(read(by_site.clone()), [a.clone(), c.clone()]);
    let by_patient = |p: &str| AuditFilter {
        patient: Some(p.into()),
        ..AuditFilter::default()
    };
    assert_eq!(read(by_patient("1000001")), vec![a.clone()]);
    assert_eq!(read(by_patient("10000011")), vec![b.clone()]);
    assert_eq!(read(by_patient("100000")), []);
    // A limit keeps the newest, still oldest first.
    let limit = |n: u32, f: AuditFilter| AuditFilter {
        limit: Some(n),
        ..f
    };
    assert_eq!(
        read(limit(2, AuditFilter::default())),
        [c.clone(), d.clone()]
    );
    assert_eq!(read(limit(1, by_site)), vec![c.clone()]);
    let since = AuditFilter {
        since: Some(1_020),
        ..AuditFilter::default()
    };
    assert_eq!(read(since), [c, d]);
}

// ---------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------

fn activity_adds_up_in_status(store: &dyn GlobalStore, _config: &GlobalConfig) {
    let activity = |base: u64, last_seen: i64| Activity {
        bytes_received: base,
        bytes_sent: base * 2,
        last_seen,
        fetches: 1,
        tuples_sent: base / 10,
        locks_granted: 1,
        locks_refused: 2,
    };
    store
        .record_activity(&[
            (SiteNo(2), activity(100, 5_000)),
            (SiteNo(3), activity(10, 4_000)),
        ])
        .expect("activity");
    // A batch written later may carry an earlier last request.
    store
        .record_activity(&[(SiteNo(2), activity(300, 4_500))])
        .expect("activity");
    let status = store.status().expect("status");
    let site = |code: &str| {
        let s = status
            .sites
            .iter()
            .find(|s| s.code == code)
            .unwrap_or_else(|| panic!("status lists no {code}"));
        (
            s.number,
            s.bytes_received,
            s.bytes_sent,
            s.last_seen,
            s.fetches,
            s.tuples_sent,
            s.locks_granted,
            s.locks_refused,
        )
    };
    assert_eq!(site("STG"), (2, 400, 800, 5_000, 2, 40, 2, 4));
    assert_eq!(site("GRC"), (3, 10, 20, 4_000, 1, 1, 1, 2));
    assert_eq!(site("CPH"), (1, 0, 0, 0, 0, 0, 0, 0));
    assert_eq!(status.sites.len(), 3);
}

fn status_counts_tuples_locks_owners_and_conflicts(store: &dyn GlobalStore, config: &GlobalConfig) {
    let empty = store.status().expect("status");
    let mut names: Vec<&str> = empty.relations.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "doctor",
            "out_go_r",
            "patient",
            "sites",
            "visit",
            "visit_rep"
        ]
    );
    assert!(
        empty
            .relations
            .iter()
            .all(|r| (r.tuples, r.locked) == (0, 0))
    );
    assert_eq!(empty.conflicts, 0);

    load_patients(
        store,
        config,
        "CPH",
        &[(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")],
    );
    load_visits(store, config, "CPH", &[(1, 1_000_501, CPH_P1)]);
    load_patients(
        store,
        config,
        "STG",
        &[(1, STG_P1, "Brown"), (2, CPH_P2, "Clash")],
    );
    let id = ids(&fetch(store, config, "GRC", &all_patients()));
    let grc = site(config, "GRC");
    assert_eq!(
        store.lock(&grc, &[patient(id[&STG_P1])]).expect("lock"),
        LockOutcome::Granted
    );

    let status = store.status().expect("status");
    let relation = |name: &str| {
        let r = status
            .relations
            .iter()
            .find(|r| r.name == name)
            .expect("relation");
        (r.mode, r.tuples, r.locked)
    };
    assert_eq!(relation("patient"), (RelationMode::ReadWrite, 3, 1));
    assert_eq!(relation("visit"), (RelationMode::ReadOnly, 1, 0));
    assert_eq!(relation("doctor"), (RelationMode::ReadWrite, 0, 0));
    let owned = |code: &str| {
        let s = status.sites.iter().find(|s| s.code == code).expect("site");
        (s.number, s.name.as_str(), s.owned_tuples)
    };
    assert_eq!(owned("CPH"), (1, "Christchurch Public Hospital", 3));
    assert_eq!(owned("STG"), (2, "St Georges Hospital", 1));
    assert_eq!(owned("GRC"), (3, "Gloucester Radiology Clinic", 0));
    assert_eq!(status.conflicts, 1);
}

// ---------------------------------------------------------------------------
// Kept join groups
// ---------------------------------------------------------------------------

fn kept_groups_round_trip_per_site(store: &dyn GlobalStore, config: &GlobalConfig) {
    let (stg, grc) = (site(config, "STG"), site(config, "GRC"));
    store
        .remember_groups(&stg, &[(7, b"seven".to_vec()), (8, b"eight".to_vec())])
        .expect("remember");
    store
        .remember_groups(&grc, &[(7, b"GRC's seven".to_vec())])
        .expect("remember");
    store.remember_groups(&stg, &[]).expect("remember nothing");
    let recalled = store.recall_groups(&stg, &[7, 9]).expect("recall");
    assert_eq!(
        recalled.into_iter().collect::<BTreeMap<_, _>>(),
        BTreeMap::from([(7, b"seven".to_vec())])
    );
    // Names are the site's own.
    let recalled = store.recall_groups(&grc, &[7, 8]).expect("recall");
    assert_eq!(
        recalled.into_iter().collect::<BTreeMap<_, _>>(),
        BTreeMap::from([(7, b"GRC's seven".to_vec())])
    );
    assert!(
        store
            .recall_groups(&site(config, "CPH"), &[7, 8])
            .expect("recall")
            .is_empty()
    );
    // A body kept again under its name replaces the old one.
    store
        .remember_groups(&stg, &[(7, b"seven, again".to_vec())])
        .expect("remember");
    let recalled = store.recall_groups(&stg, &[8, 7]).expect("recall");
    assert_eq!(
        recalled.into_iter().collect::<BTreeMap<_, _>>(),
        BTreeMap::from([(7, b"seven, again".to_vec()), (8, b"eight".to_vec())])
    );
    assert!(store.recall_groups(&stg, &[]).expect("recall").is_empty());
}

fn standing_groups_follow_change_standing(store: &dyn GlobalStore, config: &GlobalConfig) {
    let (stg, grc) = (site(config, "STG"), site(config, "GRC"));
    store
        .remember_groups(
            &stg,
            &[
                (7, b"seven".to_vec()),
                (8, b"eight".to_vec()),
                (9, b"nine".to_vec()),
            ],
        )
        .expect("remember");
    assert_eq!(store.standing_groups(&stg).expect("standing"), []);
    // 99 has no body: reported, and not standing.
    assert_eq!(
        store
            .change_standing(&stg, &[8, 99], &[], false)
            .expect("standing"),
        (vec![99], 1)
    );
    assert_eq!(
        store
            .change_standing(&stg, &[7], &[], false)
            .expect("standing"),
        (vec![], 2)
    );
    assert_eq!(
        store.standing_groups(&stg).expect("standing"),
        [(7, b"seven".to_vec()), (8, b"eight".to_vec())]
    );
    assert_eq!(
        store
            .change_standing(&stg, &[], &[8], false)
            .expect("standing"),
        (vec![], 1)
    );
    // With `whole`, the added names and no others.
    assert_eq!(
        store
            .change_standing(&stg, &[9], &[], true)
            .expect("standing"),
        (vec![], 1)
    );
    assert_eq!(
        store.standing_groups(&stg).expect("standing"),
        [(9, b"nine".to_vec())]
    );
    // A body kept again stays standing, with the new body.
    store
        .remember_groups(&stg, &[(9, b"nine, again".to_vec())])
        .expect("remember");
    assert_eq!(
        store.standing_groups(&stg).expect("standing"),
        [(9, b"nine, again".to_vec())]
    );
    // Another site's names are not STG's.
    assert_eq!(
        store
            .change_standing(&grc, &[9], &[], false)
            .expect("standing"),
        (vec![9], 0)
    );
    assert_eq!(store.standing_groups(&grc).expect("standing"), []);
    assert_eq!(
        store
            .change_standing(&stg, &[], &[], true)
            .expect("standing"),
        (vec![], 0)
    );
    assert_eq!(store.standing_groups(&stg).expect("standing"), []);
}

// ---------------------------------------------------------------------------
// Sent-to bits
// ---------------------------------------------------------------------------

fn resync_sets_sent_to_bits_exactly(store: &dyn GlobalStore, config: &GlobalConfig) {
    load_patients(
        store,
        config,
        "CPH",
        &[
            (1, CPH_P1, "Smith"),
            (2, CPH_P2, "Jones"),
            (3, CPH_P3, "Brown"),
        ],
    );
    let id = ids(&fetch(store, config, "STG", &all_patients()));
    fetch(store, config, "GRC", &all_patients());
    let stg = site(config, "STG");
    let held = |pnos: &[i64]| {
        BTreeMap::from([(
            "patient".to_string(),
            pnos.iter().map(|p| id[p]).collect::<BTreeSet<u64>>(),
        )])
    };
    // STG lost its copies of patients 2 and 3.
    assert_eq!(
        store.resync(&stg, &held(&[CPH_P1])).expect("resync"),
        (0, 2)
    );
    assert_eq!(
        store.resync(&stg, &held(&[CPH_P1])).expect("resync"),
        (0, 0)
    );
    // It found patient 2 again.
    assert_eq!(
        store
            .resync(&stg, &held(&[CPH_P1, CPH_P2]))
            .expect("resync"),
        (1, 0)
    );
    assert_eq!(
        keys(&fetch(store, config, "STG", &all_patients())),
        [CPH_P3]
    );
    // GRC's bits are its own.
    assert_eq!(fetch(store, config, "GRC", &all_patients()), []);
    // Holding nothing at all.
    assert_eq!(
        store.resync(&stg, &BTreeMap::new()).expect("resync"),
        (0, 3)
    );
    assert_eq!(
        keys(&fetch(store, config, "STG", &all_patients())),
        [CPH_P1, CPH_P2, CPH_P3]
    );
    let unknown = BTreeMap::from([("nurse".to_string(), BTreeSet::from([1]))]);
    assert!(store.resync(&stg, &unknown).is_err());
    assert_eq!(fetch(store, config, "STG", &all_patients()), []);
}

// ---------------------------------------------------------------------------
// Calls at once
// ---------------------------------------------------------------------------

fn a_lock_storm_never_grants_one_tuple_twice(store: &dyn GlobalStore, config: &GlobalConfig) {
    use std::sync::atomic::{AtomicU32, Ordering};
    load_patients(
        store,
        config,
        "CPH",
        &[(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")],
    );
    let id = ids(&fetch(store, config, "STG", &all_patients()));
    fetch(store, config, "GRC", &all_patients());
    let (p1, p2) = (patient(id[&CPH_P1]), patient(id[&CPH_P2]));
    // Sites holding the pair now; more than one would be a double grant.
    let holding = AtomicU32::new(0);
    let granted = AtomicU32::new(0);
    std::thread::scope(|s| {
        for (k, code) in ["CPH", "STG", "GRC"].into_iter().enumerate() {
            let me = site(config, code);
            // Opposite orders, so the requests also meet as deadlocks.
            let pair = if k % 2 == 0 {
                vec![p1.clone(), p2.clone()]
            } else {
                vec![p2.clone(), p1.clone()]
            };
            let (holding, granted) = (&holding, &granted);
            s.spawn(move || {
                for _ in 0..25 {
                    match store.lock(&me, &pair).expect("lock request") {
                        LockOutcome::Granted => {
                            assert_eq!(
                                holding.fetch_add(1, Ordering::SeqCst),
                                0,
                                "{code} granted a held lock"
                            );
                            granted.fetch_add(1, Ordering::SeqCst);
                            holding.fetch_sub(1, Ordering::SeqCst);
                            assert_eq!(store.unlock(&me, &pair).expect("unlock"), 2);
                        }
                        LockOutcome::Refused { reason, .. } => assert_eq!(reason, Refusal::Locked),
                    }
                }
            });
        }
    });
    assert!(
        granted.load(Ordering::SeqCst) >= 3,
        "some requests were granted"
    );
    assert_eq!(counts(store, "patient"), (2, 0), "no lock is left behind");
}

fn fetches_at_once_send_each_tuple_once(store: &dyn GlobalStore, config: &GlobalConfig) {
    let tuples: Vec<(u64, i64, &str)> = (1..=40).map(|i| (i, CPH_P1 + i as i64, "Smith")).collect();
    load_patients(store, config, "CPH", &tuples);
    let sent = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let got = keys(&fetch(store, config, "STG", &all_patients()));
                sent.lock().expect("lock").extend(got);
            });
        }
    });
    let mut sent = sent.into_inner().expect("lock");
    sent.sort_unstable();
    let expected: Vec<i64> = tuples.iter().map(|t| t.1).collect();
    assert_eq!(sent, expected, "every tuple sent to STG exactly once");
}

// ---------------------------------------------------------------------------
// Opening a store
// ---------------------------------------------------------------------------

/// Marks the store's version as one a newer build would write.
fn from_the_future(db: &impl snaps_global::db::Db) {
    db.transaction(&mut |tx| {
        tx.execute(
            "UPDATE snaps_meta SET value = '99' WHERE key = 'store_version'",
            &[],
        )
    })
    .expect("set the version");
}

#[test]
fn a_store_of_a_newer_version_is_refused_naming_both_versions() {
    let (config, _d) = config();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("global.db");
    drop(SqliteStore::open(&file, &config).expect("SQLite store"));
    from_the_future(&snaps_global::db::sqlite::SqliteDb::open(&file).expect("file"));
    let err = SqliteStore::open(&file, &config)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("store version 99")
            && err.contains(&format!("up to {}", snaps_global::sql_store::STORE_VERSION)),
        "{err}"
    );

    let url = snaps::pg_server::PgServer::shared()
        .expect("PostgreSQL server")
        .create_database("future")
        .expect("database");
    drop(PgStore::connect(&url, &config).expect("PostgreSQL store"));
    from_the_future(&snaps_global::db::postgres::PgDb::connect(&url).expect("server"));
    let err = PgStore::connect(&url, &config)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("store version 99")
            && err.contains(&format!("up to {}", snaps_global::sql_store::STORE_VERSION)),
        "{err}"
    );
}

#[test]
fn an_unreachable_postgres_store_is_a_clear_error() {
    let (config, _d) = config();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("postgresql://snaps:secret@127.0.0.1:{port}/snaps");
    let err = PgStore::connect(&url, &config)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains(&format!(
            "the PostgreSQL store at snaps@127.0.0.1:{port}/snaps cannot be reached"
        )),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
    let err = PgStore::connect("postgresql://snaps@127.0.0.1:notaport/x", &config)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("is not a PostgreSQL URL"), "{err}");
}

#[test]
fn a_postgres_store_over_tls_trusts_only_its_ca() {
    let (mut config, dir) = config();
    let certs = dir.path().join("certs");
    snaps::localnet::issue_certificates(&certs, &config.network).expect("certificates");
    // The database server presents a certificate of the network's CA for
    // 127.0.0.1 (any CA would do: store_ca names the one to trust).
    let server = snaps::pg_server::PgServer::start_tls(
        &certs.join("CPH-sql/cert.pem"),
        &certs.join("CPH-sql/key.pem"),
    )
    .expect("PostgreSQL server with TLS");
    let url = format!(
        "{}?sslmode=require",
        server.create_database("tls").expect("database")
    );
    let err = PgStore::connect(&url, &config)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("sslmode=require needs store_ca"), "{err}");
    config.store_ca = Some(certs.join("ca.pem"));
    let store = PgStore::connect(&url, &config).expect("PostgreSQL store over TLS");
    assert_eq!(store.status().expect("status").conflicts, 0);
    drop(store);
    // A CA that did not sign the server's certificate: refused.
    let other = dir.path().join("other");
    snaps_proto::tls::issue_network(&other, "elsewhere", &["127.0.0.1".into()]).expect("other CA");
    config.store_ca = Some(other.join("ca.pem"));
    let err = PgStore::connect(&url, &config)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("cannot be reached"), "{err}");
}

// ---------------------------------------------------------------------------
// I/O errors at every Nth write
// ---------------------------------------------------------------------------

/// When the next writes of a [`Faulty`] database fail: from the `n`-th one
/// counted after arming.
#[derive(Default)]
struct Fault {
    armed: std::sync::atomic::AtomicBool,
    left: std::sync::atomic::AtomicU64,
    hit: std::sync::atomic::AtomicBool,
    /// SQL the next transaction runs first (a pragma of the connection).
    first: std::sync::Mutex<Option<String>>,
}

/// A database whose `n`-th write fails as a disk error would (SQLite's
/// `SQLITE_IOERR_WRITE`), and every write after it in that transaction;
/// reads are untouched. The store sees what it would see of a failing disk.
struct Faulty<D: snaps_global::db::Db> {
    inner: D,
    fault: Arc<Fault>,
}

struct FaultyTx<'a> {
    inner: &'a mut dyn snaps_global::db::Tx,
    fault: &'a Fault,
}

impl FaultyTx<'_> {
    fn write(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.fault.armed.load(SeqCst) {
            return Ok(());
        }
        if self.fault.hit.load(SeqCst) || self.fault.left.fetch_sub(1, SeqCst) <= 1 {
            self.fault.hit.store(true, SeqCst);
            return Err(Error::Storage(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_WRITE),
                Some("disk I/O error (injected)".into()),
            )));
        }
        Ok(())
    }
}

/// Whether a statement run for rows writes (`INSERT ... RETURNING`).
fn writes(sql: &str) -> bool {
    let head = sql.trim_start().to_ascii_uppercase();
    [
        "INSERT", "UPDATE", "DELETE", "WITH", "CREATE", "DROP", "ALTER",
    ]
    .iter()
    .any(|w| head.starts_with(w))
}

impl snaps_global::db::Tx for FaultyTx<'_> {
    fn dialect(&self) -> snaps_global::db::Dialect {
        self.inner.dialect()
    }
    fn query(
        &mut self,
        sql: &str,
        params: &[snaps_global::db::Cell],
    ) -> Result<Vec<snaps_global::db::Row>, Error> {
        if writes(sql) {
            self.write()?;
        }
        self.inner.query(sql, params)
    }
    fn execute(&mut self, sql: &str, params: &[snaps_global::db::Cell]) -> Result<u64, Error> {
        self.write()?;
        self.inner.execute(sql, params)
    }
    fn batch(&mut self, sql: &str) -> Result<(), Error> {
        self.write()?;
        self.inner.batch(sql)
    }
}

impl<D: snaps_global::db::Db> snaps_global::db::Db for Faulty<D> {
    fn dialect(&self) -> snaps_global::db::Dialect {
        self.inner.dialect()
    }
    fn transaction<T>(
        &self,
        f: &mut dyn FnMut(&mut dyn snaps_global::db::Tx) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let fault = &self.fault;
        if let Some(sql) = fault.first.lock().expect("fault").take() {
            self.inner.transaction(&mut |tx| tx.batch(&sql))?;
        }
        self.inner.transaction(&mut |tx| {
            let mut faulty = FaultyTx { inner: tx, fault };
            f(&mut faulty)
        })
    }
}

/// A fresh SQLite store on a [`Faulty`] database: its folder, file, the
/// store and the fault that arms it.
fn faulty_store(
    config: &GlobalConfig,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    snaps_global::sql_store::SqlStore<Faulty<snaps_global::db::sqlite::SqliteDb>>,
    Arc<Fault>,
) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("global.db");
    let fault = Arc::new(Fault::default());
    let db = Faulty {
        inner: snaps_global::db::sqlite::SqliteDb::open(&path).expect("file"),
        fault: fault.clone(),
    };
    let store = snaps_global::sql_store::SqlStore::on(db, config).expect("store");
    (dir, path, store, fault)
}

/// Every table of the SQLite store file, row for row, without the columns
/// that hold the time of day.
fn dump(path: &Path) -> BTreeMap<String, Vec<String>> {
    const TIMES: [&str; 9] = [
        "at",
        "set_at",
        "recorded_at",
        "seen_at",
        "opened_at",
        "committed_at",
        "closed_at",
        "pushed_at",
        "expires_at",
    ];
    let conn = rusqlite::Connection::open(path).expect("the store file");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("tables");
    tables
        .into_iter()
        .map(|t| {
            let mut stmt = conn
                .prepare(&format!("SELECT * FROM \"{t}\""))
                .expect("select");
            let keep: Vec<usize> = (0..stmt.column_count())
                .filter(|&i| !TIMES.contains(&stmt.column_name(i).unwrap_or("")))
                .collect();
            let mut rows: Vec<String> = stmt
                .query_map([], |r| {
                    Ok(keep
                        .iter()
                        .map(|&i| format!("{:?}", r.get_ref(i).map(|v| v.to_owned())))
                        .collect::<Vec<_>>()
                        .join("|"))
                })
                .and_then(|rows| rows.collect())
                .expect("rows");
            rows.sort();
            (t, rows)
        })
        .collect()
}

/// Runs `op` on a store built afresh by `setup` for every N = 1, 2, …,
/// with the store's N-th write of `op` failing, until `op` completes
/// without reaching it. After each failure the store reads exactly as
/// before `op`, and `op` run again without the fault completes and leaves
/// the store as a run that never failed does. Returns the writes `op`
/// makes.
fn at_every_write(
    setup: &dyn Fn(&dyn GlobalStore, &GlobalConfig),
    op: &dyn Fn(&dyn GlobalStore, &GlobalConfig) -> Result<(), Error>,
) -> u64 {
    use std::sync::atomic::Ordering::SeqCst;
    let (config, _d) = config();
    let fresh = || {
        let (dir, path, store, fault) = faulty_store(&config);
        setup(&store, &config);
        (dir, path, store, fault)
    };
    let (_keep, reference_path, reference, _) = fresh();
    let untouched = dump(&reference_path);
    op(&reference, &config).expect("the operation without faults");
    let expected = dump(&reference_path);
    assert_ne!(expected, untouched, "the operation changes the store");
    for n in 1.. {
        let (_keep, path, store, fault) = fresh();
        let before = dump(&path);
        fault.left.store(n, SeqCst);
        fault.armed.store(true, SeqCst);
        let outcome = op(&store, &config);
        fault.armed.store(false, SeqCst);
        if !fault.hit.load(SeqCst) {
            outcome.unwrap_or_else(|e| panic!("write {n} did not fail, yet: {e}"));
            assert_eq!(dump(&path), expected, "no fault reached at write {n}");
            return n - 1;
        }
        let e = outcome.expect_err("the operation hit a failing write and reported it");
        assert!(e.to_string().contains("disk I/O error"), "write {n}: {e}");
        assert_eq!(
            dump(&path),
            before,
            "write {n} failed: nothing of the operation is kept"
        );
        op(&store, &config).unwrap_or_else(|e| panic!("run again after write {n} failed: {e}"));
        assert_eq!(dump(&path), expected, "run again after write {n} failed");
    }
    unreachable!()
}

#[test]
fn an_io_error_at_any_write_of_a_load_keeps_nothing_and_the_load_runs_again() {
    let writes = at_every_write(
        &|store, config| {
            load_patients(store, config, "CPH", &[(1, CPH_P1, "Smith")]);
        },
        &|store, config| {
            let batch = decode(
                config,
                &wire_patients(&[
                    (1, STG_P1, "Brown"),
                    (2, 10_000_002, "Jones"),
                    (3, CPH_P1, "Taken"),
                ]),
            );
            store.load(&site(config, "STG"), &batch).map(|_| ())
        },
    );
    assert!(writes >= 2, "{writes} writes");
}

#[test]
fn an_io_error_at_any_write_of_a_lock_keeps_nothing_and_the_lock_runs_again() {
    let setup = |store: &dyn GlobalStore, config: &GlobalConfig| {
        load_patients(
            store,
            config,
            "CPH",
            &[
                (1, CPH_P1, "Smith"),
                (2, CPH_P2, "Jones"),
                (3, CPH_P3, "Brown"),
            ],
        );
        fetch(store, config, "STG", &all_patients());
    };
    let writes = at_every_write(&setup, &|store, config| {
        // Tuple ids follow the load: 1, 2, 3.
        let tuples = [patient(1), patient(2), patient(3)];
        let outcome = store.lock_audited(&site(config, "STG"), &tuples, &mut |_| {
            AuditRecord::new("STG", "RAD1", "lock")
        })?;
        assert_eq!(outcome, LockOutcome::Granted);
        Ok(())
    });
    assert!(
        writes >= 4,
        "three locks and the audit record: {writes} writes"
    );
}

#[test]
fn an_io_error_at_any_write_of_a_fetch_sends_nothing_and_the_fetch_runs_again() {
    let writes = at_every_write(
        &|store, config| {
            load_patients(
                store,
                config,
                "CPH",
                &[(1, CPH_P1, "Smith"), (2, CPH_P2, "Jones")],
            );
        },
        &|store, config| {
            let q = FetchQuery::decode(&all_patients(), &config.catalog).expect("a valid fetch");
            let tables = store.fetch_audited(&site(config, "STG"), &q, &mut |_| {
                AuditRecord::new("STG", "RAD1", "fetch")
            })?;
            assert_eq!(keys(&flatten(&tables)), [CPH_P1, CPH_P2]);
            Ok(())
        },
    );
    assert!(
        writes >= 2,
        "the sent-to bits and the audit record: {writes} writes"
    );
}

#[test]
fn an_io_error_at_any_write_of_an_audit_append_keeps_none_of_it() {
    let writes = at_every_write(&|_, _| {}, &|store, _| store.append_audit(&fetches(4)));
    assert_eq!(writes, 4);
}

#[test]
fn an_io_error_at_any_write_of_an_epoch_commit_keeps_nothing_and_the_commit_runs_again() {
    let writes = at_every_write(
        &|store, config| {
            pushes_of_epoch_one(store, config);
        },
        &|store, _| store.commit_epoch(1).map(|_| ()),
    );
    assert!(writes >= 5, "{writes} writes");
}

#[test]
fn a_full_disk_refuses_a_load_clearly_keeps_what_was_there_and_the_load_completes_later() {
    let (config, _d) = config();
    let (_dir, path, store, fault) = faulty_store(&config);
    load_patients(&store, &config, "CPH", &[(1, CPH_P1, "Smith")]);
    let before = dump(&path);
    // The file may grow by two pages: a load of 2,000 patients needs more.
    let pages: i64 = rusqlite::Connection::open(&path)
        .and_then(|c| c.query_row("PRAGMA page_count", [], |r| r.get(0)))
        .expect("page count");
    *fault.first.lock().expect("fault") = Some(format!("PRAGMA max_page_count = {}", pages + 2));
    let many: Vec<(u64, i64, String)> = (0..2000)
        .map(|i| {
            (
                i + 1,
                10_000_001 + i as i64,
                format!("Patient-{i:04}-Surname"),
            )
        })
        .collect();
    let rows: Vec<(u64, i64, &str)> = many.iter().map(|(o, p, s)| (*o, *p, s.as_str())).collect();
    let batch = decode(&config, &wire_patients(&rows));
    let e = store
        .load(&site(&config, "STG"), &batch)
        .expect_err("the disk is full");
    assert!(e.to_string().contains("full"), "{e}");
    assert_eq!(dump(&path), before, "nothing lost, nothing half-written");
    *fault.first.lock().expect("fault") = Some("PRAGMA max_page_count = 1073741823".into());
    let loaded = store
        .load(&site(&config, "STG"), &batch)
        .expect("room again");
    assert_eq!(loaded.loaded, 2000);
    assert_eq!(counts(&store, "patient").0, 2001);
}
