//! `snaps bench global --store URL`: the PostgreSQL global store beside
//! the SQLite one, in the same run, on the same generated network, over
//! gRPC on loopback — point fetches and lock grants per second with one
//! and with two controllers sharing the store, and the latency of a point
//! fetch at the store's size. With `auto` the PostgreSQL server is a
//! throwaway one syncing every commit to disk, as the SQLite store does.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snaps_global::StoreLocation;
use snaps_local::remote::GlobalClient;
use snaps_proto::v1;
use snaps_schema::{Value, datagen};

use crate::bench::{GlobalBenchOptions, Rate, as_sent, plan_request};
use crate::localnet::{LocalNetwork, Options, load_site};

/// One store's figures.
#[derive(Debug, Clone)]
pub struct StoreFigures {
    /// Which store.
    pub store: String,
    /// Tuples in the global snapshot.
    pub tuples: u64,
    /// The initial load.
    pub load: Rate,
    /// Point fetches of new tuples, one controller then two.
    pub fetches: [Rate; 2],
    /// Lock requests granted, one controller then two.
    pub locks: [Rate; 2],
    /// Point fetch latency with one controller: median and 99th percentile.
    pub latency: (Duration, Duration),
}

/// One line of the comparison: what, and how to read it off a store's
/// figures.
type Figure = fn(&StoreFigures) -> f64;

/// The comparison.
#[derive(Debug, Clone)]
pub struct StoreBenchReport {
    /// Concurrent clients.
    pub clients: usize,
    /// SQLite first (the baseline), then PostgreSQL.
    pub stores: Vec<StoreFigures>,
}

impl fmt::Display for StoreBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(base) = self.stores.first() else {
            return Ok(());
        };
        writeln!(
            f,
            "global stores side by side: {} clients, gRPC on loopback, {} tuples in the global snapshot",
            self.clients, base.tuples
        )?;
        writeln!(
            f,
            "{:<44} {:>12} {:>12} {:>8}",
            "per second (latency in ms)",
            base.store,
            self.stores.get(1).map_or("", |s| s.store.as_str()),
            "ratio"
        )?;
        let rows: Vec<(String, Figure)> = vec![
            (base.load.what.clone(), |s| s.load.per_second()),
            (base.fetches[0].what.clone(), |s| s.fetches[0].per_second()),
            (base.fetches[1].what.clone(), |s| s.fetches[1].per_second()),
            (base.locks[0].what.clone(), |s| s.locks[0].per_second()),
            (base.locks[1].what.clone(), |s| s.locks[1].per_second()),
            ("point fetch latency, median (ms)".into(), |s| {
                s.latency.0.as_secs_f64() * 1e3
            }),
            ("point fetch latency, 99th percentile (ms)".into(), |s| {
                s.latency.1.as_secs_f64() * 1e3
            }),
        ];
        for (what, get) in rows {
            let a = get(base);
            match self.stores.get(1) {
                Some(other) => {
                    let b = get(other);
                    writeln!(
                        f,
                        "{what:<44} {a:>12.1} {b:>12.1} {:>7.2}x",
                        b / a.max(1e-9)
                    )?;
                }
                None => writeln!(f, "{what:<44} {a:>12.1}")?,
            }
        }
        for s in &self.stores {
            let gain = |r: &[Rate; 2]| r[1].per_second() / r[0].per_second().max(1e-9);
            writeln!(
                f,
                "{}: a second controller gives {:.2}x the fetches and {:.2}x the lock grants",
                s.store,
                gain(&s.fetches),
                gain(&s.locks)
            )?;
        }
        Ok(())
    }
}

/// Runs the comparison: the SQLite store in a temporary file, then the
/// PostgreSQL store at `url` (an empty database), or on a throwaway server
/// with `auto`.
pub async fn bench_stores(opts: &GlobalBenchOptions, url: &str) -> Result<StoreBenchReport> {
    let dir = tempfile::tempdir()?;
    let mut server = None;
    let pg = if url == "auto" {
        let s = crate::pg_server::PgServer::start_durable()?;
        let u = s.create_database("snaps_bench")?;
        server = Some(s);
        u
    } else if url.starts_with("postgresql://") || url.starts_with("postgres://") {
        url.to_string()
    } else {
        bail!("--store {url:?}: give a postgresql:// URL of an empty database, or auto");
    };
    let mut stores = vec![
        run_store(
            opts,
            "SQLite",
            StoreLocation::Sqlite(dir.path().join("global.db")),
        )
        .await?,
    ];
    stores.push(run_store(opts, "PostgreSQL", StoreLocation::Postgres(pg)).await?);
    drop(server);
    Ok(StoreBenchReport {
        clients: opts.clients.max(1),
        stores,
    })
}

/// Requests spread over `clients` connections, each connection's in turn;
/// the time of all and of each request.
async fn spread(
    conns: Vec<GlobalClient>,
    requests: Vec<Request>,
) -> Result<(Duration, Vec<Duration>)> {
    let n = conns.len();
    let mut lanes: Vec<Vec<Request>> = (0..n).map(|_| Vec::new()).collect();
    for (i, r) in requests.into_iter().enumerate() {
        lanes[i % n].push(r);
    }
    let started = Instant::now();
    let mut handles = Vec::new();
    for (c, lane) in conns.into_iter().zip(lanes) {
        handles.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(lane.len());
            for r in lane {
                let t = Instant::now();
                r(c.clone()).await?;
                times.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(times)
        }));
    }
    let mut times = Vec::new();
    for h in handles {
        times.extend(h.await??);
    }
    Ok((started.elapsed(), times))
}

type Request =
    Box<dyn FnOnce(GlobalClient) -> futures::future::BoxFuture<'static, Result<()>> + Send>;

fn fetch_of(req: v1::FetchRequest) -> Request {
    Box::new(move |c: GlobalClient| {
        Box::pin(async move {
            let reply = c.fetch(req).await?;
            let got: u32 = reply.tables.iter().map(|t| t.count).sum();
            if got != 1 {
                bail!("a point fetch of a new tuple brought {got} tuples");
            }
            Ok(())
        })
    })
}

fn lock_of(id: u64) -> Request {
    Box::new(move |c: GlobalClient| {
        Box::pin(async move {
            let r = v1::TupleRef {
                relation: "patient".into(),
                id: Some(v1::tuple_ref::Id::TupleId(id)),
            };
            let reply = c.lock(vec![r], "").await?;
            if !reply.granted {
                bail!("lock of patient {id} refused: {}", reply.message);
            }
            Ok(())
        })
    })
}

async fn run_store(
    opts: &GlobalBenchOptions,
    name: &str,
    store: StoreLocation,
) -> Result<StoreFigures> {
    let network = crate::fixtures::load_network(&opts.network)?;
    let global = network.global_catalog()?;
    let mut indexes = BTreeMap::new();
    indexes.insert("patient".to_string(), vec![vec!["surname".to_string()]]);
    indexes.insert("visit".to_string(), vec![vec!["pno".to_string()]]);
    let first = LocalNetwork::start_with(
        network.clone(),
        store.clone(),
        Options {
            indexes: indexes.clone(),
            ..Options::new(&network)
        },
    )
    .await
    .with_context(|| format!("start a controller on the {name} store"))?;
    let data = datagen::generate(&network, &datagen::Scale::new(opts.patients), opts.seed)?;
    let started = Instant::now();
    let mut tuples = 0;
    for (code, d) in &data {
        let c = first.client(code.as_str()).await?;
        tuples += load_site(&c, &first.mapping(code.as_str())?, &d.rows, 5000)
            .await?
            .loaded;
    }
    let load = Rate {
        what: "initial load, tuples".into(),
        count: tuples as usize,
        elapsed: started.elapsed(),
    };
    // A second controller on the same store, with the same credentials.
    let second = LocalNetwork::start_with(
        network.clone(),
        store,
        Options {
            indexes,
            tokens: first.tokens.clone(),
            admin: first.admin.clone(),
            ..Options::new(&network)
        },
    )
    .await
    .with_context(|| format!("start a second controller on the {name} store"))?;
    let pnos: Vec<i64> = data
        .iter()
        .find(|(c, _)| c.as_str() == "CPH")
        .context("no CPH data")?
        .1
        .rows["patient"]
        .iter()
        .filter_map(|r| match r.first() {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        })
        .collect();
    let n = opts.fetches.min(pnos.len() / 2);
    let clients = opts.clients.max(1);
    if n < clients {
        bail!("too few patients for {clients} clients' point fetches: raise --patients");
    }
    let requests = |pnos: &[i64]| -> Result<Vec<Request>> {
        pnos.iter()
            .map(|p| {
                let r = plan_request(
                    &network,
                    "STG",
                    &format!("SELECT * FROM patient WHERE pno = {p}"),
                )?;
                Ok(fetch_of(as_sent(&r, &global)))
            })
            .collect()
    };
    let mut one = Vec::new();
    for _ in 0..clients {
        one.push(first.client("STG").await?);
    }
    let mut two = Vec::new();
    for i in 0..clients {
        two.push(if i % 2 == 0 {
            first.client("STG").await?
        } else {
            second.client("STG").await?
        });
    }
    let (e1, mut times) = spread(one, requests(&pnos[..n])?).await?;
    let (e2, _) = spread(two, requests(&pnos[n..2 * n])?).await?;
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let latency = (at(0.5), at(0.99));
    let fetch_rate = |what: &str, elapsed| Rate {
        what: format!("point fetch, new tuple, {what}"),
        count: n,
        elapsed,
    };
    let fetches = [
        fetch_rate("1 controller", e1),
        fetch_rate("2 controllers", e2),
    ];
    let locks = opts.locks.min(pnos.len() / 2).max(clients);
    let mut one = Vec::new();
    let mut two = Vec::new();
    for i in 0..clients {
        one.push(first.client("GRC").await?);
        two.push(if i % 2 == 0 {
            first.client("GRC").await?
        } else {
            second.client("GRC").await?
        });
    }
    let ids = |from: u64| -> Vec<Request> { (from..from + locks as u64).map(lock_of).collect() };
    let (l1, _) = spread(one, ids(1)).await?;
    let (l2, _) = spread(two, ids(1 + locks as u64)).await?;
    let lock_rate = |what: &str, elapsed| Rate {
        what: format!("lock request, granted, {what}"),
        count: locks,
        elapsed,
    };
    second.stop().await?;
    first.stop().await?;
    Ok(StoreFigures {
        store: name.into(),
        tuples,
        load,
        fetches,
        locks: [
            lock_rate("1 controller", l1),
            lock_rate("2 controllers", l2),
        ],
        latency,
    })
}
