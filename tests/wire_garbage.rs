//! The messages the global controller decodes — fetches, load batches,
//! refresh pushes, tuple references — damaged at random (bytes flipped,
//! cut short, inserted, or whole garbage): decoding never panics, a
//! message it accepts is run on a real store without a panic, and every
//! refusal is an error of the request (invalid argument, not found,
//! failed precondition), never an internal one. Seeded property tests, so
//! CI runs the same cases every time (PROPTEST_RNG_SEED).

use std::path::Path;

use proptest::prelude::*;
use prost::Message;
use snaps_global::query::FetchQuery;
use snaps_global::store::{LoadBatch, Push, SiteId, TupleRef};
use snaps_global::{Error, GlobalConfig, GlobalStore, SqliteStore};
use snaps_mapping::Statement;
use snaps_schema::{NetworkConfig, Value};

fn network() -> NetworkConfig {
    NetworkConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/radiology"))
        .expect("the radiology network")
}

fn config(dir: &Path) -> GlobalConfig {
    GlobalConfig::new(
        "127.0.0.1:0".parse().expect("address"),
        dir.join("global.db"),
        network(),
        Default::default(),
        Default::default(),
        Default::default(),
    )
    .expect("global configuration")
}

/// Fetch requests a site sends for a few everyday queries, encoded.
fn fetches() -> Vec<Vec<u8>> {
    let net = network();
    let local = net
        .local_catalog(net.site("STG").expect("site"))
        .expect("local schema");
    let m = snaps::localnet::site_mapping(&net, "STG").expect("mapping");
    [
        "SELECT * FROM patient WHERE surname = 'Smith' AND dob > 19400101",
        "SELECT v.vno, v.date FROM patient p, visit v WHERE p.pno = v.pno AND p.pno = 1000146",
        "SELECT r.line FROM visit_rep r WHERE r.vno IN (1, 2, 3)",
        "SELECT p.surname FROM patient p LEFT JOIN visit v ON v.pno = p.pno WHERE p.sex = 'F'",
    ]
    .iter()
    .filter_map(|q| {
        let (_, statements) = snaps_mapping::parse(q).ok()?;
        let Statement::Select(select) = statements.into_iter().next()? else {
            return None;
        };
        let plan = snaps_mapping::rewrite::plan(&select, &local, &m).ok()?;
        Some(snaps_proto::fetch_request(plan.query.as_ref()?).encode_to_vec())
    })
    .collect()
}

/// A load batch of two patients, encoded.
fn load() -> Vec<u8> {
    let columns = ["pno", "surname", "first_names", "dob"];
    let rows = vec![
        vec![
            Value::Int(10_000_001),
            Value::text("Brown"),
            Value::text("Ann"),
            Value::Int(19500101),
        ],
        vec![
            Value::Int(10_000_002),
            Value::text("Jones"),
            Value::Null,
            Value::Int(19611231),
        ],
    ];
    snaps_proto::v1::LoadBatch {
        shape: Some(snaps_proto::v1::Shape {
            parts: vec![snaps_proto::v1::Part {
                var: "x".into(),
                relation: "patient".into(),
                columns: columns.iter().map(|c| c.to_string()).collect(),
                attributes: Vec::new(),
            }],
            split: None,
        }),
        origins: vec![1, 2],
        values: vec![snaps_proto::encode_rows(columns.len(), &rows).expect("rows")],
    }
    .encode_to_vec()
}

/// A push of epoch 1: one new patient, one changed copy, one delete.
fn push() -> Vec<u8> {
    let batch = snaps_proto::v1::LoadBatch::decode(load().as_slice()).expect("load batch");
    snaps_proto::v1::PushRequest {
        epoch: 1,
        inserted: vec![batch.clone()],
        updated: vec![batch],
        copies: vec![snaps_proto::v1::CopyUpdate {
            relation: "patient".into(),
            columns: vec!["surname".into()],
            tuple_ids: vec![1],
            values: Some(snaps_proto::encode_rows(1, &[vec![Value::text("Kelly")]]).expect("rows")),
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// One damage to an encoded message.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Drop(usize, usize),
}

fn damages() -> impl Strategy<Value = Vec<Damage>> {
    let one = prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
        any::<usize>().prop_map(Damage::Cut),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(i, b)| Damage::Insert(i, b)),
        (any::<usize>(), 1usize..6).prop_map(|(i, n)| Damage::Drop(i, n)),
    ];
    prop::collection::vec(one, 1..5)
}

fn damage(mut bytes: Vec<u8>, ds: &[Damage]) -> Vec<u8> {
    for d in ds {
        let len = bytes.len().max(1);
        match d {
            Damage::Flip(i, x) if !bytes.is_empty() => bytes[i % len] ^= x,
            Damage::Cut(i) => bytes.truncate(i % len),
            Damage::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Damage::Drop(i, n) if !bytes.is_empty() => {
                let at = i % len;
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
            _ => {}
        }
    }
    bytes
}

/// A refusal a site can act on: its request was wrong, or does not apply.
fn of_the_request(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidArgument(_) | Error::NotFound(_) | Error::FailedPrecondition(_)
    )
}

/// Decodes and, where accepted, runs one damaged message of each kind on
/// `store`.
fn feed(store: &SqliteStore, config: &GlobalConfig, which: usize, bytes: &[u8]) {
    let stg = SiteId {
        code: "STG".into(),
        number: snaps_schema::SiteNo(2),
    };
    let check = |what: &str, r: Result<(), Error>| {
        if let Err(e) = r {
            assert!(of_the_request(&e), "{what}: not a request error: {e:?}");
            assert!(!e.to_string().is_empty());
        }
    };
    match which {
        0 => {
            let Ok(req) = snaps_proto::v1::FetchRequest::decode(bytes) else {
                return;
            };
            check(
                "fetch",
                FetchQuery::decode(&req, &config.catalog)
                    .and_then(|q| store.fetch(&stg, &q).map(|_| ())),
            );
        }
        1 => {
            let Ok(b) = snaps_proto::v1::LoadBatch::decode(bytes) else {
                return;
            };
            check(
                "load",
                LoadBatch::decode(&b, &config.catalog)
                    .and_then(|b| store.load(&stg, &b).map(|_| ())),
            );
        }
        2 => {
            let Ok(p) = snaps_proto::v1::PushRequest::decode(bytes) else {
                return;
            };
            check("push", Push::decode(&p, &config.catalog).map(|_| ()));
        }
        _ => {
            let Ok(t) = snaps_proto::v1::TupleRef::decode(bytes) else {
                return;
            };
            check(
                "lock",
                TupleRef::decode(&t).and_then(|t| store.lock(&stg, &[t]).map(|_| ())),
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn damaged_messages_are_refused_as_the_requests_errors_never_panicked_on(
        which in 0usize..4,
        base in 0usize..8,
        ds in damages(),
    ) {
        let dir = tempfile::tempdir().expect("temporary folder");
        let config = config(dir.path());
        let store = SqliteStore::open(&dir.path().join("global.db"), &config).expect("store");
        let tuple = snaps_proto::v1::TupleRef {
            relation: "patient".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let fetches = fetches();
        let original = match which {
            0 => fetches[base % fetches.len()].clone(),
            1 => load(),
            2 => push(),
            _ => tuple,
        };
        feed(&store, &config, which, &damage(original, &ds));
    }

    #[test]
    fn garbage_is_refused_never_panicked_on(
        which in 0usize..4,
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let dir = tempfile::tempdir().expect("temporary folder");
        let config = config(dir.path());
        let store = SqliteStore::open(&dir.path().join("global.db"), &config).expect("store");
        feed(&store, &config, which, &bytes);
    }
}

#[test]
fn the_undamaged_messages_are_accepted() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let config = config(dir.path());
    let store = SqliteStore::open(&dir.path().join("global.db"), &config).expect("store");
    let stg = SiteId {
        code: "STG".into(),
        number: snaps_schema::SiteNo(2),
    };
    let fetches = fetches();
    assert_eq!(fetches.len(), 4, "every everyday query maps");
    for f in &fetches {
        let req = snaps_proto::v1::FetchRequest::decode(f.as_slice()).expect("decodes");
        let q = FetchQuery::decode(&req, &config.catalog).expect("accepted");
        store.fetch(&stg, &q).expect("runs");
    }
    let b = snaps_proto::v1::LoadBatch::decode(load().as_slice()).expect("decodes");
    let loaded = store
        .load(
            &stg,
            &LoadBatch::decode(&b, &config.catalog).expect("accepted"),
        )
        .expect("loads");
    assert_eq!(loaded.loaded, 2);
    let p = snaps_proto::v1::PushRequest::decode(push().as_slice()).expect("decodes");
    Push::decode(&p, &config.catalog).expect("accepted");
}
