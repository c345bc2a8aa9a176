//! The site's side of the gRPC contract: a client of the global snapshot
//! controller that sends the site's credential with every request,
//! compresses the connection as one stream (`snaps_proto::deflate`), and
//! counts the bytes that really cross the wire (HTTP/2
//! framing and headers included) — the thesis' first cost; and the
//! conversions between the site's mapping and the wire (export batches,
//! semi-join projections, fetched tuples mapped back).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use snaps_mapping::mapping::{RelationMapping, SiteMapping};
use snaps_mapping::rewrite::{GlobalQuery, GlobalTable};
use snaps_proto::deflate::Link;
use snaps_proto::v1::global_snapshot_client::GlobalSnapshotClient;
use snaps_proto::{decode_rows, encode_rows, shape_of_relation, v1};
use snaps_schema::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{Error, Result};

/// Largest message the client accepts (a fetch of many tuples can be big).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Bytes sent to and received from the global controller on the wire.
#[derive(Debug, Default)]
pub struct WireCounters {
    sent: AtomicU64,
    received: AtomicU64,
    /// While set, a copy of every byte each way (for a benchmark taking a
    /// request apart by protocol layer).
    capture: std::sync::Mutex<Option<Captured>>,
}

/// The bytes a connection sent and received while capturing, as they
/// crossed the socket.
#[derive(Debug, Default, Clone)]
pub struct Captured {
    /// From the client.
    pub sent: Vec<u8>,
    /// To the client.
    pub received: Vec<u8>,
}

impl WireCounters {
    /// Starts keeping a copy of the bytes crossing the connection.
    pub fn start_capture(&self) {
        *self.capture.lock().unwrap_or_else(|p| p.into_inner()) = Some(Captured::default());
    }

    /// The bytes kept since [`WireCounters::start_capture`]; stops keeping
    /// them.
    pub fn take_capture(&self) -> Captured {
        self.capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default()
    }

    fn keep(&self, sent: bool, bytes: &[u8]) {
        if let Some(c) = self
            .capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            if sent { &mut c.sent } else { &mut c.received }.extend_from_slice(bytes);
        }
    }

    /// Bytes written to the connection.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes read from the connection.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A TCP stream that counts what passes through it.
struct Counted {
    inner: TcpStream,
    counters: Arc<WireCounters>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counters
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        self.counters.keep(false, &buf.filled()[before..]);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
            self.counters.keep(true, &buf[..n]);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a connection proves who is calling.
#[derive(Clone)]
pub enum Auth {
    /// Mutual TLS: the client certificate names the site (or administrator).
    Tls(Arc<rustls::ClientConfig>),
    /// Plain text with a bearer token: for development only (`--insecure`),
    /// as anyone on the path can read the data and the token.
    Insecure(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Tls(_) => f.write_str("Auth::Tls"),
            Auth::Insecure(_) => f.write_str("Auth::Insecure(<token>)"),
        }
    }
}

impl Auth {
    /// TLS with the credential directory `dir` (`ca.pem`, `cert.pem`,
    /// `key.pem`).
    pub fn tls_dir(dir: &std::path::Path) -> Result<Auth> {
        let config = snaps_proto::tls::Credentials::in_dir(dir)
            .client_config()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(Auth::Tls(config))
    }
}

/// Adds the credential (a token in plain-text mode) and the site code the
/// caller believes it is to every request; the controller refuses a claim
/// its certificate does not back, so a misconfigured site fails loudly.
#[derive(Clone)]
pub struct Bearer {
    token: Option<MetadataValue<Ascii>>,
    claim: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            req.metadata_mut().insert(TOKEN_HEADER, t.clone());
        }
        if let Some(c) = &self.claim {
            req.metadata_mut().insert(SITE_HEADER, c.clone());
        }
        Ok(req)
    }
}

/// The metadata key of the token in plain-text mode (the controller's
/// `TOKEN_HEADER`): unlike `authorization`, HTTP/2 compresses it to an
/// index after the first call on a connection.
pub const TOKEN_HEADER: &str = "snaps-token";

/// The metadata key naming the site a request is sent for.
pub const SITE_HEADER: &str = "snaps-site";

/// Either side of a connection: plain TCP or TLS over it, counted below
/// the TLS layer so the counters see what really crosses the wire.
enum Wire {
    Plain(Counted),
    Tls(Box<tokio_rustls::client::TlsStream<Counted>>),
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Wire::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Wire::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_flush(cx),
            Wire::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Wire::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The generated client with the credential attached.
pub type RawClient = GlobalSnapshotClient<InterceptedService<Channel, Bearer>>;

/// A connection to the global snapshot controller.
#[derive(Clone)]
pub struct GlobalClient {
    client: RawClient,
    counters: Arc<WireCounters>,
}

impl GlobalClient {
    /// Connects to `addr` (`https://host:port` with TLS, `http://host:port`
    /// in plain-text mode), proving who calls with `auth`; `claim` is the
    /// site code the caller believes it is (none for an administrator).
    pub async fn connect(addr: &str, auth: &Auth, claim: Option<&str>) -> Result<GlobalClient> {
        GlobalClient::connect_with(addr, auth, claim, true).await
    }

    /// [`GlobalClient::connect`], compressing the connection (both ways,
    /// one deflate stream for its life) only when `compress` is set.
    pub async fn connect_with(
        addr: &str,
        auth: &Auth,
        claim: Option<&str>,
        compress: bool,
    ) -> Result<GlobalClient> {
        let tls = match auth {
            Auth::Tls(config) => {
                if !addr.starts_with("https://") {
                    return Err(Error::Invalid(format!(
                        "global controller address {addr:?}: TLS needs an https:// address"
                    )));
                }
                Some(tokio_rustls::TlsConnector::from(config.clone()))
            }
            Auth::Insecure(_) => {
                if !addr.starts_with("http://") {
                    return Err(Error::Invalid(format!(
                        "global controller address {addr:?}: plain-text mode needs an http:// \
                         address (give the site its TLS credentials for https://)"
                    )));
                }
                None
            }
        };
        // tonic dials through the connector below; it only needs a URI it
        // can parse, so the scheme it sees is always http.
        let dial = addr.replacen("https://", "http://", 1);
        let endpoint = Endpoint::from_shared(dial)
            .map_err(|e| Error::Invalid(format!("global controller address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let counters = Arc::new(WireCounters::default());
        let c = counters.clone();
        let connector = tower::service_fn(move |uri: Uri| {
            let counters = c.clone();
            let tls = tls.clone();
            async move {
                let host = uri
                    .host()
                    .unwrap_or("127.0.0.1")
                    .trim_matches(['[', ']'])
                    .to_string();
                let port = uri.port_u16().unwrap_or(80);
                let inner = TcpStream::connect((host.as_str(), port)).await?;
                inner.set_nodelay(true)?;
                let counted = Counted { inner, counters };
                let wire = match tls {
                    None => Wire::Plain(counted),
                    Some(tls) => {
                        let name =
                            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                                std::io::Error::other(format!("server name {host:?}: {e}"))
                            })?;
                        let stream = tls.connect(name, counted).await.map_err(|e| {
                            std::io::Error::other(format!("TLS with the global controller: {e}"))
                        })?;
                        Wire::Tls(Box::new(stream))
                    }
                };
                let link = Link::connect(wire, compress).await?;
                Ok::<_, std::io::Error>(TokioIo::new(link))
            }
        });
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| Error::Unreachable(format!("{addr}: {}", crate::error_chain(&e))))?;
        let token = match auth {
            Auth::Insecure(token) => Some(token.parse::<MetadataValue<Ascii>>().map_err(|_| {
                Error::Invalid("the token has characters a header cannot carry".into())
            })?),
            Auth::Tls(_) => None,
        };
        let claim = claim
            .map(|c| {
                c.parse::<MetadataValue<Ascii>>().map_err(|_| {
                    Error::Invalid(format!("site code {c:?} cannot travel in a header"))
                })
            })
            .transpose()?;
        let client = GlobalSnapshotClient::with_interceptor(channel, Bearer { token, claim })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(GlobalClient { client, counters })
    }

    /// The wire byte counters of this connection.
    pub fn counters(&self) -> &WireCounters {
        &self.counters
    }

    /// The generated client, for calls this type does not wrap.
    pub fn raw(&self) -> RawClient {
        self.client.clone()
    }

    /// Registers: checks the schema fingerprint, learns code, number, key
    /// ranges and relation modes.
    pub async fn hello(&self, schema_fingerprint: &str) -> Result<v1::HelloReply> {
        let req = v1::HelloRequest {
            schema_fingerprint: schema_fingerprint.to_string(),
            software: concat!("snaps ", env!("CARGO_PKG_VERSION")).to_string(),
        };
        Ok(self.client.clone().hello(req).await?.into_inner())
    }

    /// Sends export batches in one stream.
    pub async fn load(&self, batches: Vec<v1::LoadBatch>) -> Result<v1::LoadReply> {
        let stream = tokio_stream_iter(batches);
        Ok(self.raw().load(stream).await?.into_inner())
    }

    /// The highest origin already processed for a global relation.
    pub async fn load_progress(&self, relation: &str) -> Result<u64> {
        let req = v1::LoadProgressRequest {
            relation: relation.to_string(),
        };
        Ok(self
            .client
            .clone()
            .load_progress(req)
            .await?
            .into_inner()
            .max_origin)
    }

    /// One fetch.
    pub async fn fetch(&self, req: v1::FetchRequest) -> Result<v1::FetchReply> {
        Ok(self.raw().fetch(req).await?.into_inner())
    }

    /// Asks for primary-copy locks (all or none) for the person with user
    /// code `user`.
    pub async fn lock(&self, tuples: Vec<v1::TupleRef>, user: &str) -> Result<v1::LockReply> {
        let req = v1::LockRequest {
            tuples,
            user: user.to_string(),
        };
        Ok(self.raw().lock(req).await?.into_inner())
    }

    /// The owner of each key of `relation` (global attribute values of
    /// `attributes`, the relation's key): a site code, or `None` if free.
    pub async fn key_owners(
        &self,
        relation: &str,
        attributes: Vec<String>,
        keys: &[Vec<Value>],
    ) -> Result<Vec<Option<String>>> {
        let req = v1::KeyOwnersRequest {
            relation: relation.to_string(),
            keys: Some(
                encode_rows(attributes.len(), keys).map_err(|e| Error::Invalid(e.to_string()))?,
            ),
            attributes,
        };
        let owners = self.raw().key_owners(req).await?.into_inner().owners;
        if owners.len() != keys.len() {
            return Err(Error::Invalid(format!(
                "the global controller named {} owners for {} keys",
                owners.len(),
                keys.len()
            )));
        }
        Ok(owners
            .into_iter()
            .map(|o| (!o.is_empty()).then_some(o))
            .collect())
    }

    /// Gives locks back.
    pub async fn unlock(&self, tuples: Vec<v1::TupleRef>) -> Result<u64> {
        let req = v1::UnlockRequest { tuples };
        Ok(self.raw().unlock(req).await?.into_inner().released)
    }

    /// Says the site no longer holds these copies.
    pub async fn release_copies(&self, tuples: Vec<v1::TupleRef>) -> Result<u64> {
        let req = v1::ReleaseRequest { tuples };
        Ok(self.raw().release_copies(req).await?.into_inner().released)
    }

    /// Opens the stream of refresh epoch notices.
    pub async fn subscribe(&self) -> Result<tonic::Streaming<v1::EpochNotice>> {
        Ok(self
            .client
            .clone()
            .subscribe(v1::SubscribeRequest {})
            .await?
            .into_inner())
    }

    /// Pushes the site's changes for an epoch.
    pub async fn push(&self, req: v1::PushRequest) -> Result<u64> {
        Ok(self.raw().push(req).await?.into_inner().tuples)
    }

    /// What changed for this site after epoch `since`, in its parts, with
    /// the summaries and (when `links_version` is given) the identity
    /// links changed since the versions the site holds.
    pub async fn changes(
        &self,
        since: u64,
        parts: Vec<v1::Part>,
        summary_version: u64,
        links_version: Option<u64>,
    ) -> Result<v1::ChangesReply> {
        let req = v1::ChangesRequest {
            since,
            parts,
            summary_version,
            links_version,
        };
        Ok(self.raw().changes(req).await?.into_inner())
    }

    /// Asks for the new tuples of the site's standing groups.
    pub async fn refetch(&self, req: v1::RefetchRequest) -> Result<v1::RefetchReply> {
        Ok(self.raw().refetch(req).await?.into_inner())
    }

    /// Tells the controller every tuple the site holds; returns the sent-to
    /// bits it added and removed.
    pub async fn resync(&self, held: Vec<v1::HeldTuples>) -> Result<(u64, u64)> {
        let req = v1::ResyncRequest { held };
        let r = self.raw().resync(req).await?.into_inner();
        Ok((r.added, r.removed))
    }

    /// Says the site applied an epoch.
    pub async fn acknowledge(&self, epoch: u64) -> Result<()> {
        self.client
            .clone()
            .acknowledge(v1::AcknowledgeRequest { epoch })
            .await?;
        Ok(())
    }

    /// Runs one refresh epoch now (the administrator's credential) and
    /// streams its progress.
    pub async fn run_refresh(&self) -> Result<tonic::Streaming<v1::RefreshProgress>> {
        Ok(self
            .client
            .clone()
            .refresh(v1::RefreshRequest {})
            .await?
            .into_inner())
    }

    /// Sets an access rule (administrator); returns the rules in force.
    pub async fn grant(&self, rule: v1::AclRule) -> Result<v1::AclReply> {
        Ok(self.client.clone().grant(rule).await?.into_inner())
    }

    /// Removes an access rule (administrator); returns the rules in force.
    pub async fn revoke(&self, rule: v1::AclRule) -> Result<v1::AclReply> {
        Ok(self.client.clone().revoke(rule).await?.into_inner())
    }

    /// The access rules in force (administrator).
    pub async fn list_acl(&self) -> Result<v1::AclReply> {
        Ok(self
            .client
            .clone()
            .list_acl(v1::ListAclRequest {})
            .await?
            .into_inner())
    }

    /// The audit trail, filtered (administrator).
    pub async fn audit(&self, filter: v1::AuditRequest) -> Result<Vec<v1::AuditEntry>> {
        Ok(self
            .client
            .clone()
            .audit(filter)
            .await?
            .into_inner()
            .entries)
    }

    /// Chains every audit record appended so far and walks the trail's
    /// hash chain (administrator).
    pub async fn audit_verify(&self) -> Result<v1::AuditVerification> {
        let req = v1::AuditRequest {
            verify: true,
            ..Default::default()
        };
        self.client
            .clone()
            .audit(req)
            .await?
            .into_inner()
            .verification
            .ok_or_else(|| {
                Error::Invalid("the global controller did not verify the audit trail".into())
            })
    }

    /// The key conflicts awaiting an administrator.
    pub async fn conflicts(&self) -> Result<Vec<v1::ConflictEntry>> {
        Ok(self
            .client
            .clone()
            .conflicts(v1::ConflictsRequest {})
            .await?
            .into_inner()
            .conflicts)
    }

    /// The records at other sites that may be the same person as the
    /// patient keyed `key` in the network's relation of people, graded
    /// (asked by `user`, for the access rules and the audit trail).
    pub async fn match_patient(&self, key: &Value, user: &str) -> Result<v1::MatchReply> {
        let req = v1::MatchRequest {
            key: Some(snaps_proto::encode_value(key)),
            user: user.to_string(),
        };
        Ok(self.raw().r#match(req).await?.into_inner())
    }

    /// Records that the patient keyed `key` (of this site) and the record
    /// keyed `other_key` of `other_site` are the same person, or with
    /// `unlink` that they are not (confirmed by `user`).
    pub async fn link(
        &self,
        key: &Value,
        (other_site, other_key): (&str, &Value),
        user: &str,
        unlink: bool,
    ) -> Result<v1::LinkReply> {
        let req = v1::LinkRequest {
            key: Some(snaps_proto::encode_value(key)),
            other_site: other_site.to_string(),
            other_key: Some(snaps_proto::encode_value(other_key)),
            user: user.to_string(),
            unlink,
        };
        Ok(self.raw().link(req).await?.into_inner())
    }

    /// Asks for one patient's changes now (`snaps_sync_patient`); with
    /// `for_site` (the administrator's credential), for that site.
    pub async fn sync_patient(
        &self,
        key: i64,
        user: &str,
        for_site: &str,
    ) -> Result<v1::SyncPatientReply> {
        let req = v1::SyncPatientRequest {
            key,
            user: user.to_string(),
            for_site: for_site.to_string(),
        };
        Ok(self.raw().sync_patient(req).await?.into_inner())
    }

    /// Answers a sync ask the controller sent over Subscribe.
    pub async fn sync_report(&self, report: v1::SyncReportRequest) -> Result<u64> {
        Ok(self.raw().sync_report(report).await?.into_inner().epoch)
    }

    /// The controller's counters.
    pub async fn status(&self) -> Result<v1::StatusReply> {
        Ok(self
            .client
            .clone()
            .status(v1::StatusRequest {})
            .await?
            .into_inner())
    }
}

/// A stream over batches already built.
fn tokio_stream_iter(
    batches: Vec<v1::LoadBatch>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = v1::LoadBatch> + Send + 'static {
    tonic::codegen::tokio_stream::iter(batches)
}

/// The export of a local relation as load batches of at most `batch_rows`
/// tuples: `tuples` are (origin, values in the local attribute order).
/// Only mapped attributes leave the site, converted to the global types.
pub fn export_batches(
    rm: &RelationMapping,
    tuples: &[(u64, Vec<Value>)],
    batch_rows: usize,
) -> Result<Vec<v1::LoadBatch>> {
    let shape = shape_of_relation(rm);
    let mut batches = Vec::new();
    for chunk in tuples.chunks(batch_rows.max(1)) {
        let mut parts: Vec<Vec<Vec<Value>>> = vec![Vec::with_capacity(chunk.len()); rm.parts.len()];
        for (origin, values) in chunk {
            let exported = rm
                .export(values)
                .map_err(|e| Error::Invalid(format!("{} tuple {origin}: {e}", rm.local.name)))?;
            for (p, v) in parts.iter_mut().zip(exported) {
                p.push(v);
            }
        }
        let values = parts
            .iter()
            .zip(&rm.parts)
            .map(|(rows, p)| encode_rows(p.attrs.len(), rows))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        batches.push(v1::LoadBatch {
            shape: Some(shape.clone()),
            origins: chunk.iter().map(|(o, _)| *o).collect(),
            values,
        });
    }
    Ok(batches)
}

/// The semi-join projection of table `table` of group `group`: `rows` are
/// values of the local attributes `attrs` of the site's new or modified
/// tuples; each goes to every global attribute it maps onto, converted.
pub fn semijoin(
    group: usize,
    table: usize,
    t: &GlobalTable,
    rm: &RelationMapping,
    attrs: &[String],
    rows: &[Vec<Value>],
) -> Result<v1::SemiJoin> {
    let mut columns = Vec::new();
    // (index into attrs, conversion target) per wire column.
    let mut sources = Vec::new();
    for (i, a) in attrs.iter().enumerate() {
        for (p, m) in rm.targets(a) {
            columns.push(v1::ColumnRef {
                var: t.parts[p].var.clone(),
                attr: m.global.clone(),
            });
            sources.push((i, m));
        }
    }
    let converted = rows
        .iter()
        .map(|row| {
            sources
                .iter()
                .map(|(i, m)| {
                    let v = row.get(*i).cloned().unwrap_or(Value::Null);
                    let what = format!("{}.{}", rm.local.name, m.local);
                    match m.to_global {
                        Some(c) => c.apply(&v, m.global_type, &what).map_err(Error::from),
                        None => m.global_type.check(v, &what).map_err(Error::from),
                    }
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(v1::SemiJoin {
        group: group as u32,
        table: table as u32,
        rows: Some(
            encode_rows(columns.len(), &converted).map_err(|e| Error::Invalid(e.to_string()))?,
        ),
        columns,
    })
}

/// Fetched tuples of one local range variable, mapped back to the site's
/// relation.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalTuples {
    /// The local range variable.
    pub local_var: String,
    /// Its local relation.
    pub local_relation: String,
    /// Per tuple: the global tuple id of each part (0 where absent) and the
    /// values in the local attribute order (NULL where not mapped).
    pub tuples: Vec<(Vec<u64>, Vec<Value>)>,
    /// Per tuple: the owner's site number (0 where the reply names none).
    pub owners: Vec<u32>,
}

/// Maps a fetch reply back to local tuples.
pub fn map_back(
    reply: &v1::FetchReply,
    query: &GlobalQuery,
    mapping: &SiteMapping,
) -> Result<Vec<LocalTuples>> {
    let mut out = Vec::new();
    for t in &reply.tables {
        let table = query
            .groups
            .get(t.group as usize)
            .and_then(|g| g.tables.get(t.table as usize))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "reply names table {} of group {}, not asked for",
                    t.table, t.group
                ))
            })?;
        let rm = mapping
            .relation(&table.local_relation)
            .ok_or_else(|| Error::Invalid(format!("{} is not mapped", table.local_relation)))?;
        if t.parts.len() != rm.parts.len() {
            return Err(Error::Invalid(format!(
                "reply has {} parts for {}, which maps onto {}",
                t.parts.len(),
                rm.local.name,
                rm.parts.len()
            )));
        }
        let mut parts = Vec::new();
        for (p, m) in t.parts.iter().zip(&rm.parts) {
            let rows = p
                .values
                .as_ref()
                .map_or(Ok(Vec::new()), |r| decode_rows(m.attrs.len(), r))
                .map_err(|e| Error::Invalid(e.to_string()))?;
            if rows.len() != t.count as usize || p.tuple_ids.len() != t.count as usize {
                return Err(Error::Invalid("reply rows and tuple ids disagree".into()));
            }
            parts.push((p.tuple_ids.clone(), rows));
        }
        let mut tuples = Vec::new();
        for i in 0..t.count as usize {
            let ids: Vec<u64> = parts.iter().map(|(ids, _)| ids[i]).collect();
            let values: Vec<Option<Vec<Value>>> = parts
                .iter()
                .map(|(ids, rows)| (ids[i] != 0).then(|| rows[i].clone()))
                .collect();
            tuples.push((ids, rm.map_back(&values)?));
        }
        let mut owners = t.owners.clone();
        owners.resize(tuples.len(), 0);
        out.push(LocalTuples {
            local_var: table.local_var.clone(),
            local_relation: table.local_relation.clone(),
            tuples,
            owners,
        });
    }
    Ok(out)
}
