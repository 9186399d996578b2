//! The dataplane: the XDP program's maps behind a typed API, and the loader that loads,
//! adopts, attaches and detaches the program.
//!
//! One writer by construction: [`Dataplane`] is the only type with methods that write the
//! maps (the map wrappers' writes are private to this module), it is neither `Clone` nor
//! shared, and the loader hands it to the agent, which moves it into the engine on the
//! owner's thread. Everything else reads through a [`DataplaneReader`].
//!
//! - [`loader`], [`netlink`], [`bpffs`]: load or adopt, attach, detach, lock;
//! - [`deny`], [`allow`], [`prefix_map`], [`host_table`], [`filter`]: the lists' maps;
//! - [`counters`], [`switches`]: what the program counts, how it is switched;
//! - [`reader`]: the read-only view for other threads;
//! - [`batch`], `objects`, `mapping`: raw syscalls and memory maps underneath.

pub mod allow;
pub mod batch;
pub mod bpffs;
pub mod capture;
pub mod counters;
pub mod deny;
pub mod detect;
pub mod filter;
pub mod host_table;
pub mod kernel;
pub mod loader;
mod mapping;
pub mod netlink;
mod objects;
pub mod prefix_map;
pub mod reader;
pub mod switches;

pub use self::{
    allow::AllowList,
    deny::{DenyLookup, DenyMap},
    prefix_map::{Entry, PrefixMap, PrefixValue, v4_key, v6_key},
    reader::DataplaneReader,
};

use std::{collections::BTreeSet, io, net::IpAddr};

use apiban_common::{
    Counter, DataplaneConfig, DenyEntry, HostTables, VERDICT_COUNT, Verdict, map_names,
};
use aya::maps::{Array, MapData, MapError, lpm_trie::Key};
use ipnet::IpNet;

use self::{
    counters::Counters,
    filter::BlockFilter,
    host_table::HostTable,
    prefix_map::{net_from_v4, net_from_v6},
    switches::Switches,
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("the {list} map for {family} is full ({capacity} entries); raise its capacity")]
    MapFull {
        list: List,
        family: Family,
        capacity: u32,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot size per-CPU counters")]
    Io(#[source] io::Error),
    #[error(
        "map {name} has {entries} entries where this version expects {expected}; run `apiban detach` and start again"
    )]
    MapSize {
        name: &'static str,
        entries: usize,
        expected: usize,
    },
    #[error("cannot memory-map {name}")]
    Mmap {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("batch update of {name} failed after {done} entries")]
    Batch {
        name: &'static str,
        done: usize,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum List {
    Deny,
    Allow,
}

impl std::fmt::Display for List {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            List::Deny => "deny",
            List::Allow => "allow",
        })
    }
}

/// Which traffic from a banned source is dropped.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Scope {
    /// Everything (what the existing APIBAN clients do).
    #[default]
    All,
    /// Only TCP/UDP to these destination ports (and non-first fragments, which carry no port).
    Ports(BTreeSet<u16>),
}

/// Packets and bytes for every verdict, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub counters: [Counter; VERDICT_COUNT as usize],
}

impl Stats {
    pub fn get(&self, verdict: Verdict) -> Counter {
        self.counters[verdict as usize]
    }

    pub(crate) fn add(&mut self, other: &Stats) {
        for (total, c) in self.counters.iter_mut().zip(other.counters.iter()) {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
    }
}

/// A deny entry as the dataplane sees it: the prefix, its hit bookkeeping (the count without
/// the observe mark) and whether it carries the mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyHits {
    pub net: IpNet,
    pub entry: DenyEntry,
    /// Matching packets pass, counted as observed (see `apiban_common::OBSERVED`).
    pub observed: bool,
}

impl DenyHits {
    /// Splits the mark off a map entry's `hits` word.
    pub(crate) fn from_map(net: IpNet, mut entry: DenyEntry) -> Self {
        let observed = entry.hits & apiban_common::OBSERVED != 0;
        entry.hits = apiban_common::hit_count(entry.hits);
        Self {
            net,
            entry,
            observed,
        }
    }
}

/// A map key of each family.
type KeyV4 = Key<[u8; 4]>;
type KeyV6 = Key<[u8; 16]>;

/// The maps' keys for `nets`, split by family (the two families' maps have different keys).
fn keys_by_family(nets: &[IpNet]) -> (Vec<KeyV4>, Vec<KeyV6>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for net in nets {
        match *net {
            IpNet::V4(n) => v4.push(v4_key(n)),
            IpNet::V6(n) => v6.push(v6_key(n)),
        }
    }
    (v4, v6)
}

/// The XDP program's maps. Owned by whoever owns the ledger; nothing else writes them.
pub struct Dataplane {
    deny_v4: DenyMap<4>,
    deny_v6: DenyMap<16>,
    allow_v4: AllowList<4>,
    allow_v6: AllowList<16>,
    counters: Counters,
    switches: Switches,
    /// Also kept open because programs loaded later (the benchmarks') refer to it by descriptor.
    host_tables: Array<MapData, HostTables>,
}

impl Dataplane {
    /// Takes the maps out of a loaded eBPF object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, DataplaneError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::MissingMap { name })
        };
        let typed = |name: &'static str, source| DataplaneError::Map { name, source };
        let host_tables: Array<MapData, HostTables> =
            Array::try_from(take(map_names::HOST_TABLES)?)
                .map_err(|e| typed(map_names::HOST_TABLES, e))?;
        let mut dataplane = Self {
            deny_v4: {
                let prefixes = PrefixMap::new(
                    take(map_names::DENY_V4)?,
                    map_names::DENY_V4,
                    List::Deny,
                    Family::V4,
                )?;
                // One deny capacity bounds both the hosts and the prefixes; the trie has it.
                let hosts = HostTable::new(
                    take(map_names::DENY_V4_HOST_KEYS)?,
                    map_names::DENY_V4_HOST_KEYS,
                    take(map_names::DENY_V4_HOST_HITS)?,
                    map_names::DENY_V4_HOST_HITS,
                    Family::V4,
                    prefixes.capacity(),
                )?;
                let filter =
                    BlockFilter::new(take(map_names::DENY_V4_FILTER)?, map_names::DENY_V4_FILTER)?;
                DenyMap::new(hosts, prefixes, filter)?
            },
            deny_v6: {
                let prefixes = PrefixMap::new(
                    take(map_names::DENY_V6)?,
                    map_names::DENY_V6,
                    List::Deny,
                    Family::V6,
                )?;
                // One deny capacity bounds both the hosts and the prefixes; the trie has it.
                let hosts = HostTable::new(
                    take(map_names::DENY_V6_HOST_KEYS)?,
                    map_names::DENY_V6_HOST_KEYS,
                    take(map_names::DENY_V6_HOST_HITS)?,
                    map_names::DENY_V6_HOST_HITS,
                    Family::V6,
                    prefixes.capacity(),
                )?;
                let filter =
                    BlockFilter::new(take(map_names::DENY_V6_FILTER)?, map_names::DENY_V6_FILTER)?;
                DenyMap::new(hosts, prefixes, filter)?
            },
            allow_v4: AllowList::new(
                PrefixMap::new(
                    take(map_names::ALLOW_V4)?,
                    map_names::ALLOW_V4,
                    List::Allow,
                    Family::V4,
                )?,
                BlockFilter::new(
                    take(map_names::ALLOW_V4_FILTER)?,
                    map_names::ALLOW_V4_FILTER,
                )?,
            )?,
            allow_v6: AllowList::new(
                PrefixMap::new(
                    take(map_names::ALLOW_V6)?,
                    map_names::ALLOW_V6,
                    List::Allow,
                    Family::V6,
                )?,
                BlockFilter::new(
                    take(map_names::ALLOW_V6_FILTER)?,
                    map_names::ALLOW_V6_FILTER,
                )?,
            )?,
            counters: Counters::new(take(map_names::STATS)?, take(map_names::IFACE_SLOTS)?)?,
            switches: Switches::new(take(map_names::CONFIG)?, take(map_names::SCOPE_PORTS)?)?,
            host_tables,
        };
        // The tables may have been created just now, with sizes from this agent's capacities,
        // or adopted from pins: the program learns their geometry from what they are.
        let tables = HostTables {
            v4_buckets: dataplane.deny_v4.host_buckets(),
            v6_buckets: dataplane.deny_v6.host_buckets(),
        };
        dataplane
            .host_tables
            .set(0, &tables, 0)
            .map_err(|e| typed(map_names::HOST_TABLES, e))?;
        dataplane.sync_allow_flags()?;
        Ok(dataplane)
    }

    /// A reader for another thread (see [`DataplaneReader`]).
    pub fn reader(&self) -> Result<DataplaneReader, DataplaneError> {
        Ok(DataplaneReader::new(
            self.deny_v4.lookup_reader()?,
            self.deny_v6.lookup_reader()?,
            self.counters.dup()?,
        ))
    }

    /// The IPv4 deny list, to read.
    pub fn deny_v4(&self) -> &DenyMap<4> {
        &self.deny_v4
    }

    /// The IPv6 deny list, to read.
    pub fn deny_v6(&self) -> &DenyMap<16> {
        &self.deny_v6
    }

    /// The IPv4 allowlist, to read.
    pub fn allow_v4(&self) -> &AllowList<4> {
        &self.allow_v4
    }

    /// The IPv6 allowlist, to read.
    pub fn allow_v6(&self) -> &AllowList<16> {
        &self.allow_v6
    }

    /// The kernel's ID of the IPv4 deny trie: which maps a program on an interface uses
    /// tells whether it enforces this agent's bans.
    pub fn deny_v4_map_id(&self) -> Result<u32, DataplaneError> {
        self.deny_v4
            .prefix_trie()
            .info()
            .map(|i| i.id())
            .map_err(|source| DataplaneError::Map {
                name: map_names::DENY_V4,
                source,
            })
    }

    /// Moves what the host hashes of a version before the host tables hold into the tables,
    /// hit counts included. `v4` and `v6` are the legacy maps' entries.
    pub fn adopt_legacy_hosts(
        &mut self,
        v4: Vec<([u8; 4], DenyEntry)>,
        v6: Vec<([u8; 16], DenyEntry)>,
    ) -> Result<(), DataplaneError> {
        self.deny_v4.adopt_legacy(v4)?;
        self.deny_v6.adopt_legacy(v6)
    }

    pub fn deny(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        match net {
            IpNet::V4(n) => self.deny_v4.insert(v4_key(n)),
            IpNet::V6(n) => self.deny_v6.insert(v6_key(n)),
        }
    }

    pub fn undeny(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        match net {
            IpNet::V4(n) => self.deny_v4.remove(v4_key(n)),
            IpNet::V6(n) => self.deny_v6.remove(v6_key(n)),
        }
    }

    pub fn is_denied(&self, net: IpNet) -> Result<bool, DataplaneError> {
        match net {
            IpNet::V4(n) => self.deny_v4.contains(v4_key(n)),
            IpNet::V6(n) => self.deny_v6.contains(v6_key(n)),
        }
    }

    pub fn allow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        match net {
            IpNet::V4(n) => {
                self.set_flag(DataplaneConfig::ALLOW_V4_LISTED, true)?;
                self.allow_v4.insert(v4_key(n))
            }
            IpNet::V6(n) => {
                self.set_flag(DataplaneConfig::ALLOW_V6_LISTED, true)?;
                self.allow_v6.insert(v6_key(n))
            }
        }
    }

    pub fn unallow(&mut self, net: IpNet) -> Result<(), DataplaneError> {
        match net {
            IpNet::V4(n) => self.allow_v4.remove(v4_key(n))?,
            IpNet::V6(n) => self.allow_v6.remove(v6_key(n))?,
        }
        self.sync_allow_flags()
    }

    /// Sets each family's "allowlist has entries" switch from what its list holds. Called on
    /// load (the pins may come from a version without the switches) and after removals; an
    /// insert sets its switch itself, before the entry goes in.
    fn sync_allow_flags(&mut self) -> Result<(), DataplaneError> {
        let v4 = !self.allow_v4.is_empty();
        let v6 = !self.allow_v6.is_empty();
        self.set_flag(DataplaneConfig::ALLOW_V4_LISTED, v4)?;
        self.set_flag(DataplaneConfig::ALLOW_V6_LISTED, v6)
    }

    pub fn is_allowed(&self, net: IpNet) -> Result<bool, DataplaneError> {
        match net {
            IpNet::V4(n) => self.allow_v4.contains(v4_key(n)),
            IpNet::V6(n) => self.allow_v6.contains(v6_key(n)),
        }
    }

    /// The deny entry that covers `addr` (the longest match) and its hit bookkeeping.
    pub fn deny_match(&self, addr: IpAddr) -> Result<Option<DenyHits>, DataplaneError> {
        reader::deny_match(self.deny_v4.lookup(), self.deny_v6.lookup(), addr)
    }

    /// What the XDP program would decide for a packet from `addr` (ignoring port scope),
    /// with the deny prefix that matched, if any.
    pub fn verdict_for(&self, addr: IpAddr) -> Result<(Verdict, Option<IpNet>), DataplaneError> {
        let allowed = match addr {
            IpAddr::V4(a) => self.allow_v4.longest_match(Key::new(32, a.octets()))?,
            IpAddr::V6(a) => self.allow_v6.longest_match(Key::new(128, a.octets()))?,
        }
        .is_some();
        let observing = self.config()?.flags & DataplaneConfig::OBSERVED_LISTED != 0;
        Ok(match self.deny_match(addr)? {
            None => (Verdict::Passed, None),
            Some(hit) if allowed => (Verdict::Allowed, Some(hit.net)),
            Some(hit) if hit.observed && observing => (Verdict::Observed, Some(hit.net)),
            Some(hit) => (Verdict::Dropped, Some(hit.net)),
        })
    }

    /// Adds many deny prefixes with batched map updates, `observed` ones with the observe
    /// mark (the switch that makes the program read it goes on first). Prefixes already
    /// present are skipped so that their hit counters survive.
    pub fn deny_batch(&mut self, nets: &[IpNet], observed: bool) -> Result<usize, DataplaneError> {
        if observed && !nets.is_empty() {
            self.set_observing(true)?;
        }
        let (v4, v6) = keys_by_family(nets);
        Ok(self.deny_v4.insert_batch(&v4, observed)? + self.deny_v6.insert_batch(&v6, observed)?)
    }

    /// Sets or clears the observe mark of present deny prefixes in place.
    pub fn mark_batch(&mut self, nets: &[IpNet], observed: bool) -> Result<(), DataplaneError> {
        if observed && !nets.is_empty() {
            self.set_observing(true)?;
        }
        let (v4, v6) = keys_by_family(nets);
        self.deny_v4.mark_batch(&v4, observed)?;
        self.deny_v6.mark_batch(&v6, observed)
    }

    /// Whether the program reads the observe mark. On before any marked entry goes in; the
    /// owner turns it off once none is left, so drops pay nothing for the mode.
    pub fn set_observing(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.set_flag(DataplaneConfig::OBSERVED_LISTED, on)
    }

    /// Removes many deny prefixes with batched map deletes.
    pub fn undeny_batch(&mut self, nets: &[IpNet]) -> Result<usize, DataplaneError> {
        let (v4, v6) = keys_by_family(nets);
        Ok(self.deny_v4.remove_batch(&v4)? + self.deny_v6.remove_batch(&v6)?)
    }

    /// Every deny entry with its hit count and last-hit time, IPv4 then IPv6.
    pub fn deny_hits(&self) -> Result<Vec<DenyHits>, DataplaneError> {
        reader::deny_hits(self.deny_v4.lookup(), self.deny_v6.lookup())
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

    /// The counter slot of an interface; 0 ("other") when it has none.
    pub fn counter_slot(&self, ifindex: u32) -> Result<u32, DataplaneError> {
        self.counters.counter_slot(ifindex)
    }

    /// Gives `ifindex` a counter slot of its own (see [`Counters::assign_counter_slot`]).
    pub fn assign_counter_slot(
        &mut self,
        ifindex: u32,
        others: &[u32],
    ) -> Result<u32, DataplaneError> {
        self.counters.assign_counter_slot(ifindex, others)
    }

    pub fn config(&self) -> Result<DataplaneConfig, DataplaneError> {
        self.switches.config()
    }

    /// Sets the scope on the running program (see [`Switches::set_scope`]).
    pub fn set_scope(&mut self, scope: &Scope) -> Result<(), DataplaneError> {
        self.switches.set_scope(scope)
    }

    pub fn scope(&self) -> Result<Scope, DataplaneError> {
        self.switches.scope()
    }

    /// Sets one of the [`DataplaneConfig`] switches other than scope.
    pub fn set_flag(&mut self, flag: u32, on: bool) -> Result<(), DataplaneError> {
        self.switches.set_flag(flag, on)
    }

    /// Every allow prefix, IPv4 then IPv6.
    pub fn allow_entries(&self) -> Result<Vec<IpNet>, DataplaneError> {
        let v4 = self
            .allow_v4
            .entries()?
            .into_iter()
            .map(|(k, _)| net_from_v4(k));
        let v6 = self
            .allow_v6
            .entries()?
            .into_iter()
            .map(|(k, _)| net_from_v6(k));
        Ok(v4.chain(v6).collect())
    }
}
