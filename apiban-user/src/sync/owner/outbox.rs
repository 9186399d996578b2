//! What the owner sends to the fleet's etcd writer, and what it keeps when the writer's
//! queue is full (see `cluster::OUTBOX_CHANGES`): an operator's change is pending in the
//! ledger and sent from there, the leader's feed records and sweeps are held by key and sent
//! with the ledger's values once the queue has room.

use super::{Origin, Owner};
use crate::{cluster::Outgoing, engine::Enforcer};

/// What the owner could not queue for the writer (the outbox holds at most
/// [`crate::cluster::OUTBOX_CHANGES`]), as keys of the ledger: sent later with the ledger's
/// values then, each key once however often it changed meanwhile.
#[derive(Default)]
pub(super) struct Shed {
    /// An operator's change: all of them are pending in the ledger, and sent from there.
    pending: bool,
    /// The leader's feed writes, and whether one carried the APIBAN position.
    feed: std::collections::BTreeSet<(ipnet::IpNet, crate::ledger::SourceId)>,
    cursor: bool,
    /// The leader's sweeps, and the oldest ledger revision one was made at (its deletions
    /// compare each key's revision with it, so the oldest deletes the least).
    expired: std::collections::BTreeSet<(ipnet::IpNet, crate::ledger::SourceId)>,
    expired_at: Option<i64>,
}

impl Shed {
    fn is_empty(&self) -> bool {
        !self.pending && self.feed.is_empty() && !self.cursor && self.expired.is_empty()
    }

    fn hold(&mut self, out: Outgoing) {
        let keys = out
            .records
            .into_iter()
            .map(|(net, source, _)| (net, source));
        if out.base_revision.is_some() {
            self.pending = true;
        } else if let Some(revision) = out.expired_at_revision {
            self.expired.extend(keys);
            self.expired_at = Some(self.expired_at.map_or(revision, |r| r.min(revision)));
        } else {
            self.feed.extend(keys);
            self.cursor |= out.cursor.is_some();
        }
    }
}

impl<E: Enforcer> Owner<E> {
    /// Queues `out` for the writer; with the queue full, keeps what sends it later.
    pub(super) fn queue(&mut self, out: Outgoing) {
        use tokio::sync::mpsc::error::TrySendError;
        let Some(link) = &self.cluster else { return };
        match link.outbox.try_send(out) {
            Ok(()) => {}
            Err(TrySendError::Full(out)) => {
                link.stats
                    .outbox_shed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.shed.hold(out);
            }
            // The writer has stopped: so is the agent.
            Err(TrySendError::Closed(_)) => {}
        }
        let queued = link.outbox.max_capacity() - link.outbox.capacity();
        link.stats
            .outbox_queued
            .store(queued as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// What could not be queued, once the writer has emptied half the queue: the pending
    /// operators' changes, the ledger's records of the feed keys and sweeps held.
    pub(super) fn send_shed(&mut self) {
        let Some(link) = &self.cluster else { return };
        if self.shed.is_empty() || link.outbox.capacity() < link.outbox.max_capacity() / 2 {
            return;
        }
        let leading = link.leading();
        let shed = std::mem::take(&mut self.shed);
        if shed.pending {
            self.send_pending(false);
        }
        // Only a leader writes what its feeds found; a later leader writes its own.
        if !leading {
            return;
        }
        let feed = Outgoing {
            records: self.engine.records_now(&shed.feed),
            cursor: shed.cursor.then(|| self.engine.apiban_cursor().clone()),
            fenced: true,
            ..Default::default()
        };
        if !feed.is_empty() {
            self.queue(feed);
        }
        let expired = self
            .engine
            .records_now(&shed.expired)
            .into_iter()
            // Back in the ledger since (seen again): its write supersedes the deletion.
            .filter(|(_, _, record)| record.is_none())
            .collect::<Vec<_>>();
        if let (false, Some(revision)) = (expired.is_empty(), shed.expired_at) {
            self.queue(Outgoing {
                records: expired,
                fenced: true,
                expired_at_revision: Some(revision),
                ..Default::default()
            });
        }
    }

    /// Operators' changes that etcd has not confirmed: at start, those the last agent left;
    /// later, those the queue could not take. Each is still written only if etcd's copy has
    /// not changed since it was made.
    pub(super) fn send_pending(&mut self, at_start: bool) {
        use crate::{engine::PendingValue, state::PendingKey};
        if self.cluster.is_none() {
            return;
        }
        let mut by_change: std::collections::BTreeMap<(u64, i64), Outgoing> = Default::default();
        let pending = self.engine.pending_changes();
        for (change, value) in &pending {
            let out = by_change
                .entry((change.stamp_ms, change.base_revision))
                .or_insert_with(|| Outgoing {
                    base_revision: Some(change.base_revision),
                    stamp_ms: Some(change.stamp_ms),
                    ..Default::default()
                });
            match (&change.key, value) {
                (PendingKey::Record { net, source }, PendingValue::Record(record)) => {
                    out.records.push((*net, source.clone(), record.clone()))
                }
                (PendingKey::Allow { net }, PendingValue::Allow(present)) => {
                    out.allow.push((*net, *present))
                }
                _ => {}
            }
        }
        if at_start && !pending.is_empty() {
            tracing::info!(
                changes = pending.len(),
                "sending etcd the operators' changes it has not confirmed yet"
            );
        }
        for out in by_change.into_values() {
            self.queue(out);
        }
    }

    /// In a fleet, sends what this node changed to etcd (see [`Origin`]).
    pub(super) fn tell_the_fleet(
        &mut self,
        origin: Origin,
        change: Option<crate::engine::FleetChange>,
    ) {
        if self.cluster.is_none() {
            return;
        }
        let out = match origin {
            Origin::Local => {
                self.engine.forget_touched();
                return;
            }
            Origin::Feed => {
                let now = self.engine.apiban_cursor();
                let cursor = (self.cursor_sent.as_ref() != Some(now)).then(|| now.clone());
                if cursor.is_some() {
                    self.cursor_sent.clone_from(&cursor);
                }
                Outgoing {
                    records: self.engine.take_touched(),
                    cursor,
                    fenced: true,
                    ..Default::default()
                }
            }
            Origin::Operator(_) => {
                // Noted pending by the commit that applied it (see `expect_fleet_change`).
                let Some(change) = change else {
                    return;
                };
                if change.records.is_empty() && change.allow.is_empty() {
                    return;
                }
                Outgoing {
                    records: change.records,
                    allow: change.allow,
                    base_revision: Some(change.base_revision),
                    stamp_ms: Some(change.stamp_ms),
                    ..Default::default()
                }
            }
        };
        if !out.is_empty() {
            self.queue(out);
        }
    }
}
