//! `snaps bench match`: how well `snaps_match` finds the same person at
//! other sites, on the seeded generator's network, whose later
//! registrations of a shared person vary as real ones do and whose truth
//! is known ([`datagen::SiteData::person_of`]). Every site's every patient
//! is matched through the global controller on loopback, as a site asks;
//! the pairs it grades are scored against the truth, beside the baseline a
//! plain lookup gives (surname, first names and birth date all equal).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use snaps_global::StoreLocation;
use snaps_schema::{Value, datagen};

use crate::localnet::{LocalNetwork, Options, load_site};

/// Options of `snaps bench match`.
#[derive(clap::Args, Debug, Clone)]
pub struct MatchBenchOptions {
    /// The network folder (holding network.toml, with an [identity]).
    #[arg(long, default_value = "fixtures/radiology")]
    pub network: PathBuf,
    /// Patients registered at each site.
    #[arg(long, default_value_t = 2000)]
    pub patients: usize,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1988)]
    pub seed: u64,
}

/// A record: site code and patient number.
type Record = (String, i64);
/// Two records, the lesser first.
type Pair = (Record, Record);

/// Precision and recall of one way of deciding "same person".
#[derive(Debug, Clone, PartialEq)]
pub struct Quality {
    /// What decided.
    pub what: String,
    /// Pairs it called the same person.
    pub called: usize,
    /// Of those, pairs that are.
    pub right: usize,
    /// Pairs that are the same person, in all.
    pub truth: usize,
}

impl Quality {
    /// Right among called (1 when nothing was called).
    pub fn precision(&self) -> f64 {
        if self.called == 0 {
            1.0
        } else {
            self.right as f64 / self.called as f64
        }
    }

    /// Right among the truth (1 when there is none).
    pub fn recall(&self) -> f64 {
        if self.truth == 0 {
            1.0
        } else {
            self.right as f64 / self.truth as f64
        }
    }
}

/// What `snaps bench match` measured.
#[derive(Debug, Clone)]
pub struct MatchBenchReport {
    /// Sites and patients per site.
    pub sites: usize,
    pub patients: usize,
    /// Records matched (every patient of every site).
    pub asked: usize,
    /// Pairs of records that are the same person, and how many of them
    /// differ in surname, first names or birth date.
    pub true_pairs: usize,
    pub varied_pairs: usize,
    /// Per grade alone (`certain`, `probable`, `possible`), then at or above
    /// each grade, then the exact-equality baseline.
    pub grades: Vec<Quality>,
    pub cumulative: Vec<Quality>,
    pub baseline: Quality,
    /// Recall of the varied pairs at `probable` or better.
    pub varied_recall: f64,
    /// Records named per match, on average.
    pub candidates: f64,
    /// Wall time of all the matches.
    pub elapsed: Duration,
}

impl fmt::Display for MatchBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} sites, {} patients each: {} records matched through the controller in {:.1} s ({:.0} matches/s), {} pairs of records are the same person ({} of them registered differently)",
            self.sites,
            self.patients,
            self.asked,
            self.elapsed.as_secs_f64(),
            self.asked as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.true_pairs,
            self.varied_pairs
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| decided by | pairs called | right | precision | recall |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|")?;
        for q in self
            .grades
            .iter()
            .chain(&self.cumulative)
            .chain(std::iter::once(&self.baseline))
        {
            writeln!(
                f,
                "| {} | {} | {} | {:.4} | {:.4} |",
                q.what,
                q.called,
                q.right,
                q.precision(),
                q.recall()
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Of the {} pairs registered differently (which the exact lookup cannot find), `probable` or better finds {:.1}%. A match named {:.1} records on average.",
            self.varied_pairs,
            100.0 * self.varied_recall,
            self.candidates
        )?;
        let certain = self.cumulative.first();
        let probable = self.cumulative.get(1);
        if let (Some(c), Some(p)) = (certain, probable) {
            writeln!(f)?;
            writeln!(
                f,
                "* {} — `certain` has precision ≥ 0.99: {:.4}",
                if c.precision() >= 0.99 {
                    "reached"
                } else {
                    "not reached"
                },
                c.precision()
            )?;
            writeln!(
                f,
                "* {} — `probable` or better recalls ≥ 0.95 of true pairs: {:.4}",
                if p.recall() >= 0.95 {
                    "reached"
                } else {
                    "not reached"
                },
                p.recall()
            )?;
        }
        Ok(())
    }
}

/// The identifying details of a generated patient row, for the baseline
/// and to tell which pairs were registered differently.
fn details(row: &[Value], catalog: &snaps_schema::Relation) -> Vec<Value> {
    ["surname", "first_names", "dob"]
        .iter()
        .map(|a| {
            catalog
                .attributes
                .iter()
                .position(|x| x.name == *a)
                .map_or(Value::Null, |i| row[i].clone())
        })
        .collect()
}

fn pair(a: Record, b: Record) -> Pair {
    if a <= b { (a, b) } else { (b, a) }
}

/// Runs the benchmark.
pub async fn bench_match(opts: &MatchBenchOptions) -> Result<MatchBenchReport> {
    let network = crate::fixtures::load_network(&opts.network)?;
    let spec = network
        .identity_spec()?
        .context("the network declares no [identity]: nothing to match")?;
    let data = datagen::generate(&network, &datagen::Scale::new(opts.patients), opts.seed)?;
    let dir = tempfile::tempdir()?;
    let mut indexes = BTreeMap::new();
    indexes.insert(
        spec.relation.clone(),
        vec![
            vec![spec.dob.clone()],
            vec![spec.surname.clone()],
            vec![spec.first_names.clone()],
        ],
    );
    let global = LocalNetwork::start_with(
        network.clone(),
        StoreLocation::Sqlite(dir.path().join("global.db")),
        Options {
            indexes,
            ..Options::new(&network)
        },
    )
    .await
    .context("start a global controller")?;

    // The truth, and each record's details as its site registered them.
    let mut people: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
    let mut registered: BTreeMap<Record, Vec<Value>> = BTreeMap::new();
    for (code, d) in &data {
        let c = global.client(code.as_str()).await?;
        load_site(&c, &global.mapping(code.as_str())?, &d.rows, 5000).await?;
        let site = network.site(code.as_str())?;
        let catalog = network.local_catalog(site)?;
        let rel = catalog
            .relation("patient")
            .context("the sites have no patient relation")?;
        for row in &d.rows["patient"] {
            let Some(Value::Int(pno)) = row.first() else {
                continue;
            };
            let record = (code.to_string(), *pno);
            registered.insert(record.clone(), details(row, rel));
            if let Some(person) = d.person_of.get(pno) {
                people.entry(*person).or_default().push(record);
            }
        }
    }
    let mut truth: BTreeSet<Pair> = BTreeSet::new();
    for records in people.values() {
        for (i, a) in records.iter().enumerate() {
            for b in &records[i + 1..] {
                truth.insert(pair(a.clone(), b.clone()));
            }
        }
    }
    let varied: BTreeSet<&Pair> = truth
        .iter()
        .filter(|(a, b)| registered[a] != registered[b])
        .collect();

    // Every record matched, as its own site would ask.
    let bar = indicatif::ProgressBar::new(registered.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("matching {bar:40} {pos}/{len} records {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut clients = BTreeMap::new();
    for code in data.keys() {
        clients.insert(code.to_string(), global.client(code.as_str()).await?);
    }
    let mut graded: BTreeMap<Pair, String> = BTreeMap::new();
    let mut candidates = 0usize;
    let started = Instant::now();
    for (site, pno) in registered.keys() {
        let reply = clients[site]
            .match_patient(&Value::Int(*pno), "bench")
            .await
            .with_context(|| format!("match {site} {pno}"))?;
        candidates += reply.candidates.len();
        for c in reply.candidates {
            let Some(Value::Int(key)) = c.key.as_ref().map(snaps_proto::decode_value) else {
                continue;
            };
            graded.insert(pair((site.clone(), *pno), (c.site, key)), c.grade);
        }
        bar.inc(1);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    global.stop().await?;

    let order = ["certain", "probable", "possible"];
    let quality = |what: String, called: &BTreeSet<&Pair>| Quality {
        what,
        called: called.len(),
        right: called.iter().filter(|p| truth.contains(**p)).count(),
        truth: truth.len(),
    };
    let grades = order
        .iter()
        .map(|g| {
            let called: BTreeSet<&Pair> = graded
                .iter()
                .filter(|(_, x)| x == g)
                .map(|(p, _)| p)
                .collect();
            quality(format!("`{g}`"), &called)
        })
        .collect();
    let at_least = |n: usize| -> BTreeSet<&Pair> {
        graded
            .iter()
            .filter(|(_, x)| order[..=n].contains(&x.as_str()))
            .map(|(p, _)| p)
            .collect()
    };
    let cumulative = (0..order.len())
        .map(|n| {
            let what = if n == 0 {
                "`certain`".to_string()
            } else {
                format!("`{}` or better", order[n])
            };
            quality(what, &at_least(n))
        })
        .collect();
    // The baseline: records at different sites registered alike.
    let mut by_details: BTreeMap<&Vec<Value>, Vec<&Record>> = BTreeMap::new();
    for (r, d) in &registered {
        by_details.entry(d).or_default().push(r);
    }
    let mut exact: BTreeSet<Pair> = BTreeSet::new();
    for records in by_details.values() {
        for (i, a) in records.iter().enumerate() {
            for b in &records[i + 1..] {
                if a.0 != b.0 {
                    exact.insert(pair((*a).clone(), (*b).clone()));
                }
            }
        }
    }
    let baseline = quality(
        "exact surname, first names and birth date (baseline)".into(),
        &exact.iter().collect(),
    );
    let probable = at_least(1);
    let recall_of = |called: &dyn Fn(&Pair) -> bool| {
        if varied.is_empty() {
            1.0
        } else {
            varied.iter().filter(|p| called(p)).count() as f64 / varied.len() as f64
        }
    };
    Ok(MatchBenchReport {
        sites: data.len(),
        patients: opts.patients,
        asked: registered.len(),
        true_pairs: truth.len(),
        varied_pairs: varied.len(),
        grades,
        cumulative,
        baseline,
        varied_recall: recall_of(&|p| probable.contains(p)),
        candidates: candidates as f64 / registered.len().max(1) as f64,
        elapsed,
    })
}
