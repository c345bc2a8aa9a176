//! `snaps bench refresh`: what the nightly refresh costs, differential
//! against delete-and-re-execute, in one run, at several sizes of the global
//! snapshot.
//!
//! For each size: the three radiology sites with generated patients (split
//! evenly), each holding copies of about a tenth of the other sites'
//! patients through snapshot definitions on date of birth; then a share of
//! every site's own patients (1% by default) changes. One refresh epoch
//! runs: the sites push (the same in both designs) and then bring their
//! copies up to date. Measured for that second half, at the sites' sockets:
//!
//! * **differential** (SNAPS): the new versions of changed tuples the site
//!   holds, and the re-run definitions' tuples the site did not hold yet;
//! * **delete and re-execute** (the baseline, built only here): every copy
//!   thrown away and every definition fetched again from scratch.
//!
//! Both must leave every site holding the same copies; the benchmark checks
//! it. Time is wall time of that half, all sites at once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snaps_local::engine::Engine;
use snaps_local::site::{Site, SiteEngine};
use snaps_proto::v1;
use snaps_schema::{NetworkConfig, Value, datagen};

use crate::localnet::{LocalNetwork, Options, start_sites};

/// Options of `snaps bench refresh`.
#[derive(Debug, Clone, clap::Args)]
pub struct RefreshBenchOptions {
    /// The network folder (holding network.toml).
    #[arg(long, default_value = "fixtures/radiology")]
    pub network: std::path::PathBuf,
    /// Sizes of the global snapshot, in patients (split over the sites).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub patients: Vec<usize>,
    /// Share of every site's own patients changed before the refresh.
    #[arg(long, default_value_t = 0.01)]
    pub changed: f64,
    /// Share of the other sites' patients each site holds copies of.
    #[arg(long, default_value_t = 0.1)]
    pub held: f64,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1988)]
    pub seed: u64,
}

/// One size's figures.
#[derive(Debug, Clone)]
pub struct RefreshRow {
    /// Patients in the global snapshot.
    pub patients: usize,
    /// Copies the sites hold, in all.
    pub copies: u64,
    /// Own tuples changed, in all.
    pub changed: u64,
    /// Bytes the sites pushed (the same in both designs).
    pub push_bytes: u64,
    /// Differential: bytes and time to bring the copies up to date.
    pub differential: (u64, Duration),
    /// Delete and re-execute: bytes and time.
    pub reexecute: (u64, Duration),
}

/// The figures of `snaps bench refresh`.
#[derive(Debug, Clone)]
pub struct RefreshBenchReport {
    /// Share of own patients changed.
    pub changed: f64,
    /// Share of others' patients held.
    pub held: f64,
    /// One row per size.
    pub rows: Vec<RefreshRow>,
}

impl fmt::Display for RefreshBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "refresh of three radiology sites, {:.1}% of own patients changed, {:.0}% of others' patients held",
            self.changed * 100.0,
            self.held * 100.0
        )?;
        writeln!(
            f,
            "bringing the copies up to date after the commit (bytes at the sites' sockets, wall time):"
        )?;
        writeln!(
            f,
            "{:>9} {:>8} {:>8} {:>11} | {:>12} {:>9} | {:>12} {:>9} | {:>7} {:>7}",
            "patients",
            "copies",
            "changed",
            "push B",
            "diff B",
            "diff s",
            "re-exec B",
            "re-exec s",
            "B ratio",
            "t ratio"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:>9} {:>8} {:>8} {:>11} | {:>12} {:>9.3} | {:>12} {:>9.3} | {:>7.3} {:>7.3}",
                r.patients,
                r.copies,
                r.changed,
                r.push_bytes,
                r.differential.0,
                r.differential.1.as_secs_f64(),
                r.reexecute.0,
                r.reexecute.1.as_secs_f64(),
                r.differential.0 as f64 / r.reexecute.0.max(1) as f64,
                r.differential.1.as_secs_f64() / r.reexecute.1.as_secs_f64().max(1e-9),
            )?;
        }
        writeln!(
            f,
            "ratios are differential / delete-and-re-execute, measured in the same run"
        )
    }
}

fn stat(site: &Site, name: &str) -> Result<i64> {
    Ok(site.counter(name)?)
}

fn copies(site: &Site) -> Result<Vec<String>> {
    let c = rusqlite::Connection::open(site.path())?;
    let mut stmt = c.prepare(
        "SELECT pno || '|' || coalesce(add1, '') FROM patient WHERE (snaps_status & 128) <> 0 ORDER BY pno",
    )?;
    let rows = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(rows)
}

/// Runs statements at a site through a session of its own.
async fn execute(site: &Arc<Site>, statements: Vec<String>) -> Result<()> {
    let site = site.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut session = SiteEngine(site)
            .open_session("bench")
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        for s in statements {
            session
                .execute(&s)
                .map_err(|e| anyhow::anyhow!("{s}: {}", e.message))?;
        }
        Ok(())
    })
    .await?
}

pub(crate) async fn one_size(
    network: &NetworkConfig,
    opts: &RefreshBenchOptions,
    patients: usize,
) -> Result<RefreshRow> {
    let per_site = (patients / network.sites.len()).max(1);
    let scale = datagen::Scale {
        visits_per_patient: 0.0,
        report_lines: 0,
        ..datagen::Scale::new(per_site)
    };
    let data: BTreeMap<String, BTreeMap<String, Vec<Vec<Value>>>> =
        datagen::generate(network, &scale, opts.seed)?
            .into_iter()
            .map(|(c, mut d)| {
                // Patients only: the size is the patient relation's.
                let rows = d.rows.remove("patient").unwrap_or_default();
                (
                    c.to_string(),
                    BTreeMap::from([("patient".to_string(), rows)]),
                )
            })
            .collect();
    let dir = tempfile::tempdir()?;
    let mut options = Options::new(network);
    options.refresh.collect_timeout = Duration::from_secs(3600);
    options.refresh.distribute_timeout = Duration::from_secs(3600);
    let net =
        LocalNetwork::start_with(network.clone(), dir.path().join("global.db"), options).await?;
    let sites = start_sites(&net, dir.path(), &data).await?;
    let handles: Vec<Arc<Site>> = sites.values().map(|s| s.site.clone()).collect();
    // A first epoch sends every site its summaries whole (as the initial
    // load, part of joining the network): not what is measured.
    for _ in 0..500 {
        if handles.iter().all(|s| s.subscribed()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let admin = net.admin_client().await?;
    let mut progress = admin.run_refresh().await?;
    while progress.message().await?.is_some() {}
    for _ in 0..500 {
        if handles
            .iter()
            .all(|s| stat(s, "refresh_epochs").is_ok_and(|n| n >= 1))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Each site holds copies of the patients of the others born in a band
    // of dates of birth (a different band per site), in ten definitions.
    let mut dobs: Vec<i64> = data
        .values()
        .flat_map(|d| d["patient"].iter())
        .filter_map(|r| match r.get(5) {
            Some(Value::Int(d)) => Some(*d),
            _ => None,
        })
        .collect();
    dobs.sort_unstable();
    if dobs.is_empty() {
        bail!("no patients generated");
    }
    for (i, site) in handles.iter().enumerate() {
        let from = ((i as f64 * 0.3) * dobs.len() as f64) as usize;
        let width = ((opts.held * dobs.len() as f64) as usize / 10).max(1);
        let statements = (0..10)
            .map(|k| {
                let lo = dobs[(from + k * width).min(dobs.len() - 1)];
                let hi = dobs[(from + (k + 1) * width).min(dobs.len() - 1)];
                format!("SELECT * FROM patient WHERE dob >= {lo} AND dob < {hi}")
            })
            .collect();
        execute(site, statements).await?;
    }
    // A share of every site's own patients changes: the owner moves them.
    let mut changed = 0u64;
    for (code, site) in sites.iter().map(|(c, s)| (c, &s.site)) {
        let own: Vec<i64> = data[code]["patient"]
            .iter()
            .filter_map(|r| match r[0] {
                Value::Int(p) => Some(p),
                _ => None,
            })
            .collect();
        let step = (1.0 / opts.changed.clamp(1e-6, 1.0)).round() as usize;
        let moved: Vec<String> = own
            .iter()
            .step_by(step.max(1))
            .map(i64::to_string)
            .collect();
        changed += moved.len() as u64;
        let statements = moved
            .chunks(500)
            .map(|c| {
                format!(
                    "UPDATE patient SET add1 = 'Moved' WHERE pno IN ({})",
                    c.join(", ")
                )
            })
            .collect();
        execute(site, statements).await?;
    }
    for _ in 0..500 {
        if handles.iter().all(|s| s.subscribed()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The differential refresh.
    let before: Vec<(i64, i64)> = handles
        .iter()
        .map(|s| {
            Ok((
                stat(s, "refresh_push_bytes")?,
                stat(s, "refresh_distribute_bytes")?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut progress = admin.run_refresh().await?;
    let mut distributing = None;
    let mut summary = None;
    while let Some(p) = progress.message().await? {
        if p.phase == v1::EpochPhase::Distribute as i32 && distributing.is_none() {
            distributing = Some(Instant::now());
        }
        if p.summary.is_some() {
            summary = p.summary;
        }
    }
    let ended = Instant::now();
    let summary = summary.context("the refresh gave no summary")?;
    if !summary.absent.is_empty() {
        bail!("sites were absent from the refresh: {:?}", summary.absent);
    }
    // The last site records its acknowledgement just after the controller
    // closes the epoch.
    for _ in 0..500 {
        if handles
            .iter()
            .all(|s| stat(s, "refresh_epochs").is_ok_and(|n| n >= 2))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut push_bytes = 0;
    let mut diff_bytes = 0;
    for (s, (p0, d0)) in handles.iter().zip(&before) {
        push_bytes += (stat(s, "refresh_push_bytes")? - p0) as u64;
        diff_bytes += (stat(s, "refresh_distribute_bytes")? - d0) as u64;
    }
    let diff_time = ended - distributing.unwrap_or(ended);
    let after_diff: Vec<Vec<String>> = handles.iter().map(|s| copies(s)).collect::<Result<_>>()?;

    // The baseline: every site throws its copies away and fetches every
    // definition again, all at once.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in &handles {
        let s = s.clone();
        tasks.push(tokio::task::spawn_blocking(move || -> Result<u64> {
            let wire = s.wire_bytes();
            s.rebuild_snapshots()?;
            Ok(s.wire_bytes().saturating_sub(wire))
        }));
    }
    let mut re_bytes = 0;
    for t in tasks {
        re_bytes += t.await??;
    }
    let re_time = started.elapsed();
    let after_re: Vec<Vec<String>> = handles.iter().map(|s| copies(s)).collect::<Result<_>>()?;
    if after_diff != after_re {
        bail!(
            "the differential refresh and the re-execution left different copies at {patients} patients"
        );
    }
    net.stop().await?;
    Ok(RefreshRow {
        patients: per_site * network.sites.len(),
        copies: after_diff.iter().map(|c| c.len() as u64).sum(),
        changed,
        push_bytes,
        differential: (diff_bytes, diff_time),
        reexecute: (re_bytes, re_time),
    })
}

/// Runs `snaps bench refresh`.
pub async fn bench_refresh(opts: &RefreshBenchOptions) -> Result<RefreshBenchReport> {
    let network = crate::fixtures::load_network(&opts.network)?;
    let valid = (f64::MIN_POSITIVE..=1.0).contains(&opts.changed)
        && (f64::MIN_POSITIVE..=0.3).contains(&opts.held);
    if !valid {
        bail!("--changed must be in (0, 1] and --held in (0, 0.3]");
    }
    let mut rows = Vec::new();
    for &p in &opts.patients {
        eprintln!("{p} patients ...");
        rows.push(one_size(&network, opts, p).await?);
    }
    Ok(RefreshBenchReport {
        changed: opts.changed,
        held: opts.held,
        rows,
    })
}
