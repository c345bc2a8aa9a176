//! Property tests of query rewriting: **rewriting never drops a tuple the
//! local query needs** (DESIGN.md, "A query at a site" and "The oracle"), and
//! neither front end panics on any input.
//!
//! The main property builds a small network in memory. Every site gets random
//! tuples in its local relations (small value domains, so predicates hit and
//! joins match); the global snapshot is what the sites export through their own
//! mappings (`RelationMapping::export`), with tuple ids and main tuple ids for a
//! split by main tuple id. The querying site's own tuples are each *old* (in the
//! global snapshot as they are), *new* (not there yet) or *modified* (the global
//! snapshot holds an older version). A random query at that site is planned;
//! a reference evaluator written here runs the mapped [`GlobalQuery`] over the
//! global snapshot plus the semi-join projections of the site's new and
//! modified tuples, and maps what it fetches back with `map_back`.
//!
//! The oracle database is the site's own tuples plus every other site's tuples
//! as this site sees them (reassembled from the global snapshot per this site's
//! mapping, then mapped back: only the attributes this site maps). The local
//! query runs over it with `eval::holds`; every other site's tuple that takes
//! part in a row of the answer must be among the fetched ones. Over-fetching
//! is allowed. Both evaluators first convert constants compared with a column
//! by that column's type, as SQLite's column affinity does (`eval` compares
//! values as they are), so a constant such as `'19340512'` against an `i4`
//! means what it means at a site.
//!
//! Random choices come from a vector of numbers that proptest shrinks towards
//! zero, and zero always picks the simplest option, so a failure shrinks to a
//! small network and a short query.
//!
//! [`GlobalQuery`]: snaps_mapping::GlobalQuery

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::LazyLock;

use proptest::prelude::*;
use snaps_mapping::SiteMapping;
use snaps_mapping::decompose::resolve;
use snaps_mapping::eval;
use snaps_mapping::ir::{ColumnRef, Expr, Select, Statement};
use snaps_mapping::mapping::{RelationMapping, Split};
use snaps_mapping::rewrite::{self, GlobalTable, JoinGroup, Plan, Reassembly};
use snaps_schema::{Attribute, Catalog, Relation, Value, ValueType};

// ---------------------------------------------------------------------------
// Random choices

/// Reads choices from proptest's numbers; past the end every choice is 0.
struct Choices<'a> {
    data: &'a [u32],
    at: usize,
}

impl Choices<'_> {
    /// A number in `0..n` (0 when `n` is 0).
    fn pick(&mut self, n: usize) -> usize {
        let v = self.data.get(self.at).copied().unwrap_or(0) as usize;
        self.at += 1;
        if n == 0 { 0 } else { v % n }
    }

    /// True with `percent` per cent probability; false when shrunk.
    fn chance(&mut self, percent: usize) -> bool {
        // 0 must mean "no", so the simplest case is the shrunk one.
        self.pick(100) >= 100 - percent
    }

    fn one<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.pick(items.len())].clone()
    }
}

// ---------------------------------------------------------------------------
// The networks

/// A site of a world: its catalog, mapping and the keys it draws new tuples'
/// keys from.
struct SiteModel {
    code: String,
    local: Catalog,
    mapping: SiteMapping,
    /// Key kind (`pno`, `vno`, ...) to the values this site owns.
    keys: BTreeMap<&'static str, Vec<Value>>,
}

/// A network to test in: sites, the relations generated and queried, and the
/// attribute pairs joins are made of.
struct World {
    name: &'static str,
    global: Catalog,
    sites: Vec<SiteModel>,
    relations: &'static [&'static str],
    joins: &'static [(&'static str, &'static str, &'static str, &'static str)],
}

impl World {
    /// Every site's keys of `kind`, plus one no tuple has (a dangling reference).
    fn pool(&self, kind: &str) -> Vec<Value> {
        let mut all: Vec<Value> = self
            .sites
            .iter()
            .flat_map(|s| s.keys.get(kind).into_iter().flatten().cloned())
            .collect();
        all.sort();
        all.dedup();
        all.push(match kind {
            "rsb" => Value::text("Z99"),
            _ => Value::Int(9),
        });
        all
    }
}

fn site_model(
    code: &str,
    local: Catalog,
    mapping: SiteMapping,
    keys: &[(&'static str, Vec<Value>)],
) -> SiteModel {
    SiteModel {
        code: code.to_string(),
        local,
        mapping,
        keys: keys.iter().cloned().collect(),
    }
}

fn ints(range: std::ops::RangeInclusive<i64>) -> Vec<Value> {
    range.map(Value::Int).collect()
}

/// The figures network (sites A, B, C of the fixture) plus three sites built
/// here to reach the cases the fixture leaves out: C2 has C's schema and
/// mapping (so C sees other sites' tuples of a main-tuple-id split), D maps
/// only the main part pat_phone, and E only pat_other of figure 4.5's key split.
static FIGURES: LazyLock<World> = LazyLock::new(|| {
    let net = common::Network::load("figures").unwrap_or_else(|e| panic!("{e}"));
    let fixture = |code: &str| net.site(code).unwrap_or_else(|e| panic!("{e}")).clone();
    let built = |ddl: &str, mapping: &str| {
        let local = Catalog::from_ddl(ddl).unwrap_or_else(|e| panic!("{e}"));
        let mapping = SiteMapping::from_text(mapping, "", &local, &net.global)
            .unwrap_or_else(|e| panic!("{e}"));
        (local, mapping)
    };
    let (a, b, c) = (fixture("A"), fixture("B"), fixture("C"));
    let (d_local, d_mapping) = built(
        "CREATE TABLE patient (name c20, phone c10, ward c4);",
        "patient name pat_phone name\npatient phone pat_phone phone",
    );
    let (e_local, e_mapping) = built(
        "CREATE TABLE patient (pno i4 PRIMARY KEY, dob i4, notes c10);",
        "patient pno pat_other pno\npatient dob pat_other dob",
    );
    let keys = |i: i64| {
        vec![
            ("pno", ints(i * 10 + 1..=i * 10 + 5)),
            ("vno", ints(i * 100 + 1..=i * 100 + 5)),
        ]
    };
    World {
        name: "figures",
        global: net.global.clone(),
        sites: vec![
            site_model("A", a.local, a.mapping, &keys(1)),
            site_model("B", b.local, b.mapping, &keys(2)),
            site_model("C", c.local.clone(), c.mapping.clone(), &[]),
            site_model("C2", c.local, c.mapping, &[]),
            site_model("D", d_local, d_mapping, &[]),
            site_model("E", e_local, e_mapping, &keys(6)),
        ],
        relations: &["patient", "visit"],
        joins: &[
            ("patient", "pno", "visit", "pno"),
            ("patient", "name", "patient", "name"),
            ("patient", "pno", "patient", "pno"),
            ("visit", "pno", "visit", "pno"),
            ("visit", "date", "visit", "date"),
        ],
    }
});

/// The Christchurch radiology network as the fixture defines it.
static RADIOLOGY: LazyLock<World> = LazyLock::new(|| {
    let net = common::Network::load("radiology").unwrap_or_else(|e| panic!("{e}"));
    let sites = net
        .sites
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let base = [1_000_000, 10_000_000, 20_000_000][i];
            let doctor = [1_000, 10_000, 20_000][i];
            let i = i as i64;
            site_model(
                &s.code,
                s.local.clone(),
                s.mapping.clone(),
                &[
                    ("pno", ints(base + 1..=base + 5)),
                    ("vno", ints(base + 501..=base + 505)),
                    ("line_no", ints(i * 10 + 1..=i * 10 + 3)),
                    ("code", ints(doctor + 1..=doctor + 4)),
                    (
                        "rsb",
                        vec![Value::text("A01"), Value::text("B02"), Value::text("C03")],
                    ),
                ],
            )
        })
        .collect();
    World {
        name: "radiology",
        global: net.global.clone(),
        sites,
        relations: &["patient", "visit", "visit_rep", "doctor", "rsb_codes"],
        joins: &[
            ("patient", "pno", "visit", "pno"),
            ("visit", "vno", "visit_rep", "vno"),
            ("visit", "refer_doctor", "doctor", "code"),
            ("patient", "gp", "doctor", "code"),
            ("patient", "surname", "doctor", "surname"),
            ("visit", "rsb1", "rsb_codes", "rsb_code"),
            ("patient", "pno", "patient", "pno"),
            ("visit", "date", "visit", "date"),
        ],
    }
});

// ---------------------------------------------------------------------------
// Values

/// How an attribute's values are drawn.
enum Rule {
    /// A key from this site's own range, distinct within the relation.
    Own(&'static str),
    /// A reference to any site's key (or a dangling one).
    Pool(&'static str),
    /// A small domain of realistic values.
    Domain,
}

fn rule(relation: &str, attr: &str) -> Rule {
    match (relation, attr) {
        ("patient", "pno") => Rule::Own("pno"),
        ("visit", "vno") => Rule::Own("vno"),
        ("visit", "pno") => Rule::Pool("pno"),
        ("visit_rep", "vno") => Rule::Pool("vno"),
        ("visit_rep", "line_no") => Rule::Own("line_no"),
        ("doctor", "code") => Rule::Own("code"),
        ("visit", "refer_doctor") | ("patient", "gp") => Rule::Pool("code"),
        ("rsb_codes", "rsb_code") => Rule::Own("rsb"),
        _ => Rule::Domain,
    }
}

/// Candidate values for an attribute called `attr`, of any type; the caller
/// keeps those that fit the attribute's type. Empty: the attribute stays NULL.
fn raw_domain(attr: &str) -> Vec<Value> {
    let t = |xs: &[&str]| xs.iter().map(|s| Value::text(s)).collect::<Vec<_>>();
    let i = |xs: &[i64]| xs.iter().map(|n| Value::Int(*n)).collect::<Vec<_>>();
    match attr {
        "name" | "surname" => t(&["Jones", "Smith", "MacIntosh", "jones", "O'Brien"]),
        "first_names" => t(&["John", "Mary Ann", "j"]),
        "title" => t(&["Mr", "Mrs", "Dr"]),
        "initials" => t(&["JK", "M"]),
        "addr" | "add1" => t(&["1 High St", "12 Hereford St"]),
        "dob" => i(&[19340512, 19630512, 19680924]),
        "dod" => i(&[19880101]),
        "date" => {
            let mut v = t(&["12/12/87", "1/1/88"]);
            v.extend(i(&[19871212, 19880101]));
            v
        }
        "time" => {
            let mut v = t(&["09:30", "14:00"]);
            v.extend(i(&[930, 1400]));
            v
        }
        "acc" | "vip" | "contrast_sen" | "post_mortem" => t(&["Y", "N"]),
        "sex" => t(&["M", "F"]),
        "phone" => t(&["598-073", "489-207", "03-3641234"]),
        "race" => t(&["NZE", "MAO"]),
        "ad_no" => t(&["A123", "B7"]),
        "description" => t(&["chest", "barium meal", "knee"]),
        "pat_location" => t(&["W12", "OPD", "ICU"]),
        "pat_type" => t(&["IN", "OUT"]),
        "hosp_consult" | "mayo_units" => i(&[7, 8]),
        "roe1" | "roe2" => vec![Value::Float(0.5), Value::Float(1.25)],
        "line" => t(&["normal", "fracture seen"]),
        "rsb1" => t(&["A01", "B02"]),
        "ward" | "notes" => t(&["x", "y"]),
        _ => Vec::new(),
    }
}

fn fits(ty: ValueType, v: &Value) -> bool {
    let class_ok = match v {
        Value::Null => true,
        Value::Int(_) => ty.is_numeric(),
        Value::Float(_) => ty == ValueType::Float4,
        Value::Text(_) => !ty.is_numeric(),
    };
    class_ok && ty.check(v.clone(), "x").is_ok()
}

fn domain(attr: &str, ty: ValueType) -> Vec<Value> {
    raw_domain(attr)
        .into_iter()
        .filter(|v| fits(ty, v))
        .collect()
}

/// The values an attribute holds anywhere in the world: what constants in
/// queries are mostly drawn from.
fn attr_values(world: &World, relation: &str, attr: &str, ty: ValueType) -> Vec<Value> {
    match rule(relation, attr) {
        Rule::Own(kind) | Rule::Pool(kind) => world.pool(kind),
        Rule::Domain => domain(attr, ty),
    }
}

/// Attributes worth generating predicates on: those with values.
fn interesting(relation: &Relation) -> Vec<&Attribute> {
    relation
        .attributes
        .iter()
        .filter(|a| {
            !matches!(rule(&relation.name, &a.name), Rule::Domain)
                || !domain(&a.name, a.ty).is_empty()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Data

/// What happened to one of the querying site's own tuples since the last
/// refresh.
#[derive(Debug, Clone)]
enum State {
    /// In the global snapshot as it is.
    Old,
    /// Not in the global snapshot yet.
    New,
    /// The global snapshot holds this older version.
    Modified(Vec<Value>),
}

/// Random tuples for `relation` at site `si`.
fn gen_tuples(c: &mut Choices, world: &World, si: usize, relation: &Relation) -> Vec<Vec<Value>> {
    let site = &world.sites[si];
    let n = c.pick(6);
    let mut used: BTreeMap<&str, BTreeSet<Value>> = BTreeMap::new();
    let mut out = Vec::new();
    'tuples: for _ in 0..n {
        let mut t = Vec::new();
        for a in &relation.attributes {
            let v = match rule(&relation.name, &a.name) {
                Rule::Own(kind) => {
                    let taken = used.entry(kind).or_default();
                    let free: Vec<Value> = site
                        .keys
                        .get(kind)
                        .into_iter()
                        .flatten()
                        .filter(|v| !taken.contains(*v))
                        .cloned()
                        .collect();
                    if free.is_empty() {
                        break 'tuples;
                    }
                    let v = c.one(&free);
                    taken.insert(v.clone());
                    v
                }
                Rule::Pool(kind) => c.one(&world.pool(kind)),
                Rule::Domain => domain_value(c, &a.name, a.ty),
            };
            t.push(v);
        }
        out.push(t);
    }
    out
}

fn domain_value(c: &mut Choices, attr: &str, ty: ValueType) -> Value {
    let d = domain(attr, ty);
    if d.is_empty() || c.pick(6) == 5 {
        Value::Null
    } else {
        c.one(&d)
    }
}

/// An older version of `tuple`: keys kept, other attributes drawn again.
fn older_version(c: &mut Choices, relation: &Relation, tuple: &[Value]) -> Vec<Value> {
    relation
        .attributes
        .iter()
        .zip(tuple)
        .map(|(a, v)| match rule(&relation.name, &a.name) {
            Rule::Domain => domain_value(c, &a.name, a.ty),
            _ => v.clone(),
        })
        .collect()
}

/// A tuple of the global snapshot, with the status attributes this test needs.
#[derive(Debug, Clone)]
struct GTuple {
    owner: usize,
    id: u64,
    main_tuple_id: Option<u64>,
    values: BTreeMap<String, Value>,
}

/// A reassembled global tuple of one local relation: per part its attribute
/// values, or `None` where no tuple of that part belongs to it.
#[derive(Debug, Clone)]
struct Reassembled {
    parts: Vec<Option<BTreeMap<String, Value>>>,
    /// The owner site; `None` for a temporary semi-join tuple.
    owner: Option<usize>,
}

/// A row of a local relation in the oracle database.
#[derive(Debug, Clone)]
struct OracleRow {
    values: Vec<Value>,
    /// The site whose tuple it is.
    owner: usize,
}

/// One generated situation: every site's tuples, the querying site and the
/// states of its tuples.
struct Scenario {
    site: usize,
    /// Per site, per local relation, the current local tuples.
    local: Vec<BTreeMap<String, Vec<Vec<Value>>>>,
    /// The querying site's tuples' states, parallel to `local[site]`.
    states: BTreeMap<String, Vec<State>>,
    global: BTreeMap<String, Vec<GTuple>>,
}

fn gen_scenario(c: &mut Choices, world: &World, site: usize) -> Scenario {
    let mut local = Vec::new();
    for (si, s) in world.sites.iter().enumerate() {
        let mut rels = BTreeMap::new();
        for r in world.relations {
            if let Some(rel) = s.local.relation(r) {
                rels.insert(r.to_string(), gen_tuples(c, world, si, rel));
            }
        }
        local.push(rels);
    }
    let mut states = BTreeMap::new();
    for (r, tuples) in &local[site] {
        let rel = world.sites[site]
            .local
            .relation(r)
            .expect("generated relation");
        let st: Vec<State> = tuples
            .iter()
            .map(|t| match c.pick(3) {
                0 => State::Old,
                1 => State::New,
                _ => State::Modified(older_version(c, rel, t)),
            })
            .collect();
        states.insert(r.clone(), st);
    }
    let mut global: BTreeMap<String, Vec<GTuple>> = BTreeMap::new();
    let mut next_id = 1u64;
    for (si, rels) in local.iter().enumerate() {
        for (r, tuples) in rels {
            let Some(rm) = world.sites[si].mapping.relation(r) else {
                continue;
            };
            for (ti, t) in tuples.iter().enumerate() {
                let exported = if si == site {
                    match &states[r][ti] {
                        State::Old => t.clone(),
                        State::New => continue,
                        State::Modified(old) => old.clone(),
                    }
                } else {
                    t.clone()
                };
                export_into(&mut global, rm, si, &exported, &mut next_id);
            }
        }
    }
    Scenario {
        site,
        local,
        states,
        global,
    }
}

/// Puts one local tuple into the global snapshot the way the load algorithm
/// of chapter 7 does: one tuple per part, and for a split by main tuple id the
/// main part's tuple id stored in every other part.
fn export_into(
    global: &mut BTreeMap<String, Vec<GTuple>>,
    rm: &RelationMapping,
    owner: usize,
    tuple: &[Value],
    next_id: &mut u64,
) {
    let parts = rm
        .export(tuple)
        .unwrap_or_else(|e| panic!("export {tuple:?} of {}: {e}", rm.local.name));
    let main = match rm.split {
        Split::MainTupleId(m) => Some(m),
        _ => None,
    };
    let mut ids: Vec<u64> = Vec::new();
    for _ in &parts {
        ids.push(*next_id);
        *next_id += 1;
    }
    for (i, (part, values)) in rm.parts.iter().zip(parts).enumerate() {
        let values = part
            .attrs
            .iter()
            .map(|a| a.global.clone())
            .zip(values)
            .collect();
        let main_tuple_id = main.filter(|m| *m != i).map(|m| ids[m]);
        global.entry(part.global.clone()).or_default().push(GTuple {
            owner,
            id: ids[i],
            main_tuple_id,
            values,
        });
    }
}

/// How this site's mapping reassembles `rm`, derived from the mapping alone
/// (not from a plan), for the oracle.
fn reassembly_of(rm: &RelationMapping) -> Reassembly {
    match &rm.split {
        Split::None => Reassembly::Single,
        Split::MainTupleId(m) => Reassembly::MainTupleId(*m),
        Split::Key(keys) => Reassembly::Key(
            keys.iter()
                .map(|k| {
                    rm.targets(k)
                        .iter()
                        .map(|(_, a)| a.global.clone())
                        .collect()
                })
                .collect(),
        ),
    }
}

/// Reassembles the global tuples of `relations` (one per part) as `how` says:
/// a unique-key split joins the parts with equal keys (a full outer join), a
/// main-tuple-id split joins every part to its main tuple (a left join).
fn reassemble(
    global: &BTreeMap<String, Vec<GTuple>>,
    relations: &[&str],
    how: &Reassembly,
) -> Vec<Reassembled> {
    let empty = Vec::new();
    let tuples = |i: usize| global.get(relations[i]).unwrap_or(&empty);
    match how {
        Reassembly::Single => tuples(0)
            .iter()
            .map(|t| Reassembled {
                parts: vec![Some(t.values.clone())],
                owner: Some(t.owner),
            })
            .collect(),
        Reassembly::Key(keys) => {
            let mut by_key: BTreeMap<Vec<Value>, Vec<Option<&GTuple>>> = BTreeMap::new();
            for i in 0..relations.len() {
                for t in tuples(i) {
                    let key: Vec<Value> = keys
                        .iter()
                        .map(|k| {
                            assert_eq!(k.len(), relations.len(), "a key attribute per part");
                            t.values.get(&k[i]).cloned().unwrap_or(Value::Null)
                        })
                        .collect();
                    let slot = by_key
                        .entry(key)
                        .or_insert_with(|| vec![None; relations.len()]);
                    assert!(
                        slot[i].is_none(),
                        "duplicate key in {}: {t:?}",
                        relations[i]
                    );
                    slot[i] = Some(t);
                }
            }
            by_key
                .into_values()
                .map(|parts| {
                    let owners: BTreeSet<usize> = parts.iter().flatten().map(|t| t.owner).collect();
                    assert_eq!(owners.len(), 1, "the parts of one key come from one owner");
                    Reassembled {
                        owner: owners.into_iter().next(),
                        parts: parts
                            .into_iter()
                            .map(|p| p.map(|t| t.values.clone()))
                            .collect(),
                    }
                })
                .collect()
        }
        Reassembly::MainTupleId(m) => tuples(*m)
            .iter()
            .map(|main| Reassembled {
                owner: Some(main.owner),
                parts: (0..relations.len())
                    .map(|i| {
                        if i == *m {
                            Some(main.values.clone())
                        } else {
                            tuples(i)
                                .iter()
                                .find(|t| t.main_tuple_id == Some(main.id))
                                .map(|t| t.values.clone())
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Maps a reassembled tuple back to the local relation, reading each part's
/// values in the order of `columns[i]`.
fn map_back(rm: &RelationMapping, columns: &[Vec<String>], r: &Reassembled) -> Vec<Value> {
    let parts: Vec<Option<Vec<Value>>> = r
        .parts
        .iter()
        .zip(columns)
        .map(|(p, cols)| {
            p.as_ref().map(|vals| {
                cols.iter()
                    .map(|c| vals.get(c).cloned().unwrap_or(Value::Null))
                    .collect()
            })
        })
        .collect();
    rm.map_back(&parts)
        .unwrap_or_else(|e| panic!("map back into {}: {e}", rm.local.name))
}

fn mapping_columns(rm: &RelationMapping) -> Vec<Vec<String>> {
    rm.parts
        .iter()
        .map(|p| p.attrs.iter().map(|a| a.global.clone()).collect())
        .collect()
}

/// The oracle database of the querying site: its own current tuples plus
/// every other site's, restricted to what this site maps.
fn oracle(world: &World, sc: &Scenario) -> BTreeMap<String, Vec<OracleRow>> {
    let site = &world.sites[sc.site];
    let mut db: BTreeMap<String, Vec<OracleRow>> = BTreeMap::new();
    for (r, tuples) in &sc.local[sc.site] {
        db.entry(r.clone())
            .or_default()
            .extend(tuples.iter().map(|t| OracleRow {
                values: t.clone(),
                owner: sc.site,
            }));
    }
    for rm in site.mapping.relations() {
        let relations: Vec<&str> = rm.parts.iter().map(|p| p.global.as_str()).collect();
        let columns = mapping_columns(rm);
        for r in reassemble(&sc.global, &relations, &reassembly_of(rm)) {
            let owner = r.owner.expect("global tuples have owners");
            if owner != sc.site {
                db.entry(rm.local.name.clone())
                    .or_default()
                    .push(OracleRow {
                        values: map_back(rm, &columns, &r),
                        owner,
                    });
            }
        }
    }
    db
}

// ---------------------------------------------------------------------------
// SQLite's type affinity

/// A constant as SQLite converts it before comparing it with a column of type
/// `ty` (column affinity, "Datatypes In SQLite" section 4.2): text that reads
/// as a number becomes that number for a numeric column, a number becomes
/// text for a text column. `eval` compares values as they are, so both
/// evaluators here apply this first, as the site's and the global
/// controller's SQLite would.
fn with_affinity(ty: ValueType, v: &Value) -> Value {
    match (ty.is_numeric(), v) {
        (true, Value::Text(s)) => {
            let t = s.trim();
            let numeric = !t.is_empty()
                && t.chars()
                    .all(|ch| ch.is_ascii_digit() || "+-.eE".contains(ch));
            match (t.parse::<i64>(), t.parse::<f64>()) {
                (Ok(i), _) if numeric => Value::Int(i),
                (_, Ok(f)) if numeric && f.is_finite() => Value::Float(f),
                _ => v.clone(),
            }
        }
        (false, Value::Int(i)) => Value::Text(i.to_string()),
        (false, Value::Float(f)) => Value::Text(format!("{f:?}")),
        _ => v.clone(),
    }
}

/// `e` with every constant compared with a column converted by that column's
/// affinity; `ty` gives a column's declared type (`None`: no affinity).
fn affinity(e: &Expr, ty: &dyn Fn(&ColumnRef) -> Option<ValueType>) -> Expr {
    let col_ty = |x: &Expr| match x {
        Expr::Column(c) => ty(c),
        _ => None,
    };
    let conv = |t: Option<ValueType>, x: &Expr| match (t, x) {
        (Some(t), Expr::Literal(v)) => Expr::Literal(with_affinity(t, v)),
        _ => affinity(x, ty),
    };
    let b = |x: Expr| Box::new(x);
    match e {
        Expr::Binary { op, left, right } if op.is_comparison() => Expr::Binary {
            op: *op,
            left: b(conv(col_ty(right), left)),
            right: b(conv(col_ty(left), right)),
        },
        Expr::Binary { op, left, right } => Expr::Binary {
            op: *op,
            left: b(affinity(left, ty)),
            right: b(affinity(right, ty)),
        },
        Expr::InList {
            expr,
            list,
            negated,
        } => Expr::InList {
            expr: b(affinity(expr, ty)),
            list: list.iter().map(|x| conv(col_ty(expr), x)).collect(),
            negated: *negated,
        },
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => Expr::Between {
            expr: b(affinity(expr, ty)),
            low: b(conv(col_ty(expr), low)),
            high: b(conv(col_ty(expr), high)),
            negated: *negated,
        },
        Expr::Not(x) => Expr::Not(b(affinity(x, ty))),
        Expr::Neg(x) => Expr::Neg(b(affinity(x, ty))),
        Expr::IsNull { expr, negated } => Expr::IsNull {
            expr: b(affinity(expr, ty)),
            negated: *negated,
        },
        Expr::Like {
            expr,
            pattern,
            negated,
        } => Expr::Like {
            expr: b(affinity(expr, ty)),
            pattern: b(affinity(pattern, ty)),
            negated: *negated,
        },
        Expr::Function {
            name,
            args,
            distinct,
        } => Expr::Function {
            name: name.clone(),
            args: args.iter().map(|x| affinity(x, ty)).collect(),
            distinct: *distinct,
        },
        Expr::Column(_) | Expr::Literal(_) => e.clone(),
    }
}

/// `e` with affinity applied for the local relations of `ranges`.
fn local_affinity(e: &Expr, ranges: &[snaps_mapping::ir::Range], local: &Catalog) -> Expr {
    affinity(e, &|c| {
        let r = ranges.iter().find(|r| Some(&r.var) == c.var.as_ref())?;
        Some(local.relation(&r.relation)?.attribute(&c.attr)?.ty)
    })
}

// ---------------------------------------------------------------------------
// The local query over the oracle

/// The rows of the local query's answer over `db`, before grouping, ordering
/// and limits: per range variable the index of its row, or `None` where a
/// LEFT JOIN supplied NULLs.
fn local_answer(
    select: &Select,
    local: &Catalog,
    db: &BTreeMap<String, Vec<OracleRow>>,
) -> Vec<Vec<Option<usize>>> {
    let empty = Vec::new();
    let rows_of = |i: usize| db.get(&select.ranges[i].relation).unwrap_or(&empty);
    // Each WHERE conjunct is checked as soon as every variable it names is bound.
    let mut checks: Vec<Vec<Expr>> = vec![Vec::new(); select.ranges.len()];
    let ons: Vec<Option<Expr>> = select
        .ranges
        .iter()
        .map(|r| {
            r.left_join_on
                .as_ref()
                .map(|on| local_affinity(on, &select.ranges, local))
        })
        .collect();
    if let Some(q) = &select.qual {
        for c in q.conjuncts() {
            let last = c
                .vars()
                .iter()
                .map(|v| {
                    select
                        .ranges
                        .iter()
                        .position(|r| Some(&r.var) == v.as_ref())
                        .expect("resolved variable")
                })
                .max()
                .unwrap_or(0);
            checks[last].push(local_affinity(c, &select.ranges, local));
        }
    }
    let bind = |bound: &[Option<usize>], c: &ColumnRef| -> Option<Value> {
        let i = select
            .ranges
            .iter()
            .position(|r| Some(&r.var) == c.var.as_ref())?;
        let slot = bound.get(i)?;
        let rel = local.relation(&select.ranges[i].relation)?;
        let pos = rel.position(&c.attr)?;
        Some(match slot {
            Some(row) => rows_of(i)[*row].values[pos].clone(),
            None => Value::Null,
        })
    };
    let holds = |e: &Expr, bound: &[Option<usize>]| {
        eval::holds(e, &|c| bind(bound, c))
            .unwrap_or_else(|err| panic!("evaluate {e} locally: {err:?}"))
    };
    let mut out = Vec::new();
    let mut stack: Vec<Vec<Option<usize>>> = vec![Vec::new()];
    while let Some(bound) = stack.pop() {
        let i = bound.len();
        if i == select.ranges.len() {
            out.push(bound);
            continue;
        }
        let mut next = Vec::new();
        for row in 0..rows_of(i).len() {
            let mut b = bound.clone();
            b.push(Some(row));
            let on = ons[i].as_ref().is_none_or(|on| holds(on, &b));
            if on {
                next.push(b);
            }
        }
        if select.ranges[i].left_join_on.is_some() && next.is_empty() {
            let mut b = bound.clone();
            b.push(None);
            next.push(b);
        }
        for b in next {
            if checks[i].iter().all(|c| holds(c, &b)) {
                stack.push(b);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The mapped query over the global snapshot

/// The candidates of one table: reassembled global tuples, and the temporary
/// tuples of the semi-join projection for its variable.
fn candidates(world: &World, sc: &Scenario, plan: &Plan, t: &GlobalTable) -> Vec<Reassembled> {
    let relations: Vec<&str> = t.parts.iter().map(|p| p.relation.as_str()).collect();
    let mut out = reassemble(&sc.global, &relations, &t.reassembly);
    let site = &world.sites[sc.site];
    let Some(projection) = plan.semijoins.iter().find(|s| s.local_var == t.local_var) else {
        return out;
    };
    let rm = site
        .mapping
        .relation(&t.local_relation)
        .expect("a table's relation is mapped");
    let rel = &rm.local;
    let tuples = sc.local[sc.site]
        .get(&t.local_relation)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for (tuple, state) in tuples.iter().zip(&sc.states[&t.local_relation]) {
        if matches!(state, State::Old) {
            continue;
        }
        let bind = |c: &ColumnRef| -> Option<Value> {
            if c.var.as_deref() != Some(projection.local_var.as_str()) {
                return None;
            }
            Some(tuple[rel.position(&c.attr)?].clone())
        };
        let ranges = [snaps_mapping::ir::Range::new(
            &projection.local_var,
            &t.local_relation,
        )];
        let passes = projection.selection.iter().all(|e| {
            let e = &local_affinity(e, &ranges, &site.local);
            eval::holds(e, &bind)
                .unwrap_or_else(|err| panic!("evaluate semi-join selection {e}: {err:?}"))
        });
        if !passes {
            continue;
        }
        // Only the projected join attributes travel; the rest is unknown.
        let projected: Vec<Value> = rel
            .attributes
            .iter()
            .zip(tuple)
            .map(|(a, v)| {
                if projection.attributes.contains(&a.name) {
                    v.clone()
                } else {
                    Value::Null
                }
            })
            .collect();
        let parts = rm
            .export(&projected)
            .unwrap_or_else(|e| panic!("export projection: {e}"));
        out.push(Reassembled {
            parts: rm
                .parts
                .iter()
                .zip(parts)
                .map(|(p, vals)| Some(p.attrs.iter().map(|a| a.global.clone()).zip(vals).collect()))
                .collect(),
            owner: None,
        });
    }
    out
}

/// Evaluates one join group: every combination of candidates that satisfies
/// the tables' selections (temporary tuples already passed them at the site)
/// and the joins, with LEFT JOIN semantics for outer tables. Returns the rows,
/// per table the index of its candidate or `None` (NULLs supplied).
fn group_rows(
    global: &Catalog,
    g: &JoinGroup,
    cands: &[Vec<Reassembled>],
) -> Vec<Vec<Option<usize>>> {
    let global_ty = |c: &ColumnRef| -> Option<ValueType> {
        let part = g
            .tables
            .iter()
            .flat_map(|t| &t.parts)
            .find(|p| Some(&p.var) == c.var.as_ref())?;
        Some(global.relation(&part.relation)?.attribute(&c.attr)?.ty)
    };
    let typed = |e: &Expr| affinity(e, &global_ty);
    let bind = |bound: &[Option<usize>], c: &ColumnRef| -> Option<Value> {
        let var = c.var.as_deref()?;
        for (ti, slot) in bound.iter().enumerate() {
            if let Some(pi) = g.tables[ti].parts.iter().position(|p| p.var == var) {
                let value = slot
                    .and_then(|ci| cands[ti][ci].parts[pi].as_ref())
                    .and_then(|vals| vals.get(&c.attr).cloned())
                    .unwrap_or(Value::Null);
                return Some(value);
            }
        }
        None
    };
    let holds = |e: &Expr, bound: &[Option<usize>]| {
        eval::holds(e, &|c| bind(bound, c))
            .unwrap_or_else(|err| panic!("evaluate {e} globally: {err:?}"))
    };
    let eq = |j: &rewrite::GlobalJoin| {
        typed(&Expr::binary(
            snaps_mapping::ir::BinOp::Eq,
            j.left.clone(),
            j.right.clone(),
        ))
    };
    let selections: Vec<Vec<Expr>> = g
        .tables
        .iter()
        .map(|t| t.selection.iter().map(typed).collect())
        .collect();
    let index = |v: &str| g.tables.iter().position(|t| t.local_var == v);
    let mut out = Vec::new();
    let mut stack: Vec<Vec<Option<usize>>> = vec![Vec::new()];
    while let Some(bound) = stack.pop() {
        let i = bound.len();
        if i == g.tables.len() {
            out.push(bound);
            continue;
        }
        let t = &g.tables[i];
        let outer_joins: Vec<Expr> = g
            .joins
            .iter()
            .filter(|j| j.outer.as_deref() == Some(t.local_var.as_str()))
            .map(eq)
            .collect();
        // Inner joins are checked once both of their tables are bound.
        let inner_joins: Vec<Expr> = g
            .joins
            .iter()
            .filter(|j| j.outer.is_none())
            .filter(|j| {
                let (l, r) = (
                    index(&j.local.left.var.clone().unwrap_or_default()),
                    index(&j.local.right.var.clone().unwrap_or_default()),
                );
                l.max(r) == Some(i)
            })
            .map(eq)
            .collect();
        let mut next = Vec::new();
        for (ci, cand) in cands[i].iter().enumerate() {
            let mut b = bound.clone();
            b.push(Some(ci));
            let temporary = cand.owner.is_none();
            let selected = temporary || selections[i].iter().all(|e| holds(e, &b));
            // A temporary tuple of a null-supplying table stands for a new
            // tuple whose partner on the preserved side may be the site's
            // own: it reaches its other partners whatever it matches here.
            if selected
                && (temporary || outer_joins.iter().all(|e| holds(e, &b)))
                && inner_joins.iter().all(|e| holds(e, &b))
            {
                next.push(b);
            }
        }
        // An outer table whose joins are all in the group supplies NULLs when
        // nothing matches; one with no join left in its group (its join could
        // not be mapped) is fetched on its own selection.
        if t.outer && !outer_joins.is_empty() && next.is_empty() {
            let mut b = bound.clone();
            b.push(None);
            next.push(b);
        }
        stack.extend(next);
    }
    out
}

/// Every other site's tuple the mapped query fetches, mapped back, per local
/// relation.
fn fetched(world: &World, sc: &Scenario, plan: &Plan) -> BTreeMap<String, BTreeSet<Vec<Value>>> {
    let site = &world.sites[sc.site];
    let mut out: BTreeMap<String, BTreeSet<Vec<Value>>> = BTreeMap::new();
    let Some(q) = &plan.query else { return out };
    for g in &q.groups {
        let cands: Vec<Vec<Reassembled>> = g
            .tables
            .iter()
            .map(|t| candidates(world, sc, plan, t))
            .collect();
        for row in group_rows(&world.global, g, &cands) {
            for (ti, slot) in row.iter().enumerate() {
                let Some(ci) = slot else { continue };
                let cand = &cands[ti][*ci];
                if cand.owner.is_none_or(|o| o == sc.site) {
                    continue;
                }
                let t = &g.tables[ti];
                let rm = site.mapping.relation(&t.local_relation).expect("mapped");
                let columns: Vec<Vec<String>> = t.parts.iter().map(|p| p.columns.clone()).collect();
                out.entry(t.local_relation.clone())
                    .or_default()
                    .insert(map_back(rm, &columns, cand));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Random queries

struct QRange {
    var: String,
    relation: &'static str,
    aliased: bool,
}

fn sql_value(v: &Value) -> String {
    v.to_string()
}

/// A constant to compare `relation.attr` with: mostly a value it holds
/// somewhere, sometimes NULL, a value of the wrong storage class, or text too
/// long for the global attribute.
fn constant(c: &mut Choices, world: &World, relation: &str, attr: &Attribute) -> Value {
    let values = attr_values(world, relation, &attr.name, attr.ty);
    if !values.is_empty() && !c.chance(20) {
        return c.one(&values);
    }
    match c.pick(5) {
        0 => Value::Null,
        1 if attr.ty.is_numeric() => Value::Text(match values.first() {
            Some(v @ Value::Int(_)) => v.to_string(),
            _ => "5".into(),
        }),
        1 => Value::Int(5),
        2 => Value::text("WARD12-LONGER-THAN-ANY-ATTRIBUTE"),
        3 => Value::Float(1.5),
        _ => Value::Int(-1),
    }
}

fn like_pattern(c: &mut Choices, world: &World, relation: &str, attr: &Attribute) -> String {
    let values = attr_values(world, relation, &attr.name, attr.ty);
    let base = match values.first().map(|_| c.one(&values)) {
        Some(Value::Text(s)) => s,
        Some(v @ (Value::Int(_) | Value::Float(_))) => v.to_string(),
        _ => "x".to_string(),
    };
    let chars: Vec<char> = base.chars().collect();
    let p: String = match c.pick(4) {
        0 => chars.iter().take(1).collect::<String>() + "%",
        1 => {
            "%".to_string()
                + &chars
                    .iter()
                    .skip(chars.len().saturating_sub(2))
                    .collect::<String>()
        }
        2 => chars
            .iter()
            .enumerate()
            .map(|(i, ch)| if i == 1 { '_' } else { *ch })
            .collect(),
        _ => base.to_lowercase() + "%",
    };
    Value::Text(p).to_string()
}

const OPS: &[&str] = &["=", "<>", "<", "<=", ">", ">="];

/// A predicate on one variable.
fn atom(c: &mut Choices, world: &World, var: &str, relation: &Relation, depth: usize) -> String {
    let attrs = interesting(relation);
    let a = if attrs.is_empty() || c.chance(10) {
        &relation.attributes[c.pick(relation.attributes.len())]
    } else {
        attrs[c.pick(attrs.len())]
    };
    let col = format!("{var}.{}", a.name);
    let rel = relation.name.as_str();
    let kinds = if depth > 1 { 9 } else { 14 };
    match c.pick(kinds) {
        0..=3 => format!(
            "{col} {} {}",
            c.one(OPS),
            sql_value(&constant(c, world, rel, a))
        ),
        4 => format!(
            "{} {} {col}",
            sql_value(&constant(c, world, rel, a)),
            c.one(OPS)
        ),
        5 => {
            let n = 1 + c.pick(3);
            let list: Vec<String> = (0..n)
                .map(|_| sql_value(&constant(c, world, rel, a)))
                .collect();
            let not = if c.chance(30) { "NOT " } else { "" };
            format!("{col} {not}IN ({})", list.join(", "))
        }
        6 => {
            let (lo, hi) = (constant(c, world, rel, a), constant(c, world, rel, a));
            let not = if c.chance(30) { "NOT " } else { "" };
            format!(
                "{col} {not}BETWEEN {} AND {}",
                sql_value(&lo),
                sql_value(&hi)
            )
        }
        7 => {
            let not = if c.chance(30) { "NOT " } else { "" };
            format!("{col} {not}LIKE {}", like_pattern(c, world, rel, a))
        }
        8 => format!("{col} IS {}NULL", if c.chance(50) { "NOT " } else { "" }),
        9 => format!("NOT ({})", atom(c, world, var, relation, depth + 1)),
        10 => format!(
            "({} OR {})",
            atom(c, world, var, relation, depth + 1),
            atom(c, world, var, relation, depth + 1)
        ),
        11 => match a.ty {
            ValueType::Char(_) => match c.pick(3) {
                0 => format!(
                    "lower({col}) = {}",
                    like_pattern(c, world, rel, a)
                        .replace('%', "")
                        .to_lowercase()
                ),
                1 => format!("length({col}) > {}", c.pick(6)),
                _ => format!("coalesce({col}, 'none') = 'none'"),
            },
            _ => format!("abs({col}) > {}", sql_value(&constant(c, world, rel, a))),
        },
        12 if a.ty.is_numeric() => format!(
            "{col} + 1 {} {}",
            c.one(OPS),
            sql_value(&constant(c, world, rel, a))
        ),
        _ => {
            // Another attribute of the same storage class (SQLite would
            // convert across classes by affinity, which the reference
            // evaluator models for constants only).
            let same: Vec<&Attribute> = interesting(relation)
                .into_iter()
                .filter(|b| b.ty.is_numeric() == a.ty.is_numeric())
                .chain(std::iter::once(a))
                .collect();
            let other = same[c.pick(same.len())];
            format!("{col} {} {var}.{}", c.one(OPS), other.name)
        }
    }
}

/// A join condition between range `j` and range `i` (j < i), if the world
/// has one for their relations; sometimes an arbitrary attribute equality.
fn join_condition(
    c: &mut Choices,
    world: &World,
    site: &SiteModel,
    ranges: &[QRange],
    i: usize,
) -> Option<String> {
    let has = |r: &str, a: &str| {
        site.local
            .relation(r)
            .is_some_and(|rel| rel.attribute(a).is_some())
    };
    let mut options = Vec::new();
    for (j, rj) in ranges[..i].iter().enumerate() {
        for (ra, aa, rb, ab) in world.joins {
            if !has(ra, aa) || !has(rb, ab) {
                continue;
            }
            if *ra == rj.relation && *rb == ranges[i].relation {
                options.push((j, *aa, *ab));
            }
            if *rb == rj.relation && *ra == ranges[i].relation {
                options.push((j, *ab, *aa));
            }
        }
    }
    if options.is_empty() || c.chance(5) {
        if !c.chance(40) {
            return None;
        }
        let j = c.pick(i);
        let (relj, reli) = (
            site.local
                .relation(ranges[j].relation)
                .expect("queried relation"),
            site.local
                .relation(ranges[i].relation)
                .expect("queried relation"),
        );
        let aj = &relj.attributes[c.pick(relj.attributes.len())];
        let same: Vec<&Attribute> = reli
            .attributes
            .iter()
            .filter(|b| b.ty.is_numeric() == aj.ty.is_numeric())
            .collect();
        let ai = same[c.pick(same.len())];
        return Some(format!(
            "{}.{} = {}.{}",
            ranges[j].var, aj.name, ranges[i].var, ai.name
        ));
    }
    let (j, aj, ai) = c.one(&options);
    Some(if c.chance(50) {
        format!("{}.{aj} = {}.{ai}", ranges[j].var, ranges[i].var)
    } else {
        format!("{}.{ai} = {}.{aj}", ranges[i].var, ranges[j].var)
    })
}

/// A random retrieval at `site`, as SQL text.
fn gen_query(c: &mut Choices, world: &World, site: &SiteModel) -> String {
    let relations: Vec<&'static str> = world
        .relations
        .iter()
        .copied()
        .filter(|r| site.local.relation(r).is_some())
        .collect();
    let n = 1 + c.pick(3);
    let mut ranges: Vec<QRange> = Vec::new();
    for i in 0..n {
        let relation = c.one(&relations);
        let aliased = ranges.iter().any(|r| r.relation == relation) || c.chance(50);
        let var = if aliased {
            format!("t{i}")
        } else {
            relation.to_string()
        };
        ranges.push(QRange {
            var,
            relation,
            aliased,
        });
    }
    let mut from = String::new();
    let mut wheres: Vec<String> = Vec::new();
    for i in 0..n {
        let r = &ranges[i];
        let rel = site.local.relation(r.relation).expect("queried relation");
        let item = if r.aliased {
            format!("{} AS {}", r.relation, r.var)
        } else {
            r.relation.to_string()
        };
        let mut own: Vec<String> = (0..[0, 0, 1, 1, 2][c.pick(5)])
            .map(|_| atom(c, world, &r.var, rel, 0))
            .collect();
        if i == 0 {
            from.push_str(&item);
            wheres.append(&mut own);
            continue;
        }
        let join = join_condition(c, world, site, &ranges, i);
        match c.pick(4) {
            // A LEFT JOIN: the variable's own predicates go to ON or, for
            // some, to WHERE (where they are local only).
            0 => {
                let mut on: Vec<String> = join.into_iter().collect();
                for p in own {
                    if c.chance(70) {
                        on.push(p)
                    } else {
                        wheres.push(p)
                    }
                }
                if on.is_empty() {
                    on.push("1 = 1".into());
                }
                let _ = write!(from, " LEFT JOIN {item} ON {}", on.join(" AND "));
            }
            1 => match join {
                Some(j) => {
                    let _ = write!(from, " JOIN {item} ON {j}");
                    wheres.append(&mut own);
                }
                None => {
                    let _ = write!(from, " CROSS JOIN {item}");
                    wheres.append(&mut own);
                }
            },
            _ => {
                let _ = write!(from, ", {item}");
                wheres.extend(join);
                wheres.append(&mut own);
            }
        }
    }
    // Conjuncts spanning variables that are not join clauses: local only.
    if n > 1 && c.chance(25) {
        let (i, j) = (c.pick(n), c.pick(n));
        let (ri, rj) = (&ranges[i], &ranges[j]);
        let (reli, relj) = (
            site.local.relation(ri.relation).expect("r"),
            site.local.relation(rj.relation).expect("r"),
        );
        wheres.push(if c.chance(50) {
            format!(
                "({} OR {})",
                atom(c, world, &ri.var, reli, 1),
                atom(c, world, &rj.var, relj, 1)
            )
        } else {
            let ai = &reli.attributes[c.pick(reli.attributes.len())];
            let same: Vec<&Attribute> = relj
                .attributes
                .iter()
                .filter(|b| b.ty.is_numeric() == ai.ty.is_numeric())
                .collect();
            let aj = same[c.pick(same.len())];
            format!("{}.{} < {}.{}", ri.var, ai.name, rj.var, aj.name)
        });
    }
    let target = match c.pick(4) {
        0 | 1 => "*".to_string(),
        2 => "count(*) AS n".to_string(),
        _ => format!("{}.*", ranges[0].var),
    };
    let mut sql = format!("SELECT {target} FROM {from}");
    if !wheres.is_empty() {
        let _ = write!(sql, " WHERE {}", wheres.join(" AND "));
    }
    if c.chance(15) {
        sql.push_str(" LIMIT 2");
    }
    sql
}

// ---------------------------------------------------------------------------
// The property

fn describe(world: &World, sc: &Scenario) -> String {
    let mut s = String::new();
    for (si, rels) in sc.local.iter().enumerate() {
        for (r, tuples) in rels {
            for (ti, t) in tuples.iter().enumerate() {
                let state = if si == sc.site {
                    format!(" {:?}", sc.states[r][ti])
                } else {
                    String::new()
                };
                let _ = writeln!(s, "  {} {r} {t:?}{state}", world.sites[si].code);
            }
        }
    }
    s
}

/// Runs one case: generate a query and a network state, plan, compare.
fn check_no_under_fetch(world: &World, sites: &[&str], data: &[u32]) -> Result<(), TestCaseError> {
    let mut c = Choices { data, at: 0 };
    let code = c.one(sites);
    let si = world
        .sites
        .iter()
        .position(|s| s.code == code)
        .expect("a site of the world");
    let site = &world.sites[si];
    let sql = gen_query(&mut c, world, site);
    let sc = gen_scenario(&mut c, world, si);
    let statements = snaps_mapping::parse(&sql)
        .map_err(|e| TestCaseError::fail(format!("{sql}: {e}")))?
        .1;
    let [Statement::Select(select)] = statements.as_slice() else {
        return Err(TestCaseError::fail(format!(
            "{sql}: expected one retrieval"
        )));
    };
    let plan = rewrite::plan(select, &site.local, &site.mapping)
        .map_err(|e| TestCaseError::fail(format!("plan of {sql} at {}: {e}", site.code)))?;
    let resolved = resolve(select, &site.local).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let db = oracle(world, &sc);
    let got = fetched(world, &sc, &plan);
    let mut missing = Vec::new();
    for row in local_answer(&resolved, &site.local, &db) {
        for (i, slot) in row.iter().enumerate() {
            let Some(ri) = slot else { continue };
            let relation = &resolved.ranges[i].relation;
            let tuple = &db[relation][*ri];
            if tuple.owner == si {
                continue;
            }
            if !got.get(relation).is_some_and(|f| f.contains(&tuple.values)) {
                let line = format!(
                    "{relation} {:?} of site {}",
                    tuple.values, world.sites[tuple.owner].code
                );
                if !missing.contains(&line) {
                    missing.push(line);
                }
            }
        }
    }
    prop_assert!(
        missing.is_empty(),
        "{} at site {}: the fetch misses tuples the query needs\nquery: {sql}\nmissing:\n  {}\n\nplan:\n{plan}\ndata:\n{}",
        world.name,
        site.code,
        missing.join("\n  "),
        describe(world, &sc)
    );
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Figures network, queries at A (figure 4.5's key split, visit with
    /// when) and B (fewer attributes, pat_addr only); E maps pat_other only.
    #[test]
    fn figures_key_split_never_drops_a_needed_tuple(data in prop::collection::vec(any::<u32>(), 1200)) {
        check_no_under_fetch(&FIGURES, &["A", "B", "E"], &data)?;
    }

    /// Figures network, queries at C and C2 (figure 4.6's split by main
    /// tuple id) and D (which maps the main part pat_phone only).
    #[test]
    fn figures_main_tuple_id_split_never_drops_a_needed_tuple(data in prop::collection::vec(any::<u32>(), 1200)) {
        check_no_under_fetch(&FIGURES, &["C", "C2", "D"], &data)?;
    }

    /// Radiology network at CPH, which maps everything, with conversions.
    #[test]
    fn radiology_cph_never_drops_a_needed_tuple(data in prop::collection::vec(any::<u32>(), 1200)) {
        check_no_under_fetch(&RADIOLOGY, &["CPH"], &data)?;
    }

    /// Radiology network at STG, which keeps attributes and relations back.
    #[test]
    fn radiology_stg_never_drops_a_needed_tuple(data in prop::collection::vec(any::<u32>(), 1200)) {
        check_no_under_fetch(&RADIOLOGY, &["STG"], &data)?;
    }

    /// Radiology network at GRC, the clinic with no wards or consultants.
    #[test]
    fn radiology_grc_never_drops_a_needed_tuple(data in prop::collection::vec(any::<u32>(), 1200)) {
        check_no_under_fetch(&RADIOLOGY, &["GRC"], &data)?;
    }

    /// What the IR prints for a retrieval parses back to the same retrieval
    /// (sqlparser's `verified_stmt` idea), for the generated queries.
    #[test]
    fn printed_queries_parse_back_the_same(data in prop::collection::vec(any::<u32>(), 0..256)) {
        let mut c = Choices { data: &data, at: 0 };
        let world: &World = if c.chance(50) { &RADIOLOGY } else { &FIGURES };
        let site = &world.sites[c.pick(world.sites.len())];
        let sql = gen_query(&mut c, world, site);
        let (_, first) = snaps_mapping::parse(&sql).map_err(|e| TestCaseError::fail(format!("{sql}: {e}")))?;
        let printed = first[0].to_string();
        let (_, again) = snaps_mapping::parse(&printed)
            .map_err(|e| TestCaseError::fail(format!("{sql}\nprinted as {printed}\ndoes not parse: {e}")))?;
        // AND and OR print without the parentheses their associativity makes
        // needless, so compare what the two print and how they plan, not trees.
        prop_assert_eq!(&printed, &again[0].to_string(), "{}", sql);
        let (Statement::Select(a), Statement::Select(b)) = (&first[0], &again[0]) else {
            return Err(TestCaseError::fail("not a retrieval"));
        };
        let plan = |s: &Select| rewrite::plan(s, &site.local, &site.mapping).map(|p| p.to_string()).map_err(|e| e.to_string());
        prop_assert_eq!(plan(a), plan(b), "{} printed as {}", sql, printed);
    }
}

// ---------------------------------------------------------------------------
// Front ends never panic

/// Words and symbols of both languages, for token soup.
const TOKENS: &[&str] = &[
    "SELECT",
    "select",
    "FROM",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "IN",
    "BETWEEN",
    "LIKE",
    "IS",
    "NULL",
    "JOIN",
    "LEFT",
    "RIGHT",
    "FULL",
    "OUTER",
    "INNER",
    "CROSS",
    "ON",
    "USING",
    "AS",
    "GROUP",
    "BY",
    "HAVING",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "DISTINCT",
    "UNION",
    "INSERT",
    "INTO",
    "VALUES",
    "UPDATE",
    "SET",
    "DELETE",
    "WITH",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "EXISTS",
    "CAST",
    "retrieve",
    "range",
    "of",
    "is",
    "append",
    "to",
    "replace",
    "delete",
    "define",
    "snapshot",
    "unique",
    "sort",
    "all",
    "where",
    "and",
    "or",
    "not",
    "count",
    "countu",
    "sum",
    "avg",
    "min",
    "max",
    "any",
    "patient",
    "visit",
    "pat-addr",
    "p",
    "v",
    "p.pno",
    "v.pno",
    "patient.name",
    "visit.all",
    "p.all",
    "tuple-id",
    "main-tuple-id",
    "*",
    ",",
    ".",
    ";",
    "(",
    ")",
    "=",
    "<>",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "/",
    "%",
    "||",
    ":",
    ":a",
    ":d",
    "'Jones'",
    "\"Jones\"",
    "\"Mac\\\"Intosh\"",
    "'O''Brien'",
    "'",
    "\"",
    "12/12/87",
    "1",
    "-1",
    "0.5",
    "1e309",
    "9223372036854775808",
    "$1",
    "?",
    "/*",
    "*/",
    "--",
    "\n",
    "\\",
    "é",
    "",
];

/// Parses `text` and, where that works, plans each retrieval at a site: none
/// of it may panic, whatever the input.
fn parse_and_plan(text: &str) {
    let Ok((_, statements)) = snaps_mapping::parse(text) else {
        return;
    };
    let site = &RADIOLOGY.sites[0];
    for s in statements {
        let select = match &s {
            Statement::Select(sel) => sel,
            Statement::DefineSnapshot { query, .. } => query,
            _ => continue,
        };
        let _ = s.to_string();
        if let Ok(plan) = rewrite::plan(select, &site.local, &site.mapping) {
            let _ = plan.to_string();
        }
        let _ = rewrite::plan(select, &FIGURES.sites[0].local, &FIGURES.sites[0].mapping);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn front_ends_do_not_panic_on_arbitrary_text(text in any::<String>()) {
        parse_and_plan(&text);
    }

    #[test]
    fn front_ends_do_not_panic_on_token_soup(
        start in prop::sample::select(vec!["", "SELECT ", "retrieve ", "range of p is patient ", "define snapshot s as retrieve "]),
        words in prop::collection::vec(prop::sample::select(TOKENS), 0..40),
    ) {
        parse_and_plan(&format!("{start}{}", words.join(" ")));
    }

    #[test]
    fn front_ends_do_not_panic_on_tokens_without_spaces(
        words in prop::collection::vec(prop::sample::select(TOKENS), 0..40),
    ) {
        parse_and_plan(&words.concat());
    }
}

/// Deep nesting must be refused, not overflow the stack.
#[test]
fn deep_nesting_does_not_overflow() {
    for depth in [100, 1_000, 10_000] {
        let open = "(".repeat(depth);
        let close = ")".repeat(depth);
        parse_and_plan(&format!("SELECT * FROM patient WHERE {open}pno = 1{close}"));
        parse_and_plan(&format!(
            "retrieve (patient.all) where {open}patient.pno = 1{close}"
        ));
        parse_and_plan(&format!(
            "SELECT * FROM patient WHERE {}pno = 1",
            "NOT ".repeat(depth)
        ));
        parse_and_plan(&format!(
            "retrieve (patient.all) where {}patient.pno = 1",
            "not ".repeat(depth)
        ));
        parse_and_plan(&format!(
            "retrieve (patient.all) where patient.pno = {}1",
            "-".repeat(depth)
        ));
        parse_and_plan(&format!(
            "SELECT * FROM patient WHERE pno = {}1",
            "- ".repeat(depth)
        ));
    }
}
