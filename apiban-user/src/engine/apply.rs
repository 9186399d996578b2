//! Bringing the dataplane to what the ledger wants: the diff, applied by adds before
//! removes, and the switch between observed and enforced entries.

use super::*;

impl<E: Enforcer> Engine<E> {
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
        let (threshold, prefix_len) = self.escalation;
        // A derived block is a ban no feed sent: it passes the sanitiser like one would.
        let derived: Vec<crate::ledger::Escalation> = self
            .ledger
            .escalations(now, prefix_len, threshold)
            .into_iter()
            .filter(|d| self.admit(Provenance::Derived, d.net, None, now).is_ok())
            .collect();
        if *self.derived != derived {
            self.derived = Arc::new(derived);
        }
        let wanted = self
            .ledger
            .desired_with(now, &self.allow, &self.observing, &self.derived);
        // Tighten before anything else: what starts enforcing does so before any add or
        // removal, and what starts observing only after its replacement is in.
        applied.switched = self.switch_marks(&wanted, false);
        let desired = wanted.nets.clone();
        let diff = Diff::between(&self.applied_deny, &desired);
        let (observe_add, enforce_add): (Vec<IpNet>, Vec<IpNet>) =
            diff.add.iter().partition(|n| wanted.observed.contains(n));
        applied.added = self.add_denies(&enforce_add, false) + self.add_denies(&observe_add, true);
        applied.switched += self.switch_marks(&wanted, true);
        if !diff.remove.is_empty() {
            match self.enforcer.undeny(&diff.remove) {
                Ok(()) => {
                    let applied_deny = Arc::make_mut(&mut self.applied_deny);
                    for net in &diff.remove {
                        applied_deny.remove(net);
                    }
                    if !self.applied_observed.is_empty() {
                        let observed = Arc::make_mut(&mut self.applied_observed);
                        for net in &diff.remove {
                            observed.remove(net);
                        }
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
            let (observe_retry, enforce_retry): (Vec<IpNet>, Vec<IpNet>) = desired
                .difference(&self.applied_deny)
                .partition(|n| wanted.observed.contains(n));
            applied.added +=
                self.add_denies(&enforce_retry, false) + self.add_denies(&observe_retry, true);
        }
        self.sync_observing_switch();
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

    /// Switches present entries to enforcing (`to_observe` false) or to observing, as
    /// `wanted` says; returns how many switched.
    pub(super) fn switch_marks(
        &mut self,
        wanted: &crate::ledger::Desired,
        to_observe: bool,
    ) -> usize {
        let nets: Vec<IpNet> = if to_observe {
            wanted
                .observed
                .iter()
                .filter(|n| self.applied_deny.contains(n) && !self.applied_observed.contains(n))
                .copied()
                .collect()
        } else {
            self.applied_observed
                .iter()
                .filter(|n| !wanted.observed.contains(n) && wanted.nets.contains(n))
                .copied()
                .collect()
        };
        if nets.is_empty() {
            return 0;
        }
        if to_observe {
            self.observing_switch = Some(true);
        }
        match self.enforcer.mark(&nets, to_observe) {
            Ok(()) => {
                let observed = Arc::make_mut(&mut self.applied_observed);
                for net in &nets {
                    if to_observe {
                        observed.insert(*net);
                    } else {
                        observed.remove(net);
                    }
                }
                nets.len()
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot switch deny entries between observe and enforce; will retry");
                self.refresh_applied();
                0
            }
        }
    }

    /// Turns the program's reading of the observe mark off once no entry carries it (and
    /// on, on a start with marked entries adopted from pins).
    pub(super) fn sync_observing_switch(&mut self) {
        let on = !self.applied_observed.is_empty();
        if self.observing_switch == Some(on) {
            return;
        }
        match self.enforcer.set_observing(on) {
            Ok(()) => self.observing_switch = Some(on),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot set the dataplane's observe switch")
            }
        }
    }

    /// Adds deny prefixes, observing or enforcing; returns how many went in. A full map is
    /// logged once and counted.
    pub(super) fn add_denies(&mut self, add: &[IpNet], observed: bool) -> usize {
        if add.is_empty() {
            return 0;
        }
        if observed {
            self.observing_switch = Some(true);
        }
        match self.enforcer.deny(add, observed) {
            Ok(()) => {
                Arc::make_mut(&mut self.applied_deny).extend(add.iter().copied());
                if observed {
                    Arc::make_mut(&mut self.applied_observed).extend(add.iter().copied());
                }
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

    pub(super) fn refresh_applied(&mut self) {
        match self
            .enforcer
            .denied()
            .and_then(|d| Ok((d, self.enforcer.observed()?)))
        {
            Ok((d, o)) => {
                self.applied_deny = Arc::new(d);
                self.applied_observed = Arc::new(o);
            }
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot read the deny maps back")
            }
        }
    }
}
