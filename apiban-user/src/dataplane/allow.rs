//! The allowlist of one family: an LPM trie and the filter in front of it.

use apiban_common::AllowEntry;
use aya::maps::lpm_trie::Key;

use super::{
    DataplaneError,
    filter::BlockFilter,
    prefix_map::{Entry, PrefixMap, member},
};

/// The allowlist of one family: an LPM trie and the filter in front of it.
pub struct AllowList<const N: usize> {
    prefixes: PrefixMap<N, AllowEntry>,
    filter: BlockFilter<N>,
}

impl<const N: usize> AllowList<N> {
    /// Recounts the filter from the trie (see [`DenyMap::new`]).
    pub(super) fn new(
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

    /// Whether the list holds anything: the program skips the lookup when it does not.
    pub(super) fn is_empty(&self) -> bool {
        self.filter.is_empty()
    }

    /// The filter in front of the trie.
    pub fn filter(&self) -> &BlockFilter<N> {
        &self.filter
    }

    /// Adds a prefix; its bits are set before the program can find it.
    pub(super) fn insert(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
        self.filter.add([member(&key)])?;
        self.prefixes.insert(key)
    }

    /// Removes an exact prefix, then the bits no other entry needs.
    pub(super) fn remove(&mut self, key: Key<[u8; N]>) -> Result<(), DataplaneError> {
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
