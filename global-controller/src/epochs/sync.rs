//! A patient's sync at the coordinator (docs/protocol.md, "A patient's
//! sync"): the ask sent on one site's Subscribe stream, its report matched
//! to the waiting caller, the owner's push committed as an epoch of its own.
//!
//! A site subscribed to another controller on the same (PostgreSQL) store
//! is asked through the store: the ask is left in `snaps_sync_asks`, that
//! controller's watch takes it at its next tick and sends it on, and the
//! answer comes back the same way.

use std::time::{Duration, Instant};

use snaps_proto::v1;
use snaps_schema::SiteNo;

use super::{Coordinator, now_ms};
use crate::acl::AuditRecord;
use crate::error::{Error, Result};
use crate::store::{CommitSummary, Push, SiteId, StoredAsk};

/// How long a patient's sync waits for the site it asked.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// How often an ask left in the store is looked at for its answer.
const POLL: Duration = Duration::from_millis(50);

/// A sync ask awaiting its site's report.
pub struct Pending {
    /// The site asked.
    pub site: SiteNo,
    /// Asked to bring (else to push).
    pub bring: bool,
    /// The audit record the sync's commit writes.
    pub audit: AuditRecord,
    reply: Reply,
    asked: Instant,
}

/// Where a report's outcome goes.
enum Reply {
    /// To a caller waiting at this controller.
    Here(tokio::sync::oneshot::Sender<Result<SyncAnswer>>),
    /// Into the store, for the controller that asked.
    Stored,
}

/// What a site's report to a sync ask came to.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SyncAnswer {
    /// The epoch the owner's push was committed in.
    pub epoch: u64,
    /// The commit.
    pub commit: CommitSummary,
    /// The owner holds no such patient.
    pub unknown: bool,
    /// Tuples the bringing site stored.
    pub brought: u64,
}

/// An answer as the store keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
enum Stored {
    Answered(SyncAnswer),
    Failed(String),
}

/// The first request number of a controller: its start time and name, so
/// the numbers of the controllers on one store do not meet.
pub(super) fn first_request(me: &str) -> u64 {
    let tag = me.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) & 0xff;
    ((now_ms().max(0) as u64) << 20) | (tag << 12)
}

impl Coordinator {
    /// Sync asks, each for one site's Subscribe stream (by site number).
    pub fn asks(&self) -> tokio::sync::broadcast::Receiver<(u32, v1::EpochNotice)> {
        self.asks.subscribe()
    }

    /// Sends `ask` to `site` over its Subscribe stream — through the store
    /// when the site is subscribed to another controller — and waits for
    /// its report (see [`Coordinator::answered`]). Refused when the site
    /// keeps no stream open at any controller; given up after
    /// [`SYNC_TIMEOUT`].
    pub async fn ask(
        &self,
        site: &SiteId,
        mut ask: v1::SyncAsk,
        audit: AuditRecord,
    ) -> Result<SyncAnswer> {
        let request = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ask.request = request;
        if self.connected_sites().contains(&site.number.0) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.pending_map().insert(
                request,
                Pending {
                    site: site.number,
                    bring: ask.bring,
                    audit,
                    reply: Reply::Here(tx),
                    asked: Instant::now(),
                },
            );
            self.send_ask(site.number, ask);
            let outcome = tokio::time::timeout(SYNC_TIMEOUT, rx).await;
            self.pending_map().remove(&request);
            return match outcome {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(Error::Internal("the sync ask was dropped".into())),
                Err(_) => Err(not_answered(site)),
            };
        }
        let since = now_ms() - 3 * self.config.refresh.watch.as_millis() as i64;
        let elsewhere = self.blocking(move |s| s.subscribed(since)).await?;
        if !elsewhere.contains(&site.number) {
            return Err(Error::FailedPrecondition(format!(
                "{} is offline (it keeps no connection to the global controller): try again \
                 when it is back, or wait for the night's refresh",
                site.code
            )));
        }
        let stored = StoredAsk {
            request,
            site: site.number,
            ask: prost::Message::encode_to_vec(&ask),
            audit,
        };
        self.blocking(move |s| s.post_sync_ask(&stored)).await?;
        let deadline = Instant::now() + SYNC_TIMEOUT + self.config.refresh.watch;
        while Instant::now() < deadline {
            if let Some(json) = self.blocking(move |s| s.sync_answer(request)).await? {
                return match serde_json::from_str(&json) {
                    Ok(Stored::Answered(a)) => Ok(a),
                    Ok(Stored::Failed(m)) => Err(Error::FailedPrecondition(m)),
                    Err(e) => Err(Error::Internal(format!("a stored sync answer: {e}"))),
                };
            }
            tokio::time::sleep(POLL).await;
        }
        Err(not_answered(site))
    }

    /// Hands the asks left in the store for the sites subscribed here to
    /// their streams (the watch, every tick), and forgets asks whose site
    /// never reported.
    pub(super) async fn forward_stored_asks(&self, sites: Vec<SiteNo>) -> Result<()> {
        self.pending_map()
            .retain(|_, p| p.asked.elapsed() < SYNC_TIMEOUT * 2);
        for stored in self.blocking(move |s| s.take_sync_asks(&sites)).await? {
            let ask = match <v1::SyncAsk as prost::Message>::decode(stored.ask.as_slice()) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(request = stored.request, error = %e, "a stored sync ask is unreadable");
                    continue;
                }
            };
            self.pending_map().insert(
                stored.request,
                Pending {
                    site: stored.site,
                    bring: ask.bring,
                    audit: stored.audit,
                    reply: Reply::Stored,
                    asked: Instant::now(),
                },
            );
            self.send_ask(stored.site, ask);
        }
        Ok(())
    }

    fn send_ask(&self, site: SiteNo, ask: v1::SyncAsk) {
        let (epoch, phase) = {
            let n = self.notice.borrow();
            (n.epoch, n.phase)
        };
        let notice = v1::EpochNotice {
            epoch,
            phase,
            sync: Some(ask),
        };
        let _ = self.asks.send((site.0, notice));
    }

    /// The ask numbered `request` that `site` answers, taken out of those
    /// pending; `None` when no such ask awaits that site.
    pub fn answered(&self, request: u64, site: SiteNo) -> Option<(u64, Pending)> {
        let mut pending = self.pending_map();
        match pending.get(&request) {
            Some(p) if p.site == site => pending.remove(&request).map(|p| (request, p)),
            _ => None,
        }
    }

    /// Hands a report's outcome to whoever asked: a caller here, or the
    /// controller that left the ask in the store.
    pub async fn answer(&self, (request, pending): (u64, Pending), outcome: Result<SyncAnswer>) {
        match pending.reply {
            Reply::Here(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Stored => {
                let stored = match outcome {
                    Ok(a) => Stored::Answered(a),
                    Err(e) => Stored::Failed(e.to_string()),
                };
                let json = serde_json::to_string(&stored).unwrap_or_default();
                if let Err(e) = self
                    .blocking(move |s| s.answer_sync_ask(request, &json))
                    .await
                {
                    tracing::warn!(request, error = %e, "the answer to a sync ask was not stored");
                }
            }
        }
    }

    fn pending_map(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits an owner's push of one patient as an epoch of its own
    /// ([`crate::store::GlobalStore::sync_epoch`]), holding the refresh
    /// lease meanwhile; refused while an epoch runs.
    pub async fn commit_sync(
        &self,
        site: &SiteId,
        push: Push,
        audit: AuditRecord,
    ) -> Result<(u64, CommitSummary)> {
        let Ok(_one) = self.running.try_lock() else {
            return Err(Error::FailedPrecondition(
                "the network is refreshing: the patient's changes come with the epoch under way"
                    .into(),
            ));
        };
        self.renew().await?;
        let s = site.clone();
        let out = self
            .blocking(move |st| st.sync_epoch(&s, &push, &audit))
            .await;
        let me = self.me.clone();
        if let Err(e) = self.blocking(move |s| s.release_lease(&me)).await {
            tracing::warn!(error = %e, "giving up the refresh lease failed (it runs out by itself)");
        }
        let out = out?;
        if out.0 > 0 {
            self.quietly_closed(out.0);
        }
        Ok(out)
    }
}

fn not_answered(site: &SiteId) -> Error {
    Error::FailedPrecondition(format!(
        "{} did not answer within {} s (it may be busy or restarting): try again",
        site.code,
        SYNC_TIMEOUT.as_secs()
    ))
}
