//! Packet and byte counters per verdict and interface slot: what the program counts, read
//! back summed over CPUs.

use std::collections::BTreeSet;

use apiban_common::{
    Counter, IFACE_COUNTER_SLOTS, IFACE_SLOT_INDEXES, VERDICT_COUNT, Verdict, map_names,
};
use aya::maps::{Array, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues};

use super::{DataplaneError, Stats, prefix_map::dup_map};

/// The counters and which interface counts in which slot.
pub struct Counters {
    stats: PerCpuArray<MapData, Counter>,
    iface_slots: Array<MapData, u32>,
}

impl Counters {
    pub(super) fn new(stats: Map, iface_slots: Map) -> Result<Self, DataplaneError> {
        let typed = |name: &'static str| move |source| DataplaneError::Map { name, source };
        Ok(Self {
            stats: PerCpuArray::try_from(stats).map_err(typed(map_names::STATS))?,
            iface_slots: Array::try_from(iface_slots).map_err(typed(map_names::IFACE_SLOTS))?,
        })
    }

    /// The same maps through descriptors of the reader's own.
    pub(super) fn dup(&self) -> Result<Self, DataplaneError> {
        let typed = |name: &'static str| move |source| DataplaneError::Map { name, source };
        Ok(Self {
            stats: PerCpuArray::try_from(Map::PerCpuArray(dup_map(
                self.stats.map(),
                map_names::STATS,
            )?))
            .map_err(typed(map_names::STATS))?,
            iface_slots: Array::try_from(Map::Array(dup_map(
                self.iface_slots.map(),
                map_names::IFACE_SLOTS,
            )?))
            .map_err(typed(map_names::IFACE_SLOTS))?,
        })
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
    pub(super) fn assign_counter_slot(
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
}
