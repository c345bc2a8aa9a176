//! The identity functions at the site, asked of the global controller:
//! `snaps_match(<pno>)`, the records at other sites that may be the same
//! person, graded over the global snapshot (`snaps_global::matching`); and
//! `snaps_link(<pno>, '<SITE>', <other pno>)` / `snaps_unlink(...)`, a
//! user's confirmation that the site's patient and another site's record
//! are the same person (or are not); and `snaps_sync_patient(<pno>)`, the
//! patient's changes at his owner brought here now (`crate::sync`).
//!
//! `snaps_match` may stand wherever a table may in a query the site runs on
//! SQLite (`SELECT site, pno, grade, score FROM snaps_match(10000022) WHERE
//! grade = 'certain'`): the controller's answer is put into a temporary
//! table of the session's connection, the call replaced by that table, the
//! statement run, and the table dropped. `snaps_link` stands where a value
//! may (`SELECT snaps_link(10000022, 'CPH', 20000001)`): the link is made
//! first, and the call replaced by what it did (`linked`, `already
//! linked`, `unlinked`, `not linked`). Patient numbers are the global
//! snapshot's (at the radiology sites, the same as the site's own `pno`).

use rusqlite::Connection;
use snaps_proto::v1;
use snaps_schema::{Value, sql_ident};

use crate::{Error, Result};

/// One call of an identity function in a statement text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    /// Byte range of the call, the name to the closing parenthesis.
    pub(crate) span: std::ops::Range<usize>,
    /// The patient number asked about (the site's own, for a link).
    pub(crate) key: i64,
    /// Which function.
    pub(crate) what: What,
}

/// The function a call is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum What {
    /// `snaps_match`: a table of candidates.
    Match,
    /// `snaps_link` or `snaps_unlink`, with the other record.
    Link(Link),
    /// `snaps_sync_patient`: the patient's changes now.
    Sync,
}

/// The other record of a `snaps_link` or `snaps_unlink` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    /// The code of the site owning it.
    pub(crate) site: String,
    /// Its patient number.
    pub(crate) other: i64,
    /// `snaps_unlink`.
    pub(crate) unlink: bool,
}

impl Call {
    /// The function's name.
    pub(crate) fn name(&self) -> &'static str {
        match &self.what {
            What::Match => MATCH,
            What::Link(l) if l.unlink => UNLINK,
            What::Link(_) => LINK,
            What::Sync => SYNC,
        }
    }
}

const MATCH: &str = "snaps_match";
const LINK: &str = "snaps_link";
const UNLINK: &str = "snaps_unlink";
const SYNC: &str = "snaps_sync_patient";

/// The calls of the identity functions in `text`, outside string literals,
/// quoted identifiers and comments. A call whose arguments do not fit is an
/// error naming the form it takes.
pub(crate) fn calls(text: &str) -> Result<Vec<Call>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        // A doubled quote stays inside.
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            c if is_ident(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let word = &text[start..i];
                let name = [MATCH, LINK, UNLINK, SYNC]
                    .into_iter()
                    .find(|n| word.eq_ignore_ascii_case(n));
                let rest = &text[i..];
                let open = rest.len() - rest.trim_start().len();
                if let Some(name) = name
                    && rest[open..].starts_with('(')
                {
                    let (key, what, len) = arguments(name, &rest[open + 1..])?;
                    let end = i + open + 1 + len;
                    out.push(Call {
                        span: start..end,
                        key,
                        what,
                    });
                    i = end;
                }
            }
            _ => i += 1,
        }
    }
    Ok(out)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// The arguments after `name(` and the length up to and including the
/// closing parenthesis.
fn arguments(name: &str, after: &str) -> Result<(i64, What, usize)> {
    let usage = || {
        Error::Invalid(if name == MATCH {
            "snaps_match takes one patient number, as in \
             SELECT site, pno, grade, score FROM snaps_match(10000022)"
                .to_string()
        } else if name == SYNC {
            "snaps_sync_patient takes one patient number, as in \
             SELECT snaps_sync_patient(20000199)"
                .to_string()
        } else {
            format!(
                "{name} takes the site's patient number, the other site's code and its \
                 patient number there, as in SELECT {name}(10000022, 'CPH', 20000001)"
            )
        })
    };
    let close = after.find(')').ok_or_else(usage)?;
    let inner: Vec<&str> = after[..close].split(',').map(str::trim).collect();
    let number = |s: &str| s.parse::<i64>().map_err(|_| usage());
    match (name, inner.as_slice()) {
        (MATCH, [key]) => Ok((number(key)?, What::Match, close + 1)),
        (SYNC, [key]) => Ok((number(key)?, What::Sync, close + 1)),
        (LINK | UNLINK, [key, site, other]) => {
            let site = site
                .strip_prefix('\'')
                .and_then(|s| s.strip_suffix('\''))
                .filter(|s| !s.is_empty() && !s.contains('\''))
                .ok_or_else(usage)?;
            let link = Link {
                site: site.to_string(),
                other: number(other)?,
                unlink: name == UNLINK,
            };
            Ok((number(key)?, What::Link(link), close + 1))
        }
        _ => Err(usage()),
    }
}

/// What a link call did, as the statement reads it.
pub(crate) fn said(link: &Link, changed: bool) -> &'static str {
    match (link.unlink, changed) {
        (false, true) => "linked",
        (false, false) => "already linked",
        (true, true) => "unlinked",
        (true, false) => "not linked",
    }
}

/// The temporary table holding the answer of call `n` of a statement.
fn table(n: usize) -> String {
    format!("snaps_match_{n}")
}

/// Creates the (empty) tables the match calls stand for and returns `text`
/// with every match call replaced by its table and every other call by
/// what it did (`said[n]` for call `n`, as an SQL string).
pub(crate) fn prepare(
    conn: &Connection,
    text: &str,
    calls: &[Call],
    said: &[&str],
) -> Result<String> {
    let mut rewritten = String::with_capacity(text.len());
    let mut at = 0;
    for (n, c) in calls.iter().enumerate() {
        rewritten.push_str(&text[at..c.span.start]);
        if c.what != What::Match {
            let what = said.get(n).copied().unwrap_or_default();
            rewritten.push_str(&format!("'{}'", what.replace('\'', "''")));
            // A column of its own is named after the function, as
            // PostgreSQL names a function's column.
            if ends_a_column(&text[c.span.end..]) {
                rewritten.push_str(&format!(" AS {}", c.name()));
            }
        } else {
            let t = table(n);
            conn.execute_batch(&format!(
                "DROP TABLE IF EXISTS temp.{t};
                 CREATE TEMP TABLE {t} (site TEXT, pno INTEGER, grade TEXT, score REAL);"
            ))?;
            rewritten.push_str(&format!("temp.{t}"));
        }
        at = c.span.end;
    }
    rewritten.push_str(&text[at..]);
    Ok(rewritten)
}

/// Whether `rest`, the text after a call, ends the select-list item the
/// call is alone in: the item has no alias of its own.
fn ends_a_column(rest: &str) -> bool {
    let rest = rest.trim_start();
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    rest.is_empty() || rest.starts_with([',', ';']) || word.eq_ignore_ascii_case("from")
}

/// Fills call `n`'s table with the controller's answer; the key column is
/// named as the network names it.
pub(crate) fn fill(conn: &Connection, n: usize, reply: &v1::MatchReply) -> Result<()> {
    let t = table(n);
    if !reply.key_attribute.is_empty() && reply.key_attribute != "pno" {
        conn.execute_batch(&format!(
            "ALTER TABLE temp.{t} RENAME COLUMN pno TO {}",
            sql_ident(&reply.key_attribute)
        ))?;
    }
    let mut insert = conn.prepare(&format!("INSERT INTO temp.{t} VALUES (?1, ?2, ?3, ?4)"))?;
    for c in &reply.candidates {
        let key = c
            .key
            .as_ref()
            .map_or(Value::Null, snaps_proto::decode_value);
        insert.execute(rusqlite::params![
            c.site,
            crate::value::to_sqlite(&key),
            c.grade,
            c.score
        ])?;
    }
    Ok(())
}

/// Drops the tables of `calls`.
pub(crate) fn clean(conn: &Connection, calls: &[Call]) {
    for n in 0..calls.len() {
        if let Err(e) = conn.execute_batch(&format!("DROP TABLE IF EXISTS temp.{}", table(n))) {
            tracing::warn!(error = %e, "a snaps_match table was not dropped");
        }
    }
}

/// The site's error for a refused call of `name`: the controller's reason,
/// with the SQLSTATE a client can act on.
pub(crate) fn refused(e: Error, name: &str) -> Error {
    match e {
        Error::Remote(s) if s.code() == tonic::Code::NotFound => {
            Error::Invalid(s.message().to_string())
        }
        // An owner offline, or the network refreshing: the call may work
        // later.
        Error::Remote(s) if s.code() == tonic::Code::FailedPrecondition && name == SYNC => {
            Error::Busy(s.message().to_string())
        }
        Error::Remote(s) if s.code() == tonic::Code::FailedPrecondition => {
            Error::Unsupported(s.message().to_string())
        }
        Error::Remote(s) if s.code() == tonic::Code::InvalidArgument => {
            Error::Invalid(s.message().to_string())
        }
        Error::Remote(ref s) if !crate::site::is_request_error(&e) => {
            unreachable(name, s.message())
        }
        Error::Unreachable(why) => unreachable(name, &why),
        other => other,
    }
}

fn unreachable(name: &str, why: &str) -> Error {
    let does = match name {
        MATCH => "compares records",
        SYNC => "asks the patient's owner",
        _ => "keeps links",
    };
    Error::Unreachable(format!(
        "{name} {does} at the global snapshot controller, which is \
         unreachable ({why}); try again when it is back"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_found_outside_literals_and_comments() {
        let text = "SELECT * FROM snaps_match(10000022) m, SNAPS_MATCH ( 7 ) \
                    WHERE 'snaps_match(1)' <> \"snaps_match\" -- snaps_match(2)\n";
        let found = calls(text).unwrap();
        assert_eq!(
            found.iter().map(|c| c.key).collect::<Vec<_>>(),
            [10000022, 7]
        );
        assert_eq!(&text[found[0].span.clone()], "snaps_match(10000022)");
        assert_eq!(&text[found[1].span.clone()], "SNAPS_MATCH ( 7 )");
        assert!(
            calls("SELECT my_snaps_match(1), snaps_matches FROM t")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_call_without_one_number_names_the_form() {
        for bad in [
            "SELECT * FROM snaps_match()",
            "SELECT * FROM snaps_match('x')",
            "SELECT * FROM snaps_match(1, 2)",
            "SELECT * FROM snaps_match(1",
        ] {
            let e = calls(bad).unwrap_err().to_string();
            assert!(
                e.contains("snaps_match takes one patient number"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn link_calls_name_the_other_record_and_become_what_they_did() {
        let text = "SELECT snaps_link(10000022, 'CPH', 20000001), SNAPS_UNLINK(1,'GRC',2)";
        let found = calls(text).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].key, 10000022);
        assert_eq!(
            found[0].what,
            What::Link(Link {
                site: "CPH".into(),
                other: 20000001,
                unlink: false
            })
        );
        assert_eq!(found[1].name(), "snaps_unlink");
        let conn = Connection::open_in_memory().unwrap();
        let sql = prepare(&conn, text, &found, &["linked", "not linked"]).unwrap();
        assert_eq!(
            sql,
            "SELECT 'linked' AS snaps_link, 'not linked' AS snaps_unlink"
        );
        let text = "SELECT upper(snaps_link(1, 'CPH', 2)), snaps_link(1, 'CPH', 2) AS l";
        let found = calls(text).unwrap();
        let sql = prepare(&conn, text, &found, &["linked", "linked"]).unwrap();
        assert_eq!(sql, "SELECT upper('linked'), 'linked' AS l");
        for bad in [
            "SELECT snaps_link(1, 2)",
            "SELECT snaps_link(1, CPH, 2)",
            "SELECT snaps_link(1, '', 2)",
            "SELECT snaps_unlink('1', 'CPH', 2)",
            "SELECT snaps_link(1, 'CPH', 2, 3)",
        ] {
            let e = calls(bad).unwrap_err().to_string();
            assert!(e.contains("the other site's code"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_sync_call_takes_one_number_and_becomes_what_it_did() {
        let text = "SELECT snaps_sync_patient( 20000199 )";
        let found = calls(text).unwrap();
        assert_eq!((found[0].key, &found[0].what), (20000199, &What::Sync));
        let conn = Connection::open_in_memory().unwrap();
        let sql = prepare(&conn, text, &found, &["synced: it's here"]).unwrap();
        assert_eq!(sql, "SELECT 'synced: it''s here' AS snaps_sync_patient");
        for bad in [
            "SELECT snaps_sync_patient()",
            "SELECT snaps_sync_patient(1, 2)",
            "SELECT snaps_sync_patient('x')",
        ] {
            let e = calls(bad).unwrap_err().to_string();
            assert!(
                e.contains("snaps_sync_patient takes one patient number"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn calls_become_tables_the_statement_reads() {
        let conn = Connection::open_in_memory().unwrap();
        let text = "SELECT site, pno FROM snaps_match(5) WHERE grade = 'certain'";
        let found = calls(text).unwrap();
        let sql = prepare(&conn, text, &found, &[]).unwrap();
        assert_eq!(
            sql,
            "SELECT site, pno FROM temp.snaps_match_0 WHERE grade = 'certain'"
        );
        let reply = v1::MatchReply {
            owner: "CPH".into(),
            key_attribute: "pno".into(),
            candidates: vec![
                v1::MatchCandidate {
                    site: "STG".into(),
                    key: Some(snaps_proto::encode_value(&Value::Int(10000022))),
                    grade: "certain".into(),
                    score: 11.5,
                },
                v1::MatchCandidate {
                    site: "GRC".into(),
                    key: Some(snaps_proto::encode_value(&Value::Int(20000001))),
                    grade: "possible".into(),
                    score: 4.5,
                },
            ],
        };
        fill(&conn, 0, &reply).unwrap();
        let got: Vec<(String, i64)> = conn
            .prepare(&sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(got, [("STG".to_string(), 10000022)]);
        clean(&conn, &found);
        assert!(conn.prepare(&sql).is_err(), "the table is gone");
    }
}
