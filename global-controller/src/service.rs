//! The gRPC service: authenticates each request by its credential, decodes
//! and checks it, runs it on the store off the async threads, and counts the
//! bytes each site sends and receives.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use prost::Message;
use snaps_proto::v1::global_snapshot_server::GlobalSnapshot;
use snaps_proto::{encode_rows, v1};
use snaps_schema::identity::IdentitySpec;
use snaps_schema::include::IncludeEdge;
use snaps_schema::summary::{SummaryKind, SummarySpec, encode_sorted};
use snaps_schema::{RelationMode, SiteNo, Value};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::acl::{Acl, AuditFilter, AuditRecord, Right, Subject};
use crate::config::GlobalConfig;
use crate::epochs::{Coordinator, SyncAnswer};
use crate::error::Error;
use crate::matching::Grade;
use crate::query::FetchQuery;
use crate::store::{
    Activity, FetchedTable, GlobalStore, IdentityLink, IdentityRecord, LoadBatch, LockOutcome,
    Push, Refusal, SiteId, SummaryDelta, SummaryRequest, TupleRef,
};
use crate::transport::Certified;
use snaps_proto::tls::Peer;

/// Largest message either side accepts: a fetch of many tuples can be big.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Replies smaller than this go uncompressed: gzip's header and trailer
/// alone are 18 bytes, more than it saves on a small message.
pub const COMPRESS_FROM_BYTES: usize = 512;

/// A reply, compressed only when that saves bytes.
fn respond<T: Message>(message: T) -> Response<T> {
    let small = message.encoded_len() < COMPRESS_FROM_BYTES;
    let mut r = Response::new(message);
    if small {
        r.extensions_mut()
            .insert(tonic::codec::SingleMessageCompressionOverride::Disable);
    }
    r
}

/// The metadata key naming the site a request claims to come from.
pub const SITE_HEADER: &str = "snaps-site";

/// Refuses a request on a connection whose certificate was revoked after
/// the connection was made.
fn refuse_revoked(certified: &Certified) -> Result<(), Status> {
    match certified.revoked() {
        Some(message) => {
            tracing::warn!(remote = %certified.remote, %message, "refused: revoked certificate");
            Err(Status::permission_denied(message))
        }
        None => Ok(()),
    }
}

/// The metadata key sites send their token under in plain-text mode.
/// HTTP/2's header compression never indexes `authorization`, so a token
/// there crosses the line whole with every call; under this name it is
/// sent once per connection and named by an index after that (the
/// connection is plain text: anyone on the path reads it either way).
pub const TOKEN_HEADER: &str = "snaps-token";

/// The bearer token of a request, if it sends one (`snaps-token`, or
/// `authorization: Bearer`).
fn bearer<T>(req: &Request<T>) -> Result<Option<&str>, Status> {
    if let Some(t) = req.metadata().get(TOKEN_HEADER) {
        return t
            .to_str()
            .map(|t| Some(t.trim()))
            .map_err(|_| Status::unauthenticated("the token is not text"));
    }
    match req.metadata().get("authorization") {
        None => Ok(None),
        Some(h) => h
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(|t| Some(t.trim()))
            .ok_or_else(|| Status::unauthenticated("the credential is not a bearer token")),
    }
}

/// The global snapshot service.
pub struct Service {
    config: Arc<GlobalConfig>,
    store: Arc<dyn GlobalStore>,
    coordinator: Arc<Coordinator>,
    activity: Arc<Mutex<HashMap<u32, Activity>>>,
    /// The access rules in force (kept in the store, changed only through
    /// Grant and Revoke).
    acl: Arc<std::sync::RwLock<Acl>>,
    /// The summaries the network declares (`network.toml`).
    summaries: Arc<Vec<SummarySpec>>,
    /// The include trees the network declares (`network.toml`).
    includes: Arc<Vec<IncludeEdge>>,
    /// Who may be the same person (`[identity]` of `network.toml`).
    identity: Option<Arc<IdentitySpec>>,
}

fn summary_to_wire(d: &SummaryDelta) -> v1::Summary {
    let kind = match d.spec.kind {
        SummaryKind::Keys => v1::SummaryKind::Keys,
        SummaryKind::Lookup => v1::SummaryKind::Lookup,
    };
    v1::Summary {
        kind: kind as i32,
        relation: d.spec.relation.clone(),
        attributes: d.spec.attributes.clone(),
        first: d.range.map_or(0, |r| r.first),
        last: d.range.map_or(0, |r| r.last),
        added: encode_sorted(&d.added),
        removed: encode_sorted(&d.removed),
    }
}

/// The metadata key of an UNAVAILABLE reply sent while an epoch collects:
/// the site answers from local data, knowing nothing was recorded.
pub const REFRESHING: &str = "snaps-refreshing-epoch";

impl Service {
    /// A service over a store, its epochs run by `coordinator`.
    pub fn new(
        config: Arc<GlobalConfig>,
        store: Arc<dyn GlobalStore>,
        coordinator: Arc<Coordinator>,
    ) -> crate::Result<Service> {
        let acl = Acl::new(config.access_default, store.acl_rules()?);
        let summaries = config
            .network
            .summary_specs()
            .map_err(|e| crate::Error::Config(e.to_string()))?;
        let includes = config
            .network
            .include_edges()
            .map_err(|e| crate::Error::Config(e.to_string()))?;
        let identity = config
            .network
            .identity_spec()
            .map_err(|e| crate::Error::Config(e.to_string()))?
            .map(Arc::new);
        Ok(Service {
            summaries: Arc::new(summaries),
            includes: Arc::new(includes),
            identity,
            config,
            store,
            coordinator,
            activity: Arc::new(Mutex::new(HashMap::new())),
            acl: Arc::new(std::sync::RwLock::new(acl)),
        })
    }

    fn acl(&self) -> std::sync::RwLockReadGuard<'_, Acl> {
        self.acl.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses a request of `user` at `site` on `relations` that needs
    /// `need`, naming the relation, and records the refusal.
    async fn check_access(
        &self,
        site: &SiteId,
        user: &str,
        relations: &[String],
        need: Right,
        action: &str,
    ) -> Result<(), Status> {
        let denied = self
            .acl()
            .denied(relations.iter().map(String::as_str), &site.code, user, need)
            .map(|(r, has)| (r.to_string(), has));
        let Some((relation, has)) = denied else {
            return Ok(());
        };
        let who = if user.is_empty() {
            format!("site {}", site.code)
        } else {
            format!("user {user} at site {}", site.code)
        };
        let verb = if need == Right::Write { "lock" } else { "read" };
        let message = format!(
            "access denied: {who} may not {verb} {relation} (its right is {has}); ask the \
             network's administrator for a grant"
        );
        let mut record = AuditRecord::new(&site.code, user, action);
        record.relations = relations.to_vec();
        record.detail = message.clone();
        self.blocking(move |store| store.append_audit(&[record]))
            .await?;
        tracing::warn!(site = %site.code, user, %relation, "access denied");
        Err(Status::permission_denied(message))
    }

    /// Evaluates a checked fetch for `site` and records it in the audit
    /// trail (as `action`) before anything leaves: the encoded tables and
    /// the number of tuples.
    async fn fetch_audited(
        &self,
        site: &SiteId,
        user: &str,
        relations: Vec<String>,
        query: FetchQuery,
        action: &str,
    ) -> Result<(Vec<v1::TableTuples>, usize), Status> {
        let widths: Vec<Vec<Vec<usize>>> = query
            .groups
            .iter()
            .map(|g| {
                g.tables
                    .iter()
                    .map(|t| t.shape.parts.iter().map(|p| p.columns.len()).collect())
                    .collect()
            })
            .collect();
        // Where each returned part carries the patient key, for the audit.
        let patient_columns: Vec<Vec<Vec<Option<usize>>>> = query
            .groups
            .iter()
            .map(|g| {
                g.tables
                    .iter()
                    .map(|t| {
                        t.shape
                            .parts
                            .iter()
                            .map(|p| p.columns.iter().position(|c| *c == self.config.patient_key))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let s = site.clone();
        let mut base = AuditRecord::new(&site.code, user, action);
        base.relations = relations;
        let tables = self
            .blocking(move |store| {
                // Nothing leaves unrecorded: the record is appended in the
                // fetch's own transaction, so an audit that cannot be
                // written fails the fetch.
                store.fetch_audited(&s, &query, &mut |tables| {
                    let mut record = base.clone();
                    let mut patients = std::collections::BTreeSet::new();
                    for t in tables {
                        record.tuples += t.len() as u64;
                        let columns = &patient_columns[t.group][t.table];
                        for (part, column) in t.parts.iter().zip(columns) {
                            let Some(c) = column else { continue };
                            for row in &part.rows {
                                if let Some(v) = row.get(*c).filter(|v| !v.is_null()) {
                                    patients.insert(v.to_string());
                                }
                            }
                        }
                    }
                    record.patients = patients.into_iter().collect();
                    record
                })
            })
            .await?;
        let mut out = Vec::new();
        let mut tuples = 0;
        for t in tables {
            tuples += t.len();
            let w = &widths[t.group][t.table];
            out.push(encode_table(t, w)?);
        }
        Ok((out, tuples))
    }

    /// The summaries `site` may be told of: those of relations the access
    /// rules let it read (as a site, whoever its users are), each key
    /// summary with the site's own range.
    fn summary_request(&self, site: &SiteId, version: u64) -> Result<SummaryRequest, Status> {
        let me = self
            .config
            .network
            .site(&site.code)
            .map_err(|e| Status::internal(e.to_string()))?;
        let acl = self.acl();
        let specs = self
            .summaries
            .iter()
            .filter(|s| {
                acl.denied(
                    std::iter::once(s.relation.as_str()),
                    &site.code,
                    "",
                    Right::Read,
                )
                .is_none()
            })
            .map(|s| (s.clone(), s.range_of.as_ref().map(|r| me.key_range(r))))
            .collect();
        Ok(SummaryRequest { version, specs })
    }

    /// Whether `site` (as a site, whoever its users are) may be told of the
    /// links between records of the relation of people: the access rules
    /// let it read that relation.
    fn links_readable(&self, site: &SiteId) -> bool {
        self.identity.as_ref().is_some_and(|spec| {
            self.acl()
                .denied(
                    std::iter::once(spec.relation.as_str()),
                    &site.code,
                    "",
                    Right::Read,
                )
                .is_none()
        })
    }

    /// A site's code by number.
    fn site_code(&self, n: SiteNo) -> String {
        self.config
            .network
            .sites
            .iter()
            .find(|s| s.number == n)
            .map_or_else(|| format!("site {n}"), |s| s.code.to_string())
    }

    fn link_to_wire(&self, l: &IdentityLink) -> v1::IdentityLink {
        v1::IdentityLink {
            key: Some(snaps_proto::encode_value(&Value::Int(l.key))),
            site: self.site_code(l.owner),
            other_key: Some(snaps_proto::encode_value(&Value::Int(l.other_key))),
            other_site: self.site_code(l.other_owner),
            removed: l.removed,
        }
    }

    /// The network's relation of people, or why there is none.
    fn identity(&self, what: &str) -> Result<Arc<IdentitySpec>, Status> {
        self.identity.clone().ok_or_else(|| {
            Status::failed_precondition(format!(
                "network {} declares no [identity] in network.toml: {what} needs to \
                 know which relation holds people and which attributes identify them",
                self.config.network.name
            ))
        })
    }

    /// A patient number of `spec.relation` from the wire.
    fn identity_key(
        &self,
        spec: &IdentitySpec,
        wire: Option<&v1::Value>,
        what: &str,
    ) -> Result<Value, Status> {
        let rel = self
            .config
            .catalog
            .relation(&spec.relation)
            .ok_or_else(|| {
                Status::internal(format!("identity relation {} is not global", spec.relation))
            })?;
        let wire = wire.ok_or_else(|| Status::invalid_argument(format!("{what} is missing")))?;
        let key = rel
            .attribute(&spec.key)
            .ok_or_else(|| Status::internal(format!("{} has no key {}", rel.name, spec.key)))?
            .ty
            .check(
                snaps_proto::decode_value(wire),
                &format!("{}.{}", rel.name, spec.key),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if key.is_null() {
            return Err(Status::invalid_argument(format!(
                "{what} names the patient's {} (not NULL)",
                spec.key
            )));
        }
        Ok(key)
    }

    /// The administrator's name, for the audit trail.
    /// The relation of people and every relation its include tree hangs
    /// below it: what a patient's sync moves.
    fn patient_tree(&self, root: &str) -> Vec<String> {
        let mut out = vec![root.to_string()];
        let mut i = 0;
        while i < out.len() {
            let at = out[i].clone();
            for e in self.includes.iter().filter(|e| e.parent == at) {
                if !out.contains(&e.child) {
                    out.push(e.child.clone());
                }
            }
            i += 1;
        }
        out
    }

    /// The site that owns the patient keyed `key`: the owner of its tuple
    /// in the global snapshot, else the one site whose key range holds it
    /// (a patient registered since the last epoch).
    async fn patient_owner(&self, spec: &IdentitySpec, key: i64) -> Result<SiteId, Status> {
        let (relation, attributes) = (spec.relation.clone(), vec![spec.key.clone()]);
        let owners = self
            .blocking(move |store| {
                store.key_owners(&relation, &attributes, &[vec![Value::Int(key)]])
            })
            .await?;
        let sites = &self.config.network.sites;
        let owner = match owners.into_iter().next().flatten() {
            Some(code) => sites.iter().find(|s| s.code.as_str() == code),
            None => {
                let mut ranged = sites.iter().filter(|s| {
                    s.keys.contains(key) || s.key_ranges.values().any(|r| r.contains(key))
                });
                match (ranged.next(), ranged.next()) {
                    (Some(s), None) => Some(s),
                    _ => None,
                }
            }
        };
        owner
            .map(|s| SiteId {
                number: s.number,
                code: s.code.to_string(),
            })
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no site registers {} {key}: it is not in the global snapshot, and no \
                     site's key range holds it",
                    spec.relation
                ))
            })
    }

    /// Commits an owner's report of a patient's sync: its push as an
    /// epoch of its own, or — nothing to commit — the audit record alone.
    async fn commit_report(
        &self,
        site: &SiteId,
        r: v1::SyncReportRequest,
        mut audit: AuditRecord,
    ) -> Result<SyncAnswer, Status> {
        let push =
            Push::decode(&r.push.unwrap_or_default(), &self.config.catalog).map_err(|e| {
                Status::invalid_argument(format!("{}'s push of the patient: {e}", site.code))
            })?;
        if r.unknown || push.is_empty() {
            // The global snapshot has the patient as the owner does (or
            // neither has him): the call is audited all the same.
            let what = if r.unknown {
                "no such patient there"
            } else {
                "nothing changed since the last epoch"
            };
            audit.detail = format!("{}: {what}", audit.detail);
            self.blocking(move |store| store.append_audit(&[audit]))
                .await?;
            return Ok(SyncAnswer {
                unknown: r.unknown,
                ..Default::default()
            });
        }
        audit.tuples = push.len() as u64;
        let (epoch, commit) = self.coordinator.commit_sync(site, push, audit).await?;
        Ok(SyncAnswer {
            epoch,
            commit,
            ..Default::default()
        })
    }

    fn admin_name<T>(req: &Request<T>) -> String {
        match req.extensions().get::<Certified>().map(|c| &c.peer) {
            Some(Ok(Peer::Admin(name))) => format!("admin:{name}"),
            _ => "admin".to_string(),
        }
    }

    fn acl_reply(&self) -> v1::AclReply {
        let acl = self.acl();
        v1::AclReply {
            rules: acl
                .rules()
                .map(|(s, r)| v1::AclRule {
                    relation: s.relation.clone(),
                    site: s.site.clone(),
                    user: s.user.clone(),
                    right: r.to_wire() as i32,
                })
                .collect(),
            default_right: acl.default_right().to_wire() as i32,
        }
    }

    /// Checks a rule's relation, site and user code.
    fn subject(&self, rule: &v1::AclRule) -> Result<Subject, Status> {
        if self.config.catalog.relation(&rule.relation).is_none() {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a global relation (they are: {})",
                rule.relation,
                self.config
                    .catalog
                    .relations()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if self.config.network.site(&rule.site).is_err() {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a site of the network",
                rule.site
            )));
        }
        if rule.user.len() > 64 || rule.user.chars().any(|c| c.is_control() || c == ',') {
            return Err(Status::invalid_argument(
                "a user code is at most 64 characters, without commas or control characters",
            ));
        }
        Ok(Subject {
            relation: rule.relation.clone(),
            site: rule.site.clone(),
            user: rule.user.clone(),
        })
    }

    /// Refuses fetches and locks while an epoch collects: what they would
    /// read or lock is about to change.
    fn not_collecting(&self) -> Result<(), Status> {
        match self.coordinator.collecting() {
            None => Ok(()),
            Some(epoch) => {
                let mut s = Status::unavailable(format!(
                    "refresh epoch {epoch} is collecting the sites' changes: try again in a moment"
                ));
                if let Ok(v) = epoch.to_string().parse() {
                    s.metadata_mut().insert(REFRESHING, v);
                }
                Err(s)
            }
        }
    }

    /// Checks the administrator's credential: with TLS an administrator's
    /// certificate, in plain-text mode the `[admin]` token.
    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if let Some(certified) = req.extensions().get::<Certified>() {
            refuse_revoked(certified)?;
            return match &certified.peer {
                Ok(Peer::Admin(_)) => Ok(()),
                Ok(Peer::Site(code)) => Err(Status::permission_denied(format!(
                    "site {code}'s certificate is not an administrator's"
                ))),
                Err(reason) => Err(Status::unauthenticated(reason.clone())),
            };
        }
        let Some(expected) = &self.config.admin_token else {
            return Err(Status::permission_denied(
                "no administrator credential is configured ([admin] in global.toml)",
            ));
        };
        let token =
            bearer(req)?.ok_or_else(|| Status::unauthenticated("no administrator credential"))?;
        let same = token.len() == expected.len()
            && token
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "not the administrator's credential",
            ))
        }
    }

    /// A handle that flushes this service's activity.
    pub fn flusher(&self) -> impl Fn() -> crate::Result<()> + Send + Sync + 'static {
        let activity = self.activity.clone();
        let store = self.store.clone();
        move || flush(&activity, store.as_ref())
    }

    /// The site a request comes from: the one its client certificate
    /// names (TLS), or the one its token belongs to (plain text). A token
    /// of another site or a `snaps-site` claim the credential does not
    /// back is refused, so no request can speak for another site.
    fn site<T>(&self, req: &Request<T>) -> Result<SiteId, Status> {
        let token_site = match bearer(req)? {
            Some(token) => Some(
                self.config
                    .site_of_token(token)
                    .ok_or_else(|| Status::unauthenticated("unknown credential"))?
                    .code
                    .to_string(),
            ),
            None => None,
        };
        let code = match req.extensions().get::<Certified>() {
            Some(certified) => {
                refuse_revoked(certified)?;
                let code = match &certified.peer {
                    Ok(Peer::Site(code)) => code.clone(),
                    Ok(Peer::Admin(name)) => {
                        return Err(Status::permission_denied(format!(
                            "administrator {name}'s certificate cannot act for a site"
                        )));
                    }
                    Err(reason) => return Err(Status::unauthenticated(reason.clone())),
                };
                if let Some(other) = token_site.filter(|t| *t != code) {
                    tracing::warn!(site = %code, token_of = %other, remote = %certified.remote, "refused: another site's token on a certified connection");
                    return Err(Status::permission_denied(format!(
                        "the request carries site {other}'s token on a connection certified as \
                         site {code}'s"
                    )));
                }
                code
            }
            None => token_site.ok_or_else(|| {
                Status::unauthenticated(
                    "no credential: send snaps-token: <token> (or authorization: Bearer <token>)",
                )
            })?,
        };
        if let Some(claim) = req.metadata().get(SITE_HEADER) {
            let claim = claim.to_str().unwrap_or("?");
            if claim != code {
                tracing::warn!(site = %code, claims = %claim, "refused: a request claiming another site");
                return Err(Status::permission_denied(format!(
                    "the request claims to come from site {claim}, but its credential is site \
                     {code}'s"
                )));
            }
        }
        let site = self.config.network.site(&code).map_err(|_| {
            Status::permission_denied(format!(
                "the certificate names site {code}, which is not a site of this network"
            ))
        })?;
        Ok(SiteId {
            code: site.code.to_string(),
            number: site.number,
        })
    }

    fn count(&self, site: &SiteId, received: usize, sent: usize) {
        self.tally(site, received, sent, |_| {});
    }

    /// Counts bytes and whatever else `more` adds.
    fn tally(&self, site: &SiteId, received: usize, sent: usize, more: impl FnOnce(&mut Activity)) {
        self.coordinator.count(received, sent);
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        let e = a.entry(site.number.0).or_default();
        more(e);
        e.bytes_received += received as u64;
        e.bytes_sent += sent as u64;
        e.last_seen = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
    }

    /// Puts in place the bodies of the groups `request` names alone, and
    /// keeps the bodies it sends with a name; returns the indices of groups
    /// named by a name the store keeps no body for (then nothing is put in
    /// place).
    async fn resolve_groups(
        &self,
        site: &SiteId,
        request: &mut v1::FetchRequest,
    ) -> Result<Vec<u32>, Status> {
        let mut keep = Vec::new();
        let mut named = Vec::new();
        for (i, g) in request.groups.iter().enumerate() {
            if g.kept == 0 {
                continue;
            }
            if g.tables.is_empty() {
                if !g.joins.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "group {i} names a kept body but has joins of its own"
                    )));
                }
                named.push(u64::from(g.kept));
            } else {
                keep.push((u64::from(g.kept), kept_body(g).encode_to_vec()));
            }
        }
        if keep.is_empty() && named.is_empty() {
            return Ok(Vec::new());
        }
        let s = site.clone();
        let bodies = self
            .blocking(move |store| {
                store.remember_groups(&s, &keep)?;
                store.recall_groups(&s, &named)
            })
            .await?;
        let mut unknown = Vec::new();
        let mut found = Vec::new();
        for (i, g) in request.groups.iter().enumerate() {
            if g.kept == 0 || !g.tables.is_empty() {
                continue;
            }
            match bodies.get(&u64::from(g.kept)) {
                Some(body) => found.push((i, body)),
                None => unknown.push(i as u32),
            }
        }
        if !unknown.is_empty() {
            return Ok(unknown);
        }
        for (i, body) in found {
            let b = v1::Group::decode(body.as_slice()).map_err(|e| {
                Status::internal(format!(
                    "a kept group of site {} is unreadable: {e}",
                    site.code
                ))
            })?;
            request.groups[i].tables = b.tables;
            request.groups[i].joins = b.joins;
        }
        Ok(Vec::new())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn GlobalStore) -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(Status::from)
    }
}

fn flush(activity: &Mutex<HashMap<u32, Activity>>, store: &dyn GlobalStore) -> crate::Result<()> {
    let taken: Vec<(SiteNo, Activity)> = {
        let mut a = activity.lock().unwrap_or_else(|p| p.into_inner());
        a.drain().map(|(n, a)| (SiteNo(n), a)).collect()
    };
    if taken.is_empty() {
        return Ok(());
    }
    store.record_activity(&taken)
}

fn wire_mode(m: RelationMode) -> v1::RelationMode {
    match m {
        RelationMode::ReadOnly => v1::RelationMode::ReadOnly,
        RelationMode::ReadWrite => v1::RelationMode::ReadWrite,
    }
}

fn refs(tuples: &[v1::TupleRef]) -> Result<Vec<TupleRef>, Status> {
    tuples
        .iter()
        .map(|t| TupleRef::decode(t).map_err(Status::from))
        .collect()
}

/// A group as the controller keeps its body: without its name.
fn kept_body(g: &v1::Group) -> v1::Group {
    v1::Group {
        tables: g.tables.clone(),
        joins: g.joins.clone(),
        kept: 0,
    }
}

/// The global relations a checked query's groups read, sorted, once each.
fn relations_read(groups: &[crate::query::Group]) -> BTreeSet<String> {
    groups
        .iter()
        .flat_map(|g| g.tables.iter())
        .flat_map(|t| t.shape.parts.iter().map(|p| p.relation.clone()))
        .collect()
}

fn encode_table(t: FetchedTable, widths: &[usize]) -> Result<v1::TableTuples, Status> {
    let count = t.len() as u32;
    let parts = t
        .parts
        .into_iter()
        .zip(widths)
        .map(|(p, w)| {
            Ok(v1::PartTuples {
                tuple_ids: p.tuple_ids,
                values: Some(
                    encode_rows(*w, &p.rows).map_err(|e| Status::internal(e.to_string()))?,
                ),
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    Ok(v1::TableTuples {
        group: t.group as u32,
        table: t.table as u32,
        count,
        parts,
        owners: t.owners.iter().map(|o| o.0).collect(),
    })
}

#[tonic::async_trait]
impl GlobalSnapshot for Service {
    async fn hello(
        &self,
        req: Request<v1::HelloRequest>,
    ) -> Result<Response<v1::HelloReply>, Status> {
        let site = self.site(&req)?;
        let req_len = req.get_ref().encoded_len();
        let theirs = &req.get_ref().schema_fingerprint;
        let ours = self.config.catalog.fingerprint();
        if *theirs != ours {
            return Err(Error::FailedPrecondition(format!(
                "site {} was configured with global schema {theirs}, the global controller has {ours}",
                site.code
            ))
            .into());
        }
        let conf = self
            .config
            .network
            .site(&site.code)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(site = %site.code, software = %req.get_ref().software, "hello");
        let range = |r: &snaps_schema::KeyRange| v1::KeyRange {
            first: r.first,
            last: r.last,
        };
        let identity = self
            .identity
            .as_deref()
            .filter(|_| self.links_readable(&site));
        let reply = v1::HelloReply {
            network: self.config.network.name.clone(),
            site_code: site.code.clone(),
            site_number: site.number.0,
            keys: Some(range(&conf.keys)),
            key_ranges: conf
                .key_ranges
                .iter()
                .map(|(k, r)| (k.clone(), range(r)))
                .collect(),
            modes: self
                .config
                .modes
                .iter()
                .map(|(r, m)| (r.clone(), wire_mode(*m) as i32))
                .collect(),
            schema_fingerprint: ours,
            sites: self
                .config
                .network
                .sites
                .iter()
                .map(|s| v1::SiteRef {
                    number: s.number.0,
                    code: s.code.to_string(),
                })
                .collect(),
            // Only edges into relations the site may read: a fetch asking
            // for more would be refused whole.
            includes: {
                let acl = self.acl();
                self.includes
                    .iter()
                    .filter(|e| {
                        acl.denied(
                            [e.parent.as_str(), e.child.as_str()],
                            &site.code,
                            "",
                            Right::Read,
                        )
                        .is_none()
                    })
                    .map(|e| v1::IncludeEdge {
                        parent: e.parent.clone(),
                        parent_attribute: e.parent_attribute.clone(),
                        child: e.child.clone(),
                        child_attribute: e.child_attribute.clone(),
                    })
                    .collect()
            },
            identity_relation: identity.map(|s| s.relation.clone()).unwrap_or_default(),
            identity_key: identity.map(|s| s.key.clone()).unwrap_or_default(),
        };
        self.count(&site, req_len, reply.encoded_len());
        Ok(respond(reply))
    }

    async fn load(
        &self,
        req: Request<Streaming<v1::LoadBatch>>,
    ) -> Result<Response<v1::LoadReply>, Status> {
        let site = self.site(&req)?;
        let mut stream = req.into_inner();
        let mut reply = v1::LoadReply::default();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            self.count(&site, batch.encoded_len(), 0);
            let batch = LoadBatch::decode(&batch, &self.config.catalog)?;
            let s = site.clone();
            let outcome = self.blocking(move |store| store.load(&s, &batch)).await?;
            reply.loaded += outcome.loaded;
            reply.already_loaded += outcome.already_loaded;
            reply
                .conflicts
                .extend(outcome.conflicts.into_iter().map(|c| v1::Conflict {
                    relation: c.relation,
                    origin: c.origin,
                    key: c.key.iter().map(snaps_proto::encode_value).collect(),
                    holder_site: c.holder,
                }));
        }
        tracing::info!(site = %site.code, loaded = reply.loaded, already = reply.already_loaded,
            conflicts = reply.conflicts.len(), "load");
        self.count(&site, 0, reply.encoded_len());
        Ok(respond(reply))
    }

    async fn load_progress(
        &self,
        req: Request<v1::LoadProgressRequest>,
    ) -> Result<Response<v1::LoadProgressReply>, Status> {
        let site = self.site(&req)?;
        let relation = req.get_ref().relation.clone();
        let s = site.clone();
        let max_origin = self
            .blocking(move |store| store.load_progress(&s, &relation))
            .await?;
        let reply = v1::LoadProgressReply { max_origin };
        self.count(&site, req.get_ref().encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    async fn fetch(
        &self,
        req: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchReply>, Status> {
        let site = self.site(&req)?;
        self.not_collecting()?;
        let req_len = req.get_ref().encoded_len();
        let mut request = req.into_inner();
        let unknown = self.resolve_groups(&site, &mut request).await?;
        if !unknown.is_empty() {
            tracing::debug!(site = %site.code, groups = unknown.len(), "fetch names groups not kept");
            return Ok(respond(v1::FetchReply {
                tables: Vec::new(),
                unknown_groups: unknown,
            }));
        }
        let query = FetchQuery::decode(&request, &self.config.catalog)?;
        let user = request.user.clone();
        let relations: Vec<String> = relations_read(&query.groups).into_iter().collect();
        self.check_access(&site, &user, &relations, Right::Read, "fetch-denied")
            .await?;
        let (reply_tables, tuples) = self
            .fetch_audited(&site, &user, relations, query, "fetch")
            .await?;
        let reply = v1::FetchReply {
            tables: reply_tables,
            ..Default::default()
        };
        tracing::debug!(site = %site.code, tuples, "fetch");
        self.tally(&site, req_len, reply.encoded_len(), |a| {
            a.fetches += 1;
            a.tuples_sent += tuples as u64;
        });
        Ok(respond(reply))
    }

    async fn lock(&self, req: Request<v1::LockRequest>) -> Result<Response<v1::LockReply>, Status> {
        let site = self.site(&req)?;
        self.not_collecting()?;
        let tuples = refs(&req.get_ref().tuples)?;
        let user = req.get_ref().user.clone();
        let mut relations: Vec<String> = tuples.iter().map(|t| t.relation.clone()).collect();
        relations.sort();
        relations.dedup();
        self.check_access(&site, &user, &relations, Right::Write, "lock-denied")
            .await?;
        let s = site.clone();
        let mut record = AuditRecord::new(&site.code, &user, "lock");
        record.relations = relations;
        record.tuples = tuples.len() as u64;
        record.detail = tuples
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let outcome = self
            .blocking(move |store| {
                store.lock_audited(&s, &tuples, &mut |outcome| {
                    let mut r = record.clone();
                    if let LockOutcome::Refused { tuple, holder, .. } = outcome {
                        r.action = "lock-refused".into();
                        r.detail = format!("{tuple} (held by or belonging to site {holder})");
                    }
                    r
                })
            })
            .await?;
        let granted = outcome == LockOutcome::Granted;
        let reply = match outcome {
            LockOutcome::Granted => v1::LockReply {
                granted: true,
                ..Default::default()
            },
            LockOutcome::Refused {
                tuple,
                reason,
                holder,
            } => {
                let (r, message) = match reason {
                    Refusal::Locked => (
                        v1::RefusalReason::Locked,
                        format!("{tuple} is locked by site {holder}"),
                    ),
                    Refusal::ReadOnly => (
                        v1::RefusalReason::ReadOnly,
                        format!(
                            "{} is read-only for every site but the owner; {tuple} belongs to site {holder}",
                            tuple.relation
                        ),
                    ),
                };
                v1::LockReply {
                    granted: false,
                    refused: Some(tuple.encode()),
                    reason: r as i32,
                    holder_site: holder,
                    message,
                }
            }
        };
        self.tally(
            &site,
            req.get_ref().encoded_len(),
            reply.encoded_len(),
            |a| {
                if granted {
                    a.locks_granted += 1;
                } else {
                    a.locks_refused += 1;
                }
            },
        );
        Ok(respond(reply))
    }

    async fn key_owners(
        &self,
        req: Request<v1::KeyOwnersRequest>,
    ) -> Result<Response<v1::KeyOwnersReply>, Status> {
        let site = self.site(&req)?;
        let r = req.get_ref();
        let rel = self.config.catalog.relation(&r.relation).ok_or_else(|| {
            Status::invalid_argument(format!("unknown global relation {:?}", r.relation))
        })?;
        // Only a relation's key may be asked about: the answer says who owns
        // a tuple, never anything of its other attributes.
        let mut asked: Vec<&str> = r.attributes.iter().map(String::as_str).collect();
        let mut key: Vec<&str> = rel.key.iter().map(String::as_str).collect();
        asked.sort_unstable();
        key.sort_unstable();
        if key.is_empty() || asked != key {
            return Err(Status::invalid_argument(format!(
                "{} is not the key of {} (its key is ({}))",
                r.attributes.join(", "),
                rel.name,
                rel.key.join(", ")
            )));
        }
        let wire = r.keys.clone().unwrap_or_default();
        let rows = snaps_proto::decode_rows(r.attributes.len(), &wire)
            .map_err(|e| Status::invalid_argument(format!("keys of {}: {e}", rel.name)))?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let checked = row
                .into_iter()
                .zip(&r.attributes)
                .map(|(v, a)| {
                    let attr = rel.attribute(a).ok_or_else(|| {
                        Status::invalid_argument(format!("{} has no attribute {a}", rel.name))
                    })?;
                    attr.ty
                        .check(v, &format!("{}.{a}", rel.name))
                        .map_err(|e| Status::invalid_argument(e.to_string()))
                })
                .collect::<Result<Vec<_>, Status>>()?;
            keys.push(checked);
        }
        let relation = rel.name.clone();
        let attributes = r.attributes.clone();
        let owners = self
            .blocking(move |store| store.key_owners(&relation, &attributes, &keys))
            .await?;
        let reply = v1::KeyOwnersReply {
            owners: owners.into_iter().map(Option::unwrap_or_default).collect(),
        };
        self.count(&site, req.get_ref().encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    async fn unlock(
        &self,
        req: Request<v1::UnlockRequest>,
    ) -> Result<Response<v1::UnlockReply>, Status> {
        let site = self.site(&req)?;
        let tuples = refs(&req.get_ref().tuples)?;
        let s = site.clone();
        let released = self
            .blocking(move |store| store.unlock(&s, &tuples))
            .await?;
        let reply = v1::UnlockReply { released };
        self.count(&site, req.get_ref().encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    async fn release_copies(
        &self,
        req: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseReply>, Status> {
        let site = self.site(&req)?;
        let tuples = refs(&req.get_ref().tuples)?;
        let s = site.clone();
        let released = self
            .blocking(move |store| store.release_copies(&s, &tuples))
            .await?;
        let reply = v1::ReleaseReply { released };
        self.count(&site, req.get_ref().encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    async fn r#match(
        &self,
        req: Request<v1::MatchRequest>,
    ) -> Result<Response<v1::MatchReply>, Status> {
        let site = self.site(&req)?;
        let r = req.get_ref();
        let spec = self.identity("snaps_match")?;
        let key = self.identity_key(&spec, r.key.as_ref(), "a match")?;
        let user = r.user.clone();
        let relations = vec![spec.relation.clone()];
        self.check_access(&site, &user, &relations, Right::Read, "match-denied")
            .await?;
        let mut record = AuditRecord::new(&site.code, &user, "match");
        record.relations = relations;
        let (k, s) = (key.clone(), spec.clone());
        let found = self
            .blocking(move |store| store.identity_candidates(&s, &k))
            .await?;
        let Some((subject, records)) = found else {
            return Err(Status::not_found(format!(
                "no {} with {} = {key} in the global snapshot (a patient registered since the \
                 last refresh reaches it with the next)",
                spec.relation, spec.key
            )));
        };
        let mut candidates: Vec<(f64, Grade, IdentityRecord)> = records
            .into_iter()
            .filter_map(|c| {
                let v = crate::matching::compare(&subject.person, &c.person);
                match (c.linked, v.grade) {
                    (true, _) => Some((v.score, Grade::Linked, c)),
                    (false, g) => g.map(|g| (v.score, g, c)),
                }
            })
            .collect();
        // Confirmed links first, then best score.
        candidates.sort_by(|a, b| {
            (b.1 == Grade::Linked)
                .cmp(&(a.1 == Grade::Linked))
                .then_with(|| b.0.total_cmp(&a.0))
                .then_with(|| a.2.owner.cmp(&b.2.owner))
                .then_with(|| a.2.key.to_string().cmp(&b.2.key.to_string()))
        });
        let code = |n: SiteNo| self.site_code(n);
        let reply = v1::MatchReply {
            owner: code(subject.owner),
            key_attribute: spec.key.clone(),
            candidates: candidates
                .iter()
                .map(|(score, grade, c)| v1::MatchCandidate {
                    site: code(c.owner),
                    key: Some(snaps_proto::encode_value(&c.key)),
                    grade: grade.as_str().to_string(),
                    score: *score,
                })
                .collect(),
        };
        // Nothing leaves unrecorded: the patient asked about and every
        // record named in the answer.
        record.tuples = candidates.len() as u64;
        record.patients = std::iter::once(&subject.key)
            .chain(candidates.iter().map(|(.., c)| &c.key))
            .map(Value::to_string)
            .collect();
        record.detail = format!("{} {} at {}", spec.key, subject.key, reply.owner);
        self.blocking(move |store| store.append_audit(&[record]))
            .await?;
        self.count(&site, r.encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    async fn link(&self, req: Request<v1::LinkRequest>) -> Result<Response<v1::LinkReply>, Status> {
        let site = self.site(&req)?;
        let r = req.get_ref();
        let verb = if r.unlink {
            "snaps_unlink"
        } else {
            "snaps_link"
        };
        let spec = self.identity(verb)?;
        let key = self.identity_key(&spec, r.key.as_ref(), "a link")?;
        let other = self.identity_key(&spec, r.other_key.as_ref(), "a link's other record")?;
        let (Value::Int(k), Value::Int(o)) = (&key, &other) else {
            return Err(Status::internal(format!(
                "{}.{} is not an integer",
                spec.relation, spec.key
            )));
        };
        let other_site = SiteId {
            number: self
                .config
                .network
                .site(&r.other_site)
                .map_err(|e| Status::invalid_argument(format!("{verb}: {e}")))?
                .number,
            code: r.other_site.clone(),
        };
        let user = r.user.clone();
        let relations = vec![spec.relation.clone()];
        let action = if r.unlink { "unlink" } else { "link" };
        self.check_access(
            &site,
            &user,
            &relations,
            Right::Read,
            &format!("{action}-denied"),
        )
        .await?;
        let (s, sp, u, unlink, k, o) = (site.clone(), spec.clone(), user.clone(), r.unlink, *k, *o);
        let codes = (site.code.clone(), other_site.code.clone());
        let audit = move |link: &IdentityLink| {
            let mut record = AuditRecord::new(&codes.0, &u, action);
            record.relations = vec![sp.relation.clone()];
            record.tuples = 2;
            record.patients = vec![link.key.to_string(), link.other_key.to_string()];
            // The key asked from is this site's record.
            let (mine, theirs) = if link.key == k {
                (link.key, link.other_key)
            } else {
                (link.other_key, link.key)
            };
            record.detail = format!(
                "{} {mine} at {} and {theirs} at {}",
                sp.key, codes.0, codes.1
            );
            record
        };
        let (spec2, user2) = (spec.clone(), user.clone());
        let (link, changed) = self
            .blocking(move |store| {
                let mut audit = audit;
                store.link(
                    &spec2,
                    k,
                    (o, &other_site),
                    (&s, &user2),
                    unlink,
                    &mut audit,
                )
            })
            .await?;
        let wire = self.link_to_wire(&link);
        let reply = v1::LinkReply {
            link: Some(wire),
            changed,
        };
        self.count(&site, r.encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let site = self.site(&req)?;
        let flush = self.flusher();
        let report = self
            .blocking(move |store| {
                flush()?;
                store.status()
            })
            .await?;
        let subscribed: BTreeSet<u32> = self
            .coordinator
            .participants()
            .await?
            .into_iter()
            .map(|s| s.0)
            .collect();
        let reply = v1::StatusReply {
            network: self.config.network.name.clone(),
            relations: report
                .relations
                .into_iter()
                .map(|r| v1::RelationStatus {
                    name: r.name,
                    mode: wire_mode(r.mode) as i32,
                    tuples: r.tuples,
                    locked: r.locked,
                })
                .collect(),
            sites: report
                .sites
                .into_iter()
                .map(|s| v1::SiteStatus {
                    code: s.code,
                    number: s.number,
                    name: s.name,
                    owned_tuples: s.owned_tuples,
                    last_seen: s.last_seen,
                    fetches: s.fetches,
                    tuples_sent: s.tuples_sent,
                    bytes_received: s.bytes_received,
                    bytes_sent: s.bytes_sent,
                    locks_granted: s.locks_granted,
                    locks_refused: s.locks_refused,
                    subscribed: subscribed.contains(&s.number),
                })
                .collect(),
            conflicts: report.conflicts,
        };
        self.count(&site, req.get_ref().encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    type SubscribeStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::EpochNotice, Status>> + Send + 'static>,
    >;

    async fn sync_patient(
        &self,
        req: Request<v1::SyncPatientRequest>,
    ) -> Result<Response<v1::SyncPatientReply>, Status> {
        let r = req.get_ref().clone();
        let admin = !r.for_site.is_empty();
        let (asker, user) = if admin {
            self.admin(&req)?;
            let s = self
                .config
                .network
                .site(&r.for_site)
                .map_err(|e| Status::invalid_argument(format!("snaps sync: {e}")))?;
            let site = SiteId {
                number: s.number,
                code: s.code.to_string(),
            };
            (site, Self::admin_name(&req))
        } else {
            (self.site(&req)?, r.user.clone())
        };
        let spec = self.identity("snaps_sync_patient")?;
        let tree = self.patient_tree(&spec.relation);
        if !admin {
            // Moving another site's changes ahead of the night takes the
            // right to lock the relation of people; bringing them, the
            // right to read the whole tree.
            let people = vec![spec.relation.clone()];
            self.check_access(&asker, &user, &people, Right::Write, "sync-denied")
                .await?;
            self.check_access(&asker, &user, &tree, Right::Read, "sync-denied")
                .await?;
        }
        let owner = self.patient_owner(&spec, r.key).await?;
        let mut reply = v1::SyncPatientReply {
            owner: owner.code.clone(),
            ..Default::default()
        };
        if owner.number != asker.number {
            let mut audit = AuditRecord::new(&asker.code, &user, "sync");
            audit.relations = tree.clone();
            audit.patients = vec![r.key.to_string()];
            audit.detail = format!("{} {} from {}", spec.key, r.key, owner.code);
            let ask = v1::SyncAsk {
                relation: spec.relation.clone(),
                attribute: spec.key.clone(),
                key: r.key,
                asked_by: if user.is_empty() {
                    asker.code.clone()
                } else {
                    format!("{} at {}", user, asker.code)
                },
                ..Default::default()
            };
            let answer = self.coordinator.ask(&owner, ask.clone(), audit).await?;
            reply.epoch = answer.epoch;
            reply.pushed = answer.commit.tuples_pushed;
            reply.inserted = answer.commit.inserted;
            reply.updated = answer.commit.updated;
            reply.unknown = answer.unknown;
            tracing::info!(site = %asker.code, owner = %owner.code, key = r.key, epoch = answer.epoch,
                pushed = reply.pushed, "patient synced");
            if admin && !answer.unknown {
                let bring = v1::SyncAsk {
                    bring: true,
                    epoch: answer.epoch,
                    ..ask
                };
                let unaudited = AuditRecord::new(&asker.code, &user, "sync");
                reply.brought = self
                    .coordinator
                    .ask(&asker, bring, unaudited)
                    .await?
                    .brought;
            }
        }
        if !admin {
            self.count(&asker, req.get_ref().encoded_len(), reply.encoded_len());
        }
        Ok(respond(reply))
    }

    async fn sync_report(
        &self,
        req: Request<v1::SyncReportRequest>,
    ) -> Result<Response<v1::SyncReportReply>, Status> {
        let site = self.site(&req)?;
        let size = req.get_ref().encoded_len();
        let r = req.into_inner();
        let pending = self
            .coordinator
            .answered(r.request, site.number)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no sync ask numbered {} awaits {} (it may have timed out)",
                    r.request, site.code
                ))
            })?;
        let (bring, audit) = (pending.1.bring, pending.1.audit.clone());
        let (outcome, refused) = if !r.error.is_empty() {
            let message = format!("{} could not do it: {}", site.code, r.error);
            (Err(Error::FailedPrecondition(message)), None)
        } else if bring {
            let brought = SyncAnswer {
                brought: r.brought,
                ..Default::default()
            };
            (Ok(brought), None)
        } else {
            match self.commit_report(&site, r, audit).await {
                Ok(answer) => (Ok(answer), None),
                Err(status) => (
                    Err(Error::FailedPrecondition(status.message().to_string())),
                    Some(status),
                ),
            }
        };
        let reply = v1::SyncReportReply {
            epoch: outcome.as_ref().map_or(0, |a| a.epoch),
        };
        self.coordinator.answer(pending, outcome).await;
        if let Some(status) = refused {
            return Err(status);
        }
        self.count(&site, size, reply.encoded_len());
        Ok(respond(reply))
    }

    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let site = self.site(&req)?;
        tracing::info!(site = %site.code, "subscribed to refresh epochs");
        let connected = self.coordinator.connect(site.number);
        let notices = tokio_stream::wrappers::WatchStream::new(self.coordinator.notices());
        // Sync asks for this site come between the epochs' notices.
        let me = site.number.0;
        let asks = tokio_stream::wrappers::BroadcastStream::new(self.coordinator.asks())
            .filter_map(move |a| match a {
                Ok((to, n)) if to == me => Some(n),
                _ => None,
            });
        let notices = futures::stream::select(notices, asks);
        let certified = req.extensions().get::<Certified>().cloned();
        // The guard lives as long as the stream: the site counts as
        // connected until it goes away. A certificate revoked meanwhile
        // ends the stream at the next notice.
        let stream = futures::StreamExt::take_until(
            notices.map(move |n| {
                let _ = &connected;
                match certified.as_ref().and_then(Certified::revoked) {
                    Some(message) => Err(Status::permission_denied(message)),
                    None => Ok(n),
                }
            }),
            self.coordinator.closed(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn push(&self, req: Request<v1::PushRequest>) -> Result<Response<v1::PushReply>, Status> {
        let site = self.site(&req)?;
        let body = req.get_ref().encode_to_vec();
        let push = Push::decode(req.get_ref(), &self.config.catalog)?;
        let epoch = req.get_ref().epoch;
        let s = site.clone();
        let mut record = AuditRecord::new(&site.code, "", "push");
        record.relations = push_relations(&push);
        record.tuples = push.len() as u64;
        record.detail = format!("epoch {epoch}");
        self.blocking(move |store| store.stage_push(&s, epoch, &body, &record))
            .await?;
        self.coordinator.wake();
        tracing::info!(site = %site.code, epoch, tuples = push.len(), "push staged");
        let reply = v1::PushReply {
            tuples: push.len() as u64,
        };
        self.count(&site, req.get_ref().encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    async fn changes(
        &self,
        req: Request<v1::ChangesRequest>,
    ) -> Result<Response<v1::ChangesReply>, Status> {
        let site = self.site(&req)?;
        let parts: Vec<(String, Vec<String>)> = req
            .get_ref()
            .parts
            .iter()
            .map(|p| (p.relation.clone(), p.columns.clone()))
            .collect();
        let since = req.get_ref().since;
        let summaries = self.summary_request(&site, req.get_ref().summary_version)?;
        let links_since = req
            .get_ref()
            .links_version
            .filter(|_| self.links_readable(&site));
        let s = site.clone();
        let relation = self.identity.as_ref().map(|i| i.relation.clone());
        let (changes, links) = self
            .blocking(move |store| {
                let links = links_since.map(|v| store.links_since(v)).transpose()?;
                if let Some(l) = links.as_ref().filter(|l| !l.links.is_empty()) {
                    // Which patients a site was told are one person is on
                    // the record, as the summaries are.
                    let mut record = AuditRecord::new(&s.code, "", "links");
                    record.relations = relation.iter().cloned().collect();
                    record.tuples = l.links.len() as u64;
                    record.patients = l
                        .links
                        .iter()
                        .flat_map(|k| [k.key.to_string(), k.other_key.to_string()])
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    record.detail = format!(
                        "version {}{}: {} link(s), {} removed",
                        l.version,
                        if l.whole { " (whole)" } else { "" },
                        l.links.len(),
                        l.links.iter().filter(|k| k.removed).count()
                    );
                    store.append_audit(&[record])?;
                }
                let changes = store.changes(&s, since, &parts, &summaries)?;
                if changes.summaries_whole || !changes.summaries.is_empty() {
                    // Which summaries reached which site is on the record
                    // before they leave, as a fetch's tuples are.
                    let mut record = AuditRecord::new(&s.code, "", "summaries");
                    record.relations = changes
                        .summaries
                        .iter()
                        .map(|d| d.spec.relation.clone())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    let parts: Vec<String> = changes
                        .summaries
                        .iter()
                        .map(|d| {
                            format!("{} +{} -{}", d.spec.name(), d.added.len(), d.removed.len())
                        })
                        .collect();
                    record.detail = format!(
                        "version {}{}: {}",
                        changes.summary_version,
                        if changes.summaries_whole {
                            " (whole)"
                        } else {
                            ""
                        },
                        if parts.is_empty() {
                            "none".to_string()
                        } else {
                            parts.join(", ")
                        }
                    );
                    store.append_audit(&[record])?;
                }
                Ok((changes, links.unwrap_or_default()))
            })
            .await?;
        let resent: usize = changes.changed.iter().map(|c| c.tuple_ids.len()).sum();
        let reply = v1::ChangesReply {
            epoch: changes.epoch,
            committed_push: changes.committed_push,
            changed: changes
                .changed
                .into_iter()
                .map(|c| {
                    Ok(v1::ChangedPart {
                        values: Some(
                            encode_rows(c.columns.len(), &c.rows)
                                .map_err(|e| Status::internal(e.to_string()))?,
                        ),
                        relation: c.relation,
                        columns: c.columns,
                        tuple_ids: c.tuple_ids,
                        origins: c.origins,
                    })
                })
                .collect::<Result<Vec<_>, Status>>()?,
            removed: changes
                .removed
                .into_iter()
                .map(|(relation, tuple_ids)| v1::Removed {
                    relation,
                    tuple_ids,
                })
                .collect(),
            summary_version: changes.summary_version,
            summaries_whole: changes.summaries_whole,
            summaries: changes.summaries.iter().map(summary_to_wire).collect(),
            links_version: links.version,
            links_whole: links.whole,
            links: links.links.iter().map(|l| self.link_to_wire(l)).collect(),
        };
        self.coordinator.count_resent(resent);
        self.count(&site, req.get_ref().encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    async fn refetch(
        &self,
        req: Request<v1::RefetchRequest>,
    ) -> Result<Response<v1::RefetchReply>, Status> {
        let site = self.site(&req)?;
        self.not_collecting()?;
        let req_len = req.get_ref().encoded_len();
        let r = req.into_inner();
        let names = |bytes: &[u8], what: &str| {
            snaps_schema::summary::decode_sorted(bytes)
                .map_err(|e| Status::invalid_argument(format!("the {what} standing names: {e}")))
        };
        let (added, removed) = (names(&r.added, "added")?, names(&r.removed, "removed")?);
        if r.whole && !removed.is_empty() {
            return Err(Status::invalid_argument(
                "a whole set of standing names has nothing to remove",
            ));
        }
        let mut keep = Vec::new();
        for (i, g) in r.bodies.iter().enumerate() {
            if g.kept == 0 || g.tables.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "refetch body {i} has no name or no tables"
                )));
            }
            let body = kept_body(g);
            // Checked now, so a body kept is one a fetch would accept.
            FetchQuery::decode(
                &v1::FetchRequest {
                    groups: vec![body.clone()],
                    ..Default::default()
                },
                &self.config.catalog,
            )?;
            keep.push((u64::from(g.kept), body.encode_to_vec()));
        }
        let s = site.clone();
        let (unknown, standing, bodies) = self
            .blocking(move |store| {
                store.remember_groups(&s, &keep)?;
                let (unknown, standing) = store.change_standing(&s, &added, &removed, r.whole)?;
                Ok((unknown, standing, store.standing_groups(&s)?))
            })
            .await?;
        // What the site may read may have grown since its last night: then
        // every group is evaluated whole, as a re-run would.
        let access = self.acl().fingerprint();
        let whole = r.access != access;
        let mut query = FetchQuery {
            groups: Vec::new(),
            semijoins: Vec::new(),
            include_held: r.include_held,
            changed_after: (!whole).then_some(r.since),
        };
        let mut kept_names = Vec::new();
        let mut relations = BTreeSet::new();
        let mut denied = BTreeSet::new();
        for (name, body) in bodies {
            let group = v1::Group::decode(body.as_slice())
                .map_err(|e| Status::internal(format!("kept group {name} is unreadable: {e}")))?;
            let one = v1::FetchRequest {
                groups: vec![group],
                ..Default::default()
            };
            let mut q = FetchQuery::decode(&one, &self.config.catalog)?;
            let rels = relations_read(&q.groups);
            let refused = self
                .acl()
                .denied(rels.iter().map(String::as_str), &site.code, "", Right::Read)
                .map(|(rel, _)| rel.to_string());
            if let Some(rel) = refused {
                denied.insert(rel);
                continue;
            }
            relations.extend(rels);
            query.groups.push(q.groups.remove(0));
            kept_names.push(name);
        }
        if !denied.is_empty() {
            // As a re-run refused: the copies stay, nothing new comes.
            let denied: Vec<String> = denied.into_iter().collect();
            tracing::warn!(site = %site.code, relations = ?denied, "standing groups not evaluated: access denied");
            let mut record = AuditRecord::new(&site.code, "", "refetch-denied");
            record.detail = format!("site {} may not read {}", site.code, denied.join(", "));
            record.relations = denied;
            self.blocking(move |store| store.append_audit(&[record]))
                .await?;
        }
        let (mut tables, tuples) = if query.groups.is_empty() {
            (Vec::new(), 0)
        } else {
            self.fetch_audited(&site, "", relations.into_iter().collect(), query, "refetch")
                .await?
        };
        for t in &mut tables {
            t.group = kept_names[t.group as usize] as u32;
        }
        let reply = v1::RefetchReply {
            tables,
            unknown_groups: unknown.into_iter().map(|n| n as u32).collect(),
            standing,
            whole,
            access,
        };
        tracing::info!(site = %site.code, groups = kept_names.len(), tuples, whole, "standing groups refetched");
        self.tally(&site, req_len, reply.encoded_len(), |a| {
            a.fetches += 1;
            a.tuples_sent += tuples as u64;
        });
        Ok(respond(reply))
    }

    async fn acknowledge(
        &self,
        req: Request<v1::AcknowledgeRequest>,
    ) -> Result<Response<v1::AcknowledgeReply>, Status> {
        let site = self.site(&req)?;
        let epoch = req.get_ref().epoch;
        let s = site.clone();
        self.blocking(move |store| store.acknowledge(&s, epoch))
            .await?;
        self.coordinator.wake();
        tracing::info!(site = %site.code, epoch, "epoch applied");
        self.count(&site, req.get_ref().encoded_len(), 0);
        Ok(respond(v1::AcknowledgeReply {}))
    }

    async fn resync(
        &self,
        req: Request<v1::ResyncRequest>,
    ) -> Result<Response<v1::ResyncReply>, Status> {
        let site = self.site(&req)?;
        let mut held: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>> =
            Default::default();
        for h in &req.get_ref().held {
            held.entry(h.relation.clone())
                .or_default()
                .extend(h.tuple_ids.iter().copied());
        }
        let s = site.clone();
        let (added, removed) = self.blocking(move |store| store.resync(&s, &held)).await?;
        tracing::info!(site = %site.code, added, removed, "sent-to bits re-synchronised");
        let reply = v1::ResyncReply { added, removed };
        self.count(&site, req.get_ref().encoded_len(), reply.encoded_len());
        Ok(respond(reply))
    }

    type RefreshStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::RefreshProgress, Status>> + Send + 'static>,
    >;

    async fn refresh(
        &self,
        req: Request<v1::RefreshRequest>,
    ) -> Result<Response<Self::RefreshStream>, Status> {
        self.admin(&req)?;
        let coordinator = self.coordinator.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut progress = coordinator.progress();
        let run = tokio::spawn({
            let coordinator = coordinator.clone();
            async move { coordinator.run_epoch().await }
        });
        tokio::spawn(async move {
            let mut run = run;
            loop {
                tokio::select! {
                    changed = progress.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let p = progress.borrow_and_update().clone();
                        if p.summary.is_none() && tx.send(Ok(p)).await.is_err() {
                            break;
                        }
                    }
                    done = &mut run => {
                        let last = match done {
                            Ok(Ok(report)) => Ok(v1::RefreshProgress {
                                epoch: report.epoch,
                                phase: v1::EpochPhase::Closed as i32,
                                done: report.sites.len() as u32,
                                sites: report.sites.len() as u32,
                                summary: Some(report.encode()),
                            }),
                            Ok(Err(e)) => Err(Status::from(e)),
                            Err(e) => Err(Status::internal(format!("refresh task: {e}"))),
                        };
                        let _ = tx.send(last).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn conflicts(
        &self,
        req: Request<v1::ConflictsRequest>,
    ) -> Result<Response<v1::ConflictsReply>, Status> {
        self.admin(&req)?;
        let list = self.blocking(|store| store.conflicts()).await?;
        Ok(respond(v1::ConflictsReply {
            conflicts: list
                .into_iter()
                .map(|c| v1::ConflictEntry {
                    id: c.id,
                    site: c.site,
                    relation: c.relation,
                    origin: c.origin,
                    key: c.key.iter().map(snaps_proto::encode_value).collect(),
                    holder_site: c.holder,
                    recorded_at: c.recorded_at,
                    tuple: c.tuple,
                })
                .collect(),
        }))
    }

    async fn grant(&self, req: Request<v1::AclRule>) -> Result<Response<v1::AclReply>, Status> {
        self.admin(&req)?;
        let subject = self.subject(req.get_ref())?;
        let right = Right::from_wire(req.get_ref().right).ok_or_else(|| {
            Status::invalid_argument("give the right to grant: none, read or write")
        })?;
        let mut record = AuditRecord::new(&Self::admin_name(&req), "", "grant");
        record.relations = vec![subject.relation.clone()];
        record.detail = format!("{} {}{right}", subject.site, user_part(&subject.user));
        let s = subject.clone();
        self.blocking(move |store| store.set_acl(&s, Some(right), &record))
            .await?;
        self.acl
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set(subject, right);
        Ok(respond(self.acl_reply()))
    }

    async fn revoke(&self, req: Request<v1::AclRule>) -> Result<Response<v1::AclReply>, Status> {
        self.admin(&req)?;
        let subject = self.subject(req.get_ref())?;
        if !self.acl().rules().any(|(s, _)| *s == subject) {
            return Err(Status::not_found(format!(
                "no rule for {} at site {}{}",
                subject.relation,
                subject.site,
                if subject.user.is_empty() {
                    String::new()
                } else {
                    format!(" user {}", subject.user)
                }
            )));
        }
        let mut record = AuditRecord::new(&Self::admin_name(&req), "", "revoke");
        record.relations = vec![subject.relation.clone()];
        record.detail = format!("{} {}", subject.site, user_part(&subject.user));
        let s = subject.clone();
        self.blocking(move |store| store.set_acl(&s, None, &record))
            .await?;
        self.acl
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&subject);
        Ok(respond(self.acl_reply()))
    }

    async fn list_acl(
        &self,
        req: Request<v1::ListAclRequest>,
    ) -> Result<Response<v1::AclReply>, Status> {
        self.admin(&req)?;
        Ok(respond(self.acl_reply()))
    }

    async fn audit(
        &self,
        req: Request<v1::AuditRequest>,
    ) -> Result<Response<v1::AuditReply>, Status> {
        self.admin(&req)?;
        let r = req.get_ref();
        let filter = AuditFilter {
            site: (!r.site.is_empty()).then(|| r.site.clone()),
            patient: (!r.patient.is_empty()).then(|| r.patient.clone()),
            since: (r.since != 0).then_some(r.since),
            limit: (r.limit != 0).then_some(r.limit),
        };
        if r.verify {
            let found = self
                .blocking(|store| {
                    while store.seal_audit(SEAL_BATCH)? == SEAL_BATCH as u64 {}
                    store.verify_audit()
                })
                .await?;
            let broken = found.broken.clone();
            return Ok(respond(v1::AuditReply {
                entries: Vec::new(),
                verification: Some(v1::AuditVerification {
                    chained: found.chained,
                    unchained: found.unchained,
                    broken: broken.is_some(),
                    broken_seq: broken.as_ref().map_or(0, |b| b.seq),
                    broken_id: broken.as_ref().map_or(0, |b| b.id),
                    reason: broken.map(|b| b.reason).unwrap_or_default(),
                }),
            }));
        }
        let entries = self.blocking(move |store| store.audit(&filter)).await?;
        Ok(respond(v1::AuditReply {
            entries: entries.iter().map(AuditRecord::to_wire).collect(),
            verification: None,
        }))
    }
}

/// Audit records chained in one store transaction.
pub const SEAL_BATCH: usize = 500;

/// `user CODE ` for a rule about one user, nothing for a whole site.
fn user_part(user: &str) -> String {
    if user.is_empty() {
        String::new()
    } else {
        format!("user {user} ")
    }
}

/// The global relations a push touches.
fn push_relations(push: &Push) -> Vec<String> {
    let mut out: Vec<String> = push
        .inserted
        .iter()
        .chain(&push.updated)
        .flat_map(|b| b.shape.parts.iter().map(|p| p.relation.clone()))
        .chain(push.copies.iter().map(|c| c.relation.clone()))
        .chain(push.deleted.iter().flat_map(|d| d.relations.clone()))
        .chain(push.withdrawn.iter().map(|(r, _)| r.clone()))
        .collect();
    out.sort();
    out.dedup();
    out
}
