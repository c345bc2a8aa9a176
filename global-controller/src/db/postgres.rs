//! The store's database on a PostgreSQL server, through `tokio-postgres`
//! connections pooled by `deadpool-postgres`.
//!
//! The store's calls are synchronous (the controller runs them on blocking
//! threads), so the pool's connections are driven by a small runtime of the
//! store's own, and each call waits for its statements' replies. Every
//! transaction runs at SERIALIZABLE: the store's logic reads and then
//! writes (a lock is granted after reading the holder), and only
//! serializable isolation makes that safe with several controllers on one
//! store. A transaction PostgreSQL refuses for a conflict (SQLSTATE 40001,
//! 40P01) is run again whole, a bounded number of times — which is also
//! what Postgres-compatible distributed databases ask of their clients.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{IsolationLevel, NoTls};

use super::{Cell, Db, Dialect, Row, Tx};
use crate::error::{Error, Result};

/// How many times a transaction refused for a conflict is run again.
const RETRIES: u32 = 12;

/// A PostgreSQL database.
pub struct PgDb {
    pool: Pool,
    /// Drives the connections; shut down without waiting when the store
    /// goes (dropping a runtime inside another one's task would panic).
    rt: Option<tokio::runtime::Runtime>,
    /// The server, for messages (no password).
    server: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Whether an error is PostgreSQL refusing a transaction for a conflict
/// with a concurrent one: the transaction may be run again.
pub fn is_conflict(e: &Error) -> bool {
    match e {
        Error::Postgres(e) => matches!(
            e.code(),
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        ),
        _ => false,
    }
}

/// Whether an error is a unique key violated, as two controllers creating
/// the same table at once meet.
pub fn is_unique_violation(e: &Error) -> bool {
    matches!(e, Error::Postgres(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION))
}

impl PgDb {
    /// Connects to the server named by `url` (`postgresql://user@host:port/db`),
    /// checking that it answers.
    pub fn connect(url: &str) -> Result<PgDb> {
        PgDb::connect_with(url, None)
    }

    /// As [`PgDb::connect`]; with `ca` (a PEM file), over TLS as the URL's
    /// `sslmode` says (`require`: only over TLS), trusting only the
    /// certificates `ca` holds and checking the server's name.
    pub fn connect_with(url: &str, ca: Option<&std::path::Path>) -> Result<PgDb> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::Config(format!(
                "store = {:?} is not a PostgreSQL URL: {e}",
                redact(url)
            ))
        })?;
        // A plan for the parameters given: a generic plan, made once for a
        // statement when its tables were small, would scan them whole
        // once they are large.
        config.options("-c plan_cache_mode=force_custom_plan");
        let server = describe(&config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snaps-pg")
            .enable_all()
            .build()?;
        let recycling = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match ca {
            Some(ca) => {
                let tls = snaps_proto::tls::Credentials::trusting(ca).map_err(|e| {
                    Error::Config(format!("store_ca = {:?}: {e}", ca.display().to_string()))
                })?;
                Manager::from_config(
                    config,
                    tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone()),
                    recycling,
                )
            }
            None if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require => {
                return Err(Error::Config(format!(
                    "store {}: sslmode=require needs store_ca in global.toml, the CA \
                     certificate (PEM) that signed the database server's certificate",
                    redact(url)
                )));
            }
            None => Manager::from_config(config, NoTls, recycling),
        };
        let pool = {
            let _in = rt.enter();
            Pool::builder(manager)
                .max_size(16)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(30)))
                .create_timeout(Some(Duration::from_secs(10)))
                .build()
                .map_err(|e| Error::Config(format!("PostgreSQL store at {server}: {e}")))?
        };
        let db = PgDb {
            pool,
            rt: Some(rt),
            server,
        };
        db.block(async { db.pool.get().await.map(drop) })
            .map_err(|e| db.unreachable(&e))?;
        Ok(db)
    }

    fn unreachable(&self, e: &deadpool_postgres::PoolError) -> Error {
        let mut why = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            why = format!("{why}: {c}");
            cause = c.source();
        }
        Error::Unavailable(format!(
            "the PostgreSQL store at {} cannot be reached: {why}",
            self.server
        ))
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the store");
        let _in = rt.enter();
        // Unconstrained: called on a thread running a tokio task (a test,
        // say), the task's cooperative budget would run out and every
        // poll here would yield at once, for ever.
        futures::executor::block_on(tokio::task::unconstrained(f))
    }

    fn attempt<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let mut client = self
            .block(self.pool.get())
            .map_err(|e| self.unreachable(&e))?;
        let tx = self.block(
            client
                .build_transaction()
                .isolation_level(IsolationLevel::Serializable)
                .start(),
        )?;
        let out = f(&mut PgTx { db: self, tx: &tx })?;
        self.block(tx.commit())?;
        Ok(out)
    }
}

impl Db for PgDb {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn transaction<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            match self.attempt(f) {
                Err(e) if is_conflict(&e) && attempt < RETRIES => {
                    attempt += 1;
                    // Spread the retries so the conflicting transactions do
                    // not meet again at once: a random wait under a bound
                    // that doubles (to 128 ms). The randomness is per call:
                    // threads of one controller are the usual rivals, so a
                    // per-process jitter would keep them in step.
                    let bound = 2u64 << attempt.min(6);
                    let random = std::hash::BuildHasher::hash_one(
                        &std::collections::hash_map::RandomState::new(),
                        attempt,
                    );
                    std::thread::sleep(Duration::from_millis(bound / 2 + random % bound));
                    tracing::debug!(attempt, error = %e, "store transaction run again after a conflict");
                }
                Err(e) if is_conflict(&e) => {
                    return Err(Error::Unavailable(format!(
                        "the PostgreSQL store refused a transaction {} times for conflicts with others: {e}",
                        RETRIES + 1
                    )));
                }
                other => return other,
            }
        }
    }
}

struct PgTx<'a> {
    db: &'a PgDb,
    tx: &'a deadpool_postgres::Transaction<'a>,
}

impl PgTx<'_> {
    async fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        let sql = numbered(sql);
        // Temporary tables change shape from request to request: a cached
        // plan of them would go stale.
        if sql.contains("snaps_sj_") {
            Ok(self.tx.prepare(&sql).await?)
        } else {
            Ok(self.tx.prepare_cached(&sql).await?)
        }
    }
}

fn refs(params: &[Cell]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|c| c as &(dyn ToSql + Sync)).collect()
}

impl Tx for PgTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn query(&mut self, sql: &str, params: &[Cell]) -> Result<Vec<Row>> {
        self.db.block(async {
            let stmt = self.statement(sql).await?;
            let rows = self.tx.query(&stmt, &refs(params)).await?;
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.try_get::<_, Cell>(i).map_err(Error::from))
                        .collect::<Result<Vec<_>>>()
                        .map(Row)
                })
                .collect()
        })
    }

    fn execute(&mut self, sql: &str, params: &[Cell]) -> Result<u64> {
        self.db.block(async {
            let stmt = self.statement(sql).await?;
            Ok(self.tx.execute(&stmt, &refs(params)).await?)
        })
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.db.block(self.tx.batch_execute(sql))?)
    }
}

/// `?N` parameters as PostgreSQL's `$N` (outside quoted text).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '?') if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('$');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The server a configuration names, for messages.
fn describe(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        c.get_user().unwrap_or("?"),
        c.get_dbname().unwrap_or("?")
    )
}

/// A URL with its password, if any, left out.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl ToSql for Cell {
    // The store's SQL leaves parameter types to the server; a value is
    // encoded as the type the server inferred where it converts exactly.
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let mismatch = || -> Box<dyn StdError + Sync + Send> {
            format!("{self:?} cannot be given as a value of type {ty}").into()
        };
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i).map_err(|_| mismatch())?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i).map_err(|_| mismatch())?.to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::FLOAT4 => (*i as f32).to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    i.to_string().to_sql(&Type::TEXT, out)
                }
                _ => Err(mismatch()),
            },
            Cell::Float(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                Type::INT8 if f.fract() == 0.0 => (*f as i64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    f.to_string().to_sql(&Type::TEXT, out)
                }
                _ => Err(mismatch()),
            },
            Cell::Text(s) => match *ty {
                Type::INT8 => s
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| mismatch())?
                    .to_sql(ty, out),
                Type::INT4 => s
                    .trim()
                    .parse::<i32>()
                    .map_err(|_| mismatch())?
                    .to_sql(ty, out),
                Type::FLOAT8 => s
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| mismatch())?
                    .to_sql(ty, out),
                Type::BYTEA => s.as_bytes().to_sql(ty, out),
                _ => s.as_str().to_sql(&Type::TEXT, out),
            },
            Cell::Bytes(b) => match *ty {
                Type::BYTEA => b.as_slice().to_sql(ty, out),
                _ => Err(mismatch()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Cell {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Cell, Box<dyn StdError + Sync + Send>> {
        Ok(match *ty {
            Type::INT8 => Cell::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Cell::Int(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT2 => Cell::Int(i64::from(i16::from_sql(ty, raw)?)),
            Type::OID => Cell::Int(i64::from(u32::from_sql(ty, raw)?)),
            Type::BOOL => Cell::Int(i64::from(bool::from_sql(ty, raw)?)),
            Type::FLOAT8 => Cell::Float(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Cell::Float(f64::from(f32::from_sql(ty, raw)?)),
            Type::BYTEA => Cell::Bytes(raw.to_vec()),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                Cell::Text(String::from_sql(&Type::TEXT, raw)?)
            }
            _ => return Err(format!("the store reads no values of type {ty}").into()),
        })
    }

    fn from_sql_null(_: &Type) -> std::result::Result<Cell, Box<dyn StdError + Sync + Send>> {
        Ok(Cell::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_outside_quotes() {
        assert_eq!(
            numbered("SELECT ?1, '?2', \"a?3\" FROM t WHERE x = ?12 AND y = ?"),
            "SELECT $1, '?2', \"a?3\" FROM t WHERE x = $12 AND y = ?"
        );
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgresql://snaps:secret@db.example:5432/snaps"),
            "postgresql://snaps:***@db.example:5432/snaps"
        );
        assert_eq!(redact("postgresql://snaps@h/db"), "postgresql://snaps@h/db");
    }
}
