//! The ledger: the single record of what is banned, by whom, since when and until when.
//!
//! One prefix may be banned by several sources at once (APIBAN and a blocklist, say); each
//! source keeps its own record, and the prefix stays banned while any record is alive.
//! Times are Unix seconds, passed in by the caller so that expiry is testable.

mod source_id;

pub use source_id::SourceId;
use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::sanitise::AllowList;

/// One source's ban of one prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub first_seen: u64,
    pub last_seen: u64,
    /// None: until removed (manual bans without a TTL).
    pub expires: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Why detection banned it; boxed, since almost no record has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Box<Evidence>>,
}

/// What a detection rule saw, kept with its ban so that `check` can say why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The rule's name, e.g. `scanner-user-agent`.
    pub rule: String,
    /// What the rule counted, e.g. `REGISTER 240 in 10s`.
    pub counts: String,
    /// The first matching line of a request, printable and truncated.
    pub line: String,
    /// When the rule matched (Unix seconds).
    pub at: u64,
    /// How many times detection has banned this source (its TTL doubles each time).
    pub offence: u32,
    /// The evidence could not have been brought by someone forging the source address (it
    /// rests on the server's answers, which only the real source sees). Older records lack
    /// it: they came from rules that read requests only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unforgeable: bool,
}

impl Record {
    pub fn is_live(&self, now: u64) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// The records of one prefix, one per source. Almost always exactly one: a Vec costs one
/// small allocation where a map would cost a whole node per prefix (measured: 109 MiB vs
/// about a fifth of that for 100k entries).
pub type Records = Vec<(SourceId, Record)>;

#[derive(Clone, Debug, Default)]
pub struct Ledger {
    entries: BTreeMap<IpNet, Records>,
    /// Records per (source, is_ipv6), kept as records come and go so that `status` does not
    /// walk the ledger to count them.
    counts: BTreeMap<(SourceId, bool), usize>,
    /// In a fleet: the records changed since the owner last took them, to write to etcd.
    journal: Option<Journal>,
}

/// What a fleet node's ledger notes for etcd.
#[derive(Clone, Debug, Default)]
struct Journal {
    touched: BTreeSet<(IpNet, SourceId)>,
    /// A re-sighting moves a record's expiry only once it would move by this much: etcd
    /// keeps every write in its history, and a feed re-lists most entries every pull.
    refresh_slack: u64,
}

fn touch(journal: &mut Option<Journal>, net: IpNet, source: &SourceId) {
    if let Some(j) = journal {
        j.touched.insert((net, source.clone()));
    }
}

/// Adds a record of `source` for `net` to the counts, or takes one away.
fn count(
    counts: &mut BTreeMap<(SourceId, bool), usize>,
    source: &SourceId,
    net: &IpNet,
    added: bool,
) {
    let key = (source.clone(), matches!(net, IpNet::V6(_)));
    if added {
        *counts.entry(key).or_default() += 1;
    } else if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// A block banned because one source banned enough addresses in it (see
/// [`Ledger::escalations`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escalation {
    pub net: IpNet,
    pub source: SourceId,
    /// How many of the source's bans are inside it.
    pub from: usize,
    /// The latest expiry among them; None: one never expires.
    pub expires: Option<u64>,
}

/// What the dataplane should hold (see [`Ledger::desired_modes`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub nets: BTreeSet<IpNet>,
    /// The part of `nets` that only observes.
    pub observed: BTreeSet<IpNet>,
}

/// What must change in the dataplane to make it equal to the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub add: Vec<IpNet>,
    pub remove: Vec<IpNet>,
}

impl Diff {
    pub fn between(applied: &BTreeSet<IpNet>, desired: &BTreeSet<IpNet>) -> Self {
        Self {
            add: desired.difference(applied).copied().collect(),
            remove: applied.difference(desired).copied().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// `source` reports `net` at `now`: a new record, or a refresh that extends its expiry.
    /// Returns true when the record is new (or had expired and is reactivated).
    pub fn observe(
        &mut self,
        net: IpNet,
        source: &SourceId,
        now: u64,
        ttl_secs: Option<u64>,
        comment: Option<String>,
    ) -> bool {
        // Keys are truncated, so that lookups by prefix (longest_match) find them.
        let net = net.trunc();
        let expires = ttl_secs.map(|t| now.saturating_add(t));
        let records = self.entries.entry(net).or_default();
        match records.iter_mut().find(|(s, _)| s == source) {
            Some((_, r)) if r.is_live(now) => {
                r.last_seen = now;
                let slack = self.journal.as_ref().map_or(0, |j| j.refresh_slack);
                // Shortened, made permanent or made finite: always. Lengthened: by the slack.
                let moved = match (r.expires, expires) {
                    (Some(old), Some(new)) if new > old => new - old >= slack.max(1),
                    (old, new) => old != new,
                };
                let recommented = comment.is_some() && comment != r.comment;
                if moved {
                    r.expires = expires;
                }
                if recommented {
                    r.comment = comment;
                }
                if moved || recommented {
                    touch(&mut self.journal, net, source);
                }
                false
            }
            existing => {
                let record = Record {
                    first_seen: now,
                    last_seen: now,
                    expires,
                    comment,
                    evidence: None,
                };
                match existing {
                    Some((_, r)) => *r = record,
                    None => {
                        records.push((source.clone(), record));
                        records.shrink_to_fit();
                        count(&mut self.counts, source, &net, true);
                    }
                }
                touch(&mut self.journal, net, source);
                true
            }
        }
    }

    /// Keeps why detection banned a prefix with its record.
    pub fn note_evidence(&mut self, net: &IpNet, source: &SourceId, evidence: Evidence) {
        let net = net.trunc();
        if let Some((_, r)) = self
            .entries
            .get_mut(&net)
            .and_then(|records| records.iter_mut().find(|(s, _)| s == source))
        {
            r.evidence = Some(Box::new(evidence));
            touch(&mut self.journal, net, source);
        }
    }

    /// Restores a record as saved.
    pub fn insert_record(&mut self, net: IpNet, source: SourceId, record: Record) {
        let net = net.trunc();
        let records = self.entries.entry(net).or_default();
        match records.iter_mut().find(|(s, _)| *s == source) {
            Some((_, r)) => *r = record,
            None => {
                count(&mut self.counts, &source, &net, true);
                records.push((source, record));
                records.shrink_to_fit();
            }
        }
    }

    /// Starts noting changed records for a fleet's etcd (see [`Ledger::take_touched`]).
    pub fn keep_journal(&mut self, refresh_slack: u64) {
        self.journal = Some(Journal {
            touched: BTreeSet::new(),
            refresh_slack,
        });
    }

    /// The records changed since the last call, each once: a record that is gone now was
    /// removed. Empty without a journal.
    pub fn take_touched(&mut self) -> Vec<(IpNet, SourceId)> {
        self.journal
            .as_mut()
            .map(|j| std::mem::take(&mut j.touched).into_iter().collect())
            .unwrap_or_default()
    }

    /// What was noted since the last take, without taking it.
    pub fn touched(&self) -> impl Iterator<Item = &(IpNet, SourceId)> {
        self.journal.iter().flat_map(|j| j.touched.iter())
    }

    /// Forgets what was noted: changes that came from etcd, or that are this node's alone.
    pub fn forget_touched(&mut self) {
        if let Some(j) = &mut self.journal {
            j.touched.clear();
        }
    }

    /// A record as etcd holds it (None: deleted there), not noted for etcd again.
    pub fn apply_remote(&mut self, net: IpNet, source: SourceId, record: Option<Record>) {
        let journal = self.journal.take();
        match record {
            Some(r) => self.insert_record(net, source, r),
            None => {
                self.remove(&net.trunc(), &source);
            }
        }
        self.journal = journal;
    }

    /// Everything etcd holds at one revision, in place of what this ledger holds.
    pub fn replace_remote(&mut self, records: Vec<(IpNet, SourceId, Record)>) {
        self.entries.clear();
        self.counts.clear();
        for (net, source, record) in records {
            self.insert_record(net, source, record);
        }
        self.forget_touched();
    }

    /// Drops `source`'s record of `net`; true if there was one.
    pub fn remove(&mut self, net: &IpNet, source: &SourceId) -> bool {
        let Some(records) = self.entries.get_mut(net) else {
            return false;
        };
        let before = records.len();
        records.retain(|(s, _)| s != source);
        let removed = records.len() < before;
        if removed {
            count(&mut self.counts, source, net, false);
            touch(&mut self.journal, *net, source);
        }
        if records.is_empty() {
            self.entries.remove(net);
        }
        removed
    }

    fn retain_records(&mut self, mut keep: impl FnMut(&SourceId, &Record) -> bool) -> usize {
        let mut dropped = 0;
        let (counts, journal) = (&mut self.counts, &mut self.journal);
        self.entries.retain(|net, records| {
            records.retain(|(s, r)| {
                let kept = keep(s, r);
                if !kept {
                    dropped += 1;
                    count(counts, s, net, false);
                    touch(journal, *net, s);
                }
                kept
            });
            !records.is_empty()
        });
        dropped
    }

    /// Removes the records for which `drop(net, source)` holds; returns the prefixes that lost
    /// at least one.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&IpNet, &SourceId) -> bool) -> Vec<IpNet> {
        let mut touched = Vec::new();
        let (counts, journal) = (&mut self.counts, &mut self.journal);
        self.entries.retain(|net, records| {
            let before = records.len();
            records.retain(|(s, _)| {
                let dropped = drop(net, s);
                if dropped {
                    count(counts, s, net, false);
                    touch(journal, *net, s);
                }
                !dropped
            });
            if records.len() < before {
                touched.push(*net);
            }
            !records.is_empty()
        });
        touched
    }

    /// Removes every record of `source` (a list taken out of the configuration).
    pub fn remove_source(&mut self, source: &SourceId) -> usize {
        self.retain_records(|s, _| s != source)
    }

    /// Removes records whose expiry has passed; returns how many.
    pub fn sweep(&mut self, now: u64) -> usize {
        self.retain_records(|_, r| r.is_live(now))
    }

    /// After a complete pull of `source`'s list that began at `pull_started`: every record
    /// of that source not seen since is no longer on the list. Returns how many were removed.
    pub fn reconcile(&mut self, source: &SourceId, pull_started: u64) -> usize {
        self.retain_records(|s, r| s != source || r.last_seen >= pull_started)
    }

    /// The prefixes that must be in the deny maps now. Remote bans the allowlist covers are
    /// left out (the allowlist always wins); manual bans stay, and the XDP allow trie carves
    /// the operator's exceptions out of them.
    pub fn desired(&self, now: u64, allow: &AllowList) -> BTreeSet<IpNet> {
        self.desired_modes(now, allow, &BTreeSet::new()).nets
    }

    /// What the dataplane should hold, and which of it only observes: the prefixes whose
    /// every live record comes from a source in `observing`, unless an enforced prefix
    /// covers them. The program stops at the longest match, so an observed /32 inside an
    /// enforced /24 must itself enforce, or it would let the /24's ban through.
    pub fn desired_modes(
        &self,
        now: u64,
        allow: &AllowList,
        observing: &BTreeSet<SourceId>,
    ) -> Desired {
        self.desired_with(now, allow, observing, &[])
    }

    /// As [`Ledger::desired_modes`], with `derived` prefixes (see [`Ledger::escalations`])
    /// held as if their sources had listed them.
    pub fn desired_with(
        &self,
        now: u64,
        allow: &AllowList,
        observing: &BTreeSet<SourceId>,
        derived: &[Escalation],
    ) -> Desired {
        let mut desired = Desired::default();
        for (net, records) in &self.entries {
            let mut live = records.iter().filter(|(source, record)| {
                record.is_live(now) && (!source.is_remote() || !allow.covers(net))
            });
            let Some(first) = live.next() else { continue };
            desired.nets.insert(*net);
            if std::iter::once(first)
                .chain(live)
                .all(|(source, _)| source.observed_in(observing))
            {
                desired.observed.insert(*net);
            }
        }
        for d in derived {
            let observes = d.source.observed_in(observing);
            if desired.nets.insert(d.net) {
                if observes {
                    desired.observed.insert(d.net);
                }
            } else if !observes {
                desired.observed.remove(&d.net);
            }
        }
        if desired.observed.is_empty() {
            return desired;
        }
        let enforced_lens: BTreeSet<(bool, u8)> = desired
            .nets
            .difference(&desired.observed)
            .filter(|n| n.prefix_len() < n.max_prefix_len())
            .map(|n| (matches!(n, IpNet::V6(_)), n.prefix_len()))
            .collect();
        if enforced_lens.is_empty() {
            return desired;
        }
        let covered: Vec<IpNet> = desired
            .observed
            .iter()
            .filter(|net| {
                let v6 = matches!(net, IpNet::V6(_));
                enforced_lens
                    .iter()
                    .filter(|(family, len)| *family == v6 && *len < net.prefix_len())
                    .any(|(_, len)| {
                        IpNet::new(net.addr(), *len).is_ok_and(|wider| {
                            let wider = wider.trunc();
                            desired.nets.contains(&wider) && !desired.observed.contains(&wider)
                        })
                    })
            })
            .copied()
            .collect();
        for net in covered {
            desired.observed.remove(&net);
        }
        desired
    }

    /// IPv6 prefix escalation: each `prefix_len` block in which one source has live bans of
    /// at least `threshold` distinct longer prefixes (hosts, mostly), as a derived ban of the
    /// block by that source. Scanners rotate through the addresses of one /64; a host-by-host
    /// list never catches up. Derived, not stored: when the bans under it expire or go below
    /// the threshold, so does the block.
    pub fn escalations(&self, now: u64, prefix_len: u8, threshold: usize) -> Vec<Escalation> {
        if threshold == 0 {
            return Vec::new();
        }
        let first_v6 = IpNet::V6(ipnet::Ipv6Net::default());
        let mut blocks: BTreeMap<(IpNet, SourceId), (usize, Option<u64>)> = BTreeMap::new();
        for (net, records) in self.entries.range(first_v6..) {
            if net.prefix_len() <= prefix_len {
                continue;
            }
            let Ok(block) = IpNet::new(net.addr(), prefix_len).map(|b| b.trunc()) else {
                continue;
            };
            // Detection's bans that rest on requests alone, which someone forging addresses
            // can send from a whole /64 of another network, never widen into a block ban.
            let counted = records.iter().filter(|(s, r)| {
                r.is_live(now)
                    && (*s != SourceId::Detect
                        || r.evidence.as_ref().is_some_and(|e| e.unforgeable))
            });
            for (source, record) in counted {
                let (count, expires) = blocks
                    .entry((block, source.clone()))
                    .or_insert((0, Some(0)));
                *count += 1;
                // The block lasts as long as its longest-lived ban; None is never.
                *expires = match (*expires, record.expires) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
        }
        blocks
            .into_iter()
            .filter(|(_, (count, _))| *count >= threshold)
            .map(|((net, source), (from, expires))| Escalation {
                net,
                source,
                from,
                expires,
            })
            .collect()
    }

    pub fn get(&self, net: &IpNet) -> Option<&Records> {
        self.entries.get(net)
    }

    /// One source's record of `net`.
    pub fn record(&self, net: &IpNet, source: &SourceId) -> Option<&Record> {
        self.entries
            .get(net)?
            .iter()
            .find(|(s, _)| s == source)
            .map(|(_, r)| r)
    }

    /// The most specific entry containing `addr`, as the XDP program would match it: one
    /// lookup per prefix length, longest first.
    pub fn longest_match(&self, addr: std::net::IpAddr) -> Option<(&IpNet, &Records)> {
        let host = IpNet::from(addr);
        (0..=host.max_prefix_len()).rev().find_map(|len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            self.entries.get_key_value(&net)
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &Records)> {
        self.entries.iter()
    }

    /// Prefixes in the ledger (live or not yet swept).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records per source and family: (source, is_ipv6) -> count.
    pub fn counts(&self) -> &BTreeMap<(SourceId, bool), usize> {
        &self.counts
    }
}

#[cfg(test)]
mod tests;
