//! The PostgreSQL-wire endpoint against real clients (tokio-postgres, psql,
//! and raw protocol messages for what drivers never send), in front of a
//! fake engine: each session is its own in-memory SQLite database, so real
//! SQL runs and sessions are visibly separate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use snaps_local::endpoint::{Login, serve};
use snaps_local::engine::{
    Answer, ColumnKind, Engine, EngineError, Outcome, ResultColumn, Session,
};
use snaps_schema::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

/// How long `SELECT sleep_me` blocks its session.
const SLEEP: Duration = Duration::from_millis(400);

/// An engine whose sessions are private in-memory SQLite databases holding
/// a `patient` table and a `me` table with the session's user.
struct FakeEngine;

impl Engine for FakeEngine {
    fn open_session(&self, user: &str) -> Result<Box<dyn Session>, EngineError> {
        self.open_session_as(user, user)
    }

    fn open_session_as(&self, user: &str, code: &str) -> Result<Box<dyn Session>, EngineError> {
        if user == "refused" {
            return Err(EngineError::new(
                "28000",
                "user \"refused\" may not connect",
            ));
        }
        let db = rusqlite::Connection::open_in_memory().map_err(sqlite_error)?;
        db.execute_batch(
            "CREATE TABLE me (name TEXT, code TEXT);
             CREATE TABLE patient (id INTEGER, name TEXT, weight REAL);
             INSERT INTO patient VALUES (1, 'Ada', 61.5), (2, 'Bob', 80.25), (3, 'O''Brien', NULL);",
        )
        .map_err(sqlite_error)?;
        db.execute("INSERT INTO me VALUES (?1, ?2)", [user, code])
            .map_err(sqlite_error)?;
        Ok(Box::new(FakeSession { db }))
    }
}

struct FakeSession {
    db: rusqlite::Connection,
}

fn sqlite_error(e: rusqlite::Error) -> EngineError {
    let message = e.to_string();
    if message.contains("no such table") {
        EngineError::new("42P01", message)
    } else {
        EngineError::new("42601", message)
    }
}

/// Splits text at `;` outside quotes: enough SQL for a fake.
fn statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quote = None;
    for c in text.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if q == c => quote = None,
            (None, ';') => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    out.push(current);
    out.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && !s.starts_with("--"))
        .collect()
}

fn kind(decltype: Option<&str>) -> ColumnKind {
    let decltype = decltype.unwrap_or("").to_ascii_uppercase();
    if decltype.contains("INT") {
        ColumnKind::Int
    } else if decltype.contains("REAL") || decltype.contains("FLOA") || decltype.contains("DOUB") {
        ColumnKind::Float
    } else {
        ColumnKind::Text
    }
}

fn tag(statement: &str, changes: u64) -> String {
    let upper = statement.to_ascii_uppercase();
    let first = upper.split_whitespace().next().unwrap_or("");
    match first {
        "INSERT" => format!("INSERT 0 {changes}"),
        "UPDATE" | "DELETE" => format!("{first} {changes}"),
        "END" => "COMMIT".to_owned(),
        "CREATE" | "DROP" => upper
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
        _ => first.to_owned(),
    }
}

impl FakeSession {
    fn special(&self, statement: &str, notices: &mut Vec<String>) -> Option<Outcome> {
        let one = |name: &str, value: Value| Outcome::Rows {
            columns: vec![ResultColumn {
                name: name.to_owned(),
                kind: ColumnKind::Text,
            }],
            rows: vec![vec![value]],
        };
        match statement.to_ascii_lowercase().as_str() {
            "select notice_me" => {
                notices.push("you asked for a notice".to_owned());
                Some(one("notice_me", Value::Text("here".into())))
            }
            "select panic_me" => panic!("the fake session panics on request"),
            "select sleep_me" => {
                std::thread::sleep(SLEEP);
                Some(one("sleep_me", Value::Text("slept".into())))
            }
            _ => None,
        }
    }

    fn run(&mut self, statement: &str) -> Result<Outcome, EngineError> {
        if statement.eq_ignore_ascii_case("START TRANSACTION") {
            // What tokio-postgres sends for `transaction()`; SQLite says BEGIN.
            self.db.execute_batch("BEGIN").map_err(sqlite_error)?;
            return Ok(Outcome::Command {
                tag: "START TRANSACTION".to_owned(),
            });
        }
        let mut stmt = self.db.prepare(statement).map_err(sqlite_error)?;
        if stmt.column_count() == 0 {
            stmt.raw_execute().map_err(sqlite_error)?;
            return Ok(Outcome::Command {
                tag: tag(statement, self.db.changes()),
            });
        }
        let columns = columns(&stmt);
        let width = columns.len();
        let mut rows = Vec::new();
        let mut cursor = stmt.raw_query();
        while let Some(row) = cursor.next().map_err(sqlite_error)? {
            let mut values = Vec::with_capacity(width);
            for i in 0..width {
                values.push(match row.get_ref(i).map_err(sqlite_error)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::Int(i),
                    ValueRef::Real(f) => Value::Float(f),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            rows.push(values);
        }
        Ok(Outcome::Rows { columns, rows })
    }
}

fn columns(stmt: &rusqlite::Statement<'_>) -> Vec<ResultColumn> {
    stmt.columns()
        .map(|c| ResultColumn {
            name: c.name().to_owned(),
            kind: kind(c.decl_type()),
        })
        .collect()
}

impl Session for FakeSession {
    fn execute(&mut self, text: &str) -> Result<Answer, EngineError> {
        let mut answer = Answer::default();
        for statement in statements(text) {
            let outcome = match self.special(&statement, &mut answer.notices) {
                Some(outcome) => outcome,
                None => self.run(&statement)?,
            };
            answer.outcomes.push(outcome);
        }
        Ok(answer)
    }

    fn describe(&mut self, text: &str) -> Result<Vec<ResultColumn>, EngineError> {
        let Some(statement) = statements(text).into_iter().next() else {
            return Ok(Vec::new());
        };
        if let Some(Outcome::Rows { columns, .. }) = self.special(&statement, &mut Vec::new()) {
            return Ok(columns);
        }
        let stmt = self.db.prepare(&statement).map_err(sqlite_error)?;
        Ok(columns(&stmt))
    }
}

/// A running endpoint.
struct Server {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start() -> Server {
    start_with(Login::Trust).await
}

async fn start_with(login: Login) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        Arc::new(FakeEngine),
        login,
        None,
        listener,
        async move {
            let _ = rx.await;
        },
    ));
    Server {
        addr,
        shutdown: Some(tx),
        task,
    }
}

fn config(addr: SocketAddr, user: &str) -> String {
    format!(
        "host={} port={} user={user} dbname=snaps connect_timeout=5",
        addr.ip(),
        addr.port()
    )
}

/// A client whose connection runs in a task that forwards notices to the
/// returned channel.
async fn connect(addr: SocketAddr, user: &str) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(&config(addr, user), NoTls)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = futures::StreamExt::next(&mut messages).await {
            match message {
                Ok(AsyncMessage::Notice(notice)) => {
                    let _ = tx.send(notice.message().to_owned());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

fn rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn completions(messages: &[SimpleQueryMessage]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn simple_query_returns_rows_and_tags() {
    let server = start().await;
    let (client, _) = connect(server.addr, "alice").await;

    let messages = client
        .simple_query(
            "CREATE TABLE t (a INTEGER, b TEXT, c REAL);
             INSERT INTO t VALUES (1, 'x', 0.1), (2, NULL, 3.0);
             SELECT a, b, c FROM t ORDER BY a",
        )
        .await
        .unwrap();
    assert_eq!(completions(&messages), [0, 2, 2]);
    assert_eq!(
        rows(&messages),
        [
            [Some("1".into()), Some("x".into()), Some("0.1".into())],
            [Some("2".into()), None, Some("3.0".into())],
        ]
    );
    let columns = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::RowDescription(columns) => Some(columns.clone()),
            _ => None,
        })
        .expect("a row description");
    let names = columns.iter().map(|c| c.name()).collect::<Vec<_>>();
    assert_eq!(names, ["a", "b", "c"]);

    let messages = client.simple_query("UPDATE t SET b = 'y'").await.unwrap();
    assert_eq!(completions(&messages), [2]);
    let messages = client.simple_query("SELECT name FROM me").await.unwrap();
    assert_eq!(rows(&messages), [[Some("alice".to_owned())]]);

    // Empty queries (tokio-postgres reports EmptyQueryResponse as 0 rows
    // affected; the raw-protocol test checks the message itself).
    for empty in ["", " ; ", "-- nothing"] {
        let messages = client.simple_query(empty).await.unwrap();
        assert_eq!(completions(&messages), [0], "{empty:?}");
    }
}

#[tokio::test]
async fn prepared_statements_bind_typed_parameters() {
    let server = start().await;
    let (client, _) = connect(server.addr, "alice").await;

    // Declared types: tokio-postgres sends text and int8 in binary.
    let stmt = client
        .prepare_typed(
            "SELECT id, name, weight FROM patient WHERE name = $1 OR id = $2 ORDER BY id",
            &[Type::TEXT, Type::INT8],
        )
        .await
        .unwrap();
    let column_types = stmt
        .columns()
        .iter()
        .map(|c| c.type_().clone())
        .collect::<Vec<_>>();
    assert_eq!(column_types, [Type::INT8, Type::TEXT, Type::FLOAT8]);
    let found = client.query(&stmt, &[&"Ada", &3i64]).await.unwrap();
    let found = found
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                r.get::<_, String>(1),
                r.get::<_, Option<f64>>(2),
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(
        found,
        [
            (1, "Ada".to_owned(), Some(61.5)),
            (3, "O'Brien".to_owned(), None)
        ]
    );

    // A quote in a parameter is data, not SQL.
    let row = client.query_one(&stmt, &[&"O'Brien", &0i64]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);

    // Untyped prepare: the parameter count comes from the text, typed text.
    let stmt = client
        .prepare("SELECT name FROM patient WHERE id = $1")
        .await
        .unwrap();
    assert_eq!(stmt.params(), [Type::TEXT]);
    let row = client.query_one(&stmt, &[&"2"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "Bob");

    // Writes with numbers of both kinds, and the rows they report.
    let insert = client
        .prepare_typed(
            "INSERT INTO patient VALUES ($1, $2, $3)",
            &[Type::INT8, Type::TEXT, Type::FLOAT8],
        )
        .await
        .unwrap();
    assert!(insert.columns().is_empty());
    let inserted = client
        .execute(&insert, &[&4i64, &"Eve", &70.125f64])
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    let negative = client
        .execute(&insert, &[&-5i64, &"Neg", &-1.5f64])
        .await
        .unwrap();
    assert_eq!(negative, 1);
    let row = client
        .query_one("SELECT weight FROM patient WHERE id = 0-$1", &[&"-4"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, f64>(0), 70.125);
    let typed = client
        .prepare_typed(
            "SELECT name, weight FROM patient WHERE id = 1-$1",
            &[Type::INT4],
        )
        .await
        .unwrap();
    let row = client.query_one(&typed, &[&6i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "Neg");
    assert_eq!(row.get::<_, f64>(1), -1.5);
    let updated = client
        .execute("UPDATE patient SET weight = weight + 1 WHERE id > 3", &[])
        .await
        .unwrap();
    assert_eq!(updated, 1);
}

#[tokio::test]
async fn null_parameters_bind_as_sql_null() {
    let server = start().await;
    let (client, _) = connect(server.addr, "alice").await;

    let stmt = client
        .prepare_typed("SELECT id FROM patient WHERE weight IS $1", &[Type::FLOAT8])
        .await
        .unwrap();
    let row = client.query_one(&stmt, &[&None::<f64>]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);

    let row = client
        .query_one("SELECT $1 IS NULL, $2", &[&None::<&str>, &None::<&str>])
        .await
        .unwrap();
    // An expression has no declared type: the fake says text, so the
    // endpoint sends SQLite's integer 1 as the text "1".
    assert_eq!(row.get::<_, String>(0), "1");
    assert_eq!(row.get::<_, Option<String>>(1), None);
}

#[tokio::test]
async fn placeholders_inside_string_literals_stay_text() {
    let server = start().await;
    let (client, _) = connect(server.addr, "alice").await;

    let stmt = client
        .prepare("SELECT '$1' AS lit, \"name\" AS \"$2\", $1 AS p FROM patient WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(stmt.params().len(), 1);
    let row = client.query_one(&stmt, &[&"x"]).await.unwrap();
    assert_eq!(row.get::<_, String>("lit"), "$1");
    assert_eq!(row.get::<_, String>("$2"), "Ada");
    assert_eq!(row.get::<_, String>("p"), "x");
}

#[tokio::test]
async fn errors_carry_sqlstate_and_message_and_leave_the_connection_usable() {
    let server = start().await;
    let (client, _) = connect(server.addr, "alice").await;

    let err = client
        .simple_query("SELECT * FROM nowhere")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));
    let db = err.as_db_error().unwrap();
    assert_eq!(db.severity(), "ERROR");
    assert!(db.message().contains("nowhere"), "{}", db.message());

    // Extended protocol: the error comes from describing the statement.
    let err = client
        .query("SELECT * FROM nowhere WHERE x = $1", &[&"a"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));

    // A panicking session is an internal error, and the session lives on.
    let err = client.simple_query("SELECT panic_me").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INTERNAL_ERROR));
    let err = client.query("SELECT panic_me", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INTERNAL_ERROR));
    let messages = client.simple_query("SELECT name FROM me").await.unwrap();
    assert_eq!(rows(&messages), [[Some("alice".to_owned())]]);
    let row = client
        .query_one("SELECT name FROM patient WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Ada");

    // $0 does not exist.
    let err = client.prepare("SELECT $0").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_PARAMETER));
}

#[tokio::test]
async fn notices_arrive_before_results() {
    let server = start().await;
    let (client, mut notices) = connect(server.addr, "alice").await;

    let messages = client.simple_query("SELECT notice_me").await.unwrap();
    assert_eq!(rows(&messages), [[Some("here".to_owned())]]);
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .unwrap();
    assert_eq!(notice.as_deref(), Some("you asked for a notice"));

    let row = client.query_one("SELECT notice_me", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "here");
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .unwrap();
    assert_eq!(notice.as_deref(), Some("you asked for a notice"));
}

#[tokio::test]
async fn transactions_commit_roll_back_and_page_portals() {
    let server = start().await;
    let (mut client, _) = connect(server.addr, "alice").await;

    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO patient VALUES (10, 'Kept', 1.0)", &[])
        .await
        .unwrap();
    // A portal read two rows at a time (Execute with a row limit).
    let stmt = tx
        .prepare("SELECT id FROM patient ORDER BY id")
        .await
        .unwrap();
    let portal = tx.bind(&stmt, &[]).await.unwrap();
    let mut pages = Vec::new();
    loop {
        let page = tx.query_portal(&portal, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        pages.push(page.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>());
    }
    assert_eq!(pages, [vec![1, 2], vec![3, 10]]);
    tx.commit().await.unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO patient VALUES (11, 'Dropped', 1.0)", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let ids = client
        .query("SELECT id FROM patient WHERE id >= 10", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect::<Vec<_>>();
    assert_eq!(ids, [10]);

    // Through the simple protocol, in one string and statement by statement.
    client
        .batch_execute("BEGIN; INSERT INTO patient VALUES (12, 'Batch', 2.0); COMMIT")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("DELETE FROM patient WHERE id = 12")
        .await
        .unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();
    let row = client
        .query_one("SELECT name FROM patient WHERE id = 12", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_have_separate_sessions() {
    let server = start().await;
    let (alice, _) = connect(server.addr, "alice").await;
    let (bob, _) = connect(server.addr, "bob").await;

    let me = |messages: Vec<SimpleQueryMessage>| rows(&messages)[0][0].clone().unwrap();
    assert_eq!(
        me(alice.simple_query("SELECT name FROM me").await.unwrap()),
        "alice"
    );
    assert_eq!(
        me(bob.simple_query("SELECT name FROM me").await.unwrap()),
        "bob"
    );

    alice
        .batch_execute("CREATE TABLE private (x INTEGER)")
        .await
        .unwrap();
    let err = bob.simple_query("SELECT * FROM private").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE));

    // Both sessions block at once: one connection's wait does not hold the other.
    let started = Instant::now();
    let (a, b) = tokio::join!(
        alice.simple_query("SELECT sleep_me"),
        bob.simple_query("SELECT sleep_me")
    );
    a.unwrap();
    b.unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < SLEEP * 2 - SLEEP / 4, "took {elapsed:?}");
}

#[tokio::test]
async fn a_refused_session_ends_the_connection_with_its_error() {
    let server = start().await;
    let err = tokio_postgres::connect(&config(server.addr, "refused"), NoTls)
        .await
        .err()
        .expect("the connection is refused");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    );
    let db = err.as_db_error().unwrap();
    assert_eq!(db.severity(), "FATAL");
    assert!(db.message().contains("refused"));
}

#[tokio::test]
async fn shutdown_stops_accepting_but_open_connections_stay() {
    let mut server = start().await;
    let (client, _) = connect(server.addr, "alice").await;

    server.shutdown.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();

    assert!(TcpStream::connect(server.addr).await.is_err());
    assert!(
        tokio_postgres::connect(&config(server.addr, "bob"), NoTls)
            .await
            .is_err()
    );
    let messages = client.simple_query("SELECT name FROM me").await.unwrap();
    assert_eq!(rows(&messages), [[Some("alice".to_owned())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_talks_to_the_endpoint() {
    let server = start().await;
    let psql = |command: &str| {
        tokio::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &server.addr.port().to_string()])
            .args([
                "-U", "someone", "-d", "snaps", "-X", "-A", "-t", "-c", command,
            ])
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
    };
    let output = match psql("select 1").await {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("skipping the psql check: no psql binary on PATH");
            return;
        }
        Err(e) => panic!("psql: {e}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "psql failed: {output:?}");
    assert_eq!(stdout.trim(), "1");

    let output = psql("select name from me").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "someone");

    let output = psql("BEGIN; INSERT INTO patient VALUES (9, 'Psql', 1.5); COMMIT; SELECT name, weight FROM patient WHERE id = 9")
        .await
        .unwrap();
    assert!(output.status.success(), "psql failed: {output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.trim().ends_with("Psql|1.5"), "{stdout}");

    let output = psql("select * from nowhere").await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nowhere"), "{stderr}");
}

/// Raw protocol messages, for what well-behaved drivers never send.
mod raw {
    use super::*;

    pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    pub fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    pub fn parse(name: &str, query: &str, types: &[u32]) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, name);
        cstr(&mut body, query);
        body.extend_from_slice(&(types.len() as i16).to_be_bytes());
        for t in types {
            body.extend_from_slice(&t.to_be_bytes());
        }
        message(b'P', &body)
    }

    pub fn bind(
        statement: &str,
        param_formats: &[i16],
        params: &[Option<&[u8]>],
        result_formats: &[i16],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, "");
        cstr(&mut body, statement);
        body.extend_from_slice(&(param_formats.len() as i16).to_be_bytes());
        for f in param_formats {
            body.extend_from_slice(&f.to_be_bytes());
        }
        body.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(bytes) => {
                    body.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                    body.extend_from_slice(bytes);
                }
            }
        }
        body.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
        for f in result_formats {
            body.extend_from_slice(&f.to_be_bytes());
        }
        message(b'B', &body)
    }

    pub fn describe_portal() -> Vec<u8> {
        message(b'D', b"P\0")
    }

    pub fn execute() -> Vec<u8> {
        message(b'E', b"\0\0\0\0\0")
    }

    pub fn sync() -> Vec<u8> {
        message(b'S', b"")
    }

    pub fn query(text: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, text);
        message(b'Q', &body)
    }

    pub async fn startup(addr: SocketAddr, user: &str) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut body = 196608i32.to_be_bytes().to_vec();
        for s in ["user", user, "database", "snaps", ""] {
            cstr(&mut body, s);
        }
        let mut packet = (body.len() as i32 + 4).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        stream.write_all(&packet).await.unwrap();
        let replies = until_ready(&mut stream).await;
        assert_eq!(replies.first().map(|m| m.0), Some(b'R'));
        stream
    }

    /// Reads messages up to and including ReadyForQuery.
    pub async fn until_ready(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let kind = stream.read_u8().await.unwrap();
            let len = stream.read_i32().await.unwrap();
            let mut body = vec![0; len as usize - 4];
            stream.read_exact(&mut body).await.unwrap();
            out.push((kind, body));
            if kind == b'Z' {
                return out;
            }
        }
    }

    /// The SQLSTATEs of the ErrorResponses among `messages`.
    pub fn error_codes(messages: &[(u8, Vec<u8>)]) -> Vec<String> {
        messages
            .iter()
            .filter(|m| m.0 == b'E')
            .filter_map(|(_, body)| {
                body.split(|b| *b == 0)
                    .find(|field| field.first() == Some(&b'C'))
                    .map(|field| String::from_utf8_lossy(&field[1..]).into_owned())
            })
            .collect()
    }

    pub fn kinds(messages: &[(u8, Vec<u8>)]) -> String {
        messages.iter().map(|m| m.0 as char).collect()
    }
}

#[tokio::test]
async fn malformed_binds_are_errors_not_crashes() {
    let server = start().await;
    let mut stream = raw::startup(server.addr, "alice").await;
    const INT8: u32 = 20;

    let mut exchange = async |messages: &[Vec<u8>]| {
        for m in messages {
            stream.write_all(m).await.unwrap();
        }
        raw::until_ready(&mut stream).await
    };

    // Three result formats for two columns: rejected at Describe and Execute.
    let statement = raw::parse("s", "SELECT id, name FROM patient WHERE id = $1", &[]);
    let replies = exchange(&[
        statement,
        raw::bind("s", &[], &[Some(b"1")], &[0, 1, 0]),
        raw::describe_portal(),
        raw::sync(),
    ])
    .await;
    assert_eq!(
        raw::error_codes(&replies),
        ["08P01"],
        "{}",
        raw::kinds(&replies)
    );
    let replies = exchange(&[
        raw::bind("s", &[], &[Some(b"1")], &[0, 1, 0]),
        raw::execute(),
        raw::sync(),
    ])
    .await;
    assert_eq!(
        raw::error_codes(&replies),
        ["08P01"],
        "{}",
        raw::kinds(&replies)
    );

    // Too few parameters, too many parameter formats.
    let replies = exchange(&[raw::bind("s", &[], &[], &[]), raw::execute(), raw::sync()]).await;
    assert_eq!(raw::error_codes(&replies), ["08P01"]);
    let replies = exchange(&[
        raw::bind("s", &[0, 0], &[Some(b"1")], &[]),
        raw::execute(),
        raw::sync(),
    ])
    .await;
    assert_eq!(raw::error_codes(&replies), ["08P01"]);

    // A binary int8 of three bytes; a text int8 that is not a number.
    let replies = exchange(&[
        raw::parse("n", "SELECT name FROM patient WHERE id = $1", &[INT8]),
        raw::bind("n", &[1], &[Some(b"abc")], &[]),
        raw::execute(),
        raw::sync(),
    ])
    .await;
    assert_eq!(raw::error_codes(&replies), ["22P03"]);
    let replies = exchange(&[
        raw::bind("n", &[0], &[Some(b"1 OR 1=1")], &[]),
        raw::execute(),
        raw::sync(),
    ])
    .await;
    assert_eq!(raw::error_codes(&replies), ["22P02"]);

    // A text int8 that is one, in text results; then binary results.
    let replies = exchange(&[
        raw::bind("n", &[0], &[Some(b"2")], &[]),
        raw::execute(),
        raw::sync(),
    ])
    .await;
    assert_eq!(raw::kinds(&replies), "2DCZ");
    assert!(replies[1].1.ends_with(b"Bob"));
    let replies = exchange(&[
        raw::parse("", "SELECT id FROM patient WHERE id = 2", &[]),
        raw::bind("", &[], &[], &[1]),
        raw::execute(),
        raw::sync(),
    ])
    .await;
    assert_eq!(raw::kinds(&replies), "12DCZ");
    assert!(replies[2].1.ends_with(&2i64.to_be_bytes()));

    // Describe of a statement without results is NoData, with its parameters.
    let replies = exchange(&[
        raw::parse("w", "UPDATE patient SET name = $1 WHERE id = $2", &[]),
        raw::message(b'D', b"Sw\0"),
        raw::sync(),
    ])
    .await;
    assert_eq!(raw::kinds(&replies), "1tnZ");
    assert_eq!(&replies[1].1[..2], &2i16.to_be_bytes());

    // Empty queries get EmptyQueryResponse, whether pgwire or the session
    // finds them empty.
    assert_eq!(raw::kinds(&exchange(&[raw::query("")]).await), "IZ");
    assert_eq!(
        raw::kinds(&exchange(&[raw::query("-- nothing")]).await),
        "IZ"
    );

    // ReadyForQuery carries the transaction status drivers rely on.
    let status = |replies: &[(u8, Vec<u8>)]| replies.last().unwrap().1.clone();
    assert_eq!(status(&exchange(&[raw::query("BEGIN")]).await), b"T");
    assert_eq!(
        status(&exchange(&[raw::query("SELECT * FROM nowhere")]).await),
        b"E"
    );
    assert_eq!(status(&exchange(&[raw::query("ROLLBACK")]).await), b"I");
    let replies = exchange(&[
        raw::parse("", "BEGIN", &[]),
        raw::bind("", &[], &[], &[]),
        raw::execute(),
        raw::sync(),
    ])
    .await;
    assert_eq!(status(&replies), b"T");
    assert_eq!(status(&exchange(&[raw::query("COMMIT")]).await), b"I");

    // The connection still answers simple queries.
    let replies = exchange(&[raw::query("SELECT name FROM me")]).await;
    assert_eq!(raw::kinds(&replies), "TDCZ");
    assert!(replies[1].1.ends_with(b"alice"));
}

#[tokio::test]
async fn scram_logins_carry_the_user_code_and_refuse_wrong_passwords_alike() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.toml");
    let mut users = snaps_local::users::Users::default();
    users.add("radiology", "RAD01", "film-badge-7").unwrap();
    users.save(&file).unwrap();
    let server = start_with(Login::Scram(file.clone())).await;
    let login =
        |user: &str, password: &str| format!("{} password={password}", config(server.addr, user));

    let (client, conn) = tokio_postgres::connect(&login("radiology", "film-badge-7"), NoTls)
        .await
        .expect("the right password logs in");
    tokio::spawn(conn);
    let me = client
        .simple_query("SELECT name, code FROM me")
        .await
        .unwrap();
    assert_eq!(
        rows(&me),
        vec![vec![
            Some("radiology".to_string()),
            Some("RAD01".to_string())
        ]]
    );

    // A wrong password and an unknown user fail the same way.
    for (user, password) in [("radiology", "film-badge-8"), ("nobody", "film-badge-7")] {
        let e = tokio_postgres::connect(&login(user, password), NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} logged in with {password}"));
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
        assert_eq!(db.code(), &SqlState::INVALID_PASSWORD, "{user}");
        assert_eq!(
            db.message(),
            format!("password authentication failed for user \"{user}\"")
        );
    }

    // A user added while the endpoint runs can log in at once; one removed
    // cannot.
    users.add("clerk", "CLK01", "front-desk-3").unwrap();
    users.remove("radiology");
    users.save(&file).unwrap();
    let (clerk, conn) = tokio_postgres::connect(&login("clerk", "front-desk-3"), NoTls)
        .await
        .expect("a user added now logs in");
    tokio::spawn(conn);
    assert_eq!(
        rows(&clerk.simple_query("SELECT code FROM me").await.unwrap()),
        vec![vec![Some("CLK01".to_string())]]
    );
    assert!(
        tokio_postgres::connect(&login("radiology", "film-badge-7"), NoTls)
            .await
            .is_err()
    );
}

/// Garbage on one connection — before or after the startup, cut-off and
/// oversized frames, random bytes — never takes the endpoint down: the
/// connection gets an error or is closed, and a well-behaved client is
/// served right after. Seeded, so CI runs the same cases every time.
#[test]
fn garbage_on_one_connection_leaves_the_endpoint_serving_others() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(start());
    let addr = server.addr;
    let frames = prop_oneof![
        // Random bytes, nothing else.
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| (false, b)),
        // A message kind and a declared length that lies, after a startup.
        (
            any::<u8>(),
            any::<i32>(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(kind, len, body)| {
                let mut m = vec![kind];
                m.extend_from_slice(&len.to_be_bytes());
                m.extend(body);
                (true, m)
            }),
        // A query cut short.
        (1usize..12).prop_map(|n| {
            let mut q = raw::query("SELECT id FROM patient");
            q.truncate(n);
            (true, q)
        }),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    runner
        .run(&frames, |(after_startup, bytes)| {
            rt.block_on(async {
                let mut stream = if after_startup {
                    raw::startup(addr, "mallory").await
                } else {
                    TcpStream::connect(addr).await.unwrap()
                };
                let _ = stream.write_all(&bytes).await;
                // Whatever comes back (an error, or nothing), the
                // connection is dropped without waiting for it.
                let mut sink = [0u8; 256];
                let _ =
                    tokio::time::timeout(Duration::from_millis(50), stream.read(&mut sink)).await;
                drop(stream);
                let (client, _) = connect(addr, "alice").await;
                let rows = client.simple_query("SELECT 1").await.expect("served");
                assert!(rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))));
            });
            Ok(())
        })
        .unwrap();
    drop(server);
}
