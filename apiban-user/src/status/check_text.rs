//! What `apiban check` and `apiban status --fleet` print.

use super::{
    CheckReport,
    text::{relative, shown},
};

impl CheckReport {
    pub fn to_text(&self, now: u64) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} is {}{}{}",
            self.addr,
            self.verdict.to_uppercase(),
            if self.observed_by.is_empty() {
                String::new()
            } else {
                format!(
                    ": would be dropped by {} (observe)",
                    self.observed_by.join(", ")
                )
            },
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
                    .map(|c| format!(" ({})", shown(c)))
                    .unwrap_or_default()
            );
            if let Some(e) = &r.evidence {
                let _ = writeln!(
                    o,
                    "  evidence   {} {}: {}; \"{}\" (offence {})",
                    shown(&e.rule),
                    relative(e.at.min(now), now),
                    shown(&e.counts),
                    shown(&e.line),
                    e.offence
                );
            }
        }
        for d in &self.derived {
            let _ = writeln!(
                o,
                "  derived    {}: {} bans by {} inside it (IPv6 escalation), {}",
                d.net,
                d.from,
                d.source,
                match d.expires {
                    Some(t) => format!("until the last expires {}", relative(t, now)),
                    None => "while one never expires".into(),
                }
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

/// `apiban status --fleet`: one line per node that has a heartbeat in etcd. Whoever can write
/// to etcd writes these beats, so their names are shown as outside text.
pub fn fleet_text(fleet: &crate::cluster::heartbeat::FleetReport, now: u64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<16} {:<8} {:<7} {:>10} {:>6} {:>9} {:>9} {:>8} {:>9}  interfaces",
        "node", "version", "role", "revision", "lag", "ipv4", "ipv6", "beat", "clock"
    );
    for n in &fleet.nodes {
        let _ = writeln!(
            o,
            "{:<16} {:<8} {:<7} {:>10} {:>6} {:>9} {:>9} {:>8} {:>9}  {}",
            shown(&n.node),
            shown(&n.version),
            if n.leader { "polls" } else { "-" },
            n.applied_revision,
            (fleet.revision - n.applied_revision).max(0),
            n.enforced_v4,
            n.enforced_v6,
            relative(n.at.min(now), now),
            n.clock_offset_ms
                .map_or("-".to_owned(), |ms| format!("{:+.3}s", ms as f64 / 1000.0)),
            shown(&n.interfaces.join(","))
        );
    }
    if fleet.nodes.is_empty() {
        let _ = writeln!(o, "no node has a heartbeat in etcd");
    }
    let _ = writeln!(o, "etcd revision {}", fleet.revision);
    o
}

#[cfg(test)]
mod tests {
    /// A heartbeat is whatever a writer of etcd put there: its names reach the operator's
    /// terminal only as escapes.
    #[test]
    fn a_heartbeat_from_etcd_cannot_drive_the_terminal() {
        use crate::cluster::heartbeat::{FleetReport, NodeBeat};
        let fleet = FleetReport {
            revision: 7,
            nodes: vec![NodeBeat {
                node: "evil\u{1b}[2J".into(),
                version: "0.1\u{7}".into(),
                interfaces: vec!["eth0\u{1b}]0;pwned\u{7}".into()],
                at: 100,
                ..NodeBeat::default()
            }],
        };
        let text = super::fleet_text(&fleet, 100);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(text.contains("evil\\u{1b}[2J"), "{text}");
        assert!(text.contains("0.1\\u{7}"), "{text}");
        assert!(text.contains("eth0\\u{1b}]0;pwned\\u{7}"), "{text}");
    }
}
