//! The block filters' userspace half: keeps the bitmap in front of one family's deny (or allow)
//! maps equal to (or, transiently, a superset of) the blocks its entries cover. See
//! `apiban_common::block_filter` for what a bit means and why the XDP program checks it first.
//!
//! The bitmap is a memory-mapped BPF array, so a bit is set or cleared with one atomic
//! operation. The count of entries per bit lives here: a bit is cleared only when the last entry
//! covering it is gone. A bit that stays set too long costs a full lookup; a bit cleared too
//! early would let a banned source through (or an allowed one be dropped), so every path errs
//! towards set.

use std::{ops::Range, os::fd::AsFd as _, sync::atomic::Ordering};

use apiban_common::block_filter::{
    self, V4_BLOCK_PREFIX, V4_MAX_SPAN_BITS, V6_BLOCK_PREFIX, V6_MAX_SPAN_BITS, WORDS,
};
use aya::maps::{Array, IterableMap as _, Map, MapData};
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use super::{DataplaneError, mapping::Mapping};

/// An entry as the filter counts it: prefix length and address octets.
type Member<const N: usize> = (u32, [u8; N]);

/// The filter of one family: `N = 4` (IPv4) or `N = 16` (IPv6).
///
/// The bitmap is mapped only while bits change: kept mapped, the four filters would count
/// 8 MiB of kernel memory against the agent's resident size.
pub struct BlockFilter<const N: usize> {
    name: &'static str,
    map: Array<MapData, u64>,
    /// Entries counted, so that adding or removing one twice cannot skew the counts.
    members: HashSet<Member<N>>,
    /// Entries per set bit.
    counts: HashMap<u32, u32>,
    /// Entries too wide to spell out bit by bit; while there is one, every bit is set.
    wide: usize,
}

impl<const N: usize> BlockFilter<N> {
    pub(super) fn new(map: Map, name: &'static str) -> Result<Self, DataplaneError> {
        let map: Array<MapData, u64> =
            Array::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
        let len = map.len() as usize;
        if len != WORDS as usize {
            return Err(DataplaneError::MapSize {
                name,
                entries: len,
                expected: WORDS as usize,
            });
        }
        Ok(Self {
            name,
            map,
            members: HashSet::new(),
            counts: HashMap::new(),
            wide: 0,
        })
    }

    /// Maps the words `words` of the bitmap (whole pages around them).
    fn map_words(&self, words: Range<usize>) -> Result<Mapping, DataplaneError> {
        Mapping::new(
            self.map.map().fd().as_fd(),
            words.start * 8..words.end * 8,
            true,
        )
        .map_err(|source| DataplaneError::Mmap {
            name: self.name,
            source,
        })
    }

    /// The bits an entry covers: one per block it overlaps, or None when it spans more than
    /// the filter spells out.
    fn blocks(prefix_len: u32, octets: &[u8; N]) -> Option<Blocks> {
        if N == 4 {
            let addr = u32::from_be_bytes([octets[0], octets[1], octets[2], octets[3]]);
            let span = V4_BLOCK_PREFIX.saturating_sub(prefix_len);
            if span > V4_MAX_SPAN_BITS {
                return None;
            }
            let first = block_filter::v4_bit(addr) & !((1u32 << span) - 1);
            Some(Blocks::V4(first..first + (1 << span)))
        } else {
            let mut full = [0u8; 16];
            full.copy_from_slice(&octets[..16]);
            let span = V6_BLOCK_PREFIX.saturating_sub(prefix_len);
            if span > V6_MAX_SPAN_BITS {
                return None;
            }
            let first = block_filter::v6_block(&full) & !((1u64 << span) - 1);
            Some(Blocks::V6(first..first + (1 << span)))
        }
    }

    /// Counts entries and sets the bits that go from no entry to one. Call before the entries
    /// go into their map.
    pub(super) fn add(
        &mut self,
        entries: impl IntoIterator<Item = Member<N>>,
    ) -> Result<(), DataplaneError> {
        let was_wide = self.wide > 0;
        let mut first = Vec::new();
        for (prefix_len, octets) in entries {
            if self.members.insert((prefix_len, octets)) {
                tally(
                    &mut self.counts,
                    &mut self.wide,
                    Self::blocks(prefix_len, &octets),
                    |bit| first.push(bit),
                );
            }
        }
        match (was_wide, self.wide > 0) {
            // Saturated before: every bit is already set.
            (true, _) => Ok(()),
            (false, true) => self.saturate(),
            (false, false) => self.write_bits(&first, true),
        }
    }

    /// Uncounts entries and clears the bits no other entry needs. Call only after the entries
    /// have left their map.
    pub(super) fn remove(
        &mut self,
        entries: impl IntoIterator<Item = Member<N>>,
    ) -> Result<(), DataplaneError> {
        let was_wide = self.wide > 0;
        let mut last = Vec::new();
        for (prefix_len, octets) in entries {
            if !self.members.remove(&(prefix_len, octets)) {
                continue;
            }
            let Some(bits) = Self::blocks(prefix_len, &octets) else {
                self.wide -= 1;
                continue;
            };
            for bit in bits {
                if let Some(count) = self.counts.get_mut(&bit) {
                    *count -= 1;
                    if *count == 0 {
                        self.counts.remove(&bit);
                        last.push(bit);
                    }
                }
            }
        }
        match (was_wide, self.wide > 0) {
            // Still saturated: the counts are written out when the last wide entry goes.
            (_, true) => Ok(()),
            (true, false) => self.write_counted(),
            (false, false) => self.write_bits(&last, false),
        }
    }

    /// Recounts from what the maps hold (a previous agent's pins, or maps this version of
    /// the program sees for the first time) and rewrites the bitmap to match.
    pub(super) fn rebuild(
        &mut self,
        entries: impl IntoIterator<Item = Member<N>>,
    ) -> Result<(), DataplaneError> {
        self.members.clear();
        self.counts.clear();
        self.wide = 0;
        for (prefix_len, octets) in entries {
            if self.members.insert((prefix_len, octets)) {
                tally(
                    &mut self.counts,
                    &mut self.wide,
                    Self::blocks(prefix_len, &octets),
                    |_| {},
                );
            }
        }
        if self.wide > 0 {
            self.saturate()
        } else {
            self.write_counted()
        }
    }

    /// Whether no entry is counted: the list behind the filter is empty.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether the bit of a full address is set: the XDP program goes on to the maps behind it.
    pub fn may_cover(&self, addr: [u8; N]) -> Result<bool, DataplaneError> {
        let bit = if N == 4 {
            block_filter::v4_bit(u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]))
        } else {
            let mut full = [0u8; 16];
            full.copy_from_slice(&addr[..16]);
            block_filter::v6_block_bit(block_filter::v6_block(&full))
        };
        let word = (bit >> 6) as usize;
        let words = self.map_words(word..word + 1)?;
        Ok(words.u64_at(word).load(Ordering::Acquire) & (1 << (bit & 63)) != 0)
    }

    /// Sets or clears some bits: a few through the pages that hold them, many through one
    /// mapping of the whole bitmap.
    fn write_bits(&self, bits: &[u32], set: bool) -> Result<(), DataplaneError> {
        const BITS_WORTH_A_WHOLE_MAPPING: usize = 32;
        let whole = if bits.len() > BITS_WORTH_A_WHOLE_MAPPING {
            Some(self.map_words(0..WORDS as usize)?)
        } else {
            None
        };
        for bit in bits {
            let word = (*bit >> 6) as usize;
            let page;
            let words = match &whole {
                Some(w) => w,
                None => {
                    page = self.map_words(word..word + 1)?;
                    &page
                }
            };
            let mask = 1u64 << (bit & 63);
            if set {
                words.u64_at(word).fetch_or(mask, Ordering::Release);
            } else {
                words.u64_at(word).fetch_and(!mask, Ordering::Release);
            }
        }
        Ok(())
    }

    fn saturate(&self) -> Result<(), DataplaneError> {
        let words = self.map_words(0..WORDS as usize)?;
        for i in 0..WORDS as usize {
            words.u64_at(i).store(u64::MAX, Ordering::Release);
        }
        Ok(())
    }

    /// Writes every word from the counts. Each word is one store, so a bit that stays set
    /// is never seen clear in between.
    fn write_counted(&self) -> Result<(), DataplaneError> {
        let mut values = vec![0u64; WORDS as usize];
        for bit in self.counts.keys() {
            values[(*bit >> 6) as usize] |= 1 << (bit & 63);
        }
        let words = self.map_words(0..WORDS as usize)?;
        for (i, value) in values.into_iter().enumerate() {
            let word = words.u64_at(i);
            if word.load(Ordering::Relaxed) != value {
                word.store(value, Ordering::Release);
            }
        }
        Ok(())
    }
}

/// Counts one entry's blocks (or one more wide entry); `first` gets each bit that goes from no
/// entries to one.
fn tally(
    counts: &mut HashMap<u32, u32>,
    wide: &mut usize,
    blocks: Option<Blocks>,
    mut first: impl FnMut(u32),
) {
    let Some(blocks) = blocks else {
        *wide += 1;
        return;
    };
    for bit in blocks {
        let count = counts.entry(bit).or_insert(0);
        *count += 1;
        if *count == 1 {
            first(bit);
        }
    }
}

/// The bits of the blocks one entry overlaps: IPv4 bits directly, IPv6 /48s to be hashed.
enum Blocks {
    V4(Range<u32>),
    V6(Range<u64>),
}

impl Iterator for Blocks {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        match self {
            Blocks::V4(bits) => bits.next(),
            Blocks::V6(blocks) => blocks.next().map(block_filter::v6_block_bit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(prefix_len: u32, addr: [u8; 4]) -> Option<Vec<u32>> {
        BlockFilter::<4>::blocks(prefix_len, &addr).map(Iterator::collect)
    }

    fn v6(prefix_len: u32, addr: &str) -> Option<Vec<u32>> {
        let addr: std::net::Ipv6Addr = addr.parse().expect("address");
        BlockFilter::<16>::blocks(prefix_len, &addr.octets()).map(Iterator::collect)
    }

    #[test]
    fn ipv4_entries_cover_their_24s() {
        let bit = block_filter::v4_bit(u32::from_be_bytes([203, 0, 113, 0]));
        assert_eq!(v4(32, [203, 0, 113, 7]), Some(vec![bit]));
        assert_eq!(v4(25, [203, 0, 113, 128]), Some(vec![bit]));
        assert_eq!(v4(24, [203, 0, 113, 0]), Some(vec![bit]));
        let first = block_filter::v4_bit(u32::from_be_bytes([198, 51, 96, 0]));
        assert_eq!(
            v4(20, [198, 51, 96, 0]),
            Some((first..first + 16).collect())
        );
        assert_eq!(v4(16, [198, 51, 0, 0]).map(|b| b.len()), Some(256));
        assert_eq!(v4(15, [198, 50, 0, 0]), None, "wider than /16 saturates");
        assert_eq!(v4(0, [0, 0, 0, 0]), None);
    }

    #[test]
    fn ipv6_entries_cover_their_hashed_48s() {
        let block = block_filter::v6_block(
            &"2001:db8:1::"
                .parse::<std::net::Ipv6Addr>()
                .expect("a")
                .octets(),
        );
        let bit = block_filter::v6_block_bit(block);
        assert_eq!(v6(128, "2001:db8:1:2::66"), Some(vec![bit]));
        assert_eq!(v6(64, "2001:db8:1:2::"), Some(vec![bit]));
        assert_eq!(v6(48, "2001:db8:1::"), Some(vec![bit]));
        let span = v6(40, "2001:db8:ff00::").expect("a /40 is spelled out");
        assert_eq!(span.len(), 256);
        assert!(span.iter().all(|b| *b < 1 << block_filter::BITS_LOG2));
        let distinct: std::collections::BTreeSet<_> = span.iter().collect();
        assert!(distinct.len() > 250, "the hash spreads neighbouring /48s");
        assert_eq!(v6(32, "2001:db8::").map(|b| b.len()), Some(65_536));
        assert_eq!(v6(31, "2001:db8::"), None, "wider than /32 saturates");
    }
}
