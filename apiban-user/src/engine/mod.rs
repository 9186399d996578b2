//! The engine: the ledger's owner. Everything that changes what is banned goes through here,
//! in one order: sanitise -> ledger -> diff -> dataplane -> state file.
//!
//! It is synchronous and takes the time as an argument, so expiry and reconciliation are
//! tested with an injected clock; the async agent feeds it from the sources and the control
//! socket.
//!
//! Here: the engine's state, start-up, apply/commit/save and settings. `sources` takes what
//! the feeds bring, `manual` what operators change, `enforcer` is where decisions land.
//! Just over 600 lines: the engine's state and its start-up (the saved ledger, the pinned
//! maps) are one piece; what each source does to it is in the files beside it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;

mod apply;
mod cluster;
mod enforcer;
mod manual;
mod sources;

pub use self::{
    cluster::{FleetChange, PendingValue, RemoteChange, Touched},
    enforcer::{Enforcer, MemoryEnforcer},
};
use crate::{
    dataplane::DataplaneError,
    ledger::{Diff, Ledger, Record, SourceId},
    sanitise::{AllowList, Rejection, Sanitiser},
    state::{
        ApibanCursor, ClusterCursor, EntriesView, FORMAT_VERSION, ListCursor, Loaded, State,
        StateError, StateStore, StateView,
    },
    trust::{Checks, Provenance, Refusal},
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read what the dataplane enforces")]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0} is not a prefix the operator can allow or ban here: {1}")]
    Refused(IpNet, String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct EngineSettings {
    /// How long a feed entry stays banned after it was last seen.
    pub ttl: Duration,
    pub min_prefix_v4: u8,
    pub min_prefix_v6: u8,
    /// The allowlist from configuration (flags or config file).
    pub allow: Vec<IpNet>,
    /// Sources on trial: what only they ban is matched and counted, never dropped.
    pub observe: BTreeSet<SourceId>,
    /// IPv6 escalation: this many bans of one source inside one block of this length ban
    /// the block (0: off).
    pub v6_escalation_threshold: usize,
    pub v6_escalation_prefix: u8,
    /// This node's proven peers (`--detect-exempt`): another node's detection ban of one of
    /// them is not enforced here, as this node's own detection would not have banned it.
    pub detect_exempt: Vec<IpNet>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(7 * 86_400),
            min_prefix_v4: 16,
            min_prefix_v6: 32,
            allow: Vec::new(),
            observe: BTreeSet::new(),
            v6_escalation_threshold: 4,
            v6_escalation_prefix: 64,
            detect_exempt: Vec::new(),
        }
    }
}

/// What one change to the ledger did to the dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub removed: usize,
    /// Entries switched in place between observing and enforcing.
    pub switched: usize,
    /// Prefixes that should be enforced but did not fit in the maps.
    pub not_enforced: usize,
    /// Applied with the other changes of a batch (see [`Engine::begin_batch`]): the counts
    /// are the batch's, given with its last change.
    pub batched: bool,
}

/// The outcome of one batch from a feed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestReport {
    pub received: usize,
    pub accepted: usize,
    /// New to the ledger (or reactivated); the rest refreshed existing entries.
    pub new: usize,
    pub skipped: BTreeMap<Rejection, usize>,
    pub reconciled: usize,
    pub applied: Applied,
}

impl IngestReport {
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }
}

/// Counters kept for the life of the agent (status and /metrics).
#[derive(Clone, Debug, Default)]
pub struct EngineCounters {
    pub skipped: BTreeMap<Rejection, u64>,
    pub added: u64,
    pub removed: u64,
    pub expired: u64,
    pub reconciled: u64,
    pub map_full: u64,
    pub saves: u64,
    pub save_failures: u64,
    pub last_save_duration: Duration,
    /// In a fleet: records and allowlist entries from etcd this node refused, by reason.
    pub fleet_refused: BTreeMap<&'static str, u64>,
}

/// The engine's part of a [`crate::snapshot::Snapshot`].
#[derive(Clone, Debug)]
pub struct EngineShared {
    pub ledger: Arc<Ledger>,
    /// Prefixes in the deny maps, as far as the engine applied them.
    pub enforced: Arc<BTreeSet<IpNet>>,
    /// The part of `enforced` that only observes.
    pub observed: Arc<BTreeSet<IpNet>>,
    /// The sources in observe mode.
    pub observing: Arc<BTreeSet<SourceId>>,
    /// The IPv6 blocks banned by escalation.
    pub derived: Arc<Vec<crate::ledger::Escalation>>,
    /// The allowlist in force: configured and manual entries.
    pub allowlist: Arc<AllowList>,
    /// The entries `apiban allow add` made.
    pub manual_allow: Arc<BTreeSet<IpNet>>,
    pub counters: EngineCounters,
    /// The last save failed: the state file is behind what is enforced.
    pub unsaved: bool,
    pub apiban: ApibanCursor,
    /// When each blocklist was last refreshed (Unix seconds).
    pub list_refreshes: BTreeMap<String, u64>,
    /// Where the state is saved; None without a state directory.
    pub state_dir: Option<std::path::PathBuf>,
    /// In a fleet: the etcd revision the ledger reflects (0: none yet, or no fleet).
    pub cluster_revision: i64,
    /// In a fleet: operators' changes etcd has not confirmed yet.
    pub cluster_pending: usize,
    /// In a fleet: the etcd cluster ID the ledger came from (0: not known yet).
    pub cluster_id: u64,
}

#[derive(Debug)]
pub struct StartReport {
    pub restored_entries: usize,
    pub corrupt_state: Option<(std::path::PathBuf, String)>,
    pub applied: Applied,
}

/// The ledger's owner. What readers see is shared with them by [`Engine::snapshot`] without a
/// copy: the ledger, the enforced set and the allowlist are behind `Arc`s, and a change
/// copies one only while a reader's snapshot still holds it (`Arc::make_mut`).
pub struct Engine<E: Enforcer> {
    ledger: Arc<Ledger>,
    sanitiser: Sanitiser,
    config_allow: BTreeSet<IpNet>,
    manual_allow: Arc<BTreeSet<IpNet>>,
    allow: Arc<AllowList>,
    enforcer: E,
    applied_deny: Arc<BTreeSet<IpNet>>,
    /// The part of `applied_deny` that carries the observe mark.
    applied_observed: Arc<BTreeSet<IpNet>>,
    /// Whether the program reads the mark (None: not set by this engine yet).
    observing_switch: Option<bool>,
    observing: Arc<BTreeSet<SourceId>>,
    /// IPv6 escalation's settings and what it derived at the last apply.
    escalation: (usize, u8),
    derived: Arc<Vec<crate::ledger::Escalation>>,
    /// See [`EngineSettings::detect_exempt`].
    detect_exempt: Vec<IpNet>,
    /// The peers this node's detection holds proven (see [`crate::proven_view`]).
    proven: crate::proven_view::ProvenView,
    applied_allow: BTreeSet<IpNet>,
    store: Option<StateStore>,
    apiban: ApibanCursor,
    lists: BTreeMap<String, ListCursor>,
    ttl_secs: u64,
    counters: EngineCounters,
    map_full_logged: bool,
    /// The last save failed: the file is behind the maps until a save succeeds.
    unsaved: bool,
    /// In a fleet: the etcd revision the ledger reflects (see `cluster.rs`).
    cluster: Option<ClusterCursor>,
    /// In a fleet, while an operator's change is being applied: what it is (see
    /// `Engine::expect_fleet_change`).
    fleet_change: Option<cluster::FleetChangeDraft>,
    /// The etcd keys whose refusal was logged (at most [`cluster::REFUSALS_LOGGED`]).
    fleet_refused_logged: std::collections::HashSet<String>,
    /// The source this node's ban API bans as: `api`, or `api:<node>` in a fleet.
    api_source: SourceId,
    /// The fleet's etcd endpoints' addresses, and its nodes' own (from their heartbeats).
    fleet_addresses: (Vec<std::net::IpAddr>, Vec<std::net::IpAddr>),
    /// Inside a batch: commits only note that the dataplane and the state file are behind;
    /// the batch's end applies and saves once (see [`Engine::begin_batch`]).
    batch: Option<bool>,
}

impl<E: Enforcer> Engine<E> {
    /// Restores the ledger from the state directory and makes the dataplane match it, before
    /// any request goes out: protection resumes at once even with the API down.
    pub fn start(
        enforcer: E,
        store: Option<StateStore>,
        settings: EngineSettings,
        now: u64,
    ) -> Result<(Self, StartReport), EngineError> {
        let (state, corrupt_state) = match store.as_ref().map(StateStore::load) {
            None | Some(Loaded::Fresh) => (State::default(), None),
            Some(Loaded::State(s)) => (*s, None),
            Some(Loaded::Corrupt { moved_to, reason }) => {
                tracing::warn!(
                    moved_to = %moved_to.display(),
                    %reason,
                    "state file unreadable; moved aside, starting with a full pull"
                );
                (State::default(), Some((moved_to, reason)))
            }
        };
        let applied_deny = enforcer.denied()?;
        let applied_observed = enforcer.observed()?;
        let applied_allow = enforcer.allowed()?;
        let mut engine = Self {
            ledger: Arc::new(state.ledger()),
            sanitiser: Sanitiser::new(settings.min_prefix_v4, settings.min_prefix_v6, []),
            config_allow: BTreeSet::new(),
            manual_allow: Arc::new(state.allow.iter().map(|n| n.trunc()).collect()),
            allow: Arc::default(),
            enforcer,
            applied_deny: Arc::new(applied_deny),
            applied_observed: Arc::new(applied_observed),
            observing_switch: None,
            observing: Arc::new(settings.observe.clone()),
            escalation: (
                settings.v6_escalation_threshold,
                settings.v6_escalation_prefix,
            ),
            derived: Arc::default(),
            detect_exempt: settings.detect_exempt.clone(),
            proven: Default::default(),
            applied_allow,
            store,
            apiban: state.apiban,
            lists: state.lists,
            ttl_secs: settings.ttl.as_secs(),
            counters: EngineCounters::default(),
            map_full_logged: false,
            unsaved: false,
            cluster: state.cluster,
            fleet_change: None,
            fleet_refused_logged: Default::default(),
            api_source: SourceId::Api,
            batch: None,
            fleet_addresses: Default::default(),
        };
        engine.set_config_allow(settings.allow);
        match crate::sanitise::host_addresses() {
            Ok(own) => engine.sanitiser.set_own_addresses(own),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot list this host's addresses")
            }
        }
        if engine.ledger.is_empty() && !engine.applied_deny.is_empty() {
            // Pinned maps survived but the state did not: keep enforcing them, as APIBAN
            // entries seen just before now, so the next full pull's reconciliation (or
            // expiry) decides about each rather than a flush.
            let seen = now.saturating_sub(1);
            for net in engine.applied_deny.iter().copied().collect::<Vec<_>>() {
                Arc::make_mut(&mut engine.ledger).insert_record(
                    net,
                    SourceId::Apiban,
                    Record {
                        first_seen: seen,
                        last_seen: seen,
                        expires: Some(seen.saturating_add(engine.ttl_secs)),
                        comment: Some("adopted from the pinned maps; state was lost".into()),
                        evidence: None,
                    },
                );
            }
            tracing::warn!(
                entries = engine.applied_deny.len(),
                "no usable state, but the pinned maps hold bans: keeping them until a full pull \
                 settles them"
            );
        }
        let restored_entries = engine.ledger.len();
        engine.counters.expired += Arc::make_mut(&mut engine.ledger).sweep(now) as u64;
        let applied = engine.apply(now);
        Ok((
            engine,
            StartReport {
                restored_entries,
                corrupt_state,
                applied,
            },
        ))
    }

    pub fn enforcer(&self) -> &E {
        &self.enforcer
    }

    /// Which packets a ban applies to: not ledger state, but the engine holds the one
    /// enforcer there is, so the port scope is set through it too.
    pub fn set_scope(&mut self, scope: &crate::dataplane::Scope) -> Result<(), DataplaneError> {
        self.enforcer.set_scope(scope)
    }

    /// Whether the program copies packets to a capture (see `capture`); like the scope, a
    /// switch of the one enforcer there is.
    pub fn set_capture(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.enforcer.set_capture(on)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn allowlist(&self) -> &AllowList {
        &self.allow
    }

    pub fn manual_allow(&self) -> &BTreeSet<IpNet> {
        &self.manual_allow
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    pub fn apiban_cursor(&self) -> &ApibanCursor {
        &self.apiban
    }

    /// The state directory, for what keeps its own files there (the request journal).
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.store.as_ref().map(StateStore::dir)
    }

    pub fn list_cursor(&self, name: &str) -> Option<&ListCursor> {
        self.lists.get(name)
    }

    /// The sources in observe mode.
    pub fn observing(&self) -> &BTreeSet<SourceId> {
        &self.observing
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }

    /// Applies a new configuration (SIGHUP): TTL and minimum prefixes for new entries.
    pub fn set_settings(&mut self, settings: EngineSettings) {
        self.ttl_secs = settings.ttl.as_secs();
        self.sanitiser.min_prefix_v4 = settings.min_prefix_v4;
        self.sanitiser.min_prefix_v6 = settings.min_prefix_v6;
        self.set_config_allow(settings.allow);
        if *self.observing != settings.observe {
            self.observing = Arc::new(settings.observe);
        }
        self.escalation = (
            settings.v6_escalation_threshold,
            settings.v6_escalation_prefix,
        );
        self.detect_exempt = settings.detect_exempt;
    }

    /// This host's addresses changed: feeds may not ban the new ones, and what they banned
    /// before an address became the host's goes, as the sanitiser would have refused it.
    /// Manual bans stay: the operator meant them. Returns the prefixes that were dropped.
    pub fn set_own_addresses(&mut self, own: Vec<std::net::IpAddr>, now: u64) -> Vec<IpNet> {
        self.sanitiser.set_own_addresses(own.iter().copied());
        let dropped = Arc::make_mut(&mut self.ledger)
            .remove_where(|net, source| source.is_remote() && own.iter().any(|a| net.contains(a)));
        if !dropped.is_empty() {
            *self
                .counters
                .skipped
                .entry(Rejection::OwnAddress)
                .or_default() += dropped.len() as u64;
            self.commit(now);
        }
        dropped
    }

    /// The addresses the engine takes as this host's.
    pub fn own_addresses(&self) -> Vec<std::net::IpAddr> {
        self.sanitiser.own_addresses()
    }

    fn set_config_allow(&mut self, nets: Vec<IpNet>) {
        self.config_allow = nets.into_iter().map(|n| n.trunc()).collect();
        self.allow = Arc::new(AllowList::new(
            self.config_allow
                .iter()
                .chain(self.manual_allow.iter())
                .copied(),
        ));
    }

    /// Sanitises a feed's entries into the ledger; the caller commits.
    fn ingest(&mut self, source: &SourceId, items: &[impl AsRef<str>], now: u64) -> IngestReport {
        let mut report = IngestReport {
            received: items.len(),
            ..Default::default()
        };
        for item in items {
            let Some(net) = crate::sanitise::parse_net(item.as_ref()) else {
                *report.skipped.entry(Rejection::Invalid).or_default() += 1;
                *self.counters.skipped.entry(Rejection::Invalid).or_default() += 1;
                continue;
            };
            match self.admit(Provenance::Feed, net, None, now) {
                Ok(()) => {
                    report.accepted += 1;
                    if Arc::make_mut(&mut self.ledger).observe(
                        net,
                        source,
                        now,
                        Some(self.ttl_secs),
                        None,
                    ) {
                        report.new += 1;
                    }
                }
                Err(why) => {
                    let why = why.rule();
                    *report.skipped.entry(why).or_default() += 1;
                    *self.counters.skipped.entry(why).or_default() += 1;
                }
            }
        }
        report
    }

    /// Whether a ban of `net` of this provenance may enter the ledger: see [`crate::trust`],
    /// which decides it.
    fn admit(
        &self,
        from: Provenance,
        net: IpNet,
        comment: Option<&str>,
        now: u64,
    ) -> Result<(), Refusal> {
        let checks = Checks {
            sanitiser: &self.sanitiser,
            allow: &self.allow,
            detect_exempt: &self.detect_exempt,
            proven: &self.proven,
            now,
        };
        crate::trust::admit(from, net, comment, &checks)
    }

    /// Saves the state after a change. A failed save is logged (once for this change) and
    /// counted, never fatal: enforcement goes on from the maps, the file keeps the last good
    /// state, and [`Engine::retry_save`] or the next change brings it up to date.
    pub fn save(&mut self, now: u64) {
        self.save_as(now, true);
    }

    /// Tries again to save a state whose last save failed; quiet unless it succeeds.
    pub fn retry_save(&mut self, now: u64) {
        if self.unsaved {
            self.save_as(now, false);
        }
    }

    /// Whether the state file is behind what is enforced (the last save failed).
    pub fn unsaved(&self) -> bool {
        self.unsaved
    }

    fn save_as(&mut self, now: u64, log_failure: bool) {
        let Some(store) = &self.store else { return };
        let state = StateView {
            version: FORMAT_VERSION,
            saved_at: now,
            apiban: &self.apiban,
            lists: &self.lists,
            allow: self.manual_allow.iter().copied().collect(),
            cluster: self.cluster.as_ref(),
            entries: EntriesView(self.ledger.as_ref()),
        };
        match store.save(&state) {
            Ok(took) => {
                self.counters.saves += 1;
                self.counters.last_save_duration = took;
                if self.unsaved {
                    tracing::info!(
                        failures = self.counters.save_failures,
                        "state saved again: the state file is up to date"
                    );
                }
                self.unsaved = false;
            }
            Err(e) => {
                self.counters.save_failures += 1;
                self.unsaved = true;
                if log_failure {
                    tracing::error!(
                        error = %crate::error_chain(&e),
                        "cannot save state: bans stay enforced; the state file keeps the last \
                         good state and is retried every 10s"
                    );
                }
            }
        }
    }

    fn commit(&mut self, now: u64) -> Applied {
        // In the same save as the change: no kill can keep one without the other.
        self.note_fleet_change();
        if let Some(dirty) = &mut self.batch {
            *dirty = true;
            return Applied {
                batched: true,
                ..Applied::default()
            };
        }
        let applied = self.apply(now);
        self.save(now);
        applied
    }

    /// Starts a batch of changes that are applied to the dataplane and saved once, at
    /// [`Engine::end_batch`]: a flood of ban API calls costs one diff of the ledger and one
    /// save of the state per batch, not per call. Whoever batches answers no change before
    /// the batch's end, so nothing is acknowledged before it is enforced and saved.
    pub fn begin_batch(&mut self) {
        self.batch = Some(false);
    }

    /// Ends the batch: applies and saves what it changed, if anything.
    pub fn end_batch(&mut self, now: u64) -> Applied {
        match self.batch.take() {
            Some(true) => {
                let applied = self.apply(now);
                self.save(now);
                applied
            }
            _ => Applied::default(),
        }
    }

    /// Removes expired entries from ledger and dataplane.
    pub fn sweep(&mut self, now: u64) -> (usize, Applied) {
        let expired = Arc::make_mut(&mut self.ledger).sweep(now);
        self.counters.expired += expired as u64;
        if expired == 0 {
            return (0, Applied::default());
        }
        (expired, self.commit(now))
    }

    /// Settings changed (SIGHUP): re-evaluate what is enforced under them.
    pub fn reconfigure(&mut self, settings: EngineSettings, now: u64) -> Applied {
        self.set_settings(settings);
        self.commit(now)
    }

    /// Prefixes enforced right now (what the maps hold, as far as the engine applied them).
    pub fn enforced(&self) -> &BTreeSet<IpNet> {
        &self.applied_deny
    }

    /// What readers may see, shared rather than copied (see [`crate::snapshot`]).
    pub fn shared(&self) -> EngineShared {
        EngineShared {
            ledger: self.ledger.clone(),
            enforced: self.applied_deny.clone(),
            observed: self.applied_observed.clone(),
            observing: self.observing.clone(),
            derived: self.derived.clone(),
            allowlist: self.allow.clone(),
            manual_allow: self.manual_allow.clone(),
            counters: self.counters.clone(),
            unsaved: self.unsaved,
            apiban: self.apiban.clone(),
            list_refreshes: self
                .lists
                .iter()
                .filter_map(|(name, c)| Some((name.clone(), c.last_refresh?)))
                .collect(),
            state_dir: self.state_dir().map(std::path::Path::to_path_buf),
            cluster_revision: self.cluster_revision(),
            cluster_id: self.cluster.as_ref().map_or(0, |c| c.cluster_id),
            cluster_pending: self.cluster.as_ref().map_or(0, |c| c.pending.len()),
        }
    }
}

#[cfg(test)]
mod tests;
