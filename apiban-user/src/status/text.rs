//! What `apiban status` prints, and the times as people read them.

use std::time::Duration;

use super::StatusReport;
use crate::human::format_duration;

pub use crate::clock::utc;

/// "3m ago", "in 2h", rounded to what a person reads.
/// Text an outside party wrote (a comment, a line from a packet), as it may reach a
/// terminal: control characters shown as `\u{1b}`, never sent. The checks at every entry
/// refuse them already; this holds for what older agents saved.
pub fn shown(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

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
            .map(|i| {
                if i.egress.is_empty() {
                    format!("{} ({})", i.name, i.mode)
                } else {
                    format!("{} ({}, egress {})", i.name, i.mode, i.egress)
                }
            })
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
        if !a.features.is_empty() {
            let states: Vec<String> = a
                .features
                .iter()
                .map(|f| format!("{} {}", f.feature, if f.enabled { "on" } else { "off" }))
                .collect();
            let _ = writeln!(o, "kernel       {}", states.join(", "));
            for f in &a.features {
                if let Some(why) = &f.why_off {
                    let _ = writeln!(o, "             {}: {why}", f.feature);
                }
            }
        }
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
                let (d, p, al, ob) = (
                    get("dropped"),
                    get("passed"),
                    get("allowed"),
                    get("observed"),
                );
                if iface == "other" && d.packets + p.packets + al.packets + ob.packets == 0 {
                    continue;
                }
                let mut notes = Vec::new();
                if al.packets > 0 {
                    notes.push(format!("{} passed by the allowlist", al.packets));
                }
                if ob.packets > 0 {
                    notes.push(format!("{} observed: would be dropped", ob.packets));
                }
                let _ = writeln!(
                    o,
                    "  {:<10} {:>14} {:>16} {:>14} {:>16}{}",
                    iface,
                    d.packets,
                    d.bytes,
                    p.packets + al.packets + ob.packets,
                    p.bytes + al.bytes + ob.bytes,
                    if notes.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", notes.join(", "))
                    }
                );
            }
        }
        if !self.sources.is_empty() {
            let _ = writeln!(
                o,
                "
sources      {:<8} {:>9} {:>14} {:>14}",
                "mode", "entries", "dropped pkts", "observed pkts"
            );
            for s in &self.sources {
                let _ = writeln!(
                    o,
                    "  {:<10} {:<8} {:>9} {:>14} {:>14}",
                    s.source, s.mode, s.entries, s.dropped, s.observed
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
        if let Some(c) = &a.cluster {
            let _ = writeln!(o, "\nfleet");
            let _ = writeln!(
                o,
                "  node         {}{}",
                c.node,
                if c.leader {
                    " (leads: polls APIBAN and the lists for the fleet)"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                o,
                "  etcd         {}; revision {} (lag {}); {} watch restarts, {} errors, {} full reads",
                if c.watching {
                    "watching"
                } else {
                    "NOT REACHABLE: enforcing what this node has"
                },
                c.applied_revision,
                c.revision_lag,
                c.watch_restarts,
                c.etcd_errors,
                c.full_reads
            );
            if c.etcd_nospace {
                let _ = writeln!(
                    o,
                    "  ALARM        etcd's space quota is full (NOSPACE): it refuses every write; compact, `etcdctl defrag`, then `etcdctl alarm disarm`"
                );
            }
            if c.etcd_members > 0 && c.etcd_members_answering < c.etcd_members {
                let _ = writeln!(
                    o,
                    "  members      {} of {} etcd members answer",
                    c.etcd_members_answering, c.etcd_members
                );
            }
            let _ = match (c.clock_offset_ms, c.clock_off) {
                (Some(ms), true) => writeln!(
                    o,
                    "  clock        OFF by {:+.3}s from the fleet's: this node does not lead and deletes nothing from etcd (check NTP)",
                    ms as f64 / 1000.0
                ),
                (Some(ms), false) => {
                    writeln!(
                        o,
                        "  clock        {:+.3}s from the fleet's",
                        ms as f64 / 1000.0
                    )
                }
                (None, _) => writeln!(
                    o,
                    "  clock        not compared (no other node's heartbeat yet)"
                ),
            };
            if c.pending_changes > 0 {
                let _ = writeln!(
                    o,
                    "  pending      {} operator changes wait for etcd",
                    c.pending_changes
                );
            }
            if !c.records_refused.is_empty() {
                let reasons: Vec<String> = c
                    .records_refused
                    .iter()
                    .map(|(reason, n)| format!("{n} {reason}"))
                    .collect();
                let _ = writeln!(
                    o,
                    "  refused      entries in etcd not enforced here: {} (the log names the keys)",
                    reasons.join(", ")
                );
            }
        }
        if let Some(d) = &a.detect {
            let _ = writeln!(o, "\nSIP scanner detection");
            let ports: Vec<String> = d.ports.iter().map(u16::to_string).collect();
            let tls: Vec<String> = d.tls_ports.iter().map(u16::to_string).collect();
            let _ = writeln!(
                o,
                "  mode         {}{} on ports {} (TLS, counted only: {})",
                d.mode.name(),
                match d.mode {
                    crate::detect::DetectMode::Observe =>
                        " (logs what it would ban, drops nothing)",
                    crate::detect::DetectMode::Enforce =>
                        " (bans what the rules match, source detect)",
                    crate::detect::DetectMode::Off => "",
                },
                ports.join(","),
                tls.join(",")
            );
            let _ = writeln!(
                o,
                "  seen         {} samples, {} rate reports, {} sources followed; {} banned, {} refused, {} proven peers spared",
                d.samples, d.rate_reports, d.tracked, d.bans, d.refused, d.exempted
            );
            let _ = writeln!(
                o,
                "  answers      {} responses seen on egress; {} peers proven (2xx to an authenticated REGISTER or INVITE)",
                d.responses, d.proven
            );
            let _ = writeln!(
                o,
                "  passed over  {} keep-alives, {} TLS packets, {} unreadable samples (never a ban reason)",
                d.keepalives, d.tls_packets, d.unreadable
            );
            if d.untracked > 0 {
                let _ = writeln!(
                    o,
                    "  untracked    {} requests from sources the program's table had no room for (sampled, not rated)",
                    d.untracked
                );
            }
            if let Some(u) = &d.last_unreadable {
                let _ = writeln!(
                    o,
                    "  unreadable   latest from {}: {} \"{}\"",
                    u.addr, u.why, u.line
                );
            }
            for m in d.recent.iter().rev().take(5) {
                let _ = writeln!(
                    o,
                    "  {:<24} {} {}: {} ({}) \"{}\" {}",
                    m.addr.to_string(),
                    relative(m.at.min(self.now), self.now),
                    m.rule,
                    m.outcome,
                    m.counts,
                    m.line,
                    m.mode.name()
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
            if let Some(ms) = s.apiban_clock_offset_ms {
                let _ = writeln!(
                    o,
                    "  clock        {:+}s against APIBAN's (the Date of its last answer)",
                    ms / 1000
                );
            }
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
        if let Some(c) = &s.crowdsec {
            let _ = writeln!(
                o,
                "crowdsec      last read {}{}{}",
                when(c.last_success, self.now),
                if c.other_decisions + c.unreadable_decisions > 0 {
                    format!(
                        "; left {} not bans, {} unreadable",
                        c.other_decisions, c.unreadable_decisions
                    )
                } else {
                    String::new()
                },
                c.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
            if c.alerts_posted + c.alerts_skipped + c.alerts_forgeable + c.alerts_dropped > 0
                || c.alerts_error.is_some()
            {
                let _ = writeln!(
                    o,
                    "  alerts     {} posted, {} not (CrowdSec bans them), {} not (forgeable evidence), {} lost to a full queue{}",
                    c.alerts_posted,
                    c.alerts_skipped,
                    c.alerts_forgeable,
                    c.alerts_dropped,
                    c.alerts_error
                        .as_ref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                );
            }
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

#[cfg(test)]
mod shown_tests {
    #[test]
    fn control_characters_are_shown_not_sent() {
        assert_eq!(super::shown("a\u{1b}]0;x\u{7}b ✓"), "a\\u{1b}]0;x\\u{7}b ✓");
    }
}
