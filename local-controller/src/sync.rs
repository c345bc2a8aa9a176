//! One patient, now: the site's part in `snaps_sync_patient` and
//! `snaps sync --site --patient` (docs/protocol.md, "A patient's sync").
//!
//! The asking site calls SyncPatient. The controller sends the patient's
//! owner a sync ask over its Subscribe stream; the owner answers
//! (SyncReport) with the push of its own tuples of the patient's include
//! tree that are new or changed since the last epoch — nothing else, no
//! flag cleared, no lock given up: the night's push carries the same tuples
//! again and stays the one that commits the owner's day. The controller
//! commits the owner's push as an epoch of its own, and the asking site
//! then catches up to that epoch exactly as at a distribution (changes of
//! what it holds, the delta of its standing definitions, acknowledgement)
//! and looks the patient up as its own query would, his include tree
//! along. Other sites hear of the sync's epoch at the next epoch they take
//! part in, as of any epoch they missed.

use std::sync::Arc;
use std::time::Duration;

use snaps_mapping::Language;
use snaps_proto::v1;

use crate::include::patient_tree;
use crate::links::Identity;
use crate::refresh::own_changes;
use crate::site::{Retrieved, Site, SiteEngine};
use crate::{Error, Result};

/// How long the asking site waits for the controller, which gives the
/// owner 30 s to answer.
const SYNC_WAIT: Duration = Duration::from_secs(45);

/// What a patient's sync did for the asking site.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Synced {
    /// The patient's owner.
    pub owner: String,
    /// The epoch the owner's changes were committed in (0: there were
    /// none, or the asking site owns the patient).
    pub epoch: u64,
    /// Tuples the sync changed in the global snapshot (new or changed at
    /// the owner since the last epoch, and not synced before).
    pub changed: u64,
    /// Tuples of the patient's records that are here now and were not
    /// before.
    pub brought: u64,
    /// The asking site owns the patient: nothing was asked of anyone.
    pub own: bool,
    /// The owner holds no such patient.
    pub unknown: bool,
}

impl Synced {
    /// What `snaps_sync_patient` answers.
    pub fn text(&self) -> String {
        if self.own {
            return format!(
                "{} owns this patient: the record here is current",
                self.owner
            );
        }
        if self.unknown {
            return format!("{} holds no such patient: nothing changed", self.owner);
        }
        let pushed = match self.changed {
            0 => format!(
                "nothing changed at {} since the last epoch or sync",
                self.owner
            ),
            n => format!(
                "{n} changed tuples from {} (epoch {})",
                self.owner, self.epoch
            ),
        };
        format!("synced: {pushed}; {} new here", self.brought)
    }
}

impl Site {
    /// Asks the controller for patient `key`'s changes now, for user code
    /// `user`, then catches up and brings his records. Blocking.
    pub fn sync_patient(self: &Arc<Self>, key: i64, user: &str) -> Result<Synced> {
        let asker = user.to_string();
        let reply = self.remote_within(SYNC_WAIT, |c| async move {
            c.sync_patient(key, &asker, "").await
        })?;
        let mut synced = Synced {
            own: reply.owner == self.code(),
            unknown: reply.unknown,
            epoch: reply.epoch,
            changed: reply.inserted + reply.updated,
            owner: reply.owner,
            brought: 0,
        };
        if !synced.own && !synced.unknown {
            let identity = self.identity().ok_or_else(|| {
                Error::Invalid(
                    "the global controller has not told this site which relation holds people \
                     (it may not read it): reconnect, or ask the administrator for a grant"
                        .into(),
                )
            })?;
            synced.brought = self.bring_synced(reply.epoch, &identity, key, user)?;
        }
        Ok(synced)
    }

    /// Acts on a sync ask from the controller and reports (blocking): the
    /// owner's push of the patient, or what the bringing site stored.
    pub(crate) fn on_sync(self: &Arc<Self>, ask: &v1::SyncAsk) {
        tracing::info!(site = %self.code(), key = ask.key, asked_by = %ask.asked_by,
            bring = ask.bring, "a patient's sync asked");
        let mut report = v1::SyncReportRequest {
            request: ask.request,
            ..Default::default()
        };
        let done = if ask.bring {
            let identity = Identity {
                relation: ask.relation.clone(),
                key: ask.attribute.clone(),
            };
            self.bring_synced(ask.epoch, &identity, ask.key, "")
                .map(|n| report.brought = n)
        } else {
            self.patient_push(ask).map(|push| match push {
                Some(p) => report.push = Some(p),
                None => report.unknown = true,
            })
        };
        if let Err(e) = done {
            tracing::warn!(site = %self.code(), key = ask.key, error = %e, "a patient's sync failed here");
            report.error = e.to_string();
        }
        if let Err(e) = self.remote(|c| async move { c.sync_report(report).await }) {
            tracing::warn!(site = %self.code(), key = ask.key, error = %e,
                "the report of a patient's sync did not reach the controller");
        }
    }

    /// The owner's push of one patient: its own tuples of his include
    /// tree that are new or changed since they were last pushed (`None`
    /// when the site has no tuple of him).
    fn patient_push(&self, ask: &v1::SyncAsk) -> Result<Option<v1::PushRequest>> {
        let conn = self.open_refresh_conn()?;
        let mapping = self.mapping();
        let tree = patient_tree(
            &conn,
            &mapping,
            &self.include_edges(),
            (&ask.relation, &ask.attribute),
            ask.key,
        )?;
        if tree.first().is_none_or(|(_, ids)| ids.is_empty()) {
            return Ok(None);
        }
        let mut push = v1::PushRequest::default();
        for (relation, ids) in tree.iter().filter(|(_, ids)| !ids.is_empty()) {
            let rm = mapping
                .relation(relation)
                .ok_or_else(|| Error::Invalid(format!("{relation} is not mapped")))?;
            let only = format!(
                "rowid IN ({})",
                ids.iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let (new, changed) = own_changes(&conn, rm, &only)?;
            push.inserted.extend(new);
            push.updated.extend(changed);
        }
        Ok(Some(push))
    }

    /// Catches up to `epoch` as at a distribution, then looks patient `key`
    /// up as the site's own query would (his include tree along), for user
    /// code `user`. Returns how many tuples of his records are here now
    /// that were not before.
    fn bring_synced(
        self: &Arc<Self>,
        epoch: u64,
        identity: &Identity,
        key: i64,
        user: &str,
    ) -> Result<u64> {
        let held = |site: &Site| -> Result<usize> {
            let conn = site.open_refresh_conn()?;
            let tree = patient_tree(
                &conn,
                &site.mapping(),
                &site.include_edges(),
                (&identity.relation, &identity.key),
                key,
            )?;
            Ok(tree.iter().map(|(_, ids)| ids.len()).sum())
        };
        let before = held(self)?;
        if epoch > 0 {
            self.on_notice(&v1::EpochNotice {
                epoch,
                phase: v1::EpochPhase::Closed as i32,
                sync: None,
            })?;
        }
        let (select, text) = identity.lookup(&self.mapping(), key).ok_or_else(|| {
            Error::Invalid(format!(
                "no relation of this site holds {} alone with its key {} unconverted: the \
                 patient cannot be looked up here",
                identity.relation, identity.key
            ))
        })?;
        let mut session = SiteEngine(self.clone())
            .session("", user)
            .map_err(|e| Error::Invalid(e.message))?;
        if let Retrieved::LocalOnly(notice) =
            session.prepare_retrieval(&select, Language::Sql, &text)?
        {
            return Err(Error::Unreachable(notice));
        }
        drop(session);
        Ok(held(self)?.saturating_sub(before) as u64)
    }
}
