//! What the feeds bring: APIBAN batches and full pulls, blocklist snapshots, CrowdSec's
//! decision stream.

use std::{collections::BTreeSet, sync::Arc};

use super::{Applied, Enforcer, Engine, IngestReport};
use crate::{
    ledger::SourceId,
    source::apiban::FIRST_ID,
    state::{ApibanCursor, FullPull},
    trust::Provenance,
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
    /// One answer of CrowdSec's decision stream. Each ban passes the sanitiser like any
    /// feed's entry and lasts as long as its decision (at least a second); a decision never
    /// shortens a record (LAPI may send two for one address, the shorter last). A deleted
    /// decision removes its record. `startup` is LAPI's whole list: records it no longer
    /// holds go, as a blocklist's do.
    pub fn crowdsec_stream(
        &mut self,
        startup: bool,
        stream: &crate::source::crowdsec::Stream,
        now: u64,
    ) -> IngestReport {
        let source = SourceId::Crowdsec;
        let mut report = IngestReport {
            received: stream.new.len(),
            ..Default::default()
        };
        for ban in &stream.deleted {
            if Arc::make_mut(&mut self.ledger).remove(&ban.net.trunc(), &source) {
                report.reconciled += 1;
            }
        }
        for ban in &stream.new {
            let comment = ban.comment();
            let net = match self.admit(Provenance::Crowdsec, ban.net, Some(&comment), now) {
                Ok(()) => ban.net.trunc(),
                Err(why) => {
                    let why = why.rule();
                    *report.skipped.entry(why).or_default() += 1;
                    *self.counters.skipped.entry(why).or_default() += 1;
                    continue;
                }
            };
            report.accepted += 1;
            // Rounded up, and a second more: `now` is the wall clock's whole seconds, up to
            // one behind the instant LAPI measured from. Lifting a moment late is harmless;
            // lifting early would cut CrowdSec's decision short.
            let mut ttl = ban.remaining.as_secs_f64().ceil() as u64 + 1;
            if let Some(until) = self
                .ledger
                .record(&net, &source)
                .filter(|r| r.is_live(now))
                .and_then(|r| r.expires)
            {
                ttl = ttl.max(until.saturating_sub(now));
            }
            if Arc::make_mut(&mut self.ledger).observe(net, &source, now, Some(ttl), Some(comment))
            {
                report.new += 1;
            }
        }
        if startup {
            report.reconciled += Arc::make_mut(&mut self.ledger).reconcile(&source, now);
        }
        self.counters.reconciled += report.reconciled as u64;
        report.applied = self.commit(now);
        report
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
        if let Err(why) = self.admit(Provenance::Detection, net, None, now) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{
        engine::{Engine, EngineSettings, MemoryEnforcer},
        ledger::SourceId,
        sanitise::Rejection,
        source::crowdsec::{BanDecision, Stream},
    };

    fn ban(net: &str, secs: u64) -> BanDecision {
        BanDecision {
            net: net.parse().unwrap(),
            remaining: Duration::from_secs(secs),
            origin: "cscli".into(),
            scenario: "test".into(),
        }
    }

    fn stream(new: Vec<BanDecision>, deleted: Vec<BanDecision>) -> Stream {
        Stream {
            new,
            deleted,
            ..Default::default()
        }
    }

    fn engine() -> Engine<MemoryEnforcer> {
        Engine::start(
            MemoryEnforcer::default(),
            None,
            EngineSettings::default(),
            100,
        )
        .unwrap()
        .0
    }

    /// Bans for as long as each decision runs, a range whole, through the sanitiser; a
    /// deleted decision lifts its ban; a later full read drops what LAPI no longer holds.
    #[test]
    fn decisions_ban_for_their_time_and_leave_when_lapi_drops_them() {
        let mut e = engine();
        let r = e.crowdsec_stream(
            true,
            &stream(
                vec![
                    ban("45.91.1.2/32", 120),
                    ban("45.92.0.0/24", 300),
                    ban("2a0e:97c0:1::/48", 300),
                    ban("10.1.2.3/32", 300),
                ],
                vec![],
            ),
            100,
        );
        assert_eq!((r.accepted, r.applied.added), (3, 3));
        assert_eq!(r.skipped[&Rejection::SpecialPurpose], 1);
        let record = e
            .ledger()
            .record(&"45.91.1.2/32".parse().unwrap(), &SourceId::Crowdsec)
            .unwrap()
            .clone();
        // 120 s from a `now` up to a second behind LAPI's: it may end a second late, never early.
        assert_eq!(record.expires, Some(221));
        assert_eq!(record.comment.as_deref(), Some("test (origin cscli)"));
        // Deleted (LAPI repeats a deletion for a while): lifted once, then nothing to do.
        for _ in 0..2 {
            e.crowdsec_stream(false, &stream(vec![], vec![ban("45.91.1.2/32", 0)]), 110);
        }
        assert!(!e.enforcer().deny.contains(&"45.91.1.2/32".parse().unwrap()));
        assert_eq!(e.enforcer().deny.len(), 2);
        // A full read that no longer lists the /48 drops it and keeps the /24.
        let r = e.crowdsec_stream(true, &stream(vec![ban("45.92.0.0/24", 200)], vec![]), 120);
        assert_eq!(r.reconciled, 1);
        assert_eq!(
            e.enforcer()
                .deny
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["45.92.0.0/24"]
        );
        // Its decision's end is honoured by the sweep.
        let (expired, _) = e.sweep(1000);
        assert_eq!(expired, 1);
        assert!(e.enforcer().deny.is_empty());
    }

    /// LAPI counts a decision's end to the nanosecond, the agent's clock in whole seconds:
    /// whatever the fraction, the ban ends at or after the decision's end (CI saw a 15 s
    /// decision lifted after 13.9 s when both were rounded down).
    #[test]
    fn a_decision_never_ends_before_lapi_ends_it() {
        for (millis, into_second) in [(14_947, 999), (15_000, 0), (14_001, 500), (0, 999)] {
            let mut e = engine();
            let mut decision = ban("45.91.3.3/32", 0);
            decision.remaining = Duration::from_millis(millis);
            // The agent read the stream `into_second` ms after Unix second 100 began.
            e.crowdsec_stream(false, &stream(vec![decision], vec![]), 100);
            let expires = e
                .ledger()
                .record(&"45.91.3.3/32".parse().unwrap(), &SourceId::Crowdsec)
                .unwrap()
                .expires
                .unwrap();
            let decision_ends_ms = 100_000 + into_second + millis;
            assert!(
                expires * 1000 >= decision_ends_ms,
                "{millis} ms read at 100.{into_second:03}: lifted at {expires}"
            );
            assert!(
                expires * 1000 <= decision_ends_ms + 2000,
                "{millis} ms: {expires}"
            );
        }
    }

    /// LAPI may send two decisions for one address, the shorter after the longer: the ban
    /// lasts as long as the longer.
    #[test]
    fn a_shorter_decision_never_shortens_a_ban() {
        let mut e = engine();
        e.crowdsec_stream(
            false,
            &stream(
                vec![ban("45.91.1.2/32", 1800), ban("45.91.1.2/32", 120)],
                vec![],
            ),
            100,
        );
        let record = e
            .ledger()
            .record(&"45.91.1.2/32".parse().unwrap(), &SourceId::Crowdsec)
            .unwrap();
        assert_eq!(record.expires, Some(1901));
    }
}
