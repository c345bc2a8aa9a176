//! The SQLite store's summaries (`snaps_schema::summary`): computed from the
//! global snapshot when a site asks for an epoch's changes, compared with
//! what the site was last sent, and only the difference sent.
//!
//! Tables (created with the store):
//! * `snaps_summary_site` — per site, the version of the summaries it was
//!   last sent and what they were (the specs and ranges, as JSON);
//! * `snaps_summary_item` — the items of each summary as last sent.
//!
//! A site names the version it holds. If that is not the version recorded
//! (a reply it never received, a database restored from a backup) or the
//! summaries declared changed, it is sent everything again: a site never
//! holds a summary the controller cannot account for.

use std::collections::BTreeSet;

use snaps_schema::summary::{SummaryKind, SummarySpec, fingerprint, normalise};
use snaps_schema::{Catalog, KeyRange, sql_ident};

use crate::db::Tx;
use crate::error::{Error, Result};
use crate::store::{SiteId, SummaryDelta, SummaryRequest};

pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS snaps_summary_site (
    site INTEGER PRIMARY KEY, version INTEGER NOT NULL, specs TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snaps_summary_item (
    site INTEGER NOT NULL, summary TEXT NOT NULL, item INTEGER NOT NULL,
    PRIMARY KEY (site, summary, item)) WITHOUT ROWID;
";

/// The summaries for a site now.
pub(super) struct Sent {
    pub version: u64,
    pub whole: bool,
    pub deltas: Vec<SummaryDelta>,
}

/// Brings the recorded summaries of `site` up to date with the global
/// snapshot in `conn` and returns what the site must be told, given the
/// version it holds. One transaction: the record and the reply agree.
pub(super) fn update(
    tx: &mut dyn Tx,
    catalog: &Catalog,
    site: &SiteId,
    req: &SummaryRequest,
) -> Result<Sent> {
    let me = i64::from(site.number.0);
    let stored: Option<(i64, String)> = match tx.one(
        "SELECT version, specs FROM snaps_summary_site WHERE site = ?1",
        &[me.into()],
    )? {
        Some(r) => Some((r.int(0)?, r.text(1)?)),
        None => None,
    };
    let specs_json = serde_json::to_string(
        &req.specs
            .iter()
            .map(|(s, r)| (s, r.map(|r| (r.first, r.last))))
            .collect::<Vec<_>>(),
    )
    .map_err(|e| Error::Internal(format!("summary specs: {e}")))?;
    if req.specs.is_empty() && stored.is_none() {
        return Ok(Sent {
            version: 0,
            whole: false,
            deltas: Vec::new(),
        });
    }
    let (stored_version, stored_specs) = stored.unwrap_or((0, String::new()));
    let whole =
        req.version == 0 || req.version != stored_version as u64 || stored_specs != specs_json;
    if whole {
        tx.execute(
            "DELETE FROM snaps_summary_item WHERE site = ?1",
            &[me.into()],
        )?;
    }
    let mut deltas = Vec::new();
    for (spec, range) in &req.specs {
        let name = spec.name();
        let now = items(tx, catalog, me, spec, *range)?;
        let before: BTreeSet<u64> = if whole {
            BTreeSet::new()
        } else {
            tx.query(
                "SELECT item FROM snaps_summary_item WHERE site = ?1 AND summary = ?2",
                &[me.into(), (&name).into()],
            )?
            .iter()
            .map(|r| Ok(r.int(0)? as u64))
            .collect::<Result<_>>()?
        };
        let added: Vec<u64> = now.difference(&before).copied().collect();
        let removed: Vec<u64> = before.difference(&now).copied().collect();
        for i in &added {
            tx.execute(
                "INSERT INTO snaps_summary_item (site, summary, item) VALUES (?1, ?2, ?3)",
                &[me.into(), (&name).into(), (*i).into()],
            )?;
        }
        for i in &removed {
            tx.execute(
                "DELETE FROM snaps_summary_item WHERE site = ?1 AND summary = ?2 AND item = ?3",
                &[me.into(), (&name).into(), (*i).into()],
            )?;
        }
        if whole || !added.is_empty() || !removed.is_empty() {
            deltas.push(SummaryDelta {
                spec: spec.clone(),
                range: *range,
                added,
                removed,
            });
        }
    }
    if !whole && deltas.is_empty() {
        // Nothing changed: the site keeps its version.
        return Ok(Sent {
            version: stored_version as u64,
            whole: false,
            deltas,
        });
    }
    let version = stored_version as u64 + 1;
    tx.execute(
        "INSERT INTO snaps_summary_site (site, version, specs) VALUES (?1, ?2, ?3)
         ON CONFLICT (site) DO UPDATE SET version = excluded.version, specs = excluded.specs",
        &[me.into(), version.into(), specs_json.into()],
    )?;
    Ok(Sent {
        version,
        whole,
        deltas,
    })
}

/// The items of one summary for site `me` in the global snapshot now.
fn items(
    tx: &mut dyn Tx,
    catalog: &Catalog,
    me: i64,
    spec: &SummarySpec,
    range: Option<KeyRange>,
) -> Result<BTreeSet<u64>> {
    let rel = catalog.relation(&spec.relation).ok_or_else(|| {
        Error::Internal(format!(
            "summary of {}, not a global relation",
            spec.relation
        ))
    })?;
    let cols: Vec<String> = spec.attributes.iter().map(|a| sql_ident(a)).collect();
    let mut out = BTreeSet::new();
    match spec.kind {
        SummaryKind::Keys => {
            let range = range.ok_or_else(|| {
                Error::Internal(format!("key summary {} without a range", spec.name()))
            })?;
            let sql = format!(
                "SELECT DISTINCT {c} FROM {r} WHERE snaps_owner <> ?1 AND {c} BETWEEN ?2 AND ?3",
                c = cols[0],
                r = sql_ident(&spec.relation)
            );
            for r in tx.query(&sql, &[me.into(), range.first.into(), range.last.into()])? {
                if let Ok(v) = r.int(0) {
                    out.insert((v - range.first) as u64);
                }
            }
        }
        SummaryKind::Lookup => {
            let types: Vec<_> = spec
                .attributes
                .iter()
                .map(|a| {
                    rel.attribute(a).map(|a| a.ty).ok_or_else(|| {
                        Error::Internal(format!("summary of {}.{a}, not an attribute", rel.name))
                    })
                })
                .collect::<Result<_>>()?;
            let sql = format!(
                "SELECT {} FROM {} WHERE snaps_owner <> ?1",
                cols.join(", "),
                sql_ident(&spec.relation)
            );
            'row: for r in tx.query(&sql, &[me.into()])? {
                let mut values = Vec::with_capacity(types.len());
                for (i, ty) in types.iter().enumerate() {
                    // A NULL equals nothing: such a tuple answers no lookup.
                    let Some(v) = normalise(*ty, &r.value(i)?) else {
                        continue 'row;
                    };
                    values.push(v);
                }
                out.insert(u64::from(fingerprint(&values)));
            }
        }
    }
    Ok(out)
}
