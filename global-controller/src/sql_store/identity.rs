//! Candidates for identity matching: the person's record and the records
//! other sites hold that share a blocking key with it, found by equality so
//! the relation's indexes serve (and the SQL runs alike on both databases).

use snaps_schema::identity::IdentitySpec;
use snaps_schema::{SiteNo, Value, sql_ident};

use crate::db::{Cell, Row, Tx};
use crate::error::Result;
use crate::matching::{Person, blocking_keys};
use crate::store::IdentityRecord;

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
    let found = tx
        .query(&sql, &args)?
        .iter()
        .map(|r| record(spec, r))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((subject, found)))
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
    })
}
