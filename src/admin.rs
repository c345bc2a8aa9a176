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
/// `snaps sync --site CODE --patient PNO`: brings the patient's changes
/// at his owner to site CODE now; says what moved.
pub async fn sync(opts: &AdminOptions, site: &str, patient: i64) -> Result<String> {
    let client = opts.connect().await?;
    let reply = client
        .sync_patient(patient, "", site)
        .await
        .with_context(|| format!("sync patient {patient} to {site}"))?;
    Ok(if reply.owner == site {
        format!("{site} owns patient {patient}: its record there is current")
    } else if reply.unknown {
        format!(
            "{} holds no patient {patient}: nothing changed",
            reply.owner
        )
    } else if reply.inserted + reply.updated == 0 {
        format!(
            "nothing of patient {patient} changed at {} since the last epoch or sync; {site} holds his \
             records now ({} tuples new there)",
            reply.owner, reply.brought
        )
    } else {
        format!(
            "patient {patient}: {} changed tuples from {} ({} new to the global snapshot) in \
             epoch {}; {site} holds them now ({} tuples new there)",
            reply.inserted + reply.updated,
            reply.owner,
            reply.inserted,
            reply.epoch,
            reply.brought
        )
    })
}

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

/// A right as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RightArg {
    /// No fetch, no lock.
    None,
    /// Fetch.
    Read,
    /// Fetch and lock.
    Write,
}

impl RightArg {
    fn wire(self) -> v1::Right {
        match self {
            RightArg::None => v1::Right::None,
            RightArg::Read => v1::Right::Read,
            RightArg::Write => v1::Right::Write,
        }
    }
}

fn right_name(r: i32) -> &'static str {
    match v1::Right::try_from(r) {
        Ok(v1::Right::None) => "none",
        Ok(v1::Right::Read) => "read",
        Ok(v1::Right::Write) => "write",
        _ => "?",
    }
}

/// Whom an access rule is about.
#[derive(clap::Args, Debug, Clone)]
pub struct RuleSubject {
    /// The global relation, e.g. patient.
    #[arg(long)]
    pub relation: String,
    /// The site code, e.g. GRC.
    #[arg(long)]
    pub site: String,
    /// Only this user code at the site (default: every user of the site).
    #[arg(long)]
    pub user: Option<String>,
}

impl RuleSubject {
    fn rule(&self, right: v1::Right) -> v1::AclRule {
        v1::AclRule {
            relation: self.relation.clone(),
            site: self.site.clone(),
            user: self.user.clone().unwrap_or_default(),
            right: right as i32,
        }
    }
}

/// The rules as an administrator reads them, or JSON.
pub fn acl_text(reply: &v1::AclReply, json: bool) -> String {
    if json {
        let rules: Vec<serde_json::Value> = reply
            .rules
            .iter()
            .map(|r| {
                serde_json::json!({
                    "relation": r.relation,
                    "site": r.site,
                    "user": (!r.user.is_empty()).then_some(&r.user),
                    "right": right_name(r.right),
                })
            })
            .collect();
        return serde_json::json!({
            "default": right_name(reply.default_right),
            "rules": rules,
        })
        .to_string();
    }
    let mut out = format!("{:<12} {:<6} {:<12} right\n", "relation", "site", "user");
    for r in &reply.rules {
        let user = if r.user.is_empty() { "(all)" } else { &r.user };
        out.push_str(&format!(
            "{:<12} {:<6} {:<12} {}\n",
            r.relation,
            r.site,
            user,
            right_name(r.right)
        ));
    }
    out.push_str(&format!(
        "anything else: {}",
        right_name(reply.default_right)
    ));
    out
}

/// `snaps acl grant`.
pub async fn acl_grant(
    opts: &AdminOptions,
    who: &RuleSubject,
    right: RightArg,
) -> Result<v1::AclReply> {
    let client = opts.connect().await?;
    client
        .grant(who.rule(right.wire()))
        .await
        .context("set the access rule")
}

/// `snaps acl revoke`.
pub async fn acl_revoke(opts: &AdminOptions, who: &RuleSubject) -> Result<v1::AclReply> {
    let client = opts.connect().await?;
    client
        .revoke(who.rule(v1::Right::Unspecified))
        .await
        .context("remove the access rule")
}

/// `snaps acl list`.
pub async fn acl_list(opts: &AdminOptions) -> Result<v1::AclReply> {
    let client = opts.connect().await?;
    client.list_acl().await.context("list the access rules")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix seconds.
pub fn utc_text(t: i64) -> String {
    let (y, m, d) = snaps_schema::calendar::civil(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Unix seconds of `--since`: Unix seconds, or a UTC date `YYYY-MM-DD`
/// with an optional time `THH:MM[:SS]` (or a space instead of `T`).
pub fn parse_since(text: &str) -> Result<i64> {
    let text = text.trim();
    if let Ok(n) = text.parse::<i64>() {
        return Ok(n);
    }
    let bad = || {
        anyhow::anyhow!(
            "--since {text:?}: give Unix seconds or a UTC date and time, e.g. 2026-12-01 or \
             2026-12-01T08:30"
        )
    };
    let text = text.strip_suffix('Z').unwrap_or(text);
    let (date, time) = match text.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
    let parts: Vec<&str> = date.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let (y, m, d) = (num(y)?, num(m)?, num(d)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut secs = snaps_schema::calendar::day_of(y, m, d) * 86_400;
    if let Some(t) = time {
        let hms: Vec<&str> = t.split(':').collect();
        let (h, mi, s) = match hms.as_slice() {
            [h, mi] => (num(h)?, num(mi)?, 0),
            [h, mi, s] => (num(h)?, num(mi)?, num(s)?),
            _ => return Err(bad()),
        };
        if h > 23 || mi > 59 || s > 59 {
            return Err(bad());
        }
        secs += h * 3600 + mi * 60 + s;
    }
    Ok(secs)
}

/// Which audit entries `snaps audit` shows.
#[derive(clap::Args, Debug, Clone)]
pub struct AuditOptions {
    /// Only this site's entries.
    #[arg(long)]
    pub site: Option<String>,
    /// Only fetches that returned this patient (its number).
    #[arg(long)]
    pub patient: Option<String>,
    /// Only entries at or after this time: Unix seconds or a UTC date and
    /// time (2026-12-01, 2026-12-01T08:30).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many of the newest entries.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "fhir")]
    pub json: bool,
    /// Print a FHIR R4 Bundle of AuditEvent resources, which hospital
    /// security tools read.
    #[arg(long)]
    pub fhir: bool,
    /// Check the trail's hash chain instead of listing it: every record
    /// chained so far must follow from the one before; names the first
    /// that does not (and fails).
    #[arg(long, conflicts_with_all = ["json", "fhir", "site", "patient", "since", "limit"])]
    pub verify: bool,
}

/// `snaps audit`: the trail, oldest first, as a table, JSON or FHIR; or,
/// with `--verify`, whether its hash chain holds.
pub async fn audit(opts: &AdminOptions, a: &AuditOptions) -> Result<String> {
    let since = a.since.as_deref().map(parse_since).transpose()?;
    let client = opts.connect().await?;
    if a.verify {
        let v = client
            .audit_verify()
            .await
            .context("verify the audit trail (is the credential the administrator's?)")?;
        if v.broken {
            bail!(
                "the audit trail's hash chain breaks at record {} (link {}): {}; {} records before it are intact",
                v.broken_id,
                v.broken_seq,
                v.reason,
                v.chained
            );
        }
        return Ok(format!(
            "the audit trail's hash chain holds: {} records chained, {} not chained yet",
            v.chained, v.unchained
        ));
    }
    let entries = client
        .audit(v1::AuditRequest {
            site: a.site.clone().unwrap_or_default(),
            patient: a.patient.clone().unwrap_or_default(),
            since: since.unwrap_or(0),
            limit: a.limit.unwrap_or(0),
            verify: false,
        })
        .await
        .context("read the audit trail (is the credential the administrator's?)")?;
    if a.json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id,
                    "at": e.at,
                    "time": utc_text(e.at),
                    "site": e.site,
                    "user": e.user,
                    "action": e.action,
                    "relations": e.relations,
                    "tuples": e.tuples,
                    "patients": e.patients,
                    "detail": e.detail,
                })
            })
            .collect();
        return Ok(serde_json::Value::Array(rows).to_string());
    }
    if a.fhir {
        let bundle = serde_json::json!({
            "resourceType": "Bundle",
            "type": "collection",
            "entry": entries.iter().map(|e| serde_json::json!({
                "fullUrl": format!("urn:snaps:audit:{}", e.id),
                "resource": fhir_audit_event(e),
            })).collect::<Vec<_>>(),
        });
        return Ok(bundle.to_string());
    }
    let mut out = format!(
        "{:>6} {:<19} {:<12} {:<10} {:<12} {:<24} {:>6} patients / detail\n",
        "id", "time (UTC)", "site", "user", "action", "relations", "tuples"
    );
    for e in &entries {
        let mut tail = e.patients.join(",");
        if !e.detail.is_empty() {
            if !tail.is_empty() {
                tail.push_str("  ");
            }
            tail.push_str(&e.detail);
        }
        out.push_str(&format!(
            "{:>6} {:<19} {:<12} {:<10} {:<12} {:<24} {:>6} {}\n",
            e.id,
            utc_text(e.at),
            e.site,
            e.user,
            e.action,
            e.relations.join(","),
            e.tuples,
            tail
        ));
    }
    out.push_str(&format!("{} entries", entries.len()));
    Ok(out)
}

/// One audit record as a FHIR R4 AuditEvent: the DICOM event type of what
/// was done (a fetch is an export of patient data to a site, a match a
/// query, a lock or push a change of patient records, a rule change a
/// security event), the outcome (a refusal is a minor failure), the user
/// code at its site as the agent, and each patient as an entity.
pub fn fhir_audit_event(e: &v1::AuditEntry) -> serde_json::Value {
    let (code, display, action) = match e.action.as_str() {
        a if a.starts_with("fetch") => ("110106", "Export", "R"),
        a if a.starts_with("match") => ("110112", "Query", "E"),
        a if a.starts_with("lock") => ("110110", "Patient Record", "U"),
        "push" => ("110107", "Import", "U"),
        _ => ("110113", "Security Alert", "E"),
    };
    let refused = e.action.ends_with("-denied") || e.action.ends_with("-refused");
    let who = if e.user.is_empty() {
        e.site.clone()
    } else {
        format!("{}@{}", e.user, e.site)
    };
    let time = utc_text(e.at).replace(' ', "T") + "Z";
    let mut entities: Vec<serde_json::Value> = e
        .patients
        .iter()
        .map(|p| {
            serde_json::json!({
                "what": { "identifier": { "value": p } },
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1",
                    "display": "Person"
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                    "display": "Patient"
                }
            })
        })
        .collect();
    entities.extend(e.relations.iter().map(|r| {
        serde_json::json!({
            "what": { "display": r },
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "2",
                "display": "System Object"
            }
        })
    }));
    let mut event = serde_json::json!({
        "resourceType": "AuditEvent",
        "id": e.id.to_string(),
        "type": {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": code,
            "display": display
        },
        "subtype": [{ "system": "urn:snaps:audit-action", "code": e.action }],
        "action": action,
        "recorded": time,
        "outcome": if refused { "4" } else { "0" },
        "agent": [{
            "who": { "display": who },
            "name": e.user,
            "requestor": true
        }],
        "source": { "observer": { "display": "SNAPS global snapshot controller" } },
        "entity": entities
    });
    if !e.detail.is_empty() {
        event["outcomeDesc"] = serde_json::Value::String(e.detail.clone());
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_records_read_as_fhir_audit_events() {
        let e = v1::AuditEntry {
            id: 7,
            at: 86_400,
            site: "STG".into(),
            user: "clerk".into(),
            action: "fetch-denied".into(),
            relations: vec!["patient".into()],
            tuples: 0,
            patients: vec!["1000146".into()],
            detail: "access denied".into(),
        };
        let ev = fhir_audit_event(&e);
        assert_eq!(ev["resourceType"], "AuditEvent");
        assert_eq!(ev["type"]["code"], "110106");
        assert_eq!(ev["recorded"], "1970-01-02T00:00:00Z");
        assert_eq!(ev["outcome"], "4", "a refusal is a minor failure");
        assert_eq!(ev["agent"][0]["who"]["display"], "clerk@STG");
        assert_eq!(ev["entity"][0]["what"]["identifier"]["value"], "1000146");
        assert_eq!(ev["entity"][1]["what"]["display"], "patient");
        assert_eq!(ev["outcomeDesc"], "access denied");
    }

    #[test]
    fn times_read_and_print_in_utc() {
        assert_eq!(parse_since("0").unwrap(), 0);
        assert_eq!(parse_since("1970-01-02").unwrap(), 86_400);
        let t = parse_since("2026-12-01T08:30").unwrap();
        assert_eq!(utc_text(t), "2026-12-01 08:30:00");
        assert_eq!(
            parse_since("2024-02-29 23:59:59Z").unwrap() + 1,
            parse_since("2024-03-01").unwrap()
        );
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("2026-13-01").is_err());
        assert!(parse_since("2026-12-01T25:00").is_err());
    }
}
