//! Candidates for identity matching: the person's record and the records
//! other sites hold that share a blocking key with it, found by equality so
//! the relation's indexes serve (and the SQL runs alike on both databases).

use snaps_schema::identity::IdentitySpec;
use snaps_schema::{SiteNo, Value, sql_ident};

use crate::db::{Cell, Row, Tx};
use crate::error::{Error, Result};
use crate::matching::{Person, blocking_keys};
use crate::store::{IdentityLink, IdentityRecord, LinkChanges, SiteId};

/// See [`crate::store::GlobalStore::identity_candidates`].
pub(super) fn candidates(
    tx: &mut dyn Tx,
    spec: &IdentitySpec,
    key: &Value,
) -> Result<Option<(IdentityRecord, Vec<IdentityRecord>)>> {
    let columns: Vec<String> = std::iter::once(spec.key.as_str())
        .chain(std::iter::once("snaps_owner"))
        .chain(spec.attributes())
        .map(sql_ident)
        .collect();
    let select = format!(
        "SELECT {} FROM {}",
        columns.join(", "),
        sql_ident(&spec.relation)
    );
    let Some(row) = tx.one(
        &format!("{select} WHERE {} = ?1", sql_ident(&spec.key)),
        &[Cell::from(key)],
    )?
    else {
        return Ok(None);
    };
    let subject = record(spec, &row)?;
    let keys = blocking_keys(&subject.person);
    let mut args: Vec<Cell> = vec![i64::from(subject.owner.0).into()];
    let mut any = Vec::new();
    let arg = |c: Cell, args: &mut Vec<Cell>| {
        args.push(c);
        format!("?{}", args.len())
    };
    // Records a user linked are candidates whatever their details.
    let linked = linked_to(tx, &subject.key)?;
    if !linked.is_empty() {
        let marks: Vec<String> = linked.iter().map(|k| arg((*k).into(), &mut args)).collect();
        any.push(format!(
            "{} IN ({})",
            sql_ident(&spec.key),
            marks.join(", ")
        ));
    }
    if !keys.dobs.is_empty() {
        let marks: Vec<String> = keys
            .dobs
            .iter()
            .map(|d| arg((*d).into(), &mut args))
            .collect();
        any.push(format!(
            "{} IN ({})",
            sql_ident(&spec.dob),
            marks.join(", ")
        ));
    }
    if let Some(s) = &keys.surname {
        any.push(format!(
            "{} = {}",
            sql_ident(&spec.surname),
            arg(s.as_str().into(), &mut args)
        ));
    }
    if let Some(f) = &keys.first_name {
        // The first given name alone, or followed by more names: a range
        // from "Mary " up to "Mary!" (the character after the space), which
        // an index on the attribute serves.
        let first = sql_ident(&spec.first_names);
        let alone = arg(f.as_str().into(), &mut args);
        let from = arg(format!("{f} ").as_str().into(), &mut args);
        let to = arg(format!("{f}!").as_str().into(), &mut args);
        any.push(format!(
            "{first} = {alone} OR ({first} >= {from} AND {first} < {to})"
        ));
    }
    if any.is_empty() {
        return Ok(Some((subject, Vec::new())));
    }
    let sql = format!(
        "{select} WHERE snaps_owner <> ?1 AND ({})",
        any.join(" OR ")
    );
    let mut found = tx
        .query(&sql, &args)?
        .iter()
        .map(|r| record(spec, r))
        .collect::<Result<Vec<_>>>()?;
    for r in &mut found {
        r.linked = matches!(r.key, Value::Int(k) if linked.contains(&k));
    }
    Ok(Some((subject, found)))
}

/// The keys of the records linked with the record keyed `key`.
fn linked_to(tx: &mut dyn Tx, key: &Value) -> Result<Vec<i64>> {
    let Value::Int(k) = key else {
        return Ok(Vec::new());
    };
    tx.query(
        "SELECT b FROM snaps_link WHERE a = ?1 AND removed = 0
         UNION SELECT a FROM snaps_link WHERE b = ?1 AND removed = 0",
        &[(*k).into()],
    )?
    .iter()
    .map(|r| r.int(0))
    .collect()
}

fn record(spec: &IdentitySpec, row: &Row) -> Result<IdentityRecord> {
    let text = |i: usize| -> Result<Option<String>> { row.opt_text(i) };
    let mut i = 2;
    let mut next = || {
        i += 1;
        i - 1
    };
    let surname = text(next())?;
    let first_names = text(next())?;
    let dob = row.opt_int(next())?;
    let sex = match &spec.sex {
        Some(_) => text(next())?,
        None => None,
    };
    let address = spec
        .address
        .iter()
        .map(|_| text(next()))
        .collect::<Result<Vec<_>>>()?;
    Ok(IdentityRecord {
        key: row.value(0)?,
        owner: SiteNo(row.int(1)? as u32),
        person: Person {
            surname,
            first_names,
            dob,
            sex,
            address,
        },
        linked: false,
    })
}

/// Links users confirmed between records of the relation of people: one
/// row per pair, `a` the lesser key, kept when removed (with `removed` set)
/// so that a site holding an older version is told. `seq` orders the
/// changes: the version a site holds is the highest it was sent.
pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS snaps_link (
    a INTEGER NOT NULL, b INTEGER NOT NULL,
    a_owner INTEGER NOT NULL, b_owner INTEGER NOT NULL,
    site INTEGER NOT NULL, user_code TEXT NOT NULL, linked_at INTEGER NOT NULL,
    seq INTEGER NOT NULL UNIQUE, removed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (a, b)) WITHOUT ROWID;
";

/// The owner of the record keyed `key`, or a clear error.
fn owner_of(tx: &mut dyn Tx, spec: &IdentitySpec, key: i64) -> Result<SiteNo> {
    let row = tx.one(
        &format!(
            "SELECT snaps_owner FROM {} WHERE {} = ?1",
            sql_ident(&spec.relation),
            sql_ident(&spec.key)
        ),
        &[key.into()],
    )?;
    match row {
        Some(r) => Ok(SiteNo(r.int(0)? as u32)),
        None => Err(Error::NotFound(format!(
            "no {} with {} = {key} in the global snapshot (a patient registered since the \
             last refresh reaches it with the next)",
            spec.relation, spec.key
        ))),
    }
}

/// See [`crate::store::GlobalStore::link`].
pub(super) fn link(
    tx: &mut dyn Tx,
    spec: &IdentitySpec,
    key: i64,
    (other, other_site): (i64, &SiteId),
    (site, user): (&SiteId, &str),
    unlink: bool,
    now: i64,
) -> Result<(IdentityLink, bool)> {
    if key == other {
        return Err(Error::InvalidArgument(format!(
            "a record is not linked with itself ({} {key})",
            spec.key
        )));
    }
    if other_site.number == site.number {
        return Err(Error::InvalidArgument(format!(
            "both records would be of site {}: a link joins a patient's records at two sites",
            site.code
        )));
    }
    let (a, b) = (key.min(other), key.max(other));
    let a_owner = owner_of(tx, spec, a)?;
    let b_owner = owner_of(tx, spec, b)?;
    let (key_owner, other_owner) = if key == a {
        (a_owner, b_owner)
    } else {
        (b_owner, a_owner)
    };
    // A site links its own patient, with a record a user has seen, site
    // and number.
    for (pno, owner, named) in [(key, key_owner, site), (other, other_owner, other_site)] {
        if owner != named.number {
            return Err(Error::InvalidArgument(format!(
                "{} {pno} is not a record of site {}: nothing was changed",
                spec.key, named.code
            )));
        }
    }
    let held = tx
        .one(
            "SELECT removed FROM snaps_link WHERE a = ?1 AND b = ?2",
            &[a.into(), b.into()],
        )?
        .map(|r| r.flag(0))
        .transpose()?;
    let standing = held == Some(false);
    let changed = standing == unlink;
    if changed {
        let seq = tx
            .one("SELECT coalesce(max(seq), 0) + 1 FROM snaps_link", &[])?
            .map(|r| r.int(0))
            .transpose()?
            .unwrap_or(1);
        tx.execute(
            "INSERT INTO snaps_link (a, b, a_owner, b_owner, site, user_code, linked_at, seq, removed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (a, b) DO UPDATE SET site = excluded.site,
                 user_code = excluded.user_code, linked_at = excluded.linked_at,
                 seq = excluded.seq, removed = excluded.removed",
            &[
                a.into(),
                b.into(),
                i64::from(a_owner.0).into(),
                i64::from(b_owner.0).into(),
                i64::from(site.number.0).into(),
                user.into(),
                now.into(),
                seq.into(),
                i64::from(unlink).into(),
            ],
        )?;
    }
    Ok((
        IdentityLink {
            key: a,
            owner: a_owner,
            other_key: b,
            other_owner: b_owner,
            removed: unlink,
        },
        changed,
    ))
}

/// See [`crate::store::GlobalStore::links_since`].
pub(super) fn since(tx: &mut dyn Tx, since: u64) -> Result<LinkChanges> {
    let version = tx
        .one("SELECT coalesce(max(seq), 0) FROM snaps_link", &[])?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or(0) as u64;
    // A version the store never gave (a store restored from before it) is
    // answered with everything.
    let whole = since == 0 || since > version;
    let sql = if whole {
        "SELECT a, a_owner, b, b_owner, removed FROM snaps_link WHERE removed = 0 ORDER BY seq"
    } else {
        "SELECT a, a_owner, b, b_owner, removed FROM snaps_link WHERE seq > ?1 ORDER BY seq"
    };
    let params: Vec<Cell> = if whole {
        Vec::new()
    } else {
        vec![(since as i64).into()]
    };
    let links = tx
        .query(sql, &params)?
        .iter()
        .map(|r| {
            Ok(IdentityLink {
                key: r.int(0)?,
                owner: SiteNo(r.int(1)? as u32),
                other_key: r.int(2)?,
                other_owner: SiteNo(r.int(3)? as u32),
                removed: r.flag(4)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LinkChanges {
        version,
        whole,
        links,
    })
}
