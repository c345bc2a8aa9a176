//! The PostgreSQL-wire SQL endpoint: lets unchanged PostgreSQL clients
//! (`psql`, libpq, JDBC, psycopg, tokio-postgres) talk to a site through the
//! [`Engine`] / [`Session`] interface.
//!
//! Each connection gets its own [`Session`], opened at startup with the user
//! name from the startup message, so per-client state (QUEL range
//! declarations, the open transaction) never leaks between clients.
//!
//! The simple query protocol hands the whole query string to
//! [`Session::execute`]. The extended protocol (Parse/Bind/Describe/Execute)
//! has no server-side parameter binding in the interface, so the endpoint
//! substitutes each `$n` with an SQL literal built from the bound value
//! (numbers only when their type is known to be numeric and the value parses
//! as one, everything else quoted) before executing. Values go out as `int8`,
//! `float8` or `text`, in text or binary format as the client asks.
//!
//! Session calls block on SQLite and the network, so they run on tokio's
//! blocking pool; a connection's messages are handled one at a time, so its
//! session is never used concurrently.

use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use futures::sink::{Sink, SinkExt};
use pgwire::api::auth::sasl::scram::{ScramServerAuth, ScramServerAuthWaitingForClientFinal};
use pgwire::api::auth::sasl::{SCRAM_SHA_256_METHOD, SCRAM_SHA_256_PLUS_METHOD};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{
    ClientInfo, ClientPortalStore, DEFAULT_NAME, METADATA_USER, PgWireConnectionState,
    PgWireServerHandlers, PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{
    ErrorInfo, PgWireError, PgWireResult, SEVERITY_ERROR, SEVERITY_FATAL, SEVERITY_NOTICE,
};
use pgwire::messages::data::{
    DataRow, FieldDescription, NoData, ParameterDescription, RowDescription,
};
use pgwire::messages::extendedquery::{
    Describe, TARGET_TYPE_BYTE_PORTAL, TARGET_TYPE_BYTE_STATEMENT,
};
use pgwire::messages::response::NoticeResponse;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use snaps_schema::Value;
use tokio::net::TcpListener;

use crate::engine::{ColumnKind, Engine, EngineError, Outcome, ResultColumn, Session};
use crate::users::{Users, Verifier};

/// The highest `$n` a statement may use: the Bind message counts parameters
/// in 16 bits, so a larger number can never be bound (and rejecting it early
/// keeps a hostile `$99999999` from sizing anything).
const MAX_PARAMETERS: usize = u16::MAX as usize;

/// How the endpoint checks who connects.
#[derive(Debug, Clone)]
pub enum Login {
    /// Every client is trusted and its session opened with whatever user
    /// name its startup message claims, which is also its user code:
    /// development and tests only (`--insecure`).
    Trust,
    /// SCRAM-SHA-256 against the users file ([`crate::users`]), read at
    /// every login so `snaps users add/remove` take effect at once.
    Scram(PathBuf),
}

/// TLS at the SQL endpoint (`sql_tls` in `site.toml`).
#[derive(Debug, Clone)]
pub struct SqlTls {
    config: Arc<rustls::ServerConfig>,
    /// The endpoint's certificate (PEM), for SCRAM channel binding.
    cert_pem: Arc<Vec<u8>>,
    /// Whether a client that does not ask for TLS is refused (at startup,
    /// before any password is exchanged).
    required: bool,
}

impl SqlTls {
    /// The endpoint's certificate and key in `dir` (`cert.pem`, `key.pem`:
    /// `snaps certs sql CODE`); with `required`, plain-text clients are
    /// refused.
    pub fn from_dir(dir: &Path, required: bool) -> Result<SqlTls, snaps_proto::tls::TlsError> {
        let creds = snaps_proto::tls::Credentials::in_dir(dir);
        let config = creds.sql_server_config()?;
        let cert_pem = snaps_proto::tls::read_file(&creds.cert)?;
        Ok(SqlTls {
            config,
            cert_pem: Arc::new(cert_pem),
            required,
        })
    }
}

/// Serves the PostgreSQL protocol on `listener` until `shutdown` completes,
/// one task per connection, checking logins as `login` says; with `tls`,
/// clients may (or must) encrypt the connection.
///
/// On shutdown the listener is dropped, so new connections are refused;
/// connections already open keep being served until their clients leave
/// (the function does not wait for them). Failed `accept`s (a client that
/// hung up, a full file table) are logged and retried, never fatal.
pub async fn serve(
    engine: Arc<dyn Engine>,
    login: Login,
    tls: Option<SqlTls>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let acceptor = tls
        .as_ref()
        .map(|t| pgwire::tokio::TlsAcceptor::from(t.config.clone()));
    let tls_required = tls.as_ref().is_some_and(|t| t.required);
    let cert_pem = tls.map(|t| t.cert_pem);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let handlers = Handlers(Arc::new(Connection::new(
                        engine.clone(),
                        login.clone(),
                        tls_required,
                        cert_pem.clone(),
                    )));
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Err(error) = pgwire::tokio::process_socket(socket, acceptor, handlers).await {
                            tracing::debug!(%peer, %error, "SQL client connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "SQL endpoint: accept failed");
                    // Back off so a persistent condition (EMFILE) does not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The handler set pgwire asks for, one per connection.
struct Handlers(Arc<Connection>);

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.0.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.0.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.0.clone()
    }
}

/// A session shared with the blocking task that runs it.
type SharedSession = Arc<Mutex<Box<dyn Session>>>;

/// Where a connection's SCRAM exchange is.
enum Scram {
    /// The server offered SCRAM-SHA-256 (and its channel-bound -PLUS form,
    /// bound to `binding`, over TLS); the client-first message is due.
    Asked {
        user: String,
        binding: Option<Arc<Vec<u8>>>,
    },
    /// The server sent its first message; the client's proof is due. `code`
    /// is none for an unknown user, whose exchange fails like a wrong
    /// password's.
    Challenged {
        user: String,
        code: Option<String>,
        waiting: Box<ScramServerAuthWaitingForClientFinal>,
    },
}

/// One client connection: the engine until startup, then its session.
struct Connection {
    engine: Arc<dyn Engine>,
    login: Login,
    /// Refuse the startup of a connection that is not encrypted.
    tls_required: bool,
    /// The endpoint's certificate: over TLS, SCRAM binds the exchange to it
    /// (SCRAM-SHA-256-PLUS), so a man in the middle holding another
    /// certificate cannot relay the login.
    cert_pem: Option<Arc<Vec<u8>>>,
    scram: Mutex<Option<Scram>>,
    session: OnceLock<SharedSession>,
    parser: Arc<Parser>,
}

impl Connection {
    fn new(
        engine: Arc<dyn Engine>,
        login: Login,
        tls_required: bool,
        cert_pem: Option<Arc<Vec<u8>>>,
    ) -> Connection {
        Connection {
            engine,
            login,
            tls_required,
            cert_pem,
            scram: Mutex::new(None),
            session: OnceLock::new(),
            parser: Arc::new(Parser),
        }
    }

    /// Opens the session of `user` with user code `code`, then tells the
    /// client it is in.
    async fn open<C>(&self, client: &mut C, user: String, code: String) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (pid, key) = KEYS.generate(client);
        client.set_pid_and_secret_key(pid, key);
        let engine = self.engine.clone();
        let opened =
            tokio::task::spawn_blocking(move || engine.open_session_as(&user, &code)).await;
        let session = match opened {
            Ok(Ok(session)) => session,
            Ok(Err(error)) => return Err(fatal(error.sqlstate, error.message)),
            Err(_) => return Err(fatal("XX000", "internal error: opening the session failed")),
        };
        if self.session.set(Arc::new(Mutex::new(session))).is_err() {
            return Err(fatal("08P01", "duplicate startup message"));
        }
        finish_authentication(client, &DefaultServerParameterProvider::default()).await
    }

    /// Runs `f` on the session in the blocking pool. A panic in the session
    /// becomes an XX000 error and leaves the connection usable: the mutex
    /// poison is ignored, as a half-done call is the engine's to recover
    /// from, not a reason to drop the client.
    async fn call<T, F>(&self, f: F) -> PgWireResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Session) -> Result<T, EngineError> + Send + 'static,
    {
        let session = self
            .session
            .get()
            .cloned()
            .ok_or_else(|| internal("no session: the connection has not started up"))?;
        let result = tokio::task::spawn_blocking(move || {
            let mut session = session.lock().unwrap_or_else(PoisonError::into_inner);
            f(session.as_mut())
        })
        .await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(engine_error(error)),
            Err(join) if join.is_panic() => Err(internal("the session panicked")),
            Err(join) => Err(internal(format!("the session task failed: {join}"))),
        }
    }
}

/// Process ids and cancel keys for BackendKeyData; one generator for the
/// whole process so ids are unique.
static KEYS: LazyLock<RandomPidSecretKeyGenerator> =
    LazyLock::new(RandomPidSecretKeyGenerator::default);

/// A failed login, worded as PostgreSQL words it whatever went wrong, so
/// a client learns nothing of which login names exist.
fn login_failed(user: &str) -> PgWireError {
    fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

#[async_trait]
impl StartupHandler for Connection {
    /// Trust, or SCRAM-SHA-256 against the users file. The session is
    /// opened before AuthenticationOk, so a refused user gets a FATAL error
    /// and no half-open connection.
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                if self.tls_required && !client.is_secure() {
                    return Err(fatal(
                        "28000",
                        "this site accepts SQL connections over TLS only: connect with \
                         sslmode=require, or sslmode=verify-full and the network's ca.pem as \
                         sslrootcert",
                    ));
                }
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                let Some(user) = client.metadata().get(METADATA_USER).cloned() else {
                    return Err(fatal(
                        "28000",
                        "no PostgreSQL user name specified in startup packet",
                    ));
                };
                match &self.login {
                    Login::Trust => self.open(client, user.clone(), user).await,
                    Login::Scram(_) => {
                        let binding = self.cert_pem.clone().filter(|_| client.is_secure());
                        let mut methods = Vec::new();
                        if binding.is_some() {
                            methods.push(SCRAM_SHA_256_PLUS_METHOD.to_string());
                        }
                        methods.push(SCRAM_SHA_256_METHOD.to_string());
                        *self.scram.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(Scram::Asked { user, binding });
                        client.set_state(PgWireConnectionState::AuthenticationInProgress);
                        client
                            .send(PgWireBackendMessage::Authentication(Authentication::SASL(
                                methods,
                            )))
                            .await?;
                        Ok(())
                    }
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                let Login::Scram(path) = &self.login else {
                    return Err(fatal("08P01", "no password was asked for"));
                };
                let state = self
                    .scram
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                match state {
                    Some(Scram::Asked { user, binding }) => {
                        let first = message.into_sasl_initial_response()?;
                        let plus_offered = binding.is_some();
                        if first.auth_method != SCRAM_SHA_256_METHOD
                            && !(plus_offered && first.auth_method == SCRAM_SHA_256_PLUS_METHOD)
                        {
                            return Err(fatal(
                                "28000",
                                format!(
                                    "SASL mechanism {} is not offered: use {}",
                                    first.auth_method,
                                    if plus_offered {
                                        "SCRAM-SHA-256-PLUS or SCRAM-SHA-256"
                                    } else {
                                        "SCRAM-SHA-256"
                                    }
                                ),
                            ));
                        }
                        let data = first
                            .data
                            .ok_or_else(|| fatal("08P01", "empty SCRAM client-first message"))?;
                        let users = match Users::load(path) {
                            Ok(u) => u,
                            Err(error) => {
                                tracing::warn!(%error, "the users file cannot be read: nobody can log in");
                                Users::default()
                            }
                        };
                        let known = users.get(&user).map(|u| (u.code.clone(), u.scram.clone()));
                        let (code, verifier) = match known {
                            Some((code, scram)) => (Some(code), Verifier::parse(&scram)),
                            None => {
                                tracing::info!(%user, "login of an unknown user");
                                (None, Verifier::unmatchable())
                            }
                        };
                        let verifier = verifier.map_err(|e| internal(e.to_string()))?;
                        let mut scram = ScramServerAuth::new();
                        // Bound whenever -PLUS was offered: a client that
                        // could bind but says the server cannot ("y") is
                        // being downgraded, and is refused.
                        if let Some(pem) = &binding {
                            scram
                                .configure_certificate(pem)
                                .map_err(|e| internal(format!("channel binding: {e}")))?;
                        }
                        let (server_first, waiting) = scram
                            .on_client_first_message_with_secret(&data, verifier.secret())
                            .map_err(|_| login_failed(&user))?;
                        *self.scram.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(Scram::Challenged {
                                user,
                                code,
                                waiting: Box::new(waiting),
                            });
                        client
                            .send(PgWireBackendMessage::Authentication(
                                Authentication::SASLContinue(server_first.into_bytes().into()),
                            ))
                            .await?;
                        Ok(())
                    }
                    Some(Scram::Challenged {
                        user,
                        code,
                        waiting,
                    }) => {
                        let response = message.into_sasl_response()?;
                        let proved = waiting.on_client_final_message(&response.data);
                        match (proved, code) {
                            (Ok(server_final), Some(code)) => {
                                client
                                    .send(PgWireBackendMessage::Authentication(
                                        Authentication::SASLFinal(server_final.into_bytes().into()),
                                    ))
                                    .await?;
                                tracing::info!(%user, %code, "login");
                                self.open(client, user, code).await
                            }
                            _ => {
                                tracing::warn!(%user, "login refused: wrong password or unknown user");
                                Err(login_failed(&user))
                            }
                        }
                    }
                    None => Err(fatal("08P01", "unexpected password message")),
                }
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Connection {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let text = query.to_owned();
        let answer = self.call(move |session| session.execute(&text)).await?;
        send_notices(client, answer.notices).await?;
        let mut responses = Vec::with_capacity(answer.outcomes.len().max(1));
        for outcome in answer.outcomes {
            responses.push(outcome_response(outcome, &Format::UnifiedText)?);
        }
        if responses.is_empty() {
            // Text that holds no statement (only a comment): what PostgreSQL
            // answers for an empty query.
            responses.push(Response::EmptyQuery);
        }
        Ok(responses)
    }
}

/// A parsed statement: its text and how many parameters it takes.
#[derive(Debug, Clone)]
struct Statement {
    text: String,
    parameters: usize,
}

/// Counts a statement's `$n` parameters; the text itself is the session's to
/// parse.
#[derive(Debug)]
struct Parser;

#[async_trait]
impl QueryParser for Parser {
    type Statement = Statement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let found = placeholders(sql).map_err(engine_error)?;
        let highest = found.iter().map(|p| p.number).max().unwrap_or(0);
        // Like PostgreSQL: the client may declare more types than the text
        // uses, and those parameters must still be bound.
        let parameters = highest.max(types.len());
        if parameters > MAX_PARAMETERS {
            return Err(error(
                "54000",
                format!("a statement may take at most {MAX_PARAMETERS} parameters"),
            ));
        }
        Ok(Some(Statement {
            text: sql.to_owned(),
            parameters,
        }))
    }

    fn get_parameter_types(&self, stmt: &Statement) -> PgWireResult<Vec<Type>> {
        Ok(vec![Type::TEXT; stmt.parameters])
    }

    fn get_result_schema(
        &self,
        _stmt: &Statement,
        _column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        // Only the session knows; `on_describe` asks it.
        Ok(Vec::new())
    }
}

#[async_trait]
impl ExtendedQueryHandler for Connection {
    type Statement = Statement;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    /// Replaces pgwire's default to ask the session for the columns and to
    /// answer NoData for a statement without result columns (pgwire's default
    /// sends an empty RowDescription when the statement has parameters, which
    /// tells JDBC-style clients to expect a result set).
    async fn on_describe<C>(&self, client: &mut C, message: Describe) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        match message.target_type {
            TARGET_TYPE_BYTE_STATEMENT => {
                let statement = match client.portal_store().get_statement(name) {
                    Some(Entry::Value(statement)) => Some(statement),
                    Some(Entry::Empty) => None,
                    None => return Err(PgWireError::StatementNotFound(name.to_owned())),
                };
                let (types, fields) = match statement {
                    Some(statement) => {
                        // Untyped parameters are reported as text: tokio-postgres'
                        // untyped prepare takes the count from this message.
                        let types = (0..statement.statement.parameters)
                            .map(|i| match statement.parameter_types.get(i) {
                                Some(Some(ty)) if *ty != Type::UNKNOWN => ty.clone(),
                                _ => Type::TEXT,
                            })
                            .collect::<Vec<_>>();
                        let columns = self.describe(&statement.statement).await?;
                        // Result formats are not known until Bind: PostgreSQL says text.
                        (types, fields(&columns, &Format::UnifiedText)?)
                    }
                    None => (Vec::new(), Vec::new()),
                };
                client
                    .send(PgWireBackendMessage::ParameterDescription(
                        ParameterDescription::new(types.iter().map(Type::oid).collect()),
                    ))
                    .await?;
                send_row_description(client, &fields).await
            }
            TARGET_TYPE_BYTE_PORTAL => {
                let fields = match client.portal_store().get_portal(name) {
                    Some(Entry::Value(portal)) => {
                        let columns = self.describe(&portal.statement.statement).await?;
                        fields(&columns, &portal.result_column_format)?
                    }
                    Some(Entry::Empty) => Vec::new(),
                    None => return Err(PgWireError::PortalNotFound(name.to_owned())),
                };
                send_row_description(client, &fields).await
            }
            other => Err(PgWireError::InvalidTargetType(other)),
        }
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let literals = bound_literals(portal)?;
        let text = substitute(&portal.statement.statement.text, &literals).map_err(engine_error)?;
        let answer = self.call(move |session| session.execute(&text)).await?;
        send_notices(client, answer.notices).await?;
        // An extended-protocol statement has one result; pgwire pages it
        // through the portal when the client asks for a row limit.
        match answer.outcomes.into_iter().next() {
            Some(outcome) => outcome_response(outcome, &portal.result_column_format),
            None => Ok(Response::EmptyQuery),
        }
    }
}

impl Connection {
    /// The statement's result columns, its parameters read as NULL (the
    /// values are not known when a statement is described).
    async fn describe(&self, statement: &Statement) -> PgWireResult<Vec<ResultColumn>> {
        let nulls = vec!["NULL".to_owned(); statement.parameters];
        let text = substitute(&statement.text, &nulls).map_err(engine_error)?;
        self.call(move |session| session.describe(&text)).await
    }
}

async fn send_notices<C>(client: &mut C, notices: Vec<String>) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    for notice in notices {
        let info = ErrorInfo::new(SEVERITY_NOTICE.to_owned(), "00000".to_owned(), notice);
        client
            .feed(PgWireBackendMessage::NoticeResponse(NoticeResponse::from(
                info,
            )))
            .await?;
    }
    Ok(())
}

async fn send_row_description<C>(client: &mut C, fields: &[FieldInfo]) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let message = if fields.is_empty() {
        PgWireBackendMessage::NoData(NoData::new())
    } else {
        PgWireBackendMessage::RowDescription(RowDescription::new(
            fields.iter().map(FieldDescription::from).collect(),
        ))
    };
    client.send(message).await?;
    Ok(())
}

/// The pgwire response for one outcome. Transaction tags become transaction
/// responses so pgwire tracks the status in ReadyForQuery; drivers with
/// autocommit off (psycopg) break if BEGIN leaves it idle.
fn outcome_response(outcome: Outcome, formats: &Format) -> PgWireResult<Response> {
    match outcome {
        Outcome::Rows { columns, rows } => {
            let fields = fields(&columns, formats)?;
            let formats = fields.iter().map(FieldInfo::format).collect::<Vec<_>>();
            let rows = rows
                .into_iter()
                .map(|row| data_row(&columns, &formats, row))
                .collect::<PgWireResult<Vec<_>>>()?;
            Ok(Response::Query(QueryResponse::new(
                Arc::new(fields),
                futures::stream::iter(rows.into_iter().map(Ok)),
            )))
        }
        Outcome::Command { tag } => {
            let response = match tag.trim().to_ascii_uppercase().as_str() {
                "BEGIN" | "START TRANSACTION" => Response::TransactionStart,
                "COMMIT" | "ROLLBACK" => Response::TransactionEnd,
                _ => Response::Execution,
            };
            Ok(response(Tag::new(&tag)))
        }
    }
}

/// Field descriptions for result columns in the client's requested formats.
fn fields(columns: &[ResultColumn], formats: &Format) -> PgWireResult<Vec<FieldInfo>> {
    if i16::try_from(columns.len()).is_err() {
        return Err(error("54011", "too many result columns"));
    }
    columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let format = format_at(formats, i, columns.len(), "result")?;
            let (ty, size) = match column.kind {
                ColumnKind::Int => (Type::INT8, 8),
                ColumnKind::Float => (Type::FLOAT8, 8),
                ColumnKind::Text => (Type::TEXT, -1),
                ColumnKind::Bool => (Type::BOOL, 1),
            };
            Ok(FieldInfo::new(column.name.clone(), None, None, ty, format).with_type_size(size))
        })
        .collect()
}

/// The format of item `index` of `count`. pgwire's `Format::format_for`
/// indexes without a bounds check, so a client sending too few format
/// codes would panic it; PostgreSQL rejects such a Bind, and so do we.
fn format_at(
    formats: &Format,
    index: usize,
    count: usize,
    what: &str,
) -> PgWireResult<FieldFormat> {
    match formats {
        Format::UnifiedText => Ok(FieldFormat::Text),
        Format::UnifiedBinary => Ok(FieldFormat::Binary),
        Format::Individual(codes) if codes.len() == count => Ok(FieldFormat::from(codes[index])),
        Format::Individual(codes) => Err(error(
            "08P01",
            format!(
                "bind message has {} {what} formats but {count} {what} values",
                codes.len()
            ),
        )),
    }
}

/// One DataRow. Text format writes each value as it is (Int in decimal,
/// Float in Rust's shortest round-trip form, Text as is) so what SQLite
/// stored is what the client sees; binary format must match the column's
/// declared type byte for byte, so values are converted where that is exact
/// and refused otherwise.
/// `i` in decimal, written into the end of `buf`.
fn int_text(i: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = i.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

fn data_row(
    columns: &[ResultColumn],
    formats: &[FieldFormat],
    row: Vec<Value>,
) -> PgWireResult<DataRow> {
    if row.len() != columns.len() {
        return Err(internal(format!(
            "the engine returned a row of {} values for {} columns",
            row.len(),
            columns.len()
        )));
    }
    let mut data = BytesMut::with_capacity(16 * row.len());
    for ((value, column), format) in row.iter().zip(columns).zip(formats) {
        if matches!(value, Value::Null) {
            data.put_i32(-1);
            continue;
        }
        let too_long = || {
            error(
                "54000",
                format!("value of column {} is too long", column.name),
            )
        };
        // Text and integers in text format go straight into the row, without
        // a string of their own: most values of most rows are these.
        match (format, value) {
            (FieldFormat::Text, Value::Text(t)) => {
                data.put_i32(i32::try_from(t.len()).map_err(|_| too_long())?);
                data.put_slice(t.as_bytes());
            }
            (FieldFormat::Text, Value::Int(i)) => {
                let mut digits = [0u8; 20];
                let text = int_text(*i, &mut digits);
                data.put_i32(text.len() as i32);
                data.put_slice(text);
            }
            _ => {
                let bytes = match format {
                    FieldFormat::Text => text_value(value).into_bytes(),
                    FieldFormat::Binary => binary_value(value, column)?,
                };
                data.put_i32(i32::try_from(bytes.len()).map_err(|_| too_long())?);
                data.put_slice(&bytes);
            }
        }
    }
    // `fields` already checked the column count fits.
    let count = i16::try_from(columns.len()).unwrap_or(i16::MAX);
    Ok(DataRow::new(data, count))
}

/// A value in PostgreSQL text format.
fn text_value(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => float_text(*f),
        Value::Text(s) => s.clone(),
    }
}

/// A REAL as SQLite writes it (`CAST(x AS TEXT)`: `3.0`, `1.0e+20`,
/// `1.5e-07`), with PostgreSQL's spellings for the non-finite values (Rust's
/// `inf` is not accepted by JDBC or libpq users). SQLite's own formatting
/// is asked for (a small in-memory database per thread): its digit rules
/// are SQLite's to change, and a client comparing with the file must see
/// the same text.
fn float_text(f: f64) -> String {
    thread_local! {
        static SQLITE: Option<rusqlite::Connection> = rusqlite::Connection::open_in_memory().ok();
    }
    if f.is_nan() {
        return "NaN".to_owned();
    } else if f == f64::INFINITY {
        return "Infinity".to_owned();
    } else if f == f64::NEG_INFINITY {
        return "-Infinity".to_owned();
    }
    let text = SQLITE.with(|conn| {
        let conn = conn.as_ref()?;
        let mut stmt = conn.prepare_cached("SELECT CAST(?1 AS TEXT)").ok()?;
        stmt.query_row([f], |r| r.get::<_, String>(0)).ok()
    });
    // Only an in-memory database that cannot open leaves Rust's spelling.
    text.unwrap_or_else(|| format!("{f}"))
}

fn binary_value(value: &Value, column: &ResultColumn) -> PgWireResult<Vec<u8>> {
    let mismatch = || {
        error(
            "22P02",
            format!(
                "column {} holds {} which is not a valid {}",
                column.name,
                text_value(value),
                match column.kind {
                    ColumnKind::Int => "int8",
                    ColumnKind::Float => "float8",
                    ColumnKind::Text => "text",
                    ColumnKind::Bool => "bool",
                }
            ),
        )
    };
    Ok(match column.kind {
        ColumnKind::Int => {
            let i = match value {
                Value::Int(i) => *i,
                // Exact only for integral values in [-2^63, 2^63); `as` would saturate.
                Value::Float(f)
                    if f.fract() == 0.0 && (-(2f64.powi(63))..2f64.powi(63)).contains(f) =>
                {
                    *f as i64
                }
                Value::Text(s) => s.trim().parse::<i64>().map_err(|_| mismatch())?,
                _ => return Err(mismatch()),
            };
            i.to_be_bytes().to_vec()
        }
        ColumnKind::Float => {
            let f = match value {
                Value::Float(f) => *f,
                Value::Int(i) => *i as f64,
                Value::Text(s) => s.trim().parse::<f64>().map_err(|_| mismatch())?,
                Value::Null => return Err(mismatch()),
            };
            f.to_be_bytes().to_vec()
        }
        ColumnKind::Text => text_value(value).into_bytes(),
        ColumnKind::Bool => match value {
            Value::Text(t) if t == "t" => vec![1],
            Value::Text(t) if t == "f" => vec![0],
            Value::Int(i) => vec![u8::from(*i != 0)],
            _ => return Err(mismatch()),
        },
    })
}

/// The SQL literal for each bound parameter of a portal.
fn bound_literals(portal: &Portal<Statement>) -> PgWireResult<Vec<String>> {
    let expected = portal.statement.statement.parameters;
    let count = portal.parameters.len();
    if count != expected {
        return Err(error(
            "08P01",
            format!(
                "bind message supplies {count} parameters, but prepared statement requires {expected}"
            ),
        ));
    }
    portal
        .parameters
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let format = format_at(&portal.parameter_format, i, count, "parameter")?;
            let ty = portal.statement.parameter_types.get(i).cloned().flatten();
            literal(i + 1, ty.as_ref(), format, value.as_deref()).map_err(engine_error)
        })
        .collect()
}

/// The SQL literal for parameter `$number`. Numbers are written unquoted
/// only when the client declared a numeric type (or sent a binary number)
/// and the value parses as one, so a parameter can never inject SQL;
/// anything else is a quoted string, which SQLite's type affinity still
/// compares correctly with numeric columns.
fn literal(
    number: usize,
    ty: Option<&Type>,
    format: FieldFormat,
    value: Option<&[u8]>,
) -> Result<String, EngineError> {
    let Some(bytes) = value else {
        return Ok("NULL".to_owned());
    };
    let bad_binary = || {
        EngineError::new(
            "22P03",
            format!("incorrect binary data format in bind parameter {number}"),
        )
    };
    let ty = ty.filter(|ty| **ty != Type::UNKNOWN);
    match format {
        FieldFormat::Binary => match ty {
            Some(&Type::INT2) => Ok(int_literal(
                i16::from_be_bytes(bytes.try_into().map_err(|_| bad_binary())?).into(),
            )),
            Some(&Type::INT4) => Ok(int_literal(
                i32::from_be_bytes(bytes.try_into().map_err(|_| bad_binary())?).into(),
            )),
            Some(&Type::INT8) => Ok(int_literal(i64::from_be_bytes(
                bytes.try_into().map_err(|_| bad_binary())?,
            ))),
            Some(&Type::FLOAT4) => Ok(float_literal(
                f32::from_be_bytes(bytes.try_into().map_err(|_| bad_binary())?).into(),
            )),
            Some(&Type::FLOAT8) => Ok(float_literal(f64::from_be_bytes(
                bytes.try_into().map_err(|_| bad_binary())?,
            ))),
            Some(&Type::BOOL) => match bytes {
                [0] => Ok("0".to_owned()),
                [_] => Ok("1".to_owned()),
                _ => Err(bad_binary()),
            },
            None | Some(&Type::TEXT) | Some(&Type::VARCHAR) | Some(&Type::BPCHAR)
            | Some(&Type::NAME) => string_literal(number, bytes),
            Some(other) => Err(EngineError::new(
                "0A000",
                format!(
                    "binary format of type {} is not supported (bind parameter {number})",
                    other.name()
                ),
            )),
        },
        FieldFormat::Text => {
            let text = std::str::from_utf8(bytes).map_err(|_| invalid_utf8(number))?;
            let invalid = |type_name: &str| {
                EngineError::new(
                    "22P02",
                    format!("invalid input syntax for type {type_name}: \"{text}\""),
                )
            };
            match ty {
                Some(&Type::INT2) | Some(&Type::INT4) | Some(&Type::INT8) => text
                    .trim()
                    .parse::<i64>()
                    .map(int_literal)
                    .map_err(|_| invalid("bigint")),
                Some(&Type::FLOAT4) | Some(&Type::FLOAT8) => text
                    .trim()
                    .parse::<f64>()
                    .map(float_literal)
                    .map_err(|_| invalid("double precision")),
                Some(&Type::NUMERIC) => {
                    let text = text.trim();
                    match text.parse::<i64>() {
                        Ok(i) => Ok(int_literal(i)),
                        Err(_) => text
                            .parse::<f64>()
                            .map(float_literal)
                            .map_err(|_| invalid("numeric")),
                    }
                }
                Some(&Type::BOOL) => match text.trim().to_ascii_lowercase().as_str() {
                    "t" | "true" | "y" | "yes" | "on" | "1" => Ok("1".to_owned()),
                    "f" | "false" | "n" | "no" | "off" | "0" => Ok("0".to_owned()),
                    _ => Err(invalid("boolean")),
                },
                _ => string_literal(number, bytes),
            }
        }
    }
}

fn invalid_utf8(number: usize) -> EngineError {
    EngineError::new(
        "22021",
        format!("invalid byte sequence for encoding \"UTF8\" in bind parameter {number}"),
    )
}

fn int_literal(i: i64) -> String {
    i.to_string()
}

/// A float literal SQLite reads back as the same REAL: Debug formatting
/// always has a `.` or an exponent (Display would write 1.0 as the integer
/// `1`). SQLite has no NaN (it stores NULL) and reads 9e999 as infinity.
fn float_literal(f: f64) -> String {
    if f.is_nan() {
        "NULL".to_owned()
    } else if f == f64::INFINITY {
        "9e999".to_owned()
    } else if f == f64::NEG_INFINITY {
        "-9e999".to_owned()
    } else {
        format!("{f:?}")
    }
}

/// A single-quoted string literal. NUL cannot be part of a PostgreSQL text
/// value and would end SQLite's statement text early.
fn string_literal(number: usize, bytes: &[u8]) -> Result<String, EngineError> {
    let text = std::str::from_utf8(bytes).map_err(|_| invalid_utf8(number))?;
    if text.contains('\0') {
        return Err(EngineError::new(
            "22021",
            format!("invalid byte sequence for encoding \"UTF8\": 0x00 in bind parameter {number}"),
        ));
    }
    Ok(format!("'{}'", text.replace('\'', "''")))
}

/// A `$n` placeholder in statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placeholder {
    /// Byte offset of the `$`.
    start: usize,
    /// Byte offset just past the last digit.
    end: usize,
    /// `n`, from 1.
    number: usize,
}

/// Finds the `$n` placeholders of statement text, skipping string literals,
/// quoted identifiers and comments, and `$` inside identifiers (`a$1` is a
/// name in PostgreSQL). The scan is on bytes: every character it looks for
/// is ASCII, and UTF-8 never uses ASCII bytes inside a multi-byte character.
/// An unterminated literal or comment runs to the end of the text; the
/// session reports the syntax error.
fn placeholders(text: &str) -> Result<Vec<Placeholder>, EngineError> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == quote {
                        if bytes.get(i + 1) == Some(&quote) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                // SQLite's block comments do not nest, so neither do these.
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
            }
            b'$' if bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
                && (i == 0 || !is_identifier_byte(bytes[i - 1])) =>
            {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                let digits = &text[start + 1..i];
                let number = digits
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PARAMETERS).contains(n))
                    .ok_or_else(|| {
                        EngineError::new("42P02", format!("there is no parameter ${digits}"))
                    })?;
                found.push(Placeholder {
                    start,
                    end: i,
                    number,
                });
            }
            _ => i += 1,
        }
    }
    Ok(found)
}

fn is_identifier_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// The text with each `$n` replaced by `literals[n - 1]`. A literal that
/// starts with `-` after a `-` gets a space, or `1-$1` with -5 would become
/// the comment `1--5`.
fn substitute(text: &str, literals: &[String]) -> Result<String, EngineError> {
    let mut out = String::with_capacity(text.len() + 8 * literals.len());
    let mut copied = 0;
    for placeholder in placeholders(text)? {
        let literal = literals.get(placeholder.number - 1).ok_or_else(|| {
            EngineError::new(
                "42P02",
                format!("there is no parameter ${}", placeholder.number),
            )
        })?;
        out.push_str(&text[copied..placeholder.start]);
        if out.ends_with('-') && literal.starts_with('-') {
            out.push(' ');
        }
        out.push_str(literal);
        copied = placeholder.end;
    }
    out.push_str(&text[copied..]);
    Ok(out)
}

fn error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        SEVERITY_ERROR.to_owned(),
        code.to_owned(),
        message.into(),
    )))
}

fn fatal(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        SEVERITY_FATAL.to_owned(),
        code.to_owned(),
        message.into(),
    )))
}

fn engine_error(e: EngineError) -> PgWireError {
    error(e.sqlstate, e.message)
}

fn internal(message: impl Into<String>) -> PgWireError {
    error("XX000", format!("internal error: {}", message.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(text: &str) -> Vec<usize> {
        placeholders(text)
            .unwrap()
            .iter()
            .map(|p| p.number)
            .collect()
    }

    #[test]
    fn placeholders_skip_literals_identifiers_and_comments() {
        assert_eq!(numbers("select $1, $2"), [1, 2]);
        assert_eq!(numbers("select '$1', $2"), [2]);
        assert_eq!(numbers("select 'it''s $1', $3"), [3]);
        assert_eq!(
            numbers("select \"$1\", \"a\"\"$2\" from t where x = $4"),
            [4]
        );
        assert_eq!(
            numbers("select a$1, $10 -- $2\n, $5 /* $6 */ , $7"),
            [10, 5, 7]
        );
        assert_eq!(numbers("select 'unterminated $1"), Vec::<usize>::new());
        assert_eq!(numbers("select $1 /* unterminated $2"), [1]);
        assert_eq!(numbers("sélect é$1, $2"), [2]);
        assert_eq!(numbers("$1"), [1]);
        assert_eq!(numbers("select $ 1, $a"), Vec::<usize>::new());
        assert_eq!(placeholders("select $0").unwrap_err().sqlstate, "42P02");
        assert_eq!(placeholders("select $65536").unwrap_err().sqlstate, "42P02");
        assert_eq!(
            placeholders("select $99999999999999999999999")
                .unwrap_err()
                .sqlstate,
            "42P02"
        );
    }

    #[test]
    fn substitution_keeps_literals_and_avoids_comments() {
        let literals = ["'x'".to_owned(), "-5".to_owned()];
        assert_eq!(
            substitute("select $1, '$1', 1-$2, $2", &literals).unwrap(),
            "select 'x', '$1', 1- -5, -5"
        );
        assert_eq!(
            substitute("select $3", &literals).unwrap_err().sqlstate,
            "42P02"
        );
    }

    #[test]
    fn literals_quote_text_and_check_numbers() {
        let text = FieldFormat::Text;
        let binary = FieldFormat::Binary;
        assert_eq!(literal(1, None, text, None).unwrap(), "NULL");
        assert_eq!(literal(1, None, text, Some(b"it's")).unwrap(), "'it''s'");
        assert_eq!(literal(1, None, text, Some(b"42")).unwrap(), "'42'");
        assert_eq!(
            literal(1, Some(&Type::INT8), text, Some(b" 42")).unwrap(),
            "42"
        );
        assert_eq!(
            literal(1, Some(&Type::INT4), text, Some(b"1; drop table t"))
                .unwrap_err()
                .sqlstate,
            "22P02"
        );
        assert_eq!(
            literal(1, Some(&Type::FLOAT8), text, Some(b"1")).unwrap(),
            "1.0"
        );
        assert_eq!(
            literal(1, Some(&Type::FLOAT8), text, Some(b"Infinity")).unwrap(),
            "9e999"
        );
        assert_eq!(
            literal(1, Some(&Type::FLOAT8), text, Some(b"-inf")).unwrap(),
            "-9e999"
        );
        assert_eq!(
            literal(1, Some(&Type::FLOAT8), text, Some(b"NaN")).unwrap(),
            "NULL"
        );
        assert_eq!(
            literal(1, Some(&Type::NUMERIC), text, Some(b"1.25")).unwrap(),
            "1.25"
        );
        assert_eq!(
            literal(1, Some(&Type::BOOL), text, Some(b"t")).unwrap(),
            "1"
        );
        assert_eq!(
            literal(1, Some(&Type::INT8), binary, Some(&7i64.to_be_bytes())).unwrap(),
            "7"
        );
        assert_eq!(
            literal(1, Some(&Type::INT2), binary, Some(&(-7i16).to_be_bytes())).unwrap(),
            "-7"
        );
        assert_eq!(
            literal(1, Some(&Type::FLOAT4), binary, Some(&1.5f32.to_be_bytes())).unwrap(),
            "1.5"
        );
        assert_eq!(
            literal(1, Some(&Type::INT8), binary, Some(b"abc"))
                .unwrap_err()
                .sqlstate,
            "22P03"
        );
        assert_eq!(
            literal(1, Some(&Type::TEXT), binary, Some(b"a'b")).unwrap(),
            "'a''b'"
        );
        assert_eq!(
            literal(1, Some(&Type::DATE), binary, Some(b"1234"))
                .unwrap_err()
                .sqlstate,
            "0A000"
        );
        assert_eq!(
            literal(1, None, text, Some(b"a\0b")).unwrap_err().sqlstate,
            "22021"
        );
        assert_eq!(
            literal(1, None, text, Some(b"\xff")).unwrap_err().sqlstate,
            "22021"
        );
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for i in [0, 7, -7, 10, 19880101, i64::MAX, i64::MIN] {
            let mut buf = [0u8; 20];
            assert_eq!(int_text(i, &mut buf), i.to_string().as_bytes());
        }
    }

    #[test]
    fn reals_are_written_as_sqlite_writes_them() {
        for (f, text) in [
            (3.0, "3.0"),
            (1e20, "1.0e+20"),
            (1.5e-7, "1.5e-07"),
            (0.1, "0.1"),
            (100.0, "100.0"),
            (-2.75, "-2.75"),
            (49.47, "49.47"),
        ] {
            assert_eq!(float_text(f), text);
        }
        // What it gives reads back as the same number.
        for f in [1.0 / 3.0, 0.1 + 0.2, 123456789012345678.0, 5e-324, f64::MAX] {
            assert_eq!(float_text(f).parse::<f64>().unwrap(), f, "{f:e}");
        }
    }

    #[test]
    fn values_encode_in_both_formats() {
        assert_eq!(float_text(0.1), "0.1");
        assert_eq!(float_text(3.0), "3.0");
        assert_eq!(float_text(f64::NEG_INFINITY), "-Infinity");
        let int = ResultColumn {
            name: "n".into(),
            kind: ColumnKind::Int,
        };
        assert_eq!(
            binary_value(&Value::Float(3.0), &int).unwrap(),
            3i64.to_be_bytes()
        );
        assert!(binary_value(&Value::Float(3.5), &int).is_err());
        assert!(binary_value(&Value::Float(1e300), &int).is_err());
        assert!(binary_value(&Value::Float(2f64.powi(63)), &int).is_err());
        assert!(binary_value(&Value::Float(f64::NAN), &int).is_err());
        assert_eq!(
            binary_value(&Value::Float(-(2f64.powi(63))), &int).unwrap(),
            i64::MIN.to_be_bytes()
        );
        assert!(binary_value(&Value::Text("x".into()), &int).is_err());
        let row = data_row(
            std::slice::from_ref(&int),
            &[FieldFormat::Text],
            vec![Value::Null],
        )
        .unwrap();
        assert_eq!(&row.data[..], &(-1i32).to_be_bytes());
        assert!(data_row(&[int], &[FieldFormat::Text], vec![]).is_err());
    }

    #[test]
    fn short_format_lists_are_refused_not_panicked_on() {
        let formats = Format::Individual(vec![0, 1]);
        assert!(format_at(&formats, 2, 3, "result").is_err());
        assert_eq!(
            format_at(&formats, 1, 2, "result").unwrap(),
            FieldFormat::Binary
        );
    }
}
