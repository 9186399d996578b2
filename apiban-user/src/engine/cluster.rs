//! A fleet node's engine: the ledger mirrors what etcd holds. Changes that came from etcd
//! are applied as they are, never written back; changes this node made are noted (see
//! `Ledger::keep_journal`) for the owner to send to etcd.

use std::{collections::BTreeSet, sync::Arc};

use ipnet::IpNet;

use super::{Applied, Enforcer, Engine};
use crate::{
    ledger::{Record, SourceId},
    rate_budget::{self, BudgetJournal},
    state::{ApibanCursor, ClusterCursor, PendingChange, PendingKey},
    trust::{FleetRecordKind, Provenance},
};

/// One key's change as a watch delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteChange {
    /// A source's record of a prefix; None: deleted.
    Record {
        net: IpNet,
        source: SourceId,
        record: Option<Record>,
    },
    /// A manual allowlist entry, added or removed.
    Allow { net: IpNet, present: bool },
}

/// A record this node changed, as it is now (None: removed), for etcd.
pub type Touched = (IpNet, SourceId, Option<Record>);

/// How many refused etcd keys a node logs by name; the rest are counted only.
pub const REFUSALS_LOGGED: usize = 1000;

/// An operator's change being applied: its allowlist entry, and its stamp once a commit
/// has noted it.
#[derive(Debug)]
pub struct FleetChangeDraft {
    allow: Option<(IpNet, bool)>,
    stamp_ms: Option<u64>,
}

/// An operator's change, applied and noted pending, for etcd.
#[derive(Debug)]
pub struct FleetChange {
    pub records: Vec<Touched>,
    pub allow: Vec<(IpNet, bool)>,
    /// The revision the node had applied when the change was made.
    pub base_revision: i64,
    pub stamp_ms: u64,
}

/// The stamp of a change made at `now_ms` on a node whose fleet clock is `clock`: never
/// behind anything the node stamped or saw, even when its clock is, or steps back.
fn next_stamp(clock: &mut u64, now_ms: u64) -> u64 {
    *clock = now_ms.max(*clock + 1);
    *clock
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a pending key holds on this node now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingValue {
    Record(Option<Record>),
    Allow(bool),
}

impl<E: Enforcer> Engine<E> {
    /// Makes this engine a fleet node's under `prefix`. A saved revision from another
    /// prefix (another fleet) does not count: the node reads everything again.
    pub fn join_cluster(&mut self, prefix: &str, refresh_slack: u64) {
        Arc::make_mut(&mut self.ledger).keep_journal(refresh_slack);
        if self.cluster.as_ref().is_none_or(|c| c.prefix != prefix) {
            self.cluster = Some(ClusterCursor {
                prefix: prefix.to_owned(),
                revision: 0,
                pending: Vec::new(),
                clock_ms: 0,
                cluster_id: 0,
            });
        }
    }

    /// The etcd revision the ledger reflects; 0 before the first full read.
    pub fn cluster_revision(&self) -> i64 {
        self.cluster.as_ref().map_or(0, |c| c.revision)
    }

    /// What this node changed since the last call, for etcd.
    pub fn take_touched(&mut self) -> Vec<Touched> {
        let touched = Arc::make_mut(&mut self.ledger).take_touched();
        touched
            .into_iter()
            .map(|(net, source)| {
                let record = self.ledger.record(&net, &source).cloned();
                (net, source, record)
            })
            .collect()
    }

    /// The ledger's records of `keys` now (None: it holds none): what a change the owner
    /// could not queue for etcd is sent as later.
    pub fn records_now<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a (IpNet, SourceId)>,
    ) -> Vec<Touched> {
        keys.into_iter()
            .map(|(net, source)| {
                (
                    *net,
                    source.clone(),
                    self.ledger.record(net, source).cloned(),
                )
            })
            .collect()
    }

    /// Forgets what this node changed: changes that are its own only (its addresses, a
    /// sweep that the leader makes fleet-wide).
    pub fn forget_touched(&mut self) {
        Arc::make_mut(&mut self.ledger).forget_touched();
    }

    /// The peers this node's detection holds proven, to weigh other nodes' detection bans.
    pub fn set_proven_view(&mut self, view: crate::proven_view::ProvenView) {
        self.proven = view;
    }

    /// The fleet's etcd endpoints: no source may ban them (a ban would cut every node off
    /// from the fleet). What a feed or etcd banned of them goes; an operator's forced ban
    /// stays. Returns the prefixes that were dropped.
    pub fn set_fleet_addresses(&mut self, fleet: Vec<std::net::IpAddr>, now: u64) -> Vec<IpNet> {
        self.fleet_addresses.0 = fleet;
        self.protect_fleet(now)
    }

    /// The fleet's nodes' own addresses, as their heartbeats say: protected like the etcd
    /// endpoints (see [`Engine::set_fleet_addresses`]).
    pub fn set_member_addresses(&mut self, members: Vec<std::net::IpAddr>, now: u64) -> Vec<IpNet> {
        if self.fleet_addresses.1 == members {
            return Vec::new();
        }
        self.fleet_addresses.1 = members;
        self.protect_fleet(now)
    }

    fn protect_fleet(&mut self, now: u64) -> Vec<IpNet> {
        let fleet: Vec<std::net::IpAddr> = self
            .fleet_addresses
            .0
            .iter()
            .chain(&self.fleet_addresses.1)
            .copied()
            .collect();
        self.sanitiser.set_fleet_addresses(fleet.iter().copied());
        let dropped = Arc::make_mut(&mut self.ledger).remove_where(|net, source| {
            *source != SourceId::Manual && fleet.iter().any(|a| net.contains(a))
        });
        if !dropped.is_empty() {
            self.commit(now);
        }
        dropped
    }

    /// Counts a refusal, and logs it once per key.
    fn note_refused(&mut self, key: String, reason: &'static str) {
        *self.counters.fleet_refused.entry(reason).or_default() += 1;
        if self.fleet_refused_logged.len() < REFUSALS_LOGGED
            && self.fleet_refused_logged.insert(key.clone())
        {
            tracing::warn!(
                key,
                reason,
                "this node refuses an entry in etcd and does not enforce it (counted in \
                 apiban_cluster_records_refused_total)"
            );
        }
    }

    /// A record from etcd as this node takes it: None when it refuses it (then it holds no
    /// record for the key, whatever it held before). Whoever can write to etcd is an outside
    /// party to this node: [`crate::trust`] decides what it may bring.
    fn accept_from_fleet(
        &mut self,
        net: IpNet,
        source: &SourceId,
        record: Option<Record>,
        now: u64,
    ) -> Option<Record> {
        let record = record?;
        let held_here = self.ledger.record(&net, source).is_some();
        let from = Provenance::FleetRecord(FleetRecordKind::of(source, held_here));
        match self.admit(from, net, record.comment.as_deref(), now) {
            Ok(()) => Some(record),
            Err(why) => {
                self.note_refused(format!("records/{source}/{net}"), why.reason());
                None
            }
        }
    }

    /// An allowlist entry from etcd as this node takes it: whether it is present.
    fn accept_allow_from_fleet(&mut self, net: IpNet, present: bool, now: u64) -> bool {
        if !present {
            return false;
        }
        match self.admit(Provenance::FleetAllow, net, None, now) {
            Ok(()) => true,
            Err(why) => {
                self.note_refused(format!("allow/{net}"), why.reason());
                false
            }
        }
    }

    /// Changes a watch delivered, up to `revision`: applied, enforced and saved with the
    /// revision, so that a restart resumes after it.
    pub fn apply_cluster_changes(
        &mut self,
        changes: Vec<RemoteChange>,
        revision: i64,
        now: u64,
    ) -> Applied {
        let mut allow_changed = false;
        for change in changes {
            match change {
                RemoteChange::Record {
                    net,
                    source,
                    record,
                } => {
                    let record = self.accept_from_fleet(net, &source, record, now);
                    Arc::make_mut(&mut self.ledger).apply_remote(net, source, record);
                }
                RemoteChange::Allow { net, present } => {
                    let present = self.accept_allow_from_fleet(net, present, now);
                    let manual = Arc::make_mut(&mut self.manual_allow);
                    allow_changed |= if present {
                        manual.insert(net.trunc())
                    } else {
                        manual.remove(&net.trunc())
                    };
                }
            }
        }
        if allow_changed {
            self.set_config_allow(self.config_allow.iter().copied().collect());
        }
        self.set_cluster_revision(revision);
        self.commit(now)
    }

    /// Everything etcd cluster `cluster_id` holds at `revision`, in place of the ledger (a
    /// first start, a saved revision etcd has compacted away, or an etcd restored or
    /// replaced).
    pub fn replace_from_cluster(
        &mut self,
        records: Vec<(IpNet, SourceId, Record)>,
        allow: Vec<IpNet>,
        (cluster_id, revision): (u64, i64),
        now: u64,
    ) -> Applied {
        if let Some(c) = &mut self.cluster {
            c.cluster_id = cluster_id;
            // From another etcd, revisions start again: the new one is the one to follow.
            c.revision = revision;
        }
        let records = records
            .into_iter()
            .filter_map(|(net, source, record)| {
                let record = self.accept_from_fleet(net, &source, Some(record), now)?;
                Some((net, source, record))
            })
            .collect();
        Arc::make_mut(&mut self.ledger).replace_remote(records);
        let allow: BTreeSet<IpNet> = allow
            .into_iter()
            .filter(|n| self.accept_allow_from_fleet(*n, true, now))
            .map(|n| n.trunc())
            .collect();
        self.manual_allow = Arc::new(allow);
        self.set_config_allow(self.config_allow.iter().copied().collect());
        self.set_cluster_revision(revision);
        self.commit(now)
    }

    /// Takes the fleet's APIBAN position when this node becomes the one that polls.
    pub fn adopt_apiban_cursor(&mut self, cursor: ApibanCursor, now: u64) {
        self.apiban = cursor;
        self.save(now);
    }

    /// Adds the fleet's recent requests to this node's request journal, which the poller
    /// starts its budget from.
    pub fn adopt_fleet_requests(&self, requests_ms: &[u64]) {
        let Some(dir) = self.state_dir() else { return };
        let journal = BudgetJournal::in_dir(dir);
        let merged = rate_budget::merge_sent(&journal.load().unwrap_or_default(), requests_ms);
        if let Err(e) = journal.save(&merged) {
            tracing::warn!(error = %crate::error_chain(&e), "cannot keep the fleet's request times; the poller may wait a window");
        }
    }

    /// Marks what is applied next, until [`Engine::end_fleet_change`], as an operator's
    /// change for the fleet: every record it touches (and `allow`, a manual allowlist
    /// entry added or removed) is noted pending for etcd in the same save that applies it.
    pub fn expect_fleet_change(&mut self, allow: Option<(IpNet, bool)>) {
        if self.cluster.is_some() {
            self.fleet_change = Some(FleetChangeDraft {
                allow,
                stamp_ms: None,
            });
        }
    }

    /// The operator's change that was applied since [`Engine::expect_fleet_change`], for
    /// etcd; None when nothing was (a refused change).
    pub fn end_fleet_change(&mut self) -> Option<FleetChange> {
        let draft = self.fleet_change.take()?;
        let Some(stamp_ms) = draft.stamp_ms else {
            self.forget_touched();
            return None;
        };
        Some(FleetChange {
            records: self.take_touched(),
            allow: draft.allow.into_iter().collect(),
            base_revision: self.cluster_revision(),
            stamp_ms,
        })
    }

    /// Called by every commit: notes the keys an operator's change touched as pending,
    /// with its stamp. A key changed again keeps the revision of its first change, and
    /// takes the stamp of its latest.
    pub(super) fn note_fleet_change(&mut self) {
        let Some(draft) = &mut self.fleet_change else {
            return;
        };
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let stamp_ms = *draft
            .stamp_ms
            .get_or_insert_with(|| next_stamp(&mut cluster.clock_ms, unix_now_ms()));
        let revision = cluster.revision;
        let ledger = self.ledger.as_ref();
        let keys: Vec<PendingKey> = ledger
            .touched()
            .map(|(net, source)| PendingKey::Record {
                net: *net,
                source: source.clone(),
            })
            .chain(
                draft
                    .allow
                    .iter()
                    .map(|(net, _)| PendingKey::Allow { net: *net }),
            )
            .collect();
        for key in keys {
            match cluster.pending.iter_mut().find(|p| p.key == key) {
                Some(p) => p.stamp_ms = stamp_ms,
                None => cluster.pending.push(PendingChange {
                    key,
                    base_revision: revision,
                    stamp_ms,
                }),
            }
        }
    }

    /// A stamp on another node's change, from etcd: this node's next change is stamped
    /// after it.
    pub fn saw_fleet_clock(&mut self, stamp_ms: u64) {
        if let Some(c) = &mut self.cluster {
            c.clock_ms = c.clock_ms.max(stamp_ms);
        }
    }

    /// etcd has settled these keys (taken the change, or kept a later one).
    pub fn settle_pending(&mut self, keys: &[PendingKey]) {
        if let Some(cluster) = &mut self.cluster {
            cluster.pending.retain(|p| !keys.contains(&p.key));
        }
    }

    /// What is still to send, as the node holds it now.
    pub fn pending_changes(&self) -> Vec<(PendingChange, PendingValue)> {
        let Some(cluster) = &self.cluster else {
            return Vec::new();
        };
        cluster
            .pending
            .iter()
            .map(|p| {
                let value = match &p.key {
                    PendingKey::Record { net, source } => {
                        PendingValue::Record(self.ledger.record(net, source).cloned())
                    }
                    PendingKey::Allow { net } => {
                        PendingValue::Allow(self.manual_allow.contains(net))
                    }
                };
                (p.clone(), value)
            })
            .collect()
    }

    fn set_cluster_revision(&mut self, revision: i64) {
        if let Some(c) = &mut self.cluster {
            c.revision = c.revision.max(revision);
        }
    }
}
