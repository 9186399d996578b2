//! The engine: the ledger's owner. Everything that changes what is banned goes through here,
//! in one order: sanitise -> ledger -> diff -> dataplane -> state file.
//!
//! It is synchronous and takes the time as an argument, so expiry and reconciliation are
//! tested with an injected clock; the async agent feeds it from the sources and the control
//! socket.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    dataplane::{Dataplane, DataplaneError},
    ledger::{Diff, Ledger, Record, SourceId},
    sanitise::{AllowList, Rejection, Sanitiser},
    source::apiban::FIRST_ID,
    state::{
        ApibanCursor, EntriesView, FORMAT_VERSION, FullPull, ListCursor, Loaded, State, StateError,
        StateStore, StateView,
    },
};

/// What enforces the ban list: the XDP maps, or an in-memory set for `--dry-run` and tests.
pub trait Enforcer {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError>;
    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError>;
    fn deny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError>;
    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError>;
    fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError>;
    fn unallow(&mut self, net: IpNet) -> Result<(), DataplaneError>;
    /// Which packets a ban applies to; a dry run has no packets.
    fn set_scope(&mut self, _scope: &crate::dataplane::Scope) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl Enforcer for Dataplane {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.deny_hits()?.into_iter().map(|h| h.net).collect())
    }

    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.allow_entries()?.into_iter().collect())
    }

    fn deny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        self.deny_batch(nets).map(drop)
    }

    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        self.undeny_batch(nets).map(drop)
    }

    fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        Dataplane::allow(self, net)
    }

    fn unallow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        Dataplane::unallow(self, net)
    }

    fn set_scope(&mut self, scope: &crate::dataplane::Scope) -> Result<(), DataplaneError> {
        Dataplane::set_scope(self, scope)
    }
}

/// An enforcer that only remembers: `apiban run --dry-run` reports what it would block.
#[derive(Clone, Debug, Default)]
pub struct MemoryEnforcer {
    pub deny: BTreeSet<IpNet>,
    pub allow: BTreeSet<IpNet>,
    /// Deny capacity, to behave like a full map; None is unbounded.
    pub capacity: Option<usize>,
}

impl Enforcer for MemoryEnforcer {
    fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.deny.clone())
    }

    fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
        Ok(self.allow.clone())
    }

    fn deny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        for net in nets {
            if self.capacity.is_some_and(|c| self.deny.len() >= c) {
                return Err(DataplaneError::MapFull {
                    list: crate::dataplane::List::Deny,
                    family: match net {
                        IpNet::V4(_) => crate::dataplane::Family::V4,
                        IpNet::V6(_) => crate::dataplane::Family::V6,
                    },
                    capacity: self.capacity.unwrap_or(0) as u32,
                });
            }
            self.deny.insert(*net);
        }
        Ok(())
    }

    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
        for net in nets {
            self.deny.remove(net);
        }
        Ok(())
    }

    fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        self.allow.insert(net);
        Ok(())
    }

    fn unallow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        self.allow.remove(&net);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read what the dataplane enforces")]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0} is not a prefix the operator can allow or ban here: {1}")]
    Refused(IpNet, String),
}

/// The longest comment a manual ban may carry, in characters: a note for the operator who
/// reads `apiban check`, not a document (the state file holds every comment).
pub const MAX_COMMENT_CHARS: usize = 200;

#[derive(Clone, Debug, PartialEq)]
pub struct EngineSettings {
    /// How long a feed entry stays banned after it was last seen.
    pub ttl: Duration,
    pub min_prefix_v4: u8,
    pub min_prefix_v6: u8,
    /// The allowlist from configuration (flags or config file).
    pub allow: Vec<IpNet>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(7 * 86_400),
            min_prefix_v4: 16,
            min_prefix_v6: 32,
            allow: Vec::new(),
        }
    }
}

/// What one change to the ledger did to the dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub removed: usize,
    /// Prefixes that should be enforced but did not fit in the maps.
    pub not_enforced: usize,
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
}

/// The engine's part of a [`crate::snapshot::Snapshot`].
#[derive(Clone, Debug)]
pub struct EngineShared {
    pub ledger: Arc<Ledger>,
    pub enforced: Arc<BTreeSet<IpNet>>,
    pub allowlist: Arc<AllowList>,
    pub manual_allow: Arc<BTreeSet<IpNet>>,
    pub counters: EngineCounters,
    pub unsaved: bool,
    pub apiban: ApibanCursor,
    pub list_refreshes: BTreeMap<String, u64>,
    pub state_dir: Option<std::path::PathBuf>,
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
    applied_allow: BTreeSet<IpNet>,
    store: Option<StateStore>,
    apiban: ApibanCursor,
    lists: BTreeMap<String, ListCursor>,
    ttl_secs: u64,
    counters: EngineCounters,
    map_full_logged: bool,
    /// The last save failed: the file is behind the maps until a save succeeds.
    unsaved: bool,
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
        let applied_allow = enforcer.allowed()?;
        let mut engine = Self {
            ledger: Arc::new(state.ledger()),
            sanitiser: Sanitiser::new(settings.min_prefix_v4, settings.min_prefix_v6, []),
            config_allow: BTreeSet::new(),
            manual_allow: Arc::new(state.allow.iter().map(|n| n.trunc()).collect()),
            allow: Arc::default(),
            enforcer,
            applied_deny: Arc::new(applied_deny),
            applied_allow,
            store,
            apiban: state.apiban,
            lists: state.lists,
            ttl_secs: settings.ttl.as_secs(),
            counters: EngineCounters::default(),
            map_full_logged: false,
            unsaved: false,
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

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }

    /// Applies a new configuration (SIGHUP): TTL and minimum prefixes for new entries.
    pub fn set_settings(&mut self, settings: EngineSettings) {
        self.ttl_secs = settings.ttl.as_secs();
        self.sanitiser.min_prefix_v4 = settings.min_prefix_v4;
        self.sanitiser.min_prefix_v6 = settings.min_prefix_v6;
        self.set_config_allow(settings.allow);
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
            match self.sanitiser.check(item.as_ref(), &self.allow) {
                Ok(net) => {
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
                    *report.skipped.entry(why).or_default() += 1;
                    *self.counters.skipped.entry(why).or_default() += 1;
                }
            }
        }
        report
    }

    /// Makes the dataplane equal to the ledger by adds and removes only: adds first, so that
    /// replacing a prefix by a wider one never leaves a moment without the ban.
    pub fn apply(&mut self, now: u64) -> Applied {
        let mut applied = Applied::default();
        let allow_wanted: BTreeSet<IpNet> = self.allow.iter().copied().collect();
        for net in allow_wanted.difference(&self.applied_allow.clone()) {
            match self.enforcer.allow(*net) {
                Ok(()) => {
                    self.applied_allow.insert(*net);
                }
                Err(e) => {
                    tracing::error!(%net, error = %crate::error_chain(&e), "cannot add allowlist entry")
                }
            }
        }
        let desired = self.ledger.desired(now, &self.allow);
        let diff = Diff::between(&self.applied_deny, &desired);
        applied.added = self.add_denies(&diff.add);
        if !diff.remove.is_empty() {
            match self.enforcer.undeny(&diff.remove) {
                Ok(()) => {
                    let applied_deny = Arc::make_mut(&mut self.applied_deny);
                    for net in &diff.remove {
                        applied_deny.remove(net);
                    }
                    applied.removed = diff.remove.len();
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "cannot remove deny entries; will retry");
                    let before = self.applied_deny.len();
                    self.refresh_applied();
                    applied.removed = before.saturating_sub(self.applied_deny.len());
                }
            }
        }
        if applied.added < diff.add.len() && applied.removed > 0 {
            // The removals made room in a full map.
            let retry: Vec<IpNet> = desired.difference(&self.applied_deny).copied().collect();
            applied.added += self.add_denies(&retry);
        }
        applied.not_enforced = desired.difference(&self.applied_deny).count();
        let stale_allow: Vec<IpNet> = self
            .applied_allow
            .difference(&allow_wanted)
            .copied()
            .collect();
        for net in stale_allow {
            match self.enforcer.unallow(net) {
                Ok(()) => {
                    self.applied_allow.remove(&net);
                }
                Err(e) => {
                    tracing::error!(%net, error = %crate::error_chain(&e), "cannot remove allowlist entry")
                }
            }
        }
        self.counters.added += applied.added as u64;
        self.counters.removed += applied.removed as u64;
        applied
    }

    /// Adds deny prefixes; returns how many went in. A full map is logged once and counted.
    fn add_denies(&mut self, add: &[IpNet]) -> usize {
        if add.is_empty() {
            return 0;
        }
        match self.enforcer.deny(add) {
            Ok(()) => {
                Arc::make_mut(&mut self.applied_deny).extend(add.iter().copied());
                add.len()
            }
            Err(e) => {
                // Part of the batch may be in: ask the maps what they hold now. Count what
                // of this batch they hold, not how much they grew: they may hold entries
                // the engine did not put there (a previous agent's), and must not make the
                // count exceed the batch.
                self.refresh_applied();
                let added = add.iter().filter(|n| self.applied_deny.contains(n)).count();
                self.counters.map_full += 1;
                if !self.map_full_logged {
                    self.map_full_logged = true;
                    tracing::error!(
                        error = %crate::error_chain(&e),
                        not_enforced = add.len().saturating_sub(added),
                        "deny map full: new bans are not enforced, existing ones stay"
                    );
                }
                added
            }
        }
    }

    fn refresh_applied(&mut self) {
        match self.enforcer.denied() {
            Ok(d) => self.applied_deny = Arc::new(d),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot read the deny maps back")
            }
        }
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
        let applied = self.apply(now);
        self.save(now);
        applied
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

    /// Starts a full pull (no state yet, or reconciliation due), saved so that a crash
    /// resumes it rather than starting over.
    pub fn begin_full_pull(&mut self, now: u64) -> ApibanCursor {
        self.apiban.full_pull = Some(FullPull {
            started_at: now,
            next_id: FIRST_ID.into(),
            seen: 0,
        });
        self.save(now);
        self.apiban.clone()
    }

    /// One APIBAN batch: into the ledger, into the maps, onto disk, with the next ID.
    pub fn apiban_batch(
        &mut self,
        addresses: &[String],
        next_id: String,
        now: u64,
    ) -> IngestReport {
        let mut report = self.ingest(&SourceId::Apiban, addresses, now);
        match &mut self.apiban.full_pull {
            Some(pull) => {
                pull.next_id = next_id;
                pull.seen += addresses.len() as u64;
            }
            None => self.apiban.next_id = Some(next_id),
        }
        report.applied = self.commit(now);
        report
    }

    /// "No new bans". Ends a full pull with reconciliation: APIBAN entries not seen during
    /// the pull have left the list.
    pub fn apiban_done(&mut self, now: u64) -> IngestReport {
        let mut report = IngestReport::default();
        if let Some(pull) = self.apiban.full_pull.take() {
            if pull.seen > 0 {
                report.reconciled =
                    Arc::make_mut(&mut self.ledger).reconcile(&SourceId::Apiban, pull.started_at);
                self.counters.reconciled += report.reconciled as u64;
            } else {
                tracing::warn!(
                    "APIBAN returned an empty list on a full pull; keeping existing bans until \
                     they expire"
                );
            }
            self.apiban.next_id = Some(pull.next_id);
            self.apiban.last_full_pull = Some(now);
            report.applied = self.commit(now);
        } else {
            // An incremental poll that found nothing new changed nothing to save: writing
            // (and fsyncing) the whole ledger every poll interval costs, and on a full disk
            // would log a failure for a change that never happened.
            report.applied = self.apply(now);
        }
        report
    }

    /// A complete, fresh copy of a blocklist: refresh what is listed, drop what left it.
    pub fn list_snapshot(&mut self, name: &str, items: &[&str], now: u64) -> IngestReport {
        let source = SourceId::List(name.to_owned());
        let mut report = self.ingest(&source, items, now);
        if report.received > 0 {
            report.reconciled = Arc::make_mut(&mut self.ledger).reconcile(&source, now);
            self.counters.reconciled += report.reconciled as u64;
        } else {
            tracing::warn!(
                list = name,
                "blocklist is empty; keeping its bans until they expire"
            );
        }
        self.lists.entry(name.to_owned()).or_default().last_refresh = Some(now);
        report.applied = self.commit(now);
        report
    }

    /// Blocklists the engine has state for.
    pub fn list_names(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = self.lists.keys().cloned().collect();
        for (_, records) in self.ledger.iter() {
            for (source, _) in records {
                if let SourceId::List(name) = source {
                    names.insert(name.clone());
                }
            }
        }
        names.into_iter().collect()
    }

    /// A blocklist left the configuration: its bans go with it.
    pub fn drop_list(&mut self, name: &str, now: u64) -> (usize, Applied) {
        let removed =
            Arc::make_mut(&mut self.ledger).remove_source(&SourceId::List(name.to_owned()));
        self.lists.remove(name);
        (removed, self.commit(now))
    }

    /// Settings changed (SIGHUP): re-evaluate what is enforced under them.
    pub fn reconfigure(&mut self, settings: EngineSettings, now: u64) -> Applied {
        self.set_settings(settings);
        self.commit(now)
    }

    /// `apiban ban`: any prefix, the operator's own TTL or none. What would cut the host off
    /// from itself (loopback, its own addresses) or have no effect (the allowlist wins) is
    /// refused, naming why, unless `force`.
    pub fn ban(
        &mut self,
        net: IpNet,
        ttl: Option<Duration>,
        comment: Option<String>,
        force: bool,
        now: u64,
    ) -> Result<Applied, EngineError> {
        let net = net.trunc();
        let refuse = |why: String| Err(EngineError::Refused(net, why));
        if net.prefix_len() == 0 {
            return refuse("a ban of the whole address family".into());
        }
        if ttl.is_some_and(|t| t.as_secs() == 0) {
            return refuse(
                "a TTL under 1s expires at once; omit --ttl for a ban until unbanned".into(),
            );
        }
        if let Some(c) = &comment
            && c.chars().count() > MAX_COMMENT_CHARS
        {
            return refuse(format!(
                "the comment has {} characters, more than the {MAX_COMMENT_CHARS} allowed",
                c.chars().count()
            ));
        }
        if !force {
            let loopback: [IpNet; 2] = [
                IpNet::V4(ipnet::Ipv4Net::new_assert(std::net::Ipv4Addr::LOCALHOST, 8).trunc()),
                IpNet::V6(ipnet::Ipv6Net::new_assert(
                    std::net::Ipv6Addr::LOCALHOST,
                    128,
                )),
            ];
            let force_hint = "; add --force to ban it anyway";
            if let Some(lo) = loopback
                .iter()
                .find(|lo| lo.contains(&net) || net.contains(*lo))
            {
                return refuse(format!("it covers loopback ({lo}){force_hint}"));
            }
            if let Some(own) = self
                .sanitiser
                .own_addresses()
                .into_iter()
                .find(|a| net.contains(a))
            {
                return refuse(format!(
                    "it covers {own}, an address of this host{force_hint}"
                ));
            }
            if self.allow.covers(&net) {
                let entry = self
                    .allow
                    .covering(net.network())
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                return refuse(format!(
                    "the allowlist covers it ({entry}) and wins, so the ban would have no \
                     effect; remove it from the allowlist first, or add --force to record it \
                     anyway"
                ));
            }
        }
        Arc::make_mut(&mut self.ledger).observe(
            net,
            &SourceId::Manual,
            now,
            ttl.map(|t| t.as_secs()),
            comment,
        );
        Ok(self.commit(now))
    }

    /// `apiban unban`: removes the prefix from every source. A feed that lists it again bans
    /// it again; `apiban allow add` is the lasting way. Returns the sources that held it.
    pub fn unban(&mut self, net: IpNet, now: u64) -> (Vec<SourceId>, Applied) {
        let net = net.trunc();
        let sources: Vec<SourceId> = self
            .ledger
            .get(&net)
            .map(|r| r.iter().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default();
        if !sources.is_empty() {
            let ledger = Arc::make_mut(&mut self.ledger);
            for source in &sources {
                ledger.remove(&net, source);
            }
        }
        (sources, self.commit(now))
    }

    pub fn allow_add(&mut self, net: IpNet, now: u64) -> Applied {
        Arc::make_mut(&mut self.manual_allow).insert(net.trunc());
        self.set_config_allow(self.config_allow.iter().copied().collect());
        self.commit(now)
    }

    /// Removes a manual allow entry; configured ones stay (they come back on every reload).
    pub fn allow_remove(&mut self, net: IpNet, now: u64) -> Result<Applied, EngineError> {
        let net = net.trunc();
        if !Arc::make_mut(&mut self.manual_allow).remove(&net) {
            let why = if self.config_allow.contains(&net) {
                "it comes from the configuration; remove it there and reload"
            } else {
                "it is not on the allowlist"
            };
            return Err(EngineError::Refused(net, why.into()));
        }
        self.set_config_allow(self.config_allow.iter().copied().collect());
        Ok(self.commit(now))
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        crate::sanitise::parse_net(s).unwrap()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn temp_store(name: &str) -> (std::path::PathBuf, StateStore) {
        let dir = std::env::temp_dir().join(format!("apiban-engine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = StateStore::open(&dir).unwrap();
        (dir, store)
    }

    fn settings(ttl_secs: u64) -> EngineSettings {
        EngineSettings {
            ttl: Duration::from_secs(ttl_secs),
            ..Default::default()
        }
    }

    #[test]
    fn full_pull_then_incremental_then_reconciliation() {
        let (mut e, _) =
            Engine::start(MemoryEnforcer::default(), None, settings(1000), 100).unwrap();
        e.begin_full_pull(100);
        let r = e.apiban_batch(
            &strings(&["1.1.1.1", "2.2.2.2", "10.0.0.1", "junk"]),
            "200".into(),
            100,
        );
        assert_eq!((r.received, r.accepted, r.applied.added), (4, 2, 2));
        assert_eq!(r.skipped[&Rejection::SpecialPurpose], 1);
        assert_eq!(r.skipped[&Rejection::Invalid], 1);
        // Protection grows with each batch, before the pull ends.
        assert_eq!(e.enforcer().deny.len(), 2);
        e.apiban_batch(&strings(&["3.3.3.3"]), "300".into(), 101);
        e.apiban_done(102);
        assert_eq!(e.apiban_cursor().next_id.as_deref(), Some("300"));
        assert_eq!(e.apiban_cursor().last_full_pull, Some(102));
        // Incremental: a new address.
        e.apiban_batch(&strings(&["4.4.4.4"]), "400".into(), 200);
        assert_eq!(e.apiban_cursor().next_id.as_deref(), Some("400"));
        // The next full pull no longer lists 1.1.1.1.
        e.begin_full_pull(300);
        e.apiban_batch(
            &strings(&["2.2.2.2", "3.3.3.3", "4.4.4.4"]),
            "500".into(),
            300,
        );
        assert!(
            e.enforcer().deny.contains(&net("1.1.1.1")),
            "still banned mid-pull"
        );
        let done = e.apiban_done(301);
        assert_eq!((done.reconciled, done.applied.removed), (1, 1));
        assert!(!e.enforcer().deny.contains(&net("1.1.1.1")));
        assert_eq!(e.enforcer().deny.len(), 3);
    }

    #[test]
    fn an_empty_full_pull_does_not_empty_the_dataplane() {
        let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(1000), 0).unwrap();
        e.apiban_batch(&strings(&["1.1.1.1"]), "200".into(), 0);
        e.begin_full_pull(10);
        let done = e.apiban_done(11);
        assert_eq!(done.reconciled, 0);
        assert_eq!(e.enforcer().deny.len(), 1);
    }

    #[test]
    fn expiry_and_reactivation_with_an_injected_clock() {
        let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 0).unwrap();
        e.apiban_batch(&strings(&["1.1.1.1", "2.2.2.2"]), "2".into(), 0);
        e.apiban_batch(&strings(&["2.2.2.2"]), "3".into(), 60);
        assert_eq!(e.sweep(99).0, 0);
        let (expired, applied) = e.sweep(100);
        assert_eq!((expired, applied.removed), (1, 1));
        assert_eq!(e.enforcer().deny, BTreeSet::from([net("2.2.2.2")]));
        let r = e.apiban_batch(&strings(&["1.1.1.1"]), "4".into(), 150);
        assert_eq!((r.new, r.applied.added), (1, 1));
        assert_eq!(e.sweep(160).0, 1, "2.2.2.2 expires at 160");
        assert_eq!(e.enforcer().deny, BTreeSet::from([net("1.1.1.1")]));
    }

    #[test]
    fn manual_bans_allows_and_the_allowlist() {
        let mut s = settings(100);
        s.allow = vec![net("5.5.0.0/16")];
        let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, s, 0).unwrap();
        assert!(e.enforcer().allow.contains(&net("5.5.0.0/16")));
        let r = e.apiban_batch(&strings(&["5.5.5.5", "6.6.6.6"]), "1".into(), 0);
        assert_eq!(r.skipped[&Rejection::Allowlisted], 1);
        // Manual bans take any prefix and survive the sweep without a TTL.
        e.ban(net("7.0.0.0/8"), None, Some("lab".into()), false, 0)
            .unwrap();
        assert!(e.ban(net("0.0.0.0/0"), None, None, true, 0).is_err());
        e.ban(
            net("8.8.8.8"),
            Some(Duration::from_secs(10)),
            None,
            false,
            0,
        )
        .unwrap();
        e.sweep(1000);
        assert_eq!(e.enforcer().deny, BTreeSet::from([net("7.0.0.0/8")]));
        // A manual allow pulls an already banned feed entry out of the maps.
        e.apiban_batch(&strings(&["6.6.6.6"]), "2".into(), 1000);
        e.allow_add(net("6.6.6.0/24"), 1000);
        assert!(!e.enforcer().deny.contains(&net("6.6.6.6")));
        assert!(e.enforcer().allow.contains(&net("6.6.6.0/24")));
        e.allow_remove(net("6.6.6.0/24"), 1001).unwrap();
        assert!(e.enforcer().deny.contains(&net("6.6.6.6")));
        assert!(
            e.allow_remove(net("5.5.0.0/16"), 1001).is_err(),
            "configured allows stay"
        );
        let (sources, applied) = e.unban(net("6.6.6.6"), 1002);
        assert_eq!((sources, applied.removed), (vec![SourceId::Apiban], 1));
    }

    #[test]
    fn manual_bans_that_cut_the_host_off_or_do_nothing_are_refused() {
        let mut s = settings(100);
        s.allow = vec![net("192.0.2.0/24")];
        let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, s, 0).unwrap();
        e.set_own_addresses(vec!["203.0.113.5".parse().unwrap()], 0);
        let refused = |e: &mut Engine<MemoryEnforcer>, n: &str, force: bool| {
            e.ban(net(n), None, None, force, 0).unwrap_err().to_string()
        };
        assert!(refused(&mut e, "127.0.0.1", false).contains("loopback"));
        assert!(refused(&mut e, "::1", false).contains("loopback"));
        assert!(refused(&mut e, "127.0.0.0/4", false).contains("loopback"));
        let own = refused(&mut e, "203.0.113.0/24", false);
        assert!(
            own.contains("203.0.113.5, an address of this host"),
            "{own}"
        );
        assert!(own.contains("--force"), "{own}");
        let allowed = refused(&mut e, "192.0.2.7", false);
        assert!(
            allowed.contains("allowlist covers it (192.0.2.0/24)"),
            "{allowed}"
        );
        // Partly allowlisted is a real ban: the allowlist carves out its part.
        e.ban(net("192.0.0.0/16"), None, None, false, 0).unwrap();
        assert!(
            e.ban(
                net("1.2.3.4"),
                Some(Duration::from_millis(500)),
                None,
                false,
                0
            )
            .unwrap_err()
            .to_string()
            .contains("expires at once")
        );
        let long = "x".repeat(MAX_COMMENT_CHARS + 1);
        assert!(
            e.ban(net("1.2.3.4"), None, Some(long), false, 0)
                .unwrap_err()
                .to_string()
                .contains("more than the 200 allowed")
        );
        e.ban(
            net("1.2.3.4"),
            None,
            Some("x".repeat(MAX_COMMENT_CHARS)),
            false,
            0,
        )
        .unwrap();
        // The operator insists.
        e.ban(net("203.0.113.0/24"), None, None, true, 0).unwrap();
        assert!(e.enforcer().deny.contains(&net("203.0.113.0/24")));
        assert!(refused(&mut e, "0.0.0.0/0", true).contains("whole address family"));
    }

    #[test]
    fn a_full_map_is_counted_and_existing_bans_stay() {
        let enforcer = MemoryEnforcer {
            capacity: Some(3),
            ..Default::default()
        };
        let (mut e, _) = Engine::start(enforcer, None, settings(100), 0).unwrap();
        e.apiban_batch(&strings(&["1.1.1.1", "1.1.1.2"]), "1".into(), 0);
        let r = e.apiban_batch(&strings(&["1.1.1.3", "1.1.1.4", "1.1.1.5"]), "2".into(), 0);
        assert_eq!((r.applied.added, r.applied.not_enforced), (1, 2));
        assert_eq!(e.enforcer().deny.len(), 3);
        assert_eq!(e.counters().map_full, 1);
        // Room again after an unban: the same change enforces one that was waiting.
        let (_, applied) = e.unban(net("1.1.1.1"), 1);
        assert_eq!(
            (applied.removed, applied.added, applied.not_enforced),
            (1, 1, 1)
        );
        assert_eq!(e.enforcer().deny.len(), 3);
        assert!(!e.enforcer().deny.contains(&net("1.1.1.1")));
    }

    #[test]
    fn restart_restores_before_any_request_and_resumes_the_pull() {
        let (dir, store) = temp_store("restart");
        let (mut e, _) =
            Engine::start(MemoryEnforcer::default(), Some(store), settings(1000), 0).unwrap();
        e.begin_full_pull(0);
        e.apiban_batch(&strings(&["1.1.1.1", "2a01:4f8::1"]), "250".into(), 0);
        e.ban(net("9.9.9.0/24"), None, Some("ops".into()), false, 0)
            .unwrap();
        e.allow_add(net("3.3.3.3"), 0);
        drop(e);
        // A new process: empty maps (a reboot), the state file only.
        let store = StateStore::open(&dir).unwrap();
        let (e, report) =
            Engine::start(MemoryEnforcer::default(), Some(store), settings(1000), 5).unwrap();
        assert_eq!(report.restored_entries, 3);
        assert_eq!(report.applied.added, 3);
        assert!(e.enforcer().allow.contains(&net("3.3.3.3")));
        let pull = e.apiban_cursor().full_pull.clone().unwrap();
        assert_eq!((pull.next_id.as_str(), pull.seen), ("250", 2));
        drop(e);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Maps that fill up and, read back, hold more than the engine put there.
    #[derive(Default)]
    struct CrowdedMaps {
        deny: BTreeSet<IpNet>,
    }

    impl Enforcer for CrowdedMaps {
        fn denied(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
            Ok(self.deny.clone())
        }
        fn allowed(&self) -> Result<BTreeSet<IpNet>, DataplaneError> {
            Ok(BTreeSet::new())
        }
        fn deny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
            // Half goes in, then the map is full; meanwhile a previous agent's program put
            // three entries of its own there.
            self.deny.extend(nets.iter().take(nets.len() / 2).copied());
            self.deny
                .extend(["9.9.9.1", "9.9.9.2", "9.9.9.3"].iter().map(|s| net(s)));
            Err(DataplaneError::MapFull {
                list: crate::dataplane::List::Deny,
                family: crate::dataplane::Family::V4,
                capacity: 4,
            })
        }
        fn undeny(&mut self, nets: &[IpNet]) -> Result<(), DataplaneError> {
            for n in nets {
                self.deny.remove(n);
            }
            Ok(())
        }
        fn allow(&mut self, _: IpNet) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn unallow(&mut self, _: IpNet) -> Result<(), DataplaneError> {
            Ok(())
        }
    }

    #[test]
    fn a_full_map_holding_foreign_entries_does_not_break_the_count() {
        let (mut e, _) = Engine::start(CrowdedMaps::default(), None, settings(100), 0).unwrap();
        let r = e.apiban_batch(&strings(&["1.1.1.1", "1.1.1.2"]), "1".into(), 0);
        assert_eq!((r.applied.added, r.applied.not_enforced), (1, 1));
        assert_eq!(e.counters().map_full, 1);
    }

    #[test]
    fn pinned_bans_without_state_are_kept_until_a_pull_settles_them() {
        let pinned = MemoryEnforcer {
            deny: BTreeSet::from([net("1.1.1.1"), net("2.2.2.2")]),
            ..Default::default()
        };
        let (mut e, report) = Engine::start(pinned, None, settings(1000), 50).unwrap();
        assert_eq!(report.applied.removed, 0);
        assert_eq!(e.enforcer().deny.len(), 2);
        e.begin_full_pull(50);
        e.apiban_batch(&strings(&["2.2.2.2"]), "9".into(), 50);
        e.apiban_done(51);
        assert_eq!(e.enforcer().deny, BTreeSet::from([net("2.2.2.2")]));
    }
}
