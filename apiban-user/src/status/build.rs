//! The reports, built in the agent from the owner's latest snapshot and the maps' reader:
//! nothing here waits for the owner.

use std::net::IpAddr;

use apiban_common::Verdict;
use ipnet::IpNet;

use super::{
    AgentInfo, CheckReport, EngineReport, EntryCount, ListReport, ListRow, RecordReport,
    StatusReport, SyncReport, TopEntry, Traffic,
};
use crate::{
    dataplane::{DataplaneReader, Family, loader},
    ledger::SourceId,
    snapshot::Snapshot,
};

/// Nanoseconds of CLOCK_MONOTONIC, the clock the XDP program stamps hits with.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn ago_secs(last_hit_ns: u64) -> Option<u64> {
    (last_hit_ns != 0).then(|| monotonic_ns().saturating_sub(last_hit_ns) / 1_000_000_000)
}

/// The status report with the `top` entries by hits (none for 0): the snapshot's figures
/// and, with a dataplane, its capacities, counters and what each source's entries matched.
pub fn report(
    snapshot: &Snapshot,
    agent: &AgentInfo,
    dataplane: Option<&DataplaneReader>,
    now: u64,
    top: usize,
) -> StatusReport {
    let mut report = StatusReport {
        now,
        agent: agent.clone(),
        allowlist: snapshot.engine.allowlist.len(),
        derived_prefixes: snapshot.engine.derived.len(),
        ..Default::default()
    };
    for ((source, v6), count) in snapshot.engine.ledger.counts() {
        report.entries.push(EntryCount {
            source: source.to_string(),
            family: if *v6 { "ipv6" } else { "ipv4" }.into(),
            count: *count,
        });
    }
    let hits = match dataplane.map(DataplaneReader::hit_deny_entries) {
        Some(Ok(hits)) => hits,
        Some(Err(e)) => {
            report.dataplane_error = Some(crate::error_chain(&e));
            Vec::new()
        }
        None => Vec::new(),
    };
    report.sources = source_hits(&hits, snapshot);
    report.top = top_entries(hits, top, snapshot);
    // IPv4 prefixes sort before IPv6 ones: count the (usually few) IPv6 ones only.
    let first_v6 = IpNet::V6(ipnet::Ipv6Net::default());
    let v6 = snapshot.engine.enforced.range(first_v6..).count();
    report
        .enforced
        .insert("ipv4".into(), snapshot.engine.enforced.len() - v6);
    report.enforced.insert("ipv6".into(), v6);
    let c = &snapshot.engine.counters;
    report.engine = EngineReport {
        added: c.added,
        removed: c.removed,
        expired: c.expired,
        reconciled: c.reconciled,
        skipped: c
            .skipped
            .iter()
            .map(|(r, n)| (r.name().to_owned(), *n))
            .collect(),
        map_full: c.map_full,
        saves: c.saves,
        save_failures: c.save_failures,
        last_save_seconds: c.last_save_duration.as_secs_f64(),
        unsaved: snapshot.engine.unsaved,
    };
    let s = &snapshot.sync;
    let cursor = &snapshot.engine.apiban;
    report.sync = SyncReport {
        requests: s
            .requests
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        last_request_at: s.last_request.map(|(at, _)| at),
        last_request_outcome: s.last_request.map(|(_, o)| o.to_owned()),
        last_success: s.last_success,
        next_request: s.next_request,
        budget_left: s.budget_left,
        rate_limit_waits: s.rate_limit_waits,
        key_rejected_since: s.key_rejected_since,
        apiban_clock_offset_ms: s.apiban_clock_offset_ms,
        next_id: cursor.next_id.clone(),
        full_pull_in_progress: cursor.full_pull.is_some(),
        lists: s
            .lists
            .iter()
            .map(|(name, l)| ListReport {
                name: name.clone(),
                last_success: l.last_success,
                last_error: l.last_error.clone(),
            })
            .collect(),
        crowdsec: {
            let c = &s.crowdsec;
            let seen = c.last_success.is_some()
                || c.last_error.is_some()
                || c.alerts_error.is_some()
                || c.alerts_posted + c.alerts_skipped + c.alerts_forgeable + c.alerts_dropped > 0;
            seen.then(|| super::CrowdsecReport {
                last_success: c.last_success,
                last_error: c.last_error.clone(),
                other_decisions: c.other_decisions,
                unreadable_decisions: c.unreadable_decisions,
                alerts_posted: c.alerts_posted,
                alerts_skipped: c.alerts_skipped,
                alerts_forgeable: c.alerts_forgeable,
                alerts_dropped: c.alerts_dropped,
                alerts_error: c.alerts_error.clone(),
            })
        },
    };
    if let Some(dp) = dataplane {
        report
            .capacity
            .insert("ipv4".into(), dp.deny_capacity(Family::V4));
        report
            .capacity
            .insert("ipv6".into(), dp.deny_capacity(Family::V6));
        let ifaces: Vec<(String, u32)> = agent
            .interfaces
            .iter()
            .filter_map(|i| loader::ifindex(&i.name).map(|x| (i.name.clone(), x)))
            .collect();
        match dp.stats_by_interface(&ifaces) {
            Ok(rows) => {
                for (iface, stats) in rows {
                    let by_verdict = Verdict::ALL
                        .iter()
                        .map(|v| {
                            let c = stats.get(*v);
                            (
                                v.name().to_owned(),
                                Traffic {
                                    packets: c.packets,
                                    bytes: c.bytes,
                                },
                            )
                        })
                        .collect();
                    report.traffic.insert(iface, by_verdict);
                }
            }
            Err(e) => report.dataplane_error = Some(crate::error_chain(&e)),
        }
    }
    report
}

/// Every source with records or a mode of its own, with what its entries in the maps
/// dropped and observed (see [`super::SourceReport`]).
pub fn source_hits(
    hits: &[crate::dataplane::DenyHits],
    snapshot: &Snapshot,
) -> Vec<super::SourceReport> {
    let mut by_source: std::collections::BTreeMap<SourceId, super::SourceReport> =
        std::collections::BTreeMap::new();
    for source in snapshot.engine.observing.iter() {
        source_row(&mut by_source, source, snapshot);
    }
    for ((source, _), count) in snapshot.engine.ledger.counts() {
        source_row(&mut by_source, source, snapshot).entries += count;
    }
    for hit in hits.iter().filter(|h| h.entry.hits > 0) {
        for (source, _) in snapshot.engine.ledger.get(&hit.net).into_iter().flatten() {
            let r = source_row(&mut by_source, source, snapshot);
            if hit.observed {
                r.observed += hit.entry.hits;
            } else {
                r.dropped += hit.entry.hits;
            }
        }
    }
    by_source.into_values().collect()
}

fn source_row<'a>(
    rows: &'a mut std::collections::BTreeMap<SourceId, super::SourceReport>,
    source: &SourceId,
    snapshot: &Snapshot,
) -> &'a mut super::SourceReport {
    rows.entry(source.clone())
        .or_insert_with(|| super::SourceReport {
            source: source.to_string(),
            mode: if snapshot.engine.observing.contains(source) {
                "observe"
            } else {
                "enforce"
            }
            .into(),
            entries: 0,
            dropped: 0,
            observed: 0,
        })
}

/// The `n` deny entries with the most hits, with the sources that hold them. The hits are
/// read by the caller, who may do it away from the owner (see `DataplaneReader`).
pub fn top_entries(
    mut hits: Vec<crate::dataplane::DenyHits>,
    n: usize,
    snapshot: &Snapshot,
) -> Vec<TopEntry> {
    hits.retain(|h| h.entry.hits > 0);
    let most_hits_first = |a: &crate::dataplane::DenyHits, b: &crate::dataplane::DenyHits| {
        b.entry.hits.cmp(&a.entry.hits).then(a.net.cmp(&b.net))
    };
    // Under a flood most entries may have hits: pick the top n before sorting them.
    if hits.len() > n && n > 0 {
        hits.select_nth_unstable_by(n - 1, most_hits_first);
        hits.truncate(n);
    }
    hits.sort_by(most_hits_first);
    hits.into_iter()
        .take(n)
        .map(|h| TopEntry {
            net: h.net,
            hits: h.entry.hits,
            last_hit_ago: ago_secs(h.entry.last_hit_ns),
            sources: snapshot
                .engine
                .ledger
                .get(&h.net)
                .map(|r| r.iter().map(|(s, _)| s.to_string()).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// `apiban check`: what the ledger holds for `addr`, and what the maps find for it.
pub fn check(
    snapshot: &Snapshot,
    dataplane: Option<&DataplaneReader>,
    addr: IpAddr,
) -> CheckReport {
    let allowed_by = snapshot.engine.allowlist.covering(addr);
    let (entry, records) = match snapshot.engine.ledger.longest_match(addr) {
        Some((net, records)) => (
            Some(*net),
            records
                .iter()
                .map(|(s, r)| (s.clone(), r.clone()))
                .collect(),
        ),
        None => (None, Vec::new()),
    };
    let derived: Vec<crate::ledger::Escalation> = snapshot
        .engine
        .derived
        .iter()
        .filter(|d| d.net.contains(&addr))
        .cloned()
        .collect();
    // Without a dataplane to ask, a derived block is the match when no ban is longer.
    let entry = entry.or_else(|| derived.first().map(|d| d.net));
    let enforced = entry.is_some_and(|n| snapshot.engine.enforced.contains(&n));
    let mut report = CheckReport {
        addr,
        verdict: String::new(),
        entry,
        enforced,
        records: records
            .into_iter()
            .map(|(s, r)| RecordReport {
                source: s.to_string(),
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                expires: r.expires,
                comment: r.comment,
                evidence: r.evidence.map(|e| *e),
            })
            .collect(),
        allowed_by,
        hits: None,
        last_hit_ago: None,
        dry_run: dataplane.is_none(),
        observed_by: Vec::new(),
        derived,
    };
    let mut observed = entry.is_some_and(|n| snapshot.engine.observed.contains(&n));
    if let Some(dp) = dataplane
        && let Ok(Some(hit)) = dp.deny_match(addr)
    {
        report.entry = report.entry.or(Some(hit.net));
        report.enforced = true;
        report.hits = Some(hit.entry.hits);
        report.last_hit_ago = ago_secs(hit.entry.last_hit_ns);
        observed = hit.observed;
    }
    report.verdict = match (report.enforced, allowed_by) {
        (true, Some(_)) => "allowed",
        (true, None) if observed => "observed",
        (true, None) => "banned",
        (false, _) => "not banned",
    }
    .into();
    if report.verdict == "observed" {
        report.observed_by = report
            .records
            .iter()
            .map(|r| r.source.clone())
            .filter(|s| {
                s.parse::<SourceId>()
                    .is_ok_and(|s| snapshot.engine.observing.contains(&s))
            })
            .collect();
    }
    report
}

/// `apiban list`: every record, or one source's.
pub fn list(snapshot: &Snapshot, source: Option<&SourceId>) -> Vec<ListRow> {
    let mut rows = Vec::new();
    for (net, records) in snapshot.engine.ledger.iter() {
        for (s, r) in records {
            if source.is_some_and(|want| want != s) {
                continue;
            }
            rows.push(ListRow {
                net: *net,
                source: s.to_string(),
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                expires: r.expires,
                comment: r.comment.clone(),
                enforced: snapshot.engine.enforced.contains(net),
            });
        }
    }
    rows
}
