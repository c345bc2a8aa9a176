//! `snaps bench network`: SNAPS against what a hospital would use instead,
//! on the same seeded workload in the same run.
//!
//! Days of a radiology network (the thesis' Christchurch sites, or more) go
//! through three designs:
//!
//! * **SNAPS** as built: every site runs its queries and updates through its
//!   local controller; a nightly refresh epoch brings the copies up to date.
//! * **Central**: all shared data in one real PostgreSQL server (started
//!   here); a query about another site's patient, and every lookup by name
//!   (a person may be a patient at several sites), is sent to it (prepared
//!   statements); every update is applied there too. Other queries about
//!   the site's own patients are answered locally, as if the site knew that
//!   no other site records anything under its patient numbers (the
//!   routing most favourable to this design that gives SNAPS' answers).
//! * **Full copy**: every night each site sends its day's changes to the
//!   central server and receives a full copy of the other sites' shared
//!   data (`COPY ... TO STDOUT`), deletes its old copy and loads the new
//!   one; all queries are answered locally.
//!
//! Every byte is counted at the sockets of a counting proxy between each
//! site and the server it talks to (`wire_proxy`), with the round trips.
//! Response times on a slow line are modelled from those counts
//! (`Link::seconds`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snaps_local::engine::{Engine, Outcome};
use snaps_local::site::{Site, SiteEngine};
use snaps_proto::v1;
use snaps_schema::{Catalog, KeyRange, NetworkConfig, SiteCode, SiteNo, Value, ValueType, datagen};

use crate::localnet::{LocalNetwork, Options, run_site, site_mapping};
use crate::pg_server::PgServer;
use crate::wire_proxy::{Wire, WireProxy};

/// Options of `snaps bench network`.
#[derive(Debug, Clone, clap::Args)]
pub struct NetworkBenchOptions {
    /// The network folder (holding network.toml); its sites are used in
    /// order, and copied (under new codes and key ranges) when --sites asks
    /// for more.
    #[arg(long, default_value = "fixtures/radiology")]
    pub network: PathBuf,
    /// Sites in the simulated network (2 to 20).
    #[arg(long, default_value_t = 3)]
    pub sites: usize,
    /// Patients registered at each site at the start.
    #[arg(long, default_value_t = 5000)]
    pub scale: usize,
    /// Days simulated (each followed by its night's refresh).
    #[arg(long, default_value_t = 7)]
    pub days: usize,
    /// Patient encounters per site and day (a lookup by name or number,
    /// the visit history, often the reports of the last visit).
    #[arg(long, default_value_t = 60)]
    pub encounters: usize,
    /// Inserts and updates per site and day (new patients, new visits with
    /// their reports, address changes).
    #[arg(long, default_value_t = 6)]
    pub updates: usize,
    /// Exponent of the Zipf distribution of patient popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Seed of the data and workload generators.
    #[arg(long, default_value_t = 1988)]
    pub seed: u64,
    /// Where the report (benchmarks.md's network section) and the plots are
    /// written.
    #[arg(long, default_value = "docs")]
    pub out: PathBuf,
    /// Passes over the covered queries when timing them against SQLite.
    #[arg(long, default_value_t = 50)]
    pub repeats: usize,
    /// Cross-site encounters run again at the end through a proxy shaped
    /// like the 2,400 bit/s line, to check the model against (0: none).
    #[arg(long, default_value_t = 3)]
    pub shaped: usize,
}

/// The three designs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Design {
    /// SNAPS as built.
    Snaps,
    /// One central PostgreSQL server asked for other sites' data.
    Central,
    /// A full copy of the shared relations every night.
    FullCopy,
}

impl Design {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Design::Snaps => "SNAPS",
            Design::Central => "central PostgreSQL",
            Design::FullCopy => "full nightly copy",
        }
    }
}

/// What a site does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// A patient by surname and first names.
    Name,
    /// A patient by number.
    Pno,
    /// A patient's visits (a join of patient and visit).
    History,
    /// The report lines of a visit.
    Reports,
    /// An insert or update.
    Update,
}

impl Class {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Class::Name => "lookup by name",
            Class::Pno => "lookup by number",
            Class::History => "visit history",
            Class::Reports => "visit reports",
            Class::Update => "insert/update",
        }
    }

    const QUERIES: [Class; 4] = [Class::Name, Class::Pno, Class::History, Class::Reports];
}

/// The text of each query class; `$n` are parameters (literals at SNAPS).
fn query_text(class: Class) -> &'static str {
    match class {
        Class::Name => {
            "SELECT pno, surname, first_names, dob, sex, add1 FROM patient WHERE surname = $1 AND first_names = $2"
        }
        Class::Pno => {
            "SELECT pno, surname, first_names, dob, sex, add1 FROM patient WHERE pno = $1"
        }
        Class::History => {
            "SELECT v.vno, v.date, v.description FROM patient p, visit v WHERE p.pno = $1 AND v.pno = p.pno ORDER BY v.date"
        }
        Class::Reports => "SELECT line_no, line FROM visit_rep WHERE vno = $1 ORDER BY line_no",
        Class::Update => "",
    }
}

/// A query's parameters.
#[derive(Debug, Clone)]
enum Param {
    Name(String, String),
    Key(i32),
}

/// One step of a site's day.
#[derive(Debug, Clone)]
struct Action {
    class: Class,
    /// About another site's patient.
    other: bool,
    /// The encounter it belongs to (queries only).
    encounter: u64,
    /// Query parameters (queries only).
    param: Option<Param>,
    /// The statements at a SNAPS site (local schema).
    snaps: Vec<String>,
    /// The statements at the central server (global schema, with the
    /// owner's code), for updates.
    central: Vec<String>,
}

fn literal(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => format!("{f:?}"),
        Value::Text(t) => format!("'{}'", t.replace('\'', "''")),
    }
}

fn with_literals(class: Class, param: &Param) -> String {
    let text = query_text(class);
    match param {
        Param::Name(s, f) => text
            .replace("$1", &literal(&Value::Text(s.clone())))
            .replace("$2", &literal(&Value::Text(f.clone()))),
        Param::Key(k) => text.replace("$1", &k.to_string()),
    }
}

/// SplitMix64: seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Patient popularity: rank r (0-based) has weight 1 / (r + 1)^s.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|r| {
                total += 1.0 / ((r + 1) as f64).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = rng.unit() * total;
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

/// What the workload generator knows of a site's patients.
struct SitePatients {
    code: String,
    /// Patient numbers, most popular first.
    by_rank: Vec<i64>,
    names: HashMap<i64, (String, String)>,
    /// Visit numbers of each patient, oldest first.
    visits: HashMap<i64, Vec<i64>>,
    next_pno: i64,
    next_vno: i64,
    zipf: Zipf,
}

fn column(catalog: &Catalog, relation: &str, attribute: &str) -> Result<usize> {
    catalog
        .relation(relation)
        .and_then(|r| r.attributes.iter().position(|a| a.name == attribute))
        .with_context(|| format!("the local schema has no {relation}.{attribute}"))
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        Value::Null => String::new(),
        other => literal(other),
    }
}

type Data = BTreeMap<String, BTreeMap<String, Vec<Vec<Value>>>>;

/// Global relation → (owner's code, tuple in the global relation's order).
type GlobalRows = BTreeMap<String, Vec<(String, Vec<Value>)>>;

impl SitePatients {
    fn new(
        network: &NetworkConfig,
        code: &str,
        rows: &BTreeMap<String, Vec<Vec<Value>>>,
        s: f64,
        rng: &mut Rng,
    ) -> Result<SitePatients> {
        let site = network.site(code)?;
        let catalog = network.local_catalog(site)?;
        let (pno, surname, first) = (
            column(&catalog, "patient", "pno")?,
            column(&catalog, "patient", "surname")?,
            column(&catalog, "patient", "first_names")?,
        );
        let (vno, vpno, vdate) = (
            column(&catalog, "visit", "vno")?,
            column(&catalog, "visit", "pno")?,
            column(&catalog, "visit", "date")?,
        );
        let mut names = HashMap::new();
        let mut by_rank = Vec::new();
        for r in rows.get("patient").into_iter().flatten() {
            let p = int(&r[pno]).context("a patient without a number")?;
            names.insert(p, (text(&r[surname]), text(&r[first])));
            by_rank.push(p);
        }
        if by_rank.is_empty() {
            bail!("site {code} has no patients");
        }
        // A seeded shuffle: popularity does not follow the numbering.
        for i in (1..by_rank.len()).rev() {
            by_rank.swap(i, rng.below(i + 1));
        }
        let mut dated: Vec<(i64, i64, i64)> = rows
            .get("visit")
            .into_iter()
            .flatten()
            .filter_map(|r| Some((int(&r[vpno])?, int(&r[vdate]).unwrap_or(0), int(&r[vno])?)))
            .collect();
        dated.sort();
        let mut visits: HashMap<i64, Vec<i64>> = HashMap::new();
        for (p, _, v) in &dated {
            visits.entry(*p).or_default().push(*v);
        }
        let max_vno = dated.iter().map(|d| d.2).max().unwrap_or(site.keys.first);
        let max_pno = by_rank.iter().copied().max().unwrap_or(site.keys.first);
        Ok(SitePatients {
            code: code.to_string(),
            zipf: Zipf::new(by_rank.len(), s),
            by_rank,
            names,
            visits,
            next_pno: max_pno + 1,
            next_vno: max_vno + 1,
        })
    }

    fn pick(&self, rng: &mut Rng) -> i64 {
        self.by_rank[self.zipf.sample(rng)]
    }
}

/// The workload: per day, per site, its steps in order.
struct Workload {
    days: Vec<Vec<Vec<Action>>>,
}

const STREETS: [&str; 6] = [
    "Riccarton Rd",
    "Papanui Rd",
    "Colombo St",
    "Lincoln Rd",
    "Ferry Rd",
    "Worcester St",
];

fn make_workload(
    opts: &NetworkBenchOptions,
    network: &NetworkConfig,
    patients: &mut [SitePatients],
) -> Workload {
    let mut rng = Rng(opts.seed ^ 0x005E_ED0F_DA75);
    let home: Vec<bool> = network.sites.iter().map(|s| s.home).collect();
    let n = patients.len();
    let mut encounter = 0u64;
    let mut days = Vec::new();
    for day in 0..opts.days {
        let mut sites = Vec::new();
        for s in 0..n {
            let mut actions = Vec::new();
            // Accident and emergency at the home hospital sees other
            // sites' patients most often.
            let other_share = if home[s] { 0.3 } else { 0.1 };
            for _ in 0..opts.encounters {
                encounter += 1;
                let other = rng.unit() < other_share;
                let owner = if other {
                    let k = 1 + rng.below(n - 1);
                    (s + k) % n
                } else {
                    s
                };
                let p = &patients[owner];
                let pno = p.pick(&mut rng);
                let step = |class, param: Param| Action {
                    class,
                    other,
                    encounter,
                    snaps: vec![with_literals(class, &param)],
                    param: Some(param),
                    central: Vec::new(),
                };
                let key = pno as i32;
                if rng.unit() < 0.5 {
                    let (sur, first) = p.names[&pno].clone();
                    actions.push(step(Class::Name, Param::Name(sur, first)));
                } else {
                    actions.push(step(Class::Pno, Param::Key(key)));
                }
                actions.push(step(Class::History, Param::Key(key)));
                if let Some(v) = p.visits.get(&pno).and_then(|v| v.last())
                    && rng.unit() < 0.7
                {
                    actions.push(step(Class::Reports, Param::Key(*v as i32)));
                }
            }
            // Updates, spread over the day.
            let total = actions.len().max(1);
            for u in 0..opts.updates {
                let p = &mut patients[s];
                let code = p.code.clone();
                let (snaps, central) = match u % 3 {
                    0 => {
                        let pno = p.next_pno;
                        p.next_pno += 1;
                        let sur = format!("Newman{}", rng.below(1000));
                        let first = format!("Aroha {}", rng.below(100));
                        let values = format!(
                            "{pno}, '{sur}', '{first}', {}, 'F', '{} {}'",
                            19300101 + rng.below(60) * 10000,
                            1 + rng.below(200),
                            STREETS[rng.below(STREETS.len())]
                        );
                        p.names.insert(pno, (sur, first));
                        (
                            vec![format!(
                                "INSERT INTO patient (pno, surname, first_names, dob, sex, add1) VALUES ({values})"
                            )],
                            vec![format!(
                                "INSERT INTO patient (owner_site, pno, surname, first_names, dob, sex, add1) VALUES ('{code}', {values})"
                            )],
                        )
                    }
                    1 => {
                        let pno = p.pick(&mut rng);
                        let vno = p.next_vno;
                        p.next_vno += 1;
                        p.visits.entry(pno).or_default().push(vno);
                        let date = 19880701 + day as i64;
                        let visit = format!("{vno}, {pno}, {date}, 'Chest PA and lateral'");
                        let lines: Vec<String> = (1..=3)
                            .map(|l| {
                                format!("{vno}, {l}, 'Report line {l}: no acute abnormality seen.'")
                            })
                            .collect();
                        let central_lines: Vec<String> =
                            lines.iter().map(|l| format!("('{code}', {l})")).collect();
                        let lines: Vec<String> = lines.iter().map(|l| format!("({l})")).collect();
                        (
                            vec![
                                format!(
                                    "INSERT INTO visit (vno, pno, date, description) VALUES ({visit})"
                                ),
                                format!(
                                    "INSERT INTO visit_rep (vno, line_no, line) VALUES {}",
                                    lines.join(", ")
                                ),
                            ],
                            vec![
                                format!(
                                    "INSERT INTO visit (owner_site, vno, pno, date, description) VALUES ('{code}', {visit})"
                                ),
                                format!(
                                    "INSERT INTO visit_rep (owner_site, vno, line_no, line) VALUES {}",
                                    central_lines.join(", ")
                                ),
                            ],
                        )
                    }
                    _ => {
                        let pno = p.pick(&mut rng);
                        let set = format!(
                            "SET add1 = '{} {}' WHERE pno = {pno}",
                            1 + rng.below(200),
                            STREETS[rng.below(STREETS.len())]
                        );
                        (
                            vec![format!("UPDATE patient {set}")],
                            vec![format!("UPDATE patient {set}")],
                        )
                    }
                };
                let at = ((u + 1) * total / (opts.updates + 1)).min(actions.len());
                actions.insert(
                    at,
                    Action {
                        class: Class::Update,
                        other: false,
                        encounter: 0,
                        param: None,
                        snaps,
                        central,
                    },
                );
            }
            sites.push(actions);
        }
        days.push(sites);
    }
    Workload { days }
}

/// One measured step.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Which design.
    pub design: Design,
    /// Day, from 0.
    pub day: usize,
    /// What it was.
    pub class: Class,
    /// About another site's patient.
    pub other: bool,
    /// Its encounter (0 for updates).
    pub encounter: u64,
    /// Counted at the proxy (zero when answered locally).
    pub wire: Wire,
    /// Wall time on loopback; `None` when answered locally without the
    /// design doing anything special (central and full copy).
    pub wall: Option<Duration>,
    /// Process CPU time (SNAPS: site and global controller).
    pub cpu: Duration,
    /// Rows returned.
    pub rows: usize,
    /// Tuples the site received from the global snapshot (SNAPS; 0 for the
    /// other designs).
    pub fetched: u64,
}

/// One night's refresh.
#[derive(Debug, Clone)]
pub struct Night {
    /// Which design.
    pub design: Design,
    /// After day ... (from 0).
    pub day: usize,
    /// Counted at the proxies of all sites.
    pub wire: Wire,
    /// Wall time, all sites.
    pub wall: Duration,
    /// Tuples changed that day (pushed by the sites).
    pub changed: u64,
    /// Full copy: the bytes the copies would take as gzip streams.
    pub gzip_bytes: u64,
    /// SNAPS: snapshot definitions the sites held (each re-run that night).
    pub definitions: u64,
}

/// A covered query's timing at a site against the same query on its
/// SQLite file.
#[derive(Debug, Clone)]
pub struct CoveredTiming {
    /// The class.
    pub class: Class,
    /// Distinct statements timed.
    pub statements: usize,
    /// Per statement through a SNAPS session (the median pass).
    pub snaps: Duration,
    /// Per statement on the SQLite file directly, prepared once.
    pub sqlite: Duration,
    /// Per statement on the SQLite file directly, the text prepared
    /// every time (what SNAPS is given).
    pub sqlite_text: Duration,
    /// Timed statements SNAPS answered on a verdict remembered from an
    /// earlier *performed* check, of `statements` × passes.
    pub remembered: u64,
}

/// A first lookup of another site's patient (by name, the visit history,
/// the last visit's reports) at the first site, through a proxy that delays
/// and paces the bytes as the slow line would.
#[derive(Debug, Clone)]
pub struct ShapedEncounter {
    /// What crossed the line.
    pub wire: Wire,
    /// The process' CPU time meanwhile (the model's local part).
    pub cpu: Duration,
    /// Wall time through the shaped line.
    pub measured: Duration,
}

/// Steps through a statement's rows reading every value, as an
/// application reading the answer does; returns the number of rows.
fn read_all(stmt: &mut rusqlite::Statement<'_>) -> rusqlite::Result<usize> {
    let columns = stmt.column_count();
    let mut rows = stmt.query([])?;
    let mut n = 0;
    while let Some(row) = rows.next()? {
        for i in 0..columns {
            std::hint::black_box(row.get_ref(i)?);
        }
        n += 1;
    }
    Ok(n)
}

/// The median of some durations (zero for none).
fn median(d: &mut [Duration]) -> Duration {
    d.sort();
    d.get(d.len() / 2).copied().unwrap_or_default()
}

/// Refresh bytes against changed tuples at one snapshot size.
#[derive(Debug, Clone)]
pub struct RefreshPoint {
    /// Patients in the global snapshot.
    pub patients: usize,
    /// Copies held by the sites.
    pub copies: u64,
    /// Own tuples changed.
    pub changed: u64,
    /// Bytes pushed.
    pub push: u64,
    /// Bytes of the differential distribution.
    pub differential: u64,
    /// Bytes of delete and re-execute.
    pub reexecute: u64,
}

/// Everything `snaps bench network` measured.
pub struct NetworkReport {
    /// The options it ran with.
    pub opts: NetworkBenchOptions,
    /// The site codes.
    pub sites: Vec<String>,
    /// Tuples of the shared relations in the global snapshot at the start.
    pub shared_tuples: u64,
    /// The PostgreSQL server's version.
    pub postgres: String,
    /// Every step of every design.
    pub samples: Vec<Sample>,
    /// Every night of every design.
    pub nights: Vec<Night>,
    /// Central: bytes of connecting and preparing, once per site.
    pub central_setup: Wire,
    /// Covered queries at the first site.
    pub covered: Vec<CoveredTiming>,
    /// Whether the covered timing fetched anything (it must not).
    pub covered_fetches: i64,
    /// Cross-site encounters through a line shaped like the slow link.
    pub shaped: Vec<ShapedEncounter>,
    /// The epoch after SNAPS' initial load: every site's summaries, whole.
    pub initial_summaries: Night,
    /// SNAPS answers whose row count differed from the central server's
    /// (queries about other sites' patients; changes of the same day reach
    /// SNAPS only at the night's refresh).
    pub differing_answers: usize,
    /// Refresh bytes against changed tuples at two sizes.
    pub refresh: Vec<RefreshPoint>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// The network of `opts.sites` sites: the folder's, in order, and copies
/// of them under new codes and key ranges beyond.
fn network_of(opts: &NetworkBenchOptions) -> Result<NetworkConfig> {
    let mut network = crate::fixtures::load_network(&opts.network)?;
    if !(2..=20).contains(&opts.sites) {
        bail!("--sites must be between 2 and 20, not {}", opts.sites);
    }
    let given = network.sites.len();
    if given < 2 {
        bail!(
            "the network in {} has fewer than two sites",
            opts.network.display()
        );
    }
    if opts.sites <= given {
        network.sites.truncate(opts.sites);
        return Ok(network);
    }
    // Doctor codes must fit an i2 at every site: share what is left above
    // the given sites' ranges.
    let mut top_key = 0;
    let mut top_doctor = 0;
    for s in &network.sites {
        top_key = top_key.max(s.keys.last);
        for r in s.key_ranges.values() {
            top_doctor = top_doctor.max(r.last);
        }
    }
    let extra = opts.sites - given;
    let width = (i64::from(i16::MAX) - top_doctor) / extra as i64;
    let doctors = (5 + opts.scale / 50) as i64;
    if width < doctors {
        bail!(
            "{} sites at --scale {} need {} doctor codes each, and only {width} are left in an i2 per added site: \
             use fewer sites or a smaller --scale",
            opts.sites,
            opts.scale,
            doctors
        );
    }
    for i in 0..extra {
        let mut site = network.sites[given - 1 - (i % (given - 1))].clone();
        let number = (given + i + 1) as u32;
        site.code = SiteCode::new(&format!("S{number:02}"))?;
        site.number = SiteNo(number);
        site.name = format!("Clinic {number}");
        site.home = false;
        site.keys = KeyRange {
            first: top_key + 1 + i as i64 * 10_000_000,
            last: top_key + (i as i64 + 1) * 10_000_000,
        };
        let first = top_doctor + 1 + i as i64 * width;
        for r in site.key_ranges.values_mut() {
            *r = KeyRange {
                first,
                last: first + width - 1,
            };
        }
        network.sites.push(site);
    }
    Ok(network)
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass, nothing else.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        let t = |tv: libc::timeval| {
            Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
        };
        t(ru.ru_utime) + t(ru.ru_stime)
    }
}

fn pg_type(ty: ValueType) -> String {
    match ty {
        ValueType::Int2 => "smallint".into(),
        ValueType::Int4 => "integer".into(),
        ValueType::Float4 => "real".into(),
        ValueType::Char(n) => format!("varchar({n})"),
    }
}

/// Each site's export, as global tuples: global relation → rows of
/// (owner, values in the global relation's order, NULL where not mapped).
fn global_rows(network: &NetworkConfig, global: &Catalog, data: &Data) -> Result<GlobalRows> {
    let mut out: GlobalRows = BTreeMap::new();
    for (code, rows) in data {
        let mapping = site_mapping(network, code)?;
        for rm in mapping.relations() {
            let Some(tuples) = rows.get(&rm.local.name) else {
                continue;
            };
            for t in tuples {
                for (part, values) in rm.parts.iter().zip(rm.export(t)?) {
                    let rel = global
                        .relation(&part.global)
                        .with_context(|| format!("no global relation {}", part.global))?;
                    let mut row = vec![Value::Null; rel.attributes.len()];
                    for (a, v) in part.attrs.iter().zip(values) {
                        if let Some(i) = rel.attributes.iter().position(|g| g.name == a.global) {
                            row[i] = v;
                        }
                    }
                    out.entry(part.global.clone())
                        .or_default()
                        .push((code.clone(), row));
                }
            }
        }
    }
    Ok(out)
}

/// Creates the shared relations in `client`'s database and loads them.
async fn load_central(
    client: &tokio_postgres::Client,
    global: &Catalog,
    rows: &GlobalRows,
) -> Result<()> {
    for rel in global.relations() {
        let mut cols = vec!["owner_site varchar(8) NOT NULL".to_string()];
        cols.extend(
            rel.attributes
                .iter()
                .map(|a| format!("\"{}\" {}", a.name, pg_type(a.ty))),
        );
        if !rel.key.is_empty() {
            let key: Vec<String> = rel.key.iter().map(|k| format!("\"{k}\"")).collect();
            cols.push(format!("PRIMARY KEY ({})", key.join(", ")));
        }
        client
            .batch_execute(&format!("CREATE TABLE {} ({})", rel.name, cols.join(", ")))
            .await
            .with_context(|| format!("create {} at the central server", rel.name))?;
        for chunk in rows
            .get(&rel.name)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .chunks(500)
        {
            let values: Vec<String> = chunk
                .iter()
                .map(|(owner, r)| {
                    let mut v = vec![literal(&Value::Text(owner.clone()))];
                    v.extend(r.iter().map(literal));
                    format!("({})", v.join(", "))
                })
                .collect();
            client
                .batch_execute(&format!(
                    "INSERT INTO {} VALUES {}",
                    rel.name,
                    values.join(", ")
                ))
                .await
                .with_context(|| format!("load {} at the central server", rel.name))?;
        }
    }
    // The lookups the sites make: by name, and visits by patient.
    client
        .batch_execute(
            "CREATE INDEX ON patient (surname, first_names); CREATE INDEX ON visit (pno); ANALYZE",
        )
        .await?;
    Ok(())
}

async fn pg_connect(conninfo: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to PostgreSQL ({conninfo})"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

fn stat(site: &Site, name: &str) -> Result<i64> {
    Ok(site.counter(name)?)
}

fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix:>18} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}

/// Runs one site's day through a SNAPS session; returns its samples.
/// Set when the run it belongs to is dropped (interrupted), so a day's
/// workload on a blocking thread stops at its next encounter instead of
/// querying servers that are gone.
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn snaps_day(
    site: Arc<Site>,
    proxy: Arc<WireProxy>,
    actions: Vec<Action>,
    day: usize,
    bar: indicatif::ProgressBar,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<Sample>> {
    let mut session = SiteEngine(site.clone())
        .open_session("radiology")
        .map_err(|e| anyhow::anyhow!("open a session at {}: {}", site.code(), e.message))?;
    let mut out = Vec::with_capacity(actions.len());
    for a in actions {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("interrupted");
        }
        let received = || site.counter("tuples_received").unwrap_or(0);
        let (w0, c0, t0, f0) = (proxy.wire(), cpu_time(), Instant::now(), received());
        let mut rows = 0;
        for s in &a.snaps {
            let answer = session
                .execute(s)
                .map_err(|e| anyhow::anyhow!("at {}: {s}: {}", site.code(), e.message))?;
            for o in answer.outcomes {
                if let Outcome::Rows { rows: r, .. } = o {
                    rows += r.len();
                }
            }
        }
        let wall = t0.elapsed();
        out.push(Sample {
            design: Design::Snaps,
            day,
            class: a.class,
            other: a.other,
            encounter: a.encounter,
            wire: proxy.wire().since(&w0),
            wall: Some(wall),
            cpu: cpu_time().saturating_sub(c0),
            rows,
            fetched: received().saturating_sub(f0) as u64,
        });
        bar.inc(1);
    }
    Ok(out)
}

/// Runs a refresh epoch and waits until every site has recorded it.
async fn snaps_night(
    net: &LocalNetwork,
    sites: &[Arc<Site>],
    proxies: &[Arc<WireProxy>],
    day: usize,
) -> Result<Night> {
    for _ in 0..1000 {
        if sites.iter().all(|s| s.subscribed()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let epochs: Vec<i64> = sites
        .iter()
        .map(|s| stat(s, "refresh_epochs"))
        .collect::<Result<_>>()?;
    let before: Vec<Wire> = proxies.iter().map(|p| p.wire()).collect();
    let started = Instant::now();
    let admin = net.admin_client().await?;
    let mut stream = admin.run_refresh().await?;
    let mut summary = None;
    while let Some(p) = stream.message().await? {
        if p.summary.is_some() {
            summary = p.summary;
        }
    }
    let summary: v1::RefreshSummary = summary.context("the refresh gave no summary")?;
    if !summary.absent.is_empty() {
        bail!("sites were absent from the refresh: {:?}", summary.absent);
    }
    for _ in 0..1000 {
        let done = sites
            .iter()
            .zip(&epochs)
            .all(|(s, e)| stat(s, "refresh_epochs").is_ok_and(|n| n > *e));
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = started.elapsed();
    let mut wire = Wire::default();
    for (p, b) in proxies.iter().zip(&before) {
        wire.add(&p.wire().since(b));
    }
    let mut definitions = 0u64;
    for s in sites {
        let c = rusqlite::Connection::open(s.path())?;
        let n: i64 = c.query_row("SELECT count(*) FROM snaps_snapshot_definition", [], |r| {
            r.get(0)
        })?;
        definitions += n as u64;
    }
    Ok(Night {
        design: Design::Snaps,
        day,
        wire,
        wall,
        changed: summary.tuples_pushed,
        gzip_bytes: 0,
        definitions,
    })
}

struct SnapsRun {
    samples: Vec<Sample>,
    nights: Vec<Night>,
    covered: Vec<CoveredTiming>,
    covered_fetches: i64,
    shaped: Vec<ShapedEncounter>,
    /// The epoch after the initial load, which sends every site its
    /// summaries whole: counted apart, as the initial load is.
    initial_summaries: Night,
}

/// Candidates for the shaped-line check: other sites' patients with
/// visits, in a seeded order, each with the statements of a first encounter
/// at the first site (by name, the visit history, the last visit's reports).
fn shaped_checks(patients: &[SitePatients], rng: &mut Rng) -> Vec<(i64, Vec<String>)> {
    let mut out = Vec::new();
    for p in patients.iter().skip(1) {
        let mut with_visits: Vec<i64> = p
            .visits
            .iter()
            .filter(|(pno, v)| !v.is_empty() && p.names.contains_key(*pno))
            .map(|(pno, _)| *pno)
            .collect();
        with_visits.sort_unstable();
        for _ in 0..20.min(with_visits.len()) {
            let pno = with_visits.swap_remove(rng.below(with_visits.len()));
            let (sur, first) = p.names[&pno].clone();
            let last = *p.visits[&pno].last().unwrap_or(&0);
            out.push((
                pno,
                vec![
                    with_literals(Class::Name, &Param::Name(sur, first)),
                    with_literals(Class::History, &Param::Key(pno as i32)),
                    with_literals(Class::Reports, &Param::Key(last as i32)),
                ],
            ));
        }
    }
    // Alternate between the other sites.
    let half = out.len() / 2;
    let (a, b) = out.split_at(half);
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| [x.clone(), y.clone()])
        .collect()
}

async fn run_snaps(
    network: &NetworkConfig,
    data: &Data,
    workload: &Workload,
    checks: &[(i64, Vec<String>)],
    opts: &NetworkBenchOptions,
    dir: &std::path::Path,
) -> Result<SnapsRun> {
    let mut options = Options::new(network);
    options.refresh.collect_timeout = Duration::from_secs(3600);
    options.refresh.distribute_timeout = Duration::from_secs(3600);
    let mut net = LocalNetwork::start_with(network.clone(), dir.join("global.db"), options).await?;
    let real = net.addr.clone();
    let target: std::net::SocketAddr = real
        .trim_start_matches("http://")
        .parse()
        .context("the global controller's address")?;
    let mut sites = Vec::new();
    let mut proxies = Vec::new();
    let bar = progress(data.len() as u64, "SNAPS: load");
    for site in &network.sites {
        let code = site.code.as_str();
        let database = dir.join(code).join("local.db");
        let mut store = snaps_local::SiteStore::create_in_network(network, code, &database)?;
        for (relation, tuples) in &data[code] {
            store.load(relation, tuples)?;
        }
        drop(store);
        // The site reaches the controller through its own counting proxy.
        let proxy = Arc::new(WireProxy::start(target).await?);
        net.addr = format!("http://{}", proxy.addr);
        let running = run_site(
            &net,
            code,
            database,
            "127.0.0.1:0".parse()?,
            snaps_local::endpoint::Login::Trust,
            std::future::pending(),
        )
        .await;
        net.addr = real.clone();
        sites.push(running?.site);
        proxies.push(proxy);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let initial_summaries = snaps_night(&net, &sites, &proxies, 0).await?;
    let steps: u64 = workload.days.iter().flatten().map(|a| a.len() as u64).sum();
    let bar = progress(steps, "SNAPS");
    let mut samples = Vec::new();
    let mut nights = Vec::new();
    let stop = StopOnDrop(Arc::default());
    for (day, per_site) in workload.days.iter().enumerate() {
        bar.set_message(format!("day {}", day + 1));
        for (s, actions) in per_site.iter().enumerate() {
            let (site, proxy, actions, b, halt) = (
                sites[s].clone(),
                proxies[s].clone(),
                actions.clone(),
                bar.clone(),
                stop.0.clone(),
            );
            samples.extend(
                tokio::task::spawn_blocking(move || snaps_day(site, proxy, actions, day, b, halt))
                    .await??,
            );
        }
        bar.set_message(format!("night {}", day + 1));
        nights.push(snaps_night(&net, &sites, &proxies, day).await?);
    }
    bar.finish_and_clear();

    // Covered queries at the first site: what it asked during the run,
    // again, through a session and straight on its SQLite file.
    let site = sites[0].clone();
    let texts: Vec<(Class, String)> = {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for a in workload.days.iter().flat_map(|d| &d[0]) {
            if a.class != Class::Update
                && out.iter().filter(|(c, _)| *c == a.class).count() < 20
                && seen.insert(a.snaps[0].clone())
            {
                out.push((a.class, a.snaps[0].clone()));
            }
        }
        out
    };
    let repeats = opts.repeats.max(1);
    let fetches0 = stat(&site, "global_fetches")?;
    let covered = tokio::task::spawn_blocking(move || -> Result<Vec<CoveredTiming>> {
        let mut session = SiteEngine(site.clone())
            .open_session("radiology")
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let direct = rusqlite::Connection::open(site.path())?;
        // Room for every statement timed, so "prepared once" is that.
        direct.set_prepared_statement_cache_capacity(Class::QUERIES.len() * 20);
        let mut out = Vec::new();
        for class in Class::QUERIES {
            let mine: Vec<&String> = texts
                .iter()
                .filter(|(c, _)| *c == class)
                .map(|(_, t)| t)
                .collect();
            if mine.is_empty() {
                continue;
            }
            // Once each first, so both start warm.
            for t in &mine {
                session
                    .execute(t)
                    .map_err(|e| anyhow::anyhow!("{t}: {}", e.message))?;
            }
            // The three ways take turns pass by pass, and each reports its
            // median pass, so a burst of other work on the machine lands on
            // one pass of one way rather than on one way's whole figure.
            let remembered = site.repeated_reads();
            let (mut snaps, mut sqlite, mut sqlite_text) = (Vec::new(), Vec::new(), Vec::new());
            let (mut rows_snaps, mut rows_direct, mut rows_text) = (0, 0, 0);
            for _ in 0..repeats {
                let started = Instant::now();
                for t in &mine {
                    let answer = session
                        .execute(t)
                        .map_err(|e| anyhow::anyhow!("{t}: {}", e.message))?;
                    for o in answer.outcomes {
                        if let Outcome::Rows { rows, .. } = o {
                            rows_snaps += rows.len();
                        }
                    }
                }
                snaps.push(started.elapsed());
                let started = Instant::now();
                for t in &mine {
                    let mut stmt = direct.prepare_cached(t)?;
                    rows_direct += read_all(&mut stmt)?;
                }
                sqlite.push(started.elapsed());
                // The same text prepared every time, as SNAPS receives it.
                let started = Instant::now();
                for t in &mine {
                    let mut stmt = direct.prepare(t)?;
                    rows_text += read_all(&mut stmt)?;
                }
                sqlite_text.push(started.elapsed());
            }
            let remembered = site.repeated_reads() - remembered;
            if rows_snaps != rows_direct || rows_text != rows_direct {
                bail!(
                    "covered {}: SNAPS returned {rows_snaps} rows, SQLite {rows_direct}",
                    class.name()
                );
            }
            let per = |passes: &mut Vec<Duration>| median(passes) / mine.len() as u32;
            out.push(CoveredTiming {
                class,
                statements: mine.len(),
                snaps: per(&mut snaps),
                sqlite: per(&mut sqlite),
                sqlite_text: per(&mut sqlite_text),
                remembered,
            });
        }
        Ok(out)
    })
    .await??;
    let covered_fetches = stat(&sites[0], "global_fetches")? - fetches0;
    let first = network.sites[0].code.as_str();
    let shaped = shaped_encounters(
        &net,
        first,
        &dir.join(first).join("local.db"),
        target,
        checks,
        opts.shaped,
    )
    .await?;
    drop(sites);
    net.stop().await?;
    Ok(SnapsRun {
        samples,
        nights,
        covered,
        covered_fetches,
        shaped,
        initial_summaries,
    })
}

/// Runs up to `wanted` of `checks` (a patient of another site, and the
/// encounter's statements) that site `code` holds nothing of yet, through a
/// second handle on its database whose link to the controller is a proxy
/// shaped like the slow line.
async fn shaped_encounters(
    net: &LocalNetwork,
    code: &str,
    database: &std::path::Path,
    target: std::net::SocketAddr,
    checks: &[(i64, Vec<String>)],
    wanted: usize,
) -> Result<Vec<ShapedEncounter>> {
    if wanted == 0 {
        return Ok(Vec::new());
    }
    let slow = &crate::network_report::LINKS[0];
    let line = crate::wire_proxy::Line {
        bits_per_second: slow.bits_per_second,
        one_way: Duration::from_secs_f64(slow.rtt / 2.0),
    };
    let proxy = Arc::new(WireProxy::start_with(target, Some(line)).await?);
    let link = snaps_local::site::GlobalLink {
        addr: format!("http://{}", proxy.addr),
        fallbacks: Vec::new(),
        auth: net.site_auth(code)?,
        compress: true,
        fetch_timeout: Duration::from_secs(300),
        retry_after: Duration::from_secs(10),
    };
    let site = Site::open(database, &net.network.global_catalog()?, Some(link))?;
    let (database, checks) = (database.to_path_buf(), checks.to_vec());
    tokio::task::spawn_blocking(move || -> Result<Vec<ShapedEncounter>> {
        let mut session = SiteEngine(site.clone())
            .open_session("radiology")
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let held = rusqlite::Connection::open(&database)?;
        let mut out = Vec::new();
        for (pno, statements) in checks {
            if out.len() == wanted {
                break;
            }
            let holds: bool = held.query_row(
                "SELECT EXISTS (SELECT 1 FROM patient WHERE pno = ?1)",
                [pno],
                |r| r.get(0),
            )?;
            if holds {
                continue;
            }
            let (w0, c0, t0) = (proxy.wire(), cpu_time(), Instant::now());
            for s in &statements {
                let answer = session
                    .execute(s)
                    .map_err(|e| anyhow::anyhow!("shaped line: {s}: {}", e.message))?;
                if !answer.notices.is_empty() {
                    bail!("shaped line: {s}: {:?}", answer.notices);
                }
            }
            out.push(ShapedEncounter {
                wire: proxy.wire().since(&w0),
                cpu: cpu_time() - c0,
                measured: t0.elapsed(),
            });
        }
        Ok(out)
    })
    .await?
}

struct CentralSite {
    client: tokio_postgres::Client,
    proxy: WireProxy,
    statements: BTreeMap<Class, tokio_postgres::Statement>,
}

async fn run_central(
    server: &PgServer,
    network: &NetworkConfig,
    workload: &Workload,
) -> Result<(Vec<Sample>, Wire)> {
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse()?;
    let mut sites = Vec::new();
    let mut setup = Wire::default();
    for _ in &network.sites {
        let proxy = WireProxy::start(target).await?;
        let client = pg_connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=central",
            proxy.addr.port()
        ))
        .await?;
        let mut statements = BTreeMap::new();
        for class in Class::QUERIES {
            statements.insert(class, client.prepare(query_text(class)).await?);
        }
        setup.add(&proxy.wire());
        sites.push(CentralSite {
            client,
            proxy,
            statements,
        });
    }
    let steps: u64 = workload.days.iter().flatten().map(|a| a.len() as u64).sum();
    let bar = progress(steps, "central");
    let mut samples = Vec::new();
    for (day, per_site) in workload.days.iter().enumerate() {
        bar.set_message(format!("day {}", day + 1));
        for (s, actions) in per_site.iter().enumerate() {
            let site = &sites[s];
            for a in actions {
                bar.inc(1);
                // The site's own patients are answered from its own data,
                // but for lookups by name: people are patients at more than
                // one site, and the answer must show every record of them.
                if a.class != Class::Update && !a.other && a.class != Class::Name {
                    samples.push(Sample {
                        design: Design::Central,
                        day,
                        class: a.class,
                        other: false,
                        encounter: a.encounter,
                        wire: Wire::default(),
                        wall: None,
                        cpu: Duration::ZERO,
                        rows: 0,
                        fetched: 0,
                    });
                    continue;
                }
                let (w0, t0) = (site.proxy.wire(), Instant::now());
                let mut rows = 0;
                if a.class == Class::Update {
                    for s in &a.central {
                        site.client
                            .batch_execute(s)
                            .await
                            .with_context(|| format!("central: {s}"))?;
                    }
                } else {
                    let stmt = &site.statements[&a.class];
                    rows = match a.param.as_ref().context("a query without parameters")? {
                        Param::Name(s, f) => site.client.query(stmt, &[s, f]).await?.len(),
                        Param::Key(k) => site.client.query(stmt, &[k]).await?.len(),
                    };
                }
                samples.push(Sample {
                    design: Design::Central,
                    day,
                    class: a.class,
                    other: a.other,
                    encounter: a.encounter,
                    wire: site.proxy.wire().since(&w0),
                    wall: Some(t0.elapsed()),
                    cpu: Duration::ZERO,
                    rows,
                    fetched: 0,
                });
            }
        }
    }
    bar.finish_and_clear();
    Ok((samples, setup))
}

/// Reads PostgreSQL's COPY text format into rows (NULL as `None`).
fn copy_rows(data: &[u8]) -> Vec<Vec<Option<String>>> {
    let text = String::from_utf8_lossy(data);
    text.lines()
        .map(|line| {
            line.split('\t')
                .map(|field| {
                    if field == "\\N" {
                        return None;
                    }
                    let mut out = String::with_capacity(field.len());
                    let mut chars = field.chars();
                    while let Some(c) = chars.next() {
                        if c != '\\' {
                            out.push(c);
                            continue;
                        }
                        match chars.next() {
                            Some('t') => out.push('\t'),
                            Some('n') => out.push('\n'),
                            Some('r') => out.push('\r'),
                            Some(other) => out.push(other),
                            None => {}
                        }
                    }
                    Some(out)
                })
                .collect()
        })
        .collect()
}

struct CopySite {
    code: String,
    client: tokio_postgres::Client,
    proxy: WireProxy,
    copy: rusqlite::Connection,
}

async fn full_copy_night(
    sites: &mut [CopySite],
    global: &Catalog,
    pushes: &[Vec<String>],
    day: usize,
) -> Result<Night> {
    use futures::StreamExt;
    use std::io::Write;
    let before: Vec<Wire> = sites.iter().map(|s| s.proxy.wire()).collect();
    let started = Instant::now();
    // Every site sends its day's changes first, ...
    for (site, push) in sites.iter().zip(pushes) {
        if !push.is_empty() {
            site.client
                .batch_execute(&push.join(";\n"))
                .await
                .with_context(|| format!("push of {}", site.code))?;
        }
    }
    // ... then each receives the others' shared data whole and reloads it.
    let mut gzip_bytes = 0u64;
    for site in sites.iter_mut() {
        for rel in global.relations() {
            let cols: Vec<String> = rel
                .attributes
                .iter()
                .map(|a| format!("\"{}\"", a.name))
                .collect();
            let sql = format!(
                "COPY (SELECT {} FROM {} WHERE owner_site <> '{}') TO STDOUT",
                cols.join(", "),
                rel.name,
                site.code
            );
            let stream = site.client.copy_out(sql.as_str()).await?;
            futures::pin_mut!(stream);
            let mut data = Vec::new();
            while let Some(chunk) = stream.next().await {
                data.extend_from_slice(&chunk?);
            }
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&data)?;
            gzip_bytes += gz.finish()?.len() as u64;
            let tx = site.copy.transaction()?;
            tx.execute(&format!("DELETE FROM {}", rel.name), [])?;
            {
                let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
                let mut stmt = tx.prepare(&format!(
                    "INSERT INTO {} VALUES ({})",
                    rel.name,
                    marks.join(", ")
                ))?;
                for row in copy_rows(&data) {
                    stmt.execute(rusqlite::params_from_iter(row))?;
                }
            }
            tx.commit()?;
        }
    }
    let wall = started.elapsed();
    let mut wire = Wire::default();
    for (s, b) in sites.iter().zip(&before) {
        wire.add(&s.proxy.wire().since(b));
    }
    Ok(Night {
        design: Design::FullCopy,
        day,
        wire,
        wall,
        changed: 0,
        gzip_bytes,
        definitions: 0,
    })
}

async fn run_full_copy(
    server: &PgServer,
    network: &NetworkConfig,
    global: &Catalog,
    workload: &Workload,
    dir: &std::path::Path,
) -> Result<(Vec<Sample>, Vec<Night>)> {
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse()?;
    let mut sites = Vec::new();
    for site in &network.sites {
        let proxy = WireProxy::start(target).await?;
        let client = pg_connect(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=fullcopy",
            proxy.addr.port()
        ))
        .await?;
        let path = dir.join(format!("{}-copy.db", site.code));
        let copy = rusqlite::Connection::open(&path)?;
        copy.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        for rel in global.relations() {
            let mut cols: Vec<String> = rel
                .attributes
                .iter()
                .map(|a| {
                    let ty = match a.ty {
                        ValueType::Int2 | ValueType::Int4 => "INTEGER",
                        ValueType::Float4 => "REAL",
                        ValueType::Char(_) => "TEXT",
                    };
                    format!("\"{}\" {ty}", a.name)
                })
                .collect();
            if !rel.key.is_empty() {
                cols.push(format!("PRIMARY KEY ({})", rel.key.join(", ")));
            }
            copy.execute_batch(&format!("CREATE TABLE {} ({})", rel.name, cols.join(", ")))?;
        }
        sites.push(CopySite {
            code: site.code.to_string(),
            client,
            proxy,
            copy,
        });
    }
    let bar = progress(workload.days.len() as u64 + 1, "full copy");
    // Night 0: the copies the week starts with (not counted).
    let none = vec![Vec::new(); sites.len()];
    full_copy_night(&mut sites, global, &none, 0).await?;
    bar.inc(1);
    let mut samples = Vec::new();
    let mut nights = Vec::new();
    for (day, per_site) in workload.days.iter().enumerate() {
        let mut pushes = Vec::new();
        for actions in per_site {
            let mut push = Vec::new();
            for a in actions {
                // Every query is answered from the local copy.
                samples.push(Sample {
                    design: Design::FullCopy,
                    day,
                    class: a.class,
                    other: a.other,
                    encounter: a.encounter,
                    wire: Wire::default(),
                    wall: None,
                    cpu: Duration::ZERO,
                    rows: 0,
                    fetched: 0,
                });
                push.extend(a.central.iter().cloned());
            }
            pushes.push(push);
        }
        nights.push(full_copy_night(&mut sites, global, &pushes, day).await?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((samples, nights))
}

/// Runs `snaps bench network`: all three designs, then writes the report.
pub async fn bench_network(opts: &NetworkBenchOptions) -> Result<NetworkReport> {
    let started = Instant::now();
    if opts.days == 0 || opts.days > 366 {
        bail!("--days must be between 1 and 366, not {}", opts.days);
    }
    if opts.scale < 10 || opts.scale > 1_000_000 {
        bail!(
            "--scale must be between 10 and 1,000,000 patients per site, not {}",
            opts.scale
        );
    }
    if opts.encounters == 0 {
        bail!("--encounters must be at least 1");
    }
    if !(0.0..=4.0).contains(&opts.zipf) {
        bail!("--zipf must be between 0 and 4, not {}", opts.zipf);
    }
    let network = network_of(opts)?;
    let global = network.global_catalog()?;
    // The server first: a missing PostgreSQL should fail before the long
    // part of the run.
    let server = tokio::task::spawn_blocking(PgServer::start).await??;
    let postgres = server.version();

    let data: Data = datagen::generate(&network, &datagen::Scale::new(opts.scale), opts.seed)?
        .into_iter()
        .map(|(c, d)| (c.to_string(), d.rows))
        .collect();
    let mut rng = Rng(opts.seed);
    let mut patients = network
        .sites
        .iter()
        .map(|s| {
            SitePatients::new(
                &network,
                s.code.as_str(),
                &data[s.code.as_str()],
                opts.zipf,
                &mut rng,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let workload = make_workload(opts, &network, &mut patients);
    let checks = shaped_checks(&patients, &mut rng);

    // The central server's databases: one for each design that uses it.
    let rows = global_rows(&network, &global, &data)?;
    let shared_tuples = rows.values().map(|r| r.len() as u64).sum();
    {
        let admin = pg_connect(&server.conninfo("postgres")).await?;
        admin.batch_execute("CREATE DATABASE central").await?;
        let central = pg_connect(&server.conninfo("central")).await?;
        load_central(&central, &global, &rows).await?;
        drop(central);
        // Wait until the loader's connection is gone: a template must have
        // no sessions.
        let mut copied = Err(anyhow::anyhow!("not tried"));
        for _ in 0..100 {
            copied = admin
                .batch_execute("CREATE DATABASE fullcopy TEMPLATE central")
                .await
                .map_err(anyhow::Error::from);
            if copied.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        copied.context("copy the central database for the full-copy design")?;
    }

    let dir = tempfile::tempdir()?;
    let snaps = run_snaps(&network, &data, &workload, &checks, opts, dir.path()).await?;
    let (central, central_setup) = run_central(&server, &network, &workload).await?;
    let (copy_samples, copy_nights) =
        run_full_copy(&server, &network, &global, &workload, dir.path()).await?;
    tokio::task::spawn_blocking(move || server.stop()).await??;

    // SNAPS' answers about other sites' patients against the server's.
    let differing_answers = snaps
        .samples
        .iter()
        .zip(&central)
        .filter(|(s, c)| c.wall.is_some() && s.class != Class::Update && s.rows != c.rows)
        .count();

    // Refresh bytes against changed tuples, at two sizes of the global
    // snapshot.
    let mut refresh = Vec::new();
    let bar = progress(4, "refresh sizes");
    // The same numbers of changed patients at both sizes.
    for (patients, shares) in [
        (opts.scale * 3, [0.01, 0.04]),
        (opts.scale * 30, [0.001, 0.004]),
    ] {
        for changed in shares {
            let ropts = crate::refresh_bench::RefreshBenchOptions {
                network: opts.network.clone(),
                patients: vec![patients],
                changed,
                held: 0.1,
                seed: opts.seed,
            };
            let three = crate::fixtures::load_network(&opts.network)?;
            let row = crate::refresh_bench::one_size(&three, &ropts, patients).await?;
            refresh.push(RefreshPoint {
                patients: row.patients,
                copies: row.copies,
                changed: row.changed,
                push: row.push_bytes,
                differential: row.differential.0,
                reexecute: row.reexecute.0,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let mut samples = snaps.samples;
    samples.extend(central);
    samples.extend(copy_samples);
    let mut nights = snaps.nights;
    nights.extend(copy_nights);
    let report = NetworkReport {
        opts: opts.clone(),
        sites: network.sites.iter().map(|s| s.code.to_string()).collect(),
        shared_tuples,
        postgres,
        samples,
        nights,
        central_setup,
        covered: snaps.covered,
        covered_fetches: snaps.covered_fetches,
        shaped: snaps.shaped,
        initial_summaries: snaps.initial_summaries,
        differing_answers,
        refresh,
        elapsed: started.elapsed(),
    };
    crate::network_report::write(&report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_format_is_read_with_nulls_and_escapes() {
        let rows = copy_rows(b"1\tSmith\t\\N\n2\ta\\tb\\\\c\t19420905\n");
        assert_eq!(
            rows,
            vec![
                vec![Some("1".into()), Some("Smith".into()), None],
                vec![
                    Some("2".into()),
                    Some("a\tb\\c".into()),
                    Some("19420905".into())
                ],
            ]
        );
    }

    #[test]
    fn zipf_favours_the_first_ranks_and_is_seeded() {
        let z = Zipf::new(1000, 1.0);
        let draw = |seed| {
            let mut rng = Rng(seed);
            (0..2000).map(|_| z.sample(&mut rng)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        let first = a.iter().filter(|r| **r == 0).count();
        let hundredth = a.iter().filter(|r| **r == 99).count();
        // Rank 1 has 100 times rank 100's weight (about 13% of draws).
        assert!(first > 150 && first > 10 * hundredth, "{first} {hundredth}");
        assert!(a.iter().all(|r| *r < 1000));
    }

    #[test]
    fn literals_quote_text() {
        let p = Param::Name("O'Brien".into(), "Sean".into());
        assert_eq!(
            with_literals(Class::Name, &p),
            "SELECT pno, surname, first_names, dob, sex, add1 FROM patient WHERE surname = 'O''Brien' AND first_names = 'Sean'"
        );
    }
}
