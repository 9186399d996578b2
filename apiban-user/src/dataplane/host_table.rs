//! The host tables' userspace half: places banned single hosts in the open-addressed tables the
//! XDP program searches (see `apiban_common::host_table` for the layout and why).
//!
//! Slots are written through a shared mapping of the keys array, one atomic word at a time, in
//! the order the program's reads rely on. The mapping only lives for one operation: the tables
//! are sized for the full capacity, and keeping them mapped would count megabytes of kernel
//! memory against the agent's resident size.
//!
//! A slot's hit count is zeroed when its host is removed, so a new host starts from zero
//! without a write before it is published (which would cost a syscall per insert). Loading
//! zeroes any free slot that still has hits (an agent that died between the two steps).

use std::{
    collections::HashSet,
    ops::Range,
    os::fd::AsFd as _,
    sync::atomic::{AtomicU32, Ordering},
};

use apiban_common::{
    HostHits, OBSERVED, hit_count,
    host_table::{self, PROBE_BUCKETS},
};
use aya::maps::{Array, IterableMap as _, Map, MapData, MapError};

use super::{
    DataplaneError, Family, List, batch,
    mapping::Mapping,
    prefix_map::{batch_result, dup_map},
};

/// Every bucket is one 64-byte array element.
const BUCKET_BYTES: usize = 64;

/// The host table of one family: `N = 4` (IPv4) or `N = 16` (IPv6) octets per address.
pub struct HostTable<const N: usize> {
    keys_name: &'static str,
    hits_name: &'static str,
    family: Family,
    /// Hosts the table takes before it reports itself full: the deny capacity. The table has
    /// 1.25 slots for each, so that probe windows rarely fill.
    capacity: u32,
    buckets: u32,
    len: usize,
    keys: MapData,
    hits: Array<MapData, HostHits>,
}

/// Which slots a scan visits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slots {
    /// Every slot, its hits writable (to clear those a removal left behind).
    AllWritable,
    /// Only slots that hold a host.
    Occupied,
}

/// An address as the program compares it: words loaded natively from the packet's octets.
type Words = [u32; 4];

impl<const N: usize> HostTable<N> {
    /// Addresses per bucket.
    const SLOTS: u32 = (BUCKET_BYTES / N) as u32;
    /// Words per address.
    const WORDS: usize = N / 4;

    pub(super) fn new(
        keys: Map,
        keys_name: &'static str,
        hits: Map,
        hits_name: &'static str,
        family: Family,
        capacity: u32,
    ) -> Result<Self, DataplaneError> {
        let Map::Array(keys) = keys else {
            return Err(DataplaneError::Map {
                name: keys_name,
                source: MapError::InvalidMapType { map_type: 0 },
            });
        };
        let info = keys.info().map_err(|source| DataplaneError::Map {
            name: keys_name,
            source,
        })?;
        if info.value_size() as usize != BUCKET_BYTES {
            return Err(DataplaneError::MapSize {
                name: keys_name,
                entries: info.value_size() as usize,
                expected: BUCKET_BYTES,
            });
        }
        let buckets = info.max_entries();
        let hits: Array<MapData, HostHits> =
            Array::try_from(hits).map_err(|source| DataplaneError::Map {
                name: hits_name,
                source,
            })?;
        let slots = buckets as usize * Self::SLOTS as usize;
        if hits.len() as usize != slots {
            return Err(DataplaneError::MapSize {
                name: hits_name,
                entries: hits.len() as usize,
                expected: slots,
            });
        }
        let mut table = Self {
            keys_name,
            hits_name,
            family,
            capacity,
            buckets,
            len: 0,
            keys,
            hits,
        };
        table.len = table.settle()?;
        Ok(table)
    }

    /// A second handle on the same table, for reading it away from its owner: status reads
    /// every slot's hits, which must not hold up the writer. Nothing is settled or written.
    pub(super) fn reader(&self) -> Result<Self, DataplaneError> {
        let keys = dup_map(&self.keys, self.keys_name)?;
        let hits = Array::try_from(Map::Array(dup_map(self.hits.map(), self.hits_name)?)).map_err(
            |source| DataplaneError::Map {
                name: self.hits_name,
                source,
            },
        )?;
        Ok(Self {
            keys_name: self.keys_name,
            hits_name: self.hits_name,
            family: self.family,
            capacity: self.capacity,
            buckets: self.buckets,
            len: self.len,
            keys,
            hits,
        })
    }

    /// Buckets in the table, which the program needs to find a home bucket.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Hosts in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maps the whole keys array, for operations on many addresses.
    fn map_keys(&self, writable: bool) -> Result<Keys, DataplaneError> {
        self.map_buckets(0..self.buckets, writable)
    }

    /// Maps the buckets of one address's probe window: a page or two, where the whole array
    /// is megabytes and takes a fraction of a millisecond to map.
    fn map_window(&self, words: &Words, writable: bool) -> Result<Keys, DataplaneError> {
        let home = self.home(words);
        if home + PROBE_BUCKETS <= self.buckets {
            self.map_buckets(home..home + PROBE_BUCKETS, writable)
        } else {
            self.map_keys(writable)
        }
    }

    /// The whole keys array for a batch large enough to pay for mapping it, else None: each
    /// address then maps its own window.
    fn map_for(&self, addresses: usize, writable: bool) -> Result<Option<Keys>, DataplaneError> {
        const WINDOWS_WORTH_A_WHOLE_MAPPING: usize = 64;
        if addresses > WINDOWS_WORTH_A_WHOLE_MAPPING {
            self.map_keys(writable).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The mapping to use for one address: the whole array if mapped, else its own window.
    fn keys_for<'a>(
        &self,
        whole: &'a Option<Keys>,
        window: &'a mut Option<Keys>,
        words: &Words,
        writable: bool,
    ) -> Result<&'a Keys, DataplaneError> {
        if let Some(keys) = whole {
            return Ok(keys);
        }
        Ok(window.insert(self.map_window(words, writable)?))
    }

    fn map_buckets(&self, buckets: Range<u32>, writable: bool) -> Result<Keys, DataplaneError> {
        let bytes = buckets.start as usize * BUCKET_BYTES..buckets.end as usize * BUCKET_BYTES;
        let mapping = Mapping::new(self.keys.fd().as_fd(), bytes, writable).map_err(|source| {
            DataplaneError::Mmap {
                name: self.keys_name,
                source,
            }
        })?;
        Ok(Keys {
            mapping,
            buckets: self.buckets,
            slots: Self::SLOTS,
            words: Self::WORDS,
        })
    }

    fn map_hits(&self, slots: Range<u32>, writable: bool) -> Result<Mapping, DataplaneError> {
        let size = size_of::<HostHits>();
        let bytes = slots.start as usize * size..slots.end as usize * size;
        Mapping::new(self.hits.map().fd().as_fd(), bytes, writable).map_err(|source| {
            DataplaneError::Mmap {
                name: self.hits_name,
                source,
            }
        })
    }

    /// Counts the hosts and zeroes the hit counts of free slots.
    fn settle(&self) -> Result<usize, DataplaneError> {
        let mut len = 0;
        self.scan(Slots::AllWritable, |keys, hits, slot| {
            if keys.is_free(slot) {
                for word in [
                    hits.u64_at(slot as usize * 2),
                    hits.u64_at(slot as usize * 2 + 1),
                ] {
                    if word.load(Ordering::Relaxed) != 0 {
                        word.store(0, Ordering::Relaxed);
                    }
                }
            } else {
                len += 1;
            }
        })?;
        Ok(len)
    }

    /// Visits the slots `which` names with their keys and hits mapped, a chunk of buckets at
    /// a time: mapped pages count towards the agent's resident size while they are mapped,
    /// and the hits of a full-size IPv4 table are 20 MiB. Mapping is what a scan costs (the
    /// pages of a BPF array mapping are all set up at mmap time), so for occupied slots the
    /// hits of a chunk are mapped only when it holds a host.
    fn scan(
        &self,
        which: Slots,
        mut visit: impl FnMut(&Keys, &Mapping, u32),
    ) -> Result<(), DataplaneError> {
        const BUCKETS_PER_CHUNK: u32 = 4_096;
        let mut first = 0;
        while first < self.buckets {
            let end = (first + BUCKETS_PER_CHUNK).min(self.buckets);
            let keys = self.map_buckets(first..end, false)?;
            let slots = first * Self::SLOTS..end * Self::SLOTS;
            let wanted = |slot: &u32| which != Slots::Occupied || !keys.is_free(*slot);
            if slots.clone().any(|slot| wanted(&slot)) {
                let hits = self.map_hits(slots.clone(), which == Slots::AllWritable)?;
                for slot in slots.filter(wanted) {
                    visit(&keys, &hits, slot);
                }
            }
            first = end;
        }
        Ok(())
    }

    fn words(addr: &[u8; N]) -> Words {
        let mut words = [0; 4];
        for (word, octets) in words.iter_mut().zip(addr.as_chunks::<4>().0) {
            *word = u32::from_ne_bytes(*octets);
        }
        words
    }

    fn home(&self, words: &Words) -> u32 {
        let hash = if N == 4 {
            host_table::v4_hash(words[0])
        } else {
            host_table::v6_hash(words)
        };
        host_table::home(hash, self.buckets)
    }

    /// Every slot's hit bookkeeping, mapped for marking: mapping costs only what is touched.
    fn map_all_hits(&self) -> Result<Mapping, DataplaneError> {
        self.map_hits(0..self.buckets * Self::SLOTS, true)
    }

    /// Places hosts that are not in the table yet, `observed` ones with their mark set before
    /// they are published. Returns those that found no free slot in their probe window (or
    /// cannot be told from a free slot): they belong in the trie. Stops with `MapFull` at
    /// capacity, keeping the hosts placed until then.
    pub(super) fn insert_batch(
        &mut self,
        addrs: &[[u8; N]],
        observed: bool,
    ) -> Result<Vec<[u8; N]>, DataplaneError> {
        let whole = self.map_for(addrs.len(), true)?;
        let hits = if observed {
            Some(self.map_all_hits()?)
        } else {
            None
        };
        let mut window = None;
        let mut no_room = Vec::new();
        for addr in addrs {
            let words = Self::words(addr);
            if words[0] == 0 {
                no_room.push(*addr);
                continue;
            }
            let keys = self.keys_for(&whole, &mut window, &words, true)?;
            let home = self.home(&words);
            if keys.find(home, &words).is_some() {
                continue;
            }
            if self.len >= self.capacity as usize {
                return Err(DataplaneError::MapFull {
                    list: List::Deny,
                    family: self.family,
                    capacity: self.capacity,
                });
            }
            match keys.free_slot(home) {
                Some(slot) => {
                    if let Some(hits) = &hits {
                        // A free slot's bookkeeping is zero (see the module's comment).
                        hits.u64_at(slot as usize * 2)
                            .fetch_or(OBSERVED, Ordering::Release);
                    }
                    keys.publish(slot, &words);
                    self.len += 1;
                }
                None => no_room.push(*addr),
            }
        }
        Ok(no_room)
    }

    /// Sets or clears the observe mark of hosts in place: one atomic operation each, which
    /// the program sees on its next packet. Returns those not in the table: they may be in
    /// the trie.
    pub(super) fn mark_batch(
        &mut self,
        addrs: &[[u8; N]],
        observed: bool,
    ) -> Result<Vec<[u8; N]>, DataplaneError> {
        let keys = self.map_keys(false)?;
        let hits = self.map_all_hits()?;
        let mut absent = Vec::new();
        for addr in addrs {
            let words = Self::words(addr);
            match keys.find(self.home(&words), &words) {
                Some(slot) if words[0] != 0 => {
                    let word = hits.u64_at(slot as usize * 2);
                    if observed {
                        word.fetch_or(OBSERVED, Ordering::AcqRel);
                    } else {
                        word.fetch_and(!OBSERVED, Ordering::AcqRel);
                    }
                }
                _ => absent.push(*addr),
            }
        }
        Ok(absent)
    }

    /// Removes hosts. Returns those that were not in the table: they may be in the trie.
    pub(super) fn remove_batch(
        &mut self,
        addrs: &[[u8; N]],
    ) -> Result<Vec<[u8; N]>, DataplaneError> {
        let whole = self.map_for(addrs.len(), true)?;
        let mut window = None;
        let mut freed = Vec::new();
        let mut absent = Vec::new();
        for addr in addrs {
            let words = Self::words(addr);
            let keys = self.keys_for(&whole, &mut window, &words, true)?;
            match keys.find(self.home(&words), &words) {
                Some(slot) if words[0] != 0 => {
                    keys.free(slot);
                    freed.push(slot);
                }
                _ => absent.push(*addr),
            }
        }
        drop((whole, window));
        self.len -= freed.len();
        let zero = vec![HostHits::default(); freed.len()];
        let outcome = batch::update(self.hits.map().fd().as_fd(), &freed, &zero);
        batch_result(self.hits_name, outcome, || unreachable_full(self.hits_name))?;
        Ok(absent)
    }

    /// The hit bookkeeping of a host, if the table has it.
    pub(super) fn get(&self, addr: &[u8; N]) -> Result<Option<HostHits>, DataplaneError> {
        let words = Self::words(addr);
        if words[0] == 0 {
            return Ok(None);
        }
        let Some(slot) = self
            .map_window(&words, false)?
            .find(self.home(&words), &words)
        else {
            return Ok(None);
        };
        self.hits
            .get(&slot, 0)
            .map(Some)
            .map_err(|source| DataplaneError::Map {
                name: self.hits_name,
                source,
            })
    }

    /// Every host with its hit bookkeeping, in slot order.
    pub(super) fn entries(&self) -> Result<Vec<([u8; N], HostHits)>, DataplaneError> {
        self.collect(self.len, |_| true)
    }

    /// The hosts that were hit at least once: what `status` ranks, without copying out the
    /// slots of every host that never sent a packet.
    pub(super) fn hit_entries(&self) -> Result<Vec<([u8; N], HostHits)>, DataplaneError> {
        self.collect(0, |h| hit_count(h.hits) > 0)
    }

    fn collect(
        &self,
        capacity: usize,
        keep: impl Fn(&HostHits) -> bool,
    ) -> Result<Vec<([u8; N], HostHits)>, DataplaneError> {
        let mut out = Vec::with_capacity(capacity);
        self.scan(Slots::Occupied, |keys, hits, slot| {
            let i = slot as usize * 2;
            let bookkeeping = HostHits {
                hits: hits.u64_at(i).load(Ordering::Relaxed),
                last_hit_ns: hits.u64_at(i + 1).load(Ordering::Relaxed),
            };
            if !keep(&bookkeeping) {
                return;
            }
            let mut addr = [0u8; N];
            for (octets, word) in addr.as_chunks_mut::<4>().0.iter_mut().zip(keys.slot(slot)) {
                octets.copy_from_slice(&word.load(Ordering::Acquire).to_ne_bytes());
            }
            out.push((addr, bookkeeping));
        })?;
        Ok(out)
    }

    /// Writes hit bookkeeping carried over from elsewhere (a legacy host hash) for hosts
    /// already placed; hosts not in the table are skipped.
    pub(super) fn restore_hits(
        &mut self,
        entries: &[([u8; N], HostHits)],
    ) -> Result<(), DataplaneError> {
        let keys = self.map_keys(false)?;
        let mut slots = Vec::new();
        let mut values = Vec::new();
        let mut seen = HashSet::new();
        for (addr, hits) in entries {
            let words = Self::words(addr);
            if let Some(slot) = keys.find(self.home(&words), &words)
                && words[0] != 0
                && seen.insert(slot)
            {
                slots.push(slot);
                values.push(*hits);
            }
        }
        drop(keys);
        let outcome = batch::update(self.hits.map().fd().as_fd(), &slots, &values);
        batch_result(self.hits_name, outcome, || unreachable_full(self.hits_name))?;
        Ok(())
    }
}

/// An array is never full; an error on one is reported as what it is.
fn unreachable_full(name: &'static str) -> DataplaneError {
    DataplaneError::Batch {
        name,
        done: 0,
        source: std::io::Error::from_raw_os_error(libc::E2BIG),
    }
}

/// The keys array of one table, mapped for one operation. A slot index is
/// `bucket * slots + slot in bucket`, and its words start at `slot index * words`.
struct Keys {
    mapping: Mapping,
    buckets: u32,
    slots: u32,
    words: usize,
}

impl Keys {
    fn slot(&self, slot: u32) -> impl Iterator<Item = &AtomicU32> {
        let first = slot as usize * self.words;
        (first..first + self.words).map(|i| self.mapping.u32_at(i))
    }

    fn first_word(&self, slot: u32) -> &AtomicU32 {
        self.mapping.u32_at(slot as usize * self.words)
    }

    /// The slots an address with this home bucket may be in, in the program's order.
    fn window(&self, home: u32) -> impl Iterator<Item = u32> + '_ {
        (0..PROBE_BUCKETS.min(self.buckets)).flat_map(move |i| {
            let bucket = (home + i) % self.buckets;
            (0..self.slots).map(move |s| bucket * self.slots + s)
        })
    }

    fn is_free(&self, slot: u32) -> bool {
        self.first_word(slot).load(Ordering::Acquire) == 0
    }

    fn find(&self, home: u32, words: &Words) -> Option<u32> {
        self.window(home).find(|slot| {
            self.slot(*slot)
                .zip(words)
                .all(|(have, want)| have.load(Ordering::Acquire) == *want)
        })
    }

    fn free_slot(&self, home: u32) -> Option<u32> {
        self.window(home).find(|slot| self.is_free(*slot))
    }

    /// Writes an address into a free slot, first word last: the program reads the first word
    /// first and takes a zero for a free slot.
    fn publish(&self, slot: u32, words: &Words) {
        for (word, value) in self.slot(slot).zip(words).skip(1) {
            word.store(*value, Ordering::Relaxed);
        }
        self.first_word(slot).store(words[0], Ordering::Release);
    }

    /// Frees a slot by zeroing its first word; the rest is stale and never compared alone.
    /// An IPv6 program run that read the old first word just before this, and reads the tail
    /// only after the slot has been published again for another address, would compare a
    /// mix of the two. Freeing and reusing are separate applies, microseconds apart at the
    /// least, against a run's few nanoseconds between those loads, so there is no generation
    /// word to rule it out.
    fn free(&self, slot: u32) {
        self.first_word(slot).store(0, Ordering::Release);
    }
}
