//! The ledger's owner: the one thread that changes the engine, and so the maps.
//!
//! It runs on a thread of its own, with a runtime of its own for its timers, so that a batch,
//! a sweep or a state save (tens of milliseconds at 100k entries, growing with the ledger)
//! never holds up the control socket, /metrics, signals or the watchdog. It takes changes from
//! one queue in arrival order and, after each, publishes a [`Snapshot`] that every reader
//! reads instead of the engine; acknowledgements go out after the snapshot, so a client that
//! was told "banned" sees the ban in the next `check`.
//!
//! Just over 600 lines: `apply`, one arm per kind of update, reads best whole; the thread,
//! the operators' changes and the outbox to etcd are in the files beside it.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot, watch};

use super::{Change, ChangeError, Update, unix_now};
mod change;
mod outbox;
mod thread;

pub(super) use thread::OwnerThread;
pub use thread::{OwnerFault, OwnerHealth, OwnerTiming};

use outbox::Shed;

use crate::{
    cluster::{ClusterLink, ClusterUpdate, Outgoing},
    engine::{Enforcer, Engine, IngestReport},
    snapshot::{Snapshot, SyncStatus},
    source::blocklist,
    state::ApibanCursor,
    trust::Route,
};

/// The engine and what the owner tracks beside it.
pub struct Owner<E: Enforcer> {
    pub engine: Engine<E>,
    pub sync: SyncStatus,
    published: watch::Sender<Arc<Snapshot>>,
    seq: u64,
    /// In a fleet: where this node's changes go, and whether it leads.
    cluster: Option<ClusterLink>,
    /// The APIBAN position last sent to etcd.
    cursor_sent: Option<ApibanCursor>,
    /// What could not be queued for etcd, to send once the writer catches up.
    shed: Shed,
    /// Where this node's bans go as CrowdSec alerts.
    alerts: Option<crate::sync::crowdsec::AlertOutbox>,
}

/// What the fleet hears of a change: [`crate::trust::route`] decides from where it came.
enum Origin {
    /// The leader's feeds: written to etcd fenced on its leadership.
    Feed,
    /// Written to etcd for every node, with a manual allowlist entry added (true) or removed
    /// (false).
    Operator(Option<(ipnet::IpNet, bool)>),
    /// This node's alone (its addresses, its settings) or already etcd's.
    Local,
}

impl Origin {
    fn of(update: &Update) -> Self {
        match crate::trust::route(update.provenance()) {
            Route::Local => Origin::Local,
            Route::LeaderFenced => Origin::Feed,
            Route::EveryNode => Origin::Operator(match update {
                Update::Control {
                    change: Change::AllowAdd { net },
                    ..
                } => Some((*net, true)),
                Update::Control {
                    change: Change::AllowRemove { net },
                    ..
                } => Some((*net, false)),
                _ => None,
            }),
        }
    }
}

/// An acknowledgement, sent once what it acknowledges is in the maps, on disk and published.
enum Ack {
    None,
    Done(oneshot::Sender<()>),
    Ingest(oneshot::Sender<IngestReport>, IngestReport),
    Change(
        oneshot::Sender<Result<String, ChangeError>>,
        Result<String, ChangeError>,
    ),
}

impl Ack {
    fn send(self) {
        // A source that stopped waiting has gone; nothing to tell it.
        match self {
            Ack::None => {}
            Ack::Done(reply) => drop(reply.send(())),
            Ack::Ingest(reply, report) => drop(reply.send(report)),
            Ack::Change(reply, result) => drop(reply.send(result)),
        }
    }
}

impl<E: Enforcer> Owner<E> {
    /// The owner of `engine`, and what readers subscribe to for its snapshots.
    pub fn new(
        engine: Engine<E>,
        cluster: Option<ClusterLink>,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let sync = SyncStatus::default();
        let first = Snapshot {
            seq: 0,
            engine: engine.shared(),
            sync: sync.clone(),
        };
        let (published, snapshots) = watch::channel(Arc::new(first));
        let mut owner = Self {
            engine,
            sync,
            published,
            seq: 0,
            cluster,
            cursor_sent: None,
            shed: Shed::default(),
            alerts: None,
        };
        owner.send_pending(true);
        (owner, snapshots)
    }

    /// Makes what the engine holds now what readers see.
    fn publish(&mut self) {
        self.seq += 1;
        let snapshot = Snapshot {
            seq: self.seq,
            engine: self.engine.shared(),
            sync: self.sync.clone(),
        };
        let copied = !Arc::ptr_eq(
            &self.published.borrow().engine.ledger,
            &snapshot.engine.ledger,
        );
        // send_replace: readers may all have gone (a dry run without a control socket).
        let previous = self.published.send_replace(Arc::new(snapshot));
        if copied && Arc::strong_count(&previous) == 1 {
            drop(previous);
            // The change copied the ledger (a reader held it); the old copy is freed now.
            // glibc keeps freed memory in the arena it came from, and this thread's arena is
            // not the one the ledger was loaded into: without a trim, an agent holding 100k
            // entries would keep a second ledger's worth of freed pages resident.
            // SAFETY: malloc_trim only returns free pages to the kernel; it has no
            // preconditions.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Applies one update from a source. Acknowledgements are sent after the change is in
    /// the maps, saved and published.
    pub fn handle(&mut self, update: Update) {
        self.send_shed();
        let origin = Origin::of(&update);
        if let Origin::Operator(allow) = &origin {
            self.engine.expect_fleet_change(*allow);
        }
        let ack = self.apply(update);
        let change = self.engine.end_fleet_change();
        self.tell_the_fleet(origin, change);
        self.publish();
        ack.send();
    }

    /// Ban API calls in one batch: each applied to the ledger in order, then the dataplane
    /// and the state file brought up to date once, then the fleet told and every caller
    /// answered (see [`crate::engine::Engine::begin_batch`]).
    fn handle_batch(&mut self, batch: Vec<Update>) {
        if batch.len() == 1 {
            if let Some(u) = batch.into_iter().next() {
                self.handle(u);
            }
            return;
        }
        self.send_shed();
        self.engine.begin_batch();
        let mut done = Vec::with_capacity(batch.len());
        for update in batch {
            let origin = Origin::of(&update);
            if let Origin::Operator(allow) = &origin {
                self.engine.expect_fleet_change(*allow);
            }
            let ack = self.apply(update);
            let change = self.engine.end_fleet_change();
            done.push((origin, change, ack));
        }
        let applied = self.engine.end_batch(unix_now());
        tracing::info!(
            changes = done.len(),
            "ban API calls applied in one batch; {}",
            effect(applied)
        );
        let mut acks = Vec::with_capacity(done.len());
        for (origin, change, ack) in done {
            self.tell_the_fleet(origin, change);
            acks.push(ack);
        }
        self.publish();
        for ack in acks {
            ack.send();
        }
    }

    fn apply(&mut self, update: Update) -> Ack {
        let now = unix_now();
        match update {
            Update::BeginFullPull { reply } => {
                self.engine.begin_full_pull(now);
                tracing::info!("APIBAN full pull started");
                Ack::Done(reply)
            }
            Update::ApibanBatch {
                addresses,
                next_id,
                reply,
            } => {
                let report = self.engine.apiban_batch(&addresses, next_id, now);
                log_sync(
                    "apiban",
                    &report,
                    self.engine.apiban_cursor().full_pull.is_some(),
                );
                Ack::Ingest(reply, report)
            }
            Update::ApibanDone { reply } => {
                let full = self.engine.apiban_cursor().full_pull.is_some();
                let report = self.engine.apiban_done(now);
                if full {
                    tracing::info!(
                        reconciled = report.reconciled,
                        removed = report.applied.removed,
                        "APIBAN full pull complete"
                    );
                }
                self.sync.last_success = Some(now);
                Ack::Ingest(reply, report)
            }
            Update::ApibanNextPoll(at) => {
                self.sync.next_request = Some(at);
                Ack::None
            }
            Update::ApibanRequest(r) => {
                *self.sync.requests.entry(r.outcome).or_default() += 1;
                self.sync.last_request = Some((r.at, r.outcome));
                self.sync.budget_left = r.budget_left;
                self.sync.next_request = r.next_request;
                self.sync.key_rejected_since = r.key_rejected_since;
                if r.server_clock_offset_ms.is_some() {
                    self.sync.apiban_clock_offset_ms = r.server_clock_offset_ms;
                }
                if r.waited_for_budget {
                    self.sync.rate_limit_waits += 1;
                }
                Ack::None
            }
            Update::ListSnapshot { name, text, reply } => {
                let items = blocklist::parse_list(&text);
                let report = self.engine.list_snapshot(&name, &items, now);
                log_sync(&format!("list:{name}"), &report, false);
                let status = self.sync.lists.entry(name).or_default();
                status.last_success = Some(now);
                status.last_error = None;
                Ack::Ingest(reply, report)
            }
            Update::ListFailed { name, error } => {
                tracing::warn!(list = %name, %error, "blocklist refresh failed; keeping its bans");
                self.sync.lists.entry(name).or_default().last_error = Some(error);
                Ack::None
            }
            Update::CrowdsecStream {
                startup,
                stream,
                reply,
            } => {
                let report = self.engine.crowdsec_stream(startup, &stream, now);
                // Every few seconds: said only when it changed something, or was a full read.
                if startup || report.received > 0 || report.reconciled > 0 {
                    log_sync("crowdsec", &report, startup);
                }
                let status = &mut self.sync.crowdsec;
                if status.last_error.take().is_some() {
                    tracing::info!("CrowdSec's LAPI answers again");
                }
                status.last_success = Some(now);
                status.other_decisions += stream.other as u64;
                status.unreadable_decisions += stream.unreadable as u64;
                if stream.unreadable > 0 {
                    tracing::warn!(
                        unreadable = stream.unreadable,
                        "CrowdSec sent decisions this agent cannot read; they ban nothing"
                    );
                }
                Ack::Ingest(reply, report)
            }
            Update::CrowdsecFailed { error } => {
                if self.sync.crowdsec.last_error.is_none() {
                    tracing::warn!(%error, "cannot read CrowdSec's decisions; its bans stay, retrying");
                } else {
                    tracing::debug!(%error, "CrowdSec's LAPI still fails");
                }
                self.sync.crowdsec.last_error = Some(error);
                Ack::None
            }
            Update::CrowdsecAlertsTo(outbox) => {
                self.alerts = outbox;
                Ack::None
            }
            Update::CrowdsecAlertsPosted {
                posted,
                dropped,
                error,
            } => {
                let status = &mut self.sync.crowdsec;
                status.alerts_posted += posted as u64;
                status.alerts_dropped += dropped as u64;
                match error {
                    Some(e) => {
                        if status.alerts_error.is_none() {
                            tracing::warn!(error = %e, "cannot post this node's bans to CrowdSec; retrying");
                        }
                        status.alerts_error = Some(e);
                    }
                    None => {
                        if status.alerts_error.take().is_some() {
                            tracing::info!("CrowdSec takes this node's alerts again");
                        }
                    }
                }
                Ack::None
            }
            Update::OwnAddresses(own) => {
                tracing::info!(
                    addresses = own.len(),
                    "this host's addresses changed; feeds may not ban them"
                );
                let dropped = self.engine.set_own_addresses(own, now);
                for net in dropped {
                    tracing::warn!(
                        %net,
                        "dropped a feed's ban that covers one of this host's addresses"
                    );
                }
                Ack::None
            }
            Update::Control { change, reply } => Ack::Change(reply, self.change(change, now)),
            Update::Cluster(update) => self.apply_the_fleets(update, now),
            Update::Detected {
                addr,
                ttl,
                evidence,
                reply,
            } => {
                let alert = crate::source::crowdsec::Alert {
                    net: ipnet::IpNet::from(addr),
                    ttl,
                    scenario: format!("apiban/{}", evidence.rule),
                    message: format!("{}: {}", evidence.counts, evidence.line),
                    at: now,
                };
                let forgeable = !evidence.unforgeable;
                let answer = self
                    .engine
                    .detected(addr, ttl, evidence, now)
                    .map(|applied| format!("banned {addr} (detect); {}", effect(applied)))
                    .map_err(ChangeError::from);
                if answer.is_ok() {
                    self.alert_crowdsec(alert, forgeable, now);
                }
                Ack::Change(reply, answer)
            }
            Update::Capture { on, reply } => {
                let answer = self
                    .engine
                    .set_capture(on)
                    .map(|()| String::new())
                    .map_err(|e| {
                        ChangeError::Failed(format!(
                            "cannot switch the capture {}: {}",
                            if on { "on" } else { "off" },
                            crate::error_chain(&e)
                        ))
                    });
                Ack::Change(reply, answer)
            }
        }
    }

    /// What etcd holds, applied as it is.
    fn apply_the_fleets(&mut self, update: ClusterUpdate, now: u64) -> Ack {
        match update {
            ClusterUpdate::Changes {
                changes,
                revision,
                clock,
                reply,
            } => {
                let n = changes.len();
                self.engine.saw_fleet_clock(clock);
                let applied = self.engine.apply_cluster_changes(changes, revision, now);
                tracing::debug!(
                    changes = n,
                    revision,
                    added = applied.added,
                    removed = applied.removed,
                    "applied the fleet's changes"
                );
                Ack::Done(reply)
            }
            ClusterUpdate::Everything {
                records,
                allow,
                revision,
                cluster_id,
                clock,
                reply,
            } => {
                self.engine.saw_fleet_clock(clock);
                let applied =
                    self.engine
                        .replace_from_cluster(records, allow, (cluster_id, revision), now);
                tracing::info!(
                    revision,
                    prefixes = self.engine.ledger().len(),
                    added = applied.added,
                    removed = applied.removed,
                    "the ledger now equals the fleet's"
                );
                Ack::Done(reply)
            }
            ClusterUpdate::Settled { keys } => {
                self.engine.settle_pending(&keys);
                Ack::None
            }
            ClusterUpdate::Members { addresses } => {
                let dropped = self.engine.set_member_addresses(addresses, now);
                if !dropped.is_empty() {
                    tracing::warn!(
                        ?dropped,
                        "bans that covered a fleet node's own address were dropped"
                    );
                }
                Ack::None
            }
            ClusterUpdate::AdoptCursor {
                cursor,
                requests_ms,
                reply,
            } => {
                if let Some(cursor) = cursor {
                    self.engine.adopt_apiban_cursor(cursor.clone(), now);
                    self.cursor_sent = Some(cursor);
                }
                self.engine.adopt_fleet_requests(&requests_ms);
                Ack::Done(reply)
            }
        }
    }

    /// Expires what is due; one log line when anything expired.
    pub fn sweep(&mut self) {
        self.send_shed();
        let (expired, applied) = self.engine.sweep(unix_now());
        // Every node expires bans itself; the leader also deletes them from etcd.
        match &self.cluster {
            Some(link) if link.leading() => {
                let records = self.engine.take_touched();
                if !records.is_empty() {
                    let revision = self.engine.cluster_revision();
                    self.queue(Outgoing {
                        records,
                        fenced: true,
                        expired_at_revision: Some(revision),
                        ..Default::default()
                    });
                }
            }
            _ => self.engine.forget_touched(),
        }
        if expired > 0 {
            tracing::info!(expired, removed = applied.removed, "expired bans removed");
            self.publish();
        }
    }

    /// Tries again to save a state whose last save failed.
    fn retry_save(&mut self) {
        if self.engine.unsaved() {
            self.engine.retry_save(unix_now());
            if !self.engine.unsaved() {
                self.publish();
            }
        }
    }

    /// The loop: updates in arrival order, sweeps and save retries, until `stop` fires or
    /// every sender is gone. Returns the owner, so that the agent saves it last.
    async fn run(
        mut self,
        mut updates: mpsc::Receiver<Update>,
        timing: OwnerTiming,
        health: OwnerHealth,
        mut stop: oneshot::Receiver<()>,
    ) -> Self {
        let every = |period| {
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        let mut sweep = every(timing.sweep_every);
        let mut heartbeat = every(timing.heartbeat_every);
        let mut save_retry = every(SAVE_RETRY_EVERY);
        loop {
            tokio::select! {
                _ = &mut stop => return self,
                update = updates.recv() => match update {
                    Some(u) if is_api_change(&u) => {
                        // Ban API calls that queued up meanwhile go with it, in one batch.
                        let mut batch = vec![u];
                        let mut next = None;
                        while batch.len() < API_BATCH {
                            match updates.try_recv() {
                                Ok(u) if is_api_change(&u) => batch.push(u),
                                Ok(u) => {
                                    next = Some(u);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.handle_batch(batch);
                        if let Some(u) = next {
                            self.handle(u);
                        }
                    }
                    Some(u) => self.handle(u),
                    None => return self,
                },
                _ = sweep.tick() => self.sweep(),
                _ = save_retry.tick() => self.retry_save(),
                _ = heartbeat.tick() => {}
            }
            health.beat();
        }
    }
}

/// How often the owner retries a state save that failed (a full or read-only state
/// directory): the change is in the maps already, the retry only brings the file up to date.
const SAVE_RETRY_EVERY: Duration = Duration::from_secs(10);

impl<E: Enforcer> Owner<E> {
    /// Hands a ban to the CrowdSec alerts task (never waiting), unless CrowdSec bans it already or it rests on
    /// evidence a forged source address can bring and the operator did not ask for those:
    /// CrowdSec takes an alert to every bouncer it feeds, and to its community if enrolled.
    fn alert_crowdsec(&mut self, alert: crate::source::crowdsec::Alert, forgeable: bool, now: u64) {
        let Some(outbox) = &self.alerts else { return };
        if forgeable && !outbox.post_forgeable {
            self.sync.crowdsec.alerts_forgeable += 1;
            return;
        }
        let known = self
            .engine
            .ledger()
            .longest_match(alert.net.addr())
            .is_some_and(|(net, records)| {
                net.contains(&alert.net)
                    && records
                        .iter()
                        .any(|(s, r)| *s == crate::ledger::SourceId::Crowdsec && r.is_live(now))
            });
        if known {
            self.sync.crowdsec.alerts_skipped += 1;
        } else if outbox.tx.try_send(alert).is_err() {
            self.sync.crowdsec.alerts_dropped += 1;
        }
    }
}

fn log_sync(source: &str, r: &IngestReport, full_pull: bool) {
    tracing::info!(
        source,
        full_pull,
        received = r.received,
        added = r.applied.added,
        removed = r.applied.removed,
        refreshed = r.accepted - r.new,
        skipped = r.skipped_total(),
        reconciled = r.reconciled,
        not_enforced = r.applied.not_enforced,
        "sync"
    );
}

/// The most ban API calls applied in one batch.
const API_BATCH: usize = 512;

/// A ban API call: what may be batched.
fn is_api_change(update: &Update) -> bool {
    matches!(
        update,
        Update::Control {
            change: Change::ApiBan { .. } | Change::ApiUnban { .. } | Change::ApiFlush,
            ..
        }
    )
}

/// What a change did to the dataplane, for the operator's answer.
fn effect(a: crate::engine::Applied) -> String {
    if a.batched {
        return "applied and saved with the other changes queued with it".into();
    }
    format!(
        "{} added to and {} removed from the dataplane{}",
        a.added,
        a.removed,
        if a.switched > 0 {
            format!(", {} switched between observe and enforce", a.switched)
        } else {
            String::new()
        }
    )
}
