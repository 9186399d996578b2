//! What the running agent reports about itself: one snapshot type behind `apiban status`
//! (text and JSON), `apiban check`, `apiban list` and /metrics, built while holding the
//! owner, so every view agrees.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use apiban_common::Verdict;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::loader, engine::Enforcer, human::format_duration, ledger::SourceId, sync::Owner,
};

/// Facts about the agent that are not the ledger's: what it attached to and how it runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    pub started_at: u64,
    pub dry_run: bool,
    pub interfaces: Vec<InterfaceInfo>,
    pub scope: String,
    pub apiban_enabled: bool,
    pub rate_limit: String,
    pub poll_interval: String,
    pub config_file: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceInfo {
    pub name: String,
    pub mode: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryCount {
    pub source: String,
    pub family: String,
    pub count: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopEntry {
    pub net: IpNet,
    pub hits: u64,
    /// Seconds since the last hit.
    pub last_hit_ago: Option<u64>,
    pub sources: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncReport {
    pub requests: BTreeMap<String, u64>,
    pub last_request_at: Option<u64>,
    pub last_request_outcome: Option<String>,
    pub last_success: Option<u64>,
    pub next_request: Option<u64>,
    pub budget_left: u32,
    pub rate_limit_waits: u64,
    /// Since when APIBAN has rejected the key (403), while it does.
    #[serde(default)]
    pub key_rejected_since: Option<u64>,
    pub next_id: Option<String>,
    pub full_pull_in_progress: bool,
    pub lists: Vec<ListReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListReport {
    pub name: String,
    pub last_success: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EngineReport {
    pub added: u64,
    pub removed: u64,
    pub expired: u64,
    pub reconciled: u64,
    pub skipped: BTreeMap<String, u64>,
    pub map_full: u64,
    pub saves: u64,
    pub save_failures: u64,
    pub last_save_seconds: f64,
    /// The last save failed: the state file is behind what is enforced.
    #[serde(default)]
    pub unsaved: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub now: u64,
    pub agent: AgentInfo,
    /// Ledger records by source and family.
    pub entries: Vec<EntryCount>,
    /// Prefixes in the deny maps by family.
    pub enforced: BTreeMap<String, usize>,
    /// Deny map capacity by family (each of the host hash and the prefix trie holds this many).
    pub capacity: BTreeMap<String, u32>,
    pub allowlist: usize,
    /// Packets and bytes by interface, then verdict; "other" is interfaces without a slot.
    pub traffic: BTreeMap<String, BTreeMap<String, Traffic>>,
    pub top: Vec<TopEntry>,
    pub sync: SyncReport,
    pub engine: EngineReport,
    /// Set when the dataplane could not be read; the rest is still true.
    pub dataplane_error: Option<String>,
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ipv4",
        IpNet::V6(_) => "ipv6",
    }
}

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

/// Builds the snapshot; `top` > 0 also reads every deny entry's hit count.
pub fn build<E: Enforcer>(
    owner: &Owner<E>,
    agent: &AgentInfo,
    top: usize,
    now: u64,
) -> StatusReport {
    let engine = &owner.engine;
    let mut report = StatusReport {
        now,
        agent: agent.clone(),
        allowlist: engine.allowlist().len(),
        ..Default::default()
    };
    for ((source, v6), count) in engine.ledger().counts() {
        report.entries.push(EntryCount {
            source: source.to_string(),
            family: if v6 { "ipv6" } else { "ipv4" }.into(),
            count,
        });
    }
    report.enforced.insert("ipv4".into(), 0);
    report.enforced.insert("ipv6".into(), 0);
    for net in engine.enforced() {
        *report.enforced.entry(family(net).into()).or_default() += 1;
    }
    let c = engine.counters();
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
        unsaved: engine.unsaved(),
    };
    let s = &owner.sync;
    let cursor = engine.apiban_cursor();
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
    };
    if let Some(dp) = engine.enforcer().dataplane() {
        report.capacity.insert("ipv4".into(), dp.deny_v4.capacity());
        report.capacity.insert("ipv6".into(), dp.deny_v6.capacity());
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
            Err(e) => report.dataplane_error = Some(e.to_string()),
        }
        if top > 0 {
            match dp.deny_hits() {
                Ok(hits) => report.top = top_entries(hits, top, owner),
                Err(e) => report.dataplane_error = Some(e.to_string()),
            }
        }
    }
    report
}

/// The `n` deny entries with the most hits, with the sources that hold them. The hits are
/// read by the caller, who may do it away from the owner (see `DataplaneReader`).
pub fn top_entries<E: Enforcer>(
    mut hits: Vec<crate::dataplane::DenyHits>,
    n: usize,
    owner: &Owner<E>,
) -> Vec<TopEntry> {
    hits.retain(|h| h.entry.hits > 0);
    hits.sort_by(|a, b| b.entry.hits.cmp(&a.entry.hits).then(a.net.cmp(&b.net)));
    hits.into_iter()
        .take(n)
        .map(|h| TopEntry {
            net: h.net,
            hits: h.entry.hits,
            last_hit_ago: ago_secs(h.entry.last_hit_ns),
            sources: owner
                .engine
                .ledger()
                .get(&h.net)
                .map(|r| r.iter().map(|(s, _)| s.to_string()).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// `apiban check`: the verdict for one address and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckReport {
    pub addr: IpAddr,
    /// "banned", "allowed" (banned but the allowlist wins) or "not banned".
    pub verdict: String,
    pub entry: Option<IpNet>,
    pub enforced: bool,
    pub records: Vec<RecordReport>,
    pub allowed_by: Option<IpNet>,
    pub hits: Option<u64>,
    pub last_hit_ago: Option<u64>,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordReport {
    pub source: String,
    pub first_seen: u64,
    pub last_seen: u64,
    pub expires: Option<u64>,
    pub comment: Option<String>,
}

pub fn check<E: Enforcer>(owner: &Owner<E>, addr: IpAddr) -> CheckReport {
    let engine = &owner.engine;
    let found = engine.lookup(addr);
    let allowed_by = engine.allowlist().covering(addr);
    let (entry, records) = match found {
        Some((net, records)) => (Some(net), records),
        None => (None, Vec::new()),
    };
    let enforced = entry.is_some_and(|n| engine.enforced().contains(&n));
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
            })
            .collect(),
        allowed_by,
        hits: None,
        last_hit_ago: None,
        dry_run: engine.enforcer().dataplane().is_none(),
    };
    if let Some(dp) = engine.enforcer().dataplane()
        && let Ok(Some(hit)) = dp.deny_match(addr)
    {
        report.entry = report.entry.or(Some(hit.net));
        report.enforced = true;
        report.hits = Some(hit.entry.hits);
        report.last_hit_ago = ago_secs(hit.entry.last_hit_ns);
    }
    report.verdict = match (report.enforced, allowed_by) {
        (true, Some(_)) => "allowed",
        (true, None) => "banned",
        (false, _) => "not banned",
    }
    .into();
    report
}

/// `apiban list`: one row per prefix and source.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListRow {
    pub net: IpNet,
    pub source: String,
    pub first_seen: u64,
    pub last_seen: u64,
    pub expires: Option<u64>,
    pub comment: Option<String>,
    pub enforced: bool,
}

pub fn list<E: Enforcer>(owner: &Owner<E>, source: Option<&SourceId>) -> Vec<ListRow> {
    let engine = &owner.engine;
    let mut rows = Vec::new();
    for (net, records) in engine.ledger().iter() {
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
                enforced: engine.enforced().contains(net),
            });
        }
    }
    rows
}

/// UTC `YYYY-MM-DD HH:MM:SSZ` for a Unix time.
pub fn utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// "3m ago", "in 2h", rounded to what a person reads.
pub fn relative(at: u64, now: u64) -> String {
    let coarse = |secs: u64| {
        let d = match secs {
            0..120 => secs,
            120..7200 => secs / 60 * 60,
            7200..172_800 => secs / 3600 * 3600,
            _ => secs / 86_400 * 86_400,
        };
        format_duration(Duration::from_secs(d))
    };
    if at <= now {
        format!("{} ago", coarse(now - at))
    } else {
        format!("in {}", coarse(at - now))
    }
}

fn when(at: Option<u64>, now: u64) -> String {
    match at {
        Some(t) => format!("{} ({})", utc(t), relative(t, now)),
        None => "never".into(),
    }
}

impl StatusReport {
    /// The text `apiban status` prints.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let a = &self.agent;
        let _ = writeln!(
            o,
            "apiban {} (pid {}), up since {}{}",
            a.version,
            a.pid,
            when(Some(a.started_at), self.now),
            if a.dry_run {
                ", DRY RUN: nothing is enforced"
            } else {
                ""
            }
        );
        if let Some(f) = &a.config_file {
            let _ = writeln!(o, "config       {f}");
        }
        let ifaces: Vec<String> = a
            .interfaces
            .iter()
            .map(|i| format!("{} ({})", i.name, i.mode))
            .collect();
        let _ = writeln!(
            o,
            "interfaces   {}   scope {}",
            if ifaces.is_empty() {
                "none".into()
            } else {
                ifaces.join(", ")
            },
            a.scope
        );
        let v4 = self.enforced.get("ipv4").copied().unwrap_or(0);
        let v6 = self.enforced.get("ipv6").copied().unwrap_or(0);
        let cap = |f: &str| {
            self.capacity
                .get(f)
                .map(|c| format!(" of {c}"))
                .unwrap_or_default()
        };
        let _ = writeln!(
            o,
            "enforced     {v4} IPv4{} and {v6} IPv6{} prefixes; allowlist {}",
            cap("ipv4"),
            cap("ipv6"),
            self.allowlist
        );
        let _ = writeln!(o, "\nentries by source");
        if self.entries.is_empty() {
            let _ = writeln!(o, "  (none)");
        }
        for e in &self.entries {
            let _ = writeln!(o, "  {:<20} {:<5} {:>9}", e.source, e.family, e.count);
        }
        if !self.traffic.is_empty() {
            let _ = writeln!(
                o,
                "\ntraffic      {:>14} {:>16} {:>14} {:>16}",
                "dropped pkts", "dropped bytes", "passed pkts", "passed bytes"
            );
            for (iface, v) in &self.traffic {
                let get = |name: &str| v.get(name).copied().unwrap_or_default();
                let (d, p, al) = (get("dropped"), get("passed"), get("allowed"));
                if iface == "other" && d.packets + p.packets + al.packets == 0 {
                    continue;
                }
                let _ = writeln!(
                    o,
                    "  {:<10} {:>14} {:>16} {:>14} {:>16}{}",
                    iface,
                    d.packets,
                    d.bytes,
                    p.packets + al.packets,
                    p.bytes + al.bytes,
                    if al.packets > 0 {
                        format!("  ({} passed by the allowlist)", al.packets)
                    } else {
                        String::new()
                    }
                );
            }
        }
        if !self.top.is_empty() {
            let _ = writeln!(o, "\ntop banned sources by hits");
            for t in &self.top {
                let _ = writeln!(
                    o,
                    "  {:<24} {:>10} hits  last {:<10} {}",
                    t.net.to_string(),
                    t.hits,
                    t.last_hit_ago
                        .map(|s| relative(self.now - s.min(self.now), self.now))
                        .unwrap_or_else(|| "-".into()),
                    t.sources.join(",")
                );
            }
        }
        let s = &self.sync;
        let _ = writeln!(o, "\nAPIBAN");
        if !a.apiban_enabled {
            let _ = writeln!(
                o,
                "  not polling: no API key (get one at https://apiban.org/getkey.html)"
            );
        } else {
            if let Some(since) = s.key_rejected_since {
                let _ = writeln!(
                    o,
                    "  key          REJECTED (403) since {}; next try {}; bans already known \
                     stay enforced",
                    when(Some(since), self.now),
                    s.next_request
                        .map(|t| if t <= self.now {
                            "now".to_owned()
                        } else {
                            relative(t, self.now)
                        })
                        .unwrap_or_else(|| "not scheduled".into())
                );
            }
            let _ = writeln!(o, "  last success {}", when(s.last_success, self.now));
            let _ = writeln!(
                o,
                "  last request {}{}",
                when(s.last_request_at, self.now),
                s.last_request_outcome
                    .as_ref()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default()
            );
            let _ = writeln!(o, "  next request {}", when(s.next_request, self.now));
            let _ = writeln!(
                o,
                "  budget       {} requests left of {}; waited for the budget {} times",
                s.budget_left, a.rate_limit, s.rate_limit_waits
            );
            let total: Vec<String> = s.requests.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                o,
                "  requests     {}",
                if total.is_empty() {
                    "none yet".into()
                } else {
                    total.join(", ")
                }
            );
            if s.full_pull_in_progress {
                let _ = writeln!(o, "  a full pull is in progress");
            }
        }
        for l in &s.lists {
            let _ = writeln!(
                o,
                "list {:<8} last refresh {}{}",
                l.name,
                when(l.last_success, self.now),
                l.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        let skipped: Vec<String> = self
            .engine
            .skipped
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if !skipped.is_empty() {
            let _ = writeln!(o, "skipped from feeds: {}", skipped.join(", "));
        }
        if self.engine.map_full > 0 {
            let _ = writeln!(
                o,
                "WARNING: {} prefixes did not fit in the deny maps",
                self.engine.map_full
            );
        }
        if self.engine.unsaved {
            let _ = writeln!(
                o,
                "WARNING: the state file is behind what is enforced ({} failed saves); a \
                 restart now would lose the latest changes",
                self.engine.save_failures
            );
        }
        if let Some(e) = &self.dataplane_error {
            let _ = writeln!(o, "WARNING: cannot read the dataplane: {e}");
        }
        o
    }
}

impl CheckReport {
    pub fn to_text(&self, now: u64) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} is {}{}",
            self.addr,
            self.verdict.to_uppercase(),
            if self.dry_run {
                " (dry run: nothing is enforced)"
            } else {
                ""
            }
        );
        if let Some(net) = self.entry {
            let _ = writeln!(
                o,
                "  entry      {net}{}",
                if self.enforced {
                    ""
                } else {
                    " (in the ledger, not enforced)"
                }
            );
        }
        for r in &self.records {
            let _ = writeln!(
                o,
                "  source     {}: first seen {}, last seen {}, {}{}",
                r.source,
                relative(r.first_seen, now),
                relative(r.last_seen, now),
                match r.expires {
                    Some(t) if t > now => format!("expires {}", relative(t, now)),
                    Some(t) => format!("expired {}", relative(t, now)),
                    None => "never expires".into(),
                },
                r.comment
                    .as_ref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default()
            );
        }
        if let Some(a) = self.allowed_by {
            let _ = writeln!(o, "  allowlist  {a} (wins over every feed)");
        }
        if let Some(h) = self.hits {
            let _ = writeln!(
                o,
                "  hits       {h}{}",
                self.last_hit_ago
                    .map(|s| format!(", last {}", relative(now - s.min(now), now)))
                    .unwrap_or_default()
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_and_relative_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18 11:06:40Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(relative(100, 190), "1m30s ago");
        assert_eq!(relative(0, 3 * 3600 + 59), "3h ago");
        assert_eq!(relative(1000 + 2 * 86_400 + 5, 1000), "in 2d");
    }
}
