//! What the feeds bring: APIBAN batches and full pulls, blocklist snapshots.

use std::{collections::BTreeSet, sync::Arc};

use super::{Applied, Enforcer, Engine, IngestReport};
use crate::{
    ledger::SourceId,
    source::apiban::FIRST_ID,
    state::{ApibanCursor, FullPull},
};

impl<E: Enforcer> Engine<E> {
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
}

impl<E: Enforcer> Engine<E> {
    /// A source this host's detection recognised as a scanner: banned for `ttl` with its
    /// evidence, through the same sanitiser as the feeds (the allowlist wins; this host's
    /// addresses and special-purpose ranges are refused).
    pub fn detected(
        &mut self,
        addr: std::net::IpAddr,
        ttl: std::time::Duration,
        evidence: crate::ledger::Evidence,
        now: u64,
    ) -> Result<Applied, super::EngineError> {
        let net = ipnet::IpNet::from(addr);
        if let Err(why) = self.sanitiser.check_net(net, &self.allow) {
            return Err(super::EngineError::Refused(net, why.to_string()));
        }
        let ledger = Arc::make_mut(&mut self.ledger);
        ledger.observe(
            net,
            &SourceId::Detect,
            now,
            Some(ttl.as_secs().max(1)),
            None,
        );
        ledger.note_evidence(&net, &SourceId::Detect, evidence);
        Ok(self.commit(now))
    }
}
