//! One LPM trie of prefixes of one family, the keys it takes, and the helpers every map
//! wrapper shares (errno checks, batch outcomes, descriptors for readers).

use std::os::fd::AsFd as _;

use apiban_common::{AllowEntry, DenyEntry};
use aya::maps::{
    IterableMap as _, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{DataplaneError, Family, List, batch};

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
pub(super) fn member<const N: usize>(key: &Key<[u8; N]>) -> (u32, [u8; N]) {
    (key.prefix_len(), key.data())
}

pub(super) fn is_errno(e: &MapError, errno: i32) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

/// A full map answers ENOSPC (LPM trie) or E2BIG (hash).
pub(super) fn is_full_errno(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::ENOSPC) | Some(libc::E2BIG))
}

pub(super) fn batch_result(
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
pub(super) fn dup_map(map: &MapData, name: &'static str) -> Result<MapData, DataplaneError> {
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(DataplaneError::Io)?;
    MapData::from_fd(fd).map_err(|source| DataplaneError::Map { name, source })
}

impl<const N: usize, V: PrefixValue> PrefixMap<N, V> {
    pub(super) fn reader(&self) -> Result<Self, DataplaneError> {
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

    pub(super) fn new(
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

    pub(super) fn trie_map(&self) -> &MapData {
        self.trie.map()
    }

    pub(super) fn map_err(&self, source: MapError) -> DataplaneError {
        match &source {
            MapError::SyscallError(e) if is_full_errno(e.io_error.raw_os_error()) => self.full(),
            _ => DataplaneError::Map {
                name: self.name,
                source,
            },
        }
    }

    pub(super) fn full(&self) -> DataplaneError {
        DataplaneError::MapFull {
            list: self.list,
            family: self.family,
            capacity: self.capacity,
        }
    }

    /// Adds a prefix. An existing entry keeps its value (and so its hit count).
    pub(super) fn insert(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
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
    pub(super) fn remove(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
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

    /// Writes `values[i]` for `keys[i]` in as few syscalls as the kernel allows, adding the
    /// keys that are new. Present keys get the new value (their hit counts too).
    pub(super) fn write_batch(
        &mut self,
        keys: &[Key<[u8; N]>],
        values: &[V],
    ) -> Result<usize, DataplaneError> {
        let outcome = batch::update(self.trie.map().fd().as_fd(), keys, values);
        batch_result(self.name, outcome, || self.full())
    }

    /// The value of exactly this prefix, if present.
    pub(super) fn exact(&self, key: Key<[u8; N]>) -> Result<Option<V>, DataplaneError> {
        Ok(self
            .longest_match(key)?
            .filter(|(len, _)| *len == key.prefix_len())
            .map(|(_, v)| v))
    }

    /// Removes many exact prefixes; all must be present.
    pub(super) fn remove_batch(&mut self, keys: &[Key<[u8; N]>]) -> Result<usize, DataplaneError> {
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

pub(super) const BPF_NOEXIST: u64 = 1;

pub fn v4_key(net: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.trunc().addr().octets())
}

pub fn v6_key(net: Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.trunc().addr().octets())
}

/// The prefix a key stands for, with host bits cleared. Keys come from our own maps, where
/// the prefix length never exceeds the address width; `min` keeps that an invariant here.
pub(super) fn net_from_v4(key: Key<[u8; 4]>) -> IpNet {
    let len = key.prefix_len().min(32) as u8;
    IpNet::V4(Ipv4Net::new_assert(key.data().into(), len).trunc())
}

pub(super) fn net_from_v6(key: Key<[u8; 16]>) -> IpNet {
    let len = key.prefix_len().min(128) as u8;
    IpNet::V6(Ipv6Net::new_assert(key.data().into(), len).trunc())
}
