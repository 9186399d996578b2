//! The dataplane: the XDP program's maps behind a typed API, and the loader that loads,
//! adopts, attaches and detaches the program.
//!
//! Only the ledger's owner writes through [`Dataplane`]; everything else reads.

pub mod batch;
pub mod bpffs;
pub mod filter;
pub mod host_table;
pub mod loader;
mod mapping;
pub mod netlink;
mod objects;

use std::{collections::BTreeSet, io, net::IpAddr, os::fd::AsFd as _};

use apiban_common::{
    AllowEntry, Counter, DataplaneConfig, DenyEntry, HostHits, HostTables, IFACE_COUNTER_SLOTS,
    IFACE_SLOT_INDEXES, SCOPE_PORT_SLOTS, VERDICT_COUNT, Verdict, map_names,
};
use aya::maps::{
    Array, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use self::{filter::BlockFilter, host_table::HostTable};

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
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot size per-CPU counters: {0}")]
    Io(#[source] io::Error),
    #[error(
        "map {name} has {entries} entries where this version expects {expected}; run `apiban detach` and start again"
    )]
    MapSize {
        name: &'static str,
        entries: usize,
        expected: usize,
    },
    #[error("cannot memory-map {name}: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("batch update of {name} failed after {done} entries: {source}")]
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

    fn add(&mut self, other: &Stats) {
        for (total, c) in self.counters.iter_mut().zip(other.counters.iter()) {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
    }
}

/// A deny entry as the dataplane sees it: the prefix and its hit bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyHits {
    pub net: IpNet,
    pub entry: DenyEntry,
}

/// A map value that records the prefix length of its own key (see [`DenyEntry`]).
pub trait PrefixValue: aya::Pod {
    fn for_prefix(prefix_len: u32) -> Self;
    fn prefix_len(&self) -> u32;
}

impl PrefixValue for DenyEntry {
    fn for_prefix(prefix_len: u32) -> Self {
        DenyEntry {
            prefix_len,
            ..Default::default()
        }
    }
    fn prefix_len(&self) -> u32 {
        self.prefix_len
    }
}

impl PrefixValue for AllowEntry {
    fn for_prefix(prefix_len: u32) -> Self {
        AllowEntry { prefix_len }
    }
    fn prefix_len(&self) -> u32 {
        self.prefix_len
    }
}

/// One LPM trie with prefix keys of `N` octets: IPv4 (`N = 4`) or IPv6 (`N = 16`).
pub struct PrefixMap<const N: usize, V: PrefixValue> {
    name: &'static str,
    list: List,
    family: Family,
    capacity: u32,
    trie: LpmTrie<MapData, [u8; N], V>,
}

/// A key and its value, as read back from a map.
pub type Entry<const N: usize, V> = (Key<[u8; N]>, V);

/// An entry as the block filters count it.
fn member<const N: usize>(key: &Key<[u8; N]>) -> (u32, [u8; N]) {
    (key.prefix_len(), key.data())
}

/// The allowlist of one family: an LPM trie and the filter in front of it.
pub struct AllowList<const N: usize> {
    prefixes: PrefixMap<N, AllowEntry>,
    filter: BlockFilter<N>,
}

impl<const N: usize> AllowList<N> {
    /// Recounts the filter from the trie (see [`DenyMap::new`]).
    fn new(
        prefixes: PrefixMap<N, AllowEntry>,
        mut filter: BlockFilter<N>,
    ) -> Result<Self, DataplaneError> {
        filter.rebuild(
            prefixes
                .entries()?
                .iter()
                .map(|(k, _)| (k.prefix_len(), k.data())),
        )?;
        Ok(Self { prefixes, filter })
    }

    /// The filter in front of the trie.
    pub fn filter(&self) -> &BlockFilter<N> {
        &self.filter
    }

    /// Adds a prefix; its bits are set before the program can find it.
    pub fn insert(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        self.filter.add([member(&key)])?;
        self.prefixes.insert(key)
    }

    /// Removes an exact prefix, then the bits no other entry needs.
    pub fn remove(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        self.prefixes.remove(key)?;
        self.filter.remove([member(&key)])
    }

    pub fn contains(&self, key: Key<[u8; N]>) -> Result<bool, DataplaneError> {
        self.prefixes.contains(key)
    }

    pub fn longest_match(
        &self,
        key: Key<[u8; N]>,
    ) -> Result<Option<(u32, AllowEntry)>, DataplaneError> {
        self.prefixes.longest_match(key)
    }

    pub fn entries(&self) -> Result<Vec<Entry<N, AllowEntry>>, DataplaneError> {
        self.prefixes.entries()
    }
}

fn is_errno(e: &MapError, errno: i32) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

/// A full map answers ENOSPC (LPM trie) or E2BIG (hash).
fn is_full_errno(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::ENOSPC) | Some(libc::E2BIG))
}

/// The deny list of one family: single hosts in a host table (a few inlined loads on the hot
/// path whatever the size), shorter prefixes and hosts the table has no room for in an LPM
/// trie, and the filter in front of both.
pub struct DenyMap<const N: usize> {
    hosts: HostTable<N>,
    prefixes: PrefixMap<N, DenyEntry>,
    filter: BlockFilter<N>,
}

impl<const N: usize> DenyMap<N> {
    const HOST_LEN: u32 = (N * 8) as u32;

    fn is_host(key: &Key<[u8; N]>) -> bool {
        key.prefix_len() == Self::HOST_LEN
    }

    /// Single-host keys (as bare addresses for the table) and the shorter prefixes.
    fn split(keys: &[Key<[u8; N]>]) -> (Vec<[u8; N]>, Vec<Key<[u8; N]>>) {
        let mut hosts = Vec::with_capacity(keys.len());
        let mut prefixes = Vec::new();
        for key in keys {
            if Self::is_host(key) {
                hosts.push(key.data());
            } else {
                prefixes.push(*key);
            }
        }
        (hosts, prefixes)
    }

    fn host_keys(addrs: Vec<[u8; N]>) -> Vec<Key<[u8; N]>> {
        addrs
            .into_iter()
            .map(|a| Key::new(Self::HOST_LEN, a))
            .collect()
    }

    fn host_entry(hits: HostHits) -> DenyEntry {
        DenyEntry {
            hits: hits.hits,
            last_hit_ns: hits.last_hit_ns,
            prefix_len: Self::HOST_LEN,
            _reserved: 0,
        }
    }

    /// Capacity of the prefix trie; the host table is sized for as many hosts.
    pub fn capacity(&self) -> u32 {
        self.prefixes.capacity
    }

    /// Buckets of the host table.
    pub fn host_buckets(&self) -> u32 {
        self.hosts.buckets()
    }

    /// Hosts in the host table; the others are in the trie, where a lookup costs a call.
    pub fn hosts_in_table(&self) -> usize {
        self.hosts.len()
    }

    /// Brings the filter in line with what the maps hold: they may come from a previous
    /// agent's pins, or meet this filter for the first time after an upgrade.
    fn new(
        hosts: HostTable<N>,
        prefixes: PrefixMap<N, DenyEntry>,
        mut filter: BlockFilter<N>,
    ) -> Result<Self, DataplaneError> {
        let host_entries = hosts.entries()?;
        let prefix_entries = prefixes.entries()?;
        filter.rebuild(
            host_entries
                .iter()
                .map(|(addr, _)| (Self::HOST_LEN, *addr))
                .chain(
                    prefix_entries
                        .iter()
                        .map(|(k, _)| (k.prefix_len(), k.data())),
                ),
        )?;
        Ok(Self {
            hosts,
            prefixes,
            filter,
        })
    }

    /// The filter in front of the maps: what the XDP program checks first.
    pub fn filter(&self) -> &BlockFilter<N> {
        &self.filter
    }

    /// Adds a prefix. An existing entry keeps its value (and so its hit count).
    pub fn insert(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        self.insert_batch(&[key]).map(|_| ())
    }

    /// Removes an exact prefix; removing an absent one is not an error.
    pub fn remove(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        if Self::is_host(&key) {
            if !self.hosts.remove_batch(&[key.data()])?.is_empty() {
                self.prefixes.remove(key)?;
            }
        } else {
            self.prefixes.remove(key)?;
        }
        self.filter.remove([member(&key)])
    }

    /// Whether exactly this prefix is present (not whether something covers it).
    pub fn contains(&self, key: Key<[u8; N]>) -> Result<bool, DataplaneError> {
        if Self::is_host(&key) && self.hosts.get(&key.data())?.is_some() {
            return Ok(true);
        }
        self.prefixes.contains(key)
    }

    /// The entry the XDP program finds for a packet from the full-length address `key`, with
    /// the length of its prefix.
    pub fn longest_match(
        &self,
        key: Key<[u8; N]>,
    ) -> Result<Option<(u32, DenyEntry)>, DataplaneError> {
        if let Some(hits) = self.hosts.get(&key.data())? {
            return Ok(Some((Self::HOST_LEN, Self::host_entry(hits))));
        }
        self.prefixes.longest_match(key)
    }

    /// Adds many prefixes: hosts into the table, the rest (and hosts it has no room for) with
    /// batched trie updates. Prefixes already present keep their hit counts.
    pub fn insert_batch(&mut self, keys: &[Key<[u8; N]>]) -> Result<usize, DataplaneError> {
        self.filter.add(keys.iter().map(member))?;
        let (hosts, mut prefixes) = Self::split(keys);
        let before = self.hosts.len();
        let no_room = self.hosts.insert_batch(&hosts)?;
        let placed = self.hosts.len() - before;
        prefixes.extend(Self::host_keys(no_room));
        let mut fresh = Vec::with_capacity(prefixes.len());
        for key in prefixes {
            if !self.prefixes.contains(key)? {
                fresh.push(key);
            }
        }
        Ok(placed + self.prefixes.insert_batch(&fresh)?)
    }

    /// Removes many exact prefixes, all of which must be present. After a failure the filter
    /// keeps the bits of every key of the failed batch: set too long costs a lookup, cleared
    /// too early would let a banned source through.
    pub fn remove_batch(&mut self, keys: &[Key<[u8; N]>]) -> Result<usize, DataplaneError> {
        let (hosts, mut prefixes) = Self::split(keys);
        let before = self.hosts.len();
        let elsewhere = self.hosts.remove_batch(&hosts)?;
        let removed = before - self.hosts.len();
        prefixes.extend(Self::host_keys(elsewhere));
        let removed = removed + self.prefixes.remove_batch(&prefixes)?;
        self.filter.remove(keys.iter().map(member))?;
        Ok(removed)
    }

    /// All entries with their values, hosts in the table first.
    pub fn entries(&self) -> Result<Vec<Entry<N, DenyEntry>>, DataplaneError> {
        let mut all: Vec<Entry<N, DenyEntry>> = self
            .hosts
            .entries()?
            .into_iter()
            .map(|(addr, hits)| (Key::new(Self::HOST_LEN, addr), Self::host_entry(hits)))
            .collect();
        all.extend(self.prefixes.entries()?);
        Ok(all)
    }

    /// Number of entries; walks the trie, so it costs O(n) syscalls for prefixes.
    pub fn count(&self) -> usize {
        self.hosts.len() + self.prefixes.count()
    }

    /// Moves a legacy host hash's entries, with their hit counts, into this map.
    fn adopt_legacy(&mut self, entries: Vec<([u8; N], DenyEntry)>) -> Result<(), DataplaneError> {
        let keys: Vec<_> = entries
            .iter()
            .map(|(addr, _)| Key::new(Self::HOST_LEN, *addr))
            .collect();
        self.insert_batch(&keys)?;
        let hits: Vec<_> = entries
            .iter()
            .map(|(addr, e)| {
                (
                    *addr,
                    HostHits {
                        hits: e.hits,
                        last_hit_ns: e.last_hit_ns,
                    },
                )
            })
            .collect();
        self.hosts.restore_hits(&hits)
    }
}

fn batch_result(
    name: &'static str,
    outcome: batch::BatchOutcome,
    full: impl FnOnce() -> DataplaneError,
) -> Result<usize, DataplaneError> {
    match outcome.error {
        None => Ok(outcome.done),
        Some(e) if is_full_errno(e.raw_os_error()) => Err(full()),
        Some(source) => Err(DataplaneError::Batch {
            name,
            done: outcome.done,
            source,
        }),
    }
}

/// A new descriptor for the same map: what a reader holds, so that it needs nothing of the
/// owner's.
fn dup_map(map: &MapData, name: &'static str) -> Result<MapData, DataplaneError> {
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(DataplaneError::Io)?;
    MapData::from_fd(fd).map_err(|source| DataplaneError::Map { name, source })
}

/// The deny maps, read from another thread than the owner's: every entry with its hits, for
/// `apiban status`'s top sources, which walks whole tables and must not hold the ledger's
/// owner while it does. It reads the same kernel maps; it never writes them.
pub struct DataplaneReader {
    v4: (HostTable<4>, PrefixMap<4, DenyEntry>),
    v6: (HostTable<16>, PrefixMap<16, DenyEntry>),
}

impl DataplaneReader {
    /// Every deny entry with its hit count and last-hit time, IPv4 then IPv6.
    pub fn deny_hits(&self) -> Result<Vec<DenyHits>, DataplaneError> {
        let v4 = self
            .v4
            .0
            .entries()?
            .into_iter()
            .map(|(addr, hits)| DenyHits {
                net: net_from_v4(Key::new(32, addr)),
                entry: DenyMap::<4>::host_entry(hits),
            });
        let v4_prefixes = self.v4.1.entries()?.into_iter().map(|(k, entry)| DenyHits {
            net: net_from_v4(k),
            entry,
        });
        let v6 = self
            .v6
            .0
            .entries()?
            .into_iter()
            .map(|(addr, hits)| DenyHits {
                net: net_from_v6(Key::new(128, addr)),
                entry: DenyMap::<16>::host_entry(hits),
            });
        let v6_prefixes = self.v6.1.entries()?.into_iter().map(|(k, entry)| DenyHits {
            net: net_from_v6(k),
            entry,
        });
        Ok(v4.chain(v4_prefixes).chain(v6).chain(v6_prefixes).collect())
    }
}

impl<const N: usize, V: PrefixValue> PrefixMap<N, V> {
    fn reader(&self) -> Result<Self, DataplaneError> {
        let trie = LpmTrie::try_from(Map::LpmTrie(dup_map(self.trie.map(), self.name)?)).map_err(
            |source| DataplaneError::Map {
                name: self.name,
                source,
            },
        )?;
        Ok(Self {
            name: self.name,
            list: self.list,
            family: self.family,
            capacity: self.capacity,
            trie,
        })
    }

    fn new(
        map: Map,
        name: &'static str,
        list: List,
        family: Family,
    ) -> Result<Self, DataplaneError> {
        let trie: LpmTrie<MapData, [u8; N], V> =
            LpmTrie::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
        let capacity = trie
            .map()
            .info()
            .map_err(|source| DataplaneError::Map { name, source })?
            .max_entries();
        Ok(Self {
            name,
            list,
            family,
            capacity,
            trie,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn map_err(&self, source: MapError) -> DataplaneError {
        match &source {
            MapError::SyscallError(e) if is_full_errno(e.io_error.raw_os_error()) => self.full(),
            _ => DataplaneError::Map {
                name: self.name,
                source,
            },
        }
    }

    fn full(&self) -> DataplaneError {
        DataplaneError::MapFull {
            list: self.list,
            family: self.family,
            capacity: self.capacity,
        }
    }

    /// Adds a prefix. An existing entry keeps its value (and so its hit count).
    pub fn insert(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        match self
            .trie
            .insert(&key, &V::for_prefix(key.prefix_len()), BPF_NOEXIST)
        {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(self.map_err(e)),
        }
    }

    /// Removes an exact prefix; removing an absent one is not an error.
    pub fn remove(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        match self.trie.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            Err(e) => Err(self.map_err(e)),
        }
    }

    /// Whether exactly this prefix is present (not whether something covers it).
    pub fn contains(&self, key: Key<[u8; N]>) -> Result<bool, DataplaneError> {
        Ok(self
            .longest_match(key)?
            .is_some_and(|(len, _)| len == key.prefix_len()))
    }

    /// The value of the longest prefix covering `key`, with that prefix's length: what the
    /// XDP program finds for a packet when `key` is a full-length address.
    pub fn longest_match(&self, key: Key<[u8; N]>) -> Result<Option<(u32, V)>, DataplaneError> {
        match self.trie.get(&key, 0) {
            Ok(v) => Ok(Some((v.prefix_len(), v))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(None),
            Err(e) => Err(self.map_err(e)),
        }
    }

    /// Adds many prefixes in as few syscalls as the kernel allows. Prefixes already present
    /// are overwritten with a fresh value, so callers pass only prefixes that are new.
    pub fn insert_batch(&mut self, keys: &[Key<[u8; N]>]) -> Result<usize, DataplaneError> {
        let values: Vec<V> = keys.iter().map(|k| V::for_prefix(k.prefix_len())).collect();
        let outcome = batch::update(self.trie.map().fd().as_fd(), keys, &values);
        batch_result(self.name, outcome, || self.full())
    }

    /// Removes many exact prefixes; all must be present.
    pub fn remove_batch(&mut self, keys: &[Key<[u8; N]>]) -> Result<usize, DataplaneError> {
        let outcome = batch::delete(self.trie.map().fd().as_fd(), keys);
        batch_result(self.name, outcome, || self.full())
    }

    /// All entries with their values.
    pub fn entries(&self) -> Result<Vec<Entry<N, V>>, DataplaneError> {
        self.trie
            .iter()
            .map(|r| r.map_err(|e| self.map_err(e)))
            .collect()
    }

    /// Number of entries; walks the trie, so it costs O(n) syscalls.
    pub fn count(&self) -> usize {
        self.trie.keys().filter(Result::is_ok).count()
    }
}

const BPF_NOEXIST: u64 = 1;

pub fn v4_key(net: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.trunc().addr().octets())
}

pub fn v6_key(net: Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.trunc().addr().octets())
}

/// The prefix a key stands for, with host bits cleared. Keys come from our own maps, where
/// the prefix length never exceeds the address width; `min` keeps that an invariant here.
fn net_from_v4(key: Key<[u8; 4]>) -> IpNet {
    let len = key.prefix_len().min(32) as u8;
    IpNet::V4(Ipv4Net::new_assert(key.data().into(), len).trunc())
}

fn net_from_v6(key: Key<[u8; 16]>) -> IpNet {
    let len = key.prefix_len().min(128) as u8;
    IpNet::V6(Ipv6Net::new_assert(key.data().into(), len).trunc())
}

/// The XDP program's maps. Owned by whoever owns the ledger; nothing else writes them.
pub struct Dataplane {
    pub deny_v4: DenyMap<4>,
    pub deny_v6: DenyMap<16>,
    pub allow_v4: AllowList<4>,
    pub allow_v6: AllowList<16>,
    stats: PerCpuArray<MapData, Counter>,
    config: Array<MapData, DataplaneConfig>,
    scope_ports: Array<MapData, u8>,
    iface_slots: Array<MapData, u32>,
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
                    prefixes.capacity,
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
                    prefixes.capacity,
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
            stats: PerCpuArray::try_from(take(map_names::STATS)?)
                .map_err(|e| typed(map_names::STATS, e))?,
            config: Array::try_from(take(map_names::CONFIG)?)
                .map_err(|e| typed(map_names::CONFIG, e))?,
            scope_ports: Array::try_from(take(map_names::SCOPE_PORTS)?)
                .map_err(|e| typed(map_names::SCOPE_PORTS, e))?,
            iface_slots: Array::try_from(take(map_names::IFACE_SLOTS)?)
                .map_err(|e| typed(map_names::IFACE_SLOTS, e))?,
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

    /// A reader of the deny maps for another thread (see [`DataplaneReader`]).
    pub fn reader(&self) -> Result<DataplaneReader, DataplaneError> {
        Ok(DataplaneReader {
            v4: (
                self.deny_v4.hosts.reader()?,
                self.deny_v4.prefixes.reader()?,
            ),
            v6: (
                self.deny_v6.hosts.reader()?,
                self.deny_v6.prefixes.reader()?,
            ),
        })
    }

    /// The kernel's ID of the IPv4 deny trie: which maps a program on an interface uses
    /// tells whether it enforces this agent's bans.
    pub fn deny_v4_map_id(&self) -> Result<u32, DataplaneError> {
        self.deny_v4
            .prefixes
            .trie
            .map()
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
        let v4 = !self.allow_v4.filter.is_empty();
        let v6 = !self.allow_v6.filter.is_empty();
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
        Ok(match addr {
            IpAddr::V4(a) => {
                self.deny_v4
                    .longest_match(Key::new(32, a.octets()))?
                    .map(|(len, entry)| DenyHits {
                        net: net_from_v4(Key::new(len, a.octets())),
                        entry,
                    })
            }
            IpAddr::V6(a) => {
                self.deny_v6
                    .longest_match(Key::new(128, a.octets()))?
                    .map(|(len, entry)| DenyHits {
                        net: net_from_v6(Key::new(len, a.octets())),
                        entry,
                    })
            }
        })
    }

    /// What the XDP program would decide for a packet from `addr` (ignoring port scope),
    /// with the deny prefix that matched, if any.
    pub fn verdict_for(&self, addr: IpAddr) -> Result<(Verdict, Option<IpNet>), DataplaneError> {
        let (deny, allowed) = match addr {
            IpAddr::V4(a) => {
                let key = Key::new(32, a.octets());
                let deny = self
                    .deny_v4
                    .longest_match(key)?
                    .map(|(len, _)| net_from_v4(Key::new(len, a.octets())));
                (deny, self.allow_v4.longest_match(key)?.is_some())
            }
            IpAddr::V6(a) => {
                let key = Key::new(128, a.octets());
                let deny = self
                    .deny_v6
                    .longest_match(key)?
                    .map(|(len, _)| net_from_v6(Key::new(len, a.octets())));
                (deny, self.allow_v6.longest_match(key)?.is_some())
            }
        };
        Ok(match deny {
            None => (Verdict::Passed, None),
            Some(net) if allowed => (Verdict::Allowed, Some(net)),
            Some(net) => (Verdict::Dropped, Some(net)),
        })
    }

    /// Adds many deny prefixes with batched map updates. Prefixes already present are
    /// skipped so that their hit counters survive.
    pub fn deny_batch(&mut self, nets: &[IpNet]) -> Result<usize, DataplaneError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in nets {
            match *net {
                IpNet::V4(n) => v4.push(v4_key(n)),
                IpNet::V6(n) => v6.push(v6_key(n)),
            }
        }
        Ok(self.deny_v4.insert_batch(&v4)? + self.deny_v6.insert_batch(&v6)?)
    }

    /// Removes many deny prefixes with batched map deletes.
    pub fn undeny_batch(&mut self, nets: &[IpNet]) -> Result<usize, DataplaneError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in nets {
            match *net {
                IpNet::V4(n) => v4.push(v4_key(n)),
                IpNet::V6(n) => v6.push(v6_key(n)),
            }
        }
        Ok(self.deny_v4.remove_batch(&v4)? + self.deny_v6.remove_batch(&v6)?)
    }

    /// Per-verdict packet and byte counts, summed over CPUs and interfaces.
    pub fn stats(&self) -> Result<Stats, DataplaneError> {
        let mut total = Stats::default();
        for slot in 0..IFACE_COUNTER_SLOTS {
            total.add(&self.slot_stats(slot)?);
        }
        Ok(total)
    }

    /// Counters of the interfaces given as (name, ifindex), then "other": packets on
    /// interfaces without a counter slot of their own.
    pub fn stats_by_interface(
        &self,
        ifaces: &[(String, u32)],
    ) -> Result<Vec<(String, Stats)>, DataplaneError> {
        let mut out = Vec::with_capacity(ifaces.len() + 1);
        let mut counted = BTreeSet::new();
        for (name, ifindex) in ifaces {
            let slot = self.counter_slot(*ifindex)?;
            if slot != 0 && counted.insert(slot) {
                out.push((name.clone(), self.slot_stats(slot)?));
            }
        }
        let mut other = Stats::default();
        for slot in (0..IFACE_COUNTER_SLOTS).filter(|s| !counted.contains(s)) {
            other.add(&self.slot_stats(slot)?);
        }
        out.push(("other".to_owned(), other));
        Ok(out)
    }

    fn slot_stats(&self, slot: u32) -> Result<Stats, DataplaneError> {
        let mut stats = Stats::default();
        for verdict in Verdict::ALL {
            let per_cpu = self
                .stats
                .get(&(slot * VERDICT_COUNT + verdict as u32), 0)
                .map_err(|source| DataplaneError::Map {
                    name: map_names::STATS,
                    source,
                })?;
            let total = &mut stats.counters[verdict as usize];
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
        }
        Ok(stats)
    }

    /// The counter slot of an interface; 0 ("other") when it has none.
    pub fn counter_slot(&self, ifindex: u32) -> Result<u32, DataplaneError> {
        if ifindex >= IFACE_SLOT_INDEXES {
            return Ok(0);
        }
        self.iface_slots
            .get(&ifindex, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::IFACE_SLOTS,
                source,
            })
    }

    /// Gives `ifindex` a counter slot of its own unless it has one or all are taken (then its
    /// packets count as "other"). `others` are the ifindexes of the other attached interfaces,
    /// whose slots are in use. A new slot starts from zero.
    pub fn assign_counter_slot(
        &mut self,
        ifindex: u32,
        others: &[u32],
    ) -> Result<u32, DataplaneError> {
        if ifindex >= IFACE_SLOT_INDEXES {
            return Ok(0);
        }
        let mut taken = BTreeSet::new();
        for other in others.iter().filter(|o| **o != ifindex) {
            taken.insert(self.counter_slot(*other)?);
        }
        // A slot left behind by a detached interface may since have gone to another one.
        let current = self.counter_slot(ifindex)?;
        if current != 0 && !taken.contains(&current) {
            return Ok(current);
        }
        let Some(slot) = (1..IFACE_COUNTER_SLOTS).find(|s| !taken.contains(s)) else {
            return Ok(0);
        };
        let map_err = |name: &'static str| move |source| DataplaneError::Map { name, source };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Io(e))?;
        for verdict in Verdict::ALL {
            let zero = PerCpuValues::try_from(vec![Counter::default(); cpus.get() as usize])
                .map_err(DataplaneError::Io)?;
            self.stats
                .set(slot * VERDICT_COUNT + verdict as u32, zero, 0)
                .map_err(map_err(map_names::STATS))?;
        }
        self.iface_slots
            .set(ifindex, &slot, 0)
            .map_err(map_err(map_names::IFACE_SLOTS))?;
        Ok(slot)
    }

    /// Every deny entry with its hit count and last-hit time, IPv4 then IPv6.
    pub fn deny_hits(&self) -> Result<Vec<DenyHits>, DataplaneError> {
        let v4 = self
            .deny_v4
            .entries()?
            .into_iter()
            .map(|(k, entry)| DenyHits {
                net: net_from_v4(k),
                entry,
            });
        let v6 = self
            .deny_v6
            .entries()?
            .into_iter()
            .map(|(k, entry)| DenyHits {
                net: net_from_v6(k),
                entry,
            });
        Ok(v4.chain(v6).collect())
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

    pub fn config(&self) -> Result<DataplaneConfig, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::CONFIG,
                source,
            })
    }

    fn set_config(&mut self, config: DataplaneConfig) -> Result<(), DataplaneError> {
        self.config
            .set(0, &config, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::CONFIG,
                source,
            })
    }

    /// Sets the scope on the running program. Ports are written before the switch is
    /// flipped, so a packet never sees port scope with an empty port set.
    pub fn set_scope(&mut self, scope: &Scope) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<u16> = match scope {
            Scope::All => BTreeSet::new(),
            Scope::Ports(ports) => ports.clone(),
        };
        let mut config = self.config()?;
        if matches!(scope, Scope::All) {
            config.flags &= !DataplaneConfig::SCOPE_PORTS;
            self.set_config(config)?;
        }
        for port in 0..SCOPE_PORT_SLOTS {
            let on = u8::from(u16::try_from(port).is_ok_and(|p| wanted.contains(&p)));
            let current = self
                .scope_ports
                .get(&port, 0)
                .map_err(|source| DataplaneError::Map {
                    name: map_names::SCOPE_PORTS,
                    source,
                })?;
            if current != on {
                self.scope_ports
                    .set(port, &on, 0)
                    .map_err(|source| DataplaneError::Map {
                        name: map_names::SCOPE_PORTS,
                        source,
                    })?;
            }
        }
        if matches!(scope, Scope::Ports(_)) {
            config.flags |= DataplaneConfig::SCOPE_PORTS;
            self.set_config(config)?;
        }
        Ok(())
    }

    pub fn scope(&self) -> Result<Scope, DataplaneError> {
        if self.config()?.flags & DataplaneConfig::SCOPE_PORTS == 0 {
            return Ok(Scope::All);
        }
        let mut ports = BTreeSet::new();
        for (port, on) in self.scope_ports.iter().enumerate() {
            let on = on.map_err(|source| DataplaneError::Map {
                name: map_names::SCOPE_PORTS,
                source,
            })?;
            if on != 0 {
                ports.insert(port as u16);
            }
        }
        Ok(Scope::Ports(ports))
    }

    /// Sets one of the [`DataplaneConfig`] switches other than scope.
    pub fn set_flag(&mut self, flag: u32, on: bool) -> Result<(), DataplaneError> {
        let mut config = self.config()?;
        let before = config.flags;
        if on {
            config.flags |= flag;
        } else {
            config.flags &= !flag;
        }
        if config.flags == before {
            return Ok(());
        }
        self.set_config(config)
    }
}
