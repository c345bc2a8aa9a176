//! `snaps bench global`: the global snapshot controller on loopback.
//!
//! Every figure comes with a baseline measured in the same run, so the
//! ratios mean something on any machine:
//! * point fetches per second, against the same point lookup done directly
//!   on the global store's SQLite file (what the network and the protocol
//!   cost on top of the store);
//! * bytes on the wire per fetched tuple, against the raw size of the
//!   tuple's values (declared widths: i2 = 2, i4 = 4, f4 = 4 bytes, text its
//!   length) and against the same tuples as JSON text rows (what a text
//!   protocol would carry);
//! * lock requests per second, against point fetches.
//!
//! `snaps bench site`: a site through its SQL endpoint — a covered query
//! against the same query straight on the site's SQLite file, and the bytes
//! a first lookup of another site's patient costs against the raw size of
//! the tuple it brings.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snaps_local::remote::GlobalClient;
use snaps_mapping::{Statement, rewrite};
use snaps_proto::{decode_rows, fetch_request, v1};
use snaps_schema::{Catalog, NetworkConfig, Value, ValueType, datagen};

use crate::localnet::{LocalNetwork, load_site};

/// Options of `snaps bench global`.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalBenchOptions {
    /// The network folder (holding network.toml).
    #[arg(long, default_value = "fixtures/radiology")]
    pub network: PathBuf,
    /// Patients per site in the generated data.
    #[arg(long, default_value_t = 2000)]
    pub patients: usize,
    /// Point fetches to time (each of a tuple the site does not hold).
    #[arg(long, default_value_t = 1000)]
    pub fetches: usize,
    /// Lock requests to time.
    #[arg(long, default_value_t = 1000)]
    pub locks: usize,
    /// Concurrent clients for the concurrent point fetches.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1988)]
    pub seed: u64,
    /// Compare the global stores instead: the SQLite store beside the
    /// PostgreSQL one at this URL (an empty database), or on a throwaway
    /// server with `auto` — fetches and locks per second with one and two
    /// controllers, and fetch latency.
    #[arg(long, value_name = "URL|auto")]
    pub store: Option<String>,
}

/// One measured rate.
#[derive(Debug, Clone)]
pub struct Rate {
    /// What was done.
    pub what: String,
    /// How many times.
    pub count: usize,
    /// How long it took.
    pub elapsed: Duration,
}

impl Rate {
    /// Operations per second.
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A table of rates, each against the first (the baseline).
fn write_rates(f: &mut fmt::Formatter<'_>, rates: &[Rate]) -> fmt::Result {
    writeln!(
        f,
        "{:<58} {:>8} {:>12} {:>10}",
        "operation", "count", "per second", "vs first"
    )?;
    let base = rates.first().map_or(1.0, Rate::per_second);
    for r in rates {
        writeln!(
            f,
            "{:<58} {:>8} {:>12.0} {:>9.3}x",
            r.what,
            r.count,
            r.per_second(),
            r.per_second() / base
        )?;
    }
    Ok(())
}

/// Bytes of one kind of fetch.
#[derive(Debug, Clone)]
pub struct Bytes {
    /// What was fetched.
    pub what: String,
    /// Tuples fetched.
    pub tuples: u64,
    /// Bytes on the wire, both directions.
    pub wire: u64,
    /// Raw size of the tuples' values.
    pub raw: u64,
    /// The same tuples as JSON text rows.
    pub json: u64,
}

/// The figures of one run.
#[derive(Debug, Clone)]
pub struct GlobalBenchReport {
    /// Patients per site.
    pub patients: usize,
    /// Tuples in the global snapshot after the load.
    pub tuples: u64,
    /// The initial load of every site.
    pub load: Rate,
    /// Rates; the first is the baseline the others are compared with.
    pub rates: Vec<Rate>,
    /// Bytes.
    pub bytes: Vec<Bytes>,
    /// One more point fetch on a warm uncompressed connection, taken
    /// apart by layer.
    pub point_fetch: crate::h2_layers::Exchange,
    /// The same fetch on the warm compressed connection: bytes sent and
    /// received.
    pub compressed_fetch: (u64, u64),
}

impl fmt::Display for GlobalBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "global controller on loopback: {} patients per site, {} tuples in the global snapshot",
            self.patients, self.tuples
        )?;
        writeln!(
            f,
            "{}: {} in {:.2} s, {:.0} tuples per second",
            self.load.what,
            self.load.count,
            self.load.elapsed.as_secs_f64(),
            self.load.per_second()
        )?;
        writeln!(f)?;
        write_rates(f, &self.rates)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<34} {:>7} {:>11} {:>10} {:>11} {:>9} {:>9}",
            "fetch", "tuples", "wire B/tup", "raw B/tup", "JSON B/tup", "wire/raw", "wire/JSON"
        )?;
        for b in &self.bytes {
            let t = b.tuples.max(1) as f64;
            writeln!(
                f,
                "{:<34} {:>7} {:>11.1} {:>10.1} {:>11.1} {:>9.2} {:>9.2}",
                b.what,
                b.tuples,
                b.wire as f64 / t,
                b.raw as f64 / t,
                b.json as f64 / t,
                b.wire as f64 / b.raw.max(1) as f64,
                b.wire as f64 / b.json.max(1) as f64
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "one point fetch on a warm uncompressed connection, by layer (plain HTTP/2; TLS adds 22 B a record):"
        )?;
        write!(f, "{}", self.point_fetch)?;
        let (sent, received) = self.compressed_fetch;
        writeln!(
            f,
            "the same fetch on the warm compressed connection (one deflate stream): {sent} B sent, \
             {received} B received, {} B in all ({:.2}x of uncompressed)",
            sent + received,
            (sent + received) as f64
                / (self.point_fetch.sent.total() + self.point_fetch.received.total()).max(1) as f64
        )
    }
}

/// Raw size of a value of a declared type.
fn raw_size(ty: ValueType, v: &Value) -> u64 {
    match (ty, v) {
        (_, Value::Null) => 0,
        (ValueType::Int2, _) => 2,
        (ValueType::Int4 | ValueType::Float4, _) => 4,
        (ValueType::Char(_), Value::Text(s)) => s.len() as u64,
        (ValueType::Char(_), other) => other.to_string().len() as u64,
    }
}

/// Raw and JSON sizes of the tuples in a reply.
fn reply_sizes(
    reply: &v1::FetchReply,
    query: &v1::FetchRequest,
    global: &Catalog,
) -> Result<(u64, u64, u64)> {
    let (mut tuples, mut raw, mut json) = (0, 0, 0);
    for t in &reply.tables {
        let shape = query.groups[t.group as usize].tables[t.table as usize]
            .shape
            .as_ref()
            .context("shape")?;
        tuples += u64::from(t.count);
        for (part, p) in t.parts.iter().zip(&shape.parts) {
            let rel = global.relation(&p.relation).context("relation")?;
            let rows = decode_rows(p.columns.len(), part.values.as_ref().context("values")?)?;
            for row in &rows {
                let mut obj = serde_json::Map::new();
                for (c, v) in p.columns.iter().zip(row) {
                    let ty = rel.attribute(c).context("attribute")?.ty;
                    raw += raw_size(ty, v);
                    obj.insert(c.clone(), serde_json::to_value(v)?);
                }
                json += serde_json::to_string(&obj)?.len() as u64;
            }
        }
    }
    Ok((tuples, raw, json))
}

pub(crate) fn plan_request(
    network: &NetworkConfig,
    code: &str,
    sql: &str,
) -> Result<v1::FetchRequest> {
    let site = network.site(code)?;
    let local = network.local_catalog(site)?;
    let mapping = crate::localnet::site_mapping(network, code)?;
    let (_, stmts) = snaps_mapping::parse(sql)?;
    let Some(Statement::Select(s)) = stmts.first() else {
        bail!("not a retrieval: {sql}");
    };
    let plan = rewrite::plan(s, &local, &mapping)?;
    Ok(fetch_request(
        plan.query.as_ref().context("nothing mapped")?,
    ))
}

/// A request as a site sends it: attributes by position
/// ([`snaps_proto::compact_shapes`]).
pub(crate) fn as_sent(req: &v1::FetchRequest, global: &Catalog) -> v1::FetchRequest {
    let mut req = req.clone();
    snaps_proto::compact_shapes(&mut req, global);
    req
}

/// Runs the benchmark.
pub async fn bench_global(opts: &GlobalBenchOptions) -> Result<GlobalBenchReport> {
    let network = crate::fixtures::load_network(&opts.network)?;
    let global = network.global_catalog()?;
    for code in ["CPH", "STG", "GRC"] {
        network.site(code).with_context(
            || "the global benchmark runs on the radiology network (sites CPH, STG, GRC)",
        )?;
    }
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("global.db");
    let mut indexes = BTreeMap::new();
    indexes.insert("patient".to_string(), vec![vec!["surname".to_string()]]);
    indexes.insert(
        "visit".to_string(),
        vec![vec!["pno".to_string()], vec!["date".to_string()]],
    );
    let net = LocalNetwork::start(network.clone(), store.clone(), indexes).await?;
    let data = datagen::generate(&network, &datagen::Scale::new(opts.patients), opts.seed)?;
    let mut rates = Vec::new();
    let mut bytes = Vec::new();

    // Initial load of every site.
    let started = Instant::now();
    let mut tuples = 0;
    for (code, d) in &data {
        let c = net.client(code.as_str()).await?;
        let r = load_site(&c, &net.mapping(code.as_str())?, &d.rows, 5000).await?;
        tuples += r.loaded;
    }
    let load = Rate {
        what: "initial load of 3 sites".into(),
        count: tuples as usize,
        elapsed: started.elapsed(),
    };

    // CPH patient numbers, for point fetches from STG and GRC.
    let cph = data
        .iter()
        .find(|(c, _)| c.as_str() == "CPH")
        .map(|(_, d)| d)
        .context("no CPH data")?;
    let pnos: Vec<i64> = cph.rows["patient"]
        .iter()
        .filter_map(|r| match r.first() {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        })
        .collect();
    let n = opts.fetches.min(pnos.len() / 2);
    if n == 0 {
        bail!("too few patients for point fetches: raise --patients");
    }

    // Baseline: the same point lookup straight on the store file.
    let direct =
        rusqlite::Connection::open_with_flags(&store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let started = Instant::now();
    let mut found = 0;
    for pno in &pnos[..n] {
        let mut stmt = direct.prepare_cached("SELECT * FROM patient WHERE pno = ?1")?;
        let mut rows = stmt.query([pno])?;
        while rows.next()?.is_some() {
            found += 1;
        }
    }
    if found != n {
        bail!("direct lookups found {found} of {n} patients");
    }
    rates.push(Rate {
        what: "baseline: point lookup on the store's SQLite file".into(),
        count: n,
        elapsed: started.elapsed(),
    });

    // Point fetches of tuples the site does not hold yet, one at a time.
    let stg = net.client("STG").await?;
    let requests: Vec<v1::FetchRequest> = pnos[..n]
        .iter()
        .map(|p| {
            plan_request(
                &network,
                "STG",
                &format!("SELECT * FROM patient WHERE pno = {p}"),
            )
        })
        .collect::<Result<_>>()?;
    let (sent0, recv0) = (stg.counters().sent(), stg.counters().received());
    let started = Instant::now();
    let mut replies = Vec::with_capacity(n);
    for r in &requests {
        replies.push(stg.fetch(as_sent(r, &global)).await?);
    }
    let elapsed = started.elapsed();
    let wire = stg.counters().sent() - sent0 + stg.counters().received() - recv0;
    let (mut t, mut raw, mut json) = (0, 0, 0);
    for (reply, req) in replies.iter().zip(&requests) {
        let (a, b, c) = reply_sizes(reply, req, &global)?;
        t += a;
        raw += b;
        json += c;
    }
    if t != n as u64 {
        bail!("{n} point fetches returned {t} tuples");
    }
    rates.push(Rate {
        what: "point fetch over gRPC, new tuple, 1 client".into(),
        count: n,
        elapsed,
    });
    bytes.push(Bytes {
        what: "point fetch (one patient)".into(),
        tuples: t,
        wire,
        raw,
        json,
    });

    // One more, taken apart by layer.
    let extra = pnos
        .get(2 * n)
        .or(pnos.last())
        .context("no patient for the layered fetch")?;
    let layered = plan_request(
        &network,
        "STG",
        &format!("SELECT * FROM patient WHERE pno = {extra}"),
    )?;
    // HTTP/2's frames can be taken apart only where they cross the socket
    // as they are: on an uncompressed connection, warmed by one fetch.
    let plain = net.client_with("STG", false).await?;
    plain.fetch(as_sent(&requests[0], &global)).await?;
    plain.counters().start_capture();
    plain.fetch(as_sent(&layered, &global)).await?;
    let captured = plain.counters().take_capture();
    let point_fetch = crate::h2_layers::Exchange {
        sent: crate::h2_layers::Layers::of(&captured.sent),
        received: crate::h2_layers::Layers::of(&captured.received),
    };
    // Both connections are STG's, which now holds the layered patient:
    // the compressed connection asks for a patient new to the site.
    let again = pnos
        .get(2 * n + 1)
        .or(pnos.first())
        .context("no patient for the compressed fetch")?;
    let again = plan_request(
        &network,
        "STG",
        &format!("SELECT * FROM patient WHERE pno = {again}"),
    )?;
    let (s0, r0) = (stg.counters().sent(), stg.counters().received());
    stg.fetch(as_sent(&again, &global)).await?;
    let compressed_fetch = (stg.counters().sent() - s0, stg.counters().received() - r0);

    // The same fetches again: the site holds them, nothing comes back.
    let started = Instant::now();
    for r in &requests {
        let reply = stg.fetch(as_sent(r, &global)).await?;
        if !reply.tables.is_empty() {
            bail!("a repeated fetch returned tuples");
        }
    }
    rates.push(Rate {
        what: "point fetch over gRPC, already held, 1 client".into(),
        count: n,
        elapsed: started.elapsed(),
    });

    // Concurrent point fetches from GRC of the other half.
    let clients = opts.clients.max(1);
    let mut handles = Vec::new();
    let grc_requests: Vec<v1::FetchRequest> = pnos[n..2 * n]
        .iter()
        .map(|p| {
            plan_request(
                &network,
                "GRC",
                &format!("SELECT * FROM patient WHERE pno = {p}"),
            )
        })
        .collect::<Result<_>>()?;
    let mut conns: Vec<GlobalClient> = Vec::new();
    for _ in 0..clients {
        conns.push(net.client("GRC").await?);
    }
    let started = Instant::now();
    for (i, c) in conns.into_iter().enumerate() {
        let mine: Vec<v1::FetchRequest> = grc_requests
            .iter()
            .skip(i)
            .step_by(clients)
            .map(|r| as_sent(r, &global))
            .collect();
        handles.push(tokio::spawn(async move {
            let mut got = 0u64;
            for r in mine {
                got += c
                    .fetch(r)
                    .await?
                    .tables
                    .iter()
                    .map(|t| u64::from(t.count))
                    .sum::<u64>();
            }
            Ok::<_, anyhow::Error>(got)
        }));
    }
    let mut got = 0;
    for h in handles {
        got += h.await??;
    }
    if got != n as u64 {
        bail!("concurrent point fetches returned {got} tuples of {n}");
    }
    rates.push(Rate {
        what: format!("point fetch over gRPC, new tuple, {clients} clients"),
        count: n,
        elapsed: started.elapsed(),
    });

    // A bulk fetch: every CPH visit of a year, as GRC.
    let bulk = plan_request(
        &network,
        "GRC",
        "SELECT * FROM visit WHERE date BETWEEN 19870101 AND 19871231",
    )?;
    let grc = net.client("GRC").await?;
    let (sent0, recv0) = (grc.counters().sent(), grc.counters().received());
    let reply = grc.fetch(as_sent(&bulk, &global)).await?;
    let wire = grc.counters().sent() - sent0 + grc.counters().received() - recv0;
    let (t, raw, json) = reply_sizes(&reply, &bulk, &global)?;
    bytes.push(Bytes {
        what: "bulk fetch (visits of 1987)".into(),
        tuples: t,
        wire,
        raw,
        json,
    });

    // Lock requests: STG locks CPH patients one request at a time.
    let locks = opts.locks.min(pnos.len());
    let refs: Vec<v1::TupleRef> = (0..locks)
        .map(|i| v1::TupleRef {
            relation: "patient".into(),
            id: Some(v1::tuple_ref::Id::TupleId(i as u64 + 1)),
        })
        .collect();
    let started = Instant::now();
    for r in &refs {
        let reply = stg.lock(vec![r.clone()], "").await?;
        if !reply.granted {
            bail!("lock refused: {}", reply.message);
        }
    }
    rates.push(Rate {
        what: "lock request over gRPC, granted".into(),
        count: locks,
        elapsed: started.elapsed(),
    });
    let started = Instant::now();
    for r in &refs {
        let reply = grc.lock(vec![r.clone()], "").await?;
        if reply.granted {
            bail!("a lock held by STG was granted to GRC");
        }
    }
    rates.push(Rate {
        what: "lock request over gRPC, refused (held by another site)".into(),
        count: locks,
        elapsed: started.elapsed(),
    });
    net.stop().await?;
    Ok(GlobalBenchReport {
        patients: opts.patients,
        tuples,
        load,
        rates,
        bytes,
        point_fetch,
        compressed_fetch,
    })
}

/// Options of `snaps bench site`.
#[derive(Debug, Clone, clap::Args)]
pub struct SiteBenchOptions {
    /// The network folder (holding network.toml).
    #[arg(long, default_value = "fixtures/radiology")]
    pub network: PathBuf,
    /// Patients per site in the generated data.
    #[arg(long, default_value_t = 2000)]
    pub patients: usize,
    /// Times the covered query is asked.
    #[arg(long, default_value_t = 2000)]
    pub queries: usize,
    /// First (uncovered) lookups to measure the bytes of.
    #[arg(long, default_value_t = 200)]
    pub lookups: usize,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1988)]
    pub seed: u64,
}

/// The figures of `snaps bench site`.
#[derive(Debug, Clone)]
pub struct SiteBenchReport {
    /// Patients per site.
    pub patients: usize,
    /// The covered query.
    pub query: String,
    /// Baseline (SQLite directly), then through the SQL endpoint, then
    /// PostgreSQL with the same tuples.
    pub rates: Vec<Rate>,
    /// The one-tuple query by key: the fixed cost of a statement, in the
    /// same three places.
    pub point_query: String,
    /// Its rates, baseline first.
    pub point: Vec<Rate>,
    /// Why PostgreSQL was not measured, when it was not.
    pub postgres_missing: Option<String>,
    /// First lookups: bytes on the wire against the raw size of the tuples
    /// they brought.
    pub lookups: Bytes,
}

impl fmt::Display for SiteBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "site STG of the radiology network, {} patients per site",
            self.patients
        )?;
        writeln!(
            f,
            "timed over TLS on loopback, one connection, simple protocol; SQLite reads every value"
        )?;
        writeln!(f, "covered query: {}", self.query)?;
        writeln!(f)?;
        write_rates(f, &self.rates)?;
        writeln!(f)?;
        writeln!(f, "one tuple by key: {}", self.point_query)?;
        writeln!(f)?;
        write_rates(f, &self.point)?;
        if let Some(why) = &self.postgres_missing {
            writeln!(f, "PostgreSQL baseline not measured: {why}")?;
        }
        let b = &self.lookups;
        let t = b.tuples.max(1) as f64;
        writeln!(f)?;
        writeln!(
            f,
            "{}: {} tuples, {:.1} B on the wire per tuple, {:.1} B raw per tuple, wire/raw {:.2}",
            b.what,
            b.tuples,
            b.wire as f64 / t,
            b.raw as f64 / t,
            b.wire as f64 / b.raw.max(1) as f64
        )
    }
}

/// Times `query` straight on a SQLite connection, reading every value of
/// every row: the rate and the rows read.
fn rate_direct(
    conn: &rusqlite::Connection,
    query: &str,
    times: usize,
    what: &str,
) -> Result<(Rate, usize)> {
    let started = Instant::now();
    let mut rows = 0;
    for _ in 0..times {
        let mut stmt = conn.prepare_cached(query)?;
        let width = stmt.column_count();
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            for i in 0..width {
                std::hint::black_box(r.get_ref(i)?);
            }
            rows += 1;
        }
    }
    Ok((
        Rate {
            what: what.into(),
            count: times,
            elapsed: started.elapsed(),
        },
        rows,
    ))
}

/// Times `query` through a PostgreSQL-protocol client (simple protocol):
/// the rate and the rows returned.
async fn rate_simple(
    client: &tokio_postgres::Client,
    query: &str,
    times: usize,
    what: &str,
) -> Result<(Rate, usize)> {
    let started = Instant::now();
    let mut rows = 0;
    for _ in 0..times {
        for m in client.simple_query(query).await? {
            if let tokio_postgres::SimpleQueryMessage::Row(_) = m {
                rows += 1;
            }
        }
    }
    Ok((
        Rate {
            what: what.into(),
            count: times,
            elapsed: started.elapsed(),
        },
        rows,
    ))
}

/// Runs `snaps bench site`.
pub async fn bench_site(opts: &SiteBenchOptions) -> Result<SiteBenchReport> {
    let mut network = crate::fixtures::load_network(&opts.network)?;
    // The lookups measure one tuple's fetch: without the include trees,
    // which would bring the patient's visits along.
    network.includes.clear();
    let global = network.global_catalog()?;
    let dir = tempfile::tempdir()?;
    let net = LocalNetwork::start(
        network.clone(),
        dir.path().join("global.db"),
        BTreeMap::new(),
    )
    .await?;
    let data: BTreeMap<String, BTreeMap<String, Vec<Vec<Value>>>> =
        datagen::generate(&network, &datagen::Scale::new(opts.patients), opts.seed)?
            .into_iter()
            .map(|(c, d)| (c.to_string(), d.rows))
            .collect();
    let sites = crate::localnet::start_sites(&net, dir.path(), &data).await?;
    let stg = sites.get("STG").context("no site STG")?;
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=bench", stg.sql.port()),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    let stat = |name: &str| -> Result<i64> { Ok(stg.site.counter(name)?) };

    // First lookups of CPH patients by number: each brings one tuple.
    let cph = &data.get("CPH").context("no CPH data")?["patient"];
    let cph_mapping = crate::localnet::site_mapping(&network, "CPH")?;
    let rm = cph_mapping
        .relation("patient")
        .context("CPH maps no patient")?;
    let rel = global.relation("patient").context("no global patient")?;
    let n = opts.lookups.min(cph.len());
    let (sent0, recv0, tuples0) = (
        stat("bytes_sent")?,
        stat("bytes_received")?,
        stat("tuples_received")?,
    );
    let mut raw = 0;
    for row in &cph[..n] {
        let pno = row.first().context("patient without pno")?;
        client
            .simple_query(&format!(
                "SELECT surname, dob FROM patient WHERE pno = {pno}"
            ))
            .await?;
        for (a, v) in rm.parts[0].attrs.iter().zip(&rm.export(row)?[0]) {
            raw += raw_size(rel.attribute(&a.global).context("attribute")?.ty, v);
        }
    }
    let tuples = (stat("tuples_received")? - tuples0) as u64;
    if tuples != n as u64 {
        bail!("{n} first lookups brought {tuples} tuples");
    }
    let lookups = Bytes {
        what: "first lookup of another site's patient (by pno)".into(),
        tuples,
        wire: (stat("bytes_sent")? - sent0 + stat("bytes_received")? - recv0) as u64,
        raw,
        json: 0,
    };

    // The timed queries go over TLS, to a second endpoint of STG that
    // requires it (the first served the lookups above in plain text, so
    // their bytes are the protocol's own).
    let certs = dir.path().join("certs");
    crate::localnet::issue_certificates(&certs, &network)?;
    let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tls_port = tls_listener.local_addr()?.port();
    let (stop_tls, stopped) = tokio::sync::oneshot::channel::<()>();
    let tls_endpoint = tokio::spawn(snaps_local::endpoint::serve(
        std::sync::Arc::new(snaps_local::site::SiteEngine(stg.site.clone())),
        snaps_local::endpoint::Login::Trust,
        Some(snaps_local::endpoint::SqlTls::from_dir(
            &certs.join("STG-sql"),
            true,
        )?),
        tls_listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let tls_client_config =
        snaps_proto::tls::Credentials::in_dir(certs.join("STG-sql")).sql_client_config()?;
    let connect_tls = |conninfo: String| {
        let config = (*tls_client_config).clone();
        async move {
            let (client, conn) = tokio_postgres::connect(
                &conninfo,
                tokio_postgres_rustls::MakeRustlsConnect::new(config),
            )
            .await?;
            tokio::spawn(conn);
            anyhow::Ok(client)
        }
    };
    let client = connect_tls(format!(
        "host=127.0.0.1 port={tls_port} user=bench sslmode=require"
    ))
    .await
    .context("connect to STG's endpoint over TLS")?;

    // A covered query: Smiths born after 1950, asked once to fetch, then
    // timed through the endpoint and straight on the same SQLite file.
    let query = "SELECT pno, surname, first_names, dob FROM patient WHERE surname = 'Smith' AND dob > 19500101".to_string();
    client.simple_query(&query).await?;
    let fetches = stat("global_fetches")?;
    let direct = rusqlite::Connection::open(&stg.database)?;
    let (baseline, rows_direct) = rate_direct(
        &direct,
        &query,
        opts.queries,
        "baseline: the query on the site's SQLite file directly",
    )?;
    let (through, rows_snaps) = rate_simple(
        &client,
        &query,
        opts.queries,
        "the query through the SQL endpoint (covered)",
    )
    .await?;
    if rows_snaps != rows_direct {
        bail!("the endpoint returned {rows_snaps} rows, SQLite {rows_direct}");
    }
    // One tuple by its key (the site's own patient): what a statement
    // costs whatever it reads.
    let pno = data["STG"]["patient"]
        .first()
        .and_then(|r| r.first())
        .context("STG has no patients")?
        .clone();
    let point_query =
        format!("SELECT pno, surname, first_names, dob FROM patient WHERE pno = {pno}");
    let (point_direct, _) = rate_direct(
        &direct,
        &point_query,
        opts.queries,
        "baseline: the query on the site's SQLite file directly",
    )?;
    let (point_through, point_rows) = rate_simple(
        &client,
        &point_query,
        opts.queries,
        "the query through the SQL endpoint (covered)",
    )
    .await?;
    if point_rows != opts.queries {
        bail!(
            "the one-tuple query returned {point_rows} rows in {} runs",
            opts.queries
        );
    }
    if stat("global_fetches")? != fetches {
        bail!("the covered queries fetched from the global controller");
    }
    let mut rates = vec![baseline, through];
    let mut point = vec![point_direct, point_through];

    // PostgreSQL with the same tuples (the site's patients and copies),
    // indexed on the key and the surname, over the same kind of loopback
    // connection (simple protocol, TLS with the same certificate).
    let sql_cert = snaps_proto::tls::Credentials::in_dir(certs.join("STG-sql"));
    let postgres_missing =
        match crate::pg_server::PgServer::start_tls(&sql_cert.cert, &sql_cert.key) {
            Err(e) => Some(format!("{e:#}")),
            Ok(pg) => {
                let pc = connect_tls(format!("{} sslmode=require", pg.conninfo("postgres")))
                    .await
                    .context("connect to PostgreSQL over TLS")?;
                pc.batch_execute(
                    "CREATE TABLE patient (pno integer PRIMARY KEY, surname varchar(22), \
                 first_names varchar(24), dob integer); CREATE INDEX ON patient (surname)",
                )
                .await?;
                let tuples: Vec<String> = {
                    let mut stmt =
                        direct.prepare("SELECT pno, surname, first_names, dob FROM patient")?;
                    let quote = |v: Option<String>| {
                        v.map_or("NULL".to_string(), |t| {
                            format!("'{}'", t.replace('\'', "''"))
                        })
                    };
                    stmt.query_map([], |r| {
                        Ok(format!(
                            "({}, {}, {}, {})",
                            r.get::<_, i64>(0)?,
                            quote(r.get(1)?),
                            quote(r.get(2)?),
                            r.get::<_, Option<i64>>(3)?
                                .map_or("NULL".into(), |d| d.to_string())
                        ))
                    })?
                    .collect::<rusqlite::Result<_>>()?
                };
                for chunk in tuples.chunks(500) {
                    pc.batch_execute(&format!("INSERT INTO patient VALUES {}", chunk.join(", ")))
                        .await?;
                }
                pc.batch_execute("ANALYZE patient").await?;
                // `postgres (PostgreSQL) 15.18 (Debian ...)` → `PostgreSQL 15.18`.
                let version = pg.version();
                let name = version
                    .split_whitespace()
                    .skip_while(|w| *w != "(PostgreSQL)")
                    .nth(1)
                    .map_or("PostgreSQL".to_string(), |v| format!("PostgreSQL {v}"));
                let (r, rows) = rate_simple(
                    &pc,
                    &query,
                    opts.queries,
                    &format!("{name}: the same query, the same tuples"),
                )
                .await?;
                if rows != rows_direct {
                    bail!("PostgreSQL returned {rows} rows, SQLite {rows_direct}");
                }
                rates.push(r);
                let (r, _) = rate_simple(
                    &pc,
                    &point_query,
                    opts.queries,
                    &format!("{name}: the same query, the same tuples"),
                )
                .await?;
                point.push(r);
                drop(pc);
                pg.stop()?;
                None
            }
        };
    let _ = stop_tls.send(());
    tls_endpoint.abort();
    net.stop().await?;
    Ok(SiteBenchReport {
        patients: opts.patients,
        query,
        rates,
        point_query,
        point,
        postgres_missing,
        lookups,
    })
}
