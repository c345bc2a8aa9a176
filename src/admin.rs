//! The administrator's commands against a running global controller:
//! `snaps refresh` (run one epoch now, a progress bar per phase, a summary)
//! and `snaps conflicts` (the key clashes awaiting a decision).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use snaps_local::remote::{Auth, GlobalClient};
use snaps_proto::v1;

/// How the administrator reaches the global controller.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminOptions {
    /// The global controller, `https://host:port` (`http://` with
    /// --insecure).
    #[arg(long)]
    pub global: String,
    /// The administrator's credential folder (ca.pem, cert.pem, key.pem),
    /// made by `snaps certs init` (its `admin` folder).
    #[arg(long, value_name = "DIR")]
    pub tls: Option<PathBuf>,
    /// Talk plain text with the administrator's token (development only).
    #[arg(long, requires = "global")]
    pub insecure: bool,
    /// With --insecure: a file holding the administrator's token ([admin]
    /// in global.toml); without it the token is read from
    /// $SNAPS_ADMIN_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl AdminOptions {
    /// How the administrator proves who it is.
    fn auth(&self) -> Result<Auth> {
        match (&self.tls, self.insecure) {
            (Some(_), true) => bail!("give --tls or --insecure, not both"),
            (Some(dir), false) => {
                if self.token_file.is_some() {
                    bail!(
                        "--token-file is for --insecure: with --tls the certificate is the credential"
                    );
                }
                Ok(Auth::tls_dir(dir).with_context(|| {
                    format!("the administrator's credentials in {}", dir.display())
                })?)
            }
            (None, true) => Ok(Auth::Insecure(match &self.token_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| {
                        format!("read the administrator's token from {}", f.display())
                    })?
                    .trim()
                    .to_string(),
                None => std::env::var("SNAPS_ADMIN_TOKEN").context(
                    "give --token-file, or the administrator's token in $SNAPS_ADMIN_TOKEN",
                )?,
            })),
            (None, false) => bail!(
                "give --tls DIR (the administrator's credentials from `snaps certs init`), or \
                 --insecure with --token-file for a plain-text development network"
            ),
        }
    }

    /// Connects as the administrator.
    pub async fn connect(&self) -> Result<GlobalClient> {
        GlobalClient::connect(&self.global, &self.auth()?, None)
            .await
            .with_context(|| format!("connect to {}", self.global))
    }
}

fn phase_name(p: i32) -> &'static str {
    match v1::EpochPhase::try_from(p) {
        Ok(v1::EpochPhase::Collect) => "collect",
        Ok(v1::EpochPhase::Distribute) => "distribute",
        Ok(v1::EpochPhase::Closed) => "closed",
        _ => "?",
    }
}

/// Runs one refresh epoch now and waits for it, showing a bar per phase on a
/// terminal, then prints the summary.
pub async fn refresh(opts: &AdminOptions) -> Result<v1::RefreshSummary> {
    let client = opts.connect().await?;
    let mut progress = client
        .run_refresh()
        .await
        .context("start the refresh (is the credential the administrator's?)")?;
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} sites {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bars: Vec<(i32, ProgressBar)> = Vec::new();
    let mut summary = None;
    while let Some(p) = progress.message().await.context("the refresh failed")? {
        if let Some(s) = p.summary {
            summary = Some(s);
            break;
        }
        if p.phase == v1::EpochPhase::Closed as i32 {
            continue;
        }
        if bars.last().map(|(ph, _)| *ph) != Some(p.phase) {
            if let Some((_, b)) = bars.last() {
                b.finish();
            }
            let bar = ProgressBar::with_draw_target(
                Some(u64::from(p.sites)),
                ProgressDrawTarget::stderr(),
            );
            bar.set_style(style.clone());
            bar.set_prefix(phase_name(p.phase));
            bar.set_message(format!("epoch {}", p.epoch));
            bar.enable_steady_tick(Duration::from_millis(200));
            bars.push((p.phase, bar));
        }
        if let Some((_, b)) = bars.last() {
            b.set_length(u64::from(p.sites));
            b.set_position(u64::from(p.done));
        }
    }
    for (_, b) in &bars {
        b.finish();
    }
    let Some(s) = summary else {
        bail!("the global controller ended the refresh without a summary");
    };
    Ok(s)
}

/// The summary as an administrator reads it.
pub fn summary_text(s: &v1::RefreshSummary) -> String {
    let absent = if s.absent.is_empty() {
        "none".to_string()
    } else {
        s.absent.join(", ")
    };
    format!(
        "epoch {}: sites {} (absent: {absent})\n\
         pushed {} tuples: {} inserted, {} updated, {} deleted, {} conflicts\n\
         copies: {} invalidated, {} new versions re-sent\n\
         bytes: {} received, {} sent; {:.1} s",
        s.epoch,
        s.sites.join(", "),
        s.tuples_pushed,
        s.inserted,
        s.updated,
        s.deleted,
        s.conflicts,
        s.invalidated,
        s.resent,
        s.bytes_received,
        s.bytes_sent,
        s.millis as f64 / 1000.0
    )
}

/// Prints the key conflicts awaiting an administrator, as a table or JSON.
pub async fn conflicts(opts: &AdminOptions, json: bool) -> Result<String> {
    let client = opts.connect().await?;
    let list = client
        .conflicts()
        .await
        .context("list the conflicts (is the credential the administrator's?)")?;
    let key = |c: &v1::ConflictEntry| -> Vec<String> {
        c.key
            .iter()
            .map(|v| snaps_proto::decode_value(v).to_string())
            .collect()
    };
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id,
                    "site": c.site,
                    "relation": c.relation,
                    "origin": c.origin,
                    "key": key(c),
                    "holder": c.holder_site,
                    "recorded_at": c.recorded_at,
                    "tuple": serde_json::from_str::<serde_json::Value>(&c.tuple).unwrap_or_default(),
                })
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&rows)?);
    }
    if list.is_empty() {
        return Ok("no conflicts".into());
    }
    let mut out = format!(
        "{:>4}  {:<5} {:<12} {:>10}  {:<20} {:<6}\n",
        "id", "site", "relation", "origin", "key", "holder"
    );
    for c in &list {
        out.push_str(&format!(
            "{:>4}  {:<5} {:<12} {:>10}  {:<20} {:<6}\n",
            c.id,
            c.site,
            c.relation,
            c.origin,
            key(c).join(", "),
            c.holder_site
        ));
    }
    Ok(out.trim_end().to_string())
}
