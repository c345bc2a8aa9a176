//! The refresh coordinator: runs the epochs of DESIGN.md ("The nightly
//! refresh") — open, collect (sites evict, then push), commit, distribute,
//! close — telling every subscribed site of each phase, and resuming an
//! epoch a crash interrupted at the phase the store recorded.
//!
//! The sites connected when an epoch opens are its participants. It waits
//! for their pushes until all have pushed or `collect_timeout` has passed
//! (a participant that disconnects may be restarting: it is waited for); a
//! site that does not push in time is absent: its changes wait for the next
//! epoch and its locks stay held.
//! After the commit it waits likewise for acknowledgements; a site that
//! comes back later catches up from the change log (it asks for what
//! changed after the last epoch it applied).
//!
//! Several controllers may share one (PostgreSQL) store. One of them runs
//! an epoch, holding the store's lease and renewing it while it waits; the
//! others watch the store (`RefreshConfig::watch`), tell their own
//! subscribers of each phase it records, and record which sites are
//! subscribed to them, so the epoch's participants are the sites
//! subscribed to any controller. If the runner dies, its lease runs out
//! (`RefreshConfig::lease`) and a watching controller takes the epoch over
//! from the phase the store recorded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snaps_proto::v1;
use snaps_schema::SiteNo;
use tokio::sync::{Notify, broadcast, watch};

mod sync;
use crate::config::GlobalConfig;
use crate::error::{Error, Result};
use crate::store::{CommitSummary, EpochState, GlobalStore, Phase};
pub use sync::{Pending, SYNC_TIMEOUT, SyncAnswer};

/// A point of an epoch at which a test may stop the controller, as a
/// crash would (the point is durably recorded when it is reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaltPoint {
    /// The epoch is open, no push is staged yet.
    Opened,
    /// One push is staged, others are awaited.
    Collecting,
    /// The commit is done, no acknowledgement yet.
    Committed,
    /// One site acknowledged, others are awaited.
    Distributing,
}

/// Where a halting controller stops, and how it says it has.
#[derive(Debug, Clone)]
pub struct Halt {
    /// The point.
    pub at: HaltPoint,
    /// Notified when the point is reached; the epoch then never goes on.
    pub reached: Arc<Notify>,
}

/// What one epoch did, for `snaps refresh`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpochReport {
    /// The epoch.
    pub epoch: u64,
    /// Sites that took part, and those that were absent.
    pub sites: Vec<String>,
    /// Network sites that did not push.
    pub absent: Vec<String>,
    /// The commit.
    pub commit: CommitSummary,
    /// New versions sent to holders.
    pub resent: u64,
    /// Wire bytes while the epoch ran (requests, replies).
    pub bytes_received: u64,
    /// See `bytes_received`.
    pub bytes_sent: u64,
    /// How long it took.
    pub elapsed: Duration,
}

impl EpochReport {
    /// The wire form.
    pub fn encode(&self) -> v1::RefreshSummary {
        v1::RefreshSummary {
            epoch: self.epoch,
            sites: self.sites.clone(),
            absent: self.absent.clone(),
            tuples_pushed: self.commit.tuples_pushed,
            inserted: self.commit.inserted,
            updated: self.commit.updated,
            deleted: self.commit.deleted,
            conflicts: self.commit.conflicts,
            invalidated: self.commit.removed,
            resent: self.resent,
            bytes_received: self.bytes_received,
            bytes_sent: self.bytes_sent,
            millis: self.elapsed.as_millis() as u64,
        }
    }
}

/// The coordinator, shared by the service (subscriptions, pushes,
/// acknowledgements wake it) and the epoch runner.
pub struct Coordinator {
    store: Arc<dyn GlobalStore>,
    config: Arc<GlobalConfig>,
    notice: watch::Sender<v1::EpochNotice>,
    progress: watch::Sender<v1::RefreshProgress>,
    /// Open Subscribe streams per site number.
    connected: Mutex<BTreeMap<u32, usize>>,
    /// Wakes a waiting epoch: a push, an acknowledgement, a site leaving.
    changed: Notify,
    /// One epoch at a time.
    running: tokio::sync::Mutex<()>,
    /// Bytes and re-sent tuples counted while an epoch runs.
    counted: Mutex<(u64, u64, u64)>,
    halt: Option<Halt>,
    /// Set when the controller shuts down: Subscribe streams end, so the
    /// graceful shutdown does not wait for them.
    closing: watch::Sender<bool>,
    /// This controller's name in the store's lease and subscriptions.
    me: String,
    /// Sync asks on their way to one site's Subscribe stream.
    asks: broadcast::Sender<(u32, v1::EpochNotice)>,
    /// Asks sent and not yet answered, by request number.
    pending: Mutex<BTreeMap<u64, Pending>>,
    next_request: std::sync::atomic::AtomicU64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A controller's name among those of a store: its host and port, so a
/// restarted controller is the one that held the lease before.
fn controller_name(config: &GlobalConfig) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", config.listen.port())
}

fn wire_phase(p: Phase) -> v1::EpochPhase {
    match p {
        Phase::Collect => v1::EpochPhase::Collect,
        Phase::Distribute => v1::EpochPhase::Distribute,
        Phase::Closed => v1::EpochPhase::Closed,
    }
}

impl Coordinator {
    /// A coordinator over the store, starting from the phase it recorded.
    pub fn new(
        store: Arc<dyn GlobalStore>,
        config: Arc<GlobalConfig>,
        halt: Option<Halt>,
    ) -> Result<Arc<Coordinator>> {
        let state = store.epoch()?;
        let notice = state
            .as_ref()
            .map_or_else(v1::EpochNotice::default, |s| v1::EpochNotice {
                epoch: s.epoch,
                phase: wire_phase(s.phase) as i32,
                sync: None,
            });
        Ok(Arc::new(Coordinator {
            store,
            notice: watch::channel(notice).0,
            progress: watch::channel(v1::RefreshProgress::default()).0,
            connected: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            running: tokio::sync::Mutex::new(()),
            counted: Mutex::new((0, 0, 0)),
            halt,
            closing: watch::channel(false).0,
            me: controller_name(&config),
            asks: broadcast::channel(64).0,
            pending: Mutex::new(BTreeMap::new()),
            next_request: std::sync::atomic::AtomicU64::new(sync::first_request(&controller_name(
                &config,
            ))),
            config,
        }))
    }

    /// The current phase, as subscribers see it.
    pub fn notices(&self) -> watch::Receiver<v1::EpochNotice> {
        self.notice.subscribe()
    }

    /// Ends every Subscribe stream (the controller is shutting down).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Completes when the controller shuts down.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|c| *c).await;
        }
    }

    /// Progress of the running epoch.
    pub fn progress(&self) -> watch::Receiver<v1::RefreshProgress> {
        self.progress.subscribe()
    }

    /// Whether the network is collecting: fetches and locks wait for the
    /// commit (sites answer from local data meanwhile).
    pub fn collecting(&self) -> Option<u64> {
        let n = self.notice.borrow();
        (n.phase == v1::EpochPhase::Collect as i32).then_some(n.epoch)
    }

    /// A site opened its Subscribe stream; it counts as connected until the
    /// returned guard is dropped.
    pub fn connect(self: &Arc<Self>, site: SiteNo) -> Connected {
        *self
            .connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(site.0)
            .or_default() += 1;
        Connected {
            coordinator: self.clone(),
            site,
        }
    }

    fn connected_sites(&self) -> BTreeSet<u32> {
        self.connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, _)| *s)
            .collect()
    }

    /// A push or acknowledgement landed.
    pub fn wake(&self) {
        self.changed.notify_waiters();
    }

    /// Counts wire bytes of a request and its reply while an epoch runs.
    pub fn count(&self, received: usize, sent: usize) {
        if self.notice.borrow().phase == v1::EpochPhase::Closed as i32 {
            return;
        }
        let mut c = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        c.0 += received as u64;
        c.1 += sent as u64;
    }

    /// Counts new versions sent to a holder.
    pub fn count_resent(&self, n: usize) {
        self.counted.lock().unwrap_or_else(|p| p.into_inner()).2 += n as u64;
    }

    fn announce(&self, state: &EpochState) {
        let notice = v1::EpochNotice {
            epoch: state.epoch,
            phase: wire_phase(state.phase) as i32,
            sync: None,
        };
        self.notice.send_replace(notice);
        self.wake();
    }

    /// Records `epoch` as the latest, closed, without telling the
    /// subscribers: a site that connects hears of it, the others catch up
    /// at the next epoch they take part in.
    fn quietly_closed(&self, epoch: u64) {
        self.notice.send_if_modified(|n| {
            *n = v1::EpochNotice {
                epoch,
                phase: v1::EpochPhase::Closed as i32,
                sync: None,
            };
            false
        });
    }

    fn report_progress(&self, state: &EpochState, done: usize, of: usize) {
        self.progress.send_replace(v1::RefreshProgress {
            epoch: state.epoch,
            phase: wire_phase(state.phase) as i32,
            done: done as u32,
            sites: of as u32,
            summary: None,
        });
    }

    async fn reached(&self, point: HaltPoint) {
        if let Some(h) = &self.halt
            && h.at == point
        {
            tracing::warn!(?point, "halting the epoch here, as a crash would");
            h.reached.notify_one();
            std::future::pending::<()>().await;
        }
    }

    async fn state(&self) -> Result<EpochState> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.epoch())
            .await
            .map_err(|e| Error::Internal(format!("store task: {e}")))??
            .ok_or_else(|| Error::Internal("no epoch recorded".into()))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn GlobalStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Error::Internal(format!("store task: {e}")))?
    }

    /// Waits until `done(state)` says finished or `deadline` passes. A
    /// participant that disconnects is still waited for (it may be
    /// restarting); one that never comes back is absent at the deadline.
    async fn wait_for(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&EpochState) -> (bool, usize, usize),
        partial: HaltPoint,
    ) -> Result<EpochState> {
        let mut announced_partial = false;
        loop {
            let woken = self.changed.notified();
            self.renew().await?;
            let state = self.state().await?;
            let (finished, n, of) = done(&state);
            self.report_progress(&state, n, of);
            // Some sites have answered (perhaps all, by the time we look).
            if n > 0 && !announced_partial {
                announced_partial = true;
                self.reached(partial).await;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if finished || left.is_zero() {
                return Ok(state);
            }
            // Wake on news, and look again now and then regardless.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), woken).await;
        }
    }

    /// Takes or renews the lease of the refresh; an error names the
    /// controller holding it.
    async fn renew(&self) -> Result<()> {
        let me = self.me.clone();
        let ttl = self.config.refresh.lease.as_millis() as i64;
        match self
            .blocking(move |s| s.take_lease(&me, now_ms(), ttl))
            .await?
        {
            None => Ok(()),
            Some(other) => Err(Error::FailedPrecondition(format!(
                "the global controller at {other} is running the refresh; it is done when its epoch closes"
            ))),
        }
    }

    /// The sites subscribed to this controller or, lately, to another one
    /// on the store: those an epoch opened now would wait for.
    pub async fn participants(&self) -> Result<Vec<SiteNo>> {
        let since = now_ms() - 3 * self.config.refresh.watch.as_millis() as i64;
        let mut sites = self.connected_sites();
        sites.extend(
            self.blocking(move |s| s.subscribed(since))
                .await?
                .into_iter()
                .map(|s| s.0),
        );
        Ok(sites.into_iter().map(SiteNo).collect())
    }

    /// Runs one epoch to its end (resuming one that is under way), and
    /// reports what it did.
    pub async fn run_epoch(self: &Arc<Self>) -> Result<EpochReport> {
        self.run(true)
            .await?
            .ok_or_else(|| Error::Internal("no epoch was run".into()))
    }

    /// Runs the epoch under way, if any, or (with `open`) a new one.
    async fn run(self: &Arc<Self>, open: bool) -> Result<Option<EpochReport>> {
        let _one = self.running.lock().await;
        let latest = self.blocking(|s| s.epoch()).await?;
        if !open && latest.as_ref().is_none_or(|s| s.phase == Phase::Closed) {
            return Ok(None);
        }
        self.renew().await?;
        let report = self.run_held(latest).await;
        let me = self.me.clone();
        if let Err(e) = self.blocking(move |s| s.release_lease(&me)).await {
            tracing::warn!(error = %e, "giving up the refresh lease failed (it runs out by itself)");
        }
        report.map(Some)
    }

    async fn run_held(self: &Arc<Self>, latest: Option<EpochState>) -> Result<EpochReport> {
        let started = Instant::now();
        *self.counted.lock().unwrap_or_else(|p| p.into_inner()) = (0, 0, 0);
        let mut state = match latest {
            Some(s) if s.phase != Phase::Closed => {
                tracing::info!(epoch = s.epoch, phase = s.phase.name(), "resuming epoch");
                s
            }
            _ => {
                let participants = self.participants().await?;
                let s = self
                    .blocking(move |st| st.open_epoch(&participants))
                    .await?;
                tracing::info!(epoch = s.epoch, participants = ?s.participants, "epoch opened");
                s
            }
        };
        let epoch = state.epoch;
        self.announce(&state);
        if state.phase == Phase::Collect {
            self.reached(HaltPoint::Opened).await;
            let deadline = Instant::now() + self.config.refresh.collect_timeout;
            let participants: BTreeSet<u32> = state.participants.iter().map(|s| s.0).collect();
            self.wait_for(
                deadline,
                |s| {
                    let pushed: BTreeSet<u32> = s.pushed.iter().map(|p| p.0).collect();
                    let waiting = participants.iter().filter(|p| !pushed.contains(p)).count();
                    (waiting == 0, pushed.len(), participants.len())
                },
                HaltPoint::Collecting,
            )
            .await?;
            self.renew().await?;
            let commit = self.blocking(move |s| s.commit_epoch(epoch)).await?;
            tracing::info!(epoch, ?commit, "committed");
            state = self.state().await?;
            self.announce(&state);
            self.reached(HaltPoint::Committed).await;
        }
        if state.phase == Phase::Distribute {
            let deadline = Instant::now() + self.config.refresh.distribute_timeout;
            let participants: BTreeSet<u32> = state.participants.iter().map(|s| s.0).collect();
            let pushed: BTreeSet<u32> = state.pushed.iter().map(|s| s.0).collect();
            self.wait_for(
                deadline,
                |s| {
                    let acked: BTreeSet<u32> = s.acked.iter().map(|p| p.0).collect();
                    let expected: BTreeSet<u32> = participants.union(&pushed).copied().collect();
                    let done = expected.iter().filter(|p| acked.contains(p)).count();
                    (done == expected.len(), done, expected.len())
                },
                HaltPoint::Distributing,
            )
            .await?;
            self.renew().await?;
            self.blocking(move |s| s.close_epoch(epoch)).await?;
            state = self.state().await?;
            self.announce(&state);
            tracing::info!(epoch, "epoch closed");
        }
        let commit = self
            .blocking(move |s| s.commit_epoch(epoch))
            .await
            .unwrap_or_default();
        let (received, sent, resent) = *self.counted.lock().unwrap_or_else(|p| p.into_inner());
        let code = |n: &SiteNo| {
            self.config
                .network
                .sites
                .iter()
                .find(|s| s.number == *n)
                .map_or_else(|| n.0.to_string(), |s| s.code.to_string())
        };
        let report = EpochReport {
            epoch,
            sites: state.participants.iter().map(code).collect(),
            absent: self
                .config
                .network
                .sites
                .iter()
                .filter(|s| !commit.pushed_by.iter().any(|p| p == s.code.as_str()))
                .map(|s| s.code.to_string())
                .collect(),
            commit,
            resent,
            bytes_received: received,
            bytes_sent: sent,
            elapsed: started.elapsed(),
        };
        self.progress.send_replace(v1::RefreshProgress {
            epoch,
            phase: v1::EpochPhase::Closed as i32,
            done: report.sites.len() as u32,
            sites: report.sites.len() as u32,
            summary: Some(report.encode()),
        });
        Ok(report)
    }

    /// Runs the refresh every day at the configured time (UTC), and first
    /// finishes an epoch a crash interrupted.
    pub async fn schedule(self: Arc<Self>) {
        if let Err(e) = self.run(false).await {
            tracing::info!(error = %e, "not resuming the epoch under way");
        }
        let Some((h, m)) = self.config.refresh.at else {
            return;
        };
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            tokio::time::sleep(until_next((h, m), now)).await;
            // Another controller on the store may have run tonight's.
            let now = now_ms() / 1000;
            if matches!(self.store.epoch(), Ok(Some(s)) if s.opened_at > now - 3600) {
                tracing::info!("tonight's refresh ran already");
                continue;
            }
            match self.run_epoch().await {
                Ok(r) => tracing::info!(epoch = r.epoch, ?r.commit, "nightly refresh done"),
                Err(e) => tracing::error!(error = %e, "nightly refresh failed"),
            }
        }
    }
}

impl Coordinator {
    /// Watches the store for as long as the controller serves: records the
    /// sites subscribed here, tells them of the phases of an epoch another
    /// controller runs, and takes an epoch over whose runner's lease ran
    /// out.
    pub async fn watch(self: Arc<Self>) {
        let mut every = tokio::time::interval(self.config.refresh.watch);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let (me, sites) = (
                self.me.clone(),
                self.connected_sites()
                    .into_iter()
                    .map(SiteNo)
                    .collect::<Vec<_>>(),
            );
            let here = sites.clone();
            if let Err(e) = self
                .blocking(move |s| s.record_subscribed(&me, &sites, now_ms()))
                .await
            {
                tracing::warn!(error = %e, "recording the subscribed sites failed");
                continue;
            }
            if let Err(e) = self.forward_stored_asks(here).await {
                tracing::warn!(error = %e, "taking the sync asks left for this controller failed");
            }
            // The audit records appended since the last tick join the
            // hash chain (a long trail from an older store, a batch a tick).
            if let Err(e) = self
                .blocking(|s| s.seal_audit(crate::service::SEAL_BATCH))
                .await
            {
                tracing::warn!(error = %e, "chaining the audit trail failed");
            }
            // While this controller runs an epoch, it announces it itself.
            let Ok(idle) = self.running.try_lock() else {
                continue;
            };
            drop(idle);
            let state = match self.blocking(|s| s.epoch()).await {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the epoch failed");
                    continue;
                }
            };
            let shown = self.notice.borrow().clone();
            let closed = v1::EpochPhase::Closed as i32;
            if shown.phase == closed && state.phase == Phase::Closed && shown.epoch < state.epoch {
                // A patient's sync epoch: the sites hear of it at night (an
                // epoch of the night cannot pass unseen, its collect waits
                // for the sites subscribed here).
                self.quietly_closed(state.epoch);
            } else if shown.epoch != state.epoch || shown.phase != wire_phase(state.phase) as i32 {
                self.announce(&state);
            }
            if state.phase != Phase::Closed {
                let me = self.clone();
                tokio::spawn(async move {
                    match me.run(false).await {
                        Ok(Some(r)) => tracing::warn!(
                            epoch = r.epoch,
                            "took over and finished an epoch another controller left"
                        ),
                        Ok(None) => {}
                        Err(e) => tracing::debug!(error = %e, "not taking the epoch over"),
                    }
                });
            }
        }
    }
}

/// How long from `now` (Unix seconds) until the next `at` (hours, minutes;
/// UTC): today if it is still ahead, else tomorrow.
fn until_next(at: (u8, u8), now: u64) -> Duration {
    let at = u64::from(at.0) * 3600 + u64::from(at.1) * 60;
    let today = now % 86_400;
    Duration::from_secs(if today < at {
        at - today
    } else {
        86_400 - today + at
    })
}

/// A site's open Subscribe stream.
pub struct Connected {
    coordinator: Arc<Coordinator>,
    site: SiteNo,
}

impl Drop for Connected {
    fn drop(&mut self) {
        if let Some(n) = self
            .coordinator
            .connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&self.site.0)
        {
            *n = n.saturating_sub(1);
        }
        self.coordinator.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_refresh_is_today_if_ahead_else_tomorrow() {
        let day = 20_000 * 86_400;
        // 01:00 → 02:30 the same day.
        assert_eq!(until_next((2, 30), day + 3600), Duration::from_secs(5400));
        // 02:30 exactly, and 03:00: the next is tomorrow.
        assert_eq!(until_next((2, 30), day + 9000), Duration::from_secs(86_400));
        assert_eq!(
            until_next((2, 30), day + 10_800),
            Duration::from_secs(86_400 - 1800)
        );
        assert_eq!(until_next((0, 0), day + 86_399), Duration::from_secs(1));
    }
}
