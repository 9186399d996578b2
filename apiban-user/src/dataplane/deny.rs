//! The deny list of one family: the host table, the trie and the filter in front of them.

use apiban_common::{DenyEntry, HostHits, OBSERVED, hit_count};
use aya::maps::{MapData, lpm_trie::Key};

use super::{
    DataplaneError,
    filter::BlockFilter,
    host_table::HostTable,
    prefix_map::{Entry, PrefixMap, member},
};

/// The deny list of one family: single hosts in a host table (a few inlined loads on the hot
/// path whatever the size), shorter prefixes and hosts the table has no room for in an LPM
/// trie, and the filter in front of both.
pub struct DenyMap<const N: usize> {
    lookup: DenyLookup<N>,
    filter: BlockFilter<N>,
}

/// What a lookup reads: the host table, then the trie. A reader holds one of its own.
pub struct DenyLookup<const N: usize> {
    hosts: HostTable<N>,
    prefixes: PrefixMap<N, DenyEntry>,
}

impl<const N: usize> DenyLookup<N> {
    const HOST_LEN: u32 = (N * 8) as u32;

    pub(super) fn host_entry(hits: HostHits) -> DenyEntry {
        DenyEntry {
            hits: hits.hits,
            last_hit_ns: hits.last_hit_ns,
            prefix_len: Self::HOST_LEN,
            _reserved: 0,
        }
    }

    /// The same maps through descriptors of the reader's own.
    pub(super) fn dup(&self) -> Result<Self, DataplaneError> {
        Ok(Self {
            hosts: self.hosts.reader()?,
            prefixes: self.prefixes.reader()?,
        })
    }

    /// Capacity of the prefix trie; the host table is sized for as many hosts.
    pub fn capacity(&self) -> u32 {
        self.prefixes.capacity()
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

    /// The entries hit at least once.
    pub fn hit_entries(&self) -> Result<Vec<Entry<N, DenyEntry>>, DataplaneError> {
        let mut hit: Vec<Entry<N, DenyEntry>> = self
            .hosts
            .hit_entries()?
            .into_iter()
            .map(|(addr, hits)| (Key::new(Self::HOST_LEN, addr), Self::host_entry(hits)))
            .collect();
        hit.extend(
            self.prefixes
                .entries()?
                .into_iter()
                .filter(|(_, e)| hit_count(e.hits) > 0),
        );
        Ok(hit)
    }
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

    /// Capacity of the prefix trie; the host table is sized for as many hosts.
    pub fn capacity(&self) -> u32 {
        self.lookup.capacity()
    }

    /// Buckets of the host table.
    pub fn host_buckets(&self) -> u32 {
        self.lookup.hosts.buckets()
    }

    /// Hosts in the host table; the others are in the trie, where a lookup costs a call.
    pub fn hosts_in_table(&self) -> usize {
        self.lookup.hosts.len()
    }

    /// Brings the filter in line with what the maps hold: they may come from a previous
    /// agent's pins, or meet this filter for the first time after an upgrade.
    pub(super) fn new(
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
            lookup: DenyLookup { hosts, prefixes },
            filter,
        })
    }

    /// The filter in front of the maps: what the XDP program checks first.
    pub fn filter(&self) -> &BlockFilter<N> {
        &self.filter
    }

    /// Adds a prefix. An existing entry keeps its value (and so its hit count).
    pub(super) fn insert(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        self.insert_batch(&[key], false).map(|_| ())
    }

    /// Removes an exact prefix; removing an absent one is not an error.
    pub(super) fn remove(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        if Self::is_host(&key) {
            if !self.lookup.hosts.remove_batch(&[key.data()])?.is_empty() {
                self.lookup.prefixes.remove(key)?;
            }
        } else {
            self.lookup.prefixes.remove(key)?;
        }
        self.filter.remove([member(&key)])
    }

    /// Whether exactly this prefix is present (not whether something covers it).
    pub fn contains(&self, key: Key<[u8; N]>) -> Result<bool, DataplaneError> {
        if Self::is_host(&key) && self.lookup.hosts.get(&key.data())?.is_some() {
            return Ok(true);
        }
        self.lookup.prefixes.contains(key)
    }

    /// The entry the XDP program finds for a packet from `key` (see [`DenyLookup`]).
    pub fn longest_match(
        &self,
        key: Key<[u8; N]>,
    ) -> Result<Option<(u32, DenyEntry)>, DataplaneError> {
        self.lookup.longest_match(key)
    }

    /// What lookups read, for lookups shared with readers.
    pub(super) fn lookup(&self) -> &DenyLookup<N> {
        &self.lookup
    }

    /// The trie's map, for its kernel ID.
    pub(super) fn prefix_trie(&self) -> &MapData {
        self.lookup.prefixes.trie_map()
    }

    /// What a reader on another thread holds (see [`super::DataplaneReader`]).
    pub(super) fn lookup_reader(&self) -> Result<DenyLookup<N>, DataplaneError> {
        self.lookup.dup()
    }

    /// Adds many prefixes: hosts into the table, the rest (and hosts it has no room for) with
    /// batched trie updates; `observed` ones carry the observe mark from their first packet.
    /// Prefixes already present keep their hit counts and their mark.
    pub(super) fn insert_batch(
        &mut self,
        keys: &[Key<[u8; N]>],
        observed: bool,
    ) -> Result<usize, DataplaneError> {
        self.filter.add(keys.iter().map(member))?;
        let (hosts, mut prefixes) = Self::split(keys);
        let before = self.lookup.hosts.len();
        let no_room = self.lookup.hosts.insert_batch(&hosts, observed)?;
        let placed = self.lookup.hosts.len() - before;
        prefixes.extend(Self::host_keys(no_room));
        let mut fresh = Vec::with_capacity(prefixes.len());
        for key in prefixes {
            if !self.lookup.prefixes.contains(key)? {
                fresh.push(key);
            }
        }
        let values: Vec<DenyEntry> = fresh
            .iter()
            .map(|k| DenyEntry {
                hits: if observed { OBSERVED } else { 0 },
                prefix_len: k.prefix_len(),
                ..Default::default()
            })
            .collect();
        Ok(placed + self.lookup.prefixes.write_batch(&fresh, &values)?)
    }

    /// Sets or clears the observe mark of present prefixes in place, without a moment
    /// between a ban and its mark. A trie entry is rewritten whole, so hits counted between
    /// its read and its write are lost: a few packets' worth, once per switch.
    pub(super) fn mark_batch(
        &mut self,
        keys: &[Key<[u8; N]>],
        observed: bool,
    ) -> Result<(), DataplaneError> {
        let (hosts, mut prefixes) = Self::split(keys);
        prefixes.extend(Self::host_keys(
            self.lookup.hosts.mark_batch(&hosts, observed)?,
        ));
        let mut present = Vec::with_capacity(prefixes.len());
        let mut values = Vec::with_capacity(prefixes.len());
        for key in prefixes {
            if let Some(mut entry) = self.lookup.prefixes.exact(key)? {
                entry.hits = if observed {
                    entry.hits | OBSERVED
                } else {
                    hit_count(entry.hits)
                };
                present.push(key);
                values.push(entry);
            }
        }
        self.lookup
            .prefixes
            .write_batch(&present, &values)
            .map(drop)
    }

    /// Removes many exact prefixes, all of which must be present. After a failure the filter
    /// keeps the bits of every key of the failed batch: set too long costs a lookup, cleared
    /// too early would let a banned source through.
    pub(super) fn remove_batch(&mut self, keys: &[Key<[u8; N]>]) -> Result<usize, DataplaneError> {
        let (hosts, mut prefixes) = Self::split(keys);
        let before = self.lookup.hosts.len();
        let elsewhere = self.lookup.hosts.remove_batch(&hosts)?;
        let removed = before - self.lookup.hosts.len();
        prefixes.extend(Self::host_keys(elsewhere));
        let removed = removed + self.lookup.prefixes.remove_batch(&prefixes)?;
        self.filter.remove(keys.iter().map(member))?;
        Ok(removed)
    }

    /// All entries with their values, hosts in the table first.
    pub fn entries(&self) -> Result<Vec<Entry<N, DenyEntry>>, DataplaneError> {
        self.lookup.entries()
    }

    /// Number of entries; walks the trie, so it costs O(n) syscalls for prefixes.
    pub fn count(&self) -> usize {
        self.lookup.hosts.len() + self.lookup.prefixes.count()
    }

    /// Moves a legacy host hash's entries, with their hit counts, into this map.
    pub(super) fn adopt_legacy(
        &mut self,
        entries: Vec<([u8; N], DenyEntry)>,
    ) -> Result<(), DataplaneError> {
        let keys: Vec<_> = entries
            .iter()
            .map(|(addr, _)| Key::new(Self::HOST_LEN, *addr))
            .collect();
        self.insert_batch(&keys, false)?;
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
        self.lookup.hosts.restore_hits(&hits)
    }
}
