//! Where a fleet keeps its ledger in etcd, under its prefix `P`:
//!
//!   `P ledger/records/<source>/<address>/<length>`  one source's record of one prefix (JSON)
//!   `P ledger/allow/<address>/<length>`             a manual allowlist entry (`{}`)
//!   `P apiban/cursor`                        the fleet's APIBAN position (JSON)
//!   `P apiban/requests`                      the fleet's recent request times (the budget)
//!   `P leader/...`                           the election of the node that polls
//!   `P nodes/<name>`                         each node's heartbeat, on a lease of its own
//!   `P proven/<address>`                     a peer detection saw proven (JSON; see
//!                                            `cluster::proofs`), on its writer's lease
//!
//! The ban's expiry is in its value, not in an etcd lease: every node expires bans itself.
//! An operator's change carries a [`Stamp`], and an operator's removal is a tombstone
//! value (`{"removed":true,...}`) that the leader's janitor deletes after
//! [`TOMBSTONE_DAYS`].
//! Nodes watch `P ledger/` only, so heartbeats and the poller's bookkeeping reach no watch.

use ipnet::IpNet;

use crate::ledger::{Record, SourceId};

/// How long an operator's removal stays in etcd as a tombstone: a node cut off for longer
/// than this sends its older changes to keys that look never changed.
pub const TOMBSTONE_DAYS: u64 = 30;

/// The key layout of one fleet.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What every node watches.
    pub fn ledger(&self) -> String {
        format!("{}ledger/", self.prefix)
    }

    pub fn records(&self) -> String {
        format!("{}records/", self.ledger())
    }

    pub fn allowlist(&self) -> String {
        format!("{}allow/", self.ledger())
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub fn node(&self, name: &str) -> String {
        format!("{}{name}", self.nodes())
    }

    pub fn election(&self) -> String {
        format!("{}leader", self.prefix)
    }

    pub fn apiban_cursor(&self) -> String {
        format!("{}apiban/cursor", self.prefix)
    }

    /// The send times of the fleet's recent APIBAN requests (JSON Unix milliseconds).
    pub fn apiban_requests(&self) -> String {
        format!("{}apiban/requests", self.prefix)
    }

    /// Detection's proven peers, which every node reads (outside `ledger/`: a proof is no
    /// ban, and its watch is its own).
    pub fn proven(&self) -> String {
        format!("{}proven/", self.prefix)
    }

    pub fn proof(&self, addr: &std::net::IpAddr) -> String {
        format!("{}{addr}", self.proven())
    }

    /// The address a proof's key names, if the key is one and names it canonically.
    pub fn parse_proof(&self, key: &[u8]) -> Option<std::net::IpAddr> {
        let text = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.proven())?;
        let addr: std::net::IpAddr = text.parse().ok()?;
        (addr.to_string() == text).then_some(addr)
    }

    pub fn record(&self, source: &SourceId, net: &IpNet) -> String {
        format!("{}{source}/{}", self.records(), net.trunc())
    }

    pub fn allow(&self, net: &IpNet) -> String {
        format!("{}{}", self.allowlist(), net.trunc())
    }

    /// The source and prefix a record key names. The prefix is the key's last two segments,
    /// so a list name may hold any character.
    pub fn parse_record(&self, key: &[u8]) -> Option<(SourceId, IpNet)> {
        let rest = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.records())?;
        let (source_and_addr, len) = rest.rsplit_once('/')?;
        let (source, addr) = source_and_addr.rsplit_once('/')?;
        let net: IpNet = format!("{addr}/{len}").parse().ok()?;
        Some((source.parse().ok()?, net.trunc()))
    }

    pub fn parse_allow(&self, key: &[u8]) -> Option<IpNet> {
        let rest = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.allowlist())?;
        rest.parse::<IpNet>().ok().map(|n| n.trunc())
    }
}

/// When and where an operator's change was made: the order in which changes of one key
/// win (see `cluster::writer`). `at` is the node's fleet clock in Unix milliseconds (never
/// behind anything the node had seen of the fleet, see `Engine::next_stamp`), `by` the node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub at: u64,
    pub by: String,
}

/// What one record or allowlist key holds, as read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The record; None for a tombstone (an operator's removal) or an allowlist entry.
    pub record: Option<Record>,
    /// An operator's removal: kept as a value, not a deleted key, so that a node whose
    /// older change arrives late sees it (etcd cannot compare against a deleted key).
    pub removed: bool,
    /// An operator's change carries one; what the leader's feeds write does not.
    pub stamp: Option<Stamp>,
}

/// The marks an operator's change adds to a value; a record's own fields sit beside them.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Marks {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    removed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stamp_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    by: Option<String>,
}

impl Marks {
    fn of(stamp: Option<&Stamp>, removed: bool) -> Self {
        Self {
            removed,
            stamp_ms: stamp.map(|s| s.at),
            by: stamp.map(|s| s.by.clone()),
        }
    }
}

/// A record's value, with an operator's stamp when it is one's change.
pub fn encode_record(record: &Record, stamp: Option<&Stamp>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Value<'a> {
        #[serde(flatten)]
        record: &'a Record,
        #[serde(flatten)]
        marks: Marks,
    }
    serde_json::to_vec(&Value {
        record,
        marks: Marks::of(stamp, false),
    })
    .unwrap_or_default()
}

/// An allowlist entry's value (`{}` when no operator's stamp goes with it).
pub fn encode_allowed(stamp: Option<&Stamp>) -> Vec<u8> {
    serde_json::to_vec(&Marks::of(stamp, false)).unwrap_or_default()
}

/// An operator's removal of a record or allowlist entry.
pub fn encode_removed(stamp: &Stamp) -> Vec<u8> {
    serde_json::to_vec(&Marks::of(Some(stamp), true)).unwrap_or_default()
}

/// A record key's value; None when it is neither a record nor a tombstone this version
/// can read.
pub fn decode_record(value: &[u8]) -> Option<Stored> {
    let marks: Marks = serde_json::from_slice(value).ok()?;
    let record = if marks.removed {
        None
    } else {
        Some(serde_json::from_slice::<Record>(value).ok()?)
    };
    Some(Stored {
        record,
        removed: marks.removed,
        stamp: stamp_of(marks),
    })
}

/// An allowlist key's value: `{}` from before stamps, or an operator's marks.
pub fn decode_allowed(value: &[u8]) -> Option<Stored> {
    let marks: Marks = serde_json::from_slice(value).ok()?;
    Some(Stored {
        record: None,
        removed: marks.removed,
        stamp: stamp_of(marks),
    })
}

/// The operator's stamp a record's or allowlist entry's value carries, if any.
pub fn decode_stamp(value: &[u8]) -> Option<Stamp> {
    stamp_of(serde_json::from_slice(value).ok()?)
}

fn stamp_of(marks: Marks) -> Option<Stamp> {
    Some(Stamp {
        at: marks.stamp_ms?,
        by: marks.by.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_round_trip_for_every_source() {
        let keys = Keys::new("/apiban/v1/");
        for (source, net) in [
            (SourceId::Apiban, "192.0.2.7/32"),
            (SourceId::Manual, "2001:db8::/32"),
            (SourceId::List("odd/name".into()), "198.51.100.0/24"),
        ] {
            let net: IpNet = net.parse().unwrap();
            let key = keys.record(&source, &net);
            assert_eq!(
                keys.parse_record(key.as_bytes()),
                Some((source, net)),
                "{key}"
            );
        }
        assert_eq!(
            keys.parse_record(b"/apiban/v1/ledger/records/apiban/garbage"),
            None
        );
        assert_eq!(
            keys.parse_record(b"/other/ledger/records/apiban/192.0.2.1/32"),
            None
        );
        let net: IpNet = "10.9.0.0/16".parse().unwrap();
        assert_eq!(keys.parse_allow(keys.allow(&net).as_bytes()), Some(net));
    }
}
