//! The maps as readers see them, from another thread than the owner's: counters, deny
//! lookups and every deny entry's hits, for `status`, `check` and /metrics. A reader holds
//! descriptors of its own for the same kernel maps and has no way to write them: the writes
//! are [`super::Dataplane`]'s, and only the ledger's owner holds that.

use std::net::IpAddr;

use apiban_common::DenyEntry;
use aya::maps::lpm_trie::Key;

use super::{
    DataplaneError, DenyHits, Family, Stats,
    counters::Counters,
    deny::DenyLookup,
    prefix_map::{Entry, net_from_v4, net_from_v6},
};

pub struct DataplaneReader {
    deny_v4: DenyLookup<4>,
    deny_v6: DenyLookup<16>,
    counters: Counters,
}

impl DataplaneReader {
    pub(super) fn new(deny_v4: DenyLookup<4>, deny_v6: DenyLookup<16>, counters: Counters) -> Self {
        Self {
            deny_v4,
            deny_v6,
            counters,
        }
    }

    /// How many entries each family's deny list holds at most.
    pub fn deny_capacity(&self, family: Family) -> u32 {
        match family {
            Family::V4 => self.deny_v4.capacity(),
            Family::V6 => self.deny_v6.capacity(),
        }
    }

    /// Every deny entry with its hit count and last-hit time, IPv4 then IPv6.
    pub fn deny_hits(&self) -> Result<Vec<DenyHits>, DataplaneError> {
        deny_hits(&self.deny_v4, &self.deny_v6)
    }

    /// The deny entries of both families that were hit at least once.
    pub fn hit_deny_entries(&self) -> Result<Vec<DenyHits>, DataplaneError> {
        Ok(both_families(
            self.deny_v4.hit_entries()?,
            self.deny_v6.hit_entries()?,
        ))
    }

    /// The deny entry that covers `addr` (the longest match) and its hit bookkeeping.
    pub fn deny_match(&self, addr: IpAddr) -> Result<Option<DenyHits>, DataplaneError> {
        deny_match(&self.deny_v4, &self.deny_v6, addr)
    }

    /// Per-verdict packet and byte counts, summed over CPUs and interfaces.
    pub fn stats(&self) -> Result<Stats, DataplaneError> {
        self.counters.stats()
    }

    /// Counters of the interfaces given as (name, ifindex), then "other".
    pub fn stats_by_interface(
        &self,
        ifaces: &[(String, u32)],
    ) -> Result<Vec<(String, Stats)>, DataplaneError> {
        self.counters.stats_by_interface(ifaces)
    }
}

/// Every deny entry of both families with its hits, IPv4 then IPv6.
pub(super) fn deny_hits(
    v4: &DenyLookup<4>,
    v6: &DenyLookup<16>,
) -> Result<Vec<DenyHits>, DataplaneError> {
    Ok(both_families(v4.entries()?, v6.entries()?))
}

/// Both families' map entries as prefixes, IPv4 then IPv6.
fn both_families(v4: Vec<Entry<4, DenyEntry>>, v6: Vec<Entry<16, DenyEntry>>) -> Vec<DenyHits> {
    let v4 = v4
        .into_iter()
        .map(|(k, entry)| DenyHits::from_map(net_from_v4(k), entry));
    let v6 = v6
        .into_iter()
        .map(|(k, entry)| DenyHits::from_map(net_from_v6(k), entry));
    v4.chain(v6).collect()
}

/// The deny entry the program finds for a packet from `addr`.
pub(super) fn deny_match(
    v4: &DenyLookup<4>,
    v6: &DenyLookup<16>,
    addr: IpAddr,
) -> Result<Option<DenyHits>, DataplaneError> {
    Ok(match addr {
        IpAddr::V4(a) => v4
            .longest_match(Key::new(32, a.octets()))?
            .map(|(len, entry)| DenyHits::from_map(net_from_v4(Key::new(len, a.octets())), entry)),
        IpAddr::V6(a) => v6
            .longest_match(Key::new(128, a.octets()))?
            .map(|(len, entry)| DenyHits::from_map(net_from_v6(Key::new(len, a.octets())), entry)),
    })
}
